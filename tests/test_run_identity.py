"""The training run's identity covers the shards' content, not only their counts.

Ray resumes a run by its name (``train_<stage>-<digest>``, pipeline/train/trainer.py): a run on
other shards must get another name, or it "resumes" the old run's last checkpoint and reports
done without reading a sample (seen before shards.json recorded sha256: a shard truncated to
half its size "trained" to completion). Checked here on real tiny shards, without Ray.
"""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import ConfigError, ShardParams, parse_params
from pipeline.data.extract import encode_png
from pipeline.data.shards import write_shards
from pipeline.train.trainer import _digest, check_stage
from tests.data_fixtures import textured

SIZE = 72


def _write(root, *, changed: int | None = None):
    """12 samples in 3 shards; ``changed``: that sample gets other pixels (same key, count)."""
    samples = [
        {"key": f"img{i:02d}-y0-x0", "png": encode_png(textured(SIZE, SIZE, i), 1)}
        for i in range(12)
    ]
    if changed is not None:
        samples[changed]["png"] = encode_png(textured(SIZE, SIZE, 100), 1)
    return write_shards(samples, lambda s: s["png"], root, ShardParams(max_count=4), crop_size=SIZE)


def _params(**loader):
    return parse_params(
        {
            "loader": {"batch_size": 4, "crop": 64, **loader},
            "train_cunet": {"generator": "tiny"},
            "ray": {"num_workers": 1, "local_num_cpus": 1},
        }
    )


def test_other_content_with_the_same_counts_is_another_run(tmp_path):
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b", changed=5)
    assert [e["count"] for e in a["shards"]] == [e["count"] for e in b["shards"]]
    assert a["num_samples"] == b["num_samples"]  # what the old identity hashed: equal
    assert a["shards"] != b["shards"]  # the sha256 of one shard differs
    params = _params()
    run_a = _digest(params, "cunet", tmp_path / "a", None, None)
    run_b = _digest(params, "cunet", tmp_path / "b", None, None)
    assert run_a != run_b  # a new run, never a resume of the old one


def test_the_same_shards_are_the_same_run(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "again")  # rewritten from the same samples: byte-identical
    params = _params()
    assert _digest(params, "cunet", tmp_path / "a", None, None) == _digest(
        params, "cunet", tmp_path / "again", None, None
    )
    # how the files are checked does not change what is trained: still the same run
    assert _digest(params, "cunet", tmp_path / "a", None, None) == _digest(
        _params(verify_shards="sha256"), "cunet", tmp_path / "a", None, None
    )


def test_a_truncated_shard_stops_the_stage_before_ray_starts(tmp_path):
    _write(tmp_path / "shards")
    check_stage(_params(), "cunet", shards_dir=tmp_path / "shards")  # intact: fine
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "shards", copy)
    tar = copy / "shard-00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ConfigError) as err:
        check_stage(_params(), "cunet", shards_dir=copy)
    text = str(err.value)
    assert "\n" not in text and str(tar) in text and "re-run the shards stage" in text
