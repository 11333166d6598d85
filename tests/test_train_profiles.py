"""The paper profile: one documented command turns the default params into the paper's setup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_params
from pipeline.profiles import apply_profile, main, merge

REPO = Path(__file__).resolve().parents[1]


def test_merge_is_deep_and_replaces_leaves():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    assert merge(base, {"a": {"c": [5]}, "e": {"f": 1}}) == {
        "a": {"b": 1, "c": [5]},
        "d": 3,
        "e": {"f": 1},
    }


def test_paper_profile_applies_to_the_default_params(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    assert main([str(REPO / "profiles" / "paper.yaml"), "--params", str(params), "--check"]) == 0
    assert params.read_text() == before  # --check writes nothing
    assert main([str(REPO / "profiles" / "paper.yaml"), "--params", str(params)]) == 0
    p = load_params(params)
    assert p.base.pretrained == "imagenet" and p.data.source == "div2k"
    assert (p.train_cunet.generator, p.train_cugan.discriminator) == ("authors", "authors")
    assert p.train_cugan.schedule.milestones == (50_000, 100_000, 200_000, 300_000, 400_000)
    assert p.train_cugan.weights.gan == 0.005 and p.loader.batch_size == 16
    assert p.train_cunet.validation.set == "holdout"  # untouched keys of a merged mapping stay
    assert "# Training (stages/train.py" in params.read_text()  # comments survive


def test_a_bad_profile_changes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_cunet:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"train_cunet\.iteratons: unknown key"):
        apply_profile(bad, params)
    assert params.read_text() == before
