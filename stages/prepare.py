"""DVC stage ``prepare``: raw images of ``data.source`` -> validated 8-bit RGB PNGs.

Writes ``--out/{train,holdout}/<name>.png`` + ``--out/manifest.json`` and the report
``--report`` (every converted or skipped file with its reason). DIV2K downloads go to
``--downloads``, a cache that is not a DVC output (kept across runs, resumable).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, load_params
from pipeline.data.prepare import PrepareError, prepare_images
from pipeline.data.report import write_report
from pipeline.data.sources import SourceError, resolve_source
from pipeline.data.workers import resolve_workers
from pipeline.errors import os_error_line

log = logging.getLogger("stages.prepare")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--report", required=True, help="report JSON")
    ap.add_argument("--downloads", required=True, help="download cache directory")
    ap.add_argument("--workers", type=int, default=0, help="processes (0: one per core, max 8)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failure = None
    try:
        params = load_params(args.params)
        source = resolve_source(params.data, args.downloads)
        report = prepare_images(
            source,
            args.out,
            crop_size=params.extract.crop_size,
            holdout=params.data.holdout,
            holdout_seed=params.data.holdout_seed,
            max_pixels=params.data.max_pixels,
            workers=resolve_workers(args.workers),
        )
    except PrepareError as err:  # no image left: the report still says why, file by file
        failure, report = str(err), err.report
    except (ConfigError, SourceError) as err:
        log.error("%s", err)
        return 1
    except OSError as err:  # no space left, read-only or forbidden target: one line, the path
        log.error("%s", os_error_line(err))
        return 1
    try:
        if report is not None:
            write_report(args.report, report)
    except OSError as err:
        log.error("%s", os_error_line(err))
        return 1
    if failure is not None:
        log.error("%s", failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
