"""HU training sources of the click networks (issue 13): ``lidc_vois`` and whole scans as
:class:`training.data.SliceNodule` slices, and their augmentation.  Real data only
(``../shared/data``)."""


import numpy as np
import pytest
import SimpleITK as sitk

from training.click2d import add_hu_sources, hu_augment
from training.data import USER_CASE_HU_OFFSET, load_split, load_voi_nodules, load_wholescan_nodules


@pytest.fixture(scope="module")
def vois(shared_data):
    return load_voi_nodules(shared_data, {"LIDC-IDRI-0003"})  # a test patient: fine for a unit test, never for training


def test_voi_nodules_are_the_vois_hu_and_masks(vois, shared_data):
    import csv
    rows = [r for r in csv.DictReader(open(shared_data / "lidc_vois" / "labels.csv")) if r["patient_id"] == "LIDC-IDRI-0003"]
    assert len(vois) == len(rows) > 0
    for nd, r in zip(vois, rows):
        img = sitk.ReadImage(str(shared_data / "lidc_vois" / r["image"]))
        hu = sitk.GetArrayFromImage(img).astype(np.float32)
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "lidc_vois" / r["mask"]))) > 0
        assert nd.image.shape == (len(hu), 128, 128) and nd.image.dtype == np.float32
        # every voxel of the mask is kept, and the HU under it are the VOI's (+ offset), air around the crop
        assert nd.consensus.sum() == m.sum()
        np.testing.assert_allclose(np.sort(nd.image[nd.consensus]), np.sort(hu[m] + USER_CASE_HU_OFFSET))
        assert nd.image.min() >= 0.0 and nd.image[:, 0, 0].max() == 0.0  # corner = padding = air (-1024 HU)
        assert nd.spacing_mm == pytest.approx(img.GetSpacing()[0]) and nd.slice_thickness_mm == pytest.approx(img.GetSpacing()[2])
        assert nd.malignancy == float(r["Malignancy_value"]) and nd.ratings["texture"] == float(r["Texture_value"])


def test_hu_augment_thick_slices_and_noise(vois):
    nd = max(vois, key=lambda n: len(n.image))
    k = len(nd.image) // 2
    rng = np.random.default_rng(0)
    same = hu_augment(nd, k, {"p_thick_slice": 0.0, "max_noise_hu": 0.0}, rng)
    assert np.array_equal(same, nd.image[k])
    thick = hu_augment(nd, k, {"p_thick_slice": 1.0, "max_noise_hu": 0.0}, rng)
    means = [nd.image[max(0, k - r):k + r + 1].mean(0) for r in (1, 2)]
    assert any(np.allclose(thick, m) for m in means)
    noisy = hu_augment(nd, k, {"p_thick_slice": 0.0, "max_noise_hu": 30.0}, np.random.default_rng(1))
    d = noisy - nd.image[k]
    assert noisy.min() >= 0.0 and 0.0 < d[nd.image[k] > 100].std() <= 31.0


def test_wholescan_source_refuses_reserved_patients(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        load_wholescan_nodules(tmp_path, ["LIDC-IDRI-0001"])


def test_wholescan_nodules_keep_real_surroundings(shared_data, tmp_path):
    """Built from the whole LIDC-IDRI-0003 scan (test patient; unit test only), laid out as the
    whole-scan cache: each nodule's slices (+ margins) with real lung around it, not air."""
    src = shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003"
    d = tmp_path / "LIDC-IDRI-0003"
    d.mkdir()
    for f in ("ct.nrrd", "nodules_labels.nrrd"):
        (d / f).symlink_to(src / f)
    import csv
    rows = list(csv.DictReader(open(src / "nodules.csv")))
    with open(d / "nodules.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["nodule", "n_readers", "malignancy_median"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ("nodule", "n_readers", "malignancy_median")})
    nodes = load_wholescan_nodules(tmp_path, ["LIDC-IDRI-0003"], margin_slices=2)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "nodules_labels.nrrd")))
    assert len(nodes) == len(rows)
    for nd, r in zip(nodes, rows):
        n = int(r["nodule"])
        zs = np.nonzero((lab == n).reshape(len(lab), -1).any(1))[0]
        assert len(nd.image) == min(len(lab) - 1, zs[-1] + 2) - max(0, zs[0] - 2) + 1
        assert nd.consensus.sum() == (lab == n).sum()  # the whole nodule, nothing else
        assert not nd.consensus[0].any() or zs[0] < 2  # margin slices hold no nodule
        assert (nd.image[:, :8, :8] > 0).mean() > 0.5  # real tissue / lung in the corners, not padding
    assert [nd.label for nd in nodes] == [1 if float(r["malignancy_median"]) >= 4 else
                                          (0 if float(r["malignancy_median"]) <= 2 else -1) for r in rows]


def test_hu_sources_use_training_patients_only(shared_data, monkeypatch, tmp_path):
    """``add_hu_sources`` loads VOIs of the split's train patients only, and whole scans only of
    patients in both splits' train lists that exist in the cache."""
    monkeypatch.setenv("NODULEMTL_CACHE", str(tmp_path))  # empty cache: no whole scan
    split = load_split()
    out = add_hu_sources({"hu_sources": {"lidc_vois": 2, "wholescan": 3}}, split, shared_data, limit_nodules=5,
                         log=lambda s: None)
    (v, kv), (w, kw) = out
    assert kv == 2 and kw == 3 and w == [] and len(v) == 5
    assert {n.patient_id for n in v} <= set(split["train"])
