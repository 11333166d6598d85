"""Part ``inference``: the inference table on CUDA through pipeline/inference's own paths and
chooser (benchmarks/inference.py's ``run_benchmark``): eager fp32, channels_last, bf16,
bf16_channels_last, onnx (where ONNX Runtime has the CUDA execution provider) and compile,
each with its ms and its 8-bit max |diff| against eager fp32; and fp16 autocast, which no
pipeline path offers, measured here to tell whether one would be worth adding.

Checks: every path ran; the fp32 paths stay within the chooser's own FP32_TOLERANCE of eager
(float reassociation moves a value by one grey level at most: if cuDNN's TF32 convolutions
break that, this check says so); the chooser's default is a measured path and, if it is a
reduced-precision one, within BF16_TOLERANCE. bf16/fp16 differences are figures, not checks
(the chooser decides per checkpoint whether bf16 is acceptable). In the dry run ``compile``
(a cold compile takes minutes on a CPU) and fp16 (CUDA autocast) are skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from benchmarks.gpu_check_parts.common import PartRun

log = logging.getLogger(__name__)

KEEP = ("ms", "x_eager", "max_abs_diff", "differing_share", "setup_s", "note", "error")


class _Fp16Autocast:
    """fp16 autocast around the eager module: the shape ``timed_pass`` expects of a path."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.input_dtype = next(model.parameters()).dtype

    def __call__(self, x: Any, z: Any) -> Any:
        import torch

        with torch.autocast("cuda", dtype=torch.float16):
            return self.model(x, z).float()


def _fp16_figures(config: str, size: int, repeats: int) -> dict[str, Any]:
    """fp16 autocast vs eager fp32 on the chooser's probe image: ms and 8-bit differences."""
    import torch

    from models.registry import build_generator
    from pipeline.degradation import to_tensor, to_uint8
    from pipeline.inference.choice import probe_image, timed_pass
    from pipeline.inference.geometry import pad_to_multiple

    dev = torch.device("cuda")
    model = build_generator(config, generator=torch.Generator().manual_seed(0)).eval().to(dev)
    x = pad_to_multiple(to_tensor(probe_image(size)), model.size_multiple)
    z = torch.tensor([[0.5, 0.6]])
    fp16 = _Fp16Autocast(model)
    times: dict[str, list[float]] = {"eager": [], "fp16": []}
    outs: dict[str, Any] = {}
    with torch.inference_mode():
        for r in range(1 + repeats):
            for name, path in (("eager", model), ("fp16", fp16)):
                outs[name], ms = timed_pass(path, model, x, z, dev)
                if r:
                    times[name].append(ms)
    diff = np.abs(
        to_uint8(outs["fp16"]).astype(np.int16) - to_uint8(outs["eager"]).astype(np.int16)
    )
    return {
        "ms": float(np.median(times["fp16"])),
        "eager_ms_same_run": float(np.median(times["eager"])),
        "max_abs_diff": int(diff.max()),
        "differing_share": float((diff != 0).mean()),
        "note": "torch.autocast(cuda, float16) around eager: not a pipeline path",
    }


def _unavailable(names: list[str], cuda: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    if "onnx" in names:
        try:
            import onnxruntime as ort
        except ImportError as err:
            out["onnx"] = f"onnxruntime is not installed ({err})"
        else:
            if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
                providers = ", ".join(ort.get_available_providers())
                out["onnx"] = f"ONNX Runtime has no CUDA execution provider here ({providers})"
    return out


def run(run: PartRun) -> None:
    import torch

    from benchmarks import inference as bench
    from pipeline.inference.choice import BF16_TOLERANCE, FP32_TOLERANCE
    from pipeline.inference.paths import PathSpec

    s, cuda = run.sizes, run.cuda
    names = list(s.inference_paths)
    unavailable = _unavailable(names, cuda)
    cuda_only = {} if cuda else {"compile": "a cold compile takes minutes on a CPU"}
    names = [n for n in names if n not in unavailable and n not in cuda_only]
    device = "cuda" if cuda else "cpu"
    run.figures.update(
        config=s.inference_config,
        size=s.inference_size,
        repeats=s.inference_repeats,
        device=device,
        tf32={
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        paths={n: {"ms": None, "error": why} for n, why in unavailable.items()},
    )

    def table(which: list[str]) -> dict[str, Any]:
        report = bench.run_benchmark(
            config=s.inference_config,
            size=s.inference_size,
            repeats=s.inference_repeats,
            warmup=1,
            names=tuple(which),
            device=device,
            model_path=None,
        )
        log.warning("inference table:\n%s", bench.format_table(report))
        return report

    # compile measured apart: a slow compile then costs only its own row
    report = table([n for n in names if n != "compile"])
    paths = run.figures["paths"]
    paths.update({n: {k: r.get(k) for k in KEEP} for n, r in report["paths"].items()})
    run.figures["chooser"] = {
        "default": report["default"],
        "reason": report["default_reason"],
        "default_fp32": report["default_fp32"],
    }
    run.save()
    if "compile" in names:
        again = table(["compile"])
        paths["compile"] = {k: again["paths"]["compile"].get(k) for k in KEEP} | {
            "eager_ms_same_run": again["paths"]["eager"]["ms"]
        }
        run.save()
    if cuda:
        paths["fp16"] = _fp16_figures(s.inference_config, s.inference_size, s.inference_repeats)

    for n in s.inference_paths:
        p = paths.get(n, {})
        if n in unavailable:
            run.skip(f"paths.{n}.ran", unavailable[n])
        elif n in cuda_only:
            run.skip(f"paths.{n}.ran", f"CUDA only in this check: {cuda_only[n]}")
        else:
            run.check(f"paths.{n}.ran", p.get("error") or "ok", p.get("ms") is not None, "ran")
            if p.get("ms") is not None and PathSpec.from_name(n).exact:
                ok = FP32_TOLERANCE.accepts(p["max_abs_diff"], p["differing_share"])
                run.check(
                    f"paths.{n}.max_abs_diff",
                    [p["max_abs_diff"], p["differing_share"]],
                    ok,
                    f"[max |diff|, share] vs eager fp32: {FP32_TOLERANCE.describe()}",
                )
    fp16 = paths.get("fp16", {})
    run.cuda_check(
        "paths.fp16.ran", fp16.get("ms"), fp16.get("ms") is not None, "ran", "no CUDA autocast"
    )
    default = report["default"]
    d = paths.get(default, {})
    run.check("chooser.default", default, d.get("ms") is not None, "one of the measured paths")
    if d.get("ms") is not None and not PathSpec.from_name(default).exact:
        run.check(
            "chooser.default_within_tolerance",
            [d["max_abs_diff"], d["differing_share"]],
            BF16_TOLERANCE.accepts(d["max_abs_diff"], d["differing_share"]),
            BF16_TOLERANCE.describe(),
        )
