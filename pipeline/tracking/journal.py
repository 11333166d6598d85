"""The files of a local tracking fallback, in one place: where they lie, how a record is written
and read back, and what a sync has already replayed of them.

``<stage out>/mlflow-fallback/`` holds:

* ``tracking.jsonl``: one JSON record a line, ``{"time", "run_id", "local_id", "kind",
  "data"}``, appended. ``kind`` is ``params``, ``tags``, ``metrics`` (rows of ``{"step",
  "metrics"}``), ``artifact`` (a file under ``artifacts/``), ``model`` (a pyfunc model saved
  in this directory and the name to register it as) or ``status``. The records of one run
  share its ``run_id`` (a run that fell back part-way) or its ``local_id`` (a stage that fell
  back before it had a run): the key of :class:`Record`. Several runs of a stage may append to
  one journal; the key keeps them apart.
* ``runs.json``: ``{local_id: {...}}``, what a sync needs to create the MLflow run of a stage
  that had none (its store, experiment, artifact location, stage, tags, starting checkpoint,
  parent hint, start time), written atomically by the stage's driver when it falls back.
* ``artifacts/``: the files the run would have logged (images, JSON) at their artifact paths,
  each written before its record.
* ``model_<stage>/``: the pyfunc model, saved instead of logged.
* ``synced.json``: what ``cugan tracking sync`` has replayed (:mod:`pipeline.tracking.sync`):
  the store, the byte offset up to which every record is in it, and the run (and registered
  version) each key became. Rewritten atomically after every replayed record.

A crash leaves at worst a torn last line: the reader stops before a line without its newline
and skips a complete line that does not parse (logging it), so neither is ever replayed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json

__all__ = [
    "ARTIFACTS_DIR",
    "FALLBACK_DIR",
    "JOURNAL_FILE",
    "RUNS_FILE",
    "SYNC_FILE",
    "Record",
    "add_local_run",
    "append_record",
    "read_local_runs",
    "read_records",
    "read_sync_state",
    "write_sync_state",
]

log = logging.getLogger(__name__)

FALLBACK_DIR = "mlflow-fallback"
JOURNAL_FILE = "tracking.jsonl"
ARTIFACTS_DIR = "artifacts"
SYNC_FILE = "synced.json"
RUNS_FILE = "runs.json"


@dataclass(frozen=True)
class Record:
    """One journal line; ``end`` is the byte offset just past it (where a sync resumes)."""

    end: int
    time: float
    kind: str
    data: Any
    run_id: str | None = None
    local_id: str | None = None

    @property
    def key(self) -> str | None:
        """The run this record belongs to (None: a journal of an older format)."""
        return self.local_id or self.run_id

    @property
    def time_ms(self) -> int:
        return round(self.time * 1000)


def append_record(
    directory: str | os.PathLike[str],
    kind: str,
    data: Any,
    *,
    run_id: str | None = None,
    local_id: str | None = None,
) -> None:
    """Append one record (one ``write`` of one line, so that processes appending to the same
    journal, a Ray worker and its driver, never interleave inside a line)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    record = {"time": time.time(), "run_id": run_id, "kind": kind, "data": data}
    if local_id is not None:
        record["local_id"] = local_id
    with (path / JOURNAL_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_records(directory: str | os.PathLike[str], start: int = 0) -> Iterator[Record]:
    """The records from byte ``start`` on, in the order they were written."""
    path = Path(directory) / JOURNAL_FILE
    if not path.is_file():
        return
    with path.open("rb") as fh:
        fh.seek(start)
        offset = start
        for raw in fh:
            if not raw.endswith(b"\n"):
                return  # torn last line: a writer died in the middle of it
            offset += len(raw)
            try:
                doc = json.loads(raw)
                yield Record(
                    end=offset,
                    time=float(doc["time"]),
                    kind=str(doc["kind"]),
                    data=doc.get("data"),
                    run_id=doc.get("run_id"),
                    local_id=doc.get("local_id"),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("%s: skipping an unreadable line ending at byte %d", path, offset)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def add_local_run(directory: str | os.PathLike[str], local_id: str, data: dict[str, Any]) -> Path:
    """Record a run that has no MLflow run yet (``runs.json``, module docstring)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    runs = read_local_runs(directory)
    runs[local_id] = {**data, "time": time.time()}
    return atomic_write_json(Path(directory) / RUNS_FILE, runs)


def read_local_runs(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    return _read_json(Path(directory) / RUNS_FILE) or {}


def read_sync_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``synced.json`` of a fallback directory, or None where nothing was synced yet."""
    return _read_json(Path(directory) / SYNC_FILE)


def write_sync_state(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    return atomic_write_json(Path(directory) / SYNC_FILE, state)
