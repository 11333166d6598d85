"""The ``cugan restore`` command line that reproduces a studio result exactly.

The studio's full-image run is ``cugan restore`` with the same arguments: the same decode
(:func:`pipeline.imageio.read_rgb8`), the same z (the checkpoint's scale), the same blend
(:func:`models.dni.blend_generators`), the same default tiling and the same
:func:`pipeline.inference.restore` on the same inference path, which the command states
(``--backend`` and ``--precision``: the session's path, not whatever ``cugan restore`` would
choose for one image on the machine it runs on; :mod:`pipeline.studio.session`). Registry
models are named by the version they resolved to, with the store they came from
(``--tracking-uri``). Numbers are written with Python's shortest round-trip form (``repr``),
so the command parses back to the very floats the studio used.
"""

from __future__ import annotations

import shlex

from pipeline.inference import PathSpec
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
    path: PathSpec | None = None,
    tracking_uri: str | None = None,
) -> str:
    """The shell command (quoted for POSIX shells) that writes the studio's full result.

    With a painted region the condition is the downloaded map (``--cond-map``, which holds
    both z's); otherwise ``--blur`` and ``--noise``. ``alpha`` only with an MSE + GAN pair.
    ``path``: the inference path the studio ran (``--backend``, ``--precision``);
    ``tracking_uri``: the store of registry models (``--tracking-uri``).
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
    if path is not None:
        parts += ["--backend", path.backend.value, "--precision", path.precision.value]
    if tracking_uri is not None:
        parts += ["--tracking-uri", tracking_uri]
    return shlex.join(parts)
