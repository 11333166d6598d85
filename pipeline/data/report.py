"""What a data stage did with each input: used as is, converted, or skipped (and why).

Bad input never stops a data stage; it is reported instead. Every stage that reads user files
keeps one :class:`StageReport`, writes it as JSON next to its outputs and logs its one-line
summary (``"prepare: 7 ok, 2 converted, 3 skipped"``), so a user sees at a glance that files
were dropped and can look up which and why.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.atomic import atomic_write_json

__all__ = ["StageReport", "progress", "write_report"]

T = TypeVar("T")


@dataclass
class StageReport:
    stage: str
    ok: list[str] = field(default_factory=list)
    converted: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_ok(self, source: str) -> None:
        self.ok.append(source)

    def add_converted(self, source: str, notes: list[str]) -> None:
        self.converted.append({"source": source, "notes": list(notes)})

    def add_skipped(self, source: str, reason: str) -> None:
        self.skipped.append({"source": source, "reason": reason})

    @property
    def counts(self) -> dict[str, int]:
        return {"ok": len(self.ok), "converted": len(self.converted), "skipped": len(self.skipped)}

    def summary(self) -> str:
        c = self.counts
        return f"{self.stage}: {c['ok']} ok, {c['converted']} converted, {c['skipped']} skipped"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "summary": self.summary(),
            "counts": self.counts,
            **self.extra,
            "converted": self.converted,
            "skipped": self.skipped,
        }


def progress(items: Iterable[T], *, total: int | None, description: str) -> Iterator[T]:
    """A rich progress bar on an interactive terminal; a plain iteration otherwise (logs, DVC)."""
    from rich.progress import track

    yield from track(
        items,
        description=description,
        total=total,
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def write_report(path: str | os.PathLike[str], report: StageReport) -> None:
    """Write the report JSON (atomically) and log its one-line summary."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report.to_dict())
    logging.getLogger(__name__).info("%s", report.summary())
