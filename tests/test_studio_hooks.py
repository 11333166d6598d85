"""The inference hooks the studio relies on (pipeline/inference.py): z maps in ``restore``,
cropped with each tile; the progress callback; the default tiling shared with the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.registry import build_generator
from pipeline.inference import (
    AUTO_TILE_MAX_PIXELS,
    AUTO_TILE_SIZE,
    auto_tile,
    receptive_field_radius,
    restore,
    validate_z_map,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _strong(seed: int = 0):
    """Tiny model with large weights: its output depends visibly on z and on a wide area."""
    model = build_generator("tiny", generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def test_constant_uint8_map_equals_the_vector_it_encodes() -> None:
    model, image = _strong(), _image(30, 42)  # not a multiple of 4: the map is padded too
    zmap = np.empty((30, 42, 2), dtype=np.uint8)
    zmap[..., 0], zmap[..., 1] = 128, 51
    z = torch.tensor([128, 51], dtype=torch.float32) / 255.0
    expected = restore(model, image, z)
    assert not np.array_equal(expected, restore(model, image, [0.0, 0.0]))
    np.testing.assert_array_equal(restore(model, image, zmap), expected)
    np.testing.assert_array_equal(restore(model, image, zmap.astype(np.float32) / 255), expected)


def test_map_is_cropped_with_each_tile() -> None:
    model, image = _strong(), _image(64, 80, seed=2)
    zmap = np.zeros((64, 80, 2), dtype=np.float32)
    zmap[:, 40:] = (0.9, 0.1)
    zmap[20:, :] += (0.05, 0.3)
    radius = receptive_field_radius(model.config)
    whole = restore(model, image, zmap)
    tiled = restore(model, image, zmap, tile=16, tile_overlap=radius)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # as for the image (test_inference.py)
    # A map given to the wrong tiles would shift the regions: far more than rounding.
    shifted = restore(model, image, np.roll(zmap, 16, axis=1), tile=16, tile_overlap=radius)
    assert np.abs(shifted.astype(int) - tiled.astype(int)).max() > 5


def test_two_region_map_matches_each_vector_inside_its_region() -> None:
    model, image = _strong(), _image(24, 200, seed=3)
    zmap = np.zeros((24, 200, 2), dtype=np.uint8)
    zmap[:, :100], zmap[:, 100:] = (30, 200), (220, 10)
    margin = receptive_field_radius(model.config) + model.size_multiple
    out = restore(model, image, zmap)
    left = restore(model, image, torch.tensor([30, 200]) / 255.0)
    right = restore(model, image, torch.tensor([220, 10]) / 255.0)
    np.testing.assert_array_equal(out[:, : 100 - margin], left[:, : 100 - margin])
    np.testing.assert_array_equal(out[:, 100 + margin :], right[:, 100 + margin :])


def test_progress_is_called_after_each_tile() -> None:
    model, image = _strong(), _image(40, 40)
    calls: list[tuple[int, int]] = []
    restore(model, image, [0.3, 0.3], tile=16, tile_overlap=8, progress=lambda *a: calls.append(a))
    assert calls == [(i, 9) for i in range(1, 10)]  # 3 x 3 tiles of 16 px over 40 px
    calls.clear()
    restore(model, image, [0.3, 0.3], progress=lambda *a: calls.append(a))
    assert calls == [(1, 1)]


@pytest.mark.parametrize(
    "zmap,match",
    [
        (np.zeros((8, 9, 2), np.uint8), r"H x W x 2 = 8 x 8 x 2"),
        (np.zeros((8, 8, 3), np.uint8), r"H x W x 2 = 8 x 8 x 2"),
        (np.zeros((8, 8, 2), np.int32), "uint8"),
        (np.full((8, 8, 2), 1.5, np.float32), r"\[0, 1\] \(got 1.5 .. 1.5\)"),
        (np.full((8, 8, 2), np.nan, np.float32), "finite"),
    ],
)
def test_bad_z_maps_are_one_line_errors(zmap: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        restore(_strong(), _image(8, 8), zmap)


def test_validate_z_map_layout_and_scale() -> None:
    zmap = np.zeros((2, 3, 2), dtype=np.uint8)
    zmap[1, 2] = (255, 51)
    t = validate_z_map(zmap, 2, 2, 3)
    assert t.shape == (1, 2, 2, 3) and t.dtype == torch.float32
    assert t[0, :, 1, 2].tolist() == [1.0, pytest.approx(0.2)]
    assert float(t[0, 1, 1, 2]) == np.float32(51) / np.float32(255)  # k / 255 in float32


def test_auto_tile_is_the_cli_default() -> None:
    from pipeline.cli import restore as restore_command

    # One owner: the CLI's --tile auto and the studio read the same policy.
    assert restore_command.AUTO_TILE_MAX_PIXELS is AUTO_TILE_MAX_PIXELS
    assert restore_command.auto_tile is auto_tile
    assert auto_tile(1080, 1920) is None
    assert auto_tile(1024, 2048) is None and auto_tile(1024, 2049) == AUTO_TILE_SIZE
