import numpy as np
from NoduleMTLLib.postprocess import measure_nodule

def outline_feats(o, ct, lung):
    if o is None or o.mask is None or not np.asarray(o.mask.array).any():
        return None
    (k0, j0, i0), arr = o.mask.offset_zyx, np.asarray(o.mask.array, bool)
    m = measure_nodule(o.mask, ct)
    sub = lung[k0:k0 + arr.shape[0], j0:j0 + arr.shape[1], i0:i0 + arr.shape[2]]
    nsl = int(arr.any(axis=(1, 2)).sum())
    sx, sy, sz = ct.spacing
    return dict(long_mm=round(m["diameter_mm"], 1), short_mm=round(m["short_axis_mm"], 1), vol_ml=round(m["volume_mm3"] / 1000, 2),
                mean_hu=round(m["mean_hu"], 0), solid=round(m["solid_fraction"], 3), z_mm=round(nsl * sz, 1),
                lung_share=round(float(sub[arr].mean()), 3), zoom=o.zoom)
