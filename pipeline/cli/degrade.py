"""``cugan degrade``: the reference degradation (blur -> noise -> 8 bits), as the data is made."""

from __future__ import annotations

import argparse
import logging

import torch

from pipeline.cli.common import EXIT_OK, add_io, check_output, non_negative_int, read_input
from pipeline.condition import DEFAULT_SCALE
from pipeline.degradation import KERNEL_SIZE, degrade, to_tensor, to_uint8
from pipeline.imageio import write_png

__all__ = ["add_parser", "run"]

log = logging.getLogger("cugan")

LEVEL_FLAGS = ("--blur", "--noise")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "degrade",
        parents=parents,
        help="apply the reference degradation (blur -> noise -> 8 bits)",
        description=(
            f"Blur IN with a {KERNEL_SIZE}x{KERNEL_SIZE} Gaussian of std R (replicate border), add "
            "Gaussian noise of std S/255, clip and round to 8 bits, as the training and "
            "evaluation data are made. Same seed, same output."
        ),
    )
    add_io(p)
    p.add_argument(
        "--blur",
        type=float,
        required=True,
        metavar="R",
        help=f"blur std in [0, {DEFAULT_SCALE.blur_max:g}]",
    )
    p.add_argument(
        "--noise",
        type=float,
        required=True,
        metavar="S",
        help=f"noise std in [0, {DEFAULT_SCALE.noise_max:g}]",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="N", help="noise seed (default 0)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The degradation itself has no z; its levels are limited to the method's range.
    blur, noise = DEFAULT_SCALE.check_levels(args.blur, args.noise, names=LEVEL_FLAGS)
    check_output(args.output)
    image = read_input(args).array
    generator = torch.Generator().manual_seed(args.seed)
    out = degrade(to_tensor(image), blur, noise, generator=generator)
    write_png(args.output, to_uint8(out))
    log.info("wrote %s (blur %g, noise %g, seed %d)", args.output, blur, noise, args.seed)
    return EXIT_OK
