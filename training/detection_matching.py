"""Nodule-level evaluation of the whole-scan nodule search.

Two protocols:

1. The paper's (Li & Honarvar Shakibaei Asli 2026, sections 3.4.2-3.4.3):
   "A merged prediction is considered a TP if its centre slice lies within three slices of
   a GT nodule and the 2D bounding box has an IoU greater than 0.2 with the annotated
   location", then precision, recall and F1 from nodule-level TP/FP/FN (Table 5).
   :func:`match_nodules` implements it; what the paper leaves open (our choices): matching
   is one-to-one and greedy by descending prediction score, each prediction taking the
   unmatched reference with the highest IoU among those that qualify; a prediction that
   only qualifies for an already matched reference is a duplicate and counts as FP; a
   prediction that only qualifies for an *excluded* reference is ignored (LUNA16's rule
   for irrelevant findings).  The 2D boxes compared are the prediction's in-plane union box
   and the reference's in-plane box (union over its slices, or centre +- radius for
   centre/diameter annotations).

2. LUNA16 FROC / CPM (Setio et al., "Validation, comparison, and combination of
   algorithms for automatic detection of pulmonary nodules in computed tomography images:
   the LUNA16 challenge", Med. Image Anal. 42, 2017; official script
   ``noduleCADEvaluationLUNA16.py``), which the paper names but does not report (4.4):

   * a candidate hits a reference nodule when its centre lies within the nodule's radius:
     squared distance < (diameter / 2)^2 in world mm (diameter < 0 -> 10 mm);
   * per reference nodule only the highest-scoring hit counts (the other hits are ignored,
     neither TP nor FP); missed nodules count in the denominator only;
   * candidates on excluded references ("irrelevant findings": nodules < 3 mm, non-nodules,
     nodules marked by fewer than 3 of 4 readers) are ignored;
   * all other candidates are false positives;
   * at most 100 candidates per scan (the highest-scoring) enter, as the official run does;
   * FROC curve: for every score threshold, sensitivity = detected / all reference nodules
     and FPs per scan = false positives / scans; sensitivities at 1/8, 1/4, 1/2, 1, 2, 4 and
     8 FPs per scan are read by linear interpolation of that curve (numpy ``interp``
     semantics, as the official script); CPM = their mean.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.detection.merge import box_iou_np

#: The paper's matching tolerances (section 3.4.3).
MAX_SLICE_DISTANCE = 3
MIN_MATCH_IOU = 0.2  # strictly greater than
#: LUNA16 operating points (FPs per scan) and candidate cap.
LUNA16_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LUNA16_MAX_CANDIDATES = 100
#: LUNA16 reference standard: nodules >= 3 mm accepted by >= 3 of 4 readers.
LUNA16_MIN_READERS = 3
LUNA16_MIN_DIAMETER_MM = 3.0


@dataclass
class ReferenceNodule:
    """A reference (ground-truth) nodule.

    Attributes:
        nodule_id: id in the source annotation.
        centre_lps: world LPS mm.
        diameter_mm: reference diameter (hit radius of the FROC is half of it).
        centre_ijk: continuous voxel index (i, j, k).
        box_xyxy: in-plane box (x1, y1, x2, y2) px (pixel edges, torchvision convention).
        k_range: half-open slice range (k0, k1).
        n_readers: number of readers who marked it (None if unknown).
    """

    nodule_id: int
    centre_lps: tuple[float, float, float]
    diameter_mm: float
    centre_ijk: tuple[float, float, float]
    box_xyxy: tuple[float, float, float, float]
    k_range: tuple[int, int]
    n_readers: int | None = None

    @property
    def centre_slice(self) -> int:
        """Rounded centre k (the paper's GT centre slice)."""
        return int(round(self.centre_ijk[2]))


def references_from_label_map(labels: np.ndarray, ct: CTVolume, table: Sequence[dict] | None = None) -> list[ReferenceNodule]:
    """Reference nodules from a label map on the CT grid (value n = nodule n).

    Args:
        labels: (z, y, x) integer array on the CT grid.
        ct: the CT (geometry).
        table: optional rows (dicts) with ``nodule`` and optionally ``center_lps_x/y/z``,
            ``diameter_mm``, ``n_readers`` (the ``nodules.csv`` of ``whole_ct/lidc``);
            centre and diameter come from it when present, otherwise from the label's
            centroid and equivalent-sphere diameter.

    Returns:
        list of :class:`ReferenceNodule` by nodule id (labels absent from the map are skipped).

    Raises:
        ValueError: labels shape differs from the CT's.
    """
    labels = np.asarray(labels)
    if labels.shape != ct.shape_zyx:
        raise ValueError(f"label map shape {labels.shape} != CT shape {ct.shape_zyx}")
    rows = {int(float(r["nodule"])): r for r in (table or [])}
    sx, sy, sz = ct.spacing
    from scipy import ndimage as ndi

    ids = [int(v) for v in np.unique(labels) if v > 0]
    objs = ndi.find_objects(labels.astype(np.int32))
    out = []
    for n in ids:
        sl = objs[n - 1]
        m = labels[sl] == n
        kk, jj, ii = np.nonzero(m)
        k0, j0, i0 = (s.start for s in sl)
        centre_ijk = (float(ii.mean() + i0), float(jj.mean() + j0), float(kk.mean() + k0))
        box = (float(ii.min() + i0), float(jj.min() + j0), float(ii.max() + i0 + 1), float(jj.max() + j0 + 1))
        k_range = (int(kk.min() + k0), int(kk.max() + k0 + 1))
        r = rows.get(n, {})
        if all(f"center_lps_{a}" in r for a in "xyz"):
            centre_lps = tuple(float(r[f"center_lps_{a}"]) for a in "xyz")
            centre_ijk = tuple(float(v) for v in ct.world_lps_to_index(centre_lps))
        else:
            centre_lps = tuple(float(v) for v in ct.image.TransformContinuousIndexToPhysicalPoint(list(centre_ijk)))
        if r.get("diameter_mm") not in (None, ""):
            diameter = float(r["diameter_mm"])
        else:
            diameter = float((6.0 * m.sum() * sx * sy * sz / math.pi) ** (1.0 / 3.0))
        nr = r.get("n_readers")
        out.append(ReferenceNodule(n, centre_lps, diameter, centre_ijk, box, k_range,
                                   None if nr in (None, "") else int(float(nr))))
    return out


def reference_from_centre(centre_lps, diameter_mm: float, ct: CTVolume, nodule_id: int = 0,
                          n_readers: int | None = None) -> ReferenceNodule:
    """Reference nodule from a LUNA16-style annotation (world centre, diameter): the box is
    the centre +- radius in-plane, the slice range +- radius in z (section 3.1 of the paper
    builds its masks the same way)."""
    c = tuple(float(v) for v in ct.world_lps_to_index(centre_lps))
    sx, sy, sz = ct.spacing
    r = diameter_mm / 2.0
    box = (c[0] + 0.5 - r / sx, c[1] + 0.5 - r / sy, c[0] + 0.5 + r / sx, c[1] + 0.5 + r / sy)
    k_range = (int(math.floor(c[2] - r / sz + 0.5)), int(math.floor(c[2] + r / sz + 0.5)) + 1)
    return ReferenceNodule(nodule_id, tuple(float(v) for v in centre_lps), float(diameter_mm), c, box, k_range, n_readers)


def load_lidc_whole_ct_references(folder: str | Path) -> tuple[CTVolume, list[ReferenceNodule]]:
    """Read a ``whole_ct/lidc/<patient>`` folder: ``ct.nrrd``, ``nodules_labels.nrrd`` and ``nodules.csv``.

    Returns:
        (CT, reference nodules with reader counts).

    Raises:
        InputError: unreadable CT; FileNotFoundError: missing label map or table.
    """
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import read_ct

    folder = Path(folder)
    ct = read_ct(folder / "ct.nrrd")
    if not (folder / "nodules_labels.nrrd").exists():
        raise FileNotFoundError(folder / "nodules_labels.nrrd")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nodules_labels.nrrd")))
    with open(folder / "nodules.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    return ct, references_from_label_map(labels, ct, table)


def split_references(refs: Sequence[ReferenceNodule], min_readers: int = LUNA16_MIN_READERS,
                     min_diameter_mm: float = LUNA16_MIN_DIAMETER_MM):
    """Split references into (included, excluded) as LUNA16 does: included = diameter >=
    ``min_diameter_mm`` and marked by >= ``min_readers`` readers (unknown reader count counts
    as included); the rest are irrelevant findings (hits on them are ignored)."""
    inc, exc = [], []
    for r in refs:
        ok = r.diameter_mm >= min_diameter_mm and (r.n_readers is None or r.n_readers >= min_readers)
        (inc if ok else exc).append(r)
    return inc, exc


def precision_recall_f1(tp: int, fp: int, fn: int) -> dict:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 = 2PR/(P+R) (paper Table 5).

    Undefined ratios (zero denominators) are NaN; F1 is 0 when P + R = 0.
    """
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    if math.isnan(p) or math.isnan(r):
        f1 = float("nan")
    else:
        f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": p, "recall": r, "f1": f1}


@dataclass
class NoduleMatchResult:
    """Output of :func:`match_nodules`.

    Attributes:
        tp, fp, fn: nodule-level counts; duplicates: FPs that were second hits on a matched
        reference; ignored: predictions on excluded references only.
        pairs: (prediction index, reference index) of the TPs.
        missed: indices of unmatched (included) references.
        precision, recall, f1: see :func:`precision_recall_f1`.
    """

    tp: int
    fp: int
    fn: int
    duplicates: int
    ignored: int
    pairs: list[tuple[int, int]]
    missed: list[int]
    precision: float
    recall: float
    f1: float


def _qualifies(pred, ref, max_slice_distance, min_iou) -> float:
    """IoU if ``pred`` qualifies for ``ref`` under the paper's criterion, else -1."""
    if abs(int(pred.centre_slice) - int(ref.centre_slice)) > max_slice_distance:
        return -1.0
    iou = float(box_iou_np(np.asarray(pred.box_xyxy)[None], np.asarray(ref.box_xyxy)[None])[0, 0])
    return iou if iou > min_iou else -1.0


def match_nodules(predictions: Sequence, references: Sequence, excluded: Sequence = (), *,
                  max_slice_distance: int = MAX_SLICE_DISTANCE, min_iou: float = MIN_MATCH_IOU) -> NoduleMatchResult:
    """The paper's nodule-level matching of one scan (section 3.4.3; rules in the module docstring).

    Args:
        predictions: merged nodules (:class:`~.merge.MergedNodule` or anything with
            ``score``, ``centre_slice`` and ``box_xyxy``).
        references: included reference nodules (:class:`ReferenceNodule` or anything with
            ``centre_slice`` and ``box_xyxy``).
        excluded: references whose hits are ignored (e.g. single-reader nodules).
        max_slice_distance: |centre slice difference| allowed (3).
        min_iou: the 2D IoU must be strictly greater than this (0.2).

    Returns:
        :class:`NoduleMatchResult` (sum TP/FP/FN over scans before computing P/R/F1 of a set).
    """
    order = sorted(range(len(predictions)), key=lambda i: -float(predictions[i].score))
    matched: dict[int, int] = {}
    tp = fp = dup = ign = 0
    for pi in order:
        p = predictions[pi]
        cands = [(_qualifies(p, r, max_slice_distance, min_iou), ri) for ri, r in enumerate(references)]
        free = [(iou, ri) for iou, ri in cands if iou >= 0 and ri not in matched]
        if free:
            _, ri = max(free)
            matched[ri] = pi
            tp += 1
        elif any(iou >= 0 for iou, _ in cands):
            fp += 1
            dup += 1
        elif any(_qualifies(p, e, max_slice_distance, min_iou) >= 0 for e in excluded):
            ign += 1
        else:
            fp += 1
    missed = [ri for ri in range(len(references)) if ri not in matched]
    prf = precision_recall_f1(tp, fp, len(missed))
    return NoduleMatchResult(tp=tp, fp=fp, fn=len(missed), duplicates=dup, ignored=ign,
                             pairs=sorted((pi, ri) for ri, pi in matched.items()), missed=missed,
                             precision=prf["precision"], recall=prf["recall"], f1=prf["f1"])


# ----------------------------------------------------------------------------------------
# LUNA16 FROC / CPM


@dataclass
class FROCScan:
    """Candidates and references of one scan for :func:`froc`.

    Attributes:
        candidates_lps: (N, 3) candidate centres, world mm.
        scores: (N,) candidate scores.
        nodules_lps: (M, 3) included reference centres, world mm; nodule_diameters_mm: (M,).
        excluded_lps: (E, 3) irrelevant findings, world mm; excluded_diameters_mm: (E,).
    """

    candidates_lps: np.ndarray
    scores: np.ndarray
    nodules_lps: np.ndarray
    nodule_diameters_mm: np.ndarray
    excluded_lps: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    excluded_diameters_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))


def froc_scan_from_nodules(nodules: Sequence, included: Sequence[ReferenceNodule],
                           excluded: Sequence[ReferenceNodule] = ()) -> FROCScan:
    """:class:`FROCScan` from merged nodules (``centre_lps``, ``score``) and reference nodules.

    Raises:
        ValueError: a nodule without world coordinates (merge it with the CT).
    """
    if any(getattr(n, "centre_lps", None) is None for n in nodules):
        raise ValueError("merged nodules need centre_lps (pass the CT to merge_slice_detections)")
    c = np.array([n.centre_lps for n in nodules], float).reshape(-1, 3)
    s = np.array([n.score for n in nodules], float)
    return FROCScan(c, s, np.array([r.centre_lps for r in included], float).reshape(-1, 3),
                    np.array([r.diameter_mm for r in included], float),
                    np.array([r.centre_lps for r in excluded], float).reshape(-1, 3),
                    np.array([r.diameter_mm for r in excluded], float))


@dataclass
class FROCResult:
    """Output of :func:`froc`.

    Attributes:
        fps_per_scan, sensitivity, thresholds: FROC curve points (starting at (0, 0),
            threshold +inf), one per distinct score, in descending threshold order.
        fp_rates: the operating points (LUNA16: 1/8 ... 8); sensitivities: interpolated
            sensitivity at each; cpm: their mean.
        n_scans, n_nodules, n_detected, n_false_positives, n_ignored_duplicates,
        n_ignored_excluded: counts over all scans (candidate cap applied).
    """

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    cpm: float
    n_scans: int
    n_nodules: int
    n_detected: int
    n_false_positives: int
    n_ignored_duplicates: int
    n_ignored_excluded: int


def _interp_last(x: float, xp: np.ndarray, fp: np.ndarray) -> float:
    """Linear interpolation of a curve with non-decreasing ``xp`` (duplicates allowed, as
    ``numpy.interp`` treats them: at a repeated x the last point's value is used)."""
    j = int(np.searchsorted(xp, x, side="right")) - 1
    if j < 0:
        return float(fp[0])
    if j >= len(xp) - 1:
        return float(fp[-1])
    return float(fp[j] + (fp[j + 1] - fp[j]) * (x - xp[j]) / (xp[j + 1] - xp[j]))


def froc(scans: Sequence[FROCScan], fp_rates: Sequence[float] = LUNA16_FP_RATES,
         max_candidates_per_scan: int | None = LUNA16_MAX_CANDIDATES) -> FROCResult:
    """LUNA16 FROC analysis and CPM over a set of scans (rules in the module docstring).

    Args:
        scans: one :class:`FROCScan` per scan (scans without candidates or nodules count).
        fp_rates: operating points in FPs per scan (LUNA16's seven by default).
        max_candidates_per_scan: keep at most this many highest-scoring candidates per scan
            (100 in the official evaluation; None = all).

    Returns:
        :class:`FROCResult`; sensitivities are 0 when there are no reference nodules.

    Raises:
        ValueError: no scans, or array shapes that do not agree.
    """
    if not scans:
        raise ValueError("FROC needs at least one scan")
    pos_scores: list[float] = []
    fp_scores: list[float] = []
    n_nod = dup = excl = 0
    for sc in scans:
        c = np.asarray(sc.candidates_lps, float).reshape(-1, 3)
        s = np.asarray(sc.scores, float).ravel()
        if len(c) != len(s):
            raise ValueError(f"{len(c)} candidates but {len(s)} scores")
        if max_candidates_per_scan is not None and len(s) > max_candidates_per_scan:
            keep = np.argsort(-s, kind="stable")[:max_candidates_per_scan]
            c, s = c[keep], s[keep]
        nod = np.asarray(sc.nodules_lps, float).reshape(-1, 3)
        dia = np.asarray(sc.nodule_diameters_mm, float).ravel()
        if len(nod) != len(dia):
            raise ValueError("nodules_lps and nodule_diameters_mm differ in length")
        remaining = np.ones(len(s), bool)
        for centre, d in zip(nod, dia):
            n_nod += 1
            r2 = (d / 2.0 if d >= 0 else 5.0) ** 2
            hits = np.nonzero(((c - centre) ** 2).sum(1) < r2)[0]
            if len(hits):
                pos_scores.append(float(s[hits].max()))
                dup += len(hits) - 1
                remaining[hits] = False
        ex = np.asarray(sc.excluded_lps, float).reshape(-1, 3)
        exd = np.asarray(sc.excluded_diameters_mm, float).ravel()
        for centre, d in zip(ex, exd):
            r2 = (d / 2.0 if d >= 0 else 5.0) ** 2
            hits = remaining & (((c - centre) ** 2).sum(1) < r2)
            excl += int(hits.sum())
            remaining[hits] = False
        fp_scores.extend(s[remaining].tolist())

    pos = np.sort(np.asarray(pos_scores))[::-1]
    neg = np.sort(np.asarray(fp_scores))[::-1]
    thr = np.unique(np.concatenate([pos, neg]))[::-1]
    tp_at = np.array([(pos >= t).sum() for t in thr], float)
    fp_at = np.array([(neg >= t).sum() for t in thr], float)
    n_scans = len(scans)
    fps = np.concatenate([[0.0], fp_at / n_scans])
    sens = np.concatenate([[0.0], tp_at / n_nod]) if n_nod else np.zeros(len(thr) + 1)
    thresholds = np.concatenate([[np.inf], thr])
    at = tuple(_interp_last(float(r), fps, sens) for r in fp_rates)
    return FROCResult(fps_per_scan=fps, sensitivity=sens, thresholds=thresholds, fp_rates=tuple(float(r) for r in fp_rates),
                      sensitivities=at, cpm=float(np.mean(at)), n_scans=n_scans, n_nodules=n_nod,
                      n_detected=len(pos_scores), n_false_positives=len(fp_scores),
                      n_ignored_duplicates=dup, n_ignored_excluded=excl)
