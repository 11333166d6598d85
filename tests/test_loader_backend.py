"""``loader.backend: auto`` (pipeline/data/backend_choice.py): the rule, the probe, the cache."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.data.backend_choice as choice_mod
from pipeline.config import ShardParams, parse_params
from pipeline.data.backend_choice import choose_backend, probe_rates
from pipeline.data.batch import read_shard_set
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import write_shards

CPU = torch.device("cpu")


@pytest.fixture()
def shards(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    samples = [
        {"key": f"img{i:02d}-y0-x0", "raw": rng.integers(0, 256, (24, 24, 3), np.uint8).tobytes()}
        for i in range(8)
    ]
    write_shards(
        samples, lambda s: s["raw"], tmp_path / "s", ShardParams(), crop_size=24, encoding="raw"
    )
    return tmp_path / "s"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CUGAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "loader-backend.json"


def params(**loader):
    return parse_params({"loader": {"crop": 16, "batch_size": 2, "num_threads": 1, **loader}})


class FakeProbe:
    def __init__(self, rates: dict[str, float], delay: float = 0.0) -> None:
        self.rates, self.delay, self.calls = rates, delay, 0

    def __call__(self, build):
        self.calls += 1
        time.sleep(self.delay)
        return dict(self.rates)


def no_build(name):
    raise AssertionError(f"the rule should not build a {name} loader")


def test_auto_is_the_default():
    assert parse_params({}).loader.backend == "auto"


def test_an_explicit_backend_is_taken_as_is(shards):
    probe = FakeProbe({"dali": 1.0, "torch": 2.0})
    for name in ("dali", "torch"):
        got = choose_backend(
            params(backend=name), read_shard_set(shards), CPU, no_build, probe=probe
        )
        assert got.name == name and "set by loader.backend" in got.reason
    assert probe.calls == 0


@pytest.mark.parametrize(
    ("device", "target"), [("auto", torch.device("cuda", 0)), ("gpu", torch.device("cpu"))]
)
def test_dali_when_its_pipeline_runs_on_the_gpu(shards, device, target, caplog):
    probe = FakeProbe({"dali": 1.0, "torch": 2.0})
    with caplog.at_level(logging.INFO, logger="pipeline.data.backend_choice"):
        got = choose_backend(
            params(device=device), read_shard_set(shards), target, no_build, probe=probe
        )
    assert got.name == "dali" and "GPU" in got.reason and probe.calls == 0
    assert "loader.backend auto -> dali" in caplog.text


def test_torch_without_dali(shards, monkeypatch):
    monkeypatch.setattr(choice_mod, "dali_available", lambda: False)
    got = choose_backend(params(), read_shard_set(shards), torch.device("cuda", 0), no_build)
    assert got.name == "torch" and "not installed" in got.reason


@pytest.mark.parametrize(
    ("rates", "winner"),
    [({"dali": 900.0, "torch": 700.0}, "dali"), ({"dali": 500.0, "torch": 700.0}, "torch")],
)
def test_on_the_cpu_the_probe_decides_once_then_the_cache(
    shards, private_cache, rates, winner, caplog
):
    pytest.importorskip("nvidia.dali")
    s = read_shard_set(shards)
    probe = FakeProbe(rates)
    with caplog.at_level(logging.INFO, logger="pipeline.data.backend_choice"):
        first = choose_backend(params(), s, CPU, no_build, probe=probe)
        second = choose_backend(params(), s, CPU, no_build, probe=probe)
    assert first.name == second.name == winner and probe.calls == 1
    assert f"dali {rates['dali']:.0f}, torch {rates['torch']:.0f}" in first.reason
    assert "cached in" in second.reason and f"loader.backend auto -> {winner}" in caplog.text
    entry = next(iter(json.loads(private_cache.read_text())["entries"].values()))
    assert entry["backend"] == winner and entry["rates"] == rates
    assert entry["key"]["encoding"] == "raw" and entry["key"]["crop"] == 16
    # another setup is another question
    choose_backend(params(crop=8), s, CPU, no_build, probe=probe)
    assert probe.calls == 2


def test_a_broken_cache_is_measured_again(shards, private_cache, caplog):
    pytest.importorskip("nvidia.dali")
    private_cache.parent.mkdir(parents=True)
    private_cache.write_text("{not json")
    probe = FakeProbe({"dali": 1.0, "torch": 2.0})
    assert choose_backend(params(), read_shard_set(shards), CPU, no_build, probe=probe).name == (
        "torch"
    )
    assert probe.calls == 1 and "unreadable loader-backend cache" in caplog.text
    assert json.loads(private_cache.read_text())["version"] == 1


def test_concurrent_ranks_wait_for_one_probe(shards):
    pytest.importorskip("nvidia.dali")
    s = read_shard_set(shards)
    probe = FakeProbe({"dali": 1.0, "torch": 2.0}, delay=0.5)
    names: list[str] = []

    def rank():
        names.append(choose_backend(params(), s, CPU, no_build, probe=probe).name)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert names == ["torch"] * 3 and probe.calls == 1


def test_the_real_probe_times_both_loaders_and_build_uses_the_choice(shards, private_cache):
    pytest.importorskip("nvidia.dali")
    loader = build_train_loader(shards, params(), seed=0)
    entry = next(iter(json.loads(private_cache.read_text())["entries"].values()))
    assert set(entry["rates"]) == {"dali", "torch"} and min(entry["rates"].values()) > 0
    assert loader.backend == entry["backend"]
    assert len(list(loader)) == 4  # a fresh loader: the probe did not move its position


def test_probe_rates_counts_patches_per_second():
    class Loader:
        batch_size = 4

        def __init__(self):
            self.closed = False

        def __iter__(self):
            yield from range(3)  # short epochs: the probe runs across them

        def close(self):
            self.closed = True

    ticks = iter(range(100))
    made = {}

    def build(name):
        made[name] = Loader()
        return made[name]

    rates = probe_rates(build, ("a", "b"), batches=5, rounds=2, clock=lambda: float(next(ticks)))
    assert rates == {"a": 20.0, "b": 20.0}  # 5 batches x 4 patches per clock tick
    assert all(loader.closed for loader in made.values())
