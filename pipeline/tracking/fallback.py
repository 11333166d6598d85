"""Logging of a training run that never stops training: MLflow while it answers, local files
from the first failure on.

The first MLflow call that fails (server down, timeout, database locked...) logs ONE warning
and switches that process to local logging for good: every later record of the run (params,
tags, metrics, images, JSON) is appended to ``<fallback dir>/tracking.jsonl`` and artifacts are
written under ``<fallback dir>/artifacts/`` (each file atomically); the fallback dir is
``<stage out>/mlflow-fallback``. The HTTP client's own retries apply before a call counts as
failed (MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT shorten them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write_json
from pipeline.errors import one_line
from pipeline.imageio import write_png
from pipeline.tracking.runs import FALLBACK_DIR, RunStatus, TrackingTarget
from pipeline.tracking.store import TRACKING_ERRORS, send_batch, tracking_client

__all__ = ["RunLog"]

log = logging.getLogger(__name__)


class RunLog:
    """Logging into one MLflow run, switching for good to local files on the first failure."""

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.mode = target.mode
        self._client = tracking_client(target.uri) if self.mode == "mlflow" else None
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

    def _artifact_path(self, artifact_file: str) -> Path:
        dest = self._local_dir() / "artifacts" / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def _append(self, kind: str, payload: Any) -> None:
        # An append-only log: a torn last line is the worst a crash leaves, and readers skip it.
        record = {"time": time.time(), "run_id": self.target.run_id, "kind": kind, "data": payload}
        with (self._local_dir() / "tracking.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _fall_back(self, what: str, err: BaseException) -> None:
        self.mode = "local"
        log.warning(
            "MLflow tracking at %s failed (%s: %s); continuing without it: this run's records "
            "go to %s",
            self.target.uri,
            what,
            one_line(err),
            self._local_dir() / "tracking.jsonl",
        )

    def _call(self, what: str, mlflow_fn: Callable[[], None], kind: str, payload: Any) -> None:
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
        def send() -> None:
            self._client.log_image(self.target.run_id, image, artifact_file=artifact_file)

        if self.mode == "off":
            return
        self._call("log image", send, "artifact", artifact_file)
        if self.mode == "local":
            write_png(self._artifact_path(artifact_file), image)

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
            atomic_write_json(self._artifact_path(artifact_file), obj)

    def finish(self, status: RunStatus = "FINISHED") -> None:
        def send() -> None:
            self._client.set_terminated(self.target.run_id, status)
            if self.target.parent_run_id:
                self._client.set_terminated(self.target.parent_run_id, status)

        self._call("end run", send, "status", status)
