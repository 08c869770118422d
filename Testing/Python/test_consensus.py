"""Consensus of several click networks (``NoduleMTLLib.core.consensus``): hand-computed cases, and
an end-to-end run of ``analyze_points`` with ``lnmsnet,detguided`` on the real sample CT."""

import csv
import json
import math

import numpy as np
import pytest

from NoduleMTLLib.apps import cli
from NoduleMTLLib.core.consensus import (
    DISAGREEMENT_MIN_DICE,
    DISAGREEMENT_SPREAD,
    INCLUDE_TIES,
    MaskBox,
    box_dice,
    compute_consensus,
    majority_mask,
)
from NoduleMTLLib.core.io import InputError, ras_to_lps, read_ct
from NoduleMTLLib.core.metrics import dice
from NoduleMTLLib.outputs.files import CONSENSUS_COLUMNS
from NoduleMTLLib.outputs.writer import write_outputs

SHAPE = (2, 3, 10)


def row_mask(lo, hi, shape=SHAPE, z=1, y=2):
    """Full-grid mask with voxels x in [lo, hi) on row (z, y)."""
    m = np.zeros(shape, bool)
    m[z, y, lo:hi] = True
    return m


# Hand-built case on one row of 10 voxels: A = x 0..5, B = x 3..8, C = x 5..9.
A, B, C = row_mask(0, 6), row_mask(3, 9), row_mask(5, 10)


def test_maskbox_round_trip_and_offset():
    m = np.zeros((5, 6, 7), bool)
    m[1:3, 2, 3:6] = True
    m[2, 4, 5] = True
    b = MaskBox.from_full(m)
    assert b.offset_zyx == (1, 2, 3) and b.array.shape == (2, 3, 3) and b.voxels == 7
    assert np.array_equal(b.to_full(), m)
    assert MaskBox.from_full(np.zeros((2, 2, 2), bool)) is None and MaskBox.from_full(None) is None
    with pytest.raises(ValueError):
        MaskBox.from_full(np.ones((3, 3), bool))


def test_box_dice_matches_full_dice():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((6, 8, 9)) > 0.7, rng.random((6, 8, 9)) > 0.6
        a[0, 0, 0] = b[5, 7, 8] = True  # boxes of different extent
        assert box_dice(MaskBox.from_full(a), MaskBox.from_full(b)) == pytest.approx(dice(a, b), abs=1e-12)
    assert box_dice(MaskBox.from_full(A), MaskBox.from_full(B)) == pytest.approx(0.5)  # |A∩B| = 3, 2*3/(6+6)


def test_two_networks_union_by_default_intersection_when_strict():
    assert INCLUDE_TIES  # the documented consensus rule: ties (1 of 2) count
    m = majority_mask([MaskBox.from_full(A), MaskBox.from_full(B)])
    assert np.array_equal(m.to_full(), A | B) and m.voxels == 9  # x 0..8
    s = majority_mask([MaskBox.from_full(A), MaskBox.from_full(B)], include_ties=False)
    assert np.array_equal(s.to_full(), A & B) and s.voxels == 3  # x 3, 4, 5
    assert majority_mask([MaskBox.from_full(row_mask(0, 3)), MaskBox.from_full(row_mask(5, 8))], include_ties=False) is None


def test_majority_three_networks():
    # votes per x: 1 1 1 2 2 3 2 2 2 1 -> >= 2 of 3 = x 3..8 (no ties possible with 3)
    for ties in (True, False):
        m = majority_mask([MaskBox.from_full(x) for x in (A, B, C)], include_ties=ties)
        assert np.array_equal(m.to_full(), row_mask(3, 9))


def test_majority_four_networks_ties():
    # D = C; votes x0..2 = 1 (A), x3..4 = 2 (A, B), x5 = 4, x6..8 = 3 (B, C, D), x9 = 2 (C, D)
    boxes = [MaskBox.from_full(x) for x in (A, B, C, C)]
    assert np.array_equal(majority_mask(boxes).to_full(), row_mask(3, 10))  # ties (2 of 4) in
    assert np.array_equal(majority_mask(boxes, include_ties=False).to_full(), row_mask(5, 9))  # 3 of 4


def test_consensus_three_networks_hand_computed():
    c = compute_consensus({"a": A, "b": B, "c": C}, {"a": 0.2, "b": 0.6, "c": 0.7})
    assert (c.n_networks, c.n_found, c.networks_found) == (3, 3, ["a", "b", "c"])
    assert c.malignancy_probability == pytest.approx(0.5)
    assert c.probability_spread == pytest.approx(0.5)
    assert c.probability_std == pytest.approx(math.sqrt((0.09 + 0.01 + 0.04) / 3))
    assert c.dice_pairwise == pytest.approx({"a|b": 0.5, "a|c": 2 / 11, "b|c": 8 / 11})
    assert c.dice_pairwise_mean == pytest.approx((0.5 + 2 / 11 + 8 / 11) / 3)
    assert c.dice_pairwise_min == pytest.approx(2 / 11)
    assert c.disagreement == "high" and len(c.reasons) == 2
    assert "spread 0.50" in c.reasons[0] and "0.18" in c.reasons[1]
    assert c.mask.voxels == 6  # x 3..8
    d = c.to_dict()
    assert d["mask_voxels"] == 6 and "union" in d["mask_rule"] and d["malignancy_probability"] == 0.5
    assert d["dice_pairwise_min"] == round(2 / 11, 4)
    json.dumps(d)  # JSON-ready


def test_consensus_low_and_thresholds_are_strict():
    # spread exactly 0.3 (0.55 - 0.25 in floating point) and Dice exactly 0.5 -> not "high"
    c = compute_consensus({"a": A, "b": B}, {"a": 0.25, "b": 0.55})
    assert c.probability_spread == pytest.approx(DISAGREEMENT_SPREAD) and c.dice_pairwise_min == pytest.approx(DISAGREEMENT_MIN_DICE)
    assert c.disagreement == "low" and c.reasons == []
    # just past either threshold -> "high"
    assert compute_consensus({"a": A, "b": B}, {"a": 0.25, "b": 0.56}).disagreement == "high"
    assert compute_consensus({"a": A, "b": row_mask(4, 9)}, {"a": 0.3, "b": 0.3}).disagreement == "high"  # Dice 4/11


def test_consensus_one_network_missed():
    c = compute_consensus({"a": A, "b": None}, {"a": 0.3, "b": float("nan")})
    assert (c.n_networks, c.n_found) == (2, 1)
    assert np.array_equal(c.mask.to_full(), A)  # majority of the one network that found it
    assert c.malignancy_probability == pytest.approx(0.3)
    assert c.probability_spread is None and c.dice_pairwise_min is None
    assert c.disagreement == "high" and "b segmented nothing" in c.reasons[0]


def test_consensus_disjoint_masks_and_single_network():
    c = compute_consensus({"a": row_mask(0, 3), "b": row_mask(5, 8)}, {"a": 0.4, "b": 0.45})
    assert c.mask.voxels == 6 and c.dice_pairwise_min == 0.0 and c.disagreement == "high"  # union of both
    assert len(c.reasons) == 1 and "Dice 0.00" in c.reasons[0] and c.to_dict()["mask_voxels"] == 6
    s = compute_consensus({"a": A}, {"a": 0.8})
    assert s.disagreement is None and s.reasons == [] and s.malignancy_probability == pytest.approx(0.8)
    assert s.probability_spread is None and s.dice_pairwise == {}
    none = compute_consensus({"a": None, "b": None}, {"a": None, "b": None})
    assert none.n_found == 0 and none.mask is None and none.malignancy_probability is None and none.disagreement == "low"


def test_consensus_signs():
    c = compute_consensus({"a": A, "b": B, "c": None}, {"a": 0.2, "b": 0.4, "c": None},
                          {"a": {"spiculation": 0.2}, "b": {"spiculation": 0.6, "lobulation": 0.4}, "c": {"spiculation": 0.9}})
    assert c.sign_probabilities == pytest.approx({"spiculation": 0.4, "lobulation": 0.4})  # c found nothing: not counted
    assert c.sign_counts == {"spiculation": 2, "lobulation": 1}


def test_consensus_bad_input():
    with pytest.raises(ValueError):
        compute_consensus({}, {})
    with pytest.raises(ValueError, match="outside"):
        compute_consensus({"a": A}, {"a": 1.5})
    with pytest.raises(ValueError, match="grid"):
        compute_consensus({"a": A, "b": np.ones((3, 3, 3), bool)}, {"a": 0.1, "b": 0.2})


# ---- end to end on the real sample CT (LIDC-IDRI-0003 crop), shipped weights ----

NODULE2_RAS = (-72.5, -77.2, -190.4)   # ~30 mm
NODULE3_RAS = (-23.5, 47.6, -172.3)    # ~13 mm
NETS = ("lnmsnet", "detguided")


@pytest.fixture(scope="module")
def sample_ct(repo_dir):
    return read_ct(repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd")


@pytest.fixture(scope="module")
def loaded():
    from NoduleMTLLib.models.registry import load_network
    return {n: load_network(n, "cpu") for n in NETS}


@pytest.fixture(scope="module")
def two_net_result(sample_ct, loaded):
    from NoduleMTLLib.inference.pipeline import analyze_points
    pts = [ras_to_lps(NODULE2_RAS), ras_to_lps(NODULE3_RAS)]
    first = analyze_points(sample_ct, pts, network_ids=NETS, device="cpu", networks=loaded)
    cons = analyze_points(sample_ct, pts, network_ids=NETS, device="cpu", networks=loaded, mask="consensus")
    return first, cons


@pytest.mark.slow
def test_end_to_end_consensus_fields(two_net_result):
    res, _ = two_net_result
    js = json.loads(json.dumps(res.to_dict()))
    assert res.run["reported_mask"] == "first (lnmsnet)"
    for nd, d in zip(res.nodules, js["nodules"]):
        assert nd.found and set(nd.network_masks) == set(NETS)
        c = d["consensus"]
        for k in ("n_networks", "n_found", "mask_voxels", "malignancy_probability", "probability_spread", "probability_std",
                  "dice_pairwise", "dice_pairwise_mean", "dice_pairwise_min", "disagreement", "reasons", "sign_probabilities"):
            assert k in c
        assert c["n_networks"] == 2 and c["n_found"] == 2 and c["disagreement"] in ("low", "high")
        probs = [d["networks"][n]["malignancy_probability"] for n in NETS]
        assert c["malignancy_probability"] == pytest.approx(np.mean(probs), abs=2e-4)
        assert c["probability_spread"] == pytest.approx(max(probs) - min(probs), abs=2e-4)
        full = {n: nd.network_masks[n].to_full() for n in NETS}
        assert np.array_equal(full["lnmsnet"], nd.mask)  # reported = first network's
        pair = dice(full["lnmsnet"], full["detguided"])
        assert 0.0 <= c["dice_pairwise_min"] <= 1.0 and c["dice_pairwise"]["lnmsnet|detguided"] == pytest.approx(pair, abs=1e-4)
        assert (c["disagreement"] == "high") == (c["probability_spread"] > DISAGREEMENT_SPREAD or pair < DISAGREEMENT_MIN_DICE)
        cm = nd.consensus.mask.to_full()
        assert not (cm & ~(full["lnmsnet"] | full["detguided"])).any()  # within the union
        assert np.array_equal(cm, full["lnmsnet"] | full["detguided"])  # two networks: the union itself
        assert c["mask_voxels"] == int(cm.sum()) > 0
        assert d["networks"]["detguided"]["dice_with_final"] == pytest.approx(pair, abs=1e-4)
        print(f"nodule {nd.id}: P {probs} -> {c['malignancy_probability']}, Dice {pair:.3f}, {c['disagreement']} {c['reasons']}")


@pytest.mark.slow
def test_end_to_end_consensus_mask_reported(two_net_result):
    first, cons = two_net_result
    assert cons.run["reported_mask"] == "consensus"
    for a, b in zip(first.nodules, cons.nodules):
        assert b.reported_mask == "consensus" and b.to_dict()["reported_mask"] == "consensus"
        assert np.array_equal(b.mask, b.consensus.mask.to_full())
        assert b.volume_mm3 >= a.volume_mm3 - 1e-6  # the union is never smaller than the first mask
        assert b.networks["lnmsnet"].dice_with_final == pytest.approx(dice(a.mask, b.mask), abs=1e-4)
        # every network classifies the reported mask (issue 24: the answer describes the mask written),
        # so the consensus record's mean is the mean of the networks' outputs on that mask
        for r in (a, b):
            probs = [o.malignancy_probability for o in r.networks.values()]
            assert r.consensus.to_dict()["malignancy_probability"] == pytest.approx(float(np.mean(probs)), abs=1e-4)


@pytest.mark.slow
def test_reclassifying_the_reported_mask_gives_every_networks_answer_back(two_net_result, sample_ct, loaded):
    """Two networks, the first network's mask and the consensus mask: re-classifying the reported
    mask with the original click returns each network's raw output of the analysis."""
    from NoduleMTLLib.inference.refine import reclassify_from_mask
    for res in two_net_result:
        for nd in res.nodules:
            back = reclassify_from_mask(sample_ct, nd.mask, NETS, device="cpu", networks=loaded, point_lps=nd.point_lps_mm)
            for net in NETS:
                assert back.networks[net].malignancy_probability == pytest.approx(nd.networks[net].malignancy_probability,
                                                                                  abs=1e-4), (res.run["reported_mask"], nd.id, net)


@pytest.mark.slow
def test_outputs_carry_consensus(two_net_result, sample_ct, tmp_path):
    res, _ = two_net_result
    write_outputs(res, sample_ct, tmp_path / "o")
    rows = list(csv.DictReader(open(tmp_path / "o" / "nodules.csv")))
    js = json.loads((tmp_path / "o" / "nodules.json").read_text())
    for col in CONSENSUS_COLUMNS:
        assert col in rows[0]
    for r, d in zip(rows, js["nodules"]):
        assert float(r["consensus.malignancy_probability"]) == pytest.approx(d["consensus"]["malignancy_probability"])
        assert r["consensus.disagreement"] == d["consensus"]["disagreement"] and r["consensus.n_found"] == "2"


@pytest.mark.slow
def test_cli_mask_option(sample_ct, repo_dir, tmp_path, capsys):
    ct = repo_dir / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
    out = tmp_path / "c"
    rc = cli.main(["analyze", str(ct), "--point", *map(str, NODULE3_RAS), "--networks", ",".join(NETS),
                   "--mask", "consensus", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    js = json.loads((out / "nodules.json").read_text())
    assert js["run"]["reported_mask"] == "consensus"
    n = js["nodules"][0]
    assert n["reported_mask"] == "consensus" and n["volume_mm3"] > 0
    assert "consensus" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["analyze", str(ct), "--point", "0", "0", "0", "--mask", "union", "--out", str(tmp_path / "x")])


def test_analyze_points_rejects_unknown_mask(sample_ct):
    from NoduleMTLLib.inference.pipeline import analyze_points
    with pytest.raises(InputError, match="mask"):
        analyze_points(sample_ct, [ras_to_lps(NODULE3_RAS)], network_ids=("lnmsnet",), device="cpu", mask="union")
