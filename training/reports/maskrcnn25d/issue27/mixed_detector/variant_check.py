"""RULE.md, second and third questions: a setting of the search's fold / territory rules, on
non-test data only, with the shipped detector and points.  VARIANT:

* ``fold`` (``fold_check.json``): fold a candidate when half of either outline lies in the other.
  It was measured with an ``infer.FOLD_EITHER_WAY`` switch that was removed from the library after
  it failed its rule; run it from commit d140c9c;
* ``territory``: the outline volume from which a nodule claims its mass territory
  (``infer.MASS_TERRITORY_ML`` 10 (shipped) / 5 / 2 mL; ``territory_check.json``).

1. The six non-test whole scans (``evaluate_detection.evaluate_lidc``, the CLI's search options;
   slice detections cached in SD_CACHE): nodules found (>= 1 reader) and FPs at the default and
   the high-sensitivity point, per setting.
2. The 24 synthetic masses of seed 2 (``training.mass_insertion``'s draws; slab detections pickled
   by ``recentre/masses_recentre.py`` in MASS_SD): ``mass_outcome`` at the default, per setting.

    PYTHONPATH=. python training/reports/maskrcnn25d/issue27/mixed_detector/variant_check.py VARIANT OUT.json SD_CACHE MASS_SD
"""
import json
import pickle
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from NoduleMTLLib.detection import infer  # noqa: E402
from NoduleMTLLib.models.registry import operating_points  # noqa: E402
from training.evaluate_detection import click_outliner, evaluate_lidc, load_model, reported_nodules  # noqa: E402
from training.mass_insertion import mass_outcome, pasted_masses  # noqa: E402
from training.wholescan import default_cache  # noqa: E402

SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
#: VARIANT -> (module constant of ``infer``, its settings, the key prefix of the output)
VARIANTS = {"territory": ("MASS_TERRITORY_ML", (10.0, 5.0, 2.0), "territory_ml")}
attr, settings, prefix = VARIANTS[sys.argv[1]]
out, sd_cache, mass_sd = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
cache = Path(default_cache())
model, _, sha = load_model(None)
fpr, click = infer.load_fpr("cpu"), click_outliner("cpu")
hs = operating_points()["high_sensitivity"]
search = {"input_scale": 1.0, **({"pleural_masses": True} if infer.PLEURAL_MASSES else {})}
res = {"weights_sha256": sha, "points": operating_points(), "real": {}, "masses": {}}
for name in SCANS:
    for value in settings:
        setattr(infer, attr, value)
        r = evaluate_lidc(model, cache / name, ("default", hs), "cpu", fpr, click,
                          {"detections_cache": sd_cache, "weights_sha": sha}, **search)
        res["real"].setdefault(name, {})[f"{prefix}={value}"] = {
            k: {f: v[f] for f in ("n_detections", "tp", "fp", "fn", "found")} for k, v in r["thresholds"].items()}
    print(name, json.dumps(res["real"][name]), flush=True)
rows = []
for name, sm in pasted_masses(SCANS, 4, 2, cache):
    sd = pickle.load(open(mass_sd / f"seed2_{len(rows):02d}.pkl", "rb"))
    rec = {"i": len(rows), "scan": name, "kind": sm.record["kind"], "target_mm": sm.record["target_mm"]}
    for value in settings:
        setattr(infer, attr, value)
        rec[f"{prefix}={value}"] = mass_outcome(
            reported_nodules(sd, sm.ct, "default", fpr, "cpu", click, shapes=True)[1], sm.mask)
    rows.append(rec)
    print(json.dumps(rec), flush=True)
for value in settings:
    k = f"{prefix}={value}"
    v = [r[k] for r in rows]
    res["masses"][k] = {"found": sum(x["found"] for x in v), "one": sum(x["n_on_mass"] == 1 for x in v),
                        "one_inside_80": sum(x["one_inside_80"] for x in v), "n_elsewhere": sum(x["n_elsewhere"] for x in v),
                        "n": len(v)}
    res["real"][k] = {t: {"tp": sum(res["real"][s][k][t]["tp"] for s in SCANS), "fp": sum(res["real"][s][k][t]["fp"] for s in SCANS),
                          "found": sorted(f"{s}#{i}" for s in SCANS for i in res["real"][s][k][t]["found"])}
                      for t in res["real"][SCANS[0]][k]}
res["mass_rows"] = rows
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "mass_rows" and k != "real"}, indent=1))
print(json.dumps({k: v for k, v in res["real"].items() if k.startswith(prefix)}, indent=1))
