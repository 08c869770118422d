"""Thin MRML layer of NoduleMTL: converts between 3D Slicer scene nodes and the
pure-Python records of :mod:`NoduleMTLLib` (``CTVolume``, ``AnalysisResult``).

Uses only ``slicer`` (MRML and module-logic classes, ``slicer.util`` array
helpers), ``vtk`` and numpy, never ``qt``/``ctk``/``slicer.app``/
``slicer.modules``/``slicer.mrmlScene``: every function works on the scene its
nodes belong to.  That makes it usable inside the Slicer application, in
``PythonSlicer`` scripts, and in plain Python with the ``slicer-core`` wheel
(see ``Testing/Python/test_mrml.py``).

Coordinate conventions
----------------------
* Slicer world coordinates are RAS (millimetres); NoduleMTLLib works in LPS
  (SimpleITK / DICOM).  LPS = (-R, -A, S): the first two axes change sign.
* Voxel arrays are numpy ``(z, y, x) = (k, j, i)``, as ``slicer.util.arrayFromVolume``
  returns them and as ``NoduleResult.mask`` stores them.
* A volume under a *linear* parent transform is handled without modifying it: the
  CT handed to the pipeline carries the world geometry (transform included), and
  the output segmentation is placed under the same parent transform, so masks stay
  aligned.  A volume under a *non-linear* (warping) transform is refused with
  :class:`NoduleMTLLib.core.io.InputError` (harden the transform first).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from NoduleMTLLib.core.consensus import MaskBox
from NoduleMTLLib.core.io import CTVolume, InputError, image_from_array
from NoduleMTLLib.core.results import NODULE_TERMINOLOGY, AnalysisResult, NoduleResult
from NoduleMTLLib.outputs import colors as _colors
from NoduleMTLLib.outputs.fields import raw_network_fields, reported_color

__all__ = [
    "volume_node_to_ct",
    "markups_to_points_lps",
    "add_result_to_scene",
    "label_array_from_segmentation",
    "SEGMENT_TAG_PREFIX",
    "NODULE_COLORS",
    "probability_color",
    "probability_legend",
    "register_terminology",
    "nodule_terminology_entry",
    "reclassify_segment",
    "export_segment_for_training",
]

#: Prefix of the segment tags and node attributes written by NoduleMTL.
SEGMENT_TAG_PREFIX = "NoduleMTL."

#: Segment colours (RGB in [0, 1]), cycled by nodule id.  Distinct, saturated colours
#: that stay visible on a lung-window CT (no greys, no near-black).
NODULE_COLORS = (
    (0.90, 0.30, 0.20),  # red-orange
    (0.20, 0.60, 0.95),  # blue
    (0.95, 0.80, 0.15),  # yellow
    (0.40, 0.85, 0.35),  # green
    (0.75, 0.40, 0.90),  # violet
    (0.10, 0.85, 0.85),  # cyan
    (0.95, 0.45, 0.70),  # pink
    (0.95, 0.60, 0.20),  # orange
)

#: NoduleMTL's terminology context (``Resources/NoduleMTL.term.json``), see :func:`register_terminology`.
TERMINOLOGY_FILE_NAME = "NoduleMTL.term.json"
TERMINOLOGY_CONTEXT_NAME = "Segmentation category and type - NoduleMTL"
_registered_context: str | None = None

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_CT_PIXEL_DTYPES = (np.int16, np.float32)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _vtk_matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _ijk_to_ras_local(volumeNode) -> np.ndarray:
    """4x4 IJK -> RAS of the volume itself (parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return _vtk_matrix_to_numpy(m)


def _parent_transform_to_world(node) -> np.ndarray | None:
    """4x4 matrix of the node's parent transform chain (local RAS -> world RAS), or None.

    Raises:
        InputError: the transform chain is not linear (a warping transform).
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return None
    if not transformNode.IsTransformToWorldLinear():
        raise InputError(
            f"'{node.GetName()}' is under the non-linear transform '{transformNode.GetName()}'. "
            "NoduleMTL needs the voxel grid in world coordinates: harden the transform first "
            "(Transforms module > Harden transform) and run again."
        )
    m = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(m)
    return _vtk_matrix_to_numpy(m)


def _volume_shape_zyx(volumeNode) -> tuple[int, int, int]:
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None:
        raise InputError(f"Volume '{volumeNode.GetName() if volumeNode else None}' has no image data")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def _fmt(v, digits: int = 6) -> str:
    """Float -> compact string for segment tags (``repr`` noise avoided)."""
    return f"{float(v):.{digits}g}"


def _check_volume_node(volumeNode, role: str = "Input") -> None:
    if volumeNode is None:
        raise ValueError(f"{role} volume node is None")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} node '{volumeNode.GetName()}' ({volumeNode.GetClassName()}) is not a scalar volume")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{role} node '{volumeNode.GetName()}' is a label map, not a CT volume")
    image = volumeNode.GetImageData()
    if image is None:
        raise InputError(f"{role} volume '{volumeNode.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"{role} volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a CT volume has one HU value per voxel"
        )


# ---------------------------------------------------------------------------
# volume -> CTVolume
# ---------------------------------------------------------------------------

def volume_node_to_ct(volumeNode) -> CTVolume:
    """Convert a scalar volume node to a :class:`NoduleMTLLib.core.io.CTVolume` (LPS geometry).

    The voxel array is read with ``slicer.util.arrayFromVolume`` (shape ``(z, y, x)``)
    and copied.  The geometry is the volume's IJK->RAS matrix, composed with its parent
    transform when the volume is under a linear transform (the node is not modified),
    converted to IJK->LPS by negating the first two rows.  Pixel types other than int16
    and float32 are converted to float32 (values unchanged).

    Args:
        volumeNode: ``vtkMRMLScalarVolumeNode`` holding a CT in Hounsfield units.

    Returns:
        CTVolume whose image has the volume's size, spacing (mm), origin (LPS mm) and
        direction; ``source`` is the file it was loaded from ("" if none) and
        ``dicom_series_uid`` the series UID recorded by the DICOM module (or None).

    Raises:
        ValueError: ``volumeNode`` is None.
        NoduleMTLLib.core.io.InputError: not a scalar volume, a label map, no image data,
            several components per voxel, a non-linear parent transform, or a transform
            with shear (voxel axes no longer orthogonal).
    """
    _check_volume_node(volumeNode)
    ijk_to_ras = _ijk_to_ras_local(volumeNode)
    to_world = _parent_transform_to_world(volumeNode)
    if to_world is not None:
        ijk_to_ras = to_world @ ijk_to_ras
    ijk_to_lps = _RAS_TO_LPS @ ijk_to_ras

    lin = ijk_to_lps[:3, :3]
    norms = np.linalg.norm(lin, axis=0)
    if np.any(norms <= 0):
        raise InputError(f"Volume '{volumeNode.GetName()}' has a zero voxel spacing")
    direction = lin / norms
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(
            f"Volume '{volumeNode.GetName()}' has non-orthogonal voxel axes (sheared geometry or transform); "
            "resample it to an orthogonal grid first"
        )

    array = slicer.util.arrayFromVolume(volumeNode)  # a view; image_from_array copies it
    if array.dtype not in _CT_PIXEL_DTYPES:
        array = array.astype(np.float32)
    image = image_from_array(array, ijk_to_lps)

    source = ""
    storageNode = volumeNode.GetStorageNode()
    if storageNode is not None and storageNode.GetFileName():
        source = storageNode.GetFileName()
    return CTVolume(image=image, source=source, dicom_series_uid=_dicom_series_uid(volumeNode))


def _dicom_series_uid(volumeNode) -> str | None:
    scene = volumeNode.GetScene()
    shNode = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if shNode is None:
        return None
    item = shNode.GetItemByDataNode(volumeNode)
    if item == shNode.GetInvalidItemID():
        return None
    uid = shNode.GetItemUID(item, "DICOM")
    return uid or None


# ---------------------------------------------------------------------------
# markups -> points
# ---------------------------------------------------------------------------

def markups_to_points_lps(markupsNode) -> list[tuple[float, float, float]]:
    """World positions of a markups node's control points, in LPS millimetres.

    Positions are world coordinates (parent transforms of the markups node applied),
    converted RAS -> LPS.  Control points whose position is not defined yet (e.g. the
    preview point while placing, or skipped points) are left out; the order of the
    remaining points is kept (nodule ``id`` N is the N-th defined point).

    Args:
        markupsNode: a ``vtkMRMLMarkupsNode`` (typically ``vtkMRMLMarkupsFiducialNode``).

    Returns:
        list of ``(x, y, z)`` LPS tuples (mm); empty if there are no defined points.

    Raises:
        ValueError: ``markupsNode`` is None or not a markups node.
    """
    if markupsNode is None:
        raise ValueError("Markups node is None")
    if not markupsNode.IsA("vtkMRMLMarkupsNode"):
        raise ValueError(f"'{markupsNode.GetName()}' ({markupsNode.GetClassName()}) is not a markups node")
    points = []
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    for i in range(markupsNode.GetNumberOfControlPoints()):
        if markupsNode.GetNthControlPointPositionStatus(i) != defined:
            continue
        ras = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(i, ras)
        points.append((-float(ras[0]), -float(ras[1]), float(ras[2])))
    return points


# ---------------------------------------------------------------------------
# AnalysisResult -> segmentation + table
# ---------------------------------------------------------------------------

def _network_ids(result: AnalysisResult) -> list[str]:
    ids: list[str] = []
    for net in (result.run or {}).get("networks", []) or []:
        if isinstance(net, str) and net not in ids:
            ids.append(net)
    for n in result.nodules:
        for net in n.networks:
            if net not in ids:
                ids.append(net)
    return ids


def _sign_names(result: AnalysisResult, network_id: str) -> list[str]:
    names: list[str] = []
    for n in result.nodules:
        out = n.networks.get(network_id)
        if out is None:
            continue
        for s in out.sign_probabilities or {}:
            if s not in names:
                names.append(s)
    return names


def _set_segment_terminology(segment) -> None:
    if hasattr(segment, "SetTerminology"):  # Slicer >= 5.8
        segment.SetTerminology(nodule_terminology_entry())
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), nodule_terminology_entry())
    # The name and colour are ours, not derived from the terminology entry.
    if hasattr(segment, "SetNameAutoGenerated"):
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)


def _set_segment_result_tags(segment, nodule: NoduleResult) -> None:
    """The nodule's id, label value and point, then the tags of the field list
    (:func:`NoduleMTLLib.outputs.fields.segment_tags`, the same as in ``segmentation.seg.nrrd``).  Tags
    of reported fields (and of a size correction) the nodule no longer has are removed."""
    from NoduleMTLLib.outputs.fields import REPORTED_FIELDS, SIZE_CORRECTION_TAGS, segment_tags

    p = SEGMENT_TAG_PREFIX
    segment.SetTag(p + "id", str(nodule.id))
    segment.SetTag(p + "label_value", str(nodule.label_value))
    segment.SetTag(p + "point_ras_mm", ",".join(_fmt(v, 8) for v in nodule.point_ras_mm))
    tags = segment_tags(nodule)
    for key in [p + f.key for f in REPORTED_FIELDS] + [f"{p}size_correction.{k}" for k in SIZE_CORRECTION_TAGS]:
        if key not in tags:
            segment.RemoveTag(key)
    for key, value in tags.items():
        segment.SetTag(key, value)


def _import_mask_as_segment(mask, ijk_to_ras: np.ndarray, labelmapNode, segmentationNode) -> str:
    """Import one non-empty mask on the grid ``ijk_to_ras`` as a new segment; return its id.

    Args:
        mask: a :class:`NoduleMTLLib.core.consensus.MaskBox` (bool (dz, dy, dx) box + offset
            (k, j, i) on the grid; what ``NoduleResult.mask_box`` gives) or a full-grid bool
            (z, y, x) array.

    Only the mask's bounding box is handed to Slicer (a labelmap whose origin is moved by a
    whole number of voxels): the voxels stay on the reference grid, so nothing is
    resampled, and memory stays small for small nodules in a large CT.
    """
    if isinstance(mask, MaskBox):
        lo, box = list(mask.offset_zyx), mask.array  # (k, j, i)
    else:
        nz = np.nonzero(mask)
        lo = [int(a.min()) for a in nz]  # (k, j, i)
        hi = [int(a.max()) + 1 for a in nz]
        box = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shift = np.eye(4)
    shift[:3, 3] = (lo[2], lo[1], lo[0])  # voxel offset (i, j, k)
    labelmapNode.SetIJKToRASMatrix(_numpy_to_vtk_matrix(ijk_to_ras @ shift))
    slicer.util.updateVolumeFromArray(labelmapNode, box.astype(np.uint8))
    segmentation = segmentationNode.GetSegmentation()
    before = set(segmentation.GetSegmentIDs())
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode)
    new_ids = [s for s in segmentation.GetSegmentIDs() if s not in before]
    if not ok or len(new_ids) != 1:
        raise RuntimeError(f"Importing a nodule mask into '{segmentationNode.GetName()}' failed (new segments: {new_ids})")
    return new_ids[0]


def _add_table_column(table: vtk.vtkTable, array_class, name: str):
    arr = array_class()
    arr.SetName(name)
    table.AddColumn(arr)
    return arr


def _build_table(tableNode, result: AnalysisResult, segment_ids: dict[int, str]) -> None:
    """Fill ``tableNode`` with one row per nodule (see :func:`add_result_to_scene`)."""
    nan = math.nan
    nets = _network_ids(result)
    # (name, vtk array class, title, unit, description, getter)
    columns = [
        ("id", vtk.vtkIntArray, "Id", "", "Nodule number (order of the clicked points)", lambda n: n.id),
        ("label_value", vtk.vtkIntArray, "Label", "", "Voxel value in the label map export (0: not found)",
         lambda n: n.label_value if n.found else 0),
        ("name", vtk.vtkStringArray, "Name", "", "Segment name", lambda n: n.name),
        ("segment_id", vtk.vtkStringArray, "Segment ID", "", "Segment ID in the output segmentation",
         lambda n: segment_ids.get(n.id, "")),
        ("found", vtk.vtkIntArray, "Found", "", "1 if a nodule was segmented at the point", lambda n: int(bool(n.found))),
        ("point_ras_mm", vtk.vtkStringArray, "Point (RAS)", "mm", "Clicked point, world RAS (mm)",
         lambda n: ", ".join(f"{v:.2f}" for v in n.point_ras_mm)),
    ]
    columns += _field_columns()  # the reported fields (NoduleMTLLib.outputs.fields): measurements, P(malignant), Lung-RADS, Brock
    if any(getattr(n, "detection", None) for n in result.nodules):  # Find nodules: rows are ranked by this score
        def det(key):
            return lambda n: (n.detection or {}).get(key)
        columns += [
            ("detection.score", vtk.vtkDoubleArray, "Score", "",
             "Find nodules score (rows ranked by it): sqrt(detector score x false-positive-reduction probability) "
             "when the second stage ran, else the detector score", det("score")),
            ("detection.detector_score", vtk.vtkDoubleArray, "Detector score", "",
             "Score of the 2.5D Mask R-CNN (maskrcnn25d)", det("detector_score")),
            ("detection.fp_reduction_score", vtk.vtkDoubleArray, "FP-reduction score", "",
             "Probability that the candidate is a nodule, from the false-positive reduction (fpr25d)",
             det("fp_reduction_score")),
        ]
    columns += _report_columns()  # Brock status
    for f in raw_network_fields(nets):  # secondary: the networks' own outputs, labelled raw
        columns.append((f.key, vtk.vtkDoubleArray, f.title, f.unit, f.description, lambda n, f=f: f.value(n)))
    for net in nets:
        for sign in _sign_names(result, net):
            columns.append((
                f"networks.{net}.sign_probability.{sign}", vtk.vtkDoubleArray, f"P({sign}) {net}", "",
                f"Probability of the radiological sign '{sign}' estimated by {net}",
                lambda n, net=net, sign=sign: (n.networks[net].sign_probabilities or {}).get(sign) if net in n.networks else None,
            ))
    if len(nets) > 1:  # consensus of the click networks (NoduleMTLLib.core.consensus)
        def cons(attr):
            return lambda n: getattr(n.consensus, attr, None) if getattr(n, "consensus", None) is not None else None
        columns += [
            ("consensus.malignancy_probability", vtk.vtkDoubleArray, "P(malignant) consensus", "",
             "Mean malignancy probability of the networks that found the nodule (research use only)",
             cons("malignancy_probability")),
            ("consensus.probability_spread", vtk.vtkDoubleArray, "P spread", "",
             "Max - min of the networks' malignancy probabilities", cons("probability_spread")),
            ("consensus.dice_pairwise_mean", vtk.vtkDoubleArray, "Mask agreement (Dice)", "",
             "Mean pairwise Dice of the networks' masks", cons("dice_pairwise_mean")),
            ("consensus.disagreement", vtk.vtkStringArray, "Disagreement", "",
             "low / high: whether the networks disagree (probability spread or mask Dice beyond the thresholds "
             "of NoduleMTLLib.core.consensus)", cons("disagreement")),
        ]
    columns.append(("message", vtk.vtkStringArray, "Message", "", "Note from the analysis", lambda n: n.message or ""))

    table = tableNode.GetTable()
    arrays = []
    for name, cls, _title, _unit, _desc, getter in columns:
        arrays.append((_add_table_column(table, cls, name), cls, getter))
    for nodule in result.nodules:
        for arr, cls, getter in arrays:
            v = getter(nodule)
            if cls is vtk.vtkStringArray:
                arr.InsertNextValue("" if v is None else str(v))
            elif cls is vtk.vtkIntArray:
                arr.InsertNextValue(int(v))
            else:
                arr.InsertNextValue(nan if v is None else float(v))
    table.Modified()
    for name, _cls, title, unit, desc, _getter in columns:
        tableNode.SetColumnTitle(name, title)
        if unit:
            tableNode.SetColumnUnitLabel(name, unit)
        tableNode.SetColumnDescription(name, desc)
    if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):
        tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.Modified()


def _place_in_subject_hierarchy(scene, referenceVolumeNode, nodes) -> None:
    """Put ``nodes`` under the parent (study) of the reference volume, if the scene has a hierarchy."""
    shNode = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
    if shNode is None:
        return
    invalid = shNode.GetInvalidItemID()
    volumeItem = shNode.GetItemByDataNode(referenceVolumeNode)
    if volumeItem == invalid:
        return
    parentItem = shNode.GetItemParent(volumeItem)
    if parentItem == invalid:
        parentItem = shNode.GetSceneItemID()
    for node in nodes:
        item = shNode.GetItemByDataNode(node)
        if item == invalid:
            shNode.CreateItem(parentItem, node)
        else:
            shNode.SetItemParent(item, parentItem)


def add_result_to_scene(scene, result: AnalysisResult, referenceVolumeNode, segmentationName: str | None = None,
                        colorBy: str = "probability"):
    """Add an analysis result to the scene as a new segmentation node and a new table node.

    Nothing existing is modified: a NEW ``vtkMRMLSegmentationNode`` (default name
    ``"<volume name> nodules"``, made unique in the scene) and a NEW ``vtkMRMLTableNode``
    (``"<segmentation name> table"``) are created.

    Segmentation: reference image geometry taken from ``referenceVolumeNode``
    (``SetReferenceImageGeometryParameterFromVolumeNode``, as DICOM SEG export needs);
    one segment per nodule with ``found`` True and a non-empty mask, named
    ``NoduleResult.name`` ("Nodule N"), coloured by malignancy probability
    (:func:`probability_color` of the first network with a probability; ``colorBy="index"``:
    :data:`NODULE_COLORS` by nodule id), with the standard terminology
    :func:`nodule_terminology_entry` (codes of :data:`NoduleMTLLib.core.results.NODULE_TERMINOLOGY`) and the results
    as segment tags (prefix ``NoduleMTL.``): ``id``, ``label_value``, ``point_ras_mm``,
    ``diameter_mm``, ``short_axis_mm``, ``volume_mm3``, ``mean_hu``, ``solid_fraction``,
    ``type``, ``malignancy_probability.<network>``, ``sign_probability.<network>.<sign>``,
    ``dice_with_final.<network>`` (tags with unknown values are left out).  Masks are
    imported exactly (no resampling) through a temporary labelmap volume holding the
    mask's bounding box on the reference grid (one per nodule, so overlapping masks stay
    intact); the temporary node never enters the scene.  If the volume is under a linear parent
    transform, the segmentation is put under the same transform.

    Table: one row per nodule (found or not), columns ``id``, ``label_value`` (int; 0 when
    not found), ``name``, ``segment_id``, ``found`` (0/1), ``point_ras_mm`` (text "R, A, S"),
    ``diameter_mm``, ``short_axis_mm``, ``volume_mm3``, ``mean_hu``, ``solid_fraction``
    (double; NaN when unknown), ``type``, then per network
    ``networks.<id>.malignancy_probability`` and ``networks.<id>.sign_probability.<sign>``
    (double), and ``message``.  Column titles, units and descriptions are set.

    Both nodes reference each other (``NoduleMTL.table`` / ``NoduleMTL.segmentation``),
    carry the run description as attribute ``NoduleMTL.run`` (JSON), and are placed under
    the reference volume's parent item (its study) in the subject hierarchy, if the scene
    has one.

    Args:
        scene: the ``vtkMRMLScene`` holding ``referenceVolumeNode`` (None: the volume's scene).
        result: the :class:`NoduleMTLLib.core.results.AnalysisResult` of a run on this volume.
        referenceVolumeNode: the analysed ``vtkMRMLScalarVolumeNode``; masks are on its voxel grid.
        segmentationName: name of the new segmentation node (made unique); default
            ``"<volume name> nodules"``.
        colorBy: "probability" (default; legend: :func:`probability_legend`) or "index".

    Returns:
        ``(segmentationNode, tableNode)``.

    Raises:
        ValueError: no scene, an unknown ``colorBy``, the volume is not in ``scene``, or a mask's shape differs
            from the volume's ``(z, y, x)`` shape.
        NoduleMTLLib.core.io.InputError: the reference volume is not a usable scalar volume or
            is under a non-linear transform.
        RuntimeError: a mask could not be imported (the partial nodes are removed).
    """
    _check_volume_node(referenceVolumeNode, role="Reference")
    if colorBy not in ("probability", "index"):
        raise ValueError(f"colorBy must be 'probability' or 'index', got {colorBy!r}")
    if scene is None:
        scene = referenceVolumeNode.GetScene()
    if scene is None:
        raise ValueError("No MRML scene: the reference volume is not in a scene")
    if referenceVolumeNode.GetScene() is not scene:
        raise ValueError(f"Reference volume '{referenceVolumeNode.GetName()}' is not in the given scene")
    transform_to_world = _parent_transform_to_world(referenceVolumeNode)  # raises if non-linear
    shape = _volume_shape_zyx(referenceVolumeNode)
    for n in result.nodules:
        if n.found and n.mask_shape_zyx is not None and n.mask_shape_zyx != shape:
            raise ValueError(
                f"Mask of nodule {n.id} has shape {n.mask_shape_zyx}, volume '{referenceVolumeNode.GetName()}' "
                f"has (z, y, x) = {shape}: the result belongs to another volume"
            )

    baseName = segmentationName or f"{referenceVolumeNode.GetName()} nodules"
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(baseName))
    tableNode = None
    try:
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)

        labelmapNode = slicer.vtkMRMLLabelMapVolumeNode()  # temporary, never added to the scene
        ijk_to_ras = _ijk_to_ras_local(referenceVolumeNode)
        segment_ids: dict[int, str] = {}
        segmentation = segmentationNode.GetSegmentation()
        wasModifying = segmentationNode.StartModify()
        try:
            for nodule in result.nodules:
                box = nodule.mask_box if nodule.found else None  # bounding box: no CT-sized array per nodule
                if box is None:
                    continue
                segmentId = _import_mask_as_segment(box, ijk_to_ras, labelmapNode, segmentationNode)
                segment = segmentation.GetSegment(segmentId)
                segment.SetName(nodule.name)
                segment.SetColor(*_nodule_color(nodule, _network_ids(result), colorBy))
                _set_segment_terminology(segment)
                _set_segment_result_tags(segment, nodule)
                segment_ids[nodule.id] = segmentId
        finally:
            segmentationNode.EndModify(wasModifying)
            del labelmapNode

        if transform_to_world is not None:
            segmentationNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())

        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{segmentationNode.GetName()} table"))
        _build_table(tableNode, result, segment_ids)

        runJson = json.dumps(result.run or {}, default=str, allow_nan=False)
        for node in (segmentationNode, tableNode):
            node.SetAttribute(SEGMENT_TAG_PREFIX + "run", runJson)
        segmentationNode.SetNodeReferenceID(SEGMENT_TAG_PREFIX + "table", tableNode.GetID())
        tableNode.SetNodeReferenceID(SEGMENT_TAG_PREFIX + "segmentation", segmentationNode.GetID())

        _place_in_subject_hierarchy(scene, referenceVolumeNode, (segmentationNode, tableNode))
    except Exception:
        for node in (tableNode, segmentationNode):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        raise
    return segmentationNode, tableNode


def _numpy_to_vtk_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


# ---------------------------------------------------------------------------
# segment -> mask
# ---------------------------------------------------------------------------

def _segment_is_empty(segment) -> bool:
    """True if the segment's binary labelmap holds no voxel of its label (e.g. erased in Segment Editor)."""
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    image = segment.GetRepresentation(name)
    if image is None:
        return False  # no labelmap yet (another master representation): let the export convert it
    scalars = image.GetPointData().GetScalars() if not image.IsEmpty() else None
    if scalars is None:
        return True
    return not np.any(numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue())


def label_array_from_segmentation(segmentationNode, segmentId: str, referenceVolumeNode) -> np.ndarray:
    """Binary mask of one segment on the voxel grid of a reference volume.

    Used to re-classify a nodule after the user edited its segment: the returned array
    has exactly the geometry of ``NoduleResult.mask`` for that volume.  The segment is
    exported through a temporary labelmap node (removed again, together with any display
    or colour node the export adds) with the reference volume's full extent; transforms between the segmentation and the volume are applied
    by Slicer (resampling with nearest neighbour if the grids differ).

    Args:
        segmentationNode: ``vtkMRMLSegmentationNode`` holding the segment.
        segmentId: segment ID (not name; see ``GetSegmentIdBySegmentName``).
        referenceVolumeNode: volume that defines the output grid.

    Returns:
        bool array of shape ``(z, y, x)`` of the reference volume (all False if the segment is empty).

    Raises:
        ValueError: a node is None, the segmentation is not in a scene, or the segment
            does not exist.
        RuntimeError: the export failed.
    """
    if segmentationNode is None or referenceVolumeNode is None:
        raise ValueError("Segmentation node and reference volume node are required")
    if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no segment with ID '{segmentId}'")
    shape = _volume_shape_zyx(referenceVolumeNode)
    scene = segmentationNode.GetScene()
    if scene is None:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' is not in a scene")
    if _segment_is_empty(segmentationNode.GetSegmentation().GetSegment(segmentId)):
        return np.zeros(shape, bool)  # (exporting an erased segment fails inside Slicer)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    # The export needs the labelmap in the scene; it may also add a display node and a
    # colour table.  Every node added during the export is removed afterwards.
    nodesBefore = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__NoduleMTL_export"))
    labelmapNode.SetHideFromEditors(True)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmapNode, referenceVolumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        image = labelmapNode.GetImageData()
        if not ok or image is None or image.GetPointData().GetScalars() is None:
            raise RuntimeError(f"Exporting segment '{segmentId}' of '{segmentationNode.GetName()}' failed")
        i, j, k = image.GetDimensions()
        scalars = image.GetPointData().GetScalars()
        array = np.array(numpy_support.vtk_to_numpy(scalars).reshape((k, j, i)) != 0, copy=True)
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in nodesBefore and node is not labelmapNode:
                scene.RemoveNode(node)
        if labelmapNode.GetScene() is scene:
            scene.RemoveNode(labelmapNode)
    if array.shape != shape:
        raise RuntimeError(f"Exported segment has shape {array.shape}, reference volume {shape}")
    return array


# ---------------------------------------------------------------------------
# malignancy-probability colours
# ---------------------------------------------------------------------------

#: The colour ramp (see :mod:`NoduleMTLLib.outputs.colors`): green ``p < 0.3``, yellow
#: ``0.3 <= p < 0.6``, red ``p >= 0.6``, grey unknown.  Display only, not a clinical cut-off.
PROBABILITY_COLOR_THRESHOLDS = _colors.PROBABILITY_COLOR_THRESHOLDS
PROBABILITY_COLORS = _colors.PROBABILITY_COLORS


def probability_color(probability) -> tuple[float, float, float]:
    """Segment colour (RGB in [0, 1]) of a malignancy probability, see :data:`PROBABILITY_COLORS`.

    Args:
        probability: P(malignant) in [0, 1], or None / NaN when unknown (-> grey).

    Raises:
        ValueError: a number outside [0, 1].
    """
    return _colors.probability_color(probability)


def probability_legend() -> str:
    """One-line legend of the colour ramp for the module panel, e.g.
    ``"Segment colour = the reported (calibrated) P(malignant): green < 0.3 <= yellow < 0.6 <= red; grey = unknown
    (research use only, not a clinical threshold)"``."""
    return _colors.probability_legend()


def _nodule_color(nodule: NoduleResult, network_order, colorBy: str) -> tuple[float, float, float]:
    if colorBy == "index":
        return NODULE_COLORS[(nodule.id - 1) % len(NODULE_COLORS)]
    return reported_color(nodule)  # the reported (calibrated) probability, as in every output


# ---------------------------------------------------------------------------
# terminology resource
# ---------------------------------------------------------------------------

def terminology_file() -> str:
    """Path of ``Resources/NoduleMTL.term.json`` (beside this file when installed, one folder up
    in a source checkout).  Raises FileNotFoundError if neither exists."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "Resources", TERMINOLOGY_FILE_NAME),
                 os.path.join(os.path.dirname(here), "Resources", TERMINOLOGY_FILE_NAME)):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"{TERMINOLOGY_FILE_NAME} not found in Resources/ beside or above {here}")


def register_terminology(terminologiesLogic) -> str:
    """Load NoduleMTL's terminology context (``Resources/NoduleMTL.term.json``) into the
    Terminologies module logic, once, and use it for the segments created from then on.

    The context holds one category, *Morphologically Altered Structure* (SCT 49755003),
    with one type, *Nodule* (SCT 27925004; Slicer label "lung nodule"), the codes of
    :data:`NoduleMTLLib.core.results.NODULE_TERMINOLOGY`; the anatomic region *Lung* (SCT
    39607008) comes from the DICOM master list Slicer ships.  Without this call (no
    Terminologies logic, e.g. a bare scene) segments get the same codes under the
    3D Slicer General Anatomy context name.

    Args:
        terminologiesLogic: ``vtkSlicerTerminologiesModuleLogic`` (in Slicer:
            ``slicer.modules.terminologies.logic()``).

    Returns:
        the context name, :data:`TERMINOLOGY_CONTEXT_NAME`.

    Raises:
        ValueError: ``terminologiesLogic`` is None.
        RuntimeError: the file could not be loaded.
    """
    global _registered_context
    if terminologiesLogic is None:
        raise ValueError("Terminologies logic is None")
    if not terminologiesLogic.IsTerminologyContextLoaded(TERMINOLOGY_CONTEXT_NAME):
        name = terminologiesLogic.LoadTerminologyFromFile(terminology_file())
        if name != TERMINOLOGY_CONTEXT_NAME:
            raise RuntimeError(f"Loading {terminology_file()} gave context {name!r}, expected {TERMINOLOGY_CONTEXT_NAME!r}")
    _registered_context = TERMINOLOGY_CONTEXT_NAME
    return TERMINOLOGY_CONTEXT_NAME


def nodule_terminology_entry() -> str:
    """Terminology entry string given to nodule segments: the NoduleMTL context after
    :func:`register_terminology`, otherwise :data:`NoduleMTLLib.core.results.NODULE_TERMINOLOGY`
    (same codes either way)."""
    if _registered_context is None:
        return NODULE_TERMINOLOGY
    return _registered_context + NODULE_TERMINOLOGY[NODULE_TERMINOLOGY.index("~"):]


# ---------------------------------------------------------------------------
# refinement loop: re-classify an edited segment, export it for training
# ---------------------------------------------------------------------------

def _get_tag(segment, key: str) -> str | None:
    out = vtk.reference("")
    return str(out) if segment.GetTag(key, out) else None


def _run_networks(segmentationNode) -> list[str]:
    try:
        run = json.loads(segmentationNode.GetAttribute(SEGMENT_TAG_PREFIX + "run") or "{}")
    except ValueError:
        return []
    return [str(n) for n in run.get("networks", []) if isinstance(n, str)]


def _table_row(tableNode, segmentId: str, noduleId: int | None) -> int:
    """Row of the nodule in a results table (by segment ID, then by id); -1 if absent."""
    table = tableNode.GetTable()
    seg_col, id_col = table.GetColumnByName("segment_id"), table.GetColumnByName("id")
    for row in range(table.GetNumberOfRows()):
        if seg_col is not None and seg_col.GetValue(row) == segmentId:
            return row
    if noduleId is not None and id_col is not None:
        for row in range(table.GetNumberOfRows()):
            if int(id_col.GetValue(row)) == noduleId:
                return row
    return -1


def _table_set(tableNode, row: int, name: str, value, array_class=vtk.vtkDoubleArray, title=None, desc=None) -> None:
    """Set one cell, adding the column (NaN / empty elsewhere) if the table does not have it."""
    table = tableNode.GetTable()
    arr = table.GetColumnByName(name)
    if arr is None:
        arr = array_class()
        arr.SetName(name)
        for _ in range(table.GetNumberOfRows()):
            if array_class is vtk.vtkStringArray:
                arr.InsertNextValue("")
            else:
                arr.InsertNextValue(math.nan if array_class is vtk.vtkDoubleArray else 0)
        table.AddColumn(arr)
        if title:
            tableNode.SetColumnTitle(name, title)
        if desc:
            tableNode.SetColumnDescription(name, desc)
    if isinstance(arr, vtk.vtkStringArray):
        arr.SetValue(row, "" if value is None else str(value))
    elif isinstance(arr, vtk.vtkIntArray):
        arr.SetValue(row, int(value or 0))
    else:
        arr.SetValue(row, math.nan if value is None else float(value))


def _update_table_row(tableNode, segmentId: str, result: NoduleResult) -> int:
    table = tableNode.GetTable()
    row = _table_row(tableNode, segmentId, result.id)
    if row < 0:  # a segment the run did not create (e.g. drawn by the user): new row
        row = table.InsertNextBlankRow()
        _table_set(tableNode, row, "id", result.id, vtk.vtkIntArray)
        _table_set(tableNode, row, "name", result.name, vtk.vtkStringArray)
        _table_set(tableNode, row, "segment_id", segmentId, vtk.vtkStringArray)
        _table_set(tableNode, row, "point_ras_mm", ", ".join(f"{v:.2f}" for v in result.point_ras_mm), vtk.vtkStringArray)
    _table_set(tableNode, row, "found", 1, vtk.vtkIntArray)
    for name, cls, title, _unit, desc, getter in _field_columns() + _report_columns():
        _table_set(tableNode, row, name, getter(result), cls, title=title, desc=desc)
    for f in raw_network_fields(result.networks):
        _table_set(tableNode, row, f.key, f.value(result), title=f.title, desc=f.description)
    for net, out in result.networks.items():
        for sign, prob in (out.sign_probabilities or {}).items():
            _table_set(tableNode, row, f"networks.{net}.sign_probability.{sign}", prob, title=f"P({sign}) {net}",
                       desc=f"Probability of the radiological sign '{sign}' estimated by {net}")
    if table.GetColumnByName("consensus.malignancy_probability") is not None and result.mask_shape_zyx is not None:
        # every network now classified the same (edited) mask: agreement is about probabilities only
        from NoduleMTLLib.core.consensus import compute_consensus
        box = result.mask_box
        c = compute_consensus({net: box for net in result.networks},
                              {net: out.malignancy_probability for net, out in result.networks.items()})
        for key, value, cls in (("consensus.malignancy_probability", c.malignancy_probability, None),
                                ("consensus.probability_spread", c.probability_spread, None),
                                ("consensus.dice_pairwise_mean", c.dice_pairwise_mean, None),
                                ("consensus.disagreement", c.disagreement or "", vtk.vtkStringArray)):
            _table_set(tableNode, row, key, value, *((cls,) if cls else ()))
    _table_set(tableNode, row, "message", result.message, vtk.vtkStringArray)
    table.Modified()
    tableNode.Modified()
    return row


def reclassify_segment(scene, segmentationNode, segmentId: str, referenceVolumeNode, tableNode=None,
                       network_ids=None, networks: dict | None = None, device: str = "auto") -> NoduleResult:
    """Re-measure and re-classify a (possibly user-edited) nodule segment without re-segmenting.

    Reads the segment with :func:`label_array_from_segmentation` on the reference volume's
    grid, calls :func:`NoduleMTLLib.inference.refine.reclassify_from_mask` (measurements of the edited
    mask; each network's malignancy / sign probabilities from the edited mask - MT-Net's
    Class-net takes it as its mask channel, the others are run on the slices it covers and
    weighted by its area), then updates:

    * the segment's ``NoduleMTL.*`` tags (measurements, probabilities; ``dice_with_final.*``
      removed since the mask is no longer a network's; ``NoduleMTL.reclassified`` = "1"
      and ``NoduleMTL.message``) and its colour (probability ramp,
      :func:`probability_color`);
    * that nodule's row of the results table (found by segment ID, then by nodule id; a
      new row for a segment the run did not create), adding columns for networks the
      original run did not have.

    The segment's binary labelmap (the user's edit) is never modified, nor its name or
    terminology, nor any other segment.

    Args:
        scene: the ``vtkMRMLScene`` (None: the segmentation's scene).
        segmentationNode, segmentId: the segment to re-classify (segment ID, not name).
        referenceVolumeNode: the analysed CT volume (its grid defines the mask).
        tableNode: results table to update (None: the table referenced by the segmentation
            as ``NoduleMTL.table``; no table at all is allowed, then only tags change).
        network_ids: networks to run (None: those of the original run, ``NoduleMTL.run``;
            ``[registry.DEFAULT_NETWORK]`` if unknown).
        networks: optional pre-loaded ``{id: torch module}``.
        device: "auto" | "cpu" | "cuda" | "mps".

    Returns:
        the new :class:`NoduleMTLLib.core.results.NoduleResult` (``id`` = the segment's
        ``NoduleMTL.id`` tag, else the segment's position + 1; ``point_lps_mm`` = the
        original click from ``NoduleMTL.point_ras_mm``, else the mask centroid).

    Raises:
        ValueError: missing nodes, segmentation not in ``scene``, unknown segment.
        NoduleMTLLib.core.io.InputError: empty segment, bad volume, unknown network.
        NoduleMTLLib.models.registry.WeightsError, NoduleMTLLib.core.device.DeviceError: as for a run.
    """
    from NoduleMTLLib.service.analysis import ModelCache, reclassify

    request = reclassification_request(scene, segmentationNode, segmentId, referenceVolumeNode, tableNode, network_ids)
    ct = volume_node_to_ct(referenceVolumeNode)
    # the analysis service: raw outputs, then the reported (calibrated) probability and Lung-RADS / Brock
    result = reclassify(ct, [request["mask"]], nodule_ids=[request["nodule_id"]], points_lps=[request["point_lps"]],
                        network_ids=request["network_ids"], device=device, models=ModelCache(networks=networks)).nodules[0]
    apply_reclassification(segmentationNode, segmentId, request["table"], result, request["network_ids"])
    return result


def reclassification_request(scene, segmentationNode, segmentId: str, referenceVolumeNode, tableNode=None,
                             network_ids=None) -> dict:
    """What re-classifying a segment needs, read from the scene (the first half of
    :func:`reclassify_segment`; the module's worker computes, :func:`apply_reclassification` writes).

    Returns:
        ``{"mask": bool (z, y, x) on the reference grid, "network_ids": [...], "nodule_id": int,
        "point_lps": (x, y, z) or None, "table": the results table node or None}``.

    Raises:
        ValueError / InputError: as :func:`reclassify_segment`.
    """
    from NoduleMTLLib.models.registry import DEFAULT_NETWORK

    if segmentationNode is None or referenceVolumeNode is None:
        raise ValueError("Segmentation node and reference volume node are required")
    scene = scene or segmentationNode.GetScene()
    if scene is None or segmentationNode.GetScene() is not scene:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' is not in the given scene")
    segmentation = segmentationNode.GetSegmentation()
    segment = segmentation.GetSegment(segmentId)
    if segment is None:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no segment with ID '{segmentId}'")
    if tableNode is None:
        tableNode = segmentationNode.GetNodeReference(SEGMENT_TAG_PREFIX + "table")
    ids = list(network_ids) if network_ids else (_run_networks(segmentationNode) or [DEFAULT_NETWORK])
    tag_id = _get_tag(segment, SEGMENT_TAG_PREFIX + "id")
    nodule_id = int(tag_id) if tag_id else segmentation.GetSegmentIndex(segmentId) + 1
    point_lps = None
    tag_point = _get_tag(segment, SEGMENT_TAG_PREFIX + "point_ras_mm")
    if tag_point:
        r, a, s_ = (float(v) for v in tag_point.split(","))
        point_lps = (-r, -a, s_)

    mask = label_array_from_segmentation(segmentationNode, segmentId, referenceVolumeNode)
    if not mask.any():
        raise InputError(f"Segment '{segment.GetName()}' is empty: nothing to re-classify")
    return {"mask": mask, "network_ids": ids, "nodule_id": nodule_id, "point_lps": point_lps, "table": tableNode}


def apply_reclassification(segmentationNode, segmentId: str, tableNode, result: NoduleResult, network_ids) -> None:
    """Write a re-classification ``result`` into the segment's tags and colour and its table
    row (the second half of :func:`reclassify_segment`); the segment's voxels are not touched."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no segment with ID '{segmentId}'")
    ids = list(network_ids)
    p = SEGMENT_TAG_PREFIX
    for net in ids:
        segment.RemoveTag(f"{p}dice_with_final.{net}")
    for net in _run_networks(segmentationNode):
        segment.RemoveTag(f"{p}dice_with_final.{net}")
    _set_segment_result_tags(segment, result)
    segment.SetTag(p + "reclassified", "1")
    segment.SetTag(p + "message", result.message)
    segment.SetColor(*reported_color(result))
    if tableNode is not None:
        _update_table_row(tableNode, segmentId, result)


def _patient_id(volumeNode) -> str | None:
    scene = volumeNode.GetScene()
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if sh is None:
        return None
    item = sh.GetItemByDataNode(volumeNode)
    invalid = sh.GetInvalidItemID()
    while item not in (invalid, sh.GetSceneItemID()):
        if sh.GetItemLevel(item) == "Patient":
            return sh.GetItemAttribute(item, "DICOM.PatientID") or sh.GetItemUID(item, "DICOM") or sh.GetItemName(item)
        item = sh.GetItemParent(item)
    return None


def export_segment_for_training(segmentationNode, segmentId: str, referenceVolumeNode, out_dir,
                                labels: dict | None = None, case_id: str | None = None,
                                overwrite: bool = False) -> dict:
    """Write a (possibly user-edited) segment with its CT patch and labels for fine-tuning.

    Calls :func:`NoduleMTLLib.inference.refine.export_for_training` with the segment's mask on the
    reference grid: ``<out_dir>/<case_id>_ct.nrrd`` (HU crop around the mask, LPS
    geometry kept), ``<out_dir>/<case_id>_mask.nrrd`` and a row in
    ``<out_dir>/labels.csv``, readable by ``training.data.load_user_cases``.  Nothing in the
    scene is modified.

    Args:
        segmentationNode, segmentId, referenceVolumeNode: as :func:`reclassify_segment`.
        out_dir: output folder (created).
        labels: annotator labels, e.g. ``{"malignancy": 4, "spiculation": 2, "patient_id": "X"}``
            (keys: see ``NoduleMTLLib.inference.refine.LABEL_KEYS``); ``patient_id`` defaults to the
            volume's patient in the subject hierarchy (DICOM PatientID or item name), if any.
        case_id: unique case name (default ``"<volume name>_<segment name>"``, made file-name safe).
        overwrite: replace an existing case of that name.

    Returns:
        ``{"image": Path, "mask": Path, "labels_csv": Path, "case_id": str}``.

    Raises:
        ValueError: missing nodes, unknown segment.
        NoduleMTLLib.core.io.InputError: empty segment, bad labels, case id already exported.
        OSError: the folder cannot be written.
    """
    from NoduleMTLLib.inference.refine import export_for_training

    if segmentationNode is None or referenceVolumeNode is None:
        raise ValueError("Segmentation node and reference volume node are required")
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no segment with ID '{segmentId}'")
    mask = label_array_from_segmentation(segmentationNode, segmentId, referenceVolumeNode)
    ct = volume_node_to_ct(referenceVolumeNode)
    labels = dict(labels or {})
    if not labels.get("patient_id"):
        pid = _patient_id(referenceVolumeNode)
        if pid:
            labels["patient_id"] = pid
    cid = case_id or f"{referenceVolumeNode.GetName()}_{segment.GetName()}"
    return export_for_training(ct, mask, labels, out_dir, cid, overwrite=overwrite)


# ---------------------------------------------------------------------------
# the radiologist's report (issue 15): Lung-RADS / Brock columns, per-scan category, Export report
# ---------------------------------------------------------------------------

def _brock_status(brock: dict | None) -> str:
    if not brock:
        return ""
    if brock.get("probability") is None:
        return "incomplete: " + ", ".join(brock.get("missing", [])) + " unknown"
    if brock.get("assumed"):
        return "lower bound: " + ", ".join(brock["assumed"]) + " assumed no"
    return "complete"


def _field_columns() -> list:
    """Results-table columns of the reported fields (:data:`NoduleMTLLib.outputs.fields.REPORTED_FIELDS`),
    ``(name, vtk array class, title, unit, description, getter)``."""
    from NoduleMTLLib.outputs.fields import REPORTED_FIELDS

    cls = {"float": vtk.vtkDoubleArray, "int": vtk.vtkIntArray, "str": vtk.vtkStringArray}
    return [(f.key, cls[f.kind], f.title, f.unit, f.description,
             (lambda n, f=f: f.value(n) if f.value(n) is not None else "") if f.kind == "str" else (lambda n, f=f: f.value(n)))
            for f in REPORTED_FIELDS]


def _report_columns() -> list:
    """The Brock status column of the results table (``_build_table`` layout; the Lung-RADS and
    Brock values are reported fields, :func:`_field_columns`)."""
    return [
        ("brock.status", vtk.vtkStringArray, "Brock inputs", "", "complete / lower bound (inputs assumed no) / incomplete",
         lambda n: _brock_status(getattr(n, "brock", None))),
    ]


def scan_lung_rads_text(run: dict | None) -> str:
    """Panel line of the per-scan Lung-RADS category (``run["lung_rads"]``), "" when there is none."""
    s = (run or {}).get("lung_rads")
    if not s:
        return ""
    ids = ", ".join(str(i) for i in s.get("nodule_ids", []))
    return f"Lung-RADS (per scan, baseline rules): {s['category']} (nodule {ids}); research software, not for clinical use"


def _set_report_cells(tableNode, segmentId: str, nodule: NoduleResult) -> None:
    row = _table_row(tableNode, segmentId, nodule.id)
    if row < 0:
        return
    for name, cls, title, _unit, desc, getter in _field_columns() + _report_columns():
        _table_set(tableNode, row, name, getter(nodule), cls, title=title, desc=desc)
    tableNode.GetTable().Modified()
    tableNode.Modified()


def result_from_segmentation(segmentationNode, referenceVolumeNode, ct: CTVolume | None = None) -> AnalysisResult:
    """The nodules of a NoduleMTL segmentation as they are now (masks possibly edited).

    Masks from the segments on the reference grid, measurements recomputed on them (with the run's
    size correction while a segment's mask is unedited: :func:`NoduleMTLLib.core.postprocess.measure_again`), the
    networks' probabilities and the point from the segment tags (what the run or the last
    re-classification wrote), the run from the node's ``NoduleMTL.run`` attribute.

    Raises:
        ValueError: no segmentation / volume, or no non-empty NoduleMTL segment.
    """
    from NoduleMTLLib.core.postprocess import measure_again
    from NoduleMTLLib.core.results import NetworkOutput
    from NoduleMTLLib.outputs.fields import SIZE_CORRECTION_TAGS

    if segmentationNode is None or referenceVolumeNode is None:
        raise ValueError("Segmentation node and reference volume node are required")
    ct = ct or volume_node_to_ct(referenceVolumeNode)
    try:
        run = json.loads(segmentationNode.GetAttribute(SEGMENT_TAG_PREFIX + "run") or "{}")
    except ValueError:
        run = {}
    seg = segmentationNode.GetSegmentation()
    nodules, segment_ids = [], {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        segment = seg.GetSegment(sid)
        nid = _get_tag(segment, SEGMENT_TAG_PREFIX + "id")
        mask = label_array_from_segmentation(segmentationNode, sid, referenceVolumeNode)
        if nid is None or not mask.any():
            continue
        corr = {k: _get_tag(segment, f"{SEGMENT_TAG_PREFIX}size_correction.{k}") for k in SIZE_CORRECTION_TAGS}
        corr = {k: float(v) for k, v in corr.items() if v is not None} or None
        m = measure_again(mask, ct, corr)  # the run's size correction while the mask is unedited
        nets = {}
        p = SEGMENT_TAG_PREFIX + "malignancy_probability."
        for net in _run_networks(segmentationNode) or []:
            prob = _get_tag(segment, p + net)
            if prob is not None:
                signs = {}
                for sign in ("spiculation", "lobulation", "calcification", "subsolid", "bubble_lucency"):
                    v = _get_tag(segment, f"{SEGMENT_TAG_PREFIX}sign_probability.{net}.{sign}")
                    if v is not None:
                        signs[sign] = float(v)
                nets[net] = NetworkOutput(net, float(prob), signs)
        ras = _get_tag(segment, SEGMENT_TAG_PREFIX + "point_ras_mm")
        r = [float(v) for v in ras.split(",")] if ras else [-c for c in m["centroid_lps_mm"][:2]] + [m["centroid_lps_mm"][2]]
        nd = NoduleResult(id=int(nid), point_lps_mm=(-r[0], -r[1], r[2]), found=True, mask=mask, networks=nets,
                          **{k: m[k] for k in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu", "solid_fraction",
                                               "type", "centroid_lps_mm", "size_correction")})
        nodules.append(nd)
        segment_ids[nd.id] = sid
    if not nodules:
        raise ValueError(f"'{segmentationNode.GetName()}' has no non-empty NoduleMTL nodule segment")
    nodules.sort(key=lambda n: n.id)
    from NoduleMTLLib.core.results import run_record
    # the export's own run record (every RunRecord field), the analysing run's settings after it
    old = {k: v for k, v in run.items() if k not in ("software", "mode", "torch", "timing_s", "malignancy_probability",
                                                      "lung_rads", "patient")}
    res = AnalysisResult(ct.describe(), run_record("export", run.get("networks") or [], run.get("device") or "cpu",
                                                   run.get("reported_mask") or "given", **{
                                                       k: v for k, v in old.items()
                                                       if k not in ("networks", "device", "reported_mask")},
                                                   analysis_mode=run.get("mode")), nodules)
    res.segment_ids = segment_ids
    return res


def export_report(segmentationNode, referenceVolumeNode, out_dir, dicom_folder=None, patient=None,
                  pictures: bool = True, tableNode=None) -> list:
    """"Export report": pictures + ``report.html`` for any volume; ``segmentation.dcm`` +
    ``report.sr.dcm`` (TID 1500) as well for a DICOM-loaded volume whose series folder is given.

    The nodules are taken as they are now (:func:`result_from_segmentation`); Lung-RADS and
    Brock are recomputed on the current masks (:func:`NoduleMTLLib.service.assessment.annotate_result`)
    and written into the results table's Lung-RADS / Brock columns (``tableNode``, default
    the segmentation's ``NoduleMTL.table`` reference).  Also writes ``nodules.json``.

    Args:
        segmentationNode, referenceVolumeNode: the NoduleMTL segmentation and its CT volume.
        out_dir: output folder (created).
        dicom_folder: folder holding the volume's DICOM series (the volume must carry its
            SeriesInstanceUID in the subject hierarchy); None: no SEG / SR.
        patient: :class:`NoduleMTLLib.clinical.brock.PatientInfo` (default: the DICOM header of
            ``dicom_folder``, else unknown: Brock incomplete).
        pictures: write ``pictures/nodule_<id>.png`` and embed them.

    Returns:
        The written paths.

    Raises:
        ValueError: no nodule segment.  NoduleMTLLib.core.io.InputError: ``dicom_folder`` given for a
        volume not loaded from DICOM, or not holding its series.  OSError /
        NoduleMTLLib.outputs.files.OutputError: the folder cannot be written.
    """
    from pathlib import Path

    from NoduleMTLLib.outputs.writer import WriteOptions, write_result_set
    from NoduleMTLLib.service.analysis import complete_result

    ct = volume_node_to_ct(referenceVolumeNode)
    if dicom_folder is not None:
        if ct.dicom_series_uid is None:
            raise InputError(f"'{referenceVolumeNode.GetName()}' was not loaded from DICOM: no DICOM SEG / SR")
        ct.source = str(dicom_folder)
    result = result_from_segmentation(segmentationNode, referenceVolumeNode, ct)
    # the service's part: the reported probability of the current masks, Lung-RADS and Brock
    complete_result(result, ct, patient)
    paths = write_result_set(result, ct, out_dir, WriteOptions(
        overwrite=True, dicom_seg=dicom_folder is not None, dicom_sr=dicom_folder is not None, pictures=pictures,
        dicom_folder=dicom_folder))
    tableNode = tableNode or segmentationNode.GetNodeReference(SEGMENT_TAG_PREFIX + "table")
    if tableNode is not None:
        for n in result.nodules:
            _set_report_cells(tableNode, result.segment_ids[n.id], n)
    return [Path(p) for p in paths if p is not None]
