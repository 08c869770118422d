"""Inserted small nodules: how the two-stage search ranks them (issue 27).

    python -m training.small_insertion [--per-scan 10] [--seed 0] [--out FILE] [--scans ...]

The six non-test whole scans hold only six nodules marked by >= 3 readers, too few to judge a
change of the combined score's ranking for small nodules.  This module makes more positives and
keeps the false-positive side real:

* Positives: ``lidc_vois`` nodules of 3-10 mm (``labels.csv`` ``diameter_mm``, any texture) of the
  click split's VALIDATION patients (``training/splits/lidc_patient_split.json``, role val; neither
  ``maskrcnn25d`` nor ``fpr25d`` trained on them), minus the whole-scan val / test / reserved
  patients (:func:`validation_patients`).  Each is pasted unscaled (random in-plane rotation and
  flips; :func:`training.insertion.transform_voi`, :func:`training.insertion.paste_nodule`) at a
  place from :func:`training.insertion.sample_centre` (free / juxtapleural / juxtavascular, drawn
  uniformly) in one of the six non-test whole scans (:func:`check_hosts` refuses the others), at
  least :data:`MIN_GAP_MM` from every labelled voxel of the scan's own nodules and from the other
  nodules pasted into that scan, with at least half its mask in the lung mask.
* Each nodule is pasted alone into a copy of the slab made of its slices +- :data:`SLAB_MARGIN`
  (the 2.5D stack reads k-2..k+2, so the nodule's slices +- 5 are searched with full stacks).
  The search runs on the slab as shipped (``run_slice_detections`` with the shipped options; the
  lung mask computed by ``preprocess.lung_mask_from_ct`` on the whole scan with the nodule pasted,
  as the whole-scan search computes it, then cut to the slab), merges at the whole scan's candidate threshold (the threshold the
  candidate cache recorded for the host scan with ``fpr25d.CANDIDATE_THRESHOLD``; the adaptive
  threshold is a whole-scan statistic) and rescores with the shipped ``fpr25d``
  (``infer.rescore_with_fpr``).  A candidate hits the pasted nodule when its centre lies within
  max(diameter / 2, :data:`MIN_RADIUS_MM`) of the pasted mask's centroid (LUNA16 rule,
  :func:`hit_index`); the nodule's figures are those of its hitting candidate with the best
  combined score (none: a miss).  The same candidates are also scored with ``fpr25d`` averaged
  over the slab mirrored left-right and front-back (``fpr_tta``; information only).
* The false-positive side is the real one (:func:`real_scans`): the six scans' cached candidates
  (``$NODULEMTL_CACHE/wholescan/candidates``), the four training scans with the out-of-fold
  ``fpr25d`` of ``fp_reduction cv`` (``--cv-run``, ``cv_scores/*.json``), the two validation scans
  with the shipped ``fpr25d``, pooled as ``fp_reduction select`` pools them.  The thresholds at
  which the pooled real FPs per scan are 1/8 ... 8 (``fp_reduction.select_threshold``) give a
  "synthetic FROC": the share of inserted nodules at or above each threshold.

Caveats: a pasted VOI carries its own crop's background (the crop is the mask's box + 3 px,
blended over ~1 mm); six host scans only, four of which the detector trained on (in-sample
backgrounds); image-domain pasting (no projection-domain noise model).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

#: Diameter range (mm, ``labels.csv``) of the pasted VOIs.
DIAMETER_MM = (3.0, 10.0)
#: Minimum distance (mm) of a pasted nodule's centre from the scan's labelled nodules and from the
#: other nodules pasted into the same scan.
MIN_GAP_MM = 30.0
#: Slices kept on each side of the nodule's slices in the searched slab (5 searched + 2 of stack).
SLAB_MARGIN = 7
#: Minimum hit radius (mm) of the LUNA16 rule for the smallest nodules.
MIN_RADIUS_MM = 2.5
#: Real FPs per scan of the synthetic FROC.
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def shipped_points() -> dict[str, float]:
    """The manifest's operating points (combined score), keyed "default_<t>" and
    "high_sensitivity_<t>" (read at call time: reports name the points they used)."""
    from NoduleMTLLib.models.registry import operating_points

    p = operating_points()
    return {f"default_{p['default']:.4f}": p["default"], f"high_sensitivity_{p['high_sensitivity']:.4f}": p["high_sensitivity"]}

SIZE_BINS = {"3-6 mm": (3.0, 6.0), "6-10 mm": (6.0, 10.0 + 1e-9)}
HOSTS = ("LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010", "LIDC-IDRI-0004", "LIDC-IDRI-0007")
DEFAULT_CV_RUN = Path("/work/runs/fpr25d_cv")


def banned_scans() -> set[str]:
    """Whole scans never used as hosts: the whole-scan test split and the reserved patients."""
    from training.wholescan import RESERVED
    from training.wholescan import load_split as scan_split

    return set(RESERVED) | set(scan_split().get("test", []))


def validation_patients() -> set[str]:
    """Patients whose VOIs are pasted: the click split's val patients minus the whole-scan split's
    val / test patients and the reserved ones."""
    from training.data import load_split as click_split
    from training.wholescan import RESERVED
    from training.wholescan import load_split as scan_split

    ws = scan_split()
    return set(click_split()["val"]) - set(RESERVED) - set(ws.get("val", [])) - set(ws.get("test", []))


def check_hosts(scans) -> None:
    """Raise ValueError when a host scan is a test or reserved scan (before anything is read)."""
    bad = sorted(set(scans) & banned_scans())
    if bad:
        raise ValueError(f"{bad} are test / reserved scans: no nodule is pasted into them")


def check_vois(vois) -> None:
    """Raise ValueError when a VOI is not of a validation patient (:func:`validation_patients`)."""
    allowed = validation_patients()
    bad = sorted({v.patient for v in vois} - allowed)
    if bad:
        raise ValueError(f"{bad[:5]} are not validation patients of the click split: their nodules are not pasted here")


def load_validation_vois(data_root=None, patients=None, limit: int | None = None) -> list:
    """``lidc_vois`` nodules of :data:`DIAMETER_MM` of validation patients
    (list of :class:`training.insertion.VOI`, ``labels.csv`` order).

    Raises:
        ValueError: a requested patient outside :func:`validation_patients` (before any file is read).
    """
    from training import insertion as ins

    allowed = validation_patients()
    patients = allowed if patients is None else set(patients)
    bad = sorted(set(patients) - allowed)
    if bad:
        raise ValueError(f"{bad[:5]} are not validation patients of the click split: their nodules are not pasted here")
    vois = ins._read_vois(data_root, patients, DIAMETER_MM[0], DIAMETER_MM[1], limit)
    check_vois(vois)
    return vois


def textures(data_root=None) -> dict:
    """(patient, nodule_id) -> ``labels.csv`` Texture (e.g. "Solid", "Part Solid/(Mixed)")."""
    from training.insertion import default_data_root

    with open(Path(data_root or default_data_root()) / "lidc_vois" / "labels.csv", newline="") as fh:
        return {(r["patient_id"], int(r["nodule_id"])): r["Texture"] for r in csv.DictReader(fh)}


def hit_index(centres_ijk, spacing_xyz, nodule_ijk, radius_mm: float) -> list[int]:
    """Indices of candidates hitting a nodule (LUNA16: centre within ``radius_mm`` of its centre).

    Args:
        centres_ijk: (N, 3) continuous voxel indices (i, j, k) of the candidates.
        spacing_xyz: voxel size (x, y, z) mm.
        nodule_ijk: (i, j, k) of the nodule's centre.
        radius_mm: hit radius (mm).

    Returns:
        list of candidate indices.
    """
    c = np.asarray(centres_ijk, float).reshape(-1, 3)
    if not len(c):
        return []
    d = np.linalg.norm((c - np.asarray(nodule_ijk, float)) * np.asarray(spacing_xyz, float), axis=1)
    return [int(i) for i in np.flatnonzero(d <= radius_mm)]


def place_nodules(ct, lung: np.ndarray, labels: np.ndarray, vois: list, n: int, rng: np.random.Generator,
                  tries: int = 60) -> list[dict]:
    """Draw ``n`` placements in one whole scan (module docstring); each is pasted later into its own slab.

    Returns:
        list of dicts: "nodule" (:class:`training.insertion.Nodule`), "voi", "kind", "centre_zyx"
        (index where the nodule grid's centre goes), "centre_mm" (z, y, x mm of the pasted mask's
        centroid); fewer than ``n`` when no place is found.
    """
    from scipy import ndimage as ndi

    from training import insertion as ins

    sx, sy, sz = ct.spacing
    sp = np.array([sz, sy, sx])
    far = ndi.distance_transform_edt(labels == 0, sampling=sp) >= MIN_GAP_MM if (labels > 0).any() else None
    area = lung.reshape(len(lung), -1).sum(1)
    out, order = [], list(rng.permutation(len(vois)))
    for _ in range(n):
        for _ in range(tries):
            if not order:
                order = list(rng.permutation(len(vois)))
            v = vois[order.pop()]
            kind = ins.KINDS[int(rng.integers(len(ins.KINDS)))]
            try:
                nod = ins.transform_voi(v, (sz, sy, sx), 1.0, float(rng.uniform(0, 360)),
                                        tuple(bool(f) for f in rng.random(3) < 0.5))
            except ins.InsertionError:
                continue
            zz, yy, xx = np.nonzero(nod.mask)
            hz = (int(zz.max()) - int(zz.min())) // 2 + 1
            radius = 0.5 * max(np.ptp(yy) + 1, np.ptp(xx) + 1) * sy
            ks = np.flatnonzero(area > 0.3 * area.max())
            ks = ks[(ks > hz + SLAB_MARGIN) & (ks < len(lung) - hz - SLAB_MARGIN)]
            if not len(ks):
                continue
            k = int(ks[rng.integers(len(ks))])
            ji = ins.sample_centre(lung[k], np.asarray(ct.array[k]), (sy, sx), radius, kind, rng)
            if ji is None:
                continue
            mz, my, mx = (int(round(a.mean())) for a in np.nonzero(nod.mask))
            cz, cy, cx = nod.centre
            centre = (k + cz - mz, ji[0] + cy - my, ji[1] + cx - mx)
            ov = ins._overlap(lung.shape, nod.mask.shape, centre)
            if ov is None:
                continue
            vs, ns = ov
            m = nod.mask[ns]
            if not m.any() or lung[vs][m].mean() < 0.5:
                continue
            if far is not None and not far[vs][m].all():
                continue
            cmm = np.array([k, ji[0], ji[1]], float) * sp
            if any(np.linalg.norm(cmm - o["centre_mm"]) < MIN_GAP_MM for o in out):
                continue
            out.append({"nodule": nod, "voi": v, "kind": kind, "centre_zyx": centre, "centre_mm": cmm})
            break
    return out


def slab_ct(ct, hu: np.ndarray, z0: int, name: str):
    """A :class:`~NoduleMTLLib.core.io.CTVolume` of ``hu`` (float32 (z, y, x)) = slices z0.. of ``ct``."""
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import CTVolume

    img = sitk.GetImageFromArray(np.ascontiguousarray(hu, np.float32))
    img.SetSpacing(ct.spacing)
    img.SetDirection(ct.image.GetDirection())
    img.SetOrigin(ct.image.TransformIndexToPhysicalPoint([0, 0, int(z0)]))
    return CTVolume(img, source=name)


def mirrored_fpr(model, hu: np.ndarray, spacing_xyz, items) -> np.ndarray:
    """``fpr25d`` averaged over the volume as is, mirrored left-right and mirrored front-back
    (also used by ``training/reports/maskrcnn25d/issue27/combine/combine_variants.py``); float64 (N,)."""
    from NoduleMTLLib.models.networks.fpr25d import score_candidates

    _, ny, nx = hu.shape
    ps = [score_candidates(model, hu, spacing_xyz, items),
          score_candidates(model, np.ascontiguousarray(hu[:, :, ::-1]), spacing_xyz,
                           [((nx - 1 - i, j, k), s) for (i, j, k), s in items]),
          score_candidates(model, np.ascontiguousarray(hu[:, ::-1, :]), spacing_xyz,
                           [((i, ny - 1 - j, k), s) for (i, j, k), s in items])]
    return np.mean(ps, axis=0)


def search_slab(ct, p: dict, lung: np.ndarray, thr: float, model, fpr, name: str) -> dict:
    """Paste one placement into its slab, run the search there and score the pasted nodule (module docstring)."""
    import torch

    from NoduleMTLLib.detection import preprocess as pp
    from NoduleMTLLib.detection.infer import merge_detections, rescore_with_fpr, run_slice_detections
    from NoduleMTLLib.models.networks.fpr25d import combined_score
    from training import insertion as ins

    nod, v = p["nodule"], p["voi"]
    mask_full_z = np.nonzero(nod.mask.any((1, 2)))[0]
    cz = nod.centre[0]
    k_lo = p["centre_zyx"][0] + int(mask_full_z.min()) - cz
    k_hi = p["centre_zyx"][0] + int(mask_full_z.max()) - cz
    z0, z1 = max(0, k_lo - SLAB_MARGIN), min(ct.shape_zyx[0], k_hi + SLAB_MARGIN + 1)
    full = np.asarray(ct.array, np.float32).copy()
    pm = ins.paste_nodule(full, nod, p["centre_zyx"], lung)[z0:z1]
    # the lung mask as the search computes it: on the whole scan (with the nodule pasted), cut to the slab
    whole = pp.lung_mask_from_ct(slab_ct(ct, full, 0, f"{name}+small"))
    slab_lung = pp.LungMask(np.ascontiguousarray(whole.labels[z0:z1]), whole.spacing_zyx, whole.volumes_ml,
                            whole.n_lungs)
    sct = slab_ct(ct, full[z0:z1], z0, f"{name}+small")
    del full, whole
    sx, sy, sz = ct.spacing
    kk, jj, ii = (a.mean() for a in np.nonzero(pm))
    vol_mm3 = float(pm.sum()) * sx * sy * sz
    d_eq = float((6.0 * vol_mm3 / np.pi) ** (1.0 / 3.0))
    radius = max(v.diameter_mm / 2.0, MIN_RADIUS_MM)
    with torch.inference_mode():
        sd = run_slice_detections(sct, model, "cpu", lung=slab_lung)
    merged = merge_detections(sd, sct, thr)
    cands = merged.nodules
    rec = {"lung_share": round(float(slab_lung.mask[pm].mean()), 3), "pasted_eq_diameter_mm": round(d_eq, 2),
           "slab_z0": int(z0), "slab_slices": int(z1 - z0), "n_candidates": len(cands)}
    if cands:  # diagnostics: the nearest candidate of any score, whether or not it hits
        dist = np.linalg.norm((np.array([n.centre_ijk for n in cands], float) - (ii, jj, kk)) * np.asarray(ct.spacing),
                              axis=1)
        rec["nearest_candidate_mm"] = round(float(dist.min()), 2)
        rec["nearest_candidate_score"] = round(float(cands[int(dist.argmin())].score), 4)
    hits = hit_index([n.centre_ijk for n in cands], ct.spacing, (ii, jj, kk), radius)
    if not hits:
        return {**rec, "hit": False, "score": None, "fpr": None, "combined": None, "fpr_tta": None,
                "combined_tta": None}
    hc = [cands[i] for i in hits]
    items = [(n.centre_ijk, (n.slices[0], n.slices[-1])) for n in hc]
    tta = mirrored_fpr(fpr, sct.array, sct.spacing, items)
    rescore_with_fpr(hc, sct, fpr, "cpu")
    b = max(range(len(hc)), key=lambda i: hc[i].score)
    bt = max(range(len(hc)), key=lambda i: combined_score(hc[i].detector_score, tta[i]))
    return {**rec, "hit": True, "n_hits": len(hc), "score": round(float(hc[b].detector_score), 4),
            "fpr": round(float(hc[b].fp_reduction_score), 4), "combined": round(float(hc[b].score), 4),
            "fpr_tta": round(float(tta[bt]), 4),
            "combined_tta": round(combined_score(hc[bt].detector_score, tta[bt]), 4)}


def real_scans(cache: Path, cv_run: Path, tta: bool = True, candidates_cache: Path | None = None) -> list[dict]:
    """The six scans' real candidates with ``combined`` (and ``combined_tta``) scores, pooled as
    ``fp_reduction select`` pools them (module docstring).  ``candidates_cache``: another
    detector's candidates (``training.candidates --cache DIR --weights W``); its training scans
    are then scored by the ``cv_run`` fold models instead of read from ``cv_run/cv_scores``."""
    import SimpleITK as sitk

    from NoduleMTLLib.detection.infer import load_fpr
    from NoduleMTLLib.models.networks.fpr25d import combined_score, score_candidates
    from training.fp_reduction import load_trained
    from training.wholescan import load_split as scan_split

    ws = scan_split()
    scans = []

    def _score(model, name, c, have_plain):
        img = sitk.ReadImage(str(cache / name / "ct.nrrd"))
        vol = sitk.GetArrayFromImage(img)
        items = [(cd["centre_ijk"], cd["slices"]) for cd in c["candidates"]]
        if not have_plain:
            for cd, f in zip(c["candidates"], score_candidates(model, vol, img.GetSpacing(), items)):
                cd["fpr"], cd["combined"] = float(f), combined_score(cd["score"], f)
        if tta:
            for cd, g in zip(c["candidates"], mirrored_fpr(model, vol, img.GetSpacing(), items)):
                cd["combined_tta"] = combined_score(cd["score"], g)

    shipped = load_fpr("cpu")
    cc = Path(candidates_cache) if candidates_cache else cache
    for name in ws["val"]:
        c = json.loads((cc / "candidates" / f"{name}.json").read_text())
        _score(shipped, name, c, False)
        scans.append(c)
    for name in ws["train"]:
        fold = cv_run / f"cv_{name}"
        # another detector's candidates are scored by the fold model here (out of fold, as
        # fp_reduction.rescored_out_of_fold does); the shipped one's come scored in cv_scores
        src = cc / "candidates" if candidates_cache else cv_run / "cv_scores"
        c = json.loads((src / f"{name}.json").read_text())
        if tta or candidates_cache:
            _score(load_trained(fold / "best.pt", fold / "config.json"), name, c, not candidates_cache)
        scans.append(c)
    return scans


def summarise(nodules: list[dict], scans: list[dict], key: str = "combined") -> dict:
    """Shares of inserted nodules at or above the shipped operating points and the synthetic FROC
    for score field ``key`` ("combined" or "combined_tta"), overall and by size, placement and
    texture ("any_candidate": a hitting candidate at the merge threshold)."""
    from training.fp_reduction import select_threshold
    from training.metric_noise import wilson

    pooled = [{**s, "candidates": [{**cd, "combined": cd[key]} for cd in s["candidates"]]} for s in scans]
    pts = {f"{r:g} FP/scan": select_threshold(pooled, r) for r in FP_RATES}
    shipped = shipped_points()
    thr = {**shipped, **{k: v["threshold"] for k, v in pts.items()}}

    def share(sub):
        if not sub:
            return {"n": 0}
        out = {"n": len(sub), "any_candidate": round(sum(x["hit"] for x in sub) / len(sub), 3)}
        for k, t in thr.items():
            n_at = sum(1 for x in sub if x["hit"] and x[key] >= t)
            out[k] = round(n_at / len(sub), 3)
            if k in shipped:
                out[f"{k} wilson95"] = [round(v, 3) for v in wilson(n_at, len(sub))]
        return out

    groups = {"all": nodules}
    for b, (lo, hi) in SIZE_BINS.items():
        groups[b] = [x for x in nodules if lo <= x["diameter_mm"] < hi]
    for kind in ("free", "juxtapleural", "juxtavascular"):
        groups[kind] = [x for x in nodules if x["kind"] == kind]
    groups["texture Solid"] = [x for x in nodules if x["texture"] == "Solid"]
    groups["texture not Solid"] = [x for x in nodules if x["texture"] != "Solid"]
    return {"thresholds": thr, "real_fp_per_scan": {k: round(v.get("fp_per_scan", 0.0), 3) for k, v in pts.items()},
            "sensitivity": {g: share(v) for g, v in groups.items()}}


def evaluate(scans=HOSTS, per_scan: int = 10, seed: int = 0, cache=None, cv_run: Path = DEFAULT_CV_RUN,
             log=print, weights: Path | None = None, candidates_cache: Path | None = None, threads: int = 1) -> dict:
    """Paste, search, score and summarise (module docstring).  ``weights``: another detector
    (checkpoint or safetensors; default the shipped one), with ``candidates_cache`` holding its
    candidates of the six scans (the real false-positive side, :func:`real_scans`).

    Raises:
        ValueError: a test / reserved host scan, or a VOI of a non-validation patient.
    """
    import SimpleITK as sitk
    import torch

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.detection import preprocess as pp
    from NoduleMTLLib.detection.infer import load_detector, load_fpr
    from training.wholescan import default_cache

    check_hosts(scans)
    if weights is not None and candidates_cache is None:
        raise ValueError("another detector's weights need its candidates too (candidates_cache)")
    torch.set_num_threads(threads)
    cache = Path(cache or default_cache())
    vois = load_validation_vois()
    tex = textures()
    if weights is None:
        model = load_detector("cpu")
    else:
        from training.evaluate_detection import load_model

        model = load_model(Path(weights))[0]
    fpr = load_fpr("cpu")
    rng = np.random.default_rng(seed)
    out = {"protocol": "training/small_insertion.py", "seed": seed, "per_scan": per_scan, "n_vois": len(vois),
           "n_voi_patients": len({v.patient for v in vois}), "hosts": list(scans), "nodules": []}
    for name in scans:
        ct = read_ct(cache / name / "ct.nrrd")
        thr = float(json.loads((cache / "candidates" / f"{name}.json").read_text())["score_threshold"])
        lung = pp.lung_mask_from_ct(ct).mask
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cache / name / "nodules_labels.nrrd")))
        for p in place_nodules(ct, lung, labels, vois, per_scan, rng):
            t0 = time.perf_counter()
            v = p["voi"]
            rec = {"scan": name, "voi": f"{v.patient}_{v.nodule_id}", "diameter_mm": round(v.diameter_mm, 2),
                   "texture": tex.get((v.patient, v.nodule_id)), "kind": p["kind"], "merge_threshold": thr,
                   **{k: p["nodule"].source[k] for k in ("angle_deg", "flips")}}
            rec.update(search_slab(ct, p, lung, thr, model, fpr, name))
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            out["nodules"].append(rec)
            log(json.dumps(rec), flush=True)
    if weights is not None:
        out["weights"] = str(weights)
    real = real_scans(cache, cv_run, candidates_cache=candidates_cache)
    out["shipped"] = summarise(out["nodules"], real, "combined")
    out["fpr_mirror_average_info_only"] = summarise(out["nodules"], real, "combined_tta")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.small_insertion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", nargs="+", default=list(HOSTS))
    ap.add_argument("--per-scan", type=int, default=10, help="nodules pasted per host scan")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="whole-scan cache (default $NODULEMTL_CACHE/wholescan)")
    ap.add_argument("--cv-run", type=Path, default=DEFAULT_CV_RUN, help="fp_reduction cv run (cv_scores/, cv_<scan>/)")
    ap.add_argument("--out", type=Path, default=Path("runs/maskrcnn25d/small_insertion.json"))
    ap.add_argument("--weights", type=Path, default=None, help="another detector (default: the shipped one)")
    ap.add_argument("--candidates-cache", type=Path, default=None,
                    help="with --weights: cache whose candidates/ that detector made (training.candidates --cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = ap.parse_args(argv)
    try:
        rep = evaluate(a.scans, a.per_scan, a.seed, a.cache, a.cv_run, log=print, weights=a.weights,
                       candidates_cache=a.candidates_cache, threads=a.threads)
    except (ValueError, FileNotFoundError) as e:
        print(f"small_insertion: error: {e}", file=sys.stderr)
        return 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps({k: rep[k] for k in ("shipped", "fpr_mirror_average_info_only")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
