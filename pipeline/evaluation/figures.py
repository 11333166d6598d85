"""Modulation figures in the manner of the paper's Figure 4, and the modulation curve.

* **Grid** (:func:`modulation_grid`): ONE degraded input (the clean image degraded at
  ``input_blur, input_noise`` with the pipeline's own :func:`pipeline.degradation.degrade` and a
  seeded generator) restored with every ``z`` of a blur x noise grid: what a user sees moving the
  two sliders. The cell at the true ``z`` is framed.
* **Alpha strip** (:func:`alpha_strip`): the same input at the true ``z``, restored by the DNI
  blend of the GAN and MSE models (:func:`models.dni.blend_generators`) for each alpha
  (0 = GAN, 1 = MSE).
* **Modulation curve** (:func:`modulation_curve`): PSNR (RGB) of the restoration against one
  entry of ``z`` swept over [0, 1], the other entry at its true value. For a trained model the
  best ``z`` should sit at the true degradation; a curve that peaks elsewhere means the
  condition network has not learnt what the sliders mean.

Levels become z through each model's own :class:`~pipeline.condition.ConditionScale`, the one
its checkpoint records (:func:`pipeline.evaluation.specs.load_model`), exactly as in scoring.
Everything is written as PNG (matplotlib without pyplot; each file atomically) plus CSV for
``dvc plots``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from models.dni import blend_generators
from models.generator import Generator
from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.condition import ConditionScale, setting_key
from pipeline.config import Params
from pipeline.degradation import degrade, to_tensor, to_uint8
from pipeline.device import resolve_device
from pipeline.evaluation.sets import load_eval_set
from pipeline.evaluation.specs import ModelSpec, Prebuilt, load_model
from pipeline.imageio import read_rgb8
from pipeline.inference import restore
from pipeline.metrics import psnr

__all__ = [
    "CurvePoint",
    "FigureInput",
    "alpha_strip",
    "centre_crop",
    "curve_csv",
    "make_figure_input",
    "make_figures",
    "modulation_curve",
    "modulation_grid",
    "new_figure",
    "plot_alpha_strip",
    "plot_curves",
    "plot_grid",
    "save_figure",
    "write_placeholders",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FigureInput:
    """A clean image, its degraded version and the true levels that produced it."""

    name: str
    clean: np.ndarray  # uint8 HxWx3
    degraded: np.ndarray  # uint8 HxWx3
    blur: float
    noise: float


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size x size`` window (or the whole side where the image is smaller)."""
    h, w = image.shape[:2]
    ch, cw = min(size, h), min(size, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def make_figure_input(
    name: str,
    clean: np.ndarray,
    blur: float,
    noise: float,
    *,
    seed: int = 0,
    kernel_size: int = 21,
) -> FigureInput:
    """Degrade ``clean`` at ``(blur, noise)`` with a generator seeded from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = to_tensor(clean).to(torch.float64)
    y = degrade(x, [blur], [noise], generator=gen, kernel_size=kernel_size)
    return FigureInput(name, clean, to_uint8(y.float()), float(blur), float(noise))


def modulation_grid(
    model: Generator,
    fig_input: FigureInput,
    blurs: Sequence[float],
    noises: Sequence[float],
    scale: ConditionScale,
    *,
    device: str | torch.device = "cpu",
) -> dict[tuple[float, float], np.ndarray]:
    """``{(blur, noise): restored uint8}`` for every level pair of the grid, z = ``scale``'s."""
    return {
        (float(b), float(n)): restore(model, fig_input.degraded, scale.to_z(b, n), device=device)
        for n in noises
        for b in blurs
    }


def alpha_strip(
    mse_model: Generator,
    gan_model: Generator,
    fig_input: FigureInput,
    alphas: Sequence[float],
    scale: ConditionScale,
    *,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """The true-``z`` restoration by the DNI blend for each alpha (0 = GAN, 1 = MSE); both
    models share ``scale`` (a blend of models with different scales means nothing)."""
    z = scale.to_z(fig_input.blur, fig_input.noise)
    return [
        restore(
            blend_generators(mse_model, gan_model, float(a)), fig_input.degraded, z, device=device
        )
        for a in alphas
    ]


@dataclass(frozen=True)
class CurvePoint:
    axis: str  # "blur" or "noise": the entry of z that is swept
    z: float  # value of that entry
    z_blur: float
    z_noise: float
    psnr: float  # mean over the inputs, RGB, no border crop


def modulation_curve(
    model: Generator,
    inputs: Sequence[FigureInput],
    scale: ConditionScale,
    *,
    points: int = 11,
    device: str | torch.device = "cpu",
) -> list[CurvePoint]:
    """PSNR against each entry of ``z`` in ``points`` steps over [0, 1], the other at the true
    z (the true levels through ``scale``).

    All inputs must share the true levels. The PSNR is the mean over inputs of
    :func:`pipeline.metrics.psnr` (RGB, crop 0) between the uint8 restoration and the clean image.
    """
    if not inputs:
        raise ValueError("modulation_curve needs at least one input")
    truth = {(i.blur, i.noise) for i in inputs}
    if len(truth) != 1:
        raise ValueError(
            f"modulation_curve inputs must share the true levels (got {sorted(truth)})"
        )
    zt = scale.to_z(inputs[0].blur, inputs[0].noise)[0].tolist()
    out = []
    for axis, index in (("blur", 0), ("noise", 1)):
        for value in np.linspace(0.0, 1.0, points):
            z = list(zt)
            z[index] = float(value)
            scores = [
                float(
                    psnr(
                        to_tensor(restore(model, i.degraded, torch.tensor([z]), device=device)),
                        to_tensor(i.clean),
                    )[0]
                )
                for i in inputs
            ]
            out.append(CurvePoint(axis, float(value), z[0], z[1], float(np.mean(scores))))
    return out


def curve_csv(
    curves: Mapping[str, list[CurvePoint]], axis: str, scales: Mapping[str, ConditionScale]
) -> str:
    """Wide CSV for one axis: ``z, level, psnr_<model>...`` (one line per model in dvc plots).

    ``level`` is the swept z in the units of the levels, through the model's scale
    (:meth:`ConditionScale.to_levels`); where the models' scales give different levels, each
    model gets its own ``level_<model>`` column instead.
    """
    models = list(curves)
    zs = [p.z for p in next(iter(curves.values())) if p.axis == axis]
    levels = {m: [_level(scales[m], axis, z) for z in zs] for m in models}
    shared = all(levels[m] == levels[models[0]] for m in models)
    level_cols = ["level"] if shared else [f"level_{m}" for m in models]
    lines = [",".join(["z", *level_cols, *(f"psnr_{m}" for m in models)])]
    for j, z in enumerate(zs):
        row_levels = [levels[models[0]][j]] if shared else [levels[m][j] for m in models]
        vals = [[p for p in curves[m] if p.axis == axis][j].psnr for m in models]
        lines.append(",".join(f"{v:.6g}" for v in (z, *row_levels, *vals)))
    return "\n".join(lines) + "\n"


def _level(scale: ConditionScale, axis: str, z: float) -> float:
    """The level of one entry of z (the other entry at 0)."""
    blur, noise = scale.to_levels([z, 0.0] if axis == "blur" else [0.0, z])
    return float((blur if axis == "blur" else noise)[0])


# ---------------------------------------------------------------------------------------------
# drawing (matplotlib's object API: files only, no display)


def new_figure(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True
) -> tuple[Figure, Any]:
    """A figure and its axes, without pyplot: no global backend or figure registry is touched
    (nothing is ever shown), and nothing needs closing. The sweep's summary chart uses it too."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render a figure to PNG in memory and write it atomically (:mod:`pipeline.atomic`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_grid(
    grid: dict[tuple[float, float], np.ndarray],
    fig_input: FigureInput,
    path: Path,
    *,
    title: str,
    scale: ConditionScale,
) -> Path:
    """Rows: noise level of z; columns: blur level of z; a left column with input and clean."""
    blurs = sorted({b for b, _ in grid})
    noises = sorted({n for _, n in grid})
    rows, cols = len(noises), len(blurs) + 1
    fig, axes = new_figure(
        max(rows, 2), cols, figsize=(2.0 * cols, 2.0 * max(rows, 2)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(fig_input.degraded)
    axes[0, 0].set_title(f"input r{fig_input.blur:g} s{fig_input.noise:g}", fontsize=8)
    axes[1, 0].imshow(fig_input.clean)
    axes[1, 0].set_title("clean", fontsize=8)
    for i, n in enumerate(noises):
        for j, b in enumerate(blurs):
            ax = axes[i, j + 1]
            ax.imshow(grid[(b, n)])
            zb, zn = scale.to_z(b, n)[0].tolist()
            ax.set_title(f"z=[{zb:.2f}, {zn:.2f}]", fontsize=8)
            if (b, n) == (fig_input.blur, fig_input.noise):
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(3)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_alpha_strip(
    images: Sequence[np.ndarray], alphas: Sequence[float], path: Path, *, title: str
) -> Path:
    fig, axes = new_figure(1, len(images), figsize=(2.0 * len(images), 2.3), squeeze=False)
    for ax, img, a in zip(axes[0], images, alphas, strict=True):
        ax.imshow(img)
        ax.axis("off")
        end = " (GAN)" if a == 0 else " (MSE)" if a == 1 else ""
        ax.set_title(f"alpha={a:g}{end}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_curves(
    curves: Mapping[str, list[CurvePoint]],
    true_z: Mapping[str, tuple[float, float]],
    path: Path,
    *,
    title: str,
) -> Path:
    """Both curves of every model; a dashed line at each distinct true z (one per scale)."""
    fig, axes = new_figure(1, 2, figsize=(9, 3.5))
    for ax, (axis, index) in zip(axes, (("blur", 0), ("noise", 1)), strict=True):
        for model, points in curves.items():
            pts = [p for p in points if p.axis == axis]
            ax.plot([p.z for p in pts], [p.psnr for p in pts], marker="o", label=model)
        truths = sorted({z[index] for z in true_z.values()})
        for value in truths:
            ax.axvline(
                value, color="grey", linestyle="--", label="true z" if len(truths) == 1 else None
            )
        ax.set_xlabel(f"z_{axis} (other entry at its true value)")
        ax.set_ylabel("PSNR RGB (dB)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# the figure set of an evaluation


def make_figures(
    models: Sequence[ModelSpec],
    eval_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: Params,
    *,
    loaded: Mapping[str, Prebuilt] | None = None,
) -> list[Path]:
    """Grid per model and image, one alpha strip per image (first MSE and first GAN model with
    equal configs and scales), and the modulation curves; PNGs under ``figures/``, curve CSVs
    under ``plots/``. Each model is driven with its own checkpoint's z scale (``loaded`` as in
    :func:`pipeline.evaluation.scoring.evaluate_models`). Returns the files written."""
    fp, d = params.evaluate.figures, params.degradation
    set_name = fp.set or (params.evaluate.sets or params.evalsets.sets)[0]
    es = load_eval_set(eval_root, set_name, [], max_images=fp.images)
    inputs = [
        make_figure_input(
            name,
            centre_crop(read_rgb8(es.gt_path(name)).array, fp.crop),
            fp.input_blur,
            fp.input_noise,
            seed=fp.seed + i,
            kernel_size=d.kernel_size,
        )
        for i, name in enumerate(es.images)
    ]
    device = resolve_device(params.evaluate.device)
    nets = {spec.name: load_model(spec, loaded) for spec in models}
    scales = {name: net.scale for name, net in nets.items()}
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    true_key = setting_key(fp.input_blur, fp.input_noise)
    for spec in models:
        for fi in inputs:
            grid = modulation_grid(
                nets[spec.name].model,
                fi,
                fp.grid_blur,
                fp.grid_noise,
                scales[spec.name],
                device=device,
            )
            written.append(
                plot_grid(
                    grid,
                    fi,
                    out / "figures" / f"grid_{spec.name}_{_stem(fi.name)}.png",
                    title=f"{spec.name} ({spec.kind}): input {true_key}, restored over a z grid",
                    scale=scales[spec.name],
                )
            )
    written += _alpha_strips(models, nets, inputs, fp.alphas, out, true_key, device)
    curves = {
        spec.name: modulation_curve(
            nets[spec.name].model,
            inputs,
            scales[spec.name],
            points=fp.curve_points,
            device=device,
        )
        for spec in models
    }
    if curves:
        for axis in ("blur", "noise"):
            path = out / "plots" / f"modulation_curve_{axis}.csv"
            atomic_write_text(path, curve_csv(curves, axis, scales))
            written.append(path)
        true_z = {
            m: tuple(scales[m].to_z(fp.input_blur, fp.input_noise)[0].tolist()) for m in curves
        }
        written.append(
            plot_curves(
                curves,
                true_z,  # type: ignore[arg-type]
                out / "figures" / "modulation_curve.png",
                title=f"PSNR against z, true degradation {true_key} "
                f"({len(inputs)} image(s) of {set_name})",
            )
        )
    return written


def _alpha_strips(
    models: Sequence[ModelSpec],
    nets: Mapping[str, Any],
    inputs: Sequence[FigureInput],
    alphas: Sequence[float],
    out: Path,
    true_key: str,
    device: torch.device,
) -> list[Path]:
    """The DNI strip of the first MSE and first GAN model, where the two can be blended."""
    mse = next((m for m in models if m.kind == "mse"), None)
    gan = next((m for m in models if m.kind == "gan"), None)
    if mse is None or gan is None:
        log.info("no alpha strip: it needs one MSE and one GAN model")
        return []
    a, b = nets[mse.name], nets[gan.name]
    if a.model.config != b.model.config:
        log.warning(
            "no alpha strip: %s and %s have different generator configs", mse.name, gan.name
        )
        return []
    if a.scale != b.scale:
        log.warning(
            "no alpha strip: %s (%s) and %s (%s) were trained with different z scales",
            mse.name,
            a.scale.describe(),
            gan.name,
            b.scale.describe(),
        )
        return []
    return [
        plot_alpha_strip(
            alpha_strip(a.model, b.model, fi, alphas, a.scale, device=device),
            alphas,
            out / "figures" / f"alpha_{_stem(fi.name)}.png",
            title=f"DNI {gan.name} (alpha 0) -> {mse.name} (alpha 1) at {true_key}",
        )
        for fi in inputs
    ]


def _stem(name: str) -> str:
    return Path(name).stem


def write_placeholders(out_dir: str | os.PathLike[str]) -> list[Path]:
    """With figures disabled, the files the DVC stage declares still exist: an empty
    ``figures/`` (with a note) and header-only curve CSVs."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = [
        atomic_write_text(
            out / "figures" / "README.txt", "Figures disabled (evaluate.figures.enabled: false).\n"
        )
    ]
    for axis in ("blur", "noise"):
        written.append(
            atomic_write_text(out / "plots" / f"modulation_curve_{axis}.csv", "z,level\n")
        )
    return written
