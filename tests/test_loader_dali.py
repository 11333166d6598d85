"""The DALI TrainLoader: contract, settings, errors, device selection (CPU; GPU marked)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipeline.config import ShardParams, parse_params
from pipeline.data.batch import Batch, LoaderError, TrainLoader, read_shard_set
from pipeline.data.dali_pipeline import (
    DaliTrainLoader,
    _pipeline_device_id,
    build_train_pipeline,
    level_grid,
    rank_seed,
)
from pipeline.data.extract import encode_png
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import ShardError, describe_shard, write_index, write_shards

SIZE, CROP = 24, 16


def make_shards(directory: Path, n: int, per_shard: int = 3) -> None:
    rng = np.random.default_rng(0)
    samples = [
        {
            "key": f"img{i:02d}-y0-x0",
            "png": encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), 1),
        }
        for i in range(n)
    ]
    write_shards(
        samples, lambda s: s["png"], directory, ShardParams(max_count=per_shard), crop_size=SIZE
    )


def params(**loader):
    return parse_params(
        {"loader": {"crop": CROP, "batch_size": 4, "num_threads": 1, "backend": "dali", **loader}}
    )


@pytest.fixture()
def shards(tmp_path) -> Path:
    make_shards(tmp_path / "shards", 12)
    return tmp_path / "shards"


def test_batches_have_the_documented_form(shards):
    loader = build_train_loader(shards, params(), seed=0)
    assert isinstance(loader, TrainLoader)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and loader.epoch == 1
    for batch in batches:
        assert isinstance(batch, Batch)
        degraded, clean, z = batch
        assert degraded.shape == clean.shape == (4, 3, CROP, CROP)
        assert z.shape == (4, 2)
        assert degraded.dtype == clean.dtype == z.dtype == torch.float32
        assert degraded.device.type == clean.device.type == z.device.type == "cpu"
        for t in (degraded, clean, z):
            assert t.min() >= 0 and t.max() <= 1
        for t in (degraded, clean):  # both on the 8-bit grid
            assert torch.allclose(t * 255, torch.round(t * 255), atol=1e-4)
        assert torch.allclose(z[:, 0] * 40, torch.round(z[:, 0] * 40), atol=1e-4)  # r step 0.1
        assert torch.allclose(z[:, 1] * 50, torch.round(z[:, 1] * 50), atol=1e-4)  # sigma step 1


def test_levels_cover_the_grid_uniformly(shards):
    """Blur and noise levels are drawn from the whole grid (41 x 51 values)."""
    args = {
        "tars": read_shard_set(shards).tars,
        "indices": read_shard_set(shards).indices,
        "batch_size": 64,
        "crop": CROP,
        "blur_values": level_grid(4.0, 0.1),
        "noise_values": level_grid(50.0, 1.0),
        "blur_max": 4.0,
        "noise_max": 50.0,
        "seed": 3,
        "num_threads": 1,
        "debug": True,
    }
    pipe = build_train_pipeline(**args)
    pipe.build()
    blur, noise = [], []
    for _ in range(16):  # 1024 draws
        out = pipe.run()
        blur += np.array(out[3].as_tensor()).tolist()
        noise += np.array(out[4].as_tensor()).tolist()
    blur_idx = np.round(np.array(blur) * 10).astype(int)
    noise_idx = np.round(np.array(noise)).astype(int)
    assert np.allclose(np.array(blur) * 10, blur_idx, atol=1e-4)
    assert blur_idx.min() == 0 and blur_idx.max() == 40 and len(set(blur_idx)) > 35
    assert noise_idx.min() == 0 and noise_idx.max() == 50 and len(set(noise_idx)) > 45
    assert abs(np.mean(blur) - 2.0) < 0.25 and abs(np.mean(noise) - 25.0) < 3.0


def test_level_grid_matches_method_grid():
    blur = level_grid(4.0, 0.1)
    assert len(blur) == 41 and blur[0] == 0.0 and blur[-1] == 4.0 and blur[3] == 0.3
    assert level_grid(50.0, 1.0) == [float(k) for k in range(51)]


def test_same_seed_same_batches_other_seed_differs(shards):
    a = [b.degraded for b in build_train_loader(shards, params(), seed=7)]
    b = [b.degraded for b in build_train_loader(shards, params(), seed=7)]
    c = [b.degraded for b in build_train_loader(shards, params(), seed=8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_rank_seeds_differ():
    assert len({rank_seed(0, r) for r in range(8)}) == 8
    assert rank_seed(0, 1) != rank_seed(1, 0)
    assert all(0 <= rank_seed(s, r) < 2**31 for s in range(3) for r in range(3))


def test_breaking_out_keeps_the_position(shards):
    loader = build_train_loader(shards, params(), seed=1)
    whole = [b.clean for b in build_train_loader(shards, params(), seed=1)]
    got = []
    for batch in loader:
        got.append(batch.clean)
        break
    assert loader.state_dict()["batch"] == 1
    got += [b.clean for b in loader]
    assert len(got) == 3 and all(torch.equal(x, y) for x, y in zip(got, whole, strict=True))


def test_load_state_after_iterating_is_refused(shards):
    loader = build_train_loader(shards, params(), seed=1)
    next(iter(loader))
    with pytest.raises(LoaderError, match="before iterating"):
        loader.load_state_dict(loader.state_dict())


def test_bad_state_is_refused(shards):
    with pytest.raises(LoaderError, match="state_dict"):
        build_train_loader(shards, params(), seed=1).load_state_dict({"nothing": 1})


@pytest.mark.parametrize(
    ("kwargs", "loader_cfg", "message"),
    [
        ({"rank": 2, "world_size": 2}, {}, "rank 2 is not in"),
        ({"seed": -1}, {}, "seed must be"),
        ({}, {"crop": 32}, "larger than the shards' sub-images"),
        ({"world_size": 4}, {}, "fewer than loader.batch_size"),
        # the device goes through pipeline.device.resolve_device, the one resolver
        ({"device": "tpu:0"}, {}, "loader: unknown device 'tpu:0'"),
    ],
)
def test_bad_settings_fail_with_one_line(shards, kwargs, loader_cfg, message):
    with pytest.raises(LoaderError, match=message) as err:
        build_train_loader(shards, params(**loader_cfg), **kwargs)
    assert "\n" not in str(err.value)


def test_missing_shards_fail_with_one_line(tmp_path):
    with pytest.raises(ShardError, match="not found") as err:
        build_train_loader(tmp_path, params())
    assert "\n" not in str(err.value)


def test_sample_without_png_is_an_error_not_an_empty_tensor(tmp_path):
    """missing_component_behavior="error": a sample lacking its png stops the pipeline."""
    tar_path = tmp_path / "shard-00000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(4):
            ext = "jpg" if i == 2 else "png"
            data = encode_png(np.zeros((SIZE, SIZE, 3), np.uint8), 1)
            info = tarfile.TarInfo(f"img{i:02d}-y0-x0.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(tar_path, tmp_path / "shard-00000.idx")
    entry = describe_shard(tar_path, tmp_path / "shard-00000.idx", 4)
    (tmp_path / "shards.json").write_text(
        json.dumps(
            {
                "format": "cugan-shards",
                "version": 2,
                "num_samples": 4,
                "crop_size": 24,
                "shards": [entry],
            }
        )
    )
    loader = build_train_loader(tmp_path, params(batch_size=2), seed=0)
    with pytest.raises(RuntimeError, match="png"):
        list(loader)


def test_device_selection_without_gpu():
    cpu = torch.device("cpu")
    assert _pipeline_device_id("cpu", torch.device("cuda:1")) is None
    assert _pipeline_device_id("auto", cpu) is None
    if not torch.cuda.is_available():
        assert _pipeline_device_id("auto", torch.device("cuda:0")) is None
        with pytest.raises(LoaderError, match="CUDA is not available"):
            _pipeline_device_id("gpu", cpu)


def test_cpu_pipeline_delivers_to_the_requested_device(shards):
    loader = build_train_loader(shards, params(device="cpu"), seed=0, device="auto")
    assert not loader.on_gpu
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(iter(loader)).degraded.device.type == expected


@pytest.mark.gpu
def test_gpu_pipeline_is_selected_and_agrees_with_cpu_semantics(shards):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loader = build_train_loader(shards, params(device="auto"), seed=0, device="cuda:0")
    assert loader.on_gpu
    batch = next(iter(loader))
    for t in batch:
        assert t.device.type == "cuda"
    assert torch.allclose(batch.degraded * 255, torch.round(batch.degraded * 255), atol=1e-4)
    # zero levels on the GPU: degraded == clean exactly (alignment of the GPU augmentations)
    s = read_shard_set(shards)
    pipe = build_train_pipeline(
        tars=s.tars,
        indices=s.indices,
        batch_size=4,
        crop=CROP,
        blur_values=[0.0],
        noise_values=[0.0],
        blur_max=4.0,
        noise_max=50.0,
        device_id=0,
        num_threads=1,
    )
    pipe.build()
    degraded, clean, z = (o.as_cpu().as_array() for o in pipe.run())
    assert np.array_equal(degraded, clean) and not z.any()


@pytest.mark.gpu
def test_gpu_restore_continues_with_the_same_batches(shards):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    first = build_train_loader(shards, params(device="gpu"), seed=3, device="cuda")
    it = iter(first)
    next(it)
    state = first.state_dict()
    want = next(it)
    resumed = build_train_loader(shards, params(device="gpu"), seed=3, device="cuda")
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_loader_debug_outputs_are_documented(shards):
    loader = DaliTrainLoader(read_shard_set(shards), params(), debug=True)
    out = next(loader.iter_outputs())
    assert set(out) == {
        "degraded",
        "clean",
        "z",
        "blur",
        "noise",
        "top_left",
        "hflip",
        "vflip",
        "transpose",
        "source_info",
    }
    assert torch.allclose(out["z"][:, 0] * 4, out["blur"])


def test_stopping_after_the_last_batch_does_not_yield_an_empty_epoch(shards):
    reference = build_train_loader(shards, params(), seed=6)
    want = [list(reference) for _ in range(2)]
    loader = build_train_loader(shards, params(), seed=6)
    it = iter(loader)
    first = [next(it) for _ in range(len(loader))]  # never sees the epoch's StopIteration
    second = list(loader)
    assert loader.epoch == 2
    for got, exp in zip(first + second, want[0] + want[1], strict=True):
        assert torch.equal(got.degraded, exp.degraded)


def test_close_then_iterate_continues(shards):
    want = [b.clean for b in build_train_loader(shards, params(), seed=6)]
    loader = build_train_loader(shards, params(), seed=6)
    it = iter(loader)
    got = [next(it).clean]
    loader.close()
    got += [b.clean for b in loader]
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_fixed_levels_draw_one_setting_for_every_sample(shards):
    """A fixed-degradation baseline: the graph's levels are the stage's (r, sigma) for every
    sample, z is its constant condition, and the degradation still runs on the windows."""
    loader = DaliTrainLoader(read_shard_set(shards), params(), debug=True, fixed_levels=(2.0, 30.0))
    for _, out in zip(range(3), loader.iter_outputs(), strict=False):
        assert torch.all(out["blur"] == 2.0) and torch.all(out["noise"] == 30.0)
        assert torch.allclose(out["z"], torch.tensor([[0.5, 0.6]]).expand(4, 2))
        assert not torch.equal(out["degraded"], out["clean"])
    assert loader.state_dict()["fixed_levels"] == [2.0, 30.0]
