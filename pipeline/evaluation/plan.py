"""The plan of one evaluation: every method, loaded ONCE, and the metric suite, built ONCE, shared
by the scoring and the figures of a stage (loading a checkpoint or building LPIPS/DISTS twice
costs seconds each; the networks are the same).

:func:`plan_evaluation` turns model specs into an :class:`EvalPlan`: it adds the fixed-degradation
baselines (optional) and the references (the degraded input always, ``evaluate.references``),
resolves registry URIs to local checkpoints, loads every checkpoint with its z scale, checks
every setting against each scale before any work, and builds the methods
(:mod:`pipeline.evaluation.methods`) and the :class:`~pipeline.evaluation.suite.MetricSuite`.

Metrics: a model is scored with the metrics of its kind (``evaluate.mse_metrics`` /
``gan_metrics``); a reference with those of every kind among the evaluation's models, so that
it sits in each table they appear in (an MSE-only evaluation spends nothing on LPIPS/DISTS).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from pipeline.checkpoint import LoadedGenerator
from pipeline.condition import ConditionScale
from pipeline.config import Params
from pipeline.device import resolve_device
from pipeline.evaluation.methods import CheckpointMethod, Method, build_methods
from pipeline.evaluation.score_cache import ScoreCache
from pipeline.evaluation.specs import (
    MethodSpec,
    ModelSpec,
    Prebuilt,
    ReferenceSpec,
    load_model,
    reference_specs,
    resolve_registry_models,
    with_baselines,
)
from pipeline.evaluation.suite import MetricSuite
from pipeline.evaluation.terms import EvalError, Kind, SizeMode
from pipeline.inference.choice import cache_dir

__all__ = ["EvalPlan", "plan_evaluation"]

log = logging.getLogger(__name__)


class EvalPlan:
    """What an evaluation scores and with what: ``methods`` (models, fixed baselines, then
    references, in that order), the loaded ``generators`` by model name, the ``suite``, the
    metric names of each method, the sets and settings, the size mode, and the score cache (None:
    every pair is computed)."""

    def __init__(
        self,
        methods: Sequence[Method],
        generators: Mapping[str, LoadedGenerator],
        suite: MetricSuite,
        metric_names: Mapping[str, tuple[str, ...]],
        kind_metrics: Mapping[str, tuple[str, ...]],
        sets: Sequence[str],
        settings: Sequence[tuple[float, float]],
        size_mode: SizeMode,
        device: torch.device,
        score_cache: ScoreCache | None = None,
    ) -> None:
        self.methods = list(methods)
        self.generators = dict(generators)
        self.suite = suite
        self.metric_names = dict(metric_names)
        self.kind_metrics = dict(kind_metrics)
        self.sets = list(sets)
        self.settings = [tuple(map(float, s)) for s in settings]
        self.size_mode = size_mode
        self.device = device
        self.score_cache = score_cache

    @property
    def specs(self) -> list[MethodSpec]:
        return [m.spec for m in self.methods]

    @property
    def models(self) -> list[ModelSpec]:
        """The checkpoints (models and fixed baselines), in order."""
        return [s for s in self.specs if isinstance(s, ModelSpec)]

    @property
    def references(self) -> list[ReferenceSpec]:
        return [s for s in self.specs if isinstance(s, ReferenceSpec)]

    @property
    def scales(self) -> dict[str, ConditionScale]:
        return {name: g.scale for name, g in self.generators.items()}

    def settings_of(self, method: Method) -> list[tuple[float, float]]:
        """The settings ``method`` is scored on, in the evaluation's order."""
        return [s for s in self.settings if method.spec.applies_to(s)]


def plan_evaluation(
    models: Sequence[ModelSpec],
    params: Params,
    *,
    loaded: Mapping[str, Prebuilt] | None = None,
    baselines: bool = False,
    references: Sequence[ReferenceSpec] | None = None,
    tracking_uri: str | None = None,
    registry_dir: str | os.PathLike[str] | None = None,
) -> EvalPlan:
    """Everything :func:`pipeline.evaluation.scoring.score_plan` and the figures need.

    ``baselines``: add the Unet/UGAN baselines under ``evaluate.baselines_*``. ``references``:
    the reference methods (None: the input and ``evaluate.references``). ``loaded``: models
    built already (by name). Registry URIs are downloaded from ``tracking_uri`` under
    ``registry_dir`` (None: a temporary directory, removed once the models are loaded).
    """
    ev = params.evaluate
    if not models:
        raise EvalError("no models to evaluate")
    specs = with_baselines(models, params) if baselines else list(models)
    refs = reference_specs(params) if references is None else list(references)
    names = [s.name for s in [*specs, *refs]]
    if len(set(names)) != len(names):
        raise EvalError(f"method names must be unique (got {names})")
    settings = [tuple(map(float, s)) for s in (ev.settings or params.evalsets.settings)]
    device = resolve_device(ev.device)
    with ExitStack() as stack:
        if any(s.uri is not None for s in specs):
            root = registry_dir or stack.enter_context(tempfile.TemporaryDirectory())
            specs = resolve_registry_models(specs, tracking_uri, Path(root))
        generators = {spec.name: load_model(spec, loaded) for spec in specs}
    kinds: list[Kind] = [k for k in ("mse", "gan") if any(s.kind == k for s in specs)]
    kind_metrics = {"mse": tuple(ev.mse_metrics), "gan": tuple(ev.gan_metrics)}
    every = tuple(dict.fromkeys(n for k in kinds for n in kind_metrics[k]))
    metric_names = {s.name: kind_metrics[s.kind] for s in specs}
    metric_names.update({r.name: every for r in refs})
    suite = MetricSuite(
        every,
        crop_border=ev.crop_border,
        pretrained=params.base.pretrained,
        weights_dir=params.base.weights_dir,
        device=device if ev.metrics_on_device else "cpu",
    )
    methods = build_methods(
        [*specs, *refs],
        generators,
        device=device,
        size_mode=ev.size_mode,
        tile=ev.tile,
        tile_overlap=ev.tile_overlap,
    )
    for method in methods:
        if isinstance(method, CheckpointMethod):
            method.check(settings)
    log.info(
        "evaluation plan: %s; size_mode %s",
        ", ".join(f"{s.name} ({s.role})" for s in [*specs, *refs]),
        ev.size_mode,
    )
    return EvalPlan(
        methods,
        generators,
        suite,
        metric_names,
        kind_metrics,
        list(ev.sets or params.evalsets.sets),
        settings,
        ev.size_mode,
        device,
        ScoreCache(cache_dir() / "scores", suite.identity()) if ev.score_cache else None,
    )
