"""Whole-slice training samples and online hard-negative mining for ``maskrcnn25d`` (issue 12).

The detector of ``training/detection.py`` learns from mosaics of 128 px ``lidc_slices``
fields; it never sees a whole chest slice and gives ~46 false positives per whole scan at
score 0.5.  With a ``"wholeslice"`` section in the config, :func:`training.detection.train`
draws each batch item from this module with probability ``wholeslice.p`` (else the usual
mosaic): a lung-cropped whole axial slice of a training whole scan, preprocessed exactly
as the whole-scan search preprocesses it.

Source: Li & Honarvar Shakibaei Asli, Electronics 2026, 15(4), 736 (seed 002), section 3.2
(HU window [-1000, 400] -> [0, 1], slice-wise CLAHE, times the lung mask, 5-slice stacks).
Whole-slice sampling and hard-negative mining are ours; the mining follows the idea of
online hard example mining (Shrivastava, Gupta & Girshick, CVPR 2016, "Training
region-based object detectors with online hard example mining"), here at the image level
(which slices to train on), not at the RoI level.

Data (``nodulemtl-train wholescan`` cache, ``$NODULEMTL_CACHE/wholescan``; never in the
repository): ``<patient>/ct.nrrd`` (int16 HU), ``nodules_labels.nrrd`` (uint8, value n =
nodule n's >= 50 % reader consensus), ``nodules.csv``, ``excluded.json`` (LUNA16
irrelevant findings: nodules < 3 mm and non-nodules, centre LPS mm + radius mm) and
``candidates/<patient>.json`` (the shipped detector's merged candidates, ``training.
candidates``).  Training uses only the split's train patients
(``training/splits/lidc_wholescan_split.json``); the reserved patients
(:data:`training.wholescan.RESERVED`) are refused before any file is touched.

* **Image** of slice k (:meth:`WholeScan.image`): the values the network gets for k in
  :func:`NoduleMTLLib.detection.infer.run_slice_detections` with its defaults - the
  inference's own lazy per-slice preprocessor (``infer._SlicePreprocessor``: HU window,
  CLAHE on the full axial slice, times the lung mask of ``lung_mask_from_ct``), the stack
  ``stack_indices(k, n, reverse)`` (clamped k-2..k+2; reversed when k points to the feet)
  and the in-plane box inference uses for the batch of ``infer.BATCH_SLICES`` slices that
  holds k (``search_plan`` + ``batch_crop``).  Slices are preprocessed on first use and
  kept in memory (~0.4 MB per slice; 20 ms per slice and ~3 s of lung mask per 130-slice
  scan on one core).
* **Targets**: per labelled nodule on slice k (every reader count), one instance per
  8-connected component (``training.detection.targets_from_mask``); as in the mosaics, an
  instance whose pixels are mostly 0 on the centre channel (outside the lung mask) is
  dropped.  Excluded marks are never targets; they are kept out of the negatives only
  where slices are chosen *for* a negative (hard negatives, mined detections): random and
  positive slices may contain them (the simplest rule the issue allows).
* **Sampling** (:meth:`WholeSliceSampler.draw`): with probability ``p_insert`` (issue 27,
  default 0) a uniform search-plan slice with training patients' ``lidc_vois`` nodules
  pasted into it (:func:`training.insertion.inserted_sample`, settings ``wholeslice.insert``
  over :data:`training.insertion.DEFAULTS`; optionally on simulated thick slices), a
  positive slice with probability ``p_positive`` (a nodule drawn uniformly, then one of its
  labelled slices), a hard negative with probability ``p_hard_negative``
  (:class:`HardNegativePool`: an entry drawn with probability proportional to score **
  ``hard_negative_power``, a slice of its slice range), else a uniform slice of the search
  plan.  Augmentation as ``make_tile``: random
  left/right and up/down flips and a random reversal of the slice order (probability
  ``p_flip`` / ``p_reverse``).
* **Hard-negative pool**: initialised with the ``hard_negative_top_k`` highest-scoring
  candidates of the cache file that hit no reference nodule (LUNA16 rule, centre within
  the radius), lie near no excluded mark and whose centre is in no nodule mask.
  **Online mining** (:meth:`WholeSliceSampler.mine`): every ``mine_every`` iterations the
  current model (eval mode, inference mode) runs on ``mine_slices`` random search-plan
  slices; detections >= ``mine_min_score`` whose box centre is in no nodule mask of
  slice k and that pass the same hit / excluded rule (``training.candidates.
  label_candidates``) are false positives; the ``mine_push`` highest go into the pool (an
  entry at the same place - same scan, slice within the entry's range +- 1, in-plane
  centre within ``merge_mm`` - takes the new score; the pool keeps its top_k by score,
  so the lowest are replaced).  The pool is saved in ``last.pt`` and restored on resume
  (:meth:`WholeSliceSampler.state_dict`).
* **Validation** (optional, ``val_random_slices`` > 0): per val-split scan, the largest
  slice of every nodule and ``val_random_slices`` search-plan slices (fixed seed), no
  augmentation (:meth:`WholeSliceSampler.validation_samples`).

Coordinates: boxes xyxy px (pixel edges) of the cropped image; ``WholeScan`` positions
are full-slice continuous indices (i = column, j = row, k = slice); world points LPS mm.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from NoduleMTLLib.detection import infer
from NoduleMTLLib.detection import preprocess as pp
from training.wholescan import EXCLUDED_RADIUS_MM, WholeScanError, _check_not_reserved, default_cache

#: Defaults of the config section ``"wholeslice"`` (see the module docstring).
DEFAULTS = {
    "p": 0.5,
    "p_positive": 0.35,
    "p_hard_negative": 0.45,
    "hard_negative_top_k": 256,
    "hard_negative_power": 2.0,
    "mine_every": 50,
    "mine_slices": 24,
    "mine_min_score": 0.3,
    "mine_push": 16,
    "mine_max_detections": 20,
    "merge_mm": 10.0,
    "p_flip": 0.5,
    "p_reverse": 0.5,
    "val_random_slices": 0,
    "p_insert": 0.0,
    "insert": None,
    "insert_limit_vois": None,
    "cache": None,
    "patients": None,
    "val_patients": None,
}


def wholeslice_config(cfg: dict) -> dict:
    """``cfg["wholeslice"]`` over :data:`DEFAULTS`, plus the top-level ``use_clahe``,
    ``use_lung_mask`` and ``min_component_px``; with ``p_insert`` > 0 (or an ``insert``
    section) ``insert`` becomes :func:`training.insertion.insertion_config`'s output.

    Raises:
        ValueError: unknown key (also in ``insert``), or probabilities outside [0, 1] /
        ``p_insert + p_positive + p_hard_negative`` above 1.
    """
    ws = dict(cfg.get("wholeslice") or {})
    unknown = sorted(set(ws) - set(DEFAULTS) - {"note"})
    if unknown:
        raise ValueError(f"unknown wholeslice keys {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **ws, "use_clahe": cfg.get("use_clahe", True), "use_lung_mask": cfg.get("use_lung_mask", True),
           "min_component_px": cfg.get("min_component_px", 3)}
    for key in ("p", "p_positive", "p_hard_negative", "p_insert", "p_flip", "p_reverse"):
        if not 0.0 <= float(out[key]) <= 1.0:
            raise ValueError(f"wholeslice.{key} = {out[key]} is not a probability")
    if out["p_insert"] + out["p_positive"] + out["p_hard_negative"] > 1.0 + 1e-9:
        raise ValueError("wholeslice.p_insert + p_positive + p_hard_negative must not exceed 1")
    if out["p_insert"] > 0 or out["insert"]:
        from training.insertion import insertion_config

        out["insert"] = insertion_config(out)  # validates wholeslice.insert
    return out


def check_patients(patients, role: str = "train") -> list[str]:
    """The patient list of a role, refused when it reaches data it must not.

    Args:
        patients: patient folder names.
        role: "train" (refuses the split's val and test patients) or "val" (refuses the
            split's train and test patients).

    Raises:
        WholeScanError: a reserved patient (:data:`training.wholescan.RESERVED`, checked
            before anything is read).  ValueError: a patient of another split role.
    """
    from training.wholescan import load_split

    patients = list(patients)
    for p in patients:
        _check_not_reserved(p)
    split = load_split()
    other = {"train": ("val", "test"), "val": ("train", "test")}[role]
    bad = [p for p in patients if any(p in split.get(r, ()) for r in other)]
    if bad:
        raise ValueError(f"{bad} belong to the whole-scan split's {'/'.join(other)} patients, not to {role}")
    return patients


# ----------------------------------------------------------------------------- one scan


@dataclass
class WholeScan:
    """One whole scan prepared as the whole-scan search prepares it.

    Attributes:
        patient: folder name.
        ct: :class:`NoduleMTLLib.core.io.CTVolume` (int16 HU, LPS).
        labels: uint8 (z, y, x) nodule label map (value n = nodule n).
        refs: :class:`training.detection_matching.ReferenceNodule` list (centre, diameter).
        excluded_lps: (M, 3) float64 LPS mm centres of the excluded marks.
        excluded_radius_mm: their radius (mm).
        lung: :class:`~NoduleMTLLib.detection.preprocess.LungMask` (``lung_mask_from_ct``).
        slices: the search plan's slices k, ascending (``infer.search_plan``).
        crop_yx: the search plan's in-plane box (y0, y1, x0, x1), half-open px.
        reverse: stack channel order (True when k points to the feet, as inference).
        prep: the inference's lazy per-slice preprocessor on ``crop_yx`` (float32 slices
            in [0, 1], cached).
        nodule_slices: {nodule id: labelled slices k inside the search plan}.
        load_s: {"read": s, "lung_mask": s}.
    """

    patient: str
    ct: object
    labels: np.ndarray
    refs: list
    excluded_lps: np.ndarray
    excluded_radius_mm: float
    lung: pp.LungMask
    slices: list[int]
    crop_yx: tuple[int, int, int, int]
    reverse: bool
    prep: object
    nodule_slices: dict[int, list[int]] = field(default_factory=dict)
    load_s: dict = field(default_factory=dict)

    def plan_slice(self, k: int) -> int:
        """The search-plan slice nearest to k."""
        s = np.asarray(self.slices)
        return int(s[np.abs(s - int(k)).argmin()])

    def crop_of(self, k: int) -> tuple[int, int, int, int]:
        """In-plane box (y0, y1, x0, x1) the search gives slice k's stack: ``batch_crop`` of
        the batch of ``infer.BATCH_SLICES`` search-plan slices that holds k (k must be in
        the plan)."""
        p = self.slices.index(int(k))
        b0 = p - p % infer.BATCH_SLICES
        ks = self.slices[b0:b0 + infer.BATCH_SLICES]
        nz = self.ct.shape_zyx[0]
        idx = np.unique(np.concatenate([pp.stack_indices(j, nz, reverse=self.reverse) for j in ks]))
        return infer.batch_crop(self.lung, idx, self.crop_yx)

    def image(self, k: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Network input of slice k (a search-plan slice), as the whole-scan search gives it.

        Returns:
            (x: float32 (5, h, w) in [0, 1], channel 2 = slice k, channel 0 = the most
            inferior slice; box (y0, y1, x0, x1) of x in full-slice px).
        """
        y0, y1, x0, x1 = self.crop_of(k)
        cy0, _, cx0, _ = self.crop_yx
        idx = pp.stack_indices(int(k), self.ct.shape_zyx[0], reverse=self.reverse)
        x = np.stack([self.prep.get(int(j))[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] for j in idx])
        return np.ascontiguousarray(x, dtype=np.float32), (y0, y1, x0, x1)

    def is_negative(self, k: int, i: float, j: float) -> bool:
        """Is the point (i, j) (continuous full-slice index) of slice k a valid negative?

        False when it lies in a nodule's mask on slice k, within a reference nodule's
        radius (LUNA16 hit rule) or within ``excluded_radius_mm`` of an excluded mark
        (``training.candidates.label_candidates``)."""
        from training.candidates import label_candidates

        nz, ny, nx = self.labels.shape
        jj, ii = int(np.clip(np.floor(j + 0.5), 0, ny - 1)), int(np.clip(np.floor(i + 0.5), 0, nx - 1))
        if self.labels[int(k), jj, ii]:
            return False
        p = self.ct.image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
        c = [{"centre_lps": list(p)}]
        label_candidates(c, self.refs, [list(v) for v in self.excluded_lps], self.excluded_radius_mm)
        return c[0]["hit"] is None and not c[0]["excluded"]


def load_scan(folder: Path, use_clahe: bool = True, use_lung_mask: bool = True) -> WholeScan:
    """Read one whole-scan folder and prepare it as the search does (lung mask, search plan).

    Raises:
        WholeScanError: reserved patient (before anything is read).  FileNotFoundError:
        missing files.  NoLungError: no lung in the CT.
    """
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import read_ct
    from training.detection_matching import references_from_label_map

    folder = Path(folder)
    _check_not_reserved(folder.name)
    t = time.perf_counter()
    ct = read_ct(folder / "ct.nrrd")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nodules_labels.nrrd"))).astype(np.uint8)
    with open(folder / "nodules.csv", newline="") as fh:
        refs = references_from_label_map(labels, ct, list(csv.DictReader(fh)))
    marks = json.loads((folder / "excluded.json").read_text()).get("excluded", []) if (folder / "excluded.json").exists() else []
    exc = np.array([m["centre_lps"] for m in marks], float).reshape(-1, 3)
    radius = max([float(m.get("radius_mm", EXCLUDED_RADIUS_MM)) for m in marks] or [EXCLUDED_RADIUS_MM])
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    lung = pp.lung_mask_from_ct(ct)
    t_lung = time.perf_counter() - t
    slices, crop = infer.search_plan(lung, ct.shape_zyx, True)
    d = np.asarray(ct.image.GetDirection(), float).reshape(3, 3)
    prep = infer._SlicePreprocessor(ct, lung, crop, use_clahe, use_lung_mask)
    plan = set(slices)
    nod = {}
    for n in (int(v) for v in np.unique(labels) if v > 0):
        ks = [int(k) for k in np.nonzero((labels == n).reshape(labels.shape[0], -1).any(1))[0] if int(k) in plan]
        if ks:
            nod[n] = ks
    return WholeScan(folder.name, ct, labels, refs, exc, radius, lung, slices, crop, bool(d[2, 2] < 0), prep, nod,
                     {"read": round(t_read, 2), "lung_mask": round(t_lung, 2)})


def load_candidates(cache: Path, patient: str) -> list[dict]:
    """``cache/candidates/<patient>.json``'s candidates ([] when the file is absent).

    Raises:
        WholeScanError: reserved patient (the file is not opened).
    """
    _check_not_reserved(patient)
    f = Path(cache) / "candidates" / f"{patient}.json"
    return json.loads(f.read_text())["candidates"] if f.exists() else []


# ----------------------------------------------------------------------------- samples


def whole_slice_sample(scan: WholeScan, k: int, wcfg: dict, rng: np.random.Generator | None, tag: str = ""):
    """One training / validation image: slice k of ``scan`` with its nodule targets.

    Args:
        scan: a :class:`WholeScan`; k: a search-plan slice.
        wcfg: :func:`wholeslice_config` output (``p_flip``, ``p_reverse``, ``min_component_px``).
        rng: None = no augmentation (validation, mining); else random left/right and
            up/down flips and slice-order reversal (as ``training.detection.make_tile``).
        tag: appended to the sample's name.

    Returns:
        :class:`training.detection.Sample`: image (5, h, w) float32 tensor in [0, 1];
        target {"boxes" (G, 4) float32 xyxy px, "labels" (G,) int64, "masks" (G, h, w)
        uint8}; tiles = ["<patient>@<k>[:tag]"].
    """
    x, (y0, y1, x0, x1) = scan.image(k)
    return sample_from_arrays(scan.patient, k, x, scan.labels[int(k), y0:y1, x0:x1], wcfg, rng, tag)


def sample_from_arrays(patient: str, k: int, x: np.ndarray, lab: np.ndarray, wcfg: dict, rng: np.random.Generator | None,
                       tag: str = ""):
    """A :class:`training.detection.Sample` from a network input and the label map of its
    centre slice (the augmentation and target rules of :func:`whole_slice_sample`).

    Args:
        patient, k: for the sample's name.
        x: float32 (5, h, w) network input in [0, 1].
        lab: integer (h, w) label map of the centre slice (value n = nodule n).
        wcfg, rng, tag: as :func:`whole_slice_sample`.
    """
    from training.detection import Sample, targets_from_mask

    if rng is not None:
        if rng.random() < wcfg["p_flip"]:
            x, lab = x[:, :, ::-1], lab[:, ::-1]
        if rng.random() < wcfg["p_flip"]:
            x, lab = x[:, ::-1, :], lab[::-1, :]
        if rng.random() < wcfg["p_reverse"]:
            x = x[::-1]
    x = np.ascontiguousarray(x, dtype=np.float32)
    boxes, masks = [], []
    centre = x[pp.STACK_SIZE // 2]
    for n in (int(v) for v in np.unique(lab) if v > 0):
        t = targets_from_mask(lab == n, wcfg["min_component_px"])
        for b, m in zip(t["boxes"], t["masks"]):
            if (centre[m.numpy().astype(bool)] > 0).mean() < 0.5:
                continue  # outside the lung mask: invisible, not an instance (as training.detection.mosaic)
            boxes.append(b[None])
            masks.append(m[None])
    h, w = lab.shape
    target = {"boxes": torch.cat(boxes) if boxes else torch.zeros((0, 4)),
              "labels": torch.ones(len(boxes), dtype=torch.int64),
              "masks": torch.cat(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}
    return Sample(torch.from_numpy(x), target, [f"{patient}@{int(k)}" + (f":{tag}" if tag else "")])


# ----------------------------------------------------------------------------- hard negatives


class HardNegativePool:
    """Slices of high-scoring false positives, drawn with probability ~ score ** power.

    Entries are plain dicts (checkpoint-safe): {"patient", "k0", "k1" (slice range,
    inclusive), "centre_lps" [x, y, z] mm, "score", "source" ("candidates" | "mined"),
    "iteration"}.

    Args:
        size: entries kept (the highest scores; top-K).
        power: sampling exponent on the score.
        merge_mm: an added entry within this in-plane distance of an entry of the same
            scan whose slice range (+- 1) holds its slice updates that entry (new score).
    """

    def __init__(self, size: int = 256, power: float = 2.0, merge_mm: float = 10.0):
        self.size, self.power, self.merge_mm = int(size), float(power), float(merge_mm)
        self.entries: list[dict] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, items: list[dict]) -> dict:
        """Insert or update entries, then keep the ``size`` highest scores.

        Returns:
            {"new": n inserted, "updated": n updated, "kept": n of ``items`` still in the pool}.
        """
        new = upd = 0
        touched = []
        for it in items:
            hit = None
            for e in self.entries:
                if e["patient"] != it["patient"] or not e["k0"] - 1 <= it["k0"] <= e["k1"] + 1:
                    continue
                if np.hypot(e["centre_lps"][0] - it["centre_lps"][0], e["centre_lps"][1] - it["centre_lps"][1]) <= self.merge_mm:
                    hit = e
                    break
            if hit is None:
                hit = dict(it)
                self.entries.append(hit)
                new += 1
            else:
                hit.update(score=float(it["score"]), source=it["source"], iteration=it.get("iteration"))
                upd += 1
            touched.append(id(hit))
        self.entries.sort(key=lambda e: -e["score"])
        del self.entries[self.size:]
        ids = {id(e) for e in self.entries}
        return {"new": new, "updated": upd, "kept": sum(t in ids for t in touched)}

    def draw(self, rng: np.random.Generator) -> tuple[dict, int]:
        """An entry (probability ~ score ** power) and a slice of its range, uniform.

        Raises:
            ValueError: empty pool.
        """
        if not self.entries:
            raise ValueError("the hard-negative pool is empty")
        w = np.array([max(e["score"], 1e-6) for e in self.entries]) ** self.power
        e = self.entries[int(rng.choice(len(w), p=w / w.sum()))]
        return e, int(rng.integers(e["k0"], e["k1"] + 1))

    def summary(self) -> dict:
        s = np.array([e["score"] for e in self.entries]) if self.entries else np.zeros(0)
        return {"pool_size": len(s), "pool_mined": sum(e["source"] == "mined" for e in self.entries),
                "pool_min_score": round(float(s.min()), 4) if s.size else None,
                "pool_max_score": round(float(s.max()), 4) if s.size else None}

    def state_dict(self) -> dict:
        return {"size": self.size, "power": self.power, "merge_mm": self.merge_mm, "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [dict(e) for e in state["entries"]]


class WholeSliceSampler:
    """Whole-slice samples of the training scans and online hard-negative mining.

    Args:
        scans: :class:`WholeScan` list (training patients).
        wcfg: :func:`wholeslice_config` output.
        candidates: {patient: candidate dicts} (``training.candidates`` format).
        val_scans: validation :class:`WholeScan` list (may be empty).
        inserter: :class:`training.insertion.Inserter` (training patients' VOIs), required
            when ``wcfg["p_insert"]`` > 0.

    Raises:
        ValueError: no scan, or ``p_insert`` > 0 without an inserter.
    """

    def __init__(self, scans: list[WholeScan], wcfg: dict, candidates: dict | None = None, val_scans=(),
                 inserter=None):
        if not scans:
            raise ValueError("no whole scan to train on")
        if float(wcfg.get("p_insert", 0.0)) > 0 and inserter is None:
            raise ValueError("wholeslice.p_insert > 0 needs an Inserter (training.insertion)")
        self.inserter = inserter
        self.n_factor = {}  # thick-slice factor -> inserted samples
        self.scans = {s.patient: s for s in scans}
        self.val_scans = list(val_scans)
        self.cfg = wcfg
        self.p = float(wcfg["p"])
        self.pool = HardNegativePool(wcfg["hard_negative_top_k"], wcfg["hard_negative_power"], wcfg["merge_mm"])
        self.positives = [(s.patient, n) for s in scans for n in sorted(s.nodule_slices)]
        self.all_slices = [(s.patient, k) for s in scans for k in s.slices]
        self.n_refreshes = 0
        self.pool_initial = self._initial_pool(candidates or {})

    def _initial_pool(self, candidates: dict) -> dict:
        items, dropped = [], 0
        for patient, cands in candidates.items():
            scan = self.scans[patient]
            for c in cands:
                i, j, k = c["centre_ijk"]
                k0, k1 = (int(v) for v in c["slices"])
                ok = c.get("hit") is None and not c.get("excluded") and scan.is_negative(int(round(k)), i, j)
                if not ok:
                    dropped += 1
                    continue
                items.append({"patient": patient, "k0": k0, "k1": k1, "centre_lps": [float(v) for v in c["centre_lps"]],
                              "score": float(c["score"]), "source": "candidates", "iteration": None})
        items.sort(key=lambda e: -e["score"])
        self.pool.entries = items[:self.pool.size]
        return {"candidates": sum(len(v) for v in candidates.values()), "dropped_hit_or_excluded": dropped,
                **self.pool.summary()}

    # -- sampling

    def draw(self, rng: np.random.Generator):
        """One augmented training :class:`~training.detection.Sample` (module docstring, "Sampling")."""
        c = self.cfg
        u = rng.random()
        p_ins = float(c.get("p_insert", 0.0))
        if u < p_ins:
            from training.insertion import inserted_sample

            patient, k = self.all_slices[int(rng.integers(len(self.all_slices)))]
            sample, info = inserted_sample(self.scans[patient], k, self.inserter, c, rng)
            self.n_factor[info["factor"]] = self.n_factor.get(info["factor"], 0) + 1
            return sample
        u -= p_ins
        if u < c["p_positive"] and self.positives:
            patient, n = self.positives[int(rng.integers(len(self.positives)))]
            scan = self.scans[patient]
            ks = scan.nodule_slices[n]
            k, tag = ks[int(rng.integers(len(ks)))], f"positive{n}"
        elif u < c["p_positive"] + c["p_hard_negative"] and len(self.pool):
            e, k = self.pool.draw(rng)
            scan = self.scans[e["patient"]]
            k, tag = scan.plan_slice(k), f"hard{e['score']:.2f}"
        else:
            patient, k = self.all_slices[int(rng.integers(len(self.all_slices)))]
            scan, tag = self.scans[patient], "random"
        return whole_slice_sample(scan, k, c, rng, tag)

    def validation_samples(self) -> list:
        """Fixed whole-slice validation images: per val scan, each nodule's slice of largest
        area and ``val_random_slices`` search-plan slices (seed 0); no augmentation."""
        out = []
        r = np.random.default_rng(0)
        for scan in self.val_scans:
            ks = set()
            for n, sl in scan.nodule_slices.items():
                area = [(scan.labels[k] == n).sum() for k in sl]
                ks.add(sl[int(np.argmax(area))])
            n_rand = min(int(self.cfg["val_random_slices"]), len(scan.slices))
            ks |= {int(k) for k in r.choice(scan.slices, size=n_rand, replace=False)}
            out += [whole_slice_sample(scan, k, self.cfg, None, "val") for k in sorted(ks)]
        return out

    # -- mining

    def mine(self, model: torch.nn.Module, rng: np.random.Generator, device=None, iteration: int | None = None) -> dict:
        """Online hard-negative mining (module docstring): run ``model`` on ``mine_slices``
        random search-plan slices (eval mode; the caller puts the model back in training
        mode) and push the top false positives into the pool.

        Returns:
            a JSON-ready log record: slices, detections >= mine_min_score, false positives,
            pushed (new / updated / kept), their scores, pool summary, seconds.
        """
        from training.detection import predict

        c = self.cfg
        t0 = time.perf_counter()
        picks = [self.all_slices[int(i)] for i in rng.integers(len(self.all_slices), size=int(c["mine_slices"]))]
        samples = [whole_slice_sample(self.scans[p], k, c, None) for p, k in picks]
        boxes_of = [self.scans[p].crop_of(k) for p, k in picks]
        outs = predict(model, samples, batch=4, max_detections=int(c["mine_max_detections"]), device=device)
        n_det, fps = 0, []
        for (p, k), (y0, _, x0, _), o in zip(picks, boxes_of, outs):
            scan = self.scans[p]
            for b, s in zip(o["boxes"], o["scores"]):
                if s < c["mine_min_score"]:
                    continue
                n_det += 1
                i, j = x0 + (b[0] + b[2]) / 2 - 0.5, y0 + (b[1] + b[3]) / 2 - 0.5  # pixel edges -> index
                if scan.is_negative(k, i, j):
                    lps = scan.ct.image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                    fps.append({"patient": p, "k0": int(k), "k1": int(k), "centre_lps": [float(v) for v in lps],
                                "score": float(s), "source": "mined", "iteration": iteration})
        fps.sort(key=lambda e: -e["score"])
        push = fps[:int(c["mine_push"])]
        res = self.pool.add(push)
        self.n_refreshes += 1
        return {"event": "mine", "iteration": iteration, "slices": len(picks), "detections": n_det,
                "false_positives": len(fps), "pushed": len(push), **res,
                "pushed_scores": [round(e["score"], 3) for e in push], **self.pool.summary(), **self.insert_summary(),
                "preprocess_s": round(sum(s.prep.seconds for s in self.scans.values()), 1),
                "slices_cached": sum(len(s.prep.cache) for s in self.scans.values()),
                "mine_s": round(time.perf_counter() - t0, 1)}

    # -- resume

    def insert_summary(self) -> dict:
        """Counts of the inserted samples so far (empty without an inserter): samples,
        nodules pasted, placements that failed, per placement kind and per thick-slice
        factor (1 = native slices)."""
        if self.inserter is None:
            return {}
        return {**self.inserter.summary(), "insert_factors": {str(k): v for k, v in sorted(self.n_factor.items())}}

    def state_dict(self) -> dict:
        """Checkpoint-safe state (plain values): the pool, the refresh count and the
        insertion counters."""
        return {"pool": self.pool.state_dict(), "n_refreshes": self.n_refreshes, "insert": self.insert_summary()}

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"])
        self.n_refreshes = int(state.get("n_refreshes", 0))
        ins = state.get("insert") or {}
        if self.inserter is not None and ins:
            self.inserter.n_samples = int(ins.get("insert_samples", 0))
            self.inserter.n_inserted = int(ins.get("inserted", 0))
            self.inserter.n_failed = int(ins.get("insert_failed", 0))
            self.inserter.n_masses = int(ins.get("insert_masses", 0))
            self.inserter.kinds.update({k: int(v) for k, v in (ins.get("insert_kinds") or {}).items()})
            self.n_factor = {int(k): int(v) for k, v in (ins.get("insert_factors") or {}).items()}


def build_sampler(cfg: dict, log=None, data_dir=None) -> WholeSliceSampler:
    """The sampler of a training config with a ``"wholeslice"`` section.

    Patients: ``wholeslice.patients`` (default the whole-scan split's train patients) and
    ``wholeslice.val_patients`` (default its val patients; read only when
    ``val_random_slices`` > 0 or explicitly listed); cache: ``wholeslice.cache`` (default
    :func:`training.wholescan.default_cache`).  With ``p_insert`` > 0 the ``lidc_vois``
    nodules of the insertion patients (:func:`training.insertion.insertion_patients`: the
    click split's train patients, minus the whole-scan split's val / test patients and the
    reserved ones) are read from ``data_dir`` (default
    :func:`training.insertion.default_data_root`), diameters 3-30 mm, at most
    ``insert_limit_vois`` (smoke runs).

    Raises:
        WholeScanError: reserved patient; ValueError: a patient of the wrong split role
        (:func:`check_patients`), bad config.
    """
    from training.wholescan import load_split

    wcfg = wholeslice_config(cfg)
    cache = Path(wcfg["cache"]) if wcfg["cache"] else default_cache()
    split = load_split()
    train_p = check_patients(wcfg["patients"] or split["train"], "train")
    val_p = wcfg["val_patients"]
    if val_p is None:
        val_p = split["val"] if wcfg["val_random_slices"] else []
    val_p = check_patients(val_p, "val")
    if set(train_p) & set(val_p):
        raise ValueError(f"patients both in training and validation: {sorted(set(train_p) & set(val_p))}")
    t0 = time.perf_counter()
    scans = [load_scan(cache / p, wcfg["use_clahe"], wcfg["use_lung_mask"]) for p in train_p]
    val = [load_scan(cache / p, wcfg["use_clahe"], wcfg["use_lung_mask"]) for p in val_p]
    inserter, ins_log = None, {}
    if wcfg["p_insert"] > 0:
        from training.insertion import Inserter, load_vois

        t1 = time.perf_counter()
        vois = load_vois(data_dir, limit=wcfg["insert_limit_vois"])
        inserter = Inserter(vois, wcfg["insert"])
        ins_log = {"insert_vois": len(vois), "insert_voi_patients": len({v.patient for v in vois}),
                   "insert_load_s": round(time.perf_counter() - t1, 1)}
    sampler = WholeSliceSampler(scans, wcfg, {p: load_candidates(cache, p) for p in train_p}, val, inserter)
    if log:
        log({"event": "wholeslice_data", "cache": str(cache), "train_scans": train_p, "val_scans": val_p,
             "lung_slices": len(sampler.all_slices), "positive_nodules": len(sampler.positives),
             "positive_slices": sum(len(v) for s in scans for v in s.nodule_slices.values()),
             "load_s": {s.patient: s.load_s for s in scans + val}, **sampler.pool_initial, **ins_log,
             "seconds": round(time.perf_counter() - t0, 1)})
    return sampler


__all__ = ["DEFAULTS", "HardNegativePool", "WholeScan", "WholeScanError", "WholeSliceSampler", "build_sampler",
           "check_patients", "load_candidates", "load_scan", "whole_slice_sample", "wholeslice_config"]
