"""The mediastinal-click rule (``NoduleMTLLib.service.mediastinum``, issue 22 item 7) on a synthetic chest.

A phantom of 64 slices of 2.5 mm, 200 x 200 pixels of 1.5 mm (300 mm field of view): a soft-tissue
body (40 HU) in air, two aerated lungs (-850 HU) left and right, a "heart" (a 60 mm soft-tissue
ball between them), and a 16 mm solid nodule inside the right lung.  The real-CT clicks (heart,
aorta, hilar artery, juxtamediastinal nodules, the adenocarcinomas) are in test_bad_clicks.py,
test_cli.py and test_report_outputs.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.core.consensus import MaskBox
from NoduleMTLLib.core.io import CTVolume
from NoduleMTLLib.service import mediastinum

SHAPE = (64, 200, 200)
SPACING_XYZ = (1.5, 1.5, 2.5)


def _ball(center_zyx, radius_mm):
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    cz, cy, cx = center_zyx
    return ((z - cz) * SPACING_XYZ[2]) ** 2 + ((y - cy) * SPACING_XYZ[1]) ** 2 + ((x - cx) * SPACING_XYZ[0]) ** 2 \
        <= radius_mm ** 2


@pytest.fixture(scope="module")
def phantom():
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    hu = np.full(SHAPE, -1000, np.int16)
    body = ((y - 100) / 70.0) ** 2 + ((x - 100) / 90.0) ** 2 <= 1
    hu[np.broadcast_to(body, SHAPE)] = 40
    for cx in (55, 145):  # right lung (image left: smaller x, patient right in LPS), left lung
        lung = (((y - 100) / 50.0) ** 2 + ((x - cx) / 32.0) ** 2 <= 1) & (z >= 4) & (z < 60)
        hu[lung] = -850
    heart = _ball((32, 100, 100), 30.0)
    hu[heart] = 40
    nodule = _ball((32, 100, 50), 8.0)
    hu[nodule] = 30
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SPACING_XYZ)
    return CTVolume(img), heart, nodule


def _point(ct, zyx):
    return ct.image.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]])


def test_heart_mask_is_refused_and_nodule_kept(phantom):
    ct, heart, nodule = phantom
    f = mediastinum.mediastinal_features(ct, _point(ct, (32, 100, 100)), MaskBox.from_full(heart))
    assert not f["click_in_lung"] and f["between_lungs"] and f["lung_fraction"] < 0.05
    assert mediastinum.mediastinal_refusal(ct, _point(ct, (32, 100, 100)), MaskBox.from_full(heart), 60.0, 1e5) \
        == mediastinum.MESSAGE
    g = mediastinum.mediastinal_features(ct, _point(ct, (32, 100, 50)), MaskBox.from_full(nodule))
    assert g["click_in_lung"] and g["lung_fraction"] > 0.95  # a nodule inside the lung is in its hole-filled mask
    assert mediastinum.mediastinal_refusal(ct, _point(ct, (32, 100, 50)), MaskBox.from_full(nodule), 16.0, 2100.0) is None


def test_small_masks_and_crops_are_left_alone(phantom):
    ct, heart, _ = phantom
    p = _point(ct, (32, 100, 100))
    small = MaskBox.from_full(_ball((32, 100, 100), 4.0))
    assert mediastinum.mediastinal_refusal(ct, p, small, 8.0, 250.0) is None  # an honest small mask
    # a 90 mm crop (lungs cut by the border: no lung mask can be made) -> no refusal
    crop = sitk.RegionOfInterest(ct.image, [60, 60, 64], [70, 70, 0])
    cct = CTVolume(crop)
    box = MaskBox.from_full(heart[:, 70:130, 70:130])
    assert mediastinum.mediastinal_features(cct, p, box) is None
    assert mediastinum.mediastinal_refusal(cct, p, box, 60.0, 1e5) is None


def test_refused_click_becomes_no_nodule_for_every_network(phantom):
    """The service's step on a click-path result: the heart click is "not found" with the rule's
    message and no network keeps a mask or a probability; the nodule click is untouched."""
    from NoduleMTLLib.core.consensus import compute_consensus
    from NoduleMTLLib.core.postprocess import measure_nodule
    from NoduleMTLLib.core.results import AnalysisResult, NetworkOutput, NoduleResult

    ct, heart, nodule = phantom
    nodules = []
    for i, (m, zyx) in enumerate(((heart, (32, 100, 100)), (nodule, (32, 100, 50))), start=1):
        box = MaskBox.from_full(m)
        n = NoduleResult(id=i, point_lps_mm=_point(ct, zyx), found=True, mask=box, network_masks={"dsmtnet": box},
                         consensus=compute_consensus({"dsmtnet": box}, {"dsmtnet": 0.9}))
        for k, v in measure_nodule(box, ct).items():
            setattr(n, k, v)
        n.networks["dsmtnet"] = NetworkOutput("dsmtnet", 0.9, {"spiculation": 0.5}, 1.0)
        nodules.append(n)
    result = AnalysisResult(input=ct.describe(), run={"mode": "click"}, nodules=nodules)
    assert mediastinum.refuse_mediastinal_clicks(result, ct) == [1]
    a, b = result.nodules
    assert not a.found and a.message == mediastinum.MESSAGE and a.mask_box is None and a.diameter_mm is None
    assert a.networks["dsmtnet"].malignancy_probability is None and a.network_masks == {"dsmtnet": None}
    assert a.consensus.n_found == 0
    assert b.found and b.networks["dsmtnet"].malignancy_probability == 0.9 and b.mask_box is not None
