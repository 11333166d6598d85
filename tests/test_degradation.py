"""The reference degradation against independent constructions (OpenCV, SciPy) and its contracts."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pipeline.config import ConfigError, DegradationParams, parse_params
from pipeline.degradation import (
    blur,
    degrade,
    gaussian_kernel1d,
    gaussian_kernel2d,
    quantize,
    sample_levels,
    to_tensor,
    to_uint8,
)

SIGMAS = [0.0, 0.1, 0.3, 0.5, 1.0, 1.7, 2.0, 3.3, 4.0]


def _cbsd68_dir() -> Path:
    env = os.environ.get("CUGAN_CBSD68_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/datasets/CBSD68"


def _real_image(max_side: int = 160) -> np.ndarray:
    """A crop of a CBSD68 image (uint8 HxWx3); skips the test when the set is absent."""
    directory = _cbsd68_dir()
    files = sorted(directory.glob("*.png")) if directory.is_dir() else []
    if not files:
        pytest.skip(f"CBSD68 not found at {directory}")
    arr = np.asarray(Image.open(files[0]).convert("RGB"))
    return np.ascontiguousarray(arr[:max_side, : max_side + 20])


def _synthetic_image(h: int = 48, w: int = 56, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 127 + 100 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None]
    arr = smooth + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _scipy_blur(arr01: np.ndarray, sigma: float, size: int = 21) -> np.ndarray:
    """imfilter(img, fspecial('gaussian', size, sigma), 'replicate') built from OpenCV + SciPy."""
    if sigma == 0:
        return arr01.copy()
    g = cv2.getGaussianKernel(size, sigma, cv2.CV_64F)
    k = g @ g.T
    k /= k.sum()
    return np.stack(
        [ndimage.correlate(arr01[..., c], k, mode="nearest") for c in range(arr01.shape[2])],
        axis=2,
    )


def _to64(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float64) / 255.0).permute(2, 0, 1)[None]


# ---------------------------------------------------------------------------------------------
# kernel


@pytest.mark.parametrize("sigma", SIGMAS)
def test_kernel_equals_opencv_outer_product(sigma: float) -> None:
    k = gaussian_kernel2d(sigma, 21).numpy()
    if sigma == 0:
        expected = np.zeros((21, 21))
        expected[10, 10] = 1.0
    else:
        g = cv2.getGaussianKernel(21, sigma, cv2.CV_64F)
        expected = g @ g.T
        expected /= expected.sum()
    # fspecial zeroes entries below eps * max; those differ from OpenCV by < 2.3e-16.
    np.testing.assert_allclose(k, expected, rtol=0, atol=1e-15)
    assert k.sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_array_equal(k, k.T)
    np.testing.assert_array_equal(k, k[::-1, ::-1])


def test_kernel_matlab_truncation() -> None:
    # exp(-9 / (2 * 0.3^2)) = exp(-50) ~ 2e-22 < eps: fspecial sets it to exactly zero.
    k = gaussian_kernel2d(0.3, 21)
    assert k[10, 13].item() == 0.0
    assert k[10, 11].item() > 0.0
    assert not torch.isnan(gaussian_kernel2d(0.0)).any()


@pytest.mark.parametrize("sigma", SIGMAS)
def test_kernel1d_equals_opencv(sigma: float) -> None:
    k = gaussian_kernel1d(sigma, 21).numpy()
    if sigma == 0:
        expected = np.eye(21)[10]
    else:
        expected = cv2.getGaussianKernel(21, sigma, cv2.CV_64F)[:, 0]
        expected = expected / expected.sum()
    np.testing.assert_allclose(k, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_kernel_rejects_bad_sigma(bad: float) -> None:
    with pytest.raises(ValueError, match="blur std"):
        gaussian_kernel2d(bad)


@pytest.mark.parametrize("size", [0, 20, -3])
def test_kernel_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel2d(1.0, size)


# ---------------------------------------------------------------------------------------------
# blur


@pytest.mark.parametrize("sigma", [0.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("method", ["separable", "direct"])
def test_blur_equals_scipy_replicate_synthetic(sigma: float, method: str) -> None:
    arr = _synthetic_image()
    out = blur(_to64(arr), sigma, 21, method=method)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, _scipy_blur(arr / 255.0, sigma), rtol=0, atol=1e-12)


@pytest.mark.shared
@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_blur_equals_scipy_replicate_real_image(sigma: float) -> None:
    arr = _real_image()
    out = blur(_to64(arr), sigma)[0].permute(1, 2, 0).numpy()
    expected = _scipy_blur(arr / 255.0, sigma)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    # The border is where replicate differs from the other modes: make sure it is exercised.
    kernel = gaussian_kernel2d(sigma).numpy()
    reflect = ndimage.correlate(arr[..., 0] / 255.0, kernel, mode="reflect")
    assert np.abs(reflect - expected[..., 0]).max() > 1e-4


def test_blur_image_smaller_than_kernel() -> None:
    arr = _synthetic_image(5, 7)
    out = blur(_to64(arr), 3.0)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, _scipy_blur(arr / 255.0, 3.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.2, 0.7, 1.0, 2.5, 4.0])
def test_separable_equals_2d_kernel(sigma: float) -> None:
    """The separable passes implement fspecial's 2-D kernel (proof of the shortcut)."""
    img = _to64(_synthetic_image(40, 44, seed=3))
    sep = blur(img, sigma, method="separable")
    direct = blur(img, sigma, method="direct")
    torch.testing.assert_close(sep, direct, rtol=0, atol=1e-12)


def test_blur_float32_precision() -> None:
    img = _to64(_synthetic_image())
    out32 = blur(img.float(), 2.0)
    assert out32.dtype == torch.float32
    assert (out32.double() - blur(img, 2.0)).abs().max().item() < 1e-6


def test_blur_per_sample_equals_one_at_a_time() -> None:
    imgs = torch.cat([_to64(_synthetic_image(seed=s)) for s in range(4)])
    sigmas = torch.tensor([0.0, 0.5, 2.0, 4.0])
    batch = blur(imgs, sigmas)
    for i in range(4):
        torch.testing.assert_close(
            batch[i : i + 1], blur(imgs[i : i + 1], float(sigmas[i])), rtol=0, atol=1e-14
        )
    assert torch.equal(batch[0], imgs[0])


def test_blur_leaves_input_unchanged() -> None:
    img = _to64(_synthetic_image())
    before = img.clone()
    blur(img, 2.0)
    assert torch.equal(img, before)


def test_blur_rejects_bad_input() -> None:
    img = _to64(_synthetic_image())
    with pytest.raises(ValueError, match="float"):
        blur((img * 255).to(torch.uint8), 1.0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        blur(img[0], 1.0)
    with pytest.raises(ValueError, match="batch of 1"):
        blur(img, [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        blur(img, -1.0)
    with pytest.raises(ValueError, match="method"):
        blur(img, 1.0, method="fft")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# noise, quantisation, degrade


@pytest.mark.parametrize("sigma", [5.0, 15.0, 30.0, 50.0])
def test_noise_statistics(sigma: float) -> None:
    img = torch.full((2, 3, 128, 128), 0.5, dtype=torch.float64)
    out = degrade(img, 0.0, sigma, generator=torch.Generator().manual_seed(7), quantize=False)
    residual = out - img
    n = residual.numel()
    # std of a sample std is ~ std / sqrt(2n) (0.2 % here); allow 6 of those.
    assert residual.std().item() == pytest.approx(sigma / 255.0, rel=6 / np.sqrt(2 * n))
    assert abs(residual.mean().item()) < 6 * sigma / 255.0 / np.sqrt(n)


def test_noise_added_after_blur_and_scaled_per_sample() -> None:
    img = torch.cat([_to64(_synthetic_image(seed=s)) for s in range(3)])
    blur_levels, noise_levels = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 10.0, 50.0])
    out = degrade(
        img, blur_levels, noise_levels, generator=torch.Generator().manual_seed(1), quantize=False
    )
    residual = out - blur(img, blur_levels)
    assert torch.equal(residual[0], torch.zeros_like(residual[0]))
    g = torch.Generator().manual_seed(1)
    expected = [
        torch.randn(img.shape[1:], generator=g, dtype=img.dtype) * s / 255.0
        for s in noise_levels.tolist()
    ]
    torch.testing.assert_close(residual, torch.stack(expected), rtol=0, atol=1e-12)


def test_quantized_output_is_k_over_255_and_clipped() -> None:
    img = torch.cat([_to64(_synthetic_image(seed=s)) for s in range(2)]).float()
    out = degrade(img, [2.0, 0.0], [50.0, 50.0], generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    levels = torch.arange(256, dtype=torch.float32) / 255.0
    assert torch.isin(out, levels).all()
    assert out.min().item() == 0.0 and out.max().item() == 1.0  # sigma 50 saturates somewhere
    raw = degrade(
        img, [2.0, 0.0], [50.0, 50.0], generator=torch.Generator().manual_seed(0), quantize=False
    )
    assert raw.min().item() < 0.0 and raw.max().item() > 1.0
    assert (out - raw.clamp(0, 1)).abs().max().item() <= 0.5 / 255.0 + 1e-6


def test_quantize_rounds_half_up_like_im2uint8() -> None:
    # Values whose x * 255 is an exact .5 in float64: round-half-up gives k + 1 for every one;
    # round-half-to-even (torch.round) would give k for even k.
    k = np.arange(255, dtype=np.float64)
    x = (k + 0.5) / 255.0
    exact = x * 255.0 == k + 0.5
    assert exact.sum() >= 20
    q = quantize(torch.from_numpy(x[exact])) * 255.0
    np.testing.assert_allclose(q.numpy(), k[exact] + 1, rtol=0, atol=1e-9)
    assert (torch.round(torch.from_numpy(x[exact]) * 255.0).numpy() != k[exact] + 1).any()
    arr = to_uint8(
        torch.from_numpy(
            np.broadcast_to(x[exact][:, None, None], (len(x[exact]), 1, 1))
            .reshape(1, 1, -1)
            .repeat(3, 0)
            .copy()
        )
    )
    np.testing.assert_array_equal(arr[0, :, 0], (k[exact] + 1).astype(np.uint8))


def test_same_seed_same_output_different_seed_different() -> None:
    img = _to64(_synthetic_image()).float()
    a = degrade(img, 1.0, 25.0, generator=torch.Generator().manual_seed(3))
    b = degrade(img, 1.0, 25.0, generator=torch.Generator().manual_seed(3))
    c = degrade(img, 1.0, 25.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degrade_batch_equals_one_at_a_time() -> None:
    imgs = torch.cat([_to64(_synthetic_image(seed=s)) for s in range(3)])
    r, s = [0.0, 1.5, 4.0], [30.0, 0.0, 50.0]
    g = torch.Generator().manual_seed(11)
    batch = degrade(imgs, r, s, generator=g)
    g = torch.Generator().manual_seed(11)
    single = torch.cat([degrade(imgs[i : i + 1], r[i], s[i], generator=g) for i in range(3)])
    assert torch.equal(batch, single)


def test_degrade_needs_generator_only_for_noise() -> None:
    img = _to64(_synthetic_image())
    with pytest.raises(ValueError, match="Generator"):
        degrade(img, 1.0, 5.0)
    out = degrade(img, 1.0, 0.0)
    torch.testing.assert_close(out, quantize(blur(img, 1.0)), rtol=0, atol=0)


@pytest.mark.gpu
def test_degrade_cpu_generator_same_noise_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    img = torch.cat([_to64(_synthetic_image(seed=s)) for s in range(2)])
    kwargs = dict(quantize=False)
    levels = ([1.0, 3.0], [10.0, 40.0])
    cpu = degrade(img, *levels, generator=torch.Generator().manual_seed(5), **kwargs)
    gpu = degrade(img.cuda(), *levels, generator=torch.Generator().manual_seed(5), **kwargs)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# level sampling


def test_sample_levels_on_grid_and_covering() -> None:
    blur_levels, noise_levels = sample_levels(
        20000, torch.Generator().manual_seed(0), DegradationParams()
    )
    assert blur_levels.shape == noise_levels.shape == (20000,)
    blur_idx = torch.round(blur_levels.double() * 10)
    assert torch.allclose(blur_levels.double() * 10, blur_idx, atol=1e-5)
    assert torch.equal(noise_levels, torch.round(noise_levels))
    assert set(blur_idx.long().tolist()) == set(range(41))
    assert set(noise_levels.long().tolist()) == set(range(51))
    # uniform: each of 41 blur values expects ~488 draws (sd ~22); each noise value ~392 (sd ~20)
    assert torch.bincount(blur_idx.long()).min().item() > 350
    assert torch.bincount(noise_levels.long()).min().item() > 280


def test_sample_levels_seeded_and_custom_grid() -> None:
    a = sample_levels(50, torch.Generator().manual_seed(1))
    b = sample_levels(50, torch.Generator().manual_seed(1))
    c = sample_levels(50, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    params = DegradationParams(blur_max=2.0, blur_step=0.5, noise_max=10.0, noise_step=5.0)
    r, s = sample_levels(500, torch.Generator().manual_seed(0), params)
    assert set(r.tolist()) == {0.0, 0.5, 1.0, 1.5, 2.0}
    assert set(s.tolist()) == {0.0, 5.0, 10.0}


def test_sample_levels_requires_generator() -> None:
    with pytest.raises(ValueError, match="Generator"):
        sample_levels(3, None)  # type: ignore[arg-type]


def test_degradation_params_grid_must_fit() -> None:
    with pytest.raises(ConfigError, match="degradation"):
        parse_params({"degradation": {"blur_step": 0.3}})
    with pytest.raises(ConfigError, match="odd"):
        parse_params({"degradation": {"kernel_size": 20}})


# ---------------------------------------------------------------------------------------------
# uint8 <-> tensor


def test_uint8_round_trip_exact() -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    t = to_tensor(arr)
    assert t.shape == (1, 3, 17, 23) and t.dtype == torch.float32
    np.testing.assert_array_equal(to_uint8(t), arr)
    np.testing.assert_array_equal(to_uint8(t[0]), arr)
    np.testing.assert_array_equal(to_uint8(t.double()), arr)


def test_to_uint8_clips() -> None:
    t = torch.tensor([-0.5, 0.0, 1.0, 1.7]).view(1, 1, 4).expand(3, 1, 4).clone()
    assert to_uint8(t)[0, :, 0].tolist() == [0, 0, 255, 255]


def test_uint8_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        to_tensor(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="batch of 2"):
        to_uint8(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="float"):
        to_uint8(torch.zeros(3, 4, 4, dtype=torch.uint8))
