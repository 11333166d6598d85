"""The pure-PyTorch TrainLoader: the reference degradation, determinism, DDP split, resume."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.condition import DEFAULT_SCALE
from pipeline.config import ShardParams, parse_params
from pipeline.data.batch import Batch, LoaderError, TrainLoader, read_shard_set
from pipeline.data.extract import encode_png
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import write_shards
from pipeline.data.torch_loader import (
    TorchTrainLoader,
    batch_generator,
    context_window,
    decode_rgb,
    degrade_patches,
    draw_patch,
    epoch_order,
    read_index,
    read_sample_table,
)
from pipeline.degradation import sample_levels

SIZE, CROP = 24, 16


def image(i: int) -> np.ndarray:
    """Texture in R/G, identifying constant ``10 * (i + 1)`` in B."""
    img = np.random.default_rng(500 + i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    img[..., 2] = 10 * (i + 1)
    return img


def make_shards(directory: Path, n: int, per_shard: int = 3) -> dict[str, np.ndarray]:
    images = {f"img{i:02d}-y0-x0": image(i) for i in range(n)}
    samples = [{"key": k, "png": encode_png(v, 1)} for k, v in images.items()]
    write_shards(
        samples, lambda s: s["png"], directory, ShardParams(max_count=per_shard), crop_size=SIZE
    )
    return images


def params(**loader):
    return parse_params(
        {"loader": {"crop": CROP, "batch_size": 2, "num_threads": 1, "backend": "torch", **loader}}
    )


def loader_for(directory, *, workers=0, **kwargs) -> TorchTrainLoader:
    loader = build_train_loader(directory, kwargs.pop("p", params()), **kwargs)
    assert isinstance(loader, TorchTrainLoader)
    loader.num_workers = workers
    return loader


@pytest.fixture()
def shards(tmp_path) -> Path:
    make_shards(tmp_path / "shards", 8)
    return tmp_path / "shards"


def test_batches_have_the_documented_form(shards):
    loader = loader_for(shards)
    assert isinstance(loader, TrainLoader) and len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4 and loader.epoch == 1
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.degraded.shape == batch.clean.shape == (2, 3, CROP, CROP)
        assert batch.z.shape == (2, 2) and batch.z.dtype == torch.float32
        assert torch.allclose(batch.degraded * 255, torch.round(batch.degraded * 255), atol=1e-4)
        assert batch.z.min() >= 0 and batch.z.max() <= 1


def _context_windows(table, ids, gen):
    """The loader's patches rebuilt from the public pieces: each sample's drawn patch with its
    blur margin (10 px, replicate-padded at the image border), and the draws."""
    files: dict[int, int] = {}
    windows, draws = [], []
    for i in ids:
        image = decode_rgb(table.read(i, files)).float() / 255
        draw = draw_patch(SIZE, SIZE, CROP, gen)
        win = context_window(SIZE, SIZE, draw.top, draw.left, CROP, 10)
        part = image[:, win.y0 : win.y1, win.x0 : win.x1]
        windows.append(torch.nn.functional.pad(part[None], win.pad, mode="replicate")[0])
        draws.append(draw)
    return torch.stack(windows), draws


def test_batch_is_exactly_the_reference_pipeline(shards):
    """Rebuild batch (epoch 1, batch 2) of rank 0 from the public pieces: bit-identical."""
    loader = loader_for(shards, seed=9)
    table = read_sample_table(read_shard_set(shards))
    list(loader)  # epoch 0
    got = list(loader)[2]
    ids = epoch_order(len(table), 9, 1)[4:6].tolist()
    gen = batch_generator(9, 0, 1, 2)
    windows, draws = _context_windows(table, ids, gen)
    blur, noise = sample_levels(2, gen, params().degradation)
    degraded, clean = degrade_patches(windows, draws, blur, noise, gen, 21)
    assert torch.equal(got.clean, clean)
    assert torch.equal(got.degraded, degraded)
    assert torch.equal(got.z, DEFAULT_SCALE.to_z(blur, noise))


def test_patches_come_from_their_samples(shards):
    images = make_shards(shards.parent / "again", 8)
    loader = loader_for(shards)
    for epoch in range(2):
        keys = loader.epoch_keys(epoch)
        for batch, batch_keys in zip(loader, keys, strict=True):
            for patch, key in zip(batch.clean, batch_keys, strict=True):
                blue = torch.round(patch[2] * 255)
                assert (blue == 10 * (int(key[3:5]) + 1)).all()
                # the patch is one of the 8 flips/rotations of some window of the image
                src = torch.from_numpy(images[key]).permute(2, 0, 1)[:2].float() / 255
                windows = src.unfold(1, CROP, 1).unfold(2, CROP, 1)  # [2, 9, 9, C, C]
                p = patch[:2]
                cands = [p, p.flip(-1), p.flip(-2), p.flip(-1).flip(-2)]
                cands += [c.transpose(-1, -2) for c in cands]
                assert any(
                    (windows == c[:, None, None]).all(-1).all(-1).all(0).any() for c in cands
                )


def test_results_do_not_depend_on_worker_count(shards):
    a = [b.degraded for b in loader_for(shards, workers=0, seed=3)]
    b = [b.degraded for b in loader_for(shards, workers=2, seed=3)]
    assert len(a) == len(b) == 4
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_epochs_are_reshuffled_and_cover_the_set(shards):
    loader = loader_for(shards)
    orders = [list(chain.from_iterable(loader.epoch_keys(e))) for e in range(3)]
    assert all(sorted(o) == sorted(f"img{i:02d}-y0-x0" for i in range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3


@pytest.mark.parametrize(("n", "world"), [(8, 2), (9, 2), (12, 3)])
def test_ranks_are_disjoint_and_equal_length(tmp_path, n, world):
    make_shards(tmp_path, n)
    loaders = [loader_for(tmp_path, rank=r, world_size=world, seed=1) for r in range(world)]
    assert len({len(loader) for loader in loaders}) == 1
    for epoch in range(2):
        keys = [list(chain.from_iterable(loader.epoch_keys(epoch))) for loader in loaders]
        flat = list(chain.from_iterable(keys))
        assert len(flat) == len(set(flat)) == world * len(loaders[0]) * 2
        if n % (2 * world) == 0:
            assert sorted(flat) == sorted(f"img{i:02d}-y0-x0" for i in range(n))


@pytest.mark.parametrize("stop", [1, 3, 4, 6])
def test_restored_loader_continues_with_the_same_batches(shards, stop):
    def consume(loader, count):
        out = []
        while len(out) < count:
            for batch in loader:
                out.append((loader.epoch, *batch))
                if len(out) == count:
                    break
        return out

    reference = consume(loader_for(shards, seed=2), 9)
    first = loader_for(shards, seed=2)
    head = consume(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["batch"]) == divmod(stop, 4)
    resumed = loader_for(shards, seed=2)
    resumed.load_state_dict(state)
    tail = consume(resumed, 9 - stop)
    for got, want in zip(head + tail, reference, strict=True):
        assert got[0] == want[0]
        assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:], strict=True))


def test_state_from_another_setup_restarts_the_epoch(shards, caplog):
    first = loader_for(shards, seed=2)
    next(iter(first))
    other = loader_for(shards, seed=3)
    other.load_state_dict(first.state_dict())
    assert "restarting epoch 0" in caplog.text and other.state_dict()["batch"] == 0


def test_state_with_impossible_position_is_refused(shards):
    loader = loader_for(shards)
    state = loader.state_dict() | {"batch": 99}
    with pytest.raises(LoaderError, match="outside"):
        loader.load_state_dict(state)


def test_index_without_png_component_is_refused(tmp_path):
    idx = tmp_path / "a.idx"
    idx.write_text("v1.2 2\npng 512 10 a.png\njpg 1536 10 b.jpg\n")
    with pytest.raises(LoaderError, match="no 'png' component"):
        read_index(idx)
    idx.write_text("v1.2 3\npng 512 10 a.png\n")
    with pytest.raises(LoaderError, match="header says 3"):
        read_index(idx)
    idx.write_text("garbage\n")
    with pytest.raises(LoaderError, match="not a wds2idx index"):
        read_index(idx)


def test_index_offsets_point_at_the_pngs(shards):
    table = read_sample_table(read_shard_set(shards))
    files: dict[int, int] = {}
    images = {f"img{i:02d}-y0-x0": image(i) for i in range(8)}
    for i, key in enumerate(table.keys):
        assert np.array_equal(
            decode_rgb(table.read(i, files)).permute(1, 2, 0).numpy(), images[key]
        )


def test_stopping_after_the_last_batch_does_not_yield_an_empty_epoch(shards):
    reference = loader_for(shards)
    want = [b.degraded for b in reference] + [b.degraded for b in reference]
    loader = loader_for(shards)
    it = iter(loader)
    got = [next(it).degraded for _ in range(len(loader))]
    got += [b.degraded for b in loader]
    assert loader.epoch == 2 and len(got) == 8
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_fixed_levels_degrade_every_window_at_one_setting(shards):
    """A fixed-degradation baseline's batches: the reference pipeline with every sample at the
    stage's (r, sigma) -- on its context window, like any drawn level -- and a constant z."""
    loader = build_train_loader(shards, params(), seed=9, fixed_levels=(2.0, 30.0))
    loader.num_workers = 0
    table = read_sample_table(read_shard_set(shards))
    got = list(loader)[2]
    ids = epoch_order(len(table), 9, 0)[4:6].tolist()
    gen = batch_generator(9, 0, 0, 2)
    windows, draws = _context_windows(table, ids, gen)
    blur, noise = torch.full((2,), 2.0), torch.full((2,), 30.0)
    degraded, clean = degrade_patches(windows, draws, blur, noise, gen, 21)
    assert torch.equal(got.clean, clean) and torch.equal(got.degraded, degraded)
    assert torch.equal(got.z, torch.tensor([[0.5, 0.6]]).expand(2, 2))
    # a position saved under fixed levels does not resume a loader that draws levels
    state = loader.state_dict()
    assert state["fixed_levels"] == [2.0, 30.0]
    drawing = loader_for(shards, seed=9)
    drawing.load_state_dict(state)
    assert drawing.state_dict()["batch"] == 0
