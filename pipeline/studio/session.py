"""The model(s) behind the studio: loading, the z scale, DNI blends per alpha, and every run.

A studio session serves one model (``--model``) or the MSE and GAN pair of a DNI blend
(``--mse-model`` and ``--gan-model``; alpha 1 = MSE, 0 = GAN). Both members of a pair are
loaded once; moving the alpha slider blends their weights in memory with
:func:`models.dni.blend_generators` (the function ``cugan restore --alpha`` uses, so the
weights are the same bit for bit) and keeps the most recent blends in a small cache keyed by
alpha, so going back to an alpha costs nothing and no slider move ever reads a file again.

Levels become z through the checkpoint's own :class:`~pipeline.condition.ConditionScale`
(``generator.json``), never through module constants: a model trained with other maxima is
driven with its own scale.

The inference path (:mod:`pipeline.inference.choice`): a session chooses ONE path when it
starts, for its first generator and the studio's workload (a service:
:meth:`~pipeline.inference.Workload.service`; ``--backend`` / ``--precision`` restrict it as
they do for ``cugan restore``), and runs everything on it: the preview, the full image, the
``/restore`` endpoint, every alpha. Each generator (the single model, each cached blend) is
prepared once (:func:`pipeline.inference.prepare_model` with that path requested), so a slider
move never rebuilds a path. The path is part of the "CLI command" (``--backend B --precision
P``, :mod:`pipeline.studio.recipe`): ``cugan restore`` with the studio's arguments then runs
the very path the studio ran and writes the same pixels, on any machine, whatever its own
choice for one image would have been.

Model names: a checkpoint path, or a registry URI resolved by the inference loader
(:func:`pipeline.inference.load_model_for_inference`, in the store of ``tracking_uri``);
:attr:`ModelSession.names` are the names that load the same weights again (a URI pinned to
the version its alias pointed at), which the CLI command uses.
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
    Backend,
    ModelArgumentNames,
    PathSpec,
    Precision,
    PreparedModel,
    Progress,
    Workload,
    auto_tile,
    load_model_for_inference,
    prepare_model,
    receptive_field_radius,
    restore,
)
from pipeline.inference.loading import default_tracking_uri, is_registered

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
    """A model name given to the studio (a field of the page, a flag), trimmed: a checkpoint
    directory, a ``.safetensors`` file or a registry URI (``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``). It is resolved by the inference loader, the one place for every
    command (:func:`pipeline.inference.load_model_for_inference`), which checks it."""
    if not isinstance(spec, str) or not spec.strip():
        raise StudioError(
            "a model is a checkpoint directory, a .safetensors file or a registry URI "
            "models:/NAME/VERSION (got nothing)"
        )
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

    @property
    def registered(self) -> bool:
        """Whether a registry URI is among the models (they need a tracking store)."""
        return any(is_registered(v) for v in (self.model, self.mse_model, self.gan_model) if v)

    def describe(self) -> str:
        if self.model:
            return self.model
        return f"MSE {self.mse_model} + GAN {self.gan_model}"


class ModelSession:
    """Loaded model(s) with their z scale and inference path; runs restorations for the page
    and the API (module docstring).

    Thread-safe: Gradio calls handlers from worker threads, so cache updates and model runs
    hold one lock.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str = "auto",
        backend: Backend | str = Backend.AUTO,
        precision: Precision | str = Precision.AUTO,
        tracking_uri: str | None = None,
        cache_size: int = ALPHA_CACHE_SIZE,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.device_name = device
        self.requested = (Backend(backend), Precision(precision))
        # The store is fixed once, so that the CLI command names the one the models came from.
        self.tracking_uri = tracking_uri or (default_tracking_uri() if spec.registered else None)
        self._lock = threading.RLock()
        self._prepared: OrderedDict[float, PreparedModel] = OrderedDict()
        self._cache_size = max(1, cache_size)
        names = {"names": _NAMES, "tracking_uri": self.tracking_uri}
        if spec.is_pair:
            # The loader checks that the pair can be blended (configs, z scales) and keeps the
            # two loaded checkpoints: every later alpha is blended from them in memory.
            loaded = load_model_for_inference(
                mse_model=resolve_model_spec(spec.mse_model),
                gan_model=resolve_model_spec(spec.gan_model),
                alpha=1.0,
                **names,
            )
            mse, gan = loaded.parts
            self._mse, self._gan = mse.model, gan.model
        else:
            loaded = load_model_for_inference(resolve_model_spec(spec.model), **names)
            self._mse = self._gan = None
        self.names: tuple[str, ...] = loaded.names
        self.scale: ConditionScale = loaded.scale
        first = prepare_model(
            loaded.model,
            device=self.device,
            backend=backend,
            precision=precision,
            workload=Workload.service(),
        )
        self.path: PathSpec = first.choice.spec
        self._single = None if spec.is_pair else first
        if spec.is_pair:
            self._prepared[1.0] = first
        log.info(
            "studio model: %s (%s, %s, inference path %s)",
            spec.describe(),
            self.scale.describe(),
            self.device,
            self.path.name,
        )

    @property
    def pinned_spec(self) -> ModelSpec:
        """The models as names that load the same weights again (:attr:`names`)."""
        if self.spec.is_pair:
            return ModelSpec(mse_model=self.names[0], gan_model=self.names[1])
        return ModelSpec(model=self.names[0])

    def with_spec(self, spec: ModelSpec) -> ModelSession:
        """Another model (or pair) with this session's device, path requests and store."""
        backend, precision = self.requested
        return ModelSession(
            spec,
            device=self.device_name,
            backend=backend,
            precision=precision,
            tracking_uri=self.tracking_uri,
            cache_size=self._cache_size,
        )

    # -- models -----------------------------------------------------------------------------

    @property
    def has_alpha(self) -> bool:
        return self._single is None

    @property
    def config(self) -> GeneratorConfig:
        return (self._single.model if self._single is not None else self._mse).config

    @property
    def context_margin(self) -> int:
        """Context that makes a crop's output equal the whole image's (the receptive field)."""
        return receptive_field_radius(self.config)

    def cached_alphas(self) -> list[float]:
        with self._lock:
            return list(self._prepared)

    def prepared(self, alpha: float | None) -> PreparedModel:
        """The single model, or the DNI blend at ``alpha``, on the session's path (cached per
        alpha: blended and prepared once; alpha ignored with a single model)."""
        if self._single is not None:
            return self._single
        if alpha is None:
            raise StudioError("alpha is required with an MSE and a GAN model (0 = GAN, 1 = MSE)")
        alpha = float(alpha)
        with self._lock:
            if alpha in self._prepared:
                self._prepared.move_to_end(alpha)
                return self._prepared[alpha]
            blended = blend_generators(self._mse, self._gan, alpha)  # validates alpha
            ready = prepare_model(
                blended,
                device=self.device,
                backend=self.path.backend,
                precision=self.path.precision,
                quiet=True,  # the session's path, logged when it was chosen
            )
            self._prepared[alpha] = ready
            while len(self._prepared) > self._cache_size:
                self._prepared.popitem(last=False)
            log.debug("blended alpha=%g (%d cached)", alpha, len(self._prepared))
            return ready

    def generator(self, alpha: float | None) -> Generator:
        """The generator of :meth:`prepared` (the weights the session runs)."""
        return self.prepared(alpha).model

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
            return restore(
                self.prepared(alpha),
                image,
                z,
                tile=size,
                tile_overlap=self.context_margin,
                progress=progress,
            )

    def describe(self) -> str:
        kind = "DNI blend" if self.has_alpha else "model"
        pinned = [n for n in self.names if is_registered(n)]
        versions = f" ({', '.join(pinned)} in {self.tracking_uri})" if pinned else ""
        return (
            f"{kind} {self.spec.describe()}{versions}; {self.scale.describe()}; device "
            f"{self.device}; inference path {self.path.name}"
        )
