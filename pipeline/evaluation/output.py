"""Output of an evaluation (:class:`~pipeline.evaluation.results.EvalReport`): the DVC metrics
and plots files, and the rich tables people read. Shared by the DVC stage and the Prefect flows
(MLflow logging is a step of :mod:`pipeline.evaluation.run`).

Files (each written atomically) under the output directory:

* ``metrics.json``: ``info`` (size_mode, crop_border, metric labels, ``random_backbones``, the
  distance sign, each model's z scale, the references), ``means[method][set][setting][metric]``
  (models, fixed baselines and references, e.g. ``means.input``) and
  ``distance[model][set][setting][metric]``.
* ``paper.json``: the side-by-side rows with the paper's published numbers, and the size mode.
* ``plots/per_image.csv``, ``plots/per_setting_{mse,gan}.csv``, ``plots/distance.csv``: one
  row per image / per (method, set, setting), with a ``label`` column ``method/set/setting``
  for bar plots and a ``random_backbones`` column saying whether a row holds random-weight
  numbers. The references are in both per-setting files, with the metrics of each kind.

Every table title says the size mode and the border crop the numbers were computed with.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.evaluation.results import EvalReport, MetricTable, TableRow

__all__ = [
    "console_text",
    "paper_json",
    "print_report",
    "render_tables",
    "report_text",
    "write_report",
]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def write_report(report: EvalReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the DVC metrics and plots files (each atomically); returns them by role.

    * ``metrics.json``: ``info`` (what the numbers are), ``means``, ``distance``.
    * ``paper.json``: the published numbers beside ours (:func:`paper_json`).
    * ``per_image.csv`` / ``per_setting_{mse,gan}.csv`` / ``distance.csv``: one row per image /
      per (model, set, setting), with a ``label`` column and ``random_backbones``.
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    means, dist = report.means(), report.distances()

    def random_col(scores: Mapping[str, float]) -> bool:
        return any(report.random.get(k, False) for k in scores)

    def table_rows(table: MetricTable, models: Iterable[str] | None = None) -> list[dict]:
        return [_row_dict(r, random_col(r.scores)) for r in table.rows(models)]

    paths = {
        "metrics": out / "metrics.json",
        "paper": out / "paper.json",
        "per_image": out / "plots" / "per_image.csv",
        "per_setting_mse": out / "plots" / "per_setting_mse.csv",
        "per_setting_gan": out / "plots" / "per_setting_gan.csv",
        "distance": out / "plots" / "distance.csv",
    }
    atomic_write_json(
        paths["metrics"],
        {"info": report.info(), "means": means.to_dict(), "distance": dist.to_dict()},
    )
    atomic_write_json(paths["paper"], paper_json(report))
    atomic_write_text(
        paths["per_image"],
        _csv_text(
            [
                {
                    "model": r.model,
                    "kind": r.kind,
                    "set": r.set,
                    "setting": r.setting,
                    "image": r.image,
                    **r.scores,
                    "random_backbones": random_col(r.scores),
                }
                for r in report.rows
            ]
        ),
    )
    kinds = {m.name: m.kind for m in report.models}
    refs = set(report.reference_names)
    for kind in ("mse", "gan"):
        names = [m for m in means.models() if kinds.get(m) == kind]
        rows = table_rows(means, names)
        if names:  # the references sit in the tables of the kinds that were evaluated
            keep = set(report.metrics.get(kind, ()))
            rows += [
                _row_dict(r, random_col(r.scores), keep)
                for r in means.rows([m for m in means.models() if m in refs])
            ]
        atomic_write_text(paths[f"per_setting_{kind}"], _csv_text(rows) if rows else "label\n")
    drows = table_rows(dist)
    atomic_write_text(paths["distance"], _csv_text(drows) if drows else "label\n")
    return paths


def _row_dict(
    row: TableRow, random_backbones: bool, keep: set[str] | None = None
) -> dict[str, Any]:
    scores = {k: v for k, v in row.scores.items() if keep is None or k in keep}
    return {
        "label": row.label,
        "model": row.model,
        "set": row.set,
        "setting": row.setting,
        **scores,
        "random_backbones": random_backbones,
    }


def paper_json(report: EvalReport) -> dict[str, Any]:
    """``tables[<table key>][<setting>] = {"paper_<row>": v, "ours_<model>": v or null}``, with
    the table's title, set and metric, and whether our numbers used random backbones."""
    tables: dict[str, Any] = {}
    for row in report.paper_comparison():
        t = tables.setdefault(
            row["key"],
            {
                "title": row["table"],
                "set": row["set"],
                "metric": row["metric"],
                "random_backbones": row["random_backbones"],
                "settings": {},
            },
        )
        t["settings"][row["setting"]] = {
            k: v for k, v in row.items() if k.startswith(("paper_", "ours_", "ref_"))
        }
    return {
        "evaluated_sets": list(report.sets),
        "size_mode": report.size_mode,
        "crop_border": report.crop_border,
        "tables": tables,
    }


def _metric_table(title: str, table: MetricTable, model: str, set_name: str, labels) -> Table:
    settings = table.settings(model, set_name)
    metrics = list(table.scores(model, set_name, settings[0]))
    t = Table(title=title)
    t.add_column("setting", no_wrap=True)
    for m in metrics:
        t.add_column(labels(m), justify="right")
    for st in settings:
        scores = table.scores(model, set_name, st)
        t.add_row(st, *(_cell(scores.get(m)) for m in metrics))
    return t


def render_tables(report: EvalReport) -> list[Any]:
    """Rich tables: per-setting means of each model, distances, and the paper comparison."""
    warn = (
        (
            " [RANDOM backbone weights: "
            + ", ".join(k for k, v in report.random.items() if v)
            + " are not meaningful]"
        )
        if report.random_backbones
        else ""
    )
    tables = []
    means = report.means()
    sizing = f"size_mode={report.size_mode}, crop_border={report.crop_border}"
    refs = set(report.reference_names)
    for model in means.models():
        role = " (reference)" if model in refs else ""
        for set_name in means.sets(model):
            tables.append(
                _metric_table(
                    f"{model}{role} on {set_name} ({sizing}){warn}",
                    means,
                    model,
                    set_name,
                    lambda m: m + (" (random)" if report.random.get(m) else ""),
                )
            )
    dist = report.distances()
    for model in dist.models():
        for set_name in dist.sets(model):
            tables.append(
                _metric_table(
                    f"{model} distance to baselines on {set_name} ({sizing}; "
                    f"PSNR/SSIM: baseline-ours; LPIPS/DISTS: ours-baseline; lower is better)"
                    f"{warn}",
                    dist,
                    model,
                    set_name,
                    lambda m: m,
                )
            )
    comparison = report.paper_comparison()
    for name in dict.fromkeys(r["table"] for r in comparison):
        rows = [r for r in comparison if r["table"] == name]
        cols = [k for k in rows[0] if k.startswith(("paper_", "ours_", "ref_"))]
        rnd = " [ours: RANDOM backbone weights]" if rows[0]["random_backbones"] else ""
        if rows[0]["set"] not in report.sets:
            rnd += f" [ours: not evaluated on {rows[0]['set']}]"
        if report.size_mode != "crop16":
            rnd += " [ours: full size; the paper crops to multiples of 16 (size_mode crop16)]"
        t = Table(title=f"Paper {name} vs ours on {rows[0]['set']} ({sizing}){rnd}")
        t.add_column("setting", no_wrap=True)
        for c in cols:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(r["setting"], *(_cell(r.get(c)) for c in cols))
        tables.append(t)
    return tables


def _cell(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def print_report(report: EvalReport, console: Console | None = None) -> None:
    """Print :func:`render_tables` on a rich console (the stage's summary)."""
    console = console or Console()
    for t in render_tables(report):
        console.print(t)


def console_text(renderables: Iterable[Any], width: int = 120) -> str:
    """Rich renderables (tables) as plain text, for logs and artifacts."""
    console = Console(record=True, width=width, file=io.StringIO())
    for r in renderables:
        console.print(r)
    return console.export_text()


def report_text(report: EvalReport, width: int = 120) -> str:
    """The tables as plain text (Prefect logs, MLflow artifacts)."""
    return console_text(render_tables(report), width)
