"""Choose the default network's calibrator so that calibration never makes things worse (issue 22, item 5).

    python -m training.calibration_select [--threshold T] [--write-weights]

Pool: the **training + validation patients'** ``lidc_vois`` nodules with a malignancy label
(median rating >= 4 malignant, <= 2 benign; 3 excluded), DSMT-Net's raw P(malignant) on the 3D
HU click path at the labelled centre (``training.clinical_cache``, replayed at the product's mask
threshold).  **Caveat:** DSMT-Net was trained on the training patients, so their probabilities are
in-sample (more confident and more often right than on unseen patients); the validation patients
are out-of-sample.  The choice is reported on the pool and on the validation patients alone.

Candidates: identity, temperature (``sigmoid(logit(p) / T)``), Platt (``sigmoid(a logit(p) + b)``),
scored by out-of-fold log-loss over patient-grouped 5-fold cross-validation (10 repeats).
Identity is kept unless another candidate's out-of-fold log-loss is lower with the 95 % patient
bootstrap interval of the difference (candidate - identity) entirely below 0.

Reported on the test patients once (never used for a choice): ECE (10 equal-width bins) of the raw
and the reported probability with patient bootstrap 95 % intervals, Brier, AUC, and a reliability
diagram (``training/reports/clinical/reliability_dsmtnet_test.png``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.calibration import WEIGHTS_FILE, brier, ece, fit_calibrator, reliability
from training.clinical import REPORT_DIR, load_table
from training.data import malignancy_label

METHODS = ("identity", "temperature", "platt")
FOLDS, REPEATS, SEED, N_BOOT = 5, 10, 0, 2000


def nll(y, p) -> np.ndarray:
    """Per-nodule log-loss."""
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    y = np.asarray(y, float)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def labelled(tab: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    recs = [r for r in tab if r["found"] and r["probability"] is not None and malignancy_label(r["malignancy_median"]) >= 0]
    return (np.array([malignancy_label(r["malignancy_median"]) for r in recs], float),
            np.array([r["probability"] for r in recs], float), np.array([r["patient_id"] for r in recs]))


def oof(y, p, groups, method: str, repeats: int = REPEATS) -> np.ndarray:
    """(repeats, N) out-of-fold calibrated probabilities, patient-grouped folds."""
    ug = np.unique(groups)
    rng = np.random.default_rng(SEED)
    out = np.empty((repeats, len(y)))
    for r in range(repeats):
        fold = dict(zip(ug[rng.permutation(len(ug))], np.arange(len(ug)) % FOLDS))
        fid = np.array([fold[g] for g in groups])
        for f in range(FOLDS):
            te, tr = fid == f, fid != f
            out[r, te] = fit_calibrator(method, p[tr], y[tr])(p[te])
    return out


def boot_ci(values_fn, groups, n: int = N_BOOT, seed: int = SEED) -> tuple[float, float]:
    """95 % percentile interval of ``values_fn(index array)`` resampling patients (``groups``) with
    replacement; resamples where ``values_fn`` is undefined (None or NaN, e.g. an AUC of one class)
    are skipped.

    Raises:
        ValueError: no resample gave a value.
    """
    groups = np.asarray(groups)
    ug = np.unique(groups)
    idx = {g: np.flatnonzero(groups == g) for g in ug}
    rng = np.random.default_rng(seed)
    vals = [values_fn(np.concatenate([idx[g] for g in rng.choice(ug, len(ug))])) for _ in range(n)]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        raise ValueError("the statistic is undefined on every resample")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def compare(y, p, groups) -> dict:
    """Out-of-fold log-loss / Brier / ECE of each method and the bootstrap CI of its log-loss minus identity's."""
    res = {}
    base = None
    for m in METHODS:
        q = oof(y, p, groups, m)
        loss = nll(y[None], q).mean(0)  # per nodule, averaged over repeats
        if m == "identity":
            base = loss
        res[m] = {"n": len(y), "n_positive": int(y.sum()), "oof_log_loss": float(loss.mean()),
                  "oof_brier": float(np.mean([brier(y, qq) for qq in q])), "oof_ece": float(np.mean([ece(y, qq) for qq in q]))}
        if m != "identity":
            d = loss - base
            res[m]["log_loss_minus_identity"] = float(d.mean())
            res[m]["ci95"] = boot_ci(lambda i, d=d: d[i].mean(), groups)
    return res


def choose(res: dict) -> str:
    """Identity unless a method's log-loss difference CI lies entirely below 0 (then the lowest such)."""
    wins = [m for m in METHODS if m != "identity" and res[m]["ci95"][1] < 0]
    return min(wins, key=lambda m: res[m]["oof_log_loss"]) if wins else "identity"


def dice_figures(recs: list[dict]) -> dict:
    """3D Dice of the replayed masks (at the mask threshold) on every VOI of ``recs``: mean, median, missed."""
    d = np.array([r["dice"] for r in recs])
    return {"dice_mean": float(d.mean()), "dice_median": float(np.median(d)), "missed": int((d == 0).sum())}


def plot(y, raw, cal, method, path, title) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    series = [("raw", raw, "o--")] + ([] if method == "identity" else [(f"reported ({method})", cal, "s-")])
    for lab, q, st in series:
        pts = reliability(y, q)
        ax.plot([b["mean_p"] for b in pts], [b["freq"] for b in pts], st, ms=4, label=f"{lab}, ECE {ece(y, q):.3f}")
        for b in pts:
            ax.annotate(str(b["n"]), (b["mean_p"], b["freq"]), fontsize=6, xytext=(2, -8), textcoords="offset points")
    ax.set_xlim(0, 1); ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(malignant)"); ax.set_ylabel("observed fraction malignant")
    ax.set_title(title, fontsize=8); ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def main(argv=None) -> int:
    from NoduleMTLLib.core.metrics import roc_auc
    from NoduleMTLLib.models.calibration import CalibrationSet, Calibrator

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threshold", type=float, default=None, help="mask threshold (default: clinical.json's)")
    ap.add_argument("--write-weights", action="store_true")
    ap.add_argument("--previous", type=Path, default=WEIGHTS_FILE,
                    help="calibration.json whose DSMT-Net calibrator is reported for comparison (default: the shipped one)")
    a = ap.parse_args(argv)
    thr = a.threshold
    if thr is None:
        from NoduleMTLLib.clinical.lung_rads import load_clinical
        thr = float((load_clinical() or {}).get("mask_threshold", {}).get("dsmtnet", 0.5))
    tab = load_table(thr)
    pool = [r for r in tab if r["split"] in ("train", "val")]
    y, p, g = labelled(pool)
    res_pool = compare(y, p, g)
    yv, pv, gv = labelled([r for r in tab if r["split"] == "val"])
    res_val = compare(yv, pv, gv)
    method = choose(res_pool)
    cal = fit_calibrator(method, p, y)
    yt, pt, gt = labelled([r for r in tab if r["split"] == "test"])
    ct = cal(pt)
    test = {"n": len(yt), "n_positive": int(yt.sum()), "auc_raw": roc_auc(yt, pt), "auc": roc_auc(yt, ct),
            "brier_raw": brier(yt, pt), "brier": brier(yt, ct),
            "ece_raw": ece(yt, pt), "ece_raw_ci95": boot_ci(lambda i: ece(yt[i], pt[i]), gt),
            "ece": ece(yt, ct), "ece_ci95": boot_ci(lambda i: ece(yt[i], ct[i]), gt)}
    # the previous shipped calibrator (temperature fitted on the 73 validation nodules), for comparison
    old = CalibrationSet.from_dict(json.loads(a.previous.read_text())).models["dsmtnet"].calibrator
    test["previous_" + old.method] = {"ece": ece(yt, old(pt)), "ece_ci95": boot_ci(lambda i: ece(yt[i], old(pt[i])), gt),
                                      "brier": brier(yt, old(pt))}
    rep = {"mask_threshold": thr, "pool": "training + validation patients (training in-sample for DSMT-Net)",
           "chosen": method, "calibrator": cal.to_dict(), "pool_cv": res_pool, "validation_only_cv": res_val, "test": test}
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "calibration_select.json").write_text(json.dumps(rep, indent=1) + "\n")
    plot(yt, pt, ct, method, REPORT_DIR / "reliability_dsmtnet_test.png",
         f"DSMT-Net, test patients ({len(yt)} nodules, {int(yt.sum())} malignant); reported = {method}")
    print(json.dumps(rep, indent=1))
    if a.write_weights:
        d = json.loads(WEIGHTS_FILE.read_text())
        m = d["models"]["dsmtnet"]
        m["calibrator"] = Calibrator.from_dict(cal.to_dict()).to_dict()
        m["fitted_on"] = (f"chosen by training.calibration_select: out-of-fold log-loss over {len(y)} labelled nodules of "
                          "the training + validation patients (training in-sample for DSMT-Net), identity unless another "
                          f"wins with its 95 % CI clear; mask threshold {thr}")
        m["test"] = {**m.get("test", {}), "n": test["n"], "n_positive": test["n_positive"], "auc": test["auc"],
                     "brier": test["brier"], "ece": test["ece"], "ece_ci95": list(test["ece_ci95"]),
                     "ece_raw": test["ece_raw"], **dice_figures([r for r in tab if r["split"] == "test"])}
        WEIGHTS_FILE.write_text(json.dumps(d, indent=1, allow_nan=False) + "\n")
        from NoduleMTLLib.models.calibration import record_checksum
        record_checksum(WEIGHTS_FILE)  # models.json vouches for it (load_calibration verifies the sha256)
        print(f"wrote {WEIGHTS_FILE} (checksum recorded in models.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
