"""False-positive reduction of whole-scan candidates (``fpr25d``): the second stage of Find nodules.

Not in the seed paper (Li & Honarvar Shakibaei Asli 2026 stop at the Mask R-CNN); every
strong LUNA16 system has such a stage: Setio A.A.A. et al., "Pulmonary nodule detection in
CT images: false positive reduction using multi-view convolutional networks", IEEE TMI
35(5), 2016, and the false-positive-reduction track of LUNA16 (Setio et al., Med. Image
Anal. 42, 2017, section 2.3).  Ours is a small 2.5D ConvNet on each candidate's HU
neighbourhood:

* **Input** (:func:`candidate_input`): float32 (6, 32, 32): two concentric axial fields of 32 x 32
  pixels, 24 mm (:func:`candidate_patch`, below) and 48 mm (:data:`CONTEXT_FIELD_MM`, 1.5 mm per
  pixel; multi-level context after Dou et al., IEEE TBME 2017), three channels each.  The 24 mm
  field (the one-field variant ``FPR25D(context=False)`` sees only it): float32 (3, 32, 32), a 24 mm x 24 mm axial field
  (0.75 mm per pixel, bilinear; outside the volume -1000 HU) centred on the candidate, HU window [-1000, 400] -> [0, 1];
  channel 0 = the candidate's centre slice, 1 = the mean and 2 = the maximum over the
  candidate's slice range [k0, k1] (inclusive), plus one scalar: the range's extent in mm
  (/ 10).  The field stops at the candidate's own slices on purpose: the positives it
  learned from are the LIDC nodule VOIs of training patients, which are cut at the
  nodule's own slices; giving the negatives more z context than the positives would teach
  the network a shortcut.  (The VOIs are tight ~30 mm crops: for the 48 mm field each VOI is
  placed into the same nodule's wider ``lidc_slices`` PNG slices brought back to HU,
  ``training/fp_reduction.py`` ``voi_context_samples``.)
* **Network** (:class:`FPR25D`): per field 3 x (conv 3x3 - BN - ReLU, conv 3x3 - BN - ReLU,
  max-pool 2), 16/32/64 channels, global average pool; both fields' features and the scalar
  concatenated, FC 64 -> 1 (logit).
* **Combined score** (:func:`combined_score`): geometric mean of the detector score and the
  FPR probability, sqrt(s_det * p_fpr): a candidate must convince both stages.  The
  reported score of a found nodule is the combined one; ``nodules.json`` keeps both
  (``detection.detector_score``, ``detection.fp_reduction_score``, ``detection.score``).
* **Operating point** (:func:`NoduleMTLLib.models.registry.operating_points`, read from the weights' manifest entry): the
  combined-score threshold for at most 2 false positives per scan, chosen on six non-test whole scans - the validation scans
  (LIDC-IDRI-0004, -0007) and the four training scans scored by cross-validation folds that
  did not train on them - never the test scans (``training/fp_reduction.py``, model card
  ``Resources/Weights/fpr25d.md``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: Registry id of the false-positive-reduction network.
FPR_ID = "fpr25d"
#: Candidates are the detector's merged nodules at the paper's adaptive threshold (section 3.5).
CANDIDATE_THRESHOLD = "adaptive"
#: Patch geometry.
PATCH_PX = 32
FIELD_MM = 24.0
#: Second, wider field of the context variant (``FPR25D(context=True)``): 48 mm at 1.5 mm per
#: pixel, same 32 px and channels, after the multi-level contextual FPR of Dou Q. et al.,
#: "Multilevel contextual 3-D CNNs for false positive reduction in pulmonary nodule detection",
#: IEEE TBME 64(7), 2017 (receptive fields of several sizes around each candidate).
CONTEXT_FIELD_MM = 48.0
#: Does the shipped ``fpr25d.safetensors`` use the context field? (The registry builds
#: ``FPR25D()`` with this default.)
SHIPPED_CONTEXT = True
HU_WINDOW = (-1000.0, 400.0)
#: Input of the shipped :class:`FPR25D` (read by the registry, ``NetworkSpec.input_spec``):
#: float32 (N, 6, 32, 32) inputs of :func:`candidate_input` and a float32 (N,) scalar.
INPUT_SPEC = {"dims": 2.5, "channels": 6 if SHIPPED_CONTEXT else 3, "size_px": PATCH_PX, "field_mm": FIELD_MM,
              "context_field_mm": CONTEXT_FIELD_MM if SHIPPED_CONTEXT else None,
              "channels_are": "centre slice, mean and max over the candidate's slice range"
                              + (" in the 24 mm field, then the same in the 48 mm field" if SHIPPED_CONTEXT else ""),
              "scalar": "slice-range extent (mm) / 10", "intensity": "HU window [-1000, 400] -> [0, 1]"}


def candidate_patch(hu_zyx: np.ndarray, spacing_xyz, centre_ijk, k_range, offset_mm=(0.0, 0.0),
                    field_mm: float = FIELD_MM) -> np.ndarray:
    """The FPR input of one candidate (module docstring).

    Args:
        hu_zyx: (z, y, x) CT in HU (any numeric dtype).
        spacing_xyz: voxel spacing (x, y, z) in mm.
        centre_ijk: continuous voxel index (i = column x, j = row y, k = slice) of the centre.
        k_range: (k0, k1) inclusive slice range of the candidate (clipped to the volume).
        offset_mm: in-plane shift (x, y) of the field centre in mm (training augmentation).
        field_mm: side of the square field in mm (:data:`FIELD_MM`; :data:`CONTEXT_FIELD_MM`
            for the context field), always sampled on PATCH_PX x PATCH_PX pixels.

    Returns:
        float32 (3, PATCH_PX, PATCH_PX) in [0, 1] (outside the volume: -1000 HU -> 0).

    Raises:
        ValueError: empty slice range.
    """
    nz = hu_zyx.shape[0]
    k0, k1 = max(0, int(k_range[0])), min(nz - 1, int(k_range[1]))
    if k1 < k0:
        raise ValueError(f"empty slice range {k_range} for a volume of {nz} slices")
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    step = float(field_mm) / PATCH_PX
    t = (np.arange(PATCH_PX) - (PATCH_PX - 1) / 2.0) * step
    xs = centre_ijk[0] + (t + offset_mm[0]) / sx
    ys = centre_ijk[1] + (t + offset_mm[1]) / sy
    lo, hi = HU_WINDOW
    # bilinear interpolation on the slices' sub-block, padded by one voxel of -1000 HU
    # (outside the volume the CT is air), all slices of the range at once
    j0, j1 = max(0, int(math.floor(ys.min()))), min(hu_zyx.shape[1], int(math.floor(ys.max())) + 2)
    i0, i1 = max(0, int(math.floor(xs.min()))), min(hu_zyx.shape[2], int(math.floor(xs.max())) + 2)
    sub = np.full((k1 - k0 + 1, max(0, j1 - j0) + 2, max(0, i1 - i0) + 2), lo, np.float32)
    if j1 > j0 and i1 > i0:
        sub[:, 1:-1, 1:-1] = hu_zyx[k0:k1 + 1, j0:j1, i0:i1]
    y = np.clip(ys - j0 + 1, 0, sub.shape[1] - 1)
    x = np.clip(xs - i0 + 1, 0, sub.shape[2] - 1)
    ya, xa = np.minimum(np.floor(y).astype(int), sub.shape[1] - 2), np.minimum(np.floor(x).astype(int), sub.shape[2] - 2)
    wy, wx = (y - ya)[:, None], (x - xa)[None, :]
    ya, xa = ya[:, None], xa[None, :]
    sl = (sub[:, ya, xa] * (1 - wy) * (1 - wx) + sub[:, ya, xa + 1] * (1 - wy) * wx
          + sub[:, ya + 1, xa] * wy * (1 - wx) + sub[:, ya + 1, xa + 1] * wy * wx)
    sl = np.clip((sl - lo) / (hi - lo), 0.0, 1.0)
    kc = int(round(min(max(centre_ijk[2], k0), k1))) - k0
    return np.stack([sl[kc], sl.mean(0), sl.max(0)]).astype(np.float32)


def candidate_input(hu_zyx: np.ndarray, spacing_xyz, centre_ijk, k_range, offset_mm=(0.0, 0.0),
                    context: bool = False) -> np.ndarray:
    """The image input of :class:`FPR25D`: float32 (3, 32, 32) of :func:`candidate_patch`, or
    with ``context`` float32 (6, 32, 32) = the 24 mm field's three channels followed by the
    same three channels over the :data:`CONTEXT_FIELD_MM` field (same centre, slices, shift).

    Raises:
        ValueError: empty slice range.
    """
    p = candidate_patch(hu_zyx, spacing_xyz, centre_ijk, k_range, offset_mm)
    if not context:
        return p
    q = candidate_patch(hu_zyx, spacing_xyz, centre_ijk, k_range, offset_mm, CONTEXT_FIELD_MM)
    return np.concatenate([p, q])


def extent_feature(k_range, spacing_z_mm: float) -> float:
    """Scalar input: the slice range's extent in mm (number of slices x spacing) / 10."""
    return (int(k_range[1]) - int(k_range[0]) + 1) * float(spacing_z_mm) / 10.0


class FPR25D(nn.Module):
    """2.5D false-positive-reduction ConvNet (module docstring).

    Forward: ``x`` float32 (N, 3, 32, 32) in [0, 1] - (N, 6, 32, 32) with ``context``, see
    :func:`candidate_input` - and ``extent`` float32 (N,) -> logits (N,).  With ``context`` the
    wide field goes through its own tower of the same design (Dou et al. 2017 use one network
    per receptive field) and both towers' pooled features are concatenated.
    """

    def __init__(self, width: int = 16, context: bool | None = None):
        super().__init__()
        self.context = SHIPPED_CONTEXT if context is None else bool(context)

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        w = width
        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))
        if self.context:
            self.context_features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))
        n_feat = 4 * w * (2 if self.context else 1)
        self.head = nn.Sequential(nn.Linear(n_feat + 1, 64), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
        want = 6 if self.context else 3
        if x.ndim != 4 or x.shape[1] != want:
            raise ValueError(f"FPR25D(context={self.context}) takes (N, {want}, H, W) patches, got {tuple(x.shape)}")
        f = self.features(x[:, :3]).mean(dim=(2, 3))
        if self.context:
            f = torch.cat([f, self.context_features(x[:, 3:]).mean(dim=(2, 3))], 1)
        return self.head(torch.cat([f, extent.reshape(-1, 1).to(f.dtype)], 1)).squeeze(1)


def fpr_for_state_dict(sd: dict, width: int = 16) -> FPR25D:
    """An untrained :class:`FPR25D` of the variant a state dict was saved from (the two-field
    variant has ``context_features.*`` keys), for ``load_state_dict(sd)``."""
    return FPR25D(width, context=any(k.startswith("context_features.") for k in sd))


def combined_score(detector_score: float, fpr_score: float) -> float:
    """Geometric mean sqrt(detector_score * fpr_score) of the two stages' scores (both in [0, 1])."""
    return float(math.sqrt(max(0.0, float(detector_score)) * max(0.0, float(fpr_score))))


@torch.inference_mode()
def score_candidates(model: nn.Module, hu_zyx: np.ndarray, spacing_xyz, candidates, device="cpu",
                     batch: int = 64, field_scale: float = 1.0) -> np.ndarray:
    """FPR probabilities of candidates.

    ``field_scale`` f > 1 widens both fields f times in mm (and divides the extent scalar by
    f): a candidate found on the CT shrunk f times in-plane (multi-scale search of masses)
    is seen at the size the network learned nodules at - a 60 mm mass in a 96 mm field looks
    like a 30 mm nodule in the 48 mm one.

    Args:
        model: :class:`FPR25D` in eval mode.
        hu_zyx: (z, y, x) CT in HU.
        spacing_xyz: (x, y, z) mm.
        candidates: sequence of (centre_ijk, (k0, k1)) pairs.
        device: torch device.
        batch: candidates per forward pass.
        field_scale: field widening factor (1 = the trained geometry).

    Returns:
        float64 (N,) probabilities in [0, 1].

    Raises:
        ValueError: field_scale <= 0.
    """
    if not field_scale > 0:
        raise ValueError(f"field_scale must be > 0, got {field_scale}")
    spacing_xyz = tuple(float(v) / float(field_scale) for v in spacing_xyz)
    out = []
    cands = list(candidates)
    for s in range(0, len(cands), batch):
        part = cands[s:s + batch]
        ctx = bool(getattr(model, "context", False))
        x = torch.from_numpy(np.stack([candidate_input(hu_zyx, spacing_xyz, c, kr, context=ctx) for c, kr in part])).to(device)
        e = torch.tensor([extent_feature(kr, spacing_xyz[2]) for _, kr in part], dtype=torch.float32, device=device)
        out.append(torch.sigmoid(model(x, e).float()).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
