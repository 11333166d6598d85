"""What the driver tells every training worker: a frozen, versioned :class:`WorkerConfig`.

The driver (:func:`pipeline.train.trainer.run_stage`) validates params.yaml once and builds
one ``WorkerConfig``; the per-worker loop (:mod:`pipeline.train.loop`) reads only its typed
fields, and every checkpoint stores :meth:`WorkerConfig.to_dict` in ``train_state.json``, so a
checkpoint says exactly which run wrote it.

How it crosses into the Ray workers -- deliberately as :meth:`to_dict`, rebuilt with
:meth:`from_dict` on the worker, not as a pickled object: on a cluster the driver and a worker
may run different installs of this package, and unpickling a pydantic model whose class has
changed restores its fields without validating them (or fails deep inside pickle). The dict
is the same versioned document the checkpoint holds; :meth:`from_dict` checks its version and
keys and re-validates the params with the worker's own schema (``parse_params``), so a
mismatch stops the worker with one line naming the cause. The worker code never sees the dict.

Test-only hooks (fault injection, synthetic tensors instead of shards) are not part of this
config: they travel beside it as :class:`pipeline.train.testing.TestHooks`, which production
code never builds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import ConfigError, Params, TrainStageParams, parse_params
from pipeline.tracking import TrackingTarget

__all__ = ["WORKER_CONFIG_VERSION", "WorkerConfig", "WorkerConfigError", "stage_params"]

#: Bumped whenever a field is added, removed or changes meaning.
WORKER_CONFIG_VERSION = 1
#: The keys of :meth:`WorkerConfig.to_dict`, all required by :meth:`WorkerConfig.from_dict`.
_KEYS = (
    "version",
    "params",
    "stage",
    "tracking",
    "shards_dir",
    "evalsets_dir",
    "init_dir",
    "threads",
)


class WorkerConfigError(ConfigError):
    """A worker config that cannot be used (one line naming the field)."""


def stage_params(params: Params, stage: str) -> TrainStageParams:
    """The ``train_<stage>`` section (e.g. ``cunet`` -> ``params.train_cunet``)."""
    section = getattr(params, f"train_{stage}", None)
    if not isinstance(section, TrainStageParams):
        raise WorkerConfigError(
            f"unknown training stage {stage!r} (no train_{stage} section in params)"
        )
    return section


def _optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one training worker needs, validated (module docstring).

    ``shards_dir`` is the data; it is None only when a test supplies synthetic tensors through
    :class:`~pipeline.train.testing.TestHooks`. ``evalsets_dir`` None: no validation while
    training. ``init_dir``: a generator checkpoint G starts from (CUGAN starts from CUnet).
    ``threads``: torch intra-op threads per worker (None: torch's default).
    """

    VERSION: ClassVar[int] = WORKER_CONFIG_VERSION

    params: Params
    stage: str
    tracking: TrackingTarget
    shards_dir: Path | None = None
    evalsets_dir: Path | None = None
    init_dir: Path | None = None
    threads: int | None = None
    # derived, not a constructor argument: the stage's params section, checked to exist
    stage_section: TrainStageParams = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Params):
            raise WorkerConfigError(f"worker config: params must be Params, not {self.params!r}")
        if not isinstance(self.tracking, TrackingTarget):
            raise WorkerConfigError(
                f"worker config: tracking must be a TrackingTarget, not {self.tracking!r}"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise WorkerConfigError(
                f"worker config: threads must be a positive integer (got {self.threads!r})"
            )
        for name in ("shards_dir", "evalsets_dir", "init_dir"):
            object.__setattr__(self, name, _optional_path(getattr(self, name)))
        object.__setattr__(self, "stage_section", stage_params(self.params, self.stage))

    @property
    def tag(self) -> str:
        """``train_<stage>``: the section name, used in log lines and checkpoints."""
        return f"train_{self.stage}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: what Ray carries to the workers and what every checkpoint records."""
        return {
            "version": self.VERSION,
            "params": self.params.model_dump(mode="json"),
            "stage": self.stage,
            "tracking": self.tracking.to_dict(),
            "shards_dir": _str(self.shards_dir),
            "evalsets_dir": _str(self.evalsets_dir),
            "init_dir": _str(self.init_dir),
            "threads": self.threads,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "worker config") -> WorkerConfig:
        """Inverse of :meth:`to_dict`; one :class:`WorkerConfigError` line for a wrong version,
        a missing or unknown key, or a bad value (params: :func:`pipeline.config.parse_params`).
        """
        if not isinstance(data, Mapping):
            raise WorkerConfigError(f"{source}: not a mapping ({type(data).__name__})")
        version = data.get("version")
        if version != cls.VERSION:
            raise WorkerConfigError(
                f"{source}: version {version!r}, this code reads version {cls.VERSION}"
            )
        keys = set(_KEYS)
        unknown, missing = sorted(set(data) - keys), sorted(keys - set(data))
        if unknown:
            raise WorkerConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        if missing:
            raise WorkerConfigError(f"{source}: missing key(s) {', '.join(missing)}")
        params = parse_params(data["params"], source=f"{source} params")
        if not isinstance(data["stage"], str):
            raise WorkerConfigError(f"{source}: stage must be a string (got {data['stage']!r})")
        try:
            stage_params(params, data["stage"])
        except WorkerConfigError as err:
            raise WorkerConfigError(f"{source}: {err}") from None
        try:
            tracking = TrackingTarget.from_dict(data["tracking"])
        except (TypeError, ValueError) as err:
            raise WorkerConfigError(f"{source}: tracking: {err}") from None
        for name in ("shards_dir", "evalsets_dir", "init_dir"):
            if data[name] is not None and not isinstance(data[name], str):
                raise WorkerConfigError(f"{source}: {name} must be a path string or null")
        return cls(
            params=params,
            stage=data["stage"],
            tracking=tracking,
            shards_dir=data["shards_dir"],
            evalsets_dir=data["evalsets_dir"],
            init_dir=data["init_dir"],
            threads=data["threads"],
        )


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
