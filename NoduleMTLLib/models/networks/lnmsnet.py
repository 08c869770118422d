"""LNMSNet: joint nodule segmentation and malignancy classification with multi-scale convolutions.

Source: Li Yuexiang et al., "LNMSNet: a multi-task deep learning network for pulmonary
nodules segmentation and malignancy classification", Front. Med. 2026,
doi:10.3389/fmed.2026.1773338 (abstract only).  What the abstract specifies, and we keep:

* a U-shaped encoder-decoder with a **ResNet-18** encoder (torchvision's ``resnet18``
  layers, standard widths 64/64/128/256/512);
* the **MSConv** module, *parallel multi-scale convolutions* capturing fine texture and
  global context (enlarged receptive field, size invariance);
* **joint** segmentation + malignancy classification, trained together.

What the abstract leaves open (our choices, "not specified in the paper; we use ..."):

* 2D axial input, one channel, 96 x 96 pixels at 0.8 mm (76.8 mm field of view); the
  click pipeline zooms out (1.6, 3.2 mm) for large masses.  Intensities are per-slice
  affine-invariant normalised (see :func:`NoduleMTLLib.inference.preprocessing.normalize_slices`).
* MSConv = four parallel 3x3 branches with dilation 1, 2, 4, 6 plus a 1x1 branch
  (each C/4 channels, BN + ReLU), concatenated, fused by 1x1 conv + BN, residual add,
  ReLU.  MSConv is applied at the bottleneck and on every skip connection.
* Decoder: 5 upsampling stages (bilinear x2, concat skip, two 3x3 conv-BN-ReLU) with
  widths 256/128/64/32/16 back to full resolution.
* Classification head on the bottleneck MSConv features: global average + max pooling,
  dropout 0.3, linear -> one malignancy logit.
* ResNet-18 is trained from scratch (no ImageNet download at run time); conv1 takes 1 channel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet18

from ..contract import ClickNetworkBase

#: Input specification used by the inference engine and the model card.
INPUT_SIZE_PX = 96
INPUT_SPACING_MM = 0.8
#: Input of :meth:`forward` / ``forward_click`` (the network contract,
#: :class:`NoduleMTLLib.models.contract.ClickNetwork`): float32 (N, 1, 96, 96) axial slices resampled
#: to 0.8 mm pixels, intensities normalised per slice (:func:`NoduleMTLLib.inference.preprocessing.normalize_slices`).
#: Read by the registry (``NetworkSpec.input_spec``), the click path and the manifest.
INPUT_SPEC = {"dims": 2, "channels": 1, "size_px": INPUT_SIZE_PX, "spacing_mm": INPUT_SPACING_MM,
              "intensity": "per-slice robust (p1-p99) normalisation of HU"}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class MSConv(nn.Module):
    """Multi-scale convolution block (LNMSNet's MSConv).

    Parallel branches over the same input: 1x1, and 3x3 with dilation 1, 2, 4, 6
    (receptive fields 1, 3, 5, 9, 13 px), each producing ``channels // 4`` maps (the
    1x1 branch too), concatenated, fused by 1x1 conv + BN, added to the input, ReLU.

    Shapes: (N, C, H, W) float -> (N, C, H, W) float.
    Source: LNMSNet abstract ("parallel multi-scale convolutions"); branch layout not
    specified in the paper; we use the one above.
    """

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2, 4, 6)):
        super().__init__()
        b = max(8, channels // 4)
        self.branches = nn.ModuleList([ConvBNReLU(channels, b, k=1)] + [ConvBNReLU(channels, b, 3, d) for d in dilations])
        self.fuse = nn.Sequential(nn.Conv2d(b * (len(dilations) + 1), channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([br(x) for br in self.branches], dim=1)
        return F.relu(x + self.fuse(y))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(ConvBNReLU(cin + cskip, cout), ConvBNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class LNMSNet(ClickNetworkBase, nn.Module):
    """LNMSNet (see module docstring for the paper and our documented choices).

    Args:
        in_channels: input channels (1: one axial CT slice).
        decoder_channels: widths of the five decoder stages.
        dropout: dropout before the malignancy classifier.

    Forward:
        x: (N, in_channels, H, W) float32, normalised intensities (~[0, 1]); H, W
           multiples of 32 (96 in the shipped model, pixel spacing 0.8 mm).
        Returns ``(seg_logits, malignancy_logit)``: (N, 1, H, W) and (N,) float32 logits
        (sigmoid -> nodule probability per pixel, P(malignant) per slice).
    """

    def __init__(self, in_channels: int = 1, decoder_channels=(256, 128, 64, 32, 16), dropout: float = 0.3):
        super().__init__()
        r = resnet18(weights=None)
        r.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)  # /2, 64
        self.pool = r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4  # /4../32
        enc = [64, 64, 128, 256, 512]
        self.skip_ms = nn.ModuleList([MSConv(c) for c in enc[:4]])
        self.bottleneck = MSConv(512)
        d = decoder_channels
        self.dec = nn.ModuleList([
            DecoderBlock(512, enc[3], d[0]),
            DecoderBlock(d[0], enc[2], d[1]),
            DecoderBlock(d[1], enc[1], d[2]),
            DecoderBlock(d[2], enc[0], d[3]),
            DecoderBlock(d[3], 0, d[4]),
        ])
        self.seg_head = nn.Conv2d(d[4], 1, 1)
        self.cls_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(512 * 2, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem(x)
        s1 = self.layer1(self.pool(s0))
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        b = self.bottleneck(self.layer4(s3))
        skips = [m(s) for m, s in zip(self.skip_ms, (s0, s1, s2, s3))]
        y = self.dec[0](b, skips[3])
        y = self.dec[1](y, skips[2])
        y = self.dec[2](y, skips[1])
        y = self.dec[3](y, skips[0])
        y = self.dec[4](y, None)
        seg = self.seg_head(y)
        pooled = torch.cat([F.adaptive_avg_pool2d(b, 1).flatten(1), F.adaptive_max_pool2d(b, 1).flatten(1)], dim=1)
        cls = self.cls_head(pooled).squeeze(1)
        return seg, cls
