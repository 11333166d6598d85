"""Loading generators for inference: one checkpoint, or the DNI blend of an MSE and a GAN model.

:func:`load_model_for_inference` is the one loading entry (the CLI, the export command, the
studio); it checks every rule on its arguments before reading a file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from models.dni import DNIError, blend_generators, check_alpha
from models.generator import Generator, GeneratorConfig
from pipeline.checkpoint import LoadedGenerator, load_checkpoint
from pipeline.condition import ConditionScale

__all__ = [
    "REGISTERED_MODEL_PREFIX",
    "InferenceModel",
    "ModelArgumentNames",
    "load_checkpoint_for_inference",
    "load_model_for_inference",
]

log = logging.getLogger(__name__)

#: Prefix of MLflow registered-model URIs (supported in a later issue).
REGISTERED_MODEL_PREFIX = "models:/"


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


def load_checkpoint_for_inference(
    model: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> LoadedGenerator:
    """One checkpoint with its z scale (``LoadedGenerator``: model in eval mode, metadata,
    scale, path), for callers that convert levels to z themselves (the studio)."""
    return _load_one(model, map_location)
