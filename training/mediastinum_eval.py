"""Measure the mediastinal-click rule (``NoduleMTLLib.service.mediastinum``, issue 22 item 7) on whole
training scans, and choose its lung-fraction threshold there.

Clicks, per whole scan of the chosen role (``training/splits/lidc_wholescan_split.json``; train by
default, never the test scans):

* **mediastinal clicks** (should be refused or small): on 6 random axial slices in the middle
  of the lungs' z-range (20-85 %), 2 random soft-tissue pixels (-50..250 HU) between the lungs
  (inside the convex hull of the lung mask, outside it) at >= 10 mm from the lung ("deep":
  heart, great vessels) and 2 at 2-10 mm ("near": hila, mediastinal borders);
* **hilar clicks** (should be refused or small; own random generator, added with the
  continuation signal, so the clicks above are unchanged): on 6 random slices, 2 random pixels
  of 0-250 HU *inside* the lung mask within 15 mm of the mediastinum (the opened convex hull of
  the slice's lung minus the lung), away from the readers' nodules: hilar vessels and bronchial walls;
* **labelled nodules**: the readers' nodules of the scan (``nodules.csv``), clicked at their centre;
* **inserted juxtamediastinal nodules** (should be kept): training patients' ``lidc_vois``
  nodules (8-30 mm, scaled 1-2x below 20 mm, 0.8-1.3x above) pasted with
  ``training.insertion.paste_nodule`` next to the mediastinal lung border, alternately with
  the centre 0.4-0.9 x the radius inside the lung ("juxta") and at most 0.3 x the radius
  inside it ("abut": half of the nodule merges with the mediastinum, like a mass abutting it),
  clicked at the pasted mask's centroid; the lung mask the rule computes is the one of the scan
  with the nodules in it;
* **synthetic masses against the mediastinum** (should be kept; ``--masses N`` per scan and seed,
  own random generator, so the clicks above are unchanged): training patients' solid ``lidc_vois``
  nodules scaled to 30-80 mm and pasted against the mediastinal lung border
  (``training.mass_insertion.paste_mass``, placement ``"juxtamediastinal"``: centre in the lung at
  0.2-0.9 x the radius from its border, near the mediastinum; at least 0.4 of the mass in the lung
  mask; half of them on ~5 mm slices), each clicked at its centroid (``mass-mediastinal``) and at a
  random inner voxel (``mass-mediastinal-off``), on the slab that ``paste_mass`` cuts around the mass.

Every click runs the click path's engine (``pipeline.analyze_points``, the default networks; the
rule is applied after it by the analysis service) and records the rule's features, so the figures
of the rule at any threshold follow from one run.  The fitted constants (:func:`choose`), over the
nodule clicks "at stake" (a non-small mask, the click outside the lung mask and between the
lungs): the lung fraction - the largest multiple of 0.05 below the smallest nodule's; the z ratio
(extent across the slices / axial long axis) - the smallest multiple of 0.1 at least 0.15 above
the largest nodule's; the continuation (``mediastinum.continuation``, which also decides the
in-lung hilar clicks, so over every nodule click with a larger mask) - the smallest multiple of 0.1
at least 0.15 above the largest nodule's.  ``MIN_STRUCTURE_MM`` (10 cm) is a clinical bound, not
fitted: no training nodule is larger than 35 mm.  The synthetic masses join the protected class of
the continuation; :func:`tube_study` measures the vessel signals of :func:`tube_features`
(third round) the same way.  ``--dump DIR`` saves the larger masks with their
HU (npz) to compute other features offline.

``--vois train val`` instead runs the analysis service on those splits' ``lidc_vois`` VOIs and
counts the clicks the rule refuses (they are in-lung nodules: the answer should be 0).

Output: one JSON line per click (``--out``, default ``training/reports/mediastinum_<role>.jsonl``)
and a summary on stdout.  Run: ``OMP_NUM_THREADS=1 uv run --frozen python -m
training.mediastinum_eval --role train`` (about 10 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]


def _cache_root() -> Path:
    import os
    return Path(os.environ.get("NODULEMTL_CACHE") or REPO.parent / "cache") / "wholescan"


def _random_slices(lung: np.ndarray, rng: np.random.Generator, n_slices: int) -> list[int]:
    """``n_slices`` distinct random slices k in 20-85 % of the lungs' z-range, ascending."""
    zs = np.nonzero(lung.any((1, 2)))[0]
    z0, z1 = int(zs.min()), int(zs.max())
    ks = rng.choice(np.arange(int(z0 + 0.2 * (z1 - z0)), int(z0 + 0.85 * (z1 - z0))), n_slices, replace=False)
    return sorted(int(v) for v in ks)


def hilum_points(lung: np.ndarray, hu: np.ndarray, spacing_xyz, rng: np.random.Generator, avoid: np.ndarray | None,
                 n_slices: int = 6, per_slice: int = 2) -> list[tuple[str, tuple[int, int, int]]]:
    """Random soft-tissue clicks (0..250 HU: hilar vessels, bronchial walls) inside the lung mask
    within 15 mm of the mediastinum (the opened convex hull of the slice's lung minus the lung),
    on ``n_slices`` random slices in 20-85 % of the lungs' z-range, away from ``avoid`` (bool
    (z, y, x): the readers' nodules grown by 8 voxels) -> [("hilum", (i, j, k))]."""
    from skimage.morphology import convex_hull_image

    out = []
    for k in _random_slices(lung, rng, n_slices):
        lk = lung[k]
        med = ndi.binary_opening(convex_hull_image(lk) & ~lk, iterations=2)
        dm = ndi.distance_transform_edt(~med, sampling=(spacing_xyz[1], spacing_xyz[0]))
        ok = lk & (hu[k] > 0) & (hu[k] < 250) & (dm <= 15)
        if avoid is not None:
            ok &= ~avoid[k]
        jj, ii = np.nonzero(ok)
        for n in rng.choice(jj.size, min(per_slice, jj.size), replace=False):
            out.append(("hilum", (int(ii[n]), int(jj[n]), k)))
    return out


def mediastinal_points(lung: np.ndarray, hu: np.ndarray, spacing_xyz, rng: np.random.Generator,
                       n_slices: int = 6, per_kind: int = 2) -> list[tuple[str, tuple[int, int, int]]]:
    """Random soft-tissue clicks between the lungs (module docstring): [(kind, (i, j, k))]."""
    from skimage.morphology import convex_hull_image

    out = []
    for k in _random_slices(lung, rng, n_slices):
        lk = lung[k]
        d = ndi.distance_transform_edt(~lk, sampling=(spacing_xyz[1], spacing_xyz[0]))
        soft = convex_hull_image(lk) & ~lk & (hu[k] > -50) & (hu[k] < 250)
        for kind, ok in (("mediastinum-deep", soft & (d >= 10)), ("mediastinum-near", soft & (d >= 2) & (d < 10))):
            jj, ii = np.nonzero(ok)
            for n in rng.choice(jj.size, min(per_kind, jj.size), replace=False):
                out.append((kind, (int(ii[n]), int(jj[n]), k)))
    return out


def insert_juxtamediastinal(hu: np.ndarray, lung: np.ndarray, labels: np.ndarray | None, spacing_zyx,
                            rng: np.random.Generator, n: int = 10, tries: int = 400) -> list[dict]:
    """Paste training VOI nodules next to the mediastinal lung border of ``hu`` (float32, in place).

    Returns:
        [{"kind": "juxta" | "abut", "mask": bool (z, y, x), "source": str, "size_mm": float}].
    """
    from skimage.morphology import convex_hull_image

    from training.insertion import InsertionError, load_vois, paste_nodule, transform_voi

    vois = load_vois(min_diameter_mm=8.0, max_diameter_mm=30.0)
    sz, sy, sx = spacing_zyx
    zs = np.nonzero(lung.any((1, 2)))[0]
    z0, z1 = int(zs.min()), int(zs.max())
    used, placed = [], []
    for _ in range(tries):
        if len(placed) >= n:
            break
        voi = vois[int(rng.integers(len(vois)))]
        scale = float(rng.uniform(1.0, 2.0)) if voi.diameter_mm < 20 else float(rng.uniform(0.8, 1.3))
        try:
            nod = transform_voi(voi, (sz, sy, sx), scale, float(rng.uniform(0, 360)),
                                tuple(bool(b) for b in rng.integers(0, 2, 3)))
        except InsertionError:
            continue
        r = voi.diameter_mm * scale / 2
        k = int(rng.integers(int(z0 + 0.2 * (z1 - z0)), int(z0 + 0.85 * (z1 - z0))))
        if any(abs(k - u) * sz < 2 * r + 15 for u in used):
            continue
        lk = lung[k]
        med = ndi.binary_opening(convex_hull_image(lk) & ~lk, iterations=2)
        d = ndi.distance_transform_edt(lk, sampling=(sy, sx))
        dm = ndi.distance_transform_edt(~med, sampling=(sy, sx))
        kind = ("juxta", "abut")[len(placed) % 2]
        ok = lk & (d >= 0.4 * r) & (d <= 0.9 * r) & (dm <= r + 2) if kind == "juxta" \
            else lk & (d <= 0.3 * r) & (dm <= 0.3 * r + 2)
        jj, ii = np.nonzero(ok)
        if jj.size == 0:
            continue
        c = int(rng.integers(jj.size))
        backup = hu.copy() if labels is not None else None
        m = paste_nodule(hu, nod, (k, int(jj[c]), int(ii[c])), lung=lung)
        if labels is not None and (ndi.binary_dilation(m, iterations=2) & (labels > 0)).any():
            hu[...] = backup  # touches a readers' nodule: undo
            continue
        used.append(k)
        placed.append({"kind": kind, "mask": m, "source": nod.source["voi"], "size_mm": round(voi.diameter_mm * scale, 1)})
    return placed


def shape_features(ct, mask) -> dict:
    """Figures of the mask alone (no lung mask), recorded to look for vessel signals: how it ends
    across the slices and what it holds (only ``continuation`` is used by the rule).

    Args:
        ct: the CT (HU, LPS geometry); mask: a non-empty :class:`~NoduleMTLLib.core.consensus.MaskBox`
            on its grid.

    Returns:
        ``{"end_ratio_min", "end_ratio_max": float in [0, 1]`` (area of the mask's first and last
        slice over its largest slice area: the smaller and the larger of the two; a nodule tapers
        to small end slices, a tube cut across keeps a full cross-section at its ends),
        ``"area_cv": float`` (coefficient of variation of the non-empty slice areas),
        ``"fill": float`` (volume / volume of the sphere whose diameter is the mask's 3D extent
        along its first principal axis), ``"elong": float`` (sqrt of the ratio of the two largest
        principal variances, mm), ``"solidity": float in [0, 1]`` (largest slice's area over its
        convex hull's), ``"hu_mean", "hu_std", "hu_p10", "hu_p90": float`` (HU of the mask's voxels
        eroded in-plane by one pixel; the whole mask when the erosion is empty),
        ``"n_slices": int``}.
    """
    from skimage.morphology import convex_hull_image

    from NoduleMTLLib.service import mediastinum

    sx, sy, sz = (float(v) for v in ct.spacing)
    m = mask.array
    areas = m.reshape(len(m), -1).sum(1).astype(float)
    nzs = np.nonzero(areas)[0]
    a = areas[nzs[0]:nzs[-1] + 1]
    amax = float(a.max())
    ends = sorted((a[0] / amax, a[-1] / amax))
    big = int(np.argmax(areas))
    hull = convex_hull_image(m[big])
    pts = np.argwhere(m).astype(float) * np.array([sz, sy, sx])
    pts -= pts.mean(0)
    if len(pts) > 20000:
        pts = pts[:: len(pts) // 20000 + 1]
    ev, vec = np.linalg.eigh(np.cov(pts.T)) if len(pts) > 3 else (np.ones(3), np.eye(3))
    ev = np.clip(ev, 1e-6, None)
    proj = pts @ vec[:, -1]
    length = float(proj.max() - proj.min()) + max(sx, sz)
    vol = float(m.sum()) * sx * sy * sz
    er = ndi.binary_erosion(m, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
    z0, y0, x0 = mask.offset_zyx
    hu = np.asarray(ct.array[z0:z0 + m.shape[0], y0:y0 + m.shape[1], x0:x0 + m.shape[2]], dtype=np.float32)
    v = hu[er] if er.any() else hu[m]
    p10, p90 = np.percentile(v, [10, 90])
    return {"continuation": mediastinum.continuation(ct, mask), "end_ratio_min": float(ends[0]), "end_ratio_max": float(ends[1]),
            "area_cv": float(a[a > 0].std() / a[a > 0].mean()), "fill": vol / (math.pi / 6 * length ** 3),
            "elong": float(math.sqrt(ev[-1] / ev[-2])), "solidity": float(areas[big] / hull.sum()),
            "hu_mean": float(v.mean()), "hu_std": float(v.std()), "hu_p10": float(p10), "hu_p90": float(p90),
            "n_slices": int(len(a))}


def continuation_core_only(ct, mask) -> float:
    """:func:`NoduleMTLLib.service.mediastinum.continuation`, looking only at each end slice's pixels
    at least ``mediastinum.CORE_MM`` from that slice mask's edge (all of them when none is): a
    training-time feature, float in [0, 1]."""
    from NoduleMTLLib.service import mediastinum

    sx, sy = (float(v) for v in ct.spacing[:2])
    ends, (lo, hi) = mediastinum.continuation_ends(ct, mask)
    shares = []
    for e in ends:
        if e is None:
            shares.append(0.0)
            continue
        sel, h = e
        c = ndi.distance_transform_edt(np.pad(sel, 1), sampling=(sy, sx))[1:-1, 1:-1] >= mediastinum.CORE_MM
        sel = c if c.any() else sel
        shares.append(float(((h[sel] >= lo) & (h[sel] <= hi)).mean()))
    return min(shares)


def tube_features(ct, mask) -> dict:
    """Figures that tell a piece of a vessel or of the heart from a bounded lesion (issue 22 item 7,
    third round; measured by ``training/mediastinum_eval.py``, not from a paper).

    Args:
        ct: the CT (HU); mask: a non-empty :class:`~NoduleMTLLib.core.consensus.MaskBox` on its grid.

    Returns:
        ``{"continuation": float in [0, 1]`` (:func:`~NoduleMTLLib.service.mediastinum.continuation`),
        ``"continuation_core": float in [0, 1]`` (the same on the end slices' core pixels only,
        :data:`~NoduleMTLLib.service.mediastinum.CORE_MM` from their edge: a curving vessel's rim leaves its lumen),
        ``"end_fill": float >= 0`` (the smaller end slice's area over the median slice area: a
        tube cut across keeps a full cross-section at its ends, a lesion tapers; 1 for one slice),
        ``"roundness": float in [0, 1]`` (median over the slices of >= 10 pixels of
        sqrt(minor / major principal variance) of the slice's pixels in mm; 1 for a disk),
        ``"area_cv": float >= 0`` (coefficient of variation of the slice areas, first to last slice),
        ``"same_hu_contact": float in [0, 1]`` (share of the mask's outer 6-neighbour shell, inside
        the CT, whose HU lies in the core's band of :func:`~NoduleMTLLib.service.mediastinum.continuation`: a piece cut out of a
        longer structure touches more of itself than a lesion in lung or fat),
        ``"side_same_hu": float in [0, 1]`` (the same on the in-plane shell only),
        ``"lung_contact": float in [0, 1]`` (share of the shell below :data:`mediastinum.AIR_CONTACT_HU`),
        ``"end_tube_ratio", "end_tube_ratio_o2", "end_tube_ratio_o4": float >= 0`` (:func:`end_tube_ratio`
        with ``open_mm`` 0, 2 and 4), ``"band_lo", "band_hi": float`` (the core's HU band, HU)}.
    """
    from NoduleMTLLib.service import mediastinum

    sx, sy, sz = (float(v) for v in ct.spacing)
    m = mask.array
    z0, y0, x0 = mask.offset_zyx
    nz, ny, nx = ct.shape_zyx
    cont, (lo, hi) = mediastinum._continuation(ct, mask)
    cont_core = continuation_core_only(ct, mask)
    areas = m.reshape(len(m), -1).sum(1).astype(float)
    zs = np.nonzero(areas)[0]
    a = areas[zs[0]:zs[-1] + 1]
    end_fill = float(min(a[0], a[-1]) / np.median(a[a > 0]))
    rounds = []
    for k in range(len(m)):
        if areas[k] >= 10:
            yy, xx = np.nonzero(m[k])
            ev = np.linalg.eigvalsh(np.cov(np.stack([yy * sy, xx * sx])))
            rounds.append(math.sqrt(max(ev[0], 0.0) / max(ev[1], 1e-9)))
    # the outer shell, on the box grown by one voxel and cut to the CT
    g0 = np.array([z0, y0, x0]) - 1
    g1 = np.array([z0, y0, x0]) + np.array(m.shape) + 1
    c0, c1 = np.maximum(g0, 0), np.minimum(g1, (nz, ny, nx))
    box = np.pad(m, 1)
    six = ndi.generate_binary_structure(3, 1)
    shell = ndi.binary_dilation(box, six) & ~box
    side = ndi.binary_dilation(box, np.array([np.zeros((3, 3)), six[1], np.zeros((3, 3))], bool)) & ~box
    sl = tuple(slice(int(p - q), int(r - q)) for p, q, r in zip(c0, g0, c1))
    hu = np.asarray(ct.array[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]], dtype=np.float32)
    sh, sd = hu[shell[sl]], hu[side[sl]]

    def share(v, lo_, hi_):
        return float(((v >= lo_) & (v <= hi_)).mean()) if v.size else 0.0

    return {"continuation": cont, "continuation_core": cont_core, "end_fill": end_fill,
            "roundness": float(np.median(rounds)) if rounds else 1.0,
            "area_cv": float(a.std() / a.mean()) if a.mean() > 0 else 0.0,
            "same_hu_contact": share(sh, lo, hi), "side_same_hu": share(sd, lo, hi),
            "lung_contact": float((sh < mediastinum.AIR_CONTACT_HU).mean()) if sh.size else 0.0,
            "end_tube_ratio": end_tube_ratio(ct, mask, (lo, hi)),
            "end_tube_ratio_o2": end_tube_ratio(ct, mask, (lo, hi), 2.0),
            "end_tube_ratio_o4": end_tube_ratio(ct, mask, (lo, hi), 4.0), "band_lo": lo, "band_hi": hi}


#: In-plane margin (mm) of the window in which :func:`end_tube_ratio` follows the structure past the mask's ends.
TUBE_WINDOW_MM = 20.0
#: :func:`end_tube_ratio`'s value for an end with no bounded structure (it reaches the window's edge,
#: or the look-up slice lies outside the CT).
UNBOUNDED = 99.0


def end_tube_ratio(ct, mask, band: tuple[float, float] | None = None, open_mm: float = 0.0) -> float:
    """Whether what runs on past the mask's ends is a tube of the mask's calibre.

    For each end slice of the mask, on the slice :data:`mediastinum.CONT_DIST_MM` past it (as
    :func:`~NoduleMTLLib.service.mediastinum.continuation`), the pixels in the core's HU band are split into 4-connected components
    inside the mask's in-plane box grown by :data:`TUBE_WINDOW_MM`; the components that overlap the
    end slice's mask are that end's continuing structure.  The end's ratio is their area over the
    end slice's mask area: about 1 for a vessel cut across (the same cross-section goes on), 0 when
    nothing goes on (a lesion's rounded end in lung or fat), :data:`UNBOUNDED` when the structure
    reaches the window's edge (the heart, the mediastinum en bloc beside a mass) or the look-up slice
    lies outside the CT.  Not from a paper (issue 22 item 7, third round).

    Args:
        ct: the CT (HU); mask: a non-empty :class:`~NoduleMTLLib.core.consensus.MaskBox` on its grid;
        band: the core's HU band (low, high) when already computed.
        open_mm: before splitting, the in-band pixels are opened with a disk of this radius (mm;
            0: not opened), which cuts bridges narrower than its diameter (soft tissue touching
            the vessel across a thin fat plane).

    Returns:
        the larger of the two ends' ratios, float >= 0.
    """
    from NoduleMTLLib.service import mediastinum

    sx, sy, sz = (float(v) for v in ct.spacing)
    m = mask.array
    z0, y0, x0 = mask.offset_zyx
    nz, ny, nx = ct.shape_zyx
    if band is None:
        hu = np.asarray(ct.array[z0:z0 + m.shape[0], y0:y0 + m.shape[1], x0:x0 + m.shape[2]], dtype=np.float32)
        band = mediastinum._core_band(hu, m, (sy, sx))
    lo, hi = band
    step = max(1, int(math.ceil(mediastinum.CONT_DIST_MM / sz - 1e-6)))
    wy, wx = int(math.ceil(TUBE_WINDOW_MM / sy)), int(math.ceil(TUBE_WINDOW_MM / sx))
    a0, a1 = max(0, y0 - wy), min(ny, y0 + m.shape[1] + wy)
    b0, b1 = max(0, x0 - wx), min(nx, x0 + m.shape[2] + wx)
    zs = np.nonzero(m.reshape(len(m), -1).any(1))[0]
    ratios = []
    for end, d in ((int(zs[0]), -1), (int(zs[-1]), 1)):
        b = z0 + end + d * step
        if not 0 <= b < nz:
            ratios.append(UNBOUNDED)
            continue
        h = np.asarray(ct.array[b, a0:a1, b0:b1], dtype=np.float32)
        inb = (h >= lo) & (h <= hi)
        if open_mm > 0:
            ry, rx = open_mm / sy, open_mm / sx
            yy, xx = np.ogrid[-int(ry):int(ry) + 1, -int(rx):int(rx) + 1]
            inb = ndi.binary_opening(inb, structure=(yy / max(ry, 1e-6)) ** 2 + (xx / max(rx, 1e-6)) ** 2 <= 1)
        lab, _ = ndi.label(inb)
        e = np.zeros(h.shape, bool)
        e[y0 - a0:y0 - a0 + m.shape[1], x0 - b0:x0 - b0 + m.shape[2]] = m[end]
        ids = np.unique(lab[e & (lab > 0)])
        if not ids.size:
            ratios.append(0.0)
            continue
        comp = np.isin(lab, ids)
        edge = comp[0].any() or comp[-1].any() or comp[:, 0].any() or comp[:, -1].any()
        ratios.append(UNBOUNDED if edge else float(comp.sum()) / float(m[end].sum()))
    return max(ratios)


def _dump_mask(folder: Path, row: dict, ct, box) -> None:
    """Save a click's mask box and the HU under it (+ 4 voxels) to ``folder`` (npz), for offline features."""
    folder.mkdir(parents=True, exist_ok=True)
    o = np.array(box.offset_zyx)
    lo = np.maximum(o - 4, 0)
    hi = np.minimum(o + np.array(box.array.shape) + 4, ct.shape_zyx)
    hu = np.asarray(ct.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).astype(np.int16)
    name = f"{row['scan']}_{row['kind']}_{'_'.join(map(str, row['ijk']))}.npz"
    np.savez_compressed(folder / name, mask=box.array, offset=o, hu=hu, hu_offset=lo,
                        spacing=np.array(ct.spacing, float))
    row["dump"] = name


def mass_clicks(ct, lung: np.ndarray, labels: np.ndarray | None, vois: list, rng: np.random.Generator, n: int,
                name: str = "") -> list[tuple]:
    """``n`` synthetic masses against the mediastinum (``training.mass_insertion.paste_mass``,
    placement ``"juxtamediastinal"``, :data:`MASS_MM`, at least :data:`MASS_MIN_LUNG_SHARE` of the
    mass in the lung mask), each clicked twice: at the mask's centroid (``mass-mediastinal``) and at
    a random voxel of its inner part (``mass-mediastinal-off``: at least 0.3 x the largest depth
    from the mask's edge) -> [(kind, (i, j, k), truth mask, extra, slab CT)]."""
    from training.insertion import InsertionError
    from training.mass_insertion import paste_mass

    lab = labels if labels is not None else np.zeros(lung.shape, np.uint8)
    out = []
    for _ in range(n):
        try:
            sm = paste_mass(ct, lung, lab, vois, rng, name, placement="juxtamediastinal", target_mm=MASS_MM,
                            min_lung_share=MASS_MIN_LUNG_SHARE)
        except InsertionError:
            continue
        m = sm.mask
        extra = {k: sm.record[k] for k in ("target_mm", "thick_factor", "slice_mm", "voi", "mass_ml") if k in sm.record}
        c = np.array(np.nonzero(m)).mean(1).round().astype(int)
        if not m[tuple(c)]:
            c = np.argwhere(m)[len(np.argwhere(m)) // 2]
        sx, sy, sz = sm.ct.spacing
        dep = ndi.distance_transform_edt(m, sampling=(sz, sy, sx))
        cand = np.argwhere(dep >= 0.3 * dep.max())
        o = cand[int(rng.integers(len(cand)))]
        for kind, v in (("mass-mediastinal", c), ("mass-mediastinal-off", o)):
            out.append((kind, (int(v[2]), int(v[1]), int(v[0])), m, dict(extra), sm.ct))
    return out


#: Synthetic masses of :func:`mass_clicks`: diameter range (mm) and smallest share in the lung mask.
MASS_MM = (30.0, 80.0)
MASS_MIN_LUNG_SHARE = 0.4


def evaluate_scan(folder: Path, seed: int, networks: dict, log=print, dump: Path | None = None,
                  n_masses: int = 0, vois: list | None = None) -> list[dict]:
    """Every click of the module docstring on one whole scan -> one record per click (``dump``: a
    folder where the non-small masks are saved, :func:`_dump_mask`; ``n_masses``: synthetic masses
    against the mediastinum, :func:`mass_clicks`, from ``vois`` = ``training.mass_insertion.solid_vois()``,
    with their own random generator, so the other clicks are unchanged)."""
    import SimpleITK as sitk

    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.core.io import CTVolume, read_ct
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.detection.preprocess import lung_mask_from_ct
    from NoduleMTLLib.inference import pipeline
    from NoduleMTLLib.service import mediastinum

    ct = read_ct(folder / "ct.nrrd")
    rng = np.random.default_rng(seed)
    lung = lung_mask_from_ct(ct).labels > 0
    hu = np.asarray(ct.array)
    lab_path = folder / "nodules_labels.nrrd"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_path))) if lab_path.exists() else None
    avoid = None if labels is None else ndi.binary_dilation(labels > 0, iterations=8)
    clicks = [(kind, ijk, None, {}) for kind, ijk in mediastinal_points(lung, hu, ct.spacing, rng)]
    for r in csv.DictReader(open(folder / "nodules.csv")):
        p = (float(r["center_lps_x"]), float(r["center_lps_y"]), float(r["center_lps_z"]))
        clicks.append(("labelled-nodule", tuple(int(round(v)) for v in ct.world_lps_to_index(p)), None,
                       {"size_mm": round(float(r["diameter_mm"]), 1)}))
    # the inserted nodules live in a copy of the scan (its own lung mask)
    hu2 = hu.astype(np.float32)
    placed = insert_juxtamediastinal(hu2, lung, labels, tuple(ct.spacing[::-1]), rng)
    img = sitk.GetImageFromArray(hu2)
    img.CopyInformation(ct.image)
    ct2 = CTVolume(img, source=str(folder / "ct.nrrd") + " + inserted nodules")
    for pl in placed:
        c = np.array(np.nonzero(pl["mask"])).mean(1).round().astype(int)
        if not pl["mask"][tuple(c)]:
            c = np.argwhere(pl["mask"])[len(np.argwhere(pl["mask"])) // 2]
        clicks.append((f"inserted-{pl['kind']}", (int(c[2]), int(c[1]), int(c[0])), pl["mask"],
                       {"size_mm": pl["size_mm"], "source": pl["source"]}))

    # in-lung hilar clicks (own generator: the clicks above are those of the first version of this evaluation)
    clicks += [(kind, ijk, None, {}) for kind, ijk in
               hilum_points(lung, hu, ct.spacing, np.random.default_rng(seed + 7_000_000), avoid)]
    clicks = [c + ((ct2 if c[2] is not None else ct),) for c in clicks]
    if n_masses:
        clicks += mass_clicks(ct, lung, labels, vois, np.random.default_rng(seed + 8_000_000), n_masses, folder.name)
    rows = []
    for kind, (i, j, k), truth, extra, c_ in clicks:
        p = c_.image.TransformIndexToPhysicalPoint((i, j, k))
        # the engine's answer (the service applies the rule after it: NoduleMTLLib.service.analysis.analyze)
        n = pipeline.analyze_points(c_, [p], network_ids=DEFAULT_NETWORKS, device="cpu", networks=networks).nodules[0]
        row = {"scan": folder.name, "kind": kind, "ijk": [i, j, k], **extra, "found": n.found, "message": n.message}
        if n.found:
            f = mediastinum.mediastinal_features(c_, p, n.mask_box, mediastinum.continuation(c_, n.mask_box))
            d_mm = mediastinum.measured_long_axis(n)  # the mask's own long axis (no reported size correction)
            row.update(diameter_mm=round(d_mm, 1), volume_mm3=round(n.volume_mm3),
                       small=mediastinum.is_small(d_mm, n.volume_mm3),
                       features=None if f is None else {k_: round(v, 4) if isinstance(v, float) else v for k_, v in f.items()},
                       shape={k_: round(v, 4) for k_, v in shape_features(c_, n.mask_box).items()},
                       tube={k_: round(v, 4) for k_, v in tube_features(c_, n.mask_box).items()})
            if dump is not None and not row["small"]:
                _dump_mask(dump, row, c_, n.mask_box)
            if truth is not None:
                row["dice"] = round(float(dice(n.mask_box.to_full(), truth)), 3)
        rows.append(row)
        log(json.dumps(row))
    return rows


def at_stake(r: dict) -> bool:
    """A click whose answer the rule decides on: a non-small mask, the click outside the lung
    mask and between the lungs."""
    f = r.get("features")
    return bool(r.get("found") and not r.get("small") and f and not f["click_in_lung"] and f["between_lungs"])


def refused(r: dict, continuation_signal: bool | None = None) -> bool:
    """Whether the rule (``NoduleMTLLib.service.mediastinum.refuses``, its current constants; the
    continuation signal as shipped, or on / off) refuses this recorded click."""
    from NoduleMTLLib.service import mediastinum

    return bool(r.get("found") and not r.get("small") and r.get("features")
                and mediastinum.refuses(r["features"], r["diameter_mm"], continuation_signal))


def is_nodule(r: dict) -> bool:
    """A click on a nodule or mass (the readers', a pasted nodule or a synthetic mass), as opposed to
    a mediastinal or hilar click."""
    return r["kind"] == "labelled-nodule" or r["kind"].startswith(("inserted", "mass"))


def choose(rows: list[dict]) -> dict:
    """The rule's fitted constants (``NoduleMTLLib.service.mediastinum``).

    From the nodule clicks at stake (readers' and pasted nodules, the protected class these two
    were chosen on): the lung fraction - the largest multiple of 0.05 below the smallest nodule's;
    the z ratio - the smallest multiple of 0.1 at least 0.15 above the largest nodule's.  From every
    protected click with a larger mask (nodules and, when present, the synthetic masses: the
    continuation also decides in-lung hilar clicks): the continuation - the smallest multiple of 0.1
    at least 0.15 above the largest.  The synthetic masses' own figures are reported beside them
    (``masses_*``): they lie mostly outside the lung mask by design of the rule (only the shape and
    the continuation protect them), so the lung fraction is not re-fitted on them."""
    nod = [r for r in rows if is_nodule(r) and not r["kind"].startswith("mass") and at_stake(r)]
    fr = min(r["features"]["lung_fraction"] for r in nod)
    zr = max(r["features"]["z_extent_mm"] / r["diameter_mm"] for r in nod)
    out = {"nodules_at_stake": len(nod), "smallest_nodule_lung_fraction": round(fr, 4),
           "largest_nodule_z_ratio": round(zr, 3), "min_lung_fraction": round(np.ceil(fr / 0.05 - 1) * 0.05, 2),
           "min_z_ratio": round(np.ceil((zr + 0.15) / 0.1 - 1e-9) * 0.1, 1)}
    ms = [r for r in rows if r["kind"].startswith("mass") and at_stake(r)]
    if ms:
        zs = sorted((r["features"]["z_extent_mm"] / r["diameter_mm"], r.get("dice")) for r in ms)
        out.update(masses_at_stake=len(ms),
                   masses_under_min_lung_fraction=sum(r["features"]["lung_fraction"] < 0.2 for r in ms),
                   masses_largest_z_ratios_with_dice=[[round(z, 3), d] for z, d in zs[-3:]])
    big = [r for r in rows if is_nodule(r) and r.get("found") and not r.get("small") and r.get("features")
           and "continuation" in r["features"]]
    if big:  # the continuation applies to in-lung (hilar) clicks too: every protected click with a larger mask
        c = max(r["features"]["continuation"] for r in big)
        out.update(nodules_with_larger_mask=len(big), largest_nodule_continuation=round(c, 4),
                   min_continuation=round(np.ceil((c + 0.15) / 0.1 - 1e-9) * 0.1, 1))
    return out


#: Figures of :func:`tube_features` studied as vessel / heart signals (third round), and
#: the sense in which each points to a vessel (+1: higher; -1: lower).
TUBE_FEATURES = {"continuation": 1, "continuation_core": 1, "same_hu_contact": 1, "side_same_hu": 1,
                 "end_fill": 1, "roundness": 1, "area_cv": -1, "lung_contact": -1}
#: The tube signal (the ratio of :func:`end_tube_ratio`), fixed before the data were seen: a tube of the
#: mask's calibre goes on past both ends (ratio at most this) ...
TUBE_RATIO = 2.0
#: ... and the protected clicks that decide its continuation threshold are those with a ratio up to
#: this factor x :data:`TUBE_RATIO` (the margin on the ratio) ...
TUBE_RATIO_MARGIN = 1.5
#: ... the threshold being at least this (most of the end slices goes on).
TUBE_MIN_CONTINUATION = 0.5


def eligible(r: dict) -> bool:
    """A click the rule can refuse with a vessel signal: outside the lung mask, between the lungs,
    under ``MIN_LUNG_FRACTION`` of the mask in the lung mask; or inside it within ``HILUM_MM`` of
    the mediastinum."""
    from NoduleMTLLib.service import mediastinum

    f = r["features"]
    if f["click_in_lung"]:
        return f.get("click_to_mediastinum_mm", float("inf")) <= mediastinum.HILUM_MM
    return bool(f["between_lungs"] and f["lung_fraction"] < mediastinum.MIN_LUNG_FRACTION)


def tube_study(rows: list[dict], margin: float = 0.15) -> dict:
    """Each :data:`TUBE_FEATURES` figure as a one-feature vessel signal, chosen as the continuation
    was: the threshold is the nearest multiple of 0.1 at least ``margin`` beyond the most vessel-like
    value of a protected click (readers' nodule, pasted nodule or synthetic mass) with a larger mask,
    in or out of the lung; then the mediastinal / hilar clicks with a larger mask that it would
    refuse on top of the shipped rule (``eligible`` and not refused as shipped), and those >= 40 mm.
    Rows without ``tube`` figures (records of the earlier rounds) are skipped."""
    big = [r for r in rows if r.get("found") and not r.get("small") and r.get("features") and r.get("tube")]
    prot = [r for r in big if is_nodule(r)]
    other = [r for r in big if not is_nodule(r) and eligible(r) and not refused(r)]
    out = {"protected_larger": len(prot), "mediastinal_hilar_eligible_kept": len(other)}
    for f, sense in TUBE_FEATURES.items():
        if not prot:
            break
        worst = max(sense * r["tube"][f] for r in prot)
        thr = float(np.ceil((worst + margin) / 0.1 - 1e-9) * 0.1)
        hit = [r for r in other if sense * r["tube"][f] >= thr - 1e-9]
        out[f] = {"most_vessel_like_protected": round(sense * worst, 4), "threshold": round(sense * thr, 1),
                  "more_refused": len(hit), "more_refused_ge_40mm": sum(r["diameter_mm"] >= 40 for r in hit)}
    for key in ("end_tube_ratio", "end_tube_ratio_o2", "end_tube_ratio_o4"):
        if not prot or not all(key in r["tube"] for r in big):
            continue
        # the tube signal: continuation >= c and the ratio <= TUBE_RATIO; c from the protected
        # clicks with a ratio <= TUBE_RATIO_MARGIN x TUBE_RATIO (margin 0.15 as above)
        near = [r for r in prot if r["tube"][key] <= TUBE_RATIO_MARGIN * TUBE_RATIO]
        worst = max([r["tube"]["continuation"] for r in near] or [0.0])
        thr = max(TUBE_MIN_CONTINUATION, float(np.ceil((worst + margin) / 0.1 - 1e-9) * 0.1))
        hit = [r for r in other if r["tube"]["continuation"] >= thr - 1e-9 and r["tube"][key] <= TUBE_RATIO]
        out[f"tube_signal_{key}"] = {"max_ratio": TUBE_RATIO, "protected_within_ratio_margin": len(near),
                              "their_largest_continuation": round(worst, 4), "min_continuation": round(thr, 1),
                              "more_refused": len(hit), "more_refused_ge_40mm": sum(r["diameter_mm"] >= 40 for r in hit),
                              "more_refused_not_by_continuation_alone": sum(
                                  r["tube"]["continuation"] < mediastinum_min_continuation() for r in hit)}
    return out


def mediastinum_min_continuation() -> float:
    """``mediastinum.MIN_CONTINUATION`` (the continuation signal's own threshold)."""
    from NoduleMTLLib.service import mediastinum

    return mediastinum.MIN_CONTINUATION


def summarize(rows: list[dict]) -> dict:
    """Counts per kind under the rule's current constants, the constants the rows choose, and
    :func:`tube_study`."""
    from NoduleMTLLib.service import mediastinum

    out = {"rule": {"min_lung_fraction": mediastinum.MIN_LUNG_FRACTION, "min_z_ratio": mediastinum.MIN_Z_RATIO,
                    "min_structure_mm": mediastinum.MIN_STRUCTURE_MM, "min_continuation": mediastinum.MIN_CONTINUATION,
                    "hilum_mm": mediastinum.HILUM_MM, "continuation_signal": mediastinum.CONTINUATION_SIGNAL},
           "chosen_here": choose(rows), "tube_study": tube_study(rows)}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        big = [r for r in rs if r["found"] and not r.get("small")]
        out[kind] = {"clicks": len(rs), "not_found": sum(not r["found"] for r in rs),
                     "small_mask": sum(bool(r["found"] and r.get("small")) for r in rs),
                     "larger_mask": len(big), "at_stake": sum(at_stake(r) for r in rs),
                     "refused": sum(refused(r) for r in rs), "larger_kept": sum(not refused(r) for r in big),
                     "refused_with_continuation": sum(refused(r, True) for r in rs)}
        d = [r["dice"] for r in rs if "dice" in r]
        if d:
            out[kind]["dice_median"] = round(float(np.median(d)), 3)
    return out


def voi_refusals(splits=("train", "val"), data_dir=None, log=print, records=None) -> dict:
    """Run the analysis service (``NoduleMTLLib.service.analysis.analyze``, default networks) on every
    ``lidc_vois`` VOI of the click split's ``splits`` patients, clicked at the labelled centre; count
    the clicks the mediastinal rule refuses (its message), those where it could apply at all (field
    of view >= ``mediastinum.MIN_FOV_MM``), and the Dice median against the readers' mask.
    ``records`` (an open text file, optional): one JSON line per found VOI with the mask's size and
    :func:`shape_features` (on these tight crops the continuation is 0 when the mask reaches the crop's
    first or last slice: not informative)."""
    import SimpleITK as sitk

    from NoduleMTLLib.core.io import CTVolume
    from NoduleMTLLib.core.metrics import dice
    from NoduleMTLLib.service import analysis, mediastinum
    from training.data import default_data_dir, load_split

    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    split = load_split()
    models = analysis.ModelCache()
    out = {}
    for name in splits:
        patients = set(split[name])
        rows = [r for r in csv.DictReader(open(d / "labels.csv")) if r["patient_id"] in patients]
        n = refused = applicable = found = 0
        dices = []
        for r in rows:
            img = sitk.ReadImage(str(d / r["image"]))
            ct = CTVolume(img, source=r["image"])
            c = (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))
            if not ct.contains_lps(c):
                continue
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / r["mask"]))) > 0
            res = analysis.analyze(ct, [c], device="cpu", models=models, assess=False).nodules[0]
            n += 1
            found += int(res.found)
            refused += int(res.message == mediastinum.MESSAGE)
            sx, sy, _ = ct.spacing
            applicable += int(img.GetSize()[0] * sx >= mediastinum.MIN_FOV_MM and img.GetSize()[1] * sy >= mediastinum.MIN_FOV_MM)
            dices.append(dice(res.mask_box.to_full() if res.found else np.zeros_like(ref), ref))
            if records is not None and res.found:
                d_mm = mediastinum.measured_long_axis(res)
                records.write(json.dumps({
                    "split": name, "image": r["image"], "diameter_mm": round(d_mm, 1), "volume_mm3": round(res.volume_mm3),
                    "small": mediastinum.is_small(d_mm, res.volume_mm3), "z_extent_mm": round(
                        (res.mask_box.array.shape[0] - 1) * float(ct.spacing[2]), 2),
                    "shape": {k: round(v, 4) for k, v in shape_features(ct, res.mask_box).items()}}) + "\n")
                records.flush()
        out[name] = {"vois": n, "found": found, "refused_as_mediastinal": refused, "rule_applicable_fov": applicable,
                     "dice_median": round(float(np.median(dices)), 4)}
        log(json.dumps({name: out[name]}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="train", choices=("train", "val"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary-only", action="store_true", help="summarize an existing --out file")
    ap.add_argument("--masses", type=int, default=0,
                    help="synthetic masses against the mediastinum per scan and seed (mass_clicks; protected class)")
    ap.add_argument("--dump", type=Path, help="save the non-small masks and their HU here (npz per click)")
    ap.add_argument("--vois", nargs="+", choices=("train", "val"),
                    help="instead: count the rule's refusals on these splits' lidc_vois through the analysis service")
    a = ap.parse_args(argv)
    if a.vois:
        if a.out:
            with open(a.out, "w") as fh:
                voi_refusals(a.vois, records=fh)
        else:
            voi_refusals(a.vois)
        return 0
    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.models.registry import load_network
    from training.wholescan import load_split

    out = a.out or REPO / "training" / "reports" / f"mediastinum_{a.role}.jsonl"
    if not a.summary_only:
        scans = load_split()[a.role]  # never "test"
        nets = {n: load_network(n, "cpu") for n in DEFAULT_NETWORKS}
        vois = None
        if a.masses:
            from training.mass_insertion import solid_vois
            vois = solid_vois()
        rows = []
        with open(out, "w") as fh:
            for seed in a.seeds:
                for s in scans:
                    for r in evaluate_scan(_cache_root() / s, seed * 1000 + int(s[-4:]), nets, log=lambda m: None,
                                           dump=a.dump, n_masses=a.masses, vois=vois):
                        fh.write(json.dumps(r) + "\n")
                        fh.flush()
                        rows.append(r)
    rows = [json.loads(line) for line in open(out)]
    print(json.dumps(summarize(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
