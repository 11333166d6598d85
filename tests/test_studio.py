"""The studio's logic without a browser: model session and alpha cache, z on the checkpoint's
scale, preview boxes, painted regions, the CLI command, error messages, the subcommand."""

from __future__ import annotations

import shlex
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

from models.dni import blend_generators
from pipeline import cli
from pipeline.checkpoint import load_generator
from pipeline.condition import ConditionScale
from pipeline.imageio import read_cond_map, write_cond_map
from pipeline.inference import (
    Backend,
    PathSpec,
    Precision,
    Workload,
    receptive_field_radius,
    restore,
)
from pipeline.studio import session as session_module
from pipeline.studio.recipe import number, restore_command
from pipeline.studio.regions import (
    Box,
    box_around,
    context_box,
    estimate_noise,
    painted_mask,
    quantize_z,
    read_image,
    z_map,
)
from pipeline.studio.session import ModelSession, ModelSpec, StudioError, resolve_model_spec
from pipeline.studio.ui import Studio
from tests import studio_fixtures as kit


class _Progress:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, value, **kwargs) -> None:
        self.calls.append(value)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return kit.models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pair(ckpts) -> ModelSession:
    return ModelSession(ModelSpec(mse_model=str(ckpts["mse"]), gan_model=str(ckpts["gan"])))


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.photo(tmp_path_factory.mktemp("photo") / "cat photo.png")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _editor(height: int, width: int, rows: slice, cols: slice) -> dict:
    layer = np.zeros((height, width, 4), np.uint8)
    layer[rows, cols] = (255, 59, 48, 255)
    return {"background": None, "layers": [layer], "composite": None}


# ---------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"model": "a", "mse_model": "b"}, "not both"),
        ({}, "no model given"),
        ({"mse_model": "a"}, "the GAN model is missing"),
        ({"gan_model": "a"}, "the MSE model is missing"),
    ],
)
def test_model_spec_forms(kwargs: dict, match: str) -> None:
    with pytest.raises(StudioError, match=match):
        ModelSpec(**kwargs)


def test_model_names_resolve_in_one_place(tmp_path: Path) -> None:
    assert resolve_model_spec("  runs/ck  ") == "runs/ck"
    with pytest.raises(StudioError, match="got nothing"):
        resolve_model_spec(" ")
    with pytest.raises(ValueError, match="models:/cunet/1: no MLflow store at"):
        ModelSession(
            ModelSpec(model="models:/cunet/1"), tracking_uri=f"sqlite:///{tmp_path}/none.db"
        )
    with pytest.raises(ValueError, match="missing: no such checkpoint"):
        ModelSession(ModelSpec(model=str(tmp_path / "missing")))


def test_z_uses_the_checkpoint_scale(tmp_path: Path) -> None:
    path = kit.tiny_checkpoint(tmp_path / "ck", 1, ConditionScale(blur_max=3.0, noise_max=60.0))
    session = ModelSession(ModelSpec(model=str(path)))
    assert session.z(3.0, 60.0).tolist() == [[1.0, 1.0]]
    assert session.z(1.5, 15.0).tolist() == [[0.5, 0.25]]
    with pytest.raises(ValueError, match=r"blur must be in \[0, 3\]"):
        session.z(3.5, 0.0)


def test_alpha_blends_in_memory_exactly_and_is_cached(ckpts, monkeypatch) -> None:
    session = ModelSession(
        ModelSpec(mse_model=str(ckpts["mse"]), gan_model=str(ckpts["gan"])), cache_size=2
    )
    mse, _ = load_generator(ckpts["mse"])
    gan, _ = load_generator(ckpts["gan"])
    monkeypatch.setattr(  # an alpha change must never read a checkpoint again
        session_module, "load_model_for_inference", lambda *a, **k: pytest.fail("reload")
    )
    assert _same(session.generator(0.0), gan) and _same(session.generator(1.0), mse)
    mid = session.generator(0.3)
    assert _same(mid, blend_generators(mse, gan, 0.3))
    assert session.generator(0.3) is mid  # cached
    assert session.cached_alphas() == [1.0, 0.3]  # at most cache_size, most recent last
    with pytest.raises(ValueError, match="alpha must be in"):
        session.generator(1.5)


def test_single_model_ignores_alpha(ckpts) -> None:
    session = ModelSession(ModelSpec(model=str(ckpts["single"])))
    assert not session.has_alpha
    assert session.generator(None) is session.generator(0.2)


def test_pairs_must_match(ckpts, tmp_path: Path) -> None:
    other = kit.tiny_checkpoint(tmp_path / "s", 2, ConditionScale(blur_max=2.0, noise_max=50.0))
    with pytest.raises(ValueError, match="different condition scales"):
        ModelSession(ModelSpec(mse_model=str(ckpts["mse"]), gan_model=str(other)))


def test_tiled_progress(pair) -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    calls: list[tuple[int, int]] = []
    out = pair.restore(image, 1.0, 5.0, 0.5, tile=16, progress=lambda *a: calls.append(a))
    assert out.shape == image.shape and calls == [(i, 9) for i in range(1, 10)]


# ---------------------------------------------------------------------------------------------
# regions


def test_box_around_stays_inside_the_image() -> None:
    assert box_around(50, 40, 20, 100, 120) == Box(40, 30, 60, 50)
    assert box_around(2, 98, 20, 100, 120) == Box(0, 80, 20, 100)
    assert box_around(10, 10, 256, 60, 80) == Box(0, 0, 80, 60)  # the whole (small) image


def test_context_box_is_on_the_grid_and_clamped() -> None:
    box = context_box(Box(50, 45, 70, 65), 10, 4, 100, 72)
    assert box == Box(40, 32, 72, 75)
    assert box.left % 4 == 0 and box.top % 4 == 0
    assert context_box(Box(3, 3, 9, 9), 36, 4, 50, 50) == Box(0, 0, 45, 45)


def test_painted_mask_and_z_map() -> None:
    editor = _editor(6, 8, slice(1, 3), slice(2, 5))
    mask = painted_mask(editor, 6, 8)
    assert mask.sum() == 6 and mask[1:3, 2:5].all()
    assert painted_mask({"layers": [np.zeros((6, 8, 4), np.uint8)]}, 6, 8) is None
    assert painted_mask(None, 6, 8) is None
    with pytest.raises(ValueError, match="painted layer is 8x6 but the image is 9x6"):
        painted_mask(editor, 6, 9)
    zm = z_map(mask, (10, 20), (200, 5))
    assert zm.dtype == np.uint8 and zm.shape == (6, 8, 2)
    assert zm[1, 2].tolist() == [200, 5] and zm[0, 0].tolist() == [10, 20]


def test_quantize_z_and_cond_map_file(tmp_path: Path) -> None:
    assert quantize_z(torch.tensor([[0.5, 0.3]])) == (128, 77)  # 127.5 rounds half up
    zm = z_map(np.eye(5, dtype=bool), (1, 2), (254, 3))
    path = write_cond_map(tmp_path / "map.png", zm)
    np.testing.assert_array_equal(read_cond_map(path), zm)


def test_noise_estimate_is_near_the_truth() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((96, 96, 3), 128.0)
    noisy = np.clip(flat + rng.normal(0, 10, flat.shape), 0, 255).round().astype(np.uint8)
    assert abs(estimate_noise(noisy, 50.0) - 10) < 1.5
    very = np.clip(flat + rng.normal(0, 90, flat.shape), 0, 255).round().astype(np.uint8)
    assert estimate_noise(very, 50.0) == 50.0  # clipped to the model's range


# ---------------------------------------------------------------------------------------------
# the CLI command


def test_numbers_round_trip() -> None:
    for value in (2.0, 0.35, 0.1 + 0.2, 1e-5, 12.3):
        assert float(number(value)) == value
    assert number(2.0) == "2" and number(0.35) == "0.35"


def test_command_forms() -> None:
    pair = ModelSpec(mse_model="runs/m s e", gan_model="runs/gan")
    cmd = restore_command(
        input_name="my photo.png",
        output_name="out.png",
        spec=pair,
        blur=2.0,
        noise=15.5,
        alpha=0.25,
    )
    assert shlex.split(cmd) == [
        "cugan",
        "restore",
        "my photo.png",
        "out.png",
        "--alpha",
        "0.25",
        "--mse-model",
        "runs/m s e",
        "--gan-model",
        "runs/gan",
        "--blur",
        "2",
        "--noise",
        "15.5",
    ]
    single = restore_command(
        input_name="a.png",
        output_name="b.png",
        spec=ModelSpec(model="m"),
        blur=0,
        noise=0,
        alpha=None,
        cond_map_name="a_condmap.png",
        device="cpu",
    )
    assert single == "cugan restore a.png b.png --model m --cond-map a_condmap.png --device cpu"
    registered = restore_command(
        input_name="a.png",
        output_name="b.png",
        spec=ModelSpec(model="models:/cugan/3"),
        blur=1,
        noise=2,
        alpha=None,
        path=PathSpec(Backend.CHANNELS_LAST, Precision.BF16),
        tracking_uri="http://mlflow:5000",
    )
    assert registered == (
        "cugan restore a.png b.png --model models:/cugan/3 --blur 1 --noise 2 "
        "--backend channels_last --precision bf16 --tracking-uri http://mlflow:5000"
    )


# ---------------------------------------------------------------------------------------------
# the page's handlers (what the browser tests drive, here without a browser)


def test_full_image_equals_the_cli_command(pair, photo, tmp_path: Path) -> None:
    studio = Studio(pair)
    try:
        image = studio.load(str(photo))[0]
        compare, result, cond, command, status = studio.full(
            image, 2.0, 15.0, 0.4, None, None, 64, False, None, 0, 0, progress=_Progress()
        )
        assert "Restored the full image (128x96)" in status and cond is None
        assert shlex.split(command)[2] == "cat photo.png"  # the upload's own name
        written = read_image(result).array
        np.testing.assert_array_equal(written, compare[1])
        np.testing.assert_array_equal(kit.cli_restore(command, photo, tmp_path / "o.png"), written)
    finally:
        studio.close()


def test_preview_is_the_full_result_in_its_box(pair, photo) -> None:
    studio = Studio(pair)
    image = studio.load(str(photo))[0]
    (before, after), command, status = studio.preview(
        image, 2.0, 15.0, 0.4, 40, 30, 32, False, None, 0, 0
    )
    assert "Preview 32x32 at (24, 14)" in status and "--blur 2 --noise 15" in command
    whole = pair.restore(image.array, 2.0, 15.0, 0.4)
    np.testing.assert_array_equal(before, image.array[14:46, 24:56])
    diff = np.abs(after.astype(int) - whole[14:46, 24:56].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float summation order only
    (_, moved), _, _ = studio.preview(image, 2.0, 30.0, 0.4, 40, 30, 32, False, None, 0, 0)
    assert np.abs(moved.astype(int) - after.astype(int)).max() > 2  # noise changes the output


def test_painted_region_runs_the_z_map(pair, photo, tmp_path: Path) -> None:
    studio = Studio(pair)
    try:
        image = studio.load(str(photo))[0]
        editor = _editor(96, 128, slice(None), slice(0, 40))
        _, result, cond, command, _ = studio.full(
            image, 0.5, 5.0, 0.6, None, None, 64, True, editor, 3.0, 40.0, progress=_Progress()
        )
        zmap = read_cond_map(cond)
        assert zmap[0, 0].tolist() == list(quantize_z(pair.z(3.0, 40.0)))
        assert zmap[0, 127].tolist() == list(quantize_z(pair.z(0.5, 5.0)))
        assert "--cond-map" in command and Path(cond).name in command
        out = read_image(result).array
        model = pair.generator(0.6)
        np.testing.assert_array_equal(out, restore(model, image.array, zmap))
        # The exported map through `cugan restore --cond-map`, as the command says.
        cli_out = kit.cli_restore(command, photo, tmp_path / "cm.png", cwd=Path(cond).parent)
        np.testing.assert_array_equal(cli_out, out)
        # Away from the border by more than the receptive field: each side is its own vector.
        r = receptive_field_radius(model.config) + model.size_multiple
        outside = restore(model, image.array, torch.tensor(zmap[0, 127]) / 255.0)
        np.testing.assert_array_equal(out[:, 40 + r :], outside[:, 40 + r :])
        inside = restore(model, image.array, torch.tensor(zmap[0, 0]) / 255.0)
        assert np.abs(out[:, :40].astype(int) - outside[:, :40].astype(int)).max() > 2
        assert np.abs(out[:, :4].astype(int) - inside[:, :4].astype(int)).max() <= 1
        # Unchecked, or nothing painted: the vector path, with the exact (not 8-bit) z.
        plain = studio.full(
            image, 0.5, 5.0, 0.6, None, None, 64, False, editor, 3.0, 40.0, progress=_Progress()
        )
        np.testing.assert_array_equal(
            read_image(plain[1]).array, pair.restore(image.array, 0.5, 5.0, 0.6)
        )
    finally:
        studio.close()


# ---------------------------------------------------------------------------------------------
# the inference path: chosen once, carried by the CLI command


def _strip_path(command: str) -> str:
    """The command without its ``--backend B --precision P`` (what ``cugan restore`` would
    choose by itself)."""
    argv = shlex.split(command)
    for flag in ("--backend", "--precision"):
        i = argv.index(flag)
        del argv[i : i + 2]
    return shlex.join(argv)


def test_one_path_for_the_session_and_the_cli_command_runs_it(
    ckpts, photo, tmp_path: Path, monkeypatch
) -> None:
    """A session asked for bf16 (a path that is not eager fp32's pixels) runs every generator
    on it, prepares each once, and its command names it: ``cugan restore`` with the command
    writes the very same pixels, for a blend alpha and for a painted condition map, and
    without the path flags it would not."""
    calls: list[dict] = []
    real = session_module.prepare_model

    def counting(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(session_module, "prepare_model", counting)
    spec = ModelSpec(mse_model=str(ckpts["mse"]), gan_model=str(ckpts["gan"]))
    session = ModelSession(spec, backend="eager", precision="bf16")
    assert session.path == PathSpec(Backend.EAGER, Precision.BF16)
    assert "inference path bf16" in session.describe()
    assert len(calls) == 1 and calls[0]["workload"] == Workload.service()
    studio = Studio(session)
    try:
        image = studio.load(str(photo))[0]
        args = (image, 2.0, 15.0, 0.4, None, None, 64)
        _, result, _, command, _ = studio.full(*args, False, None, 0, 0, progress=_Progress())
        assert "--backend eager --precision bf16" in command
        written = read_image(result).array
        np.testing.assert_array_equal(kit.cli_restore(command, photo, tmp_path / "c.png"), written)
        fp32 = kit.cli_restore(_strip_path(command), photo, tmp_path / "fp32.png")
        assert not np.array_equal(fp32, written)  # the flags are what makes them equal
        # A painted region on the same alpha: the exported map through the CLI.
        editor = _editor(96, 128, slice(20, 70), slice(0, 50))
        _, painted, cond, command, _ = studio.full(
            *args, True, editor, 3.5, 45.0, progress=_Progress()
        )
        assert "--cond-map" in command and "--backend eager --precision bf16" in command
        written = read_image(painted).array
        cli_out = kit.cli_restore(command, photo, tmp_path / "m.png", cwd=Path(cond).parent)
        np.testing.assert_array_equal(cli_out, written)
        # Each generator prepared once, on the session's path: the start (alpha 1) and 0.4.
        assert len(calls) == 2 and session.cached_alphas() == [1.0, 0.4]
        assert (calls[1]["backend"], calls[1]["precision"]) == (Backend.EAGER, Precision.BF16)
    finally:
        studio.close()


def test_auto_path_is_chosen_for_a_service_and_stated(ckpts, photo, tmp_path: Path) -> None:
    session = ModelSession(ModelSpec(model=str(ckpts["single"])))
    assert session.path == session.prepared(None).choice.spec  # tiny: eager fp32
    studio = Studio(session)
    try:
        image = studio.load(str(photo))[0]
        _, result, _, command, _ = studio.full(
            image, 1.0, 9.0, None, None, None, 64, False, None, 0, 0, progress=_Progress()
        )
        path = session.path
        assert f"--backend {path.backend.value} --precision {path.precision.value}" in command
        written = read_image(result).array
        np.testing.assert_array_equal(kit.cli_restore(command, photo, tmp_path / "o.png"), written)
    finally:
        studio.close()


@pytest.mark.parametrize(
    "make,words",
    [
        (kit.not_an_image, "not an image"),
        (kit.sixteen_bit, "16-bit"),
        (lambda p: kit.photo(p, 64, 64), "too large"),
    ],
)
def test_bad_uploads_are_one_line_in_the_page(pair, tmp_path: Path, make, words: str) -> None:
    studio = Studio(pair, max_pixels=48 * 48)
    out = studio.load(str(make(tmp_path / "bad.png")))
    status = out[-2]
    assert out[1] is False and status.startswith("**Error:** ") and words in status
    assert "\n" not in status
    with pytest.raises(gr.Error, match=words):
        studio.api_restore(str(tmp_path / "bad.png"), 1.0, 1.0, 0.5)


def test_a_model_that_does_not_load_keeps_the_old_one(pair, ckpts, tmp_path: Path) -> None:
    studio = Studio(pair)
    out = studio.load_models(str(tmp_path / "missing"), "", "")
    assert out[-1].startswith("**Error:** ") and studio.session is pair
    out = studio.load_models("", str(ckpts["mse"]), "")
    assert "the GAN model is missing" in out[-1] and studio.session is pair
    out = studio.load_models(str(ckpts["single"]), "", "")
    assert studio.session is not pair and not studio.session.has_alpha
    assert out[0]["visible"] is False and "Loaded" in out[-1]


def test_api_equals_cli_and_ignores_alpha_with_one_model(ckpts, photo, tmp_path) -> None:
    studio = Studio(ModelSession(ModelSpec(model=str(ckpts["single"]))))
    out = studio.api_restore(str(photo), 1.0, 20.0, 0.1)
    np.testing.assert_array_equal(out, studio.api_restore(str(photo), 1.0, 20.0, 0.9))
    argv = [
        "restore",
        str(photo),
        str(tmp_path / "o.png"),
        "--model",
        str(ckpts["single"]),
        "--blur",
        "1",
        "--noise",
        "20",
        "-q",
    ]
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(out, read_image(tmp_path / "o.png").array)


# ---------------------------------------------------------------------------------------------
# the subcommand


@pytest.mark.parametrize(
    "argv,words",
    [
        (["studio"], "no model given"),
        (["studio", "--model", "nope-dir"], "nope-dir"),
        (["studio", "--mse-model", "a"], "GAN model is missing"),
        (["studio", "--model", "m", "--port", "70000"], "--port"),
    ],
)
def test_studio_command_errors_are_one_line(capsys, argv: list[str], words: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cugan: error: ") and words in err and "\n" not in err


def test_latency_benchmark_runs_through_the_studio(tmp_path: Path) -> None:
    """Correctness of benchmarks/studio_latency.py on tiny sizes (its timings mean nothing here)."""
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "studio_latency", root / "benchmarks" / "studio_latency.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lat.json"
    argv = [
        "--configs",
        "tiny",
        "--preview",
        "32",
        "--full",
        "48",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0
    row = json.loads(out.read_text())["configs"]["tiny"]
    for key in (
        "preview_ms",
        "full_ms",
        "alpha_blend_ms",
        "alpha_cached_ms",
        "preview_new_alpha_ms",
    ):
        assert row[key] > 0, key
    assert row["path"] == "pipeline.inference.restore"
