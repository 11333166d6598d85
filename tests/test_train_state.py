"""Training checkpoints: exact round trips, no pickle, and an exact in-process resume."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.checkpoint import load_generator
from pipeline.config import parse_params
from pipeline.tracking import TrackingTarget
from pipeline.train.loop import run_worker
from pipeline.train.session import LocalSession
from pipeline.train.setup import TrainLoopError
from pipeline.train.state import TrainStateError, load_train_state, tree_from_json, tree_to_json
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.worker_config import WorkerConfig

#: The tests' data: 12 pre-made samples through the test seam, no shards.
HOOKS = TestHooks(synthetic=SyntheticData(num_samples=12, seed=0))


def test_tree_round_trip_keeps_int_keys_tuples_and_dtypes():
    tree = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
            7: {"m": torch.arange(4, dtype=torch.int64)},
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 7], "foreach": None}],
        "rng": torch.get_rng_state(),
    }
    tensors: dict = {}
    doc = json.loads(json.dumps(tree_to_json(tree, "opt", tensors)))
    back = tree_from_json(doc, tensors)
    assert set(back["state"]) == {0, 7}
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["state"][7]["m"].dtype == torch.int64
    assert torch.equal(back["rng"], tree["rng"])
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    with pytest.raises(TrainStateError, match="cannot store"):
        tree_to_json({"x": object()}, "p", {})


def _config(tmp_path, stage="cunet", iterations=6, fixed_degradation=None):
    params = parse_params(
        {
            "base": {"pretrained": "random"},
            "loader": {"batch_size": 4, "crop": 64},
            "train_cunet": {
                "generator": "tiny",
                "iterations": iterations,
                "checkpoint_every": 3,
                "log_every": 3,
                "schedule": {"milestones": [2], "every": None},
                "fixed_degradation": fixed_degradation,
            },
            "train_cugan": {
                "generator": "tiny",
                "discriminator": "tiny",
                "iterations": iterations,
                "checkpoint_every": 3,
                "log_every": 3,
                "perceptual_layer": "conv2_2",
            },
        }
    )
    return WorkerConfig(
        params=params,
        stage=stage,
        tracking=TrackingTarget(mode="local", fallback_dir=str(tmp_path / "fb")),
        threads=1,
    )


@pytest.mark.parametrize("stage", ["cunet", "cugan"])
def test_resume_in_process_equals_uninterrupted(tmp_path, stage):
    straight = LocalSession(tmp_path / "straight")
    run_worker(_config(tmp_path, stage), straight, HOOKS)

    cut = LocalSession(tmp_path / "cut")
    run_worker(
        _config(tmp_path, stage, iterations=3), cut, HOOKS
    )  # stops at the checkpoint of it 3
    resumed = LocalSession(tmp_path / "cut", resume=True)
    run_worker(_config(tmp_path, stage), resumed, HOOKS)

    a, b = load_train_state(straight.latest()), load_train_state(resumed.latest())
    assert a.iteration == b.iteration == 6
    for key in a.generator:
        assert torch.equal(a.generator[key], b.generator[key]), key
    if stage == "cugan":
        assert all(torch.equal(a.discriminator[k], b.discriminator[k]) for k in a.discriminator)
    assert torch.equal(
        a.optimizers["g"]["state"][0]["exp_avg"], b.optimizers["g"]["state"][0]["exp_avg"]
    )
    assert a.loaders == b.loaders


def test_checkpoint_directory_is_self_describing(tmp_path):
    session = LocalSession(tmp_path / "run")
    config = _config(tmp_path, iterations=3)
    run_worker(config, session, HOOKS)
    ckpt = session.latest()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "generator.json",
        "generator.safetensors",
        "train_state.json",
        "train_state.safetensors",
    ]
    state = load_train_state(ckpt)
    assert state.iteration == 3 and state.stage == "cunet" and state.world_size == 1
    assert state.document["config"]["params"]["train_cunet"]["generator"] == "tiny"
    # the checkpoint records the typed worker config, which reads back as the same object
    assert WorkerConfig.from_dict(state.document["config"]) == config
    assert "test_hooks" not in state.document["config"]  # the test seam stays out of it
    assert state.loaders[0]["backend"] == "tensors"
    # the LR schedule: milestone 2 -> iterations 3.. at half rate
    assert state.optimizers["g"]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)
    model, meta = load_generator(ckpt)  # what `cugan restore --model <dir>` does
    assert meta["iteration"] == 3 and model.config.channels_per_scale == (4, 8, 8)
    assert torch.equal(model.state_dict()["head.weight"], state.generator["head.weight"])
    with pytest.raises(TrainStateError, match="not a training checkpoint"):
        load_train_state(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimizer_state_lands_on_the_gpu_after_resume(tmp_path):
    from models.registry import build_generator
    from pipeline.condition import DEFAULT_SCALE
    from pipeline.train.state import save_train_state

    device = torch.device("cuda")
    g = build_generator("tiny").to(device)
    opt = torch.optim.Adam(g.parameters(), 1e-3)
    g(torch.rand(1, 3, 16, 16, device=device), torch.rand(1, 2, device=device)).mean().backward()
    opt.step()
    save_train_state(
        tmp_path,
        iteration=1,
        stage="cunet",
        g=g,
        d=None,
        optimizers={"g": opt},
        rng=[{"torch_cpu": torch.get_rng_state()}],
        loaders=[None],
        config={},
        metadata={},
        scale=DEFAULT_SCALE,
    )
    state = load_train_state(tmp_path)
    fresh = build_generator("tiny").to(device)
    opt2 = torch.optim.Adam(fresh.parameters(), 1e-3)
    opt2.load_state_dict(state.optimizers["g"])
    moments = [s["exp_avg"] for s in opt2.state.values()]
    assert moments and all(m.device.type == "cuda" for m in moments)
    # and the whole loop resumes on the GPU
    session = LocalSession(tmp_path / "run", device=device)
    run_worker(_config(tmp_path, iterations=3), session, HOOKS)
    resumed = LocalSession(tmp_path / "run", device=device, resume=True)
    assert run_worker(_config(tmp_path), resumed, HOOKS)["iteration"] == 6


def test_fixed_degradation_baseline_trains_on_one_setting(tmp_path):
    """The Unet/UGAN baselines: the same loop; the loader degrades every sample's context window
    at the stage's one (r, sigma) (tests/test_loader_torch.py pins the batches exactly)."""
    from tests.test_loader_torch import make_shards

    make_shards(tmp_path / "shards", 8)
    base = _config(tmp_path, iterations=3, fixed_degradation=[2, 30])
    params = base.params.model_copy(
        update={
            "loader": base.params.loader.model_copy(
                update={"backend": "torch", "crop": 16, "num_threads": 1, "batch_size": 2}
            )
        }
    )
    config = WorkerConfig(
        params=params,
        stage="cunet",
        tracking=base.tracking,
        threads=1,
        shards_dir=str(tmp_path / "shards"),
    )
    session = LocalSession(tmp_path / "run")
    assert run_worker(config, session)["iteration"] == 3
    # the loader's position (and with it the noise of every later batch, a function of the
    # batch's own seed) is part of the checkpoint, so a resumed baseline draws the same noise
    saved = load_train_state(session.latest()).loaders[0]
    assert saved["fixed_levels"] == [2.0, 30.0] and saved["epoch"] * 4 + saved["batch"] == 3
    # synthetic test data comes degraded already: a baseline refuses it instead of ignoring it
    with pytest.raises(TrainLoopError, match="fixed_degradation needs shards"):
        run_worker(
            _config(tmp_path / "s", iterations=3, fixed_degradation=[2, 30]),
            LocalSession(tmp_path / "s" / "run"),
            HOOKS,
        )
