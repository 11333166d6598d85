"""Padding and tiling: how an image of any size is cut into pieces the generator can take.

The U-Net halves the resolution ``S - 1`` times, so H and W must be multiples of
``size_multiple = 2**(S-1)``: the image is padded on the bottom and right by replicating its
last row/column, and the output is cropped back.

Tiling (for images too large to run in one piece) is "keep the centre": the padded image is
cut into cores of ``tile x tile`` pixels that partition it; each core is run with a margin of
``tile_overlap`` pixels of real image around it (less at the image border, where the untiled
run sees the same border), and only the core of each output is kept. Core origins and margins
are multiples of ``size_multiple``, so every tile sees the same down-sampling grid as the whole
image. A core pixel's output then equals the untiled one exactly (up to float summation order)
whenever the margin covers the network's receptive field (:func:`receptive_field_radius`);
smaller margins give small differences along the core boundaries, which in practice stay small
because the effective receptive field is much narrower than the theoretical one.

A z map (a condition per pixel, ``[B, D, H, W]``) is padded like the image and each tile gets
the matching crop of it, so tiling a map behaves exactly as tiling the image.

Everything here works on tensors and a ``run(x, z) -> y`` callable (an inference path), so that
:func:`pipeline.inference.restore.restore` and the path probe (:mod:`pipeline.inference.choice`)
share one implementation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.generator import GeneratorConfig

__all__ = [
    "AUTO_TILE_MAX_PIXELS",
    "AUTO_TILE_SIZE",
    "Progress",
    "auto_tile",
    "pad_to_multiple",
    "receptive_field_radius",
    "round_up",
    "run_pieces",
    "tile_layout",
]

log = logging.getLogger(__name__)

#: ``progress(done, total)``: called after each piece (tile) of an image is restored.
Progress = Callable[[int, int], None]
#: ``run(x, z) -> y``: one forward pass of an inference path on a padded piece.
PieceRunner = Callable[[Tensor, Tensor | None], Tensor]

#: The default tiling (``cugan restore --tile auto``, the studio): images up to this many pixels
#: run in one piece (a 1920x1080 frame is 2.07 MP; the authors' model keeps ~1 GB of float32
#: activations per megapixel), larger ones in tiles of AUTO_TILE_SIZE.
AUTO_TILE_MAX_PIXELS = 1 << 21
AUTO_TILE_SIZE = 512


def auto_tile(height: int, width: int) -> int | None:
    """The default tile size for an image: None (one piece) up to AUTO_TILE_MAX_PIXELS."""
    return AUTO_TILE_SIZE if height * width > AUTO_TILE_MAX_PIXELS else None


def receptive_field_radius(cfg: GeneratorConfig) -> int:
    """Upper bound, in input pixels, on how far an output pixel of G can see.

    Sums the half-widths of every layer on the path head -> left blocks -> downs -> right
    blocks -> ups -> tail, each scaled by the pixel stride of its scale. A ``tile_overlap`` at
    least this large makes tiled and untiled outputs agree up to float rounding.
    """
    radius = 1 + 1  # head and tail 3x3 convs at stride 1
    for s, n in enumerate(cfg.blocks_per_scale):
        stride = 2**s
        radius += 2 * (2 * n) * stride  # n MRBs per side, two 3x3 convs each, both sides
        if s > 0:
            # the k x k stride-2 down conv entering scale s and the 2x2 up conv leaving it
            radius += (cfg.down_kernel - 1) * 2 ** (s - 1) + 2 ** (s - 1)
    return radius


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_layout(
    length: int, tile: int, overlap: int, multiple: int
) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis of a padded length: ``(in_start, in_end, core_start, core_end)``.

    Cores of ``tile`` pixels (rounded up to ``multiple``) partition ``[0, length)``; inputs add
    ``overlap`` (rounded up to ``multiple``) on each side, clamped to the image.
    """
    if length % multiple:
        raise ValueError(f"length {length} is not a multiple of {multiple}")
    core = round_up(max(tile, 1), multiple)
    margin = round_up(max(overlap, 0), multiple)
    spans = []
    for start in range(0, length, core):
        end = min(start + core, length)
        spans.append((max(0, start - margin), min(length, end + margin), start, end))
    return spans


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad a [B, C, H, W] tensor on the bottom/right to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = round_up(h, multiple) - h, round_up(w, multiple) - w
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def _to(t: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype)


def run_pieces(
    run: PieceRunner,
    x: Tensor,
    z: Tensor | None,
    *,
    out_channels: int,
    multiple: int,
    tile: int | None,
    overlap: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> Tensor:
    """``run`` over a padded CPU tensor ``x`` [B, C, H, W], whole or tile by tile (module
    docstring); the float32 CPU output. ``z``: [B, D], a [B, D, H, W] map (cropped with each
    tile), or None. Each piece moves to ``device`` just before its forward pass."""
    hp, wp = x.shape[-2:]
    if tile is None or (tile >= hp and tile >= wp):
        out = run(_to(x, device, dtype), _to(z, device, dtype)).float().cpu()
        if progress is not None:
            progress(1, 1)
        return out
    rows = tile_layout(hp, tile, overlap, multiple)
    cols = tile_layout(wp, tile, overlap, multiple)
    log.debug(
        "tiled inference: %d x %d tiles of %d px, overlap %d", len(rows), len(cols), tile, overlap
    )
    out = torch.empty(x.shape[0], out_channels, hp, wp, dtype=torch.float32)
    done, total = 0, len(rows) * len(cols)
    for y0, y1, cy0, cy1 in rows:
        for x0, x1, cx0, cx1 in cols:
            piece = x[..., y0:y1, x0:x1]
            z_piece = z if z is None or z.dim() == 2 else z[..., y0:y1, x0:x1]
            result = run(_to(piece, device, dtype), _to(z_piece, device, dtype))
            out[..., cy0:cy1, cx0:cx1] = (
                result[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].float().cpu()
            )
            done += 1
            if progress is not None:
                progress(done, total)
    return out
