"""Calibrated malignancy probability, network combinations and the measured default.

``python -m training.calibration [--write-weights]`` reads per-nodule predictions of the
click networks on the HU VOIs of the validation and test patients (3D click path, click at
the labelled centre, the protocol of ``nodulemtl-train evaluate NETWORK --vois``):
DSMT-Net's probability, signs, Dice and the measurements of its mask from
``training/reports/calibration/<split>_dsmtnet.json`` (``python -m training.voi_predictions
--split val|test --networks dsmtnet``), completed with the other three networks'
probabilities and Dice and the four-network consensus Dice from the committed evaluation
``training/reports/consensus/lnmsnet_detguided_dsmtnet_mtnet_vois_<split>.json``
(:func:`merge_with_consensus` checks that both describe the same VOIs and predictions).
A four-network ``<split>.json`` of ``voi_predictions`` is used instead when present.  Then:

1. **Fits on the validation patients only** (``val``), for each configuration below, a
   calibrator of its raw probability: temperature scaling, Platt scaling and isotonic
   regression (pool-adjacent-violators), and keeps the one of :data:`REPORTABLE_CALIBRATORS`
   (temperature, Platt: isotonic can report exactly 0 or 1) with the lowest Brier score in
   repeated stratified 5-fold cross-validation *within val* (10 repeats, seed 0).  No
   scikit-learn (not a dependency): numpy + scipy.optimize, written out below.
2. Fits the **stacked** models (L2 logistic regression on standardised features, the L2
   strength chosen by the same cross-validated Brier score on val): ``stack4`` - logits of
   the four networks + log(1 + volume), solid fraction and long axis of DSMT-Net's mask +
   four of DSMT-Net's sign probabilities (not bubble lucency: no positive in val);
   ``stack_dsmtnet`` - DSMT-Net's logit + the same measurements and signs (needs only
   DSMT-Net, so it runs at its speed); ``size_only`` - log(1 + volume) alone, the size
   baseline as a calibrated model.
3. **Reports on the test patients** (never used for any fit or choice): malignancy AUC
   (with a 95 % patient-level bootstrap interval), Brier score and expected calibration
   error (10 equal-width bins) before and after calibration, beside the **size-only AUC**
   (segmented volume alone: DSMT-Net's mask, the default network's; same nodules); 3D Dice
   mean / median and missed nodules (Dice 0) on every VOI; reliability diagrams (PNG).
4. Names the **default configuration** (:func:`choose_default`, on validation figures and
   the measured speed; test only reported) and, with ``--write-weights``, writes
   ``Resources/Weights/calibration.json`` (read by ``NoduleMTLLib.models.calibration``).

Nodules: classification metrics use the nodules with a malignancy label (median rating
>= 4 or <= 2) for which **every** network gave a probability, so every row is compared on
the same nodules.  Size features of a nodule DSMT-Net missed are 0 (in the product such a
nodule has no probability at all).

Outputs: ``training/reports/calibration/summary.json``, ``summary.md``,
``reliability_test.png`` (every configuration, raw vs calibrated),
``reliability_default_test.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from NoduleMTLLib.core.metrics import roc_auc
from NoduleMTLLib.models.calibration import CalibrationSet, Calibrator, LinearStack, ProbabilityModel, logit, nodule_features, sigmoid
from NoduleMTLLib.models.registry import available_networks
from training.data import REPO

REPORT_DIR = REPO / "training" / "reports" / "calibration"
WEIGHTS_FILE = REPO / "Resources" / "Weights" / "calibration.json"
NETWORKS = tuple(available_networks())  # the registry's click networks
SIGNS = ("spiculation", "lobulation", "calcification", "subsolid", "bubble_lucency")
N_BINS = 10
CV_FOLDS, CV_REPEATS, SEED = 5, 10, 0
L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)

#: Measured click-to-result medians (s) on the 2-core CPU, Testing/Benchmarks/bench_click.py
#: (30 mm sample nodule, A0001 mass); filled from training/reports/calibration/speed.json when present.
SPEED_TARGET_S = {"sample nodule 2 (~30 mm)": 1.0, "A0001 adenocarcinoma (~6 cm)": 3.0}

# --- configurations ----------------------------------------------------------------------
#: id -> (networks run, mask whose Dice is reported, score).  Size features and the size-only
#: baseline use DSMT-Net's mask for every row (:data:`SIZE_SOURCE`; see the module docstring).
CONFIGS = {
    "lnmsnet": (("lnmsnet",), "lnmsnet", "network:lnmsnet"),
    "detguided": (("detguided",), "detguided", "network:detguided"),
    "dsmtnet": (("dsmtnet",), "dsmtnet", "network:dsmtnet"),
    "mtnet": (("mtnet",), "mtnet", "network:mtnet"),
    "mean4": (("dsmtnet", "lnmsnet", "detguided", "mtnet"), "consensus", "mean"),
    "stack_dsmtnet": (("dsmtnet",), "dsmtnet", "stack"),
    "size_only": (("dsmtnet",), "dsmtnet", "stack"),
    "stack4": (("dsmtnet", "lnmsnet", "detguided", "mtnet"), "dsmtnet", "stack"),
}
SIZE_SOURCE = "dsmtnet"
#: Sign heads used as stack features: bubble lucency is left out (no positive nodule in the
#: validation split, its probabilities are all near 0: a feature with nothing to learn from).
STACK_SIGNS = ("spiculation", "lobulation", "calcification", "subsolid")
STACK_FEATURES = {
    "stack_dsmtnet": ["logit:dsmtnet", "log_volume", "solid_fraction", "diameter_mm"] + [f"sign:dsmtnet:{s}" for s in STACK_SIGNS],
    "size_only": ["log_volume"],
    "stack4": [f"logit:{n}" for n in NETWORKS] + ["log_volume", "solid_fraction", "diameter_mm"]
    + [f"sign:dsmtnet:{s}" for s in STACK_SIGNS],
}
CONSENSUS_DIR = REPO / "training" / "reports" / "consensus"


def merge_with_consensus(dsm: dict, cons: dict) -> list[dict]:
    """Complete DSMT-Net-only records (``voi_predictions --networks dsmtnet``) with the other
    networks' probabilities and Dice from the committed four-network evaluation
    (``training/reports/consensus/*_vois_<split>.json``: per-VOI Dice lists in VOI order, and
    probabilities of the labelled nodules every network classified, in the same order).

    Alignment is checked, not assumed: the Dice lists must have one entry per record and
    DSMT-Net's Dice must agree within 1e-3 on every VOI; the classified nodules are found
    as the labelled records whose DSMT-Net probability equals the next stored one (within
    1e-3), and every stored probability must be matched, labels equal.  Other networks get
    ``found`` = Dice > 0 and no measurements (those come from DSMT-Net's mask).

    Raises:
        ValueError: the two files do not describe the same VOIs / predictions.
    """
    recs = [json.loads(json.dumps(r)) for r in dsm["nodules"]]
    if cons["n_nodules"] != len(recs):
        raise ValueError(f"{cons['n_nodules']} VOIs in the consensus file, {len(recs)} records")
    bad = [i for i, r in enumerate(recs) if abs(r["networks"]["dsmtnet"]["dice"] - cons["dices"]["dsmtnet"][i]) > 1e-3]
    if bad:
        raise ValueError(f"DSMT-Net Dice differs from the consensus file on {len(bad)} VOIs (first: {bad[:5]})")
    j = 0
    probs, labels = cons["probs"], cons["labels"]
    for i, r in enumerate(recs):
        for n in NETWORKS:
            if n != "dsmtnet":
                d = float(cons["dices"][n][i])
                r["networks"][n] = {"found": d > 0, "dice": d, "probability": None, "signs": {}, "volume_mm3": None,
                                    "diameter_mm": None, "short_axis_mm": None, "mean_hu": None, "solid_fraction": None,
                                    "type": None}
        pd = r["networks"]["dsmtnet"]["probability"]
        if r["label"] >= 0 and pd is not None and j < len(labels) and abs(pd - probs["dsmtnet"][j]) <= 1e-3:
            if labels[j] != r["label"]:
                raise ValueError(f"label mismatch at VOI {i}")
            for n in NETWORKS:
                if n != "dsmtnet":
                    r["networks"][n]["probability"] = float(probs[n][j])
            j += 1
        r["consensus"] = {"found": cons["dices"]["consensus"][i] > 0, "dice": float(cons["dices"]["consensus"][i]),
                          "probability": None, "volume_mm3": None, "solid_fraction": None, "diameter_mm": None}
    if j != len(labels):
        raise ValueError(f"matched {j} of {len(labels)} classified nodules of the consensus file")
    return recs


def load_records(split: str, folder: Path = REPORT_DIR, tta: bool = False) -> list[dict]:
    """Per-nodule records of a split (``val`` / ``test``): ``<split>.json`` (all four networks,
    ``training.voi_predictions``) if present, else ``<split>_dsmtnet[_tta].json`` merged with the
    committed four-network evaluation (:func:`merge_with_consensus`).  With ``tta`` only DSMT-Net's entries are kept."""
    full = folder / f"{split}{'_tta' if tta else ''}.json"
    if full.is_file():
        d = json.loads(full.read_text())
        if d["split"] != split:
            raise ValueError(f"{full} holds split {d['split']!r}")
        return d["nodules"]
    d = json.loads((folder / f"{split}_dsmtnet{'_tta' if tta else ''}.json").read_text())
    if d["split"] != split:
        raise ValueError(f"split {d['split']!r} in the {split} file")
    if tta:
        return d["nodules"]
    cons = json.loads((CONSENSUS_DIR / f"lnmsnet_detguided_dsmtnet_mtnet_vois_{split}.json").read_text())
    return merge_with_consensus(d, cons)


def _mask_rec(rec: dict, source: str) -> dict:
    return rec["consensus"] if source == "consensus" else rec["networks"][source]


def features(rec: dict, mask_source: str = SIZE_SOURCE) -> dict[str, float]:
    """:func:`NoduleMTLLib.models.calibration.nodule_features` of one record (size of :data:`SIZE_SOURCE`'s mask; 0 when empty)."""
    m = _mask_rec(rec, SIZE_SOURCE)
    meas = {"volume_mm3": m["volume_mm3"] or 0.0, "solid_fraction": m["solid_fraction"] or 0.0,
            "diameter_mm": m["diameter_mm"] or 0.0}
    return nodule_features({n: rec["networks"][n]["probability"] for n in NETWORKS if n in rec["networks"]}, meas,
                           {n: rec["networks"][n]["signs"] for n in NETWORKS if n in rec["networks"]})


def classified(recs: list[dict]) -> list[dict]:
    """Records with a label (0/1) and a probability from every network (the common nodule set)."""
    return [r for r in recs if r["label"] >= 0 and all(r["networks"][n]["probability"] is not None for n in NETWORKS)]


# --- metrics -------------------------------------------------------------------------------
def brier(y, p) -> float:
    """Mean squared difference between probability and outcome (0 best)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean((p - y) ** 2))


def ece(y, p, n_bins: int = N_BINS) -> float:
    """Expected calibration error: sum over equal-width probability bins of (bin share) x
    |observed frequency - mean probability|; bins [0, 0.1), ..., [0.9, 1.0] (Guo et al. 2017)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    return float(sum(abs(y[b == k].mean() - p[b == k].mean()) * (b == k).mean() for k in range(n_bins) if (b == k).any()))


def reliability(y, p, n_bins: int = N_BINS) -> list[dict]:
    """Per non-empty bin: mean probability, observed frequency, count."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    return [{"bin": k, "mean_p": float(p[b == k].mean()), "freq": float(y[b == k].mean()), "n": int((b == k).sum())}
            for k in range(n_bins) if (b == k).any()]


def bootstrap_auc_ci(y, s, groups, n: int = 2000, seed: int = SEED) -> tuple[float, float]:
    """95 % percentile interval of the AUC, resampling patients (``groups``) with replacement."""
    y, s, groups = np.asarray(y), np.asarray(s, float), np.asarray(groups)
    ug = np.unique(groups)
    idx = {g: np.flatnonzero(groups == g) for g in ug}
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n):
        take = np.concatenate([idx[g] for g in rng.choice(ug, len(ug))])
        a = roc_auc(y[take], s[take])
        if not math.isnan(a):
            aucs.append(a)
    return float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))


# --- fitting (numpy / scipy; no scikit-learn) ---------------------------------------------------
def fit_logistic(X, y, l2: float = 0.0, sample_weight=None) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression: minimise the (weighted) mean log-loss + l2 / 2 * |w|^2
    (intercept free).

    Args: X (N, K) float, y (N,) 0/1, sample_weight (N,) >= 0 or None (all 1; the weighted mean
    divides by the weights' sum).  Returns (w (K,), intercept).  L-BFGS with the exact gradient.
    """
    X, y = np.asarray(X, float), np.asarray(y, float)
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
    sw = sw / sw.sum()

    def f(theta):
        w, c = theta[:-1], theta[-1]
        z = X @ w + c
        loss = np.sum(sw * (np.logaddexp(0, z) - y * z)) + 0.5 * l2 * w @ w
        g = sw * (sigmoid(z) - y)
        return loss, np.concatenate([X.T @ g + l2 * w, [g.sum()]])

    r = minimize(f, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B")
    return r.x[:-1], float(r.x[-1])


def pav(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) least-squares fit of y on x by pool-adjacent-violators.

    Equal x values are pooled first (their mean, weighted by count).  Returns the step points
    (x unique increasing, fitted y non-decreasing) for linear interpolation.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ux, inv = np.unique(x, return_inverse=True)
    w = np.bincount(inv).astype(float)
    v = np.bincount(inv, weights=y) / w
    blocks = []  # [value, weight, n_points]
    for vi, wi in zip(v, w):
        blocks.append([vi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks[-1]
            a[0] = (a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1]); a[1] += b[1]; a[2] += b[2]
    fitted = np.concatenate([[val] * n for val, _, n in blocks])
    return ux, fitted


def fit_calibrator(method: str, p, y) -> Calibrator:
    """Fit one calibrator of raw probabilities ``p`` to outcomes ``y`` (val data only)."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    if method == "identity":
        return Calibrator("identity")
    if method == "platt":
        w, c = fit_logistic(logit(p)[:, None], y)
        return Calibrator("platt", {"a": float(w[0]), "b": float(c)})
    if method == "temperature":
        z = logit(p)
        r = minimize(lambda t: np.mean(np.logaddexp(0, z / np.exp(t[0])) - y * z / np.exp(t[0])), [0.0], method="L-BFGS-B")
        return Calibrator("temperature", {"temperature": float(np.exp(r.x[0]))})
    if method == "isotonic":
        x, f = pav(p, y)
        return Calibrator("isotonic", {"x": [float(v) for v in x], "y": [float(v) for v in f]})
    raise ValueError(method)


def _folds(y, k: int, rng) -> list[np.ndarray]:
    """Stratified fold index arrays."""
    y = np.asarray(y)
    out = [[] for _ in range(k)]
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, j in enumerate(idx):
            out[i % k].append(j)
    return [np.array(sorted(f)) for f in out]


def cv_predictions(fit_predict, y, repeats: int = CV_REPEATS) -> list[np.ndarray]:
    """Out-of-fold predictions of ``repeats`` stratified :data:`CV_FOLDS`-fold splits (seed :data:`SEED`).

    ``fit_predict(train_idx, test_idx) -> probabilities for test_idx``; returns one (N,) array per repeat."""
    rng = np.random.default_rng(SEED)
    y = np.asarray(y, float)
    out = []
    for _ in range(repeats):
        pred = np.empty(len(y))
        for f in _folds(y, CV_FOLDS, rng):
            tr = np.setdiff1d(np.arange(len(y)), f)
            pred[f] = fit_predict(tr, f)
        out.append(pred)
    return out


def cv_brier(fit_predict, n: int, y) -> float:
    """Mean Brier score of the out-of-fold predictions over :data:`CV_REPEATS` repeats (:func:`cv_predictions`)."""
    return float(np.mean([brier(y, p) for p in cv_predictions(fit_predict, y)]))


def fit_stack(X, y, l2: float, features_: list[str]) -> LinearStack:
    X = np.asarray(X, float)
    mu, sd = X.mean(0), X.std(0)
    sd[sd == 0] = 1.0
    w, c = fit_logistic((X - mu) / sd, y, l2)
    return LinearStack(tuple(features_), tuple(float(v) for v in mu), tuple(float(v) for v in sd),
                       tuple(float(v) for v in w), float(c))


# --- study -----------------------------------------------------------------------------------
def raw_scores(cid: str, recs: list[dict], stack: LinearStack | None = None) -> np.ndarray:
    nets, src, score = CONFIGS[cid]
    model = ProbabilityModel(cid, nets, score, Calibrator("identity"), "first", stack)
    return np.array([model.raw(features(r)) for r in recs], float)


def size_scores(recs: list[dict]) -> np.ndarray:
    """The size-only baseline's score: volume (mm^3) of :data:`SIZE_SOURCE`'s mask, 0 when it found nothing."""
    return np.array([_mask_rec(r, SIZE_SOURCE)["volume_mm3"] or 0.0 for r in recs], float)


def segmentation_figures(cid: str, recs: list[dict]) -> dict:
    src = CONFIGS[cid][1]
    d = np.array([_mask_rec(r, src)["dice"] for r in recs])
    missed = int((d == 0).sum())  # nothing segmented, or nothing overlapping the readers' mask
    return {"n_vois": len(recs), "dice_mean": float(d.mean()), "dice_median": float(np.median(d)), "missed": int(missed)}


def fit_config(cid: str, val: list[dict]) -> tuple[ProbabilityModel, dict]:
    """Fit configuration ``cid`` on the validation records; returns the model and the CV figures."""
    nets, src, score = CONFIGS[cid]
    cv = classified(val)
    y = np.array([r["label"] for r in cv], float)
    mask = "first"  # size features: the mask of nets[0] (DSMT-Net)
    if score == "stack":
        names = STACK_FEATURES[cid]
        X = np.array([[features(r)[k] for k in names] for r in cv])
        cvb = {}
        for l2 in L2_GRID:
            cvb[l2] = cv_brier(lambda tr, te, l2=l2: fit_stack(X[tr], y[tr], l2, names)(X[te]), len(y), y)
        best = min(cvb, key=cvb.get)
        stack = fit_stack(X, y, best, names)
        oof = cv_predictions(lambda tr, te: fit_stack(X[tr], y[tr], best, names)(X[te]), y)
        return (ProbabilityModel(cid, nets, "stack", Calibrator("identity"), mask, stack),
                {"method": "logistic regression (identity calibrator)", "l2": best,
                 "cv_brier_by_l2": {str(k): v for k, v in cvb.items()}, "oof": oof})
    p = raw_scores(cid, cv)
    cvb = {m: cv_brier(lambda tr, te, m=m: fit_calibrator(m, p[tr], y[tr])(p[te]), len(y), y)
           for m in ("identity", "temperature", "platt", "isotonic")}
    best = min((m for m in cvb if m in REPORTABLE_CALIBRATORS), key=cvb.get)
    oof = cv_predictions(lambda tr, te: fit_calibrator(best, p[tr], y[tr])(p[te]), y)
    return (ProbabilityModel(cid, nets, score, fit_calibrator(best, p, y), mask),
            {"method": best, "cv_brier_by_method": cvb, "oof": oof})


def evaluate(model: ProbabilityModel, recs: list[dict], all_recs: list[dict]) -> dict:
    """Metrics of a fitted model on one split's records (classification on the common nodule set)."""
    cid = model.id
    cs = classified(recs)
    y = np.array([r["label"] for r in cs], float)
    raw = raw_scores(cid, cs, model.stack)
    cal = model.calibrator(raw)
    vol = size_scores(cs)
    groups = [r["patient_id"] for r in cs]
    return {"n": len(y), "n_positive": int(y.sum()), "auc": roc_auc(y, cal), "auc_raw": roc_auc(y, raw),
            "auc_ci95": bootstrap_auc_ci(y, cal, groups), "size_only_auc": roc_auc(y, vol),
            "brier_raw": brier(y, raw), "brier": brier(y, cal), "ece_raw": ece(y, raw), "ece": ece(y, cal),
            "reliability_raw": reliability(y, raw), "reliability": reliability(y, cal),
            **segmentation_figures(cid, all_recs)}


def load_speed(folder: Path = REPORT_DIR) -> dict:
    """Measured bench_click medians {config id: {case: seconds}} (``speed.json``), {} when absent."""
    p = folder / "speed.json"
    return json.loads(p.read_text()).get("medians_s", {}) if p.is_file() else {}


def meets_speed(cid: str, speed: dict) -> bool | None:
    """True / False from the measured medians of the configuration's network set; None when not measured."""
    m = next((v for k, v in speed.items() if set(k.split(",")) == set(CONFIGS[cid][0])), None)
    if not m:
        return None
    return all(m.get(case, math.inf) <= t for case, t in SPEED_TARGET_S.items())


#: Calibrators a reported probability may come from.  Isotonic regression is fitted and its
#: cross-validated Brier score reported, but never chosen: fitted on ~70 validation nodules it
#: is a step function that reports exactly 0 or 1 at its ends (the 30 mm sample nodule got
#: "P(malignant) 1.0" when isotonic DSMT-Net was the default, 2026-12-02) and creates ties
#: that lower the AUC.  A probability shown to a radiologist should never be exactly 0 or 1.
REPORTABLE_CALIBRATORS = ("temperature", "platt")


def choose_default(results: dict, speed: dict) -> str:
    """The default configuration: among configurations that meet the measured speed target,
    the best validation 3D Dice mean (the reported mask and measurements), ties (within
    0.005) broken by the validation cross-validated Brier score of the probability model
    (lower) - all on **validation** figures; test is only reported.  A stacked model of the
    same networks replaces the calibrated single probability only if it beats that network on
    validation CV Brier *and* on test AUC (the issue's "only if it beats the best single
    network on test" rule).  ``size_only`` is a baseline, never the default."""
    ok = [c for c in results if meets_speed(c, speed)]
    if not ok:
        raise ValueError("no configuration meets the measured speed target (run Testing/Benchmarks/bench_click.py)")
    base = [c for c in ok if CONFIGS[c][2] != "stack"]
    best_dice = max(results[c]["val"]["dice_mean"] for c in base)
    cands = [c for c in base if results[c]["val"]["dice_mean"] >= best_dice - 0.005]
    choice = min(cands, key=lambda c: results[c]["fit"]["cv_brier"])
    single_best_test_auc = max(results[c]["test"]["auc"] for c in results if CONFIGS[c][2].startswith("network:"))
    for c in ok:
        if CONFIGS[c][2] == "stack" and c != "size_only" and CONFIGS[c][0] == CONFIGS[choice][0] \
                and results[c]["fit"]["cv_brier"] < results[choice]["fit"]["cv_brier"] \
                and results[c]["test"]["auc"] > single_best_test_auc:
            choice = c
    return choice


def run_study(val: list[dict], test: list[dict], speed: dict | None = None) -> tuple[dict, dict[str, ProbabilityModel]]:
    speed = load_speed() if speed is None else speed
    results, models = {}, {}
    for cid in CONFIGS:
        model, fit = fit_config(cid, val)
        fit["cv_brier"] = (fit["cv_brier_by_method"][fit["method"]] if "cv_brier_by_method" in fit
                           else min(fit["cv_brier_by_l2"].values()))
        oof = fit.pop("oof")
        cv = classified(val)
        yv = np.array([r["label"] for r in cv], float)
        stacked = CONFIGS[cid][2] == "stack"
        rawv = None if stacked else raw_scores(cid, cv)  # a stack's own output on val is in-sample: not reported
        results[cid] = {"networks": list(CONFIGS[cid][0]), "mask": CONFIGS[cid][1], "score": CONFIGS[cid][2], "fit": fit,
                        # val: raw network scores (nothing fitted) and out-of-fold (cross-validated) figures
                        # of the fitted model; never the in-sample output of what was fitted on val
                        "val": {"n": len(yv), "n_positive": int(yv.sum()),
                                "auc_raw": None if stacked else roc_auc(yv, rawv),
                                "brier_raw": None if stacked else brier(yv, rawv),
                                "ece_raw": None if stacked else ece(yv, rawv),
                                "auc_cv": float(np.mean([roc_auc(yv, q) for q in oof])),
                                "brier_cv": float(np.mean([brier(yv, q) for q in oof])),
                                "ece_cv": float(np.mean([ece(yv, q) for q in oof])),
                                "size_only_auc": roc_auc(yv, size_scores(cv)),
                                **segmentation_figures(cid, val)},
                        "test": evaluate(model, test, test), "meets_speed_target": meets_speed(cid, speed)}
        models[cid] = model
    return results, models


def plot_reliability(results: dict, path: Path, ids: list[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ids)
    cols = min(n, 4)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.4 * rows), squeeze=False)
    for ax, cid in zip(axes.ravel(), ids):
        t = results[cid]["test"]
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        for key, lab, st in (("reliability_raw", f"raw (ECE {t['ece_raw']:.3f})", "o--"),
                             ("reliability", f"calibrated (ECE {t['ece']:.3f})", "s-")):
            pts = t[key]
            ax.plot([q["mean_p"] for q in pts], [q["freq"] for q in pts], st, ms=3, label=lab)
        for q in t["reliability"]:
            ax.annotate(str(q["n"]), (q["mean_p"], q["freq"]), fontsize=6, xytext=(2, -8), textcoords="offset points")
        ax.set_title(f"{cid}: AUC {t['auc']:.3f} (size {t['size_only_auc']:.3f})", fontsize=8)
        ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.set_xlabel("predicted P(malignant)", fontsize=7)
        ax.set_ylabel("observed fraction malignant", fontsize=7); ax.legend(fontsize=6, loc="upper left")
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(results: dict, default: str, speed: dict) -> str:
    f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    t0 = next(iter(results.values()))["test"]
    lines = [f"Test patients' HU VOIs (3D click path, click at the labelled centre): {t0['n_vois']} VOIs; "
             f"malignancy on the {t0['n']} labelled nodules ({t0['n_positive']} malignant) that every network classified. "
             "Calibrators and stacked models fitted on the validation patients only; AUC raw = the network's own "
             "probability (isotonic calibration creates ties and can lower the AUC); for a stack, raw = calibrated; "
             "missed = Dice 0; size-only AUC = volume of DSMT-Net's mask alone.", "",
             "| configuration | networks | calibration (val CV) | Dice mean | Dice median | missed | AUC raw | AUC cal. [95 % CI] | "
             "size-only AUC | Brier raw -> cal. | ECE raw -> cal. | speed target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, r in results.items():
        t = r["test"]
        spd = {True: "met", False: "not met", None: "not measured"}[r["meets_speed_target"]]
        name = f"**{cid}** (default)" if cid == default else cid
        method = r["fit"]["method"] + (f", l2 {r['fit']['l2']}" if "l2" in r["fit"] else "")
        lines.append(f"| {name} | {','.join(r['networks'])} | {method} | {f(t['dice_mean'])} | {f(t['dice_median'])} | "
                     f"{t['missed']} / {t['n_vois']} | {'-' if r['score'] == 'stack' else f(t['auc_raw'])} | "
                     f"{f(t['auc'])} [{f(t['auc_ci95'][0])}, {f(t['auc_ci95'][1])}] | "
                     f"{f(t['size_only_auc'])} | {f(t['brier_raw'])} -> {f(t['brier'])} | {f(t['ece_raw'])} -> {f(t['ece'])} | {spd} |")
    v0 = next(iter(results.values()))["val"]
    lines += ["", f"Validation patients ({v0['n_vois']} VOIs, {v0['n']} classified nodules, {v0['n_positive']} malignant; "
              "the calibrators and stacks are fitted here, so their figures are out-of-fold: "
              f"{CV_REPEATS} x stratified {CV_FOLDS}-fold cross-validation within val, means; raw = the networks' own "
              "probabilities, nothing fitted; a stack has no raw figure):", "",
              "| configuration | Dice mean | Dice median | missed | AUC raw | AUC (CV) | size-only AUC | Brier raw | Brier (CV) | "
              "ECE raw | ECE (CV) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, r in results.items():
        v = r["val"]
        lines.append(f"| {cid} | {f(v['dice_mean'])} | {f(v['dice_median'])} | {v['missed']} / {v['n_vois']} | {f(v['auc_raw'])} | "
                     f"{f(v['auc_cv'])} | {f(v['size_only_auc'])} | {f(v['brier_raw'])} | {f(v['brier_cv'])} | "
                     f"{f(v['ece_raw'])} | {f(v['ece_cv'])} |")
    if speed:
        lines += ["", "Measured click-to-result medians (s; `Testing/Benchmarks/bench_click.py`, see speed.json): "
                  + "; ".join(f"{k}: " + ", ".join(f"{c} {s:.2f}" for c, s in v.items()) for k, v in speed.items())]
    return "\n".join(lines) + "\n"


def calibration_set(results: dict, models: dict[str, ProbabilityModel], default: str) -> CalibrationSet:
    """The models to ship: every fitted configuration, with provenance and test figures.  DSMT-Net's
    calibrator is the one ``training.calibration_select`` chose (its report, when present): identity
    unless another wins on the training + validation pool with its interval clear."""
    out = {}
    chosen = REPO / "training" / "reports" / "clinical" / "calibration_select.json"
    if chosen.is_file() and "dsmtnet" in models:  # issue 22: the calibrator chosen on the larger pool wins
        sel = json.loads(chosen.read_text())
        m = models["dsmtnet"]
        models = {**models, "dsmtnet": ProbabilityModel("dsmtnet", m.networks, m.score, Calibrator.from_dict(sel["calibrator"]),
                                                        m.mask, m.stack)}
    for cid, m in models.items():
        r = results[cid]
        info = {"fitted_on": f"LIDC-IDRI validation patients, HU VOIs, {r['val']['n']} nodules "
                             f"({r['val']['n_positive']} malignant); training/calibration.py",
                "test": {k: r["test"][k] for k in ("n", "n_positive", "auc", "size_only_auc", "brier", "ece",
                                                   "dice_mean", "dice_median", "missed")}}
        out[cid] = ProbabilityModel(cid, m.networks, m.score, m.calibrator, m.mask, m.stack, info)
    d = {"networks": list(models[default].networks), "mask": models[default].mask, "model": default}
    return CalibrationSet(out, d, None, {"note": "written by python -m training.calibration --write-weights; "
                                                "fitted on validation patients only, test figures for information"})


def tta_comparison(folder: Path = REPORT_DIR) -> dict | None:
    """DSMT-Net with and without left-right flip test-time augmentation, per split present
    (``<split>_dsmtnet.json`` vs ``<split>_dsmtnet_tta.json``): Dice mean / median, missed
    (Dice 0), raw AUC and Brier on the labelled nodules both runs classified.  None without TTA files."""
    out = {}
    for split in ("val", "test"):
        if not (folder / f"{split}_dsmtnet_tta.json").is_file():
            continue
        a = json.loads((folder / f"{split}_dsmtnet.json").read_text())["nodules"]
        b = json.loads((folder / f"{split}_dsmtnet_tta.json").read_text())["nodules"]
        if [(r["patient_id"], r["nodule_id"]) for r in a] != [(r["patient_id"], r["nodule_id"]) for r in b]:
            raise ValueError(f"{split}: the TTA run covers other VOIs")
        row = {}
        for name, recs in (("plain", a), ("tta", b)):
            d = np.array([r["networks"]["dsmtnet"]["dice"] for r in recs])
            row[name] = {"dice_mean": float(d.mean()), "dice_median": float(np.median(d)), "missed": int((d == 0).sum()),
                         "seconds_median": float(np.median([r["seconds"] for r in recs]))}
        both = [i for i in range(len(a)) if a[i]["label"] >= 0 and a[i]["networks"]["dsmtnet"]["probability"] is not None
                and b[i]["networks"]["dsmtnet"]["probability"] is not None]
        y = np.array([a[i]["label"] for i in both], float)
        for name, recs in (("plain", a), ("tta", b)):
            pr = np.array([recs[i]["networks"]["dsmtnet"]["probability"] for i in both])
            row[name].update({"n": len(y), "auc_raw": roc_auc(y, pr), "brier_raw": brier(y, pr)})
        out[split] = row
    return out or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-weights", action="store_true", help=f"write {WEIGHTS_FILE.relative_to(REPO)}")
    ap.add_argument("--folder", type=Path, default=REPORT_DIR)
    a = ap.parse_args(argv)
    val, test = load_records("val", a.folder), load_records("test", a.folder)
    speed = load_speed(a.folder)
    results, models = run_study(val, test, speed)
    default = choose_default(results, speed)
    clean = json.loads(json.dumps({"default": default, "configs": results}, default=float))
    (a.folder / "summary.json").write_text(json.dumps(clean, indent=1))
    md = summary_markdown(results, default, speed)
    (a.folder / "summary.md").write_text(md)
    plot_reliability(results, a.folder / "reliability_test.png", list(results),
                     "Reliability on test patients (10 bins; calibrators fitted on val; numbers: nodules per bin)")
    plot_reliability(results, a.folder / "reliability_default_test.png", [default],
                     f"Default ({default}), test patients")
    tta = tta_comparison(a.folder)
    if tta:
        f = lambda v: f"{v:.3f}"  # noqa: E731
        md += ("\nTest-time augmentation (left-right flip, DSMT-Net alone, raw probabilities):\n\n"
               "| split | run | VOIs' Dice mean | Dice median | missed | AUC raw (n) | Brier raw | median s per VOI (loaded CPU) |\n"
               "|---|---|---|---|---|---|---|---|\n")
        for split, row in tta.items():
            for name, v in row.items():
                md += (f"| {split} | {name} | {f(v['dice_mean'])} | {f(v['dice_median'])} | {v['missed']} | "
                       f"{f(v['auc_raw'])} ({v['n']}) | {f(v['brier_raw'])} | {v['seconds_median']:.2f} |\n")
        (a.folder / "summary.md").write_text(md)
        clean["tta"] = tta
        (a.folder / "summary.json").write_text(json.dumps(clean, indent=1))
    print(md)
    print(f"default: {default}")
    if a.write_weights:
        cs = calibration_set(results, models, default)
        WEIGHTS_FILE.write_text(json.dumps(cs.to_dict(), indent=1, allow_nan=False) + "\n")
        from NoduleMTLLib.models.calibration import record_checksum
        record_checksum(WEIGHTS_FILE)  # models.json vouches for it (load_calibration verifies the sha256)
        print(f"wrote {WEIGHTS_FILE} (checksum recorded in models.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
