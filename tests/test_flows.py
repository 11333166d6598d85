"""Prefect flows end to end under Prefect's test harness (a temporary local API, no external
server): evaluation, scheduled retraining with promotion, the deployments' schedules, and a
tiny ablation sweep on Ray (slow). MLflow always uses a sqlite store in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from tests import evalkit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the session (prefect_test_harness)."""
    try:
        from prefect.testing.utilities import prefect_test_harness
    except TypeError as err:  # the server's routes do not import with this FastAPI
        pytest.fail(
            f"Prefect's server cannot be imported ({err}); Prefect 3.8.8 needs "
            "fastapi==0.150.0 (0.155 removed Body(min_items=...); 0.151-0.154 reject the "
            "null body fields Prefect's client sends, e.g. on `prefect deploy`)"
        )
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    """The tests' sqlite stores only: never a store from the environment, and none left set
    for later tests (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to subprocesses)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def write_params(tmp_path: Path, **sections) -> Path:
    raw = {
        "base": {"pretrained": "random", "seed": 0},
        "evalsets": {"settings": [list(s) for s in evalkit.SETTINGS]},
        "evaluate": {
            "sets": ["tiny"],
            "device": "cpu",
            "figures": {
                "crop": 16,
                "grid_blur": [0, 2],
                "grid_noise": [0, 30],
                "curve_points": 3,
                "alphas": [0, 1],
            },
        },
        "tracking": {
            "uri": evalkit.sqlite_uri(tmp_path),
            "artifact_location": str(tmp_path / "mlartifacts"),
        },
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------
# evaluation


def test_evaluate_flow_end_to_end(prefect_harness, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.evaluate import evaluate_flow
    from pipeline.evaluation.scoring import evaluate_models
    from pipeline.evaluation.specs import ModelSpec

    monkeypatch.chdir(tmp_path)
    evalkit.make_eval_set(tmp_path / "sets")
    cunet = evalkit.save_tiny(tmp_path / "cunet", seed=1)
    cugan = evalkit.save_tiny(tmp_path / "cugan", seed=2)
    params_path = write_params(tmp_path)
    state = evaluate_flow(
        models=[f"cunet:mse:{cunet}", f"cugan:gan:{cugan}"],
        eval_root=str(tmp_path / "sets"),
        out_dir=str(tmp_path / "eval"),
        params_path=str(params_path),
        return_state=True,
    )
    assert state.is_completed()
    flat = state.result()

    # The flow ran the evaluation's own step sequence, one task per step.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from pipeline.evaluation.run import Step

    with get_client(sync_client=True) as prefect_client:
        task_runs = prefect_client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            ),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
    assert [t.name.rsplit("-", 1)[0] for t in task_runs] == [
        "load_params_task",
        *(step.value for step in Step),
    ]

    # The same numbers as the library computes directly (one implementation).
    direct = evaluate_models(
        [ModelSpec("cunet", "mse", cunet), ModelSpec("cugan", "gan", cugan)],
        tmp_path / "sets",
        load_params(params_path),
        progress=False,
    )
    assert flat == pytest.approx(direct.flat_metrics(), rel=1e-12)
    assert "cunet/tiny/blur2_noise30/psnr_rgb" in flat and "cugan/tiny/all/lpips" in flat

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["info"]["random_backbones"] is True  # LPIPS/DISTS on random weights
    for name in (
        "grid_cunet_img0.png",
        "grid_cugan_img0.png",
        "alpha_img0.png",
        "modulation_curve.png",
    ):
        assert (tmp_path / "eval" / "figures" / name).is_file()
    assert (tmp_path / "eval" / "plots" / "modulation_curve_blur.csv").is_file()

    client = MlflowClient(evalkit.sqlite_uri(tmp_path))
    exp = client.get_experiment_by_name("cugan-evaluate")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"evaluate-cunet", "evaluate-cugan"}
    gan_run = runs["evaluate-cugan"]
    assert gan_run.data.tags["eval.random_backbones"] == "true"
    assert "RANDOM" in gan_run.data.tags["eval.label.lpips"]
    assert gan_run.data.metrics["eval/tiny/all/lpips"] == pytest.approx(
        flat["cugan/tiny/all/lpips"]
    )


# ---------------------------------------------------------------------------------------------
# scheduled retraining: repro, then promotion


def _trained(repo: Path, name: str, uri: str, version: str | None, mode: str = "mlflow") -> None:
    """The tracking.json a training stage leaves: the version it registered (None: none)."""
    from pipeline.tracking import TrackingTarget, write_tracking_file

    model_dir = repo / "runs" / f"train_{name}" / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    target = TrackingTarget(mode=mode, uri=uri, fallback_dir=str(model_dir.parent / "fb"))
    registered = {"name": name, "version": version} if version else None
    write_tracking_file(model_dir, target, f"train_{name}", registered)


CUNET_RULE = {
    "model_name": "cunet",
    "kind": "mse",
    "metric": "tiny/all/psnr_rgb",
    "direction": "max",
    "model_dir": "runs/train_cunet/model",
}


def test_retrain_flow_reruns_and_promotes_only_a_better_model(
    prefect_harness, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain_flow

    monkeypatch.chdir(tmp_path)
    evalkit.make_eval_set(tmp_path / "sets")
    marker = tmp_path / "repro-ran"
    params_path = write_params(
        tmp_path,
        retrain={
            # Stands in for `dvc repro`: the flow runs it with the same interpreter on PATH.
            "repro_command": ["python", "-c", f"open({str(marker)!r}, 'w').write('ok')"],
            "rules": [CUNET_RULE],
        },
    )
    client = MlflowClient(evalkit.sqlite_uri(tmp_path))
    kwargs = {
        "params_path": str(params_path),
        "eval_root": str(tmp_path / "sets"),
        "tracking_uri": evalkit.sqlite_uri(tmp_path),
        "workdir": str(tmp_path / "work"),
        "repo_dir": str(tmp_path),
    }

    v1 = evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
    _trained(tmp_path, "cunet", evalkit.sqlite_uri(tmp_path), v1)  # what the repro trained
    first = retrain_flow(**kwargs)
    assert marker.read_text() == "ok"
    assert first["cunet"]["promote"] is True  # no champion yet
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1

    v2 = evalkit.register_tiny(client, tmp_path, "cunet", seed=2, damage=0.5)
    _trained(tmp_path, "cunet", evalkit.sqlite_uri(tmp_path), v2)
    second = retrain_flow(**{**kwargs, "repro": False})
    assert second["cunet"]["promote"] is False
    assert second["cunet"]["candidate_score"] < second["cunet"]["champion_score"]
    assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1
    tags = client.get_model_version("cunet", v2).tags
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.champion_version"] == v1


def test_retrain_flow_fails_when_the_run_registered_nothing(prefect_harness, tmp_path, monkeypatch):
    """A stage that logged to local files registered no version: the flow run fails in one
    line, and an older version in the registry is NOT judged as if it were new."""
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain_flow
    from pipeline.promotion import PromotionError

    monkeypatch.chdir(tmp_path)
    uri = evalkit.sqlite_uri(tmp_path)
    old = evalkit.register_tiny(MlflowClient(uri), tmp_path, "cunet", seed=1)
    _trained(tmp_path, "cunet", uri, None, mode="local")
    params_path = write_params(tmp_path, retrain={"rules": [CUNET_RULE], "registry_retries": 0})
    state = retrain_flow(
        params_path=str(params_path),
        tracking_uri=uri,
        repro=False,
        repo_dir=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(PromotionError, match="logged to local files") as info:
        state.result()
    assert "cugan tracking sync" in str(info.value) and "\n" not in str(info.value)
    tags = MlflowClient(uri).get_model_version("cunet", old).tags
    assert not any(k.startswith("promotion.") for k in tags)


def test_retrain_flow_fails_on_an_unavailable_registry(prefect_harness, tmp_path, monkeypatch):
    """The registry answers 503 TEMPORARILY_UNAVAILABLE on the alias look-up (a proxy in front
    of a real mlflow server): the flow run fails with that one line, after the configured
    retries, and promotes nothing (it used to promote without a comparison)."""
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain_flow
    from pipeline.tracking import RegistryError
    from tests.mlflow_server import FaultProxy, mlflow_server

    monkeypatch.chdir(tmp_path)
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    evalkit.make_eval_set(tmp_path / "sets")
    with mlflow_server(tmp_path / "server") as server:
        client = MlflowClient(server.uri)
        v1 = evalkit.register_tiny(client, tmp_path, "cunet", seed=1)
        client.set_registered_model_alias("cunet", "champion", v1)
        v2 = evalkit.register_tiny(client, tmp_path, "cunet", seed=2)
        with FaultProxy(server.uri, lambda path: "/registered-models/alias" in path) as proxy:
            _trained(tmp_path, "cunet", proxy.uri, v2)
            params_path = write_params(
                tmp_path, retrain={"rules": [CUNET_RULE], "registry_retries": 1}
            )
            state = retrain_flow(
                params_path=str(params_path),
                eval_root=str(tmp_path / "sets"),
                tracking_uri=proxy.uri,
                repro=False,
                workdir=str(tmp_path / "work"),
                repo_dir=str(tmp_path),
                return_state=True,
            )
            assert proxy.failed == 2 * 3  # two task runs, each the look-up and 2 HTTP retries
        assert state.is_failed()
        with pytest.raises(RegistryError, match=r"^models:/cunet@champion: .*503") as info:
            state.result()
        assert "\n" not in str(info.value)
        assert str(client.get_model_version_by_alias("cunet", "champion").version) == v1
        assert not any(
            k.startswith("promotion.") for k in client.get_model_version("cunet", v2).tags
        )
        assert not client.get_registered_model("cunet").aliases.get("challenger")


def test_retrain_flow_fails_when_repro_fails(prefect_harness, tmp_path, monkeypatch):
    from flows.retrain import ReproError, retrain_flow

    monkeypatch.chdir(tmp_path)
    params_path = write_params(
        tmp_path,
        retrain={"repro_command": ["python", "-c", "raise SystemExit(3)"], "repro_retries": 0},
    )
    state = retrain_flow(
        params_path=str(params_path),
        tracking_uri=evalkit.sqlite_uri(tmp_path),
        repo_dir=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(ReproError, match="exited with code 3"):
        state.result()


def test_deployments_and_schedule():
    """prefect.yaml's deployments point at real flows; its retraining cron equals params.yaml's
    and the one `python -m flows.retrain serve` uses."""
    from prefect.client.schemas.schedules import CronSchedule

    from flows.evaluate import evaluate_flow
    from flows.retrain import deployment, retrain_flow
    from flows.sweep import sweep_flow

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in doc["deployments"]}
    flows = {
        "retrain-weekly": retrain_flow,
        "evaluate": evaluate_flow,
        "ablation-sweep": sweep_flow,
    }
    assert set(deployments) == set(flows)
    for name, flow_obj in flows.items():
        path, func = deployments[name]["entrypoint"].split(":")
        assert (REPO / path).is_file()
        assert getattr(__import__(path[:-3].replace("/", "."), fromlist=[func]), func) is flow_obj
    rp = load_params(REPO / "params.yaml").retrain
    schedule = deployments["retrain-weekly"]["schedules"][0]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # a valid cron
    assert (schedule["cron"], schedule["timezone"]) == (rp.cron, rp.timezone)
    served = deployment(str(REPO / "params.yaml"))
    assert served.schedules[0].schedule.cron == schedule["cron"]
    assert served.schedules[0].schedule.timezone == schedule["timezone"]


# ---------------------------------------------------------------------------------------------
# ablation sweep on Ray Tune (two tiny trials)


@pytest.mark.slow
def test_sweep_flow_two_tiny_trials(prefect_harness, ray_session, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.sweep import sweep_flow

    monkeypatch.chdir(tmp_path)
    evalkit.make_eval_set(tmp_path / "sets", size=(64, 64))
    params_path = write_params(
        tmp_path,
        loader={"batch_size": 2, "crop": 32},
        train_cunet={"generator": "tiny", "iterations": 3, "checkpoint_every": 3, "log_every": 1},
        ray={"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "max_failures": 0},
        evaluate={"figures": {"enabled": False}},
        sweep={
            "evaluate_kind": "mse",
            "metric": "tiny/all/psnr_rgb",
            "mode": "max",
            "variants": [
                {"name": "lr-high", "overrides": {"train_cunet": {"optimizer_g": {"lr": 5e-2}}}},
                {"name": "lr-low", "overrides": {"train_cunet": {"optimizer_g": {"lr": 1e-6}}}},
            ],
        },
    )
    rows = sweep_flow(
        params_path=str(params_path),
        eval_root=str(tmp_path / "sets"),
        synthetic_samples=8,
        out_dir=str(tmp_path / "sweep"),
        name="t",
    )
    assert {r["variant"] for r in rows} == {"lr-high", "lr-low"}
    assert all(r["error"] is None for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # ranked, best (max PSNR) first

    out = tmp_path / "sweep" / "t"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == [r["variant"] for r in rows]
    assert (out / "summary.png").is_file()
    for r in rows:  # each trial evaluated with the evaluate stage's code and files
        result = json.loads((out / r["variant"] / "result.json").read_text())
        assert result["score"] == pytest.approx(r["score"])
        metrics = json.loads((out / r["variant"] / "eval" / "metrics.json").read_text())
        assert metrics["means"][r["variant"]]["tiny"]["all"]["psnr_rgb"] == pytest.approx(
            r["score"]
        )

    client = MlflowClient(evalkit.sqlite_uri(tmp_path))
    exp = client.get_experiment_by_name("cugan-sweep")
    runs = client.search_runs([exp.experiment_id])
    sweep_run = next(r for r in runs if r.info.run_name == "t")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert sorted(r.data.tags["sweep.variant"] for r in trials) == ["lr-high", "lr-low"]
    for trial in trials:
        assert "train_cunet.optimizer_g.lr" in trial.data.params  # flattened params
        assert "eval/tiny/all/psnr_rgb" in trial.data.metrics
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert [r.info.run_name for r in stages] == ["train_cunet"]
    assert sweep_run.data.tags["sweep.best_variant"] == rows[0]["variant"]
    assert not client.search_registered_models()  # ablation models are never registered


# ---------------------------------------------------------------------------------------------
# the sweep's pieces (no Ray)


def test_default_variants_are_the_papers_ablations(tmp_path):
    from pipeline.config import parse_params
    from pipeline.sweep import sweep_variants, variant_params

    params = parse_params({"sweep": {"include_gan_loss": True}})
    got = {}
    for v in sweep_variants(params):
        vp = variant_params(params, v, trial_dir=tmp_path / v.name)
        got[v.name] = (
            vp.train_cunet.generator,
            vp.train_cugan.generator,
            vp.train_cugan.discriminator,
            vp.train_cugan.gan_type,
        )
        # Ablation runs never compete for the champion alias, and log to the sweep experiment.
        assert vp.tracking.register_model is False and vp.tracking.log_model is False
        assert vp.tracking.experiment == params.sweep.mlflow_experiment
        assert vp.ray.storage_path == str((tmp_path / v.name).resolve() / "ray")
    assert got == {
        "cugan-1": ("cugan-1", "cugan-1", "authors", "vanilla"),
        "cugan-2": ("cugan-2", "cugan-2", "authors", "vanilla"),
        "cugan-3": ("cugan-3", "cugan-3", "authors", "vanilla"),
        "cugan-3-no-gfm": ("cugan-3", "cugan-3", "no-gfm", "vanilla"),
        "relativistic": ("cugan-3", "cugan-3", "authors", "relativistic"),
    }
    from models.registry import GENERATOR_CONFIGS

    blocks = {
        n: 2 * sum(GENERATOR_CONFIGS[n].blocks_per_scale) for n in ("cugan-1", "cugan-2", "cugan-3")
    }
    assert blocks == {"cugan-1": 12, "cugan-2": 12, "cugan-3": 12}  # equal total blocks
    assert [GENERATOR_CONFIGS[n].num_scales for n in blocks] == [1, 2, 3]


def test_variant_profile_and_bad_override(tmp_path):
    from pipeline.config import ConfigError, SweepVariant, parse_params
    from pipeline.sweep import deep_merge, variant_params

    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    params = parse_params({"sweep": {"profile": {"train_cunet": {"iterations": 7}}}})
    v = SweepVariant(name="x", overrides={"train_cunet": {"generator": "tiny"}})
    vp = variant_params(params, v, trial_dir=tmp_path)
    assert (vp.train_cunet.iterations, vp.train_cunet.generator) == (7, "tiny")
    bad = SweepVariant(name="typo", overrides={"train_cunet": {"generatr": "tiny"}})
    with pytest.raises(ConfigError, match=r"sweep variant 'typo'.*generatr"):
        variant_params(params, bad, trial_dir=tmp_path)


def test_rank_results_puts_failures_last():
    from pipeline.sweep import TrialResult, rank_results

    results = [
        TrialResult("a", 0.3, {}),
        TrialResult("b", None, {}, "boom"),
        TrialResult("c", 0.1, {}),
    ]
    assert [r.variant for r in rank_results(results, "min")] == ["c", "a", "b"]
    assert [r.variant for r in rank_results(results, "max")] == ["a", "c", "b"]
