"""Scores remembered by what was measured: the same restored pixels against the same clean
pixels, with the same metric code, weights, libraries and machine, give the numbers computed
before, bitwise, without running LPIPS/DISTS (VGG16 at 512 px is about a second per image on a
2-core CPU) again.

Every rerun of the ``evaluate`` stage scores the degraded input again (the reference a model
must beat; DVC reruns the stage whenever a model changes, and the input has not), a promotion
re-scores the champion, and a folder reference re-scores the same files. The key is the
content, not the name: a SHA-256 of

* the restored and the clean image, as the uint8 arrays scored (after ``size_mode``), with
  their shapes;
* the metric names asked for, and :meth:`~pipeline.evaluation.suite.MetricSuite.identity`:
  each metric's label, the digest of every parameter and buffer of its networks, the
  ``crop_border``, the digests of the metric code (``pipeline/metrics.py``, the suite, the
  uint8 -> float conversion), the versions of torch, torchmetrics, lpips and numpy, the
  device, the CPU model and its instruction-set flags, and torch's thread count (a
  convolution's float sums may differ between kernels, so another machine computes its own
  numbers).

So an entry can only be found by the computation that would give it again; nothing is ever
invalidated by hand. Each entry is one small JSON file, ``<cache>/scores/<ab>/<key>.json``
(``<cache>`` is :func:`pipeline.inference.choice.cache_dir`: ``$CUGAN_CACHE_DIR``, else
``~/.cache/cugan``), written atomically, so concurrent evaluations (the sweep's trials) never
see half a file; an unreadable entry is recomputed and rewritten, with a warning. A cache that
cannot be written costs a warning, never the evaluation. ``evaluate.score_cache: false`` turns
it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json

__all__ = ["ScoreCache", "pixels_digest"]

log = logging.getLogger(__name__)

#: Bump when the entry layout or the meaning of a key changes.
FORMAT = 1


def pixels_digest(image: np.ndarray) -> str:
    """SHA-256 of a uint8 image's shape and bytes (C order)."""
    if image.dtype != np.uint8:
        raise TypeError(f"scores are cached for uint8 images (got {image.dtype})")
    h = hashlib.sha256(repr(tuple(image.shape)).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


@dataclass
class ScoreCache:
    """Entries under ``root`` for one metric suite (``identity``, from
    :meth:`~pipeline.evaluation.suite.MetricSuite.identity`); counts what it served."""

    root: Path
    identity: Mapping[str, object]
    hits: int = 0
    misses: int = 0
    _suite_digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        text = json.dumps({"format": FORMAT, **self.identity}, sort_keys=True, default=str)
        self._suite_digest = hashlib.sha256(text.encode()).hexdigest()

    def key(self, restored: str, clean: str, names: Sequence[str]) -> str:
        """The entry key of one pair (pixel digests) scored with ``names``, in that order."""
        text = json.dumps([self._suite_digest, restored, clean, list(names)])
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, names: Sequence[str]) -> dict[str, float] | None:
        """The scores stored under ``key`` (``{name: value}`` in the order of ``names``), or
        None (counted as a miss)."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
            scores = {name: float(entry["scores"][name]) for name in names}
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("score cache: ignoring unreadable entry %s (%s); recomputing", path, err)
            self.misses += 1
            return None
        self.hits += 1
        return scores

    def put(self, key: str, scores: Mapping[str, float]) -> None:
        """Store ``scores`` under ``key`` (NaN and infinities as JSON's NaN/Infinity tokens,
        which Python reads back exactly); a failed write is a warning."""
        entry = {"format": FORMAT, "scores": {k: float(v) for k, v in scores.items()}}
        try:
            self.path(key).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path(key), entry)
        except OSError as err:
            log.warning("score cache: cannot write %s (%s); scores are not kept", self.root, err)

    def summary(self) -> str:
        total = self.hits + self.misses
        return f"{self.hits} of {total} scored pair(s) from the score cache {self.root}"
