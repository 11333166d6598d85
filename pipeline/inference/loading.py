"""Loading generators for inference: one checkpoint, or the DNI blend of an MSE and a GAN model.

:func:`load_model_for_inference` is the one loading entry (the CLI, the export command, the
studio); it checks every rule on its arguments before reading a file.

A model is a checkpoint directory, a ``.safetensors`` file, or a registry URI
(``models:/NAME/VERSION``, ``models:/NAME@ALIAS``), resolved by
:func:`pipeline.tracking.resolve_model_uri` in the store of ``tracking_uri`` (default:
``$MLFLOW_TRACKING_URI``, else ``tracking.uri`` of ``./params.yaml``) and downloaded into the
user's cache (:func:`registered_cache_dir`), where a complete download of that version whose
checkpoint passes its sha256 check is reused. A registered version holds the generators of
its training stage (:mod:`pipeline.train.pyfunc`): ``mse`` and, for a CUGAN stage, ``gan``.
Which one a URI means depends on the argument it is given to:

* ``model``: the version's GAN generator where it has one (the generator a CUGAN stage
  trained), else its only one (a CUnet stage's MSE generator);
* ``mse_model`` / ``gan_model``: the version's ``mse`` / ``gan`` generator, and a version
  without that part is an error (so ``models:/cugan/1`` as the MSE end is the CUnet that
  CUGAN stage started from);
* ``model`` with ``alpha``: the DNI pair of that one version's ``mse`` and ``gan`` generators,
  the same as giving the URI as both ``mse_model`` and ``gan_model``. (A checkpoint path with
  ``alpha`` stays an error: a checkpoint holds one generator.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from models.dni import DNIError, blend_generators, check_alpha
from models.generator import Generator, GeneratorConfig
from pipeline.checkpoint import LoadedGenerator, load_checkpoint
from pipeline.condition import ConditionScale
from pipeline.inference.choice import cache_dir

__all__ = [
    "REGISTERED_MODEL_PREFIX",
    "InferenceModel",
    "ModelArgumentNames",
    "default_tracking_uri",
    "is_registered",
    "load_checkpoint_for_inference",
    "load_model_for_inference",
    "registered_cache_dir",
    "registered_checkpoint",
]

log = logging.getLogger(__name__)

#: Prefix of MLflow registered-model URIs.
REGISTERED_MODEL_PREFIX = "models:/"
#: Which generator of a registered version a model argument takes (module docstring).
Part = Literal["model", "mse", "gan"]


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
    ``names``: each part as a model argument that loads it again: a checkpoint path as given,
    a registry URI pinned to the version it resolved to (``models:/NAME/VERSION``: an alias
    moves), so that a command built from them reproduces this model.
    """

    model: Generator
    scale: ConditionScale
    source: str
    parts: tuple[LoadedGenerator, ...]
    names: tuple[str, ...] = ()

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
    tracking_uri: str | None = None,
) -> InferenceModel:
    """The one loading entry for inference: one checkpoint, or the DNI blend of an MSE and a GAN.

    ``model``: a checkpoint directory or ``.safetensors`` file (``pipeline.checkpoint``), or a
    registry URI (module docstring). ``alpha`` with ``mse_model`` and ``gan_model``:
    ``(1 - alpha) * GAN + alpha * MSE`` over all parameters (``models.dni``); the two must
    have equal configs and record the same z scale. ``alpha`` with a registry URI as
    ``model``: that version's own pair. Every rule on these arguments is checked here, before
    any file is read (alpha by :func:`models.dni.check_alpha`); ValueError names the argument
    as ``names`` spells it, ``CheckpointError`` a bad file; a registry that cannot answer,
    or a name, alias or version it does not hold, is a ValueError of one line too.
    ``tracking_uri``: the MLflow store of registry URIs (default :func:`default_tracking_uri`).
    """
    blend = [
        name
        for name, value in ((names.mse_model, mse_model), (names.gan_model, gan_model))
        if value is not None
    ]
    if model is not None and alpha is not None and not blend and is_registered(model):
        mse_model = gan_model = model  # the version's own pair (module docstring)
        model = None
    if model is not None:
        if blend or alpha is not None:
            raise ValueError(
                f"give either {names.model}, or {names.alpha} with {names.mse_model} and "
                f"{names.gan_model}, not both ({names.alpha} with {names.model} takes a "
                f"registry URI, {REGISTERED_MODEL_PREFIX}NAME/VERSION, and blends that version's "
                "mse and gan generators)"
            )
        loaded, name = _load_one(model, map_location, "model", tracking_uri)
        return InferenceModel(
            loaded.model, loaded.scale, _source(model, "model"), (loaded,), (name,)
        )
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

    mse, mse_pinned = _load_one(mse_model, map_location, "mse", tracking_uri)
    gan, gan_pinned = _load_one(gan_model, map_location, "gan", tracking_uri)
    mse_name, gan_name = _source(mse_model, "mse"), _source(gan_model, "gan")
    if mse.scale != gan.scale:
        raise ValueError(
            f"cannot blend {mse_name} and {gan_name}: they were trained with different "
            f"condition scales ({mse.scale.describe()} vs {gan.scale.describe()})"
        )
    try:
        blended = blend_generators(mse.model, gan.model, alpha)
    except DNIError as err:
        raise ValueError(f"cannot blend {mse_name} and {gan_name}: {err}") from None
    source = f"alpha {alpha:g} blend of {mse_name} (MSE) and {gan_name} (GAN)"
    log.debug("DNI %s%s%s", source, _describe(mse.metadata), _describe(gan.metadata))
    return InferenceModel(blended, mse.scale, source, (mse, gan), (mse_pinned, gan_pinned))


def is_registered(model: str | os.PathLike[str]) -> bool:
    """Whether a model argument is a registry URI (else it is a checkpoint path). The same
    test as :func:`pipeline.tracking.is_model_uri`, made here so that loading a checkpoint
    path never imports MLflow (seconds of start-up for every ``cugan restore``)."""
    return isinstance(model, str) and model.startswith(REGISTERED_MODEL_PREFIX)


def _tracking_settings():
    """``tracking`` of ``./params.yaml`` (validated), or the defaults where there is none."""
    from pipeline.config import Params, load_params

    params = load_params("params.yaml") if Path("params.yaml").is_file() else Params()
    return params.tracking


def default_tracking_uri() -> str:
    """The store registry URIs are resolved in without ``tracking_uri``:
    ``$MLFLOW_TRACKING_URI``, else ``tracking.uri`` of ``./params.yaml`` (the default,
    ``sqlite:///mlflow.db``, where there is no such file), made absolute as the training
    stages make it (:func:`pipeline.tracking.resolve_tracking_uri`)."""
    from pipeline.tracking import resolve_tracking_uri

    return resolve_tracking_uri(_tracking_settings())


def registered_cache_dir() -> Path:
    """Where registered models are downloaded to and reused from: ``models/`` of the user's
    cache directory (:func:`pipeline.inference.choice.cache_dir`; ``$CUGAN_CACHE_DIR``
    overrides it), one directory per store, name and version."""
    return cache_dir() / "models"


def registered_checkpoint(
    uri: str, part: Part = "model", tracking_uri: str | None = None
) -> tuple[Path, str]:
    """The local checkpoint directory of ``part`` of a registered version (module docstring),
    downloaded into :func:`registered_cache_dir` unless a verified copy is there, and the
    version's own URI (``models:/NAME/VERSION``: what an alias pointed at when it was asked).

    ValueError, one line, where the store is not there (a sqlite file that does not exist,
    which MLflow would create empty; a server that does not answer, asked once with the
    ``tracking.http_timeout_s`` of params.yaml) or does not hold the name, alias or version.
    """
    from pipeline.errors import one_line
    from pipeline.tracking import (
        ModelRegistry,
        RegistryError,
        limit_http_retries,
        probe_server,
        resolve_model_uri,
        resolve_tracking_uri,
    )

    settings = _tracking_settings()
    store = tracking_uri or resolve_tracking_uri(settings)
    database = store.removeprefix("sqlite:///") if store.startswith("sqlite:///") else None
    if database is not None and not Path(database).is_file():
        raise ValueError(
            f"{uri}: no MLflow store at {database} (give the store with --tracking-uri or "
            "$MLFLOW_TRACKING_URI)"
        )
    limit_http_retries(settings, store)  # seconds, not MLflow's four minutes of retries
    down = probe_server(store, settings.http_timeout_s)
    if down is not None:
        raise ValueError(f"{uri}: the MLflow server {store} cannot be used: {down}")
    try:
        pinned = ModelRegistry(store).lookup(uri).uri  # the alias read once, then this version
        path = resolve_model_uri(
            pinned,
            store,
            cache=registered_cache_dir(),
            prefer="gan" if part == "model" else part,
            strict=part != "model",
        )
    except RegistryError as err:
        raise ValueError(one_line(err)) from None  # names the pinned version where it failed
    return path, pinned


def _load_one(
    spec: str | os.PathLike[str],
    map_location: str | torch.device,
    part: Part = "model",
    tracking_uri: str | None = None,
) -> tuple[LoadedGenerator, str]:
    """One generator and the name that loads it again (``InferenceModel.names``)."""
    if is_registered(spec):
        path, name = registered_checkpoint(str(spec), part, tracking_uri)
    else:
        path, name = spec, str(spec)
    loaded = load_checkpoint(path, map_location=map_location)
    log.debug("loaded generator from %s%s", _source(spec, part), _describe(loaded.metadata))
    return loaded, name


def _source(spec: str | os.PathLike[str], part: Part) -> str:
    """How logs and messages name a model: the path, or the URI and the part it took."""
    if not is_registered(spec):
        return str(spec)
    return f"{spec} ({'its generator' if part == 'model' else f'its {part} generator'})"


def _describe(meta: dict) -> str:
    keys = [k for k in ("stage", "iteration", "source") if k in meta]
    return " (" + ", ".join(f"{k}={meta[k]}" for k in keys) + ")" if keys else ""


def load_checkpoint_for_inference(
    model: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    tracking_uri: str | None = None,
) -> LoadedGenerator:
    """One checkpoint with its z scale (``LoadedGenerator``: model in eval mode, metadata,
    scale, path), for callers that convert levels to z themselves; a registry URI as
    ``model`` is resolved as :func:`load_model_for_inference` resolves it."""
    return _load_one(model, map_location, "model", tracking_uri)[0]
