"""Slice-wise detections -> 3D nodules (paper sections 3.4.3 and 3.5).

The paper: "bounding boxes with sufficient spatial overlap and centre slice indices within
a 3-slice adjacent window are grouped as a single nodule prediction" (3.4.3), and
"low-confidence predictions are filtered using a dynamic score threshold determined by the
30th percentile of the predicted confidence scores, clipped to the range [0.1, 0.5]" (3.5).

Precisely, :func:`merge_slice_detections` does:

1. Score filter: keep slice detections with ``score >= threshold``; the threshold is fixed
   (a float) or adaptive (:func:`adaptive_score_threshold` over all slice detections of
   the scan: the paper does not say over which population the percentile runs; we use
   one scan, the unit the nodule search works on).
2. Linking: two kept detections a, b are linked when ``|k_a - k_b| <= max_slice_gap`` (3)
   and their in-plane boxes overlap with ``IoU >= min_iou`` (0.2; "sufficient overlap" is
   not quantified in the paper, we reuse the 0.2 of its 2D TP criterion).  Detections on
   the same slice link too (duplicates that survived NMS).
3. Nodules = connected components of the link graph (single linkage: a nodule spanning
   many slices is chained slice to slice; gaps of up to 2 missed slices are bridged).
4. Per nodule: score = max member score; in-plane box = union of member boxes; slice
   range = min..max member slice; mask = union of member masks (thresholded at
   ``mask_threshold``) on the CT grid; centre = mask centroid if masks are given, else
   the score-weighted mean of member box centres and slices.

Coordinates: slice boxes are torchvision's ``(x1, y1, x2, y2)`` in pixels of the full
axial slice, with pixel i covering [i, i+1) (so pixel centre i = coordinate i + 0.5);
slice k = array index along z.  Voxel boxes are half-open integer ranges; world boxes
and centres are LPS mm (``CTVolume`` geometry), the world box spanning voxel edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.io import CTVolume

#: Adaptive threshold: percentile and clip range (section 3.5).
ADAPTIVE_PERCENTILE = 30.0
ADAPTIVE_CLIP = (0.1, 0.5)
#: Linking rules (section 3.4.3; IoU value our choice, see the module docstring).
MAX_SLICE_GAP = 3
MIN_LINK_IOU = 0.2
#: Probability at which mask-head outputs become binary masks (torchvision convention).
MASK_THRESHOLD = 0.5


def adaptive_score_threshold(scores, percentile: float = ADAPTIVE_PERCENTILE,
                             clip: tuple[float, float] = ADAPTIVE_CLIP) -> float:
    """Dynamic score threshold: the ``percentile``-th percentile of ``scores`` clipped to ``clip`` (section 3.5).

    Args:
        scores: 1D array-like of detection confidences in [0, 1].
        percentile: 30 in the paper; clip: (0.1, 0.5) in the paper.

    Returns:
        threshold (float).  With no scores at all: the upper clip value (nothing to keep).

    Raises:
        ValueError: clip[0] > clip[1].
    """
    lo, hi = clip
    if lo > hi:
        raise ValueError(f"invalid clip range {clip}")
    s = np.asarray(scores, dtype=float).ravel()
    if s.size == 0:
        return float(hi)
    return float(np.clip(np.percentile(s, percentile), lo, hi))


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes: a (N, 4), b (M, 4) float -> (N, M) float64 (0 for empty boxes)."""
    a = np.asarray(a, float).reshape(-1, 4)
    b = np.asarray(b, float).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass
class MergedNodule:
    """One 3D nodule candidate built from slice detections.

    Attributes:
        score: max member score.
        slices: sorted slice indices k with a member detection.
        box_xyxy: in-plane union box (x1, y1, x2, y2), float px.
        box_voxel: half-open voxel box (i0, j0, k0, i1, j1, k1), int.
        centre_ijk: continuous voxel index (i, j, k) of the centre.
        centre_lps: centre in world LPS mm (None without a CT).
        box_lps_min, box_lps_max: world LPS mm corners of the voxel box (voxel edges;
            axis-aligned hull for oblique volumes; None without a CT).
        mask: bool (k1-k0, j1-j0, i1-i0) on the CT grid inside ``box_voxel`` (None unless
            every member detection carried a mask); :meth:`mask_box` crops it to its
            voxels, :meth:`full_mask` and :func:`nodules_to_label_map` paste it onto the
            whole grid.
        members: the member detections (slice, box, score).
        detector_score: the Mask R-CNN score (max member score) when a second stage
            rescored the nodule (then ``score`` is the combined score), else None.
        fp_reduction_score: the false-positive-reduction probability (``fpr25d``), or None.
        scale: the search scale that found it: 1 = native pixels, 2 = the CT shrunk 2x
            in-plane (multi-scale search of masses, :mod:`.infer`).
        absorbed: how many other candidates were found to be the same lesion and folded
            into this one (scales grouped, or fragments inside its click outline).
        accepted_as: why it is reported: "score" (combined score at or above the operating
            point), "mass" (below it, accepted by the size-aware rule ``infer.MassRule``) or
            "mass_shape" (no detection: a thick soft-tissue region, ``infer.mass_shape_candidates``,
            whose click outline the same rule accepted).
        features: the click outline's :func:`~.infer.outline_features` when the mass rule
            looked at it, else None.
        folded: the candidates :func:`~.infer.group_scales` folded into this one (each with
            its own ``folded``), kept so that a coarse candidate refused later can release them.
    """

    score: float
    slices: list[int]
    box_xyxy: tuple[float, float, float, float]
    box_voxel: tuple[int, int, int, int, int, int]
    centre_ijk: tuple[float, float, float]
    centre_lps: tuple[float, float, float] | None = None
    box_lps_min: tuple[float, float, float] | None = None
    box_lps_max: tuple[float, float, float] | None = None
    mask: np.ndarray | None = None
    members: list[dict] = field(default_factory=list)
    detector_score: float | None = None
    fp_reduction_score: float | None = None
    scale: float = 1.0
    absorbed: int = 0
    accepted_as: str = "score"
    features: dict | None = None
    folded: list = field(default_factory=list, repr=False, compare=False)

    @property
    def centre_slice(self) -> int:
        """Centre slice index (rounded centre k): the paper's "centre slice" (section 3.4.3)."""
        return int(round(self.centre_ijk[2]))

    def mask_box(self, shape_zyx):
        """The mask as a :class:`~NoduleMTLLib.core.consensus.MaskBox` on a grid of ``shape_zyx``:
        the tight bounding box of its voxels (bool (dz, dy, dx)) and its offset (k, j, i) -
        what :meth:`full_mask` gives, without the full-grid array.  None when there is no
        mask or it is empty.

        Raises:
            ValueError: shape smaller than the nodule's voxel box.
        """
        from ..core.consensus import MaskBox
        from ..core.postprocess import bounding_box

        if self.mask is None:
            return None
        i0, j0, k0, i1, j1, k1 = self.box_voxel
        shape = tuple(int(v) for v in shape_zyx)
        if k1 > shape[0] or j1 > shape[1] or i1 > shape[2]:
            raise ValueError(f"shape {shape} does not contain the nodule box {self.box_voxel}")
        box = bounding_box(self.mask)
        if box is None:
            return None
        return MaskBox((k0 + box[0].start, j0 + box[1].start, i0 + box[2].start),
                       np.ascontiguousarray(self.mask[box], bool), shape)

    def full_mask(self, shape_zyx) -> np.ndarray:
        """bool (z, y, x) mask on the whole CT grid (empty if no mask).

        Raises:
            ValueError: shape smaller than the nodule's voxel box.
        """
        out = np.zeros(tuple(shape_zyx), bool)
        if self.mask is None:
            return out
        i0, j0, k0, i1, j1, k1 = self.box_voxel
        if k1 > out.shape[0] or j1 > out.shape[1] or i1 > out.shape[2]:
            raise ValueError(f"shape {tuple(shape_zyx)} does not contain the nodule box {self.box_voxel}")
        out[k0:k1, j0:j1, i0:i1] = self.mask
        return out


@dataclass
class MergeResult:
    """Output of :func:`merge_slice_detections`: nodules (by descending score), the score
    threshold used, and the number of slice detections before / after the threshold."""

    nodules: list[MergedNodule]
    score_threshold: float
    n_detections: int
    n_kept: int


def _as_masks(m, n: int):
    if m is None:
        return None
    a = np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m)
    if a.ndim == 4:
        a = a[:, 0]
    if a.ndim != 3 or a.shape[0] != n:
        raise ValueError(f"masks must be (N, H, W) or (N, 1, H, W) with N={n}, got {a.shape}")
    return a


def _np(x):
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def merge_slice_detections(detections: Sequence[dict], ct: CTVolume | None = None, *,
                           score_threshold: float | str = "adaptive", max_slice_gap: int = MAX_SLICE_GAP,
                           min_iou: float = MIN_LINK_IOU, mask_threshold: float = MASK_THRESHOLD) -> MergeResult:
    """Group slice-wise detections of one scan into 3D nodules (section 3.4.3; rules in the module docstring).

    Args:
        detections: one dict per processed slice: ``"slice"`` (int k), ``"boxes"`` (N, 4)
            xyxy px in full-slice coordinates, ``"scores"`` (N,), optional ``"masks"``
            (N, H, W) or (N, 1, H, W) probabilities or bools on the full slice (H, W = CT
            slice size).  numpy arrays or torch tensors.
        ct: the CT (for world coordinates; also fixes the grid size for clipping); optional.
        score_threshold: a float, or "adaptive" (:func:`adaptive_score_threshold`).
        max_slice_gap: largest |k_a - k_b| of linked detections (3).
        min_iou: smallest in-plane IoU of linked detections (0.2).
        mask_threshold: probability at which masks are binarised (0.5).

    Returns:
        :class:`MergeResult`, nodules sorted by descending score.

    Raises:
        ValueError: malformed detections (missing keys, shape mismatch), unknown threshold mode.
    """
    flat = []  # (k, box, score, mask2d or None)
    all_scores = []
    for d in detections:
        for key in ("slice", "boxes", "scores"):
            if key not in d:
                raise ValueError(f"slice detection without '{key}'")
        boxes = _np(d["boxes"]).astype(float).reshape(-1, 4)
        scores = _np(d["scores"]).astype(float).ravel()
        if len(boxes) != len(scores):
            raise ValueError(f"slice {d['slice']}: {len(boxes)} boxes but {len(scores)} scores")
        masks = _as_masks(d.get("masks"), len(boxes))
        all_scores.extend(scores.tolist())
        for n in range(len(boxes)):
            flat.append((int(d["slice"]), boxes[n], float(scores[n]), None if masks is None else masks[n]))

    if isinstance(score_threshold, str):
        if score_threshold != "adaptive":
            raise ValueError(f"score_threshold must be a float or 'adaptive', got {score_threshold!r}")
        thr = adaptive_score_threshold(all_scores)
    else:
        thr = float(score_threshold)
    kept = [f for f in flat if f[2] >= thr]
    if not kept:
        return MergeResult([], thr, len(flat), 0)

    # connected components of the links
    ks = np.array([f[0] for f in kept])
    bx = np.stack([f[1] for f in kept])
    rows, cols = link_pairs(ks, bx, max_slice_gap, min_iou)
    groups = link_components(len(kept), rows, cols)

    shape = ct.shape_zyx if ct is not None else None
    nodules = [_make_nodule([kept[n] for n in idx], ct, shape, mask_threshold) for idx in groups]
    nodules.sort(key=lambda nd: -nd.score)
    return MergeResult(nodules, thr, len(flat), len(kept))


def link_pairs(slices, boxes, max_slice_gap: int = MAX_SLICE_GAP, min_iou: float = MIN_LINK_IOU):
    """Edges of the merge's link graph (rule 2 of the module docstring), slice window by slice window.

    Only detections at most ``max_slice_gap`` slices apart are compared: memory is
    O(detections on one slice x detections in its window), never the N x N matrices of all
    pairs (a thin-slice scan has tens of thousands of low-score slice detections, and one
    linked group of them used to cost gigabytes).

    Args:
        slices: (N,) int slice index k of each detection.
        boxes: (N, 4) float xyxy px.
        max_slice_gap: largest |k_a - k_b| of a link.
        min_iou: smallest in-plane IoU of a link (IoU >= min_iou).

    Returns:
        (rows, cols): int64 arrays, one undirected edge (a, b) with a != b per link, each
        pair once.
    """
    ks = np.asarray(slices, np.int64).ravel()
    bx = np.asarray(boxes, float).reshape(-1, 4)
    if len(ks) != len(bx):
        raise ValueError(f"{len(ks)} slice indices but {len(bx)} boxes")
    order = np.argsort(ks, kind="stable")
    uniq, start = np.unique(ks[order], return_index=True)
    end = np.append(start[1:], len(order))
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for u, k in enumerate(uniq.tolist()):
        a = order[start[u]:end[u]]
        last = int(np.searchsorted(uniq, k + int(max_slice_gap), side="right")) - 1
        b = order[start[u]:end[last]]  # this slice first, then the next ones up to the gap
        iou = box_iou_np(bx[a], bx[b])
        link = iou >= min_iou
        link[:, :len(a)] = np.triu(link[:, :len(a)], 1)  # same slice: each pair once, no self-links
        ia, ib = np.nonzero(link)
        rows.append(a[ia])
        cols.append(b[ib])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def link_components(n: int, rows, cols) -> list[list[int]]:
    """Connected components of an undirected graph (``scipy.sparse.csgraph.connected_components``).

    Args:
        n: number of nodes (0..n-1); rows, cols: int arrays of equal length, one edge each.

    Returns:
        the components as ascending lists of node indices, ordered by their smallest node
        (the order the merge has always reported groups in).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return []
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for node, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(node)
    return list(groups.values())


def _make_nodule(members, ct, shape, mask_threshold) -> MergedNodule:
    ks = np.array([m[0] for m in members])
    boxes = np.stack([m[1] for m in members])
    scores = np.array([m[2] for m in members])
    x1, y1 = boxes[:, 0].min(), boxes[:, 1].min()
    x2, y2 = boxes[:, 2].max(), boxes[:, 3].max()
    k0, k1 = int(ks.min()), int(ks.max()) + 1
    i0, j0 = int(np.floor(x1)), int(np.floor(y1))
    i1, j1 = int(np.ceil(x2)), int(np.ceil(y2))
    i0, j0 = max(0, i0), max(0, j0)
    if shape is not None:
        i1, j1 = min(shape[2], i1), min(shape[1], j1)
    i1, j1 = max(i1, i0 + 1), max(j1, j0 + 1)

    mask = None
    if all(m[3] is not None for m in members):
        mask = np.zeros((k1 - k0, j1 - j0, i1 - i0), bool)
        for k, _, _, m2 in members:
            crop = np.asarray(m2)[j0:j1, i0:i1]
            binm = crop >= mask_threshold if crop.dtype != bool else crop
            mask[k - k0, : binm.shape[0], : binm.shape[1]] |= binm
    if mask is not None and mask.any():  # an all-empty mask falls back to the box centres
        c = mask_centroid(mask)
        centre = (c[0] + i0, c[1] + j0, c[2] + k0)
    else:
        w = np.clip(scores, 1e-6, None)
        cx = (boxes[:, 0] + boxes[:, 2]) / 2.0 - 0.5  # box coordinate -> continuous pixel index
        cy = (boxes[:, 1] + boxes[:, 3]) / 2.0 - 0.5
        centre = (float(np.average(cx, weights=w)), float(np.average(cy, weights=w)), float(np.average(ks, weights=w)))

    nod = MergedNodule(
        score=float(scores.max()), slices=sorted(set(int(k) for k in ks)),
        box_xyxy=(float(x1), float(y1), float(x2), float(y2)), box_voxel=(i0, j0, k0, i1, j1, k1),
        centre_ijk=centre, mask=mask,
        members=[{"slice": int(k), "box": tuple(float(v) for v in b), "score": float(s)} for k, b, s, _ in members],
    )
    if ct is not None:
        img = ct.image
        nod.centre_lps = tuple(float(v) for v in img.TransformContinuousIndexToPhysicalPoint(list(centre)))
        corners = np.array([img.TransformContinuousIndexToPhysicalPoint([float(a) - 0.5, float(b) - 0.5, float(c) - 0.5])
                            for a in (i0, i1) for b in (j0, j1) for c in (k0, k1)])
        nod.box_lps_min = tuple(float(v) for v in corners.min(0))
        nod.box_lps_max = tuple(float(v) for v in corners.max(0))
    return nod


def mask_centroid(mask: np.ndarray) -> tuple[float, float, float]:
    """Centroid (i, j, k) in voxel indices of a non-empty bool (z, y, x) mask, from its axis
    projections (no index arrays of every voxel: a mass's mask has millions).

    Raises:
        ValueError: empty mask.
    """
    m = np.asarray(mask, bool)
    n = int(np.count_nonzero(m))
    if n == 0:
        raise ValueError("centroid of an empty mask")
    pz = np.count_nonzero(m, axis=(1, 2))
    py = np.count_nonzero(m, axis=(0, 2))
    px = np.count_nonzero(m, axis=(0, 1))
    return (float(np.dot(np.arange(len(px)), px) / n), float(np.dot(np.arange(len(py)), py) / n),
            float(np.dot(np.arange(len(pz)), pz) / n))


def nodules_to_label_map(nodules: Sequence[MergedNodule], shape_zyx) -> np.ndarray:
    """Label map on the CT grid: voxel value n = nodule n (1-based, in the given order); where
    masks overlap the earlier (higher-scoring, as returned by the merge) nodule wins.

    Args:
        nodules: merged nodules (those without masks are skipped).
        shape_zyx: CT array shape.

    Returns:
        uint16 (z, y, x).

    Raises:
        ValueError: a nodule box outside ``shape_zyx``.
    """
    out = np.zeros(tuple(shape_zyx), np.uint16)
    for n, nd in enumerate(nodules, start=1):
        if nd.mask is None:
            continue
        i0, j0, k0, i1, j1, k1 = nd.box_voxel
        if k1 > out.shape[0] or j1 > out.shape[1] or i1 > out.shape[2]:
            raise ValueError(f"nodule box {nd.box_voxel} outside shape {tuple(shape_zyx)}")
        region = out[k0:k1, j0:j1, i0:i1]
        region[nd.mask & (region == 0)] = n
    return out


def detections_from_output(output: dict, slice_index: int, offset_xy=(0, 0), full_shape_yx=None,
                           mask_threshold: float = MASK_THRESHOLD) -> dict:
    """Convert one torchvision output dict (for the stack centred on ``slice_index``) to a
    slice-detection dict for :func:`merge_slice_detections`.

    Args:
        output: model output: "boxes" (N, 4), "scores" (N,), optional "masks" (N, 1, h, w).
        slice_index: k of the stack's centre slice.
        offset_xy: (x0, y0) px of the network input's origin in the full slice (when the
            search ran on a crop, e.g. the lung bounds).
        full_shape_yx: (H, W) of the full slice; needed to place masks of a crop.
        mask_threshold: binarisation of the mask probabilities.

    Returns:
        {"slice", "boxes" (N, 4) float64 full-slice px, "scores" (N,), "masks" (N, H, W)
        bool (only when the output has masks)}.

    Raises:
        ValueError: masks of a crop without ``full_shape_yx``.
    """
    boxes = _np(output["boxes"]).astype(float).reshape(-1, 4).copy()
    ox, oy = offset_xy
    boxes[:, [0, 2]] += ox
    boxes[:, [1, 3]] += oy
    det = {"slice": int(slice_index), "boxes": boxes, "scores": _np(output["scores"]).astype(float).ravel()}
    if "masks" in output:
        m = _as_masks(output["masks"], len(boxes)) >= mask_threshold
        if (ox, oy) != (0, 0) or full_shape_yx is not None:
            if full_shape_yx is None:
                raise ValueError("full_shape_yx is required to place the masks of a crop")
            full = np.zeros((len(boxes),) + tuple(full_shape_yx), bool)
            h, w = m.shape[1:]
            full[:, oy:oy + h, ox:ox + w] = m[:, : full_shape_yx[0] - oy, : full_shape_yx[1] - ox]
            m = full
        det["masks"] = m
    return det
