import sys, time, numpy as np
from pathlib import Path
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp
for name in sys.argv[1:]:
    ct = read_ct(Path("/work/cache/wholescan")/name/"ct.nrrd")
    lung = pp.lung_mask_from_ct(ct)
    t=time.perf_counter(); ext, ml = pp.add_pleural_masses(ct.array, lung); t2=time.perf_counter()-t
    add = (ext.labels>0) & ~(lung.labels>0)
    zs = np.flatnonzero(add.any(axis=(1,2)))
    print(name, "added %.1f mL"%ml, "slices", (int(zs.min()), int(zs.max()), len(zs)) if len(zs) else None, "t %.1f s"%t2, flush=True)
    np.save(f"/work/i27/add_{name}.npy", np.packbits(add))
