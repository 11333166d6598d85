"""Prepare stage: the data policy on bad input, holdout choice, atomic output, determinism."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.data.prepare as prepare_mod
from pipeline.config import parse_params
from pipeline.data.prepare import PrepareError, choose_holdout, prepare_images, read_manifest
from pipeline.data.sources import folder_images, resolve_source, sha256_file
from stages.prepare import main as prepare_main
from tests.data_fixtures import image_folder, png16, png_bomb, save, textured, tree_bytes

CROP = 32


def bad_input_folder(root: Path) -> dict[str, str]:
    """A folder of every kind of problem file; returns file -> expected outcome/reason word."""
    root.mkdir(parents=True, exist_ok=True)
    save(root / "good.png", textured(40, 56, 1))
    good = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "not_an_image.png").write_bytes(b"this is a text file, not a PNG\n" * 20)
    png16(root / "deep16.png", np.minimum(textured(40, 40, 2).astype(np.int64) * 257 + 3, 65535))
    save(root / "gray.png", textured(40, 40, 3, channels=1)[..., 0], "L")
    rgba = np.dstack([textured(40, 40, 4), np.full((40, 40), 255, np.uint8)])
    save(root / "rgba_opaque.png", rgba, "RGBA")
    rgba_t = rgba.copy()
    rgba_t[:10, :, 3] = 0
    save(root / "rgba_transparent.png", rgba_t, "RGBA")
    Image.fromarray(textured(40, 40, 5)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(textured(40, 40, 6)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.png"
    )
    save(root / "small.png", textured(20, 64, 7))
    png_bomb(root / "bomb.png")
    expected = {
        "good.png": "ok",
        "truncated.png": "truncated",
        "not_an_image.png": "not an image",
        "deep16.png": "16-bit",
        "gray.png": "grayscale",
        "rgba_opaque.png": "opaque alpha",
        "rgba_transparent.png": "transparency",
        "cmyk.jpg": "CMYK",
        "palette.png": "palette",
        "small.png": "too small",
        "bomb.png": "too large",
    }
    (root / "dangling.png").symlink_to(root / "gone.png")  # unreadable even for root
    expected["dangling.png"] = "no such file"
    locked = root / "locked.png"
    save(locked, textured(40, 40, 8))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: the case cannot be made here
        locked.unlink()
    else:
        expected["locked.png"] = "cannot read"
    return expected


SKIPPED = {
    "truncated.png",
    "not_an_image.png",
    "rgba_transparent.png",
    "small.png",
    "bomb.png",
    "dangling.png",
    "locked.png",
}


def test_bad_input_is_converted_or_skipped_with_reasons(tmp_path, caplog):
    expected = bad_input_folder(tmp_path / "raw")
    source = folder_images(tmp_path / "raw")
    out = tmp_path / "prepared"
    report = prepare_images(
        source, out, crop_size=CROP, holdout=1, holdout_seed=0, max_pixels=1_000_000
    )

    skipped = {s["source"]: s["reason"] for s in report.skipped}
    converted = {c["source"]: " ".join(c["notes"]) for c in report.converted}
    for name, word in expected.items():
        if name in SKIPPED:
            assert name in skipped, name
            assert word.lower() in skipped[name].lower(), (name, skipped[name])
        elif word == "ok":
            assert name in report.ok
        else:
            assert name in converted, name
            assert word.lower() in converted[name].lower(), (name, converted[name])
    n_skip = len(SKIPPED & set(expected))
    assert report.counts == {"ok": 1, "converted": 5, "skipped": n_skip}
    assert report.summary() == f"prepare: 1 ok, 5 converted, {n_skip} skipped"

    manifest = read_manifest(out)
    names = {e["name"] for e in manifest["images"]}
    assert names == {"good", "deep16", "gray", "rgba_opaque", "cmyk", "palette"}
    assert sum(e["split"] == "holdout" for e in manifest["images"]) == 1
    for e in manifest["images"]:
        png = out / e["split"] / f"{e['name']}.png"
        assert sha256_file(png) == e["sha256"]
        with Image.open(png) as im:
            assert im.mode == "RGB" and im.size == (e["width"], e["height"])
    # 16-bit values v*257+3 round back to v (im2uint8 rounding)
    deep = next(e for e in manifest["images"] if e["name"] == "deep16")
    arr = np.asarray(Image.open(out / deep["split"] / "deep16.png"))
    assert np.array_equal(arr, textured(40, 40, 2))
    assert sorted(p.name for p in out.iterdir()) == ["holdout", "manifest.json", "train"]


def test_stage_writes_report_and_summary_line(tmp_path, caplog):
    expected = bad_input_folder(tmp_path / "raw")
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "data": {
                    "source": "folder",
                    "folder": str(tmp_path / "raw"),
                    "holdout": 1,
                    "max_pixels": 1_000_000,
                },
                "extract": {"crop_size": CROP},
            }
        )
    )
    caplog.set_level("INFO")
    rc = prepare_main(
        [
            "--params",
            str(params),
            "--out",
            str(tmp_path / "out"),
            "--report",
            str(tmp_path / "reports/prepare.json"),
            "--downloads",
            str(tmp_path / "dl"),
        ]
    )
    assert rc == 0
    n_skip = len(SKIPPED & set(expected))
    assert f"prepare: 1 ok, 5 converted, {n_skip} skipped" in caplog.messages
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["counts"] == {"ok": 1, "converted": 5, "skipped": n_skip}
    assert {s["source"] for s in report["skipped"]} == SKIPPED & set(expected)
    assert (report["train"], report["holdout"]) == (5, 1)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    source = folder_images(image_folder(tmp_path / "raw", n=4))  # RGB PNGs: copied as bytes
    real = prepare_mod.atomic_write_bytes
    calls = []

    def failing(path, data, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(path, data, **kw)

    monkeypatch.setattr(prepare_mod, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="simulated"):
        prepare_images(
            source, tmp_path / "out", crop_size=CROP, holdout=1, holdout_seed=0, max_pixels=10**6
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no out/, no staging dir


def test_failure_keeps_previous_output(tmp_path, monkeypatch):
    source = folder_images(image_folder(tmp_path / "raw", n=3))
    out = tmp_path / "out"
    prepare_images(source, out, crop_size=CROP, holdout=1, holdout_seed=0, max_pixels=10**6)
    before = tree_bytes(out)

    def broken(*args, **kwargs):
        raise OSError("x")

    monkeypatch.setattr(prepare_mod, "atomic_write_bytes", broken)
    with pytest.raises(OSError):
        prepare_images(source, out, crop_size=CROP, holdout=1, holdout_seed=0, max_pixels=10**6)
    assert tree_bytes(out) == before


def test_no_training_image_left_is_an_error_with_report(tmp_path):
    source = folder_images(image_folder(tmp_path / "raw", n=2))
    with pytest.raises(PrepareError, match="no training images") as info:
        prepare_images(
            source, tmp_path / "out", crop_size=CROP, holdout=2, holdout_seed=0, max_pixels=10**6
        )
    assert info.value.report is not None and info.value.report.counts["ok"] == 2
    assert not (tmp_path / "out").exists()


def test_rgb_pngs_are_kept_byte_for_byte_others_reencoded(tmp_path):
    raw = tmp_path / "raw"
    save(raw / "a.png", textured(40, 40, 1), optimize=True)
    save(raw / "b.jpg", textured(40, 40, 2), quality=90)
    prepare_images(
        folder_images(raw),
        tmp_path / "out",
        crop_size=CROP,
        holdout=0,
        holdout_seed=0,
        max_pixels=10**6,
    )
    assert (tmp_path / "out/train/a.png").read_bytes() == (raw / "a.png").read_bytes()
    b = tmp_path / "out/train/b.png"
    assert b.read_bytes().startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(b)), np.asarray(Image.open(raw / "b.jpg")))


def test_holdout_choice_is_deterministic_and_stable():
    names = [f"img{i}" for i in range(20)]
    a = choose_holdout(names, 3, seed=0)
    assert a == choose_holdout(list(reversed(names)), 3, seed=0)
    assert len(a) == 3 and a != choose_holdout(names, 3, seed=1)
    # adding an image moves at most one image out of the held-out set
    assert len(a - choose_holdout([*names, "new"], 3, seed=0)) <= 1
    assert choose_holdout(names, 0, seed=0) == set()


def test_same_input_gives_identical_bytes(tmp_path):
    source = folder_images(image_folder(tmp_path / "raw", n=4))
    for d in ("a", "b"):
        prepare_images(
            source, tmp_path / d, crop_size=CROP, holdout=1, holdout_seed=0, max_pixels=10**6
        )
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_parallel_workers_give_the_same_output(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.data.workers.MIN_ITEMS_FOR_POOL", 2)
    source = folder_images(image_folder(tmp_path / "raw", n=4))
    prepare_images(
        source,
        tmp_path / "serial",
        crop_size=CROP,
        holdout=1,
        holdout_seed=0,
        max_pixels=10**6,
        workers=1,
    )
    prepare_images(
        source,
        tmp_path / "pool",
        crop_size=CROP,
        holdout=1,
        holdout_seed=0,
        max_pixels=10**6,
        workers=2,
    )
    assert tree_bytes(tmp_path / "serial") == tree_bytes(tmp_path / "pool")


def test_sample_source_prepares_offline(tmp_path):
    pytest.importorskip("skimage")
    params = parse_params({})
    source = resolve_source(params.data, tmp_path / "dl")
    report = prepare_images(
        source,
        tmp_path / "out",
        crop_size=192,
        holdout=2,
        holdout_seed=0,
        max_pixels=params.data.max_pixels,
    )
    assert report.counts["skipped"] == 0
    assert (report.extra["train"], report.extra["holdout"]) == (3, 2)
    assert not (tmp_path / "dl").exists()  # no download for the sample
