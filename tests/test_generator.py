"""Generator G + C_G: shapes, parameter counts, modulation semantics, config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.generator import (
    Generator,
    GeneratorConfig,
    ModulatedResidualBlock,
    TuningWeights,
)
from models.registry import (
    DISCRIMINATOR_CONFIGS,
    GENERATOR_CONFIGS,
    UnknownConfigError,
    build_generator,
    count_parameters,
    describe_configs,
)

TINY = GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8))


def _seeded(cfg: GeneratorConfig, seed: int = 0) -> Generator:
    return Generator(cfg, generator=torch.Generator().manual_seed(seed)).eval()


def _inputs(batch: int = 2, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, 2, generator=g)


def _randomise_condition(model: Generator, seed: int = 3) -> None:
    """Give C_G large random weights so that the modulation is clearly visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.condition.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _expected_generator_params(cfg: GeneratorConfig) -> int:
    """Hand count: convs k*k*cin*cout + cout, Linears cond*c + c."""
    c, n, k, d = cfg.channels_per_scale, cfg.blocks_per_scale, cfg.down_kernel, cfg.cond_dim
    conv = lambda cin, cout, ks: ks * ks * cin * cout + cout  # noqa: E731
    lin = lambda cout: d * cout + cout  # noqa: E731
    total = conv(cfg.in_channels, c[0], 3) + conv(c[0], cfg.out_channels, 3)
    for s in range(len(c)):
        total += 2 * n[s] * 2 * conv(c[s], c[s], 3)  # left + right, two convs per MRB
        if cfg.conditional:
            total += 2 * n[s] * lin(c[s])
    for s in range(len(c) - 1):
        total += conv(c[s], c[s + 1], k) + conv(c[s + 1], c[s], 2)  # down + transposed up
        if cfg.conditional:
            total += lin(c[s])  # MSF into scale s
    if cfg.conditional:
        total += lin(cfg.out_channels)
    return total


@pytest.mark.parametrize("name", sorted(GENERATOR_CONFIGS))
def test_registry_parameter_counts_match_hand_count(name: str) -> None:
    cfg = GENERATOR_CONFIGS[name]
    model = Generator(cfg, device="meta")
    assert count_parameters(model) == _expected_generator_params(cfg)


def test_authors_parameter_count_by_hand() -> None:
    # MRB at C channels: two 3x3 convs (2 * (9C^2 + C)) + Linear(2, C) (3C).
    mrb = lambda c: 2 * (9 * c * c + c) + 3 * c  # noqa: E731
    trunk_blocks = 4 * (mrb(64) + mrb(128) + mrb(256))
    convs = (3 * 64 * 9 + 64) + (64 * 3 * 9 + 3)  # head, tail
    convs += (64 * 128 * 4 + 128) + (128 * 256 * 4 + 256)  # 2x2 down convs
    convs += (256 * 128 * 4 + 128) + (128 * 64 * 4 + 64)  # 2x2 transposed up convs
    linears = (2 * 128 + 128) + (2 * 64 + 64) + (2 * 3 + 3)  # MSF x2 + global
    assert trunk_blocks + convs + linears == 6_534_476
    assert count_parameters(Generator(GENERATOR_CONFIGS["authors"], device="meta")) == 6_534_476
    assert (
        count_parameters(Generator(GENERATOR_CONFIGS["unet"], device="meta")) == 6_534_476 - 5_961
    )


@pytest.mark.parametrize(
    "blocks,channels",
    [((2,), (8,)), ((1, 2), (4, 8)), ((1, 1, 1), (4, 8, 8))],
    ids=["1-scale", "2-scale", "3-scale"],
)
def test_shapes_for_each_number_of_scales(
    blocks: tuple[int, ...], channels: tuple[int, ...]
) -> None:
    cfg = GeneratorConfig(blocks_per_scale=blocks, channels_per_scale=channels)
    model = _seeded(cfg)
    assert model.size_multiple == 2 ** (len(channels) - 1)
    x, z = _inputs(size=8)
    out = model(x, z)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    # Non-square input, one multiple of size_multiple in each direction.
    x2 = torch.rand(1, 3, 4 * model.size_multiple, 2 * model.size_multiple)
    assert model(x2, z[:1]).shape == x2.shape


def test_tiny_registry_config_runs() -> None:
    model = build_generator("tiny")
    x, z = _inputs(size=12)
    assert model(x, z).shape == x.shape


def test_modulation_changes_output() -> None:
    model = _seeded(TINY)
    _randomise_condition(model)
    x, _ = _inputs(batch=1)
    a = model(x, torch.tensor([[0.0, 0.0]]))
    b = model(x, torch.tensor([[1.0, 0.2]]))
    assert (a - b).abs().max() > 1e-3


def test_batch_items_use_their_own_condition() -> None:
    model = _seeded(TINY)
    _randomise_condition(model)
    x, z = _inputs(batch=2)
    x = x[:1].expand(2, -1, -1, -1)
    both = model(x, z)
    assert torch.allclose(both[0:1], model(x[:1], z[:1]), atol=1e-6)
    assert torch.allclose(both[1:2], model(x[1:], z[1:]), atol=1e-6)
    assert (both[0] - both[1]).abs().max() > 1e-4


def test_zero_tuning_weights_give_identity() -> None:
    model = _seeded(TINY)
    # Make the trunk non-trivial so that "identity" is not an accident of a zero trunk.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        for p in model.condition.parameters():
            p.zero_()
    x, z = _inputs()
    # The global connection returns the input bit for bit.
    assert torch.equal(model(x, z), x)
    # And every modulated branch contributes exactly nothing: each MRB returns its input.
    seen = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append(torch.equal(output, args[0]))

    # MSF adds nothing: the first right block of a finer scale sees exactly the left features.
    left_out: dict[int, torch.Tensor] = {}
    right_in: dict[int, torch.Tensor] = {}

    def keep(store: dict, s: int, use_output: bool):  # type: ignore[no-untyped-def]
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            store[s] = output if use_output else args[0]

        return fn

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, ModulatedResidualBlock)
    ]
    for s in range(TINY.num_scales - 1):
        handles.append(model.left[s][-1].register_forward_hook(keep(left_out, s, True)))
        handles.append(model.right[s][0].register_forward_hook(keep(right_in, s, False)))
    model(x, z)
    for h in handles:
        h.remove()
    assert len(seen) == 2 * sum(TINY.blocks_per_scale) and all(seen)
    assert all(torch.equal(right_in[s], left_out[s]) for s in range(TINY.num_scales - 1))


def test_mrb_formula() -> None:
    block = ModulatedResidualBlock(4)
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(2, 4)
    branch = block.conv2(torch.relu(block.conv1(x)))
    assert torch.equal(block(x, w), x + branch * w.view(2, 4, 1, 1))
    assert torch.equal(block(x, None), x + branch)
    assert torch.equal(block(x, torch.zeros(2, 4)), x)


def test_unconditional_ignores_z() -> None:
    cfg = GeneratorConfig(
        blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8), conditional=False
    )
    model = _seeded(cfg)
    assert model.condition is None
    assert not any("condition" in k for k in model.state_dict())
    x, z = _inputs()
    ref = model(x, None)
    assert torch.equal(model(x, z), ref)
    assert torch.equal(model(x, torch.rand(2, 2)), ref)
    assert model.tuning_weights(z) == TuningWeights.unit(cfg)


def test_unconditional_equals_conditional_with_unit_weights() -> None:
    """conditional=False is exactly the conditional net with every tuning weight = 1."""
    cond = _seeded(TINY)
    uncond = Generator(
        GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8), conditional=False)
    )
    trunk = {k: v for k, v in cond.state_dict().items() if not k.startswith("condition.")}
    uncond.load_state_dict(trunk, strict=True)
    with torch.no_grad():
        for lin in cond.condition.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.zero_()
                lin.bias.fill_(1.0)
    x, z = _inputs()
    assert torch.allclose(cond(x, z), uncond(x, None), atol=1e-6)


def test_condition_network_is_explicit() -> None:
    model = _seeded(GENERATOR_CONFIGS["tiny"])
    linears = [m for m in model.condition.modules() if isinstance(m, nn.Linear)]
    # One independent Linear per MRB (6), per MSF (2), and the global connection (1).
    assert len(linears) == 2 * 3 + 2 + 1
    assert len({id(m.weight) for m in linears}) == len(linears)
    assert not any(
        isinstance(m, nn.Linear)
        for name, m in model.named_modules()
        if not name.startswith("condition")
    )
    w = model.tuning_weights(torch.rand(3, 2))
    assert [t.shape[1] for t in w.fusion] == [4, 8]
    assert w.output.shape == (3, 3)
    assert all(t.shape == (3, c) for ts, c in zip(w.left, (4, 8, 8), strict=True) for t in ts)


def test_initialisation_follows_authors() -> None:
    cfg = GeneratorConfig(blocks_per_scale=(2, 2, 2), channels_per_scale=(32, 64, 64))
    model = _seeded(cfg)
    conv = model.left[0][0].conv1.weight  # fan_in 32 * 9 -> std 0.1 * sqrt(2 / 288)
    assert abs(conv.std().item() / (0.1 * (2 / 288) ** 0.5) - 1) < 0.1
    assert torch.count_nonzero(model.left[0][0].conv1.bias) == 0
    assert torch.count_nonzero(model.condition.output.bias) == 0
    # Transposed convs keep PyTorch's default init (the authors' init skips them): bias non-zero.
    assert torch.count_nonzero(model.up[0].bias) > 0
    # Seeded init is reproducible and seed-dependent.
    same = _seeded(cfg, seed=0).state_dict()
    other = _seeded(cfg, seed=1).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    assert not torch.equal(other["head.weight"], same["head.weight"])


def test_zero_condition_at_init_is_identity() -> None:
    """Init makes every tuning weight 0 at z = 0 (zero biases): G starts as the identity there."""
    model = _seeded(TINY)
    x, _ = _inputs()
    assert torch.equal(model(x, torch.zeros(2, 2)), x)


def test_gradients_reach_trunk_and_condition() -> None:
    model = Generator(TINY)
    _randomise_condition(model)
    x, z = _inputs()
    model(x, z).square().mean().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert model.condition.fusion[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"blocks_per_scale": (1,) * 4, "channels_per_scale": (4,) * 4}, "1 to 3 scales"),
        ({"blocks_per_scale": (), "channels_per_scale": ()}, "1 to 3 scales"),
        ({"blocks_per_scale": (1, 1), "channels_per_scale": (4, 8, 8)}, "one entry per scale"),
        ({"channels_per_scale": (4, 0, 8)}, "positive integers"),
        ({"down_kernel": 3}, "even"),
        ({"in_channels": 3, "out_channels": 1}, "in_channels must equal out_channels"),
        ({"cond_dim": 0}, "cond_dim"),
        ({"conditional": 1}, "bool"),
    ],
)
def test_invalid_configs_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GeneratorConfig(**kwargs)


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = GENERATOR_CONFIGS["cugan-2"]
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    assert GeneratorConfig(blocks_per_scale=[1, 1, 1], channels_per_scale=[4, 8, 8]) == TINY
    with pytest.raises(ValueError, match="unknown keys"):
        GeneratorConfig.from_dict({"chanels": [4]})


def test_down_kernel_4_still_halves() -> None:
    cfg = GeneratorConfig(blocks_per_scale=(1, 1), channels_per_scale=(4, 8), down_kernel=4)
    x, z = _inputs(size=8)
    assert _seeded(cfg)(x, z).shape == x.shape


@pytest.mark.parametrize(
    "x_shape,z_shape,match",
    [
        ((1, 3, 10, 12), (1, 2), "multiples of 4"),
        ((1, 1, 8, 8), (1, 2), r"\[B, 3, H, W\]"),
        ((1, 3, 8, 8), (1, 3), "z of shape"),
        ((2, 3, 8, 8), (1, 2), "z of shape"),
    ],
)
def test_bad_inputs_rejected(x_shape: tuple, z_shape: tuple, match: str) -> None:
    model = Generator(TINY)
    with pytest.raises(ValueError, match=match):
        model(torch.rand(x_shape), torch.rand(z_shape))


def test_missing_z_rejected_when_conditional() -> None:
    with pytest.raises(ValueError, match=r"z .* is required"):
        Generator(TINY)(torch.rand(1, 3, 8, 8), None)


def test_registry_names_and_errors() -> None:
    assert set(GENERATOR_CONFIGS) == {
        "authors",
        "demo",
        "tiny",
        "cugan-1",
        "cugan-2",
        "cugan-3",
        "unet",
    }
    assert set(DISCRIMINATOR_CONFIGS) == {"authors", "tiny", "no-gfm"}
    for name in ("cugan-1", "cugan-2", "cugan-3"):
        cfg = GENERATOR_CONFIGS[name]
        assert 2 * sum(cfg.blocks_per_scale) == 12  # 12 MRBs in total, equal per scale
        assert len(set(cfg.blocks_per_scale)) == 1
        assert cfg.num_scales == int(name[-1])
    assert GENERATOR_CONFIGS["unet"].conditional is False
    with pytest.raises(UnknownConfigError, match="known: authors"):
        build_generator("author")
    rows = describe_configs()
    assert {(r["name"], r["kind"]) for r in rows} >= {
        ("authors", "generator"),
        ("no-gfm", "discriminator"),
    }
    by_name = {(r["name"], r["kind"]): r for r in rows}
    assert by_name[("authors", "generator")]["parameters"] == 6_534_476
    assert all(isinstance(r["summary"], str) and r["summary"] for r in rows)


# ---------------------------------------------------------------------------------------------
# spatially varying condition: z as a map [B, D, H, W]


def _constant_map(z: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return z[:, :, None, None].expand(-1, -1, h, w).contiguous()


@pytest.mark.parametrize(
    "blocks,channels",
    [((2,), (8,)), ((1, 2), (4, 8)), ((1, 1, 1), (4, 8, 8))],
    ids=["1-scale", "2-scale", "3-scale"],
)
def test_constant_map_equals_vector_path_bit_for_bit(
    blocks: tuple[int, ...], channels: tuple[int, ...]
) -> None:
    model = _seeded(GeneratorConfig(blocks_per_scale=blocks, channels_per_scale=channels))
    _randomise_condition(model)
    x, z = _inputs(batch=2, size=16)
    with torch.no_grad():
        vector = model(x, z)
        mapped = model(x, _constant_map(z, 16, 16))
    assert (vector - x).abs().max() > 1e-3  # the condition does something
    assert torch.equal(mapped, vector)


def test_two_region_map_equals_vector_path_away_from_the_boundary() -> None:
    from pipeline.inference import receptive_field_radius

    model = _seeded(TINY)
    _randomise_condition(model)
    g = torch.Generator().manual_seed(4)
    h, w, cut = 16, 160, 78  # a boundary off the 4-pixel grid of the coarsest scale
    x = torch.rand(1, 3, h, w, generator=g)
    za, zb = torch.tensor([[0.1, 0.9]]), torch.tensor([[0.8, 0.2]])
    zmap = _constant_map(za, h, w)
    zmap[..., cut:] = zb[:, :, None, None]
    margin = receptive_field_radius(TINY) + TINY.size_multiple  # reach of a conv + of the pooling
    with torch.no_grad():
        out = model(x, zmap)
        out_a, out_b = model(x, za), model(x, zb)
    assert torch.equal(out[..., : cut - margin], out_a[..., : cut - margin])
    assert torch.equal(out[..., cut + margin :], out_b[..., cut + margin :])
    # Near the boundary the output is neither: each side sees the other's condition.
    assert (out[..., cut - 2 : cut] - out_a[..., cut - 2 : cut]).abs().max() > 1e-4
    assert (out[..., cut : cut + 2] - out_b[..., cut : cut + 2]).abs().max() > 1e-4


def test_map_weights_are_the_per_pixel_linear_of_the_pooled_map() -> None:
    """Each scale's weight map is C_G's Linear at every pixel of the map average-pooled by the
    scale's stride; the mean of z is the mean of the weights (they are affine in z)."""
    model = _seeded(TINY)
    _randomise_condition(model)
    g = torch.Generator().manual_seed(6)
    zmap = torch.rand(2, 2, 8, 12, generator=g)  # 96 distinct values: the exact per-value path
    w = model.tuning_weights(zmap)
    for s, sites in enumerate(model.condition.left):
        pooled = torch.nn.functional.avg_pool2d(zmap.double(), 2**s).float()
        assert w.left[s][0].shape == (2, TINY.channels_per_scale[s], 8 >> s, 12 >> s)
        expected = sites[0](pooled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(w.left[s][0], expected, atol=1e-6, rtol=1e-6)
        full = sites[0](zmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # weights at full res
        torch.testing.assert_close(
            w.left[s][0], torch.nn.functional.avg_pool2d(full, 2**s), atol=1e-5, rtol=1e-5
        )
    assert w.output.shape == (2, 3, 8, 12) and w.fusion[1].shape == (2, 8, 4, 6)


def test_map_with_many_distinct_values_goes_through_as_one_batch() -> None:
    from models.generator import EXACT_MAP_VALUES

    model = _seeded(TINY)
    _randomise_condition(model)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(1, 3, 24, 24, generator=g)
    zmap = torch.rand(1, 2, 24, 24, generator=g)  # 576 distinct values at full resolution
    assert EXACT_MAP_VALUES < 24 * 24
    w = model.tuning_weights(zmap)
    expected = model.condition.output(zmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(w.output, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        out = model(x, zmap)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pool_condition_keeps_constant_regions_exact() -> None:
    from models.generator import pool_condition

    value = torch.tensor(0.1, dtype=torch.float32)  # 4 * 0.1 rounds in float32
    zmap = value.expand(1, 2, 8, 8).contiguous()
    for factor in (1, 2, 4):
        pooled = pool_condition(zmap, factor)
        assert pooled.dtype == torch.float32 and pooled.shape[-1] == 8 // factor
        assert torch.equal(pooled, value.expand_as(pooled))


@pytest.mark.parametrize(
    "z_shape,match",
    [
        ((1, 2, 8, 4), r"z map of shape \[1, 2, 8, 8\]"),
        ((2, 2, 8, 8), r"z map of shape \[1, 2, 8, 8\]"),
        ((1, 3, 8, 8), r"z map of shape \[1, 2, 8, 8\]"),
        ((1, 2, 8), r"z of shape \[1, 2\] or a z map"),
    ],
)
def test_bad_z_maps_rejected(z_shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Generator(TINY)(torch.rand(1, 3, 8, 8), torch.rand(z_shape))


def test_integer_z_rejected() -> None:
    with pytest.raises(ValueError, match="floating-point z"):
        Generator(TINY)(torch.rand(1, 3, 8, 8), torch.ones(1, 2, dtype=torch.int64))


def test_unconditional_ignores_a_z_map() -> None:
    cfg = GeneratorConfig(
        blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8), conditional=False
    )
    model = _seeded(cfg)
    x, _ = _inputs(batch=1, size=8)
    assert torch.equal(model(x, torch.rand(1, 2, 8, 8)), model(x, None))
