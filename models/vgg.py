"""Frozen VGG19 feature extractor for the perceptual loss ("VGG19-54": conv5_4 before its ReLU).

Built from ``torchvision.models.vgg19(weights=None)`` and truncated after the requested layer,
so layer indices and state-dict keys (``features.<i>.weight``) are torchvision's; conv5_4 is
``features[34]``, as in the authors' ``define_F`` (``feature_layer=34``). It never downloads:
real ImageNet weights come from ``pipeline.pretrained.resolve_backbone`` and are loaded with
:meth:`VGGFeatureExtractor.load_backbone_state_dict`; without them the weights are random
(torchvision's own init: kaiming-normal fan_out, zero bias), which callers must label.

The full torchvision model is built on the ``meta`` device (no memory, no init) and only the
kept layers are materialised: building all of VGG19 on the CPU initialises its 120M-parameter
classifier, about 2 s on a small machine, for layers we throw away.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["BackboneStateDictError", "VGGFeatureExtractor", "vgg19_layer_names"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneStateDictError(ValueError):
    """A backbone state dict that does not fit (one-line message)."""


def _summarise(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def vgg19_layer_names(features: nn.Sequential) -> list[str]:
    """Names of torchvision's VGG19 ``features`` layers: conv1_1, relu1_1, ..., pool5.

    Derived by walking the layers (convs numbered within a block, a max-pool closing the block)
    rather than hard-coded, so the index of e.g. conv5_4 follows torchvision's layout.
    """
    names: list[str] = []
    block, conv = 1, 0
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(layer, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(layer, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:  # pragma: no cover - torchvision's VGG has only these three
            raise TypeError(f"unexpected layer in VGG19 features: {type(layer).__name__}")
    return names


class VGGFeatureExtractor(nn.Module):
    """``forward(x in [0, 1]) -> features at `layer``` (frozen: no parameter gradients, eval).

    Gradients still flow to the input, as the perceptual loss needs. ``use_input_norm``
    applies the ImageNet mean/std that torchvision's VGG19 weights expect. ``generator`` seeds
    the random initialisation (used when no pretrained weights are loaded).
    """

    def __init__(
        self,
        layer: str = "conv5_4",
        use_input_norm: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        with torch.device("meta"):
            full = torchvision.models.vgg19(weights=None).features
        names = vgg19_layer_names(full)
        if layer not in names:
            raise ValueError(f"unknown VGG19 layer {layer!r}; choose one of {', '.join(names)}")
        self.layer = layer
        self.layer_index = names.index(layer)
        self.features = full[: self.layer_index + 1].to_empty(device="cpu")
        self._init_random(generator)

        self.use_input_norm = use_input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _init_random(self, generator: torch.Generator | None) -> None:
        # torchvision's VGG init for its convs (VGG.__init__), restated to take a generator.
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> VGGFeatureExtractor:
        """Always stays in eval mode: the extractor is a fixed measuring instrument."""
        return super().train(False)

    def needed_keys(self) -> list[str]:
        """The torchvision vgg19 state-dict keys this extractor reads."""
        return [f"features.{key}" for key in self.features.state_dict()]

    def load_backbone_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a torchvision vgg19 state dict (``features.*``; the classifier is ignored).

        Strict about the keys it needs: every one present, every shape equal. Keys beyond the
        truncation point and ``classifier.*`` are ignored.
        """
        expected = self.features.state_dict()
        missing: list[str] = []
        wrong: list[str] = []
        picked: dict[str, Tensor] = {}
        for key, ref in expected.items():
            full_key = f"features.{key}"
            value = state_dict.get(full_key)
            if value is None:
                missing.append(full_key)
            elif not isinstance(value, Tensor) or value.shape != ref.shape:
                shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                wrong.append(f"{full_key} {shape} != {list(ref.shape)}")
            else:
                picked[key] = value
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"missing {_summarise(missing)}")
            if wrong:
                parts.append(f"shape mismatch {_summarise(wrong)}")
            raise BackboneStateDictError(
                f"not a torchvision vgg19 state dict for layers up to {self.layer}: "
                + "; ".join(parts)
            )
        self.features.load_state_dict(picked, strict=True)
        logger.debug("loaded %d VGG19 tensors up to %s", len(picked), self.layer)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        return self.features(x)
