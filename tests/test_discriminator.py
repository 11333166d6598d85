"""Discriminator D + C_D (GFM): layout, shapes, GFM identity at init, ablation, input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.discriminator import Discriminator, DiscriminatorConfig, DiscriminatorLayer
from models.registry import DISCRIMINATOR_CONFIGS, build_discriminator, count_parameters

TINY = DiscriminatorConfig(base_channels=4)
TINY_NO_GFM = DiscriminatorConfig(base_channels=4, gfm=False)


def _seeded(cfg: DiscriminatorConfig, seed: int = 0) -> Discriminator:
    return Discriminator(cfg, generator=torch.Generator().manual_seed(seed))


def _batch(batch: int = 3, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, 2, generator=g)


def test_layer_plan_is_vgg_style() -> None:
    plan = DiscriminatorConfig().layer_plan()
    assert len(plan) == 10
    assert [c for _, c, _, _ in plan] == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    assert [(k, s) for _, _, k, s in plan] == [(3, 1), (4, 2)] * 5


def test_spatial_sizes_halve_to_2x2() -> None:
    model = _seeded(DISCRIMINATOR_CONFIGS["authors"]).eval()
    x, z = _batch(batch=1)
    sizes = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1]))
        for layer in model.layers
    ]
    with torch.no_grad():
        model(x, z)
    for h in handles:
        h.remove()
    assert sizes == [64, 32, 32, 16, 16, 8, 8, 4, 4, 2]


@pytest.mark.parametrize("name", sorted(DISCRIMINATOR_CONFIGS))
def test_registry_configs_build(name: str) -> None:
    cfg = DISCRIMINATOR_CONFIGS[name]
    model = Discriminator(cfg, device="meta")
    assert (model.condition is not None) == cfg.gfm
    assert count_parameters(model) > 0


def test_output_shape_and_gfm_toggle() -> None:
    x, z = _batch()
    with_gfm = _seeded(TINY)
    without = _seeded(TINY_NO_GFM)
    assert with_gfm(x, z).shape == (3, 1)
    assert without(x, None).shape == (3, 1)
    assert without(x, z).shape == (3, 1)
    # Two independent Linears per modulated layer (nine: every conv but the first).
    assert len(with_gfm.condition.alpha) == len(with_gfm.condition.beta) == 9
    cond_params = count_parameters(with_gfm.condition)
    assert count_parameters(with_gfm) - count_parameters(without) == cond_params
    assert cond_params == 2 * sum(2 * c + c for c in TINY.modulated_channels)


def test_gfm_is_identity_at_init() -> None:
    """Same trunk weights: the GFM discriminator equals the plain one for every z at init."""
    x, z = _batch()
    with_gfm = _seeded(TINY).eval()
    without = _seeded(TINY_NO_GFM).eval()
    trunk = {k: v for k, v in with_gfm.state_dict().items() if not k.startswith("condition.")}
    assert trunk.keys() == without.state_dict().keys()
    assert all(torch.equal(v, without.state_dict()[k]) for k, v in trunk.items())
    ref = without(x)
    assert torch.equal(with_gfm(x, z), ref)
    assert torch.equal(with_gfm(x, torch.ones(3, 2)), ref)
    alpha, beta = with_gfm.condition(z)[0]
    assert torch.equal(alpha, torch.ones_like(alpha)) and torch.equal(beta, torch.zeros_like(beta))


def test_gfm_modulates_once_trained() -> None:
    model = _seeded(TINY).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for lin in [*model.condition.alpha, *model.condition.beta]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
    x, _ = _batch(batch=1)
    a = model(x, torch.tensor([[0.0, 0.0]]))
    b = model(x, torch.tensor([[1.0, 0.5]]))
    assert (a - b).abs().max() > 1e-4


def test_gfm_weights_receive_gradient_at_init() -> None:
    model = _seeded(TINY).train()
    x, z = _batch()
    model(x, z).mean().backward()
    assert model.condition.alpha[0].weight.grad.abs().sum() > 0
    assert model.condition.beta[-1].weight.grad.abs().sum() > 0


def test_gfm_formula_on_one_layer() -> None:
    layer = DiscriminatorLayer(4, 8, 3, 1, norm=True).eval()
    x = torch.randn(2, 4, 6, 6)
    alpha, beta = torch.randn(2, 8), torch.randn(2, 8)
    normed = layer.norm(layer.conv(x))
    expected = nn.functional.leaky_relu(
        alpha[:, :, None, None] * normed + beta[:, :, None, None], 0.2
    )
    assert torch.allclose(layer(x, (alpha, beta)), expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 64, 32), (1, 1, 64, 64), (3, 64, 64)])
def test_wrong_input_size_rejected(shape: tuple) -> None:
    model = _seeded(TINY)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model(torch.rand(shape), torch.rand(1, 2))


def test_z_required_with_gfm() -> None:
    x, _ = _batch(batch=1)
    with pytest.raises(ValueError, match=r"z .* is required"):
        _seeded(TINY)(x, None)
    with pytest.raises(ValueError, match="z of shape"):
        _seeded(TINY)(x, torch.rand(1, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input_size": 48}, "multiple of 32"),
        ({"base_channels": 0}, "base_channels"),
        ({"gfm": "yes"}, "bool"),
    ],
)
def test_invalid_configs_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiscriminatorConfig(**kwargs)


def test_other_input_size() -> None:
    model = _seeded(DiscriminatorConfig(base_channels=4, input_size=32))
    x, z = _batch(batch=2, size=32)
    assert model(x, z).shape == (2, 1)


def test_build_by_name() -> None:
    model = build_discriminator("tiny")
    assert model.config == DISCRIMINATOR_CONFIGS["tiny"]
