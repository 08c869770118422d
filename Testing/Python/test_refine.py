"""Refinement loop (NoduleMTLLib.inference.refine, training.data.load_user_cases) on the real sample CT.

Data: ``Resources/SampleData/LIDC-IDRI-0003_crop.nrrd`` (real LIDC-IDRI-0003 CT, cropped)
with its two nodules clicked as in the README; the "user edit" is a morphological
erosion / dilation of the click path's own mask, what a Segment Editor Margin effect does.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

from NoduleMTLLib.core.io import CTVolume, InputError, ras_to_lps, read_ct
from NoduleMTLLib.core.postprocess import measure_nodule
from NoduleMTLLib.inference.pipeline import analyze_points
from NoduleMTLLib.inference.refine import (
    LABELS_CSV_COLUMNS,
    RECLASSIFIED_MESSAGE,
    export_for_training,
    malignancy_label,
    reclassify_from_mask,
)

POINTS_RAS = [(-72.5, -77.2, -190.4), (-23.5, 47.6, -172.3)]


@pytest.fixture(scope="module")
def sample_ct(repo_dir) -> CTVolume:
    return read_ct(repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd")


@pytest.fixture(scope="module")
def click(sample_ct):
    torch.manual_seed(0)
    return analyze_points(sample_ct, [ras_to_lps(p) for p in POINTS_RAS], ["lnmsnet"], device="cpu")


def _probs(res):
    return {k: v.malignancy_probability for k, v in res.networks.items()}


@pytest.mark.slow
def test_unedited_mask_reproduces_click_measurements_and_close_probability(sample_ct, click):
    for n in click.nodules:
        assert n.found
        before = n.mask.copy()
        r = reclassify_from_mask(sample_ct, n.mask, ["lnmsnet"], device="cpu", nodule_id=n.id, point_lps=n.point_lps_mm)
        np.testing.assert_array_equal(n.mask, before)  # caller's mask untouched
        assert r.id == n.id and r.found and r.message == RECLASSIFIED_MESSAGE
        assert r.point_lps_mm == n.point_lps_mm
        for key in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu", "solid_fraction", "type"):
            assert getattr(r, key) == getattr(n, key), key
        # same mask, patch centred on the centroid instead of the click: nearly the same answer
        p0, p1 = n.networks["lnmsnet"].malignancy_probability, r.networks["lnmsnet"].malignancy_probability
        assert 0.0 <= p1 <= 1.0
        assert abs(p0 - p1) < 0.1, (n.id, p0, p1)


@pytest.mark.slow
def test_edited_mask_changes_measurements_and_probabilities(sample_ct, click):
    n = click.nodules[1]  # the 11 mm nodule
    base = reclassify_from_mask(sample_ct, n.mask, ["lnmsnet"], device="cpu")
    eroded = ndi.binary_erosion(n.mask, iterations=1)
    dilated = ndi.binary_dilation(n.mask, iterations=2)
    r_er = reclassify_from_mask(sample_ct, eroded, ["lnmsnet"], device="cpu")
    r_di = reclassify_from_mask(sample_ct, dilated, ["lnmsnet"], device="cpu")
    vox = float(np.prod(sample_ct.spacing))
    assert r_er.volume_mm3 == pytest.approx(eroded.sum() * vox)
    assert r_di.volume_mm3 == pytest.approx(dilated.sum() * vox)
    assert r_er.volume_mm3 < base.volume_mm3 < r_di.volume_mm3
    assert r_er.diameter_mm < base.diameter_mm < r_di.diameter_mm
    assert r_er.mean_hu == pytest.approx(measure_nodule(eroded, sample_ct)["mean_hu"])
    pb, pe, pd = (r.networks["lnmsnet"].malignancy_probability for r in (base, r_er, r_di))
    assert abs(pe - pb) > 0.01 and abs(pd - pb) > 0.01, (pb, pe, pd)


@pytest.mark.slow
def test_mtnet_classnet_receives_the_edited_mask(sample_ct, click):
    """A network with a mask-taking classifier (MT-Net Class-net, randomly initialised here:
    no trained weights yet) gets the edited mask as its 2nd input channel, and its own
    segmentation branch is not run."""
    from NoduleMTLLib.models.networks.mtnet import build_mtnet

    torch.manual_seed(0)
    model = build_mtnet("narrow").eval()
    seen, logits, coarse_calls = [], [], []
    model.classnet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    model.classnet.register_forward_hook(lambda mod, args, out: logits.append(out.detach().clone()))
    model.coarse.register_forward_hook(lambda *a: coarse_calls.append(1))
    n = click.nodules[1]
    eroded = ndi.binary_erosion(n.mask, iterations=1)
    r1 = reclassify_from_mask(sample_ct, n.mask, ["mtnet"], networks={"mtnet": model})
    x1, l1 = torch.cat(seen), torch.cat(logits)
    seen.clear(); logits.clear()
    r2 = reclassify_from_mask(sample_ct, eroded, ["mtnet"], networks={"mtnet": model})
    x2, l2 = torch.cat(seen), torch.cat(logits)
    assert not coarse_calls, "MT-Net's segmentation must not run when re-classifying"
    for x in (x1, x2):
        assert x.shape[1:] == (2, 96, 96)
        m = x[:, 1]
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
        assert (m.flatten(1).sum(1) > 0).all(), "only slices covered by the mask are run"
    assert x2[:, 1].sum() < x1[:, 1].sum()  # the eroded mask, not the network's own mask
    # physical area of the mask channel ~ the mask's area on the CT (0.8 mm pixels vs 0.82 mm voxels)
    area_ct = n.mask.sum() * sample_ct.spacing[0] * sample_ct.spacing[1]
    area_patch = float(x1[:, 1].sum()) * 0.8 * 0.8 * sample_ct.spacing[2] / max(sample_ct.spacing[2], 0.8)
    assert area_patch == pytest.approx(area_ct, rel=0.15)
    # the reported probability = sigmoid of the Class-net slice logits weighted by the edited mask's areas
    for r, x, lg in ((r1, x1, l1), (r2, x2, l2)):
        w = x[:, 1].flatten(1).sum(1).double()
        expected = torch.sigmoid((lg.double() * w).sum() / w.sum()).item()
        assert r.networks["mtnet"].malignancy_probability == pytest.approx(expected, abs=1e-4)
    # the Class-net output follows the mask channel (random weights: small but real differences)
    k = min(len(l1), len(l2))
    assert not torch.allclose(l1[:k], l2[:k], atol=1e-6) or len(l1) != len(l2)


@pytest.mark.slow
def test_reclassify_errors(sample_ct, click):
    mask = click.nodules[0].mask
    with pytest.raises(InputError, match="shape"):
        reclassify_from_mask(sample_ct, mask[:-1], ["lnmsnet"], device="cpu")
    with pytest.raises(InputError, match="empty"):
        reclassify_from_mask(sample_ct, np.zeros_like(mask), ["lnmsnet"], device="cpu")
    with pytest.raises(InputError, match="Unknown"):
        reclassify_from_mask(sample_ct, mask, ["nonet"], device="cpu")
    with pytest.raises(InputError, match="No networks"):
        reclassify_from_mask(sample_ct, mask, [], device="cpu")
    with pytest.raises(InputError, match="boolean or integer"):
        reclassify_from_mask(sample_ct, mask.astype(np.float32), ["lnmsnet"], device="cpu")


# ---------------------------------------------------------------------------
# export for training -> load_user_cases -> sample_batch
# ---------------------------------------------------------------------------

def test_malignancy_label_rule_matches_training():
    from training.data import malignancy_label as train_rule

    for r in np.arange(1.0, 5.01, 0.5):
        assert malignancy_label(r) == train_rule(r)


@pytest.mark.slow
def test_export_for_training_files_geometry_and_labels(sample_ct, click, tmp_path):
    n = click.nodules[1]
    edited = ndi.binary_erosion(n.mask, iterations=1)
    out = export_for_training(sample_ct, edited, {"malignancy": 4, "spiculation": 2, "patient_id": "LIDC-IDRI-0003"},
                              tmp_path / "cases", "LIDC-IDRI-0003 nodule 2")
    assert out["case_id"] == "LIDC-IDRI-0003_nodule_2"
    img, msk = sitk.ReadImage(str(out["image"])), sitk.ReadImage(str(out["mask"]))
    assert img.GetPixelID() == sitk.sitkInt16 and msk.GetPixelID() == sitk.sitkUInt8
    assert img.GetSize() == msk.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), sample_ct.spacing)
    np.testing.assert_allclose(img.GetDirection(), sample_ct.image.GetDirection())
    # crop origin is a CT voxel centre; voxels and mask equal the CT's there
    start = sample_ct.image.TransformPhysicalPointToIndex(img.GetOrigin())
    np.testing.assert_allclose(sample_ct.image.TransformIndexToPhysicalPoint(start), img.GetOrigin(), atol=1e-4)
    i, j, k = start
    si, sj, sk = img.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), sample_ct.array[k:k + sk, j:j + sj, i:i + si])
    m = sitk.GetArrayViewFromImage(msk)
    assert m.sum() == edited.sum()
    np.testing.assert_array_equal(m != 0, edited[k:k + sk, j:j + sj, i:i + si])
    with open(out["labels_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and tuple(rows[0])[:len(LABELS_CSV_COLUMNS)] == LABELS_CSV_COLUMNS
    row = rows[0]
    assert row["case_id"] == "LIDC-IDRI-0003_nodule_2" and row["patient_id"] == "LIDC-IDRI-0003"
    assert float(row["malignancy"]) == 4 and row["label"] == "1" and float(row["spiculation"]) == 2
    assert float(row["spacing_z_mm"]) == pytest.approx(2.5) and int(row["n_voxels"]) == edited.sum()
    assert not [p for p in (tmp_path / "cases").iterdir() if p.name.startswith(".tmp")]

    # same id again: refused, nothing changed; overwrite replaces the row
    before = {p.name: p.read_bytes() for p in (tmp_path / "cases").iterdir()}
    with pytest.raises(InputError, match="already"):
        export_for_training(sample_ct, n.mask, {"malignancy": 2}, tmp_path / "cases", "LIDC-IDRI-0003 nodule 2")
    assert {p.name: p.read_bytes() for p in (tmp_path / "cases").iterdir()} == before
    export_for_training(sample_ct, n.mask, {"malignancy": 2}, tmp_path / "cases", "LIDC-IDRI-0003 nodule 2", overwrite=True)
    export_for_training(sample_ct, click.nodules[0].mask, {}, tmp_path / "cases", "nodule1")
    with open(out["labels_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case_id"], r["label"]) for r in rows] == [("LIDC-IDRI-0003_nodule_2", "0"), ("nodule1", "-1")]
    assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(out["mask"]))).sum() == n.mask.sum()


@pytest.mark.slow
def test_export_label_validation(sample_ct, click, tmp_path):
    mask = click.nodules[0].mask
    for labels, msg in (({"malignant": 1}, "Unknown label"), ({"malignancy": 7}, r"\[1, 5\]"),
                        ({"malignancy": 5, "label": 0}, "contradicts"), ({"label": 2}, "label must be"),
                        ({"spiculation": 0}, "spiculation")):
        with pytest.raises(InputError, match=msg):
            export_for_training(sample_ct, mask, labels, tmp_path / "bad", "c1")
    with pytest.raises(InputError, match="empty"):
        export_for_training(sample_ct, np.zeros_like(mask), {}, tmp_path / "bad", "c1")
    assert not (tmp_path / "bad" / "labels.csv").exists()


@pytest.mark.slow
def test_load_user_cases_feeds_sample_batch(sample_ct, click, tmp_path, shared_data):
    from training.augment import sample_batch
    from training.data import load_slice_nodules, load_user_cases

    n = click.nodules[1]
    edited = ndi.binary_erosion(n.mask, iterations=1)
    export_for_training(sample_ct, edited, {"malignancy": 4, "lobulation": 3}, tmp_path, "case_a")
    export_for_training(sample_ct, click.nodules[0].mask, {"malignancy": 1.5}, tmp_path, "case_b")
    cases = load_user_cases(tmp_path)
    assert [c.nodule for c in cases] == ["case_a", "case_b"]
    a = cases[0]
    ks = np.nonzero(edited.reshape(len(edited), -1).any(1))[0]
    assert a.image.shape == a.consensus.shape == (len(ks), 128, 128) and a.image.dtype == np.float32
    assert a.readers.shape == (1, len(ks), 128, 128)
    np.testing.assert_array_equal(a.consensus.reshape(len(ks), -1).sum(1), edited[ks].reshape(len(ks), -1).sum(1))
    # HU + 1024 under the mask: same values as the CT
    hu = sample_ct.array[ks][edited[ks]].astype(np.float32)
    np.testing.assert_allclose(np.sort(a.image[a.consensus]), np.sort(hu + 1024.0))
    assert a.spacing_mm == pytest.approx(sample_ct.spacing[0]) and a.slice_thickness_mm == pytest.approx(2.5)
    assert a.label == 1 and a.malignancy == 4 and a.ratings == {"lobulation": 3.0}
    assert cases[1].label == 0 and cases[1].patient_id == "case_b"

    # the 2D trainers' sampler takes them, mixed with real lidc_slices nodules in one batch
    lidc = load_slice_nodules(shared_data, {"LIDC-IDRI-0003"})[:1]
    assert lidc, "LIDC-IDRI-0003 has nodules in lidc_slices"
    items = [(c, k) for c in cases for k in range(len(c.image))] + [(lidc[0], 0)]
    rng = np.random.default_rng(0)
    x, y = sample_batch([c.image[k] for c, k in items], [c.consensus[k] for c, k in items],
                        [c.spacing_mm for c, _ in items], 96, 0.8, rng)
    assert x.shape == y.shape == (len(items), 1, 96, 96)
    assert torch.isfinite(x).all()
    x0, y0 = sample_batch([a.image[k] for k in range(len(a.image))], list(a.consensus), [a.spacing_mm] * len(a.image),
                          96, 0.8, None)
    # deterministic resampling keeps the mask area (mm^2) within 10 % on the largest slice
    big = int(np.argmax(a.consensus.reshape(len(ks), -1).sum(1)))
    area_src = a.consensus[big].sum() * a.spacing_mm ** 2
    assert float(y0[big].sum()) * 0.8 ** 2 == pytest.approx(area_src, rel=0.1)
    # inside the mask the sampled image is soft tissue (HU + 1024 > 600, i.e. > -424 HU) on average
    assert float(x0[big][y0[big] > 0].mean()) > 600


@pytest.mark.slow
def test_load_user_cases_resamples_oblique_crop(sample_ct, click, tmp_path):
    """A crop on a rotated / anisotropic grid is resampled onto an axial grid with square pixels."""
    from training.data import load_user_cases

    img = sitk.Image(sample_ct.image)
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    img.SetSpacing((0.7, 0.9, 2.5))
    ct = CTVolume(img)
    mask = click.nodules[0].mask
    export_for_training(ct, mask, {"malignancy": 3}, tmp_path, "oblique")
    (case,) = load_user_cases(tmp_path)
    assert case.spacing_mm == pytest.approx(0.7) and case.label == -1
    vol_src = mask.sum() * 0.7 * 0.9 * 2.5
    vol_out = case.consensus.sum() * 0.7 * 0.7 * 2.5
    assert vol_out == pytest.approx(vol_src, rel=0.1)


def test_load_user_cases_errors(tmp_path):
    from training.data import load_user_cases

    with pytest.raises(FileNotFoundError, match="labels.csv"):
        load_user_cases(tmp_path)
    (tmp_path / "labels.csv").write_text("case_id,patient_id,image_file,mask_file,malignancy,label\nx,,x_ct.nrrd,x_mask.nrrd,,-1\n")
    with pytest.raises(FileNotFoundError, match="x_ct.nrrd"):
        load_user_cases(tmp_path)
