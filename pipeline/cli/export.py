"""``cugan export --format onnx OUT.onnx``: a generator (or a DNI blend) as a verified ONNX file.

The file takes ``x`` [B, 3, H, W] in [0, 1] (H, W multiples of the model's size multiple) and
``z`` [B, cond_dim] as inputs; a blend is exported at its alpha (weights pre-blended). Before
it is written the export is run with ONNX Runtime against PyTorch
(:func:`pipeline.inference.export_onnx`); the model properties record the config, the z scale,
alpha, the source checkpoints' sha256 and the verification figures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipeline.checkpoint import TENSORS_NAME, file_sha256
from pipeline.cli.common import EXIT_OK
from pipeline.cli.restore import MODEL_FLAGS, add_model_arguments
from pipeline.inference import export_onnx, load_model_for_inference

__all__ = ["add_parser", "run"]

log = logging.getLogger("cugan")

FORMATS = ("onnx",)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        parents=parents,
        help="export a generator (or an MSE/GAN blend) to ONNX, verified with ONNX Runtime",
        description=(
            "Write OUT (an .onnx file) from --model, or from the DNI blend of --mse-model and "
            "--gan-model at --alpha (blended before export). Inputs: x [B, 3, H, W] in [0, 1] "
            "with H, W multiples of the model's size multiple (dynamic), z [B, 2] = "
            "[blur / blur_max, noise / noise_max]; output y, quantised as round(255 * clip(y)). "
            "The export is checked against PyTorch with ONNX Runtime before it is written; the "
            "model properties (cugan.*) record config, z scale, alpha and source checksums."
        ),
    )
    p.add_argument("output", metavar="OUT", type=Path, help="the .onnx file to write")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (onnx)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def _tensors_file(path: Path) -> Path:
    return path / TENSORS_NAME if path.is_dir() else path


def run(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: output must be an .onnx file")
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"{out}: give a file name in an existing directory")
    loaded = load_model_for_inference(
        args.model,
        mse_model=args.mse_model,
        gan_model=args.gan_model,
        alpha=args.alpha,
        names=MODEL_FLAGS,
        tracking_uri=args.tracking_uri,
    )
    roles = ("model",) if len(loaded.parts) == 1 else ("mse_model", "gan_model")
    sources = [
        {"role": role, "path": str(part.path), "sha256": file_sha256(_tensors_file(part.path))}
        for role, part in zip(roles, loaded.parts, strict=True)
    ]
    cfg = loaded.config
    metadata = {
        "format": "cugan-generator-onnx",
        "config": cfg.to_dict(),
        "size_multiple": cfg.size_multiple,
        "z_scale": loaded.scale.to_dict(),
        "alpha": args.alpha,
        "sources": sources,
        "inputs": {"x": "[B, 3, H, W] float32 in [0, 1]", "z": f"[B, {cfg.cond_dim}] in [0, 1]"},
        "torch": torch.__version__,
    }
    report = export_onnx(loaded.model, out, metadata=metadata)
    log.info("wrote %s (%s): %s", out, loaded.source, report.describe())
    return EXIT_OK
