"""Brock (PanCan) probability that a lung nodule seen on a first screening CT is cancer.

Model: McWilliams A. et al., "Probability of cancer in pulmonary nodules detected on first
screening CT", *N Engl J Med* 2013;369:910-919 (doi:10.1056/NEJMoa1214726), **full model
with spiculation** (Table 3, model 2b; the "Brock University" calculator).  Coefficients
as listed in that table and reproduced in the tabulated equations of Eur Radiol
2019;29(10):5367-5377 (PMC6717521, Table 2, column "BU"):

    logit = -6.7892
            + 0.0287 x (age - 62)                      age in years
            + 0.6011 x female
            + 0.2961 x family history of lung cancer
            + 0.2953 x emphysema
            - 5.3854 x ((size / 10) ** -0.5 - 1.58113883)   size in mm (1.58113883 = 0.4 ** -0.5:
                                                              the transform is centred at 4 mm)
            + 0.3770 x part-solid  - 0.1276 x non-solid      (solid: 0)
            + 0.6581 x upper lobe
            - 0.0824 x (nodule count - 4)
            + 0.7729 x spiculation
    probability = 1 / (1 + exp(-logit))

Nodule size is the longest diameter, as the PanCan radiologists measured it (Tammemägi M. et
al., *J Thorac Oncol* 2019;14(2):203-211: "radiologist-measured maximum diameter").

This is a **different model** from the networks' malignancy probability: a logistic
regression on patient and nodule features fitted on the PanCan screening cohort.

Where the inputs come from here (:func:`assess_nodule`): size and type from the mask;
spiculation from a DSMT-Net sign head (probability >= 0.5); upper lobe from the nodule's
position in the CT's lung mask (:func:`upper_lobe_from_lung_mask`, approximate: fissures
are not segmented); nodule count = the found nodules of the run; age and sex from the
DICOM header or the options; family history and emphysema from the options only.
Missing age or sex: no probability (``missing``).  Family history, emphysema,
spiculation or upper lobe unknown: set to "no" and listed in ``assumed``; every one of
these coefficients is positive, so the probability is then a lower bound
(``lower_bound: true``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

MODEL = "Brock (PanCan) full model with spiculation, McWilliams et al., N Engl J Med 2013;369:910-919 (Table 3, model 2b)"

#: Coefficients of the full model with spiculation (see the module docstring).
COEFFICIENTS = {
    "intercept": -6.7892,
    "age": 0.0287,            # per year, centred at 62
    "female": 0.6011,
    "family_history": 0.2961,
    "emphysema": 0.2953,
    "size": -5.3854,          # on (size_mm / 10) ** -0.5 - 1.58113883
    "part-solid": 0.3770,
    "ground-glass": -0.1276,  # non-solid
    "upper_lobe": 0.6581,
    "nodule_count": -0.0824,  # centred at 4
    "spiculation": 0.7729,
}
AGE_CENTRE = 62.0
SIZE_CENTRE = 1.58113883  # (4 mm / 10) ** -0.5
COUNT_CENTRE = 4.0

#: Spiculation probability (DSMT-Net sign head) at and above which the nodule counts as spiculated.
SPICULATION_PROBABILITY = 0.5
#: Upper-lobe approximation: centroid in the upper part of its lung's craniocaudal extent.
UPPER_LOBE_FRACTION = 0.5


def probability(age: float, female: bool, family_history: bool, emphysema: bool, size_mm: float, nodule_type: str,
                upper_lobe: bool, nodule_count: int, spiculation: bool) -> float:
    """Brock full-model (with spiculation) probability of cancer, in [0, 1].

    Args:
        age: years; female: patient sex is female; family_history: lung cancer in a
        first-degree relative; emphysema: on the CT; size_mm: longest nodule diameter (mm);
        nodule_type: "solid", "part-solid" or "ground-glass"/"non-solid"; upper_lobe:
        nodule in an upper lobe; nodule_count: nodules on the scan (>= 1); spiculation.

    Raises:
        ValueError: size <= 0, count < 1, age not a positive number, unknown type.

    Source: McWilliams et al. 2013, Table 3 (model 2b); see the module docstring.
    """
    if not (isinstance(size_mm, (int, float)) and math.isfinite(size_mm) and size_mm > 0):
        raise ValueError(f"nodule size must be > 0 mm, got {size_mm!r}")
    if not (isinstance(age, (int, float)) and math.isfinite(age) and 0 < age < 130):
        raise ValueError(f"age must be a number of years, got {age!r}")
    if int(nodule_count) < 1:
        raise ValueError(f"nodule count must be >= 1, got {nodule_count!r}")
    t = {"non-solid": "ground-glass"}.get(nodule_type, nodule_type)
    if t not in ("solid", "part-solid", "ground-glass"):
        raise ValueError(f"unknown nodule type {nodule_type!r}")
    c = COEFFICIENTS
    logit = (c["intercept"] + c["age"] * (age - AGE_CENTRE) + c["female"] * bool(female)
             + c["family_history"] * bool(family_history) + c["emphysema"] * bool(emphysema)
             + c["size"] * ((size_mm / 10.0) ** -0.5 - SIZE_CENTRE)
             + (c[t] if t != "solid" else 0.0) + c["upper_lobe"] * bool(upper_lobe)
             + c["nodule_count"] * (int(nodule_count) - COUNT_CENTRE) + c["spiculation"] * bool(spiculation))
    return 1.0 / (1.0 + math.exp(-logit))


@dataclass
class PatientInfo:
    """Patient inputs of the Brock model, each None when unknown, and where each came from.

    Attributes:
        age: years; sex: "F" or "M"; family_history, emphysema: bool.
        sources: input name -> "dicom", "option".
    """

    age: float | None = None
    sex: str | None = None
    family_history: bool | None = None
    emphysema: bool | None = None
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"age": self.age, "sex": self.sex, "family_history": self.family_history, "emphysema": self.emphysema,
                "sources": dict(self.sources)}


def parse_age(text) -> float | None:
    """Years from a DICOM Age String (``"065Y"``, ``"018M"``, ``"003W"``, ``"010D"``) or a number; None if unreadable."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) and text > 0 else None
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(text).upper())
    if not m:
        return None
    n = float(m.group(1))
    years = n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0, "": 1.0}[m.group(2)]
    return years if years > 0 else None


def parse_sex(text) -> str | None:
    """"F" or "M" from a DICOM Patient's Sex or an option (``female``, ``m``, ...); None otherwise (``O``, empty)."""
    s = str(text or "").strip().upper()
    if s in ("F", "FEMALE", "W", "WOMAN"):
        return "F"
    if s in ("M", "MALE", "MAN"):
        return "M"
    return None


def patient_from_dicom(folder, series_uid: str | None = None) -> PatientInfo:
    """Age and sex from the DICOM header of the series in ``folder`` (first file GDCM lists).

    Age: Patient's Age (0010,1010), else Study Date - Patient's Birth Date.  Sex: Patient's
    Sex (0010,0040), F or M only.  Unreadable or absent values stay None.
    """
    import pydicom
    import SimpleITK as sitk

    info = PatientInfo()
    try:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid or "")
        ds = pydicom.dcmread(files[0], stop_before_pixels=True) if files else None
    except Exception:  # not DICOM: nothing to read
        ds = None
    if ds is None:
        return info
    age = parse_age(getattr(ds, "PatientAge", None) or None)
    if age is None:
        birth, study = str(getattr(ds, "PatientBirthDate", "") or ""), str(getattr(ds, "StudyDate", "") or "")
        if re.fullmatch(r"\d{8}", birth) and re.fullmatch(r"\d{8}", study):
            y = int(study[:4]) - int(birth[:4]) - ((study[4:]) < (birth[4:]))
            age = float(y) if y > 0 else None
    if age is not None:
        info.age, info.sources["age"] = age, "dicom"
    sex = parse_sex(getattr(ds, "PatientSex", None))
    if sex is not None:
        info.sex, info.sources["sex"] = sex, "dicom"
    return info


def merge_patient(dicom: PatientInfo | None, age=None, sex=None, family_history=None, emphysema=None) -> PatientInfo:
    """Options override the DICOM header (``None`` = not given).

    Raises:
        ValueError: an age or sex option that cannot be read.
    """
    out = PatientInfo(**{k: getattr(dicom, k) for k in ("age", "sex", "family_history", "emphysema")},
                      sources=dict(dicom.sources)) if dicom is not None else PatientInfo()
    if age is not None:
        a = parse_age(age)
        if a is None:
            raise ValueError(f"age {age!r} is not a number of years")
        out.age, out.sources["age"] = a, "option"
    if sex is not None:
        s = parse_sex(sex)
        if s is None:
            raise ValueError(f"sex {sex!r} is not F or M")
        out.sex, out.sources["sex"] = s, "option"
    for name, v in (("family_history", family_history), ("emphysema", emphysema)):
        if v is not None:
            setattr(out, name, bool(v))
            out.sources[name] = "option"
    return out


def nearest_label(labels: np.ndarray, c_zyx: tuple[int, int, int]) -> int:
    """The label of the non-zero voxel nearest to ``c_zyx`` (Euclidean distance in voxel
    indices, as ``scipy.ndimage.distance_transform_edt`` without sampling; ties: the first in
    C order of the searched block).

    Searched in growing cubes around the point, so memory stays proportional to the cube, not
    to the grid (a whole-grid distance transform with indices costs ~20 bytes per voxel: 5 GB
    on a 512 x 512 x 277 scan).

    Args:
        labels: (z, y, x) integer label map with at least one non-zero voxel.
        c_zyx: voxel index inside the grid.

    Returns:
        The nearest non-zero label.

    Raises:
        ValueError: ``labels`` is all zero.
    """
    if not labels.any():
        raise ValueError("nearest_label: the label map is empty")
    r = 4
    while True:
        lo = [max(v - r, 0) for v in c_zyx]
        hi = [min(v + r + 1, s) for v, s in zip(c_zyx, labels.shape)]
        block = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        idx = np.argwhere(block)
        whole = all(a == 0 for a in lo) and all(b == s for b, s in zip(hi, labels.shape))
        if len(idx):
            d2 = ((idx + np.asarray(lo) - np.asarray(c_zyx)) ** 2).sum(axis=1)
            best = int(np.argmin(d2))
            # exact once the nearest voxel lies within the ball the cube surely contains
            if d2[best] <= r * r or whole:
                return int(block[tuple(idx[best])])
        r *= 2


def upper_lobe_from_lung_mask(lung_labels: np.ndarray, centroid_zyx, superior_is_low_k: bool) -> dict:
    """Approximate upper-lobe location of a nodule from a left/right lung label map.

    The nodule's lung is the label at its centroid (else the nearest lung voxel's label);
    the nodule counts as upper lobe when its centroid lies in the upper
    :data:`UPPER_LOBE_FRACTION` of that lung's craniocaudal (slice) extent.  An
    approximation: the fissures are not segmented (the oblique fissure is far from
    horizontal, the right middle lobe is ignored), so nodules near mid-height can be
    misassigned.  Unknown (``upper_lobe`` None) when the lung touches the first or last
    slice (the scan does not hold the whole lung) or no lung was found.

    Args:
        lung_labels: (z, y, x) uint8, 0 outside, 1/2 the lungs
            (:class:`NoduleMTLLib.detection.preprocess.LungMask` ``labels``).
        centroid_zyx: nodule centroid, voxel index (z, y, x).
        superior_is_low_k: True when slice index k grows towards the feet.

    Returns:
        ``{"upper_lobe": bool | None, "fraction_from_apex": float | None, "how": str}``.
    """
    how = (f"approximate: centroid in the upper {UPPER_LOBE_FRACTION:.0%} of its lung's craniocaudal extent "
           "in the CT's lung mask (fissures not segmented)")
    lab = np.asarray(lung_labels)
    if not lab.any():
        return {"upper_lobe": None, "fraction_from_apex": None, "how": "no lung found in the CT"}
    c = tuple(int(round(min(max(v, 0), s - 1))) for v, s in zip(centroid_zyx, lab.shape))
    side = int(lab[c])
    if side == 0:
        side = nearest_label(lab, c)
    ks = np.flatnonzero((lab == side).any(axis=(1, 2)))
    if ks[0] == 0 or ks[-1] == lab.shape[0] - 1:
        return {"upper_lobe": None, "fraction_from_apex": None,
                "how": "the lung reaches the first or last slice: the scan does not hold the whole lung"}
    k0, k1 = (ks[0], ks[-1]) if superior_is_low_k else (ks[-1], ks[0])
    frac = float((c[0] - k0) / (k1 - k0)) if k1 != k0 else 0.0
    return {"upper_lobe": bool(frac < UPPER_LOBE_FRACTION), "fraction_from_apex": round(frac, 3), "how": how}


def assess_nodule(nodule, patient: PatientInfo, nodule_count: int, location: dict | None,
                  count_note: str | None = None) -> dict | None:
    """``brock`` record of one analysed nodule (:class:`NoduleMTLLib.core.results.NoduleResult`).

    Returns None for a nodule that was not found; else ``{"model", "probability" (None when
    age or sex is missing), "complete", "lower_bound", "inputs", "sources", "assumed",
    "missing", "notes"}``.  See the module docstring for the input policy.
    """
    if not nodule.found or nodule.diameter_mm is None:
        return None
    inputs, sources, assumed, missing, notes = {}, {}, [], [], []
    inputs["size_mm"] = round(float(nodule.diameter_mm), 1)
    sources["size_mm"] = "mask: longest axial diameter"
    inputs["type"] = nodule.type
    sources["type"] = "mask: HU composition (fraction of voxels >= -300 HU)"
    spic_p, spic_net = None, None
    for nid, out in (nodule.networks or {}).items():
        p = (out.sign_probabilities or {}).get("spiculation")
        if p is not None and (spic_p is None or p > spic_p):
            spic_p, spic_net = float(p), nid
    if spic_p is None:
        inputs["spiculation"] = False
        assumed.append("spiculation")
        sources["spiculation"] = "assumed no: no network with a spiculation head was run (add dsmtnet)"
    else:
        inputs["spiculation"] = spic_p >= SPICULATION_PROBABILITY
        sources["spiculation"] = f"{spic_net} spiculation probability {spic_p:.2f} (>= {SPICULATION_PROBABILITY} = yes)"
    loc = location or {"upper_lobe": None, "how": "not computed"}
    if loc.get("upper_lobe") is None:
        inputs["upper_lobe"] = False
        assumed.append("upper_lobe")
        sources["upper_lobe"] = f"assumed no: {loc.get('how')}"
    else:
        inputs["upper_lobe"] = bool(loc["upper_lobe"])
        sources["upper_lobe"] = loc["how"]
    inputs["nodule_count"] = int(nodule_count)
    sources["nodule_count"] = count_note or "found nodules of this run"
    inputs["age"] = patient.age
    inputs["female"] = None if patient.sex is None else patient.sex == "F"
    for name, key in (("age", "age"), ("female", "sex")):
        if inputs[name] is None:
            missing.append(key)
        else:
            sources[name] = patient.sources.get(key, "option")
    for name in ("family_history", "emphysema"):
        v = getattr(patient, name)
        if v is None:
            inputs[name] = False
            assumed.append(name)
            sources[name] = "assumed no: not given (--family-history / --emphysema)"
        else:
            inputs[name] = bool(v)
            sources[name] = patient.sources.get(name, "option")
    if nodule.diameter_mm > 30:
        notes.append("longer than 30 mm (a mass): the model was fitted on screen-detected nodules")
    prob = None
    if not missing:
        try:
            prob = round(probability(inputs["age"], inputs["female"], inputs["family_history"], inputs["emphysema"],
                                     float(nodule.diameter_mm), nodule.type, inputs["upper_lobe"], inputs["nodule_count"],
                                     inputs["spiculation"]), 4)
        except ValueError as e:  # e.g. no type estimate, zero size: no number rather than a made-up one
            missing.append("valid nodule inputs")
            notes.append(f"no probability: {e}")
    else:
        notes.append("no probability: " + " and ".join(missing) + " unknown (give --age / --sex)")
    return {"model": MODEL, "probability": prob, "complete": not missing and not assumed,
            "lower_bound": bool(prob is not None and assumed), "inputs": inputs, "sources": sources,
            "assumed": assumed, "missing": missing, "notes": notes}
