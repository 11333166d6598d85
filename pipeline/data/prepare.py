"""Prepare stage: validate raw images and store them as 8-bit RGB PNGs, split train/holdout.

Every raw image goes through :func:`pipeline.imageio.read_rgb8` with the data policy:

* converted (with a note in the report): 16-bit (rounded like MATLAB ``im2uint8``),
  grayscale, palette, CMYK, an alpha channel that is fully opaque, EXIF rotation;
* skipped (with the reason in the report): transparency (no safe background colour),
  truncated or corrupt files, non-images, unreadable files, decompression bombs
  (``data.max_pixels``), and images smaller than the crop size on either side.

Images that are already 8-bit RGB PNGs are stored byte for byte (after validation); the rest
are re-encoded. A bad file never stops the stage. The output directory (``train/``, ``holdout/``,
``manifest.json``) is built under a temporary name and renamed when complete.

Held-out images are the ``holdout`` usable images whose names rank first by
``sha256(f"{seed}:{name}")``: deterministic, independent of file order, and stable when images
are added (an existing image changes split only if a new one outranks it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes, atomic_write_json, staging_dir
from pipeline.data.report import StageReport, progress
from pipeline.data.sources import RawImage, Source, sha256_file
from pipeline.data.workers import ordered_map
from pipeline.imageio import ImageError, read_rgb8, write_png

__all__ = ["MANIFEST", "PrepareError", "choose_holdout", "prepare_images", "read_manifest"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "cugan-prepared"
VERSION = 1


class PrepareError(ValueError):
    """Nothing usable to train on; carries the report so the caller can still write it."""

    def __init__(self, message: str, report: StageReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class _Outcome:
    image: RawImage
    width: int = 0
    height: int = 0
    sha256: str = ""
    notes: tuple[str, ...] = ()
    skip_reason: str | None = None


def _reason(err: ImageError, path: Path) -> str:
    """The one-line reason without the path prefix (the report names the file separately)."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _process(image: RawImage, *, pending: Path, crop_size: int, max_pixels: int) -> _Outcome:
    """Validate and convert one image; write ``pending/<name>.png`` when it is usable."""
    try:
        loaded = read_rgb8(
            image.path, max_pixels=max_pixels, allow_high_bit_depth=True, allow_transparency=False
        )
    except ImageError as err:
        return _Outcome(image, skip_reason=_reason(err, image.path))
    h, w = loaded.array.shape[:2]
    if h < crop_size or w < crop_size:
        return _Outcome(
            image,
            w,
            h,
            skip_reason=(
                f"too small: {w}x{h} is smaller than the crop size {crop_size} (extract.crop_size)"
            ),
        )
    out = pending / f"{image.name}.png"
    if loaded.format == "PNG" and loaded.mode == "RGB" and not loaded.notes:
        # Already an 8-bit RGB PNG (e.g. DIV2K): keep its bytes; re-encoding 2K images at
        # zlib level 6 would cost about a second each and change nothing the stages read.
        atomic_write_bytes(out, image.path.read_bytes(), fsync=False)
    else:
        write_png(out, loaded.array)
    return _Outcome(image, w, h, sha256_file(out), tuple(loaded.notes))


def choose_holdout(names: list[str], count: int, seed: int) -> set[str]:
    """The ``count`` names ranking first by ``sha256(f"{seed}:{name}")``."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    return set(ranked[:count])


def prepare_images(
    source: Source,
    out_dir: str | os.PathLike[str],
    *,
    crop_size: int,
    holdout: int,
    holdout_seed: int,
    max_pixels: int,
    workers: int = 1,
) -> StageReport:
    """Write ``out_dir/{train,holdout}/<name>.png`` and ``out_dir/manifest.json``.

    Returns the report (also when it raises :class:`PrepareError`, via ``err.report``: no
    usable image left for training). ``out_dir`` is replaced only on success.
    """
    report = StageReport("prepare")
    with staging_dir(out_dir) as tmp:
        pending = tmp / "pending"
        for sub in ("pending", "train", "holdout"):
            (tmp / sub).mkdir()
        work = partial(_process, pending=pending, crop_size=crop_size, max_pixels=max_pixels)
        outcomes: list[_Outcome] = []
        results = ordered_map(work, list(source.images), workers=workers)
        for outcome in progress(results, total=len(source.images), description="prepare"):
            src = outcome.image.source
            if outcome.skip_reason is not None:
                report.add_skipped(src, outcome.skip_reason)
                log.warning("skipped %s: %s", src, outcome.skip_reason)
                continue
            if outcome.notes:
                report.add_converted(src, list(outcome.notes))
                log.info("converted %s: %s", src, "; ".join(outcome.notes))
            else:
                report.add_ok(src)
            outcomes.append(outcome)

        usable = [o.image.name for o in outcomes]
        held = choose_holdout(usable, holdout, holdout_seed)
        n_train = len(usable) - len(held)
        report.extra.update({"source": source.kind, "train": n_train, "holdout": len(held)})
        if n_train <= 0:
            raise PrepareError(
                f"prepare: no training images left: {len(usable)} usable of "
                f"{len(source.images)}, data.holdout={holdout}",
                report,
            )

        entries: list[dict[str, Any]] = []
        for o in sorted(outcomes, key=lambda o: o.image.name):
            split = "holdout" if o.image.name in held else "train"
            os.replace(pending / f"{o.image.name}.png", tmp / split / f"{o.image.name}.png")
            entries.append(
                {
                    "name": o.image.name,
                    "source": o.image.source,
                    "width": o.width,
                    "height": o.height,
                    "sha256": o.sha256,
                    "split": split,
                }
            )
        pending.rmdir()
        atomic_write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "version": VERSION,
                "source": {"kind": source.kind, "root": source.root},
                "crop_size": crop_size,
                "holdout_seed": holdout_seed,
                "counts": {"train": n_train, "holdout": len(held)},
                "images": entries,
            },
        )
    return report


def read_manifest(prepared_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The prepare stage's manifest, checked for format (:class:`PrepareError` if wrong)."""
    path = Path(prepared_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrepareError(f"{path}: not found; run the prepare stage first") from None
    except json.JSONDecodeError as err:
        raise PrepareError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise PrepareError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    return data
