"""GAN and perceptual losses (random VGG weights, chosen explicitly)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.losses import GANLoss, PerceptualLoss


def test_vanilla_gan_loss_values():
    loss = GANLoss("vanilla")
    zero = torch.zeros(4, 1)
    assert loss.generator(zero).item() == pytest.approx(math.log(2))
    big = torch.full((4, 1), 20.0)
    assert loss.discriminator_real(big).item() == pytest.approx(0, abs=1e-8)
    assert loss.discriminator_fake(big).item() == pytest.approx(20, rel=1e-6)
    # non-saturating: G's gradient stays large when D confidently rejects the fake
    fake = torch.full((4, 1), -20.0, requires_grad=True)
    loss.generator(fake).backward()
    assert fake.grad.abs().mean().item() == pytest.approx(0.25, rel=1e-6)  # (sigmoid - 1) / 4


def test_relativistic_gan_loss_is_symmetric_and_needs_both():
    loss = GANLoss("relativistic")
    real, fake = torch.tensor([[2.0], [1.0]]), torch.tensor([[0.0], [-1.0]])
    # D's terms: real vs mean fake, fake vs mean real, each halved
    expected_real = 0.5 * torch.nn.functional.softplus(-(real - fake.mean())).mean()
    assert loss.discriminator_real(real, fake).item() == pytest.approx(expected_real.item())
    # G's loss is D's loss with the labels swapped
    g = loss.generator(fake, real)
    d = loss.discriminator_real(fake, real) + loss.discriminator_fake(real, fake)
    assert g.item() == pytest.approx(d.item())
    with pytest.raises(ValueError, match="real batch"):
        loss.generator(fake)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        GANLoss("wgan")


def test_perceptual_loss_random_backbone():
    loss = PerceptualLoss(pretrained="random", seed=0)
    assert loss.is_random and "RANDOM" in loss.label.upper()
    x = torch.rand(2, 3, 64, 64)
    assert loss(x, x).item() == 0.0
    y = x.clone().requires_grad_(True)
    value = loss(y, torch.rand(2, 3, 64, 64))
    value.backward()
    assert value.item() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())
    # same seed -> same network (every DDP rank measures with the same VGG)
    again = PerceptualLoss(pretrained="random", seed=0)
    assert torch.equal(again.vgg.features[0].weight, loss.vgg.features[0].weight)
