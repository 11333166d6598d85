"""The DALI loader against the torch reference degradation, and the loader contract.

- Before noise (blur, replicate border, 8-bit quantisation) DALI equals
  ``pipeline.degradation.degrade(..., noise=0)`` within one grey level.
- The noise DALI adds has the requested std at every level.
- ``z`` encodes the levels that were actually applied.
- Crops/flips/transposes keep degraded and clean aligned.
- Two ranks read disjoint samples that cover the set; a restored loader continues exactly.
All on the CPU (the GPU variant of the parity check is marked ``gpu``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipeline.config import ShardParams, parse_params
from pipeline.data.batch import read_shard_set
from pipeline.data.dali_pipeline import (
    DEBUG_OUTPUTS,
    OUTPUTS,
    DaliTrainLoader,
    build_train_pipeline,
    level_grid,
    run_degradation,
)
from pipeline.data.extract import encode_png
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import write_shards
from pipeline.degradation import blur as ref_blur
from pipeline.degradation import degrade, quantize

CBSD68 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "CBSD68"
SIZE = 24  # sub-image size of the tiny shards
CROP = 16


# ---------------------------------------------------------------------------------------------
# helpers


def textured_image(i: int, size: int = SIZE) -> np.ndarray:
    """Random texture in R and G; B is the constant ``10 * (i + 1)`` that identifies image i."""
    rng = np.random.default_rng(1000 + i)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img[..., 2] = 10 * (i + 1)
    return img


def make_shards(directory: Path, n: int, per_shard: int = 3) -> dict[str, np.ndarray]:
    """Shards of ``n`` identifiable images via the shards stage's writer; returns key -> image."""
    images = {f"img{i:02d}-y0-x0": textured_image(i) for i in range(n)}
    samples = [{"key": k, "png": encode_png(v, 1)} for k, v in images.items()]
    write_shards(
        samples, lambda s: s["png"], directory, ShardParams(max_count=per_shard), crop_size=SIZE
    )
    return images


def image_id(clean_chw: np.ndarray) -> int:
    """Image index from the constant blue channel of a clean patch."""
    blue = np.round(clean_chw[2] * 255).astype(int)
    assert (blue == blue.flat[0]).all()
    return blue.flat[0] // 10 - 1


def key_of(source_info: np.ndarray) -> str:
    """``<tar>:<offset>:<member>`` bytes (zero-padded) -> sample key."""
    text = bytes(source_info.astype(np.uint8).tolist()).rstrip(b"\0").decode()
    return text.rsplit(":", 1)[-1].split(".", 1)[0]


def pipeline_args(shards_dir: Path, **overrides):
    s = read_shard_set(shards_dir)
    args = {
        "tars": s.tars,
        "indices": s.indices,
        "batch_size": 4,
        "crop": CROP,
        "blur_values": level_grid(4.0, 0.1),
        "noise_values": level_grid(50.0, 1.0),
        "blur_max": 4.0,
        "noise_max": 50.0,
        "kernel_size": 21,
        "seed": 11,
        "num_threads": 1,
        "shuffle_buffer": 64,
        "debug": True,
    }
    args.update(overrides)
    return args


def run_batches(pipe, iterations: int) -> list[dict[str, np.ndarray]]:
    pipe.build()
    names = list(OUTPUTS) + list(DEBUG_OUTPUTS)
    return [
        {name: np.array(out.as_tensor()) for name, out in zip(names, pipe.run(), strict=True)}
        for _ in range(iterations)
    ]


def sample_images(count: int = 6, size: int = 64) -> list[np.ndarray]:
    """CBSD68 crops when the shared dataset is present, else smooth synthetic images."""
    if CBSD68.is_dir():
        from PIL import Image

        files = sorted(CBSD68.glob("*.png"))[:count]
        return [np.asarray(Image.open(f).convert("RGB"))[:size, 10 : 10 + size + 7] for f in files]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0 : size + 7]
    out = []
    for _ in range(count):
        base = 127 + 100 * np.sin(xx / rng.uniform(2, 9))[..., None] * np.cos(yy / 5)[..., None]
        out.append(np.clip(base + rng.normal(0, 20, (size, size + 7, 3)), 0, 255).astype(np.uint8))
    return out


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    stacked = torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images])
    return stacked.float() / 255.0


def reference_patches(images: dict[str, np.ndarray], b: dict[str, np.ndarray], whole_fn):
    """Each sample's patch of ``whole_fn(sub_image [1, 3, H, W] float64, i)`` -- the WHOLE
    sub-image degraded, then cropped at the drawn position and flipped as drawn (what a
    context-margin patch must equal)."""
    out = []
    for i in range(len(b["blur"])):
        whole = as_batch([images[key_of(b["source_info"][i])]]).double()
        top, left = (int(v) for v in b["top_left"][i])
        patch = whole_fn(whole, i)[0, :, top : top + CROP, left : left + CROP]
        if b["hflip"][i]:
            patch = patch.flip(-1)
        if b["vflip"][i]:
            patch = patch.flip(-2)
        if b["transpose"][i]:
            patch = patch.transpose(-1, -2)
        out.append(patch)
    return torch.stack(out).numpy()


# ---------------------------------------------------------------------------------------------
# degradation parity (test entry: run_degradation)


@pytest.mark.parametrize("blur_level", [0.0, 0.1, 0.5, 1.0, 2.0, 3.7, 4.0])
def test_blur_and_quantisation_match_reference_before_noise(blur_level):
    images = sample_images()  # 64 x 71: non-square, so H/W mix-ups show
    n = len(images)
    out = run_degradation(images, [blur_level] * n, [0.0] * n)
    clean = as_batch(images)
    assert np.array_equal(out["clean"], clean.numpy())
    # Float blur, borders included: replicate semantics to float32 precision.
    ref = ref_blur(clean.double(), blur_level).numpy()
    assert np.abs(out["blurred"] - ref).max() < 1e-5
    # After 8 bits: within one level, and equal almost everywhere.
    expected = degrade(clean.double(), blur_level, 0.0).numpy()
    diff = np.abs(out["degraded"] - expected)
    assert diff.max() <= 1 / 255 + 1e-6
    assert (diff > 1e-6).mean() < 1e-3
    assert np.allclose(out["degraded"] * 255, np.round(out["degraded"] * 255), atol=1e-4)


def test_per_sample_levels_in_one_batch():
    images = sample_images(4)
    levels = [0.0, 0.7, 2.3, 4.0]
    out = run_degradation(images, levels, [0.0] * 4)
    expected = degrade(as_batch(images).double(), torch.tensor(levels), 0.0).numpy()
    assert np.abs(out["degraded"] - expected).max() <= 1 / 255 + 1e-6
    assert out["blur"].tolist() == pytest.approx(levels)


@pytest.mark.parametrize("blur_level", [0.0, 2.0])
def test_noise_has_requested_std(blur_level):
    sigmas = [1.0, 5.0, 15.0, 30.0, 50.0]
    grey = [np.full((64, 64, 3), 128, np.uint8)] * len(sigmas)
    out = run_degradation(grey, [blur_level] * len(sigmas), sigmas, seed=3)
    noise = (out["noisy"] - out["blurred"]).astype(np.float64)  # before clamp/quantisation
    for i, sigma in enumerate(sigmas):
        values = noise[i].ravel()  # 12288 values: relative std error ~0.6%
        assert values.std() == pytest.approx(sigma / 255, rel=0.04)
        assert abs(values.mean()) < 4 * sigma / 255 / np.sqrt(values.size)
        # independent per pixel and channel
        assert abs(np.corrcoef(noise[i, 0].ravel(), noise[i, 1].ravel())[0, 1]) < 0.05
        neighbours = np.corrcoef(noise[i, 0, :, :-1].ravel(), noise[i, 0, :, 1:].ravel())
        assert abs(neighbours[0, 1]) < 0.05
    # quantisation of the noisy image is the reference clip-and-round
    ref_q = quantize(torch.from_numpy(out["noisy"]).double()).numpy()
    assert np.abs(out["degraded"] - ref_q).max() <= 1 / 255 + 1e-6
    assert (np.abs(out["degraded"] - ref_q) > 1e-6).mean() < 1e-3


def test_zero_noise_adds_nothing():
    images = sample_images(2)
    out = run_degradation(images, [1.5, 1.5], [0.0, 0.0])
    assert np.array_equal(out["noisy"], out["blurred"])


@pytest.mark.gpu
def test_gpu_degradation_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images = sample_images(4)
    levels = [0.0, 0.7, 2.3, 4.0]
    out = run_degradation(images, levels, [0.0] * 4, device_id=0)
    expected = degrade(as_batch(images).double(), torch.tensor(levels), 0.0).numpy()
    assert np.abs(out["degraded"] - expected).max() <= 1 / 255 + 1e-6
    noisy = run_degradation(
        [np.full((64, 64, 3), 128, np.uint8)] * 2, [0.0, 0.0], [30.0, 30.0], device_id=0
    )
    assert (noisy["noisy"] - noisy["blurred"]).std() == pytest.approx(30 / 255, rel=0.04)


# ---------------------------------------------------------------------------------------------
# the training pipeline: z, alignment, geometry


def test_z_encodes_applied_levels_and_blur_is_that_level(tmp_path):
    images = make_shards(tmp_path, 8)
    batches = run_batches(build_train_pipeline(**pipeline_args(tmp_path, noise_values=[0.0])), 3)
    for b in batches:
        assert np.allclose(b["z"][:, 0] * 4.0, b["blur"], atol=1e-6)
        assert np.allclose(b["z"][:, 1] * 50.0, b["noise"], atol=1e-5)
        blur = torch.from_numpy(b["z"][:, 0].astype(np.float64) * 4.0)
        # context margins: the patch of the whole sub-image degraded at that level
        expected = reference_patches(
            images, b, lambda w, i, blur=blur: degrade(w, float(blur[i]), 0.0)
        )
        assert np.abs(b["degraded"] - expected).max() <= 1 / 255 + 1e-6
        # ... and not some other level: a level 0.5 away is measurably worse.
        other_all = reference_patches(
            images, b, lambda w, i, blur=blur: degrade(w, float(abs(blur[i] - 0.5)), 0.0)
        )
        for i in range(len(blur)):
            other = other_all[i : i + 1]
            if not np.array_equal(other, expected[i : i + 1]):
                assert np.abs(b["degraded"][i] - other).max() > 1 / 255
    levels = np.concatenate([b["blur"] for b in batches])
    assert set(np.round(levels * 10).astype(int).tolist()) <= set(range(41))


def test_zero_levels_give_degraded_equal_to_clean(tmp_path):
    make_shards(tmp_path, 8)
    args = pipeline_args(tmp_path, blur_values=[0.0], noise_values=[0.0])
    for b in run_batches(build_train_pipeline(**args), 4):
        assert np.array_equal(b["degraded"], b["clean"])
        assert not b["z"].any()


def test_clean_patch_is_a_flipped_or_transposed_window_of_the_sample(tmp_path):
    images = make_shards(tmp_path, 8)
    seen = set()
    for b in run_batches(build_train_pipeline(**pipeline_args(tmp_path)), 6):
        for i in range(4):
            key = key_of(b["source_info"][i])
            assert image_id(b["clean"][i]) == int(key[3:5])  # key <-> pixels agree
            top, left = b["top_left"][i]
            window = images[key][top : top + CROP, left : left + CROP]
            if b["hflip"][i]:
                window = window[:, ::-1]
            if b["vflip"][i]:
                window = window[::-1]
            if b["transpose"][i]:
                window = window.transpose(1, 0, 2)
            assert np.array_equal(
                np.round(b["clean"][i] * 255).astype(np.uint8), window.transpose(2, 0, 1)
            )
            seen.add((int(b["hflip"][i]), int(b["vflip"][i]), bool(b["transpose"][i])))
    assert len(seen) >= 6  # the dihedral draws do vary (8 possible)


def test_blur_only_degraded_is_blurred_clean_up_to_quantisation(tmp_path):
    images = make_shards(tmp_path, 8)
    args = pipeline_args(tmp_path, blur_values=[2.0], noise_values=[0.0])
    for b in run_batches(build_train_pipeline(**args), 2):
        # the blurred clean SUB-IMAGE (context margins), cropped and flipped like the patch
        expected = reference_patches(images, b, lambda w, i: quantize(ref_blur(w, 2.0)))
        assert np.abs(b["degraded"] - expected).max() <= 1 / 255 + 1e-6


# ---------------------------------------------------------------------------------------------
# sharding and resume


def epoch_keys(loader: DaliTrainLoader) -> list[str]:
    return [key_of(info) for out in loader.iter_outputs() for info in out["source_info"].numpy()]


@pytest.mark.parametrize("n", [8, 9])
def test_two_ranks_read_disjoint_samples_covering_the_set(tmp_path, n):
    make_shards(tmp_path, n)
    params = parse_params({"loader": {"crop": CROP, "batch_size": 2, "num_threads": 1}})
    shards = read_shard_set(tmp_path)
    loaders = [
        DaliTrainLoader(shards, params, rank=r, world_size=2, seed=5, debug=True) for r in (0, 1)
    ]
    assert len(loaders[0]) == len(loaders[1]) == (n // 2) // 2
    for _epoch in range(3):
        keys = [epoch_keys(loader) for loader in loaders]
        assert len(keys[0]) == len(keys[1]) == 2 * len(loaders[0])
        assert not set(keys[0]) & set(keys[1])
        assert set(keys[0] + keys[1]) <= {f"img{i:02d}-y0-x0" for i in range(n)}
        if n == 8:  # even shares: every sample exactly once per epoch
            assert sorted(keys[0] + keys[1]) == sorted(f"img{i:02d}-y0-x0" for i in range(n))
        # (with uneven shares pad_last_batch repeats a sample of the larger share, so that a
        # rank may see it twice in an epoch; the ranks still never overlap)


def test_epochs_are_reshuffled(tmp_path):
    make_shards(tmp_path, 12, per_shard=12)
    params = parse_params({"loader": {"crop": CROP, "batch_size": 4, "num_threads": 1}})
    loader = DaliTrainLoader(read_shard_set(tmp_path), params, seed=2, debug=True)
    orders = [epoch_keys(loader) for _ in range(3)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)  # each epoch: every sample
    assert len({tuple(o) for o in orders}) == 3


def _consume(loader, count: int) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    out: list = []
    while len(out) < count:
        for batch in loader:
            out.append((loader.epoch, *batch))
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("stop", [1, 3, 4, 5])  # 4 batches per epoch: 4 = end of epoch 0
def test_restored_loader_continues_with_the_same_batches(tmp_path, stop):
    make_shards(tmp_path, 8)
    params = parse_params(
        {"loader": {"crop": CROP, "batch_size": 2, "num_threads": 1, "backend": "dali"}}
    )
    total = 10
    reference = _consume(build_train_loader(tmp_path, params, seed=4), total)
    first = build_train_loader(tmp_path, params, seed=4)
    head = _consume(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    assert (state["epoch"], state["batch"]) == divmod(stop, 4)
    resumed = build_train_loader(tmp_path, params, seed=4)
    resumed.load_state_dict(state)
    tail = _consume(resumed, total - stop)
    for got, want in zip(head + tail, reference, strict=True):
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:], strict=True):
            assert torch.equal(a, b)


def test_state_from_another_world_size_restarts_the_epoch(tmp_path, caplog):
    make_shards(tmp_path, 8)
    params = parse_params(
        {"loader": {"crop": CROP, "batch_size": 2, "num_threads": 1, "backend": "dali"}}
    )
    first = build_train_loader(tmp_path, params, seed=4)
    _consume(first, 5)
    state = first.state_dict()
    other = build_train_loader(tmp_path, params, rank=1, world_size=2, seed=4)
    other.load_state_dict(state)
    assert "restarting epoch 1" in caplog.text
    assert (other.state_dict()["epoch"], other.state_dict()["batch"]) == (1, 0)


def test_torch_and_dali_batches_agree_in_kind(tmp_path):
    """Same shapes, dtypes, value grids and z grid from both backends (the oracle is usable)."""
    make_shards(tmp_path, 8)
    out = {}
    for backend in ("dali", "torch"):
        params = parse_params(
            {"loader": {"crop": CROP, "batch_size": 4, "num_threads": 1, "backend": backend}}
        )
        loader = build_train_loader(tmp_path, params, seed=1)
        if backend == "torch":
            loader.num_workers = 0
        out[backend] = next(iter(loader))
    for a, b in zip(out["dali"], out["torch"], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    for batch in out.values():
        assert torch.allclose(batch.degraded * 255, torch.round(batch.degraded * 255), atol=1e-4)
        assert torch.allclose(batch.z[:, 0] * 40, torch.round(batch.z[:, 0] * 40), atol=1e-4)
        assert torch.allclose(batch.z[:, 1] * 50, torch.round(batch.z[:, 1] * 50), atol=1e-4)
