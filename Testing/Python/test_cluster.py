"""``nodulemtl batch --workers N`` / ``--scheduler`` on real Dask (NoduleMTLLib.apps.cluster), no mocks.

Inputs: the four real whole CTs of ``shared/data/whole_ct`` (LIDC-IDRI-0003 and -0005 ct.nrrd,
Lung-PET-CT-Dx A0001 NRRD, A0002 DICOM series) and a truncated copy of A0001 (corrupt), with a
points CSV (the click path: one reference nodule per CT).  The local batch (no Dask) is the
reference: a LocalCluster of 2 worker processes, and a real ``dask scheduler`` + two
``dask worker`` processes (one SIGKILLed mid-case, then the client SIGKILLed and the command
run again), must give the same outputs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from NoduleMTLLib.apps import batch, cli, cluster
from NoduleMTLLib.apps.reporting import REPORT_FILES
from NoduleMTLLib.core.safe_output import visible_entries
from NoduleMTLLib.outputs.files import OUTPUT_FILES

distributed = pytest.importorskip("distributed")

CASES = ("A0001", "A0002", "LIDC-IDRI-0003", "LIDC-IDRI-0005")
EXPECTED_FILES = sorted(OUTPUT_FILES + REPORT_FILES)


def _box_centre_lps(shared: Path, volume: str) -> tuple[float, float, float]:
    """Centre (LPS mm) of the collection's tumour box on the middle boxed slice."""
    rows = [r for r in csv.DictReader(open(shared / "whole_ct" / "lung_pet_ct_dx_boxes.csv")) if r["volume"] == volume]
    r = sorted(rows, key=lambda r: int(r["slice_index_k"]))[len(rows) // 2]
    return ((float(r["lps_min_x"]) + float(r["lps_max_x"])) / 2, (float(r["lps_min_y"]) + float(r["lps_max_y"])) / 2,
            float(r["lps_z"]))


def _nodule_lps(shared: Path, patient: str) -> tuple[float, float, float]:
    """Centre (LPS mm) of the nodule marked by most readers in a whole LIDC scan."""
    rows = list(csv.DictReader(open(shared / "whole_ct" / "lidc" / patient / "nodules.csv")))
    r = max(rows, key=lambda r: (int(r["n_readers"]), -int(r["nodule"])))
    return tuple(float(r[f"center_lps_{a}"]) for a in "xyz")


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    """in/ with the four CTs (links) and corrupt.nrrd; points.csv (LPS)."""
    root = tmp_path_factory.mktemp("cluster")
    src = root / "in"
    src.mkdir()
    w = shared_data / "whole_ct"
    os.symlink(w / "lidc" / "LIDC-IDRI-0003" / "ct.nrrd", src / "LIDC-IDRI-0003.nrrd")
    os.symlink(w / "lidc" / "LIDC-IDRI-0005" / "ct.nrrd", src / "LIDC-IDRI-0005.nrrd")
    os.symlink(w / "lung_pet_ct_dx_A0001.nrrd", src / "A0001.nrrd")
    os.symlink(w / "lung_pet_ct_dx_A0002_dicom", src / "A0002", target_is_directory=True)
    with open(w / "lung_pet_ct_dx_A0001.nrrd", "rb") as f:
        (src / "corrupt.nrrd").write_bytes(f.read(1_000_000))  # header + part of the gzip stream
    pts = {"A0001": _box_centre_lps(shared_data, "lung_pet_ct_dx_A0001.nrrd"),
           "A0002": _box_centre_lps(shared_data, "lung_pet_ct_dx_A0002_dicom"),
           "LIDC-IDRI-0003": _nodule_lps(shared_data, "LIDC-IDRI-0003"),
           "LIDC-IDRI-0005": _nodule_lps(shared_data, "LIDC-IDRI-0005"), "corrupt": (0.0, 0.0, 0.0)}
    points = root / "points.csv"
    points.write_text("case,x,y,z,frame\n" + "".join(f"{c},{p[0]},{p[1]},{p[2]},LPS\n" for c, p in pts.items()))
    return src, points


def _batch_args(inputs, out: Path, *extra: str) -> list[str]:
    src, points = inputs
    return ["batch", str(src), "--out", str(out), "--points", str(points), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The local batch (one process, no Dask) over the same inputs."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert cli.main(_batch_args(inputs, out, "--quiet")) == 1  # the corrupt file fails
    return out


def _summary(out: Path) -> list[dict]:
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert list(rows[0]) == list(batch.SUMMARY_COLUMNS)
    return rows


def _without_timing(x):
    """nodules.json without the run's timings (the only numbers a run may change)."""
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k != "timing_s"}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


def assert_same_outputs(out: Path, ref: Path) -> None:
    """Same cases, statuses, counts and messages in summary.csv; label maps and nodules.csv
    byte-identical; nodules.json equal apart from timings; nothing else in the folder."""
    got, want = _summary(out), _summary(ref)
    assert [r["case"] for r in got] == [r["case"] for r in want] == [*CASES, "corrupt"]  # each case once, in order
    assert {r["case"]: r["status"] for r in want} == {**dict.fromkeys(CASES, "ok"), "corrupt": "failed"}
    for g, w in zip(got, want):
        assert g["status"] == w["status"] or (g["status"] == "done-before" and w["status"] == "ok"), g
        same = [k for k in batch.SUMMARY_COLUMNS if k not in ("seconds", "status")
                and not (k == "message" and g["status"] == "done-before")]
        assert {k: g[k] for k in same} == {k: w[k] for k in same}
    assert sorted(p.name for p in out.iterdir()) == sorted([*CASES, "summary.csv"])  # no temporary files
    for c in CASES:
        assert visible_entries(out / c) == EXPECTED_FILES
        assert (out / c / "labels.nrrd").read_bytes() == (ref / c / "labels.nrrd").read_bytes(), c
        assert (out / c / "nodules.csv").read_bytes() == (ref / c / "nodules.csv").read_bytes(), c
        js = json.loads((out / c / "nodules.json").read_text())
        assert _without_timing(js) == _without_timing(json.loads((ref / c / "nodules.json").read_text())), c
        assert js["nodules"][0]["found"], c
    corrupt = next(r for r in got if r["case"] == "corrupt")
    assert corrupt["status"] == "failed" and corrupt["message"].startswith("Cannot read")


def test_cluster_options_parse():
    ap = cli.build_parser()
    a = ap.parse_args(["batch", "in", "--out", "o"])
    assert a.workers == 1 and a.scheduler is None and not cluster.wanted(a)
    assert cluster.wanted(ap.parse_args(["batch", "in", "--out", "o", "--workers", "2"]))
    assert cluster.wanted(ap.parse_args(["batch", "in", "--out", "o", "--scheduler", "tcp://127.0.0.1:8786"]))
    for bad in (["--workers", "0"], ["--workers", "two"], ["--workers", "2", "--scheduler", "tcp://h:8786"]):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["batch", "in", "--out", "o", *bad])
        assert e.value.code == 2


def test_unreachable_scheduler_is_a_one_line_error(tmp_path):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(cluster.ClusterError, match=f"Cannot reach the Dask scheduler at tcp://127.0.0.1:{port}") as e:
        cluster.start_client(f"tcp://127.0.0.1:{port}", timeout=2)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 30
    assert issubclass(cluster.ClusterError, batch.BatchError)  # batch.main: "nodulemtl: error: ...", exit 1


@pytest.mark.slow
def test_local_cluster_gives_the_local_batch_outputs(inputs, reference, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(_batch_args(inputs, out, "--workers", "2"))
    assert rc == 1  # the corrupt file
    err = capsys.readouterr().err
    assert "local cluster of 2 worker processes; dashboard: http://127.0.0.1:" in err
    assert "A0002: ok (1 nodule(s), 1 found" in err and "corrupt: failed: Cannot read" in err  # status lines
    assert_same_outputs(out, reference)
    assert all(r["status"] in ("ok", "failed") for r in _summary(out))


# ---------------------------------------------------------------- real scheduler + workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask_cli() -> str:
    exe = Path(sys.executable).parent / "dask"
    if not exe.exists():
        pytest.skip(f"dask command not found beside {sys.executable}")
    return str(exe)


def _wait(cond, timeout: float, what: str, procs=()):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def dask_cluster(tmp_path):
    """A real ``dask scheduler`` and two ``dask worker --no-nanny`` processes on 127.0.0.1 (free
    ports); yields (address, {worker address: Popen}, test client); stops them all."""
    dask = _dask_cli()
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"))]
    client = None
    try:
        for i in range(2):
            procs.append(subprocess.Popen([dask, "worker", addr, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1",
                                           "--no-dashboard", "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}")],
                                          env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                          stderr=open(logs / f"worker{i}.log", "w")))
        client = _wait(lambda: _try_client(addr), 60, "the scheduler", procs)
        _wait(lambda: len(client.scheduler_info()["workers"]) == 2, 120, "two workers", procs)
        by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        yield addr, {by_name[f"w{i}"]: procs[1 + i] for i in range(2)}, client
    finally:
        if client is not None:
            client.close()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _try_client(addr):
    try:
        return distributed.Client(addr, timeout=2, set_as_default=False)
    except (OSError, TimeoutError):
        return None


def _executing(client, worker: str) -> list[str]:
    """Keys of the tasks the worker is executing now."""
    try:
        got = client.run(lambda dask_worker: [str(ts.key) for ts in dask_worker.state.executing], workers=[worker])
    except (OSError, TimeoutError, KeyError):
        return []
    return got.get(worker, [])


def _statuses(out: Path) -> dict[str, str]:
    try:
        return {r["case"]: r["status"] for r in csv.DictReader(open(out / "summary.csv"))}
    except (OSError, KeyError):
        return {}


@pytest.mark.slow
def test_scheduler_worker_killed_then_client_killed_and_rerun(inputs, reference, dask_cluster, tmp_path):
    addr, workers, client = dask_cluster
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "NoduleMTLLib.apps.cli", *_batch_args(inputs, out, "--scheduler", addr)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. a worker SIGKILLed in the middle of a case: its case goes to the other worker
        victim, _ = _wait(lambda: next(((w, k) for w in workers if (k := _executing(client, w))), None),
                             180, "a case to start", [first])
        time.sleep(1.0)  # well inside the case (reading the CT / analysing)
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()
        survivor = next(w for w in workers if w != victim)
        # 2. once a case is written, the client is SIGKILLed too
        _wait(lambda: any(s == "ok" for s in _statuses(out).values()), 300, "a finished case", [first])
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    log1 = first.stdout.read()
    assert "dashboard: http://" in log1
    done1 = {c for c, s in _statuses(out).items() if s == "ok"}
    assert done1 and "pending" in _statuses(out).values(), _statuses(out)
    for c in CASES:  # what is there is complete: no half-written case folder
        if (out / c).exists():
            assert visible_entries(out / c) == EXPECTED_FILES, c
    mtimes = {c: (out / c / "labels.nrrd").stat().st_mtime_ns for c in done1}
    assert list(client.scheduler_info()["workers"]) == [survivor]

    # 3. the same command again: done cases skipped, the rest computed on the surviving worker
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-3000:]  # the corrupt file, recorded once
    s = {r["case"]: r for r in _summary(out)}
    assert {c for c, r in s.items() if r["status"] == "done-before"} == done1
    assert {c: (out / c / "labels.nrrd").stat().st_mtime_ns for c in done1} == mtimes
    assert_same_outputs(out, reference)
    lines = second.stderr.splitlines()  # the bar's redraws end in "\r": their own lines
    assert sum(ln.startswith("corrupt: failed: Cannot read") for ln in lines) == 2  # status line + end-of-run list
    assert not any(k.startswith("nodulemtl-case") for k in map(str, client.processing().get(survivor, [])))
    # the worker process kept its networks loaded between cases (its module-level ModelCache)
    loaded = client.run(lambda: sorted(__import__("NoduleMTLLib.apps.cluster", fromlist=["_models"])._models._networks),
                        workers=[survivor])[survivor]
    assert loaded == [("dsmtnet", "cpu")]
