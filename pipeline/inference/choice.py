"""Which inference path to run, on the machine it runs on: capability rules, a probe, a cache.

No path is fastest everywhere (README, Benchmarks): on a Xeon with AMX-BF16, bf16 + NHWC was
6.8x eager; on one with AVX-512 only, bf16 was 0.45x and NHWC 1.9x. So :func:`choose_path`
decides per machine, in this order:

1. **Requests.** ``backend`` / ``precision`` other than ``auto`` (``cugan restore --backend
   --precision``) restrict the candidates; both given: that path, no probe.
2. **Capability rules** (no measuring): bf16 only where the hardware has bf16 arithmetic (CPU
   flags ``amx_bf16`` or ``avx512_bf16``; a GPU that supports bf16) -- elsewhere it is emulated
   and slower; ``compile`` only for a workload of at least :data:`COMPILE_MIN_IMAGES` images (a
   cold compile costs tens of seconds, which a one-shot ``cugan restore`` never recovers);
   ``onnx`` only where ONNX Runtime imports (and has a CUDA provider, on a GPU); models under
   :data:`MIN_PARAMETERS` parameters and non-float32 models run eager (nothing to gain).
3. **The probe**, once per cache key: every candidate is built (its setup time measured) and
   run on a deterministic probe image (:data:`PROBE_SIZE` square) through the restore path,
   in :data:`PROBE_ROUNDS` interleaved rounds after a warm-up; the minimum time of each (the
   least disturbed by other load) and its 8-bit difference from eager are kept. Cached in
   ``<user cache dir>/cugan/inference-paths.json`` (``$CUGAN_CACHE_DIR`` overrides the
   directory), written atomically, under a key of: CPU model and its relevant flags (or the
   GPU's name), torch and onnxruntime versions, torch threads, device, dtype and the model
   config. A new machine, library version or model config probes again.
4. **Exactness.** fp32 paths must give eager's 8-bit output; they may differ only where float
   reassociation (another summation order in the convolutions) moves a value across a
   quantisation boundary, by 1 level (tests/test_inference_paths.py bounds how often). A fp32
   path with a larger difference on the probe is dropped. bf16 is kept only if it would be
   chosen on speed AND, on THIS model's weights (a trained checkpoint, not random ones), its
   8-bit output on a probe image of :data:`VERDICT_SIZE` px at two conditions is within
   :data:`BF16_TOLERANCE` of eager fp32's: max |diff| <= 1 level and at most 0.1 % of the
   values differing. The verdict is cached per weights digest.
5. **Cost.** Each remaining path costs ``setup + images x time per image`` for the caller's
   :class:`Workload` (time scaled from the probe by pixel count); the cheapest wins. So a
   one-shot call of one image does not pay an ONNX export that only many images recover.

The chosen path and the reason are logged once per choice (INFO).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.generator import Generator
from pipeline.degradation import to_tensor, to_uint8
from pipeline.inference.errors import PathUnavailable
from pipeline.inference.geometry import pad_to_multiple, round_up, run_pieces
from pipeline.inference.paths import ALL_PATHS, Backend, PathSpec, Precision, build_path

__all__ = [
    "BF16_TOLERANCE",
    "COMPILE_MIN_IMAGES",
    "MIN_PARAMETERS",
    "Measurement",
    "PathChoice",
    "Tolerance",
    "Workload",
    "cache_dir",
    "cache_file",
    "choose_path",
    "cpu_features",
    "machine_key",
    "probe_image",
    "probe_paths",
    "timed_pass",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
#: The timing probe's side. 128 px was too small to rank the paths: there per-call overheads
#: hide what a path saves on real images (measured, authors G, 2-core Xeon: eager, channels_last
#: and onnx within 4 % of each other at 128 px, 1.00 / 1.35 / 1.78x at 512 px; 1.31 / 1.42x
#: at 256 px already orders them as at 512).
PROBE_SIZE = 256
PROBE_ROUNDS = 3
#: The bf16 verdict's image side: a property of the weights (how often bf16 rounding crosses
#: an 8-bit boundary), not of the speed, so the smaller image answers it at a quarter the cost.
VERDICT_SIZE = 128
#: Smaller models run eager without a probe: a faster path cannot save what the probe costs.
MIN_PARAMETERS = 100_000
#: ``compile`` is a candidate only for workloads of at least this many images.
COMPILE_MIN_IMAGES = 200
#: CPU flags that mean native bf16 arithmetic (oneDNN uses them for bf16 convolutions).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: CPU flags recorded in the cache key (the ones oneDNN / ONNX Runtime dispatch on).
KEY_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
#: Conditions the probe image is restored at (z; a blur/noise mix, and strong noise).
PROBE_Z = ((0.25, 0.3), (0.5, 0.6))


@dataclass(frozen=True)
class Tolerance:
    """How far a non-exact path's 8-bit output may be from eager fp32's."""

    max_level_diff: int
    max_differing_share: float

    def accepts(self, max_diff: int, share: float) -> bool:
        return max_diff <= self.max_level_diff and share <= self.max_differing_share

    def describe(self) -> str:
        return (
            f"max |diff| <= {self.max_level_diff} level, <= {100 * self.max_differing_share:g} "
            "% of values differing"
        )


BF16_TOLERANCE = Tolerance(max_level_diff=1, max_differing_share=0.001)
#: fp32 paths: float reassociation moves a value across a quantisation boundary by 1 at most.
FP32_TOLERANCE = Tolerance(max_level_diff=1, max_differing_share=0.001)


@dataclass(frozen=True)
class Workload:
    """What the caller will restore with the chosen path: ``images`` of ``pixels`` each.

    ``cugan restore``: :meth:`one_shot` (1 image, then the process exits); evaluation, figures,
    training validation: a library call (:data:`LIBRARY_IMAGES`); the studio: :meth:`service`.
    """

    images: int
    pixels: int

    @classmethod
    def one_shot(cls, pixels: int, images: int = 1) -> Workload:
        return cls(images=images, pixels=pixels)

    @classmethod
    def library(cls, pixels: int) -> Workload:
        return cls(images=LIBRARY_IMAGES, pixels=pixels)

    @classmethod
    def service(cls, pixels: int = 512 * 512) -> Workload:
        return cls(images=SERVICE_IMAGES, pixels=pixels)


#: A library caller (``restore`` given a plain generator) is assumed to restore this many.
LIBRARY_IMAGES = 32
#: A long-lived service (the studio) amortises any setup.
SERVICE_IMAGES = 1000


@dataclass(frozen=True)
class Measurement:
    """One path on the probe: ms per probe image, setup s, 8-bit difference from eager."""

    name: str
    ms: float | None = None
    setup_s: float = 0.0
    max_8bit_diff: int | None = None
    differing_share: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class PathChoice:
    spec: PathSpec
    reason: str
    measurements: dict[str, Measurement] | None = None


# ---------------------------------------------------------------------------------------------
# the machine and the cache


@cache
def cpu_features() -> dict[str, Any]:
    """The CPU model and which of :data:`KEY_CPU_FLAGS` it has (Linux: /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine()):
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": sorted(f for f in KEY_CPU_FLAGS if f in flags)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_features()["model"]


def _ort_version() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.__version__


def machine_key(model: Generator, device: torch.device) -> dict[str, Any]:
    """What the cached measurements depend on (module docstring, step 3)."""
    return {
        "cache_version": CACHE_VERSION,
        "device": device.type,
        "device_name": _device_name(device),
        "cpu": cpu_features(),
        "torch": torch.__version__,
        "onnxruntime": _ort_version(),
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype),
        "config": model.config.to_dict(),
        "probe": [PROBE_SIZE, PROBE_ROUNDS],
    }


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """The user's cache directory of this project: ``$CUGAN_CACHE_DIR``, else the platform's
    (``~/.cache/cugan`` on Linux). The path measurements live here, and the registered models
    the inference loader downloads (:mod:`pipeline.inference.loading`)."""
    root = os.environ.get("CUGAN_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("cugan", appauthor=False)
    return Path(root)


def cache_file() -> Path:
    """``inference-paths.json`` in :func:`cache_dir`."""
    return cache_dir() / "inference-paths.json"


def _read_cache() -> dict[str, Any]:
    path = cache_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the inference path cache %s (%s)", path, err)
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(update: dict[str, Any]) -> None:
    """Merge ``update`` (key id -> entry) into the cache file, atomically; a cache that cannot
    be written only costs a probe next time."""
    from pipeline.atomic import atomic_write_json

    data = _read_cache()
    entries = data.get("entries", {})
    entries.update(update)
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file(), {"version": CACHE_VERSION, "entries": entries})
    except OSError as err:
        log.warning("cannot write the inference path cache %s (%s)", cache_file(), err)


# ---------------------------------------------------------------------------------------------
# the probe


def probe_image(size: int = PROBE_SIZE) -> np.ndarray:
    """A deterministic photo-like uint8 image: smooth shading, edges, texture and noise."""
    rng = np.random.default_rng(20240601)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack(
        [np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy)) * np.cos(9 * xx)], axis=2
    )
    base = 0.5 + 0.3 * base
    base[size // 4 : size // 2, size // 5 : size // 2] = (0.9, 0.2, 0.1)  # a hard-edged patch
    base += 0.08 * np.sign(np.sin(40 * xx))[..., None] * (yy > 0.6)[..., None]  # fine stripes
    noisy = base + rng.normal(0.0, 15 / 255, base.shape)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)


def _probe_inputs(model: Generator, device: torch.device, side: int = PROBE_SIZE):
    size = round_up(side, model.size_multiple)
    x = pad_to_multiple(to_tensor(probe_image(size)), model.size_multiple)
    zs = [torch.tensor([z], dtype=torch.float32) for z in PROBE_Z]
    return x, (zs if model.config.conditional else [None])


def timed_pass(path, model: Generator, x, z, device: torch.device) -> tuple[torch.Tensor, float]:
    """One untiled pass of ``path`` over a padded CPU tensor, as :func:`restore` runs it: the
    float32 CPU output and the milliseconds it took (the probe's and the benchmark's timer)."""
    start = time.perf_counter()
    out = run_pieces(
        path,
        x,
        z,
        out_channels=model.config.out_channels,
        multiple=model.size_multiple,
        tile=None,
        overlap=0,
        device=device,
        dtype=path.input_dtype,
    )
    return out, (time.perf_counter() - start) * 1e3  # .cpu() in run_pieces synchronised


def _restore_with(path, model: Generator, x, z, device) -> tuple[np.ndarray, float]:
    out, ms = timed_pass(path, model, x, z, device)
    return to_uint8(out), ms


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float((d != 0).mean())


def probe_paths(
    model: Generator, device: torch.device, specs: list[PathSpec], *, rounds: int = PROBE_ROUNDS
) -> dict[str, Measurement]:
    """Measure ``specs`` (and eager, the reference) on the probe image (module docstring)."""
    x, zs = _probe_inputs(model, device)
    z = zs[-1]
    example = (x.to(device), None if z is None else z.to(device))
    built, errors = {}, {}
    for spec in [PathSpec(Backend.EAGER)] + [s for s in specs if s.name != "eager"]:
        try:
            built[spec.name] = build_path(model, spec, device, example=example)
        except PathUnavailable as err:
            errors[spec.name] = str(err)
            log.debug("probe: %s unavailable (%s)", spec.name, err)
    times: dict[str, list[float]] = {name: [] for name in built}
    outputs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for name, path in built.items():  # warm-up (oneDNN primitives, ORT arenas)
            outputs[name], _ = _restore_with(path, model, x, z, device)
        for _ in range(rounds):
            for name, path in built.items():
                times[name].append(_restore_with(path, model, x, z, device)[1])
    ref = outputs["eager"]
    result = {name: Measurement(name, error=err) for name, err in errors.items()}
    for name, path in built.items():
        worst, share = _diff(outputs[name], ref)
        result[name] = Measurement(name, min(times[name]), path.setup_s, worst, share)
    return result


# ---------------------------------------------------------------------------------------------
# rules


def _hardware_bf16(device: torch.device) -> str | None:
    """None if bf16 arithmetic is native here, else why not."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    flags = cpu_features()["flags"]
    if any(f in flags for f in BF16_CPU_FLAGS):
        return None
    return "no AMX-BF16/AVX512-BF16 on this CPU (bf16 would be emulated, slower than fp32)"


def _excluded(
    spec: PathSpec, device: torch.device, workload: Workload, backend: Backend, precision: Precision
) -> str | None:
    """Why a capability rule drops ``spec`` (None: it stays a candidate); a rule never
    overrides what was asked for explicitly."""
    if spec.precision is Precision.BF16 and precision is not Precision.BF16:
        why = _hardware_bf16(device)
        if why:
            return why
    compile_asked = backend is Backend.COMPILE
    if (
        spec.backend is Backend.COMPILE
        and not compile_asked
        and workload.images < COMPILE_MIN_IMAGES
    ):
        return f"a cold compile costs tens of seconds; only for >= {COMPILE_MIN_IMAGES} images"
    if spec.backend is Backend.ONNX and _ort_version() is None:
        return "onnxruntime is not installed"
    return None


def _weights_digest(model: Generator) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


_BF16_VERDICTS: dict[str, tuple[bool, str]] = {}


def bf16_verdict(model: Generator, device: torch.device, spec: PathSpec) -> tuple[bool, str]:
    """Is ``spec`` (a bf16 path) within :data:`BF16_TOLERANCE` of eager fp32 on THIS model's
    weights? Probe image at each of :data:`PROBE_Z`; cached per weights digest and machine."""
    key = f"{_weights_digest(model)}:{_key_id(machine_key(model, device))}:{spec.name}"
    if key in _BF16_VERDICTS:
        return _BF16_VERDICTS[key]
    x, zs = _probe_inputs(model, device, VERDICT_SIZE)
    eager = build_path(model, PathSpec(Backend.EAGER), device)
    candidate = build_path(model, spec, device)
    worst, share = 0, 0.0
    with torch.inference_mode():
        for z in zs:
            a, _ = _restore_with(eager, model, x, z, device)
            b, _ = _restore_with(candidate, model, x, z, device)
            d, s = _diff(a, b)
            worst, share = max(worst, d), max(share, s)
    ok = BF16_TOLERANCE.accepts(worst, share)
    text = (
        f"vs fp32 on these weights: max |diff| {worst} level(s), "
        f"{100 * share:.3g} % of values differ ({'within' if ok else 'outside'} "
        f"{BF16_TOLERANCE.describe()})"
    )
    _BF16_VERDICTS[key] = (ok, text)
    return ok, text


def _cost_s(m: Measurement, workload: Workload, probe_pixels: int) -> float:
    return m.setup_s + workload.images * (m.ms or 0.0) / 1e3 * workload.pixels / probe_pixels


def choose_path(
    model: Generator,
    device: torch.device,
    *,
    backend: Backend | str = Backend.AUTO,
    precision: Precision | str = Precision.AUTO,
    workload: Workload | None = None,
) -> PathChoice:
    """The path to restore with (module docstring). ``model`` is on ``device``, eval mode."""
    backend, precision = Backend(backend), Precision(precision)
    workload = workload or Workload.library(512 * 512)
    if backend is not Backend.AUTO and precision is not Precision.AUTO:
        return PathChoice(PathSpec(backend, precision), "requested")
    specs = [
        s
        for s in ALL_PATHS
        if backend in (Backend.AUTO, s.backend) and precision in (Precision.AUTO, s.precision)
    ]
    if not specs:
        raise ValueError(f"no inference path {backend.value} at {precision.value}")
    fp32 = next(model.parameters()).dtype == torch.float32
    small = sum(p.numel() for p in model.parameters()) < MIN_PARAMETERS
    if backend is Backend.AUTO and (small or not fp32):
        spec = PathSpec(Backend.EAGER, Precision.BF16 if precision is Precision.BF16 else "fp32")
        why = "a small model" if small else f"a {next(model.parameters()).dtype} model"
        return PathChoice(spec, f"{why}: nothing to gain from another path")
    dropped = {s.name: _excluded(s, device, workload, backend, precision) for s in specs}
    specs = [s for s in specs if dropped[s.name] is None]
    if len(specs) == 1:
        return PathChoice(specs[0], "the only candidate")
    measured = _measurements(model, device, specs)
    probe_pixels = round_up(PROBE_SIZE, model.size_multiple) ** 2
    costs = {}
    for spec in specs:
        m = measured.get(spec.name)
        if m is None or m.error or m.ms is None:
            dropped[spec.name] = m.error if m else "not measured"
        elif spec.exact and not FP32_TOLERANCE.accepts(m.max_8bit_diff, m.differing_share):
            dropped[spec.name] = f"differs from eager by {m.max_8bit_diff} levels on the probe"
        else:
            costs[spec.name] = (_cost_s(m, workload, probe_pixels), spec)
    # bf16 must earn its place on speed first, then pass the tolerance on these weights
    for name, (_cost, spec) in sorted(costs.items(), key=lambda kv: kv[1][0]):
        if spec.exact or precision is Precision.BF16:
            break
        ok, text = bf16_verdict(model, device, spec)
        if ok:
            break
        dropped[name] = text
        del costs[name]
    if not costs:
        raise PathUnavailable(f"no inference path could run here: {dropped}")
    name, (_cost, spec) = min(costs.items(), key=lambda kv: kv[1][0])
    eager = measured.get("eager")
    speed = f"{eager.ms / measured[name].ms:.2f}x eager" if eager and eager.ms else ""
    others = "; ".join(f"{n} {why}" for n, why in dropped.items() if why)
    reason = (
        f"{speed} on the probe ({measured[name].ms:.1f} ms, setup {measured[name].setup_s:.1f} s), "
        f"cheapest for {workload.images} image(s) of {workload.pixels / 1e6:.2f} MP"
        + (f"; not: {others}" if others else "")
    )
    return PathChoice(spec, reason, measured)


def _measurements(
    model: Generator, device: torch.device, specs: list[PathSpec]
) -> dict[str, Measurement]:
    """Cached measurements of ``specs`` for this key; the missing ones (and eager) probed."""
    key = machine_key(model, device)
    kid = _key_id(key)
    entry = _read_cache().get("entries", {}).get(kid, {})
    known = {n: Measurement(**m) for n, m in entry.get("paths", {}).items()}
    missing = [s for s in specs if s.name not in known]
    if missing or "eager" not in known:
        start = time.perf_counter()
        fresh = probe_paths(model, device, missing)
        known.update(fresh)
        log.info(
            "probed inference paths %s in %.1f s (cached in %s)",
            ", ".join(sorted(fresh)),
            time.perf_counter() - start,
            cache_file(),
        )
        _write_cache({kid: {"key": key, "paths": {n: asdict(m) for n, m in sorted(known.items())}}})
    return known
