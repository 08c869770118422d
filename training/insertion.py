"""Nodule insertion: paste training patients' HU nodules into whole training scans (issue 27).

Four whole training scans hold about ten nodules; the whole-slice fine-tune of
``maskrcnn25d`` (``training/detection_wholeslice.py``) therefore saw few positives in real
context.  This module makes more: it takes the HU volumes of interest and masks of
``lidc_vois`` (training patients only), transforms them (isotropic scale 0.5-2x, in-plane
rotation, flips), and pastes them into the lungs of a whole training scan, blended into
the local background; the pasted mask becomes a ground-truth instance for the detector.

What we follow:

* Copy-paste augmentation for instance detection / segmentation: G. Ghiasi, Y. Cui,
  A. Srinivas, R. Qian, T.-Y. Lin, E. D. Cubuk, Q. V. Le, B. Zoph, "Simple Copy-Paste is a
  Strong Data Augmentation Method for Instance Segmentation", CVPR 2021 (objects of one
  image pasted into another with scale jitter, the pasted masks become targets; their
  result that plain pasting without context modelling works is why we place nodules by
  simple rules).
* Lesion insertion in CT: hybrid images made by inserting segmented real lesions into
  patient CT, blended into the background, used as a ground-truth-known test / training
  bed - e.g. E. Samei and co-workers' lesion-insertion tool (Solomon & Samei, "A generic
  framework to simulate realistic lung, liver and renal pathologies in CT imaging",
  Phys. Med. Biol. 59 (2014) 6637) and the FDA "hybrid CT" nodule-insertion datasets
  (Gavrielides, Petrick et al., e.g. Med. Phys. 2010 / FDA phantom work).  We insert in
  the image domain (no projection-domain noise modelling): a known simplification.

Blending (:func:`paste_nodule`): with ``bg`` the scan's HU and ``nod`` the transformed
nodule HU,  ``new = bg + w * (nod - bg)`` where ``w`` = 1 inside the nodule mask and a
Gaussian-smoothed (``edge_sigma_mm``) copy of the mask outside it, so the nodule keeps
its own HU and edge inside the mask, and its VOI's immediate surroundings fade into the
scan over about a millimetre.  Where the scan is not lung (chest wall, mediastinum: the
part of a juxtapleural nodule that crosses the pleura) the result is ``max(new, bg)``:
soft tissue is never darkened into a hole.

Placement (:func:`sample_centre`, on one axial slice): ``"free"`` (in aerated lung, at
least the nodule's radius + 1 mm from the lung border), ``"juxtapleural"`` (centre at
0.4-0.9 x the radius from the lung border: the nodule touches / abuts the pleura) and
``"juxtavascular"`` (next to a vessel: a lung pixel > -500 HU deep in the lung, the
centre 0.6-1.0 x the radius away from it).  A placement is refused when under half the
nodule mask lies in the lung mask (the detector's targets drop such instances, as
``training.detection.mosaic``), or when its mask (grown 2 px) touches a labelled nodule
or a nodule pasted before.

Masses (``insert.p_mass``, ``insert.mass_mm``): in that share of inserted samples the first lesion
is a mass, a solid training VOI of 12-30 mm (mean HU > -250) scaled to a diameter drawn uniformly in
``mass_mm`` (35-70 mm), placed free or juxtapleural, with the slab around slice k grown to hold 3/4
of the largest mass's extent; its cross-section on the sample's slice is one target, so that the
detector learns a 4-8 cm mass as one object (issue 27; the same synthesis as
:mod:`training.mass_insertion`, which evaluates masses).

Thick slices (:func:`thick_groups`): the 2.5D input stacks 5 adjacent slices (k-2..k+2,
``NoduleMTLLib.detection.preprocess.stack_indices``); a scan reconstructed at ``f`` times
the slice spacing is simulated by averaging ``f`` adjacent thin slices per channel (HU
mean) and the label of a thick slice is the mean of its thin labels >= 0.5 (per nodule).
``thick_factors`` gives the factors that make 2.5-8 mm slices from a scan's spacing.  The
existing whole-slice code does no thickening (it feeds native slices); the click network's
trainer (``training/click2d.py``, ``p_thick_slice``) averages 3 or 5 slices the same way.

The network input of an inserted sample (:func:`inserted_sample`) is made exactly as the
whole-scan search makes it (``NoduleMTLLib.detection.infer._SlicePreprocessor``): HU
window, CLAHE on the full axial slice, times the lung mask of the (thin) slice at each
channel's centre, cropped to the search's box of slice k.

Data: ``$NODULEMTL_DATA/lidc_vois`` (``images/*.nii.gz`` int16 HU, ``masks/*`` 0/1, LPS,
native spacing); only patients of the click split's train role
(``training/splits/lidc_patient_split.json``) that are neither val / test whole scans
(``training/splits/lidc_wholescan_split.json``) nor reserved (LIDC-IDRI-0001 / -0009:
refused before any file is read).  Arrays are (z, y, x); spacings in mm (z, y, x).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

#: Defaults of the insertion settings (config section ``"wholeslice"``, keys ``insert_*``).
DEFAULTS = {
    "scale_min": 0.5,
    "scale_max": 2.0,
    "min_diameter_mm": 3.0,  # after scaling
    "max_diameter_mm": 32.0,
    "n_min": 1,
    "n_max": 3,
    "p_kind": {"free": 0.4, "juxtapleural": 0.3, "juxtavascular": 0.3},
    "edge_sigma_mm": 0.7,
    "p_thick": 0.3,
    "thick_mm": [2.5, 8.0],
    "tries": 12,
    # masses (issue 27): share of inserted samples whose first pasted lesion is a mass, and its
    # diameter range (mm); the sources are solid training VOIs (training.mass_insertion's choice)
    "p_mass": 0.0,
    "mass_mm": [35.0, 70.0],
}

KINDS = ("free", "juxtapleural", "juxtavascular")
#: HU above which a lung pixel counts as vessel / soft tissue for juxtavascular placement.
VESSEL_HU = -500.0
#: Label values given to pasted nodules (the scans' own nodules are 1..n < 200).
INSERTED_LABEL0 = 200


class InsertionError(ValueError):
    """A nodule cannot be inserted (no valid place, bad input)."""


@dataclass
class VOI:
    """One ``lidc_vois`` nodule.

    Attributes:
        patient, nodule_id: LIDC patient folder name and nodule number.
        hu: float32 (z, y, x) HU, cropped to the mask's bounding box + 3 px (1 slice in z).
        mask: bool (z, y, x), same grid (not empty).
        spacing_zyx: (z, y, x) voxel size in mm.
        diameter_mm: ``labels.csv`` diameter.
    """

    patient: str
    nodule_id: int
    hu: np.ndarray
    mask: np.ndarray
    spacing_zyx: tuple[float, float, float]
    diameter_mm: float


@dataclass
class Nodule:
    """A transformed nodule on a target grid (output of :func:`transform_voi`).

    Attributes:
        hu: float32 (z, y, x) HU; NaN where the VOI gives no value (outside its crop).
        mask: bool (z, y, x), the pasted ground truth (linear-interpolated mask >= 0.5).
        weight: float32 (z, y, x) in [0, 1], the blending weight (1 on ``mask``).
        source: "<patient>_<nodule_id>" and the transform, for logs.
    """

    hu: np.ndarray
    mask: np.ndarray
    weight: np.ndarray
    source: dict = field(default_factory=dict)

    @property
    def centre(self) -> np.ndarray:
        """Index (z, y, x) of the grid centre (the point placed on the chosen centre)."""
        return (np.array(self.hu.shape) - 1) // 2


def default_data_root() -> Path:
    """``$NODULEMTL_DATA`` or ``../shared/data`` (the project's data root)."""
    return Path(os.environ.get("NODULEMTL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def insertion_patients() -> set[str]:
    """Patients whose VOIs may be pasted: the click split's train patients minus the
    whole-scan split's val / test patients and the reserved ones."""
    from training.data import load_split as click_split
    from training.wholescan import RESERVED
    from training.wholescan import load_split as scan_split

    ws = scan_split()
    banned = set(RESERVED) | set(ws.get("val", [])) | set(ws.get("test", []))
    return set(click_split()["train"]) - banned


def load_vois(data_root=None, patients=None, min_diameter_mm: float = 3.0, max_diameter_mm: float = 30.0,
              limit: int | None = None) -> list[VOI]:
    """Read training ``lidc_vois`` nodules.

    Args:
        data_root: data folder holding ``lidc_vois`` (default :func:`default_data_root`).
        patients: allowed patients (default :func:`insertion_patients`); a patient outside
            :func:`insertion_patients` raises.
        min_diameter_mm, max_diameter_mm: ``labels.csv`` diameter range kept.
        limit: read at most this many (smoke tests).

    Returns:
        list of :class:`VOI`, in ``labels.csv`` order.

    Raises:
        ValueError: a requested patient that is not a training patient (reserved, val,
            test) - before any image is read.  FileNotFoundError: missing folder / file.
    """
    allowed = insertion_patients()
    if patients is None:
        patients = allowed
    bad = sorted(set(patients) - allowed)
    if bad:
        raise ValueError(f"{bad[:5]} are not training patients of the split: their nodules are never inserted")
    return _read_vois(data_root, patients, min_diameter_mm, max_diameter_mm, limit)


def _read_vois(data_root, patients, min_diameter_mm: float, max_diameter_mm: float, limit: int | None) -> list[VOI]:
    """Read the ``lidc_vois`` nodules of ``patients`` (no split check: callers check first,
    :func:`load_vois` and ``training.small_insertion.load_validation_vois``)."""
    import SimpleITK as sitk

    root = Path(data_root or default_data_root()) / "lidc_vois"
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["patient_id"] in patients
                and min_diameter_mm <= float(r["diameter_mm"]) <= max_diameter_mm]
    out = []
    for r in rows[:limit]:
        img, msk = sitk.ReadImage(str(root / r["image"])), sitk.ReadImage(str(root / r["mask"]))
        hu = sitk.GetArrayFromImage(img).astype(np.float32)
        m = sitk.GetArrayFromImage(msk) > 0
        if hu.shape != m.shape or not m.any():
            continue
        zz, yy, xx = np.nonzero(m)
        lo = np.maximum([zz.min() - 1, yy.min() - 3, xx.min() - 3], 0)
        hi = np.minimum([zz.max() + 2, yy.max() + 4, xx.max() + 4], m.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        sx, sy, sz = img.GetSpacing()
        out.append(VOI(r["patient_id"], int(r["nodule_id"]), np.ascontiguousarray(hu[sl]),
                       np.ascontiguousarray(m[sl]), (float(sz), float(sy), float(sx)), float(r["diameter_mm"])))
    return out


def transform_voi(voi: VOI, spacing_zyx, scale: float = 1.0, angle_deg: float = 0.0,
                  flips=(False, False, False), edge_sigma_mm: float = 0.7) -> Nodule:
    """Resample a VOI onto a target voxel grid, scaled, rotated in-plane and flipped.

    The VOI's physical centre goes to the output grid's centre; output point p (mm, from
    the centre) takes the VOI value at F R^-1 p / scale (R = rotation by ``angle_deg`` in
    the axial (y, x) plane, F = flips), linear interpolation (``scipy.ndimage.
    affine_transform``).

    Args:
        voi: :class:`VOI`.
        spacing_zyx: target voxel size (mm).
        scale: isotropic size factor (> 0).
        angle_deg: in-plane rotation (degrees).
        flips: (z, y, x) mirror flags.
        edge_sigma_mm: in-plane Gaussian sigma of the blending weight's fall-off (mm).

    Returns:
        :class:`Nodule` on an odd-sized grid just holding the transformed crop.

    Raises:
        InsertionError: scale <= 0, or the transformed mask is empty (too small for the
            target grid).
    """
    if not scale > 0:
        raise InsertionError(f"scale must be > 0, got {scale}")
    s_in = np.asarray(voi.spacing_zyx, float)
    s_out = np.asarray(spacing_zyx, float)
    ext = (np.array(voi.hu.shape) - 1) * s_in / 2.0  # half extent (mm) of the crop
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    half_yx = math.hypot(ext[1], ext[2]) * scale
    half = np.array([ext[0] * scale, half_yx, half_yx]) + 1.5 * s_out
    n_out = 2 * np.ceil(half / s_out).astype(int) + 1
    c_out = (n_out - 1) / 2.0
    c_in = (np.array(voi.hu.shape) - 1) / 2.0
    rinv = np.array([[1, 0, 0], [0, c, s], [0, -s, c]], float)  # inverse rotation in (y, x)
    flip = np.diag([-1.0 if f else 1.0 for f in flips])
    m = np.diag(1.0 / s_in) @ flip @ rinv @ np.diag(s_out / scale)
    off = c_in - m @ c_out
    hu = ndi.affine_transform(voi.hu, m, off, output_shape=tuple(n_out), order=1, cval=np.nan)
    soft = ndi.affine_transform(voi.mask.astype(np.float32), m, off, output_shape=tuple(n_out), order=1, cval=0.0)
    mask = soft >= 0.5
    if not mask.any():
        raise InsertionError(f"nodule {voi.patient}_{voi.nodule_id} at scale {scale:.2f} vanishes on a "
                             f"{tuple(np.round(s_out, 2))} mm grid")
    sig = [0.0, edge_sigma_mm / s_out[1], edge_sigma_mm / s_out[2]]
    w = np.clip(ndi.gaussian_filter(mask.astype(np.float32), sig) * 2.0, 0.0, 1.0)  # 1 at the edge, fades outward
    w[mask] = 1.0
    w[np.isnan(hu)] = 0.0
    w[~mask & (w < 0.02)] = 0.0
    return Nodule(hu.astype(np.float32), mask, w.astype(np.float32),
                  {"voi": f"{voi.patient}_{voi.nodule_id}", "scale": round(float(scale), 3),
                   "angle_deg": round(float(angle_deg), 1), "flips": [bool(f) for f in flips],
                   "diameter_mm": round(voi.diameter_mm * scale, 2)})


def _overlap(shape, nod_shape, centre):
    """Slices of the volume and of the nodule grid where a nodule centred at ``centre`` overlaps."""
    c0 = (np.array(nod_shape) - 1) // 2
    lo = np.asarray(centre, int) - c0
    vs, ns = [], []
    for d in range(3):
        a, b = max(lo[d], 0), min(lo[d] + nod_shape[d], shape[d])
        if b <= a:
            return None
        vs.append(slice(a, b))
        ns.append(slice(a - lo[d], b - lo[d]))
    return tuple(vs), tuple(ns)


def paste_nodule(hu: np.ndarray, nodule: Nodule, centre_zyx, lung: np.ndarray | None = None) -> np.ndarray:
    """Blend a nodule into a HU volume in place (module docstring, "Blending").

    Args:
        hu: float32 (z, y, x) HU, modified in place.
        nodule: :class:`Nodule` on ``hu``'s voxel grid.
        centre_zyx: integer index in ``hu`` where the nodule's grid centre goes (may lie
            near an edge: the part outside ``hu`` is cut).
        lung: optional bool (z, y, x) lung mask of ``hu``: outside it the result is
            ``max(new, bg)``.

    Returns:
        bool (z, y, x) mask of the pasted nodule on ``hu``'s grid (the ground truth).

    Raises:
        InsertionError: float dtype missing, or the nodule does not overlap the volume.
    """
    if hu.dtype.kind != "f":
        raise InsertionError(f"paste into a float HU array, got {hu.dtype}")
    ov = _overlap(hu.shape, nodule.hu.shape, centre_zyx)
    if ov is None:
        raise InsertionError(f"nodule centred at {tuple(centre_zyx)} lies outside the volume {hu.shape}")
    vs, ns = ov
    bg = hu[vs]
    w = nodule.weight[ns]
    nod = np.where(np.isnan(nodule.hu[ns]), bg, nodule.hu[ns])
    new = bg + w * (nod - bg)
    if lung is not None:
        new = np.where(lung[vs], new, np.maximum(new, bg))
    hu[vs] = new
    out = np.zeros(hu.shape, bool)
    out[vs] = nodule.mask[ns]
    return out


def mask_box(mask2d: np.ndarray) -> np.ndarray:
    """Box (x0, y0, x1, y1) float32, pixel edges, of a non-empty 2D mask (the detector's
    target convention, ``training.detection.targets_from_mask``)."""
    yy, xx = np.nonzero(mask2d)
    if yy.size == 0:
        raise InsertionError("empty mask has no box")
    return np.array([xx.min(), yy.min(), xx.max() + 1, yy.max() + 1], np.float32)


def sample_centre(lung2d: np.ndarray, hu2d: np.ndarray, spacing_yx, radius_mm: float, kind: str,
                  rng: np.random.Generator, region=None) -> tuple[int, int] | None:
    """An in-plane centre (j, i) for a nodule of radius ``radius_mm`` on one axial slice.

    Args:
        lung2d: bool (y, x) lung mask of the slice.
        hu2d: (y, x) HU of the slice.
        spacing_yx: pixel size (mm).
        radius_mm: the nodule's in-plane radius.
        kind: "free" | "juxtapleural" | "juxtavascular" (module docstring, "Placement").
        rng: random generator.
        region: optional (y0, y1, x0, x1) box the centre must lie in.

    Returns:
        (j, i) integer pixel index, or None when the slice offers no such place.

    Raises:
        InsertionError: unknown kind.
    """
    if kind not in KINDS:
        raise InsertionError(f"unknown placement {kind!r}; known: {KINDS}")
    inside = np.zeros_like(lung2d, bool)
    y0, y1, x0, x1 = region if region is not None else (0, lung2d.shape[0], 0, lung2d.shape[1])
    inside[y0:y1, x0:x1] = lung2d[y0:y1, x0:x1]
    if not inside.any():
        return None
    d = ndi.distance_transform_edt(lung2d, sampling=spacing_yx)  # mm to the nearest non-lung pixel
    r = float(radius_mm)
    if kind == "free":
        ok = inside & (d >= r + 1.0) & (hu2d < VESSEL_HU)
    elif kind == "juxtapleural":
        ok = inside & (d >= 0.4 * r) & (d <= max(0.9 * r, 0.4 * r + max(spacing_yx)))
    else:
        vessel = lung2d & (hu2d > VESSEL_HU) & (d > r + 2.0)
        vj, vi = np.nonzero(vessel)
        if vj.size == 0:
            return None
        for _ in range(8):
            n = int(rng.integers(vj.size))
            t = rng.uniform(0, 2 * np.pi)
            rho = rng.uniform(0.6, 1.0) * r
            j = int(round(vj[n] + rho * np.sin(t) / spacing_yx[0]))
            i = int(round(vi[n] + rho * np.cos(t) / spacing_yx[1]))
            if y0 <= j < y1 and x0 <= i < x1 and inside[j, i] and d[j, i] >= 0.8 * r:
                return j, i
        return None
    jj, ii = np.nonzero(ok)
    if jj.size == 0:
        return None
    n = int(rng.integers(jj.size))
    return int(jj[n]), int(ii[n])


def thick_factors(slice_mm: float, thick_mm=(2.5, 8.0)) -> list[int]:
    """Averaging factors f > 1 with f * slice_mm in ``thick_mm`` (e.g. 1.25 mm -> [2..6],
    2.5 mm -> [2, 3])."""
    lo, hi = thick_mm
    return [f for f in range(2, 17) if lo - 1e-6 <= f * slice_mm <= hi + 1e-6]


def thick_groups(k: int, n_slices: int, factor: int = 1, size: int = 5) -> np.ndarray:
    """Thin-slice indices averaged into each channel of a thick-slice stack centred on k.

    Channel c (0..size-1) is the thick slice centred on thin slice k + (c - size // 2) *
    factor, the mean of ``factor`` adjacent thin slices (for even factors the extra one
    lies above, i.e. at the larger k); indices are clamped to the volume (the edge slice
    repeats, as ``stack_indices``).  factor 1 gives ``stack_indices(k, n)`` as a column.

    Returns:
        int64 (size, factor) array, ascending along both axes.

    Raises:
        ValueError: factor < 1, even size, or k outside the volume.
    """
    if factor < 1 or size % 2 != 1 or not 0 <= k < n_slices:
        raise ValueError(f"bad thick stack: k={k}, n={n_slices}, factor={factor}, size={size}")
    centres = k + (np.arange(size) - size // 2) * factor
    off = np.arange(factor) - (factor - 1) // 2
    return np.clip(centres[:, None] + off[None, :], 0, n_slices - 1).astype(np.int64)


def insertion_config(ws: dict) -> dict:
    """The ``insert`` sub-section of a ``wholeslice`` config over :data:`DEFAULTS`.

    Raises:
        ValueError: unknown key or bad value.
    """
    cfg = dict(ws.get("insert") or {})
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"note"})
    if unknown:
        raise ValueError(f"unknown wholeslice.insert keys {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if not 0 < out["scale_min"] <= out["scale_max"]:
        raise ValueError("insert.scale_min / scale_max must satisfy 0 < min <= max")
    if not 1 <= out["n_min"] <= out["n_max"]:
        raise ValueError("insert.n_min / n_max must satisfy 1 <= min <= max")
    if set(out["p_kind"]) - set(KINDS) or sum(out["p_kind"].values()) <= 0:
        raise ValueError(f"insert.p_kind must weight {KINDS}")
    if not 0.0 <= out["p_mass"] <= 1.0:
        raise ValueError("insert.p_mass must lie in [0, 1]")
    if not 0 < out["mass_mm"][0] <= out["mass_mm"][1]:
        raise ValueError("insert.mass_mm must be [low, high] with 0 < low <= high")
    return out


class Inserter:
    """Inserted whole-slice samples of whole training scans (used by
    :class:`training.detection_wholeslice.WholeSliceSampler` with ``wholeslice.p_insert``).

    Args:
        vois: :class:`VOI` list (training patients).
        icfg: :func:`insertion_config` output.
    """

    def __init__(self, vois: list[VOI], icfg: dict):
        if not vois:
            raise InsertionError("no nodule to insert")
        self.vois = vois
        self.cfg = icfg
        self.n_samples = 0
        self.n_inserted = 0
        self.n_failed = 0
        self.n_masses = 0
        self.kinds = {k: 0 for k in KINDS}
        from training.mass_insertion import is_mass_source

        #: mass sources: solid VOIs of 12-30 mm (as ``training.mass_insertion.solid_vois``)
        self.mass_vois = [v for v in vois if is_mass_source(v)]

    def _random_nodule(self, spacing_zyx, rng: np.random.Generator, mass: bool = False) -> Nodule:
        c = self.cfg
        for _ in range(c["tries"]):
            if mass:  # one size drawn in mass_mm, as training.mass_insertion.paste_mass
                v = self.mass_vois[int(rng.integers(len(self.mass_vois)))]
                s = float(rng.uniform(*c["mass_mm"])) / v.diameter_mm
            else:
                v = self.vois[int(rng.integers(len(self.vois)))]
                lo = max(c["scale_min"], c["min_diameter_mm"] / v.diameter_mm)
                hi = min(c["scale_max"], c["max_diameter_mm"] / v.diameter_mm)
                if lo > hi:
                    continue
                s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            try:
                return transform_voi(v, spacing_zyx, s, float(rng.uniform(0, 360)), tuple(rng.random(3) < 0.5),
                                     c["edge_sigma_mm"])
            except InsertionError:
                continue
        raise InsertionError("no VOI fits the diameter range")

    def insert(self, hu: np.ndarray, labels: np.ndarray, lung: np.ndarray, k: int, spacing_zyx,
               rng: np.random.Generator, region=None, n: int | None = None, mass: bool = False) -> list[dict]:
        """Paste ``n`` (default uniform in [n_min, n_max]) nodules whose centre lies on
        slice k (+- a quarter of their extent in z) into a volume, in place.  With ``mass``
        the first is a mass (``mass_mm``, placed free or juxtapleural as
        ``training.mass_insertion``: P_FREE free), the others nodules.

        Args:
            hu: float32 (z, y, x) HU (a slab of the scan), modified in place.
            labels: uint8 (z, y, x) label map on the same grid (existing nodules > 0),
                modified in place: pasted nodule m gets :data:`INSERTED_LABEL0` + m.
            lung: bool (z, y, x) lung mask on the same grid.
            k: slice (index in ``hu``) the nodules must show on.
            spacing_zyx: voxel size (mm).
            rng: random generator.
            region: optional in-plane box (y0, y1, x0, x1) for the centres.

        Returns:
            one dict per pasted nodule: label, kind, centre_zyx, n_voxels, source.
        """
        c = self.cfg
        n = int(rng.integers(c["n_min"], c["n_max"] + 1)) if n is None else int(n)
        kinds, p = zip(*c["p_kind"].items())
        p = np.asarray(p, float) / sum(p)
        out = []
        from training.mass_insertion import P_FREE

        for m in range(n):
            done = False
            is_mass = mass and m == 0 and bool(self.mass_vois)
            for _ in range(c["tries"]):
                if is_mass:
                    kind = "free" if rng.random() < P_FREE else "juxtapleural"
                else:
                    kind = kinds[int(rng.choice(len(kinds), p=p))]
                try:
                    nod = self._random_nodule(spacing_zyx, rng, is_mass)
                except InsertionError:
                    break
                zz = np.nonzero(nod.mask.any((1, 2)))[0]
                dz = int(rng.integers(-(len(zz) // 4), len(zz) // 4 + 1)) if len(zz) > 1 else 0
                kz = int(np.clip(k + dz, 0, hu.shape[0] - 1))
                radius = 0.5 * max(np.ptp(np.nonzero(nod.mask)[1]) + 1, np.ptp(np.nonzero(nod.mask)[2]) + 1) * \
                    float(np.mean(spacing_zyx[1:]))
                ji = sample_centre(lung[k], hu[k], spacing_zyx[1:], radius, kind, rng, region)
                if ji is None:
                    continue
                # the mask's own centre goes to the chosen point
                mz, my, mx = (int(round(a.mean())) for a in np.nonzero(nod.mask))
                cz, cy, cx = nod.centre
                centre = (kz + cz - mz, ji[0] + cy - my, ji[1] + cx - mx)
                ov = _overlap(hu.shape, nod.hu.shape, centre)
                if ov is None:
                    continue
                vs, ns = ov
                sub = nod.mask[ns]
                if sub.sum() < 0.9 * nod.mask.sum() or not vs[0].start <= k < vs[0].stop \
                        or not sub[k - vs[0].start].any():
                    continue  # cut by the slab edge, or not on slice k
                if lung[vs][sub].mean() < 0.5:
                    continue
                grown = ndi.binary_dilation(sub, np.ones((1, 5, 5), bool))
                if (labels[vs][grown] > 0).any():
                    continue
                pasted = paste_nodule(hu, nod, centre, lung)
                lab = INSERTED_LABEL0 + m
                labels[pasted] = lab
                out.append({"label": lab, "kind": kind, "centre_zyx": [int(v) for v in centre],
                            "n_voxels": int(pasted.sum()), "mass": is_mass, **nod.source})
                self.kinds[kind] += 1
                self.n_masses += is_mass
                done = True
                break
            self.n_inserted += done
            self.n_failed += not done
        self.n_samples += 1
        return out

    def summary(self) -> dict:
        return {"insert_samples": self.n_samples, "inserted": self.n_inserted, "insert_failed": self.n_failed,
                "insert_masses": self.n_masses, "insert_kinds": dict(self.kinds)}


def inserted_sample(scan, k: int, inserter: Inserter, wcfg: dict, rng: np.random.Generator, n: int | None = None):
    """A whole-slice training sample of slice k of a training scan with inserted nodules,
    optionally on simulated thick slices (module docstring).

    Args:
        scan: :class:`training.detection_wholeslice.WholeScan` (a training scan).
        k: a search-plan slice.
        inserter: :class:`Inserter`.
        wcfg: ``wholeslice_config`` output (flips, ``min_component_px``, lung-mask /
            CLAHE switches).
        rng: random generator (None is refused: insertion is training-only).
        n: number of nodules (default random).

    Returns:
        (:class:`training.detection.Sample` as ``whole_slice_sample`` builds it, with the
        scan's own nodules and the pasted ones as targets; info dict: factor, inserted).
    """
    from NoduleMTLLib.detection import preprocess as pp
    from training.detection_wholeslice import sample_from_arrays

    if rng is None:
        raise InsertionError("inserted samples are training samples: give a random generator")
    c = inserter.cfg
    nz = scan.ct.shape_zyx[0]
    sp = scan.ct.spacing  # (x, y, z) mm
    spacing_zyx = (float(sp[2]), float(sp[1]), float(sp[0]))
    factor = 1
    fs = thick_factors(spacing_zyx[0], c["thick_mm"])
    if fs and rng.random() < c["p_thick"]:
        factor = int(fs[int(rng.integers(len(fs)))])
    groups = thick_groups(int(k), nz, factor, pp.STACK_SIZE)
    z0, z1 = int(groups.min()), int(groups.max()) + 1
    pad = 8  # room for a nodule's z extent around the stack
    mass = c["p_mass"] > 0 and bool(inserter.mass_vois) and rng.random() < c["p_mass"]
    if mass:  # a mass reaches 3/4 of its extent past slice k (its centre moves +- 1/4)
        pad = max(pad, int(math.ceil(0.75 * c["mass_mm"][1] / spacing_zyx[0])) + 2)
    s0, s1 = max(0, z0 - pad), min(nz, z1 + pad)
    hu = scan.ct.array[s0:s1].astype(np.float32)
    lab = scan.labels[s0:s1].copy()
    lung = scan.lung.labels[s0:s1] > 0
    y0, y1, x0, x1 = scan.crop_of(int(k))
    info = inserter.insert(hu, lab, lung, int(k) - s0, spacing_zyx, rng, (y0, y1, x0, x1), n, mass)
    chans = []
    for g in groups:
        s = pp.hu_window(hu[g - s0].mean(0))
        if wcfg.get("use_clahe", True):
            s = pp.clahe_slices(s)
        if wcfg.get("use_lung_mask", True):
            s = s * (scan.lung.labels[int(g[len(g) // 2])] > 0)
        chans.append(s[y0:y1, x0:x1])
    x = np.stack(chans)
    if scan.reverse:
        x = x[::-1]
    g = groups[pp.STACK_SIZE // 2] - s0
    centre_lab = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for v in (int(v) for v in np.unique(lab[g]) if v > 0):
        centre_lab[((lab[g][:, y0:y1, x0:x1] == v).mean(0) >= 0.5)] = v
    tag = f"insert{len(info)}" + (f"x{factor}" if factor > 1 else "")
    sample = sample_from_arrays(scan.patient, int(k), x, centre_lab, wcfg, rng, tag)
    return sample, {"factor": factor, "inserted": info}


__all__ = ["DEFAULTS", "INSERTED_LABEL0", "KINDS", "Inserter", "InsertionError", "Nodule", "VOI", "VESSEL_HU",
           "default_data_root", "inserted_sample", "insertion_config", "insertion_patients", "load_vois",
           "mask_box", "paste_nodule", "sample_centre", "thick_factors", "thick_groups", "transform_voi"]
