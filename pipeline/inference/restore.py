"""Restoring one 8-bit image with a generator: validation, conversions, and the chosen path.

:func:`restore` takes and returns ``uint8 H x W x 3`` arrays, so that what the CLI writes is
exactly what an evaluation computes: the conversions are :func:`pipeline.degradation.to_tensor`
(``k / 255``) and :func:`pipeline.degradation.to_uint8` (clip, round half up like MATLAB
``im2uint8``). Padding and tiling: :mod:`pipeline.inference.geometry`.

Which inference path runs: a :class:`~pipeline.inference.prepared.PreparedModel` brings its
own; a plain generator gets the one chosen for it on this machine
(:func:`~pipeline.inference.prepared.default_prepared`, :mod:`pipeline.inference.choice`).

The condition is a vector z, or a z map (a condition per pixel, :func:`validate_z_map`): an
``H x W x cond_dim`` array laid out like the image, either uint8 (``z = k / 255``, the form of a
condition-map file) or floating in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from models.generator import Generator, GeneratorConfig
from pipeline.degradation import to_tensor, to_uint8
from pipeline.device import resolve_device
from pipeline.inference.errors import InferenceError
from pipeline.inference.geometry import Progress, pad_to_multiple, run_pieces
from pipeline.inference.prepared import PreparedModel, default_prepared

__all__ = ["InferenceError", "restore", "validate_z", "validate_z_map"]

log = logging.getLogger(__name__)


def validate_z(z: Tensor | np.ndarray | Sequence[float] | None, cond_dim: int) -> Tensor:
    """``z`` as a float32 ``[1, cond_dim]`` tensor, or ValueError with a one-line reason.

    Accepts ``[cond_dim]`` or ``[1, cond_dim]``; every entry must be finite and in [0, 1].
    """
    if z is None:
        raise ValueError(f"z is required: {cond_dim} numbers in [0, 1]")
    try:
        t = torch.as_tensor(z.detach().cpu() if isinstance(z, Tensor) else z, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"z must be {cond_dim} numbers in [0, 1] (got {z!r})") from None
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.shape[0] != cond_dim:
        raise ValueError(f"z must have shape [{cond_dim}] or [1, {cond_dim}] (got {list(t.shape)})")
    values = [round(v, 6) for v in t.tolist()]
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"z entries must be finite (got {values})")
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"z entries must lie in [0, 1] (got {values})")
    return t.to(torch.float32)[None]


def validate_z_map(zmap: Tensor | np.ndarray, cond_dim: int, height: int, width: int) -> Tensor:
    """A z map ``H x W x cond_dim`` as a float32 ``[1, cond_dim, H, W]`` tensor, or ValueError.

    uint8 maps hold ``z = k / 255`` (the same ``k / 255`` as :func:`to_tensor` for images), the
    form of a condition-map file; floating maps hold z itself, finite and in [0, 1]. The map
    must have the image's height and width.
    """
    if isinstance(zmap, Tensor):
        zmap = zmap.detach().cpu().numpy()
    if not isinstance(zmap, np.ndarray):
        raise TypeError(f"a z map must be an array (got {type(zmap).__name__})")
    want = (height, width, cond_dim)
    if zmap.ndim != 3 or zmap.shape != want:
        raise ValueError(
            f"z map must have shape H x W x {cond_dim} = {height} x {width} x {cond_dim} "
            f"(the image's size; got {' x '.join(map(str, zmap.shape))})"
        )
    t = torch.tensor(zmap).permute(2, 0, 1)[None]  # a copy: the map may be a read-only view
    if zmap.dtype == np.uint8:
        return t.to(torch.float32) / 255.0
    if not np.issubdtype(zmap.dtype, np.floating):
        raise ValueError(f"z map must be uint8 (k / 255) or floating in [0, 1] (got {zmap.dtype})")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("z map entries must be finite")
    if bool((t < 0).any()) or bool((t > 1).any()):
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(f"z map entries must lie in [0, 1] (got {lo:g} .. {hi:g})")
    return t.to(torch.float32)


def _condition(
    z: Tensor | np.ndarray | Sequence[float] | None, cfg: GeneratorConfig, height: int, width: int
) -> Tensor | None:
    """z as the generator takes it: ``[1, D]``, a ``[1, D, H, W]`` map, or None (unconditional)."""
    if not cfg.conditional and z is None:
        return None
    if isinstance(z, (np.ndarray, Tensor)) and z.ndim == 3:
        return validate_z_map(z, cfg.cond_dim, height, width)
    return validate_z(z, cfg.cond_dim)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (got {type(image).__name__})")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (got {image.dtype})")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must have shape H x W x 3 (got {image.shape})")


def restore(
    model: Generator | PreparedModel,
    image: np.ndarray,
    z: Tensor | np.ndarray | Sequence[float] | None,
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Restore an 8-bit RGB image with ``model`` steered by ``z``; returns uint8 H x W x 3.

    Args:
        model: a :class:`~pipeline.inference.prepared.PreparedModel` (its path and device), or
            a :class:`~models.generator.Generator`, which runs on the path chosen for it on
            this machine (moved to ``device`` and put in eval mode: this mutates the module,
            as ``module.to`` does).
        image: ``uint8 H x W x 3``.
        z: ``[cond_dim]`` or ``[1, cond_dim]`` in [0, 1]; or a z map ``H x W x cond_dim``
            (uint8 ``k / 255`` or floating in [0, 1], :func:`validate_z_map`); may be None
            for an unconditional model (the Unet baseline), which ignores it.
        tile: core size of square tiles in pixels; None (or a tile covering the image) runs
            the image in one piece (:mod:`pipeline.inference.geometry`).
        tile_overlap: margin of context around each core.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``; None is
            the prepared model's device, or the CPU for a plain generator. A prepared model
            refuses another device.
        progress: called as ``progress(done, total)`` after each tile (once when untiled).
    """
    _check_image(image)
    cfg = model.config
    h, w = image.shape[:2]
    zt = _condition(z, cfg, h, w)
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0):
        raise ValueError(f"tile must be a positive integer or None (got {tile!r})")
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
        raise ValueError(f"tile_overlap must be a non-negative integer (got {tile_overlap!r})")
    if isinstance(model, PreparedModel):
        prepared = model
        if device is not None and resolve_device(device) != prepared.device:
            raise ValueError(
                f"this model was prepared for {prepared.device}, not {resolve_device(device)}"
            )
    else:
        dev = resolve_device("cpu" if device is None else device)
        prepared = default_prepared(model, dev, h * w)

    m = cfg.size_multiple
    with torch.inference_mode():
        x = pad_to_multiple(to_tensor(image), m)  # on the CPU; pieces move one at a time
        if zt is not None and zt.dim() == 4:
            zt = pad_to_multiple(zt, m)  # padded like the image, cropped with each tile
        out = run_pieces(
            prepared.path,
            x,
            zt,
            out_channels=cfg.out_channels,
            multiple=m,
            tile=tile,
            overlap=tile_overlap,
            device=prepared.device,
            dtype=prepared.path.input_dtype,
            progress=progress,
        )
        out = out[..., :h, :w]
        if not bool(torch.isfinite(out).all()):
            raise InferenceError("the model produced non-finite values (NaN or inf)")
        return to_uint8(out)
