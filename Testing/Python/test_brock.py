"""Brock (PanCan) full model with spiculation (NoduleMTLLib.clinical.brock).

Checked against figures published with the model rather than against our own formula:
the odds ratios of McWilliams et al. 2013, Table 3 (full model with spiculation) are the
exponentials of the coefficients, and the model's reference nodule (62-year-old man, no
family history, no emphysema, 4 mm solid, not upper lobe, 4 nodules, not spiculated) has the
intercept as its logit.  Worked examples below are written out term by term from the
published equation (an independent, hand-expanded evaluation, not a call of the module).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from NoduleMTLLib.clinical import brock
from NoduleMTLLib.core.results import NetworkOutput, NoduleResult

# McWilliams et al. 2013, Table 3, full model with spiculation: odds ratios (2 decimals)
PUBLISHED_ODDS_RATIOS = {
    "age": 1.03, "female": 1.82, "family_history": 1.34, "emphysema": 1.34, "part-solid": 1.46,
    "ground-glass": 0.88, "upper_lobe": 1.93, "nodule_count": 0.92, "spiculation": 2.17,
}


@pytest.mark.parametrize("name,odds_ratio", sorted(PUBLISHED_ODDS_RATIOS.items()))
def test_coefficients_match_published_odds_ratios(name, odds_ratio):
    assert round(math.exp(brock.COEFFICIENTS[name]), 2) == odds_ratio


def test_reference_nodule_gives_the_intercept():
    p = brock.probability(62, False, False, False, 4.0, "solid", False, 4, False)
    assert p == pytest.approx(1 / (1 + math.exp(6.7892)), rel=1e-6)  # 0.11 %
    assert p == pytest.approx(0.00112, abs=1e-5)


def _hand(age, female, fh, emph, size, part, non, upper, count, spic):
    logit = (-6.7892 + 0.0287 * (age - 62) + 0.6011 * female + 0.2961 * fh + 0.2953 * emph
             - 5.3854 * ((size / 10) ** -0.5 - 1.58113883) + 0.377 * part - 0.1276 * non + 0.6581 * upper
             - 0.0824 * (count - 4) + 0.7729 * spic)
    return 1 / (1 + math.exp(-logit))


WORKED = [
    # (age, female, fh, emphysema, size, type, upper, count, spiculated), expected probability (4 decimals)
    ((65, True, False, True, 12.0, "part-solid", True, 1, False), None),
    ((72, False, True, True, 18.0, "solid", True, 1, True), None),
    ((45, True, False, False, 8.0, "solid", False, 1, False), None),
    ((60, False, False, False, 25.0, "ground-glass", False, 2, False), None),
]


@pytest.mark.parametrize("args,_", WORKED)
def test_worked_examples(args, _):
    age, female, fh, emph, size, t, upper, count, spic = args
    want = _hand(age, female, fh, emph, size, t == "part-solid", t == "ground-glass", upper, count, spic)
    assert brock.probability(*args) == pytest.approx(want, rel=1e-9)


def test_worked_example_figures():
    # 72-year-old man, family history, emphysema, 18 mm spiculated upper-lobe solid nodule, alone
    p = brock.probability(72, False, True, True, 18.0, "solid", True, 1, True)
    # by hand: -6.7892 + 0.287 + 0.2961 + 0.2953 + 4.5010 (size) + 0.6581 + 0.2472 + 0.7729 = 0.2684 -> 56.7 %
    assert p == pytest.approx(0.5667, abs=5e-4)
    # 45-year-old woman, 8 mm solid lower-lobe nodule, nothing else: a few percent
    # by hand: -6.7892 - 0.4879 + 0.6011 + 2.4940 (size) + 0.2472 = -3.9348 -> 1.9 %
    assert brock.probability(45, True, False, False, 8.0, "solid", False, 1, False) == pytest.approx(0.0192, abs=5e-4)


def test_monotone_in_size_and_bounded():
    ps = [brock.probability(62, False, False, False, s, "solid", False, 1, False) for s in (2, 4, 6, 10, 20, 40, 80)]
    assert all(a < b for a, b in zip(ps, ps[1:])) and 0 < ps[0] and ps[-1] < 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(size_mm=0.0), "size"), (dict(age=None), "age"), (dict(nodule_count=0), "count"), (dict(nodule_type="x"), "type")])
def test_bad_inputs(kwargs, match):
    base = dict(age=62, female=False, family_history=False, emphysema=False, size_mm=10.0, nodule_type="solid",
                upper_lobe=False, nodule_count=1, spiculation=False)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        brock.probability(**base)


def test_parse_age_and_sex():
    assert brock.parse_age("065Y") == 65 and brock.parse_age("018M") == 1.5 and brock.parse_age("") is None
    assert brock.parse_age("abc") is None and brock.parse_age(70) == 70
    assert brock.parse_sex("F") == "F" and brock.parse_sex("male") == "M" and brock.parse_sex("O") is None


def _nodule(**kw):
    d = dict(id=1, point_lps_mm=(0, 0, 0), found=True, mask=np.ones((1, 1, 1), bool), diameter_mm=12.0, short_axis_mm=9.0,
             volume_mm3=500.0, mean_hu=20.0, solid_fraction=0.9, type="solid")
    d.update(kw)
    return NoduleResult(**d)


def test_missing_age_or_sex_gives_no_number():
    rec = brock.assess_nodule(_nodule(), brock.PatientInfo(age=70), 1, {"upper_lobe": True, "how": "test"})
    assert rec["probability"] is None and rec["missing"] == ["sex"] and rec["complete"] is False
    rec = brock.assess_nodule(_nodule(), brock.PatientInfo(), 1, None)
    assert rec["probability"] is None and set(rec["missing"]) == {"age", "sex"}


def test_assumed_inputs_are_listed_and_give_a_lower_bound():
    pat = brock.merge_patient(None, age="70", sex="M")
    rec = brock.assess_nodule(_nodule(), pat, 1, {"upper_lobe": None, "how": "lung cut"})
    assert set(rec["assumed"]) == {"spiculation", "upper_lobe", "family_history", "emphysema"}
    assert rec["lower_bound"] is True and rec["complete"] is False
    assert rec["probability"] == round(brock.probability(70, False, False, False, 12.0, "solid", False, 1, False), 4)
    # everything known: complete, spiculation from the DSMT-Net head
    pat = brock.merge_patient(None, age=70, sex="F", family_history=True, emphysema=False)
    nd = _nodule(networks={"dsmtnet": NetworkOutput("dsmtnet", 0.8, {"spiculation": 0.7})})
    rec = brock.assess_nodule(nd, pat, 2, {"upper_lobe": True, "how": "test"})
    assert rec["complete"] is True and rec["assumed"] == [] and rec["inputs"]["spiculation"] is True
    assert rec["probability"] == round(brock.probability(70, True, True, False, 12.0, "solid", True, 2, True), 4)
    assert rec["sources"]["age"] == "option"


def test_options_override_dicom_and_bad_options_raise():
    dicom = brock.PatientInfo(age=53.0, sex="F", sources={"age": "dicom", "sex": "dicom"})
    p = brock.merge_patient(dicom, age=60)
    assert p.age == 60 and p.sources == {"age": "option", "sex": "dicom"} and p.sex == "F"
    with pytest.raises(ValueError):
        brock.merge_patient(None, sex="X")
    with pytest.raises(ValueError):
        brock.merge_patient(None, age="old")


def test_upper_lobe_from_lung_mask():
    lab = np.zeros((20, 10, 10), np.uint8)
    lab[2:18, 2:8, 1:5] = 1
    lab[2:18, 2:8, 5:9] = 2
    # k grows towards the feet: slice 4 is near the apex
    assert brock.upper_lobe_from_lung_mask(lab, (4, 5, 3), True)["upper_lobe"] is True
    assert brock.upper_lobe_from_lung_mask(lab, (14, 5, 3), True)["upper_lobe"] is False
    assert brock.upper_lobe_from_lung_mask(lab, (14, 5, 3), False)["upper_lobe"] is True
    lab[0] = lab[2]  # lung reaches the first slice: unknown
    assert brock.upper_lobe_from_lung_mask(lab, (4, 5, 3), True)["upper_lobe"] is None


def test_nearest_label_equals_the_distance_transform_on_a_real_lung_mask(shared_data):
    """The bounded search gives the label the whole-grid distance transform gives, on the lung
    mask of a real whole CT (subsampled to keep the reference transform small), at points
    outside the lungs (mediastinum, chest wall, air)."""
    from scipy import ndimage as ndi

    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.detection.preprocess import lung_mask_from_ct

    ct = read_ct(shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003" / "ct.nrrd")
    lab = np.ascontiguousarray(np.asarray(lung_mask_from_ct(ct, work_pixel_mm=3.0).labels)[::2, ::4, ::4])
    assert lab.any() and (lab == 0).any()
    dist, ind = ndi.distance_transform_edt(lab == 0, return_indices=True)
    rng = np.random.default_rng(0)
    outside = np.argwhere(lab == 0)
    picks = outside[rng.choice(len(outside), 200, replace=False)]
    for c in map(tuple, picks):
        ref = lab[tuple(ind[a][c] for a in range(3))]
        got = brock.nearest_label(lab, c)
        if got != ref:  # a tie between the two lungs at exactly the same distance
            near = np.argwhere(lab == got)
            assert np.sqrt(((near - np.asarray(c)) ** 2).sum(1).min()) == pytest.approx(dist[c])
    with pytest.raises(ValueError):
        brock.nearest_label(np.zeros((3, 3, 3), np.uint8), (1, 1, 1))
