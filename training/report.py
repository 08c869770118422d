"""Evaluation report of a click network: summary metrics and PNG figures.

    nodulemtl-train report NETWORK [--runs runs] [--out training/reports/NETWORK]

Reads the JSONs that ``nodulemtl-train evaluate`` writes into ``runs/NETWORK/``:

* ``eval_val.json`` / ``eval_test.json`` - 2D evaluation on the network grid
  (``training.click2d.evaluate_nodules``): per-nodule ``dices`` (and ``jaccards``,
  ``pixel`` TP/FP/TN/FN sums when written by this version), malignancy ``probs`` /
  ``labels``, and ``signs`` ({name: {"auc", "n", "labels", "probs", ...}}) for networks with
  sign heads;
* ``eval_vois_val.json`` / ``eval_vois_test.json`` - 3D click path on HU VOIs
  (``training.evaluate_click``): summary figures; per-nodule lists are used when present.

and writes into the output folder (default ``training/reports/NETWORK/``, committed):

* ``roc.png`` - malignancy ROC curve of every evaluation that has per-nodule probabilities,
  AUC and n in the legend;
* ``roc_signs_<split>.png`` - one ROC curve per radiological sign (networks with sign heads);
* ``dice_hist.png`` - histogram of the per-nodule Dice of every evaluation that has them;
* ``summary.json`` and ``summary.md`` - the metrics (MT-Net's segmentation set: Dice,
  Jaccard, pixel ACC / recall (SEN) / SPE; classification ACC / AUC / SEN / SPE at 0.5;
  per-sign AUC).

Jaccard: from ``jaccards`` when present, otherwise computed per nodule from its Dice,
J = D / (2 - D) (exact for one pair of masks), flagged ``jaccard_from_dice``.  Pixel
metrics need the ``pixel`` sums (re-run ``evaluate`` with this version to get them).
Classification figures are recomputed from ``probs``/``labels`` with
``NoduleMTLLib.core.metrics.binary_classification_stats`` (same code as ``evaluate``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from NoduleMTLLib.core.metrics import binary_classification_stats

REPO = Path(__file__).resolve().parents[1]
#: Evaluation files read, in this order, with their display names.
EVAL_FILES = (("eval_val.json", "2D val"), ("eval_test.json", "2D test"),
              ("eval_vois_val.json", "3D click val (HU)"), ("eval_vois_test.json", "3D click test (HU)"))


class ReportError(RuntimeError):
    """No evaluation JSON for the network, or a JSON without the expected fields."""


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points of binary labels vs scores (higher score = class 1).

    Args:
        labels: (N,) 0/1; scores: (N,) float.  Both classes must be present.
    Returns:
        (fpr, tpr): float arrays from (0, 0) to (1, 1), one point per distinct score
        (thresholds ``score >= t`` from the highest score down), so the trapezoidal area
        equals the Mann-Whitney AUC of ``NoduleMTLLib.core.metrics.roc_auc`` (ties included).
    Raises:
        ValueError: lengths differ or a class is missing.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("ROC curve needs both classes")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    return np.r_[0.0, fp / n0], np.r_[0.0, tp / n1]


def _trapz(x, y) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def summarize(ev: dict) -> dict:
    """Metrics of one evaluation JSON (see the module docstring for where each comes from)."""
    out: dict = {"n_nodules": ev.get("n_nodules")}
    dices = ev.get("dices")
    if dices is not None:
        d = np.asarray(dices, float)
        out.update(dice_mean=float(d.mean()), dice_median=float(np.median(d)))
        if ev.get("jaccards") is not None:
            out["jaccard_mean"] = float(np.mean(ev["jaccards"]))
        else:
            out["jaccard_mean"] = float(np.mean(d / (2 - d)))
            out["jaccard_from_dice"] = True
    for k in ("dice3d_mean", "dice3d_median", "found", "median_time_s"):
        if k in ev:
            out[k] = ev[k]
    if "pixel" in ev:
        px = ev["pixel"]
        tp, fp, tn, fn = (int(px[k]) for k in ("tp", "fp", "tn", "fn"))
        out["pixel"] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / max(1, tp + fp + tn + fn),
                        "recall": tp / max(1, tp + fn), "specificity": tn / max(1, tn + fp)}
    if ev.get("probs") is not None and ev.get("labels") is not None:
        out["classification"] = binary_classification_stats(ev["labels"], ev["probs"])
    elif "classification" in ev:
        out["classification"] = dict(ev["classification"])
    if ev.get("signs"):
        out["signs"] = {}
        for name, sg in ev["signs"].items():
            if sg.get("labels") is not None and sg.get("probs") is not None and len(sg["labels"]):
                st = binary_classification_stats(sg["labels"], sg["probs"])
                out["signs"][name] = {"auc": st["auc"], "n": st["n"], "n_positive": st["n_positive"]}
            else:
                out["signs"][name] = {"auc": sg.get("auc"), "n": sg.get("n"), "n_positive": sg.get("n_positive")}
    return out


def load_evals(network: str, runs_dir: Path | None = None) -> dict[str, dict]:
    """{display name: evaluation dict} of the network's evaluation JSONs present in ``runs_dir/network``.

    Raises ReportError when there is none.
    """
    d = Path(runs_dir or REPO / "runs") / network
    evs = {}
    for fname, name in EVAL_FILES:
        p = d / fname
        if p.is_file():
            try:
                evs[name] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ReportError(f"{p} is not valid JSON: {e}") from None
    if not evs:
        raise ReportError(f"no evaluation JSON for {network} in {d} (run: nodulemtl-train evaluate {network} --split val)")
    return evs


def _fig():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_roc(curves: list[tuple[str, list, list]], path: Path, title: str) -> None:
    """ROC curves (one per (name, labels, probs)) with AUC and n in the legend, as a PNG."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=100)
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)
    for name, labels, probs in curves:
        fpr, tpr = roc_curve(labels, probs)
        ax.plot(fpr, tpr, lw=1.6, drawstyle="default",
                label=f"{name}: AUC {_trapz(fpr, tpr):.3f} (n={len(labels)}, {int(np.sum(labels))} pos.)")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_dice_hist(series: list[tuple[str, list]], path: Path, title: str) -> None:
    """Histogram (20 bins over [0, 1]) of per-nodule Dice per evaluation, mean/median in the legend, as a PNG."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=100)
    bins = np.linspace(0, 1, 21)
    for name, d in series:
        d = np.asarray(d, float)
        ax.hist(d, bins=bins, histtype="step", lw=1.6, label=f"{name}: mean {d.mean():.3f}, median {np.median(d):.3f} (n={len(d)})")
    ax.set(xlabel="Dice per nodule", ylabel="nodules", xlim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _clean(v):
    """JSON-safe copy: NaN -> None (strict JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _f(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def summary_markdown(network: str, summary: dict) -> str:
    """The summary as a Markdown page (one table row per evaluation)."""
    lines = [f"# Evaluation report: `{network}`", "",
             f"Generated by `nodulemtl-train report {network}` from `runs/{network}/eval_*.json`.", "",
             "| evaluation | nodules | Dice mean | Dice median | Jaccard mean | pixel ACC | pixel SEN | pixel SPE "
             "| n classified (malignant) | ACC | AUC | SEN | SPE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["evaluations"].items():
        c = s.get("classification", {})
        px = s.get("pixel", {})
        dm = s.get("dice_mean", s.get("dice3d_mean"))
        dmed = s.get("dice_median", s.get("dice3d_median"))
        jac = _f(s.get("jaccard_mean")) + ("*" if s.get("jaccard_from_dice") else "")
        lines.append(f"| {name} | {s.get('n_nodules')} | {_f(dm)} | {_f(dmed)} | {jac} | {_f(px.get('accuracy'))} | "
                     f"{_f(px.get('recall'))} | {_f(px.get('specificity'))} | {c.get('n', '-')} ({c.get('n_positive', '-')}) | "
                     f"{_f(c.get('accuracy'))} | {_f(c.get('auc'))} | {_f(c.get('sensitivity'))} | {_f(c.get('specificity'))} |")
    lines += ["", "\\* Jaccard computed per nodule from its Dice, J = D / (2 - D).  `-`: not in that evaluation's JSON.", ""]
    signs = {n: s["signs"] for n, s in summary["evaluations"].items() if s.get("signs")}
    if signs:
        lines += ["## Radiological signs (AUC, n)", "", "| evaluation | " + " | ".join(next(iter(signs.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(signs.values())))]
        for name, sg in signs.items():
            lines.append(f"| {name} | " + " | ".join(f"{_f(v['auc'])} ({v['n']})" for v in sg.values()) + " |")
        lines.append("")
    lines += ["Figures: " + ", ".join(f"[`{f}`]({f})" for f in summary["figures"]), ""]
    return "\n".join(lines)


def write_report(network: str, runs_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Write the figures and summaries of ``network`` (see the module docstring). Returns the summary dict.

    Raises ReportError when the network has no evaluation JSON.
    """
    evs = load_evals(network, runs_dir)
    out = Path(out_dir or REPO / "training" / "reports" / network)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"network": network, "evaluations": {}, "figures": []}
    for name, ev in evs.items():
        s = summarize(ev)
        for k in ("split", "weights", "sha256"):
            if k in ev:
                s[k] = Path(ev[k]).name if k == "weights" else ev[k]
        summary["evaluations"][name] = s
    curves = [(n, ev["labels"], ev["probs"]) for n, ev in evs.items()
              if ev.get("labels") and ev.get("probs") and 0 < sum(ev["labels"]) < len(ev["labels"])]
    if curves:
        plot_roc(curves, out / "roc.png", f"{network}: malignancy ROC")
        summary["figures"].append("roc.png")
    for n, ev in evs.items():
        sg = [(name, v["labels"], v["probs"]) for name, v in (ev.get("signs") or {}).items()
              if v.get("labels") and v.get("probs") and 0 < sum(v["labels"]) < len(v["labels"])]
        if sg:
            fname = f"roc_signs_{ev.get('split', n.split()[-1])}.png" if n.startswith("2D") else \
                f"roc_signs_vois_{ev.get('split', 'x')}.png"
            plot_roc(sg, out / fname, f"{network}: radiological signs ({n})")
            summary["figures"].append(fname)
    hist = [(n, ev["dices"]) for n, ev in evs.items() if ev.get("dices")]
    if hist:
        plot_dice_hist(hist, out / "dice_hist.png", f"{network}: Dice per nodule")
        summary["figures"].append("dice_hist.png")
    (out / "summary.json").write_text(json.dumps(_clean(summary), indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(network, summary))
    return summary


def evaluate_consensus_vois(network_ids: tuple[str, ...], split: str = "val", data_dir=None, limit: int | None = None) -> dict:
    """Consensus vs. single networks on the HU VOIs of held-out patients (3D click path).

    Same protocol as ``training.evaluate_click.evaluate_vois`` (click at the labelled centre of
    every ``lidc_vois`` nodule of the split, VOIs whose centre lies outside them skipped), but
    all ``network_ids`` run together through ``analyze_points``: per nodule the 3D Dice of
    each network's own mask, of the consensus mask (``NoduleMTLLib.core.consensus``: at least half
    of the networks; 2 networks: union), of the strict majority (2 networks: intersection)
    and of the union against the readers' consensus; malignancy AUC of each
    network's probability and of the consensus (mean) probability; and how often the
    disagreement flag is "high".  A mask a network did not produce counts as empty (Dice 0).

    Returns: {"networks", "split", "n_nodules", "dice3d": {name: {"mean", "median"}},
    "dices": {name: [per nodule]}, "classification": {name: stats}, "disagreement_high",
    "high_vs_low_dice": mean consensus Dice of "high" vs "low" nodules}.
    """
    import csv as _csv

    import SimpleITK as sitk

    from NoduleMTLLib.core.io import CTVolume
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.inference.pipeline import analyze_points
    from NoduleMTLLib.models.registry import load_network
    from training.data import default_data_dir, load_split, malignancy_label

    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    patients = set(load_split()[split])
    rows = [r for r in _csv.DictReader(open(d / "labels.csv")) if r["patient_id"] in patients][:limit]
    nets = {n: load_network(n, "cpu") for n in network_ids}
    from NoduleMTLLib.core.consensus import majority_mask
    names = list(network_ids) + ["consensus", "strict_majority", "union"]
    dices = {k: [] for k in names}
    probs = {k: [] for k in list(network_ids) + ["consensus"]}
    labels, flags = [], []
    for r in rows:
        ct = CTVolume(sitk.ReadImage(str(d / r["image"])), source=r["image"])
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"]))) > 0
        c = (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))
        if not ct.contains_lps(c):
            continue
        nd = analyze_points(ct, [c], network_ids=network_ids, device="cpu", networks=nets).nodules[0]
        full = {k: (b.to_full() if b is not None else np.zeros_like(ref)) for k, b in nd.network_masks.items()}
        for k in network_ids:
            dices[k].append(dice(full[k], ref))
        cm = nd.consensus.mask.to_full() if nd.consensus.mask is not None else np.zeros_like(ref)
        dices["consensus"].append(dice(cm, ref))
        dices["union"].append(dice(np.logical_or.reduce([full[k] for k in network_ids]), ref))
        found = [b for b in nd.network_masks.values() if b is not None]
        sm = majority_mask(found, include_ties=False) if found else None
        dices["strict_majority"].append(dice(sm.to_full() if sm is not None else np.zeros_like(ref), ref))
        flags.append(nd.consensus.disagreement)
        lab = malignancy_label(float(r["Malignancy_value"]))
        ps = {k: nd.networks[k].malignancy_probability for k in network_ids}
        ps["consensus"] = nd.consensus.malignancy_probability
        if lab >= 0 and all(v is not None for v in ps.values()):
            labels.append(lab)
            for k, v in ps.items():
                probs[k].append(float(v))
    hi = [dices["consensus"][i] for i, f in enumerate(flags) if f == "high"]
    lo = [dices["consensus"][i] for i, f in enumerate(flags) if f == "low"]
    return _clean({
        "networks": list(network_ids), "split": split, "n_nodules": len(flags),
        "dice3d": {k: {"mean": float(np.mean(v)), "median": float(np.median(v))} for k, v in dices.items()},
        "classification": {k: binary_classification_stats(labels, v) for k, v in probs.items()},
        "disagreement_high": int(sum(f == "high" for f in flags)),
        "high_vs_low_dice": {"high": float(np.mean(hi)) if hi else None, "low": float(np.mean(lo)) if lo else None},
        "dices": {k: [round(x, 4) for x in v] for k, v in dices.items()},
        "labels": labels, "probs": {k: [round(x, 4) for x in v] for k, v in probs.items()},
    })


def main(argv=None) -> int:
    """``python -m training.report consensus lnmsnet,detguided --split val``: write
    ``runs/consensus_<ids>/eval_vois_<split>.json`` (:func:`evaluate_consensus_vois`) and print a summary."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consensus", help="consensus vs. single networks on the HU VOIs")
    c.add_argument("networks", help="comma-separated network ids (at least 2)")
    c.add_argument("--split", choices=["val", "test"], default="val")
    c.add_argument("--data", type=Path, default=None)
    c.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    ids = tuple(n.strip() for n in a.networks.split(",") if n.strip())
    if len(ids) < 2:
        ap.error("consensus needs at least 2 networks")
    import torch
    torch.set_num_threads(2)
    ev = evaluate_consensus_vois(ids, a.split, a.data, a.limit)
    out = REPO / "runs" / f"consensus_{'_'.join(ids)}" / f"eval_vois_{a.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ev, indent=1) + "\n")
    # a committed copy (runs/ is not committed): training.results_table reads it in a fresh checkout
    kept = REPO / "training" / "reports" / "consensus" / f"{'_'.join(ids)}_vois_{a.split}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(ev, indent=1) + "\n")
    for k, v in ev["dice3d"].items():
        auc = ev["classification"].get(k, {}).get("auc")
        print(f"{k:>12}: Dice3D mean {v['mean']:.3f} median {v['median']:.3f}" + (f"  AUC {auc:.3f}" if auc is not None else ""))
    print(f"n={ev['n_nodules']}, disagreement high on {ev['disagreement_high']}; consensus Dice high {ev['high_vs_low_dice']['high']} "
          f"vs low {ev['high_vs_low_dice']['low']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
