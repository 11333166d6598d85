"""Inference: restoring images with a generator, on the fastest exact path of this machine.

The modules, lowest first (each imports only those above it):

* :mod:`~pipeline.inference.geometry` -- padding to the size multiple, tiling, the receptive
  field; runs a path over an image's pieces;
* :mod:`~pipeline.inference.export` -- the ONNX export (``cugan export``), verified with ONNX
  Runtime;
* :mod:`~pipeline.inference.paths` -- the inference paths (eager, channels_last, compile,
  onnx, bf16, bf16_channels_last) and how each is built;
* :mod:`~pipeline.inference.choice` -- which path, on this machine: capability rules, a short
  probe cached per machine, exactness and tolerance checks, the workload's cost;
* :mod:`~pipeline.inference.prepared` -- a generator bound to its chosen path
  (:func:`prepare_model`);
* :mod:`~pipeline.inference.restore` -- :func:`restore`: one uint8 image in, one out;
* :mod:`~pipeline.inference.loading` -- checkpoints and DNI blends for inference.

Every consumer (``cugan restore``, evaluation, figures, training validation, the studio) calls
:func:`restore`; a plain generator gets the path :func:`choose_path` picks for it, a
:class:`PreparedModel` brings its own (made with a workload and explicit overrides).
"""

from pipeline.inference.choice import (
    BF16_TOLERANCE,
    PathChoice,
    Workload,
    choose_path,
    cpu_features,
)
from pipeline.inference.errors import ExportError, InferenceError, PathUnavailable
from pipeline.inference.export import export_onnx, onnx_bytes
from pipeline.inference.geometry import (
    AUTO_TILE_MAX_PIXELS,
    AUTO_TILE_SIZE,
    Progress,
    auto_tile,
    receptive_field_radius,
    tile_layout,
)
from pipeline.inference.loading import (
    REGISTERED_MODEL_PREFIX,
    InferenceModel,
    ModelArgumentNames,
    load_checkpoint_for_inference,
    load_model_for_inference,
)
from pipeline.inference.paths import Backend, PathSpec, Precision
from pipeline.inference.prepared import PreparedModel, prepare_model
from pipeline.inference.restore import restore, validate_z, validate_z_map

__all__ = [
    "AUTO_TILE_MAX_PIXELS",
    "AUTO_TILE_SIZE",
    "BF16_TOLERANCE",
    "REGISTERED_MODEL_PREFIX",
    "Backend",
    "ExportError",
    "InferenceError",
    "InferenceModel",
    "ModelArgumentNames",
    "PathChoice",
    "PathSpec",
    "PathUnavailable",
    "Precision",
    "PreparedModel",
    "Progress",
    "Workload",
    "auto_tile",
    "choose_path",
    "cpu_features",
    "export_onnx",
    "load_checkpoint_for_inference",
    "load_model_for_inference",
    "onnx_bytes",
    "prepare_model",
    "receptive_field_radius",
    "restore",
    "tile_layout",
    "validate_z",
    "validate_z_map",
]
