"""The CUGAN generator G: a U-Net of modulated residual blocks, and its condition network C_G.

Structure (docs/cugan-method.md; paper section 3; the authors' ``CUGAN_arch.py``), for scales
s = 1..S (S = 3 in the paper) with C_s channels and n_s blocks on each side:

    scale 1 enters by a 3x3 conv (in -> C_1); scale s > 1 by a 2x2 stride-2 conv (C_{s-1} -> C_s)
    left  MRBs of scale 1 -> down -> left MRBs of scale 2 -> ... -> left MRBs of scale S
    right MRBs of scale S -> up (2x2 stride-2 transposed conv) -> MSF into the left features of
    scale S-1 -> right MRBs of scale S-1 -> ... -> right MRBs of scale 1 -> 3x3 conv (C_1 -> out)
    global modulated connection: out = input + w_out * conv_out(...)

* MRB (modulated residual block): ``x + w * conv2(relu(conv1(x)))``, w = Linear(cond_dim, C)(z)
  broadcast over H and W.
* MSF (modulated scale fusion): ``x_m' = x_m + w * up(F_{m+1}(x_m))``.

Spatially varying condition (beyond the paper; the spatial modulation idea of SFT): z is a
vector per image, ``[B, D]``, or a map at the input resolution, ``[B, D, H, W]``. The tuning
weights are affine in z, so the same trained Linear layers of C_G, applied at every pixel of
the map, give per-pixel weights ``[B, C, H_s, W_s]`` that the trunk multiplies element-wise
instead of broadcasting one value per channel. At scale s (stride ``2**s``) the map is
average-pooled by ``2**s`` (:func:`pool_condition`): each feature pixel takes the mean z of
the input pixels it covers, which (the weights being affine) is the mean of their weights.
The network was trained on constant z only; docs/studio-regions.md says what follows.

Exactness: a map that holds the value of a vector z (everywhere, or inside a region) gives
bit-for-bit the weights of the vector path there. The map is pooled in float64 (the mean of
equal float32 values is then exactly that value), and C_G runs each *distinct* ``[B, D]``
column of the pooled map through its Linear layers as its own ``[B, D]`` batch, the call the
vector path makes (:class:`ConditionInput`). Running all pixels as one large batch would not
do: BLAS kernels round a row differently depending on how many rows they are given. Maps with
more than :data:`EXACT_MAP_VALUES` distinct values per scale (smooth gradients) go through as
one batch, equal to the per-value result up to float32 rounding.

Every tuning weight w comes from its own ``nn.Linear`` in :class:`GeneratorCondition` (C_G),
which maps z to all of them at once; the trunk blocks receive their weight as an argument. With
``conditional=False`` (the Unet/UGAN baselines) there is no C_G and every tuning weight is the
constant 1 (represented as ``None``, so the trunk multiplies by nothing and z is ignored).

Details the paper leaves open, taken from the authors' code:
* the tuning weights are unconstrained Linear outputs (no activation); with zero biases at init
  they are all 0 at z = 0, so the freshly initialised G is the identity for a clean input;
* initialisation is mmsr's ``initialize_weights(.., 0.1)``, which leaves the two transposed
  convolutions at PyTorch's default init (see :mod:`models.init`).
Parameter count: the paper states 1.370M for CUnet; the authors' released config gives 6.53M
(see :mod:`models.registry`).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.init import authors_init_, torch_default_init_

__all__ = [
    "EXACT_MAP_VALUES",
    "ConditionInput",
    "Generator",
    "GeneratorCondition",
    "GeneratorConfig",
    "ModulatedResidualBlock",
    "TuningWeights",
    "pool_condition",
]

#: The paper's generator has three scales; 1 and 2 are its ablations (CUGAN-1, CUGAN-2).
MAX_SCALES = 3
#: Scale of the kaiming-normal init, as in the authors' ``initialize_weights(..., 0.1)``.
INIT_SCALE = 0.1
#: A z map with at most this many distinct values per scale gets weights bit-identical to the
#: vector path's for each value (one Linear call per value); more go through as one batch.
EXACT_MAP_VALUES = 256


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GeneratorConfig.{name} must be a positive integer (got {value!r})")
    return value


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"GeneratorConfig.{name} must be a sequence of integers (got {value!r})")
    items = tuple(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(
                f"GeneratorConfig.{name} must hold positive integers (got {list(items)!r})"
            )
    return items


@dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of G; the defaults are the authors' test config.

    ``blocks_per_scale[s]`` counts the MRBs on ONE side (left or right) of scale s, as the
    authors' ``stages_blocks_num`` does, so (2, 2, 2) means 12 MRBs in total.
    ``down_kernel`` is the authors' ``downSample_Ksize``; it must be even (padding
    ``(k - 2) // 2`` halves the size exactly, so the 2x2 transposed conv can restore it).
    Lists are accepted and stored as tuples (JSON round trips).
    """

    in_channels: int = 3
    out_channels: int = 3
    cond_dim: int = 2
    blocks_per_scale: tuple[int, ...] = (2, 2, 2)
    channels_per_scale: tuple[int, ...] = (64, 128, 256)
    down_kernel: int = 2
    conditional: bool = True

    def __post_init__(self) -> None:
        _positive_int("in_channels", self.in_channels)
        _positive_int("out_channels", self.out_channels)
        _positive_int("cond_dim", self.cond_dim)
        blocks = _int_tuple("blocks_per_scale", self.blocks_per_scale)
        channels = _int_tuple("channels_per_scale", self.channels_per_scale)
        object.__setattr__(self, "blocks_per_scale", blocks)
        object.__setattr__(self, "channels_per_scale", channels)
        if not 1 <= len(channels) <= MAX_SCALES:
            raise ValueError(
                f"GeneratorConfig supports 1 to {MAX_SCALES} scales "
                f"(got {len(channels)}: channels_per_scale={list(channels)})"
            )
        if len(blocks) != len(channels):
            raise ValueError(
                "GeneratorConfig.blocks_per_scale and channels_per_scale must have one entry per "
                f"scale (got {list(blocks)} and {list(channels)})"
            )
        k = _positive_int("down_kernel", self.down_kernel)
        if k % 2:
            raise ValueError(f"GeneratorConfig.down_kernel must be even (got {k})")
        if self.in_channels != self.out_channels:
            raise ValueError(
                "GeneratorConfig: the global connection adds the input to the output, so "
                f"in_channels must equal out_channels (got {self.in_channels} and "
                f"{self.out_channels})"
            )
        if not isinstance(self.conditional, bool):
            raise ValueError(
                f"GeneratorConfig.conditional must be a bool (got {self.conditional!r})"
            )

    @property
    def num_scales(self) -> int:
        return len(self.channels_per_scale)

    @property
    def size_multiple(self) -> int:
        """Height and width of the input must be multiples of this (one halving per extra scale)."""
        return 2 ** (self.num_scales - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GeneratorConfig: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**data)


@dataclass(frozen=True)
class TuningWeights:
    """Every tuning weight of G for one batch (``None`` = the constant 1): each is ``[B, C]``
    for a vector z, or ``[B, C, H_s, W_s]`` (the size of the features it scales) for a z map.

    ``left[s][i]`` / ``right[s][i]``: MRB i on the left / right of scale s (0-based);
    ``fusion[s]``: the MSF into the left features of scale s, from scale s + 1 (S - 1 entries);
    ``output``: the global connection, [B, out_channels].
    """

    left: tuple[tuple[Tensor | None, ...], ...]
    right: tuple[tuple[Tensor | None, ...], ...]
    fusion: tuple[Tensor | None, ...]
    output: Tensor | None

    @classmethod
    def unit(cls, cfg: GeneratorConfig) -> TuningWeights:
        """All weights fixed at 1: the unconditional U-Net (Unet / UGAN baselines)."""
        ones = tuple((None,) * n for n in cfg.blocks_per_scale)
        return cls(left=ones, right=ones, fusion=(None,) * (cfg.num_scales - 1), output=None)


def _modulate(feature: Tensor, weight: Tensor | None) -> Tensor:
    """Scale [B, C, H, W] features by a [B, C] weight (per channel) or a [B, C, H, W] weight
    map (per pixel); None means weight 1."""
    if weight is None:
        return feature
    if weight.dim() == 2:
        return feature * weight[:, :, None, None]
    return feature * weight


def pool_condition(z: Tensor, factor: int) -> Tensor:
    """A ``[B, D, H, W]`` z map average-pooled by ``factor`` (the stride of a scale).

    Pooled in float64 and cast back, so that a region of equal values keeps that value bit for
    bit (a float32 sum of 4 or 16 equal values can round; in float64 it cannot).
    """
    if factor == 1:
        return z
    return F.avg_pool2d(z.to(torch.float64), factor).to(z.dtype)


@dataclass(frozen=True)
class _ScaleMap:
    """A pooled z map as one scale sees it: its distinct [B, D] columns and where each is."""

    values: Tensor  # [U, B, D]
    index: Tensor  # [H_s * W_s]: the column of each pixel, row-major
    height: int
    width: int


class ConditionInput:
    """z prepared once per forward pass; each site's tuning weight is computed when the trunk
    asks for it (so that a z map never holds all its per-pixel weight maps at once).

    ``left(s, i)`` / ``right(s, i)``: MRB i on the left / right of scale s; ``fusion(s)``: the
    MSF into scale s; ``output()``: the global connection (the fields of :class:`TuningWeights`).
    """

    def __init__(self, condition: GeneratorCondition, z: Tensor) -> None:
        self._c = condition
        self._z = z
        self._scales: list[_ScaleMap] = []
        if z.dim() == 4:
            b, d = z.shape[:2]
            for s in range(len(condition.left)):
                pooled = pool_condition(z, 2**s)
                h, w = pooled.shape[-2:]
                columns = pooled.permute(2, 3, 0, 1).reshape(h * w, b * d)
                values, index = torch.unique(columns, dim=0, return_inverse=True)
                self._scales.append(_ScaleMap(values.view(-1, b, d), index.view(-1), h, w))

    def left(self, s: int, i: int) -> Tensor:
        return self._weight(self._c.left[s][i], s)

    def right(self, s: int, i: int) -> Tensor:
        return self._weight(self._c.right[s][i], s)

    def fusion(self, s: int) -> Tensor:
        return self._weight(self._c.fusion[s], s)

    def output(self) -> Tensor:
        return self._weight(self._c.output, 0)

    def _weight(self, linear: nn.Linear, scale: int) -> Tensor:
        """``linear``'s weight at ``scale``: [B, C], or [B, C, H_s, W_s] for a z map."""
        if not self._scales:
            return linear(self._z)
        m = self._scales[scale]
        u, b, d = m.values.shape
        if u <= EXACT_MAP_VALUES:
            per_value = torch.stack([linear(v) for v in m.values])  # each the vector-path call
        else:
            per_value = linear(m.values.reshape(u * b, d)).view(u, b, -1)
        dense = per_value[m.index].view(m.height, m.width, b, -1)
        return dense.permute(2, 3, 0, 1).contiguous()  # NCHW, the layout of the features


class _UnitWeights:
    """The unconditional baseline's sites: every tuning weight is the constant 1 (``None``)."""

    def left(self, s: int, i: int) -> None:
        return None

    def right(self, s: int, i: int) -> None:
        return None

    def fusion(self, s: int) -> None:
        return None

    def output(self) -> None:
        return None


class GeneratorCondition(nn.Module):
    """C_G: one independent ``Linear(cond_dim, C)`` per modulated site of G."""

    def __init__(self, cfg: GeneratorConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        d = cfg.cond_dim

        def per_block() -> nn.ModuleList:
            return nn.ModuleList(
                nn.ModuleList(nn.Linear(d, c, device=device) for _ in range(n))
                for c, n in zip(cfg.channels_per_scale, cfg.blocks_per_scale, strict=True)
            )

        self.left = per_block()
        self.right = per_block()
        # fusion[s] scales the up-sampled output of scale s + 1, which has C_s channels.
        self.fusion = nn.ModuleList(
            nn.Linear(d, c, device=device) for c in cfg.channels_per_scale[:-1]
        )
        self.output = nn.Linear(d, cfg.out_channels, device=device)

    def prepare(self, z: Tensor) -> ConditionInput:
        """z ``[B, D]`` or a z map ``[B, D, H, W]`` (H, W multiples of ``2**(S-1)``)."""
        return ConditionInput(self, z)

    def forward(self, z: Tensor) -> TuningWeights:
        """Every tuning weight at once (the generator's forward asks for them one by one)."""
        c = self.prepare(z)
        return TuningWeights(
            left=tuple(tuple(c.left(s, i) for i in range(len(b))) for s, b in enumerate(self.left)),
            right=tuple(
                tuple(c.right(s, i) for i in range(len(b))) for s, b in enumerate(self.right)
            ),
            fusion=tuple(c.fusion(s) for s in range(len(self.fusion))),
            output=c.output(),
        )


class ModulatedResidualBlock(nn.Module):
    """MRB: ``x + w * conv2(relu(conv1(x)))`` with 3x3 convs; w is given by C_G."""

    def __init__(self, channels: int, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, device=device)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, device=device)

    def forward(self, x: Tensor, w: Tensor | None) -> Tensor:
        return x + _modulate(self.conv2(F.relu(self.conv1(x))), w)


def _blocks(cfg: GeneratorConfig, device: torch.device | str | None) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList(ModulatedResidualBlock(c, device=device) for _ in range(n))
        for c, n in zip(cfg.channels_per_scale, cfg.blocks_per_scale, strict=True)
    )


class Generator(nn.Module):
    """G (+ C_G as ``self.condition``). ``forward(x, z)``: x [B, C, H, W] in [0, 1]; z [B, D],
    or a z map [B, D, H, W] at the input's resolution (module docstring).

    H and W must be multiples of :attr:`size_multiple`. ``generator`` seeds the initialisation
    (the layers' default init still draws from the global RNG first, then is overwritten).
    ``device="meta"`` builds a shape-only model (parameter counts, or filling it with
    ``load_state_dict(..., assign=True)`` without a throw-away init).
    """

    def __init__(
        self,
        cfg: GeneratorConfig,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, GeneratorConfig):
            raise TypeError(f"Generator expects a GeneratorConfig, got {type(cfg).__name__}")
        self._cfg = cfg
        chans = cfg.channels_per_scale
        k = cfg.down_kernel
        self.head = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1, device=device)
        # down[s] enters scale s + 1 from scale s; up[s] leaves scale s + 1 back into scale s.
        self.down = nn.ModuleList(
            nn.Conv2d(c_in, c_out, k, stride=2, padding=(k - 2) // 2, device=device)
            for c_in, c_out in itertools.pairwise(chans)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(c_out, c_in, 2, stride=2, device=device)
            for c_in, c_out in itertools.pairwise(chans)
        )
        self.left = _blocks(cfg, device)
        self.right = _blocks(cfg, device)
        self.tail = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1, device=device)
        self.condition = GeneratorCondition(cfg, device=device) if cfg.conditional else None

        if self.head.weight.device.type != "meta":  # shapes only: nothing to initialise
            # The authors' init skips ConvTranspose2d; they keep PyTorch's default (models.init).
            authors_init_(self, INIT_SCALE, generator)
            for up in self.up:
                torch_default_init_(up, generator)

    @property
    def config(self) -> GeneratorConfig:
        return self._cfg

    @property
    def size_multiple(self) -> int:
        return self._cfg.size_multiple

    def tuning_weights(self, z: Tensor | None) -> TuningWeights:
        """What C_G produces for z (all ones, as ``None``, for the unconditional baseline)."""
        if self.condition is None:
            return TuningWeights.unit(self._cfg)
        return self.condition(z)

    def _check_inputs(self, x: Tensor, z: Tensor | None) -> None:
        cfg = self._cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"Generator expects x of shape [B, {cfg.in_channels}, H, W], got {list(x.shape)}"
            )
        m = cfg.size_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"Generator with {cfg.num_scales} scales needs H and W to be multiples of {m} "
                f"(got {x.shape[2]}x{x.shape[3]}); pad the input first"
            )
        if not cfg.conditional:
            return
        if z is None:
            raise ValueError("this Generator is conditional: z [B, cond_dim] is required")
        b, d, h, w = x.shape[0], cfg.cond_dim, x.shape[2], x.shape[3]
        if z.dim() == 4:
            if tuple(z.shape) != (b, d, h, w):
                raise ValueError(
                    f"Generator expects a z map of shape [{b}, {d}, {h}, {w}] (the input's "
                    f"batch, cond_dim, H and W), got {list(z.shape)}"
                )
        elif z.dim() != 2 or z.shape[0] != b or z.shape[1] != d:
            raise ValueError(
                f"Generator expects z of shape [{b}, {d}] or a z map [{b}, {d}, {h}, {w}], "
                f"got {list(z.shape)}"
            )
        if not z.is_floating_point():
            raise ValueError(f"Generator expects a floating-point z, got {z.dtype}")

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        self._check_inputs(x, z)
        w = self.condition.prepare(z) if self.condition is not None else _UnitWeights()

        # Encoder: the left features of every scale are kept for the scale fusions.
        skips: list[Tensor] = []
        feat = self.head(x)
        for s, blocks in enumerate(self.left):
            if s > 0:
                feat = self.down[s - 1](feat)
            for i, block in enumerate(blocks):
                feat = block(feat, w.left(s, i))
            skips.append(feat)

        # Decoder, coarsest scale first: right blocks, then up-sample and fuse (MSF) into the
        # left features of the next finer scale, whose right blocks continue from there.
        feat = skips[-1]
        for s in reversed(range(self._cfg.num_scales)):
            if s < self._cfg.num_scales - 1:
                feat = skips[s] + _modulate(self.up[s](feat), w.fusion(s))
            for i, block in enumerate(self.right[s]):
                feat = block(feat, w.right(s, i))

        # Global modulated connection.
        return x + _modulate(self.tail(feat), w.output())
