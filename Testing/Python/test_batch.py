"""``nodulemtl batch`` over real CTs (sample crop, a Lung-PET-CT-Dx DICOM series, a corrupt
file, a list with a missing file), and the Slicer scripted CLI module NoduleMTLCLI (its XML
against its argument parser, and one run on the sample CT with a .mrk.json points file)."""

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib import DEFAULT_NETWORKS
from NoduleMTLLib.apps import batch, cli
from NoduleMTLLib.apps.reporting import REPORT_FILES
from NoduleMTLLib.core.errors import BatchError
from NoduleMTLLib.core.safe_output import visible_entries
from NoduleMTLLib.outputs.files import OUTPUT_FILES

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
CLI_DIR = REPO / "NoduleMTL" / "NoduleMTLCLI"
CLI_PY, CLI_XML = CLI_DIR / "NoduleMTLCLI.py", CLI_DIR / "NoduleMTLCLI.xml"
# Reference nodules of the sample crop (see test_cli.py), RAS mm
NODULE2_RAS = (-72.5, -77.2, -190.4)
NODULE3_RAS = (-23.5, 47.6, -172.3)


def _summary(out: Path) -> dict[str, dict]:
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert list(rows[0]) == list(batch.SUMMARY_COLUMNS)
    return {r["case"]: r for r in rows}


def _mtimes(folder: Path) -> dict[str, int]:
    return {n: (folder / n).stat().st_mtime_ns for n in visible_entries(folder)}


# ---------------------------------------------------------------- folder input


@pytest.fixture(scope="module")
def folder_batch(shared_data, tmp_path_factory):
    """in/a/ct.nrrd, in/b/ct.nrrd (the sample twice, same file name), in/A0002/ (DICOM series),
    in/broken.nrrd (truncated copy of the sample); points CSV for all four; first run."""
    root = tmp_path_factory.mktemp("batch")
    src = root / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
    os.symlink(SAMPLE, src / "a" / "ct.nrrd")
    shutil.copy(SAMPLE, src / "b" / "ct.nrrd")
    dicom = shared_data / "whole_ct" / "lung_pet_ct_dx_A0002_dicom"
    os.symlink(dicom, src / "A0002", target_is_directory=True)
    data = SAMPLE.read_bytes()
    (src / "broken.nrrd").write_bytes(data[: len(data) // 2])
    # tumour of A0002: centre of its reference box on the middle boxed slice, LPS
    boxes = {int(r["slice_index_k"]): tuple(int(r[c]) for c in ("xmin_i", "ymin_j", "xmax_i", "ymax_j"))
             for r in csv.DictReader(open(shared_data / "whole_ct" / "lung_pet_ct_dx_boxes.csv"))
             if r["volume"] == "lung_pet_ct_dx_A0002_dicom"}
    k = sorted(boxes)[len(boxes) // 2]
    x0, y0, x1, y1 = boxes[k]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom)))
    reader.MetaDataDictionaryArrayUpdateOff()
    img = reader.Execute()
    tumour_lps = img.TransformContinuousIndexToPhysicalPoint(((x0 + x1) / 2, (y0 + y1) / 2, k))
    pts = root / "points.csv"
    pts.write_text("case,x,y,z,frame\n"
                   f"a_ct,{NODULE3_RAS[0]},{NODULE3_RAS[1]},{NODULE3_RAS[2]},RAS\n"
                   f"b_ct,{NODULE2_RAS[0]},{NODULE2_RAS[1]},{NODULE2_RAS[2]},\n"
                   f"b_ct,{NODULE3_RAS[0]},{NODULE3_RAS[1]},{NODULE3_RAS[2]},\n"
                   f"A0002,{tumour_lps[0]},{tumour_lps[1]},{tumour_lps[2]},LPS\n"
                   "broken,0,0,0,\n")
    out = root / "out"
    args = ["batch", str(src), "--out", str(out), "--points", str(pts), "--device", "cpu", "--quiet"]
    rc = cli.main(args)
    return rc, out, args


@pytest.mark.slow
def test_folder_batch_first_run(folder_batch):
    rc, out, _ = folder_batch
    assert rc == 1  # one case failed
    s = _summary(out)
    assert set(s) == {"a_ct", "b_ct", "A0002", "broken"}
    assert {k: r["status"] for k, r in s.items()} == {"a_ct": "ok", "b_ct": "ok", "A0002": "ok", "broken": "failed"}
    assert (s["a_ct"]["n_nodules"], s["a_ct"]["n_found"]) == ("1", "1")
    assert (s["b_ct"]["n_nodules"], s["b_ct"]["n_found"]) == ("2", "2")
    assert (s["A0002"]["n_nodules"], s["A0002"]["n_found"]) == ("1", "1")
    assert s["broken"]["message"].startswith("Cannot read") and "\n" not in s["broken"]["message"]
    assert s["a_ct"]["input"].endswith(os.path.join("a", "ct.nrrd"))
    for case in ("a_ct", "b_ct", "A0002"):
        assert visible_entries(out / case) == sorted(OUTPUT_FILES + REPORT_FILES)
    assert not (out / "broken").exists()
    assert visible_entries(out) == ["A0002", "a_ct", "b_ct", "summary.csv"]  # no temp files
    # the DICOM case: label map on the series' grid, a large mass
    js = json.loads((out / "A0002" / "nodules.json").read_text())
    assert js["input"]["size_ijk"][2] == 30 and js["nodules"][0]["diameter_mm"] > 20
    # the same CT under two names gives the same mask for the same nodule
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_ct" / "labels.nrrd")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "b_ct" / "labels.nrrd")))
    np.testing.assert_array_equal(a == 1, b == 2)


@pytest.mark.slow
def test_folder_batch_second_run_skips_done_cases(folder_batch, capsys):
    _, out, args = folder_batch
    before = {c: _mtimes(out / c) for c in ("a_ct", "b_ct", "A0002")}
    rc = cli.main(args)
    assert rc == 1  # the broken file still fails
    s = _summary(out)
    assert {k: r["status"] for k, r in s.items()} == {"a_ct": "done-before", "b_ct": "done-before",
                                                       "A0002": "done-before", "broken": "failed"}
    assert (s["b_ct"]["n_nodules"], s["b_ct"]["n_found"]) == ("2", "2")  # read back from nodules.json
    assert {c: _mtimes(out / c) for c in before} == before
    assert "broken: failed" in capsys.readouterr().err


# ---------------------------------------------------------------- list input


@pytest.mark.slow
def test_list_batch_missing_file_outside_point_no_points_and_overwrite(tmp_path, capsys, monkeypatch):
    _weights_missing(monkeypatch)  # a site without the whole-scan detector: a case without points is skipped
    d = tmp_path / "cts"
    d.mkdir()
    os.symlink(SAMPLE, d / "first.nrrd")
    os.symlink(SAMPLE, d / "far.nrrd")
    os.symlink(SAMPLE, d / "nopoints.nrrd")
    lst = tmp_path / "cases.txt"
    lst.write_text("# cases\ncts/first.nrrd\n\ncts/missing.nrrd\ncts/far.nrrd\ncts/nopoints.nrrd\n")
    pts = tmp_path / "p.csv"
    lps3 = (-NODULE3_RAS[0], -NODULE3_RAS[1], NODULE3_RAS[2])
    pts.write_text("case,x,y,z,lps\n"
                   f"cts/first.nrrd,{lps3[0]},{lps3[1]},{lps3[2]},1\n"  # keyed by the listed path, LPS
                   "missing,0,0,0,0\n"
                   "far,0,0,500,0\n"
                   "nobody,1,2,3,0\n")
    out = tmp_path / "out"
    args = ["batch", str(lst), "--out", str(out), "--points", str(pts), "--device", "cpu", "--quiet"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "nobody" in err  # points for an unknown case are reported
    s = _summary(out)
    assert [r["case"] for r in s.values()] == ["first", "missing", "far", "nopoints"]  # list order
    assert s["first"]["status"] == "ok" and s["first"]["input"] == "cts/first.nrrd"
    assert s["missing"]["status"] == "failed" and "not found" in s["missing"]["message"]
    assert s["far"]["status"] == "failed" and "outside the CT volume" in s["far"]["message"]
    assert s["nopoints"]["status"] == "skipped" and "no points" in s["nopoints"]["message"]
    js = json.loads((out / "first" / "nodules.json").read_text())
    assert js["nodules"][0]["point_ras_mm"] == pytest.approx(list(NODULE3_RAS), abs=1e-3)
    before = _mtimes(out / "first")
    assert cli.main(args + ["--overwrite"]) == 1
    assert _summary(out)["first"]["status"] == "ok"
    after = _mtimes(out / "first")
    assert set(after) == set(before) and all(after[f] > before[f] for f in before)


@pytest.mark.slow
def test_all_good_exit_code_zero(tmp_path):
    lst = tmp_path / "one.txt"
    lst.write_text(f"{SAMPLE}\n")
    pts = tmp_path / "p.csv"
    pts.write_text(f"case,x,y,z\nLIDC-IDRI-0003_crop,{NODULE3_RAS[0]},{NODULE3_RAS[1]},{NODULE3_RAS[2]}\n")
    assert cli.main(["batch", str(lst), "--out", str(tmp_path / "o"), "--points", str(pts), "--device", "cpu", "--quiet"]) == 0
    assert _summary(tmp_path / "o")["LIDC-IDRI-0003_crop"]["status"] == "ok"


def test_batch_cannot_start(tmp_path, capsys):
    rc = cli.main(["batch", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == BatchError.exit_code and "Input not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    rc = cli.main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == BatchError.exit_code and "No CT files" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("case,x,y\nfoo,1,2\n")
    lst = tmp_path / "l.txt"
    lst.write_text(str(SAMPLE) + "\n")
    rc = cli.main(["batch", str(lst), "--out", str(tmp_path / "o"), "--points", str(bad), "--quiet"])
    assert rc == BatchError.exit_code and "lacks column(s) z" in capsys.readouterr().err
    rc = cli.main(["batch", str(lst), "--out", str(tmp_path / "o"), "--networks", "nonet", "--quiet"])
    assert rc == BatchError.exit_code and "nonet" in capsys.readouterr().err


def test_case_names_are_distinct():
    entries = [(s, Path(s)) for s in ("x/a/ct.nrrd", "y/b/ct.nii.gz", "z/a/ct.mha", "scan.nrrd", "d/scan_dicom")]
    names = [c.name for c in batch.name_cases(entries)]
    assert names == ["a_ct", "b_ct", "a_ct_2", "scan", "scan_dicom"]
    assert len(set(names)) == len(names)


def test_folder_scan_skips_annotations_and_hidden(tmp_path):
    for name in ("p1/ct.nrrd", "p1/nodules_labels.nrrd", "p1/ct.seg.nrrd", "p2/scan.nii.gz", "p2/scan_mask.nii.gz",
                 "p2/notes.txt", ".hidden/ct.nrrd", "vol.mha", "vol.raw"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    names = {c.name: c.path.relative_to(tmp_path).as_posix() for c in batch.find_cases(tmp_path)}
    assert names == {"ct": "p1/ct.nrrd", "scan": "p2/scan.nii.gz", "vol": "vol.mha"}


def test_points_csv_frames(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("case,x,y,z,frame\nc,1,2,3,RAS\nc,1,2,3,lps\nd,4,5,6,\n")
    assert batch.read_points_csv(p) == {"c": [(-1.0, -2.0, 3.0), (1.0, 2.0, 3.0)], "d": [(-4.0, -5.0, 6.0)]}
    assert batch.read_points_csv(p, lps=True)["d"] == [(4.0, 5.0, 6.0)]
    p.write_text("case,x,y,z,frame\nc,1,2,3,IJK\n")
    with pytest.raises(batch.BatchError, match="line 2"):
        batch.read_points_csv(p)


def _weights_missing(monkeypatch, network_id="maskrcnn25d"):
    """Make ``registry.find_weights`` report ``network_id``'s file as missing (as on a site without it)."""
    from NoduleMTLLib.models import registry

    real = registry.find_weights

    def find(nid):
        if nid == network_id:
            raise registry.WeightsError(f"Weights for {nid} not found (test)")
        return real(nid)
    monkeypatch.setattr(registry, "find_weights", find)


def test_whole_scan_detector_follows_installed_weights(monkeypatch):
    from NoduleMTLLib.models import registry
    from NoduleMTLLib.service.analysis import detector_status

    try:
        registry.find_weights("maskrcnn25d")
        shipped = True
    except registry.WeightsError:
        shipped = False
    assert detector_status()[0] is shipped
    _weights_missing(monkeypatch)
    assert detector_status()[0] is False


# ---------------------------------------------------------------- Slicer scripted CLI


@pytest.fixture(scope="module")
def cli_module():
    spec = importlib.util.spec_from_file_location("NoduleMTLCLI", CLI_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only; main() runs under __main__
    return mod


def _xml_parameters() -> list[dict]:
    root = ET.parse(CLI_XML).getroot()
    assert root.tag == "executable"
    params = []
    for group in root.findall("parameters"):
        for p in group:
            if p.tag in ("label", "description"):
                continue
            params.append({"tag": p.tag, "name": p.findtext("name"), "longflag": p.findtext("longflag"),
                           "index": p.findtext("index"), "default": p.findtext("default"),
                           "elements": [e.text for e in p.findall("element")], "channel": p.findtext("channel"),
                           "type": p.get("type"), "ext": p.get("fileExtensions")})
    return params


def test_cli_xml_and_parser_agree(cli_module):
    params = _xml_parameters()
    by_name = {p["name"]: p for p in params}
    assert set(by_name) == {"inputVolume", "points", "detect", "threshold", "networks", "device", "outputLabel",
                            "outputTable"}
    assert by_name["inputVolume"]["tag"] == "image" and by_name["inputVolume"]["channel"] == "input"
    assert by_name["outputLabel"]["tag"] == "image" and by_name["outputLabel"]["type"] == "label"
    assert by_name["outputLabel"]["channel"] == "output"
    assert by_name["outputTable"]["tag"] == "table" and by_name["outputTable"]["ext"] == ".csv"
    assert by_name["points"]["tag"] == "pointfile" and {".mrk.json", ".fcsv"} <= set(by_name["points"]["ext"].split(","))
    assert by_name["detect"]["tag"] == "boolean"
    assert by_name["device"]["tag"] == "string-enumeration"

    actions = {a.dest: a for a in cli_module.build_parser()._actions if a.dest != "help"}
    assert set(actions) == set(by_name)
    positional = sorted((p for p in params if p["index"] is not None), key=lambda p: int(p["index"]))
    assert [int(p["index"]) for p in positional] == list(range(len(positional)))
    assert [p["name"] for p in positional] == [a.dest for a in actions.values() if not a.option_strings]
    assert tuple(p["name"] for p in positional) == cli_module.POSITIONAL
    for p in params:
        a = actions[p["name"]]
        if p["index"] is None:
            assert a.option_strings == [p["longflag"]], p["name"]
        else:
            assert not a.option_strings and p["longflag"] is None, p["name"]
        if p["tag"] == "boolean":
            assert a.const is True and a.default is (p["default"] == "true"), p["name"]
        elif p["default"] is not None:
            assert a.default == p["default"], p["name"]
        if p["tag"] == "string-enumeration":
            assert list(a.choices) == p["elements"], p["name"]


def test_cli_files_and_cmake():
    text = CLI_PY.read_text()
    assert text.startswith("#!/usr/bin/env python-real\n")
    assert re.search(r'^if __name__ == "__main__":\n    sys\.exit\(main\(\)\)', text, flags=re.M)
    cm = re.sub(r"#.*", "", (CLI_DIR / "CMakeLists.txt").read_text())
    assert re.search(r"set\(\s*MODULE_NAME\s+NoduleMTLCLI\s*\)", cm)
    assert re.search(r"slicerMacroBuildScriptedCLI\(\s*NAME\s+\$\{MODULE_NAME\}\s*\)", cm, flags=re.I)
    top = re.sub(r"#.*", "", (REPO / "NoduleMTL" / "CMakeLists.txt").read_text())
    assert re.search(r"add_subdirectory\(\s*NoduleMTLCLI\s*\)", top)


def test_cli_finds_library_in_both_layouts(cli_module, tmp_path, monkeypatch):
    assert Path(cli_module.libraryRoot()) == REPO
    installed = tmp_path / "lib" / "Slicer-5.9"
    (installed / "qt-scripted-modules" / "NoduleMTLLib").mkdir(parents=True)
    (installed / "qt-scripted-modules" / "NoduleMTLLib" / "__init__.py").write_text("")
    (installed / "cli-modules").mkdir()
    monkeypatch.setattr(cli_module, "_CLI_DIR", str(installed / "cli-modules"))
    assert Path(cli_module.libraryRoot()) == installed / "qt-scripted-modules"


def _markups_json(points, system="LPS") -> dict:
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
                       "markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                         "controlPoints": [{"id": str(i + 1), "label": f"F-{i + 1}", "position": list(p),
                                            "positionStatus": "defined"} for i, p in enumerate(points)]
                         + [{"id": "x", "label": "unplaced", "position": [0, 0, 0], "positionStatus": "undefined"}]}]}


def test_cli_points_files(cli_module, tmp_path):
    j = tmp_path / "p.mrk.json"
    j.write_text(json.dumps(_markups_json([NODULE3_RAS], system="RAS")))
    assert cli_module.read_points_file(str(j)) == [(23.5, -47.6, -172.3)]  # RAS -> LPS, undefined point skipped
    f = tmp_path / "p.fcsv"
    f.write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                 "1,23.5,-47.6,-172.3,0,0,0,1,1,1,0,F-1,,\n")
    assert cli_module.read_points_file(str(f)) == [(23.5, -47.6, -172.3)]
    with pytest.raises(cli_module.PointsError, match="not found"):
        cli_module.read_points_file(str(tmp_path / "none.mrk.json"))


def test_cli_detect_and_no_points_are_errors(cli_module, tmp_path, capsys, monkeypatch):
    outs = [str(tmp_path / "l.nrrd"), str(tmp_path / "t.csv")]
    _weights_missing(monkeypatch)
    assert cli_module.main([str(SAMPLE), *outs, "--detect"]) == 1
    assert "not available yet" in capsys.readouterr().err
    assert cli_module.main([str(SAMPLE), *outs]) == 1
    assert "No points" in capsys.readouterr().err
    assert cli_module.main([str(SAMPLE), *outs, "--detect", "--threshold", "1.5"]) == 1
    assert "score threshold must be in [0, 1]" in capsys.readouterr().err
    assert not any(Path(o).exists() for o in outs)


@pytest.mark.slow
def test_cli_script_run_on_sample(tmp_path):
    pts = tmp_path / "nodules.mrk.json"
    lps = [(-p[0], -p[1], p[2]) for p in (NODULE2_RAS, NODULE3_RAS)]
    pts.write_text(json.dumps(_markups_json(lps)))
    lab, tab = tmp_path / "labels.nrrd", tmp_path / "nodules.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(CLI_PY), str(SAMPLE), str(lab), str(tab), "--points", str(pts),
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fractions = [float(v) for v in re.findall(r"^<filter-progress>([0-9.]+)</filter-progress>$", r.stdout, flags=re.M)]
    assert len(fractions) >= 3 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    img, ct = sitk.ReadImage(str(lab)), sitk.ReadImage(str(SAMPLE))
    assert img.GetSize() == ct.GetSize() and img.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin())
    arr = sitk.GetArrayFromImage(img)
    assert set(np.unique(arr)) == {0, 1, 2}
    rows = list(csv.DictReader(open(tab)))
    assert [r["id"] for r in rows] == ["1", "2"]
    assert all(r["found"] == "True" for r in rows)
    assert 20 < float(rows[0]["diameter_mm"]) < 45
    assert 0 <= float(rows[0][f"networks.{DEFAULT_NETWORKS[0]}.malignancy_probability"]) <= 1
    assert 0 <= float(rows[0]["malignancy_probability"]) <= 1  # the calibrated, reported probability
    vox = np.prod(ct.GetSpacing())
    assert float(rows[1]["volume_mm3"]) == pytest.approx((arr == 2).sum() * vox, rel=0.05)


@pytest.mark.slow
def test_batch_case_without_points_uses_the_detector(shared_data, tmp_path):
    """With the maskrcnn25d weights installed, a case without points is searched whole-scan
    (real Lung-PET-CT-Dx A0002 DICOM series, 30 slices): outputs written, detections recorded."""
    from NoduleMTLLib.models import registry

    try:
        registry.find_weights("maskrcnn25d")
    except registry.WeightsError:
        pytest.skip("maskrcnn25d weights not installed")
    lst = tmp_path / "cases.txt"
    lst.write_text(f"{shared_data / 'whole_ct' / 'lung_pet_ct_dx_A0002_dicom'}\n")
    out = tmp_path / "out"
    # --threshold 0.5, below the high-sensitivity setting (at the default operating point this
    # adenocarcinoma is missed; it is found at the high-sensitivity setting and at 0.5: fpr25d model card)
    assert cli.main(["batch", str(lst), "--out", str(out), "--device", "cpu", "--quiet", "--threshold", "0.5"]) == 0
    (row,) = _summary(out).values()
    assert row["status"] == "ok" and int(row["n_nodules"]) >= 1
    js = json.loads((out / row["case"] / "nodules.json").read_text())
    assert all(n["detection"]["score"] >= n["detection"]["score_threshold"] for n in js["nodules"])
    assert visible_entries(out / row["case"]) == sorted(OUTPUT_FILES + REPORT_FILES)
