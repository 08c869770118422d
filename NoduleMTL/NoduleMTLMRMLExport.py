"""Re-classifying an edited segment (through the analysis service) and exporting: a segment for
fine-tuning, the segmentation back to an ``AnalysisResult``, the full result set (the one writer).
Part of the MRML layer (:mod:`NoduleMTLMRML`): no Qt, no ``slicer.app`` / ``slicer.mrmlScene``.
"""

from __future__ import annotations

import json

from NoduleMTLMRMLNodes import label_array_from_segmentation, volume_node_to_ct
from NoduleMTLMRMLScene import SEGMENT_TAG_PREFIX, _get_tag, _run_networks, _set_report_cells, _set_segment_result_tags, _update_table_row

from NoduleMTLLib.core.io import CTVolume, InputError
from NoduleMTLLib.core.results import AnalysisResult, NoduleResult
from NoduleMTLLib.outputs.fields import reported_color


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
                        network_ids=request["network_ids"], device=device, models=ModelCache(networks=networks),
                        size_corrections=[request["size_correction"]]).nodules[0]
    apply_reclassification(segmentationNode, segmentId, request["table"], result, request["network_ids"])
    return result


def reclassification_request(scene, segmentationNode, segmentId: str, referenceVolumeNode, tableNode=None,
                             network_ids=None) -> dict:
    """What re-classifying a segment needs, read from the scene (the first half of
    :func:`reclassify_segment`; the module's worker computes, :func:`apply_reclassification` writes).

    Returns:
        ``{"mask": bool (z, y, x) on the reference grid, "network_ids": [...], "nodule_id": int,
        "point_lps": (x, y, z) or None, "size_correction": the run's size correction of the segment
        (``NoduleMTL.size_correction.*`` tags; kept by the service while the mask is unchanged) or None,
        "table": the results table node or None}``.

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
    return {"mask": mask, "network_ids": ids, "nodule_id": nodule_id, "point_lps": point_lps,
            "size_correction": _size_correction_tags(segment), "table": tableNode}


def _size_correction_tags(segment) -> dict | None:
    """The ``NoduleMTL.size_correction.*`` tags of a segment as numbers (None when it has none)."""
    from NoduleMTLLib.outputs.fields import SIZE_CORRECTION_TAGS

    corr = {k: _get_tag(segment, f"{SEGMENT_TAG_PREFIX}size_correction.{k}") for k in SIZE_CORRECTION_TAGS}
    return {k: float(v) for k, v in corr.items() if v is not None} or None


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
        m = measure_again(mask, ct, _size_correction_tags(segment))  # the run's size correction while the mask is unedited
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
