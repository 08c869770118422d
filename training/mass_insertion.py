"""Synthetic masses for choosing Find nodules' mass rules without test masses (issue 27, item 1).

    python -m training.mass_insertion [--scans LIDC-IDRI-0004 ...] [--n 2] [--out runs/masses.json]

No annotated whole scan of the project holds a lung mass (the two Lung-PET-CT-Dx
adenocarcinomas are test scans).  This module makes some: a solid ``lidc_vois`` nodule of a
training patient (12-30 mm, mean HU > -250; :func:`training.insertion.load_vois`, which refuses
validation / test patients) is scaled to 35-70 mm, rotated and flipped
(:func:`training.insertion.transform_voi`) and pasted (:func:`training.insertion.paste_nodule`)
free in the lung or against the pleura (:func:`training.insertion.sample_centre`) of a
non-test whole scan; half of the masses are averaged to ~5 mm slices (the adenocarcinoma scans
have 5 and 8 mm slices).  The search then runs on a slab of the scan around the mass (the
mass's slices + 10 on each side; the lung mask is recomputed on the pasted slab, so a mass
that the lung mask excludes is excluded as in a real scan) and is reported through
:func:`training.evaluate_detection.reported_nodules`, the CLI's reporting code.

Per mass and threshold (:func:`mass_outcome`): found (a reported nodule's mask touches the
mass), the number of reported nodules touching it, and for each the minimum over the mass's
slices it touches of the fraction of its outline inside the mass's box + 10 px (the criterion
of the Lung-PET-CT-Dx boxes, ``evaluate_detection.inside_box_fraction``).

``paste_mass(..., placement="juxtamediastinal")`` instead places the mass against the mediastinum
(:func:`mediastinal_centre`); ``training/mediastinum_eval.py --masses N`` uses such 30-80 mm masses as
the protected class of the mediastinal-click rule (issue 22 item 7).

The session that chose ``infer.MASS_RULE`` ran the same procedure through the drivers in
``training/reports/maskrcnn25d/issue27/detfp`` (``synth.py``: the random draws there differ
from this module's).  Cost: 1-6 min per mass on 2 loaded CPU cores.

Lesion insertion as a test bed follows the hybrid-image idea of Solomon & Samei, Phys. Med.
Biol. 59 (2014) 6637 (see :mod:`training.insertion`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Target mass diameters (mm), uniform.
TARGET_MM = (35.0, 70.0)
#: Source VOIs: training nodules of this diameter range (mm) and mean HU above this (solid).
VOI_DIAMETER_MM = (12.0, 30.0)
VOI_MIN_MEAN_HU = -250.0
#: Share of free (vs juxtapleural) placements and of masses averaged to thick slices.
P_FREE = 0.3
P_THICK = 0.5
THICK_MM = 5.0
#: Slices kept on each side of the mass in the searched slab.
SLAB_MARGIN = 10


@dataclass
class SyntheticMass:
    """A mass pasted into a slab of a whole scan.

    Attributes:
        ct: the slab as a :class:`~NoduleMTLLib.core.io.CTVolume` (float32 HU; thick slices
            when ``record["thick_factor"]`` > 1).
        mask: bool (z, y, x) on ``ct``'s grid, the pasted mass.
        record: scan, source VOI and transform, target / pasted size, placement, slice factor.
    """

    ct: object
    mask: np.ndarray
    record: dict = field(default_factory=dict)


def solid_vois(data_root=None) -> list:
    """Training ``lidc_vois`` nodules usable as mass sources (:data:`VOI_DIAMETER_MM`,
    :data:`VOI_MIN_MEAN_HU`)."""
    from training import insertion as ins

    return [v for v in ins.load_vois(data_root, min_diameter_mm=VOI_DIAMETER_MM[0], max_diameter_mm=VOI_DIAMETER_MM[1])
            if is_mass_source(v)]


def is_mass_source(voi) -> bool:
    """Whether a :class:`training.insertion.VOI` may become a mass: :data:`VOI_DIAMETER_MM` and mean
    HU above :data:`VOI_MIN_MEAN_HU` (solid)."""
    return VOI_DIAMETER_MM[0] <= voi.diameter_mm <= VOI_DIAMETER_MM[1] and float(voi.hu[voi.mask].mean()) > VOI_MIN_MEAN_HU


def mediastinal_centre(lung2d: np.ndarray, spacing_yx, radius_mm: float, rng: np.random.Generator,
                       depth=(0.2, 0.9)) -> tuple[int, int] | None:
    """An in-plane centre (j, i) for a mass against the mediastinum on one axial slice.

    The mediastinum of the slice is the convex hull of its lung mask minus the lung, opened by 2
    pixels (as ``NoduleMTLLib.service.mediastinum.mediastinal_features``).  The centre lies in the
    lung at ``depth`` x the radius from the lung border (the low end: the mass merges with the
    mediastinum, like a mass abutting or invading it; the high end: it touches it) and within the
    radius + 2 mm of the mediastinum (the border it touches is the mediastinal one, not the chest
    wall), with the depth drawn uniformly per call.

    Args:
        lung2d: bool (y, x) lung mask of the slice; spacing_yx: pixel size (mm);
        radius_mm: the mass's in-plane radius; rng: random generator; depth: (low, high) factors.

    Returns:
        (j, i) integer pixel index, or None when the slice has no such place (one lung, no
        mediastinum between the lungs, or no lung pixel at that depth near it).
    """
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    if not lung2d.any():
        return None
    med = ndi.binary_opening(convex_hull_image(lung2d) & ~lung2d, iterations=2)
    if not med.any():
        return None
    d = ndi.distance_transform_edt(lung2d, sampling=spacing_yx)
    dm = ndi.distance_transform_edt(~med, sampling=spacing_yx)
    f = float(rng.uniform(*depth))
    tol = max(spacing_yx) + 0.1 * radius_mm
    ok = lung2d & (np.abs(d - f * radius_mm) <= tol) & (dm <= f * radius_mm + 2.0 + tol)
    jj, ii = np.nonzero(ok)
    if jj.size == 0:
        return None
    n = int(rng.integers(jj.size))
    return int(jj[n]), int(ii[n])


def paste_mass(ct, lung: np.ndarray, labels: np.ndarray, vois: list, rng: np.random.Generator, name: str = "",
               tries: int = 40, placement: str | None = None, target_mm=TARGET_MM,
               min_lung_share: float = 0.5) -> SyntheticMass:
    """Paste one synthetic mass into a whole scan and cut the slab around it.

    Args:
        ct: the whole scan (:class:`~NoduleMTLLib.core.io.CTVolume`, HU).
        lung: bool (z, y, x) lung mask of ``ct`` (placement only).
        labels: (z, y, x) label map of the scan's own nodules (> 0): never overlapped.
        vois: :func:`solid_vois` output.
        rng: random generator.
        name: scan name for the record.
        tries: placements tried.
        placement: None (the default draw: free with probability :data:`P_FREE`, else
            juxtapleural) or ``"juxtamediastinal"`` (against the mediastinum,
            :func:`mediastinal_centre`; used by ``training/mediastinum_eval.py`` as the masses a
            mediastinal-click rule must keep).
        target_mm: (low, high) range of the mass diameter (mm), uniform.
        min_lung_share: a placement is refused when less than this share of the mass lies in ``lung``.

    Returns:
        :class:`SyntheticMass`.

    Raises:
        training.insertion.InsertionError: no placement found (``min_lung_share`` of the mass in
            the lung, off the scan's nodules) in ``tries`` draws; unknown ``placement``.
    """
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import CTVolume
    from training import insertion as ins

    sx, sy, sz = ct.spacing
    area = lung.reshape(len(lung), -1).sum(1)
    if placement not in (None, "juxtamediastinal"):
        raise ins.InsertionError(f"unknown mass placement {placement!r}")
    target = float(rng.uniform(*target_mm))
    thick = bool(rng.random() < P_THICK)
    for _ in range(tries):
        v = vois[int(rng.integers(len(vois)))]
        nod = ins.transform_voi(v, (sz, sy, sx), target / v.diameter_mm, float(rng.uniform(0, 360)),
                                tuple(bool(f) for f in rng.random(3) < 0.5))
        zz, yy, xx = np.nonzero(nod.mask)
        hz = (int(zz.max()) - int(zz.min())) // 2 + 1
        radius = 0.5 * max(np.ptp(yy) + 1, np.ptp(xx) + 1) * sy
        ks = np.flatnonzero(area > 0.5 * area.max())
        ks = ks[(ks > hz + 8) & (ks < len(lung) - hz - 8)]
        if not len(ks):
            continue
        k = int(ks[rng.integers(len(ks))])
        if placement == "juxtamediastinal":
            kind = placement
            ji = mediastinal_centre(lung[k], (sy, sx), radius, rng)
            if ji is None:
                continue
        else:
            kind = "free" if rng.random() < P_FREE else "juxtapleural"
            hu_k = np.asarray(ct.array[k])
            ji = ins.sample_centre(lung[k], hu_k, (sy, sx), radius, kind, rng)
        if ji is None and kind == "free":
            kind = "juxtapleural"
            ji = ins.sample_centre(lung[k], hu_k, (sy, sx), radius, kind, rng)
        if ji is None:
            continue
        mz, my, mx = (int(round(a.mean())) for a in np.nonzero(nod.mask))
        cz, cy, cx = nod.centre
        z0, z1 = max(0, k - hz - SLAB_MARGIN), min(len(lung), k + hz + SLAB_MARGIN + 1)
        hu = np.asarray(ct.array[z0:z1], np.float32).copy()
        pm = ins.paste_nodule(hu, nod, (k + cz - mz - z0, ji[0] + cy - my, ji[1] + cx - mx), lung[z0:z1])
        if lung[z0:z1][pm].mean() < min_lung_share or (labels[z0:z1] > 0)[pm].any():
            continue
        break
    else:
        raise ins.InsertionError(f"no place for a {target:.0f} mm mass in {name or 'the scan'} after {tries} tries")
    fz = max(1, int(round(THICK_MM / sz))) if thick else 1
    if fz > 1:
        n = (hu.shape[0] // fz) * fz
        hu = hu[:n].reshape(-1, fz, *hu.shape[1:]).mean(1)
        pm = pm[:n].reshape(-1, fz, *pm.shape[1:]).mean(1) >= 0.5
    img = sitk.GetImageFromArray(np.ascontiguousarray(hu, np.float32))
    img.SetSpacing((sx, sy, sz * fz))
    img.SetDirection(ct.image.GetDirection())
    img.SetOrigin(ct.image.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, z0 + (fz - 1) / 2.0]))
    rec = {"scan": name, **nod.source, "target_mm": round(target, 1), "kind": kind, "thick_factor": fz,
           "slice_mm": round(sz * fz, 3), "slab_z0": int(z0),
           "mass_ml": round(float(pm.sum()) * sx * sy * sz * fz / 1000.0, 1)}
    return SyntheticMass(CTVolume(img, source=f"{name}+mass"), pm, rec)


def mass_outcome(nodules, mask: np.ndarray, margin: int = 10) -> dict:
    """How the reported ``nodules`` (merged nodules with ``box_voxel`` and ``mask``) cover a mass.

    Returns:
        {"found", "n_on_mass", "inside": [per nodule on the mass: min over the mass slices its
        mask touches of the fraction of its pixels inside the mass's box + ``margin`` px],
        "one_inside_80": exactly one nodule on the mass and its fraction >= 0.8,
        "n_elsewhere": reported nodules not touching it}.
    """
    on, inside = [], []
    for n in nodules:
        if n.mask is None:
            continue
        i0, j0, k0, i1, j1, k1 = n.box_voxel
        if not (n.mask & mask[k0:k1, j0:j1, i0:i1]).any():
            continue
        on.append(n)
        fr = []
        for k in range(k0, k1):
            m = n.mask[k - k0]
            if not m.any() or not mask[k].any():
                continue
            yy, xx = np.nonzero(mask[k])
            a0, a1 = yy.min() - margin - j0, yy.max() + 1 + margin - j0
            b0, b1 = xx.min() - margin - i0, xx.max() + 1 + margin - i0
            fr.append(float(m[max(0, a0):max(0, a1), max(0, b0):max(0, b1)].sum()) / float(m.sum()))
        inside.append(round(min(fr), 3) if fr else None)
    return {"found": bool(on), "n_on_mass": len(on), "inside": inside,
            "one_inside_80": len(on) == 1 and inside[0] is not None and inside[0] >= 0.8,
            "n_elsewhere": len(nodules) - len(on)}


def summarise_outcomes(rows: list[dict]) -> dict:
    """Totals of :func:`mass_outcome` records over masses: for every key of ``rows[0]`` holding
    a "|" (one setting, e.g. ``"default|shipped"``), {"found", "one" (exactly one nodule on the
    mass), "one_inside_80", "n_elsewhere", "n"} summed over ``rows``; {} for no rows."""
    out = {}
    for key in [k for k in rows[0] if "|" in k] if rows else []:
        v = [m[key] for m in rows]
        out[key] = {"found": sum(x["found"] for x in v), "one": sum(x["n_on_mass"] == 1 for x in v),
                    "one_inside_80": sum(x["one_inside_80"] for x in v),
                    "n_elsewhere": sum(x["n_elsewhere"] for x in v), "n": len(v)}
    return out


def check_mass_hosts(scans) -> None:
    """Raise ValueError when ``scans`` name a test or reserved scan: no mass is pasted into them."""
    from training.wholescan import RESERVED
    from training.wholescan import load_split as scan_split

    bad = sorted(set(scans) & (set(RESERVED) | set(scan_split().get("test", []))))
    if bad:
        raise ValueError(f"{bad} are test / reserved scans: no mass is pasted into them")


def pasted_masses(scans, n_per_scan: int, seed: int, cache=None, vois: list | None = None):
    """The synthetic masses of ``seed``: ``n_per_scan`` :func:`paste_mass` draws in each of
    ``scans`` (whole-scan cache folders), in this order and from one generator, so that a seed
    always gives the same masses (the drivers under ``training/reports/maskrcnn25d/issue27``
    rely on it).

    Yields:
        (scan name, :class:`SyntheticMass`-like result of :func:`paste_mass`).

    Raises:
        ValueError: a test or reserved scan (before anything is read).
    """
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.detection import preprocess as pp
    from training.wholescan import default_cache

    check_mass_hosts(scans)
    cache = Path(cache or default_cache())
    vois = solid_vois() if vois is None else vois
    rng = np.random.default_rng(seed)
    for name in scans:
        ct = read_ct(cache / name / "ct.nrrd")
        lung = pp.lung_mask_from_ct(ct).mask
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cache / name / "nodules_labels.nrrd")))
        for _ in range(n_per_scan):
            yield name, paste_mass(ct, lung, labels, vois, rng, name)


def evaluate_masses(scans, n_per_scan: int = 2, thresholds=("default",), seed: int = 0, cache=None, log=print,
                    pleural_masses: bool | str = False, shapes: bool = False) -> dict:
    """Paste ``n_per_scan`` masses into each scan, search each slab, report :func:`mass_outcome`
    with the shipped rules (mass rule and territory) and without them.

    With ``pleural_masses`` each slab is also searched with the pleural masses put back into
    the detector's input mask (:func:`NoduleMTLLib.detection.preprocess.add_pleural_masses`);
    those outcomes carry the suffix ``|pm`` (the search without it: no suffix), and a slab
    where nothing is added reuses the first search (same input, same detections);
    ``pleural_masses="only"`` runs that search alone.  With ``shapes`` every outcome is also
    reported with the mass-shape candidates (``infer.mass_shape_candidates``; suffix ``+shapes``).

    Raises:
        ValueError: a test or reserved scan.
    """
    import torch

    from NoduleMTLLib.detection import preprocess as pp
    from NoduleMTLLib.detection.infer import load_detector, load_fpr, run_slice_detections
    from training.evaluate_detection import click_outliner, reported_nodules

    check_mass_hosts(scans)
    model, fpr, click = load_detector("cpu"), load_fpr("cpu"), click_outliner("cpu")
    vois = solid_vois()
    out = {"protocol": "training/mass_insertion.py", "seed": seed, "n_vois": len(vois), "masses": []}
    for _name, sm in pasted_masses(scans, n_per_scan, seed, cache, vois):
        t0 = time.perf_counter()
        rec = dict(sm.record)
        slab_lung = pp.lung_mask_from_ct(sm.ct)  # as the search computes it, on the slab
        rec["mass_lung_share"] = round(float(slab_lung.mask[sm.mask].mean()), 3)
        runs = {}
        if pleural_masses != "only":
            with torch.inference_mode():
                runs[""] = run_slice_detections(sm.ct, model, "cpu", lung=slab_lung, pleural_masses=False)
        if pleural_masses:
            d = np.asarray(sm.ct.image.GetDirection(), float).reshape(3, 3)
            ext, added = pp.add_pleural_masses(sm.ct.array, slab_lung, k_to_feet=1 if d[2, 2] < 0 else -1)
            rec["pm_added_ml"] = round(added, 1)
            rec["pm_mass_share"] = round(float(ext.mask[sm.mask].mean()), 3)
            if added > 0 or "" not in runs:
                with torch.inference_mode():
                    runs["|pm"] = run_slice_detections(sm.ct, model, "cpu", lung=slab_lung, pleural_masses=True)
            else:
                runs["|pm"] = runs[""]
        for suffix, sdr in runs.items():
            for thr in thresholds:
                for rules in ("shipped", "off"):
                    for shp in (False, True) if shapes else (False,):
                        if shp and rules == "off":
                            continue
                        kw = {} if rules == "shipped" else {"mass_rule": None, "territory_ml": None}
                        nods = reported_nodules(sdr, sm.ct, thr, fpr, "cpu", click, shapes=shp, **kw)[1]  # fresh merge
                        rec[f"{thr}|{rules}{suffix}{'+shapes' if shp else ''}"] = mass_outcome(nods, sm.mask)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        out["masses"].append(rec)
        log(json.dumps(rec))
    if out["masses"]:
        out["summary"] = summarise_outcomes(out["masses"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.mass_insertion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", nargs="+", default=["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002",
                                                    "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"])
    ap.add_argument("--n", type=int, default=2, help="masses per scan")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="whole-scan cache (default $NODULEMTL_CACHE/wholescan)")
    ap.add_argument("--out", type=Path, default=Path("runs/maskrcnn25d/masses.json"))
    ap.add_argument("--pleural-masses", nargs="?", const="both", default=None, choices=["both", "only"],
                    help="also (both) or only (only) search each slab with pleural masses put back into the input "
                         "mask (suffix |pm)")
    ap.add_argument("--shapes", action="store_true", help="also report with the mass-shape candidates (+shapes)")
    a = ap.parse_args(argv)
    try:
        from training.evaluate_detection import HIGH_SENSITIVITY_THRESHOLD

        rep = evaluate_masses(a.scans, a.n, ("default", HIGH_SENSITIVITY_THRESHOLD), a.seed, a.cache,
                              pleural_masses={"both": True, "only": "only", None: False}[a.pleural_masses],
                              shapes=a.shapes)
    except (ValueError, FileNotFoundError) as e:
        print(f"mass_insertion: error: {e}", file=sys.stderr)
        return 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep.get("summary"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
