"""Synthetic masses (training.mass_insertion's draws, seeds 2 / 3, as ../recentre/masses_recentre.py) with
the multi-scale search: one slice pass with coarse factors (2, 4), then reported nodules at the default and
at the high-sensitivity point for each variant of ``infer.COARSE_FACTORS``: (), (2,), (4,), (2, 4).
The shipped detector, fpr25d and click outlines; everything else as shipped.  Rule: RULE.md.

usage: python masses_coarse.py SEED OUT.json SD_DIR
"""
import dataclasses
import json
import pickle
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from NoduleMTLLib.detection import preprocess as pp  # noqa: E402
from NoduleMTLLib.detection.infer import load_detector, load_fpr, run_slice_detections  # noqa: E402
from training.evaluate_detection import HIGH_SENSITIVITY_THRESHOLD, click_outliner, reported_nodules  # noqa: E402
from training.mass_insertion import mass_outcome, pasted_masses, summarise_outcomes  # noqa: E402
from training.wholescan import default_cache  # noqa: E402

SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
VARIANTS = [(), (2.0,), (4.0,), (2.0, 4.0)]
seed, out, sd_dir = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sd_dir.mkdir(parents=True, exist_ok=True)
cache = Path(default_cache())
model, fpr, click = load_detector("cpu"), load_fpr("cpu"), click_outliner("cpu")
rows = []
for _name, sm in pasted_masses(SCANS, 4, seed, cache):
    t0 = time.perf_counter()
    rec = dict(sm.record)
    f = sd_dir / f"seed{seed}_{len(rows):02d}.pkl"
    if f.exists():
        sd = pickle.load(open(f, "rb"))
    else:
        slab_lung = pp.lung_mask_from_ct(sm.ct)
        with torch.inference_mode():
            sd = run_slice_detections(sm.ct, model, "cpu", lung=slab_lung, pleural_masses=True, coarse_factors=(2.0, 4.0))
        pickle.dump(sd, open(f, "wb"))
    rec["timing_s"] = {k: round(v, 1) for k, v in sd.timing_s.items()}
    for fs in VARIANTS:
        sdv = dataclasses.replace(sd, coarse={k: v for k, v in sd.coarse.items() if k in fs})
        for thr in ("default", HIGH_SENSITIVITY_THRESHOLD):
            nods = reported_nodules(sdv, sm.ct, thr, fpr, "cpu", click, shapes=True)[1]
            rec[f"{thr}|coarse={','.join(str(int(x)) for x in fs) or 'none'}"] = mass_outcome(nods, sm.mask)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rows.append(rec)
    print(json.dumps(rec), flush=True)
summary = summarise_outcomes(rows)
print(json.dumps(summary, indent=1))
json.dump({"seed": seed, "masses": rows, "summary": summary}, open(out, "w"), indent=1)
