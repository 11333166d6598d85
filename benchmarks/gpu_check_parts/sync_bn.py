"""Part ``sync_bn``: D's batch statistics under 2-process DDP (pipeline/train/sync_norm.py's
``sync_batch_norm``: ``nn.SyncBatchNorm`` on CUDA, NCCL, one GPU per rank).

Two ranks (``torch.multiprocessing`` spawn) each run one training forward and backward of the
configured discriminator on their half of a global batch, wrapped in DDP; rank 0 also runs the
same D, unconverted and undistributed, on the whole batch. With synchronised statistics the
ranks' outputs put together, the averaged gradients and the BatchNorm running buffers equal
the one-process run's (up to float reassociation); without, they differ by far more.

Needs 2 CUDA devices: on a one-GPU machine the driver skips the part and says so. The dry run
runs the same code with gloo on the CPU (``CrossRankBatchNorm2d``); the CUDA-only check (NCCL
and ``nn.SyncBatchNorm``) is then skipped. tests/test_train_sync_norm.py is the exact CPU
test (float64, several GAN steps); this is the GPU's counterpart, one step in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_check_parts.common import PartRun

WORLD = 2
#: max |diff| / max |reference|: float32, two half-batch reductions vs one whole-batch one
REL_TOL = 1e-4


def _batch(n: int, crop: int):
    import torch

    gen = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, crop, crop, generator=gen), torch.rand(n, 2, generator=gen)


def _step(d, x, z):
    """One training forward/backward: D's output and the first weight's gradient."""
    out = d(x, z)
    out.mean().backward()
    return out.detach()


def _state(module) -> dict:
    return {k: v.detach().double().cpu() for k, v in module.state_dict().items()}


def _rank(rank: int, store: str, out: str, name: str, batch: int, crop: int, cuda: bool) -> None:
    """One rank: the DDP run on its half; rank 0 also the reference on the whole batch."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from models.registry import build_discriminator
    from pipeline.train.sync_norm import sync_batch_norm

    torch.backends.cudnn.allow_tf32 = False  # float32 both ways: a tolerance that means something
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD
    )
    try:
        x, z = (t.to(device) for t in _batch(batch, crop))
        half = batch // WORLD
        d = build_discriminator(name, generator=torch.Generator().manual_seed(1)).to(device)
        d = sync_batch_norm(d, device).train()
        layers = sorted({type(m).__name__ for m in d.modules() if "BatchNorm" in type(m).__name__})
        ddp = DistributedDataParallel(d, device_ids=[rank] if cuda else None)
        mine = _step(ddp, x[rank * half : (rank + 1) * half], z[rank * half : (rank + 1) * half])
        gathered = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            ref = build_discriminator(name, generator=torch.Generator().manual_seed(1)).to(device)
            ref_out = _step(ref.train(), x, z)
            got = {
                "output": torch.cat(gathered).double().cpu(),
                "grads": {n: p.grad.double().cpu() for n, p in d.named_parameters()},
                "buffers": _state(d),
            }
            want = {
                "output": ref_out.double().cpu(),
                "grads": {n: p.grad.double().cpu() for n, p in ref.named_parameters()},
                "buffers": _state(ref),
            }
            figures = {"layers": layers, "backend": dist.get_backend()}
            for key in ("output", "grads", "buffers"):
                a, b = got[key], want[key]
                if isinstance(a, dict):
                    pairs = [(a[k], b[k]) for k in b if b[k].is_floating_point()]
                else:
                    pairs = [(a, b)]
                figures[f"{key}_rel_diff"] = max(
                    float((p - q).abs().max()) / max(float(q.abs().max()), 1e-12) for p, q in pairs
                )
            Path(out).write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def run(run: PartRun) -> None:
    import torch.multiprocessing as mp

    from pipeline.config import load_params

    s, cuda = run.sizes, run.cuda
    name = s.sync_discriminator
    store, out = run.work / "store", run.work / "rank0.json"
    store.unlink(missing_ok=True)
    batch = s.sync_batch - s.sync_batch % WORLD
    crop = 64  # the discriminators' smallest supported input is not the loader's dry-run crop
    configured = load_params(run.config.params).train_cugan.discriminator
    run.figures.update(
        discriminator=name, configured_discriminator=configured, batch=batch, crop=crop
    )
    mp.spawn(_rank, args=(str(store), str(out), name, batch, crop, cuda), nprocs=WORLD, join=True)
    figures = json.loads(out.read_text())
    run.figures.update(figures)
    for key in ("output", "grads", "buffers"):
        value = figures[f"{key}_rel_diff"]
        run.check(f"{key}_rel_diff", value, value <= REL_TOL, f"<= {REL_TOL:g} of max |reference|")
    layers = figures["layers"]
    run.cuda_check(
        "nccl_sync_batch_norm",
        [figures["backend"], *layers],
        figures["backend"] == "nccl" and layers == ["SyncBatchNorm"],
        "nccl, SyncBatchNorm",
        f"gloo and {', '.join(layers)}",
    )
