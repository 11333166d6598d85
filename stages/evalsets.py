"""DVC stage ``evalsets``: clean test images -> degraded PNGs at the paper's fixed settings."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, load_params
from pipeline.data.evalsets import EvalSetError, build_evalsets
from pipeline.data.prepare import PrepareError
from pipeline.data.report import write_report
from pipeline.errors import os_error_line

log = logging.getLogger("stages.evalsets")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", required=True, help="output of the prepare stage (holdout)")
    ap.add_argument("--out", required=True, help="evaluation set directory")
    ap.add_argument("--report", required=True, help="report JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        report = build_evalsets(params.evalsets, params.degradation, args.prepared, args.out)
        write_report(args.report, report)
    except (ConfigError, PrepareError, EvalSetError) as err:
        log.error("%s", err)
        return 1
    except OSError as err:  # no space left, read-only or forbidden target: one line, the path
        log.error("%s", os_error_line(err))
        return 1
    for name, counts in report.extra["sets"].items():
        log.info(
            "evalsets: %s: %d images, %d degraded files", name, counts["images"], counts["files"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
