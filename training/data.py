"""Loading the real LIDC-IDRI training data in ``../shared/data`` and the patient-level split.

Sources (TCIA, CC BY 3.0; Armato et al., Med. Phys. 2011):
* ``lidc_slices``: 2,275 nodules, axial 128 x 128 crops at native pixel spacing, 8-bit
  (per-slice min-max of the source slice, see ``NoduleMTLLib.inference.preprocessing``), four
  readers' masks, ratings.
* ``lidc_vois``: 872 nodules, 3D HU VOIs with consensus masks.

Malignancy label (all networks): median rating >= 4 -> malignant (1), <= 2 -> benign (0);
medians in (2, 4) (i.e. 2.5, 3, 3.5) are *excluded from the classification loss and
metrics* but still used for segmentation.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SPLIT_FILE = REPO / "training" / "splits" / "lidc_patient_split.json"
#: Patients held out of training whatever the random split says: the two whole annotated
#: LIDC scans (``whole_ct/lidc``) and the repository's sample CT come from them.
FORCED_TEST_PATIENTS = ("LIDC-IDRI-0003", "LIDC-IDRI-0005")


def default_data_dir() -> Path:
    return Path(os.environ.get("NODULEMTL_DATA", REPO.parent / "shared" / "data")).resolve()


def malignancy_label(median: float) -> int:
    """1 malignant (median >= 4), 0 benign (median <= 2), -1 excluded (between)."""
    if median >= 4:
        return 1
    if median <= 2:
        return 0
    return -1


def make_patient_split(patients, seed: int = 20261122, fractions=(0.7, 0.15, 0.15)) -> dict:
    """Deterministic patient-level split into train / val / test.

    The :data:`FORCED_TEST_PATIENTS` always go to test.  Returns
    ``{"seed", "fractions", "train": [...], "val": [...], "test": [...]}`` (sorted ids).
    """
    pats = sorted(set(patients) - set(FORCED_TEST_PATIENTS))
    rng = np.random.default_rng(seed)
    perm = [pats[i] for i in rng.permutation(len(pats))]
    n_tr = int(round(fractions[0] * len(perm)))
    n_va = int(round(fractions[1] * len(perm)))
    split = {
        "seed": seed,
        "fractions": list(fractions),
        "note": "patient-level split of the 770 LIDC-IDRI patients in ../shared/data; shared by every network",
        "train": sorted(perm[:n_tr]),
        "val": sorted(perm[n_tr : n_tr + n_va]),
        "test": sorted(perm[n_tr + n_va :] + [p for p in FORCED_TEST_PATIENTS if p in set(patients)]),
    }
    return split


def load_split(path: Path = SPLIT_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclass
class SliceNodule:
    """One LIDC nodule from ``lidc_slices``.

    image: (S, 128, 128) uint8 (``lidc_slices``) or float32 HU + 1024 (user cases, see
    :func:`load_user_cases`; the networks' per-slice normalisation is affine-invariant);
    consensus: (S, 128, 128) bool (>= 50 % of the readers who
    marked the nodule); readers: (R, S, 128, 128) bool non-empty reader masks;
    spacing_mm: in-plane pixel spacing; malignancy: median rating; label: see
    :func:`malignancy_label`; ratings: other median ratings by name.
    """

    patient_id: str
    nodule: str
    image: np.ndarray
    consensus: np.ndarray
    readers: np.ndarray
    spacing_mm: float
    slice_thickness_mm: float
    malignancy: float
    label: int
    ratings: dict


def reader_consensus(readers: np.ndarray) -> np.ndarray:
    """The readers' >= 50 % consensus mask: voxels marked by at least half of the given readers (ties
    included: 1 of 1, 1 of 2 = union, 2 of 3, 2 of 4), as ``pylidc.utils.consensus(clevel=0.5)``.

    The rule of the ``lidc_slices`` segmentation target (:func:`load_slice_nodules`) and of the whole-scan
    labels (``training.wholescan``).  Not the rule of the ``lidc_vois`` masks: those are the union of
    the readers' masks (measured by ``training.reader_agreement``).

    Args:
        readers: (R, ...) bool, one mask per reader who marked the nodule, R >= 1.

    Returns:
        bool array of shape ``readers.shape[1:]``.

    Raises:
        ValueError: no reader (R = 0).
    """
    r = np.asarray(readers, bool)
    if r.ndim < 1 or len(r) == 0:
        raise ValueError("a consensus needs at least one reader's mask")
    return r.sum(0, dtype=np.int32) * 2 >= len(r)


RATINGS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation", "spiculation", "texture")


def load_slice_nodules(data_dir: Path | None = None, patients: set | None = None) -> list[SliceNodule]:
    """Load ``lidc_slices`` nodules (optionally only those of ``patients``)."""
    d = Path(data_dir or default_data_dir()) / "lidc_slices"
    out = []
    with open(d / "labels.csv") as f:
        for r in csv.DictReader(f):
            if patients is not None and r["patient_id"] not in patients:
                continue
            img = np.array(Image.open(d / r["image_file"])).reshape(-1, 128, 128)
            m = np.array(Image.open(d / r["masks_file"])).reshape(-1, 128, 128)
            readers = np.stack([((m >> k) & 1).astype(bool) for k in range(4)])
            readers = readers[readers.reshape(4, -1).any(1)]
            if len(readers) == 0:
                continue
            consensus = reader_consensus(readers)
            mal = float(r["malignancy_median"])
            out.append(SliceNodule(
                patient_id=r["patient_id"], nodule=r["nodule"], image=img, consensus=consensus, readers=readers,
                spacing_mm=float(r["pixel_spacing_mm"]), slice_thickness_mm=float(r["slice_thickness_mm"] or 0),
                malignancy=mal, label=malignancy_label(mal),
                ratings={k: float(r[f"{k}_median"]) for k in RATINGS if r.get(f"{k}_median")},
            ))
    return out


def all_patients(data_dir: Path | None = None) -> list[str]:
    d = Path(data_dir or default_data_dir())
    pats = set()
    for sub, col in (("lidc_slices", "patient_id"), ("lidc_vois", "patient_id")):
        with open(d / sub / "labels.csv") as f:
            pats |= {r[col] for r in csv.DictReader(f)}
    return sorted(pats)


#: User-case slices are HU + this offset, so 0 is air (-1024 HU): the value
#: ``training.augment.sample_batch`` pads with, as 0 is the slice minimum in ``lidc_slices``.
USER_CASE_HU_OFFSET = 1024.0
#: Side (px) of user-case slices: the ``lidc_slices`` crop size, so both mix in one batch.
USER_SLICE_SIZE = 128


def _axial_grid(img, msk):
    """Resample a crop and its mask onto an axis-aligned (identity direction) LPS grid with square
    in-plane pixels, if they are not on one already.  Returns (HU float32 (z, y, x), bool mask, in-plane
    spacing mm, slice spacing mm)."""
    import SimpleITK as sitk

    sp = np.asarray(img.GetSpacing(), float)
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    if np.allclose(d, np.eye(3), atol=1e-4) and abs(sp[0] - sp[1]) <= 1e-4 * sp[0]:
        return (sitk.GetArrayFromImage(img).astype(np.float32), sitk.GetArrayFromImage(msk) != 0,
                float(sp[0]), float(sp[2]))
    s, sz = float(min(sp[0], sp[1])), float(sp[int(np.argmax(np.abs(d[2, :])))])
    size = np.asarray(img.GetSize())
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.array(c) * (size - 1)])
                        for c in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(0), corners.max(0)
    spacing = np.array([s, s, sz])
    n = np.floor((hi - lo) / spacing).astype(int) + 1
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetSpacing([float(v) for v in spacing]); ref.SetOrigin([float(v) for v in lo])
    hu = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    m = sitk.Resample(sitk.Cast(msk, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(hu), sitk.GetArrayFromImage(m) >= 0.5, s, sz


def load_user_cases(folder) -> list[SliceNodule]:
    """Cases exported by the annotator refinement loop (``NoduleMTLLib.inference.refine.export_for_training``,
    Slicer: *Export for training*) as :class:`SliceNodule` objects the 2D trainers use.

    ``folder/labels.csv`` lists the cases (``case_id, patient_id, image_file, mask_file,
    malignancy, label``, spacing, LIDC ratings); each case is a HU crop (``*_ct.nrrd``) and a
    0/1 mask (``*_mask.nrrd``) on the same grid.  A crop that is not axis-aligned, or has
    non-square pixels, is first resampled (linear) onto an axis-aligned LPS grid with square
    pixels of the finer in-plane spacing.  Each slice the mask covers becomes one 128 x 128
    slice centred on the mask's in-plane centroid at native spacing (like ``lidc_slices``;
    padded with air, -1024 HU, beyond the crop).

    Returns:
        list of :class:`SliceNodule`, one per case: ``image`` (S, 128, 128) float32 = HU +
        :data:`USER_CASE_HU_OFFSET` (0 = air, the pad value of
        ``training.augment.sample_batch``); ``consensus`` (S, 128, 128) bool = the mask;
        ``readers`` = the mask as the only reader (1, S, 128, 128); ``spacing_mm`` /
        ``slice_thickness_mm`` in mm; ``malignancy`` the 1-5 rating (NaN if not given);
        ``label`` 1 / 0 / -1 as exported; ``ratings`` the LIDC ratings given;
        ``patient_id`` (the case id when unknown) and ``nodule`` = case id.

    Raises:
        FileNotFoundError: no ``labels.csv`` or a listed file is missing.
        ValueError: a mask does not match its image's grid, or is empty.
    """
    import SimpleITK as sitk

    d = Path(folder)
    if not (d / "labels.csv").is_file():
        raise FileNotFoundError(f"No labels.csv in {d}: not a folder written by the refinement loop's export")
    with open(d / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        paths = [d / r["image_file"], d / r["mask_file"]]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p} listed in {d / 'labels.csv'} is missing")
        img, msk = (sitk.ReadImage(str(p)) for p in paths)
        if (img.GetSize() != msk.GetSize() or not np.allclose(img.GetOrigin(), msk.GetOrigin(), atol=1e-4)
                or not np.allclose(img.GetSpacing(), msk.GetSpacing(), atol=1e-6)):
            raise ValueError(f"Case {r['case_id']}: mask {paths[1].name} is not on the grid of {paths[0].name}")
        hu, m, s, sz = _axial_grid(img, msk)
        ks = np.nonzero(m.reshape(len(m), -1).any(1))[0]
        if len(ks) == 0:
            raise ValueError(f"Case {r['case_id']}: empty mask")
        image, mask = hu_slices_around_mask(hu, m, ks)
        mal = float(r["malignancy"]) if r.get("malignancy") not in (None, "") else float("nan")
        out.append(SliceNodule(
            patient_id=r.get("patient_id") or r["case_id"], nodule=r["case_id"], image=image, consensus=mask,
            readers=mask[None], spacing_mm=s, slice_thickness_mm=sz, malignancy=mal, label=int(r["label"]),
            ratings={k: float(r[k]) for k in RATINGS if r.get(k) not in (None, "")},
        ))
    return out


def hu_slices_around_mask(hu: np.ndarray, m: np.ndarray, slices) -> tuple[np.ndarray, np.ndarray]:
    """Cut :data:`USER_SLICE_SIZE` px axial slices centred on a mask's in-plane centroid.

    Args:
        hu: (z, y, x) HU (float or int) at native spacing; m: (z, y, x) bool mask on the same
            grid (not empty); slices: the z indices to keep.
    Returns:
        (image (S, 128, 128) float32 = HU + :data:`USER_CASE_HU_OFFSET`, i.e. 0 = air;
        mask (S, 128, 128) bool).  Beyond the crop the image is air (-1024 HU) and the mask 0.
    """
    h = USER_SLICE_SIZE // 2
    ks = np.asarray(slices, int)
    _, yy, xx = np.nonzero(m)
    cy, cx = int(round(yy.mean())), int(round(xx.mean()))
    pad = ((0, 0), (h, h), (h, h))
    hu_p = np.pad(np.asarray(hu[ks], np.float32), pad, constant_values=-1024.0)
    m_p = np.pad(m[ks], pad, constant_values=False)
    win = (slice(None), slice(cy, cy + 2 * h), slice(cx, cx + 2 * h))  # centre cy + h in padded coordinates
    return (hu_p[win] + USER_CASE_HU_OFFSET).astype(np.float32), m_p[win]


#: ``lidc_vois/labels.csv`` rating columns -> the ``lidc_slices`` rating names (:data:`RATINGS`).
VOI_RATING_COLUMNS = {"subtlety": "Subtlety_value", "internalStructure": "InternalStructure_value",
                      "calcification": "Calcification_value", "sphericity": "Sphericity_value",
                      "margin": "Margin_value", "lobulation": "Lobulation_value",
                      "spiculation": "Spiculation_value", "texture": "Texture_value"}


def load_voi_nodules(data_dir: Path | None = None, patients: set | None = None) -> list[SliceNodule]:
    """``lidc_vois`` nodules (3D HU, consensus masks) as HU :class:`SliceNodule` slices.

    Every slice of the VOI is kept (the VOIs are tight crops: median 6 x 44 x 44 voxels), cut
    to 128 x 128 px around the mask centroid at native spacing and padded with air, as the
    click path pads a VOI (``NoduleMTLLib.inference.roi.extract_patch``).  ``image`` = HU + 1024
    (float32), ``consensus`` = the VOI's consensus mask (the 3D evaluation's reference),
    ``readers`` = that mask only, ``malignancy`` = ``Malignancy_value``, ratings from
    :data:`VOI_RATING_COLUMNS`.  Crops that are not axis-aligned are resampled as in
    :func:`load_user_cases`; VOIs with an empty mask are skipped.
    """
    import SimpleITK as sitk

    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    out = []
    with open(d / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if patients is None or r["patient_id"] in patients]
    for r in rows:
        hu, m, s, sz = _axial_grid(sitk.ReadImage(str(d / r["image"])), sitk.ReadImage(str(d / r["mask"])))
        if not m.any():
            continue
        image, mask = hu_slices_around_mask(hu, m, range(len(m)))
        mal = float(r["Malignancy_value"])
        out.append(SliceNodule(
            patient_id=r["patient_id"], nodule=f"voi-{r['nodule_id']}", image=image, consensus=mask,
            readers=mask[None], spacing_mm=s, slice_thickness_mm=sz, malignancy=mal, label=malignancy_label(mal),
            ratings={k: float(r[c]) for k, c in VOI_RATING_COLUMNS.items() if r.get(c) not in (None, "")},
        ))
    return out


def load_wholescan_nodules(wholescan_dir: Path, patients, margin_slices: int = 2) -> list[SliceNodule]:
    """Nodules of the whole LIDC scans built by ``training.wholescan`` as HU :class:`SliceNodule`
    slices with their real surroundings (chest wall, vessels, mediastinum), not padded crops.

    Args:
        wholescan_dir: the builder's output (``PATIENT/ct.nrrd``, ``nodules_labels.nrrd``,
            ``nodules.csv``); patients: ids to load (only training patients, the caller's
            split); margin_slices: slices kept beyond the nodule on each side (negatives).
    Returns:
        one :class:`SliceNodule` per labelled nodule: 128 x 128 px at native spacing around the
        mask centroid, ``image`` = HU + 1024, ``consensus`` = the >= 50 % consensus label,
        ``malignancy`` = the readers' median (label by :func:`malignancy_label`), no ratings.
    Raises:
        ValueError: a reserved patient (``training.wholescan.RESERVED``) is asked for.
    """
    import SimpleITK as sitk

    from training.wholescan import RESERVED
    bad = sorted(set(patients) & set(RESERVED))
    if bad:
        raise ValueError(f"{', '.join(bad)} reserved for an independent evaluation: never read")
    out = []
    for p in sorted(patients):
        d = Path(wholescan_dir) / p
        ct = sitk.ReadImage(str(d / "ct.nrrd"))
        if not np.allclose(np.asarray(ct.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-4):
            raise ValueError(f"{d / 'ct.nrrd'}: not an axial (identity-direction) grid")
        hu = sitk.GetArrayViewFromImage(ct)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "nodules_labels.nrrd")))
        s = ct.GetSpacing()[0]
        with open(d / "nodules.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            m = lab == int(r["nodule"])
            zs = np.nonzero(m.reshape(len(m), -1).any(1))[0]
            if len(zs) == 0:
                continue
            ks = range(max(0, zs[0] - margin_slices), min(len(m), zs[-1] + margin_slices + 1))
            image, mask = hu_slices_around_mask(hu, m, ks)
            mal = float(r["malignancy_median"]) if r.get("malignancy_median") not in (None, "") else float("nan")
            out.append(SliceNodule(
                patient_id=p, nodule=f"wholescan-{r['nodule']}", image=image, consensus=mask, readers=mask[None],
                spacing_mm=float(s), slice_thickness_mm=float(ct.GetSpacing()[2]), malignancy=mal,
                label=malignancy_label(mal) if mal == mal else -1, ratings={},
            ))
    return out


if __name__ == "__main__":  # python -m training.data  -> (re)writes the split file
    s = make_patient_split(all_patients())
    SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
    SPLIT_FILE.write_text(json.dumps(s, indent=1) + "\n")
    print({k: len(v) for k, v in s.items() if isinstance(v, list)})
