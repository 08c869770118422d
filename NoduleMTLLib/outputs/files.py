"""Writing an analysis to a folder: labels.nrrd, segmentation.seg.nrrd, nodules.json, nodules.csv.

:func:`read_outputs` reads such a folder back (the Slicer module's background run).

All files are first written into a hidden temporary folder beside the output folder and
moved into place only when every one of them was written: a failure leaves no partial
output (files of an earlier run in the folder are replaced only on success; the rules are in
:mod:`NoduleMTLLib.core.safe_output`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import OutputsError  # noqa: E402,F401 - defined in errors.py (the one root), importable here
from ..core.filenames import JSON_FILE, LABELS_FILE, SEG_NRRD_FILE
from ..core.io import CTVolume, ijk_to_lps_matrix
from ..core.results import NODULE_TERMINOLOGY, AnalysisResult, NoduleResult

# The four output files, the writing error and the folder check live with the output-folder
# rules (:mod:`NoduleMTLLib.core.safe_output`), which this module's writer uses; re-exported here.
from ..core.safe_output import OUTPUT_FILES, OutputError, prepare_output_dir  # noqa: E402,F401
from .fields import REPORTED_FIELDS, raw_network_fields, reported_color, segment_tags

#: Consensus columns of nodules.csv (``NoduleMTLLib.core.consensus``; empty when not computed,
#: spread / Dice / disagreement empty with a single network).
CONSENSUS_COLUMNS = ("consensus.malignancy_probability", "consensus.probability_spread", "consensus.dice_pairwise_min",
                     "consensus.n_found", "consensus.disagreement")


#: Whole-scan search columns of nodules.csv (only when the nodules come from ``--detect``):
#: reported (combined) score, the detector's and the false-positive reduction's scores, and the
#: half-open voxel box "i0 j0 k0 i1 j1 k1".
DETECTION_COLUMNS = ("detection.score", "detection.detector_score", "detection.fp_reduction_score", "detection.box_ijk")

#: Brock status columns of nodules.csv after the reported fields (empty when not assessed).
BROCK_STATUS_COLUMNS = ("brock.complete", "brock.assumed", "brock.missing")
#: Report columns of nodules.csv (:mod:`NoduleMTLLib.service.assessment`; empty when not assessed).
REPORT_COLUMNS = tuple(f.key for f in REPORTED_FIELDS if f.key.split(".")[0] in ("lung_rads", "brock")) \
    + BROCK_STATUS_COLUMNS


def csv_rows(result: AnalysisResult) -> tuple[list[str], list[dict]]:
    """Header and rows of nodules.csv (one row per nodule): the reported fields
    (:data:`NoduleMTLLib.outputs.fields.REPORTED_FIELDS`), the networks' raw outputs
    (:func:`NoduleMTLLib.outputs.fields.raw_network_fields`), consensus, detection and Brock status columns."""
    nets = list(result.run.get("networks", []))
    det_cols = list(DETECTION_COLUMNS) if any(getattr(n, "detection", None) for n in result.nodules) else []
    fields = list(REPORTED_FIELDS) + raw_network_fields(nets)
    head = ["id", "label_value", "found", "point_ras_mm"] + [f.key for f in fields] \
        + list(CONSENSUS_COLUMNS) + det_cols + list(BROCK_STATUS_COLUMNS) + ["message"]
    rows = []
    for nd in result.nodules:
        d = nd.to_dict()
        row = {k: d.get(k) for k in ("id", "label_value", "found", "message")}
        row["point_ras_mm"] = " ".join(f"{v:.2f}" for v in nd.point_ras_mm)
        for f in fields:
            row[f.key] = f.value(d)
        for col in BROCK_STATUS_COLUMNS:
            rec, key = col.split(".", 1)
            v = (d.get(rec) or {}).get(key)
            row[col] = " ".join(v) if isinstance(v, list) else v
        for col in CONSENSUS_COLUMNS:
            row[col] = (d.get("consensus") or {}).get(col.split(".", 1)[1])
        if det_cols and d.get("detection"):
            row["detection.score"] = d["detection"]["score"]
            row["detection.detector_score"] = d["detection"].get("detector_score")
            row["detection.fp_reduction_score"] = d["detection"].get("fp_reduction_score")
            row["detection.box_ijk"] = " ".join(str(v) for v in d["detection"]["box_ijk"])
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return head, rows


def _fill_single_layer(seg: dict, boxes, lo, fields) -> bool:
    """Fast path of :func:`segmentation_dict`: when no two nodule masks overlap, write them
    into ``seg``'s single layer with label values 1..N in order, each segment's ``extent``
    (i, j, k min/max in the segmentation's voxels) from its mask's box - exactly what
    ``slicerio.add_segment`` gives for disjoint masks, without its passes over the whole
    box per segment (~0.2 s each for 100 whole-scan candidates).  Returns False (``seg``
    partly filled) when two masks overlap or there are more nodules than uint8 labels.

    Args:
        seg: slicerio segmentation whose ``voxels`` (i, j, k) start at ``lo`` on the CT grid.
        boxes: one :class:`~NoduleMTLLib.core.consensus.MaskBox` per nodule (CT grid, (z, y, x)).
        lo: (i, j, k) of ``seg``'s first voxel; fields: one segment field dict per box.
    """
    vox = seg["voxels"]
    if len(boxes) > np.iinfo(vox.dtype).max:
        return False
    segments = []
    for value, (box, f) in enumerate(zip(boxes, fields), start=1):
        sub = box.array.transpose(2, 1, 0)  # (i, j, k) inside the box
        k0, j0, i0 = (o - low for o, low in zip(box.offset_zyx, lo[::-1]))
        region = vox[i0:i0 + sub.shape[0], j0:j0 + sub.shape[1], k0:k0 + sub.shape[2]]
        if region[sub].any():
            return False
        region[sub] = value
        extent = [i0, i0 + sub.shape[0] - 1, j0, j0 + sub.shape[1] - 1, k0, k0 + sub.shape[2] - 1]
        segments.append({**f, "labelValue": value, "layer": 0, "extent": [int(v) for v in extent]})
    seg["segments"] = segments
    return True


def segmentation_dict(result: AnalysisResult, ct: CTVolume) -> dict:
    """slicerio segmentation (voxels i, j, k) cropped to the nodules, with terminology and result tags.

    Segment colours follow the reported (calibrated) P(malignant) (:func:`NoduleMTLLib.outputs.fields.reported_color`)
    and the tags are :func:`NoduleMTLLib.outputs.fields.segment_tags`, as in the Slicer scene.
    """
    import slicerio

    found = [n for n in result.nodules if n.found]
    boxes = [n.mask_box for n in found]  # MaskBox on the CT grid; None for no / an empty mask
    found = [n for n, b in zip(found, boxes) if b is not None]
    boxes = [b for b in boxes if b is not None]
    full = ijk_to_lps_matrix(ct.image)
    if found:  # the union of the nodules' boxes, (i, j, k)
        lo = np.array([min(b.offset_zyx[a] for b in boxes) for a in (2, 1, 0)])
        hi = np.array([max(b.offset_zyx[a] + b.array.shape[a] for b in boxes) for a in (2, 1, 0)])
    else:
        lo, hi = np.zeros(3, int), np.ones(3, int)
    shift = np.eye(4); shift[:3, 3] = lo
    seg = slicerio.create_segmentation(tuple(int(v) for v in hi - lo), full @ shift)
    seg["referenceImageExtentOffset"] = [int(v) for v in lo]
    term = slicerio.segmentation.terminology_entry_from_string(NODULE_TERMINOLOGY)
    fields = []
    for nd in found:
        d = nd.to_dict()
        fields.append({"id": f"nodule_{nd.id}", "name": nd.name, "color": list(reported_color(d)),
                       "terminology": term, "tags": segment_tags(d)})
    if not _fill_single_layer(seg, boxes, lo, fields):
        # overlapping nodules: slicerio puts each segment in the first layer it does not overlap
        seg["voxels"][...] = 0
        seg["segments"] = []
        lo_zyx, shape_zyx = tuple(int(v) for v in lo[::-1]), tuple(int(v) for v in (hi - lo)[::-1])
        for box, f in zip(boxes, fields):
            slicerio.add_segment(seg, box.paste(lo_zyx, shape_zyx).transpose(2, 1, 0), f)
    return seg


def _masks_from_seg_nrrd(path: Path, ct_ijk_to_lps, shape_zyx) -> dict | None:
    """Per-nodule masks from ``segmentation.seg.nrrd`` (segments ``nodule_<id>``, overlaps
    kept in layers) as :class:`~NoduleMTLLib.core.consensus.MaskBox` on the CT grid ``shape_zyx``
    (None for an empty segment); None if the grid does not line up."""
    import slicerio

    from ..core.consensus import MaskBox

    seg = slicerio.read_segmentation(str(path))
    seg_ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    if not np.allclose(seg_ijk_to_lps[:3, :3], ct_ijk_to_lps[:3, :3], atol=1e-4):
        return None
    offset = np.linalg.solve(ct_ijk_to_lps, seg_ijk_to_lps[:, 3])[:3]
    lo = np.round(offset).astype(int)
    if np.abs(offset - lo).max() > 1e-3:
        return None
    voxels = np.asarray(seg["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    size_ijk = np.array(layers.shape[1:])
    hi = lo + size_ijk
    if np.any(lo < 0) or np.any(hi > np.array(shape_zyx[::-1])):
        return None
    masks = {}
    for s in seg.get("segments", []):
        m = re.fullmatch(r"nodule_(\d+)", str(s.get("id", "")))
        if not m:
            continue
        sub = (layers[int(s.get("layer", 0))] == int(s["labelValue"])).transpose(2, 1, 0)  # (z, y, x)
        box = MaskBox.from_full(sub)  # its box inside the segmentation's extent, then on the CT grid
        masks[int(m.group(1))] = None if box is None else MaskBox(
            tuple(int(o + v) for o, v in zip(box.offset_zyx, lo[::-1])), box.array, tuple(int(v) for v in shape_zyx))
    return masks


def read_outputs(out_dir: str | os.PathLike) -> AnalysisResult:
    """Read an output folder of ``nodulemtl analyze`` back into an ``AnalysisResult``.

    The reader of :func:`NoduleMTLLib.outputs.writer.write_outputs`.  ``nodules.json`` gives the records (``from_dict``
    of :class:`~NoduleMTLLib.core.results.AnalysisResult`, ``NoduleResult``, ``NetworkOutput``,
    :class:`~NoduleMTLLib.core.consensus.Consensus`); masks are bool arrays on the CT grid, shape
    ``(z, y, x)`` of ``labels.nrrd`` (held as :class:`~NoduleMTLLib.core.consensus.MaskBox`,
    so a hundred whole-scan candidates do not each hold a CT-sized array; ``mask`` reads
    as the full-grid array): from ``segmentation.seg.nrrd`` (exact, overlapping
    masks kept) when it is there and lines up with ``labels.nrrd``, else
    ``labels.nrrd == id`` (where masks overlap, the earlier nodule owns the voxel).
    Per-network masks (``network_masks``) are not written to the folder and stay empty.

    Raises:
        OutputsError: a file is missing, the JSON is not a NoduleMTL result, the label map's
            size differs from the JSON's ``input.size_ijk``, or a found nodule has an empty
            mask.
    """
    out = Path(out_dir)
    json_path, labels_path = out / JSON_FILE, out / LABELS_FILE
    for p in (json_path, labels_path):
        if not p.is_file():
            raise OutputsError(f"Output folder {out} has no {p.name}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        records = data["nodules"]
    except (ValueError, KeyError, TypeError) as e:
        raise OutputsError(f"{json_path} is not a NoduleMTL result: {e}") from None
    labels_image = sitk.ReadImage(str(labels_path))
    labels = sitk.GetArrayFromImage(labels_image)
    size_ijk = list(labels_image.GetSize())
    if data.get("input", {}).get("size_ijk") not in (None, size_ijk):
        raise OutputsError(f"{labels_path} has size {size_ijk}, nodules.json says {data['input']['size_ijk']}")
    masks = None
    seg_path = out / SEG_NRRD_FILE
    if seg_path.is_file():
        masks = _masks_from_seg_nrrd(seg_path, ijk_to_lps_matrix(labels_image), labels.shape)
        if masks is not None:  # a voxel labelled k outside segment k: the files disagree, trust the label map
            counts = np.bincount(labels.ravel(), minlength=max(masks, default=0) + 1)
            for k, v in masks.items():
                inside = 0 if v is None or k < 0 else int((labels[v.slices] == k).sum())
                if (k >= 0 and counts[k] > inside) or (v is not None and np.any((labels[v.slices] == k) & ~v.array)):
                    masks = None
                    break
    from scipy import ndimage as ndi

    from ..core.consensus import MaskBox

    boxes = ndi.find_objects(labels)  # tight box of each label value (index value - 1)

    nodules = []
    for rec in records:
        nid = int(rec["id"])
        try:
            nodule = NoduleResult.from_dict(rec)
        except (KeyError, TypeError, ValueError) as e:
            raise OutputsError(f"{json_path} is not a NoduleMTL result: {e}") from None
        if nodule.found:
            if masks is not None and nid in masks:
                mask = masks[nid]  # None: an empty segment
            else:
                box = boxes[nid - 1] if 0 < nid <= len(boxes) else None
                mask = None if box is None else MaskBox(tuple(int(b.start) for b in box), labels[box] == nid,
                                                        tuple(int(v) for v in labels.shape))
            if mask is None:
                raise OutputsError(f"Nodule {nid} is marked found but has no voxel in {out}")
            nodule.mask = mask
        nodules.append(nodule)
    try:
        return AnalysisResult.from_dict(data, nodules)
    except (KeyError, TypeError) as e:
        raise OutputsError(f"{json_path} is not a NoduleMTL result: {e}") from None
