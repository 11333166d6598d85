"""The CUGAN discriminator D with Global Feature Modulation (GFM), and its condition network C_D.

VGG-style (SRGAN / ESRGAN ``Discriminator_VGG_128`` layout) for 64x64 patches: ten conv layers
in five (3x3 stride 1, 4x4 stride 2) pairs, channels base, 2 base, 4 base, 8 base, 8 base
(64 -> 512, doubling, capped at 8x), each pair halving the size (64 -> 2). Every conv but the
first is followed by BatchNorm, then GFM ``alpha_i(z) * x + beta_i(z)`` (two independent Linears
per modulated layer, held in :class:`DiscriminatorCondition` = C_D), then LeakyReLU(0.2). Global
average pooling and two fully connected layers give one logit.

Choices the paper leaves open (the authors never released D's code), each the SRGAN/ESRGAN
convention: no BatchNorm (hence no GFM) on the first conv, which alone has a bias; a hidden FC
width of 100; PyTorch's default initialisation for convs and FCs.

GFM starts as the identity (alpha = 1, beta = 0: zero Linear weights, biases 1 and 0):
* the GAN stage starts from the same function as the plain BatchNorm discriminator, so the
  "CUGAN w/o GFM" ablation and the full model differ only in what GFM learns;
* a random start (e.g. G's kaiming x 0.1) would put alpha near 0, shrinking every BatchNorm
  output towards 0 through nine layers -- vanishing D features and gradients, the very problem
  GFM is meant to relieve -- and could flip the sign of channels;
* it still learns from step one: d loss / d W_alpha = (d loss / d alpha) z^T is non-zero as soon
  as z is, and the biases learn a z-independent affine (as BatchNorm's own affine would).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.init import torch_default_init_

__all__ = [
    "Discriminator",
    "DiscriminatorCondition",
    "DiscriminatorConfig",
    "DiscriminatorLayer",
]

#: Hidden width of the first fully connected layer (SRGAN / ESRGAN use 100).
FC_HIDDEN = 100
#: Five stride-2 convs: the input side must be a multiple of 2**5.
NUM_HALVINGS = 5
LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Hyper-parameters of D. ``gfm=False`` is the "CUGAN w/o GFM" ablation (z is then unused)."""

    in_channels: int = 3
    cond_dim: int = 2
    base_channels: int = 64
    input_size: int = 64
    gfm: bool = True

    def __post_init__(self) -> None:
        for name in ("in_channels", "cond_dim", "base_channels", "input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"DiscriminatorConfig.{name} must be a positive integer (got {value!r})"
                )
        multiple = 2**NUM_HALVINGS
        if self.input_size % multiple:
            raise ValueError(
                f"DiscriminatorConfig.input_size must be a multiple of {multiple} "
                f"(five stride-2 convs; got {self.input_size})"
            )
        if not isinstance(self.gfm, bool):
            raise ValueError(f"DiscriminatorConfig.gfm must be a bool (got {self.gfm!r})")

    def layer_plan(self) -> list[tuple[int, int, int, int]]:
        """(in channels, out channels, kernel, stride) of the ten conv layers."""
        plan: list[tuple[int, int, int, int]] = []
        c_in = self.in_channels
        for level in range(NUM_HALVINGS):
            c = self.base_channels * min(2**level, 8)
            plan += [(c_in, c, 3, 1), (c, c, 4, 2)]
            c_in = c
        return plan

    @property
    def modulated_channels(self) -> list[int]:
        """Channels of the layers that have BatchNorm (+ GFM): all but the first."""
        return [c_out for _, c_out, _, _ in self.layer_plan()[1:]]


class DiscriminatorCondition(nn.Module):
    """C_D: independent ``alpha_i = Linear(z)`` and ``beta_i = Linear(z)`` per modulated layer i."""

    def __init__(
        self, cond_dim: int, channels: list[int], *, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.alpha = nn.ModuleList(nn.Linear(cond_dim, c, device=device) for c in channels)
        self.beta = nn.ModuleList(nn.Linear(cond_dim, c, device=device) for c in channels)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """alpha = 1 and beta = 0 for every z (see the module docstring for why)."""
        for lin in self.alpha:
            lin.weight.zero_()
            lin.bias.fill_(1.0)
        for lin in self.beta:
            lin.weight.zero_()
            lin.bias.zero_()

    def forward(self, z: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(a(z), b(z)) for a, b in zip(self.alpha, self.beta, strict=True)]


class DiscriminatorLayer(nn.Module):
    """conv -> [BatchNorm -> GFM] -> LeakyReLU(0.2). GFM params are given per call."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        *,
        norm: bool,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        padding = 1  # 3x3 s1 keeps the size, 4x4 s2 halves it
        self.conv = nn.Conv2d(
            c_in, c_out, kernel, stride=stride, padding=padding, bias=not norm, device=device
        )
        self.norm = nn.BatchNorm2d(c_out, device=device) if norm else None

    def forward(self, x: Tensor, gfm: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if gfm is not None:
            alpha, beta = gfm
            x = alpha[:, :, None, None] * x + beta[:, :, None, None]
        return F.leaky_relu(x, LEAKY_SLOPE)


class Discriminator(nn.Module):
    """D (+ C_D as ``self.condition`` when ``gfm``). ``forward(x, z) -> logits [B, 1]``."""

    def __init__(
        self,
        cfg: DiscriminatorConfig,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, DiscriminatorConfig):
            raise TypeError(
                f"Discriminator expects a DiscriminatorConfig, got {type(cfg).__name__}"
            )
        self._cfg = cfg
        plan = cfg.layer_plan()
        self.layers = nn.ModuleList(
            DiscriminatorLayer(c_in, c_out, k, s, norm=i > 0, device=device)
            for i, (c_in, c_out, k, s) in enumerate(plan)
        )
        c_last = plan[-1][1]
        self.fc1 = nn.Linear(c_last, FC_HIDDEN, device=device)
        self.fc2 = nn.Linear(FC_HIDDEN, 1, device=device)
        if self.fc1.weight.device.type != "meta":  # shapes only: nothing to initialise
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    torch_default_init_(m, generator)
        # C_D is built last and set to identity, so the seeded trunk does not depend on it.
        self.condition = (
            DiscriminatorCondition(cfg.cond_dim, cfg.modulated_channels, device=device)
            if cfg.gfm
            else None
        )

    @property
    def config(self) -> DiscriminatorConfig:
        return self._cfg

    def _check_inputs(self, x: Tensor, z: Tensor | None) -> None:
        cfg = self._cfg
        size = cfg.input_size
        if (
            x.dim() != 4
            or x.shape[1] != cfg.in_channels
            or x.shape[2] != size
            or x.shape[3] != size
        ):
            raise ValueError(
                f"Discriminator expects x of shape [B, {cfg.in_channels}, {size}, {size}], "
                f"got {list(x.shape)}"
            )
        if not cfg.gfm:
            return
        if z is None:
            raise ValueError("this Discriminator uses GFM: z [B, cond_dim] is required")
        if z.dim() != 2 or z.shape[0] != x.shape[0] or z.shape[1] != cfg.cond_dim:
            raise ValueError(
                f"Discriminator expects z of shape [{x.shape[0]}, {cfg.cond_dim}], "
                f"got {list(z.shape)}"
            )

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        self._check_inputs(x, z)
        params: list[tuple[Tensor, Tensor] | None]
        if self.condition is None:
            params = [None] * (len(self.layers) - 1)
        else:
            params = list(self.condition(z))
        x = self.layers[0](x)
        for layer, gfm in zip(self.layers[1:], params, strict=True):
            x = layer(x, gfm)
        x = x.mean(dim=(2, 3))
        return self.fc2(F.leaky_relu(self.fc1(x), LEAKY_SLOPE))
