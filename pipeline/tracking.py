"""MLflow tracking of the training stages, with a local fallback that never stops training.

Runs: one *parent* run per pipeline run and one *child* run per stage (MLflow's
``mlflow.parentRunId`` tag). How a stage finds its parent, first match wins:

1. ``$CUGAN_MLFLOW_PARENT_RUN_ID`` (a flow that creates the parent passes it down);
2. ``tracking.json`` in the directory of the checkpoint the stage starts from (CUGAN starts
   from CUnet's ``runs/train_cunet/model``), when it names a run in the same tracking store;
3. otherwise a new parent run is created (named ``pipeline-<UTC time>``).

Every stage writes ``<stage out>/model/tracking.json`` = ``{"tracking_uri", "experiment_id",
"parent_run_id", "run_id", "stage"}`` beside its final checkpoint, which is how the next stage
(and evaluation) joins the same parent.

Store: ``$MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` from params.yaml (default
``sqlite:///mlflow.db`` in the working directory, made absolute before Ray workers get it;
artifacts of new experiments under ``tracking.artifact_location``, default ``./mlartifacts``).
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it. A local sqlite store is reachable
only from this machine: on a multi-node cluster point MLFLOW_TRACKING_URI at a server.

Fallback: the first MLflow call that fails (server down, timeout, database locked...) logs ONE
warning and switches that process to local logging: every later record of the run (params,
tags, metrics, images, JSON) is appended to ``<fallback dir>/tracking.jsonl`` and artifacts
are written under ``<fallback dir>/artifacts/``; the fallback dir is
``<stage out>/mlflow-fallback``.
Training never waits on or dies of tracking. The HTTP client's own retries apply before a call
counts as failed (MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT shorten them).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import requests
import yaml

from pipeline.config import TrackingParams

__all__ = [
    "PARENT_ENV",
    "TRACKING_ERRORS",
    "TRACKING_FILE",
    "RunLog",
    "TrackingTarget",
    "dvc_lock_tags",
    "flatten_params",
    "git_tags",
    "read_tracking_file",
    "resolve_tracking_uri",
    "start_stage_run",
    "write_tracking_file",
]

log = logging.getLogger(__name__)

PARENT_ENV = "CUGAN_MLFLOW_PARENT_RUN_ID"
TRACKING_FILE = "tracking.json"
FALLBACK_DIR = "mlflow-fallback"


def _tracking_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


#: What a failed tracking call may raise (server unreachable, HTTP errors, store errors).
TRACKING_ERRORS = _tracking_errors()


def resolve_tracking_uri(params: TrackingParams, cwd: str | os.PathLike[str] | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else ``params.uri``, with a relative sqlite/file path made absolute
    (Ray workers do not run in this directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.uri
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:  # a plain directory: MLflow's file store
        return (base / uri).resolve().as_uri()
    return uri


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


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run logs; plain data so it can travel to the Ray workers in their config."""

    mode: Literal["mlflow", "local", "off"]
    uri: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    fallback_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrackingTarget:
        return cls(**dict(data))


def read_tracking_file(directory: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if directory is None:
        return None
    path = Path(directory) / TRACKING_FILE
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_tracking_file(
    directory: str | os.PathLike[str], target: TrackingTarget, stage: str
) -> Path:
    from pipeline.atomic import atomic_write_json

    return atomic_write_json(
        Path(directory) / TRACKING_FILE,
        {
            "tracking_uri": target.uri,
            "experiment_id": target.experiment_id,
            "parent_run_id": target.parent_run_id,
            "run_id": target.run_id,
            "stage": stage,
            "mode": target.mode,
        },
    )


class RunLog:
    """Logging into one MLflow run, switching for good to local files on the first failure."""

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.mode = target.mode
        self._client = None
        if self.mode == "mlflow":
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=target.uri)
        if self.mode == "local" and target.fallback_dir is None:
            raise ValueError("local tracking needs a fallback_dir")

    @property
    def fell_back(self) -> bool:
        return self.target.mode == "mlflow" and self.mode == "local"

    # -- local ---------------------------------------------------------------------------------

    def _local_dir(self) -> Path:
        path = Path(self.target.fallback_dir or FALLBACK_DIR)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _append(self, kind: str, payload: Any) -> None:
        record = {"time": time.time(), "run_id": self.target.run_id, "kind": kind, "data": payload}
        with (self._local_dir() / "tracking.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _fall_back(self, what: str, err: BaseException) -> None:
        self.mode = "local"
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        log.warning(
            "MLflow tracking at %s failed (%s: %s); continuing without it: this run's records "
            "go to %s",
            self.target.uri,
            what,
            reason,
            self._local_dir() / "tracking.jsonl",
        )

    def _call(self, what: str, mlflow_fn: Any, kind: str, payload: Any) -> None:
        if self.mode == "off":
            return
        if self.mode == "mlflow":
            try:
                mlflow_fn()
                return
            except TRACKING_ERRORS as err:
                self._fall_back(what, err)
        self._append(kind, payload)

    # -- API -----------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]

        def send() -> None:
            for i in range(0, len(items), 100):
                self._client.log_batch(self.target.run_id, params=items[i : i + 100])

        self._call("log params", send, "params", dict(params))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(
            "set tags",
            lambda: self._client.log_batch(self.target.run_id, tags=items),
            "tags",
            dict(tags),
        )

    def log_metrics(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """``rows`` of ``(step, {key: value})``; sent in batches of up to 1000 values."""
        from mlflow.entities import Metric

        rows = [(int(step), {k: float(v) for k, v in m.items()}) for step, m in rows]
        if not rows:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, m in rows for k, v in m.items()]

        def send() -> None:
            for i in range(0, len(items), 1000):
                self._client.log_batch(self.target.run_id, metrics=items[i : i + 1000])

        self._call("log metrics", send, "metrics", [{"step": s, "metrics": m} for s, m in rows])

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        def send() -> None:
            self._client.log_image(self.target.run_id, image, artifact_file=artifact_file)

        if self.mode == "off":
            return
        self._call("log image", send, "artifact", artifact_file)
        if self.mode == "local":
            from pipeline.imageio import write_png

            dest = self._local_dir() / "artifacts" / artifact_file
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_png(dest, image)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.mode == "off":
            return
        self._call(
            "log dict",
            lambda: self._client.log_dict(self.target.run_id, obj, artifact_file),
            "artifact",
            artifact_file,
        )
        if self.mode == "local":
            dest = self._local_dir() / "artifacts" / artifact_file
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(obj, indent=2))

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        def send() -> None:
            self._client.set_terminated(self.target.run_id, status)
            if self.target.parent_run_id:
                self._client.set_terminated(self.target.parent_run_id, status)

        self._call("end run", send, "status", status)


def _experiment_id(client: Any, params: TrackingParams, uri: str) -> str:
    exp = client.get_experiment_by_name(params.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith(("sqlite:", "file:")):
        artifact_location = Path(params.artifact_location).resolve().as_uri()
    return client.create_experiment(params.experiment, artifact_location=artifact_location)


def _usable_parent(client: Any, run_id: str | None, experiment_id: str) -> str | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except TRACKING_ERRORS:
        return None
    return run_id if run.info.experiment_id == experiment_id else None


def start_stage_run(
    params: TrackingParams,
    *,
    stage: str,
    out_dir: str | os.PathLike[str],
    init_dir: str | os.PathLike[str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> TrackingTarget:
    """Create (or find) the parent run and create this stage's child run (module docstring).

    Returns where the stage logs: ``mode="mlflow"`` normally, ``"local"`` when the store is
    unreachable (one warning), ``"off"`` when ``tracking.enabled`` is false.
    """
    fallback = str((Path(out_dir) / FALLBACK_DIR).resolve())
    if not params.enabled:
        return TrackingTarget(mode="off", fallback_dir=fallback)
    uri = resolve_tracking_uri(params)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, params, uri)
        previous = read_tracking_file(init_dir) or {}
        parent = _usable_parent(client, os.environ.get(PARENT_ENV), experiment_id)
        if parent is None and previous.get("tracking_uri") == uri:
            parent = _usable_parent(client, previous.get("parent_run_id"), experiment_id)
        base_tags = dict(tags or {})
        if parent is None:
            name = time.strftime("pipeline-%Y%m%d-%H%M%S", time.gmtime())
            parent = client.create_run(experiment_id, run_name=name, tags=base_tags).info.run_id
            log.info("MLflow: new parent run %s (%s)", name, parent)
        run = client.create_run(
            experiment_id,
            run_name=stage,
            tags={**base_tags, "mlflow.parentRunId": parent, "stage": stage},
        )
    except TRACKING_ERRORS as err:
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        log.warning(
            "MLflow tracking at %s is unavailable (%s); this stage logs to %s instead",
            uri,
            reason,
            Path(fallback) / "tracking.jsonl",
        )
        return TrackingTarget(mode="local", uri=uri, fallback_dir=fallback)
    log.info("MLflow: stage %s logs to run %s in %s", stage, run.info.run_id, uri)
    return TrackingTarget(
        mode="mlflow",
        uri=uri,
        experiment_id=experiment_id,
        run_id=run.info.run_id,
        parent_run_id=parent,
        fallback_dir=fallback,
    )
