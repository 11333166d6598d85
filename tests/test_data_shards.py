"""Shards stage: caps, write-time shuffle, deterministic tar headers, DALI indexes, atomicity."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import pipeline.data.shards as shards_mod
from pipeline.config import ExtractParams, ShardParams
from pipeline.data.extract import encode_png, extract_subimages
from pipeline.data.prepare import prepare_images
from pipeline.data.shards import (
    ShardError,
    read_shards_json,
    shard_subimages,
    verify_shard_files,
    write_shards,
)
from pipeline.data.sources import folder_images
from pipeline.data.tario import TAR_MTIME, tar_size
from tests.data_fixtures import image_folder, textured, tree_bytes


def samples(n: int, size: int = 16) -> list[dict]:
    return [
        {"key": f"img{i:03d}-y0-x{i}", "png": encode_png(textured(size, size, i), 1)}
        for i in range(n)
    ]


def write(tmp_path, items, **params):
    out = tmp_path / "shards"
    manifest = write_shards(items, lambda s: s["png"], out, ShardParams(**params), crop_size=16)
    return out, manifest


def members(tar_path):
    with tarfile.open(tar_path) as tf:
        return tf.getmembers()


def test_count_cap_layout_and_shards_json(tmp_path):
    items = samples(10)
    out, manifest = write(tmp_path, items, max_count=4)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest == json.loads((out / "shards.json").read_text())
    assert manifest["num_samples"] == 10 and manifest["crop_size"] == 16
    assert (manifest["format"], manifest["version"]) == ("cugan-shards", 2)
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-00000.idx",
        "shard-00000.tar",
        "shard-00001.idx",
        "shard-00001.tar",
        "shard-00002.idx",
        "shard-00002.tar",
        "shards.json",
    ]
    assert read_shards_json(out) == manifest
    # every sample exactly once, one member <key>.png each, bytes unchanged
    by_key = {s["key"]: s["png"] for s in items}
    seen = []
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["tar"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext == "png"
                assert tf.extractfile(m).read() == by_key[key]
                seen.append(key)
    assert sorted(seen) == sorted(by_key)


def test_byte_cap_is_a_hard_limit(tmp_path):
    items = samples(12, size=24)
    cap = tar_size([len(s["png"]) for s in items[:3]]) + 100
    out, manifest = write(tmp_path, items, max_count=1000, max_bytes=cap)
    assert len(manifest["shards"]) > 1
    for entry in manifest["shards"]:
        size = (out / entry["tar"]).stat().st_size
        assert size <= cap
        assert size == tar_size([m.size for m in members(out / entry["tar"])])


def test_a_sample_larger_than_the_cap_is_an_error(tmp_path):
    with pytest.raises(ShardError, match="does not fit"):
        write(tmp_path, samples(2, size=64), max_bytes=10240)
    assert not (tmp_path / "shards").exists()


def test_write_time_shuffle_is_seeded(tmp_path):
    items = samples(30)

    def order(out):
        entries = json.loads((out / "shards.json").read_text())["shards"]
        return [m.name for e in entries for m in members(out / e["tar"])]

    a = order(write(tmp_path / "a", items, max_count=7, shuffle_seed=0)[0])
    b = order(write(tmp_path / "b", items, max_count=7, shuffle_seed=0)[0])
    c = order(write(tmp_path / "c", items, max_count=7, shuffle_seed=1)[0])
    in_order = [f"{s['key']}.png" for s in items]
    assert a == b and a != c and a != in_order and sorted(a) == sorted(in_order)


def test_tar_headers_are_fixed(tmp_path):
    out, manifest = write(tmp_path, samples(5), max_count=3)
    for entry in manifest["shards"]:
        for m in members(out / entry["tar"]):
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (
                TAR_MTIME,
                0,
                0,
                "cugan",
                "cugan",
                0o444,
            )
            assert m.isreg()


def test_dali_index_matches_the_tar(tmp_path):
    out, manifest = write(tmp_path, samples(7), max_count=4)
    for entry in manifest["shards"]:
        lines = (out / entry["index"]).read_text().splitlines()
        assert lines[0] == f"v1.2 {entry['count']}"
        with tarfile.open(out / entry["tar"]) as tf:
            expected = [f"png {m.offset_data} {m.size} {m.name}" for m in tf.getmembers()]
        assert lines[1:] == expected


def test_same_input_gives_identical_bytes(tmp_path):
    items = samples(9)
    write(tmp_path / "a", items, max_count=4)
    write(tmp_path / "b", items, max_count=4)
    assert tree_bytes(tmp_path / "a" / "shards") == tree_bytes(tmp_path / "b" / "shards")


def test_failure_midway_leaves_no_shard_directory(tmp_path):
    items = samples(10)
    calls = []

    def flaky(sample):
        calls.append(sample["key"])
        if len(calls) == 7:  # in the second shard
            raise OSError("read error (simulated)")
        return sample["png"]

    with pytest.raises(OSError, match="simulated"):
        write_shards(items, flaky, tmp_path / "shards", ShardParams(max_count=4), crop_size=16)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a staging leftover


def test_index_failure_leaves_no_shard_directory(tmp_path, monkeypatch):
    def broken(tar, idx):
        raise RuntimeError("wds2idx crashed (simulated)")

    monkeypatch.setattr(shards_mod, "write_index", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        write(tmp_path, samples(3))
    assert list(tmp_path.iterdir()) == []


def test_empty_input_is_an_error(tmp_path):
    with pytest.raises(ShardError, match="no samples"):
        write(tmp_path, [])


def test_read_shards_json_errors(tmp_path):
    with pytest.raises(ShardError, match="not found"):
        read_shards_json(tmp_path)
    out, manifest = write(tmp_path, samples(3))
    (out / manifest["shards"][0]["index"]).unlink()
    with pytest.raises(ShardError, match="missing"):
        read_shards_json(out)


def test_shards_from_extracted_subimages_decode_to_the_crops(tmp_path):
    src = folder_images(image_folder(tmp_path / "raw", n=3))
    prepare_images(
        src, tmp_path / "prep", crop_size=32, holdout=1, holdout_seed=0, max_pixels=10**6
    )
    extract_subimages(tmp_path / "prep", tmp_path / "sub", ExtractParams(crop_size=32, step=16))
    manifest = shard_subimages(tmp_path / "sub", tmp_path / "shards", ShardParams(max_count=5))
    assert manifest["crop_size"] == 32
    assert manifest["encoding"] == "raw"  # the stage stores decoded pixels (shards.py docstring)
    index = json.loads((tmp_path / "sub" / "index.json").read_text())
    assert manifest["num_samples"] == index["num_subimages"]
    entry = manifest["shards"][0]
    with tarfile.open(tmp_path / "shards" / entry["tar"]) as tf:
        m = tf.getmembers()[0]
        crop = np.frombuffer(tf.extractfile(m).read(), np.uint8).reshape(32, 32, 3)
    image, rest = m.name.removesuffix(".rgb").rsplit("-y", 1)
    y, x = (int(v) for v in rest.split("-x"))
    full = np.asarray(Image.open(tmp_path / "prep" / "train" / f"{image}.png"))
    assert np.array_equal(crop, full[y : y + 32, x : x + 32])


def test_raw_samples_are_checked_named_and_recorded(tmp_path):
    items = [{"key": f"img{i:03d}-y0-x0", "raw": textured(16, 16, i).tobytes()} for i in range(5)]
    out = tmp_path / "shards"
    manifest = write_shards(
        items, lambda s: s["raw"], out, ShardParams(max_count=3), crop_size=16, encoding="raw"
    )
    assert manifest["encoding"] == "raw" and read_shards_json(out) == manifest
    by_key = {s["key"]: s["raw"] for s in items}
    for entry in manifest["shards"]:
        lines = (out / entry["index"]).read_text().splitlines()[1:]
        assert all(line.startswith("rgb ") for line in lines)  # DALI's ext is "rgb"
        with tarfile.open(out / entry["tar"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext == "rgb" and tf.extractfile(m).read() == by_key[key]
    with pytest.raises(ShardError, match="expected 16x16x3"):
        write_shards(
            items,
            lambda s: s["raw"][:-3],
            tmp_path / "bad",
            ShardParams(),
            crop_size=16,
            encoding="raw",
        )
    with pytest.raises(ShardError, match="unknown sample encoding"):
        write_shards(
            items,
            lambda s: s["raw"],
            tmp_path / "bad",
            ShardParams(),
            crop_size=16,
            encoding="jpeg",
        )
    assert not (tmp_path / "bad").exists()


def test_png_to_raw_and_legacy_manifest_default(tmp_path):
    from pipeline.data.shards import png_to_raw

    image = textured(16, 16, 3)
    assert png_to_raw(encode_png(image, 1), 16, "k") == image.tobytes()
    with pytest.raises(ShardError, match="expected RGB 16x16"):
        png_to_raw(encode_png(textured(16, 20, 3), 1), 16, "k")
    out, manifest = write(tmp_path, samples(3))
    assert manifest["encoding"] == "png"
    legacy = {k: v for k, v in manifest.items() if k != "encoding"}  # written before "raw"
    (out / "shards.json").write_text(json.dumps(legacy))
    assert "encoding" not in read_shards_json(out)  # readers take it as png
    (out / "shards.json").write_text(json.dumps(manifest | {"encoding": "webp"}))
    with pytest.raises(ShardError, match="unknown sample encoding"):
        read_shards_json(out)


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    items = samples(6)
    out, manifest = write(tmp_path, items, max_count=4)
    urls = [str(out / e["tar"]) for e in manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(keys) == sorted(s["key"] for s in items)


def test_shards_json_records_size_and_sha256_of_every_tar_and_index(tmp_path):
    import hashlib

    out, manifest = write(tmp_path, samples(7), max_count=3)
    for entry in manifest["shards"]:
        for kind in ("tar", "index"):
            data = (out / entry[kind]).read_bytes()
            assert entry[f"{kind}_bytes"] == len(data)
            assert entry[f"{kind}_sha256"] == hashlib.sha256(data).hexdigest()
    verify_shard_files(out, manifest["shards"], "sha256")  # the files as written pass


def test_verify_names_the_file_that_differs(tmp_path):
    out, manifest = write(tmp_path, samples(7), max_count=3)
    tar = out / manifest["shards"][1]["tar"]
    original = tar.read_bytes()
    tar.write_bytes(original[:-512])  # a copy cut short
    with pytest.raises(ShardError, match="truncated or changed") as err:
        read_shards_json(out)  # sizes: checked by default
    assert str(tar) in str(err.value) and "\n" not in str(err.value)
    changed = bytearray(original)
    changed[600] ^= 0xFF  # same size, other content
    tar.write_bytes(bytes(changed))
    assert read_shards_json(out) == manifest  # a size check cannot see it ...
    with pytest.raises(ShardError, match="sha256 differs") as err:
        read_shards_json(out, verify="sha256")  # ... the sha256 does
    assert str(tar) in str(err.value)
    tar.unlink()
    with pytest.raises(ShardError, match="missing"):
        read_shards_json(out)


def test_an_old_manifest_without_hashes_is_refused_in_one_line(tmp_path):
    out, manifest = write(tmp_path, samples(3))
    old = {
        **manifest,
        "version": 1,
        "shards": [{k: e[k] for k in ("tar", "index", "count")} for e in manifest["shards"]],
    }
    (out / "shards.json").write_text(json.dumps(old))
    with pytest.raises(ShardError, match=r"older shards stage .* re-run the shards stage"):
        read_shards_json(out)
    entry = dict(manifest["shards"][0], tar_sha256="not-a-digest")
    (out / "shards.json").write_text(json.dumps({**manifest, "shards": [entry]}))
    with pytest.raises(ShardError, match="tar_sha256 is not a sha256"):
        read_shards_json(out)
    del entry["index_bytes"]
    (out / "shards.json").write_text(json.dumps({**manifest, "shards": [entry]}))
    with pytest.raises(ShardError, match="no valid 'index_bytes'"):
        read_shards_json(out)
