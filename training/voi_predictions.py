"""Per-nodule predictions of every click network on the HU VOIs of held-out patients.

``python -m training.voi_predictions --split val|test [--tta] [--networks ...]`` runs the ``nodulemtl analyze``
code path (``NoduleMTLLib.inference.pipeline.analyze_points``, all four click networks in one call,
click at the labelled centre ``coordX/Y/Z`` of every ``lidc_vois`` nodule of the split,
exactly the protocol of ``nodulemtl-train evaluate NETWORK --vois``) and stores, per nodule,
what the calibration / combination / default-choice study (``training.calibration``) needs
and the aggregate evaluation files do not keep:

* ``patient_id``, ``nodule_id``, ``label`` (median malignancy rating >= 4 -> 1, <= 2 -> 0,
  otherwise -1 = excluded, ``training.data.malignancy_label``), ``malignancy_median``;
* ``ref_volume_mm3``: the readers' consensus mask volume (not a feature of any model: the
  product does not know it; kept for checks only);
* per network (``networks.<id>``): ``found``, ``probability`` (P(malignant), None when
  nothing was segmented), ``signs`` (DSMT-Net's sign heads), ``dice`` (3D Dice of its own
  mask against the readers' consensus; 0 when not found), and the measurements of its own
  mask (``volume_mm3``, ``diameter_mm``, ``short_axis_mm``, ``mean_hu``, ``solid_fraction``,
  ``type``: ``NoduleMTLLib.core.postprocess.measure_nodule``);
* ``consensus``: the same for the consensus mask (at least half of the networks), with the
  mean probability (``NoduleMTLLib.core.consensus``);
* ``seconds``: wall time of the four-network analysis (CPU, shared machine: indicative only).

VOIs whose labelled centre lies outside the VOI are skipped and listed (as in
``training.evaluate_click``).  Output: ``runs/voi_predictions/<split>[_<networks>][_tta].json`` and a
copy in ``training/reports/calibration/`` (about 100 kB, committed: the calibration study
reruns from it without the data).  LIDC-IDRI-0001 and -0009 are reserved and never read.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from NoduleMTLLib.models.registry import available_networks
from training.data import REPO, default_data_dir, load_split, malignancy_label
from training.wholescan import RESERVED as RESERVED_PATIENTS  # one list of the reserved patients

CLICK_NETWORKS = tuple(available_networks())  # the registry's click networks
OUT_DIR = REPO / "runs" / "voi_predictions"
REPORT_DIR = REPO / "training" / "reports" / "calibration"


def _measure(mask, ct, ref) -> dict:
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.core.postprocess import measure_nodule

    if mask is None or not mask.any():
        return {"found": False, "dice": 0.0 if ref.any() else 1.0, "volume_mm3": None, "diameter_mm": None,
                "short_axis_mm": None, "mean_hu": None, "solid_fraction": None, "type": None}
    m = measure_nodule(mask, ct)
    r = lambda v, nd=3: None if v is None else round(float(v), nd)  # noqa: E731
    return {"found": True, "dice": round(dice(mask, ref), 5), "volume_mm3": r(m["volume_mm3"], 2),
            "diameter_mm": r(m["diameter_mm"], 2), "short_axis_mm": r(m["short_axis_mm"], 2),
            "mean_hu": r(m["mean_hu"], 1), "solid_fraction": r(m["solid_fraction"]), "type": m["type"]}


def collect(split: str, data_dir=None, limit: int | None = None, tta: bool = False, log=print,
            networks: tuple[str, ...] = CLICK_NETWORKS) -> dict:
    """Run the four click networks on every VOI of ``split``; returns ``{"split", "tta", "nodules": [...], "skipped"}``.

    Raises:
        ValueError: ``split`` is not "val" or "test" (training patients are never evaluated here).
    """
    from NoduleMTLLib.core.io import CTVolume
    from NoduleMTLLib.inference.pipeline import analyze_points
    from NoduleMTLLib.models.registry import load_network

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    patients = set(load_split()[split]) - set(RESERVED_PATIENTS)
    rows = [r for r in csv.DictReader(open(d / "labels.csv")) if r["patient_id"] in patients]
    if limit:
        rows = rows[:limit]
    nets = {n: load_network(n, "cpu") for n in networks}
    out, skipped = [], []
    for i, r in enumerate(rows):
        img = sitk.ReadImage(str(d / r["image"]))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"]))) > 0
        ct = CTVolume(img, source=r["image"])
        c = (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))
        if not ct.contains_lps(c):
            skipped.append(f"{r['patient_id']}_{r['nodule_id']}")
            continue
        t0 = time.perf_counter()
        kw = {"tta": True} if tta else {}
        res = analyze_points(ct, [c], network_ids=tuple(networks), device="cpu", networks=nets, **kw)
        sec = time.perf_counter() - t0
        n = res.nodules[0]
        rec = {"patient_id": r["patient_id"], "nodule_id": r["nodule_id"],
               "malignancy_median": float(r["Malignancy_value"]),
               "label": malignancy_label(float(r["Malignancy_value"])),
               "ref_volume_mm3": round(float(ref.sum() * np.prod(ct.spacing)), 2), "networks": {}}
        for nid in networks:
            box = n.network_masks.get(nid)
            e = _measure(None if box is None else box.to_full(), ct, ref)
            p = n.networks[nid].malignancy_probability
            e["probability"] = None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p)
            e["signs"] = n.networks[nid].sign_probabilities
            rec["networks"][nid] = e
        cons = n.consensus
        e = _measure(None if cons.mask is None else cons.mask.to_full(), ct, ref)
        e["probability"] = None if cons.malignancy_probability is None else float(cons.malignancy_probability)
        e["disagreement"] = cons.disagreement
        rec["consensus"] = e
        rec["seconds"] = round(sec, 3)
        out.append(rec)
        if log and (i % 10 == 0 or i == len(rows) - 1):
            log(f"{split}: {i + 1}/{len(rows)} {r['patient_id']}_{r['nodule_id']} {sec:.1f} s")
    return {"split": split, "tta": tta, "networks": list(networks), "nodules": out, "skipped_centre_outside_voi": skipped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("val", "test"), required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tta", action="store_true", help="test-time augmentation (left-right flip) in every network")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--networks", default=",".join(CLICK_NETWORKS), help="comma-separated click networks (default: all four)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    nets = tuple(n.strip() for n in a.networks.split(",") if n.strip())
    ev = collect(a.split, a.data, a.limit, a.tta, networks=nets)
    tag = "" if nets == CLICK_NETWORKS else "_" + "_".join(nets)
    name = f"{a.split}{tag}{'_tta' if a.tta else ''}.json"
    for folder in (OUT_DIR, REPORT_DIR) if not a.limit else (OUT_DIR,):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(ev, indent=0))
    print(f"wrote {len(ev['nodules'])} nodules -> {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
