"""Typed view of ``params.yaml``: the single source of configuration.

Validated once, at the edge (stage scripts, the CLI, flows), then passed around as frozen
objects. Unknown keys are errors, so a misspelt key fails loudly instead of silently
falling back to a default. A bad value fails with one line that names the key, e.g.::

    params.yaml: extract.crop_size: Input should be greater than 0 (got -3)

Each pipeline stage owns one section; ``base`` holds what every stage shares.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "Params",
    "load_params",
    "parse_params",
]


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# base


class BaseParams(_Section):
    """Settings every stage shares."""

    seed: int = Field(0, ge=0)
    data_dir: str = "data"
    # Pretrained backbones (VGG19 perceptual loss, AlexNet for LPIPS, VGG16 for DISTS):
    #   imagenet: the real torchvision weights; refuse to run if they are missing offline.
    #   auto:     imagenet when available, else random weights with a loud warning + label.
    #   random:   random weights (tests).
    pretrained: Literal["imagenet", "auto", "random"] = "auto"
    # Cache for those weights; null -> $CUGAN_WEIGHTS_DIR or ~/.cache/cugan/weights.
    weights_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# degradation (shared by the data stages, the loaders, evaluation and the CLI)


class DegradationParams(_Section):
    """The blur -> noise -> clip -> 8-bit model of the method doc, and its level grid."""

    kernel_size: int = Field(21, gt=0)
    blur_max: float = Field(4.0, gt=0)
    noise_max: float = Field(50.0, gt=0)
    # Training samples levels uniformly on this grid (method doc: 0.1 and 1).
    blur_step: float = Field(0.1, gt=0)
    noise_step: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _odd_kernel(self) -> "DegradationParams":
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (got {self.kernel_size})")
        return self


# ---------------------------------------------------------------------------------------------
# data sources and stages


class Div2kParams(_Section):
    url: str = "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip"
    sha256: str = ""
    # An existing directory of PNGs or the zip itself, used instead of downloading.
    local: str | None = None


class DataParams(_Section):
    """Where the raw training images come from."""

    source: Literal["sample", "div2k", "folder"] = "sample"
    folder: str | None = None
    div2k: Div2kParams = Div2kParams()
    # sample source: how many of the embedded images are held out for evaluation only.
    holdout: int = Field(2, ge=1)
    # Decompression-bomb guard: images with more pixels are skipped and reported.
    max_pixels: int = Field(40_000_000, gt=0)

    @model_validator(mode="after")
    def _folder_needs_path(self) -> "DataParams":
        if self.source == "folder" and not self.folder:
            raise ValueError("source 'folder' needs data.folder to name a directory")
        return self


class ExtractParams(_Section):
    """Sub-image extraction (overlapping crops, as the field does for DIV2K)."""

    crop_size: int = Field(192, gt=0)
    step: int = Field(96, gt=0)
    # A leftover strip narrower than this at the right/bottom edge gets no extra crop.
    thresh_size: int = Field(48, ge=0)


class ShardParams(_Section):
    max_count: int = Field(1000, gt=0)
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    shuffle_seed: int = Field(0, ge=0)


class EvalSetParams(_Section):
    # holdout: the held-out sample images; cbsd68/live1: local directories (or download stage).
    sets: tuple[Literal["holdout", "cbsd68", "live1"], ...] = ("holdout",)
    cbsd68_dir: str | None = None
    live1_dir: str | None = None
    # (blur r, noise sigma) pairs: the paper's ten settings.
    settings: tuple[tuple[float, float], ...] = (
        (0, 30), (0, 50), (2, 0), (4, 0), (1, 15), (1, 30), (2, 30), (2, 50), (4, 30), (4, 50),
    )
    seed: int = Field(0, ge=0)


class LoaderParams(_Section):
    backend: Literal["dali", "torch"] = "dali"
    # auto: GPU when CUDA is available, else CPU.
    device: Literal["auto", "cpu", "gpu"] = "auto"
    crop: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    num_threads: int = Field(2, gt=0)
    shuffle_buffer: int = Field(512, gt=0)


# ---------------------------------------------------------------------------------------------


class Params(_Section):
    base: BaseParams = BaseParams()
    degradation: DegradationParams = DegradationParams()
    data: DataParams = DataParams()
    extract: ExtractParams = ExtractParams()
    shards: ShardParams = ShardParams()
    evalsets: EvalSetParams = EvalSetParams()
    loader: LoaderParams = LoaderParams()

    @property
    def data_dir(self) -> Path:
        return Path(self.base.data_dir)


def _format_error(err: ValidationError, source: str) -> str:
    """One line for the first problem, naming the dotted key, plus a count of the others."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more else ""
    return f"{source}: {key}: {msg}{tail}"


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping. Raises :class:`ConfigError` with a one-line message."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, source=str(path))
