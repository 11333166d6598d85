"""The inference paths: one generator, several ways to run its forward pass.

A path is a :class:`PathSpec` (a backend and a precision) built into an :class:`InferencePath`,
a callable ``(x, z) -> y`` on padded pieces (:func:`pipeline.inference.geometry.run_pieces`):

* ``eager``          the module as it is (fp32, NCHW): the reference every path is compared to;
* ``channels_last``  a copy of the weights in NHWC memory format, NHWC input (oneDNN's
                     preferred layout on many CPUs; slower on others -- measure);
* ``compile``        ``torch.compile`` (inductor) of a copy, with ``freezing`` (weights folded
                     into the graph, convolution weights pre-packed for oneDNN). The first call
                     of each new input shape compiles (tens of seconds on a CPU): only for
                     long-lived consumers (:mod:`pipeline.inference.choice`);
* ``onnx``           the module exported to ONNX (:func:`pipeline.inference.export.onnx_bytes`)
                     and run by ONNX Runtime: the CPU execution provider, or CUDA's where it is
                     installed and the device is a GPU;
* ``bf16`` / ``bf16_channels_last``  ``torch.autocast`` to bfloat16 around the eager or the
                     channels_last module. Fast only where the hardware has bf16 arithmetic
                     (AMX-BF16 / AVX512-BF16 CPUs, GPUs); NOT exact: the chooser takes it only
                     within a stated tolerance of fp32 (:mod:`pipeline.inference.choice`).

Weights: ``eager`` and ``bf16`` run the caller's module itself; the others hold a copy made
when the path is built (a later in-place change of the module's weights is not seen: the
consumers that cache a path check for that, :mod:`pipeline.inference.prepared`).

z maps (``[B, D, H, W]``, a condition per pixel) are traced by neither the ONNX exporter nor
inductor here (their C_G finds the distinct values of the map at run time); those two paths
run a map through the eager module, which gives the exact reference result.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from models.generator import Generator
from pipeline.inference.errors import PathUnavailable

__all__ = [
    "ALL_PATHS",
    "Backend",
    "InferencePath",
    "PathSpec",
    "PathUnavailable",
    "Precision",
    "build_path",
]

log = logging.getLogger(__name__)


class Backend(StrEnum):
    AUTO = "auto"
    EAGER = "eager"
    CHANNELS_LAST = "channels_last"
    COMPILE = "compile"
    ONNX = "onnx"


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


#: (backend, precision) pairs that exist; bf16 is autocast around the two PyTorch modules.
_VALID = {
    (Backend.EAGER, Precision.FP32): "eager",
    (Backend.CHANNELS_LAST, Precision.FP32): "channels_last",
    (Backend.COMPILE, Precision.FP32): "compile",
    (Backend.ONNX, Precision.FP32): "onnx",
    (Backend.EAGER, Precision.BF16): "bf16",
    (Backend.CHANNELS_LAST, Precision.BF16): "bf16_channels_last",
}


@dataclass(frozen=True)
class PathSpec:
    """A concrete path: a backend and a precision (neither ``auto``)."""

    backend: Backend
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "precision", Precision(self.precision))
        if (self.backend, self.precision) not in _VALID:
            raise ValueError(
                f"no inference path {self.backend.value} at {self.precision.value} (bf16 runs "
                "with the eager or channels_last backend)"
            )

    @property
    def name(self) -> str:
        """``eager``, ``channels_last``, ``compile``, ``onnx``, ``bf16``, ``bf16_channels_last``."""
        return _VALID[(self.backend, self.precision)]

    @property
    def exact(self) -> bool:
        """fp32 paths reproduce eager's 8-bit output (up to float reassociation, see choice)."""
        return self.precision is Precision.FP32

    @classmethod
    def from_name(cls, name: str) -> PathSpec:
        for (backend, precision), known in _VALID.items():
            if known == name:
                return cls(backend, precision)
        raise ValueError(f"unknown inference path {name!r} (known: {', '.join(_VALID.values())})")


ALL_PATHS: tuple[PathSpec, ...] = tuple(PathSpec(b, p) for b, p in _VALID)


class InferencePath:
    """A built path: ``path(x, z) -> y`` (y on ``device``; x, z already there).

    ``setup_s``: what building it cost (copy, export + session, or the first compile);
    ``note``: how it runs, for logs and benchmarks.
    """

    def __init__(
        self,
        spec: PathSpec,
        model: Generator,
        device: torch.device,
        *,
        setup_s: float = 0.0,
        note: str = "",
    ) -> None:
        self.spec, self.model, self.device = spec, model, device
        self.setup_s, self.note = setup_s, note

    @property
    def input_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __call__(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.model(x, z)


class _Autocast(InferencePath):
    """bf16 autocast around a module (the caller's, or a channels_last copy)."""

    def __init__(self, spec, model, device, *, module, nhwc, setup_s=0.0, note="") -> None:
        super().__init__(spec, model, device, setup_s=setup_s, note=note)
        self.module, self.nhwc = module, nhwc

    def __call__(self, x: Tensor, z: Tensor | None) -> Tensor:
        if self.nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.module(x, z).float()


class _ChannelsLast(InferencePath):
    def __init__(self, spec, model, device, *, module, setup_s=0.0, note="") -> None:
        super().__init__(spec, model, device, setup_s=setup_s, note=note)
        self.module = module

    def __call__(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last), z)


class _VectorOnly(InferencePath):
    """A path that takes z as a vector; a z map runs through the eager module instead."""

    def __call__(self, x: Tensor, z: Tensor | None) -> Tensor:
        if z is not None and z.dim() == 4:
            return self.model(x, z)
        return self.forward(x, z)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _Compiled(_VectorOnly):
    def __init__(self, spec, model, device, *, compiled, setup_s=0.0, note="") -> None:
        super().__init__(spec, model, device, setup_s=setup_s, note=note)
        self.compiled = compiled

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.compiled(x, z)


class _OnnxRuntime(_VectorOnly):
    def __init__(self, spec, model, device, *, session, setup_s=0.0, note="") -> None:
        super().__init__(spec, model, device, setup_s=setup_s, note=note)
        self.session = session
        self.takes_z = any(i.name == "z" for i in session.get_inputs())

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32  # the exported graph is float32

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        feeds = {"x": x.detach().cpu().numpy()}
        if self.takes_z:
            feeds["z"] = z.detach().cpu().numpy()
        out = self.session.run(None, feeds)[0]
        return torch.from_numpy(out).to(self.device)


@contextlib.contextmanager
def _timed() -> Iterator[list[float]]:
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def _nhwc_copy(model: Generator) -> Generator:
    return copy.deepcopy(model).to(memory_format=torch.channels_last).eval()


def _onnx_session(model: Generator, device: torch.device, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise PathUnavailable(f"onnxruntime is not installed ({err})") from None
    from pipeline.inference.export import onnx_bytes

    data = onnx_bytes(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PathUnavailable("ONNX Runtime has no CUDA execution provider here")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    session = ort.InferenceSession(data, options, providers=providers)
    return session, session.get_providers()[0]


def _compiled(model: Generator, device: torch.device, probe: tuple[Tensor, Tensor | None]):
    import shutil

    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        raise PathUnavailable("torch.compile needs a C++ compiler on the CPU (none on PATH)")
    if device.type == "cpu":
        # inductor's C++ build looks for a CUDA toolkit and warns "No CUDA runtime is found"
        # wherever one is installed without a GPU: nothing a CPU compile needs or can act on
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    module = copy.deepcopy(model).eval()
    compiled = torch.compile(module, options={"freezing": True})
    with torch.inference_mode():
        compiled(*probe)  # compiles for the probe's shape; a new shape compiles again
    return compiled


def build_path(
    model: Generator,
    spec: PathSpec,
    device: torch.device,
    *,
    example: tuple[Tensor, Tensor | None] | None = None,
) -> InferencePath:
    """Build ``spec`` for ``model`` (already on ``device``, eval mode).

    ``example``: an input pair on ``device`` for the paths that trace or compile on a first
    call (``compile``); its time is part of ``setup_s``. Raises :class:`PathUnavailable` when
    the path cannot run here.
    """
    name = spec.name
    try:
        with _timed() as took:
            if name == "eager":
                built = InferencePath(spec, model, device, note="PyTorch eager, NCHW")
            elif name == "channels_last":
                built = _ChannelsLast(
                    spec, model, device, module=_nhwc_copy(model), note="PyTorch eager, NHWC"
                )
            elif name == "bf16":
                built = _Autocast(
                    spec, model, device, module=model, nhwc=False, note="autocast bfloat16"
                )
            elif name == "bf16_channels_last":
                built = _Autocast(
                    spec,
                    model,
                    device,
                    module=_nhwc_copy(model),
                    nhwc=True,
                    note="autocast bfloat16, NHWC",
                )
            elif name == "onnx":
                session, provider = _onnx_session(model, device, torch.get_num_threads())
                built = _OnnxRuntime(
                    spec, model, device, session=session, note=f"ONNX Runtime {provider}"
                )
            else:  # compile
                if example is None:
                    raise ValueError("the compile path needs an example input to compile for")
                built = _Compiled(
                    spec,
                    model,
                    device,
                    compiled=_compiled(model, device, example),
                    note="torch.compile inductor, freezing",
                )
    except PathUnavailable:
        raise
    except (RuntimeError, OSError, ImportError, NotImplementedError, TypeError) as err:
        # a compiler failure, an exporter limitation, a provider that cannot start
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PathUnavailable(f"{name}: {type(err).__name__}: {first}") from err
    built.setup_s = took[0]
    return built
