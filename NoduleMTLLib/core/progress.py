"""The progress-line protocol between an analysis and whoever watches it.

``nodulemtl analyze --progress-format lines`` (and Slicer's scripted CLI modules) print one
flushed line ``<filter-progress>F</filter-progress>`` per update (F in [0, 1]) and
``<filter-comment>TEXT</filter-comment>`` for a message on stdout; errors are one line
``nodulemtl: error: TEXT`` on stderr (exit code 1; 2 for usage errors); warnings
``nodulemtl: warning: TEXT`` on stderr.  The writer (:class:`LineProgress`, used by the
CLI) and the readers (:func:`parse_stdout_line`, :func:`parse_stderr_line`,
:func:`error_text_from_stderr`, used by :mod:`NoduleMTLLib.apps.runner`) live here, so neither
side imports the other.  No third-party import.
"""

from __future__ import annotations

import math
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

_PROGRESS_RE = re.compile(r"^\s*<filter-progress>\s*([-+0-9.eE]+)\s*</filter-progress>\s*$")
_COMMENT_RE = re.compile(r"^\s*<filter-comment>(.*)</filter-comment>\s*$")
_ERROR_RE = re.compile(r"^[\w .\-]*: error: (.*)$")
_WARNING_RE = re.compile(r"^[\w .\-]*: warning: (.*)$")

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
