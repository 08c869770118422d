"""A persistent background worker: one child process that keeps its networks loaded.

Starting a child per run costs 20-25 s of ``import torch`` before a 4 s analysis.  The Slicer
module therefore starts one worker on first use (``python -m NoduleMTLLib.worker``, in
Slicer ``PythonSlicer``) and keeps it, with its :class:`~NoduleMTLLib.analysis.ModelCache`,
between runs; a second run on the same volume starts computing within a second.

Protocol (this module is both ends): the parent writes one JSON line per request,
``{"argv": ["analyze", CT, "--point", ..., "--out", DIR, "--progress-format", "lines"]}`` - the
arguments of ``nodulemtl analyze`` (:func:`NoduleMTLLib.cli.main` runs them, so the outputs,
progress lines and error lines are those of the per-run child, see
:mod:`NoduleMTLLib.progress`); when the request is done the worker prints
``<worker-done>RC</worker-done>`` (RC = the CLI's exit code) on stdout and on stderr, so the
parent knows both streams are complete.  Requests run one at a time.

Cancel kills the worker's process group (the only way to stop torch at once); the next run
starts a new worker, and so does a crashed one (:class:`Worker` counts the starts and keeps
the reason of the last stop).  The parent side is used by
:class:`NoduleMTLLib.runner.AnalysisProcess` (``worker=``); no Qt or Slicer import here.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

#: Line that ends a request (stdout and stderr).
DONE_RE = re.compile(r"^<worker-done>(-?\d+)</worker-done>$")
#: Folder holding the ``NoduleMTLLib`` package (put on the worker's ``PYTHONPATH``).
LIBRARY_ROOT = Path(__file__).resolve().parent.parent


def serve(stdin=None) -> int:
    """The worker's main loop: run each request line until stdin closes (the parent is gone)."""
    from . import cli
    from .analysis import ModelCache

    models = ModelCache()
    for line in stdin if stdin is not None else sys.stdin:
        if not line.strip():
            continue
        try:
            rc = cli.main(list(json.loads(line)["argv"]), models=models)
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # noqa: BLE001 - the worker outlives a bad request
            print(f"nodulemtl: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
            rc = 1
        for stream in (sys.stderr, sys.stdout):
            print(f"<worker-done>{rc}</worker-done>", file=stream, flush=True)
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
        self.command = [self.python_executable, "-m", "NoduleMTLLib.worker"]
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

    def send(self, argv: list[str]) -> None:
        """Hand one ``nodulemtl analyze`` argument list to the worker.

        Raises:
            OSError: the worker is gone (broken pipe).
        """
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv]}) + "\n")
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
