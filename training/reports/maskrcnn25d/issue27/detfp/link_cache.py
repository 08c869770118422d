"""Link the session's slice-detection pickles into evaluate_detection's --detections-cache layout."""
import hashlib, json, os, sys
from pathlib import Path
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.models.registry import DEFAULT_DETECTOR, find_weights, sha256_of
sha = sha256_of(find_weights(DEFAULT_DETECTOR))
out = Path("/work/cache/detfp/evalcache"); out.mkdir(exist_ok=True)
D = Path("/work/shared/data/whole_ct")
paths = {"LIDC-IDRI-0003": D / "lidc/LIDC-IDRI-0003", "LIDC-IDRI-0005": D / "lidc/LIDC-IDRI-0005",
         "LIDC-IDRI-0004": Path("/work/cache/wholescan/LIDC-IDRI-0004"), "LIDC-IDRI-0007": Path("/work/cache/wholescan/LIDC-IDRI-0007"),
         "lung_pet_ct_dx_A0001.nrrd": D / "lung_pet_ct_dx_A0001.nrrd", "lung_pet_ct_dx_A0002_dicom": D / "lung_pet_ct_dx_A0002_dicom"}
for name, p in paths.items():
    src = Path(f"/work/cache/detfp/sd/{name}.pkl")
    if not src.exists():
        print("missing", src); continue
    ct = read_ct(p / "ct.nrrd" if p.is_dir() and (p / "ct.nrrd").exists() else p)
    key = hashlib.sha256(json.dumps({"weights": sha, "search": {"input_scale": 1.0}, "shape": list(ct.shape_zyx)},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    dst = out / f"{name}.{key}.pkl"
    if not dst.exists():
        os.symlink(src, dst)
    print(name, dst)
