"""Lung-RADS v2022 assessment category of a nodule at a baseline (first) screening CT.

Source: American College of Radiology, *Lung CT Screening Reporting & Data System
(Lung-RADS) v2022*, released November 2022 (assessment categories table and its notes);
summarised in Christensen J. et al., "ACR Lung-RADS v2022: Assessment Categories and
Management Recommendations", *Chest* 2024;165(3):738-753.

What is implemented (parenchymal nodules, **baseline rules only**):

* **Size** (notes, "Nodule size"): long and short axis measured to one decimal (mm), the
  *mean diameter* = their mean, reported to one decimal; the cut points apply to that
  rounded value.  Long / short axis are the mask's axial diameters
  (:func:`NoduleMTLLib.postprocess.axial_diameters`); v2022 allows any plane, we measure
  in the axial plane only.
* **Type** solid / part-solid / non-solid (ground-glass) from the HU composition of the
  mask (:func:`NoduleMTLLib.postprocess.nodule_type`: fraction of voxels >= -300 HU;
  a heuristic, not validated against radiologists).
* **Solid component** of part-solid nodules: the largest 26-connected component of the
  mask's voxels >= -300 HU (the same threshold as the composition estimate, so a nodule
  called part-solid always has one), measured like the nodule (mean of its long and short
  axial diameters, one decimal).
* **Benign calcification** -> category 1 only for a *completely* calcified nodule, read
  from HU: mean >= 200 HU and >= 50 % of the voxels >= 200 HU.  Central, popcorn and
  concentric (laminated) patterns and fat cannot be told from a mask's HU statistics:
  calcified voxels (or the DSMT-Net calcification head >= 0.5) give a *note* to check the
  pattern, never a category change.
* **4X** ("category 3 or 4 nodules with additional features or imaging findings that
  increase the suspicion of lung cancer") is never assigned: a spiculation or bubble-lucency
  probability >= 0.5 (DSMT-Net sign heads) on a category 3/4 nodule gives a *suggestion*
  with its reason.

Not implemented: follow-up rules (new / growing / stable nodules, which need a prior
scan), perifissural and juxtapleural category-2 rules, airway nodules, atypical cysts,
category 0, the S modifier.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import numpy as np

#: Lung-RADS categories in increasing order of suspicion (the per-scan category is the highest).
CATEGORY_ORDER = ("0", "1", "2", "3", "4A", "4B", "4X")

#: Guideline version applied.
VERSION = "Lung-RADS v2022 (ACR), baseline screening rules"

#: HU at and above which a mask voxel belongs to the solid component (as the composition estimate).
SOLID_COMPONENT_HU = -300.0
#: HU at and above which a voxel counts as calcified.
CALCIFIED_HU = 200.0
#: Complete calcification (category 1): mean HU and fraction of calcified voxels at least these.
COMPLETE_CALCIFICATION_MEAN_HU = 200.0
COMPLETE_CALCIFICATION_FRACTION = 0.5
#: Fraction of calcified voxels above which a note asks to check the calcification pattern.
CALCIFICATION_NOTE_FRACTION = 0.05
#: Sign probability (DSMT-Net) at and above which 4X is suggested for a category 3/4 nodule.
SUGGEST_4X_PROBABILITY = 0.5

#: The guideline's sentences (v2022 assessment categories), by rule key.
RULES = {
    "calcified": "1: nodule(s) with specific calcifications: complete, central, popcorn, concentric rings and "
                 "fat-containing nodules (here: completely calcified by HU)",
    "solid<6": "2: solid nodule(s) < 6 mm (< 113 mm3) at baseline",
    "solid6-8": "3: solid nodule(s) >= 6 to < 8 mm (>= 113 to < 268 mm3) at baseline",
    "solid8-15": "4A: solid nodule(s) >= 8 to < 15 mm (>= 268 to < 1,767 mm3) at baseline",
    "solid>=15": "4B: solid nodule(s) >= 15 mm (>= 1,767 mm3) at baseline, new, or growing",
    "partsolid<6": "2: part-solid nodule(s) < 6 mm total mean diameter (< 113 mm3) at baseline",
    "partsolid-solid<6": "3: part-solid nodule(s) >= 6 mm total mean diameter (>= 113 mm3) with solid component "
                         "< 6 mm (< 113 mm3) at baseline",
    "partsolid-solid6-8": "4A: part-solid nodule(s) >= 6 mm total mean diameter (>= 113 mm3) with solid component "
                          ">= 6 mm to < 8 mm (>= 113 to < 268 mm3) at baseline",
    "partsolid-solid>=8": "4B: part-solid nodule(s) with solid component >= 8 mm (>= 268 mm3) at baseline",
    "nonsolid<30": "2: non-solid nodule(s) (GGN) < 30 mm (< 14,137 mm3) at baseline, new, or growing",
    "nonsolid>=30": "3: non-solid nodule(s) (GGN) >= 30 mm (>= 14,137 mm3) at baseline or new",
}


def round1(value_mm: float) -> float:
    """``value_mm`` to one decimal, halves rounded up (how Lung-RADS reports sizes; not banker's rounding)."""
    return float(Decimal(repr(float(value_mm))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def mean_diameter_mm(long_axis_mm: float, short_axis_mm: float) -> float:
    """Lung-RADS v2022 nodule size: long and short axis each to one decimal (mm), their mean to one decimal (mm).

    Source: Lung-RADS v2022, notes ("Nodule size ... measure both the long and short axis to one
    decimal point in mm, and report mean nodule diameter to one decimal point").

    Raises:
        ValueError: a negative or non-finite axis.
    """
    a, b = float(long_axis_mm), float(short_axis_mm)
    if not (np.isfinite(a) and np.isfinite(b)) or a < 0 or b < 0:
        raise ValueError(f"axes must be finite and >= 0 mm, got {long_axis_mm!r}, {short_axis_mm!r}")
    return round1((round1(a) + round1(b)) / 2)


def categorize(nodule_type: str, size_mm: float, solid_component_mm: float | None = None,
               completely_calcified: bool = False) -> tuple[str, str]:
    """Baseline Lung-RADS v2022 category of one parenchymal nodule.

    Args:
        nodule_type: "solid", "part-solid", or "ground-glass" (= non-solid).
        size_mm: mean diameter (mm, one decimal; :func:`mean_diameter_mm`).
        solid_component_mm: part-solid only: mean diameter of the solid component (mm).
        completely_calcified: benign calcification -> category 1.

    Returns:
        (category, rule key of :data:`RULES`).

    Raises:
        ValueError: unknown type, negative size, part-solid without a solid component size.
    """
    if completely_calcified:
        return "1", "calcified"
    size = float(size_mm)
    if not np.isfinite(size) or size < 0:
        raise ValueError(f"size must be a finite number of mm >= 0, got {size_mm!r}")
    if nodule_type == "solid":
        if size < 6:
            return "2", "solid<6"
        if size < 8:
            return "3", "solid6-8"
        if size < 15:
            return "4A", "solid8-15"
        return "4B", "solid>=15"
    if nodule_type == "part-solid":
        if solid_component_mm is None:
            raise ValueError("a part-solid nodule needs the size of its solid component")
        solid = float(solid_component_mm)
        if size < 6:
            return "2", "partsolid<6"
        if solid >= 8:
            return "4B", "partsolid-solid>=8"
        if solid >= 6:
            return "4A", "partsolid-solid6-8"
        return "3", "partsolid-solid<6"
    if nodule_type in ("ground-glass", "non-solid"):
        return ("2", "nonsolid<30") if size < 30 else ("3", "nonsolid>=30")
    raise ValueError(f"unknown nodule type {nodule_type!r} (solid, part-solid, ground-glass)")


def solid_component_axes(mask: np.ndarray, ct, threshold_hu: float = SOLID_COMPONENT_HU) -> tuple[float, float]:
    """Long and short axial diameter (mm) of the largest connected solid part of a nodule mask.

    Solid part: mask voxels >= ``threshold_hu`` (HU), largest 26-connected component
    (scattered solid voxels, e.g. vessels crossing a ground-glass nodule, are not joined
    into one component).  (0.0, 0.0) when the mask has no solid voxel.

    Args:
        mask: bool (z, y, x) on the CT grid of ``ct`` (:class:`NoduleMTLLib.io.CTVolume`).
    """
    from skimage import measure

    from .postprocess import axial_diameters, bounding_box

    box = bounding_box(np.asarray(mask, bool))
    if box is None:
        return 0.0, 0.0
    solid = np.asarray(mask[box], bool) & (np.asarray(ct.array[box], np.float32) >= threshold_hu)
    if not solid.any():
        return 0.0, 0.0
    lab = measure.label(solid, connectivity=3)
    largest = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return axial_diameters(largest, ct)


def calcification(mask: np.ndarray, ct) -> dict:
    """HU calcification figures of a nodule mask: ``mean_hu``, ``calcified_fraction``
    (voxels >= :data:`CALCIFIED_HU`), ``complete`` (see the module docstring)."""
    from .postprocess import bounding_box

    box = bounding_box(np.asarray(mask, bool))
    if box is None:
        return {"mean_hu": None, "calcified_fraction": 0.0, "complete": False}
    hu = np.asarray(ct.array[box], np.float32)[np.asarray(mask[box], bool)]
    frac = float((hu >= CALCIFIED_HU).mean())
    mean = float(hu.mean())
    return {"mean_hu": mean, "calcified_fraction": frac,
            "complete": mean >= COMPLETE_CALCIFICATION_MEAN_HU and frac >= COMPLETE_CALCIFICATION_FRACTION}


def _sign(nodule, name: str) -> tuple[float | None, str | None]:
    """Highest probability of a radiological sign over the nodule's networks, and the network."""
    best = (None, None)
    for nid, out in (getattr(nodule, "networks", None) or {}).items():
        p = (getattr(out, "sign_probabilities", None) or {}).get(name)
        if p is not None and (best[0] is None or p > best[0]):
            best = (float(p), nid)
    return best


def assess_nodule(nodule, ct) -> dict | None:
    """``lung_rads`` record of one analysed nodule (:class:`NoduleMTLLib.results.NoduleResult`).

    Returns None for a nodule that was not found.  Otherwise a dict: ``category``,
    ``size_mm`` (mean diameter), ``long_axis_mm``, ``short_axis_mm``, ``type``,
    ``solid_component_mm`` (part-solid: mean diameter of the solid component; None for the
    other types, whose category does not use it), ``rule`` (the guideline sentence that
    fired), ``notes`` (calcification to check, no solid voxels), ``suggestions`` (4X, with
    its reason; never applied), ``version``.
    """
    if not nodule.found or nodule.mask is None or nodule.diameter_mm is None:
        return None
    long_ax, short_ax = float(nodule.diameter_mm), float(nodule.short_axis_mm or 0.0)
    size = mean_diameter_mm(long_ax, short_ax)
    ntype = nodule.type
    notes, suggestions = [], []
    solid_mm = None
    sl, ss = solid_component_axes(nodule.mask, ct)
    if ntype == "part-solid":
        solid_mm = mean_diameter_mm(sl, ss)
    if sl == 0.0:
        notes.append("no voxel >= -300 HU in the mask: no solid component (non-solid)")
    calc = calcification(nodule.mask, ct)
    p_calc, calc_net = _sign(nodule, "calcification")
    if not calc["complete"] and (calc["calcified_fraction"] >= CALCIFICATION_NOTE_FRACTION
                                 or (p_calc is not None and p_calc >= 0.5)):
        why = [f"{100 * calc['calcified_fraction']:.0f} % of voxels >= {CALCIFIED_HU:.0f} HU"]
        if p_calc is not None:
            why.append(f"calcification probability {p_calc:.2f} ({calc_net})")
        notes.append("calcification present (" + "; ".join(why) + "): if central, popcorn or concentric, "
                     "category 1 applies (pattern not assessed automatically)")
    try:
        category, key = categorize(ntype, size, solid_mm, calc["complete"])
    except ValueError as e:  # no composition estimate: no category rather than a guessed one
        return {"category": None, "size_mm": size, "long_axis_mm": round1(long_ax), "short_axis_mm": round1(short_ax),
                "type": ntype, "solid_component_mm": solid_mm, "rule": None, "notes": notes + [f"no category: {e}"],
                "suggestions": [], "version": VERSION}
    if category in ("3", "4A", "4B"):
        for sign in ("spiculation", "bubble_lucency"):
            p, net = _sign(nodule, sign)
            if p is not None and p >= SUGGEST_4X_PROBABILITY:
                suggestions.append(f"4X may apply: {sign.replace('_', ' ')} probability {p:.2f} ({net}); "
                                   "not applied, for the radiologist to judge")
    return {"category": category, "size_mm": size, "long_axis_mm": round1(long_ax), "short_axis_mm": round1(short_ax),
            "type": ntype, "solid_component_mm": solid_mm, "rule": RULES[key], "notes": notes,
            "suggestions": suggestions, "version": VERSION}


def scan_category(records) -> dict | None:
    """Per-scan category: the highest category over the nodules' ``lung_rads`` records (None entries skipped).

    Returns ``{"category", "nodule_ids" (the nodules with that category), "rule", "version"}``,
    or None when no nodule has a category (nothing found: that is not "no nodule", only
    the analysed points / candidates are assessed).
    """
    recs = [(i, r) for i, r in records if r is not None and r.get("category") is not None]
    if not recs:
        return None
    top = max((r["category"] for _, r in recs), key=CATEGORY_ORDER.index)
    return {"category": top, "nodule_ids": [i for i, r in recs if r["category"] == top],
            "rule": "highest category of the analysed nodules (baseline rules; nodules not analysed are not included)",
            "version": VERSION}
