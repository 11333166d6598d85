"""The promotion gate against a real ``mlflow server`` (started here on a free port with a
sqlite store in tmp, killed at the end): what the registry answers decides the outcome.

* the alias does not exist -> "no champion": the candidate is promoted;
* the alias look-up answers 503 TEMPORARILY_UNAVAILABLE (a proxy in front of the server) or
  the server goes away mid-way -> RegistryError, one line, nothing promoted or tagged;
* promotion keeps ``previous``; ``cugan registry rollback`` moves the champion back.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.cli import main as cli
from pipeline.config import PromotionRule, TrackingParams
from pipeline.promotion import CHALLENGER, PREVIOUS, evaluate_and_promote, registered_candidate
from pipeline.tracking import (
    ModelRegistry,
    NotRegistered,
    RegistryError,
    TrackingTarget,
    limit_http_retries,
    write_tracking_file,
)
from tests import evalkit
from tests.mlflow_server import FaultProxy, mlflow_server

HTTP_VARS = (
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


@pytest.fixture
def bounded_http(monkeypatch):
    """The flow's HTTP limits (tracking params), removed again after the test."""
    for name in (*HTTP_VARS, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return lambda uri: limit_http_retries(TrackingParams(), uri)


def _rule(name: str) -> PromotionRule:
    return PromotionRule(
        model_name=name,
        kind="mse",
        metric="tiny/all/psnr_rgb",
        direction="max",
        model_dir=f"runs/train_{name}/model",
    )


def _trained(tmp_path, client, uri, name, seed, damage=0.0):
    """A version registered on the server, and the tracking.json its training run left."""
    version = evalkit.register_tiny(client, tmp_path, name, seed, damage=damage)
    model_dir = tmp_path / "repo" / f"runs/train_{name}/model"
    model_dir.mkdir(parents=True, exist_ok=True)
    target = TrackingTarget(mode="mlflow", uri=uri, run_id="r", fallback_dir=str(tmp_path / "fb"))
    write_tracking_file(model_dir, target, f"train_{name}", {"name": name, "version": version})
    return version, model_dir


def _promote(registry, rule, version, tmp_path):
    evalkit.make_eval_set(tmp_path / "sets")
    return evaluate_and_promote(
        registry,
        rule,
        candidate_version=version,
        alias="champion",
        eval_root=tmp_path / "sets",
        params=evalkit.tiny_params(),
        workdir=tmp_path / "work",
    )


def test_a_missing_alias_means_no_champion(server, tmp_path, bounded_http):
    bounded_http(server.uri)
    client, registry, rule = MlflowClient(server.uri), ModelRegistry(server.uri), _rule("gate1")
    v1, model_dir = _trained(tmp_path, client, server.uri, "gate1", seed=1)
    assert registry.alias_holder("gate1", "champion") is None  # the server says: no such alias
    assert registered_candidate(registry, rule, model_dir) == v1
    decision = _promote(registry, rule, v1, tmp_path)
    assert decision.promote and decision.reason == "no champion"
    assert registry.alias_holder("gate1", "champion").version == v1
    assert registry.alias_holder("gate1", CHALLENGER) is None
    assert registry.alias_holder("gate1", PREVIOUS) is None  # nothing was replaced


def test_an_unavailable_registry_promotes_nothing(server, tmp_path, bounded_http):
    """503 TEMPORARILY_UNAVAILABLE on the alias look-up used to read as "no champion" and
    promoted the candidate without a comparison."""
    client, registry, rule = MlflowClient(server.uri), ModelRegistry(server.uri), _rule("gate2")
    v1, _ = _trained(tmp_path, client, server.uri, "gate2", seed=1)
    client.set_registered_model_alias("gate2", "champion", v1)
    v2, model_dir = _trained(tmp_path, client, server.uri, "gate2", seed=2)
    with FaultProxy(server.uri, lambda path: "/registered-models/alias" in path) as proxy:
        limits = bounded_http(proxy.uri)
        assert limits["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        flaky = ModelRegistry(proxy.uri)
        # the tracking.json names the server; the flow's registry is the proxy in front of it
        write_tracking_file(
            model_dir,
            TrackingTarget(mode="mlflow", uri=proxy.uri, fallback_dir=str(tmp_path / "fb")),
            "train_gate2",
            {"name": "gate2", "version": v2},
        )
        assert registered_candidate(flaky, rule, model_dir) == v2  # other calls pass through
        with pytest.raises(RegistryError) as info:
            _promote(flaky, rule, v2, tmp_path)
        assert proxy.failed == 3  # the look-up, retried twice (tracking.http_max_retries)
    message = str(info.value)
    assert not isinstance(info.value, NotRegistered)
    assert message.startswith("models:/gate2@champion: ") and "503" in message, message
    assert "\n" not in message
    assert registry.alias_holder("gate2", "champion").version == v1  # untouched
    assert registry.alias_holder("gate2", CHALLENGER) is None
    assert not any(k.startswith("promotion.") for k in registry.version("gate2", v2).tags)


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b"<html>a gateway's page</html>"), (200, b'{"model_version": 7}'), (502, b"")],
)
def test_a_bad_answer_on_the_alias_promotes_nothing(server, tmp_path, bounded_http, status, body):
    """Not JSON, the wrong JSON, a bare 502: never "no champion"."""
    name = f"gate5{status}{len(body)}"
    client, rule = MlflowClient(server.uri), _rule(name)
    v1, _ = _trained(tmp_path, client, server.uri, name, seed=1)
    with FaultProxy(server.uri, lambda path: "/alias" in path, reply=(status, body)) as proxy:
        bounded_http(proxy.uri)
        with pytest.raises(RegistryError, match=rf"^models:/{name}@champion: ") as info:
            _promote(ModelRegistry(proxy.uri), rule, v1, tmp_path)
    assert not isinstance(info.value, NotRegistered) and "\n" not in str(info.value)
    assert ModelRegistry(server.uri).alias_holder(name, "champion") is None


def test_a_server_stopped_mid_way_promotes_nothing(server, tmp_path, bounded_http):
    client, rule = MlflowClient(server.uri), _rule("gate3")
    v1, model_dir = _trained(tmp_path, client, server.uri, "gate3", seed=1)
    proxy = FaultProxy(server.uri, lambda path: False).__enter__()
    bounded_http(proxy.uri)
    registry = ModelRegistry(proxy.uri)
    write_tracking_file(
        model_dir,
        TrackingTarget(mode="mlflow", uri=proxy.uri, fallback_dir=str(tmp_path / "fb")),
        "train_gate3",
        {"name": "gate3", "version": v1},
    )
    assert registered_candidate(registry, rule, model_dir) == v1
    proxy.__exit__(None, None, None)  # the "server" is gone: connection refused from now on
    with pytest.raises(RegistryError, match=r"^models:/gate3@champion: .*(refused|Max retries)"):
        _promote(registry, rule, v1, tmp_path)
    direct = ModelRegistry(server.uri)
    assert direct.alias_holder("gate3", "champion") is None
    assert direct.alias_holder("gate3", CHALLENGER) is None


def test_rollback_command(server, tmp_path, bounded_http, capsys):
    bounded_http(server.uri)
    client, registry, rule = MlflowClient(server.uri), ModelRegistry(server.uri), _rule("gate4")
    v1, _ = _trained(tmp_path, client, server.uri, "gate4", seed=2, damage=0.5)
    assert _promote(registry, rule, v1, tmp_path).promote
    v2, _ = _trained(tmp_path, client, server.uri, "gate4", seed=1)
    assert _promote(registry, rule, v2, tmp_path).promote  # the clean model beats the noisy one
    assert registry.alias_holder("gate4", PREVIOUS).version == v1

    assert cli(["registry", "rollback", "gate4", "--tracking-uri", server.uri]) == 0
    out = capsys.readouterr().out
    assert f"gate4: champion moved from v{v2} back to v{v1}" in out
    assert registry.alias_holder("gate4", "champion").version == v1
    assert registry.alias_holder("gate4", PREVIOUS) is None

    assert cli(["registry", "rollback", "gate4", "--tracking-uri", server.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "cugan: error: gate4: no 'previous' alias: nothing to roll back to (a promotion sets it)"
    )
    assert registry.alias_holder("gate4", "champion").version == v1
