"""Preprocessing for the whole-scan nodule search network ``maskrcnn25d`` (paper section 3.2).

The paper's pipeline, in its order: (1) HU clipping to [-1000, 400] and linear
normalisation to [0, 1]; (2) slice-wise CLAHE; (3) multiplication by the lung mask;
(5) five-slice stacks {z-2, ..., z+2} as the channels of one image.  (Step (4), the
conversion of annotations to voxel space, belongs to the training data code.)
``use_clahe`` and ``use_lung_mask`` switch steps (2) and (3) off for the paper's
ablations (section 4.3.2 compares inputs with and without CLAHE).

What the paper leaves open, and our choices:

* CLAHE parameters are not specified in the paper; we use scikit-image's
  ``equalize_adapthist`` defaults (kernel 1/8 of the slice height and width, i.e.
  64 x 64 px on a 512 x 512 slice; clip limit 0.01; 256 bins), applied to the full
  axial slice after the HU window.  Note that ``equalize_adapthist`` first stretches
  each slice's own [min, max] to its full range (a no-op for chest slices, which
  contain both air <= -1000 HU and bone >= 400 HU); constant slices are left unchanged.
* The paper multiplies by LUNA16's provided lung masks.  Whole-scan inference has no
  provided mask, so :func:`compute_lung_mask` computes one from the CT (classical
  threshold / connected components / morphology; see its docstring).
* Stacks at the first/last two slices repeat the edge slice (index clamping); the paper
  only sampled stacks centred on nodules or in the mid-lung, never at volume edges.
* Channels follow the array's k order (channel 0 = slice k-2) unless ``reverse`` is set;
  :func:`preprocess_ct` sets it when the k axis points towards the feet, so channel 0 is
  always the most inferior slice.  Not specified in the paper (LUNA16 volumes have
  identity directions, where both orders agree).

Arrays are numpy, (z, y, x) = (k, j, i) as :attr:`NoduleMTLLib.core.io.CTVolume.array` gives
them; spacings are in mm.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..core.io import CTVolume, InputError

#: HU window of the paper (section 3.2): values are clipped to it and mapped to [0, 1].
HU_MIN = -1000.0
HU_MAX = 400.0
#: Number of adjacent slices per input stack (section 3.3.3: 5-slice stacks).
STACK_SIZE = 5
#: scikit-image CLAHE settings (not specified in the paper; skimage defaults).
CLAHE_CLIP_LIMIT = 0.01
CLAHE_KERNEL_SIZE = None  # None = 1/8 of the slice height and width
CLAHE_NBINS = 256
#: Slice spacing (mm) at and above which the input is flagged as thick-slice.  The paper
#: trained on LUNA16 (slices <= 2.5 mm); a 5-slice stack of 5 mm slices spans 25 mm.
THICK_SLICE_MM = 5.0

# --- lung mask (not from the paper: it used LUNA16's provided masks) ---
#: Voxels below this HU are air or aerated lung (the usual -320 HU lung/soft-tissue cut).
LUNG_THRESHOLD_HU = -320.0
#: Components whose median HU is below this are pure gas (bowel, stomach, air pockets
#: outside the body, a separate trachea), not lung parenchyma (median about -850 HU,
#: about -930 HU in severe emphysema).
GAS_MEDIAN_HU = -975.0
#: Below this total lung volume (mL) the CT has no plausible lung -> :class:`NoLungError`.
#: Adult lungs hold 3-8 L; bowel gas in an abdominal CT is typically tens of mL in the
#: partial-volume components that pass the gas test.
MIN_LUNG_VOLUME_ML = 300.0
#: Lung components smaller than this fraction of the largest one (or than
#: ``MIN_COMPONENT_ML``) are dropped.
MIN_COMPONENT_FRACTION = 0.02
MIN_COMPONENT_ML = 10.0
#: In-plane closing radius (mm) that puts juxtapleural / juxtavascular nodules (up to
#: about 2 x this diameter of concavity) back into the mask.
CLOSING_RADIUS_MM = 10.0
#: The mask is computed on an in-plane grid of about this pixel size, then upsampled.
WORK_PIXEL_MM = 1.5
#: Slices thinner than about this are subsampled in z for the mask (every f-th slice, f =
#: round(WORK_SLICE_MM / slice spacing)), then repeated back: a 0.625 mm scan's mask costs
#: what a 1.25 mm one's does (memory flat in slice count, issue 27); 1.25 mm and thicker
#: scans are unchanged.
WORK_SLICE_MM = 1.25
#: Largest in-plane erosion depth (mm) tried to separate left and right lungs.
MAX_SPLIT_EROSION_MM = 15.0
#: Default margins of :func:`lung_bounds` (mm).
BOUNDS_MARGIN_MM = (5.0, 10.0, 10.0)  # (z, y, x)


from ..core.errors import NoLungError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


class ThickSliceWarning(UserWarning):
    """The CT's slice spacing is >= :data:`THICK_SLICE_MM`: detection quality is not validated."""


# ----------------------------------------------------------------------------------------
# intensities


def hu_window(hu: np.ndarray, hu_min: float = HU_MIN, hu_max: float = HU_MAX) -> np.ndarray:
    """Clip HU to [hu_min, hu_max] and map linearly to [0, 1] (paper section 3.2, step 1).

    Args:
        hu: any shape, any real dtype, Hounsfield units.
        hu_min, hu_max: window (default the paper's [-1000, 400] HU).

    Returns:
        float32 array of the same shape in [0, 1]: 0 = hu_min (air), 1 = hu_max.

    Raises:
        ValueError: hu_max <= hu_min.
    """
    if hu_max <= hu_min:
        raise ValueError(f"empty HU window [{hu_min}, {hu_max}]")
    x = (np.asarray(hu, dtype=np.float32) - np.float32(hu_min)) / np.float32(hu_max - hu_min)
    return np.clip(x, 0.0, 1.0, out=x)


def clahe_slices(volume01: np.ndarray, slices=None, clip_limit: float = CLAHE_CLIP_LIMIT,
                 kernel_size=CLAHE_KERNEL_SIZE, nbins: int = CLAHE_NBINS) -> np.ndarray:
    """Slice-wise (2D, axial) CLAHE with ``skimage.exposure.equalize_adapthist`` (section 3.2, step 2).

    Args:
        volume01: (z, y, x) or (y, x) float array in [0, 1] (output of :func:`hu_window`).
        slices: iterable of k indices to equalise (default all); the others are copied
            unchanged (lets inference skip slices outside the lungs).
        clip_limit, kernel_size, nbins: passed to ``equalize_adapthist``; not specified in
            the paper, we use scikit-image's defaults (0.01, 1/8 of the slice, 256).

    Returns:
        float32 array of the same shape in [0, 1].  Constant slices are returned unchanged
        (``equalize_adapthist`` would map them to 1).

    Raises:
        ValueError: not 2D/3D, or values outside [0, 1].
    """
    from skimage.exposure import equalize_adapthist

    v = np.asarray(volume01, dtype=np.float32)
    if v.ndim not in (2, 3):
        raise ValueError(f"expected (z, y, x) or (y, x), got shape {v.shape}")
    if v.size and (float(v.min()) < 0.0 or float(v.max()) > 1.0):
        raise ValueError("CLAHE expects intensities in [0, 1] (apply hu_window first)")
    squeeze = v.ndim == 2
    v3 = v[None] if squeeze else v
    out = v3.copy()
    ks = range(v3.shape[0]) if slices is None else slices
    for k in ks:
        s = v3[k]
        if float(s.max()) <= float(s.min()):
            continue
        out[k] = equalize_adapthist(s, kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins).astype(np.float32)
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------
# lung mask


@dataclass
class LungMask:
    """Lung mask of a CT on its voxel grid.

    Attributes:
        labels: uint8 (z, y, x): 0 outside, 1 right lung, 2 left lung (patient sides,
            from the LPS x of the centroids); when the lungs could not be separated the
            whole mask is 1 and ``n_lungs`` is 1.
        spacing_zyx: voxel spacing (mm) per array axis.
        volumes_ml: volume (mL) per label, index 0 = label 1 ("right"), 1 = label 2.
        n_lungs: 1 or 2.
    """

    labels: np.ndarray
    spacing_zyx: tuple[float, float, float]
    volumes_ml: tuple[float, ...]
    n_lungs: int

    @property
    def mask(self) -> np.ndarray:
        """bool (z, y, x): inside either lung."""
        return self.labels > 0

    @property
    def volume_ml(self) -> float:
        """Total lung volume in mL."""
        return float(sum(self.volumes_ml))


@dataclass(frozen=True)
class LungBounds:
    """Half-open voxel bounds of the lungs (with margin): ``z0 <= k < z1``, ``y0 <= j < y1``, ``x0 <= i < x1``."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """numpy index for (z, y, x) arrays."""
        return (slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1))

    @property
    def z_range(self) -> range:
        """Slice indices k the nodule search needs to visit."""
        return range(self.z0, self.z1)


def _inplane_structure() -> np.ndarray:
    s = np.zeros((3, 3, 3), bool)
    s[1] = ndi.generate_binary_structure(2, 1)
    return s


def _bbox(mask: np.ndarray):
    """Half-open bounding box (z0, z1, y0, y1, x0, x1) of a non-empty 3D bool array."""
    from ..core.postprocess import bounding_box

    return tuple(v for sl in bounding_box(mask) for v in (sl.start, sl.stop))


def _grow(box, margin, shape):
    z0, z1, y0, y1, x0, x1 = box
    mz, my, mx = margin
    return (max(0, z0 - mz), min(shape[0], z1 + mz), max(0, y0 - my), min(shape[1], y1 + my),
            max(0, x0 - mx), min(shape[2], x1 + mx))


def _inplane_edt(mask: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """float32 (z, y, x): per slice, the in-plane distance (mm) from each True pixel to the nearest
    False one (0 on False pixels; inf on a slice without any False pixel).  Slice by slice, so the
    temporaries are one slice's, not the volume's (memory flat in slice count, issue 27)."""
    out = np.zeros(mask.shape, np.float32)
    for z in range(mask.shape[0]):
        m = mask[z]
        if m.all():
            out[z] = np.inf
        elif m.any():
            out[z] = ndi.distance_transform_edt(m, sampling=(sy, sx))
    return out


def _inplane_closing(mask: np.ndarray, radius_mm: float, sy: float, sx: float) -> np.ndarray:
    """Binary closing with an in-plane disk of ``radius_mm`` (exact, via distance transforms), slice by slice."""
    if radius_mm <= 0:
        return mask
    pad = int(np.ceil(radius_mm / min(sy, sx))) + 1
    m = np.pad(mask, ((0, 0), (pad, pad), (pad, pad)))
    dil = _inplane_edt(~m, sy, sx) <= radius_mm
    clo = _inplane_edt(dil, sy, sx) > radius_mm
    return clo[:, pad:-pad, pad:-pad] | mask


def _split_lungs(comp: np.ndarray, sy: float, sx: float, sz: float):
    """Separate a single lung+airway component into two by in-plane erosion; None if it does not split."""
    st = _inplane_structure()
    er = comp
    max_it = max(1, int(np.ceil(MAX_SPLIT_EROSION_MM / min(sy, sx))))
    for _ in range(max_it):
        er = ndi.binary_erosion(er, structure=st)
        if not er.any():
            return None
        lab, n = ndi.label(er)
        if n < 2:
            continue
        vol = np.bincount(lab.ravel())[1:]
        order = np.argsort(vol)[::-1]
        if vol[order[1]] >= 0.1 * vol[order[0]]:
            seeds = np.zeros(comp.shape, np.uint8)
            seeds[lab == order[0] + 1] = 1
            seeds[lab == order[1] + 1] = 2
            ind = ndi.distance_transform_edt(seeds == 0, sampling=(sz, sy, sx), return_distances=False,
                                             return_indices=True)  # nearest seed; no float64 distance map
            return seeds[tuple(ind)] * comp
    return None


def compute_lung_mask(hu: np.ndarray, spacing_zyx, *, ijk_to_lps: np.ndarray | None = None,
                      threshold_hu: float = LUNG_THRESHOLD_HU, min_lung_volume_ml: float = MIN_LUNG_VOLUME_ML,
                      closing_radius_mm: float = CLOSING_RADIUS_MM, work_pixel_mm: float = WORK_PIXEL_MM,
                      work_slice_mm: float = WORK_SLICE_MM) -> LungMask:
    """Lung mask computed from the CT itself (replaces LUNA16's provided masks, section 3.2 step 3).

    Not specified in the paper (it used the masks shipped with LUNA16); we use a
    classical, training-free 3D method:

    1. Work on an in-plane subsampled grid (stride ``round(work_pixel_mm / pixel)``,
       e.g. 2 for 0.7-0.9 mm pixels) and, for thin slices, a z-subsampled one (stride
       ``round(work_slice_mm / slice spacing)``: 2 for 0.625 mm); the result is upsampled
       by repetition.
    2. ``air = HU < threshold_hu`` (-320 HU).
    3. Remove, slice by slice, the air connected to the slice border (air outside the
       body, scanner padding).  Requires the whole axial body section in the field of
       view: lungs cut by the field-of-view border are removed too.
    4. 3D connected components (6-connectivity) of the rest.  Components whose median
       HU is below :data:`GAS_MEDIAN_HU` are gas, not lung, and are dropped; so are those
       below ``max(MIN_COMPONENT_ML, MIN_COMPONENT_FRACTION x largest)``.
    5. If the total is below ``min_lung_volume_ml`` -> :class:`NoLungError`.
    6. Left/right: two large components are the two lungs; a single one (lungs joined
       through the trachea/carina or an anterior junction) is split by in-plane erosion
       until it falls into two parts each >= 10 % of the larger, whose voxels then seed
       a nearest-seed assignment of the whole component.  The lung with the larger LPS
       x (patient left) gets label 2.  The airways stay in the mask, assigned to the
       nearer lung.
    7. Per lung: in-plane hole filling (vessels, nodules inside the lung), an in-plane
       closing with a disk of ``closing_radius_mm`` (juxtapleural nodules), hole filling
       again.

    Known limitation: broad-based pleural or mediastinal masses larger than the closing
    can handle (about 2 x ``closing_radius_mm``) are only partly inside the mask; the
    6 cm adenocarcinoma of Lung-PET-CT-Dx A0001 has 24-62 % of its box inside, per slice.
    (A slice-wise convex hull, tried, brings in the mediastinum up to the trachea, which
    stays in the lung label.)  The nodule search adds such masses to its input mask with
    :func:`add_pleural_masses`.

    Args:
        hu: (z, y, x) HU array (int16 or float).
        spacing_zyx: voxel spacing in mm per array axis.
        ijk_to_lps: optional 4x4 index->LPS matrix (:func:`NoduleMTLLib.core.io.ijk_to_lps_matrix`)
            used to name the left/right lungs; default: i increases towards patient left.
        threshold_hu, min_lung_volume_ml, closing_radius_mm, work_pixel_mm, work_slice_mm:
            see the module constants.


    Returns:
        :class:`LungMask` on the input grid.

    Raises:
        ValueError: not a 3D array or non-positive spacing.
        NoLungError: no plausible lung (total lung volume below ``min_lung_volume_ml``).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    sz, sy, sx = (float(v) for v in spacing_zyx)
    if min(sz, sy, sx) <= 0:
        raise ValueError(f"non-positive spacing {spacing_zyx}")
    nz_full = hu.shape[0]
    f = max(1, int(np.floor(work_pixel_mm / min(sy, sx) + 0.5)))
    fz = max(1, int(np.floor(work_slice_mm / sz + 0.5)))
    work = hu[::fz, ::f, ::f]
    sz_full, sz = sz, sz * fz
    wy, wx = sy * f, sx * f
    vox_ml = sz * wy * wx / 1000.0

    air = work < threshold_hu
    lab2, n2 = ndi.label(air, structure=_inplane_structure())
    border = np.zeros(n2 + 1, bool)
    for edge in (lab2[:, 0, :], lab2[:, -1, :], lab2[:, :, 0], lab2[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True
    inner = ~border[lab2]
    del lab2, air

    lab3, n3 = ndi.label(inner)
    del inner
    found = 0.0
    kept: list[int] = []
    if n3:
        vol = np.bincount(lab3.ravel(), minlength=n3 + 1)[1:] * vox_ml
        objs = ndi.find_objects(lab3)
        order = np.argsort(vol)[::-1]
        largest = None
        for o in order[:16]:
            if vol[o] < MIN_COMPONENT_ML or (largest is not None and vol[o] < MIN_COMPONENT_FRACTION * largest):
                break
            sl = objs[o]
            med = float(np.median(work[sl][lab3[sl] == o + 1]))
            if med < GAS_MEDIAN_HU:
                continue  # pure gas, not parenchyma
            if largest is None:
                largest = vol[o]
            kept.append(int(o) + 1)
            found += float(vol[o])
    if found < min_lung_volume_ml:
        raise NoLungError(
            f"No plausible lung in this CT: {found:.0f} mL of aerated lung found (at least "
            f"{min_lung_volume_ml:.0f} mL expected). Is this a chest CT covering the lungs, "
            "with the whole body section inside the field of view?"
        )

    # left / right
    vols = {c: float((lab3 == c).sum()) for c in kept}
    kept.sort(key=lambda c: -vols[c])
    total = sum(vols.values())
    lr = np.zeros(work.shape, np.uint8)
    if len(kept) >= 2 and vols[kept[1]] >= 0.15 * total:
        lr[lab3 == kept[0]] = 1
        lr[lab3 == kept[1]] = 2
        rest = kept[2:]
    else:
        comp = lab3 == kept[0]
        box = _grow(_bbox(comp), (1, 2, 2), comp.shape)
        sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
        split = _split_lungs(comp[sl], wy, wx, sz)
        if split is not None:
            lr[sl] = split
        else:
            lr[comp] = 1
        rest = kept[1:]
    n_lungs = int(lr.max())
    if rest and n_lungs == 2:  # smaller pieces go to the lung with the nearer centroid (x)
        cx = [np.nonzero((lr == v).any(axis=(0, 1)))[0].mean() for v in (1, 2)]
        for c in rest:
            x = np.nonzero((lab3 == c).any(axis=(0, 1)))[0].mean()
            lr[lab3 == c] = 1 + int(abs(x - cx[1]) < abs(x - cx[0]))
    else:
        for c in rest:
            lr[lab3 == c] = 1
    del lab3

    # left/right naming by LPS x of the centroids
    if n_lungs == 2:
        m = np.eye(4) if ijk_to_lps is None else np.asarray(ijk_to_lps, float)
        xs = []
        for v in (1, 2):
            kk, jj, ii = (float(a.mean()) for a in np.nonzero(lr == v))
            xs.append((m @ np.array([ii * f, jj * f, kk * fz, 1.0]))[0])
        if xs[0] > xs[1]:  # label 1 must be the right lung (smaller LPS x)
            lr = np.where(lr > 0, 3 - lr, 0).astype(np.uint8)

    # morphology per lung
    st = _inplane_structure()
    out = np.zeros(work.shape, np.uint8)
    rad_px = int(np.ceil(closing_radius_mm / min(wy, wx))) + 1
    for v in range(1, n_lungs + 1):
        m = lr == v
        box = _grow(_bbox(m), (0, rad_px, rad_px), m.shape)
        sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
        mm = ndi.binary_fill_holes(m[sl], structure=st)
        mm = _inplane_closing(mm, closing_radius_mm, wy, wx)
        mm = ndi.binary_fill_holes(mm, structure=st)
        region = out[sl]
        region[mm & (region == 0)] = v

    if f > 1 or fz > 1:  # upsample by repetition slice by slice (no full-size temporaries)
        full = np.empty(hu.shape, np.uint8)
        for z in range(nz_full):
            full[z] = np.repeat(np.repeat(out[z // fz], f, axis=0), f, axis=1)[: hu.shape[1], : hu.shape[2]]
        out = full
    out = np.ascontiguousarray(out)
    sz = sz_full
    vml = sz * sy * sx / 1000.0
    # per-label counts slice by slice: np.bincount would cast the whole uint8 grid to int64
    # (8 bytes per voxel: 2.2 GB on a 1,000-slice scan)
    volumes = tuple(float(sum(np.count_nonzero(sl == v) for sl in out)) * vml for v in range(1, n_lungs + 1))
    return LungMask(labels=out, spacing_zyx=(sz, sy, sx), volumes_ml=volumes, n_lungs=n_lungs)


def lung_mask_from_ct(ct: CTVolume, **kwargs) -> LungMask:
    """:func:`compute_lung_mask` for a :class:`~NoduleMTLLib.core.io.CTVolume` (HU, LPS geometry).

    Raises:
        NoLungError: see :func:`compute_lung_mask`.
    """
    from ..core.io import ijk_to_lps_matrix

    sx, sy, sz = ct.spacing
    return compute_lung_mask(ct.array, (sz, sy, sx), ijk_to_lps=ijk_to_lps_matrix(ct.image), **kwargs)


# --- pleural masses in the search mask (issue 27; not from the paper) ---
#: In-plane closing radius (mm) per lung that brings a broad-based pleural mass (a concavity
#: up to about 2 x this wide in the lung's outline) into the detector's input mask.
MASS_CLOSING_MM = 40.0
#: Soft tissue a mass is made of (HU): air, fat-free lung and bone are left out.
MASS_HU = (-300.0, 300.0)
#: Smallest connected soft-tissue region (mL) added: mass-sized (the mass rule's
#: :data:`~NoduleMTLLib.detection.infer.MASS_MIN_ML`); smaller concavities are the
#: :data:`CLOSING_RADIUS_MM` closing's business.
MASS_MIN_ML = 10.0
#: Margin (mm) around the zone between the two lungs (mediastinum, heart, spine) in
#: which nothing is added.
INTER_LUNG_MARGIN_MM = 5.0
#: A region is the top of the liver or spleen under a lung base (a "dome"), not a mass, when at
#: least this share of its inferior surface has soft tissue outside the lung (or the scan's
#: end) 5 mm further towards the feet.  Measured on the non-test whole scans and synthetic
#: masses: domes 0.93-1.0, masses 0.0-0.84.
DOME_SHARE = 0.9
#: Voxels below this HU in a lung label are airway or other gas, not parenchyma (about -850 HU;
#: -930 HU in severe emphysema): they neither bound the zone between the lungs nor count as
#: the lung a mass borders.
AIRWAY_HU = -960.0
#: The zone between the lungs also covers this far (mm) along y beyond the last row that holds
#: both lungs (near the apices and the heart one lung's rows continue past the other's).
ZONE_ROW_MM = 20.0
#: Shortest run of lung along an image row (mm) that bounds the zone between the lungs.
MIN_LUNG_RUN_MM = 10.0
#: Aerated parenchyma (HU).  A region whose box holds "lung" with less than
#: :data:`MIN_PARENCHYMA_SHARE` of it in this range borders bowel or stomach (gas and
#: contents) taken into a lung label at the bases, not lung.
PARENCHYMA_HU = (-950.0, -500.0)
MIN_PARENCHYMA_SHARE = 0.5
#: Working pixel size (mm) of :func:`add_pleural_masses`: masses are >= 3 cm.
MASS_WORK_PIXEL_MM = 3.0


def _inter_lung_zone(labels2d: np.ndarray, min_run: int = 1) -> np.ndarray:
    """bool (y, x): per image row holding both lungs, the pixels between their facing edges.

    Only runs of at least ``min_run`` pixels count as lung (partial-volume rims of airways
    assigned to a lung are shorter).
    """
    zone = np.zeros(labels2d.shape, bool)
    for j in np.flatnonzero((labels2d == 1).any(axis=1) & (labels2d == 2).any(axis=1)):
        row = labels2d[j]
        ext = {}
        for v in (1, 2):
            m = np.concatenate([[False], row == v, [False]])
            edges = np.flatnonzero(m[1:] != m[:-1]).reshape(-1, 2)  # [start, stop) per run
            edges = edges[edges[:, 1] - edges[:, 0] >= min_run]
            if len(edges):
                ext[v] = (int(edges[0, 0]), int(edges[-1, 1]) - 1)
        if len(ext) < 2:
            continue
        (a0, a1), (b0, b1) = ext[1], ext[2]
        if a1 < b0:
            zone[j, a1 + 1:b0] = True
        elif b1 < a0:
            zone[j, b1 + 1:a0] = True
    return zone


def _dome_share(comp: np.ndarray, c: int, outside: np.ndarray, step: int, feet: int) -> float:
    """Share of region ``c``'s inferior surface voxels (no voxel of ``c`` next to them towards
    the feet) with ``outside`` (or the scan's end) ``step`` slices towards the feet."""
    zs = np.flatnonzero((comp == c).any(axis=(1, 2)))
    total = soft = 0
    nz = comp.shape[0]
    for z in range(int(zs[0]), int(zs[-1]) + 1):
        m = comp[z] == c
        nb = z + feet
        if 0 <= nb < nz:
            m &= comp[nb] != c
        n = int(np.count_nonzero(m))
        if not n:
            continue
        total += n
        zb = z + feet * step
        soft += n if not 0 <= zb < nz else int(np.count_nonzero(outside[zb] & m))
    return soft / total if total else 0.0


def add_pleural_masses(hu: np.ndarray, lung: LungMask, *, closing_mm: float = MASS_CLOSING_MM,
                       hu_range: tuple[float, float] = MASS_HU, min_ml: float = MASS_MIN_ML,
                       margin_mm: float = INTER_LUNG_MARGIN_MM, dome_share: float = DOME_SHARE,
                       k_to_feet: int = -1, work_pixel_mm: float = MASS_WORK_PIXEL_MM,
                       work_slice_mm: float = WORK_SLICE_MM) -> tuple[LungMask, float]:
    """The lung mask with broad-based pleural masses put back, for the detector's input.

    The paper multiplies the input by the lung mask (section 3.2 step 3).  A 4-8 cm mass
    against the chest wall is not aerated lung: :func:`compute_lung_mask` leaves most of it
    out (the 10 mm closing fills concavities up to about 2 cm), so the detector sees only a
    sliver of it.  This adds, per lung and slice, the soft tissue (``hu_range``) that an
    in-plane closing with a disk of ``closing_mm`` brings into the lung's outline, except in
    the zone between the two lungs (mediastinum, heart, spine; :func:`_inter_lung_zone`
    grown by ``margin_mm``), and keeps only connected regions (3D, 6-connectivity) of at
    least ``min_ml`` (mass-sized) that are not the top of the liver or spleen under a lung
    base: a region with soft tissue outside the lung 5 mm below at least ``dome_share`` of
    its inferior surface is a dome.  Not from the paper; the values were chosen on synthetic
    masses pasted into the non-test whole scans and on those scans' false positives
    (``training/RESULTS.md``, issue 27).  A mask with one lung label (lungs not separated, or
    one lung only) is returned unchanged: the mediastinum could not be kept out.

    Args:
        hu: (z, y, x) HU array of the CT the mask belongs to.
        lung: its :func:`compute_lung_mask` result.
        closing_mm, hu_range, min_ml, margin_mm, dome_share: see the module constants.
        k_to_feet: the array's k step towards the patient's feet (-1 when k runs from feet
            to head, as LPS with a positive z direction; +1 otherwise).
        work_pixel_mm, work_slice_mm: working grid, as :func:`compute_lung_mask`.

    Returns:
        (:class:`LungMask` whose labels include the added regions, each with the label of
        the lung whose closing added it (``volumes_ml`` unchanged: lung volumes), the volume
        added in mL).

    Raises:
        ValueError: ``hu`` and ``lung`` shapes differ.
    """
    hu = np.asarray(hu)
    if hu.shape != lung.labels.shape:
        raise ValueError(f"CT shape {hu.shape} != lung mask shape {lung.labels.shape}")
    if lung.n_lungs != 2:  # without two lungs there is no zone between them to keep out
        return lung, 0.0
    sz, sy, sx = (float(v) for v in lung.spacing_zyx)
    f = max(1, int(np.floor(work_pixel_mm / min(sy, sx) + 0.5)))
    fz = max(1, int(np.floor(work_slice_mm / sz + 0.5)))
    lab = lung.labels[::fz, ::f, ::f]
    work = hu[::fz, ::f, ::f]
    wz, wy, wx = sz * fz, sy * f, sx * f
    soft = (work >= hu_range[0]) & (work <= hu_range[1]) & (lab == 0)
    zone = np.zeros(lab.shape, bool)
    if lung.n_lungs == 2:
        tissue = work >= AIRWAY_HU  # airways (trachea, main bronchi) are in a lung's label but not lung
        min_run = max(1, int(round(MIN_LUNG_RUN_MM / wx)))
        for z in range(lab.shape[0]):
            zone[z] = _inter_lung_zone(lab[z] * tissue[z], min_run)
        if zone.any():  # rows near the zone's ends hold one lung only (apex, heart)
            zone = _inplane_edt(~zone, wy / ZONE_ROW_MM, wx / max(margin_mm, 1e-6)) <= 1.0
    add = np.zeros(lab.shape, np.uint8)
    rad_px = int(np.ceil(closing_mm / min(wy, wx))) + 1
    for v in range(1, lung.n_lungs + 1):
        m = lab == v
        if not m.any():
            continue
        box = _grow(_bbox(m), (0, rad_px, rad_px), m.shape)
        sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
        big = _inplane_closing(m[sl], closing_mm, wy, wx)
        big = ndi.binary_fill_holes(big, structure=_inplane_structure())
        bite = big & soft[sl] & ~zone[sl]
        region = add[sl]
        region[bite & (region == 0)] = v
    comp, n = ndi.label(add > 0)
    added_ml = 0.0
    if n:
        vox_ml = wz * wy * wx / 1000.0
        vol = np.bincount(comp.ravel(), minlength=n + 1) * vox_ml
        keep = vol >= min_ml
        keep[0] = False
        step = max(1, int(round(5.0 / wz)))
        outside = (work >= hu_range[0]) & (lab == 0) & (add == 0)  # soft tissue, not lung, not added
        objs = ndi.find_objects(comp)
        for c in np.flatnonzero(keep):
            if _dome_share(comp, int(c), outside, step, int(np.sign(k_to_feet) or -1)) >= dome_share:
                keep[c] = False
                continue
            sl = tuple(slice(max(0, a.start - 1), a.stop + 1) for a in objs[c - 1])
            near = work[sl][lab[sl] > 0]
            if near.size and float(np.mean((near >= PARENCHYMA_HU[0]) & (near < PARENCHYMA_HU[1]))) < MIN_PARENCHYMA_SHARE:
                keep[c] = False  # the "lung" around it is bowel or stomach (gas and contents), not parenchyma
        add[~keep[comp]] = 0
        added_ml = float(vol[keep].sum())
    if not add.any():
        return lung, 0.0
    out = lung.labels.copy()
    for z in range(out.shape[0]):
        a = np.repeat(np.repeat(add[z // fz], f, axis=0), f, axis=1)[: out.shape[1], : out.shape[2]]
        sl = out[z]
        sl[(a > 0) & (sl == 0)] = a[(a > 0) & (sl == 0)]
    return LungMask(labels=out, spacing_zyx=lung.spacing_zyx, volumes_ml=lung.volumes_ml, n_lungs=lung.n_lungs), added_ml


def lung_bounds(lung: LungMask | np.ndarray, spacing_zyx=None, margin_mm=BOUNDS_MARGIN_MM) -> LungBounds:
    """z-range and in-plane bounding box of the lungs, grown by a margin, so the nodule
    search can skip slices and pixels outside the lungs.

    Not in the paper (it worked on stacks sampled inside the lungs); the margin (default
    5 mm in z, 10 mm in-plane) keeps nodules at the lung surface and the 5-slice context.

    Args:
        lung: :class:`LungMask`, or a (z, y, x) bool mask together with ``spacing_zyx``.
        spacing_zyx: mm per array axis (taken from the LungMask when omitted).
        margin_mm: (z, y, x) margin in mm.

    Returns:
        :class:`LungBounds` (half-open voxel indices, clipped to the volume).

    Raises:
        NoLungError: the mask is empty.
    """
    if isinstance(lung, LungMask):
        mask, spacing = lung.mask, lung.spacing_zyx if spacing_zyx is None else spacing_zyx
    else:
        mask, spacing = np.asarray(lung, bool), spacing_zyx
        if spacing is None:
            raise ValueError("spacing_zyx is required with a plain mask")
    if not mask.any():
        raise NoLungError("The lung mask is empty")
    margin = tuple(int(np.ceil(m / s)) for m, s in zip(margin_mm, spacing))
    return LungBounds(*_grow(_bbox(mask), margin, mask.shape))


# ----------------------------------------------------------------------------------------
# input checks, stacks, whole-CT preprocessing


@dataclass
class DetectionInputReport:
    """Result of :func:`check_detection_input`.

    Attributes:
        n_slices: number of slices along k.
        slice_spacing_mm: distance between slice centres (the k spacing).
        slice_thickness_mm: DICOM SliceThickness (0018,0050) when the image carries it, else None.
        thick_slices: True when max(spacing, thickness) >= :data:`THICK_SLICE_MM`.
        warnings: human-readable notes (also issued as :class:`ThickSliceWarning`).
    """

    n_slices: int
    slice_spacing_mm: float
    slice_thickness_mm: float | None
    thick_slices: bool
    warnings: list[str] = field(default_factory=list)


def check_detection_input(ct: CTVolume, warn: bool = True) -> DetectionInputReport:
    """Check that a CT suits the 2.5D nodule search (5-slice stacks, thin slices).

    Args:
        ct: the CT volume.
        warn: also issue a :class:`ThickSliceWarning` for thick slices.

    Returns:
        :class:`DetectionInputReport` (``thick_slices`` flags slice spacing or thickness
        >= 5 mm: the network was designed for LUNA16's <= 2.5 mm slices, section 3.1).

    Raises:
        InputError: fewer than :data:`STACK_SIZE` (5) slices: no 5-slice stack can be formed.
    """
    n = ct.shape_zyx[0]
    spacing = float(ct.spacing[2])
    if n < STACK_SIZE:
        raise InputError(
            f"The CT has {n} slice(s); the nodule search stacks {STACK_SIZE} adjacent slices "
            f"and needs a volume of at least {STACK_SIZE} slices"
        )
    thickness = None
    if ct.image.HasMetaDataKey("0018|0050"):
        try:
            thickness = float(ct.image.GetMetaData("0018|0050").strip())
        except ValueError:
            thickness = None
    eff = max(spacing, thickness or 0.0)
    notes = []
    thick = eff >= THICK_SLICE_MM
    if thick:
        notes.append(
            f"Slices are {eff:g} mm apart/thick (>= {THICK_SLICE_MM:g} mm): a 5-slice stack spans "
            f"{STACK_SIZE * eff:g} mm and small nodules cover one slice or none; the nodule search "
            "was designed for <= 2.5 mm slices and is not validated on this input"
        )
        if warn:
            warnings.warn(notes[-1], ThickSliceWarning, stacklevel=2)
    return DetectionInputReport(n_slices=n, slice_spacing_mm=spacing, slice_thickness_mm=thickness,
                                thick_slices=thick, warnings=notes)


def stack_indices(k: int, n_slices: int, size: int = STACK_SIZE, reverse: bool = False) -> np.ndarray:
    """Slice indices of the stack centred on slice k: k-2..k+2 clamped to [0, n_slices-1].

    Edge handling: indices beyond the volume repeat the edge slice (not specified in the
    paper; see the module docstring).

    Args:
        k: centre slice index (0 <= k < n_slices).
        n_slices: number of slices in the volume.
        size: stack size (odd; 5 in the paper).
        reverse: return the indices in descending order.

    Returns:
        int64 array (size,).

    Raises:
        ValueError: even size, or k outside the volume.
    """
    if size % 2 != 1:
        raise ValueError(f"stack size must be odd, got {size}")
    if not 0 <= k < n_slices:
        raise ValueError(f"slice {k} outside the volume (0..{n_slices - 1})")
    h = size // 2
    idx = np.clip(np.arange(k - h, k + h + 1), 0, n_slices - 1).astype(np.int64)
    return idx[::-1].copy() if reverse else idx


def stack_slices(volume: np.ndarray, k: int, size: int = STACK_SIZE, reverse: bool = False) -> np.ndarray:
    """The 2.5D network input for slice k: slices {k-2, ..., k+2} as channels (section 3.2, step 5).

    Args:
        volume: (z, y, x) float array (preprocessed, [0, 1]).
        k: centre slice; size: stack size (5); reverse: see :func:`stack_indices`.

    Returns:
        float32 (size, y, x); channel size//2 is slice k.

    Raises:
        ValueError: see :func:`stack_indices`; or volume not 3D.
    """
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {v.shape}")
    return np.ascontiguousarray(v[stack_indices(k, v.shape[0], size, reverse)], dtype=np.float32)


@dataclass
class PreprocessedCT:
    """Output of :func:`preprocess_ct`.

    Attributes:
        image: float32 (z, y, x) in [0, 1]: HU window, CLAHE (if on), times the lung mask
            (if on).  With ``restrict_to_lungs`` the slices outside ``bounds`` +- 2 are
            windowed but not equalised.
        lung: the :class:`LungMask` (None when neither masking nor restriction asked for it).
        bounds: lung bounds (None without a lung mask); the slices/pixels to search.
        report: the :class:`DetectionInputReport`.
        reverse_stack: pass to :func:`stack_slices` (True when the k axis points to the feet).
        use_clahe, use_lung_mask: the switches used.
    """

    image: np.ndarray
    lung: LungMask | None
    bounds: LungBounds | None
    report: DetectionInputReport
    reverse_stack: bool
    use_clahe: bool
    use_lung_mask: bool

    def stack(self, k: int) -> np.ndarray:
        """(5, y, x) float32 network input centred on slice k (see :func:`stack_slices`)."""
        return stack_slices(self.image, k, reverse=self.reverse_stack)


def preprocess_ct(ct: CTVolume, use_clahe: bool = True, use_lung_mask: bool = True,
                  restrict_to_lungs: bool = True, lung: LungMask | None = None) -> PreprocessedCT:
    """Whole-CT preprocessing of section 3.2 (window, CLAHE, lung mask) for the nodule search.

    Args:
        ct: CT in HU.
        use_clahe: apply slice-wise CLAHE (paper default: on; off for the ablation).
        use_lung_mask: multiply by the lung mask (paper: on).
        restrict_to_lungs: compute the lung bounds and equalise only the slices within
            them (+- 2 for the stacks); needs the lung mask (computed even when
            ``use_lung_mask`` is False).
        lung: a precomputed :class:`LungMask` (skips :func:`lung_mask_from_ct`).

    Returns:
        :class:`PreprocessedCT`.

    Raises:
        InputError: fewer than 5 slices.
        NoLungError: no plausible lung (when a lung mask is needed).
    """
    report = check_detection_input(ct)
    need_lung = use_lung_mask or restrict_to_lungs
    if need_lung and lung is None:
        lung = lung_mask_from_ct(ct)
    bounds = lung_bounds(lung) if need_lung else None
    img = hu_window(ct.array)
    if use_clahe:
        n = img.shape[0]
        ks = range(n) if bounds is None else range(max(0, bounds.z0 - 2), min(n, bounds.z1 + 2))
        img = clahe_slices(img, slices=ks)
    if use_lung_mask:
        img *= lung.mask
    d = np.asarray(ct.image.GetDirection(), float).reshape(3, 3)
    return PreprocessedCT(image=img, lung=lung if need_lung else None, bounds=bounds, report=report,
                          reverse_stack=bool(d[2, 2] < 0), use_clahe=use_clahe, use_lung_mask=use_lung_mask)
