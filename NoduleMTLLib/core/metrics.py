"""Evaluation metrics (numpy): Dice, IoU (Jaccard), ROC AUC, sensitivity/specificity."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient 2|A∩B| / (|A|+|B|) of two boolean arrays of equal shape.

    Returns 1.0 when both are empty (perfect agreement on "no nodule").
    Raises ValueError on a shape mismatch.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {ref.shape}")
    s = pred.sum() + ref.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, ref).sum() / s)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index |A∩B| / |A∪B| (1.0 when both empty)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    u = np.logical_or(pred, ref).sum()
    return 1.0 if u == 0 else float(np.logical_and(pred, ref).sum() / u)


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction).

    Args:
        labels: 0/1 array-like; scores: float array-like of the same length.
    Returns:
        AUC in [0, 1]; NaN if only one class is present.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s, method="average")  # ties share their average rank
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def binary_classification_stats(labels, probs, threshold: float = 0.5) -> dict:
    """Accuracy, sensitivity (recall of class 1), specificity and AUC at a probability threshold."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=float)
    pred = p >= threshold
    tp = int((pred & (y == 1)).sum()); tn = int((~pred & (y == 0)).sum())
    fp = int((pred & (y == 0)).sum()); fn = int((~pred & (y == 1)).sum())
    return {
        "n": int(len(y)), "n_positive": int((y == 1).sum()),
        "accuracy": (tp + tn) / max(1, len(y)),
        "sensitivity": tp / max(1, tp + fn),
        "specificity": tn / max(1, tn + fp),
        "auc": roc_auc(y, p),
    }
