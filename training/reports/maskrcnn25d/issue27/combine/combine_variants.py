"""Combined-score variants of the two-stage search on the six selection scans (issue 27: the small
nodules' rank). The four training scans are scored out of fold (`fp_reduction cv` folds, RUN/cv_SCAN/best.pt),
the two validation scans by the shipped fpr25d, exactly as `fp_reduction select` pools them. Variants, fixed
before looking: the shipped geometric mean sqrt(det * fpr); det^0.3 * fpr^0.7; det^0.7 * fpr^0.3; and the
shipped mean with fpr25d averaged over the CT mirrored left-right and front-back (test-time augmentation).
For each: operating points by the shipped rule (lowest combined score with <= 2 / <= 8 FPs per scan) and
the pooled FROC / CPM (>= 3 and >= 1 readers).

usage: python combine_variants.py RUN OUT.json
"""
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

torch.set_num_threads(1)
from NoduleMTLLib.detection.infer import load_fpr  # noqa: E402
from NoduleMTLLib.models.networks.fpr25d import score_candidates  # noqa: E402
from training.fp_reduction import load_trained, nodule_ranks, pooled_froc, select_threshold  # noqa: E402
from training.small_insertion import mirrored_fpr  # noqa: E402
from training.wholescan import default_cache, load_split  # noqa: E402

run, out = Path(sys.argv[1]), Path(sys.argv[2])
cache = Path(default_cache())


def fpr_scores(model, patient, cands, tta):
    img = sitk.ReadImage(str(cache / patient / "ct.nrrd"))
    vol = sitk.GetArrayFromImage(img)
    sp = img.GetSpacing()
    items = [(c["centre_ijk"], c["slices"]) for c in cands]
    plain = score_candidates(model, vol, sp, items)
    return (mirrored_fpr(model, vol, sp, items) if tta else plain), plain


scans = []
shipped = load_fpr("cpu")
for p in load_split()["val"]:
    c = json.loads((cache / "candidates" / f"{p}.json").read_text())
    tta, plain = fpr_scores(shipped, p, c["candidates"], True)
    for cd, f, g in zip(c["candidates"], plain, tta):
        cd["fpr"], cd["fpr_tta"] = float(f), float(g)
    scans.append(c)
for f in sorted((run / "cv_scores").glob("*.json")):
    c = json.loads(f.read_text())
    fold = run / f"cv_{c['scan']}"
    m = load_trained(fold / "best.pt", fold / "config.json")
    tta, plain = fpr_scores(m, c["scan"], c["candidates"], True)
    for cd, g, h in zip(c["candidates"], tta, plain):
        assert abs(cd["fpr"] - float(h)) < 1e-4, (cd["fpr"], h)
        cd["fpr_tta"] = float(g)
    scans.append(c)

variants = {"sqrt (shipped)": lambda d, f, t: np.sqrt(d * f), "det^0.3*fpr^0.7": lambda d, f, t: d ** 0.3 * f ** 0.7,
            "det^0.7*fpr^0.3": lambda d, f, t: d ** 0.7 * f ** 0.3, "sqrt, fpr TTA": lambda d, f, t: np.sqrt(d * t)}
res = {"scans": [s["scan"] for s in scans], "variants": {}}
for name, fn in variants.items():
    for s in scans:
        for cd in s["candidates"]:
            cd["combined"] = float(fn(cd["score"], cd["fpr"], cd["fpr_tta"]))
    r = {"default_2fp": select_threshold(scans, 2.0), "high_sensitivity_8fp": select_threshold(scans, 8.0),
         "froc_3": pooled_froc(scans, 3), "froc_1": pooled_froc(scans, 1), "nodules": nodule_ranks(scans)}
    res["variants"][name] = r
    print(name, "| op", r["default_2fp"]["threshold"], len(r["default_2fp"].get("nodules_hit", [])), "| 8fp",
          r["high_sensitivity_8fp"]["threshold"], len(r["high_sensitivity_8fp"].get("nodules_hit", [])),
          "| CPM>=3", r["froc_3"]["cpm"], r["froc_3"]["sensitivities"], "| CPM>=1", r["froc_1"]["cpm"], flush=True)
json.dump(res, open(out, "w"), indent=1)
