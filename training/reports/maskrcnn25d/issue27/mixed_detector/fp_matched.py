"""Operating points FP-matched on the validation scans (issue 27, mixed-size fine-tune; RULE.md).

Scores the two validation scans' cached candidates (LIDC-IDRI-0004, -0007) with the shipped fpr25d
for each detector's candidate cache, then gives each detector the lowest combined threshold whose
validation false positives are <= the shipped detector's at its shipped points (0.8891 -> default,
0.7428 -> high sensitivity), and the validation nodules found there (>= 3 and >= 1 readers).

    PYTHONPATH=. python training/reports/maskrcnn25d/issue27/mixed_detector/fp_matched.py OUT.json \
        shipped=/work/cache/wholescan mixed=/work/cache_mixed/wholescan [points=DEFAULT,HIGH_SENSITIVITY]

``points=``: the shipped detector's points when they are not :data:`PREVIOUS_POINTS` (the
mass-insertion fine-tune, ``../mass_detector/RULE.md``, is matched to 0.9421,0.8094; its cache is
named ``masses=``).
"""
import json
import sys
from pathlib import Path

from training.fp_reduction import load_trained, scan_scores, select_threshold
from training.wholescan import load_split

#: The points of the detector shipped before this decision (the "shipped" cache), 2026-12-07.
PREVIOUS_POINTS = {"default": 0.8891, "high_sensitivity": 0.7428}


def fp_and_hits(scans, t, min_readers):
    fp = sum(1 for s in scans for cd in s["candidates"] if cd["combined"] >= t and cd["hit"] is None and not cd["excluded"])
    readers = {(s["scan"], r["nodule"]): r["n_readers"] for s in scans for r in s["references"]}
    hits = sorted({f"{s['scan']}#{cd['hit']}" for s in scans for cd in s["candidates"]
                   if cd["combined"] >= t and cd["hit"] is not None and readers[(s["scan"], cd["hit"])] >= min_readers})
    n = sum(1 for v in readers.values() if v >= min_readers)
    return fp, hits, n


def main(out, caches):
    if "points" in caches:
        PREVIOUS_POINTS.update(zip(("default", "high_sensitivity"), (float(v) for v in caches.pop("points").split(","))))
    model = load_trained(Path("Resources/Weights/fpr25d.safetensors"))
    val = sorted(load_split()["val"])
    scored = {name: [scan_scores(model, s, Path(c)) for s in val] for name, c in caches.items()}
    base = scored["shipped"]
    budget = {k: fp_and_hits(base, t, 3)[0] for k, t in PREVIOUS_POINTS.items()}
    res = {"validation_scans": val, "fp_budget_total": budget, "detectors": {}}
    for name, scans in scored.items():
        pts = {k: (PREVIOUS_POINTS[k] if name == "shipped" else select_threshold(scans, budget[k] / len(scans))["threshold"])
               for k in PREVIOUS_POINTS}
        d = {}
        for k, t in pts.items():
            fp, h3, n3 = fp_and_hits(scans, t, 3)
            _, h1, n1 = fp_and_hits(scans, t, 1)
            d[k] = {"threshold": t, "fp_total": fp, "fp_per_scan": fp / len(scans),
                    "found_3_readers": h3, "n_3_readers": n3, "found_1_reader": h1, "n_1_reader": n1}
        res["detectors"][name] = d
    Path(out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:]))
