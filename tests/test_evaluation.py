"""Evaluation: setting names, the paper's tables, metric values against direct calls, aggregates,
distances, output files, random-backbone labelling, MLflow logging and the DVC stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import paper
from pipeline.condition import DEFAULT_SCALE, setting_key
from pipeline.degradation import to_tensor
from pipeline.evaluation.output import render_tables, report_text, write_report
from pipeline.evaluation.results import EvalReport, ScoreRow
from pipeline.evaluation.run import log_report_to_mlflow, run_evaluation
from pipeline.evaluation.scoring import evaluate_models
from pipeline.evaluation.sets import load_eval_set
from pipeline.evaluation.specs import (
    ModelSpec,
    discover_baselines,
    parse_model_spec,
    parse_setting_key,
)
from pipeline.evaluation.suite import MetricSuite
from pipeline.evaluation.terms import EvalError
from pipeline.imageio import read_rgb8
from pipeline.inference import restore
from pipeline.metrics import LPIPSMetric, psnr, ssim
from tests import evalkit

# ---------------------------------------------------------------------------------------------
# names and the paper's numbers


@pytest.mark.parametrize(
    ("blur", "noise", "key"),
    [
        (2, 30, "blur2_noise30"),
        (0.5, 0, "blur0.5_noise0"),
        (4.0, 50.0, "blur4_noise50"),
    ],
)
def test_setting_key_round_trip(blur, noise, key):
    assert setting_key(blur, noise) == key
    assert parse_setting_key(key) == (float(blur), float(noise))


@pytest.mark.parametrize("bad", ["blur2noise30", "gt", "blur-1_noise3", "blur2_noise30x"])
def test_parse_setting_key_rejects(bad):
    with pytest.raises(EvalError, match="not a setting name"):
        parse_setting_key(bad)


def test_paper_table2_matches_printed_distances():
    """Unet - CUnet reproduces the paper's printed PSNR distances: checks the column order and
    the repaired CUnet values (the seed text prints 20.07 / 28.63)."""
    t = paper.TABLE2_CBSD68
    printed = [0.12, 0.12, 0.17, 0.22, 0.08, 0.06, 0.02, 0.01]
    got = [t.rows["Unet"][k] - t.rows["CUnet"][k] for k in t.keys]
    np.testing.assert_allclose(got, printed, atol=1e-9)
    assert t.keys == (
        "blur0_noise30",
        "blur0_noise50",
        "blur2_noise0",
        "blur4_noise0",
        "blur1_noise15",
        "blur1_noise30",
        "blur2_noise50",
        "blur4_noise50",
    )
    assert t.rows["CResMD"]["blur4_noise50"] == 22.95


@pytest.mark.parametrize(
    ("table", "printed"),
    [
        (
            paper.TABLE1_LIVE1,
            [0.0032, 0.0009, 0.0041, 0.0132, 0.0017, 0.0038, -0.0049, -0.0059, -0.0079, -0.0160],
        ),
        (
            paper.TABLE1_DISTS_LIVE1,
            [0.0036, 0.0063, 0.0026, 0.0068, 0.0011, 0.0016, -0.0038, -0.0048, -0.0012, 0.0052],
        ),
    ],
)
def test_paper_table1_matches_printed_distances(table, printed):
    got = [table.rows["CUGAN"][k] - table.rows["UGAN"][k] for k in table.keys]
    np.testing.assert_allclose(got, printed, atol=1e-9)
    assert len(table.keys) == 10


# ---------------------------------------------------------------------------------------------
# evaluation sets and model specs


def test_load_eval_set_and_errors(tmp_path):
    evalkit.make_eval_set(tmp_path)
    es = load_eval_set(tmp_path, "tiny", evalkit.SETTINGS)
    assert es.images == ("img0.png", "img1.png")
    assert es.degraded_path((2, 30), "img1.png") == tmp_path / "tiny" / "blur2_noise30" / "img1.png"
    assert load_eval_set(tmp_path, "tiny", evalkit.SETTINGS, max_images=1).images == ("img0.png",)
    with pytest.raises(EvalError, match="blur4_noise50"):
        load_eval_set(tmp_path, "tiny", [(4, 50)])
    with pytest.raises(EvalError, match="not found"):
        load_eval_set(tmp_path, "missing", evalkit.SETTINGS)
    (tmp_path / "tiny" / "blur2_noise30" / "img1.png").unlink()
    with pytest.raises(EvalError, match="lacks 1 image"):
        load_eval_set(tmp_path, "tiny", evalkit.SETTINGS)


def test_parse_model_spec():
    spec = parse_model_spec("cunet:mse:runs/x/generator")
    assert (spec.name, spec.kind, str(spec.path), spec.is_baseline) == (
        "cunet",
        "mse",
        "runs/x/generator",
        False,
    )
    for bad in ("cunet:runs/x", "cunet:sgd:x", "bad name:mse:x"):
        with pytest.raises(EvalError, match="NAME:KIND:PATH"):
            parse_model_spec(bad)


def test_discover_baselines(tmp_path):
    evalkit.save_tiny(tmp_path / "unet" / "blur2_noise30", seed=1)
    evalkit.save_tiny(tmp_path / "unet" / "blur0_noise15" / "model", seed=1)  # a stage's output
    (tmp_path / "unet" / "notes").mkdir()
    found = discover_baselines(tmp_path / "unet", "mse")
    assert [(b.name, b.setting, b.path.name) for b in found] == [
        ("unet-blur0_noise15", (0.0, 15.0), "model"),
        ("unet-blur2_noise30", (2.0, 30.0), "blur2_noise30"),
    ]
    assert discover_baselines(tmp_path / "absent", "gan") == []
    assert discover_baselines(None, "gan") == []


# ---------------------------------------------------------------------------------------------
# metric values against direct calls of pipeline.metrics


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    evalkit.make_eval_set(root)
    model = evalkit.tiny_generator(seed=3)
    return root, model


@pytest.mark.parametrize("crop_border", [0, 2])
def test_mse_metrics_equal_direct_calls(tiny_case, crop_border):
    root, model = tiny_case
    params = evalkit.tiny_params(crop_border=crop_border)
    spec = ModelSpec("cunet", "mse", root / "unused")
    report = evaluate_models(
        [spec], root, params, loaded={"cunet": (model, DEFAULT_SCALE)}, progress=False
    )
    assert len(report.rows) == 2 * len(evalkit.SETTINGS)
    for row in report.rows:
        r, s = parse_setting_key(row.setting)
        degraded = read_rgb8(root / "tiny" / row.setting / row.image).array
        clean = to_tensor(read_rgb8(root / "tiny" / "gt" / row.image).array)
        out = to_tensor(restore(model, degraded, DEFAULT_SCALE.to_z([r], [s])))
        for name, fn, y in (
            ("psnr_rgb", psnr, False),
            ("psnr_y", psnr, True),
            ("ssim_rgb", ssim, False),
            ("ssim_y", ssim, True),
        ):
            direct = float(fn(out, clean, crop_border=crop_border, y_channel=y)[0])
            assert row.scores[name] == pytest.approx(direct, rel=1e-12, abs=1e-12), name
    # Means: over images per setting; "all": over the settings' means.
    means = report.means()
    for st in report.settings:
        vals = [r.scores["psnr_rgb"] for r in report.rows if r.setting == st]
        assert means.get("cunet", "tiny", st, "psnr_rgb") == pytest.approx(np.mean(vals), rel=1e-12)
    assert means.get("cunet", "tiny", "all", "psnr_rgb") == pytest.approx(
        np.mean([means.get("cunet", "tiny", st, "psnr_rgb") for st in report.settings]), rel=1e-12
    )
    assert report.score("cunet", "tiny/all/psnr_rgb") == means.get(
        "cunet", "tiny", "all", "psnr_rgb"
    )
    assert report.random_backbones is False
    assert report.info()["crop_border"] == crop_border


def test_gan_metrics_equal_direct_calls_and_are_labelled_random(tiny_case):
    root, model = tiny_case
    params = evalkit.tiny_params(gan_metrics=["lpips", "psnr_rgb"])
    spec = ModelSpec("cugan", "gan", root / "unused")
    report = evaluate_models(
        [spec], root, params, loaded={"cugan": (model, DEFAULT_SCALE)}, progress=False
    )
    lp = LPIPSMetric(pretrained="random")
    row = report.rows[-1]
    r, s = parse_setting_key(row.setting)
    degraded = read_rgb8(root / "tiny" / row.setting / row.image).array
    clean = to_tensor(read_rgb8(root / "tiny" / "gt" / row.image).array)
    out = to_tensor(restore(model, degraded, DEFAULT_SCALE.to_z([r], [s])))
    assert row.scores["lpips"] == pytest.approx(float(lp(out, clean)[0]), rel=1e-6)
    assert set(row.scores) == {"lpips", "psnr_rgb"}
    # Labelled everywhere: label, info JSON, tables.
    assert report.random == {"lpips": True, "psnr_rgb": False}
    assert "RANDOM" in report.labels["lpips"]
    assert report.info()["random_backbones"] is True
    assert report.info()["random_metrics"] == ["lpips"]
    text = " ".join(report_text(report).split())  # titles wrap at the table's width
    assert "[RANDOM backbone weights: lpips are not meaningful]" in text
    assert "lpips (random)" in text


def test_metric_suite_rejects_unknown():
    with pytest.raises(EvalError, match="unknown metric 'fid'"):
        MetricSuite(["psnr_rgb", "fid"])


# ---------------------------------------------------------------------------------------------
# distances, the paper comparison, files


def _fake_report(set_name: str = "cbsd68") -> EvalReport:
    """CUnet + Unet baseline at blur2_noise50, CUGAN + UGAN at blur0_noise30 (made-up scores)."""
    rows = [
        ScoreRow("cunet", "mse", set_name, "blur2_noise50", "a.png", {"psnr_rgb": 24.0}),
        ScoreRow("cunet", "mse", set_name, "blur2_noise50", "b.png", {"psnr_rgb": 25.0}),
        ScoreRow("cunet", "mse", set_name, "blur0_noise30", "a.png", {"psnr_rgb": 30.0}),
        ScoreRow(
            "unet-blur2_noise50", "mse", set_name, "blur2_noise50", "a.png", {"psnr_rgb": 25.0}
        ),
        ScoreRow(
            "unet-blur2_noise50", "mse", set_name, "blur2_noise50", "b.png", {"psnr_rgb": 25.5}
        ),
        ScoreRow("cugan", "gan", set_name, "blur0_noise30", "a.png", {"lpips": 0.30}),
        ScoreRow("ugan-blur0_noise30", "gan", set_name, "blur0_noise30", "a.png", {"lpips": 0.25}),
    ]
    models = [
        ModelSpec("cunet", "mse", Path("c")),
        ModelSpec("unet-blur2_noise50", "mse", Path("u"), setting=(2, 50)),
        ModelSpec("cugan", "gan", Path("g")),
        ModelSpec("ugan-blur0_noise30", "gan", Path("ug"), setting=(0, 30)),
    ]
    return EvalReport(
        rows=rows,
        models=models,
        sets=[set_name],
        settings=["blur0_noise30", "blur2_noise50"],
        metrics={"mse": ("psnr_rgb",), "gan": ("lpips",)},
        labels={"psnr_rgb": "PSNR", "lpips": "lpips"},
        random={"psnr_rgb": False, "lpips": False},
        crop_border=0,
    )


def test_distance_signs():
    dist = _fake_report().distances()
    # PSNR: baseline - ours = 25.25 - 24.5; LPIPS: ours - baseline = 0.30 - 0.25.
    assert dist.get("cunet", "cbsd68", "blur2_noise50", "psnr_rgb") == pytest.approx(0.75)
    assert dist.get("cugan", "cbsd68", "blur0_noise30", "lpips") == pytest.approx(0.05)
    assert "blur0_noise30" not in dist.settings("cunet", "cbsd68")  # no Unet for that setting
    assert set(dist.models()) == {"cunet", "cugan"}  # baselines get no distance of their own


def test_paper_comparison_fills_only_the_papers_set():
    rows = _fake_report("cbsd68").paper_comparison()
    t2 = {r["setting"]: r for r in rows if r["table"] == paper.TABLE2_CBSD68.name}
    assert t2["blur2_noise50"]["paper_CUnet"] == 24.55
    assert t2["blur2_noise50"]["ours_cunet"] == pytest.approx(24.5)
    assert t2["blur2_noise50"]["ours_Unet"] == pytest.approx(25.25)
    assert t2["blur4_noise0"]["ours_cunet"] is None
    t1 = [r for r in rows if r["table"] == paper.TABLE1_LIVE1.name]
    assert all(r["ours_cugan"] is None for r in t1)  # LPIPS table is on LIVE1, we ran CBSD68
    live1 = {
        r["setting"]: r
        for r in _fake_report("live1").paper_comparison()
        if r["table"] == paper.TABLE1_LIVE1.name
    }
    assert live1["blur0_noise30"]["ours_cugan"] == pytest.approx(0.30)
    assert live1["blur0_noise30"]["ours_UGAN"] == pytest.approx(0.25)
    assert live1["blur0_noise30"]["paper_CUGAN"] == 0.0522


def test_write_report_files(tmp_path):
    report = _fake_report()
    paths = write_report(report, tmp_path / "eval")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["info"]["random_backbones"] is False
    assert metrics["info"]["crop_border"] == 0
    assert "lower is better" in metrics["info"]["distance_sign"]
    assert metrics["means"]["cunet"]["cbsd68"]["blur2_noise50"]["psnr_rgb"] == pytest.approx(24.5)
    assert metrics["distance"]["cugan"]["cbsd68"]["blur0_noise30"]["lpips"] == pytest.approx(0.05)
    with paths["per_image"].open() as fp:
        per_image = list(csv.DictReader(fp))
    assert len(per_image) == len(report.rows)
    with paths["per_setting_mse"].open() as fp:
        per_setting = {r["label"]: r for r in csv.DictReader(fp)}
    assert float(per_setting["cunet/cbsd68/blur2_noise50"]["psnr_rgb"]) == pytest.approx(24.5)
    assert "cunet/cbsd68/all" in per_setting
    tables = json.loads(paths["paper"].read_text())["tables"]
    assert set(tables) == {t.key for t in paper.PAPER_TABLES}
    t2 = tables["table2_psnr_rgb_cbsd68"]
    assert (t2["set"], t2["metric"], t2["random_backbones"]) == ("cbsd68", "psnr_rgb", False)
    assert t2["settings"]["blur2_noise50"] == {
        "paper_Unet": 24.57,
        "paper_CUnet": 24.55,
        "paper_CResMD": 24.48,
        "ours_cunet": pytest.approx(24.5),
        "ours_Unet": pytest.approx(25.25),
    }
    titles = [t.title for t in render_tables(report)]
    assert any("distance" in t and "lower is better" in t for t in titles)
    assert not list(tmp_path.glob("eval/**/.*tmp*"))  # nothing half-written left behind


# ---------------------------------------------------------------------------------------------
# MLflow and the DVC stage


def test_log_report_to_mlflow(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts run artifacts under ./mlruns
    uri = evalkit.sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    train_run = client.create_run(client.create_experiment("cugan"), run_name="train_cunet")
    # The training stage records its run beside the checkpoint (pipeline.tracking).
    model_dir = tmp_path / "train_cunet" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "tracking.json").write_text(
        json.dumps({"tracking_uri": uri, "run_id": train_run.info.run_id, "mode": "mlflow"})
    )
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    (other_dir / "tracking.json").write_text(
        json.dumps({"tracking_uri": "sqlite:////other/store.db", "run_id": "abc", "mode": "mlflow"})
    )
    report = _fake_report()
    report.models[0] = ModelSpec("cunet", "mse", model_dir)
    report.models[2] = ModelSpec("cugan", "gan", other_dir)
    paths = write_report(report, tmp_path / "eval")
    used = log_report_to_mlflow(
        report,
        paths,
        tracking_uri=uri,
        experiment="evaluate-test",
        artifact_location=str(tmp_path / "artifacts"),
    )
    assert used["cunet"] == train_run.info.run_id  # the training stage's run
    run = client.get_run(used["cunet"])
    assert run.data.metrics["eval/cbsd68/blur2_noise50/psnr_rgb"] == pytest.approx(24.5)
    assert run.data.metrics["eval/distance/cbsd68/blur2_noise50/psnr_rgb"] == pytest.approx(0.75)
    assert run.data.tags["eval.random_backbones"] == "false"
    assert run.data.tags["eval.label.psnr_rgb"] == "PSNR"
    # Recorded in another store: a new run, tagged with the checkpoint path.
    new = client.get_run(used["cugan"])
    assert used["cugan"] != "abc"
    assert new.data.tags["cugan.model_path"] == str(other_dir)
    assert new.data.metrics["eval/cbsd68/blur0_noise30/lpips"] == pytest.approx(0.30)
    artifacts = {a.path for a in client.list_artifacts(used["cunet"], "evaluation")}
    assert "evaluation/metrics.json" in artifacts
    assert mlflow.active_run() is None  # no fluent run left open


def test_stage_end_to_end(tmp_path, monkeypatch):
    from stages.evaluate import main

    monkeypatch.chdir(tmp_path)
    evalkit.make_eval_set(tmp_path / "evalsets")
    evalkit.save_tiny(tmp_path / "cunet", seed=1)
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
    uri = evalkit.sqlite_uri(tmp_path)
    rc = main(
        [
            "--params",
            str(params),
            "--model",
            f"cunet:mse:{tmp_path / 'cunet'}",
            "--evalsets",
            str(tmp_path / "evalsets"),
            "--out",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["means"]["cunet"]["tiny"]) == {"blur0_noise15", "blur2_noise30", "all"}
    # A missing checkpoint is a one-line error and exit code 1, not a traceback.
    rc = main(
        [
            "--params",
            str(params),
            "--model",
            f"cunet:mse:{tmp_path / 'nope'}",
            "--evalsets",
            str(tmp_path / "evalsets"),
            "--out",
            str(tmp_path / "out2"),
            "--no-mlflow",
        ]
    )
    assert rc == 1


def test_run_evaluation_with_baselines_writes_distances(tmp_path):
    """A Unet baseline for one setting: the distance of CUnet is baseline - ours (PSNR) for
    that setting only, from the same per-setting means the report prints."""
    evalkit.make_eval_set(tmp_path / "sets")
    cunet = evalkit.save_tiny(tmp_path / "cunet", seed=1)
    evalkit.save_tiny(tmp_path / "unet" / "blur2_noise30" / "model", seed=4, damage=0.05)
    params = evalkit.tiny_params(baselines_mse=str(tmp_path / "unet"))
    done = run_evaluation(
        [ModelSpec("cunet", "mse", cunet)],
        tmp_path / "sets",
        tmp_path / "out",
        params,
        figures=False,
        log_mlflow=False,
    )
    report, paths = done.report, done.paths
    means = report.means()
    assert set(means.settings("unet-blur2_noise30", "tiny")) == {"blur2_noise30", "all"}
    dist = json.loads(paths["metrics"].read_text())["distance"]["cunet"]["tiny"]
    assert set(dist) == {"blur2_noise30"}
    base = means.get("unet-blur2_noise30", "tiny", "blur2_noise30", "psnr_rgb")
    ours = means.get("cunet", "tiny", "blur2_noise30", "psnr_rgb")
    assert dist["blur2_noise30"]["psnr_rgb"] == pytest.approx(base - ours)
    assert (tmp_path / "out" / "figures" / "README.txt").is_file()  # DVC's declared outs exist
    assert (tmp_path / "out" / "plots" / "modulation_curve_noise.csv").is_file()


# ---------------------------------------------------------------------------------------------
# the z scale of each model's checkpoint


def test_each_model_is_driven_with_its_checkpoints_scale(tmp_path):
    """A checkpoint recording another z scale is evaluated with THAT scale, whatever
    params.degradation says; a prebuilt model carries its scale the same way."""
    from pipeline.checkpoint import load_checkpoint, save_generator
    from pipeline.condition import ConditionScale

    evalkit.make_eval_set(tmp_path / "sets")
    scale = ConditionScale(blur_max=8.0, noise_max=100.0)
    model = evalkit.tiny_generator(seed=3)
    ckpt = save_generator(tmp_path / "wide", model, metadata={"stage": "test"}, scale=scale)
    params = evalkit.tiny_params(mse_metrics=["psnr_rgb"])
    assert (params.degradation.blur_max, params.degradation.noise_max) == (4.0, 50.0)
    spec = ModelSpec("wide", "mse", ckpt)
    report = evaluate_models([spec], tmp_path / "sets", params, progress=False)
    differs = []
    for row in report.rows:
        r, s = parse_setting_key(row.setting)
        degraded = read_rgb8(tmp_path / "sets" / "tiny" / row.setting / row.image).array
        clean = to_tensor(read_rgb8(tmp_path / "sets" / "tiny" / "gt" / row.image).array)
        ours = float(psnr(to_tensor(restore(model, degraded, scale.to_z(r, s))), clean)[0])
        default = float(
            psnr(to_tensor(restore(model, degraded, DEFAULT_SCALE.to_z(r, s))), clean)[0]
        )
        assert row.scores["psnr_rgb"] == pytest.approx(ours, rel=1e-12, abs=1e-12)
        differs.append(abs(ours - default) > 1e-6)
    assert any(differs)  # the scale matters, so the test can tell the two apart
    assert report.scales == {"wide": scale}
    assert report.info()["models"]["wide"]["condition_scale"] == {
        "blur_max": 8.0,
        "noise_max": 100.0,
    }
    prebuilt = evaluate_models(
        [spec], tmp_path / "sets", params, loaded={"wide": load_checkpoint(ckpt)}, progress=False
    )
    assert [r.scores for r in prebuilt.rows] == [r.scores for r in report.rows]
    with pytest.raises(EvalError, match="LoadedGenerator or \\(model, ConditionScale\\)"):
        evaluate_models([spec], tmp_path / "sets", params, loaded={"wide": model}, progress=False)


def test_setting_outside_a_checkpoints_scale_is_one_line(tmp_path):
    from pipeline.checkpoint import save_generator
    from pipeline.condition import ConditionScale

    evalkit.make_eval_set(tmp_path / "sets")
    narrow = ConditionScale(blur_max=1.0, noise_max=50.0)  # the sets hold blur 2
    ckpt = save_generator(
        tmp_path / "narrow", evalkit.tiny_generator(seed=1), metadata={}, scale=narrow
    )
    with pytest.raises(EvalError, match=r"model narrow: setting blur2_noise30 lies outside") as e:
        evaluate_models(
            [ModelSpec("narrow", "mse", ckpt)],
            tmp_path / "sets",
            evalkit.tiny_params(),
            progress=False,
        )
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the aggregate type and the step sequence


def test_metric_table_accessors():
    from pipeline.evaluation.results import MetricTable

    nested = {
        "m": {
            "s": {"blur0_noise15": {"psnr_rgb": 30.0, "ssim_rgb": 0.9}, "all": {"psnr_rgb": 30.0}}
        }
    }
    table = MetricTable.from_nested(nested)
    assert table.to_dict() == nested and table == MetricTable.from_nested(table.to_dict())
    assert table.get("m", "s", "blur0_noise15", "ssim_rgb") == 0.9
    assert table.get("m", "s", "blur9_noise9", "psnr_rgb") is None
    assert table.get("other", "s", "all", "psnr_rgb") is None
    assert (table.models(), table.sets("m"), table.settings("m", "s")) == (
        ("m",),
        ("s",),
        ("blur0_noise15", "all"),
    )
    assert dict(table.scores("m", "s", "all")) == {"psnr_rgb": 30.0}
    assert dict(table.scores("m", "x", "all")) == {}
    with pytest.raises(TypeError):
        table.scores("m", "s", "all")["psnr_rgb"] = 0.0  # read-only
    assert [r.label for r in table.rows()] == ["m/s/blur0_noise15", "m/s/all"]
    assert table.flat("m") == {
        "s/blur0_noise15/psnr_rgb": 30.0,
        "s/blur0_noise15/ssim_rgb": 0.9,
        "s/all/psnr_rgb": 30.0,
    }
    assert len(list(table.cells())) == 3 and not MetricTable() and table


def test_run_evaluation_is_one_sequence_of_steps(tmp_path):
    """The stage and the flow run the same steps, in this order (the flow wraps each in a task)."""
    from pipeline.evaluation.run import Step

    evalkit.make_eval_set(tmp_path / "sets")
    cunet = evalkit.save_tiny(tmp_path / "cunet", seed=1)
    calls, published = [], []

    def record(step, fn, *args, **kwargs):
        calls.append(step)
        return fn(*args, **kwargs)

    done = run_evaluation(
        [ModelSpec("cunet", "mse", cunet)],
        tmp_path / "sets",
        tmp_path / "out",
        evalkit.tiny_params(figures={"enabled": False}),
        tracking_uri=evalkit.sqlite_uri(tmp_path),
        publish=published.append,
        run_step=record,
        progress=False,
    )
    assert (
        calls
        == list(Step)
        == [
            Step.PLAN,
            Step.SCORE,
            Step.WRITE,
            Step.FIGURES,
            Step.PUBLISH,
            Step.LOG,
        ]
    )
    assert published == [done.report] and set(done.mlflow_runs) == {"cunet"}
    assert done.paths["metrics"].is_file() and done.figures == []
