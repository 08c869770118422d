"""Detector candidates on whole scans, cached for false-positive-reduction training and evaluation.

    python -m training.candidates [--scans train val test] [--cache DIR] [--weights PATH]

For each whole scan of ``training/splits/lidc_wholescan_split.json`` (built by
``nodulemtl-train wholescan`` into the cache), runs the shipped ``maskrcnn25d`` search
exactly as ``nodulemtl analyze --detect`` does (:func:`NoduleMTLLib.detection.infer.
run_slice_detections` + :func:`~NoduleMTLLib.detection.infer.merge_detections` at the
candidate threshold of the two-stage search, :data:`NoduleMTLLib.models.networks.fpr25d.
CANDIDATE_THRESHOLD`) and writes ``CACHE/candidates/<patient>.json``: per candidate the
detector score, centre (LPS mm, continuous ijk), voxel box and slice range, and whether it
hits a reference nodule (LUNA16 rule: centre within the nodule's radius), a < 3-reader
nodule or an excluded mark (nodule < 3 mm / non-nodule, 5 mm radius).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def label_candidates(cands: list[dict], refs, excluded_lps, excluded_radius_mm: float) -> None:
    """Add ``hit`` (reference nodule id or None), ``hit_readers`` and ``excluded`` (bool) in place.

    A candidate hits a reference when its centre lies within the reference's radius
    (diameter / 2; LUNA16).  ``excluded``: within ``excluded_radius_mm`` of an excluded mark.
    """
    for c in cands:
        p = np.asarray(c["centre_lps"], float)
        c["hit"], c["hit_readers"], c["excluded"] = None, None, False
        best = None
        for r in refs:
            d = float(np.linalg.norm(p - np.asarray(r.centre_lps)))
            if d <= r.diameter_mm / 2.0 and (best is None or d < best[0]):
                best = (d, r)
        if best is not None:
            c["hit"], c["hit_readers"] = int(best[1].nodule_id), best[1].n_readers
        for e in excluded_lps:
            if float(np.linalg.norm(p - np.asarray(e))) <= excluded_radius_mm:
                c["excluded"] = True
                break


def candidates_of_scan(model, folder: Path, device="cpu") -> dict:
    """Run the search on ``folder`` (ct.nrrd + nodules_labels.nrrd + nodules.csv [+ excluded.json])."""
    from NoduleMTLLib.detection.infer import merge_detections, run_slice_detections
    from NoduleMTLLib.models.networks.fpr25d import CANDIDATE_THRESHOLD
    from training import detection_matching as ev

    ct, refs = ev.load_lidc_whole_ct_references(folder)
    exc = json.loads((folder / "excluded.json").read_text())["excluded"] if (folder / "excluded.json").exists() else []
    t0 = time.perf_counter()
    sd = run_slice_detections(ct, model, device)
    merged = merge_detections(sd, ct, CANDIDATE_THRESHOLD)
    cands = []
    for nod in merged.nodules:
        cands.append({"score": float(nod.score), "centre_lps": [float(v) for v in nod.centre_lps],
                      "centre_ijk": [float(v) for v in nod.centre_ijk], "box_voxel": [int(v) for v in nod.box_voxel],
                      "slices": [int(nod.slices[0]), int(nod.slices[-1])], "n_members": len(nod.members)})
    label_candidates(cands, refs, [e["centre_lps"] for e in exc], 5.0)
    return {"scan": folder.name, "score_threshold": float(merged.score_threshold), "seconds": round(time.perf_counter() - t0, 1),
            "references": [{"nodule": r.nodule_id, "n_readers": r.n_readers, "diameter_mm": r.diameter_mm,
                            "centre_lps": list(r.centre_lps)} for r in refs],
            "candidates": cands}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.candidates", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", nargs="*", default=["train", "val", "test"], help="split names or patient ids")
    ap.add_argument("--cache", type=Path, default=None, help="whole-scan cache (default: training.wholescan.default_cache())")
    ap.add_argument("--weights", type=Path, default=None, help="detector weights (default: shipped)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    from training.evaluate_detection import load_model
    from training.wholescan import _check_not_reserved, default_cache, load_split

    torch.set_num_threads(a.threads)
    cache = Path(a.cache or default_cache())
    split = load_split()
    patients = []
    for s in a.scans:
        patients += split[s] if s in ("train", "val", "test") else [s]
    model, _, sha = load_model(a.weights, False, "cpu")
    out = cache / "candidates"
    out.mkdir(parents=True, exist_ok=True)
    for p in patients:
        _check_not_reserved(p)
        r = candidates_of_scan(model, cache / p)
        r["detector_sha256"] = sha
        (out / f"{p}.json").write_text(json.dumps(r) + "\n")
        n_hit = sum(c["hit"] is not None for c in r["candidates"])
        print(f"{p}: {len(r['candidates'])} candidates at {r['score_threshold']:.3f}, {n_hit} on reference nodules, "
              f"{sum(c['excluded'] for c in r['candidates'])} on excluded marks; {r['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
