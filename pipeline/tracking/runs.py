"""MLflow runs: the training stages' parent/child runs, the record a stage leaves beside its
checkpoint, and plain runs that evaluation and the sweep create, log into and end.

Training runs: one *parent* run per pipeline run and one *child* run per stage (MLflow's
``mlflow.parentRunId`` tag). How a stage finds its parent, first match wins:

1. ``$CUGAN_MLFLOW_PARENT_RUN_ID`` (a flow that creates the parent passes it down);
2. ``tracking.json`` in the directory of the checkpoint the stage starts from (CUGAN starts
   from CUnet's ``runs/train_cunet/model``), when it names a run in the same tracking store;
3. otherwise a new parent run is created (named ``pipeline-<UTC time>``).

Every stage writes ``<stage out>/model/tracking.json`` = ``{"tracking_uri", "experiment_id",
"parent_run_id", "run_id", "local_id", "stage", "mode", "fallback", "registered_model"}``
beside its final checkpoint, which is how the next stage (and evaluation,
:func:`recorded_run_id`) joins the same parent, and how the retrain flow knows the exact
version the stage registered (``{"name", "version"}``, or null).

Before a stage opens its runs on a tracking server, :func:`start_stage_run` bounds MLflow's
HTTP retries for the stage's processes and probes the server with a short timeout
(``tracking.probe_timeout_s``, :mod:`~pipeline.tracking.store`). Where the store does not
answer, it returns a ``local`` target (one warning) and the stage logs through
:class:`pipeline.tracking.fallback.RunLog` to the files of :mod:`pipeline.tracking.journal`;
``cugan tracking sync`` (:mod:`pipeline.tracking.sync`) replays them later. The stage's
``tracking.json`` is part of its DVC output and is never rewritten afterwards:
:func:`read_tracking_file` reads it through the sync's ``synced.json``, so the next stage and
evaluation find the run the fallback became.
The plain-run functions (:func:`create_run`, :func:`log_to_run`, :func:`end_run`) have no
fallback: their callers (evaluation, the sweep) run as Prefect tasks that retry and then fail.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from mlflow import MlflowClient

from pipeline.atomic import atomic_write_json
from pipeline.config import TrackingParams
from pipeline.errors import one_line
from pipeline.tracking.journal import FALLBACK_DIR, JOURNAL_FILE, add_local_run, read_sync_state
from pipeline.tracking.store import (
    TRACKING_ERRORS,
    MetricRows,
    ensure_experiment,
    experiment_id,
    limit_http_retries,
    probe_server,
    resolve_tracking_uri,
    send_batch,
    tracking_client,
)

__all__ = [
    "PARENT_ENV",
    "TRACKING_FILE",
    "MissingExperiment",
    "RunStatus",
    "TrackingTarget",
    "create_run",
    "dvc_lock_tags",
    "end_run",
    "flatten_params",
    "git_tags",
    "log_to_run",
    "open_stage_run",
    "read_tracking_file",
    "recorded_run_id",
    "start_stage_run",
    "write_tracking_file",
]

log = logging.getLogger(__name__)

PARENT_ENV = "CUGAN_MLFLOW_PARENT_RUN_ID"
TRACKING_FILE = "tracking.json"

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings; Ray #33246)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def git_tags(repo: str | os.PathLike[str] = ".") -> dict[str, str]:
    """The commit of the code (and whether the work tree had changes), when in a git repo."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
    }


def dvc_lock_tags(
    paths: Iterable[str | os.PathLike[str]], lockfile: str | os.PathLike[str] = "dvc.lock"
) -> dict[str, str]:
    """``{"dvc.<path>": <md5>}`` for each path that an out of some stage in ``dvc.lock`` names:
    the version of the data this run read. Missing lock file or path: no tag."""
    lock = Path(lockfile)
    if not lock.is_file():
        return {}
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        log.warning("%s is not valid YAML; no data hashes tagged", lock)
        return {}
    root = lock.resolve().parent
    wanted = {}
    for p in paths:
        try:
            wanted[Path(p).resolve().relative_to(root).as_posix()] = str(p)
        except ValueError:
            continue
    tags: dict[str, str] = {}
    for stage in (doc.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path = str(out.get("path", "")).rstrip("/")
            if path in wanted and out.get("md5"):
                tags[f"dvc.{path}"] = str(out["md5"])
    return tags


# ---------------------------------------------------------------------------------------------
# the training stages' runs


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run logs; plain data so it can travel to the Ray workers in their config.
    ``local_id`` names a run that logs to local files from its start (no MLflow run yet)."""

    mode: Literal["mlflow", "local", "off"]
    uri: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    fallback_dir: str | None = None
    local_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrackingTarget:
        return cls(**dict(data))


def read_tracking_file(directory: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The ``tracking.json`` a training stage left in ``directory``, or None; where ``cugan
    tracking sync`` has replayed the stage's fallback since, the run (and registered version)
    it became, with ``mode`` ``mlflow`` and ``synced_from`` naming the fallback."""
    if directory is None:
        return None
    path = Path(directory) / TRACKING_FILE
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    key, fallback = data.get("local_id") or data.get("run_id"), data.get("fallback")
    state = read_sync_state(Path(directory) / fallback) if key and fallback else None
    synced = (state or {}).get("runs", {}).get(key)
    if not synced:
        return data
    return {
        **data,
        "tracking_uri": state["tracking_uri"],
        "experiment_id": synced["experiment_id"],
        "parent_run_id": synced.get("parent_run_id"),
        "run_id": synced["run_id"],
        "mode": "mlflow",
        "registered_model": synced.get("registered_model") or data.get("registered_model"),
        "synced_from": str((Path(directory) / fallback).resolve()),
    }


def write_tracking_file(
    directory: str | os.PathLike[str],
    target: TrackingTarget,
    stage: str,
    registered: Mapping[str, str] | None = None,
) -> Path:
    """``tracking.json`` (module docstring); ``registered``: ``{"name", "version"}`` of the
    model version the stage registered, None if it registered none."""
    fallback = None
    if target.fallback_dir is not None:
        fallback = os.path.relpath(target.fallback_dir, Path(directory).resolve())
    return atomic_write_json(
        Path(directory) / TRACKING_FILE,
        {
            "tracking_uri": target.uri,
            "experiment_id": target.experiment_id,
            "parent_run_id": target.parent_run_id,
            "run_id": target.run_id,
            "local_id": target.local_id,
            "stage": stage,
            "mode": target.mode,
            "fallback": fallback,
            "registered_model": dict(registered) if registered else None,
        },
    )


def recorded_run_id(
    checkpoint: str | os.PathLike[str],
    tracking_uri: str | None,
    metadata: Mapping[str, Any] | None = None,
) -> str | None:
    """The MLflow run a training stage recorded for this checkpoint, if it is in this store:
    ``tracking.json`` beside the checkpoint (directory or ``.safetensors`` file), else
    ``mlflow_run_id`` in the checkpoint's metadata. A run recorded in another store, or a
    stage that logged to local files (and was not synced since), names nothing here."""
    path = Path(checkpoint)
    recorded = read_tracking_file(path if path.is_dir() else path.parent)
    if recorded and recorded.get("run_id") and recorded.get("mode") != "local":
        if tracking_uri is None or recorded.get("tracking_uri") in (None, tracking_uri):
            return str(recorded["run_id"])
        return None  # recorded in another store: the id means nothing here
    run_id = (metadata or {}).get("mlflow_run_id")
    return str(run_id) if run_id else None


def _usable_parent(client: MlflowClient, run_id: str | None, experiment: str) -> str | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except TRACKING_ERRORS:
        return None
    return run_id if run.info.experiment_id == experiment else None


def open_stage_run(
    client: MlflowClient,
    uri: str,
    exp_id: str,
    *,
    stage: str,
    init_dir: str | os.PathLike[str] | None,
    tags: Mapping[str, str],
    parent_hint: str | None = None,
    own_tags: Mapping[str, str] | None = None,
    start_time: int | None = None,
) -> tuple[str, str]:
    """Create a stage's child run under the parent the module docstring describes (found from
    ``parent_hint``, else ``init_dir``'s tracking.json, else created); returns ``(run id,
    parent id)``. ``tags`` go on both runs, ``own_tags`` on the child only; ``start_time``
    (ms) dates them (a sync replays a run that started earlier)."""
    previous = read_tracking_file(init_dir) or {}
    parent = _usable_parent(client, parent_hint, exp_id)
    if parent is None and previous.get("tracking_uri") == uri:
        parent = _usable_parent(client, previous.get("parent_run_id"), exp_id)
    if parent is None:
        when = time.gmtime(start_time / 1000 if start_time is not None else None)
        name = time.strftime("pipeline-%Y%m%d-%H%M%S", when)
        created = client.create_run(exp_id, start_time=start_time, run_name=name, tags=dict(tags))
        parent = created.info.run_id
        log.info("MLflow: new parent run %s (%s)", name, parent)
    run = client.create_run(
        exp_id,
        start_time=start_time,
        run_name=stage,
        tags={**tags, **(own_tags or {}), "mlflow.parentRunId": parent, "stage": stage},
    )
    return str(run.info.run_id), str(parent)


def start_stage_run(
    params: TrackingParams,
    *,
    stage: str,
    out_dir: str | os.PathLike[str],
    init_dir: str | os.PathLike[str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> TrackingTarget:
    """Create (or find) the parent run and create this stage's child run (module docstring).

    Returns where the stage logs: ``mode="mlflow"`` normally, ``"local"`` when the store does
    not answer the probe or a call (one warning; the fallback's ``runs.json`` keeps what a
    sync needs to create the run later), ``"off"`` when ``tracking.enabled`` is false.
    """
    fallback = str((Path(out_dir) / FALLBACK_DIR).resolve())
    if not params.enabled:
        return TrackingTarget(mode="off", fallback_dir=fallback)
    uri = resolve_tracking_uri(params)
    limit_http_retries(params, uri)
    base_tags = dict(tags or {})
    reason = probe_server(uri, params.probe_timeout_s)
    if reason is None:
        try:
            client = tracking_client(uri)
            exp_id = ensure_experiment(
                uri, params.experiment, artifact_location=params.artifact_location
            )
            run_id, parent = open_stage_run(
                client,
                uri,
                exp_id,
                stage=stage,
                init_dir=init_dir,
                tags=base_tags,
                parent_hint=os.environ.get(PARENT_ENV),
            )
        except TRACKING_ERRORS as err:
            reason = one_line(err)
        else:
            log.info("MLflow: stage %s logs to run %s in %s", stage, run_id, uri)
            return TrackingTarget(
                mode="mlflow",
                uri=uri,
                experiment_id=exp_id,
                run_id=run_id,
                parent_run_id=parent,
                fallback_dir=fallback,
            )
    local = TrackingTarget(mode="local", uri=uri, fallback_dir=fallback, local_id=uuid.uuid4().hex)
    log.warning(
        "MLflow tracking at %s is unavailable (%s); this stage logs to %s instead "
        "(`cugan tracking sync %s` replays it once the server is back)",
        uri,
        reason,
        Path(fallback) / JOURNAL_FILE,
        Path(out_dir),
    )
    start = {
        "uri": uri,
        "experiment": params.experiment,
        "artifact_location": str(Path(params.artifact_location).resolve()),
        "stage": stage,
        "tags": base_tags,
        "init_dir": str(Path(init_dir).resolve()) if init_dir is not None else None,
        "parent_run_id": os.environ.get(PARENT_ENV),
    }
    add_local_run(fallback, str(local.local_id), start)
    return local


# ---------------------------------------------------------------------------------------------
# plain runs (evaluation, the sweep): no fallback, errors reach the caller


class MissingExperiment(LookupError):
    """:func:`create_run` was told not to create the experiment, and it does not exist."""


def create_run(
    uri: str,
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
    artifact_location: str | os.PathLike[str] | None = None,
    create_experiment: bool = True,
) -> str:
    """A new run in ``experiment`` (created unless ``create_experiment`` is False, in which case
    a missing experiment raises :class:`MissingExperiment`); returns its id."""
    if create_experiment:
        exp_id = ensure_experiment(uri, experiment, artifact_location=artifact_location)
    else:
        found = experiment_id(uri, experiment)
        if found is None:
            raise MissingExperiment(f"MLflow experiment {experiment!r} does not exist in {uri}")
        exp_id = found
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = tracking_client(uri)
    run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    if params:
        send_batch(client, run_id, params=params)
    return str(run_id)


def log_to_run(
    uri: str,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: MetricRows | None = None,
    tags: Mapping[str, Any] | None = None,
    artifacts: Iterable[tuple[str | os.PathLike[str], str | None]] = (),
) -> None:
    """Params, metrics (``{key: value}`` at step 0, or ``(step, {key: value})`` rows), tags, and
    files ``(path, artifact directory)`` into an existing run (a finished one accepts them)."""
    client = tracking_client(uri)
    send_batch(client, run_id, params=params, metrics=metrics, tags=tags)
    for path, artifact_path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def end_run(uri: str, run_id: str, status: RunStatus = "FINISHED") -> None:
    tracking_client(uri).set_terminated(run_id, status)
