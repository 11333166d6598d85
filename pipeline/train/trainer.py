"""Run one training stage on Ray: check the config, start tracking, build the TorchTrainer.

The same call runs here on 1-2 CPU workers and on a multi-node GPU cluster; only params change
(``ray.address`` or $RAY_ADDRESS, ``ray.num_workers``, ``ray.use_gpu``, a shared
``ray.storage_path``). Every check that can fail on a bad config runs before Ray starts and
raises :class:`~pipeline.config.ConfigError` with one line naming the key.

Resume across invocations: the Ray run is named ``train_<stage>-<digest>`` where the digest
covers the params that define the training (all sections but ``ray`` and ``tracking``), the
shards manifest, the starting checkpoint and the training code. Running the same command again
after a crash of the whole job (driver included) rebuilds the trainer with the same name and
storage path, and Ray resumes from the last checkpoint; change anything and it starts fresh.
Worker failures inside a run are recovered by ``FailureConfig(ray.max_failures)``.

Each worker gets one typed :class:`~pipeline.train.worker_config.WorkerConfig` (params, stage,
data, evalsets, starting checkpoint, tracking target, threads) and runs
:func:`pipeline.train.loop.train_loop_per_worker`; test hooks (fault injection, synthetic data)
travel beside it through :mod:`pipeline.train.testing`, never through params or the config.

Outputs in ``out_dir`` (the DVC outs of the stage):

* ``model/``: the final checkpoint (:mod:`pipeline.train.state`) including ``generator.*``
  (``cugan restore --model <out_dir>/model``) and ``tracking.json`` (the MLflow run ids);
* ``metrics.json``: final losses, validation PSNR per setting, input PSNR, samples/s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, Params, TrainStageParams
from pipeline.errors import one_line
from pipeline.ray_runtime import cluster_address, ensure_ray
from pipeline.tracking import (
    TRACKING_ERRORS,
    RunLog,
    TrackingTarget,
    dvc_lock_tags,
    flatten_params,
    git_tags,
    start_stage_run,
    write_tracking_file,
)
from pipeline.train.loop import loop_config, train_loop_per_worker
from pipeline.train.testing import TestHooks
from pipeline.train.worker_config import WorkerConfig, stage_params

__all__ = [
    "StageFailed",
    "StageResult",
    "available_cpus",
    "check_stage",
    "failure_line",
    "run_stage",
]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]
#: Environment passed on to the Ray workers (tracking server, HTTP limits, our own settings).
_ENV_PREFIXES = ("MLFLOW_TRACKING_", "MLFLOW_HTTP_", "CUGAN_")
#: Ray's setting of its worker processes' niceness (case-sensitive, as Ray reads it).
_NICENESS = "RAY_worker_niceness"
#: OpenMP's policy for idle threads (read once, when torch's OpenMP runtime starts).
_OMP_WAIT = "OMP_WAIT_POLICY"


class StageFailed(RuntimeError):
    """Training failed after Ray's retries (one-line message with the first worker error)."""


@dataclass(frozen=True)
class StageResult:
    out_dir: Path
    model_dir: Path
    metrics: dict[str, Any]
    tracking: TrackingTarget
    model_uri: str | None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# checks before Ray starts


def check_stage(
    params: Params,
    stage: str,
    *,
    shards_dir: str | os.PathLike[str] | None,
    evalsets_dir: str | os.PathLike[str] | None = None,
    init_dir: str | os.PathLike[str] | None = None,
) -> TrainStageParams:
    """Everything about a stage's config that can be checked without Ray; one-line ConfigError.

    Also resolves the VGG19 backbone of a perceptual loss: with ``base.pretrained: imagenet``
    and no weights this raises :class:`~pipeline.pretrained.PretrainedWeightsMissing` (one
    line: which file, where to put it); with ``auto`` it warns loudly and carries on.
    """
    from models.registry import UnknownConfigError, discriminator_config, generator_config

    sp = stage_params(params, stage)  # a ConfigError naming the stage when there is none
    key = f"train_{stage}"
    try:
        gcfg = generator_config(sp.generator)
    except UnknownConfigError as err:
        raise ConfigError(f"{key}.generator: {err}") from None
    loader, rp = params.loader, params.ray
    if loader.crop % gcfg.size_multiple:
        raise ConfigError(
            f"loader.crop: {loader.crop} is not a multiple of {gcfg.size_multiple} "
            f"(generator {sp.generator!r} has {gcfg.num_scales} scales)"
        )
    if sp.loss == "gan":
        try:
            dcfg = discriminator_config(sp.discriminator)
        except UnknownConfigError as err:
            raise ConfigError(f"{key}.discriminator: {err}") from None
        if loader.crop != dcfg.input_size:
            raise ConfigError(
                f"loader.crop: the discriminator {sp.discriminator!r} takes "
                f"{dcfg.input_size}x{dcfg.input_size} patches (got crop {loader.crop})"
            )
        if sp.weights.pixel == sp.weights.perceptual == sp.weights.gan == 0:
            raise ConfigError(f"{key}.weights: all loss weights are zero")
    elif sp.weights.perceptual or sp.weights.gan:
        raise ConfigError(
            f"{key}.weights: loss 'mse' trains on the pixel MSE only; "
            "set loss: gan for perceptual/GAN terms"
        )
    if loader.batch_size % rp.num_workers:
        raise ConfigError(
            f"loader.batch_size: the global batch {loader.batch_size} is not "
            f"divisible by ray.num_workers={rp.num_workers}"
        )
    if cluster_address(params.ray.address) is None:
        cpus = rp.local_num_cpus or available_cpus()
        need = rp.num_workers * rp.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                f"ray.num_workers: {rp.num_workers} workers x {rp.cpus_per_worker:g} "
                f"CPU need {need:g} CPUs, this machine offers {cpus}"
            )
        if rp.use_gpu is True:
            import torch

            if torch.cuda.device_count() < rp.num_workers:
                raise ConfigError(
                    f"ray.use_gpu: true but this machine has {torch.cuda.device_count()} "
                    f"GPU(s) for {rp.num_workers} worker(s)"
                )
    d = params.degradation
    for name, (r, s) in (
        ([("fixed_degradation", sp.fixed_degradation)] if sp.fixed_degradation else [])
        + [("validation.grid_setting", sp.validation.grid_setting)]
        + [
            (f"validation.grid ({b:g}, {n:g})", (b, n))
            for b in sp.validation.grid_blur
            for n in sp.validation.grid_noise
        ]
    ):
        if r > d.blur_max or s > d.noise_max:
            raise ConfigError(
                f"{key}.{name}: ({r:g}, {s:g}) is outside [0, {d.blur_max:g}] x "
                f"[0, {d.noise_max:g}]"
            )
    if shards_dir is not None:
        from pipeline.data.batch import LoaderError, batches_per_epoch, read_shard_set
        from pipeline.data.shards import ShardError

        try:
            shards = read_shard_set(shards_dir)
        except (LoaderError, ShardError) as err:
            raise ConfigError(f"shards: {err}") from None
        if loader.crop > shards.crop_size:
            raise ConfigError(
                f"loader.crop: {loader.crop} is larger than the shards' "
                f"sub-images ({shards.crop_size})"
            )
        per_worker = loader.batch_size // rp.num_workers
        if batches_per_epoch(shards.num_samples, rp.num_workers, per_worker) == 0:
            raise ConfigError(
                f"loader.batch_size: {shards.num_samples} samples cannot fill one "
                f"batch of {per_worker} on each of {rp.num_workers} workers"
            )
    if evalsets_dir is not None:
        from pipeline.train.validation import (
            ValidationError,
            find_validation_images,
            validation_settings,
        )

        try:
            find_validation_images(
                evalsets_dir,
                sp.validation.set,
                validation_settings(params, sp),
                sp.validation.images,
            )
        except ValidationError as err:
            raise ConfigError(f"{key}.validation: {err}") from None
    if init_dir is not None:
        from pipeline.checkpoint import CheckpointError, read_generator_document

        try:
            doc = read_generator_document(init_dir)
        except CheckpointError as err:
            raise ConfigError(f"init checkpoint: {err}") from None
        if doc["config"] != gcfg.to_dict():
            raise ConfigError(
                f"{key}.generator: {sp.generator!r} differs from the generator in "
                f"{init_dir} ({doc['config']})"
            )
    elif sp.loss == "gan":
        log.warning(
            "%s: a GAN stage without a starting checkpoint trains G from scratch "
            "(the method starts CUGAN from CUnet)",
            key,
        )
    return sp


def _backbone_tag(params: Params, sp: TrainStageParams) -> str:
    """Resolve VGG19 now (fails fast for ``imagenet``); 'imagenet', 'random' or 'none'."""
    if sp.loss != "gan" or sp.weights.perceptual == 0:
        return "none"
    from pipeline.pretrained import resolve_backbone

    weights = resolve_backbone("vgg19", params.base.pretrained, params.base.weights_dir)
    return "random" if weights.is_random else "imagenet"


# ---------------------------------------------------------------------------------------------
# running


def _digest(
    params: Params,
    stage: str,
    shards_dir: Path | None,
    init_dir: Path | None,
    hooks: TestHooks | None,
) -> str:
    """The run identity (module docstring): the params that define training, the data (the
    shards manifest, or a test's synthetic data), the starting checkpoint and the code.

    ``shards.json`` records every shard's size and sha256 (tar and index,
    :mod:`pipeline.data.shards`), so hashing it covers the shards' content: shards rewritten
    with other samples but the same counts give a new run, never a resume of the old one.
    That the files still match the manifest is checked where they are read (sizes always,
    sha256 with ``loader.verify_shards``), so that setting, which does not change what is
    trained, is left out here: switching it on must not restart a run.
    """
    h = hashlib.sha256()
    defining = params.model_dump(
        mode="json", exclude={"ray": True, "tracking": True, "loader": {"verify_shards"}}
    )
    identity = hooks.identity() if hooks is not None else {}
    h.update(
        json.dumps(
            {
                "stage": stage,
                "params": defining,
                "data": "synthetic" if identity.get("synthetic") else "shards",
                **identity,
            },
            sort_keys=True,
        ).encode()
    )
    for path in ([shards_dir / "shards.json"] if shards_dir else []) + (
        [init_dir / "generator.json"] if init_dir else []
    ):
        h.update(path.read_bytes())
    for package in ("pipeline", "models"):
        for src in sorted((_REPO / package).rglob("*.py")):
            h.update(src.relative_to(_REPO).as_posix().encode())
            h.update(src.read_bytes())
    return h.hexdigest()[:12]


def _worker_env() -> dict[str, str]:
    """Environment of the Ray training workers: ours passed on, and normal CPU priority.

    Ray starts worker processes at niceness 15 (``RAY_worker_niceness``), so that its own
    daemons stay responsive. A training worker is the machine's main job: at nice 15 every
    nice-0 process (Ray's raylet, GCS and dashboard answering the controller's polls, the
    driver, anything else on the machine) preempts it at once, and each preemption of one of
    its OpenMP threads stalls the whole team at the next barrier (issue 12, a quiet 2-core
    machine: the 1-worker run kept 0.60 of the compute, against 0.84 in-process). Niceness 0
    (Ray's own value for job drivers) makes the worker an ordinary process;
    ``RAY_worker_niceness`` in the environment overrides it.

    OpenMP's wait policy is OpenMP's own default (libgomp: an idle thread spins about 3 ms,
    then sleeps) unless ``OMP_WAIT_POLICY`` is set in the environment, which is passed on. An
    earlier default here, ``PASSIVE`` (threads sleep at once), cost throughput: every parallel
    region then starts with a futex wake-up, and the worker left its CPUs idle (issue 12, quiet
    2-core machine, 110-iteration CUnet runs through Ray with 1 worker: 1.48-1.50 of 2 cores
    busy and 49.9-58.2 samples/s with PASSIVE against 1.67-1.75 cores and 53.0-70.8 samples/s
    with the default, interleaved runs; ``benchmarks/train.py`` pairs each Ray run with a
    ceiling run).
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    env[_NICENESS] = os.environ.get(_NICENESS, "0")
    if _OMP_WAIT in os.environ:
        env[_OMP_WAIT] = os.environ[_OMP_WAIT]
    return env


def _use_gpu(params: Params) -> bool:
    import ray

    rp = params.ray
    gpus = ray.cluster_resources().get("GPU", 0)
    if rp.use_gpu == "auto":
        return gpus >= rp.num_workers
    if rp.use_gpu and gpus < rp.num_workers:
        raise ConfigError(
            f"ray.use_gpu: the cluster has {gpus:g} GPU(s) for {rp.num_workers} workers"
        )
    cpus = ray.cluster_resources().get("CPU", 0)
    if rp.num_workers * rp.cpus_per_worker > cpus:
        raise ConfigError(
            f"ray.num_workers: {rp.num_workers} x {rp.cpus_per_worker:g} CPU exceed the "
            f"cluster's {cpus:g} CPUs"
        )
    return bool(rp.use_gpu)


def failure_line(err: BaseException) -> str:
    """One line for a failed Ray run: the first failing worker's exception when Ray gives them
    (``WorkerGroupError.worker_failures``), else the last line of the message (Ray lists the
    workers' tracebacks before its summary). The text is :func:`pipeline.errors.one_line`'s."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, exc = min(failures.items(), key=lambda item: item[0])
        line = f"rank {rank}: {type(exc).__name__}"
        return f"{line}: {one_line(exc)}" if str(exc).strip() else line
    return one_line(err, pick="last")


def run_stage(
    params: Params,
    stage: str,
    *,
    out_dir: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str] | None = None,
    evalsets_dir: str | os.PathLike[str] | None = None,
    init_dir: str | os.PathLike[str] | None = None,
    run_name: str | None = None,
    test_hooks: TestHooks | None = None,
) -> StageResult:
    """Train ``train_<stage>`` to completion on Ray and write the stage outputs (module docstring).

    ``test_hooks`` is the test seam (:mod:`pipeline.train.testing`): ``synthetic`` trains on
    pre-made tensors instead of shards (tests, benchmarks, smoke runs), ``fault`` injects a
    worker failure (chaos tests). Production callers pass ``shards_dir`` and no hooks.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    synthetic = test_hooks.synthetic if test_hooks is not None else None
    if (shards_dir is None) == (synthetic is None):
        raise ConfigError("give either a shards directory or synthetic data, not both or neither")
    sp = check_stage(
        params, stage, shards_dir=shards_dir, evalsets_dir=evalsets_dir, init_dir=init_dir
    )
    backbones = _backbone_tag(params, sp)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = Path(shards_dir).resolve() if shards_dir is not None else None
    init = Path(init_dir).resolve() if init_dir is not None else None
    name = run_name or f"train_{stage}-{_digest(params, stage, shards, init, test_hooks)}"

    tags = {
        **git_tags(_REPO),
        **dvc_lock_tags([p for p in (shards, evalsets_dir, init) if p]),
        "pretrained_backbones": backbones,
        "ray.run_name": name,
        "generator": sp.generator,
    }
    target = start_stage_run(
        params.tracking, stage=f"train_{stage}", out_dir=out, init_dir=init, tags=tags
    )
    runlog = RunLog(target)
    runlog.log_params(flatten_params(params.model_dump(mode="json")))
    if backbones == "random":
        log.warning(
            "train_%s: the perceptual loss uses a RANDOM VGG19 (no ImageNet weights): "
            "the run is tagged pretrained_backbones=random",
            stage,
        )

    config = WorkerConfig(
        params=params,
        stage=stage,
        tracking=target,
        shards_dir=shards,
        evalsets_dir=Path(evalsets_dir).resolve() if evalsets_dir is not None else None,
        init_dir=init,
        threads=max(1, int(params.ray.cpus_per_worker)),
    )
    started = ensure_ray(params.ray.address, num_cpus=params.ray.local_num_cpus or available_cpus())
    t0 = time.perf_counter()
    try:
        use_gpu = _use_gpu(params)
        rp = params.ray
        env = _worker_env()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config(config, test_hooks),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=rp.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": rp.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(Path(rp.storage_path).resolve())
                if "://" not in rp.storage_path
                else rp.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=rp.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=sp.keep_checkpoints),
                worker_runtime_env={"env_vars": env},
            ),
        )
        log.info(
            "train_%s: %d worker(s), %s, Ray run %s",
            stage,
            rp.num_workers,
            "GPU" if use_gpu else "CPU",
            name,
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            runlog.finish("FAILED")
            raise StageFailed(f"train_{stage} failed: {failure_line(err)}") from err
    finally:
        if started:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        runlog.finish("FAILED")
        raise StageFailed(f"train_{stage}: Ray returned no checkpoint")

    from pipeline.atomic import atomic_write_json, staging_dir

    model_dir = out / "model"
    with result.checkpoint.as_directory() as ckpt, staging_dir(model_dir) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
        write_tracking_file(tmp, target, f"train_{stage}")
    metrics = {k: v for k, v in dict(result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics["train_seconds"] = seconds
    atomic_write_json(out / "metrics.json", dict(sorted(metrics.items())))
    runlog.log_metrics([(int(metrics.get("iteration", 0)), {"final/train_seconds": seconds})])

    model_uri = None
    if params.tracking.enabled and params.tracking.log_model:
        model_uri = _log_model(params, stage, sp, target, runlog, model_dir, init)
    runlog.finish("FINISHED")
    log.info("train_%s: done in %.0f s; model in %s", stage, seconds, model_dir)
    return StageResult(out, model_dir, metrics, target, model_uri)


def _log_model(
    params: Params,
    stage: str,
    sp: TrainStageParams,
    target: TrackingTarget,
    runlog: RunLog,
    model_dir: Path,
    init: Path | None,
) -> str | None:
    """The pyfunc model: MSE generator, plus the GAN one for GAN stages (alpha blends them).

    The version it registered goes into ``model_dir/tracking.json`` (the retrain flow judges
    exactly that version). Where MLflow is unavailable (from the start, or now), the model is
    saved under the fallback directory and recorded there for ``cugan tracking sync``, and
    tracking.json names no version."""
    from pipeline.train.pyfunc import log_restoration_model, save_restoration_model

    mse_dir, gan_dir = (model_dir, None) if sp.loss == "mse" else (init, model_dir)
    if mse_dir is None:  # a GAN stage trained from scratch: no MSE model to blend with
        mse_dir, gan_dir = model_dir, None
    registered_name = stage if params.tracking.register_model else None
    if runlog.mode == "mlflow":
        try:
            logged = log_restoration_model(
                tracking_uri=target.uri,
                run_id=target.run_id,
                mse_dir=mse_dir,
                gan_dir=gan_dir,
                registered_name=registered_name,
            )
        except TRACKING_ERRORS as err:
            runlog.fall_back(f"log the {stage} model", err)  # one warning; the rest is local
        else:
            write_tracking_file(model_dir, target, f"train_{stage}", logged.registered)
            return logged.model_uri
    run_key = target.local_id or target.run_id or "run"  # an unsynced earlier run keeps its own
    path = save_restoration_model(
        Path(target.fallback_dir) / f"model_{stage}-{run_key[:12]}",
        mse_dir=mse_dir,
        gan_dir=gan_dir,
    )
    runlog.record_saved_model(path, registered_name)
    log.info("pyfunc model saved to %s (`cugan tracking sync` logs and registers it)", path)
    return None
