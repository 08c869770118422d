"""The module logic's path on a real scene: Slicer-loaded CT + markups -> network -> MRML nodes,
and the CLI's ``segmentation.seg.nrrd`` read back by Slicer's own segmentation reader."""

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

import NoduleMTLMRML  # noqa: E402
from NoduleMTLLib import cli  # noqa: E402
from NoduleMTLLib.metrics import dice  # noqa: E402
from NoduleMTLLib.pipeline import analyze_points  # noqa: E402
from test_cli import MIN_DICE, NODULE2_RAS, NODULE3_RAS  # noqa: E402
from test_mrml import app, build_app_scene, load_volume_from_file, slicer_share, vtk_errors  # noqa: E402,F401


@pytest.fixture(scope="module")
def sample_paths(repo_dir):
    d = repo_dir / "Resources" / "SampleData"
    return d / "LIDC-IDRI-0003_crop.nrrd", d / "LIDC-IDRI-0003_crop_labels.nrrd"


def test_logic_path_on_real_scene(app, sample_paths):
    """What NoduleMTLLogic.process does, step by step, against a real vtkMRMLScene."""
    scene = app.scene
    volume = load_volume_from_file(scene, sample_paths[0], "sample CT")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule points")
    points.AddControlPoint(vtk.vtkVector3d(*NODULE2_RAS))
    points.AddControlPoint(vtk.vtkVector3d(*NODULE3_RAS))
    ct = NoduleMTLMRML.volume_node_to_ct(volume)
    pts = NoduleMTLMRML.markups_to_points_lps(points)
    result = analyze_points(ct, pts, network_ids=("lnmsnet",), device="cpu")
    seg_node, table = NoduleMTLMRML.add_result_to_scene(scene, result, volume)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_paths[1])))
    seg = seg_node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2 and table.GetNumberOfRows() == 2
    for n, ref_value in zip(result.nodules, (2, 3)):
        assert n.found
        mask = NoduleMTLMRML.label_array_from_segmentation(seg_node, seg.GetNthSegmentID(n.id - 1), volume)
        assert np.array_equal(mask, n.mask)  # what Slicer shows is exactly what was computed
        assert dice(mask, ref == ref_value) >= MIN_DICE


def test_cli_seg_nrrd_reads_in_slicer(app, sample_paths, tmp_path):
    """The slicerio-written .seg.nrrd loads with Slicer's segmentation storage node, on the CT's grid."""
    out = tmp_path / "o"
    assert cli.main(["analyze", str(sample_paths[0]), "--point", *map(str, NODULE3_RAS), "--out", str(out),
                     "--quiet", "--device", "cpu"]) == 0
    scene = app.scene
    volume = load_volume_from_file(scene, sample_paths[0], "sample CT")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out / "segmentation.seg.nrrd"))
    seg_node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(seg_node)
    seg = seg_node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1
    segment = seg.GetNthSegment(0)
    assert segment.GetName() == "Nodule 1"
    tag = vtk.reference("")
    assert segment.GetTag("NoduleMTL.lnmsnet.malignancy_probability", tag) and 0 <= float(tag.get()) <= 1
    mask = NoduleMTLMRML.label_array_from_segmentation(seg_node, seg.GetNthSegmentID(0), volume)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    assert np.array_equal(mask, labels == 1)
