"""Output of an evaluation (:class:`pipeline.evaluation.EvalReport`): DVC metrics and plots
files, rich tables, and MLflow logging. Shared by the DVC stage and the Prefect flows.

Files (each written atomically) under the output directory:

* ``metrics.json``: ``info`` (crop_border, metric labels, ``random_backbones``, the distance
  sign), ``means[model][set][setting][metric]`` and ``distance[model][set][setting][metric]``.
* ``paper.json``: the side-by-side rows with the paper's published numbers.
* ``plots/per_image.csv``, ``plots/per_setting_{mse,gan}.csv``, ``plots/distance.csv``: one
  row per image / per (model, set, setting), with a ``label`` column ``model/set/setting`` for
  bar plots and a ``random_backbones`` column saying whether a row holds random-weight numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.evaluation import EvalReport, ModelSpec

__all__ = [
    "console_text",
    "paper_json",
    "ensure_experiment",
    "training_run_id",
    "log_report_to_mlflow",
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
    * ``per_image.csv`` / ``per_setting.csv``: one row per image / per (model, set, setting),
      with a ``label`` column ``model/set/setting`` for bar plots and ``random_backbones``.
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    means, dist = report.means(), report.distances()

    def random_col(scores: Mapping[str, float]) -> bool:
        return any(report.random.get(k, False) for k in scores)

    paths = {
        "metrics": out / "metrics.json",
        "paper": out / "paper.json",
        "per_image": out / "plots" / "per_image.csv",
        "per_setting_mse": out / "plots" / "per_setting_mse.csv",
        "per_setting_gan": out / "plots" / "per_setting_gan.csv",
        "distance": out / "plots" / "distance.csv",
    }
    atomic_write_json(paths["metrics"], {"info": report.info(), "means": means, "distance": dist})
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
    for kind in ("mse", "gan"):
        rows = [
            {
                "label": f"{m}/{s}/{st}",
                "model": m,
                "set": s,
                "setting": st,
                **d,
                "random_backbones": random_col(d),
            }
            for m, per_set in means.items()
            if kinds[m] == kind
            for s, per_setting in per_set.items()
            for st, d in per_setting.items()
        ]
        atomic_write_text(paths[f"per_setting_{kind}"], _csv_text(rows) if rows else "label\n")
    drows = [
        {
            "label": f"{m}/{s}/{st}",
            "model": m,
            "set": s,
            "setting": st,
            **d,
            "random_backbones": random_col(d),
        }
        for m, per_set in dist.items()
        for s, per_setting in per_set.items()
        for st, d in per_setting.items()
    ]
    atomic_write_text(paths["distance"], _csv_text(drows) if drows else "label\n")
    return paths


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
            k: v for k, v in row.items() if k.startswith(("paper_", "ours_"))
        }
    return {
        "evaluated_sets": list(report.sets),
        "crop_border": report.crop_border,
        "tables": tables,
    }


def render_tables(report: EvalReport) -> list[Any]:
    """Rich tables: per-setting means of each model, distances, and the paper comparison."""
    from rich.table import Table

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
    for model, per_set in report.means().items():
        for set_name, per_setting in per_set.items():
            metrics = list(next(iter(per_setting.values())).keys())
            t = Table(title=f"{model} on {set_name} (crop_border={report.crop_border}){warn}")
            t.add_column("setting", no_wrap=True)
            for m in metrics:
                t.add_column(m + (" (random)" if report.random.get(m) else ""), justify="right")
            for st, d in per_setting.items():
                t.add_row(st, *(_cell(d.get(m)) for m in metrics))
            tables.append(t)
    for model, per_set in report.distances().items():
        for set_name, per_setting in per_set.items():
            metrics = list(next(iter(per_setting.values())).keys())
            t = Table(
                title=f"{model} distance to baselines on {set_name} "
                f"(PSNR/SSIM: baseline-ours; LPIPS/DISTS: ours-baseline; lower is better){warn}"
            )
            t.add_column("setting", no_wrap=True)
            for m in metrics:
                t.add_column(m, justify="right")
            for st, d in per_setting.items():
                t.add_row(st, *(_cell(d.get(m)) for m in metrics))
            tables.append(t)
    comparison = report.paper_comparison()
    for name in dict.fromkeys(r["table"] for r in comparison):
        rows = [r for r in comparison if r["table"] == name]
        cols = [k for k in rows[0] if k.startswith(("paper_", "ours_"))]
        rnd = " [ours: RANDOM backbone weights]" if rows[0]["random_backbones"] else ""
        if rows[0]["set"] not in report.sets:
            rnd += f" [ours: not evaluated on {rows[0]['set']}]"
        t = Table(title=f"Paper {name} vs ours on {rows[0]['set']}{rnd}")
        t.add_column("setting", no_wrap=True)
        for c in cols:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(r["setting"], *(_cell(r.get(c)) for c in cols))
        tables.append(t)
    return tables


def _cell(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def print_report(report: EvalReport, console: Any = None) -> None:
    """Print :func:`render_tables` on a rich console (the stage's and the flow's summary)."""
    from rich.console import Console

    console = console or Console()
    for t in render_tables(report):
        console.print(t)


def training_run_id(
    spec: ModelSpec, meta: Mapping[str, Any], tracking_uri: str | None
) -> str | None:
    """The MLflow run the training stage recorded for this checkpoint, if it is in this store:
    ``tracking.json`` beside the checkpoint (pipeline.tracking), else ``mlflow_run_id`` in
    the checkpoint metadata."""
    tracking_file = (spec.path if spec.path.is_dir() else spec.path.parent) / "tracking.json"
    try:
        recorded = json.loads(tracking_file.read_text())
    except (OSError, json.JSONDecodeError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("run_id") and recorded.get("mode") != "local":
        if tracking_uri is None or recorded.get("tracking_uri") in (None, tracking_uri):
            return str(recorded["run_id"])
        return None  # recorded in another store: the id means nothing here
    run_id = meta.get("mlflow_run_id")
    return str(run_id) if run_id else None


def ensure_experiment(
    client: Any, name: str, uri: str | None, artifact_location: str | None
) -> str:
    """The id of experiment ``name``, created if needed (artifacts under ``artifact_location``
    for local sqlite/file stores, as the training stages do)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_location and (uri or "").startswith(("sqlite:", "file:")):
        location = Path(artifact_location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def log_report_to_mlflow(
    report: EvalReport,
    paths: Mapping[str, Path],
    *,
    tracking_uri: str | None = None,
    experiment: str = "cugan-evaluate",
    artifact_location: str | None = None,
    extra_artifacts: Iterable[Path] = (),
    run_ids: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Log each model's metrics, the labels and the files to MLflow; returns model -> run id.

    The run of a model is ``run_ids[name]``, else ``spec.mlflow_run_id``, else the run its
    training stage recorded (:func:`training_run_id`), else a new run in ``experiment`` tagged
    with the checkpoint path. Metrics are ``eval/<set>/<setting>/<metric>`` and
    ``eval/distance/...``; tags ``eval.random_backbones``, ``eval.crop_border``, ``eval.sets``
    and ``eval.label.<metric>`` say what the numbers are.
    """
    import time

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    flat = report.flat_metrics()
    now = int(time.time() * 1000)
    tags = {
        "eval.random_backbones": str(report.random_backbones).lower(),
        "eval.crop_border": str(report.crop_border),
        "eval.sets": ",".join(report.sets),
        **{f"eval.label.{k}": v for k, v in report.labels.items()},
    }
    files = [Path(p) for p in [*paths.values(), *extra_artifacts] if Path(p).is_file()]
    used: dict[str, str] = {}
    for spec in report.models:
        run_id = (
            (run_ids or {}).get(spec.name)
            or spec.mlflow_run_id
            or training_run_id(spec, report.model_meta.get(spec.name, {}), tracking_uri)
        )
        if run_id is None:
            exp_id = ensure_experiment(client, experiment, tracking_uri, artifact_location)
            run_id = client.create_run(
                exp_id,
                run_name=f"evaluate-{spec.name}",
                tags={
                    "cugan.model_path": str(spec.path),
                    "cugan.model_kind": spec.kind,
                },
            ).info.run_id
            client.set_terminated(run_id)
        prefix = f"{spec.name}/"
        metrics = [
            Metric("eval/" + k[len(prefix) :], v, now, 0)
            for k, v in flat.items()
            if k.startswith(prefix)
        ]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for f in files:
            sub = "evaluation/figures" if f.suffix == ".png" else "evaluation"
            client.log_artifact(run_id, str(f), artifact_path=sub)
        used[spec.name] = run_id
    return used


def console_text(renderables: Iterable[Any], width: int = 120) -> str:
    """Rich renderables (tables) as plain text, for logs and artifacts."""
    from rich.console import Console

    console = Console(record=True, width=width, file=io.StringIO())
    for r in renderables:
        console.print(r)
    return console.export_text()


def report_text(report: EvalReport, width: int = 120) -> str:
    """The tables as plain text (Prefect logs, MLflow artifacts)."""
    return console_text(render_tables(report), width)
