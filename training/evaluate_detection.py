"""Whole-scan evaluation of the nodule search ``maskrcnn25d`` on the real whole CTs.

    python -m training.evaluate_detection [--weights PATH | --random-init] [--data DIR]
                                          [--out JSON] [--threshold adaptive|0.x ...]
                                          [--scans all|val]
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
    :func:`training.detection_matching.match_nodules`), per threshold, summed over the
    scans;
  - FROC / CPM as LUNA16 (hit = candidate centre within the nodule radius; sensitivity at
    1/8 ... 8 FPs per scan; :func:`~training.detection_matching.froc`), candidates =
    the nodules merged with no score threshold (every slice detection the network
    returned, i.e. above the model's own ``box_score_thresh``);
  - per reference nodule: found (paper rule) at each threshold, best candidate score.
* **Lung-PET-CT-Dx A0001** (NRRD, 5 mm slices) and **A0002** (DICOM series, 8 mm), each
  with a biopsy-proven adenocarcinoma boxed on several slices
  (``lung_pet_ct_dx_boxes.csv``, pixel box, inclusive): per box, whether a detected
  nodule's *mask* has a voxel in the box on that slice, and the best 2D IoU of a nodule box
  covering that slice; per scan, the number of detections and how many touch no box.

With ``--scans val`` only the validation whole scans (:data:`VAL_SCANS`, from the
whole-scan cache) are evaluated: no test scan and no Lung-PET-CT-Dx scan is opened, so
checkpoints and recipes can be compared on validation before any test figure exists.

Only two LIDC scans with five counted nodules: the figures show whether the pipeline
works on whole scans and how many false positives it gives, they are no estimate of
sensitivity (say so wherever they are quoted).  Writes JSON (default
``runs/maskrcnn25d/eval_whole_ct.json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from NoduleMTLLib.models.registry import operating_points

REPO = Path(__file__).resolve().parents[1]
LIDC_SCANS = ("LIDC-IDRI-0003", "LIDC-IDRI-0005")
PET_SCANS = ("lung_pet_ct_dx_A0001.nrrd", "lung_pet_ct_dx_A0002_dicom")
#: Thresholds reported by default: the operating point ("default"), every candidate (the paper's
#: adaptive merge threshold), the README's high-sensitivity setting and 0.5.
HIGH_SENSITIVITY_THRESHOLD = operating_points()["high_sensitivity"]  # the manifest's, read at import
DEFAULT_THRESHOLDS = ("default", "adaptive", HIGH_SENSITIVITY_THRESHOLD, 0.5)
#: Validation whole scans (training/splits/lidc_wholescan_split.json, built into the cache by
#: ``nodulemtl-train wholescan``): reported separately, never mixed with the test scans.
VAL_SCANS = ("LIDC-IDRI-0004", "LIDC-IDRI-0007")


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

    from NoduleMTLLib.models.registry import DEFAULT_DETECTOR, build_network, load_weights_into, sha256_of

    if random_init:
        torch.manual_seed(0)
        model = build_network(DEFAULT_DETECTOR)
        return model.eval().to(device), "random-init (seed 0): plumbing only, no detection quality", None
    model = build_network(DEFAULT_DETECTOR)
    path = load_weights_into(model, weights, DEFAULT_DETECTOR)
    return model.eval().to(device), str(path), sha256_of(path)


def _r(v, nd=4):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


def _thr_key(t) -> str:
    return t if t in ("adaptive", "default") else f"{float(t):g}"


def _excluded_marks(folder: Path, ct) -> list:
    """Excluded single-point marks (``excluded.json`` of a cache scan) as 10 mm references."""
    from training import detection_matching as ev

    f = folder / "excluded.json"
    if not f.exists():
        return []
    return [ev.reference_from_centre(e["centre_lps"], 2 * e["radius_mm"], ct, nodule_id=-1 - i)
            for i, e in enumerate(json.loads(f.read_text())["excluded"])]


def slice_detections(ct, name: str, model, device="cpu", detections_cache=None, weights_sha=None, **search):
    """:func:`~NoduleMTLLib.detection.infer.run_slice_detections`, or the pickled result of an
    earlier run on the same scan with the same weights (sha256) and search options.

    The network pass is the slow part of the evaluation (minutes per scan on 2 CPU cores)
    and does not depend on the merge / FPR / outline / mass rules applied afterwards; with
    ``detections_cache`` (a folder of this tool's own pickles) it runs once per scan and
    weights.  Without ``weights_sha`` (random init) nothing is cached.

    Returns:
        (:class:`~NoduleMTLLib.detection.infer.SliceDetections`, True when read from the cache).
    """
    from NoduleMTLLib.detection.infer import run_slice_detections

    if detections_cache is None or weights_sha is None:
        return run_slice_detections(ct, model, device, **search), False
    key = hashlib.sha256(json.dumps({"weights": weights_sha, "search": search, "shape": list(ct.shape_zyx)},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    f = Path(detections_cache) / f"{name}.{key}.pkl"
    if f.exists():
        with open(f, "rb") as fh:
            return pickle.load(fh), True
    sd = run_slice_detections(ct, model, device, **search)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(sd, fh)
    tmp.replace(f)
    return sd, False


def evaluate_lidc(model, folder: Path, thresholds, device="cpu", fpr_model=None, click=None, cache_args=None,
                  mass_rule="shipped", **search) -> dict:
    """One whole LIDC scan: slice detections once, then matching per threshold and FROC candidates.

    Returns:
        JSON-ready dict (see module docstring) plus ``"_froc"``: the
        :class:`~training.detection_matching.FROCScan` and ``"_match"``: {threshold:
        :class:`~training.detection_matching.NoduleMatchResult`} (removed before writing).
    """
    from NoduleMTLLib.detection.infer import merge_detections, select_nodules
    from training import detection_matching as ev

    ct, refs = ev.load_lidc_whole_ct_references(folder)
    included, excluded = ev.split_references(refs)
    marks = _excluded_marks(folder, ct)
    excluded = excluded + marks
    any_reader = [r for r in refs if r.diameter_mm >= ev.LUNA16_MIN_DIAMETER_MM]
    t0 = time.perf_counter()
    sd, cached = slice_detections(ct, folder.name, model, device, **(cache_args or {}), **search)
    t_search = time.perf_counter() - t0
    out = {"scan": folder.name, "slice_detections_cached": cached,
           "shape_zyx": list(ct.shape_zyx), "spacing_mm": [round(v, 4) for v in ct.spacing],
           "n_slices_searched": len(sd.slices_searched), "n_slice_detections": len(sd.detections),
           "seconds": {k: round(v, 2) for k, v in {**sd.timing_s, "search_total": t_search}.items()},
           "references": [{"nodule": r.nodule_id, "n_readers": r.n_readers, "diameter_mm": round(r.diameter_mm, 1),
                           "centre_slice": r.centre_slice, "counted": r in included} for r in refs],
           "thresholds": {}, "_match": {}}
    out["n_excluded_marks"] = len(marks)
    for thr in thresholds:
        merged, nodules, cut = reported_nodules(sd, ct, thr, fpr_model, device, click, mass_rule)
        m = ev.match_nodules(nodules, included, excluded)
        found = {included[ri].nodule_id for _, ri in m.pairs}
        # single-reader nodules: found by the same rule, reported but not counted
        m_exc = ev.match_nodules(nodules, excluded) if excluded else None
        found_exc = {excluded[ri].nodule_id for _, ri in m_exc.pairs if excluded[ri].nodule_id > 0} if m_exc else set()
        out["thresholds"][_thr_key(thr)] = {
            "score_threshold": _r(cut), "n_detections": len(nodules),
            "tp": m.tp, "fp": m.fp, "fn": m.fn, "duplicates": m.duplicates, "ignored_on_excluded": m.ignored,
            "precision": _r(m.precision), "recall": _r(m.recall), "f1": _r(m.f1),
            "found": sorted(found | found_exc),
        }
        out["_match"][_thr_key(thr)] = m
    if fpr_model is None:
        allc = merge_detections(sd, ct, 0.0).nodules
    else:
        allc = select_nodules(sd, ct, "adaptive", fpr_model, device)[1]
    fs = ev.froc_scan_from_nodules(allc, included, excluded)
    out["_froc_any"] = ev.froc_scan_from_nodules(allc, any_reader, marks)
    out["n_candidates"] = len(allc)
    ranked = sorted(allc, key=lambda n: -n.score)
    best = {}
    for r in refs:
        d2 = ((np.asarray(fs.candidates_lps) - np.asarray(r.centre_lps)) ** 2).sum(1) if len(fs.scores) else np.zeros(0)
        hit = d2 < (r.diameter_mm / 2.0) ** 2
        best[r.nodule_id] = _r(float(fs.scores[hit].max())) if hit.any() else None
    for rr in out["references"]:
        rr["best_candidate_score_within_radius"] = best[rr["nodule"]]
        r = next(x for x in refs if x.nodule_id == rr["nodule"])
        hits = [i for i, n in enumerate(ranked)
                if float(np.sum((np.asarray(n.centre_lps) - np.asarray(r.centre_lps)) ** 2)) < (r.diameter_mm / 2.0) ** 2]
        rr["rank"] = hits[0] + 1 if hits else None  # 1 = the scan's highest-scoring candidate
        if hits:
            n = ranked[hits[0]]
            rr["candidate"] = {"score": _r(n.score), "detector_score": _r(n.detector_score if n.detector_score is not None else n.score),
                               "fp_reduction_score": None if n.fp_reduction_score is None else _r(n.fp_reduction_score)}
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


#: Margin (px) around an annotated Lung-PET-CT-Dx tumour box inside which a found nodule's
#: outline must lie (issue 27: >= 80 % inside the box + 10 px on every annotated slice).
BOX_MARGIN_PX = 10
#: Thresholds at which the reported nodules are outlined by the click network
#: (``infer.outline_with_click``, as ``nodulemtl analyze --detect`` does): the operating
#: point and the high-sensitivity setting; the others report the detector's masks (hundreds of
#: candidates: a click each would dominate the evaluation's time).
OUTLINE_THRESHOLDS = ("default", HIGH_SENSITIVITY_THRESHOLD)


def click_outliner(device="cpu"):
    """``click(ct, point_lps)`` of the default click network (``registry.DEFAULT_NETWORK``), as
    the CLI's detect path uses to outline found nodules; None when its weights are absent."""
    from NoduleMTLLib.core.io import InputError
    from NoduleMTLLib.inference.pipeline import Click2DNetwork, check_point
    from NoduleMTLLib.models.registry import DEFAULT_NETWORK, WeightsError, load_network

    try:
        net = Click2DNetwork(DEFAULT_NETWORK, load_network(DEFAULT_NETWORK, device), device)
    except WeightsError:
        return None

    def click(ct, point):
        try:
            check_point(ct, point)
        except InputError:
            return None
        return net.analyze_box(ct, point)

    return click


def reported_nodules(sd, ct, thr, fpr_model=None, device="cpu", click=None, mass_rule="shipped",
                     territory_ml="shipped", shapes=None, recentre_ml="shipped"):
    """(merge result, reported nodules, threshold) as ``nodulemtl analyze --detect`` reports them:
    :func:`~NoduleMTLLib.detection.infer.select_nodules`, then, at :data:`OUTLINE_THRESHOLDS`
    and with ``click``, the click outline of each nodule and its fragments folded
    (:func:`~NoduleMTLLib.detection.infer.outline_with_click`), with the size-aware acceptance of
    masses (``mass_rule``: "shipped" = ``infer.MASS_RULE``, None = off, or a ``MassRule``) and mass
    territories (``territory_ml``: "shipped" = ``infer.MASS_TERRITORY_ML``, None = off, or mL); ``shapes``:
    masses found by their shape (``infer.mass_shape_candidates``; None = ``infer.MASS_SHAPES``);
    ``recentre_ml``: large outlines clicked again at their deepest voxel ("shipped" =
    ``infer.RECENTRE_ML``, None = off, or mL)."""
    from NoduleMTLLib.detection.infer import (
        MASS_RULE,
        MASS_TERRITORY_ML,
        MAX_NODULES,
        RECENTRE_ML,
        below_cut_candidates,
        outline_with_click,
        select_nodules,
    )

    if mass_rule == "shipped":
        mass_rule = MASS_RULE
    if territory_ml == "shipped":
        territory_ml = MASS_TERRITORY_ML
    if recentre_ml == "shipped":
        recentre_ml = RECENTRE_ML
    merged, nodules, cut = select_nodules(sd, ct, thr, fpr_model, device)
    if click is not None and any(thr == t for t in OUTLINE_THRESHOLDS):
        masses = below_cut_candidates(sd, ct, merged, cut, fpr_model is not None, mass_rule, shapes)
        nodules = outline_with_click(nodules + masses, ct, click, max_kept=MAX_NODULES, cut=cut,
                                     mass_rule=mass_rule, lung=sd.lung,
                                     territory_ml=territory_ml, recentre_ml=recentre_ml)[0]
    return merged, nodules, cut


def inside_box_fraction(nod, k: int, box_ij, margin: int = BOX_MARGIN_PX) -> float | None:
    """Fraction of a nodule's mask pixels on slice k inside the inclusive pixel box
    (i0, j0, i1, j1) grown by ``margin`` px; None when the mask has no pixel on slice k."""
    if nod.mask is None:
        return None
    bi0, bj0, bk0, bi1, bj1, bk1 = nod.box_voxel
    if not bk0 <= k < bk1:
        return None
    m = nod.mask[k - bk0]
    n = int(m.sum())
    if n == 0:
        return None
    i0, j0, i1, j1 = box_ij
    i0, j0, i1, j1 = i0 - margin - bi0, j0 - margin - bj0, i1 + margin + 1 - bi0, j1 + margin + 1 - bj0
    inside = int(m[max(0, j0):max(0, j1), max(0, i0):max(0, i1)].sum())
    return inside / n


def evaluate_pet(model, path: Path, boxes: list[dict], thresholds, device="cpu", fpr_model=None, click=None,
                 cache_args=None, mass_rule="shipped", **search) -> dict:
    """One Lung-PET-CT-Dx scan: per tumour box found? (mask voxel in the box on its slice), the
    nodules overlapping the tumour, each one's inside-box fraction (+ :data:`BOX_MARGIN_PX`)
    on every annotated slice its outline touches, detections elsewhere."""
    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.detection.merge import box_iou_np

    ct = read_ct(path)
    t0 = time.perf_counter()
    sd, cached = slice_detections(ct, path.name, model, device, **(cache_args or {}), **search)
    t_search = time.perf_counter() - t0
    out = {"scan": path.name, "slice_detections_cached": cached,
           "shape_zyx": list(ct.shape_zyx), "spacing_mm": [round(v, 4) for v in ct.spacing],
           "thick_slices": sd.report.thick_slices, "n_slices_searched": len(sd.slices_searched),
           "n_slice_detections": len(sd.detections),
           "seconds": {k: round(v, 2) for k, v in {**sd.timing_s, "search_total": t_search}.items()},
           "n_boxes": len(boxes), "thresholds": {}}
    for thr in thresholds:
        _, nodules, cut = reported_nodules(sd, ct, thr, fpr_model, device, click, mass_rule)
        per_box = []
        touching = set()
        for b in boxes:
            k = b["k"]
            i0, j0, i1, j1 = b["box"]
            hit_mask, best_iou = False, 0.0
            for n, nod in enumerate(nodules):
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
        on_tumour = []
        for n in sorted(touching):
            nod = nodules[n]
            fr = {str(b["k"]): inside_box_fraction(nod, b["k"], b["box"]) for b in boxes}
            fr = {k: round(v, 3) for k, v in fr.items() if v is not None}
            on_tumour.append({"rank": n + 1, "score": _r(nod.score), "search_scale": nod.scale,
                              "fragments_absorbed": nod.absorbed, "accepted_as": nod.accepted_as,
                              "outline_features": nod.features, "inside_box_fraction": fr,
                              "min_inside_box_fraction": min(fr.values()) if fr else None})
        out["thresholds"][_thr_key(thr)] = {
            "score_threshold": _r(cut), "n_detections": len(nodules), "outlined_by_click": bool(
                click is not None and any(thr == t for t in OUTLINE_THRESHOLDS)),
            "n_detections_on_tumour": len(touching), "n_other_detections": len(nodules) - len(touching),
            "boxes_found": sum(p["found"] for p in per_box), "tumour_found": any(p["found"] for p in per_box),
            "found_as_one_nodule": len(touching) == 1, "nodules_on_tumour": on_tumour,
            "per_box": per_box,
        }
    return out


def _froc_json(f) -> dict:
    return {"fp_rates": list(f.fp_rates), "sensitivities": [_r(v) for v in f.sensitivities], "cpm": _r(f.cpm),
            "n_scans": f.n_scans, "n_nodules": f.n_nodules, "n_detected": f.n_detected,
            "n_false_positives": f.n_false_positives, "n_ignored_duplicates": f.n_ignored_duplicates,
            "n_ignored_excluded": f.n_ignored_excluded,
            "curve": {"fps_per_scan": [_r(v) for v in f.fps_per_scan], "sensitivity": [_r(v) for v in f.sensitivity]}}


def _lidc_group(model, folders, thresholds, device, fpr_model, log, click=None, cache_args=None, mass_rule="shipped",
                **search) -> dict:
    """Evaluate a group of whole LIDC scans; totals per threshold and FROC for both references."""
    from training import detection_matching as ev

    group = {"scans": [], "totals": {}, "froc": None, "froc_any_reader": None}
    froc_scans, froc_any, totals = [], [], {}
    for folder in folders:
        r = evaluate_lidc(model, folder, thresholds, device, fpr_model, click, cache_args, mass_rule, **search)
        froc_scans.append(r.pop("_froc"))
        froc_any.append(r.pop("_froc_any"))
        for key, m in r.pop("_match").items():
            t = totals.setdefault(key, [0, 0, 0])
            t[0] += m.tp; t[1] += m.fp; t[2] += m.fn
        group["scans"].append(r)
        log(f"{folder.name}: {r['n_slices_searched']} slices, {r['n_candidates']} candidates; "
            + "; ".join(f"thr {k} ({v['score_threshold']}): {v['n_detections']} det, TP {v['tp']} FP {v['fp']} FN {v['fn']}"
                        for k, v in r["thresholds"].items()) + f"; {r['seconds']['search_total']} s")
    group["totals"] = {k: {**{kk: _r(vv) if isinstance(vv, float) else vv for kk, vv in ev.precision_recall_f1(*t).items()},
                           "fp_per_scan": _r(t[1] / max(1, len(folders)))} for k, t in totals.items()}
    group["froc"] = _froc_json(ev.froc(froc_scans))
    group["froc_any_reader"] = _froc_json(ev.froc(froc_any))
    return group


def plot_froc(report: dict, path: Path) -> None:
    """FROC curves (>= 3-reader reference; test and validation scans) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for key, label in (("test", "test scans (LIDC-IDRI-0003, -0005)"), ("val", "validation scans (LIDC-IDRI-0004, -0007)")):
        g = report.get(key)
        if not g:
            continue
        f = g["froc"]
        ax.step(f["curve"]["fps_per_scan"], f["curve"]["sensitivity"], where="post",
                label=f"{label}: CPM {f['cpm']}, {f['n_nodules']} nodules")
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 8, 64)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity (nodules >= 3 mm, >= 3 readers)")
    ax.set_title(f"Find nodules FROC ({report.get('search_stages', '')})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def evaluate_whole_ct(model, data=None, thresholds=DEFAULT_THRESHOLDS, device="cpu", log=print, fpr_model=None,
                      cache=None, click=None, cache_args=None, mass_rule="shipped", scans: str = "all",
                      **search) -> dict:
    """Test scans, validation scans and the Lung-PET-CT-Dx tumours; see the module docstring.

    Args:
        model: the ``maskrcnn25d`` network (eval mode).
        data: data folder (default: :func:`data_dir`).
        thresholds: "default", "adaptive" and/or floats (:func:`~NoduleMTLLib.detection.infer.parse_threshold`).
        device: torch device.
        log: callable for progress lines.
        fpr_model: the second stage (``fpr25d``) or None (single-stage search).
        cache: whole-scan cache holding the validation scans (default
            :func:`training.wholescan.default_cache`); skipped with a note when absent.
        click: click outliner (:func:`click_outliner`) applied at :data:`OUTLINE_THRESHOLDS`, or None.
        cache_args: {"detections_cache": folder, "weights_sha": sha256} to reuse slice detections
            (:func:`slice_detections`), or None.
        mass_rule: "shipped" (``infer.MASS_RULE``), None (off) or a ``MassRule``
            (:func:`reported_nodules`).
        scans: "all" (test, validation and Lung-PET-CT-Dx scans) or "val" (the validation
            scans only; ``test`` is None and ``lung_pet_ct_dx`` empty: no test scan is read).
        **search: options of :func:`~NoduleMTLLib.detection.infer.run_slice_detections`.

    Returns:
        JSON-ready report: ``test`` and ``val`` groups (per scan: thresholds, references with
        rank and scores; totals; FROC for the >= 3-reader and the >= 1-reader reference), and
        ``lung_pet_ct_dx``; ``lidc_total`` / ``froc`` repeat the test group's (older readers).

    Raises:
        FileNotFoundError: a scan is missing (with ``scans="val"``: a validation scan absent
        from the cache); ValueError: an LIDC scan of a non-test patient, unknown ``scans``.
    """
    from training.wholescan import default_cache

    if scans not in ("all", "val"):
        raise ValueError(f"scans must be 'all' or 'val', got {scans!r}")
    if scans == "val":
        return _evaluate_val_only(model, thresholds, device, log, fpr_model, cache, click, cache_args, mass_rule, **search)

    d = data_dir(data) / "whole_ct"
    test = test_split_patients()
    for p in LIDC_SCANS:
        if p not in test:
            raise ValueError(f"{p} is not in the test split: its whole scan cannot be used to evaluate")
    report = {"protocol": "see training/evaluate_detection.py", "thresholds": [_thr_key(t) for t in thresholds],
              "search_stages": "maskrcnn25d + fpr25d" if fpr_model is not None else "maskrcnn25d only",
              "search": {k: v for k, v in search.items()}, "lung_pet_ct_dx": []}
    log("test scans:")
    report["test"] = _lidc_group(model, [d / "lidc" / p for p in LIDC_SCANS], thresholds, device, fpr_model, log, click,
                                 cache_args, mass_rule, **search)
    cache = Path(cache or default_cache())
    if all((cache / p / "ct.nrrd").exists() for p in VAL_SCANS):
        log("validation scans:")
        report["val"] = _lidc_group(model, [cache / p for p in VAL_SCANS], thresholds, device, fpr_model, log, click,
                                    cache_args, mass_rule, **search)
    else:
        report["val"] = None
        log(f"validation scans skipped: build them with nodulemtl-train wholescan (cache {cache})")
    report["lidc"] = report["test"]["scans"]
    report["lidc_total"] = report["test"]["totals"]
    report["froc"] = report["test"]["froc"]
    boxes = _pet_boxes(d / "lung_pet_ct_dx_boxes.csv")
    for name in PET_SCANS:
        r = evaluate_pet(model, d / name, boxes.get(name, []), thresholds, device, fpr_model, click, cache_args, mass_rule,
                         **search)
        report["lung_pet_ct_dx"].append(r)
        log(f"{name}: " + "; ".join(f"thr {k}: tumour {'found' if v['tumour_found'] else 'MISSED'} "
                                     f"({v['boxes_found']}/{r['n_boxes']} boxes), {v['n_detections']} detections, "
                                     f"{v['n_other_detections']} elsewhere" for k, v in r["thresholds"].items())
            + f"; {r['seconds']['search_total']} s")
    return report


def _evaluate_val_only(model, thresholds, device, log, fpr_model, cache, click, cache_args=None, mass_rule="shipped",
                       **search) -> dict:
    """:func:`evaluate_whole_ct` with ``scans="val"``: the validation group only."""
    from training.wholescan import default_cache

    cache = Path(cache or default_cache())
    missing = [p for p in VAL_SCANS if not (cache / p / "ct.nrrd").exists()]
    if missing:
        raise FileNotFoundError(f"validation scans {missing} not in the whole-scan cache {cache} (nodulemtl-train wholescan)")
    report = {"protocol": "see training/evaluate_detection.py", "scans": "val", "thresholds": [_thr_key(t) for t in thresholds],
              "search_stages": "maskrcnn25d + fpr25d" if fpr_model is not None else "maskrcnn25d only",
              "search": {k: v for k, v in search.items()}, "lung_pet_ct_dx": [], "test": None}
    log("validation scans:")
    report["val"] = _lidc_group(model, [cache / p for p in VAL_SCANS], thresholds, device, fpr_model, log, click,
                                cache_args, mass_rule, **search)
    return report


def summary_lines(report: dict) -> list[str]:
    """Human-readable summary of :func:`evaluate_whole_ct`'s report."""
    lines = [f"weights: {report.get('weights')}; fpr: {report.get('fpr_weights')}; search: {report.get('search_stages')}"]
    for key, name in (("test", "test LIDC-IDRI-0003+0005"), ("val", "val LIDC-IDRI-0004+0007")):
        g = report.get(key)
        if not g:
            continue
        for k, v in g["totals"].items():
            lines.append(f"{name} (>=3 readers, {v['tp'] + v['fn']} nodules), threshold {k}: "
                         f"P {v['precision']} R {v['recall']} F1 {v['f1']} (TP {v['tp']} FP {v['fp']} FN {v['fn']}; "
                         f"{v['fp_per_scan']} FP/scan); paper (LUNA16 subset0): P 0.80 R 0.62 F1 0.70")
        for fk, ref in (("froc", ">=3 readers"), ("froc_any_reader", ">=1 reader")):
            f = g[fk]
            lines.append(f"{name} FROC ({ref}) sensitivity at " + ", ".join(f"{r:g}" for r in f["fp_rates"]) + " FPs/scan: "
                         + ", ".join(str(s) for s in f["sensitivities"]) + f"; CPM {f['cpm']} "
                         f"({f['n_detected']}/{f['n_nodules']} nodules hit, {f['n_false_positives']} FPs on {f['n_scans']} scans)")
        for sc in g["scans"]:
            for rr in sc["references"]:
                lines.append(f"  {sc['scan']} nodule {rr['nodule']} ({rr['n_readers']} readers, {rr['diameter_mm']} mm): "
                             f"rank {rr.get('rank')}, {rr.get('candidate')}")
    for r in report["lung_pet_ct_dx"]:
        for k, v in r["thresholds"].items():
            inside = [t.get("min_inside_box_fraction") for t in v.get("nodules_on_tumour", [])]
            lines.append(f"{r['scan']} threshold {k}: adenocarcinoma {'found' if v['tumour_found'] else 'missed'} "
                         f"({v['boxes_found']}/{r['n_boxes']} boxed slices) by {v['n_detections_on_tumour']} nodule(s), "
                         f"min inside-box fraction (+{BOX_MARGIN_PX} px) per nodule {inside}; "
                         f"{v['n_detections']} detections, {v['n_other_detections']} elsewhere")
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
                    help="score threshold(s): 'default', 'adaptive' or a number (repeatable; default: "
                         "default, adaptive, the high-sensitivity setting and 0.5)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--input-scale", type=float, default=1.0, help="network input scale (speed option; default 1)")
    ap.add_argument("--fpr-weights", type=Path, default=None, help="fpr25d checkpoint/.safetensors (default: the installed one)")
    ap.add_argument("--no-fpr", action="store_true", help="single-stage search (no false-positive reduction)")
    ap.add_argument("--cache", type=Path, default=None, help="whole-scan cache with the validation scans")
    ap.add_argument("--no-outline", action="store_true", help="report the detector's masks (no click outlines)")
    ap.add_argument("--coarse", nargs="*", type=float, default=None, metavar="FACTOR",
                    help="multi-scale search: add coarse passes shrunk by these factors (no factor: 2; "
                         "default: infer.COARSE_FACTORS)")
    pm = ap.add_mutually_exclusive_group()
    pm.add_argument("--pleural-masses", dest="pleural_masses", action="store_true", default=None,
                    help="put pleural masses back into the detector's input mask (default: infer.PLEURAL_MASSES)")
    pm.add_argument("--no-pleural-masses", dest="pleural_masses", action="store_false",
                    help="the lung mask alone as the detector's input mask")
    ap.add_argument("--no-mass-rule", action="store_true",
                    help="report only candidates at or above the threshold (no size-aware acceptance of masses)")
    ap.add_argument("--detections-cache", type=Path, default=None,
                    help="folder for this tool's pickled slice detections: the network runs once per scan and weights")
    ap.add_argument("--scans", choices=["all", "val"], default="all",
                    help="all: test, validation and Lung-PET-CT-Dx scans; val: the validation whole scans only "
                         "(LIDC-IDRI-0004/-0007 from the cache; no test scan is read)")
    return ap


def coarse_factors_option(coarse) -> tuple[float, ...] | None:
    """The multi-scale search's coarse factors from :func:`run`'s ``coarse``: True or ``[]``
    (``--coarse`` alone) -> (2.0,); a sequence of factors -> those; None / False -> None
    (``infer.COARSE_FACTORS``, the library's default, applies)."""
    if coarse is None or coarse is False:
        return None
    if coarse is True or len(coarse) == 0:
        return (2.0,)
    return tuple(float(f) for f in coarse)


def load_fpr_model(weights: Path | None, device="cpu"):
    """The fpr25d network: from ``weights`` (either variant, :class:`FPR25D` ``context``) or the
    installed file (None when neither exists)."""
    from NoduleMTLLib.detection.infer import load_fpr
    from NoduleMTLLib.models.networks.fpr25d import fpr_for_state_dict
    from NoduleMTLLib.models.registry import WeightsError, read_state_dict

    if weights is None:
        return load_fpr(device)
    sd = read_state_dict(Path(weights))  # either variant: its keys say which
    m = fpr_for_state_dict(sd)
    try:
        m.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"Weights file {weights} does not match the network: {str(e).splitlines()[0]}") from None
    return m.eval().to(device)


def run(weights=None, random_init=False, data=None, out=None, thresholds=None, device="auto", threads=2,
        input_scale=1.0, log=print, fpr_weights=None, no_fpr=False, cache=None, no_outline=False,
        coarse=False, mass_rule=True, detections_cache=None, scans="all", pleural_masses=None) -> dict:
    """Load the model, evaluate, write the JSON report; returns it.  ``no_outline``: keep the
    detector's masks (no click outlines); ``coarse``: the coarse passes of the multi-scale
    search (:func:`coarse_factors_option`); ``mass_rule``: the size-aware acceptance of
    masses (``infer.MASS_RULE``; False = off); ``detections_cache``: reuse slice detections
    (:func:`slice_detections`); ``scans``: "all" or "val" (the validation whole scans only,
    :func:`evaluate_whole_ct`); ``pleural_masses``: put pleural masses back into the detector's
    input mask (``preprocess.add_pleural_masses``; None: ``infer.PLEURAL_MASSES``)."""
    import torch

    from NoduleMTLLib.core.device import resolve_device
    from NoduleMTLLib.models.registry import DEFAULT_DETECTOR

    torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    model, wdesc, sha = load_model(weights, random_init, dev)
    fpr = None if no_fpr else load_fpr_model(fpr_weights, dev)
    t0 = time.perf_counter()
    click = None if no_outline else click_outliner(dev)
    search = {"input_scale": float(input_scale)}
    factors = coarse_factors_option(coarse)
    if factors is not None:
        search["coarse_factors"] = factors
    from NoduleMTLLib.detection.infer import PLEURAL_MASSES

    pm = PLEURAL_MASSES if pleural_masses is None else bool(pleural_masses)
    if pm or PLEURAL_MASSES:  # absent (the cache key of the searches before it) when off and off by default
        search["pleural_masses"] = pm
    cache_args = None if detections_cache is None else {"detections_cache": detections_cache, "weights_sha": sha}
    rep = evaluate_whole_ct(model, data, tuple(thresholds or DEFAULT_THRESHOLDS), dev, log=log, fpr_model=fpr,
                            cache=cache, click=click, cache_args=cache_args, scans=scans,
                            mass_rule="shipped" if mass_rule else None, **search)
    if mass_rule and click is not None and fpr is not None:
        from NoduleMTLLib.detection.infer import MASS_RULE
        rep["mass_rule"] = {k: getattr(MASS_RULE, k) for k in ("min_score", "min_volume_ml", "min_mean_hu",
                                                                "min_lung_share")}
    else:
        rep["mass_rule"] = None
    rep["outlines"] = "click network at each reported nodule's centre" if click is not None else "detector masks"
    fdesc = None
    if fpr is not None:
        from NoduleMTLLib.models.registry import DEFAULT_FP_REDUCER, find_weights, sha256_of
        fpath = Path(fpr_weights) if fpr_weights else find_weights(DEFAULT_FP_REDUCER)
        fdesc = {"file": str(fpath), "sha256": sha256_of(fpath)}
    rep.update(weights=wdesc, sha256=sha, fpr_weights=fdesc, device=str(dev), threads=int(threads),
               seconds=round(time.perf_counter() - t0, 1))
    out = Path(out or REPO / "runs" / DEFAULT_DETECTOR / "eval_whole_ct.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1) + "\n")
    plot_froc(rep, out.with_suffix(".froc.png"))
    for line in summary_lines(rep):
        log(line)
    log(f"-> {out}")
    return rep


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from NoduleMTLLib.models.registry import WeightsError

    try:
        run(a.weights, a.random_init, a.data, a.out, a.threshold, a.device, a.threads, a.input_scale,
            fpr_weights=a.fpr_weights, no_fpr=a.no_fpr, cache=a.cache, no_outline=a.no_outline,
            coarse=a.coarse, mass_rule=not a.no_mass_rule, detections_cache=a.detections_cache, scans=a.scans,
            pleural_masses=a.pleural_masses)
    except (WeightsError, FileNotFoundError, ValueError) as e:
        print(f"evaluate_detection: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
