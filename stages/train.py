"""DVC stage: train one stage of the model (``train_cunet``, ``train_cugan``, or any other
``train_<name>`` section of params.yaml) on Ray.

    python -m stages.train --stage cunet --shards data/shards --evalsets data/evalsets \\
        --out runs/train_cunet
    python -m stages.train --stage cugan --shards data/shards --evalsets data/evalsets \\
        --init runs/train_cunet/model --out runs/train_cugan

All settings come from params.yaml (``train_<stage>``, ``loader``, ``degradation``, ``base``,
``ray``, ``tracking``); paths come from dvc.yaml. A bad config fails in one line before Ray
starts. See pipeline/train/trainer.py for the outputs and pipeline/tracking.py for MLflow.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_params
from pipeline.errors import one_line, os_error_line
from pipeline.pretrained import PretrainedWeightsMissing

log = logging.getLogger("stages.train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", required=True, help="cunet, cugan, ... (the train_<stage> section)"
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", required=True, help="directory with shards.json")
    parser.add_argument("--evalsets", default=None, help="evaluation sets root (validation)")
    parser.add_argument("--init", default=None, help="generator checkpoint to start G from")
    parser.add_argument("--out", required=True, help="stage output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

    from pipeline.train.trainer import StageFailed, run_stage

    try:
        params = load_params(args.params)
        result = run_stage(
            params,
            args.stage,
            out_dir=args.out,
            shards_dir=args.shards,
            evalsets_dir=args.evalsets,
            init_dir=args.init,
        )
    except (ConfigError, PretrainedWeightsMissing, CheckpointError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # the driver's outputs: no space left, read-only, forbidden
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 1
    psnr = result.metrics.get("val/psnr/mean")
    if psnr is not None:
        log.info(
            "validation PSNR %.2f dB (degraded input %.2f dB)",
            psnr,
            result.metrics.get("val/psnr_input/mean", float("nan")),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
