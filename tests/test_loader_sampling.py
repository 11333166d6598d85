"""``degradation.sampling``: the drawn level distribution, in the torch sampler and in DALI.

``authors`` (generate_2groups.m on the project's grid): with probability 1/2 one degradation
(blur only or noise only, 1/4 each), otherwise both; a level is grid index ``round(U * K)``,
``U ~ Uniform(0, 1)``, so the indices 0 and K have probability 1/(2K), the others 1/K.
Every frequency below is compared with its exact probability within 5 binomial standard
deviations, from a fixed seed: a wrong mixture fails by tens of sigmas, a right one never
flakes (the draws are deterministic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DegradationParams, parse_params
from pipeline.degradation import sample_levels

N_TORCH = 200_000


def level_probability(k: int, top: int) -> float:
    """P(grid index k) of round(U * top): half mass at the two end points."""
    return 1 / (2 * top) if k in (0, top) else 1 / top


def expected_authors(kb: int, kn: int) -> dict[str, float]:
    """Exact probabilities of the observable events for grids of kb + 1 and kn + 1 points."""
    b0, n0 = level_probability(0, kb), level_probability(0, kn)
    return {
        "both_nonzero": 0.5 * (1 - b0) * (1 - n0),
        "blur_only_nonzero": 0.25 * (1 - b0) + 0.5 * (1 - b0) * n0,
        "noise_only_nonzero": 0.25 * (1 - n0) + 0.5 * b0 * (1 - n0),
        "clean": 0.25 * b0 + 0.25 * n0 + 0.5 * b0 * n0,
        "blur_zero": 0.25 + 0.75 * b0,
        "noise_zero": 0.25 + 0.75 * n0,
        "blur_top": 0.75 * level_probability(kb, kb),
        "noise_top": 0.75 * level_probability(kn, kn),
        "blur_mid": 0.75 * level_probability(kb // 2, kb),
        "noise_mid": 0.75 * level_probability(kn // 2, kn),
    }


def observed(blur_idx: np.ndarray, noise_idx: np.ndarray, kb: int, kn: int) -> dict[str, float]:
    b, n = blur_idx > 0, noise_idx > 0
    return {
        "both_nonzero": np.mean(b & n),
        "blur_only_nonzero": np.mean(b & ~n),
        "noise_only_nonzero": np.mean(~b & n),
        "clean": np.mean(~b & ~n),
        "blur_zero": np.mean(~b),
        "noise_zero": np.mean(~n),
        "blur_top": np.mean(blur_idx == kb),
        "noise_top": np.mean(noise_idx == kn),
        "blur_mid": np.mean(blur_idx == kb // 2),
        "noise_mid": np.mean(noise_idx == kn // 2),
    }


def assert_authors_distribution(blur_idx, noise_idx, kb: int, kn: int) -> None:
    n = len(blur_idx)
    want = expected_authors(kb, kn)
    got = observed(np.asarray(blur_idx), np.asarray(noise_idx), kb, kn)
    for name, p in want.items():
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(got[name] - p) < 5 * sigma, f"{name}: {got[name]:.5f} vs {p:.5f} (n={n})"
    # end points: half the mass of an interior level (the Beta(1, 1) rounding)
    assert got["blur_top"] < 0.75 * got["blur_mid"] and got["noise_top"] < 0.75 * got["noise_mid"]


def test_the_stated_probabilities():
    """The numbers the docs and the issue state, from the formula the tests use."""
    p = expected_authors(40, 50)
    assert p["blur_zero"] == pytest.approx(0.259375) and round(p["blur_zero"], 2) == 0.26
    assert p["noise_zero"] == pytest.approx(0.2575)
    assert sum(
        p[k] for k in ("both_nonzero", "blur_only_nonzero", "noise_only_nonzero", "clean")
    ) == (pytest.approx(1.0))
    assert sum(level_probability(k, 40) for k in range(41)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "grid", [{}, {"blur_max": 2.0, "blur_step": 0.5, "noise_max": 10.0, "noise_step": 5.0}]
)
def test_torch_sampler_draws_the_authors_mixture(grid):
    params = DegradationParams(sampling="authors", **grid)
    blur, noise = sample_levels(N_TORCH, torch.Generator().manual_seed(0), params)
    assert blur.dtype == noise.dtype == torch.float32 and blur.shape == (N_TORCH,)
    kb = round(params.blur_max / params.blur_step)
    kn = round(params.noise_max / params.noise_step)
    blur_idx = torch.round(blur.double() / params.blur_step).long().numpy()
    noise_idx = torch.round(noise.double() / params.noise_step).long().numpy()
    assert np.allclose(blur.numpy(), blur_idx * params.blur_step, atol=1e-6)  # on the grid
    assert set(blur_idx.tolist()) == set(range(kb + 1))
    assert set(noise_idx.tolist()) == set(range(kn + 1))
    assert_authors_distribution(blur_idx, noise_idx, kb, kn)


def test_torch_authors_sampler_is_seeded_and_consumes_four_numbers_per_sample():
    params = DegradationParams(sampling="authors")
    a = sample_levels(100, torch.Generator().manual_seed(4), params)
    b = sample_levels(100, torch.Generator().manual_seed(4), params)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    gen = torch.Generator().manual_seed(4)
    sample_levels(10, gen, params)
    after = torch.rand(1, generator=gen)
    ref = torch.Generator().manual_seed(4)
    torch.rand((10, 4), generator=ref, dtype=torch.float64)
    assert torch.equal(after, torch.rand(1, generator=ref))


def test_uniform_stays_the_default_and_bad_values_fail_in_one_line():
    assert parse_params({}).degradation.sampling == "uniform"
    assert parse_params({"degradation": {"sampling": "authors"}}).degradation.sampling == "authors"
    with pytest.raises(ConfigError, match=r"degradation\.sampling") as err:
        parse_params({"degradation": {"sampling": "beta"}})
    assert "\n" not in str(err.value)


def test_the_paper_profile_uses_the_authors_mixture():
    from pathlib import Path

    import yaml

    profile = yaml.safe_load((Path(__file__).parents[1] / "profiles" / "paper.yaml").read_text())
    assert profile["degradation"]["sampling"] == "authors"


# ---------------------------------------------------------------------------------------------
# DALI


def _dali_levels(sampling: str, blur_values, noise_values, batches: int, batch: int, seed: int):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import pipeline_def

    from pipeline.data.dali_graph import level_nodes

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=seed)
    def levels():
        return level_nodes(sampling, blur_values, noise_values)

    pipe = levels()
    pipe.build()
    blur, noise = [], []
    for _ in range(batches):
        b, n = pipe.run()
        blur.append(np.array(b.as_tensor()).ravel())
        noise.append(np.array(n.as_tensor()).ravel())
    return np.concatenate(blur), np.concatenate(noise)


@pytest.mark.parametrize(
    "grid", [{}, {"blur_max": 2.0, "blur_step": 0.5, "noise_max": 10.0, "noise_step": 5.0}]
)
def test_dali_graph_draws_the_authors_mixture(grid):
    from pipeline.degradation import level_grid

    params = DegradationParams(sampling="authors", **grid)
    blur_values = level_grid(params.blur_max, params.blur_step)
    noise_values = level_grid(params.noise_max, params.noise_step)
    blur, noise = _dali_levels("authors", blur_values, noise_values, 40, 4096, seed=1)
    assert blur.dtype == noise.dtype == np.float32
    # exactly the grid's float32 values (a lookup, not arithmetic)
    assert set(blur.tolist()) <= set(np.float32(blur_values).tolist())
    blur_idx = np.rint(blur / params.blur_step).astype(int)
    noise_idx = np.rint(noise / params.noise_step).astype(int)
    kb, kn = len(blur_values) - 1, len(noise_values) - 1
    assert set(blur_idx.tolist()) == set(range(kb + 1))
    assert_authors_distribution(blur_idx, noise_idx, kb, kn)


def test_dali_and_torch_draw_the_same_distribution():
    """Two-sample check of every event frequency (5 sigmas of the difference)."""
    from pipeline.degradation import level_grid

    blur_values, noise_values = level_grid(4.0, 0.1), level_grid(50.0, 1.0)
    db, dn = _dali_levels("authors", blur_values, noise_values, 40, 4096, seed=7)
    tb, tn = sample_levels(
        N_TORCH, torch.Generator().manual_seed(7), DegradationParams(sampling="authors")
    )
    dali = observed(np.rint(db * 10).astype(int), np.rint(dn).astype(int), 40, 50)
    ref = observed(
        torch.round(tb.double() * 10).long().numpy(),
        torch.round(tn.double()).long().numpy(),
        40,
        50,
    )
    for name, p in expected_authors(40, 50).items():
        sigma = math.sqrt(p * (1 - p) * (1 / len(db) + 1 / N_TORCH))
        assert abs(dali[name] - ref[name]) < 5 * sigma, name


def test_dali_uniform_sampling_is_unchanged():
    from pipeline.degradation import level_grid

    blur, noise = _dali_levels("uniform", level_grid(4.0, 0.1), level_grid(50.0, 1.0), 8, 4096, 2)
    idx = np.rint(blur * 10).astype(int)
    counts = np.bincount(idx, minlength=41)
    p = 1 / 41
    sigma = math.sqrt(p * (1 - p) / len(idx))
    assert np.all(np.abs(counts / len(idx) - p) < 5 * sigma)  # end points too: no half mass
    assert abs(np.mean(noise == 0) - 1 / 51) < 5 * math.sqrt(1 / 51 * 50 / 51 / len(noise))


def test_dali_training_pipeline_uses_the_configured_sampling(tmp_path):
    """The training graph's own level nodes (debug outputs), and z matches them."""
    pytest.importorskip("nvidia.dali")
    from pipeline.config import ShardParams
    from pipeline.data.batch import read_shard_set
    from pipeline.data.dali_pipeline import DEBUG_OUTPUTS, OUTPUTS, build_train_pipeline
    from pipeline.data.shards import write_shards
    from pipeline.degradation import level_grid

    rng = np.random.default_rng(0)
    samples = [
        {"key": f"img{i:02d}-y0-x0", "raw": rng.integers(0, 256, (24, 24, 3), np.uint8).tobytes()}
        for i in range(8)
    ]
    write_shards(samples, lambda s: s["raw"], tmp_path, ShardParams(), crop_size=24, encoding="raw")
    s = read_shard_set(tmp_path)
    pipe = build_train_pipeline(
        tars=s.tars,
        indices=s.indices,
        encoding="raw",
        sub_size=24,
        batch_size=256,
        crop=16,
        sampling="authors",
        blur_values=level_grid(4.0, 0.1),
        noise_values=level_grid(50.0, 1.0),
        blur_max=4.0,
        noise_max=50.0,
        seed=3,
        num_threads=1,
        shuffle_buffer=8,
        debug=True,
    )
    pipe.build()
    names = list(OUTPUTS) + list(DEBUG_OUTPUTS)
    blur, noise = [], []
    for _ in range(4):
        out = {k: np.array(v.as_tensor()) for k, v in zip(names, pipe.run(), strict=True)}
        assert np.allclose(out["z"][:, 0] * 4.0, out["blur"], atol=1e-6)
        assert np.allclose(out["z"][:, 1] * 50.0, out["noise"], atol=1e-5)
        blur.append(out["blur"].ravel())
        noise.append(out["noise"].ravel())
    blur, noise = np.concatenate(blur), np.concatenate(noise)
    want = expected_authors(40, 50)
    got = observed(np.rint(blur * 10).astype(int), np.rint(noise).astype(int), 40, 50)
    for name in ("both_nonzero", "blur_only_nonzero", "noise_only_nonzero", "blur_zero"):
        p = want[name]
        assert abs(got[name] - p) < 5 * math.sqrt(p * (1 - p) / len(blur)), name
