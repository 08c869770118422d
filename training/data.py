"""Loading the real LIDC-IDRI training data in ``../shared/data`` and the patient-level split.

Sources (TCIA, CC BY 3.0; Armato et al., Med. Phys. 2011):
* ``lidc_slices``: 2,275 nodules, axial 128 x 128 crops at native pixel spacing, 8-bit
  (per-slice min-max of the source slice, see ``NoduleMTLLib.preprocessing``), four
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

    image: (S, 128, 128) uint8; consensus: (S, 128, 128) bool (>= 50 % of the readers who
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
            consensus = readers.sum(0) * 2 >= len(readers)
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


if __name__ == "__main__":  # python -m training.data  -> (re)writes the split file
    s = make_patient_split(all_patients())
    SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
    SPLIT_FILE.write_text(json.dumps(s, indent=1) + "\n")
    print({k: len(v) for k, v in s.items() if isinstance(v, list)})
