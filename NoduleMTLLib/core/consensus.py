"""Consensus of several click networks on one nodule, and how much they disagree.

When more than one network analyses a click (``nodulemtl analyze --networks
lnmsnet,detguided,...``), each network gives its own mask, malignancy probability and,
for some, radiological-sign probabilities.  This module combines them into one answer and
says when the networks do not agree.  None of the seed papers combines networks; every
rule below is our choice:

* **Consensus mask** - voxels segmented by *at least half* of the networks that found the
  nodule: a majority, with ties counted in (:data:`INCLUDE_TIES`): 1 of 1, 1 of 2, 2 of 3,
  2 of 4.  With two networks this is the **union**.  Chosen on held-out data, not a priori:
  on the validation patients' HU VOIs (113 nodules, ``python -m training.report consensus
  lnmsnet,detguided --split val``) the 3D Dice against the readers was 0.727 for the union,
  0.630 for the intersection (the strict majority of two), 0.660 and 0.688 for LNMSNet and
  the detection-guided model alone: both networks under-segment more often than they leak,
  so a voxel either of them finds is more often nodule than not.  The test patients
  confirm it (132 VOIs: union 0.698, intersection 0.595, single networks 0.633 / 0.637;
  ``training/RESULTS.md``).  The strict majority (2 of 2 = intersection, 3 of 4) is
  available as ``majority_mask(..., include_ties=False)``.  One network that found the
  nodule: its own mask.
* **Consensus malignancy probability** - the mean of the probabilities of the networks
  that found the nodule (a network that segmented nothing has no probability).
  **Signs** - for each sign name, the mean over the networks that give that sign, with
  the number of networks averaged (``sign_counts``).
* **Disagreement figures** - probability spread (max - min) and standard deviation
  (population, ``ddof=0``) over the found networks; Dice of every pair of found masks, their
  mean and minimum; the number of networks run and the number that found the nodule.
* **Disagreement level** - ``"high"`` when any of: the probability spread exceeds
  :data:`DISAGREEMENT_SPREAD` (0.3), the minimum pairwise Dice is below
  :data:`DISAGREEMENT_MIN_DICE` (0.5), or some networks found the nodule and others did
  not; ``"low"`` otherwise (also when no network found anything:
  they agree); ``None`` with a single network (nothing to compare).  ``reasons`` lists the criteria that fired, in words.

Masks are handled as :class:`MaskBox` (bounding box on the CT grid + offset) so keeping
every network's mask for every nodule costs kilobytes, not a full CT-sized array each.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: Consensus mask rule: voxels of at least half of the networks (True: 2 networks -> union)
#: or of more than half (False: strict majority, 2 networks -> intersection).  See the module docstring.
INCLUDE_TIES = True
#: Probability spread (max - min, probability units) above which the networks disagree.
#: 0.3 means e.g. 0.35 vs 0.65: the networks fall on different sides of 0.5 with some margin.
DISAGREEMENT_SPREAD = 0.3
#: Minimum pairwise Dice below which the masks disagree.  LIDC-IDRI readers agree with
#: each other at Dice ~0.7-0.8 on nodules of 5-30 mm; below 0.5 two masks differ by more
#: than readers usually do (e.g. one includes a vessel, or one is half the size).
DISAGREEMENT_MIN_DICE = 0.5


@dataclass(frozen=True)
class MaskBox:
    """A boolean mask on a CT grid stored as its bounding box.

    Attributes:
        offset_zyx: index (k, j, i) of the box's first voxel on the full grid.
        array: bool array (dz, dy, dx), the mask inside the box (never empty).
        shape_zyx: shape (nz, ny, nx) of the full CT grid.
    """

    offset_zyx: tuple[int, int, int]
    array: np.ndarray
    shape_zyx: tuple[int, int, int]

    @classmethod
    def from_full(cls, mask: np.ndarray | None) -> MaskBox | None:
        """Crop a full-grid bool mask (z, y, x) to its bounding box; None for None or an empty mask."""
        if mask is None:
            return None
        m = np.asarray(mask, bool)
        if m.ndim != 3:
            raise ValueError(f"mask must be 3D (z, y, x), got shape {m.shape}")
        nz = np.nonzero(m)
        if not len(nz[0]):
            return None
        lo = tuple(int(a.min()) for a in nz)
        hi = tuple(int(a.max()) + 1 for a in nz)
        return cls(lo, m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), tuple(int(s) for s in m.shape))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Slices of the box on the full grid."""
        return tuple(slice(o, o + s) for o, s in zip(self.offset_zyx, self.array.shape))

    @property
    def voxels(self) -> int:
        """Number of mask voxels."""
        return int(self.array.sum())

    def to_full(self) -> np.ndarray:
        """The mask on the full grid, bool (z, y, x)."""
        out = np.zeros(self.shape_zyx, bool)
        out[self.slices] = self.array
        return out

    def paste(self, lo: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
        """The mask inside the box starting at ``lo`` with ``shape`` (which must contain this box)."""
        out = np.zeros(shape, bool)
        rel = tuple(slice(o - low, o - low + s) for o, low, s in zip(self.offset_zyx, lo, self.array.shape))
        out[rel] = self.array
        return out


def _union_box(boxes):
    lo = tuple(min(b.offset_zyx[d] for b in boxes) for d in range(3))
    hi = tuple(max(b.offset_zyx[d] + b.array.shape[d] for b in boxes) for d in range(3))
    return lo, tuple(h - low for h, low in zip(hi, lo))


def box_intersection(a: MaskBox, b: MaskBox) -> int:
    """Number of voxels in both masks (|A∩B|), computed on the overlap of their boxes only.

    Raises ValueError if the grids differ.
    """
    if a.shape_zyx != b.shape_zyx:
        raise ValueError(f"masks on different grids: {a.shape_zyx} vs {b.shape_zyx}")
    lo = tuple(max(oa, ob) for oa, ob in zip(a.offset_zyx, b.offset_zyx))
    hi = tuple(min(oa + sa, ob + sb) for oa, sa, ob, sb in zip(a.offset_zyx, a.array.shape, b.offset_zyx, b.array.shape))
    if any(h <= low for low, h in zip(lo, hi)):
        return 0
    sa = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, a.offset_zyx))
    sb = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, b.offset_zyx))
    return int(np.count_nonzero(np.logical_and(a.array[sa], b.array[sb])))


def box_dice(a: MaskBox, b: MaskBox) -> float:
    """Dice 2|A∩B| / (|A| + |B|) of two non-empty masks on the same grid (in [0, 1]).

    Raises ValueError if the grids differ.
    """
    return float(2.0 * box_intersection(a, b) / (a.voxels + b.voxels))


def majority_mask(boxes: list[MaskBox], include_ties: bool = INCLUDE_TIES) -> MaskBox | None:
    """Voxels in at least half of the masks (``include_ties``; 2 masks -> union) or in more
    than half (strict majority; 2 masks -> intersection).

    Args:
        boxes: one or more non-empty masks on the same grid.
        include_ties: count a tie (exactly half of the masks) as majority.
    Returns:
        The consensus as a :class:`MaskBox`, or None when no voxel has a majority.
    Raises:
        ValueError: no masks, or masks on different grids.
    """
    if not boxes:
        raise ValueError("majority_mask needs at least one mask")
    if len({b.shape_zyx for b in boxes}) != 1:
        raise ValueError("masks on different grids")
    lo, shape = _union_box(boxes)
    votes = np.zeros(shape, np.int16)
    for b in boxes:
        votes += b.paste(lo, shape)
    m = votes * 2 >= len(boxes) if include_ties else votes * 2 > len(boxes)
    if not m.any():
        return None
    full_box = MaskBox.from_full(m)  # crop within the union box, then shift to the full grid
    return MaskBox(tuple(int(o + low) for o, low in zip(full_box.offset_zyx, lo)), full_box.array, boxes[0].shape_zyx)


@dataclass
class Consensus:
    """Consensus of the click networks on one nodule (see the module docstring for the rules).

    Attributes:
        n_networks: networks run; n_found: networks that segmented the nodule;
        networks_found: their ids, in run order.
        mask: consensus mask (:class:`MaskBox`; at least half of the found networks) or None
            (no network found the nodule).
        malignancy_probability: mean P(malignant) of the found networks, in [0, 1], or None.
        sign_probabilities: sign name -> mean probability over the networks giving it;
        sign_counts: sign name -> number of networks averaged.
        probability_spread: max - min of the probabilities (None with fewer than 2);
        probability_std: their population standard deviation (None with fewer than 2).
        dice_pairwise: "a|b" -> Dice of networks a and b's masks (found networks only);
        dice_pairwise_mean / dice_pairwise_min: their mean / minimum (None with fewer than 2).
        disagreement: "low" | "high" | None (single network); reasons: the criteria that fired.
        mask_voxels: voxels of the consensus mask as read back from ``nodules.json``
            (:meth:`from_dict`, where ``mask`` is None); None: counted from ``mask``.
    """

    n_networks: int
    n_found: int
    networks_found: list[str]
    mask: MaskBox | None
    malignancy_probability: float | None
    sign_probabilities: dict[str, float] = field(default_factory=dict)
    sign_counts: dict[str, int] = field(default_factory=dict)
    probability_spread: float | None = None
    probability_std: float | None = None
    dice_pairwise: dict[str, float] = field(default_factory=dict)
    dice_pairwise_mean: float | None = None
    dice_pairwise_min: float | None = None
    disagreement: str | None = None
    reasons: list[str] = field(default_factory=list)
    mask_voxels: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (no mask array; ``mask_voxels`` instead)."""
        r = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
        return {
            "n_networks": self.n_networks, "n_found": self.n_found, "networks_found": list(self.networks_found),
            "mask_rule": ("at least half of the networks that found the nodule (2 networks: union)" if INCLUDE_TIES
                          else "strict majority of the networks that found the nodule (2 networks: intersection)"),
            "mask_voxels": self.mask_voxels if self.mask_voxels is not None else 0 if self.mask is None else self.mask.voxels,
            "malignancy_probability": r(self.malignancy_probability),
            "sign_probabilities": {k: r(v) for k, v in self.sign_probabilities.items()},
            "sign_counts": dict(self.sign_counts),
            "probability_spread": r(self.probability_spread), "probability_std": r(self.probability_std),
            "dice_pairwise": {k: r(v) for k, v in self.dice_pairwise.items()},
            "dice_pairwise_mean": r(self.dice_pairwise_mean), "dice_pairwise_min": r(self.dice_pairwise_min),
            "disagreement": self.disagreement, "reasons": list(self.reasons),
            "thresholds": {"probability_spread_above": DISAGREEMENT_SPREAD, "min_pairwise_dice_below": DISAGREEMENT_MIN_DICE},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Consensus:
        """The record of :meth:`to_dict` (``nodules.json``) back; ``mask`` is None (the JSON
        holds only ``mask_voxels``), ``mask_rule`` and ``thresholds`` are this version's."""
        return cls(n_networks=int(d["n_networks"]), n_found=int(d["n_found"]), networks_found=list(d.get("networks_found") or []),
                   mask=None, malignancy_probability=d.get("malignancy_probability"),
                   sign_probabilities=dict(d.get("sign_probabilities") or {}), sign_counts=dict(d.get("sign_counts") or {}),
                   probability_spread=d.get("probability_spread"), probability_std=d.get("probability_std"),
                   dice_pairwise=dict(d.get("dice_pairwise") or {}), dice_pairwise_mean=d.get("dice_pairwise_mean"),
                   dice_pairwise_min=d.get("dice_pairwise_min"), disagreement=d.get("disagreement"),
                   reasons=list(d.get("reasons") or []), mask_voxels=d.get("mask_voxels"))


def compute_consensus(masks: Mapping[str, MaskBox | np.ndarray | None], probabilities: Mapping[str, float | None],
                      signs: Mapping[str, Mapping[str, float]] | None = None) -> Consensus:
    """Combine the networks' answers for one nodule.

    Args:
        masks: network id -> its mask (:class:`MaskBox`, a full-grid bool (z, y, x) array, or
            None / empty when the network found nothing), in run order.  All on the same grid.
        probabilities: network id -> P(malignant) in [0, 1], None or NaN when not found.
        signs: network id -> {sign name: probability in [0, 1]} (networks without sign
            heads may be absent or map to {}).

    Returns:
        :class:`Consensus`.  A network counts as having found the nodule when its mask is
        non-empty; only found networks enter the vote, the means and the spreads.

    Raises:
        ValueError: no networks, a probability outside [0, 1], masks on different grids.
    """
    if not masks:
        raise ValueError("compute_consensus needs at least one network")
    boxes = {k: (m if isinstance(m, MaskBox) or m is None else MaskBox.from_full(m)) for k, m in masks.items()}
    found = [k for k, b in boxes.items() if b is not None]
    probs = {}
    for k in found:
        p = probabilities.get(k)
        if p is None or (isinstance(p, float) and math.isnan(p)):
            continue
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"probability of {k} is {p}, outside [0, 1]")
        probs[k] = float(p)
    c = Consensus(n_networks=len(boxes), n_found=len(found), networks_found=found,
                  mask=majority_mask([boxes[k] for k in found]) if found else None,
                  malignancy_probability=float(np.mean(list(probs.values()))) if probs else None)
    sums: dict[str, list[float]] = {}
    for k in found:
        for name, v in ((signs or {}).get(k) or {}).items():
            if v is not None and not math.isnan(float(v)):
                sums.setdefault(name, []).append(float(v))
    c.sign_probabilities = {n: float(np.mean(v)) for n, v in sums.items()}
    c.sign_counts = {n: len(v) for n, v in sums.items()}
    if len(probs) >= 2:
        pv = np.array(list(probs.values()))
        c.probability_spread, c.probability_std = float(pv.max() - pv.min()), float(pv.std())
    for a, b in itertools.combinations(found, 2):
        c.dice_pairwise[f"{a}|{b}"] = box_dice(boxes[a], boxes[b])
    if c.dice_pairwise:
        dv = list(c.dice_pairwise.values())
        c.dice_pairwise_mean, c.dice_pairwise_min = float(np.mean(dv)), float(min(dv))
    if c.n_networks >= 2:
        # compared at 6 decimals so that e.g. 0.55 - 0.25 (= 0.30000000000000004) is not "above 0.3"
        if c.probability_spread is not None and round(c.probability_spread, 6) > DISAGREEMENT_SPREAD:
            c.reasons.append(f"malignancy probabilities spread {c.probability_spread:.2f} > {DISAGREEMENT_SPREAD}")
        if c.dice_pairwise_min is not None and round(c.dice_pairwise_min, 6) < DISAGREEMENT_MIN_DICE:
            c.reasons.append(f"minimum pairwise mask Dice {c.dice_pairwise_min:.2f} < {DISAGREEMENT_MIN_DICE}")
        if 0 < c.n_found < c.n_networks:
            missing = [k for k in boxes if k not in found]
            c.reasons.append(f"{', '.join(missing)} segmented nothing at this point")
        if c.n_found >= 2 and c.mask is None:
            c.reasons.append("no voxel is segmented by a majority of the networks")
        c.disagreement = "high" if c.reasons else "low"  # no network found it: they agree
    return c
