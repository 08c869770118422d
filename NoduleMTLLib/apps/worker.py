"""A persistent background worker: one child process that keeps its networks loaded.

Starting a child per run costs 20-25 s of ``import torch`` before a 4 s analysis.  The Slicer
module therefore starts one worker on first use (``python -m NoduleMTLLib.apps.worker``, in
Slicer ``PythonSlicer``) and keeps it, with its :class:`~NoduleMTLLib.service.analysis.ModelCache`,
between runs; a second run on the same volume starts computing within a second.

Protocol (:mod:`NoduleMTLLib.apps.protocol`, ``docs/worker-protocol.md``): the parent writes one
:class:`~NoduleMTLLib.apps.protocol.AnalysisRequest` per line on the worker's stdin; the worker
answers on stdout with JSON event lines (progress, message) ending in exactly one ``result`` or
``error`` event.  :func:`execute` runs a request: it reads the CT (and masks), calls the
analysis service (:func:`NoduleMTLLib.service.analysis.analyze` / :func:`~NoduleMTLLib.service.analysis.reclassify`)
with the request's service fields, and writes the outputs all-or-nothing into the request's
``out``.  The worker's stdout carries events only: everything else printed (libraries, warnings)
goes to stderr, a free-form log.  Requests run one at a time; a bad request or a failed
analysis answers an ``error`` event and the worker waits for the next one.

Cancel kills the worker's process group (the only way to stop torch at once); the next run
starts a new worker, and so does a crashed one (:class:`Worker` counts the starts and keeps
the reason of the last stop).  The parent side is :class:`Worker` here, used by
:class:`NoduleMTLLib.apps.runner.Runner` and :class:`NoduleMTLLib.apps.runner.AnalysisProcess`
(``worker=``); no Qt or Slicer import here.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol import AnalysisRequest, Error, Event, Message, Progress, ProtocolError, Result, encode_event

#: Folder holding the ``NoduleMTLLib`` package (put on the worker's ``PYTHONPATH``).
LIBRARY_ROOT = Path(__file__).resolve().parents[2]  # this file is <root>/NoduleMTLLib/apps/worker.py


def execute(request: AnalysisRequest, emit: Callable[[Event], None], models=None) -> Result:
    """Run one request: read the inputs, call the analysis service, write the outputs.

    Args:
        request: a checked :class:`~NoduleMTLLib.apps.protocol.AnalysisRequest`.
        emit: called with each :class:`~NoduleMTLLib.apps.protocol.Progress` /
            :class:`~NoduleMTLLib.apps.protocol.Message` event on the way.
        models: a :class:`~NoduleMTLLib.service.analysis.ModelCache` kept between requests.

    Returns:
        The :class:`~NoduleMTLLib.apps.protocol.Result` event (the outputs are complete in ``request.out``).

    Raises:
        ProtocolError: a field that does not apply to the request's mode.
        InputError, WeightsError, DeviceError, OutputError: as the service and
        :class:`~NoduleMTLLib.core.safe_output.OutputSet` (nothing is left in ``out``).
    """
    from ..core.io import InputError, read_ct
    from ..core.safe_output import OutputSet, visible_entries
    from ..outputs.writer import WriteOptions, write_result_set
    from ..service import analysis

    t0 = time.perf_counter()
    rid = request.request_id
    service = analysis.reclassify if request.mode == "reclassify" else analysis.analyze
    kwargs = request.service_kwargs(service)  # before anything is read: a misplaced field is a bad request

    def progress(fraction, message=""):
        emit(Progress(min(1.0, max(0.0, float(fraction))), " ".join(str(message).split()), rid))

    def notify(text):
        emit(Message(str(text), "warning", rid))

    dicom_seg = request.dicom_seg or request.dicom_sr
    with OutputSet(request.out, inputs=[request.ct, *request.masks], overwrite=request.overwrite) as outset:
        ct = read_ct(request.ct)
        if dicom_seg and ct.dicom_series_uid is None:
            raise InputError(f"{'dicom_sr' if request.dicom_sr else 'dicom_seg'} needs a DICOM series folder as input; "
                             f"{request.ct} is not one")
        if request.mode == "reclassify":
            res = service(ct, _read_masks(request.masks, ct), **kwargs, progress=progress, notify=notify, models=models)
        else:
            res = service(ct, **kwargs, progress=progress, notify=notify, models=models)
        # the one writer: the same result set as ``nodulemtl analyze`` / ``reclassify``
        write_result_set(res, ct, outset, WriteOptions(dicom_seg=dicom_seg, dicom_sr=request.dicom_sr,
                                                       pictures=request.pictures), warn=notify)
    for text in getattr(res, "messages", None) or []:
        emit(Message(str(text), "note", rid))
    out = Path(request.out)
    return Result(out=str(out), files=visible_entries(out), n_nodules=len(res.nodules),
                  n_found=sum(bool(n.found) for n in res.nodules), device=str((res.run or {}).get("device", "")),
                  seconds=round(time.perf_counter() - t0, 3), request_id=rid)


def _read_masks(paths, ct) -> list:
    """Bool (z, y, x) masks of ``paths`` (non-zero voxels), each on the grid of ``ct``. Raises InputError."""
    import SimpleITK as sitk

    from ..core.io import InputError
    from ..core.mask_input import check_same_grid

    masks = []
    for path in paths:
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise InputError(f"Cannot read mask {path}: {' '.join(str(e).split())[:200]}") from None
        check_same_grid(img, ct, str(path))  # size, spacing, origin and direction, not only the shape
        masks.append(sitk.GetArrayFromImage(img) != 0)
    return masks


def handle(line: str, emit: Callable[[Event], None], models=None) -> Event:
    """Answer one request line: its events go to ``emit``, the terminal one is returned too.

    A request that is not valid JSON or breaks the protocol gives an ``error`` event with exit
    code 2; a failing analysis one with the exception's ``exit_code`` (default 1).  Errors
    raised by NoduleMTL itself give their message; any other exception (a bug) also its type,
    with the traceback on stderr.  Never raises (the worker outlives a bad request).
    """
    rid = ""
    try:
        try:
            rid = str((json.loads(line) or {}).get("request_id", ""))
        except Exception:  # noqa: BLE001 - reported by from_json below
            pass
        event = execute(AnalysisRequest.from_json(line), emit, models)
    except ProtocolError as e:
        event = Error(f"Bad request: {e}", "ProtocolError", 2, rid)
    except Exception as e:  # noqa: BLE001
        text = " ".join(str(e).split()) or type(e).__name__
        ours = type(e).__module__.startswith("NoduleMTLLib") or isinstance(e, OSError)
        if not ours:
            traceback.print_exc(file=sys.stderr)
            text = f"{type(e).__name__}: {text}"
        code = getattr(e, "exit_code", 1)
        event = Error(text, type(e).__name__, code if isinstance(code, int) and code else 1, rid)
    emit(event)
    return event


def serve(stdin=None, stdout=None) -> int:
    """The worker's main loop: answer each request line until stdin closes (the parent is gone).

    ``stdout``: where events go (default: the process's real stdout, which is then reserved for
    them: file descriptor 1 and ``sys.stdout`` are pointed at stderr, so nothing else lands there).
    """
    from ..service.analysis import ModelCache

    if stdout is None:
        stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr

    def emit(event: Event) -> None:
        stdout.write(encode_event(event) + "\n")
        stdout.flush()

    models = ModelCache()
    for line in stdin if stdin is not None else sys.stdin:
        if line.strip():
            handle(line, emit, models)
    return 0


def _reader(stream, name: str, q: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, ""):
            q.put((name, raw.rstrip("\r\n")))
    except (OSError, ValueError):  # stream closed under us (kill)
        pass
    finally:
        q.put((name, None))


def _terminate_process_tree(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate ``proc`` and its process group, kill after ``timeout`` s, reap it."""
    if os.name == "posix":
        def signal_group(sig):
            try:
                os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
        signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        signal_group(signal.SIGKILL)  # also any grandchild left in the group
    else:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def child_env(extra: dict | None = None) -> dict:
    """Environment of a child: ours + ``extra``, the library on ``PYTHONPATH``, unbuffered UTF-8 output."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(LIBRARY_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def group_kwargs() -> dict[str, Any]:
    """``Popen`` arguments that give the child its own process group (cancel reaches its children too)."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}


class Worker:
    """Parent side of the worker process.

    Args:
        python_executable: Python that runs the worker (Slicer: ``PythonSlicer``; default
            ``sys.executable``).
        env: extra environment variables.

    Attributes:
        starts: how many times a worker process was started.
        last_exit: set by :meth:`ensure_started` when the previous worker had stopped by
            itself (crash, out of memory): how it ended; "" otherwise (first start, or it
            was killed by a cancel).
    """

    def __init__(self, python_executable: str | None = None, env: dict | None = None):
        self.python_executable = python_executable or sys.executable
        self.extra_env = dict(env or {})
        self.command = [self.python_executable, "-m", "NoduleMTLLib.apps.worker"]
        self.proc: subprocess.Popen | None = None
        self.queue: queue.Queue = queue.Queue()
        self.starts = 0
        self.last_exit = ""
        self._killed = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def ensure_started(self) -> bool:
        """Start the worker unless it runs; True when a process was started now.

        Raises:
            OSError: the Python executable cannot be started.
        """
        if self.alive:
            return False
        self.last_exit = ""
        if self.proc is not None and not self._killed:  # it stopped by itself: say why at the next run
            self.last_exit = _exit_text(self.proc.returncode)
        self._killed = False
        self.queue = queue.Queue()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=child_env(self.extra_env), text=True, encoding="utf-8", errors="replace",
                                     bufsize=1, **group_kwargs())
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            threading.Thread(target=_reader, args=(stream, name, self.queue), daemon=True,
                             name=f"NoduleMTL-worker-{name}").start()
        self.starts += 1
        return True

    def send(self, request: AnalysisRequest) -> None:
        """Hand one request to the worker (one JSON line on its stdin).

        Raises:
            OSError: the worker is gone (broken pipe).
        """
        self.proc.stdin.write(request.to_json() + "\n")
        self.proc.stdin.flush()

    def kill(self, timeout: float = 5.0) -> None:
        """Stop the worker and everything it started (process group), reap it (cancel)."""
        if self.proc is None:
            return
        self._killed = True
        if self.proc.poll() is None:
            _terminate_process_tree(self.proc, timeout)

    def close(self) -> None:
        """End the worker (closing stdin lets it finish; killed after 5 s)."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5.0)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        self.proc = None


def _exit_text(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"stopped by {name}" + (", the system may have run out of memory" if name == "SIGKILL" else "")
    return f"exit code {returncode}"


if __name__ == "__main__":
    sys.exit(serve())
