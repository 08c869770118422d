"""CT input: formats, geometry round trips (RAS/LPS, directions, spacing), refusals."""

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.core.io import InputError, ijk_to_lps_matrix, ijk_to_ras_matrix, image_from_array, lps_to_ras, ras_to_lps, read_ct


@pytest.fixture(scope="module")
def sample(repo_dir):
    return repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"


def test_ras_lps_round_trip():
    p = (12.5, -40.25, -190.0)
    assert ras_to_lps(p) == (-12.5, 40.25, -190.0)
    assert lps_to_ras(ras_to_lps(p)) == p


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_formats_keep_geometry(sample, tmp_path, ext):
    ct = read_ct(sample)
    out = tmp_path / f"ct{ext}"
    sitk.WriteImage(ct.image, str(out))
    back = read_ct(out)
    np.testing.assert_allclose(back.image.GetOrigin(), ct.image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.image.GetSpacing(), ct.image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.image.GetDirection(), ct.image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(back.array, ct.array)


def test_dicom_series_folder(shared_data):
    ct = read_ct(shared_data / "whole_ct" / "lung_pet_ct_dx_A0002_dicom")
    assert ct.image.GetSize() == (512, 512, 30)
    np.testing.assert_allclose(ct.image.GetSpacing(), (0.646, 0.646, 8.0), atol=1e-3)
    assert ct.dicom_series_uid
    assert ct.array.min() < -900 and ct.array.max() > 200  # HU: air and bone


def test_non_identity_direction_and_matrices(sample):
    """A reoriented (flipped axes) volume keeps world positions: same world point -> same HU."""
    ct = read_ct(sample)
    flipped = sitk.DICOMOrient(ct.image, "RAI")  # x and y axes reversed, direction no longer identity
    assert not np.allclose(flipped.GetDirection(), ct.image.GetDirection())
    world = ct.image.TransformIndexToPhysicalPoint((100, 170, 20))
    idx2 = flipped.TransformPhysicalPointToIndex(world)
    assert ct.image[100, 170, 20] == flipped[idx2]
    # IJK->LPS/RAS matrices agree with SimpleITK
    m = ijk_to_lps_matrix(flipped)
    np.testing.assert_allclose(m @ np.array([*idx2, 1.0]), [*world, 1.0], atol=1e-6)
    r = ijk_to_ras_matrix(flipped) @ np.array([*idx2, 1.0])
    np.testing.assert_allclose(r[:3], lps_to_ras(world), atol=1e-6)
    # and back from array + matrix (the Slicer boundary path)
    img = image_from_array(sitk.GetArrayFromImage(flipped), m)
    np.testing.assert_allclose(img.GetDirection(), flipped.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(img.GetOrigin(), flipped.GetOrigin(), atol=1e-9)


def test_anisotropic_spacing_round_trip(sample, tmp_path):
    ct = read_ct(sample)
    img = sitk.Image(ct.image)
    img.SetSpacing((0.5, 0.9, 3.0))
    p = tmp_path / "aniso.nrrd"
    sitk.WriteImage(img, str(p))
    back = read_ct(p)
    assert back.spacing == pytest.approx((0.5, 0.9, 3.0))
    assert back.world_lps_to_index(img.TransformIndexToPhysicalPoint((3, 4, 5))) == pytest.approx((3, 4, 5))


def test_refuses_2d_image(shared_data):
    png = next((shared_data / "lidc_slices" / "nodules").glob("*_image.png"))
    with pytest.raises(InputError, match="2D|single slice"):
        read_ct(png)


def test_refuses_label_map(repo_dir):
    with pytest.raises(InputError, match="label map"):
        read_ct(repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop_labels.nrrd")


def test_refuses_non_hu_volume(sample, tmp_path):
    ct = read_ct(sample)
    shifted = sitk.Cast(ct.image, sitk.sitkFloat32) + 2000.0  # no air below -500: not HU
    p = tmp_path / "shifted.nrrd"
    sitk.WriteImage(shifted, str(p))
    with pytest.raises(InputError, match="Hounsfield|HU"):
        read_ct(p)


def test_refuses_missing_and_corrupt(tmp_path, sample):
    with pytest.raises(InputError, match="not found"):
        read_ct(tmp_path / "nope.nrrd")
    bad = tmp_path / "corrupt.nrrd"
    bad.write_bytes(sample.read_bytes()[:5000])  # truncated
    with pytest.raises(InputError, match="Cannot read"):
        read_ct(bad)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(InputError, match="No DICOM series"):
        read_ct(empty)


def _result_from_labels(lab: np.ndarray, ids) -> "object":
    from NoduleMTLLib.core.results import AnalysisResult, NoduleResult

    nods = []
    for i in ids:
        n = NoduleResult(id=int(i), point_lps_mm=(0.0, 0.0, 0.0), found=True)
        n.mask = lab == i
        nods.append(n)
    return AnalysisResult(input={}, run={"networks": []}, nodules=nods)


def test_segmentation_dict_fast_path_equals_slicerio_add_segment(repo_dir):
    """Disjoint nodules go into one layer directly; the result equals slicerio.add_segment's,
    segment by segment (labels, layer, extent, fields) and voxel by voxel; overlapping
    nodules take slicerio's layered path."""
    import slicerio

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.outputs.files import segmentation_dict

    d = repo_dir / "Resources" / "SampleData"
    ct = read_ct(d / "LIDC-IDRI-0003_crop.nrrd")
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "LIDC-IDRI-0003_crop_labels.nrrd")))
    ids = [int(v) for v in np.unique(lab) if v]
    assert len(ids) >= 2
    res = _result_from_labels(lab, ids[::-1])  # not in label order
    fast = segmentation_dict(res, ct)

    # reference: the previous implementation (union box, slicerio.add_segment per nodule)
    union = np.logical_or.reduce([n.mask for n in res.nodules])
    zz, yy, xx = np.nonzero(union)
    lo = np.array([xx.min(), yy.min(), zz.min()]); hi = np.array([xx.max(), yy.max(), zz.max()]) + 1
    ref = slicerio.create_segmentation(tuple(int(v) for v in hi - lo), np.eye(4))
    for n, f in zip(res.nodules, fast["segments"]):
        base = {k: v for k, v in f.items() if k not in ("labelValue", "layer", "extent")}
        slicerio.add_segment(ref, n.mask[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]].transpose(2, 1, 0), base)
    assert fast["referenceImageExtentOffset"] == [int(v) for v in lo]
    assert fast["voxels"].shape == ref["voxels"].shape and np.array_equal(fast["voxels"], ref["voxels"])
    assert fast["segments"] == ref["segments"]
    assert [s["labelValue"] for s in fast["segments"]] == list(range(1, len(ids) + 1))

    # two overlapping masks: the second goes to a second layer, as slicerio does it
    over = _result_from_labels(lab, [ids[0], ids[0]])
    over.nodules[1].id = 99
    seg = segmentation_dict(over, ct)
    assert seg["voxels"].ndim == 4 and [s["layer"] for s in seg["segments"]] == [0, 1]
    assert np.array_equal(seg["voxels"][0] > 0, seg["voxels"][1] > 0)


def test_label_array_first_nodule_keeps_shared_voxels(repo_dir):
    """label_array: value = nodule id; where masks overlap the earlier nodule keeps the voxel."""
    d = repo_dir / "Resources" / "SampleData"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "LIDC-IDRI-0003_crop_labels.nrrd")))
    ids = [int(v) for v in np.unique(lab) if v]
    res = _result_from_labels(lab, ids)
    assert np.array_equal(res.label_array(lab.shape), lab.astype(np.uint16))
    over = _result_from_labels(lab, [ids[0], ids[1]])
    from scipy import ndimage as ndi
    over.nodules[1].mask = ndi.binary_dilation(lab == ids[0], iterations=2)  # covers nodule ids[0] and more
    out = over.label_array(lab.shape)
    assert np.array_equal(out == ids[0], lab == ids[0])
    assert np.array_equal(out == ids[1], over.nodules[1].mask & (lab != ids[0]))
