"""``cugan``: the command-line interface (restore, degrade, import-official, configs).

Every user error ends in ONE line ``cugan: error: <reason>`` on stderr and exit status 2, never a
traceback: argparse's usage errors are reshaped into that line, and the project's own exception
types (ImageError, CheckpointError, ConfigError, ValueError from validation, OSError from the
file system) are caught by name. Anything else is a bug and keeps its traceback.

Conversions done while reading an image (grayscale -> RGB, dropped opaque alpha, EXIF rotation,
...) are reported as one-line notes on stderr. Results (the ``configs`` table) go to stdout;
progress and notes go to stderr through ``logging`` (INFO by default, ``-v`` for DEBUG,
``-q`` for warnings only).

Run as ``cugan ...`` (the console script) or ``python -m pipeline.cli ...``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError
from pipeline.condition import DEFAULT_SCALE, ConditionScale
from pipeline.config import ConfigError
from pipeline.degradation import KERNEL_SIZE, degrade, to_tensor, to_uint8
from pipeline.device import resolve_device
from pipeline.errors import one_line, os_error_line
from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageError, LoadedImage, read_rgb8, write_png
from pipeline.inference import (
    InferenceError,
    ModelArgumentNames,
    load_model_for_inference,
    receptive_field_radius,
    restore,
)

__all__ = ["build_parser", "main"]

PROG = "cugan"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

#: ``--tile auto`` runs images up to this many pixels in one piece (a 1920x1080 frame is 2.07 MP;
#: the authors' model keeps ~1 GB of float32 activations per megapixel) and tiles larger ones.
AUTO_TILE_MAX_PIXELS = 1 << 21
AUTO_TILE_SIZE = 512

log = logging.getLogger("cugan")

#: The restore command's model flags, as the inference layer's messages name them.
MODEL_FLAGS = ModelArgumentNames(
    model="--model", mse_model="--mse-model", gan_model="--gan-model", alpha="--alpha"
)
LEVEL_FLAGS = ("--blur", "--noise")


class _UsageError(Exception):
    """Raised by the parser instead of printing usage and exiting (see :class:`_Parser`)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error becomes one line handled by :func:`main`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------
# argument types


def _tile_arg(text: str) -> int | str:
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


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def _cond_arg(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.6, got {text!r}"
        ) from None
    return values


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    parser = _Parser(
        prog=PROG,
        description="CUGAN: controllable restoration of blurred and noisy photos.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # restore -------------------------------------------------------------------------------
    # Help texts state the method's scale; the conversion uses the checkpoint's own.
    b_max, n_max = f"{DEFAULT_SCALE.blur_max:g}", f"{DEFAULT_SCALE.noise_max:g}"
    p = sub.add_parser(
        "restore",
        parents=[common],
        help="restore an image with a trained generator",
        description=(
            "Restore IN (blurred and/or noisy) into OUT (PNG). The condition is the degradation "
            "to remove: --blur R (Gaussian std in pixels) and --noise S (std on the 0..255 "
            "scale), or the condition vector itself, --cond Z1,Z2 with entries in [0, 1]. "
            "Levels become z with the scale the checkpoint records: at the method's scale "
            f"{DEFAULT_SCALE.describe()}, so R in [0, {b_max}] and S in [0, {n_max}]. Give "
            "--model, or --alpha with --mse-model and --gan-model for the MSE<->GAN blend "
            "(alpha 1 = MSE model, 0 = GAN model)."
        ),
    )
    _add_io(p)
    cond = p.add_argument_group("condition (either --blur and --noise, or --cond)")
    cond.add_argument(
        "--blur",
        type=float,
        metavar="R",
        help=f"blur std in pixels (0..{b_max} at the method's scale)",
    )
    cond.add_argument(
        "--noise",
        type=float,
        metavar="S",
        help=f"noise std, 0..255 scale (0..{n_max} at the method's scale)",
    )
    cond.add_argument(
        "--cond",
        type=_cond_arg,
        metavar="Z1,Z2",
        help="condition vector z, entries in [0, 1]",
    )
    model = p.add_argument_group(
        "model (either --model, or --alpha with --mse-model and --gan-model)"
    )
    model.add_argument(
        "--model",
        metavar="PATH",
        help="checkpoint directory or .safetensors (from training or import-official)",
    )
    model.add_argument(
        "--alpha", type=float, metavar="A", help="DNI blend: (1 - A) * GAN + A * MSE, A in [0, 1]"
    )
    model.add_argument("--mse-model", metavar="PATH", help="MSE (CUnet) checkpoint for --alpha")
    model.add_argument("--gan-model", metavar="PATH", help="GAN (CUGAN) checkpoint for --alpha")
    run = p.add_argument_group("execution")
    run.add_argument(
        "--tile",
        type=_tile_arg,
        default="auto",
        metavar="N",
        help=f"tile size in pixels; 0 = whole image; auto (default) = whole image up "
        f"to {AUTO_TILE_MAX_PIXELS / 1e6:.1f} MP, else {AUTO_TILE_SIZE}",
    )
    run.add_argument(
        "--tile-overlap",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="context margin around each tile (default: the model's receptive "
        "field, which makes tiled output equal untiled output)",
    )
    run.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to run (default: auto = cuda when available)",
    )
    p.set_defaults(func=_cmd_restore)

    # degrade -------------------------------------------------------------------------------
    p = sub.add_parser(
        "degrade",
        parents=[common],
        help="apply the reference degradation (blur -> noise -> 8 bits)",
        description=(
            f"Blur IN with a {KERNEL_SIZE}x{KERNEL_SIZE} Gaussian of std R (replicate border), add "
            "Gaussian noise of std S/255, clip and round to 8 bits, as the training and "
            "evaluation data are made. Same seed, same output."
        ),
    )
    _add_io(p)
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
        "--seed", type=_non_negative_int, default=0, metavar="N", help="noise seed (default 0)"
    )
    p.set_defaults(func=_cmd_degrade)

    # import-official -----------------------------------------------------------------------
    p = sub.add_parser(
        "import-official",
        parents=[common],
        help="convert the authors' released .pth into our checkpoint format",
        description="Convert the authors' CUGAN generator .pth (loaded with weights_only=True) "
        "into OUT_DIR/generator.safetensors + generator.json.",
    )
    p.add_argument("pth", metavar="PTH", type=Path, help="the authors' .pth file")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="checkpoint directory to write")
    p.set_defaults(func=_cmd_import_official)

    # configs -------------------------------------------------------------------------------
    p = sub.add_parser(
        "configs",
        parents=[common],
        help="list the named network configs and their parameter counts",
    )
    p.set_defaults(func=_cmd_configs)
    return parser


def _add_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", type=Path, help="input image (PNG, JPEG, ...; 8-bit)")
    p.add_argument("output", metavar="OUT", type=Path, help="output PNG (written atomically)")
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cugan-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


# ---------------------------------------------------------------------------------------------
# shared checks


def _condition(args: argparse.Namespace) -> list[float] | tuple[float, float]:
    """Which form of condition was given, checked as far as it can be without a model.

    Returns the ``--cond`` values (checked to lie in [0, 1]), or the ``(blur, noise)`` levels,
    which :func:`_z_for` converts with the scale of the model once it is loaded.
    """
    levels_given = args.blur is not None or args.noise is not None
    if args.cond is not None and levels_given:
        raise ValueError("give either --cond or --blur/--noise, not both")
    if args.cond is not None:
        values = args.cond
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise ValueError(
                f"--cond entries must lie in [0, 1] (got {','.join(f'{v:g}' for v in values)})"
            )
        return values
    if args.blur is None or args.noise is None:
        missing = (
            "--noise" if args.blur is not None else "--blur" if args.noise is not None else None
        )
        if missing:
            raise ValueError(f"{missing} is missing: give both --blur and --noise (or --cond)")
        raise ValueError("no condition given: --blur R --noise S, or --cond Z1,Z2")
    return args.blur, args.noise


def _z_for(condition: list[float] | tuple[float, float], scale: ConditionScale) -> torch.Tensor:
    """z ``[cond_dim]``: ``--cond`` as given, or the levels converted with the model's scale."""
    if isinstance(condition, list):
        return torch.tensor(condition, dtype=torch.float32)
    blur, noise = scale.check_levels(*condition, names=LEVEL_FLAGS)
    return scale.to_z(blur, noise)[0]


def _check_output(path: Path) -> None:
    """Fail before any work if OUT cannot be written where asked."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: output must be a .png file")
    if path.is_dir():
        raise ValueError(f"{path}: output is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: output directory {str(parent)!r} does not exist")


def _read(args: argparse.Namespace) -> LoadedImage:
    loaded = read_rgb8(
        args.input,
        max_pixels=args.max_pixels,
        allow_high_bit_depth=args.allow_high_bit_depth,
        allow_transparency=args.allow_transparency,
    )
    for note in loaded.notes:
        log.warning("note: %s: %s", args.input, note)
    return loaded


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_restore(args: argparse.Namespace) -> int:
    condition = _condition(args)
    _check_output(args.output)
    device = resolve_device(args.device)
    loaded = load_model_for_inference(
        args.model,
        mse_model=args.mse_model,
        gan_model=args.gan_model,
        alpha=args.alpha,
        names=MODEL_FLAGS,
    )
    model, cfg = loaded.model, loaded.config
    z = _z_for(condition, loaded.scale)
    image = _read(args).array
    h, w = image.shape[:2]
    if not cfg.conditional:
        log.warning("note: the model is unconditional (a Unet baseline): the condition is ignored")
        z_arg = None
    elif z.numel() != cfg.cond_dim:
        raise ValueError(f"--cond has {z.numel()} values but the model takes {cfg.cond_dim}")
    else:
        z_arg = z

    tile = args.tile
    if tile == "auto":
        tile = AUTO_TILE_SIZE if h * w > AUTO_TILE_MAX_PIXELS else 0
    overlap = args.tile_overlap if args.tile_overlap is not None else receptive_field_radius(cfg)
    if tile:
        log.info("tiling: %d px tiles, %d px overlap", tile, overlap)

    start = time.perf_counter()
    result = restore(model, image, z_arg, tile=tile or None, tile_overlap=overlap, device=device)
    write_png(args.output, result)
    z_text = ",".join(f"{v:.4g}" for v in z.tolist())
    log.info(
        "wrote %s (%dx%d, z=[%s], model %s, %s) in %.2f s",
        args.output,
        w,
        h,
        z_text,
        loaded.source,
        device,
        time.perf_counter() - start,
    )
    return EXIT_OK


def _cmd_degrade(args: argparse.Namespace) -> int:
    # The degradation itself has no z; its levels are limited to the method's range.
    blur, noise = DEFAULT_SCALE.check_levels(args.blur, args.noise, names=LEVEL_FLAGS)
    _check_output(args.output)
    image = _read(args).array
    generator = torch.Generator().manual_seed(args.seed)
    out = degrade(to_tensor(image), blur, noise, generator=generator)
    write_png(args.output, to_uint8(out))
    log.info("wrote %s (blur %g, noise %g, seed %d)", args.output, blur, noise, args.seed)
    return EXIT_OK


def _cmd_import_official(args: argparse.Namespace) -> int:
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


def _cmd_configs(args: argparse.Namespace) -> int:
    from models.registry import describe_configs

    rows = describe_configs()
    header = ("kind", "name", "parameters", "summary")
    table = [header] + [(r["kind"], r["name"], f"{r['parameters']:,}", r["summary"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"
        for row in table
    ]
    authors = next((r for r in rows if r["kind"] == "generator" and r["name"] == "authors"), None)
    if authors is not None:
        lines.append("")
        lines.append(
            "Note: the paper states 1.370M parameters for CUnet; the authors' released config "
            f"('authors') has {authors['parameters'] / 1e6:.3f}M (see models/registry.py)."
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# entry point


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it between tests)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))


#: Loggers of this project; ``-v`` turns these to DEBUG, not third-party ones (Pillow's chunk
#: dumps would drown everything).
_OWN_LOGGERS = ("cugan", "pipeline", "models", "stages", "flows")


def _setup_logging(verbose: bool, quiet: bool) -> dict[str, int]:
    """Route logging to stderr for this run; returns the levels to put back afterwards."""
    root = logging.getLogger()
    saved = {"": root.level, **{name: logging.getLogger(name).level for name in _OWN_LOGGERS}}
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    return saved


def _restore_logging(saved: dict[str, int]) -> None:
    """Undo :func:`_setup_logging`, so that calling ``main`` in-process leaves no trace."""
    logging.getLogger().removeHandler(_HANDLER)
    for name, level in saved.items():
        logging.getLogger(name or None).setLevel(level)


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {one_line(message, limit=None)}\n")
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        return _fail(str(err))
    except SystemExit as stop:  # --help and --version print and exit 0
        return stop.code if isinstance(stop.code, int) else EXIT_OK
    saved_levels = _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except (ImageError, CheckpointError, ConfigError, InferenceError) as err:
        return _fail(str(err))
    except ValueError as err:  # validation of arguments (z, levels, devices, configs)
        return _fail(str(err))
    except OSError as err:
        return _fail(os_error_line(err))
    except torch.OutOfMemoryError:
        return _fail("out of memory: try a smaller --tile (e.g. --tile 256) or --device cpu")
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        _restore_logging(saved_levels)


if __name__ == "__main__":
    sys.exit(main())
