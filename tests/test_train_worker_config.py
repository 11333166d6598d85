"""The typed worker config (pipeline/train/worker_config.py) and the test seam beside it
(pipeline/train/testing.py): exact round trips, one-line refusals, and what defines a run."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, parse_params
from pipeline.tracking import TrackingTarget
from pipeline.train.loop import loop_config
from pipeline.train.setup import TrainLoopError, build_loader
from pipeline.train.testing import FaultPlan, InjectedFault, SyntheticData, TestHooks
from pipeline.train.trainer import _digest
from pipeline.train.worker_config import (
    WORKER_CONFIG_VERSION,
    WorkerConfig,
    WorkerConfigError,
    stage_params,
)


def _config(tmp_path: Path, **overrides) -> WorkerConfig:
    fields = {
        "params": parse_params(
            {"loader": {"batch_size": 4, "crop": 32}, "train_cunet": {"generator": "tiny"}}
        ),
        "stage": "cunet",
        "tracking": TrackingTarget(mode="local", fallback_dir=str(tmp_path / "fb")),
        "shards_dir": tmp_path / "shards",
        "evalsets_dir": str(tmp_path / "evalsets"),
        "init_dir": None,
        "threads": 2,
    }
    return WorkerConfig(**{**fields, **overrides})


def test_round_trip_through_json_is_exact(tmp_path):
    config = _config(tmp_path)
    data = json.loads(json.dumps(config.to_dict()))  # plain JSON, as Ray and checkpoints hold it
    assert data["version"] == WORKER_CONFIG_VERSION
    back = WorkerConfig.from_dict(data)
    assert back == config
    assert isinstance(back.evalsets_dir, Path) and back.init_dir is None
    assert back.stage_section == config.params.train_cunet and back.tag == "train_cunet"


def test_config_is_frozen(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stage = "cugan"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=2), "version 2, this code reads version 1"),
        (lambda d: d.pop("version"), "version None, this code reads version 1"),
        (lambda d: d.update(fault={"iteration": 3}), "unknown key(s) fault"),
        (lambda d: d.pop("threads"), "missing key(s) threads"),
        (lambda d: d["params"]["train_cunet"].update(itertions=5), "train_cunet.itertions"),
        (lambda d: d.update(stage="unet"), "unknown training stage 'unet'"),
        (lambda d: d.update(stage=3), "stage must be a string"),
        (lambda d: d.update(threads=0), "threads must be a positive integer"),
        (lambda d: d["tracking"].update(server="x"), "tracking:"),
        (lambda d: d.update(shards_dir=5), "shards_dir must be a path string or null"),
    ],
)
def test_from_dict_refuses_in_one_line(tmp_path, change, message):
    data = _config(tmp_path).to_dict()
    change(data)
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("worker config")


def test_config_errors_are_config_errors():
    assert issubclass(WorkerConfigError, ConfigError)
    with pytest.raises(WorkerConfigError, match="no train_unet section"):
        stage_params(parse_params({}), "unet")
    with pytest.raises(WorkerConfigError, match="params must be Params"):
        WorkerConfig(params={}, stage="cunet", tracking=TrackingTarget(mode="off"))  # type: ignore[arg-type]


def test_ray_gets_the_versioned_dict_and_the_hooks_beside_it(tmp_path):
    config = _config(tmp_path)
    hooks = TestHooks(synthetic=SyntheticData(num_samples=8, seed=1))
    wire = loop_config(config, hooks)
    assert set(wire) == {"worker_config", "test_hooks"}
    json.dumps(wire["worker_config"])  # the config part is plain JSON
    assert WorkerConfig.from_dict(wire["worker_config"]) == config
    # hooks travel to the workers as objects (Ray pickles them); our own object, not a user file
    assert pickle.loads(pickle.dumps(wire["test_hooks"])) == hooks  # noqa: TID251
    assert loop_config(config)["test_hooks"] is None  # production: no hooks at all


def test_fault_plan_fails_once_on_its_rank_and_iteration(tmp_path):
    plan = FaultPlan(iteration=3, marker=str(tmp_path / "marker"))
    plan.maybe_fail(2, 0)
    plan.maybe_fail(3, 1)
    assert not plan.marker.exists()
    with pytest.raises(InjectedFault, match="injected failure at iteration 3"):
        plan.maybe_fail(3, 0)
    assert plan.marker.read_text().startswith("fault injected at iteration 3")
    plan.maybe_fail(3, 0)  # the restarted worker goes on


def test_test_hooks_are_not_a_pytest_class():
    assert TestHooks.__test__ is False


def test_run_identity_covers_synthetic_data_but_not_a_fault(tmp_path):
    params = _config(tmp_path).params
    synthetic = TestHooks(synthetic=SyntheticData(num_samples=8, seed=0))
    with_fault = dataclasses.replace(synthetic, fault=FaultPlan(iteration=2, marker=tmp_path))
    other_seed = TestHooks(synthetic=SyntheticData(num_samples=8, seed=1))
    digest = _digest(params, "cunet", None, None, synthetic)
    assert digest == _digest(params, "cunet", None, None, with_fault)
    assert digest != _digest(params, "cunet", None, None, other_seed)
    assert digest != _digest(params, "cugan", None, None, synthetic)


def test_a_worker_needs_exactly_one_data_source(tmp_path):
    synthetic = TestHooks(synthetic=SyntheticData(num_samples=8, seed=0))
    cpu = torch.device("cpu")
    with pytest.raises(TrainLoopError, match="not both or neither"):
        build_loader(_config(tmp_path), synthetic, rank=0, world_size=1, device=cpu)
    with pytest.raises(TrainLoopError, match="not both or neither"):
        build_loader(_config(tmp_path, shards_dir=None), None, rank=0, world_size=1, device=cpu)
    loader = build_loader(
        _config(tmp_path, shards_dir=None), synthetic, rank=1, world_size=2, device=cpu
    )
    assert loader.batch_size == 2 and len(loader) == 2  # the per-worker batch: 4 / 2 workers
