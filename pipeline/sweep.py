"""The ablation sweep (paper section 4.4) on Ray Tune: each trial trains and evaluates one
variant through the SAME code as the main pipeline.

A trial (:func:`ablation_trial`, a Tune function trainable; ``Tuner(trainer)`` is deprecated in
Ray Train V2, so the trial function builds the TorchTrainer itself) takes the sweep's params
with the profile and the variant's overrides applied, then:

1. trains ``train_cunet`` with :func:`pipeline.train.trainer.run_stage` (which builds and fits
   the TorchTrainer), and for a GAN variant ``train_cugan`` from that CUnet, as ``dvc repro``
   does;
2. evaluates the final generator with :func:`pipeline.evaluation.scoring.evaluate_models` on
   the evaluation sets, writes the same files as the ``evaluate`` stage under the trial
   directory (:func:`pipeline.evaluation.output.write_report`);
3. reports ``score`` (the configured metric, e.g. ``holdout/all/lpips``) to Tune.

MLflow: one *sweep* run; each trial is a child run of it (``mlflow.parentRunId``) holding the
variant's flattened params and its evaluation; the training stages of a trial are children of
the trial run (``$CUGAN_MLFLOW_PARENT_RUN_ID``, pipeline.tracking; every MLflow call goes
through that package). Trials never register models: ablation models must not compete for the
``champion`` alias.

The variants (``sweep.variants``): ``cugan-1`` / ``cugan-2`` / ``cugan-3`` (1, 2 or 3 scales, 12
residual blocks in total, models.registry) and ``cugan-3-no-gfm`` (the discriminator without
global feature modulation); ``sweep.include_gan_loss`` adds ``relativistic`` (RaGAN instead of
the paper's vanilla GAN loss). The ``cugan-3`` and ``cugan-3-no-gfm`` trials each train their own
CUnet (identical by seed): simple and independent, at the price of one duplicated MSE stage.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
from rich.table import Table

from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.config import ConfigError, Params, SweepVariant, parse_params
from pipeline.errors import one_line
from pipeline.evaluation.figures import new_figure, save_figure
from pipeline.evaluation.output import write_report
from pipeline.evaluation.run import log_report_to_mlflow
from pipeline.evaluation.scoring import evaluate_models
from pipeline.evaluation.specs import ModelSpec
from pipeline.tracking import (
    PARENT_ENV,
    MissingExperiment,
    create_run,
    end_run,
    flatten_params,
    log_to_run,
)
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.trainer import run_stage

__all__ = [
    "SweepError",
    "TrialResult",
    "ablation_trial",
    "deep_merge",
    "rank_results",
    "run_sweep",
    "summary_table",
    "sweep_variants",
    "variant_params",
    "write_summary",
]

log = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """The sweep could not run or no trial finished (one-line message)."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively for nested mappings (copies)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def sweep_variants(params: Params) -> list[SweepVariant]:
    """``sweep.variants`` plus ``relativistic`` when ``sweep.include_gan_loss`` is set."""
    variants = list(params.sweep.variants)
    if params.sweep.include_gan_loss and all(v.name != "relativistic" for v in variants):
        variants.append(
            # The cugan-3 arm with RaGAN: compare it with "cugan-3" (the paper's vanilla GAN).
            SweepVariant(
                name="relativistic",
                overrides={
                    "train_cunet": {"generator": "cugan-3"},
                    "train_cugan": {
                        "generator": "cugan-3",
                        "discriminator": "authors",
                        "gan_type": "relativistic",
                    },
                },
            )
        )
    if not variants:
        raise SweepError("sweep.variants is empty: nothing to compare")
    return variants


def variant_params(
    params: Params, variant: SweepVariant, *, trial_dir: str | os.PathLike[str]
) -> Params:
    """The params one trial trains with: params <- sweep.profile <- variant overrides <- the
    sweep's own settings (MLflow experiment, no model registration, Ray storage in the trial
    directory). A bad override is a ConfigError naming the variant and the key."""
    raw = params.model_dump(mode="json")
    raw = deep_merge(raw, params.sweep.profile)
    raw = deep_merge(raw, variant.overrides)
    raw = deep_merge(
        raw,
        {
            "tracking": {
                "experiment": params.sweep.mlflow_experiment,
                "register_model": False,
                "log_model": False,
            },
            "ray": {"storage_path": str(Path(trial_dir).resolve() / "ray")},
        },
    )
    return parse_params(raw, source=f"sweep variant {variant.name!r}")


# ---------------------------------------------------------------------------------------------
# one trial (runs inside a Ray Tune actor)


def ablation_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: train (run_stage) + evaluate one variant, report ``score``.

    ``config``: ``params`` (the variant's params as a dict), ``variant``, ``trial_dir``,
    ``eval_root``, ``data`` (``{"shards_dir": ...}`` or ``{"synthetic": {...}}``),
    ``tracking_uri``, ``sweep_run_id`` (or None), ``kind`` (``mse``/``gan``), ``metric``.
    """
    params = parse_params(config["params"], source=f"trial {config['variant']}")
    variant, kind = config["variant"], config["kind"]
    trial_dir = Path(config["trial_dir"])
    trial_dir.mkdir(parents=True, exist_ok=True)
    uri = config.get("tracking_uri")
    run_id = _start_trial_run(params, config)
    if run_id is not None:
        os.environ[PARENT_ENV] = run_id  # the stages' runs become children of this trial run
    status = "FAILED"
    try:
        data = config["data"]
        stage_kwargs: dict[str, Any] = (
            {"shards_dir": data["shards_dir"]}
            if data.get("shards_dir")
            else {"test_hooks": TestHooks(synthetic=SyntheticData(**data["synthetic"]))}
        )
        t0 = time.perf_counter()
        result = run_stage(params, "cunet", out_dir=trial_dir / "train_cunet", **stage_kwargs)
        if kind == "gan":
            result = run_stage(
                params,
                "cugan",
                out_dir=trial_dir / "train_cugan",
                init_dir=result.model_dir,
                **stage_kwargs,
            )
        train_seconds = time.perf_counter() - t0
        spec = ModelSpec(name=variant, kind=kind, path=result.model_dir, mlflow_run_id=run_id)
        report = evaluate_models([spec], config["eval_root"], params, progress=False)
        paths = write_report(report, trial_dir / "eval")
        if run_id is not None:
            log_to_run(uri, run_id, params=flatten_params(config["params"]))
            log_report_to_mlflow(report, paths, tracking_uri=uri, run_ids={variant: run_id})
        score = report.score(variant, config["metric"])
        set_name, _, metric = config["metric"].split("/")
        # Tune gets the ranking metric per setting; MLflow and eval/ have everything.
        means = report.means()
        per_setting = {
            f"{set_name}.{st}.{metric}": value
            for st in means.settings(variant, set_name)
            if (value := means.get(variant, set_name, st, metric)) is not None
        }
        metrics = {
            "score": score,
            "train_seconds": train_seconds,
            "random_backbones": report.random_backbones,
            **per_setting,
        }
        atomic_write_json(
            trial_dir / "result.json",
            {
                "variant": variant,
                "metric": config["metric"],
                "score": score,
                "mlflow_run_id": run_id,
                "model_dir": str(result.model_dir),
                **metrics,
            },
        )
        status = "FINISHED"
        ray.tune.report(metrics)
    finally:
        if run_id is not None:
            end_run(uri, run_id, status)


def _grid_trial(config: dict[str, Any]) -> None:
    """Tune's grid samples ``{"trial": <one trial config>}``; unwrap it."""
    ablation_trial(config["trial"])


def _start_trial_run(params: Params, config: Mapping[str, Any]) -> str | None:
    """The trial's MLflow child run under the sweep run (None: tracking off)."""
    if not params.tracking.enabled or config.get("tracking_uri") is None:
        return None
    tags = {"sweep.variant": config["variant"], "sweep.metric": config["metric"]}
    try:
        return create_run(
            config["tracking_uri"],
            params.tracking.experiment,
            run_name=f"trial-{config['variant']}",
            tags=tags,
            parent_run_id=config.get("sweep_run_id"),
            create_experiment=False,
        )
    except MissingExperiment as err:
        raise SweepError(f"{err} (the sweep run creates it)") from None


# ---------------------------------------------------------------------------------------------
# the whole sweep (the driver: a Prefect task)


@dataclass(frozen=True)
class TrialResult:
    variant: str
    score: float | None  # None: the trial failed
    metrics: dict[str, Any]
    error: str | None = None


def run_sweep(
    params: Params,
    *,
    eval_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str] | None = None,
    synthetic: Mapping[str, int] | None = None,
    tracking_uri: str | None = None,
    sweep_run_id: str | None = None,
    name: str | None = None,
) -> list[TrialResult]:
    """Run one Tune trial per variant (``sweep.max_concurrent_trials`` at a time) in the Ray
    instance this process is connected to; returns the results in variant order."""
    sp = params.sweep
    if (shards_dir is None) == (synthetic is None):
        raise SweepError("give either a shards directory or synthetic data, not both or neither")
    if not ray.is_initialized():
        raise SweepError("Ray is not initialised (call ray.init first)")
    variants = sweep_variants(params)
    out = Path(out_dir).resolve()
    name = name or time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime())
    data = (
        {"shards_dir": str(Path(shards_dir).resolve())}
        if shards_dir is not None
        else {"synthetic": dict(synthetic or {})}
    )
    trials = []
    for v in variants:
        trial_dir = out / name / v.name
        try:
            vp = variant_params(params, v, trial_dir=trial_dir)
        except ConfigError as err:
            raise SweepError(str(err)) from None
        trials.append(
            {
                "params": vp.model_dump(mode="json"),
                "variant": v.name,
                "trial_dir": str(trial_dir),
                "eval_root": str(Path(eval_root).resolve()),
                "data": data,
                "tracking_uri": tracking_uri,
                "sweep_run_id": sweep_run_id,
                "kind": sp.evaluate_kind,
                "metric": sp.metric,
            }
        )
    trainable = ray.tune.with_resources(
        _grid_trial, {"cpu": sp.cpus_per_trial, "gpu": sp.gpus_per_trial}
    )
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"trial": ray.tune.grid_search(trials)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=sp.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name=name, storage_path=str(out / "tune")),
    )
    grid = tuner.fit()
    by_variant: dict[str, TrialResult] = {}
    for result in grid:
        trial = (result.config or {}).get("trial", {})
        variant = trial.get("variant", "?")
        if result.error is not None:
            by_variant[variant] = TrialResult(
                variant, None, {}, one_line(result.error, pick="last")
            )
        else:
            metrics = dict(result.metrics or {})
            by_variant[variant] = TrialResult(variant, float(metrics["score"]), metrics)
    return [by_variant.get(v.name, TrialResult(v.name, None, {}, "no result")) for v in variants]


def rank_results(results: Sequence[TrialResult], mode: str) -> list[TrialResult]:
    """Finished trials best first (``mode`` min or max), then the failed ones."""
    done = sorted(
        (r for r in results if r.score is not None), key=lambda r: r.score, reverse=mode == "max"
    )
    return done + [r for r in results if r.score is None]


def write_summary(
    results: Sequence[TrialResult], params: Params, out_dir: str | os.PathLike[str], *, title: str
) -> dict[str, Path]:
    """``summary.csv`` / ``summary.json`` (ranked) and ``summary.png`` (bar chart), each
    written atomically."""
    sp = params.sweep
    ranked = rank_results(results, sp.mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random = any(r.metrics.get("random_backbones") for r in ranked)
    rows = [
        {
            "rank": i + 1 if r.score is not None else None,
            "variant": r.variant,
            sp.metric: r.score,
            "train_seconds": r.metrics.get("train_seconds"),
            "random_backbones": r.metrics.get("random_backbones"),
            "error": r.error,
        }
        for i, r in enumerate(ranked)
    ]
    lines = ["rank,variant,score,train_seconds,random_backbones,error"]
    for row in rows:
        lines.append(
            ",".join(
                "" if v is None else str(v).replace(",", ";")
                for v in (
                    row["rank"],
                    row["variant"],
                    row[sp.metric],
                    row["train_seconds"],
                    row["random_backbones"],
                    row["error"],
                )
            )
        )
    paths = {"csv": out / "summary.csv", "json": out / "summary.json", "png": out / "summary.png"}
    atomic_write_text(paths["csv"], "\n".join(lines) + "\n")
    atomic_write_json(
        paths["json"],
        {"metric": sp.metric, "mode": sp.mode, "random_backbones": random, "rows": rows},
    )
    done = [r for r in ranked if r.score is not None]
    fig, ax = new_figure(figsize=(6, 0.5 * max(len(done), 1) + 1.5))
    ax.barh([r.variant for r in done][::-1], [r.score for r in done][::-1])
    ax.set_xlabel(f"{sp.metric} ({'lower' if sp.mode == 'min' else 'higher'} is better)")
    ax.set_title(title + (" [RANDOM backbone weights]" if random else ""), fontsize=9)
    save_figure(fig, paths["png"])
    return paths


def summary_table(results: Sequence[TrialResult], params: Params, *, title: str) -> Table:
    """A rich table of the ranked variants."""
    sp = params.sweep
    random = any(r.metrics.get("random_backbones") for r in results)
    t = Table(title=title + (" [RANDOM backbone weights: not meaningful]" if random else ""))
    for col in ("rank", "variant", f"{sp.metric} ({sp.mode})", "train s", "error"):
        t.add_column(col, no_wrap=col == "variant")
    for i, r in enumerate(rank_results(results, sp.mode)):
        t.add_row(
            str(i + 1) if r.score is not None else "-",
            r.variant,
            "-" if r.score is None else f"{r.score:.4f}",
            f"{r.metrics.get('train_seconds', 0):.0f}" if r.metrics else "-",
            r.error or "",
        )
    return t
