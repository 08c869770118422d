"""Measured clinical rules of the click path (issue 22): mask threshold and size correction
(size), nodule type, benign calcification, from the DSMT-Net cache of ``training.clinical_cache``.

    python -m training.clinical table --threshold T     # per-VOI features at mask threshold T (cache)
    python -m training.clinical fit [--write] [--test]  # choose on train + val; --test: score test once
    python -m training.clinical size-tradeoff           # threshold vs CV-refitted size correction (train + val)

Everything is chosen on **training + validation patients** (their ``lidc_vois`` VOIs, 3D HU
click path at the labelled centre); the test patients are scored once with the chosen rules.
DSMT-Net was trained on the training patients: its heads are in-sample there.  First round:
the type classifier was *fitted* on training patients and *chosen* (feature set, threshold) on
validation patients, whose outputs the network never saw.  Second round (shipped): its stage 1 is
chosen by patient-grouped CV over training + validation (:func:`fit_subsolid_cv`: 13 subsolid
nodules in validation alone are too few for a threshold), the size correction
(:func:`fit_size_correction`) and the pattern-aware calcification rule (:func:`fit_calcification`)
on training + validation pooled; the in-sample head is reported as a caveat, not used by the
calcification rule.

References (per VOI, from ``lidc_vois/labels.csv`` and the readers' mask: the union of their outlines):

* type from the median LIDC texture rating: <= 2 ground-glass, 3 part-solid, >= 4 solid
  ("subsolid" = texture <= 3);
* benign calcification from the LIDC calcification rating: 1 popcorn, 2 laminated, 3 solid,
  5 central (Lung-RADS v2022 benign patterns); 4 non-central and 6 absent are not benign;
* long / short axis and Lung-RADS mean diameter of the readers' (union) mask with the same
  function as the product (``NoduleMTLLib.core.postprocess.axial_diameters``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from training.clinical_cache import cache_dir, replay, voi_rows
from training.data import REPO

REPORT_DIR = REPO / "training" / "reports" / "clinical"
WEIGHTS_FILE = REPO / "Resources" / "Weights" / "clinical.json"
BENIGN_CALCIFICATION = (1, 2, 3, 5)
HU_PERCENTILES = (10, 25, 50, 75, 90)


def texture_class(texture: float) -> str:
    """LIDC texture rating -> "ground-glass" (<= 2), "part-solid" (3), "solid" (>= 4)."""
    t = float(texture)
    return "ground-glass" if t <= 2 else ("solid" if t >= 4 else "part-solid")


def mask_features(mask: np.ndarray, ct) -> dict:
    """HU and size features of one mask (see :func:`NoduleMTLLib.clinical.lung_rads.type_features`)."""
    from NoduleMTLLib.clinical import lung_rads

    return lung_rads.mask_measurements(mask, ct)


def table_row(row: dict, threshold: float) -> dict:
    from NoduleMTLLib.core.metrics import dice

    npz = np.load(cache_dir() / f"{row['patient_id']}_{row['nodule_id']}.npz")
    out, ct = replay(row, threshold, npz)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(row["mask_path"])) > 0
    rec = {"patient_id": row["patient_id"], "nodule_id": row["nodule_id"], "split": row["split"],
           "texture": float(row["Texture_value"]), "calcification_rating": int(float(row["Calcification_value"])),
           "malignancy_median": float(row["Malignancy_value"]), "found": out.mask is not None,
           "probability": None if out.mask is None else float(out.malignancy_probability),
           "signs": out.sign_probabilities, "ref": mask_features(ref, ct)}
    if out.mask is not None:
        rec["pred"] = mask_features(out.mask, ct)
        rec["dice"] = float(dice(out.mask, ref))
    else:
        rec["pred"], rec["dice"] = None, 0.0
    return rec


def table_path(threshold: float, splits=("train", "val", "test")) -> Path:
    return cache_dir().parent / "clinical_tables" / f"table_t{threshold:.2f}_{'_'.join(splits)}.json"


def build_table(threshold: float, splits=("train", "val", "test"), log=print) -> list[dict]:
    rows = [r for r in voi_rows(tuple(splits)) if (cache_dir() / f"{r['patient_id']}_{r['nodule_id']}.npz").is_file()]
    out = []
    for i, r in enumerate(rows):
        out.append(table_row(r, threshold))
        if log and i % 100 == 0:
            log(f"t={threshold}: {i + 1}/{len(rows)}")
    p = table_path(threshold, splits)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out))
    return out


def load_table(threshold: float, splits=("train", "val", "test")) -> list[dict]:
    p = table_path(threshold, splits)
    if not p.is_file():
        return build_table(threshold, splits)
    return json.loads(p.read_text())


# --- studies --------------------------------------------------------------------------------
THRESHOLDS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)
#: Largest drop of the validation Dice median (from the 0.5 threshold's) a size correction may cost.
#: 0: the issue's "Dice median no lower than now".  (A first choice with 0.005 gave 0.2; it lowered
#: the Dice of the sample nodule below the CLI test's 0.6 and was replaced - see docs/clinical_rules.md.)
DICE_TOLERANCE = 0.0
#: Candidate feature sets of the type classifier (names of NoduleMTLLib.clinical.lung_rads.type_features).
TYPE_FEATURE_SETS = {
    "head": ["logit_subsolid"],
    "hu": ["frac_ge_-300", "frac_ge_-100", "mean_hu", "hu_p10", "hu_p25", "hu_p50", "hu_p75", "hu_p90", "solid_ratio"],
    "head+hu": ["logit_subsolid", "frac_ge_-300", "frac_ge_-100", "mean_hu", "hu_p10", "hu_p25", "hu_p50", "hu_p75",
                "hu_p90", "solid_ratio"],
    "head+hu_small": ["logit_subsolid", "frac_ge_-300", "mean_hu", "hu_p50", "solid_ratio"],
}
#: Third round (issue 22): the HU sets with the mask's log volume (``lung_rads.type_features``'s
#: ``log_volume_mm3``: a small nodule's partial-volume rim lowers its HU figures).
TYPE_FEATURE_SETS["hu+size"] = TYPE_FEATURE_SETS["hu"] + ["log_volume_mm3"]
TYPE_FEATURE_SETS["head+hu+size"] = TYPE_FEATURE_SETS["head+hu"] + ["log_volume_mm3"]
L2_GRID = (0.01, 0.1, 1.0)


def _split(tab, *names):
    return [r for r in tab if r["split"] in names]


def size_figures(tab: list[dict]) -> dict:
    """Long-axis / mean-diameter ratios of the found nodules' masks to the readers' (union) masks, and Dice."""
    f = [r for r in tab if r["found"] and r["ref"].get("n_voxels")]
    la = np.array([r["pred"]["long_axis_mm"] / r["ref"]["long_axis_mm"] for r in f])
    md = np.array([r["pred"]["mean_diameter_mm"] / max(r["ref"]["mean_diameter_mm"], 0.1) for r in f])
    d = np.array([r["dice"] for r in tab])
    return {"n": len(tab), "found": len(f), "long_axis_ratio_median": float(np.median(la)),
            "long_axis_within_15pct": float(np.mean(np.abs(la - 1) <= 0.15)),
            "mean_diameter_ratio_median": float(np.median(md)),
            "mean_diameter_within_15pct": float(np.mean(np.abs(md - 1) <= 0.15)),
            "dice_mean": float(d.mean()), "dice_median": float(np.median(d))}


def dilate_inplane(mask: np.ndarray, spacing_yx_mm, radius_mm: float) -> np.ndarray:
    """Dilate a 3D mask slice by slice (axial plane only) by a disk of ``radius_mm``.

    The footprint holds the pixels whose centre lies within ``radius_mm`` (+1e-6) of the centre
    pixel, with the in-plane ``spacing_yx_mm`` (so 0.75 mm on a 0.7 mm grid is the 4-neighbour
    cross).  Used as the measured correction of the click networks' under-segmentation against
    the LIDC readers' outlines, rejected by measurement (it lowers the Dice).  Pixels pushed past
    the array's edge are lost (pad the array first if that matters).

    Args:
        mask: bool (z, y, x); spacing_yx_mm: (dy, dx) mm; radius_mm: >= 0 (0 returns a copy).
    Returns: bool (z, y, x), same shape.
    """
    m = np.asarray(mask, bool)
    if radius_mm <= 0 or not m.any():
        return m.copy()
    dy, dx = float(spacing_yx_mm[0]), float(spacing_yx_mm[1])
    ry, rx = int(radius_mm // dy), int(radius_mm // dx)
    yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    fp = ((yy * dy) ** 2 + (xx * dx) ** 2) <= radius_mm ** 2 + 1e-6
    return ndimage.binary_dilation(m, structure=fp[None])


DILATIONS_MM = (0.0, 0.75, 1.0, 1.5)
SIZE_THRESHOLDS = (0.5, 0.4, 0.3)


def size_study(split: str = "val", thresholds=SIZE_THRESHOLDS, dilations=DILATIONS_MM, log=print) -> dict:
    """Long-axis ratio to the readers' masks and Dice for every (mask threshold, in-plane dilation),
    on one split's cached VOIs (the click path replayed, the dilation applied as in the product)."""
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.core.postprocess import axial_diameters

    rows = [r for r in voi_rows((split,)) if (cache_dir() / f"{r['patient_id']}_{r['nodule_id']}.npz").is_file()]
    acc = {(t, d): {"ratio": [], "dice": []} for t in thresholds for d in dilations}
    for i, r in enumerate(rows):
        npz = np.load(cache_dir() / f"{r['patient_id']}_{r['nodule_id']}.npz")
        ref = sitk.GetArrayFromImage(sitk.ReadImage(r["mask_path"])) > 0
        ct = None
        ref_long = None
        for t in thresholds:
            out, ct = replay(r, t, npz, ct)
            if ref_long is None:
                ref_long = axial_diameters(ref, ct)[0]
            for d in dilations:
                if out.mask is None:
                    acc[(t, d)]["dice"].append(0.0)
                    continue
                m = dilate_inplane(out.mask, (ct.spacing[1], ct.spacing[0]), d)
                acc[(t, d)]["ratio"].append(axial_diameters(m, ct)[0] / ref_long)
                acc[(t, d)]["dice"].append(float(dice(m, ref)))
        if log and i % 25 == 0:
            log(f"size study {split}: {i + 1}/{len(rows)}")
    out = {}
    for (t, d), v in acc.items():
        ra, di = np.array(v["ratio"]), np.array(v["dice"])
        out[f"{t:.2f}/{d:.2f}"] = {"threshold": t, "dilation_mm": d, "n": len(di), "long_axis_ratio_median": float(np.median(ra)),
                                   "long_axis_within_15pct": float(np.mean(np.abs(ra - 1) <= 0.15)),
                                   "dice_mean": float(di.mean()), "dice_median": float(np.median(di))}
    return out


def choose_size_correction(study: dict) -> dict:
    """On validation figures: the (threshold, dilation) whose long-axis ratio median is closest to 1,
    among those whose Dice median is not below the uncorrected (0.5, 0 mm) one's minus
    :data:`DICE_TOLERANCE` (ties: more within 15 %)."""
    base = study["0.50/0.00"]["dice_median"]
    ok = [v for v in study.values() if v["dice_median"] >= base - DICE_TOLERANCE]
    return min(ok, key=lambda v: (round(abs(v["long_axis_ratio_median"] - 1), 3), -v["long_axis_within_15pct"]))


def choose_threshold(tables: dict[float, list[dict]]) -> tuple[float, dict]:
    """The mask threshold whose **validation** long-axis ratio median is closest to 1 without lowering
    the validation Dice median by more than :data:`DICE_TOLERANCE` from the 0.5 threshold's (ties: the
    higher threshold).  Validation patients only: on training patients the network's masks are
    in-sample (less biased).  Thresholds below the cache's slice-extension threshold are not studied."""
    fig = {t: {"val": size_figures(_split(tab, "val"))} for t, tab in tables.items()}
    base = fig[0.5]["val"]["dice_median"]
    ok = [t for t in tables if fig[t]["val"]["dice_median"] >= base - DICE_TOLERANCE]
    best = min(ok, key=lambda t: (abs(fig[t]["val"]["long_axis_ratio_median"] - 1), -t))
    return best, fig


def fit_size_correction(tab: list[dict]) -> dict:
    """Size correction of the network's mask at the chosen threshold: per axis, the inverse of the
    median ratio (mask's axis / readers' (union) mask's axis, both with
    ``postprocess.axial_diameters``) over the found nodules of the training + validation patients.
    A multiplicative factor per axis: a log-linear function of the measured size, or added short-axis,
    volume and HU terms, did not raise the share within 15 % in patient-grouped 5-fold CV
    (0.75-0.76 for all, docs/clinical_rules.md)."""
    f = [r for r in _split(tab, "train", "val") if r["found"] and r["ref"].get("n_voxels")]
    rl = np.array([r["pred"]["long_axis_mm"] / r["ref"]["long_axis_mm"] for r in f])
    rs = np.array([r["pred"]["short_axis_mm"] / max(r["ref"]["short_axis_mm"], 1e-6) for r in f])
    return {"long_axis_factor": float(1 / np.median(rl)), "short_axis_factor": float(1 / np.median(rs)), "n": len(f)}


def oof_size_correction(recs: list[dict], k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold size-correction factors: for every row of ``recs`` the (long, short) factors of
    :func:`fit_size_correction` fitted on the rows of the other folds (patient-grouped,
    :func:`_patient_folds` with ``k`` and ``seed``: the folds of :func:`type_lung_rads_cv`).

    Args:
        recs: training / validation table rows (:func:`table_row`); rows of other splits are
            ignored by the fit (they still get factors).
    Returns:
        (long factors, short factors): float64 arrays of shape (len(recs),).
    """
    fid = _patient_folds(recs, k, seed)
    fl, fs = np.empty(len(recs)), np.empty(len(recs))
    for f in range(k):
        c = fit_size_correction([r for r, i in zip(recs, fid) if i != f])
        fl[fid == f], fs[fid == f] = c["long_axis_factor"], c["short_axis_factor"]
    return fl, fs


def corrected_size_ratios(recs: list[dict], corr=None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per found nodule of ``recs`` with a reference mask: its long / short axis and Lung-RADS
    mean-diameter ratio to the readers' (union) mask's, with a size correction.

    Args:
        recs: table rows (:func:`table_row`).
        corr: None (as measured), one correction ``{"long_axis_factor", "short_axis_factor"}``
            (:func:`fit_size_correction`) for every row, or a pair of arrays (long, short factors),
            one value per row of ``recs`` (e.g. :func:`oof_size_correction`'s out-of-fold factors).
    Returns:
        (the rows kept, {"long_axis", "short_axis", "mean_diameter": float64 arrays, one ratio per row kept}).
    Raises:
        ValueError: factor arrays whose length is not ``len(recs)``.
    """
    from NoduleMTLLib.clinical.lung_rads import mean_diameter_mm

    keep = np.array([bool(r["found"] and r["ref"].get("n_voxels")) for r in recs], bool)
    if corr is None:
        fl = fs = np.ones(len(recs))
    elif isinstance(corr, dict):
        fl, fs = np.full(len(recs), corr["long_axis_factor"]), np.full(len(recs), corr["short_axis_factor"])
    else:
        fl, fs = (np.asarray(c, float) for c in corr)
        if fl.shape != (len(recs),) or fs.shape != (len(recs),):
            raise ValueError(f"factor arrays of shape {fl.shape} / {fs.shape}, expected ({len(recs)},)")
    f = [(r, a, b) for r, a, b, k in zip(recs, fl, fs, keep) if k]
    la = np.array([a * r["pred"]["long_axis_mm"] / r["ref"]["long_axis_mm"] for r, a, b in f])
    sa = np.array([b * r["pred"]["short_axis_mm"] / max(r["ref"]["short_axis_mm"], 1e-6) for r, a, b in f])
    md = np.array([mean_diameter_mm(a * r["pred"]["long_axis_mm"], b * r["pred"]["short_axis_mm"])
                   / max(r["ref"]["mean_diameter_mm"], 0.1) for r, a, b in f])
    return [r for r, _, _ in f], {"long_axis": la, "short_axis": sa, "mean_diameter": md}


def corrected_size_figures(recs: list[dict], corr=None) -> dict:
    """Long / short axis and Lung-RADS mean-diameter ratios to the readers' masks with a size correction
    (``corr`` as :func:`corrected_size_ratios`'s; None: as measured): median and share within 15 %."""
    kept, ratios = corrected_size_ratios(recs, corr)
    out = {"n": len(kept)}
    for k, v in ratios.items():
        out[f"{k}_ratio_median"] = float(np.median(v))
        out[f"{k}_within_15pct"] = float(np.mean(np.abs(v - 1) <= 0.15))
    return out


def _xy(recs, feats, meas="pred"):
    from NoduleMTLLib.clinical.lung_rads import type_features

    X = np.array([[type_features(r[meas], r["signs"])[k] for k in feats] for r in recs], float)
    return X


def _balanced_weights(y) -> np.ndarray:
    """Per-sample weights giving both classes the same total weight (class weighting)."""
    y = np.asarray(y, float)
    n1 = max(float(y.sum()), 1.0)
    n0 = max(float(len(y) - y.sum()), 1.0)
    return np.where(y > 0, len(y) / (2 * n1), len(y) / (2 * n0))


def _fit_stack(X, y, feats, l2, balanced: bool = False):
    from NoduleMTLLib.models.calibration import LinearStack
    from training.calibration import fit_logistic

    mu, sd = X.mean(0), X.std(0)
    sd[sd <= 1e-9] = 1.0
    w, c = fit_logistic((X - mu) / sd, y, l2, _balanced_weights(y) if balanced else None)
    return LinearStack(tuple(feats), tuple(float(v) for v in mu), tuple(float(v) for v in sd),
                       tuple(float(v) for v in w), float(c))


def _balanced(y, yhat) -> float:
    y, yhat = np.asarray(y, bool), np.asarray(yhat, bool)
    return float((np.mean(yhat[y]) + np.mean(~yhat[~y])) / 2)


def _patient_folds(recs, k=5, seed=0) -> np.ndarray:
    """Fold index (0 .. k-1) of every record, all records of a patient in one fold (seeded shuffle)."""
    groups = np.array([r["patient_id"] for r in recs])
    ug = np.unique(groups)
    rng = np.random.default_rng(seed)
    fold = dict(zip(ug[rng.permutation(len(ug))], np.arange(len(ug)) % k))
    return np.array([fold[g] for g in groups])


def _grouped_oof(recs, feats, y, l2, k=5, seed=0, balanced=False):
    fid = _patient_folds(recs, k, seed)
    X = _xy(recs, feats)
    p = np.empty(len(y))
    for f in range(k):
        te, tr = fid == f, fid != f
        if len(np.unique(y[tr])) < 2:
            p[te] = y[tr].mean()
            continue
        p[te] = _fit_stack(X[tr], y[tr], feats, l2, balanced)(X[te])
    return p


#: Stage-1 (subsolid) choice by patient-grouped CV over training + validation patients (issue 22, item 3).
SUBSOLID_CV_REPEATS = 5
#: Out-of-fold specificity (solid nodules called solid) at which the subsolid threshold is set: a margin
#: above the done-when's 0.90, because the validation rows of the same CV came out ~0.02 below the pooled
#: figure (their solid nodules are less dense).
SUBSOLID_CV_SPECIFICITY = 0.93
SUBSOLID_CV_SETS = ("hu", "head+hu", "head+hu_small", "hu+size", "head+hu+size")
#: Second round's shipped type choice (stage 1 features / L2 / class weighting; stage 2 the same), the
#: comparison a new choice must beat out-of-fold (:func:`type_lung_rads_cv`).
SECOND_ROUND_TYPE = {"stage1": ("head+hu", 0.1, False), "stage2": ("head+hu", 0.01, False)}


def fit_subsolid_cv(tab: list[dict], sets: tuple[str, ...] = SUBSOLID_CV_SETS) -> dict:
    """Stage 1, P(subsolid) (texture <= 3), chosen by patient-grouped 5-fold CV (5 repeats) over the found
    nodules of the training + validation patients pooled (95 subsolid, 13 of them in validation: too few
    to choose a threshold on validation alone).

    Candidates: feature set (:data:`SUBSOLID_CV_SETS`) x L2 (:data:`L2_GRID`) x class weighting (none /
    balanced).  For each, the decision threshold is the :data:`SUBSOLID_CV_SPECIFICITY` quantile of the
    out-of-fold P(subsolid) of the solid nodules (median over the repeats); chosen: the highest mean
    out-of-fold subsolid recall at that threshold (ties: higher AUC).  The model is then fitted on all of
    them with that threshold.  Caveat, reported: DSMT-Net's ``subsolid`` head is in-sample on the training
    rows (trained there), so the head sets' pooled figures are optimistic; the validation rows' figures
    are given beside them."""
    from NoduleMTLLib.core.metrics import roc_auc

    pool = [r for r in _split(tab, "train", "val") if r["found"]]
    y = np.array([texture_class(r["texture"]) != "solid" for r in pool], float)
    isval = np.array([r["split"] == "val" for r in pool])
    tex = np.array([r["texture"] for r in pool])
    cands = []
    for name in sets:
        feats = TYPE_FEATURE_SETS[name]
        for l2 in L2_GRID:
            for bal in (False, True):
                P = [_grouped_oof(pool, feats, y, l2, seed=s, balanced=bal) for s in range(SUBSOLID_CV_REPEATS)]
                ths = [float(np.quantile(p[y == 0], SUBSOLID_CV_SPECIFICITY)) for p in P]
                calls = [p >= t for p, t in zip(P, ths)]
                c = {"features": name, "l2": l2, "class_weight": "balanced" if bal else None,
                     "threshold": float(np.median(ths)),
                     "cv_auc": float(np.mean([roc_auc(y, p) for p in P])),
                     "cv_recall": float(np.mean([k[y == 1].mean() for k in calls])),
                     "cv_recall_part_solid": float(np.mean([k[tex == 3].mean() for k in calls])),
                     "cv_solid_called_solid": float(np.mean([(~k[y == 0]).mean() for k in calls])),
                     "cv_val_rows_recall": float(np.mean([k[(y == 1) & isval].mean() for k in calls])),
                     "cv_val_rows_solid_called_solid": float(np.mean([(~k[(y == 0) & isval]).mean() for k in calls]))}
                cands.append(c)
    top = max(cands, key=lambda c: (round(c["cv_recall"], 4), c["cv_auc"]))
    feats = TYPE_FEATURE_SETS[top["features"]]
    # the out-of-fold threshold is applied to the model fitted on all rows (same features, L2, weighting)
    model = _fit_stack(_xy(pool, feats), y, feats, top["l2"], top["class_weight"] == "balanced")
    return {"model": model, "chosen": top, "candidates": cands, "n": len(pool), "n_subsolid": int(y.sum()),
            "specificity_target": SUBSOLID_CV_SPECIFICITY, "repeats": SUBSOLID_CV_REPEATS}


#: Stage 2 (ground-glass | subsolid) choice, third round: class weighting none / balanced, the CV
#: repeated (the second round had one unweighted 5-fold split).
STAGE2_WEIGHTS = (False, True)
STAGE2_REPEATS = 5


def nested_subsolid_cv(tab: list[dict], sets: tuple[str, ...], outer_repeats: int = 3, inner_repeats: int = 2) -> dict:
    """Nested patient-grouped CV of the stage-1 *choice* (:func:`fit_subsolid_cv`'s procedure, with
    ``inner_repeats`` instead of its 5 repeats): in every outer fold of the training + validation
    found nodules, the feature set (of ``sets``) x L2 x class weighting and the threshold (the
    :data:`SUBSOLID_CV_SPECIFICITY` quantile of the inner out-of-fold P on solid nodules) are chosen on
    the other folds alone, then applied to the held-out fold.  Gives the recall of the procedure, free
    of the optimism of picking the best of many candidates on the same out-of-fold figures.

    Returns: ``recall`` / ``part_solid_recall`` / ``solid_called_solid`` (means over ``outer_repeats``),
    ``recall_per_repeat``, ``chosen`` (the inner choices, (set, L2, balanced) per outer fold)."""
    pool = [r for r in _split(tab, "train", "val") if r["found"]]
    y = np.array([texture_class(r["texture"]) != "solid" for r in pool], float)
    tex = np.array([r["texture"] for r in pool])
    X = {k: _xy(pool, TYPE_FEATURE_SETS[k]) for k in sets}

    def choose(idx, seed):
        sub, yy, best = [pool[i] for i in idx], y[idx], None
        folds = [_patient_folds(sub, 5, seed + s) for s in range(inner_repeats)]
        for name in sets:
            for l2 in L2_GRID:
                for bal in (False, True):
                    rec, ths = [], []
                    for fid in folds:
                        p = np.empty(len(idx))
                        for f in range(5):
                            te, tr = fid == f, fid != f
                            p[te] = _fit_stack(X[name][idx][tr], yy[tr], TYPE_FEATURE_SETS[name], l2, bal)(X[name][idx][te])
                        th = float(np.quantile(p[yy == 0], SUBSOLID_CV_SPECIFICITY))
                        rec.append(float((p[yy == 1] >= th).mean()))
                        ths.append(th)
                    c = (round(float(np.mean(rec)), 4), name, l2, bal, float(np.median(ths)))
                    if best is None or c[0] > best[0]:
                        best = c
        return best

    rec, ps, spec, chosen = [], [], [], []
    for rep in range(outer_repeats):
        fid = _patient_folds(pool, 5, rep)
        call = np.zeros(len(pool), bool)
        for f in range(5):
            tr, te = np.nonzero(fid != f)[0], np.nonzero(fid == f)[0]
            _, name, l2, bal, th = choose(tr, 100 + 10 * rep + f)
            chosen.append([name, l2, bal])
            call[te] = _fit_stack(X[name][tr], y[tr], TYPE_FEATURE_SETS[name], l2, bal)(X[name][te]) >= th
        rec.append(float(call[y == 1].mean()))
        ps.append(float(call[tex == 3].mean()))
        spec.append(float((~call[y == 0]).mean()))
    return {"sets": list(sets), "recall": float(np.mean(rec)), "recall_per_repeat": rec, "part_solid_recall": float(np.mean(ps)),
            "solid_called_solid": float(np.mean(spec)), "outer_repeats": outer_repeats, "inner_repeats": inner_repeats,
            "chosen": chosen}


def fit_type(tab: list[dict], sets: tuple[str, ...] = tuple(TYPE_FEATURE_SETS), stage1_cv: bool = True,
             stage2_weights: tuple[bool, ...] = STAGE2_WEIGHTS, stage2_repeats: int = STAGE2_REPEATS) -> dict:
    """Two-stage nodule-type classifier (module docstring).  Stage 1 P(subsolid): with ``stage1_cv``
    (shipped since issue 22 item 3) :func:`fit_subsolid_cv` (patient-grouped CV over training +
    validation, class weights, threshold at a fixed out-of-fold solid specificity); without it, the
    first round's rule, kept as the comparison (``stage1_previous``): fitted on training patients,
    feature set / L2 / threshold chosen on validation patients by balanced accuracy.
    P(ground-glass | subsolid) chosen by patient-grouped 5-fold CV (``stage2_repeats`` repeats) over
    training + validation subsolid nodules (too few in validation alone: 13): feature set x L2 x class
    weighting (``stage2_weights``; balanced = both classes the same total weight, third round: 22
    part-solid vs 73 ground-glass nodules), the highest mean out-of-fold balanced accuracy at 0.5
    (ties: AUC), then fitted on all of them."""
    from NoduleMTLLib.core.metrics import roc_auc
    from NoduleMTLLib.core.postprocess import nodule_type

    tr = [r for r in _split(tab, "train") if r["found"]]
    va = [r for r in _split(tab, "val") if r["found"]]
    ytr = np.array([texture_class(r["texture"]) != "solid" for r in tr], float)
    yva = np.array([texture_class(r["texture"]) != "solid" for r in va], float)
    hu_rule_va = np.array([nodule_type(r["pred"]["frac_ge_-300"]) != "solid" for r in va])
    cands = []
    for name, feats in ((k, TYPE_FEATURE_SETS[k]) for k in sets):
        for l2 in L2_GRID:
            m = _fit_stack(_xy(tr, feats), ytr, feats, l2)
            pv = m(_xy(va, feats))
            ths = np.unique(np.round(pv, 3))
            best = max((float(_balanced(yva, pv >= t)), -abs(t - 0.5), float(t)) for t in ths)
            cands.append({"features": name, "l2": l2, "val_auc": roc_auc(yva, pv), "val_balanced_accuracy": best[0],
                          "threshold": best[2], "model": m})
    top = max(cands, key=lambda c: (c["val_balanced_accuracy"], c["val_auc"]))
    stage1 = {"features": top["features"], "l2": top["l2"], "threshold": top["threshold"],
              "val_auc": top["val_auc"], "val_balanced_accuracy": top["val_balanced_accuracy"],
              "hu_rule_val_balanced_accuracy": _balanced(yva, hu_rule_va),
              "candidates": [{k: v for k, v in c.items() if k != "model"} for c in cands]}
    stage1_model = top["model"]
    if stage1_cv:
        cv = fit_subsolid_cv(tab, tuple(k for k in sets if k in SUBSOLID_CV_SETS))
        previous = stage1
        stage1 = {**cv["chosen"], "method": "patient-grouped CV over training + validation",
                  "specificity_target": cv["specificity_target"], "n": cv["n"], "n_subsolid": cv["n_subsolid"],
                  "candidates": cv["candidates"], "previous": {k: v for k, v in previous.items() if k != "candidates"}}
        stage1_model = cv["model"]
    # stage 2: ground-glass vs part-solid among subsolid (reference) nodules of train + val
    sub = [r for r in tr + va if texture_class(r["texture"]) != "solid"]
    yg = np.array([texture_class(r["texture"]) == "ground-glass" for r in sub], float)
    c2 = []
    for name, feats in ((k, TYPE_FEATURE_SETS[k]) for k in sets):
        for l2 in L2_GRID:
            for bal in stage2_weights:
                P = [_grouped_oof(sub, feats, yg, l2, seed=sd, balanced=bal) for sd in range(stage2_repeats)]
                c2.append({"features": name, "l2": l2, "class_weight": "balanced" if bal else None,
                           "cv_auc": float(np.mean([roc_auc(yg, p) for p in P])),
                           "cv_balanced_accuracy": float(np.mean([_balanced(yg, p >= 0.5) for p in P])),
                           "cv_part_solid_right": float(np.mean([(p[yg == 0] < 0.5).mean() for p in P])),
                           "cv_ground_glass_right": float(np.mean([(p[yg == 1] >= 0.5).mean() for p in P]))})
    top2 = max(c2, key=lambda c: (round(c["cv_balanced_accuracy"], 4), c["cv_auc"]))
    m2 = _fit_stack(_xy(sub, TYPE_FEATURE_SETS[top2["features"]]), yg, TYPE_FEATURE_SETS[top2["features"]], top2["l2"],
                    top2["class_weight"] == "balanced")
    hu2 = np.array([nodule_type(r["pred"]["frac_ge_-300"]) == "ground-glass" for r in sub])
    stage2 = {"features": top2["features"], "l2": top2["l2"], "class_weight": top2["class_weight"], "threshold": 0.5,
              "repeats": stage2_repeats, "n": len(sub), "n_ground_glass": int(yg.sum()),
              "hu_rule_balanced_accuracy": _balanced(yg, hu2), "candidates": c2,
              "cv_auc": top2["cv_auc"], "cv_balanced_accuracy": top2["cv_balanced_accuracy"],
              "cv_part_solid_right": top2["cv_part_solid_right"], "cv_ground_glass_right": top2["cv_ground_glass_right"]}
    return {"subsolid": stage1_model, "ground_glass": m2, "stage1": stage1, "stage2": stage2}


#: The benign-calcification rule shipped before the pattern features (issue 22, first round): its
#: training + validation sensitivity is the one a new rule must keep.
PREVIOUS_CALCIFICATION = ("hu", None, 0.1, None)
CALC_GRID_HEAD = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALC_GRID_FRACTION = (0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.4, 0.5)
CALC_GRID_CENTRAL = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
#: "hu_central" also calls a diffuse calcification benign (the guideline's complete calcification: its
#: calcified voxels fill the nodule, so few of them lie in the core): not fitted, the library's
#: complete-calcification fraction.
DIFFUSE_CALCIFICATION = 0.5


def fit_calcification(tab: list[dict]) -> dict:
    """Benign-calcification rule (reference: LIDC calcification rating 1 popcorn, 2 laminated, 3 solid,
    5 central; 4 non-central and 6 absent are not benign), chosen on the found nodules of the
    **training + validation** patients pooled (92 benign, 647 not; validation alone holds 23 benign, all
    rated "solid", and no false call of the previous rule, so it cannot rank specificity).

    Candidates: "hu" (fraction of voxels >= 200 HU >= b), "hu_central" (that, and >= e of the calcified
    voxels in the nodule's central part, ``lung_rads.calcification_pattern``, or a diffuse calcification:
    fraction >= :data:`DIFFUSE_CALCIFICATION`), and, for information, the
    DSMT-Net head rules (head >= a; AND / OR with the fraction), which are not chosen: the head is
    in-sample on the training patients.  Chosen: among the HU rules whose sensitivity is not below the
    previous rule's (:data:`PREVIOUS_CALCIFICATION`: >= 10 % of voxels), the highest specificity (ties:
    higher sensitivity, then the simpler rule, then the larger thresholds)."""
    pool = [r for r in _split(tab, "train", "val") if r["found"]]
    res = []
    for name, recs in (("train_val", pool), ("val", [r for r in pool if r["split"] == "val"])):
        y = np.array([r["calcification_rating"] in BENIGN_CALCIFICATION for r in recs])
        head = np.array([r["signs"].get("calcification", 0.0) for r in recs])
        frac = np.array([r["pred"]["frac_ge_200"] for r in recs])
        cen = np.array([r["pred"].get("calc_central_fraction", 0.0) for r in recs])
        rules = [("hu", None, b, None) for b in CALC_GRID_FRACTION] \
            + [("hu_central", None, b, e) for b in CALC_GRID_FRACTION for e in CALC_GRID_CENTRAL] \
            + [("head", a, None, None) for a in CALC_GRID_HEAD] \
            + [(op, a, b, None) for op in ("and", "or") for a in CALC_GRID_HEAD for b in CALC_GRID_FRACTION]
        for i, (kind, a, b, e) in enumerate(rules):
            call = calcification_call(kind, a, b, head, frac, e, cen)
            if name == "train_val":
                res.append({"rule": kind, "head_min": a, "hu200_fraction_min": b, "central_fraction_min": e})
            res[i].update({f"{name}_sensitivity": float(call[y].mean()), f"{name}_specificity": float((~call[~y]).mean()),
                           f"{name}_false_benign": int((call & ~y).sum()), f"{name}_n": len(y), f"{name}_benign": int(y.sum())})
    prev = next(r for r in res if (r["rule"], r["head_min"], r["hu200_fraction_min"], r["central_fraction_min"])
                == PREVIOUS_CALCIFICATION)
    ok = [r for r in res if r["rule"] in ("hu", "hu_central") and r["train_val_sensitivity"] >= prev["train_val_sensitivity"]]
    best = max(ok, key=lambda r: (r["train_val_specificity"], r["train_val_sensitivity"], r["rule"] == "hu",
                                  r["hu200_fraction_min"], r["central_fraction_min"] or 0.0))
    return {"chosen": best, "previous": prev, "candidates": res, "n": len(pool)}


def calcification_call(kind, a, b, head, frac, e=None, central=None):
    """Benign calls of one rule (``lung_rads.benign_calcification``'s) on arrays of head probabilities,
    fractions of voxels >= 200 HU and central fractions of the calcified voxels."""
    head, frac = np.asarray(head, float), np.asarray(frac, float)
    h = head >= (a if a is not None else np.inf)
    f = frac >= (b if b is not None else np.inf)
    c = np.asarray(central, float) >= e if e is not None else np.zeros_like(f)
    diffuse = frac >= DIFFUSE_CALCIFICATION
    return {"head": h, "hu": f, "and": h & f, "or": h | f, "hu_central": f & (c | diffuse)}[kind]


CATEGORY_INDEX = {c: i for i, c in enumerate(("1", "2", "3", "4A", "4B"))}


def _categories(types, size_mm, solid_mm, benign) -> list[str]:
    from NoduleMTLLib.clinical.lung_rads import categorize

    return [categorize(t, s, c if t == "part-solid" else None, bool(b))[0] for t, s, c, b in zip(types, size_mm, solid_mm, benign)]


def type_lung_rads_cv(tab: list[dict], stage1: tuple, stage2: tuple, corr: dict | str | None, calc_rule: dict | None,
                      repeats: int = SUBSOLID_CV_REPEATS, specificity: float = SUBSOLID_CV_SPECIFICITY) -> dict:
    """Out-of-fold nodule types of one two-stage choice and their Lung-RADS cost, on the found nodules of
    the training + validation patients (patient-grouped 5-fold CV, ``repeats`` seeds: the folds of
    :func:`fit_subsolid_cv`).

    In every fold both stages are fitted on the other folds (stage 2 on their reference-subsolid
    nodules) and applied to the held-out fold; per repeat the subsolid threshold is the ``specificity``
    quantile of the out-of-fold P(subsolid) of the solid nodules (as :func:`fit_subsolid_cv`).  The
    category is ``lung_rads.categorize`` on the mask's size-corrected mean diameter (``corr``, the
    in-sample factors of :func:`fit_size_correction`; ``"cv"``: refitted on the training folds of every
    fold, :func:`oof_size_correction`; None: as measured), its solid component (part-solid)
    and the benign-calcification rule ``calc_rule`` (:func:`fit_calcification`'s ``chosen``; None: no
    benign call); the reference: the same on the readers' (union) mask, texture and calcification
    ratings (``training.lung_rads_eval.reference_category``).

    Args:
        stage1, stage2: (feature set name of :data:`TYPE_FEATURE_SETS`, L2, balanced class weights: bool).
    Returns:
        dict of means over the repeats: ``solid_called_solid``, ``subsolid_recall``,
        ``part_solid_recall`` (texture 3 called part-solid or ground-glass), ``split_right`` (of the
        subsolid nodules called subsolid), ``part_solid_called_part_solid``, ``lung_rads_exact``,
        ``under_calls``, ``over_calls`` (shares of the nodules), ``under_calls_n`` (mean count), ``n``,
        ``n_subsolid``, ``n_part_solid``.
    """
    from NoduleMTLLib.clinical.lung_rads import mean_diameter_mm

    pool = [r for r in _split(tab, "train", "val") if r["found"]]
    ref_t = np.array([texture_class(r["texture"]) for r in pool])
    y, yg = (ref_t != "solid").astype(float), (ref_t == "ground-glass").astype(float)
    f1, f2 = TYPE_FEATURE_SETS[stage1[0]], TYPE_FEATURE_SETS[stage2[0]]
    X1, X2 = _xy(pool, f1), _xy(pool, f2)
    ref_cat = _categories(ref_t, [r["ref"]["mean_diameter_mm"] for r in pool], [r["ref"]["solid_mean_diameter_mm"] for r in pool],
                          [r["calcification_rating"] in BENIGN_CALCIFICATION for r in pool])
    def sizes(fl, fs):
        return np.array([mean_diameter_mm(a * r["pred"]["long_axis_mm"], b * r["pred"]["short_axis_mm"])
                         for r, a, b in zip(pool, np.broadcast_to(fl, len(pool)), np.broadcast_to(fs, len(pool)))])

    if corr is not None and not isinstance(corr, dict) and corr != "cv":
        raise ValueError(f"corr must be None, a size correction or 'cv', got {corr!r}")
    if isinstance(corr, dict):
        size = sizes(corr["long_axis_factor"], corr["short_axis_factor"])
    elif corr is None:
        size = sizes(1.0, 1.0)
    solid = [r["pred"]["solid_mean_diameter_mm"] for r in pool]
    if calc_rule:
        benign = calcification_call(calc_rule["rule"], calc_rule["head_min"], calc_rule["hu200_fraction_min"],
                                    [r["signs"].get("calcification", 0.0) for r in pool], [r["pred"]["frac_ge_200"] for r in pool],
                                    calc_rule["central_fraction_min"], [r["pred"].get("calc_central_fraction", 0.0) for r in pool])
    else:
        benign = np.zeros(len(pool), bool)
    keys = ("solid_called_solid", "subsolid_recall", "part_solid_recall", "split_right", "part_solid_called_part_solid",
            "lung_rads_exact", "under_calls", "over_calls", "under_calls_n")
    acc = {k: [] for k in keys}
    for seed in range(repeats):
        fid = _patient_folds(pool, 5, seed)
        if corr == "cv":  # the size correction refitted on the same training folds
            size = sizes(*oof_size_correction(pool, 5, seed))
        ps, pg = np.empty(len(pool)), np.empty(len(pool))
        for f in range(5):
            te, tr = fid == f, fid != f
            ps[te] = _fit_stack(X1[tr], y[tr], f1, stage1[1], stage1[2])(X1[te])
            sub = tr & (y == 1)
            pg[te] = _fit_stack(X2[sub], yg[sub], f2, stage2[1], stage2[2])(X2[te])
        th = float(np.quantile(ps[y == 0], specificity))
        types = np.where(ps < th, "solid", np.where(pg >= 0.5, "ground-glass", "part-solid"))
        cats = _categories(types, size, solid, benign)
        d = np.array([CATEGORY_INDEX[b] - CATEGORY_INDEX[a] for a, b in zip(ref_cat, cats)])
        called = (types != "solid") & (y == 1)
        acc["solid_called_solid"].append(float(np.mean(types[y == 0] == "solid")))
        acc["subsolid_recall"].append(float(np.mean(types[y == 1] != "solid")))
        acc["part_solid_recall"].append(float(np.mean(types[ref_t == "part-solid"] != "solid")))
        acc["part_solid_called_part_solid"].append(float(np.mean(types[ref_t == "part-solid"] == "part-solid")))
        acc["split_right"].append(float(np.mean(types[called] == ref_t[called])) if called.any() else float("nan"))
        acc["lung_rads_exact"].append(float(np.mean(d == 0)))
        acc["under_calls"].append(float(np.mean(d < 0)))
        acc["over_calls"].append(float(np.mean(d > 0)))
        acc["under_calls_n"].append(float(np.sum(d < 0)))
    return {**{k: float(np.mean(v)) for k, v in acc.items()}, "n": len(pool), "n_subsolid": int(y.sum()),
            "n_part_solid": int((ref_t == "part-solid").sum()), "repeats": repeats, "specificity_target": specificity,
            "stage1": list(stage1), "stage2": list(stage2)}


#: Mask thresholds of the size trade-off study (issue 22: is the lower threshold still needed once the
#: axes carry a size correction?).
TRADEOFF_THRESHOLDS = (0.5, 0.45, 0.4, 0.35, 0.3)
TRADEOFF_REPORT = REPORT_DIR / "size_tradeoff_trainval.json"


def shipped_rules(weights_file: Path = WEIGHTS_FILE) -> tuple[tuple, tuple, dict]:
    """The shipped type choice and calcification rule of ``clinical.json``, in :func:`type_lung_rads_cv`'s
    form: (stage 1 (feature set, L2, balanced), stage 2 (same), calcification rule dict)."""
    d = json.loads(Path(weights_file).read_text())
    cv = d["nodule_type"]["lung_rads_cv"]
    calc = {k: d["calcification"][k] for k in ("rule", "head_min", "hu200_fraction_min", "central_fraction_min")}
    return tuple(cv["stage1"]), tuple(cv["stage2"]), calc


def _mean_dicts(ds: list[dict]) -> dict:
    return {k: float(np.mean([d[k] for d in ds])) for k in ds[0]}


def size_tradeoff(tables: dict[float, list[dict]] | None = None, thresholds=TRADEOFF_THRESHOLDS,
                  repeats: int = SUBSOLID_CV_REPEATS, n_boot: int = 2000, lung_rads: bool = True) -> dict:
    """Mask threshold vs size with the size correction refitted (issue 22), on **training + validation
    patients only** (rows of other splits are dropped).

    For every threshold: the constant size correction (:func:`fit_size_correction`, 1 / median ratio per
    axis) refitted by patient-grouped 5-fold CV, ``repeats`` seeds (:func:`oof_size_correction`), and the
    out-of-fold long-axis / mean-diameter ratios to the readers' (union) masks
    (:func:`corrected_size_figures`; means over the repeats; also on the validation rows alone, whose
    masks are out-of-sample for DSMT-Net) and the difference of the shares within 15 % to the first
    threshold's (paired per nodule, patient-bootstrap 95 % interval); with ``lung_rads``, the out-of-fold Lung-RADS agreement with the
    shipped type choice and calcification rule (:func:`shipped_rules`; both type stages and the size
    correction refitted per fold, :func:`type_lung_rads_cv` with ``corr="cv"``); the validation Dice
    (of the mask: independent of the correction; a VOI not found counts 0) and its median's difference
    to the first threshold's, with a patient-bootstrap 95 % interval (paired: same resamples of patients).

    Args:
        tables: {threshold: table rows}; None: :func:`load_table` (threshold, ("train", "val")).
        thresholds: mask thresholds; the first is the reference of the Dice differences.
    Returns: {"thresholds", "repeats", "rules", "by_threshold": {"0.50": {...}, ...}}.
    """
    from training.metric_noise import patient_bootstrap

    s1, s2, calc = shipped_rules()
    out = {"thresholds": list(thresholds), "repeats": repeats, "folds": 5, "splits": ["train", "val"],
           "rules": {"stage1": list(s1), "stage2": list(s2), "calcification": calc}, "by_threshold": {}}
    dice0 = within0 = None
    for t in thresholds:
        tab = _split(tables[t] if tables is not None else load_table(t, ("train", "val")), "train", "val")
        pool = [r for r in tab if r["found"] and r["ref"].get("n_voxels")]
        isval = np.array([r["split"] == "val" for r in pool])
        oof, oof_val, within = [], [], {}
        for seed in range(repeats):
            fl, fs = oof_size_correction(pool, 5, seed)
            oof.append({**corrected_size_figures(pool, (fl, fs)), "long_axis_factor": float(fl.mean()),
                        "short_axis_factor": float(fs.mean())})
            oof_val.append(corrected_size_figures([r for r, v in zip(pool, isval) if v], (fl[isval], fs[isval])))
            kept, ratios = corrected_size_ratios(pool, (fl, fs))
            for r, a, b in zip(kept, ratios["long_axis"], ratios["mean_diameter"]):
                w = within.setdefault((r["patient_id"], r["nodule_id"]), [0.0, 0.0])
                w[0], w[1] = w[0] + (abs(a - 1) <= 0.15) / repeats, w[1] + (abs(b - 1) <= 0.15) / repeats
        within0 = within0 or within
        pw = [{"patient_id": k[0], "w": v, "w0": within0[k]} for k, v in within.items() if k in within0]

        def dwithin(rows, i):
            return float(np.mean([r["w"][i] - r["w0"][i] for r in rows]))
        val = _split(tab, "val")
        dice = {(r["patient_id"], r["nodule_id"]): r["dice"] for r in val}
        dice0 = dice0 or dice
        paired = [{"patient_id": k[0], "d0": dice0[k], "d": v} for k, v in dice.items() if k in dice0]

        def dmed(rows):
            return float(np.median([r["d"] for r in rows]) - np.median([r["d0"] for r in rows]))

        sf = size_figures(val)
        rec = {"threshold": t, "n": len(tab), "n_found": len(pool), "n_val": len(val),
               "in_sample_correction": fit_size_correction(tab),
               "measured": corrected_size_figures(pool, None),
               "oof_corrected": _mean_dicts(oof), "oof_corrected_val_rows": _mean_dicts(oof_val),
               "val_dice_mean": sf["dice_mean"], "val_dice_median": sf["dice_median"],
               "val_dice_median_minus_first": dmed(paired),
               "val_dice_median_minus_first_ci95": list(patient_bootstrap(paired, dmed, n_boot)) if n_boot else None,
               "train_val_dice_median": float(np.median([r["dice"] for r in tab])),
               "oof_long_axis_within_15pct_minus_first": dwithin(pw, 0),
               "oof_mean_diameter_within_15pct_minus_first": dwithin(pw, 1)}
        if n_boot:
            rec["oof_long_axis_within_15pct_minus_first_ci95"] = list(patient_bootstrap(pw, lambda x: dwithin(x, 0), n_boot))
            rec["oof_mean_diameter_within_15pct_minus_first_ci95"] = list(patient_bootstrap(pw, lambda x: dwithin(x, 1), n_boot))
        if lung_rads:
            rec["lung_rads_oof"] = type_lung_rads_cv(tab, s1, s2, "cv", calc, repeats)
        out["by_threshold"][f"{t:.2f}"] = rec
    return out


def tradeoff_markdown(rep: dict) -> str:
    """The table of :func:`size_tradeoff`'s report (markdown)."""
    rows = ["| mask threshold | val Dice median (- 0.5's, 95 % CI) | val Dice mean | OOF factor long / short "
            "| OOF long-axis ratio median | OOF long axis within 15 % | OOF mean diameter within 15 % "
            "| as measured: long-axis median / within 15 % | OOF Lung-RADS exact / under-calls |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k, v in rep["by_threshold"].items():
        o, m, ci = v["oof_corrected"], v["measured"], v["val_dice_median_minus_first_ci95"]
        lr_ = v.get("lung_rads_oof")
        rows.append(f"| {k} | {v['val_dice_median']:.3f} ({v['val_dice_median_minus_first']:+.3f}"
                    + (f", [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + f") | {v['val_dice_mean']:.3f} "
                    f"| {o['long_axis_factor']:.3f} / {o['short_axis_factor']:.3f} | {o['long_axis_ratio_median']:.3f} "
                    f"| {o['long_axis_within_15pct']:.3f} | {o['mean_diameter_within_15pct']:.3f} "
                    f"| {m['long_axis_ratio_median']:.3f} / {m['long_axis_within_15pct']:.3f} | "
                    + (f"{lr_['lung_rads_exact']:.3f} / {lr_['under_calls']:.3f} |" if lr_ else "- |"))
    return "\n".join(rows)


def type_model_dict(fit: dict, networks: list[str]) -> dict:
    return {"networks": networks, "subsolid": fit["subsolid"].to_dict(), "subsolid_threshold": fit["stage1"]["threshold"],
            "ground_glass": fit["ground_glass"].to_dict(), "ground_glass_threshold": fit["stage2"]["threshold"]}


def predicted_types(recs: list[dict], model: dict) -> list[str]:
    from NoduleMTLLib.clinical.lung_rads import classify_type, type_features

    return [classify_type(type_features(r["pred"], r["signs"]), model)["type"] for r in recs]


def type_figures(recs: list[dict], types: list[str]) -> dict:
    """Per-class agreement with the texture reference (the issue's three done-when figures)."""
    ref = [texture_class(r["texture"]) for r in recs]
    sol = [t for t, g in zip(types, ref) if g == "solid"]
    sub = [(t, g) for t, g in zip(types, ref) if g != "solid"]
    sub_called = [(t, g) for t, g in sub if t != "solid"]
    classes = ("solid", "part-solid", "ground-glass")
    return {"n": len(recs), "exact": float(np.mean([t == g for t, g in zip(types, ref)])),
            "solid_called_solid": float(np.mean([t == "solid" for t in sol])) if sol else None, "n_solid": len(sol),
            "subsolid_called_subsolid": float(np.mean([t != "solid" for t, _ in sub])) if sub else None, "n_subsolid": len(sub),
            "subsolid_split_right": float(np.mean([t == g for t, g in sub_called])) if sub_called else None,
            "n_subsolid_called_subsolid": len(sub_called),
            "confusion": {g: {t: sum(1 for a, b in zip(types, ref) if a == t and b == g) for t in classes} for g in classes}}


def _cv_summary(stage: dict) -> dict:
    return {k: v for k, v in stage.items() if k.startswith("cv_") or k in ("features", "l2", "class_weight", "n", "n_subsolid",
                                                                           "n_ground_glass", "repeats")}


def _stage_key(stage: dict) -> tuple:
    """(feature set, L2, balanced) of a stage's choice, as :func:`type_lung_rads_cv` takes it."""
    return stage["features"], stage["l2"], stage.get("class_weight") == "balanced"


def fit_threshold() -> float:
    """The mask threshold :func:`fit_main` chooses (validation tables, :func:`choose_threshold`)."""
    return choose_threshold({t: load_table(t, ("val",)) for t in THRESHOLDS})[0]


def fit_main(write: bool, test: bool = False) -> int:
    """Choose every rule on training + validation patients; ``test``: also score the test patients
    (once, at the end; without it no test figure is computed)."""
    from NoduleMTLLib.core.postprocess import nodule_type

    tables = {t: load_table(t, ("val",)) for t in THRESHOLDS}
    thr, size_fig = choose_threshold(tables)
    tab = load_table(thr)
    size_fig[thr]["train"] = size_figures(_split(tab, "train"))
    corr = fit_size_correction(tab)
    typ = fit_type(tab)
    typ_hu = fit_type(tab, ("hu", "hu+size"))
    calc = fit_calcification(tab)
    lr_cv = {"second_round": type_lung_rads_cv(tab, SECOND_ROUND_TYPE["stage1"], SECOND_ROUND_TYPE["stage2"], corr, calc["chosen"]),
             "chosen": type_lung_rads_cv(tab, _stage_key(typ["stage1"]), _stage_key(typ["stage2"]), corr, calc["chosen"]),
             "chosen_hu_only": type_lung_rads_cv(tab, _stage_key(typ_hu["stage1"]), _stage_key(typ_hu["stage2"]), corr,
                                                 calc["chosen"])}
    model = type_model_dict(typ, ["dsmtnet"])
    model_hu = type_model_dict(typ_hu, [])
    splits = ("val", "test") if test else ("val",)
    rep = {"threshold": thr, "size": {str(t): v for t, v in size_fig.items()}, "type": {}, "calcification": {},
           "size_correction": {**corr, **{f"{sp}_{k}": corrected_size_figures(_split(tab, *sp.split("+")), c)
                                          for sp in ("train+val",) + splits for k, c in (("measured", None), ("corrected", corr))}}}
    for split in splits:
        recs = [r for r in _split(tab, split) if r["found"]]
        rep["type"][split] = {"classifier": type_figures(recs, predicted_types(recs, model)),
                              "classifier_hu_only": type_figures(recs, predicted_types(recs, model_hu)),
                              "hu_rule": type_figures(recs, [nodule_type(r["pred"]["frac_ge_-300"]) for r in recs]),
                              "hu_rule_on_readers_masks": type_figures(recs, [nodule_type(r["ref"]["frac_ge_-300"]) for r in recs])}
        ch = calc["chosen"]
        y = np.array([r["calcification_rating"] in BENIGN_CALCIFICATION for r in recs])
        call = calcification_call(ch["rule"], ch["head_min"], ch["hu200_fraction_min"],
                                  [r["signs"].get("calcification", 0.0) for r in recs], [r["pred"]["frac_ge_200"] for r in recs],
                                  ch["central_fraction_min"], [r["pred"].get("calc_central_fraction", 0.0) for r in recs])
        rep["calcification"][split] = {"n": len(y), "benign": int(y.sum()), "sensitivity": float(call[y].mean()),
                                       "specificity": float((~call[~y]).mean()), "false_benign": int((call & ~y).sum())}
    if test:
        rep["size"]["test_at_chosen"] = size_figures(_split(tab, "test"))
        rep["size"]["test_at_0.5"] = size_figures(load_table(0.5, ("test",)))
    rep["type"]["stage1"], rep["type"]["stage2"] = typ["stage1"], typ["stage2"]
    rep["type"]["stage1_hu_only"], rep["type"]["stage2_hu_only"] = typ_hu["stage1"], typ_hu["stage2"]
    rep["type"]["lung_rads_cv"] = lr_cv
    rep["calcification"]["choice"] = calc
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / ("clinical_fit.json" if test else "clinical_fit_trainval.json")).write_text(
        json.dumps(rep, indent=1, default=float) + "\n")
    print(json.dumps({k: rep[k] for k in ("threshold",)}, indent=1))
    print(json.dumps(rep["size"][str(thr)], indent=1))
    print("size correction", json.dumps(rep["size_correction"], indent=1))
    for split in splits:
        for k, v in rep["type"][split].items():
            print(split, k, {a: b for a, b in v.items() if a != "confusion"})
        print(split, "calcification", rep["calcification"][split])
    print("stage1", {k: v for k, v in typ["stage1"].items() if k != "candidates"})
    print("stage2", {k: v for k, v in typ["stage2"].items() if k != "candidates"})
    for k, v in lr_cv.items():
        print("type + Lung-RADS out-of-fold", k, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in v.items()})
    print("calc", calc["chosen"])
    print("calc previous", calc["previous"])
    if write:
        fitted = "LIDC-IDRI lidc_vois, DSMT-Net 3D HU click path at the labelled centre; training.clinical"
        d = {"format": 1,
             "note": "written by python -m training.clinical fit --write; chosen on training + validation patients only, "
                     "test figures for information (training/reports/clinical/clinical_fit.json)",
             "mask_threshold": {"dsmtnet": thr, "fitted_on": "validation patients' long-axis ratio to the readers' "
                                "consensus masks (" + fitted + ")",
                                "validation": size_fig[thr]["val"], "validation_at_0.5": size_fig[0.5]["val"]},
             "size_correction": {"dsmtnet": {
                 "long_axis_factor": round(corr["long_axis_factor"], 4), "short_axis_factor": round(corr["short_axis_factor"], 4),
                 "mask_threshold": thr,
                 "fitted_on": f"1 / median ratio of the mask's axis (threshold {thr}) to the readers' consensus mask's, "
                              f"{corr['n']} found nodules of the training + validation patients (" + fitted + ")",
                 "train_val_measured": rep["size_correction"]["train+val_measured"],
                 "train_val_corrected": rep["size_correction"]["train+val_corrected"],
                 "validation_measured": rep["size_correction"]["val_measured"],
                 "validation_corrected": rep["size_correction"]["val_corrected"]}},
             "nodule_type": {**model, "fitted_on": "subsolid: training + validation patients, feature set / L2 / class "
                             "weighting / threshold by patient-grouped CV (threshold at out-of-fold solid specificity "
                             f"{SUBSOLID_CV_SPECIFICITY}); ground-glass: training + validation subsolid nodules, feature set / "
                             "L2 / class weighting by patient-grouped CV (" + fitted + ")",
                             "cv": _cv_summary(typ["stage1"]), "stage2_cv": _cv_summary(typ["stage2"]),
                             "lung_rads_cv": lr_cv["chosen"], "lung_rads_cv_second_round": lr_cv["second_round"],
                             "validation_in_sample": rep["type"]["val"]["classifier"]},
             "nodule_type_hu_only": {**model_hu, "fitted_on": "as nodule_type, HU features only (runs without DSMT-Net)",
                                     "cv": _cv_summary(typ_hu["stage1"]), "stage2_cv": _cv_summary(typ_hu["stage2"]),
                                     "lung_rads_cv": lr_cv["chosen_hu_only"],
                                     "validation_in_sample": rep["type"]["val"]["classifier_hu_only"]},
             "calcification": {"rule": calc["chosen"]["rule"], "head_min": calc["chosen"]["head_min"],
                               "hu200_fraction_min": calc["chosen"]["hu200_fraction_min"],
                               "central_fraction_min": calc["chosen"]["central_fraction_min"],
                               "diffuse_fraction_min": DIFFUSE_CALCIFICATION if calc["chosen"]["rule"] == "hu_central" else None,
                               "benign_ratings": "LIDC calcification 1 popcorn, 2 laminated, 3 solid, 5 central "
                                                 "(4 non-central, 6 absent: not benign)",
                               "fitted_on": "training + validation patients pooled: the highest specificity among HU "
                                            "rules keeping the previous rule's sensitivity (" + fitted + ")",
                               "train_val": {k[10:]: v for k, v in calc["chosen"].items() if k.startswith("train_val_")},
                               "train_val_previous_rule": {k[10:]: v for k, v in calc["previous"].items()
                                                           if k.startswith("train_val_")},
                               "validation": {k[4:]: v for k, v in calc["chosen"].items() if k.startswith("val_")}}}
        WEIGHTS_FILE.write_text(json.dumps(d, indent=1, default=float) + "\n")
        print(f"wrote {WEIGHTS_FILE}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("--threshold", type=float, nargs="+", default=[0.5])
    t.add_argument("--splits", default="train,val,test")
    sz = sub.add_parser("size")
    sz.add_argument("--split", default="val", choices=("train", "val"))
    f = sub.add_parser("fit")
    f.add_argument("--write", action="store_true", help=f"write {WEIGHTS_FILE.relative_to(REPO)}")
    f.add_argument("--test", action="store_true", help="also score the test patients (once, at the end)")
    st = sub.add_parser("size-tradeoff", help="mask threshold vs size with the size correction refitted by CV "
                        "(training + validation only)")
    st.add_argument("--thresholds", type=float, nargs="+", default=list(TRADEOFF_THRESHOLDS))
    sub.add_parser("nested", help="nested CV of the stage-1 choice, second-round sets vs all (training + validation)")
    a = ap.parse_args(argv)
    if a.cmd == "table":
        for th in a.threshold:
            build_table(th, tuple(a.splits.split(",")))
        return 0
    if a.cmd == "size":
        st = size_study(a.split)
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        (REPORT_DIR / f"size_study_{a.split}.json").write_text(json.dumps(st, indent=1) + "\n")
        for k, v in st.items():
            print(k, {a_: round(b, 4) for a_, b in v.items()})
        print("chosen:", choose_size_correction(st))
        return 0
    if a.cmd == "size-tradeoff":
        rep = size_tradeoff(thresholds=tuple(a.thresholds))
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        TRADEOFF_REPORT.write_text(json.dumps(rep, indent=1) + "\n")
        print(tradeoff_markdown(rep))
        print(f"wrote {TRADEOFF_REPORT.relative_to(REPO)}")
        return 0
    if a.cmd == "nested":
        tab = load_table(fit_threshold())
        out = {"second_round_sets": nested_subsolid_cv(tab, ("hu", "head+hu", "head+hu_small")),
               "third_round_sets": nested_subsolid_cv(tab, SUBSOLID_CV_SETS)}
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        (REPORT_DIR / "type_nested_cv.json").write_text(json.dumps(out, indent=1) + "\n")
        for k, v in out.items():
            print(k, {a_: b for a_, b in v.items() if a_ != "chosen"})
        return 0
    return fit_main(a.write, a.test)


if __name__ == "__main__":
    raise SystemExit(main())
