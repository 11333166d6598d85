"""Parts ``loader_speed`` and ``train_loop``: throughput on the GPU, through the benchmark
scripts' own functions (benchmarks/loader.py, benchmarks/train.py) with their arguments.

``loader_speed``: patches/s of the DALI GPU pipeline (raw and PNG shards; batches delivered
to the GPU) against the CPU loaders (DALI's CPU pipeline, the torch loader, the BasicSR-style
recipe), in interleaved rounds, and what ``loader.backend: auto`` picks from those figures.
``train_loop``: the training loop against its compute-only ceiling for the authors'
generator at batch 16, crop 64 on CUDA. The figures are reported, not judged (a speed has no
universal limit); the checks are that each ran, produced sane batches, and ran on the GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.gpu_check_parts.common import PartRun, argv


def loader_speed(run: PartRun) -> None:
    """Part ``loader_speed``: patches/s of the DALI GPU pipeline against the CPU loaders."""
    import torch

    from benchmarks import loader as bench

    s, shards = run.sizes, run.config.shards
    args = bench.build_parser().parse_args(
        argv(
            shards=shards["raw"],
            threads=s.threads,
            batch_size=s.batch,
            crop=s.crop,
            seconds=s.loader_seconds,
            rounds=s.loader_rounds,
            warmup=s.loader_warmup,
            device="gpu" if run.cuda else "cpu",
        )
    )
    device = torch.device("cuda:0" if run.cuda else "cpu")
    torch.set_num_threads(1)  # as benchmarks/loader.py: this process only collects batches
    params = bench.loader_params(args)
    on_cpu = params.model_copy(
        update={"loader": params.loader.model_copy(update={"device": "cpu"})}
    )
    runs = [("dali/raw", "dali", "raw", params), ("dali/png", "dali", "png", params)]
    if run.cuda:
        runs.append(("dali_cpu/raw", "dali", "raw", on_cpu))
    runs += [("torch/raw", "torch", "raw", params), ("basicsr/png", "basicsr", "png", params)]
    opened = {
        label: bench.open_loader(name, Path(shards[enc]), p, device, args)
        for label, name, enc, p in runs
    }
    rates, median = bench.time_loaders(opened, args, device)
    base = median["basicsr/png"]
    run.figures.update(
        batch=s.batch,
        crop=s.crop,
        threads=s.threads,
        delivered_to=str(device),
        loaders={
            label: {
                "samples_per_s": rate,
                "runs_on": opened[label][1],
                "rounds": rates[label],
                "vs_basicsr": rate / base if base else None,
            }
            for label, rate in median.items()
        },
    )
    cpu_loaders = [v for k, v in median.items() if opened[k][1] == "CPU"]
    run.figures["dali_over_fastest_cpu_loader"] = (
        median["dali/raw"] / max(cpu_loaders) if cpu_loaders and run.cuda else None
    )
    run.figures["auto_choice"] = bench.auto_choice(
        median, params, {k: Path(v) for k, v in shards.items()}, device, run.work
    )
    for label, rate in median.items():
        run.check(f"loaders.{label}.samples_per_s", rate, rate > 0, "> 0")
    for label in ("dali/raw", "dali/png"):
        where = opened[label][1]
        run.cuda_check(f"loaders.{label}.runs_on", where, where == "GPU", "GPU", "DALI on the CPU")


def train_loop(run: PartRun) -> None:
    """Part ``train_loop``: the loop (``run_worker``, DALI loader on the raw shards) against
    its compute-only ceiling, on CUDA: benchmarks/train.py's ``ceiling`` and ``full_loop``."""
    import torch

    from benchmarks import train as bench

    s = run.sizes
    args = bench.build_parser().parse_args(
        [
            *argv(
                params=run.config.params,
                shards=run.config.shards["raw"],
                stage="cunet",
                generator=s.train_generator,
                backend="dali",
                batch=s.batch,
                crop=s.crop,
                iterations=s.train_iterations,
                warmup=s.train_warmup,
                window=s.train_window,
                threads=s.threads,
                repeats=1,
            ),
            "--no-ray",
        ]
    )
    device = torch.device("cuda:0" if run.cuda else "cpu")
    params = bench.bench_params(args, 1, args.threads, run.work)
    run.figures.update(
        generator=s.train_generator,
        batch=s.batch,
        crop=s.crop,
        iterations=s.train_iterations,
        warmup=s.train_warmup,
        device=str(device),
        loader=f"dali ({'GPU' if run.cuda else 'CPU'} pipeline) on the raw shards",
    )
    ceiling = bench.ceiling(args, params, device)
    run.figures["ceiling_samples_per_s"] = ceiling
    run.save()
    full = bench.full_loop(args, params, run.work, device)
    run.figures["full_samples_per_s"] = full
    run.figures["full_over_ceiling"] = full / ceiling if ceiling else None
    run.check("ceiling_samples_per_s", ceiling, math.isfinite(ceiling) and ceiling > 0, "> 0")
    run.check("full_samples_per_s", full, math.isfinite(full) and full > 0, "> 0")
    run.cuda_check("device", str(device), device.type == "cuda", "cuda:0", "the CPU")
