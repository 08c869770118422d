"""One answer everywhere (issue 24 items 1-4, issue 22 item 6), on the real sample CT.

One analysis of the 13 mm sample nodule with the default network, then:

* every output of that run - the CLI line, nodules.json, nodules.csv, report.html, the picture
  header, the seg.nrrd tags and colour, the Slicer segment's tag and colour, the Slicer results
  table and the panel's summary - carries the same reported (calibrated) probability and
  Lung-RADS category;
* the DICOM outputs, which need a DICOM input (a second run, on the Lung-PET-CT-Dx A0002 series
  with ``--dicom-sr``): the SR's first "Probability of cancer" and the DICOM SEG's colour, with
  the CLI line, nodules.json, nodules.csv and report.html of that run;
* every entry point gives that answer for the same mask: ``nodulemtl reclassify`` with the
  unchanged mask ``analyze`` wrote (it used to report null), ``nodulemtl batch``, the worker's
  request loop, and the Slicer Logic's re-classification of the segment on a real
  ``vtkMRMLScene`` (slicer-core);
* the written files follow the umask, and every nodules.json validates against the JSON Schema.

The click path classifies the mask it reports with the function re-classification uses
(``NoduleMTLLib.inference.classify.classify_mask``: the mask resampled onto the click's patch grid
weights the slice outputs), so the raw network output and the reported probability of the
unchanged mask agree within :data:`REPORTED_TOLERANCE` (the 4-decimal rounding of the records and
the networks' float arithmetic on a differently batched set of slices), and the category exactly.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from test_mrml import app, load_volume_from_file, slicer_share  # noqa: F401  (real slicer-core MRML scene)

from NoduleMTLLib.apps import cli
from NoduleMTLLib.models.registry import DEFAULT_NETWORKS
from NoduleMTLLib.outputs.colors import probability_color

NODULE3_RAS = (-23.5, 47.6, -172.3)  # 4 readers, ~13 mm
NET = DEFAULT_NETWORKS[0]
#: Before the click path classified its own reported mask (issue 24): 0.597 (analyze) vs 0.548
#: (re-classified) on this nodule; now both are 0.5476 (measured, every entry point).
REPORTED_TOLERANCE = 1e-4


def _pt(p):
    return ["--point", *(str(v) for v in p)]


@pytest.fixture(scope="module")
def run(repo_dir, tmp_path_factory):
    ct = repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
    base = tmp_path_factory.mktemp("one")
    out = base / "out"
    old = os.umask(0o022)
    try:
        buf = io.StringIO()
        from contextlib import redirect_stdout
        with redirect_stdout(buf):
            rc = cli.main(["analyze", str(ct), *_pt(NODULE3_RAS), "--out", str(out), "--quiet", "--device", "cpu"])
    finally:
        os.umask(old)
    assert rc == 0
    js = json.loads((out / "nodules.json").read_text())
    n = js["nodules"][0]
    return {"ct": ct, "base": base, "out": out, "stdout": buf.getvalue(), "json": js,
            "p": n["malignancy_probability"], "category": n["lung_rads"]["category"]}


@pytest.mark.slow
def test_every_output_of_one_run_has_the_same_reported_probability(run):
    from conftest import validate_nodules_json

    out, p, cat, js = run["out"], run["p"], run["category"], run["json"]
    validate_nodules_json(js)
    assert js["schema_version"] == 1 and js["run"]["mode"] == "click"
    n = js["nodules"][0]
    raw = n["networks"][NET]["malignancy_probability"]
    assert p is not None and 0 <= p <= 1 and cat
    # the clinical records have the typed records' keys (NoduleMTLLib.core.results)
    import typing

    from NoduleMTLLib.core.results import BrockRecord, LungRadsRecord
    for key, record in (("lung_rads", LungRadsRecord), ("brock", BrockRecord)):
        assert set(record.__required_keys__) <= set(n[key]) <= set(typing.get_type_hints(record)), key
    assert raw is not None  # the default calibration may be the identity (issue 22): raw and reported can agree
    # the CLI line: the reported probability first, the raw output only labelled as such
    line = next(ln for ln in run["stdout"].splitlines() if ln.startswith("Nodule 1:"))
    assert f"P(malignant) {p:.2f}" in line and f"Lung-RADS {cat}" in line
    assert re.search(rf"raw network output: {NET} {raw:.2f}", line)
    # CSV
    row = next(csv.DictReader(open(out / "nodules.csv")))
    assert float(row["malignancy_probability"]) == pytest.approx(p) and row["lung_rads.category"] == cat
    # report.html: the results table's reported column, and the raw column headed as raw
    html = (out / "report.html").read_text()
    assert "<th>P(malignant)</th>" in html and f"<th>Raw network output {NET}</th>" in html
    cells = re.findall(r"<td>([^<]*)</td>", html.split("<h2>Results</h2>")[1].split("</table>")[0])
    assert f"{p:.2f}" in cells and cat in cells
    # the picture header (the same key figures)
    from NoduleMTLLib.outputs.files import read_outputs
    from NoduleMTLLib.outputs.pictures import key_figures
    back = read_outputs(out)
    assert f"P(malignant) {p:.2f}" in key_figures(back.nodules[0])[1]
    # seg.nrrd: tag and colour from the reported probability
    import slicerio
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    s0 = seg["segments"][0]
    assert float(s0["tags"]["NoduleMTL.malignancy_probability"]) == pytest.approx(p)
    assert s0["tags"]["NoduleMTL.lung_rads.category"] == cat
    np.testing.assert_allclose(s0["color"], probability_color(p), atol=1e-6)
    # file modes follow the umask (022 -> 0644), also for the report written into the staged folder
    for name in ("nodules.json", "report.html", "labels.nrrd"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


@pytest.mark.slow
def test_every_entry_point_gives_the_same_answer_for_the_same_mask(run, app):  # noqa: F811 (fixture)
    import NoduleMTLMRML as M
    from NoduleMTLLib.apps import worker
    from NoduleMTLLib.outputs.files import read_outputs

    base, ct_path, p, cat = run["base"], run["ct"], run["p"], run["category"]
    labels = sitk.ReadImage(str(run["out"] / "labels.nrrd"))
    mask_path = base / "mask.nrrd"
    sitk.WriteImage(labels == 1, str(mask_path))
    answers = {}

    # nodulemtl reclassify with the unchanged mask (and the original click): same answer, full result set
    rc = cli.main(["reclassify", str(ct_path), "--mask", str(mask_path), *_pt(NODULE3_RAS), "--out", str(base / "re"),
                   "--quiet", "--device", "cpu", "--result", str(run["out"] / "nodules.json")])
    assert rc == 0
    re_js = json.loads((base / "re" / "nodules.json").read_text())
    assert re_js["run"]["mode"] == "reclassify" and (base / "re" / "report.html").is_file()
    answers["cli reclassify"] = re_js["nodules"][0]

    # the worker's request loop (typed JSON protocol; one process, networks kept in its ModelCache)
    from NoduleMTLLib.apps.protocol import AnalysisRequest
    from NoduleMTLLib.core.io import ras_to_lps
    req = AnalysisRequest(mode="analyze", ct=str(ct_path), out=str(base / "w"), points_lps=[list(ras_to_lps(NODULE3_RAS))],
                          device="cpu")
    events = io.StringIO()
    worker.serve(io.StringIO(req.to_json() + "\n"), stdout=events)
    assert '"result"' in events.getvalue(), events.getvalue()[-500:]
    answers["worker"] = json.loads((base / "w" / "nodules.json").read_text())["nodules"][0]
    # ... and its re-classification request (what the Slicer module sends: the mask, the click, the run's size correction)
    req = AnalysisRequest(mode="reclassify", ct=str(ct_path), out=str(base / "wr"), masks=[str(mask_path)],
                          points_lps=[list(ras_to_lps(NODULE3_RAS))], device="cpu", pictures=False,
                          size_corrections=[run["json"]["nodules"][0]["size_correction"]])
    events = io.StringIO()
    worker.serve(io.StringIO(req.to_json() + "\n"), stdout=events)
    assert '"result"' in events.getvalue(), events.getvalue()[-500:]
    answers["worker reclassify"] = json.loads((base / "wr" / "nodules.json").read_text())["nodules"][0]

    # nodulemtl batch (a points CSV for the one case)
    case_dir = base / "cases"
    case_dir.mkdir()
    os.symlink(ct_path, case_dir / "sample.nrrd")
    (base / "points.csv").write_text("case,x,y,z\nsample," + ",".join(str(v) for v in NODULE3_RAS) + "\n")
    assert cli.main(["batch", str(case_dir), "--points", str(base / "points.csv"), "--out", str(base / "b"),
                     "--quiet", "--device", "cpu", "--no-pictures"]) == 0
    answers["batch"] = json.loads((base / "b" / "sample" / "nodules.json").read_text())["nodules"][0]

    # the Slicer Logic on a real MRML scene: the result loaded, its segment re-classified unchanged
    volume = load_volume_from_file(app.scene, ct_path, "sample")
    seg_node, table = M.add_result_to_scene(app.scene, read_outputs(run["out"]), volume)
    sid = seg_node.GetSegmentation().GetNthSegmentID(0)
    segment = seg_node.GetSegmentation().GetSegment(sid)
    assert float(M._get_tag(segment, "NoduleMTL.malignancy_probability")) == pytest.approx(p)
    assert segment.GetColor() == pytest.approx(probability_color(p))
    # the Slicer results table: the reported column holds p; the network's own output only in its raw column
    assert table.GetTable().GetColumnByName("malignancy_probability").GetValue(0) == pytest.approx(p)
    raw = run["json"]["nodules"][0]["networks"][NET]["malignancy_probability"]
    assert table.GetTable().GetColumnByName(f"networks.{NET}.malignancy_probability").GetValue(0) == pytest.approx(raw)
    # the panel's summary: the reported P(malignant) in the nodule's line, the raw output labelled raw
    from NoduleMTLText import summary_html
    panel = summary_html(run["json"]).split("<br>")
    line = next(ln for ln in panel if ln.startswith("<b>Nodule 1</b>"))
    assert f"P(malignant) {p:.2f}" in line and any(f"raw network output {NET}" in ln for ln in panel)
    new = M.reclassify_segment(app.scene, seg_node, sid, volume, device="cpu")
    answers["slicer reclassify"] = new.to_dict()
    assert segment.GetColor() == pytest.approx(probability_color(new.malignancy_probability))

    got = {w: (n["malignancy_probability"], n["lung_rads"]["category"]) for w, n in answers.items()}
    print(f"analyze: {p} {cat}; {got}")
    raw = run["json"]["nodules"][0]["networks"][NET]["malignancy_probability"]
    for where, (pw, cw) in got.items():
        assert pw is not None, where
        assert pw == pytest.approx(p, abs=REPORTED_TOLERANCE), (where, got)
        assert cw == cat, (where, got)
        assert answers[where]["networks"][NET]["malignancy_probability"] == pytest.approx(raw, abs=REPORTED_TOLERANCE), where
    # the click entry points (CLI, worker, batch) run the same analysis: exactly the same number
    for where in ("worker", "batch"):
        assert answers[where]["malignancy_probability"] == p, where
    # the same sizes: the unchanged mask keeps the size correction it was reported with (issue 22's
    # correction of DSMT-Net's axes; the CLI reads it from --result, the Slicer layer from the segment tags)
    n0 = run["json"]["nodules"][0]
    assert n0["size_correction"] is not None
    for where, n in answers.items():
        assert (n["diameter_mm"], n["short_axis_mm"]) == pytest.approx((n0["diameter_mm"], n0["short_axis_mm"])), where
        assert n["lung_rads"]["size_mm"] == n0["lung_rads"]["size_mm"], where
        assert n["size_correction"]["long_axis_factor"] == n0["size_correction"]["long_axis_factor"], where
    # an edited mask is the user's outline: measured as it is (no correction) even with --result
    from scipy import ndimage
    edited = sitk.GetImageFromArray(ndimage.binary_erosion(sitk.GetArrayFromImage(labels == 1) > 0).astype(np.uint8))
    edited.CopyInformation(labels)
    sitk.WriteImage(edited, str(base / "edited.nrrd"))
    assert cli.main(["reclassify", str(ct_path), "--mask", str(base / "edited.nrrd"), *_pt(NODULE3_RAS), "--out",
                     str(base / "ed"), "--quiet", "--device", "cpu", "--no-pictures",
                     "--result", str(run["out"] / "nodules.json")]) == 0
    assert json.loads((base / "ed" / "nodules.json").read_text())["nodules"][0]["size_correction"] is None


@pytest.mark.slow
def test_dicom_sr_and_seg_carry_the_same_reported_probability(shared_data, tmp_path):
    """The default network on the real A0002 DICOM series (a click in its adenocarcinoma): the SR
    and the DICOM SEG carry the reported probability of nodules.json, as the other outputs do."""
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.sr.codedict import codes

    folder = shared_data / "whole_ct" / "lung_pet_ct_dx_A0002_dicom"
    with open(shared_data / "whole_ct" / "lung_pet_ct_dx_boxes.csv", newline="") as f:
        rows = sorted((r for r in csv.DictReader(f) if r["volume"] == folder.name), key=lambda r: int(r["slice_index_k"]))
    m = rows[len(rows) // 2]
    ras = (-(float(m["lps_min_x"]) + float(m["lps_max_x"])) / 2, -(float(m["lps_min_y"]) + float(m["lps_max_y"])) / 2,
           float(m["lps_z"]))
    out = tmp_path / "out"
    buf = io.StringIO()
    from contextlib import redirect_stdout
    with redirect_stdout(buf):
        rc = cli.main(["analyze", str(folder), *_pt(ras), "--dicom-sr", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    n = json.loads((out / "nodules.json").read_text())["nodules"][0]
    p, cat = n["malignancy_probability"], n["lung_rads"]["category"]
    assert n["found"] and p is not None
    line = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("Nodule 1:"))
    assert f"P(malignant) {p:.2f}" in line and f"Lung-RADS {cat}" in line
    assert float(next(csv.DictReader(open(out / "nodules.csv")))["malignancy_probability"]) == pytest.approx(p)
    cells = re.findall(r"<td>([^<]*)</td>", (out / "report.html").read_text().split("<h2>Results</h2>")[1].split("</table>")[0])
    assert f"{p:.2f}" in cells
    # SR (TID 1500): the reported probability first, then the network's raw output (then Brock)
    g = hd.sr.srread(out / "report.sr.dcm").content.get_volumetric_roi_measurement_groups()[0]
    probs = [float(x.value) for x in g.get_measurements(name=codes.DCM.ProbabilityOfCancer)]
    assert probs[0] == pytest.approx(p, abs=1e-4) and probs[1] == pytest.approx(n["networks"][NET]["malignancy_probability"], abs=1e-4)
    # DICOM SEG colour (CIELab, rounded) and seg.nrrd colour follow the reported probability
    lab = pydicom.dcmread(out / "segmentation.dcm").SegmentSequence[0].RecommendedDisplayCIELabValue
    np.testing.assert_allclose(np.asarray(hd.color.CIELabColor.from_dicom_value(lab).to_rgb()) / 255,
                               probability_color(p), atol=0.02)
    import slicerio
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    np.testing.assert_allclose(seg["segments"][0]["color"], probability_color(p), atol=1e-6)
