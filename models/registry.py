"""Named network configurations, in one place, and the functions that build them.

Generators (``blocks_per_scale`` counts the MRBs on ONE side of a scale, as the authors'
``stages_blocks_num``; each scale has that many on the left and as many on the right):

* ``authors``  the authors' released test config (``test_CUGAN.yml``): [2, 2, 2] blocks,
               [64, 128, 256] channels, 2x2 down-sampling. 12 MRBs. 6,534,476 parameters.
* ``cugan-3``  the paper's ablation with three scales: identical to ``authors``.
* ``cugan-2``  two scales, [3, 3] blocks, [64, 128] channels: 12 MRBs.
* ``cugan-1``  one scale ("plain structure"), [6] blocks, [64] channels: 12 MRBs.
* ``unet``     the Unet / UGAN baselines: authors' widths, no condition network (all tuning
               weights fixed at 1), one model per degradation.
* ``demo``     small three-scale model for the default CPU profile.
* ``tiny``     the smallest three-scale model, for tests.

Parameter count, paper vs code: the paper (Table 2, section 4.2) gives CUnet 1.370M parameters,
but the configuration in the authors' released code and checkpoint (above) has 6,534,476
(6.53M, 4.8x as many; 6,528,515 in G's trunk and 5,961 in C_G). With the stated widths and 12
MRBs the layout cannot come near 1.37M (even the one-scale ``cugan-1`` at 64 channels has 0.89M
and every wider scale adds more), so the figure was computed for another model or is wrong; we
follow the released code, since its checkpoint must load. The ablation
widths (CUGAN-1/2 use the first one/two of the authors' widths) are our reading: the paper only
fixes the number of scales and of residual blocks.

Discriminators: ``authors`` (64 base channels, 64x64 input, GFM), ``no-gfm`` (the "CUGAN w/o
GFM" ablation), ``tiny`` (4 base channels, for tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from models.discriminator import Discriminator, DiscriminatorConfig
from models.generator import Generator, GeneratorConfig

__all__ = [
    "DISCRIMINATOR_CONFIGS",
    "GENERATOR_CONFIGS",
    "UnknownConfigError",
    "build_discriminator",
    "build_generator",
    "count_parameters",
    "describe_configs",
    "discriminator_config",
    "generator_config",
]


class UnknownConfigError(ValueError):
    """A config name that is not in the registry (one-line message listing the known names)."""


_AUTHORS_G = GeneratorConfig(blocks_per_scale=(2, 2, 2), channels_per_scale=(64, 128, 256))

GENERATOR_CONFIGS: Mapping[str, GeneratorConfig] = MappingProxyType(
    {
        "authors": _AUTHORS_G,
        "demo": GeneratorConfig(blocks_per_scale=(2, 2, 2), channels_per_scale=(16, 32, 64)),
        "tiny": GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8)),
        "cugan-1": GeneratorConfig(blocks_per_scale=(6,), channels_per_scale=(64,)),
        "cugan-2": GeneratorConfig(blocks_per_scale=(3, 3), channels_per_scale=(64, 128)),
        "cugan-3": _AUTHORS_G,
        "unet": GeneratorConfig(
            blocks_per_scale=(2, 2, 2), channels_per_scale=(64, 128, 256), conditional=False
        ),
    }
)

DISCRIMINATOR_CONFIGS: Mapping[str, DiscriminatorConfig] = MappingProxyType(
    {
        "authors": DiscriminatorConfig(),
        "tiny": DiscriminatorConfig(base_channels=4),
        "no-gfm": DiscriminatorConfig(gfm=False),
    }
)


def _lookup(table: Mapping[str, Any], name: str, kind: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise UnknownConfigError(
            f"unknown {kind} config {name!r}; known: {', '.join(sorted(table))}"
        ) from None


def generator_config(name_or_cfg: str | GeneratorConfig) -> GeneratorConfig:
    if isinstance(name_or_cfg, GeneratorConfig):
        return name_or_cfg
    return _lookup(GENERATOR_CONFIGS, name_or_cfg, "generator")


def discriminator_config(name_or_cfg: str | DiscriminatorConfig) -> DiscriminatorConfig:
    if isinstance(name_or_cfg, DiscriminatorConfig):
        return name_or_cfg
    return _lookup(DISCRIMINATOR_CONFIGS, name_or_cfg, "discriminator")


def build_generator(
    name_or_cfg: str | GeneratorConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Generator:
    """A freshly initialised G (+ C_G) from a registry name or a config."""
    return Generator(generator_config(name_or_cfg), generator=generator, device=device)


def build_discriminator(
    name_or_cfg: str | DiscriminatorConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Discriminator:
    """A freshly initialised D (+ C_D) from a registry name or a config."""
    return Discriminator(discriminator_config(name_or_cfg), generator=generator, device=device)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _generator_summary(cfg: GeneratorConfig) -> str:
    mrbs = 2 * sum(cfg.blocks_per_scale)
    cond = "conditional" if cfg.conditional else "unconditional (tuning weights = 1)"
    return (
        f"{cfg.num_scales} scale(s), blocks/side {list(cfg.blocks_per_scale)}, "
        f"channels {list(cfg.channels_per_scale)}, {mrbs} MRBs, {cond}"
    )


def _discriminator_summary(cfg: DiscriminatorConfig) -> str:
    widths = sorted({c for _, c, _, _ in cfg.layer_plan()})
    gfm = "GFM" if cfg.gfm else "no GFM"
    return f"VGG-style, {cfg.input_size}x{cfg.input_size} input, channels {widths}, {gfm}"


def describe_configs() -> list[dict[str, Any]]:
    """One row per named config: name, kind, parameters, summary (for ``cugan configs``).

    Models are built on the meta device: counting needs shapes only, not memory or init.
    """
    rows: list[dict[str, Any]] = []
    for name, gcfg in GENERATOR_CONFIGS.items():
        rows.append(
            {
                "name": name,
                "kind": "generator",
                "parameters": count_parameters(Generator(gcfg, device="meta")),
                "summary": _generator_summary(gcfg),
            }
        )
    for name, dcfg in DISCRIMINATOR_CONFIGS.items():
        rows.append(
            {
                "name": name,
                "kind": "discriminator",
                "parameters": count_parameters(Discriminator(dcfg, device="meta")),
                "summary": _discriminator_summary(dcfg),
            }
        )
    return rows
