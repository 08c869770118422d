"""Patches around clicks (padding at volume edges, world consistency) and measurements."""

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.core.io import CTVolume, read_ct
from NoduleMTLLib.core.postprocess import axial_diameters, component_near, measure_nodule, nodule_type
from NoduleMTLLib.inference.preprocessing import PAD_HU, normalize_slices
from NoduleMTLLib.inference.roi import PatchGrid, extract_patch, patch_to_ct_region


@pytest.fixture(scope="module")
def sample(repo_dir):
    d = repo_dir / "Resources" / "SampleData"
    ct = read_ct(d / "LIDC-IDRI-0003_crop.nrrd")
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "LIDC-IDRI-0003_crop_labels.nrrd")))
    return ct, lab


def test_patch_on_ct_grid_reproduces_voxels(sample):
    ct, _ = sample
    sp = ct.spacing
    center = ct.image.TransformIndexToPhysicalPoint((90, 100, 24))
    g = PatchGrid(center, (33, 41, 9), sp)  # same spacing, voxel-aligned: no interpolation
    patch = extract_patch(ct, g)
    np.testing.assert_allclose(patch, ct.array[20:29, 80:121, 74:107], atol=1e-3)


def test_patch_of_integer_ct_equals_patch_of_its_float32_copy(sample):
    """extract_patch resamples an integer CT straight into float32 (no whole-CT cast): the
    values are bit-identical to resampling a float32 copy (interpolation runs in double),
    for zoomed grids at random, not voxel-aligned positions (some reaching past the volume
    edge, padded), int16 and int32 CTs."""
    ct, _ = sample
    rng = np.random.default_rng(0)
    lo = np.asarray(ct.image.TransformIndexToPhysicalPoint((0, 0, 0)))
    hi = np.asarray(ct.image.TransformIndexToPhysicalPoint([s - 1 for s in ct.image.GetSize()]))
    for pixel in (sitk.sitkInt16, sitk.sitkInt32):
        integer = CTVolume(sitk.Cast(ct.image, pixel))
        floating = CTVolume(sitk.Cast(ct.image, sitk.sitkFloat32))
        for n in range(6):
            zoom = (1.0, 2.0, 4.0)[n % 3]
            centre = tuple(float(v) for v in lo + rng.random(3) * (hi - lo))
            g = PatchGrid(centre, (96, 96, 13), (0.8 * zoom, 0.8 * zoom, 1.7))
            a, b = extract_patch(integer, g), extract_patch(floating, g)
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_array_equal(a, b)


def test_patch_padded_at_volume_edge(sample):
    """A click near the corner of a tight crop: the part outside the CT is air, the rest is CT."""
    ct, _ = sample
    corner = ct.image.TransformIndexToPhysicalPoint((0, 0, 0))
    g = PatchGrid(corner, (21, 21, 5), ct.spacing)
    patch = extract_patch(ct, g)
    assert patch.shape == (5, 21, 21)
    assert np.all(patch[:2] == PAD_HU) and np.all(patch[:, :10, :] == PAD_HU) and np.all(patch[:, :, :10] == PAD_HU)
    np.testing.assert_allclose(patch[2:, 10:, 10:], ct.array[0:3, 0:11, 0:11], atol=1e-3)


def test_patch_is_world_consistent_under_reorientation(sample):
    """Same world patch from the CT and from a flipped-axes copy (non-identity direction)."""
    ct, _ = sample
    flipped = CTVolume(sitk.DICOMOrient(ct.image, "RAI"))
    c = ct.image.TransformContinuousIndexToPhysicalPoint((88.3, 120.7, 20.2))
    g = PatchGrid(c, (48, 48, 7), (0.8, 0.8, 2.5))
    np.testing.assert_allclose(extract_patch(ct, g), extract_patch(flipped, g), atol=1e-2)


def test_patch_back_to_ct_grid(sample):
    """Reference mask -> patch (0.8 mm grid) -> back onto the CT grid overlaps itself (Dice > 0.9)."""
    ct, lab = sample
    m = (lab == 2)
    mimg = sitk.GetImageFromArray(m.astype(np.float32)); mimg.CopyInformation(ct.image)
    c = np.array(np.nonzero(m)).mean(1)[::-1]
    center = ct.image.TransformContinuousIndexToPhysicalPoint(c.tolist())
    g = PatchGrid(center, (96, 96, 31), (0.8, 0.8, 2.5))
    patch = sitk.GetArrayFromImage(sitk.Resample(mimg, g.reference(), sitk.Transform(), sitk.sitkLinear, 0.0))
    region, sl = patch_to_ct_region(patch, g, ct)
    back = np.zeros_like(m); back[sl] = region > 0.5
    from NoduleMTLLib.core.metrics import dice
    assert dice(back, m) > 0.9


def test_component_near_click(sample):
    ct, lab = sample
    mask = lab > 0
    z, y, x = np.argwhere(lab == 3)[0]
    comp = component_near(mask, (z, y, x), ct.spacing[::-1], 5.0)
    assert np.array_equal(comp, lab == 3)
    # a click 3 voxels (~2.5 mm) beside nodule 3 still finds it; far away finds nothing
    vox = np.argwhere(lab == 3)
    zz, yy, xx = vox[np.argmin(vox[:, 1])]  # the nodule's most anterior voxel
    assert np.array_equal(component_near(mask, (zz, yy - 3, xx), ct.spacing[::-1], 5.0), lab == 3)
    assert not component_near(mask, (zz, yy - 8, xx), ct.spacing[::-1], 5.0).any()  # 6.6 mm away
    assert not component_near(mask, (0, 0, 0), ct.spacing[::-1], 5.0).any()



def test_component_near_on_its_box_equals_the_whole_grid_rule(sample):
    """The cropped implementation gives what labelling + distance transform of the whole grid
    give (real CT: lung vessels and nodules above -400 HU, seeds in, near and far from them)."""
    from scipy import ndimage as ndi
    from skimage import measure

    def whole_grid(mask, seed, spacing, dmax):
        lab = measure.label(mask, connectivity=3)
        if lab[seed] > 0:
            return lab == lab[seed]
        dist, inds = ndi.distance_transform_edt(lab == 0, sampling=spacing, return_indices=True)
        if dist[seed] > dmax:
            return np.zeros_like(mask)
        return lab == lab[tuple(int(inds[a][seed]) for a in range(3))]

    ct = sample[0]
    arr = np.asarray(ct.array)[:, 100:260, 100:260]
    mask = arr > -400
    mask[:, :40, :] = False  # a region without mask voxels: seeds there are outside the mask's box
    rng = np.random.default_rng(0)
    seeds = [tuple(int(rng.integers(0, n)) for n in arr.shape) for _ in range(12)]
    sp = ct.spacing[::-1]
    for seed in seeds:
        for dmax in (3.0, 30.0):
            assert np.array_equal(component_near(mask, seed, sp, dmax), whole_grid(mask, seed, sp, dmax)), (seed, dmax)

def test_diameters_of_known_shapes(sample):
    """A 21-pixel-wide square (0.82 mm pixels): long axis is its diagonal, short axis its width."""
    ct, _ = sample
    m = np.zeros(ct.shape_zyx, bool)
    m[10, 50:71, 60:81] = True
    s = ct.spacing[0]
    long_ax, short_ax = axial_diameters(m, ct)
    assert long_ax == pytest.approx(21 * s * np.sqrt(2), rel=1e-6)
    assert short_ax == pytest.approx(21 * s * np.sqrt(2), rel=1e-6)  # perpendicular to a diagonal: the other diagonal
    m[:] = False
    m[10, 60, 40:90] = True  # a 50 x 1 pixel line
    long_ax, short_ax = axial_diameters(m, ct)
    assert long_ax == pytest.approx(np.hypot(50 * s, s), rel=1e-6)
    # perpendicular to the diagonal a w x h rectangle measures 2wh / sqrt(w^2 + h^2)
    assert short_ax == pytest.approx(2 * 50 * s / np.hypot(50, 1), rel=1e-6)


def test_measurements_of_real_nodule(sample, shared_data):
    """Consensus mask of LIDC-IDRI-0003 nodule 2 vs the readers' figures in nodules.csv."""
    import csv
    ct, lab = sample
    rows = {int(r["nodule"]): r for r in csv.DictReader(open(shared_data / "whole_ct/lidc/LIDC-IDRI-0003/nodules.csv"))}
    m = measure_nodule(lab == 2, ct)
    assert m["volume_mm3"] == pytest.approx(float(rows[2]["volume_mm3"]), rel=0.05)
    assert m["diameter_mm"] == pytest.approx(float(rows[2]["diameter_mm"]), rel=0.25)
    assert 0 < m["short_axis_mm"] <= m["diameter_mm"]
    assert m["centroid_lps_mm"] == pytest.approx((float(rows[2]["center_lps_x"]), float(rows[2]["center_lps_y"]),
                                                  float(rows[2]["center_lps_z"])), abs=2.0)
    assert m["type"] in ("solid", "part-solid")  # texture rating 4 (solid/mixed)
    assert -600 < m["mean_hu"] < 100


def test_nodule_type_thresholds():
    assert nodule_type(0.05) == "ground-glass"
    assert nodule_type(0.4) == "part-solid"
    assert nodule_type(0.9) == "solid"


def test_normalisation_is_affine_invariant(sample):
    """The PNG training slices are a*HU+b: normalisation must give the same input either way."""
    import torch
    ct, _ = sample
    x = torch.from_numpy(ct.array[20:24, :96, :96].astype(np.float32))[:, None]
    a = normalize_slices(x)
    b = normalize_slices(0.1 * x + 102.4)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert float(a.min()) >= -0.5 and float(a.max()) <= 1.5


def test_truncate_axial_leak_keeps_tips_and_cuts_tubes():
    """Per-slice areas 0,1,2,9,9,9,1,1,1 from slice 4: downwards the tapering tip (2, 1) stays;
    upwards the thin tube (1, 1, 1: < 20 % of 9 on consecutive slices) is cut after its first slice."""
    from NoduleMTLLib.core.postprocess import truncate_axial_leak
    c = np.zeros((9, 3, 3), bool)
    for z, a in enumerate([0, 1, 2, 9, 9, 9, 1, 1, 1]):
        c[z].flat[:a] = True
    out = truncate_axial_leak(c, 4)
    assert out.reshape(9, -1).sum(1).tolist() == [0, 1, 2, 9, 9, 9, 1, 0, 0]
    assert not (out & ~c).any()


def _disk_stack(radii, centers=None, n=64):
    """bool (z, y, x): a disk of the given radius (px) per slice, centred at (32, 32) or ``centers``."""
    yy, xx = np.mgrid[:n, :n]
    out = np.zeros((len(radii), n, n), bool)
    for z, r in enumerate(radii):
        cy, cx = centers[z] if centers else (32, 32)
        out[z] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def test_cut_at_neck_cuts_regrowth_beyond_a_neck():
    """A mass (slices 4-8) joined through a one-slice neck (slice 3) to a wide, displaced structure
    (slices 0-2, like A0001's hilum): cut after the neck; the mass and the neck are kept."""
    from NoduleMTLLib.core.postprocess import cut_at_neck

    radii = [9, 10, 9, 3, 10, 12, 12, 10, 6]
    centers = [(32, 22)] * 3 + [(32, 28)] + [(32, 32)] * 5
    c = _disk_stack(radii, centers)
    out = cut_at_neck(c, 6, pixel_area_mm2=3.2 ** 2)
    assert not out[:3].any()
    np.testing.assert_array_equal(out[3:], c[3:])


def test_cut_at_neck_spares_tapering_nodules_and_small_dropouts():
    """A nodule tapering both ways is untouched; so is a small nodule whose mask has a one-slice
    dropout (regrowth of a few mm^2, below the size floor, as LIDC-IDRI-0794 nodule 2)."""
    from NoduleMTLLib.core.postprocess import cut_at_neck

    c = _disk_stack([1, 3, 6, 8, 9, 8, 6, 3, 1])
    np.testing.assert_array_equal(cut_at_neck(c, 4, pixel_area_mm2=0.64), c)
    small = _disk_stack([2, 3, 3, 1, 2, 3, 2])  # dip on slice 3, regrowth 13-29 px at 0.8 mm
    np.testing.assert_array_equal(cut_at_neck(small, 5, pixel_area_mm2=0.64), small)
    # the same profile at 3.2 mm pixels (regrowth >= 100 mm^2) is a neck: cut
    big = _disk_stack([8, 12, 12, 4, 8, 12, 8])
    assert not cut_at_neck(big, 5, pixel_area_mm2=3.2 ** 2)[:3].any()


def test_measure_nodule_on_its_box_equals_the_whole_grid(sample):
    """Measurements are computed on the mask's bounding box: same figures as on the whole grid."""
    from NoduleMTLLib.core.postprocess import SOLID_HU, bounding_box

    ct, lab = sample
    for n in (2, 3):
        mask = lab == n
        box = bounding_box(mask)
        assert box is not None and mask[box].sum() == mask.sum() and not mask[box][0].sum() == 0
        m = measure_nodule(mask, ct)
        hu = np.asarray(ct.array)[mask].astype(float)
        vox = float(np.prod(ct.spacing))
        assert m["volume_mm3"] == pytest.approx(mask.sum() * vox)
        assert m["mean_hu"] == pytest.approx(hu.mean()) and m["solid_fraction"] == pytest.approx((hu >= SOLID_HU).mean())
        assert (m["diameter_mm"], m["short_axis_mm"]) == pytest.approx(axial_diameters(mask, ct))
        c = np.array(np.nonzero(mask)).mean(1)
        want = ct.image.TransformContinuousIndexToPhysicalPoint([float(c[2]), float(c[1]), float(c[0])])
        assert m["centroid_lps_mm"] == pytest.approx(want)
    assert bounding_box(np.zeros((3, 4, 5), bool)) is None
    with pytest.raises(ValueError, match="empty"):
        measure_nodule(np.zeros(lab.shape, bool), ct)
