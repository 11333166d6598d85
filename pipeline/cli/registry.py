"""``cugan registry rollback NAME``: put the previous champion back.

A promotion (pipeline/promotion.py) moves the ``champion`` alias (``retrain.alias``) to the new
version and gives the one it replaced ``previous``; this moves the champion back to that version
and says what it did. One line and exit status 2 where there is nothing to roll back to.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import EXIT_OK
from pipeline.cli.tracking import add_store_args, store_params, store_uri

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "registry",
        parents=parents,
        help="MLflow model registry: roll the champion back",
        description="The MLflow model registry of the training stages (cunet, cugan).",
    )
    commands = p.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    rollback = commands.add_parser(
        "rollback",
        parents=parents,
        help="move the champion alias back to the previous champion",
        description=(
            "Move the champion alias (retrain.alias) of registered model NAME back to the "
            "version holding 'previous' (the champion the last promotion replaced), and clear "
            "'previous'."
        ),
    )
    rollback.add_argument("name", metavar="NAME", help="registered model (cunet, cugan)")
    add_store_args(rollback)
    rollback.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.promotion import PromotionError, rollback
    from pipeline.tracking import ModelRegistry, RegistryError

    params = store_params(args)
    registry = ModelRegistry(store_uri(args, params))
    try:
        done = rollback(registry, args.name, alias=params.retrain.alias)
    except (PromotionError, RegistryError) as err:
        raise ValueError(str(err)) from None  # main turns ValueError into the one error line
    sys.stdout.write(done.summary() + "\n")
    return EXIT_OK
