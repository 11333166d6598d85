"""read_rgb8 / write_png: every odd or bad input is built here with Pillow, numpy or zlib."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, ImageOps

from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageError, read_rgb8, write_png


def _rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, image: Image.Image, fmt: str | None = None, **kw) -> Path:
    image.save(path, format=fmt, **kw)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(arr: np.ndarray) -> bytes:
    """A real 16-bit-per-sample PNG (Pillow cannot write 16-bit colour PNGs)."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _bit_depth(png: Path) -> int:
    data = png.read_bytes()
    assert data[12:16] == b"IHDR"
    return data[24]


def _refused(path: Path, *words: str, **kw) -> str:
    with pytest.raises(ImageError) as info:
        read_rgb8(path, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------------------------------------
# plain RGB and writing


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    arr = _rgb()
    out = write_png(tmp_path / "a.png", arr)
    loaded = read_rgb8(out)
    assert loaded.array.dtype == np.uint8 and loaded.array.flags.c_contiguous
    np.testing.assert_array_equal(loaded.array, arr)
    assert loaded.notes == [] and loaded.format == "PNG" and loaded.mode == "RGB"


def test_write_png_leaves_no_temporary_files_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_png(target, _rgb(seed=1))
    write_png(target, _rgb(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    np.testing.assert_array_equal(read_rgb8(target).array, _rgb(seed=2))


@pytest.mark.parametrize(
    "array, word",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4), np.uint8), "H x W x 3"),
        (np.zeros((4, 4, 4), np.uint8), "H x W x 3"),
        (np.zeros((0, 4, 3), np.uint8), "H x W x 3"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_write_png_validates_the_array(tmp_path: Path, array, word: str) -> None:
    with pytest.raises(ImageError, match=word):
        write_png(tmp_path / "bad.png", array)
    assert list(tmp_path.iterdir()) == []


def test_write_png_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_png(tmp_path / "nope" / "a.png", _rgb())
    assert list(tmp_path.iterdir()) == []


def test_truncated_images_stay_refused_by_pillow() -> None:
    # read_rgb8's truncation check relies on Pillow's default.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------------
# files that are not (whole) images


def test_text_with_png_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    _refused(path, "not an image")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _refused(path, "empty")


def test_png_cut_in_half(tmp_path: Path) -> None:
    data = tmp_path / "whole.png"
    write_png(data, _rgb(64, 64))
    raw = data.read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(raw[: len(raw) // 2])
    _refused(path, "truncated")


def test_jpeg_cut_short(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _refused(path, "truncated")


@pytest.mark.parametrize("width, height", [(0, 5), (5, 0)])
def test_zero_size_png(tmp_path: Path, width: int, height: int) -> None:
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(width, height))
    _refused(path, "zero-size")


@pytest.mark.parametrize("damage", ["cut in the header", "garbage after the signature"])
def test_damaged_header_is_not_called_a_non_image(tmp_path: Path, damage: str) -> None:
    raw = write_png(tmp_path / "a.png", _rgb()).read_bytes()
    path = tmp_path / "bad.png"
    if damage == "cut in the header":
        path.write_bytes(raw[:20])  # signature and half an IHDR chunk
    else:
        path.write_bytes(raw[:8] + b"garbage, not a PNG chunk" * 4)
    message = _refused(path, "corrupt")
    assert "not an image" not in message


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    _refused(tmp_path / "dir.png", "directory")


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "missing.png", "no such file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_png(tmp_path / "locked.png", _rgb())
    path.chmod(0)
    try:
        _refused(path, "ermission denied")
    finally:
        path.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# size guard (checked from the header, before decoding)


def test_over_max_pixels(tmp_path: Path) -> None:
    path = write_png(tmp_path / "a.png", _rgb(12, 10))
    _refused(path, "too large", "max_pixels", max_pixels=119)
    assert read_rgb8(path, max_pixels=120).array.shape == (12, 10, 3)


def test_size_is_checked_before_decoding(tmp_path: Path) -> None:
    # 8000 x 6000 = 48 MP claimed, a few bytes of data: refused as too large, not as truncated.
    path = tmp_path / "claims48mp.png"
    path.write_bytes(_png_header_only(8000, 6000))
    _refused(path, "too large", "48.0 megapixels")


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MP: Pillow's warning; 400 MP: its error
def test_pillow_decompression_bomb_guard_becomes_image_error(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning may leak out
        _refused(path, "too large")


def test_default_max_pixels_is_40_megapixels() -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000


# ---------------------------------------------------------------------------------------------
# bit depth


def test_16bit_grayscale_png(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 385], [65535, 65406, 65407, 32896]], np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(values))
    assert _bit_depth(path) == 16
    _refused(path, "16-bit")
    loaded = read_rgb8(path, allow_high_bit_depth=True)
    # round(v / 257), half up: 128 -> 0, 129 -> 1, 385 -> 1; 254.5 * 257 = 65406.5 separates 254/255
    expected = np.array([[0, 0, 1, 1], [255, 254, 255, 128]], np.uint8)
    np.testing.assert_array_equal(loaded.array, np.repeat(expected[:, :, None], 3, axis=2))
    assert any("16-bit" in n and "8 bits" in n for n in loaded.notes)
    assert any("grayscale" in n for n in loaded.notes)


def test_16bit_rgb_png_that_pillow_opens_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(values))
    assert _bit_depth(path) == 16
    assert Image.open(path).mode == "RGB"  # the trap: Pillow silently drops the low byte
    _refused(path, "16-bit")
    loaded = read_rgb8(path, allow_high_bit_depth=True)
    expected = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(loaded.array, expected)
    truncated = np.asarray(Image.open(path))
    assert not np.array_equal(truncated, expected)  # rounding, not Pillow's truncation


def test_16bit_rgba_png_opaque_alpha_is_dropped(tmp_path: Path) -> None:
    values = np.random.default_rng(4).integers(0, 65536, (5, 5, 4), dtype=np.uint16)
    values[..., 3] = 65535
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png16(values))
    loaded = read_rgb8(path, allow_high_bit_depth=True)
    np.testing.assert_array_equal(loaded.array, ((values[..., :3].astype(np.uint32) + 128) // 257))
    assert any("opaque alpha" in n for n in loaded.notes)


def test_float_tiff(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0], [0.25, 0.002, 0.998]], np.float32)
    path = _save(tmp_path / "f.tif", Image.fromarray(values, mode="F"), "TIFF")
    _refused(path, "float")
    loaded = read_rgb8(path, allow_high_bit_depth=True)
    expected = np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(loaded.array[..., 0], expected)


def test_float_tiff_outside_unit_range_is_refused_even_when_allowed(tmp_path: Path) -> None:
    values = np.array([[0.0, 2.0]], np.float32)
    path = _save(tmp_path / "f.tif", Image.fromarray(values, mode="F"), "TIFF")
    _refused(path, "outside [0, 1]", allow_high_bit_depth=True)


# ---------------------------------------------------------------------------------------------
# safe conversions, each with a note


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    gray = _rgb()[..., 0]
    path = _save(tmp_path / "g.png", Image.fromarray(gray, "L"))
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array, np.repeat(gray[:, :, None], 3, axis=2))
    assert loaded.notes == ["grayscale converted to RGB (channel replicated)"]


def test_bilevel_becomes_rgb(tmp_path: Path) -> None:
    bits = _rgb()[..., 0] > 127
    path = _save(tmp_path / "b.png", Image.fromarray(bits))
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array[..., 1], np.where(bits, 255, 0))
    assert len(loaded.notes) == 2


def test_grayscale_with_opaque_alpha(tmp_path: Path) -> None:
    la = np.stack([_rgb()[..., 0], np.full((12, 10), 255, np.uint8)], axis=2)
    path = _save(tmp_path / "la.png", Image.fromarray(la, "LA"))
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array[..., 2], la[..., 0])
    assert any("opaque alpha" in n for n in loaded.notes)
    assert any("grayscale" in n for n in loaded.notes)


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    rgb = _rgb(8, 8)
    pal = Image.fromarray(rgb).quantize(colors=16)
    path = _save(tmp_path / "p.png", pal)
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array, np.asarray(pal.convert("RGB")))
    assert loaded.notes == ["palette image converted to RGB"]


def test_palette_with_transparent_entry(tmp_path: Path) -> None:
    pal = Image.fromarray(_rgb(8, 8)).quantize(colors=4)
    path = _save(tmp_path / "pt.png", pal, transparency=0)
    _refused(path, "transparency")
    loaded = read_rgb8(path, allow_transparency=True)
    assert loaded.array.shape == (8, 8, 3)


def test_rgba_opaque_becomes_rgb(tmp_path: Path) -> None:
    rgb = _rgb()
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], axis=2)
    path = _save(tmp_path / "o.png", Image.fromarray(rgba, "RGBA"))
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array, rgb)
    assert loaded.notes == ["fully opaque alpha channel dropped"]


def test_rgba_with_transparency(tmp_path: Path) -> None:
    rgb = _rgb()
    alpha = np.full((12, 10, 1), 255, np.uint8)
    alpha[0, :3] = 0  # 3 of 120 pixels
    path = _save(tmp_path / "t.png", Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"))
    message = _refused(path, "transparency", "2.5%")
    assert "background" in message
    loaded = read_rgb8(path, allow_transparency=True)
    np.testing.assert_array_equal(loaded.array, rgb)  # stored colours kept
    assert any("not opaque" in n for n in loaded.notes)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.fromarray(
        np.random.default_rng(5).integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK"
    )
    path = _save(tmp_path / "c.jpg", cmyk, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array, np.asarray(Image.open(path).convert("RGB")))
    assert any("CMYK" in n and "colours may shift" in n for n in loaded.notes)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "o.jpg", Image.fromarray(_rgb(12, 20)), "JPEG", exif=exif, quality=95)
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(
        loaded.array, np.asarray(ImageOps.exif_transpose(Image.open(path)))
    )
    assert any("EXIF orientation" in n for n in loaded.notes) == (orientation != 1)
    assert loaded.array.shape[:2] == ((20, 12) if orientation >= 5 else (12, 20))


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(_rgb(8, 8, seed=s)).quantize(colors=8) for s in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    loaded = read_rgb8(path)
    np.testing.assert_array_equal(loaded.array, np.asarray(frames[0].convert("RGB")))
    assert any("3 frames" in n for n in loaded.notes)


def test_icc_profile_note_only_for_non_srgb(tmp_path: Path) -> None:
    image = Image.fromarray(_rgb())
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    other = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    a = _save(tmp_path / "srgb.png", image, icc_profile=srgb)
    b = _save(tmp_path / "other.png", image, icc_profile=other)
    assert read_rgb8(a).notes == []
    notes = read_rgb8(b).notes
    assert len(notes) == 1 and "ICC profile" in notes[0]
    np.testing.assert_array_equal(read_rgb8(b).array, np.asarray(image))


def test_unsupported_format_is_not_an_image(tmp_path: Path) -> None:
    # ICO is a format Pillow reads, but not one this pipeline accepts.
    path = _save(tmp_path / "x.ico", Image.fromarray(_rgb(16, 16)), "ICO")
    _refused(path, "not an image")


def test_permission_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too (where chmod 0 does not stop reading): the open() itself is made to fail.
    import pipeline.imageio as imageio_module

    path = write_png(tmp_path / "locked.png", _rgb())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(imageio_module, "open", refuse, raising=False)
    _refused(path, "cannot read", "Permission denied")
