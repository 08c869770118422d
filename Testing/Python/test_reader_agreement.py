"""The reader-ceiling measurement (``training/reader_agreement.py``, issue 22) on real lidc_slices nodules."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from training import reader_agreement as ra


@pytest.fixture(scope="module")
def nodules(shared_data):
    rows = ra.eligible_rows(shared_data)
    # LIDC-IDRI-0003 nodule-1 and -2 (4 readers each, test patient with a lidc_vois VOI) and a 3-reader nodule
    pick = [r for r in rows if r["patient_id"] == "LIDC-IDRI-0003"][:2] + [r for r in rows if r["n_annotations"] == "3"][:1]
    assert len(pick) == 3
    return [ra.load_nodule(r, shared_data) for r in pick]


def test_eligible_rows_follow_the_strict_filter(shared_data):
    rows = ra.eligible_rows(shared_data)
    assert rows and all(int(r["n_annotations"]) >= 3 and r["slice_count_match"] == "1"
                        and r["n_nonempty_masks"] == r["n_annotations"] for r in rows)
    assert not {r["patient_id"] for r in rows} & {"LIDC-IDRI-0001", "LIDC-IDRI-0009"}


def test_leave_one_out_excludes_the_reader(nodules):
    n = nodules[0]
    R = n["readers"]
    assert len(R) == 4
    for r in range(len(R)):
        others = np.delete(R, r, axis=0)
        assert np.array_equal(ra.leave_one_out(R, r, "union"), others.any(0))
        assert np.array_equal(ra.leave_one_out(R, r, "half"), others.sum(0) >= 2)  # 2 of 3 others
    # a voxel only reader 0 marked is in no leave-one-out reference of reader 0, and in every other reader's union one
    extra = R.copy()
    free = ~R.any(0)
    spot = tuple(np.argwhere(free)[0])
    extra[0][spot] = True
    assert not ra.leave_one_out(extra, 0, "union")[spot]
    assert all(ra.leave_one_out(extra, r, "union")[spot] for r in (1, 2, 3))
    with pytest.raises(ValueError):
        ra.leave_one_out(R[:1], 0)


def test_reader_against_copies_of_itself_agrees_fully(nodules):
    for n in nodules[1:]:
        same = dict(n, readers=np.repeat(n["readers"][:1], 3, axis=0),
                    texture=[n["texture"][0]] * 3, calcification=[n["calcification"][0]] * 3)
        for rule in ra.RULES:
            recs = ra.pair_records(same, None, rule)
            assert len(recs) == 3
            for rec in recs:
                assert rec["long_axis_ratio"] == pytest.approx(1.0)
                assert rec["mean_diameter_ratio"] == pytest.approx(1.0)
                assert rec["type_reader"] == rec["type_others"]
                assert rec["category_reader"] == rec["category_others"]
            s = ra.summarize(recs)
            assert s["long_axis_within_15pct"][0] == 1.0
            if s["n_with_category"]:
                assert s["lung_rads_exact"][0] == 1.0 and s["under_calls"][0] == 0.0


def test_real_readers_disagree_somewhere(nodules):
    recs = [rec for n in nodules for rec in ra.pair_records(n, None, "union")]
    ratios = np.array([r["long_axis_ratio"] for r in recs])
    assert len(recs) == 11 and np.all(ratios > 0)
    assert np.any(np.abs(ratios - 1) > 0.01)  # different readers draw different outlines


def test_category_is_the_shipped_function(nodules, monkeypatch):
    from NoduleMTLLib.clinical import lung_rads

    base = ra.pair_records(nodules[1], None, "union")
    assert all(r["category_reader"] in (None, *ra.CATEGORIES) for r in base)
    calls = []

    def fake(t, size, solid=None, calcified=False):
        calls.append((t, size, solid, calcified))
        return "4B", "fake"

    monkeypatch.setattr(lung_rads, "categorize", fake)
    recs = ra.pair_records(nodules[1], None, "union")
    assert calls and all(r["category_others"] in (None, "4B") for r in recs)
    assert any(r["category_reader"] == "4B" for r in recs)


def test_reader_order_fits_pylidc_diameters(nodules):
    for n in nodules:
        chk = ra.reader_order_check(n)
        assert chk["identity_best"]
        assert max(chk["abs_err_mm"]) < 2.0


def test_voi_registration_gives_hu_and_the_union(nodules, shared_data):
    import SimpleITK as sitk

    d = shared_data / "lidc_vois"
    rows = [r for r in csv.DictReader(open(d / "labels.csv")) if r["patient_id"] == "LIDC-IDRI-0003"]
    n = nodules[0]
    best = None
    for v in rows:
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(d / v["image"])))
        vm = sitk.GetArrayFromImage(sitk.ReadImage(str(d / v["mask"]))) > 0
        reg = ra.register_voi(n["image"], hu, vm, n["readers"])
        if reg is not None and (best is None or reg["mask_dice"] > best["mask_dice"]):
            best = reg
        if best is not None and best["mask_dice"] > 0.9:
            break
    assert best is not None and best["ncc"] > 0.99
    assert best["fit_rms_hu"] < 20
    if best["covered"] > 0.999:
        assert best["dice_in_voi"]["union"] > 0.99 > best["dice_in_voi"]["half"]
    inside = best["hu"][ra.consensus_of(n["readers"], "half")]
    assert -400 < float(np.median(inside)) < 200  # a solid nodule in HU
    # HU path and no-HU path agree on solid / ground-glass nodules
    for rec in ra.pair_records(n, best["hu"], "half"):
        if rec["category_reader"] is not None:
            assert rec["category_hu_reader"] == rec["category_reader"]
        if rec["category_others"] is not None:
            assert rec["category_hu_others"] == rec["category_others"]


def test_share_ci_by_patient():
    patients = ["a"] * 4 + ["b"] * 4
    ok = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    inv, counts = ra._boot_index(patients, n=500, seed=1)
    share, ci = ra.share_ci(ok, np.ones(8, bool), inv, counts)
    assert share == 0.5 and ci[0] == 0.0 and ci[1] == 1.0  # resampling patients, not pairs
    assert ra.share_ci(ok, np.zeros(8, bool), inv, counts) == (None, None)


def test_half_rule_is_the_training_target(shared_data, nodules):
    from training.data import load_slice_nodules, reader_consensus

    loaded = {n.nodule: n for n in load_slice_nodules(shared_data, patients={"LIDC-IDRI-0003"})}
    n = nodules[0]
    assert np.array_equal(loaded[n["nodule"]].consensus, ra.consensus_of(n["readers"], "half"))
    assert np.array_equal(reader_consensus(n["readers"][:2]), n["readers"][:2].any(0))  # 1 of 2 counts
    assert not np.array_equal(ra.consensus_of(n["readers"], "half"), ra.consensus_of(n["readers"], "union"))


def test_an_empty_reference_gets_no_category_on_either_path():
    """Four readers with disjoint outlines: under the >= 50 % rule the other three leave nothing, and
    neither the no-HU nor the HU path categorizes a 0 mm reference."""
    from training import reader_agreement as ra

    readers = np.zeros((4, 3, 128, 128), bool)
    for r in range(4):
        readers[r, :, 20 + 25 * r:35 + 25 * r, 50:65] = True
    nod = {"patient_id": "P", "nodule": 1, "image": np.zeros((3, 128, 128), np.uint8), "readers": readers,
           "texture": np.array([5.0, 5.0, 5.0, 5.0]), "calcification": np.array([6.0, 6.0, 6.0, 6.0]),
           "spacing_mm": 0.7, "thickness_mm": 2.5}
    recs = ra.pair_records(nod, hu=np.full((3, 128, 128), -800.0, np.float32), rule="half")
    assert len(recs) == 4
    for rec in recs:
        assert rec["category_others"] is None and rec["category_reader"] is None and rec["category_hu_others"] is None
    union = ra.pair_records(nod, rule="union")
    assert all(rec["category_others"] is not None for rec in union)  # the union of the others is never empty here
