"""Shards that differ from their shards.json: one line naming the file, for both loaders.

At the start (:func:`pipeline.data.batch.read_shard_set` inside ``build_train_loader``): the
sizes are always checked, the sha256 with ``loader.verify_shards: sha256``. Mid-run (the file
changed after the loader started): DALI's multi-line "Critical error in pipeline" and the
torch loader's short read or undecodable PNG (also from a DataLoader worker process) become
one :class:`LoaderError` line naming the tar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ShardParams, parse_params
from pipeline.data.batch import LoaderError
from pipeline.data.extract import encode_png
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import ShardError, write_shards

SIZE, CROP = 24, 16
BACKENDS = ["torch", "dali"]


def _shards(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    samples = [
        {
            "key": f"img{i:02d}-y0-x0",
            "png": encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), 1),
        }
        for i in range(12)
    ]
    write_shards(samples, lambda s: s["png"], directory, ShardParams(max_count=4), crop_size=SIZE)
    return directory


def _params(backend: str, **loader):
    return parse_params(
        {
            "loader": {
                "crop": CROP,
                "batch_size": 4,
                "num_threads": 1,
                "backend": backend,
                **loader,
            }
        }
    )


def _truncate(path: Path) -> None:
    """Keep the first 1.5 KB: the first member's header and part of its data (a copy cut
    short; halving alone could drop only the tar's end padding)."""
    path.write_bytes(path.read_bytes()[:1536])


def _corrupt(path: Path) -> None:
    """Flip bytes inside the members' data (the tar headers and the size stay intact)."""
    data = bytearray(path.read_bytes())
    for offset in range(700, len(data) // 2, 37):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    assert str(path) in text, text
    return text


@pytest.fixture()
def shards(tmp_path) -> Path:
    return _shards(tmp_path / "shards")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "dali":
        pytest.importorskip("nvidia.dali")
    return request.param


def test_a_truncated_shard_stops_the_loader_at_the_start(shards, backend):
    tar = shards / "shard-00001.tar"
    _truncate(tar)
    with pytest.raises(ShardError) as err:
        build_train_loader(shards, _params(backend))
    text = _one_line(err, tar)
    assert "truncated or changed" in text and "re-run the shards stage" in text


def test_a_truncated_index_stops_the_loader_at_the_start(shards, backend):
    idx = shards / "shard-00002.idx"
    idx.write_text(idx.read_text() + "png 0 1 extra.png\n")
    with pytest.raises(ShardError) as err:
        build_train_loader(shards, _params(backend))
    _one_line(err, idx)


def test_a_changed_shard_of_the_same_size_is_caught_by_sha256(shards, backend):
    tar = shards / "shard-00000.tar"
    _corrupt(tar)
    build_train_loader(shards, _params(backend)).close()  # sizes agree: not caught by "size"
    with pytest.raises(ShardError) as err:
        build_train_loader(shards, _params(backend, verify_shards="sha256"))
    assert "sha256 differs" in _one_line(err, tar)


def test_untouched_shards_pass_the_sha256_check(shards, backend):
    loader = build_train_loader(shards, _params(backend, verify_shards="sha256"))
    assert len(list(loader)) == len(loader) == 3
    loader.close()


@pytest.mark.parametrize("damage", [_truncate, _corrupt], ids=["truncated", "changed"])
def test_a_shard_damaged_mid_run_is_one_line_naming_it(shards, backend, damage):
    loader = build_train_loader(shards, _params(backend), seed=0)
    damage(shards / "shard-00001.tar")  # after the start check: only reading can tell
    with pytest.raises(LoaderError) as err:
        for _ in range(3):  # DALI prefetches: the damage may surface in a later epoch
            list(loader)
    text = _one_line(err, shards / "shard-00001.tar")
    assert "re-run" in text
    if backend == "dali" and damage is _truncate:
        assert "offset is outside of the archive file" in text  # DALI's reason, kept


def test_the_torch_loader_names_the_shard_from_a_dataloader_worker(shards):
    loader = build_train_loader(shards, _params("torch"), seed=0)
    assert loader.num_workers == 1  # loader.num_threads: a worker process does the reading
    _corrupt(shards / "shard-00001.tar")
    with pytest.raises(LoaderError) as err:
        list(loader)
    text = _one_line(err, shards / "shard-00001.tar")
    assert not text.startswith("Caught ")  # the worker's own line, not the wrapper's


def test_an_old_shards_json_without_hashes_asks_to_rerun_the_shards_stage(shards, backend):
    manifest = json.loads((shards / "shards.json").read_text())
    manifest["version"] = 1
    manifest["shards"] = [
        {"tar": e["tar"], "index": e["index"], "count": e["count"]} for e in manifest["shards"]
    ]
    (shards / "shards.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as err:
        build_train_loader(shards, _params(backend))
    text = _one_line(err, shards / "shards.json")
    assert "older shards stage" in text and "re-run the shards stage" in text
