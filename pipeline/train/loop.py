"""The per-worker training loop: ``train_loop_per_worker``, run by Ray's TorchTrainer.

One function serves every stage (CUnet, CUGAN, the baselines, the ablations): the stage's
params section decides the generator, the losses and the schedule. It runs on each Ray worker
(one process per GPU, or per CPU slot); :func:`run_worker` is the same loop behind a
:class:`~pipeline.train.session.Session`, so it also runs in-process (tests, benchmarks)
without Ray. The modules below it, in the order a worker uses them:

* :mod:`~pipeline.train.worker_config` -- the typed, versioned :class:`WorkerConfig` (what the
  driver tells every worker; what each checkpoint records);
* :mod:`~pipeline.train.session` -- Ray or in-process: rank, device, DDP wrap, report, resume;
* :mod:`~pipeline.train.setup` -- networks, weights, optimisers, loader;
* :mod:`~pipeline.train.testing` -- the test seam (:class:`TestHooks`: fault injection,
  synthetic data), consulted only when a caller passes one.

Wire format to the Ray workers (:func:`loop_config`): ``{"worker_config":
WorkerConfig.to_dict(), "test_hooks": TestHooks | None}``; the worker rebuilds the typed
config with :meth:`WorkerConfig.from_dict` (why a dict and not the object: see
:mod:`pipeline.train.worker_config`). Nothing after :func:`train_loop_per_worker` sees a dict.

Distributed data parallel: G and D are wrapped by ``ray.train.torch.prepare_model`` (DDP, gloo
on CPU and NCCL on GPU, chosen by the trainer), never by the model code. Each rank reads its
own part of the shards with the per-worker batch ``loader.batch_size / world_size``:
``loader.batch_size`` is the GLOBAL batch, the same whatever the number of workers (the trainer
refuses a count that does not divide it). DDP averages gradients over ranks, so a step equals
one step on the global batch.

Checkpoints every ``checkpoint_every`` iterations and at the end: every rank calls
``ray.train.report`` (it is a barrier); rank 0 alone writes the directory
(:mod:`pipeline.train.state`), after gathering the other ranks' RNG states and loader
positions. On (re)start the worker loads the session's checkpoint when there is one, so
``FailureConfig(max_failures)`` resumes at the checkpointed iteration with the same weights,
optimiser moments, learning rate (a function of the iteration), RNG states and loader
positions.

Logging (rank 0): every iteration's losses are recorded, averaged over ranks and sent to
MLflow in batches every ``log_every`` iterations, with the learning rates and samples/s (the
:class:`_Meter`), plus a progress line (iteration, losses, samples/s, ETA). Validation PSNR and
the modulation grid are logged at their intervals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.condition import ConditionScale
from pipeline.data.batch import Batch, TrainLoader
from pipeline.tracking import RunLog
from pipeline.train.schedules import lr_at
from pipeline.train.session import RaySession, Session
from pipeline.train.setup import TrainLoopError, WorkerSetup, set_up_worker
from pipeline.train.state import capture_rng, save_train_state
from pipeline.train.steps import gan_step, mse_step, unwrap
from pipeline.train.testing import TestHooks
from pipeline.train.validation import load_validation_set, modulation_grid_image, validate
from pipeline.train.worker_config import WorkerConfig

__all__ = ["loop_config", "run_worker", "train_loop_per_worker"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# entry points


def loop_config(config: WorkerConfig, hooks: TestHooks | None = None) -> dict[str, Any]:
    """Ray's ``train_loop_config`` for :func:`train_loop_per_worker` (module docstring)."""
    return {"worker_config": config.to_dict(), "test_hooks": hooks}


def train_loop_per_worker(loop_config: Mapping[str, Any]) -> None:
    """Ray Train entry point (module level, so Ray imports it by name on every worker)."""
    _setup_worker_logging()
    config = WorkerConfig.from_dict(loop_config["worker_config"])
    hooks = loop_config.get("test_hooks")
    if hooks is not None and not isinstance(hooks, TestHooks):
        raise TrainLoopError(f"test_hooks must be a TestHooks, not {type(hooks).__name__}")
    run_worker(config, RaySession(), hooks)


def run_worker(
    config: WorkerConfig, session: Session, hooks: TestHooks | None = None
) -> dict[str, Any]:
    """Train one stage on this worker; returns the metrics of its last checkpoint.

    ``hooks`` is the test seam (:mod:`pipeline.train.testing`); production passes None.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    setup = set_up_worker(config, session, hooks)
    try:
        return _Run(config, session, setup, hooks).train()
    finally:
        setup.loader.close()


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
    _quiet_ray_train_reports()


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.x logs every ``ray.train.report`` of every rank at INFO ("Reporting training
    result N: TrainingReport(...)"), a line per rank per validation in the ``dvc repro`` log.
    That logger is named by its file path (``logging.getLogger(__file__)``), so Ray's own
    ``ray.train`` level filter misses it; its level is set here instead (warnings still pass)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet, or not this way
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _cpu_budget() -> str:
    """What this worker computes with: torch threads, usable CPUs, niceness (a Ray worker at
    nice 15 loses the CPU to every other process: see ``trainer._worker_env``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return f"{torch.get_num_threads()} torch thread(s) on {cpus} CPU(s), nice {os.nice(0)}"


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
# the loop


class _Run:
    """The iterations of one worker: step, log, validate, checkpoint (rank 0 logs and writes)."""

    def __init__(
        self,
        config: WorkerConfig,
        session: Session,
        setup: WorkerSetup,
        hooks: TestHooks | None,
    ) -> None:
        self.config, self.session = config, session
        self.params, self.stage = config.params, config.stage_section
        self.stage_name, self.tag = config.stage, config.tag
        self.nets, self.opts, self.loader = setup.nets, setup.opts, setup.loader
        self.start = setup.start
        self.fault = hooks.fault if hooks is not None else None
        self.total = self.stage.iterations
        self.rank0 = session.rank == 0
        self.device = session.device
        self.meter = _Meter(self.params.loader.batch_size)
        self.pending: list[tuple[int, dict[str, Tensor], dict[str, float]]] = []
        self.last_losses: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.last_metrics: dict[str, Any] = {}
        self.tracker = RunLog(config.tracking) if self.rank0 else None
        self.vset = None
        if self.rank0 and config.evalsets_dir is not None:
            self.vset = load_validation_set(
                config.evalsets_dir, self.params, self.stage, unwrap(self.nets.g).size_multiple
            )
            self.tracker.log_metrics([(self.start, self.vset.input_psnr)])

    def due(self, every: int, it: int) -> bool:
        return it == self.total or (every > 0 and it % every == 0)

    def train(self) -> dict[str, Any]:
        stage, rank0 = self.stage, self.rank0
        if rank0:
            world = self.session.world_size
            log.info(
                "%s: iterations %d..%d, global batch %d = %d worker(s) x %d, device %s, %s",
                self.tag,
                self.start + 1,
                self.total,
                self.params.loader.batch_size,
                world,
                self.params.loader.batch_size // world,
                self.device,
                _cpu_budget(),
            )
            if self.start >= self.total:
                log.info(
                    "%s: the checkpoint is already at iteration %d; nothing to train",
                    self.tag,
                    self.start,
                )
        batches = _endless(self.loader)
        for it in range(self.start + 1, self.total + 1):
            if self.fault is not None:
                self.fault.maybe_fail(it, self.session.rank)
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

    def _step(self, it: int, batch: Batch) -> None:
        stage, opts = self.stage, self.opts
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
                        config=self.config.to_dict(),
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
