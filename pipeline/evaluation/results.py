"""What an evaluation produced: per-image scores (:class:`ScoreRow`), the report that holds them
(:class:`EvalReport`), and its aggregates as a :class:`MetricTable` keyed
model -> set -> setting -> metric.

Aggregates (paper section 4.2, method doc):

* **means**: per (method, set, setting) the mean over images, and per (method, set) the
  setting ``"all"``: the mean over that method's settings of the per-setting means. Methods are
  the models, the fixed baselines and the references (the degraded ``input``, BM3D, folders).
* **distances** of the models to the fixed-degradation baselines (Unet / UGAN) where a baseline
  checkpoint exists for a setting, signed so that lower is better for every metric:
  ``baseline - ours`` for PSNR/SSIM (higher is better) and ``ours - baseline`` for LPIPS/DISTS.
  References have none: they are not "ours".
* **the paper comparison**: the published numbers (:mod:`pipeline.paper`) beside ours
  (``ours_<model>``, ``ours_<baseline row>``) and the references (``ref_<name>``), filled in
  only for the set the paper used (CBSD68 for Table 2, LIVE1 for Table 1).

Metric keys: ``<set>/<setting>/<metric>`` with the setting named ``blur{r:g}_noise{sigma:g}``
(e.g. ``holdout/blur2_noise30/psnr_rgb``); ``<set>/all/<metric>`` is the mean over settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from pipeline.condition import ConditionScale, setting_key
from pipeline.evaluation.specs import ModelSpec, ReferenceSpec
from pipeline.evaluation.terms import HIGHER_IS_BETTER, EvalError, RowKind
from pipeline.paper import PAPER_TABLES, PaperTable

__all__ = ["ALL_SETTINGS", "EvalReport", "MetricTable", "ScoreRow", "TableRow"]

#: The setting name of the mean over a model's settings.
ALL_SETTINGS = "all"


@dataclass(frozen=True)
class ScoreRow:
    """The scores of one method (``model``: its name) on one image of one setting; ``kind`` is
    the model's kind, or ``"reference"``."""

    model: str
    kind: RowKind
    set: str
    setting: str
    image: str
    scores: dict[str, float]


@dataclass(frozen=True)
class TableRow:
    """One (model, set, setting) of a :class:`MetricTable` with its metric values."""

    model: str
    set: str
    setting: str
    scores: Mapping[str, float]

    @property
    def label(self) -> str:
        """``model/set/setting``: the bar label of the DVC plots."""
        return f"{self.model}/{self.set}/{self.setting}"


class MetricTable:
    """Numbers keyed model -> set -> setting -> metric, read-only, in insertion order.

    The one shape of evaluation aggregates (means, distances): the files, the printed tables,
    the paper comparison, MLflow and the promotion rule all read it through these accessors.
    """

    __slots__ = ("_data",)

    def __init__(self, cells: Iterable[tuple[str, str, str, str, float]] = ()) -> None:
        data: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for model, set_name, setting, metric, value in cells:
            data.setdefault(model, {}).setdefault(set_name, {}).setdefault(setting, {})[metric] = (
                float(value)
            )
        self._data = data

    @classmethod
    def from_nested(cls, nested: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]):
        """From ``{model: {set: {setting: {metric: value}}}}`` (e.g. a metrics.json section)."""
        return cls(
            (m, s, st, k, v)
            for m, per_set in nested.items()
            for s, per_setting in per_set.items()
            for st, scores in per_setting.items()
            for k, v in scores.items()
        )

    # -- accessors -----------------------------------------------------------------------------

    def get(self, model: str, set_name: str, setting: str, metric: str) -> float | None:
        """One value, or None where it was not computed."""
        return self._data.get(model, {}).get(set_name, {}).get(setting, {}).get(metric)

    def scores(self, model: str, set_name: str, setting: str) -> Mapping[str, float]:
        """``{metric: value}`` of one (model, set, setting); empty where there is none."""
        return MappingProxyType(self._data.get(model, {}).get(set_name, {}).get(setting, {}))

    def models(self) -> tuple[str, ...]:
        return tuple(self._data)

    def sets(self, model: str) -> tuple[str, ...]:
        return tuple(self._data.get(model, {}))

    def settings(self, model: str, set_name: str) -> tuple[str, ...]:
        return tuple(self._data.get(model, {}).get(set_name, {}))

    def rows(self, models: Iterable[str] | None = None) -> Iterator[TableRow]:
        """Every (model, set, setting) with its values (of ``models`` only, where given)."""
        for m in self._data if models is None else models:
            for s, per_setting in self._data.get(m, {}).items():
                for st, scores in per_setting.items():
                    yield TableRow(m, s, st, MappingProxyType(scores))

    def cells(self) -> Iterator[tuple[str, str, str, str, float]]:
        for row in self.rows():
            for k, v in row.scores.items():
                yield row.model, row.set, row.setting, k, v

    def flat(self, model: str) -> dict[str, float]:
        """``{"<set>/<setting>/<metric>": value}`` of one model (its metric keys)."""
        return {
            f"{r.set}/{r.setting}/{k}": v for r in self.rows([model]) for k, v in r.scores.items()
        }

    def to_dict(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """A plain nested copy (the JSON form)."""
        return {
            m: {s: {st: dict(v) for st, v in per.items()} for s, per in per_set.items()}
            for m, per_set in self._data.items()
        }

    def __bool__(self) -> bool:
        return bool(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetricTable) and self._data == other._data

    __hash__ = None  # type: ignore[assignment]  # equal by content, which is not frozen in hash

    def __repr__(self) -> str:
        return f"MetricTable({self.to_dict()!r})"


@dataclass(frozen=True)
class EvalReport:
    """Everything one evaluation produced, in plain data (written, printed and logged as is).

    ``models`` are the checkpoints (models and fixed baselines), ``references`` the reference
    methods; ``scales`` records the z scale each model was driven with (its checkpoint's);
    ``size_mode`` how the images were sized (``pad`` | ``crop16``); ``method_seconds`` the
    wall time each method took (restoring and scoring).
    """

    rows: list[ScoreRow]
    models: list[ModelSpec]
    sets: list[str]
    settings: list[str]
    metrics: dict[RowKind, tuple[str, ...]]
    labels: dict[str, str]
    random: dict[str, bool]
    crop_border: int
    model_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    scales: dict[str, ConditionScale] = field(default_factory=dict)
    seconds: float = 0.0
    references: list[ReferenceSpec] = field(default_factory=list)
    size_mode: str = "pad"
    method_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def random_backbones(self) -> bool:
        return any(self.random.values())

    @property
    def reference_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.references)

    # -- aggregates ---------------------------------------------------------------------------

    def means(self) -> MetricTable:
        """Mean over images per (model, set, setting), settings in the report's order, plus the
        setting ``"all"`` (mean over that model's settings of the per-setting means)."""
        acc: dict[tuple[str, str, str], dict[str, list[float]]] = {}
        for r in self.rows:
            d = acc.setdefault((r.model, r.set, r.setting), {})
            for k, v in r.scores.items():
                d.setdefault(k, []).append(v)
        groups: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        for (m, s, st), d in acc.items():
            groups.setdefault((m, s), {})[st] = {k: float(np.mean(v)) for k, v in d.items()}
        cells: list[tuple[str, str, str, str, float]] = []
        for (m, s), per_setting in groups.items():
            for st in sorted(per_setting, key=self._order):
                cells += [(m, s, st, k, v) for k, v in per_setting[st].items()]
            for k in sorted({k for v in per_setting.values() for k in v}):
                mean = float(np.mean([v[k] for v in per_setting.values() if k in v]))
                cells.append((m, s, ALL_SETTINGS, k, mean))
        return MetricTable(cells)

    def _order(self, setting: str) -> int:
        return self.settings.index(setting) if setting in self.settings else len(self.settings)

    def distances(self) -> MetricTable:
        """Each modulation model's distance to the baseline of its kind for that setting:
        ``baseline - ours`` where higher is better, ``ours - baseline`` where lower is better;
        lower is better for every entry."""
        means = self.means()
        baselines = {
            (b.kind, setting_key(*b.setting)): b.name for b in self.models if b.setting is not None
        }
        cells = []
        for spec in self.models:
            if spec.is_baseline:
                continue
            for row in means.rows([spec.name]):
                base_name = baselines.get((spec.kind, row.setting))
                if base_name is None:
                    continue
                base = means.scores(base_name, row.set, row.setting)
                cells += [
                    (spec.name, row.set, row.setting, k, _distance(k, v, base[k]))
                    for k, v in row.scores.items()
                    if k in base
                ]
        return MetricTable(cells)

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
                if m.kind == table.kind and m.setting is not None
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
                    row[f"ours_{m.name}"] = means.get(m.name, table.dataset, key, table.metric)
                base = base_models.get(key)
                row[f"ours_{table.baseline_row}"] = (
                    means.get(base.name, table.dataset, key, table.metric) if base else None
                )
                for ref in self.references:
                    row[f"ref_{ref.name}"] = means.get(ref.name, table.dataset, key, table.metric)
                row["random_backbones"] = self.random.get(table.metric, False)
                rows.append(row)
        return rows

    def flat_metrics(self) -> dict[str, float]:
        """The checkpoints' numbers: ``{model}/{set}/{setting}/{metric}`` -> mean, and the
        distances under ``{model}/distance/{set}/{setting}/{metric}`` (the references' are
        :meth:`reference_metrics`)."""
        refs = set(self.reference_names)
        flat = {f"{m}/{s}/{st}/{k}": v for m, s, st, k, v in self.means().cells() if m not in refs}
        flat.update(
            {f"{m}/distance/{s}/{st}/{k}": v for m, s, st, k, v in self.distances().cells()}
        )
        return flat

    def reference_metrics(self) -> dict[str, float]:
        """The references' means: ``{reference}/{set}/{setting}/{metric}`` -> mean."""
        refs = set(self.reference_names)
        return {f"{m}/{s}/{st}/{k}": v for m, s, st, k, v in self.means().cells() if m in refs}

    def score(self, model: str, key: str) -> float:
        """One aggregate by its key ``<set>/<setting or all>/<metric>``; EvalError if absent."""
        parts = key.split("/")
        if len(parts) != 3:
            raise EvalError(f"metric key {key!r}: expected <set>/<setting or all>/<metric>")
        value = self.means().get(model, *parts)
        if value is None:
            raise EvalError(f"metric {key!r} was not computed for model {model!r}")
        return value

    def info(self) -> dict[str, Any]:
        """The JSON fields that say what the numbers are."""
        return {
            "size_mode": self.size_mode,
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
                    "uri": m.uri,
                    "setting": setting_key(*m.setting) if m.setting else None,
                    "condition_scale": (
                        self.scales[m.name].to_dict() if m.name in self.scales else None
                    ),
                }
                for m in self.models
            },
            "references": {
                r.name: {
                    "source": r.source,
                    "path": str(r.path) if r.path is not None else None,
                    "what": r.describe(),
                }
                for r in self.references
            },
        }


def _distance(metric: str, ours: float, baseline: float) -> float:
    return baseline - ours if HIGHER_IS_BETTER[metric] else ours - baseline
