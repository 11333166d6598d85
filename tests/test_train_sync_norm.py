"""Synchronised BatchNorm under DDP (pipeline/train/sync_norm.py): two gloo ranks on the CPU
equal one process on the global batch -- and do NOT without the conversion.

The two ranks are real processes (``torch.multiprocessing`` spawn, a gloo group over a file
store), each running the production GAN step (:func:`pipeline.train.steps.gan_step`) on its half
of the same global batches with G and D wrapped in ``DistributedDataParallel``. The reference
is one process stepping on the whole batches with plain BatchNorm.

"Equal" means equal up to the order of floating-point reductions: the two runs do the same
arithmetic in a different order (DDP averages the gradients of two half-batches, the
reference back-propagates one whole batch; the batch statistics are summed over two halves
instead of in one sum). The networks run in float64 here, and the tolerance is
``rtol=1e-9, atol=1e-11`` on every weight and BatchNorm buffer after the steps (measured
differences: below 1e-13). Why not float32: Adam's first steps are ``lr * g / |g|``, so a
gradient component near zero whose float32 rounding differs flips sign and moves by 2 lr
(measured: 4e-3 on one element of D after one step at lr 2e-3) -- the comparison would test
Adam's conditioning, not the statistics. Without the conversion each rank normalises with the
statistics of its 2 samples instead of the batch's 4, and the weights and buffers differ by
about 1e-1, ten orders of magnitude beyond the tolerance; the same test asserts that too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from models.registry import build_discriminator, build_generator
from pipeline.config import LossWeightParams
from pipeline.train.losses import GANLoss
from pipeline.train.steps import Nets, Optimizers, gan_step, unwrap
from pipeline.train.sync_norm import CrossRankBatchNorm2d, sync_batch_norm

STEPS = 3
BATCH = 4  # the global batch; each of the two ranks takes 2
WEIGHTS = LossWeightParams(pixel=1.0, perceptual=0.0, gan=0.1)
TOLERANCE = {"rtol": 1e-9, "atol": 1e-11}
DTYPE = torch.float64


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        clean = torch.rand(BATCH, 3, 64, 64, generator=gen, dtype=DTYPE)
        noise = torch.randn(BATCH, 3, 64, 64, generator=gen, dtype=DTYPE)
        degraded = (clean + 0.1 * noise).clamp(0, 1)
        out.append((degraded, clean, torch.rand(BATCH, 2, generator=gen, dtype=DTYPE)))
    return out


def _train(rank: int, world: int, *, convert: bool) -> dict[str, torch.Tensor]:
    """STEPS GAN steps on this rank's share of every batch; G and D's final state."""
    from pipeline.data.batch import Batch

    g = build_generator("tiny", generator=torch.Generator().manual_seed(0)).to(DTYPE)
    d = build_discriminator("tiny", generator=torch.Generator().manual_seed(1)).to(DTYPE)
    if convert:
        cpu = torch.device("cpu")
        g, d = sync_batch_norm(g, cpu), sync_batch_norm(d, cpu)
    opts = Optimizers(
        g=torch.optim.Adam(g.parameters(), lr=2e-3), d=torch.optim.Adam(d.parameters(), lr=2e-3)
    )
    if world > 1:
        g, d = nn.parallel.DistributedDataParallel(g), nn.parallel.DistributedDataParallel(d)
    nets = Nets(g=g, d=d, gan_loss=GANLoss("vanilla"))
    share = BATCH // world
    for step, tensors in enumerate(_batches(), start=1):
        part = Batch(*(t[rank * share : (rank + 1) * share] for t in tensors))
        gan_step(nets, opts, part, step, WEIGHTS)
    state = {f"g.{k}": v for k, v in unwrap(nets.g).state_dict().items()}
    state.update({f"d.{k}": v for k, v in unwrap(nets.d).state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _probe(shape: torch.Size) -> torch.Tensor:
    """Fixed weights of a linear loss on a layer's output (a gradient that varies per value)."""
    return torch.arange(shape.numel(), dtype=DTYPE).view(shape).cos()


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for convert in (True, False):
            state = _train(rank, world, convert=convert)
            save_file(state, f"{out}/rank{rank}-{'sync' if convert else 'plain'}.safetensors")
        # one BatchNorm layer alone, with unequal shares (3 samples on rank 0, 1 on rank 1)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(4, 5, 6, 6, generator=gen, dtype=DTYPE) * 3 + 1
        bn = sync_batch_norm(nn.BatchNorm2d(5, dtype=DTYPE), torch.device("cpu"))
        part = slice(0, 3) if rank == 0 else slice(3, 4)
        mine = x[part].clone().requires_grad_(True)
        y = bn(mine)
        (y * _probe(x.shape)[part]).sum().backward()  # this rank's share of the loss
        save_file(
            {
                "y": y.detach(),
                "grad": mine.grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
            },
            f"{out}/rank{rank}-layer.safetensors",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run both ranks once; their outputs lie in the returned directory."""
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_rank, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
    return out


def test_two_gloo_ranks_equal_one_process_only_with_the_conversion(ranks):
    single = _train(0, 1, convert=False)  # one process, plain BatchNorm, whole batches
    init_d = build_discriminator("tiny", generator=torch.Generator().manual_seed(1)).state_dict()
    moved = max(float((single[f"d.{k}"] - v).abs().max()) for k, v in init_d.items())
    assert moved > 1e-3  # D trained: the comparison is not between untouched weights

    for rank in (0, 1):
        synced = load_file(ranks / f"rank{rank}-sync.safetensors")
        assert synced.keys() == single.keys()  # the conversion keeps the state layout
        for key, value in single.items():
            torch.testing.assert_close(synced[key], value, **TOLERANCE, msg=key)

    # without the conversion: per-rank statistics, far outside the tolerance
    plain = load_file(ranks / "rank0-plain.safetensors")
    worst = max(float((plain[k] - v).abs().max()) for k, v in single.items())
    assert worst > 1e-3, worst
    with pytest.raises(AssertionError):
        for key, value in single.items():
            torch.testing.assert_close(plain[key], value, **TOLERANCE)
    bn_keys = [k for k in single if k.startswith("d.") and "norm.running" in k]
    assert bn_keys and any(not torch.allclose(plain[k], single[k], **TOLERANCE) for k in bn_keys)


def test_one_layer_with_unequal_shares_matches_batch_norm_on_the_whole_batch(ranks):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 6, 6, generator=gen, dtype=DTYPE) * 3 + 1).requires_grad_(True)
    bn = nn.BatchNorm2d(5, dtype=DTYPE)
    y = bn(x)
    (y * _probe(x.shape)).sum().backward()
    outs = [load_file(ranks / f"rank{r}-layer.safetensors") for r in (0, 1)]
    torch.testing.assert_close(torch.cat([r["y"] for r in outs]), y.detach(), **TOLERANCE)
    # the input gradient includes the other rank's loss through the shared statistics
    torch.testing.assert_close(torch.cat([r["grad"] for r in outs]), x.grad, **TOLERANCE)
    for r in outs:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, **TOLERANCE)
        torch.testing.assert_close(r["running_var"], bn.running_var, **TOLERANCE)


def test_conversion_keeps_parameters_and_is_plain_batch_norm_without_a_group():
    assert not dist.is_initialized()
    d = build_discriminator("tiny", generator=torch.Generator().manual_seed(1))
    before = dict(d.state_dict())
    params = {id(p) for p in d.parameters()}
    converted = sync_batch_norm(d, torch.device("cpu"))
    norms = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 9 and all(type(m) is CrossRankBatchNorm2d for m in norms)
    assert {id(p) for p in converted.parameters()} == params  # the optimiser's tensors
    assert converted.state_dict().keys() == before.keys()
    for key, value in converted.state_dict().items():
        assert value.data_ptr() == before[key].data_ptr(), key  # the same tensors, not copies
    # no process group: the converted D is the same function as the original
    x, z = torch.rand(4, 3, 64, 64), torch.rand(4, 2)
    reference = build_discriminator("tiny", generator=torch.Generator().manual_seed(1))
    assert torch.equal(converted(x, z), reference(x, z))
