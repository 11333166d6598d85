"""Pieces of the DALI training graph, called inside a pipeline definition (no pipeline here).

:mod:`pipeline.data.dali_pipeline` composes them into the training pipeline and its test
entries; each piece mirrors one step of the torch reference (:mod:`pipeline.degradation`,
:mod:`pipeline.data.torch_loader`) so that the two can be tested step by step:

* :func:`level_nodes` -- per-sample (blur, noise) levels as ``degradation.sampling`` says,
  drawn by DALI CPU random operators from the constants of :mod:`pipeline.degradation`.
* :func:`patch_geometry` / :func:`window_geometry` -- a patch's random position and its
  context window, ``kernel_size // 2`` pixels larger per side and clamped into the sub-image
  (the torch loader's :func:`~pipeline.data.torch_loader.context_window`).
* :func:`window_blur` -- blur a context window, keep its central patch; :func:`blur_image` --
  blur a whole image (both: two 1-D ``fn.filter`` passes with ``border="clamp"``).
* :func:`add_noise_and_quantize` -- Gaussian noise, clip, round half up to 8 bits.
* :func:`flip_pair` -- the same random flips/transpose on the degraded and the clean patch.

Every argument input (levels, kernels, slice positions) is a CPU node, as DALI requires, also
when the images live on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from nvidia import dali
from nvidia.dali import fn, types

from pipeline.degradation import AUTHORS_BLUR_ONLY, AUTHORS_SINGLE

__all__ = [
    "add_noise_and_quantize",
    "blur_image",
    "chw",
    "degrade_nodes",
    "flip_pair",
    "gaussian_taps",
    "level_nodes",
    "patch_geometry",
    "window_blur",
    "window_geometry",
]

# Any sigma below this gives a delta kernel: exp(-1 / (2 * 1e-6)) underflows to 0 in float32.
_MIN_SIGMA = 1e-3


def gaussian_taps(sigma: Any, size: int) -> Any:
    """Per-sample normalised 1-D Gaussian ``[size]`` (float32) of std ``sigma`` (a CPU node)."""
    half = size // 2
    x2 = types.Constant(np.arange(-half, half + 1, dtype=np.float32) ** 2)
    s = dali.math.max(sigma, _MIN_SIGMA)
    taps = dali.math.exp(x2 * -0.5 / (s * s))
    return taps / fn.reductions.sum(taps)


def _passes(sigma: Any, size: int) -> tuple[Any, Any]:
    taps = gaussian_taps(sigma, size)
    return fn.reshape(taps, shape=[1, size]), fn.reshape(taps, shape=[size, 1])


def blur_image(image: Any, blur: Any, *, kernel_size: int) -> Any:
    """Blur a whole HWC float image with replicate border (``imfilter(..., 'replicate')``).

    Two 1-D passes with ``border="clamp"`` (``fn.gaussian_blur`` reflects, which the method
    does not); a clamped index is separable, so this is the 21x21 2-D filter. ``r = 0`` gives
    a delta kernel (exp underflows off-centre), i.e. no blur.
    """
    rows, cols = _passes(blur, kernel_size)
    return fn.filter(fn.filter(image, rows, border="clamp"), cols, border="clamp")


def window_blur(window: Any, blur: Any, offset: Any, *, crop: int, kernel_size: int) -> Any:
    """Blur a context window and keep the ``crop x crop`` patch at ``offset`` (``[dy, dx]``).

    The same two ``border="clamp"`` passes as :func:`blur_image`; between them only the patch's
    columns are kept. Where the window was clamped at the sub-image's edge, ``clamp`` replicates
    that edge, as the whole sub-image's replicate border does; elsewhere the window holds
    ``kernel_size // 2`` real pixels beyond the patch, so the border mode never reaches it.
    """
    rows, cols = _passes(blur, kernel_size)
    across = fn.filter(window, rows, border="clamp")
    across = fn.slice(across, start=offset[1], shape=[crop], axis_names="W")
    down = fn.filter(across, cols, border="clamp")
    return fn.slice(down, start=offset[0], shape=[crop], axis_names="H")


def add_noise_and_quantize(blurred: Any, noise: Any) -> tuple[Any, Any]:
    """``(noisy, degraded)``: ``+ noise/255 * N(0, 1)`` on the float image (no saturation),
    then clamp to [0, 1] and ``floor(255 x + 0.5) / 255`` (round half up, as ``im2uint8``)."""
    noisy = fn.noise.gaussian(blurred, stddev=noise / 255.0)
    degraded = dali.math.floor(dali.math.clamp(noisy, 0.0, 1.0) * 255.0 + 0.5) / 255.0
    return noisy, degraded


def degrade_nodes(clean: Any, blur: Any, noise: Any, *, kernel_size: int) -> dict[str, Any]:
    """Blur -> noise -> 8 bits on a whole HWC float image; returns the intermediate nodes too."""
    blurred = blur_image(clean, blur, kernel_size=kernel_size)
    noisy, degraded = add_noise_and_quantize(blurred, noise)
    return {"blurred": blurred, "noisy": noisy, "degraded": degraded}


def chw(node: Any) -> Any:
    return fn.transpose(node, perm=[2, 0, 1], output_layout="CHW")


# ---------------------------------------------------------------------------------------------
# levels


def _grid_level(values: Sequence[float], enabled: Any) -> Any:
    """Grid point ``round(U * K)`` (U ~ Uniform[0, 1), K = len(values) - 1), or 0 where
    ``enabled`` (an int32 0/1 node) is 0 -- by lookup, so levels are the grid's float32 values."""
    top = len(values) - 1
    u = fn.random.uniform(range=[0.0, 1.0])
    index = dali.math.min(fn.cast(dali.math.floor(u * float(top) + 0.5), dtype=types.INT32), top)
    return fn.lookup_table(
        index * enabled,
        keys=list(range(top + 1)),
        values=[float(v) for v in values],
        dtype=types.FLOAT,
        default_value=0.0,
    )


def level_nodes(
    sampling: str, blur_values: Sequence[float], noise_values: Sequence[float]
) -> tuple[Any, Any]:
    """Per-sample ``(blur, noise)`` float32 CPU nodes, distributed as
    :func:`pipeline.degradation.sample_levels` draws them for ``sampling``."""
    if sampling == "uniform":
        return fn.random.uniform(values=list(blur_values)), fn.random.uniform(
            values=list(noise_values)
        )
    if sampling != "authors":
        raise ValueError(f"unknown degradation.sampling {sampling!r}")
    single = fn.random.coin_flip(probability=AUTHORS_SINGLE, dtype=types.INT32)
    blur_only = fn.random.coin_flip(probability=AUTHORS_BLUR_ONLY, dtype=types.INT32)
    has_blur = 1 - single * (1 - blur_only)  # not (single and noise only)
    has_noise = 1 - single * blur_only  # not (single and blur only)
    return _grid_level(blur_values, has_blur), _grid_level(noise_values, has_noise)


# ---------------------------------------------------------------------------------------------
# geometry and flips


def _uniform_position(extent: Any, crop: int) -> Any:
    """A uniformly drawn integer in ``[0, extent - crop]`` (float node)."""
    u = fn.random.uniform(range=[0.0, 1.0])
    return dali.math.min(dali.math.floor(u * (extent - crop + 1)), extent - crop)


def window_geometry(
    top: Any, left: Any, height: Any, width: Any, *, crop: int, radius: int
) -> dict[str, Any]:
    """The context window of a patch at ``(top, left)``: int32 ``start`` ``[y0, x0]`` and
    ``shape`` ``[h, w]`` in the sub-image, and the patch's ``offset`` ``[dy, dx]`` in it.

    The window reaches ``radius`` pixels beyond the patch on every side, clamped into the
    ``height x width`` sub-image (float nodes or numbers).
    """
    y0 = dali.math.max(top - radius, 0.0)
    x0 = dali.math.max(left - radius, 0.0)
    y1 = dali.math.min(top + (crop + radius), height)
    x1 = dali.math.min(left + (crop + radius), width)

    def pair(a: Any, b: Any) -> Any:
        return fn.cast(fn.stack(a, b), dtype=types.INT32)

    return {
        "start": pair(y0, x0),
        "shape": pair(y1 - y0, x1 - x0),
        "offset": pair(top - y0, left - x0),
    }


def patch_geometry(height: Any, width: Any, *, crop: int, radius: int) -> dict[str, Any]:
    """A uniformly placed ``crop x crop`` patch of a ``height x width`` sub-image and its
    context window (:func:`window_geometry`); ``top_left`` is the patch's int32 corner."""
    top = _uniform_position(height, crop)
    left = _uniform_position(width, crop)
    geometry = window_geometry(top, left, height, width, crop=crop, radius=radius)
    geometry["top_left"] = fn.cast(fn.stack(top, left), dtype=types.INT32)
    return geometry


def flip_pair(degraded: Any, clean: Any) -> dict[str, Any]:
    """Random horizontal flip, vertical flip, then transpose, the same for both HWC patches:
    the 8 flips/90-degree rotations with equal probability, by exact index permutations
    (``fn.flip``; ``fn.transpose`` under a DALI conditional) rather than ``fn.rotate``, whose
    90-degree exactness rests on interpolation rounding. Returns the patches and the draws."""
    hflip = fn.random.coin_flip(dtype=types.INT32)
    vflip = fn.random.coin_flip(dtype=types.INT32)
    degraded = fn.flip(degraded, horizontal=hflip, vertical=vflip)
    clean = fn.flip(clean, horizontal=hflip, vertical=vflip)
    transpose = fn.random.coin_flip(dtype=types.BOOL)
    if transpose:  # a DALI conditional: split per sample, merged back afterwards
        degraded = fn.transpose(degraded, perm=[1, 0, 2], output_layout="HWC")
        clean = fn.transpose(clean, perm=[1, 0, 2], output_layout="HWC")
    return {
        "degraded": degraded,
        "clean": clean,
        "hflip": hflip,
        "vflip": vflip,
        "transpose": transpose,
    }
