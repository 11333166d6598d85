"""Tracking outages against a real ``mlflow server`` (started here on a free port with a sqlite
store in tmp, killed at the end):

* a stage whose server does not answer falls back to local files at once (one warning), with
  MLflow's HTTP retries bounded for its processes (the Ray workers inherit them); it trains,
  logs and saves its model locally; once the server is up, ``cugan tracking sync`` replays
  params, tags, the per-iteration metric history (steps and times), artifacts, the model and
  its registration; tracking.json then reads as the real run; a second sync adds nothing;
* a server that dies part-way: the run goes on in local files and a sync completes the SAME
  run once the server is back.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.cli import main as cli
from pipeline.config import PromotionRule, parse_params
from pipeline.promotion import registered_candidate
from pipeline.tracking import (
    PARENT_ENV,
    ModelRegistry,
    RunLog,
    flatten_params,
    read_tracking_file,
    recorded_run_id,
    start_stage_run,
    write_tracking_file,
)
from pipeline.tracking.journal import read_records
from pipeline.tracking.sync import LOCAL_ID_TAG, sync_run
from pipeline.train import trainer
from pipeline.train.loop import run_worker
from pipeline.train.pyfunc import log_saved_model
from pipeline.train.session import LocalSession
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.worker_config import WorkerConfig, stage_params
from tests import evalkit
from tests.mlflow_server import MlflowServer

ITERATIONS = 20
HTTP_VARS = (
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server, started and stopped by the tests themselves (same port, same store)."""
    running = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    quiet = ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    for name in (*HTTP_VARS, *quiet, "MLFLOW_TRACKING_URI", PARENT_ENV):
        monkeypatch.delenv(name, raising=False)  # and whatever a test sets is removed after it
    monkeypatch.chdir(tmp_path)


def _params(uri, tmp_path):
    return parse_params(
        {
            "loader": {"batch_size": 2, "crop": 32},
            "train_cunet": {
                "generator": "tiny",
                "iterations": ITERATIONS,
                "log_every": 1,
                "checkpoint_every": ITERATIONS,
            },
            "tracking": {
                "uri": uri,
                "experiment": "sync-test",
                "artifact_location": str(tmp_path / "mlartifacts"),
            },
        }
    )


def _train(params, target, tmp_path):
    """The worker's loop (rank 0 logs through its own RunLog, as under Ray)."""
    config = WorkerConfig(params=params, stage="cunet", threads=1, tracking=target)
    hooks = TestHooks(synthetic=SyntheticData(num_samples=4, seed=0))
    return run_worker(config, LocalSession(tmp_path / "ray-run"), hooks)


def _stage_end(params, target, runlog, out):
    """What run_stage does after training: the checkpoint + tracking.json, the model."""
    model_dir = evalkit.save_tiny(out / "model", seed=1)
    write_tracking_file(model_dir, target, "train_cunet")
    sp = stage_params(params, "cunet")
    model_uri = trainer._log_model(params, "cunet", sp, target, runlog, model_dir, None)
    runlog.finish("FINISHED")
    return model_dir, model_uri


def _counts(client, exp_id, run_id):
    runs = client.search_runs([exp_id])
    history = client.get_metric_history(run_id, "loss/mse")
    artifacts = [a.path for a in client.list_artifacts(run_id, "modulation")]
    versions = client.search_model_versions("name = 'cunet'")
    return len(runs), len(history), artifacts, len(versions)


def test_a_dead_server_falls_back_at_once_and_sync_replays_everything(
    server, tmp_path, caplog, capsys
):
    server.stop()  # the port is closed: nothing listens there yet
    params = _params(server.uri, tmp_path)
    out = tmp_path / "runs" / "train_cunet"
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        target = start_stage_run(
            params.tracking, stage="train_cunet", out_dir=out, tags={"git.commit": "abc123"}
        )
    waited = time.monotonic() - began
    # Not a benchmark: MLflow's own retries stalled this for ~4 minutes (290 s measured).
    assert waited < 60, f"falling back took {waited:.0f} s"
    assert target.mode == "local" and target.local_id and target.run_id is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cugan tracking sync" in warnings[0].getMessage()
    # Later calls of this process and of its Ray workers (which inherit MLFLOW_HTTP_*) are
    # bounded to seconds too.
    assert {name: os.environ[name] for name in HTTP_VARS} == {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    assert all(name.startswith(trainer._ENV_PREFIXES) for name in HTTP_VARS)

    runlog = RunLog(target)
    runlog.log_params(flatten_params(params.model_dump(mode="json")))
    runlog.set_tags({"extra": "tag"})
    _train(params, target, tmp_path)
    runlog.log_image(np.full((8, 8, 3), 200, np.uint8), "modulation/grid.png")
    runlog.log_dict({"note": 1}, "info/note.json")
    model_dir, model_uri = _stage_end(params, target, runlog, out)
    assert model_uri is None  # saved locally, not logged
    before = (model_dir / "tracking.json").read_text()
    assert json.loads(before)["registered_model"] is None
    records = list(read_records(out / "mlflow-fallback"))
    assert {r.local_id for r in records} == {target.local_id}
    kinds = [r.kind for r in records]
    assert kinds[:2] == ["params", "tags"] and kinds[-2:] == ["model", "status"]
    logged = {  # step -> time of the record that carried loss/mse
        row["step"]: r.time_ms
        for r in records
        if r.kind == "metrics"
        for row in r.data
        if "loss/mse" in row["metrics"]
    }
    assert sorted(logged) == list(range(1, ITERATIONS + 1))

    server.start()  # the server is back
    assert cli(["tracking", "sync", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "record(s) replayed" in summary and "model cunet v1" in summary, summary

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("sync-test")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`{LOCAL_ID_TAG}` = '{target.local_id}'")
    run_id = run.info.run_id
    assert run.info.run_name == "train_cunet" and run.info.status == "FINISHED"
    assert run.data.tags["git.commit"] == "abc123" and run.data.tags["extra"] == "tag"
    assert run.data.tags["stage"] == "train_cunet"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["git.commit"] == "abc123" and parent.info.status == "FINISHED"
    assert run.data.params["train_cunet.iterations"] == str(ITERATIONS)
    assert run.data.params == flatten_params(params.model_dump(mode="json"))
    history = client.get_metric_history(run_id, "loss/mse")
    assert {m.step: m.timestamp for m in history} == logged  # steps and the times they had
    assert run.info.start_time < min(logged.values())
    assert run.info.end_time == records[-1].time_ms
    assert [a.path for a in client.list_artifacts(run_id, "modulation")] == ["modulation/grid.png"]
    assert [a.path for a in client.list_artifacts(run_id, "info")] == ["info/note.json"]
    version = client.get_model_version("cunet", "1")
    assert version.run_id == run_id
    got = ModelRegistry(server.uri).download("cunet", "1", tmp_path / "dl", prefer="mse")
    expected = evalkit.tiny_generator(seed=1).state_dict()
    weights = load_checkpoint(got).model.state_dict()
    assert all(bool((weights[k] == expected[k]).all()) for k in expected)

    # tracking.json (a DVC output) is as the stage wrote it, and reads as the real run
    assert (model_dir / "tracking.json").read_text() == before
    record = read_tracking_file(model_dir)
    assert (record["mode"], record["run_id"], record["tracking_uri"]) == (
        "mlflow",
        run_id,
        server.uri,
    )
    assert record["registered_model"] == {"name": "cunet", "version": "1"}
    assert recorded_run_id(model_dir, server.uri) == run_id  # evaluation logs into it
    rule = PromotionRule(
        model_name="cunet",
        kind="mse",
        metric="h/all/psnr_rgb",
        direction="max",
        model_dir=str(model_dir),
    )
    assert registered_candidate(ModelRegistry(server.uri), rule, model_dir) == "1"

    # a second sync adds nothing
    counted = _counts(client, exp.experiment_id, run_id)
    assert counted == (2, ITERATIONS, ["modulation/grid.png"], 1)
    assert cli(["tracking", "sync", str(out)]) == 0
    assert "nothing to sync" in capsys.readouterr().out
    assert _counts(client, exp.experiment_id, run_id) == counted
    # ... and neither does replaying every record again after the mark is lost (a sync that
    # died between a record and its mark): runs, metrics and versions are found, not doubled
    (out / "mlflow-fallback" / "synced.json").unlink()
    again = sync_run(out, log_model=log_saved_model)
    assert again.records == len(records) and again.created == []
    assert _counts(client, exp.experiment_id, run_id) == counted


def test_a_server_dying_mid_run_is_completed_by_a_sync(server, tmp_path, caplog):
    if not server.running:
        server.start()
    params = _params(server.uri, tmp_path)
    out = tmp_path / "runs" / "train_cunet"
    target = start_stage_run(params.tracking, stage="train_cunet", out_dir=out)
    assert target.mode == "mlflow"
    runlog = RunLog(target)
    runlog.log_params({"a": "1"})
    runlog.log_metrics([(1, {"loss/mse": 1.0})])
    server.stop()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        for step in range(2, 6):
            runlog.log_metrics([(step, {"loss/mse": 1.0 / step})])
    assert time.monotonic() - began < 60  # bounded retries, not minutes
    assert runlog.fell_back
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    runlog.log_image(np.zeros((8, 8, 3), np.uint8), "modulation/late.png")
    runlog.finish()
    model_dir = evalkit.save_tiny(out / "model", seed=3)
    write_tracking_file(model_dir, target, "train_cunet")

    server.start()
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(target.run_id, "loss/mse")] == [1]
    report = sync_run(out)
    assert report.joined == [target.run_id] and report.created == []
    assert report.metrics == 4 and report.artifacts == 1
    run = client.get_run(target.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(target.run_id, "loss/mse")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert [a.path for a in client.list_artifacts(target.run_id, "modulation")] == [
        "modulation/late.png"
    ]
    assert read_tracking_file(model_dir)["run_id"] == target.run_id
    assert sync_run(out).records == 0
    assert len(client.get_metric_history(target.run_id, "loss/mse")) == 5
