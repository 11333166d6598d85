"""The stateless steps: what each network's gradient is made of, in BasicSR's order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.registry import build_discriminator, build_generator
from pipeline.data.batch import Batch
from pipeline.train.losses import GANLoss, PerceptualLoss
from pipeline.train.steps import Nets, Optimizers, gan_step, mse_step
from pipeline.train.tensors import synthetic_samples

WEIGHTS = type("W", (), {"pixel": 0.01, "perceptual": 1.0, "gan": 0.005})


def _batch(n: int = 4) -> Batch:
    return Batch(*synthetic_samples(n, 64, seed=3))


def _nets(kind: str = "vanilla") -> tuple[Nets, Optimizers]:
    g = build_generator("tiny", generator=torch.Generator().manual_seed(0))
    d = build_discriminator("tiny", generator=torch.Generator().manual_seed(1))
    nets = Nets(
        g=g,
        d=d,
        perceptual=PerceptualLoss("conv2_2", pretrained="random", seed=2),
        gan_loss=GANLoss(kind),
    )
    return nets, Optimizers(
        g=torch.optim.Adam(g.parameters(), 1e-3), d=torch.optim.Adam(d.parameters(), 1e-3)
    )


def test_mse_step_lowers_the_loss_on_a_fixed_batch():
    g = build_generator("tiny", generator=torch.Generator().manual_seed(0))
    opts = Optimizers(g=torch.optim.Adam(g.parameters(), 1e-3))
    batch = _batch()
    losses = [mse_step(Nets(g=g), opts, batch)["loss/mse"].item() for _ in range(15)]
    assert losses[-1] < losses[0]
    assert losses[0] == pytest.approx(F.mse_loss(batch.degraded, batch.clean).item(), rel=0.5)


@pytest.mark.parametrize("kind", ["vanilla", "relativistic"])
def test_gan_step_gradients(kind):
    """G's gradient is that of its own loss with D as it was before the step; D's gradient is
    that of D's loss on the pre-update fake only (none of G's loss leaks into D)."""
    nets, opts = _nets(kind)
    g0, d0 = copy.deepcopy(nets.g), copy.deepcopy(nets.d)
    batch = _batch()
    out = gan_step(nets, opts, batch, step=1, weights=WEIGHTS)

    # expected G gradient (D frozen, BN in train mode as in the step)
    g_ref, d_ref = copy.deepcopy(g0), copy.deepcopy(d0)
    fake = g_ref(batch.degraded, batch.z)
    fake_logits = d_ref(fake, batch.z)
    real_logits = d_ref(batch.clean, batch.z).detach() if kind == "relativistic" else None
    loss_g = (
        WEIGHTS.pixel * F.mse_loss(fake, batch.clean)
        + WEIGHTS.perceptual * nets.perceptual(fake, batch.clean)
        + WEIGHTS.gan * nets.gan_loss.generator(fake_logits, real_logits)
    )
    grads = torch.autograd.grad(loss_g, list(g_ref.parameters()))
    for p, expected in zip(nets.g.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)
    assert out["loss/g_total"].item() == pytest.approx(loss_g.item(), rel=1e-5)

    # expected D gradient: D's loss on the fake computed before G's update
    d_ref = copy.deepcopy(d0)
    fake = fake.detach()
    if kind == "vanilla":
        ref_real = d_ref(batch.clean, batch.z)
        loss_d = nets.gan_loss.discriminator_real(ref_real) + nets.gan_loss.discriminator_fake(
            d_ref(fake, batch.z)
        )
    else:
        # the step's D forward passes in order: reference fake (no grad), real, fake; BN
        # running statistics only, the batch statistics are the same
        with torch.no_grad():
            fake_ref = d_ref(fake, batch.z)
        ref_real = d_ref(batch.clean, batch.z)
        loss_d = nets.gan_loss.discriminator_real(
            ref_real, fake_ref
        ) + nets.gan_loss.discriminator_fake(d_ref(fake, batch.z), ref_real.detach())
    grads = torch.autograd.grad(loss_d, list(d_ref.parameters()))
    for p, expected in zip(nets.d.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for p in nets.d.parameters())
    # both networks moved
    assert any(
        not torch.equal(a, b) for a, b in zip(nets.g.parameters(), g0.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(nets.d.parameters(), d0.parameters(), strict=True)
    )


def test_d_warmup_leaves_g_untouched():
    nets, opts = _nets()
    g0 = copy.deepcopy(nets.g)
    out = gan_step(nets, opts, _batch(), step=2, weights=WEIGHTS, d_warmup=2)
    assert "loss/g_total" not in out and "loss/d_real" in out
    assert all(torch.equal(a, b) for a, b in zip(nets.g.parameters(), g0.parameters(), strict=True))


def test_gan_step_needs_its_parts():
    nets, opts = _nets()
    with pytest.raises(ValueError, match="discriminator"):
        gan_step(Nets(g=nets.g), Optimizers(g=opts.g), _batch(), 1, WEIGHTS)
    with pytest.raises(ValueError, match="perceptual"):
        gan_step(Nets(g=nets.g, d=nets.d, gan_loss=GANLoss()), opts, _batch(), 1, WEIGHTS)
