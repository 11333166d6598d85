"""The default training path end to end: the DALI loader (CPU pipeline) inside 2 Ray Train
workers on real (tiny) shards, a worker killed mid-run, and the resume bit-identical to a run
that was never interrupted.

What makes the resume exact on this path: every rank's DALI reader position and random
states are saved with each checkpoint (``DALIGenericIterator.checkpoints()``,
pipeline/data/dali_pipeline.py) and restored when the restarted worker rebuilds its
pipeline, with the weights, optimiser moments and torch RNGs (pipeline/train/state.py).
Kept small for speed: a tiny generator, 16 samples, 6 iterations, one DALI thread per worker.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipeline.config import ShardParams, parse_params
from pipeline.data.extract import encode_png
from pipeline.data.shards import write_shards
from pipeline.train.state import load_train_state
from pipeline.train.testing import FaultPlan, TestHooks
from pipeline.train.trainer import run_stage
from tests.data_fixtures import textured

pytestmark = pytest.mark.slow

ITERATIONS = 6
SIZE = 72  # sub-images; the loader crops 64 x 64 at random positions


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali-shards") / "shards"
    samples = [
        {"key": f"img{i:02d}-y0-x0", "png": encode_png(textured(SIZE, SIZE, i), 1)}
        for i in range(16)
    ]
    write_shards(samples, lambda s: s["png"], root, ShardParams(max_count=5), crop_size=SIZE)
    return root


def _params(tmp_path):
    return parse_params(
        {
            "base": {"pretrained": "random", "seed": 0},
            # the defaults of params.yaml's loader (backend dali, device auto -> the CPU
            # pipeline on CPU workers), made small
            # the default path on a GPU, and the subject here: the DALI pipeline (CPU graph)
            "loader": {
                "backend": "dali",
                "batch_size": 4,
                "crop": 64,
                "num_threads": 1,
                "shuffle_buffer": 8,
            },
            "train_cunet": {
                "generator": "tiny",
                "iterations": ITERATIONS,
                "checkpoint_every": 3,
                "log_every": 3,
                "optimizer_g": {"lr": 2e-3},
            },
            "ray": {
                "num_workers": 2,
                "cpus_per_worker": 1,
                "storage_path": str(tmp_path / "ray"),
                "max_failures": 1,
                "use_gpu": False,
            },
            "tracking": {"enabled": False},
        }
    )


def test_dali_in_two_ray_workers_resumes_bit_identically(ray_session, shards, tmp_path):
    params = _params(tmp_path / "straight")
    assert params.loader.backend == "dali"
    straight = run_stage(params, "cunet", out_dir=tmp_path / "straight", shards_dir=shards)

    marker = tmp_path / "failed-once"
    resumed = run_stage(
        _params(tmp_path / "chaos"),
        "cunet",
        out_dir=tmp_path / "chaos",
        shards_dir=shards,
        test_hooks=TestHooks(fault=FaultPlan(iteration=5, marker=marker, rank=1)),
    )
    assert marker.exists()  # rank 1 did fail at iteration 5, after the checkpoint at 3
    assert resumed.metrics["iteration"] == straight.metrics["iteration"] == ITERATIONS

    a, b = load_train_state(resumed.model_dir), load_train_state(straight.model_dir)
    # both ran DALI's CPU pipeline, one reader per rank
    for state in (a, b):
        assert state.world_size == 2
        assert [s["backend"] for s in state.loaders] == ["dali", "dali"]
        assert [s["pipeline"] for s in state.loaders] == ["cpu", "cpu"]
        assert [s["rank"] for s in state.loaders] == [0, 1]
    assert a.generator.keys() == b.generator.keys()
    for key, value in b.generator.items():
        assert torch.equal(a.generator[key], value), key
    for x, y in zip(
        a.optimizers["g"]["state"].values(), b.optimizers["g"]["state"].values(), strict=True
    ):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(
            x["exp_avg_sq"], y["exp_avg_sq"]
        )
    # the readers stand at the same place too (position and DALI's own checkpoint)
    assert a.loaders == b.loaders
    assert straight.metrics["loss/mse"] == resumed.metrics["loss/mse"]
