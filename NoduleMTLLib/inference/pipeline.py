"""Click -> ROI -> network -> mask on the CT grid -> measurements.

``analyze_points`` is the single entry point used by the ``nodulemtl`` command, the
Slicer module's logic and the tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.device import resolve_device
from ..core.io import CTVolume, InputError
from ..core.postprocess import component_near, cut_at_neck, measure_nodule, truncate_axial_leak
from ..core.results import AnalysisResult, NetworkOutput, NoduleResult, run_record
from ..models.registry import DEFAULT_NETWORKS, NETWORKS, check_network_ids, load_network
from .aggregation import nodule_logit_from_slices, sigmoid
from .classify import classify_mask
from .preprocessing import normalize_slices
from .roi import PatchGrid, extract_patch, patch_to_ct_region, slice_axis_spacing

Progress = Callable[[float, str], None]

#: Zoom ladder of the click path: the patch is re-run at 2x and 4x the input spacing
#: when the nodule touches the patch border, so masses larger than the 77 mm field of
#: view are not clipped (up to 307 mm).
ZOOMS = (1.0, 2.0, 4.0)
#: Probability threshold of the segmentation (a network's measured threshold in clinical.json replaces it:
#: ``NoduleMTLLib.clinical.lung_rads.mask_threshold``).
THRESHOLD = 0.5
#: How far (mm) from the click the nearest segmented component may lie.
MAX_CLICK_DISTANCE_MM = 5.0
#: Median HU around the click at or above which an empty result triggers a zoom-out (soft tissue).
SOLID_TISSUE_HU = -300.0
#: Below this HU a voxel is air for the outside-body check.
AIR_HU = -500.0


@dataclass
class ClickOutput:
    """One network's answer for one click: ``mask`` on the CT grid (bool z, y, x; a
    :class:`~NoduleMTLLib.core.consensus.MaskBox` from :meth:`Click2DNetwork.analyze_box`) or None."""

    mask: np.ndarray | None
    malignancy_probability: float
    sign_probabilities: dict
    zoom: float
    message: str = ""
    #: ``{zoom: slice logits (z, 1 + n_signs), NaN where not computed}`` of the patches run at the
    #: click (reused when another mask is classified on the same grids: :func:`.classify.classify_mask`)
    logits_by_zoom: dict | None = None


def hu_center(ct: CTVolume, point_lps, radius_mm: float = 2.0) -> np.ndarray:
    """HU values within ~``radius_mm`` of a point (in-plane 5 x 5 neighbourhood at 1 mm)."""
    g = PatchGrid(tuple(float(v) for v in point_lps), (5, 5, 1), (radius_mm / 2, radius_mm / 2, 1.0))
    return extract_patch(ct, g).ravel()


class Click2DNetwork:
    """Runs a 2D slice network (any registered click network) on an axial stack around a click.

    The model satisfies :class:`NoduleMTLLib.models.contract.ClickNetwork`: ``forward_click`` ->
    ``(seg logits (N, 1, H, W), malignancy logit (N,), {sign: (N,) logit})`` with the keys
    ``sign_heads``; ``seg_border_px`` is the outer ring of the patch that the network never
    segments (DSMT-Net's local crop), used by the zoom ladder.  The input grid is the
    network file's ``INPUT_SPEC`` (``size_px``, ``spacing_mm``).

    Args:
        network_id: registry id; model: loaded torch module in eval mode; device: torch device.
        tta: test-time augmentation: every slice is also run mirrored left-right and the two
            answers are averaged (segmentation probability after mirroring back; malignancy
            and sign logits).  Doubles the network time.  Off by default: measured on the
            held-out VOIs in ``training/RESULTS.md`` ("Test-time augmentation").
    """

    #: class default, so subclasses that skip ``__init__`` (``refine._PatchNetwork``) run without TTA
    tta: bool = False
    #: probability threshold of the mask (:data:`THRESHOLD` unless a measured per-network value is set)
    threshold: float = THRESHOLD

    def __init__(self, network_id: str, model: torch.nn.Module, device: torch.device, batch: int = 32,
                 tta: bool = False):
        spec = NETWORKS[network_id].input_spec
        self.network_id, self.model, self.device, self.batch, self.tta = network_id, model, device, batch, tta
        self.size, self.spacing = int(spec["size_px"]), float(spec["spacing_mm"])
        from ..clinical.lung_rads import mask_threshold
        self.threshold = mask_threshold(network_id, THRESHOLD)  # measured per network (clinical.json), else 0.5

    def grid(self, ct: CTVolume, point_lps, zoom: float) -> PatchGrid:
        sxy = self.spacing * zoom
        sz = max(slice_axis_spacing(ct), sxy)
        nz = int(math.ceil(self.size * sxy / sz)) | 1  # odd: the click lies on the middle slice
        return PatchGrid(tuple(float(v) for v in point_lps), (self.size, self.size, nz), (sxy, sxy, sz))

    @property
    def sign_names(self) -> tuple[str, ...]:
        """Radiological-sign heads of the network (empty for malignancy-only networks)."""
        return tuple(self.model.sign_heads)

    def _forward(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised slices (N, 1, H, W) -> (seg probability (N, H, W), logits (N, 1 + n_signs))."""
        seg, cls, signs = self.model.forward_click(xb)  # the contract (NoduleMTLLib.models.contract.ClickNetwork)
        lg = torch.stack([cls] + [signs[k] for k in self.sign_names], 1)
        return torch.sigmoid(seg)[:, 0].float(), lg.float()

    @torch.inference_mode()
    def _run(self, hu_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z, y, x) HU -> (prob (z, y, x) float32, logits (z, 1 + n_signs) float32: malignancy, then signs)."""
        x = torch.from_numpy(np.ascontiguousarray(hu_zyx))[:, None]
        probs, logits = [], []
        for i in range(0, len(x), self.batch):
            xb = normalize_slices(x[i:i + self.batch]).to(self.device)
            pr, lg = self._forward(xb)
            if self.tta:  # left-right mirror, answers averaged (the mask mirrored back)
                pf, lf = self._forward(torch.flip(xb, dims=(-1,)))
                pr, lg = (pr + torch.flip(pf, dims=(-1,))) / 2, (lg + lf) / 2
            probs.append(pr.cpu()); logits.append(lg.cpu())
        return torch.cat(probs).numpy(), torch.cat(logits).numpy()

    def run_patch(self, hu_zyx: np.ndarray, first_half_width: int = 4, step: int = 8,
                  threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on the slices of an HU patch, from the middle slice outwards.

        Starts with the middle 2 * ``first_half_width`` + 1 slices and extends a side by
        ``step`` slices only while that side's outermost computed slice holds any pixel
        above ``threshold`` (None: :attr:`threshold`).  A connected component through the middle slice cannot
        continue past a slice with no positive pixel, so the component at the click is the
        same as with every slice computed, at a fraction of the cost for small nodules.

        Returns:
            (prob (z, y, x) float32, zeros on slices not computed; slice logits (z, 1 + n_signs)
            float32 - malignancy then :attr:`sign_names` - NaN on slices not computed).
        """
        t = self.threshold if threshold is None else float(threshold)
        nz = len(hu_zyx)
        c = nz // 2
        prob = np.zeros(hu_zyx.shape, np.float32)
        logits = np.full((nz, 1 + len(self.sign_names)), np.nan, np.float32)
        lo, hi = max(0, c - first_half_width), min(nz, c + first_half_width + 1)
        prob[lo:hi], logits[lo:hi] = self._run(hu_zyx[lo:hi])
        while True:
            grew = False
            if lo > 0 and (prob[lo] > t).any():
                new = max(0, lo - step)
                prob[new:lo], logits[new:lo] = self._run(hu_zyx[new:lo]); lo = new; grew = True
            if hi < nz and (prob[hi - 1] > t).any():
                new = min(nz, hi + step)
                prob[hi:new], logits[hi:new] = self._run(hu_zyx[hi:new]); hi = new; grew = True
            if not grew:
                return prob, logits

    def analyze(self, ct: CTVolume, point_lps) -> ClickOutput:
        """Segment and classify the nodule at a click.

        Returns:
            :class:`ClickOutput` with ``mask`` bool (z, y, x) on the whole CT grid, or None
            when nothing was segmented (see :meth:`analyze_box` for the same answer with the
            mask as its bounding box).
        """
        out = self.analyze_box(ct, point_lps)
        if out.mask is not None:
            out.mask = out.mask.to_full()
        return out

    def analyze_box(self, ct: CTVolume, point_lps) -> ClickOutput:
        """:meth:`analyze` without any CT-sized array: ``ClickOutput.mask`` is a
        :class:`~NoduleMTLLib.core.consensus.MaskBox` (tight bounding box + offset on the CT
        grid; the same voxels as :meth:`analyze`'s full-grid mask) or None."""
        from ..core.consensus import MaskBox

        computed = {}  # zoom -> slice logits of that patch (reused to classify the final mask)
        for zoom in ZOOMS:
            g = self.grid(ct, point_lps, zoom)
            prob, logits = self.run_patch(extract_patch(ct, g))
            computed[zoom] = logits
            center = tuple((n - 1) / 2 for n in g.size_xyz[::-1])
            comp = component_near(prob > self.threshold, center, g.spacing_xyz[::-1], MAX_CLICK_DISTANCE_MM)
            if not comp.any():
                # Inside a large solid mass the small field of view shows no edge to segment:
                # zoom out while the click lies in soft tissue.
                if zoom != ZOOMS[-1] and np.median(hu_center(ct, point_lps)) >= SOLID_TISSUE_HU:
                    continue
                return ClickOutput(None, float("nan"), {}, zoom, "no nodule segmented at this point", computed)
            comp = truncate_axial_leak(comp, len(comp) // 2)
            comp = cut_at_neck(comp, len(comp) // 2, g.spacing_xyz[0] * g.spacing_xyz[1])
            comp = component_near(comp, center, g.spacing_xyz[::-1], MAX_CLICK_DISTANCE_MM)
            b = int(self.model.seg_border_px)  # networks that segment only the patch centre
            touches = comp[:, b, :].any() or comp[:, -1 - b, :].any() or comp[:, :, b].any() or comp[:, :, -1 - b].any() \
                or comp[0].any() or comp[-1].any()
            if not touches or zoom == ZOOMS[-1]:
                break
        # probability map restricted to the chosen component, back on the CT grid
        region, sl = patch_to_ct_region(np.where(comp, prob, 0.0), g, ct)
        # keep the CT-grid component at/near the click; component_near only looks at the
        # box of the mask and the seed, so the region around both gives the full grid's answer
        seed = tuple(int(round(v)) for v in ct.world_lps_to_index(point_lps)[::-1])
        mask = None
        if region.size and all(0 <= v < n for v, n in zip(seed, ct.shape_zyx)):
            lo = [min(s_.start, v) for s_, v in zip(sl, seed)]
            hi = [max(s_.stop, v + 1) for s_, v in zip(sl, seed)]
            sub = np.zeros([b - a for a, b in zip(lo, hi)], bool)
            sub[tuple(slice(s_.start - a, s_.stop - a) for s_, a in zip(sl, lo))] = region > self.threshold
            sub = component_near(sub, [v - a for v, a in zip(seed, lo)], ct.spacing[::-1],
                                 MAX_CLICK_DISTANCE_MM + max(ct.spacing))
            box = MaskBox.from_full(sub)  # tight box inside the region (None when empty)
            if box is not None:
                mask = MaskBox(tuple(int(o + a) for o, a in zip(box.offset_zyx, lo)), box.array,
                               tuple(int(v) for v in ct.shape_zyx))
        if mask is not None:  # the answer for the mask this network reports, exactly as re-classifying it gives
            cls = classify_mask(self, ct, mask, point_lps, ZOOMS, computed)
            p, signs = cls["malignancy_probability"], cls["sign_probabilities"]
        else:  # nothing on the CT grid: the patch component's slice areas
            areas = comp.reshape(len(comp), -1).sum(1)
            done = ~np.isnan(logits[:, 0])
            p = float(sigmoid(nodule_logit_from_slices(logits[done, 0], areas[done])))
            signs = {name: round(float(sigmoid(nodule_logit_from_slices(logits[done, 1 + k], areas[done]))), 4)
                     for k, name in enumerate(self.sign_names)}
        msg = "" if mask is not None else "segmentation vanished when resampled to the CT grid (nodule smaller than a voxel?)"
        if touches:
            msg = "nodule reaches the border of the largest patch; mask may be clipped"
        return ClickOutput(mask, p, signs, zoom, msg, computed)


def check_point(ct: CTVolume, point_lps) -> None:
    """Raise InputError if the point is outside the volume or clearly outside the body.

    Outside-body test: on the CT slice through the point, air (< -500 HU) connected to the
    slice border is outside the body.  Done only when the slice covers >= 150 mm in both
    directions (on tight crops, lung air reaches the border too and the test would be wrong).
    """
    from skimage import measure

    if not ct.contains_lps(point_lps):
        ras = tuple(round(v, 1) for v in (-point_lps[0], -point_lps[1], point_lps[2]))
        raise InputError(f"Point RAS {ras} mm (LPS {tuple(round(float(v), 1) for v in point_lps)}) is outside the CT volume")
    i, j, k = (int(round(v)) for v in ct.world_lps_to_index(point_lps))
    size = ct.image.GetSize()
    i, j, k = min(max(i, 0), size[0] - 1), min(max(j, 0), size[1] - 1), min(max(k, 0), size[2] - 1)
    if size[0] * ct.spacing[0] < 150 or size[1] * ct.spacing[1] < 150:
        return
    sl = np.asarray(ct.array[k]) < AIR_HU
    if not sl[j, i]:
        return
    lab = measure.label(sl, connectivity=1)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    if lab[j, i] in border:
        ras = tuple(round(v, 1) for v in (-point_lps[0], -point_lps[1], point_lps[2]))
        raise InputError(f"Point RAS {ras} mm lies in the air outside the body; click inside the lung")


def analyze_points(ct: CTVolume, points_lps: Sequence[Sequence[float]], network_ids=DEFAULT_NETWORKS, device="auto",
                   progress: Progress | None = None, networks: dict | None = None, mask: str = "first",
                   tta: bool = False) -> AnalysisResult:
    """Segment, measure and classify the nodule at each clicked point.

    Args:
        ct: the CT (HU, LPS geometry).
        points_lps: world LPS points (mm), one per nodule.
        network_ids: registry ids to run.
        device: "auto" | "cpu" | "cuda" | "mps".
        progress: optional callback(fraction in [0, 1], message).
        networks: optional pre-loaded {id: torch module} (reuse across calls).
        mask: which mask is reported (label map, segmentation, measurements): ``"first"``
            the first network's (default), or ``"consensus"`` the consensus of the networks
            that found the nodule (``NoduleMTLLib.core.consensus``: voxels of at least half of
            them; with two networks their union).  Every nodule carries every network's own mask
            (``network_masks``) and the consensus figures (``consensus``) either way.  With
            ``"first"`` the long / short axis carry the first network's measured size correction
            (:func:`NoduleMTLLib.clinical.lung_rads.size_correction`; ``NoduleResult.size_correction``).
        tta: left-right mirrored test-time augmentation in every network (:class:`Click2DNetwork`).

    Returns:
        :class:`AnalysisResult`; nodule ids 1..N in point order.  A point where no nodule
        is segmented gives ``found=False`` with a message (not an exception).  Raw outputs
        only: the networks' probabilities in ``networks``; the reported (calibrated)
        ``malignancy_probability`` and the Lung-RADS / Brock records are added by the
        analysis service (:func:`NoduleMTLLib.service.analysis.complete_result`).

    Raises:
        InputError: a point outside the volume / body, no points, unknown network, unknown ``mask``.
        WeightsError: weights missing, unreadable or failing their checksum.
        DeviceError: an unavailable device was requested.
    """
    t0 = time.perf_counter()
    progress = progress or (lambda f, m: None)
    if len(points_lps) == 0:
        raise InputError("No points given: click at least one nodule")
    if mask not in ("first", "consensus"):
        raise InputError(f"Unknown mask choice {mask!r}: use 'first' or 'consensus'")
    from ..clinical.lung_rads import size_correction
    from ..core.consensus import box_dice, compute_consensus
    check_network_ids(network_ids)
    pts = [tuple(float(v) for v in p) for p in points_lps]
    for p in pts:
        check_point(ct, p)
    dev = resolve_device(device)
    progress(0.02, f"loading {', '.join(network_ids)} on {dev}")
    models = {}
    for nid in network_ids:
        m = (networks or {}).get(nid) or load_network(nid, dev)
        models[nid] = Click2DNetwork(nid, m, dev, tta=tta)
    t_load = time.perf_counter() - t0
    nodules = []
    for n, p in enumerate(pts, start=1):
        outs = {}
        for nid, net in models.items():
            progress(0.05 + 0.9 * (n - 1) / len(pts), f"nodule {n}/{len(pts)}: {nid}")
            outs[nid] = net.analyze_box(ct, p)  # the mask as a MaskBox: no CT-sized array per network
        main = outs[network_ids[0]]
        boxes = {nid: o.mask for nid, o in outs.items()}
        cons = compute_consensus(boxes, {nid: o.malignancy_probability for nid, o in outs.items()},
                                 {nid: o.sign_probabilities for nid, o in outs.items()})
        reported, msg = main.mask, main.message
        if mask == "consensus":
            reported = cons.mask
            msg = "; ".join(f"{nid}: {o.message}" for nid, o in outs.items() if o.message)
            if reported is None and cons.n_found:
                msg = "no voxel is segmented by a majority of the networks" + (f" ({msg})" if msg else "")
        if reported is not None and any(o.mask is not reported for o in outs.values()):
            # every network classifies the reported mask (the one written), as re-classifying it does
            for nid, o in outs.items():
                if o.mask is not reported:
                    cls = classify_mask(models[nid], ct, reported, p, ZOOMS, o.logits_by_zoom)
                    o.malignancy_probability, o.sign_probabilities = cls["malignancy_probability"], cls["sign_probabilities"]
            cons = compute_consensus(boxes, {nid: o.malignancy_probability for nid, o in outs.items()},
                                     {nid: o.sign_probabilities for nid, o in outs.items()})
        res = NoduleResult(id=n, point_lps_mm=p, found=reported is not None, message=msg,
                           network_masks=boxes, consensus=cons, reported_mask=mask)
        if reported is not None:
            res.mask = reported
            # the first network's own mask: its measured size correction (none for a consensus mask)
            corr = size_correction(network_ids[0]) if mask == "first" else None
            for k, v in measure_nodule(reported, ct, corr).items():
                setattr(res, k, v)
        for nid, o in outs.items():
            dwf = None
            if o.mask is not None and reported is not None:
                dwf = round(box_dice(o.mask, reported), 4)
            res.networks[nid] = NetworkOutput(nid, None if math.isnan(o.malignancy_probability) else round(o.malignancy_probability, 4),
                                              o.sign_probabilities, dwf)
        nodules.append(res)
    progress(1.0, "done")
    run = run_record("click", network_ids, dev, mask if mask == "consensus" else f"first ({network_ids[0]})",
                     {"load": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)},
                     threshold=models[network_ids[0]].threshold,
                     mask_thresholds={nid: net.threshold for nid, net in models.items()})
    if tta:
        run["tta"] = "left-right flip"
    return AnalysisResult(input=ct.describe(), run=run, nodules=nodules)
