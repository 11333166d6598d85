"""Shared by the studio's tests: tiny checkpoints, small photos, bad inputs, the CLI reference."""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.registry import build_generator
from pipeline import cli
from pipeline.checkpoint import save_generator
from pipeline.condition import ConditionScale
from pipeline.degradation import degrade, to_tensor, to_uint8
from pipeline.imageio import read_rgb8, write_png
from pipeline.studio.regions import sample_photos


def tiny_checkpoint(out: Path, seed: int, scale: ConditionScale | None = None) -> Path:
    """A tiny generator whose weights are perturbed enough that z, alpha and the model all
    change the output visibly (the authors' 0.1-scaled init with zero C_G biases is close to
    the identity and barely depends on z)."""
    model = build_generator("tiny", generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.08 * torch.randn(p.shape, generator=gen))
        for p in model.condition.parameters():  # tuning weights of order 1 that move with z
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    kwargs = {"scale": scale} if scale is not None else {}
    return save_generator(out, model, metadata={"stage": f"test-{seed}"}, **kwargs)


def models(root: Path) -> dict[str, Path]:
    """``mse`` and ``gan`` (a DNI pair with the same config) and ``single``."""
    return {
        "mse": tiny_checkpoint(root / "mse", 0),
        "gan": tiny_checkpoint(root / "gan", 7),
        "single": tiny_checkpoint(root / "single", 3),
    }


def photo(path: Path, height: int = 96, width: int = 128) -> Path:
    """A crop of a bundled sample photo (451x300), blurred and noisy as the method degrades
    images."""
    full = read_rgb8(sample_photos()["chelsea.png"]).array
    assert height <= full.shape[0] and width <= full.shape[1], "crop larger than the photo"
    top, left = (full.shape[0] - height) // 2, (full.shape[1] - width) // 2
    clean = np.ascontiguousarray(full[top : top + height, left : left + width])
    noisy = degrade(to_tensor(clean), 1.5, 12.0, generator=torch.Generator().manual_seed(0))
    return write_png(path, to_uint8(noisy))


def random_photo(path: Path, height: int, width: int) -> Path:
    """Uniform noise of any size (the sample photos are at most 872x1000)."""
    rng = np.random.default_rng(height * width)
    return write_png(path, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def not_an_image(path: Path) -> Path:
    path.write_text("hello, I am text\n")
    return path


def sixteen_bit(path: Path) -> Path:
    Image.fromarray(np.full((16, 16), 1000, np.uint16)).save(path)
    return path


def cli_restore(
    command: str, input_path: Path, output: Path, cwd: Path | None = None
) -> np.ndarray:
    """Run a studio "CLI command" through ``cugan``'s own ``main``, with the input name
    replaced by the real file (an upload's name is what the user has locally) and the output
    written to ``output``, from ``cwd`` (where the server was started: model paths may be
    relative to it); returns the written pixels."""
    argv = shlex.split(command)
    assert argv[:2] == ["cugan", "restore"], command
    argv = ["restore", str(input_path), str(output), *argv[4:], "-q"]
    with contextlib.chdir(cwd or Path.cwd()):
        code = cli.main(argv)
    assert code == 0, f"cugan {' '.join(argv)} exited {code}"
    return read_rgb8(output).array
