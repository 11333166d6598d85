"""Evaluation sets: clean images degraded at fixed (blur, noise) settings, stored as PNGs.

Layout (the team's fixed format)::

    <dir>/<set>/gt/<name>.png
    <dir>/<set>/blur{r:g}_noise{sigma:g}/<name>.png      e.g. blur2_noise30, blur0.5_noise0
    <dir>/<set>/manifest.json                            every file with its setting and z

Sets: ``holdout`` (the prepare stage's held-out images), ``cbsd68`` and ``live1`` (local
directories, optionally checked against a ``sha256  name`` list; a mismatch is an error, since a
wrong benchmark image would make paper comparisons meaningless).

Degradation is :func:`pipeline.degradation.degrade` (blur -> noise -> clip -> 8 bits) with a
``torch.Generator`` seeded per (set, image, setting) from ``sha256(seed/set/image/setting)``:
adding a set, an image or a setting changes no other file. The authors used MATLAB's
``randn('seed', 0)``, whose stream cannot be reproduced here; our noise is a different (fixed)
draw of the same distribution.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json, staging_dir
from pipeline.condition import setting_key
from pipeline.config import DegradationParams, EvalSetParams
from pipeline.data.prepare import read_manifest
from pipeline.data.report import StageReport, progress
from pipeline.data.sources import list_files, sanitize_name, sha256_file
from pipeline.imageio import ImageError, read_rgb8, write_png

__all__ = [
    "MANIFEST",
    "EvalSetError",
    "build_evalset",
    "build_evalsets",
    "collect_images",
    "image_seed",
    "load_sha256_list",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "cugan-evalset"
VERSION = 1


class EvalSetError(ValueError):
    """An evaluation set cannot be built as configured (one-line message)."""


def image_seed(seed: int, set_name: str, image: str, blur: float, noise: float) -> int:
    """A 63-bit generator seed for one (set, image, setting), independent of all others."""
    text = f"{seed}/{set_name}/{image}/{setting_key(blur, noise)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def load_sha256_list(path: str | os.PathLike[str]) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>``) -> {name: hex}."""
    entries: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise EvalSetError(f"{path}: checksum list not found") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise EvalSetError(f"{path}:{n}: expected '<sha256>  <file name>'")
        entries[parts[1].lstrip("*").strip()] = parts[0].lower()
    if not entries:
        raise EvalSetError(f"{path}: checksum list is empty")
    return entries


def collect_images(
    directory: str | os.PathLike[str], checksums: dict[str, str] | None = None
) -> list[tuple[str, Path, str]]:
    """(output name, file, file name as listed) of a test set, sorted by file name.

    With ``checksums`` exactly the listed files are used, each verified (a missing or changed
    file is an error); without, every non-hidden file under ``directory``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise EvalSetError(f"{directory}: not a directory")
    if checksums is None:
        files = list_files(root)
    else:
        files = sorted(checksums)
        for rel in files:
            path = root / rel
            if not path.is_file():
                raise EvalSetError(f"{path}: listed in the checksum list but missing")
            if sha256_file(path) != checksums[rel]:
                raise EvalSetError(f"{path}: sha256 does not match the checksum list")
    out, taken = [], set()
    for rel in files:
        name = sanitize_name(str(Path(rel).with_suffix("")))
        if name in taken:
            raise EvalSetError(f"{directory}: two files map to the name {name!r}")
        taken.add(name)
        out.append((name, root / rel, rel))
    return out


def build_evalset(
    set_name: str,
    images: list[tuple[str, Path, str]],
    out_dir: Path,
    params: EvalSetParams,
    degradation: DegradationParams,
    report: StageReport,
) -> dict[str, Any]:
    """Write one set under ``out_dir`` (which must exist and be empty); returns its manifest."""
    import torch

    from pipeline.degradation import degrade, to_tensor, to_uint8

    settings = [(float(r), float(s)) for r, s in params.settings]
    (out_dir / "gt").mkdir()
    for r, s in settings:
        (out_dir / setting_key(r, s)).mkdir()
    entries: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    for name, path, shown in progress(images, total=len(images), description=set_name):
        source = f"{set_name}/{shown}"
        try:
            loaded = read_rgb8(path, allow_high_bit_depth=True, allow_transparency=False)
        except ImageError as err:
            reason = str(err).removeprefix(f"{path}: ")
            report.add_skipped(source, reason)
            log.warning("skipped %s: %s", source, reason)
            continue
        if loaded.notes:
            report.add_converted(source, loaded.notes)
        else:
            report.add_ok(source)
        gt = write_png(out_dir / "gt" / f"{name}.png", loaded.array)
        h, w = loaded.array.shape[:2]
        entries.append(
            {
                "name": name,
                "source": shown,
                "width": w,
                "height": h,
                "gt": f"gt/{name}.png",
                "sha256": sha256_file(gt),
            }
        )
        clean = to_tensor(loaded.array)
        for r, s in settings:
            gen = torch.Generator().manual_seed(image_seed(params.seed, set_name, name, r, s))
            degraded = degrade(clean, r, s, generator=gen, kernel_size=degradation.kernel_size)
            rel = f"{setting_key(r, s)}/{name}.png"
            written = write_png(out_dir / rel, to_uint8(degraded))
            files.append(
                {
                    "image": name,
                    "setting": setting_key(r, s),
                    "path": rel,
                    "gt": f"gt/{name}.png",
                    "blur": r,
                    "noise": s,
                    "z": [r / degradation.blur_max, s / degradation.noise_max],
                    "sha256": sha256_file(written),
                }
            )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "set": set_name,
        "seed": params.seed,
        "kernel_size": degradation.kernel_size,
        "settings": [
            {
                "name": setting_key(r, s),
                "blur": r,
                "noise": s,
                "z": [r / degradation.blur_max, s / degradation.noise_max],
            }
            for r, s in settings
        ],
        "images": entries,
        "files": files,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def _set_images(
    name: str, params: EvalSetParams, prepared_dir: Path
) -> list[tuple[str, Path, str]]:
    if name == "holdout":
        held = [e for e in read_manifest(prepared_dir)["images"] if e["split"] == "holdout"]
        if not held:
            raise EvalSetError(
                "evalsets.sets includes 'holdout' but no image is held out "
                "(data.holdout is 0 or too few usable images)"
            )
        return [
            (e["name"], prepared_dir / "holdout" / f"{e['name']}.png", e["source"])
            for e in sorted(held, key=lambda e: e["name"])
        ]
    directory = getattr(params, f"{name}_dir")
    listing = getattr(params, f"{name}_sha256")
    return collect_images(directory, load_sha256_list(listing) if listing else None)


def build_evalsets(
    params: EvalSetParams,
    degradation: DegradationParams,
    prepared_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> StageReport:
    """Every set of ``params.sets`` under ``out_dir`` (complete or absent)."""
    for r, s in params.settings:
        if r > degradation.blur_max or s > degradation.noise_max:
            raise EvalSetError(
                f"evalsets.settings: ({r:g}, {s:g}) exceeds degradation.blur_max/noise_max "
                f"({degradation.blur_max:g}, {degradation.noise_max:g})"
            )
    report = StageReport("evalsets")
    sets: dict[str, dict[str, int]] = {}
    with staging_dir(out_dir) as tmp:
        for name in params.sets:
            images = _set_images(name, params, Path(prepared_dir))
            (tmp / name).mkdir()
            manifest = build_evalset(name, images, tmp / name, params, degradation, report)
            sets[name] = {"images": len(manifest["images"]), "files": len(manifest["files"])}
            if not manifest["images"]:
                raise EvalSetError(f"evaluation set {name!r} has no usable image")
    report.extra["sets"] = sets
    return report
