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

Everything is written as PNG (matplotlib, Agg backend) plus CSV for ``dvc plots``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.atomic import atomic_write_text
from pipeline.config import Params
from pipeline.condition import setting_key

if TYPE_CHECKING:
    from models.generator import Generator
    from pipeline.evaluation import ModelSpec

__all__ = [
    "CurvePoint",
    "FigureInput",
    "alpha_strip",
    "centre_crop",
    "curve_csv",
    "make_figures",
    "make_figure_input",
    "modulation_curve",
    "modulation_grid",
    "plot_alpha_strip",
    "pyplot",
    "save_figure",
    "write_placeholders",
    "plot_curves",
    "plot_grid",
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
    from pipeline.degradation import degrade, to_tensor, to_uint8

    gen = torch.Generator().manual_seed(seed)
    x = to_tensor(clean).to(torch.float64)
    y = degrade(x, [blur], [noise], generator=gen, kernel_size=kernel_size)
    return FigureInput(name, clean, to_uint8(y.float()), float(blur), float(noise))


def _z(blur: float, noise: float, params: Params) -> torch.Tensor:
    from pipeline.condition import ConditionScale

    return ConditionScale.from_params(params.degradation).to_z(blur, noise)


def modulation_grid(
    model: Generator,
    fig_input: FigureInput,
    blurs: Sequence[float],
    noises: Sequence[float],
    params: Params,
    *,
    device: str | torch.device = "cpu",
) -> dict[tuple[float, float], np.ndarray]:
    """``{(blur, noise): restored uint8}`` for every level pair of the grid."""
    from pipeline.inference import restore

    return {
        (float(b), float(n)): restore(model, fig_input.degraded, _z(b, n, params), device=device)
        for n in noises
        for b in blurs
    }


def alpha_strip(
    mse_model: Generator,
    gan_model: Generator,
    fig_input: FigureInput,
    alphas: Sequence[float],
    params: Params,
    *,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """The true-``z`` restoration by the DNI blend for each alpha (0 = GAN, 1 = MSE)."""
    from models.dni import blend_generators
    from pipeline.inference import restore

    z = _z(fig_input.blur, fig_input.noise, params)
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
    params: Params,
    *,
    points: int = 11,
    device: str | torch.device = "cpu",
) -> list[CurvePoint]:
    """PSNR against each entry of ``z`` in ``points`` steps over [0, 1], the other at truth.

    All inputs must share the true levels. The PSNR is the mean over inputs of
    :func:`pipeline.metrics.psnr` (RGB, crop 0) between the uint8 restoration and the clean image.
    """
    from pipeline.degradation import to_tensor
    from pipeline.inference import restore
    from pipeline.metrics import psnr

    if not inputs:
        raise ValueError("modulation_curve needs at least one input")
    truth = {(i.blur, i.noise) for i in inputs}
    if len(truth) != 1:
        raise ValueError(
            f"modulation_curve inputs must share the true levels (got {sorted(truth)})"
        )
    zt = _z(inputs[0].blur, inputs[0].noise, params)[0].tolist()
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


def curve_csv(curves: dict[str, list[CurvePoint]], axis: str, params: Params) -> str:
    """Wide CSV for one axis: ``z, level, psnr_<model>...`` (one line per model in dvc plots)."""
    d = params.degradation
    scale = d.blur_max if axis == "blur" else d.noise_max
    models = list(curves)
    zs = [p.z for p in next(iter(curves.values())) if p.axis == axis]
    lines = ["z,level," + ",".join(f"psnr_{m}" for m in models)]
    for j, z in enumerate(zs):
        vals = [[p for p in curves[m] if p.axis == axis][j].psnr for m in models]
        lines.append(f"{z:.6g},{z * scale:.6g}," + ",".join(f"{v:.6g}" for v in vals))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# drawing (matplotlib, no display)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save a figure atomically (temporary sibling, then os.replace)."""
    plt = pyplot()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_grid(
    grid: dict[tuple[float, float], np.ndarray],
    fig_input: FigureInput,
    path: Path,
    *,
    title: str,
    blur_max: float = 4.0,
    noise_max: float = 50.0,
) -> Path:
    """Rows: noise level of z; columns: blur level of z; a left column with input and clean."""
    plt = pyplot()
    blurs = sorted({b for b, _ in grid})
    noises = sorted({n for _, n in grid})
    rows, cols = len(noises), len(blurs) + 1
    fig, axes = plt.subplots(
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
            ax.set_title(f"z=[{b / blur_max:.2f}, {n / noise_max:.2f}]", fontsize=8)
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
    plt = pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(2.0 * len(images), 2.3), squeeze=False)
    for ax, img, a in zip(axes[0], images, alphas, strict=True):
        ax.imshow(img)
        ax.axis("off")
        end = " (GAN)" if a == 0 else " (MSE)" if a == 1 else ""
        ax.set_title(f"alpha={a:g}{end}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_curves(
    curves: dict[str, list[CurvePoint]], true_z: tuple[float, float], path: Path, *, title: str
) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (axis, index) in zip(axes, (("blur", 0), ("noise", 1)), strict=True):
        for model, points in curves.items():
            pts = [p for p in points if p.axis == axis]
            ax.plot([p.z for p in pts], [p.psnr for p in pts], marker="o", label=model)
        ax.axvline(true_z[index], color="grey", linestyle="--", label="true z")
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
    loaded: dict[str, Generator] | None = None,
) -> list[Path]:
    """Grid per model and image, one alpha strip per image (first MSE and first GAN model with
    equal configs), and the modulation curves; PNGs under ``figures/``, curve CSVs under
    ``plots/``. Returns the files written."""
    from pipeline.checkpoint import load_generator
    from pipeline.evaluation import EvalError, load_eval_set
    from pipeline.imageio import read_rgb8
    from pipeline.inference import resolve_device

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
    nets: dict[str, Generator] = {}
    for spec in models:
        if loaded is not None and spec.name in loaded:
            nets[spec.name] = loaded[spec.name]
        elif not spec.path.exists():
            raise EvalError(f"model {spec.name}: checkpoint {spec.path} not found")
        else:
            nets[spec.name] = load_generator(spec.path)[0]
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    true_key = setting_key(fp.input_blur, fp.input_noise)
    for spec in models:
        for fi in inputs:
            grid = modulation_grid(
                nets[spec.name], fi, fp.grid_blur, fp.grid_noise, params, device=device
            )
            written.append(
                plot_grid(
                    grid,
                    fi,
                    out / "figures" / f"grid_{spec.name}_{_stem(fi.name)}.png",
                    title=f"{spec.name} ({spec.kind}): input {true_key}, restored over a z grid",
                    blur_max=d.blur_max,
                    noise_max=d.noise_max,
                )
            )
    mse = next((m for m in models if m.kind == "mse"), None)
    gan = next((m for m in models if m.kind == "gan"), None)
    if mse and gan and nets[mse.name].config == nets[gan.name].config:
        for fi in inputs:
            strip = alpha_strip(
                nets[mse.name], nets[gan.name], fi, fp.alphas, params, device=device
            )
            written.append(
                plot_alpha_strip(
                    strip,
                    fp.alphas,
                    out / "figures" / f"alpha_{_stem(fi.name)}.png",
                    title=f"DNI {gan.name} (alpha 0) -> {mse.name} (alpha 1) at {true_key}",
                )
            )
    elif mse and gan:
        log.warning(
            "no alpha strip: %s and %s have different generator configs", mse.name, gan.name
        )
    else:
        log.info("no alpha strip: it needs one MSE and one GAN model")
    curves = {
        spec.name: modulation_curve(
            nets[spec.name], inputs, params, points=fp.curve_points, device=device
        )
        for spec in models
    }
    if curves:
        for axis in ("blur", "noise"):
            path = out / "plots" / f"modulation_curve_{axis}.csv"
            atomic_write_text(path, curve_csv(curves, axis, params))
            written.append(path)
        true_z = (fp.input_blur / d.blur_max, fp.input_noise / d.noise_max)
        written.append(
            plot_curves(
                curves,
                true_z,
                out / "figures" / "modulation_curve.png",
                title=f"PSNR against z, true degradation {true_key} "
                f"({len(inputs)} image(s) of {set_name})",
            )
        )
    return written


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
