"""Regenerate the measured columns of ``training/RESULTS.md`` from the evaluation JSONs.

    uv run --frozen python -m training.results_table            # print the tables
    uv run --frozen python -m training.results_table --write    # replace the block in RESULTS.md

Sources, per registered network (``NoduleMTLLib.models.registry.all_ids()``):
``runs/NETWORK/eval_{val,test}.json`` (2D evaluation on the network grid, written by
``nodulemtl-train evaluate NETWORK --split S``) and ``runs/NETWORK/eval_vois_{val,test}.json``
(3D click path on HU VOIs, ``... --vois``); when a run folder is absent (fresh checkout:
``runs/`` is not committed), the committed ``training/reports/NETWORK/summary.json``
(``nodulemtl-train report NETWORK``), then the metrics recorded in
``Resources/Weights/models.json``.  Consensus rows: ``runs/consensus_*/`` or their committed
copies in ``training/reports/consensus/``.  A network with neither is "pending".  An evaluation whose weights sha256
differs from the shipped file's (manifest) is marked "stale".  The figures are the same
code's as ``training.report`` (``summarize``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from NoduleMTLLib.models import registry
from training.report import summarize

REPO = Path(__file__).resolve().parents[1]
#: Every registered network, in registry order (click networks, then detectors).
NETWORKS = tuple(registry.all_ids())
BEGIN, END = "<!-- measured:begin (training/results_table.py --write) -->", "<!-- measured:end -->"


def paper_reported(network_id: str) -> tuple[str, str]:
    """The paper's data and reported figures, quoted from the seed texts (/work/shared/seeds, see
    RESULTS.md): ``paper_reported`` of ``training/configs/NETWORK.json``; ("-", "-") when absent."""
    p = REPO / "training" / "configs" / f"{network_id}.json"
    quoted = json.loads(p.read_text()).get("paper_reported", {}) if p.exists() else {}
    return quoted.get("data", "-"), quoted.get("figures", "-")


def _measured_cell(net: str, repo: Path) -> str:
    r = collect(net, "test", repo)
    prefix = ""
    if r["2d"] is None and r["3d"] is None and r["det"] is None:
        r = collect(net, "val", repo)  # not yet evaluated on test: show val, say so
        prefix = "**val only (test pending)**: "
    s2, s3 = r["2d"], r["3d"]
    if r["det"] is not None:
        d = r["det"]
        parts = [f"{k} threshold {_f(d[k].get('threshold'), 2)}: precision {_f(d[k].get('precision'))}, recall "
                 f"{_f(d[k].get('recall'))}, F1 {_f(d[k].get('f1'))}, Dice {_f(d[k].get('dice_mean'))}"
                 for k in ("adaptive", "fixed") if isinstance(d.get(k), dict)]
        whole = _whole_ct(repo)
        head = ""
        if whole:
            tot = whole["lidc_nodule_level"]
            head = ("whole scans, nodule level (LIDC-IDRI-0003 + 0005, test patients, "
                    f"{next(iter(tot.values()))['tp'] + next(iter(tot.values()))['fn']} nodules of >= 3 readers): "
                    + "; ".join(f"threshold {k}: P {_f(v['precision'])}, R {_f(v['recall'])}, F1 {_f(v['f1'])}"
                                for k, v in tot.items())
                    + f"; FROC CPM {_f(whole['froc'].get('cpm'))}; Lung-PET-CT-Dx adenocarcinoma found (adaptive): "
                    + ", ".join(f"{scan.replace('lung_pet_ct_dx_', '').replace('.nrrd', '').replace('_dicom', ' (DICOM)')} "
                                f"{'yes' if v.get('adaptive', {}).get('tumour_found') else 'no'}"
                                for scan, v in whole["lung_pet_ct_dx"].items()) + ". ")
        crops = f"Slice crops, {d.get('tile_layout', 'centred')} tiles ({d.get('n_nodules')} nodules, {d.get('n_images')} images): "
        return (prefix + head + crops + "; ".join(parts)
                + (" (stale: evaluated weights differ from the shipped file)" if r["stale"] else ""))
    if s2 is None and s3 is None:
        return "pending"
    parts = []
    if s2 is not None:
        c, px = s2.get("classification", {}), s2.get("pixel", {})
        seg = f"Dice {_f(s2['dice_mean'])} (median {_f(s2['dice_median'])})"
        if s2.get("jaccard_mean") is not None:
            seg += f", JA {_f(s2['jaccard_mean'])}" + (" (from Dice)" if s2.get("jaccard_from_dice") else "")
        if px:
            seg += f", pixel ACC {_f(px['accuracy'])} / SEN {_f(px['recall'])} / SPE {_f(px['specificity'])}"
        parts.append(f"2D ({s2['n_nodules']} nodules): {seg}; malignancy AUC {_f(c.get('auc'))}, ACC {_f(c.get('accuracy'))}, "
                     f"SEN {_f(c.get('sensitivity'))}, SPE {_f(c.get('specificity'))} ({c.get('n', '-')} nodules)")
        if s2.get("signs"):
            parts.append("signs AUC " + ", ".join(f"{k} {_f(v.get('auc'))}" for k, v in s2["signs"].items()))
    if s3 is not None:
        c = s3.get("classification", {})
        parts.append(f"3D click on HU ({s3['n_nodules']} VOIs): Dice {_f(s3.get('dice3d_mean'))}, AUC {_f(c.get('auc'))}")
    if r["stale"]:
        parts.append("(stale: evaluated weights differ from the shipped file)")
    return prefix + "; ".join(parts)


def comparison_table(repo: Path = REPO) -> str:
    """One row per network: the paper's data and figures beside our measured held-out test figures."""
    lines = ["| network | paper: data | paper: reported | ours, held-out test patients (LIDC-IDRI; val where test is pending) |",
             "|---|---|---|---|"]
    for net in NETWORKS:
        data, fig = paper_reported(net)
        lines.append(f"| `{net}` | {data} | {fig} | {_measured_cell(net, repo)} |")
    return "\n".join(lines) + "\n"


def consensus_table(repo: Path = REPO) -> str:
    """Consensus vs. single networks on the HU VOIs (``python -m training.report consensus ...``), if run."""
    rows, seen = [], set()
    paths = sorted((repo / "runs").glob("consensus_*/eval_vois_*.json")) + sorted(
        (repo / "training" / "reports" / "consensus").glob("*_vois_*.json"))  # committed copies
    for p in paths:
        ev = json.loads(p.read_text())
        key = (tuple(ev["networks"]), ev["split"])
        if key in seen:
            continue
        seen.add(key)
        cls = ev["classification"]
        cells = "; ".join(f"{k} {_f(v['mean'])}" + (f" / AUC {_f(cls[k]['auc'])}" if k in cls else "")
                          for k, v in ev["dice3d"].items())
        hl = ev["high_vs_low_dice"]
        rows.append(f"| {', '.join(ev['networks'])} | {ev['split']} | {ev['n_nodules']} | {cells} | "
                    f"{ev['disagreement_high']} ({_f(hl['high'])} / {_f(hl['low'])}) |")
    if not rows:
        return "Consensus evaluation: pending (`python -m training.report consensus lnmsnet,detguided,dsmtnet,mtnet --split test`).\n"
    return "\n".join(["| networks | split | VOIs | Dice3D mean / malignancy AUC (each network; consensus = at least half of the networks, "
                      "mean probability; strict_majority = intersection for 2; union; AUC over nodules every network classified) "
                      "| disagreement high (consensus Dice high / low) |", "|---|---|---|---|---|"] + rows) + "\n"


def _whole_ct(repo: Path) -> dict | None:
    """Whole-scan detector figures: ``runs/maskrcnn25d/eval_whole_ct.json`` (condensed as the
    manifest keeps them) or the manifest's ``metrics.whole_ct``; None when neither exists."""
    p = repo / "runs" / registry.DEFAULT_DETECTOR / "eval_whole_ct.json"
    if p.exists():
        e = json.loads(p.read_text())
        return {"lidc_nodule_level": e["lidc_total"], "froc": e["froc"],
                "lung_pet_ct_dx": {r["scan"]: {k: {"tumour_found": v["tumour_found"]} for k, v in r["thresholds"].items()}
                                   for r in e["lung_pet_ct_dx"]}}
    return _manifest(repo).get(registry.DEFAULT_DETECTOR, {}).get("metrics", {}).get("whole_ct")


def _f(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _manifest(repo: Path) -> dict:
    p = repo / "Resources" / "Weights" / "models.json"
    return json.loads(p.read_text()).get("networks", {}) if p.exists() else {}


def collect(network: str, split: str, repo: Path = REPO) -> dict:
    """Measured figures of one network on one split: {"2d": summary | None, "3d": summary | None, "source": str, "stale": bool}."""
    man = _manifest(repo).get(network, {})
    run = repo / "runs" / network
    out = {"2d": None, "3d": None, "det": None, "source": "pending", "stale": False}
    p2, p3 = run / f"eval_{split}.json", run / f"eval_vois_{split}.json"
    if p2.exists() or p3.exists():
        out["source"] = f"runs/{network}/"
        if p2.exists():
            ev = json.loads(p2.read_text())
            if "fixed" in ev:  # the whole-scan detector (training.detection.evaluate_split): P/R/F1/Dice on slice crops
                out["det"] = {k: ev[k] for k in ("n_nodules", "n_images", "fixed", "adaptive", "tile_layout") if k in ev}
            else:
                out["2d"] = summarize(ev)
            out["stale"] = bool(man.get("sha256") and ev.get("sha256") and ev["sha256"] != man["sha256"])
        if p3.exists():
            out["3d"] = summarize(json.loads(p3.read_text()))
        return out
    rep = repo / "training" / "reports" / network / "summary.json"  # committed by `nodulemtl-train report`
    if rep.exists():
        ev = json.loads(rep.read_text()).get("evaluations", {})
        e2, e3 = ev.get(f"2D {split}"), ev.get(f"3D click {split} (HU)")
        if e2 is not None or e3 is not None:
            out.update({"2d": e2, "3d": e3, "source": f"training/reports/{network}/"})
            out["stale"] = bool(e2 and man.get("sha256") and e2.get("sha256") and e2["sha256"] != man["sha256"])
            return out
    m = man.get("metrics", {})
    if split in m or f"{split}_click3d_hu" in m:
        out["source"] = "models.json"
        if split in m and "fixed" in m[split]:  # the detector's slice-crop figures
            out["det"] = m[split]
        elif split in m:
            e = m[split]
            out["2d"] = {"n_nodules": e["n_nodules"], "dice_mean": e["dice_mean"], "dice_median": e["dice_median"],
                         "classification": {"n": e["n_classified"], "auc": e["auc"], "accuracy": e["accuracy"],
                                            "sensitivity": e["sensitivity"], "specificity": e["specificity"]}}
            if "signs" in e:
                out["2d"]["signs"] = e["signs"]
        if f"{split}_click3d_hu" in m:
            e = m[f"{split}_click3d_hu"]
            out["3d"] = {"n_nodules": e["n_nodules"], "found": e["segmented"], "dice3d_mean": e["dice3d_mean"],
                         "dice3d_median": e["dice3d_median"], "classification": {"n": e["n_classified"], "auc": e["auc"]}}
    return out


def tables(repo: Path = REPO) -> str:
    """The measured tables as Markdown (2D on the network grid; 3D click path on HU; signs)."""
    lines = ["**Paper vs. measured** (each paper on its own data: trend-level comparison only; see the "
             "differences below):", "", comparison_table(repo)]
    for split in ("test", "val"):
        lines += [f"**Measured, held-out {split} patients, 2D on the network grid** (96 x 96 px at 0.8 mm, every slice "
                  "of the nodule; malignancy at threshold 0.5):", "",
                  "| network | nodules | Dice mean | Dice median | Jaccard | pixel ACC | pixel SEN | pixel SPE "
                  "| classified (malignant) | ACC | AUC | SEN | SPE | source |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for net in NETWORKS:
            r = collect(net, split, repo)
            s = r["2d"]
            if s is None:
                what = "detector: see the first table" if r["det"] is not None else "pending"
                lines.append(f"| `{net}` | {what} |" + " |" * 12)
                continue
            c, px = s.get("classification", {}), s.get("pixel", {})
            jac = _f(s.get("jaccard_mean")) + ("\\*" if s.get("jaccard_from_dice") else "")
            src = r["source"] + (" (stale: not the shipped weights)" if r["stale"] else "")
            lines.append(f"| `{net}` | {s['n_nodules']} | {_f(s['dice_mean'])} | {_f(s['dice_median'])} | {jac} | "
                         f"{_f(px.get('accuracy'))} | {_f(px.get('recall'))} | {_f(px.get('specificity'))} | "
                         f"{c.get('n', '-')} ({c.get('n_positive', '-')}) | {_f(c.get('accuracy'))} | {_f(c.get('auc'))} | "
                         f"{_f(c.get('sensitivity'))} | {_f(c.get('specificity'))} | {src} |")
        lines.append("")
    lines += ["**Measured, 3D click path on HU VOIs** (`nodulemtl analyze` code path, click at the labelled centre; "
              "3D Dice against the readers' consensus):", "",
              "| network | split | nodules | segmented | Dice3D mean | Dice3D median | classified (malignant) | ACC | AUC | SEN | SPE |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for net in NETWORKS:
        for split in ("test", "val"):
            s = collect(net, split, repo)["3d"]
            if s is None:
                if split == "test":
                    lines.append(f"| `{net}` | - | pending |" + " |" * 8)
                continue
            c = s.get("classification", {})
            lines.append(f"| `{net}` | {split} | {s['n_nodules']} | {s.get('found', '-')} | {_f(s.get('dice3d_mean'))} | "
                         f"{_f(s.get('dice3d_median'))} | {c.get('n', '-')} ({c.get('n_positive', '-')}) | "
                         f"{_f(c.get('accuracy'))} | {_f(c.get('auc'))} | {_f(c.get('sensitivity'))} | {_f(c.get('specificity'))} |")
    lines.append("")
    sign_rows = []
    for net in NETWORKS:
        for split in ("test", "val"):
            s = collect(net, split, repo)["2d"]
            if s and s.get("signs"):
                sign_rows.append(f"| `{net}` | {split} | " + ", ".join(
                    f"{k} {_f(v.get('auc'))} (n={v.get('n')}, {v.get('n_positive', '?')} pos.)" for k, v in s["signs"].items()) + " |")
    lines += (["**Measured, radiological signs** (AUC on LIDC-derived sign labels, 2D evaluation):", "",
               "| network | split | AUC per sign |", "|---|---|---|"]
              + (sign_rows or ["| - | - | pending (no network with sign heads evaluated yet) |"]))
    lines += ["", "**Measured, consensus of the click networks** (`NoduleMTLLib.core.consensus`, 3D click path on HU VOIs):", "",
              consensus_table(repo)]
    lines += ["", "\\* Jaccard computed per nodule from its Dice (J = D / (2 - D)); pixel columns `-`: the evaluation "
              "JSON predates the pixel counts (re-run `nodulemtl-train evaluate`)."]
    return "\n".join(lines) + "\n"


def write(path: Path, repo: Path = REPO) -> None:
    """Replace the text between the BEGIN/END markers of ``path`` with :func:`tables`.

    Raises ValueError when the markers are missing.
    """
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n\n" + tables(repo) + "\n" + END + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.results_table", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the measured block of training/RESULTS.md")
    a = ap.parse_args(argv)
    if a.write:
        write(REPO / "training" / "RESULTS.md")
        print("updated training/RESULTS.md")
    else:
        print(tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
