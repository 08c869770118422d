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
44 mm (84 cm^3).  With the measured mask threshold 0.3 (issue 22) the three grew to 39.5 mm,
153 mm and 87.7 mm (135 cm^3).

The mediastinal rule (``NoduleMTLLib.service.mediastinum``, issue 22 item 7; thresholds chosen on whole
*training* scans by ``training/mediastinum_eval.py``, not on this scan) answers the heart click
"no nodule at this point: the click is in the mediastinum".  Two stay **known failures**
(``xfail(strict=True)``), measured after the rule was fixed: the descending-aorta click (its mask
is a compact 87.7 mm blob with 2 % of it in the lung mask: by size, shape and lung fraction it
looks like the 87 mm adenocarcinoma of Lung-PET-CT-Dx A0002, which must keep its outline, and the
rule refuses only masses >= 10 cm or running along the slices) and the hilar-artery click (the
click lies inside the hole-filled, closed lung mask, 98 % of the mask too: to a lung-mask rule it
is an in-lung finding).  The juxtamediastinal nodules of the same scan (readers' nodules 3 and 4,
13 and 15 mm, beside the anterior mediastinum) are still segmented.  A rule on the lung share of
the mask's surroundings was measured and rejected earlier: 0.08 for the heart mask but 0.27 for
the aorta and 0.26 for the true A0001 adenocarcinoma, which abuts the mediastinum; that
adenocarcinoma's outline is checked in test_cli.py, A0002's in test_one_answer.py and
test_report_outputs.py.

A second signal, measured and not shipped (``mediastinum.CONTINUATION_SIGNAL`` off): the structure
running on past both ends of the mask (``mediastinum.continuation`` >= 0.8, chosen on the training
whole scans), also for in-lung clicks within 15 mm of the mediastinum.  Scored once on these
clicks with the signal on, it still did not refuse them: the aorta's continuation is 0.656, and
the hilar click lies 37 mm from the mediastinum on its slice (continuation 0.405); the
adenocarcinomas measured 0.288 (A0001) and 0.151 (A0002).  Both remain strict xfails.

A third round (``training/mediastinum_eval.py --masses``: 30-80 mm synthetic masses pasted against
the mediastinum of the training / validation scans as clicks the rule must keep, and vessel-shape
signals: tubularity, same-HU surface contact, a tube of the mask's calibre going on past its ends)
found no signal that refuses more mediastinal clicks than the continuation without refusing a
protected one, and the continuation itself refuses one validation mass click (0.867).  Nothing was
turned on, so these clicks were not scored again: the xfails stand on the second round's figures.
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


def _analyze(lidc3, p):
    """The analysis service (every product entry point: CLI, batch, Slicer, worker), default networks."""
    from NoduleMTLLib.service.analysis import ModelCache, analyze

    ct, nets = lidc3
    return analyze(ct, [p], network_ids=DEFAULT_NETWORKS, device="cpu", models=ModelCache(networks=nets)).nodules[0]


def _click(lidc3, ijk):
    return _analyze(lidc3, lidc3[0].image.TransformIndexToPhysicalPoint(ijk))


def _assert_small_or_none(n, where):
    if not n.found:
        assert n.message  # says why nothing was segmented
        assert n.malignancy_probability is None
        return
    # the mask's long axis (one decimal, as reported) before the reported size correction, which
    # rescales the axes of nodules, not the mask (the left-lung vessel: 10.0 mm measured, 10.5 mm
    # reported with DSMT-Net's x1.053; 10.0 mm / 197 mm^3 at the mask threshold 0.2, issue 22)
    d = (n.size_correction or {}).get("measured_long_axis_mm", n.diameter_mm)
    assert round1(d) <= SMALL_MM and n.volume_mm3 <= SMALL_MM3, \
        f"{where}: {d:.1f} mm (reported {n.diameter_mm:.1f} mm), {n.volume_mm3:.0f} mm^3 is not a small mask"


@pytest.mark.slow
@pytest.mark.parametrize("where, ijk", [("small right-lung vessel", (122, 317, 60)),
                                        ("right-lung vessel", (139, 318, 60)),
                                        ("left-lung vessel", (345, 260, 60)),
                                        ("right chest wall (intercostal muscle)", (60, 320, 60))])
def test_vessel_and_chest_wall_clicks_give_a_small_mask_or_none(lidc3, where, ijk):
    _assert_small_or_none(_click(lidc3, ijk), where)


_KNOWN = "known failure (measured): the mediastinal rule does not refuse it ({})"


@pytest.mark.slow
@pytest.mark.parametrize("where, ijk", [
    pytest.param("hilar pulmonary artery", (171, 320, 60), marks=pytest.mark.xfail(
        strict=True, reason=_KNOWN.format("the click lies inside the closed lung mask, 37 mm from the mediastinum; "
                                          "39.5 mm mask, continuation 0.405"))),
    ("heart", (250, 260, 60)),
    pytest.param("descending aorta", (290, 325, 60), marks=pytest.mark.xfail(
        strict=True, reason=_KNOWN.format("a compact 87.7 mm mask: as large and as round as the A0002 adenocarcinoma; "
                                          "continuation 0.656 < 0.8"))),
])
def test_mediastinal_clicks_give_a_small_mask_or_none(lidc3, where, ijk):
    n = _click(lidc3, ijk)
    _assert_small_or_none(n, where)
    if not n.found:
        assert n.message.startswith("no nodule") and all(o.malignancy_probability is None for o in n.networks.values())


@pytest.mark.slow
@pytest.mark.parametrize("nodule", [3, 4])
def test_juxtamediastinal_nodules_are_still_segmented(lidc3, shared_data, nodule):
    """The readers' nodules 3 (13 mm, left, against the anterior mediastinum) and 4 (15 mm, right,
    a few mm from the mediastinal border beside the superior vena cava), clicked at their centre:
    found, and outlined (Dice with the readers' label >= 0.6; measured 0.791 / 0.835 when written)."""
    import csv

    import SimpleITK as sitk

    from NoduleMTLLib.core.metrics import dice

    folder = shared_data / "whole_ct" / "lidc" / "LIDC-IDRI-0003"
    row = next(r for r in csv.DictReader(open(folder / "nodules.csv")) if int(r["nodule"]) == nodule)
    p = tuple(float(row[f"center_lps_{a}"]) for a in "xyz")
    n = _analyze(lidc3, p)
    assert n.found, n.message
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nodules_labels.nrrd"))) == nodule
    d = dice(n.mask_box.to_full(), ref)
    print(f"nodule {nodule}: {n.diameter_mm:.1f} mm, Dice {d:.3f}")
    assert d >= 0.6
