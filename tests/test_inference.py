"""pipeline.inference: z validation, padding/cropping, tiling, device choice, model loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.generator import Generator, GeneratorConfig
from models.registry import build_generator
from pipeline.checkpoint import CheckpointError, save_generator
from pipeline.condition import DEFAULT_SCALE, ConditionScale
from pipeline.degradation import to_tensor, to_uint8
from pipeline.device import resolve_device
from pipeline.inference import (
    InferenceError,
    load_model_for_inference,
    receptive_field_radius,
    restore,
    tile_layout,
    validate_z,
)
from pipeline.inference.geometry import run_pieces


def _run_tiled(model, x, z, tile, overlap, multiple, device, dtype):
    """The tiled run of :func:`pipeline.inference.geometry.run_pieces` with the eager module."""
    return run_pieces(
        model,
        x,
        z,
        out_channels=model.config.out_channels,
        multiple=multiple,
        tile=tile,
        overlap=overlap,
        device=device,
        dtype=dtype,
    )


Z = [0.5, 0.6]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _strong(cfg: str | GeneratorConfig = "tiny", seed: int = 0) -> Generator:
    """A model whose output depends visibly on a wide neighbourhood (the 0.1-scaled init gives
    a near-identity map, which would make every tiling test pass trivially)."""
    model = build_generator(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _direct(model: Generator, image: np.ndarray, z) -> np.ndarray:
    """Reference: replicate-pad by hand, run the model once, crop, quantise."""
    m = model.size_multiple
    h, w = image.shape[:2]
    x = to_tensor(image)
    x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="replicate")
    with torch.no_grad():
        out = model(x, torch.tensor([z], dtype=torch.float32))
    return to_uint8(out[..., :h, :w])


# ---------------------------------------------------------------------------------------------
# z


@pytest.mark.parametrize(
    "z", [[0.0, 1.0], (0.25, 0.6), np.array([0.5, 0.5]), torch.tensor([[1.0, 0.0]]), [[0.1, 0.2]]]
)
def test_validate_z_accepts(z) -> None:
    t = validate_z(z, 2)
    assert t.shape == (1, 2) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.as_tensor(np.asarray(z, dtype=np.float32)).reshape(-1))


@pytest.mark.parametrize(
    "z, words",
    [
        ([0.5], "shape"),
        ([0.5, 0.5, 0.5], "shape"),
        ([[0.5, 0.5], [0.5, 0.5]], "shape"),
        ([float("nan"), 0.5], "finite"),
        ([float("inf"), 0.5], "finite"),
        ([-0.01, 0.5], "[0, 1]"),
        ([0.5, 1.01], "[0, 1]"),
        (None, "required"),
        ("ab", "numbers"),
    ],
)
def test_validate_z_refuses(z, words: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_z(z, 2)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_restore_checks_z_against_the_model() -> None:
    model = build_generator("tiny")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        restore(model, _image(8, 8), [0.5, 2.0])
    with pytest.raises(ValueError, match="required"):
        restore(model, _image(8, 8), None)


@pytest.mark.parametrize(
    "image, word",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8), np.uint8), "H x W x 3"),
        (np.zeros((0, 8, 3), np.uint8), "H x W x 3"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "numpy"),
    ],
)
def test_restore_checks_the_image(image, word: str) -> None:
    with pytest.raises((ValueError, TypeError), match=word):
        restore(build_generator("tiny"), image, Z)


# ---------------------------------------------------------------------------------------------
# padding and cropping


@pytest.mark.parametrize("h, w", [(1, 1), (13, 7), (5, 9), (16, 16), (17, 31)])
def test_odd_sizes_are_padded_and_cropped_back(h: int, w: int) -> None:
    model = _strong()
    image = _image(h, w, seed=h * 100 + w)
    out = restore(model, image, Z)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _direct(model, image, Z))


def test_two_scale_model_pads_to_two() -> None:
    cfg = GeneratorConfig(blocks_per_scale=(1, 1), channels_per_scale=(4, 8))
    model = _strong(cfg)
    assert model.size_multiple == 2
    image = _image(9, 11)
    np.testing.assert_array_equal(restore(model, image, Z), _direct(model, image, Z))


def test_works_inside_inference_mode_and_z_changes_the_output() -> None:
    model = _strong()
    image = _image(16, 20)
    with torch.inference_mode():
        a = restore(model, image, [0.0, 0.0])
        b = restore(model, image, [1.0, 1.0])
    assert not np.array_equal(a, b)


def test_unconditional_model_ignores_a_missing_z() -> None:
    cfg = GeneratorConfig(
        blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8), conditional=False
    )
    model = _strong(cfg)
    image = _image(12, 12)
    np.testing.assert_array_equal(restore(model, image, None), restore(model, image, [0.3, 0.3]))


def test_non_finite_output_is_an_inference_error() -> None:
    model = build_generator("tiny")
    with torch.no_grad():
        model.tail.bias.fill_(float("nan"))
    with pytest.raises(InferenceError, match="non-finite"):
        restore(model, _image(8, 8), Z)


# ---------------------------------------------------------------------------------------------
# tiling


def test_tile_layout_partitions_and_aligns() -> None:
    spans = tile_layout(100, 30, 10, 4)  # core 32, margin 12
    cores = [(c0, c1) for _, _, c0, c1 in spans]
    assert cores == [(0, 32), (32, 64), (64, 96), (96, 100)]
    for i0, i1, c0, c1 in spans:
        assert i0 % 4 == 0 and i1 % 4 == 0
        assert i0 == max(0, c0 - 12) and i1 == min(100, c1 + 12)
    with pytest.raises(ValueError):
        tile_layout(99, 30, 10, 4)


def test_receptive_field_radius_bounds_the_real_one() -> None:
    model = _strong().double()
    radius = receptive_field_radius(model.config)
    size = 2 * radius + 24
    x = torch.rand(
        1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    z = torch.tensor([Z], dtype=torch.float64)
    c = size // 2
    y = x.clone()
    y[..., c, c] += 0.5
    with torch.no_grad():
        changed = (model(y, z) - model(x, z)).abs().amax(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    reach = int(torch.maximum((rows - c).abs(), (cols - c).abs()).max())
    assert 0 < reach <= radius
    assert reach >= radius // 2  # and the bound is not absurdly loose


def test_tiled_equals_untiled_when_the_overlap_covers_the_receptive_field() -> None:
    model = _strong()
    radius = receptive_field_radius(model.config)
    image = _image(70, 90, seed=7)
    x = F.pad(to_tensor(image), (0, 2, 0, 2), mode="replicate")  # 72 x 92
    z = torch.tensor([Z])
    with torch.inference_mode():
        whole = model(x, z)
        tiled = _run_tiled(model, x, z, 24, radius, 4, torch.device("cpu"), torch.float32)
        seamy = _run_tiled(model, x, z, 24, 0, 4, torch.device("cpu"), torch.float32)
    exact_gap = (tiled - whole).abs().max().item()
    seam_gap = (seamy - whole).abs().max().item()
    assert exact_gap < 1e-5, exact_gap  # float summation order only
    assert seam_gap > 1e-2, seam_gap  # the test would notice a wrong layout

    out_whole = restore(model, image, Z)
    out_tiled = restore(model, image, Z, tile=24, tile_overlap=radius)
    diff = np.abs(out_whole.astype(int) - out_tiled.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_default_overlap_difference_is_small() -> None:
    # The library default (32 px) is below the tiny model's bound (36 px): not exact, but close.
    model = _strong()
    image = _image(80, 96, seed=3)
    diff = np.abs(
        restore(model, image, Z).astype(int) - restore(model, image, Z, tile=32).astype(int)
    )
    assert diff.max() <= 2


def test_tile_larger_than_the_image_is_the_untiled_path() -> None:
    model = _strong()
    image = _image(20, 28)
    np.testing.assert_array_equal(restore(model, image, Z, tile=64), restore(model, image, Z))


@pytest.mark.parametrize("kw", [{"tile": 0}, {"tile": -4}, {"tile": 2.5}, {"tile_overlap": -1}])
def test_bad_tiling_arguments(kw) -> None:
    with pytest.raises(ValueError):
        restore(build_generator("tiny"), _image(8, 8), Z, **kw)


# ---------------------------------------------------------------------------------------------
# devices


def test_resolve_device() -> None:
    """Inference resolves devices with pipeline.device's resolver (the one for the whole tree)."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        restore(build_generator("tiny"), _image(8, 8), Z, device="tpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = _strong()
    image = _image(40, 52)
    cpu = restore(model, image, Z, device="cpu")
    gpu = restore(model, image, Z, device="cuda")
    tiled = restore(
        model, image, Z, device="cuda", tile=16, tile_overlap=receptive_field_radius(model.config)
    )
    assert np.abs(cpu.astype(int) - gpu.astype(int)).max() <= 1
    assert np.abs(gpu.astype(int) - tiled.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# loading


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    cfg2 = GeneratorConfig(blocks_per_scale=(1, 1), channels_per_scale=(4, 8))
    return {
        "mse": save_generator(root / "mse", _strong(seed=1), metadata={"stage": "mse"}),
        "gan": save_generator(root / "gan", _strong(seed=2), metadata={"stage": "gan"}),
        "other": save_generator(root / "other", _strong(cfg2, seed=3), metadata={}),
    }


def test_load_checkpoint_dir_and_file(checkpoints: dict[str, Path]) -> None:
    a = load_model_for_inference(checkpoints["mse"]).model
    b = load_model_for_inference(str(checkpoints["mse"] / "generator.safetensors")).model
    assert not a.training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_dni_ends_are_the_two_models_and_the_middle_is_the_average(checkpoints) -> None:
    mse = load_model_for_inference(checkpoints["mse"]).model
    gan = load_model_for_inference(checkpoints["gan"]).model
    for alpha, ref in ((1.0, mse), (0.0, gan)):
        blend = load_model_for_inference(
            None, mse_model=checkpoints["mse"], gan_model=checkpoints["gan"], alpha=alpha
        ).model
        for k, v in blend.state_dict().items():
            assert torch.equal(v, ref.state_dict()[k]), k
    half = load_model_for_inference(
        None, mse_model=checkpoints["mse"], gan_model=checkpoints["gan"], alpha=0.5
    ).model
    key = "head.weight"
    assert torch.equal(half.state_dict()[key], (mse.state_dict()[key] + gan.state_dict()[key]) / 2)


@pytest.mark.parametrize(
    "args, kw, words",
    [
        ((None,), {}, "no model given"),
        ((None,), {"alpha": 0.5}, "both"),
        ((None,), {"alpha": 0.5, "mse_model": "x"}, "both"),
        ((None,), {"mse_model": "x", "gan_model": "y"}, "without alpha"),
        (("x",), {"alpha": 0.5}, "not both"),
        ((None,), {"alpha": 1.5, "mse_model": "x", "gan_model": "y"}, "[0, 1]"),
        (
            ("models:/cugan/3",),
            {"tracking_uri": "sqlite:////nonexistent/mlflow.db"},
            "models:/cugan/3: no MLflow store at /nonexistent/mlflow.db",
        ),
    ],
)
def test_load_argument_errors(args, kw, words: str) -> None:
    with pytest.raises(ValueError) as info:
        load_model_for_inference(*args, **kw)
    assert words in str(info.value)


def test_dni_with_different_configs(checkpoints) -> None:
    with pytest.raises(ValueError, match=r"configs differ.*channels_per_scale"):
        load_model_for_inference(
            None, mse_model=checkpoints["mse"], gan_model=checkpoints["other"], alpha=0.5
        )


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_model_for_inference(tmp_path / "missing")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_model_for_inference(bad)


# ---------------------------------------------------------------------------------------------
# the z scale travels with the loaded model


def _with_scale(path: Path, model: Generator, scale: ConditionScale) -> Path:
    return save_generator(path, model, metadata={}, scale=scale)


def test_loaded_model_carries_its_checkpoint_scale(tmp_path: Path, checkpoints) -> None:
    half_blur = ConditionScale(blur_max=2.0, noise_max=50.0)
    path = _with_scale(tmp_path / "b2", _strong(seed=5), half_blur)
    loaded = load_model_for_inference(path)
    assert loaded.scale == half_blur and loaded.source == str(path)
    assert len(loaded.parts) == 1 and loaded.parts[0].path == path
    assert loaded.config == loaded.model.config and not loaded.model.training
    assert load_model_for_inference(checkpoints["mse"]).scale == DEFAULT_SCALE


def test_blend_carries_the_shared_scale_and_its_parts(checkpoints) -> None:
    blend = load_model_for_inference(
        None, mse_model=checkpoints["mse"], gan_model=checkpoints["gan"], alpha=0.25
    )
    assert blend.scale == DEFAULT_SCALE
    assert [part.path for part in blend.parts] == [checkpoints["mse"], checkpoints["gan"]]
    assert "alpha 0.25 blend" in blend.source
    # the parts re-blend in memory to the same weights (what a slider does)
    from models.dni import blend_generators

    again = blend_generators(blend.parts[0].model, blend.parts[1].model, 0.25)
    for k, v in again.state_dict().items():
        assert torch.equal(v, blend.model.state_dict()[k]), k


def test_blend_of_different_scales_is_one_error(tmp_path: Path, checkpoints) -> None:
    other = _with_scale(tmp_path / "gan8", _strong(seed=2), ConditionScale(8.0, 50.0))
    with pytest.raises(ValueError) as info:
        load_model_for_inference(None, mse_model=checkpoints["mse"], gan_model=other, alpha=0.5)
    message = str(info.value)
    assert "\n" not in message
    assert "different condition scales" in message
    assert "z = [blur/4, noise/50] vs z = [blur/8, noise/50]" in message


def test_argument_names_are_the_callers(checkpoints) -> None:
    from pipeline.inference import ModelArgumentNames

    names = ModelArgumentNames("-m", "-a", "-b", "-x")
    with pytest.raises(ValueError, match="-x needs both -a and -b"):
        load_model_for_inference(None, alpha=0.5, names=names)
    with pytest.raises(ValueError, match=r"-x must be in \[0, 1\] \(got 2\)"):
        load_model_for_inference(None, mse_model="p", gan_model="q", alpha=2.0, names=names)
