"""Detection-guided model, DSMT-Net and MT-Net: shapes, paper-specified details, losses,
transfer learning (freezing), configurable heads, spatial regularisation, real-data checks.

Kept small for a 2-core CPU: one torch thread, narrow variants, 64 x 64 inputs, batch 2.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from NoduleMTLLib.models.networks.detguided import (
    SIZE_CLASSES,
    DetGuidedNet,
    build_detguided,
    freeze_layers,
    size_class_from_mask,
    spatial_regularization,
)
from NoduleMTLLib.models.networks.dsmtnet import (
    DEFAULT_HEADS,
    KNOWN_HEADS,
    LIDC_HEAD_RULES,
    PAPER_HEADS,
    DSMTNet,
    build_dsmtnet,
    dual_scale_crops,
    dual_scale_from_patch,
    lidc_head_label,
    stage_parameters,
)
from NoduleMTLLib.models.networks.mtnet import AlignedXceptionEncoder, ClassNet, build_mtnet, init_4th_channel_from_rgb_mean
from training.losses import dice_loss, hybrid_seg_loss, masked_cross_entropy, mtnet_loss, multi_head_bce, rank_loss

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- shapes

@pytest.mark.slow
def test_detguided_shapes_and_outputs():
    torch.manual_seed(0)
    net = build_detguided("narrow").eval()
    with torch.inference_mode():
        seg, mal = net(torch.randn(2, 1, 64, 64))
        out = net.forward_all(torch.randn(2, 1, 64, 64))
    assert seg.shape == (2, 1, 64, 64) and mal.shape == (2,)
    assert seg.dtype == torch.float32 and mal.dtype == torch.float32
    assert out["seg"].shape == out["seg_regularized"].shape == (2, 1, 64, 64)
    assert out["size_logits"].shape == (2, len(SIZE_CLASSES))
    # the prior only ever lowers the probability
    assert bool((out["seg_regularized"] <= out["seg"] + 1e-4).all())
    with pytest.raises(ValueError):
        net(torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_detguided_paper_branch_is_torchvision_resnet50():
    """Paper config: the classification branch is torchvision's ResNet-50 layout (ImageNet /
    LUNA16-pretrained ResNet-50 weights would load), conv1 adapted to one channel."""
    from torchvision.models import resnet50
    net = build_detguided("paper")
    ref = {k: v.shape for k, v in resnet50(weights=None).state_dict().items() if not k.startswith(("fc.", "conv1."))}
    ours = {k[4:]: v.shape for k, v in net.state_dict().items() if k.startswith("cls.") and not k.startswith("cls.conv1.")}
    assert ours == ref
    assert net.cls.conv1.weight.shape == (64, 1, 7, 7)


@pytest.mark.slow
def test_mtnet_shapes_and_structure():
    torch.manual_seed(0)
    net = build_mtnet("narrow").eval()
    with torch.inference_mode():
        seg, mal = net(torch.randn(2, 1, 64, 64))
        out = net.forward_all(torch.randn(2, 1, 64, 64))
    assert seg.shape == (2, 1, 64, 64) and mal.shape == (2,) and seg.dtype == torch.float32
    assert out["coarse"].shape == (2, 1, 64, 64)
    assert set(out["coarse_mask"].unique().tolist()) <= {0.0, 1.0}  # binary coarse mask
    # Fine Seg-net shares Coarse Seg-net's encoder/decoder: its only own weights are the Fine-layer
    fine_own = {n for n, _ in net.fine.named_parameters()}
    assert fine_own and all(n.startswith("fine_layer.") for n in fine_own)
    assert net.fine.seg is net.coarse
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 60, 60))  # not a multiple of 16


def test_mtnet_copy_mode_initialises_fine_from_coarse():
    torch.manual_seed(0)
    net = build_mtnet("narrow", fine_weights="copy")
    assert net.fine.seg is not net.coarse
    net.init_fine_from_coarse()
    a, b = net.coarse.state_dict(), net.fine.seg.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_mtnet_paper_parts_match_timm_layouts():
    """Coarse/Fine encoder = timm aligned Xception-65; Class-net = timm legacy Xception layout
    with MT-Net's changes: no max pooling in the exit flow, conv3/conv4 dilated (rate 2, pad 2)."""
    import timm
    enc = AlignedXceptionEncoder(1, 65, 1.0)
    ref = timm.create_model("xception65", pretrained=False, num_classes=0, in_chans=1, output_stride=16)
    assert {k: v.shape for k, v in enc.net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    cn = ClassNet(image_channels=3)
    leg = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
    strip = lambda sd: {k: v.shape for k, v in sd.items() if not k.startswith(("conv1.", "fc."))}  # noqa: E731
    assert strip(cn.state_dict()) == strip(leg.state_dict())
    assert not any(isinstance(m, nn.MaxPool2d) for m in getattr(cn, cn.exit_name).modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in leg.block12.modules())
    for conv in (cn.conv3.conv1, cn.conv4.conv1):
        assert conv.dilation == (2, 2) and conv.padding == (2, 2)
    # output stride 16 instead of 32: a 96 px input keeps a 6 x 6 exit-flow map (narrow variant for speed)
    with torch.inference_mode():
        f = ClassNet(1, width=0.25).eval().forward_features(torch.zeros(1, 2, 96, 96))
    assert f.shape[-2:] == (6, 6)


@pytest.mark.slow
def test_dsmtnet_shapes_3d_and_2d():
    torch.manual_seed(0)
    net = build_dsmtnet("narrow").eval()
    a = torch.randn(2, 1, 5, 32, 32)
    with torch.inference_mode():
        seg, logits = net(a, torch.randn_like(a))
    assert seg.shape == (2, 1, 5, 32, 32) and seg.dtype == torch.float32
    assert list(logits) == list(DEFAULT_HEADS) and all(v.shape == (2,) for v in logits.values())
    net2 = build_dsmtnet("narrow", dims=2).eval()
    with torch.inference_mode():
        seg2, lg2 = net2(*dual_scale_from_patch(torch.randn(2, 1, 64, 64)))
    assert seg2.shape == (2, 1, 32, 32) and lg2["malignancy"].shape == (2,)
    with pytest.raises(ValueError):
        net(a, torch.randn(2, 1, 5, 16, 16))  # scales must share the pixel grid


# ----------------------------------------------------------------------------- MT-Net 4th channel

def test_init_4th_channel_from_rgb_mean():
    torch.manual_seed(0)
    c3 = nn.Conv2d(3, 8, 3, bias=True)
    c4 = nn.Conv2d(4, 8, 3, bias=True)
    init_4th_channel_from_rgb_mean(c3, c4)
    assert torch.equal(c4.weight[:, :3], c3.weight)
    assert torch.allclose(c4.weight[:, 3], (c3.weight[:, 0] + c3.weight[:, 1] + c3.weight[:, 2]) / 3)
    assert torch.equal(c4.bias, c3.bias)
    # with an empty mask channel the 4-channel conv answers exactly like the RGB one
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(c4(torch.cat([x, torch.zeros(2, 1, 9, 9)], 1)), c3(x), atol=1e-6)
    with pytest.raises(ValueError):
        init_4th_channel_from_rgb_mean(c3, nn.Conv2d(5, 8, 3))


@pytest.mark.slow
def test_classnet_loads_rgb_xception_weights():
    """An RGB Xception state (random here, no download) goes into the grey+mask Class-net:
    grey = sum of RGB weights (grey repeated in R, G, B), mask = mean of RGB weights."""
    import timm
    torch.manual_seed(0)
    sd = timm.create_model("legacy_xception", pretrained=False).state_dict()
    cn = ClassNet(image_channels=1)
    missing, unexpected = cn.load_rgb_xception_state(sd)
    assert missing == [] and unexpected == []
    w = sd["conv1.weight"]
    assert torch.allclose(cn.conv1.weight[:, 0], w.sum(1)) and torch.allclose(cn.conv1.weight[:, 1], w.mean(1))
    assert torch.equal(cn.block5.rep[1].pointwise.weight, sd["block5.rep.1.pointwise.weight"])


# ----------------------------------------------------------------------------- losses

def test_dice_loss_hand_checked():
    p = torch.tensor([1.0, 0.5, 0.0, 0.0]).view(1, 1, 2, 2)
    g = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # sum P*G = 1.5, sum P + sum G = 1.5 + 2 = 3.5 -> 1 - 3 / 3.5 (eps = 0); eps = 1 -> 1 - 3 / 4.5
    assert float(dice_loss(p, g, eps=0.0, from_logits=False)) == pytest.approx(1 - 3 / 3.5)
    assert float(dice_loss(p, g, eps=1.0, from_logits=False)) == pytest.approx(1 - 3 / 4.5)
    assert float(dice_loss(torch.full((1, 1, 2, 2), 20.0), torch.ones(1, 1, 2, 2), eps=0.0)) == pytest.approx(0, abs=1e-6)


def test_rank_loss_hand_checked():
    """One 2 x 3 image, K = 2, margin = 0.3, probabilities given directly.

    P = [[0.9, 0.5, 0.2],      G = [[1, 1, 0],
         [0.6, 0.45, 0.1]]          [1, 0, 0]]
    Nodule pixels 0.9, 0.5, 0.6: the K = 2 of highest error (lowest P) -> H1 = {0.5, 0.6}.
    Background pixels 0.2, 0.45, 0.1: the K = 2 of highest error (highest P) -> H0 = {0.45, 0.2}.
    Pairs max(0, H0 - H1 + 0.3):
      (0.45, 0.5): 0.25   (0.45, 0.6): 0.15   (0.2, 0.5): 0.0   (0.2, 0.6): max(0, -0.1) = 0
    L = (0.25 + 0.15 + 0 + 0) / K^2 = 0.40 / 4 = 0.10
    """
    p = torch.tensor([[0.9, 0.5, 0.2], [0.6, 0.45, 0.1]]).view(1, 1, 2, 3)
    g = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32).view(1, 1, 2, 3)
    assert float(rank_loss(p, g, k=2, margin=0.3, from_logits=False)) == pytest.approx(0.10, abs=1e-6)
    # same through logits
    assert float(rank_loss(torch.logit(p), g, k=2, margin=0.3)) == pytest.approx(0.10, abs=1e-5)
    # batch of two: the second image perfectly separated by >= margin contributes 0 -> mean 0.05
    p2 = torch.cat([p, torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.1, 0.1]]).view(1, 1, 2, 3)])
    assert float(rank_loss(p2, torch.cat([g, g]), k=2, margin=0.3, from_logits=False)) == pytest.approx(0.05, abs=1e-6)
    # K larger than the regions: all 3 x 3 pairs used, divided by 9
    pairs = [max(0.0, b - f + 0.3) for b in (0.2, 0.45, 0.1) for f in (0.9, 0.5, 0.6)]
    assert float(rank_loss(p, g, k=20, margin=0.3, from_logits=False)) == pytest.approx(sum(pairs) / 9, abs=1e-6)
    # no nodule pixel -> nothing to rank -> 0 (with a graph)
    z = rank_loss(torch.zeros(1, 1, 2, 3, requires_grad=True), torch.zeros(1, 1, 2, 3))
    assert float(z.detach()) == 0.0 and z.requires_grad
    with pytest.raises(ValueError):
        rank_loss(p, g, k=0)


def test_rank_loss_gradient_pushes_hard_pixels_apart():
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    g = torch.zeros(1, 1, 4, 4); g[..., 1:3, 1:3] = 1
    rank_loss(logits, g, k=20, margin=0.3).backward()
    gr = logits.grad[0, 0]
    assert bool((gr[g[0, 0] > 0] < 0).all())   # raise nodule probabilities
    assert bool((gr[g[0, 0] == 0] > 0).all())  # lower background probabilities


def test_hybrid_and_mtnet_losses():
    torch.manual_seed(0)
    lg = torch.randn(2, 1, 16, 16)
    g = (torch.rand(2, 1, 16, 16) > 0.7).float()
    expect = dice_loss(lg, g) + 0.02 * rank_loss(lg, g, k=20, margin=0.3)
    assert float(hybrid_seg_loss(lg, g)) == pytest.approx(float(expect))
    out = {"coarse": lg, "fine": lg * 2, "malignancy": torch.tensor([1.0, -1.0])}
    parts = mtnet_loss(out, g, torch.tensor([1, -1]))
    assert set(parts) == {"total", "coarse", "fine", "cls"}
    assert float(parts["total"]) == pytest.approx(float(parts["coarse"] + parts["fine"] + parts["cls"]))


def test_masked_ce_and_multi_head_bce():
    lg = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]])
    full = masked_cross_entropy(lg, torch.tensor([0, 1, -1]))
    assert float(full) == pytest.approx(float(nn.functional.cross_entropy(lg[:2], torch.tensor([0, 1]))))
    assert float(masked_cross_entropy(lg, torch.tensor([-1, -1, -1]))) == 0.0
    logits = {"malignancy": torch.tensor([2.0, -2.0]), "spiculation": torch.tensor([0.0, 0.0])}
    labels = {"malignancy": torch.tensor([1, 0]), "spiculation": torch.tensor([1, -1])}
    r = multi_head_bce(logits, labels, {"spiculation": 0.0})
    assert float(r["total"]) == pytest.approx(float(r["malignancy"]))
    assert float(r["spiculation"]) == pytest.approx(math.log(2), rel=1e-5)
    with pytest.raises(KeyError):
        multi_head_bce(logits, {"invasiveness": torch.tensor([1, 0])})


# ----------------------------------------------------------------------------- transfer learning

@pytest.mark.slow
def test_freeze_layers_really_freezes():
    torch.manual_seed(0)
    net = build_detguided("narrow")
    names = freeze_layers(net, ["cls_early"])  # preset: ResNet stem + layer1 + layer2
    params = dict(net.named_parameters())
    assert names and all(n.startswith(("cls.conv1.", "cls.bn1.", "cls.layer1.", "cls.layer2.")) for n in names)
    assert all(not params[n].requires_grad for n in names)
    assert params["cls.layer3.0.conv1.weight"].requires_grad and params["seg_enc.0.body.0.weight"].requires_grad
    frozen_before = {n: params[n].detach().clone() for n in names}
    bn_before = net.cls.layer1[0].bn1.running_mean.clone()
    free_before = params["cls.layer3.0.conv1.weight"].detach().clone()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    net.train()
    seg, mal = net(torch.randn(2, 1, 64, 64))
    (seg.mean() + mal.mean()).backward()
    opt.step()
    assert all(torch.equal(params[n], frozen_before[n]) for n in names)
    assert torch.equal(net.cls.layer1[0].bn1.running_mean, bn_before)  # frozen BN keeps its statistics
    assert not torch.equal(params["cls.layer3.0.conv1.weight"], free_before)
    with pytest.raises(ValueError):
        freeze_layers(net, ["cls.layer9"])
    # constructor option and unfreezing
    net2 = DetGuidedNet(seg_base=8, cls_width=0.25, frozen=("seg_encoder",))
    assert not any(p.requires_grad for n, p in net2.named_parameters() if n.startswith("seg_enc."))
    freeze_layers(net2, ["seg_encoder"], freeze=False)
    assert all(p.requires_grad for p in net2.parameters())


# ----------------------------------------------------------------------------- DSMT-Net heads / stages

@pytest.mark.slow
def test_dsmtnet_heads_by_name():
    heads = ("malignancy", "calcification", "bubble_lucency")
    net = DSMTNet(heads=heads, dims=2, widths=(8, 16, 32, 64), fused_channels=16).eval()
    with torch.inference_mode():
        _, lg = net(torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32))
    assert tuple(lg) == heads
    assert set(PAPER_HEADS) <= set(KNOWN_HEADS) and set(LIDC_HEAD_RULES) <= set(KNOWN_HEADS)
    assert tuple(DSMTNet(heads=PAPER_HEADS, dims=2, widths=(8, 16, 32, 64), fused_channels=16).cls_heads) == PAPER_HEADS
    with pytest.raises(ValueError, match="unknown DSMT-Net head.*'ground_glass_halo'.*known heads"):
        DSMTNet(heads=("malignancy", "ground_glass_halo"))
    with pytest.raises(ValueError, match="duplicate"):
        DSMTNet(heads=("malignancy", "malignancy"))
    with pytest.raises(ValueError, match="main_head"):
        DSMTNet(heads=("malignancy",), main_head="spiculation")
    with pytest.raises(ValueError):
        DSMTNet(heads=())


def test_lidc_head_label_rules():
    lab = lambda h, vals: [lidc_head_label(h, v) for v in vals]  # noqa: E731
    assert lab("malignancy", [1, 2, 2.5, 3, 3.5, 4, 5]) == [0, 0, -1, -1, -1, 1, 1]
    assert lab("spiculation", [1, 1.5, 2, 2.5, 3, 5]) == [0, -1, -1, -1, 1, 1]
    assert lab("lobulation", [1, 2, 3]) == [0, -1, 1]
    assert lab("calcification", [1, 3, 5, 5.5, 6]) == [1, 1, 1, -1, 0]
    assert lab("subsolid", [1, 3, 3.5, 4, 5]) == [1, 1, -1, 0, 0]
    assert lidc_head_label("bubble_lucency", 1, [1, 4, 1]) == 1
    assert lidc_head_label("bubble_lucency", 1, [1, 1]) == 0
    assert lidc_head_label("bubble_lucency", 1, [1, 2]) == -1
    assert lab("bubble_lucency", [1, 2, 4]) == [0, -1, 1]
    with pytest.raises(ValueError):
        lidc_head_label("pleural_retraction", 3)


@pytest.mark.slow
def test_stage_parameters_two_stage_training():
    torch.manual_seed(0)
    net = DSMTNet(heads=("malignancy", "spiculation", "lobulation"), dims=2, widths=(8, 16, 32, 64), fused_channels=16)
    p1 = stage_parameters(net, 1, base_lr=1e-3)
    assert p1.frozen == [] and p1.loss_weights == {"malignancy": 1.0, "spiculation": 1.0, "lobulation": 1.0}
    assert p1.seg_weight == 1.0
    p2 = stage_parameters(net, 2, base_lr=1e-3, backbone_lr_scale=0.1)
    assert p2.loss_weights == {"malignancy": 1.0, "spiculation": 0.0, "lobulation": 0.0} and p2.seg_weight == 0.0
    assert all(n.startswith(("cls_heads.spiculation.", "cls_heads.lobulation.", "seg_decoder.", "seg_head."))
               for n in p2.frozen)
    assert any(n.startswith("seg_decoder.") for n in p2.frozen) and "cls_heads.spiculation.weight" in p2.frozen
    groups = {g["name"]: g for g in p2.param_groups}
    assert groups["main_head"]["lr"] == pytest.approx(1e-3) and groups["encoders+fusion"]["lr"] == pytest.approx(1e-4)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(p2.param_groups)
    net.train()
    assert not net.seg_decoder[0][1].training  # frozen BN stays in eval mode
    seg, lg = net(torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32))
    loss = multi_head_bce(lg, {h: torch.tensor([1, 0, 1, 0]) for h in lg}, p2.loss_weights)["total"]
    opt.zero_grad(); loss.backward(); opt.step()
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in p2.frozen)
    assert not torch.equal(after["cls_heads.malignancy.weight"], before["cls_heads.malignancy.weight"])
    assert not torch.equal(after["local_encoder.stem.0.weight"], before["local_encoder.stem.0.weight"])
    stage_parameters(net, 1)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError):
        stage_parameters(net, 3)


# ----------------------------------------------------------------------------- spatial regularisation

def _onehot(k, n=1):
    q = torch.zeros(n, len(SIZE_CLASSES)); q[:, k] = 1
    return q


def test_spatial_regularization_small_vs_large_class():
    prob = torch.full((1, 1, 65, 65), 0.9)
    small = spatial_regularization(prob, _onehot(1), spacing_mm=0.8, center="click")  # "<6mm": R = 3 mm
    large = spatial_regularization(prob, _onehot(4), spacing_mm=0.8, center="click")  # ">=20mm": R = 20 mm
    c = 32
    assert float(small[0, 0, c, c]) == pytest.approx(0.9) and float(large[0, 0, c, c]) == pytest.approx(0.9)
    # 8 px = 6.4 mm from the centre: beyond a small nodule, well inside a large one
    assert float(small[0, 0, c, c + 8]) < 0.2 < 0.89 < float(large[0, 0, c, c + 8])
    # 30 px = 24 mm: suppressed for both, much more for the small class
    assert float(small[0, 0, c, c + 30]) < 1e-6 < float(large[0, 0, c, c + 30]) < 0.9
    assert bool((small <= prob + 1e-7).all()) and bool((large <= prob + 1e-7).all())
    # "none" (no nodule detected) removes the segmentation, floor keeps a minimum; mixtures are linear
    assert float(spatial_regularization(prob, _onehot(0), center="click").max()) == 0.0
    assert float(spatial_regularization(prob, _onehot(0), center="click", floor=0.2).min()) == pytest.approx(0.18)
    mix = spatial_regularization(prob, 0.5 * (_onehot(1) + _onehot(4)), spacing_mm=0.8, center="click")
    assert torch.allclose(mix, 0.5 * (small + large), atol=1e-6)
    with pytest.raises(ValueError):
        spatial_regularization(prob, torch.ones(1, 3) / 3)


def test_spatial_regularization_centroid_and_gradient():
    prob = torch.zeros(1, 1, 64, 64); prob[..., 8:14, 40:46] = 0.95  # off-centre blob
    q = _onehot(2).requires_grad_(True)                               # "6-10mm"
    by_centroid = spatial_regularization(prob, q, spacing_mm=0.8)
    by_click = spatial_regularization(prob, q.detach(), spacing_mm=0.8, center="click")
    assert float(by_centroid.detach().sum()) == pytest.approx(float(prob.sum()), rel=1e-4)  # blob kept where it is
    assert float(by_click.sum()) < 0.5 * float(prob.sum())                        # centred on the click: suppressed
    by_centroid.sum().backward()
    assert q.grad is not None


@pytest.mark.slow
def test_spatial_regularization_keeps_real_nodules(real_slices):
    """Real LIDC masks (resampled to 0.8 mm) used as probability maps: with the size class of
    their own mask the prior keeps >= 95 % of the nodule; calling a large nodule "<6mm" does not."""
    from training.augment import sample_batch
    kept, large = [], None
    for nd in real_slices:
        k = int(np.argmax(nd.consensus.reshape(len(nd.image), -1).sum(1)))
        _, y = sample_batch([nd.image[k]], [nd.consensus[k]], [nd.spacing_mm], 96, 0.8, None)
        cls = size_class_from_mask(y[0, 0], 0.8)
        assert cls >= 1
        reg = spatial_regularization(y * 0.9, _onehot(cls), spacing_mm=0.8)
        kept.append(float(reg.sum() / (y * 0.9).sum()))
        if cls >= 3:
            large = y
    assert min(kept) >= 0.95
    if large is not None:
        wrong = spatial_regularization(large * 0.9, _onehot(1), spacing_mm=0.8)
        assert float(wrong.sum() / (large * 0.9).sum()) < 0.8


def test_size_class_from_mask():
    m = np.zeros((64, 64), bool)
    assert size_class_from_mask(m, 0.8) == 0
    yy, xx = np.mgrid[:64, :64]
    for d_mm, k in ((4.0, 1), (8.0, 2), (15.0, 3), (30.0, 4)):
        disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= (d_mm / 2 / 0.8) ** 2
        assert size_class_from_mask(disc, 0.8) == k
    with pytest.raises(ValueError):
        size_class_from_mask(np.zeros((2, 2, 2)), 0.8)


# ----------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_slices(shared_data):
    from training.data import load_slice_nodules
    nds = load_slice_nodules(shared_data, {"LIDC-IDRI-0002", "LIDC-IDRI-0004", "LIDC-IDRI-0007"})
    nds = [n for n in nds if n.consensus.any()]
    assert len(nds) >= 4
    return nds


@pytest.mark.slow
def test_dual_scale_crops_on_real_nodule(real_slices):
    """Local (32 mm) and context (64 mm) crops of a real LIDC stack share the centre and the
    pixel grid: the nodule covers ~4x more pixels in the local crop (pixels half as wide)."""
    from NoduleMTLLib.inference.preprocessing import normalize_slices
    nd = max((n for n in real_slices if len(n.image) >= 5), key=lambda n: n.consensus.sum())
    s = len(nd.image)
    spacing = (nd.slice_thickness_mm or 1.0, nd.spacing_mm, nd.spacing_mm)
    centre = ((s - 1) / 2, 63.5, 63.5)
    loc, ctx = dual_scale_crops(nd.image.astype(np.float32), spacing, centre)
    mloc, mctx = dual_scale_crops(nd.consensus.astype(np.float32), spacing, centre, mode="nearest")
    assert loc.shape == ctx.shape == mloc.shape == (1, 5, 48, 48) and loc.dtype == torch.float32
    mid_l, mid_c = mloc[0, 2], mctx[0, 2]
    assert mid_l.sum() > 0
    assert 2.5 < float(mid_l.sum() / mid_c.sum()) < 6.0
    for m in (mid_l, mid_c):  # nodule centred in both crops
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert abs(float(ys.float().mean()) - 23.5) < 8 and abs(float(xs.float().mean()) - 23.5) < 8
    x_l = normalize_slices(loc[0][:, None])[:, 0][None, None]
    x_c = normalize_slices(ctx[0][:, None])[:, 0][None, None]
    torch.manual_seed(0)
    net = build_dsmtnet("narrow").eval()
    with torch.inference_mode():
        seg, lg = net(x_l, x_c)
    assert seg.shape == (1, 1, 5, 48, 48) and all(bool(torch.isfinite(v).all()) for v in lg.values())


@pytest.mark.slow
def test_training_steps_on_real_batch(real_slices):
    """A few optimiser steps on one real batch: every network gets gradients in all its parts
    from its losses, and MT-Net's hybrid loss goes down."""
    from NoduleMTLLib.inference.preprocessing import normalize_slices
    from training.augment import sample_batch
    from training.losses import masked_bce, seg_loss
    torch.manual_seed(0)
    nds = real_slices[:4]
    ks = [int(np.argmax(n.consensus.reshape(len(n.image), -1).sum(1))) for n in nds]
    x, y = sample_batch([n.image[k] for n, k in zip(nds, ks)], [n.consensus[k] for n, k in zip(nds, ks)],
                        [n.spacing_mm for n in nds], 64, 0.8, None)
    x = normalize_slices(x)
    lab = torch.tensor([n.label for n in nds])

    mt = build_mtnet("narrow", coarse_mask="prob")
    opt = torch.optim.Adam(mt.parameters(), 1e-3)
    first = last = None
    for _ in range(6):
        out = mt.forward_all(x)
        parts = mtnet_loss(out, y, lab)
        opt.zero_grad(); parts["total"].backward(); opt.step()
        seg_part = float((parts["coarse"] + parts["fine"]).detach())
        first = seg_part if first is None else first
        last = seg_part
    assert last < first
    assert mt.fine.fine_layer.fuse[0].weight.grad is not None and mt.coarse.head.weight.grad is not None
    assert mt.classnet.conv1.weight.grad is not None

    dg = build_detguided("narrow")
    out = dg.forward_all(x)
    sizes = torch.tensor([size_class_from_mask(m[0], 0.8) for m in y])
    (seg_loss(out["seg"], y) + masked_cross_entropy(out["size_logits"], sizes) + masked_bce(out["malignancy"], lab)).backward()
    assert all(p.grad is not None for n, p in dg.named_parameters() if not n.startswith("fcb")), "branch without gradient"
    assert dg.fcb[0].cls_to_seg[1].weight.grad is not None  # the exchange is learnable from zero init
