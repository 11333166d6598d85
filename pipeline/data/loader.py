"""Training loader: shards -> random crops -> degradation -> ``Batch(degraded, clean, z)``.

Two backends behind one entry point, :func:`build_train_loader`, chosen by
``params.loader.backend``:

* ``dali`` (default, :mod:`pipeline.data.dali_pipeline`): ``fn.readers.webdataset`` over the
  shard indices, decode, crop/flip/rotate and the whole degradation (per-sample 21x21 Gaussian
  blur with replicate border, Gaussian noise, 8-bit quantisation) inside DALI. It runs on the
  GPU (mixed decoder + GPU operators) when the target device is CUDA and on the CPU otherwise.
* ``torch`` (:mod:`pipeline.data.torch_loader`): the same shards and augmentations in plain
  PyTorch ``DataLoader`` workers, degrading with :func:`pipeline.degradation.degrade` -- the
  reference the DALI path is tested against, and the fallback where DALI is unavailable.

Both yield the same number of batches per epoch on every rank (DDP steps in lock-step), give
each rank a disjoint part of the data, and save/restore their position with
``state_dict()`` / ``load_state_dict()`` (JSON-serialisable), so a resumed run continues where
the interrupted one stopped instead of restarting the epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from pipeline.config import Params

__all__ = [
    "Batch",
    "LoaderError",
    "ShardSet",
    "TrainLoader",
    "batches_per_epoch",
    "build_train_loader",
    "check_compatible",
    "position",
    "read_shard_set",
    "resolve_device",
    "shard_range",
]

log = logging.getLogger(__name__)

class LoaderError(ValueError):
    """A problem with the shards or the loader settings, as one line naming the cause."""


class Batch(NamedTuple):
    """One training batch: tensors on the loader's device.

    ``degraded`` and ``clean`` are ``[B, 3, crop, crop]`` float32 in [0, 1] (``degraded`` on the
    8-bit grid ``k/255``); ``z`` is ``[B, 2]`` float32 ``[blur / blur_max, noise / noise_max]``
    of the levels actually applied to each sample.
    """

    degraded: Tensor
    clean: Tensor
    z: Tensor


@runtime_checkable
class TrainLoader(Protocol):
    """What the trainer relies on, whichever backend is behind it.

    Iterating yields the remaining batches of the current epoch and then moves to the next
    epoch; breaking out of the loop keeps the position (the next ``iter`` continues).
    """

    batch_size: int

    @property
    def epoch(self) -> int: ...

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]:
        """The position after the last yielded batch; JSON-serialisable."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; call before iterating."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ShardSet:
    """The validated content of ``shards.json``: absolute tar/index paths and counts."""

    root: Path
    tars: tuple[Path, ...]
    indices: tuple[Path, ...]
    counts: tuple[int, ...]
    crop_size: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def read_shard_set(shards_dir: str | Path) -> ShardSet:
    """Read ``<shards_dir>/shards.json`` (checked by the shards stage's own reader).

    Raises :class:`pipeline.data.shards.ShardError` (one line) for a missing or bad manifest.
    """
    from pipeline.data.shards import read_shards_json

    root = Path(shards_dir).resolve()
    meta = read_shards_json(root)
    crop_size = meta.get("crop_size")
    if not isinstance(crop_size, int) or crop_size <= 0:
        raise LoaderError(f"{root}/shards.json: crop_size must be a positive integer "
                          f"(got {crop_size!r})")
    entries = meta["shards"]
    return ShardSet(
        root=root,
        tars=tuple(root / e["tar"] for e in entries),
        indices=tuple(root / e["index"] for e in entries),
        counts=tuple(int(e["count"]) for e in entries),
        crop_size=crop_size,
    )


def shard_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[begin, end)`` of the samples rank ``rank`` reads: DALI's contiguous split."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank can yield: the smallest rank's share, rounded down (DROP)."""
    # The smallest share of the contiguous split is always num_samples // world_size; this is
    # also what DALIGenericIterator reports as its length under LastBatchPolicy.DROP.
    return num_samples // world_size // batch_size


def position(epoch: int, batch: int, per_epoch: int) -> dict[str, int]:
    """The saved position; after an epoch's last batch that is the start of the next epoch
    (what both backends, DALI's restored iterator included, continue with)."""
    if batch >= per_epoch:
        return {"epoch": epoch + 1, "batch": 0}
    return {"epoch": epoch, "batch": batch}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; anything else as ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise LoaderError(f"device {device!r} is not a torch device") from None


def check_compatible(state: dict[str, Any], expected: dict[str, Any], backend: str) -> bool:
    """Whether a saved loader state can resume this loader exactly; logs why not."""
    if not isinstance(state, dict) or "epoch" not in state:
        raise LoaderError("loader state must be a dict from state_dict() (no 'epoch' key)")
    if state.get("backend") != backend:
        log.warning("loader state was saved by the %r backend, this is %r: restarting epoch %d "
                    "from its beginning", state.get("backend"), backend, state["epoch"])
        return False
    changed = [k for k, v in expected.items() if state.get(k) != v]
    if changed:
        log.warning("loader state differs in %s (saved %s, now %s): restarting epoch %d from "
                    "its beginning", ", ".join(changed), [state.get(k) for k in changed],
                    [expected[k] for k in changed], state["epoch"])
        return False
    return True


def build_train_loader(
    shards_dir: str | Path,
    params: Params,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TrainLoader:
    """The training loader for one rank, as ``params.loader`` describes it.

    Args:
        shards_dir: directory with ``shards.json`` and its tar/index shards.
        params: validated parameters; reads ``loader`` and ``degradation``.
        rank, world_size: this process's place in DDP (``shard_id`` / ``num_shards``).
        seed: base seed; each rank derives its own streams from ``(seed, rank)``.
        device: where batches are delivered (``"cpu"``, ``"cuda:1"``, ``"auto"``). Under Ray
            pass ``ray.train.torch.get_device()``: Ray remaps CUDA_VISIBLE_DEVICES per worker.
            With ``loader.device: auto`` the DALI pipeline runs on this GPU when it is CUDA.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in [0, world_size={world_size})")
    if seed < 0:
        raise LoaderError(f"seed must be >= 0 (got {seed})")
    shards = read_shard_set(shards_dir)
    cfg = params.loader
    if cfg.crop > shards.crop_size:
        raise LoaderError(
            f"loader.crop {cfg.crop} is larger than the shards' sub-images ({shards.crop_size})"
        )
    if batches_per_epoch(shards.num_samples, world_size, cfg.batch_size) == 0:
        raise LoaderError(
            f"{shards.num_samples} samples over {world_size} ranks give fewer than "
            f"loader.batch_size={cfg.batch_size} per rank"
        )
    target = resolve_device(device)
    if cfg.backend == "dali":
        from pipeline.data.dali_pipeline import DaliTrainLoader

        return DaliTrainLoader(shards, params, rank=rank, world_size=world_size, seed=seed,
                               device=target)
    from pipeline.data.torch_loader import TorchTrainLoader

    return TorchTrainLoader(shards, params, rank=rank, world_size=world_size, seed=seed,
                            device=target)
