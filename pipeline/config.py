"""Typed view of ``params.yaml``: the single source of configuration.

Validated once, at the edge (stage scripts, the CLI, flows), then passed around as frozen
objects. Unknown keys are errors, so a misspelt key fails loudly instead of silently
falling back to a default. A bad value fails with one line that names the key, e.g.::

    params.yaml: extract.crop_size: Input should be greater than 0 (got -3)

Each pipeline stage owns one section; ``base`` holds what every stage shares.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.condition import setting_key

__all__ = [
    "ConfigError",
    "Params",
    "load_params",
    "parse_params",
]


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# base


class BaseParams(_Section):
    """Settings every stage shares."""

    seed: int = Field(0, ge=0)
    data_dir: str = "data"
    # Pretrained backbones (VGG19 perceptual loss, AlexNet for LPIPS, VGG16 for DISTS):
    #   imagenet: the real torchvision weights; refuse to run if they are missing offline.
    #   auto:     imagenet when available, else random weights with a loud warning + label.
    #   random:   random weights (tests).
    pretrained: Literal["imagenet", "auto", "random"] = "auto"
    # Cache for those weights; null -> $CUGAN_WEIGHTS_DIR or ~/.cache/cugan/weights.
    weights_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# degradation (shared by the data stages, the loaders, evaluation and the CLI)


class DegradationParams(_Section):
    """The blur -> noise -> clip -> 8-bit model of the method doc, and its level grid."""

    kernel_size: int = Field(21, gt=0)
    blur_max: float = Field(4.0, gt=0)
    noise_max: float = Field(50.0, gt=0)
    # Training draws levels on this grid (method doc: 0.1 and 1).
    blur_step: float = Field(0.1, gt=0)
    noise_step: float = Field(1.0, gt=0)
    # How training draws (blur, noise) per sample (pipeline.degradation.sample_levels, and the
    # same distribution inside the DALI graph). uniform: both levels independent and uniform
    # on the grid. authors: the mixture of the authors' generate_2groups.m on this grid -- half
    # the samples get one degradation (blur only or noise only, a quarter each), the others
    # both; a level is grid point round(U * K), U ~ Uniform(0, 1) = Beta(1, 1), K = max / step
    # (the two end points get half the mass of the others).
    sampling: Literal["uniform", "authors"] = "uniform"

    @model_validator(mode="after")
    def _odd_kernel(self) -> DegradationParams:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (got {self.kernel_size})")
        # The sampling grid must end exactly at the maximum (0, step, ..., max).
        for name, top, step in (
            ("blur", self.blur_max, self.blur_step),
            ("noise", self.noise_max, self.noise_step),
        ):
            ratio = top / step
            if abs(ratio - round(ratio)) > 1e-9 * max(1.0, ratio):
                raise ValueError(
                    f"{name}_max ({top:g}) must be a multiple of {name}_step ({step:g})"
                )
        return self


# ---------------------------------------------------------------------------------------------
# data sources and stages


class Div2kParams(_Section):
    """DIV2K train HR (800 PNGs): downloaded, or taken from a local directory or zip."""

    url: str = "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip"
    # Pinned sha256 and size of DIV2K_train_HR.zip, as listed by tensorflow_datasets
    # (tensorflow_datasets/datasets/div2k/checksums.tsv); see docs/data.md.
    sha256: str = Field(
        "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
        pattern=r"^[0-9a-f]{64}$",
    )
    size: int | None = Field(3_530_603_713, gt=0)
    # An existing directory of PNGs or the zip itself, used instead of downloading.
    local: str | None = None
    # How many images the directory/zip must hold (a partial copy is an error, not a subset).
    expected_images: int = Field(800, gt=0)
    # Download: attempts (each resumes where the last stopped) and socket timeout in seconds.
    retries: int = Field(5, ge=0)
    timeout: float = Field(60.0, gt=0)


class DataParams(_Section):
    """Where the raw training images come from."""

    source: Literal["sample", "div2k", "folder"] = "sample"
    folder: str | None = None
    div2k: Div2kParams = Div2kParams()
    # How many of the usable source images are held out for evaluation only (never trained
    # on). The choice is a seeded hash ranking of the image names, so it is deterministic.
    holdout: int = Field(2, ge=0)
    holdout_seed: int = Field(0, ge=0)
    # Decompression-bomb guard: images with more pixels are skipped and reported.
    max_pixels: int = Field(40_000_000, gt=0)

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataParams:
        if self.source == "folder" and not self.folder:
            raise ValueError("source 'folder' needs data.folder to name a directory")
        return self


class ExtractParams(_Section):
    """Sub-image extraction (overlapping crops, as the field does for DIV2K).

    Images smaller than ``crop_size`` on either side are skipped by the prepare stage.
    """

    crop_size: int = Field(192, gt=0)
    step: int = Field(96, gt=0)
    # A leftover strip at the right/bottom edge gets one extra crop (flush with the edge)
    # only when it is wider than this (BasicSR's extract_subimages convention).
    thresh_size: int = Field(48, ge=0)
    # zlib level of the sub-image PNGs (fixed, so the bytes are reproducible).
    png_compress_level: int = Field(3, ge=0, le=9)


class ShardParams(_Section):
    """WebDataset shards: each tar holds at most ``max_count`` samples and ``max_bytes`` bytes."""

    max_count: int = Field(1000, gt=0)
    max_bytes: int = Field(256 * 1024 * 1024, ge=10240)
    shuffle_seed: int = Field(0, ge=0)


class EvalSetParams(_Section):
    # holdout: the held-out source images; cbsd68/live1: local directories.
    sets: tuple[Literal["holdout", "cbsd68", "live1"], ...] = ("holdout",)
    cbsd68_dir: str | None = None
    live1_dir: str | None = None
    # "<sha256>  <file name>" lists checked before use (null: no check; then every image in the
    # directory is used). The repo ships CBSD68's list.
    cbsd68_sha256: str | None = "pipeline/data/checksums/CBSD68.sha256"
    live1_sha256: str | None = None
    # (blur r, noise sigma) pairs: the paper's ten settings.
    settings: tuple[tuple[float, float], ...] = (
        (0, 30),
        (0, 50),
        (2, 0),
        (4, 0),
        (1, 15),
        (1, 30),
        (2, 30),
        (2, 50),
        (4, 30),
        (4, 50),
    )
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> EvalSetParams:
        if len(set(self.sets)) != len(self.sets):
            raise ValueError(f"sets lists a set twice (got {list(self.sets)})")
        for name in ("cbsd68", "live1"):
            if name in self.sets and not getattr(self, f"{name}_dir"):
                raise ValueError(f"sets includes {name!r} but {name}_dir is not set")
        if not self.settings:
            raise ValueError("settings must list at least one (blur, noise) pair")
        if any(r < 0 or s < 0 for r, s in self.settings):
            raise ValueError(f"settings must be non-negative (got {list(self.settings)})")
        names = [setting_key(r, s) for r, s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"settings lists a (blur, noise) pair twice (got {names})")
        return self


#: How a reader checks shard files against shards.json (pipeline/data/shards.py).
ShardVerification = Literal["size", "sha256"]


class LoaderParams(_Section):
    """Training loader (pipeline/data/loader.py). Blur/noise levels come from ``degradation``
    (its grid and maxima), so training, z and the evaluation sets share one definition."""

    # dali: fn.readers.webdataset + degradation in DALI. torch: DataLoader workers + the
    # reference pipeline.degradation (the fallback, and the oracle in tests). auto: DALI when
    # its pipeline runs on a GPU; on the CPU whichever of the two a short probe measured faster
    # on this machine (cached per machine and setup; pipeline/data/backend_choice.py).
    backend: Literal["auto", "dali", "torch"] = "auto"
    # Where the DALI pipeline runs. auto: on the GPU (mixed decoder + GPU ops) when the loader
    # delivers to a CUDA device and CUDA is available, else on the CPU. gpu: require CUDA.
    device: Literal["auto", "cpu", "gpu"] = "auto"
    crop: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    # DALI CPU threads per pipeline; torch backend: DataLoader worker processes.
    num_threads: int = Field(2, gt=0)
    # DALI reader shuffle buffer (initial_fill) in samples; it holds the stored samples (raw:
    # 108 KiB per 192x192 sub-image, 2048 is ~221 MiB per rank; PNG about half). The torch
    # backend shuffles fully instead.
    shuffle_buffer: int = Field(2048, gt=0)
    # Batches prepared ahead (DALI prefetch_queue_depth; torch prefetch_factor per worker).
    prefetch: int = Field(2, gt=0)
    # How each worker checks the shards against shards.json before it reads them. size: every
    # tar and index has its recorded size (a stat per file: catches truncation). sha256: also
    # the recorded sha256 (reads every byte once per worker start: catches any change).
    verify_shards: ShardVerification = "size"


# ---------------------------------------------------------------------------------------------
# evaluation, figures, ablation sweep, scheduled retraining (pipeline/evaluation.py, flows/)

_EvalMetric = Literal["psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips", "dists"]
_REFERENCE_RE = re.compile(r"^(input|bm3d|folder:[A-Za-z0-9_.-]+:.+)$")


class FigureParams(_Section):
    """Modulation figures (paper Fig. 4) and the modulation curve (PSNR against z)."""

    enabled: bool = True
    # Evaluation set and how many of its images (sorted by name) get figures; null: first set.
    set: str | None = None
    images: int = Field(1, ge=1)
    # Centre crop (pixels, per side) of each figure image; keeps the grid cheap on a CPU.
    crop: int = Field(128, ge=8)
    # The figure's input: the clean image degraded (pipeline.degradation, seeded) at this level.
    input_blur: float = Field(2.0, ge=0)
    input_noise: float = Field(30.0, ge=0)
    # Grid of restorations of that one input with z = [blur/4, noise/50] over these levels.
    grid_blur: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)
    grid_noise: tuple[float, ...] = (0.0, 15.0, 30.0, 50.0)
    # DNI strip at the true z: alpha 0 = GAN model, 1 = MSE model (models.dni).
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # Modulation curve: z along each axis in this many steps over [0, 1], the other at truth.
    curve_points: int = Field(11, ge=2)
    seed: int = Field(0, ge=0)


class EvalParams(_Section):
    """The evaluate stage/flow: which sets, settings and metrics, and how to run the models."""

    # Empty: use evalsets.sets / evalsets.settings (the data stage made exactly those).
    sets: tuple[str, ...] = ()
    settings: tuple[tuple[float, float], ...] = ()
    # Metrics per model kind (MSE models: CUnet/Unet; GAN models: CUGAN/UGAN).
    mse_metrics: tuple[_EvalMetric, ...] = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y")
    gan_metrics: tuple[_EvalMetric, ...] = ("lpips", "dists", "psnr_rgb")
    # Pixels cut from each side before PSNR/SSIM (the paper does not crop: 0).
    crop_border: int = Field(0, ge=0)
    # Fixed-degradation baselines: <dir>/blur{r}_noise{sigma}/generator.{json,safetensors};
    # null or a missing directory: no distance tables.
    baselines_mse: str | None = None
    baselines_gan: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Run LPIPS/DISTS on the model's device (else on the CPU).
    metrics_on_device: bool = True
    tile: int | None = Field(None, gt=0)
    tile_overlap: int = Field(32, ge=0)
    # Cap on images per set (smoke runs); null: all.
    max_images: int | None = Field(None, gt=0)
    mlflow_experiment: str = "cugan-evaluate"
    # pad: pad to the network's multiple and crop back (full size, ours). crop16: crop clean and
    # degraded images to multiples of 16 from the top-left first, as the authors' test code does
    # (the paper-comparison tables use it). Written in every metrics file and table title.
    size_mode: Literal["pad", "crop16"] = "pad"
    # Methods scored beside the models (the degraded input is always one): "bm3d" (CBM3D given
    # the true sigma, noise-only settings; slow on a CPU) and "folder:NAME:DIR" (another
    # method's outputs laid out as DIR/<set>/<setting>/<image>.png).
    references: tuple[str, ...] = ()
    # Reuse the numbers of a pair scored before (same restored and clean pixels, metric code,
    # weights, libraries and machine: pipeline.evaluation.score_cache), from the user cache dir.
    score_cache: bool = True
    figures: FigureParams = FigureParams()

    @model_validator(mode="after")
    def _check_references(self) -> EvalParams:
        bad = [r for r in self.references if not _REFERENCE_RE.match(r)]
        if bad:
            raise ValueError(f"references: {bad[0]!r} is not input, bm3d or folder:NAME:DIR")
        names = [r.split(":")[1] if r.startswith("folder:") else r for r in self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"references: a name is listed twice (got {names})")
        return self


class SweepVariant(_Section):
    """One ablation arm: a name and the params overrides (nested mapping) that define it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    overrides: dict[str, Any] = {}


class SweepParams(_Section):
    """The ablation sweep (flows/sweep.py): Ray Tune over variants, each trained + evaluated."""

    # Overrides applied to every trial before its variant's (the sweep's training profile).
    profile: dict[str, Any] = {}
    # The paper's ablations (section 4.4): scales at 12 residual blocks in total, and GFM.
    variants: tuple[SweepVariant, ...] = (
        SweepVariant(
            name="cugan-1",
            overrides={
                "train_cunet": {"generator": "cugan-1"},
                "train_cugan": {"generator": "cugan-1", "discriminator": "authors"},
            },
        ),
        SweepVariant(
            name="cugan-2",
            overrides={
                "train_cunet": {"generator": "cugan-2"},
                "train_cugan": {"generator": "cugan-2", "discriminator": "authors"},
            },
        ),
        SweepVariant(
            name="cugan-3",
            overrides={
                "train_cunet": {"generator": "cugan-3"},
                "train_cugan": {"generator": "cugan-3", "discriminator": "authors"},
            },
        ),
        SweepVariant(
            name="cugan-3-no-gfm",
            overrides={
                "train_cunet": {"generator": "cugan-3"},
                "train_cugan": {"generator": "cugan-3", "discriminator": "no-gfm"},
            },
        ),
    )
    # Add the GAN-loss arm: "relativistic" (RaGAN) against the paper's vanilla GAN.
    include_gan_loss: bool = False
    # Ranking metric: <set>/<setting or all>/<metric> of the evaluation, and its direction.
    metric: str = "holdout/all/lpips"
    mode: Literal["min", "max"] = "min"
    # Which trained model of a trial is evaluated (its kind picks the metrics).
    evaluate_kind: Literal["mse", "gan"] = "gan"
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    # Ray cluster address (null: the running local instance, else start one).
    ray_address: str | None = None
    storage_path: str = "runs/sweep"
    mlflow_experiment: str = "cugan-sweep"

    @model_validator(mode="after")
    def _unique(self) -> SweepParams:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique (got {names})")
        return self


class PromotionRule(_Section):
    """Promote the version a training stage registered to the alias only if it beats the holder."""

    model_name: str
    kind: Literal["mse", "gan"]  # the generator scored (a cugan model carries CUnet's mse too)
    # <set>/<setting or all>/<metric>; direction: max for psnr*/ssim*, min for lpips/dists.
    metric: str
    direction: Literal["max", "min"]
    # The training stage's model directory; its tracking.json names the version it registered.
    model_dir: str
    min_delta: float = Field(0.0, ge=0)  # the candidate must be better by more than this
    # LPIPS/DISTS on random backbone weights say nothing: refuse to decide on them unless set.
    allow_random_backbones: bool = False

    @model_validator(mode="after")
    def _direction_of_metric(self) -> PromotionRule:
        name, known = self.metric.rsplit("/", 1)[-1], get_args(_EvalMetric)
        if name not in known:
            raise ValueError(f"metric {self.metric!r} ends in none of {list(known)}")
        want = "max" if name.startswith(("psnr", "ssim")) else "min"
        if self.direction != want:
            raise ValueError(f"direction must be {want!r} for {name} (got {self.direction!r})")
        return self


class RetrainParams(_Section):
    """Scheduled retraining (flows/retrain.py, prefect.yaml): repro, evaluate, promote."""

    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    # Command rerunning the pipeline (argv); empty: skip (judge what the stages last registered).
    repro_command: tuple[str, ...] = ("dvc", "repro")
    # Retries of the rerun (e.g. a download that timed out), a minute apart.
    repro_retries: int = Field(1, ge=0)
    registry_retries: int = Field(2, ge=0)  # a failing registry: 10 s apart, then the run fails
    # The winner's alias (the candidate holds `challenger`, the replaced champion `previous`).
    alias: str = "champion"
    rules: tuple[PromotionRule, ...] = (
        PromotionRule(
            model_name="cunet",
            kind="mse",
            metric="holdout/all/psnr_rgb",
            direction="max",
            model_dir="runs/train_cunet/model",
        ),
        PromotionRule(
            model_name="cugan",
            kind="gan",
            metric="holdout/all/lpips",
            direction="min",
            model_dir="runs/train_cugan/model",
        ),
    )


# ---------------------------------------------------------------------------------------------
# training (pipeline/train/, stages/train.py): one section per stage, plus Ray and MLflow.
# Batch size and crop are the loader's (``loader.batch_size`` is the GLOBAL batch, split evenly
# over the Ray workers); the values below are the paper's where it gives them.


class OptimizerParams(_Section):
    """Adam, as the method uses for G + C_G and for D + C_D."""

    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check_betas(self) -> OptimizerParams:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1) (got {list(self.betas)})")
        return self


class LRScheduleParams(_Section):
    """Step decay: the rate is multiplied by ``gamma`` after each milestone iteration and after
    every multiple of ``every`` (pipeline/train/schedules.py)."""

    milestones: tuple[int, ...] = ()
    every: int | None = Field(None, gt=0)
    gamma: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _increasing(self) -> LRScheduleParams:
        m = self.milestones
        if any(v <= 0 for v in m) or any(b <= a for a, b in itertools.pairwise(m)):
            raise ValueError(f"milestones must be positive and increasing (got {list(m)})")
        return self


class LossWeightParams(_Section):
    """L = pixel * MSE + perceptual * L1(VGG19 features) + gan * L_GAN (GAN stages)."""

    pixel: float = Field(1.0, ge=0)
    perceptual: float = Field(0.0, ge=0)
    gan: float = Field(0.0, ge=0)


class TrainValidationParams(_Section):
    """Validation while training: PSNR per setting on a few images of an evaluation set, and
    a modulation grid (one degraded input restored over a grid of z) logged as an image."""

    # Iterations between validations; 0: only at the end of the stage.
    every: int = Field(0, ge=0)
    set: str = "holdout"
    images: int = Field(2, ge=1)
    # Centre crop (pixels per side) of each image: keeps validation cheap on a CPU.
    crop: int = Field(128, ge=8)
    # (blur, noise) settings validated; empty: all of evalsets.settings.
    settings: tuple[tuple[float, float], ...] = ()
    # Iterations between modulation grids; 0: only at the end.
    grid_every: int = Field(0, ge=0)
    # The grid's input: the first validation image at this setting (one of evalsets.settings).
    grid_setting: tuple[float, float] = (2.0, 30.0)
    grid_blur: tuple[float, ...] = (0.0, 2.0, 4.0)
    grid_noise: tuple[float, ...] = (0.0, 25.0, 50.0)


class TrainStageParams(_Section):
    """One training stage. CUnet, CUGAN, the Unet/UGAN baselines and the ablations are all
    instances of this with different values (generator name, loss, fixed degradation...)."""

    # mse: G + C_G on the pixel MSE only (CUnet, Unet). gan: G + C_G and D + C_D (CUGAN, UGAN).
    loss: Literal["mse", "gan"] = "mse"
    # Names in models.registry (GENERATOR_CONFIGS / DISCRIMINATOR_CONFIGS).
    generator: str = "authors"
    discriminator: str = "authors"
    # vanilla: the standard non-saturating BCE GAN of the paper; relativistic: ESRGAN's RaGAN.
    gan_type: Literal["vanilla", "relativistic"] = "vanilla"
    perceptual_layer: str = "conv5_4"
    weights: LossWeightParams = LossWeightParams()
    optimizer_g: OptimizerParams = OptimizerParams()
    optimizer_d: OptimizerParams = OptimizerParams()
    schedule: LRScheduleParams = LRScheduleParams(every=200_000)
    # Total optimiser steps (the paper gives none; ours: 4 halvings for CUnet, 100k after the
    # last milestone for CUGAN).
    iterations: int = Field(800_000, gt=0)
    # GAN stages: D-only steps before G is updated (BasicSR's net_d_init_iters).
    d_warmup: int = Field(0, ge=0)
    # [blur r, noise sigma]: train on this one degradation only (the Unet/UGAN baselines).
    fixed_degradation: tuple[float, float] | None = None
    checkpoint_every: int = Field(5000, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    # Iterations between progress lines and metric flushes (every iteration is recorded).
    log_every: int = Field(100, gt=0)
    validation: TrainValidationParams = TrainValidationParams()

    @model_validator(mode="after")
    def _check(self) -> TrainStageParams:
        if self.fixed_degradation is not None and min(self.fixed_degradation) < 0:
            raise ValueError(
                f"fixed_degradation must be non-negative (got {self.fixed_degradation})"
            )
        return self


class CuganStageParams(TrainStageParams):
    """The GAN stage's defaults (a section that omits a key gets the paper's GAN value)."""

    loss: Literal["mse", "gan"] = "gan"
    weights: LossWeightParams = LossWeightParams(pixel=0.01, perceptual=1.0, gan=0.005)
    schedule: LRScheduleParams = LRScheduleParams(
        milestones=(50_000, 100_000, 200_000, 300_000, 400_000)
    )
    iterations: int = Field(500_000, gt=0)


class RayParams(_Section):
    """Where and how wide the training runs (not a DVC dependency: it does not change the math
    beyond float rounding, the global batch being constant)."""

    # Ray cluster address; null: $RAY_ADDRESS, else start a local instance.
    address: str | None = None
    num_workers: int = Field(1, ge=1)
    # auto: one GPU per worker when the cluster has enough GPUs, else CPU.
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    # CPUs of a local instance started here; null: all of this machine's.
    local_num_cpus: int | None = Field(None, gt=0)
    # Results and checkpoints; on a multi-node cluster this must be shared storage (NFS, S3).
    storage_path: str = "runs/ray"
    # Worker failures recovered from the last checkpoint (-1: no limit).
    max_failures: int = Field(2, ge=-1)


class TrackingParams(_Section):
    """MLflow. The tracking URI is $MLFLOW_TRACKING_URI when set, else ``uri``."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    # Artifact root of experiments created in a local (sqlite/file) store.
    artifact_location: str = "mlartifacts"
    experiment: str = "cugan"
    # Log the final model (pyfunc) and register it as `cunet` / `cugan`.
    log_model: bool = True
    register_model: bool = True
    # A server silent this long at a stage's start: log to local files (`cugan tracking sync`).
    # HTTP limits of the stage's processes, unless set in MLFLOW_HTTP_REQUEST_* (MLflow: ~4 min).
    probe_timeout_s: float = Field(5.0, gt=0)
    http_timeout_s: int = Field(10, gt=0)
    http_max_retries: int = Field(2, ge=0)


# ---------------------------------------------------------------------------------------------


class Params(_Section):
    base: BaseParams = BaseParams()
    degradation: DegradationParams = DegradationParams()
    data: DataParams = DataParams()
    extract: ExtractParams = ExtractParams()
    shards: ShardParams = ShardParams()
    evalsets: EvalSetParams = EvalSetParams()
    loader: LoaderParams = LoaderParams()
    evaluate: EvalParams = EvalParams()
    sweep: SweepParams = SweepParams()
    retrain: RetrainParams = RetrainParams()
    train_cunet: TrainStageParams = TrainStageParams()
    train_cugan: CuganStageParams = CuganStageParams()
    ray: RayParams = RayParams()
    tracking: TrackingParams = TrackingParams()

    @property
    def data_dir(self) -> Path:
        return Path(self.base.data_dir)


def _format_error(err: ValidationError, source: str) -> str:
    """One line for the first problem, naming the dotted key, plus a count of the others."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more else ""
    return f"{source}: {key}: {msg}{tail}"


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping. Raises :class:`ConfigError` with a one-line message."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, source=str(path))
