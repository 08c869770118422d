"""Tests of the MRML layer (NoduleMTL/NoduleMTLMRML.py) against a REAL MRML scene.

No Slicer application and no mocks: the ``slicer-core`` wheel provides the real MRML
library, module logics and ``slicer.util`` array helpers.  The scene is built the way the
Slicer application builds it (application logic + Colors, Terminologies, Volumes,
Segmentations, Markups, Tables and SubjectHierarchy logics), with a small share folder
supplying the colour-file folder and the terminology contexts the logics load at start.

Data: a 120 x 120 x 40 crop of the real LIDC-IDRI-0003 CT around nodule 2 (LPS
72.5, 77.2, -190.4) and the same crop of its reference label map (nodules 1 and 2 of
``nodules.csv`` lie inside it).  Only header geometry is changed in the anisotropic /
oblique cases; voxel values are the real ones.

Every test fails if VTK/MRML printed an ``ERROR:``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in plain Python) is not installed")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

import NoduleMTLMRMLScene  # noqa: E402  (the module state of the terminology context)

import NoduleMTLMRML as M  # noqa: E402  (conftest puts NoduleMTL/ on sys.path)
from NoduleMTLLib.core.io import InputError, ijk_to_ras_matrix, read_ct  # noqa: E402
from NoduleMTLLib.core.results import NODULE_TERMINOLOGY, AnalysisResult, NetworkOutput, NoduleResult  # noqa: E402

CASE = "whole_ct/lidc/LIDC-IDRI-0003"
CENTER_LPS = (72.5, 77.2, -190.4)  # nodule 2 of LIDC-IDRI-0003
CROP_SIZE_IJK = (120, 120, 40)


# ---------------------------------------------------------------------------
# VTK error capture
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def vtk_errors():
    """Route VTK/MRML messages to a string; fail the test on any ``ERROR:``."""
    out = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(out)
    yield out
    text = out.GetOutput()
    vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())
    assert "ERROR:" not in text, text


# ---------------------------------------------------------------------------
# Scene built as the Slicer application builds it (test helper, not in the module)
# ---------------------------------------------------------------------------

def _write_share_folder(root: Path) -> Path:
    """Minimal share folder: an (empty) colour-file folder and the three terminology
    contexts the Terminologies logic loads at start, restricted to the entries NoduleMTL
    uses (Morphologically Altered Structure / Nodule, region Lung)."""
    (root / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
    nodule = {
        "CodeMeaning": "Nodule", "CodingSchemeDesignator": "SCT", "CodeValue": "27925004",
        "3dSlicerLabel": "nodule", "recommendedDisplayRGBValue": [144, 238, 144],
    }
    category = {
        "CodeMeaning": "Morphologically Altered Structure", "CodingSchemeDesignator": "SCT", "CodeValue": "49755003",
        "showAnatomy": True, "Type": [nodule],
    }
    schema = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/"
    for filename, context in (
        ("SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.term.json",
         "Segmentation category and type - 3D Slicer General Anatomy list"),
        ("SegmentationCategoryTypeModifier-DICOM-Master.term.json",
         "Segmentation category and type - DICOM master list"),
    ):
        (root / filename).write_text(json.dumps({
            "SegmentationCategoryTypeContextName": context, "@schema": schema + "segment-context-schema.json#",
            "SegmentationCodes": {"Category": [category]},
        }))
    (root / "AnatomicRegionAndModifier-DICOM-Master.term.json").write_text(json.dumps({
        "AnatomicContextName": "Anatomic codes - DICOM master list", "@schema": schema + "anatomic-context-schema.json#",
        "AnatomicCodes": {"AnatomicRegion": [
            {"CodeMeaning": "Lung", "CodingSchemeDesignator": "SCT", "CodeValue": "39607008", "3dSlicerLabel": "lung"},
        ]},
    }))
    return root


@dataclass
class AppScene:
    """A scene plus the logics that keep it working (held so they stay alive)."""

    scene: object
    app_logic: object
    logics: dict = field(default_factory=dict)

    @property
    def sh(self):
        return self.scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")


def build_app_scene(share: Path) -> AppScene:
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.SetHomeDirectory(str(share))
    app.SetShareDirectory("share")
    bundle = AppScene(scene, app)
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    terminologies.SetModuleShareDirectory(str(share))
    for name, logic in (
        ("Colors", slicer.vtkSlicerColorLogic()),
        ("Terminologies", terminologies),
        ("Volumes", slicer.vtkSlicerVolumesLogic()),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
        ("Markups", slicer.vtkSlicerMarkupsLogic()),
        ("Tables", slicer.vtkSlicerTablesLogic()),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic()),
    ):
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        bundle.logics[name] = logic
    return bundle


@pytest.fixture(scope="session")
def slicer_share(tmp_path_factory) -> Path:
    return _write_share_folder(tmp_path_factory.mktemp("slicer_share"))


@pytest.fixture
def app(slicer_share) -> AppScene:
    bundle = build_app_scene(slicer_share)
    yield bundle
    bundle.scene.Clear(1)


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------

@dataclass
class Crop:
    ct: object  # sitk.Image, int16 HU
    labels: object  # sitk.Image, uint8 (value n = nodule n)
    nodules_csv: list


@pytest.fixture(scope="session")
def crop(shared_data) -> Crop:
    case = shared_data / CASE
    if not (case / "ct.nrrd").exists():
        pytest.skip(f"{case}/ct.nrrd not found")
    ct = sitk.ReadImage(str(case / "ct.nrrd"))
    labels = sitk.ReadImage(str(case / "nodules_labels.nrrd"))
    center = ct.TransformPhysicalPointToIndex(CENTER_LPS)
    start = [int(center[d] - CROP_SIZE_IJK[d] // 2) for d in range(3)]
    ct_crop = sitk.RegionOfInterest(ct, CROP_SIZE_IJK, start)
    lab_crop = sitk.RegionOfInterest(labels, CROP_SIZE_IJK, start)
    with open(case / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return Crop(ct_crop, lab_crop, rows)


def _with_geometry(image, spacing=None, direction=None, origin=None):
    out = sitk.Image(image)
    if spacing is not None:
        out.SetSpacing(spacing)
    if direction is not None:
        out.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    if origin is not None:
        out.SetOrigin(origin)
    return out


def _rotation(ax_deg, ay_deg, az_deg) -> np.ndarray:
    ax, ay, az = np.radians([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _vtk_matrix(a) -> object:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))
    return m


def add_volume_from_array(scene, image, name="CT crop"):
    """Volume node from a SimpleITK image via slicer.util.updateVolumeFromArray + IJKToRAS."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(image)))
    node.CreateDefaultDisplayNodes()
    return node


def load_volume_from_file(scene, path: Path, name="CT crop"):
    """Volume node read by Slicer's own volume reader (vtkMRMLVolumeArchetypeStorageNode)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.CreateDefaultDisplayNodes()
    return node


def _mean_hu(ct_image, mask) -> float:
    return float(sitk.GetArrayViewFromImage(ct_image)[mask].mean())


def make_result(crop: Crop, ct_image=None) -> AnalysisResult:
    """AnalysisResult whose masks are the reference nodules of the crop (real data):
    nodule 2 clicked, nodule 1 clicked, nodule 2 clicked again (overlapping masks), and a
    click in the lung where nothing is found.  Masks, centres, diameters, volumes and mean HU
    come from the data; the network outputs and the short axis are placeholder numbers
    (this tests the scene conversion, not the networks)."""
    ct_image = crop.ct if ct_image is None else ct_image
    labels = sitk.GetArrayFromImage(crop.labels)
    csv_rows = {int(r["nodule"]): r for r in crop.nodules_csv}
    nodules = []
    for nid, (ref, malig, signs) in enumerate(((2, 0.81, {"spiculation": 0.42, "lobulation": 0.61}),
                                               (1, 0.23, {"spiculation": 0.05, "lobulation": 0.12}),
                                               (2, 0.79, {"spiculation": 0.40, "lobulation": 0.58})), start=1):
        row = csv_rows[ref]
        mask = labels == ref
        assert mask.any()
        nodules.append(NoduleResult(
            id=nid,
            point_lps_mm=(float(row["center_lps_x"]), float(row["center_lps_y"]), float(row["center_lps_z"])),
            found=True, mask=mask,
            diameter_mm=float(row["diameter_mm"]), short_axis_mm=0.8 * float(row["diameter_mm"]),
            volume_mm3=float(mask.sum() * np.prod(ct_image.GetSpacing())),
            mean_hu=_mean_hu(ct_image, mask), solid_fraction=0.9, type="solid",
            centroid_lps_mm=(float(row["center_lps_x"]), float(row["center_lps_y"]), float(row["center_lps_z"])),
            networks={"lnmsnet": NetworkOutput("lnmsnet", malig, signs, 1.0)},
            malignancy_probability=malig,  # the reported probability (as if calibrated by identity)
        ))
    nodules.append(NoduleResult(id=4, point_lps_mm=(40.0, 60.0, -200.0), found=False, message="no nodule at the point"))
    return AnalysisResult(input={"size_ijk": list(ct_image.GetSize())}, run={"networks": ["lnmsnet"], "device": "cpu"},
                          nodules=nodules)


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


# ---------------------------------------------------------------------------
# volume_node_to_ct
# ---------------------------------------------------------------------------

GEOMETRIES = {
    "native": {},
    "oblique_anisotropic": {
        "spacing": (0.7, 0.9, 2.0),
        "direction": _rotation(20.0, -10.0, 35.0),  # rotated about all three axes
        "origin": (12.5, -30.25, -210.0),
    },
    "left_handed": {
        "spacing": (0.7, 0.9, 2.0),
        "direction": _rotation(20.0, -10.0, 35.0) @ np.diag([1.0, -1.0, 1.0]),  # det = -1
        "origin": (12.5, -30.25, -210.0),
    },
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_volume_node_to_ct_matches_simpleitk_read_of_same_file(app, crop, tmp_path, geometry):
    """Slicer's reader (RAS) -> volume_node_to_ct (LPS) describes the same world image as
    SimpleITK reading the same file.

    For a left-handed voxel frame Slicer's reader flips the k axis (and moves the origin)
    to keep IJK right-handed, so there the grids differ while the world image is the same:
    resampling SimpleITK's image onto our grid (nearest neighbour, voxel centres coincide)
    must reproduce our voxels exactly.
    """
    image = _with_geometry(crop.ct, **GEOMETRIES[geometry])
    path = tmp_path / "ct_crop.nrrd"
    sitk.WriteImage(image, str(path))
    node = load_volume_from_file(app.scene, path)

    ct = M.volume_node_to_ct(node)
    ref = read_ct(path)
    assert ct.image.GetSize() == ref.image.GetSize() == CROP_SIZE_IJK
    assert ct.array.dtype == np.int16
    assert ct.source == str(path)
    np.testing.assert_allclose(ct.image.GetSpacing(), ref.image.GetSpacing(), atol=1e-6)
    same_world = sitk.Resample(ref.image, ct.image, sitk.Transform(), sitk.sitkNearestNeighbor, -5000)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(same_world), ct.array)
    if geometry != "left_handed":
        np.testing.assert_allclose(ct.image.GetOrigin(), ref.image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ct.image.GetDirection(), ref.image.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(ct.array, ref.array)
        for idx in ((0, 0, 0), (119, 0, 39), (37, 81, 12)):
            np.testing.assert_allclose(ct.image.TransformIndexToPhysicalPoint(idx),
                                       ref.image.TransformIndexToPhysicalPoint(idx), atol=1e-4)


def test_volume_node_to_ct_from_array_round_trip(app, crop):
    """updateVolumeFromArray + IJKToRAS -> volume_node_to_ct gives back the input image."""
    image = _with_geometry(crop.ct, **GEOMETRIES["left_handed"])
    node = add_volume_from_array(app.scene, image)
    ct = M.volume_node_to_ct(node)
    np.testing.assert_allclose(ct.image.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(ct.image.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(ct.image.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(ct.array, sitk.GetArrayViewFromImage(image))
    # a copy, not a view of the node's memory
    slicer.util.arrayFromVolume(node)[0, 0, 0] += 1
    assert ct.array[0, 0, 0] == sitk.GetArrayViewFromImage(image)[0, 0, 0]


def test_volume_node_to_ct_includes_linear_parent_transform(app, crop):
    node = add_volume_from_array(app.scene, crop.ct)
    local_ct = M.volume_node_to_ct(node)
    to_parent = np.eye(4)
    to_parent[:3, :3] = _rotation(0.0, 0.0, 15.0)
    to_parent[:3, 3] = (10.0, -5.0, 3.0)
    tnode = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    tnode.SetMatrixTransformToParent(_vtk_matrix(to_parent))
    node.SetAndObserveTransformNodeID(tnode.GetID())
    ijk_to_ras_before = M._ijk_to_ras_local(node)

    ct = M.volume_node_to_ct(node)
    # the input node is not modified (no hardening)
    assert node.GetTransformNodeID() == tnode.GetID()
    np.testing.assert_array_equal(M._ijk_to_ras_local(node), ijk_to_ras_before)
    for idx in ((0, 0, 0), (119, 119, 39), (60, 20, 5)):
        lx, py, sz = local_ct.image.TransformIndexToPhysicalPoint(idx)
        world_ras = to_parent @ np.array([-lx, -py, sz, 1.0])
        expected_lps = (-world_ras[0], -world_ras[1], world_ras[2])
        np.testing.assert_allclose(ct.image.TransformIndexToPhysicalPoint(idx), expected_lps, atol=1e-4)


def test_volume_node_to_ct_refuses_nonlinear_transform_and_bad_inputs(app, crop):
    node = add_volume_from_array(app.scene, crop.ct)
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (((0, 0, 0), (0, 0, 0)), ((50, 0, 0), (52, 1, 0)), ((0, 50, 0), (0, 50, 2)), ((0, 0, -200), (1, 0, -200))):
        src.InsertNextPoint(*p)
        dst.InsertNextPoint(*q)
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    tps.SetBasisToR()
    tnode = app.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tnode.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    with pytest.raises(InputError, match="non-linear transform"):
        M.volume_node_to_ct(node)

    with pytest.raises(ValueError):
        M.volume_node_to_ct(None)
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labelmap, sitk.GetArrayFromImage(crop.labels))
    with pytest.raises(InputError, match="label map"):
        M.volume_node_to_ct(labelmap)
    empty = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no image data"):
        M.volume_node_to_ct(empty)


# ---------------------------------------------------------------------------
# markups_to_points_lps
# ---------------------------------------------------------------------------

def test_markups_to_points_lps_world_positions_and_undefined_points(app):
    markups = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule points")
    markups.CreateDefaultDisplayNodes()
    markups.AddControlPoint(vtk.vtkVector3d(-72.5, -77.2, -190.4), "P1")
    markups.AddControlPoint(vtk.vtkVector3d(10.0, 20.0, 30.0), "P2")
    markups.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0), "P3")
    markups.UnsetNthControlPointPosition(1)  # e.g. a skipped point: no position
    assert M.markups_to_points_lps(markups) == [(72.5, 77.2, -190.4), (-1.0, -2.0, 3.0)]

    shift = np.eye(4)
    shift[:3, 3] = (5.0, 6.0, 7.0)
    tnode = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    tnode.SetMatrixTransformToParent(_vtk_matrix(shift))
    markups.SetAndObserveTransformNodeID(tnode.GetID())
    np.testing.assert_allclose(M.markups_to_points_lps(markups), [(67.5, 71.2, -183.4), (-6.0, -8.0, 10.0)])

    empty = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "none")
    assert M.markups_to_points_lps(empty) == []
    with pytest.raises(ValueError):
        M.markups_to_points_lps(None)


# ---------------------------------------------------------------------------
# add_result_to_scene / label_array_from_segmentation
# ---------------------------------------------------------------------------

def _add_user_segmentation(app, volume, crop):
    """A segmentation the user made before running NoduleMTL (must stay untouched)."""
    user = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT crop nodules")  # same name on purpose
    user.CreateDefaultDisplayNodes()
    user.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "user labels")
    slicer.util.updateVolumeFromArray(labelmap, (sitk.GetArrayFromImage(crop.labels) == 1).astype(np.uint8))
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    labelmap.SetIJKToRASMatrix(m)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, user)
    app.scene.RemoveNode(labelmap)
    segment = user.GetSegmentation().GetNthSegment(0)
    segment.SetName("my lesion")
    segment.SetColor(0.1, 0.2, 0.3)
    segment.SetTag("Mine", "yes")
    return user


def _snapshot_segmentation(node, volume):
    seg = node.GetSegmentation()
    out = {"name": node.GetName(), "ids": list(seg.GetSegmentIDs()), "mtime": node.GetMTime(),
           "transform": node.GetTransformNodeID()}
    for sid in seg.GetSegmentIDs():
        s = seg.GetSegment(sid)
        out[sid] = (s.GetName(), tuple(round(c, 6) for c in s.GetColor()),
                    M.label_array_from_segmentation(node, sid, volume).sum())
    return out


def test_add_result_to_scene_segments_masks_tags_and_table(app, crop):
    scene = app.scene
    volume = add_volume_from_array(scene, crop.ct)
    user = _add_user_segmentation(app, volume, crop)
    user_before = _snapshot_segmentation(user, volume)
    result = make_result(crop)
    nodes_before = _node_ids(scene)

    seg_node, table_node = M.add_result_to_scene(scene, result, volume)

    # --- new nodes only: segmentation (+ its display node) and table; no temporary leftovers
    added = _node_ids(scene) - nodes_before
    assert seg_node.GetID() in added and table_node.GetID() in added
    assert {scene.GetNodeByID(i).GetClassName() for i in added} <= {
        "vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode", "vtkMRMLTableNode"}
    assert not [i for i in added if scene.GetNodeByID(i).IsA("vtkMRMLVolumeNode")]
    assert seg_node is not user and seg_node.GetName() != user.GetName()
    assert seg_node.GetName().startswith("CT crop nodules")

    # --- existing user segmentation untouched
    assert _snapshot_segmentation(user, volume) == user_before
    user_segment = user.GetSegmentation().GetNthSegment(0)
    assert user_segment.GetName() == "my lesion" and user_segment.HasTag("Mine")

    # --- reference geometry from the input volume
    assert seg_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume
    assert seg_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()) != ""

    # --- one segment per found nodule; masks exact on the reference grid (overlap kept)
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    found = [n for n in result.nodules if n.found]
    for i, nodule in enumerate(found):
        segment = segmentation.GetNthSegment(i)
        sid = segmentation.GetNthSegmentID(i)
        assert segment.GetName() == f"Nodule {nodule.id}"
        np.testing.assert_allclose(segment.GetColor(), M.probability_color(nodule.malignancy_probability), atol=1e-6)
        if hasattr(segment, "GetTerminology"):
            assert segment.GetTerminology() == NODULE_TERMINOLOGY
        tags = _segment_tags(segment)
        assert tags[segment.GetTerminologyEntryTagName()] == NODULE_TERMINOLOGY
        assert tags["NoduleMTL.id"] == str(nodule.id)
        assert float(tags["NoduleMTL.diameter_mm"]) == pytest.approx(nodule.diameter_mm, rel=1e-5)
        assert float(tags["NoduleMTL.volume_mm3"]) == pytest.approx(nodule.volume_mm3, rel=1e-5)
        assert float(tags["NoduleMTL.mean_hu"]) == pytest.approx(nodule.mean_hu, rel=1e-5)
        assert tags["NoduleMTL.type"] == "solid"
        assert float(tags["NoduleMTL.malignancy_probability.lnmsnet"]) == pytest.approx(
            nodule.networks["lnmsnet"].malignancy_probability)
        assert float(tags["NoduleMTL.sign_probability.lnmsnet.spiculation"]) == pytest.approx(
            nodule.networks["lnmsnet"].sign_probabilities["spiculation"])
        np.testing.assert_allclose([float(v) for v in tags["NoduleMTL.point_ras_mm"].split(",")],
                                   nodule.point_ras_mm, atol=1e-5)
        exported = M.label_array_from_segmentation(seg_node, sid, volume)
        assert exported.dtype == bool and exported.shape == nodule.mask.shape
        np.testing.assert_array_equal(exported, nodule.mask)
    assert segmentation.GetNthSegment(0).GetName() == "Nodule 1"

    # --- table: one row per nodule (found or not), typed columns, values
    table = table_node.GetTable()
    assert table_node.GetNumberOfRows() == 4
    names = [table_node.GetColumnName(i) for i in range(table_node.GetNumberOfColumns())]
    for col in ("id", "label_value", "name", "point_ras_mm", "diameter_mm", "short_axis_mm", "volume_mm3",
                "mean_hu", "type", "networks.lnmsnet.malignancy_probability"):
        assert col in names, col
    for col in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu", "solid_fraction",
                "networks.lnmsnet.malignancy_probability", "networks.lnmsnet.sign_probability.lobulation"):
        assert table.GetColumnByName(col).GetDataType() == vtk.VTK_DOUBLE, col
    assert table_node.GetColumnUnitLabel("diameter_mm") == "mm"
    col = {c: table.GetColumnByName(c) for c in names}
    for row, nodule in enumerate(result.nodules):
        assert col["id"].GetValue(row) == nodule.id
        assert col["name"].GetValue(row) == nodule.name
        assert col["label_value"].GetValue(row) == (nodule.id if nodule.found else 0)
        ras = [float(v) for v in col["point_ras_mm"].GetValue(row).split(",")]
        np.testing.assert_allclose(ras, nodule.point_ras_mm, atol=0.006)
        if nodule.found:
            assert col["diameter_mm"].GetValue(row) == pytest.approx(nodule.diameter_mm)
            assert col["volume_mm3"].GetValue(row) == pytest.approx(nodule.volume_mm3)
            assert col["mean_hu"].GetValue(row) == pytest.approx(nodule.mean_hu)
            assert col["type"].GetValue(row) == "solid"
            assert col["networks.lnmsnet.malignancy_probability"].GetValue(row) == pytest.approx(
                nodule.networks["lnmsnet"].malignancy_probability)
            assert segmentation.GetSegment(col["segment_id"].GetValue(row)).GetName() == nodule.name
        else:
            assert math.isnan(col["diameter_mm"].GetValue(row))
            assert math.isnan(col["networks.lnmsnet.malignancy_probability"].GetValue(row))
            assert col["segment_id"].GetValue(row) == ""
            assert col["message"].GetValue(row) == "no nodule at the point"

    # --- cross references and run description
    assert seg_node.GetNodeReference("NoduleMTL.table") is table_node
    assert table_node.GetNodeReference("NoduleMTL.segmentation") is seg_node
    assert json.loads(seg_node.GetAttribute("NoduleMTL.run"))["networks"] == ["lnmsnet"]

    # --- a second run never reuses or modifies the first output
    seg2, table2 = M.add_result_to_scene(scene, result, volume)
    assert seg2 is not seg_node and table2 is not table_node
    assert seg2.GetName() != seg_node.GetName() and table2.GetName() != table_node.GetName()
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 3
    seg3, _ = M.add_result_to_scene(scene, result, volume, segmentationName="Right lung nodules")
    assert seg3.GetName() == "Right lung nodules"


def _segment_tags(segment) -> dict:
    """The tags this test checks (vtkSegment has no wrapped way to list all tags)."""
    tags = {}
    keys = [segment.GetTerminologyEntryTagName(), "NoduleMTL.id", "NoduleMTL.label_value", "NoduleMTL.point_ras_mm",
            "NoduleMTL.diameter_mm", "NoduleMTL.short_axis_mm", "NoduleMTL.volume_mm3", "NoduleMTL.mean_hu",
            "NoduleMTL.solid_fraction", "NoduleMTL.type", "NoduleMTL.malignancy_probability.lnmsnet",
            "NoduleMTL.sign_probability.lnmsnet.spiculation", "NoduleMTL.sign_probability.lnmsnet.lobulation",
            "NoduleMTL.dice_with_final.lnmsnet"]
    for key in keys:
        if segment.HasTag(key):
            tags[key] = _get_tag(segment, key)
    return tags


def _get_tag(segment, key) -> str:
    out = vtk.reference("")
    assert segment.GetTag(key, out), f"segment '{segment.GetName()}' has no tag {key}"
    return str(out)


def test_add_result_rejects_mismatched_masks_and_leaves_scene_clean(app, crop):
    volume = add_volume_from_array(app.scene, crop.ct)
    result = make_result(crop)
    result.nodules[0].mask = result.nodules[0].mask[:-1]
    before = _node_ids(app.scene)
    with pytest.raises(ValueError, match="shape"):
        M.add_result_to_scene(app.scene, result, volume)
    assert _node_ids(app.scene) == before


def test_box_masks_give_the_same_segments_as_full_masks(app, crop):
    """Nodules holding their masks as bounding boxes (``MaskBox``, what the whole-scan search
    stores) give exactly the segments of the same masks held as full-grid arrays (real CT
    crop, overlapping masks included); a box on another grid is refused like a full mask."""
    from NoduleMTLLib.core.consensus import MaskBox

    volume = add_volume_from_array(app.scene, crop.ct)
    full = make_result(crop)
    boxed = make_result(crop)
    for n in boxed.nodules:
        if n.found:
            n.mask = MaskBox.from_full(n.mask)
            assert isinstance(n.mask_box, MaskBox) and n.mask_shape_zyx == full.nodules[0].mask.shape
    seg_full, table_full = M.add_result_to_scene(app.scene, full, volume)
    seg_box, table_box = M.add_result_to_scene(app.scene, boxed, volume)
    a, b = seg_full.GetSegmentation(), seg_box.GetSegmentation()
    assert a.GetNumberOfSegments() == b.GetNumberOfSegments() == 3
    for i in range(3):
        assert a.GetNthSegment(i).GetName() == b.GetNthSegment(i).GetName()
        got = M.label_array_from_segmentation(seg_box, b.GetNthSegmentID(i), volume)
        np.testing.assert_array_equal(got, M.label_array_from_segmentation(seg_full, a.GetNthSegmentID(i), volume))
        np.testing.assert_array_equal(got, full.nodules[i].mask)
    assert table_full.GetNumberOfRows() == table_box.GetNumberOfRows()

    shape = tuple(full.nodules[0].mask.shape)
    box = boxed.nodules[0].mask_box
    boxed.nodules[0].mask = MaskBox(box.offset_zyx, box.array, (shape[0] + 1,) + shape[1:])
    before = _node_ids(app.scene)
    with pytest.raises(ValueError, match="shape"):
        M.add_result_to_scene(app.scene, boxed, volume)
    assert _node_ids(app.scene) == before


def test_subject_hierarchy_placement_under_study(app, crop):
    scene, sh = app.scene, app.sh
    volume = add_volume_from_array(scene, crop.ct)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "LIDC-IDRI-0003")
    study = sh.CreateStudyItem(patient, "CT chest")
    # In the application the subject hierarchy plugin logic (Qt) creates an item for every
    # data node; slicer-core has no such plugin logic, so do what it does.
    volume_item = sh.GetItemByDataNode(volume)
    if volume_item == sh.GetInvalidItemID():
        volume_item = sh.CreateItem(sh.GetSceneItemID(), volume)
    sh.SetItemParent(volume_item, study)

    seg_node, table_node = M.add_result_to_scene(scene, make_result(crop), volume)
    for node in (seg_node, table_node):
        item = sh.GetItemByDataNode(node)
        assert item != sh.GetInvalidItemID()
        assert sh.GetItemParent(item) == study, node.GetName()

    # a volume at the top level: outputs at the top level too
    volume2 = add_volume_from_array(scene, crop.ct, name="other CT")
    if sh.GetItemByDataNode(volume2) == sh.GetInvalidItemID():
        sh.CreateItem(sh.GetSceneItemID(), volume2)
    seg2, table2 = M.add_result_to_scene(scene, make_result(crop), volume2)
    for node in (seg2, table2):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemParent(sh.GetItemByDataNode(volume2))


def test_transformed_volume_segmentation_follows_transform(app, crop):
    volume = add_volume_from_array(app.scene, crop.ct)
    to_parent = np.eye(4)
    to_parent[:3, :3] = _rotation(5.0, 0.0, -12.0)
    to_parent[:3, 3] = (-4.0, 8.0, 1.5)
    tnode = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    tnode.SetMatrixTransformToParent(_vtk_matrix(to_parent))
    volume.SetAndObserveTransformNodeID(tnode.GetID())
    result = make_result(crop)
    seg_node, _ = M.add_result_to_scene(app.scene, result, volume)
    assert seg_node.GetTransformNodeID() == tnode.GetID()
    segmentation = seg_node.GetSegmentation()
    for i, nodule in enumerate(n for n in result.nodules if n.found):
        mask = M.label_array_from_segmentation(seg_node, segmentation.GetNthSegmentID(i), volume)
        np.testing.assert_array_equal(mask, nodule.mask)


def test_label_array_from_segmentation_errors(app, crop):
    volume = add_volume_from_array(app.scene, crop.ct)
    seg_node, _ = M.add_result_to_scene(app.scene, make_result(crop), volume)
    before = _node_ids(app.scene)
    with pytest.raises(ValueError, match="no segment"):
        M.label_array_from_segmentation(seg_node, "not-a-segment", volume)
    with pytest.raises(ValueError):
        M.label_array_from_segmentation(None, "x", volume)
    M.label_array_from_segmentation(seg_node, seg_node.GetSegmentation().GetNthSegmentID(0), volume)
    assert _node_ids(app.scene) == before, "temporary export nodes must be removed"


def test_seg_nrrd_round_trip_keeps_segments(app, crop, tmp_path, slicer_share):
    volume = add_volume_from_array(app.scene, crop.ct)
    result = make_result(crop)
    seg_node, _ = M.add_result_to_scene(app.scene, result, volume)
    path = tmp_path / "nodules.seg.nrrd"
    storage = app.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    seg_node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.WriteData(seg_node), "writing .seg.nrrd failed"
    assert path.stat().st_size > 0

    # read back into a fresh scene, with the same CT as reference
    fresh = build_app_scene(slicer_share)
    try:
        volume2 = add_volume_from_array(fresh.scene, crop.ct)
        loaded = fresh.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
        storage2 = fresh.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage2.SetFileName(str(path))
        loaded.SetAndObserveStorageNodeID(storage2.GetID())
        assert storage2.ReadData(loaded), "reading .seg.nrrd failed"
        segmentation = loaded.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 3
        for i, nodule in enumerate(n for n in result.nodules if n.found):
            segment = segmentation.GetNthSegment(i)
            assert segment.GetName() == nodule.name
            np.testing.assert_allclose(segment.GetColor(), M.probability_color(nodule.malignancy_probability), atol=1e-3)
            assert _get_tag(segment, segment.GetTerminologyEntryTagName()) == NODULE_TERMINOLOGY
            assert float(_get_tag(segment, "NoduleMTL.diameter_mm")) == pytest.approx(nodule.diameter_mm, rel=1e-5)
            mask = M.label_array_from_segmentation(loaded, segmentation.GetNthSegmentID(i), volume2)
            np.testing.assert_array_equal(mask, nodule.mask)
    finally:
        fresh.scene.Clear(1)

    # an independent reader agrees on names and terminology
    slicerio = pytest.importorskip("slicerio")
    info = slicerio.read_segmentation(str(path), skip_voxels=True)
    names = [s["name"] for s in info["segments"]]
    assert names == ["Nodule 1", "Nodule 2", "Nodule 3"]
    for segment in info["segments"]:
        terminology = segment["terminology"]
        assert terminology["type"] == ["SCT", "27925004", "Nodule"]
        assert terminology["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
        assert terminology["anatomicRegion"] == ["SCT", "39607008", "Lung"]
        assert "NoduleMTL.malignancy_probability.lnmsnet" in segment["tags"]
    # overlapping masks (nodules 1 and 3 are the same reference nodule) sit on separate layers
    layers = [s["layer"] for s in info["segments"]]
    assert layers[0] != layers[2]


def test_unknown_values_give_nan_and_no_tag(app, crop):
    """A network without a malignancy head (probability None) and a nodule without
    measurements: NaN in the table, no tag on the segment."""
    volume = add_volume_from_array(app.scene, crop.ct)
    result = make_result(crop)
    first = result.nodules[0]
    first.networks["lnmsnet"] = NetworkOutput("lnmsnet", None, {}, None)
    first.short_axis_mm = None
    seg_node, table_node = M.add_result_to_scene(app.scene, result, volume)
    segment = seg_node.GetSegmentation().GetNthSegment(0)
    assert not segment.HasTag("NoduleMTL.malignancy_probability.lnmsnet")
    assert not segment.HasTag("NoduleMTL.short_axis_mm")
    assert segment.HasTag("NoduleMTL.diameter_mm")
    table = table_node.GetTable()
    assert math.isnan(table.GetColumnByName("networks.lnmsnet.malignancy_probability").GetValue(0))
    assert math.isnan(table.GetColumnByName("short_axis_mm").GetValue(0))
    assert table.GetColumnByName("networks.lnmsnet.malignancy_probability").GetValue(1) == pytest.approx(0.23)


def test_find_nodules_scores_in_the_table(app, crop):
    """Whole-scan results: the table carries the reported (combined) score and both stages'
    scores, in the result's (ranked) order; click results have no such columns."""
    volume = add_volume_from_array(app.scene, crop.ct)
    result = make_result(crop)
    for rank, n in enumerate(result.nodules):
        n.detection = {"score": 0.9 - 0.2 * rank, "detector_score": 0.95 - 0.1 * rank,
                       "fp_reduction_score": (0.9 - 0.2 * rank) ** 2 / (0.95 - 0.1 * rank), "box_ijk": [0] * 6}
    _, table_node = M.add_result_to_scene(app.scene, result, volume)
    table = table_node.GetTable()
    got = [table.GetColumnByName("detection.score").GetValue(r) for r in range(len(result.nodules))]
    assert got == pytest.approx([0.9 - 0.2 * r for r in range(len(result.nodules))])
    assert table.GetColumnByName("detection.detector_score").GetValue(1) == pytest.approx(0.85)
    assert table_node.GetColumnTitle("detection.fp_reduction_score") == "FP-reduction score"
    _, click_table = M.add_result_to_scene(app.scene, make_result(crop), volume)
    assert click_table.GetTable().GetColumnByName("detection.score") is None


# ---------------------------------------------------------------------------
# probability colours and legend
# ---------------------------------------------------------------------------

def test_probability_color_ramp_and_legend():
    green, yellow, red, grey = (M.PROBABILITY_COLORS[k] for k in ("low", "intermediate", "high", "unknown"))
    assert len({green, yellow, red, grey}) == 4
    for p, expected in ((0.0, green), (0.2999, green), (0.3, yellow), (0.5999, yellow), (0.6, red), (1.0, red),
                        (None, grey), (math.nan, grey)):
        assert M.probability_color(p) == expected, p
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError):
            M.probability_color(bad)
    legend = M.probability_legend()
    for word in ("green", "yellow", "red", "grey", "0.3", "0.6"):
        assert word in legend


def test_segment_colors_follow_probabilities(app, crop):
    volume = add_volume_from_array(app.scene, crop.ct)
    result = make_result(crop)  # P(malignant) 0.81, 0.23, 0.79
    result.nodules[2].malignancy_probability = None  # no reported probability -> grey (never a raw output instead)
    seg_node, _ = M.add_result_to_scene(app.scene, result, volume)
    colors = [tuple(round(c, 6) for c in seg_node.GetSegmentation().GetNthSegment(i).GetColor()) for i in range(3)]
    assert colors == [M.PROBABILITY_COLORS["high"], M.PROBABILITY_COLORS["low"], M.PROBABILITY_COLORS["unknown"]]
    # another network's raw output does not change the colour: the reported probability decides
    result.run["networks"] = ["detguided", "lnmsnet"]
    result.nodules[0].networks["detguided"] = NetworkOutput("detguided", 0.45, {}, None)
    seg2, _ = M.add_result_to_scene(app.scene, result, volume)
    assert seg2.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx(M.PROBABILITY_COLORS["high"])
    assert seg2.GetSegmentation().GetNthSegment(1).GetColor() == pytest.approx(M.PROBABILITY_COLORS["low"])
    seg3, _ = M.add_result_to_scene(app.scene, result, volume, colorBy="index")
    for i in range(3):
        assert seg3.GetSegmentation().GetNthSegment(i).GetColor() == pytest.approx(M.NODULE_COLORS[i])
    with pytest.raises(ValueError, match="colorBy"):
        M.add_result_to_scene(app.scene, result, volume, colorBy="rainbow")


def test_segment_color_follows_the_reported_calibrated_probability(app, crop):
    """The top-level (calibrated) ``malignancy_probability`` - the number nodules.json reports -
    decides the colour over the networks' raw probabilities; without it, grey (one probability everywhere)."""
    volume = add_volume_from_array(app.scene, crop.ct)
    result = make_result(crop)  # raw P(malignant) 0.81, 0.23, 0.79
    result.nodules[0].malignancy_probability = 0.12  # calibrated: low although the network said 0.81
    result.nodules[1].malignancy_probability = 0.65
    seg, _ = M.add_result_to_scene(app.scene, result, volume)
    colors = [seg.GetSegmentation().GetNthSegment(i).GetColor() for i in range(3)]
    assert colors[0] == pytest.approx(M.PROBABILITY_COLORS["low"])
    assert colors[1] == pytest.approx(M.PROBABILITY_COLORS["high"])
    assert colors[2] == pytest.approx(M.PROBABILITY_COLORS["high"])  # reported 0.79
    result.nodules[2].malignancy_probability = None
    seg2, _ = M.add_result_to_scene(app.scene, result, volume)
    assert seg2.GetSegmentation().GetNthSegment(2).GetColor() == pytest.approx(M.PROBABILITY_COLORS["unknown"])  # not the raw 0.79


# ---------------------------------------------------------------------------
# terminology resource
# ---------------------------------------------------------------------------

@pytest.fixture
def registered_terminology(app):
    logic = app.logics["Terminologies"]
    name = M.register_terminology(logic)
    yield logic, name
    NoduleMTLMRMLScene._registered_context = None  # module state: do not leak into other tests


def test_terminology_resource_loaded_and_used(app, crop, registered_terminology, tmp_path, repo_dir):
    logic, name = registered_terminology
    assert name == M.TERMINOLOGY_CONTEXT_NAME and logic.IsTerminologyContextLoaded(name)
    assert M.terminology_file() == str(repo_dir / "Resources" / "NoduleMTL.term.json")
    assert M.register_terminology(logic) == name  # idempotent
    assert logic.GetNumberOfCategoriesInTerminology(name) == 1
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(name, "lung nodule", entry)
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"
    assert entry.GetTypeObject().GetCodeValue() == "27925004"
    assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
    # the same codes as NODULE_TERMINOLOGY (used by the CLI's .seg.nrrd and the DICOM SEG)
    parts = NODULE_TERMINOLOGY.split("~")
    assert parts[1] == "SCT^49755003^" + entry.GetCategoryObject().GetCodeMeaning()
    assert parts[2] == "SCT^27925004^" + entry.GetTypeObject().GetCodeMeaning()

    volume = add_volume_from_array(app.scene, crop.ct)
    seg_node, _ = M.add_result_to_scene(app.scene, make_result(crop), volume)
    segment = seg_node.GetSegmentation().GetNthSegment(0)
    text = _get_tag(segment, segment.GetTerminologyEntryTagName())
    assert text == M.nodule_terminology_entry() and text.startswith(name + "~")
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(text, parsed)
    assert parsed.GetTerminologyContextName() == name
    assert parsed.GetTypeObject().GetCodeValue() == "27925004"
    assert parsed.GetAnatomicRegionObject().GetCodeValue() == "39607008"
    # an independent reader sees the codes in the written .seg.nrrd
    slicerio = pytest.importorskip("slicerio")
    path = tmp_path / "t.seg.nrrd"
    storage = app.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    seg_node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.WriteData(seg_node)
    info = slicerio.read_segmentation(str(path), skip_voxels=True)
    assert info["segments"][0]["terminology"]["type"] == ["SCT", "27925004", "Nodule"]
    assert info["segments"][0]["terminology"]["contextName"] == name


def test_terminology_without_registration_is_general_anatomy():
    assert NoduleMTLMRMLScene._registered_context is None
    assert M.nodule_terminology_entry() == NODULE_TERMINOLOGY
    with pytest.raises(ValueError):
        M.register_terminology(None)


# ---------------------------------------------------------------------------
# refinement loop on a real scene: click path -> edit segment -> reclassify / export
# ---------------------------------------------------------------------------

SAMPLE_POINTS_RAS = [(-72.5, -77.2, -190.4), (-23.5, 47.6, -172.3)]


@pytest.fixture
def clicked_scene(app, repo_dir):
    """The sample CT loaded by Slicer's reader, the click path run on its two nodules
    (LNMSNet, CPU) and the result added to the scene."""
    from NoduleMTLLib.core.io import ras_to_lps
    from NoduleMTLLib.inference.pipeline import analyze_points

    volume = load_volume_from_file(app.scene, repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd",
                                   name="LIDC-IDRI-0003 crop")
    ct = M.volume_node_to_ct(volume)
    result = analyze_points(ct, [ras_to_lps(p) for p in SAMPLE_POINTS_RAS], ["lnmsnet"], device="cpu")
    assert all(n.found for n in result.nodules)
    seg_node, table_node = M.add_result_to_scene(app.scene, result, volume)
    return volume, ct, result, seg_node, table_node


def _labelmap_state(seg_node, segment_id):
    """The segment's stored binary labelmap, exactly: voxels, extent, geometry, label value."""
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    scalars = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).copy()
    return (tuple(image.GetExtent()), tuple(m.GetElement(r, c) for r in range(4) for c in range(4)),
            segment.GetLabelValue(), scalars)


def _assert_same_labelmap(a, b):
    assert a[:3] == b[:3]
    np.testing.assert_array_equal(a[3], b[3])


def _erode_segment_like_margin_effect(seg_node, segment_id):
    """Shrink a segment by one voxel in-plane the way Segment Editor's Margin effect does:
    vtkImageDilateErode3D on the segment's labelmap, written back with SetBinaryLabelmapToSegment."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    labelmap = slicer.vtkOrientedImageData()
    assert logic.GetSegmentBinaryLabelmapRepresentation(seg_node, segment_id, labelmap, False)
    erode = vtk.vtkImageDilateErode3D()
    erode.SetInputData(labelmap)
    erode.SetDilateValue(0)  # background grows into the segment
    erode.SetErodeValue(1)
    erode.SetKernelSize(3, 3, 1)
    erode.Update()
    modified = slicer.vtkOrientedImageData()
    modified.ShallowCopy(erode.GetOutput())
    modified.CopyDirections(labelmap)
    assert logic.SetBinaryLabelmapToSegment(modified, seg_node, segment_id, logic.MODE_REPLACE, labelmap.GetExtent())


def _row(table_node, name, row):
    return table_node.GetTable().GetColumnByName(name).GetValue(row)


@pytest.mark.slow
def test_reclassify_segment_follows_user_edit_and_keeps_it(app, clicked_scene):
    from NoduleMTLLib.inference.refine import reclassify_from_mask

    volume, ct, result, seg_node, table_node = clicked_scene
    segmentation = seg_node.GetSegmentation()
    seg_id = segmentation.GetNthSegmentID(1)  # nodule 2, the 11 mm nodule
    other_id = segmentation.GetNthSegmentID(0)
    original = result.nodules[1]
    np.testing.assert_array_equal(M.label_array_from_segmentation(seg_node, seg_id, volume), original.mask)

    _erode_segment_like_margin_effect(seg_node, seg_id)
    edited = M.label_array_from_segmentation(seg_node, seg_id, volume)
    assert 0 < edited.sum() < original.mask.sum()
    assert not (edited & ~original.mask).any()
    edited_state, other_state = _labelmap_state(seg_node, seg_id), _labelmap_state(seg_node, other_id)
    segment = segmentation.GetSegment(seg_id)
    name_before, term_before = segment.GetName(), _get_tag(segment, segment.GetTerminologyEntryTagName())
    table_before_row0 = [_row(table_node, c, 0) for c in ("volume_mm3", "diameter_mm", "networks.lnmsnet.malignancy_probability")]
    nodes_before = _node_ids(app.scene)

    new = M.reclassify_segment(app.scene, seg_node, seg_id, volume, table_node, ["lnmsnet"], device="cpu")

    # --- the user's edit is untouched (bit-identical labelmap), other segments too
    _assert_same_labelmap(_labelmap_state(seg_node, seg_id), edited_state)
    _assert_same_labelmap(_labelmap_state(seg_node, other_id), other_state)
    assert segment.GetName() == name_before and _get_tag(segment, segment.GetTerminologyEntryTagName()) == term_before
    assert _node_ids(app.scene) == nodes_before  # no leftover temporary nodes

    # --- measurements follow the edit
    vox = float(np.prod(ct.spacing))
    assert new.id == 2 and new.found
    np.testing.assert_array_equal(new.mask, edited)
    assert new.volume_mm3 == pytest.approx(edited.sum() * vox)
    assert new.volume_mm3 < original.volume_mm3 and new.diameter_mm < original.diameter_mm
    np.testing.assert_allclose(new.point_lps_mm, original.point_lps_mm, atol=1e-5)  # the click is kept

    # --- probabilities recomputed from the edited mask (and differ from those of the unedited mask)
    p_new = new.networks["lnmsnet"].malignancy_probability
    # (the patch is centred on the original click, kept in the segment's tags)
    p_direct = reclassify_from_mask(ct, edited, ["lnmsnet"], device="cpu",
                                    point_lps=original.point_lps_mm).networks["lnmsnet"].malignancy_probability
    p_unedited = reclassify_from_mask(ct, original.mask, ["lnmsnet"], device="cpu",
                                      point_lps=original.point_lps_mm).networks["lnmsnet"].malignancy_probability
    assert p_new == pytest.approx(p_direct, abs=1e-4)
    # the edited mask changes the area weights of the slices' logits: if the edit were ignored the
    # two would be identical (probabilities are rounded to 4 decimals, hence 1e-3); how much they
    # differ depends on the weights (0.02 with the 8-bit-trained LNMSNet, 0.002 with the HU one)
    assert abs(p_new - p_unedited) > 1e-3, (p_new, p_unedited)

    # --- table row 2 updated, row 1 unchanged
    assert _row(table_node, "volume_mm3", 1) == pytest.approx(new.volume_mm3)
    assert _row(table_node, "diameter_mm", 1) == pytest.approx(new.diameter_mm)
    assert _row(table_node, "networks.lnmsnet.malignancy_probability", 1) == pytest.approx(p_new)
    assert "edited mask" in _row(table_node, "message", 1)
    assert [_row(table_node, c, 0) for c in ("volume_mm3", "diameter_mm", "networks.lnmsnet.malignancy_probability")] \
        == table_before_row0
    # --- segment tags and colour updated
    assert float(_get_tag(segment, "NoduleMTL.volume_mm3")) == pytest.approx(new.volume_mm3, rel=1e-5)
    assert float(_get_tag(segment, "NoduleMTL.malignancy_probability.lnmsnet")) == pytest.approx(p_new, abs=1e-5)
    assert _get_tag(segment, "NoduleMTL.reclassified") == "1"
    assert not segment.HasTag("NoduleMTL.dice_with_final.lnmsnet")
    # the service calibrated the new raw output: the colour and the tag follow the reported probability
    assert new.malignancy_probability is not None
    assert float(_get_tag(segment, "NoduleMTL.malignancy_probability")) == pytest.approx(new.malignancy_probability, abs=1e-5)
    assert segment.GetColor() == pytest.approx(M.probability_color(new.malignancy_probability))

    # --- defaults: table found through the segmentation's reference, networks from the run
    seg_node.GetSegmentation().GetSegment(other_id)  # nodule 1 untouched so far
    new1 = M.reclassify_segment(None, seg_node, other_id, volume, device="cpu")
    assert new1.id == 1 and set(new1.networks) == {"lnmsnet"}
    assert _row(table_node, "volume_mm3", 0) == pytest.approx(result.nodules[0].volume_mm3)  # unedited: same volume


@pytest.mark.slow
def test_reclassify_segment_errors_and_user_drawn_segment(app, clicked_scene):
    volume, ct, result, seg_node, table_node = clicked_scene
    with pytest.raises(ValueError, match="no segment"):
        M.reclassify_segment(app.scene, seg_node, "nope", volume, table_node, ["lnmsnet"], device="cpu")
    with pytest.raises(ValueError):
        M.reclassify_segment(app.scene, None, "x", volume)
    # a segment the user drew (no NoduleMTL tags): a new table row, nothing else touched
    mask = ndi_dilate(result.nodules[0].mask)
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    new_id = M._import_mask_as_segment(mask, M._ijk_to_ras_local(volume), labelmap, seg_node)
    n_rows = table_node.GetNumberOfRows()
    r = M.reclassify_segment(app.scene, seg_node, new_id, volume, table_node, ["lnmsnet"], device="cpu")
    assert r.id == 3 and table_node.GetNumberOfRows() == n_rows + 1
    assert _row(table_node, "segment_id", n_rows) == new_id
    assert _row(table_node, "volume_mm3", n_rows) == pytest.approx(mask.sum() * float(np.prod(ct.spacing)))
    # an erased segment: clear error, nothing changed
    seg_id = seg_node.GetSegmentation().GetNthSegmentID(1)
    empty = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg_node, seg_id, empty, False)
    vtk.util.numpy_support.vtk_to_numpy(empty.GetPointData().GetScalars())[:] = 0
    empty.Modified()
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        empty, seg_node, seg_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, empty.GetExtent())
    before = _row(table_node, "volume_mm3", 1)
    with pytest.raises(InputError, match="empty"):
        M.reclassify_segment(app.scene, seg_node, seg_id, volume, table_node, ["lnmsnet"], device="cpu")
    assert _row(table_node, "volume_mm3", 1) == before


def ndi_dilate(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool), iterations=2)


@pytest.mark.slow
def test_export_segment_for_training_round_trip(app, clicked_scene, tmp_path):
    from training.data import load_user_cases

    volume, ct, result, seg_node, table_node = clicked_scene
    sh = app.sh
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "LIDC-IDRI-0003")
    sh.SetItemAttribute(patient, "DICOM.PatientID", "LIDC-IDRI-0003")
    study = sh.CreateStudyItem(patient, "CT")
    item = sh.GetItemByDataNode(volume)
    if item == sh.GetInvalidItemID():
        item = sh.CreateItem(sh.GetSceneItemID(), volume)
    sh.SetItemParent(item, study)

    seg_id = seg_node.GetSegmentation().GetNthSegmentID(1)
    _erode_segment_like_margin_effect(seg_node, seg_id)
    edited = M.label_array_from_segmentation(seg_node, seg_id, volume)
    state = _labelmap_state(seg_node, seg_id)
    out = M.export_segment_for_training(seg_node, seg_id, volume, tmp_path, {"malignancy": 2, "spiculation": 1})
    _assert_same_labelmap(_labelmap_state(seg_node, seg_id), state)
    assert out["case_id"] == "LIDC-IDRI-0003_crop_Nodule_2"
    with open(out["labels_csv"], newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["patient_id"] == "LIDC-IDRI-0003" and row["label"] == "0"
    (case,) = load_user_cases(tmp_path)
    ks = np.nonzero(edited.any((1, 2)))[0]
    np.testing.assert_array_equal(case.consensus.reshape(len(ks), -1).sum(1), edited[ks].reshape(len(ks), -1).sum(1))
    assert case.label == 0 and case.ratings == {"spiculation": 1.0}
    with pytest.raises(InputError, match="already"):
        M.export_segment_for_training(seg_node, seg_id, volume, tmp_path, {"malignancy": 2})


@pytest.mark.slow
def test_size_correction_survives_the_scene_until_the_mask_is_edited(app, repo_dir):
    """The default network's click result (size-corrected axes, issue 22) added to the scene and read back
    (:func:`result_from_segmentation`, what the report export measures): the same corrected axes while the
    segment is unedited; after a Margin-like erosion the outline is the user's and is measured as drawn."""
    from NoduleMTLLib.core.io import ras_to_lps
    from NoduleMTLLib.core.postprocess import axial_diameters
    from NoduleMTLLib.inference.pipeline import analyze_points

    volume = load_volume_from_file(app.scene, repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd",
                                   name="LIDC-IDRI-0003 crop")
    ct = M.volume_node_to_ct(volume)
    result = analyze_points(ct, [ras_to_lps(SAMPLE_POINTS_RAS[1])], ["dsmtnet"], device="cpu")
    n = result.nodules[0]
    assert n.found and n.size_correction is not None
    seg_node, _table = M.add_result_to_scene(app.scene, result, volume)
    seg_id = seg_node.GetSegmentation().GetNthSegmentID(0)
    segment = seg_node.GetSegmentation().GetSegment(seg_id)
    assert float(_get_tag(segment, "NoduleMTL.size_correction.long_axis_factor")) == pytest.approx(n.size_correction["long_axis_factor"])
    back = M.result_from_segmentation(seg_node, volume).nodules[0]
    assert back.diameter_mm == pytest.approx(n.diameter_mm, abs=0.01) and back.short_axis_mm == pytest.approx(n.short_axis_mm, abs=0.01)
    assert back.size_correction["long_axis_factor"] == pytest.approx(n.size_correction["long_axis_factor"])
    _erode_segment_like_margin_effect(seg_node, seg_id)
    edited = M.result_from_segmentation(seg_node, volume).nodules[0]
    assert edited.size_correction is None
    assert edited.diameter_mm == pytest.approx(axial_diameters(M.label_array_from_segmentation(seg_node, seg_id, volume), ct)[0])
