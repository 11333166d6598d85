"""The whole evaluation of the DVC ``evaluate`` stage, as one sequence of named steps.

:func:`run_evaluation` is the ONE definition of that sequence: plan (the models plus their
baselines and the references, each checkpoint loaded and the metric suite built once, for
scoring AND figures) -> score -> write the metrics/plots files -> figures (or their
placeholders) -> publish (print the tables) -> log to MLflow. ``stages/evaluate.py`` runs it
as is; the Prefect flow (``flows/evaluate.py``) runs the same function with a ``run_step``
that makes each step a Prefect task (retries on the I/O steps) and a ``publish`` that writes
to the flow's log and a table artifact. Nothing else lists the steps.

MLflow (:func:`log_report_to_mlflow`, through :mod:`pipeline.tracking`): each model's metrics
(``eval/<set>/<setting>/<metric>``, ``eval/distance/...``), the tags that say what they are and
the files go to the run its training stage recorded (``tracking.json`` beside the checkpoint),
else to a new run in ``evaluate.mlflow_experiment`` tagged with the checkpoint path. The
references' numbers go to every model's run as ``eval/ref/<reference>/<set>/<setting>/<metric>``,
beside the model's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline.config import Params
from pipeline.evaluation.figures import make_figures, write_placeholders
from pipeline.evaluation.output import print_report, write_report
from pipeline.evaluation.plan import EvalPlan, plan_evaluation
from pipeline.evaluation.results import EvalReport
from pipeline.evaluation.scoring import score_plan
from pipeline.evaluation.specs import ModelSpec
from pipeline.tracking import create_run, end_run, log_to_run, recorded_run_id, resolve_tracking_uri

__all__ = [
    "EvalRun",
    "Step",
    "StepRunner",
    "draw_figures",
    "log_evaluation",
    "log_report_to_mlflow",
    "run_directly",
    "run_evaluation",
]

T = TypeVar("T")


class Step(StrEnum):
    """The steps of an evaluation, in the order :func:`run_evaluation` runs them."""

    PLAN = "plan"  # the models asked for, the baselines found, the references; loaded once
    SCORE = "score"  # restore and measure (pipeline.evaluation.scoring)
    WRITE = "write"  # metrics.json, paper.json, plots/*.csv
    FIGURES = "figures"  # figures/*.png and the curve CSVs, or the placeholders DVC expects
    PUBLISH = "publish"  # the tables, for people
    LOG = "log"  # MLflow


class StepRunner(Protocol):
    """Runs one step: ``run_step(step, fn, *args, **kwargs)`` returns ``fn(*args, **kwargs)``
    (possibly as a Prefect task, with retries)."""

    def __call__(self, step: Step, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...


def run_directly(step: Step, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """The DVC stage's runner: call the step in this process, now."""
    return fn(*args, **kwargs)


@dataclass(frozen=True)
class EvalRun:
    """What :func:`run_evaluation` produced: the report, the files by role (the DVC metrics and
    plots), the figure files, and the MLflow run of each model (empty when not logged)."""

    report: EvalReport
    paths: dict[str, Path]
    figures: list[Path] = field(default_factory=list)
    mlflow_runs: dict[str, str] = field(default_factory=dict)


def draw_figures(
    plan: EvalPlan,
    eval_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: Params,
    enabled: bool,
) -> list[Path]:
    """The modulation figures of the modulation models (baselines and references have no z to
    modulate), with the plan's loaded models, or, when disabled, the placeholder files the DVC
    stage declares."""
    if not enabled:
        write_placeholders(out_dir)
        return []
    models = [m for m in plan.models if not m.is_baseline]
    return make_figures(models, eval_root, out_dir, params, loaded=plan.generators)


def log_evaluation(
    report: EvalReport, paths: Mapping[str, Path], figures: list[Path], uri: str, params: Params
) -> dict[str, str]:
    """The LOG step: :func:`log_report_to_mlflow` with the experiment and artifact root of
    params.yaml."""
    return log_report_to_mlflow(
        report,
        paths,
        tracking_uri=uri,
        experiment=params.evaluate.mlflow_experiment,
        artifact_location=params.tracking.artifact_location,
        extra_artifacts=figures,
    )


def run_evaluation(
    models: Sequence[ModelSpec],
    eval_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: Params,
    *,
    tracking_uri: str | None = None,
    figures: bool = True,
    log_mlflow: bool = True,
    progress: bool = True,
    publish: Callable[[EvalReport], None] = print_report,
    run_step: StepRunner = run_directly,
) -> EvalRun:
    """Evaluate ``models`` and their baselines, write metrics/plots (+ modulation figures),
    publish the tables, log to MLflow (unless ``log_mlflow`` or ``tracking.enabled`` is false;
    the store is ``tracking_uri``, else the training stages' store,
    :func:`pipeline.tracking.resolve_tracking_uri`)."""
    uri = tracking_uri or resolve_tracking_uri(params.tracking)
    plan = run_step(
        Step.PLAN,
        plan_evaluation,
        models,
        params,
        baselines=True,
        tracking_uri=uri,
        registry_dir=Path(out_dir).resolve() / "registry",
    )
    report = run_step(Step.SCORE, score_plan, plan, eval_root, params, progress=progress)
    paths = run_step(Step.WRITE, write_report, report, out_dir)
    extra = run_step(
        Step.FIGURES,
        draw_figures,
        plan,
        eval_root,
        out_dir,
        params,
        figures and params.evaluate.figures.enabled,
    )
    run_step(Step.PUBLISH, publish, report)
    runs: dict[str, str] = {}
    if log_mlflow and params.tracking.enabled:
        runs = run_step(Step.LOG, log_evaluation, report, paths, extra, uri, params)
    return EvalRun(report, dict(paths), list(extra), dict(runs))


def log_report_to_mlflow(
    report: EvalReport,
    paths: Mapping[str, Path],
    *,
    tracking_uri: str,
    experiment: str = "cugan-evaluate",
    artifact_location: str | os.PathLike[str] | None = None,
    extra_artifacts: Iterable[Path] = (),
    run_ids: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Log each model's metrics, the labels and the files to MLflow; returns model -> run id.

    The run of a model is ``run_ids[name]``, else ``spec.mlflow_run_id``, else the run its
    training stage recorded (:func:`pipeline.tracking.recorded_run_id`), else a new run in
    ``experiment`` tagged with the checkpoint path. Metrics are ``eval/<set>/<setting>/<metric>``
    and ``eval/distance/...``; tags ``eval.random_backbones``, ``eval.crop_border``,
    ``eval.sets``, ``eval.size_mode`` and ``eval.label.<metric>`` say what the numbers are. The
    references' means go to every model's run under ``eval/ref/<reference>/...``.
    """
    flat = report.flat_metrics()
    refs = {"eval/ref/" + k: v for k, v in report.reference_metrics().items()}
    tags = {
        "eval.random_backbones": str(report.random_backbones).lower(),
        "eval.size_mode": report.size_mode,
        "eval.references": ",".join(report.reference_names),
        "eval.crop_border": str(report.crop_border),
        "eval.sets": ",".join(report.sets),
        **{f"eval.label.{k}": v for k, v in report.labels.items()},
    }
    files = [
        (p, "evaluation/figures" if p.suffix == ".png" else "evaluation")
        for p in map(Path, [*paths.values(), *extra_artifacts])
        if p.is_file()
    ]
    used: dict[str, str] = {}
    for spec in report.models:
        run_id = (
            (run_ids or {}).get(spec.name)
            or spec.mlflow_run_id
            or recorded_run_id(spec.path, tracking_uri, report.model_meta.get(spec.name, {}))
        )
        if run_id is None:
            run_id = create_run(
                tracking_uri,
                experiment,
                run_name=f"evaluate-{spec.name}",
                tags={
                    "cugan.model_path": str(spec.path),
                    "cugan.model_kind": spec.kind,
                    **({"cugan.model_uri": spec.uri} if spec.uri else {}),
                },
                artifact_location=artifact_location,
            )
            end_run(tracking_uri, run_id)  # a record, not a process: finished at once
        prefix = f"{spec.name}/"
        metrics = {"eval/" + k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        metrics.update(refs)
        log_to_run(tracking_uri, run_id, metrics=metrics, tags=tags, artifacts=files)
        used[spec.name] = run_id
    return used
