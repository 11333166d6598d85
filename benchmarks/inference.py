"""Inference speed of the generator: eager fp32 against every faster path we can offer.

    .venv/bin/python benchmarks/inference.py --size 512 --repeats 10 --threads 2 \
        --json bench-results/inference.json

Measures milliseconds per image (batch 1, ``size x size``, the ``authors`` config by default)
for each path, all under ``torch.inference_mode``:

* ``eager``          fp32, contiguous (NCHW): the baseline every ratio refers to;
* ``channels_last``  fp32, NHWC memory format for weights and input;
* ``compile``        ``torch.compile`` (inductor; on the CPU it generates C++/OpenMP code, so it
                     needs a C++ compiler). Its one-off compile time is reported separately;
* ``bf16``           ``torch.autocast`` to bfloat16 (CPU: oneDNN, fast with AVX512-BF16/AMX;
                     CUDA: tensor cores);
* ``bf16_channels_last``  the two above together (oneDNN prefers NHWC for bf16 convs);
* ``onnxruntime``    exported with ``torch.onnx.export`` (TorchScript exporter, dynamic H and W),
                     run by ONNX Runtime (CPU execution provider; CUDA EP when installed and
                     ``--device cuda``). Export + session creation are reported as setup time.

Weights are RANDOM (seeded) unless ``--model PATH`` names a checkpoint: speed does not depend on
them, but a random model is close to the identity (the 0.1-scaled init), so its 8-bit outputs
hide most numerical differences; the float column shows them, and a trained checkpoint gives the
differences that matter. Each path's output is compared with eager fp32 as floats (max absolute
difference in grey levels) and after quantising to 8 bits as the CLI writes it (max absolute
difference and PSNR; inf = identical).
The input is a CBSD68 image (../shared/datasets/CBSD68, replicate-padded/cropped to the size)
when present, else a smooth synthetic image with noise.

Timing: ``--warmup`` untimed runs, then ``--repeats`` timed runs; the median is reported. The
numbers are only comparable within one run (same machine, same load). Timed work happens in
this script, not in tests.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.registry import build_generator
from pipeline.degradation import to_tensor, to_uint8
from pipeline.imageio import ImageError, read_rgb8

log = logging.getLogger("benchmarks.inference")

ALL_PATHS = ("eager", "channels_last", "compile", "bf16", "bf16_channels_last", "onnxruntime")
CBSD68 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "CBSD68"
# What a failing optional path may raise (a missing compiler, an exporter limitation, an
# execution provider that is not installed); anything else is a bug and propagates.
_PATH_FAILURES = (RuntimeError, OSError, ImportError, ValueError, NotImplementedError, TypeError)


@dataclass
class PathResult:
    name: str
    ms_median: float | None = None
    ms_runs: list[float] = field(default_factory=list)
    setup_s: float | None = None  # compile / export + session time (first call for compile)
    speedup: float | None = None  # eager median / this median
    max_abs_diff: int | None = None  # 8-bit output vs eager fp32
    float_max_abs: float | None = None  # float output vs eager fp32, in grey levels (x 255)
    psnr_db: float | None = None
    note: str = ""
    error: str | None = None


Runner = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# input


def _test_image(size: int) -> tuple[np.ndarray, str]:
    files = sorted(CBSD68.glob("*.png")) if CBSD68.is_dir() else []
    if files:
        try:
            img = read_rgb8(files[0]).array
        except ImageError as err:
            log.warning("cannot read %s (%s); using a synthetic image", files[0], err)
        else:
            t = to_tensor(img)
            h, w = t.shape[-2:]
            t = F.pad(t, (0, max(0, size - w), 0, max(0, size - h)), mode="replicate")
            return to_uint8(
                t[..., :size, :size]
            ), f"{files[0].name} (CBSD68, padded/cropped to {size})"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], axis=2) * 0.35 + 0.5
    noisy = base + rng.normal(0, 0.05, base.shape)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8), "synthetic (no CBSD68 found)"


# ---------------------------------------------------------------------------------------------
# paths: each returns (runner, setup seconds, note)


def _eager(model, device, x, z) -> tuple[Runner, float, str]:
    return model, 0.0, ""


def _channels_last(model, device, x, z) -> tuple[Runner, float, str]:
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return (lambda a, b: m(a.contiguous(memory_format=torch.channels_last), b)), 0.0, ""


def _compile(model, device, x, z) -> tuple[Runner, float, str]:
    compiled = torch.compile(copy.deepcopy(model))
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(x, z)  # compilation happens on the first call
        _sync(device)
    return compiled, time.perf_counter() - start, "inductor, default mode"


def _bf16(model, device, x, z) -> tuple[Runner, float, str]:
    def run(a: Tensor, b: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(a, b).float()

    return run, 0.0, f"torch.autocast({device.type!r}, bfloat16)"


def _bf16_channels_last(model, device, x, z) -> tuple[Runner, float, str]:
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def run(a: Tensor, b: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return m(a.contiguous(memory_format=torch.channels_last), b).float()

    return run, 0.0, "autocast bfloat16 + NHWC"


def _onnxruntime(model, device, x, z, threads: int) -> tuple[Runner, float, str]:
    import onnxruntime as ort

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generator.onnx"
        cpu_model = copy.deepcopy(model).cpu()
        with warnings.catch_warnings():
            # The shape checks in Generator.forward are traced as constants, which is right for
            # any H, W that are multiples of size_multiple; the legacy exporter warns about it.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                cpu_model,
                (x.cpu(), z.cpu()),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["x", "z"],
                output_names=["y"],
                dynamic_axes={"x": {2: "height", 3: "width"}, "y": {2: "height", 3: "width"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(path), options, providers=providers)
    setup = time.perf_counter() - start
    used = session.get_providers()[0]

    def run(a: Tensor, b: Tensor) -> Tensor:
        out = session.run(None, {"x": a.cpu().numpy(), "z": b.cpu().numpy()})[0]
        return torch.from_numpy(out)

    note = f"{used}, dynamic H/W, opset 17"
    if device.type == "cuda" and used == "CPUExecutionProvider":
        note += " (no CUDA EP installed: ran on the CPU)"
    return run, setup, note


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# measurement


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images via pipeline.metrics.psnr (RGB, no border crop)."""
    from pipeline.metrics import psnr

    value = float(psnr(to_tensor(a), to_tensor(b))[0])
    return math.inf if not math.isfinite(value) else value


def _time(
    run: Runner, x: Tensor, z: Tensor, device: torch.device, warmup: int, repeats: int
) -> tuple[list[float], Tensor]:
    with torch.inference_mode():
        for _ in range(warmup):
            out = run(x, z)
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run(x, z)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    return times, out


def run_benchmark(
    *,
    config: str = "authors",
    size: int = 512,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    paths: tuple[str, ...] = ALL_PATHS,
    device: str = "cpu",
    seed: int = 0,
    model_path: str | None = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dev = torch.device(device)
    if model_path:
        from pipeline.inference import load_model_for_inference

        model = load_model_for_inference(model_path).model.to(dev)
        weights, config = f"trained ({model_path})", "checkpoint"
    else:
        model = build_generator(config, generator=torch.Generator().manual_seed(seed))
        model = model.eval().to(dev)
        weights = f"random (seed {seed})"
    m = model.size_multiple
    if size % m:
        raise ValueError(f"--size must be a multiple of {m} for config {config!r}")
    image, source = _test_image(size)
    x = to_tensor(image).to(dev)
    z = torch.tensor([[0.5, 0.6]], device=dev)  # blur 2, noise 30

    makers: dict[str, Callable] = {
        "eager": _eager,
        "channels_last": _channels_last,
        "compile": _compile,
        "bf16": _bf16,
        "bf16_channels_last": _bf16_channels_last,
        "onnxruntime": lambda *a: _onnxruntime(*a, threads=threads),
    }
    order = ["eager"] + [p for p in paths if p != "eager"]  # the baseline always runs first
    results: list[PathResult] = []
    reference: np.ndarray | None = None
    reference_float: Tensor | None = None
    base_ms: float | None = None
    for name in order:
        res = PathResult(name)
        log.info("path %s ...", name)
        try:
            runner, setup, note = makers[name](model, dev, x, z)
            times, out = _time(runner, x, z, dev, warmup, repeats)
        except _PATH_FAILURES as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            res.error = f"{type(err).__name__}: {first}"
            log.warning("path %s failed: %s", name, res.error)
            results.append(res)
            continue
        res.ms_runs = [round(t, 3) for t in times]
        res.ms_median = statistics.median(times)
        res.setup_s = setup if setup else None
        res.note = note
        out = out.float().cpu()
        restored = to_uint8(out)
        if reference is None:
            reference, reference_float, base_ms = restored, out, res.ms_median
        res.float_max_abs = float((out - reference_float).abs().max()) * 255.0
        res.speedup = base_ms / res.ms_median
        res.max_abs_diff = int(np.abs(restored.astype(int) - reference.astype(int)).max())
        res.psnr_db = _psnr(restored, reference)
        results.append(res)

    return {
        "config": config,
        "weights": weights,
        "size": size,
        "batch": 1,
        "image": source,
        "z": [0.5, 0.6],
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
        "results": [asdict(r) for r in results],
    }


def format_table(report: dict) -> str:
    head = (
        f"{report['config']} generator, {report['size']}x{report['size']}, batch 1, "
        f"{report['weights']} weights, device {report['device']}, {report['threads']} threads, "
        f"torch {report['torch']}, median of {report['repeats']} (after {report['warmup']} warm-up)"
    )
    rows = [("path", "ms", "x eager", "setup s", "float max|d|", "8-bit max|d|", "PSNR dB", "note")]
    for r in report["results"]:
        if r["error"]:
            rows.append((r["name"], "-", "-", "-", "-", "-", "-", f"FAILED {r['error']}"))
            continue
        psnr = "inf" if r["psnr_db"] == math.inf else f"{r['psnr_db']:.2f}"
        rows.append(
            (
                r["name"],
                f"{r['ms_median']:.1f}",
                f"{r['speedup']:.2f}",
                f"{r['setup_s']:.1f}" if r["setup_s"] else "-",
                f"{r['float_max_abs']:.3g}",
                str(r["max_abs_diff"]),
                psnr,
                r["note"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    lines = [
        head,
        (
            f"input: {report['image']}; differences vs eager fp32 in grey levels (0..255): float "
            "output, then the 8-bit output the CLI writes (and its PSNR)"
        ),
    ]
    for row in rows:
        cells = (
            [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 7)] + [row[7]]
        )
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/inference.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", default="authors", help="generator config name (default authors)"
    )
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per path (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per path (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch / ORT intra-op threads")
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="trained checkpoint instead of random weights (makes the differences meaningful)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(ALL_PATHS),
        help=f"comma-separated subset of {','.join(ALL_PATHS)} (eager always runs)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the report as JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    unknown = sorted(set(paths) - set(ALL_PATHS))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {','.join(ALL_PATHS)}")
    if args.repeats < 1 or args.warmup < 0 or args.size < 1:
        parser.error("--repeats must be >= 1, --warmup >= 0, --size >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    try:
        report = run_benchmark(
            config=args.config,
            size=args.size,
            repeats=args.repeats,
            warmup=args.warmup,
            threads=args.threads,
            paths=paths,
            device=args.device,
            model_path=args.model,
        )
    except ValueError as err:  # unknown config, bad checkpoint (CheckpointError), bad size
        parser.error(str(err))
    report["command"] = " ".join(
        ["benchmarks/inference.py", *(argv if argv is not None else sys.argv[1:])]
    )
    sys.stdout.write(format_table(report) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from pipeline.atomic import atomic_write_json

        # JSON has no infinity: an identical output's PSNR is written as the string "inf".
        for r in report["results"]:
            if r["psnr_db"] == math.inf:
                r["psnr_db"] = "inf"
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    sys.exit(main())
