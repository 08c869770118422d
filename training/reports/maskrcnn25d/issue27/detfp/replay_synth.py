"""Session driver (detfp): replay the reporting (outline_with_click with/without mass rules) on the
synthetic-mass slabs pickled by synth.py; clicks replayed from the pickle."""
import copy, glob, json, pickle, sys
import numpy as np, SimpleITK as sitk
sys.path.insert(0, "/work/cache/detfp")
import NoduleMTLLib.inference.pipeline, NoduleMTLLib.core.consensus  # pickles written before the relayout (issue 24)
sys.modules.setdefault("NoduleMTLLib.pipeline", NoduleMTLLib.inference.pipeline)
sys.modules.setdefault("NoduleMTLLib.consensus", NoduleMTLLib.core.consensus)
from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.detection.infer import MassRule, outline_with_click
from NoduleMTLLib.models.registry import operating_points

ops = operating_points()
TERRS = {"t-": (None, None), "t10": (10.0, 10.0), "t20": (10.0, 20.0)}
RULES = {"off": None}
for ms in (0.70, 0.75, 0.80):
    for ml in (5.0, 10.0, 15.0):
        RULES[f"s{ms}_v{ml}"] = MassRule(ms, ml, -1000.0, 0.0)

def inside_frac(nod, pm_full, margin=10):
    i0, j0, k0, i1, j1, k1 = nod.box_voxel
    fr = []
    for k in range(k0, k1):
        m = nod.mask[k - k0]
        if not m.any() or not pm_full[k].any():
            continue
        yy, xx = np.nonzero(pm_full[k])
        a0, a1, b0, b1 = yy.min() - margin, yy.max() + 1 + margin, xx.min() - margin, xx.max() + 1 + margin
        sub = m[max(0, a0 - j0):max(0, a1 - j0), max(0, b0 - i0):max(0, b1 - i0)]
        fr.append(sub.sum() / m.sum())
    return min(fr) if fr else None

out = {}
for f in sorted(glob.glob("/work/cache/detfp/synth/*.pkl")):
    d = pickle.load(open(f, "rb"))
    img = sitk.GetImageFromArray(d["hu"]); img.SetSpacing(d["spacing"]); img.SetOrigin(d["origin"]); img.SetDirection(d["direction"])
    sct = CTVolume(img)
    pm = np.zeros(sct.shape_zyx, bool); k0, j0, i0 = d["pm"].offset_zyx; a = d["pm"].array
    pm[k0:k0+a.shape[0], j0:j0+a.shape[1], i0:i0+a.shape[2]] = a
    clicks = d["clicks"]
    click = lambda ct_, p: clicks.get(tuple(round(v, 3) for v in p))
    rec = json.load(open(f.replace(".pkl", ".json")))
    for thr_name, cut in (("default", ops["default"]), ("hs", ops["high_sensitivity"])):
        for (rn, rule), (tn, (tml, tmm)) in [(r, t) for r in RULES.items() for t in TERRS.items()]:
            cands = copy.deepcopy(d["cands"])
            found = [c for c in cands if c.score >= cut]
            masses = [c for c in cands if rule is not None and rule.min_score <= c.score < cut]
            kept, _ = outline_with_click(found + masses, sct, click, cut=cut, mass_rule=rule if masses else None, lung=d["lung"],
                                         territory_ml=tml, territory_mm=tmm)
            on = []
            for n in kept:
                i0, j0, k0, i1, j1, k1 = n.box_voxel
                if n.mask is not None and (n.mask & pm[k0:k1, j0:j1, i0:i1]).any():
                    on.append(n)
            fr = [inside_frac(n, pm) for n in on]
            out.setdefault(f"{thr_name}|{rn}|{tn}", []).append(dict(mass=f.split("/")[-1][:-4], found=bool(on), n_on=len(on),
                 ok=bool(len(on) == 1 and fr[0] is not None and fr[0] >= 0.8), fr=[None if x is None else round(float(x), 2) for x in fr],
                 acc=[n.accepted_as for n in on], other=len(kept) - len(on), target=rec["target_mm"], f=rec["thick_factor"]))
print("masses:", len(out.get("default|off|t-", [])))
for k, v in out.items():
    print(f"{k:26s} found {sum(x['found'] for x in v)}/{len(v)} one {sum(x['n_on']==1 for x in v)} ok(one,>=0.8) {sum(x['ok'] for x in v)} other {sum(x['other'] for x in v)}")
if "-v" in sys.argv:
    for k in sys.argv[sys.argv.index("-v") + 1:]:
        for x in out[k]:
            print(k, x)
json.dump(out, open("/work/cache/detfp/replay_synth.json", "w"))
