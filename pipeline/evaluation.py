"""Evaluation of restoration models on the degraded test sets: one implementation for the DVC
``evaluate`` stage (``stages/evaluate.py``), the Prefect flows (``flows/evaluate.py``,
``flows/sweep.py``, ``flows/retrain.py``) and the ablation trials.

What is measured (paper section 4.2, method doc):

* Every model restores every image of every chosen setting ``(blur r, noise sigma)`` with the
  matching condition ``z = [r / blur_max, sigma / noise_max]`` (unconditional baselines ignore
  it). The restored image is the uint8 array :func:`pipeline.inference.restore` returns -- what
  the CLI would write -- and metrics compare it, as ``k / 255`` floats, with the clean image.
* MSE models (CUnet): PSNR and SSIM on RGB and on Y (BT.601, MATLAB ``rgb2ycbcr``), with
  ``crop_border`` pixels cut from every side first (0 by default: the paper does not crop).
* GAN models (CUGAN): LPIPS (AlexNet v0.1, inputs in [0, 1] with ``normalize=True``) and DISTS,
  plus RGB PSNR for the perception-distortion picture.
* The paper's "distance" to the fixed-degradation baselines (Unet / UGAN), where a baseline
  checkpoint exists for a setting, so that lower is better for every metric:
  ``baseline - ours`` for PSNR/SSIM (higher is better) and ``ours - baseline`` for LPIPS/DISTS.
* A side-by-side table with the paper's published numbers (:mod:`pipeline.paper`), filled in
  only for the set the paper used (CBSD68 for Table 2, LIVE1 for Table 1).

Metric keys: ``<set>/<setting>/<metric>`` with the setting named ``blur{r:g}_noise{sigma:g}``
(e.g. ``holdout/blur2_noise30/psnr_rgb``); ``<set>/all/<metric>`` is the mean over settings.

Perceptual metrics computed with random backbone weights (no ImageNet weights offline) are
numbers about nothing; they keep their key (so DVC and MLflow compare like with like over time)
but are labelled in every place they appear: the metric label, ``random_backbones`` in the JSON
and CSV files, the table titles and the MLflow tags.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.config import Params
from pipeline.condition import parse_setting_key as _parse_setting_key
from pipeline.condition import setting_key
from pipeline.paper import PAPER_TABLES, PaperTable

__all__ = [
    "DEFAULT_MODEL_SPECS",
    "PERCEPTUAL",
    "EvalError",
    "EvalReport",
    "EvalSet",
    "HIGHER_IS_BETTER",
    "MetricSuite",
    "ModelSpec",
    "ScoreRow",
    "discover_baselines",
    "evaluate_images",
    "evaluate_models",
    "load_eval_set",
    "mlflow_uri",
    "parse_model_spec",
    "parse_setting_key",
    "run_evaluation",
    "setting_key",
    "with_baselines",
]

log = logging.getLogger(__name__)

Kind = Literal["mse", "gan"]

#: Direction of every metric we compute; distances are signed so that lower is always better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr_rgb": True,
    "psnr_y": True,
    "ssim_rgb": True,
    "ssim_y": True,
    "lpips": False,
    "dists": False,
}
PERCEPTUAL = ("lpips", "dists")

#: The models the ``evaluate`` stage and flow evaluate by default (the training stages' outputs).
DEFAULT_MODEL_SPECS = (
    "cunet:mse:runs/train_cunet/model",
    "cugan:gan:runs/train_cugan/model",
)

class EvalError(ValueError):
    """Evaluation cannot run as asked (missing set, setting or model); one-line message."""


def parse_setting_key(key: str) -> tuple[float, float]:
    """``"blur2_noise30"`` -> ``(2.0, 30.0)``; EvalError for anything else."""
    try:
        return _parse_setting_key(key)
    except ValueError as err:
        raise EvalError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# evaluation sets


@dataclass(frozen=True)
class EvalSet:
    """``<root>/<name>/gt/<image>.png`` and ``<root>/<name>/<setting>/<image>.png``."""

    name: str
    path: Path
    images: tuple[str, ...]  # file names, sorted
    settings: tuple[tuple[float, float], ...]

    def gt_path(self, image: str) -> Path:
        return self.path / "gt" / image

    def degraded_path(self, setting: tuple[float, float], image: str) -> Path:
        return self.path / setting_key(*setting) / image


def load_eval_set(
    root: str | os.PathLike[str],
    name: str,
    settings: Sequence[tuple[float, float]],
    *,
    max_images: int | None = None,
) -> EvalSet:
    """Check that the set holds a clean image and one degraded image per setting for each name.

    Only the directory layout is read (the data stage writes it, with ``manifest.json`` beside
    it for people and other tools); a missing directory or image is an :class:`EvalError`
    naming it, never a silently smaller evaluation.
    """
    path = Path(root) / name
    gt_dir = path / "gt"
    if not gt_dir.is_dir():
        raise EvalError(f"evaluation set {name!r}: {gt_dir} not found (run the data stages first)")
    images = tuple(sorted(p.name for p in gt_dir.iterdir() if p.suffix.lower() == ".png"))
    if not images:
        raise EvalError(f"evaluation set {name!r}: no PNG images in {gt_dir}")
    if max_images is not None:
        images = images[:max_images]
    for setting in settings:
        d = path / setting_key(*setting)
        if not d.is_dir():
            raise EvalError(
                f"evaluation set {name!r}: setting directory {d} not found "
                "(is the setting in evalsets.settings?)"
            )
        missing = [img for img in images if not (d / img).is_file()]
        if missing:
            raise EvalError(
                f"evaluation set {name!r}: {d} lacks {len(missing)} image(s), e.g. {missing[0]}"
            )
    return EvalSet(name=name, path=path, images=images, settings=tuple(map(tuple, settings)))


# ---------------------------------------------------------------------------------------------
# metrics


class MetricSuite:
    """The metric callables for one evaluation, built once (LPIPS/DISTS hold networks).

    ``names`` selects from :data:`HIGHER_IS_BETTER`. ``labels`` says what each number is;
    ``random[name]`` is True where a backbone had random weights.
    """

    def __init__(
        self,
        names: Iterable[str],
        *,
        crop_border: int = 0,
        pretrained: str = "auto",
        weights_dir: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        from pipeline import metrics

        self.names = tuple(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in HIGHER_IS_BETTER]
        if unknown:
            raise EvalError(f"unknown metric {unknown[0]!r} (known: {', '.join(HIGHER_IS_BETTER)})")
        self.crop_border = int(crop_border)
        self.device = torch.device(device)
        self.labels: dict[str, str] = {}
        self.random: dict[str, bool] = {}
        self._perceptual: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
        for name in self.names:
            if name in PERCEPTUAL:
                cls = metrics.LPIPSMetric if name == "lpips" else metrics.DISTSMetric
                metric = cls(pretrained=pretrained, cache_dir=weights_dir)
                if isinstance(metric, torch.nn.Module):
                    metric = metric.to(self.device)
                self._perceptual[name] = metric
                self.random[name] = _is_random(metric)
                self.labels[name] = str(metric.label)
            else:
                kind, space = name.split("_")
                self.random[name] = False
                self.labels[name] = (
                    f"{kind.upper()} on {'Y (BT.601)' if space == 'y' else 'RGB'}, "
                    f"crop_border={self.crop_border}"
                )
        self._psnr, self._ssim = metrics.psnr, metrics.ssim

    @property
    def any_random(self) -> bool:
        return any(self.random.values())

    def __call__(
        self, restored: Tensor, clean: Tensor, names: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Scores of one restored ``[1, 3, H, W]`` image against its clean image, both in
        [0, 1]: every metric of the suite, or the subset ``names``."""
        out: dict[str, float] = {}
        restored, clean = restored.to(self.device), clean.to(self.device)
        with torch.inference_mode():
            for name in names or self.names:
                if name in self._perceptual:
                    value = self._perceptual[name](restored, clean)
                else:
                    fn = self._psnr if name.startswith("psnr") else self._ssim
                    value = fn(
                        restored, clean, crop_border=self.crop_border, y_channel=name.endswith("_y")
                    )
                out[name] = float(value.reshape(-1)[0])
        return out


def _is_random(metric: Any) -> bool:
    """Whether a perceptual metric runs on random backbone weights (attribute, else its label)."""
    for attr in ("is_random", "random_weights"):
        if isinstance(getattr(metric, attr, None), bool):
            return bool(getattr(metric, attr))
    return "random" in str(getattr(metric, "label", "")).lower()


# ---------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: ``name`` (used in metric keys), its kind, and its checkpoint.

    ``setting`` is set for a fixed-degradation baseline (Unet / UGAN), which is evaluated on
    that one setting only. ``mlflow_run_id`` is where its metrics are logged (None: look for the
    run the training stage recorded, else open a new one).
    """

    name: str
    kind: Kind
    path: Path
    setting: tuple[float, float] | None = None
    mlflow_run_id: str | None = None

    @property
    def is_baseline(self) -> bool:
        return self.setting is not None


_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_model_spec(spec: str) -> ModelSpec:
    """``"cunet:mse:runs/train_cunet/model"`` -> ModelSpec (the CLI form of stages and flows)."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[1] not in ("mse", "gan") or not _NAME_RE.match(parts[0]):
        raise EvalError(
            f"model spec {spec!r}: expected NAME:KIND:PATH with KIND mse or gan "
            "(e.g. cunet:mse:runs/train_cunet/model)"
        )
    return ModelSpec(name=parts[0], kind=parts[1], path=Path(parts[2]))  # type: ignore[arg-type]


def discover_baselines(directory: str | os.PathLike[str] | None, kind: Kind) -> list[ModelSpec]:
    """Fixed-degradation baselines under ``<directory>/<setting>/``: a checkpoint directory
    (``generator.json`` + ``.safetensors``), or a training stage's output holding one in
    ``model/`` (``stages.train --out <directory>/<setting>`` with ``fixed_degradation``).

    A missing directory means "no baselines" (they are optional: the paper trains one model per
    setting, which costs ten trainings per kind).
    """
    if directory is None or not Path(directory).is_dir():
        return []
    name = "unet" if kind == "mse" else "ugan"
    specs = []
    for sub in sorted(Path(directory).iterdir()):
        if not sub.is_dir():
            continue
        try:
            setting = parse_setting_key(sub.name)
        except EvalError:
            continue
        ckpt = next((d for d in (sub, sub / "model") if (d / "generator.json").is_file()), None)
        if ckpt is not None:
            specs.append(
                ModelSpec(
                    name=f"{name}-{sub.name}",
                    kind=kind,
                    path=ckpt,
                    setting=setting,
                )
            )
    return specs


def with_baselines(models: Sequence[ModelSpec], params: Params) -> list[ModelSpec]:
    """``models`` plus the baselines found under ``evaluate.baselines_{mse,gan}``."""
    ev = params.evaluate
    specs = list(models)
    for kind, directory in (("mse", ev.baselines_mse), ("gan", ev.baselines_gan)):
        specs += discover_baselines(directory, kind)  # type: ignore[arg-type]
    return specs


def _load_generator(spec: ModelSpec) -> tuple[torch.nn.Module, dict[str, Any]]:
    from pipeline.checkpoint import load_generator

    if not spec.path.exists():
        raise EvalError(f"model {spec.name}: checkpoint {spec.path} not found")
    return load_generator(spec.path)


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass(frozen=True)
class ScoreRow:
    """The scores of one model on one image of one setting."""

    model: str
    kind: Kind
    set: str
    setting: str
    image: str
    scores: dict[str, float]


def evaluate_images(
    model: torch.nn.Module,
    model_name: str,
    kind: Kind,
    eval_set: EvalSet,
    settings: Sequence[tuple[float, float]],
    suite: MetricSuite,
    *,
    blur_max: float = 4.0,
    noise_max: float = 50.0,
    device: str | torch.device = "cpu",
    tile: int | None = None,
    tile_overlap: int = 32,
    metric_names: Sequence[str] | None = None,
    on_image: Callable[[], None] | None = None,
) -> list[ScoreRow]:
    """Restore and score every image of ``eval_set`` for each of ``settings`` (with the
    suite's metrics, or ``metric_names`` of them)."""
    from pipeline.condition import ConditionScale
    from pipeline.degradation import to_tensor
    from pipeline.imageio import read_rgb8
    from pipeline.inference import restore

    rows: list[ScoreRow] = []
    clean_cache: dict[str, np.ndarray] = {}
    for setting in settings:
        z = ConditionScale(blur_max, noise_max).to_z(setting[0], setting[1])
        for image in eval_set.images:
            if image not in clean_cache:
                clean_cache[image] = read_rgb8(eval_set.gt_path(image)).array
            degraded = read_rgb8(eval_set.degraded_path(setting, image)).array
            restored = restore(
                model, degraded, z, tile=tile, tile_overlap=tile_overlap, device=device
            )
            scores = suite(to_tensor(restored), to_tensor(clean_cache[image]), metric_names)
            rows.append(
                ScoreRow(model_name, kind, eval_set.name, setting_key(*setting), image, scores)
            )
            if on_image is not None:
                on_image()
    return rows


@dataclass
class EvalReport:
    """Everything one evaluation produced, in plain data (written, printed and logged as is)."""

    rows: list[ScoreRow]
    models: list[ModelSpec]
    sets: list[str]
    settings: list[str]
    metrics: dict[Kind, tuple[str, ...]]
    labels: dict[str, str]
    random: dict[str, bool]
    crop_border: int
    model_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def random_backbones(self) -> bool:
        return any(self.random.values())

    # -- aggregates ---------------------------------------------------------------------------

    def means(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """``means[model][set][setting][metric]`` (mean over images) plus ``[set]["all"]``
        (mean over that model's settings of the per-setting means)."""
        acc: dict[tuple[str, str, str], dict[str, list[float]]] = {}
        for r in self.rows:
            d = acc.setdefault((r.model, r.set, r.setting), {})
            for k, v in r.scores.items():
                d.setdefault(k, []).append(v)
        out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for (m, s, st), d in acc.items():
            out.setdefault(m, {}).setdefault(s, {})[st] = {
                k: float(np.mean(v)) for k, v in d.items()
            }
        for per_set in out.values():
            for s, per_setting in per_set.items():
                keys = {k for v in per_setting.values() for k in v}
                per_set[s] = dict(sorted(per_setting.items(), key=lambda kv: self._order(kv[0])))
                per_set[s]["all"] = {
                    k: float(np.mean([v[k] for v in per_setting.values() if k in v]))
                    for k in sorted(keys)
                }
        return out

    def _order(self, setting: str) -> int:
        return self.settings.index(setting) if setting in self.settings else len(self.settings)

    def distances(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """``distances[model][set][setting][metric]`` of each modulation model to the baseline
        of its kind for that setting: ``baseline - ours`` where higher is better, ``ours -
        baseline`` where lower is better; lower is better for every entry."""
        means = self.means()
        baselines = {
            (b.kind, setting_key(*b.setting)): b.name for b in self.models if b.is_baseline
        }
        out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for spec in self.models:
            if spec.is_baseline:
                continue
            for s, per_setting in means.get(spec.name, {}).items():
                for st, ours in per_setting.items():
                    base_name = baselines.get((spec.kind, st))
                    base = means.get(base_name, {}).get(s, {}).get(st) if base_name else None
                    if not base:
                        continue
                    out.setdefault(spec.name, {}).setdefault(s, {})[st] = {
                        k: (base[k] - v) if HIGHER_IS_BETTER[k] else (v - base[k])
                        for k, v in ours.items()
                        if k in base
                    }
        return out

    def paper_comparison(self, tables: Sequence[PaperTable] = PAPER_TABLES) -> list[dict[str, Any]]:
        """One row per (published table, setting): the paper's rows beside ours, where our
        evaluation used the paper's set, the same metric and a model of the table's kind."""
        means = self.means()
        rows = []
        for table in tables:
            ours_models = [m for m in self.models if m.kind == table.kind and not m.is_baseline]
            base_models = {
                setting_key(*m.setting): m
                for m in self.models
                if m.kind == table.kind and m.is_baseline
            }
            for key in table.keys:
                row: dict[str, Any] = {
                    "table": table.name,
                    "key": table.key,
                    "set": table.dataset,
                    "setting": key,
                    "metric": table.metric,
                }
                for paper_model, values in table.rows.items():
                    row[f"paper_{paper_model}"] = values.get(key)
                for m in ours_models:
                    row[f"ours_{m.name}"] = _get(means, m.name, table.dataset, key, table.metric)
                base = base_models.get(key)
                row[f"ours_{table.baseline_row}"] = (
                    _get(means, base.name, table.dataset, key, table.metric) if base else None
                )
                row["random_backbones"] = self.random.get(table.metric, False)
                rows.append(row)
        return rows

    def flat_metrics(self) -> dict[str, float]:
        """``{model}/{set}/{setting}/{metric}`` -> mean, and the distances under
        ``{model}/distance/{set}/{setting}/{metric}``."""
        flat = {}
        for m, per_set in self.means().items():
            for s, per_setting in per_set.items():
                for st, d in per_setting.items():
                    for k, v in d.items():
                        flat[f"{m}/{s}/{st}/{k}"] = v
        for m, per_set in self.distances().items():
            for s, per_setting in per_set.items():
                for st, d in per_setting.items():
                    for k, v in d.items():
                        flat[f"{m}/distance/{s}/{st}/{k}"] = v
        return flat

    def score(self, model: str, key: str) -> float:
        """One aggregate by its key ``<set>/<setting or all>/<metric>``; EvalError if absent."""
        parts = key.split("/")
        if len(parts) != 3:
            raise EvalError(f"metric key {key!r}: expected <set>/<setting or all>/<metric>")
        value = _get(self.means(), model, *parts)
        if value is None:
            raise EvalError(f"metric {key!r} was not computed for model {model!r}")
        return value

    def info(self) -> dict[str, Any]:
        """The JSON fields that say what the numbers are."""
        return {
            "crop_border": self.crop_border,
            "random_backbones": self.random_backbones,
            "random_metrics": sorted(k for k, v in self.random.items() if v),
            "metric_labels": dict(self.labels),
            "distance_sign": "PSNR/SSIM: baseline - ours; LPIPS/DISTS: ours - baseline; "
            "lower is better",
            "restored_as": "uint8 (pipeline.inference.restore), compared as k/255",
            "sets": list(self.sets),
            "settings": list(self.settings),
            "models": {
                m.name: {
                    "kind": m.kind,
                    "path": str(m.path),
                    "setting": setting_key(*m.setting) if m.setting else None,
                }
                for m in self.models
            },
        }


def _get(means: Mapping, model: str, set_name: str, setting: str, metric: str) -> float | None:
    return means.get(model, {}).get(set_name, {}).get(setting, {}).get(metric)


def evaluate_models(
    models: Sequence[ModelSpec],
    eval_root: str | os.PathLike[str],
    params: Params,
    *,
    loaded: Mapping[str, torch.nn.Module] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate every model on every set of ``params.evaluate`` (one :class:`MetricSuite`).

    ``loaded`` maps a model name to an already built generator (the sweep's trials and tests
    pass one; otherwise the checkpoint at ``spec.path`` is loaded).
    """
    from pipeline.inference import resolve_device

    ev = params.evaluate
    if not models:
        raise EvalError("no models to evaluate")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvalError(f"model names must be unique (got {names})")
    sets = list(ev.sets or params.evalsets.sets)
    settings = [tuple(map(float, s)) for s in (ev.settings or params.evalsets.settings)]
    device = resolve_device(ev.device)
    kinds = {m.kind for m in models}
    metric_names = {"mse": tuple(ev.mse_metrics), "gan": tuple(ev.gan_metrics)}
    suite = MetricSuite(
        [n for k in ("mse", "gan") if k in kinds for n in metric_names[k]],
        crop_border=ev.crop_border,
        pretrained=params.base.pretrained,
        weights_dir=params.base.weights_dir,
        device=device if ev.metrics_on_device else "cpu",
    )
    eval_sets = [load_eval_set(eval_root, s, settings, max_images=ev.max_images) for s in sets]
    start = time.perf_counter()
    rows: list[ScoreRow] = []
    meta: dict[str, dict[str, Any]] = {}
    total = sum(
        len(es.images) * (1 if m.is_baseline else len(settings)) for m in models for es in eval_sets
    )
    with _progress(progress, total) as tick:
        for spec in models:
            model_settings = [spec.setting] if spec.is_baseline else settings
            if loaded is not None and spec.name in loaded:
                model, meta[spec.name] = loaded[spec.name], {}
            else:
                model, meta[spec.name] = _load_generator(spec)
            for es in eval_sets:
                log.info(
                    "evaluating %s on %s (%d images x %d settings)",
                    spec.name,
                    es.name,
                    len(es.images),
                    len(model_settings),
                )
                rows += evaluate_images(
                    model,
                    spec.name,
                    spec.kind,
                    es,
                    model_settings,
                    suite,  # type: ignore[arg-type]
                    blur_max=params.degradation.blur_max,
                    noise_max=params.degradation.noise_max,
                    device=device,
                    tile=ev.tile,
                    tile_overlap=ev.tile_overlap,
                    metric_names=metric_names[spec.kind],
                    on_image=tick,
                )
    return EvalReport(
        rows=rows,
        models=list(models),
        sets=sets,
        settings=[setting_key(*s) for s in settings],
        metrics=metric_names,
        labels=dict(suite.labels),
        random=dict(suite.random),
        crop_border=ev.crop_border,
        model_meta=meta,
        seconds=time.perf_counter() - start,
    )


class _progress:
    """A rich progress bar over images (a no-op when disabled); yields a tick function."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self._bar = enabled, total, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task("evaluating", total=self.total)
        return lambda: self._bar.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# the whole stage


def run_evaluation(
    models: Sequence[ModelSpec],
    eval_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: Params,
    *,
    tracking_uri: str | None = None,
    figures: bool = True,
    log_mlflow: bool = True,
    console: Any = None,
) -> tuple[EvalReport, dict[str, Path]]:
    """Evaluate, write metrics/plots (+ modulation figures), print the tables, log to MLflow
    (unless ``tracking.enabled`` is false; the store is ``tracking_uri``, else
    :func:`mlflow_uri`).

    The DVC stage calls this; the Prefect flow calls the same steps one task each.
    """
    from pipeline.eval_report import log_report_to_mlflow, print_report, write_report

    ev = params.evaluate
    specs = with_baselines(models, params)
    report = evaluate_models(specs, eval_root, params)
    paths = write_report(report, out_dir)
    from pipeline.figures import make_figures, write_placeholders

    extra: list[Path] = []
    if figures and ev.figures.enabled:
        extra = make_figures(
            [m for m in specs if not m.is_baseline], eval_root, Path(out_dir), params
        )
    else:
        write_placeholders(out_dir)
    print_report(report, console)
    if log_mlflow and params.tracking.enabled:
        log_report_to_mlflow(
            report,
            paths,
            tracking_uri=tracking_uri or mlflow_uri(params),
            extra_artifacts=extra,
            experiment=ev.mlflow_experiment,
            artifact_location=params.tracking.artifact_location,
        )
    return report, paths


def mlflow_uri(params: Params) -> str:
    """The tracking store the training stages use ($MLFLOW_TRACKING_URI, else
    ``tracking.uri`` made absolute): evaluation logs next to the runs it evaluates."""
    from pipeline.tracking import resolve_tracking_uri

    return resolve_tracking_uri(params.tracking)
