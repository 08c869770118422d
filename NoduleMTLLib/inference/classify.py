"""A network's malignancy (and sign) probabilities for a given nodule mask: the one place where a
mask becomes the slice weights of the malignancy aggregation.

Both the click path (:meth:`NoduleMTLLib.inference.pipeline.Click2DNetwork.analyze_box` and
:func:`~NoduleMTLLib.inference.pipeline.analyze_points`, on the mask they report) and
re-classification (:func:`NoduleMTLLib.inference.refine.reclassify_from_mask`, on the given
mask) call :func:`classify_mask`, so re-classifying the unchanged mask of an analysis, centred on
the same click, reproduces the analysis' raw outputs and so its reported probability (issue 24).

How a mask is classified (our design; the papers classify their own segmentations):

* the network's axial patch grid (:meth:`~NoduleMTLLib.inference.pipeline.Click2DNetwork.grid`)
  centred on ``center_lps`` (the click), at the smallest zoom of the ladder at which the mask,
  resampled onto the grid (linear), does not touch the patch border (so it is not clipped);
* the resampled mask thresholded at 0.5 gives each patch slice's area; the network's slice
  malignancy (and sign) logits on the slices the mask covers are aggregated with
  :func:`NoduleMTLLib.inference.aggregation.nodule_logit_from_slices`, weighted by those areas;
* a network whose classifier takes the mask as an input channel (MT-Net's Class-net,
  ``classifies_mask``) gets the resampled mask in that channel.

Slice logits the click path already computed on the same grid are reused (``computed``); the
network runs only on covered slices it did not compute.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from ..core.consensus import MaskBox
from ..core.io import CTVolume
from .aggregation import nodule_logit_from_slices, sigmoid
from .preprocessing import normalize_slices
from .roi import extract_patch

#: Threshold of the linearly resampled mask on the patch grid (a patch pixel counts when at
#: least half of it is covered).
MASK_ON_GRID_THRESHOLD = 0.5


def mask_on_grid(ct: CTVolume, mask: MaskBox | np.ndarray, grid) -> np.ndarray:
    """Linear resampling of a CT-grid mask onto a patch grid -> float32 (z, y, x) in [0, 1].

    Only the mask's bounding box (plus one voxel of zeros inside the CT) is resampled, never a
    CT-sized image; inside the CT this gives the values a resampling of the full-grid mask gives
    (the added ring of zeros is what the interpolation reads next to the box).

    Args:
        ct: the CT whose grid the mask is on.
        mask: a :class:`~NoduleMTLLib.core.consensus.MaskBox` or a bool (z, y, x) array of shape ``ct.shape_zyx``.
        grid: :class:`NoduleMTLLib.inference.roi.PatchGrid`.
    """
    box = mask if isinstance(mask, MaskBox) else MaskBox.from_full(np.asarray(mask, bool))
    ref = grid.reference()
    if box is None:
        return np.zeros(tuple(int(s) for s in grid.size_xyz[::-1]), np.float32)
    lo = [max(0, o - 1) for o in box.offset_zyx]
    hi = [min(n, o + s + 1) for o, s, n in zip(box.offset_zyx, box.array.shape, box.shape_zyx)]
    arr = box.paste(tuple(lo), tuple(b - a for a, b in zip(lo, hi))).astype(np.float32)
    src = sitk.GetImageFromArray(arr)
    src.SetSpacing(ct.image.GetSpacing())
    src.SetDirection(ct.image.GetDirection())
    src.SetOrigin(ct.image.TransformIndexToPhysicalPoint([int(lo[2]), int(lo[1]), int(lo[0])]))
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def touches_border(m: np.ndarray, border_px: int = 0) -> bool:
    """True when a patch mask (z, y, x) has a pixel on the in-plane ring ``border_px`` from the
    edge or on the first or last slice."""
    b = border_px
    return bool(m[:, b, :].any() or m[:, -1 - b, :].any() or m[:, :, b].any() or m[:, :, -1 - b].any()
                or m[0].any() or m[-1].any())


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's parameters (``fallback`` for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return fallback


@torch.inference_mode()
def classnet_logits(model: torch.nn.Module, hu_zyx: np.ndarray, mask_zyx: np.ndarray, device, batch: int = 32) -> np.ndarray:
    """MT-Net Class-net logits (S,) of HU slices (S, H, W) with the given mask (S, H, W) as 2nd channel."""
    x = torch.from_numpy(np.ascontiguousarray(hu_zyx, dtype=np.float32))[:, None]
    m = torch.from_numpy(np.ascontiguousarray(mask_zyx, dtype=np.float32))[:, None]
    out = []
    for i in range(0, len(x), batch):
        xb = normalize_slices(x[i:i + batch]).to(device)
        out.append(model.classnet(torch.cat([xb, m[i:i + batch].to(device, xb.dtype)], dim=1)).float().cpu())
    return torch.cat(out).numpy()


def classify_mask(net, ct: CTVolume, mask: MaskBox | np.ndarray, center_lps, zooms, computed: dict | None = None) -> dict:
    """One network's malignancy (and sign) probabilities for a fixed mask (no segmentation).

    Args:
        net: a :class:`NoduleMTLLib.inference.pipeline.Click2DNetwork` (input grid, model in eval
            mode, device; ``net._run`` gives the slice logits of HU slices).
        ct: the CT (HU, LPS).
        mask: the nodule's mask on the CT grid (:class:`~NoduleMTLLib.core.consensus.MaskBox` or
            bool (z, y, x)), not empty.
        center_lps: patch centre (world LPS mm): the click, else the mask centroid.
        zooms: the zoom ladder (:data:`NoduleMTLLib.inference.pipeline.ZOOMS`).
        computed: ``{zoom: slice logits (z, 1 + n_signs) float32, NaN where not computed}`` of
            patches the caller already ran on the grids ``net.grid(ct, center_lps, zoom)``.

    Returns:
        dict ``malignancy_probability`` (float in [0, 1]), ``sign_probabilities`` ({name: p}),
        ``zoom`` (patch zoom used), ``slices`` (number of patch slices covered), ``mask_input``
        (True when the classifier took the mask as an input channel), ``clipped`` (True when
        the mask touches the border of the largest patch).
    """
    border = int(net.model.seg_border_px)
    for zoom in zooms:
        grid = net.grid(ct, center_lps, zoom)
        m = mask_on_grid(ct, mask, grid)
        clipped = touches_border(m > 0, border)
        if not clipped or zoom == zooms[-1]:
            break
    binary = m >= MASK_ON_GRID_THRESHOLD
    if not binary.any():  # a mask thinner than a patch pixel: keep every partially covered pixel
        binary = m > 0
    areas = binary.reshape(len(binary), -1).sum(1).astype(float)
    covered = np.nonzero(areas > 0)[0]
    mask_input = bool(getattr(net.model, "classifies_mask", False))
    signs: dict[str, float] = {}
    if mask_input:  # MT-Net: Class-net gets the mask as its 2nd input channel
        hu = extract_patch(ct, grid)[covered]
        mal = classnet_logits(net.model, hu, binary[covered], model_device(net.model, net.device))
    else:
        names = tuple(net.sign_names)
        logits = np.full((len(covered), 1 + len(names)), np.nan, np.float64)
        known = (computed or {}).get(zoom)
        if known is not None and len(known) == len(binary):
            logits[:] = np.asarray(known, np.float64)[covered]
        todo = np.nonzero(np.isnan(logits[:, 0]))[0]
        if len(todo):
            _, lg = net._run(extract_patch(ct, grid)[covered[todo]])
            lg = np.asarray(lg, dtype=np.float64)
            logits[todo] = lg if lg.ndim == 2 else lg[:, None]
        mal = logits[:, 0]
        for k, name in enumerate(names[: logits.shape[1] - 1]):
            signs[name] = round(float(sigmoid(nodule_logit_from_slices(logits[:, 1 + k], areas[covered]))), 4)
    p = float(sigmoid(nodule_logit_from_slices(mal, areas[covered])))
    return {"malignancy_probability": p, "sign_probabilities": signs, "zoom": zoom, "slices": int(len(covered)),
            "mask_input": mask_input, "clipped": clipped}
