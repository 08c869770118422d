"""Session driver (detfp): on the non-test whole scans (cached slice detections), reported nodules at
the default / 0.7428 with mass-rule and territory variants, via training.evaluate_detection.reported_nodules
(the CLI's code path); clicks memoised per centre on disk. TP/FP by the paper's matching."""
import json, pickle, sys, time, itertools
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from NoduleMTLLib.detection import infer
from NoduleMTLLib.detection.infer import load_fpr, MassRule
from training import detection_matching as ev
from training.evaluate_detection import click_outliner, _excluded_marks, reported_nodules

fpr = load_fpr("cpu"); base_click = click_outliner("cpu")
RULES = {"off": None}
for ms, ml in itertools.product((0.70, 0.75, 0.80), (5.0, 10.0, 15.0)):
    RULES[f"s{ms}_v{ml}"] = MassRule(ms, ml, -1000.0, 0.0)
TERRS = {"t-": (None, None), "t10": (10.0, 10.0), "t20": (10.0, 20.0)}
res = {}
for name in sys.argv[1:]:
    folder = Path("/work/cache/wholescan") / name
    ct, refs = ev.load_lidc_whole_ct_references(folder)
    inc, exc = ev.split_references(refs); exc = exc + _excluded_marks(folder, ct)
    sd = pickle.load(open(f"/work/cache/detfp/sd/{name}.pkl", "rb"))
    mf = Path(f"/work/cache/detfp/clicks_{name}.pkl")
    memo = pickle.load(open(mf, "rb")) if mf.exists() else {}
    def click(ct_, p):
        key = tuple(round(v, 3) for v in p)
        if key not in memo:
            memo[key] = base_click(ct_, p)
        return memo[key]
    from NoduleMTLLib.detection.infer import select_nodules, mass_candidates, outline_with_click
    sel = {thr: select_nodules(sd, ct, thr, fpr, "cpu") for thr in ("default", 0.7428)}
    for thr in ("default", 0.7428):
        for (rn, rule), (tn, (tml, tmm)) in itertools.product(RULES.items(), TERRS.items()):
            merged, nods0, cut = sel[thr]
            for n in merged.nodules:  # fresh copies: outline_with_click mutates
                pass
            import copy
            mc = copy.deepcopy(merged)
            ids = {id(n) for n in nods0}
            found = [m2 for m1, m2 in zip(merged.nodules, mc.nodules) if id(m1) in ids]
            masses = mass_candidates(mc, cut, True, rule)
            nods = outline_with_click(found + masses, ct, click, max_kept=100, cut=cut, mass_rule=rule if masses else None,
                                      lung=sd.lung, territory_ml=tml, territory_mm=tmm)[0]
            m = ev.match_nodules(nods, inc, exc)
            nm = [n for n in nods if n.accepted_as == "mass"]
            res.setdefault(f"{thr}|{rn}|{tn}", {})[name] = (m.tp, m.fp, m.fn, len(nods), len(nm))
        pickle.dump(memo, open(mf, "wb"))
    print(name, {k: v[name] for k, v in res.items() if "|off|" in k or "s0.7_v10.0" in k}, flush=True)
json.dump(res, open(f"/work/cache/detfp/replay_real_{'_'.join(s[-4:] for s in sys.argv[1:])}.json", "w"))
for k, v in res.items():
    tp = sum(x[0] for x in v.values()); fp = sum(x[1] for x in v.values()); fn = sum(x[2] for x in v.values())
    print(f"{k:28s} TP {tp} FP {fp} FN {fn} FP/scan {fp/len(v):.2f} masses {sum(x[4] for x in v.values())}")
