"""Learning-rate schedules: the paper's two, exactly."""

from __future__ import annotations

import pytest

from pipeline.config import CuganStageParams, LRScheduleParams, TrainStageParams
from pipeline.train.schedules import decays_before, lr_at, step_decay_lr


def test_cunet_halves_every_200k():
    sched = TrainStageParams().schedule
    assert lr_at(1, 5e-4, sched) == 5e-4
    assert lr_at(200_000, 5e-4, sched) == 5e-4
    assert lr_at(200_001, 5e-4, sched) == 2.5e-4
    assert lr_at(400_001, 5e-4, sched) == 1.25e-4


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [
        (1, 5e-4),
        (50_000, 5e-4),
        (50_001, 2.5e-4),
        (100_001, 1.25e-4),
        (200_001, 6.25e-5),
        (300_001, 3.125e-5),
        (400_001, 1.5625e-5),
        (500_000, 1.5625e-5),
    ],
)
def test_cugan_milestones(iteration, expected):
    assert lr_at(iteration, 5e-4, CuganStageParams().schedule) == expected


def test_milestones_and_period_add_up():
    assert decays_before(11, milestones=(3,), every=5) == 1 + 2
    assert step_decay_lr(11, 1.0, milestones=(3,), every=5, gamma=0.1) == pytest.approx(1e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="counted from 1"):
        decays_before(0)
    with pytest.raises(ValueError, match="every must be positive"):
        decays_before(3, every=0)
    with pytest.raises(ValueError, match="increasing"):
        LRScheduleParams(milestones=(10, 5))
