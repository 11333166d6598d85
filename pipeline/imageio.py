"""Reading and writing 8-bit RGB images, refusing what cannot be read safely.

Every image that enters the pipeline (the CLI, the data prepare stage) goes through
:func:`read_rgb8`. The networks and the degradation model work on 8-bit sRGB, so an input is
either converted to that without loss of meaning (grayscale, palette, an alpha channel that is
fully opaque, EXIF rotation, CMYK with a warning), each conversion recorded as a one-line note,
or refused with an :class:`ImageError` whose one-line message says why (not an image,
truncated, 16-bit, transparent, too large, unreadable).

Pillow does the decoding. Two things it does silently are checked here instead:

* A 16-bit-per-channel RGB(A) PNG opens as mode ``RGB``/``RGBA`` with the low byte *dropped*
  (truncation, not rounding). The bit depth is read from the PNG header so that such a file is
  refused, or, with ``allow_high_bit_depth``, decoded at full depth by torchvision and rounded
  to 8 bits like MATLAB ``im2uint8``.
* Truncated files: Pillow refuses them only while ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False
  (its default). This module never changes that flag; code that sets it globally defeats the
  check.

The decompression-bomb guard compares ``width * height`` from the header with ``max_pixels``
*before* any pixel is decoded.

Condition maps (``cugan restore --cond-map``, the studio's download) are files too, so they
are owned here: :func:`read_cond_map` reads one through the same checks (a regular file of a
sane size, the header's size against ``max_pixels`` before decoding, truncation, bit depth)
and :func:`write_cond_map` writes one atomically. The format (:data:`COND_MAP_FORMAT`): an
8-bit grey + alpha PNG of the image's size, grey = z_blur and alpha = z_noise, each
``k / 255`` for k in 0..255.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from pipeline.atomic import atomic_write_bytes
from pipeline.errors import one_line, os_error_reason

__all__ = [
    "COND_MAP_FORMAT",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "ImageError",
    "LoadedImage",
    "read_cond_map",
    "read_rgb8",
    "write_cond_map",
    "write_png",
]

log = logging.getLogger(__name__)

#: Decompression-bomb guard: 40 megapixels (a 7952x5304 camera frame is 42 MP; DIV2K images
#: are at most 2040x2040 = 4.2 MP). An RGB float32 copy of 40 MP is ~0.5 GB.
DEFAULT_MAX_PIXELS = 40_000_000

#: Formats Pillow may use. Restricting the list keeps exotic decoders (EPS runs Ghostscript,
#: for instance) away from user files.
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "GIF", "TGA")

#: The condition-map file format, in words (``cugan restore --help`` and the messages say it).
COND_MAP_FORMAT = (
    "an 8-bit grey + alpha PNG of the image's size: grey = z_blur, alpha = z_noise, "
    "each 0..255 -> 0..1 (k / 255)"
)

# Exceptions Pillow raises for malformed data (it uses SyntaxError for broken headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# EXIF orientation value -> the transpose that makes the image upright (EXIF 2.32, table 6;
# the same map as PIL.ImageOps.exif_transpose, which the tests check against).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_WORDS = {
    2: "mirrored",
    3: "rotated 180 degrees",
    4: "flipped vertically",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}


class ImageError(ValueError):
    """An image that cannot be used, with a one-line message naming the file and the reason."""


@dataclass(frozen=True)
class LoadedImage:
    """An 8-bit RGB image and what was done to it on the way in.

    ``notes`` holds one line per conversion (e.g. ``"grayscale converted to RGB"``), for the
    caller to report; an empty list means the file was already 8-bit RGB.
    """

    array: np.ndarray  # uint8, H x W x 3, C-contiguous
    notes: list[str] = field(default_factory=list)
    format: str | None = None  # Pillow's name of the file format, e.g. "PNG"
    mode: str | None = None  # Pillow's mode of the file as opened, e.g. "L", "RGBA"


# ---------------------------------------------------------------------------------------------
# reading


def read_rgb8(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_high_bit_depth: bool = False,
    allow_transparency: bool = False,
) -> LoadedImage:
    """Read an image file as 8-bit RGB, or raise :class:`ImageError` saying why not.

    ``allow_high_bit_depth``: round 16-bit (and [0, 1] float) images to 8 bits instead of
    refusing them. ``allow_transparency``: drop an alpha channel that is not fully opaque,
    keeping the stored colours, instead of refusing (compositing would need a background
    colour, and no choice of one is safe for restoration).
    """
    path = Path(path)
    data = _read_bytes(path, max_pixels)
    return _decode(path, data, max_pixels, allow_high_bit_depth, allow_transparency)


def _read_bytes(path: Path, max_pixels: int) -> bytes:
    """The bytes of a regular, non-empty file of a size an image within ``max_pixels`` can
    have, or ImageError."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive (got {max_pixels})")
    size = _check_regular_file(path)
    # Even uncompressed 16-bit RGBA needs 8 bytes a pixel: a larger file is not a sane image.
    if size > 8 * max_pixels + (64 << 20):
        raise ImageError(
            f"{path}: too large: {size / 2**20:.0f} MiB file for a limit of "
            f"{max_pixels / 1e6:g} megapixels (max_pixels)"
        )
    try:
        with open(path, "rb") as fp:
            data = fp.read()
    except OSError as err:
        raise ImageError(f"{path}: cannot read: {os_error_reason(err)}") from None
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)")
    return data


def _check_regular_file(path: Path) -> int:
    """Size in bytes of a regular file, or ImageError (missing, directory, device, ...)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as err:
        raise ImageError(f"{path}: cannot read: {os_error_reason(err)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file")
    return st.st_size


@contextlib.contextmanager
def _bomb_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's own guard (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that)
    fires inside Image.open; the warning is an error too when our limit is stricter anyway,
    so that no Python warning leaks onto the user's terminal."""
    with warnings.catch_warnings():
        action = "error" if max_pixels <= (Image.MAX_IMAGE_PIXELS or 0) else "ignore"
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        yield


def _open(path: Path, data: bytes, max_pixels: int) -> Image.Image:
    """Pillow's image of ``data`` with its header checked (format, size), nothing decoded yet;
    call inside :func:`_bomb_guard`."""
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(_unidentified_reason(path, data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: too large: {one_line(err)}") from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"{path}: corrupt image header: {one_line(err)}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{path}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{path}: too large: {width}x{height} = {width * height / 1e6:.1f} megapixels "
            f"exceeds the limit of {max_pixels / 1e6:g} megapixels (max_pixels)"
        )
    return img


def _load(path: Path, img: Image.Image) -> None:
    """The full decode: truncated or corrupt pixel data fails here (ImageError)."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: too large: {one_line(err)}") from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"{path}: truncated or corrupt image data: {one_line(err)}") from None


def _decode(
    path: Path, data: bytes, max_pixels: int, allow_high_bit_depth: bool, allow_transparency: bool
) -> LoadedImage:
    notes: list[str] = []
    with _bomb_guard(max_pixels):
        img = _open(path, data, max_pixels)
        fmt, mode = img.format, img.mode
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            notes.append(f"{fmt} file has {frames} frames; using the first")
        bits = _bits_per_sample(img, data)
        orientation = _exif_orientation(img, notes)
        icc_note = _icc_note(img)
        _load(path, img)

    if bits > 8 or img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = _high_bit_depth(path, img, data, bits, allow_high_bit_depth, notes)
    else:
        arr = _eight_bit(path, img, notes)
    arr = _drop_alpha(path, arr, allow_transparency, notes)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
        notes.append("grayscale converted to RGB (channel replicated)")
    if icc_note:
        notes.append(icc_note)
    if orientation in _ORIENTATION_FIX:
        arr = np.asarray(Image.fromarray(arr, "RGB").transpose(_ORIENTATION_FIX[orientation]))
        notes.append(
            f"EXIF orientation applied: stored image was {_ORIENTATION_WORDS[orientation]}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return LoadedImage(array=arr, notes=notes, format=fmt, mode=mode)


# File signatures of the supported formats, to tell a damaged image from a non-image.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _unidentified_reason(path: Path, data: bytes) -> str:
    """Why Pillow could not open the file: a damaged image of a known format, or not an image."""
    fmt = next((name for sig, name in _SIGNATURES if data.startswith(sig)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WEBP"
    if fmt is None:
        return f"{path}: not an image (or not a supported format: {', '.join(SUPPORTED_FORMATS)})"
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0:
            return f"{path}: zero-size image ({width}x{height})"
    return f"{path}: corrupt {fmt} file (its header cannot be decoded)"


def _bits_per_sample(img: Image.Image, data: bytes) -> int:
    """Bits per sample of the file as stored (Pillow may already have reduced them)."""
    if img.format == "PNG" and len(data) >= 26 and data[12:16] == b"IHDR":
        return int(data[24])  # PNG IHDR: width(4) height(4) bit depth(1), after sig + length + type
    if img.format == "TIFF":
        per_sample = img.tag_v2.get(258)  # BitsPerSample
        if per_sample:
            values = per_sample if isinstance(per_sample, tuple) else (per_sample,)
            return int(max(values))
    if img.mode in ("I", "F"):
        return 32
    if img.mode.startswith("I;16"):
        return 16
    # Other decoders: a raw mode such as "RGB;16B" says the stored samples are 16-bit.
    for tile in img.tile:
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        for arg in args:
            if isinstance(arg, str) and (";16" in arg or ";32" in arg):
                return 16 if ";16" in arg else 32
    return 8


def _exif_orientation(img: Image.Image, notes: list[str]) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        notes.append("EXIF data unreadable; orientation (if any) not applied")
        return 1
    return value if isinstance(value, int) else 1


def _icc_note(img: Image.Image) -> str | None:
    """A note when an embedded colour profile is not sRGB: its pixel values are used as sRGB."""
    profile = img.info.get("icc_profile")
    if not profile:
        return None
    try:
        from PIL import ImageCms

        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile)))
    except (ImportError, OSError, ValueError, TypeError) as err:
        log.debug("cannot parse ICC profile: %s", err)
        return "embedded ICC profile (unreadable) ignored: pixel values are used as sRGB"
    desc = " ".join(desc.split())
    if "srgb" in desc.lower():
        return None
    return f"embedded ICC profile '{desc}' ignored: pixel values are used as sRGB"


def _eight_bit(path: Path, img: Image.Image, notes: list[str]) -> np.ndarray:
    """8-bit Pillow modes -> uint8 H x W x C with C in {1 gray, 2 gray+alpha, 3 RGB, 4 RGBA}."""
    mode = img.mode
    if mode == "1":
        img = img.convert("L")
        notes.append("1-bit (black and white) image converted to 8-bit")
    elif mode in ("P", "PA"):
        has_alpha = (
            mode == "PA"
            or "transparency" in img.info
            or (img.palette is not None and "A" in img.palette.mode)
        )
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette image converted to RGB")
    elif mode == "CMYK":
        img = img.convert("RGB")
        notes.append("CMYK converted to RGB without colour management: colours may shift")
    elif mode == "YCbCr":
        img = img.convert("RGB")
        notes.append("YCbCr converted to RGB")
    elif mode in ("RGBX", "RGBa", "La"):
        img = img.convert({"RGBX": "RGB", "RGBa": "RGBA", "La": "LA"}[mode])
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageError(f"{path}: unsupported colour mode {mode!r}; convert it to 8-bit RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _high_bit_depth(
    path: Path, img: Image.Image, data: bytes, bits: int, allow: bool, notes: list[str]
) -> np.ndarray:
    """16-bit or float samples: refuse, or round to 8 bits (MATLAB im2uint8) when allowed."""
    kind = "32-bit float" if img.mode == "F" else f"{bits}-bit"
    if not allow:
        raise ImageError(
            f"{path}: {kind} image ({img.format}, mode {img.mode}); the pipeline works on "
            "8-bit images: convert it to 8 bits first (or allow high bit depth to round it)"
        )
    if img.mode.startswith("I;16"):
        arr = _u16_to_u8(np.asarray(img).astype(np.uint32))[:, :, None]
    elif img.mode == "I":
        raw = np.asarray(img)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535")
        arr = _u16_to_u8(raw.astype(np.uint32))[:, :, None]
    elif img.mode == "F":
        raw = np.asarray(img, dtype=np.float64)
        if not np.isfinite(raw).all() or (raw.size and (raw.min() < 0 or raw.max() > 1)):
            raise ImageError(
                f"{path}: float image with values outside [0, 1]: no safe way to scale it to 8 bits"
            )
        arr = np.floor(raw * 255.0 + 0.5).astype(np.uint8)[:, :, None]
    elif img.format == "PNG":
        arr = _decode_png16(path, data)
    else:
        raise ImageError(
            f"{path}: {bits}-bit colour {img.format} files are not supported; "
            "save it as 8-bit or 16-bit PNG"
        )
    notes.append(f"{kind} image rounded to 8 bits")
    return arr


def _u16_to_u8(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) = round(v / 257), half up, in integers (MATLAB im2uint8)."""
    return ((values + 128) // 257).astype(np.uint8)


def _decode_png16(path: Path, data: bytes) -> np.ndarray:
    """Full-depth decode of a 16-bit colour PNG (Pillow would drop the low byte).

    torchvision (a runtime dependency, pinned) decodes 16-bit PNGs to uint16. Its image codecs
    are deprecated since 0.29 in favour of TorchCodec; the warning is silenced here because the
    pinned version works, and the pin is where a replacement would be decided.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_png

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*TorchVision are deprecated", category=DeprecationWarning
            )
            chw = decode_png(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED
            )
    except RuntimeError as err:
        raise ImageError(f"{path}: corrupt 16-bit PNG: {one_line(err)}") from None
    values = chw.permute(1, 2, 0).to(torch.int64).numpy()
    return _u16_to_u8(values.astype(np.uint32))


def _drop_alpha(
    path: Path, arr: np.ndarray, allow_transparency: bool, notes: list[str]
) -> np.ndarray:
    if arr.shape[2] not in (2, 4):
        return arr
    alpha = arr[:, :, -1]
    see_through = int(np.count_nonzero(alpha != 255))
    if see_through == 0:
        notes.append("fully opaque alpha channel dropped")
    elif allow_transparency:
        notes.append(
            f"alpha channel dropped although {100 * see_through / alpha.size:.1f}% of pixels are "
            "not opaque: their stored colours are used as they are"
        )
    else:
        raise ImageError(
            f"{path}: has transparency ({100 * see_through / alpha.size:.1f}% of pixels not "
            "opaque): no background colour is a safe choice; flatten it onto one yourself"
        )
    return arr[:, :, :-1]


# ---------------------------------------------------------------------------------------------
# writing


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write an 8-bit RGB array as PNG atomically: temporary name in the same directory, then
    ``os.replace``, so that a reader never sees a half-written file.

    Raises :class:`ImageError` for an array that is not uint8 H x W x 3 (nothing is written),
    and ``OSError`` (e.g. ``FileNotFoundError`` for a missing directory) from the file system.
    """
    path = Path(path)
    if not isinstance(array, np.ndarray):
        raise ImageError(f"{path}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ImageError(f"{path}: expected dtype uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{path}: expected an H x W x 3 array, got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), "RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# condition maps


def read_cond_map(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a condition map (:data:`COND_MAP_FORMAT`) as uint8 H x W x 2 (z_blur, z_noise as
    ``k``; :func:`pipeline.inference.validate_z_map` takes it as ``k / 255``), or raise
    :class:`ImageError` saying why not, after the checks of :func:`read_rgb8`.

    Nothing is converted: a map is data, not a picture, so another mode (RGB, grey without
    alpha, a palette), another bit depth or another format is refused rather than guessed at.
    EXIF orientation is not applied: the map's pixels are the restored image's pixels.
    """
    path = Path(path)
    data = _read_bytes(path, max_pixels)
    with _bomb_guard(max_pixels):
        img = _open(path, data, max_pixels)
        bits = _bits_per_sample(img, data)
        if img.format != "PNG" or img.mode != "LA" or bits != 8:
            got = f"{img.format} {bits}-bit, mode {img.mode}"
            raise ImageError(f"{path}: a condition map is {COND_MAP_FORMAT} (got {got})")
        _load(path, img)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def write_cond_map(path: str | os.PathLike[str], zmap: np.ndarray) -> Path:
    """Write a uint8 H x W x 2 z map (z_blur, z_noise as ``k``) as a condition-map PNG
    (:data:`COND_MAP_FORMAT`), atomically as :func:`write_png` does. ImageError (nothing
    written) for an array of another kind."""
    path = Path(path)
    if (
        not isinstance(zmap, np.ndarray)
        or zmap.dtype != np.uint8
        or zmap.ndim != 3
        or zmap.shape[2] != 2
        or 0 in zmap.shape
    ):
        got = f"{zmap.dtype} {zmap.shape}" if isinstance(zmap, np.ndarray) else type(zmap).__name__
        raise ImageError(f"{path}: a condition map is a uint8 H x W x 2 array (got {got})")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(zmap), "LA").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
