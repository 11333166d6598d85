"""The image side of the studio: inputs, the noise estimate, the preview box, painted regions.

* Inputs are read by :func:`pipeline.imageio.read_rgb8` with the CLI's defaults, so an upload
  is refused for the same reasons, with the same one-line message, as ``cugan restore`` would
  refuse the file (not an image, 16-bit, transparent, too large ...) and decoded to the same
  pixels. The bundled sample photos are the scikit-image ones the data stage uses
  (:func:`pipeline.data.sources.sample_images`, checked against their pinned sha256).
* The preview is a box of the image run with a context margin of the receptive field around
  it, its origin on the network's down-sampling grid (a multiple of ``size_multiple``): the
  box then gets the pixels the full image will get (as tiles do in
  :mod:`pipeline.inference`), not the darker, seamy border of a bare crop.
* A painted region becomes a z map: z of the region inside the mask, the global z outside,
  both stored in 8 bits (``k / 255``) -- the form of a condition-map file
  (:func:`pipeline.imageio.write_cond_map`), so that the map the studio offers for download
  reproduces its result exactly with ``cugan restore --cond-map``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.imageio import DEFAULT_MAX_PIXELS, read_rgb8

__all__ = [
    "Box",
    "StudioImage",
    "box_around",
    "context_box",
    "crop",
    "estimate_noise",
    "painted_mask",
    "quantize_z",
    "read_image",
    "sample_photos",
    "z_map",
]


@dataclass(frozen=True)
class StudioImage:
    """An input of the studio: its pixels, the file name the CLI command uses, and notes."""

    array: np.ndarray  # uint8 H x W x 3
    name: str
    path: Path
    notes: tuple[str, ...] = ()

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


def read_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> StudioImage:
    """Read an upload or a sample with ``cugan restore``'s checks (ImageError: one line).

    ``name`` is how the CLI command refers to the file (default: its base name, which is what
    the user uploaded).
    """
    loaded = read_rgb8(path, max_pixels=max_pixels)
    path = Path(path)
    return StudioImage(loaded.array, name or path.name, path, tuple(loaded.notes))


@functools.cache
def sample_photos() -> dict[str, Path]:
    """The bundled sample photos by file name (verified once per process)."""
    from pipeline.data.sources import sample_images

    return {image.path.name: image.path for image in sample_images().images}


def estimate_noise(image: np.ndarray, noise_max: float) -> float:
    """Noise std of an 8-bit image on the 0..255 scale (scikit-image's ``estimate_sigma``, a
    wavelet median estimator), clipped to the model's range and rounded to 0.1.

    An estimate: it assumes white Gaussian noise and reads fine texture as noise on clean
    photos (a few levels), and it under-reads strong noise that 8-bit clipping has cut.
    """
    from skimage.restoration import estimate_sigma

    sigma = estimate_sigma(image.astype(np.float64) / 255.0, channel_axis=-1, average_sigmas=True)
    value = float(sigma) * 255.0 if math.isfinite(float(sigma)) else 0.0
    return round(min(max(value, 0.0), noise_max), 1)


# ---------------------------------------------------------------------------------------------
# the preview box


@dataclass(frozen=True)
class Box:
    """A rectangle of an image in pixels: columns ``[left, right)``, rows ``[top, bottom)``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def describe(self) -> str:
        return f"{self.width}x{self.height} at ({self.left}, {self.top})"


def box_around(x: float, y: float, size: int, height: int, width: int) -> Box:
    """A ``size`` x ``size`` box centred on pixel (x, y), moved inside the image (smaller where
    the image is)."""
    size = max(1, int(size))
    bw, bh = min(size, width), min(size, height)
    left = min(max(round(x) - bw // 2, 0), width - bw)
    top = min(max(round(y) - bh // 2, 0), height - bh)
    return Box(left, top, left + bw, top + bh)


def context_box(box: Box, margin: int, multiple: int, height: int, width: int) -> Box:
    """``box`` grown by ``margin`` on each side (clamped to the image), its origin moved down to
    a multiple of ``multiple`` so that the crop sees the image's down-sampling grid."""
    left = max(0, box.left - margin) // multiple * multiple
    top = max(0, box.top - margin) // multiple * multiple
    return Box(left, top, min(width, box.right + margin), min(height, box.bottom + margin))


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    return np.ascontiguousarray(array[box.top : box.bottom, box.left : box.right])


def inner(box: Box, outer: Box) -> Box:
    """``box`` in the coordinates of the crop ``outer``."""
    return Box(
        box.left - outer.left, box.top - outer.top, box.right - outer.left, box.bottom - outer.top
    )


# ---------------------------------------------------------------------------------------------
# painted regions and z maps


def painted_mask(
    editor_value: Mapping[str, Any] | None, height: int, width: int
) -> np.ndarray | None:
    """Where the user painted (any layer's alpha > 0) as a bool H x W mask; None if nowhere.

    ``editor_value`` is a ``gr.ImageEditor`` value (``background``, ``layers``, ``composite``,
    numpy RGBA). ValueError if the painted layer does not have the image's size.
    """
    if not editor_value:
        return None
    mask = None
    for layer in editor_value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue  # no alpha channel: nothing painted on it can be told apart
        if layer.shape[:2] != (height, width):
            raise ValueError(
                f"the painted layer is {layer.shape[1]}x{layer.shape[0]} but the image is "
                f"{width}x{height}: load the image again and repaint"
            )
        painted = layer[..., 3] > 0
        mask = painted if mask is None else (mask | painted)
    return mask if mask is not None and bool(mask.any()) else None


def quantize_z(z: Any) -> tuple[int, ...]:
    """z in [0, 1] as the 8-bit values ``round(255 z)`` (half up) of a condition map."""
    values = np.asarray(z, dtype=np.float64).reshape(-1)
    return tuple(math.floor(v * 255.0 + 0.5) for v in values)


def z_map(mask: np.ndarray, outside: tuple[int, ...], inside: tuple[int, ...]) -> np.ndarray:
    """uint8 H x W x D condition map: ``inside`` where ``mask``, ``outside`` elsewhere."""
    out = np.empty((*mask.shape, len(outside)), dtype=np.uint8)
    out[...] = np.asarray(outside, dtype=np.uint8)
    out[mask] = np.asarray(inside, dtype=np.uint8)
    return out
