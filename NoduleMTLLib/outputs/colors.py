"""Display colours of nodule segments by malignancy probability (Slicer segments, DICOM SEG).

A fixed, documented ramp (display only: not from the papers, not a clinical cut-off):

=====================  =========  ==================
P(malignant)           colour     RGB (0-1)
=====================  =========  ==================
p < 0.3                green      (0.20, 0.80, 0.20)
0.3 <= p < 0.6         yellow     (0.95, 0.85, 0.10)
p >= 0.6               red        (0.90, 0.15, 0.15)
unknown (None / NaN)   grey       (0.60, 0.60, 0.60)
=====================  =========  ==================

The probability shown is the *reported* one (the calibrated ``malignancy_probability`` of every
output, :func:`reported_probability`); grey when there is none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: Upper bounds (exclusive) of the green and yellow bands.
PROBABILITY_COLOR_THRESHOLDS = (0.3, 0.6)
#: Band name -> RGB in [0, 1].
PROBABILITY_COLORS = {
    "low": (0.20, 0.80, 0.20),
    "intermediate": (0.95, 0.85, 0.10),
    "high": (0.90, 0.15, 0.15),
    "unknown": (0.60, 0.60, 0.60),
}


def probability_band(probability) -> str:
    """"low" | "intermediate" | "high" | "unknown" for P(malignant) (None / NaN -> "unknown").

    Raises:
        ValueError: a number outside [0, 1].
    """
    if probability is None:
        return "unknown"
    p = float(probability)
    if math.isnan(p):
        return "unknown"
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p:g}")
    lo, hi = PROBABILITY_COLOR_THRESHOLDS
    return "low" if p < lo else "intermediate" if p < hi else "high"


def probability_color(probability) -> tuple[float, float, float]:
    """RGB (0-1) of P(malignant) on the ramp above; grey when unknown.  Raises ValueError outside [0, 1]."""
    return PROBABILITY_COLORS[probability_band(probability)]


def probability_legend() -> str:
    """One-line legend of the ramp, for a GUI panel."""
    lo, hi = PROBABILITY_COLOR_THRESHOLDS
    return (f"Segment colour = the reported (calibrated) P(malignant): green < {lo:g} <= yellow < {hi:g} <= red; "
            "grey = unknown (research use only, not a clinical threshold)")


def primary_probability(networks: dict, order: Iterable[str] = ()) -> float | None:
    """P(malignant) of the first network in ``order`` (then in ``networks`` order) that has one.

    Args:
        networks: network id -> :class:`NoduleMTLLib.core.results.NetworkOutput` (``malignancy_probability``).
        order: preferred network order (the run's ``networks`` list).
    """
    ids = [n for n in order if n in networks] + [n for n in networks if n not in order]
    for nid in ids:
        p = networks[nid].malignancy_probability
        if p is not None and not math.isnan(float(p)):
            return float(p)
    return None


def reported_probability(nodule, order: Iterable[str] = ()) -> float | None:
    """The P(malignant) a nodule is shown with: its reported, calibrated ``malignancy_probability``
    (``NoduleMTLLib.models.calibration``; the one in every output), None when it has none (grey).  A
    network's raw output is never shown in its place (one probability everywhere).

    Args:
        nodule: a :class:`NoduleMTLLib.core.results.NoduleResult` (or anything with ``malignancy_probability``).
        order: ignored (kept for callers of the earlier signature).
    """
    p = getattr(nodule, "malignancy_probability", None)
    if p is not None and not math.isnan(float(p)):
        return float(p)
    return None
