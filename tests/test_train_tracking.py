"""MLflow tracking: parent/child runs in a local store, and training that survives a dead server."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.config import TrackingParams, parse_params
from pipeline.tracking import (
    RunLog,
    TrackingTarget,
    dvc_lock_tags,
    flatten_params,
    read_tracking_file,
    start_stage_run,
    write_tracking_file,
)
from pipeline.train.loop import run_worker
from pipeline.train.session import LocalSession
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.worker_config import WorkerConfig


@pytest.fixture
def dead_server(monkeypatch):
    """An http:// URI on a port nothing listens on, with MLflow's HTTP retries off."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"http://127.0.0.1:{port}"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flatten_params_and_dvc_lock_tags(tmp_path):
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
        "e": "{}",
    }
    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  shards:\n    outs:\n"
        "    - path: data/shards\n      md5: abc.dir\n"
    )
    assert dvc_lock_tags(
        [tmp_path / "data" / "shards", tmp_path / "other"], tmp_path / "dvc.lock"
    ) == {"dvc.data/shards": "abc.dir"}
    assert dvc_lock_tags([tmp_path], tmp_path / "missing.lock") == {}


def test_unreachable_server_at_start_falls_back_to_local(dead_server, tmp_path, caplog):
    target = start_stage_run(TrackingParams(uri=dead_server), stage="train_cunet", out_dir=tmp_path)
    assert target.mode == "local" and target.run_id is None
    assert "unavailable" in caplog.text
    log = RunLog(target)
    log.log_metrics([(1, {"loss/mse": 0.5})])
    assert _records(tmp_path / "mlflow-fallback" / "tracking.jsonl")[0]["data"][0]["step"] == 1


def test_server_dying_mid_run_warns_once_and_keeps_everything(dead_server, tmp_path, caplog):
    target = TrackingTarget(
        mode="mlflow", uri=dead_server, run_id="0123", fallback_dir=str(tmp_path)
    )
    log = RunLog(target)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        log.log_params({"a": "1"})
        for step in range(1, 4):
            log.log_metrics([(step, {"loss/mse": 1.0 / step})])
        log.log_image(np.zeros((8, 8, 3), np.uint8), "modulation/grid.png")
        log.finish()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and dead_server in warnings[0].getMessage()
    assert log.fell_back
    records = _records(tmp_path / "tracking.jsonl")
    assert [r["kind"] for r in records] == [
        "params",
        "metrics",
        "metrics",
        "metrics",
        "artifact",
        "status",
    ]
    assert (tmp_path / "artifacts" / "modulation" / "grid.png").is_file()


def test_training_does_not_die_when_the_server_is_gone(dead_server, tmp_path):
    params = parse_params(
        {
            "loader": {"batch_size": 2, "crop": 32},
            "train_cunet": {
                "generator": "tiny",
                "iterations": 4,
                "log_every": 2,
                "checkpoint_every": 4,
            },
        }
    )
    config = WorkerConfig(
        params=params,
        stage="cunet",
        threads=1,
        tracking=TrackingTarget(
            mode="mlflow", uri=dead_server, run_id="0123", fallback_dir=str(tmp_path / "fb")
        ),
    )
    hooks = TestHooks(synthetic=SyntheticData(num_samples=4, seed=0))
    metrics = run_worker(config, LocalSession(tmp_path / "run"), hooks)
    assert metrics["iteration"] == 4
    rows = [
        row
        for r in _records(tmp_path / "fb" / "tracking.jsonl")
        if r["kind"] == "metrics"
        for row in r["data"]
    ]
    assert [row["step"] for row in rows if "loss/mse" in row["metrics"]] == [1, 2, 3, 4]


def test_parent_and_child_runs_in_a_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUGAN_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    params = TrackingParams(uri="sqlite:///mlflow.db", experiment="t")
    first = start_stage_run(
        params, stage="train_cunet", out_dir=tmp_path / "a", tags={"git.commit": "x"}
    )
    assert first.mode == "mlflow" and first.uri == f"sqlite:///{tmp_path}/mlflow.db"
    model_dir = tmp_path / "a" / "model"
    model_dir.mkdir(parents=True)
    write_tracking_file(model_dir, first, "train_cunet")
    assert read_tracking_file(model_dir)["run_id"] == first.run_id
    second = start_stage_run(
        params, stage="train_cugan", out_dir=tmp_path / "b", init_dir=model_dir
    )
    assert second.parent_run_id == first.parent_run_id and second.run_id != first.run_id

    client = MlflowClient(first.uri)
    run = client.get_run(second.run_id)
    assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert client.get_run(first.run_id).data.tags["git.commit"] == "x"
    exp = client.get_experiment(first.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    log = RunLog(second)
    log.log_params(flatten_params({"train_cugan": {"weights": {"gan": 0.005}}}))
    log.log_metrics([(s, {"loss/g_gan": 0.1 * s}) for s in range(1, 1501)])  # > one batch
    log.finish()
    run = client.get_run(second.run_id)
    assert run.data.params["train_cugan.weights.gan"] == "0.005"
    assert len(client.get_metric_history(second.run_id, "loss/g_gan")) == 1500
    assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# a server that does not answer at all, and the model the stage registers


def test_a_silent_server_falls_back_after_the_probe_timeout(tmp_path, monkeypatch, caplog):
    """A server that accepts connections and never answers (a hung process, a black-holed
    route): MLflow would wait 120 s per attempt, 7 times; the probe waits probe_timeout_s."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel accepts; nothing ever reads or answers
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        params = TrackingParams(uri=uri, probe_timeout_s=1, http_max_retries=1)
        target = start_stage_run(params, stage="train_cunet", out_dir=tmp_path)
    assert target.mode == "local" and target.local_id
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no answer within 1 s" in warnings[0]
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # for the rest of the run


def _model_stage(tmp_path, tracking):
    from pipeline.train.worker_config import stage_params
    from tests import evalkit

    params = parse_params({"train_cunet": {"generator": "tiny"}, "tracking": tracking})
    model_dir = evalkit.save_tiny(tmp_path / "out" / "model", seed=1)
    return params, stage_params(params, "cunet"), model_dir


def test_log_model_records_the_version_it_registered(tmp_path, monkeypatch):
    from pipeline.train import trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUGAN_MLFLOW_PARENT_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params, sp, model_dir = _model_stage(
        tmp_path, {"uri": uri, "artifact_location": str(tmp_path / "art")}
    )
    client = MlflowClient(uri)
    for _ in range(2):  # two runs: versions 1 and 2; the second run's tracking.json names 2
        target = start_stage_run(params.tracking, stage="train_cunet", out_dir=tmp_path / "out")
        write_tracking_file(model_dir, target, "train_cunet")
        trainer._log_model(params, "cunet", sp, target, RunLog(target), model_dir, None)
    # a newer version registered elsewhere does not change what this run produced
    client.create_model_version("cunet", source=client.get_model_version("cunet", "1").source)
    recorded = read_tracking_file(model_dir)
    assert recorded["registered_model"] == {"name": "cunet", "version": "2"}
    assert client.get_model_version("cunet", "2").run_id == target.run_id == recorded["run_id"]
    assert str(client.get_registered_model("cunet").latest_versions[-1].version) == "3"


def test_log_model_without_mlflow_saves_and_records_the_model(tmp_path, dead_server):
    from pipeline.tracking.journal import read_records
    from pipeline.train import trainer

    params, sp, model_dir = _model_stage(tmp_path, {"uri": dead_server})
    target = start_stage_run(params.tracking, stage="train_cunet", out_dir=tmp_path / "out")
    write_tracking_file(model_dir, target, "train_cunet")
    runlog = RunLog(target)
    assert trainer._log_model(params, "cunet", sp, target, runlog, model_dir, None) is None
    (record,) = [r for r in read_records(target.fallback_dir) if r.kind == "model"]
    assert record.local_id == target.local_id
    assert record.data["registered_name"] == "cunet"
    saved = tmp_path / "out" / "mlflow-fallback" / record.data["path"]
    assert (saved / "MLmodel").is_file() and (saved / "artifacts" / "mse").is_dir()
    assert read_tracking_file(model_dir)["registered_model"] is None
