"""The words every evaluation module shares: model kinds, the metrics and their directions, and
the one error type of the package. Imports nothing of the pipeline: the ground floor."""

from __future__ import annotations

from typing import Literal

__all__ = ["HIGHER_IS_BETTER", "PERCEPTUAL", "EvalError", "Kind"]

#: MSE models (CUnet, the Unet baselines) or GAN models (CUGAN, the UGAN baselines): the kind
#: picks the metrics a model is scored with (``evaluate.mse_metrics`` / ``gan_metrics``).
Kind = Literal["mse", "gan"]

#: Direction of every metric we compute; distances are signed so that lower is always better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr_rgb": True,
    "psnr_y": True,
    "ssim_rgb": True,
    "ssim_y": True,
    "lpips": False,
    "dists": False,
}

#: The metrics computed by a network with (possibly random) backbone weights.
PERCEPTUAL = ("lpips", "dists")


class EvalError(ValueError):
    """Evaluation cannot run as asked (missing set, setting or model); one-line message."""
