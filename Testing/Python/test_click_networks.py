"""DSMT-Net and MT-Net behind the click pipeline: the DSMT-Net click adapter, sign heads
through ``analyze_points``, the per-network joint losses and DSMT-Net's two training
stages in ``training.click2d`` (real LIDC nodules, tiny runs, one thread)."""

import json

import numpy as np
import pytest
import torch

from NoduleMTLLib.models.networks.dsmtnet import CLICK_HEADS, DSMTNetClick, build_dsmtnet_click
from NoduleMTLLib.models.networks.mtnet import build_mtnet

torch.set_num_threads(1)


def test_dsmtnet_click_adapter_geometry():
    """Local seg sits in the patch centre; the outer ring is never foreground; signs by name."""
    torch.manual_seed(0)
    net = build_dsmtnet_click().eval()
    assert net.main_head == "malignancy" and net.sign_heads == CLICK_HEADS[1:]
    assert net.seg_border_px == 24
    x = torch.randn(3, 1, 96, 96)
    with torch.inference_mode():
        seg, main, signs = net.forward_click(x)
        seg2, main2 = net(x)
    assert seg.shape == (3, 1, 96, 96) and main.shape == (3,) and set(signs) == set(CLICK_HEADS[1:])
    assert torch.equal(seg, seg2) and torch.equal(main, main2)
    ring = torch.ones(96, 96, dtype=torch.bool); ring[24:72, 24:72] = False
    assert bool((seg[:, 0][:, ring] == DSMTNetClick.OUTSIDE_LOGIT).all())
    # the centre is the network's local segmentation: it changes with the centre of the input
    x2 = x.clone(); x2[..., 40:56, 40:56] += 3
    with torch.inference_mode():
        seg3, _, _ = net.forward_click(x2)
    assert not torch.allclose(seg3[..., 24:72, 24:72], seg[..., 24:72, 24:72])


@pytest.mark.slow
def test_analyze_points_reports_signs_for_dsmtnet(repo_dir):
    """A (randomly initialised) DSMT-Net passed to the pipeline returns one probability per sign
    head, in [0, 1]; LNMSNet (shipped weights) returns none."""
    from NoduleMTLLib.core.io import ras_to_lps, read_ct
    from NoduleMTLLib.inference.pipeline import analyze_points
    torch.manual_seed(0)
    ct = read_ct(repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd")
    res = analyze_points(ct, [ras_to_lps((-23.5, 47.6, -172.3))], ["lnmsnet", "dsmtnet"],
                         networks={"dsmtnet": build_dsmtnet_click().eval()})
    d = res.nodules[0].to_dict()
    assert d["found"]
    assert d["networks"]["lnmsnet"]["sign_probabilities"] == {}
    sp = d["networks"]["dsmtnet"]["sign_probabilities"]
    assert set(sp) == set(CLICK_HEADS[1:]) and all(0 <= v <= 1 for v in sp.values())


@pytest.fixture(scope="module")
def few_nodules(shared_data):
    from training.data import load_slice_nodules, load_split
    tr = load_slice_nodules(shared_data, set(load_split()["train"][:30]))
    return [n for n in tr if n.consensus.any()]


@pytest.mark.slow
def test_head_labels_follow_lidc_rules(few_nodules):
    from NoduleMTLLib.models.networks.dsmtnet import lidc_head_label
    from training.click2d import head_labels
    net = build_dsmtnet_click()
    chunk = [(i, int(np.argmax(n.consensus.reshape(len(n.image), -1).sum(1)))) for i, n in enumerate(few_nodules[:6])]
    chunk.append((0, -1) if not few_nodules[0].consensus[-1].any() else (0, 0))
    hl = head_labels(net, few_nodules, chunk)
    assert set(hl) == set(CLICK_HEADS[1:])
    for i, (ni, _k) in enumerate(chunk[:6]):
        assert int(hl["spiculation"][i]) == lidc_head_label("spiculation", few_nodules[ni].ratings["spiculation"])
        assert int(hl["subsolid"][i]) == lidc_head_label("subsolid", few_nodules[ni].ratings["texture"])
    if not few_nodules[0].consensus[chunk[-1][1]].any():
        assert all(int(v[-1]) == -1 for v in hl.values())  # slice without the nodule: excluded
    assert head_labels(build_mtnet("narrow"), few_nodules, chunk) is None


@pytest.mark.slow
@pytest.mark.parametrize("network", ["dsmtnet", "mtnet"])
def test_joint_loss_trains_every_part(network, few_nodules):
    """One backward pass of ``joint_loss`` reaches the segmentation and every classification head."""
    from NoduleMTLLib.inference.preprocessing import normalize_slices
    from NoduleMTLLib.models.registry import build_network
    from training.augment import sample_batch
    from training.click2d import head_labels, joint_loss
    torch.manual_seed(0)
    nds = few_nodules[:4]
    chunk = [(i, int(np.argmax(n.consensus.reshape(len(n.image), -1).sum(1)))) for i, n in enumerate(nds)]
    x, y = sample_batch([n.image[k] for n, (_, k) in zip(nds, chunk)], [n.consensus[k] for n, (_, k) in zip(nds, chunk)],
                        [n.spacing_mm for n in nds], 96, 0.8, None)
    lab = torch.tensor([0, 1, 0, 1])
    model = build_network(network).train()
    loss = joint_loss(model, normalize_slices(x), y, lab, {"cls_loss_weight": 0.5}, head_labels(model, nds, chunk))
    loss.backward()
    if network == "dsmtnet":
        assert model.net.seg_head.weight.grad is not None and model.net.cls_heads["malignancy"].weight.grad is not None
        assert model.net.context_encoder.stem[0].weight.grad is not None  # the context scale is used
        assert all(model.net.cls_heads[h].weight.grad is not None for h in model.sign_heads)
    else:
        assert model.coarse.head.weight.grad is not None and model.classnet.fc.weight.grad is not None


@pytest.mark.slow
def test_dsmtnet_two_stage_training_run(tmp_path, shared_data):
    """A tiny real run: stage 1 trains everything, the last epoch is stage 2 (aux heads and
    segmentation decoder frozen), the checkpoint records the stage and a resume continues."""
    from training import click2d
    cfg = json.loads((__import__("pathlib").Path(__file__).resolve().parents[2] / "training" / "configs" / "dsmtnet.json").read_text())
    cfg.update(epochs=2, stage2_epochs=1, samples_per_nodule_per_epoch=1, batch_size=8, threads=1)
    click2d.train(cfg, tmp_path, shared_data, limit_nodules=16, log=lambda s: None)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["stage"] == 2 and ck["epoch"] == 1
    first = torch.load(tmp_path / "best.pt", weights_only=True)
    hist = ck["history"]
    assert len(hist) == 2
    cfg["epochs"] = 3
    click2d.train(cfg, tmp_path, shared_data, limit_nodules=16, log=lambda s: None)
    ck2 = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck2["epoch"] == 2 and ck2["stage"] == 2
    # stage 2 froze the segmentation decoder and trains the main head
    assert torch.equal(ck["model"]["net.seg_head.weight"], ck2["model"]["net.seg_head.weight"])
    assert not torch.equal(ck["model"]["net.cls_heads.malignancy.weight"], ck2["model"]["net.cls_heads.malignancy.weight"])
    assert first["model"].keys() == ck2["model"].keys()
