"""Click-to-result benchmark, per click network and for all of them together (prints figures; not a test).

    uv run --frozen python Testing/Benchmarks/bench_click.py [--threads 2] [--repeats 5]
                                                            [--networks lnmsnet,detguided,...]

For every configuration - each registered click network alone, then all of them together
(one ``analyze_points`` call with every network, which also computes the consensus) - a
fresh Python process loads the weights, then for each case (the two clicked nodules of the
sample CT, and the Lung-PET-CT-Dx A0001 mass when ``../shared/data`` is present) runs one
warm-up analysis and ``--repeats`` timed ones.  Printed: weights load time, the median (min,
max) click-to-result wall time per case, and the configuration's peak RSS (the worker
process's ``ru_maxrss``, so configurations do not inherit each other's peak).  Networks
whose weights are not available (not trained yet) are listed and left out.  Ends with the
target line: all click networks together <= 1 s per nodule on a 2-core CPU (measured on the
two sample nodules; the mass, which needs zoomed-out patches, is shown separately).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SAMPLE = REPO / "Resources/SampleData/LIDC-IDRI-0003_crop.nrrd"
#: (name, CT path, point, frame): sample nodules in RAS (as in the README), the mass in LPS.
CASES = [("sample nodule 2 (~30 mm)", SAMPLE, (-72.5, -77.2, -190.4), "ras"),
         ("sample nodule 3 (~13 mm)", SAMPLE, (-23.5, 47.6, -172.3), "ras")]
MASS = ("A0001 adenocarcinoma (~6 cm)", "whole_ct/lung_pet_ct_dx_A0001.nrrd", (40.0, 200.0, -209.0), "lps")
TARGET_S = 1.0


def worker(networks: list[str], threads: int, repeats: int, tta: bool = False) -> dict:
    """Run in a fresh process: load, warm up, time. Returns the figures as a dict."""
    import torch

    from NoduleMTLLib.core.io import ras_to_lps, read_ct
    from NoduleMTLLib.inference.pipeline import analyze_points
    from NoduleMTLLib.models.registry import load_network
    from training.data import default_data_dir

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    nets = {n: load_network(n, "cpu") for n in networks}
    out = {"networks": networks, "load_s": time.perf_counter() - t0, "cases": []}
    cases = list(CASES)
    mass = default_data_dir() / MASS[1]
    if mass.exists():
        cases.append((MASS[0], mass, MASS[2], MASS[3]))
    for name, path, p, frame in cases:
        ct = read_ct(path)
        pt = ras_to_lps(p) if frame == "ras" else p
        analyze_points(ct, [pt], network_ids=tuple(networks), device="cpu", networks=nets, tta=tta)  # warm-up
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            r = analyze_points(ct, [pt], network_ids=tuple(networks), device="cpu", networks=nets, tta=tta)
            ts.append(time.perf_counter() - t)
        n = r.nodules[0]
        c = n.consensus.to_dict() if n.consensus is not None else {}
        out["cases"].append({"name": name, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                             "found": n.found, "diameter_mm": n.diameter_mm, "disagreement": c.get("disagreement"),
                             "sample": path == SAMPLE})
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def available_click_networks() -> tuple[list[str], dict[str, str]]:
    """Registered click networks with weights present, and {id: reason} for those left out."""
    from NoduleMTLLib.models.registry import NETWORKS, WeightsError, find_weights, verify_weights
    ok, missing = [], {}
    for n in NETWORKS:
        try:
            verify_weights(n, find_weights(n))
            ok.append(n)
        except WeightsError as e:
            missing[n] = str(e).split(":")[0]
    return ok, missing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--networks", default=None, help="comma-separated ids (default: every registered click network with weights)")
    ap.add_argument("--tta", action="store_true", help="left-right flip test-time augmentation (pipeline tta=True)")
    ap.add_argument("--only-together", action="store_true", help="time only the listed networks together, not each alone")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker.split(","), a.threads, a.repeats, a.tta)))
        return
    if a.networks:
        nets, missing = [n.strip() for n in a.networks.split(",") if n.strip()], {}
    else:
        nets, missing = available_click_networks()
    print(f"device cpu, torch threads {a.threads}, {a.repeats} timed runs after 1 warm-up, tta {a.tta}, "
          f"load average {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs visible")
    for n, why in missing.items():
        print(f"left out {n}: {why}")
    configs = ([] if a.only_together else [[n] for n in nets]) + ([nets] if len(nets) > 1 or a.only_together else [])
    together = None
    for cfg in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(cfg), "--threads", str(a.threads),
               "--repeats", str(a.repeats)] + (["--tta"] if a.tta else [])
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            print(f"{'+'.join(cfg)}: failed ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
            continue
        r = json.loads(line[7:])
        label = "all together: " + "+".join(cfg) if len(cfg) > 1 else cfg[0]
        print(f"\n{label}: weights load {r['load_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
        for c in r["cases"]:
            extra = f", consensus disagreement {c['disagreement']}" if len(cfg) > 1 else ""
            print(f"  {c['name']}: median {c['median_s']:.2f} s (min {c['min_s']:.2f}, max {c['max_s']:.2f}); "
                  f"found={c['found']} diameter={c['diameter_mm'] and round(c['diameter_mm'], 1)} mm{extra}")
        if len(cfg) > 1 or len(configs) == 1:
            together = r
    if together:
        worst = max(c["median_s"] for c in together["cases"] if c["sample"])
        mass = [c for c in together["cases"] if not c["sample"]]
        print(f"\ntarget <= {TARGET_S:.0f} s for all networks together ({'+'.join(together['networks'])}): "
              f"measured {worst:.2f} s (slowest median of the two sample nodules)"
              + (f"; 6 cm mass {mass[0]['median_s']:.2f} s" if mass else "")
              + (" - target met" if worst <= TARGET_S else " - target NOT met"))


if __name__ == "__main__":
    main()
