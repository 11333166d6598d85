"""Extract stage: BasicSR's crop-position convention, keys, the sub-image tar and its index."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractParams
from pipeline.data.extract import (
    crop_positions,
    encode_png,
    extract_subimages,
    subimage_grid,
    subimage_key,
)
from pipeline.data.prepare import prepare_images
from pipeline.data.sources import folder_images
from pipeline.data.subimages import TAR, ExtractError, read_subimage, read_subimage_index
from tests.data_fixtures import image_folder, tree_bytes


@pytest.mark.parametrize(
    ("length", "crop", "step", "thresh", "expected"),
    [
        # exact fit: no extra crop
        (480, 192, 96, 48, [0, 96, 192, 288]),
        # leftover 32 <= thresh 48: dropped (BasicSR: strictly greater than thresh adds one)
        (512, 192, 96, 48, [0, 96, 192, 288]),
        # leftover 56 > 48: one more crop flush with the edge
        (536, 192, 96, 48, [0, 96, 192, 288, 344]),
        # thresh 0: any leftover gets a flush crop
        (500, 192, 96, 0, [0, 96, 192, 288, 308]),
        # leftover exactly thresh: dropped
        (528, 192, 96, 48, [0, 96, 192, 288]),
        (192, 192, 96, 0, [0]),
        (191, 192, 96, 0, []),
        # DIV2K-like width 2040 with BasicSR's 480/240/0
        (2040, 480, 240, 0, [0, 240, 480, 720, 960, 1200, 1440, 1560]),
    ],
)
def test_crop_positions_follow_basicsr(length, crop, step, thresh, expected):
    assert crop_positions(length, crop, step, thresh) == expected


def test_crop_positions_reject_bad_arguments():
    with pytest.raises(ValueError):
        crop_positions(100, 0, 10, 0)


def test_grid_and_keys():
    p = ExtractParams(crop_size=32, step=32, thresh_size=0)
    assert subimage_grid(64, 80, p) == [(0, 0), (0, 32), (0, 48), (32, 0), (32, 32), (32, 48)]
    assert subimage_key("img_0", 32, 48) == "img_0-y32-x48"


def test_encode_png_is_deterministic_and_lossless():
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a, b = encode_png(arr, 3), encode_png(arr.copy(), 3)
    assert a == b
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(a))), arr)
    assert b"tIME" not in a and b"tEXt" not in a  # no timestamps or metadata chunks


@pytest.fixture
def prepared(tmp_path):
    src = folder_images(image_folder(tmp_path / "raw", n=4, size=(48, 64)))
    prepare_images(
        src, tmp_path / "prepared", crop_size=32, holdout=1, holdout_seed=0, max_pixels=10**6
    )
    return tmp_path / "prepared"


def test_extract_writes_every_crop_with_a_correct_index(prepared, tmp_path):
    params = ExtractParams(crop_size=32, step=16, thresh_size=4, png_compress_level=1)
    report = extract_subimages(prepared, tmp_path / "sub", params)
    index = read_subimage_index(tmp_path / "sub")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["index.json", "subimages.tar"]
    records = index["subimages"]
    assert index["num_subimages"] == len(records) == report.extra["num_subimages"] > 0
    assert index["num_images"] == 3 and report.counts["ok"] == 3
    fd = os.open(tmp_path / "sub" / TAR, os.O_RDONLY)
    try:
        for rec in records:
            img = np.asarray(Image.open(prepared / "train" / f"{rec['image']}.png"))
            crop = np.asarray(Image.open(io.BytesIO(read_subimage(fd, rec))))
            assert crop.shape == (32, 32, 3)
            assert np.array_equal(crop, img[rec["y"] : rec["y"] + 32, rec["x"] : rec["x"] + 32])
            assert rec["key"] == subimage_key(rec["image"], rec["y"], rec["x"])
            assert "." not in rec["key"]
    finally:
        os.close(fd)
    with tarfile.open(tmp_path / "sub" / TAR) as tf:
        assert [m.name for m in tf.getmembers()] == [f"{r['key']}.png" for r in records]
    # counts per image follow the grid
    for name in {r["image"] for r in records}:
        img = Image.open(prepared / "train" / f"{name}.png")
        expected = len(subimage_grid(img.height, img.width, params))
        assert sum(r["image"] == name for r in records) == expected


def test_extract_is_deterministic(prepared, tmp_path):
    params = ExtractParams(crop_size=32, step=16, thresh_size=4)
    extract_subimages(prepared, tmp_path / "a", params)
    extract_subimages(prepared, tmp_path / "b", params)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_extract_skips_images_smaller_than_a_larger_crop(prepared, tmp_path):
    report = extract_subimages(prepared, tmp_path / "sub", ExtractParams(crop_size=60, step=30))
    assert report.counts["skipped"] >= 1
    assert all("too small" in s["reason"] for s in report.skipped)


def test_extract_detects_a_changed_prepared_image(prepared, tmp_path):
    victim = next((prepared / "train").iterdir())
    victim.write_bytes(victim.read_bytes() + b"junk")
    with pytest.raises(ExtractError, match="does not match the prepare manifest"):
        extract_subimages(prepared, tmp_path / "sub", ExtractParams(crop_size=32, step=16))
    assert not (tmp_path / "sub").exists()
