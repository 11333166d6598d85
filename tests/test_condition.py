"""The one owner of z and of setting names (pipeline.condition): exact conversions and errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.condition import DEFAULT_SCALE, ConditionScale

# ---------------------------------------------------------------------------------------------
# z encoding


def test_levels_z_round_trip_and_paper_settings() -> None:
    blur_levels = [0, 0, 2, 4, 1, 1, 2, 2, 4, 4]
    noise_levels = [30, 50, 0, 0, 15, 30, 30, 50, 30, 50]
    z = DEFAULT_SCALE.to_z(blur_levels, noise_levels)
    assert z.shape == (10, 2) and z.dtype == torch.float32
    torch.testing.assert_close(z[4], torch.tensor([0.25, 0.3]))
    torch.testing.assert_close(z[1], torch.tensor([0.0, 1.0]))
    r, s = DEFAULT_SCALE.to_levels(z)
    torch.testing.assert_close(r, torch.tensor(blur_levels, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        s, torch.tensor(noise_levels, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # broadcasting one level against many, and custom maxima
    assert DEFAULT_SCALE.to_z(2.0, [0.0, 25.0]).tolist() == [[0.5, 0.0], [0.5, 0.5]]
    assert ConditionScale(blur_max=2.0, noise_max=20.0).to_z(1.0, 10.0).tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize(
    ("r", "s", "msg"),
    [
        (4.1, 0.0, "blur_max"),
        (0.0, 50.5, "noise_max"),
        (-0.1, 0.0, ">= 0"),
        (0.0, -1.0, ">= 0"),
        (float("nan"), 0.0, "finite"),
    ],
)
def test_levels_to_z_range_errors(r: float, s: float, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        DEFAULT_SCALE.to_z(r, s)


@pytest.mark.parametrize("z", [[1.2, 0.0], [0.0, -0.1], [[0.1, 0.2, 0.3]], [float("nan"), 0.0]])
def test_z_to_levels_range_errors(z: list) -> None:
    with pytest.raises(ValueError, match="z"):
        DEFAULT_SCALE.to_levels(torch.tensor(z))


def test_check_levels_uses_the_scale_and_the_callers_names() -> None:
    assert DEFAULT_SCALE.check_levels(4, 50) == (4.0, 50.0)
    assert ConditionScale(blur_max=2.0, noise_max=50.0).check_levels(2, 0) == (2.0, 0.0)
    with pytest.raises(ValueError, match=r"^blur must be in \[0, 2\] \(got 3\)$"):
        ConditionScale(blur_max=2.0, noise_max=50.0).check_levels(3, 0)
    with pytest.raises(ValueError, match=r"^--noise must be in \[0, 50\] \(got 51\)$"):
        DEFAULT_SCALE.check_levels(0, 51, names=("--blur", "--noise"))
    with pytest.raises(ValueError, match=r"^--blur must be in \[0, 4\] \(got nan\)$"):
        DEFAULT_SCALE.check_levels(float("nan"), 0, names=("--blur", "--noise"))
