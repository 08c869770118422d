"""Run analyses in a child Python process, with progress, cancel and error text.

Public API for any client (the Slicer module, a web reviewer, scripts):
:class:`Runner` keeps one persistent worker (:mod:`NoduleMTLLib.apps.worker`) and
:meth:`Runner.submit` hands it a typed :class:`~NoduleMTLLib.apps.protocol.AnalysisRequest`; the
returned :class:`Job` yields the request's events (:mod:`NoduleMTLLib.apps.protocol`: progress,
message, then one result or error) by iteration (blocking) or :meth:`Job.poll` (never blocks),
and :meth:`Job.cancel` stops it::

    with Runner() as runner:
        job = runner.submit(AnalysisRequest(mode="analyze", ct="ct.nrrd", out="out", points_lps=[[x, y, z]]))
        for event in job:              # Progress / Message ..., then Result or Error
            print(event)

The Slicer module must never run inference in its GUI thread (issue 5, "Background
processing"; the pattern of SlicerTotalSegmentator / SlicerMONAIAuto3DSeg): it starts
``nodulemtl analyze`` in a child process (``PythonSlicer -m NoduleMTLLib.apps.cli analyze ...``;
outside Slicer ``sys.executable``), polls it from a ``QTimer`` and loads the outputs back
when the child has finished.  This module holds only that child process and has no Qt or
Slicer import, so it is tested with plain pytest (``Testing/Python/test_runner.py``):
:class:`AnalysisProcess` - start, non-blocking :meth:`~AnalysisProcess.poll` returning the
new :class:`~NoduleMTLLib.core.progress.ProgressEvent` s, :meth:`~AnalysisProcess.cancel`
(terminate, then kill the process group; the private work folder is deleted, so nothing
half-written remains), :meth:`~AnalysisProcess.wait`, the one-line error text of a failed
run, and the :class:`~NoduleMTLLib.core.results.AnalysisResult` of a finished run
(:func:`NoduleMTLLib.outputs.files.read_outputs`).

The lines the child prints follow :mod:`NoduleMTLLib.core.progress`; the analysis itself is
:func:`NoduleMTLLib.service.analysis.analyze` inside the child.  Heavy imports (torch, SimpleITK,
slicerio) happen inside the functions that need them, so the module imports in Slicer's GUI
process before torch is installed.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.filenames import JSON_FILE, LABELS_FILE
from ..core.progress import ProgressEvent, error_text_from_stderr, parse_stderr_line, parse_stdout_line
from ..service.analysis import split_networks
from .protocol import TERMINAL, AnalysisRequest, Error, Event, Message, ProtocolError, Result, decode_event
from .worker import Worker, _exit_text, _reader, _terminate_process_tree, child_env, group_kwargs

#: Files a successful ``nodulemtl analyze`` run leaves in its output folder.
REQUIRED_OUTPUTS = (LABELS_FILE, JSON_FILE)

#: Request fields (``options=``) that the per-run child takes too (as command-line arguments;
#: every other option needs the persistent worker).
CHILD_OPTIONS = ("size_corrections",)

#: File in the work folder that carries ``size_corrections`` to a per-run ``nodulemtl reclassify``
#: (its ``--result``: ``{"nodules": [{"id": ..., "size_correction": ...}, ...]}``).
SIZE_CORRECTIONS_FILE = "reported_sizes.json"


def build_command(ct_path: str | os.PathLike, out_dir: str | os.PathLike, points_lps: Sequence[Sequence[float]] | None = None,
                  detect: bool = False, networks: Sequence[str] | str | None = None, device: str = "auto",
                  python_executable: str | None = None, extra_args: Sequence[str] = (), masks: Sequence[str] = (),
                  nodule_ids: Sequence[int] = (), result_json: str | os.PathLike | None = None) -> list[str]:
    """Command line of the child: ``[python, "-m", "NoduleMTLLib.apps.cli", "analyze", CT, ...]``.

    Points are passed as ``--lps --point X Y Z`` (world LPS mm, what
    ``NoduleMTLMRML.markups_to_points_lps`` gives); ``detect`` adds ``--detect`` (whole-scan
    detection, then points are optional).  With ``masks`` (files on the CT grid) the command
    is ``nodulemtl reclassify CT --mask M [--id N] ...`` instead (points optional, one per mask);
    ``result_json`` (re-classify only) adds ``--result FILE``: a ``nodules.json`` whose nodules,
    matched by id, keep the size correction they were reported with while their mask is unchanged.

    Raises:
        ValueError: neither points nor ``detect`` nor masks, no network, a non-finite coordinate,
            or ``result_json`` without masks.
    """
    points = [tuple(float(v) for v in p) for p in (points_lps or [])]
    if masks and (detect or len(points) not in (0, len(masks)) or len(nodule_ids) not in (0, len(masks))):
        raise ValueError("Re-classification takes one mask per nodule (and one point and id per mask, if any)")
    if not points and not detect and not masks:
        raise ValueError("No points given: place one point on each nodule (or use whole-scan detection)")
    if any(len(p) != 3 or not all(math.isfinite(v) for v in p) for p in points):
        raise ValueError(f"Points must be three finite coordinates each: {points}")
    if result_json is not None and not masks:
        raise ValueError("result_json (the reported size corrections) belongs to a re-classification (masks)")
    nets = None if networks is None else split_networks(networks)
    if nets is not None and not nets and not detect:
        raise ValueError("Select at least one network")
    cmd = [python_executable or sys.executable, "-m", "NoduleMTLLib.apps.cli", "reclassify" if masks else "analyze", str(ct_path)]
    for k, mask in enumerate(masks):
        cmd += ["--mask", str(mask)] + (["--id", str(int(nodule_ids[k]))] if nodule_ids else [])
    if result_json is not None:
        cmd += ["--result", str(result_json)]
    if points:
        cmd.append("--lps")
        for p in points:
            cmd += ["--point"] + [repr(v) for v in p]
    if detect:
        cmd.append("--detect")
    if nets is not None:  # None: the CLI's default network; [] with detect: detection only
        cmd += ["--networks", ",".join(nets) or "none"]
    cmd += ["--device", device or "auto", "--out", str(out_dir),
            "--progress-format", "lines"]
    cmd += list(extra_args)
    return cmd



def _poll_until_finished(run, timeout: float | None, callback, interval: float, what: str) -> None:
    """Poll ``run`` (``.poll()`` -> events, ``.finished``) until it ends, passing every event to
    ``callback``; shared by the worker request's and the one-off child's ``wait``.

    Raises:
        TimeoutError: still running after ``timeout`` s (it keeps running).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for event in run.poll():
            if callback is not None:
                callback(event)
        if run.finished:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} is still running after {timeout} s")
        time.sleep(interval)

class Job:
    """One :class:`~NoduleMTLLib.apps.protocol.AnalysisRequest` running in a :class:`~NoduleMTLLib.apps.worker.Worker`.

    Made by :meth:`Runner.submit`.  :attr:`state`: ``running`` -> ``succeeded`` (a ``result``
    event) | ``failed`` (an ``error`` event, also made here when the worker process dies) |
    ``cancelled``.  Iterating yields the events as they come (blocking) and ends after the
    terminal one; :meth:`poll` returns the new ones without blocking.

    Attributes:
        request: the request.  terminal: the ``result`` / ``error`` event once finished.
        stdout_lines / stderr_lines: the raw lines seen (events; the worker's log).
    """

    def __init__(self, worker: Worker, request: AnalysisRequest):
        self.worker, self.request = worker, request
        self.state = "created"
        self.terminal: Result | Error | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._pending: list[Event] = []
        self._queue: queue.Queue | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def start(self) -> Job:
        """Start the worker if needed (a warning ``message`` event when it had died) and send
        the request.  Raises RuntimeError (started twice), OSError (the worker cannot start)."""
        if self.state != "created":
            raise RuntimeError(f"The request was already started (state {self.state})")
        w = self.worker
        if w.ensure_started() and w.last_exit:
            self._pending.append(Message(f"The background worker had stopped ({w.last_exit}) and was started again",
                                         "warning", self.request.request_id))
        self._proc, self._queue = w.proc, w.queue
        self.state = "running"
        try:
            w.send(self.request)
        except OSError as e:  # the worker died before it read the request
            self._worker_died(f"cannot send the request ({e})")
        return self

    def poll(self) -> list[Event]:
        """Events that arrived since the last call (never blocks)."""
        events, self._pending = self._pending, []
        while self.state == "running":
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                if name == "stdout":  # the worker's stdout closed: it died
                    events.append(self._worker_died())
                continue
            if name == "stderr":
                self.stderr_lines.append(line)
                continue
            self.stdout_lines.append(line)
            try:
                event = decode_event(line)
            except ProtocolError:
                continue  # not an event: kept in stdout_lines for the log
            if event.request_id != self.request.request_id:
                continue  # left over from an earlier request
            events.append(event)
            if event.kind in TERMINAL:
                self.terminal = event
                self.state = "succeeded" if event.kind == "result" else "failed"
        return events

    def _worker_died(self, why: str = "") -> Error:
        try:
            rc = self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            rc = None
        text = why or (_exit_text(rc) if rc is not None and rc < 0 else error_text_from_stderr(self.stderr_lines, rc))
        self.terminal = Error(f"The background worker stopped unexpectedly: {text}; the next run starts a new one",
                              "WorkerStopped", rc if isinstance(rc, int) and rc else 1, self.request.request_id)
        self.state = "failed"
        return self.terminal

    def wait(self, timeout: float | None = None, callback: Callable[[Event], None] | None = None,
             interval: float = 0.02) -> Result | Error | None:
        """Block until the request ends; returns the terminal event (None if cancelled).

        Raises:
            TimeoutError: still running after ``timeout`` s (it keeps running).
        """
        _poll_until_finished(self, timeout, callback, interval, "The request")
        return self.terminal

    def load_result(self):
        """The :class:`~NoduleMTLLib.core.results.AnalysisResult` in the succeeded request's output
        folder (:func:`~NoduleMTLLib.outputs.files.read_outputs`; masks on the CT grid).

        Raises:
            RuntimeError: the request did not succeed (the error event's message).
        """
        if not isinstance(self.terminal, Result):
            why = self.terminal.message if isinstance(self.terminal, Error) else self.state
            raise RuntimeError(f"No result: {why}")
        from ..outputs.files import read_outputs

        return read_outputs(self.terminal.out)

    def __iter__(self):
        while True:
            yield from self.poll()
            if self.finished:
                return
            time.sleep(0.02)

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the request at once: the worker's process group is killed (the next request
        starts a new worker).  The request's output folder is never created by a cancelled
        run (outputs are committed at the very end), except when the result was already written."""
        if self.state == "running":
            self.worker.kill(timeout)
        if self.state in ("created", "running"):
            self.state = "cancelled"


class Runner:
    """Run :class:`~NoduleMTLLib.apps.protocol.AnalysisRequest` s in one persistent worker process.

    Args:
        python_executable: Python that runs the worker (Slicer: ``PythonSlicer``; default ``sys.executable``).
        env: extra environment variables of the worker.
        worker: an existing :class:`~NoduleMTLLib.apps.worker.Worker` to use instead.
    """

    def __init__(self, python_executable: str | None = None, env: dict | None = None, worker: Worker | None = None):
        self.worker = worker if worker is not None else Worker(python_executable, env)
        self.job: Job | None = None

    def submit(self, request: AnalysisRequest) -> Job:
        """Start ``request`` (a fresh ``request_id`` is set when empty) and return its :class:`Job`.

        Raises:
            RuntimeError: a request is still running (one at a time).
            OSError: the worker cannot be started.
        """
        if self.job is not None and self.job.running:
            raise RuntimeError("The worker is busy with another request: wait for it or cancel it")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        self.job = Job(self.worker, request).start()
        return self.job

    def run(self, request: AnalysisRequest, timeout: float | None = None,
            callback: Callable[[Event], None] | None = None) -> Result:
        """Submit ``request`` and wait: the ``result`` event.  Raises RuntimeError with the
        error event's message (``.event`` holds it) when it failed, TimeoutError as :meth:`Job.wait`."""
        job = self.submit(request)
        try:
            end = job.wait(timeout, callback)
        except TimeoutError:
            job.cancel()
            raise
        if not isinstance(end, Result):
            err = RuntimeError(end.message if end is not None else "The request was cancelled")
            err.event = end
            raise err
        return end

    def close(self) -> None:
        """End the worker (a running request is stopped)."""
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AnalysisProcess:
    """``nodulemtl analyze`` running in a child process, polled without blocking.

    Life cycle: ``created`` -> :meth:`start` -> ``running`` -> ``succeeded`` | ``failed`` |
    ``cancelled`` (see :attr:`state`).  Everything the child writes lives in a private work
    folder (``work_dir``: the input CT written there when a ``CTVolume`` is given, and the
    output folder ``work_dir/out``); it is deleted on failure, on cancel and by
    :meth:`cleanup`, so a cancelled or failed run leaves no file behind.

    Args:
        ct: a :class:`NoduleMTLLib.core.io.CTVolume` (written to ``work_dir/input.nrrd``, HU and
            LPS geometry kept; what the module does with a volume node) or the path of a CT
            file / DICOM folder (read by the child).
        points_lps: world LPS points (mm), one per nodule; may be empty with ``detect``.
        detect: run whole-scan detection (``--detect``) instead of / besides points.
        networks: network ids, the first one's mask is reported.
        device: ``auto``/``cpu``/``cuda``/``mps`` (the child falls back to the CPU on CUDA OOM).
        python_executable: Python that runs the child (Slicer: ``PythonSlicer``); default
            ``sys.executable``.
        temp_root: folder in which the work folder is created (default: the system temp folder).
        extra_args: more ``nodulemtl analyze`` arguments (per-run child only).
        env: extra environment variables for the child.
        worker: a persistent :class:`~NoduleMTLLib.apps.worker.Worker` to run in (started if
            needed; its networks stay loaded between runs) instead of a new child per run.
            The run is then an :class:`~NoduleMTLLib.apps.protocol.AnalysisRequest` (:attr:`request`,
            a :class:`Job`) instead of a command line; :attr:`pid` is the worker's, cancel
            stops the worker (the next run starts another), and a worker that had stopped by
            itself is restarted with a message.
        options: more request fields (``threshold``, ``patient``, ``pictures``, ...;
            :class:`~NoduleMTLLib.apps.protocol.AnalysisRequest`), checked now; they need ``worker``,
            except :data:`CHILD_OPTIONS`: ``size_corrections`` (re-classify: the size correction
            each mask's nodule was reported with, or None, one per mask), which the per-run
            child gets as ``nodulemtl reclassify --result`` (a file :data:`SIZE_CORRECTIONS_FILE`
            in the work folder, nodules matched by ``nodule_ids``, default 1..N).
        masks, nodule_ids: re-classify these bool (z, y, x) masks on the grid of ``ct`` (a
            ``CTVolume``; written to the work folder) instead of segmenting
            (``nodulemtl reclassify``); ``points_lps`` then optional, one per mask.

    Raises (constructor):
        ValueError: as :func:`build_command` (no points and no detection, no network);
            ``extra_args`` with a worker or ``options`` other than :data:`CHILD_OPTIONS` without one;
            ``size_corrections`` not one per mask;
            :class:`~NoduleMTLLib.apps.protocol.ProtocolError` for a bad option.
    """

    def __init__(self, ct, points_lps: Sequence[Sequence[float]] | None = None, detect: bool = False,
                 networks: Sequence[str] | str | None = None, device: str = "auto", python_executable: str | None = None,
                 temp_root: str | os.PathLike | None = None, extra_args: Sequence[str] = (), env: dict | None = None,
                 worker: Worker | None = None, masks: Sequence | None = None, nodule_ids: Sequence[int] = (),
                 options: dict | None = None):
        self.ct = ct
        self.points_lps = [tuple(float(v) for v in p) for p in (points_lps or [])]
        self.detect = bool(detect)
        self.networks = None if networks is None else split_networks(networks)
        self.device = device or "auto"
        self.python_executable = python_executable or sys.executable
        self.temp_root = temp_root
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.worker = worker
        self.masks = list(masks or [])
        self.nodule_ids = [int(n) for n in nodule_ids]
        self.options = dict(options or {})
        self.request: AnalysisRequest | None = None
        self._job: Job | None = None
        self._events: list[ProgressEvent] = []
        self._last_message = ""
        # validate now (ValueError before anything is started)
        build_command("CT", "OUT", self.points_lps, self.detect, self.networks, self.device, self.python_executable,
                      masks=[f"MASK{k}" for k in range(len(self.masks))], nodule_ids=self.nodule_ids)
        if worker is not None and self.extra_args:
            raise ValueError("extra_args are command-line arguments of the per-run child: give options= with a worker")
        if worker is None and set(self.options) - set(CHILD_OPTIONS):
            raise ValueError(f"options= other than {', '.join(CHILD_OPTIONS)} are request fields of the worker: "
                             "give worker= (or extra_args for the per-run child)")
        corrections = self.options.get("size_corrections")
        if corrections is not None and len(corrections) != len(self.masks):
            raise ValueError(f"size_corrections: one per mask ({len(corrections)} for {len(self.masks)} masks)")
        if worker is not None or self.options:
            self._request("CT", "OUT", [f"MASK{k}" for k in range(len(self.masks))])  # checks the options

        self.state = "created"
        self.work_dir: Path | None = None
        self.command: list[str] = []
        self.progress = 0.0
        self.message = ""
        self.error_text = ""
        self.returncode: int | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._open_streams = 0
        self._cancel_requested = False
        self._result = None

    # --- properties -----------------------------------------------------------

    @property
    def out_dir(self) -> Path | None:
        """Output folder of the child (inside the work folder)."""
        return None if self.work_dir is None else self.work_dir / "out"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @property
    def seconds(self) -> float | None:
        """Wall-clock seconds from start to end (or to now while running)."""
        if self.started_at is None:
            return None
        return (self.finished_at or time.monotonic()) - self.started_at

    @property
    def details(self) -> str:
        """Command line (and request) and everything the child printed (for the log / a details box)."""
        head = ["$ " + " ".join(self.command)] + ([f"request: {self.request.to_json()}"] if self.request is not None else [])
        return "\n".join([*head, *self.stdout_lines, *self.stderr_lines])

    # --- control --------------------------------------------------------------

    def start(self) -> AnalysisProcess:
        """Write the input (if a CTVolume was given) and start the child. Returns self.

        Raises:
            RuntimeError: already started.
            OSError: the work folder or input file cannot be written, or the Python
                executable cannot be started (the work folder is removed again).
        """
        if self.state != "created":
            raise RuntimeError(f"The analysis was already started (state {self.state})")
        self.work_dir = Path(tempfile.mkdtemp(prefix="NoduleMTL-run-", dir=self.temp_root))
        try:
            ct_path = self._write_input()
            masks = self._write_masks()
            self.started_at = time.monotonic()
            if self.worker is not None:
                self._start_in_worker(ct_path, masks)
                return self
            self.command = build_command(ct_path, self.out_dir, self.points_lps, self.detect, self.networks, self.device,
                                         self.python_executable, self.extra_args, masks, self.nodule_ids,
                                         self._write_size_corrections())
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, cwd=str(self.work_dir), env=child_env(self.extra_env),
                                          text=True, encoding="utf-8", errors="replace", bufsize=1, **group_kwargs())
        except BaseException:
            self._remove_work_dir()
            self.state = "failed"
            raise
        self.state = "running"
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            t = threading.Thread(target=_reader, args=(stream, name, self._queue), daemon=True,
                                 name=f"NoduleMTL-{name}-reader")
            t.start()
            self._threads.append(t)
            self._open_streams += 1
        return self

    def _request(self, ct_path: str, out: str, masks: Sequence[str]) -> AnalysisRequest:
        return AnalysisRequest(mode="reclassify" if self.masks else "analyze", ct=str(ct_path), out=str(out),
                               points_lps=[list(p) for p in self.points_lps], detect=self.detect, networks=self.networks,
                               device=self.device, masks=list(masks), nodule_ids=self.nodule_ids or None,
                               **self.options)

    def _start_in_worker(self, ct_path: str, masks: Sequence[str]) -> None:
        w = self.worker
        w.extra_env.update(self.extra_env)
        self.request = self._request(ct_path, str(self.out_dir), masks)
        self.request.request_id = uuid.uuid4().hex
        self.command = list(w.command)  # what runs: the worker; what it does: self.request
        self._job = Job(w, self.request)
        self.state = "running"
        self._job.start()
        self._proc = self._job._proc
        self._events.extend(self._worker_events())

    def _worker_events(self) -> list[ProgressEvent]:
        """The job's new protocol events as the panel's :class:`~NoduleMTLLib.core.progress.ProgressEvent` s."""
        out = []
        for event in self._job.poll():
            if event.kind == "progress":
                self.progress = event.fraction
                out.append(ProgressEvent("progress", event.fraction, ""))
                if event.message and event.message != self._last_message:
                    self._last_message = self.message = event.message
                    out.append(ProgressEvent("message", None, event.message))
            elif event.kind == "message":
                self.message = event.text
                out.append(ProgressEvent("message", None, event.text))
        self.stdout_lines, self.stderr_lines = self._job.stdout_lines, self._job.stderr_lines
        if self._job.finished and self.state == "running":
            self._finish()
        return out

    def _write_masks(self) -> list[str]:
        import numpy as np
        import SimpleITK as sitk

        paths = []
        for k, mask in enumerate(self.masks):
            image = sitk.GetImageFromArray(np.asarray(mask, bool).astype(np.uint8))
            image.CopyInformation(self.ct.image)
            paths.append(str(self.work_dir / f"mask_{k + 1}.nrrd"))
            sitk.WriteImage(image, paths[-1], True)
        return paths

    def _write_size_corrections(self) -> str | None:
        """The ``size_corrections`` option as the per-run child's ``--result`` file (None without it)."""
        import json

        corrections = self.options.get("size_corrections")
        if corrections is None or not self.masks:
            return None
        ids = self.nodule_ids or list(range(1, len(self.masks) + 1))  # the CLI's ids of the masks
        path = self.work_dir / SIZE_CORRECTIONS_FILE
        path.write_text(json.dumps({"nodules": [{"id": int(i), "size_correction": c} for i, c in zip(ids, corrections)]},
                                   allow_nan=False),
                        encoding="utf-8")
        return str(path)

    def _write_input(self) -> str:
        ct = self.ct
        if hasattr(ct, "image"):  # CTVolume
            import SimpleITK as sitk

            path = self.work_dir / "input.nrrd"
            sitk.WriteImage(ct.image, str(path), False)  # uncompressed: fast, temporary
            return str(path)
        return str(ct)

    def poll(self) -> list[ProgressEvent]:
        """New events since the last call (never blocks); updates :attr:`progress`,
        :attr:`message` and, once the child has exited and its output is read,
        :attr:`state` (``succeeded`` needs exit code 0 and the outputs present)."""
        events, self._events = self._events, []
        if self._job is not None:
            return events + (self._worker_events() if self.state == "running" else [])
        while self.state == "running":
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            if name == "stdout":
                self.stdout_lines.append(line)
                event = parse_stdout_line(line)
            else:
                self.stderr_lines.append(line)
                event = parse_stderr_line(line)
            if event.kind == "progress":
                self.progress = event.fraction
            elif event.kind == "message":
                self.message = event.text
            events.append(event)
        if self.state == "running" and self._open_streams <= 0 and self._proc.poll() is not None:
            self._finish()
        return events

    def _finish(self) -> None:
        end = self._job.terminal if self._job is not None else None
        if self._job is not None:
            self.returncode = 0 if isinstance(end, Result) else end.exit_code if end is not None else self._proc.poll()
        else:
            self.returncode = self._proc.poll()
        self.finished_at = time.monotonic()
        if self._cancel_requested:
            self.state = "cancelled"
            self._remove_work_dir()
            return
        missing = [f for f in REQUIRED_OUTPUTS if not (self.out_dir / f).is_file()]
        if self.returncode == 0 and not missing:
            self.state = "succeeded"
            return
        self.state = "failed"
        if self.returncode == 0:
            self.error_text = f"The analysis finished without writing {', '.join(missing)}"
        elif isinstance(end, Error):
            self.error_text = end.message
        else:
            self.error_text = error_text_from_stderr(self.stderr_lines, self.returncode)
        self._remove_work_dir()

    def wait(self, timeout: float | None = None, callback: Callable[[ProgressEvent], None] | None = None,
             interval: float = 0.05) -> str:
        """Block until the child has finished (polling); returns :attr:`state`.

        Args:
            timeout: seconds; None waits for ever.
            callback: optional ``callable(event)`` for every event on the way.

        Raises:
            RuntimeError: not started.
            TimeoutError: still running after ``timeout`` s (the child keeps running).
        """
        if self.state == "created":
            raise RuntimeError("The analysis was not started")
        _poll_until_finished(self, timeout, callback, interval, "The analysis")
        return self.state

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the child and delete the work folder: SIGTERM to its process group, SIGKILL
        after ``timeout`` s (Windows: terminate, then kill).  A finished run's outputs are
        discarded too.  Afterwards :attr:`state` is ``cancelled`` and the process is reaped."""
        if self.state == "created":
            self.state = "cancelled"
            return
        self._cancel_requested = True
        proc = self._proc
        if self._job is not None:
            if self.state == "running":  # the worker runs this request: stop it (the next run starts another)
                self._job.cancel(timeout)
                self._finish()
        elif proc is not None and proc.poll() is None:
            _terminate_process_tree(proc, timeout)
        for t in self._threads:
            t.join(timeout=2.0)
        self.poll()  # drain the queue
        if self.state == "running":  # reader threads stuck: finish anyway
            self._finish()
        self.state = "cancelled"
        self.finished_at = self.finished_at or time.monotonic()
        self._result = None
        self._remove_work_dir()

    def result(self):
        """The :class:`~NoduleMTLLib.core.results.AnalysisResult` of a succeeded run (loaded
        once with :func:`~NoduleMTLLib.outputs.files.read_outputs`; the input path is set to the original CT's source).

        Raises:
            RuntimeError: the run did not succeed (the message says why).
        """
        if self.state != "succeeded":
            reason = f": {self.error_text}" if self.error_text else ""
            raise RuntimeError(f"No result: the analysis {self.state}{reason}")
        if self._result is None:
            from ..outputs.files import read_outputs

            res = read_outputs(self.out_dir)
            source = getattr(self.ct, "source", None) if hasattr(self.ct, "image") else str(self.ct)
            if isinstance(res.input, dict):
                res.input["path"] = source or ""
                uid = getattr(self.ct, "dicom_series_uid", None)
                if uid:
                    res.input["dicom_series_uid"] = uid
            self._result = res
        return self._result

    def cleanup(self) -> None:
        """Delete the work folder (call when the result was loaded); stops a running child first."""
        if self.running:
            self.cancel()
        self._remove_work_dir()

    def _remove_work_dir(self) -> None:
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
