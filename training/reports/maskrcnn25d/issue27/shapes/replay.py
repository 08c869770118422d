"""Six non-test whole scans, cached slice detections (shipped detector): reported nodules at the default
with and without mass-shape candidates; TP/FP/FN by the paper's matching (training.detection_matching)."""
import glob, json, pickle, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from NoduleMTLLib.detection import infer
from NoduleMTLLib.detection.infer import load_fpr, mass_shape_candidates, _k_to_feet
from training import detection_matching as ev
from training.evaluate_detection import click_outliner, _excluded_marks, reported_nodules
fpr = load_fpr("cpu"); click = click_outliner("cpu")
res = {}
for name in sys.argv[1:]:
    folder = Path("/work/cache/wholescan") / name
    ct, refs = ev.load_lidc_whole_ct_references(folder)
    inc, exc = ev.split_references(refs); exc = exc + _excluded_marks(folder, ct)
    sd = pickle.load(open(glob.glob(f"/work/cache/evalcache/{name}.*.pkl")[0], "rb"))
    t = time.perf_counter(); cands = mass_shape_candidates(ct, sd.lung, _k_to_feet(ct)); tc = time.perf_counter() - t
    row = {"shape_candidates": len(cands), "shape_seconds": round(tc, 1),
           "points": [[round(v, 1) for v in c.centre_ijk] for c in cands]}
    for thr in ("default", 0.7428):
        for shapes in (False, True):
            nods = reported_nodules(sd, ct, thr, fpr, "cpu", click, shapes=shapes)[1]
            m = ev.match_nodules(nods, inc, exc)
            row[f"{thr}|shapes={shapes}"] = {"tp": m.tp, "fp": m.fp, "fn": m.fn, "n": len(nods),
                                              "mass_shape": [n.features for n in nods if n.accepted_as == "mass_shape"]}
    res[name] = row
    print(name, json.dumps(row), flush=True)
json.dump(res, open("/work/i27/replay_shapes.json", "w"), indent=1)
for thr in ("default", 0.7428):
    for shapes in (False, True):
        k = f"{thr}|shapes={shapes}"
        print(k, {x: sum(r[k][x] for r in res.values()) for x in ("tp", "fp", "fn", "n")})
