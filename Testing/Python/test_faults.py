"""Faults and hostile inputs, one test per class of fault (issue 25), through the command line on
real CT: the exit code of the error's class (:mod:`NoduleMTLLib.core.errors`), a one-line message
without traceback, the user's files byte-identical, and the same nodule ids in labels.nrrd,
segmentation.seg.nrrd, nodules.json and nodules.csv.

Real data: the sample CT (LIDC-IDRI-0003 crop) and the Lung-PET-CT-Dx A0002 DICOM series of
the shared data folder (rewritten as MR with pydicom for the non-CT class).  Mount points and a
full disk need ``unshare`` and mount rights (skipped with the reason otherwise).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.apps import cli
from NoduleMTLLib.clinical import thick_slices
from NoduleMTLLib.core import errors, safe_output, strict_json
from NoduleMTLLib.core.errors import BatchError, CalibrationError, InputError, NoLungError, NotCTError, OutputError, WeightsError
from NoduleMTLLib.core.results import AnalysisResult, NoduleResult
from NoduleMTLLib.inference import pipeline
from NoduleMTLLib.models import calibration, registry
from NoduleMTLLib.outputs.files import OUTPUT_FILES
from NoduleMTLLib.outputs.writer import write_core_files

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
NODULE3_RAS = (-23.5, 47.6, -172.3)  # a 13 mm part-solid nodule of the sample crop
PT = ["--point", *(str(v) for v in NODULE3_RAS)]
FAST = ["--networks", "lnmsnet", "--device", "cpu", "--quiet"]


# ---------------------------------------------------------------- helpers


def _run(args, capsys):
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str, *fragments: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("nodulemtl: warning")]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("nodulemtl: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if (Path(dirpath) / d).is_symlink()]:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = "link:" + os.readlink(p) if p.is_symlink() else \
                hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _refused(args, capsys, root: Path, error: type, *fragments) -> str:
    before = _snapshot(root)
    rc, _, err = _run(args, capsys)
    assert rc == error.exit_code, (rc, err)
    line = _one_line(err, *fragments)
    assert _snapshot(root) == before
    return line


def assert_same_ids(out: Path) -> set[int]:
    """The found nodules' ids agree in labels.nrrd, segmentation.seg.nrrd, nodules.json and nodules.csv."""
    import slicerio

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    in_labels = {int(v) for v in np.unique(labels) if v}
    js = json.loads((out / "nodules.json").read_text())
    in_json = {n["id"] for n in js["nodules"] if n["found"]}
    assert all(n["label_value"] == n["id"] for n in js["nodules"] if n["found"])
    with open(out / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    in_csv = {int(r["id"]) for r in rows if r["found"] == "True"}
    assert [int(r["id"]) for r in rows] == [n["id"] for n in js["nodules"]]
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    in_seg = {int(s["id"].split("_")[1]) for s in seg["segments"]}
    assert in_labels == in_json == in_csv == in_seg, (in_labels, in_json, in_csv, in_seg)
    return in_json


def _fake_analysis(ct, points_lps, network_ids=("lnmsnet",), **kw):
    """Stand-in for pipeline.analyze_points (tests of refusals and of the output folder)."""
    nods = [NoduleResult(id=i + 1, point_lps_mm=tuple(p), found=False, message="stand-in") for i, p in enumerate(points_lps)]
    return AnalysisResult(input=ct.describe(), run={"networks": list(network_ids), "device": "cpu"}, nodules=nods)


@pytest.fixture
def fake_analysis(monkeypatch):
    monkeypatch.setattr(pipeline, "analyze_points", _fake_analysis)


# ---------------------------------------------------------------- errors: one root, one code per class


def test_every_library_error_has_one_root_and_its_own_exit_code():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.NoduleMTLError)]
    codes = [c.exit_code for c in classes if not issubclass(c, errors.UsageError)]
    assert len(set(codes)) == len(codes) and not {0, 2, 130} & set(codes)
    assert {c.exit_code for c in classes if issubclass(c, errors.UsageError)} == {2}  # usage errors, as argparse's
    # the historic homes name the same classes
    from NoduleMTLLib.apps import batch
    from NoduleMTLLib.core import device, io
    from NoduleMTLLib.detection import preprocess
    from NoduleMTLLib.models import model_import
    from NoduleMTLLib.outputs import dicom_seg, dicom_sr
    from NoduleMTLLib.outputs import files as outputs
    homes = {io: ["InputError"], batch: ["BatchError"], registry: ["WeightsError"], calibration: ["CalibrationError"],
             device: ["DeviceError"], safe_output: ["OutputError", "OutputLocked"], outputs: ["OutputsError"],
             dicom_seg: ["DicomSegError"], dicom_sr: ["DicomSrError"], model_import: ["ModelImportError"],
             preprocess: ["NoLungError"]}
    assert sum(len(v) for v in homes.values()) == 12
    for mod, names in homes.items():
        for n in names:
            assert getattr(mod, n) is getattr(errors, n)
    # no exception class is defined outside errors.py, and no KeyError is caught around the service
    for path in (REPO / "NoduleMTLLib").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and path.name != "errors.py":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"Exception", "ValueError", "RuntimeError", "OSError", "KeyError"}, (path, node.name)
            if path.name in ("cli.py", "batch.py") and isinstance(node, ast.ExceptHandler) and node.type is not None:
                assert "KeyError" not in ast.unparse(node.type) or path.name == "batch.py" and "OSError" in ast.unparse(node.type), \
                    (path, ast.unparse(node.type))
    assert errors.exit_code_for(KeyboardInterrupt()) == 130


def test_no_json_writer_allows_nan(tmp_path):
    """Every json.dump(s) of the product passes allow_nan=False; a NaN in a result is a clear error, not NaN in a file."""
    for path in [*(REPO / "NoduleMTLLib").rglob("*.py"), *(REPO / "NoduleMTL").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("json.dumps", "json.dump"):
                if path.name in ("report_html.py", "protocol.py") and "allow_nan" not in ast.unparse(node):
                    # a value shown in HTML / quoted in an error message (protocol._describe), not a JSON file
                    continue
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("allow_nan") == "False", f"{path.relative_to(REPO)}:{node.lineno}"
    ct = sitk.ReadImage(str(SAMPLE))
    from NoduleMTLLib.core.io import CTVolume
    vol = CTVolume(ct, str(SAMPLE))
    res = AnalysisResult(input=vol.describe(), run={"networks": ["lnmsnet"]}, nodules=[
        NoduleResult(id=1, point_lps_mm=(0.0, 0.0, 0.0), found=False, malignancy_probability=float("nan"))])
    with pytest.raises(OutputError, match=r"nodules\[0\].malignancy_probability"):
        write_core_files(res, vol, tmp_path)
    assert not (tmp_path / "nodules.json").exists()
    for bad in ("NaN", "[Infinity]", '{"a": 1e999}'):
        with pytest.raises(ValueError):
            strict_json.loads(bad)


# ---------------------------------------------------------------- 1. not a chest CT


def _as_mr(src: Path, dst: Path, n: int = 12, sop: str = "1.2.840.10008.5.1.4.1.1.4", modality: str = "MR") -> Path:
    """The first ``n`` slices of a real DICOM CT series with their headers rewritten (pydicom)."""
    import pydicom

    dst.mkdir()
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(src)))[:n]
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Modality = modality
        ds.SOPClassUID = sop
        ds.file_meta.MediaStorageSOPClassUID = sop
        ds.save_as(dst / Path(f).name)
    return dst


@pytest.fixture(scope="module")
def a0002(shared_data) -> Path:
    return shared_data / "whole_ct" / "lung_pet_ct_dx_A0002_dicom"


def test_non_ct_series_are_refused_unless_allowed(a0002, tmp_path, capsys, fake_analysis):
    mr = _as_mr(a0002, tmp_path / "mr")
    sc = _as_mr(a0002, tmp_path / "sc", sop="1.2.840.10008.5.1.4.1.1.7", modality="CT")  # Secondary Capture
    out = ["--out", str(tmp_path / "o")]
    pt = ["--point", "-100", "-150", "150", *FAST]
    _refused(["analyze", str(mr), *pt, *out], capsys, tmp_path, NotCTError, "Modality MR", "MR Image Storage",
             "--allow-non-ct")
    _refused(["analyze", str(sc), *pt, *out], capsys, tmp_path, NotCTError, "Secondary Capture")
    mask = tmp_path / "m.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(mask))
    _refused(["reclassify", str(mr), "--mask", str(mask), *FAST, *out], capsys, tmp_path, NotCTError, "not a CT")
    rc, _, err = _run(["analyze", str(mr), *pt, *out, "--allow-non-ct", "--no-pictures"], capsys)
    assert rc == 0, err
    inp = json.loads((tmp_path / "o" / "nodules.json").read_text())["input"]
    assert inp["modality"] == "MR" and inp["non_ct_allowed"] is True
    # batch: the case fails with the same reason, the others are not affected
    lst = tmp_path / "list.txt"
    lst.write_text(f"{mr}\n")
    pts = tmp_path / "p.csv"
    pts.write_text("case,x,y,z\nmr,-100,-150,150\n")
    rc, _, err = _run(["batch", str(lst), "--points", str(pts), "--out", str(tmp_path / "b"), *FAST], capsys)
    assert rc == 1 and "mr: failed:" in err and "Modality MR" in err and "Traceback" not in err


# ---------------------------------------------------------------- 2. masks on another grid, multi-label masks


def _sphere_mask(ref: sitk.Image, centres_ras, radius_mm: float, values) -> sitk.Image:
    arr = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint16)
    kk, jj, ii = np.indices(arr.shape)
    sp = np.array(ref.GetSpacing())
    for c, v in zip(centres_ras, values):
        i, j, k = ref.TransformPhysicalPointToContinuousIndex([-c[0], -c[1], c[2]])
        d2 = ((ii - i) * sp[0]) ** 2 + ((jj - j) * sp[1]) ** 2 + ((kk - k) * sp[2]) ** 2
        arr[d2 <= radius_mm ** 2] = v
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


@pytest.mark.slow
def test_reclassify_refuses_other_grids_and_splits_label_maps(tmp_path, capsys):
    ct = sitk.ReadImage(str(SAMPLE))
    good = _sphere_mask(ct, [NODULE3_RAS], 5.0, [1])
    out = ["--out", str(tmp_path / "o")]
    shifted = sitk.Image(good)
    shifted.SetOrigin([v + (40.0 if a == 0 else 0.0) for a, v in enumerate(good.GetOrigin())])
    scaled = sitk.Image(good)
    scaled.SetSpacing([v * 1.5 for v in good.GetSpacing()])
    flipped = sitk.Image(good)
    flipped.SetDirection([-1, 0, 0, 0, 1, 0, 0, 0, 1])
    for name, img, what in (("shifted", shifted, "origin"), ("scaled", scaled, "spacing"), ("flipped", flipped, "direction")):
        sitk.WriteImage(img, str(tmp_path / f"{name}.nrrd"))
        line = _refused(["reclassify", str(SAMPLE), "--mask", str(tmp_path / f"{name}.nrrd"), *FAST, *out], capsys,
                        tmp_path, InputError, "is not on the CT's grid", what)
        assert "the CT (" in line  # both numbers given
    # a label map with two nodules (values 2 and 5): one nodule per label, ids kept, not merged
    other_ras = (NODULE3_RAS[0] + 30.0, NODULE3_RAS[1], NODULE3_RAS[2])
    sitk.WriteImage(_sphere_mask(ct, [NODULE3_RAS, other_ras], 4.0, [2, 5]), str(tmp_path / "labels.nrrd"))
    _refused(["reclassify", str(SAMPLE), "--mask", str(tmp_path / "labels.nrrd"), "--id", "7", *FAST, *out], capsys,
             tmp_path, InputError, "holds 2 labels")
    rc, _, err = _run(["reclassify", str(SAMPLE), "--mask", str(tmp_path / "labels.nrrd"), *FAST, *out], capsys)
    assert rc == 0, err
    assert assert_same_ids(tmp_path / "o") == {2, 5}
    vols = {n["id"]: n["volume_mm3"] for n in json.loads((tmp_path / "o" / "nodules.json").read_text())["nodules"]}
    assert all(200 < v < 330 for v in vols.values()), vols  # each a 4 mm sphere (268 mm3), not their sum


# ---------------------------------------------------------------- 3. one nodule, one answer


@pytest.mark.slow
def test_clicks_on_one_nodule_give_one_nodule(tmp_path, capsys):
    x, y, z = NODULE3_RAS
    out = tmp_path / "o"
    rc, _, err = _run(["analyze", str(SAMPLE), *PT, "--point", str(x + 0.5), str(y), str(z), *FAST,
                       "--no-pictures", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "merged" in err and "Traceback" not in err
    js = json.loads((out / "nodules.json").read_text())
    assert [n["id"] for n in js["nodules"]] == [1]
    assert "also clicked as nodule 2" in js["nodules"][0]["message"]
    assert js["nodules"][0]["brock"]["inputs"]["nodule_count"] == 1
    assert assert_same_ids(out) == {1}


# ---------------------------------------------------------------- 4. strict points CSV


def test_points_csv_rows_must_match_the_header(tmp_path, capsys, monkeypatch):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{SAMPLE}\n")
    out = ["--out", str(tmp_path / "b"), *FAST]
    for text, frags in (("case,x,y,z\na,-72,5,-77,2,-190,4\n", ("line 2", "7 fields, the header has 4", "decimal commas")),
                        ("case,x,y,z\r\nLIDC-IDRI-0003_crop,1,2,3\r\nb,1,2\r\n", ("line 3", "3 fields")),
                        ("case;x;y;z\na;-72,5;-77,2;-190,4\n", ("lacks column", "separated by ';'"))):
        pts = tmp_path / "p.csv"
        pts.write_text(text)
        _refused(["batch", str(lst), "--points", str(pts), *out], capsys, tmp_path, BatchError, *frags)
    # a case without a row: the message says that the whole scan was searched instead
    from NoduleMTLLib.service import analysis

    def no_lung(*a, **k):
        raise NoLungError("No plausible lung in this CT")

    monkeypatch.setattr(analysis, "analyze", no_lung)
    monkeypatch.setattr(analysis, "detector_status", lambda: (True, ""))
    pts.write_text("case,x,y,z\nsomeone_else,1,2,3\n")
    rc, _, err = _run(["batch", str(lst), "--points", str(pts), *out], capsys)
    assert rc == 1 and "no row for this case in the points file" in err


# ---------------------------------------------------------------- 5. thick slices


def _resampled(ct: sitk.Image, dz: float) -> sitk.Image:
    sp = list(ct.GetSpacing())
    size = list(ct.GetSize())
    size[2] = int(size[2] * sp[2] / dz)
    return sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), [sp[0], sp[1], dz],
                         ct.GetDirection(), -1024.0, ct.GetPixelID())


@pytest.mark.slow
def test_thick_slices_note_and_no_category_for_small_nodules(tmp_path, capsys):
    thick = tmp_path / "ct_5mm.nrrd"
    sitk.WriteImage(_resampled(sitk.ReadImage(str(SAMPLE)), 5.0), str(thick), True)
    out = tmp_path / "o"
    rc, _, err = _run(["analyze", str(thick), *PT, *FAST, "--out", str(out)], capsys)
    assert rc == 0, err
    (n,) = json.loads((out / "nodules.json").read_text())["nodules"]
    assert n["found"] and n["diameter_mm"] < 15.0
    assert "slices 5.0 mm thick" in n["message"] and "not categorised" in n["message"]
    assert n["lung_rads"]["category"] is None and n["lung_rads"]["rule"].startswith("not categorised")
    with open(out / "nodules.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert "slices 5.0 mm thick" in row["message"] and row["lung_rads.category"] == ""
    assert "not categorised" in (out / "report.html").read_text()
    assert_same_ids(out)


def test_slices_over_2_5_mm_get_a_note_but_keep_a_large_nodules_category():
    ct = sitk.ReadImage(str(SAMPLE))
    from NoduleMTLLib.core.io import CTVolume
    for dz, size, category in ((3.0, 9.0, "4A"), (5.0, 16.0, "4B"), (5.0, 9.0, None), (2.5, 9.0, "4A")):
        vol = CTVolume(_resampled(ct, dz))
        n = NoduleResult(id=1, point_lps_mm=(0.0, 0.0, 0.0), found=True, diameter_mm=size,
                         lung_rads={"category": "4A" if size < 15 else "4B", "rule": "x", "notes": [], "suggestions": []})
        res = AnalysisResult(input={}, run={}, nodules=[n])
        assert thick_slices.annotate_result(res, vol) == pytest.approx(dz)
        assert n.lung_rads["category"] == category
        assert ("mm thick" in n.message) == (dz > 2.5)


# ---------------------------------------------------------------- 6. configuration files


def _weights_dir(tmp_path: Path, name: str, manifest_text: str | None) -> Path:
    d = tmp_path / name
    d.mkdir()
    os.symlink(REPO / "Resources" / "Weights" / "lnmsnet.safetensors", d / "lnmsnet.safetensors")
    if manifest_text is not None:
        (d / "models.json").write_text(manifest_text)
    return d


def test_bad_models_json_and_unlisted_weights_are_refused(tmp_path, capsys, monkeypatch):
    shipped = (REPO / "Resources" / "Weights" / "models.json").read_text()
    out = ["--out", str(tmp_path / "o")]
    bad = {"truncated": (shipped[: len(shipped) // 2], "models.json is not a valid models.json"),
           "nan": (shipped.replace('"version": "0.1.0"', '"version": NaN', 1), "NaN"),
           "noschema": ('{"format": 1, "networks": {"lnmsnet": {"file": "x"}}}', "size_bytes"),
           "badsha": (shipped.replace('"sha256": "', '"sha256": "zz', 1), "sha256"),
           "unlisted": ('{"format": 1, "networks": {}}', "not listed")}
    for name, (text, frag) in bad.items():
        d = _weights_dir(tmp_path, name, text)
        with pytest.raises(WeightsError, match=frag) as e:
            registry.verify_weights("lnmsnet", d / "lnmsnet.safetensors")
        assert str(d / "models.json") in str(e.value) and "\n" not in str(e.value)
    for name in ("truncated", "unlisted"):  # through the command line: one line, nothing written
        monkeypatch.setenv("NODULEMTL_WEIGHTS_DIR", str(tmp_path / name))
        _refused(["analyze", str(SAMPLE), *PT, *FAST, *out], capsys, tmp_path, WeightsError, str(tmp_path / name),
                 bad[name][1])


def _calibration_dir(tmp_path: Path, name: str, text: str, record: bool = True) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "calibration.json").write_text(text)
    if record:  # models.json vouches for this exact file: what is tested is the schema check
        _record_unchecked(d)
    return d


def _record_unchecked(d: Path) -> None:
    p = d / "calibration.json"
    registry.write_manifest(d / "models.json", {"format": 1, "networks": {}, "calibration": {
        "file": p.name, "size_bytes": p.stat().st_size, "sha256": registry.sha256_of(p)}})


def test_bad_calibration_files_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    shipped = (REPO / "Resources" / "Weights" / "calibration.json").read_text()
    js = json.loads(shipped)
    cases = {"invalid": shipped[:-40],
             "nan_temperature": shipped.replace('"method": "platt"', '"method": "temperature", "temperature": NaN', 1),
             "nan_platt": shipped.replace('"a": ', '"a": NaN, "a_was": ', 1),
             "inf": shipped.replace('"b": ', '"b": 1e999, "b_was": ', 1),
             "schema": json.dumps({**js, "models": {"m": {"networks": ["lnmsnet"]}}})}
    for name, text in cases.items():
        d = _calibration_dir(tmp_path, name, text)
        monkeypatch.setenv("NODULEMTL_WEIGHTS_DIR", str(d))
        with pytest.raises(CalibrationError, match=str(d)) as e:
            calibration.load_calibration()
        assert "\n" not in str(e.value)
        with pytest.raises(CalibrationError):
            calibration.apply_to_result(AnalysisResult(input={}, run={"networks": ["dsmtnet"]}, nodules=[]))
    # a good file that is not the one recorded (edited, or recorded nowhere) is refused too
    d = _calibration_dir(tmp_path, "edited", shipped)
    (d / "calibration.json").write_text(shipped.replace("0.", "0.0", 1))
    monkeypatch.setenv("NODULEMTL_WEIGHTS_DIR", str(d))
    with pytest.raises(CalibrationError, match="sha256"):
        calibration.load_calibration()
    (d / "models.json").unlink()  # then the shipped manifest is asked: it records another file
    with pytest.raises(CalibrationError, match="sha256"):
        calibration.load_calibration()
    monkeypatch.delenv("NODULEMTL_WEIGHTS_DIR")
    assert calibration.load_calibration() is not None  # the shipped file passes its recorded checksum


@pytest.mark.slow
def test_a_nan_platt_coefficient_stops_the_cli_before_anything_is_written(tmp_path, capsys, monkeypatch):
    shipped = (REPO / "Resources" / "Weights" / "calibration.json").read_text()
    d = _calibration_dir(tmp_path, "w", shipped.replace('"a": ', '"a": NaN, "a_was": ', 1))
    monkeypatch.setenv("NODULEMTL_WEIGHTS_DIR", str(d))
    _refused(["analyze", str(SAMPLE), *PT, *FAST, "--out", str(tmp_path / "o")], capsys, tmp_path, CalibrationError,
             str(d / "calibration.json"), "NaN")


# ---------------------------------------------------------------- 7-9. disk full, mount points, never half-visible


_DRIVER = textwrap.dedent('''
    import contextlib, hashlib, io, json, os, subprocess, sys
    from pathlib import Path
    root, sample, pt = Path(sys.argv[1]), sys.argv[2], sys.argv[3:6]
    from NoduleMTLLib.apps import cli
    from NoduleMTLLib.inference import pipeline
    from NoduleMTLLib.core.results import AnalysisResult, NoduleResult
    from NoduleMTLLib.core.safe_output import visible_entries

    def fake(ct, points_lps, network_ids=("lnmsnet",), **kw):
        return AnalysisResult(input=ct.describe(), run={"networks": list(network_ids), "device": "cpu"},
                              nodules=[NoduleResult(id=1, point_lps_mm=tuple(points_lps[0]), found=False, message="x")])

    pipeline.analyze_points = fake

    def run(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(["analyze", sample, "--point", *pt, "--networks", "lnmsnet", "--device", "cpu",
                               "--quiet", *args])
            except SystemExit as e:
                rc = e.code
        return {"rc": rc, "err": err.getvalue()}

    def snap(d):
        out = {}
        for dp, dirs, files in os.walk(d):
            for n in files + [x for x in dirs if os.path.islink(os.path.join(dp, x))]:
                p = os.path.join(dp, n)
                out[os.path.relpath(p, d)] = ("link:" + os.readlink(p)) if os.path.islink(p) else \\
                    hashlib.sha256(open(p, "rb").read()).hexdigest()
        return out

    rep = {}
    # a bind mount as --out (Docker -v host:/out): fresh, then replaced
    (root / "target").mkdir(); (root / "bound").mkdir()
    subprocess.run(["mount", "--bind", str(root / "target"), str(root / "bound")], check=True)
    rep["bind_first"] = run("--out", str(root / "bound"))
    rep["bind_again"] = run("--out", str(root / "bound"), "--overwrite")
    rep["bind_entries"] = visible_entries(root / "target")
    # a small file system as --out, then full
    mnt = root / "mnt"; mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    rep["tmpfs_first"] = run("--out", str(mnt))
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"x" * 65536); f.flush()
        except OSError:
            pass
    before = snap(mnt)
    rep["full_overwrite"] = run("--out", str(mnt), "--overwrite")
    rep["full_overwrite_same"] = snap(mnt) == before
    rep["full_fresh"] = run("--out", str(mnt / "fresh"))
    rep["full_fresh_same"] = snap(mnt) == before
    rep["root_entries"] = sorted(os.listdir(root))
    print(json.dumps(rep))
''')


def _can_mount() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount in a user namespace here: {r.stderr.strip()[:120]}"


@pytest.mark.slow
def test_mount_points_and_a_full_disk(tmp_path):
    why = _can_mount()
    if why:
        pytest.skip(why)
    (tmp_path / "driver.py").write_text(_DRIVER)
    r = subprocess.run(["unshare", "-rm", sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(SAMPLE),
                        *(str(v) for v in NODULE3_RAS)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("bind_first", "bind_again", "tmpfs_first"):
        assert rep[k]["rc"] == 0, (k, rep[k]["err"])
    assert set(OUTPUT_FILES) <= set(rep["bind_entries"])
    for k, where in (("full_overwrite", tmp_path / "mnt"), ("full_fresh", tmp_path / "mnt" / "fresh")):
        assert rep[k]["rc"] == OutputError.exit_code, rep[k]
        line = _one_line(rep[k]["err"], str(where))
        assert "No space left on device" in line and ".nodulemtl-" not in line
    assert rep["full_overwrite_same"] and rep["full_fresh_same"]  # previous set byte-identical, no lock file left
    assert rep["root_entries"] == ["bound", "driver.py", "mnt", "target"]


def _publish(out: Path, tag: str, names) -> None:
    with safe_output.OutputSet(out, overwrite=True) as s:
        st = s.staging_dir()
        for n in names:
            (st / n).write_text(tag + n)
        s.commit()


def _generation(out: Path) -> tuple[str, set[str]]:
    """(tag of the published set, published names); every published file must carry the same tag."""
    names = {n for n in safe_output.MANAGED_FILES if os.path.exists(out / n)}
    tags = {(out / n).read_text()[: -len(n)] for n in names}
    assert set(OUTPUT_FILES) <= names and len(tags) == 1, (names, tags, os.listdir(out))
    return tags.pop(), names


def test_a_kill_at_any_moment_leaves_the_previous_or_the_new_set(tmp_path):
    """A child process replaces a result set and is killed (os._exit) after its k-th file-system
    step, for every k; the parent then reads the folder as a reader would, and again after the
    next run's repair (clean_stale)."""
    old_names = OUTPUT_FILES + ("report.html",)
    new_names = OUTPUT_FILES + ("segmentation.dcm",)
    out = tmp_path / "o"
    steps = ("replace", "symlink", "remove", "rename", "rmdir", "unlink", "mkdir")

    def child(kill_at: int) -> int:
        count = [0]
        for name in steps:
            real = getattr(os, name)

            def wrapped(*a, _real=real, **k):
                count[0] += 1
                if count[0] == kill_at:
                    os._exit(99)
                return _real(*a, **k)
            setattr(os, name, wrapped)
        _publish(out, "new ", new_names)
        os._exit(min(count[0], 98))

    def fork(kill_at: int) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                child(kill_at)
            finally:
                os._exit(97)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    _publish(out, "old ", old_names)
    n_steps = fork(10 ** 6)
    assert 5 < n_steps < 98
    seen = set()
    for k in range(1, n_steps + 1):
        shutil.rmtree(out)
        _publish(out, "old ", old_names)
        assert fork(k) == 99
        tag, names = _generation(out)  # what a reader sees right after the kill
        seen.add(tag)
        assert names <= set(old_names if tag == "old " else new_names)
        with safe_output.FolderLock(out):
            safe_output.clean_stale(out)  # what the next run does first
        tag, names = _generation(out)
        assert names == set(old_names if tag == "old " else new_names)
        assert safe_output.visible_entries(out) == sorted(names)
        assert sorted(os.listdir(out)) == sorted([*names, safe_output.CURRENT_LINK, safe_output.current_set(out).name])
    assert seen == {"old ", "new "}


# ---------------------------------------------------------------- 10. Ctrl-C


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, shared_data):
    # A whole-scan search, so that work surely remains when the interrupt arrives (a click on an
    # idle machine can finish between its first progress line and the signal).
    out = tmp_path / "o"
    ct = shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003" / "ct.nrrd"
    p = subprocess.Popen([sys.executable, "-m", "NoduleMTLLib.apps.cli", "analyze", str(ct), "--detect", "--networks", "none",
                          "--device", "cpu", "--progress-format", "lines", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         # a terminal's default: a suite started as a background job (`cmd &`) inherits SIGINT ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if "<filter-progress>" in line:
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["nodulemtl: interrupted"], err
    assert sorted(os.listdir(tmp_path)) == []  # no output folder, no lock file, no staging folder
