"""Pure-PyTorch training loader: the fallback for the DALI pipeline and its oracle.

It reads the same shards, draws the same kinds of crops/flips/transposes, and degrades with the
reference :func:`pipeline.degradation.degrade` / :func:`~pipeline.degradation.sample_levels`.

Why the index files instead of the webdataset library's streaming reader: the wds2idx index
gives every sample's byte range, so this loader has random access. That buys an exact global
shuffle per epoch (not a shuffle buffer) shared by all ranks, which then take disjoint
contiguous slices of it (DistributedSampler semantics), and O(1) resume: the position is just
``(epoch, batch)``. A streaming reader could only resume by re-reading the epoch.

Determinism: batch ``b`` of epoch ``e`` on rank ``r`` uses only a generator seeded from
``(seed, r, e, b)`` for its crops, flips, levels and noise, so results do not depend on the
number of DataLoader workers or on where the run was resumed.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.condition import ConditionScale
from pipeline.config import DegradationParams, Params
from pipeline.data.batch import (
    Batch,
    LoaderError,
    ShardSet,
    batches_per_epoch,
    check_compatible,
    position,
    shard_range,
)
from pipeline.degradation import degrade, sample_levels
from pipeline.errors import one_line

__all__ = [
    "SampleTable",
    "TorchTrainLoader",
    "batch_generator",
    "decode_rgb",
    "epoch_order",
    "random_patch",
    "read_index",
    "read_sample_table",
]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")  # the default target device (a torch.device is immutable)


@dataclass(frozen=True)
class SampleTable:
    """Where each sample's PNG lies: tar path index, byte offset, byte size, key."""

    tars: tuple[str, ...]
    tar_of: np.ndarray  # [N] int32
    offset: np.ndarray  # [N] int64
    size: np.ndarray  # [N] int64
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int, files: dict[int, int]) -> bytes:
        """The PNG bytes of sample ``i``; ``files`` caches open descriptors per tar."""
        t = int(self.tar_of[i])
        fd = files.get(t)
        if fd is None:
            fd = files[t] = os.open(self.tars[t], os.O_RDONLY)
        data = os.pread(fd, int(self.size[i]), int(self.offset[i]))
        if len(data) != int(self.size[i]):
            raise LoaderError(
                f"{self.tars[t]}: truncated at sample {self.keys[i]!r} (changed after the "
                "shards stage: re-run it)"
            )
        return data

    def read_rgb(self, i: int, files: dict[int, int]) -> torch.Tensor:
        """Sample ``i`` decoded (:func:`decode_rgb`); bytes that are no PNG -- a shard changed
        after the shards stage, its size intact -- are one LoaderError line naming the tar."""
        data = self.read(i, files)
        try:
            return decode_rgb(data)
        except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for broken data
            raise LoaderError(
                f"{self.tars[int(self.tar_of[i])]}: sample {self.keys[i]!r} is not a readable "
                f"PNG ({one_line(err)}); changed after the shards stage: re-run it"
            ) from None


def read_index(path: str | Path, ext: str = "png") -> list[tuple[int, int, str]]:
    """``(offset, size, member name)`` of the ``ext`` component of each sample in a wds2idx file.

    Raises :class:`LoaderError` for a sample without that component (the DALI reader runs
    with ``missing_component_behavior="error"`` too).
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines:
        raise LoaderError(f"{path}: empty index")
    header = lines[0].split()
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2"):
        raise LoaderError(f"{path}: not a wds2idx index (header {lines[0][:40]!r})")
    width = 4 if header[0] == "v1.2" else 3  # v1.2 adds the member name to each component
    entries = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % width:
            raise LoaderError(f"{path}:{line_no}: malformed index line")
        found = None
        for c in range(0, len(fields), width):
            if fields[c] == ext:
                name = fields[c + 3] if width == 4 else f"{line_no - 2}.{ext}"
                found = (int(fields[c + 1]), int(fields[c + 2]), name)
        if found is None:
            raise LoaderError(f"{path}:{line_no}: sample has no '{ext}' component")
        entries.append(found)
    if len(entries) != int(header[1]):
        raise LoaderError(f"{path}: header says {header[1]} samples, found {len(entries)}")
    return entries


def read_sample_table(shards: ShardSet) -> SampleTable:
    """All samples of a shard set in stored order, checked against ``shards.json`` counts."""
    tar_of, offset, size, keys = [], [], [], []
    for t, (tar, index, count) in enumerate(zip(shards.tars, shards.indices, shards.counts)):
        entries = read_index(index)
        if len(entries) != count:
            raise LoaderError(f"{index}: {len(entries)} samples but shards.json says {count}")
        for off, n, name in entries:
            tar_of.append(t)
            offset.append(off)
            size.append(n)
            keys.append(name.split("/")[-1].split(".", 1)[0])
    return SampleTable(
        tars=tuple(str(p) for p in shards.tars),
        tar_of=np.asarray(tar_of, dtype=np.int32),
        offset=np.asarray(offset, dtype=np.int64),
        size=np.asarray(size, dtype=np.int64),
        keys=tuple(keys),
    )


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (independent streams per tuple)."""
    a, b = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def batch_generator(seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The generator behind one batch: its crops, flips, levels and noise, in that order."""
    return torch.Generator().manual_seed(_seed(seed, rank, epoch, batch))


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample permutation of an epoch (the same on every rank)."""
    gen = torch.Generator().manual_seed(_seed(seed, 0x5EED, epoch))
    return torch.randperm(num_samples, generator=gen)


def decode_rgb(data: bytes) -> torch.Tensor:
    """PNG bytes -> ``[3, H, W]`` uint8 (PIL; torchvision's decoders are deprecated)."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def random_patch(image: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly placed ``crop x crop`` window with random h/v flips and transpose.

    The same draws as the DALI pipeline (position, hflip, vflip, transpose), so both cover the
    8 flips/90-degree rotations with equal probability.
    """
    _, h, w = image.shape
    if h < crop or w < crop:
        raise LoaderError(f"sample of {h}x{w} pixels is smaller than the crop {crop}")
    top = int(torch.randint(h - crop + 1, (1,), generator=gen))
    left = int(torch.randint(w - crop + 1, (1,), generator=gen))
    hflip, vflip, transpose = (bool(v) for v in torch.randint(2, (3,), generator=gen))
    patch = image[:, top : top + crop, left : left + crop]
    if hflip:
        patch = patch.flip(-1)
    if vflip:
        patch = patch.flip(-2)
    if transpose:
        patch = patch.transpose(-1, -2)
    return patch


class _EpochBatches(Dataset):
    """Map-style dataset over ``(epoch, batch)`` keys: one item is one whole ``Batch`` on CPU."""

    def __init__(
        self,
        table: SampleTable,
        *,
        rank: int,
        world_size: int,
        seed: int,
        batch_size: int,
        crop: int,
        degradation: DegradationParams,
    ) -> None:
        self.table = table
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size, self.crop, self.degradation = batch_size, crop, degradation
        self.begin, self.end = shard_range(len(table), rank, world_size)
        self._files: dict[int, int] = {}
        self._order: tuple[int, torch.Tensor] | None = None

    def sample_ids(self, epoch: int, batch: int) -> list[int]:
        """Global sample indices of one batch of this rank."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.table), self.seed, epoch))
        mine = self._order[1][self.begin : self.end]
        return mine[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    def __len__(self) -> int:  # not used by the sampler-driven DataLoader, but required
        return batches_per_epoch(len(self.table), self.world_size, self.batch_size)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, batch = key
        gen = batch_generator(self.seed, self.rank, epoch, batch)
        patches = [
            random_patch(self.table.read_rgb(i, self._files), self.crop, gen)
            for i in self.sample_ids(epoch, batch)
        ]
        clean = torch.stack(patches).to(torch.float32) / 255.0
        deg = self.degradation
        blur, noise = sample_levels(len(patches), gen, deg)
        degraded = degrade(clean, blur, noise, generator=gen, kernel_size=deg.kernel_size)
        z = ConditionScale.from_params(deg).to_z(blur, noise)
        return Batch(degraded, clean, z)

    def __getstate__(self) -> dict[str, Any]:  # open descriptors do not travel to workers
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)


def _worker_line(err: LoaderError) -> str:
    """The original message of a LoaderError re-raised by a DataLoader worker (its last line,
    ``pipeline.data.batch.LoaderError: <message>``), or the message itself."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return str(err)
    return re.sub(r"^[\w.]*LoaderError: ", "", lines[-1].strip())


class TorchTrainLoader:
    """:class:`~pipeline.data.batch.TrainLoader` in plain PyTorch (see the module docstring).

    ``num_workers`` overrides ``params.loader.num_threads`` (0 loads in this process).
    """

    backend = "torch"

    def __init__(
        self,
        shards: ShardSet,
        params: Params,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device = _CPU,
        num_workers: int | None = None,
    ) -> None:
        cfg = params.loader
        self.batch_size = cfg.batch_size
        self.device = device
        self.dataset = _EpochBatches(
            read_sample_table(shards),
            rank=rank,
            world_size=world_size,
            seed=seed,
            batch_size=cfg.batch_size,
            crop=cfg.crop,
            degradation=params.degradation,
        )
        self.num_workers = cfg.num_threads if num_workers is None else num_workers
        self.prefetch = cfg.prefetch
        self._identity = {
            "rank": rank,
            "world_size": world_size,
            "seed": seed,
            "num_samples": len(self.dataset.table),
            "batch_size": cfg.batch_size,
        }
        self._len = batches_per_epoch(len(self.dataset.table), world_size, cfg.batch_size)
        self._epoch = 0
        self._batch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self._len

    def epoch_keys(self, epoch: int) -> list[list[str]]:
        """The sample keys of every batch this rank yields in ``epoch`` (for checks)."""
        return [
            [self.dataset.table.keys[i] for i in self.dataset.sample_ids(epoch, b)]
            for b in range(self._len)
        ]

    def __iter__(self) -> Iterator[Batch]:
        if self._batch >= self._len:  # stopped right after an epoch's last batch
            self._epoch, self._batch = self._epoch + 1, 0
        keys = [(self._epoch, b) for b in range(self._batch, self._len)]
        workers = self.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=keys,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers else None,
        )
        try:
            for batch in loader:
                self._batch += 1
                yield Batch(*(t.to(self.device, non_blocking=True) for t in batch))
        except LoaderError as err:
            # From a DataLoader worker the message is "Caught LoaderError in DataLoader worker
            # process 0." + the worker's traceback: give the worker's own line again.
            raise LoaderError(_worker_line(err)) from err
        self._epoch, self._batch = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            **position(self._epoch, self._batch, self._len),
            **self._identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        exact = check_compatible(state, self._identity, self.backend)
        self._epoch = int(state["epoch"])
        self._batch = int(state.get("batch", 0)) if exact else 0
        if not 0 <= self._batch <= self._len:
            raise LoaderError(f"loader state batch {self._batch} outside [0, {self._len}]")

    def close(self) -> None:
        """Nothing to release: workers live only while an epoch is iterated."""
