"""Tiny evaluation fixtures shared by the evaluation/figures/flows/promotion tests (imported as a
plain module; not a conftest): a two-image evaluation set in the data stage's layout, tiny
generator checkpoints, params, and an MLflow sqlite store inside the test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import save_generator
from pipeline.condition import DEFAULT_SCALE, setting_key
from pipeline.config import Params, parse_params
from pipeline.degradation import degrade, to_tensor, to_uint8
from pipeline.imageio import write_png

SETTINGS = ((0.0, 15.0), (2.0, 30.0))
SET_NAME = "tiny"


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour image with some edges (so that blur and noise both matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for _ in range(3):
        fy, fx, ph = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3), rng.uniform(0, 6.28)
        channels.append(0.5 + 0.35 * np.sin(fy * yy + fx * xx + ph))
    img = np.stack(channels, axis=-1)
    img[h // 3 : 2 * h // 3, w // 4 : w // 2] *= 0.4  # a dark block: sharp edges
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def make_eval_set(
    root: Path, *, name: str = SET_NAME, settings=SETTINGS, n: int = 2, size=(32, 40), seed: int = 0
) -> Path:
    """``root/<name>/gt/*.png`` + ``root/<name>/<setting>/*.png`` + manifest, as the data stage."""
    files = []
    (root / name / "gt").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = f"img{i}.png"
        clean = smooth_image(*size, seed=seed + i)
        write_png(root / name / "gt" / image, clean)
        for j, (r, s) in enumerate(settings):
            d = root / name / setting_key(r, s)
            d.mkdir(exist_ok=True)
            gen = torch.Generator().manual_seed(1000 * seed + 10 * i + j)
            degraded = to_uint8(degrade(to_tensor(clean), [r], [s], generator=gen))
            write_png(d / image, degraded)
            files.append(
                {
                    "file": f"{setting_key(r, s)}/{image}",
                    "blur": r,
                    "noise": s,
                    "z": DEFAULT_SCALE.to_z([r], [s])[0].tolist(),
                }
            )
    (root / name / "manifest.json").write_text(json.dumps({"files": files}))
    return root


def tiny_generator(seed: int, *, damage: float = 0.0) -> torch.nn.Module:
    """The registry's "tiny" generator; ``damage`` > 0 adds that much Gaussian noise to every
    weight, which makes its restorations clearly worse (for promotion tests)."""
    from models.registry import build_generator

    model = build_generator("tiny", generator=torch.Generator().manual_seed(seed))
    if damage:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(damage * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_tiny(
    out_dir: Path, seed: int, *, damage: float = 0.0, metadata: dict | None = None
) -> Path:
    return save_generator(
        out_dir,
        tiny_generator(seed, damage=damage),
        metadata=metadata or {"stage": "test", "seed": seed},
    )


def tiny_params(**evaluate: Any) -> Params:
    """Params for the tiny set: CPU, random backbones, small figures; ``evaluate`` overrides."""
    ev = {
        "sets": [SET_NAME],
        "device": "cpu",
        "figures": {
            "crop": 16,
            "grid_blur": [0, 2],
            "grid_noise": [0, 30],
            "curve_points": 3,
            "input_blur": 2,
            "input_noise": 30,
            "alphas": [0, 0.5, 1],
        },
    }
    ev.update(evaluate)
    return parse_params(
        {
            "base": {"pretrained": "random"},
            "evalsets": {"settings": [list(s) for s in SETTINGS]},
            "evaluate": ev,
        }
    )


def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def register_tiny(
    client,
    tmp_path: Path,
    name: str,
    seed: int,
    *,
    damage: float = 0.0,
    layout: str = "model/artifacts/mse",
) -> str:
    """Log a tiny checkpoint as run artifacts under ``layout`` (the training stages' pyfunc
    layout by default) and register it as a new version of ``name``; returns the version.
    Uses the client only: ``mlflow.set_tracking_uri`` would export MLFLOW_TRACKING_URI to every
    later subprocess (Ray workers included)."""
    ckpt = save_tiny(tmp_path / f"ckpt-{name}-{seed}-{damage}", seed=seed, damage=damage)
    exp = client.get_experiment_by_name("registry-test")
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            "registry-test", artifact_location=(tmp_path / "mlartifacts").as_uri()
        )
    )
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(ckpt), artifact_path=layout)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/{layout.split('/')[0]}"
    return str(client.create_model_version(name, source=source, run_id=run.info.run_id).version)


def evaluate_with_input(specs, root: Path, params: Params, loaded):
    """``evaluate_models`` on the tiny set with the degraded input as the one reference."""
    from pipeline.evaluation.scoring import evaluate_models
    from pipeline.evaluation.specs import ReferenceSpec

    return evaluate_models(
        specs,
        root,
        params,
        loaded=loaded,
        references=[ReferenceSpec("input", "input")],
        progress=False,
    )
