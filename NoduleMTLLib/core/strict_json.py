"""JSON without NaN or infinity, both ways.

Python's ``json`` writes ``NaN`` / ``Infinity`` by default, which is not JSON (RFC 8259): a
reader in another language refuses the file.  Every JSON that NoduleMTL writes goes through
:func:`dumps` (or ``json.dumps(..., allow_nan=False)``; a test checks every writer), and the
configuration it reads through :func:`loads` / :func:`read`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import OutputError


def first_non_finite(obj, where: str = "") -> str | None:
    """Where the first NaN / infinite float of a JSON-like ``obj`` is (``"nodules[0].volume_mm3"``), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    if isinstance(obj, dict):
        for k, v in obj.items():
            w = first_non_finite(v, f"{where}.{k}" if where else str(k))
            if w:
                return w
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            w = first_non_finite(v, f"{where}[{i}]")
            if w:
                return w
    return None


def dumps(obj, what: str = "JSON", **kw) -> str:
    """``json.dumps(obj, allow_nan=False, **kw)``.

    Raises:
        OutputError: ``obj`` holds NaN or infinity (the message names ``what`` and where).
    """
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        raise OutputError(f"{what} not written: {first_non_finite(obj) or 'a value'} is not a finite number") from None


def _reject(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def loads(text: str):
    """``json.loads`` refusing NaN, Infinity and numbers that overflow to infinity (ValueError saying where)."""
    obj = json.loads(text, parse_constant=_reject)
    where = first_non_finite(obj)
    if where:
        raise ValueError(f"{where} is not a finite number")
    return obj


def read(path: str | os.PathLike):
    """:func:`loads` of a UTF-8 file (OSError / ValueError)."""
    return loads(Path(path).read_text(encoding="utf-8"))
