"""The mediastinal-click rule (``NoduleMTLLib.service.mediastinum``, issue 22 item 7) on synthetic chests.

Phantoms of 64 slices of 2.5 mm, 200 x 200 pixels of 1.5 mm (300 mm field of view): a soft-tissue
body (40 HU) in air, two aerated lungs (-850 HU) left and right with 90 mm of mediastinum between
them, and one soft-tissue object per phantom: a "heart" (an ellipsoid 110 x 80 mm across, 50 mm
high, between the lungs), a "vessel" (a 20 mm tube through every slice, between the lungs), a
40 mm "mass" centred on the medial border of the left lung (half of it in the mediastinum, like
a mass abutting it), or a 16 mm nodule inside the right lung; and two vessels whose mask covers
only a piece (the networks stop while the vessel runs on): an "aorta" segment (a 30 mm tube
through every slice between the lungs, masked on 10 slices: compact, not longer than wide) and a
"hilar" vessel (a 12 mm tube through the lung slices inside the left lung, 10 mm from the
mediastinum, masked on 9 slices: the click is in the hole-filled lung mask).  The real-CT clicks (heart, aorta,
hilar artery, juxtamediastinal nodules, the adenocarcinomas) are in test_bad_clicks.py,
test_cli.py and test_one_answer.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.core.consensus import MaskBox
from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.core.postprocess import measure_nodule
from NoduleMTLLib.service import mediastinum

SHAPE = (64, 200, 200)
SPACING_XYZ = (1.5, 1.5, 2.5)
CENTRE = {"heart": (32, 100, 100), "vessel": (32, 100, 100), "mass": (40, 100, 130), "nodule": (32, 100, 45),
          "aorta": (32, 100, 100), "hilar": (32, 100, 138)}
#: The slices a piece-of-vessel phantom's mask covers (the vessel itself runs through the phantom).
MASKED_Z = {"aorta": (27, 37), "hilar": (28, 37)}


def _object(kind):
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    cz, cy, cx = CENTRE[kind]
    dz, dy, dx = (z - cz) * SPACING_XYZ[2], (y - cy) * SPACING_XYZ[1], (x - cx) * SPACING_XYZ[0]
    if kind == "heart":
        return (dz / 25.0) ** 2 + (dy / 55.0) ** 2 + (dx / 40.0) ** 2 <= 1
    if kind == "vessel":
        return np.broadcast_to(dy ** 2 + dx ** 2 <= 10.0 ** 2, SHAPE)
    if kind == "aorta":
        return np.broadcast_to(dy ** 2 + dx ** 2 <= 15.0 ** 2, SHAPE)
    if kind == "hilar":  # inside the left lung (x 130..180), within the lung's slices
        return (dy ** 2 + dx ** 2 <= 6.0 ** 2) & (z >= 4) & (z < 60)
    return dz ** 2 + dy ** 2 + dx ** 2 <= (20.0 if kind == "mass" else 8.0) ** 2


@functools.cache
def _build(kind):
    """(kind, CTVolume, MaskBox of the object) of the phantom holding ``kind``."""
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    hu = np.full(SHAPE, -1000, np.int16)
    body = ((y - 100) / 75.0) ** 2 + ((x - 100) / 95.0) ** 2 <= 1
    hu[np.broadcast_to(body, SHAPE)] = 40
    for cx in (45, 155):  # right lung (smaller x: patient right in LPS), left lung
        hu[(((y - 100) / 55.0) ** 2 + ((x - cx) / 25.0) ** 2 <= 1) & (z >= 4) & (z < 60)] = -850
    obj = _object(kind)
    hu[obj] = 40
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SPACING_XYZ)
    if kind in MASKED_Z:  # the mask covers a piece of the vessel
        obj = obj.copy()
        z0, z1 = MASKED_Z[kind]
        obj[:z0] = obj[z1:] = False
    return kind, CTVolume(img), MaskBox.from_full(obj)


@pytest.fixture(params=list(CENTRE))
def phantom(request):
    return _build(request.param)


def _point(ct, zyx):
    return ct.image.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]])


@pytest.mark.parametrize("signal", [False, True], ids=["shipped", "continuation-signal-on"])
def test_heart_and_vessel_are_refused_mass_and_nodule_kept(phantom, signal, monkeypatch):
    """As shipped (continuation signal off) the pieces of vessel keep their masks; with the signal
    on they are refused; the heart, the through-running vessel, the mass and the nodule do not depend on it."""
    monkeypatch.setattr(mediastinum, "CONTINUATION_SIGNAL", signal)
    kind, ct, box = phantom
    p = _point(ct, CENTRE[kind])
    m = measure_nodule(box, ct)
    f = mediastinum.mediastinal_features(ct, p, box, mediastinum.continuation(ct, box))
    assert (mediastinum.mediastinal_features(ct, p, box)["continuation"] is None) == (not signal)  # computed only when used
    why = mediastinum.mediastinal_refusal(ct, p, box, m["diameter_mm"], m["volume_mm3"])
    if kind in ("heart", "vessel", "aorta"):
        assert not f["click_in_lung"] and f["between_lungs"] and f["lung_fraction"] < 0.05
        if kind == "aorta":  # compact: refused only because the tube runs on past the mask, not by its shape
            assert not mediastinum.lesion_shape_exceeded(ct, box, m["diameter_mm"])
            assert f["continuation"] >= mediastinum.MIN_CONTINUATION
            assert why == (mediastinum.MESSAGE if signal else None), (m["diameter_mm"], f)
        else:
            assert why == mediastinum.MESSAGE, (kind, m["diameter_mm"], f)
    elif kind == "hilar":  # in the lung mask, next to the mediastinum, running on past the mask
        assert f["click_in_lung"] and f["click_to_mediastinum_mm"] <= mediastinum.HILUM_MM
        assert f["continuation"] == 1.0
        assert why == (mediastinum.MESSAGE if signal else None), (m["diameter_mm"], f)
    elif kind == "mass":  # mostly outside the lung mask, but bounded: keeps its mask
        assert not f["click_in_lung"] and f["lung_fraction"] < mediastinum.MIN_LUNG_FRACTION
        assert f["continuation"] < mediastinum.MIN_CONTINUATION
        assert why is None, (m["diameter_mm"], f)
    else:  # a nodule inside the lung is in its hole-filled lung mask; lung past both its ends
        assert f["click_in_lung"] and f["lung_fraction"] > 0.95 and why is None
        assert f["continuation"] == 0.0


def test_continuation_of_a_piece_of_tube():
    """A piece of a tube continues at both ends (1.0); the same piece with air past one end does
    not (0.0); a mask reaching the CT's first or last slice gives no evidence at that end (0.0:
    a nodule cut by a partial scan must not look like a vessel)."""
    kind, ct, box = _build("vessel")  # the tube's mask runs through every slice
    assert mediastinum.continuation(ct, box) == 0.0
    _, ct, box = _build("aorta")
    assert mediastinum.continuation(ct, box) == 1.0
    hu = sitk.GetArrayFromImage(ct.image)
    hu[MASKED_Z["aorta"][1]:] = -1000  # the tube ends with the mask's last slice
    img = sitk.GetImageFromArray(hu)
    img.CopyInformation(ct.image)
    assert mediastinum.continuation(CTVolume(img), box) == 0.0


def test_continuation_ends_give_the_look_up_slices():
    """``continuation_ends``: a mask through every slice has no look-up slice at either end
    (None, None); the aorta piece has both, each the end slice's mask and a look-up slice of the
    mask box's in-plane shape, and ``continuation`` is the smaller end share in the core's band."""
    _, ct, box = _build("vessel")
    assert mediastinum.continuation_ends(ct, box)[0] == [None, None]
    _, ct, box = _build("aorta")
    ends, (lo, hi) = mediastinum.continuation_ends(ct, box)
    assert lo < hi and all(e is not None for e in ends)
    for sel, hu in ends:
        assert sel.dtype == bool and sel.any() and hu.shape == sel.shape == box.array.shape[1:]
    assert mediastinum.continuation(ct, box) == min(float(((h[s] >= lo) & (h[s] <= hi)).mean()) for s, h in ends)


def test_tube_features_of_a_piece_of_tube_and_of_lesions():
    """``training.mediastinum_eval.tube_features`` (third round, measured there, not shipped):
    the piece of the hilar tube goes on past both ends with its own calibre (continuation 1, end
    tube ratio 1, full end slices); the nodule and the mass end (nothing in their band past their
    ends: ratio 0, tapered end slices); the nodule is wrapped in lung; the heart's and the aorta's
    continuation is the body's soft tissue, which reaches the window's edge (unbounded: this
    phantom has no fat around its vessels); a mask through every slice has no look-up slice
    (unbounded, continuation 0: no evidence)."""
    from training.mediastinum_eval import UNBOUNDED, tube_features

    f = {k: tube_features(*_build(k)[1:]) for k in CENTRE}
    assert f["hilar"]["continuation"] == 1.0 and f["hilar"]["end_tube_ratio"] == pytest.approx(1.0, abs=0.05)
    assert f["hilar"]["end_fill"] == pytest.approx(1.0) and f["hilar"]["roundness"] > 0.9
    for k in ("nodule", "mass"):
        assert f[k]["continuation"] == 0.0 and f[k]["end_tube_ratio"] == 0.0 and f[k]["end_fill"] < 0.2, (k, f[k])
    assert f["nodule"]["lung_contact"] > 0.95 and f["nodule"]["same_hu_contact"] == 0.0
    assert 0.3 < f["mass"]["lung_contact"] < 0.7  # half in the lung, half against the mediastinum
    for k in ("heart", "aorta", "vessel"):
        assert f[k]["end_tube_ratio"] == UNBOUNDED and f[k]["lung_contact"] == 0.0, (k, f[k])
    assert f["vessel"]["continuation"] == 0.0


def test_small_masks_and_crops_are_left_alone():
    kind, ct, box = _build("heart")
    p = _point(ct, CENTRE[kind])
    small = MaskBox.from_full(_ball_mask(CENTRE[kind], 4.0))
    assert mediastinum.mediastinal_refusal(ct, p, small, 8.0, 250.0) is None  # an honest small mask
    # a 90 mm crop (lungs cut by the border: no lung mask can be made) -> no refusal
    cct = CTVolume(sitk.RegionOfInterest(ct.image, [60, 60, 64], [70, 70, 0]))
    cbox = MaskBox.from_full(box.to_full()[:, 70:130, 70:130])
    assert mediastinum.mediastinal_features(cct, p, cbox) is None
    assert mediastinum.mediastinal_refusal(cct, p, cbox, 110.0, 1e5) is None


def _ball_mask(center_zyx, radius_mm):
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    cz, cy, cx = center_zyx
    return ((z - cz) * SPACING_XYZ[2]) ** 2 + ((y - cy) * SPACING_XYZ[1]) ** 2 + ((x - cx) * SPACING_XYZ[0]) ** 2 \
        <= radius_mm ** 2


@pytest.mark.parametrize("which", ["heart", "nodule"])
def test_refused_click_becomes_no_nodule_for_every_network(which):
    """The service's step on a click-path result: the heart click is "not found" with the rule's
    message and no network keeps a mask or a probability; a nodule click is untouched."""
    from NoduleMTLLib.core.consensus import compute_consensus
    from NoduleMTLLib.core.results import AnalysisResult, NetworkOutput, NoduleResult

    kind, ct, box = _build(which)
    n = NoduleResult(id=1, point_lps_mm=_point(ct, CENTRE[kind]), found=True, mask=box, network_masks={"dsmtnet": box},
                     consensus=compute_consensus({"dsmtnet": box}, {"dsmtnet": 0.9}))
    for k, v in measure_nodule(box, ct).items():
        setattr(n, k, v)
    n.networks["dsmtnet"] = NetworkOutput("dsmtnet", 0.9, {"spiculation": 0.5}, 1.0)
    result = AnalysisResult(input=ct.describe(), run={"mode": "click"}, nodules=[n])
    refused = mediastinum.refuse_mediastinal_clicks(result, ct)
    if kind == "nodule":
        assert refused == [] and n.found and n.networks["dsmtnet"].malignancy_probability == 0.9 and n.mask_box is not None
        return
    assert refused == [1]
    assert not n.found and n.message == mediastinum.MESSAGE and n.mask_box is None and n.diameter_mm is None
    assert n.networks["dsmtnet"].malignancy_probability is None and n.network_masks == {"dsmtnet": None}
    assert n.consensus.n_found == 0
