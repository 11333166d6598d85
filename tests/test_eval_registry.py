"""Registry URIs in evaluation specs (``NAME:KIND:models:/NAME@ALIAS``), against a real sqlite
MLflow store: resolved through pipeline.tracking.resolve_model_uri to a local checkpoint, scored
exactly like that checkpoint, and a missing name, version or alias is one clear line."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline.evaluation.plan import plan_evaluation
from pipeline.evaluation.scoring import evaluate_models, score_plan
from pipeline.evaluation.specs import ModelSpec, parse_model_spec
from pipeline.evaluation.terms import EvalError
from tests import evalkit


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUGAN_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = evalkit.sqlite_uri(tmp_path)
    return uri, MlflowClient(uri)


def test_parse_model_spec_keeps_a_registry_uri():
    spec = parse_model_spec("cunet:mse:models:/cunet@champion")
    assert (spec.name, spec.kind, spec.uri) == ("cunet", "mse", "models:/cunet@champion")
    assert parse_model_spec("cugan:gan:models:/cugan/3").uri == "models:/cugan/3"
    assert parse_model_spec("cunet:mse:runs/train_cunet/model").uri is None


def test_registry_spec_is_scored_like_its_checkpoint(store, tmp_path):
    uri, client = store
    evalkit.make_eval_set(tmp_path / "sets")
    v1 = evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    evalkit.register_tiny(client, tmp_path, "cunet", seed=5)
    client.set_registered_model_alias("cunet", "champion", v1)
    params = evalkit.tiny_params()

    plan = plan_evaluation(
        [parse_model_spec("cunet:mse:models:/cunet@champion")],
        params,
        tracking_uri=uri,
        registry_dir=tmp_path / "dl",
    )
    spec = plan.models[0]
    assert spec.uri == "models:/cunet@champion" and spec.path.is_relative_to(tmp_path / "dl")
    report = score_plan(plan, tmp_path / "sets", params, progress=False)
    local = evalkit.save_tiny(tmp_path / "local", seed=1)  # the weights of v1
    direct = evaluate_models(
        [ModelSpec("cunet", "mse", local)], tmp_path / "sets", params, progress=False
    )
    assert [r.scores for r in report.rows if r.model == "cunet"] == [r.scores for r in direct.rows]
    assert report.info()["models"]["cunet"]["uri"] == "models:/cunet@champion"


@pytest.mark.parametrize(
    ("model_uri", "needle"),
    [
        ("models:/nope@champion", "no registered model 'nope'"),
        ("models:/cunet@champion", "model 'cunet' has no alias 'champion'"),
        ("models:/cunet/7", "version=7"),
    ],
)
def test_missing_name_alias_or_version_is_one_line(store, tmp_path, model_uri, needle):
    uri, client = store
    evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    with pytest.raises(EvalError) as err:
        plan_evaluation(
            [parse_model_spec(f"cunet:mse:{model_uri}")],
            evalkit.tiny_params(),
            tracking_uri=uri,
            registry_dir=tmp_path / "dl",
        )
    message = str(err.value)
    assert message.startswith("model cunet: ") and needle in message and model_uri in message
    assert "\n" not in message


def test_stage_evaluates_a_registry_uri(store, tmp_path):
    from stages.evaluate import main

    uri, client = store
    evalkit.make_eval_set(tmp_path / "sets")
    version = evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "base": {"pretrained": "random"},
                "evalsets": {"settings": [list(s) for s in evalkit.SETTINGS]},
                "evaluate": {"sets": ["tiny"], "device": "cpu", "figures": {"enabled": False}},
            }
        )
    )
    args = ["--params", str(params), "--evalsets", str(tmp_path / "sets"), "--no-mlflow"]
    rc = main(
        [
            *args,
            "--model",
            f"cunet:mse:models:/cunet/{version}",
            "--out",
            "out",
            "--tracking-uri",
            uri,
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["info"]["models"]["cunet"]["uri"] == f"models:/cunet/{version}"
    assert set(metrics["means"]) == {"cunet", "input"}
    rc = main(
        [*args, "--model", "cunet:mse:models:/cunet@gone", "--out", "out2", "--tracking-uri", uri]
    )
    assert rc == 1
