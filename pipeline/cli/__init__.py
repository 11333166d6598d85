"""``cugan``: the command-line interface (restore, degrade, import-official, configs).

Every user error ends in ONE line ``cugan: error: <reason>`` on stderr and exit status 2, never a
traceback: argparse's usage errors are reshaped into that line, and the project's own exception
types (ImageError, CheckpointError, ConfigError, ValueError from validation, OSError from the
file system) are caught by name. Anything else is a bug and keeps its traceback.

Conversions done while reading an image (grayscale -> RGB, dropped opaque alpha, EXIF rotation,
...) are reported as one-line notes on stderr. Results (the ``configs`` table) go to stdout;
progress and notes go to stderr through ``logging`` (INFO by default, ``-v`` for DEBUG,
``-q`` for warnings only).

Run as ``cugan ...`` (the console script) or ``python -m pipeline.cli ...``. One module per
command (``restore``, ``degrade``, ``official``, ``configs``), the shared argument handling in
:mod:`pipeline.cli.common`, the entry point in :mod:`pipeline.cli.main`.
"""

from pipeline.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
