"""training.metric_noise: the chance variation of the Lung-RADS evaluation's figures (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import metric_noise as mn

REPORT = Path(__file__).resolve().parents[2] / "training" / "reports" / "lung_rads" / "lung_rads_test.json"


def test_calibrated_ece_shrinks_with_the_sample_and_is_not_zero_on_a_small_one():
    rng = np.random.default_rng(1)
    small = mn.calibrated_ece(rng.random(84), n_draws=500)
    large = mn.calibrated_ece(rng.random(20000), n_draws=20)
    assert small.mean() > 0.05 > 0.01 > large.mean()  # binned ECE of a calibrated model: an upward bias at n = 84


def test_patient_bootstrap_keeps_patients_together_and_refuses_an_undefined_statistic():
    rows = [{"patient_id": "a", "v": 1.0}, {"patient_id": "a", "v": 1.0}, {"patient_id": "b", "v": 0.0}]
    lo, hi = mn.patient_bootstrap(rows, lambda rs: float(np.mean([r["v"] for r in rs])), n_boot=400)
    assert lo == 0.0 and hi == 1.0  # only the mixes 0, 2/3 and 1 exist: patient a's two rows move together
    one = [r for r in rows if r["patient_id"] == "a"]
    assert mn.patient_bootstrap(one, lambda rs: float(np.mean([r["v"] for r in rs])), n_boot=50) == (1.0, 1.0)
    with pytest.raises(ValueError):
        mn.patient_bootstrap(rows, lambda rs: None, n_boot=10)


def test_wilson_interval():
    lo, hi = mn.wilson(9, 13)
    assert lo == pytest.approx(0.424, abs=0.002) and hi == pytest.approx(0.873, abs=0.002)


@pytest.mark.skipif(not REPORT.exists(), reason="no committed lung-rads test report")
def test_figures_agree_with_the_evaluators_summary():
    ev = json.loads(REPORT.read_text())
    a = mn.analyse(ev, n_boot=50, n_draws=50)
    s = ev["summary"]
    assert a["lung_rads"]["exact"]["value"] == pytest.approx(s["exact"])
    assert a["lung_rads"]["under_calls"]["value"] == pytest.approx(s["under_calls"])
    assert a["long_axis_within_15pct"]["value"] == pytest.approx(s["long_axis_within_15pct"])
    assert a["dice_median"]["value"] == pytest.approx(s["dice_median"])
    assert a["malignancy"]["auc"]["value"] == pytest.approx(s["malignancy"]["auc"])
    assert a["malignancy"]["ece"]["value"] == pytest.approx(s["malignancy"]["ece"])
    assert a["type"]["solid_called_solid"]["value"] == pytest.approx(s["type"]["solid_called_solid"])
    assert a["type"]["subsolid_called_subsolid"]["value"] == pytest.approx(s["type"]["subsolid_called_subsolid"])
    lo, hi = a["malignancy"]["auc"]["ci95"]
    assert lo <= s["malignancy"]["auc"] <= hi


@pytest.mark.skipif(not REPORT.exists(), reason="no committed lung-rads test report")
def test_a_missed_nodule_counts_as_the_evaluator_counts_it():
    """A nodule without a prediction stays in the category denominator (neither exact nor an
    under-call), as in ``lung_rads_eval.summarize``."""
    from training.lung_rads_eval import summarize

    ev = json.loads(REPORT.read_text())
    recs = [dict(r) for r in ev["nodules"]]
    recs[0] = dict(recs[0], predicted=None, found=False, dice=0.0)
    a = mn.analyse(dict(ev, nodules=recs), n_boot=20, n_draws=20)
    s = summarize(recs)
    assert a["lung_rads"]["exact"]["value"] == pytest.approx(s["exact"])
    assert a["lung_rads"]["under_calls"]["value"] == pytest.approx(s["under_calls"])
    assert a["dice_median"]["value"] == pytest.approx(s["dice_median"])
    assert a["type"]["solid_called_solid"]["n"] + a["type"]["subsolid_called_subsolid"]["n"] == len(recs) - 1
