"""Prefect flow ``cugan-ablation-sweep``: the paper's ablations as a Ray Tune sweep
(:mod:`pipeline.sweep`), ranked in a summary table and figure.

Ray is called from an ordinary Prefect task: it connects to ``sweep.ray_address`` (else
``ray.address``, else $RAY_ADDRESS) or reuses the Ray instance this process already runs, or
starts a local one for the flow's duration. Each trial trains through
``pipeline.train.trainer.run_stage`` and evaluates through ``pipeline.evaluation``, exactly as
``dvc repro`` does; ``sweep.max_concurrent_trials`` (default 1) caps the trials in flight.

    python -m flows.sweep --shards data/shards            # the variants of params.yaml sweep
    python -m flows.sweep --synthetic 64                  # smoke run without the data stages
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.config import Params, load_params
from pipeline.evaluation.output import console_text
from pipeline.ray_runtime import cluster_address, ensure_ray
from pipeline.sweep import (
    SweepError,
    TrialResult,
    rank_results,
    run_sweep,
    summary_table,
    write_summary,
)
from pipeline.tracking import (
    create_run,
    end_run,
    flatten_params,
    git_tags,
    log_to_run,
    resolve_tracking_uri,
)
from pipeline.train.trainer import available_cpus

__all__ = ["sweep_flow"]


@task(cache_policy=NO_CACHE)
def load_params_task(params_path: str) -> Params:
    return load_params(params_path)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def start_sweep_run_task(params: Params, tracking_uri: str, name: str) -> str:
    """The parent MLflow run of the sweep (in ``sweep.mlflow_experiment``)."""
    sp = params.sweep
    return create_run(
        tracking_uri,
        sp.mlflow_experiment,
        run_name=name,
        tags={
            "sweep.metric": sp.metric,
            "sweep.mode": sp.mode,
            "sweep.variants": ",".join(v.name for v in sp.variants),
            **git_tags(),
        },
        params=flatten_params({"sweep": params.model_dump(mode="json")["sweep"]}),
        artifact_location=params.tracking.artifact_location,
    )


@task(cache_policy=NO_CACHE)
def ray_sweep_task(
    params: Params,
    eval_root: str,
    out_dir: str,
    shards_dir: str | None,
    synthetic: dict[str, int] | None,
    tracking_uri: str | None,
    sweep_run_id: str | None,
    name: str,
) -> list[TrialResult]:
    """Connect to (or start) Ray and run the Tune sweep."""
    logger = get_run_logger()
    address = cluster_address(params.sweep.ray_address or params.ray.address)
    if address and not ray.is_initialized():
        logger.info("connecting to the Ray cluster at %s", address)
    started = ensure_ray(address, num_cpus=params.ray.local_num_cpus or available_cpus())
    try:
        return run_sweep(
            params,
            eval_root=eval_root,
            out_dir=out_dir,
            shards_dir=shards_dir,
            synthetic=synthetic,
            tracking_uri=tracking_uri,
            sweep_run_id=sweep_run_id,
            name=name,
        )
    finally:
        if started:
            ray.shutdown()


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def summarize_task(
    results: list[TrialResult],
    params: Params,
    out_dir: str,
    name: str,
    tracking_uri: str | None,
    sweep_run_id: str | None,
) -> dict[str, Path]:
    """Ranked table (log + Prefect artifact), summary files, and the sweep run's record."""
    logger = get_run_logger()
    sp = params.sweep
    title = f"Ablation sweep {name}: {sp.metric} ({sp.mode})"
    paths = write_summary(results, params, Path(out_dir) / name, title=title)
    logger.info("%s", console_text([summary_table(results, params, title=title)]))
    create_table_artifact(
        key="cugan-ablation-sweep",
        description=title,
        table=[
            {"rank": i + 1, "variant": r.variant, "score": r.score, "error": r.error}
            for i, r in enumerate(rank_results(results, sp.mode))
        ],
    )
    if sweep_run_id is not None and tracking_uri is not None:
        best = rank_results(results, sp.mode)[0]
        log_to_run(
            tracking_uri,
            sweep_run_id,
            metrics={f"score/{r.variant}": r.score for r in results if r.score is not None},
            tags={
                "sweep.best_variant": best.variant if best.score is not None else "none",
                "sweep.random_backbones": str(
                    any(r.metrics.get("random_backbones") for r in results)
                ).lower(),
            },
            artifacts=[(p, "summary") for p in paths.values()],
        )
        end_run(
            tracking_uri,
            sweep_run_id,
            "FINISHED" if any(r.score is not None for r in results) else "FAILED",
        )
    return paths


@flow(name="cugan-ablation-sweep")
def sweep_flow(
    params_path: str = "params.yaml",
    eval_root: str = "data/evalsets",
    shards_dir: str | None = "data/shards",
    synthetic_samples: int | None = None,
    out_dir: str | None = None,
    tracking_uri: str | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Run the ablation sweep of ``params.yaml`` (``sweep`` section); returns the ranked rows.

    ``synthetic_samples`` trains on generated tensors instead of ``shards_dir`` (smoke runs).
    """
    params = load_params_task(params_path)
    name = name or time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime())
    out = out_dir or params.sweep.storage_path
    uri = (
        (tracking_uri or resolve_tracking_uri(params.tracking)) if params.tracking.enabled else None
    )
    sweep_run_id = start_sweep_run_task(params, uri, name) if uri else None
    synthetic = (
        {"num_samples": synthetic_samples, "seed": params.base.seed} if synthetic_samples else None
    )
    results = ray_sweep_task(
        params,
        eval_root,
        out,
        None if synthetic else shards_dir,
        synthetic,
        uri,
        sweep_run_id,
        name,
    )
    summarize_task(results, params, out, name, uri, sweep_run_id)
    if all(r.score is None for r in results):
        raise SweepError(f"every trial failed; first error: {results[0].error}")
    return [dataclasses.asdict(r) for r in rank_results(results, params.sweep.mode)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the ablation sweep once.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--evalsets", default="data/evalsets")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="train on N generated samples instead of the shards (smoke run)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    sweep_flow(
        params_path=args.params,
        eval_root=args.evalsets,
        shards_dir=args.shards,
        synthetic_samples=args.synthetic,
        out_dir=args.out,
        tracking_uri=args.tracking_uri,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
