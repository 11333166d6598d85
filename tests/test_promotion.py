"""The champion rule: pure decisions, the rules' validation, the candidate a training run
registered, and the registry round trip (MLflow with a sqlite store in tmp_path): a worse
candidate is refused, a better one takes the alias, both scores recorded. The behaviour that
depends on a tracking SERVER (alias missing vs. server error) is in test_promotion_server.py."""

from __future__ import annotations

import math

import pytest

from pipeline.config import ConfigError, PromotionRule, parse_params
from pipeline.promotion import (
    CHALLENGER,
    PREVIOUS,
    Decision,
    PromotionError,
    decide,
    evaluate_and_promote,
    registered_candidate,
    rollback,
)
from pipeline.tracking import ModelRegistry, RegistryError, TrackingTarget, write_tracking_file
from tests import evalkit

MAX = PromotionRule(
    model_name="cunet", kind="mse", metric="tiny/all/psnr_rgb", direction="max", model_dir="m"
)
MIN = PromotionRule(
    model_name="cugan", kind="gan", metric="tiny/all/lpips", direction="min", model_dir="m"
)


@pytest.mark.parametrize(
    ("rule", "cand", "champ", "promote"),
    [
        (MAX, 30.0, 29.0, True),
        (MAX, 29.0, 30.0, False),
        (MAX, 30.0, 30.0, False),  # a tie keeps the champion
        (MIN, 0.10, 0.20, True),
        (MIN, 0.20, 0.10, False),
        (MIN, 0.10, 0.10, False),
        (MAX, 30.0, None, True),  # no champion yet
        (MAX, math.nan, 20.0, False),
        (MIN, math.inf, None, False),
        # a non-finite CHAMPION score proves nothing either: refuse (it used to promote)
        (MAX, 30.0, math.nan, False),
        (MAX, 30.0, -math.inf, False),
        (MIN, 0.10, math.inf, False),
        (MIN, 0.10, math.nan, False),
    ],
)
def test_decide(rule, cand, champ, promote):
    d = decide(cand, champ, rule)
    assert d.promote is promote, d.reason
    assert (
        (d.candidate_score, d.champion_score) == (cand, champ)
        or math.isnan(cand)
        or (champ is not None and math.isnan(champ))
    )
    if champ is not None and not math.isfinite(champ):
        assert "champion score is not finite" in d.reason


def _rule(**changes):
    raw = {"model_name": "cunet", "kind": "mse", "metric": "holdout/all/psnr_rgb"}
    raw.update({"direction": "max", "model_dir": "runs/train_cunet/model", **changes})
    return {"retrain": {"rules": [raw]}}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"direction": "min"}, "direction must be 'max' for psnr_rgb (got 'min')"),
        ({"metric": "holdout/all/ssim_y", "direction": "min"}, "direction must be 'max'"),
        ({"metric": "holdout/all/lpips", "direction": "max"}, "direction must be 'min'"),
        ({"metric": "holdout/all/dists", "direction": "max"}, "direction must be 'min'"),
        ({"metric": "holdout/all/psnr"}, "metric 'holdout/all/psnr' ends in none of"),
        ({"kind": None}, "retrain.rules.0.kind: "),
        ({"model_dir": None}, "retrain.rules.0.model_dir: "),
    ],
)
def test_rules_are_checked_when_params_load(changes, expected):
    raw = _rule(**changes)
    raw["retrain"]["rules"][0] = {k: v for k, v in raw["retrain"]["rules"][0].items() if v}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert message.startswith("params.yaml: retrain.rules.0") and expected in message, message
    assert "\n" not in message
    parse_params(_rule())  # the fitting rule loads
    parse_params(_rule(kind="gan", metric="holdout/all/lpips", direction="min"))


def test_decide_min_delta():
    rule = PromotionRule(**{**MAX.model_dump(), "metric": "s/all/psnr_rgb", "min_delta": 0.1})
    assert not decide(30.05, 30.0, rule).promote
    assert decide(30.2, 30.0, rule).promote
    rule = PromotionRule(**{**MIN.model_dump(), "metric": "s/all/lpips", "min_delta": 0.01})
    assert not decide(0.195, 0.2, rule).promote
    assert decide(0.18, 0.2, rule).promote


def test_decide_refuses_random_backbones_unless_allowed():
    d = decide(0.1, 0.2, MIN, random_backbones=True)
    assert not d.promote and "random backbone" in d.reason
    allowed = PromotionRule(**{**MIN.model_dump(), "allow_random_backbones": True})
    assert decide(0.1, 0.2, allowed, random_backbones=True).promote


def test_decide_same_version_is_not_a_promotion():
    d = decide(31.0, 30.0, MAX, candidate_version="3", champion_version="3")
    assert not d.promote and "already holds" in d.reason


def test_decision_tags_record_both_scores():
    tags = decide(30.5, 30.0, MAX, candidate_version="2", champion_version="1").tags()
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.candidate_score"] == "30.5"
    assert tags["promotion.champion_score"] == "30"
    assert tags["promotion.champion_version"] == "1"
    assert tags["promotion.metric"] == "tiny/all/psnr_rgb"
    assert Decision(False, "r", "m", "max", 1.0, None).tags()["promotion.champion_score"] == "none"


# ---------------------------------------------------------------------------------------------
# registry round trip


def register(client, tmp_path, name: str, seed: int, damage: float) -> str:
    return evalkit.register_tiny(client, tmp_path, name, seed, damage=damage)


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    evalkit.make_eval_set(tmp_path / "sets")
    uri = evalkit.sqlite_uri(tmp_path)
    return ModelRegistry(uri), MlflowClient(uri)


def test_promotion_refuses_worse_and_accepts_better(registry, tmp_path):
    registry, client = registry
    params = evalkit.tiny_params()
    kwargs = {"alias": "champion", "eval_root": tmp_path / "sets", "params": params}

    v1 = register(client, tmp_path, "cunet", seed=1, damage=0.0)
    d1 = evaluate_and_promote(
        registry, MAX, workdir=tmp_path / "w1", candidate_version=v1, **kwargs
    )
    assert d1.promote and d1.champion_score is None  # first version: no champion to beat
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1

    v2 = register(client, tmp_path, "cunet", seed=2, damage=0.5)  # noisy weights: worse
    d2 = evaluate_and_promote(
        registry, MAX, workdir=tmp_path / "w2", candidate_version=v2, **kwargs
    )
    assert not d2.promote
    assert d2.candidate_score < d2.champion_score
    assert (d2.candidate_version, d2.champion_version) == (v2, v1)
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1
    assert str(client.get_model_version_by_alias("cunet", CHALLENGER).version) == v2
    tags = client.get_model_version("cunet", v2).tags
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["promotion.candidate_score"]) == pytest.approx(d2.candidate_score, rel=1e-5)
    assert float(tags["promotion.champion_score"]) == pytest.approx(d2.champion_score, rel=1e-5)

    # The champion's score is recomputed on today's data, equal to v1's own first score.
    assert d2.champion_score == pytest.approx(d1.candidate_score, rel=1e-12)

    v3 = register(client, tmp_path, "cunet", seed=1, damage=0.0)  # v1's weights: a tie
    d3 = evaluate_and_promote(
        registry, MAX, workdir=tmp_path / "w3", candidate_version=v3, **kwargs
    )
    assert not d3.promote and d3.candidate_score == pytest.approx(d3.champion_score)

    # A better model: v1 damaged so the champion is worse, then a clean candidate.
    client.set_registered_model_alias("cunet", "champion", v2)
    d4 = evaluate_and_promote(
        registry, MAX, workdir=tmp_path / "w4", candidate_version=v3, **kwargs
    )
    assert d4.promote and d4.candidate_score > d4.champion_score
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v3
    assert client.get_model_version("cunet", v3).tags["promotion.decision"] == "promoted"
    # the champion it replaced is kept as `previous`; the winner no longer challenges
    assert str(client.get_model_version_by_alias("cunet", PREVIOUS).version) == v2
    assert registry.alias_holder("cunet", CHALLENGER) is None

    # one command puts the previous champion back, once
    done = rollback(registry, "cunet")
    assert (done.restored, done.demoted) == (v2, v3)
    assert "moved from v3 back to v2" in done.summary()
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v2
    assert "promotion.rolled_back" in client.get_model_version("cunet", v3).tags
    with pytest.raises(PromotionError, match=r"^cunet: no 'previous' alias: nothing to roll back"):
        rollback(registry, "cunet")


def test_promotion_without_a_registered_version_fails(registry, tmp_path):
    """No version registered by the run: one line, nothing judged (it used to be a silent
    no-op, and with older versions in the registry the newest of them was judged as new)."""
    registry, _ = registry
    model_dir = tmp_path / "runs" / "train_cunet" / "model"
    with pytest.raises(PromotionError, match=r"^cunet: no tracking.json in .*: no training run"):
        registered_candidate(registry, MAX, model_dir)
    model_dir.mkdir(parents=True)
    write_tracking_file(model_dir, TrackingTarget(mode="mlflow", uri=registry.tracking_uri), "s")
    with pytest.raises(PromotionError, match="registered no model"):
        registered_candidate(registry, MAX, model_dir)


def _record(model_dir, uri, registered, mode="mlflow"):
    model_dir.mkdir(parents=True, exist_ok=True)
    target = TrackingTarget(mode=mode, uri=uri, run_id="r", fallback_dir=str(model_dir.parent))
    write_tracking_file(model_dir, target, "train_cunet", registered)


def test_the_candidate_is_the_version_the_run_registered(registry, tmp_path):
    registry, client = registry
    uri = registry.tracking_uri
    model_dir = tmp_path / "runs" / "train_cunet" / "model"
    v1 = register(client, tmp_path, "cunet", seed=1, damage=0.0)
    v2 = register(client, tmp_path, "cunet", seed=2, damage=0.0)  # newer, NOT this run's
    _record(model_dir, uri, {"name": "cunet", "version": v1})
    assert registered_candidate(registry, MAX, model_dir) == v1 != registry.latest_version("cunet")

    # the registration fell back to local files: the newest old version is NOT judged as new
    _record(model_dir, uri, None, mode="local")
    with pytest.raises(PromotionError) as info:
        registered_candidate(registry, MAX, model_dir)
    assert "logged to local files" in str(info.value) and "cugan tracking sync" in str(info.value)
    assert v2 == registry.latest_version("cunet").version

    _record(model_dir, uri, {"name": "cugan", "version": v1})
    with pytest.raises(PromotionError, match="registered 'cugan', not 'cunet'"):
        registered_candidate(registry, MAX, model_dir)
    _record(model_dir, "sqlite:////elsewhere.db", {"name": "cunet", "version": v1})
    with pytest.raises(PromotionError, match=r"registered into sqlite:////elsewhere\.db"):
        registered_candidate(registry, MAX, model_dir)
    _record(model_dir, uri, {"name": "cunet", "version": "9"})
    with pytest.raises(PromotionError, match="the version the training run registered is gone"):
        registered_candidate(registry, MAX, model_dir)


def _register_pair(client, tmp_path, name, *, mse_damage, gan_damage) -> str:
    """A CUGAN-stage version: artifacts/mse (the CUnet it started from) + artifacts/gan."""
    mse = evalkit.save_tiny(tmp_path / f"{name}-mse-{mse_damage}", seed=1, damage=mse_damage)
    gan = evalkit.save_tiny(tmp_path / f"{name}-gan-{gan_damage}", seed=2, damage=gan_damage)
    exp = client.get_experiment_by_name("registry-test") or None
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            "registry-test", artifact_location=(tmp_path / "mlartifacts").as_uri()
        )
    )
    run = client.create_run(exp_id).info.run_id
    client.log_artifacts(run, str(mse), artifact_path="model/artifacts/mse")
    client.log_artifacts(run, str(gan), artifact_path="model/artifacts/gan")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run).info.artifact_uri}/model"
    return str(client.create_model_version(name, source=source, run_id=run).version)


def test_a_rule_scores_the_kind_it_names(registry, tmp_path):
    """A `cugan` rule on PSNR with kind gan scores the GAN generator, not the bundled CUnet
    (which the metric name alone would have picked); kind mse scores the CUnet."""
    from pipeline.evaluation.scoring import evaluate_models
    from pipeline.evaluation.specs import ModelSpec

    registry, client = registry
    params = evalkit.tiny_params()
    v = _register_pair(client, tmp_path, "cugan", mse_damage=0.0, gan_damage=0.3)
    rule = PromotionRule(
        model_name="cugan", kind="gan", metric="tiny/all/psnr_rgb", direction="max", model_dir="m"
    )
    common = {"alias": "champion", "eval_root": tmp_path / "sets", "params": params}
    d = evaluate_and_promote(registry, rule, candidate_version=v, workdir=tmp_path / "g", **common)
    gan_dir = registry.download("cugan", v, tmp_path / "direct", prefer="gan", strict=True)
    mse_dir = gan_dir.parent / "mse"
    direct = evaluate_models(
        [ModelSpec("gan", "gan", gan_dir), ModelSpec("mse", "mse", mse_dir)],
        tmp_path / "sets",
        params,
        progress=False,
    )
    assert d.candidate_score == pytest.approx(direct.score("gan", "tiny/all/psnr_rgb"), rel=1e-12)
    assert d.candidate_score != pytest.approx(direct.score("mse", "tiny/all/psnr_rgb"), rel=1e-3)

    # a cunet version has no GAN generator: a gan rule on it fails, it scores no stand-in
    v1 = register(client, tmp_path, "cunet", seed=1, damage=0.0)
    gan_rule = PromotionRule(**{**rule.model_dump(), "model_name": "cunet"})
    with pytest.raises(RegistryError, match="no 'gan' generator in its artifacts"):
        evaluate_and_promote(
            registry, gan_rule, candidate_version=v1, workdir=tmp_path / "c", **common
        )
    # a metric the kind is not scored with fails before anything is evaluated
    ssim = PromotionRule(**{**rule.model_dump(), "metric": "tiny/all/ssim_y"})
    with pytest.raises(PromotionError, match=r"evaluate.gan_metrics .* lack 'ssim_y'"):
        evaluate_and_promote(registry, ssim, candidate_version=v, workdir=tmp_path / "s", **common)
