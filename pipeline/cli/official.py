"""``cugan import-official``: the authors' released .pth, converted once into our format."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli.common import EXIT_OK

__all__ = ["add_parser", "run"]

log = logging.getLogger("cugan")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import-official",
        parents=parents,
        help="convert the authors' released .pth into our checkpoint format",
        description="Convert the authors' CUGAN generator .pth (loaded with weights_only=True) "
        "into OUT_DIR/generator.safetensors + generator.json.",
    )
    p.add_argument("pth", metavar="PTH", type=Path, help="the authors' .pth file")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="checkpoint directory to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.official import import_official

    if not args.pth.is_file():
        what = "is a directory" if args.pth.is_dir() else "no such file"
        raise ValueError(f"{args.pth}: {what}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"{args.out_dir}: exists and is not a directory")
    if not args.out_dir.parent.is_dir():
        raise ValueError(
            f"{args.out_dir}: parent directory {str(args.out_dir.parent)!r} does not exist"
        )
    path = import_official(args.pth, args.out_dir)
    log.info("wrote %s", path)
    return EXIT_OK
