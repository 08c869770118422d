"""Whole-scan evaluation of the nodule search ``maskrcnn25d`` on the real whole CTs.

    python -m training.evaluate_detection [--weights PATH | --random-init] [--data DIR]
                                          [--out JSON] [--threshold adaptive|0.x ...]
    nodulemtl-train evaluate maskrcnn25d --whole-ct [--weights PATH]

Runs :func:`NoduleMTLLib.detection.infer.run_slice_detections` once per scan (the same
code as ``nodulemtl analyze --detect``) and merges the slice detections at each requested
score threshold.  Scans (``../shared/data/whole_ct``, or ``$NODULEMTL_DATA``):

* **LIDC-IDRI-0003 and -0005** (whole scans, reference = the readers' >= 50 % consensus
  label map + ``nodules.csv``; both patients are in the *test* split of
  ``training/splits/lidc_patient_split.json``, so no network was trained on them).
  Reference standard as LUNA16: nodules >= 3 mm marked by >= 3 of the 4 readers count
  (0003: nodules 2, 3, 4; 0005: 1, 2); the two single-reader nodules (0003 #1, 0005 #3)
  are *irrelevant findings*: a detection on them is neither TP nor FP.
  - nodule-level precision / recall / F1 with the paper's matching rule (section 3.4.3:
    centre slice within 3 slices and 2D box IoU > 0.2;
    :func:`NoduleMTLLib.detection.evaluate.match_nodules`), per threshold, summed over the
    scans;
  - FROC / CPM as LUNA16 (hit = candidate centre within the nodule radius; sensitivity at
    1/8 ... 8 FPs per scan; :func:`~NoduleMTLLib.detection.evaluate.froc`), candidates =
    the nodules merged with no score threshold (every slice detection the network
    returned, i.e. above the model's own ``box_score_thresh``);
  - per reference nodule: found (paper rule) at each threshold, best candidate score.
* **Lung-PET-CT-Dx A0001** (NRRD, 5 mm slices) and **A0002** (DICOM series, 8 mm), each
  with a biopsy-proven adenocarcinoma boxed on several slices
  (``lung_pet_ct_dx_boxes.csv``, pixel box, inclusive): per box, whether a detected
  nodule's *mask* has a voxel in the box on that slice, and the best 2D IoU of a nodule box
  covering that slice; per scan, the number of detections and how many touch no box.

Only two LIDC scans with five counted nodules: the figures show whether the pipeline
works on whole scans and how many false positives it gives, they are no estimate of
sensitivity (say so wherever they are quoted).  Writes JSON (default
``runs/maskrcnn25d/eval_whole_ct.json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LIDC_SCANS = ("LIDC-IDRI-0003", "LIDC-IDRI-0005")
PET_SCANS = ("lung_pet_ct_dx_A0001.nrrd", "lung_pet_ct_dx_A0002_dicom")
#: Thresholds reported by default: the paper's adaptive one, a fixed 0.5, and 0.9 / 0.95 - the
#: region where the validation mosaics (val-split patients, never these test scans) had
#: their best F1 during training (best thresholds 0.8-0.95; 0.95 at the shipped checkpoint, ``runs/maskrcnn25d/train.log``).
DEFAULT_THRESHOLDS = ("adaptive", 0.5, 0.9, 0.95)


def data_dir(path=None) -> Path:
    """``path``, else ``$NODULEMTL_DATA``, else ``../shared/data`` beside the repository."""
    return Path(path or os.environ.get("NODULEMTL_DATA", REPO.parent / "shared" / "data"))


def test_split_patients() -> set[str]:
    """Patients of the test split (``training/splits/lidc_patient_split.json``)."""
    sp = json.loads((REPO / "training" / "splits" / "lidc_patient_split.json").read_text())
    return set(sp["test"])


def load_model(weights: Path | None = None, random_init: bool = False, device="cpu"):
    """The registry's ``maskrcnn25d`` with shipped (verified) weights, a given checkpoint /
    safetensors file, or random initialisation (``random_init``: plumbing runs only).

    Returns:
        (model in eval mode on ``device``, description of the weights, sha256 or None).

    Raises:
        WeightsError: weights missing, unreadable or not matching the network.
    """
    import torch

    from NoduleMTLLib.registry import build_network, load_weights_into, sha256_of

    if random_init:
        torch.manual_seed(0)
        model = build_network("maskrcnn25d")
        return model.eval().to(device), "random-init (seed 0): plumbing only, no detection quality", None
    model = build_network("maskrcnn25d")
    path = load_weights_into(model, weights, "maskrcnn25d")
    return model.eval().to(device), str(path), sha256_of(path)


def _r(v, nd=4):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


def _thr_key(t) -> str:
    return "adaptive" if t == "adaptive" else f"{float(t):g}"


def evaluate_lidc(model, folder: Path, thresholds, device="cpu", **search) -> dict:
    """One whole LIDC scan: slice detections once, then matching per threshold and FROC candidates.

    Returns:
        JSON-ready dict (see module docstring) plus ``"_froc"``: the
        :class:`~NoduleMTLLib.detection.evaluate.FROCScan` and ``"_match"``: {threshold:
        :class:`~NoduleMTLLib.detection.evaluate.NoduleMatchResult`} (removed before writing).
    """
    from NoduleMTLLib.detection import evaluate as ev
    from NoduleMTLLib.detection.infer import merge_detections, run_slice_detections

    ct, refs = ev.load_lidc_whole_ct_references(folder)
    included, excluded = ev.split_references(refs)
    t0 = time.perf_counter()
    sd = run_slice_detections(ct, model, device, **search)
    t_search = time.perf_counter() - t0
    out = {"scan": folder.name, "shape_zyx": list(ct.shape_zyx), "spacing_mm": [round(v, 4) for v in ct.spacing],
           "n_slices_searched": len(sd.slices_searched), "n_slice_detections": len(sd.detections),
           "seconds": {k: round(v, 2) for k, v in {**sd.timing_s, "search_total": t_search}.items()},
           "references": [{"nodule": r.nodule_id, "n_readers": r.n_readers, "diameter_mm": round(r.diameter_mm, 1),
                           "centre_slice": r.centre_slice, "counted": r in included} for r in refs],
           "thresholds": {}, "_match": {}}
    for thr in thresholds:
        merged = merge_detections(sd, ct, thr)
        m = ev.match_nodules(merged.nodules, included, excluded)
        found = {included[ri].nodule_id for _, ri in m.pairs}
        # single-reader nodules: found by the same rule, reported but not counted
        m_exc = ev.match_nodules(merged.nodules, excluded) if excluded else None
        found_exc = {excluded[ri].nodule_id for _, ri in m_exc.pairs} if m_exc else set()
        out["thresholds"][_thr_key(thr)] = {
            "score_threshold": _r(merged.score_threshold), "n_detections": len(merged.nodules),
            "tp": m.tp, "fp": m.fp, "fn": m.fn, "duplicates": m.duplicates, "ignored_on_excluded": m.ignored,
            "precision": _r(m.precision), "recall": _r(m.recall), "f1": _r(m.f1),
            "found": sorted(found | found_exc),
        }
        out["_match"][_thr_key(thr)] = m
    allc = merge_detections(sd, ct, 0.0)
    fs = ev.froc_scan_from_nodules(allc.nodules, included, excluded)
    out["n_candidates"] = len(allc.nodules)
    best = {}
    for r in refs:
        d2 = ((np.asarray(fs.candidates_lps) - np.asarray(r.centre_lps)) ** 2).sum(1) if len(fs.scores) else np.zeros(0)
        hit = d2 < (r.diameter_mm / 2.0) ** 2
        best[r.nodule_id] = _r(float(fs.scores[hit].max())) if hit.any() else None
    for rr in out["references"]:
        rr["best_candidate_score_within_radius"] = best[rr["nodule"]]
    out["_froc"] = fs
    return out


def _pet_boxes(csv_path: Path) -> dict[str, list[dict]]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["volume"], []).append(
            {"k": int(r["slice_index_k"]), "box": tuple(int(r[c]) for c in ("xmin_i", "ymin_j", "xmax_i", "ymax_j"))})
    return out


def evaluate_pet(model, path: Path, boxes: list[dict], thresholds, device="cpu", **search) -> dict:
    """One Lung-PET-CT-Dx scan: per tumour box found? (mask voxel in the box on its slice), detections."""
    from NoduleMTLLib.detection.infer import merge_detections, run_slice_detections
    from NoduleMTLLib.detection.merge import box_iou_np
    from NoduleMTLLib.io import read_ct

    ct = read_ct(path)
    t0 = time.perf_counter()
    sd = run_slice_detections(ct, model, device, **search)
    t_search = time.perf_counter() - t0
    out = {"scan": path.name, "shape_zyx": list(ct.shape_zyx), "spacing_mm": [round(v, 4) for v in ct.spacing],
           "thick_slices": sd.report.thick_slices, "n_slices_searched": len(sd.slices_searched),
           "n_slice_detections": len(sd.detections),
           "seconds": {k: round(v, 2) for k, v in {**sd.timing_s, "search_total": t_search}.items()},
           "n_boxes": len(boxes), "thresholds": {}}
    for thr in thresholds:
        merged = merge_detections(sd, ct, thr)
        per_box = []
        touching = set()
        for b in boxes:
            k = b["k"]
            i0, j0, i1, j1 = b["box"]
            hit_mask, best_iou = False, 0.0
            for n, nod in enumerate(merged.nodules):
                bi0, bj0, bk0, bi1, bj1, bk1 = nod.box_voxel
                if not bk0 <= k < bk1:
                    continue
                if nod.mask is not None:
                    sub = nod.mask[k - bk0, max(j0, bj0) - bj0:max(0, min(j1 + 1, bj1) - bj0),
                                   max(i0, bi0) - bi0:max(0, min(i1 + 1, bi1) - bi0)]
                    if sub.size and sub.any():
                        hit_mask = True
                        touching.add(n)
                iou = float(box_iou_np(np.array([nod.box_xyxy]), np.array([[i0, j0, i1 + 1, j1 + 1]]))[0, 0])
                best_iou = max(best_iou, iou)
            per_box.append({"k": k, "box_ij": list(b["box"]), "found": hit_mask, "best_box_iou": round(best_iou, 3)})
        out["thresholds"][_thr_key(thr)] = {
            "score_threshold": _r(merged.score_threshold), "n_detections": len(merged.nodules),
            "n_detections_on_tumour": len(touching), "n_other_detections": len(merged.nodules) - len(touching),
            "boxes_found": sum(p["found"] for p in per_box), "tumour_found": any(p["found"] for p in per_box),
            "per_box": per_box,
        }
    return out


def evaluate_whole_ct(model, data=None, thresholds=DEFAULT_THRESHOLDS, device="cpu", log=print, **search) -> dict:
    """All four whole scans; see the module docstring.

    Args:
        model: the ``maskrcnn25d`` network (eval mode).
        data: data folder (default: :func:`data_dir`).
        thresholds: merge score thresholds ("adaptive" and/or floats).
        device: torch device.
        log: callable for progress lines.
        **search: options of :func:`~NoduleMTLLib.detection.infer.run_slice_detections`.

    Returns:
        JSON-ready report.

    Raises:
        FileNotFoundError: a scan is missing; ValueError: an LIDC scan of a non-test patient.
    """
    from NoduleMTLLib.detection import evaluate as ev

    d = data_dir(data) / "whole_ct"
    test = test_split_patients()
    for p in LIDC_SCANS:
        if p not in test:
            raise ValueError(f"{p} is not in the test split: its whole scan cannot be used to evaluate")
    report = {"protocol": "see training/evaluate_detection.py", "thresholds": [_thr_key(t) for t in thresholds],
              "search": {k: v for k, v in search.items()}, "lidc": [], "lung_pet_ct_dx": []}
    froc_scans, totals = [], {}
    for p in LIDC_SCANS:
        r = evaluate_lidc(model, d / "lidc" / p, thresholds, device, **search)
        froc_scans.append(r.pop("_froc"))
        for key, m in r.pop("_match").items():
            t = totals.setdefault(key, [0, 0, 0])
            t[0] += m.tp; t[1] += m.fp; t[2] += m.fn
        report["lidc"].append(r)
        log(f"{p}: {r['n_slices_searched']} slices, {r['n_slice_detections']} slice detections, "
            + "; ".join(f"thr {k} ({v['score_threshold']}): {v['n_detections']} det, TP {v['tp']} FP {v['fp']} FN {v['fn']}"
                        for k, v in r["thresholds"].items()) + f"; {r['seconds']['search_total']} s")
    report["lidc_total"] = {k: {kk: _r(vv) if isinstance(vv, float) else vv
                                for kk, vv in ev.precision_recall_f1(*t).items()} for k, t in totals.items()}
    f = ev.froc(froc_scans)
    report["froc"] = {"fp_rates": list(f.fp_rates), "sensitivities": [_r(s) for s in f.sensitivities], "cpm": _r(f.cpm),
                      "n_scans": f.n_scans, "n_nodules": f.n_nodules, "n_detected": f.n_detected,
                      "n_false_positives": f.n_false_positives, "n_ignored_duplicates": f.n_ignored_duplicates,
                      "n_ignored_excluded": f.n_ignored_excluded}
    boxes = _pet_boxes(d / "lung_pet_ct_dx_boxes.csv")
    for name in PET_SCANS:
        r = evaluate_pet(model, d / name, boxes.get(name, []), thresholds, device, **search)
        report["lung_pet_ct_dx"].append(r)
        log(f"{name}: " + "; ".join(f"thr {k}: tumour {'found' if v['tumour_found'] else 'MISSED'} "
                                     f"({v['boxes_found']}/{r['n_boxes']} boxes), {v['n_detections']} detections, "
                                     f"{v['n_other_detections']} elsewhere" for k, v in r["thresholds"].items())
            + f"; {r['seconds']['search_total']} s")
    return report


def summary_lines(report: dict) -> list[str]:
    """Human-readable summary of :func:`evaluate_whole_ct`'s report."""
    lines = [f"weights: {report.get('weights')}"]
    for k, v in report["lidc_total"].items():
        lines.append(f"LIDC 0003+0005 (>=3 readers, {v['tp'] + v['fn']} nodules), threshold {k}: "
                     f"P {v['precision']} R {v['recall']} F1 {v['f1']} (TP {v['tp']} FP {v['fp']} FN {v['fn']}); "
                     f"paper (LUNA16 subset0): P 0.80 R 0.62 F1 0.70")
    f = report["froc"]
    lines.append("FROC sensitivity at " + ", ".join(f"{r:g}" for r in f["fp_rates"]) + " FPs/scan: "
                 + ", ".join(str(s) for s in f["sensitivities"]) + f"; CPM {f['cpm']} "
                 f"({f['n_detected']}/{f['n_nodules']} nodules hit, {f['n_false_positives']} FPs on {f['n_scans']} scans)")
    for r in report["lung_pet_ct_dx"]:
        for k, v in r["thresholds"].items():
            lines.append(f"{r['scan']} threshold {k}: adenocarcinoma {'found' if v['tumour_found'] else 'missed'} "
                         f"({v['boxes_found']}/{r['n_boxes']} boxed slices), {v['n_detections']} detections, "
                         f"{v['n_other_detections']} elsewhere")
    return lines


def _threshold(text):
    from NoduleMTLLib.detection.infer import parse_threshold

    try:
        return parse_threshold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_detection", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--weights", type=Path, default=None, help="checkpoint (.pt) or .safetensors (default: shipped, verified)")
    g.add_argument("--random-init", action="store_true", help="randomly initialised network (plumbing check only)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default ../shared/data or $NODULEMTL_DATA)")
    ap.add_argument("--out", type=Path, default=None, help="report JSON (default runs/maskrcnn25d/eval_whole_ct.json)")
    ap.add_argument("--threshold", type=_threshold, action="append", default=None,
                    help="merge score threshold(s): 'adaptive' or a number (repeatable; default adaptive and 0.5)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--input-scale", type=float, default=1.0, help="network input scale (speed option; default 1)")
    return ap


def run(weights=None, random_init=False, data=None, out=None, thresholds=None, device="auto", threads=2,
        input_scale=1.0, log=print) -> dict:
    """Load the model, evaluate, write the JSON report; returns it."""
    import torch

    from NoduleMTLLib.device import resolve_device

    torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    model, wdesc, sha = load_model(weights, random_init, dev)
    t0 = time.perf_counter()
    rep = evaluate_whole_ct(model, data, tuple(thresholds or DEFAULT_THRESHOLDS), dev, log=log,
                            input_scale=float(input_scale))
    rep.update(weights=wdesc, sha256=sha, device=str(dev), threads=int(threads), seconds=round(time.perf_counter() - t0, 1))
    out = Path(out or REPO / "runs" / "maskrcnn25d" / "eval_whole_ct.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1) + "\n")
    for line in summary_lines(rep):
        log(line)
    log(f"-> {out}")
    return rep


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from NoduleMTLLib.registry import WeightsError

    try:
        run(a.weights, a.random_init, a.data, a.out, a.threshold, a.device, a.threads, a.input_scale)
    except (WeightsError, FileNotFoundError, ValueError) as e:
        print(f"evaluate_detection: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
