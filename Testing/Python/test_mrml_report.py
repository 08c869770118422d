"""The report in the Slicer scene (NoduleMTL/NoduleMTLMRML.py, issue 15) against a REAL MRML
scene from slicer-core (no Slicer application, no mocks; scene helpers of test_mrml.py):
Lung-RADS / Brock columns of the results table, the per-scan category line, and
"Export report" for a volume loaded from the real Lung-PET-CT-Dx A0002 DICOM series (SEG +
SR + pictures + HTML) and for a volume from an NRRD file (pictures + HTML only)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in plain Python) is not installed")
hd = pytest.importorskip("highdicom")
sitk = pytest.importorskip("SimpleITK")

from test_mrml import app, crop, load_volume_from_file, make_result, slicer_share, vtk_errors  # noqa: E402,F401

import NoduleMTLMRML as M  # noqa: E402
from NoduleMTLLib.clinical.brock import PatientInfo  # noqa: E402
from NoduleMTLLib.core.io import InputError, read_ct  # noqa: E402
from NoduleMTLLib.core.postprocess import measure_nodule  # noqa: E402
from NoduleMTLLib.core.results import AnalysisResult, NetworkOutput, NoduleResult  # noqa: E402
from NoduleMTLLib.service.assessment import annotate_result  # noqa: E402

SERIES = "lung_pet_ct_dx_A0002_dicom"


def _col(table_node, name):
    return table_node.GetTable().GetColumnByName(name)


@pytest.fixture
def a0002_scene(app, shared_data, tmp_path):
    """A0002 as a DICOM-loaded volume (its SeriesInstanceUID on the subject-hierarchy item, as
    Slicer's DICOM plugin sets it) and a result whose mask is the tumour inside the
    collection's reference boxes (HU >= -300; this tests the scene and export, not a network)."""
    folder = shared_data / "whole_ct" / SERIES
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    ct = read_ct(folder)
    path = tmp_path / "a0002.nrrd"
    sitk.WriteImage(ct.image, str(path))
    volume = load_volume_from_file(app.scene, path, name="A0002")
    sh = app.sh
    item = sh.GetItemByDataNode(volume)
    if item == sh.GetInvalidItemID():
        item = sh.CreateItem(sh.GetSceneItemID(), volume)
    sh.SetItemUID(item, "DICOM", ct.dicom_series_uid)
    assert M.volume_node_to_ct(volume).dicom_series_uid == ct.dicom_series_uid
    with open(shared_data / "whole_ct" / "lung_pet_ct_dx_boxes.csv", newline="") as f:
        boxes = [r for r in csv.DictReader(f) if r["volume"] == SERIES]
    box = np.zeros(ct.shape_zyx, bool)
    for r in boxes:
        box[int(r["slice_index_k"]), int(r["ymin_j"]):int(r["ymax_j"]) + 1, int(r["xmin_i"]):int(r["xmax_i"]) + 1] = True
    mask = box & (np.asarray(ct.array) >= -300)
    m = measure_nodule(mask, ct)
    nodule = NoduleResult(id=1, point_lps_mm=tuple(m["centroid_lps_mm"]), found=True, mask=mask,
                          networks={"lnmsnet": NetworkOutput("lnmsnet", 0.83)},
                          **{k: m[k] for k in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu", "solid_fraction",
                                               "type", "centroid_lps_mm")})
    result = AnalysisResult(ct.describe(), {"networks": ["lnmsnet"], "device": "cpu"}, [nodule])
    annotate_result(result, ct, PatientInfo())  # as the command line does before writing (no patient data here)
    seg_node, table_node = M.add_result_to_scene(app.scene, result, volume)
    return folder, volume, result, seg_node, table_node


@pytest.mark.slow
def test_table_has_lung_rads_and_brock_columns_and_scan_line(a0002_scene):
    _folder, _volume, result, seg_node, table_node = a0002_scene
    assert _col(table_node, "lung_rads.category").GetValue(0) == "4B"
    assert _col(table_node, "lung_rads.size_mm").GetValue(0) == pytest.approx(result.nodules[0].lung_rads["size_mm"])
    assert math.isnan(_col(table_node, "brock.probability").GetValue(0))  # no age / sex given
    assert _col(table_node, "brock.status").GetValue(0) == "incomplete: age, sex unknown"
    assert table_node.GetColumnTitle("lung_rads.category") == "Lung-RADS"
    run = json.loads(seg_node.GetAttribute("NoduleMTL.run"))
    assert M.scan_lung_rads_text(run).startswith("Lung-RADS (per scan, baseline rules): 4B (nodule 1)")
    assert M.scan_lung_rads_text({}) == ""


@pytest.mark.slow
def test_export_report_dicom_volume_writes_seg_sr_pictures_html(a0002_scene, tmp_path):
    folder, volume, result, seg_node, table_node = a0002_scene
    out = tmp_path / "report"
    paths = M.export_report(seg_node, volume, out, dicom_folder=folder)
    names = {p.relative_to(out).as_posix() for p in paths}
    assert {"segmentation.dcm", "report.sr.dcm", "report.html", "pictures/nodule_1.png", "nodules.json"} <= names
    d = json.loads((out / "nodules.json").read_text())
    n = d["nodules"][0]
    # the mask as it is in the scene: same measurement as the result's
    assert n["diameter_mm"] == pytest.approx(result.nodules[0].diameter_mm, abs=0.01)
    assert n["networks"]["lnmsnet"]["malignancy_probability"] == pytest.approx(0.83)
    # patient from the DICOM header of the series folder: Brock now computed, table updated
    assert n["brock"]["inputs"]["age"] == 53 and n["brock"]["probability"] is not None
    assert _col(table_node, "brock.probability").GetValue(0) == pytest.approx(n["brock"]["probability"])
    assert _col(table_node, "brock.status").GetValue(0).startswith("lower bound")
    sr = hd.sr.srread(out / "report.sr.dcm")
    (g,) = sr.content.get_volumetric_roi_measurement_groups()
    from pydicom.sr.codedict import codes
    assert float(g.get_measurements(name=codes.SCT.LongAxis)[0].value) == pytest.approx(n["diameter_mm"], abs=0.01)
    seg = hd.seg.segread(out / "segmentation.dcm")
    assert g.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.slow
def test_export_report_file_volume_pictures_and_html_only(app, crop, tmp_path):
    path = tmp_path / "crop.nrrd"
    sitk.WriteImage(crop.ct, str(path))
    volume = load_volume_from_file(app.scene, path)
    result = make_result(crop)
    seg_node, table_node = M.add_result_to_scene(app.scene, result, volume)
    with pytest.raises(InputError, match="not loaded from DICOM"):
        M.export_report(seg_node, volume, tmp_path / "x", dicom_folder=tmp_path)
    out = tmp_path / "r"
    paths = M.export_report(seg_node, volume, out, patient=PatientInfo(age=61, sex="M", sources={"age": "option",
                                                                                                   "sex": "option"}))
    names = {p.relative_to(out).as_posix() for p in paths}
    assert "report.sr.dcm" not in names and "segmentation.dcm" not in names and "report.html" in names
    found = [n for n in result.nodules if n.found]
    assert {f"pictures/nodule_{n.id}.png" for n in found} <= names
    d = json.loads((out / "nodules.json").read_text())
    assert all(n["lung_rads"]["category"] in ("2", "3", "4A", "4B") for n in d["nodules"])
    assert all(0 < n["brock"]["probability"] < 1 for n in d["nodules"])
    cats = [_col(table_node, "lung_rads.category").GetValue(r) for r in range(table_node.GetNumberOfRows())]
    assert sum(c != "" for c in cats) == len(found)  # the not-found row stays empty
