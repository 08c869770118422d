"""Slice-to-nodule aggregation for 2D networks (shared by training evaluation and inference)."""

from __future__ import annotations

import numpy as np


def nodule_logit_from_slices(slice_logits: np.ndarray, slice_areas: np.ndarray) -> float:
    """Nodule-level malignancy logit from per-slice logits of a 2D network.

    Area-weighted mean of the slice logits, weights = predicted nodule area per slice
    (pixels), so slices through the nodule's bulk count most; the plain mean if no slice
    has a predicted mask.  Not specified in the LNMSNet paper (2D slice classifier); we
    use this.

    Args:
        slice_logits: (S,) float logits.
        slice_areas: (S,) non-negative predicted areas (any unit).
    """
    lg = np.asarray(slice_logits, dtype=float)
    w = np.asarray(slice_areas, dtype=float)
    if w.sum() <= 0:
        return float(lg.mean())
    return float((lg * w).sum() / w.sum())


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))
