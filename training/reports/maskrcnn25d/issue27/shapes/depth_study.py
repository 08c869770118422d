"""Mass-shape depth threshold: candidates on the six non-test scans (no mass) vs synthetic masses with a candidate on them."""
import json, sys, numpy as np
from pathlib import Path
import SimpleITK as sitk
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp, infer
from training import mass_insertion as mi
SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
DEPTHS = (6.0, 8.0, 10.0, 12.0)
vois = mi.solid_vois(); rng = np.random.default_rng(int(sys.argv[1]))
real = {d: 0 for d in DEPTHS}; syn = {d: 0 for d in DEPTHS}; n = 0
for name in SCANS:
    ct = read_ct(Path("/work/cache/wholescan") / name / "ct.nrrd"); lung = pp.lung_mask_from_ct(ct)
    feet = infer._k_to_feet(ct)
    ext, _ = pp.add_pleural_masses(ct.array, lung, k_to_feet=feet)
    for d in DEPTHS:
        real[d] += len(infer.mass_shape_candidates(ct, ext, feet, depth_mm=d))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path("/work/cache/wholescan") / name / "nodules_labels.nrrd")))
    for _ in range(4):
        sm = mi.paste_mass(ct, lung.mask, labels, vois, rng, name)
        sl = pp.lung_mask_from_ct(sm.ct); f2 = infer._k_to_feet(sm.ct)
        e2, _ = pp.add_pleural_masses(sm.ct.array, sl, k_to_feet=f2)
        n += 1
        hits = {}
        for d in DEPTHS:
            c = infer.mass_shape_candidates(sm.ct, e2, f2, depth_mm=d)
            on = [x for x in c if sm.mask[int(x.centre_ijk[2]), int(x.centre_ijk[1]), int(x.centre_ijk[0])]]
            syn[d] += bool(on); hits[d] = (len(on), len(c) - len(on))
        print(name, sm.record["kind"], sm.record["target_mm"], sm.record["thick_factor"], "tissue %.2f" % (sm.ct.array[sm.mask] >= -300).mean(), hits, flush=True)
print("normal-scan candidates", real, "masses with a candidate", syn, "of", n)
