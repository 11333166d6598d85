"""The per-worker training loop: ``train_loop_per_worker(config)``, run by Ray's TorchTrainer.

One function serves every stage (CUnet, CUGAN, the baselines, the ablations): the stage's
params section decides the generator, the losses and the schedule. It runs on each Ray worker
(one process per GPU, or per CPU slot); :func:`run_worker` is the same loop behind a small
:class:`Session` interface, so it also runs in-process (tests, benchmarks) without Ray.

Distributed data parallel: G and D are wrapped by ``ray.train.torch.prepare_model`` (DDP, gloo
on CPU and NCCL on GPU, chosen by the trainer), never by the model code. Each rank reads its
own part of the shards (``build_train_loader(rank=..., world_size=...)``) with the per-worker
batch ``loader.batch_size / world_size``: ``loader.batch_size`` is the GLOBAL batch, the same
whatever the number of workers (the trainer refuses a count that does not divide it). DDP
averages gradients over ranks, so a step equals one step on the global batch.

Checkpoints every ``checkpoint_every`` iterations and at the end: every rank calls
``ray.train.report`` (it is a barrier); rank 0 alone writes the directory
(:mod:`pipeline.train.state`), after gathering the other ranks' RNG states and loader
positions. On (re)start the loop loads ``ray.train.get_checkpoint()`` when there is one, so
``FailureConfig(max_failures)`` resumes at the checkpointed iteration with the same weights,
optimiser moments (moved onto this worker's device), learning rate (a function of the
iteration), RNG states and loader positions.

Logging (rank 0): every iteration's losses are recorded, averaged over ranks and sent to
MLflow in batches every ``log_every`` iterations, with the learning rates and samples/s, plus a
progress line (iteration, losses, samples/s, ETA). Validation PSNR and the modulation grid
are logged at their intervals.

Fault injection (chaos tests only; never set by params.yaml): ``config["fault"] =
{"iteration": k, "marker": path}`` raises :class:`InjectedFault` at iteration ``k`` on rank 0
unless ``path`` exists, creating it first, so the failure happens exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from models.registry import build_discriminator, build_generator
from pipeline.config import Params, TrainStageParams, parse_params
from pipeline.data.batch import Batch, TrainLoader
from pipeline.data.loader import build_train_loader
from pipeline.condition import ConditionScale
from pipeline.degradation import degrade
from pipeline.train.losses import GANLoss, PerceptualLoss
from pipeline.train.schedules import lr_at
from pipeline.train.state import (
    TrainState,
    capture_rng,
    load_train_state,
    restore_rng,
    save_train_state,
)
from pipeline.train.steps import Nets, Optimizers, gan_step, mse_step, unwrap
from pipeline.train.tensors import TensorLoader, synthetic_samples
from pipeline.tracking import RunLog, TrackingTarget

__all__ = [
    "InjectedFault",
    "LocalSession",
    "RaySession",
    "Session",
    "TrainLoopError",
    "run_worker",
    "stage_params",
    "train_loop_per_worker",
]

log = logging.getLogger(__name__)


class TrainLoopError(RuntimeError):
    """The loop cannot run as configured (one-line message)."""


class InjectedFault(RuntimeError):
    """The failure asked for by ``config["fault"]`` (chaos tests)."""


def stage_params(params: Params, stage: str) -> TrainStageParams:
    """The ``train_<stage>`` section (e.g. ``cunet`` -> ``params.train_cunet``)."""
    section = getattr(params, f"train_{stage}", None)
    if not isinstance(section, TrainStageParams):
        raise TrainLoopError(
            f"unknown training stage {stage!r} (no train_{stage} section in params)"
        )
    return section


# ---------------------------------------------------------------------------------------------
# sessions: what the loop needs from its runner


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, module: nn.Module) -> nn.Module: ...

    def restored(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None: ...

    def all_gather(self, obj: Any) -> list[Any]: ...

    def all_reduce_mean(self, tensor: Tensor) -> Tensor: ...


class RaySession:
    """The session inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor / self.world_size


class LocalSession:
    """One process, no Ray: checkpoints go to ``root/<name>/``; ``reports`` keeps the metrics.

    With ``resume=True`` the newest checkpoint under ``root`` is loaded, as Ray would.
    """

    def __init__(
        self, root: str | Path, *, device: str | torch.device = "cpu", resume: bool = False
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.root = Path(root)
        self.resume = resume
        self.reports: list[tuple[dict[str, Any], Path | None]] = []

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("checkpoint_*")) if self.root.is_dir() else []
        return found[-1] if found else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.latest() if self.resume else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        kept = None
        if checkpoint_dir is not None:
            import shutil

            kept = self.root / name
            if kept.exists():
                shutil.rmtree(kept)
            shutil.copytree(checkpoint_dir, kept)
        self.reports.append((dict(metrics), kept))

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return tensor


# ---------------------------------------------------------------------------------------------
# pieces of the loop


def _setup_worker_logging() -> None:
    """Ray forwards a worker's stderr to the driver; make our INFO lines part of it."""
    root = logging.getLogger("pipeline")
    if not any(getattr(h, "_cugan_worker", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        handler._cugan_worker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _endless(loader: TrainLoader) -> Iterator[Batch]:
    """Epoch after epoch; each ``iter(loader)`` continues from the loader's position.

    A position saved at the very end of an epoch gives one empty pass (it just moves the
    loader to the next epoch); two empty passes in a row mean the loader has no data.
    """
    empty_passes = 0
    while True:
        empty_passes += 1
        for batch in loader:
            empty_passes = 0
            yield batch
        if empty_passes >= 2:
            raise TrainLoopError("the training loader yielded no batch in a whole epoch")


def _build_loader(
    config: dict[str, Any],
    params: Params,
    rank: int,
    world: int,
    per_worker: int,
    device: torch.device,
) -> TrainLoader:
    data = config["data"]
    if data["kind"] == "synthetic":
        tensors = synthetic_samples(
            int(data["num_samples"]), params.loader.crop, seed=int(data["seed"])
        )
        return TensorLoader(
            *tensors, batch_size=per_worker, rank=rank, world_size=world, device=device
        )
    if data["kind"] != "shards":
        raise TrainLoopError(f"unknown data kind {data['kind']!r}")
    local = params.model_copy(
        update={"loader": params.loader.model_copy(update={"batch_size": per_worker})}
    )
    return build_train_loader(
        data["shards_dir"], local, rank=rank, world_size=world, seed=params.base.seed, device=device
    )


class _FixedDegradation:
    """Re-degrades each clean batch at one ``(r, sigma)`` (Unet/UGAN baselines), with its own
    generator (saved with the RNG states)."""

    def __init__(
        self, levels: tuple[float, float], params: Params, seed: int, device: torch.device
    ) -> None:
        self.levels = levels
        self.kernel_size = params.degradation.kernel_size
        scale = ConditionScale.from_params(params.degradation)
        self.z = scale.to_z(levels[0], levels[1]).to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, batch: Batch) -> Batch:
        n = batch.clean.shape[0]
        degraded = degrade(
            batch.clean,
            [self.levels[0]] * n,
            [self.levels[1]] * n,
            generator=self.generator,
            kernel_size=self.kernel_size,
        )
        return Batch(degraded.to(batch.clean.dtype), batch.clean, self.z.expand(n, -1))


def _param_checksums(*modules: nn.Module | None) -> list[float]:
    """Per-tensor float64 sums: compared across ranks to show DDP kept them identical."""
    sums = []
    for m in modules:
        if m is not None:
            sums.extend(float(p.detach().double().sum()) for p in m.parameters())
    return sums


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Meter:
    """Training throughput, excluding time spent validating and checkpointing."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.window_start = time.perf_counter()
        self.window_iters = 0
        self.excluded = 0.0
        self.total_time = 0.0
        self.total_iters = 0

    def step(self) -> None:
        self.window_iters += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def close_window(self) -> float:
        now = time.perf_counter()
        elapsed = max(now - self.window_start - self.excluded, 1e-9)
        rate = self.window_iters * self.global_batch / elapsed
        self.total_time += elapsed
        self.total_iters += self.window_iters
        self.window_start, self.window_iters, self.excluded = now, 0, 0.0
        return rate

    @property
    def mean_rate(self) -> float:
        return (
            self.total_iters * self.global_batch / self.total_time
            if self.total_time
            else float("nan")
        )


# ---------------------------------------------------------------------------------------------
# setting up a worker


def _build_networks(
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


def _load_weights(
    g: nn.Module,
    d: nn.Module | None,
    state: TrainState | None,
    init_dir: str | None,
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
    if init_dir:
        from pipeline.checkpoint import load_generator

        init, _ = load_generator(init_dir)
        if init.config != g.config:
            raise TrainLoopError(
                f"{init_dir}: generator config {init.config} differs from "
                f"train_{stage_name}'s ({g.config})"
            )
        g.load_state_dict(init.state_dict())
    return 0


def _build_optimizers(
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


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (module level, so Ray imports it by name on every worker)."""
    _setup_worker_logging()
    run_worker(config, RaySession())


def run_worker(config: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train one stage on this worker; returns the metrics of its last checkpoint.

    ``config`` keys: ``params`` (params.yaml as a dict), ``stage`` (``cunet``, ``cugan``...),
    ``data`` (``{"kind": "shards", "shards_dir": ...}`` or ``{"kind": "synthetic",
    "num_samples": n, "seed": s}``), ``evalsets_dir`` (or None: no validation), ``init_dir`` (a
    generator checkpoint to start G from, or None), ``tracking`` (a TrackingTarget dict),
    ``threads`` (torch intra-op threads), ``fault`` (optional, module docstring).
    """
    params = parse_params(config["params"], source="worker config")
    stage_name = config["stage"]
    stage = stage_params(params, stage_name)
    rank, world, device = session.rank, session.world_size, session.device
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if params.loader.batch_size % world:
        raise TrainLoopError(
            f"loader.batch_size {params.loader.batch_size} is not divisible by {world} workers"
        )

    g, d, perceptual = _build_networks(params, stage)
    with session.restored() as ckpt_dir:
        state = load_train_state(ckpt_dir) if ckpt_dir is not None else None
    start = _load_weights(g, d, state, config.get("init_dir"), stage_name)
    if rank == 0 and state is not None:
        log.info("train_%s: resuming from the checkpoint at iteration %d", stage_name, start)
    elif rank == 0 and config.get("init_dir"):
        log.info("train_%s: G starts from %s", stage_name, config["init_dir"])
    for module in (g, d, perceptual):
        if module is not None:
            module.to(device)
    opts = _build_optimizers(stage, g, d, state)
    nets = Nets(
        g=session.prepare(g),
        d=session.prepare(d) if d is not None else None,
        perceptual=perceptual,
        gan_loss=GANLoss(stage.gan_type) if d is not None else None,
    )

    loader = _build_loader(config, params, rank, world, params.loader.batch_size // world, device)
    fixed = None
    if stage.fixed_degradation is not None:
        fixed = _FixedDegradation(
            tuple(stage.fixed_degradation), params, params.base.seed * 1000 + rank, device
        )
    if state is not None:
        if state.world_size == world and state.loaders[rank] is not None:
            loader.load_state_dict(state.loaders[rank])
            restore_rng(state.rng[rank], device)
            if fixed is not None and "fixed_degradation" in state.rng[rank]:
                fixed.generator.set_state(state.rng[rank]["fixed_degradation"])
        elif rank == 0:
            log.warning(
                "train_%s: checkpoint was written by %d workers, this run has %d: loaders "
                "and RNGs restart from their seeds",
                stage_name,
                state.world_size,
                world,
            )

    run = _Run(
        config=config,
        params=params,
        stage=stage,
        stage_name=stage_name,
        session=session,
        nets=nets,
        opts=opts,
        loader=loader,
        fixed=fixed,
        start=start,
    )
    try:
        return run.train()
    finally:
        loader.close()


class _Run:
    """The iterations of one worker: step, log, validate, checkpoint (rank 0 logs and writes)."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        params: Params,
        stage: TrainStageParams,
        stage_name: str,
        session: Session,
        nets: Nets,
        opts: Optimizers,
        loader: TrainLoader,
        fixed: _FixedDegradation | None,
        start: int,
    ) -> None:
        self.config, self.params, self.stage, self.session = config, params, stage, session
        self.stage_name, self.tag = stage_name, f"train_{stage_name}"
        self.nets, self.opts, self.loader, self.fixed, self.start = nets, opts, loader, fixed, start
        self.total = stage.iterations
        self.rank0 = session.rank == 0
        self.device = session.device
        self.meter = _Meter(params.loader.batch_size)
        self.pending: list[tuple[int, dict[str, Tensor], dict[str, float]]] = []
        self.last_losses: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.last_metrics: dict[str, Any] = {}
        self.tracker = RunLog(TrackingTarget.from_dict(config["tracking"])) if self.rank0 else None
        self.vset = None
        if self.rank0 and config.get("evalsets_dir"):
            from pipeline.train.validation import load_validation_set

            self.vset = load_validation_set(
                config["evalsets_dir"], params, stage, unwrap(nets.g).size_multiple
            )
            self.tracker.log_metrics([(start, self.vset.input_psnr)])

    def due(self, every: int, it: int) -> bool:
        return it == self.total or (every > 0 and it % every == 0)

    def train(self) -> dict[str, Any]:
        stage, rank0 = self.stage, self.rank0
        if rank0:
            world = self.session.world_size
            log.info(
                "%s: iterations %d..%d, global batch %d = %d worker(s) x %d, device %s",
                self.tag,
                self.start + 1,
                self.total,
                self.params.loader.batch_size,
                world,
                self.params.loader.batch_size // world,
                self.device,
            )
            if self.start >= self.total:
                log.info(
                    "%s: the checkpoint is already at iteration %d; nothing to train",
                    self.tag,
                    self.start,
                )
        batches = _endless(self.loader)
        for it in range(self.start + 1, self.total + 1):
            self._maybe_fail(it)
            self._step(it, next(batches))
            if self.due(stage.log_every, it) or self.due(stage.checkpoint_every, it):
                self._flush(it)
            if rank0 and self.vset is not None and self.due(stage.validation.every, it):
                self._validate(it)
            if rank0 and self.vset is not None and self.due(stage.validation.grid_every, it):
                self._grid(it)
            if self.due(stage.checkpoint_every, it):
                self._checkpoint(it)
        return self.last_metrics

    def _maybe_fail(self, it: int) -> None:
        fault = self.config.get("fault") or {}
        if (
            fault
            and it == int(fault["iteration"])
            and self.session.rank == int(fault.get("rank", 0))
        ):
            marker = Path(fault["marker"])
            if not marker.exists():
                marker.write_text(f"fault injected at iteration {it}\n")
                raise InjectedFault(f"injected failure at iteration {it} (marker {marker})")

    def _step(self, it: int, batch: Batch) -> None:
        stage, opts = self.stage, self.opts
        if self.fixed is not None:
            batch = self.fixed(batch)
        lrs = {"lr/g": lr_at(it, stage.optimizer_g.lr, stage.schedule)}
        if opts.d is not None:
            lrs["lr/d"] = lr_at(it, stage.optimizer_d.lr, stage.schedule)
        for name, opt in (("g", opts.g), ("d", opts.d)):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = lrs[f"lr/{name}"]
        if stage.loss == "gan":
            losses = gan_step(self.nets, opts, batch, it, stage.weights, d_warmup=stage.d_warmup)
        else:
            losses = mse_step(self.nets, opts, batch)
        self.meter.step()
        self.pending.append((it, losses, lrs))

    def _flush(self, it: int) -> None:
        """Every rank: average the pending losses over ranks (one all-reduce); rank 0 logs
        every iteration's values and prints the progress line."""
        keys = sorted(set().union(*(losses for _, losses, _ in self.pending)))
        nan = torch.tensor(float("nan"), device=self.device)
        stacked = torch.stack(
            [
                torch.stack([losses.get(k, nan).float() for k in keys])
                for _, losses, _ in self.pending
            ]
        )
        values = self.session.all_reduce_mean(stacked).cpu().tolist()
        rate = self.meter.close_window()
        rows = [
            (step, {**dict(zip(keys, v, strict=True)), **lrs})
            for (step, _, lrs), v in zip(self.pending, values, strict=True)
        ]
        rows[-1][1]["perf/samples_per_s"] = rate
        self.last_losses = dict(zip(keys, values[-1], strict=True))
        lr = self.pending[-1][2]["lr/g"]
        self.pending.clear()
        if not self.rank0:
            return
        self.tracker.log_metrics(rows)
        mean = self.meter.mean_rate
        eta = (self.total - it) * self.meter.global_batch / mean if mean else float("nan")
        shown = " | ".join(
            f"{k} {v:.4g}" for k, v in self.last_losses.items() if k.startswith("loss/")
        )
        log.info(
            "%s it %d/%d (%.0f%%) | %s | lr %.2e | %.1f samples/s | ETA %s",
            self.tag,
            it,
            self.total,
            100 * it / self.total,
            shown,
            lr,
            rate,
            _format_eta(eta),
        )

    def _validate(self, it: int) -> None:
        from pipeline.train.validation import validate

        with self.meter.paused():
            self.last_val = validate(unwrap(self.nets.g), self.vset, self.params, self.device)
            self.tracker.log_metrics([(it, self.last_val)])
        log.info(
            "%s it %d: validation PSNR %.2f dB (input %.2f dB, gain %+.2f dB)",
            self.tag,
            it,
            self.last_val["val/psnr/mean"],
            self.vset.input_psnr["val/psnr_input/mean"],
            self.last_val["val/psnr_gain"],
        )

    def _grid(self, it: int) -> None:
        from pipeline.train.validation import modulation_grid_image

        with self.meter.paused():
            grid = modulation_grid_image(
                unwrap(self.nets.g), self.vset, self.stage, self.params, self.device
            )
            self.tracker.log_image(grid, f"modulation/{self.tag}_iter{it:08d}.png")

    def _checkpoint(self, it: int) -> None:
        """Gather every rank's RNG states, loader position and weight checksums; rank 0 writes
        the directory; every rank reports (``ray.train.report`` is a barrier)."""
        session, nets = self.session, self.nets
        with self.meter.paused():
            rng = capture_rng(self.device)
            if self.fixed is not None:
                rng["fixed_degradation"] = self.fixed.generator.get_state()
            g, d = unwrap(nets.g), unwrap(nets.d) if nets.d is not None else None
            rngs = session.all_gather(rng)
            loaders = session.all_gather(self.loader.state_dict())
            sums = session.all_gather(_param_checksums(g, d))
            divergence = max(
                (abs(a - b) for other in sums for a, b in zip(sums[0], other, strict=True)),
                default=0.0,
            )
            metrics: dict[str, Any] = {
                "iteration": it,
                **self.last_losses,
                **self.last_val,
                "perf/samples_per_s_mean": self.meter.mean_rate,
                "ddp/max_param_divergence": divergence,
                "ddp/world_size": session.world_size,
            }
            if self.vset is not None:
                metrics.update(self.vset.input_psnr)
            if self.tracker is not None:
                metrics["tracking/fell_back"] = float(self.tracker.fell_back)
            name = f"checkpoint_{it:08d}"
            with tempfile.TemporaryDirectory() as tmp:
                path = None
                if self.rank0:
                    path = save_train_state(
                        tmp,
                        iteration=it,
                        stage=self.stage_name,
                        g=g,
                        d=d,
                        optimizers={
                            "g": self.opts.g,
                            **({"d": self.opts.d} if self.opts.d else {}),
                        },
                        rng=rngs,
                        loaders=loaders,
                        config={k: v for k, v in self.config.items() if k != "fault"},
                        metadata={
                            "stage": self.stage_name,
                            "iteration": it,
                            "generator": self.stage.generator,
                        },
                        scale=ConditionScale.from_params(self.params.degradation),
                    )
                    self.tracker.log_metrics([(it, {"ddp/max_param_divergence": divergence})])
                session.report(metrics, path, name)
        self.last_metrics = metrics
