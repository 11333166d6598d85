"""DVC stage ``extract``: prepared training images -> overlapping sub-images (one tar + index)."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, load_params
from pipeline.data.extract import ExtractError, extract_subimages
from pipeline.data.prepare import PrepareError
from pipeline.data.report import write_report
from pipeline.data.workers import resolve_workers
from pipeline.errors import os_error_line

log = logging.getLogger("stages.extract")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", required=True, help="output of the prepare stage")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--report", required=True, help="report JSON")
    ap.add_argument("--workers", type=int, default=0, help="processes (0: one per core, max 8)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        report = extract_subimages(
            args.prepared, args.out, params.extract, workers=resolve_workers(args.workers)
        )
        write_report(args.report, report)
    except (ConfigError, PrepareError, ExtractError) as err:
        log.error("%s", err)
        return 1
    except OSError as err:  # no space left, read-only or forbidden target: one line, the path
        log.error("%s", os_error_line(err))
        return 1
    log.info(
        "extract: %d sub-images of %d images",
        report.extra["num_subimages"],
        report.extra["num_images"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
