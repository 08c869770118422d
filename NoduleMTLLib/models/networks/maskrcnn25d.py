"""``maskrcnn25d``: 2.5D Mask R-CNN with an auxiliary RoI classifier (paper sections 3.3, 3.5).

Source: Li & Honarvar Shakibaei Asli, Electronics 2026, 15(4), 736 (seed 002).  What the
paper specifies, and we keep:

* torchvision ``maskrcnn_resnet50_fpn`` (ResNet-50 + FPN, RPN, RoIAlign, Faster R-CNN box
  head, mask head = four 3x3 conv + ReLU, transposed conv to 28 x 28) (3.3.1-3.3.2);
* conv1 takes the 5-slice stack; from 3-channel (RGB) weights, the RGB kernels go to
  channels 0-2 and their mean to channels 3-4 (3.3.1) - :func:`adapt_conv1_to_5ch`;
* anchors (4,6,8), (8,12,16), (16,24,32), (32,48,64), (64,96,128) px per FPN level
  P2..P6, aspect ratios (0.5, 1, 2) on every level (3.3.3);
* RPN proposals: 2000 in training, 300 at inference (3.3.3);
* auxiliary RoI classifier: a fully connected classifier after RoI feature extraction,
  positives = proposals with IoU >= 0.3 to a ground-truth box, BCE loss weighted by
  lambda_aux = 0.3 (Eq. 1, 3.3.3-3.3.4), logits fused with the main score to re-rank
  detections at inference (3.3.3);
* losses = torchvision's native Mask R-CNN losses + lambda_aux L_aux (3.3.4);
* three training phases: detection only, mask only, joint (3.5) - :func:`set_training_phase`.

Not specified in the paper; our choices:

* "2000 / 300 proposals" is applied to both torchvision settings, ``rpn_pre_nms_top_n``
  (per FPN level, before NMS) and ``rpn_post_nms_top_n`` (kept after NMS).
* Aux head input and size: the 1024-d output of the box head (TwoMLPHead), then
  Linear(1024, 128) - ReLU - Linear(128, 1).  With an ImageNet backbone under
  torchvision's defaults (FrozenBatchNorm, 3 trainable stages) plus a new trainable
  5-channel conv1, this head brings the trainable parameter count to 43.85 M, the number
  the paper reports (3.3.3); the pooled 256 x 7 x 7 features (12,544 inputs) would not.
* Aux labels are computed on the proposals torchvision samples for the box head
  (512 per image, 25 % positives at IoU >= 0.5, GT boxes appended), so the aux head sees
  the IoU 0.3-0.5 proposals the main head treats as background.
* Fusion rule (paper: "fused ... to re-rank", rule not given): per proposal and class,
  ``score = (1 - w) * softmax_main + w * sigmoid(aux_logit)`` with w = 0.5, applied
  *before* torchvision's score threshold, NMS and top-k, so fusion re-ranks what survives.
  The outputs also carry ``scores_main`` and ``scores_aux``.
* Loss dict key ``loss_aux`` holds lambda_aux x BCE, so ``sum(loss_dict.values())`` is the
  paper's total (plus torchvision's two RPN losses, part of its "native" loss).
* Input normalisation: 5-channel ``image_mean = 0.449``, ``image_std = 0.226`` (the RGB
  averages of torchvision's ImageNet statistics, the statistics an ImageNet conv1 expects).
* No resizing: torchvision's ``GeneralizedRCNNTransform`` rescales every input so its
  short side is ``min_size`` (default 800, i.e. 512 x 512 slices upsampled 1.56x; with
  ``min_size = 512`` a 96 px training crop or a 300 px lung-bounds crop would still be
  upsampled 5.3x / 1.7x).  :class:`NoResizeTransform` (the default, ``resize=False``)
  only normalises and pads to a multiple of 32, so anchors are in native CT pixels
  whatever the input size; ``resize=True`` restores torchvision's behaviour with
  ``min_size``/``max_size``.
* Without ImageNet weights (the default here: nothing is downloaded) the model is
  torchvision's from-scratch build (BatchNorm, all layers trainable) and the 5-channel
  conv1 is freshly Kaiming-initialised.

Narrow variant (``backbone="resnet18"``; registry id ``maskrcnn25d`` ships this one)
----------------------------------------------------------------------------------------

Not in the paper (which chose ResNet-50 over ResNet-34, section 3.5).  We train on a
2-core CPU in under an hour and cannot download ImageNet weights; a from-scratch
ResNet-50-FPN does not learn in that budget.  The narrow variant keeps everything the
paper specifies about the detector (5-channel 2.5D input, anchors, 2000/300 proposals,
box + mask heads, auxiliary RoI classifier with the same IoU / lambda / fusion, the three
phases) and changes only widths:

* backbone: torchvision ``resnet18`` (BatchNorm, all stages trainable) under
  ``BackboneWithFPN`` (C2..C5 = layer1..layer4, 64/128/256/512 channels, P6 by max pool);
* FPN width 128 (paper 256), box head ``TwoMLPHead`` 128 x 7 x 7 -> 512 -> 512
  (paper 1024), mask head four 3x3 convs of 128 channels + 128-channel transposed conv
  (paper 256), aux head 512 -> 128 -> 1;  about 16 M parameters (32 MB in fp16);
* input normalisation mean 0, std 1: the [0, 1] windowed stack is given as it is, the
  scale on which the LNMSNet encoder (below) was trained;
* transfer instead of ImageNet: :func:`init_backbone_from_lnmsnet` copies our trained
  LNMSNet encoder (a ResNet-18 trained on LIDC-IDRI nodule patches of the same training
  patients; ``Resources/Weights/lnmsnet.safetensors``) into the body.  LNMSNet's conv1
  takes 1 channel; its kernel is spread over the 5 slices as ``w / 5`` per channel
  (the I3D "inflation" rule), so a stack of 5 identical slices gives exactly LNMSNet's
  stem response to that slice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

#: Input channels: five adjacent axial slices (section 3.2).  The network's own figure (the models
#: layer does not import ``detection``); ``NoduleMTLLib.detection.preprocess.STACK_SIZE`` builds
#: stacks of this size (test_module_layout checks that the two are equal).
STACK_SIZE = 5

#: Anchor sizes (px) per FPN level P2, P3, P4, P5, P6 (section 3.3.3).
ANCHOR_SIZES = ((4, 6, 8), (8, 12, 16), (16, 24, 32), (32, 48, 64), (64, 96, 128))
#: Aspect ratios (height / width) on every level (section 3.3.3).
ASPECT_RATIOS = (0.5, 1.0, 2.0)
#: RPN proposals in training / at inference (section 3.3.3).
RPN_TOP_N_TRAIN = 2000
RPN_TOP_N_TEST = 300
#: Auxiliary classifier: positive IoU, loss weight lambda_aux (sections 3.3.3, 3.5).
AUX_IOU_THRESH = 0.3
AUX_LOSS_WEIGHT = 0.3
#: Weight of the aux probability in the fused inference score (not in the paper).
AUX_FUSION_WEIGHT = 0.5
#: Hidden width of the aux head (not in the paper; see the module docstring).
AUX_HIDDEN = 128
#: Per-channel input normalisation (after the [0, 1] preprocessing).
IMAGE_MEAN = (0.449,) * STACK_SIZE
IMAGE_STD = (0.226,) * STACK_SIZE
#: Image size given to torchvision's transform; used only with ``resize=True`` (default: no resizing).
MIN_SIZE = 512
MAX_SIZE = 512
#: Backbones and their head widths: (FPN channels, box-head representation, mask-head channels).
BACKBONES = {"resnet50": (256, 1024, 256), "resnet18": (128, 512, 128)}
#: Input normalisation of the narrow (ResNet-18) variant: none (see the module docstring).
NARROW_IMAGE_MEAN = (0.0,) * STACK_SIZE
NARROW_IMAGE_STD = (1.0,) * STACK_SIZE
#: Loss keys of the model in training mode.
DETECTION_LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_aux")
MASK_LOSS_KEYS = ("loss_mask",)
#: Input of the narrow variant (the contract of :class:`NoduleMTLLib.models.contract.WholeScanDetector`):
#: a list of float32 (5, H, W) stacks at native pixel size, values of
#: :mod:`NoduleMTLLib.detection.preprocess`.  Read by the registry and the manifest.
INPUT_SPEC = {"dims": 2.5, "channels": STACK_SIZE,
              "stack": "axial slices k-2..k+2 (edge slices repeated), channel 0 most inferior",
              "spacing_mm": "native (no resampling, no resizing)",
              "intensity": "HU window [-1000, 400] -> [0, 1], slice-wise CLAHE, times the lung mask "
                           "(NoduleMTLLib.detection.preprocess)", "variant": "narrow"}


def adapt_conv1_to_5ch(conv3: nn.Conv2d, in_channels: int = STACK_SIZE) -> nn.Conv2d:
    """A ``in_channels``-input copy of a 3-channel (RGB) stem convolution (section 3.3.1).

    Channels 0, 1, 2 (slices z-2, z-1, z of the stack) receive the R, G, B kernels;
    channels 3, 4 (slices z+1, z+2) receive the mean of the three.  Stride, padding,
    dilation, groups and bias are copied.

    Args:
        conv3: ``nn.Conv2d`` with 3 input channels, weight (C_out, 3, kh, kw).
        in_channels: input channels of the new conv (>= 3; 5 for the 2.5D stack).

    Returns:
        new ``nn.Conv2d`` with weight (C_out, in_channels, kh, kw), same dtype/device,
        parameters trainable.

    Raises:
        ValueError: conv3 does not take 3 channels, is grouped, or in_channels < 3.
    """
    if conv3.in_channels != 3 or conv3.groups != 1:
        raise ValueError(f"expected an ungrouped 3-channel conv, got in_channels={conv3.in_channels}, groups={conv3.groups}")
    if in_channels < 3:
        raise ValueError(f"in_channels must be >= 3, got {in_channels}")
    new = nn.Conv2d(in_channels, conv3.out_channels, conv3.kernel_size, stride=conv3.stride,
                    padding=conv3.padding, dilation=conv3.dilation, bias=conv3.bias is not None,
                    padding_mode=conv3.padding_mode, device=conv3.weight.device, dtype=conv3.weight.dtype)
    with torch.no_grad():
        w = conv3.weight
        new.weight[:, :3] = w
        new.weight[:, 3:] = w.mean(dim=1, keepdim=True)
        if conv3.bias is not None:
            new.bias.copy_(conv3.bias)
    return new


class RoIAuxClassifier(nn.Module):
    """Auxiliary RoI classifier: is this proposal a nodule? (section 3.3.3).

    Linear(in_features, hidden) - ReLU - Linear(hidden, 1).  Layer sizes are not specified
    in the paper; see the module docstring.

    Forward:
        x: (R, in_features) float32 box-head representation of R proposals (any (R, ...)
           is flattened).
        Returns (R,) float32 logits (sigmoid -> P(nodule)).
    """

    def __init__(self, in_features: int = 1024, hidden: int = AUX_HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in_features) float32 -> (R,) float32 logits."""
        return self.fc2(F.relu(self.fc1(x.flatten(1)))).squeeze(1)


class AuxRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` (box + mask branches) with the auxiliary RoI classifier.

    Same data flow as ``RoIHeads.forward`` (keypoint branch not supported), plus:

    * training: aux logits on the sampled proposals, targets ``max IoU(proposal, GT) >=
      aux_iou_thresh``, loss ``loss_aux = aux_loss_weight * BCE`` (section 3.3.4);
    * inference: fused scores (see :meth:`postprocess_detections_fused`) replace the
      softmax scores before thresholding, NMS and top-k; results also carry
      ``scores_main`` and ``scores_aux`` (N,) float32.
    * ``mask_loss_enabled = False`` skips the mask branch in training (phase 1).

    Args:
        base: a configured ``RoIHeads`` (from torchvision's MaskRCNN); its modules and
            settings are reused.
        aux_classifier: module mapping the box-head representation (R, 1024) to (R,) logits.
        aux_iou_thresh, aux_loss_weight, aux_fusion_weight: see the module constants.

    Raises:
        ValueError: base has keypoint heads, or aux_fusion_weight outside [0, 1].
    """

    def __init__(self, base: RoIHeads, aux_classifier: nn.Module, aux_iou_thresh: float = AUX_IOU_THRESH,
                 aux_loss_weight: float = AUX_LOSS_WEIGHT, aux_fusion_weight: float = AUX_FUSION_WEIGHT):
        if base.has_keypoint():
            raise ValueError("keypoint heads are not supported")
        if not 0.0 <= aux_fusion_weight <= 1.0:
            raise ValueError(f"aux_fusion_weight must be in [0, 1], got {aux_fusion_weight}")
        super().__init__(
            base.box_roi_pool, base.box_head, base.box_predictor,
            fg_iou_thresh=base.proposal_matcher.high_threshold,
            bg_iou_thresh=base.proposal_matcher.low_threshold,
            batch_size_per_image=base.fg_bg_sampler.batch_size_per_image,
            positive_fraction=base.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=base.box_coder.weights,
            score_thresh=base.score_thresh, nms_thresh=base.nms_thresh,
            detections_per_img=base.detections_per_img,
            mask_roi_pool=base.mask_roi_pool, mask_head=base.mask_head, mask_predictor=base.mask_predictor,
        )
        self.aux_classifier = aux_classifier
        self.aux_iou_thresh = float(aux_iou_thresh)
        self.aux_loss_weight = float(aux_loss_weight)
        self.aux_fusion_weight = float(aux_fusion_weight)
        self.mask_loss_enabled = True

    def aux_targets(self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(R,) float targets: 1 where a proposal's best IoU with a GT box of its image is >= aux_iou_thresh."""
        out = []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].to(props.dtype)
            if gt.numel() == 0:
                out.append(torch.zeros(props.shape[0], dtype=props.dtype, device=props.device))
            else:
                iou = box_ops.box_iou(gt, props).max(dim=0).values
                out.append((iou >= self.aux_iou_thresh).to(props.dtype))
        return torch.cat(out)

    def postprocess_detections_fused(self, class_logits, box_regression, aux_logits, proposals, image_shapes):
        """``RoIHeads.postprocess_detections`` with fused scores.

        ``fused[r, c] = (1 - w) * softmax(class_logits)[r, c] + w * sigmoid(aux_logits[r])``
        for every foreground class c, w = ``aux_fusion_weight``; then, as torchvision:
        clip boxes, drop background, keep fused > ``score_thresh``, drop boxes smaller than
        0.01 px, per-class NMS (``nms_thresh``), keep the top ``detections_per_img``.

        Returns:
            lists (one per image) of boxes (N, 4) xyxy px, fused scores (N,), labels (N,)
            int64, main scores (N,), aux probabilities (N,).
        """
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        main = F.softmax(class_logits, -1)
        aux = torch.sigmoid(aux_logits).unsqueeze(1).expand_as(main)
        w = self.aux_fusion_weight
        fused = (1.0 - w) * main + w * aux
        res = ([], [], [], [], [])
        for boxes, fs, ms, ax, shape in zip(pred_boxes.split(per_image, 0), fused.split(per_image, 0),
                                            main.split(per_image, 0), aux.split(per_image, 0), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(fs)
            boxes = boxes[:, 1:].reshape(-1, 4)
            fs, ms, ax, labels = (a[:, 1:].reshape(-1) for a in (fs, ms, ax, labels))
            keep = torch.where(fs > self.score_thresh)[0]
            boxes, fs, ms, ax, labels = boxes[keep], fs[keep], ms[keep], ax[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, fs, ms, ax, labels = boxes[keep], fs[keep], ms[keep], ax[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, fs, labels, self.nms_thresh)[: self.detections_per_img]
            for lst, a in zip(res, (boxes[keep], fs[keep], labels[keep], ms[keep], ax[keep])):
                lst.append(a)
        return res

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None):
        """Box, aux and mask branches.

        Args:
            features: FPN maps {"0".."3", "pool"}, each (B, 256, h, w) float32.
            proposals: per image (P_i, 4) xyxy px from the RPN.
            image_shapes: per image (H, W) after torchvision's transform.
            targets: training only; per image "boxes" (G, 4) float32 xyxy px, "labels" (G,)
                int64, "masks" (G, H, W) uint8.

        Returns:
            (result, losses): in training ``result`` is empty and ``losses`` holds
            loss_classifier, loss_box_reg, loss_aux (weighted) and loss_mask (unless
            ``mask_loss_enabled`` is False); at inference ``losses`` is empty and each result
            dict holds boxes (N, 4), labels (N,), scores (N,) (fused), scores_main,
            scores_aux and masks (N, 1, 28, 28) probabilities (pasted by the transform).

        Raises:
            ValueError / TypeError: missing or mistyped targets in training.
        """
        if targets is not None:
            for t in targets:
                if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                    raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        else:
            labels = regression_targets = matched_idxs = None

        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        aux_logits = self.aux_classifier(box_features)

        result: list[dict[str, torch.Tensor]] = []
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            aux_t = self.aux_targets(proposals, targets)
            loss_aux = F.binary_cross_entropy_with_logits(aux_logits, aux_t)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                      "loss_aux": self.aux_loss_weight * loss_aux}
        else:
            boxes, scores, labs, main, aux = self.postprocess_detections_fused(
                class_logits, box_regression, aux_logits, proposals, image_shapes)
            for i in range(len(boxes)):
                result.append({"boxes": boxes[i], "labels": labs[i], "scores": scores[i],
                               "scores_main": main[i], "scores_aux": aux[i]})

        if self.has_mask() and (not self.training or self.mask_loss_enabled):
            if self.training:
                mask_proposals, pos_matched_idxs = [], []
                for img_id in range(len(proposals)):
                    pos = torch.where(labels[img_id] > 0)[0]
                    mask_proposals.append(proposals[img_id][pos])
                    pos_matched_idxs.append(matched_idxs[img_id][pos])
            else:
                mask_proposals = [r["boxes"] for r in result]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            if self.training:
                losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                                    [t["labels"] for t in targets], pos_matched_idxs)
            else:
                for prob, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                    r["masks"] = prob
        return result, losses


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` without the resizing step.

    Normalises each (C, H, W) image with ``image_mean``/``image_std``, pads the batch to a
    multiple of ``size_divisible`` (32) and records the true sizes, exactly as torchvision;
    images, boxes and masks keep their native pixel size (``postprocess`` then maps boxes
    and pastes masks at scale 1).  ``min_size``/``max_size`` are stored but unused.
    """

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        """Identity: (image (C, H, W), target) returned unchanged."""
        return image, target


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by ``FrozenBatchNorm2d`` with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
    return module


def _new_conv1(out_channels: int = 64) -> nn.Conv2d:
    """Fresh 5-channel ResNet stem conv (7x7, stride 2, padding 3, no bias), Kaiming-initialised."""
    conv = nn.Conv2d(STACK_SIZE, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet18_fpn(fpn_channels: int) -> BackboneWithFPN:
    """ResNet-18 body (5-channel conv1, BatchNorm, all trainable) + FPN P2..P6 with ``fpn_channels``."""
    body = resnet18(weights=None)
    body.conv1 = _new_conv1(64)
    return BackboneWithFPN(body, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           in_channels_list=[64, 128, 256, 512], out_channels=fpn_channels,
                           extra_blocks=LastLevelMaxPool())


def build_maskrcnn25d(num_classes: int = 2, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE, *,
                      backbone: str = "resnet50", resize: bool = False,
                      anchor_sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS,
                      rpn_top_n_train: int = RPN_TOP_N_TRAIN, rpn_top_n_test: int = RPN_TOP_N_TEST,
                      aux_iou_thresh: float = AUX_IOU_THRESH, aux_loss_weight: float = AUX_LOSS_WEIGHT,
                      aux_fusion_weight: float = AUX_FUSION_WEIGHT, aux_hidden: int = AUX_HIDDEN,
                      image_mean=None, image_std=None,
                      backbone_rgb_weights: str | Path | dict | None = None,
                      trainable_backbone_layers: int = 3, **maskrcnn_kwargs) -> nn.Module:
    """The ``maskrcnn25d`` network (sections 3.3, 3.5): paper configuration or the narrow variant.

    ``backbone="resnet50"`` (default, the paper): torchvision
    ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, ...)`` with the paper's
    anchors and proposal counts, a 5-channel conv1 and :class:`AuxRoIHeads`.
    ``backbone="resnet18"``: the narrow variant of the module docstring (ResNet-18-FPN,
    FPN 128, box head 512, mask head 128, same anchors / proposals / aux head / phases);
    initialise its body with :func:`init_backbone_from_lnmsnet` before training.

    Args:
        num_classes: including background (2: background, nodule).
        min_size, max_size: torchvision transform sizes (px), used only when ``resize``.
        backbone: "resnet50" (paper) or "resnet18" (narrow).
        resize: False (default): :class:`NoResizeTransform`, inputs at native pixel size;
            True: torchvision's rescaling to ``min_size``/``max_size``.
        anchor_sizes, aspect_ratios: per FPN level (5 levels) and for all levels.
        rpn_top_n_train, rpn_top_n_test: RPN pre- and post-NMS top-n (2000 / 300).
        aux_iou_thresh, aux_loss_weight, aux_fusion_weight, aux_hidden: aux classifier.
        image_mean, image_std: 5 per-channel values applied to the [0, 1] stack (default
            0.449 / 0.226 for resnet50, 0 / 1 for resnet18).
        backbone_rgb_weights: resnet50 only: optional torchvision ResNet-50 ImageNet
            ``state_dict`` (or a path to one saved with ``torch.save``; ``fc.*`` keys
            ignored).  When given, as in the paper (3.3.1): weights loaded, BatchNorm
            frozen, only the last ``trainable_backbone_layers`` stages trainable
            (torchvision's default 3), conv1 adapted with :func:`adapt_conv1_to_5ch` (and
            trainable).  When None, nothing is downloaded: from-scratch BatchNorm ResNet,
            all stages trainable, new Kaiming-initialised 5-channel conv1.
        trainable_backbone_layers: see above (0..5).
        **maskrcnn_kwargs: further ``MaskRCNN`` keyword arguments (e.g. box_score_thresh).

    Returns:
        torchvision ``MaskRCNN`` whose ``roi_heads`` is an :class:`AuxRoIHeads`.
        Input: list of (5, H, W) float32 tensors in [0, 1] (:func:`..preprocess.stack_slices`),
        any H, W (padded to multiples of 32 internally).
        Training (with targets: boxes (G, 4) float32 xyxy px, labels (G,) int64, masks
        (G, H, W) uint8; G may be 0 for a negative stack): dict with loss_objectness,
        loss_rpn_box_reg, loss_classifier, loss_box_reg, loss_aux, loss_mask (scalars).
        Eval: per image dict with boxes (N, 4) xyxy px, labels, scores (fused), scores_main,
        scores_aux (N,), masks (N, 1, H, W) float probabilities.
        ``model.nodulemtl_base_trainable`` records the parameters trainable after the build
        (used by :func:`set_training_phase`); ``model.nodulemtl_backbone`` the backbone name.

    Raises:
        ValueError: unknown backbone, wrong number of anchor levels or mean/std values,
            missing backbone keys, RGB weights with resnet18.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    if len(anchor_sizes) != 5:
        raise ValueError(f"ResNet-FPN has 5 pyramid levels; got {len(anchor_sizes)} anchor size groups")
    narrow = backbone == "resnet18"
    if image_mean is None:
        image_mean = NARROW_IMAGE_MEAN if narrow else IMAGE_MEAN
    if image_std is None:
        image_std = NARROW_IMAGE_STD if narrow else IMAGE_STD
    if len(image_mean) != STACK_SIZE or len(image_std) != STACK_SIZE:
        raise ValueError(f"image_mean/std need {STACK_SIZE} values")
    anchor_gen = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
                  rpn_anchor_generator=anchor_gen,
                  rpn_pre_nms_top_n_train=rpn_top_n_train, rpn_post_nms_top_n_train=rpn_top_n_train,
                  rpn_pre_nms_top_n_test=rpn_top_n_test, rpn_post_nms_top_n_test=rpn_top_n_test, **maskrcnn_kwargs)
    if narrow:
        if backbone_rgb_weights is not None:
            raise ValueError("backbone_rgb_weights is for the resnet50 backbone; use init_backbone_from_lnmsnet")
        fpn_ch, rep, mask_ch = BACKBONES[backbone]
        model = MaskRCNN(_resnet18_fpn(fpn_ch), num_classes=None,
                         box_head=TwoMLPHead(fpn_ch * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, num_classes),
                         mask_head=MaskRCNNHeads(fpn_ch, (mask_ch,) * 4, 1),
                         mask_predictor=MaskRCNNPredictor(mask_ch, mask_ch, num_classes), **common)
    else:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **common)
        body = model.backbone.body
        if backbone_rgb_weights is not None:
            sd = backbone_rgb_weights
            if not isinstance(sd, dict):
                sd = torch.load(str(sd), map_location="cpu", weights_only=True)
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            missing, unexpected = body.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"backbone weights do not fit ResNet-50: missing {missing[:5]}, unexpected {unexpected[:5]}")
            _freeze_batchnorm(body)
            if not 0 <= trainable_backbone_layers <= 5:
                raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers}")
            train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_backbone_layers]
            for name, p in body.named_parameters():
                p.requires_grad_(any(name.startswith(t) for t in train))
            body.conv1 = adapt_conv1_to_5ch(body.conv1)
        else:
            body.conv1 = _new_conv1(64)
    if not resize:
        t = model.transform
        model.transform = NoResizeTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                            size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    rep = model.roi_heads.box_head.fc7.out_features
    model.roi_heads = AuxRoIHeads(model.roi_heads, RoIAuxClassifier(rep, aux_hidden), aux_iou_thresh=aux_iou_thresh,
                                  aux_loss_weight=aux_loss_weight, aux_fusion_weight=aux_fusion_weight)
    model.nodulemtl_base_trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    model.nodulemtl_backbone = backbone
    return model
