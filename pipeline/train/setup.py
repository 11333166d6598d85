"""Setting up one training worker: networks, weights, optimisers and the loader.

Everything here runs once per worker start (a fresh start or a resume after a failure), before
the first iteration; :func:`set_up_worker` composes it into a :class:`WorkerSetup` that the
iteration loop (:mod:`pipeline.train.loop`) consumes.

Order matters and is the same on every rank: networks are built from the same seeds (so all
ranks start identical before DDP broadcasts anything), weights come from the checkpoint being
resumed (else G from ``init_dir``), under DDP their BatchNorm layers become synchronised ones
(:mod:`pipeline.train.sync_norm`: statistics of the global batch, so that the GAN stage does
not depend on the number of workers), modules move to the worker's device, THEN optimisers are
built and their saved state loaded (``Optimizer.load_state_dict`` casts the moments to each
parameter's device), and last the loader and RNG streams are put back at the checkpoint's
position -- only when the checkpoint was written by the same number of
workers; otherwise they restart from their seeds with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import build_discriminator, build_generator
from pipeline.checkpoint import load_generator
from pipeline.config import Params, TrainStageParams
from pipeline.data.batch import TrainLoader
from pipeline.data.loader import build_train_loader
from pipeline.train.losses import GANLoss, PerceptualLoss
from pipeline.train.session import Session
from pipeline.train.state import TrainState, load_train_state, restore_rng
from pipeline.train.steps import Nets, Optimizers
from pipeline.train.sync_norm import sync_batch_norm
from pipeline.train.testing import TestHooks
from pipeline.train.worker_config import WorkerConfig

__all__ = [
    "TrainLoopError",
    "WorkerSetup",
    "build_loader",
    "build_networks",
    "build_optimizers",
    "load_weights",
    "loader_threads",
    "set_up_worker",
]

log = logging.getLogger(__name__)


class TrainLoopError(RuntimeError):
    """The loop cannot run as configured (one-line message)."""


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_networks(
    params: Params, stage: TrainStageParams
) -> tuple[nn.Module, nn.Module | None, PerceptualLoss | None]:
    """G, D (GAN stages) and the perceptual loss, initialised identically on every rank."""
    seed = params.base.seed
    g = build_generator(stage.generator, generator=_seeded(seed))
    if stage.loss != "gan":
        return g, None, None
    d = build_discriminator(stage.discriminator, generator=_seeded(seed + 1))
    perceptual = None
    if stage.weights.perceptual > 0:
        perceptual = PerceptualLoss(
            stage.perceptual_layer,
            pretrained=params.base.pretrained,
            weights_dir=params.base.weights_dir,
            seed=seed + 2,
        )
    return g, d, perceptual


def load_weights(
    g: nn.Module,
    d: nn.Module | None,
    state: TrainState | None,
    init_dir: Path | None,
    stage_name: str,
) -> int:
    """Weights from the checkpoint being resumed, else G from ``init_dir``; the start iteration."""
    if state is not None:
        if state.stage != stage_name:
            raise TrainLoopError(f"checkpoint is of stage {state.stage!r}, not {stage_name!r}")
        g.load_state_dict(state.generator)
        if d is not None:
            if state.discriminator is None:
                raise TrainLoopError("checkpoint has no discriminator for a GAN stage")
            d.load_state_dict(state.discriminator)
        return state.iteration
    if init_dir is not None:
        init, _ = load_generator(init_dir)
        if init.config != g.config:
            raise TrainLoopError(
                f"{init_dir}: generator config {init.config} differs from "
                f"train_{stage_name}'s ({g.config})"
            )
        g.load_state_dict(init.state_dict())
    return 0


def build_optimizers(
    stage: TrainStageParams, g: nn.Module, d: nn.Module | None, state: TrainState | None
) -> Optimizers:
    """Adam for G (+ D); build after the modules are on their device, then load the saved
    state: ``load_state_dict`` casts the moments to each parameter's device and dtype."""

    def adam(module: nn.Module, p: Any) -> torch.optim.Adam:
        return torch.optim.Adam(
            module.parameters(), lr=p.lr, betas=p.betas, weight_decay=p.weight_decay
        )

    opts = Optimizers(
        g=adam(g, stage.optimizer_g), d=adam(d, stage.optimizer_d) if d is not None else None
    )
    if state is not None:
        opts.g.load_state_dict(state.optimizers["g"])
        if opts.d is not None:
            opts.d.load_state_dict(state.optimizers["d"])
    return opts


def loader_threads(configured: int, worker_cpus: int | None) -> int:
    """The loader's threads on a worker of ``worker_cpus`` CPUs (``WorkerConfig.threads``).

    The loader reads ``params.loader.num_threads`` (DALI CPU threads; torch DataLoader
    processes); on a worker Ray gave fewer CPUs it is capped there: torch's intra-op threads
    already fill the worker's CPUs, and more loader threads than cores only time-slice against
    them (each preemption of an OpenMP thread stalls the whole team at its next barrier).
    """
    return configured if worker_cpus is None else max(1, min(configured, worker_cpus))


def build_loader(
    config: WorkerConfig,
    hooks: TestHooks | None,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
) -> TrainLoader:
    """This rank's loader with the per-worker batch ``loader.batch_size / world_size``:
    the shards of ``config``, or the synthetic tensors of a test hook (never both)."""
    params = config.params
    per_worker = params.loader.batch_size // world_size
    synthetic = hooks.synthetic if hooks is not None else None
    if (config.shards_dir is None) == (synthetic is None):
        raise TrainLoopError(
            "a training worker needs either a shards directory or synthetic test data, "
            "not both or neither"
        )
    if synthetic is not None:
        if config.stage_section.fixed_degradation is not None:
            raise TrainLoopError(
                f"{config.tag}: fixed_degradation needs shards (the loader degrades each "
                "sample at the fixed levels); synthetic test data comes degraded already"
            )
        return synthetic.loader(
            crop=params.loader.crop,
            batch_size=per_worker,
            rank=rank,
            world_size=world_size,
            device=device,
        )
    threads = loader_threads(params.loader.num_threads, config.threads)
    if threads != params.loader.num_threads and rank == 0:
        log.info(
            "loader: %d thread(s) per worker (loader.num_threads %d capped at the worker's %d CPU)",
            threads,
            params.loader.num_threads,
            config.threads,
        )
    local = params.model_copy(
        update={
            "loader": params.loader.model_copy(
                update={"batch_size": per_worker, "num_threads": threads}
            )
        }
    )
    fixed = config.stage_section.fixed_degradation
    return build_train_loader(
        config.shards_dir,
        local,
        rank=rank,
        world_size=world_size,
        seed=params.base.seed,
        device=device,
        # a fixed-degradation baseline (Unet/UGAN): the loader degrades every context window at
        # the stage's (r, sigma), exactly as it degrades the others' drawn levels
        fixed_levels=tuple(map(float, fixed)) if fixed is not None else None,
    )


@dataclass
class WorkerSetup:
    """A worker ready for its first iteration (``start`` + 1)."""

    nets: Nets
    opts: Optimizers
    loader: TrainLoader
    start: int


def _restore_streams(
    state: TrainState,
    loader: TrainLoader,
    session: Session,
    tag: str,
) -> None:
    """Loader position and RNG states of this rank, when the checkpoint has them."""
    rank, world = session.rank, session.world_size
    if state.world_size == world and state.loaders[rank] is not None:
        loader.load_state_dict(state.loaders[rank])
        restore_rng(state.rng[rank], session.device)
    elif rank == 0:
        log.warning(
            "%s: checkpoint was written by %d workers, this run has %d: loaders "
            "and RNGs restart from their seeds",
            tag,
            state.world_size,
            world,
        )


def set_up_worker(
    config: WorkerConfig, session: Session, hooks: TestHooks | None = None
) -> WorkerSetup:
    """Networks, weights, optimisers, loader and streams of this worker (module docstring)."""
    params, stage = config.params, config.stage_section
    rank, world, device = session.rank, session.world_size, session.device
    if params.loader.batch_size % world:
        raise TrainLoopError(
            f"loader.batch_size {params.loader.batch_size} is not divisible by {world} workers"
        )
    g, d, perceptual = build_networks(params, stage)
    with session.restored() as ckpt_dir:
        state = load_train_state(ckpt_dir) if ckpt_dir is not None else None
    start = load_weights(g, d, state, config.init_dir, config.stage)
    if rank == 0 and state is not None:
        log.info("%s: resuming from the checkpoint at iteration %d", config.tag, start)
    elif rank == 0 and config.init_dir is not None:
        log.info("%s: G starts from %s", config.tag, config.init_dir)
    if world > 1:
        # Under DDP, BatchNorm (D's) normalises over the global batch, not each rank's share:
        # otherwise the GAN stage would depend on the number of workers (sync_norm docstring).
        g = sync_batch_norm(g, device)
        d = sync_batch_norm(d, device) if d is not None else None
    for module in (g, d, perceptual):
        if module is not None:
            module.to(device)
    opts = build_optimizers(stage, g, d, state)
    nets = Nets(
        g=session.prepare(g),
        d=session.prepare(d) if d is not None else None,
        perceptual=perceptual,
        gan_loss=GANLoss(stage.gan_type) if d is not None else None,
    )
    loader = build_loader(config, hooks, rank=rank, world_size=world, device=device)
    if state is not None:
        _restore_streams(state, loader, session, config.tag)
    return WorkerSetup(nets=nets, opts=opts, loader=loader, start=start)
