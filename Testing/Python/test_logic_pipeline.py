"""The module logic's path on a real scene: Slicer-loaded CT + markups -> network -> MRML nodes,
and the CLI's ``segmentation.seg.nrrd`` read back by Slicer's own segmentation reader."""

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
from test_cli import MIN_DICE, NODULE2_RAS, NODULE3_RAS  # noqa: E402
from test_mrml import app, build_app_scene, load_volume_from_file, slicer_share, vtk_errors  # noqa: E402,F401

import NoduleMTLMRML  # noqa: E402
from NoduleMTLLib import DEFAULT_NETWORKS  # noqa: E402
from NoduleMTLLib.apps import cli  # noqa: E402
from NoduleMTLLib.core.metrics import dice  # noqa: E402
from NoduleMTLLib.inference.pipeline import analyze_points  # noqa: E402

pytestmark = pytest.mark.slow  # analyses on a real MRML scene


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
    assert segment.GetTag(f"NoduleMTL.malignancy_probability.{DEFAULT_NETWORKS[0]}", tag) and 0 <= float(tag.get()) <= 1
    assert segment.GetTag("NoduleMTL.malignancy_probability", tag) and 0 <= float(tag.get()) <= 1  # the reported one
    mask = NoduleMTLMRML.label_array_from_segmentation(seg_node, seg.GetNthSegmentID(0), volume)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    assert np.array_equal(mask, labels == 1)


def _click_networks_with_weights():
    from NoduleMTLLib.models import registry

    ids = []
    for nid in registry.available_networks():
        try:
            registry.find_weights(nid)
            ids.append(nid)
        except registry.WeightsError:
            pass
    return ids


def test_all_click_networks_on_real_scene(app, sample_paths):
    """Every click network with shipped weights runs through the logic's path on the real
    sample CT: per-network probabilities and signs in the table, the consensus columns, and a
    re-classification that updates the consensus from the edited mask."""
    nets = tuple(_click_networks_with_weights())
    if len(nets) < 2:
        pytest.skip("fewer than two click networks have weights")
    scene = app.scene
    volume = load_volume_from_file(scene, sample_paths[0], "sample CT")
    ct = NoduleMTLMRML.volume_node_to_ct(volume)
    result = analyze_points(ct, [(-NODULE3_RAS[0], -NODULE3_RAS[1], NODULE3_RAS[2])], network_ids=nets, device="cpu")
    n = result.nodules[0]
    assert n.found and set(n.networks) == set(nets)
    seg_node, table = NoduleMTLMRML.add_result_to_scene(scene, result, volume)
    t = table.GetTable()
    for net in nets:
        p = t.GetColumnByName(f"networks.{net}.malignancy_probability").GetValue(0)
        assert 0.0 <= p <= 1.0 and p == pytest.approx(n.networks[net].malignancy_probability, abs=1e-6)
    if "dsmtnet" in nets:
        for sign, prob in n.networks["dsmtnet"].sign_probabilities.items():
            assert t.GetColumnByName(f"networks.dsmtnet.sign_probability.{sign}").GetValue(0) == pytest.approx(prob, abs=1e-6)
    cons = t.GetColumnByName("consensus.malignancy_probability").GetValue(0)
    assert cons == pytest.approx(n.consensus.malignancy_probability, abs=1e-6)
    assert t.GetColumnByName("consensus.disagreement").GetValue(0) in ("low", "high")
    # after a re-classification every network saw the same mask: agreement 1, mean probability updated
    seg_id = seg_node.GetSegmentation().GetNthSegmentID(0)
    new = NoduleMTLMRML.reclassify_segment(scene, seg_node, seg_id, volume, table, network_ids=nets, device="cpu")
    probs = [o.malignancy_probability for o in new.networks.values()]
    assert t.GetColumnByName("consensus.malignancy_probability").GetValue(0) == pytest.approx(np.mean(probs), abs=1e-6)
    assert t.GetColumnByName("consensus.dice_pairwise_mean").GetValue(0) == pytest.approx(1.0)
