"""The ``cugan`` entry point: one parser over the command modules, logging, and the rule that
every user error ends in ONE line ``cugan: error: <reason>`` with exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from pipeline.checkpoint import CheckpointError
from pipeline.cli import configs, degrade, export, official, registry, restore, tracking
from pipeline.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, Parser, UsageError
from pipeline.config import ConfigError
from pipeline.errors import one_line, os_error_line
from pipeline.imageio import ImageError
from pipeline.inference import InferenceError
from pipeline.studio import command as studio

__all__ = ["COMMANDS", "build_parser", "main"]

#: The command modules, in the order ``cugan --help`` lists them; each has ``add_parser``.
COMMANDS = (restore, degrade, export, official, configs, studio, registry, tracking)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    parser = Parser(
        prog=PROG,
        description="CUGAN: controllable restoration of blurred and noisy photos.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub, [common])
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cugan-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


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
    except UsageError as err:
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
