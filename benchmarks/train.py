"""Training throughput: the full loop against its compute-only ceiling, and 1 vs 2 Ray workers.

    .venv/bin/python benchmarks/train.py --stage cunet --generator demo --batch 16 \
        --iterations 30 --warmup 10 --json bench-results/train.json

Three measurements, in samples per second (global batch x iterations / seconds):

* ``ceiling``   a bare loop of ``mse_step``/``gan_step`` over batches made in advance (in
                memory, already degraded), same model, batch and torch threads: compute only;
* ``full``      ``pipeline.train.loop.run_worker`` in this process (``LocalSession``, the same
                loop Ray runs, with the same typed ``WorkerConfig``) on the real shards: loader
                (``--backend``: DALI or torch, reading and degrading), step, per-iteration loss
                recording, MLflow logging (a scratch sqlite store), the progress line;
* ``ray-1`` / ``ray-2``  the same stage through Ray Train (``run_stage``) with 1 worker x N
                CPUs and with 2 workers x N/2 CPUs each (DDP over gloo), global batch constant;
* ``ray-1x1``   1 worker x N/2 CPUs: the reference for ``ray-2``'s scaling (``ray-2 /
                ray-1x1``, ideal 2.0: twice the CPUs, twice the samples/s).

``--synthetic N`` runs ``full`` and ``ray-*`` on N pre-made samples instead of shards (the test
seam, :class:`pipeline.train.testing.TestHooks`): the loop without the loader, and a smoke run
that needs no data stages.

``full / ceiling`` is the share of compute time the loop keeps, ``ray-1 / ceiling`` the share
through Ray; ``ray-2 / ray-1x1`` the true scaling (``ray-2 / ray-1`` compares equal CPUs). Each
of ``--repeats`` repeats runs the whole sequence (ceiling, full, ray-1, ray-2, ray-1x1), and a
ratio is the median over repeats of the two runs of one repeat: a short run on a shared machine
varies by +-10 %, and a pair measured minutes apart more than that.
Rates exclude the first ``--warmup`` iterations (pipeline start-up, first epoch) and time
spent validating and checkpointing (the loop measures its windows that way); Ray's start-up
(worker processes, process group) is reported separately as wall time. Numbers are comparable
only within one run on one machine (same load). Timed work lives here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.registry import build_discriminator, build_generator
from pipeline.config import Params, load_params, parse_params
from pipeline.data.batch import Batch
from pipeline.tracking import TrackingTarget
from pipeline.train.loop import run_worker
from pipeline.train.losses import GANLoss, PerceptualLoss
from pipeline.train.session import LocalSession
from pipeline.train.steps import Nets, Optimizers, gan_step, mse_step
from pipeline.train.tensors import synthetic_samples
from pipeline.train.testing import SyntheticData, TestHooks
from pipeline.train.worker_config import WorkerConfig, stage_params

log = logging.getLogger("benchmarks.train")

REPO = Path(__file__).resolve().parents[1]


def bench_params(
    args: argparse.Namespace, workers: int, cpus_per_worker: float, tmp: Path
) -> Params:
    """params.yaml made into this benchmark's run: random init, the arguments' batch, crop,
    loader backend and iterations, no validation, a scratch MLflow store under ``tmp``."""
    raw = load_params(args.params).model_dump(mode="json")
    raw["base"]["pretrained"] = "random"
    raw["loader"].update(batch_size=args.batch, crop=args.crop, backend=args.backend)
    section = raw[f"train_{args.stage}"]
    section.update(
        generator=args.generator,
        iterations=args.warmup + args.iterations,
        checkpoint_every=args.warmup + args.iterations,
        log_every=args.window,
    )
    section["validation"].update(every=0, grid_every=0)
    if args.discriminator:
        section["discriminator"] = args.discriminator
    raw["ray"].update(
        num_workers=workers,
        cpus_per_worker=cpus_per_worker,
        use_gpu=False,
        storage_path=str(tmp / "ray"),
        local_num_cpus=args.threads,
    )
    raw["tracking"].update(
        uri=f"sqlite:///{tmp}/mlflow.db",
        artifact_location=str(tmp / "art"),
        log_model=False,
        experiment="benchmark",
    )
    return parse_params(raw)


def ceiling(args: argparse.Namespace, params: Params, device: torch.device | None = None) -> float:
    """Steps over pre-made batches on ``device`` (default the CPU): no loader, no logging."""
    device = torch.device("cpu") if device is None else device
    torch.set_num_threads(args.threads)
    sp = stage_params(params, args.stage)
    g = build_generator(sp.generator, generator=torch.Generator().manual_seed(0)).to(device)
    opts = Optimizers(g=torch.optim.Adam(g.parameters(), 1e-4))
    nets = Nets(g=g)
    if sp.loss == "gan":
        d = build_discriminator(sp.discriminator, generator=torch.Generator().manual_seed(1))
        d = d.to(device)
        nets = Nets(
            g=g,
            d=d,
            perceptual=PerceptualLoss(sp.perceptual_layer, pretrained="random").to(device),
            gan_loss=GANLoss(sp.gan_type),
        )
        opts = Optimizers(g=opts.g, d=torch.optim.Adam(d.parameters(), 1e-4))
    n = args.warmup + args.iterations
    data = [t.to(device) for t in synthetic_samples(args.batch * 4, args.crop, seed=0)]
    batches = [
        Batch(*(t[(i % 4) * args.batch : (i % 4 + 1) * args.batch] for t in data)) for i in range(n)
    ]
    for i, batch in enumerate(batches, start=1):
        if i == args.warmup + 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the warm-up's queued kernels are not timed
            t0 = time.perf_counter()
        if sp.loss == "gan":
            out = gan_step(nets, opts, batch, i, sp.weights)
        else:
            out = mse_step(nets, opts, batch)
    float(next(iter(out.values())))
    return args.iterations * args.batch / (time.perf_counter() - t0)


def _window_rates(metric_rows: list[tuple[int, float]], warmup: int) -> float:
    """Mean of the loop's per-window samples/s after the warm-up iterations."""
    rates = [v for step, v in metric_rows if step > warmup]
    return sum(rates) / len(rates) if rates else float("nan")


def _hooks(args: argparse.Namespace) -> TestHooks | None:
    """Synthetic samples instead of shards (``--synthetic``), else None: the real loader."""
    if not args.synthetic:
        return None
    return TestHooks(synthetic=SyntheticData(num_samples=args.synthetic, seed=0))


def _shards(args: argparse.Namespace) -> Path | None:
    return None if args.synthetic else Path(args.shards).resolve()


def full_loop(
    args: argparse.Namespace, params: Params, tmp: Path, device: str | torch.device = "cpu"
) -> float:
    """``run_worker`` in this process on ``device``; the loop's samples/s after the warm-up."""
    from pipeline.tracking import RunLog, start_stage_run

    target = start_stage_run(params.tracking, stage=f"bench_{args.stage}", out_dir=tmp / "full")
    config = WorkerConfig(
        params=params,
        stage=args.stage,
        tracking=target,
        shards_dir=_shards(args),
        threads=args.threads,
    )
    run_worker(config, LocalSession(tmp / "full-ckpt", device=device), _hooks(args))
    RunLog(target).finish()
    return _rates_from_mlflow(target, args.warmup)


def _rates_from_mlflow(target: TrackingTarget, warmup: int) -> float:
    from mlflow import MlflowClient

    history = MlflowClient(target.uri).get_metric_history(target.run_id, "perf/samples_per_s")
    return _window_rates([(m.step, m.value) for m in history], warmup)


def ray_run(
    args: argparse.Namespace, workers: int, tmp: Path, cpus_per_worker: float | None = None
) -> tuple[float, float]:
    from pipeline.train.trainer import run_stage

    cpus = args.threads / workers if cpus_per_worker is None else cpus_per_worker
    name = f"ray{workers}x{cpus:g}"
    params = bench_params(args, workers, cpus, tmp / name)
    t0 = time.perf_counter()
    result = run_stage(
        params,
        args.stage,
        out_dir=tmp / name / "out",
        shards_dir=_shards(args),
        run_name=f"bench-{workers}-{time.time_ns()}",
        test_hooks=_hooks(args),
    )
    wall = time.perf_counter() - t0
    return _rates_from_mlflow(result.tracking, args.warmup), wall


def _ray_configs(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """(name, workers, CPUs per worker) of the Ray runs: all CPUs in 1 and in 2 workers, and
    1 worker with half of them (the reference for 2 workers' scaling)."""
    configs = [("ray-1", 1, float(args.threads)), ("ray-2", 2, args.threads / 2)]
    if args.threads >= 2:
        configs.append(("ray-1x1", 1, args.threads / 2))
    return configs


def _pair_median(runs: dict[str, list[float]], num: str, den: str) -> float | None:
    """Median over repeats of ``num / den`` measured in the same repeat (None if not run)."""
    if num not in runs or den not in runs:
        return None
    return statistics.median(n / d for n, d in zip(runs[num], runs[den], strict=True))


def build_parser() -> argparse.ArgumentParser:
    """The command line (also what benchmarks/gpu_check.py builds its arguments with)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--shards", default=str(REPO / "data" / "shards"))
    ap.add_argument("--stage", default="cunet")
    ap.add_argument("--generator", default="demo")
    ap.add_argument("--discriminator", default=None)
    ap.add_argument("--backend", choices=("dali", "torch"), default="dali")
    ap.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="train full/ray-* on N synthetic samples instead of --shards (no loader)",
    )
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=30, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--window", type=int, default=10, help="iterations per throughput window")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--repeats", type=int, default=3, help="repeats of the sequence ceiling, full, ray-*"
    )
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch % 2:
        ap.error("--batch must be even (it is split over 2 workers)")

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # every run of a repeat is adjacent to that repeat's ceiling, so that a change in the
        # machine's load hits both; ratios are medians over repeats of same-repeat pairs
        runs: dict[str, list[float]] = {}
        walls_of: dict[str, list[float]] = {}
        for r in range(args.repeats):
            params = bench_params(args, 1, args.threads, tmp / f"rep{r}")
            runs.setdefault("ceiling", []).append(ceiling(args, params))
            runs.setdefault("full", []).append(full_loop(args, params, tmp / f"rep{r}"))
            if args.no_ray:
                continue
            for name, workers, cpus in _ray_configs(args):
                rate, wall = ray_run(args, workers, tmp / f"rep{r}", cpus_per_worker=cpus)
                runs.setdefault(name, []).append(rate)
                walls_of.setdefault(name, []).append(wall)
        rows = {name: statistics.median(rates) for name, rates in runs.items()}
        walls = {name: statistics.median(w) for name, w in walls_of.items()}
        pair_ratio = _pair_median(runs, "full", "ceiling")
        ray1_ratio = _pair_median(runs, "ray-1", "ceiling")
        scaling = _pair_median(runs, "ray-2", "ray-1x1")

    print(
        f"\ntraining throughput: stage {args.stage}, generator {args.generator}, global batch "
        f"{args.batch}, crop {args.crop}, "
        f"loader {'synthetic tensors' if args.synthetic else args.backend}, "
        f"{args.threads} CPU thread(s), "
        f"{args.iterations} timed iterations after {args.warmup}; medians of {args.repeats} "
        "repeats of the sequence ceiling, full, ray-*"
    )
    print(f"{'run':<10}{'samples/s':>12}{'vs ceiling':>12}{'wall s':>10}")
    for name, rate in rows.items():
        wall = f"{walls[name]:.1f}" if name in walls else ""
        print(f"{name:<10}{rate:>12.1f}{rate / rows['ceiling']:>12.2f}{wall:>10}")
    print(f"full / ceiling, median over same-repeat pairs = {pair_ratio:.2f}")
    if ray1_ratio is not None:
        print(f"ray-1 / ceiling, median over same-repeat pairs = {ray1_ratio:.2f}")
        print(f"ray-2 / ray-1 = {rows['ray-2'] / rows['ray-1']:.2f} (equal CPUs, medians)")
    if scaling is not None:
        print(f"ray-2 / ray-1x1, median over same-repeat pairs = {scaling:.2f} (ideal 2.0)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "samples_per_s": rows,
                    "wall_s": walls,
                    "runs": runs,
                    "full_over_ceiling_pairs": pair_ratio,
                    "ray1_over_ceiling": ray1_ratio,
                    "scaling_ray2_over_ray1x1": scaling,
                    "load_average": list(load) if load else None,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
