"""Validation while training: PSNR per degradation setting, and a modulation grid image.

Runs on rank 0 only, on a few images of an evaluation set made by the data stage
(``<evalsets>/<set>/gt`` and ``<evalsets>/<set>/blur{r}_noise{sigma}``; the degraded images are
the stored 8-bit PNGs, so they are the ones evaluation uses). Each image is centre-cropped to
``validation.crop`` pixels to keep this cheap on a CPU. Outputs are rounded to 8 bits (as a
saved PNG would be) and scored with :func:`pipeline.metrics.psnr` on RGB, no border crop.

The PSNR of the degraded input itself is reported beside the model's (``val/psnr_input/...``),
so "the model learned something" is a comparison in the same run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.condition import ConditionScale, setting_key
from pipeline.config import Params, TrainStageParams
from pipeline.degradation import to_tensor
from pipeline.imageio import read_rgb8
from pipeline.inference import PreparedModel, Workload, prepare_model, restore
from pipeline.metrics import psnr

__all__ = [
    "ValidationError",
    "ValidationSet",
    "find_validation_images",
    "load_validation_set",
    "modulation_grid_image",
    "validate",
    "validation_settings",
]

log = logging.getLogger(__name__)

Setting = tuple[float, float]


class ValidationError(ValueError):
    """The evaluation set cannot serve validation as configured (one-line message)."""


def validation_settings(params: Params, stage: TrainStageParams) -> tuple[Setting, ...]:
    """``validation.settings`` or all of ``evalsets.settings``; a fixed-degradation stage (a
    baseline) validates on its own setting only."""
    if stage.fixed_degradation is not None:
        return (tuple(map(float, stage.fixed_degradation)),)
    return tuple(
        tuple(map(float, s)) for s in (stage.validation.settings or params.evalsets.settings)
    )


def find_validation_images(
    evalsets_dir: str | os.PathLike[str], set_name: str, settings: tuple[Setting, ...], count: int
) -> tuple[Path, tuple[str, ...]]:
    """The set's directory and its first ``count`` image names (sorted), checking that each has
    a degraded version per setting. Reads the layout only (the data stage's format), so that
    training does not depend on the evaluation code."""
    root = Path(evalsets_dir) / set_name
    gt = root / "gt"
    if not gt.is_dir():
        raise ValidationError(
            f"evaluation set {set_name!r}: {gt} not found (run the data stages first)"
        )
    names = tuple(sorted(p.name for p in gt.iterdir() if p.suffix.lower() == ".png"))[:count]
    if not names:
        raise ValidationError(f"evaluation set {set_name!r}: no PNG images in {gt}")
    for setting in settings:
        missing = [n for n in names if not (root / setting_key(*setting) / n).is_file()]
        if missing:
            raise ValidationError(
                f"evaluation set {set_name!r}: {root / setting_key(*setting) / missing[0]} "
                "not found (is the setting in evalsets.settings?)"
            )
    return root, names


@dataclass(frozen=True)
class ValidationSet:
    """Centre crops of the clean images and of their degraded versions, per setting."""

    names: tuple[str, ...]
    settings: tuple[Setting, ...]
    clean: dict[str, np.ndarray]
    degraded: dict[tuple[Setting, str], np.ndarray]
    input_psnr: dict[str, float]  # metric key -> PSNR of the degraded input


def _z(setting: Setting, params: Params) -> torch.Tensor:
    return ConditionScale.from_params(params.degradation).to_z(setting[0], setting[1])


def _crop(image: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """Centre crop to ``size`` (or the image's side) rounded down to the generator's multiple."""
    h, w = image.shape[:2]
    ch, cw = (max(multiple, v - v % multiple) for v in (min(size, h), min(size, w)))
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(psnr(to_tensor(a), to_tensor(b))[0])


def load_validation_set(
    evalsets_dir: str | os.PathLike[str],
    params: Params,
    stage: TrainStageParams,
    size_multiple: int,
) -> ValidationSet:
    """Read the validation images once (see :func:`validation_settings`)."""
    val = stage.validation
    settings = validation_settings(params, stage)
    root, names = find_validation_images(evalsets_dir, val.set, settings, val.images)
    clean: dict[str, np.ndarray] = {}
    degraded: dict[tuple[Setting, str], np.ndarray] = {}
    input_psnr: dict[str, float] = {}
    for name in names:
        clean[name] = _crop(read_rgb8(root / "gt" / name).array, val.crop, size_multiple)
        for setting in settings:
            image = read_rgb8(root / setting_key(*setting) / name).array
            degraded[(setting, name)] = _crop(image, val.crop, size_multiple)
    for setting in settings:
        scores = [_psnr(degraded[(setting, n)], clean[n]) for n in names]
        input_psnr[f"val/psnr_input/{setting_key(*setting)}"] = float(np.mean(scores))
    input_psnr["val/psnr_input/mean"] = float(np.mean(list(input_psnr.values())))
    log.info("validation: %d image(s) of %r, %d setting(s)", len(names), val.set, len(settings))
    return ValidationSet(names, settings, clean, degraded, input_psnr)


def _prepared(
    model: nn.Module, device: torch.device, images: int, like: np.ndarray
) -> PreparedModel:
    """The live generator on the fastest EXACT path for this pass (fp32: validation numbers
    must not depend on the machine's bf16 support); made anew for every pass, since training
    changes the weights in between (a path that copied them would be stale)."""
    return prepare_model(
        model,
        device=device,
        precision="fp32",
        workload=Workload(images=images, pixels=like.shape[0] * like.shape[1]),
        quiet=True,
    )


def validate(
    model: nn.Module, vset: ValidationSet, params: Params, device: torch.device
) -> dict[str, float]:
    """``{"val/psnr/blur{r}_noise{sigma}": dB, ..., "val/psnr/mean": dB, "val/psnr_gain": dB}``.

    ``model`` is the plain generator; it is left in train mode afterwards.
    """
    out: dict[str, float] = {}
    try:
        first = vset.degraded[(vset.settings[0], vset.names[0])]
        prepared = _prepared(model, device, len(vset.settings) * len(vset.names), first)
        for setting in vset.settings:
            z = _z(setting, params)
            scores = [
                _psnr(restore(prepared, vset.degraded[(setting, n)], z), vset.clean[n])
                for n in vset.names
            ]
            out[f"val/psnr/{setting_key(*setting)}"] = float(np.mean(scores))
    finally:
        model.train()
    out["val/psnr/mean"] = float(np.mean(list(out.values())))
    out["val/psnr_gain"] = out["val/psnr/mean"] - vset.input_psnr["val/psnr_input/mean"]
    return out


def modulation_grid_image(
    model: nn.Module,
    vset: ValidationSet,
    stage: TrainStageParams,
    params: Params,
    device: torch.device,
) -> np.ndarray:
    """One uint8 mosaic: the first image degraded at ``grid_setting`` restored with z over
    ``grid_noise`` (rows) x ``grid_blur`` (columns); the left column shows the input (top)
    and the clean image (below it)."""
    val = stage.validation
    setting = tuple(map(float, val.grid_setting))
    name = vset.names[0]
    source = vset.degraded.get((setting, name))
    if source is None:  # e.g. a baseline validating on one other setting
        setting = vset.settings[0]
        source = vset.degraded[(setting, name)]
    h, w = source.shape[:2]
    gap = 2
    rows, cols = len(val.grid_noise), len(val.grid_blur) + 1
    mosaic = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)

    def put(r: int, c: int, tile: np.ndarray) -> None:
        mosaic[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile

    put(0, 0, source)
    if rows > 1:
        put(1, 0, vset.clean[name])
    try:
        prepared = _prepared(model, device, len(val.grid_noise) * len(val.grid_blur), source)
        for r, noise in enumerate(val.grid_noise):
            for c, blur in enumerate(val.grid_blur):
                put(r, c + 1, restore(prepared, source, _z((blur, noise), params)))
    finally:
        model.train()
    return mosaic
