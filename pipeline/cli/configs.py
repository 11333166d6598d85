"""``cugan configs``: the named network configs and their parameter counts."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import EXIT_OK

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "configs",
        parents=parents,
        help="list the named network configs and their parameter counts",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
