"""Calibrated malignancy probability: NoduleMTLLib.models.calibration (applying) and training.calibration (fitting)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from NoduleMTLLib.core.results import AnalysisResult, NetworkOutput, NoduleResult
from NoduleMTLLib.models.calibration import (
    CalibrationError,
    CalibrationSet,
    Calibrator,
    LinearStack,
    ProbabilityModel,
    apply_to_result,
    load_calibration,
    logit,
    nodule_features,
    sigmoid,
)


# --- calibrators ---------------------------------------------------------------------------
def test_calibrators_compute_their_formulas():
    p = np.array([0.1, 0.5, 0.8])
    assert np.allclose(Calibrator("identity")(p), p)
    assert np.allclose(Calibrator("temperature", {"temperature": 2.0})(p), sigmoid(logit(p) / 2))
    assert Calibrator("temperature", {"temperature": 2.0})(0.5) == pytest.approx(0.5)  # T keeps 0.5 fixed
    assert np.allclose(Calibrator("platt", {"a": 0.5, "b": -1.0})(p), sigmoid(0.5 * logit(p) - 1.0))
    iso = Calibrator("isotonic", {"x": [0.2, 0.6], "y": [0.1, 0.7]})
    assert np.allclose(iso([0.0, 0.2, 0.4, 0.6, 0.9]), [0.1, 0.1, 0.4, 0.7, 0.7])  # linear between, flat outside


@pytest.mark.parametrize("method, params", [("temperature", {"temperature": 0}), ("platt", {"a": 1}),
                                            ("isotonic", {"x": [0.5, 0.2], "y": [0.1, 0.2]}),
                                            ("isotonic", {"x": [0.2, 0.5], "y": [0.3, 0.1]}), ("magic", {})])
def test_invalid_calibrators_are_refused(method, params):
    with pytest.raises(CalibrationError):
        Calibrator(method, params)


def test_logit_is_clipped_and_inverts_sigmoid():
    assert np.isfinite(logit([0.0, 1.0])).all()
    assert np.allclose(sigmoid(logit([0.2, 0.7])), [0.2, 0.7])


# --- models and the file -------------------------------------------------------------------------
def _set(default=True):
    models = {
        "dsmtnet": ProbabilityModel("dsmtnet", ("dsmtnet",), "network:dsmtnet", Calibrator("platt", {"a": 1.0, "b": -1.0})),
        "lnmsnet": ProbabilityModel("lnmsnet", ("lnmsnet",), "network:lnmsnet", Calibrator("temperature", {"temperature": 2.0})),
        "mean2": ProbabilityModel("mean2", ("lnmsnet", "dsmtnet"), "mean", Calibrator("identity"), "consensus"),
        "stack": ProbabilityModel("stack", ("dsmtnet",), "stack", Calibrator("identity"), "first",
                                  LinearStack(("logit:dsmtnet", "log_volume"), (0.0, 5.0), (1.0, 2.0), (1.0, 0.5), -0.5)),
    }
    d = {"networks": ["dsmtnet"], "mask": "first", "model": "stack"} if default else {}
    return CalibrationSet(models, d)


def test_select_model_follows_the_documented_order():
    cs = _set()
    assert cs.select_model(["dsmtnet"]).id == "stack"  # the default configuration's model
    assert cs.select_model(["lnmsnet"]).id == "lnmsnet"
    assert cs.select_model(["dsmtnet", "lnmsnet"], "consensus").id == "mean2"  # same set
    assert cs.select_model(["lnmsnet", "dsmtnet"], "first").id == "mean2"  # a mean reads no mask: any order
    assert cs.select_model(["lnmsnet", "detguided"]).id == "lnmsnet"  # no model of the set: the first network's
    # a stack with size features only where it measured the same mask
    st = LinearStack(("logit:dsmtnet", "logit:lnmsnet", "log_volume"), (0, 0, 5), (1, 1, 2), (1, 1, 0.5), 0.0)
    cs.models["stack2"] = ProbabilityModel("stack2", ("dsmtnet", "lnmsnet"), "stack", Calibrator("identity"), "first", st)
    del cs.models["mean2"]
    assert cs.select_model(["dsmtnet", "lnmsnet"]).id == "stack2"
    assert cs.select_model(["lnmsnet", "dsmtnet"]).id == "lnmsnet"  # other first network -> other mask
    assert cs.select_model(["dsmtnet", "lnmsnet"], "consensus").id == "dsmtnet"
    assert cs.select_model(["mtnet"]) is None
    assert _set(default=False).select_model(["dsmtnet"]).id == "dsmtnet"


def test_model_predictions_and_missing_inputs():
    cs = _set()
    f = nodule_features({"dsmtnet": 0.7, "lnmsnet": None}, {"volume_mm3": math.e ** 5 - 1, "solid_fraction": 0.9},
                        {"dsmtnet": {"spiculation": 0.2}})
    assert set(f) == {"logit:dsmtnet", "log_volume", "solid_fraction", "sign:dsmtnet:spiculation"}
    assert cs.models["dsmtnet"].predict(f) == pytest.approx(float(sigmoid(logit(0.7) - 1.0)))
    assert cs.models["stack"].predict(f) == pytest.approx(float(sigmoid(-0.5 + logit(0.7) + 0.5 * 0.0)))
    assert cs.models["lnmsnet"].predict(f) is None  # lnmsnet gave no probability
    # a feature far outside the fitted range is clipped at Z_CLIP standard deviations
    from NoduleMTLLib.models.calibration import Z_CLIP
    far = dict(f, log_volume=5.0 + 2.0 * 100)
    assert cs.models["stack"].predict(far) == pytest.approx(float(sigmoid(-0.5 + logit(0.7) + 0.5 * Z_CLIP)))
    assert cs.models["mean2"].predict(f) is None


def test_round_trip_through_json(tmp_path):
    cs = _set()
    p = tmp_path / "calibration.json"
    p.write_text(json.dumps(cs.to_dict()))
    back = load_calibration(p)
    f = {"logit:dsmtnet": 0.3, "log_volume": 6.0}
    for k in cs.models:
        assert back.models[k].to_dict() == cs.models[k].to_dict()
    assert back.models["stack"].predict(f) == pytest.approx(cs.models["stack"].predict(f))
    assert back.default == cs.default


@pytest.mark.parametrize("bad", [{"format": 99, "models": {}}, {"format": 1, "default": {"model": "x"}, "models": {}},
                                 {"format": 1, "models": {"m": {"networks": ["a"], "score": "network:b",
                                                                "calibrator": {"method": "identity"}}}}])
def test_malformed_files_are_refused(tmp_path, bad):
    p = tmp_path / "calibration.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(CalibrationError):
        load_calibration(p)


def _result(networks=("dsmtnet",), found=True):
    n = NoduleResult(id=1, point_lps_mm=(0.0, 0.0, 0.0), found=found, volume_mm3=400.0 if found else None,
                     solid_fraction=0.8 if found else None, diameter_mm=9.0 if found else None)
    n.networks = {k: NetworkOutput(k, 0.6) for k in networks}
    return AnalysisResult(input={}, run={"networks": list(networks), "reported_mask": "first (x)"}, nodules=[n])


def test_apply_to_result_sets_the_top_level_probability_and_the_run_record():
    cs = _set()
    r = _result()
    apply_to_result(r, cs)
    expect = float(sigmoid(-0.5 + logit(0.6) + 0.5 * (math.log1p(400.0) - 5.0) / 2.0))
    assert r.nodules[0].malignancy_probability == pytest.approx(expect, abs=1e-4)
    assert r.run["malignancy_probability"]["model"] == "stack"
    assert r.run["malignancy_probability"]["default_configuration"] is True
    assert r.nodules[0].to_dict()["malignancy_probability"] == r.nodules[0].malignancy_probability
    r2 = _result(found=False)
    apply_to_result(r2, cs)
    assert r2.nodules[0].malignancy_probability is None
    r3 = _result(("mtnet",))
    apply_to_result(r3, cs)
    assert r3.nodules[0].malignancy_probability is None and "no calibrated model" in r3.run["malignancy_probability"]["reason"]


# --- fitting (training side) ----------------------------------------------------------------------
def test_pav_is_the_isotonic_least_squares_fit():
    from training.calibration import pav

    x, y = pav([0.1, 0.2, 0.3, 0.4], [1, 0, 0, 1])
    assert np.allclose(y, [1 / 3, 1 / 3, 1 / 3, 1])
    x, y = pav([0.3, 0.1, 0.1, 0.2], [1, 0, 1, 0])  # ties pooled first: x 0.1 -> 0.5 (weight 2), then pooled with x 0.2 -> 0
    assert np.allclose(x, [0.1, 0.2, 0.3]) and np.allclose(y, [1 / 3, 1 / 3, 1.0])  # weights 2 and 1
    rng = np.random.default_rng(1)
    xs = rng.random(200)
    ys = (rng.random(200) < xs).astype(float)
    ux, fy = pav(xs, ys)
    assert np.all(np.diff(fy) >= -1e-12)
    # least squares: the pooled fit beats any small monotone perturbation
    base = np.sum((np.interp(xs, ux, fy) - ys) ** 2)
    assert base <= np.sum((np.clip(np.interp(xs, ux, fy) * 1.05, 0, 1) - ys) ** 2)


def test_temperature_and_platt_recover_known_miscalibration():
    from training.calibration import fit_calibrator

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(len(z)) < sigmoid(z / 2.5)).astype(float)  # true logit = raw logit / 2.5
    p = sigmoid(z)
    assert fit_calibrator("temperature", p, y).params["temperature"] == pytest.approx(2.5, rel=0.08)
    pl = fit_calibrator("platt", p, y).params
    assert pl["a"] == pytest.approx(0.4, abs=0.04) and pl["b"] == pytest.approx(0.0, abs=0.08)


def test_ece_and_brier():
    from training.calibration import brier, ece

    assert ece([0] * 10, [0.9] * 10) == pytest.approx(0.9)
    y = [1] * 7 + [0] * 3
    assert ece(y, [0.7] * 10) == pytest.approx(0.0)
    assert brier([1, 0], [1.0, 0.0]) == 0 and brier([1, 0], [0.0, 1.0]) == 1


def test_fit_logistic_recovers_coefficients():
    from training.calibration import fit_logistic

    rng = np.random.default_rng(2)
    X = rng.normal(size=(20000, 2))
    y = (rng.random(20000) < sigmoid(1.5 * X[:, 0] - 0.7 * X[:, 1] + 0.3)).astype(float)
    w, c = fit_logistic(X, y)
    assert np.allclose(w, [1.5, -0.7], atol=0.08) and c == pytest.approx(0.3, abs=0.06)


# --- the shipped file and the default configuration ------------------------------------------------
def test_shipped_calibration_names_the_default_everywhere(repo_dir):
    import ast
    import xml.etree.ElementTree as ET

    from NoduleMTLLib import DEFAULT_NETWORKS
    from NoduleMTLLib.apps import batch, cli

    cs = load_calibration(repo_dir / "Resources" / "Weights" / "calibration.json")
    assert tuple(cs.default["networks"]) == DEFAULT_NETWORKS
    model = cs.models[cs.default["model"]]
    assert set(model.networks) <= set(DEFAULT_NETWORKS)
    assert "validation" in model.info["fitted_on"]
    assert cs.select_model(list(DEFAULT_NETWORKS)) is model
    # every single network has its own calibrated model (used when it runs first)
    for n in ("lnmsnet", "detguided", "dsmtnet", "mtnet"):
        assert cs.select_model([n]) is not None and n in cs.select_model([n]).networks
    # the command line, batch, the Slicer module and the Slicer CLI module default to it
    ap = cli.build_parser()
    assert ap.parse_args(["analyze", "ct.nrrd", "--out", "o"]).networks == ",".join(DEFAULT_NETWORKS)
    assert ap.parse_args(["batch", "in", "--out", "o"]).networks == ",".join(DEFAULT_NETWORKS)
    assert batch.BatchRun(cases=[], out_dir=repo_dir).network_ids == DEFAULT_NETWORKS
    src = (repo_dir / "NoduleMTL" / "NoduleMTL.py").read_text()
    assigns = {n.targets[0].id: ast.unparse(n.value) for n in ast.parse(src).body
               if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    assert assigns["DEFAULT_NETWORK"] == "DEFAULT_NETWORKS[0]"
    xml = ET.parse(repo_dir / "NoduleMTL" / "NoduleMTLCLI" / "NoduleMTLCLI.xml")
    [default] = [s.findtext("default") for s in xml.iter("string") if s.findtext("name") == "networks"]
    assert default == ",".join(DEFAULT_NETWORKS)


def test_shipped_probabilities_are_never_exactly_0_or_1(repo_dir):
    """Every shipped single-network calibrator is one of ``REPORTABLE_CALIBRATORS`` (a smooth map:
    temperature / Platt, never isotonic's step function) or identity (what
    ``training.calibration_select`` keeps unless another wins clearly), so a reported probability
    stays inside (0, 1) even for the most extreme network outputs."""
    from training.calibration import REPORTABLE_CALIBRATORS

    assert "isotonic" not in REPORTABLE_CALIBRATORS and "identity" not in REPORTABLE_CALIBRATORS
    cs = load_calibration(repo_dir / "Resources" / "Weights" / "calibration.json")
    for mid, m in cs.models.items():
        if m.score == "stack":
            continue
        assert m.calibrator.method in (*REPORTABLE_CALIBRATORS, "identity"), mid
        out = np.asarray([m.calibrator(p) for p in (1e-6, 0.5, 1 - 1e-6)], float).ravel()
        assert ((out > 0) & (out < 1)).all() and out[0] < out[1] < out[2], (mid, out)


@pytest.mark.slow
def test_tta_is_mirror_equivariant_on_real_ct(repo_dir):
    """With the left-right flip averaged in, mirroring the input mirrors the answer exactly
    (and the malignancy logit does not change); without it, a network is not equivariant."""
    import SimpleITK as sitk
    import torch

    from NoduleMTLLib.inference.pipeline import Click2DNetwork
    from NoduleMTLLib.models.registry import load_network

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd")))
    hu = a[20:23, 40:136, 40:136].astype(np.float32)  # 3 slices, 96 x 96 px of lung and nodule
    model = load_network("dsmtnet", "cpu")
    plain, tta = (Click2DNetwork("dsmtnet", model, torch.device("cpu"), tta=t) for t in (False, True))
    p, lg = tta._run(hu)
    pm, lgm = tta._run(hu[:, :, ::-1].copy())
    np.testing.assert_allclose(pm, p[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(lgm, lg, atol=1e-4)
    q, _ = plain._run(hu)
    qm, _ = plain._run(hu[:, :, ::-1].copy())
    assert np.abs(qm - q[:, :, ::-1]).max() > 1e-3
