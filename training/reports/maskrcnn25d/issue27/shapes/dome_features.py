"""components of add_pleural_masses (before the size filter) with dome features, natural scans + synthetic masses."""
import sys, json, numpy as np
from pathlib import Path
from scipy import ndimage as ndi
import SimpleITK as sitk
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp
from training import mass_insertion as mi

def comps(ct, lung, truth=None):
    ext, ml = pp.add_pleural_masses(ct.array, lung, min_ml=0.0)
    add = (ext.labels > 0) & ~(lung.labels > 0)
    d = np.asarray(ct.image.GetDirection()).reshape(3,3)
    feet = -1 if d[2,2] > 0 else 1
    sz, sy, sx = lung.spacing_zyx
    lab, n = ndi.label(add)
    hu = ct.array
    soft_out = (hu >= -300) & (lung.labels == 0) & ~add
    step = max(1, int(round(5.0 / sz)))
    out = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        c = lab[sl] == i + 1
        ml = c.sum() * sz * sy * sx / 1000
        if ml < 2: continue
        # inferior boundary: voxels whose neighbour towards the feet is not in c
        z0, z1 = sl[0].start, sl[0].stop
        big = np.zeros((z1 - z0 + 2*step, c.shape[1], c.shape[2]), bool)
        big[step:-step] = c
        below = np.roll(big, -feet * step, axis=0)[step:-step] if False else None
        ks = np.arange(z0, z1)
        tot = soft = 0
        for a, k in enumerate(ks):
            kb = k + feet * step
            nb = k + feet
            m = c[a]
            if 0 <= nb - z0 < c.shape[0]:
                m = m & ~c[nb - z0]
            if not m.any(): continue
            tot += m.sum()
            if 0 <= kb < hu.shape[0]:
                soft += (soft_out[kb][sl[1], sl[2]] & m).sum()
        rec = {"ml": round(ml,1), "z": (z0, z1), "below_soft": round(soft / max(1, tot), 3)}
        if truth is not None:
            rec["mass_share"] = round(float((c & truth[sl]).sum() / max(1, c.sum())), 3)
        out.append(rec)
    return out, add

mode = sys.argv[1]
if mode == "real":
    for name in sys.argv[2:]:
        ct = read_ct(Path("/work/cache/wholescan")/name/"ct.nrrd"); lung = pp.lung_mask_from_ct(ct)
        o, _ = comps(ct, lung)
        print(name, json.dumps(o), flush=True)
else:
    vois = mi.solid_vois(); rng = np.random.default_rng(int(sys.argv[2]))
    for name in sys.argv[3:]:
        ct = read_ct(Path("/work/cache/wholescan")/name/"ct.nrrd"); lung0 = pp.lung_mask_from_ct(ct).mask
        labels = sitk.GetArrayFromImage(sitk.ReadImage(f"/work/cache/wholescan/{name}/nodules_labels.nrrd"))
        for _ in range(2):
            sm = mi.paste_mass(ct, lung0, labels, vois, rng, name)
            lung = pp.lung_mask_from_ct(sm.ct)
            o, add = comps(sm.ct, lung, sm.mask)
            share0 = float(lung.mask[sm.mask].mean()); share1 = float((lung.mask | add)[sm.mask].mean())
            print(name, sm.record["kind"], sm.record["target_mm"], sm.record["thick_factor"], "share %.2f -> %.2f" % (share0, share1), json.dumps([x for x in o if x.get("mass_share",0)>0.05 or x["ml"]>5]), flush=True)
