"""Nodule insertion inside the whole-slice sampler of ``maskrcnn25d`` (issue 27):
``wholeslice.p_insert`` in ``training/detection_wholeslice.py`` and the config
``training/configs/maskrcnn25d_insert.json``, on real data: a 24-slice slab of the whole
TRAINING scan LIDC-IDRI-0006 (``nodulemtl-train wholescan`` cache) and training patients'
``lidc_vois`` nodules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training import detection_wholeslice as W
from training import insertion as ins

torch.set_num_threads(1)

TRAIN_SCAN = "LIDC-IDRI-0006"  # whole-scan split: train
K0, K1 = 50, 74
REPO = Path(__file__).resolve().parents[2]


def _cache() -> Path:
    return Path(os.environ.get("NODULEMTL_CACHE", "/work/cache")) / "wholescan"


@pytest.fixture(scope="module")
def slab_cache(tmp_path_factory) -> Path:
    """A whole-scan cache folder holding a slab of the training scan (named as the scan, so
    the split guards treat it as the training patient it is)."""
    src = _cache() / TRAIN_SCAN
    if not (src / "ct.nrrd").exists():
        pytest.skip(f"whole training scan cache missing: {src} (nodulemtl-train wholescan)")
    cache = tmp_path_factory.mktemp("cache") / "wholescan"
    d = cache / TRAIN_SCAN
    d.mkdir(parents=True)
    sitk.WriteImage(sitk.ReadImage(str(src / "ct.nrrd"))[:, :, K0:K1], str(d / "ct.nrrd"), True)
    sitk.WriteImage(sitk.ReadImage(str(src / "nodules_labels.nrrd"))[:, :, K0:K1], str(d / "nodules_labels.nrrd"), True)
    (d / "nodules.csv").write_text((src / "nodules.csv").read_text())
    return cache


@pytest.fixture(scope="module")
def vois(shared_data):
    return ins.load_vois(shared_data, limit=30, min_diameter_mm=4.0)


@pytest.fixture(scope="module")
def scan(slab_cache):
    return W.load_scan(slab_cache / TRAIN_SCAN)


def _wcfg(**kw):
    return W.wholeslice_config({"wholeslice": {"p": 1.0, "p_positive": 0.0, "p_hard_negative": 0.0, **kw}})


def test_config_of_the_insert_run():
    cfg = json.loads((REPO / "training" / "configs" / "maskrcnn25d_insert.json").read_text())
    w = W.wholeslice_config(cfg)
    assert 0 < w["p_insert"] <= 1 and w["insert"] == ins.insertion_config(cfg["wholeslice"])
    assert cfg["init_weights"] == "Resources/Weights/maskrcnn25d.safetensors"
    assert not w["patients"] and not w["val_patients"]  # the split's train / val scans
    with pytest.raises(ValueError, match="exceed"):
        _wcfg(p_insert=0.5, p_positive=0.3, p_hard_negative=0.3)
    with pytest.raises(ValueError, match="unknown wholeslice.insert"):
        _wcfg(p_insert=0.5, insert={"scale_mx": 2.0})
    assert _wcfg()["insert"] is None  # no insertion unless asked for


def test_p_insert_needs_an_inserter(scan):
    with pytest.raises(ValueError, match="Inserter"):
        W.WholeSliceSampler([scan], _wcfg(p_insert=0.5))


def test_p_insert_zero_keeps_the_old_draws(scan, vois):
    """With p_insert = 0 an inserter changes nothing: the same generator gives the same samples."""
    c = _wcfg(p_positive=0.3, p_hard_negative=0.0)
    a = W.WholeSliceSampler([scan], c)
    b = W.WholeSliceSampler([scan], c, inserter=ins.Inserter(vois, ins.insertion_config({})))
    ra, rb = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(4):
        sa, sb = a.draw(ra), b.draw(rb)
        assert sa.tiles == sb.tiles and torch.equal(sa.image, sb.image)
        assert ":insert" not in sa.tiles[0]
    assert b.insert_summary()["insert_samples"] == 0


def test_inserted_draws_and_resume_counters(scan, vois):
    c = _wcfg(p_insert=1.0, p_flip=0.0, p_reverse=0.0, insert={"p_thick": 0.5})
    s = W.WholeSliceSampler([scan], c, inserter=ins.Inserter(vois, c["insert"]))
    rng = np.random.default_rng(11)
    n_targets = 0
    for _ in range(6):
        smp = s.draw(rng)
        patient, rest = smp.tiles[0].split("@")
        k, tag = rest.split(":")
        assert patient == TRAIN_SCAN and int(k) in scan.slices and tag.startswith("insert")
        assert smp.image.shape[0] == 5 and smp.image.dtype == torch.float32
        assert float(smp.image.min()) >= 0.0 and float(smp.image.max()) <= 1.0
        x0, _ = scan.image(int(k))
        assert tuple(smp.image.shape[1:]) == x0.shape[1:]  # the search's crop of slice k
        n_targets += len(smp.target["boxes"])
    summ = s.insert_summary()
    assert summ["insert_samples"] == 6 and summ["inserted"] >= 6
    assert sum(summ["insert_factors"].values()) == 6 and set(summ["insert_factors"]) <= {"1", "2", "3"}
    assert n_targets >= 0.6 * summ["inserted"]  # pasted nodules are the detector's targets
    st = json.loads(json.dumps(s.state_dict()))  # plain values (checkpoint-safe)
    s2 = W.WholeSliceSampler([scan], c, inserter=ins.Inserter(vois, c["insert"]))
    s2.load_state_dict(st)
    assert s2.insert_summary() == summ


def test_build_sampler_reads_only_training_vois(slab_cache, shared_data):
    recs = []
    cfg = {"wholeslice": {"p": 1.0, "p_insert": 0.5, "p_positive": 0.2, "p_hard_negative": 0.2, "insert_limit_vois": 12,
                          "patients": [TRAIN_SCAN], "cache": str(slab_cache)}}
    s = W.build_sampler(cfg, recs.append, shared_data)
    assert s.inserter is not None and len(s.inserter.vois) == recs[0]["insert_vois"] > 0
    allowed = ins.insertion_patients()
    assert {v.patient for v in s.inserter.vois} <= allowed
    banned = {"LIDC-IDRI-0001", "LIDC-IDRI-0009", "LIDC-IDRI-0003", "LIDC-IDRI-0005", "LIDC-IDRI-0004", "LIDC-IDRI-0007"}
    assert not allowed & banned
    from training.data import load_split

    sp = load_split()
    assert not allowed & (set(sp["val"]) | set(sp["test"]))


@pytest.mark.slow
def test_smoke_train_with_insertion_and_resume(shared_data, slab_cache, tmp_path, monkeypatch):
    from training import detection as D

    monkeypatch.setenv("NODULEMTL_CACHE", str(slab_cache.parent))
    cfg = json.loads((REPO / "training" / "configs" / "maskrcnn25d_insert.json").read_text())
    cfg.update(iterations=2, batch_size=2, threads=1, eval_every=100, ckpt_every=1, log_every=1, val_max_nodules=2,
               warmup_iterations=1, init_weights=None, init_backbone=None, canvas_sizes=[128], max_minutes=None)
    cfg["wholeslice"] = dict(cfg["wholeslice"], p=1.0, p_insert=1.0, p_positive=0.0, p_hard_negative=0.0,
                             patients=[TRAIN_SCAN], val_patients=[], val_random_slices=0, insert_limit_vois=10,
                             mine_every=2, mine_slices=1)
    recs = []
    run = tmp_path / "run"
    D.train(cfg, run, shared_data, limit_nodules=2, log=lambda s: recs.append(json.loads(s)))
    data = next(r for r in recs if r["event"] == "wholeslice_data")
    assert data["insert_vois"] == 10 and data["train_scans"] == [TRAIN_SCAN]
    mine = [r for r in recs if r["event"] == "mine"]
    assert mine and mine[-1]["insert_samples"] == 4  # 2 iterations x batch 2, every item inserted
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["iteration"] == 2 and ck["wholeslice"]["insert"]["insert_samples"] == 4
    cfg["iterations"] = 3
    recs2 = []
    D.train(cfg, run, shared_data, limit_nodules=2, log=lambda s: recs2.append(json.loads(s)))
    assert any(r["event"] == "resumed" and r["iteration"] == 2 for r in recs2)
    ck2 = torch.load(run / "last.pt", weights_only=True)
    assert ck2["iteration"] == 3 and ck2["wholeslice"]["insert"]["insert_samples"] == 6  # counted across the resume


def test_validation_only_whole_scan_evaluation_reads_no_test_scan(tmp_path, monkeypatch):
    """``python -m training.evaluate_detection --scans val`` (how the insertion run is compared
    with the shipped detector): only the validation scans of the cache reach the search."""
    from training import evaluate_detection as E

    seen = []

    def fake_group(model, folders, *args, **kw):
        seen.extend(Path(f).name for f in folders)
        return {"scans": [], "totals": {}, "froc": None, "froc_any_reader": None}

    monkeypatch.setattr(E, "_lidc_group", fake_group)
    monkeypatch.setattr(E, "evaluate_pet", lambda *a, **k: pytest.fail("a Lung-PET-CT-Dx test scan was read"))
    with pytest.raises(FileNotFoundError, match="validation scans"):
        E.evaluate_whole_ct(None, data=tmp_path / "nodata", cache=tmp_path, scans="val")
    for p in E.VAL_SCANS:
        (tmp_path / p).mkdir()
        (tmp_path / p / "ct.nrrd").write_bytes(b"")
    rep = E.evaluate_whole_ct(None, data=tmp_path / "nodata", cache=tmp_path, scans="val", log=lambda s: None)
    assert seen == list(E.VAL_SCANS) and rep["test"] is None and rep["lung_pet_ct_dx"] == []
    assert rep["scans"] == "val" and E.summary_lines({**rep, "val": None})
    assert E.build_parser().parse_args(["--scans", "val"]).scans == "val"
    with pytest.raises(ValueError, match="scans"):
        E.evaluate_whole_ct(None, cache=tmp_path, scans="test")
