"""Session driver (detfp): per non-test whole scan, every FPR-rescored candidate with combined
score >= LOW gets a dsmtnet click outline; print its size, lung share, and whether it hits a
reference (counted / excluded) -> /work/cache/detfp/cands_<scan>.json"""
import json, pickle, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from NoduleMTLLib.detection.infer import select_nodules, load_fpr
import sys; sys.path.insert(0, "/work/cache/detfp"); from feat import outline_feats
from training import detection_matching as ev
from training.evaluate_detection import click_outliner, _excluded_marks

LOW = float(sys.argv[1])
fpr = load_fpr("cpu"); click = click_outliner("cpu")
for name in sys.argv[2:]:
    folder = Path("/work/cache/wholescan") / name
    ct, refs = ev.load_lidc_whole_ct_references(folder)
    inc, exc = ev.split_references(refs); exc = exc + _excluded_marks(folder, ct)
    sd = pickle.load(open(f"/work/cache/detfp/sd/{name}.pkl", "rb"))
    merged, cands, _ = select_nodules(sd, ct, "adaptive", fpr, "cpu")
    lung = sd.lung.labels > 0
    rows = []
    t = time.perf_counter()
    for n in cands:
        if n.score < LOW:
            continue
        m_inc = ev.match_nodules([n], inc).tp if inc else 0
        m_exc = ev.match_nodules([n], exc).tp if exc else 0
        hit = [r.nodule_id for r in inc if np.sum((np.array(n.centre_lps) - r.centre_lps) ** 2) < (r.diameter_mm / 2) ** 2]
        r = {"score": round(n.score, 4), "det": round(n.detector_score, 4), "fpr": round(n.fp_reduction_score, 4),
             "centre_ijk": [round(v, 1) for v in n.centre_ijk], "slices": [n.slices[0], n.slices[-1]],
             "det_extent_mm": round(max((n.box_xyxy[2]-n.box_xyxy[0])*ct.spacing[0], (n.box_xyxy[3]-n.box_xyxy[1])*ct.spacing[1]), 1),
             "tp": bool(m_inc), "hit_radius": hit, "excluded": bool(m_exc)}
        o = click(ct, n.centre_lps)
        fe = outline_feats(o, ct, lung)
        if fe: r.update(fe)
        rows.append(r)
    print(name, len(cands), "cands", len(rows), ">= LOW", round(time.perf_counter() - t, 1), "s", flush=True)
    for r in rows:
        print("  ", r, flush=True)
    json.dump(rows, open(f"/work/cache/detfp/cands_{name}.json", "w"))
