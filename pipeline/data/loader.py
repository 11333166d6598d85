"""Training loader: shards -> random crops -> degradation -> ``Batch(degraded, clean, z)``.

This module only chooses and builds a backend; the contract every backend implements (Batch,
TrainLoader, ShardSet, LoaderError, the rank split and the saved position) lives one floor
below, in :mod:`pipeline.data.batch`, which both backends import -- never this module.

Two backends behind one entry point, :func:`build_train_loader`, chosen by
``params.loader.backend``:

* ``dali`` (:mod:`pipeline.data.dali_pipeline`): ``fn.readers.webdataset`` over the shard
  indices, decode of the patch's context window only, crop/flip/rotate and the whole
  degradation (per-sample 21x21 Gaussian blur with replicate border, Gaussian noise, 8-bit
  quantisation) inside DALI. It runs on the GPU (GPU operators) when the target device is CUDA
  and on the CPU otherwise.
* ``torch`` (:mod:`pipeline.data.torch_loader`): the same shards and augmentations in plain
  PyTorch ``DataLoader`` workers, degrading with :func:`pipeline.degradation.degrade` -- the
  reference the DALI path is tested against, and the fallback where DALI is unavailable.
* ``auto`` (the default): DALI when its pipeline runs on a GPU; on the CPU the one a short
  probe measured faster on this machine, cached (:mod:`pipeline.data.backend_choice`, which
  logs the choice and why).

Both yield the same number of batches per epoch on every rank (DDP steps in lock-step), give
each rank a disjoint part of the data, and save/restore their position with
``state_dict()`` / ``load_state_dict()`` (JSON-serialisable), so a resumed run continues where
the interrupted one stopped instead of restarting the epoch. The target device is resolved by
:func:`pipeline.device.resolve_device`, the resolver inference and evaluation use too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import Params
from pipeline.data.backend_choice import choose_backend
from pipeline.data.batch import LoaderError, TrainLoader, batches_per_epoch, read_shard_set
from pipeline.data.torch_loader import TorchTrainLoader
from pipeline.device import DeviceError, resolve_device

__all__ = ["build_train_loader"]


def build_train_loader(
    shards_dir: str | Path,
    params: Params,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    fixed_levels: tuple[float, float] | None = None,
) -> TrainLoader:
    """The training loader for one rank, as ``params.loader`` describes it.

    Args:
        shards_dir: directory with ``shards.json`` and its tar/index shards.
        params: validated parameters; reads ``loader`` and ``degradation``.
        rank, world_size: this process's place in DDP (``shard_id`` / ``num_shards``).
        seed: base seed; each rank derives its own streams from ``(seed, rank)``.
        device: where batches are delivered (``"cpu"``, ``"cuda:1"``, ``"auto"``). Under Ray
            pass ``ray.train.torch.get_device()``: Ray remaps CUDA_VISIBLE_DEVICES per worker.
            With ``loader.device: auto`` the DALI pipeline runs on this GPU when it is CUDA.
        fixed_levels: ``(r, sigma)`` for every sample instead of ``degradation.sampling`` (the
            fixed-degradation baselines, ``train_<stage>.fixed_degradation``); the samples are
            degraded on their context windows all the same.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in [0, world_size={world_size})")
    if seed < 0:
        raise LoaderError(f"seed must be >= 0 (got {seed})")
    cfg = params.loader
    shards = read_shard_set(shards_dir, verify=cfg.verify_shards)
    if cfg.crop > shards.crop_size:
        raise LoaderError(
            f"loader.crop {cfg.crop} is larger than the shards' sub-images ({shards.crop_size})"
        )
    if batches_per_epoch(shards.num_samples, world_size, cfg.batch_size) == 0:
        raise LoaderError(
            f"{shards.num_samples} samples over {world_size} ranks give fewer than "
            f"loader.batch_size={cfg.batch_size} per rank"
        )
    try:
        target = resolve_device(device)
    except DeviceError as err:
        raise LoaderError(f"loader: {err}") from None

    def build(name: str) -> TrainLoader:
        cls: Callable[..., TrainLoader] = TorchTrainLoader
        if name == "dali":
            # Imported here, not at the top: DALI is a large optional wheel, and the torch
            # backend must keep working (and importing this module must stay cheap) without it.
            from pipeline.data.dali_pipeline import DaliTrainLoader

            cls = DaliTrainLoader
        return cls(
            shards,
            params,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=target,
            fixed_levels=fixed_levels,
        )

    return build(choose_backend(params, shards, target, build).name)
