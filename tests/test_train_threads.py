"""A training worker's CPU budget: loader threads capped at its CPUs, normal priority under Ray,
and the start-up line that says what it computes with (no Ray needed here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline.config import parse_params
from pipeline.tracking import TrackingTarget
from pipeline.train import setup as setup_mod
from pipeline.train import trainer as trainer_mod
from pipeline.train.loop import run_worker
from pipeline.train.session import LocalSession
from pipeline.train.setup import build_loader, loader_threads
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.worker_config import WorkerConfig


@pytest.mark.parametrize(
    ("configured", "cpus", "expected"),
    [(2, 2, 2), (2, 1, 1), (4, 2, 2), (1, 2, 1), (3, None, 3)],
)
def test_loader_threads_follow_the_workers_cpus(configured, cpus, expected) -> None:
    assert loader_threads(configured, cpus) == expected


def _config(tmp_path: Path, threads: int | None, num_threads: int = 2) -> WorkerConfig:
    params = parse_params(
        {
            "loader": {"batch_size": 4, "crop": 32, "num_threads": num_threads},
            "train_cunet": {"generator": "tiny", "iterations": 2, "log_every": 1},
        }
    )
    target = TrackingTarget(mode="local", uri=None, run_id=None, fallback_dir=str(tmp_path))
    return WorkerConfig(
        params=params, stage="cunet", tracking=target, shards_dir=tmp_path, threads=threads
    )


def test_the_loader_reads_the_capped_count(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake_loader(shards_dir, params, **kwargs):
        seen.update(num_threads=params.loader.num_threads, batch=params.loader.batch_size)
        return "loader"

    monkeypatch.setattr(setup_mod, "build_train_loader", fake_loader)
    cpu = torch.device("cpu")
    build_loader(_config(tmp_path, threads=1), None, rank=0, world_size=2, device=cpu)
    assert seen == {"num_threads": 1, "batch": 2}  # 1 CPU per worker; global batch 4 / 2
    build_loader(_config(tmp_path, threads=2), None, rank=0, world_size=1, device=cpu)
    assert seen == {"num_threads": 2, "batch": 4}
    build_loader(_config(tmp_path, threads=None), None, rank=0, world_size=1, device=cpu)
    assert seen["num_threads"] == 2  # no budget given: as configured


def test_ray_workers_run_at_normal_priority(monkeypatch) -> None:
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setenv("CUGAN_CACHE_DIR", "/tmp/x")
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")
    env = trainer_mod._worker_env()
    assert env["RAY_worker_niceness"] == "0"  # Ray's default for workers is 15
    assert env["CUGAN_CACHE_DIR"] == "/tmp/x" and "UNRELATED_VARIABLE" not in env
    monkeypatch.setenv("RAY_worker_niceness", "5")  # an operator's choice wins
    assert trainer_mod._worker_env()["RAY_worker_niceness"] == "5"


def test_ray_workers_keep_openmps_wait_policy_unless_one_is_set(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in trainer_mod._worker_env()  # libgomp's short spin
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # an operator's choice wins
    assert trainer_mod._worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_worker_says_what_it_computes_with(tmp_path, caplog) -> None:
    config = _config(tmp_path, threads=1)
    config = WorkerConfig(params=config.params, stage="cunet", tracking=config.tracking, threads=1)
    hooks = TestHooks(synthetic=SyntheticData(num_samples=4, seed=0))
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.train.loop"):
            run_worker(config, LocalSession(tmp_path / "run"), hooks)
    finally:
        torch.set_num_threads(threads)
    line = next(r.getMessage() for r in caplog.records if "iterations 1..2" in r.getMessage())
    assert "1 torch thread(s) on" in line and "nice " in line
