"""Weight initialisation shared by the networks, with an explicit random generator.

Two schemes are needed to reproduce the authors' networks faithfully:

* :func:`authors_init_` is what ``arch_util.initialize_weights(modules, 0.1)`` in the authors'
  code (HaomingCai/CUGAN, inherited from mmsr) does: kaiming-normal (fan_in, gain sqrt(2))
  weights scaled by ``scale``, zero biases, for ``nn.Conv2d`` and ``nn.Linear``; BatchNorm to
  weight 1, bias 0. It tests ``isinstance(m, nn.Conv2d)``, and ``nn.ConvTranspose2d`` is *not*
  a subclass of ``nn.Conv2d``, so in the authors' generator the two transposed convolutions
  keep PyTorch's default initialisation. We reproduce that quirk on purpose (the scaled init
  makes the residual branches start small; the up-sampling convs were never part of it).
* :func:`torch_default_init_` is PyTorch's own default for conv / linear layers
  (``reset_parameters``: kaiming-uniform with a = sqrt(5), bias uniform in +-1/sqrt(fan_in)).
  ``reset_parameters`` cannot take a ``torch.Generator``, so it is restated here with one.

Both take ``generator`` so that a seeded build is reproducible without touching the global RNG.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["authors_init_", "torch_default_init_"]


def _fan_in(weight: torch.Tensor) -> int:
    """Fan-in as PyTorch computes it: dim 1 times the receptive field (transposed convs too)."""
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive


@torch.no_grad()
def torch_default_init_(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Re-initialise one conv / transposed conv / linear layer exactly like PyTorch's default."""
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        raise TypeError(
            f"torch_default_init_ expects a conv or linear layer, got {type(module).__name__}"
        )
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in = _fan_in(module.weight)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


@torch.no_grad()
def authors_init_(
    module: nn.Module, scale: float = 0.1, generator: torch.Generator | None = None
) -> None:
    """mmsr/CUGAN ``initialize_weights``: scaled kaiming-normal for Conv2d and Linear, zero bias.

    Applied to every submodule of ``module``. Transposed convolutions are left untouched, as in
    the authors' code (see the module docstring).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", generator=generator)
            m.weight.mul_(scale)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
