"""Evaluation sets: layout, seeding per (set, image, setting), z, checksum lists, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data.evalsets as evalsets_mod
from pipeline.condition import setting_key
from pipeline.config import DegradationParams, EvalSetParams
from pipeline.data.evalsets import (
    EvalSetError,
    build_evalsets,
    collect_images,
    image_seed,
    load_sha256_list,
)
from pipeline.data.prepare import prepare_images
from pipeline.data.sources import folder_images, sha256_file
from pipeline.degradation import degrade, to_tensor, to_uint8
from tests.data_fixtures import image_folder, save, textured, tree_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED_CBSD68 = REPO.parent / "shared" / "datasets" / "CBSD68"
DEG = DegradationParams()


@pytest.fixture
def prepared(tmp_path):
    src = folder_images(image_folder(tmp_path / "raw", n=4, size=(40, 36)))
    prepare_images(
        src, tmp_path / "prepared", crop_size=32, holdout=2, holdout_seed=0, max_pixels=10**6
    )
    return tmp_path / "prepared"


@pytest.mark.parametrize(
    ("r", "s", "name"),
    [
        (2, 30, "blur2_noise30"),
        (0.5, 0, "blur0.5_noise0"),
        (0, 50, "blur0_noise50"),
        (1.0, 15.0, "blur1_noise15"),
    ],
)
def test_setting_names(r, s, name):
    assert setting_key(r, s) == name


def test_image_seed_depends_on_every_part():
    base = image_seed(0, "holdout", "a", 2, 30)
    others = {
        image_seed(1, "holdout", "a", 2, 30),
        image_seed(0, "cbsd68", "a", 2, 30),
        image_seed(0, "holdout", "b", 2, 30),
        image_seed(0, "holdout", "a", 2, 50),
    }
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63 and base == image_seed(0, "holdout", "a", 2.0, 30.0)


def test_layout_manifest_and_pixels(prepared, tmp_path):
    params = EvalSetParams(settings=((0, 30), (2, 0), (1, 15)), seed=3)
    report = build_evalsets(params, DEG, prepared, tmp_path / "eval")
    root = tmp_path / "eval" / "holdout"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["holdout"]
    assert sorted(p.name for p in root.iterdir()) == [
        "blur0_noise30",
        "blur1_noise15",
        "blur2_noise0",
        "gt",
        "manifest.json",
    ]
    manifest = json.loads((root / "manifest.json").read_text())
    assert report.extra["sets"] == {"holdout": {"images": 2, "files": 6}}
    assert [s["name"] for s in manifest["settings"]] == [
        "blur0_noise30",
        "blur2_noise0",
        "blur1_noise15",
    ]
    assert manifest["settings"][2]["z"] == [0.25, 0.3]
    for f in manifest["files"]:
        assert f["z"] == [f["blur"] / 4, f["noise"] / 50]
        assert f["path"] == f"{f['setting']}/{f['image']}.png"
        assert sha256_file(root / f["path"]) == f["sha256"]
        # the stored image is exactly degrade() with the per-file seed
        gt = np.asarray(Image.open(root / f["gt"]))
        gen = torch.Generator().manual_seed(
            image_seed(3, "holdout", f["image"], f["blur"], f["noise"])
        )
        want = to_uint8(degrade(to_tensor(gt), f["blur"], f["noise"], generator=gen))
        assert np.array_equal(np.asarray(Image.open(root / f["path"])), want)
    # gt equals the prepared held-out image
    for im in manifest["images"]:
        assert np.array_equal(
            np.asarray(Image.open(root / im["gt"])),
            np.asarray(Image.open(prepared / "holdout" / f"{im['name']}.png")),
        )


def test_adding_a_setting_changes_no_other_file(prepared, tmp_path):
    build_evalsets(EvalSetParams(settings=((0, 30), (2, 50))), DEG, prepared, tmp_path / "a")
    build_evalsets(
        EvalSetParams(settings=((4, 50), (0, 30), (1, 15), (2, 50))), DEG, prepared, tmp_path / "b"
    )
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    for rel, data in a.items():
        if not rel.endswith("manifest.json"):
            assert b[rel] == data, rel


def test_deterministic_bytes(prepared, tmp_path):
    params = EvalSetParams(settings=((1, 30), (4, 0)))
    build_evalsets(params, DEG, prepared, tmp_path / "a")
    build_evalsets(params, DEG, prepared, tmp_path / "b")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_failure_midway_leaves_nothing(prepared, tmp_path, monkeypatch):
    real = evalsets_mod.write_png
    calls = []

    def failing(path, array):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        return real(path, array)

    monkeypatch.setattr(evalsets_mod, "write_png", failing)
    with pytest.raises(OSError, match="simulated"):
        build_evalsets(EvalSetParams(settings=((0, 30), (2, 0))), DEG, prepared, tmp_path / "ev")
    assert not any(p.name.startswith((".ev", "ev")) for p in tmp_path.iterdir())


def test_settings_beyond_the_degradation_range_are_refused(prepared, tmp_path):
    with pytest.raises(EvalSetError, match="exceeds"):
        build_evalsets(EvalSetParams(settings=((5, 0),)), DEG, prepared, tmp_path / "ev")


def test_checksum_list_selects_and_verifies(tmp_path):
    d = tmp_path / "set"
    for i in range(3):
        save(d / f"{i}.png", textured(20, 20, i))
    save(d / "extra.png", textured(20, 20, 9))
    listing = tmp_path / "list.sha256"
    listing.write_text("".join(f"{sha256_file(d / f'{i}.png')}  {i}.png\n" for i in range(3)))
    checks = load_sha256_list(listing)
    assert [n for n, _, _ in collect_images(d, checks)] == ["0", "1", "2"]  # extra.png not used
    assert [n for n, _, _ in collect_images(d)] == ["0", "1", "2", "extra"]
    save(d / "1.png", textured(20, 20, 5))
    with pytest.raises(EvalSetError, match=r"1\.png: sha256 does not match"):
        collect_images(d, checks)
    (d / "2.png").unlink()
    listing.write_text(f"{'a' * 64}  2.png\n")
    with pytest.raises(EvalSetError, match="missing"):
        collect_images(d, load_sha256_list(listing))
    listing.write_text("garbage\n")
    with pytest.raises(EvalSetError, match="expected '<sha256>  <file name>'"):
        load_sha256_list(listing)


def test_external_set_with_bad_files_is_reported_not_fatal(prepared, tmp_path):
    d = tmp_path / "live1"
    save(d / "a.bmp", textured(24, 20, 1))
    (d / "notes.txt").write_text("not an image")
    params = EvalSetParams(sets=("live1",), live1_dir=str(d), settings=((1, 15),))
    report = build_evalsets(params, DEG, prepared, tmp_path / "ev")
    assert report.counts == {"ok": 1, "converted": 0, "skipped": 1}
    assert report.skipped[0]["source"] == "live1/notes.txt"
    assert (tmp_path / "ev" / "live1" / "blur1_noise15" / "a.png").is_file()


def test_shipped_cbsd68_list_is_the_shared_one():
    ours = load_sha256_list(REPO / "pipeline" / "data" / "checksums" / "CBSD68.sha256")
    assert len(ours) == 68
    shared = SHARED_CBSD68.parent / "CBSD68.sha256"
    if shared.is_file():
        assert ours == load_sha256_list(shared)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_CBSD68.is_dir(), reason="shared CBSD68 directory absent")
def test_cbsd68_from_the_shared_directory(prepared, tmp_path):
    listing = load_sha256_list(REPO / "pipeline" / "data" / "checksums" / "CBSD68.sha256")
    few = sorted(listing)[:2]
    d = tmp_path / "cbsd68"
    d.mkdir()
    for name in few:
        shutil.copy(SHARED_CBSD68 / name, d / name)
    sub = tmp_path / "few.sha256"
    sub.write_text("".join(f"{listing[n]}  {n}\n" for n in few))
    assert len(collect_images(SHARED_CBSD68, listing)) == 68  # the whole set verifies
    params = EvalSetParams(
        sets=("cbsd68",), cbsd68_dir=str(d), cbsd68_sha256=str(sub), settings=((2, 30),)
    )
    build_evalsets(params, DEG, prepared, tmp_path / "ev")
    manifest = json.loads((tmp_path / "ev" / "cbsd68" / "manifest.json").read_text())
    assert [im["name"] for im in manifest["images"]] == [Path(n).stem for n in few]
    assert {(im["width"], im["height"]) for im in manifest["images"]} <= {(481, 321), (321, 481)}
