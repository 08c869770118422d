import numpy as np
from pathlib import Path
import SimpleITK as sitk
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp
from training import mass_insertion as mi
vois = mi.solid_vois(); rng = np.random.default_rng(1); out = []
for name in ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]:
    ct = read_ct(Path("/work/cache/wholescan") / name / "ct.nrrd"); lung = pp.lung_mask_from_ct(ct).mask
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path("/work/cache/wholescan") / name / "nodules_labels.nrrd")))
    for _ in range(4):
        sm = mi.paste_mass(ct, lung, labels, vois, rng, name)
        out.append((name, sm.record["target_mm"], pp.lung_mask_from_ct(sm.ct).n_lungs))
print(out); print("slabs with one lung label:", sum(n != 2 for _, _, n in out), "of", len(out))
