"""Which methods an evaluation scores: the models (checkpoints), the fixed-degradation baselines
found beside them, and the reference methods; and how a checkpoint is loaded with its z scale.

Three roles (:data:`~pipeline.evaluation.terms.Role`), one description each:

* a **model** -- ours, a modulation checkpoint -- is a :class:`ModelSpec` (the CLI form
  ``NAME:KIND:PATH``; PATH may be a registry URI ``models:/NAME/VERSION`` or
  ``models:/NAME@ALIAS``, resolved through :func:`pipeline.tracking.resolve_model_uri`);
* a **fixed** baseline (the paper's Unet / UGAN, one checkpoint per setting) is a
  :class:`ModelSpec` with ``setting``, found by directory name (:func:`discover_baselines`);
* a **reference** (:class:`ReferenceSpec`) is scored beside ours but is never "ours": ``input``
  (the degraded image itself; always), ``bm3d`` (CBM3D given the true sigma, on the noise-only
  settings) and ``folder:NAME:DIR`` (another method's outputs on disk).

How each restores an image is :mod:`pipeline.evaluation.methods`. Every model is driven with the
z scale its checkpoint records (``generator.json`` ``condition_scale``,
:func:`pipeline.checkpoint.load_checkpoint`), never with ``params.degradation``: a model trained
under another profile must see the z it was trained on. A model handed in already built (tests,
the sweep's trials) comes with its scale too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from pipeline.checkpoint import LoadedGenerator, load_checkpoint
from pipeline.condition import ConditionScale
from pipeline.condition import parse_setting_key as _parse_setting_key
from pipeline.config import Params
from pipeline.errors import one_line
from pipeline.evaluation.terms import EvalError, Kind, Role
from pipeline.tracking import RegistryError, is_model_uri, resolve_model_uri

__all__ = [
    "DEFAULT_MODEL_SPECS",
    "INPUT",
    "MethodSpec",
    "ModelSpec",
    "Prebuilt",
    "ReferenceSpec",
    "discover_baselines",
    "load_model",
    "parse_model_spec",
    "parse_reference",
    "parse_setting_key",
    "reference_specs",
    "resolve_registry_models",
    "with_baselines",
]

#: The models the ``evaluate`` stage and flow evaluate by default (the training stages' outputs).
DEFAULT_MODEL_SPECS = (
    "cunet:mse:runs/train_cunet/model",
    "cugan:gan:runs/train_cugan/model",
)

#: A model built already, with the z scale it was trained with.
Prebuilt = LoadedGenerator | tuple[nn.Module, ConditionScale]

Setting = tuple[float, float]


def parse_setting_key(key: str) -> tuple[float, float]:
    """``"blur2_noise30"`` -> ``(2.0, 30.0)`` (:func:`pipeline.condition.parse_setting_key`);
    EvalError for anything else, so that the stage reports it as bad input."""
    try:
        return _parse_setting_key(key)
    except ValueError as err:
        raise EvalError(str(err)) from None


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint to evaluate: ``name`` (used in metric keys), its kind, and its checkpoint.

    ``setting`` is set for a fixed-degradation baseline (Unet / UGAN), which is evaluated on
    that one setting only. ``mlflow_run_id`` is where its metrics are logged (None: look for the
    run the training stage recorded, else open a new one). ``uri`` is the registry URI the
    checkpoint came from (``path`` is then the local copy once resolved).
    """

    name: str
    kind: Kind
    path: Path
    setting: tuple[float, float] | None = None
    mlflow_run_id: str | None = None
    uri: str | None = None

    @property
    def is_baseline(self) -> bool:
        return self.setting is not None

    @property
    def role(self) -> Role:
        return "fixed" if self.setting is not None else "model"

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """The kinds whose metrics score it: its own."""
        return (self.kind,)

    def applies_to(self, setting: Setting) -> bool:
        """A fixed baseline restores its own setting only; a modulation model every one."""
        return self.setting is None or tuple(self.setting) == tuple(setting)


#: The name of the degraded-input reference, present in every evaluation.
INPUT = "input"

ReferenceSource = Literal["input", "bm3d", "folder"]


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference method: ``input`` (the degraded image), ``bm3d`` (CBM3D with the true sigma)
    or ``folder`` (restored outputs under ``path/<set>/<setting>/<image>``).

    References are scored with the metrics of every model kind in the evaluation, so that they
    sit in the MSE and in the GAN tables; they have no distance and are never "ours".
    """

    name: str
    source: ReferenceSource
    path: Path | None = None

    @property
    def role(self) -> Role:
        return "reference"

    def applies_to(self, setting: Setting) -> bool:
        """BM3D denoises: it is scored on the noise-only settings (blur 0, noise > 0)."""
        if self.source == "bm3d":
            return float(setting[0]) == 0.0 and float(setting[1]) > 0.0
        return True

    def describe(self) -> str:
        return {
            "input": "the degraded input itself",
            "bm3d": "CBM3D (bm3d.bm3d_rgb) given the true noise sigma, noise-only settings",
            "folder": f"restored images under {self.path}/<set>/<setting>/",
        }[self.source]


#: What scoring, output and figures iterate over: every method of an evaluation.
MethodSpec = ModelSpec | ReferenceSpec

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_model_spec(spec: str) -> ModelSpec:
    """``"cunet:mse:runs/train_cunet/model"`` -> ModelSpec (the CLI form of stages and flows);
    ``"cunet:mse:models:/cunet@champion"`` names a registered version (resolved before loading,
    :func:`resolve_registry_models`)."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[1] not in ("mse", "gan") or not _NAME_RE.match(parts[0]):
        raise EvalError(
            f"model spec {spec!r}: expected NAME:KIND:PATH with KIND mse or gan "
            "(e.g. cunet:mse:runs/train_cunet/model or cunet:mse:models:/cunet@champion)"
        )
    uri = parts[2] if is_model_uri(parts[2]) else None
    kind: Kind = "mse" if parts[1] == "mse" else "gan"
    return ModelSpec(name=parts[0], kind=kind, path=Path(parts[2]), uri=uri)


def parse_reference(text: str) -> ReferenceSpec:
    """``"input"``, ``"bm3d"`` or ``"folder:NAME:DIR"`` (``evaluate.references``)."""
    if text in ("input", "bm3d"):
        return ReferenceSpec(name=text, source=text)  # type: ignore[arg-type]
    parts = text.split(":", 2)
    if len(parts) == 3 and parts[0] == "folder" and _NAME_RE.match(parts[1]) and parts[2]:
        return ReferenceSpec(name=parts[1], source="folder", path=Path(parts[2]))
    raise EvalError(f"reference {text!r}: expected input, bm3d or folder:NAME:DIR")


def reference_specs(params: Params) -> list[ReferenceSpec]:
    """The degraded input (always, first), then ``evaluate.references`` in their order."""
    refs = [ReferenceSpec(INPUT, "input")]
    for text in params.evaluate.references:
        ref = parse_reference(text)
        if ref.name != INPUT:
            refs.append(ref)
    return refs


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


def resolve_registry_models(
    specs: Sequence[ModelSpec], tracking_uri: str | None, dst_root: str | os.PathLike[str]
) -> list[ModelSpec]:
    """Each spec naming a registry URI with ``path`` set to its local checkpoint, downloaded
    under ``dst_root/<name>`` (the generator of the spec's kind where the version holds two);
    the others as they are. A missing model, version or alias is one EvalError line."""
    out = []
    for spec in specs:
        if spec.uri is None:
            out.append(spec)
            continue
        if tracking_uri is None:
            raise EvalError(f"model {spec.name}: {spec.uri} needs an MLflow tracking URI")
        try:
            local = resolve_model_uri(
                spec.uri, tracking_uri, Path(dst_root) / spec.name, prefer=spec.kind
            )
        except RegistryError as err:
            raise EvalError(f"model {spec.name}: {one_line(err)}") from None
        out.append(dataclasses.replace(spec, path=local))
    return out


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
    if spec.uri is not None and Path(spec.uri) == spec.path:
        raise EvalError(f"model {spec.name}: {spec.uri} was not resolved to a local checkpoint")
    if not spec.path.exists():
        raise EvalError(f"model {spec.name}: checkpoint {spec.path} not found")
    return load_checkpoint(spec.path)
