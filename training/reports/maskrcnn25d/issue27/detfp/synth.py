"""Session driver (detfp): paste scaled-up training lidc_vois nodules (masses 35-70 mm) into
non-test whole scans, search a slab around each, record every candidate (score, outline
features, overlap with the pasted mass) -> /work/cache/detfp/synth/<scan>_<m>.json"""
import json, pickle, sys, time
from pathlib import Path
import numpy as np, SimpleITK as sitk, torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/cache/detfp")
from feat import outline_feats
from NoduleMTLLib.io import CTVolume, read_ct
from NoduleMTLLib.detection.infer import run_slice_detections, select_nodules, load_fpr, load_detector
from training import insertion as ins
from training.evaluate_detection import click_outliner

scans = sys.argv[2:]; M = int(sys.argv[1])
out = Path("/work/cache/detfp/synth"); out.mkdir(exist_ok=True)
model = load_detector("cpu"); fpr = load_fpr("cpu"); click = click_outliner("cpu")
vois = [v for v in ins.load_vois(min_diameter_mm=12.0, max_diameter_mm=30.0) if float(v.hu[v.mask].mean()) > -250]
print(len(vois), "vois", flush=True)
for scan in scans:
    rng = np.random.default_rng(abs(hash(scan)) % 2**32 if False else int(scan[-4:]))
    ct = read_ct(f"/work/cache/wholescan/{scan}/ct.nrrd")
    lab = sitk.GetArrayFromImage(sitk.ReadImage(f"/work/cache/wholescan/{scan}/nodules_labels.nrrd")) > 0
    lung = pickle.load(open(f"/work/cache/detfp/sd/{scan}.pkl", "rb")).lung.labels > 0
    sz, sy, sx = ct.spacing[2], ct.spacing[1], ct.spacing[0]
    area = lung.reshape(len(lung), -1).sum(1)
    for m in range(M):
        f = out / f"{scan}_{m}.json"
        if f.exists():
            continue
        t0 = time.perf_counter()
        target = float(rng.uniform(35, 70))
        thick = bool(rng.random() < 0.5)
        for _ in range(40):
            v = vois[int(rng.integers(len(vois)))]
            nod = ins.transform_voi(v, (sz, sy, sx), target / v.diameter_mm, float(rng.uniform(0, 360)), tuple(rng.random(3) < 0.5))
            zz, yy, xx = np.nonzero(nod.mask)
            hz = (zz.max() - zz.min()) // 2 + 1
            r = 0.5 * max(np.ptp(yy) + 1, np.ptp(xx) + 1) * sy
            ks = np.flatnonzero(area > 0.5 * area.max())
            ks = ks[(ks > hz + 8) & (ks < len(lung) - hz - 8)]
            if not len(ks):
                continue
            k = int(ks[rng.integers(len(ks))])
            kind = "free" if rng.random() < 0.3 else "juxtapleural"
            ji = ins.sample_centre(lung[k], ct.array[k], (sy, sx), r, kind, rng) or ins.sample_centre(lung[k], ct.array[k], (sy, sx), r, "juxtapleural", rng)
            if ji is None:
                continue
            mz, my, mx = (int(round(a.mean())) for a in np.nonzero(nod.mask))
            cz, cy, cx = nod.centre
            centre = (k + cz - mz, ji[0] + cy - my, ji[1] + cx - mx)
            z0, z1 = max(0, k - hz - 10), min(len(lung), k + hz + 11)
            hu = ct.array[z0:z1].astype(np.float32)
            pm = ins.paste_nodule(hu, nod, (centre[0] - z0, centre[1], centre[2]), lung[z0:z1])
            if lung[z0:z1][pm].mean() < 0.5 or (lab[z0:z1] & ndi_dil(pm) if False else lab[z0:z1] & pm).any():
                continue
            break
        else:
            print(scan, m, "no placement", flush=True); continue
        fz = 1
        if thick:
            fz = max(1, int(round(5.0 / sz)))
            n = (hu.shape[0] // fz) * fz
            hu = hu[:n].reshape(-1, fz, *hu.shape[1:]).mean(1)
            pm = pm[:n].reshape(-1, fz, *pm.shape[1:]).mean(1) >= 0.5
        img = sitk.GetImageFromArray(hu)
        img.SetSpacing((sx, sy, sz * fz)); img.SetDirection(ct.image.GetDirection())
        img.SetOrigin(ct.image.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, z0 + (fz - 1) / 2.0]))
        sct = CTVolume(img, source=f"{scan}+mass{m}")
        sd = run_slice_detections(sct, model, "cpu")
        _, cands, _ = select_nodules(sd, sct, "adaptive", fpr, "cpu")
        slung = sd.lung.labels > 0
        rows = []
        clicks = {}
        for ci_, c in enumerate(cands):
            if c.score < 0.6:
                continue
            ci = [int(round(x)) for x in c.centre_ijk]
            on = bool(pm[ci[2], ci[1], ci[0]])
            i0, j0, k0, i1, j1, k1 = c.box_voxel
            ov = float(pm[k0:k1, j0:j1, i0:i1].any())
            row = {"score": round(c.score, 4), "det": round(c.detector_score, 4), "fpr": round(c.fp_reduction_score, 4),
                   "centre_ijk": ci, "det_extent_mm": round(max((c.box_xyxy[2]-c.box_xyxy[0])*sx, (c.box_xyxy[3]-c.box_xyxy[1])*sy), 1),
                   "centre_on_mass": on, "box_touches_mass": bool(ov)}
            o = click(sct, c.centre_lps)
            clicks[tuple(round(v, 3) for v in c.centre_lps)] = o
            fe = outline_feats(o, sct, slung)
            if fe:
                (a0, b0, c0), arr = o.mask.offset_zyx, np.asarray(o.mask.array, bool)
                fe["in_mass"] = round(float(pm[a0:a0+arr.shape[0], b0:b0+arr.shape[1], c0:c0+arr.shape[2]][arr].mean()), 3)
                fe["mass_cover"] = round(float(arr.sum()) / max(1, pm.sum()), 3)
                row.update(fe)
            rows.append(row)
        from NoduleMTLLib.consensus import MaskBox
        pickle.dump({"hu": hu.astype(np.int16), "spacing": sct.spacing, "origin": img.GetOrigin(), "direction": img.GetDirection(),
                     "cands": [c for c in cands if c.score >= 0.6], "clicks": clicks, "pm": MaskBox.from_full(pm), "lung": sd.lung},
                    open(out / f"{scan}_{m}.pkl", "wb"))
        rec = {"scan": scan, "m": m, "voi": nod.source, "target_mm": round(target, 1), "kind": kind, "thick_factor": fz,
               "slice_mm": sz * fz, "mass_ml": round(float(pm.sum()) * sx * sy * sz * fz / 1000, 1),
               "mass_lung_share_slab": round(float(slung[pm].mean()), 3), "n_slices": hu.shape[0],
               "seconds": round(time.perf_counter() - t0, 1), "cands": rows}
        json.dump(rec, open(f, "w"))
        on = [r for r in rows if r["centre_on_mass"] or r["box_touches_mass"]]
        print(scan, m, rec["target_mm"], kind, "f", fz, "ml", rec["mass_ml"], "lungshare", rec["mass_lung_share_slab"], "|",
              [(r["score"], r.get("long_mm"), r.get("in_mass")) for r in on], rec["seconds"], "s", flush=True)
