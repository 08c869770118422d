"""Training checkpoints that cannot run code when loaded.

Checkpoints (``last.pt``, ``best.pt``) hold only tensors, state dicts and plain Python values
(dict, list, tuple, str, int, float, bool, None), so they load with
``torch.load(weights_only=True)``: a crafted file cannot execute anything (a pickle that
names any other callable is refused by torch's restricted unpickler).  Numpy scalars and
arrays are turned into Python numbers and lists when saving (:func:`plain`); checkpoints
written before that rule may still hold numpy scalars, which :func:`load_checkpoint` accepts
(numpy's scalar constructor and dtypes only build numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from NoduleMTLLib.models.registry import numpy_safe_globals


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or holds objects other than tensors and plain values."""


def plain(obj):
    """``obj`` with numpy scalars/arrays as Python numbers/lists and paths as strings, recursively
    through dicts, lists and tuples; tensors are kept.

    Raises:
        TypeError: an object of another type (it could not be loaded with ``weights_only=True``).
    """
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return str(obj)
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if type(obj) in (list, tuple) else [plain(v) for v in obj]
    for t in (bool, int, float, str):  # subclasses, e.g. an IntEnum
        if isinstance(obj, t):
            return t(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (tensors and plain values only)")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (numpy scalars allowed).

    Raises:
        CheckpointError: unreadable file, or it holds other objects (the message names them).
    """
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"Cannot load checkpoint {path} safely (tensors and plain values only): {first}") from None


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Save ``obj`` (state dicts + :func:`plain` values) through a temporary file, then rename."""
    p = Path(path)
    tmp = p.with_name("tmp_" + p.name)
    torch.save(obj, tmp)
    tmp.replace(p)
