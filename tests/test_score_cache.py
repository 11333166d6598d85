"""The score cache gives the numbers the suite computes, bitwise, and only for the computation
that would give them: same pixels, same metric names, same suite identity."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline.condition import DEFAULT_SCALE
from pipeline.evaluation.score_cache import ScoreCache, pixels_digest
from pipeline.evaluation.specs import ModelSpec
from pipeline.evaluation.suite import MetricSuite
from tests import evalkit

NAMES = ("psnr_rgb", "ssim_y", "lpips", "dists")


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-cache")
    evalkit.make_eval_set(root, size=(36, 44))
    return root


def _evaluate(root, params, *, seed: int = 7):
    specs = [ModelSpec("cugan", "gan", root / "g")]
    # damaged: an untrained tiny net may give back its input exactly (then the input's pairs
    # are the model's, and come from the cache in the first run already)
    loaded = {"cugan": (evalkit.tiny_generator(seed=seed, damage=0.05), DEFAULT_SCALE)}
    return evalkit.evaluate_with_input(specs, root, params, loaded)


def _values(report):
    return [(r.model, r.setting, r.image, list(r.scores.items())) for r in report.rows]


class _Counting:
    """Counts the pairs the suite really scores (wraps MetricSuite.score_many)."""

    def __init__(self, monkeypatch):
        self.pairs = 0
        original = MetricSuite.score_many

        def counted(suite, restored, clean, names=None):
            self.pairs += len(restored)
            return original(suite, restored, clean, names)

        monkeypatch.setattr(MetricSuite, "score_many", counted)


def test_a_rerun_takes_every_number_from_the_cache_bitwise(evalset, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CUGAN_CACHE_DIR", str(tmp_path / "cache"))
    params = evalkit.tiny_params(gan_metrics=["lpips", "dists", "psnr_rgb"])
    counting = _Counting(monkeypatch)
    first = _evaluate(evalset, params)
    assert counting.pairs == 2 * 2 * 2  # 2 methods x 2 images x 2 settings, all computed
    entries = list((tmp_path / "cache" / "scores").rglob("*.json"))
    assert len(entries) == 8
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation.scoring"):
        second = _evaluate(evalset, params)
    assert counting.pairs == 8  # nothing computed again
    assert _values(second) == _values(first)  # float == float: bitwise for finite values
    assert "8 of 8 scored pair(s) from the score cache" in caplog.text

    off = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"score_cache": False})}
    )
    third = _evaluate(evalset, off)
    assert counting.pairs == 16  # computed again, and the same
    assert _values(third) == _values(first)


def test_other_pixels_or_another_model_are_computed(evalset, tmp_path, monkeypatch):
    monkeypatch.setenv("CUGAN_CACHE_DIR", str(tmp_path / "cache"))
    params = evalkit.tiny_params(gan_metrics=["lpips", "dists", "psnr_rgb"])
    _evaluate(evalset, params, seed=7)
    counting = _Counting(monkeypatch)
    other = _evaluate(evalset, params, seed=8)  # other weights, other restorations
    assert counting.pairs == 4  # the input's 4 pairs from the cache, the model's 4 computed
    fresh = _evaluate(
        evalset,
        params.model_copy(
            update={"evaluate": params.evaluate.model_copy(update={"score_cache": False})}
        ),
        seed=8,
    )
    assert _values(other) == _values(fresh)


def test_the_key_covers_pixels_names_and_the_suite(tmp_path):
    suite = MetricSuite(NAMES, pretrained="random")
    cache = ScoreCache(tmp_path, suite.identity())
    image = np.zeros((8, 9, 3), np.uint8)
    changed = image.copy()
    changed[3, 4, 1] = 1
    a, b = pixels_digest(image), pixels_digest(changed)
    assert a != b
    assert pixels_digest(image.reshape(9, 8, 3)) != a  # the shape counts, not just the bytes
    base = cache.key(a, a, NAMES)
    assert cache.key(b, a, NAMES) != base and cache.key(a, b, NAMES) != base
    assert cache.key(a, a, NAMES[:3]) != base
    cropped = ScoreCache(
        tmp_path, MetricSuite(NAMES, pretrained="random", crop_border=4).identity()
    )
    assert cropped.key(a, a, NAMES) != base
    other = MetricSuite(NAMES, pretrained="random")
    with torch.no_grad():
        next(other._perceptual["dists"].parameters()).add_(1e-6)  # other weights
    assert ScoreCache(tmp_path, other.identity()).key(a, a, NAMES) != base
    assert (
        ScoreCache(tmp_path, MetricSuite(NAMES, pretrained="random").identity()).key(a, a, NAMES)
        == base
    )  # the same suite built again: the same key
    with pytest.raises(TypeError, match="uint8"):
        pixels_digest(image.astype(np.float32))


def test_an_unreadable_entry_is_recomputed_and_rewritten(tmp_path, caplog):
    cache = ScoreCache(tmp_path, {"metrics": "x"})
    key = cache.key("r", "c", ["psnr_rgb"])
    cache.put(key, {"psnr_rgb": 31.25})
    assert cache.get(key, ["psnr_rgb"]) == {"psnr_rgb": 31.25}
    cache.path(key).write_text('{"format": 1, "scores": {"psnr_rgb": ')  # cut short
    with caplog.at_level(logging.WARNING):
        assert cache.get(key, ["psnr_rgb"]) is None
    assert "ignoring unreadable entry" in caplog.text
    assert cache.get(key, ["lpips"]) is None  # a name it does not hold: a miss
    cache.put(key, {"psnr_rgb": float("nan")})
    assert np.isnan(cache.get(key, ["psnr_rgb"])["psnr_rgb"])  # NaN survives the round trip
    assert (cache.hits, cache.misses) == (2, 2)


def test_an_unwritable_cache_costs_a_warning_only(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ScoreCache(blocker / "scores", {"metrics": "x"})
    with caplog.at_level(logging.WARNING):
        cache.put(cache.key("r", "c", ["psnr_rgb"]), {"psnr_rgb": 1.0})
    assert "cannot write" in caplog.text
