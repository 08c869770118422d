"""Lung-RADS v2022 baseline rules (NoduleMTLLib.clinical.lung_rads): a guideline table at every cut
point of every type, the size rounding v2022 prescribes, and the HU measurements (solid
component, calcification, 4X suggestion) on small hand-made CT volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.clinical import lung_rads as lr
from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.core.results import NetworkOutput, NoduleResult

# (type, mean diameter mm, solid component mm, expected category, expected rule key)
GUIDELINE_TABLE = [
    # solid: 2 < 6 <= 3 < 8 <= 4A < 15 <= 4B
    ("solid", 0.0, None, "2", "solid<6"),
    ("solid", 5.9, None, "2", "solid<6"),
    ("solid", 6.0, None, "3", "solid6-8"),
    ("solid", 7.9, None, "3", "solid6-8"),
    ("solid", 8.0, None, "4A", "solid8-15"),
    ("solid", 14.9, None, "4A", "solid8-15"),
    ("solid", 15.0, None, "4B", "solid>=15"),
    ("solid", 60.0, None, "4B", "solid>=15"),
    # part-solid: total < 6 -> 2; total >= 6: solid < 6 -> 3, 6 <= solid < 8 -> 4A, solid >= 8 -> 4B
    ("part-solid", 5.9, 3.0, "2", "partsolid<6"),
    ("part-solid", 5.9, 5.9, "2", "partsolid<6"),
    ("part-solid", 6.0, 0.0, "3", "partsolid-solid<6"),
    ("part-solid", 6.0, 5.9, "3", "partsolid-solid<6"),
    ("part-solid", 20.0, 5.9, "3", "partsolid-solid<6"),
    ("part-solid", 6.0, 6.0, "4A", "partsolid-solid6-8"),
    ("part-solid", 12.0, 7.9, "4A", "partsolid-solid6-8"),
    ("part-solid", 8.0, 8.0, "4B", "partsolid-solid>=8"),
    ("part-solid", 25.0, 12.0, "4B", "partsolid-solid>=8"),
    # non-solid (ground-glass): 2 < 30 <= 3
    ("ground-glass", 5.0, None, "2", "nonsolid<30"),
    ("ground-glass", 29.9, None, "2", "nonsolid<30"),
    ("ground-glass", 30.0, None, "3", "nonsolid>=30"),
    ("non-solid", 45.0, None, "3", "nonsolid>=30"),
]


@pytest.mark.parametrize("ntype,size,solid,category,rule", GUIDELINE_TABLE)
def test_guideline_table(ntype, size, solid, category, rule):
    assert lr.categorize(ntype, size, solid) == (category, rule)
    assert lr.RULES[rule].startswith(category + ":")


@pytest.mark.parametrize("ntype,size", [("solid", 20.0), ("part-solid", 20.0), ("ground-glass", 40.0)])
def test_complete_calcification_is_category_1(ntype, size):
    assert lr.categorize(ntype, size, 10.0, completely_calcified=True) == ("1", "calcified")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="solid component"):
        lr.categorize("part-solid", 10.0, None)
    with pytest.raises(ValueError, match="unknown nodule type"):
        lr.categorize("cavity", 10.0)
    with pytest.raises(ValueError):
        lr.categorize("solid", float("nan"))
    with pytest.raises(ValueError):
        lr.mean_diameter_mm(-1.0, 3.0)


def test_mean_diameter_rounds_each_axis_then_the_mean_half_up():
    # v2022: axes to one decimal, mean to one decimal (half up, not banker's rounding)
    assert lr.mean_diameter_mm(6.0, 5.9) == 6.0   # 5.95 -> 6.0: category 3, not 2
    assert lr.mean_diameter_mm(6.04, 5.86) == 6.0  # 6.0 and 5.9 -> 5.95 -> 6.0
    assert lr.mean_diameter_mm(6.0, 5.8) == 5.9
    assert lr.mean_diameter_mm(16.0, 13.9) == 15.0
    assert lr.round1(0.25) == 0.3 and lr.round1(0.35) == 0.4


def test_scan_category_is_the_highest():
    recs = [(1, {"category": "3"}), (2, None), (3, {"category": "4A"}), (4, {"category": "2"}), (5, {"category": "4A"})]
    s = lr.scan_category(recs)
    assert s["category"] == "4A" and s["nodule_ids"] == [3, 5]
    assert lr.scan_category([(1, None)]) is None
    assert lr.scan_category([(1, {"category": "4B"}), (2, {"category": "1"})])["category"] == "4B"


# ---------------------------------------------------------------------------
# measurements on hand-made volumes (1 mm isotropic voxels)
# ---------------------------------------------------------------------------

def _ct(hu):
    img = sitk.GetImageFromArray(np.asarray(hu, np.int16))
    img.SetSpacing((1.0, 1.0, 1.0))
    return CTVolume(img)


def _ball(shape, centre, radius):
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def _nodule(mask, ct, ntype, networks=None):
    from NoduleMTLLib.core.postprocess import measure_nodule

    m = measure_nodule(mask, ct)
    assert m["type"] == ntype, m
    return NoduleResult(id=1, point_lps_mm=(0, 0, 0), found=True, mask=mask, diameter_mm=m["diameter_mm"],
                        short_axis_mm=m["short_axis_mm"], volume_mm3=m["volume_mm3"], mean_hu=m["mean_hu"],
                        solid_fraction=m["solid_fraction"], type=ntype, networks=networks or {})


def test_part_solid_nodule_solid_component_measured():
    shape = (40, 60, 60)
    hu = np.full(shape, -850, np.int16)
    outer = _ball(shape, (20, 30, 30), 10)      # 21 mm ground-glass ball
    core = _ball(shape, (20, 30, 30), 3.5)      # 8 mm solid core
    speck = _ball(shape, (20, 30, 38), 1)       # a separate small solid speck: not the solid component
    hu[outer] = -600
    hu[core | speck] = 20
    ct = _ct(hu)
    # the fraction of solid voxels is low: call it part-solid the way the type heuristic would need
    nd = _nodule(outer, ct, "ground-glass")
    nd.type = "part-solid"
    long_ax, short_ax = lr.solid_component_axes(outer, ct)
    assert 7.0 <= long_ax <= 8.5 and 7.0 <= short_ax <= 8.5  # the core, not core + speck (would be ~ 12 mm)
    rec = lr.assess_nodule(nd, ct)
    assert 20 <= rec["size_mm"] <= 22.5
    assert rec["solid_component_mm"] == lr.mean_diameter_mm(long_ax, short_ax)
    assert rec["category"] == ("4B" if rec["solid_component_mm"] >= 8 else "4A")
    assert rec["rule"] == lr.RULES["partsolid-solid>=8" if rec["category"] == "4B" else "partsolid-solid6-8"]


def test_ground_glass_nodule_without_solid_voxels():
    shape = (30, 50, 50)
    hu = np.full(shape, -850, np.int16)
    ball = _ball(shape, (15, 25, 25), 6)
    hu[ball] = -650
    ct = _ct(hu)
    nd = _nodule(ball, ct, "ground-glass")
    assert lr.solid_component_axes(ball, ct) == (0.0, 0.0)
    rec = lr.assess_nodule(nd, ct)
    assert rec["category"] == "2" and rec["solid_component_mm"] is None
    assert any("no solid component" in n for n in rec["notes"])


def test_calcified_nodule_category_1_and_partial_calcification_only_noted():
    shape = (30, 50, 50)
    hu = np.full(shape, -850, np.int16)
    ball = _ball(shape, (15, 25, 25), 5)
    hu[ball] = 600  # completely calcified granuloma
    ct = _ct(hu)
    rec = lr.assess_nodule(_nodule(ball, ct, "solid"), ct)
    assert rec["category"] == "1" and rec["rule"] == lr.RULES["calcified"]
    # an 11 mm soft-tissue nodule with an eccentric calcification: category from size, a note
    hu[ball] = 30
    hu[_ball(shape, (15, 25, 28), 2)] = 600
    ct = _ct(hu)
    rec = lr.assess_nodule(_nodule(ball, ct, "solid"), ct)
    assert rec["category"] == "4A"
    assert any("calcification present" in n for n in rec["notes"])


def test_4x_is_only_suggested():
    shape = (30, 50, 50)
    hu = np.full(shape, -850, np.int16)
    ball = _ball(shape, (15, 25, 25), 5)
    hu[ball] = 30
    ct = _ct(hu)
    nets = {"dsmtnet": NetworkOutput("dsmtnet", 0.7, {"spiculation": 0.81, "calcification": 0.1})}
    rec = lr.assess_nodule(_nodule(ball, ct, "solid", nets), ct)
    assert rec["category"] == "4A"  # not 4X
    assert len(rec["suggestions"]) == 1 and "4X" in rec["suggestions"][0] and "0.81" in rec["suggestions"][0]
    nets["dsmtnet"].sign_probabilities["spiculation"] = 0.2
    assert lr.assess_nodule(_nodule(ball, ct, "solid", nets), ct)["suggestions"] == []


def test_not_found_nodule_has_no_category():
    assert lr.assess_nodule(NoduleResult(id=1, point_lps_mm=(0, 0, 0), found=False), None) is None


def test_nodule_without_type_gets_no_category_and_is_skipped_per_scan():
    shape = (20, 30, 30)
    hu = np.full(shape, -850, np.int16)
    ball = _ball(shape, (10, 15, 15), 4)
    hu[ball] = 30
    ct = _ct(hu)
    nd = _nodule(ball, ct, "solid")
    nd.type = None
    rec = lr.assess_nodule(nd, ct)
    assert rec["category"] is None and any("no category" in n for n in rec["notes"])
    assert lr.scan_category([(1, rec), (2, {"category": "3"})])["category"] == "3"
    assert lr.scan_category([(1, rec)]) is None
