"""The review's state logic without a browser (``NoduleMTL/NoduleMTLReview/state.py``, ``export.py``):
statuses, navigation, undo / redo, path safety, and what an export holds.

The export test uses the sample CT and its readers' consensus label map (real data, no network
run): nodule 2 (~30 mm) accepted, nodule 3 (~13 mm) rejected.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from NoduleMTLLib.core.io import InputError
from NoduleMTLReview.state import (
    ACCEPTED,
    REJECTED,
    UNDECIDED,
    Finding,
    PathGuard,
    ReviewState,
    export_selection,
    finding_row,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
LABELS = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop_labels.nrrd"


def write_sample_dicom(out: Path) -> Path:
    """The sample CT written as a single-frame CT DICOM series (same voxels, same geometry), so the
    export's DICOM SEG / SR can be tested on a clean clone (the real DICOM lives outside the repository)."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    img = sitk.ReadImage(str(SAMPLE))
    d = img.GetDirection()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": generate_uid(), "0008|0060": "CT",
                "0008|0020": "20000101", "0008|0030": "000000", "0008|0050": "1", "0008|0070": "LIDC-IDRI",
                "0010|0010": "LIDC-IDRI-0003", "0010|0020": "LIDC-IDRI-0003", "0010|0030": "", "0010|0040": "",
                "0020|000d": study, "0020|000e": series, "0020|0052": frame, "0020|0010": "1", "0020|0011": "1",
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0018|0050": f"{img.GetSpacing()[2]:.4f}", "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(out / f"{k:04d}.dcm"))
        writer.Execute(sl)
    return out


def _state(n=3) -> ReviewState:
    s = ReviewState()
    for i in range(1, n + 1):
        s.add(Finding(i, "vtkMRMLSegmentationNode1", f"seg{i}", (0.0, 0.0, float(i))))
    return s


def test_statuses_undo_redo():
    s = _state()
    assert s.current == 1 and s.counts() == {UNDECIDED: 3, ACCEPTED: 0, REJECTED: 0}
    assert s.set_current_status(ACCEPTED)
    assert not s.set_current_status(ACCEPTED)  # no change, nothing to undo twice
    s.step(+1)
    assert s.set_current_status(REJECTED)
    assert s.statuses() == {1: ACCEPTED, 2: REJECTED, 3: UNDECIDED}
    assert s.undo() == 2 and s.get(2).status == UNDECIDED and s.current == 2
    assert s.undo() == 1 and s.get(1).status == UNDECIDED and s.current == 1
    assert s.undo() is None and not s.can_undo
    assert s.redo() == 1 and s.get(1).status == ACCEPTED
    s.set_status(3, REJECTED)  # a new change clears the redo stack
    assert not s.can_redo and s.redo() is None
    assert s.accepted_ids() == [1]
    with pytest.raises(ValueError):
        s.set_status(1, "maybe")
    with pytest.raises(KeyError):
        s.set_status(9, ACCEPTED)


def test_navigation_wraps_and_remove_keeps_a_selection():
    s = _state()
    assert [s.step(+1).id for _ in range(4)] == [2, 3, 1, 2]
    assert [s.step(-1).id for _ in range(3)] == [1, 3, 2]
    s.set_status(2, ACCEPTED)
    s.remove(2)
    assert s.current == 1 and not s.can_undo  # its history went with it
    assert [r["id"] for r in s.table_rows()] == [1, 3] and s.table_rows()[0]["selected"]
    assert ReviewState().step(+1) is None
    with pytest.raises(ValueError):
        s.add(Finding(1, "x", "y", (0, 0, 0)))


def test_path_guard_refuses_traversal_and_links(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ct.nrrd").write_bytes(b"x")
    (tmp_path / "secret.nrrd").write_bytes(b"x")
    (root / "link.nrrd").symlink_to(tmp_path / "secret.nrrd")
    g = PathGuard([root])
    assert g.check(str(root / "sub" / "ct.nrrd")) == (root / "sub" / "ct.nrrd").resolve()
    assert g.check("sub/ct.nrrd") == (root / "sub" / "ct.nrrd").resolve()  # relative to the first folder
    for bad in (str(tmp_path / "secret.nrrd"), "../secret.nrrd", str(root / "sub" / ".." / ".." / "secret.nrrd"),
                "link.nrrd", "/etc/passwd", ""):
        with pytest.raises(InputError):
            g.check(bad)
    with pytest.raises(InputError, match="does not exist"):
        g.check("sub/missing.nrrd")
    assert g.check("new_export", must_exist=False) == (root / "new_export").resolve()


def _sample_result(ct_path):
    """The sample's two four-reader nodules as an AnalysisResult (readers' masks, measured)."""
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.core.postprocess import measure_nodule
    from NoduleMTLLib.core.results import AnalysisResult, NetworkOutput, NoduleResult

    ct = read_ct(ct_path)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    nodules = []
    for fid, value in ((1, 2), (2, 3)):
        mask = lab == value
        m = measure_nodule(mask, ct)
        nodules.append(NoduleResult(id=fid, point_lps_mm=tuple(m["centroid_lps_mm"]), found=True, mask=mask,
                                    networks={"dsmtnet": NetworkOutput("dsmtnet", 0.8 if fid == 1 else 0.2,
                                                                       {"spiculation": 0.7, "calcification": 0.1})},
                                    malignancy_probability=0.8 if fid == 1 else 0.2,  # reported (shown, coloured)
                                    **{k: m[k] for k in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu",
                                                         "solid_fraction", "type", "centroid_lps_mm")}))
    return ct, AnalysisResult(ct.describe(), {"networks": ["dsmtnet"]}, nodules)


@pytest.fixture(scope="module")
def sample_result():
    return _sample_result(SAMPLE)


def test_finding_row(sample_result):
    _ct, res = sample_result
    row = finding_row(res.nodules[0], ["dsmtnet"])
    assert row["id"] == 1 and row["long_mm"] == pytest.approx(res.nodules[0].diameter_mm)
    assert row["axes"] == f"{res.nodules[0].diameter_mm:.1f} × {res.nodules[0].short_axis_mm:.1f}"
    assert row["p_malignant"] == pytest.approx(0.8) and row["signs"] == "spiculation"
    assert row["detection_score"] is None and row["disagreement"] == ""


def test_export_selection(sample_result):
    _ct, res = sample_result
    accepted, everything = export_selection(res, {1: ACCEPTED, 2: REJECTED})
    assert [n.id for n in accepted.nodules] == [1] and len(res.nodules) == 2  # the input is not changed
    assert [(d["id"], d["review_status"]) for d in everything["nodules"]] == [(1, ACCEPTED), (2, REJECTED)]
    assert everything["review"]["counts"] == {UNDECIDED: 0, ACCEPTED: 1, REJECTED: 1}
    none, everything = export_selection(res, {})
    assert none.nodules == [] and {d["review_status"] for d in everything["nodules"]} == {UNDECIDED}
    with pytest.raises(ValueError):
        export_selection(res, {1: "perhaps"})


def test_export_writes_only_accepted_and_never_overwrites(sample_result, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    from NoduleMTLLib.core.safe_output import OutputError
    from NoduleMTLReview.export import write_review_outputs

    ct, res = sample_result
    out = tmp_path / "review"
    paths = write_review_outputs(res, {1: ACCEPTED, 2: REJECTED}, ct, out, pictures=False)
    names = {p.name for p in paths}
    assert {"labels.nrrd", "segmentation.seg.nrrd", "nodules.json", "nodules.csv", "report.html"} <= names
    assert "segmentation.dcm" not in names  # an NRRD CT: no DICOM SEG / SR
    rows = list(csv.DictReader((out / "nodules.csv").open()))
    assert [r["id"] for r in rows] == ["1"]
    data = json.loads((out / "nodules.json").read_text())
    assert [(d["id"], d["review_status"]) for d in data["nodules"]] == [(1, ACCEPTED), (2, REJECTED)]
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    assert len(seg["segments"]) == 1
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))  # every finding: the review reopens
    assert set(np.unique(labels)) == {0, 1, 2} and (labels == 1).sum() == res.nodules[0].mask.sum()
    from NoduleMTLLib.outputs.files import read_outputs

    assert [n.id for n in read_outputs(out).nodules] == [1, 2]
    html = (out / "report.html").read_text()
    assert "Nodule 1" in html and "Nodule 2" not in html
    before = (out / "nodules.json").read_bytes()
    with pytest.raises(OutputError):  # no silent overwrite
        write_review_outputs(res, {1: REJECTED, 2: ACCEPTED}, ct, out, pictures=False)
    assert (out / "nodules.json").read_bytes() == before
    write_review_outputs(res, {1: REJECTED, 2: ACCEPTED}, ct, out, overwrite=True, pictures=False)
    assert [r["id"] for r in csv.DictReader((out / "nodules.csv").open())] == ["2"]


def test_export_from_dicom_writes_seg_and_sr_of_accepted_only(tmp_path):
    hd = pytest.importorskip("highdicom")
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLReview.export import write_review_outputs

    folder = write_sample_dicom(tmp_path / "dicom")
    assert np.array_equal(sitk.GetArrayFromImage(read_ct(folder).image), sitk.GetArrayFromImage(read_ct(SAMPLE).image))
    ct, res = _sample_result(folder)
    assert ct.dicom_series_uid
    out = tmp_path / "review"
    names = {p.name for p in write_review_outputs(res, {1: REJECTED, 2: ACCEPTED}, ct, out, pictures=False)}
    assert {"segmentation.dcm", "report.sr.dcm"} <= names
    seg = hd.seg.segread(out / "segmentation.dcm")
    assert seg.number_of_segments == 1
    assert seg.SegmentSequence[0].SegmentLabel == "Nodule 2"
    sr = hd.sr.srread(out / "report.sr.dcm")
    groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    # nothing accepted: no SEG / SR at all
    names = {p.name for p in write_review_outputs(res, {}, ct, tmp_path / "none", pictures=False)}
    assert "segmentation.dcm" not in names and "report.sr.dcm" not in names
