"""How far the Lung-RADS evaluation's figures can move by chance (issue 22's done-when figures).

    python -m training.metric_noise [--split test] [--n-boot 2000] [--out DIR]

Reads ``training/reports/lung_rads/lung_rads_<split>.json`` (written by ``nodulemtl-train
evaluate lung-rads``) and computes nothing new about the networks. It asks how precisely a
figure measured on a few dozen patients is known:

* **ECE of a perfectly calibrated model.** The labels are drawn as Bernoulli(p) from the
  reported probabilities themselves, so the model is calibrated by construction, and the
  10-bin expected calibration error (:func:`training.calibration.ece`) is measured on the
  same number of nodules. Its distribution is the ECE that sampling noise alone produces.
  An observed ECE inside it is consistent with perfect calibration. A target below most of
  it cannot be shown on this sample (Monte Carlo; Naeini et al., AAAI 2015, for the
  estimator; the small-sample upward bias of binned ECE is discussed by Roelofs et al.,
  AISTATS 2022).
* **Patient bootstrap** 95 % intervals (patients resampled with replacement, nodules kept with
  their patient) for the malignancy AUC, the Dice median, Lung-RADS exact agreement and
  under-calls, and the share of long axes within 15 % of the readers'.
* **Wilson** 95 % intervals for the type recalls (solid called solid, subsolid called
  subsolid), via :meth:`scipy.stats.binomtest`.

Output: ``metric_noise_<split>.json`` and ``.md`` beside the input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.lung_rads_eval import CATEGORIES, OUT_DIR

#: Monte Carlo draws of the calibrated-model ECE and bootstrap resamples.
N_DRAWS = 10000
N_BOOT = 2000
SEED = 0
#: The issue's targets these figures are set against (issue 22, "Done when").
TARGETS = {"ece": 0.05, "auc": 0.928, "dice_median": 0.834, "exact": 0.85, "under_calls": 0.05,
           "within_15pct": 0.85, "subsolid_called_subsolid": 0.75, "solid_called_solid": 0.90}


def calibrated_ece(p, n_draws: int = N_DRAWS, seed: int = SEED) -> np.ndarray:
    """ECE (10 bins) of a perfectly calibrated model with these probabilities, one per draw.

    Args:
        p: float array (n,), reported probabilities in [0, 1].
        n_draws: Monte Carlo draws; each draws labels y_i ~ Bernoulli(p_i).

    Returns:
        float64 array (n_draws,).
    """
    from training.calibration import ece

    p = np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    return np.array([ece((rng.random(len(p)) < p).astype(int), p) for _ in range(n_draws)])


def patient_bootstrap(rows: list[dict], stat: Callable[[list[dict]], float], n_boot: int = N_BOOT,
                      seed: int = SEED) -> tuple[float, float]:
    """95 % percentile interval of ``stat(rows)`` under resampling of patients (``patient_id``).

    Resamples where ``stat`` is undefined (it returns None or NaN, e.g. an AUC with one class)
    are skipped.

    Raises:
        ValueError: no resample gave a value (:func:`training.calibration_select.boot_ci`).
    """
    from training.calibration_select import boot_ci

    return boot_ci(lambda i: stat([rows[j] for j in i]), [r["patient_id"] for r in rows], n_boot, seed)


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of k successes out of n (n >= 1)."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _rank(c: str) -> int:
    return CATEGORIES.index(c)


def _auc(rows):
    from NoduleMTLLib.core.metrics import roc_auc

    y = [r["label"] for r in rows]
    if len(set(y)) < 2:
        return None
    return roc_auc(y, [r["probability"] for r in rows])


def _pred_cat(r):
    return (r.get("predicted") or {}).get("category")


def _exact(rows):
    return float(np.mean([_pred_cat(r) == r["reference"]["category"] for r in rows]))


def _under(rows):
    return float(np.mean([_pred_cat(r) is not None and _rank(_pred_cat(r)) < _rank(r["reference"]["category"])
                          for r in rows]))


def _within(rows):
    v = [abs(r["predicted"]["long_axis_mm"] / max(r["reference"]["long_axis_mm"], 1e-6) - 1.0) <= 0.15 for r in rows]
    return float(np.mean(v)) if v else None


def analyse(ev: dict, n_boot: int = N_BOOT, n_draws: int = N_DRAWS) -> dict:
    """The figures of :mod:`training.lung_rads_eval`'s output ``ev`` with their chance variation.

    Returns:
        {"split", "n_nodules", "n_patients", "malignancy": {...}, "dice_median", "lung_rads",
        "long_axis_within_15pct", "type", "targets"}; every figure as {"value", "ci95"} (ECE also
        with the calibrated model's distribution).
    """
    from training.lung_rads_eval import texture_class

    # the same rows and denominators as lung_rads_eval.summarize: categories over every nodule (a
    # nodule without a prediction is neither exact nor an under-call), axes and types over the
    # assessed ones, malignancy over the labelled ones with a probability, Dice over all (0 if missed)
    nod = ev["nodules"]
    found = [r for r in nod if r.get("predicted")]
    lab = [r for r in nod if r.get("label") in (0, 1) and r.get("probability") is not None]
    cats = nod
    axes = found
    dice = nod

    from training.calibration import ece

    p = np.array([r["probability"] for r in lab])
    y = np.array([r["label"] for r in lab], int)
    obs = float(ece(y, p))
    null = calibrated_ece(p, n_draws)
    out = {"split": ev.get("split"), "n_nodules": len(nod), "n_patients": len({r["patient_id"] for r in nod}),
           "n_labelled": len(lab), "n_malignant": int(y.sum())}
    out["malignancy"] = {
        "auc": {"value": _auc(lab), "ci95": patient_bootstrap(lab, _auc, n_boot)},
        "ece": {"value": obs,
                "calibrated_model": {"mean": float(null.mean()), "ci95": [float(v) for v in np.quantile(null, [0.025, 0.975])],
                                     "share_at_or_below_target": float(np.mean(null <= TARGETS["ece"])),
                                     "share_at_or_below_observed": float(np.mean(null <= obs)), "draws": len(null)}},
    }
    dmed = (lambda rows: float(np.median([r["dice"] for r in rows])))
    out["dice_median"] = {"value": dmed(dice), "ci95": patient_bootstrap(dice, dmed, n_boot)}
    out["lung_rads"] = {"n": len(cats), "exact": {"value": _exact(cats), "ci95": patient_bootstrap(cats, _exact, n_boot)},
                        "under_calls": {"value": _under(cats), "ci95": patient_bootstrap(cats, _under, n_boot)}}
    out["long_axis_within_15pct"] = {"n": len(axes), "value": _within(axes), "ci95": patient_bootstrap(axes, _within, n_boot)}
    solid = [r for r in found if texture_class(r["texture"]) == "solid"]
    sub = [r for r in found if texture_class(r["texture"]) != "solid"]
    ks = sum(r["predicted"]["type"] == "solid" for r in solid)
    kb = sum(r["predicted"]["type"] != "solid" for r in sub)
    out["type"] = {"solid_called_solid": {"k": ks, "n": len(solid), "value": ks / max(1, len(solid)),
                                          "ci95": wilson(ks, len(solid)) if solid else None},
                   "subsolid_called_subsolid": {"k": kb, "n": len(sub), "value": kb / max(1, len(sub)),
                                                "ci95": wilson(kb, len(sub)) if sub else None}}
    out["targets"] = TARGETS
    out["n_boot"], out["seed"] = n_boot, SEED
    return out


def markdown(a: dict) -> str:
    """A short table of :func:`analyse`'s output."""
    def f(x):
        return f"{x:.3f}"

    def ci(c):
        return f"[{c[0]:.3f}, {c[1]:.3f}]"

    e = a["malignancy"]["ece"]
    cm = e["calibrated_model"]
    t = a["targets"]
    lines = [f"# Chance variation of the Lung-RADS evaluation ({a['split']}: {a['n_nodules']} nodules, "
             f"{a['n_patients']} patients; {a['n_labelled']} labelled, {a['n_malignant']} malignant)", "",
             "| figure | measured | 95 % interval | issue target |", "|---|---|---|---|",
             f"| malignancy AUC | {f(a['malignancy']['auc']['value'])} | {ci(a['malignancy']['auc']['ci95'])} (patients) | >= {t['auc']} |",
             f"| ECE (10 bins) | {f(e['value'])} | a perfectly calibrated model: mean {f(cm['mean'])}, {ci(cm['ci95'])}; "
             f"<= {t['ece']} in {cm['share_at_or_below_target']:.1%} of draws | <= {t['ece']} |",
             f"| Dice median | {f(a['dice_median']['value'])} | {ci(a['dice_median']['ci95'])} (patients) | >= {t['dice_median']} |",
             ]
    for name, v, op, tk in (("Lung-RADS exact", a["lung_rads"]["exact"], ">=", "exact"),
                            ("under-calls", a["lung_rads"]["under_calls"], "<=", "under_calls"),
                            ("long axis within 15 %", a["long_axis_within_15pct"], ">=", "within_15pct")):
        lines.append(f"| {name} | {f(v['value'])} | {ci(v['ci95'])} (patients) | {op} {t[tk]} |")
    for key, tk in (("solid_called_solid", "solid_called_solid"), ("subsolid_called_subsolid", "subsolid_called_subsolid")):
        v = a["type"][key]
        lines.append(f"| {key.replace('_', ' ')} | {v['k']} / {v['n']} = {f(v['value'])} | {ci(v['ci95'])} (Wilson) | >= {t[tk]} |")
    lines += ["", f"A perfectly calibrated model with the same probabilities shows an ECE at or below the measured "
              f"{f(e['value'])} in {cm['share_at_or_below_observed']:.1%} of draws ({cm['draws']} draws)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.metric_noise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--n-boot", type=int, default=N_BOOT)
    ap.add_argument("--n-draws", type=int, default=N_DRAWS)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    a = ap.parse_args(argv)
    src = OUT_DIR / f"lung_rads_{a.split}.json"
    if not src.exists():
        print(f"error: {src} missing: run `nodulemtl-train evaluate lung-rads --split {a.split}` first", file=sys.stderr)
        return 2
    res = analyse(json.loads(src.read_text()), a.n_boot, a.n_draws)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"metric_noise_{a.split}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (a.out / f"metric_noise_{a.split}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
