"""The ``cugan restore`` command line that reproduces a studio result exactly.

The studio's full-image run is ``cugan restore`` with the same arguments: the same decode
(:func:`pipeline.imageio.read_rgb8`), the same z (the checkpoint's scale), the same blend
(:func:`models.dni.blend_generators`), the same default tiling and the same
:func:`pipeline.inference.restore`. Numbers are written with Python's shortest round-trip
form (``repr``), so the command parses back to the very floats the studio used.
"""

from __future__ import annotations

import shlex

from pipeline.studio.session import ModelSpec

__all__ = ["number", "restore_command"]


def number(value: float) -> str:
    """``2.0`` -> ``2``, ``0.35`` -> ``0.35``: exact (round-trip) and short."""
    return repr(float(value)).removesuffix(".0")


def restore_command(
    *,
    input_name: str,
    output_name: str,
    spec: ModelSpec,
    blur: float,
    noise: float,
    alpha: float | None,
    cond_map_name: str | None = None,
    device: str = "auto",
) -> str:
    """The shell command (quoted for POSIX shells) that writes the studio's full result.

    With a painted region the condition is the downloaded map (``--cond-map``, which holds
    both z's); otherwise ``--blur`` and ``--noise``. ``alpha`` only with an MSE + GAN pair.
    """
    parts = ["cugan", "restore", input_name, output_name]
    if spec.is_pair:
        parts += ["--alpha", number(alpha if alpha is not None else 1.0)]
        parts += ["--mse-model", str(spec.mse_model), "--gan-model", str(spec.gan_model)]
    else:
        parts += ["--model", str(spec.model)]
    if cond_map_name is not None:
        parts += ["--cond-map", cond_map_name]
    else:
        parts += ["--blur", number(blur), "--noise", number(noise)]
    if device != "auto":
        parts += ["--device", device]
    return shlex.join(parts)
