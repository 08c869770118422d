"""Clicks that are not on a nodule, on real CT (issue 13, "Bad input": vessels, chest wall, mediastinum).

The default configuration (``NoduleMTLLib.DEFAULT_NETWORKS``) must answer a click on a lung
vessel or in the chest wall with "no nodule at this point" or a small mask - never a mask
that fills the structure.  Points: LIDC-IDRI-0003's whole scan (a test-split patient; no
network was trained on it), axial slice k = 60, voxel (i, j) picked on the image: the
highest-HU pixel of the vessel cross-section, intercostal muscle of the right chest wall,
the heart and the descending aorta.  The scan's nodules lie >= 15 slices (37 mm) away.

Measured with DSMT-Net (the default) when these tests were written: small vessels -> no
nodule or a 4-6 mm mask (34-69 mm^3); chest wall -> no nodule; but the hilar pulmonary
artery -> a 24 mm mask (4.1 cm^3), the heart -> 108 mm (498 cm^3), the descending aorta ->
44 mm (84 cm^3).  The last three are **known failures** (``xfail(strict=True)``: the test
turns into a failure, to be un-marked, once they are fixed).  A rule on the lung share of the
mask's surroundings was measured and rejected: 0.08 for the heart mask but 0.27 for the
aorta and 0.26 for the true A0001 adenocarcinoma, which abuts the mediastinum.
"""

from __future__ import annotations

import pytest

from NoduleMTLLib import DEFAULT_NETWORKS
from NoduleMTLLib.clinical.lung_rads import round1

#: Largest long axis (mm) / volume (mm^3) of an "honest small mask" at a non-nodule click:
#: a vessel cross-section or a vessel segment of about one centimetre.
SMALL_MM, SMALL_MM3 = 10.0, 300.0


@pytest.fixture(scope="module")
def lidc3(shared_data):
    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.models.registry import load_network

    ct = read_ct(shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003" / "ct.nrrd")
    return ct, {n: load_network(n, "cpu") for n in DEFAULT_NETWORKS}


def _click(lidc3, ijk):
    from NoduleMTLLib.inference.pipeline import analyze_points

    ct, nets = lidc3
    p = ct.image.TransformIndexToPhysicalPoint(ijk)
    return analyze_points(ct, [p], network_ids=DEFAULT_NETWORKS, device="cpu", networks=nets).nodules[0]


def _assert_small_or_none(n, where):
    if not n.found:
        assert n.message  # says why nothing was segmented
        assert n.malignancy_probability is None
        return
    # the long axis as reported (Lung-RADS: one decimal); a lower mask threshold grows vessel masks
    # (the left-lung vessel measured 10.0 mm / 197 mm^3 at 0.2, issue 22)
    assert round1(n.diameter_mm) <= SMALL_MM and n.volume_mm3 <= SMALL_MM3, \
        f"{where}: {n.diameter_mm:.1f} mm, {n.volume_mm3:.0f} mm^3 is not a small mask"


@pytest.mark.slow
@pytest.mark.parametrize("where, ijk", [("small right-lung vessel", (122, 317, 60)),
                                        ("right-lung vessel", (139, 318, 60)),
                                        ("left-lung vessel", (345, 260, 60)),
                                        ("right chest wall (intercostal muscle)", (60, 320, 60))])
def test_vessel_and_chest_wall_clicks_give_a_small_mask_or_none(lidc3, where, ijk):
    _assert_small_or_none(_click(lidc3, ijk), where)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known failure (measured): the click path segments the whole structure "
                                       "(hilar artery 24 mm, heart 108 mm, descending aorta 44 mm)")
@pytest.mark.parametrize("where, ijk", [("hilar pulmonary artery", (171, 320, 60)), ("heart", (250, 260, 60)),
                                        ("descending aorta", (290, 325, 60))])
def test_mediastinal_clicks_give_a_small_mask_or_none(lidc3, where, ijk):
    _assert_small_or_none(_click(lidc3, ijk), where)
