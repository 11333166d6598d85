"""The inference layer's errors, below every module that raises them (one line each)."""

from __future__ import annotations

__all__ = ["ExportError", "InferenceError", "PathUnavailable"]


class InferenceError(RuntimeError):
    """Inference cannot give a usable result (e.g. the model produced NaN); one-line message.
    The CLI turns it (and its subclasses) into ``cugan: error: <reason>``."""


class PathUnavailable(InferenceError):
    """An inference path cannot be built here (no compiler, no ONNX Runtime provider, an
    exporter limitation). The chooser skips such a path; an explicit request fails with it."""


class ExportError(InferenceError):
    """The export failed or did not verify against PyTorch."""
