"""Replay a local tracking fallback into MLflow once the server is back (``cugan tracking
sync RUN_DIR``).

What a stage logged to files while its tracking server was down
(:mod:`pipeline.tracking.journal`) goes, record by record and in order, to the run it was
meant for: the run that fell back part-way (its id is in the records), or a run created now in
the experiment the stage would have used, under the parent it would have joined
(:func:`~pipeline.tracking.runs.open_stage_run`), dated when the stage started. Params and tags
as logged; metrics with their steps and the time they were logged; artifacts at their paths;
the saved model logged into the run and registered under the name the stage would have used
(by the ``log_model`` the caller hands in: logging a pyfunc model is the model's business,
:mod:`pipeline.train.pyfunc`, a layer above this one); the run's final status and end time.

Idempotent: after every record, ``synced.json`` records (atomically) the byte offset replayed
so far and the run each key became; the next sync starts there, so a second one adds nothing.
Should a sync die between a record and its mark, replaying that record again is harmless too:
MLflow keeps one copy of an identical metric (key, step, time, value), params and tags are set
to the values they have, a created run is found again by its ``cugan.fallback.local_id`` tag
and a registered version by its run.

The stage's ``tracking.json`` stays as the stage wrote it: it is part of the stage's DVC output,
and rewriting it would make ``dvc repro`` rerun the stage (or put the old file back from DVC's
run cache). :func:`pipeline.tracking.read_tracking_file` reads it through ``synced.json``, so
the next stage, evaluation and the retrain flow find the real run and registered version.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config import TrackingParams
from pipeline.errors import one_line
from pipeline.tracking.journal import (
    ARTIFACTS_DIR,
    FALLBACK_DIR,
    JOURNAL_FILE,
    RUNS_FILE,
    Record,
    read_local_runs,
    read_records,
    read_sync_state,
    write_sync_state,
)
from pipeline.tracking.registry import ModelRegistry, RegistryError
from pipeline.tracking.runs import open_stage_run, read_tracking_file
from pipeline.tracking.store import (
    TRACKING_ERRORS,
    ensure_experiment,
    limit_http_retries,
    probe_server,
    send_batch,
    tracking_client,
)

__all__ = ["LOCAL_ID_TAG", "ModelLogger", "SyncError", "SyncReport", "find_fallback", "sync_run"]

log = logging.getLogger(__name__)

#: The tag on a run that a sync created for a stage that had none (how a rerun finds it).
LOCAL_ID_TAG = "cugan.fallback.local_id"

#: Logs a saved pyfunc model into a run and registers it: ``(tracking uri, run id, saved
#: model directory, name to register or None) -> (model uri, registered version or None)``.
ModelLogger = Callable[[str, str, Path, str | None], tuple[str, str | None]]


class SyncError(ValueError):
    """The fallback cannot be replayed as asked (one line naming the fallback)."""


@dataclass
class SyncReport:
    """What one sync replayed (nothing at all: ``records == 0``)."""

    fallback_dir: Path
    tracking_uri: str
    records: int = 0
    created: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    params: int = 0
    tags: int = 0
    metrics: int = 0
    artifacts: int = 0
    models: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.records:
            return (
                f"{self.fallback_dir}: nothing to sync (every record is in "
                f"{self.tracking_uri} already)"
            )
        runs = [f"run {r} (created)" for r in self.created] + [f"run {r}" for r in self.joined]
        parts = [
            *runs,
            f"{self.params} params",
            f"{self.tags} tags",
            f"{self.metrics} metric values",
            f"{self.artifacts} artifacts",
            *(f"model {m}" for m in self.models),
            *(f"MISSING artifact {m}" for m in self.missing),
        ]
        return (
            f"{self.fallback_dir} -> {self.tracking_uri}: {self.records} record(s) replayed: "
            + ", ".join(parts)
        )


def find_fallback(run_dir: str | os.PathLike[str]) -> Path:
    """The fallback directory of a stage output (``RUN_DIR/mlflow-fallback``) or the fallback
    directory itself; SyncError where neither holds a journal."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / FALLBACK_DIR, run_dir):
        if (candidate / JOURNAL_FILE).is_file():
            return candidate
    raise SyncError(
        f"{run_dir}: no {FALLBACK_DIR}/{JOURNAL_FILE} here: nothing was logged to local files"
    )


def _recorded_uri(fallback: Path, local_runs: dict[str, dict[str, Any]]) -> str:
    """The store the stage meant to log to: its local runs', else its tracking.json's."""
    for start in local_runs.values():
        if start.get("uri"):
            return str(start["uri"])
    recorded = read_tracking_file(fallback.parent / "model") or {}
    if recorded.get("tracking_uri"):
        return str(recorded["tracking_uri"])
    raise SyncError(f"{fallback}: no tracking store recorded: give --tracking-uri")


def sync_run(
    run_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    *,
    params: TrackingParams | None = None,
    log_model: ModelLogger | None = None,
) -> SyncReport:
    """Replay the fallback of ``run_dir`` (a stage output or its fallback directory) into
    ``tracking_uri`` (default: the store the stage meant to use); see the module docstring.

    ``params`` gives the probe timeout and the HTTP limits (a server that went down again fails
    the sync in seconds; what was replayed stays marked). SyncError (one line) on failure.
    """
    params = params or TrackingParams()
    fallback = find_fallback(run_dir)
    state = read_sync_state(fallback) or {}
    local_runs = read_local_runs(fallback)
    uri = tracking_uri or state.get("tracking_uri") or _recorded_uri(fallback, local_runs)
    if state.get("offset") and state.get("tracking_uri") != uri:
        raise SyncError(
            f"{fallback}: synced into {state.get('tracking_uri')} already (up to byte "
            f"{state['offset']}); sync there, or move {fallback.name}/synced.json away to "
            "replay everything into another store"
        )
    limit_http_retries(params, uri)
    reason = probe_server(uri, params.probe_timeout_s)
    if reason is not None:
        raise SyncError(f"MLflow at {uri}: {reason}; nothing synced")
    state = {
        "tracking_uri": uri,
        "offset": int(state.get("offset", 0)),
        "runs": dict(state.get("runs", {})),
    }
    report = SyncReport(fallback, uri)
    replay = _Replay(uri, fallback, state, local_runs, log_model, report)
    for record in read_records(fallback, state["offset"]):
        try:
            replay(record)
        except (*TRACKING_ERRORS, RegistryError) as err:
            raise SyncError(
                f"{fallback}: replaying the {record.kind} record ending at byte {record.end} "
                f"failed ({one_line(err)}); {report.records} record(s) replayed before it, "
                "a new sync resumes there"
            ) from None
        state["offset"] = record.end
        write_sync_state(fallback, state)
        report.records += 1
    log.debug("%s", report.summary())  # the caller reports it
    return report


class _Replay:
    """One record at a time into the run its key maps to (``state["runs"]``)."""

    def __init__(
        self,
        uri: str,
        fallback: Path,
        state: dict[str, Any],
        local_runs: dict[str, dict[str, Any]],
        log_model: ModelLogger | None,
        report: SyncReport,
    ) -> None:
        self.uri, self.fallback, self.state = uri, fallback, state
        self.local_runs, self.log_model, self.report = local_runs, log_model, report
        self.client = tracking_client(uri)
        self.kinds: dict[str, Callable[[Record, dict[str, Any]], None]] = {
            "params": self._params,
            "tags": self._tags,
            "metrics": self._metrics,
            "artifact": self._artifact,
            "model": self._model,
            "status": self._status,
        }

    def __call__(self, record: Record) -> None:
        replay = self.kinds.get(record.kind)
        if replay is None:
            raise SyncError(
                f"{self.fallback}: unknown record kind {record.kind!r} at byte {record.end} "
                "(written by a newer version?)"
            )
        replay(record, self._run(record))

    # -- which run -----------------------------------------------------------------------------

    def _run(self, record: Record) -> dict[str, Any]:
        key = record.key
        if key is None:
            raise SyncError(
                f"{self.fallback}: the record ending at byte {record.end} names no run "
                "(an older fallback format): it cannot be replayed"
            )
        run = self.state["runs"].get(key)
        if run is None:
            run = self._create(key) if record.local_id else self._join(key)
            self.state["runs"][key] = run
        return run

    def _create(self, local_id: str) -> dict[str, Any]:
        start = self.local_runs.get(local_id)
        if start is None:
            raise SyncError(
                f"{self.fallback}: {RUNS_FILE} does not know the local run {local_id}: "
                "cannot create its MLflow run"
            )
        exp_id = ensure_experiment(
            self.uri, start["experiment"], artifact_location=start.get("artifact_location")
        )
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local_id}'", max_results=1
        )
        if found:  # created by an earlier sync that died before marking it
            run_id, parent = found[0].info.run_id, found[0].data.tags.get("mlflow.parentRunId")
            self.report.joined.append(run_id)
        else:
            run_id, parent = open_stage_run(
                self.client,
                self.uri,
                exp_id,
                stage=start["stage"],
                init_dir=start.get("init_dir"),
                tags=start.get("tags") or {},
                parent_hint=start.get("parent_run_id"),
                own_tags={LOCAL_ID_TAG: local_id, "cugan.fallback.synced_from": str(self.fallback)},
                start_time=round(float(start["time"]) * 1000),
            )
            self.report.created.append(run_id)
        return {"run_id": run_id, "experiment_id": exp_id, "parent_run_id": parent}

    def _join(self, run_id: str) -> dict[str, Any]:
        run = self.client.get_run(run_id)  # a run of another store: MlflowException -> SyncError
        self.report.joined.append(run_id)
        return {
            "run_id": run_id,
            "experiment_id": run.info.experiment_id,
            "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
        }

    # -- the records ---------------------------------------------------------------------------

    def _params(self, record: Record, run: dict[str, Any]) -> None:
        send_batch(self.client, run["run_id"], params=record.data)
        self.report.params += len(record.data)

    def _tags(self, record: Record, run: dict[str, Any]) -> None:
        send_batch(self.client, run["run_id"], tags=record.data)
        self.report.tags += len(record.data)

    def _metrics(self, record: Record, run: dict[str, Any]) -> None:
        rows = [(int(row["step"]), row["metrics"]) for row in record.data]
        send_batch(self.client, run["run_id"], metrics=rows, timestamp_ms=record.time_ms)
        self.report.metrics += sum(len(m) for _, m in rows)

    def _artifact(self, record: Record, run: dict[str, Any]) -> None:
        name = PurePosixPath(str(record.data))
        path = self.fallback / ARTIFACTS_DIR / name
        if not path.is_file():
            log.warning("%s: artifact %s is gone; not replayed", self.fallback, name)
            self.report.missing.append(str(name))
            return
        folder = None if str(name.parent) == "." else str(name.parent)
        self.client.log_artifact(run["run_id"], str(path), artifact_path=folder)
        self.report.artifacts += 1

    def _model(self, record: Record, run: dict[str, Any]) -> None:
        name = record.data.get("registered_name")
        saved = self.fallback / record.data["path"]
        versions = ModelRegistry(self.uri).versions(name) if name else []
        ours = [v for v in versions if v.run_id == run["run_id"]]
        if ours:  # registered by an earlier sync that died before marking it
            model_uri, version = ours[-1].source, ours[-1].version
        else:
            if self.log_model is None:
                raise SyncError(f"{self.fallback}: a saved model to log and no model logger")
            model_uri, version = self.log_model(self.uri, run["run_id"], saved, name)
        if name and version is not None:
            run["registered_model"] = {"name": name, "version": str(version)}
            self.report.models.append(f"{name} v{version}")
        else:
            self.report.models.append(model_uri)

    def _status(self, record: Record, run: dict[str, Any]) -> None:
        status = str(record.data)
        self.client.set_terminated(run["run_id"], status, end_time=record.time_ms)
        if run.get("parent_run_id"):
            self.client.set_terminated(run["parent_run_id"], status, end_time=record.time_ms)
