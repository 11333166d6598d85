"""The training-loader contract: what every backend yields, reads and saves.

This module sits BELOW the backends. :mod:`pipeline.data.dali_pipeline`,
:mod:`pipeline.data.torch_loader` and :mod:`pipeline.train.tensors` implement
:class:`TrainLoader` with the pieces defined here, and :mod:`pipeline.data.loader` only picks
one of them; nothing here imports a backend (the contract used to live in ``loader.py``, which
the backends imported back -- an import circle).

* :class:`Batch` -- ``(degraded, clean, z)``, the one thing the trainer consumes.
* :class:`TrainLoader` -- the protocol: epochs, ``len``, iteration, a JSON-serialisable position.
* :class:`ShardSet` / :func:`read_shard_set` -- the validated ``shards.json`` as absolute paths.
* :func:`shard_range`, :func:`batches_per_epoch` -- how samples are split over DDP ranks, so that
  every rank yields the same number of batches (DDP steps in lock-step).
* :func:`position`, :func:`check_compatible` -- the saved position and whether a saved state
  fits the loader it is handed to (resume continues where the interrupted run stopped).
* :class:`LoaderError` -- the one error type of the loaders (one line naming the cause).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from pipeline.config import ShardVerification
from pipeline.data.shards import SAMPLE_EXT, read_shards_json

__all__ = [
    "Batch",
    "LoaderError",
    "ShardSet",
    "TrainLoader",
    "batches_per_epoch",
    "check_compatible",
    "position",
    "read_shard_set",
    "shard_range",
]

log = logging.getLogger(__name__)


class LoaderError(ValueError):
    """A problem with the shards or the loader settings, as one line naming the cause."""


class Batch(NamedTuple):
    """One training batch: tensors on the loader's device.

    ``degraded`` and ``clean`` are ``[B, 3, crop, crop]`` float32 in [0, 1] (``degraded`` on the
    8-bit grid ``k/255``); ``z`` is ``[B, 2]`` float32 ``[blur / blur_max, noise / noise_max]``
    of the levels actually applied to each sample (:class:`pipeline.condition.ConditionScale`).
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
    """The validated content of ``shards.json``: absolute tar/index paths and counts.

    ``encoding`` is how a sample is stored (:mod:`pipeline.data.shards`): ``raw`` -- uint8
    ``crop_size x crop_size x 3`` pixels, member extension :attr:`ext` ``rgb`` -- or ``png``.
    """

    root: Path
    tars: tuple[Path, ...]
    indices: tuple[Path, ...]
    counts: tuple[int, ...]
    crop_size: int
    encoding: str = "png"

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def ext(self) -> str:
        """The tar member extension of a sample (the webdataset reader's ``ext``)."""
        return SAMPLE_EXT[self.encoding]

    @property
    def raw_shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)`` of a ``raw`` sample."""
        return (self.crop_size, self.crop_size, 3)


def read_shard_set(shards_dir: str | Path, *, verify: ShardVerification = "size") -> ShardSet:
    """Read ``<shards_dir>/shards.json`` (checked by the shards stage's own reader) and check
    the files against it: their sizes always (a stat per file), their sha256 with
    ``verify="sha256"`` (``loader.verify_shards``; reads every byte once).

    Raises :class:`pipeline.data.shards.ShardError` (one line) for a missing or bad manifest,
    an old manifest without sizes and sha256, or a shard file that differs from it (truncated,
    changed); :class:`LoaderError` for a crop size the loaders cannot use.
    """
    root = Path(shards_dir).resolve()
    meta = read_shards_json(root, verify=verify)
    crop_size = meta.get("crop_size")
    if not isinstance(crop_size, int) or crop_size <= 0:
        raise LoaderError(
            f"{root}/shards.json: crop_size must be a positive integer (got {crop_size!r})"
        )
    entries = meta["shards"]
    return ShardSet(
        root=root,
        tars=tuple(root / e["tar"] for e in entries),
        indices=tuple(root / e["index"] for e in entries),
        counts=tuple(int(e["count"]) for e in entries),
        crop_size=crop_size,
        encoding=meta.get("encoding", "png"),  # read_shards_json checked it
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


def check_compatible(state: dict[str, Any], expected: dict[str, Any], backend: str) -> bool:
    """Whether a saved loader state can resume this loader exactly; logs why not.

    A state from another backend, rank layout, seed or shard count keeps its epoch but restarts
    that epoch from its beginning (a warning says so): exactness is lost, the run goes on.
    """
    if not isinstance(state, dict) or "epoch" not in state:
        raise LoaderError("loader state must be a dict from state_dict() (no 'epoch' key)")
    if state.get("backend") != backend:
        log.warning(
            "loader state was saved by the %r backend, this is %r: restarting epoch %d "
            "from its beginning",
            state.get("backend"),
            backend,
            state["epoch"],
        )
        return False
    changed = [k for k, v in expected.items() if state.get(k) != v]
    if changed:
        log.warning(
            "loader state differs in %s (saved %s, now %s): restarting epoch %d from its beginning",
            ", ".join(changed),
            [state.get(k) for k in changed],
            [expected[k] for k in changed],
            state["epoch"],
        )
        return False
    return True
