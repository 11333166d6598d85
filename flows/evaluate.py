"""Prefect flow ``cugan-evaluate``: the DVC ``evaluate`` stage, each of its steps a task.

The flow runs :func:`pipeline.evaluation.run.run_evaluation` -- the one definition of the
evaluation's steps, which the stage runs too -- with a step runner that wraps every step in a
Prefect task (retries on the I/O steps: files, MLflow), and a publish step that writes the
tables into the run log and the per-setting means into a Prefect table artifact.

    python -m flows.evaluate --model cunet:mse:runs/train_cunet/model \\
        --model cugan:gan:runs/train_cugan/model
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.config import Params, load_params
from pipeline.evaluation.output import report_text
from pipeline.evaluation.results import EvalReport
from pipeline.evaluation.run import Step, run_evaluation
from pipeline.evaluation.specs import DEFAULT_MODEL_SPECS, parse_model_spec

__all__ = ["evaluate_flow", "run_step_as_task"]

T = TypeVar("T")

#: Task options per step; the rest run once (a failed score or figure is a bug, not a blip).
TASK_OPTIONS: dict[Step, dict[str, Any]] = {
    Step.WRITE: {"retries": 2, "retry_delay_seconds": 2},
    Step.LOG: {"retries": 3, "retry_delay_seconds": 5},
}


def run_step_as_task(step: Step, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """The flow's step runner: ``fn`` as the Prefect task ``<step>`` (one task run each)."""
    options = TASK_OPTIONS.get(step, {})
    return task(fn, name=step.value, cache_policy=NO_CACHE, **options)(*args, **kwargs)


@task(cache_policy=NO_CACHE)
def load_params_task(params_path: str) -> Params:
    return load_params(params_path)


def publish_to_prefect(report: EvalReport) -> None:
    """Tables into the run log, per-setting means as a Prefect table artifact."""
    logger = get_run_logger()
    logger.info("evaluation results:\n%s", report_text(report))
    rows = [
        {
            "model": r.model,
            "set": r.set,
            "setting": r.setting,
            **{k: round(v, 4) for k, v in r.scores.items()},
        }
        for r in report.means().rows()
    ]
    rnd = (
        " (LPIPS/DISTS on RANDOM backbone weights: not meaningful)"
        if report.random_backbones
        else ""
    )
    create_table_artifact(
        table=rows, key="cugan-evaluation", description=f"Mean metrics per setting{rnd}"
    )


@flow(name="cugan-evaluate")
def evaluate_flow(
    models: list[str] | None = None,
    eval_root: str = "data/evalsets",
    out_dir: str = "runs/eval",
    params_path: str = "params.yaml",
    tracking_uri: str | None = None,
    figures: bool = True,
    log_mlflow: bool = True,
) -> dict[str, float]:
    """Evaluate ``models`` (``NAME:KIND:PATH``; None: the DVC stage's two, DEFAULT_MODEL_SPECS)
    and return the flat metrics (``{model}/{set}/{setting}/{metric}``)."""
    params = load_params_task(params_path)
    done = run_evaluation(
        [parse_model_spec(m) for m in models or DEFAULT_MODEL_SPECS],
        eval_root,
        out_dir,
        params,
        tracking_uri=tracking_uri,
        figures=figures,
        log_mlflow=log_mlflow,
        progress=False,
        publish=publish_to_prefect,
        run_step=run_step_as_task,
    )
    return done.report.flat_metrics()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the evaluation flow once (no schedule).")
    ap.add_argument("--model", action="append", default=None, metavar="NAME:KIND:PATH")
    ap.add_argument("--evalsets", default="data/evalsets")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    evaluate_flow(
        models=args.model,
        eval_root=args.evalsets,
        out_dir=args.out,
        params_path=args.params,
        tracking_uri=args.tracking_uri,
        figures=not args.no_figures,
        log_mlflow=not args.no_mlflow,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
