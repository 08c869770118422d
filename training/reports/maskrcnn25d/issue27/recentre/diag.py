"""Per-slice view of failing synthetic masses: mass area, outline area, inside fraction."""
import json, pickle, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk, torch
torch.set_num_threads(1)
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp
from NoduleMTLLib.detection.infer import load_fpr
from training.evaluate_detection import click_outliner, reported_nodules
from training.mass_insertion import paste_mass, solid_vois
from training.wholescan import default_cache
SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
seed = int(sys.argv[1]); want = [int(x) for x in sys.argv[2].split(",")]; rc = None if sys.argv[3] == "none" else float(sys.argv[3])
cache = Path(default_cache()); fpr, click = load_fpr("cpu"), click_outliner("cpu")
vois = solid_vois(); rng = np.random.default_rng(seed); idx = 0
for name in SCANS:
    ct = read_ct(cache / name / "ct.nrrd"); lung = pp.lung_mask_from_ct(ct).mask
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cache / name / "nodules_labels.nrrd")))
    for _ in range(4):
        sm = paste_mass(ct, lung, labels, vois, rng, name)
        if idx in want:
            sd = pickle.load(open(f"/work/i27/recentre_sd/seed{seed}_{idx:02d}.pkl", "rb"))
            nods = reported_nodules(sd, sm.ct, "default", fpr, "cpu", click, shapes=True, recentre_ml=rc)[1]
            print(f"== mass {idx} {sm.record['kind']} thick {sm.record['thick_factor']} {sm.record['target_mm']} mm")
            # (the slab and mass arrays can be saved here with np.save for viewing)
            for n in nods:
                i0, j0, k0, i1, j1, k1 = n.box_voxel
                if n.mask is None or not (n.mask & sm.mask[k0:k1, j0:j1, i0:i1]).any():
                    continue
                print("nodule", n.accepted_as, round(n.score, 3), "centre", [round(v) for v in n.centre_ijk], "absorbed", n.absorbed)
                for k in range(min(k0, np.flatnonzero(sm.mask.any((1, 2)))[0]), max(k1, np.flatnonzero(sm.mask.any((1, 2)))[-1] + 1)):
                    ma = int(sm.mask[k].sum())
                    oa = int(n.mask[k - k0].sum()) if k0 <= k < k1 else 0
                    if ma == 0 and oa == 0: continue
                    fr = None
                    if ma and oa:
                        yy, xx = np.nonzero(sm.mask[k]); m = n.mask[k - k0]
                        a0, a1 = yy.min() - 10 - j0, yy.max() + 11 - j0; b0, b1 = xx.min() - 10 - i0, xx.max() + 11 - i0
                        fr = round(float(m[max(0, a0):max(0, a1), max(0, b0):max(0, b1)].sum()) / m.sum(), 3)
                        ov = int((m & sm.mask[k, j0:j1, i0:i1]).sum())
                    else:
                        ov = 0
                    hu = float(np.asarray(sm.ct.array[k])[sm.mask[k]].mean()) if ma else None
                    print(f"  k {k}: mass {ma} px, outline {oa} px, overlap {ov}, inside {fr}, mass HU {hu and round(hu)}")
        idx += 1
