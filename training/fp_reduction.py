"""Train, select and evaluate the false-positive-reduction stage ``fpr25d`` (issue 12).

    python -m training.fp_reduction train  [--config training/configs/fpr25d.json] [--resume]
    python -m training.fp_reduction select [--weights runs/fpr25d/best.pt]
    python -m training.fp_reduction export
    nodulemtl-train evaluate maskrcnn25d --whole-ct      (two-stage search, test + validation scans)

Data (patients split as ``training/splits/lidc_patient_split.json`` and
``lidc_wholescan_split.json``; LIDC-IDRI-0001 / -0009 never read):

* **positives**: every nodule VOI (``../shared/data/lidc_vois``, HU, native spacing) of the
  training patients, field centred on the consensus mask's centroid, slice range = the
  mask's slices; and every detector candidate of the whole training scans whose centre
  lies within a readers' nodule (any number of readers);
* **negatives**: the detector's candidates (:data:`NoduleMTLLib.detection.fp_reduction.
  CANDIDATE_THRESHOLD`, cached by ``python -m training.candidates``) on the whole training
  scans that hit no nodule and no excluded mark (nodule < 3 mm / non-nodule: neither
  positive nor negative, LUNA16 rule), and random positions inside the lung mask of the
  same scans (voxels of -900 to -500 HU, i.e. aerated parenchyma; >= 10 mm from any mark),
  with slice ranges drawn from the candidates';
* **validation** (checkpoint choice): the validation patients' VOIs (positives) and the
  validation whole scans' candidates (LIDC-IDRI-0004, -0007; negatives), AUC.

Augmentation: in-plane shift up to 1.5 mm and slice range shortened or extended by one slice
at either end (p = 0.3 each) - ``variants`` geometric variants per sample, precomputed - and
per draw random flips / 90-degree rotations and HU noise (sigma 10 HU).
Balanced batches (half positives).  Checkpoints each epoch (``last.pt``, resumable; weights,
optimiser state and plain numbers only) and the best validation AUC (``best.pt``).

``select`` computes the combined score (:func:`~NoduleMTLLib.detection.fp_reduction.
combined_score`) of every validation-scan candidate and picks the lowest threshold with at
most 2 false positives per validation scan (FP = a candidate hitting no nodule and no
excluded mark) - the shipped :data:`~NoduleMTLLib.detection.fp_reduction.
OPERATING_THRESHOLD`.  The test scans are never used to choose anything.
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

from NoduleMTLLib.registry import DEFAULT_FP_REDUCER

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training" / "configs" / f"{DEFAULT_FP_REDUCER}.json"


def _data_dir() -> Path:
    return Path(os.environ.get("NODULEMTL_DATA", REPO.parent / "shared" / "data"))


class Sample:
    """One training sample: a volume (shared), centre (continuous ijk), inclusive slice range, label."""

    __slots__ = ("vol", "spacing", "centre", "krange", "label", "source")

    def __init__(self, vol, spacing, centre, krange, label, source):
        self.vol, self.spacing, self.centre, self.krange, self.label, self.source = vol, spacing, centre, krange, label, source


def voi_samples(split: str, log=print) -> list[Sample]:
    """Positives from ``lidc_vois`` of the patients of ``split`` in lidc_patient_split.json."""
    import SimpleITK as sitk

    from training.wholescan import RESERVED

    sp = json.loads((REPO / "training" / "splits" / "lidc_patient_split.json").read_text())
    pats = set(sp[split]) - set(RESERVED)
    d = _data_dir() / "lidc_vois"
    out = []
    with open(d / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["patient_id"] in pats]
    for r in rows:
        img = sitk.ReadImage(str(d / r["image"]))
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"])))
        if not m.any():
            continue
        kk, jj, ii = np.nonzero(m)
        vol = sitk.GetArrayFromImage(img).astype(np.int16)
        out.append(Sample(vol, img.GetSpacing(), (float(ii.mean()), float(jj.mean()), float(kk.mean())),
                          (int(kk.min()), int(kk.max())), 1, f"voi:{Path(r['image']).stem}"))
    log(f"{split} VOIs: {len(out)} positives from {len(pats & {r['patient_id'] for r in rows})} patients")
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


def make_patch(s: Sample, rng: np.random.Generator | None = None, p_subrange: float = 0.0) -> tuple[np.ndarray, float]:
    """(3, 32, 32) patch and extent feature of a sample; with ``rng``, a geometric variant
    (in-plane shift up to 1.5 mm, slice range shortened/extended by one slice at either end
    with p = 0.3 each).

    ``p_subrange``: probability that a VOI positive (``source`` ``voi:``) gets the geometry of a
    detector candidate instead of its mask's: a random contiguous part of its slice range
    (1 slice to all of them, uniform), centred on one of those slices.  The detector often
    fires on a few slices of a nodule only (the validation nodule of LIDC-IDRI-0004 was a
    2-slice candidate); with mask geometry only, every short candidate would look negative.
    """
    from NoduleMTLLib.detection.fp_reduction import candidate_patch, extent_feature

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
    p = candidate_patch(vol, s.spacing, centre, (k0, k1), off)
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
    return predict_patches(model, [make_patch(x) for x in samples], batch)


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


def train(config: Path = CONFIG, resume: bool = False, log=print) -> dict:
    """Train ``fpr25d`` (module docstring); returns the history."""
    from NoduleMTLLib.detection.fp_reduction import FPR25D
    from NoduleMTLLib.metrics import roc_auc
    from training.wholescan import default_cache, load_split

    cfg = json.loads(Path(config).read_text())
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    torch.set_num_threads(cfg.get("threads", 2))
    cache = Path(cfg.get("cache") or default_cache())
    split = load_split()
    tr = voi_samples("train", log)
    for p in split["train"]:
        tr += scan_samples(p, cache, rng, cfg["random_per_scan"], log)
    va = voi_samples("val", log)
    for p in split["val"]:
        va += scan_samples(p, cache, rng, 0, log)
    n_var = int(cfg.get("variants", 4))
    t0 = time.perf_counter()
    p_sub = float(cfg.get("p_positive_subrange", 0.0))
    variants = [[make_patch(s, rng, p_sub) for _ in range(n_var)] for s in tr]  # geometric variants, precomputed
    for s in tr:
        s.vol = None  # the volumes are no longer needed
    log(f"{len(tr)} x {n_var} training patches in {time.perf_counter() - t0:.0f} s")
    pos = [i for i, s in enumerate(tr) if s.label]
    neg = [i for i, s in enumerate(tr) if not s.label]
    log(f"train: {len(pos)} positives, {len(neg)} negatives; val: {sum(s.label for s in va)} positives, "
        f"{sum(1 - s.label for s in va)} negatives")
    va_patches = [make_patch(s) for s in va]
    model = FPR25D(cfg["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    out = REPO / "runs" / DEFAULT_FP_REDUCER
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


def load_trained(weights: Path | None = None):
    from NoduleMTLLib.detection.fp_reduction import FPR25D
    from NoduleMTLLib.registry import read_state_dict

    cfg = json.loads(CONFIG.read_text())
    m = FPR25D(cfg["width"])
    m.load_state_dict(read_state_dict(Path(weights or REPO / "runs" / DEFAULT_FP_REDUCER / "best.pt")))
    return m.eval()


def scan_scores(model, patient: str, cache: Path) -> list[dict]:
    """Candidates of a cached whole scan with ``fpr`` and ``combined`` scores added."""
    import SimpleITK as sitk

    from NoduleMTLLib.detection.fp_reduction import combined_score, score_candidates

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fp_reduction", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["train", "select", "export"])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--max-fp", type=float, default=2.0)
    a = ap.parse_args(argv)
    if a.command == "train":
        train(a.config, a.resume)
        return 0
    from training.wholescan import default_cache, load_split

    cfg = json.loads(a.config.read_text())
    cache = Path(cfg.get("cache") or default_cache())
    if a.command == "select":
        m = load_trained(a.weights)
        scans = [scan_scores(m, p, cache) for p in load_split()["val"]]
        sel = select_threshold(scans, a.max_fp)
        hs = select_threshold(scans, 8.0)
        rep = {"validation_scans": load_split()["val"], "operating_point": sel, "high_sensitivity_8fp": hs,
               "per_scan": [{"scan": s["scan"], "n_candidates": len(s["candidates"]),
                             "references": s["references"],
                             "hits": [{"nodule": cd["hit"], "detector": round(cd["score"], 4), "fpr": round(cd["fpr"], 4),
                                       "combined": round(cd["combined"], 4)} for cd in s["candidates"] if cd["hit"] is not None]}
                            for s in scans]}
        out = REPO / "runs" / DEFAULT_FP_REDUCER / "select_val.json"
        out.write_text(json.dumps(rep, indent=1) + "\n")
        print(json.dumps({k: rep[k] for k in ("operating_point", "high_sensitivity_8fp")}, indent=1))
        return 0
    if a.command == "export":
        # float32 (the network is 0.1 M parameters, 0.3 MB): the shipped file gives exactly the
        # scores that were evaluated, at a threshold chosen to 4 decimals
        from safetensors.torch import save_file

        m = load_trained(a.weights)
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
