"""Lung-RADS agreement of the default click path with the readers (issue 22, item 4).

``nodulemtl-train evaluate lung-rads --split val|test`` runs ``nodulemtl analyze``'s code path
(:func:`NoduleMTLLib.inference.pipeline.analyze_points` with the default networks, then
:func:`NoduleMTLLib.clinical.lung_rads.assess_nodule`) with a click at the labelled centre of every
``lidc_vois`` nodule of the split (3D HU click path), and compares its Lung-RADS v2022 category
with the **reference category**: the same :func:`NoduleMTLLib.clinical.lung_rads.categorize` applied to

* the size of the readers' mask (the union of their outlines) (long / short axis with
  :func:`NoduleMTLLib.core.postprocess.axial_diameters`, Lung-RADS mean diameter); the ``lidc_vois``
  mask, which is the **union** of the readers' masks (Dice 1.000 with the readers' union on 771
  registered nodules, ``training.reader_agreement``), not their >= 50 % consensus;
* the type from the median LIDC texture rating (<= 2 ground-glass, 3 part-solid, >= 4 solid),
  the solid component of a part-solid nodule measured on the readers' (union) mask (largest connected
  part >= -300 HU, as in the product);
* benign calcification from the LIDC calcification rating (1 popcorn, 2 laminated, 3 solid,
  5 central -> category 1).

Reported: exact agreement, under-calls and over-calls (by >= 1 category), the confusion table,
and beside it the figures the issue's done-when list asks for on the same nodules: type per
class, long-axis ratio to the readers' masks, Dice, malignancy AUC and ECE (10 bins) of the
reported and the raw probability.  Output: ``training/reports/lung_rads/lung_rads_<split>.json``
and ``.md``.  LIDC-IDRI-0001 and -0009 are reserved and never read.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from training.data import REPO, default_data_dir, load_split, malignancy_label
from training.wholescan import RESERVED as RESERVED_PATIENTS

OUT_DIR = REPO / "training" / "reports" / "lung_rads"
CATEGORIES = ("1", "2", "3", "4A", "4B")
BENIGN_CALCIFICATION = (1, 2, 3, 5)


def texture_class(texture: float) -> str:
    t = float(texture)
    return "ground-glass" if t <= 2 else ("solid" if t >= 4 else "part-solid")


def reference_category(ref_mask: np.ndarray, ct, texture: float, calcification_rating: int) -> dict:
    """Reference Lung-RADS category from the readers' mask (the union of their outlines) and ratings (module docstring)."""
    from NoduleMTLLib.clinical import lung_rads

    m = lung_rads.mask_measurements(ref_mask, ct)
    t = texture_class(texture)
    solid = m["solid_mean_diameter_mm"] if t == "part-solid" else None
    cat, key = lung_rads.categorize(t, m["mean_diameter_mm"], solid, int(calcification_rating) in BENIGN_CALCIFICATION)
    return {"category": cat, "rule": key, "type": t, "size_mm": m["mean_diameter_mm"], "long_axis_mm": m["long_axis_mm"],
            "solid_component_mm": solid}


def evaluate(split: str, data_dir=None, limit: int | None = None, log=print) -> dict:
    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.clinical.lung_rads import assess_nodule, classify_nodule
    from NoduleMTLLib.core.io import CTVolume
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.inference.pipeline import analyze_points
    from NoduleMTLLib.models.registry import load_network
    from NoduleMTLLib.service.analysis import complete_result

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    patients = set(load_split()[split]) - set(RESERVED_PATIENTS)
    rows = [r for r in csv.DictReader(open(d / "labels.csv")) if r["patient_id"] in patients][:limit]
    nets = {n: load_network(n, "cpu") for n in DEFAULT_NETWORKS}
    recs, skipped, run = [], [], None
    t0 = time.perf_counter()
    for i, r in enumerate(rows):
        ct = CTVolume(sitk.ReadImage(str(d / r["image"])), source=r["image"])
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"]))) > 0
        c = (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))
        if not ct.contains_lps(c):
            skipped.append(f"{r['patient_id']}_{r['nodule_id']}")
            continue
        res = analyze_points(ct, [c], network_ids=DEFAULT_NETWORKS, device="cpu", networks=nets)
        complete_result(res, ct, assess=False)  # the reported (calibrated) probability, as the service adds it
        run = res.run
        n = res.nodules[0]
        typ = classify_nodule(n, ct)  # as NoduleMTLLib.service.assessment.annotate_result does
        if typ is not None:
            n.type = typ["type"]
        lr = assess_nodule(n, ct, typ)
        refc = reference_category(ref, ct, float(r["Texture_value"]), int(float(r["Calcification_value"])))
        raw = n.networks[DEFAULT_NETWORKS[0]].malignancy_probability
        recs.append({"patient_id": r["patient_id"], "nodule_id": r["nodule_id"], "texture": float(r["Texture_value"]),
                     "calcification_rating": int(float(r["Calcification_value"])),
                     "label": malignancy_label(float(r["Malignancy_value"])), "found": n.found,
                     "dice": float(dice(n.mask, ref)) if n.found else 0.0,
                     "probability": n.malignancy_probability, "raw_probability": raw,
                     "reference": refc, "predicted": None if lr is None else
                     {k: lr[k] for k in ("category", "type", "type_probability", "size_mm", "long_axis_mm", "short_axis_mm",
                                         "solid_component_mm", "solid_component", "calcification", "notes")}})
        if log and (i % 20 == 0 or i == len(rows) - 1):
            log(f"lung-rads {split}: {i + 1}/{len(rows)} ({time.perf_counter() - t0:.0f} s)")
    return {"split": split, "networks": list(DEFAULT_NETWORKS), "mask_thresholds": (run or {}).get("mask_thresholds"),
            "malignancy_model": (run or {}).get("malignancy_probability"), "nodules": recs,
            "skipped_centre_outside_voi": skipped, "summary": summarize(recs)}


def summarize(recs: list[dict]) -> dict:
    """Agreement figures of :func:`evaluate`'s records (module docstring)."""
    from NoduleMTLLib.core.metrics import roc_auc
    from training.calibration import ece

    idx = {c: i for i, c in enumerate(CATEGORIES)}
    pairs = [(r["reference"]["category"], (r["predicted"] or {}).get("category")) for r in recs]
    both = [(a, b) for a, b in pairs if b is not None]
    conf = {a: {b: sum(1 for x, y in both if x == a and y == b) for b in CATEGORIES} for a in CATEGORIES}
    under = sum(1 for a, b in both if idx[b] < idx[a])
    over = sum(1 for a, b in both if idx[b] > idx[a])
    n = len(pairs)
    ref_t = [texture_class(r["texture"]) for r in recs if r["predicted"]]
    pred_t = [r["predicted"]["type"] for r in recs if r["predicted"]]
    sol = [p for p, g in zip(pred_t, ref_t) if g == "solid"]
    sub = [(p, g) for p, g in zip(pred_t, ref_t) if g != "solid"]
    subc = [(p, g) for p, g in sub if p != "solid"]
    ratios = np.array([r["predicted"]["long_axis_mm"] / max(r["reference"]["long_axis_mm"], 1e-6) for r in recs if r["predicted"]])
    d = np.array([r["dice"] for r in recs])
    lab = [r for r in recs if r["label"] >= 0 and r["probability"] is not None and r["raw_probability"] is not None]
    y = np.array([r["label"] for r in lab], float)
    p = np.array([r["probability"] for r in lab], float)
    q = np.array([r["raw_probability"] for r in lab], float)
    benign = [r for r in recs if r["calcification_rating"] in BENIGN_CALCIFICATION]
    return {"n": n, "assessed": len(both), "exact": sum(a == b for a, b in both) / n if n else None,
            "under_calls": under / n if n else None, "over_calls": over / n if n else None,
            "n_under": under, "n_over": over, "confusion_reference_rows": conf,
            "benign_calcification_reference": len(benign),
            "benign_calcification_called_1": sum(1 for r in benign if (r["predicted"] or {}).get("category") == "1"),
            "false_category_1": sum(1 for r in recs if r["calcification_rating"] not in BENIGN_CALCIFICATION
                                    and (r["predicted"] or {}).get("category") == "1"),
            "type": {"solid_called_solid": float(np.mean([t == "solid" for t in sol])) if sol else None, "n_solid": len(sol),
                     "subsolid_called_subsolid": float(np.mean([t != "solid" for t, _ in sub])) if sub else None,
                     "n_subsolid": len(sub),
                     "subsolid_split_right": float(np.mean([t == g for t, g in subc])) if subc else None,
                     "n_subsolid_called_subsolid": len(subc)},
            "long_axis_ratio_median": float(np.median(ratios)) if len(ratios) else None,
            "long_axis_within_15pct": float(np.mean(np.abs(ratios - 1) <= 0.15)) if len(ratios) else None,
            "dice_mean": float(d.mean()) if len(d) else None, "dice_median": float(np.median(d)) if len(d) else None,
            "malignancy": {"n": len(y), "n_positive": int(y.sum()), "auc": roc_auc(y, p) if len(y) else None,
                           "auc_raw": roc_auc(y, q) if len(y) else None, "ece": ece(y, p) if len(y) else None,
                           "ece_raw": ece(y, q) if len(y) else None}}


def markdown(ev: dict) -> str:
    s = ev["summary"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"Lung-RADS v2022 (baseline) on the {ev['split']} patients' HU VOIs, default click path "
             f"({', '.join(ev['networks'])}; mask thresholds {ev['mask_thresholds']}), "
             f"click at the labelled centre; reference = same rules on the readers' (union) mask + texture + calcification ratings.", "",
             f"- exact agreement **{s['exact']:.3f}** ({round(s['exact'] * s['n'])}/{s['n']}); under-calls {s['under_calls']:.3f} "
             f"({s['n_under']}), over-calls {s['over_calls']:.3f} ({s['n_over']})",
             f"- benign calcification (rating 1/2/3/5): {s['benign_calcification_called_1']}/{s['benign_calcification_reference']} "
             f"called 1; category 1 given to {s['false_category_1']} nodules without a benign rating",
             f"- type: solid called solid {f(s['type']['solid_called_solid'])} (n={s['type']['n_solid']}); subsolid called "
             f"subsolid {f(s['type']['subsolid_called_subsolid'])} (n={s['type']['n_subsolid']}); part-solid / ground-glass "
             f"split right {f(s['type']['subsolid_split_right'])} (n={s['type']['n_subsolid_called_subsolid']})",
             f"- long axis / readers' long axis: median {f(s['long_axis_ratio_median'])}, within 15 % {f(s['long_axis_within_15pct'])}",
             f"- Dice mean {f(s['dice_mean'])}, median {f(s['dice_median'])}",
             f"- malignancy ({s['malignancy']['n']} labelled, {s['malignancy']['n_positive']} malignant): AUC reported "
             f"{f(s['malignancy']['auc'])} (raw {f(s['malignancy']['auc_raw'])}), ECE reported {f(s['malignancy']['ece'])} "
             f"(raw {f(s['malignancy']['ece_raw'])})", "",
             "| reference \\ predicted | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for a in CATEGORIES:
        lines.append(f"| {a} | " + " | ".join(str(s["confusion_reference_rows"][a][b]) for b in CATEGORIES) + " |")
    return "\n".join(lines) + "\n"


def run(split: str, data_dir=None, out: Path | None = None, limit: int | None = None) -> dict:
    import torch
    torch.set_num_threads(2)
    ev = evaluate(split, data_dir, limit)
    out = out or OUT_DIR / f"lung_rads_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(ev, indent=1, default=float) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(ev))
    print(markdown(ev))
    print(f"-> {out}")
    return ev
