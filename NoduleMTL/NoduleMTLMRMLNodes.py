"""MRML nodes <-> NoduleMTLLib records: a scalar volume node -> ``CTVolume`` (with a linear parent
transform folded into the geometry), a markups node -> LPS points, a segment -> a bool (z, y, x)
mask on a reference volume's grid.  Part of the MRML layer (:mod:`NoduleMTLMRML`); the same rules:
``slicer`` MRML classes, ``vtk`` and numpy only, no Qt, no ``slicer.app`` / ``slicer.mrmlScene``.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from NoduleMTLLib.core.io import CTVolume, InputError, image_from_array

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
