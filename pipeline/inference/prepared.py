"""A generator bound to the inference path chosen for it: :class:`PreparedModel`.

:func:`prepare_model` is what a consumer calls once to run many images (the CLI, validation,
the studio); :func:`pipeline.inference.restore.restore` takes either a prepared model or a
plain generator. For a plain generator it asks :func:`default_prepared`, which keeps the
prepared models of the last few generators and rebuilds one when its generator's weights
changed in place since (a training loop validating its live module): the
check compares each parameter's storage and autograd version counter, which every in-place
update (an optimiser step, ``load_state_dict``) bumps.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from models.generator import Generator, GeneratorConfig
from pipeline.device import resolve_device
from pipeline.inference.choice import PathChoice, Workload, choose_path
from pipeline.inference.errors import PathUnavailable
from pipeline.inference.paths import Backend, InferencePath, PathSpec, Precision, build_path

__all__ = ["PreparedModel", "default_prepared", "prepare_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedModel:
    """A generator and the built path to run it with on ``device``.

    ``choice`` says which path and why (logged once when it was made).
    """

    model: Generator
    path: InferencePath
    choice: PathChoice
    device: torch.device

    @property
    def config(self) -> GeneratorConfig:
        return self.model.config

    @property
    def size_multiple(self) -> int:
        return self.model.size_multiple

    @property
    def name(self) -> str:
        return self.choice.spec.name


def _example(model: Generator, device: torch.device):
    m = model.size_multiple
    side = max(64, 4 * m)
    x = torch.zeros(1, model.config.in_channels, side, side, device=device)
    z = torch.zeros(1, model.config.cond_dim, device=device) if model.config.conditional else None
    return x, z


# (path, device) pairs whose choice was logged at INFO: an evaluation or a figure grid prepares
# many generators (every alpha blend is one) and each would repeat the same line; the first
# time a process runs a path is news, the rest is at DEBUG.
_LOGGED: set[tuple[str, str]] = set()


def prepare_model(
    model: Generator,
    *,
    device: str | torch.device = "cpu",
    backend: Backend | str = Backend.AUTO,
    precision: Precision | str = Precision.AUTO,
    workload: Workload | None = None,
    quiet: bool = False,
) -> PreparedModel:
    """Move ``model`` to ``device`` (eval mode; this mutates it, as ``module.to`` does), choose
    its path (:func:`pipeline.inference.choice.choose_path`) and build it.

    ``backend`` / ``precision``: ``auto`` or a requested one. ``workload``: how many images of
    what size the caller expects (decides whether a setup cost is worth paying).
    The choice is logged at INFO the first time this process runs that path on that device
    (DEBUG after that, and with ``quiet``).
    """
    dev = resolve_device(device)
    model.to(dev).eval()
    choice = choose_path(model, dev, backend=backend, precision=precision, workload=workload)
    try:
        path = build_path(model, choice.spec, dev, example=_example(model, dev))
    except PathUnavailable as err:
        if Backend(backend) is not Backend.AUTO or choice.spec.name == "eager":
            raise  # asked for explicitly: say why it cannot run
        log.warning("inference path %s failed here (%s); running eager", choice.spec.name, err)
        spec = PathSpec(Backend.EAGER)
        choice = PathChoice(spec, f"{choice.spec.name} failed to build: {err}")
        path = build_path(model, spec, dev)
    first = (choice.spec.name, str(dev)) not in _LOGGED
    _LOGGED.add((choice.spec.name, str(dev)))
    log.log(
        logging.INFO if first and not quiet else logging.DEBUG,
        "inference path %s on %s: %s",
        choice.spec.name,
        dev,
        choice.reason,
    )
    return PreparedModel(model, path, choice, dev)


def eager(model: Generator, device: str | torch.device = "cpu") -> PreparedModel:
    """The reference path, without a probe (what every other path is compared to)."""
    dev = resolve_device(device)
    model.to(dev).eval()
    spec = PathSpec(Backend.EAGER)
    return PreparedModel(model, build_path(model, spec, dev), PathChoice(spec, "requested"), dev)


def _weights_token(model: Generator) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


#: The prepared models of the last few plain generators (id -> (weak ref, device, weights
#: token, prepared)). Bounded, because a prepared model holds its generator: a weak-keyed map
#: whose values point back at their keys would keep every generator alive.
_DEFAULTS: OrderedDict[int, tuple[weakref.ref, torch.device, tuple, PreparedModel]] = OrderedDict()
DEFAULTS_KEPT = 4


def default_prepared(model: Generator, device: torch.device, pixels: int) -> PreparedModel:
    """The prepared model :func:`~pipeline.inference.restore.restore` uses for a plain generator
    (module docstring): auto path, a library caller's workload, made once per generator and
    device (for the last :data:`DEFAULTS_KEPT` generators), rebuilt when its weights changed."""
    model.to(device).eval()
    token = _weights_token(model)
    held = _DEFAULTS.get(id(model))
    if held is not None and held[0]() is model and held[1] == device and held[2] == token:
        _DEFAULTS.move_to_end(id(model))
        return held[3]
    # a rebuild (new weights, same generator) logs at DEBUG: the choice was logged already
    prepared = prepare_model(
        model,
        device=device,
        workload=Workload.library(pixels),
        quiet=held is not None and held[0]() is model,
    )
    _DEFAULTS[id(model)] = (weakref.ref(model), device, token, prepared)
    _DEFAULTS.move_to_end(id(model))
    while len(_DEFAULTS) > DEFAULTS_KEPT:
        _DEFAULTS.popitem(last=False)
    return prepared
