"""Measured clinical rules of issue 22 (NoduleMTLLib.clinical.lung_rads + Resources/Weights/clinical.json):
the two-stage nodule-type classifier, the benign-calcification rule and its reason, the note for a
solid component too small to measure, the per-network mask threshold, the Lung-RADS agreement
summary of ``nodulemtl-train evaluate lung-rads`` and the calibrator choice that keeps identity
unless another calibrator wins with its interval clear."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.clinical import lung_rads as lr
from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.core.results import NoduleResult


def _stack(feature, coef, intercept=0.0):
    return {"features": [feature], "mean": [0.0], "scale": [1.0], "coef": [coef], "intercept": intercept}


MODEL = {"networks": ["dsmtnet"], "subsolid": _stack("logit_subsolid", 1.0), "subsolid_threshold": 0.5,
         "ground_glass": _stack("frac_ge_-300", -10.0, 3.0), "ground_glass_threshold": 0.5}


def test_classify_type_two_stages_and_probabilities():
    solid = lr.classify_type({"logit_subsolid": -3.0, "frac_ge_-300": 0.9}, MODEL)
    assert solid["type"] == "solid" and solid["probability"] == pytest.approx(1 - 1 / (1 + np.exp(3.0)), abs=1e-4)
    ggo = lr.classify_type({"logit_subsolid": 3.0, "frac_ge_-300": 0.05}, MODEL)
    partsolid = lr.classify_type({"logit_subsolid": 3.0, "frac_ge_-300": 0.6}, MODEL)
    assert ggo["type"] == "ground-glass" and partsolid["type"] == "part-solid"
    for r in (solid, ggo, partsolid):
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert r["probability"] == max(r["probabilities"].values()) or r["type"] == "solid"
    assert lr.classify_type({"frac_ge_-300": 0.6}, MODEL) is None  # no subsolid head: the model cannot run
    # the HU rule is the fallback, and says so
    assert lr.nodule_type_of({"frac_ge_-300": 0.9}, None)["method"].startswith("HU rule")


def test_benign_calcification_rule_gives_its_reason():
    rule = {"calcification": {"rule": "or", "head_min": 0.5, "hu200_fraction_min": 0.1}}
    ok, why = lr.benign_calcification({"frac_ge_200": 0.02, "mean_hu": 40.0}, 0.9, rule)
    assert ok and "calcification probability 0.90" in why
    ok, why = lr.benign_calcification({"frac_ge_200": 0.3, "mean_hu": 150.0}, None, rule)
    assert ok and "30 % of voxels >= 200 HU" in why
    assert lr.benign_calcification({"frac_ge_200": 0.02, "mean_hu": 40.0}, 0.1, rule) == (False, None)
    # a head-only rule without the head: the complete-calcification HU rule decides
    head_only = {"calcification": {"rule": "head", "head_min": 0.5, "hu200_fraction_min": None}}
    assert lr.benign_calcification({"frac_ge_200": 0.9, "mean_hu": 500.0}, None, head_only)[0]
    assert not lr.benign_calcification({"frac_ge_200": 0.2, "mean_hu": 50.0}, None, head_only)[0]


def _ct(hu):
    img = sitk.GetImageFromArray(np.asarray(hu, np.int16))
    img.SetSpacing((1.0, 1.0, 1.0))
    return CTVolume(img)


def _ball(shape, centre, radius):
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def test_part_solid_nodule_with_a_solid_speck_gets_a_note():
    from NoduleMTLLib.core.postprocess import measure_nodule

    shape = (30, 50, 50)
    hu = np.full(shape, -850, np.int16)
    ball = _ball(shape, (15, 25, 25), 7)
    hu[ball] = -600
    hu[15, 25, 25] = 30  # one solid voxel: no measurable solid component
    ct = _ct(hu)
    m = measure_nodule(ball, ct)
    nd = NoduleResult(id=1, point_lps_mm=(0, 0, 0), found=True, mask=ball, diameter_mm=m["diameter_mm"],
                      short_axis_mm=m["short_axis_mm"], volume_mm3=m["volume_mm3"], type="part-solid")
    rec = lr.assess_nodule(nd, ct, {"type": "part-solid", "probability": 0.7, "probabilities": None, "method": "test"})
    assert rec["type"] == "part-solid" and rec["type_probability"] == 0.7
    assert rec["solid_component"]["long_axis_mm"] < 2.0 and rec["category"] == "3"  # one pixel: its diagonal
    assert any("too small to measure" in n for n in rec["notes"])


def test_shipped_rules_load_and_set_the_default_networks_mask_threshold():
    from NoduleMTLLib.inference.pipeline import THRESHOLD, Click2DNetwork

    d = lr.load_clinical()
    assert d is not None and d["format"] == 1
    t = d["mask_threshold"]["dsmtnet"]
    assert 0.0 < t <= 0.5
    assert Click2DNetwork("dsmtnet", None, "cpu").threshold == t
    assert Click2DNetwork("lnmsnet", None, "cpu").threshold == d["mask_threshold"].get("lnmsnet", THRESHOLD)
    for key in ("nodule_type", "nodule_type_hu_only"):
        assert {"subsolid", "ground_glass", "subsolid_threshold", "ground_glass_threshold"} <= set(d[key])
    assert d["calcification"]["rule"] in ("head", "hu", "and", "or")


def test_bad_clinical_file_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "clinical.json"
    p.write_text(json.dumps({"format": 7}))
    with pytest.raises(ValueError, match="format 7, expected 1"):
        lr.load_clinical(p)
    monkeypatch.setenv("NODULEMTL_CLINICAL", str(p))
    assert lr.mask_threshold("dsmtnet", 0.5) == 0.5  # unreadable rules: the network default, not a crash


def test_lung_rads_agreement_summary():
    from training.lung_rads_eval import summarize

    def rec(ref, pred, texture=5, calc=6):
        return {"reference": {"category": ref, "long_axis_mm": 10.0}, "texture": texture, "calcification_rating": calc,
                "label": -1, "probability": None, "raw_probability": None, "dice": 0.8,
                "predicted": {"category": pred, "type": "solid", "long_axis_mm": 9.0}}

    s = summarize([rec("4A", "4A"), rec("4A", "3"), rec("2", "3"), rec("1", "1", calc=3), rec("3", "1")])
    assert s["exact"] == pytest.approx(0.4) and s["n_under"] == 2 and s["n_over"] == 1
    assert s["confusion_reference_rows"]["4A"]["3"] == 1 and s["benign_calcification_called_1"] == 1
    assert s["false_category_1"] == 1 and s["long_axis_ratio_median"] == pytest.approx(0.9)


def test_calibrator_choice_keeps_identity_unless_clearly_better():
    from training.calibration_select import choose

    res = {"identity": {"oof_log_loss": 0.5}, "temperature": {"oof_log_loss": 0.48, "ci95": (-0.05, 0.01)},
           "platt": {"oof_log_loss": 0.49, "ci95": (-0.03, 0.002)}}
    assert choose(res) == "identity"
    res["platt"]["ci95"] = (-0.03, -0.001)
    assert choose(res) == "platt"


@pytest.mark.slow
def test_click_on_a_calcified_granuloma_gives_category_1_with_its_reason(shared_data):
    """Real CT: LIDC-IDRI-0437 nodule 3 (a test-split patient), the first test-split VOI in
    labels.csv rated "solid" calcification (3) whose readers' mask has >= 50 % of its voxels >= 200 HU;
    the default click path + the measured rules give Lung-RADS 1 and say why."""
    import csv

    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.inference.pipeline import analyze_points

    d = shared_data / "lidc_vois"
    row = next(r for r in csv.DictReader(open(d / "labels.csv"))
               if r["patient_id"] == "LIDC-IDRI-0437" and r["nodule_id"] == "3")
    assert row["Calcification_value"] == "3"
    ct = CTVolume(sitk.ReadImage(str(d / row["image"])))
    n = analyze_points(ct, [(float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))],
                       network_ids=DEFAULT_NETWORKS, device="cpu").nodules[0]
    assert n.found
    rec = lr.assess_nodule(n, ct, lr.classify_nodule(n, ct))
    assert rec["category"] == "1" and rec["calcification"]["benign"]
    assert rec["notes"][0].startswith("category 1: benign calcification") and "HU" in rec["notes"][0]
