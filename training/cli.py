"""Headless training / evaluation command line: ``nodulemtl-train {train,evaluate,export} NETWORK``.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nodulemtl-train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a network (resumes from OUT/last.pt)")
    t.add_argument("network", choices=["lnmsnet"])
    t.add_argument("--config", type=Path, default=None, help="JSON config (default training/configs/NETWORK.json)")
    t.add_argument("--out", type=Path, default=None, help="run folder (default runs/NETWORK)")
    t.add_argument("--data", type=Path, default=None, help="data folder (default ../shared/data or $NODULEMTL_DATA)")
    t.add_argument("--limit-nodules", type=int, default=None, help="use only the first N training nodules (smoke runs)")
    t.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    e = sub.add_parser("evaluate", help="evaluate weights on a split; writes a JSON report")
    e.add_argument("network", choices=["lnmsnet"])
    e.add_argument("--weights", type=Path, default=None, help="checkpoint (.pt) or shipped .safetensors (default: shipped)")
    e.add_argument("--split", choices=["val", "test"], default="val")
    e.add_argument("--data", type=Path, default=None)
    e.add_argument("--out", type=Path, default=None, help="report JSON path")
    x = sub.add_parser("export", help="export a checkpoint to fp16 safetensors for shipping")
    x.add_argument("network", choices=["lnmsnet"])
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    if a.cmd == "train":
        from training import lnmsnet
        cfg = json.loads((a.config or REPO / "training" / "configs" / f"{a.network}.json").read_text())
        if a.epochs:
            cfg["epochs"] = a.epochs
        out = a.out or REPO / "runs" / a.network
        t0 = time.time()
        best = lnmsnet.train(cfg, out, a.data, a.limit_nodules, log=lambda s: print(s, flush=True))
        print(f"done in {time.time() - t0:.0f} s; best checkpoint {best}")
        return 0
    if a.cmd == "export":
        from NoduleMTLLib.registry import export_weights
        out = a.out or REPO / "Resources" / "Weights" / f"{a.network}.safetensors"
        export_weights(a.network, a.checkpoint, out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    if a.cmd == "evaluate":
        import torch
        from NoduleMTLLib.registry import build_network, load_weights_into
        from training import lnmsnet
        from training.data import load_slice_nodules, load_split
        torch.set_num_threads(2)
        cfg = json.loads((REPO / "training" / "configs" / f"{a.network}.json").read_text())
        model = build_network(a.network)
        load_weights_into(model, a.weights)
        nodules = load_slice_nodules(a.data, set(load_split()[a.split]))
        ev = lnmsnet.evaluate_nodules(model, nodules, cfg)
        ev["split"] = a.split
        ev["weights"] = str(a.weights or "shipped")
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
