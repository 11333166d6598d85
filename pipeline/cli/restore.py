"""``cugan restore``: one image through a trained generator (or the DNI blend of two)."""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cli.common import (
    EXIT_OK,
    add_io,
    check_output,
    cond_arg,
    non_negative_int,
    read_input,
    tile_arg,
)
from pipeline.condition import DEFAULT_SCALE, ConditionScale
from pipeline.device import resolve_device
from pipeline.imageio import COND_MAP_FORMAT, read_cond_map, write_png
from pipeline.inference import (
    AUTO_TILE_MAX_PIXELS,
    AUTO_TILE_SIZE,
    Backend,
    ModelArgumentNames,
    Precision,
    Workload,
    auto_tile,
    load_model_for_inference,
    prepare_model,
    receptive_field_radius,
    restore,
)

__all__ = [
    "AUTO_TILE_MAX_PIXELS",
    "AUTO_TILE_SIZE",
    "MODEL_FLAGS",
    "add_model_arguments",
    "add_parser",
    "run",
]

log = logging.getLogger("cugan")

#: The restore command's model flags, as the inference layer's messages name them.
MODEL_FLAGS = ModelArgumentNames(
    model="--model", mse_model="--mse-model", gan_model="--gan-model", alpha="--alpha"
)
LEVEL_FLAGS = ("--blur", "--noise")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    # Help texts state the method's scale; the conversion uses the checkpoint's own.
    b_max, n_max = f"{DEFAULT_SCALE.blur_max:g}", f"{DEFAULT_SCALE.noise_max:g}"
    p = sub.add_parser(
        "restore",
        parents=parents,
        help="restore an image with a trained generator",
        description=(
            "Restore IN (blurred and/or noisy) into OUT (PNG). The condition is the degradation "
            "to remove: --blur R (Gaussian std in pixels) and --noise S (std on the 0..255 "
            "scale), or the condition vector itself, --cond Z1,Z2 with entries in [0, 1], or "
            "a condition per pixel, --cond-map MAP. "
            "Levels become z with the scale the checkpoint records: at the method's scale "
            f"{DEFAULT_SCALE.describe()}, so R in [0, {b_max}] and S in [0, {n_max}]. Give "
            "--model, or --alpha with --mse-model and --gan-model for the MSE<->GAN blend "
            "(alpha 1 = MSE model, 0 = GAN model). A model is a checkpoint or a registry URI "
            "(models:/NAME/VERSION, models:/NAME@ALIAS; see --model)."
        ),
    )
    add_io(p)
    cond = p.add_argument_group("condition (--blur and --noise, or --cond, or --cond-map)")
    cond.add_argument(
        "--blur",
        type=float,
        metavar="R",
        help=f"blur std in pixels (0..{b_max} at the method's scale)",
    )
    cond.add_argument(
        "--noise",
        type=float,
        metavar="S",
        help=f"noise std, 0..255 scale (0..{n_max} at the method's scale)",
    )
    cond.add_argument(
        "--cond",
        type=cond_arg,
        metavar="Z1,Z2",
        help="condition vector z, entries in [0, 1]",
    )
    cond.add_argument(
        "--cond-map",
        type=Path,
        metavar="MAP",
        help=f"a condition per pixel (e.g. the studio's download): {COND_MAP_FORMAT}",
    )
    add_model_arguments(p)
    execution = p.add_argument_group("execution")
    execution.add_argument(
        "--tile",
        type=tile_arg,
        default="auto",
        metavar="N",
        help=f"tile size in pixels; 0 = whole image; auto (default) = whole image up "
        f"to {AUTO_TILE_MAX_PIXELS / 1e6:.1f} MP, else {AUTO_TILE_SIZE}",
    )
    execution.add_argument(
        "--tile-overlap",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="context margin around each tile (default: the model's receptive "
        "field, which makes tiled output equal untiled output)",
    )
    execution.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to run (default: auto = cuda when available)",
    )
    execution.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=Backend.AUTO.value,
        help="inference path: eager, channels_last, compile (torch.compile), onnx (ONNX "
        "Runtime); auto (default) = the fastest exact one measured on this machine (a short "
        "probe, cached), never a slow setup for one image",
    )
    execution.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        default=Precision.AUTO.value,
        help="fp32, or bf16 (autocast; faster only on CPUs with AMX/AVX512-BF16 and on GPUs, "
        "not bit-exact); auto (default) = bf16 only where it is faster and its 8-bit output "
        "stays within 1 level of fp32 on at most 0.1%% of the values for this model",
    )
    p.set_defaults(func=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, or --alpha with --mse-model and --gan-model, and the registry's --tracking-uri
    (shared with ``cugan export``; the rules are those of
    :func:`pipeline.inference.load_model_for_inference`)."""
    model = p.add_argument_group(
        "model (either --model, or --alpha with --mse-model and --gan-model)"
    )
    model.add_argument(
        "--model",
        metavar="M",
        help="checkpoint directory or .safetensors (from training or import-official), or a "
        "registry URI models:/NAME/VERSION or models:/NAME@ALIAS: its GAN generator where the "
        "version has one (cugan), else its only one (cunet); with --alpha, the blend of that "
        "version's own mse and gan generators",
    )
    model.add_argument(
        "--alpha", type=float, metavar="A", help="DNI blend: (1 - A) * GAN + A * MSE, A in [0, 1]"
    )
    model.add_argument(
        "--mse-model",
        metavar="M",
        help="MSE (CUnet) checkpoint for --alpha, or a registry URI: that version's mse generator",
    )
    model.add_argument(
        "--gan-model",
        metavar="M",
        help="GAN (CUGAN) checkpoint for --alpha, or a registry URI: that version's gan generator",
    )
    model.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store of registry URIs (default: $MLFLOW_TRACKING_URI, else tracking.uri "
        "of ./params.yaml); downloads are kept in the user cache ($CUGAN_CACHE_DIR overrides)",
    )


def _condition(args: argparse.Namespace) -> list[float] | tuple[float, float] | Path:
    """Which form of condition was given, checked as far as it can be without a model.

    Returns the ``--cond`` values (checked to lie in [0, 1]), the ``(blur, noise)`` levels,
    which :func:`_z_for` converts with the scale of the model once it is loaded, or the
    ``--cond-map`` path (read once the image's size is known).
    """
    levels_given = args.blur is not None or args.noise is not None
    if args.cond_map is not None:
        if args.cond is not None or levels_given:
            given = "--cond" if args.cond is not None else "--blur/--noise"
            raise ValueError(f"give either --cond-map or {given}, not both")
        return args.cond_map
    if args.cond is not None and levels_given:
        raise ValueError("give either --cond or --blur/--noise, not both")
    if args.cond is not None:
        values = args.cond
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise ValueError(
                f"--cond entries must lie in [0, 1] (got {','.join(f'{v:g}' for v in values)})"
            )
        return values
    if args.blur is None or args.noise is None:
        missing = (
            "--noise" if args.blur is not None else "--blur" if args.noise is not None else None
        )
        if missing:
            raise ValueError(f"{missing} is missing: give both --blur and --noise (or --cond)")
        raise ValueError("no condition given: --blur R --noise S, --cond Z1,Z2 or --cond-map MAP")
    return args.blur, args.noise


def _z_for(condition: list[float] | tuple[float, float], scale: ConditionScale) -> torch.Tensor:
    """z ``[cond_dim]``: ``--cond`` as given, or the levels converted with the model's scale."""
    if isinstance(condition, list):
        return torch.tensor(condition, dtype=torch.float32)
    blur, noise = scale.check_levels(*condition, names=LEVEL_FLAGS)
    return scale.to_z(blur, noise)[0]


def _cond_map(path: Path, args: argparse.Namespace, height: int, width: int) -> np.ndarray:
    """The ``--cond-map`` file as uint8 H x W x 2, which must have the image's size."""
    zmap = read_cond_map(path, max_pixels=args.max_pixels)
    if zmap.shape[:2] != (height, width):
        raise ValueError(
            f"{path}: the condition map is {zmap.shape[1]}x{zmap.shape[0]} but {args.input} is "
            f"{width}x{height}: a condition map has the image's size"
        )
    return zmap


def run(args: argparse.Namespace) -> int:
    condition = _condition(args)
    check_output(args.output)
    device = resolve_device(args.device)
    loaded = load_model_for_inference(
        args.model,
        mse_model=args.mse_model,
        gan_model=args.gan_model,
        alpha=args.alpha,
        names=MODEL_FLAGS,
        tracking_uri=args.tracking_uri,
    )
    model, cfg = loaded.model, loaded.config
    image = read_input(args).array
    h, w = image.shape[:2]
    if isinstance(condition, Path):
        z: torch.Tensor | np.ndarray = _cond_map(condition, args, h, w)
        values, z_text = z.shape[2], f"map {condition}"
    else:
        z = _z_for(condition, loaded.scale)
        values, z_text = z.numel(), "z=[" + ",".join(f"{v:.4g}" for v in z.tolist()) + "]"
    if not cfg.conditional:
        log.warning("note: the model is unconditional (a Unet baseline): the condition is ignored")
        z_arg = None
    elif values != cfg.cond_dim:
        flag = "--cond-map" if isinstance(condition, Path) else "--cond"
        raise ValueError(f"{flag} has {values} values but the model takes {cfg.cond_dim}")
    else:
        z_arg = z

    tile = args.tile
    if tile == "auto":
        tile = auto_tile(h, w) or 0  # the default tiling, shared with the studio
    overlap = args.tile_overlap if args.tile_overlap is not None else receptive_field_radius(cfg)
    if tile:
        log.info("tiling: %d px tiles, %d px overlap", tile, overlap)

    start = time.perf_counter()
    prepared = prepare_model(
        model,
        device=device,
        backend=args.backend,
        precision=args.precision,
        workload=Workload.one_shot(h * w),
    )
    result = restore(prepared, image, z_arg, tile=tile or None, tile_overlap=overlap)
    write_png(args.output, result)
    log.info(
        "wrote %s (%dx%d, %s, model %s, %s, path %s) in %.2f s",
        args.output,
        w,
        h,
        z_text,
        loaded.source,
        device,
        prepared.name,
        time.perf_counter() - start,
    )
    return EXIT_OK
