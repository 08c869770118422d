"""MT-Net: coarse-to-fine nodule segmentation and benign/malignant classification.

Source: "MT-Net" (multi-task network with a prediction distillation structure), LIDC-IDRI,
Dice 83.2 %, ACC 91.9 %, AUC 93.5 % (full text; seed ``004_40df34aea42ce82a.txt``).
Three sub-networks (paper Section 3.2, Figure 1):

* **Coarse Seg-net** (Section 3.2.2, Figures 2-3): DeepLabv3+ whose encoder backbone is a
  *modified aligned Xception* (max pooling replaced by strided depthwise-separable
  convolutions so that atrous convolution can keep the resolution), and whose last
  prediction layer is a **1x1 convolution with one output channel and a sigmoid**
  (randomly initialised).  We build the backbone from timm's ``XceptionAligned`` (the
  DeepLab aligned Xception-41/65/71, Chen et al. 2018), ``output_stride=16``.
* **Fine Seg-net** (Section 3.2.3, Figure 4): "the encoder and decoder of Fine Seg-net
  share the same structure and parameters with Coarse Seg-net" plus a **Fine-layer** that
  concatenates the deepest encoder features with the coarse mask, then 1x1 conv + BN +
  ReLU (randomly initialised), and feeds the decoder.
* **Class-net** (Section 3.2.4, Figure 5): Xception (Chollet 2017) with (1) the last max
  pooling of the exit flow removed, (2) the last two separable convolutions of the exit
  flow made dilated (rate 2, padding 2); input = CT patch concatenated with the coarse
  mask as an extra channel whose first-layer weights are the mean of the RGB weights
  (:func:`init_4th_channel_from_rgb_mean`); binary cross-entropy.
* Loss: hybrid ``Dice + gamma * Rank`` (K = 20, margin = 0.3, gamma = 0.02) for both
  segmentation nets, BCE for Class-net: see ``training/losses.py`` (``hybrid_seg_loss``,
  ``rank_loss``, ``dice_loss``, ``mtnet_loss``).

Our choices where the paper is silent ("not specified in the paper; we use ..."):

* Input: one-channel 2D axial patch, 96 x 96 px at 0.8 mm, per-slice normalised
  intensities (:func:`NoduleMTLLib.inference.preprocessing.normalize_slices`) - the house input of
  the click pipeline.  The paper converted 64 x 64 LIDC crops to RGB and resampled them to
  224 x 224; a grey image repeated in R, G, B is equivalent to one channel whose weights
  are the sum of the RGB weights (see :meth:`ClassNet.load_rgb_xception_state`).
* Backbone depth: Xception-65 in the paper configuration (the DeepLabv3+ paper's main
  aligned Xception; MT-Net's Figure 3 does not name the depth); ASPP rates (6, 12, 18),
  256 channels, image pooling branch, 48-channel low-level projection, two 3x3 separable
  convs (256) in the decoder - the DeepLabv3+ defaults (Chen et al. 2018, Section 3).
  At 96 px the output-stride-16 map is 6 x 6, so rates >= 6 reduce to 1x1 convs (the
  paper's 224 px gives 14 x 14); the narrow variant scales the rates to (1, 2, 3).
* "Deepest high-level features" for the Fine-layer = the DeepLabv3+ *encoder* output
  (backbone + ASPP projection, stride 16), so the shared decoder sees the channel count
  it was built for.  The coarse mask is resized to that grid by area averaging.
* The coarse mask passed to Fine Seg-net and Class-net is the Coarse Seg-net probability
  thresholded at 0.5 (``coarse_mask="binary"``; ``"prob"`` passes the probability), and
  is detached: the paper trains Coarse Seg-net first and uses its masks as inputs.
* Fine Seg-net weights: literally shared with Coarse Seg-net (``fine_weights="shared"``,
  default); ``"copy"`` gives Fine Seg-net its own encoder/decoder, to be initialised from
  a trained Coarse Seg-net with :meth:`MTNet.init_fine_from_coarse`.
* No pre-trained weights are downloaded (the paper used MS-COCO DeepLabv3+ and ImageNet
  Xception); all weights start from timm's / Kaiming initialisation.
* Class-net classifier: global average pooling + one linear logit, no dropout.
* Narrow variant (:data:`NARROW_CONFIG`) for CPU training: aligned Xception-41 and Xception
  at 1/4 width, 64-channel ASPP/decoder.  :data:`PAPER_CONFIG` keeps the paper sizes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.xception import Block as XceptionBlock
from timm.models.xception import SeparableConv2d as XceptionSepConv
from timm.models.xception_aligned import XceptionAligned

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

#: Paper-size configuration (see module docstring).  Keyword arguments of :class:`MTNet`.
PAPER_CONFIG = dict(encoder_depth=65, encoder_width=1.0, aspp_channels=256, aspp_rates=(6, 12, 18),
                    low_level_channels=48, decoder_channels=256, class_width=1.0, class_middle_blocks=8)
#: Narrow configuration small enough to train on 2 CPU cores (not from the paper).
NARROW_CONFIG = dict(encoder_depth=41, encoder_width=0.25, aspp_channels=64, aspp_rates=(1, 2, 3),
                     low_level_channels=16, decoder_channels=64, class_width=0.25, class_middle_blocks=8)

_BN_EPS = 1e-3  # timm's aligned Xception uses BatchNorm eps 1e-3, we keep it in the heads too


def _ch(c: int, width: float) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(c * width / 8.0)) * 8)


def aligned_xception_block_cfg(depth: int = 65, width: float = 1.0) -> list[dict]:
    """Block configuration of DeepLab's modified aligned Xception-41/65/71.

    Identical to timm's ``xception41/65/71`` at ``width=1`` (so ImageNet/COCO weights for
    those would load); ``width`` scales every block's channels (narrow variant, not from
    the paper).  Fresh dicts each call (``XceptionAligned`` mutates them).

    Raises:
        ValueError: depth not in (41, 65, 71) or width <= 0.
    Source: Chen et al. 2018 (DeepLabv3+), Section 3.2; MT-Net Figure 3.
    """
    if depth not in (41, 65, 71):
        raise ValueError(f"aligned Xception depth must be 41, 65 or 71, got {depth}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    c = lambda v: _ch(v, width)  # noqa: E731
    if depth == 71:
        entry = [dict(in_chs=64, out_chs=c(128), stride=2), dict(in_chs=c(128), out_chs=c(256), stride=1),
                 dict(in_chs=c(256), out_chs=c(256), stride=2), dict(in_chs=c(256), out_chs=c(728), stride=1),
                 dict(in_chs=c(728), out_chs=c(728), stride=2)]
    else:
        entry = [dict(in_chs=64, out_chs=c(128), stride=2), dict(in_chs=c(128), out_chs=c(256), stride=2),
                 dict(in_chs=c(256), out_chs=c(728), stride=2)]
    middle = [dict(in_chs=c(728), out_chs=c(728), stride=1) for _ in range(8 if depth == 41 else 16)]
    exit_ = [dict(in_chs=c(728), out_chs=(c(728), c(1024), c(1024)), stride=2),
             dict(in_chs=c(1024), out_chs=(c(1536), c(1536), c(2048)), stride=1, no_skip=True, start_with_relu=False)]
    return entry + middle + exit_


class AlignedXceptionEncoder(nn.Module):
    """Modified aligned Xception backbone returning DeepLabv3+'s two feature maps.

    Args:
        in_channels: input channels (1: a CT slice).
        depth: 41, 65 or 71; width: channel multiplier (1.0 = paper/timm).
        output_stride: 16 (DeepLabv3+ / MT-Net) or 8.

    Forward:
        x: (N, in_channels, H, W) float32, H and W multiples of 16.
        Returns ``(low, deep)``: low-level features (N, C_low, H/4, W/4) (C_low = 256 at
        width 1, taken inside entry-flow block 2 as in DeepLab) and the deepest features
        (N, C_deep, H/16, W/16) (C_deep = 2048 at width 1), float32.
    Source: MT-Net Section 3.2.2 / Figure 3; timm ``XceptionAligned``.
    """

    def __init__(self, in_channels: int = 1, depth: int = 65, width: float = 1.0, output_stride: int = 16):
        super().__init__()
        cfg = aligned_xception_block_cfg(depth, width)
        from functools import partial
        self.net = XceptionAligned(cfg, num_classes=0, in_chans=in_channels, output_stride=output_stride,
                                   norm_layer=partial(nn.BatchNorm2d, eps=_BN_EPS, momentum=0.1))
        self.low_channels = self.net.feature_info[1]["num_chs"]
        self.deep_channels = self.net.num_features
        self._last = len(self.net.feature_info) - 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, deep = self.net.forward_intermediates(x, indices=[1, self._last], intermediates_only=True)
        return low, deep


class SepConvBNReLU(nn.Sequential):
    """Depthwise-separable 3x3 conv (depthwise + BN + ReLU, pointwise + BN + ReLU), as
    DeepLabv3+ uses in ASPP and decoder (Chen et al. 2018, Section 3.2)."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
            nn.BatchNorm2d(cin, eps=_BN_EPS), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=_BN_EPS), nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLabv3/v3+: 1x1 branch, one separable 3x3
    branch per rate, image pooling branch; concatenated and projected by 1x1 conv + BN +
    ReLU + dropout 0.1.  (N, cin, h, w) -> (N, cout, h, w) float32.
    Source: Chen et al. 2018 (DeepLabv3+); MT-Net Figure 2.  Dropout 0.1: not specified
    in MT-Net; we use the common DeepLab value."""

    def __init__(self, cin: int, cout: int, rates=(6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=_BN_EPS), nn.ReLU(inplace=True))]
            + [SepConvBNReLU(cin, cout, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout, eps=_BN_EPS), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False),
                                     nn.BatchNorm2d(cout, eps=_BN_EPS), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [b(x) for b in self.branches]
        ys.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(ys, dim=1))


class CoarseSegNet(nn.Module):
    """MT-Net's Coarse Seg-net: DeepLabv3+ with a modified aligned Xception encoder.

    Encoder = aligned Xception (output stride 16) + ASPP; decoder = low-level features
    (stride 4) projected to ``low_level_channels``, concatenated with the x4-upsampled
    encoder output, two separable 3x3 convs, then MT-Net's **1x1 conv to one channel**
    (the sigmoid is left to the loss/inference), bilinear x4 back to the input size.

    Args:
        in_channels: input channels (1). encoder_depth / encoder_width: backbone.
        aspp_channels, aspp_rates, low_level_channels, decoder_channels: DeepLabv3+ sizes.

    Forward:
        x: (N, in_channels, H, W) float32 normalised intensities, H, W multiples of 16.
        Returns (N, 1, H, W) float32 logits (sigmoid -> P(nodule) per pixel).
    Source: MT-Net Section 3.2.2, Figures 2-3.
    """

    def __init__(self, in_channels: int = 1, encoder_depth: int = 65, encoder_width: float = 1.0,
                 aspp_channels: int = 256, aspp_rates=(6, 12, 18), low_level_channels: int = 48,
                 decoder_channels: int = 256):
        super().__init__()
        self.encoder = AlignedXceptionEncoder(in_channels, encoder_depth, encoder_width, output_stride=16)
        self.aspp = ASPP(self.encoder.deep_channels, aspp_channels, tuple(aspp_rates))
        self.low_proj = nn.Sequential(nn.Conv2d(self.encoder.low_channels, low_level_channels, 1, bias=False),
                                      nn.BatchNorm2d(low_level_channels, eps=_BN_EPS), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(SepConvBNReLU(aspp_channels + low_level_channels, decoder_channels),
                                     SepConvBNReLU(decoder_channels, decoder_channels))
        self.head = nn.Conv2d(decoder_channels, 1, 1)  # MT-Net: 1x1 conv, one channel (+ sigmoid)
        self.encoder_channels = aspp_channels

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"MT-Net segmentation input must be (N, C, H, W) with H, W multiples of 16, got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> (low-level (N, C_low, H/4, W/4), encoder output (N, aspp_channels, H/16, W/16))."""
        self._check(x)
        low, deep = self.encoder(x)
        return low, self.aspp(deep)

    def decode(self, enc: torch.Tensor, low: torch.Tensor, size) -> torch.Tensor:
        """Decoder: encoder output + low-level features -> (N, 1, *size) logits."""
        y = F.interpolate(enc, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([y, self.low_proj(low)], dim=1))
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, enc = self.encode(x)
        return self.decode(enc, low, x.shape[-2:])


class FineLayer(nn.Module):
    """MT-Net's Fine-layer: concat(encoder features, coarse mask) -> 1x1 conv -> BN -> ReLU.

    Args:
        channels: C, channels of the encoder output (and of the output).
    Forward:
        feat: (N, C, h, w) float32; mask: (N, 1, H, W) float32 in [0, 1] (any H, W; resized
        to (h, w) by area averaging - not specified in the paper; we use area averaging).
        Returns (N, C, h, w) float32.
    Source: MT-Net Section 3.2.3 (randomly initialised).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.fuse = nn.Sequential(nn.Conv2d(channels + 1, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels, eps=_BN_EPS), nn.ReLU(inplace=True))

    def forward(self, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(mask.to(feat.dtype), size=feat.shape[-2:], mode="area")
        return self.fuse(torch.cat([feat, m], dim=1))


class FineSegNet(nn.Module):
    """MT-Net's Fine Seg-net: Coarse Seg-net's encoder and decoder plus the Fine-layer.

    Args:
        seg_net: a :class:`CoarseSegNet` providing encoder and decoder.
        share: True (paper: "share the same structure and parameters") uses ``seg_net``
            itself, *without registering it* as a sub-module (its owner, e.g. :class:`MTNet`,
            registers it once, so the weights are stored once); False deep-copies it into
            an own, registered sub-module ``seg``.

    Forward:
        x: (N, C, H, W) float32; coarse_mask: (N, 1, H, W) float32 in [0, 1].
        Returns (N, 1, H, W) float32 logits.
    Source: MT-Net Section 3.2.3, Figure 4.
    """

    def __init__(self, seg_net: CoarseSegNet, share: bool = True):
        super().__init__()
        self.share = share
        if share:
            self.__dict__["seg"] = seg_net  # plain attribute: not a registered sub-module
        else:
            self.seg = copy.deepcopy(seg_net)
        self.fine_layer = FineLayer(seg_net.encoder_channels)

    def forward(self, x: torch.Tensor, coarse_mask: torch.Tensor) -> torch.Tensor:
        low, enc = self.seg.encode(x)
        return self.seg.decode(self.fine_layer(enc, coarse_mask), low, x.shape[-2:])


@torch.no_grad()
def init_4th_channel_from_rgb_mean(conv3: nn.Conv2d, conv4: nn.Conv2d) -> nn.Conv2d:
    """Initialise a first conv with one extra input channel from a trained RGB conv.

    ``conv4.weight[:, :C] = conv3.weight`` and ``conv4.weight[:, C] = conv3.weight.mean(1)``
    (the mean over the C = 3 RGB input channels); the bias, if both have one, is copied.
    Works for any C (C input channels -> C + 1).

    Args:
        conv3: nn.Conv2d with C input channels (e.g. ImageNet Xception ``conv1``, (32, 3, 3, 3)).
        conv4: nn.Conv2d with C + 1 input channels and otherwise the same weight shape.
    Returns:
        ``conv4`` (modified in place).
    Raises:
        ValueError: if the shapes are not (O, C, kh, kw) and (O, C + 1, kh, kw).
    Source: MT-Net Section 3.2.4 ("the weights of the coarse masks in the 4th channel are
    initialized by averaging the weights of the other three channels").
    """
    w3, w4 = conv3.weight, conv4.weight
    if w3.ndim != 4 or w4.shape != (w3.shape[0], w3.shape[1] + 1, *w3.shape[2:]):
        raise ValueError(f"init_4th_channel_from_rgb_mean: conv4 weight must be {(w3.shape[0], w3.shape[1] + 1, *w3.shape[2:])},"
                         f" got {tuple(w4.shape)}")
    w4[:, : w3.shape[1]].copy_(w3)
    w4[:, w3.shape[1]].copy_(w3.mean(dim=1))
    if conv3.bias is not None and conv4.bias is not None:
        conv4.bias.copy_(conv3.bias)
    return conv4


class ClassNet(nn.Module):
    """MT-Net's Class-net: modified Xception on (CT patch, coarse mask).

    Xception (Chollet 2017; layer names as timm's ``legacy_xception`` so its ImageNet
    weights map 1:1) with MT-Net's modifications: block 12 keeps its two separable convs
    but **no max pooling** (its 1x1 shortcut has stride 1), and ``conv3``/``conv4`` (the
    last two separable convs of the exit flow) are **dilated, rate 2, padding 2**.  The
    exit flow therefore runs at stride 16 instead of 32.  Global average pooling, one
    linear logit (BCE).

    Args:
        image_channels: image channels (1 here; 3 in the paper's RGB images); the coarse
            mask adds one more input channel.
        width: channel multiplier (1.0 = Xception widths 32/64/128/256/728/1024/1536/2048;
            < 1 = narrow variant, not from the paper).
        middle_blocks: middle-flow blocks (8 in Xception).
        drop_rate: dropout before the classifier (not specified in the paper; we use 0).

    Forward:
        x: (N, image_channels + 1, H, W) float32 (image, then coarse mask in [0, 1]);
        H, W >= 32.  Returns (N,) float32 logit (sigmoid -> P(malignant)).
    Source: MT-Net Section 3.2.4, Figure 5.
    """

    def __init__(self, image_channels: int = 1, width: float = 1.0, middle_blocks: int = 8, drop_rate: float = 0.0):
        super().__init__()
        c = lambda v: _ch(v, width)  # noqa: E731
        self.image_channels = image_channels
        self.conv1 = nn.Conv2d(image_channels + 1, c(32), 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c(32), c(64), 3, bias=False)
        self.bn2 = nn.BatchNorm2d(c(64))
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = XceptionBlock(c(64), c(128), 2, 2, start_with_relu=False)
        self.block2 = XceptionBlock(c(128), c(256), 2, 2)
        self.block3 = XceptionBlock(c(256), c(728), 2, 2)
        for i in range(middle_blocks):
            self.add_module(f"block{4 + i}", XceptionBlock(c(728), c(728), 3, 1))
        self.exit_name = f"block{4 + middle_blocks}"
        # MT-Net (1): no max pooling in the exit-flow block (strides=1 -> no MaxPool, stride-1 shortcut)
        self.add_module(self.exit_name, XceptionBlock(c(728), c(1024), 2, 1, grow_first=False))
        # MT-Net (2): last two separable convs dilated, rate 2, padding 2
        self.conv3 = XceptionSepConv(c(1024), c(1536), 3, 1, padding=2, dilation=2)
        self.bn3 = nn.BatchNorm2d(c(1536))
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = XceptionSepConv(c(1536), c(2048), 3, 1, padding=2, dilation=2)
        self.bn4 = nn.BatchNorm2d(c(2048))
        self.act4 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(c(2048), 1)
        self.num_features = c(2048)
        self._blocks = [f"block{i}" for i in range(1, 5 + middle_blocks)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight); nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, image_channels + 1, H, W) -> (N, num_features, ~H/16, ~W/16) float32."""
        if x.ndim != 4 or x.shape[1] != self.image_channels + 1:
            raise ValueError(f"Class-net expects (N, {self.image_channels + 1}, H, W) (image + coarse mask), got {tuple(x.shape)}")
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        for name in self._blocks:
            x = getattr(self, name)(x)
        x = self.act3(self.bn3(self.conv3(x)))
        return self.act4(self.bn4(self.conv4(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        return self.fc(self.drop(f)).squeeze(1)

    @torch.no_grad()
    def load_rgb_xception_state(self, state: dict) -> tuple[list[str], list[str]]:
        """Load an RGB Xception state dict (timm ``legacy_xception`` names, e.g. ImageNet
        weights available offline) into this Class-net.

        ``conv1``: the coarse-mask channel gets the mean of the RGB weights
        (:func:`init_4th_channel_from_rgb_mean`); for ``image_channels=1`` the grey channel
        gets the *sum* of the RGB weights (a grey image repeated in R, G, B gives the same
        response).  ``fc`` (1000 ImageNet classes) is skipped.  Requires ``width=1`` and 8
        middle blocks.

        Returns:
            (missing keys, unexpected keys) of the non-strict load of the remaining weights.
        Raises:
            ValueError: conv1 in ``state`` is not (32, 3, 3, 3) or the widths differ.
        """
        w = state["conv1.weight"]
        if w.shape != (self.conv1.out_channels, 3, 3, 3):
            raise ValueError(f"expected RGB conv1 weight {(self.conv1.out_channels, 3, 3, 3)}, got {tuple(w.shape)}")
        rgb = nn.Conv2d(3, w.shape[0], 3, bias=False); rgb.weight.copy_(w)
        four = nn.Conv2d(4, w.shape[0], 3, bias=False)
        init_4th_channel_from_rgb_mean(rgb, four)
        if self.image_channels == 3:
            self.conv1.weight.copy_(four.weight)
        elif self.image_channels == 1:
            self.conv1.weight[:, 0].copy_(four.weight[:, :3].sum(1)); self.conv1.weight[:, 1].copy_(four.weight[:, 3])
        else:
            raise ValueError("load_rgb_xception_state supports image_channels 1 or 3")
        rest = {k: v for k, v in state.items() if not k.startswith(("conv1.", "fc."))}
        res = self.load_state_dict(rest, strict=False)
        missing = [k for k in res.missing_keys if not k.startswith(("conv1.", "fc."))]
        return missing, list(res.unexpected_keys)


class MTNet(ClickNetworkBase, nn.Module):
    """MT-Net = Coarse Seg-net -> (Fine Seg-net, Class-net), see the module docstring.

    Args:
        in_channels: image channels (1).
        encoder_depth, encoder_width, aspp_channels, aspp_rates, low_level_channels,
            decoder_channels: Coarse/Fine Seg-net sizes (:class:`CoarseSegNet`).
        class_width, class_middle_blocks: Class-net sizes (:class:`ClassNet`).
        fine_weights: "shared" (paper) or "copy" (own encoder/decoder for Fine Seg-net).
        coarse_mask: "binary" (threshold ``mask_threshold``) or "prob".
        mask_threshold: threshold of the coarse probability (0.5).

    Forward:
        x: (N, in_channels, H, W) float32 normalised intensities; H, W multiples of 16
           (96 in the shipped model, 0.8 mm pixels).
        Returns ``(seg_logits, malignancy_logit)``: Fine Seg-net's (N, 1, H, W) logits and
        Class-net's (N,) logit, float32 - the interface of the click pipeline.
        :meth:`forward_all` also returns the coarse logits and mask.
    Raises:
        ValueError: unknown ``fine_weights`` / ``coarse_mask``; bad input shape (forward).
    """

    #: Class-net classifies the image with the mask as its second channel (the contract's
    #: ``classifies_mask``; re-classification of an edited mask feeds that mask).
    classifies_mask = True
    #: Contract (``ClickNetwork.training_loss``): coarse/fine hybrid Dice + rank loss + Class-net BCE.
    training_loss = "mtnet"

    def __init__(self, in_channels: int = 1, encoder_depth: int = 65, encoder_width: float = 1.0,
                 aspp_channels: int = 256, aspp_rates=(6, 12, 18), low_level_channels: int = 48,
                 decoder_channels: int = 256, class_width: float = 1.0, class_middle_blocks: int = 8,
                 fine_weights: str = "shared", coarse_mask: str = "binary", mask_threshold: float = 0.5):
        super().__init__()
        if fine_weights not in ("shared", "copy"):
            raise ValueError(f"fine_weights must be 'shared' or 'copy', got {fine_weights!r}")
        if coarse_mask not in ("binary", "prob"):
            raise ValueError(f"coarse_mask must be 'binary' or 'prob', got {coarse_mask!r}")
        self.coarse = CoarseSegNet(in_channels, encoder_depth, encoder_width, aspp_channels, aspp_rates,
                                   low_level_channels, decoder_channels)
        self.fine = FineSegNet(self.coarse, share=fine_weights == "shared")
        self.classnet = ClassNet(in_channels, class_width, class_middle_blocks)
        self.coarse_mask_mode, self.mask_threshold = coarse_mask, mask_threshold

    def coarse_to_mask(self, coarse_logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) logits -> detached (N, 1, H, W) float mask in [0, 1] ({0, 1} if binary)."""
        p = torch.sigmoid(coarse_logits.detach())
        return (p > self.mask_threshold).to(p.dtype) if self.coarse_mask_mode == "binary" else p

    def forward_all(self, x: torch.Tensor) -> dict:
        """Returns {"coarse": (N,1,H,W) logits, "coarse_mask": (N,1,H,W) in [0,1],
        "fine": (N,1,H,W) logits, "malignancy": (N,) logit}, float32."""
        coarse = self.coarse(x)
        mask = self.coarse_to_mask(coarse)
        fine = self.fine(x, mask)
        cls = self.classnet(torch.cat([x, mask.to(x.dtype)], dim=1))
        return {"coarse": coarse, "coarse_mask": mask, "fine": fine, "malignancy": cls}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_all(x)
        return out["fine"], out["malignancy"]

    @torch.no_grad()
    def init_fine_from_coarse(self) -> None:
        """Copy Coarse Seg-net's weights into Fine Seg-net's encoder/decoder (``fine_weights="copy"``;
        a no-op when shared).  The Fine-layer stays randomly initialised (paper, 3.2.3)."""
        if not self.fine.share:
            self.fine.seg.load_state_dict(self.coarse.state_dict())


def build_mtnet(variant: str = "narrow", **overrides) -> MTNet:
    """MT-Net in the "paper" (:data:`PAPER_CONFIG`) or "narrow" (:data:`NARROW_CONFIG`)
    configuration; keyword overrides win.  Raises ValueError for another variant."""
    cfgs = {"paper": PAPER_CONFIG, "narrow": NARROW_CONFIG}
    if variant not in cfgs:
        raise ValueError(f"unknown MT-Net variant {variant!r}; available: {', '.join(cfgs)}")
    return MTNet(**{**cfgs[variant], **overrides})
