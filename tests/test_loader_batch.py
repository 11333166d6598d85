"""The loader contract (pipeline/data/batch.py): the rank split, the saved position, state
compatibility, the manifest reader, the device resolution, and the layering itself."""

from __future__ import annotations

import ast
import json
import logging
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ShardParams, parse_params
from pipeline.data.batch import (
    LoaderError,
    batches_per_epoch,
    check_compatible,
    position,
    read_shard_set,
    shard_range,
)
from pipeline.data.extract import encode_png
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("n", "world"), [(8, 1), (9, 2), (10, 3), (3, 4)])
def test_shard_range_is_a_contiguous_partition(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in pairwise(ranges))
    sizes = [end - begin for begin, end in ranges]
    assert max(sizes) - min(sizes) <= 1
    # every rank can yield batches_per_epoch full batches from its share (DROP policy)
    for batch in (1, 2, 3):
        assert all(s >= batches_per_epoch(n, world, batch) * batch for s in sizes)
        assert min(sizes) < (batches_per_epoch(n, world, batch) + 1) * batch


def test_position_after_the_last_batch_is_the_next_epoch():
    assert position(2, 3, 5) == {"epoch": 2, "batch": 3}
    assert position(2, 5, 5) == {"epoch": 3, "batch": 0}
    assert position(0, 0, 5) == {"epoch": 0, "batch": 0}


def test_check_compatible_names_what_changed(caplog):
    expected = {"rank": 0, "world_size": 2, "seed": 1}
    state = {"backend": "torch", "epoch": 4, "batch": 1, **expected}
    assert check_compatible(state, expected, "torch")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.batch"):
        assert not check_compatible(state, expected, "dali")
        assert not check_compatible({**state, "world_size": 1}, expected, "torch")
    assert "'torch' backend, this is 'dali'" in caplog.text
    assert "differs in world_size" in caplog.text and "restarting epoch 4" in caplog.text
    with pytest.raises(LoaderError, match="no 'epoch' key"):
        check_compatible({"backend": "torch"}, expected, "torch")


def _shards(directory: Path, crop_size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    samples = [
        {"key": f"img{i}-y0-x0", "png": encode_png(rng.integers(0, 256, (24, 24, 3), np.uint8), 1)}
        for i in range(4)
    ]
    write_shards(
        samples, lambda s: s["png"], directory, ShardParams(max_count=3), crop_size=crop_size
    )
    return directory


def test_read_shard_set_gives_absolute_paths_and_counts(tmp_path):
    shards = read_shard_set(_shards(tmp_path / "s"))
    assert shards.root.is_absolute() and shards.counts == (3, 1) and shards.num_samples == 4
    assert all(p.is_file() and p.is_absolute() for p in shards.tars + shards.indices)
    assert shards.crop_size == 24


def test_read_shard_set_refuses_a_bad_crop_size_in_one_line(tmp_path):
    root = _shards(tmp_path / "s")
    manifest = json.loads((root / "shards.json").read_text())
    manifest["crop_size"] = "big"
    (root / "shards.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match="crop_size must be a positive integer") as err:
        read_shard_set(root)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_device_is_resolved_by_pipeline_device(tmp_path, backend):
    """``loader.resolve_device`` is gone: pipeline.device decides, the loader reports it."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = _shards(tmp_path / "s")
    params = parse_params({"loader": {"crop": 16, "batch_size": 2, "backend": backend}})
    loader = build_train_loader(root, params, device="auto")
    assert loader.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LoaderError, match="loader: unknown device 'tpu'") as err:
        build_train_loader(root, params, device="tpu")
    assert "\n" not in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(LoaderError, match="CUDA is not available"):
            build_train_loader(root, params, device="cuda")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize(
    "module",
    [
        "pipeline/data/dali_pipeline.py",
        "pipeline/data/torch_loader.py",
        "pipeline/data/batch.py",
        "pipeline/train/tensors.py",
        "pipeline/train/steps.py",
    ],
)
def test_backends_take_the_contract_from_batch_never_from_loader(module):
    """No import circle: loader.py picks a backend; the backends sit below it."""
    assert "pipeline.data.loader" not in _imports(REPO / module)


def test_loader_module_only_builds_backends():
    import pipeline.device
    from pipeline.data import loader

    assert loader.__all__ == ["build_train_loader"]
    # no resolver of its own: the one in pipeline.device
    assert loader.resolve_device is pipeline.device.resolve_device
