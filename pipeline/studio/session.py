"""The model(s) behind the studio: loading, the z scale, DNI blends per alpha, and every run.

A studio session serves one model (``--model``) or the MSE and GAN pair of a DNI blend
(``--mse-model`` and ``--gan-model``; alpha 1 = MSE, 0 = GAN). Both members of a pair are
loaded once; moving the alpha slider blends their weights in memory with
:func:`models.dni.blend_generators` (the function ``cugan restore --alpha`` uses, so the
weights are the same bit for bit) and keeps the most recent blends in a small cache keyed by
alpha, so going back to an alpha costs nothing and no slider move ever reads a file again.

Levels become z through the checkpoint's own :class:`~pipeline.condition.ConditionScale`
(``generator.json``), never through module constants: a model trained with other maxima is
driven with its own scale. Every model run goes through :func:`pipeline.inference.restore`,
so whatever inference path that module chooses applies to the studio too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.dni import blend_generators
from models.generator import Generator, GeneratorConfig
from pipeline.condition import ConditionScale
from pipeline.device import resolve_device
from pipeline.inference import (
    ModelArgumentNames,
    Progress,
    auto_tile,
    load_model_for_inference,
    receptive_field_radius,
    restore,
)

__all__ = [
    "ALPHA_CACHE_SIZE",
    "ModelSession",
    "ModelSpec",
    "StudioError",
    "resolve_model_spec",
]

log = logging.getLogger(__name__)

#: Blended generators kept in memory (the authors' model is 26 MB of float32 weights).
ALPHA_CACHE_SIZE = 8


#: How the studio's messages name the model arguments (the page's fields, the command's flags).
_NAMES = ModelArgumentNames(
    model="--model", mse_model="--mse-model", gan_model="--gan-model", alpha="alpha"
)


class StudioError(ValueError):
    """Something the studio cannot do as asked; the message is one line for the page."""


def resolve_model_spec(spec: str) -> str:
    """The one place where a model name given to the studio becomes something loadable.

    Today a checkpoint directory or a ``.safetensors`` file, returned as given:
    :func:`pipeline.inference.load_model_for_inference` checks it, and refuses registry URIs
    (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) with one line for now. When the loader
    resolves them (``pipeline.tracking.resolve_model_uri``), the studio gets them with it; if
    the studio should resolve them itself instead, that is one line here.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise StudioError("a model is a checkpoint directory or .safetensors file (got nothing)")
    return spec.strip()


@dataclass(frozen=True)
class ModelSpec:
    """What the user named: one model, or the MSE and GAN models of a DNI blend."""

    model: str | None = None
    mse_model: str | None = None
    gan_model: str | None = None

    def __post_init__(self) -> None:
        pair = [v for v in (self.mse_model, self.gan_model) if v]
        if self.model and pair:
            raise StudioError("give either a model, or an MSE model and a GAN model, not both")
        if not self.model and len(pair) != 2:
            if pair:
                missing = "GAN" if self.mse_model else "MSE"
                raise StudioError(
                    f"the DNI blend needs both models: the {missing} model is missing"
                )
            raise StudioError("no model given: a model, or an MSE model and a GAN model")

    @property
    def is_pair(self) -> bool:
        return not self.model

    def describe(self) -> str:
        if self.model:
            return self.model
        return f"MSE {self.mse_model} + GAN {self.gan_model}"


class ModelSession:
    """Loaded model(s) with their z scale; runs restorations for the page and the API.

    Thread-safe: Gradio calls handlers from worker threads, so cache updates and model runs
    (``restore`` moves the module to its device) hold one lock.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str = "auto",
        cache_size: int = ALPHA_CACHE_SIZE,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.device_name = device
        self._lock = threading.RLock()
        self._blends: OrderedDict[float, Generator] = OrderedDict()
        self._cache_size = max(1, cache_size)
        if spec.is_pair:
            # The loader checks that the pair can be blended (configs, z scales) and keeps the
            # two loaded checkpoints: every later alpha is blended from them in memory.
            loaded = load_model_for_inference(
                mse_model=resolve_model_spec(spec.mse_model),
                gan_model=resolve_model_spec(spec.gan_model),
                alpha=1.0,
                names=_NAMES,
            )
            mse, gan = loaded.parts
            self._mse, self._gan, self._single = mse.model, gan.model, None
            self._blends[1.0] = loaded.model
        else:
            loaded = load_model_for_inference(resolve_model_spec(spec.model), names=_NAMES)
            self._single, self._mse, self._gan = loaded.model, None, None
        self.scale: ConditionScale = loaded.scale
        log.info("studio model: %s (%s, %s)", spec.describe(), self.scale.describe(), self.device)

    # -- models -----------------------------------------------------------------------------

    @property
    def has_alpha(self) -> bool:
        return self._single is None

    @property
    def config(self) -> GeneratorConfig:
        return (self._single or self._mse).config

    @property
    def context_margin(self) -> int:
        """Context that makes a crop's output equal the whole image's (the receptive field)."""
        return receptive_field_radius(self.config)

    def cached_alphas(self) -> list[float]:
        with self._lock:
            return list(self._blends)

    def generator(self, alpha: float | None) -> Generator:
        """The single model, or the DNI blend at ``alpha`` (cached; alpha ignored if single)."""
        if self._single is not None:
            return self._single
        if alpha is None:
            raise StudioError("alpha is required with an MSE and a GAN model (0 = GAN, 1 = MSE)")
        alpha = float(alpha)
        with self._lock:
            if alpha in self._blends:
                self._blends.move_to_end(alpha)
                return self._blends[alpha]
            blended = blend_generators(self._mse, self._gan, alpha)  # validates alpha
            self._blends[alpha] = blended
            while len(self._blends) > self._cache_size:
                self._blends.popitem(last=False)
            log.debug("blended alpha=%g (%d cached)", alpha, len(self._blends))
            return blended

    # -- runs --------------------------------------------------------------------------------

    def z(self, blur: float, noise: float) -> torch.Tensor:
        """``[1, 2]`` z for levels, through the checkpoint's scale (one-line error if out of range)."""
        blur, noise = self.scale.check_levels(blur, noise)
        return self.scale.to_z(blur, noise)

    def restore(
        self,
        image: np.ndarray,
        blur: float,
        noise: float,
        alpha: float | None = None,
        *,
        zmap: np.ndarray | None = None,
        tile: int | Literal["auto"] | None = "auto",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Restore ``image`` (uint8 H x W x 3) at the given levels; returns uint8 H x W x 3.

        ``zmap`` (uint8 H x W x 2, ``k / 255``) replaces the vector z when given.
        ``tile="auto"`` tiles as ``cugan restore --tile auto`` does (whole image up to
        2 MP), with the receptive field as overlap, so the result equals the CLI's; None runs
        one piece (previews).
        """
        z = self.z(blur, noise) if zmap is None else zmap
        h, w = image.shape[:2]
        size = auto_tile(h, w) if tile == "auto" else tile
        with self._lock:
            model = self.generator(alpha)
            return restore(
                model,
                image,
                z,
                tile=size,
                tile_overlap=self.context_margin,
                device=self.device,
                progress=progress,
            )

    def describe(self) -> str:
        kind = "DNI blend" if self.has_alpha else "model"
        return f"{kind} {self.spec.describe()}; {self.scale.describe()}; device {self.device}"
