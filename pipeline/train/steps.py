"""One optimisation step of each stage, as stateless functions of (networks, optimisers, batch).

No hidden state: everything a step reads is an argument and everything it reports is the
returned dict of detached scalar tensors (converted to floats by the caller when it logs, so a
GPU step does not synchronise on every ``.item()``).

The GAN step follows BasicSR's ``SRGANModel.optimize_parameters``: freeze D, step G, unfreeze
D, step D. Under DDP, G and D are the wrapped modules; while D is frozen the generator's
adversarial term goes through the *plain* D module (``unwrap(nets.d)``): D has no gradient to
synchronise in that pass, and running it through the DDP wrapper would arm a gradient
reduction that never fires. D's own step back-propagates its real and fake terms separately
(two forward/backward pairs through the wrapper; gradients accumulate, each pass is
all-reduced), so BatchNorm never sees a mixed real/fake batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from pipeline.data.batch import Batch
from pipeline.train.losses import GANLoss, PerceptualLoss

__all__ = ["LossWeights", "Nets", "Optimizers", "gan_step", "mse_step", "unwrap"]


class LossWeights(Protocol):
    """What ``gan_step`` reads from its weights (``train_*.weights`` in params.yaml)."""

    pixel: float
    perceptual: float
    gan: float


@dataclass
class Nets:
    """The modules a step uses. ``g`` and ``d`` may be DDP-wrapped; the losses never are."""

    g: nn.Module
    d: nn.Module | None = None
    perceptual: PerceptualLoss | None = None
    gan_loss: GANLoss | None = None


@dataclass
class Optimizers:
    g: Optimizer
    d: Optimizer | None = None


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def mse_step(nets: Nets, opts: Optimizers, batch: Batch) -> dict[str, Tensor]:
    """CUnet / Unet: G + C_G on the pixel MSE."""
    opts.g.zero_grad(set_to_none=True)
    restored = nets.g(batch.degraded, batch.z)
    loss = F.mse_loss(restored, batch.clean)
    loss.backward()
    opts.g.step()
    return {"loss/mse": loss.detach()}


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def gan_step(
    nets: Nets,
    opts: Optimizers,
    batch: Batch,
    step: int,
    weights: LossWeights,
    *,
    d_warmup: int = 0,
) -> dict[str, Tensor]:
    """CUGAN / UGAN: ``L_G = perceptual * L_percep + gan * L_GAN + pixel * L_MSE``, then D.

    ``step`` (from 1) and ``d_warmup``: during the first ``d_warmup`` steps only D is trained
    (G's output is computed without gradients), BasicSR's ``net_d_init_iters``.
    """
    if nets.d is None or opts.d is None or nets.gan_loss is None:
        raise ValueError("gan_step needs a discriminator, its optimiser and a GAN loss")
    if weights.perceptual > 0 and nets.perceptual is None:
        raise ValueError("gan_step: perceptual weight > 0 but no perceptual loss was built")
    degraded, clean, z = batch.degraded, batch.clean, batch.z
    d_plain = unwrap(nets.d)
    out: dict[str, Tensor] = {}

    # --- G (D frozen) ---
    _set_requires_grad(nets.d, False)
    opts.g.zero_grad(set_to_none=True)
    if step > d_warmup:
        fake = nets.g(degraded, z)
        total = torch.zeros((), device=fake.device)
        if weights.pixel > 0:
            l_pix = F.mse_loss(fake, clean)
            total = total + weights.pixel * l_pix
            out["loss/g_mse"] = l_pix.detach()
        if weights.perceptual > 0:
            l_per = nets.perceptual(fake, clean)
            total = total + weights.perceptual * l_per
            out["loss/g_percep"] = l_per.detach()
        fake_logits = d_plain(fake, z)
        real_logits = None
        if nets.gan_loss.kind == "relativistic":
            with torch.no_grad():
                real_logits = d_plain(clean, z)
        l_gan = nets.gan_loss.generator(fake_logits, real_logits)
        total = total + weights.gan * l_gan
        out["loss/g_gan"] = l_gan.detach()
        out["loss/g_total"] = total.detach()
        total.backward()
        opts.g.step()
        fake = fake.detach()
    else:
        with torch.no_grad():
            fake = unwrap(nets.g)(degraded, z)

    # --- D ---
    _set_requires_grad(nets.d, True)
    opts.d.zero_grad(set_to_none=True)
    fake_ref = None
    if nets.gan_loss.kind == "relativistic":
        with torch.no_grad():
            fake_ref = d_plain(fake, z)
    real_logits = nets.d(clean, z)
    l_real = nets.gan_loss.discriminator_real(real_logits, fake_ref)
    l_real.backward()
    fake_logits = nets.d(fake, z)
    l_fake = nets.gan_loss.discriminator_fake(fake_logits, real_logits.detach())
    l_fake.backward()
    opts.d.step()
    out["loss/d_real"] = l_real.detach()
    out["loss/d_fake"] = l_fake.detach()
    out["d/real_logit"] = real_logits.detach().mean()
    out["d/fake_logit"] = fake_logits.detach().mean()
    return out
