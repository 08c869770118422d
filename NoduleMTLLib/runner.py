"""Run an analysis in a child Python process, with progress, cancel and error text.

The Slicer module must never run inference in its GUI thread (issue 5, "Background
processing"; the pattern of SlicerTotalSegmentator / SlicerMONAIAuto3DSeg): it starts
``nodulemtl analyze`` in a child process (``PythonSlicer -m NoduleMTLLib.cli analyze ...``;
outside Slicer ``sys.executable``), polls it from a ``QTimer`` and loads the outputs back
when the child has finished.  This module holds every decision of that loop and has no Qt
or Slicer import, so it is tested with plain pytest (``Testing/Python/test_runner.py``):

* :class:`AnalysisProcess`: start, non-blocking :meth:`~AnalysisProcess.poll` returning the
  new :class:`ProgressEvent` s, :meth:`~AnalysisProcess.cancel` (terminate, then kill the
  process group; the private work folder is deleted, so nothing half-written remains),
  :meth:`~AnalysisProcess.wait`, the one-line error text of a failed run, and the
  :class:`~NoduleMTLLib.results.AnalysisResult` of a finished run.
* :func:`load_outputs`: ``nodules.json`` + ``segmentation.seg.nrrd`` / ``labels.nrrd`` of an
  output folder back into an :class:`~NoduleMTLLib.results.AnalysisResult` with masks on
  the CT grid (what ``NoduleMTLMRML.add_result_to_scene`` takes).
* :func:`with_cpu_fallback`: CUDA out of memory -> the same work again on the CPU, with a
  message and the fallback recorded in ``result.run``.
* Panel helpers: :func:`device_choices`, :func:`network_choices`,
  :func:`detection_status`, :func:`summary_html`, :func:`status_text`,
  :func:`parse_ras_text`.

Progress protocol (``nodulemtl analyze --progress-format lines``, also what Slicer's
scripted CLI modules print): one flushed line ``<filter-progress>F</filter-progress>`` per
update (F in [0, 1]) and ``<filter-comment>TEXT</filter-comment>`` for a message; errors
are one line ``nodulemtl: error: TEXT`` on stderr (exit code 1; 2 for usage errors);
warnings ``nodulemtl: warning: TEXT`` on stderr.

Heavy imports (torch, SimpleITK, slicerio) happen inside the functions that need them, so
the module imports in Slicer's GUI process before torch is installed.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

#: Folder holding the ``NoduleMTLLib`` package (put on the child's ``PYTHONPATH``).
LIBRARY_ROOT = Path(__file__).resolve().parent.parent

#: Network ids that find nodules in the whole scan (not click networks).
DETECTION_NETWORKS = ("maskrcnn25d",)

#: Files a successful ``nodulemtl analyze`` run leaves in its output folder.
REQUIRED_OUTPUTS = ("labels.nrrd", "nodules.json")

_PROGRESS_RE = re.compile(r"^\s*<filter-progress>\s*([-+0-9.eE]+)\s*</filter-progress>\s*$")
_COMMENT_RE = re.compile(r"^\s*<filter-comment>(.*)</filter-comment>\s*$")
_ERROR_RE = re.compile(r"^[\w .\-]*: error: (.*)$")
_WARNING_RE = re.compile(r"^[\w .\-]*: warning: (.*)$")


# ---------------------------------------------------------------------------
# progress lines
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ProgressEvent:
    """One thing the child process reported.

    Attributes:
        kind: ``"progress"`` (``fraction`` set), ``"message"`` (a comment or warning for
            the user), ``"output"`` (another stdout line, e.g. the per-nodule summary) or
            ``"log"`` (another stderr line: details for the log only).
        fraction: progress in [0, 1] for ``"progress"`` events, else None.
        text: the message / line (without the protocol markup).
    """

    kind: str
    fraction: float | None = None
    text: str = ""


def progress_lines(fraction: float, message: str = "") -> list[str]:
    """The protocol lines for one progress update (fraction clamped to [0, 1])."""
    f = min(1.0, max(0.0, float(fraction)))
    lines = [f"<filter-progress>{f:.4f}</filter-progress>"]
    if message:
        lines.append(f"<filter-comment>{' '.join(str(message).split())}</filter-comment>")
    return lines


class LineProgress:
    """``callback(fraction, message)`` that prints protocol lines to ``stream`` and flushes.

    A message is printed only when it differs from the previous one.
    """

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self._last_message = None

    def __call__(self, fraction: float, message: str = "") -> None:
        show = message if message and message != self._last_message else ""
        self._last_message = message or self._last_message
        for line in progress_lines(fraction, show):
            print(line, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        """Nothing to release (same interface as a tqdm bar)."""


def parse_stdout_line(line: str) -> ProgressEvent:
    """Classify one stdout line of the child (see the module docstring)."""
    m = _PROGRESS_RE.match(line)
    if m:
        try:
            value = float(m.group(1))
        except ValueError:
            return ProgressEvent("output", None, line)
        if math.isfinite(value):
            return ProgressEvent("progress", min(1.0, max(0.0, value)), "")
    m = _COMMENT_RE.match(line)
    if m:
        return ProgressEvent("message", None, m.group(1).strip())
    return ProgressEvent("output", None, line)


def parse_stderr_line(line: str) -> ProgressEvent:
    """Classify one stderr line: ``...: warning: X`` -> message X, anything else -> log."""
    m = _WARNING_RE.match(line.strip())
    if m:
        return ProgressEvent("message", None, m.group(1).strip())
    return ProgressEvent("log", None, line)


def error_text_from_stderr(stderr_lines: Sequence[str], returncode: int | None) -> str:
    """A one-line, readable reason for a failed run.

    The last ``<prog>: error: <reason>`` line gives ``<reason>`` (the CLI's one-line errors
    and argparse usage errors); otherwise the last line of a Python traceback (e.g.
    ``RuntimeError: ...``); otherwise a sentence from the exit status (a negative status is
    a signal: SIGKILL usually means the system ran out of memory).
    """
    lines = [ln.strip() for ln in stderr_lines if ln and ln.strip()]
    for line in reversed(lines):
        m = _ERROR_RE.match(line)
        if m:
            return m.group(1).strip()
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        return lines[-1]
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"The analysis process was stopped by {name}{hint}"
    if lines:
        return lines[-1]
    return f"The analysis process ended with exit code {returncode} and no message"


# ---------------------------------------------------------------------------
# device choice and CUDA out-of-memory fallback
# ---------------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def mps_available(torch_module=None) -> bool:
    """True when torch reports a usable Apple MPS device."""
    torch = torch_module if torch_module is not None else _import_torch()
    mps = getattr(getattr(torch, "backends", None), "mps", None) if torch is not None else None
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:  # an old or broken torch build
        return False


def cuda_available(torch_module=None) -> bool:
    """True when torch sees a CUDA GPU."""
    torch = torch_module if torch_module is not None else _import_torch()
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:
        return False


def device_choices(torch_module=None) -> list[str]:
    """Device names for the panel: ``auto``, ``cpu``, ``cuda``, plus ``mps`` only where
    torch reports it (Apple Silicon).  ``cuda`` is always listed: choosing it without a GPU
    gives a clear error instead of silently running on the CPU."""
    names = ["auto", "cpu", "cuda"]
    if mps_available(torch_module):
        names.append("mps")
    return names


def device_tooltip(torch_module=None) -> str:
    """One sentence on what ``auto`` will use on this machine."""
    torch = torch_module if torch_module is not None else _import_torch()
    if torch is None:
        return "auto: CUDA when torch sees a GPU, else the CPU (PyTorch is not installed yet)."
    if cuda_available(torch):
        try:
            gpu = torch.cuda.get_device_name(0)
        except Exception:
            gpu = "a CUDA GPU"
        return f"auto: {gpu} (CUDA). cpu: always the CPU. On CUDA out-of-memory the run is retried on the CPU."
    return "auto: the CPU (torch sees no CUDA GPU). cuda: fails here. cpu: always the CPU."


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or MPS) out-of-memory error: ``torch.OutOfMemoryError``
    (``torch.cuda.OutOfMemoryError``), or, on older torch, a RuntimeError whose text says
    "out of memory"."""
    torch = _import_torch()
    oom_class = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_class is not None and isinstance(exc, oom_class):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def with_cpu_fallback(run: Callable[[str], Any], device: str = "auto", notify: Callable[[str], None] | None = None):
    """Call ``run(device)``; if that runs out of GPU memory, call ``run("cpu")``.

    Used around ``pipeline.analyze_points`` (and whole-scan detection) by the CLI and the
    module's synchronous path, so a small GPU never ends a run that the CPU can finish
    (issue 5, "Device").  The CUDA cache is emptied before the retry.  When the result has a
    ``run`` dict (an :class:`~NoduleMTLLib.results.AnalysisResult`), the retry is recorded
    there: ``run["device_requested"]`` (what was asked) and ``run["fallback"]`` (the
    message).

    Args:
        run: ``callable(device_name) -> result``.
        device: the requested device name (``auto``/``cpu``/``cuda``/``mps``).
        notify: optional ``callable(message)`` told about the retry before it starts.

    Returns:
        what ``run`` returned.

    Raises:
        whatever ``run`` raises, except an out-of-memory error on a non-CPU device (see
        :func:`is_out_of_memory`); the CPU retry's own errors propagate.
    """
    try:
        return run(device)
    except Exception as e:
        if (device or "auto").lower() == "cpu" or not is_out_of_memory(e):
            raise
        first_line = (str(e).splitlines() or [""])[0][:200]
        message = (f"The GPU ran out of memory on device '{device}' ({type(e).__name__}: {first_line}); "
                   "running again on the CPU (slower).")
        torch = _import_torch()
        if torch is not None:
            try:
                torch.cuda.empty_cache()
            except Exception:
                pass
        if notify is not None:
            notify(message)
        result = run("cpu")
        run_info = getattr(result, "run", None)
        if isinstance(run_info, dict):
            run_info["device_requested"] = device
            run_info["fallback"] = message
        return result


# ---------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkChoice:
    """A registered network as the panel lists it.

    Attributes:
        network_id: registry id; title: human title; paper: citation;
        available: True when its weights file was found (see ``registry.find_weights``);
        reason: why it is not available ("" when it is);
        detection: True for a whole-scan detector (run by "Find nodules", not per click).
    """

    network_id: str
    title: str
    paper: str
    available: bool
    reason: str
    detection: bool


def network_choices() -> list[NetworkChoice]:
    """Every registered network, read from the registry at call time (networks registered
    later appear without a change here): the click networks of ``registry.NETWORKS`` in
    registry order, then the whole-scan detectors of ``registry.DETECTORS`` (``kind``
    "detector"), each with whether its weights file can be found.

    Raises:
        ImportError: torch (needed by the registry) is not installed.
    """
    from . import registry

    specs = dict(registry.NETWORKS)
    for nid, spec in (getattr(registry, "DETECTORS", None) or {}).items():
        specs.setdefault(nid, spec)
    out = []
    for nid, spec in specs.items():
        try:
            registry.find_weights(nid)
            available, reason = True, ""
        except (registry.WeightsError, KeyError) as e:
            available, reason = False, str(e)
        detection = nid in DETECTION_NETWORKS or getattr(spec, "kind", "click") == "detector"
        out.append(NetworkChoice(nid, getattr(spec, "title", nid), getattr(spec, "paper", ""), available, reason, detection))
    return out


def detection_status() -> tuple[bool, str]:
    """Whether "Find nodules" (``nodulemtl analyze CT --detect``) can run: ``(ok, reason)``.

    Needs a registered detection network (``maskrcnn25d``) with its weights present.
    """
    try:
        choices = network_choices()
    except ImportError as e:
        return False, f"PyTorch is not installed yet ({e})"
    detectors = [c for c in choices if c.detection]
    if not detectors:
        return False, "Whole-scan detection (maskrcnn25d) is not available in this version"
    ready = [c for c in detectors if c.available]
    if not ready:
        return False, f"Whole-scan detection is not available: {detectors[0].reason}"
    return True, f"Find nodules in the whole scan with {ready[0].title}"


def split_networks(text: str | Iterable[str]) -> list[str]:
    """``"a, b,,a"`` (or a list) -> ``["a", "b"]``: stripped, empty and repeated ids removed, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        item = str(item).strip()
        if item and item not in out:
            out.append(item)
    return out


# ---------------------------------------------------------------------------
# the child process
# ---------------------------------------------------------------------------

def build_command(ct_path: str | os.PathLike, out_dir: str | os.PathLike, points_lps: Sequence[Sequence[float]] | None = None,
                  detect: bool = False, networks: Sequence[str] = ("lnmsnet",), device: str = "auto",
                  python_executable: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """Command line of the child: ``[python, "-m", "NoduleMTLLib.cli", "analyze", CT, ...]``.

    Points are passed as ``--lps --point X Y Z`` (world LPS mm, what
    ``NoduleMTLMRML.markups_to_points_lps`` gives); ``detect`` adds ``--detect`` (whole-scan
    detection, then points are optional).

    Raises:
        ValueError: neither points nor ``detect``, no network, or a non-finite coordinate.
    """
    points = [tuple(float(v) for v in p) for p in (points_lps or [])]
    if not points and not detect:
        raise ValueError("No points given: place one point on each nodule (or use whole-scan detection)")
    if any(len(p) != 3 or not all(math.isfinite(v) for v in p) for p in points):
        raise ValueError(f"Points must be three finite coordinates each: {points}")
    nets = split_networks(networks)
    if not nets:
        raise ValueError("Select at least one network")
    cmd = [python_executable or sys.executable, "-m", "NoduleMTLLib.cli", "analyze", str(ct_path)]
    if points:
        cmd.append("--lps")
        for p in points:
            cmd += ["--point"] + [repr(v) for v in p]
    if detect:
        cmd.append("--detect")
    cmd += ["--networks", ",".join(nets), "--device", device or "auto", "--out", str(out_dir),
            "--progress-format", "lines"]
    cmd += list(extra_args)
    return cmd


def _reader(stream, name: str, q: "queue.Queue") -> None:
    try:
        for raw in iter(stream.readline, ""):
            q.put((name, raw.rstrip("\r\n")))
    except (OSError, ValueError):  # stream closed under us (cancel)
        pass
    finally:
        q.put((name, None))


class AnalysisProcess:
    """``nodulemtl analyze`` running in a child process, polled without blocking.

    Life cycle: ``created`` -> :meth:`start` -> ``running`` -> ``succeeded`` | ``failed`` |
    ``cancelled`` (see :attr:`state`).  Everything the child writes lives in a private work
    folder (``work_dir``: the input CT written there when a ``CTVolume`` is given, and the
    output folder ``work_dir/out``); it is deleted on failure, on cancel and by
    :meth:`cleanup`, so a cancelled or failed run leaves no file behind.

    Args:
        ct: a :class:`NoduleMTLLib.io.CTVolume` (written to ``work_dir/input.nrrd``, HU and
            LPS geometry kept; what the module does with a volume node) or the path of a CT
            file / DICOM folder (read by the child).
        points_lps: world LPS points (mm), one per nodule; may be empty with ``detect``.
        detect: run whole-scan detection (``--detect``) instead of / besides points.
        networks: network ids, the first one's mask is reported.
        device: ``auto``/``cpu``/``cuda``/``mps`` (the child falls back to the CPU on CUDA OOM).
        python_executable: Python that runs the child (Slicer: ``PythonSlicer``); default
            ``sys.executable``.
        temp_root: folder in which the work folder is created (default: the system temp folder).
        extra_args: more ``nodulemtl analyze`` arguments.
        env: extra environment variables for the child.

    Raises (constructor):
        ValueError: as :func:`build_command` (no points and no detection, no network).
    """

    def __init__(self, ct, points_lps: Sequence[Sequence[float]] | None = None, detect: bool = False,
                 networks: Sequence[str] = ("lnmsnet",), device: str = "auto", python_executable: str | None = None,
                 temp_root: str | os.PathLike | None = None, extra_args: Sequence[str] = (), env: dict | None = None):
        self.ct = ct
        self.points_lps = [tuple(float(v) for v in p) for p in (points_lps or [])]
        self.detect = bool(detect)
        self.networks = split_networks(networks)
        self.device = device or "auto"
        self.python_executable = python_executable or sys.executable
        self.temp_root = temp_root
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        # validate now (ValueError before anything is started)
        build_command("CT", "OUT", self.points_lps, self.detect, self.networks, self.device, self.python_executable)

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
        """Command line and everything the child printed (for the log / a details box)."""
        return "\n".join(["$ " + " ".join(self.command), *self.stdout_lines, *self.stderr_lines])

    # --- control --------------------------------------------------------------

    def start(self) -> "AnalysisProcess":
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
            self.command = build_command(ct_path, self.out_dir, self.points_lps, self.detect, self.networks, self.device,
                                         self.python_executable, self.extra_args)
            env = dict(os.environ)
            env.update(self.extra_env)
            env["PYTHONPATH"] = os.pathsep.join([str(LIBRARY_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            env["PYTHONUNBUFFERED"] = "1"
            env.setdefault("PYTHONIOENCODING", "utf-8")
            kwargs: dict[str, Any] = {}
            if os.name == "posix":
                kwargs["start_new_session"] = True  # own process group: cancel reaches every child
            else:
                kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                           | getattr(subprocess, "CREATE_NO_WINDOW", 0))
            self.started_at = time.monotonic()
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, cwd=str(self.work_dir), env=env, text=True,
                                          encoding="utf-8", errors="replace", bufsize=1, **kwargs)
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
        events = []
        while True:
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
        self.returncode = self._proc.returncode
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
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if callback is not None:
                    callback(event)
            if self.finished:
                return self.state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"The analysis is still running after {timeout} s")
            time.sleep(interval)

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the child and delete the work folder: SIGTERM to its process group, SIGKILL
        after ``timeout`` s (Windows: terminate, then kill).  A finished run's outputs are
        discarded too.  Afterwards :attr:`state` is ``cancelled`` and the process is reaped."""
        if self.state == "created":
            self.state = "cancelled"
            return
        self._cancel_requested = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
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
        """The :class:`~NoduleMTLLib.results.AnalysisResult` of a succeeded run (loaded
        once with :func:`load_outputs`; the input path is set to the original CT's source).

        Raises:
            RuntimeError: the run did not succeed (the message says why).
        """
        if self.state != "succeeded":
            reason = f": {self.error_text}" if self.error_text else ""
            raise RuntimeError(f"No result: the analysis {self.state}{reason}")
        if self._result is None:
            res = load_outputs(self.out_dir)
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


# ---------------------------------------------------------------------------
# outputs -> AnalysisResult
# ---------------------------------------------------------------------------

class OutputsError(RuntimeError):
    """An output folder is incomplete or its files do not agree."""


class JsonRecord:
    """Read-only view of a JSON object with attribute access and ``to_dict()``.

    Stands in, after :func:`load_outputs`, for result objects that are written to
    ``nodules.json`` as dicts but cannot be rebuilt from it (e.g. the consensus record,
    whose masks are not in the JSON): ``record.malignancy_probability`` reads the key,
    ``record.to_dict()`` gives the dict back, a missing key raises AttributeError.
    """

    def __init__(self, data: dict):
        object.__setattr__(self, "_data", dict(data))

    def __getattr__(self, name):
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("JsonRecord is read-only")

    def to_dict(self) -> dict:
        return dict(self._data)

    def __repr__(self):
        return f"JsonRecord({self._data!r})"


def _field_types(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and len(args) == 1:
        return args[0]
    return tp


def _from_json(tp, value):
    """Convert a JSON value to the declared field type (dataclass, tuple, plain)."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _dataclass_from_json(tp, value)
    origin = typing.get_origin(tp)
    if (tp is tuple or origin is tuple) and isinstance(value, list):
        return tuple(value)
    if tp is Any and isinstance(value, dict):
        return JsonRecord(value)
    return value


def _dataclass_from_json(cls, data: dict, **fixed):
    types = _field_types(cls)
    kwargs = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in kwargs or f.name not in data or not f.init:
            continue
        kwargs[f.name] = _from_json(types.get(f.name, Any), data[f.name])
    return cls(**kwargs)


def _masks_from_seg_nrrd(path: Path, ct_ijk_to_lps, shape_zyx) -> dict[int, Any] | None:
    """Per-nodule masks from ``segmentation.seg.nrrd`` (segments ``nodule_<id>``, overlaps
    kept in layers) as :class:`~NoduleMTLLib.consensus.MaskBox` on the CT grid ``shape_zyx``
    (None for an empty segment); None if slicerio is missing or the grid does not line up."""
    try:
        import numpy as np
        import slicerio
    except ImportError:
        return None
    from .consensus import MaskBox
    seg = slicerio.read_segmentation(str(path))
    seg_ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    if not np.allclose(seg_ijk_to_lps[:3, :3], ct_ijk_to_lps[:3, :3], atol=1e-4):
        return None
    offset = np.linalg.solve(ct_ijk_to_lps, seg_ijk_to_lps[:, 3])[:3]
    lo = np.round(offset).astype(int)
    if np.abs(offset - lo).max() > 1e-3:
        return None
    voxels = np.asarray(seg["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    size_ijk = np.array(layers.shape[1:])
    hi = lo + size_ijk
    if np.any(lo < 0) or np.any(hi > np.array(shape_zyx[::-1])):
        return None
    masks = {}
    for s in seg.get("segments", []):
        m = re.fullmatch(r"nodule_(\d+)", str(s.get("id", "")))
        if not m:
            continue
        sub = (layers[int(s.get("layer", 0))] == int(s["labelValue"])).transpose(2, 1, 0)  # (z, y, x)
        box = MaskBox.from_full(sub)  # its box inside the segmentation's extent, then on the CT grid
        masks[int(m.group(1))] = None if box is None else MaskBox(
            tuple(int(o + v) for o, v in zip(box.offset_zyx, lo[::-1])), box.array, tuple(int(v) for v in shape_zyx))
    return masks


def load_outputs(out_dir: str | os.PathLike):
    """Read an output folder of ``nodulemtl analyze`` back into an ``AnalysisResult``.

    ``nodules.json`` gives the records (every field of ``NoduleResult`` /
    ``NetworkOutput`` / ``AnalysisResult`` present in it, dataclass fields rebuilt, other
    JSON objects as :class:`JsonRecord`); masks are bool arrays on the CT grid, shape
    ``(z, y, x)`` of ``labels.nrrd`` (held as :class:`~NoduleMTLLib.consensus.MaskBox`,
    so a hundred whole-scan candidates do not each hold a CT-sized array; ``mask`` reads
    as the full-grid array): from ``segmentation.seg.nrrd`` (exact, overlapping
    masks kept) when it is there and lines up with ``labels.nrrd``, else
    ``labels.nrrd == id`` (where masks overlap, the earlier nodule owns the voxel).
    Per-network masks (``network_masks``) are not written to the folder and stay empty.

    Raises:
        OutputsError: a file is missing, the JSON is not a NoduleMTL result, the label map's
            size differs from the JSON's ``input.size_ijk``, or a found nodule has an empty
            mask.
    """
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from .consensus import MaskBox
    from .io import ijk_to_lps_matrix
    from .results import AnalysisResult, NetworkOutput, NoduleResult

    out = Path(out_dir)
    json_path, labels_path = out / "nodules.json", out / "labels.nrrd"
    for p in (json_path, labels_path):
        if not p.is_file():
            raise OutputsError(f"Output folder {out} has no {p.name}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        records = data["nodules"]
    except (ValueError, KeyError, TypeError) as e:
        raise OutputsError(f"{json_path} is not a NoduleMTL result: {e}") from None
    labels_image = sitk.ReadImage(str(labels_path))
    labels = sitk.GetArrayFromImage(labels_image)
    size_ijk = list(labels_image.GetSize())
    if data.get("input", {}).get("size_ijk") not in (None, size_ijk):
        raise OutputsError(f"{labels_path} has size {size_ijk}, nodules.json says {data['input']['size_ijk']}")
    masks = None
    seg_path = out / "segmentation.seg.nrrd"
    if seg_path.is_file():
        masks = _masks_from_seg_nrrd(seg_path, ijk_to_lps_matrix(labels_image), labels.shape)
        if masks is not None:  # a voxel labelled k outside segment k: the files disagree, trust the label map
            counts = np.bincount(labels.ravel(), minlength=max(masks, default=0) + 1)
            for k, v in masks.items():
                inside = 0 if v is None or k < 0 else int((labels[v.slices] == k).sum())
                if (k >= 0 and counts[k] > inside) or (v is not None and np.any((labels[v.slices] == k) & ~v.array)):
                    masks = None
                    break
    boxes = ndi.find_objects(labels)  # tight box of each label value (index value - 1)

    nodules = []
    for rec in records:
        nid = int(rec["id"])
        networks = {k: _dataclass_from_json(NetworkOutput, v or {}, network_id=k)
                    for k, v in (rec.get("networks") or {}).items()}
        nodule = _dataclass_from_json(NoduleResult, {k: v for k, v in rec.items() if k not in ("networks", "mask")},
                                      networks=networks)
        if nodule.found:
            if masks is not None and nid in masks:
                mask = masks[nid]  # None: an empty segment
            else:
                box = boxes[nid - 1] if 0 < nid <= len(boxes) else None
                mask = None if box is None else MaskBox(tuple(int(b.start) for b in box), labels[box] == nid,
                                                        tuple(int(v) for v in labels.shape))
            if mask is None:
                raise OutputsError(f"Nodule {nid} is marked found but has no voxel in {out}")
            nodule.mask = mask
        nodules.append(nodule)
    return _dataclass_from_json(AnalysisResult, {k: v for k, v in data.items() if k != "nodules"}, nodules=nodules)


# ---------------------------------------------------------------------------
# presentation (GUI-free text for the panel)
# ---------------------------------------------------------------------------

def _pct(p) -> str:
    return "n/a" if p is None else f"{100.0 * float(p):.0f}%"


def _result_dict(result) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


def _scalar_text(key: str, value) -> str | None:
    if isinstance(value, bool) or value is None:
        return None if value is None else f"{key} {'yes' if value else 'no'}"
    if isinstance(value, (int, float)):
        if "probability" in key and "spread" not in key and "std" not in key:
            return f"{key.replace('_', ' ')} {_pct(value)}"
        return f"{key.replace('_', ' ')} {value:.2f}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"
    if isinstance(value, str):
        return f"{key.replace('_', ' ')} {html.escape(value)}"
    return None


def consensus_text(consensus: dict | None) -> str:
    """One line for a nodule's ``consensus`` record (whatever keys it holds): the mean
    malignancy probability first, then the disagreement level and spread, then the other
    scalar figures; "" when there is nothing to show (None, or a single network)."""
    if not consensus:
        return ""
    if (consensus.get("n_networks") or 0) < 2 and (consensus.get("n_found") or 0) < 2:
        return ""
    parts = []
    if consensus.get("malignancy_probability") is not None:
        parts.append(f"P(malignant) {_pct(consensus['malignancy_probability'])}")
    if consensus.get("disagreement"):
        parts.append(f"disagreement <b>{html.escape(str(consensus['disagreement']))}</b>")
    shown = {"malignancy_probability", "disagreement", "mask_rule", "mask_voxels"}
    for key in ("probability_spread", "dice_pairwise_min", "n_found", "n_networks"):
        if key in consensus and (text := _scalar_text(key, consensus[key])):
            parts.append(text)
            shown.add(key)
    for key, value in consensus.items():
        if key not in shown and (text := _scalar_text(key, value)):
            parts.append(text)
    reasons = consensus.get("reasons") or []
    if reasons:
        parts.append("(" + html.escape("; ".join(str(r) for r in reasons)) + ")")
    return "consensus: " + ", ".join(parts) if parts else ""


def summary_html(result, disclaimer: str = "Research use only: not for clinical diagnosis.") -> str:
    """The panel's summary (HTML): the run's notes (``messages``), then per nodule its size
    and type (and detection score), per network the malignancy probability and sign
    probabilities, and the consensus line when present.

    Args:
        result: an ``AnalysisResult`` or its ``to_dict()`` (``nodules.json``).
    """
    lines = []
    d = _result_dict(result)
    for message in d.get("messages") or []:
        lines.append(f"<i>{html.escape(str(message))}</i>")
    for n in d.get("nodules", []):
        name = html.escape(str(n.get("name") or f"Nodule {n.get('id')}"))
        if not n.get("found"):
            lines.append(f"<b>{name}</b>: no nodule found at the point. {html.escape(n.get('message') or '')}".strip())
            continue
        size = f"{n['diameter_mm']:.1f} mm" if n.get("diameter_mm") is not None else "size n/a"
        if n.get("volume_mm3") is not None:
            size += f", {n['volume_mm3']:.0f} mm&sup3;"
        kind = f", {html.escape(n['type'])}" if n.get("type") else ""
        det = n.get("detection") or {}
        score = f", detection score {det['score']:.2f}" if isinstance(det, dict) and det.get("score") is not None else ""
        lines.append(f"<b>{name}</b>: {size}{kind}{score}")
        for nid, out in (n.get("networks") or {}).items():
            out = out or {}
            text = f"&nbsp;&nbsp;{html.escape(nid)}: P(malignant) {_pct(out.get('malignancy_probability'))}"
            signs = out.get("sign_probabilities") or {}
            if signs:
                text += " &middot; " + ", ".join(f"{html.escape(k)} {_pct(v)}" for k, v in signs.items())
            lines.append(text)
        cons = consensus_text(n.get("consensus"))
        if cons:
            lines.append("&nbsp;&nbsp;" + cons)
        if n.get("message"):
            lines.append(f"&nbsp;&nbsp;<i>{html.escape(n['message'])}</i>")
    if disclaimer:
        lines.append(f"<i>{html.escape(disclaimer)}</i>")
    return "<br>".join(lines)


def status_text(result, seconds: float | None = None) -> str:
    """"Done: N of M nodule(s) segmented on <device> in <t> s (...)", with the CPU
    fallback note when the run fell back from the GPU."""
    d = _result_dict(result)
    run = d.get("run") or {}
    nodules = d.get("nodules") or []
    found = sum(1 for n in nodules if n.get("found"))
    timing = run.get("timing_s") or {}
    total = seconds if seconds is not None else timing.get("total")
    text = f"Done: {found} of {len(nodules)} nodule(s) segmented"
    if run.get("device"):
        text += f" on {run['device']}"
    if total is not None:
        text += f" in {float(total):.1f} s"
        if seconds is not None and timing.get("total") is not None:
            text += f" (analysis {float(timing['total']):.1f} s"
            text += f", weights {float(timing['load']):.1f} s)" if timing.get("load") is not None else ")"
    if run.get("fallback"):
        text += f". {run['fallback']}"
    return text


def parse_ras_text(text: str) -> tuple[float, float, float]:
    """``"R, A, S"`` (the table's ``point_ras_mm`` text, or space separated) -> floats.

    Raises:
        ValueError: not three finite numbers.
    """
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"Not a RAS point: {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"Not a RAS point: {text!r}")
    return values
