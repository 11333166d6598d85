"""Where tensors run: the one resolver of a device name, for the loader, inference and evaluation.

``"auto"`` is CUDA when this process sees a GPU, else the CPU; anything else must name a
device this process can use (``cpu``, ``cuda``, ``cuda:N``). Asking for CUDA where there is
none is an error here, at the edge, rather than a crash deep inside a model or a DALI graph.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(ValueError):
    """A device name this process cannot use (one-line message)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; otherwise a checked torch.device."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise DeviceError(
                f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)"
            ) from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {str(dev)!r} (use cpu, cuda, cuda:N or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(dev)!r} requested but CUDA is not available (use cpu or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {str(dev)!r} requested but this process sees "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    return dev
