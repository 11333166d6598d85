"""How long a training stage waits before it falls back from a dead tracking server.

    .venv/bin/python benchmarks/tracking_outage.py [--iterations 20] [--workdir DIR]

A short CUnet stage (``tiny`` generator, synthetic samples through the test seam, one Ray
worker) runs against ``tracking.uri = http://127.0.0.1:PORT`` where nothing listens. Printed:
seconds from the stage's start to its one fallback warning, the stage's wall time, and the
tracking mode it ended in (``local``: the run is in ``OUT/mlflow-fallback``, for ``cugan
tracking sync`` later). Before the probe (issue 10) MLflow's retries with backoff held such a
run for about 290 s; the probe asks once, with ``tracking.probe_timeout_s``.

A measurement, not a test: the behaviour itself is asserted in tests/test_tracking_outage.py
and tests/test_train_tracking.py.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import parse_params
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.trainer import run_stage


class _FirstFallback(logging.Handler):
    """Remembers when the first "tracking is unavailable" warning arrived."""

    def __init__(self, t0: float) -> None:
        super().__init__(logging.WARNING)
        self.t0 = t0
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if self.at is None and ("is unavailable" in msg or "failed (" in msg):
            self.at = time.monotonic() - self.t0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cugan-outage-"))
    port = _closed_port()
    params = parse_params(
        {
            "loader": {"batch_size": 2, "crop": 32},
            "train_cunet": {
                "generator": "tiny",
                "iterations": args.iterations,
                "log_every": 2,
                "checkpoint_every": args.iterations,
            },
            "ray": {"num_workers": 1, "storage_path": str(root / "ray"), "use_gpu": False},
            "tracking": {"uri": f"http://127.0.0.1:{port}", "artifact_location": str(root / "a")},
        }
    )
    t0 = time.monotonic()
    mark = _FirstFallback(t0)
    logging.getLogger().addHandler(mark)
    result = run_stage(
        params,
        "cunet",
        out_dir=root / "out",
        test_hooks=TestHooks(synthetic=SyntheticData(num_samples=4, seed=0)),
    )
    total = time.monotonic() - t0
    at = "never" if mark.at is None else f"{mark.at:.2f} s"
    print(
        f"dead tracking server http://127.0.0.1:{port}: fallback warning after {at}; stage done "
        f"in {total:.1f} s ({args.iterations} iterations, Ray start included); tracking mode "
        f"{result.tracking.mode}; outputs in {root}"
    )
    return 0 if result.tracking.mode == "local" else 1


if __name__ == "__main__":
    sys.exit(main())
