"""BatchNorm with statistics over ALL ranks' batches under DDP, on GPU and on CPU.

Why: D normalises with BatchNorm (models/discriminator.py). Under DDP each rank would normalise
with the statistics of its own share of the global batch (``loader.batch_size / world_size``
samples), so D -- and through its gradients G -- would be a different function on 1, 2 or 8
workers: the GAN stage would not be world-size invariant. Normalising with the statistics of
the whole global batch makes a DDP step equal to one step of one process on the global batch
(``tests/test_train_sync_norm.py``, ``tests/test_train_ray.py``).

:func:`sync_batch_norm` converts a network's BatchNorm layers. On CUDA (NCCL) PyTorch's
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does the whole job. On the CPU (gloo)
PyTorch's SyncBatchNorm cannot run in torch 2.14 -- checked with torch 2.14.1: its ``forward``
refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU or XPU..."), its
kernels (``aten::batch_norm_stats`` ...) exist for CUDA only, and DDP refuses a CPU module
holding one ("SyncBatchNorm layers only work with GPU modules"). So on the CPU each
``BatchNorm2d`` becomes a :class:`CrossRankBatchNorm2d`: a BatchNorm2d holding the same
parameters and buffers (the state dict is unchanged: checkpoints load either way) whose
training forward sums the per-channel statistics over the ranks with an all-reduce whose
backward all-reduces the gradient (:class:`_SumOverRanks`). That collective is written out
because the public differentiable one, ``torch.distributed.nn.functional.all_reduce``, is
deprecated in torch 2.14 and its replacement lives in a private module.

The math is BatchNorm's on the global batch: with ``N`` values per channel over all ranks,
``mean = sum(x) / N``, ``var = sum((x - mean)^2) / N`` (two passes, not ``E[x^2] - mean^2``,
which cancels badly in float32), ``y = (x - mean) / sqrt(var + eps) * weight + bias``, running
statistics updated with the unbiased ``var * N / (N - 1)``, as ``F.batch_norm`` does. Autograd
differentiates through the sums, so each rank's input gradient includes the other ranks'
losses through the shared statistics -- what SyncBatchNorm's backward all-reduce does.

Model code never sees any of this: the conversion happens in :mod:`pipeline.train.setup`, only
when there are several ranks, and every rank must run the same forward/backward sequence
(the GAN step does: the collectives are matched in order on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["CrossRankBatchNorm2d", "sync_batch_norm"]


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` of a tensor; its gradient is the ``all_reduce(SUM)`` of the
    incoming gradients (each rank's loss depends on the sum of every rank's input)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in training under a process group of several ranks, normalises
    with the statistics of all ranks' batches (module docstring); otherwise plain BatchNorm.

    A BatchNorm2d, not a SyncBatchNorm: DDP refuses SyncBatchNorm layers in CPU modules
    ("SyncBatchNorm layers only work with GPU modules").
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, 2, 3]
        shape = [1, -1, 1, 1]
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)  # values per channel over all ranks
        n = float(count.item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n:g}")
        mean = _SumOverRanks.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as BatchNorm2d does
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * (n / (n - 1)), factor)
        return out

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> CrossRankBatchNorm2d:
        """The layer for ``bn``, holding the very same parameters and buffers."""
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            out.weight, out.bias = bn.weight, bn.bias
        out.running_mean, out.running_var = bn.running_mean, bn.running_var
        out.num_batches_tracked = bn.num_batches_tracked
        return out.train(bn.training)


def _cross_rank(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossRankBatchNorm2d):
        return CrossRankBatchNorm2d.from_batch_norm(module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm)):
        raise TypeError(
            f"{type(module).__name__}: only BatchNorm2d has a cross-rank CPU version "
            "(pipeline/train/sync_norm.py)"
        )
    for name, child in module.named_children():
        module.add_module(name, _cross_rank(child))
    return module


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer normalising over all ranks (module docstring):
    PyTorch's ``SyncBatchNorm.convert_sync_batchnorm`` for an accelerator, our
    :class:`CrossRankBatchNorm2d` layers for the CPU. Either way the layers keep the same
    parameter and buffer tensors, so weights loaded before and optimisers built after see
    one set, and the state dict keeps its keys (checkpoints load into either).
    """
    if device.type == "cpu":
        return _cross_rank(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
