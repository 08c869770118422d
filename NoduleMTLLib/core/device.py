"""Compute device: choice (CUDA when present, CPU otherwise, MPS on Apple Silicon when asked),
probing for the panel, and the CUDA out-of-memory fallback to the CPU.

torch is imported inside the functions, so the module imports in Slicer's GUI process
before torch is installed (:func:`device_choices`, :func:`device_tooltip` then answer
without it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


from .errors import DeviceError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def resolve_device(name="auto"):
    """Map a device name to a ``torch.device`` (a ``torch.device`` is returned as it is).

    ``auto``: CUDA if ``torch.cuda.is_available()``, else CPU.  ``cuda``/``mps`` when
    unavailable raise :class:`DeviceError` (an explicit request is not silently ignored).
    Raises ValueError for an unknown name.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but torch sees no CUDA GPU (use --device auto or cpu)")
    if name == "mps" and not mps_available(torch):
        raise DeviceError("MPS was requested but is not available on this machine")
    return torch.device(name)


def mps_available(torch_module=None) -> bool:
    """True when torch reports a usable Apple MPS device (False without torch)."""
    torch = torch_module if torch_module is not None else _import_torch()
    if torch is None:
        return False
    return bool(torch.backends.mps.is_available())


def cuda_available(torch_module=None) -> bool:
    """True when torch sees a CUDA GPU (False without torch)."""
    torch = torch_module if torch_module is not None else _import_torch()
    return bool(torch is not None and torch.cuda.is_available())


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
        return (f"auto: {torch.cuda.get_device_name(0)} (CUDA). cpu: always the CPU. "
                "On CUDA out-of-memory the run is retried on the CPU.")
    return "auto: the CPU (torch sees no CUDA GPU). cuda: fails here. cpu: always the CPU."


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or MPS) out-of-memory error: ``torch.OutOfMemoryError``, or a
    RuntimeError whose text says "out of memory" (MPS, cuDNN)."""
    torch = _import_torch()
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def with_cpu_fallback(run: Callable[[str], Any], device: str = "auto", notify: Callable[[str], None] | None = None):
    """Call ``run(device)``; if that runs out of GPU memory, call ``run("cpu")``.

    Used by :func:`NoduleMTLLib.service.analysis.analyze` (so the CLI, the batch, the Slicer CLI
    module and the module's Logic all have it): a small GPU never ends a run that the CPU
    can finish.  The CUDA cache is emptied before the retry.  When the result has a ``run``
    dict (an :class:`~NoduleMTLLib.core.results.AnalysisResult`), the retry is recorded there:
    ``run["device_requested"]`` (what was asked) and ``run["fallback"]`` (the message).

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
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if notify is not None:
            notify(message)
        result = run("cpu")
        run_info = getattr(result, "run", None)
        if isinstance(run_info, dict):
            run_info["device_requested"] = device
            run_info["fallback"] = message
        return result
