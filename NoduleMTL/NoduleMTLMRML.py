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

The layer is split by responsibility into three modules; this one is the entry point that the
Slicer module, the web reviewer and the tests import, and re-exports their names:

* :mod:`NoduleMTLMRMLNodes` - scene nodes <-> NoduleMTLLib records (volume -> ``CTVolume``,
  markups -> points, segment -> mask);
* :mod:`NoduleMTLMRMLScene` - an analysis in the scene (segments, tags, table, colours,
  terminology);
* :mod:`NoduleMTLMRMLExport` - re-classification of an edited segment and the exports.

Module state (the registered terminology context) lives in :mod:`NoduleMTLMRMLScene`.  Private helpers
are re-exported only where the Slicer module's tests use them.
"""

from __future__ import annotations

from NoduleMTLMRMLExport import (  # noqa: F401 - re-exported
    apply_reclassification,
    export_report,
    export_segment_for_training,
    reclassification_request,
    reclassify_segment,
    result_from_segmentation,
)
from NoduleMTLMRMLNodes import (  # noqa: F401 - re-exported
    _dicom_series_uid,
    _ijk_to_ras_local,
    label_array_from_segmentation,
    markups_to_points_lps,
    volume_node_to_ct,
)
from NoduleMTLMRMLScene import (  # noqa: F401 - re-exported
    NODULE_COLORS,
    PROBABILITY_COLOR_THRESHOLDS,
    PROBABILITY_COLORS,
    SEGMENT_TAG_PREFIX,
    TERMINOLOGY_CONTEXT_NAME,
    TERMINOLOGY_FILE_NAME,
    _get_tag,
    _import_mask_as_segment,
    add_result_to_scene,
    nodule_terminology_entry,
    probability_color,
    probability_legend,
    register_terminology,
    scan_lung_rads_text,
    terminology_file,
)

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
    "reclassification_request",
    "apply_reclassification",
    "result_from_segmentation",
    "export_report",
    "scan_lung_rads_text",
    "terminology_file",
    "PROBABILITY_COLORS",
    "PROBABILITY_COLOR_THRESHOLDS",
]
