"""Batch throughput with Dask: cases per minute with 1 and 2 local workers (prints figures; not a test).

    uv run --frozen python Testing/Benchmarks/bench_dask.py [--repeat 1] [--device cpu]

Cases: the four real whole CTs of ``../shared/data/whole_ct`` (LIDC-IDRI-0003 and -0005
``ct.nrrd``, Lung-PET-CT-Dx A0001 NRRD, A0002 DICOM series), each with one clicked nodule
(points CSV, the click path), listed ``--repeat`` times (a list file; the points are keyed by
path so every copy gets its point).  Each configuration is one fresh ``nodulemtl batch``
command into an empty output folder:

* ``local``: the one-process batch (no Dask, torch with every core);
* ``workers=1``: ``--workers 1`` forced through a LocalCluster of 1 worker process;
* ``workers=2``: ``--workers 2``, a LocalCluster of 2 worker processes.

Printed per configuration: the command's wall time (cluster start, model loading in each
worker, every case, shutdown), cases per minute over that wall time, the sum of the per-case
``seconds`` of summary.csv, and the ratios workers=2 / workers=1 and workers=2 / local.  On
a machine with C cores, N workers get C // N torch threads each: the ratio is bounded by C
(2 on a 2-core machine) and lowered by what does not split across processes (each worker
loads its own networks; reading and writing the CTs; other load on the machine).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    return Path(os.environ.get("NODULEMTL_DATA", REPO.parent / "shared" / "data")).resolve()


def build_inputs(root: Path, repeat: int) -> tuple[Path, Path]:
    """cases.txt (each CT ``repeat`` times) and points.csv (one point per CT, LPS, keyed by path)."""
    w = data_dir() / "whole_ct"
    src = root / "in"
    src.mkdir()
    cts = {"LIDC-IDRI-0003.nrrd": w / "lidc/LIDC-IDRI-0003/ct.nrrd", "LIDC-IDRI-0005.nrrd": w / "lidc/LIDC-IDRI-0005/ct.nrrd",
           "A0001.nrrd": w / "lung_pet_ct_dx_A0001.nrrd", "A0002": w / "lung_pet_ct_dx_A0002_dicom"}

    def box(volume):
        rows = sorted((r for r in csv.DictReader(open(w / "lung_pet_ct_dx_boxes.csv")) if r["volume"] == volume),
                      key=lambda r: int(r["slice_index_k"]))
        r = rows[len(rows) // 2]
        return ((float(r["lps_min_x"]) + float(r["lps_max_x"])) / 2, (float(r["lps_min_y"]) + float(r["lps_max_y"])) / 2,
                float(r["lps_z"]))

    def nodule(patient):
        rows = list(csv.DictReader(open(w / "lidc" / patient / "nodules.csv")))
        r = max(rows, key=lambda r: (int(r["n_readers"]), -int(r["nodule"])))
        return tuple(float(r[f"center_lps_{a}"]) for a in "xyz")

    pts = {"LIDC-IDRI-0003.nrrd": nodule("LIDC-IDRI-0003"), "LIDC-IDRI-0005.nrrd": nodule("LIDC-IDRI-0005"),
           "A0001.nrrd": box("lung_pet_ct_dx_A0001.nrrd"), "A0002": box("lung_pet_ct_dx_A0002_dicom")}
    lines, rows = [], []
    for k in range(repeat):
        for name, target in cts.items():
            d = src / f"copy{k}"
            d.mkdir(exist_ok=True)
            os.symlink(target, d / name, target_is_directory=target.is_dir())
            lines.append(str(d / name))
            p = pts[name]
            rows.append(f"{d / name},{p[0]},{p[1]},{p[2]},LPS\n")
    (root / "cases.txt").write_text("\n".join(lines) + "\n")
    (root / "points.csv").write_text("case,x,y,z,frame\n" + "".join(rows))
    return root / "cases.txt", root / "points.csv"


def run(config: str, cases: Path, points: Path, out: Path, device: str) -> dict:
    cmd = [sys.executable, "-m", "NoduleMTLLib.apps.cli", "batch", str(cases), "--out", str(out), "--points", str(points),
           "--device", device, "--quiet"]
    env = dict(os.environ)
    if config == "workers=1":
        # --workers 1 is the one-process batch; force a 1-worker LocalCluster through the library
        cmd = [sys.executable, "-c",
               "import sys; from NoduleMTLLib.apps import cli, cluster; cluster.wanted = lambda a: True; "
               "sys.exit(cli.main(sys.argv[1:]))", *cmd[3:]]
    elif config == "workers=2":
        cmd += ["--workers", "2"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    bad = [x for x in rows if x["status"] != "ok"]
    if r.returncode != 0 or bad:
        raise SystemExit(f"{config}: exit {r.returncode}, not ok: {bad}\n{r.stderr[-2000:]}")
    return {"config": config, "wall_s": wall, "cases": len(rows), "per_min": 60 * len(rows) / wall,
            "case_s": sum(float(x["seconds"]) for x in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="list each of the 4 CTs this many times (default 1)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--configs", default="local,workers=1,workers=2")
    args = ap.parse_args()
    if not (data_dir() / "whole_ct").is_dir():
        print(f"real data not found at {data_dir()} (set NODULEMTL_DATA)", file=sys.stderr)
        return 1
    print(f"{os.cpu_count()} CPU cores (os.cpu_count), load average {os.getloadavg()[0]:.1f} at start; "
          f"device {args.device}; 4 CTs x {args.repeat}")
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        cases, points = build_inputs(Path(tmp), args.repeat)
        for config in args.configs.split(","):
            r = run(config, cases, points, Path(tmp) / f"out-{config.replace('=', '')}", args.device)
            res[config] = r
            print(f"{config:10s} {r['cases']} cases in {r['wall_s']:6.1f} s wall = {r['per_min']:5.2f} cases/min "
                  f"(sum of per-case seconds {r['case_s']:.1f} s)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    if "workers=1" in res and "workers=2" in res:
        print(f"ratio workers=2 / workers=1: {res['workers=2']['per_min'] / res['workers=1']['per_min']:.2f}x")
    if "local" in res and "workers=2" in res:
        print(f"ratio workers=2 / local (no Dask): {res['workers=2']['per_min'] / res['local']['per_min']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
