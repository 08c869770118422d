"""Lung-RADS v2022 assessment category of a nodule at a baseline (first) screening CT.

Source: American College of Radiology, *Lung CT Screening Reporting & Data System
(Lung-RADS) v2022*, released November 2022 (assessment categories table and its notes);
summarised in Christensen J. et al., "ACR Lung-RADS v2022: Assessment Categories and
Management Recommendations", *Chest* 2024;165(3):738-753.

What is implemented (parenchymal nodules, **baseline rules only**):

* **Size** (notes, "Nodule size"): long and short axis measured to one decimal (mm), the
  *mean diameter* = their mean, reported to one decimal; the cut points apply to that
  rounded value.  Long / short axis are the mask's axial diameters
  (:func:`NoduleMTLLib.core.postprocess.axial_diameters`); v2022 allows any plane, we measure
  in the axial plane only.
* **Type** solid / part-solid / non-solid (ground-glass) from a *measured* two-stage
  logistic classifier (:func:`classify_type`; coefficients in ``Resources/Weights/clinical.json``,
  fitted by ``python -m training.clinical fit`` on the LIDC texture ratings of training +
  validation patients, chosen by patient-grouped CV over them): DSMT-Net's ``subsolid`` head,
  HU histogram features and the log volume of the mask (:func:`type_features`); runs without
  DSMT-Net use the HU-only model; without clinical.json, the HU rule of
  :func:`NoduleMTLLib.core.postprocess.nodule_type`.  The type comes with its probability.
* **Solid component** (every type; the category uses it for part-solid nodules): the
  largest 26-connected component of the mask's voxels >= -300 HU, its long / short axis and
  mean diameter (one decimal).  A solid component under :data:`SOLID_COMPONENT_MIN_PIXELS`
  pixels across gets a note (too small to measure reliably).
* **Size**: the mask is the default network's at its measured threshold (clinical.json
  ``mask_threshold``: chosen on validation patients so that the long axis matches the
  readers' masks (the union of their outlines) without lowering the Dice; 0.5 under-measured by ~10 %), and its
  long / short axis carry the network's measured size correction (clinical.json
  ``size_correction``, :func:`size_correction`: the remaining median bias against the readers'
  masks, 0.95x, over training + validation patients), applied by
  :func:`NoduleMTLLib.core.postprocess.measure_nodule` and recorded in ``NoduleResult.size_correction``.
* **Benign calcification** -> category 1 by a *measured* rule (:func:`benign_calcification`:
  the fraction of voxels >= 200 HU and where those voxels lie (:func:`calcification_pattern`:
  an eccentric calcification is not benign), chosen on training + validation patients against
  the LIDC calcification rating popcorn / laminated / solid / central); the reason is given in
  the notes.  Without the head or clinical.json: only a
  completely calcified nodule (mean >= 200 HU and >= 50 % of voxels >= 200 HU).  Other
  calcified voxels give a note to check the pattern.
* **4X** ("category 3 or 4 nodules with additional features or imaging findings that
  increase the suspicion of lung cancer") is never assigned: a spiculation or bubble-lucency
  probability >= 0.5 (DSMT-Net sign heads) on a category 3/4 nodule gives a *suggestion*
  with its reason.

Not implemented: follow-up rules (new / growing / stable nodules, which need a prior
scan), perifissural and juxtapleural category-2 rules, airway nodules, atypical cysts,
category 0, the S modifier.
"""

from __future__ import annotations

import json
import os
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

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

#: Measured clinical rules (mask threshold, type classifier, calcification rule), beside calibration.json.
CLINICAL_FILE = "clinical.json"
#: A solid component whose long axis is shorter than this many in-plane pixels cannot be measured.
SOLID_COMPONENT_MIN_PIXELS = 3

#: The guideline's sentences (v2022 assessment categories), by rule key.
RULES = {
    "calcified": "1: nodule(s) with specific calcifications: complete, central, popcorn, concentric rings and "
                 "fat-containing nodules",
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


_CLINICAL_CACHE: dict = {}


def clinical_path() -> Path | None:
    """``$NODULEMTL_CLINICAL`` if set, else the first ``clinical.json`` in the weights search path; None if none."""
    env = os.environ.get("NODULEMTL_CLINICAL")
    if env:
        return Path(env)
    from ..models.registry import weights_search_path

    for d in weights_search_path():
        p = Path(d) / CLINICAL_FILE
        if p.is_file():
            return p
    return None


def load_clinical(path=None) -> dict | None:
    """The measured clinical rules (``Resources/Weights/clinical.json``, written by
    ``python -m training.clinical fit --write``): ``mask_threshold`` (per network),
    ``nodule_type`` / ``nodule_type_hu_only`` (:func:`classify_type`), ``calcification``
    (:func:`benign_calcification`).  None when there is no file (then the HU rules apply).

    Raises:
        ValueError: the file exists but is not valid JSON or has an unknown format.
    """
    p = Path(path) if path is not None else clinical_path()
    if p is None or not p.is_file():
        return None
    key = (str(p), p.stat().st_mtime_ns)
    if key not in _CLINICAL_CACHE:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"clinical rules file {p}: {e}") from None
        if not isinstance(d, dict) or d.get("format") != 1:
            raise ValueError(f"clinical rules file {p}: format {d.get('format') if isinstance(d, dict) else d!r}, expected 1")
        _CLINICAL_CACHE.clear()
        _CLINICAL_CACHE[key] = d
    return _CLINICAL_CACHE[key]


def mask_threshold(network_id: str, default: float) -> float:
    """The measured mask threshold of a click network (``clinical.json``), else ``default``."""
    try:
        d = load_clinical()
    except ValueError:
        return default
    return float(((d or {}).get("mask_threshold") or {}).get(network_id, default))


def size_correction(network_id: str) -> dict | None:
    """The measured size correction of a click network's mask (``clinical.json`` ``size_correction``),
    or None (no file, unreadable file, or no correction for that network: axes reported as measured).

    Returns ``{"long_axis_factor", "short_axis_factor", "network", "fitted_on"}``: the factors
    (dimensionless, > 0) by which :func:`NoduleMTLLib.core.postprocess.measure_nodule` multiplies the
    long / short axis of that network's mask at its measured threshold (:func:`mask_threshold`):
    the inverse of the median ratio of the mask's axis to the LIDC readers' mask's (the union of their outlines)
    (``python -m training.clinical fit``, training + validation patients).
    """
    try:
        d = load_clinical()
    except ValueError:
        return None
    c = ((d or {}).get("size_correction") or {}).get(network_id)
    if not c:
        return None
    return {"long_axis_factor": float(c["long_axis_factor"]), "short_axis_factor": float(c["short_axis_factor"]),
            "network": network_id, "fitted_on": c.get("fitted_on", "")}


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
        mask: bool (z, y, x) on the CT grid of ``ct`` (:class:`NoduleMTLLib.core.io.CTVolume`).
    """
    from skimage import measure

    from ..core.postprocess import axial_diameters, bounding_box

    box = bounding_box(np.asarray(mask, bool))
    if box is None:
        return 0.0, 0.0
    solid = np.asarray(mask[box], bool) & (np.asarray(ct.array[box], np.float32) >= threshold_hu)
    if not solid.any():
        return 0.0, 0.0
    lab = measure.label(solid, connectivity=3)
    largest = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return axial_diameters(largest, ct)


#: HU percentiles of the mask used as nodule-type features.
HU_PERCENTILES = (10, 25, 50, 75, 90)
#: Normalised depth (distance to the mask's edge / the mask's largest such distance) at and above
#: which a voxel belongs to the nodule's central part (calcification pattern features).
CENTRAL_DEPTH = 0.5


def calcification_pattern(mask: np.ndarray, ct) -> dict:
    """Where the calcified voxels (>= :data:`CALCIFIED_HU`) of a nodule mask lie: the features that
    separate benign patterns (diffuse / solid, central, laminated, popcorn) from eccentric calcification
    or bone caught at the mask's edge.

    Depth of a mask voxel = its physical distance (mm, :func:`scipy.ndimage.distance_transform_edt`
    with the CT spacing, in 3D) to the nearest voxel outside the mask, divided by the largest depth
    of the mask (so 1 at the nodule's core, ~0 at its edge).  The central part is depth >=
    :data:`CENTRAL_DEPTH`.

    Args:
        mask: bool (z, y, x) on the grid of ``ct`` (:class:`NoduleMTLLib.core.io.CTVolume` or a box of it; HU).

    Returns:
        dict of floats in [0, 1]: ``calc_central_fraction`` (fraction of the calcified voxels in the
        central part; 0 without calcified voxels), ``central_calcified_fraction`` (fraction of the
        central part that is calcified), ``calc_mean_depth`` (mean normalised depth of the calcified
        voxels; 0 without any), ``calc_offset`` (distance between the centroids of the calcified voxels
        and of the mask, mm, divided by the mask's equivalent-sphere radius, capped at 1; 1 without
        calcified voxels).  An empty mask gives the no-calcification values.
    """
    from scipy import ndimage

    m = np.asarray(mask, bool)
    none = {"calc_central_fraction": 0.0, "central_calcified_fraction": 0.0, "calc_mean_depth": 0.0, "calc_offset": 1.0}
    if not m.any():
        return none
    sp = (float(ct.spacing[2]), float(ct.spacing[1]), float(ct.spacing[0]))  # z, y, x
    depth = ndimage.distance_transform_edt(np.pad(m, 1), sampling=sp)[1:-1, 1:-1, 1:-1]
    depth = depth / max(float(depth[m].max()), 1e-9)
    calc = m & (np.asarray(ct.array, np.float32) >= CALCIFIED_HU)
    if not calc.any():
        return none
    central = m & (depth >= CENTRAL_DEPTH)
    idx_m, idx_c = np.argwhere(m) * sp, np.argwhere(calc) * sp
    radius = (3 * m.sum() * float(np.prod(sp)) / (4 * np.pi)) ** (1 / 3)
    off = float(np.linalg.norm(idx_c.mean(0) - idx_m.mean(0))) / max(radius, 1e-9)
    return {"calc_central_fraction": float((calc & central).sum() / calc.sum()),
            "central_calcified_fraction": float((calc & central).sum() / max(central.sum(), 1)),
            "calc_mean_depth": float(depth[calc].mean()), "calc_offset": float(min(off, 1.0))}


def mask_measurements(mask, ct) -> dict:
    """Lung-RADS size and HU composition figures of one nodule mask (the type / calcification features).

    Args:
        mask: bool (z, y, x) on the grid of ``ct`` (:class:`NoduleMTLLib.core.io.CTVolume`, HU), or a
            :class:`~NoduleMTLLib.core.consensus.MaskBox` on that grid (box + offset: the same
            figures, no full-grid array; what :func:`classify_nodule` / :func:`assess_nodule` pass).

    Returns:
        dict of floats: ``long_axis_mm`` / ``short_axis_mm`` (axial, same slice,
        :func:`NoduleMTLLib.core.postprocess.axial_diameters`), ``mean_diameter_mm``
        (:func:`mean_diameter_mm`), ``volume_mm3``, ``mean_hu``, ``hu_p10`` ... ``hu_p90``,
        ``frac_ge_-300`` / ``frac_ge_-100`` / ``frac_ge_200`` (fractions of voxels at or above
        those HU), ``solid_long_axis_mm`` / ``solid_short_axis_mm`` / ``solid_mean_diameter_mm``
        (largest connected part >= :data:`SOLID_COMPONENT_HU`, :func:`solid_component_axes`),
        the calcification pattern features of :func:`calcification_pattern`, ``n_voxels``.  Empty mask: ``{"n_voxels": 0}``.
    """
    from ..core.consensus import MaskBox
    from ..core.postprocess import axial_diameters, bounding_box

    if isinstance(mask, MaskBox):  # every figure below is computed on the mask's box
        box, mb = mask.slices, np.asarray(mask.array, bool)
        if not mb.any():
            return {"n_voxels": 0}
    else:
        m = np.asarray(mask, bool)
        box = bounding_box(m)
        if box is None:
            return {"n_voxels": 0}
        mb = m[box]
    hu = np.asarray(ct.array[box], np.float32)[mb]
    la, sa = axial_diameters(mb, ct)
    sl, ss = solid_component_axes(mb, _BoxCT(ct, box))
    out = {"n_voxels": int(mb.sum()), "long_axis_mm": la, "short_axis_mm": sa, "mean_diameter_mm": mean_diameter_mm(la, sa),
           "volume_mm3": float(mb.sum() * np.prod(ct.spacing)), "mean_hu": float(hu.mean()),
           "frac_ge_-300": float((hu >= -300).mean()), "frac_ge_-100": float((hu >= -100).mean()),
           "frac_ge_200": float((hu >= CALCIFIED_HU).mean()),
           "solid_long_axis_mm": sl, "solid_short_axis_mm": ss, "solid_mean_diameter_mm": mean_diameter_mm(sl, ss)}
    for q, v in zip(HU_PERCENTILES, np.percentile(hu, HU_PERCENTILES)):
        out[f"hu_p{q}"] = float(v)
    out.update(calcification_pattern(mb, _BoxCT(ct, box)))
    return out


#: Smallest volume (mm3) the ``log_volume_mm3`` type feature takes (a one-voxel mask of a fine grid
#: is ~0.2 mm3; the floor keeps the log finite for an empty or degenerate measurement).
LOG_VOLUME_FLOOR_MM3 = 1.0


def type_features(measurements: dict, signs: dict | None = None) -> dict:
    """Named features of the nodule-type classifier.

    Every number of :func:`mask_measurements`, plus:

    * ``solid_ratio``: solid component mean diameter / nodule mean diameter (0 for an empty
      component or an empty mask);
    * ``log_volume_mm3``: natural log of the mask's volume (mm3, floored at
      :data:`LOG_VOLUME_FLOOR_MM3`; present when ``volume_mm3`` is).  Issue 22, third round: the same
      HU histogram means less for a small nodule, whose partial-volume rim (voxels half lung) lowers
      its HU figures; with the volume beside them the subsolid model separates small solid nodules
      from subsolid ones better (patient-grouped CV, ``docs/clinical_rules.md``);
    * ``logit_subsolid``: logit of DSMT-Net's ``subsolid`` head, when the run has it.

    Args:
        measurements: :func:`mask_measurements` (dict of floats; non-numbers are skipped).
        signs: sign probabilities in [0, 1] by name, or None.
    Returns:
        dict name -> float.
    """
    from ..models.calibration import logit

    f = {k: float(v) for k, v in measurements.items() if isinstance(v, (int, float))}
    md = float(measurements.get("mean_diameter_mm") or 0.0)
    f["solid_ratio"] = float(measurements.get("solid_mean_diameter_mm") or 0.0) / md if md > 0 else 0.0
    if isinstance(measurements.get("volume_mm3"), (int, float)):
        f["log_volume_mm3"] = float(np.log(max(float(measurements["volume_mm3"]), LOG_VOLUME_FLOOR_MM3)))
    p = (signs or {}).get("subsolid")
    if p is not None:
        f["logit_subsolid"] = float(logit(float(p)))
    return f


def classify_type(features: dict, model: dict) -> dict | None:
    """Nodule type from the measured two-stage classifier of ``clinical.json`` (``nodule_type``).

    Stage 1: P(subsolid) = logistic regression of the named features (a
    :class:`NoduleMTLLib.models.calibration.LinearStack`); subsolid when >= ``subsolid_threshold``.
    Stage 2 (subsolid only): P(ground-glass | subsolid), ground-glass when >= ``ground_glass_threshold``.

    Args:
        features: :func:`type_features`; model: the JSON dict.
    Returns:
        ``{"type", "probability" (of that type: P(solid) = 1 - Ps, P(part-solid) = Ps (1 - Pg),
        P(ground-glass) = Ps Pg), "probabilities" (all three)}``, or None when a feature is missing.
    """
    from ..models.calibration import LinearStack

    s1, s2 = LinearStack.from_dict(model["subsolid"]), LinearStack.from_dict(model["ground_glass"])
    if any(k not in features for k in s1.features + s2.features):
        return None
    ps = float(s1(np.array([[features[k] for k in s1.features]]))[0])
    pg = float(s2(np.array([[features[k] for k in s2.features]]))[0])
    probs = {"solid": 1 - ps, "part-solid": ps * (1 - pg), "ground-glass": ps * pg}
    if ps < float(model["subsolid_threshold"]):
        t = "solid"
    else:
        t = "ground-glass" if pg >= float(model["ground_glass_threshold"]) else "part-solid"
    return {"type": t, "probability": round(probs[t], 4), "probabilities": {k: round(v, 4) for k, v in probs.items()}}


class _BoxCT:
    """The part of a CT inside a box, with the CT's geometry (for functions that read ``array``/``spacing``/``image``)."""

    def __init__(self, ct, box):
        self.array, self.spacing, self.image = np.asarray(ct.array[box]), ct.spacing, ct.image


def calcification(mask: np.ndarray, ct) -> dict:
    """HU calcification figures of a nodule mask: ``mean_hu``, ``calcified_fraction``
    (voxels >= :data:`CALCIFIED_HU`), ``complete`` (see the module docstring)."""
    from ..core.postprocess import bounding_box

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


def nodule_type_of(features: dict, clinical: dict | None) -> dict:
    """Type of one nodule: the measured classifier of ``clinical.json`` (with DSMT-Net's
    ``subsolid`` head when the run has it, else the HU-only model), else the HU rule.

    Returns ``{"type", "probability" (None for the HU rule), "probabilities", "method"}``.
    """
    from ..core.postprocess import nodule_type

    for key, what in (("nodule_type", "classifier (DSMT-Net subsolid head + HU features)"),
                      ("nodule_type_hu_only", "classifier (HU features; no DSMT-Net subsolid head in this run)")):
        model = (clinical or {}).get(key)
        if model:
            r = classify_type(features, model)
            if r is not None:
                return {**r, "method": f"measured {what}, clinical.json"}
    frac = features.get("frac_ge_-300", 0.0)
    return {"type": nodule_type(frac), "probability": None, "probabilities": None,
            "method": f"HU rule: {100 * frac:.0f} % of voxels >= -300 HU (not validated)"}


def benign_calcification(meas: dict, p_head: float | None, clinical: dict | None) -> tuple[bool, str | None]:
    """Benign calcification (Lung-RADS 1) by the measured rule of ``clinical.json`` (``calcification``):
    ``rule`` "hu_central" (fraction of voxels >= 200 HU >= ``hu200_fraction_min`` **and** either the
    fraction of those calcified voxels in the nodule's central part >= ``central_fraction_min``
    (:func:`calcification_pattern`: a central / laminated / popcorn pattern, not an eccentric one) or
    a diffuse calcification, fraction >= ``diffuse_fraction_min`` (default
    :data:`COMPLETE_CALCIFICATION_FRACTION`: the calcified voxels fill the nodule, its core only a
    small part of them)), "head" (DSMT-Net calcification head >= ``head_min``), "hu" (fraction >= 200 HU only),
    "and" / "or" of head and fraction.  Without that file, or when the rule needs the head and the
    run has none, the HU rule of complete calcification (module docstring).

    Args:
        meas: :func:`mask_measurements` of the nodule's mask; p_head: DSMT-Net's calcification
            probability or None; clinical: :func:`load_clinical`.
    Returns (benign, reason: the figures that decided, or None when not benign).
    """
    frac = float(meas.get("frac_ge_200", 0.0))
    rule = (clinical or {}).get("calcification")
    if rule and (p_head is not None or rule["rule"] in ("hu", "or", "hu_central")):
        h = p_head is not None and rule.get("head_min") is not None and p_head >= float(rule["head_min"])
        f = rule.get("hu200_fraction_min") is not None and frac >= float(rule["hu200_fraction_min"])
        central = float(meas.get("calc_central_fraction", 0.0))
        c = rule.get("central_fraction_min") is not None and central >= float(rule["central_fraction_min"])
        diffuse = frac >= float(rule.get("diffuse_fraction_min") or COMPLETE_CALCIFICATION_FRACTION)
        hit = {"head": h, "hu": f, "and": h and f, "or": h or f, "hu_central": f and (c or diffuse)}[rule["rule"]]
        if not hit:
            return False, None
        why = []
        if h:
            why.append(f"calcification probability {p_head:.2f} >= {float(rule['head_min']):.2f} (DSMT-Net)")
        if f:
            why.append(f"{100 * frac:.0f} % of voxels >= {CALCIFIED_HU:.0f} HU (>= {100 * float(rule['hu200_fraction_min']):.0f} %)")
        if rule["rule"] == "hu_central" and c:
            why.append(f"{100 * central:.0f} % of them in the nodule's central part (>= "
                       f"{100 * float(rule['central_fraction_min']):.0f} %: not eccentric)")
        elif rule["rule"] == "hu_central":
            why.append(f"diffuse (>= {100 * float(rule.get('diffuse_fraction_min') or COMPLETE_CALCIFICATION_FRACTION):.0f} "
                       "% of the voxels: complete calcification)")
        return True, "benign calcification by the measured rule (clinical.json): " + " and ".join(why)
    mean = float(meas.get("mean_hu", -1000.0))
    if mean >= COMPLETE_CALCIFICATION_MEAN_HU and frac >= COMPLETE_CALCIFICATION_FRACTION:
        return True, f"completely calcified: mean {mean:.0f} HU, {100 * frac:.0f} % of voxels >= {CALCIFIED_HU:.0f} HU"
    return False, None


def _mask_of(nodule):
    """The nodule's mask as its :class:`~NoduleMTLLib.core.consensus.MaskBox` (``NoduleResult.mask_box``:
    no full-grid array is built), or ``nodule.mask`` for an object without one; None when it has none."""
    if hasattr(nodule, "mask_box"):
        return nodule.mask_box
    return getattr(nodule, "mask", None)


def classify_nodule(nodule, ct, measurements: dict | None = None) -> dict | None:
    """Type of a found nodule (:func:`nodule_type_of` on :func:`mask_measurements` of its mask, read
    as its MaskBox, and DSMT-Net's ``subsolid`` head when the run has it); None when not found.

    Returns ``{"type", "probability", "probabilities", "method", "measurements"}``.
    """
    mask = _mask_of(nodule) if nodule.found else None
    if mask is None:
        return None
    try:
        clinical = load_clinical()
    except ValueError:
        clinical = None
    meas = measurements if measurements is not None else mask_measurements(mask, ct)
    signs = {}
    p, _ = _sign(dsmt_only(nodule), "subsolid")
    if p is not None:
        signs["subsolid"] = p
    return {**nodule_type_of(type_features(meas, signs), clinical), "measurements": meas}


def assess_nodule(nodule, ct, type_result: dict | None = None) -> dict | None:
    """``lung_rads`` record of one analysed nodule (:class:`NoduleMTLLib.core.results.NoduleResult`).

    Args:
        nodule: the analysed nodule (mask on the grid of ``ct``; read as its MaskBox, ``mask_box``).
        ct: :class:`NoduleMTLLib.core.io.CTVolume` (HU).
        type_result: :func:`classify_nodule` of this nodule (what :func:`NoduleMTLLib.service.assessment.annotate_result`
            passes, after setting ``nodule.type`` from it); None = take ``nodule.type`` as given.

    Returns None for a nodule that was not found.  Otherwise a dict: ``category``,
    ``size_mm`` (mean diameter), ``long_axis_mm``, ``short_axis_mm``, ``type``,
    ``type_probability`` (of that type; None for the HU rule or a given type),
    ``type_probabilities``, ``type_method``, ``solid_component`` (``long_axis_mm``,
    ``short_axis_mm``, ``mean_diameter_mm`` of the largest connected part >= -300 HU, any
    type), ``solid_component_mm`` (part-solid: its mean diameter; None for the other types,
    whose category does not use it), ``calcification`` (``benign``, ``reason``,
    ``calcified_fraction``, ``head_probability``), ``rule`` (the guideline sentence that
    fired), ``notes``, ``suggestions`` (4X, with its reason; never applied), ``version``.
    """
    mask = _mask_of(nodule) if nodule.found else None
    if mask is None or nodule.diameter_mm is None:
        return None
    try:
        clinical = load_clinical()
    except ValueError:
        clinical = None
    meas = (type_result or {}).get("measurements") or mask_measurements(mask, ct)
    long_ax, short_ax = float(nodule.diameter_mm), float(nodule.short_axis_mm or 0.0)
    size = mean_diameter_mm(long_ax, short_ax)
    typ = type_result or {"type": nodule.type, "probability": None, "probabilities": None, "method": "given"}
    ntype = typ["type"]
    notes, suggestions = [], []
    sl, ss = meas["solid_long_axis_mm"], meas["solid_short_axis_mm"]
    solid = {"long_axis_mm": round1(sl), "short_axis_mm": round1(ss), "mean_diameter_mm": meas["solid_mean_diameter_mm"]}
    solid_mm = meas["solid_mean_diameter_mm"] if ntype == "part-solid" else None
    if sl == 0.0:
        notes.append("no voxel >= -300 HU in the mask: no solid component (non-solid)")
    elif ntype == "part-solid" and sl < SOLID_COMPONENT_MIN_PIXELS * min(ct.spacing[0], ct.spacing[1]):
        notes.append(f"solid component too small to measure reliably (long axis {sl:.1f} mm, under "
                     f"{SOLID_COMPONENT_MIN_PIXELS} pixels): its size {solid_mm} mm is indicative")
    p_calc, calc_net = _sign(dsmt_only(nodule), "calcification")
    benign, why = benign_calcification(meas, p_calc, clinical)
    calc = {"benign": benign, "reason": why, "calcified_fraction": round(meas["frac_ge_200"], 4),
            "head_probability": p_calc}
    if not benign and (meas["frac_ge_200"] >= CALCIFICATION_NOTE_FRACTION or (p_calc is not None and p_calc >= 0.5)):
        w = [f"{100 * meas['frac_ge_200']:.0f} % of voxels >= {CALCIFIED_HU:.0f} HU"]
        if p_calc is not None:
            w.append(f"calcification probability {p_calc:.2f} ({calc_net})")
        if "calc_central_fraction" in meas and meas["frac_ge_200"] > 0:
            w.append(f"{100 * meas['calc_central_fraction']:.0f} % of the calcified voxels in the central part")
        notes.append("calcification present (" + "; ".join(w) + ") but not called benign: if central, popcorn, "
                     "laminated or diffuse, category 1 applies; eccentric calcification is not benign")
    base = {"size_mm": size, "long_axis_mm": round1(long_ax), "short_axis_mm": round1(short_ax), "type": ntype,
            "type_probability": typ["probability"], "type_probabilities": typ["probabilities"], "type_method": typ["method"],
            "solid_component": solid, "solid_component_mm": solid_mm, "calcification": calc, "version": VERSION}
    try:
        category, key = categorize(ntype, size, solid_mm, benign)
    except ValueError as e:  # no composition estimate: no category rather than a guessed one
        return {"category": None, **base, "rule": None, "notes": notes + [f"no category: {e}"], "suggestions": []}
    if category in ("3", "4A", "4B"):
        for sign in ("spiculation", "bubble_lucency"):
            p, net = _sign(nodule, sign)
            if p is not None and p >= SUGGEST_4X_PROBABILITY:
                suggestions.append(f"4X may apply: {sign.replace('_', ' ')} probability {p:.2f} ({net}); "
                                   "not applied, for the radiologist to judge")
    if key == "calcified":
        notes.insert(0, f"category 1: {why}")
    return {"category": category, **base, "rule": RULES[key], "notes": notes, "suggestions": suggestions}


class _DsmtOnly:
    def __init__(self, nodule):
        nets = getattr(nodule, "networks", None) or {}
        self.networks = {k: v for k, v in nets.items() if k == "dsmtnet"}


def dsmt_only(nodule):
    """The nodule seen through DSMT-Net's outputs only (the heads the measured rules were fitted on)."""
    return _DsmtOnly(nodule)


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
