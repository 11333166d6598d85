"""Pure-PyTorch training loader: the fallback for the DALI pipeline and its oracle.

It reads the same shards, draws the same kinds of crops/flips/transposes, and degrades with the
reference :func:`pipeline.degradation.degrade` / :func:`~pipeline.degradation.sample_levels`.

Context-margin patches (docs/data.md, "Degradation"): for a ``crop x crop`` patch at
``(top, left)`` the loader reads the window ``kernel_size // 2 = r`` pixels larger on every
side, clamped to the sub-image, pads it by replicating the sub-image's own edge where it was
clamped (:func:`context_window`), blurs it without padding (``border="valid"``), adds noise to
the central ``crop x crop`` only, and cuts the clean patch from the same centre; the random
flips/transpose then apply to the aligned pair. So a patch's blur is exactly the blur of the
whole sub-image (replicate border, as the authors' ``imfilter(img, k, 'replicate')`` of whole
sub-images) cropped -- at the sub-image's edges too.

Decode: a ``raw`` shard sample is read with one ``pread`` of just the window's rows (no
decoding at all); a ``png`` one is decoded whole by PIL (a PNG cannot be decoded by region).

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
import torch.nn.functional as F
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
    "PatchDraw",
    "SampleTable",
    "TorchTrainLoader",
    "Window",
    "batch_generator",
    "context_window",
    "decode_rgb",
    "degrade_patches",
    "draw_patch",
    "epoch_order",
    "flip_patch",
    "read_index",
    "read_sample_table",
]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")  # the default target device (a torch.device is immutable)


@dataclass(frozen=True)
class SampleTable:
    """Where each sample lies: tar path index, byte offset, byte size, key; and its encoding
    (``raw``: ``sub_size x sub_size x 3`` uint8 pixels, or ``png``)."""

    tars: tuple[str, ...]
    tar_of: np.ndarray  # [N] int32
    offset: np.ndarray  # [N] int64
    size: np.ndarray  # [N] int64
    keys: tuple[str, ...]
    encoding: str = "png"
    sub_size: int = 0  # side of a raw sample (shards.json crop_size)

    def __len__(self) -> int:
        return len(self.keys)

    def _pread(self, i: int, files: dict[int, int], size: int, start: int) -> bytes:
        t = int(self.tar_of[i])
        fd = files.get(t)
        if fd is None:
            fd = files[t] = os.open(self.tars[t], os.O_RDONLY)
        data = os.pread(fd, size, int(self.offset[i]) + start)
        if len(data) != size:
            raise LoaderError(
                f"{self.tars[t]}: truncated at sample {self.keys[i]!r} (changed after the "
                "shards stage: re-run it)"
            )
        return data

    def read(self, i: int, files: dict[int, int]) -> bytes:
        """The stored bytes of sample ``i``; ``files`` caches open descriptors per tar."""
        return self._pread(i, files, int(self.size[i]), 0)

    def image_size(self, i: int, files: dict[int, int]) -> tuple[int, int] | None:
        """``(H, W)`` of a raw sample without reading it; None for PNG (decode to know)."""
        return (self.sub_size, self.sub_size) if self.encoding == "raw" else None

    def read_rows(self, i: int, files: dict[int, int], y0: int, y1: int) -> torch.Tensor:
        """Rows ``[y0, y1)`` of raw sample ``i`` as ``[3, y1 - y0, W]`` uint8: one ``pread``."""
        row = self.sub_size * 3
        data = self._pread(i, files, (y1 - y0) * row, y0 * row)
        pixels = np.frombuffer(data, np.uint8).reshape(y1 - y0, self.sub_size, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

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
    """All samples of a shard set in stored order, checked against ``shards.json`` counts
    (and, for ``raw`` samples, against the ``crop_size x crop_size x 3`` byte count)."""
    tar_of, offset, size, keys = [], [], [], []
    raw_bytes = int(np.prod(shards.raw_shape)) if shards.encoding == "raw" else None
    for t, (index, count) in enumerate(zip(shards.indices, shards.counts, strict=True)):
        entries = read_index(index, shards.ext)
        if len(entries) != count:
            raise LoaderError(f"{index}: {len(entries)} samples but shards.json says {count}")
        for off, n, name in entries:
            if raw_bytes is not None and n != raw_bytes:
                raise LoaderError(
                    f"{index}: raw sample {name} has {n} bytes, expected "
                    f"{shards.crop_size}x{shards.crop_size}x3 = {raw_bytes}"
                )
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
        encoding=shards.encoding,
        sub_size=shards.crop_size,
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


@dataclass(frozen=True)
class PatchDraw:
    """One sample's random geometry: the patch's top-left corner and its flips/transpose."""

    top: int
    left: int
    hflip: bool
    vflip: bool
    transpose: bool


def draw_patch(height: int, width: int, crop: int, gen: torch.Generator) -> PatchDraw:
    """A uniformly placed ``crop x crop`` patch with random h/v flips and transpose.

    The same draws as the DALI pipeline (position, hflip, vflip, transpose), so both cover the
    8 flips/90-degree rotations with equal probability.
    """
    if height < crop or width < crop:
        raise LoaderError(f"sample of {height}x{width} pixels is smaller than the crop {crop}")
    top = int(torch.randint(height - crop + 1, (1,), generator=gen))
    left = int(torch.randint(width - crop + 1, (1,), generator=gen))
    hflip, vflip, transpose = (bool(v) for v in torch.randint(2, (3,), generator=gen))
    return PatchDraw(top, left, hflip, vflip, transpose)


@dataclass(frozen=True)
class Window:
    """The part of the sub-image a patch's degradation reads: rows ``[y0, y1)``, columns
    ``[x0, x1)``, and ``pad`` = (left, right, top, bottom) pixels of replicate padding that
    complete it to ``(crop + 2r)^2`` where the sub-image ends (``F.pad`` order)."""

    y0: int
    y1: int
    x0: int
    x1: int
    pad: tuple[int, int, int, int]


def context_window(height: int, width: int, top: int, left: int, crop: int, radius: int) -> Window:
    """The ``crop + 2 * radius`` context window around a patch, clamped into the sub-image.

    Clamping, then replicating the clamped sides, is what the replicate border of the whole
    sub-image gives there: the patch's blur equals the whole sub-image's blur cropped,
    including patches at (or sub-images smaller than) the kernel's reach.
    """
    y0, y1 = max(top - radius, 0), min(top + crop + radius, height)
    x0, x1 = max(left - radius, 0), min(left + crop + radius, width)
    pad = (
        x0 - (left - radius),
        left + crop + radius - x1,
        y0 - (top - radius),
        top + crop + radius - y1,
    )
    return Window(y0, y1, x0, x1, pad)


def flip_patch(patch: torch.Tensor, draw: PatchDraw) -> torch.Tensor:
    """Apply a draw's horizontal flip, vertical flip, then transpose (last two dims)."""
    if draw.hflip:
        patch = patch.flip(-1)
    if draw.vflip:
        patch = patch.flip(-2)
    if draw.transpose:
        patch = patch.transpose(-1, -2)
    return patch


def degrade_patches(
    windows: torch.Tensor,
    draws: list[PatchDraw],
    blur: torch.Tensor,
    noise: torch.Tensor,
    gen: torch.Generator,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(degraded, clean)`` patches from ``[B, 3, crop + 2r, crop + 2r]`` context windows.

    The windows are blurred without padding (they carry the context), noise is drawn for the
    central patches only, and each sample's flips apply to its clean and degraded patch alike.
    """
    r = kernel_size // 2
    degraded = degrade(windows, blur, noise, generator=gen, kernel_size=kernel_size, border="valid")
    clean = windows[..., r : windows.shape[-2] - r, r : windows.shape[-1] - r]
    pairs = [
        (flip_patch(d, draw), flip_patch(c, draw))
        for d, c, draw in zip(degraded, clean, draws, strict=True)
    ]
    return torch.stack([d for d, _ in pairs]), torch.stack([c for _, c in pairs])


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
        fixed_levels: tuple[float, float] | None = None,
    ) -> None:
        self.table = table
        self.fixed_levels = fixed_levels
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

    def window(self, i: int, gen: torch.Generator) -> tuple[torch.Tensor, PatchDraw]:
        """Sample ``i``'s draw and its ``[3, crop + 2r, crop + 2r]`` float32 context window."""
        size = self.table.image_size(i, self._files)
        image = None
        if size is None:  # png: decode the whole sub-image to learn its size
            image = self.table.read_rgb(i, self._files)
            size = (image.shape[1], image.shape[2])
        draw = draw_patch(size[0], size[1], self.crop, gen)
        win = context_window(
            *size, draw.top, draw.left, self.crop, self.degradation.kernel_size // 2
        )
        if image is None:
            pixels = self.table.read_rows(i, self._files, win.y0, win.y1)[..., win.x0 : win.x1]
        else:
            pixels = image[:, win.y0 : win.y1, win.x0 : win.x1]
        pixels = pixels.to(torch.float32) / 255.0
        if any(win.pad):
            pixels = F.pad(pixels[None], win.pad, mode="replicate")[0]
        return pixels, draw

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, batch = key
        gen = batch_generator(self.seed, self.rank, epoch, batch)
        pairs = [self.window(i, gen) for i in self.sample_ids(epoch, batch)]
        windows, draws = [w for w, _ in pairs], [d for _, d in pairs]
        deg = self.degradation
        if self.fixed_levels is None:
            blur, noise = sample_levels(len(draws), gen, deg)
        else:  # a fixed-degradation baseline (Unet/UGAN): every sample at one (r, sigma)
            blur = torch.full((len(draws),), self.fixed_levels[0], dtype=torch.float32)
            noise = torch.full((len(draws),), self.fixed_levels[1], dtype=torch.float32)
        degraded, clean = degrade_patches(
            torch.stack(windows), draws, blur, noise, gen, deg.kernel_size
        )
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
        fixed_levels: tuple[float, float] | None = None,
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
            fixed_levels=fixed_levels,
        )
        self.num_workers = cfg.num_threads if num_workers is None else num_workers
        self.prefetch = cfg.prefetch
        self._identity = {
            "rank": rank,
            "world_size": world_size,
            "seed": seed,
            "num_samples": len(self.dataset.table),
            "batch_size": cfg.batch_size,
            "fixed_levels": list(fixed_levels) if fixed_levels is not None else None,
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
