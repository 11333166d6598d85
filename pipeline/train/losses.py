"""Losses of the GAN stage: perceptual (VGG19-54, L1) and the GAN objective.

The pixel loss is plain ``torch.nn.functional.mse_loss``. Both classes here are written as in
BasicSR's ``losses/basic_loss.py`` / ``gan_loss.py`` but take everything explicitly: the
backbone weights come from :func:`pipeline.pretrained.resolve_backbone` (never a silent
download), and the GAN loss is split into its generator and discriminator halves so that
:func:`pipeline.train.steps.gan_step` reads like the method.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.vgg import VGGFeatureExtractor
from pipeline.pretrained import resolve_backbone

__all__ = ["GANLoss", "GanType", "PerceptualLoss"]

log = logging.getLogger(__name__)

GanType = Literal["vanilla", "relativistic"]


class PerceptualLoss(nn.Module):
    """``L1(phi(x), phi(y))`` with phi = VGG19 features at ``layer`` (conv5_4, before its ReLU).

    ``pretrained`` is the ``base.pretrained`` mode: ``imagenet`` raises
    :class:`~pipeline.pretrained.PretrainedWeightsMissing` without the file, ``auto`` falls back
    to random weights with a warning, ``random`` never looks. ``is_random`` and ``label`` say
    what was used (the trainer tags its MLflow run with them). Random weights are drawn from
    ``seed`` so that every DDP rank, and a resumed run, measure with the same network.
    """

    def __init__(
        self,
        layer: str = "conv5_4",
        *,
        pretrained: Literal["imagenet", "auto", "random"] = "auto",
        weights_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vgg = VGGFeatureExtractor(
            layer=layer, use_input_norm=True, generator=torch.Generator().manual_seed(seed)
        )
        weights = resolve_backbone("vgg19", pretrained, weights_dir)
        if weights.state_dict is not None:
            self.vgg.load_backbone_state_dict(weights.state_dict)
        self.is_random = weights.is_random
        self.label = weights.label

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_features = self.vgg(target)
        return F.l1_loss(self.vgg(x), target_features)


class GANLoss:
    """The GAN objective, split into what G minimises and what D minimises.

    * ``vanilla``: the standard GAN with the non-saturating generator loss (the paper's
      "standard GAN loss"): D minimises ``BCE(D(real), 1) + BCE(D(fake), 0)``, G minimises
      ``BCE(D(fake), 1)``.
    * ``relativistic``: ESRGAN's relativistic average GAN; each side compares a logit with the
      mean logit of the other kind, and both terms are averaged (halved).

    D's loss is returned as two terms (real, fake) because the step back-propagates them
    separately, as BasicSR does, so that D sees real and fake batches in separate forward passes
    (its BatchNorm statistics are never a mix of the two).
    """

    def __init__(self, kind: GanType = "vanilla") -> None:
        if kind not in ("vanilla", "relativistic"):
            raise ValueError(f"unknown GAN loss {kind!r} (vanilla or relativistic)")
        self.kind = kind

    @staticmethod
    def _bce(logits: Tensor, target_is_real: bool) -> Tensor:
        target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)

    def generator(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        """G's adversarial loss; ``real_logits`` (detached) only for ``relativistic``."""
        if self.kind == "vanilla":
            return self._bce(fake_logits, True)
        if real_logits is None:
            raise ValueError("the relativistic GAN loss needs D's logits on the real batch")
        return 0.5 * (
            self._bce(real_logits - fake_logits.mean(), False)
            + self._bce(fake_logits - real_logits.mean(), True)
        )

    def discriminator_real(self, real_logits: Tensor, fake_logits: Tensor | None = None) -> Tensor:
        """D's loss on the real batch (``fake_logits`` detached, relativistic only)."""
        if self.kind == "vanilla":
            return self._bce(real_logits, True)
        if fake_logits is None:
            raise ValueError("the relativistic GAN loss needs D's logits on the fake batch")
        return 0.5 * self._bce(real_logits - fake_logits.mean(), True)

    def discriminator_fake(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        """D's loss on the fake batch (``real_logits`` detached, relativistic only)."""
        if self.kind == "vanilla":
            return self._bce(fake_logits, False)
        if real_logits is None:
            raise ValueError("the relativistic GAN loss needs D's logits on the real batch")
        return 0.5 * self._bce(fake_logits - real_logits.mean(), False)
