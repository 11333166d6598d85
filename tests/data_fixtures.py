"""Tiny image files for the data-stage tests (tests/test_data_*.py), including broken ones."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def textured(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth gradient plus noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 255 // max(h - 1, 1) + xx * 97 // max(w - 1, 1) + 40 * seed) % 256
    img = base[..., None] + rng.integers(-20, 21, (h, w, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **kw)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(path: Path, array16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written by hand."""
    h, w, _ = array16.shape
    raw = b"".join(b"\0" + array16[y].astype(">u2").tobytes() for y in range(h))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def image_folder(root: Path, n: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    """``n`` good RGB PNGs (different sizes) in ``root`` (one in a subdirectory)."""
    for i in range(n):
        h, w = size[0] + 8 * i, size[1] + 4 * i
        sub = root / "sub" if i == n - 1 else root
        save(sub / f"img.{i}.png", textured(h, w, seed=i))
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content), for byte-identity checks."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
