"""LNMSNet shapes, MSConv, metrics, data labels/split, and real training steps."""

import json

import numpy as np
import pytest
import torch

from NoduleMTLLib.core.metrics import binary_classification_stats, dice, iou, roc_auc
from NoduleMTLLib.models.networks.lnmsnet import LNMSNet, MSConv


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LNMSNet()


@pytest.mark.slow
@pytest.mark.parametrize("size", [96, 128])
def test_lnmsnet_shapes(net, size):
    net.eval()
    with torch.inference_mode():
        seg, cls = net(torch.zeros(3, 1, size, size))
    assert seg.shape == (3, 1, size, size) and cls.shape == (3,)
    assert seg.dtype == torch.float32


def test_msconv_keeps_shape_and_mixes_scales():
    m = MSConv(64).eval()
    x = torch.zeros(1, 64, 24, 24)
    x[0, :, 12, 12] = 1.0
    with torch.inference_mode():
        y = m(x)
    assert y.shape == x.shape
    # the dilation-6 branch reaches 6+ pixels away from a single impulse: receptive field > 3x3
    assert float((y[0, :, 12, 18] - m(torch.zeros_like(x))[0, :, 12, 18]).abs().sum().detach()) > 0


def test_metrics_hand_checked():
    a = np.zeros((4, 4), bool); a[:2] = True          # 8 px
    b = np.zeros((4, 4), bool); b[1:3] = True         # 8 px, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(4 / 12)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    # AUC: 3 of 4 positive-negative pairs ordered correctly, one tie counted 1/2
    assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    s = binary_classification_stats([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2])
    assert (s["accuracy"], s["sensitivity"], s["specificity"]) == (0.5, 0.5, 0.5)


def test_malignancy_label_rule():
    from training.data import malignancy_label
    assert [malignancy_label(v) for v in (1, 2, 2.5, 3, 3.5, 4, 5)] == [0, 0, -1, -1, -1, 1, 1]


def test_split_is_by_patient_and_fixed(repo_dir):
    from training.data import FORCED_TEST_PATIENTS, SPLIT_FILE, make_patient_split
    s = json.loads(SPLIT_FILE.read_text())
    tr, va, te = set(s["train"]), set(s["val"]), set(s["test"])
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert set(FORCED_TEST_PATIENTS) <= te
    again = make_patient_split(sorted(tr | va | te), seed=s["seed"], fractions=s["fractions"])
    assert again["train"] == s["train"] and again["test"] == s["test"]


@pytest.fixture(scope="module")
def real_nodules(shared_data):
    from training.data import load_slice_nodules
    return load_slice_nodules(shared_data, {"LIDC-IDRI-0002", "LIDC-IDRI-0004", "LIDC-IDRI-0007"})


@pytest.mark.slow
def test_training_steps_reduce_loss_on_real_batch(real_nodules):
    """Ten optimiser steps on one real batch (8 slices) lower the joint loss: gradients flow through both heads."""
    from NoduleMTLLib.inference.preprocessing import normalize_slices
    from training.augment import sample_batch
    from training.losses import masked_bce, seg_loss
    torch.manual_seed(0)
    nds = [n for n in real_nodules if n.consensus.any()][:8]
    assert len(nds) >= 4
    imgs = [n.image[len(n.image) // 2] for n in nds]
    msks = [n.consensus[len(n.image) // 2] for n in nds]
    x, y = sample_batch(imgs, msks, [n.spacing_mm for n in nds], 64, 0.8, None)
    lab = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0][:len(nds)])
    model = LNMSNet()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(10):
        seg, cls = model(normalize_slices(x))
        loss = seg_loss(seg, y) + 0.5 * masked_bce(cls, lab)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert model.cls_head[1].weight.grad is not None and model.seg_head.weight.grad is not None


def test_masked_bce_ignores_excluded():
    from training.losses import masked_bce
    lg = torch.tensor([5.0, -3.0, 100.0])
    full = masked_bce(lg, torch.tensor([1, 0, -1]))
    two = masked_bce(lg[:2], torch.tensor([1, 0]))
    assert float(full) == pytest.approx(float(two))


@pytest.mark.slow
def test_augmentation_keeps_mask_on_nodule(real_nodules):
    """Image and mask move together: the mean intensity inside the augmented mask (rotated, zoomed,
    flipped, shifted) matches the one inside the plain resampled mask."""
    from training.augment import sample_batch
    nd = max(real_nodules, key=lambda n: n.consensus.sum())
    k = int(np.argmax(nd.consensus.reshape(len(nd.image), -1).sum(1)))
    x, y = sample_batch([nd.image[k]] * 6, [nd.consensus[k]] * 6, [nd.spacing_mm] * 6, 96, 0.8, np.random.default_rng(3))
    x0, y0 = sample_batch([nd.image[k]], [nd.consensus[k]], [nd.spacing_mm], 96, 0.8, None)
    ref = float(x0[0, 0][y0[0, 0] > 0].mean())
    for xi, yi in zip(x[:, 0], y[:, 0]):
        inside = xi[yi > 0]
        assert inside.numel() > 0 and float(inside.mean()) == pytest.approx(ref, rel=0.1)
    # a wrongly moved mask would mostly cover the lung or wall instead
    assert abs(float(x0[0, 0][y0[0, 0] == 0].mean()) - ref) > 0.1 * ref


@pytest.mark.slow
def test_joint_loss_uses_each_networks_own_loss(real_nodules):
    """``training.click2d.joint_loss`` on a real batch for every click network of the registry:
    a finite scalar whose gradient reaches the network.  Regression: since the click-network
    contract gave every network ``forward_click``, LNMSNet went down DSMT-Net's multi-head
    branch and training it failed (``no attribute 'main_head'``)."""
    from NoduleMTLLib.inference.preprocessing import normalize_slices
    from NoduleMTLLib.models.registry import available_networks, build_network
    from training.augment import sample_batch
    from training.click2d import joint_loss
    from training.losses import masked_bce, seg_loss

    nds = [n for n in real_nodules if n.consensus.any()][:4]
    x, y = sample_batch([n.image[len(n.image) // 2] for n in nds], [n.consensus[len(n.image) // 2] for n in nds],
                        [n.spacing_mm for n in nds], 96, 0.8, None)
    x = normalize_slices(x)
    lab = torch.tensor([1, 0, -1, 1])
    cfg = {"cls_loss_weight": 0.5, "input_spacing_mm": 0.8}
    for nid in available_networks():
        torch.manual_seed(0)
        model = build_network(nid)
        loss = joint_loss(model, x, y, lab, cfg)
        assert loss.ndim == 0 and torch.isfinite(loss), nid
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), nid
    # LNMSNet's loss is exactly its paper's joint loss (segmentation + 0.5 x malignancy BCE)
    torch.manual_seed(0)
    m = build_network("lnmsnet").eval()  # deterministic (no dropout / batch statistics)
    seg, cls = m(x)
    expected = seg_loss(seg, y) + 0.5 * masked_bce(cls, lab)
    assert float(joint_loss(m, x, y, lab, cfg).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
