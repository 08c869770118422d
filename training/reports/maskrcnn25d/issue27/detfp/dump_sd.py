"""Session driver (detfp): run_slice_detections once per scan, pickle the SliceDetections.
No metric is computed here (test scans' pickles are evaluated only once, at the end)."""
import pickle, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from NoduleMTLLib.io import read_ct
from NoduleMTLLib.detection.infer import run_slice_detections, load_detector

out = Path("/work/cache/detfp/sd")
out.mkdir(parents=True, exist_ok=True)
model = load_detector("cpu")
for p in sys.argv[1:]:
    name = Path(p).name if not p.endswith("ct.nrrd") else Path(p).parent.name
    f = out / f"{name}.pkl"
    if f.exists():
        continue
    ct = read_ct(p)
    t = time.perf_counter()
    sd = run_slice_detections(ct, model, "cpu")
    pickle.dump(sd, open(f.with_suffix(".tmp"), "wb"))
    f.with_suffix(".tmp").rename(f)
    print(name, len(sd.detections), "dets", round(time.perf_counter() - t, 1), "s", sd.timing_s, flush=True)
