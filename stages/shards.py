"""DVC stage ``shards``: sub-images -> shuffled WebDataset shards, DALI indexes, shards.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.atomic import atomic_write_json
from pipeline.config import ConfigError, load_params
from pipeline.data.shards import ShardError, shard_subimages
from pipeline.data.subimages import ExtractError
from pipeline.errors import os_error_line

log = logging.getLogger("stages.shards")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--subimages", required=True, help="output of the extract stage")
    ap.add_argument("--out", required=True, help="shard directory")
    ap.add_argument("--report", required=True, help="report JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        manifest = shard_subimages(args.subimages, args.out, params.shards)
        sizes = [s["tar_bytes"] for s in manifest["shards"]]
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            args.report,
            {
                "stage": "shards",
                "num_shards": len(manifest["shards"]),
                "num_samples": manifest["num_samples"],
                "crop_size": manifest["crop_size"],
                "total_bytes": sum(sizes),
                "max_shard_bytes": max(sizes),
            },
        )
    except (ConfigError, ExtractError, ShardError) as err:
        log.error("%s", err)
        return 1
    except OSError as err:  # no space left, read-only or forbidden target: one line, the path
        log.error("%s", os_error_line(err))
        return 1
    log.info(
        "shards: %d samples in %d shards (%.1f MB)",
        manifest["num_samples"],
        len(manifest["shards"]),
        sum(sizes) / 1e6,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
