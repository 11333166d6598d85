"""Part ``ray_resume``: one Ray Train worker with NCCL (``ray.use_gpu: true``) training a few
iterations with a checkpoint, an injected worker failure after it
(:class:`pipeline.train.testing.FaultPlan`), and Ray's restart resuming from that checkpoint.

Passes when the losses logged after the restart start at the checkpointed iteration + 1 and
repeat the values logged before the failure (same weights, optimiser state and loader
position), the run ends at its last iteration, and (CUDA only) the process group was NCCL
and the checkpointed loader state is the DALI GPU pipeline's. The dry run uses gloo and DALI's
CPU pipeline; the two CUDA-only checks are then skipped.
"""

from __future__ import annotations

import collections
import logging
import time

from benchmarks.gpu_check_parts.common import PartRun

#: Iterations, the checkpoint, and the iteration at which the worker fails (after the
#: checkpoint; two iterations are then replayed from it).
RAY_ITERATIONS, RAY_CHECKPOINT_EVERY, RAY_FAULT_AT = 6, 3, 6
# The resumed run repeats the losses logged before the failure: exactly on the CPU; on CUDA
# the restarted process may pick other cuDNN algorithms (another summation order).
REPLAY_TOL = {"cpu": 0.0, "cuda": 1e-5}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(run: PartRun) -> None:
    from pipeline.config import load_params, parse_params
    from pipeline.tracking.store import tracking_client
    from pipeline.train.state import load_train_state
    from pipeline.train.testing import FaultPlan, TestHooks
    from pipeline.train.trainer import run_stage

    s, cuda = run.sizes, run.cuda
    raw = load_params(run.config.params).model_dump(mode="json")
    raw["base"].update(pretrained="random", seed=0)
    raw["loader"].update(
        backend="dali", batch_size=s.batch, crop=s.crop, num_threads=s.threads, shuffle_buffer=64
    )
    raw["train_cunet"].update(
        generator=s.ray_generator,
        iterations=RAY_ITERATIONS,
        checkpoint_every=RAY_CHECKPOINT_EVERY,
        keep_checkpoints=2,
        log_every=1,
        fixed_degradation=None,
    )
    raw["train_cunet"]["validation"].update(every=0, grid_every=0)
    raw["ray"].update(
        address=None,  # this machine's GPU: a private instance ($RAY_ADDRESS is unset too)
        num_workers=1,
        cpus_per_worker=s.ray_cpus,
        use_gpu=cuda,  # true: NCCL, or a ConfigError if Ray sees no GPU
        storage_path=str(run.work / "ray"),
        max_failures=1,
        local_num_cpus=max(2, s.ray_cpus),
    )
    raw["tracking"].update(
        enabled=True,
        uri=f"sqlite:///{run.work}/mlflow.db",
        artifact_location=str(run.work / "mlartifacts"),
        experiment="gpu_check",
        log_model=False,
        register_model=False,
    )
    params = parse_params(raw)
    marker = run.work / "fault-injected"
    lines = _Lines()
    trainer_log = logging.getLogger("pipeline.train.trainer")
    trainer_log.addHandler(lines)
    trainer_log.setLevel(logging.INFO)
    name = f"gpu_check-{time.time_ns()}"
    t0 = time.perf_counter()
    result = run_stage(
        params,
        "cunet",
        out_dir=run.work / "out",
        shards_dir=run.config.shards["raw"],
        run_name=name,
        test_hooks=TestHooks(fault=FaultPlan(iteration=RAY_FAULT_AT, marker=marker)),
    )
    wall = time.perf_counter() - t0
    started = next((line for line in lines.lines if "worker(s)" in line and "Ray run" in line), "")
    backend = "nccl" if ", GPU, " in started else "gloo" if ", CPU, " in started else None
    history = tracking_client(result.tracking.uri).get_metric_history(
        result.tracking.run_id, "loss/mse"
    )
    by_step: dict[int, list[float]] = collections.defaultdict(list)
    for m in sorted(history, key=lambda m: m.timestamp):
        by_step[m.step].append(m.value)
    replayed = {step: values for step, values in sorted(by_step.items()) if len(values) > 1}
    first_resumed = min(replayed) if replayed else None
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in (v[:2] for v in replayed.values())]
    state = load_train_state(result.model_dir)
    source = run.work / "ray" / name / f"checkpoint_{RAY_CHECKPOINT_EVERY:08d}"
    run.figures.update(
        generator=s.ray_generator,
        batch=s.batch,
        crop=s.crop,
        backend=backend,
        backend_evidence=started,
        world_size=result.metrics.get("ddp/world_size"),
        checkpoint_iteration=RAY_CHECKPOINT_EVERY,
        fault_iteration=RAY_FAULT_AT,
        first_resumed_iteration=first_resumed,
        replayed={str(k): v for k, v in replayed.items()},
        replay_max_rel_diff=max(rel) if rel else None,
        final_iteration=state.iteration,
        resume_source_iteration=load_train_state(source).iteration if source.is_dir() else None,
        loader={k: state.loaders[0].get(k) for k in ("backend", "pipeline")},
        wall_s=wall,
        train_seconds=result.metrics.get("train_seconds"),
    )
    tol = REPLAY_TOL["cuda" if cuda else "cpu"]
    run.cuda_check("backend", backend, backend == "nccl", "nccl", f"gloo (seen: {backend})")
    run.check("fault_injected", marker.exists(), marker.exists(), "the worker failed once")
    run.check(
        "first_resumed_iteration",
        first_resumed,
        first_resumed == RAY_CHECKPOINT_EVERY + 1,
        f"{RAY_CHECKPOINT_EVERY + 1} (the checkpoint's + 1)",
    )
    run.check(
        "replayed_iterations",
        sorted(replayed),
        sorted(replayed) == list(range(RAY_CHECKPOINT_EVERY + 1, RAY_FAULT_AT)),
        f"{list(range(RAY_CHECKPOINT_EVERY + 1, RAY_FAULT_AT))}, each logged twice",
    )
    run.check(
        "replay_max_rel_diff",
        max(rel) if rel else None,
        bool(rel) and max(rel) <= tol,
        f"<= {tol:g} (same weights, optimiser, loader position)",
    )
    run.check(
        "final_iteration", state.iteration, state.iteration == RAY_ITERATIONS, str(RAY_ITERATIONS)
    )
    pipeline = state.loaders[0].get("pipeline")
    run.cuda_check(
        "loader.pipeline", pipeline, pipeline == "gpu", "gpu", f"DALI's CPU pipeline ({pipeline})"
    )
