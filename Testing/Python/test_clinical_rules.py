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
    assert d["calcification"]["rule"] in ("head", "hu", "and", "or", "hu_central")


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


# --- size correction (issue 22 item 2, second round) ---------------------------------------------------

def test_measure_nodule_applies_a_size_correction_to_the_axes_only():
    from NoduleMTLLib.core.postprocess import axial_diameters, measure_again, measure_nodule

    shape = (20, 40, 40)
    ball = _ball(shape, (10, 20, 20), 6)
    ct = _ct(np.where(ball, 20, -850))
    raw = measure_nodule(ball, ct)
    assert raw["size_correction"] is None and (raw["diameter_mm"], raw["short_axis_mm"]) == pytest.approx(axial_diameters(ball, ct))
    corr = {"long_axis_factor": 1.05, "short_axis_factor": 1.01, "network": "dsmtnet", "fitted_on": "test"}
    m = measure_nodule(ball, ct, corr)
    assert m["diameter_mm"] == pytest.approx(1.05 * raw["diameter_mm"]) and m["short_axis_mm"] == pytest.approx(1.01 * raw["short_axis_mm"])
    assert m["volume_mm3"] == raw["volume_mm3"] and m["mean_hu"] == raw["mean_hu"]  # the mask is not changed
    sc = m["size_correction"]
    assert sc["measured_long_axis_mm"] == pytest.approx(raw["diameter_mm"], abs=0.005) and sc["network"] == "dsmtnet"
    # read back: the same mask keeps its correction, an edited one is measured as drawn
    assert measure_again(ball, ct, sc)["diameter_mm"] == pytest.approx(m["diameter_mm"], abs=0.01)
    edited = ball & _ball(shape, (10, 20, 20), 4)
    assert measure_again(edited, ct, sc)["size_correction"] is None
    with pytest.raises(ValueError, match="finite and > 0"):
        measure_nodule(ball, ct, {"long_axis_factor": 0.0, "short_axis_factor": 1.0})


def test_shipped_size_correction_is_the_measured_median_bias():
    d = lr.load_clinical()["size_correction"]["dsmtnet"]
    tv = d["train_val_measured"]
    assert d["long_axis_factor"] == pytest.approx(1 / tv["long_axis_ratio_median"], abs=1e-3)
    assert d["short_axis_factor"] == pytest.approx(1 / tv["short_axis_ratio_median"], abs=1e-3)
    assert 1.0 < d["long_axis_factor"] < 1.15 and d["train_val_corrected"]["long_axis_ratio_median"] == pytest.approx(1.0, abs=0.01)
    assert d["mask_threshold"] == lr.load_clinical()["mask_threshold"]["dsmtnet"]
    assert lr.size_correction("dsmtnet")["long_axis_factor"] == d["long_axis_factor"]
    assert lr.size_correction("lnmsnet") is None  # no correction measured: axes as measured


def _voi(shared_data, patient, nodule):
    import csv

    d = shared_data / "lidc_vois"
    row = next(r for r in csv.DictReader(open(d / "labels.csv")) if r["patient_id"] == patient and r["nodule_id"] == nodule)
    ct = CTVolume(sitk.ReadImage(str(d / row["image"])))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / row["mask"]))) > 0
    return row, ct, ref, (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))


def test_click_path_reports_the_size_corrected_axes(shared_data):
    """Real CT: LIDC-IDRI-0375 nodule 1 (a validation patient).  The default click path reports
    DSMT-Net's mask axes times the shipped factors, says so in the record (and nodules.json), and
    the Lung-RADS size uses them; the consensus mask (no correction measured) is reported as measured."""
    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.core.postprocess import axial_diameters
    from NoduleMTLLib.inference.pipeline import analyze_points

    _row, ct, _ref, c = _voi(shared_data, "LIDC-IDRI-0375", "1")
    n = analyze_points(ct, [c], network_ids=DEFAULT_NETWORKS, device="cpu").nodules[0]
    assert n.found and DEFAULT_NETWORKS[0] == "dsmtnet"
    f = lr.size_correction("dsmtnet")
    la, sa = axial_diameters(n.mask, ct)
    assert n.diameter_mm == pytest.approx(la * f["long_axis_factor"]) and n.short_axis_mm == pytest.approx(sa * f["short_axis_factor"])
    assert n.size_correction["measured_long_axis_mm"] == pytest.approx(la, abs=0.005)
    assert n.to_dict()["size_correction"]["long_axis_factor"] == f["long_axis_factor"]
    rec = lr.assess_nodule(n, ct, lr.classify_nodule(n, ct))
    assert rec["long_axis_mm"] == lr.round1(n.diameter_mm)
    assert rec["size_mm"] == lr.mean_diameter_mm(n.diameter_mm, n.short_axis_mm)
    both = analyze_points(ct, [c], network_ids=["dsmtnet", "lnmsnet"], device="cpu", mask="consensus").nodules[0]
    assert both.size_correction is None
    assert both.diameter_mm == pytest.approx(axial_diameters(both.mask, ct)[0])



def test_lung_rads_reads_the_mask_box_with_the_full_grid_answer(shared_data, monkeypatch):
    """Real CT, the readers' masks of LIDC-IDRI-0375 nodule 2 (validation patient, solid, spiculated) and
    LIDC-IDRI-0281 nodule 1 (training patient, calcified): classify_nodule / assess_nodule read
    ``NoduleResult.mask_box`` (issue 24 item 2: no full-grid array is built) and give exactly the
    measurements, type and category that the full-grid mask gives."""
    from types import SimpleNamespace

    from NoduleMTLLib.core.postprocess import measure_nodule

    categories = {}
    for patient, nodule in (("LIDC-IDRI-0375", "2"), ("LIDC-IDRI-0281", "1")):
        _row, ct, ref, c = _voi(shared_data, patient, nodule)
        m = measure_nodule(ref, ct)
        fields = {"diameter_mm": m["diameter_mm"], "short_axis_mm": m["short_axis_mm"], "type": m["type"]}
        full = SimpleNamespace(found=True, mask=ref, networks={}, **fields)  # no mask_box: the full-grid path
        want_meas = lr.mask_measurements(ref, ct)
        want = lr.assess_nodule(full, ct, lr.classify_nodule(full, ct))
        n = NoduleResult(id=1, point_lps_mm=c, found=True, mask=ref, **fields)
        assert lr.mask_measurements(n.mask_box, ct) == want_meas
        monkeypatch.setattr(NoduleResult, "mask", property(lambda self: pytest.fail("full-grid mask built")))
        typ = lr.classify_nodule(n, ct)
        got = lr.assess_nodule(n, ct, typ)
        monkeypatch.undo()
        assert typ["measurements"] == want_meas and got == want
        categories[patient] = got["category"]
    # 0375/2 (rated solid, 12.0 mm on the readers' mask, no DSMT-Net head: the HU-only model): the second
    # round's model called it ground-glass (category 2); the third round's calls it part-solid with a
    # 6.0 mm solid component, 4A, the category its solid rating gives
    assert categories == {"LIDC-IDRI-0375": "4A", "LIDC-IDRI-0281": "1"}, categories


# --- pattern-aware benign calcification (issue 22 item 3, second round) --------------------------------

def test_calcification_pattern_central_versus_eccentric():
    shape = (20, 40, 40)
    ball = _ball(shape, (10, 20, 20), 7)
    hu = np.where(ball, 30, -850)
    central = hu.copy()
    central[_ball(shape, (10, 20, 20), 3)] = 600
    ecc = hu.copy()
    ecc[_ball(shape, (10, 20, 26), 2) & ball] = 600
    pc = lr.calcification_pattern(ball, _ct(central))
    pe = lr.calcification_pattern(ball, _ct(ecc))
    assert pc["calc_central_fraction"] > 0.9 and pc["calc_offset"] < 0.1
    assert pe["calc_central_fraction"] < 0.1 and pe["calc_offset"] > 0.5
    assert lr.calcification_pattern(ball, _ct(hu)) == {"calc_central_fraction": 0.0, "central_calcified_fraction": 0.0,
                                                       "calc_mean_depth": 0.0, "calc_offset": 1.0}
    rule = {"calcification": {"rule": "hu_central", "head_min": None, "hu200_fraction_min": 0.01, "central_fraction_min": 0.3}}
    ok, why = lr.benign_calcification(lr.mask_measurements(ball, _ct(central)), None, rule)
    assert ok and "central part" in why
    assert lr.benign_calcification(lr.mask_measurements(ball, _ct(ecc)), None, rule) == (False, None)
    # a completely calcified nodule: few of its calcified voxels lie in the core, but it is diffuse
    full = lr.mask_measurements(ball, _ct(np.where(ball, 600, -850)))
    assert full["calc_central_fraction"] < 0.3
    ok, why = lr.benign_calcification(full, None, rule)
    assert ok and "diffuse" in why


def test_shipped_calcification_rule_uses_the_pattern_and_keeps_sensitivity():
    c = lr.load_clinical()["calcification"]
    assert c["rule"] == "hu_central" and 0 < c["central_fraction_min"] < 1
    assert c["train_val"]["sensitivity"] >= c["train_val_previous_rule"]["sensitivity"]
    assert c["train_val"]["false_benign"] < c["train_val_previous_rule"]["false_benign"]


def test_eccentric_calcification_on_real_ct_is_not_called_benign(shared_data):
    """Real CT, training patients, the default click path + the shipped rules:
    LIDC-IDRI-0181 nodule 8 (calcification rated absent; 16 % of the mask's voxels >= 200 HU, almost
    all at its edge: the previous rule, >= 10 % of voxels, called it benign -> category 1) is not
    benign and gets the note; LIDC-IDRI-0281 nodule 1 (rated solid calcification) stays category 1."""
    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.inference.pipeline import analyze_points

    recs = {}
    for patient, nodule in (("LIDC-IDRI-0181", "8"), ("LIDC-IDRI-0281", "1")):
        _row, ct, _ref, c = _voi(shared_data, patient, nodule)
        n = analyze_points(ct, [c], network_ids=DEFAULT_NETWORKS, device="cpu").nodules[0]
        assert n.found
        recs[patient] = lr.assess_nodule(n, ct, lr.classify_nodule(n, ct))
    ecc, solid = recs["LIDC-IDRI-0181"], recs["LIDC-IDRI-0281"]
    assert ecc["calcification"]["calcified_fraction"] >= 0.1  # the previous rule's call
    assert not ecc["calcification"]["benign"] and ecc["category"] != "1"
    assert any("eccentric calcification is not benign" in x and "central part" in x for x in ecc["notes"])
    assert solid["category"] == "1" and "central part" in solid["calcification"]["reason"]


def test_shipped_type_classifier_chosen_by_grouped_cv():
    t = lr.load_clinical()["nodule_type"]
    cv = t["cv"]
    assert cv["cv_recall"] >= 0.75 and cv["cv_solid_called_solid"] >= 0.9 and cv["n_subsolid"] >= 90
    assert "patient-grouped CV" in t["fitted_on"] and "validation_in_sample" in t


def test_type_features_log_volume():
    f = lr.type_features({"volume_mm3": 268.0, "mean_diameter_mm": 8.0, "solid_mean_diameter_mm": 4.0})
    assert f["log_volume_mm3"] == pytest.approx(np.log(268.0)) and f["solid_ratio"] == pytest.approx(0.5)
    assert lr.type_features({"volume_mm3": 0.0})["log_volume_mm3"] == pytest.approx(np.log(lr.LOG_VOLUME_FLOOR_MM3))
    assert "log_volume_mm3" not in lr.type_features({"mean_hu": -500.0})  # no volume: the feature is missing
    # a model that needs it cannot run without it (None), rather than guessing
    model = {**MODEL, "subsolid": _stack("log_volume_mm3", 1.0)}
    assert lr.classify_type({"logit_subsolid": 0.0, "frac_ge_-300": 0.5}, model) is None


def test_shipped_type_classifier_third_round_beats_the_second_out_of_fold():
    """Issue 22, third round: stage 1 with the mask's log volume, stage 2 class-weighted, chosen by
    patient-grouped CV on training + validation; its out-of-fold types and Lung-RADS categories (both
    stages refitted per fold) against the second round's choice on the same folds."""
    t = lr.load_clinical()["nodule_type"]
    assert "log_volume_mm3" in t["subsolid"]["features"] and "logit_subsolid" in t["subsolid"]["features"]
    assert t["stage2_cv"]["class_weight"] == "balanced" and t["stage2_cv"]["cv_part_solid_right"] >= 0.7
    new, old = t["lung_rads_cv"], t["lung_rads_cv_second_round"]
    assert new["n"] == old["n"] >= 700 and new["specificity_target"] == old["specificity_target"] == 0.93
    assert new["solid_called_solid"] >= 0.92 and new["subsolid_recall"] > old["subsolid_recall"]
    assert new["part_solid_recall"] > old["part_solid_recall"] and new["split_right"] >= 0.7
    assert new["under_calls"] < old["under_calls"] and new["lung_rads_exact"] >= old["lung_rads_exact"]
    hu = lr.load_clinical()["nodule_type_hu_only"]
    assert "logit_subsolid" not in hu["subsolid"]["features"] + hu["ground_glass"]["features"]


def test_large_part_solid_nodule_on_real_ct_is_called_part_solid(shared_data):
    """Real CT, a training patient (in the fit: a check that the shipped model and the click path agree,
    not a held-out figure): LIDC-IDRI-0194 nodule 1, rated part-solid (texture 3), ~30 mm, which the
    second round's classifier called solid (category by its whole size).  The default click path and
    the shipped classifier call it part-solid, and its category comes from its solid component."""
    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.inference.pipeline import analyze_points

    row, ct, _ref, c = _voi(shared_data, "LIDC-IDRI-0194", "1")
    assert float(row["Texture_value"]) == 3
    n = analyze_points(ct, [c], network_ids=DEFAULT_NETWORKS, device="cpu").nodules[0]
    assert n.found
    typ = lr.classify_nodule(n, ct)
    assert typ["type"] == "part-solid" and typ["method"].startswith("measured classifier (DSMT-Net")
    assert typ["measurements"]["volume_mm3"] > 1000
    rec = lr.assess_nodule(n, ct, typ)
    assert rec["type"] == "part-solid" and rec["rule"].startswith(rec["category"] + ": part-solid")
    assert rec["solid_component_mm"] == rec["solid_component"]["mean_diameter_mm"] > 0


def test_out_of_fold_size_correction_leaves_each_patients_own_nodules_out():
    """training.clinical.oof_size_correction (issue 22 size trade-off): with 5 patients in 5 folds each
    nodule's factor is 1 / the median ratio of the *other* four patients, so a patient far from the rest
    is not corrected towards itself, and the out-of-fold share within 15 % is below the in-sample one."""
    from training.clinical import corrected_size_figures, fit_size_correction, oof_size_correction

    ratios = {"A": 0.8, "B": 0.9, "C": 1.0, "D": 1.1, "E": 2.0}
    recs = [{"patient_id": p, "split": "train", "found": True,
             "ref": {"n_voxels": 50, "long_axis_mm": 10.0, "short_axis_mm": 8.0, "mean_diameter_mm": 9.0},
             "pred": {"long_axis_mm": 10.0 * q, "short_axis_mm": 8.0}} for p, q in ratios.items()]
    fl, fs = oof_size_correction(recs, k=5, seed=3)
    others = {p: np.median([q for o, q in ratios.items() if o != p]) for p in ratios}
    np.testing.assert_allclose(fl, [1 / others[p] for p in ratios])
    np.testing.assert_allclose(fs, 1.0)
    oof = corrected_size_figures(recs, (fl, fs))
    ins = corrected_size_figures(recs, fit_size_correction(recs))  # factor 1 / 1.0
    assert oof["n"] == ins["n"] == 5
    assert oof["long_axis_within_15pct"] == pytest.approx(0.4) and ins["long_axis_within_15pct"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        corrected_size_figures(recs, (fl[:4], fs[:4]))


def test_size_tradeoff_drops_test_rows_and_pairs_the_dice():
    """training.clinical.size_tradeoff on two synthetic tables: test-split rows never enter; the
    validation Dice difference is paired per nodule; a constant bias is corrected out of fold; the
    shipped rules it uses are clinical.json's."""
    from training.clinical import TYPE_FEATURE_SETS, shipped_rules, size_tradeoff, tradeoff_markdown

    def rows(q, dice):
        out = [{"patient_id": f"P{i}", "nodule_id": "1", "split": "train" if i < 5 else "val", "found": True,
                "dice": dice + 0.01 * i, "ref": {"n_voxels": 50, "long_axis_mm": 10.0, "short_axis_mm": 8.0,
                                                  "mean_diameter_mm": 9.0},
                "pred": {"long_axis_mm": 10.0 * q, "short_axis_mm": 8.0 * q, "mean_diameter_mm": 9.0 * q}}
               for i in range(10)]
        return out + [{**out[0], "patient_id": "T0", "split": "test", "dice": 0.0}]

    rep = size_tradeoff({0.5: rows(0.8, 0.80), 0.3: rows(0.9, 0.78)}, thresholds=(0.5, 0.3), repeats=2, n_boot=50,
                        lung_rads=False)
    lo, hi = rep["by_threshold"]["0.50"], rep["by_threshold"]["0.30"]
    assert lo["n"] == hi["n"] == 10 and lo["n_val"] == 5
    assert lo["val_dice_median"] == pytest.approx(0.87) and hi["val_dice_median_minus_first"] == pytest.approx(-0.02)
    assert hi["in_sample_correction"]["long_axis_factor"] == pytest.approx(1 / 0.9)
    assert lo["oof_corrected"]["long_axis_ratio_median"] == pytest.approx(1.0)
    assert lo["oof_corrected"]["long_axis_within_15pct"] == 1.0 and lo["measured"]["long_axis_within_15pct"] == 0.0
    assert "lung_rads_oof" not in lo and "| 0.30 | 0.850 (-0.020" in tradeoff_markdown(rep)
    s1, s2, calc = shipped_rules()
    t = lr.load_clinical()
    assert TYPE_FEATURE_SETS[s1[0]] == list(t["nodule_type"]["subsolid"]["features"])
    assert calc["rule"] == t["calcification"]["rule"]
