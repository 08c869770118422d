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


# --------------------------------------------------------------------------------------
# MT-Net hybrid segmentation loss (Dice + gamma * rank loss), multi-head / multi-class
# helpers for MT-Net, DSMT-Net and the detection-guided model.
# --------------------------------------------------------------------------------------

#: MT-Net hybrid-loss hyper-parameters (MT-Net paper, Sections 3.2.5 and 4.6: K = 20,
#: margin = 0.3, gamma = 0.02, chosen there by ablation on LIDC-IDRI).
MTNET_RANK_K = 20
MTNET_RANK_MARGIN = 0.3
MTNET_RANK_GAMMA = 0.02


def _probs(x: torch.Tensor, from_logits: bool) -> torch.Tensor:
    return torch.sigmoid(x) if from_logits else x


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0, from_logits: bool = True) -> torch.Tensor:
    """Dice loss exactly as MT-Net's Eq. (2): ``1 - 2 sum_i P_i G_i / (sum_i (P_i + G_i) + eps)``.

    The sums run over the N pixels of one image; the loss is averaged over the batch.
    Unlike :func:`soft_dice_loss`, the smoothing factor appears only in the denominator
    (as in the paper), so an image with an empty ground truth contributes 1 whatever the
    prediction (and no gradient).

    Args:
        pred: (B, 1, H, W) (or any (B, ...)) float logits, or probabilities if
            ``from_logits=False``.
        target: same shape, float/bool in {0, 1}.
        eps: smoothing factor. MT-Net names it but does not give its value (not specified
            in the paper; we use 1.0, i.e. one pixel).
        from_logits: apply a sigmoid to ``pred`` first (our networks output logits).

    Returns:
        scalar float tensor in [0, 1].
    Source: MT-Net, Section 3.2.6, Eq. (2).
    """
    p = _probs(pred, from_logits).flatten(1)
    g = target.to(p.dtype).flatten(1)
    return (1 - 2 * (p * g).sum(1) / ((p + g).sum(1) + eps)).mean()


def rank_loss(pred: torch.Tensor, target: torch.Tensor, k: int = MTNET_RANK_K, margin: float = MTNET_RANK_MARGIN,
              from_logits: bool = True) -> torch.Tensor:
    """MT-Net's online rank loss on the hardest foreground and background pixels, Eq. (3).

    For each image n, after the forward pass the pixels of the background (G = 0) and of the
    nodule (G = 1) are ranked separately by their error (background: error = P, nodule:
    error = 1 - P).  With H0_{n,i} the predicted probabilities of the K background pixels of
    highest error and H1_{n,j} those of the K nodule pixels of highest error::

        L_Rank(P_n, G_n) = 1/K^2 * sum_{i=1..K} sum_{j=1..K} max(0, H0_{n,i} - H1_{n,j} + margin)

    i.e. every hard nodule pixel should score at least ``margin`` above every hard
    background pixel.  Gradients flow through the selected probabilities (the selection
    itself is piecewise constant).

    Not specified in the paper; we use: the loss is averaged over the images of the batch;
    an image with fewer than K nodule (or background) pixels uses all of them and divides
    by K_bg * K_fg (the number of pairs actually formed); an image with no nodule or no
    background pixel contributes nothing (skipped); if every image is skipped the result is
    a zero that keeps the graph.

    Args:
        pred: (B, ...) float logits (or probabilities with ``from_logits=False``).
        target: same shape, {0, 1}.
        k: K, number of hardest pixels per region (paper: 20).
        margin: required probability gap (paper: 0.3).
        from_logits: apply a sigmoid to ``pred`` first.

    Returns:
        scalar float tensor >= 0.
    Raises:
        ValueError: if ``k < 1`` or the shapes differ.
    Source: MT-Net, Section 3.2.6, Eq. (3); K, margin from Section 4.6.
    """
    if k < 1:
        raise ValueError(f"rank_loss: k must be >= 1, got {k}")
    if pred.shape != target.shape:
        raise ValueError(f"rank_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p = _probs(pred, from_logits).flatten(1)
    g = target.flatten(1) > 0.5
    kk = min(k, p.shape[1])
    neg_inf = torch.finfo(p.dtype).min
    # background: hardest = highest P; nodule: hardest = lowest P (topk of -P)
    h0, _ = torch.where(~g, p, torch.full_like(p, neg_inf)).topk(kk, dim=1)
    h1n, _ = torch.where(g, -p, torch.full_like(p, neg_inf)).topk(kk, dim=1)
    v0 = h0 > neg_inf / 2
    v1 = h1n > neg_inf / 2
    h0 = torch.where(v0, h0, torch.zeros_like(h0))
    h1 = torch.where(v1, -h1n, torch.zeros_like(h1n))
    pair = F.relu(h0[:, :, None] - h1[:, None, :] + margin) * (v0[:, :, None] & v1[:, None, :])
    n_pairs = v0.sum(1) * v1.sum(1)
    keep = n_pairs > 0
    if not bool(keep.any()):
        return p.sum() * 0.0
    per_image = pair.sum((1, 2))[keep] / n_pairs[keep].to(p.dtype)
    return per_image.mean()


def hybrid_seg_loss(pred: torch.Tensor, target: torch.Tensor, gamma: float = MTNET_RANK_GAMMA, k: int = MTNET_RANK_K,
                    margin: float = MTNET_RANK_MARGIN, eps: float = 1.0, from_logits: bool = True) -> torch.Tensor:
    """MT-Net's hybrid segmentation loss, Eq. (1): ``L_seg = L_Dice + gamma * L_Rank``.

    Used for both Coarse Seg-net and Fine Seg-net.  Shapes as :func:`dice_loss`
    ((B, 1, H, W) logits and {0, 1} targets); returns a scalar.
    Source: MT-Net, Section 3.2.6, Eqs. (1)-(3); gamma = 0.02, K = 20, margin = 0.3 from
    Sections 3.2.5 / 4.6 (the paper writes the weight as lambda in 3.2.5, gamma elsewhere).
    """
    return dice_loss(pred, target, eps=eps, from_logits=from_logits) + gamma * rank_loss(
        pred, target, k=k, margin=margin, from_logits=from_logits)


def mtnet_loss(out: dict, seg_target: torch.Tensor, labels: torch.Tensor, cls_weight: float = 1.0) -> dict:
    """Total MT-Net loss for joint training from :meth:`MTNet.forward_all` outputs.

    ``hybrid(coarse) + hybrid(fine) + cls_weight * BCE(malignancy)``; BCE ignores labels -1
    (see :func:`masked_bce`).  The paper trains Coarse Seg-net, then Fine Seg-net and
    Class-net with the coarse masks as (gradient-free) inputs; since MT-Net detaches the
    coarse mask, summing the three losses trains each sub-network on its own loss only
    (shared Coarse/Fine weights excepted, which see both segmentation losses).  Summing
    them (joint training) and ``cls_weight`` are not specified in the paper; we use 1.0.

    Args:
        out: dict with "coarse", "fine" ((B, 1, H, W) logits) and "malignancy" ((B,) logits).
        seg_target: (B, 1, H, W) {0, 1}; labels: (B,) long/float in {-1, 0, 1}.
    Returns:
        dict with scalar tensors "total", "coarse", "fine", "cls".
    """
    lc = hybrid_seg_loss(out["coarse"], seg_target)
    lf = hybrid_seg_loss(out["fine"], seg_target)
    lb = masked_bce(out["malignancy"], labels)
    return {"total": lc + lf + cls_weight * lb, "coarse": lc, "fine": lf, "cls": lb}


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-class cross-entropy ignoring samples labelled -1 (e.g. the size class of a
    slice whose mask is ambiguous).  logits: (N, C) float; labels: (N,) long in
    {-1, 0..C-1}.  Returns a scalar (0 that keeps the graph when every label is -1).
    Used for the detection-guided model's size-class head (loss not specified in that
    paper's summary; we use cross-entropy)."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep].long())


def multi_head_bce(logits: dict, labels: dict, weights: dict | None = None) -> dict:
    """Weighted sum of :func:`masked_bce` over named binary heads (DSMT-Net; the per-head
    loss is not specified in the DSMT-Net abstract; we use BCE).

    Args:
        logits: {head: (N,) float logits}; labels: {head: (N,) in {-1, 0, 1}} for (a subset
            of) the same heads - a head without labels is skipped; weights: {head: float},
            default 1.0 per head (weight 0 drops the head, e.g. DSMT-Net stage 2).
    Returns:
        {"total": scalar, head: scalar per head used}.
    Raises:
        KeyError: a label or weight is given for a head that has no logits.
    """
    weights = weights or {}
    for name in list(labels) + list(weights):
        if name not in logits:
            raise KeyError(f"multi_head_bce: no logits for head {name!r}; heads: {sorted(logits)}")
    out, total = {}, None
    for name, lg in logits.items():
        if name not in labels:
            continue
        w = float(weights.get(name, 1.0))
        out[name] = masked_bce(lg, labels[name])
        if w != 0.0:
            total = out[name] * w if total is None else total + out[name] * w
    if total is None:
        total = sum(lg.sum() * 0.0 for lg in logits.values())
    out["total"] = total
    return out
