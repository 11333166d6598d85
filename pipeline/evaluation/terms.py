"""The words every evaluation module shares: model kinds, method roles, the size modes, the
metrics and their directions, and the one error type of the package. Imports nothing of the
pipeline: the ground floor."""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CROP_MULTIPLE",
    "HIGHER_IS_BETTER",
    "PERCEPTUAL",
    "REFERENCE_KIND",
    "EvalError",
    "Kind",
    "Role",
    "RowKind",
    "SizeMode",
]

#: MSE models (CUnet, the Unet baselines) or GAN models (CUGAN, the UGAN baselines): the kind
#: picks the metrics a model is scored with (``evaluate.mse_metrics`` / ``gan_metrics``).
Kind = Literal["mse", "gan"]

#: What a scored method is to the tables: ``model`` (ours: a modulation checkpoint), ``fixed``
#: (a fixed-degradation baseline, Unet / UGAN, on its one setting) or ``reference`` (the
#: degraded input, BM3D, another method's outputs: scored beside ours, never "ours").
Role = Literal["model", "fixed", "reference"]

#: The kind a score row carries: a model's kind, or ``reference`` (scored with every metric of
#: both kinds, so that it sits in the MSE and in the GAN tables).
REFERENCE_KIND = "reference"
RowKind = Literal["mse", "gan", "reference"]

#: ``pad``: the network pads to its multiple and the output is cropped back (full size).
#: ``crop16``: clean and degraded images are cropped to multiples of :data:`CROP_MULTIPLE`,
#: top-left anchored, before restoring and scoring (the authors' test code).
SizeMode = Literal["pad", "crop16"]
CROP_MULTIPLE = 16

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
