"""Which models an evaluation scores, and how each is loaded with its own z scale.

A model is named by a :class:`ModelSpec` (the CLI form ``NAME:KIND:PATH``). Fixed-degradation
baselines (the paper's Unet / UGAN, one checkpoint per setting) are found by directory name
(:func:`discover_baselines`). Every model is driven with the z scale its checkpoint records
(``generator.json`` ``condition_scale``, :func:`pipeline.checkpoint.load_checkpoint`), never with
``params.degradation``: a model trained under another profile must see the z it was trained on.
A model handed in already built (tests, the sweep's trials) comes with its scale too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.checkpoint import LoadedGenerator, load_checkpoint
from pipeline.condition import ConditionScale
from pipeline.condition import parse_setting_key as _parse_setting_key
from pipeline.config import Params
from pipeline.evaluation.terms import EvalError, Kind

__all__ = [
    "DEFAULT_MODEL_SPECS",
    "ModelSpec",
    "Prebuilt",
    "discover_baselines",
    "load_model",
    "parse_model_spec",
    "parse_setting_key",
    "with_baselines",
]

#: The models the ``evaluate`` stage and flow evaluate by default (the training stages' outputs).
DEFAULT_MODEL_SPECS = (
    "cunet:mse:runs/train_cunet/model",
    "cugan:gan:runs/train_cugan/model",
)

#: A model built already, with the z scale it was trained with.
Prebuilt = LoadedGenerator | tuple[nn.Module, ConditionScale]


def parse_setting_key(key: str) -> tuple[float, float]:
    """``"blur2_noise30"`` -> ``(2.0, 30.0)`` (:func:`pipeline.condition.parse_setting_key`);
    EvalError for anything else, so that the stage reports it as bad input."""
    try:
        return _parse_setting_key(key)
    except ValueError as err:
        raise EvalError(str(err)) from None


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
                ModelSpec(name=f"{name}-{sub.name}", kind=kind, path=ckpt, setting=setting)
            )
    return specs


def with_baselines(models: Sequence[ModelSpec], params: Params) -> list[ModelSpec]:
    """``models`` plus the baselines found under ``evaluate.baselines_{mse,gan}``."""
    ev = params.evaluate
    specs = list(models)
    for kind, directory in (("mse", ev.baselines_mse), ("gan", ev.baselines_gan)):
        specs += discover_baselines(directory, kind)  # type: ignore[arg-type]
    return specs


def load_model(spec: ModelSpec, loaded: Mapping[str, Prebuilt] | None = None) -> LoadedGenerator:
    """The generator of ``spec`` with its metadata and z scale: ``loaded[spec.name]`` where given
    (a :class:`~pipeline.checkpoint.LoadedGenerator`, or ``(model, ConditionScale)``), else the
    checkpoint at ``spec.path``."""
    if loaded is not None and spec.name in loaded:
        given = loaded[spec.name]
        if isinstance(given, LoadedGenerator):
            return given
        if (
            isinstance(given, tuple)
            and len(given) == 2
            and isinstance(given[0], nn.Module)
            and isinstance(given[1], ConditionScale)
        ):
            return LoadedGenerator(given[0], {}, given[1], spec.path)  # type: ignore[arg-type]
        raise EvalError(
            f"model {spec.name}: a prebuilt model is a LoadedGenerator or (model, ConditionScale)"
            f" (got {type(given).__name__})"
        )
    if not spec.path.exists():
        raise EvalError(f"model {spec.name}: checkpoint {spec.path} not found")
    return load_checkpoint(spec.path)
