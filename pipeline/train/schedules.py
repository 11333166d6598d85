"""Learning-rate schedules as pure functions of the iteration (nanoGPT's ``get_lr`` idea).

The optimiser's rate is set from these before every step instead of keeping a stateful
``torch.optim.lr_scheduler`` object: resuming then needs only the iteration number, and the
schedule a checkpoint was trained with is plain JSON (its params).

Convention: iterations are counted from 1 (the n-th optimiser step is iteration n). A decay
"at milestone m" applies to the steps after the m-th: iterations ``m + 1, m + 2, ...``.
So "halved every 2e5 iterations" trains steps 1..200000 at the base rate.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import LRScheduleParams

__all__ = ["decays_before", "lr_at", "step_decay_lr"]


def decays_before(iteration: int, milestones: Sequence[int] = (), every: int | None = None) -> int:
    """How many decays have happened before step ``iteration`` (>= 1)."""
    if iteration < 1:
        raise ValueError(f"iterations are counted from 1 (got {iteration})")
    count = sum(1 for m in milestones if iteration > m)
    if every is not None:
        if every <= 0:
            raise ValueError(f"every must be positive (got {every})")
        count += (iteration - 1) // every
    return count


def step_decay_lr(
    iteration: int,
    base_lr: float,
    *,
    milestones: Sequence[int] = (),
    every: int | None = None,
    gamma: float = 0.5,
) -> float:
    """``base_lr * gamma ** decays_before(iteration)``: MultiStepLR and StepLR in one."""
    return base_lr * gamma ** decays_before(iteration, milestones, every)


def lr_at(iteration: int, base_lr: float, schedule: LRScheduleParams) -> float:
    """The rate of step ``iteration`` under ``schedule`` (a ``train_*.schedule`` section)."""
    return step_decay_lr(
        iteration,
        base_lr,
        milestones=schedule.milestones,
        every=schedule.every,
        gamma=schedule.gamma,
    )
