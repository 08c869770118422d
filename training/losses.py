"""Losses shared by the training recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, computed per sample over (C, H, W) and averaged. logits/target: (N, C, H, W)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (segmentation loss of LNMSNet; weights not specified in the paper; we use 1:1)."""
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE over samples with label 0/1; samples labelled -1 (excluded) are ignored. (N,) tensors."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float())
