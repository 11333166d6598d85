"""``cugan tracking sync RUN_DIR...``: replay what training stages logged to local files while
their MLflow server was down (``RUN_DIR/mlflow-fallback``) into the server, once it is back.

Idempotent: a second sync of the same directory adds nothing (pipeline/tracking/sync.py). Give
the stage outputs in pipeline order (``runs/train_cunet runs/train_cugan``) so that a later
stage joins the parent run of the earlier one. Also the store options the MLflow commands
share (``--tracking-uri``, ``--params``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.common import EXIT_OK
from pipeline.config import Params, load_params

__all__ = ["add_parser", "add_store_args", "run", "store_params", "store_uri"]

DEFAULT_PARAMS = Path("params.yaml")


def add_store_args(
    p: argparse.ArgumentParser,
    uri_help: str = "MLflow store (default: $MLFLOW_TRACKING_URI, else tracking.uri of --params)",
) -> None:
    """``--tracking-uri`` and ``--params`` (the file the tracking settings come from)."""
    p.add_argument("--tracking-uri", metavar="URI", default=None, help=uri_help)
    p.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS,
        metavar="PATH",
        help="params.yaml to take the tracking settings from (default ./params.yaml, if any)",
    )


def store_params(args: argparse.Namespace) -> Params:
    """``--params`` validated; the defaults where the default file is absent."""
    if args.params == DEFAULT_PARAMS and not args.params.is_file():
        return Params()
    return load_params(args.params)


def store_uri(args: argparse.Namespace, params: Params) -> str:
    from pipeline.tracking import resolve_tracking_uri

    return args.tracking_uri or resolve_tracking_uri(params.tracking)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tracking",
        parents=parents,
        help="MLflow tracking: replay local fallbacks into the server (sync)",
        description="MLflow tracking of the training stages.",
    )
    commands = p.add_subparsers(dest="tracking_command", metavar="COMMAND", required=True)
    sync = commands.add_parser(
        "sync",
        parents=parents,
        help="replay RUN_DIR/mlflow-fallback into MLflow (idempotent)",
        description=(
            "Replay what a training stage logged to local files while MLflow was unreachable "
            "(params, tags, metric history, artifacts, the model and its registration) into "
            "the server, once it is back. A second sync adds nothing. RUN_DIR is a stage's "
            "output directory (runs/train_cunet) or its mlflow-fallback directory."
        ),
    )
    sync.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    add_store_args(sync, "MLflow store to replay into (default: the one the stage meant to use)")
    sync.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.tracking.store import quiet_client_chatter
    from pipeline.tracking.sync import sync_run
    from pipeline.train.pyfunc import log_saved_model

    # MLflow's own chatter (a link per run it ends, a progress bar per download) would bury
    # the one summary line per RUN_DIR this command prints.
    quiet_client_chatter()
    params = store_params(args)
    for run_dir in args.run_dirs:
        report = sync_run(
            run_dir, args.tracking_uri, params=params.tracking, log_model=log_saved_model
        )
        sys.stdout.write(report.summary() + "\n")
    return EXIT_OK
