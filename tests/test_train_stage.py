"""The two stages end to end on tiny real shards: CUnet -> CUGAN through Ray, MLflow and the
model registry, and the outputs the next stages read."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipeline.checkpoint import load_generator
from pipeline.config import ShardParams, parse_params
from pipeline.data.shards import write_shards
from pipeline.degradation import degrade, to_tensor, to_uint8
from pipeline.imageio import write_png
from pipeline.inference import restore
from pipeline.train.trainer import run_stage

pytestmark = pytest.mark.slow

SETTINGS = [[0, 30], [2, 15]]


def _image(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def _save(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, array)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = {f"img{i}-y0-x0": _image(i, 96) for i in range(12)}
    write_shards(
        [{"key": k} for k in images],
        lambda s: _png(images[s["key"]]),
        root / "shards",
        ShardParams(max_count=8),
        crop_size=96,
    )
    gen = torch.Generator().manual_seed(0)
    for name, seed in (("a.png", 100), ("b.png", 101)):
        clean = _image(seed, 48)
        _save(root / "evalsets/holdout/gt" / name, clean)
        for r, s in SETTINGS:
            out = degrade(to_tensor(clean), [r], [s], generator=gen)
            _save(root / f"evalsets/holdout/blur{r}_noise{s}" / name, to_uint8(out))
    return root


def test_cunet_then_cugan(data, tmp_path, monkeypatch, ray_session):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUGAN_MLFLOW_PARENT_RUN_ID", raising=False)
    validation = {
        "every": 3,
        "images": 2,
        "crop": 32,
        "grid_every": 6,
        "grid_setting": [2, 15],
        "grid_blur": [0, 4],
        "grid_noise": [0, 50],
    }
    params = parse_params(
        {
            "base": {"pretrained": "random"},
            "evalsets": {"settings": SETTINGS},
            "loader": {"backend": "torch", "num_threads": 1, "batch_size": 4, "crop": 64},
            "train_cunet": {
                "generator": "tiny",
                "iterations": 6,
                "checkpoint_every": 3,
                "log_every": 2,
                "validation": validation,
            },
            "train_cugan": {
                "generator": "tiny",
                "discriminator": "tiny",
                "perceptual_layer": "conv2_2",
                "iterations": 3,
                "checkpoint_every": 3,
                "log_every": 1,
                "validation": {**validation, "every": 0, "grid_every": 0},
            },
            "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "use_gpu": False},
            "tracking": {
                "uri": f"sqlite:///{tmp_path}/mlflow.db",
                "artifact_location": str(tmp_path / "art"),
            },
        }
    )
    cunet = run_stage(
        params,
        "cunet",
        out_dir=tmp_path / "train_cunet",
        shards_dir=data / "shards",
        evalsets_dir=data / "evalsets",
    )
    cugan = run_stage(
        params,
        "cugan",
        out_dir=tmp_path / "train_cugan",
        shards_dir=data / "shards",
        evalsets_dir=data / "evalsets",
        init_dir=cunet.model_dir,
    )

    # outputs the next stages read
    metrics = json.loads((tmp_path / "train_cunet" / "metrics.json").read_text())
    for key in (
        "val/psnr/blur0_noise30",
        "val/psnr/blur2_noise15",
        "val/psnr_input/mean",
        "loss/mse",
    ):
        assert np.isfinite(metrics[key]), key
    assert metrics["iteration"] == 6
    gan_metrics = json.loads((tmp_path / "train_cugan" / "metrics.json").read_text())
    assert {"loss/g_percep", "loss/d_real", "val/psnr/mean"} <= set(gan_metrics)
    mse_model, meta = load_generator(cunet.model_dir)
    gan_model, gan_meta = load_generator(cugan.model_dir)
    assert meta["stage"] == "cunet" and gan_meta["stage"] == "cugan" and gan_meta["iteration"] == 3
    tracking = [json.loads((r.model_dir / "tracking.json").read_text()) for r in (cunet, cugan)]
    assert tracking[0]["parent_run_id"] == tracking[1]["parent_run_id"]

    # MLflow: child runs under one parent, per-iteration losses, validation, grid, tags
    client = MlflowClient(cunet.tracking.uri)
    run = client.get_run(cunet.tracking.run_id)
    assert run.data.tags["pretrained_backbones"] == "none"
    assert client.get_run(cugan.tracking.run_id).data.tags["pretrained_backbones"] == "random"
    assert run.data.params["train_cunet.generator"] == "tiny"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/mse")] == list(
        range(1, 7)
    )
    assert [
        m.step for m in client.get_metric_history(run.info.run_id, "val/psnr/blur2_noise15")
    ] == [3, 6]
    assert client.get_metric_history(run.info.run_id, "perf/samples_per_s")
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "modulation")]
    assert grids == ["modulation/train_cunet_iter00000006.png"]

    # registry: both models, and the pyfunc's alpha blends them exactly at the ends
    for name in ("cunet", "cugan"):
        assert client.get_model_version(name, "1").run_id in (
            cunet.tracking.run_id,
            cugan.tracking.run_id,
        )
    model = mlflow.pyfunc.load_model("models:/cugan/1")
    image = _image(7, 40)
    z = np.array([[0.5, 0.3]], dtype=np.float32)
    for alpha, reference in ((1.0, mse_model), (0.0, gan_model)):
        out = model.predict({"image": image[None], "z": z}, params={"alpha": alpha})
        assert np.array_equal(out[0], restore(reference, image, z[0]))
    # `cugan restore --model <checkpoint dir>` reads the stage output as it is
    from pipeline.cli import main as cli

    source = tmp_path / "in.png"
    _save(source, image)
    assert (
        cli(
            [
                "restore",
                str(source),
                str(tmp_path / "out.png"),
                "--model",
                str(cugan.model_dir),
                "--blur",
                "2",
                "--noise",
                "15",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "out.png").is_file()
    with pytest.raises(ValueError, match="alpha must be 1"):
        mlflow.pyfunc.load_model("models:/cunet/1").predict(
            {"image": image[None], "z": z}, params={"alpha": 0.5}
        )
