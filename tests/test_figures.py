"""Modulation figures: the grid, the DNI alpha strip and the modulation curve, checked against
direct calls of restore / models.dni / pipeline.metrics on a tiny random model."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from pipeline.condition import DEFAULT_SCALE
from pipeline.degradation import to_tensor
from pipeline.evaluation.figures import (
    alpha_strip,
    centre_crop,
    make_figure_input,
    make_figures,
    modulation_curve,
    modulation_grid,
)
from pipeline.evaluation.specs import ModelSpec
from pipeline.inference import restore
from pipeline.metrics import psnr
from tests import evalkit


@pytest.fixture(scope="module")
def fig_input():
    clean = evalkit.smooth_image(32, 40, seed=5)
    return make_figure_input("img.png", clean, 2.0, 30.0, seed=0)


@pytest.fixture(scope="module")
def params():
    return evalkit.tiny_params()


def test_centre_crop():
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    np.testing.assert_array_equal(centre_crop(img, 4), img[1:5, 2:6])
    assert centre_crop(img, 100).shape == img.shape


def test_figure_input_is_seeded(fig_input):
    again = make_figure_input("img.png", fig_input.clean, 2.0, 30.0, seed=0)
    other = make_figure_input("img.png", fig_input.clean, 2.0, 30.0, seed=1)
    np.testing.assert_array_equal(again.degraded, fig_input.degraded)
    assert not np.array_equal(other.degraded, fig_input.degraded)
    assert (fig_input.blur, fig_input.noise) == (2.0, 30.0)


def test_modulation_curve_equals_direct_psnr(fig_input):
    model = evalkit.tiny_generator(seed=3)
    points = modulation_curve(model, [fig_input], DEFAULT_SCALE, points=3)
    assert [(p.axis, p.z) for p in points] == [
        ("blur", 0.0),
        ("blur", 0.5),
        ("blur", 1.0),
        ("noise", 0.0),
        ("noise", 0.5),
        ("noise", 1.0),
    ]
    # The swept entry moves, the other stays at the truth z = [0.5, 0.6].
    assert [p.z_noise for p in points if p.axis == "blur"] == pytest.approx([0.6] * 3)
    assert [p.z_blur for p in points if p.axis == "noise"] == pytest.approx([0.5] * 3)
    clean = to_tensor(fig_input.clean)
    for p in points:
        out = restore(model, fig_input.degraded, torch.tensor([[p.z_blur, p.z_noise]]))
        assert p.psnr == pytest.approx(float(psnr(to_tensor(out), clean)[0]), rel=1e-12)
    assert all(np.isfinite(p.psnr) for p in points)


def test_modulation_curve_rejects_mixed_truths(fig_input):
    other = make_figure_input("b.png", fig_input.clean, 1.0, 15.0)
    with pytest.raises(ValueError, match="share the true levels"):
        modulation_curve(evalkit.tiny_generator(seed=3), [fig_input, other], DEFAULT_SCALE)


def test_grid_cells_are_restorations_with_their_z(fig_input):
    model = evalkit.tiny_generator(seed=3)
    grid = modulation_grid(model, fig_input, [0, 2, 4], [0, 30], DEFAULT_SCALE)
    assert sorted(grid) == [(b, n) for b in (0.0, 2.0, 4.0) for n in (0.0, 30.0)]
    for (b, n), img in grid.items():
        np.testing.assert_array_equal(
            img, restore(model, fig_input.degraded, DEFAULT_SCALE.to_z([b], [n]))
        )
    assert not np.array_equal(grid[(0.0, 0.0)], grid[(4.0, 30.0)])  # z does steer the model


def test_alpha_strip_ends_are_the_two_models(fig_input):
    mse, gan = evalkit.tiny_generator(seed=1), evalkit.tiny_generator(seed=2)
    strip = alpha_strip(mse, gan, fig_input, [0.0, 0.5, 1.0], DEFAULT_SCALE)
    z = DEFAULT_SCALE.to_z([2.0], [30.0])
    np.testing.assert_array_equal(strip[0], restore(gan, fig_input.degraded, z))
    np.testing.assert_array_equal(strip[2], restore(mse, fig_input.degraded, z))
    assert strip[1].shape == fig_input.degraded.shape


def test_make_figures_writes_pngs_and_csvs(tmp_path, params):
    evalkit.make_eval_set(tmp_path / "sets")
    specs = [
        ModelSpec("cunet", "mse", evalkit.save_tiny(tmp_path / "cunet", seed=1)),
        ModelSpec("cugan", "gan", evalkit.save_tiny(tmp_path / "cugan", seed=2)),
    ]
    written = make_figures(specs, tmp_path / "sets", tmp_path / "out", params)
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "grid_cunet_img0.png",
            "grid_cugan_img0.png",
            "alpha_img0.png",
            "modulation_curve.png",
            "modulation_curve_blur.csv",
            "modulation_curve_noise.csv",
        ]
    )
    for p in written:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "out" / "plots" / "modulation_curve_noise.csv").open() as fp:
        rows = list(csv.DictReader(fp))
    assert list(rows[0]) == ["z", "level", "psnr_cunet", "psnr_cugan"]
    assert [float(r["level"]) for r in rows] == pytest.approx([0.0, 25.0, 50.0])


def test_make_figures_drives_each_model_with_its_checkpoints_scale(tmp_path, params, caplog):
    """Figures use the z scale each checkpoint records, not params.degradation: the curve's
    other entry sits at the true z of THAT scale, and its levels are z times its maxima; two
    models trained with different scales get no alpha strip (their blend means nothing)."""
    from pipeline.checkpoint import save_generator
    from pipeline.condition import ConditionScale
    from pipeline.imageio import read_rgb8

    evalkit.make_eval_set(tmp_path / "sets")
    wide = ConditionScale(blur_max=8.0, noise_max=100.0)
    model = evalkit.tiny_generator(seed=1)
    specs = [
        ModelSpec("wide", "mse", save_generator(tmp_path / "w", model, metadata={}, scale=wide)),
        ModelSpec("cugan", "gan", evalkit.save_tiny(tmp_path / "cugan", seed=2)),
    ]
    written = make_figures(specs, tmp_path / "sets", tmp_path / "out", params)
    assert "alpha_img0.png" not in {p.name for p in written}
    assert "different z scales" in caplog.text
    fp = params.evaluate.figures
    clean = centre_crop(read_rgb8(tmp_path / "sets" / "tiny" / "gt" / "img0.png").array, fp.crop)
    fi = make_figure_input("img0.png", clean, fp.input_blur, fp.input_noise, seed=fp.seed)
    expected = modulation_curve(model, [fi], wide, points=fp.curve_points)
    default = modulation_curve(model, [fi], DEFAULT_SCALE, points=fp.curve_points)
    with (tmp_path / "out" / "plots" / "modulation_curve_blur.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["z", "level_wide", "level_cugan", "psnr_wide", "psnr_cugan"]
    assert [float(r["level_wide"]) for r in rows] == pytest.approx([0.0, 4.0, 8.0])
    assert [float(r["level_cugan"]) for r in rows] == pytest.approx([0.0, 2.0, 4.0])
    want = [p.psnr for p in expected if p.axis == "blur"]
    assert [float(r["psnr_wide"]) for r in rows] == pytest.approx(want, rel=1e-5)
    assert [p.z_noise for p in expected if p.axis == "blur"] == pytest.approx([0.3] * 3)
    other = [p.psnr for p in default if p.axis == "blur"]
    assert any(abs(a - b) > 1e-3 for a, b in zip(want, other, strict=True))
