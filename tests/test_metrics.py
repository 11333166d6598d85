"""Metrics against the references that define their conventions (skimage, lpips, DISTS_pytorch)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import pipeline.metrics as metrics
from pipeline.degradation import degrade, to_tensor
from pipeline.metrics import RANDOM_BACKBONE_TAG, DISTSMetric, LPIPSMetric, psnr, rgb_to_y, ssim
from pipeline.pretrained import BackboneWeights, PretrainedWeightsMissing, WeightsDownloadError

# ---------------------------------------------------------------------------------------------
# helpers


def _cbsd68_files(n: int) -> list[Path]:
    env = os.environ.get("CUGAN_CBSD68_DIR")
    directory = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/datasets/CBSD68"
    files = sorted(directory.glob("*.png"))[:n] if directory.is_dir() else []
    if not files:
        pytest.skip(f"CBSD68 not found at {directory}")
    return files


def _synthetic_pair(seed: int, h: int = 40, w: int = 52) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    clean = 128 + 90 * np.sin(xx / 4.0 + seed)[..., None] * np.cos(yy / 6.0)[..., None]
    clean = np.clip(clean + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    noisy = np.clip(clean + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    return clean, noisy


def _real_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 160x200 crop of a CBSD68 image and its blur-2 / noise-30 degradation (uint8)."""
    clean = np.asarray(Image.open(path).convert("RGB"))[40:200, 60:260]
    degraded = degrade(to_tensor(clean), 2.0, 30.0, generator=torch.Generator().manual_seed(0))
    return clean, (degraded[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _t(arr: np.ndarray) -> torch.Tensor:
    return to_tensor(arr)


def _y255(arr: np.ndarray) -> np.ndarray:
    """Luma on 0..255, by scikit-image's rgb2ycbcr (an independent BT.601 implementation)."""
    return rgb2ycbcr(arr.astype(np.float64) / 255.0)[..., 0]


def _crop(arr: np.ndarray, k: int) -> np.ndarray:
    return arr[k:-k, k:-k] if k else arr


def _sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=255)


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a.astype(np.float64),
        b.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=2 if a.ndim == 3 else None,
    )


def _check_against_skimage(clean: np.ndarray, other: np.ndarray) -> None:
    a, b = _t(clean), _t(other)
    for crop in (0, 4):
        rgb_a, rgb_b = _crop(clean, crop), _crop(other, crop)
        y_a, y_b = _crop(_y255(clean), crop), _crop(_y255(other), crop)
        assert psnr(a, b, crop_border=crop).item() == pytest.approx(
            _sk_psnr(rgb_a, rgb_b), abs=1e-4
        )
        assert ssim(a, b, crop_border=crop).item() == pytest.approx(
            _sk_ssim(rgb_a, rgb_b), abs=1e-6
        )
        assert psnr(a, b, crop_border=crop, y_channel=True).item() == pytest.approx(
            _sk_psnr(y_a, y_b), abs=1e-4
        )
        assert ssim(a, b, crop_border=crop, y_channel=True).item() == pytest.approx(
            _sk_ssim(y_a, y_b), abs=1e-6
        )


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_ssim_equal_skimage_synthetic(seed: int) -> None:
    _check_against_skimage(*_synthetic_pair(seed))


@pytest.mark.shared
def test_psnr_ssim_equal_skimage_cbsd68() -> None:
    for path in _cbsd68_files(2):
        _check_against_skimage(*_real_pair(path))


def test_rgb_to_y_equals_skimage_and_matlab_range() -> None:
    clean, _ = _synthetic_pair(0)
    y = rgb_to_y(torch.from_numpy(clean / 255.0).permute(2, 0, 1)[None])[0, 0].numpy() * 255
    np.testing.assert_allclose(y, _y255(clean), rtol=0, atol=1e-9)
    ends = rgb_to_y(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1)) * 255
    torch.testing.assert_close(ends.flatten(), torch.tensor([16.0, 235.0]))
    assert not np.allclose(y, np.round(y))  # not rounded


def test_metrics_batched_equal_per_image() -> None:
    pairs = [_synthetic_pair(s) for s in range(3)]
    a = torch.cat([_t(p[0]) for p in pairs])
    b = torch.cat([_t(p[1]) for p in pairs])
    for fn in (psnr, ssim):
        batch = fn(a, b, crop_border=2, y_channel=True)
        assert batch.shape == (3,)
        single = torch.cat(
            [fn(a[i : i + 1], b[i : i + 1], crop_border=2, y_channel=True) for i in range(3)]
        )
        torch.testing.assert_close(batch, single, rtol=0, atol=1e-12)
    assert psnr(a[0], b[0]).shape == (1,)  # an unbatched [C, H, W] image


def test_identical_images() -> None:
    a = _t(_synthetic_pair(0)[0])
    assert psnr(a, a).item() == float("inf")
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)


def test_metric_input_errors() -> None:
    a = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, torch.rand(1, 3, 20, 21))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, crop_border=10)
    with pytest.raises(ValueError, match="crop_border"):
        ssim(a, a, crop_border=-1)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a, a, crop_border=5)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        psnr(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20), y_channel=True)


@pytest.mark.gpu
def test_psnr_ssim_on_cuda_equal_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    clean, noisy = _synthetic_pair(4)
    a, b = _t(clean), _t(noisy)
    for fn in (psnr, ssim):
        out = fn(a.cuda(), b.cuda(), crop_border=3, y_channel=True)
        assert out.device.type == "cuda"
        torch.testing.assert_close(
            out.cpu(), fn(a, b, crop_border=3, y_channel=True), rtol=0, atol=1e-9
        )


# ---------------------------------------------------------------------------------------------
# LPIPS / DISTS


def _seeded_state_dict(factory, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.clone() for k, v in factory(weights=None).state_dict().items()}


@pytest.fixture(scope="module")
def alexnet_sd() -> dict[str, torch.Tensor]:
    return _seeded_state_dict(torchvision.models.alexnet, 123)


def _vgg16_features() -> torch.nn.Sequential:
    """torchvision's VGG16 ``features`` without paying for the 100M-parameter classifier."""
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    return model.features.to_empty(device="cpu")


@pytest.fixture(scope="module")
def vgg16_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    features = _vgg16_features()
    sd = {}
    for key, value in features.state_dict().items():
        fan_in = value[0].numel() if value.ndim > 1 else 1
        std = (2.0 / fan_in) ** 0.5 if value.ndim > 1 else 0.01
        sd[f"features.{key}"] = torch.randn(value.shape, generator=g) * std
    return sd


def _fake_resolve(sd: dict[str, torch.Tensor]):
    def resolve(name, mode="auto", cache_dir=None, **_):
        return BackboneWeights(sd, False, f"{name} test weights")

    return resolve


def _image_pair(seed: int = 0, b: int = 2, h: int = 48, w: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, 3, h, w, generator=g)
    return a, (a + 0.1 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)


def test_lpips_equals_lpips_package_on_same_weights(monkeypatch, alexnet_sd) -> None:
    monkeypatch.setattr(metrics, "resolve_backbone", _fake_resolve(alexnet_sd))
    ours = LPIPSMetric("imagenet")
    assert ours.label == "lpips-alex-v0.1" and ours.is_random is False

    reference_trunk = torchvision.models.alexnet(weights=None)
    reference_trunk.load_state_dict(alexnet_sd)
    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", lambda **_: reference_trunk)
    reference = lpips.LPIPS(
        net="alex", version="0.1", pretrained=True, pnet_rand=False, verbose=False
    ).eval()

    a, b = _image_pair()
    with torch.no_grad():
        expected = reference(2 * a - 1, 2 * b - 1).flatten()  # [0, 1] -> [-1, 1] by hand
    got = ours(a, b)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the weights really were loaded: a random-trunk metric gives other numbers
    monkeypatch.undo()
    random_metric = LPIPSMetric("random")
    assert random_metric.label == f"lpips-alex-v0.1 {RANDOM_BACKBONE_TAG}"
    assert random_metric.is_random is True
    assert not torch.allclose(random_metric(a, b), got)


def test_lpips_random_is_deterministic_and_keeps_global_rng() -> None:
    a, b = _image_pair(1, b=1, h=32, w=32)
    torch.manual_seed(99)
    before = torch.rand(1)
    torch.manual_seed(99)
    first = LPIPSMetric("random")
    after = torch.rand(1)
    assert torch.equal(before, after)
    torch.testing.assert_close(first(a, b), LPIPSMetric("random")(a, b), rtol=0, atol=0)
    assert first(a, a).abs().max().item() < 1e-6
    assert first(a, b).shape == (1,)


def test_dists_equals_reference_implementation_on_same_weights(monkeypatch, vgg16_sd) -> None:
    dists_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt")
    if not (Path(sys.prefix) / "weights.pt").is_file():
        pytest.skip("DISTS_pytorch's weights.pt is not installed in sys.prefix")
    monkeypatch.setattr(metrics, "resolve_backbone", _fake_resolve(vgg16_sd))
    ours = DISTSMetric("imagenet")
    assert ours.label == "dists-vgg16"

    trunk = types.SimpleNamespace(features=_vgg16_features())
    trunk.features.load_state_dict({k.removeprefix("features."): v for k, v in vgg16_sd.items()})
    monkeypatch.setattr(dists_pt, "models", types.SimpleNamespace(vgg16=lambda **_: trunk))
    reference = dists_pt.DISTS(load_weights=True).eval()

    a, b = _image_pair(2)
    expected = reference(b, a)  # DISTS_pytorch: (x, y) = (reference, distorted); symmetric anyway
    got = ours(b, a)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    monkeypatch.undo()
    random_metric = DISTSMetric("random")
    assert random_metric.label == f"dists-vgg16 {RANDOM_BACKBONE_TAG}"
    assert not torch.allclose(random_metric(b, a), got)


def test_dists_single_image_and_identity() -> None:
    metric = DISTSMetric("random")
    a, b = _image_pair(3, b=1, h=40, w=40)
    assert metric(a, b).shape == (1,)
    assert metric(a[0], a[0]).abs().item() < 1e-5


def test_learned_metric_input_errors() -> None:
    metric = LPIPSMetric("random")
    with pytest.raises(ValueError, match="shape"):
        metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 33))
    with pytest.raises(ValueError, match="RGB"):
        metric(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))


def test_imagenet_mode_without_weights_raises(monkeypatch, tmp_path) -> None:
    import pipeline.pretrained as pretrained

    def fail(*_, **__):
        raise WeightsDownloadError("no network in tests")

    monkeypatch.setattr(pretrained, "download_weights", fail)
    monkeypatch.setattr(pretrained, "_hub_checkpoints_dir", lambda: tmp_path / "hub")
    with pytest.raises(PretrainedWeightsMissing, match=r"alexnet-owt-7be5be79\.pth"):
        LPIPSMetric("imagenet", cache_dir=tmp_path)
    with pytest.raises(PretrainedWeightsMissing, match=r"vgg16-397923af\.pth"):
        DISTSMetric("imagenet", cache_dir=tmp_path)
    assert RANDOM_BACKBONE_TAG in DISTSMetric("auto", cache_dir=tmp_path).label
