"""Session driver: run_slice_detections once per scan (shipped detector), pickled in evaluate_detection's
--detections-cache layout. No metric computed here."""
import hashlib, json, pickle, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection.infer import run_slice_detections, load_detector
from NoduleMTLLib.models.registry import DEFAULT_DETECTOR, find_weights, sha256_of
sha = sha256_of(find_weights(DEFAULT_DETECTOR))
out = Path("/work/cache/evalcache"); out.mkdir(parents=True, exist_ok=True)
D = Path("/work/shared/data/whole_ct"); W = Path("/work/cache/wholescan")
paths = {n: W / n / "ct.nrrd" for n in ["LIDC-IDRI-0004", "LIDC-IDRI-0007", "LIDC-IDRI-0002", "LIDC-IDRI-0006", "LIDC-IDRI-0008", "LIDC-IDRI-0010"]}
paths.update({"LIDC-IDRI-0003": D / "lidc/LIDC-IDRI-0003/ct.nrrd", "LIDC-IDRI-0005": D / "lidc/LIDC-IDRI-0005/ct.nrrd",
              "lung_pet_ct_dx_A0001.nrrd": D / "lung_pet_ct_dx_A0001.nrrd", "lung_pet_ct_dx_A0002_dicom": D / "lung_pet_ct_dx_A0002_dicom"})
model = load_detector("cpu")
for name in sys.argv[1:]:
    ct = read_ct(paths[name])
    key = hashlib.sha256(json.dumps({"weights": sha, "search": {"input_scale": 1.0}, "shape": list(ct.shape_zyx)},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    f = out / f"{name}.{key}.pkl"
    if f.exists():
        continue
    t = time.perf_counter()
    sd = run_slice_detections(ct, model, "cpu")
    pickle.dump(sd, open(f.with_suffix(".tmp"), "wb")); f.with_suffix(".tmp").rename(f)
    print(name, len(sd.detections), "dets", round(time.perf_counter() - t, 1), "s", flush=True)
