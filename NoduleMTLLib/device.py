"""Compute device choice: CUDA when present, CPU otherwise (MPS on Apple Silicon when asked)."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(RuntimeError):
    """The requested device is not available."""


def resolve_device(name: str = "auto") -> torch.device:
    """Map a device name to a torch device.

    ``auto``: CUDA if ``torch.cuda.is_available()``, else CPU.  ``cuda``/``mps`` when
    unavailable raise :class:`DeviceError` (an explicit request is not silently ignored).
    Raises ValueError for an unknown name.
    """
    name = (name or "auto").lower()
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but torch sees no CUDA GPU (use --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("MPS was requested but is not available on this machine")
    return torch.device(name)
