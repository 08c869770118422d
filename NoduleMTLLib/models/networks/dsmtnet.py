"""DSMT-Net: dual-scale, dual-encoder multi-task nodule classification with auxiliary segmentation.

Source: "DSMT-Net: A Dual-Scale Multi-Task Learning Framework for Invasiveness Prediction of
Medium-Sized Pulmonary Nodules" (abstract only; seed ``003_ea7eb81bd13811e4.txt``).  What
the abstract specifies, and we keep:

* a **dual-encoder** architecture capturing **local** morphological detail and **global**
  pulmonary context (two input scales around the same nodule) - "dual-scale volumetric
  features";
* an **auxiliary segmentation branch** for spatial awareness;
* **parallel classification tasks**: invasiveness (main), bubble lucency, pleural
  retraction (:data:`PAPER_HEADS`) - here configurable by name;
* **two-stage training**: joint multi-task optimisation, then main-task fine-tuning
  (:func:`stage_parameters`).

Everything below is "not specified in the paper; we use ...":

* Volumetric input (``dims=3``, default): two (N, 1, 5, 48, 48) crops around the same
  centre, five slices at 2 mm; **local** field of view 32 mm (0.67 mm pixels), **context**
  64 mm (1.33 mm pixels) - the paper's nodules are 10-20 mm, so the local crop holds the
  whole nodule with margin and the context crop the surrounding lung and, often, pleura.
  Built by :func:`dual_scale_crops` from a CT/slice stack (trilinear resampling); per-slice
  normalised intensities (:func:`NoduleMTLLib.inference.preprocessing.normalize_slices`).
  ``dims=2`` runs the same network on single slices, e.g. on the click pipeline's 96 px,
  0.8 mm patch split by :func:`dual_scale_from_patch` (local: central 48 px at 0.8 mm,
  context: whole patch at 1.6 mm).
* Two encoders of identical layout, separate weights: a small residual CNN (stem conv3 +
  four stages of one residual block, widths ``widths``; stages 2-4 halve the in-plane size,
  the slice axis is never pooled (5 slices); 3D kernels 1x3x3 at full resolution, 3x3x3
  below, see :class:`DSMTEncoder`).
* Fusion: global average pooling of each encoder's deepest features, concatenated, linear
  -> ``fused_channels``, ReLU, dropout 0.3; each head is a linear layer to one logit
  (sigmoid -> probability), BCE per head (``training.losses.multi_head_bce``).
* Auxiliary segmentation decoder on the **local** branch only (U-Net: upsample in-plane,
  concatenate the local skip, conv block; 1x1 conv -> one logit channel), output on the
  local crop's grid.
* Heads on LIDC-IDRI: invasiveness (pathology) and pleural retraction have no LIDC rating;
  the LIDC-trainable heads and their label rules are :data:`LIDC_HEAD_RULES`, the default
  head set is :data:`DEFAULT_HEADS` (malignancy as main task in place of invasiveness,
  with two radiological signs, as the paper pairs its main task with two signs).
* Stage 2 ("invasiveness-specific fine-tuning"): the auxiliary heads and the
  segmentation decoder are frozen and get loss weight 0; encoders + fusion fine-tune at
  ``backbone_lr_scale`` (0.1) times the main head's learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contract import ClickNetworkBase
from .detguided import _bn_eval_for_frozen, freeze_layers

#: The paper's three classification tasks (abstract): main task first.
PAPER_HEADS = ("invasiveness", "bubble_lucency", "pleural_retraction")

#: Crop geometry (not specified in the paper; we use these).
LOCAL_FOV_MM = 32.0
CONTEXT_FOV_MM = 64.0
CROP_SIZE_PX = 48
N_SLICES = 5
SLICE_SPACING_MM = 2.0

#: Full-size configuration.  The paper gives no encoder sizes; this is our full size.
PAPER_CONFIG = dict(widths=(32, 64, 128, 256), fused_channels=256)
#: Narrow configuration for CPU training.
NARROW_CONFIG = dict(widths=(16, 32, 64, 128), fused_channels=128)


# ----------------------------------------------------------------------------- head label rules

@dataclass(frozen=True)
class HeadRule:
    """How a binary head's label comes from LIDC-IDRI reader ratings.

    Attributes:
        field: LIDC characteristic (``lidc_slices/labels.csv`` columns ``<field>_median`` /
            ``<field>_all``; ``lidc_vois`` ``<Field>_value`` is the median).
        rule: the rule in words.
        label: ``label(median, readers=None) -> 1 / 0 / -1`` (-1 = excluded from that
            head's loss and metrics).
    """

    field: str
    rule: str
    label: Callable[[float, Sequence[float] | None], int] = field(repr=False)


def _ordinal(pos_min: float, neg_max: float) -> Callable[[float, Sequence[float] | None], int]:
    def f(median: float, readers=None) -> int:
        return 1 if median >= pos_min else 0 if median <= neg_max else -1
    return f


def _calcification(median: float, readers=None) -> int:
    return 0 if median >= 6 else 1 if median <= 5 else -1


def _subsolid(median: float, readers=None) -> int:
    return 1 if median <= 3 else 0 if median >= 4 else -1


def _air(median: float, readers=None) -> int:
    if readers is not None and len(readers):
        r = [float(v) for v in readers]
        return 1 if any(v == 4 for v in r) else 0 if all(v == 1 for v in r) else -1
    return 1 if median >= 4 else 0 if median == 1 else -1


#: LIDC-supported heads and their label rules (LIDC scales: malignancy 1-5; spiculation,
#: lobulation 1 = none ... 5 = marked; calcification 1-5 = a pattern, 6 = absent; texture
#: 1 = ground-glass/non-solid, 3 = part-solid, 5 = solid; internal structure 1 soft tissue,
#: 2 fluid, 3 fat, 4 air).  Not specified in the paper; we use these.
LIDC_HEAD_RULES: dict[str, HeadRule] = {
    "malignancy": HeadRule("malignancy", "median >= 4 -> 1, <= 2 -> 0, between (2.5-3.5) excluded "
                           "(the project-wide rule, training.data.malignancy_label)", _ordinal(4, 2)),
    "spiculation": HeadRule("spiculation", "median >= 3 (moderate-marked) -> 1, == 1 (none) -> 0, 1.5-2.5 excluded",
                            _ordinal(3, 1)),
    "lobulation": HeadRule("lobulation", "median >= 3 -> 1, == 1 -> 0, 1.5-2.5 excluded", _ordinal(3, 1)),
    "calcification": HeadRule("calcification", "median <= 5 (any calcification pattern) -> 1, 6 (absent) -> 0, "
                              "5.5 (readers split) excluded", _calcification),
    "subsolid": HeadRule("texture", "median <= 3 (ground-glass / part-solid) -> 1, >= 4 (solid) -> 0, 3.5 excluded",
                         _subsolid),
    "bubble_lucency": HeadRule("internalStructure",
                               "any reader rated 4 (air) -> 1, all readers 1 (soft tissue) -> 0, otherwise excluded; "
                               "with the median only: 4 -> 1, 1 -> 0.  Air inside the nodule is LIDC's closest "
                               "rating to bubble-like lucency; rare (18 of 2,275 lidc_slices nodules by any reader, "
                               "3 by median)", _air),
}

#: Every head name DSMTNet accepts.
KNOWN_HEADS = tuple(dict.fromkeys(PAPER_HEADS + tuple(LIDC_HEAD_RULES)))
#: Default heads when training on LIDC-IDRI (main task first).
DEFAULT_HEADS = ("malignancy", "spiculation", "lobulation")


def lidc_head_label(head: str, median: float, readers: Sequence[float] | None = None) -> int:
    """Label (1, 0, or -1 = excluded) of a LIDC-supported head from its reader ratings.

    Args:
        head: a key of :data:`LIDC_HEAD_RULES`; median: median rating; readers: the
            individual ratings (used by "bubble_lucency"), optional.
    Raises:
        ValueError: head has no LIDC rule (e.g. "invasiveness", "pleural_retraction").
    """
    if head not in LIDC_HEAD_RULES:
        raise ValueError(f"head {head!r} has no LIDC-IDRI label rule; LIDC heads: {', '.join(LIDC_HEAD_RULES)}")
    return LIDC_HEAD_RULES[head].label(float(median), readers)


# ----------------------------------------------------------------------------- inputs

def dual_scale_crops(volume, spacing_zyx: Sequence[float], center_zyx: Sequence[float], local_fov_mm: float = LOCAL_FOV_MM,
                     context_fov_mm: float = CONTEXT_FOV_MM, size_px: int = CROP_SIZE_PX, n_slices: int = N_SLICES,
                     slice_spacing_mm: float = SLICE_SPACING_MM, pad_value: float = 0.0,
                     mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Local and context crops around the same centre, resampled to the same pixel grid.

    Each crop has ``size_px`` x ``size_px`` pixels covering ``fov_mm`` (pixel size
    ``fov_mm / size_px``) and ``n_slices`` slices ``slice_spacing_mm`` apart, centred on
    ``center_zyx``; samples outside the volume get ``pad_value``.

    Args:
        volume: (Z, Y, X) array/tensor (HU, PNG values, or a mask), Z >= 2 when n_slices > 1;
            or (Y, X) for one slice (then ``n_slices`` must be 1).
        spacing_zyx: voxel spacing (mm), (sz, sy, sx) (or (sy, sx) for 2D).
        center_zyx: centre in voxel index coordinates (z, y, x) (or (y, x)), floats allowed.
        mode: "bilinear" (trilinear in 3D; images) or "nearest" (masks).
    Returns:
        (local, context): float32 tensors (1, n_slices, size_px, size_px), or
        (1, size_px, size_px) for 2D input - add the batch dimension to feed DSMTNet.
    Raises:
        ValueError: bad dimensions/lengths, or a single slice with n_slices > 1.
    Source: dual-scale input (DSMT-Net abstract); geometry not specified in the paper; we
    use the module defaults.
    """
    v = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume).float()
    if v.ndim not in (2, 3) or len(spacing_zyx) != v.ndim or len(center_zyx) != v.ndim:
        raise ValueError(f"dual_scale_crops: volume must be 2D or 3D with matching spacing/center, got {tuple(v.shape)}")
    if v.ndim == 2 and n_slices != 1:
        raise ValueError("dual_scale_crops: a single 2D slice needs n_slices=1")
    if v.ndim == 3 and v.shape[0] < 2 and n_slices > 1:
        raise ValueError("dual_scale_crops: volume has one slice; use its 2D slice with n_slices=1")

    def grid(fov: float) -> torch.Tensor:
        off = (torch.arange(size_px, dtype=torch.float64) - (size_px - 1) / 2) * (fov / size_px)
        iy = center_zyx[-2] + off / spacing_zyx[-2]
        ix = center_zyx[-1] + off / spacing_zyx[-1]
        ny = 2 * iy / max(v.shape[-2] - 1, 1) - 1
        nx = 2 * ix / max(v.shape[-1] - 1, 1) - 1
        if v.ndim == 2:
            gy, gx = torch.meshgrid(ny, nx, indexing="ij")
            return torch.stack([gx, gy], -1)[None].float()  # (1, S, S, 2)
        iz = center_zyx[0] + (torch.arange(n_slices, dtype=torch.float64) - (n_slices - 1) / 2) * (slice_spacing_mm / spacing_zyx[0])
        nz = 2 * iz / max(v.shape[0] - 1, 1) - 1
        gz, gy, gx = torch.meshgrid(nz, ny, nx, indexing="ij")
        return torch.stack([gx, gy, gz], -1)[None].float()  # (1, D, S, S, 3)

    src = (v - pad_value)[None, None]
    outs = []
    for fov in (local_fov_mm, context_fov_mm):
        o = F.grid_sample(src, grid(fov), mode=mode, padding_mode="zeros", align_corners=True) + pad_value
        outs.append(o[0])  # (1, [D,] S, S)
    return outs[0], outs[1]


def dual_scale_from_patch(x: torch.Tensor, local_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one patch into DSMT-Net's two scales on the same pixel grid.

    Local = the central ``local_fraction`` of the patch at full resolution; context = the
    whole patch, area-downsampled to the same pixel count.  For the click pipeline's 96 px,
    0.8 mm patch: local 48 px at 0.8 mm (38.4 mm), context 48 px at 1.6 mm (76.8 mm).

    Args:
        x: (N, C, H, W) or (N, C, D, H, W) float.
    Returns:
        (local, context) with in-plane size round(H * local_fraction) (same dtype, D kept).
    Raises:
        ValueError: bad rank or fraction not in (0, 1].
    Source: not specified in the paper; we use this for 2D (single-slice) inference.
    """
    if x.ndim not in (4, 5) or not 0 < local_fraction <= 1:
        raise ValueError(f"dual_scale_from_patch: need (N, C, [D,] H, W) and 0 < fraction <= 1, got {tuple(x.shape)}, {local_fraction}")
    h, w = x.shape[-2:]
    lh, lw = int(round(h * local_fraction)), int(round(w * local_fraction))
    y0, x0 = (h - lh) // 2, (w - lw) // 2
    local = x[..., y0:y0 + lh, x0:x0 + lw]
    flat = x.flatten(1, 2) if x.ndim == 5 else x  # (N, C*D, H, W): area-resample in-plane only
    ctx = F.interpolate(flat, size=(lh, lw), mode="area").reshape(*x.shape[:-2], lh, lw)
    return local.contiguous(), ctx


# ----------------------------------------------------------------------------- network

def _conv(dims: int):
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _bn(dims: int):
    return nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d


def _kp(dims: int, inplane_only: bool):
    """(kernel, padding) of a 3x3 conv; in 3D ``inplane_only`` gives a (1, 3, 3) kernel."""
    if dims == 3 and inplane_only:
        return (1, 3, 3), (0, 1, 1)
    return 3, 1


class ResBlockND(nn.Module):
    """Residual block (conv3-BN-ReLU-conv3-BN + shortcut, ReLU) in 2D or 3D; ``down``
    halves the in-plane size only (stride (1, 2, 2) in 3D); ``inplane_only`` uses (1, 3, 3)
    kernels in 3D.  (N, cin, [D,] H, W) -> (N, cout, [D,] H', W') float32.
    Not specified in the paper; we use this standard (ResNet basic) block."""

    def __init__(self, dims: int, cin: int, cout: int, down: bool = False, inplane_only: bool = False):
        super().__init__()
        C, B = _conv(dims), _bn(dims)
        s = ((1, 2, 2) if dims == 3 else 2) if down else 1
        k, pd = _kp(dims, inplane_only)
        self.body = nn.Sequential(C(cin, cout, k, s, pd, bias=False), B(cout), nn.ReLU(inplace=True),
                                  C(cout, cout, k, 1, pd, bias=False), B(cout))
        self.short = nn.Identity() if cin == cout and not down else nn.Sequential(C(cin, cout, 1, s, bias=False), B(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class DSMTEncoder(nn.Module):
    """One DSMT-Net encoder: stem (conv3-BN-ReLU) + four residual stages (in-plane strides
    1, 2, 4, 8).  (N, C, [D,] H, W) -> list of 4 feature maps (N, widths[i], [D,] H/2^i, W/2^i).
    In 3D the stem and the first stage use in-plane (1, 3, 3) kernels: at full resolution
    the pixels (0.67 / 1.33 mm) are much finer than the 2 mm slices (nnU-Net-style
    anisotropic kernels; also 3x cheaper on CPU); 3x3x3 from stage 2 on.
    Backbone not specified in the paper; we use this small residual CNN."""

    def __init__(self, dims: int, in_channels: int, widths: Sequence[int]):
        super().__init__()
        C, B = _conv(dims), _bn(dims)
        k, pd = _kp(dims, True)
        self.stem = nn.Sequential(C(in_channels, widths[0], k, 1, pd, bias=False), B(widths[0]), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([ResBlockND(dims, widths[0], widths[0], inplane_only=True)]
                                    + [ResBlockND(dims, widths[i - 1], widths[i], down=True) for i in range(1, len(widths))])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, y = [], self.stem(x)
        for st in self.stages:
            y = st(y)
            feats.append(y)
        return feats


class DSMTNet(nn.Module):
    """DSMT-Net (see the module docstring).

    Args:
        heads: names of the parallel binary heads (each in :data:`KNOWN_HEADS`), order kept.
        main_head: the stage-2 main task (default: ``heads[0]``).
        dims: 3 (volumetric, default) or 2.
        in_channels: channels of each crop (1).
        widths: encoder stage widths; fused_channels: width of the fused vector.
        dropout: before the heads.

    Forward:
        local, context: float32 (N, in_channels, D, S, S) (dims=3; D = 5, S = 48 by default)
        or (N, in_channels, S, S) (dims=2), same shape, normalised intensities; S a
        multiple of 8 recommended (other sizes work: the decoder resizes to the skips).
        Returns ``(seg_logits, {head: logit})``: auxiliary segmentation logits on the
        local grid, (N, 1, D, S, S) or (N, 1, S, S), and one (N,) float32 logit per head.
    Raises:
        ValueError: empty/duplicate/unknown head names, main_head not in heads, dims not
            2/3 (constructor); mismatched or wrongly shaped inputs (forward).
    """

    def __init__(self, heads: Sequence[str] = DEFAULT_HEADS, main_head: str | None = None, dims: int = 3,
                 in_channels: int = 1, widths: Sequence[int] = (32, 64, 128, 256), fused_channels: int = 256,
                 dropout: float = 0.3):
        super().__init__()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        if not heads:
            raise ValueError("DSMTNet needs at least one head")
        unknown = [h for h in heads if h not in KNOWN_HEADS]
        if unknown:
            raise ValueError(f"unknown DSMT-Net head(s) {', '.join(map(repr, unknown))}; known heads: {', '.join(KNOWN_HEADS)}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"duplicate head names in {heads}")
        main_head = heads[0] if main_head is None else main_head
        if main_head not in heads:
            raise ValueError(f"main_head {main_head!r} is not one of the heads {heads}")
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.heads, self.main_head, self.dims, self.in_channels = heads, main_head, dims, in_channels
        widths = tuple(widths)
        self.local_encoder = DSMTEncoder(dims, in_channels, widths)
        self.context_encoder = DSMTEncoder(dims, in_channels, widths)
        self.fusion = nn.Sequential(nn.Linear(2 * widths[-1], fused_channels), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.cls_heads = nn.ModuleDict({h: nn.Linear(fused_channels, 1) for h in heads})
        C, B = _conv(dims), _bn(dims)
        kp = [_kp(dims, i == 0) for i in range(len(widths))]  # full-resolution level: in-plane kernels (3D)
        self.seg_decoder = nn.ModuleList([
            nn.Sequential(C(widths[i + 1] + widths[i], widths[i], kp[i][0], 1, kp[i][1], bias=False), B(widths[i]),
                          nn.ReLU(inplace=True),
                          C(widths[i], widths[i], kp[i][0], 1, kp[i][1], bias=False), B(widths[i]), nn.ReLU(inplace=True))
            for i in reversed(range(len(widths) - 1))])
        self.seg_head = C(widths[0], 1, 1)
        self.frozen_prefixes: tuple[str, ...] = ()
        self.stage = 1

    def train(self, mode: bool = True):
        """As nn.Module.train, but BatchNorm layers of frozen parts (stage 2) stay in eval mode."""
        super().train(mode)
        if mode:
            _bn_eval_for_frozen(self)
        return self

    def forward(self, local: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nd = self.dims + 2
        if local.ndim != nd or local.shape != context.shape or local.shape[1] != self.in_channels:
            raise ValueError(f"DSMTNet(dims={self.dims}) expects local and context of the same shape (N, {self.in_channels}, "
                             f"{'D, ' if self.dims == 3 else ''}S, S); got {tuple(local.shape)} and {tuple(context.shape)}")
        lf = self.local_encoder(local)
        cf = self.context_encoder(context)
        spatial = tuple(range(2, nd))
        fused = self.fusion(torch.cat([lf[-1].mean(spatial), cf[-1].mean(spatial)], dim=1))
        logits = {h: self.cls_heads[h](fused).squeeze(1) for h in self.heads}
        y = lf[-1]
        mode = "trilinear" if self.dims == 3 else "bilinear"
        for blk, skip in zip(self.seg_decoder, reversed(lf[:-1])):
            y = F.interpolate(y, size=skip.shape[2:], mode=mode, align_corners=False)
            y = blk(torch.cat([y, skip], dim=1))
        return self.seg_head(y), logits


@dataclass
class StagePlan:
    """What :func:`stage_parameters` decided for one training stage.

    Attributes:
        stage: 1 or 2.
        param_groups: list of dicts for a torch optimiser (``"params"``, ``"lr"``, ``"name"``).
        frozen: names of the parameters with ``requires_grad=False``.
        loss_weights: {head name: weight} for ``training.losses.multi_head_bce`` (0 = not
            optimised).
        seg_weight: weight of the auxiliary segmentation loss.
    """

    stage: int
    param_groups: list
    frozen: list
    loss_weights: dict
    seg_weight: float


def stage_parameters(model: DSMTNet, stage: int, base_lr: float = 1e-3, backbone_lr_scale: float = 0.1,
                     seg_weight: float = 1.0) -> StagePlan:
    """Configure DSMT-Net for one of its two training stages (sets ``requires_grad`` in place).

    * Stage 1 - joint multi-task optimisation: everything trainable at ``base_lr``; every
      head weight 1.0, segmentation weight ``seg_weight``.
    * Stage 2 - main-task fine-tuning: the main head at ``base_lr``; encoders and fusion
      at ``base_lr * backbone_lr_scale``; the other heads and the segmentation decoder are
      frozen (``requires_grad=False``, BatchNorm kept in eval mode) with loss weight 0.

    Args:
        model: a :class:`DSMTNet`; stage: 1 or 2; base_lr: learning rate of the heads;
        backbone_lr_scale: stage-2 factor for encoders + fusion; seg_weight: stage-1 weight
        of the auxiliary segmentation loss.
    Returns:
        :class:`StagePlan`.
    Raises:
        ValueError: stage not 1 or 2.
    Source: two-stage training (DSMT-Net abstract); which parts stay trainable in stage 2,
    the learning rates and weights are not specified in the paper; we use the above.
    """
    if stage not in (1, 2):
        raise ValueError(f"DSMT-Net has training stages 1 and 2, got {stage}")
    model.frozen_prefixes = ()
    for p in model.parameters():
        p.requires_grad_(True)
    model.stage = stage
    if stage == 1:
        groups = [{"params": [p for p in model.parameters()], "lr": base_lr, "name": "all"}]
        weights = {h: 1.0 for h in model.heads}
        w_seg = seg_weight
    else:
        aux = [f"cls_heads.{h}" for h in model.heads if h != model.main_head]
        freeze_layers(model, aux + ["seg_decoder", "seg_head"])
        named = dict(model.named_parameters())
        main = [p for n, p in named.items() if n.startswith(f"cls_heads.{model.main_head}.")]
        backbone = [p for n, p in named.items() if n.startswith(("local_encoder.", "context_encoder.", "fusion."))]
        groups = [{"params": main, "lr": base_lr, "name": "main_head"},
                  {"params": backbone, "lr": base_lr * backbone_lr_scale, "name": "encoders+fusion"}]
        weights = {h: (1.0 if h == model.main_head else 0.0) for h in model.heads}
        w_seg = 0.0
    if model.training:
        model.train(True)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    return StagePlan(stage, groups, frozen, weights, w_seg)


def build_dsmtnet(variant: str = "narrow", **overrides) -> DSMTNet:
    """DSMTNet in the "paper" (:data:`PAPER_CONFIG`, our full size - the paper gives none)
    or "narrow" (:data:`NARROW_CONFIG`) configuration; keyword overrides (e.g. ``heads``,
    ``dims``) win.  Raises ValueError for another variant."""
    cfgs = {"paper": PAPER_CONFIG, "narrow": NARROW_CONFIG}
    if variant not in cfgs:
        raise ValueError(f"unknown DSMT-Net variant {variant!r}; available: {', '.join(cfgs)}")
    return DSMTNet(**{**cfgs[variant], **overrides})


# ----------------------------------------------------------------------------- click-path adapter

#: Heads of the shipped (LIDC-trained) DSMT-Net click model: malignancy is the main task
#: (in place of the paper's invasiveness), then the radiological signs LIDC rates.
CLICK_HEADS = ("malignancy", "spiculation", "lobulation", "calcification", "subsolid", "bubble_lucency")
#: Input of the click model (:class:`DSMTNetClick`, the contract of
#: :class:`NoduleMTLLib.models.contract.ClickNetwork`): float32 (N, 1, 96, 96) axial slices at 0.8 mm
#: pixels, normalised per slice; the dual-scale crops are made inside the network.
INPUT_SPEC = {"dims": 2, "channels": 1, "size_px": 96, "spacing_mm": 0.8,
              "intensity": "per-slice robust (p1-p99) normalisation of HU", "variant": "narrow",
              "dual_scale": "local: central 48 px at 0.8 mm; context: whole patch at 1.6 mm (48 px)",
              "heads": list(CLICK_HEADS)}


class DSMTNetClick(ClickNetworkBase, nn.Module):
    """DSMT-Net (``dims=2``) behind the click pipeline's slice interface.

    The click pipeline gives every network a (N, 1, 96, 96) axial patch at 0.8 mm
    (normalised intensities).  :func:`dual_scale_from_patch` turns it into DSMT-Net's two
    scales: **local** = the central 48 px at 0.8 mm (38.4 mm), **context** = the whole
    patch at 1.6 mm (76.8 mm).  The auxiliary segmentation lives on the local grid; it is
    placed back into the centre of a (N, 1, 96, 96) logit map whose outer ring holds
    :attr:`OUTSIDE_LOGIT` (never foreground).  :attr:`seg_border_px` tells the pipeline
    where the segmented field of view ends, so its zoom ladder still zooms out when the
    nodule reaches the edge of the local crop.

    Args:
        heads: head names (main task first); variant: "narrow" or "paper" (see
            :func:`build_dsmtnet`); local_fraction: local crop fraction of the patch (0.5).

    Forward:
        x: (N, 1, H, W) float32.  ``forward`` -> (seg logits (N, 1, H, W), main-head logit
        (N,)); :meth:`forward_click` -> (seg logits, main logit, {sign head: (N,) logit}).
    Source: DSMT-Net abstract (dual-scale dual encoder, auxiliary segmentation, parallel
    heads); the 2D single-slice use and the crop geometry are not specified in the paper;
    we use the above.
    """

    OUTSIDE_LOGIT = -20.0
    #: Contract (``ClickNetwork.training_loss``): auxiliary segmentation + the heads' masked BCE.
    training_loss = "multi_head"

    def __init__(self, heads: Sequence[str] = CLICK_HEADS, variant: str = "narrow", local_fraction: float = 0.5):
        super().__init__()
        self.net = build_dsmtnet(variant, heads=tuple(heads), dims=2)
        self.local_fraction = local_fraction
        self.heads = self.net.heads
        self.main_head = self.net.main_head
        self.sign_heads = tuple(h for h in self.heads if h != self.main_head)
        self._size = None

    @property
    def seg_border_px(self) -> int:
        """Width (px) of the outer ring of a 96 px patch that the segmentation never covers."""
        return int((96 - round(96 * self.local_fraction)) // 2)

    def forward_click(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if x.ndim != 4:
            raise ValueError(f"DSMTNetClick expects (N, 1, H, W), got {tuple(x.shape)}")
        local, ctx = dual_scale_from_patch(x, self.local_fraction)
        seg_local, logits = self.net(local, ctx)
        h, w = x.shape[-2:]
        lh, lw = local.shape[-2:]
        y0, x0 = (h - lh) // 2, (w - lw) // 2
        seg = F.pad(seg_local, (x0, w - lw - x0, y0, h - lh - y0), value=self.OUTSIDE_LOGIT)
        return seg, logits[self.main_head], {k: logits[k] for k in self.sign_heads}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg, main, _ = self.forward_click(x)
        return seg, main


def build_dsmtnet_click(variant: str = "narrow", heads: Sequence[str] = CLICK_HEADS) -> DSMTNetClick:
    """The registered ``dsmtnet`` click model (:class:`DSMTNetClick`)."""
    return DSMTNetClick(heads, variant)
