"""Detection-guided segmentation/classification model with spatial regularisation.

Source: Zhang J., Yang M., Guo W., Xavier B. A., Bolen M., Li X., "Detection-guided deep
learning-based model with spatial regularization for lung nodule segmentation", QIMS 2024
/ arXiv 2410.20154.  Only the summary/abstract is available to us (seed
``001_18894c2d30057977.txt``).  What it specifies, and we keep:

* a **U-Net based segmentation** branch - a **ResU-Net** (U-Net with residual blocks) - and
  a **ResNet-50 classification** branch, trained together;
* **feature combination blocks** that share information between the two branches;
* the **classification outcome used as a prior on the nodule size**, combined with a
  **spatial regularisation** (the project's seed table calls it "STD-based"; the summary
  gives no formula);
* **transfer learning** (pre-training, LUNA16 in the paper) followed by fine-tuning with
  **chosen layers frozen**.

Everything below is "not specified in the paper; we use ...":

* Input: one-channel 2D axial patch, 96 x 96 px at 0.8 mm, per-slice normalised
  intensities (:func:`NoduleMTLLib.inference.preprocessing.normalize_slices`); H, W multiples of 32.
* ResU-Net: five levels at strides 1, 2, 4, 8, 16 with widths ``seg_base * (1, 2, 4, 8,
  16)``; each level one pre-activation residual block (BN-ReLU-conv3x3, BN-ReLU-conv3x3,
  1x1-conv shortcut when the shape changes), down-sampling by the stride-2 first conv
  (Zhang Z. et al. 2018, "Road extraction by deep residual U-Net").  Decoder: bilinear x2,
  concatenate the skip, one residual block; 1x1 conv -> one logit channel.
* ResNet-50: torchvision ``resnet50(weights=None)`` with ``conv1`` taking ``in_channels``
  (paper configuration, ``cls_width=1``); ``cls_width < 1`` builds the same bottleneck
  layout (3, 4, 6, 3) with all widths scaled (narrow variant; module names unchanged).
* **Feature combination blocks** (:class:`FeatureCombinationBlock`) at the four matching
  scales: ResU-Net level 1 (stride 2) <-> ResNet stem output (after conv1/BN/ReLU, before
  max-pool), level 2 (stride 4) <-> ``layer1``, level 3 (stride 8) <-> ``layer2``, level 4
  (stride 16, the bridge) <-> ``layer3``.  Each block exchanges *both ways* by residual
  addition of a 1x1-projected copy of the other branch::

      seg' = seg + BN(conv1x1(cls))          cls' = ReLU(cls + BN(conv1x1(seg)))

  with the BN scales initialised to zero, so at initialisation (and for pre-trained
  branches) the two networks are unchanged and the exchange is learned.  The exchanged
  features continue down their own branch (and the seg features into the skips).
* Classification outputs from ``layer4`` (stride 32) by global average pooling, dropout
  0.3: (a) **size class** logits over :data:`SIZE_CLASSES` - "none" (no nodule on the
  slice: the *detection*), and in-plane equivalent diameter < 6, 6-10, 10-20, >= 20 mm
  (Fleischner/Lung-RADS-style cut points) - labels from the slice mask by
  :func:`size_class_from_mask`; (b) one **malignancy** logit.
* **Spatial regularisation**: :func:`spatial_regularization` (exact rule there).  The
  predicted size-class probabilities define a mixture of plateau-Gaussian spatial priors
  centred on the nodule (probability-weighted centroid); the segmentation probability is
  multiplied by the prior.  ``forward`` returns the regularised logits when
  ``spatial_prior=True``.
* Transfer learning: :func:`freeze_layers` / ``DetGuidedNet(frozen=...)`` (parameter-name
  prefixes; :data:`TRANSFER_PRESETS` lists sensible sets).  Which layers the paper's
  "optimal" strategy froze is not in the summary; LUNA16 pre-training is not reproduced
  (LUNA16 is a subset of LIDC-IDRI, our training data).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck

from ..contract import ClickNetworkBase

#: Input specification used by the inference engine and the model card.
INPUT_SIZE_PX = 96
INPUT_SPACING_MM = 0.8
#: Input of :meth:`forward` / ``forward_click`` (the network contract,
#: :class:`NoduleMTLLib.models.contract.ClickNetwork`): float32 (N, 1, 96, 96) axial slices resampled
#: to 0.8 mm pixels, intensities normalised per slice (:func:`NoduleMTLLib.inference.preprocessing.normalize_slices`).
#: Read by the registry (``NetworkSpec.input_spec``), the click path and the manifest.
INPUT_SPEC = {"dims": 2, "channels": 1, "size_px": INPUT_SIZE_PX, "spacing_mm": INPUT_SPACING_MM,
              "intensity": "per-slice robust (p1-p99) normalisation of HU", "variant": "narrow"}

#: Size classes of the classification branch (in-plane equivalent diameter of the
#: nodule's cross-section on the slice).  Not specified in the paper; we use these.
SIZE_CLASSES = ("none", "<6mm", "6-10mm", "10-20mm", ">=20mm")
#: Upper class edges in mm (diameter) for classes 1..4; class 4 is open-ended.
SIZE_CLASS_EDGES_MM = (6.0, 10.0, 20.0)
#: Plateau radius R_c (mm) of the spatial prior per size class: half the class's largest
#: diameter; the open class uses 20 mm (40 mm diameter); "none" has no support (0).
SIZE_CLASS_RADIUS_MM = (0.0, 3.0, 5.0, 10.0, 20.0)

#: Paper-size configuration (keyword arguments of :class:`DetGuidedNet`).
PAPER_CONFIG = dict(seg_base=32, cls_width=1.0)
#: Narrow configuration for CPU training (not from the paper).
NARROW_CONFIG = dict(seg_base=16, cls_width=0.25)

#: Parameter-name prefixes for transfer learning ("pre-train, then fine-tune with chosen
#: layers frozen").  Not specified in the paper; we provide these presets.
TRANSFER_PRESETS = {
    "cls_stem": ("cls.conv1", "cls.bn1"),
    "cls_early": ("cls.conv1", "cls.bn1", "cls.layer1", "cls.layer2"),
    "cls_encoder": ("cls.conv1", "cls.bn1", "cls.layer1", "cls.layer2", "cls.layer3", "cls.layer4"),
    "seg_encoder": ("seg_enc",),
    "encoders": ("seg_enc", "cls.conv1", "cls.bn1", "cls.layer1", "cls.layer2", "cls.layer3", "cls.layer4"),
}


# ----------------------------------------------------------------------------- transfer learning

def freeze_layers(model: nn.Module, names_or_prefixes: Iterable[str] | str, freeze: bool = True) -> list[str]:
    """Freeze (``requires_grad=False``) every parameter whose name starts with one of the prefixes.

    A prefix matches a parameter name exactly or at a ``.`` boundary ("cls.layer1" matches
    "cls.layer1.0.conv1.weight", not "cls.layer10...").  A name in
    :data:`TRANSFER_PRESETS` expands to its prefixes.  BatchNorm running statistics of
    frozen modules are kept too if the model honours ``frozen_prefixes`` in ``train()``
    (as :class:`DetGuidedNet` and DSMT-Net do): the prefixes are recorded in
    ``model.frozen_prefixes``.  Parameters with ``requires_grad=False`` get no gradient, so
    optimisers (including weight decay) leave them unchanged.

    Args:
        model: any nn.Module.
        names_or_prefixes: prefixes / preset names (a single string is one prefix).
        freeze: False unfreezes the same parameters instead.
    Returns:
        sorted names of the parameters (un)frozen.
    Raises:
        ValueError: a prefix matches no parameter (typo guard).
    Source: transfer learning by freezing layers - Zhang et al. 2024 (summary); the
    mechanics are ours.
    """
    if isinstance(names_or_prefixes, str):
        names_or_prefixes = [names_or_prefixes]
    prefixes: list[str] = []
    for p in names_or_prefixes:
        prefixes.extend(TRANSFER_PRESETS.get(p, (p,)))
    params = dict(model.named_parameters())
    hit: set[str] = set()
    for pre in prefixes:
        names = [n for n in params if n == pre or n.startswith(pre.rstrip(".") + ".")]
        if not names:
            raise ValueError(f"freeze_layers: {pre!r} matches no parameter of {type(model).__name__}")
        hit.update(names)
    for n in hit:
        params[n].requires_grad_(not freeze)
    current = set(getattr(model, "frozen_prefixes", ()))
    current = current | set(prefixes) if freeze else current - set(prefixes)
    try:
        model.frozen_prefixes = tuple(sorted(current))
    except AttributeError:  # pragma: no cover - exotic modules
        pass
    if getattr(model, "training", False):
        model.train(True)  # re-apply BN eval for frozen parts
    return sorted(hit)


def _bn_eval_for_frozen(model: nn.Module) -> None:
    """Put BatchNorm modules under ``model.frozen_prefixes`` in eval mode (keeps their
    running statistics, which an optimiser would not touch but a train-mode forward would)."""
    prefixes = tuple(getattr(model, "frozen_prefixes", ()))
    if not prefixes:
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(
                name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes):
            m.eval()


# ----------------------------------------------------------------------------- building blocks

class ResidualBlock(nn.Module):
    """Pre-activation residual block of ResU-Net: BN-ReLU-conv3x3(stride) , BN-ReLU-conv3x3,
    plus a shortcut (identity, or 1x1 conv(stride) + BN when the shape changes).

    (N, cin, H, W) -> (N, cout, H/stride, W/stride) float32.
    Source: ResU-Net (Zhang Z. et al. 2018); the detection-guided paper names a ResU-Net
    but not its block, which is our choice.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, first: bool = False):
        super().__init__()
        pre = [] if first else [nn.BatchNorm2d(cin), nn.ReLU(inplace=False)]
        self.body = nn.Sequential(*pre, nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.short = (nn.Identity() if cin == cout and stride == 1 else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.short(x)


class FeatureCombinationBlock(nn.Module):
    """Two-way feature exchange between the segmentation and classification branches.

    ``seg' = seg + BN(conv1x1(cls))`` and ``cls' = ReLU(cls + BN(conv1x1(seg)))``, both
    computed from the inputs; the two BN scales start at zero (identity at initialisation).
    If the spatial sizes differ (odd inputs) the incoming map is bilinearly resized.

    Args:
        seg_channels, cls_channels: channel counts of the two branches at this scale.
    Forward:
        seg: (N, seg_channels, h, w), cls: (N, cls_channels, h', w') float32.
        Returns (seg', cls') with the input shapes.
    Source: "feature combination blocks ... sharing of information between the
    segmentation and classification components" (Zhang et al. 2024, summary); the block
    design is not specified in the paper; we use the one above.
    """

    def __init__(self, seg_channels: int, cls_channels: int):
        super().__init__()
        self.cls_to_seg = nn.Sequential(nn.Conv2d(cls_channels, seg_channels, 1, bias=False), nn.BatchNorm2d(seg_channels))
        self.seg_to_cls = nn.Sequential(nn.Conv2d(seg_channels, cls_channels, 1, bias=False), nn.BatchNorm2d(cls_channels))
        nn.init.zeros_(self.cls_to_seg[1].weight)
        nn.init.zeros_(self.seg_to_cls[1].weight)

    def forward(self, seg: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        to_seg, to_cls = self.cls_to_seg(cls), self.seg_to_cls(seg)
        if to_seg.shape[-2:] != seg.shape[-2:]:
            to_seg = F.interpolate(to_seg, size=seg.shape[-2:], mode="bilinear", align_corners=False)
        if to_cls.shape[-2:] != cls.shape[-2:]:
            to_cls = F.interpolate(to_cls, size=cls.shape[-2:], mode="bilinear", align_corners=False)
        return seg + to_seg, F.relu(cls + to_cls)


def _resnet50_trunk(in_channels: int, width: float) -> nn.Module:
    """torchvision ResNet-50 (``weights=None``) with ``conv1`` taking ``in_channels``;
    ``width < 1`` scales every width (stem 64, planes 64/128/256/512, expansion 4) with the
    same (3, 4, 6, 3) bottleneck layout and module names.  fc/avgpool are removed."""
    r = resnet50(weights=None)
    if width != 1.0:
        c = lambda v: max(8, int(round(v * width / 8.0)) * 8)  # noqa: E731
        r.inplanes = c(64)
        r.conv1 = nn.Conv2d(in_channels, c(64), 7, 2, 3, bias=False)
        r.bn1 = nn.BatchNorm2d(c(64))
        r.layer1 = r._make_layer(Bottleneck, c(64), 3)
        r.layer2 = r._make_layer(Bottleneck, c(128), 4, stride=2)
        r.layer3 = r._make_layer(Bottleneck, c(256), 6, stride=2)
        r.layer4 = r._make_layer(Bottleneck, c(512), 3, stride=2)
        for m in r.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    else:
        r.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(r.conv1.weight, mode="fan_out", nonlinearity="relu")
    r.fc = nn.Identity()
    r.avgpool = nn.Identity()
    return r


# ----------------------------------------------------------------------------- size prior

def size_class_from_mask(mask: np.ndarray | torch.Tensor, spacing_mm: float, edges_mm: Sequence[float] = SIZE_CLASS_EDGES_MM) -> int:
    """Size-class label of one slice mask (training target of the size head).

    Equivalent diameter ``d = 2 * sqrt(area_mm2 / pi)`` of the (whole) foreground;
    class 0 if the mask is empty, else ``1 + #(edges <= d)`` (d < 6 -> 1, 6 <= d < 10 -> 2,
    10 <= d < 20 -> 3, d >= 20 -> 4).

    Args:
        mask: (H, W) bool/0-1 array; spacing_mm: in-plane pixel spacing (mm).
    Returns:
        int in 0..len(edges_mm) + 1 - 1.
    Raises:
        ValueError: mask not 2D or spacing <= 0.
    Source: not specified in the paper; we use the cut points of :data:`SIZE_CLASS_EDGES_MM`.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2 or spacing_mm <= 0:
        raise ValueError(f"size_class_from_mask: need a 2D mask and spacing > 0, got shape {m.shape}, spacing {spacing_mm}")
    area = float((m > 0.5).sum()) * spacing_mm ** 2
    if area == 0:
        return 0
    d = 2.0 * math.sqrt(area / math.pi)
    return 1 + int(sum(d >= e for e in edges_mm))


def spatial_regularization(prob: torch.Tensor, size_class_probs: torch.Tensor, spacing_mm: float = INPUT_SPACING_MM,
                           center: torch.Tensor | str = "centroid", radius_mm: Sequence[float] = SIZE_CLASS_RADIUS_MM,
                           sigma_scale: float = 0.5, floor: float = 0.0, centroid_threshold: float = 0.5) -> torch.Tensor:
    """Size-class prior with STD-based spatial regularisation of a segmentation probability map.

    Rule (not specified in the paper summary, which only says that the classification
    outcome is used as a prior on nodule size together with a spatial regularisation; we
    use this one):

    1. Centre ``c`` per image: with ``center="centroid"`` the probability-weighted
       centroid of the pixels with ``prob >= centroid_threshold`` (the image centre - the
       click - if there are none); ``"click"``: the image centre; or an (N, 2) tensor of
       (row, col) pixel coordinates.
    2. For size class k with plateau radius ``R_k`` (mm, :data:`SIZE_CLASS_RADIUS_MM`) the
       spatial prior is a plateau Gaussian of the distance ``r`` (mm) to ``c``::

           g_k(r) = exp(-max(0, r - R_k)^2 / (2 * sigma_k^2)),   sigma_k = sigma_scale * R_k

       i.e. no penalty inside the largest nodule of that class, Gaussian decay with
       standard deviation ``sigma_k`` outside it.  A class with ``R_k = 0`` ("none": no
       nodule detected) has ``g_k = 0`` everywhere.
    3. The prior is the mixture over the predicted class probabilities ``q_k``,
       ``G = floor + (1 - floor) * sum_k q_k g_k``, and the regularised probability is
       ``prob * G``.  Hence the further a pixel lies from the nodule centre, and the
       smaller the predicted size, the more it is suppressed; a confident "none" removes
       the segmentation (``floor`` > 0 keeps a minimum).  Differentiable in ``prob`` and
       ``size_class_probs`` (the centre is computed without gradient).

    Args:
        prob: (N, 1, H, W) float probabilities in [0, 1].
        size_class_probs: (N, K) float, rows summing to 1 (softmax of the size logits);
            K = len(radius_mm).
        spacing_mm: pixel spacing of ``prob`` (mm); the network's nominal 0.8 mm - the
            size classes are learned at that scale, so keep it even for zoomed patches.
        center: "centroid", "click" or an (N, 2) tensor (row, col) in pixels.
        radius_mm: plateau radius per class (mm); sigma_scale: sigma_k / R_k.
        floor: minimum prior in [0, 1].  centroid_threshold: see 1.
    Returns:
        (N, 1, H, W) float regularised probabilities, <= prob.
    Raises:
        ValueError: shape mismatch, K != len(radius_mm), unknown ``center`` string.
    """
    if prob.ndim != 4 or prob.shape[1] != 1:
        raise ValueError(f"spatial_regularization: prob must be (N, 1, H, W), got {tuple(prob.shape)}")
    n, _, h, w = prob.shape
    if size_class_probs.shape != (n, len(radius_mm)):
        raise ValueError(f"spatial_regularization: size_class_probs must be {(n, len(radius_mm))}, got {tuple(size_class_probs.shape)}")
    dev, dt = prob.device, prob.dtype
    yy = torch.arange(h, device=dev, dtype=dt).view(1, h, 1).expand(n, h, w)
    xx = torch.arange(w, device=dev, dtype=dt).view(1, 1, w).expand(n, h, w)
    mid = torch.tensor([(h - 1) / 2.0, (w - 1) / 2.0], device=dev, dtype=dt)
    if isinstance(center, str):
        if center == "click":
            c = mid.expand(n, 2)
        elif center == "centroid":
            with torch.no_grad():
                p = prob[:, 0].detach()
                wgt = torch.where(p >= centroid_threshold, p, torch.zeros_like(p))
                s = wgt.sum((1, 2))
                cy = (wgt * yy).sum((1, 2)) / s.clamp_min(1e-12)
                cx = (wgt * xx).sum((1, 2)) / s.clamp_min(1e-12)
                c = torch.where((s > 0)[:, None], torch.stack([cy, cx], 1), mid.expand(n, 2))
        else:
            raise ValueError(f"spatial_regularization: center must be 'centroid', 'click' or an (N, 2) tensor, got {center!r}")
    else:
        c = center.to(dev, dt).reshape(n, 2)
    r = torch.sqrt((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) * spacing_mm  # (N, H, W) mm
    prior = torch.zeros_like(r)
    for k, rk in enumerate(radius_mm):
        if rk <= 0:
            continue
        sig = sigma_scale * rk
        g = torch.exp(-F.relu(r - rk) ** 2 / (2 * sig ** 2))
        prior = prior + size_class_probs[:, k, None, None].to(dt) * g
    prior = floor + (1.0 - floor) * prior
    return prob * prior[:, None]


# ----------------------------------------------------------------------------- network

class DetGuidedNet(ClickNetworkBase, nn.Module):
    """Detection-guided ResU-Net + ResNet-50 multi-task model (see the module docstring).

    Args:
        in_channels: input channels (1).
        seg_base: ResU-Net base width (levels seg_base * 1, 2, 4, 8, 16).
        cls_width: ResNet-50 width multiplier (1.0 = torchvision ResNet-50).
        n_size_classes: size classes (len(:data:`SIZE_CLASSES`) = 5).
        dropout: before the classification heads.
        spatial_prior: ``forward`` returns the spatially regularised segmentation.
        frozen: prefixes / preset names frozen at construction (:func:`freeze_layers`).
        prior_kwargs: extra keyword arguments of :func:`spatial_regularization`.

    Forward:
        x: (N, in_channels, H, W) float32 normalised intensities, H, W multiples of 32
           (96 in the shipped model, 0.8 mm pixels).
        Returns ``(seg_logits, malignancy_logit)``: (N, 1, H, W) float32 logits
        (regularised if ``spatial_prior``; logit of the regularised probability, clamped to
        [1e-6, 1 - 1e-6]) and (N,) float32 - the click pipeline's interface.
        :meth:`forward_all` returns every output.
    Raises:
        ValueError: input not 4D with ``in_channels`` channels.
    """

    #: Contract (``ClickNetwork.training_loss``): segmentation + malignancy + size-class loss on ``forward_all``.
    training_loss = "seg_cls_size"

    def __init__(self, in_channels: int = 1, seg_base: int = 32, cls_width: float = 1.0, n_size_classes: int = len(SIZE_CLASSES),
                 dropout: float = 0.3, spatial_prior: bool = True, frozen: Iterable[str] = (), prior_kwargs: dict | None = None):
        super().__init__()
        self.in_channels = in_channels
        s = [seg_base * m for m in (1, 2, 4, 8, 16)]
        self.seg_enc = nn.ModuleList([ResidualBlock(in_channels, s[0], 1, first=True)]
                                     + [ResidualBlock(s[i - 1], s[i], 2) for i in range(1, 5)])
        self.cls = _resnet50_trunk(in_channels, cls_width)
        c_stem = self.cls.conv1.out_channels
        c_l = [self.cls.layer1[-1].conv3.out_channels, self.cls.layer2[-1].conv3.out_channels,
               self.cls.layer3[-1].conv3.out_channels, self.cls.layer4[-1].conv3.out_channels]
        self.fcb = nn.ModuleList([FeatureCombinationBlock(s[1], c_stem), FeatureCombinationBlock(s[2], c_l[0]),
                                  FeatureCombinationBlock(s[3], c_l[1]), FeatureCombinationBlock(s[4], c_l[2])])
        self.seg_dec = nn.ModuleList([ResidualBlock(s[i + 1] + s[i], s[i]) for i in (3, 2, 1, 0)])
        self.seg_out = nn.Sequential(nn.BatchNorm2d(s[0]), nn.ReLU(inplace=True), nn.Conv2d(s[0], 1, 1))
        self.drop = nn.Dropout(dropout)
        self.size_head = nn.Linear(c_l[3], n_size_classes)
        self.malignancy_head = nn.Linear(c_l[3], 1)
        self.spatial_prior = spatial_prior
        self.prior_kwargs = dict(prior_kwargs or {})
        if n_size_classes != len(self.prior_kwargs.get("radius_mm", SIZE_CLASS_RADIUS_MM)):
            raise ValueError("n_size_classes must match the number of prior radii (prior_kwargs['radius_mm'])")
        self.frozen_prefixes: tuple[str, ...] = ()
        if frozen:
            freeze_layers(self, list(frozen))

    def train(self, mode: bool = True):
        """As nn.Module.train, but BatchNorm layers of frozen parts stay in eval mode."""
        super().train(mode)
        if mode:
            _bn_eval_for_frozen(self)
        return self

    def forward_all(self, x: torch.Tensor) -> dict:
        """All outputs.

        Returns dict of float32 tensors: "seg" (N, 1, H, W) raw logits; "seg_regularized"
        (N, 1, H, W) logits after :func:`spatial_regularization`; "size_logits" (N, K);
        "malignancy" (N,) logit.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DetGuidedNet expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        r = self.cls
        e0 = self.seg_enc[0](x)
        e1 = self.seg_enc[1](e0)
        c0 = r.relu(r.bn1(r.conv1(x)))                         # stride 2
        e1, c0 = self.fcb[0](e1, c0)
        c1 = r.layer1(r.maxpool(c0))                           # stride 4
        e2 = self.seg_enc[2](e1)
        e2, c1 = self.fcb[1](e2, c1)
        c2 = r.layer2(c1)                                      # stride 8
        e3 = self.seg_enc[3](e2)
        e3, c2 = self.fcb[2](e3, c2)
        c3 = r.layer3(c2)                                      # stride 16
        e4 = self.seg_enc[4](e3)
        e4, c3 = self.fcb[3](e4, c3)
        c4 = r.layer4(c3)                                      # stride 32
        y = e4
        for blk, skip in zip(self.seg_dec, (e3, e2, e1, e0)):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = blk(torch.cat([y, skip], dim=1))
        seg = self.seg_out(y)
        f = self.drop(F.adaptive_avg_pool2d(c4, 1).flatten(1))
        size_logits = self.size_head(f)
        mal = self.malignancy_head(f).squeeze(1)
        reg = spatial_regularization(torch.sigmoid(seg), torch.softmax(size_logits, 1), **self.prior_kwargs)
        reg = torch.logit(reg.clamp(1e-6, 1 - 1e-6))
        return {"seg": seg, "seg_regularized": reg, "size_logits": size_logits, "malignancy": mal}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_all(x)
        return (out["seg_regularized"] if self.spatial_prior else out["seg"]), out["malignancy"]


def build_detguided(variant: str = "narrow", **overrides) -> DetGuidedNet:
    """DetGuidedNet in the "paper" (:data:`PAPER_CONFIG`: full ResNet-50) or "narrow"
    (:data:`NARROW_CONFIG`) configuration; keyword overrides win.
    Raises ValueError for another variant."""
    cfgs = {"paper": PAPER_CONFIG, "narrow": NARROW_CONFIG}
    if variant not in cfgs:
        raise ValueError(f"unknown detection-guided variant {variant!r}; available: {', '.join(cfgs)}")
    return DetGuidedNet(**{**cfgs[variant], **overrides})
