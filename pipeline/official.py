"""Import of the authors' released CUGAN generator (a PyTorch ``.pth`` state dict).

The authors' checkpoint uses the attribute names of their ``CUGAN_arch.py`` (HaomingCai/CUGAN,
``codes/models/archs/CUGAN_arch.py``; always three stages). Their name -> ours:

    conv_stage1_left                          head            3x3 conv in
    conv_stage2_left, conv_stage3_left        down.0, down.1  2x2 stride-2 convs
    CResBlocks_stage{s}_{side}.{i}.conv1/2    {side}.{s-1}.{i}.conv1/2
    CResBlocks_stage{s}_{side}.{i}.local_scale  condition.{side}.{s-1}.{i}
    conv_stage3_right, conv_stage2_right      up.1, up.0      2x2 stride-2 transposed convs
    stage3_scale, stage2_scale                condition.fusion.1, condition.fusion.0  (MSF)
    conv_stage1_right                         tail            3x3 conv out
    stage1_scale                              condition.output  (global connection)

Every key must be used and every shape must match the config; problems are reported together
in one :class:`OfficialImportError`. Checkpoints saved from ``DataParallel`` prefix keys with
``module.``, which is stripped (as the authors' own ``load_network`` does). The file is read
only with ``torch.load(..., weights_only=True)`` and must be a flat ``str -> Tensor`` mapping.
The config is inferred from the tensor shapes (the released file uses the ``authors`` config),
or given explicitly to check against.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.generator import Generator, GeneratorConfig
from pipeline.checkpoint import (
    CheckpointError,
    describe_mismatch,
    file_sha256,
    save_generator,
    summarise_keys,
)
from pipeline.condition import DEFAULT_SCALE
from pipeline.errors import one_line

__all__ = [
    "OfficialImportError",
    "convert_official_state_dict",
    "import_official",
    "infer_official_config",
    "load_official_state_dict",
]

logger = logging.getLogger(__name__)

#: The authors' generator always has three stages.
OFFICIAL_SCALES = 3
_SIDES = ("left", "right")
_BLOCK_KEY = re.compile(r"^CResBlocks_stage([123])_(left|right)\.(\d+)\.")


class OfficialImportError(CheckpointError):
    """The authors' checkpoint cannot be read or mapped (one-line message)."""


def _strip_module_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = key[len("module.") :] if key.startswith("module.") else key
        if new in out:
            raise OfficialImportError(
                f"key {new!r} appears both with and without the 'module.' prefix"
            )
        out[new] = value
    return out


def _check_flat(obj: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise OfficialImportError(
            f"{where}: expected a state dict (str -> Tensor), got {type(obj).__name__}"
        )
    bad = [repr(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        nested = [repr(k) for k, v in obj.items() if isinstance(v, Mapping)]
        hint = (
            f" (nested under {summarise_keys(nested)}: extract the generator's state dict first)"
            if nested
            else ""
        )
        raise OfficialImportError(
            f"{where}: not a flat str -> Tensor state dict; "
            f"offending keys {summarise_keys(bad)}{hint}"
        )
    return dict(obj)


def _name_map(cfg: GeneratorConfig) -> dict[str, str]:
    """Official parameter-module name -> our module name, for a three-scale config."""
    names = {
        "conv_stage1_left": "head",
        "conv_stage1_right": "tail",
        "stage1_scale": "condition.output",
    }
    for s in range(1, OFFICIAL_SCALES):  # scales 2 and 3 (1-based) are entered/left via index s-1
        names[f"conv_stage{s + 1}_left"] = f"down.{s - 1}"
        names[f"conv_stage{s + 1}_right"] = f"up.{s - 1}"
        names[f"stage{s + 1}_scale"] = f"condition.fusion.{s - 1}"
    for s, n in enumerate(cfg.blocks_per_scale):
        for side in _SIDES:
            for i in range(n):
                official = f"CResBlocks_stage{s + 1}_{side}.{i}"
                ours = f"{side}.{s}.{i}"
                names[f"{official}.conv1"] = f"{ours}.conv1"
                names[f"{official}.conv2"] = f"{ours}.conv2"
                names[f"{official}.local_scale"] = f"condition.{ours}"
    return names


#: Keys whose shapes determine the config: in/scale-1 width, out, cond_dim, scale-2/3 widths.
_INFERENCE_KEYS = (
    "conv_stage1_left.weight",
    "conv_stage1_right.weight",
    "stage1_scale.weight",
    "conv_stage2_left.weight",
    "conv_stage3_left.weight",
)


def infer_official_config(sd: Mapping[str, Tensor]) -> GeneratorConfig:
    """The GeneratorConfig an official state dict was made with (read off its tensor shapes)."""
    sd = _strip_module_prefix(_check_flat(sd, "state dict"))
    missing = [k for k in _INFERENCE_KEYS if k not in sd]
    if missing:
        raise OfficialImportError(
            f"official CUGAN state dict does not fit: missing {summarise_keys(missing)} (needed to "
            "infer the config)"
        )
    head, tail, out_scale, down2, down3 = (sd[k].shape for k in _INFERENCE_KEYS)
    if [len(head), len(tail), len(out_scale), len(down2), len(down3)] != [4, 4, 2, 4, 4]:
        raise OfficialImportError(
            "official CUGAN state dict does not fit: unexpected tensor ranks for "
            f"{summarise_keys(list(_INFERENCE_KEYS))}"
        )
    blocks = [0] * OFFICIAL_SCALES
    for key in sd:
        match = _BLOCK_KEY.match(key)
        if match:
            s = int(match.group(1)) - 1
            blocks[s] = max(blocks[s], int(match.group(3)) + 1)
    try:
        return GeneratorConfig(
            in_channels=int(head[1]),
            out_channels=int(tail[0]),
            cond_dim=int(out_scale[1]),
            blocks_per_scale=tuple(blocks),
            channels_per_scale=(int(head[0]), int(down2[0]), int(down3[0])),
            down_kernel=int(down2[-1]),
            conditional=True,
        )
    except ValueError as exc:
        raise OfficialImportError(f"cannot infer the config: {exc}") from None


def convert_official_state_dict(
    sd: Mapping[str, Tensor], config: GeneratorConfig | None = None
) -> dict[str, Tensor]:
    """Map an official state dict to our key names, strictly (every key used, every shape checked).

    ``config`` defaults to the one inferred from the shapes (:func:`infer_official_config`);
    it must have three scales and be conditional, as the authors' network is.
    """
    sd = _strip_module_prefix(_check_flat(sd, "state dict"))
    cfg = config if config is not None else infer_official_config(sd)
    if cfg.num_scales != OFFICIAL_SCALES or not cfg.conditional:
        raise OfficialImportError(
            f"the authors' network has {OFFICIAL_SCALES} scales and a condition network; "
            f"config has {cfg.num_scales} scale(s), conditional={cfg.conditional}"
        )
    expected = Generator(cfg, device="meta").state_dict()
    names = _name_map(cfg)

    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    wrong: list[str] = []
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        ours = f"{names[module]}.{leaf}" if module in names else None
        if ours is None or ours not in expected:
            unexpected.append(key)
        elif value.shape != expected[ours].shape:
            wrong.append(f"{key} {list(value.shape)} != {list(expected[ours].shape)}")
        elif not value.is_floating_point():
            wrong.append(f"{key} has dtype {value.dtype}, expected floating point")
        else:
            converted[ours] = value.detach().to(torch.float32)
    reverse = {ours: official for official, ours in names.items()}
    missing = []
    for ours in expected:
        if ours not in converted:
            module, _, leaf = ours.rpartition(".")
            official = f"{reverse.get(module, module)}.{leaf}"
            if official not in sd:
                missing.append(official)
    problems = describe_mismatch(
        missing=sorted(missing), unexpected=sorted(unexpected), shape_mismatch=wrong
    )
    if problems:
        raise OfficialImportError(f"official CUGAN state dict does not fit: {problems}")
    return converted


def load_official_state_dict(pth_path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read the authors' .pth safely (``weights_only=True``; no arbitrary unpickling)."""
    path = Path(pth_path)
    if not path.is_file():
        raise OfficialImportError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise OfficialImportError(
            f"{path}: not a loadable weights-only PyTorch file ({one_line(exc)})"
        ) from None
    return _strip_module_prefix(_check_flat(obj, str(path)))


def import_official(
    pth_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: GeneratorConfig | None = None,
) -> Path:
    """Convert the authors' .pth into our checkpoint format in ``out_dir``; returns ``out_dir``.

    The metadata records the source file name and sha256 so the conversion is traceable.
    """
    path = Path(pth_path)
    sd = load_official_state_dict(path)
    cfg = config if config is not None else infer_official_config(sd)
    converted = convert_official_state_dict(sd, cfg)
    model = Generator(cfg, device="meta")
    model.load_state_dict(converted, strict=True, assign=True)
    metadata = {
        "source": "official",
        "source_file": path.name,
        "source_sha256": file_sha256(path),
        "source_layout": "HaomingCai/CUGAN codes/models/archs/CUGAN_arch.py",
        "converted_keys": len(converted),
    }
    # The authors trained with the paper's z = [r / 4, sigma / 50]: the method's scale.
    out = save_generator(out_dir, model, metadata=metadata, scale=DEFAULT_SCALE)
    logger.info("imported %s (%d tensors) into %s", path, len(converted), out)
    return out
