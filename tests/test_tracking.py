"""The MLflow package against real sqlite stores in tmp_path: experiments carry the
model-training kind, plain runs, the registry's sorted errors, and the resolver of
``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` to a local generator checkpoint."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from pipeline.checkpoint import load_checkpoint
from pipeline.config import TrackingParams
from pipeline.tracking import (
    MissingExperiment,
    ModelRegistry,
    NotRegistered,
    RegistryError,
    create_run,
    end_run,
    ensure_experiment,
    log_to_run,
    parse_model_uri,
    recorded_run_id,
    resolve_model_uri,
    start_stage_run,
)
from pipeline.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from tests import evalkit

KIND = "custom_model_development"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUGAN_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = evalkit.sqlite_uri(tmp_path)
    return uri, MlflowClient(uri)


# ---------------------------------------------------------------------------------------------
# experiments


def test_created_experiments_are_model_training_experiments(store, tmp_path):
    uri, client = store
    assert EXPERIMENT_KIND == KIND and EXPERIMENT_KIND_TAG == "mlflow.experimentKind"
    exp_id = ensure_experiment(uri, "evaluate-x", artifact_location=tmp_path / "art")
    exp = client.get_experiment(exp_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == KIND
    assert exp.artifact_location == (tmp_path / "art").as_uri()
    assert ensure_experiment(uri, "evaluate-x") == exp_id  # found, not created twice
    # The training stages' experiment too (start_stage_run).
    target = start_stage_run(
        TrackingParams(uri=uri, experiment="train-x"), stage="s", out_dir=tmp_path
    )
    assert client.get_experiment(target.experiment_id).tags[EXPERIMENT_KIND_TAG] == KIND


def test_existing_experiment_without_the_kind_gets_it(store):
    uri, client = store
    bare = client.create_experiment("old")  # created before the tag existed
    inferred = client.create_experiment(
        "guessed", tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"}
    )
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(bare).tags
    for name in ("old", "guessed", "chosen"):
        ensure_experiment(uri, name)
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == KIND
    assert client.get_experiment(inferred).tags[EXPERIMENT_KIND_TAG] == KIND  # a UI guess
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


# ---------------------------------------------------------------------------------------------
# plain runs


def test_plain_runs_create_log_and_end(store, tmp_path):
    uri, client = store
    with pytest.raises(MissingExperiment, match="'absent' does not exist"):
        create_run(uri, "absent", run_name="x", create_experiment=False)
    parent = create_run(uri, "runs-x", run_name="parent", params={"a.b": "1"})
    child = create_run(
        uri,
        "runs-x",
        run_name="child",
        tags={"k": "v"},
        parent_run_id=parent,
        create_experiment=False,
    )
    note = tmp_path / "note.json"
    note.write_text("{}")
    log_to_run(
        uri,
        child,
        params={"p": "x" * 7000},
        metrics=[(s, {"m": 0.5 * s}) for s in range(1200)],  # > one batch of 1000
        tags={"t": 1},
        artifacts=[(note, "evaluation")],
    )
    end_run(uri, child, "FAILED")
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["k"] == "v"
    assert run.data.tags["t"] == "1" and len(run.data.params["p"]) == 6000
    assert len(client.get_metric_history(child, "m")) == 1200
    assert run.info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(child, "evaluation")] == ["evaluation/note.json"]
    assert client.get_run(parent).data.params == {"a.b": "1"}


def test_recorded_run_id(tmp_path):
    ckpt = evalkit.save_tiny(tmp_path / "model", seed=1)
    uri = "sqlite:////store.db"
    assert recorded_run_id(ckpt, uri, {"mlflow_run_id": "meta"}) == "meta"
    (ckpt / "tracking.json").write_text(
        json.dumps({"tracking_uri": uri, "run_id": "abc", "mode": "mlflow"})
    )
    assert recorded_run_id(ckpt, uri) == "abc"
    assert recorded_run_id(ckpt / "generator.safetensors", uri) == "abc"  # the file form
    assert recorded_run_id(ckpt, "sqlite:////other.db") is None  # another store's id
    (ckpt / "tracking.json").write_text(json.dumps({"run_id": "abc", "mode": "local"}))
    assert recorded_run_id(ckpt, uri) is None  # logged to local files: no run


# ---------------------------------------------------------------------------------------------
# registry and the models:/ resolver


def _register_pair(client, tmp_path, name: str) -> str:
    """A version whose artifacts hold artifacts/mse and artifacts/gan (a CUGAN stage's model)."""
    mse = evalkit.save_tiny(tmp_path / f"{name}-mse", seed=1)
    gan = evalkit.save_tiny(tmp_path / f"{name}-gan", seed=2)
    exp = client.create_experiment(f"reg-{name}", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(mse), artifact_path="model/artifacts/mse")
    client.log_artifacts(run.info.run_id, str(gan), artifact_path="model/artifacts/gan")
    client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    return str(client.create_model_version(name, source=source, run_id=run.info.run_id).version)


def test_parse_model_uri():
    assert parse_model_uri("models:/cunet/3") == parse_model_uri("models:/cunet/3/")
    ref = parse_model_uri("models:/cunet@champion")
    assert (ref.name, ref.version, ref.alias) == ("cunet", None, "champion")
    assert str(parse_model_uri("models:/cunet/3")) == "models:/cunet/3"
    assert str(ref) == "models:/cunet@champion"
    for bad in ("models:/cunet", "models:/cunet/v3", "runs:/abc/model", "models:/a/1@b"):
        with pytest.raises(RegistryError, match="not a registered model URI"):
            parse_model_uri(bad)


def test_resolve_version_and_alias_to_a_checkpoint(store, tmp_path):
    uri, client = store
    v1 = evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    v2 = evalkit.register_tiny(client, tmp_path, "cunet", seed=5)
    registry = ModelRegistry(uri)
    client.set_registered_model_alias("cunet", "champion", v1)

    by_version = resolve_model_uri(f"models:/cunet/{v2}", uri, tmp_path / "dl-v2")
    assert by_version.name == "mse" and (by_version / "generator.json").is_file()
    assert by_version.is_relative_to(tmp_path / "dl-v2")
    expected = evalkit.tiny_generator(seed=5).state_dict()
    got = load_checkpoint(by_version).model.state_dict()
    assert all(bool((got[k] == expected[k]).all()) for k in expected)  # v2's weights

    by_alias = resolve_model_uri("models:/cunet@champion", uri, tmp_path / "dl-champion")
    got = load_checkpoint(by_alias).model.state_dict()
    expected = evalkit.tiny_generator(seed=1).state_dict()
    assert all(bool((got[k] == expected[k]).all()) for k in expected)  # v1's weights

    holder = registry.alias_holder("cunet", "champion")
    assert (holder.version, holder.aliases, holder.uri) == (
        v1,
        ("champion",),
        f"models:/cunet/{v1}",
    )
    assert registry.latest_version("cunet").version == v2
    assert [v.version for v in registry.versions("cunet")] == [v1, v2]


def test_resolve_prefers_the_named_generator(store, tmp_path):
    uri, client = store
    v = _register_pair(client, tmp_path, "cugan")
    assert resolve_model_uri(f"models:/cugan/{v}", uri, tmp_path / "d1").name == "gan"
    mse = resolve_model_uri(f"models:/cugan/{v}", uri, tmp_path / "d2", prefer="mse")
    assert mse.name == "mse"
    with pytest.raises(RegistryError, match=r"2 generators.*none in a directory named 'other'"):
        resolve_model_uri(f"models:/cugan/{v}", uri, tmp_path / "d3", prefer="other")
    assert not (tmp_path / "d3").exists()  # nothing half-downloaded left behind


def test_missing_name_version_or_alias_is_one_line(store, tmp_path):
    uri, client = store
    evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    client.create_registered_model("empty")
    cases = {
        "models:/nope/1": "nope",
        "models:/cunet/7": "version=7",
        "models:/cunet@champion": "model 'cunet' has no alias 'champion'",
        "models:/nope@champion": "no registered model 'nope'",
        "models:/empty@champion": "model 'empty' has no alias 'champion'",
    }
    for model_uri, needle in cases.items():
        with pytest.raises(NotRegistered) as info:
            resolve_model_uri(model_uri, uri, tmp_path / "dl")
        message = str(info.value)
        assert needle in message and model_uri in message and "\n" not in message, message
    assert not (tmp_path / "dl").exists()


def test_alias_holder_tells_missing_from_failing(store, tmp_path, monkeypatch):
    uri, client = store
    registry = ModelRegistry(uri)
    assert registry.alias_holder("nope", "champion") is None  # no such model
    evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    assert registry.alias_holder("cunet", "champion") is None  # no such alias

    def unavailable(*args, **kwargs):
        raise MlflowException("store is down\nretry later", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(registry._client, "get_model_version_by_alias", unavailable)
    with pytest.raises(RegistryError, match=r"^models:/cunet@champion: store is down$") as info:
        registry.alias_holder("cunet", "champion")
    assert not isinstance(info.value, NotRegistered)


def test_version_tags_and_aliases(store, tmp_path):
    uri, client = store
    v1 = evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    v2 = evalkit.register_tiny(client, tmp_path, "cunet", seed=2)
    registry = ModelRegistry(uri)
    registry.set_version_tags("cunet", v2, {"promotion.decision": "promoted", "n": 3})
    registry.set_alias("cunet", "champion", v1)
    registry.set_alias("cunet", "champion", v2)  # moves
    registry.set_alias("cunet", "previous", v1)
    assert registry.version("cunet", v2).tags == {"promotion.decision": "promoted", "n": "3"}
    assert registry.alias_holder("cunet", "champion").version == v2
    assert registry.alias_holder("cunet", "previous").version == v1
    registry.delete_alias("cunet", "previous")
    assert registry.alias_holder("cunet", "previous") is None
    with pytest.raises(NotRegistered, match=r"models:/cunet@champion -> version 9: .*version=9"):
        registry.set_alias("cunet", "champion", "9")
