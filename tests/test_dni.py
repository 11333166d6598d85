"""DNI between the MSE and GAN generators: exact ends, exact midpoint, strict compatibility."""

from __future__ import annotations

import pytest
import torch

from models.dni import DNIError, blend_generators, interpolate_state_dicts
from models.generator import Generator, GeneratorConfig

TINY = GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8))


def _pair() -> tuple[Generator, Generator]:
    mse = Generator(TINY, generator=torch.Generator().manual_seed(0)).eval()
    gan = Generator(TINY, generator=torch.Generator().manual_seed(1)).eval()
    return mse, gan


def test_ends_are_bitwise_exact() -> None:
    mse, gan = _pair()
    sd_mse, sd_gan = mse.state_dict(), gan.state_dict()
    at_one = interpolate_state_dicts(sd_mse, sd_gan, 1.0)
    at_zero = interpolate_state_dicts(sd_mse, sd_gan, 0)
    assert at_one.keys() == sd_mse.keys() == at_zero.keys()
    assert all(torch.equal(at_one[k], sd_mse[k]) for k in sd_mse)
    assert all(torch.equal(at_zero[k], sd_gan[k]) for k in sd_gan)
    # Copies, not aliases: editing the result leaves the models alone.
    at_one["head.weight"].add_(1.0)
    assert not torch.equal(at_one["head.weight"], mse.state_dict()["head.weight"])


def test_ends_reproduce_model_outputs_bitwise() -> None:
    mse, gan = _pair()
    x, z = torch.rand(2, 3, 8, 8), torch.rand(2, 2)
    assert torch.equal(blend_generators(mse, gan, 1.0)(x, z), mse(x, z))
    assert torch.equal(blend_generators(mse, gan, 0.0)(x, z), gan(x, z))


def test_midpoint_is_the_average() -> None:
    mse, gan = _pair()
    sd_mse, sd_gan = mse.state_dict(), gan.state_dict()
    mid = interpolate_state_dicts(sd_mse, sd_gan, 0.5)
    for key in sd_mse:
        assert torch.equal(mid[key], (sd_mse[key] + sd_gan[key]) / 2), key
    # The condition network is interpolated too (paper: theta_C as well as theta_G).
    assert any(k.startswith("condition.") for k in mid)


def test_general_alpha_formula_and_monotone_path() -> None:
    mse, gan = _pair()
    sd_mse, sd_gan = mse.state_dict(), gan.state_dict()
    blended = interpolate_state_dicts(sd_mse, sd_gan, 0.3)
    for key in sd_mse:
        assert torch.allclose(blended[key], 0.7 * sd_gan[key] + 0.3 * sd_mse[key], atol=1e-7)


def test_half_precision_blends_in_float32() -> None:
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 6.0], dtype=torch.float16)}
    out = interpolate_state_dicts(a, b, 0.25)
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0], dtype=torch.float16))


def test_integer_buffers_must_agree() -> None:
    a = {"n": torch.tensor(3), "w": torch.ones(2)}
    assert torch.equal(interpolate_state_dicts(a, dict(a), 0.5)["n"], torch.tensor(3))
    with pytest.raises(DNIError, match="non-floating"):
        interpolate_state_dicts(a, {"n": torch.tensor(4), "w": torch.ones(2)}, 0.5)


@pytest.mark.parametrize("alpha", [-0.01, 1.5, float("nan"), True, "0.5"])
def test_alpha_outside_range_rejected(alpha: object) -> None:
    sd = {"w": torch.ones(1)}
    with pytest.raises(DNIError, match="alpha"):
        interpolate_state_dicts(sd, sd, alpha)  # type: ignore[arg-type]


def test_mismatches_rejected() -> None:
    base = {"a": torch.ones(2), "b": torch.ones(3)}
    with pytest.raises(DNIError, match="differ in keys"):
        interpolate_state_dicts(base, {"a": torch.ones(2)}, 0.5)
    with pytest.raises(DNIError, match=r"b: shape \[3\]"):
        interpolate_state_dicts(base, {"a": torch.ones(2), "b": torch.ones(4)}, 0.5)
    with pytest.raises(DNIError, match="dtype"):
        interpolate_state_dicts(
            base, {"a": torch.ones(2), "b": torch.ones(3, dtype=torch.float64)}, 0.5
        )


def test_blend_requires_same_config() -> None:
    mse, _ = _pair()
    other = Generator(GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 16)))
    with pytest.raises(
        DNIError, match=r"configs differ .*channels_per_scale: \[4, 8, 8\] vs \[4, 8, 16\]"
    ):
        blend_generators(mse, other, 0.5)


def test_blended_model_is_a_working_generator() -> None:
    mse, gan = _pair()
    model = blend_generators(mse, gan, 0.5)
    assert model.config == TINY
    assert not model.training
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    x, z = torch.rand(1, 3, 8, 8), torch.rand(1, 2)
    assert model(x, z).shape == x.shape


def test_check_alpha_is_the_one_rule_and_names_the_callers_argument() -> None:
    from models.dni import check_alpha

    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0 and check_alpha(0.25) == 0.25
    with pytest.raises(DNIError, match=r"^--alpha must be in \[0, 1\] \(got 1.5\)$"):
        check_alpha(1.5, name="--alpha")
    with pytest.raises(DNIError, match=r"^alpha must be a number in \[0, 1\]"):
        check_alpha("0.5")  # type: ignore[arg-type]
