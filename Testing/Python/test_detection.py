"""Whole-scan nodule search ``maskrcnn25d``: preprocessing, network, 3D merging, evaluation.

Real CT: LIDC-IDRI-0003 (whole scan with its nodule label map) and Lung-PET-CT-Dx A0001
from ``../shared/data/whole_ct``.  The network runs on one 128 x 128 crop (single thread).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from NoduleMTLLib.core.io import CTVolume, InputError
from NoduleMTLLib.detection import merge as mg
from NoduleMTLLib.detection import preprocess as pp
from training import detection_matching as ev

torch.set_num_threads(1)

CROP = 128


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lidc3(shared_data):
    folder = shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003"
    ct, refs = ev.load_lidc_whole_ct_references(folder)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nodules_labels.nrrd")))
    return ct, refs, labels


@pytest.fixture(scope="module")
def lidc3_lung(lidc3):
    return pp.lung_mask_from_ct(lidc3[0])


@pytest.fixture(scope="module")
def model():
    from NoduleMTLLib.models.networks.maskrcnn25d import build_maskrcnn25d

    torch.manual_seed(0)
    return build_maskrcnn25d(min_size=CROP, max_size=CROP, box_detections_per_img=20)


@pytest.fixture(scope="module")
def nodule_crop(lidc3, lidc3_lung):
    """Preprocessed 5-slice stack (128 x 128) centred on LIDC-0003 nodule 3 with its real box and mask."""
    ct, refs, labels = lidc3
    ref = next(r for r in refs if r.nodule_id == 3)
    k = ref.centre_slice
    ks = pp.stack_indices(k, ct.shape_zyx[0])
    vol = pp.hu_window(ct.array[ks])
    vol = pp.clahe_slices(vol) * lidc3_lung.mask[ks]
    ci, cj = int(round(ref.centre_ijk[0])), int(round(ref.centre_ijk[1]))
    x0, y0 = ci - CROP // 2, cj - CROP // 2
    stack = vol[:, y0:y0 + CROP, x0:x0 + CROP]
    m = (labels[k, y0:y0 + CROP, x0:x0 + CROP] == 3).astype(np.uint8)
    jj, ii = np.nonzero(m)
    box = [ii.min(), jj.min(), ii.max() + 1, jj.max() + 1]
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1]),
              "masks": torch.from_numpy(m)[None]}
    return torch.from_numpy(stack), target


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.slow
def test_lung_mask_two_lungs_contain_reference_nodules(lidc3, lidc3_lung):
    ct, refs, labels = lidc3
    lung = lidc3_lung
    assert lung.labels.shape == ct.shape_zyx and lung.labels.dtype == np.uint8
    assert lung.n_lungs == 2
    for v in lung.volumes_ml:  # each lung 1-5 L, both 3-9 L
        assert 1000 < v < 5000
    assert 3000 < lung.volume_ml < 9000
    for r in refs:
        i, j, k = (int(round(c)) for c in r.centre_ijk)
        assert lung.mask[k, j, i], f"nodule {r.nodule_id} centre outside the lung mask"
        assert lung.mask[labels == r.nodule_id].mean() > 0.95
        # LPS x > 0 is the patient's left: label 2
        assert lung.labels[k, j, i] == (2 if r.centre_lps[0] > 0 else 1)
    b = pp.lung_bounds(lung)
    assert 0 < b.z0 and b.z1 == ct.shape_zyx[0]  # LIDC-0003 starts below the lung bases
    assert b.x1 - b.x0 < 512 and b.y1 - b.y0 < 512
    assert lung.mask[b.slices].sum() == lung.mask.sum()


@pytest.mark.slow
def test_no_lung_below_the_lungs_or_outside_them(lidc3):
    ct = lidc3[0]
    below = CTVolume(ct.image[:, :, 0:8])  # the 8 lowest slices: upper abdomen
    with pytest.raises(pp.NoLungError, match="No plausible lung"):
        pp.lung_mask_from_ct(below)
    corner = CTVolume(ct.image[0:150, 0:150, :])  # anterior-right corner, outside the lungs
    with pytest.raises(InputError):  # NoLungError is an InputError
        pp.lung_mask_from_ct(corner)


@pytest.mark.slow
def test_thick_slice_scan_flagged_and_lungs_found(shared_data):
    from NoduleMTLLib.core.io import read_ct

    ct = read_ct(shared_data / "whole_ct" / "lung_pet_ct_dx_A0001.nrrd")  # 5.0 mm slices
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = pp.check_detection_input(ct)
    assert rep.thick_slices and rep.slice_spacing_mm == pytest.approx(5.0)
    assert any(issubclass(x.category, pp.ThickSliceWarning) for x in w)
    lung = pp.lung_mask_from_ct(ct)
    assert lung.n_lungs == 2 and 3000 < lung.volume_ml < 9000


@pytest.mark.slow
def test_fewer_than_five_slices_is_an_error(lidc3):
    thin = CTVolume(lidc3[0].image[:, :, 60:64])
    with pytest.raises(InputError, match="at least 5 slices"):
        pp.check_detection_input(thin)
    rep = pp.check_detection_input(CTVolume(lidc3[0].image[:, :, 60:65]), warn=False)
    assert rep.n_slices == 5 and not rep.thick_slices


@pytest.mark.slow
def test_hu_window_and_clahe_ranges(lidc3):
    hu = np.array([-3024, -2048, -1000, -300, 400, 3000], np.int16)
    w = pp.hu_window(hu)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [0, 0, 0, 0.5, 1, 1], atol=1e-6)
    ct = lidc3[0]
    vol = pp.hu_window(ct.array[80:83])
    out = pp.clahe_slices(vol, slices=[0, 1])
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out[0] - vol[0]).mean() > 0.01  # equalised
    np.testing.assert_array_equal(out[2], vol[2])  # not in `slices`: unchanged
    flat = np.full((1, 32, 32), 0.3, np.float32)
    np.testing.assert_array_equal(pp.clahe_slices(flat), flat)  # constant slice kept
    with pytest.raises(ValueError):
        pp.clahe_slices(vol * 2)


@pytest.mark.slow
def test_preprocess_switches(lidc3, lidc3_lung):
    ct = lidc3[0]
    sub = CTVolume(ct.image[:, :, 78:90])
    lung = pp.LungMask(lidc3_lung.labels[78:90], lidc3_lung.spacing_zyx, lidc3_lung.volumes_ml, 2)
    raw = pp.preprocess_ct(sub, use_clahe=False, use_lung_mask=False, restrict_to_lungs=False)
    np.testing.assert_array_equal(raw.image, pp.hu_window(sub.array))
    assert raw.lung is None and raw.bounds is None and not raw.reverse_stack
    full = pp.preprocess_ct(sub, lung=lung)
    assert (full.image[~lung.mask] == 0).all()
    assert not np.allclose(full.image[lung.mask], raw.image[lung.mask])  # CLAHE changed the lungs
    assert full.stack(0).shape == (5, 512, 512)


def test_five_slice_stacks_at_volume_edges():
    np.testing.assert_array_equal(pp.stack_indices(0, 10), [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(pp.stack_indices(1, 10), [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(pp.stack_indices(5, 10), [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(pp.stack_indices(9, 10), [7, 8, 9, 9, 9])
    np.testing.assert_array_equal(pp.stack_indices(9, 10, reverse=True), [9, 9, 9, 8, 7])
    vol = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, 4, 3), np.float32)
    s = pp.stack_slices(vol, 5)
    assert s.shape == (5, 4, 3) and s.dtype == np.float32
    np.testing.assert_array_equal(s[:, 0, 0], [3, 4, 5, 5, 5])
    with pytest.raises(ValueError):
        pp.stack_indices(10, 10)
    with pytest.raises(ValueError):
        pp.stack_indices(2, 10, size=4)


# ----------------------------------------------------------------------------- network


def test_conv1_5ch_init():
    from NoduleMTLLib.models.networks.maskrcnn25d import adapt_conv1_to_5ch

    conv3 = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    conv5 = adapt_conv1_to_5ch(conv3)
    assert conv5.in_channels == 5 and conv5.stride == (2, 2) and conv5.padding == (3, 3) and conv5.bias is None
    w = conv5.weight.detach()
    torch.testing.assert_close(w[:, :3], conv3.weight.detach())
    mean = conv3.weight.detach().mean(1)
    torch.testing.assert_close(w[:, 3], mean)
    torch.testing.assert_close(w[:, 4], mean)
    assert conv5.weight.requires_grad
    with pytest.raises(ValueError):
        adapt_conv1_to_5ch(torch.nn.Conv2d(1, 8, 3))


@pytest.mark.slow
def test_model_configuration(model):
    from torchvision.models import resnet50

    from NoduleMTLLib.models.networks.maskrcnn25d import AuxRoIHeads, build_maskrcnn25d
    from training.detection_phases import count_trainable_parameters

    ag = model.rpn.anchor_generator
    assert ag.sizes == ((4, 6, 8), (8, 12, 16), (16, 24, 32), (32, 48, 64), (64, 96, 128))
    assert all(r == (0.5, 1.0, 2.0) for r in ag.aspect_ratios)
    assert ag.num_anchors_per_location() == [9] * 5
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 300}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 300}
    assert model.backbone.body.conv1.in_channels == 5
    assert len(model.transform.image_mean) == 5 and len(model.transform.image_std) == 5
    assert isinstance(model.roi_heads, AuxRoIHeads)
    assert model.roi_heads.aux_loss_weight == 0.3 and model.roi_heads.aux_iou_thresh == 0.3
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    # With ImageNet-style RGB weights (random here, same shapes): the paper's 43.85 M trainable parameters
    sd = resnet50(weights=None).state_dict()
    m2 = build_maskrcnn25d(backbone_rgb_weights=sd)
    assert round(count_trainable_parameters(m2) / 1e6, 2) == 43.85
    w = m2.backbone.body.conv1.weight.detach()
    torch.testing.assert_close(w[:, :3], sd["conv1.weight"])
    torch.testing.assert_close(w[:, 4], sd["conv1.weight"].mean(1))


@pytest.mark.slow
def test_train_forward_backward_on_real_nodule(model, nodule_crop):
    from training.detection_phases import set_training_phase

    x, target = nodule_crop
    assert x.shape == (5, CROP, CROP) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert int(target["masks"].sum()) > 50  # nodule 3, ~13 mm
    model.train()
    set_training_phase(model, "joint")
    model.zero_grad()
    torch.manual_seed(0)
    losses = model([x], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                           "loss_aux", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for p in (model.roi_heads.aux_classifier.fc1.weight, model.backbone.body.conv1.weight,
              model.roi_heads.mask_predictor.mask_fcn_logits.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    # aux targets: a GT box is positive, a box with IoU < 0.3 negative
    b = target["boxes"][0]
    far = b + torch.tensor([60.0, 0, 60.0, 0])
    t = model.roi_heads.aux_targets([torch.stack([b, far])], [target])
    assert t.tolist() == [1.0, 0.0]
    # a negative stack (no nodule), as the paper's mid-lung negatives
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros((0, CROP, CROP), dtype=torch.uint8)}
    neg = model([x], [empty])
    assert all(torch.isfinite(v) for v in neg.values()) and float(neg["loss_box_reg"].detach()) == 0.0
    sum(neg.values()).backward()


@pytest.mark.slow
def test_eval_returns_boxes_scores_masks_with_fused_scores(model, nodule_crop):
    x, _ = nodule_crop
    model.eval()
    with torch.no_grad():
        out = model([x])[0]
    n = out["boxes"].shape[0]
    assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
    assert out["masks"].shape == (n, 1, CROP, CROP)
    assert 0 < n <= 20  # untrained (seeded) weights still score many proposals above 0.05
    assert float(out["scores"].min()) > 0.05 and float(out["scores"].max()) <= 1
    w = model.roi_heads.aux_fusion_weight
    torch.testing.assert_close(out["scores"], (1 - w) * out["scores_main"] + w * out["scores_aux"])
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])  # ranked by the fused score
    assert out["masks"].min() >= 0 and out["masks"].max() <= 1
    # crop output -> full-slice detections -> merge
    det = mg.detections_from_output(out, slice_index=83, offset_xy=(100, 200), full_shape_yx=(512, 512))
    np.testing.assert_allclose(det["boxes"], out["boxes"].numpy() + [100, 200, 100, 200], rtol=1e-6)
    assert det["masks"].shape == (n, 512, 512) and det["masks"].dtype == bool
    np.testing.assert_array_equal(det["masks"][:, 200:328, 100:228], out["masks"][:, 0].numpy() >= 0.5)
    res = mg.merge_slice_detections([det], score_threshold=0.0)
    assert res.n_kept == n and 1 <= len(res.nodules) <= n and all(nd.slices == [83] for nd in res.nodules)


@pytest.mark.slow
def test_training_phases(model, nodule_crop):
    from training.detection_phases import phase_for_epoch, phase_loss, set_training_phase

    model.train()
    spec = set_training_phase(model, "detection")
    named = dict(model.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("roi_heads.mask_"))
    assert named["backbone.body.conv1.weight"].requires_grad
    assert named["roi_heads.aux_classifier.fc1.weight"].requires_grad
    x, target = nodule_crop
    losses = model([x], [target])
    assert "loss_mask" not in losses and "loss_aux" in losses  # mask branch skipped in phase 1
    torch.testing.assert_close(phase_loss(losses, spec), sum(losses.values()))

    set_training_phase(model, "mask")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("roi_heads.mask_head", "roi_heads.mask_predictor")) for n in trainable)
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    fake = {"loss_mask": torch.tensor(2.0), "loss_classifier": torch.tensor(5.0)}
    assert float(phase_loss(fake, "mask")) == 2.0

    set_training_phase(model, "joint")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(model.nodulemtl_base_trainable)
    assert [phase_for_epoch(e) for e in (1, 9, 10, 14, 15, 35)] == ["detection", "detection", "mask", "mask",
                                                                    "joint", "joint"]


# ----------------------------------------------------------------------------- merging


def _box_mask(box, shape=(64, 64), p=0.9):
    m = np.zeros(shape, np.float32)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = p
    return m


def test_adaptive_threshold():
    assert mg.adaptive_score_threshold([0.01, 0.02, 0.03, 0.9]) == pytest.approx(0.1)  # clipped low
    assert mg.adaptive_score_threshold([0.8, 0.9, 0.95]) == pytest.approx(0.5)  # clipped high
    assert mg.adaptive_score_threshold(np.linspace(0.0, 1.0, 11)) == pytest.approx(0.3)  # 30th percentile
    assert mg.adaptive_score_threshold([]) == 0.5


def test_merge_hand_made_slice_detections():
    a = [(10, (10, 10, 20, 20), 0.9), (11, (11, 10, 21, 20), 0.8), (12, (10, 11, 20, 21), 0.7),
         (14, (10, 10, 20, 20), 0.6)]  # one nodule; slice 13 missed (gap 2 <= 3)
    dets = {}
    for k, box, s in a:
        dets.setdefault(k, []).append((box, s))
    dets.setdefault(18, []).append(((10, 10, 20, 20), 0.5))  # gap 4 from slice 14: a new nodule
    dets.setdefault(11, []).append(((40, 40, 50, 50), 0.4))  # elsewhere in-plane
    dets.setdefault(12, []).append(((19, 10, 29, 20), 0.45))  # IoU 0.05 with nodule A: not linked
    dets.setdefault(12, []).append(((11, 11, 19, 19), 0.05))  # below the threshold
    slice_dets = [{"slice": k, "boxes": np.array([b for b, _ in v], float), "scores": np.array([s for _, s in v]),
                   "masks": np.stack([_box_mask(b) for b, _ in v])} for k, v in sorted(dets.items())]

    ct = CTVolume(sitk.Image(64, 64, 30, sitk.sitkInt16))
    ct.image.SetSpacing((0.5, 0.5, 2.0))
    ct.image.SetOrigin((10.0, 20.0, 30.0))
    res = mg.merge_slice_detections(slice_dets, ct, score_threshold=0.1)
    assert res.n_detections == 8 and res.n_kept == 7 and res.score_threshold == 0.1
    assert [n.slices for n in res.nodules] == [[10, 11, 12, 14], [18], [12], [11]]
    nod = res.nodules[0]
    assert nod.score == 0.9 and len(nod.members) == 4
    assert nod.box_xyxy == (10, 10, 21, 21) and nod.box_voxel == (10, 10, 10, 21, 21, 15)
    assert nod.mask.shape == (5, 11, 11) and not nod.mask[3].any()  # slice 13 has no detection
    assert nod.mask[0, :10, :10].all() and nod.mask.sum() == 4 * 100
    kk, jj, ii = np.nonzero(nod.full_mask(ct.shape_zyx))
    assert nod.centre_ijk == pytest.approx((ii.mean(), jj.mean(), kk.mean()))
    assert nod.centre_slice == 12
    assert nod.centre_lps == pytest.approx((10 + 0.5 * ii.mean(), 20 + 0.5 * jj.mean(), 30 + 2.0 * kk.mean()))
    assert nod.box_lps_min == pytest.approx((10 + 0.5 * 9.5, 20 + 0.5 * 9.5, 30 + 2.0 * 9.5))
    assert nod.box_lps_max == pytest.approx((10 + 0.5 * 20.5, 20 + 0.5 * 20.5, 30 + 2.0 * 14.5))
    lab = mg.nodules_to_label_map(res.nodules, ct.shape_zyx)
    assert lab.dtype == np.uint16 and set(np.unique(lab)) == {0, 1, 2, 3, 4}
    assert (lab == 1).sum() == 400
    # adaptive: the threshold is the clipped 30th percentile of all 8 scores
    res2 = mg.merge_slice_detections(slice_dets, ct)
    all_scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.45, 0.05]
    assert res2.score_threshold == pytest.approx(mg.adaptive_score_threshold(all_scores))
    assert res2.n_kept == sum(s >= res2.score_threshold for s in all_scores)
    # without masks: the centre is the score-weighted mean of the box centres
    nm = mg.merge_slice_detections([{k: v for k, v in d.items() if k != "masks"} for d in slice_dets],
                                   score_threshold=0.1)
    assert nm.nodules[0].mask is None and nm.nodules[0].centre_lps is None
    w = np.array([0.9, 0.8, 0.7, 0.6])
    assert nm.nodules[0].centre_ijk[2] == pytest.approx(np.average([10, 11, 12, 14], weights=w))


def _brute_force_links(ks, boxes, gap, min_iou):
    iou = mg.box_iou_np(boxes, boxes)
    close = np.abs(ks[:, None] - ks[None, :]) <= gap
    r, c = np.nonzero(np.triu(close & (iou >= min_iou), 1))
    return {(int(min(a, b)), int(max(a, b))) for a, b in zip(r, c)}


def test_link_pairs_equals_all_pairs_and_stays_small_on_a_thin_slice_chain():
    """The windowed linking gives exactly the all-pairs graph, and a 20,000-detection chain
    (one linked group, as low-score detections on a 0.625 mm scan) needs no N x N matrix."""
    import tracemalloc

    rng = np.random.default_rng(0)
    ks = rng.integers(0, 40, 600)
    xy = rng.uniform(0, 60, (600, 2))
    wh = rng.uniform(2, 25, (600, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    for gap, thr in ((3, 0.2), (0, 0.2), (5, 0.0)):
        r, c = mg.link_pairs(ks, boxes, gap, thr)
        got = {(int(min(a, b)), int(max(a, b))) for a, b in zip(r, c)}
        assert len(got) == len(r) and got == _brute_force_links(ks, boxes, gap, thr)
    n = 20000  # 40 detections per slice on 500 slices, all overlapping: one linked group
    ks = np.repeat(np.arange(500), 40)
    boxes = np.tile([100.0, 100.0, 160.0, 160.0], (n, 1)) + rng.uniform(0, 5, (n, 1))
    tracemalloc.start()
    r, c = mg.link_pairs(ks, boxes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(mg.link_components(n, r, c)) == 1
    assert peak < 200 * 2**20  # all pairs would be n * n * 8 B = 3.2 GB per float matrix


@pytest.mark.slow
def test_merge_real_nodule_masks_and_paper_match(lidc3):
    """Perfect slice detections of LIDC-0003 nodule 3 merge to one nodule that matches it."""
    ct, refs, labels = lidc3
    ref = next(r for r in refs if r.nodule_id == 3)
    dets = []
    for k in range(*ref.k_range):
        m = labels[k] == 3
        if not m.any():
            continue
        jj, ii = np.nonzero(m)
        dets.append({"slice": k, "boxes": np.array([[ii.min(), jj.min(), ii.max() + 1, jj.max() + 1]], float),
                     "scores": np.array([0.8]), "masks": m[None]})
    res = mg.merge_slice_detections(dets, ct)
    assert len(res.nodules) == 1
    nod = res.nodules[0]
    np.testing.assert_array_equal(nod.full_mask(ct.shape_zyx), labels == 3)
    assert math.dist(nod.centre_lps, ref.centre_lps) < 3.0
    assert all(lo <= c <= hi for lo, c, hi in zip(nod.box_lps_min, ref.centre_lps, nod.box_lps_max))
    rc = ev.reference_from_centre(ref.centre_lps, ref.diameter_mm, ct)  # LUNA16-style centre + diameter
    assert mg.box_iou_np([rc.box_xyxy], [ref.box_xyxy])[0, 0] > 0.6
    assert rc.k_range[0] <= ref.k_range[0] and rc.k_range[1] >= ref.k_range[1]
    inc, exc = ev.split_references(refs)
    assert [r.nodule_id for r in inc] == [2, 3, 4] and [r.nodule_id for r in exc] == [1]
    m = ev.match_nodules(res.nodules, inc, exc)
    assert (m.tp, m.fp, m.fn) == (1, 0, 2) and m.precision == 1.0 and m.recall == pytest.approx(1 / 3)
    fr = ev.froc([ev.froc_scan_from_nodules(res.nodules, inc, exc)])
    assert fr.n_detected == 1 and fr.sensitivities == pytest.approx((1 / 3,) * 7)


# ----------------------------------------------------------------------------- evaluation


def _ref(nid, k, box, n_readers=4):
    return ev.ReferenceNodule(nid, (0.0, 0.0, 0.0), 10.0, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, float(k)),
                              tuple(float(v) for v in box), (k - 2, k + 3), n_readers)


class _Pred:
    def __init__(self, score, k, box):
        self.score, self.centre_slice, self.box_xyxy = score, k, box


def test_paper_nodule_matching():
    refs = [_ref(1, 12, (10, 10, 20, 20)), _ref(2, 40, (100, 100, 110, 110))]
    excluded = [_ref(3, 30, (60, 60, 70, 70), n_readers=1)]
    preds = [_Pred(0.9, 14, (11, 11, 21, 21)),    # TP on ref 1 (2 slices, IoU 0.68)
             _Pred(0.8, 10, (12, 10, 22, 20)),    # duplicate on ref 1 -> FP
             _Pred(0.7, 31, (60, 60, 70, 70)),    # on an excluded finding -> ignored
             _Pred(0.6, 12, (200, 200, 210, 210)),  # nothing there -> FP
             _Pred(0.5, 44, (100, 100, 110, 110))]  # 4 slices from ref 2 -> FP; ref 2 missed
    m = ev.match_nodules(preds, refs, excluded)
    assert (m.tp, m.fp, m.fn, m.duplicates, m.ignored) == (1, 3, 1, 1, 1)
    assert m.pairs == [(0, 0)] and m.missed == [1]
    assert m.precision == pytest.approx(0.25) and m.recall == pytest.approx(0.5) and m.f1 == pytest.approx(1 / 3)
    # IoU must be strictly greater than 0.2; 3 slices apart is allowed
    r = [_ref(1, 5, (0, 0, 10, 50))]
    assert ev.match_nodules([_Pred(0.9, 8, (0, 0, 10, 10))], r).tp == 0  # IoU exactly 0.2
    assert ev.match_nodules([_Pred(0.9, 8, (0, 0, 10, 11))], r).tp == 1  # IoU 0.22, 3 slices
    assert math.isnan(ev.precision_recall_f1(0, 0, 0)["precision"])


def test_froc_cpm_hand_checked():
    """Two scans, 3 nodules.  Scan A: c1 (0.9) and c2 (0.6) hit N1 (c2 ignored as a double),
    c3 (0.8) is FP, c4 (0.3) hits N2 at 2.5 mm < 3 mm.  Scan B: c5 (0.95) lies on an excluded
    finding (ignored), c6 (0.7) hits N3 at 3.9 mm < 4 mm, c7 (0.5) FP, c8 (0.2) at exactly
    4 mm is not a hit -> FP.  Detected scores 0.9, 0.7, 0.3; FP scores 0.8, 0.5, 0.2.
    Curve (FP/scan, sens): (0,0) (0,1/3) (0.5,1/3) (0.5,2/3) (1,2/3) (1,1) (1.5,1), so the
    sensitivities at 1/8..8 are 1/3, 1/3, 2/3, 1, 1, 1, 1 and CPM = (16/3)/7."""
    a = ev.FROCScan(candidates_lps=np.array([[1, 1, 0], [2, 0, 0], [100, 100, 0], [50, 2.5, 0]], float),
                    scores=np.array([0.9, 0.6, 0.8, 0.3]),
                    nodules_lps=np.array([[0, 0, 0], [50, 0, 0]], float), nodule_diameters_mm=np.array([10.0, 6.0]))
    b = ev.FROCScan(candidates_lps=np.array([[30, 1, 0], [0, 0, 3.9], [60, 0, 0], [0, 0, 4.0]], float),
                    scores=np.array([0.95, 0.7, 0.5, 0.2]),
                    nodules_lps=np.array([[0, 0, 0]], float), nodule_diameters_mm=np.array([8.0]),
                    excluded_lps=np.array([[30, 0, 0]], float), excluded_diameters_mm=np.array([10.0]))
    r = ev.froc([a, b])
    assert (r.n_scans, r.n_nodules, r.n_detected, r.n_false_positives) == (2, 3, 3, 3)
    assert (r.n_ignored_duplicates, r.n_ignored_excluded) == (1, 1)
    np.testing.assert_allclose(r.fps_per_scan, [0, 0, 0.5, 0.5, 1, 1, 1.5])
    np.testing.assert_allclose(r.sensitivity, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert r.fp_rates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    np.testing.assert_allclose(r.sensitivities, [1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1])
    assert r.cpm == pytest.approx(16 / 21)
    # candidate cap: with 1 candidate per scan only c1 (A) and c5 (B, ignored) remain
    r1 = ev.froc([a, b], max_candidates_per_scan=1)
    assert (r1.n_detected, r1.n_false_positives, r1.n_ignored_excluded) == (1, 0, 1)
    np.testing.assert_allclose(r1.sensitivities, [1 / 3] * 7)


def _nod(score, box_voxel, centre, scale=1.0):
    i0, j0, k0, i1, j1, k1 = box_voxel
    return mg.MergedNodule(score=score, slices=list(range(k0, k1)), box_xyxy=(i0, j0, i1, j1), box_voxel=box_voxel,
                           centre_ijk=centre, centre_lps=centre, scale=scale)


def test_group_scales_folds_fragments_into_the_coarse_lesion_only():
    from NoduleMTLLib.detection import infer

    mass = _nod(0.9, (10, 10, 0, 90, 90, 20), (50, 50, 10), scale=2.0)  # 80 px mass found at the coarse scale
    frag_a = _nod(0.8, (20, 20, 5, 40, 40, 9), (30, 30, 7))  # native fragments inside it
    frag_b = _nod(0.95, (60, 60, 8, 80, 80, 12), (70, 70, 10))  # a fragment scoring above the mass
    small = _nod(0.7, (200, 200, 3, 210, 210, 6), (205, 205, 4))  # a nodule elsewhere
    twin = _nod(0.6, (202, 202, 3, 212, 212, 6), (204, 204, 4))  # native twin: never folded here
    kept = infer.group_scales([mass, frag_a, frag_b, small, twin])
    assert kept == [frag_b, small, twin]  # frag_b's centre lies in the mass's box: one lesion
    assert frag_b.absorbed == 2 and small.absorbed == 0  # the mass, then frag_a inside the mass's box
    assert infer.group_scales([frag_a, small, twin]) == [frag_a, small, twin]


def test_evaluation_coarse_option_gives_the_factors():
    """``training.evaluate_detection --coarse [FACTOR ...]``: alone the 2x pass, with factors
    those (e.g. 2 4), absent the library's default."""
    from training import evaluate_detection as ed

    ap = ed.build_parser()
    assert ed.coarse_factors_option(ap.parse_args(["--coarse"]).coarse) == (2.0,)
    assert ed.coarse_factors_option(ap.parse_args(["--coarse", "2", "4"]).coarse) == (2.0, 4.0)
    assert ed.coarse_factors_option(ap.parse_args([]).coarse) is None
    assert ed.coarse_factors_option(True) == (2.0,) and ed.coarse_factors_option(False) is None
    with pytest.raises(SystemExit):
        ap.parse_args(["--coarse", "two"])


def test_outline_with_click_one_lesion_one_answer():
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.detection import infer
    from NoduleMTLLib.inference.pipeline import ClickOutput

    ct = CTVolume(sitk.Image(100, 100, 20, sitk.sitkInt16))
    big = np.ones((10, 60, 60), bool)  # the click outline of a mass: k 5-14, j/i 20-79

    def click(ct_, point):
        i, j, k = point
        if 20 <= i < 80 and 20 <= j < 80:
            return ClickOutput(MaskBox((5, 20, 20), big, ct_.shape_zyx), 0.9, {}, 2.0)
        return ClickOutput(None, float("nan"), {}, 1.0)

    top = _nod(0.9, (40, 40, 8, 50, 50, 10), (45.0, 45.0, 9.0))
    frag = _nod(0.8, (60, 60, 10, 70, 70, 12), (65.0, 65.0, 11.0))
    other = _nod(0.7, (85, 85, 2, 95, 95, 4), (90.0, 90.0, 3.0))
    kept, outs = infer.outline_with_click([frag, other, top], ct, click)
    assert kept == [top, other] and top.absorbed == 1 and other.absorbed == 0
    assert top.box_voxel == (20, 20, 5, 80, 80, 15) and top.mask.shape == (10, 60, 60)
    assert top.box_xyxy == (20.0, 20.0, 80.0, 80.0) and top.centre_ijk == (45.0, 45.0, 9.0)
    assert outs[1].mask is None and other.box_voxel == (85, 85, 2, 95, 95, 4)  # keeps the detector's box
    assert infer.outline_with_click([frag, other, top], ct, click, max_kept=1)[0] == [top]


def test_coarse_only_as_masses_refused_coarse_candidate_releases_what_it_folded(monkeypatch):
    """``infer.COARSE_ONLY_AS_MASSES``: a coarse candidate above the cut goes through the mass
    rule; refused (a small outline), the native candidate ``group_scales`` folded into it is
    judged on its own and reported at its score.  Off (the default): the coarse one is reported."""
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.detection import infer
    from NoduleMTLLib.inference.pipeline import ClickOutput

    ct = CTVolume(sitk.Image(100, 100, 20, sitk.sitkInt16) + 40)
    small = np.ones((3, 5, 5), bool)  # 0.075 mL: not a mass

    def click(ct_, point):
        i, j, k = (int(round(v)) for v in point)
        return ClickOutput(MaskBox((max(0, k - 1), max(0, j - 2), max(0, i - 2)), small, ct_.shape_zyx), 0.9, {}, 1.0)

    def candidates():
        coarse = _nod(0.97, (10, 10, 2, 90, 90, 18), (50.0, 50.0, 10.0), scale=2.0)
        native = _nod(0.95, (40, 40, 8, 50, 50, 11), (45.0, 45.0, 9.0))
        grouped = infer.group_scales([coarse, native])
        assert grouped == [coarse] and coarse.folded == [native]
        return coarse, native, grouped

    rule = infer.MassRule(min_score=0.7, min_volume_ml=10.0)
    coarse, native, grouped = candidates()
    assert infer.outline_with_click(grouped, ct, click, cut=0.9, mass_rule=rule)[0] == [coarse]
    monkeypatch.setattr(infer, "COARSE_ONLY_AS_MASSES", True)
    coarse, native, grouped = candidates()
    kept = infer.outline_with_click(grouped, ct, click, cut=0.9, mass_rule=rule)[0]
    assert kept == [native] and native.accepted_as == "score"


def test_outline_with_click_accepts_masses_below_the_cut_and_folds_overlapping_outlines():
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.detection import infer
    from NoduleMTLLib.inference.pipeline import ClickOutput

    img = sitk.Image(120, 120, 40, sitk.sitkInt16) + 40  # soft tissue everywhere, 1 mm voxels
    ct = CTVolume(img)
    mass = np.ones((30, 30, 30), bool)  # 27 mL outline at i/j 10-39, k 5-34
    small = np.ones((4, 6, 6), bool)  # 0.14 mL
    wide = np.ones((30, 30, 40), bool)  # a fragment's outline: 3/4 inside the mass's

    def click(ct_, point):
        i, j, k = point
        if i < 40 and j < 40:
            return ClickOutput(MaskBox((5, 10, 10), mass, ct_.shape_zyx), 0.9, {}, 2.0)
        if 40 <= i < 50 and j < 40:
            return ClickOutput(MaskBox((5, 10, 20), wide, ct_.shape_zyx), 0.9, {}, 2.0)
        return ClickOutput(MaskBox((10, 90, 90), small, ct_.shape_zyx), 0.5, {}, 1.0)

    rule = infer.MassRule(min_score=0.7, min_volume_ml=10.0, min_mean_hu=-300.0, min_lung_share=0.0)
    big = _nod(0.8, (20, 20, 18, 30, 30, 22), (25.0, 25.0, 20.0))  # below the cut, mass outline
    frag = _nod(0.75, (42, 20, 18, 48, 30, 22), (45.0, 25.0, 20.0))  # centre outside, outline mostly inside
    vessel = _nod(0.78, (88, 88, 10, 96, 96, 14), (92.0, 92.0, 12.0))  # below the cut, small outline
    low = _nod(0.5, (100, 10, 5, 105, 15, 8), (102.0, 12.0, 6.0))  # below the rule's score
    top = _nod(0.95, (90, 90, 10, 97, 97, 14), (93.0, 93.0, 12.0))  # above the cut
    kept, outs = infer.outline_with_click([frag, vessel, low, big, top], ct, click, cut=0.9, mass_rule=rule)
    assert kept == [top, big]
    assert big.accepted_as == "mass" and top.accepted_as == "score"
    assert big.features["volume_ml"] == pytest.approx(27.0) and big.features["mean_hu"] == pytest.approx(40.0)
    assert big.features["lung_share"] == 1.0 and big.features["long_mm"] >= 30.0
    assert big.absorbed == 1 and top.absorbed == 1  # frag by its outline, vessel by its centre in top's outline
    assert big.box_voxel == (10, 10, 5, 40, 40, 35)
    # without the rule, candidates below the cut are never reported
    for n in (frag, vessel, big, top):
        n.absorbed = 0
    assert infer.outline_with_click([frag, vessel, big, top], ct, click, cut=0.9)[0] == [top]
    # the lung share gate: the same mass outside the lung mask is refused
    lung = pp.LungMask(np.zeros(ct.shape_zyx, np.uint8), (1.0, 1.0, 1.0), (0.0,), 1)
    strict = infer.MassRule(0.7, 10.0, -300.0, 0.5)
    big.absorbed = 0
    assert infer.outline_with_click([big], ct, click, cut=0.9, mass_rule=strict, lung=lung)[0] == []
    # only two-stage searches look below the cut
    res = mg.MergeResult([top, big, vessel, low], 0.1, 10, 10)
    assert infer.mass_candidates(res, 0.9, True, rule) == [big, vessel]
    assert infer.mass_candidates(res, 0.9, False, rule) == [] and infer.mass_candidates(res, 0.6, True, rule) == []


def test_mass_outlined_in_pieces_is_one_nodule_through_its_territory():
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.detection import infer
    from NoduleMTLLib.inference.pipeline import ClickOutput

    hu = np.full((40, 120, 120), -850, np.int16)  # aerated lung, 1 mm voxels
    hu[10:30, 20:40, 10:70] = 40  # a 60 mm solid mass, outlined as i 10-29 and i 35-69
    hu[10:14, 90:94, 60:64] = 40  # a small nodule 50 mm away
    ct = CTVolume(sitk.GetImageFromArray(hu))

    def click(ct_, point):  # the click network outlines the mass in two pieces
        i, j, k = point
        if i < 35 and j < 50:
            return ClickOutput(MaskBox((10, 20, 10), np.ones((20, 20, 20), bool), ct_.shape_zyx), 0.9, {}, 1.0)
        if i >= 35 and j < 50:
            return ClickOutput(MaskBox((10, 20, 35), np.ones((20, 20, 35), bool), ct_.shape_zyx), 0.9, {}, 1.0)
        return ClickOutput(MaskBox((10, 90, 60), np.ones((4, 4, 4), bool), ct_.shape_zyx), 0.5, {}, 1.0)

    def cands():
        return [_nod(0.95, (15, 25, 15, 25, 35, 25), (20.0, 30.0, 20.0)), _nod(0.93, (45, 25, 15, 65, 35, 25), (55.0, 30.0, 20.0)),
                _nod(0.92, (60, 90, 10, 64, 94, 14), (62.0, 92.0, 12.0))]

    kept = infer.outline_with_click(cands(), ct, click)[0]
    assert [n.score for n in kept] == [0.95, 0.93, 0.92]  # outlines alone: two pieces, two nodules
    kept = infer.outline_with_click(cands(), ct, click, territory_ml=10.0)[0]
    assert [n.score for n in kept] == [0.95, 0.92] and kept[0].absorbed == 1  # the 14 mL piece's territory
    assert kept[0].box_voxel == (10, 20, 10, 30, 40, 30)  # the host keeps its own click outline
    t = infer.mass_territory(MaskBox((10, 20, 35), np.ones((20, 20, 35), bool), ct.shape_zyx), ct, margin_mm=10.0)
    assert t.offset_zyx == (10, 20, 25) and t.array.shape == (20, 20, 45) and t.array.all()  # the solid tissue within 10 mm
    assert infer.outline_with_click(cands(), ct, click, territory_ml=20.0)[0][1].score == 0.93  # below the volume: no territory


def test_outline_features_of_a_real_nodule(lidc3, lidc3_lung):
    """Reference nodule 3 of LIDC-IDRI-0003 as an outline: its volume, long axis and HU, inside the lung mask."""
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.core.postprocess import measure_nodule
    from NoduleMTLLib.detection import infer

    ct, refs, labels = lidc3
    box = MaskBox.from_full(labels == 3)
    f = infer.outline_features(box, ct, lidc3_lung)
    m = measure_nodule(box, ct)
    assert f["volume_ml"] == pytest.approx(m["volume_mm3"] / 1000.0)
    assert f["long_mm"] == pytest.approx(m["diameter_mm"]) and f["mean_hu"] == pytest.approx(m["mean_hu"])
    assert f["lung_share"] > 0.9  # a nodule inside the lung: hole-filled into the mask
    assert infer.outline_features(None, ct) is None
    assert infer.outline_features(box, ct)["lung_share"] == 1.0  # no lung mask given


def test_little_aerated_lung_gives_a_note_not_an_error():
    from NoduleMTLLib.detection import infer

    def lung(vols):
        return pp.LungMask(np.zeros((1, 1, 1), np.uint8), (1.0, 1.0, 1.0), tuple(vols), len(vols))

    assert infer.lung_volume_note(lung((2400.0, 2100.0))) is None
    assert infer.lung_volume_note(lung((4200.0,))) is None  # joined lungs, one label
    assert infer.lung_volume_note(None) is None
    note = infer.lung_volume_note(lung((2600.0, 400.0)))  # left lung mostly replaced
    assert "3000 mL = 2600 + 400 mL" in note and "effusion" in note
    assert "900 mL" in infer.lung_volume_note(lung((500.0, 400.0)))


@pytest.mark.slow
def test_thin_slice_lung_mask_subsampled_in_z_agrees(lidc3):
    """0.625 mm slices: the lung mask is computed on every 2nd slice and repeated back
    (memory flat in slice count); it agrees with the full-z mask."""
    ct = lidc3[0]
    im = ct.image[:, :, 60:80]
    sp = im.GetSpacing()
    r = sitk.ResampleImageFilter()
    r.SetOutputSpacing((sp[0], sp[1], 0.625))
    r.SetSize((im.GetSize()[0], im.GetSize()[1], 77))
    r.SetOutputOrigin(im.GetOrigin())
    r.SetOutputDirection(im.GetDirection())
    r.SetInterpolator(sitk.sitkLinear)
    thin = CTVolume(r.Execute(im))
    fast = pp.lung_mask_from_ct(thin)
    full = pp.lung_mask_from_ct(thin, work_slice_mm=0.0)
    assert fast.labels.shape == full.labels.shape == thin.shape_zyx
    a, b = fast.labels > 0, full.labels > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    assert fast.n_lungs == full.n_lungs == 2
    assert fast.volume_ml == pytest.approx(full.volume_ml, rel=0.03)
    assert (fast.labels[a & b] == full.labels[a & b]).mean() > 0.99  # same left / right naming


def test_too_large_ct_is_refused_up_front_with_the_limit(monkeypatch):
    from NoduleMTLLib.detection import infer

    assert infer.MAX_VOXELS == 1100 * 512 * 512
    monkeypatch.setattr(infer, "MAX_VOXELS", 10 * 512 * 512)  # small CTs stand in for 1,100+ slices
    big = CTVolume(sitk.Image(512, 512, 11, sitk.sitkInt16))
    with pytest.raises(InputError, match=r"11 slices of 512 x 512 .*at most 3 M voxels \(10 slices of 512 x 512\)"):
        infer.detect_nodules(big, model=torch.nn.Identity(), device="cpu")
    infer.check_size(CTVolume(sitk.Image(512, 512, 10, sitk.sitkInt16)))  # at the limit: accepted


def test_evaluation_reuses_cached_slice_detections(tmp_path, monkeypatch):
    """evaluate_detection.slice_detections: the network runs once per scan, weights and options."""
    from NoduleMTLLib.detection import infer
    from training import evaluate_detection as E

    ct = CTVolume(sitk.Image(32, 32, 8, sitk.sitkInt16))
    calls = []

    def fake(ct_, model, device, **search):
        calls.append(search)
        return infer.SliceDetections([infer.SliceDetection(3, np.array([1.0, 2.0, 5.0, 6.0]), 0.7)], ct_.shape_zyx, [3],
                                     (0, 32, 0, 32), None, pp.check_detection_input(ct_, warn=False))

    monkeypatch.setattr(infer, "run_slice_detections", fake)
    a, cached_a = E.slice_detections(ct, "scan", None, detections_cache=tmp_path, weights_sha="ab" * 32, input_scale=1.0)
    b, cached_b = E.slice_detections(ct, "scan", None, detections_cache=tmp_path, weights_sha="ab" * 32, input_scale=1.0)
    assert (cached_a, cached_b) == (False, True) and len(calls) == 1
    assert b.detections[0].score == 0.7 and b.detections[0].box.tolist() == [1.0, 2.0, 5.0, 6.0]
    E.slice_detections(ct, "scan", None, detections_cache=tmp_path, weights_sha="cd" * 32, input_scale=1.0)  # other weights
    E.slice_detections(ct, "scan", None, detections_cache=tmp_path, weights_sha="ab" * 32, input_scale=0.5)  # other options
    E.slice_detections(ct, "scan", None, detections_cache=tmp_path, weights_sha=None)  # random init: never cached
    assert len(calls) == 4 and len(list(tmp_path.glob("scan.*.pkl"))) == 3


def test_mass_territory_of_half_a_real_nodule_claims_its_other_half_only(lidc3):
    """LIDC-IDRI-0003 nodule 2 (30 mm, 4 readers) outlined in two halves: the territory of one half
    (tissue >= -300 HU within 20 mm) holds the other half's centre, and no other nodule's."""
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.detection import infer

    ct, refs, labels = lidc3
    m = labels == 2
    left = m.copy()
    left[:, :, int(np.median(np.nonzero(m)[2])):] = False
    right = m & ~left
    t = infer.mass_territory(MaskBox.from_full(left), ct, 20.0)
    assert infer._in_maskbox(t, tuple(int(round(v)) for v in np.array(np.nonzero(right)).mean(1))[::-1])
    assert t.array[tuple(np.array(np.nonzero(left)) - np.array(t.offset_zyx)[:, None])].all()  # contains its outline
    for r in refs:
        assert infer._in_maskbox(t, tuple(int(round(v)) for v in r.centre_ijk)) == (r.nodule_id == 2)


def test_recentre_clicks_a_large_outline_again_at_its_deepest_voxel():
    """``outline_with_click(recentre_ml=...)`` (measured, off as shipped: ``infer.RECENTRE_ML`` None):
    an outline of at least ``recentre_ml`` mL is replaced by the click at its deepest voxel."""
    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.detection import infer
    from NoduleMTLLib.inference.pipeline import ClickOutput

    ct = CTVolume(sitk.Image(100, 100, 40, sitk.sitkInt16))  # 1 mm voxels
    edge = np.ones((30, 30, 30), bool)  # the click at the mass's edge: an outline at i/j/k 10-39
    whole = np.ones((20, 40, 40), bool)  # the click at its centre: the whole mass
    seen = []

    def click(ct_, point):
        seen.append(tuple(round(v) for v in point))
        if point == (24.0, 24.0, 24.0):
            return ClickOutput(MaskBox((10, 30, 30), whole, ct_.shape_zyx), 0.9, {}, 2.0)
        return ClickOutput(MaskBox((10, 10, 10), edge, ct_.shape_zyx), 0.9, {}, 2.0)

    p, ijk = infer.deepest_point(MaskBox((10, 10, 10), edge, ct.shape_zyx), ct)
    assert ijk == (24, 24, 24) and p == (24.0, 24.0, 24.0)  # identity geometry: LPS = ijk
    assert infer.RECENTRE_ML is None  # off as shipped
    n = _nod(0.9, (10, 10, 10, 20, 20, 20), (12.0, 12.0, 12.0))
    kept, _ = infer.outline_with_click([n], ct, click)
    assert kept[0].box_voxel == (10, 10, 10, 40, 40, 40) and len(seen) == 1
    n = _nod(0.9, (10, 10, 10, 20, 20, 20), (12.0, 12.0, 12.0))
    kept, outs = infer.outline_with_click([n], ct, click, recentre_ml=10.0)
    assert seen[-1] == (24, 24, 24) and kept[0].box_voxel == (30, 30, 10, 70, 70, 30)
    assert kept[0].centre_lps == (24.0, 24.0, 24.0) and outs[0].mask.array.shape == (20, 40, 40)
    n = _nod(0.9, (10, 10, 10, 20, 20, 20), (12.0, 12.0, 12.0))
    assert infer.outline_with_click([n], ct, click, recentre_ml=30.0)[0][0].box_voxel == (10, 10, 10, 40, 40, 40)  # 27 mL < 30
