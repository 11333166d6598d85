"""``loader.backend: auto``: which training loader a rank builds, decided once per machine.

The rule, in order:

1. ``dali`` or ``torch`` set explicitly: that one.
2. DALI is not installed: ``torch`` (the fallback needs nothing beyond PyTorch).
3. DALI's pipeline would run on a GPU (``loader.device: gpu``, or ``auto`` with a CUDA target
   device): ``dali`` -- decoding, blur, noise and quantisation then run on the GPU, where the
   torch loader would degrade on CPU worker processes.
4. DALI's pipeline would run on the CPU: a short **probe** times both loaders on this rank's
   shards (one warm-up batch each, then interleaved rounds of a few batches, the best round per
   loader) and picks DALI only if it delivered more patches per second than the torch loader.

Why a probe rather than a rule of thumb: which CPU path wins depends on the CPU (SIMD width,
core count, what else runs) and on the shard encoding, and it has flipped as the loaders
changed (issue 12: DALI CPU 0.76x the torch loader on a 2-core Xeon with PNG shards). The
result is cached in ``$CUGAN_CACHE_DIR/loader-backend.json`` (default ``~/.cache/cugan``), keyed
by the machine (CPU model, usable CPUs), the library versions (torch, DALI) and the loader setup
(crop, batch, threads, prefetch, kernel, sampling, shard encoding and sub-image size): later runs
and the other ranks on this machine reuse it without measuring, and an exclusive lock on the
cache makes concurrent ranks wait for one probe, so all ranks of a machine agree. Delete the
entry (or the file) to measure again; pin ``loader.backend`` for runs that must not depend on a
measurement (the backends draw different random streams).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write_json
from pipeline.config import Params
from pipeline.data.batch import ShardSet, TrainLoader

__all__ = [
    "BackendChoice",
    "cache_path",
    "choose_backend",
    "dali_available",
    "probe_key",
    "probe_rates",
]

log = logging.getLogger(__name__)

CACHE_NAME = "loader-backend.json"
DALI_DIST = "nvidia-dali-cuda120"  # the pinned wheel (pyproject.toml)
_CACHE_VERSION = 1


@dataclass(frozen=True)
class BackendChoice:
    """The backend a rank builds (``dali`` or ``torch``) and why, in one line."""

    name: str
    reason: str


def dali_available() -> bool:
    """Whether the ``nvidia-dali`` wheel is importable (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no "nvidia" namespace package at all
        return False


def cache_path() -> Path:
    """``$CUGAN_CACHE_DIR/loader-backend.json``, else ``~/.cache/cugan/loader-backend.json``."""
    root = os.environ.get("CUGAN_CACHE_DIR") or "~/.cache/cugan"
    return Path(root).expanduser() / CACHE_NAME


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def probe_key(params: Params, shards: ShardSet) -> dict[str, Any]:
    """What a probe's result depends on (the cache key, also stored beside the result)."""
    cfg, deg = params.loader, params.degradation
    return {
        "cpu": _cpu_model(),
        "usable_cpus": _usable_cpus(),
        "torch": torch.__version__,
        "dali": _version(DALI_DIST),
        "crop": cfg.crop,
        "batch_size": cfg.batch_size,
        "num_threads": cfg.num_threads,
        "prefetch": cfg.prefetch,
        "kernel_size": deg.kernel_size,
        "sampling": deg.sampling,
        "encoding": shards.encoding,
        "sub_size": shards.crop_size,
    }


def _endless(loader: TrainLoader) -> Iterator[Any]:
    while True:
        yield from loader


def probe_rates(
    build: Callable[[str], TrainLoader],
    names: tuple[str, ...] = ("torch", "dali"),
    *,
    batches: int = 6,
    rounds: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Patches per second of each backend ``build(name)`` makes: one warm-up batch each (DALI's
    build and buffer fill, the workers' start), then ``rounds`` interleaved rounds of
    ``batches`` batches; the best round per backend (the one least disturbed by other load)."""
    streams: dict[str, Iterator[Any]] = {}
    loaders: dict[str, TrainLoader] = {}
    best = dict.fromkeys(names, 0.0)
    try:
        for name in names:
            loaders[name] = build(name)
            streams[name] = _endless(loaders[name])
            next(streams[name])
        for _ in range(rounds):
            for name in names:
                start = clock()
                for _ in range(batches):
                    next(streams[name])
                elapsed = max(clock() - start, 1e-9)
                best[name] = max(best[name], batches * loaders[name].batch_size / elapsed)
    finally:
        for stream in streams.values():
            stream.close()  # ends the torch loader's DataLoader workers
        for loader in loaders.values():
            loader.close()
    return best


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring the unreadable loader-backend cache %s (%s)", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def choose_backend(
    params: Params,
    shards: ShardSet,
    target: torch.device,
    build: Callable[[str], TrainLoader],
    *,
    cache: Path | None = None,
    probe: Callable[[Callable[[str], TrainLoader]], dict[str, float]] = probe_rates,
) -> BackendChoice:
    """The backend for ``params.loader.backend`` (see the module docstring); logs the choice.

    ``build(name)`` makes a loader of that backend for this rank (used only by the probe);
    ``target`` is where batches go (already resolved by :func:`pipeline.device.resolve_device`).
    """
    cfg = params.loader
    if cfg.backend != "auto":
        return BackendChoice(cfg.backend, "set by loader.backend")
    choice = _choose_auto(params, shards, target, build, cache or cache_path(), probe)
    log.info("loader.backend auto -> %s: %s", choice.name, choice.reason)
    return choice


def _choose_auto(
    params: Params,
    shards: ShardSet,
    target: torch.device,
    build: Callable[[str], TrainLoader],
    cache: Path,
    probe: Callable[[Callable[[str], TrainLoader]], dict[str, float]],
) -> BackendChoice:
    cfg = params.loader
    if not dali_available():
        return BackendChoice("torch", "DALI (nvidia-dali) is not installed")
    if cfg.device == "gpu" or (cfg.device == "auto" and target.type == "cuda"):
        return BackendChoice("dali", f"DALI's pipeline runs on the GPU ({target})")
    key_fields = probe_key(params, shards)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    with _locked(cache):
        entries = _read_cache(cache)
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("backend") in ("dali", "torch"):
            return BackendChoice(entry["backend"], f"{entry['reason']} (cached in {cache})")
        log.info("loader.backend auto: probing the DALI and torch loaders on the CPU")
        rates = probe(build)
        name = "dali" if rates["dali"] > rates["torch"] else "torch"
        reason = (
            f"CPU pipeline; probe on this machine: dali {rates['dali']:.0f}, "
            f"torch {rates['torch']:.0f} patches/s"
        )
        entries[key] = {
            "backend": name,
            "reason": reason,
            "rates": rates,
            "key": key_fields,
            "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_json(cache, {"version": _CACHE_VERSION, "entries": entries})
    return BackendChoice(name, reason)
