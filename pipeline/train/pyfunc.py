"""The restoration model as an MLflow pyfunc: (image, z) and an ``alpha`` param -> image.

Input (a dict of arrays; tensor-based signature)::

    image  uint8 [B, H, W, 3]   RGB (any size; padded internally to the generator's multiple)
    z      float32 [B, 2]       [blur / 4, noise / 50], each in [0, 1]

Param ``alpha`` (float, default 1.0): the DNI slider of the method, ``theta = (1 - alpha) *
theta_GAN + alpha * theta_MSE`` over all of G and C_G (:mod:`models.dni`). The ``cugan`` model
carries both generators (the CUnet it started from, and the GAN-trained one) so any alpha in
[0, 1] works; the ``cunet`` model carries the MSE generator only and accepts alpha = 1 alone.
Output: uint8 [B, H, W, 3].

Example::

    model = mlflow.pyfunc.load_model("models:/cugan/1")
    out = model.predict({"image": img[None], "z": np.array([[0.5, 0.6]], np.float32)},
                        params={"alpha": 0.3})

The model is logged "from code" (``pyfunc_entry.py``, which calls ``mlflow.models.set_model``)
with its code (``models/`` and ``pipeline/``) stored beside it (``code_paths``), and the weights
are the safetensors checkpoints of :mod:`pipeline.checkpoint`: loading it unpickles nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException

__all__ = [
    "CuganPyfunc",
    "LoggedModel",
    "log_restoration_model",
    "log_saved_model",
    "model_signature",
    "save_restoration_model",
]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]


class CuganPyfunc(mlflow.pyfunc.PythonModel):
    """See the module docstring. Device: ``$CUGAN_DEVICE`` (default ``auto``: CUDA if present).

    ``predict`` has no type hints on purpose: the tensor signature given at logging time is
    the schema (MLflow's type-hint inference does not cover dicts of arrays). MLflow warns
    about that at class creation under a filter of its own that callers cannot override; the
    class flag below is its opt-out (the one ChatModel uses).
    """

    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from pipeline.checkpoint import load_generator

        self._mse, _ = load_generator(context.artifacts["mse"])
        gan_dir = context.artifacts.get("gan")
        self._gan = load_generator(gan_dir)[0] if gan_dir else None
        self._blended: tuple[float, Any] | None = None

    def _model(self, alpha: float) -> Any:
        from models.dni import blend_generators, check_alpha

        alpha = check_alpha(alpha)
        if self._gan is None:
            if alpha != 1.0:
                raise ValueError("this model has no GAN generator: alpha must be 1 (the MSE model)")
            return self._mse
        if alpha == 1.0:
            return self._mse
        if alpha == 0.0:
            return self._gan
        if self._blended is None or self._blended[0] != alpha:
            self._blended = (alpha, blend_generators(self._mse, self._gan, alpha))
        return self._blended[1]

    def predict(self, context, model_input, params=None):
        from pipeline.inference import restore

        params = params or {}
        alpha = float(params.get("alpha", 1.0))
        images = np.asarray(model_input["image"])
        z = np.asarray(model_input["z"], dtype=np.float32)
        if images.ndim == 3:
            images = images[None]
        if z.ndim == 1:
            z = z[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 [B, H, W, 3] (got {images.dtype} {list(images.shape)})"
            )
        if len(z) != len(images):
            raise ValueError(f"{len(images)} image(s) but {len(z)} z vector(s)")
        model = self._model(alpha)
        device = os.environ.get("CUGAN_DEVICE", "auto")
        return np.stack(
            [restore(model, img, zi, device=device) for img, zi in zip(images, z, strict=True)]
        )


def model_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "image"),
                TensorSpec(np.dtype(np.float32), (-1, 2), "z"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema([ParamSpec("alpha", "float", 1.0)]),
    )


def _input_example(size: int = 32) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    return {
        "image": gen.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
        "z": np.array([[0.5, 0.6]], dtype=np.float32),
    }


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "numpy", "safetensors", "pydantic", "pyyaml"):
        try:
            version = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
            continue
        reqs.append(f"{dist}=={version.split('+')[0]}")
    return reqs


def _stage(
    staging: Path, mse_dir: Path, gan_dir: Path | None, code_root: Path = _REPO
) -> tuple[dict[str, str], list[str]]:
    """Copy only what the model needs: generator files and the two code packages (from this
    checkout, or from ``code_root``: the code a saved model carries)."""
    artifacts = {}
    for name, src in (("mse", mse_dir), ("gan", gan_dir)):
        if src is None:
            continue
        dest = staging / name
        dest.mkdir()
        for fname in ("generator.safetensors", "generator.json"):
            shutil.copy2(Path(src) / fname, dest / fname)
        artifacts[name] = str(dest)
    code = []
    for package in ("models", "pipeline"):
        dest = staging / "code" / package
        shutil.copytree(
            code_root / package, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        code.append(str(dest))
    return artifacts, code


def _kwargs(artifacts: dict[str, str], code: list[str]) -> dict[str, Any]:
    return {
        "python_model": str(Path(__file__).with_name("pyfunc_entry.py")),
        "artifacts": artifacts,
        "code_paths": code,
        "signature": model_signature(),
        "input_example": (_input_example(), {"alpha": 1.0}),
        "pip_requirements": _requirements(),
    }


@dataclass(frozen=True)
class LoggedModel:
    """Where :func:`log_restoration_model` put the model: its URI and, if it registered it,
    the registered name and version (what the stage records in ``tracking.json``)."""

    model_uri: str
    registered_name: str | None = None
    registered_version: str | None = None

    @property
    def registered(self) -> dict[str, str] | None:
        if self.registered_name is None or self.registered_version is None:
            return None
        return {"name": self.registered_name, "version": self.registered_version}


def log_restoration_model(
    *,
    tracking_uri: str,
    run_id: str,
    mse_dir: str | os.PathLike[str],
    gan_dir: str | os.PathLike[str] | None = None,
    registered_name: str | None = None,
    code_root: str | os.PathLike[str] | None = None,
) -> LoggedModel:
    """Log the pyfunc model into run ``run_id`` (and register it as ``registered_name``)."""
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, code = _stage(
            Path(tmp),
            Path(mse_dir),
            Path(gan_dir) if gan_dir else None,
            Path(code_root) if code_root is not None else _REPO,
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", registered_model_name=registered_name, **_kwargs(artifacts, code)
            )
    version = getattr(info, "registered_model_version", None)
    if registered_name is not None and version is None:
        raise MlflowException(
            f"MLflow logged {info.model_uri} but returned no registered version of "
            f"{registered_name!r}"
        )
    log.info(
        "MLflow: logged model %s%s",
        info.model_uri,
        f", registered as {registered_name!r} version {version}" if registered_name else "",
    )
    return LoggedModel(
        info.model_uri, registered_name, str(version) if version is not None else None
    )


def log_saved_model(
    tracking_uri: str, run_id: str, saved_dir: Path, registered_name: str | None
) -> tuple[str, str | None]:
    """Log a model :func:`save_restoration_model` wrote (a tracking fallback's) into a run and
    register it, exactly as the stage would have: the same generators and the code the saved
    model carries. The :data:`pipeline.tracking.ModelLogger` of ``cugan tracking sync``."""
    saved = Path(saved_dir)
    gan = saved / "artifacts" / "gan"
    logged = log_restoration_model(
        tracking_uri=tracking_uri,
        run_id=run_id,
        mse_dir=saved / "artifacts" / "mse",
        gan_dir=gan if gan.is_dir() else None,
        registered_name=registered_name,
        code_root=saved / "code",
    )
    return logged.model_uri, logged.registered_version


def save_restoration_model(
    path: str | os.PathLike[str],
    *,
    mse_dir: str | os.PathLike[str],
    gan_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The same model saved to a local directory (used when the tracking store is unavailable)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, code = _stage(Path(tmp), Path(mse_dir), Path(gan_dir) if gan_dir else None)
        mlflow.pyfunc.save_model(str(path), **_kwargs(artifacts, code))
    return path
