"""Whole-scan nodule search with ``maskrcnn25d``: CT -> ranked list of 3D nodules with masks.

Source: Li R. & Honarvar Shakibaei Asli B., Electronics 2026, 15(4), 736 (seed 002):
preprocessing of section 3.2, 5-slice stacks, slice-wise Mask R-CNN, 3D merging of
section 3.4.3 and the adaptive score threshold of section 3.5.  The paper evaluates on
stacks sampled inside the lungs; how a whole scan is searched is ours:

1. **Input checks** (:func:`~.preprocess.check_detection_input`): fewer than 5 slices ->
   :class:`~NoduleMTLLib.core.io.InputError`; slices >= 5 mm apart/thick -> a note in
   ``AnalysisResult.messages`` and the search runs anyway.
2. **Lung mask** computed from the CT (:func:`~.preprocess.lung_mask_from_ct`; no lung ->
   :class:`~.preprocess.NoLungError`).  The search visits only slices with lung voxels
   inside the lung bounds (:func:`~.preprocess.lung_bounds`: 5 mm / 10 mm margins) and
   gives the network only the in-plane lung box (``restrict_to_lungs``, default on) - per
   batch of slices, the lung box of those slices (``crop_per_batch``, :func:`batch_crop`).
3. **Preprocessing slice by slice** (HU window [-1000, 400] -> [0, 1], CLAHE on the *full*
   axial slice, times the lung mask, then the in-plane crop): exactly the values
   :func:`~.preprocess.preprocess_ct` gives, computed lazily for the slices a batch needs
   and dropped once no later stack needs them, so memory does not grow with the number
   of slices (huge scans are processed as a moving slab of ``batch_slices + 4`` slices).
4. **Network**: batches of ``batch_slices`` stacks, ``torch.inference_mode``, at the
   crop's native pixel size (a torchvision transform that would resize is set to scale 1
   per call), or resized by ``input_scale`` (a speed option; boxes and masks are mapped
   back to native pixels).  **Multi-scale search of masses** (``coarse_factors``, off by
   default, :data:`COARSE_FACTORS`): each batch also goes through the network shrunk 2x
   in-plane (sharing the preprocessing), so a 40-80 mm mass looks like the nodules the
   detector learned; its detections are mapped back to native pixels (``SliceDetections.coarse``).
5. **Merging**: detections are kept compactly (box + mask inside the box); the score
   threshold is fixed or adaptive (30th percentile of all slice-detection scores of the
   scan, clipped to [0.1, 0.5], :func:`~.merge.adaptive_score_threshold`); detections are
   linked slice window by slice window (:func:`~.merge.link_pairs`: same result as
   :func:`~.merge.merge_slice_detections` on the whole scan, without N x N matrices, so
   memory does not grow with the size of a linked group); each nodule's mask
   is the union of its members' masks on the CT grid, its centre the mask centroid
   (merge rule 4).  Coarse-pass candidates spanning >= :data:`COARSE_MIN_MM` join the
   native ones, scored by the FPR with its field widened by the factor; one candidate per
   lesion across scales (:func:`group_scales`).
5b. **Outlines** (with ``classify_with``, as the CLI and the service run it): the first
   click network runs at each reported nodule's centre - the same code as a user's click
   there - and its outline becomes the nodule's mask and measurements; lower-scoring
   nodules whose centre lies inside that outline are fragments of the same lesion and are
   folded into it (:func:`outline_with_click`).  Without click networks the detector's
   masks are reported.
6. **Results**: one :class:`~NoduleMTLLib.core.results.NoduleResult` per merged nodule, by
   descending score (ids 1..N), its mask stored as its bounding box
   (:class:`~NoduleMTLLib.core.consensus.MaskBox`: a few kB, not a CT-sized array per
   candidate; measuring, classifying, writing and the Slicer scene all work on the box),
   with the click path's measurements
   (:func:`~NoduleMTLLib.core.postprocess.measure_nodule`) and a ``detection`` record (score,
   3D box, centre, slices); optionally the click networks (``classify_with``) run at each
   nodule's centre and add their malignancy / sign probabilities.

Coordinates: slice boxes are xyxy pixels of the full axial slice (pixel i covers
[i, i+1)); voxel boxes are half-open (i0, j0, k0, i1, j1, k1); world points are LPS mm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.io import CTVolume, InputError
from ..models.registry import DEFAULT_DETECTOR, DEFAULT_FP_REDUCER, operating_points
from . import merge as mg
from . import preprocess as pp

Progress = Callable[[float, str], None]

#: Registry id of the whole-scan detector (:data:`NoduleMTLLib.models.registry.DEFAULT_DETECTOR`).
DETECTOR_ID = DEFAULT_DETECTOR
#: At most this many nodules are reported per scan (highest scores first); LUNA16's
#: evaluation also keeps at most 100 candidates per scan.
MAX_NODULES = 100
#: Default number of stacks per network call (measured: see Testing/Benchmarks/bench_detect.py).
BATCH_SLICES = 4
#: Multi-scale search of masses (issue 27; an option, off by default): each batch also goes
#: through the detector shrunk this many times in-plane, e.g. (2.0,), so a 40-80 mm mass looks
#: like the 20-40 mm nodules the detector learned (it was trained on fields of nodules <= 30 mm
#: and splits a mass into fragments).  Measured on the training scan LIDC-IDRI-0002
#: (``training/RESULTS.md``): on 2x shrunk input the shipped detector's fused scores saturate
#: at 0.461 (combined score <= 0.68, below both operating points), so the coarse pass cannot
#: report anything at the default while it costs 70-80 % of the native pass's time (the
#: region heads' cost does not shrink with the image).  On 48 synthetic masses (2026-12-07,
#: ``training/reports/maskrcnn25d/issue27/coarse/RULE.md``) (2.0, 4.0) gives 3 more masses as one
#: nodule but doubles the validation scans' false positives and costs 46 R50-FPN forwards end to
#: end on LIDC-IDRI-0010 (target 40): off.
COARSE_FACTORS: tuple[float, ...] = ()
#: With coarse passes on: a candidate from a coarse pass is reported only as a mass (through
#: the mass rule, :class:`MassRule`, whatever its score), never as a nodule at the operating point.
#: Measured with factors (2, 4) on masses and the validation scans and not adopted
#: (``training/reports/maskrcnn25d/issue27/coarse/RULE.md``); off.
COARSE_ONLY_AS_MASSES = False
#: A coarse-scale candidate is kept only when its in-plane box spans at least this many mm:
#: smaller lesions are the native scale's (chosen on the training / validation scans,
#: ``training/RESULTS.md``).
COARSE_MIN_MM = 20.0
#: Below this aerated lung volume (mL, both lungs; adult lungs on a chest CT hold about
#: 4,000-6,000 mL), or with one of two separated lungs under :data:`LOW_LUNG_RATIO` of the other, the result
#: carries a note: much of the lung may be replaced by tumour, effusion or collapse, and the
#: search only covers aerated lung (fixed a priori, not tuned on any scan).
LOW_LUNG_VOLUME_ML = 1500.0
LOW_LUNG_RATIO = 0.25
#: Largest CT the search accepts (voxels; 1,100 slices of 512 x 512): within it the peak memory
#: stays under 3 GB (measured, ``training/RESULTS.md``); larger scans are refused up front
#: (:func:`check_size`) instead of running out of memory half-way.
MAX_VOXELS = 1100 * 512 * 512
#: Put broad-based pleural masses back into the detector's input mask
#: (:func:`~.preprocess.add_pleural_masses`; issue 27), and look for masses the detector missed
#: by their shape (:func:`mass_shape_candidates`).  Both on: chosen on the six non-test whole
#: scans (neither adds anything there: the same 16 false positives at the default) and on 24
#: synthetic 38-69 mm masses pasted into them (``python -m training.mass_insertion --n 4 --seed 1
#: --pleural-masses --shapes``): found at the default 16 -> 19, as one nodule 12 -> 15, one
#: nodule >= 80 % inside the mass's box 11 -> 12, other nodules in the slabs 32 -> 32 (pleural
#: masses alone: 15 / 11 / 10; shapes alone: 18 / 14 / 12).  ``training/RESULTS.md``.
PLEURAL_MASSES = True
MASS_SHAPES = True
#: Soft tissue at least this deep (mm, in-plane distance to the nearest non-tissue pixel) inside
#: the search mask is a mass-shape candidate: a region >= 2 x this across in every direction.
#: Six non-test scans: 21 / 4 / 0 / 0 candidates at 6 / 8 / 10 / 12 mm; 24 synthetic masses
#: (seed 2) with a candidate on them: 18 / 18 / 17 / 16.
MASS_SHAPE_DEPTH_MM = 10.0
#: ... on slices spanning at least this much (mm).
MASS_SHAPE_MIN_Z_MM = 10.0
#: Working pixel size (mm) of the shape search.
MASS_SHAPE_PIXEL_MM = 3.0
#: Size-aware acceptance of masses (:class:`MassRule`, issue 27): the lowest combined score a
#: mass-like candidate may have and its click outline's minimum volume (mL).  Chosen on the
#: six non-test whole scans (no false positive added at the default) and 12 synthetic 44-69 mm
#: masses pasted into them (``training/reports/maskrcnn25d/issue27/detfp``, ``training/RESULTS.md``).
#: The mean-HU and lung-share gates are off: below the operating point one false-positive outline
#: of those scans reached 10 mL (training scan LIDC-IDRI-0010; the mass territory folds it into a
#: reported nodule), and a juxtapleural mass's outline lies partly outside the lung mask.
MASS_MIN_SCORE = 0.70
MASS_MIN_ML = 10.0
MASS_MIN_HU = -1000.0
MASS_MIN_LUNG_SHARE = 0.0


def check_size(ct: CTVolume) -> None:
    """Refuse a CT above :data:`MAX_VOXELS` with a one-line error that gives the limit.

    Raises:
        InputError: too many voxels.
    """
    nz, ny, nx = ct.shape_zyx
    if nz * ny * nx > MAX_VOXELS:
        raise InputError(f"The CT has {nz} slices of {nx} x {ny} ({nz * ny * nx / 1e6:.0f} M voxels); Find nodules "
                         f"handles at most {MAX_VOXELS / 1e6:.0f} M voxels ({MAX_VOXELS // (512 * 512)} slices of "
                         "512 x 512) within its 3 GB memory budget: resample to thicker slices (e.g. 1.25 mm) first")


@dataclass
class SliceDetection:
    """One slice-level detection, kept compactly.

    Attributes:
        slice: k of the stack's centre slice.
        box: (4,) float64 xyxy px in full-slice coordinates.
        score: fused score (aux classifier + main head, see :mod:`.model`).
        mask: bool (j1 - j0, i1 - i0) mask inside the integer box, or None.
        mask_origin: (i0, j0) full-slice index of ``mask[0, 0]``.
    """

    slice: int
    box: np.ndarray
    score: float
    mask: np.ndarray | None = None
    mask_origin: tuple[int, int] = (0, 0)


@dataclass
class SliceDetections:
    """All slice detections of one scan (output of :func:`run_slice_detections`).

    Attributes:
        detections: list of :class:`SliceDetection` (any order).
        shape_zyx: CT array shape.
        slices_searched: slice indices k the network ran on, ascending.
        crop_yx: (y0, y1, x0, x1) the scan's in-plane search box (half-open px); with
            ``settings["crop_per_batch"]`` each batch got its own lung box inside it.
        lung: the :class:`~.preprocess.LungMask` (None when not computed).
        report: the :class:`~.preprocess.DetectionInputReport`.
        timing_s: "lung_mask", "preprocess", "network" seconds (+ "network_coarse").
        settings: the options used (for the run record).
        coarse: {factor: SliceDetections of the coarse pass} of the multi-scale search
            (boxes and masks in native full-slice pixels; empty without it).
    """

    detections: list[SliceDetection]
    shape_zyx: tuple[int, int, int]
    slices_searched: list[int]
    crop_yx: tuple[int, int, int, int]
    lung: pp.LungMask | None
    report: pp.DetectionInputReport
    timing_s: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    coarse: dict = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        """(N,) float64 scores of all slice detections."""
        return np.array([d.score for d in self.detections], float)


def load_detector(device: torch.device | str = "cpu") -> torch.nn.Module:
    """The registered ``maskrcnn25d`` in eval mode on ``device`` (weights verified by the registry).

    Raises:
        WeightsError: weights missing, unreadable or failing their checksum.
    """
    from ..models import registry

    return registry.load_network(DETECTOR_ID, device)


def load_fpr(device: torch.device | str = "cpu") -> torch.nn.Module | None:
    """The registered false-positive reduction (``registry.DEFAULT_FP_REDUCER``,
    :mod:`.fp_reduction`) with verified shipped weights, or None when its weights are absent.

    Raises:
        WeightsError: the file exists but fails its checks.
    """
    from ..models import registry

    try:
        registry.find_weights(DEFAULT_FP_REDUCER)
    except registry.WeightsError:
        return None
    return registry.load_network(DEFAULT_FP_REDUCER, device)


def lung_volume_note(lung: pp.LungMask | None) -> str | None:
    """A note for ``nodules.json`` when little aerated lung was found (:data:`LOW_LUNG_VOLUME_ML`,
    :data:`LOW_LUNG_RATIO`), else None."""
    if lung is None:
        return None
    vols = [float(v) for v in lung.volumes_ml]
    total = sum(vols)
    one_sided = lung.n_lungs == 2 and min(vols) < LOW_LUNG_RATIO * max(vols)
    if total >= LOW_LUNG_VOLUME_ML and not one_sided:
        return None
    per = " + ".join(f"{v:.0f}" for v in vols)
    return (f"Little aerated lung found ({total:.0f} mL = {per} mL in {lung.n_lungs} lung(s)): much of the lung may be "
            "replaced by tumour, effusion or collapse; the search covers aerated lung only, so a large mass may be "
            "missed or reported in part - review the scan")


def parse_threshold(value) -> float | str:
    """``"default"``, ``"adaptive"`` or a float in [0, 1].

    * ``"default"``: the operating point of the two-stage search (combined score >=
      :func:`NoduleMTLLib.models.registry.operating_points`, chosen on the validation scans); without
      the ``fpr25d`` weights it falls back to ``"adaptive"``.
    * ``"adaptive"``: every candidate above the paper's adaptive detector threshold (30th
      percentile of the scan's slice scores clipped to [0.1, 0.5], section 3.5): the
      highest-sensitivity setting.
    * a number: the minimum reported score (the combined score when ``fpr25d`` is
      installed, the detector score otherwise).

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, str):
        if value.strip().lower() in ("adaptive", "default"):
            return value.strip().lower()
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"score threshold must be 'default', 'adaptive' or a number in [0, 1], got {value!r}") from None
    v = float(value)
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise ValueError(f"score threshold must be in [0, 1], got {v}")
    return v


# ----------------------------------------------------------------------------------------
# network stage


@contextmanager
def _native_size(model: torch.nn.Module, h: int, w: int):
    """Make torchvision's ``GeneralizedRCNNTransform`` keep an (h, w) input at its size
    (scale 1) instead of resizing it to its configured min/max size; restored afterwards.
    (The narrow model's ``NoResizeTransform`` never resizes; this covers models built
    with ``resize=True`` or plain torchvision ones.)"""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    tr = getattr(model, "transform", None)
    if not isinstance(tr, GeneralizedRCNNTransform):
        yield
        return
    old = (tr.min_size, tr.max_size, getattr(tr, "fixed_size", None))
    tr.min_size = (int(min(h, w)),)
    tr.max_size = int(max(h, w))
    if hasattr(tr, "fixed_size"):
        tr.fixed_size = None
    try:
        yield
    finally:
        tr.min_size, tr.max_size = old[0], old[1]
        if hasattr(tr, "fixed_size"):
            tr.fixed_size = old[2]


@contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def search_plan(lung: pp.LungMask | None, shape_zyx, restrict_to_lungs: bool = True):
    """Slices and in-plane box the search visits.

    Args:
        lung: lung mask (None: the whole volume).
        shape_zyx: CT array shape.
        restrict_to_lungs: use the lung bounds (slices with lung voxels within
            :func:`~.preprocess.lung_bounds`, in-plane lung box with a 10 mm margin).

    Returns:
        (slices: list of k ascending, crop_yx: (y0, y1, x0, x1) half-open px).
    """
    nz, ny, nx = shape_zyx
    if lung is None or not restrict_to_lungs:
        return list(range(nz)), (0, ny, 0, nx)
    b = pp.lung_bounds(lung)
    has_lung = lung.labels.reshape(nz, -1).any(axis=1)
    return [k for k in b.z_range if has_lung[k]], (b.y0, b.y1, b.x0, b.x1)


def batch_crop(lung: pp.LungMask, slice_indices, crop_yx, margin_mm: float = pp.BOUNDS_MARGIN_MM[1]):
    """In-plane lung box of some slices, grown by ``margin_mm`` and kept inside ``crop_yx``.

    Args:
        lung: the scan's lung mask; slice_indices: the slices k (e.g. every slice of a
            batch's 5-slice stacks); crop_yx: (y0, y1, x0, x1) the scan's search box.
        margin_mm: in-plane margin (mm; 10 mm as :func:`~.preprocess.lung_bounds`).

    Returns:
        (y0, y1, x0, x1) half-open px inside ``crop_yx``; a box of at least 32 x 32 px
        centred in ``crop_yx`` when those slices hold no lung.
    """
    y0, y1, x0, x1 = crop_yx
    sl = lung.labels[np.asarray(slice_indices, int), y0:y1, x0:x1].any(axis=0)
    ys, xs = np.flatnonzero(sl.any(axis=1)), np.flatnonzero(sl.any(axis=0))
    if not len(ys):
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        return (max(y0, cy - 16), min(y1, cy + 16), max(x0, cx - 16), min(x1, cx + 16))
    my = int(np.ceil(margin_mm / lung.spacing_zyx[1]))
    mx = int(np.ceil(margin_mm / lung.spacing_zyx[2]))
    return (max(y0, y0 + int(ys[0]) - my), min(y1, y0 + int(ys[-1]) + 1 + my),
            max(x0, x0 + int(xs[0]) - mx), min(x1, x0 + int(xs[-1]) + 1 + mx))


class _SlicePreprocessor:
    """Preprocessed, cropped slices on demand (section 3.2 steps 1-3), cached while needed."""

    def __init__(self, ct: CTVolume, lung: pp.LungMask | None, crop_yx, use_clahe: bool, use_lung_mask: bool):
        self.hu = ct.array
        self.lung = lung
        self.crop = crop_yx
        self.use_clahe, self.use_lung_mask = use_clahe, use_lung_mask
        self.cache: dict[int, np.ndarray] = {}
        self.seconds = 0.0
        self.n_computed = 0

    def get(self, k: int) -> np.ndarray:
        if k not in self.cache:
            t = time.perf_counter()
            s = pp.hu_window(self.hu[k])
            if self.use_clahe:
                s = pp.clahe_slices(s)
            if self.use_lung_mask:
                s *= self.lung.labels[k] > 0
            y0, y1, x0, x1 = self.crop
            self.cache[k] = np.ascontiguousarray(s[y0:y1, x0:x1])
            self.seconds += time.perf_counter() - t
            self.n_computed += 1
        return self.cache[k]

    def drop_below(self, k: int) -> None:
        for key in [key for key in self.cache if key < k]:
            del self.cache[key]


def _compact(output: dict, k: int, x0: int, y0: int, crop_hw, scale_yx, mask_threshold: float) -> list[SliceDetection]:
    """One torchvision output (crop coordinates, input resized by ``scale_yx`` = (sy, sx))
    -> compact full-slice detections (box x / sx, y / sy; each mask cut to its box and, when
    resized, resampled bilinearly to the box's native pixels)."""
    import torch.nn.functional as F

    boxes = output["boxes"].detach().float().cpu().numpy().astype(np.float64).reshape(-1, 4)
    scores = output["scores"].detach().float().cpu().numpy().astype(np.float64).ravel()
    masks = output.get("masks")
    if masks is not None:
        masks = masks.detach()[:, 0].float().cpu()
    h, w = crop_hw
    sy, sx = scale_yx
    resized = (sy, sx) != (1.0, 1.0)
    out = []
    for n in range(len(boxes)):
        bx = boxes[n] / np.array([sx, sy, sx, sy])
        m, origin = None, (0, 0)
        if masks is not None:
            ci0, cj0 = max(0, int(math.floor(bx[0]))), max(0, int(math.floor(bx[1])))
            ci1, cj1 = min(w, int(math.ceil(bx[2]))), min(h, int(math.ceil(bx[3])))
            ci1, cj1 = max(ci1, ci0 + 1), max(cj1, cj0 + 1)
            if not resized:
                prob = masks[n, cj0:cj1, ci0:ci1]
            else:
                hs, ws = masks.shape[-2:]
                si0, sj0 = max(0, int(math.floor(ci0 * sx))), max(0, int(math.floor(cj0 * sy)))
                si1, sj1 = min(ws, max(si0 + 1, int(math.ceil(ci1 * sx)))), min(hs, max(sj0 + 1, int(math.ceil(cj1 * sy))))
                prob = F.interpolate(masks[n, sj0:sj1, si0:si1][None, None], size=(cj1 - cj0, ci1 - ci0),
                                     mode="bilinear", align_corners=False)[0, 0]
            m = (prob >= mask_threshold).numpy()
            origin = (ci0 + x0, cj0 + y0)
        bx[[0, 2]] += x0
        bx[[1, 3]] += y0
        out.append(SliceDetection(int(k), bx, float(scores[n]), m, origin))
    return out


def run_slice_detections(ct: CTVolume, model: torch.nn.Module, device: torch.device | str = "cpu", *,
                         use_clahe: bool = True, use_lung_mask: bool = True, restrict_to_lungs: bool = True,
                         batch_slices: int = BATCH_SLICES, input_scale: float = 1.0, channels_last: bool = False,
                         num_threads: int | None = None, lung: pp.LungMask | None = None,
                         progress: Progress | None = None, mask_threshold: float = mg.MASK_THRESHOLD,
                         crop_per_batch: bool = True, coarse_factors: Sequence[float] = COARSE_FACTORS,
                         pleural_masses: bool | None = None) -> SliceDetections:
    """Run the 2.5D network over the lung slices of a CT (steps 1-4 of the module docstring).

    Args:
        ct: CT in HU (LPS geometry).
        model: a ``maskrcnn25d`` network (torchvision MaskRCNN interface: list of (5, h, w)
            float32 tensors in [0, 1] -> list of dicts with "boxes" (N, 4), "scores" (N,),
            optional "masks" (N, 1, h, w) probabilities).  Put in eval mode and moved to
            ``device`` (and to channels-last memory format when ``channels_last``).
        device: torch device for the network.
        use_clahe, use_lung_mask: paper preprocessing switches (section 3.2 / 4.3.2).
        restrict_to_lungs: search only slices with lung and the in-plane lung box.
        crop_per_batch: with ``restrict_to_lungs`` and the lung mask applied, give the
            network only the in-plane lung box of the slices a batch's stacks hold (10 mm
            margin, :func:`batch_crop`) instead of the scan's lung box: the pixels cut away
            are 0 after lung masking either way; near the apices and bases the lungs are
            small, so this saves about a quarter to a third of the network's pixels.
        batch_slices: stacks per network call (>= 1).
        input_scale: resize factor of the network input (1.0 = native pixels; < 1 is faster
            but shrinks nodules below the anchors the network was trained with: a speed
            option to measure, not validated for accuracy).  Stacks are resized bilinearly
            before the network; boxes and masks are mapped back to native pixels.
        channels_last: convert the model to channels-last memory format.
        num_threads: torch CPU threads during the call (None: leave as set).
        lung: precomputed lung mask (skips its computation).
        progress: callback(fraction in [0, 1], message).
        mask_threshold: mask probability -> binary (0.5).
        coarse_factors: multi-scale search (:data:`COARSE_FACTORS`): every batch also runs
            with its stacks shrunk by each factor f (bilinear, to ``input_scale / f``), its
            detections mapped back to native pixels into ``SliceDetections.coarse[f]``.
            () = native scale only.
        pleural_masses: with the lung mask applied, put broad-based pleural masses back into
            the detector's input mask (:func:`~.preprocess.add_pleural_masses`; None:
            :data:`PLEURAL_MASSES`).  ``SliceDetections.lung`` stays the lung mask.

    Returns:
        :class:`SliceDetections`.

    Raises:
        InputError: fewer than 5 slices.
        NoLungError: no plausible lung (when a lung mask is needed).
        ValueError: batch_slices < 1, input_scale outside (0, 4] or a coarse factor < 1.
    """
    progress = progress or (lambda f, m: None)
    if int(batch_slices) < 1:
        raise ValueError(f"batch_slices must be >= 1, got {batch_slices}")
    if not 0.0 < float(input_scale) <= 4.0:
        raise ValueError(f"input_scale must be in (0, 4], got {input_scale}")
    coarse_factors = tuple(float(f) for f in coarse_factors)
    if any(not f >= 1.0 for f in coarse_factors):
        raise ValueError(f"coarse factors must be >= 1, got {coarse_factors}")
    report = pp.check_detection_input(ct, warn=False)
    check_size(ct)
    timing = {}
    t = time.perf_counter()
    if lung is None and (use_lung_mask or restrict_to_lungs):
        progress(0.01, "lung mask")
        lung = pp.lung_mask_from_ct(ct)
    d = np.asarray(ct.image.GetDirection(), float).reshape(3, 3)
    reverse = bool(d[2, 2] < 0)  # channel 0 = most inferior slice, as preprocess_ct
    search_lung, added_ml = lung, 0.0
    if use_lung_mask and lung is not None and (PLEURAL_MASSES if pleural_masses is None else pleural_masses):
        search_lung, added_ml = pp.add_pleural_masses(ct.array, lung, k_to_feet=_k_to_feet(ct))
    timing["lung_mask"] = time.perf_counter() - t
    slices, crop = search_plan(search_lung, ct.shape_zyx, restrict_to_lungs)
    y0, y1, x0, x1 = crop
    nz = ct.shape_zyx[0]
    prep = _SlicePreprocessor(ct, search_lung, crop, use_clahe, use_lung_mask)

    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dets: list[SliceDetection] = []
    coarse_dets: dict[float, list[SliceDetection]] = {f: [] for f in coarse_factors}
    t_net = t_coarse = 0.0
    per_batch = bool(crop_per_batch and restrict_to_lungs and use_lung_mask and lung is not None)
    n_pixels = 0
    with _threads(num_threads), torch.inference_mode():
        for b0 in range(0, len(slices), int(batch_slices)):
            ks = slices[b0:b0 + int(batch_slices)]
            prep.drop_below(ks[0] - pp.STACK_SIZE // 2)
            idx = [pp.stack_indices(k, nz, reverse=reverse) for k in ks]
            by0, by1, bx0, bx1 = batch_crop(search_lung, np.unique(np.concatenate(idx)), crop) if per_batch else crop
            stacks = [np.stack([prep.get(int(j))[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] for j in ji]) for ji in idx]
            x_in = torch.from_numpy(np.stack(stacks)).to(device)
            h, w = by1 - by0, bx1 - bx0
            for f in (1.0,) + coarse_factors:
                s_in = float(input_scale) / f
                size = (max(1, round(h * s_in)), max(1, round(w * s_in)))
                scale_yx = (size[0] / h, size[1] / w)
                x = x_in
                if size != (h, w):
                    x = torch.nn.functional.interpolate(x_in, size=size, mode="bilinear", align_corners=False)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                n_pixels += len(ks) * size[0] * size[1]
                tn = time.perf_counter()
                with _native_size(model, *x.shape[-2:]):
                    outs = model(list(x))
                if f == 1.0:
                    t_net += time.perf_counter() - tn
                else:
                    t_coarse += time.perf_counter() - tn
                for k, o in zip(ks, outs):
                    (dets if f == 1.0 else coarse_dets[f]).extend(
                        _compact(o, k, bx0, by0, (h, w), scale_yx, mask_threshold))
            progress(0.05 + 0.8 * (b0 + len(ks)) / max(1, len(slices)), f"slice {b0 + len(ks)}/{len(slices)}")
    timing["preprocess"] = prep.seconds
    timing["network"] = t_net
    if coarse_factors:
        timing["network_coarse"] = t_coarse
    settings = {"use_clahe": bool(use_clahe), "use_lung_mask": bool(use_lung_mask),
                "restrict_to_lungs": bool(restrict_to_lungs), "batch_slices": int(batch_slices),
                "input_scale": float(input_scale), "channels_last": bool(channels_last),
                "crop_per_batch": per_batch, "network_pixels": int(n_pixels),
                "threads": torch.get_num_threads() if num_threads is None else int(num_threads),
                "slices_preprocessed": prep.n_computed, "coarse_factors": list(coarse_factors),
                "pleural_masses_ml": round(float(added_ml), 1)}
    coarse = {f: SliceDetections(coarse_dets[f], ct.shape_zyx, slices, crop, lung, report, {}, settings)
              for f in coarse_factors}
    return SliceDetections(dets, ct.shape_zyx, slices, crop, lung, report, timing, settings, coarse)


# ----------------------------------------------------------------------------------------
# merging


def merge_detections(sd: SliceDetections, ct: CTVolume, score_threshold: float | str = "adaptive", *,
                     max_slice_gap: int = mg.MAX_SLICE_GAP, min_iou: float = mg.MIN_LINK_IOU) -> mg.MergeResult:
    """Slice detections -> 3D nodules (paper sections 3.4.3 and 3.5; step 5 of the module docstring).

    Equivalent to :func:`~.merge.merge_slice_detections` on all detections with their
    full-slice masks, without materialising full-slice masks or N x N matrices: links are
    found slice window by slice window (:func:`~.merge.link_pairs`), so memory grows with
    the detections of one window, not with the square of a linked group's size.

    Args:
        sd: from :func:`run_slice_detections`.
        ct: the CT (world coordinates).
        score_threshold: "adaptive" (30th percentile of all slice scores clipped to
            [0.1, 0.5]) or a float.
        max_slice_gap, min_iou: linking rule (3 slices, IoU 0.2).

    Returns:
        :class:`~.merge.MergeResult` (nodules by descending score, ``mask`` set when the
        detections carry masks).

    Raises:
        ValueError: bad threshold.
    """
    thr = parse_threshold(score_threshold)
    if thr in ("adaptive", "default"):
        thr = mg.adaptive_score_threshold(sd.scores)
    kept = [d for d in sd.detections if d.score >= thr]
    nodules: list[mg.MergedNodule] = []
    if kept:
        rows, cols = mg.link_pairs([d.slice for d in kept], np.stack([d.box for d in kept]), max_slice_gap, min_iou)
        shape = ct.shape_zyx if ct is not None else None
        for group in mg.link_components(len(kept), rows, cols):
            members = [kept[i] for i in group]
            nod = mg._make_nodule([(d.slice, d.box, d.score, None) for d in members], ct, shape, mg.MASK_THRESHOLD)
            _paint_mask(nod, members, ct)
            nodules.append(nod)
    nodules.sort(key=lambda nd: -nd.score)
    return mg.MergeResult(nodules, float(thr), len(sd.detections), len(kept))


def _paint_mask(nod: mg.MergedNodule, members: Sequence[SliceDetection], ct: CTVolume) -> None:
    """Merge rule 4 for compact masks: union of member masks inside the nodule's voxel box;
    centre = mask centroid (kept from the box centres when the union is empty)."""
    if any(m.mask is None for m in members):
        return
    i0, j0, k0, i1, j1, k1 = nod.box_voxel
    mask = np.zeros((k1 - k0, j1 - j0, i1 - i0), bool)
    for m in members:
        mi, mj = m.mask_origin
        h, w = m.mask.shape
        a0, a1 = max(mj, j0), min(mj + h, j1)
        b0, b1 = max(mi, i0), min(mi + w, i1)
        if a1 > a0 and b1 > b0:
            mask[m.slice - k0, a0 - j0:a1 - j0, b0 - i0:b1 - i0] |= m.mask[a0 - mj:a1 - mj, b0 - mi:b1 - mi]
    nod.mask = mask
    if mask.any():
        c = mg.mask_centroid(mask)
        nod.centre_ijk = (c[0] + i0, c[1] + j0, c[2] + k0)
        nod.centre_lps = tuple(float(v) for v in ct.image.TransformContinuousIndexToPhysicalPoint(list(nod.centre_ijk)))


# ----------------------------------------------------------------------------------------
# the whole search


def detection_record(nod: mg.MergedNodule, threshold: float) -> dict:
    """JSON-ready ``NoduleResult.detection`` of a merged nodule (see :func:`detect_nodules`)."""
    r3 = lambda t: None if t is None else [round(float(v), 3) for v in t]  # noqa: E731
    c = nod.centre_lps
    return {
        "detector": DETECTOR_ID,
        "score": round(float(nod.score), 4),
        "detector_score": round(float(nod.score if nod.detector_score is None else nod.detector_score), 4),
        "fp_reduction_score": None if nod.fp_reduction_score is None else round(float(nod.fp_reduction_score), 4),
        "score_threshold": round(float(threshold), 4),
        "box_ijk": [int(v) for v in nod.box_voxel],
        "box_xyxy_px": [round(float(v), 2) for v in nod.box_xyxy],
        "box_lps_min_mm": r3(nod.box_lps_min),
        "box_lps_max_mm": r3(nod.box_lps_max),
        "centre_ijk": [round(float(v), 3) for v in nod.centre_ijk],
        "centre_lps_mm": r3(c),
        "centre_ras_mm": None if c is None else [round(-float(c[0]), 3), round(-float(c[1]), 3), round(float(c[2]), 3)],
        "centre_slice": int(nod.centre_slice),
        "slices": [int(nod.slices[0]), int(nod.slices[-1])],
        "n_slice_detections": len(nod.members),
        "search_scale": float(nod.scale),
        "fragments_absorbed": int(nod.absorbed),
        "accepted_as": nod.accepted_as,
        "outline_features": None if nod.features is None else {k: round(float(v), 3) for k, v in nod.features.items()},
    }


def _classify(ct: CTVolume, res, network_ids: Sequence[str], nets: dict, dev, done: dict | None = None) -> None:
    """Run the click networks at the nodule's centre; add their outputs to ``res.networks``
    (``dice_with_final``: Dice of the network's mask with the detector's, computed on their
    bounding boxes - no CT-sized array)."""
    from ..core.consensus import box_dice
    from ..core.results import NetworkOutput
    from ..inference.pipeline import Click2DNetwork, check_point

    try:
        check_point(ct, res.point_lps_mm)
    except InputError as e:
        res.message = (res.message + "; " if res.message else "") + f"not classified: {e}"
        return
    for nid in network_ids:
        o = (done or {}).get(nid) or Click2DNetwork(nid, nets[nid], dev).analyze_box(ct, res.point_lps_mm)
        p = None if math.isnan(o.malignancy_probability) else round(o.malignancy_probability, 4)
        dwf = None
        final = res.mask_box
        if o.mask is not None and final is not None:
            dwf = round(box_dice(o.mask, final), 4)
        res.networks[nid] = NetworkOutput(nid, p, o.sign_probabilities, dwf)
        if o.message:
            res.message = (res.message + "; " if res.message else "") + f"{nid}: {o.message}"


def rescore_with_fpr(nodules: Sequence[mg.MergedNodule], ct: CTVolume, model: torch.nn.Module, device="cpu",
                     field_scale: float = 1.0) -> None:
    """Second stage: set ``detector_score``, ``fp_reduction_score`` and ``score`` = the combined
    score (:func:`~.fp_reduction.combined_score`) of each merged nodule, in place.

    The FPR field covers the nodule's own slice range (first to last member slice) around its
    centre (:func:`~.fp_reduction.candidate_patch`), widened ``field_scale`` times for
    candidates of the coarse search (:func:`~.fp_reduction.score_candidates`)."""
    from ..models.networks import fpr25d as fpr

    if not nodules:
        return
    p = fpr.score_candidates(model, ct.array, ct.spacing, [(n.centre_ijk, (n.slices[0], n.slices[-1])) for n in nodules],
                             device, field_scale=field_scale)
    for n, f in zip(nodules, p):
        n.detector_score = float(n.score)
        n.fp_reduction_score = float(f)
        n.score = fpr.combined_score(n.detector_score, f)


def inplane_extent_mm(nod: mg.MergedNodule, spacing_xyz) -> float:
    """Largest in-plane side (mm) of a merged nodule's box."""
    x1, y1, x2, y2 = nod.box_xyxy
    return float(max((x2 - x1) * spacing_xyz[0], (y2 - y1) * spacing_xyz[1]))


def _inside(point_ijk, box_voxel) -> bool:
    i0, j0, k0, i1, j1, k1 = box_voxel
    i, j, k = (int(round(v)) for v in point_ijk)
    return i0 <= i < i1 and j0 <= j < j1 and k0 <= k < k1


def group_scales(nodules: Sequence[mg.MergedNodule]) -> list[mg.MergedNodule]:
    """One candidate per lesion across search scales.

    Greedy by descending score: a candidate is folded into a higher-scoring one already kept
    (its ``absorbed`` count + 1) when at least one of the two comes from a coarse scale and
    either's centre lies inside the other's voxel box - a mass found whole at the coarse
    scale and as fragments at the native one is one lesion.  A kept candidate keeps the
    boxes of what it absorbed, so native fragments inside a folded coarse box are folded
    too.  Two native candidates alone are never folded here (the merge's linking rule
    already decided about them).

    Returns:
        the kept candidates, by descending score.
    """
    kept: list[tuple[mg.MergedNodule, list[mg.MergedNodule]]] = []
    for n in sorted(nodules, key=lambda nd: -nd.score):
        for host, territory in kept:
            if any((t.scale != 1.0 or n.scale != 1.0)
                   and (_inside(n.centre_ijk, t.box_voxel) or _inside(t.centre_ijk, n.box_voxel)) for t in territory):
                host.absorbed += 1 + n.absorbed
                host.folded.append(n)
                territory.append(n)
                break
        else:
            kept.append((n, [n]))
    return [h for h, _ in kept]


def coarse_nodules(sd: SliceDetections, ct: CTVolume, threshold, fpr_model=None, device="cpu",
                   min_mm: float = COARSE_MIN_MM) -> list[mg.MergedNodule]:
    """Candidates of the coarse passes (``sd.coarse``): merged at ``threshold`` (a float or
    "adaptive" over that pass's own scores), only those spanning >= ``min_mm`` in-plane,
    ``scale`` set to the factor, rescored by the FPR with its field widened by the factor."""
    out = []
    for f, sdc in sorted(sd.coarse.items()):
        big = [n for n in merge_detections(sdc, ct, threshold).nodules if inplane_extent_mm(n, ct.spacing) >= min_mm]
        for n in big:
            n.scale = float(f)
        if fpr_model is not None:
            rescore_with_fpr(big, ct, fpr_model, device, field_scale=f)
        out.extend(big)
    return out


@dataclass(frozen=True)
class MassRule:
    """Size-aware acceptance of masses (issue 27, item 1): a candidate scoring below the
    operating point is still reported when the click outline at its centre is a mass.

    ``fpr25d`` and the detector were trained on nodules of at most 30 mm: a 4-8 cm mass
    reaches combined scores just under the operating point, where the false positives of
    the validation / training scans are vessels, hilum and pleura.  Their click outlines
    are small (on the six non-test whole scans all but one below 10 mL, and that one lies in
    the territory of a reported nodule, :func:`mass_territory`); a mass's outline is large.  A
    candidate with ``min_score <= score < cut`` is accepted when its outline
    (:func:`outline_features`) has ``volume_ml >= min_volume_ml``, ``mean_hu >=
    min_mean_hu`` and ``lung_share >= min_lung_share``.

    Every value is chosen on the non-test whole scans and on synthetic masses pasted
    into them (session drivers in ``training/reports/maskrcnn25d/issue27/detfp``; figures in
    ``training/RESULTS.md``).
    """

    min_score: float = 0.0
    min_volume_ml: float = 0.0
    min_mean_hu: float = -1000.0
    min_lung_share: float = 0.0

    def accepts(self, score: float, features: dict | None) -> bool:
        """True when a candidate of combined ``score`` with these outline ``features`` is a mass."""
        return (features is not None and score >= self.min_score and features["volume_ml"] >= self.min_volume_ml
                and features["mean_hu"] >= self.min_mean_hu and features["lung_share"] >= self.min_lung_share)


def outline_features(outline, ct: CTVolume, lung: pp.LungMask | None = None) -> dict | None:
    """Size, density and lung share of a click outline (the inputs of :class:`MassRule`).

    Args:
        outline: :class:`~NoduleMTLLib.core.consensus.MaskBox` on the CT grid (or None).
        ct: the CT (HU, spacing).
        lung: the search's lung mask (None: ``lung_share`` = 1).

    Returns:
        {"volume_ml", "long_mm" (longest axial diameter, :func:`~NoduleMTLLib.core.postprocess.axial_diameters`),
        "mean_hu", "lung_share" (fraction of outline voxels inside the lung mask, in [0, 1])},
        or None for a missing / empty outline.
    """
    from ..core.postprocess import axial_diameters

    if outline is None:
        return None
    arr = np.asarray(outline.array, bool)
    n = int(arr.sum())
    if n == 0:
        return None
    k0, j0, i0 = outline.offset_zyx
    dz, dy, dx = arr.shape
    sl = (slice(k0, k0 + dz), slice(j0, j0 + dy), slice(i0, i0 + dx))
    share = 1.0 if lung is None else float(np.count_nonzero(lung.labels[sl][arr])) / n
    return {"volume_ml": _volume_ml(outline, ct), "long_mm": float(axial_diameters(arr, ct)[0]),
            "mean_hu": float(np.asarray(ct.array[sl], np.float64)[arr].mean()), "lung_share": share}


def _overlap_share(a, b) -> float:
    """Fraction of MaskBox ``a``'s voxels that lie inside MaskBox ``b``."""
    from ..core.consensus import box_intersection

    return box_intersection(a, b) / max(1, a.voxels)


#: Mass territory (:func:`mass_territory`): outlines of at least this volume (mL) claim the soft
#: tissue connected to them within :data:`MASS_TERRITORY_MM`, voxels >= :data:`MASS_TERRITORY_HU`.
#: 20 mm rather than 10 mm: on the synthetic masses it made 7 of the 7 found masses one nodule
#: (10 mm: 6, no territory: 4), and on the six non-test scans neither margin folded a true nodule
#: (same sources as :data:`MASS_MIN_SCORE`).
MASS_TERRITORY_ML = 10.0
MASS_TERRITORY_MM = 20.0
MASS_TERRITORY_HU = -300.0


def _volume_ml(box, ct: CTVolume) -> float:
    return float(np.count_nonzero(box.array)) * float(np.prod(ct.spacing)) / 1000.0


def mass_territory(outline, ct: CTVolume, margin_mm: float = MASS_TERRITORY_MM, min_hu: float = MASS_TERRITORY_HU):
    """The lesion around a large click outline: the voxels >= ``min_hu`` connected (6-connectivity)
    to the outline inside its bounding box grown by ``margin_mm``, plus the outline.

    The click network outlines a 4-8 cm mass in pieces (its field, even zoomed out, covers
    part of it); the other pieces' candidates lie in the same solid tissue.  The margin
    bounds how far the territory reaches into attached vessels or chest wall.

    Args:
        outline: :class:`~NoduleMTLLib.core.consensus.MaskBox` (non-empty) on the CT grid.
        ct: the CT (HU).

    Returns:
        :class:`~NoduleMTLLib.core.consensus.MaskBox` containing ``outline``.
    """
    from scipy import ndimage as ndi

    from ..core.consensus import MaskBox

    (k0, j0, i0), arr = outline.offset_zyx, np.asarray(outline.array, bool)
    nz, ny, nx = ct.shape_zyx
    sx, sy, sz = ct.spacing
    mz, my, mx = (int(math.ceil(margin_mm / v)) for v in (sz, sy, sx))
    a0, b0, c0 = max(0, k0 - mz), max(0, j0 - my), max(0, i0 - mx)
    a1, b1, c1 = min(nz, k0 + arr.shape[0] + mz), min(ny, j0 + arr.shape[1] + my), min(nx, i0 + arr.shape[2] + mx)
    solid = np.asarray(ct.array[a0:a1, b0:b1, c0:c1]) >= min_hu
    own = np.zeros_like(solid)
    own[k0 - a0:k0 - a0 + arr.shape[0], j0 - b0:j0 - b0 + arr.shape[1], i0 - c0:i0 - c0 + arr.shape[2]] = arr
    lab, _ = ndi.label(solid | own)
    ids = np.unique(lab[own])
    terr = np.isin(lab, ids[ids > 0]) | own
    zz, yy, xx = (np.flatnonzero(terr.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
    return MaskBox((a0 + int(zz[0]), b0 + int(yy[0]), c0 + int(xx[0])),
                   np.ascontiguousarray(terr[zz[0]:zz[-1] + 1, yy[0]:yy[-1] + 1, xx[0]:xx[-1] + 1]), ct.shape_zyx)


#: Masses outlined again from their own centre (issue 27, item 1), **off as shipped** (None): a
#: candidate whose click outline (at the detection's centre, often at one edge of a mass that the
#: detector saw in fragments) holds at least this volume (mL) would be clicked again at the
#: outline's deepest voxel (:func:`deepest_point`), and that click's outline and point reported.
#: Measured on 24 synthetic masses (seed 2, ``training/reports/maskrcnn25d/issue27/recentre``): one
#: nodule >= 80 % inside its box on every slice 12 -> 12, found 20 -> 19; not shipped.
RECENTRE_ML: float | None = None


def deepest_point(outline, ct: CTVolume) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """The voxel of a click outline farthest from its edge (3D Euclidean distance in mm, the CT's
    spacing; ties: the first in C order) - a lesion's centre that does not depend on where the
    detector's fragments lay.

    Args:
        outline: non-empty :class:`~NoduleMTLLib.core.consensus.MaskBox` on the CT grid.
        ct: the CT (spacing, geometry).

    Returns:
        (point in world LPS mm, voxel index (i, j, k)).
    """
    from scipy import ndimage as ndi

    arr = np.pad(np.asarray(outline.array, bool), 1)
    sx, sy, sz = ct.spacing
    d = ndi.distance_transform_edt(arr, sampling=(sz, sy, sx))
    kz, jy, ix = np.unravel_index(int(np.argmax(d)), d.shape)
    k0, j0, i0 = outline.offset_zyx
    ijk = (int(i0 + ix - 1), int(j0 + jy - 1), int(k0 + kz - 1))
    return tuple(float(v) for v in ct.image.TransformIndexToPhysicalPoint(ijk)), ijk


#: A clicked candidate whose outline lies at least this much (fraction of its voxels) inside
#: the outline of a higher-scoring kept nodule is a fragment of that lesion and is folded.
FOLD_OUTLINE_SHARE = 0.5
#: The shipped mass rule (module constants above).
MASS_RULE = MassRule(MASS_MIN_SCORE, MASS_MIN_ML, MASS_MIN_HU, MASS_MIN_LUNG_SHARE)


def mass_shape_candidates(ct: CTVolume, lung: pp.LungMask, k_to_feet: int = -1, *,
                          depth_mm: float = MASS_SHAPE_DEPTH_MM, min_z_mm: float = MASS_SHAPE_MIN_Z_MM,
                          work_pixel_mm: float = MASS_SHAPE_PIXEL_MM) -> list[mg.MergedNodule]:
    """Masses found by their shape, for the click network to judge (issue 27; not from the paper).

    The detector and ``fpr25d`` learned nodules of at most 30 mm and can miss a 4-8 cm mass
    that lies inside the search mask.  Inside the search mask (lung with filled holes and,
    with :data:`PLEURAL_MASSES`, pleural masses) no normal structure is thick soft tissue:
    vessels are at most about 2 cm across near the hilum.  A 3D region of soft tissue
    (>= -300 HU) at least ``depth_mm`` deep in-plane on slices spanning ``min_z_mm`` is a
    candidate, unless it is the top of the liver or spleen enclosed by a lung base
    (:func:`~.preprocess._dome_share` >= :data:`~.preprocess.DOME_SHARE`).  Its click point is
    its deepest voxel.  The candidates carry no score (0) and ``accepted_as = "mass_shape"``;
    :func:`outline_with_click` reports one only when its click outline is a mass by
    :class:`MassRule` (volume, density, lung share; the score gate does not apply) and it is
    no fragment of a nodule already kept.  Only with two separated lungs (``lung.n_lungs == 2``):
    a single label's filled holes may hold the mediastinum between joined lungs.

    Args:
        ct: the CT (HU, LPS geometry).
        lung: the search mask (:class:`~.preprocess.LungMask` on ``ct``'s grid).
        k_to_feet: the array's k step towards the feet (-1 when k runs feet to head).
        depth_mm, min_z_mm, work_pixel_mm: see the module constants.

    Returns:
        list of :class:`~.merge.MergedNodule` (1-voxel boxes at the click point), deepest first.

    Raises:
        ValueError: the mask's shape differs from the CT's.
    """
    from scipy import ndimage as ndi

    if lung.labels.shape != tuple(ct.shape_zyx):
        raise ValueError(f"lung mask shape {lung.labels.shape} != CT shape {ct.shape_zyx}")
    if lung.n_lungs != 2:  # one label: its filled holes may hold the mediastinum between joined lungs
        return []
    sx, sy, sz = ct.spacing
    f = max(1, int(np.floor(work_pixel_mm / min(sy, sx) + 0.5)))
    hu = ct.array[:, ::f, ::f]
    lab = lung.labels[:, ::f, ::f]
    wy, wx = sy * f, sx * f
    tissue = (hu >= pp.MASS_HU[0]) & (lab > 0)
    depth = pp._inplane_edt(tissue, wy, wx)
    core = depth >= depth_mm
    comp, n = ndi.label(core)
    if not n:
        return []
    outside = (hu >= pp.MASS_HU[0]) & (lab == 0)
    step = max(1, int(round(5.0 / sz)))
    out = []
    for c, sl in enumerate(ndi.find_objects(comp), start=1):
        if (sl[0].stop - sl[0].start) * sz < min_z_mm:
            continue
        if pp._dome_share(comp, c, outside, step, int(np.sign(k_to_feet) or -1)) >= pp.DOME_SHARE:
            continue
        d = np.where(comp[sl] == c, depth[sl], 0.0)
        kk, jj, ii = np.unravel_index(int(np.argmax(d)), d.shape)
        k, j, i = kk + sl[0].start, (jj + sl[1].start) * f, (ii + sl[2].start) * f
        lps = tuple(float(v) for v in ct.image.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)]))
        out.append((float(d.max()), mg.MergedNodule(
            score=0.0, slices=[int(k)], box_xyxy=(float(i), float(j), float(i + 1), float(j + 1)),
            box_voxel=(int(i), int(j), int(k), int(i) + 1, int(j) + 1, int(k) + 1),
            centre_ijk=(float(i), float(j), float(k)), centre_lps=lps, box_lps_min=lps, box_lps_max=lps,
            accepted_as="mass_shape")))
    return [m for _, m in sorted(out, key=lambda t: -t[0])]


def mass_candidates(merged: mg.MergeResult, cut: float, two_stage: bool,
                    rule: MassRule | None = MASS_RULE) -> list[mg.MergedNodule]:
    """Candidates the mass rule looks at: combined score in [``rule.min_score``, ``cut``).

    Only for the two-stage search (``two_stage``: scores are combined ``fpr25d`` scores, on
    which the rule was chosen); [] otherwise or without a rule.
    """
    if rule is None or not two_stage or cut <= rule.min_score:
        return []
    return [n for n in merged.nodules if rule.min_score <= n.score < cut]


def _k_to_feet(ct: CTVolume) -> int:
    """The array's k step towards the patient's feet (LPS: +z is towards the head)."""
    return 1 if float(np.asarray(ct.image.GetDirection(), float).reshape(3, 3)[2, 2]) < 0 else -1


def below_cut_candidates(sd: SliceDetections, ct: CTVolume, merged: mg.MergeResult, cut: float, two_stage: bool,
                         rule: MassRule | None = MASS_RULE, shapes: bool | None = None) -> list[mg.MergedNodule]:
    """Everything the mass rule judges below the operating point: :func:`mass_candidates` and,
    with ``shapes`` (None: :data:`MASS_SHAPES`), :func:`mass_shape_candidates` on the search
    mask (the lung mask, with the pleural masses the search added, :data:`PLEURAL_MASSES`).
    [] without a rule or for a single-stage search."""
    out = mass_candidates(merged, cut, two_stage, rule)
    if rule is None or not two_stage or sd.lung is None or not (MASS_SHAPES if shapes is None else shapes):
        return out
    feet = _k_to_feet(ct)
    mask = sd.lung
    if (sd.settings or {}).get("pleural_masses_ml"):
        mask = pp.add_pleural_masses(ct.array, sd.lung, k_to_feet=feet)[0]
    return out + mass_shape_candidates(ct, mask, feet)


def outline_with_click(nodules: Sequence[mg.MergedNodule], ct: CTVolume, click,
                       max_kept: int | None = None, *, cut: float | None = None, mass_rule: MassRule | None = None,
                       lung: pp.LungMask | None = None,
                       territory_ml: float | None = None,
                       territory_mm: float | None = None,
                       recentre_ml: float | None = None) -> tuple[list[mg.MergedNodule], list]:
    """One lesion, one answer: each nodule's outline comes from the click path at its centre.

    By descending score, the click network runs at each nodule's centre
    (``click(ct, point_lps)`` -> :class:`~NoduleMTLLib.inference.pipeline.ClickOutput` with a
    :class:`~NoduleMTLLib.core.consensus.MaskBox` mask, e.g.
    ``Click2DNetwork(...).analyze_box``: the same code, zoom ladder included, as a user's
    click there).  A nodule is a fragment of a higher-scoring kept one, and is folded
    into it (``absorbed``), when its centre voxel lies inside that one's click outline, or
    when at least :data:`FOLD_OUTLINE_SHARE` of its own click outline does.  A mass is often
    outlined in pieces (the click network's field covers part of it): with ``territory_ml``,
    a nodule whose outline holds at least that volume claims its :func:`mass_territory`
    (the soft tissue connected to its outline nearby) instead of its outline alone in both
    tests above, and such a candidate is also folded into a kept nodule whose outline
    touches its territory.  A kept
    nodule takes the outline as its mask, voxel box and in-plane box (its centre stays the
    click point); when the click segments nothing it keeps the detector's mask.

    Masses (issue 27): with ``cut`` and ``mass_rule``, candidates scoring below ``cut``
    (and at least ``mass_rule.min_score``) are kept only when their outline is a mass
    (:meth:`MassRule.accepts` on :func:`outline_features` with ``lung``); they are marked
    ``accepted_as = "mass"``.  Without ``cut`` every nodule given is kept (or folded).

    Args:
        nodules: candidates (any order); ct: the CT; click: callable(ct, point_lps) ->
            ClickOutput or None; max_kept: stop once this many nodules are kept.
        cut: the operating point (combined score); mass_rule: :class:`MassRule`;
        lung: the search's lung mask (for ``lung_share``).
        territory_ml: outline volume (mL) from which a nodule claims its mass territory
            (None: outlines only; the search uses :data:`MASS_TERRITORY_ML`); territory_mm: its
            margin (None: :data:`MASS_TERRITORY_MM`).
        recentre_ml: a click outline of at least this volume (mL) is replaced by the outline of
            a click at its :func:`deepest_point` (when that click segments something), and the
            nodule's centre becomes that point (None: off; the search uses :data:`RECENTRE_ML`).

    Returns:
        (kept nodules by descending score, their click outputs (None where the click
        segmented nothing), in the same order).
    """
    kept: list[mg.MergedNodule] = []
    outs: list = []
    terr: list = []  # per kept nodule: its click outline, or its mass territory (None: no outline)
    todo = sorted(nodules, key=lambda nd: -nd.score)

    def refuse(nd) -> None:
        # a coarse candidate reported only as a mass and refused: what it folded is judged on its own
        if COARSE_ONLY_AS_MASSES and nd.scale != 1.0 and nd.folded:
            todo.extend(nd.folded)
            todo.sort(key=lambda x: -x.score)

    while todo:
        n = todo.pop(0)
        if max_kept is not None and len(kept) >= max_kept:
            break
        shape = n.accepted_as == "mass_shape"  # mass_shape_candidates: no score, judged by the outline
        below = cut is not None and (n.score < cut or (COARSE_ONLY_AS_MASSES and n.scale != 1.0))
        if below and (mass_rule is None or (n.score < mass_rule.min_score and not shape)):
            refuse(n)
            continue
        c = tuple(int(round(v)) for v in n.centre_ijk)
        host = next((kept[i] for i, t in enumerate(terr) if t is not None and _in_maskbox(t, c)), None)
        if host is not None:
            host.absorbed += 1 + n.absorbed
            continue
        o = click(ct, n.centre_lps)
        om = o.mask if o is not None else None
        if om is not None and not np.asarray(om.array).any():
            om = None
        if om is not None and recentre_ml is not None and _volume_ml(om, ct) >= recentre_ml:
            p, ijk = deepest_point(om, ct)
            o2 = click(ct, p)
            if o2 is not None and o2.mask is not None and np.asarray(o2.mask.array).any():
                o, om = o2, o2.mask
                n.centre_lps, n.centre_ijk = p, tuple(float(v) for v in ijk)
        t_n = om
        if om is not None:
            host = next((kept[i] for i, t in enumerate(terr) if t is not None
                         and _overlap_share(om, t) >= FOLD_OUTLINE_SHARE), None)
            if host is None and territory_ml is not None and _volume_ml(om, ct) >= territory_ml:
                t_n = mass_territory(om, ct, MASS_TERRITORY_MM if territory_mm is None else territory_mm)
                host = next((kept[i] for i, ok in enumerate(outs) if ok is not None and ok.mask is not None
                             and _overlap_share(ok.mask, t_n) > 0.0), None)
            if host is not None:
                host.absorbed += 1 + n.absorbed
                continue
        if below:
            n.features = outline_features(om, ct, lung)
            if not mass_rule.accepts(max(n.score, mass_rule.min_score) if shape else n.score, n.features):
                refuse(n)
                continue
            if not shape:
                n.accepted_as = "mass"
        if om is not None:
            (k0, j0, i0), arr = om.offset_zyx, om.array
            dz, dy, dx = arr.shape
            n.mask, n.box_voxel = arr, (i0, j0, k0, i0 + dx, j0 + dy, k0 + dz)
            n.box_xyxy = (float(i0), float(j0), float(i0 + dx), float(j0 + dy))
            n.slices = sorted(set(n.slices) | {int(k) for k in np.flatnonzero(arr.any(axis=(1, 2))) + k0})
            img = ct.image
            corners = np.array([img.TransformContinuousIndexToPhysicalPoint([a - 0.5, b - 0.5, z - 0.5])
                                for a in (i0, i0 + dx) for b in (j0, j0 + dy) for z in (k0, k0 + dz)])
            n.box_lps_min = tuple(float(v) for v in corners.min(0))
            n.box_lps_max = tuple(float(v) for v in corners.max(0))
        kept.append(n)
        outs.append(o)
        terr.append(t_n)
    return kept, outs


def _in_maskbox(box, c_ijk) -> bool:
    k0, j0, i0 = box.offset_zyx
    i, j, k = c_ijk
    dz, dy, dx = box.array.shape
    return k0 <= k < k0 + dz and j0 <= j < j0 + dy and i0 <= i < i0 + dx and bool(box.array[k - k0, j - j0, i - i0])


def select_nodules(sd: SliceDetections, ct: CTVolume, score_threshold: float | str = "default",
                   fpr_model: torch.nn.Module | None = None, device="cpu") -> tuple[mg.MergeResult, list[mg.MergedNodule], float]:
    """Candidates -> reported nodules (the two-stage search; :func:`parse_threshold` for the modes).

    With coarse passes in ``sd`` (multi-scale search), their large candidates
    (:func:`coarse_nodules`) join the native ones and each lesion is kept once
    (:func:`group_scales`); ``merge.nodules`` then lists the grouped candidates.

    Returns:
        (merge result of the candidates, reported nodules by descending score, the score
        threshold that was applied to the reported score).
    """
    from ..models.networks import fpr25d as fpr

    mode = parse_threshold(score_threshold)
    if fpr_model is None:
        thr = "adaptive" if mode == "default" else mode
        merged = merge_detections(sd, ct, thr)
        if sd.coarse:
            merged.nodules = group_scales(list(merged.nodules) + coarse_nodules(sd, ct, thr))
        return merged, list(merged.nodules), float(merged.score_threshold)
    merged = merge_detections(sd, ct, fpr.CANDIDATE_THRESHOLD)
    rescore_with_fpr(merged.nodules, ct, fpr_model, device)
    if sd.coarse:
        merged.nodules = group_scales(list(merged.nodules) + coarse_nodules(sd, ct, fpr.CANDIDATE_THRESHOLD, fpr_model,
                                                                            device))
    merged.nodules.sort(key=lambda nd: -nd.score)
    cut = operating_points()["default"] if mode == "default" else 0.0 if mode == "adaptive" else mode
    return merged, [n for n in merged.nodules if n.score >= cut], float(cut)


def result_from_detections(ct: CTVolume, sd: SliceDetections, score_threshold: float | str = "default", *,
                           classify_with: Sequence[str] = (), networks: dict | None = None, device="cpu",
                           max_nodules: int = MAX_NODULES, progress: Progress | None = None,
                           extra_timing: dict | None = None, fpr_model: torch.nn.Module | None | str = "auto"):
    """Merge, measure and (optionally) classify: steps 5-6 of the module docstring.

    Args:
        ct: the CT the detections come from.
        sd: from :func:`run_slice_detections`.
        score_threshold: "adaptive" or a float in [0, 1].
        classify_with: click network ids run at each found nodule's centre.
        networks: pre-loaded {id: module} for ``classify_with``.
        device: device of the click networks.
        max_nodules: report at most this many nodules.
        progress: callback(fraction, message).
        extra_timing: seconds to add to ``run["timing_s"]`` (e.g. weight loading); its
            "total" is the sum of the parts.
        fpr_model: the false-positive-reduction network; "auto" loads the installed
            ``fpr25d`` (None when its weights are absent: single-stage search), None
            disables the second stage.

    Returns:
        :class:`~NoduleMTLLib.core.results.AnalysisResult` (see :func:`detect_nodules`).

    Raises:
        InputError: unknown ``classify_with`` id; ValueError: bad threshold;
        WeightsError: click-network weights missing.
    """
    from .. import __version__
    from ..core.device import resolve_device
    from ..core.postprocess import measure_nodule
    from ..core.results import AnalysisResult, NoduleResult
    from ..models.registry import check_network_ids, load_network

    progress = progress or (lambda f, m: None)
    thr_mode = parse_threshold(score_threshold)
    classify_with = tuple(classify_with)
    check_network_ids(classify_with)
    progress(0.86, "merging slice detections")
    t = time.perf_counter()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if isinstance(fpr_model, str):
        fpr_model = load_fpr(dev)
    merged, found, cut = select_nodules(sd, ct, thr_mode, fpr_model, dev)
    t_merge = time.perf_counter() - t
    messages = list(sd.report.warnings)
    note = lung_volume_note(sd.lung)
    if note:
        messages.append(note)
    if fpr_model is None:
        messages.append("single-stage search: the false-positive-reduction weights (fpr25d) are not installed")
    t = time.perf_counter()
    nets, done = {}, {}
    masses = below_cut_candidates(sd, ct, merged, cut, fpr_model is not None) if classify_with else []
    if classify_with and (found or masses):
        from ..inference.pipeline import Click2DNetwork, check_point

        nets = {nid: (networks or {}).get(nid) or load_network(nid, dev) for nid in classify_with}
        clicker = Click2DNetwork(classify_with[0], nets[classify_with[0]], dev)

        def click(ct_, point):
            progress(0.87, f"outlining candidate at {tuple(round(v, 1) for v in point)}")
            try:
                check_point(ct_, point)
            except InputError:
                return None
            return clicker.analyze_box(ct_, point)

        n_found = len(found)
        found, outs = outline_with_click(found + masses, ct, click, max_kept=max_nodules, cut=cut,
                                         mass_rule=MASS_RULE, lung=sd.lung,
                                         territory_ml=MASS_TERRITORY_ML, recentre_ml=RECENTRE_ML)
        done = {id(nod): o for nod, o in zip(found, outs) if o is not None}
        if len(found) >= max_nodules and n_found > max_nodules:
            messages.append(f"more than {max_nodules} lesions above the score threshold {cut:.3f}; "
                            f"the {max_nodules} highest-scoring are reported")
    t_outline = time.perf_counter() - t
    if len(found) > max_nodules:
        messages.append(f"{len(found)} nodules above the score threshold {cut:.3f}; "
                        f"the {max_nodules} highest-scoring are reported")
        found = found[:max_nodules]
    if not found:
        messages.append(f"No nodule found: {merged.n_detections} slice detections, {len(merged.nodules)} candidates, "
                        f"none at or above the score threshold {cut:.3f}")

    t = time.perf_counter()
    results = []
    for n, nod in enumerate(found, start=1):
        res = NoduleResult(id=n, point_lps_mm=tuple(float(v) for v in nod.centre_lps), found=False,
                           detection=detection_record(nod, cut))
        box = nod.mask_box(ct.shape_zyx)  # the mask's bounding box + offset, not a CT-sized array
        if box is not None:
            res.mask = box
            res.found = True
            for key, v in measure_nodule(box, ct).items():
                setattr(res, key, v)
        else:
            res.message = "detected (box only): the mask head gave no voxel at the mask threshold"
        results.append(res)
    t_measure = time.perf_counter() - t

    t = time.perf_counter()
    if classify_with and results:
        for i, (res, nod) in enumerate(zip(results, found)):
            progress(0.9 + 0.09 * i / len(results), f"classifying nodule {res.id}/{len(results)}")
            if res.found:
                o = done.get(id(nod))
                _classify(ct, res, classify_with, nets, dev, {classify_with[0]: o} if o is not None else None)
    t_classify = time.perf_counter() - t
    progress(1.0, "done")

    lung_ml = None if sd.lung is None else round(sd.lung.volume_ml, 1)
    y0, y1, x0, x1 = sd.crop_yx
    ks = sd.slices_searched
    timing = {**(extra_timing or {}), **sd.timing_s, "merge": t_merge, "outline": t_outline, "measure": t_measure,
              "classify": t_classify}
    timing["total"] = sum(timing.values())
    run = {
        "software": f"NoduleMTL {__version__}", "mode": "detect", "reported_mask": "detector", "detector": DETECTOR_ID,
        "networks": list(classify_with), "device": str(dev), "torch": torch.__version__,
        "score_threshold": round(float(cut), 4),
        "threshold_mode": thr_mode if isinstance(thr_mode, str) else "fixed",
        "candidate_threshold": round(float(merged.score_threshold), 4),
        "fp_reduction": None if fpr_model is None else DEFAULT_FP_REDUCER,
        "score": "combined: sqrt(detector score x fpr25d probability)" if fpr_model is not None else "detector score",
        **sd.settings,
        "n_slices": int(ct.shape_zyx[0]), "n_slices_searched": len(ks),
        "search_box_ijk": [int(x0), int(y0), int(ks[0]) if ks else 0, int(x1), int(y1), int(ks[-1]) + 1 if ks else 0],
        "lung_volume_ml": lung_ml, "n_slice_detections": merged.n_detections, "n_kept": merged.n_kept,
        "n_nodules_merged": len(merged.nodules), "n_candidates": len(merged.nodules),
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }
    # raw outputs only: the analysis service calibrates and assesses (analysis.complete_result)
    return AnalysisResult(input=ct.describe(), run=run, nodules=results, messages=messages)


def detect_nodules(ct: CTVolume, model: torch.nn.Module | None = None, device="auto",
                   score_threshold: float | str = "default", use_clahe: bool = True, use_lung_mask: bool = True,
                   batch_slices: int = BATCH_SLICES, progress: Progress | None = None,
                   classify_with: Sequence[str] = (), *, networks: dict | None = None,
                   restrict_to_lungs: bool = True, input_scale: float = 1.0, channels_last: bool = False,
                   num_threads: int | None = None, max_nodules: int = MAX_NODULES,
                   lung: pp.LungMask | None = None, crop_per_batch: bool = True,
                   fpr_model: torch.nn.Module | None | str = "auto",
                   loader: Callable[[torch.device], torch.nn.Module] | None = None):
    """Find, segment and measure the nodules of a whole chest CT (module docstring, steps 1-6).

    :func:`run_slice_detections` followed by :func:`result_from_detections`.

    Args:
        ct: CT in HU (LPS geometry), >= 5 slices.
        model: the ``maskrcnn25d`` network; None loads the registered one (:func:`load_detector`).
        device: "auto" (CUDA when present) | "cpu" | "cuda" | "mps", or a torch.device.
        score_threshold: "default" (operating point of the two-stage search), "adaptive"
            (paper section 3.5; every candidate) or a float in [0, 1] (:func:`parse_threshold`).
        use_clahe, use_lung_mask: section 3.2 preprocessing switches.
        batch_slices: stacks per network call.
        progress: callback(fraction in [0, 1], message).
        classify_with: click network ids (e.g. ``registry.DEFAULT_NETWORKS``) run at each found nodule's
            centre; their malignancy / sign probabilities go to ``NoduleResult.networks``
            (``dice_with_final`` = Dice of their own mask with the detector's mask).
        networks: pre-loaded {id: module} for ``classify_with``.
        restrict_to_lungs, input_scale, channels_last, num_threads, crop_per_batch: speed
            options (see :func:`run_slice_detections`).
        max_nodules: report at most this many nodules (highest scores; 100).
        lung: precomputed lung mask.
        fpr_model: second stage (:func:`result_from_detections`); "auto" = installed ``fpr25d``.
        loader: ``callable(device) -> model`` used when ``model`` is None (default:
            the module's :func:`load_detector`; the analysis service passes its model cache).

    Returns:
        :class:`~NoduleMTLLib.core.results.AnalysisResult`: ``nodules`` ranked by descending
        detection score (id 1 = highest), each with its mask stored as a
        :class:`~NoduleMTLLib.core.consensus.MaskBox` (``mask_box``; reading ``mask`` gives the
        bool (z, y, x) array on the CT grid), the click path's measurements, ``point_lps_mm`` = the nodule's centre and
        ``detection`` (:func:`detection_record`: score, voxel / world box, centre, slice
        range); ``run`` describes the search (threshold used, slices searched, timings:
        load, lung_mask, preprocess, network, merge, measure, classify, total seconds);
        ``messages`` holds notes (thick slices, nodule cap, nothing found).

    Raises:
        InputError: fewer than 5 slices; more than :data:`MAX_VOXELS`; unknown ``classify_with`` id.
        NoLungError: no plausible lung in the CT.
        ValueError: bad ``score_threshold`` / ``batch_slices`` / ``input_scale``.
        WeightsError: detector or click-network weights missing.
        DeviceError: unavailable device.
    """
    from ..core.device import resolve_device
    from ..models.registry import check_network_ids

    t0 = time.perf_counter()
    progress = progress or (lambda f, m: None)
    parse_threshold(score_threshold)  # fail fast, before loading anything
    check_network_ids(classify_with)
    pp.check_detection_input(ct, warn=False)
    check_size(ct)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    t = time.perf_counter()
    if model is None:
        progress(0.0, f"loading {DETECTOR_ID} on {dev}")
        model = (loader or load_detector)(dev)
    t_load = time.perf_counter() - t
    sd = run_slice_detections(ct, model, dev, use_clahe=use_clahe, use_lung_mask=use_lung_mask,
                              restrict_to_lungs=restrict_to_lungs, batch_slices=batch_slices, input_scale=input_scale,
                              channels_last=channels_last, num_threads=num_threads, lung=lung, progress=progress,
                              crop_per_batch=crop_per_batch)
    res = result_from_detections(ct, sd, score_threshold, classify_with=classify_with, networks=networks, device=dev,
                                 max_nodules=max_nodules, progress=progress, extra_timing={"load": t_load},
                                 fpr_model=fpr_model)
    res.run["timing_s"]["total"] = round(time.perf_counter() - t0, 3)  # wall clock, overheads included
    return res
