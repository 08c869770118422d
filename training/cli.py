"""Headless training / evaluation command line: ``nodulemtl-train {train,evaluate,export,report} NETWORK``.

Uses the same ``NoduleMTLLib`` code (networks, preprocessing, metrics) as the Slicer
module and the ``nodulemtl`` command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _storage(weights: Path) -> str:
    """How a shipped file stores its weights: its ``storage`` metadata ("float16", "int8 per
    output channel"), else the dtype of its floating tensors ("float16" or "float32")."""
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as h:
        meta = h.metadata() or {}
        if "storage" in meta:
            return meta["storage"]
        dtypes = {h.get_slice(k).get_dtype() for k in h.keys()}
    return "float32" if "F32" in dtypes else "float16"


def base_entry(network_id: str, weights: Path, training_data: str) -> dict:
    """The manifest fields every shipped file has: title, paper, file, size, sha256, version,
    storage dtype, input spec, training data, model card, and empty metrics."""
    from NoduleMTLLib import __version__
    from NoduleMTLLib.models.registry import get_spec, sha256_of
    spec = get_spec(network_id)
    return {"title": spec.title, "paper": spec.paper, "file": weights.name, "size_bytes": weights.stat().st_size,
            "sha256": sha256_of(weights), "version": __version__, "dtype": _storage(weights),
            "input_spec": spec.declared_input_spec, "training_data": training_data, "model_card": f"{network_id}.md",
            "metrics": {}}


def lung_pet_summary(report: dict) -> dict:
    """Per Lung-PET-CT-Dx scan and threshold of a whole-scan report: tumour found, other detections."""
    return {r["scan"]: {k: {"tumour_found": v["tumour_found"], "n_other_detections": v["n_other_detections"]}
                        for k, v in r["thresholds"].items()} for r in report["lung_pet_ct_dx"]}


def write_manifest(mpath: Path, man: dict) -> None:
    """Write ``models.json`` whole or not at all (schema-checked, no NaN: ``registry.write_manifest``)."""
    from NoduleMTLLib.models.registry import write_manifest as _write

    _write(mpath, man)


def update_manifest(network_id: str, weights: Path) -> None:
    """Record a shipped weights file in ``Resources/Weights/models.json`` (size, sha256, input spec, metrics).

    Metrics are copied from ``runs/NETWORK/eval_*.json`` when present and measured on this
    exact file (sha256); metrics the manifest already holds for the same file are kept
    where no new evaluation replaces them.
    """
    mpath = weights.parent / "models.json"
    man = json.loads(mpath.read_text()) if mpath.exists() else {"format": 1, "networks": {}}
    entry = base_entry(network_id, weights,
                       "LIDC-IDRI (TCIA, CC BY 3.0) via ../shared/data (lidc_slices; the HU fine-tunes also "
                       "lidc_vois and whole training scans from bradfordb/pylidc: see the model card); "
                       "patient split training/splits/lidc_patient_split.json")
    old = man.get("networks", {}).get(network_id) or {}
    if old.get("sha256") == entry["sha256"]:  # same file: keep what was measured before (runs/ is not kept)
        entry["metrics"] = dict(old.get("metrics") or {})
    for split in ("val", "test"):
        ev = REPO / "runs" / network_id / f"eval_{split}.json"
        if ev.exists():
            e = json.loads(ev.read_text())
            if e.get("sha256") == entry["sha256"] and "fixed" in e:  # detector (training.detection.evaluate_split)
                entry["metrics"][split] = {"level": "slice crops", "tile_layout": e.get("tile_layout", "centred"),
                                           "n_nodules": e["n_nodules"], "n_images": e["n_images"],
                                           **{k: {m: e[k][m] for m in ("threshold", "precision", "recall", "f1", "dice_mean")}
                                              for k in ("fixed", "adaptive")}}
            elif e.get("sha256") == entry["sha256"]:
                c = e["classification"]
                entry["metrics"][split] = {"n_nodules": e["n_nodules"], "dice_mean": round(e["dice_mean"], 4),
                                           "dice_median": round(e["dice_median"], 4), "auc": round(c["auc"], 4),
                                           "accuracy": round(c["accuracy"], 4), "sensitivity": round(c["sensitivity"], 4),
                                           "specificity": round(c["specificity"], 4), "n_classified": c["n"]}
                if e.get("signs"):
                    entry["metrics"][split]["signs_auc"] = {
                        h: {"auc": None if v["auc"] != v["auc"] else round(v["auc"], 4),  # NaN (no positive) -> null
                            "n": v["n"], "n_positive": v["n_positive"]} for h, v in e["signs"].items()}
    for split in ("val", "test"):
        ev = REPO / "runs" / network_id / f"eval_vois_{split}.json"
        if ev.exists():
            e = json.loads(ev.read_text())
            if e.get("sha256") != entry["sha256"]:
                continue  # measured on other weights
            c = e["classification"]
            entry["metrics"][f"{split}_click3d_hu"] = {
                "n_nodules": e["n_nodules"], "segmented": e["found"], "dice3d_mean": round(e["dice3d_mean"], 4),
                "dice3d_median": round(e["dice3d_median"], 4), "auc": round(c["auc"], 4), "n_classified": c["n"]}
    wc = REPO / "runs" / network_id / "eval_whole_ct.json"  # maskrcnn25d (training.evaluate_detection)
    if wc.exists():
        e = json.loads(wc.read_text())
        if e.get("sha256") == entry["sha256"]:
            entry["metrics"]["whole_ct"] = {
                "lidc_test_scans": [r.get("patient", r.get("scan")) for r in e["lidc"]],
                "lidc_nodule_level": e["lidc_total"],
                "froc": {k: e["froc"][k] for k in ("fp_rates", "sensitivities", "cpm") if k in e["froc"]},
                "lung_pet_ct_dx": lung_pet_summary(e),
            }
    man.setdefault("networks", {})[network_id] = entry
    write_manifest(mpath, man)


def main(argv=None) -> int:
    from NoduleMTLLib.models import registry

    ids = registry.all_ids()  # every registered network (click networks, then detectors)
    detectors = tuple(registry.DETECTORS)
    ap = argparse.ArgumentParser(prog="nodulemtl-train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a network (resumes from OUT/last.pt)")
    t.add_argument("network", choices=ids)
    t.add_argument("--config", type=Path, default=None, help="JSON config (default training/configs/NETWORK.json)")
    t.add_argument("--out", type=Path, default=None, help="run folder (default runs/NETWORK)")
    t.add_argument("--data", type=Path, default=None, help="data folder (default ../shared/data or $NODULEMTL_DATA)")
    t.add_argument("--limit-nodules", type=int, default=None, help="use only the first N training nodules (smoke runs)")
    t.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    t.add_argument("--iterations", type=int, default=None, help="detectors: override the config's iterations")
    t.add_argument("--max-minutes", type=float, default=None, help="detectors: override the config's time box")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="detectors: training device (default auto: CUDA with mixed precision when a GPU is present)")
    e = sub.add_parser("evaluate", help="evaluate weights on a split; writes a JSON report "
                                        "('lung-rads': Lung-RADS agreement of the default click path, training/lung_rads_eval.py; "
                                        "'reader-agreement': one LIDC reader against the others, training/reader_agreement.py)")
    e.add_argument("network", choices=[*ids, "lung-rads", "reader-agreement"])
    e.add_argument("--weights", type=Path, default=None, help="checkpoint (.pt) or shipped .safetensors (default: shipped)")
    e.add_argument("--split", choices=["val", "test"], default="val")
    e.add_argument("--data", type=Path, default=None)
    e.add_argument("--out", type=Path, default=None, help="report JSON path")
    e.add_argument("--vois", action="store_true", help="3D click-path evaluation on the HU VOIs (lidc_vois) instead")
    e.add_argument("--whole-ct", action="store_true",
                   help="detectors: whole-scan evaluation on ../shared/data/whole_ct (LIDC test patients 0003/0005: "
                        "P/R/F1, FROC/CPM; Lung-PET-CT-Dx A0001/A0002 tumour boxes), see training/evaluate_detection.py")
    e.add_argument("--limit-nodules", type=int, default=None, help="detectors: first N nodules of the split only")
    e.add_argument("--detections-cache", type=Path, default=None,
                   help="with --whole-ct: folder that keeps each scan's slice detections (per weights), so the network "
                        "runs once per scan (training/evaluate_detection.py slice_detections)")
    e.add_argument("--layout", choices=["centred", "jitter"], default=None,
                   help="detector crop evaluation: tile layout of the mosaics (default: the config's tile_layout; "
                        "centred = whole 128 px fields, the nodule in the middle of each; jitter = moved windows)")
    x = sub.add_parser("export", help="export a checkpoint (or convert a .safetensors file) to fp16 safetensors for shipping")
    x.add_argument("network", choices=ids)
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--out", type=Path, default=None)
    x.add_argument("--int8", action="store_true",
                   help="weight-only int8 storage of the large tensors (NoduleMTLLib.models.registry.quantize_int8)")
    m = sub.add_parser("manifest", help="refresh the shipped file's manifest entry (size, sha256, metrics from runs/NETWORK/eval_*.json)")
    m.add_argument("network", choices=ids)
    r = sub.add_parser("report", help="ROC / Dice-histogram PNGs and metric summaries from runs/NETWORK/eval_*.json")
    r.add_argument("network", choices=list(registry.NETWORKS))
    r.add_argument("--runs", type=Path, default=None, help="runs folder holding NETWORK/eval_*.json (default runs)")
    r.add_argument("--out", type=Path, default=None, help="output folder (default training/reports/NETWORK)")
    w = sub.add_parser("wholescan", help="build the whole-scan training set (HU volumes, consensus masks, excluded marks) "
                                         "from LIDC DICOM + reader annotations into a cache outside the repository")
    w.add_argument("--dicom-root", type=Path, required=True, help="folder laid out like the repository bradfordb/pylidc")
    w.add_argument("--out", type=Path, default=None, help="cache folder (default ~/.cache/nodulemtl/wholescan)")
    w.add_argument("--patients", nargs="*", default=None, help="default: train, val and test of lidc_wholescan_split.json")
    f = sub.add_parser("fpr", help="false-positive reduction fpr25d: train | cv (leave-one-training-scan-out) | select "
                                   "(operating points on the validation + out-of-fold scans) | export | manifest "
                                   "(see training/fp_reduction.py)")
    f.add_argument("command", choices=["train", "cv", "select", "export", "manifest"])
    f.add_argument("--report", type=Path, default=None, help="manifest: the two-stage whole-scan evaluation JSON")
    f.add_argument("--resume", action="store_true")
    f.add_argument("--weights", type=Path, default=None)
    f.add_argument("--config", type=Path, default=None, help="recipe (default training/configs/fpr25d.json)")
    f.add_argument("--out", type=Path, default=None, help="run folder (default runs/fpr25d)")
    a = ap.parse_args(argv)

    if a.cmd == "wholescan":
        from training import wholescan
        return wholescan.main(["--dicom-root", str(a.dicom_root)] + (["--out", str(a.out)] if a.out else [])
                              + (["--patients", *a.patients] if a.patients else []))
    if a.cmd == "fpr":
        from training import fp_reduction
        return fp_reduction.main([a.command] + (["--resume"] if a.resume else [])
                                 + (["--weights", str(a.weights)] if a.weights else [])
                                 + (["--config", str(a.config)] if a.config else [])
                                 + (["--out", str(a.out)] if a.out else [])
                                 + (["--report", str(a.report)] if a.report else []))

    if a.cmd == "report":
        from training.report import ReportError, write_report
        try:
            s = write_report(a.network, a.runs, a.out)
        except ReportError as err:
            print(f"nodulemtl-train: error: {err}", file=sys.stderr)
            return 1
        out = a.out or REPO / "training" / "reports" / a.network
        print(f"{a.network}: {', '.join(s['evaluations'])} -> {out} ({', '.join(s['figures'] + ['summary.json', 'summary.md'])})")
        return 0

    if a.cmd == "train":
        if a.network in detectors:  # before torch loads libgomp: no busy-waiting threads on a shared CPU
            import os
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from training import click2d
        cfg = json.loads((a.config or REPO / "training" / "configs" / f"{a.network}.json").read_text())
        if a.network in detectors:
            from training import detection
            for key, val in (("iterations", a.iterations), ("max_minutes", a.max_minutes)):
                if val is not None:
                    cfg[key] = val
            best = detection.train(cfg, a.out or REPO / "runs" / a.network, a.data, a.limit_nodules,
                                   log=lambda s: print(s, flush=True), device=a.device)
            print(f"best checkpoint {best}" + ("" if best.exists() else " (not written: stopped before the mask phase; resume)"))
            return 0
        if a.epochs:
            cfg["epochs"] = a.epochs
        out = a.out or REPO / "runs" / a.network
        t0 = time.time()
        best = click2d.train(cfg, out, a.data, a.limit_nodules, log=lambda s: print(s, flush=True))
        print(f"done in {time.time() - t0:.0f} s; best checkpoint {best}")
        return 0
    if a.cmd == "export":
        from NoduleMTLLib.models.registry import export_weights
        out = a.out or REPO / "Resources" / "Weights" / f"{a.network}.safetensors"
        export_weights(a.network, a.checkpoint, out, int8=a.int8)
        update_manifest(a.network, out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and its manifest entry")
        return 0
    if a.cmd == "manifest":
        w = REPO / "Resources" / "Weights" / f"{a.network}.safetensors"
        if not w.exists():
            print(f"nodulemtl-train: error: {w} does not exist (export a checkpoint first)", file=sys.stderr)
            return 1
        update_manifest(a.network, w)
        metrics = json.loads((w.parent / "models.json").read_text())["networks"][a.network]["metrics"]
        print(f"{a.network}: manifest entry refreshed; metrics for {', '.join(metrics) or 'no split (no matching runs/ evaluation)'}")
        return 0
    if a.cmd == "evaluate":
        import torch

        from NoduleMTLLib.models.registry import build_network, load_weights_into
        from training import click2d
        from training.data import load_slice_nodules, load_split
        torch.set_num_threads(2)
        if a.network == "lung-rads":
            from training import lung_rads_eval
            lung_rads_eval.run(a.split, a.data, a.out)
            return 0
        if a.network == "reader-agreement":  # every eligible nodule, all patient groups; --split is not used
            from training import reader_agreement
            reader_agreement.run(a.data, a.out, a.limit_nodules)
            return 0
        if a.whole_ct:
            if a.network not in detectors:
                ap.error(f"--whole-ct is for the whole-scan detectors ({', '.join(detectors)})")
            from training import evaluate_detection
            evaluate_detection.run(a.weights, data=a.data, out=a.out, detections_cache=a.detections_cache)
            return 0
        if a.network in detectors:
            from NoduleMTLLib.models.registry import sha256_of
            from training import detection
            cfg = json.loads((REPO / "training" / "configs" / f"{a.network}.json").read_text())
            default_layout = cfg.get("tile_layout", "centred")
            if a.layout:
                cfg["tile_layout"] = a.layout
            model = build_network(a.network)
            wpath = load_weights_into(model, a.weights, a.network)
            ev = detection.evaluate_split(model, a.split, cfg, a.data, a.limit_nodules)
            ev.update(weights=str(wpath), sha256=sha256_of(wpath), tile_layout=cfg.get("tile_layout", "centred"))
            suffix = "" if ev["tile_layout"] == default_layout else f"_{ev['tile_layout']}"
            out = a.out or REPO / "runs" / a.network / f"eval_{a.split}{suffix}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(ev, indent=1))
            def fmt(m):  # metrics may be null (undefined ratios)
                return " ".join(f"{k} {'n/a' if m[key] is None else f'{m[key]:.3f}'}" for k, key in
                                (("threshold", "threshold"), ("P", "precision"), ("R", "recall"), ("F1", "f1"), ("Dice", "dice_mean")))
            print(f"{a.network} {a.split} ({ev['tile_layout']} crops: {ev['n_nodules']} nodules, {ev['n_images']} images): "
                  f"fixed {fmt(ev['fixed'])}; adaptive {fmt(ev['adaptive'])} -> {out}")
            return 0
        if a.vois:
            from training.evaluate_click import evaluate_vois
            ev = evaluate_vois(a.network, a.split, a.data)
            from NoduleMTLLib.models.registry import find_weights, sha256_of
            ev["sha256"] = sha256_of(find_weights(a.network))  # the click path runs the installed (shipped) file
            out = a.out or REPO / "runs" / a.network / f"eval_vois_{a.split}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(ev, indent=1))
            return 0
        cfg = json.loads((REPO / "training" / "configs" / f"{a.network}.json").read_text())
        model = build_network(a.network)
        load_weights_into(model, a.weights, a.network)
        nodules = load_slice_nodules(a.data, set(load_split()[a.split]))
        ev = click2d.evaluate_nodules(model, nodules, cfg)
        ev["split"] = a.split
        from NoduleMTLLib.models.registry import find_weights, sha256_of
        wpath = a.weights or find_weights(a.network)
        ev["weights"] = str(wpath)
        ev["sha256"] = sha256_of(wpath)
        out = a.out or REPO / "runs" / a.network / f"eval_{a.split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(ev, indent=1))
        c = ev["classification"]
        print(f"{a.network} {a.split}: nodules {ev['n_nodules']}  Dice mean {ev['dice_mean']:.3f} median {ev['dice_median']:.3f}  "
              f"malignancy (n={c['n']}, {c['n_positive']} malignant) AUC {c['auc']:.3f} ACC {c['accuracy']:.3f} "
              f"SEN {c['sensitivity']:.3f} SPE {c['specificity']:.3f}  -> {out}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
