"""Where raw training images come from: the embedded sample, DIV2K, or a folder.

Each source resolves to a sorted list of :class:`RawImage` (a unique, key-safe name plus the
file to read), so that the same inputs always give the same order and the same names:

* ``sample``: colour photographs that ship inside the scikit-image wheel (no network). Each
  file is checked against a pinned sha256, so an upgraded scikit-image cannot silently change
  the data. Licences are listed in :data:`SAMPLE_IMAGES` and docs/data.md.
* ``div2k``: DIV2K train HR (800 PNGs). Downloaded from the official URL with HTTP Range
  resumption into a ``.part`` file, verified against the pinned sha256, and extracted
  atomically; or taken from ``data.div2k.local`` (the zip, verified the same way, or a
  directory whose images are counted).
* ``folder``: every non-hidden file under a directory, recursively, in sorted order. Files that
  are not usable images are skipped (and reported) by the prepare stage, not here.

The downloader is hand-rolled on urllib: no maintained library available here resumes an
interrupted download with Range requests and verifies a pinned checksum (pooch and
torchvision's helpers restart from zero).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.resources
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.atomic import staging_dir
from pipeline.config import DataParams, Div2kParams

__all__ = [
    "IMAGE_SUFFIXES",
    "SAMPLE_IMAGES",
    "RawImage",
    "Source",
    "SourceError",
    "div2k_images",
    "download",
    "extract_zip",
    "folder_images",
    "list_files",
    "resolve_source",
    "sample_images",
    "sanitize_name",
    "sha256_file",
]

log = logging.getLogger(__name__)

#: Suffixes taken from a zip archive (a folder source tries every file instead).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class SampleImage:
    file: str
    sha256: str
    licence: str
    credit: str


#: Natural colour photographs inside the scikit-image 0.26 wheel (``skimage/data/``), with the
#: sha256 of each file (identical to scikit-image's own data registry) and its licence as the
#: scikit-image docstrings state it.
SAMPLE_IMAGES: tuple[SampleImage, ...] = (
    SampleImage(
        "astronaut.png",
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "public domain",
        "NASA (Eileen Collins), NASA Great Images database",
    ),
    SampleImage(
        "chelsea.png",
        "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "CC0",
        "Stefan van der Walt",
    ),
    SampleImage(
        "coffee.png",
        "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "CC0",
        "Rachel Michetti, courtesy of Pikolo Espresso Bar",
    ),
    SampleImage(
        "hubble_deep_field.jpg",
        "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
        "public domain",
        "NASA, Hubble eXtreme Deep Field (HubbleSite)",
    ),
    SampleImage(
        "rocket.jpg",
        "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
        "public domain",
        "SpaceX, DSCOVR launch on Falcon 9",
    ),
)


class SourceError(ValueError):
    """A data source that cannot be used, with a one-line message saying why and what to do."""


@dataclass(frozen=True)
class RawImage:
    """One candidate training image.

    ``name`` is unique within the source and safe as a file stem and a WebDataset key (only
    letters, digits, ``_`` and ``-``); ``source`` is the path shown in manifests and reports,
    relative to the source root so that it does not depend on where the data lives.
    """

    name: str
    path: Path
    source: str


@dataclass(frozen=True)
class Source:
    kind: str
    root: str  # as given (params), for the manifest
    images: tuple[RawImage, ...]


# ---------------------------------------------------------------------------------------------
# names


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

#: Longer names are shortened (with a hash of the full name) so that a tar member name
#: ``<name>-y<y>-x<x>.png`` stays within the 100 characters of a plain ustar header.
MAX_NAME_LENGTH = 64


def sanitize_name(text: str) -> str:
    """Replace every character but letters, digits, ``_`` and ``-`` by ``_``; shorten long names.

    A WebDataset key ends at the first dot of a tar member name, so names must not contain any.
    """
    name = _UNSAFE.sub("_", text) or "_"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        name = f"{name[: MAX_NAME_LENGTH - 13]}_{digest}"
    return name


def _unique_names(rel_paths: list[str]) -> list[str]:
    """Key-safe names from relative paths (suffix dropped); later clashes get ``_1``, ``_2``..."""
    taken: set[str] = set()
    names = []
    for rel in rel_paths:
        base = sanitize_name(str(PurePosixPath(rel).with_suffix("")))
        name, n = base, 0
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names.append(name)
    return names


def _images_from_files(root: Path, rel_paths: list[str]) -> tuple[RawImage, ...]:
    names = _unique_names(rel_paths)
    return tuple(RawImage(n, root / r, r) for n, r in zip(names, rel_paths, strict=True))


# ---------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        while block := fp.read(chunk_size):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# sample


def _sample_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("skimage") / "data"))
    except ModuleNotFoundError:
        raise SourceError(
            "data.source 'sample' needs scikit-image (its wheel ships the sample photos): "
            "pip install scikit-image==0.26.0"
        ) from None


def sample_images() -> Source:
    """The embedded sample photos, each verified against its pinned sha256."""
    root = _sample_dir()
    for item in SAMPLE_IMAGES:
        path = root / item.file
        if not path.is_file():
            raise SourceError(
                f"sample image {item.file} is missing from {root} (scikit-image 0.26?)"
            )
        digest = sha256_file(path)
        if digest != item.sha256:
            raise SourceError(
                f"sample image {path} has sha256 {digest[:12]}..., not the pinned "
                f"{item.sha256[:12]}... (a different scikit-image version?)"
            )
    rel = [item.file for item in SAMPLE_IMAGES]
    images = _images_from_files(root, rel)
    return Source(
        "sample",
        "scikit-image:skimage/data",
        tuple(RawImage(im.name, im.path, f"skimage/data/{im.source}") for im in images),
    )


# ---------------------------------------------------------------------------------------------
# folder


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under ``root``, sorted (deterministic).

    Hidden names (leading dot) are skipped: they include the temporary files of atomic writers.
    Symlinked directories are not followed (no loops); symlinked files are listed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            if fname.startswith("."):
                continue
            found.append(Path(dirpath, fname).relative_to(root).as_posix())
    return sorted(found)


def folder_images(root: str | os.PathLike[str]) -> Source:
    path = Path(root)
    if not path.is_dir():
        raise SourceError(f"data.folder: {root} is not a directory")
    files = list_files(path)
    if not files:
        raise SourceError(f"data.folder: {root} holds no files")
    return Source("folder", str(root), _images_from_files(path, files))


# ---------------------------------------------------------------------------------------------
# download


class _Interrupted(Exception):
    """A transfer that ended early; the caller resumes it."""


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "cugan-pipeline/0.1", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


@contextlib.contextmanager
def _download_progress(url: str, start: int, remaining: int | None) -> Iterator[Any]:
    """A byte progress bar on an interactive terminal; nothing otherwise."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    total = start + remaining if remaining is not None else None
    with Progress(
        *Progress.get_default_columns(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(PurePosixPath(url).name, total=total, completed=start)
        yield lambda n: bar.advance(task, n)


def _transfer(url: str, part: Path, timeout: float, chunk_size: int) -> None:
    """Append the rest of ``url`` to ``part`` (or restart it when the server ignores Range)."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left to fetch: the checksum decides
            return
        if err.code >= 500:  # a server hiccup: worth retrying
            raise _Interrupted(f"HTTP {err.code} {err.reason}") from None
        raise SourceError(f"download {url}: HTTP {err.code} {err.reason}") from None
    with resp:
        if start and resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                part.unlink()
                raise _Interrupted(f"unexpected Content-Range {content_range!r}; restarting")
            mode = "ab"
        elif resp.status == 200:
            if start:
                log.info("server ignored the Range request; downloading from the start")
            start, mode = 0, "wb"
        else:
            raise SourceError(f"download {url}: unexpected HTTP status {resp.status}")
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, mode) as fp, _download_progress(url, start, expected) as advance:
            while block := resp.read(chunk_size):
                fp.write(block)
                received += len(block)
                advance(len(block))
        # http.client returns a short body without an error when the peer closes early.
        if expected is not None and received < expected:
            raise _Interrupted(f"connection closed after {start + received} bytes")


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str,
    size: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``, resuming after interruptions, and verify its sha256.

    Bytes accumulate in ``dest + ".part"``; each retry asks for the rest with an HTTP Range
    request (a later run resumes the same way). Only a file whose sha256 matches is renamed to
    ``dest``; a mismatch deletes the ``.part`` file and raises :class:`SourceError`.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256_file(dest) == sha256:
            return dest
        raise SourceError(f"{dest}: exists but its sha256 is not the pinned {sha256}; delete it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()
    attempt = 0
    while True:
        try:
            _transfer(url, part, timeout, chunk_size)
            break
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise SourceError(
                    f"download {url} failed after {attempt} attempts ({err}); "
                    f"{have} bytes kept in {part}, run again to resume"
                ) from None
            log.warning(
                "download interrupted (%s); resuming at byte %d (retry %d of %d)",
                err,
                have,
                attempt,
                retries,
            )
            time.sleep(backoff * attempt)
    got_size = part.stat().st_size
    digest = sha256_file(part)
    if digest != sha256 or (size is not None and got_size != size):
        part.unlink()
        raise SourceError(
            f"download {url}: sha256 {digest} ({got_size} bytes) does not match the pinned "
            f"{sha256}" + (f" ({size} bytes)" if size is not None else "") + "; deleted, try again"
        )
    os.replace(part, dest)
    log.info("downloaded and verified %s (%d bytes)", dest, got_size)
    return dest


# ---------------------------------------------------------------------------------------------
# zip


def extract_zip(zip_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract the image files of a zip into ``dest``, atomically (complete or absent).

    Members with absolute paths or ``..`` are refused rather than trusted.
    """
    dest = Path(dest)
    try:
        with zipfile.ZipFile(zip_path) as zf, staging_dir(dest) as tmp:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                name = PurePosixPath(info.filename)
                if info.is_dir() or name.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if name.is_absolute() or ".." in name.parts:
                    raise SourceError(f"{zip_path}: unsafe member path {info.filename!r}")
                target = tmp.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise SourceError(f"{zip_path}: not a valid zip archive ({err})") from None
    return dest


# ---------------------------------------------------------------------------------------------
# DIV2K


def _image_root(root: Path) -> Path:
    """The single top-level directory of an extracted archive (``DIV2K_train_HR/``), if any."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root


def _counted(kind: str, root: Path, shown: str, expected: int) -> Source:
    files = [f for f in list_files(root) if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES]
    if len(files) != expected:
        raise SourceError(
            f"{shown}: holds {len(files)} images, expected {expected} "
            "(data.div2k.expected_images): incomplete copy?"
        )
    return Source(kind, shown, _images_from_files(root, files))


def _verified_zip(zip_path: Path, p: Div2kParams) -> None:
    digest = sha256_file(zip_path)
    if digest != p.sha256:
        raise SourceError(
            f"{zip_path}: sha256 {digest} does not match data.div2k.sha256 {p.sha256}"
        )


def div2k_images(p: Div2kParams, downloads: str | os.PathLike[str]) -> Source:
    """DIV2K train HR: local directory, local zip, or download into ``downloads``."""
    downloads = Path(downloads)
    extracted = downloads / f"DIV2K_train_HR-{p.sha256[:12]}"
    if p.local is not None:
        local = Path(p.local)
        if local.is_dir():
            return _counted("div2k", _image_root(local), p.local, p.expected_images)
        if not local.is_file():
            raise SourceError(f"data.div2k.local: {p.local} is neither a directory nor a zip file")
        if not extracted.is_dir():
            log.info("verifying %s", local)
            _verified_zip(local, p)
            extract_zip(local, extracted)
        return _counted("div2k", _image_root(extracted), p.local, p.expected_images)
    if not extracted.is_dir():
        zip_path = download(
            p.url,
            downloads / Path(PurePosixPath(p.url).name),
            sha256=p.sha256,
            size=p.size,
            retries=p.retries,
            timeout=p.timeout,
        )
        extract_zip(zip_path, extracted)
    return _counted("div2k", _image_root(extracted), p.url, p.expected_images)


# ---------------------------------------------------------------------------------------------


def resolve_source(params: DataParams, downloads: str | os.PathLike[str]) -> Source:
    """The raw images that ``params.source`` names (downloading DIV2K into ``downloads``)."""
    if params.source == "sample":
        return sample_images()
    if params.source == "div2k":
        return div2k_images(params.div2k, downloads)
    if params.folder is None:  # DataParams validation forbids this; keep the error readable
        raise SourceError("data.source 'folder' needs data.folder to name a directory")
    return folder_images(params.folder)
