"""The ``cugan`` CLI, in-process through ``main([...])``: one-line errors, exit codes, outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.generator import GeneratorConfig
from models.registry import build_generator
from pipeline.checkpoint import save_generator
from pipeline.cli import main
from pipeline.condition import DEFAULT_SCALE, ConditionScale
from pipeline.degradation import degrade, to_tensor, to_uint8
from pipeline.imageio import read_rgb8, write_cond_map, write_png
from pipeline.inference import load_model_for_inference, restore

REPO = Path(__file__).resolve().parents[1]
CBSD68 = REPO.parent / "shared" / "datasets" / "CBSD68"


def _strong(cfg="tiny", seed: int = 0):
    model = build_generator(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _rgb(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    bad = root / "corrupt"
    bad.mkdir()
    (bad / "generator.safetensors").write_bytes(b"this is not a safetensors file at all")
    two_scale = GeneratorConfig(blocks_per_scale=(1, 1), channels_per_scale=(4, 8))
    three_cond = GeneratorConfig(
        blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8), cond_dim=3
    )
    return {
        "mse": save_generator(root / "mse", _strong(seed=1), metadata={"stage": "mse"}),
        "gan": save_generator(root / "gan", _strong(seed=2), metadata={"stage": "gan"}),
        "other": save_generator(root / "other", _strong(two_scale, seed=3), metadata={}),
        "cond3": save_generator(root / "cond3", _strong(three_cond, seed=4), metadata={}),
        "corrupt": bad,
    }


@pytest.fixture()
def rgb_png(tmp_path: Path) -> Path:
    return write_png(tmp_path / "in.png", _rgb())


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cugan: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# restore: success


def test_restore_with_levels_equals_the_library(capsys, tmp_path, rgb_png, ckpt) -> None:
    out = tmp_path / "out.png"
    code, stdout, err = _run(
        capsys,
        "restore",
        rgb_png,
        out,
        "--blur",
        2,
        "--noise",
        30,
        "--model",
        ckpt["mse"],
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "wrote" in err and stdout == ""
    model = load_model_for_inference(ckpt["mse"]).model
    expected = restore(model, _rgb(), DEFAULT_SCALE.to_z(2, 30)[0])
    np.testing.assert_array_equal(read_rgb8(out).array, expected)


def test_restore_with_cond_equals_levels(capsys, tmp_path, rgb_png, ckpt) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert (
        _run(capsys, "restore", rgb_png, a, "--blur", 1, "--noise", 15, "--model", ckpt["mse"])[0]
        == 0
    )
    assert (
        _run(
            capsys,
            "restore",
            rgb_png,
            b,
            "--cond",
            "0.25,0.3",
            "--model",
            ckpt["mse"] / "generator.safetensors",
        )[0]
        == 0
    )
    np.testing.assert_array_equal(read_rgb8(a).array, read_rgb8(b).array)


def test_restore_tiled_equals_untiled(capsys, tmp_path, ckpt) -> None:
    src = write_png(tmp_path / "big.png", _rgb(40, 56, seed=5))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert (
        _run(capsys, "restore", src, a, "--cond", "0.5,0.5", "--model", ckpt["mse"], "--tile", 0)[0]
        == 0
    )
    code, _, err = _run(
        capsys, "restore", src, b, "--cond", "0.5,0.5", "--model", ckpt["mse"], "--tile", 24
    )
    assert code == 0 and "tiling: 24 px tiles" in err
    diff = np.abs(read_rgb8(a).array.astype(int) - read_rgb8(b).array.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def _constant_map(path: Path, k_blur: int, k_noise: int, h: int = 20, w: int = 24) -> Path:
    zmap = np.empty((h, w, 2), np.uint8)
    zmap[..., 0], zmap[..., 1] = k_blur, k_noise
    return write_cond_map(path, zmap)


@pytest.mark.parametrize("tile", [0, 8])
def test_constant_cond_map_equals_cond(capsys, tmp_path, rgb_png, ckpt, tile: int) -> None:
    """A map of one z is the vector path bit for bit (the map's z is k / 255, so --cond is
    given as those very floats); tiled too, where each tile gets its crop of the map."""
    cond_map = _constant_map(tmp_path / "map.png", 64, 200)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    model = ["--model", ckpt["mse"], "--tile", tile]
    code, _, err = _run(capsys, "restore", rgb_png, a, "--cond-map", cond_map, *model)
    assert code == 0 and f"map {cond_map}" in err, err
    cond = f"{64 / 255!r},{200 / 255!r}"
    assert _run(capsys, "restore", rgb_png, b, "--cond", cond, *model)[0] == 0
    np.testing.assert_array_equal(read_rgb8(a).array, read_rgb8(b).array)
    other = tmp_path / "other.png"
    assert _run(capsys, "restore", rgb_png, other, "--cond", "0,0", *model)[0] == 0
    assert not np.array_equal(read_rgb8(a).array, read_rgb8(other).array)


def _rgb_map(tmp: Path) -> Path:
    return write_png(tmp / "rgb_map.png", _rgb())


def _text_map(tmp: Path) -> Path:
    p = tmp / "text_map.png"
    p.write_text("hello, I am text\n")
    return p


def _grey16_map(tmp: Path) -> Path:
    p = tmp / "g16_map.png"
    Image.fromarray(np.full((20, 24), 1000, np.uint16)).save(p)
    return p


BAD_MAPS = {
    "wrong size": (lambda t: _constant_map(t / "m.png", 1, 2, 10, 24), [], "map is 24x10 but"),
    "rgb png": (_rgb_map, [], "grey + alpha PNG of the image's size"),
    "16-bit": (_grey16_map, [], "a condition map is an 8-bit grey + alpha PNG"),
    "not an image": (_text_map, [], "not an image"),
    "missing": (lambda t: t / "nope.png", [], "no such file"),
    "with --cond": (lambda t: _constant_map(t / "m.png", 1, 2), ["--cond", "0,0"], "not both"),
    "with levels": (
        lambda t: _constant_map(t / "m.png", 1, 2),
        ["--blur", "1", "--noise", "1"],
        "give either --cond-map or --blur/--noise, not both",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_bad_cond_maps(capsys, tmp_path, rgb_png, ckpt, case: str) -> None:
    make, extra, words = BAD_MAPS[case]
    out = tmp_path / "out.png"
    argv = ["restore", rgb_png, out, "--cond-map", make(tmp_path), "--model", ckpt["mse"], *extra]
    _assert_one_line_error(*_run(capsys, *argv)[::2], words)
    assert not out.exists()


def test_cond_map_for_a_model_of_another_cond_dim(capsys, tmp_path, rgb_png, ckpt) -> None:
    argv = ["--cond-map", _constant_map(tmp_path / "m.png", 1, 2), "--model", ckpt["cond3"]]
    code, _, err = _run(capsys, "restore", rgb_png, tmp_path / "o.png", *argv)
    _assert_one_line_error(code, err, "--cond-map has 2 values but the model takes 3")


def test_grayscale_input_is_converted_and_said(capsys, tmp_path, ckpt) -> None:
    src = tmp_path / "gray.png"
    Image.fromarray(_rgb()[..., 0], "L").save(src)
    out = tmp_path / "out.png"
    code, _, err = _run(
        capsys, "restore", src, out, "--blur", 0, "--noise", 10, "--model", ckpt["mse"]
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "grayscale converted to RGB" in notes[0] and str(src) in notes[0]
    assert read_rgb8(out).array.shape == (20, 24, 3)


def test_quiet_keeps_notes_and_drops_info(capsys, tmp_path, ckpt) -> None:
    src = tmp_path / "gray.png"
    Image.fromarray(_rgb()[..., 0], "L").save(src)
    code, _, err = _run(
        capsys, "restore", src, tmp_path / "o.png", "--cond", "0,0", "--model", ckpt["mse"], "-q"
    )
    assert code == 0 and "wrote" not in err and "grayscale" in err


def test_dni_blend(capsys, tmp_path, rgb_png, ckpt) -> None:
    outs = {}
    for alpha in ("0", "1", "0.5"):
        out = tmp_path / f"alpha{alpha}.png"
        code, _, err = _run(
            capsys,
            "restore",
            rgb_png,
            out,
            "--cond",
            "0.5,0.6",
            "--alpha",
            alpha,
            "--mse-model",
            ckpt["mse"],
            "--gan-model",
            ckpt["gan"],
        )
        assert code == 0, err
        outs[alpha] = read_rgb8(out).array
    z = [0.5, 0.6]
    np.testing.assert_array_equal(
        outs["1"], restore(load_model_for_inference(ckpt["mse"]).model, _rgb(), z)
    )
    np.testing.assert_array_equal(
        outs["0"], restore(load_model_for_inference(ckpt["gan"]).model, _rgb(), z)
    )
    assert not np.array_equal(outs["0.5"], outs["0"]) and not np.array_equal(outs["0.5"], outs["1"])


# ---------------------------------------------------------------------------------------------
# restore: levels become z with the scale of the checkpoint being used


def _without_scale(path: Path) -> Path:
    """A checkpoint as written before generator.json recorded condition_scale."""
    import hashlib
    import json

    sidecar = path / "generator.json"
    doc = json.loads(sidecar.read_text())
    del doc["condition_scale"]
    doc["tensors_sha256"] = hashlib.sha256(
        (path / "generator.safetensors").read_bytes()
    ).hexdigest()
    sidecar.write_text(json.dumps(doc))
    return path


def test_levels_use_the_scale_the_checkpoint_records(capsys, tmp_path, rgb_png) -> None:
    scale = ConditionScale(blur_max=2.0, noise_max=50.0)
    model = save_generator(tmp_path / "b2", _strong(seed=6), metadata={}, scale=scale)
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    code, _, err = _run(capsys, "restore", rgb_png, a, "--blur", 1, "--noise", 15, "--model", model)
    assert code == 0, err
    assert "z=[0.5,0.3]" in err
    code, _, err = _run(capsys, "restore", rgb_png, b, "--cond", "0.5,0.3", "--model", model)
    assert code == 0, err
    np.testing.assert_array_equal(read_rgb8(a).array, read_rgb8(b).array)
    # the method's z for the same levels drives this model differently
    code, _, err = _run(capsys, "restore", rgb_png, c, "--cond", "0.25,0.3", "--model", model)
    assert code == 0, err
    assert not np.array_equal(read_rgb8(a).array, read_rgb8(c).array)
    # and the range is the checkpoint's: 3 px is beyond a model trained up to 2
    code, _, err = _run(
        capsys, "restore", rgb_png, tmp_path / "d.png", "--blur", 3, "--noise", 0, "--model", model
    )
    _assert_one_line_error(code, err, "--blur must be in [0, 2] (got 3)")
    assert not (tmp_path / "d.png").exists()


def test_a_wider_scale_accepts_its_own_levels(capsys, tmp_path, rgb_png) -> None:
    scale = ConditionScale(blur_max=8.0, noise_max=100.0)
    model = save_generator(tmp_path / "wide", _strong(seed=7), metadata={}, scale=scale)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert _run(capsys, "restore", rgb_png, a, "--blur", 6, "--noise", 75, "--model", model)[0] == 0
    assert _run(capsys, "restore", rgb_png, b, "--cond", "0.75,0.75", "--model", model)[0] == 0
    np.testing.assert_array_equal(read_rgb8(a).array, read_rgb8(b).array)


def test_old_checkpoint_restores_with_the_default_scale_and_a_note(capsys, tmp_path, rgb_png):
    old = _without_scale(save_generator(tmp_path / "old", _strong(seed=8), metadata={}))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    code, _, err = _run(
        capsys, "restore", rgb_png, a, "--blur", 1, "--noise", 15, "--model", old, "-q"
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if "no condition_scale recorded" in line]
    assert len(notes) == 1 and "z = [blur/4, noise/50]" in notes[0] and str(old) in notes[0]
    assert _run(capsys, "restore", rgb_png, b, "--cond", "0.25,0.3", "--model", old)[0] == 0
    np.testing.assert_array_equal(read_rgb8(a).array, read_rgb8(b).array)


def test_blend_needs_one_scale(capsys, tmp_path, rgb_png, ckpt) -> None:
    gan = save_generator(
        tmp_path / "gan-b2", _strong(seed=2), metadata={}, scale=ConditionScale(2.0, 50.0)
    )
    out = tmp_path / "o.png"
    code, _, err = _run(
        capsys,
        "restore",
        rgb_png,
        out,
        "--blur",
        1,
        "--noise",
        10,
        "--alpha",
        0.5,
        "--mse-model",
        ckpt["mse"],
        "--gan-model",
        gan,
    )
    _assert_one_line_error(code, err, "different condition scales", "z = [blur/2, noise/50]")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# restore: every bad input is one line and exit 2, and nothing is written


def _not_image(tmp: Path) -> Path:
    p = tmp / "text.png"
    p.write_text("hello, I am text\n")
    return p


def _truncated(tmp: Path) -> Path:
    whole = write_png(tmp / "whole.png", _rgb(48, 48))
    p = tmp / "cut.png"
    p.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return p


def _sixteen_bit(tmp: Path) -> Path:
    p = tmp / "g16.png"
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(p)
    return p


def _transparent(tmp: Path) -> Path:
    rgba = np.concatenate([_rgb(8, 8), np.zeros((8, 8, 1), np.uint8)], axis=2)
    p = tmp / "t.png"
    Image.fromarray(rgba, "RGBA").save(p)
    return p


BAD_INPUTS = {
    "not an image": (_not_image, [], "not an image"),
    "truncated": (_truncated, [], "truncated"),
    "16-bit": (_sixteen_bit, [], "16-bit"),
    "transparency": (_transparent, [], "transparency"),
    "too large": (lambda t: write_png(t / "a.png", _rgb()), ["--max-pixels", "100"], "too large"),
    "missing input": (lambda t: t / "nope.png", [], "no such file"),
    "directory input": (lambda t: (t / "d.png").mkdir() or t / "d.png", [], "directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_images(capsys, tmp_path, ckpt, case: str) -> None:
    make, extra, word = BAD_INPUTS[case]
    src = make(tmp_path)
    out = tmp_path / "out.png"
    code, _, err = _run(
        capsys, "restore", src, out, "--blur", 1, "--noise", 5, "--model", ckpt["mse"], *extra
    )
    _assert_one_line_error(code, err, word)
    assert not out.exists()


BAD_ARGS = {
    "cond above 1": (["--cond", "0.5,1.2"], "--cond entries must lie in [0, 1]"),
    "cond negative": (["--cond=-0.1,0.5"], "[0, 1]"),
    "cond negative, no =": (["--cond", "-0.1,0.5"], "--cond"),  # argparse: looks like an option
    "cond nan": (["--cond", "nan,0.5"], "[0, 1]"),
    "cond not numbers": (["--cond", "a,b"], "comma-separated"),
    "cond wrong length": (["--cond", "0.1,0.2,0.3"], "--cond has 3 values but the model takes 2"),
    "blur above 4": (["--blur", "4.5", "--noise", "10"], "--blur must be in [0, 4]"),
    "blur negative": (["--blur", "-1", "--noise", "10"], "--blur must be in [0, 4]"),
    "noise above 50": (["--blur", "1", "--noise", "51"], "--noise must be in [0, 50]"),
    "blur not a number": (["--blur", "x", "--noise", "10"], "invalid float value"),
    "both forms": (["--cond", "0.1,0.2", "--blur", "1", "--noise", "2"], "not both"),
    "neither form": ([], "no condition given"),
    "blur without noise": (["--blur", "1"], "--noise is missing"),
    "noise without blur": (["--noise", "1"], "--blur is missing"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_condition_arguments(capsys, tmp_path, rgb_png, ckpt, case: str) -> None:
    argv, words = BAD_ARGS[case]
    out = tmp_path / "out.png"
    code, _, err = _run(capsys, "restore", rgb_png, out, "--model", ckpt["mse"], *argv)
    _assert_one_line_error(code, err, words)
    assert not out.exists()


def _pth_file(tmp: Path) -> Path:
    p = tmp / "CUGAN.pth"
    p.write_bytes(b"PK\x03\x04 pretend zip")
    return p


def _model_cases(ckpt: dict[str, Path], tmp: Path) -> dict[str, tuple[list[object], str]]:
    return {
        "missing checkpoint": (["--model", tmp / "no-such-model"], "no such checkpoint"),
        "corrupt checkpoint": (["--model", ckpt["corrupt"]], "not a readable safetensors"),
        "pth instead of checkpoint": (["--model", _pth_file(tmp)], "import-official"),
        "registered name without a store": (
            ["--model", "models:/cugan/1", "--tracking-uri", f"sqlite:///{tmp}/none.db"],
            f"models:/cugan/1: no MLflow store at {tmp}/none.db",
        ),
        "no model": ([], "no model given"),
        "alpha without models": (
            ["--alpha", "0.5"],
            "--alpha needs both --mse-model and --gan-model",
        ),
        "alpha with one model": (["--alpha", "0.5", "--mse-model", ckpt["mse"]], "needs both"),
        "models without alpha": (
            ["--mse-model", ckpt["mse"], "--gan-model", ckpt["gan"]],
            "without --alpha",
        ),
        "alpha out of range": (
            ["--alpha", "1.5", "--mse-model", ckpt["mse"], "--gan-model", ckpt["gan"]],
            "--alpha must be in [0, 1]",
        ),
        "model and alpha": (["--model", ckpt["mse"], "--alpha", "0.5"], "not both"),
        "blend of different configs": (
            ["--alpha", "0.5", "--mse-model", ckpt["mse"], "--gan-model", ckpt["other"]],
            "configs differ",
        ),
        "cond_dim 3 model": (
            ["--model", ckpt["cond3"]],
            "--cond has 2 values but the model takes 3",
        ),
    }


MODEL_CASES = [
    "missing checkpoint",
    "corrupt checkpoint",
    "pth instead of checkpoint",
    "registered name without a store",
    "no model",
    "alpha without models",
    "alpha with one model",
    "models without alpha",
    "alpha out of range",
    "model and alpha",
    "blend of different configs",
    "cond_dim 3 model",
]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_arguments(capsys, tmp_path, rgb_png, ckpt, case: str) -> None:
    argv, words = _model_cases(ckpt, tmp_path)[case]
    out = tmp_path / "out.png"
    code, _, err = _run(capsys, "restore", rgb_png, out, "--cond", "0.5,0.5", *argv)
    _assert_one_line_error(code, err, words)
    assert not out.exists()


@pytest.mark.parametrize(
    "out_name, words",
    [
        ("missing-dir/out.png", "does not exist"),
        ("out.jpg", "must be a .png"),
        (".", "must be a .png"),
    ],
)
def test_bad_outputs(capsys, tmp_path, rgb_png, ckpt, out_name: str, words: str) -> None:
    code, _, err = _run(
        capsys, "restore", rgb_png, tmp_path / out_name, "--cond", "0.5,0.5", "--model", ckpt["mse"]
    )
    _assert_one_line_error(code, err, words)


def test_output_that_is_a_directory(capsys, tmp_path, rgb_png, ckpt) -> None:
    (tmp_path / "dir.png").mkdir()
    code, _, err = _run(
        capsys,
        "restore",
        rgb_png,
        tmp_path / "dir.png",
        "--cond",
        "0.5,0.5",
        "--model",
        ckpt["mse"],
    )
    _assert_one_line_error(code, err, "is a directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA message")
def test_cuda_without_cuda(capsys, tmp_path, rgb_png, ckpt) -> None:
    code, _, err = _run(
        capsys,
        "restore",
        rgb_png,
        tmp_path / "o.png",
        "--cond",
        "0,0",
        "--model",
        ckpt["mse"],
        "--device",
        "cuda",
    )
    _assert_one_line_error(code, err, "CUDA is not available")


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], "required"),
        (["restore"], "required"),
        (["frobnicate"], "invalid choice"),
        (["restore", "a.png", "b.png", "--tile", "big"], "--tile"),
        (["restore", "a.png", "b.png", "--device", "tpu"], "invalid choice"),
        (["restore", "a.png", "b.png", "-v", "-q"], "not allowed"),
        (["degrade", "a.png", "b.png", "--blur", "1"], "--noise"),
        (["degrade", "a.png", "b.png", "--blur", "1", "--noise", "1", "--seed", "-3"], "--seed"),
        (["restore", "a.png", "b.png", "--max-pixels", "0"], "--max-pixels"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv: list[str], words: str) -> None:
    code, _, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, words)


def test_help_and_version(capsys) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "restore" in out and "import-official" in out
    code, out, _ = _run(capsys, "restore", "--help")
    assert code == 0 and "--alpha" in out and "--tile" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("cugan ")


# ---------------------------------------------------------------------------------------------
# degrade


def test_degrade_matches_the_reference_and_is_seeded(capsys, tmp_path, rgb_png) -> None:
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.png"
        code, _, err = _run(
            capsys, "degrade", rgb_png, out, "--blur", 1.5, "--noise", 20, "--seed", seed
        )
        assert code == 0, err
        outs.append(read_rgb8(out).array)
    expected = to_uint8(
        degrade(to_tensor(_rgb()), 1.5, 20, generator=torch.Generator().manual_seed(3))
    )
    np.testing.assert_array_equal(outs[0], expected)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--blur", "5", "--noise", "1"], "--blur must be in [0, 4]"),
        (["--blur", "1", "--noise", "-2"], "--noise must be in [0, 50]"),
    ],
)
def test_degrade_errors(capsys, tmp_path, rgb_png, argv, words) -> None:
    code, _, err = _run(capsys, "degrade", rgb_png, tmp_path / "o.png", *argv)
    _assert_one_line_error(code, err, words)


def test_degrade_bad_image_and_missing_output_dir(capsys, tmp_path, rgb_png) -> None:
    code, _, err = _run(
        capsys, "degrade", _not_image(tmp_path), tmp_path / "o.png", "--blur", 1, "--noise", 1
    )
    _assert_one_line_error(code, err, "not an image")
    code, _, err = _run(
        capsys, "degrade", rgb_png, tmp_path / "x" / "o.png", "--blur", 1, "--noise", 1
    )
    _assert_one_line_error(code, err, "does not exist")


# ---------------------------------------------------------------------------------------------
# import-official and configs


def _official_pth(path: Path, model) -> Path:
    """Write ``model`` in the authors' key layout (the inverse of the importer's name map)."""
    from pipeline.official import _name_map

    ours_to_theirs = {ours: theirs for theirs, ours in _name_map(model.config).items()}
    sd = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        sd[f"{ours_to_theirs[module]}.{leaf}"] = value.clone()
    torch.save(sd, path)
    return path


def test_import_official_then_restore(capsys, tmp_path, rgb_png) -> None:
    model = _strong(seed=9)
    pth = _official_pth(tmp_path / "CUGAN.pth", model)
    code, _, err = _run(capsys, "import-official", pth, tmp_path / "imported")
    assert code == 0, err
    loaded = load_model_for_inference(tmp_path / "imported").model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    code, _, err = _run(
        capsys,
        "restore",
        rgb_png,
        tmp_path / "o.png",
        "--cond",
        "0.5,0.5",
        "--model",
        tmp_path / "imported",
    )
    assert code == 0, err


@pytest.mark.parametrize("case", ["missing", "garbage", "directory", "parent missing"])
def test_import_official_errors(capsys, tmp_path, case: str) -> None:
    pth, out = tmp_path / "CUGAN.pth", tmp_path / "out"
    if case == "garbage":
        pth.write_bytes(b"not a pytorch file")
    elif case == "directory":
        pth.mkdir()
    elif case == "parent missing":
        _official_pth(pth, _strong())
        out = tmp_path / "no" / "out"
    code, _, err = _run(capsys, "import-official", pth, out)
    _assert_one_line_error(code, err)
    assert not out.exists()


def test_configs_table(capsys) -> None:
    code, out, err = _run(capsys, "configs")
    assert code == 0, err
    lines = out.splitlines()
    authors = [line for line in lines if line.startswith("generator") and " authors " in line]
    assert len(authors) == 1 and "6,534,476" in authors[0]
    for name in ("demo", "tiny", "cugan-1", "cugan-2", "cugan-3", "unet", "no-gfm"):
        assert any(f" {name} " in line for line in lines), name
    assert "1.370M" in out


# ---------------------------------------------------------------------------------------------
# the installed console script, once


@pytest.mark.skipif(not CBSD68.is_dir(), reason="CBSD68 not present (../shared/datasets/CBSD68)")
def test_console_script_restores_a_cbsd68_image(tmp_path, ckpt) -> None:
    script = Path(sys.executable).parent / "cugan"
    if not script.exists():
        found = shutil.which("cugan")
        if found is None:
            pytest.skip("console script 'cugan' is not installed (pip install -e .)")
        script = Path(found)
    src = min(CBSD68.glob("*.png"))
    out = tmp_path / "restored.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(script),
            "restore",
            str(src),
            str(out),
            "--blur",
            "1",
            "--noise",
            "15",
            "--model",
            str(ckpt["mse"]),
            "--device",
            "cpu",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr
    assert read_rgb8(out).array.shape == read_rgb8(src).array.shape


def test_verbose_is_ours_only_and_logging_is_restored(capsys, tmp_path, rgb_png, ckpt) -> None:
    import logging

    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    code, _, err = _run(
        capsys,
        "restore",
        rgb_png,
        tmp_path / "o.png",
        "--cond",
        "0.2,0.2",
        "--model",
        ckpt["mse"],
        "-v",
    )
    assert code == 0, err
    assert "loaded generator" in err  # our DEBUG
    assert "STREAM" not in err  # Pillow's DEBUG chunk dump stays off
    assert (root.level, list(root.handlers)) == before
