"""Bad training configs fail in one line, naming the key, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, parse_params
from pipeline.pretrained import PretrainedWeightsMissing
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.trainer import available_cpus, check_stage, run_stage

REPO = Path(__file__).resolve().parents[1]


def _params(**sections):
    base = {
        "train_cunet": {"generator": "tiny"},
        "train_cugan": {"generator": "tiny", "discriminator": "tiny"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return parse_params(base)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train_cunet": {"itertions": 5}}, "train_cunet.itertions: unknown key"),
        (
            {"train_cugan": {"optimizer_d": {"lr": -1e-4}}},
            "train_cugan.optimizer_d.lr: Input should be greater than 0",
        ),
        ({"train_cunet": {"optimizer_g": {"betas": [0.9, 1.5]}}}, "betas must lie in [0, 1)"),
        ({"ray": {"num_workers": 0}}, "ray.num_workers"),
        (
            {"train_cugan": {"schedule": {"milestones": [5, 3]}}},
            "milestones must be positive and increasing",
        ),
    ],
)
def test_schema_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sections", "stage", "message"),
    [
        (
            {"train_cunet": {"generator": "huge"}},
            "cunet",
            "train_cunet.generator: unknown generator config 'huge'",
        ),
        ({"train_cugan": {"discriminator": "nope"}}, "cugan", "train_cugan.discriminator"),
        ({"loader": {"crop": 34}}, "cunet", "loader.crop: 34 is not a multiple of 4"),
        ({"loader": {"crop": 32}}, "cugan", "takes 64x64 patches"),
        (
            {"loader": {"batch_size": 5}, "ray": {"num_workers": 2}},
            "cunet",
            "not divisible by ray.num_workers=2",
        ),
        (
            {
                "ray": {"num_workers": available_cpus() + 1},
                "loader": {"batch_size": 16 * (available_cpus() + 1)},
            },
            "cunet",
            "CPUs, this machine offers",
        ),
        (
            {"train_cunet": {"weights": {"gan": 0.1}}},
            "cunet",
            "loss 'mse' trains on the pixel MSE only",
        ),
        (
            {"train_cunet": {"fixed_degradation": [5, 10]}},
            "cunet",
            "fixed_degradation: (5, 10) is outside",
        ),
        ({}, "unet", "unknown training stage 'unet'"),
    ],
)
def test_stage_checks(sections, stage, message, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as err:
        check_stage(_params(**sections), stage, shards_dir=None)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"shards: .*shards.json: not found"):
        check_stage(_params(), "cunet", shards_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"init checkpoint: .*no generator\.safetensors"):
        check_stage(_params(), "cugan", shards_dir=None, init_dir=tmp_path)
    with pytest.raises(ConfigError, match="either a shards directory or synthetic"):
        run_stage(_params(), "cunet", out_dir=tmp_path)


def test_imagenet_mode_refuses_to_start_without_vgg19(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = _params(
        base={"pretrained": "imagenet", "weights_dir": str(tmp_path / "weights")},
        tracking={"enabled": False},
        ray={"storage_path": str(tmp_path / "ray")},
    )
    with pytest.raises(PretrainedWeightsMissing) as err:
        # offline: the download fails and no file is in the cache
        run_stage(
            params,
            "cugan",
            out_dir=tmp_path / "out",
            test_hooks=TestHooks(synthetic=SyntheticData(num_samples=16, seed=0)),
        )
    text = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in text and str(tmp_path / "weights") in text and "\n" not in text


def test_stage_script_prints_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"train_cunet": {"optimizer_g": {"lr": -1}}}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            "--stage",
            "cunet",
            "--params",
            str(bad),
            "--shards",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: train_cunet.optimizer_g.lr: Input should be greater than 0 (got -1)"
    ]


def _local_imports(path: Path, seen: set[Path]) -> set[Path]:
    """Files of pipeline/stages/models modules imported by ``path``, transitively."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith(("pipeline", "stages", "models")):
                continue
            base = REPO.joinpath(*name.split("."))
            for found in (base.with_suffix(".py"), base / "__init__.py"):
                if found.is_file() and found not in seen:
                    seen.add(found)
                    _local_imports(found, seen)
    return seen


@pytest.mark.parametrize("stage", ["train_cunet", "train_cugan"])
def test_dvc_stage_declares_its_code_and_params(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    script = REPO / "stages" / "train.py"
    files = {script, REPO / "pipeline/train/pyfunc_entry.py", *_local_imports(script, set())}
    needed = {p.relative_to(REPO).as_posix() for p in files if p.name != "__init__.py"}
    assert not needed - set(spec["deps"]), f"dvc.yaml {stage} lacks deps"
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    for key in spec["params"]:
        obj = params
        for part in key.split("."):
            obj = getattr(obj, part)  # AttributeError: a params dep that does not exist
    assert f"train_{stage.split('_')[1]}" in spec["params"]
    assert "ray" not in spec["params"] and "tracking" not in spec["params"]
    assert any(str(m).endswith("metrics.json") for m in spec["metrics"][0])


def test_a_failed_run_is_reported_in_one_line():
    from pipeline.train.testing import InjectedFault
    from pipeline.train.trainer import failure_line

    err = RuntimeError(
        "Training failed.\nTraceback (most recent call last):\n  File x\nValueError: boom\n"
    )
    assert failure_line(err) == "ValueError: boom"
    err.worker_failures = {1: InjectedFault("at iteration 5\nmore"), 0: ValueError("bad")}
    assert failure_line(err) == "rank 0: ValueError: bad"
    err.worker_failures = {0: InjectedFault("at iteration 5\n  more"), 1: ValueError("bad")}
    assert failure_line(err) == "rank 0: InjectedFault: at iteration 5"
    err.worker_failures = {0: ValueError()}
    assert failure_line(err) == "rank 0: ValueError"
