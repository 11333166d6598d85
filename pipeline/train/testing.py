"""The training loop's test seam: hooks that tests, benchmarks and smoke runs pass beside the
:class:`~pipeline.train.worker_config.WorkerConfig`, never inside it.

Production code (``stages/train.py``, params.yaml, the flows' default paths) never builds a
:class:`TestHooks`; the loop only consults one when it is handed one. Two hooks:

* :class:`FaultPlan` -- chaos testing: raise :class:`InjectedFault` at iteration ``k`` on one
  rank, once (a marker file records that it happened, so the restarted worker goes on).
  ``tests/test_train_ray.py`` uses it to show that a worker failure resumes bit-identically.
* :class:`SyntheticData` -- pre-made tensors (:func:`pipeline.train.tensors.synthetic_samples`)
  instead of shards: batches known in advance (two DDP workers together see exactly what one
  process sees), and smoke runs without the data stages (``flows.sweep --synthetic``).

Both are small frozen dataclasses, so Ray pickles them to the workers as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.train.tensors import TensorLoader, synthetic_samples

__all__ = ["FaultPlan", "InjectedFault", "SyntheticData", "TestHooks"]


class InjectedFault(RuntimeError):
    """The failure asked for by a :class:`FaultPlan` (chaos tests)."""


@dataclass(frozen=True)
class FaultPlan:
    """Fail at ``iteration`` on ``rank`` unless ``marker`` exists (creating it first)."""

    iteration: int
    marker: Path
    rank: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "marker", Path(self.marker))

    def maybe_fail(self, iteration: int, rank: int) -> None:
        if iteration != self.iteration or rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"fault injected at iteration {iteration}\n")
        raise InjectedFault(f"injected failure at iteration {iteration} (marker {self.marker})")


@dataclass(frozen=True)
class SyntheticData:
    """``num_samples`` deterministic samples from ``seed`` instead of shards."""

    num_samples: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(f"synthetic data needs num_samples > 0 (got {self.num_samples})")

    def loader(
        self, *, crop: int, batch_size: int, rank: int, world_size: int, device: torch.device
    ) -> TensorLoader:
        """This rank's :class:`~pipeline.train.tensors.TensorLoader` over the samples."""
        tensors = synthetic_samples(self.num_samples, crop, seed=self.seed)
        return TensorLoader(
            *tensors, batch_size=batch_size, rank=rank, world_size=world_size, device=device
        )


@dataclass(frozen=True)
class TestHooks:
    """What a test injects into a training run (module docstring); None fields: no hook."""

    __test__: ClassVar[bool] = False  # a class named Test*, but not a pytest test class

    fault: FaultPlan | None = None
    synthetic: SyntheticData | None = None

    def identity(self) -> dict[str, Any]:
        """What of the hooks defines the run (for the run-name digest): the synthetic data.
        A fault does not: the chaos run must resume as the same run."""
        return {"synthetic": asdict(self.synthetic)} if self.synthetic is not None else {}
