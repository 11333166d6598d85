"""Resolution of torchvision's ImageNet backbones (VGG19, VGG16, AlexNet) without surprises.

Three pretrained models feed the pipeline: VGG19 for the perceptual loss, AlexNet for LPIPS and
VGG16 for DISTS. torchvision would download them silently on first use; our machines have no
internet, and a metric computed on a randomly initialised backbone is a meaningless number. So
every consumer resolves its backbone here, in one of three modes:

* ``imagenet``: the real weights or an error. The file must be in the cache (or torch hub's
  checkpoint directory), or be downloadable; otherwise :class:`PretrainedWeightsMissing` says in
  one line which file, from which URL, into which directory.
* ``auto``: ``imagenet`` when it can be had, else a loud warning banner and random weights
  (``is_random=True``); consumers put that in their labels so no number hides it.
* ``random``: random weights, no file or network access (tests).

Files are the official torchvision downloads (``IMAGENET1K_V1``), checked against their full
sha256 and size before ``torch.load(weights_only=True)`` touches them; downloads go to a
temporary name in the cache directory and are renamed only once verified.

Cache directory: the ``cache_dir`` argument, else ``$CUGAN_WEIGHTS_DIR``, else
``~/.cache/cugan/weights``. A verified file already in torch hub's ``checkpoints`` directory
(``$TORCH_HOME/hub/checkpoints``) is used as well, so weights torchvision fetched before count.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from pipeline.atomic import atomic_output
from pipeline.errors import one_line, os_error_reason

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BackboneWeights",
    "PretrainedWeightsInvalid",
    "PretrainedWeightsMissing",
    "WeightsDownloadError",
    "download_weights",
    "resolve_backbone",
    "weights_dir",
]

log = logging.getLogger(__name__)

BackboneName = Literal["vgg19", "vgg16", "alexnet"]
PretrainedMode = Literal["imagenet", "auto", "random"]

ENV_WEIGHTS_DIR = "CUGAN_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/cugan/weights")
# Socket timeout per blocking operation. Without a route out, name resolution fails at once;
# a silently dropped connection is given up after this many seconds.
DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


class PretrainedWeightsMissing(RuntimeError):
    """The ImageNet weights are needed (mode ``imagenet``) but cannot be had; one-line message."""


class PretrainedWeightsInvalid(PretrainedWeightsMissing):
    """A weights file exists but its size or sha256 is wrong (truncated, corrupt, another file)."""


class WeightsDownloadError(RuntimeError):
    """A download attempt failed (no network, HTTP error, wrong hash); one-line reason."""


@dataclass(frozen=True)
class BackboneSpec:
    """One official torchvision checkpoint: where it comes from and what it must hash to."""

    name: str
    filename: str
    url: str
    sha256: str
    size: int


# torchvision IMAGENET1K_V1 checkpoints. The file names carry the first 8 hex digits of the
# sha256 (torch.hub checks that prefix); the full digests and sizes below are those of the files
# at these URLs, each agreeing with its prefix.
BACKBONES: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec(
        name="vgg19",
        filename="vgg19-dcbb9e9d.pth",
        url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
        sha256="dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44",
        size=574_673_361,
    ),
    "vgg16": BackboneSpec(
        name="vgg16",
        filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        size=553_433_881,
    ),
    "alexnet": BackboneSpec(
        name="alexnet",
        filename="alexnet-owt-7be5be79.pth",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        size=244_408_911,
    ),
}


@dataclass(frozen=True)
class BackboneWeights:
    """What a consumer loads: a torchvision state dict, or None to keep its random init.

    ``label`` names the weights for logs and metric labels, e.g. ``"vgg19 imagenet
    (vgg19-dcbb9e9d.pth)"`` or ``"vgg19 [RANDOM weights: not comparable]"``.
    """

    state_dict: dict[str, Tensor] | None
    is_random: bool
    label: str
    path: Path | None = None


def weights_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir`` > ``$CUGAN_WEIGHTS_DIR`` > ``~/.cache/cugan/weights``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_WEIGHTS_DIR.expanduser()


def _hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def _file_problem(path: Path, spec: BackboneSpec) -> str | None:
    """None if ``path`` is the expected file, else a short reason (size, then sha256)."""
    size = path.stat().st_size
    if size != spec.size:
        return f"{path} has {size} bytes, expected {spec.size}"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != spec.sha256:
        return f"{path} has sha256 {digest.hexdigest()[:16]}..., expected {spec.sha256[:16]}..."
    return None


def download_weights(
    spec: BackboneSpec, dest_dir: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Download ``spec`` into ``dest_dir`` atomically (temp name, verify, rename).

    Raises :class:`WeightsDownloadError` with a one-line reason on any failure; no partial file
    is left behind (:func:`pipeline.atomic.atomic_output` discards it when the check fails).
    """
    final = dest_dir / spec.filename
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsDownloadError(f"cannot write to {dest_dir}: {os_error_reason(err)}") from None
    try:
        log.info("downloading %s from %s", spec.filename, spec.url)
        with (
            atomic_output(final) as out,
            urllib.request.urlopen(spec.url, timeout=timeout) as resp,
        ):
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
            out.flush()
            problem = _file_problem(Path(out.name), spec)
            if problem is not None:
                raise WeightsDownloadError(f"downloaded file rejected: {problem}")
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise WeightsDownloadError(f"download of {spec.url} failed: {one_line(reason)}") from None
    log.info("saved %s (sha256 verified)", final)
    return final


def _load(path: Path, spec: BackboneSpec) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsInvalid(f"{path} is not a state dict of tensors ({spec.filename})")
    return state


def _missing_message(spec: BackboneSpec, directory: Path, reasons: list[str]) -> str:
    """One line: every reason is already one (file problems, :class:`WeightsDownloadError`)."""
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return (
        f"{spec.name} ImageNet weights unavailable{why}: download {spec.url} and put "
        f"{spec.filename} (sha256 {spec.sha256[:16]}...) in {directory}, or set "
        f"${ENV_WEIGHTS_DIR}, or choose pretrained 'random' (numbers not comparable)"
    )


def _random(spec: BackboneSpec) -> BackboneWeights:
    return BackboneWeights(None, True, f"{spec.name} [RANDOM weights: not comparable]")


def _warn_random(spec: BackboneSpec, message: str) -> None:
    bar = "!" * 100
    log.warning(
        "\n%s\n!! USING RANDOM %s WEIGHTS (pretrained='auto'): results are NOT comparable to "
        "published numbers.\n!! %s\n%s",
        bar,
        spec.name.upper(),
        message,
        bar,
    )


def resolve_backbone(
    name: BackboneName,
    mode: PretrainedMode = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
) -> BackboneWeights:
    """Find (or fetch) the ImageNet weights of ``name`` according to ``mode``.

    Args:
        name: ``"vgg19"``, ``"vgg16"`` or ``"alexnet"``.
        mode: ``"imagenet"``, ``"auto"`` or ``"random"`` (module docstring).
        cache_dir: where weights live; see :func:`weights_dir`.
        download: try the official URL when no verified file is found.

    Raises:
        PretrainedWeightsMissing: mode ``imagenet`` and no verified file could be had
            (:class:`PretrainedWeightsInvalid` when a file was found but failed verification).
    """
    spec = _spec(name)
    if mode not in ("imagenet", "auto", "random"):
        raise ValueError(f"pretrained mode must be 'imagenet', 'auto' or 'random' (got {mode!r})")
    if mode == "random":
        return _random(spec)

    directory = weights_dir(cache_dir)
    reasons: list[str] = []
    invalid = False
    for candidate in (directory / spec.filename, _hub_checkpoints_dir() / spec.filename):
        if not candidate.is_file():
            continue
        problem = _file_problem(candidate, spec)
        if problem is None:
            return _loaded(candidate, spec)
        log.error("rejecting %s", problem)
        reasons.append(f"rejected {problem}")
        invalid = True

    if download:
        try:
            return _loaded(download_weights(spec, directory), spec)
        except WeightsDownloadError as err:
            reasons.append(str(err))
    else:
        reasons.append("not found, download disabled")

    message = _missing_message(spec, directory, reasons)
    if mode == "imagenet":
        raise (PretrainedWeightsInvalid if invalid else PretrainedWeightsMissing)(message)
    _warn_random(spec, message)
    return _random(spec)


def _loaded(path: Path, spec: BackboneSpec) -> BackboneWeights:
    log.info("using %s weights from %s", spec.name, path)
    label = f"{spec.name} imagenet ({spec.filename})"
    return BackboneWeights(_load(path, spec), False, label, path)
