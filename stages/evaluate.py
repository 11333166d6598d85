"""DVC stage ``evaluate``: trained generators x degraded test sets -> metrics, plots, figures.

Writes ``<out>/metrics.json`` and ``<out>/paper.json`` (DVC metrics), ``<out>/plots/*.csv``
(DVC plots) and ``<out>/figures/*.png``, prints the tables and logs everything to MLflow on each
model's training run: :func:`pipeline.evaluation.run.run_evaluation`, the same steps the Prefect
flow ``cugan-evaluate`` runs as tasks. Each model is driven with the z scale its checkpoint
records; the degraded input (and ``evaluate.references``) are scored beside the models.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_params
from pipeline.device import DeviceError
from pipeline.errors import one_line, os_error_line
from pipeline.evaluation.run import run_evaluation
from pipeline.evaluation.specs import parse_model_spec
from pipeline.evaluation.terms import EvalError
from pipeline.imageio import ImageError
from pipeline.tracking import TRACKING_ERRORS

log = logging.getLogger("stages.evaluate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME:KIND:PATH",
        help="a generator checkpoint to evaluate, KIND mse or gan, PATH a directory or a "
        "registry URI models:/NAME/VERSION or models:/NAME@ALIAS (repeatable)",
    )
    ap.add_argument("--evalsets", required=True, help="output of the evalsets stage")
    ap.add_argument("--out", required=True, help="directory for metrics, plots and figures")
    ap.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else tracking.uri)",
    )
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("--no-figures", action="store_true", help="skip the modulation figures")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        specs = [parse_model_spec(s) for s in args.model]
        run_evaluation(
            specs,
            args.evalsets,
            args.out,
            params,
            tracking_uri=args.tracking_uri,
            figures=not args.no_figures,
            log_mlflow=not args.no_mlflow,
        )
    except (ConfigError, EvalError, CheckpointError, DeviceError, ImageError) as err:
        log.error("%s", one_line(err))
        return 1
    except OSError as err:
        log.error("%s", os_error_line(err))
        return 1
    except TRACKING_ERRORS as err:
        log.error("MLflow: %s", one_line(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
