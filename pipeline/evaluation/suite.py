"""The metric callables of one evaluation (:class:`MetricSuite`), built once: LPIPS and DISTS
hold networks, and whether their backbones have real weights is recorded with every number.

* PSNR and SSIM (:mod:`pipeline.metrics`) on RGB and on Y (BT.601, MATLAB ``rgb2ycbcr``), with
  ``crop_border`` pixels cut from every side first (0 by default: the paper does not crop).
* LPIPS (AlexNet v0.1, inputs in [0, 1] with ``normalize=True``) and DISTS. Computed with random
  backbone weights (no ImageNet weights offline) they are numbers about nothing: they keep their
  key but are labelled (``labels``, ``random``) wherever they appear.

Several restorations of ONE clean image are scored together (:meth:`MetricSuite.score_many`,
inside :meth:`MetricSuite.reference` for a whole image): LPIPS and DISTS compute the clean
image's backbone features once, not once per restoration (:meth:`pipeline.metrics.LPIPSMetric.
reference`). Every pair is still computed by the libraries' own forward, one pair per call, so
every number equals the one-pair call bitwise (the tests check it); PSNR/SSIM are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline import metrics
from pipeline.evaluation.terms import HIGHER_IS_BETTER, PERCEPTUAL, EvalError

__all__ = ["MetricSuite"]


class MetricSuite:
    """The metric callables for one evaluation.

    ``names`` selects from :data:`~pipeline.evaluation.terms.HIGHER_IS_BETTER`. ``labels`` says
    what each number is; ``random[name]`` is True where a backbone had random weights.
    """

    def __init__(
        self,
        names: Iterable[str],
        *,
        crop_border: int = 0,
        pretrained: str = "auto",
        weights_dir: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.names = tuple(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in HIGHER_IS_BETTER]
        if unknown:
            raise EvalError(f"unknown metric {unknown[0]!r} (known: {', '.join(HIGHER_IS_BETTER)})")
        self.crop_border = int(crop_border)
        self.device = torch.device(device)
        self.labels: dict[str, str] = {}
        self.random: dict[str, bool] = {}
        self._perceptual: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
        self._identity: dict[str, object] | None = None
        for name in self.names:
            if name in PERCEPTUAL:
                cls = metrics.LPIPSMetric if name == "lpips" else metrics.DISTSMetric
                metric = cls(pretrained=pretrained, cache_dir=weights_dir)
                if isinstance(metric, torch.nn.Module):
                    metric = metric.to(self.device)
                self._perceptual[name] = metric
                self.random[name] = _is_random(metric)
                self.labels[name] = str(metric.label)
            else:
                kind, space = name.split("_")
                self.random[name] = False
                self.labels[name] = (
                    f"{kind.upper()} on {'Y (BT.601)' if space == 'y' else 'RGB'}, "
                    f"crop_border={self.crop_border}"
                )

    def identity(self) -> dict[str, object]:
        """Everything this suite's numbers depend on besides the two images (the key of
        :mod:`pipeline.evaluation.score_cache`): per metric its label and the digest of its
        networks' parameters and buffers; the crop, the device, the metric code, the library
        versions, the CPU and torch's threads. Computed once (hashing VGG16 takes ~0.1 s)."""
        if self._identity is None:
            from pipeline.inference.choice import cpu_features

            self._identity = {
                "metrics": {
                    name: {
                        "label": self.labels[name],
                        "weights": _weights_digest(self._perceptual[name])
                        if name in self._perceptual
                        else None,
                    }
                    for name in self.names
                },
                "crop_border": self.crop_border,
                "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device)
                if self.device.type == "cuda"
                else None,
                "code": _code_digest(),
                "versions": {
                    pkg: _version(pkg) for pkg in ("torch", "torchmetrics", "lpips", "numpy")
                },
                "cpu": cpu_features(),
                "threads": torch.get_num_threads(),
            }
        return self._identity

    @property
    def any_random(self) -> bool:
        return any(self.random.values())

    def __call__(
        self, restored: Tensor, clean: Tensor, names: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Scores of one restored ``[1, 3, H, W]`` image against its clean image, both in
        [0, 1]: every metric of the suite, or the subset ``names``."""
        return self.score_many([restored], clean, names)[0]

    def reference(self) -> contextlib.AbstractContextManager[object]:
        """Within the block, no perceptual backbone recomputes the features of an image it saw
        before: open it around everything scored against one clean image."""
        stack = contextlib.ExitStack()
        for metric in self._perceptual.values():
            if hasattr(metric, "reference"):
                stack.enter_context(metric.reference())
        return stack

    def score_many(
        self, restored: Sequence[Tensor], clean: Tensor, names: Sequence[str] | None = None
    ) -> list[dict[str, float]]:
        """Scores of several restorations ``[1, 3, H, W]`` of one clean ``[1, 3, H, W]`` image,
        in order, each ``{metric: value}`` in the order of ``names`` (default: the suite's)."""
        names = tuple(names or self.names)
        clean = clean.to(self.device)
        out: list[dict[str, float]] = []
        with torch.inference_mode(), self.reference():
            for r in restored:
                r = r.to(self.device)
                scores: dict[str, float] = {}
                for name in names:
                    if name in self._perceptual:
                        value = self._perceptual[name](r, clean)
                    else:
                        fn = metrics.psnr if name.startswith("psnr") else metrics.ssim
                        value = fn(
                            r, clean, crop_border=self.crop_border, y_channel=name.endswith("_y")
                        )
                    scores[name] = float(value.reshape(-1)[0])
                out.append(scores)
        return out


def _weights_digest(metric: Any) -> str | None:
    """SHA-256 over a metric network's state (names, dtypes, shapes, bytes), else None."""
    if not isinstance(metric, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for name, tensor in sorted(metric.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@cache
def _code_digest() -> str:
    """SHA-256 of the code that computes the numbers from two uint8 images: pipeline/metrics.py,
    this module, and the uint8 -> [0, 1] conversion the scoring applies first."""
    from pipeline import metrics as metrics_module
    from pipeline.degradation import to_tensor

    h = hashlib.sha256()
    for path in (Path(metrics_module.__file__), Path(__file__)):
        h.update(path.read_bytes())
    h.update(inspect.getsource(to_tensor).encode())
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _is_random(metric: Any) -> bool:
    """Whether a perceptual metric runs on random backbone weights (attribute, else its label)."""
    for attr in ("is_random", "random_weights"):
        if isinstance(getattr(metric, attr, None), bool):
            return bool(getattr(metric, attr))
    return "random" in str(getattr(metric, "label", "")).lower()
