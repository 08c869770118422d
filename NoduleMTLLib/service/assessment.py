"""Report fields of an analysis: Lung-RADS v2022 category and Brock risk per nodule, and the
per-scan Lung-RADS category.

:func:`annotate_result` is called once per analysed CT, before the outputs are written
(``nodulemtl analyze`` / ``batch``, the Slicer module's in-process run): it sets
``nodule.type`` (:func:`NoduleMTLLib.clinical.lung_rads.classify_nodule`: the measured classifier),
``nodule.lung_rads`` (:func:`NoduleMTLLib.clinical.lung_rads.assess_nodule`) and ``nodule.brock``
(:func:`NoduleMTLLib.clinical.brock.assess_nodule`) on every found nodule and
``result.run["lung_rads"]`` (:func:`NoduleMTLLib.clinical.lung_rads.scan_category`) and
``result.run["patient"]`` (the Brock patient inputs and where they came from).
"""

from __future__ import annotations

import logging

import numpy as np

from ..clinical import brock, lung_rads, thick_slices

log = logging.getLogger(__name__)

#: In-plane working pixel (mm) of the lung mask used for the upper-lobe estimate.
LUNG_WORK_PIXEL_MM = 3.0


def patient_for(ct, age=None, sex=None, family_history=None, emphysema=None) -> brock.PatientInfo:
    """Brock patient inputs: the DICOM header of a CT read from a DICOM series, overridden by the options.

    Raises:
        ValueError: an unreadable ``age`` or ``sex`` option.
    """
    dicom = brock.patient_from_dicom(ct.source, ct.dicom_series_uid) if ct.dicom_series_uid else None
    return brock.merge_patient(dicom, age=age, sex=sex, family_history=family_history, emphysema=emphysema)


def nodule_locations(result, ct) -> dict:
    """nodule id -> :func:`NoduleMTLLib.clinical.brock.upper_lobe_from_lung_mask` record (lung mask computed once)."""
    from ..detection.preprocess import NoLungError, lung_mask_from_ct

    found = [n for n in result.nodules if n.found and n.centroid_lps_mm is not None]
    if not found:
        return {}
    try:  # coarse grid: only each lung's craniocaudal extent is used (~4x faster than the detector's 1.5 mm)
        lung = lung_mask_from_ct(ct, work_pixel_mm=LUNG_WORK_PIXEL_MM)
    except NoLungError as e:
        return {n.id: {"upper_lobe": None, "fraction_from_apex": None, "how": f"no lung mask: {str(e).split('. ')[0]}"} for n in found}
    d = np.asarray(ct.image.GetDirection()).reshape(3, 3)
    superior_is_low_k = bool(d[2, 2] < 0)  # LPS z = superior; k axis pointing down
    out = {}
    for n in found:
        i, j, k = ct.world_lps_to_index(n.centroid_lps_mm)
        out[n.id] = brock.upper_lobe_from_lung_mask(lung.labels, (k, j, i), superior_is_low_k)
    return out


def annotate_result(result, ct, patient: brock.PatientInfo | None = None) -> None:
    """Add ``lung_rads`` and ``brock`` to every found nodule of ``result`` and the per-scan
    category / patient inputs to ``result.run`` (in place).  See the module docstring.

    Args:
        result: :class:`NoduleMTLLib.core.results.AnalysisResult` of ``ct`` (masks on its grid).
        ct: :class:`NoduleMTLLib.core.io.CTVolume` (HU).
        patient: Brock patient inputs (:func:`patient_for`); None = unknown (no Brock probability).
    """
    patient = patient or brock.PatientInfo()
    found = [n for n in result.nodules if n.found and n.mask_box is not None]
    locations = nodule_locations(result, ct)
    detected = any(getattr(n, "detection", None) for n in found)
    count_note = ("found candidates of the whole-scan search: false positives inflate the count and lower the "
                  "probability" if detected else "found nodules of this run (the clicked ones)")
    found_ids = {id(n) for n in found}
    for n in result.nodules:
        ok = id(n) in found_ids
        typ = lung_rads.classify_nodule(n, ct) if ok else None
        if typ is not None:  # the measured classifier's type replaces the HU rule's everywhere
            n.type = typ["type"]
        n.lung_rads = lung_rads.assess_nodule(n, ct, typ) if ok else None
        n.brock = brock.assess_nodule(n, patient, max(1, len(found)), locations.get(n.id), count_note) if ok else None
    thick_slices.annotate_result(result, ct)  # > 2.5 mm: a note; >= 5 mm: small nodules "not categorised"
    result.run["lung_rads"] = lung_rads.scan_category([(n.id, n.lung_rads) for n in result.nodules])
    result.run["patient"] = patient.to_dict()
