"""Pleural masses put back into the detector's input mask (``preprocess.add_pleural_masses``,
issue 27) on real CT: LIDC-IDRI-0003 (whole scan, ``../shared/data/whole_ct``) with training
patients' solid ``lidc_vois`` nodules scaled to 35-70 mm masses and pasted against its pleura
(``training.mass_insertion.paste_mass``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from NoduleMTLLib.detection import preprocess as pp
from training import detection_matching as ev
from training import mass_insertion as mi


def _feet(ct) -> int:
    return 1 if np.asarray(ct.image.GetDirection(), float).reshape(3, 3)[2, 2] < 0 else -1


@pytest.fixture(scope="module")
def scan(shared_data):
    ct, refs = ev.load_lidc_whole_ct_references(shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003")
    return ct, pp.lung_mask_from_ct(ct)


@pytest.fixture(scope="module")
def juxtapleural(scan, shared_data):
    """The first three juxtapleural masses (seeds 0, 1, ...) the lung mask mostly leaves out."""
    ct, lung = scan
    vois = mi.solid_vois(shared_data)
    labels = np.zeros(ct.shape_zyx, np.uint8)
    out = []
    for seed in range(40):
        sm = mi.paste_mass(ct, lung.mask, labels, vois, np.random.default_rng(seed), "LIDC-IDRI-0003")
        if sm.record["kind"] != "juxtapleural":
            continue
        slab_lung = pp.lung_mask_from_ct(sm.ct)
        if slab_lung.mask[sm.mask].mean() >= 0.6:
            continue
        out.append((sm, slab_lung))
        if len(out) == 3:
            break
    assert len(out) == 3
    return out


def test_pasted_pleural_masses_are_put_back_and_nothing_else(juxtapleural):
    gains = []
    for sm, lung in juxtapleural:
        ext, added_ml = pp.add_pleural_masses(sm.ct.array, lung, k_to_feet=_feet(sm.ct))
        assert ext.labels.shape == lung.labels.shape and ext.n_lungs == lung.n_lungs
        assert np.all(ext.labels[lung.mask] == lung.labels[lung.mask])  # the lung itself is unchanged
        add = ext.mask & ~lung.mask
        sx, sy, sz = sm.ct.spacing
        assert add.sum() * sx * sy * sz / 1000.0 == pytest.approx(added_ml, rel=0.35, abs=2.0)  # work-grid volume
        if add.any():
            near_mass = ndi.binary_dilation(sm.mask, iterations=3)
            assert near_mass[add].mean() >= 0.8  # what is added is the mass, not chest wall or mediastinum
            assert added_ml >= pp.MASS_MIN_ML
        gains.append(ext.mask[sm.mask].mean() - lung.mask[sm.mask].mean())
    assert max(gains) >= 0.15  # at least one mass is much more visible to the detector


def test_nothing_is_added_between_the_lungs_or_under_the_bases(scan):
    """On a scan without a mass: no addition in the mediastinum (zone between the lungs) or
    over the liver / spleen domes (the lowest lung slices)."""
    ct, lung = scan
    ext, added_ml = pp.add_pleural_masses(ct.array, lung, k_to_feet=_feet(ct))
    add = ext.mask & ~lung.mask
    zs = np.flatnonzero(lung.mask.any(axis=(1, 2)))
    low = zs[: max(1, len(zs) // 5)] if _feet(ct) == -1 else zs[-max(1, len(zs) // 5):]
    assert not add[low].any()
    zone = np.zeros(add.shape, bool)
    for z in np.flatnonzero(add.any(axis=(1, 2))):
        zone[z] = pp._inter_lung_zone(lung.labels[z], min_run=7)
    assert not (add & zone).any()


def test_inter_lung_zone_and_dome_share_on_label_rows():
    lab = np.zeros((4, 12), np.uint8)
    lab[0, 1:4], lab[0, 8:11] = 1, 2  # both lungs: the gap between them
    lab[1, 1:4] = 1  # one lung only: no zone
    lab[2, 1:4], lab[2, 5], lab[2, 8:11] = 1, 2, 2  # a 1-px airway rim labelled 2
    z = pp._inter_lung_zone(lab, min_run=2)
    assert z[0].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert not z[1].any() and not z[3].any()
    assert z[2, 4:8].all() and not z[2, :4].any()
    # a region over soft tissue towards the feet (index 0) is a dome; over air it is not
    comp = np.zeros((6, 4, 4), np.int32)
    comp[2:5, 1:3, 1:3] = 1
    outside = np.zeros(comp.shape, bool)
    assert pp._dome_share(comp, 1, outside, 1, -1) == 0.0
    outside[1, 1:3, 1:3] = True
    assert pp._dome_share(comp, 1, outside, 1, -1) == 1.0
    assert pp._dome_share(comp, 1, outside, 1, +1) == 0.0


def test_shape_mismatch_is_refused(scan):
    ct, lung = scan
    with pytest.raises(ValueError, match="shape"):
        pp.add_pleural_masses(ct.array[:-1], lung)


# --- masses found by their shape (infer.mass_shape_candidates) ---


@pytest.fixture(scope="module")
def free_mass(scan, shared_data):
    """The first free mass (seeds 0, 1, ...) pasted into LIDC-IDRI-0003, with its slab's lung mask."""
    ct, lung = scan
    vois = mi.solid_vois(shared_data)
    labels = np.zeros(ct.shape_zyx, np.uint8)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        sm = mi.paste_mass(ct, lung.mask, labels, vois, rng, "LIDC-IDRI-0003")
        if sm.record["kind"] == "free":
            return sm, pp.lung_mask_from_ct(sm.ct)
    pytest.fail("no free placement in 60 seeds")


def test_no_mass_shape_on_a_scan_without_a_mass(scan):
    from NoduleMTLLib.detection import infer

    ct, lung = scan
    assert infer.mass_shape_candidates(ct, lung, _feet(ct)) == []


def test_a_pasted_mass_is_a_mass_shape_and_its_outline_decides(free_mass):
    from NoduleMTLLib.detection import infer
    from training.evaluate_detection import click_outliner

    sm, lung = free_mass
    cands = infer.mass_shape_candidates(sm.ct, lung, _feet(sm.ct))
    on = [c for c in cands if sm.mask[tuple(int(v) for v in (c.centre_ijk[2], c.centre_ijk[1], c.centre_ijk[0]))]]
    assert len(on) == 1 and on[0].score == 0.0 and on[0].accepted_as == "mass_shape"
    # judged by its click outline (DSMT-Net, the CLI's click path): a mass, so reported
    kept, outs = infer.outline_with_click(on, sm.ct, click_outliner("cpu"), cut=0.8891, mass_rule=infer.MASS_RULE,
                                          lung=lung, territory_ml=infer.MASS_TERRITORY_ML)
    assert len(kept) == 1 and kept[0].features["volume_ml"] >= infer.MASS_MIN_ML
    assert (kept[0].full_mask(sm.ct.shape_zyx) & sm.mask).sum() >= 0.5 * kept[0].full_mask(sm.ct.shape_zyx).sum()
    # a rule asking for a larger outline than the mass's rejects it: the outline decides, not the shape
    big = infer.MassRule(infer.MASS_MIN_SCORE, kept[0].features["volume_ml"] * 2, -1000.0, 0.0)
    fresh = infer.mass_shape_candidates(sm.ct, lung, _feet(sm.ct))
    fresh = [c for c in fresh if sm.mask[tuple(int(v) for v in (c.centre_ijk[2], c.centre_ijk[1], c.centre_ijk[0]))]]
    assert infer.outline_with_click(fresh, sm.ct, click_outliner("cpu"), cut=0.8891, mass_rule=big, lung=lung)[0] == []
    # without a mass rule (or without an operating point's cut) nothing below the cut is reported
    assert infer.outline_with_click(fresh, sm.ct, click_outliner("cpu"), cut=0.8891, mass_rule=None, lung=lung)[0] == []


def test_one_lung_label_adds_nothing_and_gives_no_shape(scan, juxtapleural):
    """Lungs not separated (one label): the zone between them is unknown, so neither step runs."""
    from NoduleMTLLib.detection import infer

    sm, lung = juxtapleural[0]
    one = pp.LungMask((lung.labels > 0).astype(np.uint8), lung.spacing_zyx, (lung.volume_ml,), 1)
    ext, added = pp.add_pleural_masses(sm.ct.array, one, k_to_feet=_feet(sm.ct))
    assert ext is one and added == 0.0
    assert infer.mass_shape_candidates(sm.ct, one, _feet(sm.ct)) == []
