"""Logging of a training run that never stops training: MLflow while it answers, local files
from the first failure on.

The first MLflow call that fails (server down, timeout, database locked...) logs ONE warning
and switches that process to local logging for good: every later record of the run (params,
tags, metrics, images, JSON, the saved model) goes to the journal of
:mod:`pipeline.tracking.journal` in ``<stage out>/mlflow-fallback`` under the run's id,
artifacts to files beside it, each written before its record. ``cugan tracking sync`` replays
all of it (:mod:`pipeline.tracking.sync`).

How long a failing call takes before it counts as failed is MLflow's HTTP client's business:
:func:`pipeline.tracking.store.limit_http_retries` (applied where the stage starts, inherited
by the Ray workers) keeps it to seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write_json
from pipeline.errors import one_line
from pipeline.imageio import write_png
from pipeline.tracking.journal import ARTIFACTS_DIR, FALLBACK_DIR, JOURNAL_FILE, append_record
from pipeline.tracking.runs import RunStatus, TrackingTarget
from pipeline.tracking.store import (
    TRACKING_ERRORS,
    is_http,
    quiet_retry_warnings,
    send_batch,
    tracking_client,
)

__all__ = ["RunLog"]

log = logging.getLogger(__name__)


class RunLog:
    """Logging into one MLflow run, switching for good to local files on the first failure."""

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.mode = target.mode
        self._client = tracking_client(target.uri) if self.mode == "mlflow" else None
        if self.mode == "mlflow" and is_http(target.uri):
            quiet_retry_warnings()  # also in a Ray worker, where the stage's setup did not run
        if self.mode == "local" and target.fallback_dir is None:
            raise ValueError("local tracking needs a fallback_dir")

    @property
    def fell_back(self) -> bool:
        return self.target.mode == "mlflow" and self.mode == "local"

    @property
    def local_dir(self) -> Path:
        """The fallback directory (the journal, artifacts/, saved models)."""
        return Path(self.target.fallback_dir or FALLBACK_DIR)

    # -- local ---------------------------------------------------------------------------------

    def _artifact_path(self, artifact_file: str) -> Path:
        dest = self.local_dir / ARTIFACTS_DIR / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def _append(self, kind: str, payload: Any) -> None:
        append_record(
            self.local_dir,
            kind,
            payload,
            run_id=self.target.run_id,
            local_id=self.target.local_id,
        )

    def fall_back(self, what: str, err: BaseException) -> None:
        """Switch to local files for the rest of the run (one warning). The records keep the
        run's id: a sync replays them into that run."""
        self.mode = "local"
        log.warning(
            "MLflow tracking at %s failed (%s: %s); continuing without it: this run's records "
            "go to %s (`cugan tracking sync` replays them)",
            self.target.uri,
            what,
            one_line(err),
            self.local_dir / JOURNAL_FILE,
        )

    def _sent(self, what: str, mlflow_fn: Callable[[], None]) -> bool:
        """Whether MLflow took the record; False (after falling back) where it did not."""
        if self.mode != "mlflow":
            return False
        try:
            mlflow_fn()
        except TRACKING_ERRORS as err:
            self.fall_back(what, err)
            return False
        return True

    def _call(self, what: str, mlflow_fn: Callable[[], None], kind: str, payload: Any) -> None:
        if self.mode != "off" and not self._sent(what, mlflow_fn):
            self._append(kind, payload)

    def _file(
        self, what: str, mlflow_fn: Callable[[], None], write: Callable[[Path], Any], name: str
    ) -> None:
        if self.mode != "off" and not self._sent(what, mlflow_fn):
            write(self._artifact_path(name))
            self._append("artifact", name)

    # -- API -----------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, str]) -> None:
        self._call(
            "log params",
            lambda: send_batch(self._client, self.target.run_id, params=params),
            "params",
            dict(params),
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call(
            "set tags",
            lambda: send_batch(self._client, self.target.run_id, tags=tags),
            "tags",
            dict(tags),
        )

    def log_metrics(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """``rows`` of ``(step, {key: value})``; sent in batches of up to 1000 values."""
        rows = [(int(step), {k: float(v) for k, v in m.items()}) for step, m in rows]
        if not rows:
            return
        self._call(
            "log metrics",
            lambda: send_batch(self._client, self.target.run_id, metrics=rows),
            "metrics",
            [{"step": s, "metrics": m} for s, m in rows],
        )

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self._file(
            "log image",
            lambda: self._client.log_image(self.target.run_id, image, artifact_file=artifact_file),
            lambda path: write_png(path, image),
            artifact_file,
        )

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._file(
            "log dict",
            lambda: self._client.log_dict(self.target.run_id, obj, artifact_file),
            lambda path: atomic_write_json(path, obj),
            artifact_file,
        )

    def record_saved_model(self, path: str | Path, registered_name: str | None) -> None:
        """A pyfunc model saved under the fallback directory instead of logged: a sync logs it
        into the run and registers it as ``registered_name`` (None: log only)."""
        if self.mode == "off":
            return
        where = Path(path).resolve().relative_to(self.local_dir.resolve())
        self._append("model", {"path": where.as_posix(), "registered_name": registered_name})

    def finish(self, status: RunStatus = "FINISHED") -> None:
        def send() -> None:
            self._client.set_terminated(self.target.run_id, status)
            if self.target.parent_run_id:
                self._client.set_terminated(self.target.parent_run_id, status)

        self._call("end run", send, "status", status)
