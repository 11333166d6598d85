"""Restoring one 8-bit image with a generator: padding, optional tiling, and model loading.

:func:`restore` takes and returns ``uint8 H x W x 3`` arrays, so that what the CLI writes is
exactly what an evaluation computes: the conversions are :func:`pipeline.degradation.to_tensor`
(``k / 255``) and :func:`pipeline.degradation.to_uint8` (clip, round half up like MATLAB
``im2uint8``).

The U-Net halves the resolution ``S - 1`` times, so H and W must be multiples of
``size_multiple = 2**(S-1)``: the image is padded on the bottom and right by replicating its
last row/column, and the output is cropped back.

Tiling (for images too large to run in one piece) is "keep the centre": the padded image is
cut into cores of ``tile x tile`` pixels that partition it; each core is run with a margin of
``tile_overlap`` pixels of real image around it (less at the image border, where the untiled
run sees the same border), and only the core of each output is kept. Core origins and margins
are multiples of ``size_multiple``, so every tile sees the same down-sampling grid as the whole
image. A core pixel's output then equals the untiled one exactly (up to float summation order)
whenever the margin covers the network's receptive field (:func:`receptive_field_radius`);
smaller margins give small differences along the core boundaries, which in practice stay small
because the effective receptive field is much narrower than the theoretical one.

The condition is a vector z, or a z map (a condition per pixel, :func:`validate_z_map`): an
``H x W x cond_dim`` array laid out like the image, either uint8 (``z = k / 255``, the form of a
condition-map file) or floating in [0, 1]. The map is padded like the image and each tile gets
the matching crop of it, so tiling a map behaves exactly as tiling the image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.dni import DNIError, blend_generators, check_alpha
from models.generator import Generator, GeneratorConfig
from pipeline.checkpoint import LoadedGenerator, load_checkpoint
from pipeline.condition import ConditionScale
from pipeline.degradation import to_tensor, to_uint8
from pipeline.device import resolve_device

__all__ = [
    "AUTO_TILE_MAX_PIXELS",
    "AUTO_TILE_SIZE",
    "InferenceError",
    "InferenceModel",
    "ModelArgumentNames",
    "Progress",
    "auto_tile",
    "load_model_for_inference",
    "receptive_field_radius",
    "restore",
    "tile_layout",
    "validate_z",
    "validate_z_map",
]

log = logging.getLogger(__name__)

#: Prefix of MLflow registered-model URIs (supported in a later issue).
REGISTERED_MODEL_PREFIX = "models:/"


#: ``progress(done, total)``: called after each piece (tile) of an image is restored.
Progress = Callable[[int, int], None]


class InferenceError(RuntimeError):
    """The model produced something unusable (e.g. NaN); one-line message."""


# ---------------------------------------------------------------------------------------------
# validation


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


# ---------------------------------------------------------------------------------------------
# tiling geometry


def receptive_field_radius(cfg: GeneratorConfig) -> int:
    """Upper bound, in input pixels, on how far an output pixel of G can see.

    Sums the half-widths of every layer on the path head -> left blocks -> downs -> right
    blocks -> ups -> tail, each scaled by the pixel stride of its scale. A ``tile_overlap`` at
    least this large makes tiled and untiled outputs agree up to float rounding.
    """
    radius = 1 + 1  # head and tail 3x3 convs at stride 1
    for s, n in enumerate(cfg.blocks_per_scale):
        stride = 2**s
        radius += 2 * (2 * n) * stride  # n MRBs per side, two 3x3 convs each, both sides
        if s > 0:
            # the k x k stride-2 down conv entering scale s and the 2x2 up conv leaving it
            radius += (cfg.down_kernel - 1) * 2 ** (s - 1) + 2 ** (s - 1)
    return radius


#: The default tiling (``cugan restore --tile auto``, the studio): images up to this many pixels
#: run in one piece (a 1920x1080 frame is 2.07 MP; the authors' model keeps ~1 GB of float32
#: activations per megapixel), larger ones in tiles of AUTO_TILE_SIZE.
AUTO_TILE_MAX_PIXELS = 1 << 21
AUTO_TILE_SIZE = 512


def auto_tile(height: int, width: int) -> int | None:
    """The default tile size for an image: None (one piece) up to AUTO_TILE_MAX_PIXELS."""
    return AUTO_TILE_SIZE if height * width > AUTO_TILE_MAX_PIXELS else None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_layout(
    length: int, tile: int, overlap: int, multiple: int
) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis of a padded length: ``(in_start, in_end, core_start, core_end)``.

    Cores of ``tile`` pixels (rounded up to ``multiple``) partition ``[0, length)``; inputs add
    ``overlap`` (rounded up to ``multiple``) on each side, clamped to the image.
    """
    if length % multiple:
        raise ValueError(f"length {length} is not a multiple of {multiple}")
    core = _round_up(max(tile, 1), multiple)
    margin = _round_up(max(overlap, 0), multiple)
    spans = []
    for start in range(0, length, core):
        end = min(start + core, length)
        spans.append((max(0, start - margin), min(length, end + margin), start, end))
    return spans


# ---------------------------------------------------------------------------------------------
# restoration


def restore(
    model: Generator,
    image: np.ndarray,
    z: Tensor | np.ndarray | Sequence[float] | None,
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Restore an 8-bit RGB image with ``model`` steered by ``z``; returns uint8 H x W x 3.

    Args:
        model: a :class:`~models.generator.Generator` (moved to ``device`` and put in eval
            mode: this mutates the module, as ``module.to`` does).
        image: ``uint8 H x W x 3``.
        z: ``[cond_dim]`` or ``[1, cond_dim]`` in [0, 1]; or a z map ``H x W x cond_dim``
            (uint8 ``k / 255`` or floating in [0, 1], :func:`validate_z_map`); may be None
            for an unconditional model (the Unet baseline), which ignores it.
        tile: core size of square tiles in pixels; None (or a tile covering the image) runs
            the image in one piece.
        tile_overlap: margin of context around each core (see the module docstring).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
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
    dev = resolve_device(device)
    model.to(dev).eval()
    dtype = next(model.parameters()).dtype
    if zt is not None and zt.dim() == 2:
        zt = zt.to(device=dev, dtype=dtype)

    m = model.size_multiple
    with torch.inference_mode():
        x = to_tensor(image)  # on the CPU; tiles move to the device one at a time
        x = _pad_to_multiple(x, m)
        if zt is not None and zt.dim() == 4:
            zt = _pad_to_multiple(zt, m)  # padded like the image, cropped with each tile
        hp, wp = x.shape[-2:]
        if tile is None or (tile >= hp and tile >= wp):
            out = model(x.to(device=dev, dtype=dtype), _to(zt, dev, dtype)).float().cpu()
            if progress is not None:
                progress(1, 1)
        else:
            out = _run_tiled(model, x, zt, tile, tile_overlap, m, dev, dtype, progress)
        out = out[..., :h, :w]
        if not bool(torch.isfinite(out).all()):
            raise InferenceError("the model produced non-finite values (NaN or inf)")
        return to_uint8(out)


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad a [B, C, H, W] tensor on the bottom/right to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = _round_up(h, multiple) - h, _round_up(w, multiple) - w
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def _to(z: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    return None if z is None else z.to(device=device, dtype=dtype)


def _run_tiled(
    model: Generator,
    x: Tensor,
    z: Tensor | None,
    tile: int,
    overlap: int,
    multiple: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress | None = None,
) -> Tensor:
    hp, wp = x.shape[-2:]
    rows = tile_layout(hp, tile, overlap, multiple)
    cols = tile_layout(wp, tile, overlap, multiple)
    log.debug(
        "tiled inference: %d x %d tiles of %d px, overlap %d", len(rows), len(cols), tile, overlap
    )
    out = torch.empty(x.shape[0], model.config.out_channels, hp, wp, dtype=torch.float32)
    done, total = 0, len(rows) * len(cols)
    for y0, y1, cy0, cy1 in rows:
        for x0, x1, cx0, cx1 in cols:
            piece = x[..., y0:y1, x0:x1].to(device=device, dtype=dtype)
            z_piece = z if z is None or z.dim() == 2 else z[..., y0:y1, x0:x1]
            result = model(piece, _to(z_piece, device, dtype))
            out[..., cy0:cy1, cx0:cx1] = (
                result[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].float().cpu()
            )
            done += 1
            if progress is not None:
                progress(done, total)
    return out


# ---------------------------------------------------------------------------------------------
# model loading


@dataclass(frozen=True)
class ModelArgumentNames:
    """What the caller's user calls the four model arguments, for the messages only.

    The rules of :func:`load_model_for_inference` are stated once, there; a command line
    passes its flag names (``--model``, ...) so that its user reads the words they typed.
    """

    model: str = "model"
    mse_model: str = "mse_model"
    gan_model: str = "gan_model"
    alpha: str = "alpha"


@dataclass(frozen=True)
class InferenceModel:
    """A generator ready to restore with, and the z scale to drive it with.

    ``model``: one checkpoint's generator, or the DNI blend of two (eval mode). ``scale``: the
    :class:`~pipeline.condition.ConditionScale` the checkpoint(s) recorded -- the ONLY scale
    to turn blur/noise levels into z for this model. ``source``: a description for logs.
    ``parts``: the loaded checkpoint(s) it was made from (one, or MSE then GAN), so that a
    caller that re-blends at another alpha (the studio) never reads the files again.
    """

    model: Generator
    scale: ConditionScale
    source: str
    parts: tuple[LoadedGenerator, ...]

    @property
    def config(self) -> GeneratorConfig:
        return self.model.config


def load_model_for_inference(
    model: str | os.PathLike[str] | None = None,
    *,
    mse_model: str | os.PathLike[str] | None = None,
    gan_model: str | os.PathLike[str] | None = None,
    alpha: float | None = None,
    map_location: str | torch.device = "cpu",
    names: ModelArgumentNames = ModelArgumentNames(),
) -> InferenceModel:
    """The one loading entry for inference: one checkpoint, or the DNI blend of an MSE and a GAN.

    ``model``: a checkpoint directory or ``.safetensors`` file (``pipeline.checkpoint``).
    ``alpha`` with ``mse_model`` and ``gan_model``: ``(1 - alpha) * GAN + alpha * MSE`` over all
    parameters (``models.dni``); the two must have equal configs and record the same z scale.
    Give exactly one of the two forms. Every rule on these arguments is checked here, before
    any file is read (alpha by :func:`models.dni.check_alpha`); ValueError names the argument
    as ``names`` spells it, ``CheckpointError`` a bad file.
    """
    blend = [
        name
        for name, value in ((names.mse_model, mse_model), (names.gan_model, gan_model))
        if value is not None
    ]
    if model is not None:
        if blend or alpha is not None:
            raise ValueError(
                f"give either {names.model}, or {names.alpha} with {names.mse_model} and "
                f"{names.gan_model}, not both"
            )
        loaded = _load_one(model, map_location)
        return InferenceModel(loaded.model, loaded.scale, str(model), (loaded,))
    if alpha is None:
        if blend:
            raise ValueError(
                f"{' and '.join(blend)} given without {names.alpha} (the MSE<->GAN blend weight)"
            )
        raise ValueError(
            f"no model given: {names.model}, or {names.alpha} with {names.mse_model} and "
            f"{names.gan_model}"
        )
    if mse_model is None or gan_model is None:
        raise ValueError(f"{names.alpha} needs both {names.mse_model} and {names.gan_model}")
    alpha = check_alpha(alpha, name=names.alpha)

    mse = _load_one(mse_model, map_location)
    gan = _load_one(gan_model, map_location)
    if mse.scale != gan.scale:
        raise ValueError(
            f"cannot blend {mse_model} and {gan_model}: they were trained with different "
            f"condition scales ({mse.scale.describe()} vs {gan.scale.describe()})"
        )
    try:
        blended = blend_generators(mse.model, gan.model, alpha)
    except DNIError as err:
        raise ValueError(f"cannot blend {mse_model} and {gan_model}: {err}") from None
    source = f"alpha {alpha:g} blend of {mse_model} (MSE) and {gan_model} (GAN)"
    log.debug("DNI %s%s%s", source, _describe(mse.metadata), _describe(gan.metadata))
    return InferenceModel(blended, mse.scale, source, (mse, gan))


def _load_one(spec: str | os.PathLike[str], map_location: str | torch.device) -> LoadedGenerator:
    if isinstance(spec, str) and spec.startswith(REGISTERED_MODEL_PREFIX):
        raise ValueError(
            f"{spec}: registered model names are not supported yet; give a checkpoint directory "
            "or .safetensors file"
        )
    loaded = load_checkpoint(spec, map_location=map_location)
    log.debug("loaded generator from %s%s", spec, _describe(loaded.metadata))
    return loaded


def _describe(meta: dict) -> str:
    keys = [k for k in ("stage", "iteration", "source") if k in meta]
    return " (" + ", ".join(f"{k}={meta[k]}" for k in keys) + ")" if keys else ""
