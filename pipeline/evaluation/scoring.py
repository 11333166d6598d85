"""Scoring: every method restores every image of every setting it applies to and is measured
against the clean image; one implementation for the DVC ``evaluate`` stage, the Prefect flows,
the ablation trials and the promotion rule.

* A checkpoint restores each setting ``(blur r, noise sigma)`` with the matching condition
  ``z = scale.to_z(r, sigma)``, ``scale`` being the z scale ITS checkpoint records
  (:mod:`pipeline.evaluation.specs`; unconditional baselines ignore z); the references restore
  as :mod:`pipeline.evaluation.methods` says (the input: not at all).
* The restored image is a uint8 array -- what the CLI would write -- and the metrics
  (:class:`~pipeline.evaluation.suite.MetricSuite`) compare it, as ``k / 255`` floats, with the
  clean image, both cut by ``evaluate.size_mode`` first (:func:`~pipeline.evaluation.sets.
  fit_size`).
* MSE models are scored with ``evaluate.mse_metrics``, GAN models with ``evaluate.gan_metrics``,
  references with both (of the kinds evaluated); a fixed baseline on its own setting only.

The loop runs image by image: each PNG is decoded once per evaluation (not once per model), the
methods restore the image's settings, and everything is scored against the clean image inside
one :meth:`~pipeline.evaluation.suite.MetricSuite.reference` block (its LPIPS/DISTS features are
computed once per image, not once per restoration; each number is still the one-pair call's,
bitwise). A pair scored before -- the same restored and clean pixels, the same metric suite on
the same machine -- takes its numbers from the score cache (:mod:`pipeline.evaluation.
score_cache`; the degraded input on every rerun of the stage), bitwise those the suite would
compute. The rows come out in the order model -> set -> setting -> image, as the report files
list them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from rich.progress import Progress
from torch import Tensor

from pipeline.condition import setting_key
from pipeline.config import Params
from pipeline.degradation import to_tensor
from pipeline.evaluation.methods import ImageRef, Method
from pipeline.evaluation.plan import EvalPlan, plan_evaluation
from pipeline.evaluation.results import EvalReport, ScoreRow
from pipeline.evaluation.score_cache import pixels_digest
from pipeline.evaluation.sets import EvalSet, fit_size, load_eval_set
from pipeline.evaluation.specs import ModelSpec, Prebuilt, ReferenceSpec
from pipeline.evaluation.terms import REFERENCE_KIND, EvalError
from pipeline.imageio import read_rgb8

__all__ = ["evaluate_models", "score_plan"]

log = logging.getLogger(__name__)


def evaluate_models(
    models: Sequence[ModelSpec],
    eval_root: str | os.PathLike[str],
    params: Params,
    *,
    loaded: Mapping[str, Prebuilt] | None = None,
    references: Sequence[ReferenceSpec] = (),
    progress: bool = True,
) -> EvalReport:
    """Evaluate every model, and the ``references`` (none by default: the promotion rule and
    the sweep's trials rank models; the stage and the flow add the degraded input and
    ``evaluate.references`` through :func:`pipeline.evaluation.specs.reference_specs`), on
    every set of ``params.evaluate``.

    ``loaded`` maps a model name to a generator built already, with its z scale (a
    :class:`~pipeline.checkpoint.LoadedGenerator` or ``(model, ConditionScale)``: the sweep's
    trials and tests pass one); otherwise the checkpoint at ``spec.path`` is loaded.
    """
    plan = plan_evaluation(models, params, loaded=loaded, references=references)
    return score_plan(plan, eval_root, params, progress=progress)


def score_plan(
    plan: EvalPlan, eval_root: str | os.PathLike[str], params: Params, *, progress: bool = True
) -> EvalReport:
    """Restore and score with every method of ``plan`` on its sets (one pass over the images)."""
    ev = params.evaluate
    eval_sets = [
        load_eval_set(eval_root, s, plan.settings, max_images=ev.max_images) for s in plan.sets
    ]
    start = time.perf_counter()
    seconds = {m.spec.name: 0.0 for m in plan.methods}
    rows: list[ScoreRow] = []
    total = sum(len(es.images) * len(plan.settings_of(m)) for m in plan.methods for es in eval_sets)
    with _progress(progress, total) as tick:
        for es in eval_sets:
            log.info(
                "evaluating %d method(s) on %s (%d images x %d settings, size_mode %s)",
                len(plan.methods),
                es.name,
                len(es.images),
                len(plan.settings),
                plan.size_mode,
            )
            for image in es.images:
                rows += _score_image(plan, es, image, seconds, tick)
    if plan.score_cache is not None and plan.score_cache.hits:
        log.info("%s", plan.score_cache.summary())
    order = {m.spec.name: i for i, m in enumerate(plan.methods)}
    set_order = {s: i for i, s in enumerate(plan.sets)}
    keys = [setting_key(*s) for s in plan.settings]
    rows.sort(key=lambda r: (order[r.model], set_order[r.set], keys.index(r.setting)))
    models = plan.models
    return EvalReport(
        rows=rows,
        models=models,
        sets=list(plan.sets),
        settings=keys,
        metrics={**plan.kind_metrics, REFERENCE_KIND: _reference_metrics(plan)},
        labels=dict(plan.suite.labels),
        random=dict(plan.suite.random),
        crop_border=ev.crop_border,
        model_meta={m.name: dict(plan.generators[m.name].metadata) for m in models},
        scales={m.name: plan.generators[m.name].scale for m in models},
        seconds=time.perf_counter() - start,
        references=plan.references,
        size_mode=plan.size_mode,
        method_seconds=seconds,
    )


def _score_image(
    plan: EvalPlan, es: EvalSet, image: str, seconds: dict[str, float], tick: Callable[[], None]
) -> list[ScoreRow]:
    """Every method's rows for one image: its PNGs decoded once, shared by the methods."""
    mode = plan.size_mode
    clean = fit_size(read_rgb8(es.gt_path(image)).array, mode, where=str(es.gt_path(image)))
    degraded: dict[tuple[float, float], np.ndarray] = {}
    rows: list[ScoreRow] = []
    with plan.suite.reference():
        for method in plan.methods:
            rows += _score_method(plan, method, es, image, clean, degraded, seconds, tick)
    return rows


def _score_method(
    plan: EvalPlan,
    method: Method,
    es: EvalSet,
    image: str,
    clean: np.ndarray,
    degraded: dict[tuple[float, float], np.ndarray],
    seconds: dict[str, float],
    tick: Callable[[], None],
) -> list[ScoreRow]:
    """One method on one image: restore each of its settings (degraded PNGs decoded once, on
    first use, into ``degraded``), then score the restorations."""
    mode, ref = plan.size_mode, ImageRef(es.name, image)
    t0 = time.perf_counter()
    clean_t = to_tensor(clean)
    settings = plan.settings_of(method)
    restored = []
    for setting in settings:
        if setting not in degraded:
            path = es.degraded_path(setting, image)
            degraded[setting] = fit_size(read_rgb8(path).array, mode, where=str(path))
        restored.append(_restore(method, degraded[setting], setting, ref, clean.shape))
        tick()
    scores = _scores(plan, restored, clean, clean_t, plan.metric_names[method.spec.name])
    kind = method.spec.kind if isinstance(method.spec, ModelSpec) else REFERENCE_KIND
    seconds[method.spec.name] += time.perf_counter() - t0
    return [
        ScoreRow(method.spec.name, kind, es.name, setting_key(*s), image, sc)
        for s, sc in zip(settings, scores, strict=True)
    ]


def _scores(
    plan: EvalPlan,
    restored: Sequence[np.ndarray],
    clean: np.ndarray,
    clean_t: Tensor,
    names: tuple[str, ...],
) -> list[dict[str, float]]:
    """The scores of each restoration against ``clean``: from the plan's score cache where it
    holds the pair (:mod:`pipeline.evaluation.score_cache`), the rest computed by the suite in
    one call, and stored."""
    cache = plan.score_cache
    if cache is None:
        return plan.suite.score_many([to_tensor(r) for r in restored], clean_t, names)
    clean_digest = pixels_digest(clean)
    keys = [cache.key(pixels_digest(r), clean_digest, names) for r in restored]
    found = [cache.get(k, names) for k in keys]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        computed = plan.suite.score_many([to_tensor(restored[i]) for i in todo], clean_t, names)
        for i, scores in zip(todo, computed, strict=True):
            cache.put(keys[i], scores)
            found[i] = scores
    return [f for f in found if f is not None]


def _restore(
    method: Method,
    degraded: np.ndarray,
    setting: tuple[float, float],
    ref: ImageRef,
    shape: tuple[int, ...],
) -> np.ndarray:
    out = method.restore(degraded, setting, ref)
    if out.shape != shape or out.dtype != np.uint8:
        raise EvalError(
            f"{method.spec.name} restored {ref.set}/{setting_key(*setting)}/{ref.image} as "
            f"{out.dtype} {out.shape}, the clean image is uint8 {shape}"
        )
    return out


def _reference_metrics(plan: EvalPlan) -> tuple[str, ...]:
    refs = plan.references
    return plan.metric_names[refs[0].name] if refs else ()


class _progress:
    """A rich progress bar over restorations (a no-op when disabled); yields a tick function."""

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
