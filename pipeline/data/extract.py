"""Extract stage: overlapping sub-images of the prepared training images.

Crop positions follow BasicSR's ``extract_subimages`` convention (read, not copied): along each
axis, positions ``0, step, 2*step, ...`` while a full crop fits, plus one crop flush with the
far edge when the leftover strip is wider than ``thresh_size``. Training then takes random
64x64 patches from these sub-images, which are cheaper to decode than whole 2K images.

Output (one directory, complete or absent)::

    <dir>/subimages.tar   one PNG member <key>.png per sub-image, in image order
    <dir>/index.json      per sub-image: key, image, y, x, and byte offset/size in the tar

One tar instead of thousands of small files: DVC hashes one file, and the shards stage reads
sub-images by offset in any (shuffled) order without re-encoding. PNGs are encoded here once,
with a fixed zlib level, so their bytes are reproducible.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_write_json, staging_dir
from pipeline.config import ExtractParams
from pipeline.data.prepare import read_manifest
from pipeline.data.report import StageReport, progress
from pipeline.data.sources import sha256_file
from pipeline.data.subimages import FORMAT, INDEX, TAR, VERSION, ExtractError
from pipeline.data.tario import deterministic_tar_writer
from pipeline.data.workers import ordered_map
from pipeline.imageio import read_rgb8

__all__ = [
    "ExtractError",
    "crop_positions",
    "encode_png",
    "extract_subimages",
    "subimage_grid",
    "subimage_key",
]

log = logging.getLogger(__name__)


def crop_positions(length: int, crop: int, step: int, thresh: int) -> list[int]:
    """Start offsets of crops along one axis (empty when ``length < crop``)."""
    if crop <= 0 or step <= 0 or thresh < 0:
        raise ValueError(f"crop and step must be > 0, thresh >= 0 (got {crop}, {step}, {thresh})")
    if length < crop:
        return []
    positions = list(range(0, length - crop + 1, step))
    if length - (positions[-1] + crop) > thresh:
        positions.append(length - crop)
    return positions


def subimage_grid(height: int, width: int, params: ExtractParams) -> list[tuple[int, int]]:
    """(y, x) of every sub-image, row by row."""
    ys = crop_positions(height, params.crop_size, params.step, params.thresh_size)
    xs = crop_positions(width, params.crop_size, params.step, params.thresh_size)
    return [(y, x) for y in ys for x in xs]


def subimage_key(name: str, y: int, x: int) -> str:
    """``<image-stem>-y<y>-x<x>`` (the stem is already key-safe: no dots)."""
    return f"{name}-y{y}-x{x}"


def encode_png(array: np.ndarray, compress_level: int) -> bytes:
    """PNG bytes of an 8-bit RGB array; no metadata chunks, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), "RGB").save(
        buf, format="PNG", compress_level=compress_level, optimize=False
    )
    return buf.getvalue()


def _crop_image(
    entry: dict[str, Any], *, prepared: Path, params: ExtractParams, max_pixels: int
) -> list[tuple[str, int, int, bytes]]:
    path = prepared / "train" / f"{entry['name']}.png"
    if sha256_file(path) != entry["sha256"]:
        raise ExtractError(f"{path}: does not match the prepare manifest; rerun the prepare stage")
    array = read_rgb8(path, max_pixels=max_pixels).array
    size, level = params.crop_size, params.png_compress_level
    return [
        (
            subimage_key(entry["name"], y, x),
            y,
            x,
            encode_png(array[y : y + size, x : x + size], level),
        )
        for y, x in subimage_grid(array.shape[0], array.shape[1], params)
    ]


def extract_subimages(
    prepared_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: ExtractParams,
    *,
    workers: int = 1,
) -> StageReport:
    """Crop every training image of ``prepared_dir`` into ``out_dir`` (tar + index)."""
    prepared = Path(prepared_dir)
    manifest = read_manifest(prepared)
    train = [e for e in manifest["images"] if e["split"] == "train"]
    report = StageReport("extract")
    max_pixels = max((e["width"] * e["height"] for e in train), default=1)
    work = partial(_crop_image, prepared=prepared, params=params, max_pixels=max_pixels)
    records: list[dict[str, Any]] = []
    with staging_dir(out_dir) as tmp:
        with open(tmp / TAR, "wb") as fp:
            writer = deterministic_tar_writer(fp)
            try:
                results = ordered_map(work, train, workers=workers)
                for entry, crops in zip(
                    train, progress(results, total=len(train), description="extract"), strict=True
                ):
                    if not crops:
                        report.add_skipped(
                            entry["name"],
                            (
                                f"too small: {entry['width']}x{entry['height']} is smaller than "
                                f"the crop size {params.crop_size}"
                            ),
                        )
                        continue
                    report.add_ok(entry["name"])
                    for key, y, x, data in crops:
                        writer.write({"__key__": key, "png": data})
                        records.append({"key": key, "image": entry["name"], "y": y, "x": x})
            except BaseException:
                # Close the tar stream now (a full disk fails this too): left open, it would
                # try again when collected, after the file is closed, and print a traceback
                # ("Exception ignored ... write to closed file") after the stage's one line.
                with contextlib.suppress(OSError, ValueError):
                    writer.close()
                raise
            writer.close()
        with tarfile.open(tmp / TAR) as tf:
            members = tf.getmembers()
        if len(members) != len(records):
            raise ExtractError(f"{TAR}: {len(members)} members for {len(records)} sub-images")
        for record, member in zip(records, members, strict=True):
            if member.name != f"{record['key']}.png":
                raise ExtractError(f"{TAR}: member {member.name} out of order")
            record["offset"] = member.offset_data
            record["size"] = member.size
        atomic_write_json(
            tmp / INDEX,
            {
                "format": FORMAT,
                "version": VERSION,
                "crop_size": params.crop_size,
                "step": params.step,
                "thresh_size": params.thresh_size,
                "num_images": len(report.ok),
                "num_subimages": len(records),
                "tar": TAR,
                "subimages": records,
            },
        )
    report.extra.update(
        {
            "num_images": len(report.ok),
            "num_subimages": len(records),
            "crop_size": params.crop_size,
            "step": params.step,
            "thresh_size": params.thresh_size,
        }
    )
    return report
