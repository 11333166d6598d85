"""How each method of an evaluation restores one degraded image: the one interface scoring
drives (:class:`Method`), and its four implementations.

``restore(degraded, setting, ref) -> uint8 H x W x 3``, the degraded image given as the size
mode cut it (:func:`pipeline.evaluation.sets.fit_size`), ``ref`` naming the image (a folder
method reads its own file by it):

* :class:`CheckpointMethod` -- a generator checkpoint (a model or a fixed baseline), steered by
  ``z = scale.to_z(r, sigma)`` of the scale its checkpoint records, through
  :func:`pipeline.inference.restore` (the CLI's path: what it would write is what is scored);
* :class:`InputMethod` -- the degraded image itself: what a model must beat;
* :class:`BM3DMethod` -- CBM3D (``bm3d.bm3d_rgb`` of the ``bm3d`` package, its default
  ``np`` profile and opponent colour transform) given the TRUE noise sigma, output rounded to 8
  bits like ours; single-threaded, because the package's threads sum in a varying order (its
  profile says so: ~3e-7 apart run to run, which can flip an 8-bit pixel) and a metrics file
  must not change when nothing did;
* :class:`FolderMethod` -- another method's restorations, ``DIR/<set>/<setting>/<image>``,
  read as they are (at the evaluated size, or at the set's full size and then cut alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.checkpoint import LoadedGenerator
from pipeline.condition import setting_key
from pipeline.degradation import to_uint8
from pipeline.evaluation.sets import fit_size
from pipeline.evaluation.specs import MethodSpec, ModelSpec, ReferenceSpec, Setting
from pipeline.evaluation.terms import EvalError, SizeMode
from pipeline.imageio import ImageError, read_rgb8
from pipeline.inference import restore

__all__ = [
    "BM3DMethod",
    "CheckpointMethod",
    "FolderMethod",
    "ImageRef",
    "InputMethod",
    "Method",
    "build_methods",
]


@dataclass(frozen=True)
class ImageRef:
    """Which image of which evaluation set is being restored."""

    set: str
    image: str


class Method(Protocol):
    """A method scored by an evaluation: its description and how it restores an image."""

    @property
    def spec(self) -> MethodSpec: ...

    def restore(self, degraded: np.ndarray, setting: Setting, ref: ImageRef) -> np.ndarray:
        """The restored ``uint8 H x W x 3`` image of ``degraded`` (of that setting)."""
        ...


class CheckpointMethod:
    """A generator checkpoint, driven with the z scale it records."""

    def __init__(
        self,
        spec: ModelSpec,
        generator: LoadedGenerator,
        *,
        device: torch.device,
        tile: int | None = None,
        tile_overlap: int = 32,
    ) -> None:
        self.spec = spec
        self.generator = generator
        self.device = device
        self.tile, self.tile_overlap = tile, tile_overlap

    def z(self, setting: Setting) -> torch.Tensor:
        scale = self.generator.scale
        try:
            return scale.to_z(setting[0], setting[1])
        except ValueError as err:
            raise EvalError(
                f"model {self.spec.name}: setting {setting_key(*setting)} lies outside the z "
                f"scale its checkpoint records ({scale.describe()}): {err}"
            ) from None

    def check(self, settings: Sequence[Setting]) -> None:
        """EvalError now for a setting its z scale cannot express (before any work)."""
        for setting in settings:
            if self.spec.applies_to(setting):
                self.z(setting)

    def restore(self, degraded: np.ndarray, setting: Setting, ref: ImageRef) -> np.ndarray:
        return restore(
            self.generator.model,
            degraded,
            self.z(setting),
            tile=self.tile,
            tile_overlap=self.tile_overlap,
            device=self.device,
        )


class InputMethod:
    """The degraded image itself (a restoration that does nothing)."""

    def __init__(self, spec: ReferenceSpec) -> None:
        self.spec = spec

    def restore(self, degraded: np.ndarray, setting: Setting, ref: ImageRef) -> np.ndarray:
        return degraded


class BM3DMethod:
    """CBM3D given the true noise sigma (``sigma / 255`` on [0, 1] images); noise-only
    settings (:meth:`ReferenceSpec.applies_to`)."""

    def __init__(self, spec: ReferenceSpec) -> None:
        import bm3d  # imported here: only evaluations that ask for it pay for it

        self.spec = spec
        self._bm3d_rgb = bm3d.bm3d_rgb
        self.profile = bm3d.BM3DProfile()  # the default ("np") profile ...
        self.profile.num_threads = 1  # ... run deterministically (module docstring)

    def restore(self, degraded: np.ndarray, setting: Setting, ref: ImageRef) -> np.ndarray:
        sigma = float(setting[1]) / 255.0
        noisy = degraded.astype(np.float64) / 255.0
        out = np.asarray(self._bm3d_rgb(noisy, sigma, profile=self.profile), dtype=np.float64)
        return to_uint8(torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))))


class FolderMethod:
    """Restored images on disk: ``<root>/<set>/<setting>/<image>``, one per degraded input."""

    def __init__(self, spec: ReferenceSpec, size_mode: SizeMode) -> None:
        if spec.path is None:
            raise EvalError(f"reference {spec.name}: a folder method needs a directory")
        self.spec = spec
        self.root = spec.path
        self.size_mode = size_mode

    def restore(self, degraded: np.ndarray, setting: Setting, ref: ImageRef) -> np.ndarray:
        path = self.root / ref.set / setting_key(*setting) / ref.image
        where = f"reference {self.spec.name}: {path}"
        if not path.is_file():
            raise EvalError(f"{where} not found (expected DIR/<set>/<setting>/<image>)")
        try:
            image = read_rgb8(path).array
        except ImageError as err:
            raise EvalError(f"reference {self.spec.name}: {err}") from None
        if image.shape != degraded.shape:
            image = fit_size(image, self.size_mode, where=where)
        if image.shape != degraded.shape:
            h, w = degraded.shape[:2]
            raise EvalError(
                f"{where} is {image.shape[0]}x{image.shape[1]}, the degraded input {h}x{w}"
                f" (size_mode {self.size_mode})"
            )
        return image


def build_methods(
    specs: Sequence[MethodSpec],
    generators: Mapping[str, LoadedGenerator],
    *,
    device: torch.device,
    size_mode: SizeMode,
    tile: int | None = None,
    tile_overlap: int = 32,
) -> list[Method]:
    """One :class:`Method` per spec, in order; ``generators`` holds every checkpoint's model."""
    methods: list[Method] = []
    for spec in specs:
        if isinstance(spec, ModelSpec):
            methods.append(
                CheckpointMethod(
                    spec,
                    generators[spec.name],
                    device=device,
                    tile=tile,
                    tile_overlap=tile_overlap,
                )
            )
        elif spec.source == "input":
            methods.append(InputMethod(spec))
        elif spec.source == "bm3d":
            methods.append(BM3DMethod(spec))
        else:
            methods.append(FolderMethod(spec, size_mode))
    return methods
