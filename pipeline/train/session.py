"""What the training loop needs from whatever runs it: a :class:`Session`.

The per-worker loop (:mod:`pipeline.train.loop`) never calls Ray itself. It asks its session
for its rank and device, to wrap a module for DDP, for the checkpoint to resume from, to
report metrics + a checkpoint, and for the two collectives it uses. Two sessions:

* :class:`RaySession` -- inside a Ray Train worker (``ray.train.torch.prepare_model`` wraps in
  DDP; ``ray.train.report`` is a barrier; ``ray.train.get_checkpoint`` resumes).
* :class:`LocalSession` -- one process, no Ray: checkpoints under a directory, the reports kept
  in memory. Tests and ``benchmarks/train.py`` run the exact production loop through it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pipeline.device import resolve_device

__all__ = ["LocalSession", "RaySession", "Session"]


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module on this worker's device, wrapped for DDP where there are several."""
        ...

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint directory to resume from (None: a fresh start)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        """Every rank calls this at every checkpoint; only rank 0 passes a directory."""
        ...

    def all_gather(self, obj: Any) -> list[Any]: ...

    def all_reduce_mean(self, tensor: Tensor) -> Tensor: ...


class RaySession:
    """The session inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        # Ray remaps CUDA_VISIBLE_DEVICES per worker: its device, never a hard-coded cuda:0.
        self.device = ray.train.torch.get_device()

    def prepare(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor / self.world_size


class LocalSession:
    """One process, no Ray: checkpoints go to ``root/<name>/``; ``reports`` keeps the metrics.

    With ``resume=True`` the newest checkpoint under ``root`` is loaded, as Ray would.
    ``device`` goes through :func:`pipeline.device.resolve_device` (``"auto"`` allowed).
    """

    def __init__(
        self, root: str | Path, *, device: str | torch.device = "cpu", resume: bool = False
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.device = resolve_device(device)
        self.root = Path(root)
        self.resume = resume
        self.reports: list[tuple[dict[str, Any], Path | None]] = []

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("checkpoint_*")) if self.root.is_dir() else []
        return found[-1] if found else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.latest() if self.resume else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        kept = None
        if checkpoint_dir is not None:
            kept = self.root / name
            if kept.exists():
                shutil.rmtree(kept)
            shutil.copytree(checkpoint_dir, kept)
        self.reports.append((dict(metrics), kept))

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return tensor
