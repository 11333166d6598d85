"""The faster evaluation computes the same numbers, bitwise: LPIPS/DISTS with the clean image's
features computed once equal the one-pair calls the evaluation made before, and a whole report
equals the one-pair loop. (Speed lives in benchmarks/evaluate.py, never in a test.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.condition import DEFAULT_SCALE
from pipeline.degradation import to_tensor
from pipeline.evaluation.specs import ModelSpec, parse_setting_key
from pipeline.evaluation.suite import MetricSuite
from pipeline.imageio import read_rgb8
from pipeline.inference import restore
from pipeline.metrics import DISTSMetric, LPIPSMetric, psnr, ssim
from tests import evalkit

ALL = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips", "dists")


def _one_pair(name, out, clean, lp, di) -> float:
    """One metric on one pair, as the evaluation computed it before this change."""
    if name in ("lpips", "dists"):
        return float((lp if name == "lpips" else di)(out, clean)[0])
    fn = psnr if name.startswith("psnr") else ssim
    return float(fn(out, clean, y_channel=name.endswith("_y"))[0])


def _quantised(seed: int, n: int, h: int, w: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.round(torch.rand(1, 3, h, w, generator=gen) * 255) / 255 for _ in range(n)]


@pytest.mark.parametrize("cls", [LPIPSMetric, DISTSMetric])
def test_reference_block_computes_the_clean_features_once_bitwise(cls):
    metric = cls("random")
    clean = _quantised(0, 1, 37, 45)[0]
    restored = _quantised(1, 5, 37, 45)
    separate = [metric(r, clean) for r in restored]
    with metric.reference() as memo:
        together = [metric(r, clean) for r in restored]
        again = metric(restored[-1], clean)  # both seen just before: nothing recomputed
    assert memo.computed == 5 + 1  # each restoration once, the clean image once
    assert all(torch.equal(a, b) for a, b in zip(separate, together, strict=True))
    assert torch.equal(again, separate[-1])
    assert "forward" not in metric.model.__dict__ and "forward_once" not in metric.model.__dict__
    assert torch.equal(metric(restored[1], clean), separate[1])  # the block left nothing behind


def test_score_many_equals_the_one_pair_calls_bitwise():
    suite = MetricSuite(ALL, pretrained="random")
    clean = _quantised(0, 1, 37, 45)[0]
    restored = _quantised(3, 5, 37, 45)
    lp, di = LPIPSMetric("random"), DISTSMetric("random")
    got = suite.score_many(restored, clean)
    assert [list(g) for g in got] == [list(ALL)] * 5
    for r, scores in zip(restored, got, strict=True):
        assert scores == {
            "psnr_rgb": float(psnr(r, clean)[0]),
            "psnr_y": float(psnr(r, clean, y_channel=True)[0]),
            "ssim_rgb": float(ssim(r, clean)[0]),
            "ssim_y": float(ssim(r, clean, y_channel=True)[0]),
            "lpips": float(lp(r, clean)[0]),
            "dists": float(di(r, clean)[0]),
        }
    assert suite(restored[4], clean) == got[4]


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    root = tmp_path_factory.mktemp("identical")
    settings = ((0.0, 15.0), (2.0, 30.0), (1.0, 0.0))
    evalkit.make_eval_set(root, settings=settings, size=(36, 44))
    return root, settings


def _report(evalset):
    root, settings = evalset
    params = evalkit.tiny_params(gan_metrics=["lpips", "dists", "psnr_rgb"])
    params = params.model_copy(
        update={"evalsets": params.evalsets.model_copy(update={"settings": settings})}
    )
    specs = [
        ModelSpec("cunet", "mse", root / "a"),
        ModelSpec("cugan", "gan", root / "b"),
    ]
    loaded = {
        s.name: (evalkit.tiny_generator(seed=7 + i), DEFAULT_SCALE) for i, s in enumerate(specs)
    }
    return evalkit.evaluate_with_input(specs, root, params, loaded), loaded


def test_report_equals_the_one_pair_loop_bitwise(evalset):
    """Every row equals what the evaluation computed before this change -- per model, per
    setting, per image: restore, then each metric on that one pair -- to the last bit."""
    root, _ = evalset
    report, loaded = _report(evalset)
    lp, di = LPIPSMetric("random"), DISTSMetric("random")
    assert len(report.rows) == 3 * 3 * 2
    for row in report.rows:
        clean = to_tensor(read_rgb8(root / "tiny" / "gt" / row.image).array)
        degraded = read_rgb8(root / "tiny" / row.setting / row.image).array
        if row.model == "input":
            out = to_tensor(degraded)
        else:
            r, s = parse_setting_key(row.setting)
            out = to_tensor(restore(loaded[row.model][0], degraded, DEFAULT_SCALE.to_z(r, s)))
        for name, value in row.scores.items():
            assert value == _one_pair(name, out, clean, lp, di), (row.model, row.setting, name)
    assert np.isfinite([v for r in report.rows for v in r.scores.values()]).all()
