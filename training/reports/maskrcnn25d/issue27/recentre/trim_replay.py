"""Replay seed-N synthetic masses from pickled slice detections: outline variants at the default."""
import dataclasses, json, pickle, sys, time
from pathlib import Path
import numpy as np, SimpleITK as sitk, torch
from scipy import ndimage as ndi
torch.set_num_threads(1)
from NoduleMTLLib.core.consensus import MaskBox
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp
from NoduleMTLLib.detection.infer import load_fpr, _k_to_feet
from training.evaluate_detection import click_outliner, reported_nodules
from training.mass_insertion import mass_outcome, paste_mass, solid_vois
from training.wholescan import default_cache
SCANS = ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]
seed = int(sys.argv[1]); out = sys.argv[2]
cache = Path(default_cache()); fpr, click0 = load_fpr("cpu"), click_outliner("cpu")
vois = solid_vois(); rng = np.random.default_rng(seed); idx = 0; rows = []

def trimmer(S, ct, mode, margin_mm=5.0, min_share=0.5, min_ml=10.0):
    sx, sy, sz = ct.spacing
    def click(ct_, p):
        o = click0(ct_, p)
        if o is None or o.mask is None:
            return o
        arr = np.asarray(o.mask.array, bool)
        if arr.sum() * sx * sy * sz / 1000 < min_ml:
            return o
        (k0, j0, i0) = o.mask.offset_zyx
        dz, dy, dx = arr.shape
        s = S[k0:k0 + dz, j0:j0 + dy, i0:i0 + dx]
        arr = arr.copy()
        if mode == "clip":
            arr &= s
        else:
            share = [(arr[k] & s[k]).sum() / max(1, arr[k].sum()) for k in range(dz)]
            ok = [k for k in range(dz) if arr[k].any() and share[k] >= min_share]
            if ok:
                arr[:ok[0]] = False; arr[ok[-1] + 1:] = False
        if not arr.any():
            return o
        zz, yy, xx = (np.flatnonzero(arr.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
        mb = MaskBox((k0 + zz[0], j0 + yy[0], i0 + xx[0]), np.ascontiguousarray(arr[zz[0]:zz[-1] + 1, yy[0]:yy[-1] + 1, xx[0]:xx[-1] + 1]), ct.shape_zyx)
        return dataclasses.replace(o, mask=mb)
    return click

for name in SCANS:
    ct = read_ct(cache / name / "ct.nrrd"); lung = pp.lung_mask_from_ct(ct).mask
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cache / name / "nodules_labels.nrrd")))
    for _ in range(4):
        t0 = time.perf_counter()
        sm = paste_mass(ct, lung, labels, vois, rng, name)
        sd = pickle.load(open(f"/work/i27/recentre_sd/seed{seed}_{idx:02d}.pkl", "rb"))
        S = sd.lung.mask
        if (sd.settings or {}).get("pleural_masses_ml"):
            S = pp.add_pleural_masses(sm.ct.array, sd.lung, k_to_feet=_k_to_feet(sm.ct))[0].mask
        sx, sy, sz = sm.ct.spacing
        r = int(round(5.0 / sx)); yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        Sd = ndi.binary_dilation(S, structure=(yy ** 2 + xx ** 2 <= r * r)[None])
        rec = {"i": idx, "scan": name, "kind": sm.record["kind"], "target_mm": sm.record["target_mm"]}
        for mode in ("ends", "clip"):
            for rc in (None, 10.0):
                nods = reported_nodules(sd, sm.ct, "default", fpr, "cpu", trimmer(Sd, sm.ct, mode), shapes=True, recentre_ml=rc)[1]
                rec[f"{mode}|rc={rc}"] = mass_outcome(nods, sm.mask)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(rec); print(json.dumps(rec), flush=True); idx += 1
summary = {k: {"found": sum(r[k]["found"] for r in rows), "one": sum(r[k]["n_on_mass"] == 1 for r in rows),
               "one_inside_80": sum(r[k]["one_inside_80"] for r in rows), "n_elsewhere": sum(r[k]["n_elsewhere"] for r in rows)}
           for k in rows[0] if "|" in k}
print(json.dumps(summary, indent=1)); json.dump({"rows": rows, "summary": summary}, open(out, "w"), indent=1)
