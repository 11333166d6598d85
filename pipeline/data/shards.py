"""Shards stage: sub-images -> shuffled, size-capped WebDataset tars with DALI index files.

Layout (the team's fixed format)::

    <dir>/shard-00000.tar   one member per sample: <key>.rgb (encoding "raw") or <key>.png
    <dir>/shard-00000.idx   DALI index (wds2idx, built here so DALI need not scan the tars)
    <dir>/shards.json       {"format": "cugan-shards", "version": 1, "shards": [...],
                             "num_samples": N, "crop_size": S, "encoding": "raw"}

Encodings (``shards.json`` ``encoding``; absent means ``png``, the format before it existed):

* ``raw`` (what the shards stage writes): the sub-image's uint8 pixels, ``S x S x 3``
  row-major RGB, no header (``S`` = ``crop_size``; every sub-image is ``S x S``). Decoding is a
  reshape, and a loader reads just the rows of its crop window. 1.9x the bytes of the level-3
  PNGs on CBSD68-like photos (110,592 vs ~58,000 per 192 px sub-image), but PNG decoding was
  most of the training loader's CPU time; raw bytes also do not depend on the zlib version.
* ``png``: 8-bit RGB PNG (tests and shards written before ``raw``); both loaders read it too.

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
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.atomic import atomic_write_json, staging_dir
from pipeline.config import ShardParams
from pipeline.data.report import progress
from pipeline.data.subimages import TAR, read_subimage, read_subimage_index
from pipeline.data.tario import deterministic_tar_writer, tar_size

__all__ = [
    "SAMPLE_EXT",
    "SHARDS_JSON",
    "ShardError",
    "png_to_raw",
    "read_shards_json",
    "shard_subimages",
    "write_index",
    "write_shards",
]

log = logging.getLogger(__name__)

SHARDS_JSON = "shards.json"
FORMAT = "cugan-shards"
VERSION = 1
#: shards.json ``encoding`` -> the member extension of a sample (DALI's ``ext``).
SAMPLE_EXT = {"raw": "rgb", "png": "png"}


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
    return {"tar": shard.path.name, "index": idx.name, "count": len(shard.sizes)}


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
                    entries.append(_close_shard(shard))
                    shard = None
                if shard is None:
                    shard = _open_shard(tmp, len(entries))
                shard.writer.write({"__key__": sample["key"], ext: data})
                shard.sizes.append(len(data))
            if shard is not None:
                entries.append(_close_shard(shard))
                shard = None
        finally:
            if shard is not None:  # an error midway: close the files so the directory can go
                try:
                    with contextlib.suppress(OSError):
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
    fd = os.open(Path(subimages_dir) / TAR, os.O_RDONLY)
    try:
        return write_shards(index["subimages"],
                            lambda rec: png_to_raw(read_subimage(fd, rec), size, rec["key"]),
                            out_dir, params, crop_size=size, encoding="raw")
    finally:
        os.close(fd)


def png_to_raw(data: bytes, size: int, key: str) -> bytes:
    """An ``size x size`` RGB PNG's pixels as ``raw`` sample bytes (row-major HWC uint8)."""
    from PIL import Image  # the PNGs are the extract stage's own: no policy checks needed

    with Image.open(io.BytesIO(data)) as im:
        if im.size != (size, size) or im.mode != "RGB":
            raise ShardError(f"sub-image {key}: {im.mode} {im.size[0]}x{im.size[1]}, expected "
                             f"RGB {size}x{size}")
        return im.tobytes()


def read_shards_json(shards_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``shards.json`` (format, version, files present, counts add up).

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
    if data.get("version") != VERSION:
        raise ShardError(f"{path}: version {data.get('version')!r}, this code reads {VERSION}")
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardError(f"{path}: lists no shards")
    for entry in shards:
        for key in ("tar", "index"):
            if not (shards_dir / entry[key]).is_file():
                raise ShardError(f"{path}: {entry[key]} is missing")
    if sum(int(e["count"]) for e in shards) != data.get("num_samples"):
        raise ShardError(f"{path}: shard counts do not add up to num_samples")
    if data.get("encoding", "png") not in SAMPLE_EXT:
        raise ShardError(f"{path}: unknown sample encoding {data.get('encoding')!r}")
    return data
