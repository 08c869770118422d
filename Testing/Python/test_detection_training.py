"""Training recipe of the whole-scan detector ``maskrcnn25d`` (``training/detection.py``).

Real data only: ``lidc_slices`` / ``lidc_vois`` nodules of training-split patients, and the
whole LIDC-IDRI-0003 scan (a held-out test patient, used here only to compare the crop
preprocessing with the whole-scan one, never to train).  A smoke run of a few iterations
(single thread) goes through the command line: all three phases, checkpoint, resume,
fp16 export with its manifest, reload through the registry, evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training import detection as D

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- intensities


def test_png_to_hu_ends_and_calibrated_sampling():
    png = np.array([0, 128, 255], np.uint8)
    hu = D.png_to_hu(png, -1024.0, 1159.0)
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, [-1024.0, -1024.0 + 128 * 2183 / 255, 1159.0], rtol=1e-6)
    with pytest.raises(ValueError):
        D.png_to_hu(png, 100.0, -100.0)
    rng = np.random.default_rng(0)
    draws = np.array([D.sample_png_affine(rng) for _ in range(4000)])
    lo, hi = draws[:, 0], draws[:, 1]
    assert lo.min() >= -3026 and lo.max() <= -896 and hi.min() >= 436 and hi.max() <= 3073
    assert abs(np.median(lo) - (-1024)) < 15 and abs(np.median(hi) - 1159) < 40
    # 5-25 % of the slices have scanner padding (-2048 / -3024 HU) as their minimum
    assert 0.08 < float((lo < -2000).mean()) < 0.25
    assert abs(np.percentile(hi, 95) - 2088) < 80


@pytest.mark.slow
def test_png_to_hu_matches_real_hu_voi(shared_data):
    """A real PNG slice against the HU VOI of the same nodule (LIDC-IDRI-0008, training split):
    the PNG is an affine image of HU, the fitted ends lie in the calibrated range, and the
    median map puts lung and nodule grey levels within a few % of the HU window of the truth."""
    from PIL import Image

    from NoduleMTLLib.detection.preprocess import hu_window

    voi = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "lidc_vois" / "images" / "LIDC-IDRI-0008_R_1.nii.gz")))
    t = voi[voi.shape[0] // 2].astype(np.float32)
    im = np.array(Image.open(shared_data / "lidc_slices" / "nodules" / "LIDC-IDRI-0008_nodule-0_image.png"))
    p = im.reshape(-1, 128, 128)[1].astype(np.float32)[44:44 + t.shape[0], 41:41 + t.shape[1]]
    assert np.corrcoef(p.ravel(), t.ravel())[0, 1] > 0.999
    ok = (p > 2) & (p < 253)
    a, b = np.polyfit(t[ok], p[ok], 1)
    hu0, hu255 = -b / a, (255 - b) / a
    assert D.CALIB_HU_AT_0[0] <= hu0 <= D.CALIB_HU_AT_0[-1] and D.CALIB_HU_AT_255[0] <= hu255 <= D.CALIB_HU_AT_255[-1]
    # with the fitted ends the map is exact up to 8-bit quantisation (~9 HU per grey level)
    assert np.abs(D.png_to_hu(p, hu0, hu255) - t)[ok].mean() < 10
    # the median map: windowed intensities close to the truth; lung dark, nodule bright
    w_true, w_med = hu_window(t), hu_window(D.png_to_hu(p, *D.MEDIAN_AFFINE))
    assert np.abs(w_med - w_true).mean() < 0.06
    lung, solid = t < -700, t > -100
    assert lung.sum() > 50 and solid.sum() > 50
    assert w_med[lung].mean() < 0.2 and w_med[solid].mean() > 0.55


@pytest.mark.slow
def test_crop_preprocessing_matches_whole_scan(shared_data):
    """CLAHE and lung mask of a 128 px crop approximate the whole-scan preprocessing of inference."""
    from NoduleMTLLib.detection import preprocess as pp
    from training import detection_matching as ev

    ct, refs = ev.load_lidc_whole_ct_references(shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003")
    lung = pp.lung_mask_from_ct(ct)
    mads, mads_no_clahe, dices = [], [], []
    for ref in refs:
        ks = pp.stack_indices(ref.centre_slice, ct.shape_zyx[0])
        whole = pp.clahe_slices(pp.hu_window(ct.array[ks]))
        x0, y0 = int(round(ref.centre_ijk[0])) - 64, int(round(ref.centre_ijk[1])) - 64
        sl = (slice(None), slice(y0, y0 + 128), slice(x0, x0 + 128))
        hu = ct.array[ks][sl].astype(np.float32)
        crop = D.clahe_crop(pp.hu_window(hu))
        assert crop.shape == (5, 128, 128) and 0 <= crop.min() and crop.max() <= 1
        mads.append(np.abs(crop - whole[sl]).mean())
        mads_no_clahe.append(np.abs(pp.hu_window(hu) - whole[sl]).mean())
        m, ref_m = D.crop_lung_mask(hu, ct.spacing[0]), lung.mask[ks][sl]
        dices.append(2 * (m & ref_m).sum() / (m.sum() + ref_m.sum()))
    assert np.mean(mads) < 0.04 and np.mean(mads) < np.mean(mads_no_clahe)
    assert min(dices) > 0.8 and np.mean(dices) > 0.9


# ----------------------------------------------------------------------------- samples, targets, metrics


@pytest.fixture(scope="module")
def few_nodules(shared_data):
    from training.data import load_split

    return D._load_nodules(shared_data, load_split()["train"], 12)


@pytest.fixture(scope="module")
def cfg():
    return json.loads((Path(D.__file__).resolve().parent / "configs" / "maskrcnn25d.json").read_text())


def test_targets_from_mask_components():
    m = np.zeros((40, 50), bool)
    m[5:10, 3:8] = True      # 5 x 5
    m[20:30, 30:45] = True   # 10 x 15
    m[0, 49] = True          # 1 px: dropped
    t = D.targets_from_mask(m)
    assert t["boxes"].tolist() == [[3, 5, 8, 10], [30, 20, 45, 30]]
    assert t["labels"].tolist() == [1, 1] and t["masks"].shape == (2, 40, 50) and t["masks"].dtype == torch.uint8
    assert int(t["masks"][1].sum()) == 150
    e = D.targets_from_mask(np.zeros((8, 8), bool))
    assert e["boxes"].shape == (0, 4) and e["masks"].shape == (0, 8, 8)


def test_mosaic_places_tiles_and_clips_instances():
    f = D.FIELD_PX
    x = np.full((5, f, f), 0.5, np.float32)
    m1 = np.zeros((f, f), bool)
    m1[60:70, 50:58] = True     # 80 px nodule near the tile centre
    m2 = np.zeros((f, f), bool)
    m2[0:10, 120:128] = True    # 80 px at the tile's top-right corner
    img, t = D.mosaic([(x, m1), None, None, (x * 2, m2)], 2, 192, (32, 16))
    assert img.shape == (5, 192, 192)
    assert float(img[0, 0, 0]) == 0.5 and float(img[0, 100, 10]) == 0.0 and float(img[0, 150, 150]) == 1.0  # blank tile = 0
    # tile 0 origin (-32, -16): nodule at rows 28..38, cols 34..42; tile 3 origin (96, 112): rows 96..106, cols 232.. -> outside
    assert t["boxes"].tolist() == [[34.0, 28.0, 42.0, 38.0]] and t["masks"].shape == (1, 192, 192)
    assert int(t["masks"][0].sum()) == 80
    # a window that shows only 2 of the 8 columns of the corner nodule: a sliver, no instance
    _, t2 = D.mosaic([(x, m2), None, None, None], 2, 128, (0, 126))
    assert len(t2["boxes"]) == 0
    _, t3 = D.mosaic([(x, m2), None, None, None], 2, 128, (0, 120))  # the whole nodule, at the left edge
    assert t3["boxes"].tolist() == [[0.0, 0.0, 8.0, 10.0]] and int(t3["masks"].sum()) == 80
    with pytest.raises(ValueError):
        D.mosaic([None] * 4, 2, 200, (100, 0))


@pytest.mark.slow
def test_training_and_validation_samples_real(few_nodules, cfg):
    rng = np.random.default_rng(1)
    centres, n_boxes = [], 0
    for _ in range(12):
        s = D.draw_training_sample(few_nodules, cfg, rng)
        c = s.image.shape[-1]
        assert s.image.shape == (5, c, c) and c in cfg["canvas_sizes"] and s.image.dtype == torch.float32
        assert 0 <= float(s.image.min()) and float(s.image.max()) <= 1
        for b, m in zip(s.target["boxes"], s.target["masks"]):  # box = bounding box of its mask
            jj, ii = np.nonzero(m.numpy())
            assert b.tolist() == [ii.min(), jj.min(), ii.max() + 1, jj.max() + 1]
            centres.append(((b[0] + b[2]) / 2 / c, (b[1] + b[3]) / 2 / c))
        n_boxes += len(s.target["boxes"])
    assert n_boxes >= 12
    centres = np.array(centres, dtype=float)
    assert centres.std(0).min() > 0.15  # nodules spread over the image, not at its centre
    # tiles: the nodule sits inside the (approximate) lung mask and is brighter than the lung
    means = []
    for nd in few_nodules:
        k = int(nd.consensus.reshape(len(nd.image), -1).sum(1).argmax())
        x, m = D.make_tile(nd, k, cfg, None)
        assert x.shape == (5, 128, 128) and m.shape == (128, 128)
        assert (x[2][m] > 0).mean() > 0.9
        means.append(x[2][m].mean())
    assert np.mean(means) > 0.4
    val = D.validation_samples(few_nodules, cfg)
    assert all(s.image.shape == (5, 256, 256) for s in val)
    named = [n for s in val for n in s.tiles]
    assert len({n.split("@")[0] for n in named}) == len(few_nodules) and len(val) == -(-len(named) // 4)
    assert sum(len(s.target["boxes"]) for s in val) >= len(few_nodules)
    assert [s.tiles for s in D.validation_samples(few_nodules, cfg)] == [s.tiles for s in val]  # deterministic


@pytest.mark.slow
def test_jitter_tile_moves_the_nodule_and_keeps_the_pixels(few_nodules, cfg):
    """The "jitter" layout: the nodule is no longer at the centre of its patch of content,
    the window's pixels are the field's, and validation tiles are jittered the same way each time."""
    areas = [int(n.consensus.reshape(len(n.image), -1).sum(1).max()) for n in few_nodules]
    nd = few_nodules[int(np.argmin([a if a > 0 else 10**9 for a in areas]))]  # the smallest nodule
    k = int(nd.consensus.reshape(len(nd.image), -1).sum(1).argmax())
    x, m = D.make_tile(nd, k, dict(cfg, tile_layout="centred"), None)
    rng = np.random.default_rng(0)
    offsets, n_with = [], 0
    for _ in range(60):
        xj, mj = D.jitter_tile(x, m, rng, min_px=56, p_contain=0.7)
        assert xj.shape == x.shape and mj.shape == m.shape and mj.sum() <= m.sum()
        nz = np.nonzero(xj.any(0))
        if mj.any():
            n_with += 1
            # offset of the nodule from the centre of the content window
            cy, cx = np.nonzero(mj)[0].mean(), np.nonzero(mj)[1].mean()
            wy, wx = (nz[0].min() + nz[0].max()) / 2, (nz[1].min() + nz[1].max()) / 2
            offsets.append((cy - wy, cx - wx))
        # every non-zero pixel of the jittered tile is a pixel of the field (a shifted window)
        vals = set(np.round(xj[2][xj[2] > 0], 6).tolist())
        assert vals <= set(np.round(x[2].ravel(), 6).tolist())
    offsets = np.array(offsets)
    assert 30 <= n_with <= 59  # p_contain 0.7, plus windows that catch it by chance; some miss it
    assert np.abs(offsets).max() > 20 and offsets.std(0).min() > 6  # the nodule is off-centre, anywhere
    c = dict(cfg, tile_layout="jitter")
    a1, a2 = D.make_tile(nd, k, c, None), D.make_tile(nd, k, c, None)
    assert np.array_equal(a1[0], a2[0]) and np.array_equal(a1[1], a2[1])  # validation: fixed jitter
    assert not np.array_equal(a1[0], x)


def test_detection_metrics_paper_iou_rule():
    m = np.zeros((1, 32, 32), np.uint8)
    m[0, 10:20, 10:20] = 1
    s = D.Sample(torch.zeros(5, 32, 32), {"boxes": torch.tensor([[10.0, 10, 20, 20]]), "masks": torch.from_numpy(m)}, ["x"])
    pm = np.zeros((3, 32, 32), np.float32)
    pm[0, 10:20, 10:20] = 1
    pm[1, 10:20, 12:20] = 1
    out = {"boxes": np.array([[10.0, 10, 20, 20], [12, 10, 20, 20], [25, 25, 30, 30]]),
           "scores": np.array([0.9, 0.8, 0.3]), "masks": pm}
    r = D.detection_metrics([s], [out], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0) and r["dice_mean"] == pytest.approx(1.0)  # duplicate = FP
    r = D.detection_metrics([s], [out], 0.85)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 0) and r["f1"] == 1.0
    r = D.detection_metrics([s], [out], 0.95)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 0, 1) and r["recall"] == 0.0
    out2 = dict(out, boxes=np.array([[16.0, 16, 26, 26]]), scores=np.array([0.9]), masks=pm[:1])  # IoU 16/184 < 0.2
    r = D.detection_metrics([s], [out2], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)


def test_phase_end_by_iterations_or_time():
    c = {"iterations": 100, "phase_fractions": [0.6, 0.15, 0.25], "max_minutes": 10}
    assert not D.phase_end_reached("detection", 59, 0, 0.0, c) and D.phase_end_reached("detection", 60, 0, 0.0, c)
    assert D.phase_end_reached("detection", 5, 0, 0.6 * 600, c)  # time: 60 % of 10 min
    assert not D.phase_end_reached("mask", 30, 20, 0.6 * 600 + 1, c) and D.phase_end_reached("mask", 35, 20, 0.0, c)
    assert D.phase_end_reached("mask", 21, 20, 0.75 * 600, c)
    assert not D.phase_end_reached("joint", 40, 30, 599.0, c) and D.phase_end_reached("joint", 40, 30, 600.0, c)
    assert not D.phase_end_reached("detection", 59, 0, 1e9, dict(c, max_minutes=0))


@pytest.mark.slow
def test_no_resize_transform_keeps_native_pixels():
    from NoduleMTLLib.models.networks.maskrcnn25d import NoResizeTransform, build_maskrcnn25d

    m = build_maskrcnn25d(backbone="resnet18")
    assert isinstance(m.transform, NoResizeTransform)
    m.eval()
    for size in (96, 100, 512):
        il, _ = m.transform([torch.rand(5, size, size)])
        assert il.image_sizes == [(size, size)] and il.tensors.shape[-1] == math.ceil(size / 32) * 32
    t = {"boxes": torch.tensor([[10.0, 12, 30, 40]]), "labels": torch.tensor([1]), "masks": torch.zeros(1, 96, 96, dtype=torch.uint8)}
    m.train()
    _, tt = m.transform([torch.rand(5, 96, 96)], [t])
    assert tt[0]["boxes"].tolist() == [[10.0, 12, 30, 40]] and tt[0]["masks"].shape == (1, 96, 96)
    # torchvision's own transform would have upsampled the 96 px crop to 512 px
    r = build_maskrcnn25d(backbone="resnet18", resize=True).eval()
    assert r.transform([torch.rand(5, 96, 96)])[0].image_sizes == [(512, 512)]


@pytest.mark.slow
def test_narrow_variant_from_lnmsnet_encoder():
    from NoduleMTLLib.models.networks.lnmsnet import LNMSNet
    from NoduleMTLLib.models.networks.maskrcnn25d import build_maskrcnn25d
    from NoduleMTLLib.models.registry import find_weights, read_state_dict
    from training.detection_phases import init_backbone_from_lnmsnet, lnmsnet_encoder_state_dict

    m = build_maskrcnn25d(backbone="resnet18")
    n = sum(p.numel() for p in m.parameters())
    assert 14e6 < n < 18e6 and n * 2 < 40e6  # fp16 file < 40 MB
    assert m.backbone.out_channels == 128 and m.roi_heads.box_head.fc7.out_features == 512
    assert m.rpn.anchor_generator.sizes[0] == (4, 6, 8) and m.rpn._post_nms_top_n == {"training": 2000, "testing": 300}
    sd = read_state_dict(find_weights("lnmsnet"))
    init_backbone_from_lnmsnet(m, sd)
    body = m.backbone.body
    w1 = sd["stem.0.weight"]
    torch.testing.assert_close(body.conv1.weight.detach(), (w1 / 5).repeat(1, 5, 1, 1))
    torch.testing.assert_close(body.layer3[1].conv2.weight.detach(), sd["layer3.1.conv2.weight"])
    torch.testing.assert_close(body.bn1.running_var, sd["stem.1.running_var"])
    # a stack of five identical slices gives LNMSNet's stem response on that slice
    ln = LNMSNet().eval()
    ln.load_state_dict(sd)
    body.eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(body.relu(body.bn1(body.conv1(x.repeat(1, 5, 1, 1)))), ln.stem(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        lnmsnet_encoder_state_dict({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ValueError):
        init_backbone_from_lnmsnet(build_maskrcnn25d(), sd)  # the paper's resnet50


# ----------------------------------------------------------------------------- smoke run through the CLI


def _run_cli(capsys, *argv):
    from training.cli import main

    rc = main(list(argv))
    out = capsys.readouterr().out
    return rc, [json.loads(line) for line in out.splitlines() if line.startswith("{")], out


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory, cfg):
    c = dict(cfg, iterations=6, batch_size=1, canvas_sizes=[160], eval_every=100, ckpt_every=2, log_every=1,
             threads=1, warmup_iterations=2, val_max_nodules=3, max_minutes=30, phase_fractions=[0.6, 0.15, 0.25],
             init_weights=None)  # from the LNMSNet encoder (the shipped config fine-tunes the first detector)
    p = tmp_path_factory.mktemp("cfg") / "smoke.json"
    p.write_text(json.dumps(c))
    return p


@pytest.mark.slow
def test_smoke_train_resume_export_reload_evaluate(shared_data, smoke_cfg, tmp_path, capsys, monkeypatch):
    from NoduleMTLLib.models import registry
    from NoduleMTLLib.models.networks.maskrcnn25d import DETECTION_LOSS_KEYS

    run = tmp_path / "run"
    rc, recs, _ = _run_cli(capsys, "train", "maskrcnn25d", "--config", str(smoke_cfg), "--out", str(run),
                           "--data", str(shared_data), "--limit-nodules", "6")
    assert rc == 0
    phases = [r["phase"] for r in recs if r["event"] == "phase"]
    assert phases == ["detection", "mask", "joint"]
    train = [r for r in recs if r["event"] == "train"]
    # iterations 6 -> 4 detection, 1 mask, 2 joint (round(0.9) = 1, round(1.5) = 2)
    assert [r["phase"] for r in train] == ["detection"] * 4 + ["mask"] + ["joint"] * 2
    for r in train:
        det = sum(r[k] for k in DETECTION_LOSS_KEYS)
        expect = {"detection": det, "mask": r.get("loss_mask"), "joint": det + r.get("loss_mask", 0.0)}[r["phase"]]
        assert "loss_mask" in r or r["phase"] == "detection"
        assert "loss_mask" not in r or r["phase"] != "detection"
        assert r["loss"] == pytest.approx(expect, abs=2e-3) and math.isfinite(r["loss"])
    evals = [r for r in recs if r["event"] == "eval"]
    assert [e["phase"] for e in evals] == ["detection", "mask", "joint"]
    assert all(set(e) >= {"val_f1", "val_f1_adaptive", "adaptive_threshold", "val_dice"} for e in evals)
    assert evals[1].get("saved_best") and not evals[0].get("saved_best")
    assert recs[-1]["event"] == "done" and recs[-1]["iteration"] == 7
    assert (run / "last.pt").exists() and (run / "best.pt").exists()
    assert len(json.loads((run / "history.json").read_text())) == 3

    # resume: more iterations continue the joint phase from last.pt
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["iteration"] == 7 and ck["phase_state"]["starts"] == {"detection": 0, "mask": 4, "joint": 5}
    rc, recs2, _ = _run_cli(capsys, "train", "maskrcnn25d", "--config", str(smoke_cfg), "--out", str(run),
                            "--data", str(shared_data), "--limit-nodules", "6", "--iterations", "16")
    assert rc == 0
    assert recs2[1] == {"event": "resumed", "iteration": 7, "best": ck["best"]}
    assert [r["iteration"] for r in recs2 if r["event"] == "train"] == [8, 9]  # joint ends at 5 + round(0.25 * 16) = 9
    assert [r["phase"] for r in recs2 if r["event"] == "train"] == ["joint", "joint"]
    assert recs2[-1]["iteration"] == 9
    ck2 = torch.load(run / "last.pt", weights_only=True)
    changed = [k for k, v in ck2["model"].items() if v.is_floating_point() and not torch.equal(v, ck["model"][k])]
    assert any(k.startswith("roi_heads.mask_head") for k in changed) and any(k.startswith("backbone.body") for k in changed)

    # export (fp16 safetensors + manifest beside it), then reload through the registry
    wdir = tmp_path / "res" / "Weights"
    rc, _, out = _run_cli(capsys, "export", "maskrcnn25d", str(run / "best.pt"), "--out", str(wdir / "maskrcnn25d.safetensors"))
    assert rc == 0
    f = wdir / "maskrcnn25d.safetensors"
    assert f.stat().st_size < 40e6
    entry = json.loads((wdir / "models.json").read_text())["networks"]["maskrcnn25d"]
    assert entry["size_bytes"] == f.stat().st_size and entry["sha256"] == registry.sha256_of(f)
    assert entry["input_spec"]["channels"] == 5

    monkeypatch.delenv("NODULEMTL_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "resources_dir", lambda: tmp_path / "res")
    loaded = registry.load_network("maskrcnn25d", "cpu")
    assert not loaded.training
    ref = registry.build_network("maskrcnn25d")
    ref.load_state_dict(torch.load(run / "best.pt", weights_only=True)["model"])
    ref.eval()
    from training.data import load_split

    nd = D._load_nodules(shared_data, load_split()["val"], 2)
    cfg_ = json.loads(smoke_cfg.read_text())
    s = D.validation_samples(nd, cfg_)[0]
    assert len(s.target["boxes"]) > 0
    with torch.inference_mode():
        feats = [mm.backbone(mm.transform([s.image])[0].tensors) for mm in (ref, loaded)]
        for k in feats[0]:
            scale = float(feats[0][k].abs().max())
            torch.testing.assert_close(feats[1][k], feats[0][k], atol=0.02 * scale, rtol=0.02)
        sizes = [tuple(s.image.shape[-2:])]
        logits = []
        for mm, ft in zip((ref, loaded), feats):
            rh = mm.roi_heads
            bf = rh.box_head(rh.box_roi_pool(ft, [s.target["boxes"]], sizes))
            ml = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(ft, [s.target["boxes"]], sizes)))
            logits.append((rh.box_predictor(bf)[0], rh.aux_classifier(bf), ml))
        for a, b in zip(*logits):
            torch.testing.assert_close(b, a, atol=0.05 * max(1.0, float(a.abs().max())), rtol=0.05)
        o = loaded([s.image])[0]
    assert set(o) >= {"boxes", "scores", "scores_main", "scores_aux", "masks"}

    # fine-tuning start (config key init_weights): from the exported fp16 file and from a checkpoint
    for src, tol in ((f, 1e-3), (run / "best.pt", 0.0)):
        m2 = registry.build_network("maskrcnn25d")
        assert D.load_init_weights(m2, src) == src
        for k, v in m2.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, ref.state_dict()[k], atol=tol * max(1.0, float(v.abs().max())), rtol=tol)
    with pytest.raises(FileNotFoundError, match="init_weights"):
        D.load_init_weights(registry.build_network("maskrcnn25d"), tmp_path / "nope.safetensors")

    # absent and corrupt weights: clear WeightsError
    monkeypatch.setattr(registry, "resources_dir", lambda: tmp_path / "empty")
    with pytest.raises(registry.WeightsError, match="maskrcnn25d"):
        registry.load_network("maskrcnn25d")
    monkeypatch.setattr(registry, "resources_dir", lambda: tmp_path / "res")
    with open(f, "ab") as fh:
        fh.write(b"0")
    with pytest.raises(registry.WeightsError, match="bytes"):
        registry.load_network("maskrcnn25d")

    # crop evaluation through the CLI on a few validation nodules
    rep = tmp_path / "eval_val.json"
    rc, _, out = _run_cli(capsys, "evaluate", "maskrcnn25d", "--weights", str(run / "best.pt"), "--split", "val",
                          "--data", str(shared_data), "--limit-nodules", "3", "--out", str(rep))
    assert rc == 0 and "F1" in out
    ev = json.loads(rep.read_text())
    assert ev["split"] == "val" and ev["n_nodules"] == 3 and ev["n_images"] >= 1
    assert set(ev["fixed"]) >= {"precision", "recall", "f1", "dice_mean", "threshold"} and ev["fixed"]["threshold"] == 0.5
    assert 0.1 <= ev["adaptive"]["threshold"] <= 0.5 and ev["sha256"] == registry.sha256_of(run / "best.pt")


@pytest.mark.slow
def test_detector_is_not_a_click_network(shared_data):
    from NoduleMTLLib.core.io import InputError, read_ct
    from NoduleMTLLib.inference.pipeline import analyze_points
    from NoduleMTLLib.models import registry

    assert "maskrcnn25d" not in registry.available_networks() and "maskrcnn25d" not in registry.NETWORKS
    assert registry.available_detectors() == ["maskrcnn25d"] and registry.get_spec("maskrcnn25d").kind == "detector"
    ct = read_ct(Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd")
    with pytest.raises(InputError, match="maskrcnn25d"):
        analyze_points(ct, [(-72.5, -77.2, -190.4)], network_ids=("maskrcnn25d",))
