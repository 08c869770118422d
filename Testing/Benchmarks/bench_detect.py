"""Whole-scan nodule search benchmark (``maskrcnn25d``; prints figures, never asserts).

    uv run --frozen python Testing/Benchmarks/bench_detect.py [--threads 2] [--subset 8]
                                                             [--repeats 2] [--random] [--dets 10]
                                                             [--skip-whole] [--skip-options]

1. **Whole scans**: ``detect_nodules`` on the two whole LIDC scans of ``../shared/data/
   whole_ct/lidc`` (512 x 512 x 140 and x 133), each in a fresh Python process, so the
   printed peak RSS (the worker's ``ru_maxrss``) is that scan's alone.  Breakdown: read,
   lung mask, preprocessing (HU window, CLAHE, lung mask, crop), network, merging,
   measurements, total; slices searched, ms per searched slice, nodules found; and the
   projected time of a 300-slice scan like it (per-slice parts x 300 / slices searched).
   LIDC-IDRI-0003 runs again with one lung box for the whole scan (``crop_per_batch``
   off) to show what the per-batch lung box saves.
2. **Speed options** on ``--subset`` mid-lung slices of LIDC-IDRI-0003 (the whole scan's
   lung mask, cropped): per-slice ms (preprocessing + network; median and min of
   ``--repeats`` rounds after a warm-up round, variants interleaved round robin so that
   the machine's other load affects them alike; the projection uses the min) for lung crop
   per batch / per scan / off, batch 1 / 2 / 4 / 8, channels-last on /
   off, 1 / 2 threads, input scale 1 / 0.75 / 0.5 - each varied alone from the default
   (crop on, batch 4, contiguous, ``--threads``, scale 1).  Then the projected time of a
   300-slice scan: lung mask (scaled from the 140-slice scan) + 300 x ms per slice.

Weights: the shipped ``Resources/Weights/maskrcnn25d.safetensors`` when present, else (or
with ``--random``) a randomly initialised narrow model.  Timing does not depend on the
weights except through the number of detections per slice (the mask head runs on every
detection, pasting and merging scale with them): a random model returns
``box_detections_per_img`` (100) near-identical scores on every slice, a worst case, so
with random weights the model is capped at ``--dets`` (default 10) detections per slice
and the figures say so.  The machine's other load (e.g. a training run on the same cores)
inflates every figure: note it beside them.
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

SCANS = ("LIDC-IDRI-0003", "LIDC-IDRI-0005")
#: Mid-lung start slice of the option subset (LIDC-IDRI-0003, lungs k 6-139).
SUBSET_START = 70
TARGET_S, TARGET_RSS_GB = 60.0, 4.0


def _data() -> Path:
    from training.data import default_data_dir

    return Path(default_data_dir())


def _model(random: bool, dets: int):
    """(model, description)."""
    import torch

    from NoduleMTLLib.registry import find_weights, load_network

    if not random:
        try:
            find_weights("maskrcnn25d")
            return load_network("maskrcnn25d", "cpu"), "shipped weights"
        except Exception:  # noqa: BLE001 - not trained / not registered yet
            pass
    from NoduleMTLLib.detection.model import build_maskrcnn25d

    torch.manual_seed(0)
    m = build_maskrcnn25d(backbone="resnet18", box_detections_per_img=dets).eval()
    return m, f"RANDOM weights (narrow ResNet-18-FPN), capped at {dets} detections/slice"


def whole_worker(scan: str, threads: int, random: bool, dets: int, crop_per_batch: bool = True) -> dict:
    """Fresh process: one whole scan, timing breakdown and peak RSS."""
    import torch

    from NoduleMTLLib.detection.infer import detect_nodules
    from NoduleMTLLib.io import read_ct

    torch.set_num_threads(threads)
    model, desc = _model(random, dets)
    t = time.perf_counter()
    ct = read_ct(_data() / "whole_ct" / "lidc" / scan / "ct.nrrd")
    t_read = time.perf_counter() - t
    res = detect_nodules(ct, model=model, device="cpu", crop_per_batch=crop_per_batch)
    r = res.run
    return {"scan": scan, "weights": desc, "shape_zyx": list(ct.shape_zyx), "read_s": t_read,
            "crop_per_batch": r.get("crop_per_batch"), "network_pixels": r.get("network_pixels"),
            "timing_s": r["timing_s"], "n_slices_searched": r["n_slices_searched"],
            "search_box_ijk": r["search_box_ijk"], "n_slice_detections": r["n_slice_detections"],
            "n_nodules": len(res.nodules), "score_threshold": r["score_threshold"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def options_worker(threads: int, subset: int, repeats: int, random: bool, dets: int) -> dict:
    """Fresh process: per-slice cost of each speed option on a mid-lung subset."""
    import torch

    from NoduleMTLLib.detection import preprocess as pp
    from NoduleMTLLib.detection.infer import run_slice_detections
    from NoduleMTLLib.io import CTVolume, read_ct

    torch.set_num_threads(threads)
    model, desc = _model(random, dets)
    ct = read_ct(_data() / "whole_ct" / "lidc" / "LIDC-IDRI-0003" / "ct.nrrd")
    t = time.perf_counter()
    lung = pp.lung_mask_from_ct(ct)
    t_lung = time.perf_counter() - t
    a, b = SUBSET_START, SUBSET_START + subset
    sub = CTVolume(ct.image[:, :, a:b])
    sub_lung = pp.LungMask(lung.labels[a:b], lung.spacing_zyx, lung.volumes_ml, lung.n_lungs)
    base = {"restrict_to_lungs": True, "batch_slices": 4, "channels_last": False, "num_threads": threads,
            "input_scale": 1.0, "crop_per_batch": True}
    variants = [("default (crop per batch, batch 4, contiguous, %d threads, scale 1)" % threads, {}),
                ("one lung box for the scan", {"crop_per_batch": False}),
                ("lung crop off (full 512 x 512)", {"restrict_to_lungs": False}),
                ("batch 1", {"batch_slices": 1}), ("batch 2", {"batch_slices": 2}), ("batch 8", {"batch_slices": 8}),
                ("channels-last", {"channels_last": True}),
                ("1 thread", {"num_threads": 1}), ("2 threads", {"num_threads": 2}),
                ("input scale 0.75", {"input_scale": 0.75}), ("input scale 0.5", {"input_scale": 0.5})]
    variants = [(n, {**base, **c}) for n, c in variants if c.get("num_threads", threads) <= (os.cpu_count() or 1)]
    times: dict[str, list] = {n: [] for n, _ in variants}
    dets_n: dict[str, int] = {}
    # round robin (every variant once per round, first round = warm-up), so a change in the
    # machine's other load hits all variants alike; min and median are reported
    for rep in range(repeats + 1):
        for name, kw in variants:
            t = time.perf_counter()
            sd = run_slice_detections(sub, model, "cpu", lung=sub_lung, **kw)
            total = time.perf_counter() - t
            if kw["channels_last"]:
                model.to(memory_format=torch.contiguous_format)
            if rep:
                times[name].append((total, sd.timing_s["network"], sd.timing_s["preprocess"]))
                dets_n[name] = len(sd.detections)
    n = len(sd.slices_searched)
    rows = []
    for name, _ in variants:
        ts = sorted(times[name])
        med = ts[len(ts) // 2]
        rows.append({"option": name, "ms_per_slice": 1000 * med[0] / n, "network_ms": 1000 * med[1] / n,
                     "preprocess_ms": 1000 * med[2] / n, "min_ms": 1000 * ts[0][0] / n,
                     "max_ms": 1000 * ts[-1][0] / n, "detections": dets_n[name]})
    y0, y1, x0, x1 = sd.crop_yx
    return {"weights": desc, "subset": [a, b], "lung_mask_s_140": t_lung, "crop_hw": [y1 - y0, x1 - x0], "rows": rows}


def _spawn(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--subset", type=int, default=8, help="slices for the option comparison (default 8)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--random", action="store_true", help="random weights even if trained ones are shipped")
    ap.add_argument("--dets", type=int, default=10, help="random weights: detections per slice (default 10)")
    ap.add_argument("--skip-whole", action="store_true")
    ap.add_argument("--skip-options", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        if a.worker[0] == "whole":
            print(json.dumps(whole_worker(a.worker[1], a.threads, a.random, a.dets, a.worker[2:3] != ["scan-crop"])))
        else:
            print(json.dumps(options_worker(a.threads, a.subset, a.repeats, a.random, a.dets)))
        return 0
    common = ["--threads", str(a.threads), "--subset", str(a.subset), "--repeats", str(a.repeats),
              "--dets", str(a.dets)] + (["--random"] if a.random else [])
    print(f"CPU cores: {os.cpu_count()}, torch threads: {a.threads}; load average now: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    whole = []
    if not a.skip_whole:
        print("\n== whole scans (fresh process each) ==")
        runs = [(scan, []) for scan in SCANS] + [(SCANS[0], ["scan-crop"])]
        for scan, extra in runs:
            r = _spawn(["--worker", "whole", scan, *extra, *common])
            whole.append(r)
            t = r["timing_s"]
            n = r["n_slices_searched"]
            crop = "lung box per batch" if r["crop_per_batch"] else "one lung box for the scan"
            print(f"{scan} {tuple(r['shape_zyx'])} [{r['weights']}; {crop}, "
                  f"{r['network_pixels'] / 1e6:.1f} M network pixels]: total {t['total']:.1f} s = read {r['read_s']:.1f} + "
                  f"lung mask {t['lung_mask']:.1f} + preprocessing {t['preprocess']:.1f} + network {t['network']:.1f} + "
                  f"merging {t['merge']:.2f} + measurements {t['measure']:.2f} (+ load {t['load']:.2f}); "
                  f"{n} slices searched, {1000 * (t['preprocess'] + t['network']) / max(n, 1):.0f} ms/slice; "
                  f"{r['n_slice_detections']} slice detections -> {r['n_nodules']} nodules (threshold "
                  f"{r['score_threshold']}); peak RSS {r['peak_rss_mb'] / 1024:.2f} GB")
            nz = r["shape_zyx"][0]
            proj = (t["lung_mask"] * 300 / nz + (t["preprocess"] + t["network"]) * 300 / max(n, 1)
                    + t["merge"] + t["measure"])
            print(f"    projected 300-slice scan like this one (lung mask x 300/{nz} + (preprocessing + network) "
                  f"x 300/{n} + merging + measurements): {proj:.0f} s (target <= {TARGET_S:.0f} s: "
                  f"{'met' if proj <= TARGET_S else 'NOT met'})")
    if not a.skip_options:
        print(f"\n== speed options on {a.subset} mid-lung slices of LIDC-IDRI-0003 (median of {a.repeats}) ==")
        r = _spawn(["--worker", "options", *common])
        print(f"[{r['weights']}] slices k {r['subset'][0]}-{r['subset'][1] - 1}, lung crop {tuple(r['crop_hw'])} px")
        base = r["rows"][0]["min_ms"]
        print("  (median ms/slice of the runs, its network and preprocessing parts; min, max; speed-up of the min vs default)")
        for row in r["rows"]:
            print(f"  {row['option']:<52s} {row['ms_per_slice']:7.0f} ms/slice (network {row['network_ms']:.0f}, "
                  f"preprocessing {row['preprocess_ms']:.0f}; min {row['min_ms']:.0f}, max {row['max_ms']:.0f}) "
                  f"x{base / row['min_ms']:.2f}")
        lung300 = r["lung_mask_s_140"] * 300 / 140
        print(f"\nprojected 300-slice scan (lung mask {lung300:.1f} s + 300 x min ms/slice of these mid-lung slices, "
              f"the widest: an upper bound; merging/measuring extra):")
        for row in r["rows"]:
            proj = lung300 + 300 * row["min_ms"] / 1000
            print(f"  {row['option']:<52s} {proj:6.0f} s  (target <= {TARGET_S:.0f} s: "
                  f"{'met' if proj <= TARGET_S else 'NOT met'})")
    if whole:
        peak = max(w["peak_rss_mb"] for w in whole) / 1024
        print(f"\npeak RSS of a whole-scan run: {peak:.2f} GB (target <= {TARGET_RSS_GB:.0f} GB: "
              f"{'met' if peak <= TARGET_RSS_GB else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
