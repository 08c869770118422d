"""Synthetic masses (training.mass_insertion's draws, same seed -> same masses): reported nodules at the
default and at 0.7428 with the shipped search (pleural masses, mass rule, territory, mass shapes), with the
click outline of large candidates taken at the detection's centre (recentre off) or again at the outline's
deepest voxel (infer.RECENTRE_ML = 10 mL).  The slab's slice detections are pickled (one search per mass).

usage: python masses_recentre.py SEED OUT.json [SD_DIR] [WEIGHTS]

WEIGHTS: another detector file (the 2026-12-07 small-nodule fine-tune, ../small_detector/): the search at
the manifest's operating points (set them to that detector's in a scratch checkout), outlines at the
detection's centre only.
"""
import json
import pickle
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from NoduleMTLLib.detection import preprocess as pp  # noqa: E402
from NoduleMTLLib.detection.infer import load_detector, load_fpr, run_slice_detections  # noqa: E402
from training.evaluate_detection import HIGH_SENSITIVITY_THRESHOLD, click_outliner, load_model, reported_nodules  # noqa: E402
from training.mass_insertion import mass_outcome, pasted_masses  # noqa: E402
from training.wholescan import default_cache  # noqa: E402

SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
seed, out = int(sys.argv[1]), Path(sys.argv[2])
sd_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/work/i27/recentre_sd")
sd_dir.mkdir(parents=True, exist_ok=True)
cache = Path(default_cache())
weights = Path(sys.argv[4]) if len(sys.argv) > 4 else None
model = load_model(weights)[0] if weights else load_detector("cpu")
fpr, click = load_fpr("cpu"), click_outliner("cpu")
recentre = (None,) if weights else (None, 10.0)
rows = []
for _name, sm in pasted_masses(SCANS, 4, seed, cache):  # the same draws for a seed
    t0 = time.perf_counter()
    rec = dict(sm.record)
    f = sd_dir / f"seed{seed}_{len(rows):02d}.pkl"
    if f.exists():
        sd = pickle.load(open(f, "rb"))
    else:
        slab_lung = pp.lung_mask_from_ct(sm.ct)
        with torch.inference_mode():
            sd = run_slice_detections(sm.ct, model, "cpu", lung=slab_lung, pleural_masses=True)
        pickle.dump(sd, open(f, "wb"))
    for thr in ("default", HIGH_SENSITIVITY_THRESHOLD):
        for rc in recentre:
            nods = reported_nodules(sd, sm.ct, thr, fpr, "cpu", click, shapes=True, recentre_ml=rc)[1]
            o = mass_outcome(nods, sm.mask)
            o["long_mm"] = [round(float(n.features["long_mm"]), 1) if n.features else None for n in nods
                            if n.mask is not None and (n.mask & sm.mask[n.box_voxel[2]:n.box_voxel[5], n.box_voxel[1]:n.box_voxel[4],
                                                                          n.box_voxel[0]:n.box_voxel[3]]).any()]
            rec[f"{thr}|recentre={rc}"] = o
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rows.append(rec)
    print(json.dumps(rec), flush=True)
summary = {}
for key in [k for k in rows[0] if "|" in k]:
    v = [m[key] for m in rows]
    summary[key] = {"found": sum(x["found"] for x in v), "one": sum(x["n_on_mass"] == 1 for x in v),
                    "one_inside_80": sum(x["one_inside_80"] for x in v), "n_elsewhere": sum(x["n_elsewhere"] for x in v),
                    "n": len(v)}
print(json.dumps(summary, indent=1))
json.dump({"seed": seed, "masses": rows, "summary": summary}, open(out, "w"), indent=1)
