"""Evaluation methods beyond the checkpoints, and how images are sized: the degraded input, BM3D
and folder references (rows equal direct calls; where they appear: metrics.json, CSVs, tables,
paper comparison, MLflow), ``evaluate.size_mode`` (crop16 cuts clean and restored alike and is
recorded everywhere), and the parameters that choose them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pipeline.condition import DEFAULT_SCALE
from pipeline.config import ConfigError, parse_params
from pipeline.degradation import to_tensor, to_uint8
from pipeline.evaluation.output import render_tables, report_text
from pipeline.evaluation.run import run_evaluation
from pipeline.evaluation.scoring import evaluate_models
from pipeline.evaluation.sets import fit_size
from pipeline.evaluation.specs import (
    ModelSpec,
    ReferenceSpec,
    parse_reference,
    parse_setting_key,
    reference_specs,
)
from pipeline.evaluation.terms import EvalError
from pipeline.imageio import read_rgb8, write_png
from pipeline.inference import restore
from pipeline.metrics import psnr, ssim
from tests import evalkit

INPUT = [ReferenceSpec("input", "input")]


def _clean_and_degraded(root, row):
    clean = read_rgb8(root / "tiny" / "gt" / row.image).array
    degraded = read_rgb8(root / "tiny" / row.setting / row.image).array
    return clean, degraded


# ---------------------------------------------------------------------------------------------
# size mode


def test_fit_size_crops_to_multiples_of_16_from_the_top_left():
    image = np.arange(37 * 50 * 3, dtype=np.uint8).reshape(37, 50, 3)
    cropped = fit_size(image, "crop16")
    assert cropped.shape == (32, 48, 3)
    np.testing.assert_array_equal(cropped, image[:32, :48])
    assert fit_size(image, "pad") is image
    assert fit_size(image[:32, :48], "crop16").shape == (32, 48, 3)  # already a multiple
    with pytest.raises(EvalError, match="smaller than 16x16"):
        fit_size(image[:15], "crop16", where="x.png")


def test_crop16_crops_clean_and_restored_alike(tmp_path):
    """Every score is the metric of restore(degraded[:32, :48]) against clean[:32, :48]: both
    cut the same way before restoring and scoring, and the pad mode differs from it."""
    evalkit.make_eval_set(tmp_path, size=(37, 50))
    model = evalkit.tiny_generator(seed=3)
    loaded = {"cunet": (model, DEFAULT_SCALE)}
    spec = ModelSpec("cunet", "mse", tmp_path / "unused")
    params = evalkit.tiny_params(size_mode="crop16", mse_metrics=["psnr_rgb", "ssim_y"])
    report = evaluate_models(
        [spec], tmp_path, params, loaded=loaded, references=INPUT, progress=False
    )
    assert report.size_mode == "crop16" and report.info()["size_mode"] == "crop16"
    for row in report.rows:
        clean, degraded = (a[:32, :48] for a in _clean_and_degraded(tmp_path, row))
        if row.model == "input":
            out = degraded
        else:
            r, s = parse_setting_key(row.setting)
            out = restore(model, np.ascontiguousarray(degraded), DEFAULT_SCALE.to_z(r, s))
        assert out.shape == (32, 48, 3)
        ref = to_tensor(np.ascontiguousarray(clean))
        assert row.scores["psnr_rgb"] == float(psnr(to_tensor(out), ref)[0])
        assert row.scores["ssim_y"] == float(ssim(to_tensor(out), ref, y_channel=True)[0])
    padded = evaluate_models(
        [spec],
        tmp_path,
        evalkit.tiny_params(mse_metrics=["psnr_rgb", "ssim_y"]),
        loaded=loaded,
        progress=False,
    )
    assert padded.size_mode == "pad"
    assert [r.scores for r in padded.rows] != [r.scores for r in report.rows if r.model != "input"]


def test_size_mode_is_written_in_every_file_and_title(tmp_path):
    evalkit.make_eval_set(tmp_path / "sets", size=(37, 50))
    cunet = evalkit.save_tiny(tmp_path / "cunet", seed=1)
    done = run_evaluation(
        [ModelSpec("cunet", "mse", cunet)],
        tmp_path / "sets",
        tmp_path / "out",
        evalkit.tiny_params(size_mode="crop16", figures={"enabled": False}),
        log_mlflow=False,
        progress=False,
    )
    metrics = json.loads(done.paths["metrics"].read_text())
    assert metrics["info"]["size_mode"] == "crop16"
    assert json.loads(done.paths["paper"].read_text())["size_mode"] == "crop16"
    titles = [str(t.title) for t in render_tables(done.report)]
    assert len(titles) >= 2 + 3  # cunet, input, and the three paper tables
    assert all("size_mode=crop16" in t for t in titles), titles


def test_paper_profile_uses_crop16(tmp_path):
    from pathlib import Path

    from pipeline.config import load_params
    from pipeline.profiles import apply_profile

    repo = Path(__file__).resolve().parents[1]
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text())
    apply_profile(repo / "profiles" / "paper.yaml", params)
    assert load_params(params).evaluate.size_mode == "crop16"
    assert load_params(repo / "params.yaml").evaluate.size_mode == "pad"


# ---------------------------------------------------------------------------------------------
# the references


def test_reference_parameters_and_their_errors():
    params = parse_params({"evaluate": {"references": ["bm3d", "folder:cresmd:/data/cresmd"]}})
    assert [(r.name, r.source, r.path and str(r.path)) for r in reference_specs(params)] == [
        ("input", "input", None),
        ("bm3d", "bm3d", None),
        ("cresmd", "folder", "/data/cresmd"),
    ]
    assert [r.name for r in reference_specs(parse_params({}))] == ["input"]  # always
    for bad, needle in (("bm4d", "is not input, bm3d"), ("folder:a b:/x", "is not input")):
        with pytest.raises(ConfigError, match=needle) as err:
            parse_params({"evaluate": {"references": [bad]}})
        assert "evaluate" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_params({"evaluate": {"references": ["folder:x:/a", "folder:x:/b"]}})
    with pytest.raises(EvalError, match="folder:NAME:DIR"):
        parse_reference("folder::/x")
    assert ReferenceSpec("bm3d", "bm3d").applies_to((0.0, 30.0))
    assert not ReferenceSpec("bm3d", "bm3d").applies_to((2.0, 30.0))
    assert not ReferenceSpec("bm3d", "bm3d").applies_to((0.0, 0.0))


def test_input_rows_score_the_degraded_image_with_every_metric(tmp_path):
    evalkit.make_eval_set(tmp_path)
    params = evalkit.tiny_params(gan_metrics=["lpips", "psnr_rgb"])
    specs = [
        ModelSpec("cunet", "mse", tmp_path / "a"),
        ModelSpec("cugan", "gan", tmp_path / "b"),
    ]
    loaded = {s.name: (evalkit.tiny_generator(seed=i), DEFAULT_SCALE) for i, s in enumerate(specs)}
    report = evaluate_models(
        specs, tmp_path, params, loaded=loaded, references=INPUT, progress=False
    )
    rows = [r for r in report.rows if r.model == "input"]
    assert len(rows) == 2 * len(evalkit.SETTINGS) and {r.kind for r in rows} == {"reference"}
    from pipeline.metrics import LPIPSMetric

    lp = LPIPSMetric("random")
    for row in rows:
        clean, degraded = (to_tensor(a) for a in _clean_and_degraded(tmp_path, row))
        assert list(row.scores) == ["psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips"]
        assert row.scores["psnr_rgb"] == float(psnr(degraded, clean)[0])
        assert row.scores["ssim_rgb"] == float(ssim(degraded, clean)[0])
        assert row.scores["lpips"] == float(lp(degraded, clean)[0])
    # Not "ours": no distance, no entry among the models; its own key in the means.
    assert report.distances().models() == ()
    assert [m.name for m in report.models] == ["cunet", "cugan"]
    assert report.means().get("input", "tiny", "all", "psnr_rgb") is not None
    assert "input/tiny/all/psnr_rgb" in report.reference_metrics()
    assert not any(k.startswith("input/") for k in report.flat_metrics())
    mse_only = evaluate_models(
        specs[:1], tmp_path, params, loaded=loaded, references=INPUT, progress=False
    )
    assert set(mse_only.rows[-1].scores) == {"psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y"}


def test_bm3d_runs_on_noise_only_settings_with_the_true_sigma(tmp_path):
    import bm3d

    evalkit.make_eval_set(tmp_path)
    params = evalkit.tiny_params(mse_metrics=["psnr_rgb"])
    report = evaluate_models(
        [ModelSpec("cunet", "mse", tmp_path / "u")],
        tmp_path,
        params,
        loaded={"cunet": (evalkit.tiny_generator(seed=1), DEFAULT_SCALE)},
        references=[ReferenceSpec("bm3d", "bm3d")],
        progress=False,
    )
    rows = [r for r in report.rows if r.model == "bm3d"]
    assert {r.setting for r in rows} == {"blur0_noise15"}  # blur2_noise30 is not noise-only
    for row in rows:
        clean, degraded = _clean_and_degraded(tmp_path, row)
        profile = bm3d.BM3DProfile()
        profile.num_threads = 1  # deterministic
        out = bm3d.bm3d_rgb(degraded.astype(np.float64) / 255.0, 15.0 / 255.0, profile=profile)

        expected = to_uint8(torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))))
        assert row.scores["psnr_rgb"] == float(psnr(to_tensor(expected), to_tensor(clean))[0])
        assert row.scores["psnr_rgb"] > float(psnr(to_tensor(degraded), to_tensor(clean))[0])
    assert set(report.means().settings("bm3d", "tiny")) == {"blur0_noise15", "all"}


def _write_folder(root, src, *, crop=None):
    """Another method's outputs: here the clean images themselves (or crops of them)."""
    for setting in ("blur0_noise15", "blur2_noise30"):
        for name in ("img0.png", "img1.png"):
            image = read_rgb8(src / "tiny" / "gt" / name).array
            if crop is not None:
                image = np.ascontiguousarray(image[: crop[0], : crop[1]])
            (root / "tiny" / setting).mkdir(parents=True, exist_ok=True)
            write_png(root / "tiny" / setting / name, image)


def test_folder_reference_reads_its_files_and_names_a_bad_one(tmp_path):
    evalkit.make_eval_set(tmp_path / "sets", size=(37, 50))
    _write_folder(tmp_path / "mine", tmp_path / "sets")
    params = evalkit.tiny_params(mse_metrics=["psnr_rgb"])
    kwargs = {
        "loaded": {"cunet": (evalkit.tiny_generator(seed=1), DEFAULT_SCALE)},
        "progress": False,
    }
    spec = ModelSpec("cunet", "mse", tmp_path / "u")
    mine = parse_reference(f"folder:mine:{tmp_path / 'mine'}")
    report = evaluate_models([spec], tmp_path / "sets", params, references=[mine], **kwargs)
    rows = [r for r in report.rows if r.model == "mine"]
    assert len(rows) == 4 and all(r.scores["psnr_rgb"] == float("inf") for r in rows)
    # crop16: full-size files are cut like the input; files already at 32x48 are taken as is.
    crop = evalkit.tiny_params(mse_metrics=["psnr_rgb"], size_mode="crop16")
    report = evaluate_models([spec], tmp_path / "sets", crop, references=[mine], **kwargs)
    assert all(r.scores["psnr_rgb"] == float("inf") for r in report.rows if r.model == "mine")
    _write_folder(tmp_path / "cut", tmp_path / "sets", crop=(32, 48))
    cut = parse_reference(f"folder:cut:{tmp_path / 'cut'}")
    report = evaluate_models([spec], tmp_path / "sets", crop, references=[cut], **kwargs)
    assert all(r.scores["psnr_rgb"] == float("inf") for r in report.rows if r.model == "cut")
    # ... but not in pad mode, where the evaluation is full size: a size mismatch.
    with pytest.raises(EvalError, match=r"cut/tiny/blur0_noise15/img0.png is 32x48") as err:
        evaluate_models([spec], tmp_path / "sets", params, references=[cut], **kwargs)
    assert "37x50" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "mine" / "tiny" / "blur2_noise30" / "img1.png").unlink()
    with pytest.raises(EvalError, match=r"mine/tiny/blur2_noise30/img1.png not found") as err:
        evaluate_models([spec], tmp_path / "sets", params, references=[mine], **kwargs)
    assert "\n" not in str(err.value)


def test_a_model_named_like_a_reference_is_refused(tmp_path):
    evalkit.make_eval_set(tmp_path)
    with pytest.raises(EvalError, match="method names must be unique"):
        evaluate_models(
            [ModelSpec("input", "mse", tmp_path / "u")],
            tmp_path,
            evalkit.tiny_params(),
            loaded={"input": (evalkit.tiny_generator(seed=1), DEFAULT_SCALE)},
            references=INPUT,
            progress=False,
        )


def test_the_stage_puts_the_input_everywhere(tmp_path, monkeypatch):
    """run_evaluation (stage and flow): the input in metrics.json means, both per-setting CSVs
    (with each kind's metrics), the tables, the paper comparison and each model's MLflow run."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    evalkit.make_eval_set(tmp_path / "sets")
    specs = [
        ModelSpec("cunet", "mse", evalkit.save_tiny(tmp_path / "cunet", seed=1)),
        ModelSpec("cugan", "gan", evalkit.save_tiny(tmp_path / "cugan", seed=2)),
    ]
    uri = evalkit.sqlite_uri(tmp_path)
    done = run_evaluation(
        specs,
        tmp_path / "sets",
        tmp_path / "out",
        evalkit.tiny_params(figures={"enabled": False}, gan_metrics=["lpips", "psnr_rgb"]),
        tracking_uri=uri,
        progress=False,
    )
    metrics = json.loads(done.paths["metrics"].read_text())
    assert set(metrics["means"]) == {"cunet", "cugan", "input"}
    assert metrics["info"]["references"]["input"]["source"] == "input"
    assert "input" not in metrics["distance"]
    for kind, columns in (("mse", {"psnr_y", "ssim_rgb"}), ("gan", {"lpips"})):
        with done.paths[f"per_setting_{kind}"].open() as fp:
            rows = {r["label"]: r for r in csv.DictReader(fp)}
        assert "input/tiny/blur2_noise30" in rows and "input/tiny/all" in rows
        assert columns <= set(rows["input/tiny/all"])
    with done.paths["per_setting_gan"].open() as fp:
        assert "ssim_y" not in next(csv.DictReader(fp))  # the GAN table keeps its metrics
    assert "input (reference) on tiny" in " ".join(report_text(done.report, width=300).split())
    t2 = done.report.paper_comparison()[0]
    assert "ref_input" in t2 and t2["ref_input"] is None  # the paper's set was not evaluated
    client = MlflowClient(uri)
    for name, run_id in done.mlflow_runs.items():
        run = client.get_run(run_id)
        key = "eval/ref/input/tiny/all/psnr_rgb"
        assert run.data.metrics[key] == metrics["means"]["input"]["tiny"]["all"]["psnr_rgb"]
        assert run.data.tags["eval.size_mode"] == "pad"
        assert run.data.tags["eval.references"] == "input"
        assert "eval/tiny/all/psnr_rgb" in run.data.metrics, name
