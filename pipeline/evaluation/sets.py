"""The degraded test sets as the ``evalsets`` data stage lays them out on disk.

``<root>/<name>/gt/<image>.png`` holds the clean images and ``<root>/<name>/<setting>/<image>.png``
one degraded copy per setting (``blur{r}_noise{sigma}``, :func:`pipeline.condition.setting_key`).
Only that layout is read; ``manifest.json`` beside it is for people and other tools.

:func:`fit_size` applies ``evaluate.size_mode`` to an image read from a set: ``crop16`` keeps
the top-left ``(H - H % 16) x (W - W % 16)`` pixels, like the authors' test code (their GAN
model's ``feed_data`` cuts ``H % 16`` rows and ``W % 16`` columns from the bottom/right of the
input and of the ground truth alike); ``pad`` keeps the image whole (the network pads and
crops back itself, :func:`pipeline.inference.restore`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.condition import setting_key
from pipeline.evaluation.terms import CROP_MULTIPLE, EvalError, SizeMode

__all__ = ["EvalSet", "fit_size", "load_eval_set"]


@dataclass(frozen=True)
class EvalSet:
    """``<root>/<name>/gt/<image>.png`` and ``<root>/<name>/<setting>/<image>.png``."""

    name: str
    path: Path
    images: tuple[str, ...]  # file names, sorted
    settings: tuple[tuple[float, float], ...]

    def gt_path(self, image: str) -> Path:
        return self.path / "gt" / image

    def degraded_path(self, setting: tuple[float, float], image: str) -> Path:
        return self.path / setting_key(*setting) / image


def load_eval_set(
    root: str | os.PathLike[str],
    name: str,
    settings: Sequence[tuple[float, float]],
    *,
    max_images: int | None = None,
) -> EvalSet:
    """Check that the set holds a clean image and one degraded image per setting for each name.

    A missing directory or image is an :class:`EvalError` naming it, never a silently smaller
    evaluation.
    """
    path = Path(root) / name
    gt_dir = path / "gt"
    if not gt_dir.is_dir():
        raise EvalError(f"evaluation set {name!r}: {gt_dir} not found (run the data stages first)")
    images = tuple(sorted(p.name for p in gt_dir.iterdir() if p.suffix.lower() == ".png"))
    if not images:
        raise EvalError(f"evaluation set {name!r}: no PNG images in {gt_dir}")
    if max_images is not None:
        images = images[:max_images]
    for setting in settings:
        d = path / setting_key(*setting)
        if not d.is_dir():
            raise EvalError(
                f"evaluation set {name!r}: setting directory {d} not found "
                "(is the setting in evalsets.settings?)"
            )
        missing = [img for img in images if not (d / img).is_file()]
        if missing:
            raise EvalError(
                f"evaluation set {name!r}: {d} lacks {len(missing)} image(s), e.g. {missing[0]}"
            )
    return EvalSet(name=name, path=path, images=images, settings=tuple(map(tuple, settings)))


def fit_size(image: np.ndarray, mode: SizeMode, *, where: str = "image") -> np.ndarray:
    """``image`` (H x W x C) as the size mode scores it: whole (``pad``), or its top-left
    multiple-of-16 part (``crop16``); EvalError where that leaves nothing."""
    if mode == "pad":
        return image
    if mode != "crop16":
        raise EvalError(f"unknown size mode {mode!r} (known: pad, crop16)")
    h, w = image.shape[:2]
    hc, wc = h - h % CROP_MULTIPLE, w - w % CROP_MULTIPLE
    if hc == 0 or wc == 0:
        raise EvalError(
            f"{where}: {h}x{w} is smaller than {CROP_MULTIPLE}x{CROP_MULTIPLE}: "
            "nothing is left by size_mode crop16"
        )
    return np.ascontiguousarray(image[:hc, :wc])
