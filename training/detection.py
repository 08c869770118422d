"""Training and evaluation recipe for the whole-scan nodule search ``maskrcnn25d`` (narrow variant).

Paper: Li & Honarvar Shakibaei Asli, Electronics 2026, 15(4), 736 (seed 002), sections
3.2 (preprocessing), 3.3 (network), 3.5 (training).  The network is the registry's
``maskrcnn25d`` (``build_maskrcnn25d(backbone="resnet18")``, see
``NoduleMTLLib.models.networks.maskrcnn25d``), its ResNet-18 body initialised from our trained LNMSNet
encoder (no ImageNet weights can be downloaded here).

Data (how this differs from the paper's LUNA16 setting): ``lidc_slices`` nodules of the
*training-split patients* only (``training/splits/lidc_patient_split.json``; validation on
the val-split patients).  Each nodule is a 128 x 128 axial field at native pixel spacing
centred on the nodule, on every slice the nodule spans, with four readers' masks.

* A *tile* is one nodule's 5-slice stack {k-2..k+2} (indices beyond the nodule's span
  repeat the edge slice, as :func:`NoduleMTLLib.detection.preprocess.stack_indices`) on the
  128 px field, with the readers' >= 50 % consensus of slice k.  Slice k is a slice with
  consensus (probability ``p_positive``) or a slice of the span without one.  Random
  left/right and up/down flips and a random reversal of the slice order (the order of the
  PNG slices is not documented; at inference channel 0 is the most inferior slice).
* A training *image* is a mosaic of tiles (:func:`draw_training_sample`): a size drawn
  from ``canvas_sizes``, a grid of tiles cut at a random offset, each tile blank (zeros,
  like the masked-out parts of a lung-masked whole slice) with probability
  ``p_blank_tile``.  Why: every lidc_slices field is centred on its nodule; trained on
  single fields (we tried 96 px random crops), the detector learned "a nodule sits in the
  middle of a ~100 px image" (the GT box scored 0.3-0.9 on a centred 128 px crop of a
  whole LIDC slice, ~0 on a 256 px crop or the same crop zero-padded), so it found nothing
  on whole slices.  In a mosaic the nodules lie anywhere, images are larger than one field,
  and several nodules and much lung without nodules share an image.
* Targets: one box + mask per connected component (8-connectivity, >= ``min_component_px``
  pixels) of each tile's consensus, clipped to the image; none -> a negative image.
  Other nodules of the same patient that happen to lie in a field are unlabelled (the
  fields carry no coordinates).

Intensities.  The PNGs are not HU: each is a min-max normalisation of its whole
512 x 512 source slice (``python -m training.calibrate_slices``: grey 0 = HU -1024 in the
median, 5-95 % -3024..-945; grey 255 = HU 1159 in the median, 5-95 % 734..2088).  Per
sample, PNG -> HU is an affine map whose two ends HU(0) and HU(255) are drawn
independently from those calibrated distributions (inverse CDF through the measured
percentiles, :func:`sample_png_affine`) - an augmentation over the unknown per-slice window.
Validation and evaluation use the median map (-1024, 1159).  Then the paper's
preprocessing as inference applies it (``NoduleMTLLib.detection.preprocess``):
``hu_window`` ([-1000, 400] HU -> [0, 1]), slice-wise CLAHE (switch ``use_clahe``) and the
lung mask (switch ``use_lung_mask``).  On a 128 px crop both need care, see
:func:`clahe_crop` and :func:`crop_lung_mask`.

Schedule (section 3.5): three phases - detection only (mask head frozen), mask only
(detection branch frozen), joint.  Each phase ends after its fraction
(``phase_fractions``) of ``iterations`` or of the wall-time budget ``max_minutes``
(counted across resumes), whichever comes first (:func:`phase_end_reached`), so all three
phases run in the time box whatever the CPU load; with the shipped config time governs.
RoI sampling for the box / aux / mask heads: ``roi_batch_size_per_image`` RoIs per image
(torchvision default 512, not given in the paper; 128 here: the mask head runs on every
positive RoI, up to 25 % of them, and dominates the CPU cost), 25 % positives.
Adam, constant learning rate after a linear warm-up (paper: Adam 1e-4; the config uses
``lr`` 2e-4 because the CPU budget gives only a few thousand iterations, and the new
heads start from random weights), gradient-norm clipping.  Validation F1 (slice level,
the paper's 2D criterion: a detection is a TP when its box has IoU > 0.2 with a not yet
matched reference box of the centre slice, greedy by score; on fixed 2 x 2 mosaics of the
val-split nodules, :func:`validation_samples`) at a fixed score threshold
every ``eval_every`` iterations and at the end of each phase; ``best.pt`` = best F1 among
evaluations made after the mask head has been trained (mask and joint phases), Dice as
tie-break.  ``last.pt`` every ``ckpt_every`` iterations and after every evaluation
(model, optimiser, RNG states, phase state, history, elapsed time): a killed run resumes
from it; a finished run stays finished (raise ``max_minutes`` / ``iterations`` to go on).
The paper's early stopping (5 epochs without improvement) is replaced by this time box.
Progress: one JSON object per line on stdout (NaN written as null).

Whole-slice fine-tuning (issue 12, config ``maskrcnn25d_wholeslice.json``): with a
``"wholeslice"`` section each batch item is, with probability ``wholeslice.p``, a
lung-cropped whole axial slice of a whole-scan training patient, preprocessed exactly as
the whole-scan search does, with hard negatives from the detector's false-positive
candidates and online hard-negative mining every ``mine_every`` iterations
(:mod:`training.detection_wholeslice`); the mining pool is saved in ``last.pt``.  With
``val_random_slices`` > 0 the evaluation also runs on whole slices of the val scans
(``val_ws_*``) and ``best.pt`` is chosen on the F1 over val mosaics and val whole slices
together (``val_f1_combined``).  Nodule insertion (issue 27, config
``maskrcnn25d_insert.json``): with ``wholeslice.p_insert`` > 0 that share of the whole
slices carries training patients' ``lidc_vois`` nodules pasted into the lungs
(:mod:`training.insertion`, read from ``data_dir``); its counters are saved in ``last.pt``.

CPU note: with two OpenMP threads on a 2-core machine shared with other processes,
libgomp's default busy-waiting made an iteration 8x slower than with one thread in our
measurements (15.5 vs 1.8 s per iteration; 1.6 s with two threads and
``OMP_WAIT_POLICY=PASSIVE``).  ``nodulemtl-train train maskrcnn25d`` therefore sets
``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before torch is imported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from NoduleMTLLib.detection.merge import adaptive_score_threshold, box_iou_np
from NoduleMTLLib.detection.preprocess import (
    CLAHE_CLIP_LIMIT,
    CLAHE_NBINS,
    CLOSING_RADIUS_MM,
    LUNG_THRESHOLD_HU,
    STACK_SIZE,
    WORK_PIXEL_MM,
    _inplane_closing,
    hu_window,
    stack_indices,
)
from NoduleMTLLib.models import registry
from NoduleMTLLib.models.registry import build_network
from training.checkpoint import load_checkpoint, plain
from training.data import load_slice_nodules, load_split
from training.detection_matching import precision_recall_f1
from training.detection_phases import init_backbone_from_lnmsnet, phase_loss, set_training_phase

NETWORK_ID = registry.DEFAULT_DETECTOR
#: Calibration of the lidc_slices PNGs (``python -m training.calibrate_slices``, seed 0,
#: 119 matched VOIs): percentiles of the HU mapped to grey 0 and to grey 255.
CALIB_PERCENTILES = (0.0, 5.0, 25.0, 50.0, 75.0, 95.0, 100.0)
CALIB_HU_AT_0 = (-3026.0, -3024.0, -1024.0, -1024.0, -1000.0, -945.0, -896.0)
CALIB_HU_AT_255 = (436.0, 734.0, 969.0, 1159.0, 1404.0, 2088.0, 3073.0)
MEDIAN_AFFINE = (-1024.0, 1159.0)
#: CLAHE tile on a 512 x 512 slice with skimage's default (1/8 of the slice): 64 px.
CLAHE_KERNEL_PX = 64
#: Size of the lidc_slices crops.
FIELD_PX = 128


# ----------------------------------------------------------------------------- intensities


def png_to_hu(png: np.ndarray, hu_at_0: float, hu_at_255: float) -> np.ndarray:
    """Affine map of 8-bit ``lidc_slices`` grey levels to HU: 0 -> ``hu_at_0``, 255 -> ``hu_at_255``.

    Args:
        png: uint8 (or any real) array, grey levels 0..255.
        hu_at_0, hu_at_255: HU of grey 0 and grey 255 (the source slice's min and max).

    Returns:
        float32 array of the same shape, HU.

    Raises:
        ValueError: hu_at_255 <= hu_at_0.
    """
    if hu_at_255 <= hu_at_0:
        raise ValueError(f"HU(255) = {hu_at_255} must exceed HU(0) = {hu_at_0}")
    g = np.asarray(png, dtype=np.float32)
    return (np.float32(hu_at_0) + g * np.float32((hu_at_255 - hu_at_0) / 255.0)).astype(np.float32)


def sample_png_affine(rng: np.random.Generator) -> tuple[float, float]:
    """(HU(0), HU(255)) drawn independently from the calibrated distributions (inverse CDF,
    linear between the measured percentiles :data:`CALIB_HU_AT_0` / :data:`CALIB_HU_AT_255`)."""
    u0, u1 = rng.uniform(0.0, 100.0, size=2)
    return (float(np.interp(u0, CALIB_PERCENTILES, CALIB_HU_AT_0)),
            float(np.interp(u1, CALIB_PERCENTILES, CALIB_HU_AT_255)))


def clahe_crop(x01: np.ndarray, kernel_px: int = CLAHE_KERNEL_PX, pad_px: int = CLAHE_KERNEL_PX) -> np.ndarray:
    """Slice-wise CLAHE of a small crop, approximating CLAHE of the whole 512 x 512 slice.

    ``skimage.exposure.equalize_adapthist`` (as in :func:`~NoduleMTLLib.detection.preprocess.
    clahe_slices`, same clip limit and bins) stretches its input to the input's own
    [min, max] and tiles by ``kernel_size`` (default 1/8 of the image).  On a whole chest
    slice the windowed range is [0, 1] (air and bone) and the tile is 64 px; a 128 px crop
    would get 16 px tiles and a stretched range.  So: the crop is reflect-padded by
    ``pad_px``, one padding pixel is set to 0 and one to 1 (the whole-slice range), CLAHE
    runs with ``kernel_px`` tiles, and the centre is cut out.  Tile positions still differ
    from the whole slice's (documented approximation).

    Args:
        x01: (S, H, W) float in [0, 1] (``hu_window`` output).
        kernel_px: CLAHE tile (64 = 1/8 of a 512 slice); pad_px: reflect padding.

    Returns:
        float32 (S, H, W) in [0, 1].
    """
    from skimage.exposure import equalize_adapthist

    x = np.asarray(x01, dtype=np.float32)
    out = np.empty_like(x)
    for s in range(x.shape[0]):
        p = np.pad(x[s], pad_px, mode="reflect")
        p[0, 0], p[0, 1] = 0.0, 1.0
        e = equalize_adapthist(p, kernel_size=kernel_px, clip_limit=CLAHE_CLIP_LIMIT, nbins=CLAHE_NBINS)
        out[s] = e[pad_px:pad_px + x.shape[1], pad_px:pad_px + x.shape[2]]
    return out


def crop_lung_mask(hu: np.ndarray, spacing_mm: float, threshold_hu: float = LUNG_THRESHOLD_HU,
                   closing_radius_mm: float = CLOSING_RADIUS_MM) -> np.ndarray:
    """Approximate lung mask of a small crop, mimicking :func:`~NoduleMTLLib.detection.preprocess.compute_lung_mask`.

    The whole-scan mask (air < -320 HU not connected to the slice border, 3D components,
    hole filling, in-plane closing with a 10 mm disk, hole filling) cannot be computed on a
    128 px crop (the lung touches the crop border).  Here, per slice, on the same ~1.5 mm
    working grid (``WORK_PIXEL_MM``, upsampled by repetition): air < ``threshold_hu``, the
    same in-plane closing (``closing_radius_mm``), hole filling.  Air outside the body
    may stay in (it is 0 after the HU window either way).

    Args:
        hu: (S, H, W) HU; spacing_mm: in-plane pixel size.

    Returns:
        bool (S, H, W).
    """
    hu = np.asarray(hu)
    f = max(1, int(np.floor(WORK_PIXEL_MM / spacing_mm + 0.5)))
    air = hu[:, ::f, ::f] < threshold_hu
    m = _inplane_closing(air, closing_radius_mm, spacing_mm * f, spacing_mm * f)
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    m = ndi.binary_fill_holes(m, structure=st)
    if f > 1:
        m = np.repeat(np.repeat(m, f, axis=1), f, axis=2)[:, :hu.shape[1], :hu.shape[2]]
    return np.ascontiguousarray(m)


def preprocess_stack(png: np.ndarray, spacing_mm: float, affine: tuple[float, float], use_clahe: bool = True,
                     use_lung_mask: bool = True) -> np.ndarray:
    """8-bit stack -> network input, the inference preprocessing (section 3.2) on a crop.

    Args:
        png: (5, H, W) uint8 slices; spacing_mm: pixel size; affine: (HU(0), HU(255)).
        use_clahe, use_lung_mask: the paper's switches (see :func:`clahe_crop`,
            :func:`crop_lung_mask`).

    Returns:
        float32 (5, H, W) in [0, 1].
    """
    hu = png_to_hu(png, *affine)
    x = hu_window(hu)
    if use_clahe:
        x = clahe_crop(x)
    if use_lung_mask:
        x = x * crop_lung_mask(hu, spacing_mm)
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- targets, samples


def targets_from_mask(mask: np.ndarray, min_component_px: int = 3) -> dict[str, torch.Tensor]:
    """torchvision detection targets from a 2D consensus mask: one instance per component.

    Args:
        mask: (H, W) bool; min_component_px: smaller components are dropped.

    Returns:
        {"boxes": (G, 4) float32 xyxy px (pixel edges: x2 = last column + 1),
        "labels": (G,) int64 ones, "masks": (G, H, W) uint8}; G = 0 for a negative sample.
    """
    m = np.asarray(mask, bool)
    lab, n = ndi.label(m, structure=np.ones((3, 3), bool))
    boxes, masks = [], []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        comp = lab == i
        if comp.sum() < min_component_px:
            continue
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        masks.append(comp)
    h, w = m.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}


@dataclass
class Sample:
    """One training / validation image: image (5, H, W) float32 tensor in [0, 1], target
    dict (:func:`targets_from_mask` format), and the tiles it holds ("patient/nodule@k",
    None for a blank tile)."""

    image: torch.Tensor
    target: dict
    tiles: list


def make_tile(nd, k: int, cfg: dict, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """One preprocessed 128 x 128 field: the stack centred on slice ``k`` of a
    :class:`training.data.SliceNodule` and its consensus mask on slice k.

    ``rng`` None: validation (median PNG->HU map, no flips).  Otherwise a random PNG->HU map
    (:func:`sample_png_affine`), random left/right and up/down flips and a random reversal
    of the slice order (with the ``"jitter"`` layout also a random transposition).  With
    ``cfg["tile_layout"] == "jitter"`` the field is then cut and moved by
    :func:`jitter_tile` (validation: a fixed jitter per tile).

    Returns:
        (x (5, 128, 128) float32 in [0, 1], mask (128, 128) bool).
    """
    idx = stack_indices(k, len(nd.image))
    affine = MEDIAN_AFFINE if rng is None else sample_png_affine(rng)
    x = preprocess_stack(nd.image[idx], nd.spacing_mm, affine, cfg.get("use_clahe", True), cfg.get("use_lung_mask", True))
    mask = nd.consensus[k]
    if rng is not None:
        if rng.random() < 0.5:
            x, mask = x[:, :, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            x, mask = x[:, ::-1, :], mask[::-1, :]
        if rng.random() < 0.5:
            x = x[::-1]
        if cfg.get("tile_layout", "centred") == "jitter" and rng.random() < 0.5:
            x, mask = x.transpose(0, 2, 1), mask.T
    if cfg.get("tile_layout", "centred") == "jitter":
        x, mask = jitter_tile(x, mask, rng if rng is not None else np.random.default_rng(_tile_seed(nd, k)),
                              cfg.get("jitter_min_px", 40), cfg.get("p_tile_contains_nodule", 0.7))
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(mask)


def _tile_seed(nd, k: int) -> int:
    """Fixed seed of a validation tile (same jitter in every evaluation)."""
    import zlib

    return zlib.crc32(f"{nd.patient_id}/{nd.nodule}@{k}".encode())


def jitter_tile(x: np.ndarray, mask: np.ndarray, rng: np.random.Generator, min_px: int = 40,
                p_contain: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Cut a random window out of a centred 128 px field and put it at a random place in an
    empty 128 px cell (the ``"jitter"`` tile layout).

    Why: every ``lidc_slices`` field is centred on its nodule, so in a mosaic of whole fields
    the nodule always sits 64 px from the edges of its patch of content.  The first detector
    (grid mosaics of whole fields) learned exactly that: on whole LIDC slices it scored a
    13 mm solid nodule 0.91 on a 128 px crop centred on it and 0 on a 192 px crop or the
    whole slice.  Here the window's sides are drawn from [``min_px``, 128] px independently,
    the window contains the nodule's centre with probability ``p_contain`` (at a uniform
    position in the window) and lies anywhere in the field otherwise (lung, vessels and
    pleura of the field without its nodule: negatives), and it is placed at a uniform
    position in the cell; the rest of the cell is 0, as the masked-out parts of a
    lung-masked slice.

    Args:
        x: (5, 128, 128) float32 preprocessed stack; mask: (128, 128) bool consensus.
        rng: random generator; min_px: smallest window side; p_contain: see above.

    Returns:
        (x, mask) of the same shapes (a nodule cut by the window keeps its visible part;
        :func:`mosaic` decides whether it is still an instance).
    """
    f = x.shape[-1]
    ly, lx = (int(v) for v in rng.integers(min(min_px, f), f + 1, size=2))
    jj, ii = np.nonzero(mask)
    if len(jj) and rng.random() < p_contain:
        cy, cx = int(round(jj.mean())), int(round(ii.mean()))
        ay = int(rng.integers(max(0, cy - ly + 1), min(f - ly, cy) + 1))
        ax = int(rng.integers(max(0, cx - lx + 1), min(f - lx, cx) + 1))
    else:
        ay, ax = int(rng.integers(0, f - ly + 1)), int(rng.integers(0, f - lx + 1))
    py, px = int(rng.integers(0, f - ly + 1)), int(rng.integers(0, f - lx + 1))
    xo = np.zeros_like(x)
    mo = np.zeros_like(mask)
    xo[:, py:py + ly, px:px + lx] = x[:, ay:ay + ly, ax:ax + lx]
    mo[py:py + ly, px:px + lx] = mask[ay:ay + ly, ax:ax + lx]
    return xo, mo


def mosaic(tiles: list, grid: int, size: int, offset: tuple[int, int] = (0, 0), min_component_px: int = 3,
           min_visible_fraction: float = 0.3) -> tuple[torch.Tensor, dict]:
    """Assemble 128 px tiles row by row into a ``grid`` x ``grid`` mosaic and cut a
    ``size`` x ``size`` window at ``offset`` (y, x) px.

    Args:
        tiles: ``grid * grid`` entries, each (x (5, 128, 128), mask (128, 128)) or None
            (a blank tile: zeros, as the lung-masked-out parts of a whole slice).
        grid, size, offset: ``offset + size <= grid * 128`` per axis.
        min_component_px: smallest visible instance (px).
        min_visible_fraction: a component cut by the window is an instance only when at
            least this fraction of it is visible (a sliver of a nodule's edge is not a box
            to learn).  A component whose pixels are mostly 0 on the centre slice (removed
            by the crop's lung mask) is not an instance either.

    Returns:
        (image (5, size, size) float32 tensor, targets as :func:`targets_from_mask`): one
        instance per 8-connected consensus component of each tile, clipped to the window
        (components never merge across tiles).
    """
    f = FIELD_PX
    oy, ox = offset
    if len(tiles) != grid * grid or oy + size > grid * f or ox + size > grid * f:
        raise ValueError("tiles / window do not fit the grid")
    img = np.zeros((STACK_SIZE, size, size), np.float32)
    boxes, masks = [], []
    for n, t in enumerate(tiles):
        if t is None:
            continue
        ty, tx = (n // grid) * f - oy, (n % grid) * f - ox  # tile origin in the window
        y0, y1, x0, x1 = max(0, ty), min(size, ty + f), max(0, tx), min(size, tx + f)
        if y0 >= y1 or x0 >= x1:
            continue
        img[:, y0:y1, x0:x1] = t[0][:, y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        lab, n_comp = ndi.label(t[1], structure=np.ones((3, 3), bool))
        for c in range(1, n_comp + 1):
            comp = lab == c
            m = np.zeros((size, size), bool)
            m[y0:y1, x0:x1] = comp[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
            vis = int(m.sum())
            if vis < min_component_px or vis < min_visible_fraction * comp.sum():
                continue
            if (img[STACK_SIZE // 2][m] > 0).mean() < 0.5:
                continue  # masked out (crop lung mask missed it): nothing to see, not an instance
            jj, ii = np.nonzero(m)
            boxes.append(torch.tensor([[ii.min(), jj.min(), ii.max() + 1, jj.max() + 1]], dtype=torch.float32))
            masks.append(torch.from_numpy(m.astype(np.uint8))[None])
    boxes = torch.cat(boxes) if boxes else torch.zeros((0, 4))
    masks = torch.cat(masks) if masks else torch.zeros((0, size, size), dtype=torch.uint8)
    return torch.from_numpy(img), {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "masks": masks}


def _pick_slice(nd, cfg: dict, rng: np.random.Generator) -> int:
    """Positive slice (with consensus) with probability ``p_positive``, else a slice of the
    nodule's span without consensus (a positive one when there is none)."""
    has = nd.consensus.reshape(len(nd.image), -1).any(1)
    pos, neg = np.nonzero(has)[0], np.nonzero(~has)[0]
    if len(pos) and (rng.random() < cfg["p_positive"] or not len(neg)):
        return int(rng.choice(pos))
    return int(rng.choice(neg)) if len(neg) else int(rng.integers(len(nd.image)))


def draw_training_sample(nodules, cfg: dict, rng: np.random.Generator) -> Sample:
    """A random training image: a mosaic of random nodules' 128 px fields.

    Size ``C`` drawn from ``canvas_sizes``; a grid of ``ceil(C / 128) + 1`` tiles per side
    is cut at a random offset, so the nodules lie anywhere in the image and the image is
    larger than one field (the lidc_slices fields are centred on their nodule; trained on
    them alone, the detector learns "a nodule is in the middle of a 128 px image" and finds
    nothing on a whole slice).  Each visible tile is blank (zeros) with probability
    ``p_blank_tile``, otherwise a random nodule's field (:func:`make_tile`, slice by
    :func:`_pick_slice`); tiles outside the window are not computed.
    """
    size = int(rng.choice(cfg["canvas_sizes"]))
    grid = -(-size // FIELD_PX) + 1
    oy, ox = (int(v) for v in rng.integers(0, grid * FIELD_PX - size + 1, size=2))
    tiles, names = [], []
    for n in range(grid * grid):
        ty, tx = (n // grid) * FIELD_PX - oy, (n % grid) * FIELD_PX - ox
        visible = ty < size and ty + FIELD_PX > 0 and tx < size and tx + FIELD_PX > 0
        if not visible or rng.random() < cfg["p_blank_tile"]:
            tiles.append(None)
            names.append(None)
            continue
        nd = nodules[int(rng.integers(len(nodules)))]
        k = _pick_slice(nd, cfg, rng)
        tiles.append(make_tile(nd, k, cfg, rng))
        names.append(f"{nd.patient_id}/{nd.nodule}@{k}")
    img, t = mosaic(tiles, grid, size, (oy, ox), cfg.get("min_component_px", 3))
    return Sample(img, t, names)


def validation_samples(nodules, cfg: dict, max_nodules: int | None = None) -> list[Sample]:
    """Deterministic evaluation images: per nodule, the slice with the largest consensus
    area and, when the nodule's span has one, its first slice without consensus, as 128 px
    fields (median PNG->HU map, no augmentation) shuffled with a fixed seed and packed four
    at a time into 2 x 2 mosaics of 256 x 256 px (the last one padded with blank tiles)."""
    fields = []
    for nd in nodules[:max_nodules] if max_nodules else nodules:
        area = nd.consensus.reshape(len(nd.image), -1).sum(1)
        ks = ([int(area.argmax())] if area.max() > 0 else []) + [int(k) for k in np.nonzero(area == 0)[0][:1]]
        fields += [(nd, k) for k in ks]
    order = np.random.default_rng(0).permutation(len(fields))
    fields = [fields[i] for i in order]
    out = []
    for i in range(0, len(fields), 4):
        group = fields[i:i + 4]
        tiles = [make_tile(nd, k, cfg, None) for nd, k in group] + [None] * (4 - len(group))
        img, t = mosaic(tiles, 2, 2 * FIELD_PX, (0, 0), cfg.get("min_component_px", 3))
        out.append(Sample(img, t, [f"{nd.patient_id}/{nd.nodule}@{k}" for nd, k in group]))
    return out


# ----------------------------------------------------------------------------- evaluation


def _match_image(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, min_iou: float = 0.2):
    """Greedy by score: each detection takes the unmatched GT box with the highest IoU > min_iou.
    Returns (tp, fp, fn, [(det index, gt index)])."""
    order = np.argsort(-scores)
    iou = box_iou_np(boxes, gt) if len(gt) and len(boxes) else np.zeros((len(boxes), len(gt)))
    used, pairs = set(), []
    for d in order:
        cands = [(iou[d, g], g) for g in range(len(gt)) if g not in used and iou[d, g] > min_iou]
        if cands:
            g = max(cands)[1]
            used.add(g)
            pairs.append((int(d), int(g)))
    tp = len(pairs)
    return tp, len(boxes) - tp, len(gt) - tp, pairs


@torch.inference_mode()
def predict(model: torch.nn.Module, samples: list[Sample], batch: int = 4, max_detections: int = 30,
            device=None) -> list[dict]:
    """Model outputs (numpy: boxes, scores, masks (N, H, W) float) for each sample, eval mode.

    At most ``max_detections`` per image (the top-scoring; the model's own setting is
    restored afterwards): a 256 px validation mosaic holds at most eight nodules, and the
    mask head and mask pasting of torchvision's default 100 detections dominate the CPU time.
    """
    model.eval()
    rh = model.roi_heads
    saved, rh.detections_per_img = rh.detections_per_img, int(max_detections)
    outs = []
    try:
        for i in range(0, len(samples), batch):
            dev = device or next(model.parameters()).device
            for o in model([s.image.to(dev) for s in samples[i:i + batch]]):
                o = {k: v.float().cpu() for k, v in o.items()}
                outs.append({"boxes": o["boxes"].numpy(), "scores": o["scores"].numpy(),
                             "masks": o["masks"][:, 0].numpy() if "masks" in o else None})
    finally:
        rh.detections_per_img = saved
    return outs


def detection_metrics(samples: list[Sample], outputs: list[dict], threshold: float, min_iou: float = 0.2) -> dict:
    """Slice-level P/R/F1 (paper's 2D criterion IoU > ``min_iou``) and the mean Dice of the TP masks.

    Returns {"threshold", "tp", "fp", "fn", "precision", "recall", "f1", "dice_mean",
    "n_images", "n_reference", "fp_per_image"}.
    """
    tp = fp = fn = 0
    dices = []
    for s, o in zip(samples, outputs):
        keep = o["scores"] >= threshold
        gt = s.target["boxes"].numpy()
        a, b, c, pairs = _match_image(o["boxes"][keep], o["scores"][keep], gt, min_iou)
        tp, fp, fn = tp + a, fp + b, fn + c
        if o["masks"] is not None:
            pm = o["masks"][keep] > 0.5
            gm = s.target["masks"].numpy().astype(bool)
            for d, g in pairs:
                inter = float((pm[d] & gm[g]).sum())
                dices.append(2 * inter / max(1.0, float(pm[d].sum() + gm[g].sum())))
    prf = precision_recall_f1(tp, fp, fn)
    n_ref = sum(len(s.target["boxes"]) for s in samples)
    return {"threshold": float(threshold), **prf, "dice_mean": float(np.mean(dices)) if dices else float("nan"),
            "n_images": len(samples), "n_reference": n_ref, "fp_per_image": fp / max(1, len(samples))}


def evaluate_samples(model: torch.nn.Module, samples: list[Sample], score_thresh: float, batch: int = 4,
                     device=None) -> dict:
    """Metrics at the fixed ``score_thresh``, at the paper's adaptive threshold (30th percentile
    of all detection scores of the set, clipped to [0.1, 0.5]; the paper computes it per
    validation run) and the best F1 over thresholds 0.05..0.95 (step 0.05)."""
    outs = predict(model, samples, batch, device=device)
    scores = np.concatenate([o["scores"] for o in outs]) if outs else np.zeros(0)
    fixed = detection_metrics(samples, outs, score_thresh)
    adaptive = detection_metrics(samples, outs, adaptive_score_threshold(scores))
    sweep = [detection_metrics(samples, outs, t) for t in np.arange(0.05, 0.96, 0.05)]
    best = max(sweep, key=lambda m: -1 if math.isnan(m["f1"]) else m["f1"])
    return {"fixed": fixed, "adaptive": adaptive, "best_threshold": best, "n_detections": int(scores.size)}


# ----------------------------------------------------------------------------- training


PHASE_ORDER = ("detection", "mask", "joint")


def phase_end_reached(phase: str, it: int, phase_start: int, elapsed_s: float, cfg: dict) -> bool:
    """Has ``phase`` (started at iteration ``phase_start``) ended at iteration ``it``?

    A phase i ends after ``round(phase_fractions[i] * iterations)`` iterations, or when the
    run's wall time (``elapsed_s``, counted across resumes) reaches the cumulative fraction
    ``sum(phase_fractions[:i + 1]) / sum(phase_fractions)`` of ``max_minutes`` (when set),
    whichever comes first: the three phases always run, whatever the machine's speed.
    """
    fr = cfg["phase_fractions"]
    i = PHASE_ORDER.index(phase)
    if it - phase_start >= int(round(fr[i] * cfg["iterations"])):
        return True
    budget = float(cfg.get("max_minutes") or 0) * 60.0
    return budget > 0 and elapsed_s >= sum(fr[:i + 1]) / sum(fr) * budget


def load_init_weights(model: torch.nn.Module, source) -> Path:
    """Start a run from a whole trained ``maskrcnn25d`` (fine-tuning, config key ``init_weights``).

    Args:
        model: the freshly built network.
        source: a ``.safetensors`` state dict (fp16 or fp32, e.g. an exported detector) or a
            training checkpoint (``best.pt`` / ``last.pt`` with a "model" entry); a relative
            path is taken from the repository root.

    Returns:
        the resolved path.

    Raises:
        FileNotFoundError: no such file.  WeightsError: unreadable, or the state dict does
            not fit (strict; :func:`NoduleMTLLib.models.registry.load_weights_into`).
    """
    from NoduleMTLLib.models.registry import load_weights_into

    path = Path(source)
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / path
    if not path.exists():
        raise FileNotFoundError(f"init_weights: {path} does not exist")
    return load_weights_into(model, path)


def _load_nodules(data_dir, patients: list[str], limit: int | None):
    """lidc_slices nodules of ``patients``; with ``limit``, only enough patients for ``limit`` nodules."""
    if not limit:
        return load_slice_nodules(data_dir, set(patients))
    out = []
    pats = sorted(patients)
    step = max(2, limit)
    for i in range(0, len(pats), step):
        out += load_slice_nodules(data_dir, set(pats[i:i + step]))
        if len(out) >= limit:
            break
    return out[:limit]


def json_safe(obj):
    """``obj`` with NaN/inf floats replaced by None (strict JSON), recursively through dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_name("tmp_" + path.name)
    torch.save(obj, tmp)
    tmp.replace(path)


def train(cfg: dict, out_dir: Path, data_dir=None, limit_nodules: int | None = None, log=print,
          device: str = "auto") -> Path:
    """Train ``maskrcnn25d`` (narrow) on lidc_slices; resumes from ``out_dir/last.pt``.

    Args:
        cfg: the JSON config (``training/configs/maskrcnn25d.json``; keys in the module
            docstring and the config itself; an optional ``"wholeslice"`` section adds
            whole-slice samples and hard-negative mining, :mod:`training.detection_wholeslice`).
        out_dir: run folder (last.pt, best.pt, history.json).
        data_dir: data root (default ``../shared/data``).
        limit_nodules: smoke runs: first N training nodules (and max(4, N // 2) val nodules).
        log: called with one JSON string per event.
        device: "auto" (CUDA when torch sees a GPU, else CPU) | "cpu" | "cuda" | "mps".  On
            CUDA the forward pass runs under automatic mixed precision (float16 autocast
            with a gradient scaler), as section 3.5 of the paper; elsewhere in float32.

    Returns:
        path of ``best.pt`` (written at the first evaluation of the mask phase, so it exists
        once a run has finished; a killed run may not have it yet).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.get("threads", 2))

    def emit(rec: dict) -> None:
        log(json.dumps(json_safe(rec)))  # strict JSON lines (NaN -> null)

    t_start = time.time()
    split = load_split()
    tr = _load_nodules(data_dir, split["train"], limit_nodules)
    va = _load_nodules(data_dir, split["val"], max(4, limit_nodules // 2) if limit_nodules else None)
    val = validation_samples(va, cfg, cfg.get("val_max_nodules"))
    emit({"event": "data", "train_nodules": len(tr), "val_nodules": len(va), "val_images": len(val),
          "load_s": round(time.time() - t_start, 1)})
    ws, ws_val = None, []
    if cfg.get("wholeslice"):  # whole-slice samples + hard-negative mining (training/detection_wholeslice.py)
        from training.detection_wholeslice import build_sampler

        ws = build_sampler(cfg, emit, data_dir)
        ws_val = ws.validation_samples()

    from NoduleMTLLib.core.device import resolve_device

    dev = resolve_device(device)
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    torch.manual_seed(cfg["seed"])
    model = build_network(NETWORK_ID)
    if cfg.get("roi_batch_size_per_image"):  # RoIs sampled per image for the box/aux/mask heads
        model.roi_heads.fg_bg_sampler.batch_size_per_image = int(cfg["roi_batch_size_per_image"])
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    it, best, history, elapsed_before, ck = 0, None, [], 0.0, {}
    rng = np.random.default_rng(cfg["seed"])
    last = out_dir / "last.pt"
    if last.exists():
        ck = load_checkpoint(last)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])  # moves the optimiser state to the parameters' device
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        it, best, history, elapsed_before = ck["iteration"], ck["best"], ck["history"], ck.get("elapsed_s", 0.0)
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        if ws is not None and ck.get("wholeslice"):
            ws.load_state_dict(ck["wholeslice"])  # the hard-negative pool as it was at the checkpoint
        emit({"event": "resumed", "iteration": it, "best": best})
    elif cfg.get("init_weights"):
        path = load_init_weights(model, cfg["init_weights"])
        emit({"event": "init_weights", "from": str(path)})
    else:
        src = cfg.get("init_backbone", registry.BACKBONE_SOURCE)
        if src:
            path = init_backbone_from_lnmsnet(model, None if src == registry.BACKBONE_SOURCE else src)
            emit({"event": "init_backbone", "from": str(path)})

    bs = cfg["batch_size"]
    state = ck.get("phase_state") or {"phase": "detection", "starts": {"detection": 0}, "finished": False}
    state["finished"] = False  # re-checked below with this invocation's iterations / max_minutes
    spec = None
    window: dict[str, list[float]] = {}
    t_window = time.time()
    n_window = 0
    last_eval = {"it": history[-1]["iteration"] if history else -1}

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    def checkpoint():
        _save(last, {"model": model.state_dict(), "opt": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                     **plain({"iteration": it, "best": best, "history": history, "config": cfg,
                              "numpy_rng": rng.bit_generator.state, "elapsed_s": elapsed(), "phase_state": state,
                              "scaler": scaler.state_dict() if use_amp else None, "device": str(dev),
                              "wholeslice": ws.state_dict() if ws is not None else None})})

    def run_eval():
        nonlocal best
        t0 = time.time()
        ev = evaluate_samples(model, val, cfg["eval_score_thresh"], device=dev)
        phase = state["phase"]
        rec = {"event": "eval", "iteration": it, "phase": phase, "val_f1": ev["fixed"]["f1"],
               "val_precision": ev["fixed"]["precision"], "val_recall": ev["fixed"]["recall"],
               "val_dice": ev["fixed"]["dice_mean"], "val_fp_per_image": ev["fixed"]["fp_per_image"],
               "val_f1_adaptive": ev["adaptive"]["f1"], "adaptive_threshold": ev["adaptive"]["threshold"],
               "val_f1_best": ev["best_threshold"]["f1"], "best_threshold": ev["best_threshold"]["threshold"],
               "eval_s": round(time.time() - t0, 1), "elapsed_min": round(elapsed() / 60, 2)}
        sel = "val_f1"
        if ws_val:  # whole val-scan slices: their FPs count in the checkpoint choice (combined F1)
            fw = evaluate_samples(model, ws_val, cfg["eval_score_thresh"], device=dev)["fixed"]
            fm = ev["fixed"]
            comb = precision_recall_f1(fm["tp"] + fw["tp"], fm["fp"] + fw["fp"], fm["fn"] + fw["fn"])
            rec.update({"val_ws_f1": fw["f1"], "val_ws_precision": fw["precision"], "val_ws_recall": fw["recall"],
                        "val_ws_fp_per_image": fw["fp_per_image"], "val_ws_images": fw["n_images"],
                        "val_f1_combined": comb["f1"], "eval_s": round(time.time() - t0, 1)})
            sel = "val_f1_combined"
        history.append(rec)
        last_eval["it"] = it
        f1 = 0.0 if math.isnan(rec[sel]) else rec[sel]
        dice = 0.0 if math.isnan(rec["val_dice"]) else rec["val_dice"]
        if phase in ("mask", "joint") and (best is None or (f1, dice) > (best["f1"], best["dice"])):
            best = {"f1": f1, "dice": dice, "iteration": it}
            _save(out_dir / "best.pt", {"model": model.state_dict(), **plain({"iteration": it, "val": rec, "config": cfg})})
            rec["saved_best"] = True
        emit(rec)
        (out_dir / "history.json").write_text(json.dumps(json_safe(history), indent=1))

    while not state["finished"]:
        phase = state["phase"]
        if phase_end_reached(phase, it, state["starts"][phase], elapsed(), cfg):
            if last_eval["it"] != it:
                run_eval()
            k = PHASE_ORDER.index(phase) + 1
            if k == len(PHASE_ORDER):
                state["finished"] = True
            else:
                state["phase"] = PHASE_ORDER[k]
                state["starts"][PHASE_ORDER[k]] = it
                spec = None
            checkpoint()
            continue
        if spec is None:
            model.train()
            spec = set_training_phase(model, phase)
            window, t_window, n_window = {}, time.time(), 0  # loss means per phase
            emit({"event": "phase", "phase": phase, "iteration": it, "elapsed_min": round(elapsed() / 60, 2)})
        lr = cfg["lr"] * min(1.0, 0.1 + 0.9 * it / max(1, cfg.get("warmup_iterations", 0)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [ws.draw(rng) if ws is not None and rng.random() < ws.p else draw_training_sample(tr, cfg, rng)
                 for _ in range(bs)]
        images = [s.image.to(dev) for s in batch]
        targets = [{k: v.to(dev) for k, v in s.target.items()} for s in batch]
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
            losses = model(images, targets)
            loss = phase_loss(losses, spec)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], cfg.get("clip_grad_norm", 10.0))
        scaler.step(opt)
        scaler.update()
        it += 1
        n_window += 1
        for k, v in losses.items():
            window.setdefault(k, []).append(float(v.detach()))
        window.setdefault("loss", []).append(float(loss.detach()))
        if it % cfg["log_every"] == 0:
            emit({"event": "train", "iteration": it, "phase": phase, "lr": lr,
                  **{k: round(float(np.mean(v)), 4) for k, v in window.items()},
                  "s_per_iter": round((time.time() - t_window) / n_window, 3), "elapsed_min": round(elapsed() / 60, 2)})
            window, t_window, n_window = {}, time.time(), 0
        if ws is not None and it % int(ws.cfg["mine_every"]) == 0:
            emit(ws.mine(model, rng, dev, it))
            model.train()
            set_training_phase(model, phase)
        if it % cfg["eval_every"] == 0:
            run_eval()
            model.train()
            set_training_phase(model, phase)
            checkpoint()
        elif it % cfg["ckpt_every"] == 0:
            checkpoint()
    emit({"event": "done", "iteration": it, "phase_starts": state["starts"], "best": best,
          "elapsed_min": round(elapsed() / 60, 2)})
    return out_dir / "best.pt"


def evaluate_split(model: torch.nn.Module, split: str, cfg: dict, data_dir=None, limit_nodules: int | None = None) -> dict:
    """Crop-level evaluation on a patient split ("val" or "test"): every nodule's largest
    consensus slice and one slice without consensus (see :func:`validation_samples`).

    Returns {"split", "n_nodules", "n_images", "fixed", "adaptive", "best_threshold",
    "n_detections"} (metrics as :func:`evaluate_samples`).  These are slice-level crop
    metrics, not the paper's whole-scan nodule-level ones (that is the whole-scan
    inference's evaluation).
    """
    torch.set_num_threads(cfg.get("threads", 2))
    nodules = _load_nodules(data_dir, load_split()[split], limit_nodules)
    samples = validation_samples(nodules, cfg)
    ev = evaluate_samples(model, samples, cfg["eval_score_thresh"])
    return json_safe({"split": split, "n_nodules": len(nodules), "n_images": len(samples), **ev})
