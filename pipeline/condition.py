"""The condition vector z and the evaluation-setting names: the one owner of both conversions.

``z = [blur / blur_max, noise / noise_max]`` (docs/cugan-method.md: ``[r / 4, sigma / 50]``). The
scale is part of a trained model, not of the code: a profile may train with other maxima, and a
checkpoint records the scale it was trained with (``generator.json``, see
:mod:`pipeline.checkpoint`). Everything that turns user-facing levels into z -- the CLI, the
studio, evaluation, figures, validation, the training loaders outside the DALI graph -- goes
through :class:`ConditionScale`, built from the checkpoint (inference) or from
``params.degradation`` (training, data). The DALI graph computes the same formula on its own
nodes (it cannot call Python), from the same two numbers.

Settings of the evaluation sets are named ``blur{r:g}_noise{sigma:g}`` (``blur2_noise30``,
``blur0.5_noise0``): :func:`setting_key` writes that name and :func:`parse_setting_key` reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported where a conversion runs: the data stages never pay for it
    import numpy as np
    from torch import Tensor

    LevelsLike = float | int | Sequence[float] | Tensor | np.ndarray


class _ScaleParams(Protocol):
    """What :meth:`ConditionScale.from_params` reads: ``params.degradation``.

    A protocol rather than ``pipeline.config.DegradationParams`` itself, because config imports
    this module (for setting names): naming the type here would close an import circle.
    """

    blur_max: float
    noise_max: float


__all__ = [
    "DEFAULT_SCALE",
    "ConditionScale",
    "parse_setting_key",
    "setting_key",
]

_SETTING_RE = re.compile(r"^blur(?P<blur>\d+(?:\.\d+)?)_noise(?P<noise>\d+(?:\.\d+)?)$")


def setting_key(blur: float, noise: float) -> str:
    """``(2, 30)`` -> ``"blur2_noise30"``: the directory and metric name of a setting."""
    return f"blur{float(blur):g}_noise{float(noise):g}"


def parse_setting_key(key: str) -> tuple[float, float]:
    """``"blur2_noise30"`` -> ``(2.0, 30.0)``; ValueError (one line) for anything else."""
    m = _SETTING_RE.match(key)
    if m is None:
        raise ValueError(f"not a setting name: {key!r} (expected e.g. blur2_noise30)")
    return float(m["blur"]), float(m["noise"])


def _as_levels(values: LevelsLike, name: str) -> Tensor:
    """Float64 CPU tensor ``[n]`` from a scalar or a 1-D sequence/array/tensor."""
    import torch

    t = torch.as_tensor(
        values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=torch.float64
    )
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D sequence (got shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} levels must be finite and >= 0 (got {t.tolist()})")
    return t


@dataclass(frozen=True)
class ConditionScale:
    """The maxima that map degradation levels onto z in [0, 1].

    ``blur_max``: blur std ``r`` (pixels) at ``z_blur = 1``; ``noise_max``: noise std ``sigma``
    (0..255 scale) at ``z_noise = 1``. The defaults are the method's (4 and 50).
    """

    blur_max: float = 4.0
    noise_max: float = 50.0

    def __post_init__(self) -> None:
        for name in ("blur_max", "noise_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number (got {value!r})")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be finite and > 0 (got {value!r})")
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_params(cls, degradation: _ScaleParams) -> ConditionScale:
        """The scale a training/data run uses (``params.degradation``)."""
        return cls(blur_max=degradation.blur_max, noise_max=degradation.noise_max)

    def to_dict(self) -> dict[str, float]:
        return {"blur_max": self.blur_max, "noise_max": self.noise_max}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConditionScale:
        """Inverse of :meth:`to_dict`; ValueError names an unknown or missing key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"condition scale must be an object (got {type(data).__name__})")
        unknown = sorted(set(data) - {"blur_max", "noise_max"})
        missing = sorted({"blur_max", "noise_max"} - set(data))
        if unknown or missing:
            raise ValueError(f"condition scale: unknown keys {unknown}, missing keys {missing}")
        return cls(blur_max=data["blur_max"], noise_max=data["noise_max"])

    # -- levels <-> z ----------------------------------------------------------------------------

    def check_levels(
        self, blur: float, noise: float, *, names: tuple[str, str] = ("blur", "noise")
    ) -> tuple[float, float]:
        """One (blur, noise) pair of user input, checked against the scale (one-line error).

        ``names`` are what the user calls the two values (``("--blur", "--noise")`` on the
        command line); only the message uses them.
        """
        blur, noise = float(blur), float(noise)
        if not (math.isfinite(blur) and 0.0 <= blur <= self.blur_max):
            raise ValueError(f"{names[0]} must be in [0, {self.blur_max:g}] (got {blur:g})")
        if not (math.isfinite(noise) and 0.0 <= noise <= self.noise_max):
            raise ValueError(f"{names[1]} must be in [0, {self.noise_max:g}] (got {noise:g})")
        return blur, noise

    def to_z(self, blur: LevelsLike, noise: LevelsLike) -> Tensor:
        """``[r / blur_max, sigma / noise_max]`` as a float32 ``[B, 2]`` tensor.

        A scalar on one side broadcasts against ``B`` levels on the other. ValueError for
        levels outside ``[0, blur_max]`` / ``[0, noise_max]``.
        """
        import torch

        r = _as_levels(blur, "blur")
        s = _as_levels(noise, "noise")
        if r.shape[0] != s.shape[0]:
            if min(r.shape[0], s.shape[0]) != 1:
                raise ValueError(f"{r.shape[0]} blur levels but {s.shape[0]} noise levels")
            r, s = torch.broadcast_tensors(r, s)
        if bool((r > self.blur_max).any()):
            raise ValueError(
                f"blur level above blur_max={self.blur_max:g} (got {r.max().item():g})"
            )
        if bool((s > self.noise_max).any()):
            raise ValueError(
                f"noise level above noise_max={self.noise_max:g} (got {s.max().item():g})"
            )
        return torch.stack([r / self.blur_max, s / self.noise_max], dim=1).to(torch.float32)

    def to_levels(
        self, z: Tensor | Sequence[Sequence[float]] | Sequence[float] | np.ndarray
    ) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`to_z`: ``[B, 2]`` (or ``[2]``) z in [0, 1] -> (blur[B], noise[B]).

        Float64, so that ``levels -> z -> levels`` round-trips grid values closely enough to be
        rounded back onto the grid by the caller.
        """
        import torch

        t = torch.as_tensor(
            z.detach().cpu() if isinstance(z, torch.Tensor) else z, dtype=torch.float64
        )
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"z must have shape [B, 2] (got {tuple(t.shape)})")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
            raise ValueError(f"z entries must lie in [0, 1] (got {t.tolist()})")
        return t[:, 0] * self.blur_max, t[:, 1] * self.noise_max

    def describe(self) -> str:
        """``z = [blur/4, noise/50]`` for help texts and notes."""
        return f"z = [blur/{self.blur_max:g}, noise/{self.noise_max:g}]"


#: The method's scale: ``z = [r / 4, sigma / 50]``.
DEFAULT_SCALE = ConditionScale()
