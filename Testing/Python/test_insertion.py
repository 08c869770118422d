"""Nodule insertion (training/insertion.py, issue 27) on real data: a whole TRAINING scan
(LIDC-IDRI-0006 from the ``nodulemtl-train wholescan`` cache, a slab of 24 slices) and
training patients' ``lidc_vois`` nodules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from training import insertion as ins

TRAIN_SCAN = "LIDC-IDRI-0006"  # whole-scan split: train
K0, K1 = 50, 74


def _cache() -> Path:
    return Path(os.environ.get("NODULEMTL_CACHE", "/work/cache")) / "wholescan"


@pytest.fixture(scope="module")
def vois(shared_data):
    v = ins.load_vois(shared_data, limit=40, min_diameter_mm=5.0)
    assert len(v) >= 10
    return v


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from training.detection_wholeslice import load_scan

    src = _cache() / TRAIN_SCAN
    if not (src / "ct.nrrd").exists():
        pytest.skip(f"whole training scan cache missing: {src} (nodulemtl-train wholescan)")
    d = tmp_path_factory.mktemp("ws") / TRAIN_SCAN
    d.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(src / "ct.nrrd"))[:, :, K0:K1], str(d / "ct.nrrd"), True)
    sitk.WriteImage(sitk.ReadImage(str(src / "nodules_labels.nrrd"))[:, :, K0:K1], str(d / "nodules_labels.nrrd"), True)
    (d / "nodules.csv").write_text((src / "nodules.csv").read_text())
    return load_scan(d)


def _spacing_zyx(scan):
    sx, sy, sz = scan.ct.spacing
    return (float(sz), float(sy), float(sx))


def test_only_training_patients_are_inserted(shared_data):
    allowed = ins.insertion_patients()
    for p in ("LIDC-IDRI-0001", "LIDC-IDRI-0009", "LIDC-IDRI-0003", "LIDC-IDRI-0004", "LIDC-IDRI-0005", "LIDC-IDRI-0007"):
        assert p not in allowed
        with pytest.raises(ValueError, match="not training patients"):
            ins.load_vois(shared_data, patients=[p])
    v = ins.load_vois(shared_data, limit=5)
    assert v and all(x.patient in allowed for x in v)


def test_transform_scales_the_nodule_volume(vois):
    v = max(vois, key=lambda x: x.mask.sum())
    vol_in = v.mask.sum() * np.prod(v.spacing_zyx)
    grid = (1.25, 0.7, 0.7)
    vols = {s: ins.transform_voi(v, grid, s, angle_deg=37.0).mask.sum() * np.prod(grid) for s in (1.0, 2.0)}
    assert vols[1.0] == pytest.approx(vol_in, rel=0.3)
    assert vols[2.0] / vols[1.0] == pytest.approx(8.0, rel=0.25)
    n = ins.transform_voi(v, grid, 1.0)
    assert n.weight[n.mask].min() == 1.0 and np.all((n.weight >= 0) & (n.weight <= 1))
    with pytest.raises(ins.InsertionError):
        ins.transform_voi(v, grid, 0.0)


def test_paste_keeps_nodule_hu_inside_and_background_away(scan, vois):
    hu0 = scan.ct.array.astype(np.float32)
    lung = scan.lung.labels > 0
    k = 12
    rng = np.random.default_rng(1)
    nod = ins.transform_voi(vois[3], _spacing_zyx(scan), 1.2, 20.0)
    j, i = ins.sample_centre(lung[k], hu0[k], _spacing_zyx(scan)[1:], 8.0, "free", rng)
    assert lung[k, j, i]
    hu = hu0.copy()
    cz, cy, cx = nod.centre
    mz, my, mx = (int(round(a.mean())) for a in np.nonzero(nod.mask))
    pasted = ins.paste_nodule(hu, nod, (k + cz - mz, j + cy - my, i + cx - mx), lung)
    assert pasted.sum() == nod.mask.sum()  # fully inside the slab
    # inside the mask (in the lung) the scan now holds the nodule's HU
    ov = ins._overlap(hu.shape, nod.hu.shape, (k + cz - mz, j + cy - my, i + cx - mx))
    vs, ns = ov
    inside = nod.mask[ns] & lung[vs]
    np.testing.assert_allclose(hu[vs][inside], nod.hu[ns][inside], atol=1e-3)
    # away from it (outside the blending weight) nothing changed
    support = np.zeros(hu.shape, bool)
    support[vs] = nod.weight[ns] > 0
    assert np.array_equal(hu[~support], hu0[~support])
    assert not np.array_equal(hu[pasted], hu0[pasted])
    # box of the centre slice = box of the mask
    b = ins.mask_box(pasted[k])
    yy, xx = np.nonzero(pasted[k])
    assert tuple(b) == (xx.min(), yy.min(), xx.max() + 1, yy.max() + 1)


def test_juxtapleural_touches_the_lung_border(scan):
    lung = scan.lung.labels > 0
    hu = scan.ct.array
    sp = _spacing_zyx(scan)[1:]
    rng = np.random.default_rng(2)
    d = ndi.distance_transform_edt(lung[12], sampling=sp)
    for _ in range(10):
        j, i = ins.sample_centre(lung[12], hu[12], sp, 5.0, "juxtapleural", rng)
        assert lung[12, j, i] and 0.4 * 5.0 <= d[j, i] <= 0.9 * 5.0 + 1e-6  # a 5 mm-radius disc reaches the border
        j, i = ins.sample_centre(lung[12], hu[12], sp, 5.0, "free", rng)
        assert d[j, i] >= 6.0 and hu[12, j, i] < ins.VESSEL_HU
        jv = ins.sample_centre(lung[12], hu[12], sp, 3.0, "juxtavascular", rng)
        if jv is not None:
            near = hu[12][max(jv[0] - 8, 0):jv[0] + 9, max(jv[1] - 8, 0):jv[1] + 9] > ins.VESSEL_HU
            assert lung[12][jv] and near.any()
    with pytest.raises(ins.InsertionError):
        ins.sample_centre(lung[12], hu[12], sp, 5.0, "mediastinal", rng)


def test_thick_groups():
    g = ins.thick_groups(10, 30, 3)
    assert g.shape == (5, 3) and g[2].tolist() == [9, 10, 11] and g[0].tolist() == [3, 4, 5]
    assert ins.thick_groups(0, 30, 1)[:, 0].tolist() == [0, 0, 0, 1, 2]
    assert ins.thick_groups(10, 30, 2)[2].tolist() == [10, 11]
    assert ins.thick_factors(1.25) == [2, 3, 4, 5, 6] and ins.thick_factors(2.5) == [2, 3]
    with pytest.raises(ValueError):
        ins.thick_groups(40, 30, 2)


def test_inserted_sample_targets_and_unchanged_input(scan, vois):
    from training.detection import targets_from_mask
    from training.detection_wholeslice import wholeslice_config

    wcfg = wholeslice_config({"wholeslice": {"p_flip": 0.0, "p_reverse": 0.0}})
    icfg = {**ins.insertion_config({}), "p_thick": 0.0}
    inserter = ins.Inserter(vois, icfg)
    rng = np.random.default_rng(5)
    k = scan.slices[len(scan.slices) // 2]
    s, info = ins.inserted_sample(scan, k, inserter, wcfg, rng, n=2)
    assert info["factor"] == 1 and len(info["inserted"]) >= 1
    x0, (y0, y1, xa, xb) = scan.image(k)
    x = s.image.numpy()
    assert x.shape == x0.shape
    # the input differs from the plain whole-slice input, and only inside the lung
    diff = np.abs(x - x0).max(0) > 1e-4
    assert diff.any()
    lung_c = (scan.lung.labels[pp_stack(scan, k)][:, y0:y1, xa:xb] > 0).any(0)
    assert not (diff & ~lung_c).any()
    # each pasted nodule on slice k is a target whose box is its mask's box
    boxes = s.target["boxes"].numpy()
    masks = s.target["masks"].numpy().astype(bool)
    assert len(boxes) == len(masks) >= 1
    for b, m in zip(boxes, masks):
        t = targets_from_mask(m, 1)
        np.testing.assert_array_equal(t["boxes"].numpy()[0], b)
        assert (x[2][m] > 0).mean() >= 0.5  # inside the lung-masked input
    # a pasted nodule lies where the input changed
    assert any((diff & m).sum() >= 0.5 * m.sum() for m in masks)
    summ = inserter.summary()
    assert summ["inserted"] == len(info["inserted"]) and summ["insert_samples"] == 1


def pp_stack(scan, k):
    from NoduleMTLLib.detection import preprocess as pp

    return pp.stack_indices(int(k), scan.ct.shape_zyx[0], reverse=scan.reverse)


def test_thick_sample_averages_slices(scan, vois):
    from training.detection_wholeslice import wholeslice_config

    wcfg = wholeslice_config({"wholeslice": {"p_flip": 0.0, "p_reverse": 0.0}})
    inserter = ins.Inserter(vois, {**ins.insertion_config({}), "p_thick": 1.0})
    s, info = ins.inserted_sample(scan, scan.slices[len(scan.slices) // 2], inserter, wcfg, np.random.default_rng(7), n=1)
    assert info["factor"] in ins.thick_factors(_spacing_zyx(scan)[0])
    assert s.tiles[0].endswith(f"x{info['factor']}")
    assert tuple(s.image.shape[1:]) == scan.image(scan.slices[len(scan.slices) // 2])[0].shape[1:]


def test_mass_sample_has_one_mass_sized_target(scan, shared_data):
    """``insert.p_mass`` (issue 27): the first pasted lesion is a solid VOI scaled to ``mass_mm``,
    and it becomes one target whose box spans the mass (the detector learns a mass as one object)."""
    from training.detection_wholeslice import wholeslice_config

    wcfg = wholeslice_config({"wholeslice": {"p_flip": 0.0, "p_reverse": 0.0}})
    inserter = ins.Inserter(ins.load_vois(shared_data, limit=60, min_diameter_mm=12.0),
                            {**ins.insertion_config({"insert": {"p_mass": 1.0, "mass_mm": [35.0, 40.0]}}), "p_thick": 0.0})
    assert inserter.mass_vois and all(v.diameter_mm >= 12.0 for v in inserter.mass_vois)
    sy = _spacing_zyx(scan)[1]
    k = scan.slices[len(scan.slices) // 2]
    for seed in range(8):
        s, info = ins.inserted_sample(scan, k, inserter, wcfg, np.random.default_rng(seed), n=1)
        if info["inserted"]:
            break
    assert info["inserted"] and info["inserted"][0]["mass"] and inserter.summary()["insert_masses"] == 1
    boxes = s.target["boxes"].numpy()
    widest = float(np.max(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))) * sy
    assert widest >= 20.0  # a 35-40 mm mass's cross-section on a slice near its centre
    with pytest.raises(ValueError, match="p_mass"):
        ins.insertion_config({"insert": {"p_mass": 1.5}})
