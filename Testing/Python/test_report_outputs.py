"""The radiologist's report outputs (issue 15): ``nodulemtl analyze --dicom-sr`` on the REAL
Lung-PET-CT-Dx A0002 DICOM series with a click in the biopsy-proven adenocarcinoma (SR read
back with highdicom as TID 1500, dciodvfy, pictures, report.html checked in headless
Chromium, Lung-RADS 4B), the sample crop (NRRD: refused with --dicom-sr; Brock incomplete
without age / sex; --no-pictures), and a batch run carrying the new fields.

dciodvfy (Debian package ``dicom3tools``) and Chromium (``chromium``) are optional: those
tests skip with the reason when the program is absent.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

hd = pytest.importorskip("highdicom")
from pydicom.sr.codedict import codes  # noqa: E402

from NoduleMTLLib.apps import cli  # noqa: E402
from NoduleMTLLib.core.errors import InputError  # noqa: E402
from NoduleMTLLib.outputs.report_html import DISCLAIMER  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
NODULE2_RAS = (-72.5, -77.2, -190.4)
NODULE3_RAS = (-23.5, 47.6, -172.3)
SERIES = "lung_pet_ct_dx_A0002_dicom"


def _tumour_ras(shared_data):
    """Centre of A0002's reference box on its middle boxed slice, RAS mm."""
    with open(shared_data / "whole_ct" / "lung_pet_ct_dx_boxes.csv", newline="") as f:
        rows = sorted((r for r in csv.DictReader(f) if r["volume"] == SERIES), key=lambda r: int(r["slice_index_k"]))
    m = rows[len(rows) // 2]
    x = (float(m["lps_min_x"]) + float(m["lps_max_x"])) / 2
    y = (float(m["lps_min_y"]) + float(m["lps_max_y"])) / 2
    return (-x, -y, float(m["lps_z"]))


@pytest.fixture(scope="module")
def a0002(shared_data, tmp_path_factory):
    folder = shared_data / "whole_ct" / SERIES
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    out = tmp_path_factory.mktemp("a0002") / "out"
    # LNMSNet pinned (the default became DSMT-Net, issue 13): these checks are about the report
    # files; DSMT-Net's spiculation head would turn Brock's assumed spiculation into an input
    old = os.umask(0o022)  # the file modes are checked under the usual umask
    try:
        rc = cli.main(["analyze", str(folder), "--point", *map(str, _tumour_ras(shared_data)), "--dicom-sr",
                       "--networks", "lnmsnet", "--device", "cpu", "--quiet", "--out", str(out)])
    finally:
        os.umask(old)
    assert rc == 0
    return {"out": out, "folder": folder, "json": json.loads((out / "nodules.json").read_text())}


@pytest.mark.slow
def test_a0002_writes_every_report_output_and_is_4b(a0002):
    out, d = a0002["out"], a0002["json"]
    for name in ("report.sr.dcm", "segmentation.dcm", "report.html", "pictures/nodule_1.png", "nodules.json", "nodules.csv"):
        assert (out / name).is_file(), name
    n = d["nodules"][0]
    assert n["found"] and n["type"] == "solid"
    lr = n["lung_rads"]
    assert lr["category"] == "4B" and lr["size_mm"] >= 15 and lr["rule"].startswith("4B: solid")
    assert lr["size_mm"] == pytest.approx((n["diameter_mm"] + n["short_axis_mm"]) / 2, abs=0.11)
    assert d["run"]["lung_rads"]["category"] == "4B" and d["run"]["lung_rads"]["nodule_ids"] == [1]
    # Brock: age and sex from the DICOM header (53-year-old woman), probability computed, assumptions listed
    b = n["brock"]
    assert b["inputs"]["age"] == 53 and b["inputs"]["female"] is True and b["sources"]["age"] == "dicom"
    assert 0 < b["probability"] < 1 and b["missing"] == []
    assert {"family_history", "emphysema", "spiculation"} <= set(b["assumed"]) and b["lower_bound"] is True
    row = next(csv.DictReader(open(out / "nodules.csv")))
    assert row["lung_rads.category"] == "4B" and float(row["brock.probability"]) == b["probability"]
    png = (out / "pictures" / "nodule_1.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # one probability everywhere: the DICOM SEG's colour is the reported probability's (not the raw output's)
    from NoduleMTLLib.outputs.colors import probability_color
    p = n["malignancy_probability"]
    assert p is not None and float(row["malignancy_probability"]) == p
    lab = pydicom.dcmread(out / "segmentation.dcm").SegmentSequence[0].RecommendedDisplayCIELabValue
    rgb = np.asarray(hd.color.CIELabColor.from_dicom_value(lab).to_rgb()) / 255
    np.testing.assert_allclose(rgb, probability_color(p), atol=0.02)
    # the DICOM files are written into the staged folder as ordinary files: modes follow the umask
    # (written under umask 022 by the fixture; mkstemp's 0600 before)
    for name in ("segmentation.dcm", "report.sr.dcm", "report.html"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


@pytest.mark.slow
def test_a0002_sr_reads_back_as_tid1500(a0002):
    out, n = a0002["out"], a0002["json"]["nodules"][0]
    sr = hd.sr.srread(out / "report.sr.dcm")
    seg = pydicom.dcmread(out / "segmentation.dcm")
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    g = groups[0]
    s = seg.SegmentSequence[0]
    assert g.tracking_uid == s.TrackingUID and str(g.tracking_identifier) == s.TrackingID
    ref = g.referenced_segment
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and list(ref.referenced_segment_numbers) == [1]

    def value(name):
        ms = g.get_measurements(name=name)
        assert ms, name
        return [float(m.value) for m in ms]

    assert value(codes.SCT.LongAxis)[0] == pytest.approx(n["diameter_mm"], abs=0.01)
    assert value(codes.SCT.ShortAxis)[0] == pytest.approx(n["short_axis_mm"], abs=0.01)
    assert value(codes.SCT.Volume)[0] == pytest.approx(n["volume_mm3"], rel=1e-3)
    assert value(codes.DCM.AttenuationCoefficient)[0] == pytest.approx(n["mean_hu"], abs=0.01)
    probs = value(codes.DCM.ProbabilityOfCancer)
    # the reported (calibrated) probability first when there is one, then each network's, then Brock
    expected = ([n["malignancy_probability"]] if n.get("malignancy_probability") is not None else []) \
        + [n["networks"]["lnmsnet"]["malignancy_probability"], n["brock"]["probability"]]
    assert probs == pytest.approx(expected, abs=1e-4)
    ev = {str(e.name.meaning): str(e.value.meaning) for e in g.get_qualitative_evaluations()}
    assert ev["Lung-RADS v2022 assessment category"] == "Lung-RADS 4B"
    assert ev["Nodule composition (HU estimate)"] == "Solid nodule"
    # the evidence lists the SEG and the CT series
    ev_uids = {i.ReferencedSOPInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
               for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in ev_uids and len(ev_uids) == 1 + len(list(a0002["folder"].iterdir()))


@pytest.mark.slow
def test_a0002_sr_passes_dciodvfy(a0002):
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    r = subprocess.run([tool, str(a0002["out"] / "report.sr.dcm")], capture_output=True, text=True, timeout=60)
    text = r.stdout + r.stderr
    assert "Comprehensive3DSR" in text
    errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
    assert errors == [], errors


@pytest.mark.slow
def test_report_html_is_self_contained_and_renders(a0002):
    page = (a0002["out"] / "report.html").read_text()
    assert DISCLAIMER in page and "4B" in page and page.count("data:image/png;base64,") == 1
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "external reference in report.html"
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian package chromium)")
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        (a0002["out"] / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert DISCLAIMER in dom and "Lung-RADS" in dom and "<img" in dom


# ---------------------------------------------------------------- sample crop (NRRD)


def test_dicom_sr_refused_for_nrrd(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["analyze", str(SAMPLE), "--point", *map(str, NODULE2_RAS), "--dicom-sr", "--quiet", "--device", "cpu",
                   "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == InputError.exit_code and len(err) == 1
    assert err[0].startswith("nodulemtl: error: --dicom-sr needs a DICOM series folder")
    assert not out.exists()


@pytest.mark.slow
def test_sample_without_age_sex_is_incomplete_and_options_complete_it(tmp_path):
    out = tmp_path / "o"
    pts = ["--point", *map(str, NODULE2_RAS), "--point", *map(str, NODULE3_RAS)]
    assert cli.main(["analyze", str(SAMPLE), *pts, "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    d = json.loads((out / "nodules.json").read_text())
    for n in d["nodules"]:
        assert n["found"] and n["lung_rads"]["category"] in ("2", "3", "4A", "4B")
        assert n["brock"]["probability"] is None and set(n["brock"]["missing"]) == {"age", "sex"}
        assert (out / "pictures" / f"nodule_{n['id']}.png").is_file()
    assert d["run"]["lung_rads"]["category"] == max((n["lung_rads"]["category"] for n in d["nodules"]),
                                                    key=["1", "2", "3", "4A", "4B"].index)
    row = next(csv.DictReader(open(out / "nodules.csv")))
    assert row["brock.probability"] == "" and row["brock.missing"] == "age sex"
    page = (out / "report.html").read_text()
    assert "incomplete" in page and page.count("data:image/png;base64,") == 2
    # the same with age, sex, family history and no pictures
    out2 = tmp_path / "o2"
    assert cli.main(["analyze", str(SAMPLE), *pts, "--quiet", "--device", "cpu", "--out", str(out2), "--no-pictures",
                     "--age", "70", "--sex", "M", "--family-history", "yes", "--emphysema", "no"]) == 0
    d2 = json.loads((out2 / "nodules.json").read_text())
    b = d2["nodules"][0]["brock"]
    assert 0 < b["probability"] < 1 and b["inputs"]["age"] == 70 and b["inputs"]["family_history"] is True
    assert "family_history" not in b["assumed"] and "emphysema" not in b["assumed"] and b["sources"]["age"] == "option"
    assert not (out2 / "pictures").exists() and "data:image/png" not in (out2 / "report.html").read_text()


def test_bad_report_options_are_usage_errors(tmp_path, capsys):
    for opt in (["--age", "old"], ["--sex", "X"], ["--emphysema", "maybe"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["analyze", str(SAMPLE), "--point", "0", "0", "0", "--out", str(tmp_path / "x"), *opt])
        assert e.value.code == 2


@pytest.mark.slow
def test_found_nodules_of_a_search_get_the_fields_and_a_count_note():
    """Whole-scan candidates: same records, and the nodule count's source says it counts candidates."""
    import SimpleITK as sitk

    from NoduleMTLLib.clinical.brock import PatientInfo
    from NoduleMTLLib.core.io import CTVolume
    from NoduleMTLLib.core.postprocess import measure_nodule
    from NoduleMTLLib.core.results import AnalysisResult, NoduleResult
    from NoduleMTLLib.outputs.files import csv_rows
    from NoduleMTLLib.service.assessment import annotate_result

    hu = np.full((30, 60, 60), -850, np.int16)
    z, y, x = np.ogrid[:30, :60, :60]
    ball = (z - 15) ** 2 + (y - 30) ** 2 + (x - 30) ** 2 <= 36
    hu[ball] = 30
    img = sitk.GetImageFromArray(hu)
    ct = CTVolume(img)
    m = measure_nodule(ball, ct)
    nd = NoduleResult(id=1, point_lps_mm=(30, 30, 15), found=True, mask=ball,
                      detection={"score": 0.9, "box_ijk": [24, 24, 9, 37, 37, 22]},
                      **{k: m[k] for k in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu", "solid_fraction",
                                           "type", "centroid_lps_mm")})
    res = AnalysisResult({"path": ""}, {"networks": []}, [nd, NoduleResult(id=2, point_lps_mm=(0, 0, 0), found=False)])
    annotate_result(res, ct, PatientInfo(age=65, sex="F", sources={"age": "option", "sex": "option"}))
    assert nd.lung_rads["category"] == "4A" and res.nodules[1].lung_rads is None
    assert "candidates" in nd.brock["sources"]["nodule_count"] and nd.brock["inputs"]["nodule_count"] == 1
    head, rows = csv_rows(res)
    assert "lung_rads.category" in head and "detection.score" in head
    assert rows[0]["lung_rads.category"] == "4A" and rows[1]["lung_rads.category"] == ""
    assert res.to_dict()["nodules"][1]["brock"] is None


@pytest.mark.slow
def test_batch_writes_report_files_and_fields(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE, src / "sample.nrrd")
    pts = tmp_path / "points.csv"
    pts.write_text("case,x,y,z\n" + "".join(f"sample,{x},{y},{z}\n" for x, y, z in (NODULE2_RAS, NODULE3_RAS)))
    out = tmp_path / "out"
    # --dicom-sr applies to DICOM cases only: the NRRD case is ok, without SEG / SR
    assert cli.main(["batch", str(src), "--points", str(pts), "--out", str(out), "--device", "cpu", "--quiet",
                     "--dicom-sr", "--age", "66", "--sex", "F"]) == 0
    case = out / "sample"
    assert (case / "report.html").is_file() and not (case / "report.sr.dcm").exists()
    d = json.loads((case / "nodules.json").read_text())
    assert d["run"]["lung_rads"]["category"] in ("2", "3", "4A", "4B")
    for n in d["nodules"]:
        assert n["lung_rads"]["category"] and n["brock"]["inputs"]["age"] == 66
        assert (case / "pictures" / f"nodule_{n['id']}.png").is_file()
    head = next(csv.reader(open(case / "nodules.csv")))
    assert {"lung_rads.category", "brock.probability"} <= set(head)
