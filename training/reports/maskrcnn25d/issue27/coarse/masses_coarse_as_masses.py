"""Replay of masses_coarse.py's slice detections (its pickles; no network run) with coarse factors (2, 4)
and ``infer.COARSE_ONLY_AS_MASSES`` on: coarse candidates reported only through the mass rule.
Rule: RULE.md ("Follow-up variant").

usage: python masses_coarse_as_masses.py SEED OUT.json SD_DIR

(Follow-up 2, variant B, is the same command since refused coarse candidates release what they folded.)
"""
import json
import pickle
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from NoduleMTLLib.detection import infer  # noqa: E402
from NoduleMTLLib.detection.infer import load_fpr  # noqa: E402
from training.evaluate_detection import HIGH_SENSITIVITY_THRESHOLD, click_outliner, reported_nodules  # noqa: E402
from training.mass_insertion import mass_outcome, pasted_masses, summarise_outcomes  # noqa: E402
from training.wholescan import default_cache  # noqa: E402

SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
seed, out, sd_dir = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
fpr, click = load_fpr("cpu"), click_outliner("cpu")
infer.COARSE_ONLY_AS_MASSES = True
rows = []
for _name, sm in pasted_masses(SCANS, 4, seed, Path(default_cache())):
    rec = dict(sm.record)
    sd = pickle.load(open(sd_dir / f"seed{seed}_{len(rows):02d}.pkl", "rb"))
    assert set(sd.coarse) == {2.0, 4.0}
    for thr in ("default", HIGH_SENSITIVITY_THRESHOLD):
        nods = reported_nodules(sd, sm.ct, thr, fpr, "cpu", click, shapes=True)[1]
        rec[f"{thr}|coarse=2,4|as_masses"] = mass_outcome(nods, sm.mask)
    rows.append(rec)
    print(json.dumps(rec), flush=True)
summary = summarise_outcomes(rows)
print(json.dumps(summary, indent=1))
json.dump({"seed": seed, "masses": rows, "summary": summary}, open(out, "w"), indent=1)
