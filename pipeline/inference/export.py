"""ONNX export of a generator: z as an input, dynamic H/W, DNI alpha baked in, verified.

:func:`onnx_bytes` is the one export call (the ``onnx`` inference path builds its session from
it; ``cugan export --format onnx`` writes it to a file through :func:`export_onnx`).

The graph: inputs ``x`` ``[B, C, H, W]`` float32 in [0, 1] (H, W multiples of the model's size
multiple) and, for a conditional model, ``z`` ``[B, cond_dim]`` in [0, 1]; output ``y`` the
restored image (not clipped: quantise as ``clip(round_half_up(255 * y))``, as
:func:`pipeline.degradation.to_uint8` does). Batch, H and W are dynamic axes. A DNI blend is
exported as the blended weights: the file holds ONE generator at one alpha.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 17. The
generator's shape checks are Python conditions, traced as constants, which is right for every
H, W that are multiples of the size multiple (the exporter warns about it; silenced here).

:func:`export_onnx` verifies the file with ONNX Runtime against PyTorch before it is written
(atomically): several sizes, two z values, the float maximum absolute difference and the 8-bit
outputs compared. A max 8-bit difference above 1 grey level (or a float difference above
``MAX_FLOAT_DIFF``) fails the export: that is a wrong graph, not float reassociation.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.generator import Generator
from pipeline.degradation import to_uint8
from pipeline.inference.errors import ExportError

__all__ = [
    "MAX_FLOAT_DIFF",
    "METADATA_PREFIX",
    "ONNX_OPSET",
    "ExportError",
    "ExportReport",
    "export_onnx",
    "onnx_bytes",
    "read_onnx_metadata",
]

log = logging.getLogger(__name__)

ONNX_OPSET = 17
#: Keys of the model properties (``metadata_props``) this module writes start with this.
METADATA_PREFIX = "cugan."
#: Largest float difference (in [0, 1] units) ONNX Runtime may show against PyTorch.
MAX_FLOAT_DIFF = 1e-3
#: Sizes (H, W) the export is verified at, in multiples of the size multiple.
VERIFY_SIZES = ((16, 16), (12, 20))


@dataclass(frozen=True)
class ExportReport:
    path: Path
    max_abs_diff: float  # float output vs PyTorch, [0, 1] units
    max_8bit_diff: int  # 8-bit output vs PyTorch, grey levels
    differing_8bit: int  # 8-bit values that differ (float rounding at a quantisation boundary)
    values_checked: int
    sizes: tuple[tuple[int, int], ...]
    metadata: dict[str, str]

    def describe(self) -> str:
        same = (
            "8-bit output identical"
            if self.max_8bit_diff == 0
            else f"8-bit output differs by {self.max_8bit_diff} level in {self.differing_8bit} "
            f"of {self.values_checked} values"
        )
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        return f"max |ONNX Runtime - PyTorch| = {self.max_abs_diff:.3g}; {same} (sizes {sizes})"


def _example(model: Generator, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.rand(1, cfg.in_channels, height, width, generator=gen)
    z = torch.rand(1, cfg.cond_dim, generator=gen) if cfg.conditional else None
    return x, z


def onnx_bytes(model: Generator, *, opset: int = ONNX_OPSET) -> bytes:
    """The generator as a serialised ONNX model (module docstring), on the CPU, float32."""
    cpu = model if _on_cpu_fp32(model) else _cpu_copy(model)
    m = cpu.size_multiple
    x, z = _example(cpu, 2 * m, 2 * m)
    conditional = cpu.config.conditional
    names = ["x", "z"] if conditional else ["x"]
    dynamic = {
        "x": {0: "batch", 2: "height", 3: "width"},
        "y": {0: "batch", 2: "height", 3: "width"},
    }
    if conditional:
        dynamic["z"] = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # shape checks traced as constants (module docstring)
        torch.onnx.export(
            cpu,
            (x, z) if conditional else (x,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=["y"],
            dynamic_axes=dynamic,
        )
    return buffer.getvalue()


def _on_cpu_fp32(model: Generator) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


def _cpu_copy(model: Generator) -> Generator:
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()


def _verify(model: Generator, data: bytes) -> tuple[float, int, int, int, tuple]:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    m = model.size_multiple
    sizes = tuple((h * m, w * m) for h, w in VERIFY_SIZES)
    worst, worst8, differing, total = 0.0, 0, 0, 0
    for i, (h, w) in enumerate(sizes):
        for seed in (i, i + 100):
            x, z = _example(model, h, w, seed)
            with torch.inference_mode():
                ref = model(x, z).float()
            feeds = {"x": x.numpy()}
            if z is not None:
                feeds["z"] = z.numpy()
            out = torch.from_numpy(session.run(None, feeds)[0])
            worst = max(worst, float((out - ref).abs().max()))
            diff8 = np.abs(to_uint8(out).astype(int) - to_uint8(ref).astype(int))
            worst8 = max(worst8, int(diff8.max()))
            differing += int((diff8 != 0).sum())
            total += diff8.size
    return worst, worst8, differing, total, sizes


def export_onnx(
    model: Generator,
    out: str | os.PathLike[str],
    *,
    metadata: dict[str, object],
) -> ExportReport:
    """Export, verify with ONNX Runtime, add ``metadata`` as model properties, write ``out``.

    ``metadata`` values are written as JSON strings under ``cugan.<key>`` (plus ``cugan.
    verification``). Nothing is written when the export does not verify (:class:`ExportError`).
    """
    import onnx

    from pipeline.atomic import atomic_write_bytes

    cpu = model if _on_cpu_fp32(model) else _cpu_copy(model)
    cpu.eval()
    try:
        data = onnx_bytes(cpu)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    worst, worst8, differing, total, sizes = _verify(cpu, data)
    if worst > MAX_FLOAT_DIFF or worst8 > 1:
        raise ExportError(
            f"the ONNX model does not reproduce PyTorch: max |diff| {worst:.3g}, 8-bit "
            f"{worst8} levels; nothing written"
        )
    verification = {
        "max_abs_diff": worst,
        "max_8bit_diff": worst8,
        "differing_8bit_values": differing,
        "values_checked": total,
        "sizes": [list(s) for s in sizes],
        "runtime": f"onnxruntime {_ort_version()} CPUExecutionProvider",
    }
    props = {f"{METADATA_PREFIX}{k}": json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    props[f"{METADATA_PREFIX}verification"] = json.dumps(verification, sort_keys=True)
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "CUGAN generator (x in [0,1], z in [0,1]) -> restored image y"
    path = atomic_write_bytes(out, proto.SerializeToString())
    report = ExportReport(Path(path), worst, worst8, differing, total, sizes, props)
    log.info("verified the export: %s", report.describe())
    return report


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The ``cugan.*`` model properties of an exported file, JSON-decoded, prefix removed."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX) :]: json.loads(p.value)
        for p in proto.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }
