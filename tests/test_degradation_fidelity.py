"""benchmarks/degradation_fidelity.py: the emulation of the authors' precision choices, and
the documented bound (docs/data.md): ours differs from it by at most 1 level, rarely."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.imageio import write_png
from tests.data_fixtures import textured

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "degradation_fidelity.py"
CBSD68 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "CBSD68"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("degradation_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_im2uint8_rounds_half_away_and_saturates(fidelity):
    x = np.array([-0.1, 0.0, 0.5 / 255, 1.5 / 255, 127.5 / 255, 1.0, 1.2])
    assert fidelity.im2uint8_double(x).tolist() == [0, 0, 1, 2, 128, 255, 255]
    # single: 255 * x is rounded to single first, which moves near-ties
    tie = np.float64(np.float32(100.5 / 255))
    assert fidelity.im2uint8_single(np.array([tie]))[0] == np.floor(
        np.float32(255) * np.float32(tie) + 0.5
    )


def test_authors_blur_is_the_single_kernel_applied_in_double(fidelity):
    img = textured(30, 33, 1).astype(np.float64) / 255
    assert np.array_equal(fidelity.authors_blur(img, 0.0), img)
    out = fidelity.authors_blur(img, 2.0)
    assert out.dtype == np.float64 and out.shape == img.shape
    flat = np.full((30, 33, 3), 0.4)  # a single-rounded kernel sums to 1 within ~1e-7
    assert np.abs(fidelity.authors_blur(flat, 3.0) - 0.4).max() < 1e-7


def test_ours_is_within_one_level_of_the_authors_emulation(fidelity, tmp_path):
    if CBSD68.is_dir():
        images = CBSD68
        count = 2
    else:
        images = tmp_path / "images"
        images.mkdir()
        for i in range(2):
            write_png(images / f"im{i}.png", textured(64, 80, i))
        count = 2
    out = tmp_path / "fidelity.json"
    report = fidelity.main(
        ["--images", str(images), "--max-images", str(count), "--json", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["images"] == count and len(report["settings"]) == 10
    for setting, row in report["settings"].items():
        for name, numbers in row.items():
            assert numbers["max_abs_levels"] <= 1, (setting, name)
            assert numbers["share_differing"] < 1e-3, (setting, name)
        if "dali_float32" in row:  # DALI draws its own noise: blur-only settings only
            assert setting.endswith("_noise0")
    kernels = report["kernel_max_weight_difference"]
    assert kernels["float64_vs_authors_single"] < 3e-8  # single rounding of weights <= 0.16
    assert kernels["float32_vs_authors_single"] < 1e-7
