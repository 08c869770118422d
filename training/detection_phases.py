"""Training-time code of ``maskrcnn25d`` (paper sections 3.3.3, 3.5): LNMSNet-backbone
transfer and the three training phases.

Source: Li & Honarvar Shakibaei Asli, Electronics 2026, 15(4), 736 (seed 002).  Moved out of
``NoduleMTLLib.models.networks.maskrcnn25d`` (issue 14): inference never needs it, and the transfer reads
the registry, which builds the detector - keeping it here breaks that import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from NoduleMTLLib.detection.preprocess import STACK_SIZE
from NoduleMTLLib.models import registry
from NoduleMTLLib.models.networks.maskrcnn25d import DETECTION_LOSS_KEYS, MASK_LOSS_KEYS, AuxRoIHeads


def lnmsnet_encoder_state_dict(lnmsnet_sd: dict[str, torch.Tensor], in_channels: int = STACK_SIZE) -> dict[str, torch.Tensor]:
    """LNMSNet's ResNet-18 encoder as a torchvision ``resnet18`` state dict (without ``fc``).

    Key mapping: ``stem.0.weight`` -> ``conv1.weight`` (spread from 1 to ``in_channels``
    channels as ``w / in_channels`` each, the I3D inflation rule: a stack of identical
    slices gives LNMSNet's response), ``stem.1.*`` -> ``bn1.*``, ``layer1..4.*`` unchanged.

    Args:
        lnmsnet_sd: an :class:`~NoduleMTLLib.models.networks.lnmsnet.LNMSNet` state dict (float).
        in_channels: channels of the new conv1 (5).

    Returns:
        dict of float32 tensors; conv1.weight is (64, in_channels, 7, 7).

    Raises:
        ValueError: the state dict is not LNMSNet's (no 1-channel ``stem.0.weight``).
    """
    w = lnmsnet_sd.get("stem.0.weight")
    if w is None or w.ndim != 4 or w.shape[1] != 1:
        raise ValueError("not an LNMSNet state dict: expected a 1-channel 'stem.0.weight'")
    out = {"conv1.weight": (w.float() / in_channels).repeat(1, in_channels, 1, 1)}
    for k, v in lnmsnet_sd.items():
        if k.startswith("stem.1."):
            out["bn1." + k[len("stem.1."):]] = v
        elif k.split(".")[0] in ("layer1", "layer2", "layer3", "layer4"):
            out[k] = v
    return {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}


def init_backbone_from_lnmsnet(model: nn.Module, source: str | Path | dict | None = None) -> Path | None:
    """Initialise the narrow variant's ResNet-18 body from a trained LNMSNet encoder (transfer).

    Args:
        model: from ``build_maskrcnn25d(backbone="resnet18")``.
        source: an LNMSNet state dict, a checkpoint / ``.safetensors`` path (read with
            :func:`NoduleMTLLib.models.registry.read_state_dict`, e.g. ``runs/lnmsnet/best.pt``),
            or None: the shipped ``lnmsnet.safetensors`` (located and sha256-checked by the
            registry).

    Returns:
        the path read (None when a dict was given).

    Raises:
        ValueError: model is not the resnet18 variant, or the weights do not fit.
        NoduleMTLLib.models.registry.WeightsError: shipped weights missing or corrupt.
    """
    if getattr(model, "nodulemtl_backbone", None) != "resnet18":
        raise ValueError("init_backbone_from_lnmsnet needs build_maskrcnn25d(backbone='resnet18')")
    path = None
    if isinstance(source, dict):
        sd = source
    else:
        if source is None:
            path = registry.find_weights(registry.BACKBONE_SOURCE)
            registry.verify_weights(registry.BACKBONE_SOURCE, path)
        else:
            path = Path(source)
        sd = registry.read_state_dict(path)
    enc = lnmsnet_encoder_state_dict(sd)
    body = model.backbone.body
    missing, unexpected = body.load_state_dict(enc, strict=False)
    if unexpected or missing:
        raise ValueError(f"LNMSNet encoder does not fit the ResNet-18 body: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return path


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (the paper reports 43.85 M, section 3.3.3)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# training phases (section 3.5)


@dataclass(frozen=True)
class TrainingPhase:
    """One phase of the staged schedule (section 3.5).

    Attributes:
        name: "detection", "mask" or "joint".
        trainable_modules: attribute paths (prefixes of ``named_parameters`` names) that train.
        loss_keys: loss-dict keys that count in the total loss of this phase.
    """

    name: str
    trainable_modules: tuple[str, ...]
    loss_keys: tuple[str, ...]


_DETECTION_MODULES = ("backbone", "rpn", "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.aux_classifier")
_MASK_MODULES = ("roi_heads.mask_head", "roi_heads.mask_predictor")

#: Phase 1: mask head frozen, detection components (backbone, FPN, RPN, box head, aux) train.
#: Phase 2: detection branch frozen, mask head fine-tuned on the (stable) proposals.
#: Phase 3: everything trains jointly.
PHASES = {
    "detection": TrainingPhase("detection", _DETECTION_MODULES, DETECTION_LOSS_KEYS),
    "mask": TrainingPhase("mask", _MASK_MODULES, MASK_LOSS_KEYS),
    "joint": TrainingPhase("joint", _DETECTION_MODULES + _MASK_MODULES, DETECTION_LOSS_KEYS + MASK_LOSS_KEYS),
}
#: Phase lengths read from the paper's Fig. 12 / section 4.3.1: detection-only epochs 1-9,
#: mask-only epochs 10-14, joint from epoch 15 (35 epochs in all; "iteratively adjusted").
DETECTION_EPOCHS = 9
MASK_EPOCHS = 5


def phase_for_epoch(epoch: int, detection_epochs: int = DETECTION_EPOCHS, mask_epochs: int = MASK_EPOCHS) -> str:
    """Phase name for a 1-based epoch number (section 3.5 / Fig. 12 schedule).

    Raises:
        ValueError: epoch < 1.
    """
    if epoch < 1:
        raise ValueError(f"epochs are 1-based, got {epoch}")
    if epoch <= detection_epochs:
        return "detection"
    if epoch <= detection_epochs + mask_epochs:
        return "mask"
    return "joint"


def set_training_phase(model: nn.Module, phase: str | TrainingPhase) -> TrainingPhase:
    """Configure a :func:`build_maskrcnn25d` model for one training phase (section 3.5).

    Sets ``requires_grad`` (a parameter trains iff it was trainable after the build and
    lies in the phase's ``trainable_modules``), switches the mask branch off in phase 1
    (``roi_heads.mask_loss_enabled``; saves its compute, no ``loss_mask`` key), and puts
    BatchNorm layers whose parameters are all frozen into eval mode so their running
    statistics stay fixed.  ``model.train()`` resets that last part: call this function
    after ``model.train()``.

    Args:
        model: from :func:`build_maskrcnn25d`.
        phase: "detection", "mask", "joint", or a :class:`TrainingPhase`.

    Returns:
        the :class:`TrainingPhase` (its ``loss_keys`` go to :func:`phase_loss`).

    Raises:
        KeyError: unknown phase name.
    """
    spec = phase if isinstance(phase, TrainingPhase) else PHASES[phase]
    base = getattr(model, "nodulemtl_base_trainable", None)
    for name, p in model.named_parameters():
        in_phase = any(name == m or name.startswith(m + ".") for m in spec.trainable_modules)
        p.requires_grad_(in_phase and (base is None or name in base))
    if isinstance(model.roi_heads, AuxRoIHeads):
        model.roi_heads.mask_loss_enabled = "loss_mask" in spec.loss_keys
    if model.training:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
    return spec


def phase_loss(loss_dict: dict[str, torch.Tensor], phase: str | TrainingPhase) -> torch.Tensor:
    """Total loss of a phase: sum of the loss-dict entries the phase counts (Eq. 1 in phase 3).

    Raises:
        KeyError: unknown phase name; ValueError: none of the phase's losses is present.
    """
    spec = phase if isinstance(phase, TrainingPhase) else PHASES[phase]
    parts = [loss_dict[k] for k in spec.loss_keys if k in loss_dict]
    if not parts:
        raise ValueError(f"none of {spec.loss_keys} in the loss dict ({sorted(loss_dict)})")
    return torch.stack(parts).sum()
