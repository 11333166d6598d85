"""Prefect flow ``cugan-evaluate``: the DVC ``evaluate`` stage's steps, one task each.

The work is :mod:`pipeline.evaluation` / :mod:`pipeline.eval_report` / :mod:`pipeline.figures`,
exactly as the stage runs it; the flow adds retries on the I/O steps (files, MLflow), the run
log and a Prefect table artifact with the per-setting means.

    python -m flows.evaluate --model cunet:mse:runs/train_cunet/model \\
        --model cugan:gan:runs/train_cugan/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.config import Params, load_params
from pipeline.eval_report import log_report_to_mlflow, report_text, write_report
from pipeline.evaluation import (
    DEFAULT_MODEL_SPECS,
    EvalReport,
    ModelSpec,
    evaluate_models,
    mlflow_uri,
    parse_model_spec,
    with_baselines,
)

__all__ = ["evaluate_flow"]


@task(cache_policy=NO_CACHE)
def load_params_task(params_path: str) -> Params:
    return load_params(params_path)


@task(cache_policy=NO_CACHE)
def evaluate_task(specs: list[ModelSpec], eval_root: str, params: Params) -> EvalReport:
    return evaluate_models(specs, eval_root, params, progress=False)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def write_task(report: EvalReport, out_dir: str) -> dict[str, Path]:
    return write_report(report, out_dir)


@task(cache_policy=NO_CACHE)
def figures_task(
    specs: list[ModelSpec], eval_root: str, out_dir: str, params: Params, enabled: bool
) -> list[Path]:
    from pipeline.figures import make_figures, write_placeholders

    if not enabled:
        write_placeholders(out_dir)
        return []
    return make_figures([s for s in specs if not s.is_baseline], eval_root, out_dir, params)


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def mlflow_task(
    report: EvalReport,
    paths: dict[str, Path],
    extra: list[Path],
    tracking_uri: str | None,
    params: Params,
) -> dict[str, str]:
    return log_report_to_mlflow(
        report,
        paths,
        tracking_uri=tracking_uri or mlflow_uri(params),
        extra_artifacts=extra,
        experiment=params.evaluate.mlflow_experiment,
        artifact_location=params.tracking.artifact_location,
    )


@task(cache_policy=NO_CACHE)
def publish_task(report: EvalReport) -> None:
    """Tables into the run log, per-setting means as a Prefect table artifact."""
    logger = get_run_logger()
    logger.info("evaluation results:\n%s", report_text(report))
    rows: list[dict[str, Any]] = []
    for model, per_set in report.means().items():
        for set_name, per_setting in per_set.items():
            for setting, values in per_setting.items():
                rows.append(
                    {
                        "model": model,
                        "set": set_name,
                        "setting": setting,
                        **{k: round(v, 4) for k, v in values.items()},
                    }
                )
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
    specs = with_baselines([parse_model_spec(m) for m in models or DEFAULT_MODEL_SPECS], params)
    report = evaluate_task(specs, eval_root, params)
    paths = write_task(report, out_dir)
    extra = figures_task(
        specs, eval_root, out_dir, params, figures and params.evaluate.figures.enabled
    )
    publish_task(report)
    if log_mlflow and params.tracking.enabled:
        mlflow_task(report, paths, extra, tracking_uri, params)
    return report.flat_metrics()


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
