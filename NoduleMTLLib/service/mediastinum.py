"""Clicks in the mediastinum: "no nodule at this point" instead of the whole heart (issue 22, item 7).

The click networks segment whatever soft-tissue blob lies under the click.  In the lung that
blob is a nodule (or a vessel: a small mask); between the lungs it is the heart, the aorta or a
hilar vessel, and the click path used to return the whole structure (the heart as a 108 mm
"nodule").  :func:`mediastinal_refusal` turns such an answer into "no nodule at this point".

The rule (not from a paper; a classical lung-mask test, thresholds measured on training scans,
``training/mediastinum_eval.py``, figures in ``training/RESULTS.md``):

1. Masks of at most :data:`SMALL_MASK_MM` long axis and :data:`SMALL_MASK_MM3` volume are left
   alone: an honest small mask (a vessel cross-section, a small nodule) is never refused.
2. The lung mask (:func:`NoduleMTLLib.detection.preprocess.compute_lung_mask`: aerated lung,
   per lung hole-filled and closed with a 10 mm disk, so nodules inside the lung and
   juxtapleural / juxtamediastinal nodules up to about 2 cm are inside it) is computed on a slab
   of whole axial slices around the click (the mask's slices within :data:`SLAB_HALF_MM` of the
   click, plus :data:`SLAB_MARGIN_MM`), on a coarse grid (:data:`WORK_PIXEL_MM`,
   :data:`WORK_SLICE_MM`): about 0.2-0.5 s on 2 CPU cores, spent only on masks larger than step
   1's whose shape or continuation already passes the last condition of step 3 (a nodule clicked
   in the lung usually does not: no lung mask is computed for it).
3. A click outside the lung mask is refused when all of these hold:

   * the click voxel is outside the lung mask (a nodule inside the lung, however large, is
     inside its hole-filled lung);
   * the click lies between the lungs: inside the convex hull of the lung mask on the click's
     axial slice (the mediastinum, hila, heart and great vessels; the chest wall and the
     abdomen are outside that hull and keep their current behaviour);
   * less than :data:`MIN_LUNG_FRACTION` of the mask's voxels (on the slab) lie in the lung
     mask: the mask is mostly mediastinal tissue;
   * and the mask is not shaped like a lesion: it continues beyond what a nodule or mass
     spans - its axial long axis is at least :data:`MIN_STRUCTURE_MM` (the heart, a great
     vessel's length in-plane), or it runs along the slices: its extent across the slices
     (first to last slice centre) is at least :data:`MIN_Z_RATIO` times its axial long axis
     (a vessel: the aorta, the superior vena cava, a pulmonary artery running along z), or the
     structure runs on past both ends of the mask (:func:`continuation` >= :data:`MIN_CONTINUATION`:
     the mask is a piece of a vessel or of the heart that the networks stopped segmenting,
     while a nodule or mass ends; only with :data:`CONTINUATION_SIGNAL`, **off as shipped**).

4. Only with :data:`CONTINUATION_SIGNAL` (off as shipped): a click inside the lung mask (a hilar
   vessel: the hole-filled, closed lung mask holds the hilum) is refused when it lies within
   :data:`HILUM_MM` of the mediastinum on its slice and the structure runs on past both ends of
   the mask (:data:`MIN_CONTINUATION`).

   The last condition keeps lung masses that abut or invade the mediastinum: they lie mostly
   outside the lung mask too (the 6 cm adenocarcinoma of Lung-PET-CT-Dx A0001 has 17 % of its
   mask in it), but they are bounded (A0001: 65 mm across, as long in z as across).  The cost
   is that a compact mediastinal blob under 10 cm - a hilar vessel segment, part of the heart,
   the aorta, a lymph node - keeps its mask unless the structure runs on past its ends
   (figures: ``training/RESULTS.md``, "Clicks in the mediastinum").

Third round (issue 22 item 7, measured and not shipped): with 30-80 mm synthetic masses pasted
against the mediastinum of the training / validation scans as protected clicks
(``training/mediastinum_eval.py --masses``), no vessel signal beyond :func:`continuation` separated
the mediastinal and hilar masks from the protected ones with the usual margin (tubularity: constant,
round cross-sections with full end slices; the share of the mask's surface touching tissue of its own
HU; a bounded tube of the mask's calibre going on past its ends -
``training.mediastinum_eval.tube_features``), and the continuation itself reaches 0.867 on a
validation synthetic-mass click: :data:`CONTINUATION_SIGNAL` stays off (``training/RESULTS.md``).

Where: the analysis service (:func:`NoduleMTLLib.service.analysis.analyze`, every product entry point:
``nodulemtl analyze`` / ``batch``, the Slicer module, the worker) applies
:func:`refuse_mediastinal_clicks` to the click path's raw result; the engine
(``pipeline.analyze_points``, used as such by the VOI evaluations) is unchanged.

When the test cannot be made it is skipped and the answer is left as the networks gave it: a
field of view narrower than :data:`MIN_FOV_MM` (a crop: the lungs touch the image border and
the lung mask cannot be computed), or no lung found in the slab (:class:`NoLungError`).

Arrays are numpy (z, y, x) on the CT grid; the slice axis is the array's first axis (as in
:func:`NoduleMTLLib.inference.pipeline.check_point`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from ..core.consensus import MaskBox
from ..core.io import CTVolume
from ..core.results import AnalysisResult, NetworkOutput

#: Masks up to this long axis (mm) and volume (mm^3) are never refused (an honest small mask;
#: the bound of ``Testing/Python/test_bad_clicks.py``).
SMALL_MASK_MM, SMALL_MASK_MM3 = 10.0, 300.0
#: Refuse only when under this fraction of the mask lies in the lung mask.  Chosen on training
#: scans (``training/mediastinum_eval.py``): the largest multiple of 0.05 below the smallest
#: fraction of a juxtamediastinal nodule's mask (0.238).
MIN_LUNG_FRACTION = 0.2
#: ... and the mask's axial long axis is at least this (mm): a clinical bound, not fitted (the
#: training nodules' masks reach 36 mm, the training mediastinal masks 162 mm, 25 of them >= 100
#: mm; lung masses up to about 10 cm must keep their outline) ...
MIN_STRUCTURE_MM = 100.0
#: ... or its extent across the slices is at least this many times its axial long axis.  Chosen
#: on training scans: the smallest multiple of 0.1 at least 0.15 above the largest ratio of a
#: juxtamediastinal nodule (1.151 over 19 nodule clicks at stake).
MIN_Z_RATIO = 1.4
#: The slab of slices whose lung mask is computed: the mask's slices within this distance (mm)
#: of the click ...
SLAB_HALF_MM = 40.0
#: ... grown by this margin (mm) on both sides.
SLAB_MARGIN_MM = 10.0
#: Coarse grid of the lung mask (mm): in-plane pixel and slice spacing.
WORK_PIXEL_MM, WORK_SLICE_MM = 3.0, 2.5
#: Smallest lung volume (mL) in the slab for the test to be made.
MIN_SLAB_LUNG_ML = 20.0
#: The test needs the whole axial body section: skipped below this field of view (mm).
MIN_FOV_MM = 150.0
#: Below this HU a voxel next to the mask is aerated lung (``air_contact`` of :func:`mediastinal_features`).
AIR_CONTACT_HU = -400.0
#: ... or the structure continues beyond both ends of the mask: at least this share of each end
#: slice's pixels lies, :data:`CONT_DIST_MM` past that end, within the HU band of the mask's core
#: (:func:`continuation`).  Chosen on training scans: the smallest multiple of 0.1 at least 0.15
#: above the largest continuation of a nodule click (0.585 over the 42 nodule clicks with a larger mask).
MIN_CONTINUATION = 0.8
#: Distance (mm) past each end slice of the mask at which :func:`continuation` looks (the first
#: slice at least this far).
CONT_DIST_MM = 5.0
#: The mask's core: its voxels at least this far (mm, in-plane) from the mask's edge on their slice
#: (the whole mask when the core has under 10 voxels).
CORE_MM = 3.0
#: The HU band of :func:`continuation`: the core's 10th to 90th percentile, widened by this (HU) on both sides.
CONT_BAND_HU = 30.0
#: A click inside the lung mask is refused only within this distance (mm, in-plane) of the
#: mediastinum (the hilum) and when the structure runs on past the mask (:data:`MIN_CONTINUATION`).
#: The hilar clicks of ``training/mediastinum_eval.py`` are drawn within the same distance (not fitted).
HILUM_MM = 15.0
#: Whether the continuation signal (the last alternative of step 3 and step 4 of the module
#: docstring) is applied.  Off: measured and not shipped (issue 22 item 7, second round,
#: ``training/RESULTS.md``): on the training / validation whole scans it refused no nodule and more
#: mediastinal and hilar clicks, but not the test scan's descending-aorta and hilar-artery clicks it
#: was meant for, and it would add an unmeasured risk for central (hilar) tumours.  Third round: with
#: synthetic masses against the mediastinum as protected clicks it keeps every training one (largest
#: continuation 0.567) but refuses one validation mass click (0.867, a 23 mm mask on a 66 mm mass).
CONTINUATION_SIGNAL = False
#: The answer of a refused click (the same "no nodule" wording as the click path's).
MESSAGE = "no nodule at this point: the click is in the mediastinum (heart/aorta/hilum)"


def mediastinal_features(ct: CTVolume, point_lps, mask: MaskBox, cont: float | None = None) -> dict | None:
    """The figures the rule reads, for one click and its mask.

    Args:
        ct: the CT (HU, LPS geometry).
        point_lps: the click, world LPS mm.
        mask: the mask the click path would report (:class:`~NoduleMTLLib.core.consensus.MaskBox`
            on ``ct``'s grid).
        cont: its :func:`continuation` when already computed (None: computed here when
            :data:`CONTINUATION_SIGNAL` is on, else left None).

    Returns:
        ``{"click_in_lung": bool, "between_lungs": bool, "lung_fraction": float in [0, 1],
        "air_contact": float in [0, 1] (share of the mask's in-plane outer ring below
        :data:`AIR_CONTACT_HU`), "click_to_lung_mm": float (in-plane, on the click's slice),
        "click_to_mediastinum_mm": float (in-plane, to the slice's mediastinum: the convex hull
        of its lung mask minus the lung, opened by 2 pixels; inf when there is none),
        "continuation": float in [0, 1] or None (:func:`continuation`; see ``cont``),
        "z_extent_mm": float (first to last slice centre), "slab": (k0, k1)}``, or None when the test cannot be made (field of view under
        :data:`MIN_FOV_MM`, click off the grid, no lung in the slab).
    """
    from skimage.morphology import convex_hull_image

    from ..core.io import ijk_to_lps_matrix
    from ..detection.preprocess import NoLungError, compute_lung_mask

    sx, sy, sz = (float(v) for v in ct.spacing)
    nz, ny, nx = ct.shape_zyx
    if nx * sx < MIN_FOV_MM or ny * sy < MIN_FOV_MM:
        return None
    i, j, k = (int(round(v)) for v in ct.world_lps_to_index(point_lps))
    if not (0 <= i < nx and 0 <= j < ny and 0 <= k < nz):
        return None
    half = int(math.ceil(SLAB_HALF_MM / sz))
    margin = int(math.ceil(SLAB_MARGIN_MM / sz))
    m0, m1 = mask.offset_zyx[0], mask.offset_zyx[0] + mask.array.shape[0]
    k0 = max(0, min(k, max(m0, k - half)) - margin)
    k1 = min(nz, max(k + 1, min(m1, k + half + 1)) + margin)
    try:
        lung = compute_lung_mask(np.asarray(ct.array[k0:k1]), (sz, sy, sx), ijk_to_lps=ijk_to_lps_matrix(ct.image),
                                 min_lung_volume_ml=MIN_SLAB_LUNG_ML, work_pixel_mm=WORK_PIXEL_MM,
                                 work_slice_mm=WORK_SLICE_MM).labels > 0
    except NoLungError:
        return None
    on_slice = lung[k - k0]
    between = bool(on_slice.any() and convex_hull_image(on_slice)[j, i])
    # the mask's voxels on the slab
    z0, z1 = max(m0, k0), min(m1, k1)
    oy, ox = mask.offset_zyx[1:]
    part = mask.array[z0 - m0:z1 - m0]
    inside = lung[z0 - k0:z1 - k0, oy:oy + part.shape[1], ox:ox + part.shape[2]][part]
    frac = float(inside.mean()) if inside.size else 0.0
    # what surrounds the mask in-plane: the share of its outer ring (1 voxel) that is aerated (< AIR_CONTACT_HU)
    box = np.pad(mask.array, ((0, 0), (1, 1), (1, 1)))
    ring = ndi.binary_dilation(box, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)) & ~box
    y0, x0 = oy - 1, ox - 1
    hu = np.asarray(ct.array[m0:m1, max(0, y0):oy + mask.array.shape[1] + 1, max(0, x0):ox + mask.array.shape[2] + 1])
    ring = ring[:, max(0, y0) - y0:, max(0, x0) - x0:][:, :hu.shape[1], :hu.shape[2]]
    contact = float((hu[ring] < AIR_CONTACT_HU).mean()) if ring.any() else 0.0
    dist = ndi.distance_transform_edt(~on_slice, sampling=(sy, sx))[j, i] if on_slice.any() else float("inf")
    # the mediastinum on the click's slice: between the lungs (their convex hull) outside them, opened by 2 pixels
    med = ndi.binary_opening(convex_hull_image(on_slice) & ~on_slice, iterations=2) if on_slice.any() else on_slice
    dmed = ndi.distance_transform_edt(~med, sampling=(sy, sx))[j, i] if med.any() else float("inf")
    return {"click_in_lung": bool(on_slice[j, i]), "between_lungs": between, "lung_fraction": frac,
            "air_contact": contact, "click_to_lung_mm": float(dist), "click_to_mediastinum_mm": float(dmed),
            "continuation": float(cont) if cont is not None else continuation(ct, mask) if CONTINUATION_SIGNAL else None,
            "z_extent_mm": float((mask.array.shape[0] - 1) * sz), "slab": (k0, k1)}


def continuation(ct: CTVolume, mask: MaskBox) -> float:
    """Whether the structure under the mask goes on past both of its ends across the slices.

    A nodule or mass is bounded: past its first and last slice lie lung, fat or another tissue.
    The mask of a vessel (the aorta, a pulmonary artery, the vena cava) or of part of the heart
    instead stops where the networks stop, while the structure runs on.  For each end slice of
    the mask, the pixels of that slice's mask are looked at on the first slice at least
    :data:`CONT_DIST_MM` past it; the share of them whose HU lies in the band of the mask's core
    (its 10th to 90th HU percentile over the voxels at least :data:`CORE_MM` in-plane from the
    mask's edge, +/- :data:`CONT_BAND_HU`) is that end's continuation.  An end whose look-up slice
    lies outside the CT gives no evidence (0.0): a nodule cut by the first or last slice of a
    partial scan (or of a VOI crop) must not look like a vessel.  Not from a paper.

    Args:
        ct: the CT (HU); mask: a non-empty :class:`~NoduleMTLLib.core.consensus.MaskBox` on its grid.

    Returns:
        the smaller of the two ends' continuations, float in [0, 1].
    """
    return _continuation(ct, mask)[0]


def _core_band(hu: np.ndarray, m: np.ndarray, spacing_yx) -> tuple[float, float]:
    """The HU band of the mask's core (module constants :data:`CORE_MM`, :data:`CONT_BAND_HU`):
    ``hu`` float32 and ``m`` bool, both (z, y, x) on the mask's box -> (low, high) HU."""
    core = np.zeros_like(m)
    for k in range(m.shape[0]):
        if m[k].any():
            core[k] = ndi.distance_transform_edt(np.pad(m[k], 1), sampling=spacing_yx)[1:-1, 1:-1] >= CORE_MM
    if core.sum() < 10:
        core = m
    p10, p90 = np.percentile(hu[core], [10, 90])
    return float(p10 - CONT_BAND_HU), float(p90 + CONT_BAND_HU)


def continuation_ends(ct: CTVolume, mask: MaskBox) -> tuple[list, tuple[float, float]]:
    """The two ends looked at by :func:`continuation`, and the core's HU band.

    Args:
        ct: the CT (HU); mask: a non-empty :class:`~NoduleMTLLib.core.consensus.MaskBox` on its grid.

    Returns:
        ``(ends, (low, high))``: ``ends`` holds, for the first and the last slice of the mask,
        ``(end_mask, lookup_hu)`` with ``end_mask`` bool (y, x) on the mask's box (that slice's
        mask) and ``lookup_hu`` float32 (y, x) (the CT slice :data:`CONT_DIST_MM` past it, on the
        same box), or None when that slice lies outside the CT; ``low``/``high`` in HU.
    """
    sx, sy, sz = (float(v) for v in ct.spacing)
    m = mask.array
    z0, y0, x0 = mask.offset_zyx
    nz_ct = ct.shape_zyx[0]
    arr = ct.array
    hu = np.asarray(arr[z0:z0 + m.shape[0], y0:y0 + m.shape[1], x0:x0 + m.shape[2]], dtype=np.float32)
    band = _core_band(hu, m, (sy, sx))
    step = max(1, int(math.ceil(CONT_DIST_MM / sz - 1e-6)))
    zs = np.nonzero(m.reshape(len(m), -1).any(1))[0]
    ends = []
    for end, d in ((int(zs[0]), -1), (int(zs[-1]), 1)):
        b = z0 + end + d * step
        ends.append((m[end], np.asarray(arr[b, y0:y0 + m.shape[1], x0:x0 + m.shape[2]], dtype=np.float32))
                    if 0 <= b < nz_ct else None)
    return ends, band


def _continuation(ct: CTVolume, mask: MaskBox) -> tuple[float, tuple[float, float]]:
    """:func:`continuation` and the core's HU band (low, high)."""
    ends, (lo, hi) = continuation_ends(ct, mask)
    shares = [0.0 if e is None else float(((e[1][e[0]] >= lo) & (e[1][e[0]] <= hi)).mean()) for e in ends]
    return min(shares), (lo, hi)


def is_small(diameter_mm: float, volume_mm3: float) -> bool:
    """True for a mask the rule leaves alone (long axis <= :data:`SMALL_MASK_MM` mm and volume
    <= :data:`SMALL_MASK_MM3` mm^3, the long axis rounded to 0.1 mm as reported)."""
    return round(float(diameter_mm) + 1e-9, 1) <= SMALL_MASK_MM and float(volume_mm3) <= SMALL_MASK_MM3


def mediastinal_refusal(ct: CTVolume, point_lps, mask: MaskBox | None, diameter_mm: float,
                        volume_mm3: float) -> str | None:
    """The rule of the module docstring: why the click's mask is refused, or None to keep it.

    Args:
        ct: the CT (HU, LPS geometry).
        point_lps: the click, world LPS mm.
        mask: the mask the click path would report (MaskBox on ``ct``'s grid), or None.
        diameter_mm, volume_mm3: its long axis (mm, as measured on the mask: without the
            reported size correction, :func:`measured_long_axis`) and volume (mm^3), from
            :func:`NoduleMTLLib.core.postprocess.measure_nodule`.

    Returns:
        :data:`MESSAGE` when the click is refused, else None (also when the test cannot be made).
    """
    if mask is None or is_small(diameter_mm, volume_mm3):
        return None
    cont = continuation(ct, mask) if CONTINUATION_SIGNAL else None
    if not lesion_shape_exceeded(ct, mask, diameter_mm) and (cont is None or cont < MIN_CONTINUATION):
        return None  # decided without the lung mask (most nodules)
    f = mediastinal_features(ct, point_lps, mask, cont)
    if f is None:
        return None
    return MESSAGE if refuses(f, diameter_mm) else None


def lesion_shape_exceeded(ct: CTVolume, mask: MaskBox, diameter_mm: float) -> bool:
    """The shape part of the rule: axial long axis >= :data:`MIN_STRUCTURE_MM`, or extent across
    the slices (first to last slice centre, mm) >= :data:`MIN_Z_RATIO` x the long axis (the
    other part of the last condition, :func:`continuation`, is checked by :func:`mediastinal_refusal`)."""
    z_extent = (mask.array.shape[0] - 1) * float(ct.spacing[2])
    return float(diameter_mm) >= MIN_STRUCTURE_MM or z_extent >= MIN_Z_RATIO * float(diameter_mm)


def refuses(features: dict, diameter_mm: float, continuation_signal: bool | None = None) -> bool:
    """The decision of the rule (module docstring, steps 3 and 4) on :func:`mediastinal_features`'
    figures and the mask's axial long axis (mm).  ``continuation_signal``: apply the continuation
    signal (None: :data:`CONTINUATION_SIGNAL`, off as shipped).  Figures without ``continuation``
    (records of the first version of the rule) or with it None are read as continuation 0."""
    f = features
    on = CONTINUATION_SIGNAL if continuation_signal is None else bool(continuation_signal)
    runs_on = on and (f.get("continuation") or 0.0) >= MIN_CONTINUATION
    if f["click_in_lung"]:  # a hilar vessel: in the closed lung mask, next to the mediastinum, running on past the mask
        return runs_on and f.get("click_to_mediastinum_mm", float("inf")) <= HILUM_MM
    if not f["between_lungs"] or f["lung_fraction"] >= MIN_LUNG_FRACTION:
        return False
    return float(diameter_mm) >= MIN_STRUCTURE_MM or f["z_extent_mm"] >= MIN_Z_RATIO * float(diameter_mm) or runs_on


def measured_long_axis(nodule) -> float:
    """The long axis (mm) of the nodule's mask as measured, before the reported size correction
    (``NoduleResult.size_correction``, a bias correction of the reported axes that leaves the mask
    as it is): the rule's sizes are sizes of the mask."""
    corr = getattr(nodule, "size_correction", None) or {}
    return float(corr.get("measured_long_axis_mm", nodule.diameter_mm))


def refuse_mediastinal_clicks(result: AnalysisResult, ct: CTVolume) -> list[int]:
    """Apply :func:`mediastinal_refusal` to every found nodule of a click-path result, in place.

    A refused nodule becomes "not found" with :data:`MESSAGE`, like a click where nothing was
    segmented: no mask, no measurements, every network's answer dropped (no mask, no
    probability: the networks' outputs describe the heart or the aorta, not a nodule).

    Args:
        result: :class:`~NoduleMTLLib.core.results.AnalysisResult` of ``pipeline.analyze_points``
            (raw outputs, before calibration and assessment).
        ct: the CT it was computed on.

    Returns:
        the ids of the refused nodules.
    """
    from ..core.consensus import compute_consensus

    refused = []
    for n in result.nodules:
        box = n.mask_box if n.found else None
        if box is None or mediastinal_refusal(ct, n.point_lps_mm, box, measured_long_axis(n), n.volume_mm3) is None:
            continue
        refused.append(n.id)
        ids = list(n.networks) or list(n.network_masks)
        n.found, n.mask, n.message = False, None, MESSAGE
        for k in ("diameter_mm", "short_axis_mm", "volume_mm3", "mean_hu", "solid_fraction", "type",
                  "malignancy_probability", "centroid_lps_mm"):
            setattr(n, k, None)
        n.networks = {nid: NetworkOutput(nid, None, {}, None) for nid in ids}
        n.network_masks = {nid: None for nid in ids}
        if n.consensus is not None and ids:
            n.consensus = compute_consensus(n.network_masks, {nid: None for nid in ids})
    return refused
