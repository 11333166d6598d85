"""Training checkpoints: everything a resumed run needs, as safetensors + JSON (never pickle).

A checkpoint directory holds::

    generator.safetensors + generator.json   G + C_G in pipeline.checkpoint's format, so
                                             `cugan restore --model <dir>` works on it
    discriminator.safetensors                D + C_D (GAN stages)
    train_state.safetensors                  every other tensor: optimiser moments, RNG states
    train_state.json                         the rest, with {"__tensor__": key} where a tensor
                                             was taken out (see tree_to_json)

``train_state.json`` records the iteration, the stage, the full params, the discriminator
config, both optimisers, the RNG states and loader positions of every rank, and the versions of
the software. The learning-rate "scheduler" is a pure function of the iteration
(:mod:`pipeline.train.schedules`), so its state is the schedule params plus the iteration.

Why a hand-written tensor/JSON split: optimiser and RNG states are nested dicts/lists with int
keys and tensors inside; ``torch.save`` would pickle them, and safetensors stores only flat
``{name: tensor}``. :func:`tree_to_json` / :func:`tree_from_json` flatten one into the other and
back, exactly (int keys, tuples and tensor dtypes survive).
"""

from __future__ import annotations

import dataclasses
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

from pipeline.atomic import atomic_write_json
from pipeline.checkpoint import save_generator
from pipeline.condition import ConditionScale

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "TrainState",
    "TrainStateError",
    "capture_rng",
    "load_train_state",
    "restore_rng",
    "save_train_state",
    "tree_from_json",
    "tree_to_json",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "cugan-train-state"
STATE_VERSION = 1
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
D_TENSORS = "discriminator.safetensors"

_TENSOR, _INTKEYS, _TUPLE = "__tensor__", "__intkeys__", "__tuple__"


class TrainStateError(ValueError):
    """A training checkpoint that cannot be written or read back (one-line message)."""


def tree_to_json(tree: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able copy of ``tree`` with each tensor moved into ``tensors`` under a path key.

    Dicts with int keys (optimiser ``state``) become ``{"__intkeys__": [[k, v], ...]}`` and
    tuples ``{"__tuple__": [...]}`` so that :func:`tree_from_json` rebuilds them as they were.
    """
    if isinstance(tree, Tensor):
        key = prefix
        if key in tensors:
            raise TrainStateError(f"duplicate tensor key {key!r}")
        tensors[key] = tree.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(tree, Mapping):
        if all(isinstance(k, str) for k in tree):
            if _TENSOR in tree or _INTKEYS in tree or _TUPLE in tree:
                raise TrainStateError(f"{prefix}: reserved key in state")
            return {k: tree_to_json(v, f"{prefix}/{k}", tensors) for k, v in tree.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in tree):
            return {
                _INTKEYS: [[k, tree_to_json(v, f"{prefix}/{k}", tensors)] for k, v in tree.items()]
            }
        raise TrainStateError(f"{prefix}: dict keys must be all str or all int")
    if isinstance(tree, tuple):
        return {_TUPLE: [tree_to_json(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [tree_to_json(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TrainStateError(f"{prefix}: cannot store a {type(tree).__name__} in a checkpoint")


def tree_from_json(tree: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`tree_to_json`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            try:
                return tensors[tree[_TENSOR]]
            except KeyError:
                raise TrainStateError(
                    f"tensor {tree[_TENSOR]!r} missing from {STATE_TENSORS}"
                ) from None
        if set(tree) == {_INTKEYS}:
            return {int(k): tree_from_json(v, tensors) for k, v in tree[_INTKEYS]}
        if set(tree) == {_TUPLE}:
            return tuple(tree_from_json(v, tensors) for v in tree[_TUPLE])
        return {k: tree_from_json(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_from_json(v, tensors) for v in tree]
    return tree


def _software() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in ("cugan-pipeline", "ray", "safetensors"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


@dataclass
class TrainState:
    """What :func:`load_train_state` returns; tensors are on the CPU."""

    iteration: int
    stage: str
    world_size: int
    generator: dict[str, Tensor]
    discriminator: dict[str, Tensor] | None
    optimizers: dict[str, dict[str, Any]]
    rng: list[dict[str, Any]]
    loaders: list[dict[str, Any] | None]
    document: dict[str, Any]


def save_train_state(
    out_dir: str | os.PathLike[str],
    *,
    iteration: int,
    stage: str,
    g: nn.Module,
    d: nn.Module | None,
    optimizers: Mapping[str, torch.optim.Optimizer],
    rng: list[dict[str, Any]],
    loaders: list[dict[str, Any] | None],
    config: dict[str, Any],
    metadata: dict[str, Any],
    scale: ConditionScale,
) -> Path:
    """Write a full training checkpoint into ``out_dir`` (see the module docstring).

    ``g`` and ``d`` are the plain modules (unwrap DDP first). ``rng`` and ``loaders`` hold one
    entry per rank. ``metadata`` goes into ``generator.json`` (and ``train_state.json``);
    ``scale`` is the run's z scale, recorded in ``generator.json`` for every later user.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_generator(out, g, metadata=metadata, scale=scale)
    tensors: dict[str, Tensor] = {}
    document: dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "iteration": int(iteration),
        "stage": stage,
        "world_size": len(rng),
        "metadata": metadata,
        "config": config,
        "optimizers": {
            name: tree_to_json(opt.state_dict(), f"optimizer/{name}", tensors)
            for name, opt in optimizers.items()
        },
        "rng": tree_to_json(rng, "rng", tensors),
        "loaders": loaders,
        "software": _software(),
    }
    if d is not None:
        document["discriminator"] = {"config": dataclasses.asdict(d.config)}
        d_tensors = {
            k: v.detach().to("cpu").contiguous().clone() for k, v in d.state_dict().items()
        }
        safetensors.torch.save_file(d_tensors, str(out / D_TENSORS))
    try:
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TrainStateError(f"training state is not plain JSON: {err}") from None
    safetensors.torch.save_file(tensors, str(out / STATE_TENSORS))
    atomic_write_json(out / STATE_JSON, document)
    return out


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise TrainStateError(f"{path}: not a readable safetensors file ({err})") from None


def load_train_state(ckpt_dir: str | os.PathLike[str]) -> TrainState:
    """Read a directory written by :func:`save_train_state` (tensors on the CPU)."""
    root = Path(ckpt_dir)
    doc_path = root / STATE_JSON
    try:
        document = json.loads(doc_path.read_text())
    except FileNotFoundError:
        raise TrainStateError(f"{root}: no {STATE_JSON} (not a training checkpoint)") from None
    except json.JSONDecodeError as err:
        raise TrainStateError(f"{doc_path}: not valid JSON ({err.msg})") from None
    if document.get("format") != STATE_FORMAT or document.get("version") != STATE_VERSION:
        raise TrainStateError(
            f"{doc_path}: format {document.get('format')!r} v{document.get('version')!r}, "
            f"expected {STATE_FORMAT!r} v{STATE_VERSION}"
        )
    tensors = _load_tensors(root / STATE_TENSORS)
    generator = _load_tensors(root / "generator.safetensors")
    discriminator = _load_tensors(root / D_TENSORS) if (root / D_TENSORS).is_file() else None
    return TrainState(
        iteration=int(document["iteration"]),
        stage=str(document["stage"]),
        world_size=int(document["world_size"]),
        generator=generator,
        discriminator=discriminator,
        optimizers={k: tree_from_json(v, tensors) for k, v in document["optimizers"].items()},
        rng=tree_from_json(document["rng"], tensors),
        loaders=list(document["loaders"]),
        document=document,
    )


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's global RNG states (torch CPU, and CUDA when training on a GPU)."""
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
