"""``nodulemtl batch --workers N`` / ``--scheduler tcp://HOST:8786``: a batch on Dask distributed.

    nodulemtl batch INPUT --out DIR [--points POINTS_CSV] --workers 2          # LocalCluster, this machine
    nodulemtl batch INPUT --out DIR [--points POINTS_CSV] --scheduler tcp://HOST:8786 [--device cuda]

Without either option (``--workers 1``, the default) the batch runs in this process as before
(:meth:`NoduleMTLLib.apps.batch.BatchRun.run`) and Dask is not imported.  Setting up a cluster:
``docs/cluster.md``.  Dask is the optional ``cluster`` extra (``pip install "nodulemtl[cluster]"``).

How a case runs
    Each case that is not done yet (:meth:`~NoduleMTLLib.apps.batch.BatchRun.precheck`: the local batch's
    resume rule) is one Dask task, :func:`analyse_case`.  On the worker it runs the local batch's own
    per-case code (:meth:`~NoduleMTLLib.apps.batch.BatchRun.run_case`: reading, the analysis service,
    the same output and report writers) into a private scratch folder of the worker, and returns
    the case's files as bytes with its summary row.  The worker keeps one
    :class:`~NoduleMTLLib.service.analysis.ModelCache` per process (:func:`worker_models`), so networks load
    once per worker, not once per case.  With ``--device cuda`` each task asks for
    ``resources={"GPU": 1}``: it runs only on workers started with ``--resources GPU=1``, one task
    per GPU at a time.

Who writes (the design choice)
    The tasks return results and the CLIENT writes them, under the local batch's output-safety rules
    (:class:`~NoduleMTLLib.core.safe_output.OutputSet`: staged beside the case folder and moved in by one
    rename, all or nothing; the batch's folder lock held by the client for the whole run;
    ``summary.csv`` rewritten atomically after every case).  Why not workers writing to a shared
    folder: (1) a worker killed mid-case has then touched nothing in ``--out``, so no half-written
    folder can exist by construction; (2) Dask runs a task *at least* once (a worker that dies after
    finishing, or a re-run while an old task still runs, gives a second execution): only the client
    decides, once per case, what is written; (3) the workers need read access to the inputs only,
    not write access to ``--out`` (the one lock, ``.<out>.nodulemtl-lock``, is an OS file lock,
    which network file systems do not all honour across machines).  The cost: each case's outputs
    (a few MB: label maps, pictures) travel from the worker to the client.

Nothing lost
    * A worker killed mid-case: the scheduler gives its tasks to another worker.  A case whose
      worker died ``distributed.scheduler.allowed-failures`` + 1 times (Dask's setting, default 3)
      is recorded ``failed`` ("worker died ...") and not retried further.
    * The client killed: the case folders written so far are complete (one rename each); running
      the same command again skips them (``done-before``) and computes the rest.
    * A case that fails by itself (unreadable CT, point outside the volume) returns a ``failed``
      row from the worker like in a local run: it is a result, not an error, so Dask never retries
      it.  Missing weights or an unavailable device stop the run, as locally.

Inputs on a cluster
    Workers read the input paths themselves: on several machines the inputs must lie on a file
    system every worker sees under the same path.  Relative input paths are made absolute before
    they are sent (so ``nodules.json``'s ``input.path`` is absolute, the one difference from a
    local run given relative paths).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .batch import BatchError, BatchRun, Case, CaseResult, _one_line

log = logging.getLogger(__name__)

#: Dashboard address of a LocalCluster (``--workers N``): this machine only; another free port if taken.
LOCAL_DASHBOARD = "127.0.0.1:8787"
INSTALL_HINT = "install the cluster extra: pip install 'nodulemtl[cluster]'"


class ClusterError(BatchError):
    """The Dask cluster cannot be used (Dask missing, scheduler unreachable, connection lost)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` and ``--scheduler ADDRESS`` of ``nodulemtl batch`` (mutually exclusive)."""

    def positive(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
        return n

    g = parser.add_mutually_exclusive_group()
    g.add_argument("--workers", type=positive, default=1, metavar="N",
                   help="analyse N cases at a time in N worker processes of a local Dask cluster (default 1: this "
                        "process, no Dask); docs/cluster.md")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run each case as a task on the Dask cluster of this scheduler (e.g. tcp://HOST:8786); the "
                        "inputs must be readable by every worker under the same path; docs/cluster.md")


def wanted(args) -> bool:
    """True if ``args`` (``nodulemtl batch``) ask for a Dask cluster."""
    return bool(getattr(args, "scheduler", None)) or getattr(args, "workers", 1) > 1


# ---------------------------------------------------------------- worker side

_models = None
_models_lock = threading.Lock()


def worker_models():
    """This process's :class:`~NoduleMTLLib.service.analysis.ModelCache` (created on first use): a Dask
    worker keeps its loaded networks between the cases it analyses."""
    global _models
    with _models_lock:
        if _models is None:
            from ..service.analysis import ModelCache
            _models = ModelCache()
        return _models


@dataclass
class CaseTask:
    """What a worker needs for one case: the case (absolute path), its LPS points (mm; empty: whole-scan
    search) and the batch's settings."""

    case: Case
    points: list
    network_ids: tuple
    device: str
    threshold: float | str
    dicom_seg: bool
    report_options: object = None

    def token(self) -> str:
        """A deterministic hash of the task (a re-run asks the scheduler for the same key)."""
        from dask.base import tokenize

        opts = sorted((k, repr(v)) for k, v in vars(self.report_options or argparse.Namespace()).items())
        return tokenize(self.case.name, str(self.case.path), self.case.listed, [tuple(p) for p in self.points],
                        tuple(self.network_ids), self.device, repr(self.threshold), self.dicom_seg, opts)


@dataclass
class CaseOutcome:
    """A task's return value: the summary row, the case folder's files (relative POSIX path -> bytes;
    empty unless ``ok``) and the worker that computed it."""

    result: CaseResult
    files: dict = field(default_factory=dict)
    worker: str = ""


def _scratch_root() -> str:
    try:
        from distributed import get_worker
        return get_worker().local_directory  # removed by Dask with the worker's other files
    except (ImportError, ValueError):
        return tempfile.gettempdir()


def analyse_case(task: CaseTask) -> CaseOutcome:
    """The Dask task of one case (runs on a worker): the local batch's per-case code
    (:meth:`NoduleMTLLib.apps.batch.BatchRun.run_case`) into a scratch folder of the worker, whose
    files are returned and then removed.

    Raises:
        WeightsError, DeviceError: not a problem of this case (the client stops the run).
    """
    from ..core.safe_output import current_set

    scratch = Path(tempfile.mkdtemp(prefix="nodulemtl-case-", dir=_scratch_root()))
    try:
        run = BatchRun([task.case], scratch, {task.case.name: list(task.points)}, task.network_ids, task.device,
                       overwrite=False, dicom_seg=task.dicom_seg, threshold=task.threshold,
                       report_options=task.report_options)
        run._models = worker_models()
        r = run.run_case(task.case)
        files = {}
        folder = scratch / task.case.name
        src = current_set(folder) or folder  # the published set's own folder (linked layout: safe_output)
        if r.status == "ok":
            for p in sorted(src.rglob("*")):
                if p.is_file():
                    files[p.relative_to(src).as_posix()] = p.read_bytes()
        return CaseOutcome(r, files, _worker_name())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


# ---------------------------------------------------------------- client side


def write_case(run: BatchRun, case: Case, outcome: CaseOutcome) -> CaseResult:
    """Write a case's returned files into ``run.out_dir/<case>/`` all or nothing
    (:class:`~NoduleMTLLib.core.safe_output.OutputSet`, as the local batch); an output problem
    becomes a ``failed`` row."""
    from ..core.safe_output import OutputSet, case_dir
    from ..outputs.files import OutputError

    r = outcome.result
    try:
        folder = case_dir(run.out_dir, case.name)
        with OutputSet(folder, inputs=[case.path], overwrite=run.overwrite, lock=False) as outset:
            stage = outset.staging_dir()
            for rel, data in outcome.files.items():
                parts = Path(rel).parts
                if not parts or Path(rel).is_absolute() or ".." in parts:
                    raise OutputError(f"Worker returned an unsafe file name {rel!r} for case {case.name}")
                p = stage.joinpath(*parts)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            outset.commit()
    except OSError as e:  # OutputError included
        r.status, r.message = "failed", _one_line(e)
        r.n_nodules = r.n_found = ""
    return r


def status_line(r: CaseResult) -> str:
    """One line per finished case, e.g. ``A0001: ok (1 nodule(s), 1 found, 12.3 s)``."""
    if r.status == "ok":
        extra = f"{r.n_nodules} nodule(s), {r.n_found} found"
        if isinstance(r.seconds, float):
            extra += f", {r.seconds:.1f} s"
        return f"{r.case}: ok ({extra})" + (f": {r.message}" if r.message else "")
    return f"{r.case}: {r.status}" + (f": {r.message}" if r.message else "")


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise ClusterError(f"--workers / --scheduler need Dask distributed ({e}); {INSTALL_HINT}") from None
    return distributed


def start_client(scheduler: str | None = None, workers: int = 2, device: str = "auto",
                 dashboard_address: str = LOCAL_DASHBOARD, timeout: float = 30.0):
    """A :class:`distributed.Client` of the scheduler at ``scheduler``, or of a new ``LocalCluster``
    of ``workers`` processes (one thread each; each process gets ``cpu_count // workers`` threads
    for torch/OpenMP; with ``device="cuda"`` each offers ``GPU=1``).  Close the client (and
    ``client.cluster`` for a LocalCluster) when done.

    Raises:
        ClusterError: Dask not installed, or the scheduler cannot be reached within ``timeout`` s.
    """
    distributed = _import_distributed()
    import dask

    if scheduler:
        try:
            return distributed.Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterError(f"Cannot reach the Dask scheduler at {scheduler}: {_one_line(e)}") from None
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {f"distributed.nanny.pre-spawn-environ.{k}": threads
           for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with dask.config.set(env):
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=dashboard_address, silence_logs=logging.ERROR,
                                           resources={"GPU": 1} if device == "cuda" else None)
    return distributed.Client(cluster, set_as_default=False)


def run_batch(run: BatchRun, client, on_case: Callable[[int, Case, CaseResult], None] | None = None,
              say: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Run the batch ``run`` on the cluster of ``client`` (see module docstring); returns the
    per-case results in input order, as :meth:`NoduleMTLLib.apps.batch.BatchRun.run` does.  Holds the
    output folder's lock meanwhile and rewrites ``summary.csv`` after every case.

    Raises:
        OutputError / OutputLocked: the output folder cannot be used (nothing submitted).
        WeightsError / DeviceError: raised by a task (the other tasks are cancelled).
        ClusterError: the connection to the scheduler was lost.
    """
    from ..core.safe_output import locked_output_root
    from .batch import SUMMARY_FILE

    with locked_output_root(run.out_dir, stale=(f".{SUMMARY_FILE}.*.tmp",)):
        return _run_cases(run, client, on_case, say or (lambda m: None))


def _run_cases(run: BatchRun, client, on_case, say) -> list[CaseResult]:
    from concurrent.futures import CancelledError

    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from ..core.device import DeviceError
    from ..models.registry import WeightsError
    from .batch import SUMMARY_FILE, points_for, write_summary

    summary = run.out_dir / SUMMARY_FILE
    rows: list[CaseResult] = [CaseResult(c.name, c.listed or str(c.path), "pending") for c in run.cases]
    write_summary(summary, rows)
    _check_workers(client, run.device, say)
    futures = {}
    for i, case in enumerate(run.cases):
        pre = run.precheck(case)
        if pre is not None:
            rows[i] = pre
            if on_case:
                on_case(i, case, pre)
            continue
        sent = Case(case.name, Path(os.path.abspath(case.path)), case.listed)
        task = CaseTask(sent, points_for(case, run.points), run.network_ids, run.device, run.threshold,
                        run.dicom_seg, run.report_options)
        fut = client.submit(analyse_case, task, key=f"nodulemtl-case-{task.token()}", pure=False,
                            resources={"GPU": 1} if run.device == "cuda" else None, retries=0)
        futures[fut] = i
    write_summary(summary, rows)
    try:
        for fut in as_completed(list(futures), loop=client.loop):
            i = futures.pop(fut)
            case = run.cases[i]
            try:
                outcome = fut.result()
            except KilledWorker as e:
                r = CaseResult(case.name, case.listed or str(case.path), "failed",
                               message=f"a Dask worker died each time it analysed this case (crash or out of memory?); "
                                       f"not retried further ({_one_line(e)})")
            except (WeightsError, DeviceError):
                raise
            except CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the task failed outside the per-case code (worker's disk...)
                r = CaseResult(case.name, case.listed or str(case.path), "failed", message=f"task error: {_one_line(e)}")
            else:
                r = write_case(run, case, outcome) if outcome.result.status == "ok" else outcome.result
                if outcome.worker:
                    log.info("case %s computed on %s", case.name, outcome.worker)
            rows[i] = r
            write_summary(summary, rows)
            if on_case:
                on_case(i, case, r)
    except BaseException as e:
        if futures:
            client.cancel(list(futures))
        if isinstance(e, CancelledError):
            raise ClusterError("The Dask scheduler cancelled the batch's tasks (scheduler restarted or connection "
                               "lost); run the same command again to resume") from None
        raise
    return rows


def _check_workers(client, device: str, say) -> None:
    """Warn when no worker can run the tasks yet (they wait until one joins, e.g. a SLURM job starting)."""
    try:
        workers = client.scheduler_info().get("workers", {})
    except Exception:  # noqa: BLE001 - only a warning
        return
    if not workers:
        say("nodulemtl: note: the Dask cluster has no worker yet; tasks wait until workers join")
    elif device == "cuda" and not any((w.get("resources") or {}).get("GPU") for w in workers.values()):
        say("nodulemtl: note: --device cuda: no Dask worker offers the GPU resource (start workers with "
            "--resources GPU=1); tasks wait until one joins")


def main(run: BatchRun, args, on_case=None, say=None) -> list[CaseResult]:
    """``nodulemtl batch --workers N`` / ``--scheduler ADDRESS``: lock the output folder, start or join
    the cluster, print its dashboard address, run the batch, close what was started.

    Raises:
        ClusterError, OutputError, WeightsError, DeviceError: see :func:`run_batch`, :func:`start_client`.
    """
    from ..core.safe_output import locked_output_root
    from .batch import SUMMARY_FILE

    say = say or (lambda m: print(m, file=sys.stderr))
    with locked_output_root(run.out_dir, stale=(f".{SUMMARY_FILE}.*.tmp",)):  # before starting anything
        client = start_client(args.scheduler, args.workers, run.device)
        dlog = logging.getLogger("distributed")
        dlog.setLevel(logging.WARNING)  # a worker lost, memory trouble; not Dask's INFO chatter
        try:
            where = f"scheduler {args.scheduler}" if args.scheduler else f"local cluster of {args.workers} worker processes"
            say(f"nodulemtl: Dask {where}; dashboard: {client.dashboard_link}")
            return _run_cases(run, client, on_case, say)
        finally:
            cluster = None if args.scheduler else client.cluster
            dlog.setLevel(logging.ERROR)  # closing: no "worker still alive, killing" notes
            client.close()
            if cluster is not None:
                cluster.close()
