"""Thick slices: a per-nodule note, and "not categorised" where Lung-RADS cannot be trusted.

Lung-RADS v2022 (ACR) asks for CT reconstructed at slices of at most
:data:`ACR_MAX_SLICE_MM` = 2.5 mm.  On thicker slices, partial volume inflates the segmented
volume and blurs the solid component: the sample nodule (11 mm, part-solid, 4B) resampled to
5 mm slices measured +66 % volume, read as ground-glass and fell to category 2.  So
(:func:`annotate_result`, called by :func:`NoduleMTLLib.service.assessment.annotate_result` after the
per-nodule records):

* slices thicker than 2.5 mm: every found nodule gets a note (``nodules.json`` ``message`` and
  ``lung_rads.notes``, the CSV's ``message`` column, the report and the panel);
* slices of :data:`NOT_CATEGORISED_SLICE_MM` = 5 mm or more: a nodule whose long axis spans
  fewer than :data:`MIN_SLICES_ACROSS` = 3 slices (e.g. < 15 mm on 5 mm slices) is "not
  categorised" (``lung_rads.category`` None, ``rule`` says why) rather than given a category
  that may be wrong; the per-scan category is then taken over the other nodules.

The slice thickness is the largest voxel spacing (any axis order), or the DICOM SliceThickness
(0018,0050) when the image carries it and it is larger.
"""

from __future__ import annotations

#: Thickest slices (mm) Lung-RADS v2022 is specified for (ACR CT technical parameters).
ACR_MAX_SLICE_MM = 2.5
#: Slices at least this thick (mm) leave small nodules uncategorised.
NOT_CATEGORISED_SLICE_MM = 5.0
#: A nodule must span at least this many slices (long axis / thickness) to be categorised on thick slices.
MIN_SLICES_ACROSS = 3


def slice_thickness_mm(ct) -> float:
    """Largest voxel spacing of ``ct`` (mm), or its DICOM SliceThickness when larger."""
    t = max(float(v) for v in ct.image.GetSpacing())
    try:
        if ct.image.HasMetaDataKey("0018|0050"):
            t = max(t, float(ct.image.GetMetaData("0018|0050").strip()))
    except (RuntimeError, ValueError):
        pass
    return t


def annotate_result(result, ct) -> float:
    """Add the thick-slice note / "not categorised" to the found nodules' records (module
    docstring), in place; call after their ``lung_rads`` records are set and before the per-scan
    category.  Returns the slice thickness (mm)."""
    t = slice_thickness_mm(ct)
    if t <= ACR_MAX_SLICE_MM:
        return t
    note = (f"slices {t:.1f} mm thick (> {ACR_MAX_SLICE_MM} mm): size, type and Lung-RADS are less reliable "
            f"(Lung-RADS asks for slices of at most {ACR_MAX_SLICE_MM} mm)")
    for n in result.nodules:
        if not n.found:
            continue
        n.message = f"{n.message}; {note}" if n.message else note
        rec = n.lung_rads
        if rec is None:
            continue
        rec.setdefault("notes", []).append(note)
        long_axis = n.diameter_mm or 0.0
        if t >= NOT_CATEGORISED_SLICE_MM and long_axis < MIN_SLICES_ACROSS * t and rec.get("category") is not None:
            why = (f"not categorised: the nodule ({long_axis:.1f} mm) spans fewer than {MIN_SLICES_ACROSS} slices of "
                   f"{t:.1f} mm; reconstruct at <= {ACR_MAX_SLICE_MM} mm to categorise")
            rec.update(category=None, rule=why, suggestions=[])
            rec["notes"].append(why)
            n.message = f"{n.message}; Lung-RADS {why}"
    return t
