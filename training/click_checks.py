"""Issue 13's whole-CT click checks of the default configuration, on real CT (test patients only):

    python -m training.click_checks [--out training/reports/calibration/click_checks.json]

* **Sample nodule** (LIDC-IDRI-0003 nodule 2, 4 readers, median diameter 30.2 mm: the
  30 mm nodule of ``Resources/SampleData``): click at the readers' centre on the whole scan
  (``../shared/data/whole_ct/lidc``); long axis (``diameter_mm``, longest axial diameter) vs
  the readers' median diameter, relative error (target: within 15 %); 3D Dice against the
  readers' >= 50 % consensus label.
* **Lung-PET-CT-Dx adenocarcinomas** A0001 (NRRD) and A0002 (DICOM series): click at the
  centre of the annotated box on the middle annotated slice; on every annotated slice the mask
  touches, the fraction of the mask inside the box grown by 10 px on every side (target
  >= 80 %), the number of annotated slices it covers, the fraction of the mask on slices
  without a box, and the long axis.

Everything runs through :func:`NoduleMTLLib.service.analysis.analyze` with its defaults (what
``nodulemtl analyze`` does without ``--networks``).  Nothing is tuned here: these scans are
test data.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: Growth of the collection's boxes (px) for the containment check (issue 13).
GROW_PX = 10


def _data_dir() -> Path:
    from training.data import default_data_dir
    return default_data_dir()


def sample_nodule_check(models=None) -> dict:
    """Long axis and Dice of the default configuration on LIDC-IDRI-0003 nodule 2 (module docstring)."""
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.service.analysis import analyze

    d = _data_dir() / "whole_ct" / "lidc" / "LIDC-IDRI-0003"
    row = next(r for r in csv.DictReader(open(d / "nodules.csv")) if r["nodule"] == "2")
    ct = read_ct(d / "ct.nrrd")
    c = [float(row[f"center_lps_{a}"]) for a in "xyz"]
    t0 = time.perf_counter()
    res = analyze(ct, [c], device="cpu", models=models, assess=False)
    s = time.perf_counter() - t0
    n = res.nodules[0]
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "nodules_labels.nrrd"))) == 2
    readers = float(row["diameter_mm"])
    out = {"scan": "LIDC-IDRI-0003", "nodule": 2, "readers_diameter_mm": round(readers, 1), "found": n.found,
           "seconds": round(s, 2), "malignancy_model": res.run.get("malignancy_probability")}
    if n.found:
        out.update({"long_axis_mm": round(n.diameter_mm, 1), "relative_error": round(n.diameter_mm / readers - 1, 3),
                    "within_15_percent": abs(n.diameter_mm / readers - 1) <= 0.15,
                    "dice3d": round(dice(n.mask, ref), 3), "malignancy_probability": n.malignancy_probability})
    return out


def tumour_check(volume: str, models=None) -> dict:
    """Containment of the default mask in the Lung-PET-CT-Dx boxes grown by :data:`GROW_PX` (module docstring)."""
    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.service.analysis import analyze

    d = _data_dir() / "whole_ct"
    boxes = {}
    for r in csv.DictReader(open(d / "lung_pet_ct_dx_boxes.csv")):
        if r["volume"] == volume:
            boxes[int(r["slice_index_k"])] = tuple(int(r[k]) for k in ("xmin_i", "ymin_j", "xmax_i", "ymax_j"))
    ct = read_ct(d / volume)
    ks = sorted(boxes)
    k = ks[len(ks) // 2]
    x0, y0, x1, y1 = boxes[k]
    c = ct.image.TransformContinuousIndexToPhysicalPoint(((x0 + x1) / 2, (y0 + y1) / 2, float(k)))
    t0 = time.perf_counter()
    res = analyze(ct, [tuple(float(v) for v in c)], device="cpu", models=models, assess=False)
    s = time.perf_counter() - t0
    n = res.nodules[0]
    out = {"volume": volume, "boxed_slices": len(ks), "click_slice": k, "found": n.found, "seconds": round(s, 2)}
    if not n.found:
        return out
    m = n.mask
    grown = np.zeros(m.shape, bool)
    for kk, (a0, b0, a1, b1) in boxes.items():
        grown[kk, max(0, b0 - GROW_PX):b1 + GROW_PX + 1, max(0, a0 - GROW_PX):a1 + GROW_PX + 1] = True
    boxed = np.zeros(m.shape[0], bool)
    boxed[ks] = True
    touched = [kk for kk in ks if m[kk].any()]
    on_boxed = m[boxed].sum()
    per_slice = {int(kk): round(float((m[kk] & grown[kk]).sum() / m[kk].sum()), 3) for kk in touched}
    out.update({"boxed_slices_touched": len(touched),
                "inside_grown_boxes": round(float((m & grown).sum() / max(1, on_boxed)), 3),
                "min_inside_per_slice": min(per_slice.values()) if per_slice else None,
                "inside_per_slice": per_slice,
                "fraction_on_unboxed_slices": round(float(m[~boxed].sum() / m.sum()), 3),
                "long_axis_mm": round(n.diameter_mm, 1), "volume_ml": round(n.volume_mm3 / 1000, 1),
                "meets_80_percent": bool(per_slice) and min(per_slice.values()) >= 0.8})
    return out


def main(argv=None) -> int:
    import torch

    from NoduleMTLLib.service.analysis import ModelCache

    ap = argparse.ArgumentParser(prog="python -m training.click_checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "training" / "reports" / "calibration" / "click_checks.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    models = ModelCache()
    rep = {"sample_nodule": sample_nodule_check(models),
           "tumours": [tumour_check(v, models) for v in ("lung_pet_ct_dx_A0001.nrrd", "lung_pet_ct_dx_A0002_dicom")]}
    from NoduleMTLLib import DEFAULT_NETWORKS
    rep["default_networks"] = list(DEFAULT_NETWORKS)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
