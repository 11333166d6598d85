"""What every ``cugan`` command shares: the parser that turns usage errors into one line,
argument types, the image in/out arguments, output checks and the input reader."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.imageio import DEFAULT_MAX_PIXELS, LoadedImage, read_rgb8

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "PROG",
    "Parser",
    "UsageError",
    "add_io",
    "check_output",
    "cond_arg",
    "non_negative_int",
    "positive_int",
    "read_input",
    "tile_arg",
]

PROG = "cugan"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("cugan")


class UsageError(Exception):
    """Raised by the parser instead of printing usage and exiting (see :class:`Parser`)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error becomes one line handled by :func:`pipeline.cli.main`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------
# argument types


def tile_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a pixel count, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no tiling), got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def cond_arg(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.6, got {text!r}"
        ) from None
    return values


# ---------------------------------------------------------------------------------------------
# image in, image out


def add_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", type=Path, help="input image (PNG, JPEG, ...; 8-bit)")
    p.add_argument("output", metavar="OUT", type=Path, help="output PNG (written atomically)")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse larger images (default {DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--allow-high-bit-depth",
        action="store_true",
        help="round 16-bit images to 8 bits instead of refusing them",
    )
    p.add_argument(
        "--allow-transparency",
        action="store_true",
        help="drop a non-opaque alpha channel instead of refusing the image",
    )


def check_output(path: Path) -> None:
    """Fail before any work if OUT cannot be written where asked."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: output must be a .png file")
    if path.is_dir():
        raise ValueError(f"{path}: output is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: output directory {str(parent)!r} does not exist")


def read_input(args: argparse.Namespace) -> LoadedImage:
    loaded = read_rgb8(
        args.input,
        max_pixels=args.max_pixels,
        allow_high_bit_depth=args.allow_high_bit_depth,
        allow_transparency=args.allow_transparency,
    )
    for note in loaded.notes:
        log.warning("note: %s: %s", args.input, note)
    return loaded
