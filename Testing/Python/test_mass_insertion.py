"""Synthetic masses (training/mass_insertion.py, issue 27) on real data: a training patient's solid
``lidc_vois`` nodule scaled to a 35-70 mm mass and pasted into the whole TRAINING scan
LIDC-IDRI-0006 (``nodulemtl-train wholescan`` cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from NoduleMTLLib.detection import merge as mg
from training import mass_insertion as mi

TRAIN_SCAN = "LIDC-IDRI-0006"  # whole-scan split: train


@pytest.fixture(scope="module")
def pasted(shared_data):
    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.detection import preprocess as pp

    src = Path(os.environ.get("NODULEMTL_CACHE", "/work/cache")) / "wholescan" / TRAIN_SCAN
    if not (src / "ct.nrrd").exists():
        pytest.skip(f"whole training scan cache missing: {src} (nodulemtl-train wholescan)")
    ct = read_ct(src / "ct.nrrd")
    lung = pp.lung_mask_from_ct(ct).mask
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "nodules_labels.nrrd")))
    vois = mi.solid_vois(shared_data)
    sm = mi.paste_mass(ct, lung, labels, vois, np.random.default_rng(3), TRAIN_SCAN)
    return ct, lung, vois, sm


def test_pasted_mass_is_a_solid_mass_in_the_lung_of_a_slab(pasted):
    ct, lung, vois, sm = pasted
    assert vois and all(v.hu[v.mask].mean() > mi.VOI_MIN_MEAN_HU for v in vois)
    r = sm.record
    assert mi.TARGET_MM[0] <= r["target_mm"] <= mi.TARGET_MM[1] and r["kind"] in ("free", "juxtapleural")
    assert sm.mask.shape == sm.ct.shape_zyx and sm.mask.any()
    f = r["thick_factor"]
    assert sm.ct.spacing[2] == pytest.approx(ct.spacing[2] * f) and sm.ct.spacing[:2] == ct.spacing[:2]
    # the slab's first slice sits where the whole scan's slices z0 .. z0 + f - 1 average to
    z0 = r["slab_z0"]
    want = ct.image.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, z0 + (f - 1) / 2.0])
    assert np.allclose(sm.ct.image.GetOrigin(), want)
    hu = np.asarray(sm.ct.array)
    assert hu[sm.mask].mean() > -400  # solid tissue (the source VOIs: > -250 HU; edges blend, thick slices average)
    # at least half of it in the scan's lung (placement rule), measured on the native slices
    n = sm.mask.shape[0]
    native = lung[z0:z0 + n * f].reshape(n, f, *lung.shape[1:]).any(axis=1)
    assert native[sm.mask].mean() >= 0.5
    ext_mm = np.ptp(np.nonzero(sm.mask)[2]) * ct.spacing[0]
    assert ext_mm > 25.0  # mass-sized in-plane


def test_mass_outcome_counts_nodules_and_inside_fractions():
    mask = np.zeros((10, 60, 60), bool)
    mask[2:8, 10:40, 10:40] = True

    def nod(box_voxel, arr):
        i0, j0, k0, i1, j1, k1 = box_voxel
        return mg.MergedNodule(0.9, list(range(k0, k1)), (i0, j0, i1, j1), box_voxel, (0, 0, 0), mask=arr)

    inside = nod((10, 10, 2, 40, 40, 8), np.ones((6, 30, 30), bool))
    leaking = nod((30, 30, 3, 60, 60, 5), np.ones((2, 30, 30), bool))  # 10 px in the box + 10 px margin ...
    away = nod((50, 50, 0, 55, 55, 2), np.ones((2, 5, 5), bool))
    o = mi.mass_outcome([inside], mask)
    assert o == {"found": True, "n_on_mass": 1, "inside": [1.0], "one_inside_80": True, "n_elsewhere": 0}
    o = mi.mass_outcome([inside, leaking, away], mask)
    assert o["n_on_mass"] == 2 and o["n_elsewhere"] == 1 and not o["one_inside_80"]
    assert o["inside"][1] == pytest.approx(20 * 20 / 900, abs=1e-3)  # box + 10 px reaches j, i < 50
    assert mi.mass_outcome([away], mask)["found"] is False


def test_no_mass_is_pasted_into_a_test_scan():
    with pytest.raises(ValueError, match="test / reserved"):
        mi.evaluate_masses(["LIDC-IDRI-0003"])


def test_juxtamediastinal_mass_touches_the_mediastinum(pasted):
    """``placement="juxtamediastinal"`` (the masses ``training/mediastinum_eval.py`` protects): the
    mass lies against the mediastinum of its slices (the opened convex hull of the slice's lung
    minus the lung, as the mediastinal rule defines it), partly in the lung; an unknown placement
    is an error."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    from training.insertion import InsertionError

    ct, lung, vois, _ = pasted
    labels = np.zeros(lung.shape, np.uint8)
    sm = mi.paste_mass(ct, lung, labels, vois, np.random.default_rng(5), TRAIN_SCAN, placement="juxtamediastinal",
                       target_mm=(30.0, 80.0), min_lung_share=0.4)
    r = sm.record
    assert r["kind"] == "juxtamediastinal" and 30.0 <= r["target_mm"] <= 80.0
    f, z0 = r["thick_factor"], r["slab_z0"]
    ks = np.nonzero(sm.mask.any((1, 2)))[0]
    k = int(ks[len(ks) // 2])  # the mass's middle (thick) slice -> its first native slice
    lk = lung[z0 + k * f]
    med = ndi.binary_opening(convex_hull_image(lk) & ~lk, iterations=2)
    dm = ndi.distance_transform_edt(~med, sampling=ct.spacing[1::-1])
    assert dm[sm.mask[k]].min() <= 10.0  # reaches the mediastinum (placement tolerance: 0.1 x radius + 1 pixel)
    with pytest.raises(InsertionError):
        mi.paste_mass(ct, lung, labels, vois, np.random.default_rng(5), TRAIN_SCAN, placement="hilum")


def test_summarise_outcomes_gives_the_recorded_totals():
    """``summarise_outcomes`` reproduces the totals recorded with the multi-scale masses run
    (computed there by the script's own loop), and is empty for no masses."""
    import json

    from training.mass_insertion import summarise_outcomes

    rec = Path(__file__).resolve().parents[2] / "training/reports/maskrcnn25d/issue27/coarse/masses_coarse_seed2.json"
    d = json.loads(rec.read_text())
    assert summarise_outcomes(d["masses"]) == d["summary"]
    assert d["summary"]["default|coarse=none"]["one_inside_80"] == 15
    assert summarise_outcomes([]) == {}
