"""Scoring: every model restores every image of every chosen setting and is measured against
the clean image; one implementation for the DVC ``evaluate`` stage, the Prefect flows, the
ablation trials and the promotion rule.

* A model restores each setting ``(blur r, noise sigma)`` with the matching condition
  ``z = scale.to_z(r, sigma)``, ``scale`` being the z scale ITS checkpoint records
  (:mod:`pipeline.evaluation.specs`; unconditional baselines ignore z).
* The restored image is the uint8 array :func:`pipeline.inference.restore` returns -- what the
  CLI would write -- and the metrics (:class:`~pipeline.evaluation.suite.MetricSuite`) compare
  it, as ``k / 255`` floats, with the clean image.
* MSE models are scored with ``evaluate.mse_metrics``, GAN models with ``evaluate.gan_metrics``;
  a fixed-degradation baseline on its own setting only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from pipeline.condition import ConditionScale, setting_key
from pipeline.config import Params
from pipeline.degradation import to_tensor
from pipeline.device import resolve_device
from pipeline.evaluation.results import EvalReport, ScoreRow
from pipeline.evaluation.sets import EvalSet, load_eval_set
from pipeline.evaluation.specs import ModelSpec, Prebuilt, load_model
from pipeline.evaluation.suite import MetricSuite
from pipeline.evaluation.terms import EvalError, Kind
from pipeline.imageio import read_rgb8
from pipeline.inference import restore

__all__ = ["evaluate_images", "evaluate_models"]

log = logging.getLogger(__name__)


def evaluate_images(
    model: torch.nn.Module,
    model_name: str,
    kind: Kind,
    eval_set: EvalSet,
    settings: Sequence[tuple[float, float]],
    suite: MetricSuite,
    *,
    scale: ConditionScale,
    device: str | torch.device = "cpu",
    tile: int | None = None,
    tile_overlap: int = 32,
    metric_names: Sequence[str] | None = None,
    on_image: Callable[[], None] | None = None,
) -> list[ScoreRow]:
    """Restore and score every image of ``eval_set`` for each of ``settings`` (with the
    suite's metrics, or ``metric_names`` of them), z from the model's own ``scale``."""
    rows: list[ScoreRow] = []
    clean_cache: dict[str, np.ndarray] = {}
    for setting in settings:
        try:
            z = scale.to_z(setting[0], setting[1])
        except ValueError as err:
            raise EvalError(
                f"model {model_name}: setting {setting_key(*setting)} lies outside the z scale "
                f"its checkpoint records ({scale.describe()}): {err}"
            ) from None
        for image in eval_set.images:
            if image not in clean_cache:
                clean_cache[image] = read_rgb8(eval_set.gt_path(image)).array
            degraded = read_rgb8(eval_set.degraded_path(setting, image)).array
            restored = restore(
                model, degraded, z, tile=tile, tile_overlap=tile_overlap, device=device
            )
            scores = suite(to_tensor(restored), to_tensor(clean_cache[image]), metric_names)
            rows.append(
                ScoreRow(model_name, kind, eval_set.name, setting_key(*setting), image, scores)
            )
            if on_image is not None:
                on_image()
    return rows


def evaluate_models(
    models: Sequence[ModelSpec],
    eval_root: str | os.PathLike[str],
    params: Params,
    *,
    loaded: Mapping[str, Prebuilt] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate every model on every set of ``params.evaluate`` (one :class:`MetricSuite`).

    ``loaded`` maps a model name to a generator built already, with its z scale (a
    :class:`~pipeline.checkpoint.LoadedGenerator` or ``(model, ConditionScale)``: the sweep's
    trials and tests pass one); otherwise the checkpoint at ``spec.path`` is loaded.
    """
    ev = params.evaluate
    if not models:
        raise EvalError("no models to evaluate")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvalError(f"model names must be unique (got {names})")
    sets = list(ev.sets or params.evalsets.sets)
    settings = [tuple(map(float, s)) for s in (ev.settings or params.evalsets.settings)]
    device = resolve_device(ev.device)
    kinds = {m.kind for m in models}
    metric_names = {"mse": tuple(ev.mse_metrics), "gan": tuple(ev.gan_metrics)}
    suite = MetricSuite(
        [n for k in ("mse", "gan") if k in kinds for n in metric_names[k]],
        crop_border=ev.crop_border,
        pretrained=params.base.pretrained,
        weights_dir=params.base.weights_dir,
        device=device if ev.metrics_on_device else "cpu",
    )
    eval_sets = [load_eval_set(eval_root, s, settings, max_images=ev.max_images) for s in sets]
    start = time.perf_counter()
    rows: list[ScoreRow] = []
    meta: dict[str, dict[str, Any]] = {}
    scales: dict[str, ConditionScale] = {}
    total = sum(
        len(es.images) * (1 if m.is_baseline else len(settings)) for m in models for es in eval_sets
    )
    with _progress(progress, total) as tick:
        for spec in models:
            model_settings = [spec.setting] if spec.setting is not None else settings
            generator = load_model(spec, loaded)
            meta[spec.name], scales[spec.name] = dict(generator.metadata), generator.scale
            for es in eval_sets:
                log.info(
                    "evaluating %s on %s (%d images x %d settings, %s)",
                    spec.name,
                    es.name,
                    len(es.images),
                    len(model_settings),
                    generator.scale.describe(),
                )
                rows += evaluate_images(
                    generator.model,
                    spec.name,
                    spec.kind,
                    es,
                    model_settings,
                    suite,
                    scale=generator.scale,
                    device=device,
                    tile=ev.tile,
                    tile_overlap=ev.tile_overlap,
                    metric_names=metric_names[spec.kind],
                    on_image=tick,
                )
    return EvalReport(
        rows=rows,
        models=list(models),
        sets=sets,
        settings=[setting_key(*s) for s in settings],
        metrics=metric_names,  # type: ignore[arg-type]
        labels=dict(suite.labels),
        random=dict(suite.random),
        crop_border=ev.crop_border,
        model_meta=meta,
        scales=scales,
        seconds=time.perf_counter() - start,
    )


class _progress:
    """A rich progress bar over images (a no-op when disabled); yields a tick function."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self._bar = enabled, total, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        self._bar = Progress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task("evaluating", total=self.total)
        return lambda: self._bar.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
