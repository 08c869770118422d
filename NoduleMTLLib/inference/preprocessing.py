"""Intensity preprocessing shared by training and inference.

Why an affine-invariant normalisation: the LIDC 2D training slices
(``../shared/data/lidc_slices``) are 8-bit PNGs that are an exact *linear* function of
HU, but with a per-slice offset and gain: 0 = the minimum and 255 = the maximum HU of
the whole 512 x 512 source slice (we matched 119 of them to the HU VOIs of the same
nodules: normalised cross-correlation 0.9998 median; the HU mapped to 0 was -1024 in
the median (-3024 to -896), the HU mapped to 255 ranged 436 to 3073; reproduce with
``python -m training.calibrate_slices``).  Those slice extremes are not recoverable
from the 128 x 128 crops, so no fixed HU window reproduces the PNGs.  Instead every
network input slice - PNG at training time, HU at inference time - is normalised by
its own robust range (1st and 99th percentile -> 0 and 1).  An affine map of the
intensities leaves this normalisation unchanged, so training and inference see the
same values up to 8-bit quantisation (about 10 HU per grey level).
"""

from __future__ import annotations

import torch

#: HU used to pad patches beyond the end of the volume (air).
PAD_HU = -1024.0
#: Percentiles of the per-slice robust range.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0


def normalize_slices(x: torch.Tensor) -> torch.Tensor:
    """Per-slice robust affine-invariant normalisation.

    Args:
        x: (N, 1, H, W) float tensor, any affine intensity scale (HU or 8-bit PNG values).

    Returns:
        (N, 1, H, W) float32: ``(x - p1) / (p99 - p1)`` per slice, clipped to [-0.5, 1.5].
        Slices with p99 == p1 (flat) become all zeros.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1).float()
    q = torch.quantile(flat, torch.tensor([LOW_PERCENTILE / 100, HIGH_PERCENTILE / 100], dtype=flat.dtype), dim=1)
    lo, hi = q[0][:, None], q[1][:, None]
    scale = (hi - lo)
    out = torch.where(scale > 1e-6, (flat - lo) / scale.clamp_min(1e-6), torch.zeros_like(flat))
    return out.clamp(-0.5, 1.5).reshape(x.shape)
