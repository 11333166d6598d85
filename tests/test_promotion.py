"""The champion rule: pure decisions, and the registry round trip (MLflow with a sqlite store in
tmp_path): a worse candidate is refused, a better one takes the alias, both scores recorded."""

from __future__ import annotations

import math

import pytest

from pipeline.config import PromotionRule
from pipeline.promotion import Decision, decide, evaluate_and_promote
from pipeline.tracking import ModelRegistry
from tests import evalkit

MAX = PromotionRule(model_name="cunet", metric="tiny/all/psnr_rgb", direction="max")
MIN = PromotionRule(model_name="cugan", metric="tiny/all/lpips", direction="min")


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
    ],
)
def test_decide(rule, cand, champ, promote):
    d = decide(cand, champ, rule)
    assert d.promote is promote, d.reason
    assert (d.candidate_score, d.champion_score) == (cand, champ) or math.isnan(cand)


def test_decide_min_delta():
    rule = PromotionRule(model_name="m", metric="s/all/psnr_rgb", direction="max", min_delta=0.1)
    assert not decide(30.05, 30.0, rule).promote
    assert decide(30.2, 30.0, rule).promote
    rule = PromotionRule(model_name="m", metric="s/all/lpips", direction="min", min_delta=0.01)
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
    d1 = evaluate_and_promote(registry, MAX, workdir=tmp_path / "w1", **kwargs)
    assert d1.promote and d1.champion_score is None  # first version: no champion to beat
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1

    v2 = register(client, tmp_path, "cunet", seed=2, damage=0.5)  # noisy weights: worse
    d2 = evaluate_and_promote(registry, MAX, workdir=tmp_path / "w2", **kwargs)
    assert not d2.promote
    assert d2.candidate_score < d2.champion_score
    assert (d2.candidate_version, d2.champion_version) == (v2, v1)
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1
    tags = client.get_model_version("cunet", v2).tags
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["promotion.candidate_score"]) == pytest.approx(d2.candidate_score, rel=1e-5)
    assert float(tags["promotion.champion_score"]) == pytest.approx(d2.champion_score, rel=1e-5)

    # The champion's score is recomputed on today's data, equal to v1's own first score.
    assert d2.champion_score == pytest.approx(d1.candidate_score, rel=1e-12)

    v3 = register(client, tmp_path, "cunet", seed=1, damage=0.0)  # v1's weights: a tie
    d3 = evaluate_and_promote(registry, MAX, workdir=tmp_path / "w3", **kwargs)
    assert not d3.promote and d3.candidate_score == pytest.approx(d3.champion_score)

    # A better model: v1 damaged so the champion is worse, then a clean candidate.
    client.set_registered_model_alias("cunet", "champion", v2)
    d4 = evaluate_and_promote(
        registry, MAX, workdir=tmp_path / "w4", candidate_version=v3, **kwargs
    )
    assert d4.promote and d4.candidate_score > d4.champion_score
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v3
    assert client.get_model_version("cunet", v3).tags["promotion.decision"] == "promoted"


def test_promotion_without_versions_is_a_no_op(registry, tmp_path):
    d = evaluate_and_promote(
        registry[0],
        MAX,
        alias="champion",
        eval_root=tmp_path / "sets",
        params=evalkit.tiny_params(),
        workdir=tmp_path / "w",
    )
    assert d is None
