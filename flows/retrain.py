"""Prefect flow ``cugan-retrain``: rerun the pipeline, then promote each retrained model in the
MLflow registry only if it beats the current ``champion`` (:mod:`pipeline.promotion`).

Steps: ``dvc repro`` (``retrain.repro_command``; DVC reruns only the stages whose inputs
changed: new data, new params or code) -> for each rule of ``retrain.rules``: the version the
training stage registered (``<rule.model_dir>/tracking.json``) and the alias holder are
evaluated on the same evaluation sets, promoted or refused, and the decision with both scores
is recorded as ``promotion.*`` tags on the candidate version and in the flow's log.

The flow run FAILS (one line, nothing promoted for that rule) when the stage registered no
version (e.g. it logged to local files: ``cugan tracking sync`` first) or when the registry
answers anything but "no such alias" with an error (unreachable, 5xx, a bad answer); Prefect
retries such a promotion ``retrain.registry_retries`` times first.

Scheduling (needs a real Prefect server, see docs/flows.md)::

    python -m flows.retrain serve          # long-running: schedule from params.yaml retrain.cron
    prefect deploy --all                   # or the deployments in prefect.yaml + a worker
    python -m flows.retrain run            # once, now
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import Params, PromotionRule, load_params
from pipeline.promotion import evaluate_and_promote, registered_candidate
from pipeline.tracking import (
    ModelRegistry,
    NotRegistered,
    RegistryError,
    limit_http_retries,
    resolve_tracking_uri,
)

__all__ = ["deployment", "retrain_flow", "serve"]

DEPLOYMENT_NAME = "cugan-retrain-scheduled"


class ReproError(RuntimeError):
    """The pipeline rerun failed (one line: the command and its exit code)."""


@task(cache_policy=NO_CACHE)
def load_params_task(params_path: str) -> Params:
    return load_params(params_path)


@task(cache_policy=NO_CACHE, retry_delay_seconds=60)
def repro_task(command: list[str], cwd: str) -> None:
    """Run the pipeline (``dvc repro``); its output goes to the flow log, line by line."""
    logger = get_run_logger()
    logger.info("running %s in %s", " ".join(command), cwd)
    env = dict(os.environ)
    # dvc.yaml stages call `python -m ...`: the interpreter running this flow must be first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout or ():
            logger.info("%s", line.rstrip())
    if proc.returncode != 0:
        raise ReproError(f"{' '.join(command)} exited with code {proc.returncode}")


def _registry_failed(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a promotion only where the registry failed (it may answer again), never where the
    decision cannot be made (nothing registered, a rule that does not fit the model)."""
    try:
        state.result()
    except RegistryError as err:
        return not isinstance(err, NotRegistered)
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(cache_policy=NO_CACHE, retry_delay_seconds=10, retry_condition_fn=_registry_failed)
def promote_task(
    rule: PromotionRule,
    alias: str,
    eval_root: str,
    params: Params,
    tracking_uri: str | None,
    workdir: str,
    repo_dir: str,
) -> dict[str, Any]:
    """The version the stage registered against the champion: evaluate both, decide, tag, move
    the aliases (pipeline.promotion). Raises (the flow run fails) where it cannot decide."""
    logger = get_run_logger()
    # The training stages' store, unless the flow is pointed at another one.
    uri = tracking_uri or resolve_tracking_uri(params.tracking)
    limit_http_retries(params.tracking, uri)  # a dead registry fails in seconds, not minutes
    registry = ModelRegistry(uri)
    candidate = registered_candidate(registry, rule, Path(repo_dir) / rule.model_dir)
    decision = evaluate_and_promote(
        registry,
        rule,
        candidate_version=candidate,
        alias=alias,
        eval_root=eval_root,
        params=params,
        workdir=workdir,
    )
    logger.info("%s: %s", rule.model_name, decision.summary())
    return dataclasses.asdict(decision)


@flow(name="cugan-retrain")
def retrain_flow(
    params_path: str = "params.yaml",
    eval_root: str = "data/evalsets",
    tracking_uri: str | None = None,
    repro: bool = True,
    workdir: str = "runs/retrain",
    repo_dir: str = ".",
) -> dict[str, dict[str, Any]]:
    """Rerun the pipeline (unless ``repro`` is False), then apply each promotion rule.

    Returns ``{model_name: decision}``; a rule that cannot decide fails the flow run.
    """
    params = load_params_task(params_path)
    rp = params.retrain
    if repro and rp.repro_command:
        repro_task.with_options(retries=rp.repro_retries)(list(rp.repro_command), repo_dir)
    promote = promote_task.with_options(retries=rp.registry_retries)
    return {
        rule.model_name: promote(
            rule,
            rp.alias,
            eval_root,
            params,
            tracking_uri,
            str(Path(workdir) / rule.model_name),
            repo_dir,
        )
        for rule in rp.rules
    }


def deployment(params_path: str = "params.yaml") -> Any:
    """The scheduled deployment: ``retrain.cron`` in ``retrain.timezone`` from params.yaml."""
    from prefect.schedules import Cron

    rp = load_params(params_path).retrain
    return retrain_flow.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(rp.cron, timezone=rp.timezone)],
        parameters={"params_path": params_path},
        tags=["cugan", "retrain"],
        description="Rerun the DVC pipeline, evaluate, promote the champion if it is beaten.",
    )


def serve(params_path: str = "params.yaml") -> None:
    """Serve the scheduled deployment from this process (blocks; Ctrl-C stops). Needs a real
    Prefect server (``prefect server start``): an ephemeral one cannot schedule."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(params_path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Scheduled retraining of CUGAN.")
    ap.add_argument(
        "command",
        choices=["serve", "run"],
        help="serve: run on the cron schedule (needs a Prefect server); run: once now",
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--evalsets", default="data/evalsets")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-repro", action="store_true", help="only evaluate and promote")
    args = ap.parse_args(argv)
    if args.command == "serve":
        serve(args.params)
    else:
        retrain_flow(
            params_path=args.params,
            eval_root=args.evalsets,
            tracking_uri=args.tracking_uri,
            repro=not args.no_repro,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
