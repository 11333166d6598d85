"""Shards stage: sub-images -> shuffled, size-capped WebDataset tars with DALI index files.

Layout (the team's fixed format)::

    <dir>/shard-00000.tar   one member per sample: <key>.rgb (encoding "raw") or <key>.png
    <dir>/shard-00000.idx   DALI index (wds2idx, built here so DALI need not scan the tars)
    <dir>/shards.json       {"format": "cugan-shards", "version": 2, "shards": [...],
                             "num_samples": N, "crop_size": S, "encoding": "raw"}

Encodings (``shards.json`` ``encoding``; absent means ``png``, the format before it existed):

* ``raw`` (what the shards stage writes): the sub-image's uint8 pixels, ``S x S x 3``
  row-major RGB, no header (``S`` = ``crop_size``; every sub-image is ``S x S``). Decoding is a
  reshape, and a loader reads just the rows of its crop window. 1.9x the bytes of the level-3
  PNGs on CBSD68-like photos (110,592 vs ~58,000 per 192 px sub-image), but PNG decoding was
  most of the training loader's CPU time; raw bytes also do not depend on the zlib version.
* ``png``: 8-bit RGB PNG (tests and shards written before ``raw``); both loaders read it too.

Each entry of ``shards`` names one tar and its index with their sizes and sha256::

    {"tar": "shard-00000.tar", "index": "shard-00000.idx", "count": 1000,
     "tar_bytes": 81930240, "tar_sha256": "...", "index_bytes": 40123, "index_sha256": "..."}

so ``shards.json`` identifies the shards' CONTENT, not only their counts: the training run's
identity hashes it (:mod:`pipeline.train.trainer`), and a reader checks the files against it
(:func:`verify_shard_files`: sizes always -- cheap, catches truncation -- and the sha256 on
request, ``loader.verify_shards: sha256``). A manifest of version 1 (counts only, written by
an older shards stage) is refused with one line asking to re-run the shards stage: accepting
it would leave the run identity blind to the data, the hole this version closes.

Samples are shuffled once, at write time, with ``shards.shuffle_seed``: container readers
read in stored order and shuffle only inside a buffer, so shards must not be image-ordered.

Determinism: the tars are written by webdataset's ``TarWriter`` with a fixed mtime, user and
group names, mode (uid/gid stay 0), ustar format, and the samples' PNG bytes copied unchanged
from the extract stage (encoded there with a fixed zlib level). The same inputs and params give
byte-identical tars, indexes and ``shards.json``.

Rotation is done here rather than by ``ShardWriter``: ``ShardWriter`` checks its size limit
only after a write, counts payload bytes (not tar headers and padding), so a shard can exceed
``maxsize``, and it writes straight to the final file name. Here a shard is closed *before* a
sample would push its file size over ``max_bytes`` (exact tar size: 512-byte header + data
padded to 512 per member, 1024 bytes of end blocks, padded to the 10240-byte tar record), each
tar and index is written under a temporary name and renamed, and the whole directory appears
only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.atomic import atomic_write_json, naming_errors, staging_dir
from pipeline.config import ShardParams, ShardVerification
from pipeline.data.report import progress
from pipeline.data.subimages import TAR, read_subimage, read_subimage_index
from pipeline.data.tario import deterministic_tar_writer, tar_size

__all__ = [
    "SAMPLE_EXT",
    "SHARDS_JSON",
    "ShardError",
    "describe_shard",
    "png_to_raw",
    "read_shards_json",
    "shard_subimages",
    "verify_shard_files",
    "write_index",
    "write_shards",
]

log = logging.getLogger(__name__)

SHARDS_JSON = "shards.json"
FORMAT = "cugan-shards"
VERSION = 2
#: shards.json ``encoding`` -> the member extension of a sample (DALI's ``ext``).
SAMPLE_EXT = {"raw": "rgb", "png": "png"}
_RERUN = "re-run the shards stage (dvc repro shards)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardError(ValueError):
    """Shards cannot be written or read as asked (one-line message)."""


def write_index(tar_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> int:
    """Build DALI's webdataset index with the ``wds2idx`` tool of the nvidia-dali wheel.

    Written under a temporary name and renamed. Returns the sample count it records.
    """
    from wds2idx import IndexCreator  # top-level module of the nvidia-dali wheel

    idx_path = Path(idx_path)
    tmp = idx_path.with_name(f".{idx_path.name}.tmp")
    try:
        with IndexCreator(str(tar_path), str(tmp), verbose=False) as creator:
            creator.create_index()
        header = tmp.read_text().split("\n", 1)[0].split()
        os.replace(tmp, idx_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if len(header) != 2 or not header[1].isdigit():
        raise ShardError(f"{idx_path}: unexpected wds2idx header {' '.join(header)!r}")
    return int(header[1])


def _sha256(path: Path) -> str:
    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def describe_shard(tar_path: Path, idx_path: Path, count: int) -> dict[str, Any]:
    """The ``shards.json`` entry of a written tar and its index (names, count, sizes, sha256).

    The digests are read back from the files as they lie on disk, so the manifest vouches for
    what a reader will find, not for what the writer meant to write.
    """
    return {
        "tar": tar_path.name,
        "index": idx_path.name,
        "count": count,
        "tar_bytes": tar_path.stat().st_size,
        "tar_sha256": _sha256(tar_path),
        "index_bytes": idx_path.stat().st_size,
        "index_sha256": _sha256(idx_path),
    }


@dataclass
class _OpenShard:
    index: int
    path: Path
    part: Path
    fp: BinaryIO
    writer: Any
    sizes: list[int]


def _open_shard(directory: Path, index: int) -> _OpenShard:
    path = directory / f"shard-{index:05d}.tar"
    part = path.with_name(f".{path.name}.part")
    fp = open(part, "wb")  # noqa: SIM115 - closed in _close_shard
    return _OpenShard(index, path, part, fp, deterministic_tar_writer(fp), [])


def _close_shard(shard: _OpenShard) -> dict[str, Any]:
    shard.writer.close()
    shard.fp.close()
    os.replace(shard.part, shard.path)
    actual = shard.path.stat().st_size
    if actual != tar_size(shard.sizes):  # the cap relies on this formula
        raise ShardError(f"{shard.path}: {actual} bytes, expected {tar_size(shard.sizes)}")
    idx = shard.path.with_suffix(".idx")
    counted = write_index(shard.path, idx)
    if counted != len(shard.sizes):
        raise ShardError(f"{idx}: wds2idx counted {counted} samples, wrote {len(shard.sizes)}")
    return describe_shard(shard.path, idx, len(shard.sizes))


def write_shards(
    samples: list[dict[str, Any]],
    read_sample: Callable[[dict[str, Any]], bytes],
    out_dir: str | os.PathLike[str],
    params: ShardParams,
    *,
    crop_size: int,
    encoding: str = "png",
) -> dict[str, Any]:
    """Write ``samples`` (dicts with ``key``; ``read_sample(sample) -> bytes``) as shards.

    ``encoding`` names what ``read_sample`` returns: ``png`` bytes or ``raw`` pixels
    (``crop_size**2 * 3`` bytes, checked). Returns the ``shards.json`` content. ``out_dir`` is
    replaced only when every shard, index and ``shards.json`` is written; on any error nothing
    is left behind.
    """
    if not samples:
        raise ShardError("no samples to write: the extract stage produced no sub-images")
    if encoding not in SAMPLE_EXT:
        raise ShardError(f"unknown sample encoding {encoding!r} (known: {sorted(SAMPLE_EXT)})")
    ext = SAMPLE_EXT[encoding]
    order = np.random.default_rng(params.shuffle_seed).permutation(len(samples))
    entries: list[dict[str, Any]] = []
    with staging_dir(out_dir) as tmp:
        shard: _OpenShard | None = None
        try:
            for i in progress(order.tolist(), total=len(samples), description="shards"):
                sample = samples[i]
                data = read_sample(sample)
                if encoding == "raw" and len(data) != crop_size * crop_size * 3:
                    raise ShardError(
                        f"sample {sample['key']}: {len(data)} raw bytes, expected "
                        f"{crop_size}x{crop_size}x3"
                    )
                if tar_size([len(data)]) > params.max_bytes:
                    raise ShardError(
                        f"sample {sample['key']} ({len(data)} bytes) does not fit in "
                        f"shards.max_bytes={params.max_bytes}"
                    )
                if shard is not None and (
                    len(shard.sizes) >= params.max_count
                    or tar_size([*shard.sizes, len(data)]) > params.max_bytes
                ):
                    with naming_errors(shard.path):  # a failed write() names no file
                        entries.append(_close_shard(shard))
                    shard = None
                if shard is None:
                    shard = _open_shard(tmp, len(entries))
                with naming_errors(shard.path):
                    shard.writer.write({"__key__": sample["key"], ext: data})
                shard.sizes.append(len(data))
            if shard is not None:
                with naming_errors(shard.path):
                    entries.append(_close_shard(shard))
                shard = None
        finally:
            if shard is not None:  # an error midway: close the files so the directory can go
                try:
                    with contextlib.suppress(OSError, ValueError):
                        shard.writer.close()
                finally:
                    shard.fp.close()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "shards": entries,
            "num_samples": len(samples),
            "crop_size": crop_size,
            "encoding": encoding,
        }
        atomic_write_json(tmp / SHARDS_JSON, manifest)
    return manifest


def shard_subimages(
    subimages_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], params: ShardParams
) -> dict[str, Any]:
    """The shards stage: every sub-image of the extract stage's output, shuffled into shards
    as ``raw`` pixels (decoded from the extract stage's PNGs once, here)."""
    index = read_subimage_index(subimages_dir)
    size = index["crop_size"]
    tar = Path(subimages_dir) / TAR
    fd = os.open(tar, os.O_RDONLY)

    def read(record: dict[str, Any]) -> bytes:
        with naming_errors(tar):  # a failed pread names no file: name the input, not the output
            return png_to_raw(read_subimage(fd, record), size, record["key"])

    try:
        return write_shards(
            index["subimages"], read, out_dir, params, crop_size=size, encoding="raw"
        )
    finally:
        os.close(fd)


def png_to_raw(data: bytes, size: int, key: str) -> bytes:
    """An ``size x size`` RGB PNG's pixels as ``raw`` sample bytes (row-major HWC uint8)."""
    from PIL import Image  # the PNGs are the extract stage's own: no policy checks needed

    with Image.open(io.BytesIO(data)) as im:
        if im.size != (size, size) or im.mode != "RGB":
            raise ShardError(
                f"sub-image {key}: {im.mode} {im.size[0]}x{im.size[1]}, expected RGB {size}x{size}"
            )
        return im.tobytes()


def _check_entry(path: Path, number: int, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise ShardError(f"{path}: shard entry {number} is not an object")
    for key, kind in (
        ("tar", str),
        ("index", str),
        ("count", int),
        ("tar_bytes", int),
        ("index_bytes", int),
        ("tar_sha256", str),
        ("index_sha256", str),
    ):
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ShardError(f"{path}: shard entry {number} has no valid {key!r}; {_RERUN}")
    for key in ("tar_sha256", "index_sha256"):
        if not _SHA256.fullmatch(entry[key]):
            raise ShardError(f"{path}: shard entry {number}: {key} is not a sha256; {_RERUN}")


def read_shards_json(
    shards_dir: str | os.PathLike[str], *, verify: ShardVerification = "size"
) -> dict[str, Any]:
    """Read and check ``shards.json`` (format, version, entries, counts add up) and the files
    it lists (:func:`verify_shard_files` with ``verify``: sizes by default, cheap).

    Raises :class:`ShardError` with a one-line message. Paths in the result stay relative to
    ``shards_dir``.
    """
    shards_dir = Path(shards_dir)
    path = shards_dir / SHARDS_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: not found; run the shards stage first") from None
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} file")
    if data.get("version") == 1:
        raise ShardError(
            f"{path}: written by an older shards stage (version 1: counts only, no sizes or "
            f"sha256 of the shards); {_RERUN}"
        )
    if data.get("version") != VERSION:
        raise ShardError(f"{path}: version {data.get('version')!r}, this code reads {VERSION}")
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardError(f"{path}: lists no shards")
    for number, entry in enumerate(shards):
        _check_entry(path, number, entry)
    if sum(e["count"] for e in shards) != data.get("num_samples"):
        raise ShardError(f"{path}: shard counts do not add up to num_samples")
    if data.get("encoding", "png") not in SAMPLE_EXT:
        raise ShardError(f"{path}: unknown sample encoding {data.get('encoding')!r}")
    verify_shard_files(shards_dir, shards, verify)
    return data


def verify_shard_files(
    shards_dir: str | os.PathLike[str],
    entries: list[dict[str, Any]],
    mode: ShardVerification = "size",
) -> None:
    """Each tar and index of ``entries`` (checked ``shards.json`` entries) exists and has the
    recorded size; with ``mode="sha256"`` also the recorded sha256 (reads every byte).

    One :class:`ShardError` line naming the first file that differs: a shard truncated or
    changed after the shards stage must stop a run before it trains (or "resumes") on it.
    """
    if mode not in ("size", "sha256"):
        raise ShardError(f"unknown shard verification {mode!r} (size or sha256)")
    shards_dir = Path(shards_dir)
    files = [(shards_dir / e[kind], e, kind) for e in entries for kind in ("tar", "index")]
    for file, entry, kind in files:
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"{file}: missing (listed in {SHARDS_JSON}); {_RERUN}") from None
        if size != entry[f"{kind}_bytes"]:
            raise ShardError(
                f"{file}: {size} bytes, {SHARDS_JSON} records {entry[f'{kind}_bytes']} "
                f"(truncated or changed after the shards stage); {_RERUN}"
            )
    if mode == "sha256":
        total = sum(entry[f"{kind}_bytes"] for _, entry, kind in files)
        log.info("verifying the sha256 of %d shard files (%.1f MB)", len(files), total / 1e6)
        for file, entry, kind in files:
            if _sha256(file) != entry[f"{kind}_sha256"]:
                raise ShardError(
                    f"{file}: sha256 differs from {SHARDS_JSON} (changed after the shards "
                    f"stage); {_RERUN}"
                )
