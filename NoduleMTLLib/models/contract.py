"""The network contract: what the analysis asks of a click network and of a whole-scan detector.

Every registered network (``NoduleMTLLib.models.registry``) satisfies one of the two protocols
below; the click path (:mod:`NoduleMTLLib.inference.pipeline`), re-classification
(:mod:`NoduleMTLLib.inference.refine`) and the whole-scan search (:mod:`NoduleMTLLib.detection.infer`)
call only what is written here - no ``hasattr`` probing; so does the training recipe, which
computes the loss a network declares (``training_loss``).  A network file declares its input
once, as ``INPUT_SPEC`` (a dict; the registry reads it through ``NetworkSpec.input_spec``;
click networks need at least ``size_px`` and ``spacing_mm``).

Adding a network: one file with the ``nn.Module`` (click networks inherit
:class:`ClickNetworkBase` for the defaults, and set ``training_loss`` when they do not train
with the default ``"seg_cls"``) and its ``INPUT_SPEC``, one ``NetworkSpec`` in the registry
(``registry.register``), and its training config.  Once its weights are shipped, the
manifest entry written by the export holds the input spec the analysis reads
(``NetworkSpec.input_spec``).  ``Testing/Python/
test_network_contract.py`` does exactly that with a small sixth network.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ClickNetwork(Protocol):
    """A 2D network that segments and classifies the nodule at the centre of axial patches.

    Input ``x``: float32 tensor (N, 1, H, W), N axial slices of a patch centred on the
    click, H = W = ``INPUT_SPEC["size_px"]`` pixels of ``INPUT_SPEC["spacing_mm"]`` mm,
    intensities normalised per slice (:func:`NoduleMTLLib.inference.preprocessing.normalize_slices`),
    on the network's device.

    Attributes:
        sign_heads: names of the radiological-sign heads, in the order of the dict that
            :meth:`forward_click` returns (empty for malignancy-only networks).
        seg_border_px: width (px) of the patch's outer ring that the network never
            segments (DSMT-Net's local crop; 0 otherwise); the zoom ladder treats a mask
            touching that ring as clipped.
        classifies_mask: True when the malignancy classifier takes the mask as an input
            (MT-Net's Class-net, ``classnet(x, mask)``): re-classification of an edited mask
            then feeds the mask instead of re-running :meth:`forward_click`.
        training_loss: the network's training loss, one of :data:`TRAINING_LOSSES` (the
            training recipe, ``training.click2d.joint_loss``, computes the loss it names;
            the library never imports the training code).
    """

    sign_heads: tuple[str, ...]
    seg_border_px: int
    classifies_mask: bool
    training_loss: str

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seg logits float32 (N, 1, H, W), malignancy logit float32 (N,))`` (training API)."""
        ...

    def forward_click(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(seg logits (N, 1, H, W), malignancy logit (N,), {sign: logit (N,)})``, float32
        on the input's device; the dict has exactly :attr:`sign_heads` as keys."""
        ...


#: Training losses a click network can declare (``ClickNetwork.training_loss``), each computed
#: by ``training.click2d.LOSSES[name](model, x, y, lab, cfg, signs)``:
#:
#: * ``"seg_cls"``: segmentation (BCE + soft Dice) + ``cls_loss_weight`` x masked malignancy
#:   BCE on ``forward`` (LNMSNet; the default).
#: * ``"seg_cls_size"``: that on ``forward_all`` + ``size_loss_weight`` x size-class
#:   cross-entropy (the detection-guided model).
#: * ``"mtnet"``: hybrid Dice + rank loss on the coarse and fine masks + Class-net BCE
#:   (MT-Net, paper section 3.3).
#: * ``"multi_head"``: auxiliary segmentation on the local crop + the heads' masked BCE
#:   (DSMT-Net).
TRAINING_LOSSES = ("seg_cls", "seg_cls_size", "mtnet", "multi_head")


class ClickNetworkBase:
    """Defaults of :class:`ClickNetwork` for an ``nn.Module`` whose ``forward`` returns
    ``(seg, malignancy)``: no sign heads, no border, malignancy from the image alone, the
    ``"seg_cls"`` training loss.  Use as the first base: ``class MyNet(ClickNetworkBase, nn.Module)``."""

    sign_heads: tuple[str, ...] = ()
    seg_border_px: int = 0
    classifies_mask: bool = False
    training_loss: str = "seg_cls"

    def forward_click(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        seg, cls = self(x)
        return seg, cls, {}


@runtime_checkable
class WholeScanDetector(Protocol):
    """A torchvision-style 2.5D instance detector (``maskrcnn25d``) run slice by slice.

    Called in eval mode as ``model(images)``:

    * ``images``: list of float32 tensors (C, H, W), C = ``INPUT_SPEC["channels"]`` (5
      adjacent axial slices, channel 0 most inferior), values of
      :mod:`NoduleMTLLib.detection.preprocess` in [0, 1], native pixel size, on the
      model's device;
    * returns one dict per image: ``boxes`` float32 (K, 4) xyxy pixels, ``scores`` float32
      (K,) in [0, 1], ``labels`` int64 (K,), ``masks`` float32 (K, 1, H, W) probabilities.

    ``transform`` is torchvision's ``GeneralizedRCNNTransform`` (the search keeps inputs at
    their size, :func:`NoduleMTLLib.detection.infer.run_slice_detections`).
    """

    transform: torch.nn.Module

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]: ...

    def eval(self) -> WholeScanDetector: ...
