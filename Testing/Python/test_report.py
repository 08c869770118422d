"""Evaluation report (``training.report``, ``nodulemtl-train report``) on small hand-made
evaluation dicts, and the MT-Net segmentation metrics of ``click2d.evaluate_nodules`` on real
LIDC-IDRI slices."""

import json

import numpy as np
import pytest

from NoduleMTLLib.core.metrics import roc_auc
from training import cli as train_cli
from training.report import ReportError, roc_curve, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_roc_curve_hand_computed():
    # scores 0.9 (1), 0.8 (0), 0.7 (1), 0.6 (0): thresholds 0.9, 0.8, 0.7, 0.6
    fpr, tpr = roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1.0] and tpr.tolist() == [0, 0.5, 0.5, 1.0, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75) == roc_auc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6])


def test_roc_curve_ties_match_mann_whitney():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) + 0.3 * y, 1)  # many ties
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s), abs=1e-12)
    with pytest.raises(ValueError):
        roc_curve([1, 1], [0.2, 0.3])


EV_2D = {  # what evaluate_nodules writes, small and hand-made
    "n_nodules": 4, "dice_mean": 0.625, "dice_median": 0.65, "dices": [0.9, 0.8, 0.5, 0.3],
    "jaccards": [0.8, 0.7, 0.35, 0.2],
    "pixel": {"tp": 75, "fp": 45, "tn": 855, "fn": 25},
    "probs": [0.9, 0.8, 0.3, 0.6], "labels": [1, 0, 1, 0],
    "classification": {"auc": 0.99},  # stale value: the report recomputes from probs/labels
    "signs": {"spiculation": {"auc": 1.0, "n": 4, "labels": [1, 1, 0, 0], "probs": [0.9, 0.7, 0.2, 0.1]},
              "lobulation": {"auc": 0.25, "n": 4, "labels": [0, 1, 1, 0], "probs": [0.9, 0.2, 0.7, 0.6]}},
    "split": "val", "weights": "/x/net.safetensors", "sha256": "ab",
}


def test_summarize_hand_computed():
    s = summarize(EV_2D)
    assert s["dice_mean"] == pytest.approx(0.625) and s["dice_median"] == pytest.approx(0.65)
    assert s["jaccard_mean"] == pytest.approx(0.5125) and "jaccard_from_dice" not in s
    px = s["pixel"]
    assert px["accuracy"] == pytest.approx(0.93) and px["recall"] == pytest.approx(0.75) and px["specificity"] == pytest.approx(0.95)
    c = s["classification"]  # threshold 0.5: TP 1 (0.9), FN 1 (0.3), FP 2 (0.8, 0.6), TN 0
    assert c["auc"] == pytest.approx(0.5) and c["accuracy"] == pytest.approx(0.25)
    assert c["sensitivity"] == pytest.approx(0.5) and c["specificity"] == pytest.approx(0.0)
    assert s["signs"]["spiculation"] == {"auc": 1.0, "n": 4, "n_positive": 2}
    assert s["signs"]["lobulation"]["auc"] == pytest.approx(0.25)
    # older JSONs without jaccards: J = D / (2 - D) per nodule
    old = {k: v for k, v in EV_2D.items() if k not in ("jaccards", "pixel")}
    s2 = summarize(old)
    assert s2["jaccard_from_dice"] and s2["jaccard_mean"] == pytest.approx(np.mean([0.9 / 1.1, 0.8 / 1.2, 0.5 / 1.5, 0.3 / 1.7]))
    assert "pixel" not in s2


def _runs(tmp_path):
    d = tmp_path / "runs" / "dsmtnet"
    d.mkdir(parents=True)
    (d / "eval_val.json").write_text(json.dumps(EV_2D))
    test = {k: v for k, v in EV_2D.items() if k not in ("jaccards", "pixel", "signs")}  # an older JSON
    test.update(split="test", n_nodules=2, dices=[0.7, 0.75], probs=[0.2, 0.7], labels=[0, 1])
    (d / "eval_test.json").write_text(json.dumps(test))
    vois = {"network": "dsmtnet", "split": "val", "n_nodules": 3, "found": 3, "dice3d_mean": 0.6, "dice3d_median": 0.62,
            "classification": {"n": 2, "n_positive": 1, "accuracy": 0.5, "sensitivity": 1.0, "specificity": 0.0, "auc": float("nan")}}
    (d / "eval_vois_val.json").write_text(json.dumps(vois))
    return tmp_path / "runs"


@pytest.mark.slow
def test_write_report_files(tmp_path):
    out = tmp_path / "rep"
    s = write_report("dsmtnet", _runs(tmp_path), out)
    assert set(s["evaluations"]) == {"2D val", "2D test", "3D click val (HU)"}
    assert s["figures"] == ["roc.png", "roc_signs_val.png", "dice_hist.png"]
    for f in s["figures"]:
        b = (out / f).read_bytes()
        assert b[:8] == PNG_MAGIC and 5_000 < len(b) < 300_000
    js = json.loads((out / "summary.json").read_text())  # strict JSON: NaN written as null
    assert js["evaluations"]["3D click val (HU)"]["classification"]["auc"] is None
    assert js["evaluations"]["2D test"]["classification"]["auc"] == pytest.approx(1.0)
    assert js["evaluations"]["2D test"]["jaccard_from_dice"] and "pixel" not in js["evaluations"]["2D test"]
    assert js["evaluations"]["2D val"]["signs"]["spiculation"]["auc"] == 1.0
    md = (out / "summary.md").read_text()
    assert "| 2D val | 4 | 0.625 | 0.650 | 0.513 | 0.930 | 0.750 | 0.950 | 4 (2) | 0.250 | 0.500 | 0.500 | 0.000 |" in md
    assert "spiculation" in md and "[`roc.png`](roc.png)" in md


def test_report_cli(tmp_path, capsys):
    runs = _runs(tmp_path)
    assert train_cli.main(["report", "dsmtnet", "--runs", str(runs), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "roc.png").is_file() and "dsmtnet" in capsys.readouterr().out
    assert train_cli.main(["report", "mtnet", "--runs", str(runs), "--out", str(tmp_path / "o2")]) == 1
    assert "no evaluation JSON" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    with pytest.raises(ReportError):
        write_report("mtnet", runs, tmp_path / "o3")


@pytest.mark.slow
def test_evaluate_nodules_mtnet_metrics(shared_data):
    """Per-nodule Jaccard = D / (2 - D) and pixel sums = all pixels, on real held-out LIDC slices."""
    import torch

    from NoduleMTLLib.models.registry import load_network
    from training.click2d import evaluate_nodules
    from training.data import load_slice_nodules, load_split

    torch.set_num_threads(1)
    pats = sorted(load_split()["test"])[:3]
    nds = load_slice_nodules(shared_data, set(pats))[:4]
    assert nds, "no test nodules loaded"
    cfg = {"input_size_px": 96, "input_spacing_mm": 0.8}
    ev = evaluate_nodules(load_network("lnmsnet", "cpu"), nds, cfg)
    d, j = np.array(ev["dices"]), np.array(ev["jaccards"])
    assert len(j) == len(nds) and np.allclose(j, d / (2 - d), atol=2e-4)
    px = ev["pixel"]
    assert px["tp"] + px["fp"] + px["tn"] + px["fn"] == sum(len(n.image) for n in nds) * 96 * 96
    assert px["accuracy"] == pytest.approx((px["tp"] + px["tn"]) / sum(px[k] for k in ("tp", "fp", "tn", "fn")))
    assert 0 < px["recall"] <= 1 and 0.9 < px["specificity"] <= 1
    # pooled pixel Dice from the sums lies within the range of the per-nodule Dice
    pooled = 2 * px["tp"] / (2 * px["tp"] + px["fp"] + px["fn"])
    assert d.min() - 1e-9 <= pooled <= d.max() + 1e-9


def test_results_table_sources_and_write(tmp_path):
    """runs/ JSONs first, models.json as fallback, "pending" otherwise; stale weights flagged; block rewritten."""
    from training import results_table as rt

    repo = tmp_path
    (repo / "runs" / "lnmsnet").mkdir(parents=True)
    (repo / "runs" / "lnmsnet" / "eval_test.json").write_text(json.dumps(dict(EV_2D, split="test", sha256="old")))
    (repo / "Resources" / "Weights").mkdir(parents=True)
    man = {"networks": {
        "lnmsnet": {"sha256": "new"},
        "detguided": {"sha256": "d", "metrics": {"test": {"n_nodules": 9, "dice_mean": 0.7, "dice_median": 0.71, "auc": 0.8,
                                                          "accuracy": 0.6, "sensitivity": 0.5, "specificity": 0.4, "n_classified": 5}}}}}
    (repo / "Resources" / "Weights" / "models.json").write_text(json.dumps(man))
    r = rt.collect("lnmsnet", "test", repo)
    assert r["source"] == "runs/lnmsnet/" and r["stale"] and r["2d"]["pixel"]["recall"] == pytest.approx(0.75)
    d = rt.collect("detguided", "test", repo)
    assert d["source"] == "models.json" and d["2d"]["classification"]["auc"] == 0.8
    assert rt.collect("mtnet", "test", repo)["source"] == "pending"
    t = rt.tables(repo)
    row = next(ln for ln in t.splitlines() if ln.startswith("| `lnmsnet` | 4 |"))
    assert "| 0.625 | 0.650 | 0.513 | 0.930 | 0.750 | 0.950 | 4 (2) | 0.250 | 0.500 | 0.500 | 0.000 |" in row and "stale" in row
    assert "| `detguided` | 9 | 0.700 | 0.710 |" in t and "| `mtnet` | pending |" in t
    md = repo / "RESULTS.md"
    md.write_text(f"head\n{rt.BEGIN}\nOLDBLOCK\n{rt.END}\ntail\n")
    rt.write(md, repo)
    text = md.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "OLDBLOCK" not in text and "| `detguided` | 9 |" in text
    md.write_text("no markers")
    with pytest.raises(ValueError):
        rt.write(md, repo)
