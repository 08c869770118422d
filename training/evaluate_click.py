"""3D evaluation of the whole click path on the HU VOIs of held-out patients.

For every ``lidc_vois`` nodule of the chosen split, the VOI (int16 HU, native spacing,
correct world origin) is analysed by ``NoduleMTLLib.inference.pipeline.analyze_points`` with a click
at the nodule centre (``coordX/Y/Z``, world LPS mm), exactly as the ``nodulemtl`` command
does; the mask is compared with the VOI's consensus mask (3D Dice) and the malignancy
probability with the label (median rating >= 4 malignant, <= 2 benign, 3 excluded).
This checks what the 2D evaluation cannot: HU input (training used 8-bit PNG slices),
resampling to and from the network grid, component selection and aggregation.  Caveat:
VOIs are tight crops (median 6 x 44 x 44 voxels); the pipeline pads them with air.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.core.metrics import binary_classification_stats, dice
from NoduleMTLLib.inference.pipeline import analyze_points
from NoduleMTLLib.models.registry import load_network
from training.data import default_data_dir, load_split, malignancy_label


def evaluate_vois(network_id: str, split: str = "val", data_dir=None, limit: int | None = None, log=print,
                  model=None) -> dict:
    """3D click-path evaluation of ``network_id`` on the split's VOIs (see the module text);
    ``model``: an in-memory network to evaluate instead of the shipped weights (training's
    checkpoint selection).  Returns Dice / found / classification figures (dict)."""
    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    patients = set(load_split()[split])
    rows = [r for r in csv.DictReader(open(d / "labels.csv")) if r["patient_id"] in patients]
    if limit:
        rows = rows[:limit]
    net = {network_id: model if model is not None else load_network(network_id, "cpu")}
    dices, labels, probs, found, times, skipped = [], [], [], 0, [], []
    for r in rows:
        img = sitk.ReadImage(str(d / r["image"]))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"]))) > 0
        ct = CTVolume(img, source=r["image"])
        c = (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))
        if not ct.contains_lps(c):  # a few labels.csv centres lie outside their own VOI
            skipped.append(f"{r['patient_id']}_{r['nodule_id']}")
            continue
        t0 = time.perf_counter()
        res = analyze_points(ct, [c], network_ids=(network_id,), device="cpu", networks=net)
        times.append(time.perf_counter() - t0)
        n = res.nodules[0]
        pred = n.mask if n.found else np.zeros_like(ref)
        found += int(n.found)
        dices.append(dice(pred, ref))
        lab = malignancy_label(float(r["Malignancy_value"]))
        p = n.networks[network_id].malignancy_probability
        if lab >= 0 and p is not None:
            labels.append(lab); probs.append(p)
    cls = binary_classification_stats(labels, probs)
    out = {"network": network_id, "split": split, "n_nodules": len(dices), "found": found,
           "skipped_centre_outside_voi": skipped,
           "dice3d_mean": float(np.mean(dices)), "dice3d_median": float(np.median(dices)),
           "classification": cls, "median_time_s": float(np.median(times))}
    log(json.dumps(out))
    return out
