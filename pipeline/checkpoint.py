"""Generator checkpoints: ``generator.safetensors`` + ``generator.json``, never a pickle.

Layout of ``out_dir``::

    generator.safetensors   the state dict of G + C_G (float tensors, CPU, contiguous)
    generator.json          {"format": "cugan-generator", "version": 1,
                             "config": {...GeneratorConfig...},
                             "condition_scale": {"blur_max": 4.0, "noise_max": 50.0},
                             "metadata": {...free-form...},
                             "software": {...}, "tensors_sha256": "<sha256 of the .safetensors>"}

``condition_scale`` is the z scale the model was trained with (:mod:`pipeline.condition`):
every caller that turns blur/noise levels into z for this model reads it from here, so a model
trained under a profile with other maxima is never driven with the method's default scale.
Checkpoints written before the key existed load with the method's scale (4, 50) and a note.

The same JSON document (without ``tensors_sha256``, which cannot hash its own file) is stored in
the safetensors header, so a ``.safetensors`` file copied on its own still loads. When both are
present the sidecar is authoritative and must describe that exact file (its hash), which
catches a pair mixed up by hand or torn by a crash between the two renames.

Writes are atomic per file (:mod:`pipeline.atomic`: temporary name in the same directory,
fsync, ``os.replace``); the tensors go first and the JSON last, so a crash in between leaves an
old JSON whose hash no longer matches -- an error on load, never a silent mix.
Loading validates format, version, config keys and values, and that the tensors match the
config exactly (names, shapes, floating dtypes); any problem is one :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from models.generator import Generator, GeneratorConfig
from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.condition import DEFAULT_SCALE, ConditionScale

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "JSON_NAME",
    "TENSORS_NAME",
    "CheckpointError",
    "LoadedGenerator",
    "describe_mismatch",
    "file_sha256",
    "load_checkpoint",
    "load_generator",
    "read_generator_document",
    "save_generator",
    "summarise_keys",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cugan-generator"
CHECKPOINT_VERSION = 1
TENSORS_NAME = "generator.safetensors"
JSON_NAME = "generator.json"
#: Key of the JSON document inside the safetensors header metadata.
HEADER_KEY = "cugan_generator"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded as asked (one-line message)."""


@dataclass(frozen=True)
class LoadedGenerator:
    """A loaded checkpoint: the generator (eval mode), its free-form metadata and its z scale."""

    model: Generator
    metadata: dict[str, Any]
    scale: ConditionScale
    path: Path


def summarise_keys(items: list[str], limit: int = 8) -> str:
    """``[a, b, ... 3 more]``: key lists short enough for a one-line error."""
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def describe_mismatch(**groups: list[str]) -> str:
    """One-line summary of state-dict problems, e.g. ``missing [a, b]; shape mismatch [c ...]``.

    Keyword names become the labels (underscores read as spaces); empty groups are left out, so
    an empty string means "no problem". Shared by checkpoint loading and the official importer
    so both report key mismatches the same way.
    """
    return "; ".join(
        f"{label.replace('_', ' ')} {summarise_keys(items)}"
        for label, items in groups.items()
        if items
    )


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _software() -> dict[str, str]:
    try:
        version = importlib_metadata.version("cugan-pipeline")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    return {"cugan-pipeline": version, "torch": torch.__version__.split("+")[0]}


def _unwrap(model: nn.Module) -> Generator:
    """The plain Generator behind a DDP / DataParallel or ``torch.compile`` wrapper."""
    seen = 0
    while not isinstance(model, Generator) and seen < 4:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    if not isinstance(model, Generator):
        raise CheckpointError(f"save_generator expects a Generator, got {type(model).__name__}")
    return model


def save_generator(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    *,
    metadata: dict[str, Any],
    scale: ConditionScale = DEFAULT_SCALE,
) -> Path:
    """Write ``out_dir/generator.safetensors`` and ``out_dir/generator.json``; returns ``out_dir``.

    ``metadata`` is free-form JSON (e.g. source, iteration, whether backbones were random).
    ``scale`` is the z scale the model was trained with (training passes
    ``ConditionScale.from_params(params.degradation)``; the authors' weights use the default).
    DDP / compiled wrappers are unwrapped: the plain module is what gets saved.
    """
    if not isinstance(scale, ConditionScale):
        raise CheckpointError(f"scale must be a ConditionScale (got {type(scale).__name__})")
    gen = _unwrap(model)
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata must be plain JSON: {exc}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": gen.config.to_dict(),
        "condition_scale": scale.to_dict(),
        "metadata": metadata,
        "software": _software(),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in gen.state_dict().items()}
    header = {HEADER_KEY: json.dumps(document, sort_keys=True)}

    data = safetensors.torch.save(tensors, metadata=header)
    atomic_write_bytes(out / TENSORS_NAME, data)
    sidecar = dict(document, tensors_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_text(out / JSON_NAME, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    logger.info("saved generator checkpoint to %s", out)
    return out


def _resolve_paths(path: Path) -> tuple[Path, Path | None]:
    """(tensors file, sidecar JSON or None) for a checkpoint directory or .safetensors file."""
    if path.is_dir():
        tensors = path / TENSORS_NAME
        if not tensors.is_file():
            raise CheckpointError(f"{path}: no {TENSORS_NAME} in this directory")
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: expected a checkpoint directory or a .safetensors file "
                "(for the authors' .pth use `cugan import-official`)"
            )
        tensors = path
    else:
        raise CheckpointError(f"{path}: no such checkpoint")
    sidecar = (
        tensors.with_name(JSON_NAME)
        if tensors.name == TENSORS_NAME
        else tensors.with_suffix(".json")
    )
    return tensors, sidecar if sidecar.is_file() else None


def _parse_json(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _validate_document(doc: Mapping[str, Any], where: str) -> GeneratorConfig:
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where}: format is {doc.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    version = doc.get("version")
    if isinstance(version, bool) or version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{where}: unsupported checkpoint version {version!r} "
            f"(this code reads version {CHECKPOINT_VERSION})"
        )
    missing = sorted({"config", "metadata"} - set(doc))
    if missing:
        raise CheckpointError(f"{where}: missing {missing}")
    config = doc["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: 'config' must be an object")
    if not isinstance(doc["metadata"], dict):
        raise CheckpointError(f"{where}: 'metadata' must be an object")
    fields = set(GeneratorConfig.__dataclass_fields__)
    unknown, absent = sorted(set(config) - fields), sorted(fields - set(config))
    if unknown or absent:
        raise CheckpointError(
            f"{where}: config keys differ from GeneratorConfig: unknown {unknown}, missing {absent}"
        )
    if "condition_scale" in doc:
        _condition_scale(doc, where)
    try:
        return GeneratorConfig(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid config: {exc}") from None


def _condition_scale(doc: Mapping[str, Any], where: str) -> ConditionScale:
    """The document's z scale; the method's default (with a note) where it predates the key."""
    if "condition_scale" not in doc:
        logger.warning(
            "%s: no condition_scale recorded (written before it was); using the method's %s",
            where,
            DEFAULT_SCALE.describe(),
        )
        return DEFAULT_SCALE
    try:
        return ConditionScale.from_dict(doc["condition_scale"])
    except ValueError as exc:
        raise CheckpointError(f"{where}: invalid condition_scale: {exc}") from None


def _read_header(tensors_path: Path) -> dict[str, str]:
    try:
        with safetensors.safe_open(str(tensors_path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensors_path}: not a readable safetensors file ({exc})") from None


def read_generator_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON document of a checkpoint (sidecar, else the header copy); no tensors."""
    tensors_path, sidecar = _resolve_paths(Path(path))
    if sidecar is not None:
        doc = _parse_json(sidecar.read_text(encoding="utf-8"), str(sidecar))
        _validate_document(doc, str(sidecar))
        expected = doc.get("tensors_sha256")
        if not isinstance(expected, str):
            raise CheckpointError(f"{sidecar}: missing 'tensors_sha256'")
        if file_sha256(tensors_path) != expected:
            raise CheckpointError(
                f"{sidecar} does not describe {tensors_path.name} (sha256 differs): the pair was "
                "mixed up or a write was interrupted"
            )
        return doc
    header = _read_header(tensors_path)
    if HEADER_KEY not in header:
        raise CheckpointError(
            f"{tensors_path}: no {JSON_NAME} beside it and no CUGAN header: not a CUGAN generator "
            "checkpoint (for the authors' .pth use `cugan import-official`)"
        )
    doc = _parse_json(header[HEADER_KEY], f"{tensors_path} header")
    _validate_document(doc, f"{tensors_path} header")
    logger.warning(
        "%s: no %s beside it; using the copy in the safetensors header", tensors_path, JSON_NAME
    )
    return doc


def _check_tensors(tensors: Mapping[str, Tensor], model: Generator, where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} {list(tensors[k].shape)} != {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    not_float = sorted(k for k, v in tensors.items() if k in expected and not v.is_floating_point())
    problems = describe_mismatch(
        missing=missing, unexpected=unexpected, shape_mismatch=wrong, not_floating_point=not_float
    )
    if problems:
        raise CheckpointError(f"{where}: tensors do not match the config: {problems}")


def load_generator(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[Generator, dict[str, Any]]:
    """Load a checkpoint directory (or its .safetensors file) -> (Generator in eval mode, metadata).

    The returned dict is the free-form ``metadata`` given to :func:`save_generator`; the config
    is ``model.config``. Never unpickles anything. :func:`load_checkpoint` also gives the z scale.
    """
    loaded = load_checkpoint(path, map_location)
    return loaded.model, loaded.metadata


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> LoadedGenerator:
    """Load a checkpoint directory (or its .safetensors file) with its metadata and z scale."""
    path = Path(path)
    doc = read_generator_document(path)
    cfg = _validate_document(doc, str(path))
    scale = _condition_scale(doc, str(path))
    tensors_path, _ = _resolve_paths(path)
    try:
        tensors = safetensors.torch.load_file(str(tensors_path), device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensors_path}: not a readable safetensors file ({exc})") from None
    model = Generator(cfg, device="meta")
    _check_tensors(tensors, model, str(tensors_path))
    target_dtype = next(iter(model.state_dict().values())).dtype
    tensors = {k: v.to(target_dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return LoadedGenerator(model.to(map_location).eval(), dict(doc["metadata"]), scale, path)
