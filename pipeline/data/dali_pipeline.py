"""The DALI training pipeline: webdataset shards -> context windows -> degraded patch pairs.

Everything per sample happens inside DALI, on the GPU when the loader targets a CUDA device
(every image operator then runs on the GPU: ``png`` samples are decoded by the ``mixed``
decoder, ``raw`` windows are cut on the CPU and copied) and on the CPU otherwise
(``device_id=None``, CPU operators only). The random numbers are DALI CPU nodes fed to the
image operators as per-sample arguments. The graph pieces live in
:mod:`pipeline.data.dali_graph`.

Per sample, matching the torch reference (:mod:`pipeline.data.torch_loader`,
:func:`pipeline.degradation.degrade`; tests/test_loader_parity.py):

1. ``fn.readers.webdataset`` with the wds2idx index files, one component per sample (``rgb``
   for ``raw`` shards, ``png`` otherwise; a missing one is an error, not an empty tensor),
   ``shard_id=rank, num_shards=world_size``, a shuffle buffer, ``pad_last_batch`` so every
   rank yields the same number of batches.
2. Geometry: a ``crop x crop`` patch at a uniformly drawn integer position of the sub-image,
   and its context window ``r = kernel_size // 2`` pixels larger per side, clamped into the
   sub-image. The sub-image's size comes from the encoded bytes (``fn.peek_image_shape``) for
   PNG -- not from ``shape()`` of a decoded (GPU) tensor -- and from ``shards.json`` for raw.
3. Only the window is decoded: ``fn.decoders.image_slice`` (ROI decoding) for PNG; a
   ``fn.slice`` of the reshaped bytes for raw (no decoding at all).
4. Levels per ``degradation.sampling`` (:func:`~pipeline.data.dali_graph.level_nodes`):
   uniform on the grid, or the authors' single/double mixture, from the same constants as
   :func:`pipeline.degradation.sample_levels`.
5. Blur the window (two 1-D ``fn.filter`` passes, ``border="clamp"`` = replicate), keep the
   central patch: the blur of a patch equals the blur of the whole sub-image (replicate border)
   cropped. The clean patch is the same centre of the window.
6. Noise ``fn.noise.gaussian`` with std ``sigma / 255`` on the float patch; clamp to [0, 1],
   ``floor(255 x + 0.5) / 255`` (round half up, as ``im2uint8``).
7. The same random horizontal flip, vertical flip and transpose on the degraded and the clean
   patch (8 flips/90-degree rotations, exact index permutations).
8. ``z = [r / blur_max, sigma / noise_max]`` from the same nodes that drove the operators.

:func:`run_degradation` (whole images) and :func:`run_patch_degradation` (patches at given
positions, through the training graph's window path) run steps 5-6 on given images and levels
(external source): the test entries that pin DALI to the torch reference.
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
from pipeline.data.dali_graph import (
    add_noise_and_quantize,
    chw,
    degrade_nodes,
    flip_pair,
    level_nodes,
    patch_geometry,
    window_blur,
    window_geometry,
)
from pipeline.data.shards import ShardError, read_shards_json
from pipeline.degradation import level_grid
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
    "run_patch_degradation",
]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")  # the default target device (a torch.device is immutable)

OUTPUTS = ("degraded", "clean", "z")
# Extra outputs of build_train_pipeline(debug=True), for tests and inspection: the levels and
# geometry actually drawn and the reader's "<tar>:<offset>:<member>" source info (zero-padded).
DEBUG_OUTPUTS = ("blur", "noise", "top_left", "hflip", "vflip", "transpose", "source_info")


def rank_seed(seed: int, rank: int) -> int:
    """A 31-bit seed for one rank's pipeline, independent across ranks."""
    state = np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0]
    return int(state) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# pipelines


def _read_window(
    encoded: Any, geometry_of: Any, *, encoding: str, sub_size: int | None, on_gpu: bool
) -> tuple[Any, dict[str, Any]]:
    """Decode only a sample's context window; ``geometry_of(height, width)`` places it."""
    if encoding == "raw":
        geometry = geometry_of(float(sub_size), float(sub_size))
        image = fn.reshape(encoded, shape=[sub_size, sub_size, 3], layout="HWC")
        window = fn.slice(image, start=geometry["start"], shape=geometry["shape"], axis_names="HW")
        return (window.gpu() if on_gpu else window), geometry
    shape = fn.cast(fn.peek_image_shape(encoded, adjust_orientation=False), dtype=types.FLOAT)
    geometry = geometry_of(shape[0], shape[1])
    window = fn.decoders.image_slice(
        encoded,
        start=geometry["start"],
        shape=geometry["shape"],
        axis_names="HW",
        device="mixed" if on_gpu else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,
    )
    return window, geometry


def _patch_pair(
    window: Any, geometry: dict[str, Any], blur: Any, noise: Any, *, crop: int, kernel_size: int
) -> dict[str, Any]:
    """Steps 5-6: ``degraded`` and ``clean`` HWC float patches (before flips) of a window."""
    win = fn.cast(window, dtype=types.FLOAT) / 255.0
    blurred = window_blur(win, blur, geometry["offset"], crop=crop, kernel_size=kernel_size)
    noisy, degraded = add_noise_and_quantize(blurred, noise)
    clean = fn.slice(win, start=geometry["offset"], shape=[crop, crop], axis_names="HW")
    return {"blurred": blurred, "noisy": noisy, "degraded": degraded, "clean": clean}


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _train_graph(
    *,
    tars,
    indices,
    ext,
    encoding,
    sub_size,
    crop,
    sampling,
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
        ext=[ext],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=True,
        initial_fill=shuffle_buffer,
        pad_last_batch=True,
        seed=reader_seed,
        name="reader",
    )
    radius = kernel_size // 2

    def geometry_of(height, width):
        return patch_geometry(height, width, crop=crop, radius=radius)

    window, geometry = _read_window(
        encoded, geometry_of, encoding=encoding, sub_size=sub_size, on_gpu=on_gpu
    )
    blur, noise = level_nodes(sampling, blur_values, noise_values)
    pair = _patch_pair(window, geometry, blur, noise, crop=crop, kernel_size=kernel_size)
    flipped = flip_pair(pair["degraded"], pair["clean"])
    z = fn.stack(blur / blur_max, noise / noise_max)
    outputs = [chw(flipped["degraded"]), chw(flipped["clean"]), z.gpu() if on_gpu else z]
    if debug:
        info = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
        outputs += [
            blur,
            noise,
            geometry["top_left"],
            flipped["hflip"],
            flipped["vflip"],
            flipped["transpose"],
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
    sampling: str = "uniform",
    encoding: str = "png",
    sub_size: int | None = None,
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

    ``encoding`` is the shards' (``png``, or ``raw`` with ``sub_size`` the side of a sample);
    ``sampling`` is ``degradation.sampling``. ``device_id=None`` builds the CPU-only pipeline;
    an integer builds the GPU one on that device (GPU image operators; levels and geometry stay
    CPU nodes, ``z`` is moved to the GPU). ``seed`` drives the reader's shuffle and every random
    operator. ``checkpoint`` (from ``Pipeline.checkpoint()`` or
    ``DALIGenericIterator.checkpoints()``) restores the reader position and random states.
    """
    if encoding == "raw" and not sub_size:
        raise LoaderError("raw shards need the sub-image size (shards.json crop_size)")
    ext = {"raw": "rgb", "png": "png"}.get(encoding)
    if ext is None:
        raise LoaderError(f"unknown shard encoding {encoding!r}")
    return _train_graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
        checkpoint=checkpoint,
        tars=list(tars),
        indices=list(indices),
        ext=ext,
        encoding=encoding,
        sub_size=sub_size,
        crop=crop,
        sampling=sampling,
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


def _external_batch(images: Sequence[np.ndarray], *levels: Sequence[float]) -> list[Any]:
    n = len(images)
    if not n or any(len(v) != n for v in levels):
        raise ValueError(
            f"need one value of each level/position per image ({n}, {[len(v) for v in levels]})"
        )
    batch = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
    return [batch] + [[np.float32(x) for x in v] for v in levels]


def _run(pipe: Pipeline, names: Sequence[str]) -> dict[str, np.ndarray]:
    pipe.build()
    return {name: _to_numpy(out) for name, out in zip(names, pipe.run(), strict=True)}


def run_degradation(
    images: Sequence[np.ndarray],
    blur: Sequence[float],
    noise: Sequence[float],
    *,
    kernel_size: int = 21,
    seed: int = 0,
    device_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Degrade given whole uint8 HxWx3 images with given levels in DALI (a test entry).

    Returns NCHW float32 arrays ``clean``, ``blurred`` (before noise), ``noisy`` (before
    clamping/quantisation) and ``degraded``, plus ``blur`` and ``noise`` as the graph saw them.
    Uses the graph pieces of the training pipeline (:mod:`pipeline.data.dali_graph`).
    """
    batch, levels_b, levels_n = _external_batch(images, blur, noise)
    pipe = Pipeline(batch_size=len(batch), num_threads=1, device_id=device_id, seed=seed)
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
            chw(clean), chw(nodes["blurred"]), chw(nodes["noisy"]), chw(nodes["degraded"]), b, s
        )
    return _run(pipe, ("clean", "blurred", "noisy", "degraded", "blur", "noise"))


def run_patch_degradation(
    images: Sequence[np.ndarray],
    tops: Sequence[int],
    lefts: Sequence[int],
    blur: Sequence[float],
    noise: Sequence[float],
    *,
    crop: int,
    kernel_size: int = 21,
    seed: int = 0,
    device_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Degrade the ``crop x crop`` patch at ``(tops[i], lefts[i])`` of each given uint8 image
    through the training graph's window path (steps 2, 5, 6: context window, window blur, noise,
    8 bits; no flips). A test entry: returns NCHW float32 ``clean``, ``blurred``, ``noisy``,
    ``degraded`` patches and the int32 window ``start``/``shape`` used."""
    batch, tops_f, lefts_f, levels_b, levels_n = _external_batch(images, tops, lefts, blur, noise)
    pipe = Pipeline(batch_size=len(batch), num_threads=1, device_id=device_id, seed=seed)
    with pipe:
        image = fn.external_source(source=[batch], cycle=False, layout="HWC")
        top = fn.external_source(source=[tops_f], cycle=False)
        left = fn.external_source(source=[lefts_f], cycle=False)
        b = fn.external_source(source=[levels_b], cycle=False)
        s = fn.external_source(source=[levels_n], cycle=False)
        extent = fn.cast(image.shape(), dtype=types.FLOAT)  # a CPU image: shape() is static
        geometry = window_geometry(
            top, left, extent[0], extent[1], crop=crop, radius=kernel_size // 2
        )
        window = fn.slice(image, start=geometry["start"], shape=geometry["shape"], axis_names="HW")
        if device_id is not None:
            window = window.gpu()
        pair = _patch_pair(window, geometry, b, s, crop=crop, kernel_size=kernel_size)
        pipe.set_outputs(
            *(chw(pair[k]) for k in ("clean", "blurred", "noisy", "degraded")),
            geometry["start"],
            geometry["shape"],
        )
    return _run(pipe, ("clean", "blurred", "noisy", "degraded", "start", "shape"))


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
        fixed_levels: tuple[float, float] | None = None,
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
            # ... and only a graph of the same operators (raw/png reading, level sampling)
            "encoding": shards.encoding,
            "sampling": deg.sampling,
            "fixed_levels": list(fixed_levels) if fixed_levels is not None else None,
        }
        self._len = batches_per_epoch(shards.num_samples, world_size, cfg.batch_size)
        self._pipeline_args = {
            "tars": shards.tars,
            "indices": shards.indices,
            "encoding": shards.encoding,
            "sub_size": shards.crop_size,
            "batch_size": cfg.batch_size,
            "crop": cfg.crop,
            # A fixed-degradation baseline (Unet/UGAN) draws from one-point "grids": every sample
            # at its (r, sigma), degraded on its context window like any other.
            "sampling": deg.sampling if fixed_levels is None else "uniform",
            "blur_values": (
                level_grid(deg.blur_max, deg.blur_step)
                if fixed_levels is None
                else [float(fixed_levels[0])]
            ),
            "noise_values": (
                level_grid(deg.noise_max, deg.noise_step)
                if fixed_levels is None
                else [float(fixed_levels[1])]
            ),
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
