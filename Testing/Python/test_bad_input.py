"""Bad input and unsafe output folders (issue 16), on real CT: the sample crop, a LIDC VOI
(NIfTI), the Lung-PET-CT-Dx A0002 DICOM series.

Every case asserts the exit code, the one-line ``nodulemtl: error: ...`` message (no
traceback), that no partial output exists and that every file that existed before is
byte-identical afterwards.  Bad inputs are built from copies of the real files (truncated,
a slice removed, NaN written in, a header edited).

Most cases are refused before any computation.  Where a case must get as far as writing
(batch case names, replacing an earlier result, a failure half-way through the swap), the
analysis is replaced by a stand-in that returns "not found" for each point
(:func:`_fake_analysis`): what is tested there is where and how the files are written, not
the segmentation; ``test_out_folder_appears_only_with_the_results`` runs the real analysis.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.apps import batch, cli
from NoduleMTLLib.apps.reporting import REPORT_FILES
from NoduleMTLLib.core import safe_output
from NoduleMTLLib.core.errors import LIBRARY_EXIT_CODES
from NoduleMTLLib.core.io import InputError, check_slice_positions, read_ct
from NoduleMTLLib.core.results import AnalysisResult, NoduleResult
from NoduleMTLLib.core.safe_output import visible_entries
from NoduleMTLLib.inference import pipeline
from NoduleMTLLib.models import registry
from NoduleMTLLib.outputs.files import OUTPUT_FILES

pytestmark = pytest.mark.slow  # real analyses on the sample CT around every output-folder rule

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
NODULE3_RAS = (-23.5, 47.6, -172.3)  # a 13 mm nodule of the sample crop
PT = ["--point", *(str(v) for v in NODULE3_RAS)]
FAST = ["--networks", "lnmsnet", "--device", "cpu", "--quiet"]


# ---------------------------------------------------------------- helpers


def _run(args, capsys):
    """cli.main -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err: str, *fragments: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("nodulemtl: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (links not followed), by relative path."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = "link:" + os.readlink(p) if p.is_symlink() else \
                hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs:
            if (Path(dirpath) / d).is_symlink():
                out[str((Path(dirpath) / d).relative_to(root))] = "link:" + os.readlink(Path(dirpath) / d)
    return out


def _fake_analysis(ct, points_lps, network_ids=("lnmsnet",), **kw):
    """Stand-in for pipeline.analyze_points: one 'not found' nodule per point, nothing computed."""
    nods = [NoduleResult(id=i + 1, point_lps_mm=tuple(p), found=False, message="stand-in")
            for i, p in enumerate(points_lps)]
    return AnalysisResult(input=ct.describe(), run={"networks": list(network_ids), "device": "cpu"}, nodules=nods)


@pytest.fixture
def fake_analysis(monkeypatch):
    monkeypatch.setattr(pipeline, "analyze_points", _fake_analysis)


@pytest.fixture(scope="module")
def voi(shared_data) -> Path:
    """A real LIDC VOI (LIDC-IDRI-0003, nodule 2; 55 x 48 x 12 voxels, int16 HU, NIfTI gzip)."""
    return shared_data / "lidc_vois" / "images" / "LIDC-IDRI-0003_R_2.nii.gz"


@pytest.fixture(scope="module")
def dicom(shared_data) -> Path:
    return shared_data / "whole_ct" / "lung_pet_ct_dx_A0002_dicom"


def _series_files(folder: Path) -> list[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def _link_series(src: Path, dst: Path, skip: int | None = None, truncate: int | None = None) -> Path:
    """dst/: links to the series' files (in GDCM order), leaving out file ``skip`` or writing a
    truncated copy of file ``truncate`` (0-based)."""
    dst.mkdir()
    for k, f in enumerate(_series_files(src)):
        if k == skip:
            continue
        if k == truncate:
            (dst / Path(f).name).write_bytes(Path(f).read_bytes()[:3000])
        else:
            os.symlink(f, dst / Path(f).name)
    return dst


def _refused(args, capsys, root: Path, *fragments, rc=None) -> str:
    """Run, check exit code (``rc``, default: any library error's, errors.py) and one-line message,
    and that nothing under ``root`` changed."""
    before = _snapshot(root)
    code, _, err = _run(args, capsys)
    assert (code == rc) if rc is not None else (code in LIBRARY_EXIT_CODES), (code, err)
    msg = _one_line_error(err, *fragments) if code != 2 else err
    assert _snapshot(root) == before
    return msg


# ---------------------------------------------------------------- inputs that lie


def test_truncated_nifti(voi, tmp_path, capsys):
    raw = gzip.decompress(voi.read_bytes())
    (tmp_path / "ct.nii").write_bytes(raw[: len(raw) * 2 // 3])
    data = voi.read_bytes()
    (tmp_path / "ct_gz.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    for name in ("ct.nii", "ct_gz.nii.gz"):
        _refused(["analyze", str(tmp_path / name), *PT, "--out", str(tmp_path / "o"), *FAST], capsys, tmp_path,
                 "is incomplete", "declares 12 slices")
    assert not (tmp_path / "o").exists()


def test_nifti_header_declares_more_slices(voi, tmp_path, capsys):
    raw = bytearray(gzip.decompress(voi.read_bytes()))
    assert int.from_bytes(raw[46:48], "little") == 12  # dim[3]
    raw[46:48] = (20).to_bytes(2, "little")
    (tmp_path / "more.nii").write_bytes(bytes(raw))
    (tmp_path / "more_gz.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    for name in ("more.nii", "more_gz.nii.gz"):
        msg = _refused(["analyze", str(tmp_path / name), *PT, "--out", str(tmp_path / "o"), *FAST], capsys, tmp_path,
                       "declares 20 slices")
        assert "data for 12.0 slices" in msg
    read_ct(voi)  # the intact file passes


def test_truncated_nrrd_and_metaimage(tmp_path, capsys):
    """Already refused by ITK; the message must say why (MetaIO's exception alone says 'No such file')."""
    img = sitk.ReadImage(str(SAMPLE))
    for name, comp in (("ct.nrrd", False), ("ct_c.nrrd", True), ("ct.mha", False), ("ct_c.mha", True)):
        full = tmp_path / ("full_" + name)
        sitk.WriteImage(img, str(full), comp)
        data = full.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
        full.unlink()
        msg = _refused(["analyze", str(tmp_path / name), *PT, "--out", str(tmp_path / "o"), *FAST], capsys, tmp_path,
                       "Cannot read")
        assert "No such file" not in msg


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, capsys, value):
    img = sitk.Cast(sitk.ReadImage(str(SAMPLE)), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[20, 100, 90] = value  # (k, j, i) inside the 13 mm nodule's neighbourhood
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(tmp_path / "ct.nrrd"), True)
    _refused(["analyze", str(tmp_path / "ct.nrrd"), *PT, "--out", str(tmp_path / "o"), *FAST], capsys, tmp_path,
             "1 voxels that are not numbers", "(90, 100, 20)")


@pytest.mark.parametrize("how", ["removed", "unreadable"])
def test_dicom_series_with_a_missing_slice(dicom, tmp_path, capfd, how):
    """One slice of the 30-slice series gone or corrupt: GDCM reads 29 slices as evenly spaced;
    refused by their positions, and ITK's warning does not reach the terminal."""
    series = _link_series(dicom, tmp_path / "series", **({"skip": 14} if how == "removed" else {"truncate": 14}))
    args = ["analyze", str(series), *PT, "--lps", "--out", str(tmp_path / "o"), *FAST]
    before = _snapshot(tmp_path)
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capfd.readouterr()
    assert rc == InputError.exit_code
    _one_line_error(err, "slice 15 of 30 is missing or unreadable", "gap of 16 mm between z=184 and z=200",
                     "8 mm apart")
    assert "WARNING" not in err and "nonuniformity" not in err
    assert _snapshot(tmp_path) == before


def test_slice_position_rules():
    ori = (1, 0, 0, 0, 1, 0)
    even = [(0, 0, 2.5 * k) for k in range(10)]
    check_slice_positions(even, ori)
    check_slice_positions(even[::-1], ori)  # order does not matter
    with pytest.raises(InputError, match=r"slices 4-5 of 10 are missing"):
        check_slice_positions(even[:3] + even[5:], ori)
    with pytest.raises(InputError, match="not uniform"):
        check_slice_positions(even[:5] + [(0, 0, 11.2)] + even[6:], ori)
    with pytest.raises(InputError, match="same position"):
        check_slice_positions(even + [even[3]], ori)
    tilted = (1, 0, 0, 0, np.cos(0.3), np.sin(0.3))  # spacing is measured along the slice normal
    n = np.cross(tilted[:3], tilted[3:])
    check_slice_positions([tuple(2.0 * k * n) for k in range(8)], tilted)
    with pytest.raises(InputError, match="slice 4 of 8 is missing"):
        check_slice_positions([tuple(2.0 * k * n) for k in range(8) if k != 3], tilted)


def _already_handled_cases(tmp: Path, shared: Path) -> dict:
    """Bad inputs that were refused cleanly before issue 16 (kept so that none regresses)."""
    shifted = sitk.Cast(sitk.ReadImage(str(SAMPLE)), sitk.sitkFloat32) + 2000.0  # no air: not HU
    sitk.WriteImage(shifted, str(tmp / "shifted.nrrd"))
    (tmp / "empty").mkdir()
    (tmp / "blocker").write_text("a file where a folder should be")
    (tmp / "garbage.nrrd").write_bytes(b"NRRD0004\nnot a header\n")
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "list.txt").write_text(f"{SAMPLE}\n")
    png = next((shared / "lidc_slices" / "nodules").glob("LIDC-IDRI-0003_*_image.png"))
    labels = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop_labels.nrrd"
    out = ["--out", str(tmp / "o")]
    return {
        "missing input": (["analyze", str(tmp / "nope.nrrd"), *PT, *out], "Input not found"),
        "2D image": (["analyze", str(png), *PT, *out], "3D"),
        "label map": (["analyze", str(labels), *PT, *out], "label map"),
        "not HU": (["analyze", str(tmp / "shifted.nrrd"), *PT, *out], "Hounsfield"),
        "garbage file": (["analyze", str(tmp / "garbage.nrrd"), *PT, *out], "Cannot read"),
        "empty file": (["analyze", str(tmp / "empty.nii.gz"), *PT, *out], "Cannot read"),
        "folder without DICOM": (["analyze", str(tmp / "empty"), *PT, *out], "No DICOM series"),
        "point outside the volume": (["analyze", str(SAMPLE), "--point", "0", "0", "500", *out], "outside the CT volume"),
        "unknown network": (["analyze", str(SAMPLE), *PT, *out, "--networks", "nonet"], "nonet"),
        "out under a file": (["analyze", str(SAMPLE), *PT, "--out", str(tmp / "blocker" / "o")], "output folder"),
        "batch: missing input": (["batch", str(tmp / "nope"), *out], "Input not found"),
        "batch: folder without CT": (["batch", str(tmp / "empty"), *out], "No CT files"),
        "batch: unknown network": (["batch", str(tmp / "list.txt"), *out, "--networks", "nonet"], "nonet"),
        "batch: binary file as list": (["batch", str(SAMPLE), *out], "Cannot read input list"),
    }


def test_inputs_refused_before_issue_16_still_are(tmp_path, shared_data, capsys):
    for name, (args, fragment) in _already_handled_cases(tmp_path, shared_data).items():
        a = args if "--networks" in args else args + ["--networks", "lnmsnet"]
        _refused(a + ["--device", "cpu", "--quiet"], capsys, tmp_path, fragment)
        assert not (tmp_path / "o").exists(), name


# ---------------------------------------------------------------- outputs that must not overwrite


@pytest.mark.parametrize("name", OUTPUT_FILES)
def test_out_holding_an_output_file_is_refused(tmp_path, capsys, name):
    out = tmp_path / "o"
    out.mkdir()
    (out / name).write_bytes(b"the user's own file\n")
    _refused(["analyze", str(SAMPLE), *PT, "--out", str(out), *FAST], capsys, tmp_path, "already holds " + name,
             "--overwrite")


def test_input_inside_out_is_never_replaced(tmp_path, capsys):
    """An input CT named labels.nrrd inside --out: refused, also with --overwrite."""
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(SAMPLE, out / "labels.nrrd")
    for extra in ([], ["--overwrite"]):
        _refused(["analyze", str(out / "labels.nrrd"), *PT, "--out", str(out), *FAST, *extra], capsys, tmp_path,
                 "contains the input")


def test_out_is_the_input(dicom, tmp_path, capsys):
    series = _link_series(dicom, tmp_path / "series")
    _refused(["analyze", str(series), *PT, "--out", str(series), *FAST], capsys, tmp_path, "is the input")
    shutil.copy(SAMPLE, tmp_path / "ct.nrrd")
    _refused(["analyze", str(tmp_path / "ct.nrrd"), *PT, "--out", str(tmp_path / "ct.nrrd"), *FAST], capsys, tmp_path,
             "not a folder")
    # batch: --out is the input folder, or contains it
    _refused(["batch", str(tmp_path), "--out", str(tmp_path), *FAST], capsys, tmp_path, "is the input")
    _refused(["batch", str(series), "--out", str(tmp_path), *FAST], capsys, tmp_path, "contains the input")


@pytest.mark.parametrize("cmd", ["analyze", "batch"])
def test_empty_out_and_empty_network_lists_are_usage_errors(tmp_path, capsys, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    shutil.copy(SAMPLE, tmp_path / "ct.nrrd")
    head = ["analyze", "ct.nrrd", *PT] if cmd == "analyze" else ["batch", "ct.nrrd"]
    for args in (["--out", ""], ["--out", "  "], ["--out", "o", "--networks", ","], ["--out", "o", "--networks", " , ,"],
                 ["--out", "o", "--networks", ""]):
        before = _snapshot(tmp_path)
        rc, _, err = _run(head + args + ["--quiet"], capsys)
        assert rc == 2 and "Traceback" not in err
        assert re.match(r"nodulemtl( \w+)?: error: argument --(out|networks)", err.strip().splitlines()[-1]), err
        assert _snapshot(tmp_path) == before


def test_concurrent_run_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    with safe_output.FolderLock(out):
        msg = _refused(["analyze", str(SAMPLE), *PT, "--out", str(out), *FAST], capsys, tmp_path,
                       "Another nodulemtl run", f"pid {os.getpid()}")
        lst = tmp_path / "l.txt"
        lst.write_text(f"{SAMPLE}\n")
        _refused(["batch", str(lst), "--out", str(out), *FAST], capsys, tmp_path, "Another nodulemtl run")
    assert not out.exists() and "wait for it" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.txt"]  # the lock file is gone


# ---------------------------------------------------------------- all or nothing


def test_out_folder_appears_only_with_the_results(tmp_path, capsys, monkeypatch):
    """The real analysis: --out (and a missing parent) do not exist while it computes; a failed
    run removes the parents it created."""
    out = tmp_path / "new" / "o"
    real = pipeline.analyze_points
    seen = {}

    def spy(*a, **k):
        seen["out_existed"] = out.exists()
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "analyze_points", spy)
    rc, stdout, err = _run(["analyze", str(SAMPLE), *PT, "--out", str(out), *FAST], capsys)
    assert rc == 0, err
    assert seen == {"out_existed": False}
    assert visible_entries(out) == sorted(OUTPUT_FILES + REPORT_FILES)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o"]  # no lock file, no temporary folder
    # a failing run into another new folder leaves nothing, not even the parents it made
    bad = tmp_path / "a" / "b" / "o"
    rc, _, err = _run(["analyze", str(SAMPLE), "--point", "0", "0", "500", "--out", str(bad), *FAST], capsys)
    assert rc == InputError.exit_code and "outside the CT volume" in _one_line_error(err)
    assert not (tmp_path / "a").exists()


def test_overwrite_replaces_only_our_files(tmp_path, capsys, fake_analysis):
    out = tmp_path / "o"
    out.mkdir()
    for name in OUTPUT_FILES + ("segmentation.dcm",):
        (out / name).write_bytes(b"old " + name.encode())
    (out / "notes.txt").write_text("the user's notes")
    rc, _, err = _run(["analyze", str(SAMPLE), *PT, "--out", str(out), *FAST, "--overwrite"], capsys)
    assert rc == 0, err
    # the old SEG is gone (this run wrote none); the user's notes stay
    assert visible_entries(out) == sorted(OUTPUT_FILES + REPORT_FILES + ("notes.txt",))
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert b"stand-in" in (out / "nodules.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_failure_half_way_through_the_swap_keeps_the_old_set(tmp_path, capsys, fake_analysis, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    for name in OUTPUT_FILES:
        (out / name).write_bytes(b"old " + name.encode())
    calls = []

    def failing_move(src, dst):
        calls.append(dst.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        os.replace(src, dst)

    monkeypatch.setattr(safe_output, "_move_in", failing_move)
    _refused(["analyze", str(SAMPLE), *PT, "--out", str(out), *FAST, "--overwrite"], capsys, tmp_path,
             "Cannot write outputs", "No space left on device")
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and visible_entries(out) == sorted(OUTPUT_FILES)


def test_killed_runs_are_cleaned_up_by_the_next_run(tmp_path, capsys, fake_analysis):
    """What kill -9 leaves: a staging folder beside --out, a temporary folder inside it (older
    versions), an interrupted swap (old set in a backup, two new files already moved in)."""
    out = tmp_path / "o"
    out.mkdir()
    stale = tmp_path / ".nodulemtl-tmp-o-ab12cd_e"
    stale.mkdir()
    (stale / "labels.nrrd").write_bytes(b"partial")
    (out / ".nodulemtl-tmp-x1y2z3w4").mkdir()
    backup = out / ".nodulemtl-old-k9k9k9k9"
    backup.mkdir()
    for name in OUTPUT_FILES:
        (backup / name).write_bytes(b"old " + name.encode())
    (out / "labels.nrrd").write_bytes(b"new, half-way")
    (out / "nodules.csv").write_bytes(b"new, half-way")
    (backup / ".nodulemtl-swap.json").write_text('{"state": "moving-new", "new": ["labels.nrrd", "nodules.csv", '
                                                 '"nodules.json", "segmentation.seg.nrrd"]}')
    other = tmp_path / ".nodulemtl-tmp-o-other-ab12cd_e"  # another folder's staging ("o-other"): not touched
    other.mkdir()
    # without --overwrite the repaired (old) set is refused, but the debris is gone and the old set is back
    _run(["analyze", str(SAMPLE), *PT, "--out", str(out), *FAST], capsys)
    assert visible_entries(out) == sorted(OUTPUT_FILES)
    assert all((out / n).read_bytes() == b"old " + n.encode() for n in OUTPUT_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".nodulemtl-tmp-o-other-ab12cd_e", "o"]


# ---------------------------------------------------------------- batch


def test_batch_case_names_cannot_leave_out(tmp_path, capsys, fake_analysis, dicom):
    """List lines '.../...nrrd' (name '..'), '..nrrd' (name '.') and a DICOM path ending in
    'sub/..': every output lands in its own folder inside --out; the user's files in the
    parent of --out stay as they were."""
    work = tmp_path / "work"
    (work / "...").mkdir(parents=True)
    os.symlink(SAMPLE, work / "..." / "...nrrd")
    os.symlink(SAMPLE, work / "..nrrd")
    series = _link_series(dicom, work / "A0002")
    (series / "sub").mkdir()
    (tmp_path / "nodules.csv").write_text("the user's table\n")
    (tmp_path / "labels.nrrd").write_bytes(SAMPLE.read_bytes()[:100])
    lst = work / "cases.txt"
    lst.write_text(".../...nrrd\n..nrrd\nA0002/sub/..\n")
    p = list(NODULE3_RAS)
    pts = work / "p.csv"
    pts.write_text("case,x,y,z\n" + "".join(f"{c},{p[0]},{p[1]},{p[2]}\n" for c in (".../...nrrd", "..nrrd")) +
                   "A0002/sub/..,-100,-150,150\n")
    out = tmp_path / "out"
    before = _snapshot(tmp_path)
    rc, stdout, err = _run(["batch", str(lst), "--out", str(out), "--points", str(pts), *FAST], capsys)
    assert rc == 0, err
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out" + os.sep)} == before
    cases = sorted(q.name for q in out.iterdir() if q.is_dir())
    assert len(cases) == 3 and "A0002" in cases and visible_entries(out) == sorted(cases + ["summary.csv"])
    for c in cases:
        assert c not in (".", "..") and not c.startswith(".")
        assert visible_entries(out / c) == sorted(OUTPUT_FILES + REPORT_FILES)


def test_case_name_rules(tmp_path):
    assert [safe_output.safe_case_name(n) for n in ("..", ".", "", "a/b", "a\\b", ".hidden", "ok name", "x.")] == \
        ["_", "_", "case", "a_b", "a_b", "_hidden", "ok name", "x"]
    for bad in ("..", ".", "a/b", ""):
        with pytest.raises(safe_output.OutputError):
            safe_output.case_dir(tmp_path, bad)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "case")  # a case folder that is a link out of --out
    with pytest.raises(safe_output.OutputError, match="inside"):
        safe_output.case_dir(tmp_path / "out", "case")
    names = [c.name for c in batch.name_cases([(s, Path(s)) for s in (".../...nrrd", "..nrrd", "d/sub/..", "a/ct.nrrd")])]
    assert all(n not in (".", "..") and "/" not in n and not n.startswith(".") for n in names)
    assert names[2] == "d" and len(set(names)) == len(names)


def test_batch_partial_outputs_in_a_case_folder(tmp_path, capsys, fake_analysis):
    """A case folder holding some output file but not all four (not done-before): the case fails
    without --overwrite, the file stays as it was."""
    lst = tmp_path / "l.txt"
    lst.write_text(f"{SAMPLE}\n")
    pts = tmp_path / "p.csv"
    pts.write_text(f"case,x,y,z\nLIDC-IDRI-0003_crop,{NODULE3_RAS[0]},{NODULE3_RAS[1]},{NODULE3_RAS[2]}\n")
    case = tmp_path / "out" / "LIDC-IDRI-0003_crop"
    case.mkdir(parents=True)
    (case / "nodules.csv").write_text("the user's table\n")
    rc, _, err = _run(["batch", str(lst), "--out", str(tmp_path / "out"), "--points", str(pts), *FAST], capsys)
    assert rc == 1 and "already holds nodules.csv" in err
    assert visible_entries(case) == ["nodules.csv"]
    assert (case / "nodules.csv").read_text() == "the user's table\n"
    rc, _, err = _run(["batch", str(lst), "--out", str(tmp_path / "out"), "--points", str(pts), *FAST, "--overwrite"],
                      capsys)
    assert rc == 0 and visible_entries(case) == sorted(OUTPUT_FILES + REPORT_FILES)
    assert visible_entries(tmp_path / "out") == ["LIDC-IDRI-0003_crop", "summary.csv"]


def test_batch_folder_walk_visits_each_real_path_once(tmp_path):
    d = tmp_path / "in"
    (d / "p1").mkdir(parents=True)
    shutil.copy(SAMPLE, d / "p1" / "ct.nrrd")
    os.symlink(d, d / "p1" / "loop")  # loop/ -> in/
    os.symlink(".", d / "here")  # here -> in/ itself
    os.symlink(d / "p1" / "ct.nrrd", d / "same_ct.nrrd")  # a second link to the same file
    os.symlink(d / "p1", d / "p1_again")
    cases = batch.find_cases(d)
    assert [c.path.relative_to(d).as_posix() for c in cases] == ["p1/ct.nrrd"]


# ---------------------------------------------------------------- checkpoints cannot run code


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path: Path, marker: Path, wrap: bool = True) -> Path:
    import torch

    obj = {"model": {"w": _Payload(marker)}, "epoch": 0} if wrap else _Payload(marker)
    torch.save(obj, path)
    return path


def test_crafted_checkpoints_run_nothing(tmp_path, monkeypatch):
    import json

    import torch

    from training import checkpoint, click2d, detection

    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / "evil.pt", marker)
    # sanity: the file is effective - plain unpickling of its data.pkl creates the marker
    import pickle
    import zipfile

    with zipfile.ZipFile(evil) as z:
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(registry.WeightsError):
        registry.read_state_dict(evil)
    with pytest.raises(registry.WeightsError):
        registry.load_weights_into(torch.nn.Linear(1, 1), evil)
    with pytest.raises(registry.WeightsError):
        registry.export_weights("lnmsnet", evil, tmp_path / "w" / "lnmsnet.safetensors")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(evil)

    # the trainers' load paths: click2d init_from and resume, detection resume (no data needed to get there)
    monkeypatch.setattr(click2d, "load_split", lambda: {"train": [], "val": []})
    monkeypatch.setattr(click2d, "load_slice_nodules", lambda *a, **k: [])
    cfg = json.loads((REPO / "training" / "configs" / "lnmsnet.json").read_text())
    with pytest.raises(checkpoint.CheckpointError):
        click2d.train({**cfg, "init_from": str(evil)}, tmp_path / "run1", log=lambda s: None)
    (tmp_path / "run2").mkdir()
    _crafted(tmp_path / "run2" / "last.pt", marker)
    with pytest.raises(checkpoint.CheckpointError):
        click2d.train(cfg, tmp_path / "run2", log=lambda s: None)
    monkeypatch.setattr(detection, "load_split", lambda: {"train": [], "val": []})
    monkeypatch.setattr(detection, "_load_nodules", lambda *a, **k: [])
    monkeypatch.setattr(detection, "validation_samples", lambda *a, **k: [])
    (tmp_path / "run3").mkdir()
    _crafted(tmp_path / "run3" / "last.pt", marker)
    dcfg = json.loads((REPO / "training" / "configs" / "maskrcnn25d.json").read_text())
    with pytest.raises(checkpoint.CheckpointError):
        detection.train(dcfg, tmp_path / "run3", log=lambda s: None, device="cpu")
    assert not marker.exists()


def test_no_unrestricted_torch_load_in_the_project():
    import re

    offenders = []
    for f in list(REPO.glob("NoduleMTLLib/**/*.py")) + list(REPO.glob("training/**/*.py")) + \
            list(REPO.glob("NoduleMTL/**/*.py")) + list(REPO.glob("Testing/**/*.py")):
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", f.read_text()):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{f.relative_to(REPO)}: {m.group(0)[:80]}")
    assert not offenders, offenders


def test_checkpoint_values_are_plain():
    import torch

    from training.checkpoint import plain

    v = plain({"a": np.float64(0.5), "b": [np.int64(3), (np.float32(1.5), "x")], "p": Path("/x"),
               "t": torch.ones(2), "arr": np.arange(2)})
    assert v["a"] == 0.5 and type(v["a"]) is float and type(v["b"][0]) is int and v["b"][1] == (1.5, "x")
    assert v["p"] == "/x" and isinstance(v["t"], torch.Tensor) and v["arr"] == [0, 1]
    with pytest.raises(TypeError):
        plain({"f": object()})
