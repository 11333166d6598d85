"""Image-quality metrics with pinned conventions: PSNR, SSIM, LPIPS, DISTS.

Most "can't reproduce the paper" reports come from metric conventions, so ours are fixed here
and every number can say which ones produced it.

PSNR / SSIM (implemented here, in torch):

* Inputs are float tensors in [0, 1], ``[B, C, H, W]`` (or one ``[C, H, W]`` image); results are
  one value per image, ``Tensor[B]`` in float64. The images are NOT quantised here: evaluation
  quantises restored outputs to 8 bits first (as a saved PNG, :func:`pipeline.degradation.
  quantize`), like BasicSR, which computes on uint8 images.
* Everything is computed on the 0..255 scale in float64: PSNR = 10 log10(255^2 / MSE), MSE over
  all channels and pixels of the (cropped) image; identical images give +inf.
* ``crop_border=k`` removes ``k`` pixels on each side before computing (BasicSR's crop_border).
* ``y_channel=True`` computes on the luma of ITU-R BT.601 as MATLAB ``rgb2ycbcr`` defines it:
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1], i.e. Y in [16, 235] on the
  0..255 scale. Y is NOT rounded to an integer (as in BasicSR; MATLAB's rgb2ycbcr on uint8
  images would round). The data range stays 255.
* SSIM is Wang et al. (2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data
  range 255, population (not sample) covariances, mean of the SSIM map over the valid region
  (positions where the whole window fits: 5 pixels on each side are dropped), averaged over
  channels for RGB. This equals scikit-image ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=...)`` and BasicSR's
  ``calculate_ssim``; the tests check the first to 1e-6.

Why our own PSNR/SSIM rather than torchmetrics: we need per-image values for a batch on the GPU
with the Y conversion and border crop above, and a data range that is never inferred from the
data (torchmetrics' default ``data_range=None`` takes max - min of the batch). torchmetrics' SSIM
reflect-pads and crops back to the same valid region but clamps negative variances, so it agrees
only up to that; rather than track such details across versions, these few functions are pinned
to scikit-image in the tests. SSIM filters with two banded-matrix products (BLAS on CPU, cuBLAS on
GPU): the same sums as a float64 depthwise convolution, ~4x faster on our CPU (481x321 image).

LPIPS: the ``lpips`` package, AlexNet trunk, version 0.1 (its linear heads ship in the wheel).
Our inputs in [0, 1] are mapped to [-1, 1] (``normalize=True``), which is what LPIPS was
calibrated for; the CUGAN authors' script passed [0, 1] without it, so its numbers are on a
different convention. Label: ``lpips-alex-v0.1``.

DISTS: torchmetrics' implementation (``torchmetrics.functional.image.dists.DISTSNetwork``,
torchmetrics 1.9.0; its alpha/beta file is byte-identical to the authors' DISTS_pytorch
``weights.pt``). Both it and ``DISTS_pytorch`` build VGG16 with a hard-coded torchvision download,
so neither can be used offline as shipped; torchmetrics is the maintained one, and its network
class is constructed once here with its ``vgg16`` factory swapped for an offline one during the
constructor, after which our resolved VGG16 weights are loaded. The input is NOT resized to 256
on the short side (the authors' ``prepare_image(resize=True)`` option; torchmetrics does not
resize either): we compare at full resolution. Label: ``dists-vgg16``.

Reference features (:meth:`LPIPSMetric.reference`, :meth:`DISTSMetric.reference`): scoring
several restorations of one clean image recomputes the clean image's backbone features on every
call, and neither library takes precomputed features. Inside ``with metric.reference():``
the library's own backbone call (lpips' ``net.forward``, torchmetrics' ``forward_once``) is
memoised by input CONTENT: an input equal to one seen in the block gets the features computed
for it then. The libraries' forward functions run unchanged and the numbers are bitwise those of
separate calls (batching several restorations per pass instead is NOT bitwise: oneDNN picks
other convolution kernels for other batch sizes, ~3e-8 apart on DISTS).

Both learned metrics take ``pretrained`` (``imagenet`` | ``auto`` | ``random``, see
:mod:`pipeline.pretrained`) and append ``[RANDOM BACKBONE: not comparable]`` to their ``label``
whenever the backbone is not the real ImageNet one. Random backbones are initialised from a fixed
seed inside a forked RNG, so building a metric never disturbs the caller's global RNG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lpips
import torch
import torchvision
from torch import Tensor, nn
from torchmetrics.functional.image import dists as tm_dists

from pipeline.pretrained import BackboneWeights, PretrainedMode, resolve_backbone

__all__ = [
    "RANDOM_BACKBONE_TAG",
    "DISTSMetric",
    "LPIPSMetric",
    "psnr",
    "rgb_to_y",
    "ssim",
]

log = logging.getLogger(__name__)

RANDOM_BACKBONE_TAG = "[RANDOM BACKBONE: not comparable]"
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
_RANDOM_INIT_SEED = 0
# MATLAB rgb2ycbcr, Y row, for RGB in [0, 1] -> Y on 0..255.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM


def rgb_to_y(img: Tensor) -> Tensor:
    """BT.601 luma (MATLAB ``rgb2ycbcr``), ``[B, 3, H, W]`` in [0, 1] -> ``[B, 1, H, W]`` in [0, 1].

    Returns ``Y / 255`` (so Y in [16/255, 235/255]), unrounded, in the input dtype.
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"rgb_to_y expects [B, 3, H, W] (got {tuple(img.shape)})")
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    wr, wg, wb = _Y_WEIGHTS
    return (_Y_OFFSET + wr * r + wg * g + wb * b) / 255.0


def _prepare(a: Tensor, b: Tensor, crop_border: int, y_channel: bool) -> tuple[Tensor, Tensor]:
    """Validate, batch, convert to Y if asked, crop, and scale to 0..255 float64."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError("metrics take two torch tensors")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] or [C, H, W] (got {tuple(a.shape)})")
    if not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer (got {crop_border!r})")
    h, w = a.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
    a, b = a.to(torch.float64), b.to(torch.float64)
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    return a * 255.0, b * 255.0


def psnr(a: Tensor, b: Tensor, *, crop_border: int = 0, y_channel: bool = False) -> Tensor:
    """Peak signal-to-noise ratio in dB per image (``Tensor[B]``, float64); see module docstring."""
    x, y = _prepare(a, b, crop_border, y_channel)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _window_matrix(n: int, device: torch.device) -> Tensor:
    """``[n - 10, n]`` banded matrix: ``M @ v`` is the valid 11-tap Gaussian filtering of ``v``.

    Filtering as two matrix products (``M_h @ X @ M_w^T``) instead of a grouped convolution:
    same sums, but BLAS runs them ~4x faster than PyTorch's float64 depthwise convolution.
    """
    half = _SSIM_WINDOW // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    g = (g / g.sum()).tolist()
    m = torch.zeros(n - 2 * half, n, dtype=torch.float64, device=device)
    for k, weight in enumerate(g):
        m.diagonal(k).fill_(weight)
    return m


def ssim(a: Tensor, b: Tensor, *, crop_border: int = 0, y_channel: bool = False) -> Tensor:
    """Structural similarity per image (``Tensor[B]``, float64); see module docstring."""
    x, y = _prepare(a, b, crop_border, y_channel)
    h, w = x.shape[-2:]
    if min(h, w) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels (got {h}x{w})")
    # The five local moments of every channel, filtered without padding: the result is
    # exactly the valid region.
    maps = torch.stack([x, y, x * x, y * y, x * y], dim=2)  # [B, C, 5, H, W]
    maps = _window_matrix(h, x.device) @ maps @ _window_matrix(w, x.device).T
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.unbind(dim=2)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1, c2 = (_K1 * 255.0) ** 2, (_K2 * 255.0) ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return s_map.flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# learned metrics


def _check_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"expected RGB [B, 3, H, W] in [0, 1] (got {tuple(a.shape)})")
    return a, b


def _label(base: str, weights: BackboneWeights) -> str:
    return f"{base} {RANDOM_BACKBONE_TAG}" if weights.is_random else base


def _features_state(
    target: dict[str, Tensor], source: dict[str, Tensor], prefix_len: int, skip: tuple[str, ...]
) -> dict[str, Tensor]:
    """Map a wrapper's ``<sliceN>.<idx>.<param>`` keys onto torchvision's ``features.<idx>``."""
    out = dict(target)
    for key in target:
        if key.endswith(skip):
            continue
        tv_key = "features." + key.split(".", prefix_len)[prefix_len]
        if tv_key not in source:
            raise ValueError(f"backbone state dict lacks {tv_key}")
        out[key] = source[tv_key]
    return out


class _FeatureMemo:
    """A backbone call remembered for the inputs last seen (at most ``keep``), compared by
    content: the same input gives the features computed for it, bitwise, without the work."""

    def __init__(self, fn: Callable[[Tensor], Any], keep: int = 2) -> None:
        self.fn, self.keep = fn, keep
        self.entries: list[tuple[Tensor, Any]] = []
        self.computed = 0  # backbone passes run (the tests count them)

    def __call__(self, x: Tensor) -> Any:
        for i, (key, value) in enumerate(self.entries):
            if key.shape == x.shape and key.dtype == x.dtype and torch.equal(key, x):
                self.entries.append(self.entries.pop(i))  # most recently used last
                return value
        value = self.fn(x)
        self.computed += 1
        self.entries = [*self.entries[-(self.keep - 1) :], (x.detach().clone(), value)]
        return value


@contextlib.contextmanager
def _memoised(owner: nn.Module, attr: str) -> Iterator[_FeatureMemo]:
    """``owner.<attr>`` (a bound method the library calls as ``self.<attr>(x)``) memoised for
    the block; re-entrant (an inner block shares the outer memo)."""
    current = owner.__dict__.get(attr)
    if isinstance(current, _FeatureMemo):
        yield current
        return
    memo = _FeatureMemo(getattr(owner, attr))
    owner.__dict__[attr] = memo
    try:
        yield memo
    finally:
        del owner.__dict__[attr]


class LPIPSMetric(nn.Module):
    """LPIPS (AlexNet, v0.1) on [0, 1] images -> ``Tensor[B]`` (lower is more similar).

    An ``nn.Module``: move it with ``.to(device)`` to where the images are. Evaluation only
    (runs under ``no_grad``).
    """

    def __init__(
        self, pretrained: PretrainedMode = "auto", cache_dir: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__()
        weights = resolve_backbone("alexnet", pretrained, cache_dir)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(_RANDOM_INIT_SEED)
            # lpips calls torchvision's deprecated `pretrained=` argument; nothing to act on.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            # pnet_rand=True: lpips must not fetch the trunk itself; ours is loaded below.
            self.model = lpips.LPIPS(
                net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False
            )
        if weights.state_dict is not None:
            net = self.model.net
            net.load_state_dict(_features_state(net.state_dict(), weights.state_dict, 1, ()))
        self.model.eval().requires_grad_(False)
        self.backbone = weights.label
        self.is_random = weights.is_random
        self.label = _label("lpips-alex-v0.1", weights)
        log.info("LPIPS metric %r (backbone: %s)", self.label, self.backbone)

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _check_pair(a, b)
        return self.model(a, b, normalize=True).reshape(a.shape[0])

    def reference(self) -> contextlib.AbstractContextManager[_FeatureMemo]:
        """Within the block, AlexNet features of an image seen before are not recomputed (the
        clean image's, when it is scored against several restorations)."""
        return _memoised(self.model.net, "forward")


def _offline_vgg16(weights: Any = None, **_: Any) -> nn.Module:
    """Stand-in for torchvision's ``vgg16`` inside DISTSNetwork: no download, no classifier.

    Built on the meta device, then only ``features`` is materialised with PyTorch's default
    init (the real weights, when there are any, are loaded afterwards).
    """
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    model.features = model.features.to_empty(device="cpu")
    for module in model.features.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return model


def _build_dists_network() -> nn.Module:
    # DISTSNetwork.__init__ calls vgg16(weights=VGG16_Weights.DEFAULT), a download. Swap the
    # factory for the constructor's duration only (not thread-safe: build metrics up front).
    original = tm_dists.vgg16
    tm_dists.vgg16 = _offline_vgg16
    try:
        return tm_dists.DISTSNetwork(load_weights=True)
    finally:
        tm_dists.vgg16 = original


class DISTSMetric(nn.Module):
    """DISTS (VGG16, torchmetrics) on [0, 1] images -> ``Tensor[B]`` (lower is more similar).

    An ``nn.Module``: move it with ``.to(device)``. Evaluation only (runs under ``no_grad``).
    The learned alpha/beta are torchmetrics' packaged DISTS weights in every mode; only the
    VGG16 trunk depends on ``pretrained``.
    """

    def __init__(
        self, pretrained: PretrainedMode = "auto", cache_dir: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__()
        weights = resolve_backbone("vgg16", pretrained, cache_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            self.model = _build_dists_network()
        if weights.state_dict is not None:
            target = self.model.state_dict()
            stage_keys = {k: v for k, v in target.items() if k.startswith("stage")}
            loaded = _features_state(stage_keys, weights.state_dict, 1, (".filter",))
            self.model.load_state_dict({**target, **loaded})
        self.model.eval().requires_grad_(False)
        self.backbone = weights.label
        self.is_random = weights.is_random
        self.label = _label("dists-vgg16", weights)
        log.info("DISTS metric %r (backbone: %s)", self.label, self.backbone)

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _check_pair(a, b)
        return self.model(a, b, require_grad=False).reshape(a.shape[0])

    def reference(self) -> contextlib.AbstractContextManager[_FeatureMemo]:
        """Within the block, VGG16 features of an image seen before are not recomputed (the
        clean image's, when it is scored against several restorations)."""
        return _memoised(self.model, "forward_once")
