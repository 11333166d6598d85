"""A :class:`~pipeline.data.batch.TrainLoader` over tensors already in memory.

Two uses: the compute-only ceiling in ``benchmarks/train.py`` (the same loop with no decoding or
degradation), and tests that need batches known in advance -- e.g. that two DDP workers
together see exactly the batch one process sees.

Layout: the samples are taken in their stored order (no shuffle). Global batch ``b`` of an
epoch is samples ``[b * B * W, (b + 1) * B * W)`` for ``W`` ranks of per-rank batch ``B``, and
rank ``r`` takes the ``r``-th contiguous ``B`` of it. So the union over ranks of their batch
``b`` is exactly batch ``b`` of a single process with batch ``B * W``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.batch import Batch, LoaderError

__all__ = ["TensorLoader", "synthetic_samples"]


def synthetic_samples(
    num_samples: int, crop: int, *, seed: int, cond_dim: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """``(degraded, clean, z)`` of ``num_samples`` smooth random images, reproducible from ``seed``.

    Clean images are bilinear upsamplings of 8x8 noise (some structure to restore); degraded
    ones add Gaussian noise of std ``0.2 * z[1]`` and are quantised to 8 bits; z is uniform.
    Not the method's degradation: only a cheap, deterministic stand-in with the right shapes.
    """
    if num_samples <= 0 or crop <= 0:
        raise ValueError(f"num_samples and crop must be positive (got {num_samples}, {crop})")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_samples, 3, 8, 8, generator=gen)
    clean = F.interpolate(coarse, size=(crop, crop), mode="bilinear", align_corners=False)
    z = torch.rand(num_samples, cond_dim, generator=gen)
    noise = torch.randn(num_samples, 3, crop, crop, generator=gen) * (0.2 * z[:, -1]).view(
        -1, 1, 1, 1
    )
    degraded = torch.round((clean + noise).clamp(0, 1) * 255) / 255
    return degraded.contiguous(), clean.contiguous(), z.contiguous()


class TensorLoader:
    """Batches of fixed tensors split over ranks (module docstring); resumable position."""

    backend = "tensors"

    def __init__(
        self,
        degraded: Tensor,
        clean: Tensor,
        z: Tensor,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if not len(degraded) == len(clean) == len(z):
            raise LoaderError("degraded, clean and z must hold the same number of samples")
        if world_size < 1 or not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self._data = (degraded, clean, z)
        self._len = len(clean) // (batch_size * world_size)
        if self._len == 0:
            raise LoaderError(
                f"{len(clean)} samples give no global batch of {batch_size} x {world_size} ranks"
            )
        self._epoch = 0
        self._batch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        while self._batch < self._len:
            start = (self._batch * self.world_size + self.rank) * self.batch_size
            rows = slice(start, start + self.batch_size)
            self._batch += 1
            yield Batch(*(t[rows].to(self.device) for t in self._data))
        self._epoch += 1
        self._batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "epoch": self._epoch,
            "batch": self._batch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._batch = int(state["batch"])
        if not 0 <= self._batch <= self._len:
            raise LoaderError(f"loader state batch {self._batch} outside [0, {self._len}]")

    def close(self) -> None:
        """Nothing to release."""
