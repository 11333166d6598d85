"""What every part of the GPU check shares: sizes, the typed config a part's process gets,
the environment record, the shards built once, and :class:`PartRun` (figures + checks).

A check is ``pass``, ``fail`` or ``skip``, always with a reason. ``skip`` is for what cannot
be decided here: a CUDA-only check in the CPU dry run, or what needs more GPUs than there are.
A skipped check never counts as passed (the report keeps the two apart).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write_json
from pipeline.errors import one_line

PASS, FAIL, SKIP = "pass", "fail", "skip"


# ---------------------------------------------------------------------------------------------
# what runs, at which size


@dataclass(frozen=True)
class Sizes:
    """One profile's sizes (the GPU run, or the tiny CPU dry run)."""

    images: int  # source images used (CBSD68's first N, or N synthetic ones)
    image_side: int  # side of the synthetic images
    subimage: int  # sub-image side of the shards (the extract stage uses 192)
    crop: int
    batch: int
    threads: int  # DALI threads = DataLoader workers = torch threads of the loop
    parity_levels: tuple[float, ...]
    parity_batches: int
    loader_seconds: float
    loader_rounds: int
    loader_warmup: int
    train_generator: str
    train_iterations: int
    train_warmup: int
    train_window: int
    ray_generator: str
    ray_cpus: int
    sync_discriminator: str
    sync_batch: int  # global batch of the 2-rank SyncBatchNorm check (each rank: half)
    inference_config: str
    inference_size: int
    inference_repeats: int
    inference_paths: tuple[str, ...]


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


GPU_SIZES = Sizes(
    images=24,
    image_side=384,
    subimage=192,
    crop=64,
    batch=16,
    threads=_threads(),
    parity_levels=(0.0, 0.1, 0.5, 1.0, 2.0, 3.7, 4.0),
    parity_batches=2,
    loader_seconds=4.0,
    loader_rounds=2,
    loader_warmup=5,
    train_generator="authors",
    train_iterations=40,
    train_warmup=10,
    train_window=10,
    ray_generator="authors",
    ray_cpus=min(4, _threads()),
    sync_discriminator="authors",
    sync_batch=8,
    inference_config="authors",
    inference_size=512,
    inference_repeats=5,
    inference_paths=("eager", "channels_last", "bf16", "bf16_channels_last", "onnx", "compile"),
)
DRY_SIZES = Sizes(
    images=6,
    image_side=96,
    subimage=48,
    crop=16,
    batch=4,
    threads=1,
    parity_levels=(0.0, 0.7, 4.0),
    parity_batches=1,
    loader_seconds=0.3,
    loader_rounds=1,
    loader_warmup=1,
    train_generator="tiny",
    train_iterations=4,
    train_warmup=2,
    train_window=2,
    ray_generator="tiny",
    ray_cpus=1,
    sync_discriminator="tiny",
    sync_batch=4,
    inference_config="tiny",  # under the chooser's MIN_PARAMETERS: its rules, no probe
    inference_size=32,
    inference_repeats=1,
    inference_paths=("eager", "channels_last", "bf16", "bf16_channels_last", "onnx", "compile"),
)


@dataclass(frozen=True)
class CheckConfig:
    """What a part's process needs (written as JSON next to the work by the driver)."""

    dry_run: bool
    cuda: bool
    gpus: int
    work: str
    params: str
    shards: dict[str, str]
    sizes: Sizes
    driver: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckConfig:
        sizes = dict(data["sizes"])
        for key in ("parity_levels", "inference_paths"):
            sizes[key] = tuple(sizes[key])
        return cls(**{**data, "sizes": Sizes(**sizes)})


# ---------------------------------------------------------------------------------------------
# the environment


def _dist_version(prefix: str) -> str | None:
    """Version of the installed distribution whose name starts with ``prefix`` (DALI's wheel
    is named after its CUDA build: nvidia-dali-cuda120...), with that name."""
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == prefix or name.startswith(prefix + "-"):
            return dist.version if name == prefix else f"{dist.version} ({name})"
    return None


def driver_version() -> str | None:
    """The NVIDIA driver (nvidia-smi), else None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment(driver: str | None) -> dict[str, Any]:
    """The device and the versions that decide what the figures mean."""
    import torch

    from pipeline.inference import cpu_features

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu: {cpu_features()['model']}",
        "cuda_available": cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": driver,
        "torch": torch.__version__,
        "dali": _dist_version("nvidia-dali"),
        "ray": _dist_version("ray"),
        "onnxruntime": _dist_version("onnxruntime"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


# ---------------------------------------------------------------------------------------------
# the data: one set of shards for every part


def synthetic_images(count: int, side: int) -> list[np.ndarray]:
    """``count`` distinct deterministic photo-like images: the inference chooser's probe
    image (pipeline/inference/choice.py), rolled, flipped and with its channels permuted."""
    from pipeline.inference.choice import probe_image

    base = probe_image(side)
    orders = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))
    out = []
    for i in range(count):
        image = np.roll(base, (i * side // 7, i * side // 5), axis=(0, 1))[..., orders[i % 6]]
        out.append(np.ascontiguousarray(image[:, ::-1] if i % 2 else image))
    return out


def build_data(images: Path | None, work: Path, sizes: Sizes) -> dict[str, Any]:
    """Raw and PNG shards of the same sub-images (benchmarks/loader.py's ``build_shards``)."""
    from PIL import Image

    from benchmarks.loader import build_shards

    source = work / "images"
    source.mkdir(parents=True, exist_ok=True)
    if images is not None:
        files = sorted(
            p for p in images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}
        )[: sizes.images]
        if not files:
            raise ValueError(f"no images in {images}")
        for f in files:
            (source / f.name).symlink_to(f.resolve())
        described = f"{len(files)} images of {images}"
    else:
        for i, array in enumerate(synthetic_images(sizes.images, sizes.image_side)):
            Image.fromarray(array).save(source / f"synthetic{i:02d}.png", compress_level=1)
        described = f"{sizes.images} synthetic {sizes.image_side}px images"
    shards = {}
    count = 0
    for encoding in ("raw", "png"):
        shards[encoding] = str(work / f"shards-{encoding}")
        count = build_shards(source, Path(shards[encoding]), sizes.subimage, encoding)
    return {
        "images": described,
        "subimage_size": sizes.subimage,
        "samples": count,
        "shards": shards,
    }


# ---------------------------------------------------------------------------------------------
# a part's figures and checks


def plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def part_status(checks: list[dict[str, Any]]) -> tuple[str, str]:
    """A part's status from its checks: fail if any failed, skip if none was decided (all
    skipped), else pass; and the one-line reason."""
    failed = [c for c in checks if c["status"] == FAIL]
    skipped = [c for c in checks if c["status"] == SKIP]
    if failed:
        c = failed[0]
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        return FAIL, f"{c['name']} = {c['value']} (want {c['limit']}){more}"
    if not checks:
        return FAIL, "no checks were made"
    if len(skipped) == len(checks):
        return SKIP, f"every check skipped: {skipped[0]['reason']}"
    passed = len(checks) - len(skipped)
    return PASS, f"{passed} checks passed" + (f", {len(skipped)} skipped" if skipped else "")


class PartRun:
    """A running part: its figures and checks, saved (atomically) as it goes, so that a part
    stopped at its time limit still reports what it measured."""

    def __init__(self, name: str, config: CheckConfig, result: Path) -> None:
        self.name, self.config, self.result = name, config, result
        self.figures: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []
        self.environment = environment(config.driver)
        self.t0 = time.perf_counter()

    @property
    def work(self) -> Path:
        path = Path(self.config.work) / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def sizes(self) -> Sizes:
        return self.config.sizes

    @property
    def cuda(self) -> bool:
        return self.config.cuda

    def check(self, name: str, value: Any, ok: bool, limit: str) -> bool:
        """A decided check: pass when ``ok``."""
        status = PASS if ok else FAIL
        reason = f"{value} (want {limit})"
        self.checks.append(
            {
                "name": name,
                "status": status,
                "value": plain(value),
                "limit": limit,
                "reason": reason,
            }
        )
        return bool(ok)

    def skip(self, name: str, reason: str, value: Any = None, limit: str = "") -> None:
        """A check that cannot be decided here, and why (the observed value, if any, kept)."""
        self.checks.append(
            {"name": name, "status": SKIP, "value": plain(value), "limit": limit, "reason": reason}
        )

    def cuda_check(self, name: str, value: Any, ok: bool, limit: str, dry_value: str) -> None:
        """A check only a CUDA run decides; in the dry run it is skipped, saying what the CPU
        stand-in was (``dry_value``)."""
        if self.cuda:
            self.check(name, value, ok, limit)
        else:
            self.skip(name, f"CUDA only: the CPU dry run has {dry_value}", value, limit)

    def save(self, status: str = "running", reason: str = "") -> None:
        atomic_write_json(
            self.result,
            {
                "status": status,
                "reason": reason,
                "seconds": round(time.perf_counter() - self.t0, 2),
                "environment": self.environment,
                "figures": plain(self.figures),
                "checks": self.checks,
            },
        )

    def finish(self, err: BaseException | None) -> None:
        if err is not None:
            self.save(FAIL, f"{type(err).__name__}: {one_line(err)}")
        else:
            self.save(*part_status(self.checks))


def argv(**options: Any) -> list[str]:
    """``--name value`` pairs for a command line (``batch_size`` -> ``--batch-size``)."""
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
