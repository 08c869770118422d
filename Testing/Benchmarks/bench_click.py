"""Click-to-result benchmark (prints measured figures; not a test).

    uv run --frozen python Testing/Benchmarks/bench_click.py [--threads 2] [--repeats 5]

For each clicked nodule of the sample CT (and the Lung-PET-CT-Dx A0001 mass when the data
folder is present): median wall time of ``analyze_points`` (one network, weights already
loaded, after one warm-up run), the time to load the weights, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--network", default="lnmsnet")
    a = ap.parse_args()
    import torch
    from NoduleMTLLib.io import ras_to_lps, read_ct
    from NoduleMTLLib.pipeline import analyze_points
    from NoduleMTLLib.registry import load_network
    from training.data import default_data_dir

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    nets = {a.network: load_network(a.network, "cpu")}
    t_load = time.perf_counter() - t0
    cases = [("sample nodule 2 (~30 mm)", REPO / "Resources/SampleData/LIDC-IDRI-0003_crop.nrrd", ras_to_lps((-72.5, -77.2, -190.4))),
             ("sample nodule 3 (~13 mm)", REPO / "Resources/SampleData/LIDC-IDRI-0003_crop.nrrd", ras_to_lps((-23.5, 47.6, -172.3)))]
    mass = default_data_dir() / "whole_ct" / "lung_pet_ct_dx_A0001.nrrd"
    if mass.exists():
        cases.append(("A0001 adenocarcinoma (~6 cm)", mass, (40.0, 200.0, -209.0)))
    print(f"device cpu, torch threads {a.threads}, {a.network} weights load {t_load:.2f} s")
    for name, path, p in cases:
        ct = read_ct(path)
        analyze_points(ct, [p], network_ids=(a.network,), device="cpu", networks=nets)  # warm-up
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            r = analyze_points(ct, [p], network_ids=(a.network,), device="cpu", networks=nets)
            ts.append(time.perf_counter() - t)
        n = r.nodules[0]
        print(f"{name}: median {statistics.median(ts):.2f} s (min {min(ts):.2f}, max {max(ts):.2f}, n={a.repeats}); "
              f"found={n.found} diameter={n.diameter_mm and round(n.diameter_mm, 1)} mm")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
