"""On-the-fly 2D sampling/augmentation of ``lidc_slices`` crops into network inputs (torch, CPU).

Each sample is resampled from native pixel spacing to the network grid (``size`` px at
``spacing_mm``) with ``torch.nn.functional.grid_sample``; augmentation = zoom (spacing
jitter, occasionally x2 to mimic the click pipeline's zoom-out for masses), rotation,
flips and a click-offset translation.  Outside the source crop the image is padded with
0 (= the slice minimum of the 8-bit source, i.e. air) and the mask with 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def sample_batch(images, masks, spacings, size: int, spacing_mm: float, rng: np.random.Generator | None,
                 max_shift_mm: float = 8.0, zoom_range=(0.8, 1.25), p_zoom_out: float = 0.15):
    """Resample (and augment if ``rng`` is given) a batch of 2D slices.

    Args:
        images: list of (H, W) uint8/float arrays (native spacing).
        masks: list of (H, W) bool arrays, same shapes.
        spacings: list of native pixel spacings (mm).
        size: output side (px); spacing_mm: output pixel spacing (mm) before zoom jitter.
        rng: random generator; None -> deterministic centred resampling, no augmentation.

    Returns:
        (x, y): float32 tensors (N, 1, size, size); x in source intensity units, y in {0, 1}.
    """
    n = len(images)
    src = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])[:, None]
    msk = torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float32)) for m in masks])[:, None]
    theta = torch.zeros(n, 2, 3)
    for i in range(n):
        h, w = images[i].shape
        zoom, ang, fx, fy, tx, ty = 1.0, 0.0, 1.0, 1.0, 0.0, 0.0
        if rng is not None:
            zoom = float(rng.uniform(*zoom_range))
            if rng.random() < p_zoom_out:
                zoom *= 2.0
            ang = float(rng.uniform(-math.pi, math.pi))
            fx = -1.0 if rng.random() < 0.5 else 1.0
            fy = -1.0 if rng.random() < 0.5 else 1.0
            tx, ty = (float(v) for v in rng.uniform(-max_shift_mm, max_shift_mm, 2))
        fov_out = size * spacing_mm * zoom
        sx = fov_out / (w * spacings[i])
        sy = fov_out / (h * spacings[i])
        c, s = math.cos(ang), math.sin(ang)
        theta[i, 0] = torch.tensor([sx * c * fx, -sx * s * fy, tx / (w * spacings[i] / 2)])  # scale . rotation . flip
        theta[i, 1] = torch.tensor([sy * s * fx, sy * c * fy, ty / (h * spacings[i] / 2)])
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(msk, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return x, y
