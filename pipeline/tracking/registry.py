"""The MLflow model registry: versions, aliases, version tags, downloads, and the one resolver
of ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` to a local generator checkpoint.

What the training stages register (``cunet``, ``cugan``; :mod:`pipeline.train.pyfunc`) is a
pyfunc model whose artifacts hold the safetensors generators: ``artifacts/mse`` and, for a GAN
stage, ``artifacts/gan`` (the two ends of the alpha slider). :meth:`ModelRegistry.download`
returns one of those checkpoint directories, never the pickled model. A download records which
version it holds (:data:`DOWNLOAD_RECORD`), so that a caller keeping a cache of downloads
(``reuse``: the inference loader's) can tell a complete copy of the same version, whose
checkpoint passes its own sha256 check, from anything else, which is downloaded again.

Errors are sorted, so that a caller can decide on them: :class:`NotRegistered` (a name,
version or alias that does not exist: one line naming it) is a :class:`RegistryError`, which
is every other failure of the registry (an unreachable server, a store error), also one line.
:meth:`ModelRegistry.alias_holder` answers None only where the alias (or the model) does not
exist, and raises on everything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from pipeline.atomic import atomic_write_json, staging_dir
from pipeline.checkpoint import JSON_NAME as GENERATOR_FILE  # marks a checkpoint directory
from pipeline.checkpoint import CheckpointError, read_generator_document
from pipeline.errors import one_line
from pipeline.tracking.store import TRACKING_ERRORS, tracking_client

__all__ = [
    "DOWNLOAD_RECORD",
    "ModelRegistry",
    "ModelUri",
    "NotRegistered",
    "RegisteredVersion",
    "RegistryError",
    "is_model_uri",
    "parse_model_uri",
    "resolve_model_uri",
]


#: The file a download writes beside the artifacts: which store, model, version and source.
DOWNLOAD_RECORD = "registered-version.json"


class RegistryError(RuntimeError):
    """The registry could not answer (one-line message naming the model)."""


class NotRegistered(RegistryError):
    """The registered model, version or alias does not exist (one-line message naming it)."""


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model, as plain data (no MLflow entity leaves this module)."""

    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def _of(cls, mv: Any) -> RegisteredVersion:
        return cls(
            name=str(mv.name),
            version=str(mv.version),
            run_id=str(mv.run_id) if mv.run_id else None,
            source=str(mv.source or ""),
            aliases=tuple(getattr(mv, "aliases", None) or ()),
            tags=dict(mv.tags or {}),
        )


def _is_missing(err: MlflowException, what: str) -> bool:
    """A "does not exist" answer. SQL stores answer a missing alias of an existing model with
    INVALID_PARAMETER_VALUE, which also covers malformed requests: that code counts only with
    the store's "not found" wording about the thing asked for."""
    code, text = getattr(err, "error_code", None), str(err).lower()
    if code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return True
    return code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and what in text and "not found" in text


@contextlib.contextmanager
def _registry_call(where: str, missing: str | None = None) -> Iterator[None]:
    """Registry failures -> one line; :class:`NotRegistered` where the thing (``missing``,
    e.g. ``"alias"``) does not exist, :class:`RegistryError` for everything else."""
    try:
        yield
    except TRACKING_ERRORS as err:
        if isinstance(err, MlflowException) and missing is not None and _is_missing(err, missing):
            raise NotRegistered(f"{where}: {one_line(err)}") from None
        what = "" if isinstance(err, MlflowException) else f"{type(err).__name__}: "
        raise RegistryError(f"{where}: {what}{one_line(err)}") from None


class ModelRegistry:
    """The registry of one tracking store."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = tracking_client(tracking_uri)

    # -- look-ups ------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        """Whether a registered model of that name exists (with or without versions)."""
        try:
            with _registry_call(f"registered model {name!r}", missing="model"):
                self._client.get_registered_model(name)
        except NotRegistered:
            return False
        return True

    def versions(self, name: str) -> list[RegisteredVersion]:
        """Every version of ``name``, oldest first (none for an unknown name)."""
        with _registry_call(f"registered model {name!r}"):
            found = self._client.search_model_versions(f"name = '{name}'")
        return sorted((RegisteredVersion._of(v) for v in found), key=lambda v: int(v.version))

    def latest_version(self, name: str) -> RegisteredVersion | None:
        """The newest version of ``name`` (highest number), or None if it has none."""
        versions = self.versions(name)
        return versions[-1] if versions else None

    def version(self, name: str, version: str | int) -> RegisteredVersion:
        """One version; :class:`NotRegistered` if the model or the version does not exist."""
        with _registry_call(f"models:/{name}/{version}", missing="version"):
            return RegisteredVersion._of(self._client.get_model_version(name, str(version)))

    def alias_holder(self, name: str, alias: str) -> RegisteredVersion | None:
        """The version holding ``alias``; None where the alias or the model does not exist.
        Any other failure is a :class:`RegistryError` (never read as "no holder")."""
        try:
            with _registry_call(f"models:/{name}@{alias}", missing="alias"):
                mv = self._client.get_model_version_by_alias(name, alias)
        except NotRegistered:
            return None
        return RegisteredVersion._of(mv)

    def lookup(self, uri: str) -> RegisteredVersion:
        """The version a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI names now;
        :class:`NotRegistered` (one line naming it) for a missing model, version or alias."""
        ref = parse_model_uri(uri)
        if ref.version is not None:
            return self.version(ref.name, ref.version)
        holder = self.alias_holder(ref.name, str(ref.alias))
        if holder is None:
            if not self.exists(ref.name):
                raise NotRegistered(
                    f"{uri}: no registered model {ref.name!r} in {self.tracking_uri}"
                )
            raise NotRegistered(f"{uri}: model {ref.name!r} has no alias {ref.alias!r}")
        return holder

    # -- changes -------------------------------------------------------------------------------

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        with _registry_call(f"models:/{name}/{version}", missing="version"):
            for key, value in tags.items():
                self._client.set_model_version_tag(name, version, key, str(value))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (moving it from the version that held it)."""
        with _registry_call(f"models:/{name}@{alias} -> version {version}", missing="version"):
            self._client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        with _registry_call(f"models:/{name}@{alias}", missing="alias"):
            self._client.delete_registered_model_alias(name, alias)

    # -- files ---------------------------------------------------------------------------------

    def download(
        self,
        name: str,
        version: str,
        dst: str | os.PathLike[str],
        *,
        prefer: str | None = None,
        strict: bool = False,
        reuse: bool = False,
    ) -> Path:
        """Download a version's artifacts into ``dst`` (replacing it whole, or leaving it as it
        was on failure) and return the generator checkpoint directory in them (a directory
        holding ``generator.json``).

        ``prefer`` picks the directory of that name (``mse`` / ``gan``: the kinds the training
        stages store) when there are several. Without it, the shallowest one is returned (for
        a CUGAN model: ``gan``, the generator that stage trained). ``strict`` makes ``prefer``
        a requirement: a version without a directory of that name is a :class:`RegistryError`
        (the promotion rule scores exactly the kind it names, never a stand-in).

        ``reuse``: where ``dst`` already holds a download of this very version (the same
        store, name, version and source, as its :data:`DOWNLOAD_RECORD` says) whose chosen
        checkpoint passes its sha256 check, return that without downloading; anything else in
        ``dst`` is replaced by a fresh download.
        """
        where = f"models:/{name}/{version}"
        record = self._record(name, version)
        final = Path(dst).absolute()  # MLflow answers with absolute paths
        if reuse:
            cached = _reusable(final, record, where, prefer, strict)
            if cached is not None:
                return cached
        with _registry_call(where, missing="version"):
            uri = self._client.get_model_version_download_uri(name, version)
        with staging_dir(final) as tmp:
            with _registry_call(f"{where}: download of {uri}"):
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=uri, dst_path=str(tmp), tracking_uri=self.tracking_uri
                    )
                ).absolute()
            chosen = _pick(local, where, prefer, strict, uri).relative_to(tmp)
            atomic_write_json(tmp / DOWNLOAD_RECORD, record)
        return final / chosen

    def _record(self, name: str, version: str) -> dict[str, str | None]:
        """What a download of ``name``/``version`` holds (its :data:`DOWNLOAD_RECORD`)."""
        held = self.version(name, version)
        return {
            "tracking_uri": self.tracking_uri,
            "name": held.name,
            "version": held.version,
            "source": held.source,
            "run_id": held.run_id,
        }


def _pick(local: Path, where: str, prefer: str | None, strict: bool, uri: str) -> Path:
    """The generator checkpoint directory under ``local``, by :meth:`ModelRegistry.download`'s
    rules (``prefer``, ``strict``)."""
    found = sorted(
        {p.parent for p in local.rglob(GENERATOR_FILE)},
        key=lambda p: (len(p.relative_to(local).parts), str(p)),
    )
    if not found:
        raise RegistryError(f"{where}: no {GENERATOR_FILE} in its artifacts ({uri})")
    preferred = [p for p in found if prefer is not None and p.name == prefer]
    if strict and not preferred:
        held = ", ".join(sorted(p.name for p in found))
        raise RegistryError(f"{where}: no {prefer!r} generator in its artifacts ({held})")
    if prefer is not None and not preferred and len(found) > 1:
        raise RegistryError(
            f"{where}: {len(found)} generators in its artifacts "
            f"and none in a directory named {prefer!r}"
        )
    return (preferred or found)[0]


def _reusable(
    final: Path, record: Mapping[str, str | None], where: str, prefer: str | None, strict: bool
) -> Path | None:
    """The checkpoint that an earlier, complete download of the same version left in
    ``final``, or None (nothing there, another version or store, a damaged checkpoint: the
    caller downloads again). A version without the generator asked for is the same error as
    after a fresh download."""
    try:
        held = json.loads((final / DOWNLOAD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if held != dict(record):
        return None
    chosen = _pick(final, where, prefer, strict, str(final))
    try:
        read_generator_document(chosen)  # the sidecar's sha256 of the tensors file
    except (CheckpointError, OSError):
        return None
    return chosen


# ---------------------------------------------------------------------------------------------
# models:/ URIs


_URI_RE = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))/?$"
)


@dataclass(frozen=True)
class ModelUri:
    """``models:/NAME/VERSION`` (``version`` set) or ``models:/NAME@ALIAS`` (``alias`` set)."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else self.alias_uri

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def is_model_uri(text: str | os.PathLike[str]) -> bool:
    """Whether a model argument names a registered model (else it is a path)."""
    return str(text).startswith("models:/")


def parse_model_uri(uri: str) -> ModelUri:
    """``models:/cunet/1`` or ``models:/cunet@champion``; RegistryError (one line) otherwise."""
    m = _URI_RE.match(str(uri))
    if m is None:
        raise RegistryError(
            f"{uri!r} is not a registered model URI (expected models:/NAME/VERSION "
            "or models:/NAME@ALIAS)"
        )
    return ModelUri(m["name"], m["version"], m["alias"])


def resolve_model_uri(
    uri: str,
    tracking_uri: str,
    dst: str | os.PathLike[str] | None = None,
    *,
    prefer: str | None = None,
    strict: bool = False,
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """The local generator checkpoint directory of a registered model version.

    ``uri`` is ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``. The version's artifacts
    are downloaded (:meth:`ModelRegistry.download`; ``prefer`` and ``strict`` as there) into
    ``dst``, replacing it, or, with ``cache`` instead (a directory of downloads kept between
    calls), into ``cache/<store>/NAME/VERSION`` (``<store>``: a digest of the tracking URI),
    where a complete, verified download of the same version is reused. An alias is looked up
    every time (it moves); a version's files never change. A missing model, version or alias
    is one :class:`NotRegistered` line naming it.
    """
    if (dst is None) == (cache is None):
        raise ValueError("resolve_model_uri: give either dst or cache")
    registry = ModelRegistry(tracking_uri)
    held = registry.lookup(uri)
    if cache is not None:
        store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
        dst = Path(cache) / store / held.name / held.version
    return registry.download(
        held.name, held.version, dst, prefer=prefer, strict=strict, reuse=cache is not None
    )
