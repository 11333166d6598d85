"""Reference degradation: blur -> noise -> clip -> 8 bits (docs/cugan-method.md, section 2).

This module is the oracle. The DALI loader (GPU and CPU) and the evaluation-set builder must
produce what these functions produce, and the tests pin them to independent constructions
(OpenCV / SciPy kernels, ``scipy.ndimage.correlate``).

Semantics, all following the authors' MATLAB pipeline:

* **Blur**: ``fspecial('gaussian', size, r)`` -- a ``size x size`` Gaussian of std ``r``,
  MATLAB's truncation of entries below ``eps * max`` included, normalised to sum 1 -- applied
  per channel as a correlation with replicate border, like ``imfilter(img, k, 'replicate')``.
  ``r == 0`` is the identity (a delta kernel; MATLAB itself would divide by zero there).
* **Noise**: ``sigma / 255 * N(0, 1)`` added per pixel and channel to the blurred image in
  [0, 1], drawn from an explicit ``torch.Generator``.
* **Quantise**: clip to [0, 1] and round to ``k / 255`` with round-half-up, as MATLAB
  ``im2uint8`` does (``uint8()`` rounds half away from zero; on non-negative values that is
  half up). ``torch.round`` would round half to even, which differs on exact ``.5`` values.

Context margins: ``border="valid"`` blurs without padding (the output is ``size - 1`` pixels
smaller per axis), for the training loaders, which degrade a window of the sub-image that is
``size // 2`` pixels larger than the patch on every side and keep only its centre; so a patch's
blur equals the blur of the whole sub-image cropped (docs/data.md, "Degradation").

Blur is implemented as two 1-D passes (the Gaussian is separable; a 21-tap pass costs 2 x 21
multiply-adds per pixel instead of 441), with per-sample kernels in one grouped convolution, so
a batch may mix blur levels. The separable kernel differs from MATLAB's 2-D one only by the
``eps * max`` truncation, i.e. by less than 2.3e-16 per weight; ``method="direct"`` applies the
2-D kernel itself and the tests show the two agree to 1e-12 in float64.

Precision: the kernels are built in float64 and cast to the image dtype; the computation runs in
the image dtype. Float32 (the default everywhere in the pipeline) carries about 1e-7 relative
error, i.e. ~3e-5 grey levels, so an 8-bit result can differ from a float64 computation only
where the exact value lies within that distance of a rounding boundary ``k + 0.5``. Pass
float64 tensors where bit-exact agreement with a float64 reference matters.

Level sampling (:func:`sample_levels`, ``degradation.sampling``): ``uniform`` draws both levels
uniformly on the grid; ``authors`` is the mixture of the authors' ``generate_2groups.m`` on the
same grid (one degradation for half the samples, both for the others; levels ``round(U * K)``
grid steps with ``U ~ Uniform(0, 1)``). The DALI graph draws the same distributions from the
constants defined here.

All functions are pure: randomness comes only from the generator argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import DegradationParams

__all__ = [
    "AUTHORS_BLUR_ONLY",
    "AUTHORS_SINGLE",
    "KERNEL_SIZE",
    "Border",
    "blur",
    "degrade",
    "gaussian_kernel1d",
    "gaussian_kernel2d",
    "level_grid",
    "quantize",
    "sample_levels",
    "to_tensor",
    "to_uint8",
]

KERNEL_SIZE = 21

# MATLAB's eps (double precision), used by fspecial to zero negligible kernel entries.
_MATLAB_EPS = float(np.finfo(np.float64).eps)

LevelsLike = float | int | Sequence[float] | Tensor | np.ndarray

#: ``replicate``: pad by replicating the outermost pixels (``imfilter(..., 'replicate')``), the
#: output has the input's size. ``valid``: no padding; the input carries the context itself.
Border = Literal["replicate", "valid"]

# The authors' level mixture (generate_2groups.m): P(one degradation) and, given one, P(blur).
AUTHORS_SINGLE = 0.5
AUTHORS_BLUR_ONLY = 0.5


# ---------------------------------------------------------------------------------------------
# kernels


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer (got {size!r})")


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"blur std must be finite and >= 0 (got {sigma})")
    return sigma


def gaussian_kernel1d(sigma: float, size: int = KERNEL_SIZE) -> Tensor:
    """Normalised 1-D Gaussian of std ``sigma`` on ``size`` taps (float64); delta for 0.

    The outer product of this with itself is MATLAB's ``fspecial`` kernel up to fspecial's
    ``eps * max`` truncation (see the module docstring).
    """
    _check_size(size)
    sigma = _check_sigma(sigma)
    return _kernels1d(torch.tensor([sigma], dtype=torch.float64), size)[0]


def gaussian_kernel2d(sigma: float, size: int = KERNEL_SIZE) -> Tensor:
    """MATLAB ``fspecial('gaussian', size, sigma)`` as a float64 ``[size, size]`` tensor.

    ``sigma == 0`` gives a delta (identity filter) instead of MATLAB's NaN.
    """
    _check_size(size)
    sigma = _check_sigma(sigma)
    half = (size - 1) // 2
    if sigma == 0:
        kernel = torch.zeros(size, size, dtype=torch.float64)
        kernel[half, half] = 1.0
        return kernel
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    rr = x[None, :] ** 2 + x[:, None] ** 2
    kernel = torch.exp(-rr / (2.0 * sigma * sigma))
    kernel[kernel < _MATLAB_EPS * kernel.max()] = 0.0
    return kernel / kernel.sum()


def _kernels1d(sigmas: Tensor, size: int) -> Tensor:
    """``[B] float64 -> [B, size]`` normalised 1-D Gaussians; rows with sigma 0 are deltas."""
    half = (size - 1) // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64, device=sigmas.device)
    s = sigmas.to(torch.float64)[:, None]
    zero = s == 0
    # Keep the division finite for sigma 0; those rows are replaced by deltas below.
    safe = torch.where(zero, torch.ones_like(s), s)
    g = torch.exp(-(x[None, :] ** 2) / (2.0 * safe * safe))
    g = g / g.sum(dim=1, keepdim=True)
    delta = (x == 0).to(torch.float64).expand_as(g)
    return torch.where(zero, delta, g)


# ---------------------------------------------------------------------------------------------
# level validation helpers


def _as_levels(values: LevelsLike, batch: int | None, name: str) -> Tensor:
    """Float64 CPU tensor of shape [batch] from a scalar or a [batch] sequence/tensor."""
    t = torch.as_tensor(
        values.detach().cpu() if isinstance(values, Tensor) else values, dtype=torch.float64
    )
    if t.ndim == 0:
        t = t.expand(batch if batch is not None else 1)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D sequence (got shape {tuple(t.shape)})")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} levels for a batch of {batch}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} levels must be finite and >= 0 (got {t.tolist()})")
    return t


def _check_image(img: Tensor, name: str = "img") -> None:
    if not isinstance(img, Tensor) or img.ndim != 4:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be a [B, C, H, W] tensor (got {shape})")
    if not img.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor in [0, 1] (got {img.dtype}); convert with to_tensor()"
        )


# ---------------------------------------------------------------------------------------------
# blur


def blur(
    img: Tensor,
    sigma: LevelsLike,
    size: int = KERNEL_SIZE,
    *,
    method: Literal["separable", "direct"] = "separable",
    border: Border = "replicate",
) -> Tensor:
    """Gaussian blur with replicate border, one std per sample (``imfilter(..., 'replicate')``).

    Args:
        img: ``[B, C, H, W]`` float tensor, any device.
        sigma: one std for the batch, or ``[B]`` stds (a tensor, a sequence or an array).
        size: odd kernel size (21 in the method).
        method: ``"separable"`` (two 1-D passes, the default) or ``"direct"`` (the 2-D MATLAB
            kernel, 441 instead of 42 multiply-adds per pixel; the literal reference).
        border: ``"replicate"`` (the method's) or ``"valid"``: no padding, the result is
            ``[B, C, H - size + 1, W - size + 1]`` (context-margin windows of the loaders).
    """
    _check_image(img)
    return _blur(img, sigma, size, method, border)


def _blur(img: Tensor, sigma: LevelsLike, size: int, method: str, border: str) -> Tensor:
    _check_size(size)
    b, c, h, w = img.shape
    sigmas = _as_levels(sigma, b, "blur")
    half = (size - 1) // 2
    if border == "replicate":
        # Replicate padding of both axes, then valid correlations: a clamped index is
        # separable, so padding once in 2-D and filtering rows then columns equals 2-D filtering.
        if bool((sigmas == 0).all()):
            return img.clone()
        padded = F.pad(img, (half, half, half, half), mode="replicate")
    elif border == "valid":
        if h < size or w < size:
            raise ValueError(f"a valid blur needs at least {size}x{size} pixels (got {h}x{w})")
        if bool((sigmas == 0).all()):
            return img[..., half : h - half, half : w - half].clone()
        padded, h, w = img, h - 2 * half, w - 2 * half
    else:
        raise ValueError(f"blur border must be 'replicate' or 'valid' (got {border!r})")
    flat = padded.reshape(1, b * c, h + 2 * half, w + 2 * half)
    if method == "separable":
        k1 = _kernels1d(sigmas, size).to(device=img.device, dtype=img.dtype)
        k1 = k1.repeat_interleave(c, dim=0)  # [B*C, size], sample-major like `flat`
        out = F.conv2d(flat, k1[:, None, None, :], groups=b * c)  # along W
        out = F.conv2d(out, k1[:, None, :, None], groups=b * c)  # along H
    elif method == "direct":
        k2 = torch.stack([gaussian_kernel2d(float(s), size) for s in sigmas])
        k2 = k2.to(device=img.device, dtype=img.dtype).repeat_interleave(c, dim=0)
        out = F.conv2d(flat, k2[:, None, :, :], groups=b * c)
    else:
        raise ValueError(f"blur method must be 'separable' or 'direct' (got {method!r})")
    return out.reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# noise, quantisation, full degradation


def quantize(img: Tensor) -> Tensor:
    """Clip to [0, 1] and round to the nearest ``k / 255``, ties up (MATLAB ``im2uint8``).

    The rounding runs in float64 whatever the input dtype, so that float32 inputs are rounded
    by their exact value (no double rounding of ``x * 255``); the result has the input dtype
    and equals ``k / 255`` correctly rounded to it.
    """
    return _quantize(img)


def _quantize(img: Tensor) -> Tensor:
    return _levels255(img).div_(255.0).to(img.dtype)


def _levels255(img: Tensor) -> Tensor:
    """Float64 ``round_half_up(clip(img, 0, 1) * 255)`` (integers 0..255 as floats)."""
    return torch.floor(img.to(torch.float64).clamp(0.0, 1.0) * 255.0 + 0.5)


def degrade(
    img: Tensor,
    blur: LevelsLike,
    noise: LevelsLike,
    *,
    generator: torch.Generator | None = None,
    quantize: bool = True,
    kernel_size: int = KERNEL_SIZE,
    border: Border = "replicate",
) -> Tensor:
    """Blur -> add ``noise/255 * N(0,1)`` -> clip -> round to ``k/255`` (the method's model).

    Args:
        img: ``[B, 3, H, W]`` float tensor in [0, 1] (any device, float32 or float64).
        blur: blur std ``r`` per sample (scalar or ``[B]``), in pixels.
        noise: noise std ``sigma`` per sample (scalar or ``[B]``) on the 0..255 scale.
        generator: source of the noise; required when any noise level is > 0 (there is no
            global-RNG fallback). Noise is drawn on the generator's device and moved to the
            image's device, so a CPU generator gives the same noise for CPU and CUDA images.
            Every sample draws ``C*H*W`` normals, one sample after another in batch order, also
            when its level is 0: the generator's consumption depends only on the shape, and
            degrading a batch equals degrading its samples one at a time with the same
            generator. Without a generator (all levels 0) nothing is drawn.
        quantize: clip and round to 8 bits (True, as a saved PNG); False returns the raw
            ``blurred + noise`` (unclipped), for tests and analysis.
        kernel_size: odd blur kernel size (21 in the method).
        border: ``"replicate"`` (the method's) or ``"valid"``: ``img`` is a context window
            ``kernel_size // 2`` pixels larger per side than the result (see :func:`blur`);
            noise is drawn for the result's pixels only.
    """
    _check_image(img)
    b = img.shape[0]
    noise_levels = _as_levels(noise, b, "noise")
    blurred = _blur(img, blur, kernel_size, "separable", border)
    out = blurred
    if generator is None and bool((noise_levels > 0).any()):
        raise ValueError("degrade() needs an explicit torch.Generator when noise > 0")
    if generator is not None:
        per_sample = []
        for i in range(b):
            n = torch.randn(
                blurred.shape[1:], generator=generator, dtype=img.dtype, device=generator.device
            )
            per_sample.append(n.to(img.device) * (float(noise_levels[i]) / 255.0))
        out = blurred + torch.stack(per_sample)
    if quantize:
        out = _quantize(out)
    return out


# ---------------------------------------------------------------------------------------------
# level sampling


def level_grid(maximum: float, step: float) -> list[float]:
    """``[0, step, ..., maximum]``: the grid training levels are drawn from (checked to fit)."""
    steps = maximum / step
    count = round(steps)
    if abs(steps - count) > 1e-9 * max(1.0, steps):
        raise ValueError(f"maximum {maximum:g} is not a multiple of the step {step:g}")
    # round() removes the binary noise of k * 0.1 so grid values print as 0.3, not 0.30000000004.
    return [round(k * step, 10) for k in range(count + 1)]


def _grid(maximum: float, step: float, name: str) -> Tensor:
    try:
        return torch.tensor(level_grid(maximum, step), dtype=torch.float64)
    except ValueError:
        raise ValueError(
            f"{name}_max={maximum:g} is not a multiple of {name}_step={step:g}"
        ) from None


def sample_levels(
    n: int, generator: torch.Generator, params: DegradationParams | None = None
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` (blur, noise) pairs on the grid, as ``params.sampling`` says (float32, CPU).

    Grid: ``0, blur_step, ..., blur_max`` x ``0, noise_step, ..., noise_max`` (41 x 51 points
    with the method's defaults).

    * ``uniform``: blur and noise independent and uniform over their grid points, so every
      pair is equally likely. Draws two ``randint`` vectors of ``n``.
    * ``authors``: per sample, with probability :data:`AUTHORS_SINGLE` one degradation --
      blur only with probability :data:`AUTHORS_BLUR_ONLY`, else noise only -- otherwise both.
      A drawn level is grid point ``floor(U * K + 0.5)`` (MATLAB ``round(betarnd(1,1) * K)``;
      ``U ~ Uniform(0, 1)``, ties have probability 0), so the end points 0 and ``K`` have
      probability ``1 / (2K)`` and the others ``1 / K``; P(blur = 0) = 1/4 + 3/4 * 1/(2 K_blur)
      (0.259 on the default grid). Draws one ``[n, 4]`` float64 uniform tensor: every sample
      consumes its four numbers whether it uses them or not.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer (got {n!r})")
    if not isinstance(generator, torch.Generator):
        raise ValueError("sample_levels needs an explicit torch.Generator")
    params = params or DegradationParams()
    blur_grid = _grid(params.blur_max, params.blur_step, "blur")
    noise_grid = _grid(params.noise_max, params.noise_step, "noise")
    if params.sampling == "uniform":
        bi = torch.randint(len(blur_grid), (n,), generator=generator, device=generator.device)
        ni = torch.randint(len(noise_grid), (n,), generator=generator, device=generator.device)
        bi, ni = bi.cpu(), ni.cpu()
    elif params.sampling == "authors":
        u = torch.rand(
            (n, 4), generator=generator, dtype=torch.float64, device=generator.device
        ).cpu()
        single = u[:, 0] < AUTHORS_SINGLE
        blur_only = u[:, 1] < AUTHORS_BLUR_ONLY
        bi = _rounded_index(u[:, 2], len(blur_grid) - 1) * ~(single & ~blur_only)
        ni = _rounded_index(u[:, 3], len(noise_grid) - 1) * ~(single & blur_only)
    else:  # the config validates it; a programming error otherwise
        raise ValueError(f"unknown degradation.sampling {params.sampling!r}")
    return blur_grid[bi].to(torch.float32), noise_grid[ni].to(torch.float32)


def _rounded_index(u: Tensor, top: int) -> Tensor:
    """Grid index ``round(u * top)`` for ``u`` in [0, 1) (half up; ties have probability 0)."""
    return torch.floor(u * top + 0.5).long().clamp_(0, top)


# ---------------------------------------------------------------------------------------------
# uint8 <-> tensor


def to_tensor(array: np.ndarray) -> Tensor:
    """``uint8 HxWx3`` array -> ``[1, 3, H, W]`` float32 tensor in [0, 1] (exactly ``k / 255``)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"to_tensor expects a uint8 numpy array (got {got})")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"to_tensor expects an HxWx3 array (got shape {array.shape})")
    t = torch.tensor(array).permute(2, 0, 1)[None]  # a copy: inputs may be read-only views
    return t.to(torch.float32) / 255.0


def to_uint8(img: Tensor) -> np.ndarray:
    """``[1, 3, H, W]`` or ``[3, H, W]`` float in [0, 1] -> ``uint8 HxWx3``.

    Clips to [0, 1] and rounds half up like MATLAB ``im2uint8`` (the rounding of :func:`quantize`).
    """
    if not isinstance(img, Tensor) or not img.is_floating_point():
        raise ValueError("to_uint8 expects a float tensor in [0, 1]")
    if img.ndim == 4:
        if img.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of {img.shape[0]}")
        img = img[0]
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"to_uint8 expects [1, 3, H, W] or [3, H, W] (got {tuple(img.shape)})")
    q = _levels255(img.detach().cpu())
    return np.ascontiguousarray(q.to(torch.uint8).permute(1, 2, 0).numpy())
