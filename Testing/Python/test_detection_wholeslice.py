"""Whole-slice training samples and hard-negative mining of ``maskrcnn25d`` (``training/detection_wholeslice.py``).

No whole-scan cache is needed: a tiny cache folder is built in tmp from real CT, 12 slices
(k 79-90) of ``../shared/data/whole_ct/lidc/LIDC-IDRI-0003`` holding its nodules 3 and 4.
LIDC-IDRI-0003 is a *test* patient of the whole-scan split: used here only to check the
sampler's arithmetic, never to train (the folder is named ``crop0003`` so that the
train-role guard, which refuses the split's val/test patients, lets the unit test use it).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training import detection_wholeslice as W
from training.wholescan import RESERVED, WholeScanError

torch.set_num_threads(1)

K0, K1 = 79, 91  # slices of LIDC-IDRI-0003 kept
PATIENT = "crop0003"
FP_IJ, FP2_IJ, EXC_IJ = (150.0, 250.0), (120.0, 300.0), (380.0, 250.0)  # lung points (checked: HU < -850, in the lung mask)


def _lps(img, i, j, k):
    return [round(float(v), 3) for v in img.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))]


@pytest.fixture(scope="module")
def tiny_cache(shared_data, tmp_path_factory) -> Path:
    src = shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003"
    cache = tmp_path_factory.mktemp("cache")
    d = cache / "wholescan" / PATIENT
    d.mkdir(parents=True)
    img = sitk.ReadImage(str(src / "ct.nrrd"))[:, :, K0:K1]
    lab = sitk.ReadImage(str(src / "nodules_labels.nrrd"))[:, :, K0:K1]
    sitk.WriteImage(img, str(d / "ct.nrrd"), True)
    sitk.WriteImage(lab, str(d / "nodules_labels.nrrd"), True)
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(lab)) if v}
    assert present == {3, 4}
    with open(src / "nodules.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["nodule"]) in present]
    with open(d / "nodules.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (d / "excluded.json").write_text(json.dumps({"excluded": [
        {"kind": "non-nodule", "reader": 0, "centre_lps": _lps(img, *EXC_IJ, 6), "radius_mm": 5.0}]}))
    la = sitk.GetArrayViewFromImage(lab)
    n4 = np.argwhere(la == 4).mean(0)  # (k, j, i)

    def cand(score, i, j, k, slices, hit=None, excluded=False):
        return {"score": score, "centre_lps": _lps(img, i, j, k), "centre_ijk": [i, j, k], "slices": slices,
                "hit": hit, "excluded": excluded}

    cands = [cand(0.9, *FP_IJ, 8, [7, 9]),                      # false positive
             cand(0.4, *FP2_IJ, 1, [0, 2]),                     # false positive
             cand(0.95, 308.0, 198.0, 3, [2, 5], hit=3),        # true positive
             cand(0.99, *EXC_IJ, 6, [5, 7], excluded=True),     # on the excluded mark
             cand(0.97, n4[2], n4[1], n4[0], [3, 7]),           # mislabelled: centre inside nodule 4
             cand(0.96, EXC_IJ[0] + 1, EXC_IJ[1] + 1, 6, [6, 6])]  # mislabelled: 1 px from the excluded mark
    (cache / "wholescan" / "candidates").mkdir()
    (cache / "wholescan" / "candidates" / f"{PATIENT}.json").write_text(json.dumps({"scan": PATIENT, "candidates": cands}))
    return cache


@pytest.fixture(scope="module")
def wcfg():
    return W.wholeslice_config({"wholeslice": {"p": 1.0}})


@pytest.fixture(scope="module")
def scan(tiny_cache, wcfg):
    return W.load_scan(tiny_cache / "wholescan" / PATIENT)


@pytest.fixture()
def sampler(scan, tiny_cache, wcfg):
    return W.WholeSliceSampler([scan], wcfg, {PATIENT: W.load_candidates(tiny_cache / "wholescan", PATIENT)})


# ----------------------------------------------------------------------------- guards (no data needed)


def test_reserved_and_other_split_patients_are_refused(tmp_path):
    for p in RESERVED:
        with pytest.raises(WholeScanError, match="reserved"):
            W.check_patients([p])
        with pytest.raises(WholeScanError, match="reserved"):
            W.load_scan(tmp_path / p)  # refused before the (absent) files are looked at
        with pytest.raises(WholeScanError, match="reserved"):
            W.load_candidates(tmp_path, p)
        with pytest.raises(WholeScanError, match="reserved"):
            W.build_sampler({"wholeslice": {"patients": [p], "cache": str(tmp_path)}})
        with pytest.raises(WholeScanError, match="reserved"):
            W.build_sampler({"wholeslice": {"patients": ["LIDC-IDRI-0002"], "val_patients": [p], "cache": str(tmp_path)}})
    with pytest.raises(ValueError, match="test"):
        W.check_patients(["LIDC-IDRI-0003"], "train")  # a test patient
    with pytest.raises(ValueError, match="val"):
        W.check_patients(["LIDC-IDRI-0004"], "train")
    with pytest.raises(ValueError, match="train"):
        W.check_patients(["LIDC-IDRI-0002"], "val")
    assert W.check_patients(["LIDC-IDRI-0002", "LIDC-IDRI-0010"]) == ["LIDC-IDRI-0002", "LIDC-IDRI-0010"]
    with pytest.raises(ValueError, match="unknown"):
        W.wholeslice_config({"wholeslice": {"p_positiv": 0.3}})
    with pytest.raises(ValueError, match="exceed"):
        W.wholeslice_config({"wholeslice": {"p_positive": 0.7, "p_hard_negative": 0.5}})


def test_pool_merges_keeps_top_k_and_draws_by_score():
    pool = W.HardNegativePool(size=3, power=2.0, merge_mm=10.0)

    def e(score, x, k=5, patient="a"):
        return {"patient": patient, "k0": k, "k1": k, "centre_lps": [x, 0.0, 0.0], "score": score, "source": "mined"}

    assert pool.add([e(0.5, 0.0), e(0.4, 100.0), e(0.3, 200.0)]) == {"new": 3, "updated": 0, "kept": 3}
    r = pool.add([e(0.9, 3.0, k=6), e(0.8, 300.0), e(0.1, 400.0, patient="b")])  # first updates the 0.5 entry
    assert r == {"new": 2, "updated": 1, "kept": 2}
    assert [x["score"] for x in pool.entries] == [0.9, 0.8, 0.4]  # the lowest (0.3, 0.1) are replaced
    rng = np.random.default_rng(0)
    n = np.zeros(3)
    for _ in range(4000):
        ent, k = pool.draw(rng)
        n[pool.entries.index(ent)] += 1
        assert ent["k0"] <= k <= ent["k1"]
    w = np.array([0.81, 0.64, 0.16])
    np.testing.assert_allclose(n / n.sum(), w / w.sum(), atol=0.03)
    p2 = W.HardNegativePool(3)
    p2.load_state_dict(json.loads(json.dumps(pool.state_dict())))
    assert p2.entries == pool.entries


# ----------------------------------------------------------------------------- real CT


class _Recorder(torch.nn.Module):
    """Stands in for the detector in ``run_slice_detections``: records its inputs, detects nothing."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, images):
        self.inputs += [x.numpy().copy() for x in images]
        return [{"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0)} for _ in images]


def test_whole_slice_image_is_the_inference_input(scan):
    from NoduleMTLLib.detection import infer
    from NoduleMTLLib.detection import preprocess as pp

    rec = _Recorder()
    sd = infer.run_slice_detections(scan.ct, rec, coarse_factors=())  # the search's own lung mask, plan, batches, crops
    assert sd.slices_searched == scan.slices and len(rec.inputs) == len(scan.slices) == 12
    assert sd.crop_yx == scan.crop_yx
    pre = pp.preprocess_ct(scan.ct)  # the whole-volume preprocessing of section 3.2
    for k, seen in zip(sd.slices_searched, rec.inputs):
        x, (y0, y1, x0, x1) = scan.image(k)
        assert x.dtype == np.float32 and x.shape == seen.shape
        np.testing.assert_array_equal(x, seen)
        np.testing.assert_array_equal(x, pre.stack(k)[:, y0:y1, x0:x1])
    assert not scan.reverse and scan.load_s["lung_mask"] >= 0


def test_targets_on_nodule_and_far_slices(scan, wcfg):
    lab = scan.labels
    k4 = int(np.argmax((lab == 4).sum((1, 2))))
    s = W.whole_slice_sample(scan, k4, wcfg, None)
    y0, y1, x0, x1 = scan.crop_of(k4)
    assert s.image.shape[-2:] == (y1 - y0, x1 - x0)
    jj, ii = np.nonzero(lab[k4] == 4)
    ref = [ii.min() - x0, jj.min() - y0, ii.max() + 1 - x0, jj.max() + 1 - y0]
    boxes = s.target["boxes"].numpy().tolist()
    assert ref in boxes and len(boxes) == len(s.target["masks"]) == len(s.target["labels"])
    assert s.target["masks"].dtype == torch.uint8 and s.target["masks"].sum() == (lab[k4, y0:y1, x0:x1] > 0).sum()
    far = W.whole_slice_sample(scan, 11, wcfg, None)  # nodules end at local slice 7
    assert far.target["boxes"].shape == (0, 4) and far.target["masks"].shape == (0, *far.image.shape[-2:])
    # augmented: the masks follow the flipped image (same pixels under the masks)
    rng = np.random.default_rng(1)
    m0 = s.target["masks"].numpy().astype(bool).any(0)
    for _ in range(6):
        a = W.whole_slice_sample(scan, k4, wcfg, rng)
        m = a.target["masks"].numpy().astype(bool)
        assert len(m) == len(boxes) and m.sum() == s.target["masks"].sum()
        np.testing.assert_array_equal(np.sort(a.image[2].numpy()[m.any(0)]), np.sort(s.image[2].numpy()[m0]))


def test_hard_negatives_never_from_hits_or_excluded_marks(sampler, scan):
    ent = sampler.pool.entries
    assert sorted(e["score"] for e in ent) == [0.4, 0.9]  # hit, excluded and the two mislabelled ones dropped
    assert sampler.pool_initial["dropped_hit_or_excluded"] == 4
    rng = np.random.default_rng(0)
    cfg = dict(sampler.cfg, p_positive=0.0, p_hard_negative=1.0)
    sampler.cfg = cfg
    ks = set()
    for _ in range(30):
        s = sampler.draw(rng)
        k = int(s.tiles[0].split("@")[1].split(":")[0])
        assert s.tiles[0].split(":")[1].startswith("hard") and (7 <= k <= 9 or 0 <= k <= 2)
        ks.add(k)
    assert len(ks) > 2


class _FakeDetector(torch.nn.Module):
    """Returns, on each slice, a box on nodule 4 (when on the slice), one on the excluded mark,
    one on a lung point (a true false positive) and a weak one; boxes in the crop's pixels."""

    def __init__(self, scan):
        super().__init__()
        import types

        self.roi_heads = types.SimpleNamespace(detections_per_img=100)
        self.scan = scan
        self.lookup = {hashlib.sha1(scan.image(k)[0].tobytes()).hexdigest(): k for k in scan.slices}

    def forward(self, images):
        out = []
        for x in images:
            k = self.lookup[hashlib.sha1(x.numpy().tobytes()).hexdigest()]
            y0, _, x0, _ = self.scan.crop_of(k)

            def box(i, j, r=6.0, x0=x0, y0=y0):
                return [i - x0 + 0.5 - r, j - y0 + 0.5 - r, i - x0 + 0.5 + r, j - y0 + 0.5 + r]

            b, s = [box(*FP_IJ), box(*FP2_IJ)], [0.8, 0.1]
            if abs(k - 6) <= 2:  # within the excluded mark's 5 mm (2.5 mm slices)
                b.append(box(*EXC_IJ))
                s.append(0.95)
            jj, ii = np.nonzero(self.scan.labels[k] == 4)
            if len(jj):
                b.append(box(ii.mean(), jj.mean()))
                s.append(0.99)
            out.append({"boxes": torch.tensor(b, dtype=torch.float32), "scores": torch.tensor(s)})
        return out


def test_mining_pushes_only_false_positives(sampler, scan):
    sampler.pool.entries = []
    sampler.cfg = dict(sampler.cfg, mine_slices=8, mine_min_score=0.3)
    rec = sampler.mine(_FakeDetector(scan), np.random.default_rng(3), "cpu", iteration=7)
    assert rec["event"] == "mine" and rec["slices"] == 8 and rec["iteration"] == 7
    assert rec["false_positives"] == 8 and rec["detections"] > 8  # one FP per slice; the rest are nodule / excluded
    assert all(e["source"] == "mined" and e["iteration"] == 7 for e in sampler.pool.entries)
    fp = np.array(scan.ct.image.TransformContinuousIndexToPhysicalPoint((*FP_IJ, 0.0)))
    for e in sampler.pool.entries:
        assert np.hypot(*(np.array(e["centre_lps"][:2]) - fp[:2])) < 1.0 and e["score"] == pytest.approx(0.8)
    assert rec["new"] + rec["updated"] == 8 and rec["pool_size"] == rec["new"]


# ----------------------------------------------------------------------------- smoke run


@pytest.mark.slow
def test_smoke_train_with_whole_slices_and_resume(shared_data, tiny_cache, tmp_path, monkeypatch):
    from training import detection as D

    monkeypatch.setenv("NODULEMTL_CACHE", str(tiny_cache))
    cfg = json.loads((Path(D.__file__).resolve().parent / "configs" / "maskrcnn25d_wholeslice.json").read_text())
    cfg.update(iterations=2, batch_size=1, threads=1, eval_every=100, ckpt_every=1, log_every=1, val_max_nodules=2,
               warmup_iterations=1, init_weights=None, init_backbone=None, canvas_sizes=[128])
    cfg["wholeslice"] = dict(cfg["wholeslice"], p=1.0, patients=[PATIENT], val_patients=[], mine_every=1, mine_slices=2,
                             mine_min_score=0.0)
    recs = []
    run = tmp_path / "run"
    D.train(cfg, run, shared_data, limit_nodules=2, log=lambda s: recs.append(json.loads(s)))
    ev = {r["event"] for r in recs}
    assert {"wholeslice_data", "mine", "train", "eval", "done"} <= ev
    assert [r["phase"] for r in recs if r["event"] == "train"] == ["joint", "joint"]
    mines = [r for r in recs if r["event"] == "mine"]
    assert [m["iteration"] for m in mines] == [1, 2]
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["iteration"] == 2 and ck["wholeslice"]["pool"]["entries"] == json.loads(json.dumps(ck["wholeslice"]["pool"]["entries"]))
    pool = ck["wholeslice"]["pool"]["entries"]
    assert len(pool) == mines[-1]["pool_size"]

    recs2 = []
    cfg["iterations"] = 3
    D.train(cfg, run, shared_data, limit_nodules=2, log=lambda s: recs2.append(json.loads(s)))
    assert any(r["event"] == "resumed" and r["iteration"] == 2 for r in recs2)
    m3 = [r for r in recs2 if r["event"] == "mine"]
    assert [m["iteration"] for m in m3] == [3]
    ck2 = torch.load(run / "last.pt", weights_only=True)
    assert ck2["iteration"] == 3 and ck2["wholeslice"]["n_refreshes"] == 3
    assert (run / "best.pt").exists()
