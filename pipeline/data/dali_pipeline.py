"""The DALI training pipeline: webdataset shards -> crops -> blur/noise/8-bit degradation.

Everything per sample happens inside DALI, on the GPU when the loader targets a CUDA device
(``fn.decoders.image(device="mixed")``; every later image operator then runs on the GPU because
its input lives there) and on the CPU otherwise (``device_id=None``, CPU operators only). The
random numbers are DALI CPU nodes fed to the image operators as per-sample arguments.

Per sample, matching :func:`pipeline.degradation.degrade` (tests/test_loader_parity.py):

1. ``fn.readers.webdataset`` with the wds2idx index files, one ``png`` component per sample
   (a missing one is an error, not an empty tensor), ``shard_id=rank, num_shards=world_size``,
   a shuffle buffer, ``pad_last_batch`` so every rank yields the same number of batches.
2. Decode to RGB; a ``crop x crop`` window at a uniformly drawn integer position; a random
   horizontal flip, vertical flip and transpose -- the 8 flips/90-degree rotations with equal
   probability, done by exact index permutations (``fn.flip``; ``fn.transpose`` under a DALI
   conditional) rather than ``fn.rotate``, whose 90-degree exactness rests on interpolation
   rounding. This is the *clean* patch; the degradation is applied to it, so the two are
   aligned by construction.
3. Levels drawn uniformly on the method's grid (``fn.random.uniform(values=grid)``): blur std
   ``r`` (step 0.1 in [0, 4]) and noise std ``sigma`` (step 1 in [0, 50]).
4. Blur: a per-sample normalised Gaussian built in the graph from ``r`` and applied as two
   1-D ``fn.filter`` passes with ``border="clamp"`` (replicate; ``fn.gaussian_blur`` reflects,
   which the method does not). A clamped index is separable, so the two passes equal the 21x21
   2-D filter with replicate border, at 2x21 instead of 441 multiply-adds per pixel. ``r = 0``
   yields a delta kernel (exp underflows off-centre), i.e. no blur.
5. Noise: ``fn.noise.gaussian`` on the float image with per-sample std ``sigma / 255`` (no
   saturation: the image is float, not uint8).
6. Quantise: clamp to [0, 1], ``floor(255 x + 0.5) / 255`` (round half up, as ``im2uint8``).
7. ``z = [r / blur_max, sigma / noise_max]`` from the same nodes that drove the operators.

:func:`run_degradation` runs steps 4-6 alone on given images and levels (external source), the
test entry that pins DALI to the torch reference.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia import dali
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.condition import ConditionScale
from pipeline.config import Params
from pipeline.data.batch import (
    Batch,
    LoaderError,
    ShardSet,
    batches_per_epoch,
    check_compatible,
    position,
)
from pipeline.data.shards import ShardError, read_shards_json
from pipeline.errors import one_line

__all__ = [
    "DEBUG_OUTPUTS",
    "OUTPUTS",
    "DaliPipelineError",
    "DaliTrainLoader",
    "build_train_pipeline",
    "dali_error_line",
    "degrade_nodes",
    "level_grid",
    "rank_seed",
    "run_degradation",
]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")  # the default target device (a torch.device is immutable)

OUTPUTS = ("degraded", "clean", "z")
# Extra outputs of build_train_pipeline(debug=True), for tests and inspection: the levels and
# geometry actually drawn and the reader's "<tar>:<offset>:<member>" source info (zero-padded).
DEBUG_OUTPUTS = ("blur", "noise", "top_left", "hflip", "vflip", "transpose", "source_info")

# Any sigma below this gives a delta kernel: exp(-1 / (2 * 1e-6)) underflows to 0 in float32.
_MIN_SIGMA = 1e-3


def level_grid(maximum: float, step: float) -> list[float]:
    """``[0, step, ..., maximum]``, rounded like :func:`pipeline.degradation.sample_levels`."""
    count = round(maximum / step)
    return [round(k * step, 10) for k in range(count + 1)]


def rank_seed(seed: int, rank: int) -> int:
    """A 31-bit seed for one rank's pipeline, independent across ranks."""
    state = np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0]
    return int(state) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# graph pieces (called inside a pipeline definition)


def _gaussian_taps(sigma: Any, size: int) -> Any:
    """Per-sample normalised 1-D Gaussian ``[size]`` (float32) of std ``sigma`` (a CPU node)."""
    half = size // 2
    x2 = types.Constant(np.arange(-half, half + 1, dtype=np.float32) ** 2)
    s = dali.math.max(sigma, _MIN_SIGMA)
    taps = dali.math.exp(x2 * -0.5 / (s * s))
    return taps / fn.reductions.sum(taps)


def degrade_nodes(clean: Any, blur: Any, noise: Any, *, kernel_size: int) -> dict[str, Any]:
    """Blur -> noise -> 8 bits on an HWC float image node; returns the intermediate nodes too."""
    taps = _gaussian_taps(blur, kernel_size)
    rows = fn.reshape(taps, shape=[1, kernel_size])
    cols = fn.reshape(taps, shape=[kernel_size, 1])
    blurred = fn.filter(fn.filter(clean, rows, border="clamp"), cols, border="clamp")
    noisy = fn.noise.gaussian(blurred, stddev=noise / 255.0)
    degraded = dali.math.floor(dali.math.clamp(noisy, 0.0, 1.0) * 255.0 + 0.5) / 255.0
    return {"blurred": blurred, "noisy": noisy, "degraded": degraded}


def _chw(node: Any) -> Any:
    return fn.transpose(node, perm=[2, 0, 1], output_layout="CHW")


def _random_patch(image: Any, crop: int) -> dict[str, Any]:
    """A random ``crop x crop`` window, randomly flipped/transposed; returns the draws too."""
    shape = image.shape(dtype=types.FLOAT)  # a CPU node even for GPU images
    top = dali.math.min(
        dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * (shape[0] - crop + 1)),
        shape[0] - crop,
    )
    left = dali.math.min(
        dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * (shape[1] - crop + 1)),
        shape[1] - crop,
    )
    top_left = fn.cast(fn.stack(top, left), dtype=types.INT32)
    patch = fn.slice(image, start=top_left, shape=[crop, crop], axis_names="HW")
    hflip = fn.random.coin_flip(dtype=types.INT32)
    vflip = fn.random.coin_flip(dtype=types.INT32)
    patch = fn.flip(patch, horizontal=hflip, vertical=vflip)
    transpose = fn.random.coin_flip(dtype=types.BOOL)
    if transpose:  # a DALI conditional: split per sample, merged back afterwards
        patch = fn.transpose(patch, perm=[1, 0, 2], output_layout="HWC")
    return {
        "patch": patch,
        "top_left": top_left,
        "hflip": hflip,
        "vflip": vflip,
        "transpose": transpose,
    }


# ---------------------------------------------------------------------------------------------
# pipelines


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _train_graph(
    *,
    tars,
    indices,
    crop,
    blur_values,
    noise_values,
    blur_max,
    noise_max,
    kernel_size,
    shard_id,
    num_shards,
    reader_seed,
    shuffle_buffer,
    on_gpu,
    debug,
):
    encoded = fn.readers.webdataset(
        paths=[str(p) for p in tars],
        index_paths=[str(p) for p in indices],
        ext=["png"],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=True,
        initial_fill=shuffle_buffer,
        pad_last_batch=True,
        seed=reader_seed,
        name="reader",
    )
    image = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    drawn = _random_patch(image, crop)
    clean = fn.cast(drawn["patch"], dtype=types.FLOAT) / 255.0
    blur = fn.random.uniform(values=blur_values)
    noise = fn.random.uniform(values=noise_values)
    nodes = degrade_nodes(clean, blur, noise, kernel_size=kernel_size)
    z = fn.stack(blur / blur_max, noise / noise_max)
    outputs = [_chw(nodes["degraded"]), _chw(clean), z.gpu() if on_gpu else z]
    if debug:
        info = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
        outputs += [
            blur,
            noise,
            drawn["top_left"],
            drawn["hflip"],
            drawn["vflip"],
            drawn["transpose"],
            info,
        ]
    return tuple(outputs)


def build_train_pipeline(
    *,
    tars: Sequence[str | Path],
    indices: Sequence[str | Path],
    batch_size: int,
    crop: int,
    blur_values: Sequence[float],
    noise_values: Sequence[float],
    blur_max: float,
    noise_max: float,
    kernel_size: int = 21,
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    num_threads: int = 2,
    prefetch: int = 2,
    device_id: int | None = None,
    checkpoint: bytes | None = None,
    debug: bool = False,
) -> Pipeline:
    """The training pipeline; outputs :data:`OUTPUTS` (+ :data:`DEBUG_OUTPUTS` when debug).

    ``device_id=None`` builds the CPU-only pipeline; an integer builds the GPU one on that
    device (mixed decoder, GPU operators; levels stay CPU nodes, ``z`` is moved to the GPU).
    ``seed`` drives the reader's shuffle and every random operator. ``checkpoint`` (from
    ``Pipeline.checkpoint()`` or ``DALIGenericIterator.checkpoints()``) restores the reader
    position and random states.
    """
    return _train_graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
        checkpoint=checkpoint,
        tars=list(tars),
        indices=list(indices),
        crop=crop,
        blur_values=[float(v) for v in blur_values],
        noise_values=[float(v) for v in noise_values],
        blur_max=float(blur_max),
        noise_max=float(noise_max),
        kernel_size=kernel_size,
        shard_id=shard_id,
        num_shards=num_shards,
        reader_seed=seed,
        shuffle_buffer=shuffle_buffer,
        on_gpu=device_id is not None,
        debug=debug,
    )


def run_degradation(
    images: Sequence[np.ndarray],
    blur: Sequence[float],
    noise: Sequence[float],
    *,
    kernel_size: int = 21,
    seed: int = 0,
    device_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Degrade given uint8 HxWx3 images with given levels in DALI (the test entry).

    Returns NCHW float32 arrays ``clean``, ``blurred`` (before noise), ``noisy`` (before
    clamping/quantisation) and ``degraded``, plus ``blur`` and ``noise`` as the graph saw them.
    Uses exactly the graph of the training pipeline (:func:`degrade_nodes`).
    """
    n = len(images)
    if not n or len(blur) != n or len(noise) != n:
        raise ValueError(
            f"need one blur and one noise level per image ({n}, {len(blur)}, {len(noise)})"
        )
    batch = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
    levels_b = [np.float32(v) for v in blur]
    levels_n = [np.float32(v) for v in noise]
    pipe = Pipeline(batch_size=n, num_threads=1, device_id=device_id, seed=seed)
    with pipe:
        image = fn.external_source(
            source=[batch],
            cycle=False,
            layout="HWC",
            device="gpu" if device_id is not None else "cpu",
        )
        b = fn.external_source(source=[levels_b], cycle=False)
        s = fn.external_source(source=[levels_n], cycle=False)
        clean = fn.cast(image, dtype=types.FLOAT) / 255.0
        nodes = degrade_nodes(clean, b, s, kernel_size=kernel_size)
        pipe.set_outputs(
            _chw(clean), _chw(nodes["blurred"]), _chw(nodes["noisy"]), _chw(nodes["degraded"]), b, s
        )
    pipe.build()
    outs = pipe.run()
    names = ("clean", "blurred", "noisy", "degraded", "blur", "noise")
    return {name: _to_numpy(out) for name, out in zip(names, outs)}


def _to_numpy(tensor_list: Any) -> np.ndarray:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return np.array(tensor_list.as_tensor())


# ---------------------------------------------------------------------------------------------
# the TrainLoader

_CRITICAL = "Critical error in pipeline"


class DaliPipelineError(LoaderError, RuntimeError):
    """DALI's pipeline failed while reading (one line, :func:`dali_error_line`); still the
    ``RuntimeError`` DALI raised, for callers that catch that."""


def dali_error_line(
    err: BaseException, tars: Sequence[str | Path], indices: Sequence[str | Path]
) -> str:
    """DALI's multi-line ``Critical error in pipeline`` as one line: the shard, the operator
    and DALI's own reason.

    DALI repeats the header, quotes the graph's source line and a C++ context; the reason is
    the line after ``encountered:``. A reader error names the index or tar it choked on (a
    truncated tar: "offset is outside of the archive file"). A decoder error names no file:
    then the shards are checked against the sha256 in ``shards.json`` (only now, on the
    failure), which names the one that changed.
    """
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next(
        (lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "encountered:"),
        one_line(err),
    )
    reason = re.sub(r'^Assert on ".*?" failed: ', "", reason)
    operator = re.search(r"operator `(?:nvidia\.dali\.)?([\w.]+)`", text)
    where = f"DALI {operator.group(1) if operator else 'pipeline'}: {reason}"
    for tar, index in zip(tars, indices, strict=True):
        if str(tar) in text or str(index) in text:
            return (
                f"{tar}: unreadable shard ({where}); truncated or changed after the shards "
                "stage: re-run it"
            )
    root = Path(tars[0]).parent
    try:
        read_shards_json(root, verify="sha256")
    except ShardError as damaged:
        return f"{damaged} ({where})"
    return f"{where} (reading the shards in {root}, which match their shards.json)"


def _pipeline_device_id(mode: str, device: torch.device) -> int | None:
    """``loader.device`` + target device -> DALI ``device_id`` (None: CPU pipeline)."""
    if mode == "cpu":
        return None
    cuda = torch.cuda.is_available()
    if mode == "gpu" and not cuda:
        raise LoaderError("loader.device is 'gpu' but CUDA is not available")
    if mode == "auto" and not (cuda and device.type == "cuda"):
        return None
    if device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


class DaliTrainLoader:
    """:class:`~pipeline.data.batch.TrainLoader` over :func:`build_train_pipeline`.

    The pipeline is built lazily on first iteration so that ``load_state_dict`` can hand it a
    DALI checkpoint. The epoch ends with ``LastBatchPolicy.DROP`` (all ranks yield
    ``len(self)`` full batches); the reader keeps shuffling across epochs from its seed, and
    with ``num_shards > 1`` DALI moves each rank to the next shard every epoch (still disjoint).
    """

    backend = "dali"

    def __init__(
        self,
        shards: ShardSet,
        params: Params,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device = _CPU,
        debug: bool = False,
    ) -> None:
        cfg, deg = params.loader, params.degradation
        # z is computed in the graph (step 7) from the one scale of pipeline.condition
        scale = ConditionScale.from_params(deg)
        self.batch_size = cfg.batch_size
        self.device = device
        self._device_id = _pipeline_device_id(cfg.device, device)
        self._debug = debug
        # A DALI checkpoint fits only the graph that wrote it: a CPU one cannot seed GPU ops.
        self._identity = {
            "rank": rank,
            "world_size": world_size,
            "seed": seed,
            "num_samples": shards.num_samples,
            "batch_size": cfg.batch_size,
            "pipeline": "cpu" if self._device_id is None else "gpu",
        }
        self._len = batches_per_epoch(shards.num_samples, world_size, cfg.batch_size)
        self._pipeline_args = {
            "tars": shards.tars,
            "indices": shards.indices,
            "batch_size": cfg.batch_size,
            "crop": cfg.crop,
            "blur_values": level_grid(deg.blur_max, deg.blur_step),
            "noise_values": level_grid(deg.noise_max, deg.noise_step),
            "blur_max": scale.blur_max,
            "noise_max": scale.noise_max,
            "kernel_size": deg.kernel_size,
            "shard_id": rank,
            "num_shards": world_size,
            "seed": rank_seed(seed, rank),
            "shuffle_buffer": cfg.shuffle_buffer,
            "num_threads": cfg.num_threads,
            "prefetch": cfg.prefetch,
            "device_id": self._device_id,
            "debug": debug,
        }
        self._epoch = 0
        self._batch = 0
        self._checkpoint: bytes | None = None
        self._iterator: DALIGenericIterator | None = None
        log.info(
            "DALI loader on %s: rank %d/%d, %d batches of %d per epoch",
            "CPU" if self._device_id is None else f"GPU {self._device_id}",
            rank,
            world_size,
            self._len,
            self.batch_size,
        )

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def on_gpu(self) -> bool:
        return self._device_id is not None

    def __len__(self) -> int:
        return self._len

    def _ensure_iterator(self) -> DALIGenericIterator:
        if self._iterator is None:
            pipe = build_train_pipeline(**self._pipeline_args, checkpoint=self._checkpoint)
            names = list(OUTPUTS) + (list(DEBUG_OUTPUTS) if self._debug else [])
            self._iterator = DALIGenericIterator(
                pipe,
                names,
                reader_name="reader",
                last_batch_policy=LastBatchPolicy.DROP,
                auto_reset=True,
            )
        return self._iterator

    def iter_outputs(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of this epoch as raw output dicts (debug outputs included).

        A pipeline failure (a shard truncated or changed after the start check) is raised as
        one :class:`DaliPipelineError` line naming the shard (:func:`dali_error_line`).
        """
        try:
            yield from self._iter_outputs()
        except RuntimeError as err:
            if _CRITICAL not in str(err) or isinstance(err, DaliPipelineError):
                raise
            self._iterator = None  # DALI: "Current pipeline object is no longer valid"
            args = self._pipeline_args
            raise DaliPipelineError(dali_error_line(err, args["tars"], args["indices"])) from err

    def _iter_outputs(self) -> Iterator[dict[str, torch.Tensor]]:
        iterator = self._ensure_iterator()
        if self._batch >= self._len:
            # The previous iteration stopped right after the epoch's last batch: let DALI end
            # that epoch (StopIteration, auto-reset) before starting the next one.
            if next(iterator, None) is not None:
                raise LoaderError(f"DALI yielded more than {self._len} batches in an epoch")
            self._epoch, self._batch = self._epoch + 1, 0
        for outputs in iterator:
            self._batch += 1
            yield outputs[0]
        self._epoch, self._batch = self._epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        for out in self.iter_outputs():
            yield Batch(*(out[name].to(self.device, non_blocking=True) for name in OUTPUTS))

    def state_dict(self) -> dict[str, Any]:
        if self._iterator is not None:
            checkpoint = self._iterator.checkpoints()[0]
        else:
            checkpoint = self._checkpoint
        encoded = base64.b64encode(checkpoint).decode("ascii") if checkpoint else None
        return {
            "backend": self.backend,
            **position(self._epoch, self._batch, self._len),
            **self._identity,
            "dali_checkpoint": encoded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise LoaderError("load_state_dict must be called before iterating the loader")
        exact = check_compatible(state, self._identity, self.backend)
        self._epoch = int(state["epoch"])
        self._batch = int(state.get("batch", 0)) if exact else 0
        encoded = state.get("dali_checkpoint") if exact else None
        self._checkpoint = base64.b64decode(encoded) if encoded else None

    def close(self) -> None:
        """Release the pipeline; iterating again rebuilds it at the same position."""
        if self._iterator is not None:
            state = self.state_dict()
            self._iterator = None
            self._epoch, self._batch = state["epoch"], state["batch"]
            self._checkpoint = base64.b64decode(state["dali_checkpoint"])
