"""How far our degradation is from the authors' precision choices, in 8-bit levels.

The authors' training data (``generate_2groups.m``, HaomingCai/CUGAN) and test images are made
in MATLAB with these precision choices, emulated here in NumPy/SciPy:

* ``img = im2double(imread(...))``: float64 ``k / 255``.
* blur: ``kernel = single(fspecial('gaussian', 21, r))`` -- the 2-D kernel built in double and
  rounded to single -- then ``imfilter(img, double(kernel), 'replicate')``: a 2-D correlation
  in double with replicate border (emulated by ``scipy.ndimage.correlate(mode="nearest")``).
* blur only: the double image is written by ``imwrite``, i.e. ``im2uint8`` of a double:
  ``round(255 x)`` half away from zero, saturated (no single rounding, no noise).
* noise (alone or after blur): ``single(img + sigma / 255 * randn(size(img)))`` -- the noise
  added in double, the sum rounded to single -- then ``im2uint8`` of the single:
  ``round(255 x)`` with ``255 x`` computed in single (as GNU Octave's ``im2uint8`` does).

Ours (pipeline/degradation.py, the torch loader and the evaluation sets): float32 images, a
separable kernel built in float64 and cast to float32, two 1-D float32 passes, float32
normals scaled by ``sigma / 255``, clip and round half up in float64. Also measured: the same
in float64, and DALI's CPU blur (blur-only settings; DALI draws its own noise). Both sides get
the SAME normals (float64 draws; ours uses them rounded to float32, as it draws float32), so
what is measured is precision, not the noise stream (which differs by design: docs/data.md).

Usage::

    .venv/bin/python benchmarks/degradation_fidelity.py --images ../shared/datasets/CBSD68

prints one row per setting (the paper's ten by default): the largest |difference| in 8-bit
levels over all pixels and images, and the share of differing pixel values, for each of ours
against the authors' emulation; ``--json FILE`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from pipeline.config import EvalSetParams
from pipeline.degradation import blur, gaussian_kernel1d, gaussian_kernel2d, quantize
from pipeline.imageio import read_rgb8

log = logging.getLogger("benchmarks.degradation_fidelity")

KERNEL = 21


def im2uint8_double(x: np.ndarray) -> np.ndarray:
    """MATLAB ``im2uint8``/``imwrite`` of a double image: round(255 x), ties away, saturated."""
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5)


def im2uint8_single(x: np.ndarray) -> np.ndarray:
    """``im2uint8`` of a single image: ``255 * x`` in single, then round ties away, saturate."""
    y = np.float32(255.0) * np.clip(x.astype(np.float32), np.float32(0), np.float32(1))
    return np.floor(y.astype(np.float64) + 0.5)  # exact: y is a float32 in [0, 255]


def authors_blur(img64: np.ndarray, r: float) -> np.ndarray:
    """``imfilter(img, double(single(fspecial('gaussian', 21, r))), 'replicate')`` (HWC)."""
    if r == 0:
        return img64
    kernel = gaussian_kernel2d(r, KERNEL).numpy().astype(np.float32).astype(np.float64)
    return np.stack(
        [ndimage.correlate(img64[..., c], kernel, mode="nearest") for c in range(3)], axis=2
    )


def authors_degrade(img64: np.ndarray, r: float, sigma: float, normals: np.ndarray) -> np.ndarray:
    blurred = authors_blur(img64, r)
    if sigma == 0:
        return im2uint8_double(blurred)  # blur-only images are written as doubles
    return im2uint8_single((blurred + sigma / 255.0 * normals).astype(np.float32))


def ours_degrade(img: torch.Tensor, r: float, sigma: float, normals: np.ndarray) -> np.ndarray:
    """pipeline.degradation.degrade's ops (blur, + normals * sigma/255, clip, round half up) with
    given normals in the image's dtype; returns 8-bit levels HWC float64."""
    blurred = blur(img, r, KERNEL)
    noise = torch.from_numpy(normals).permute(2, 0, 1)[None].to(img.dtype)
    out = quantize(blurred + noise * (sigma / 255.0)) if sigma else quantize(blurred)
    return np.rint(out[0].permute(1, 2, 0).double().numpy() * 255.0)


def dali_blur_only(images: list[np.ndarray], r: float) -> list[np.ndarray] | None:
    try:
        from pipeline.data.dali_pipeline import run_degradation
    except ImportError:
        return None
    result: list[np.ndarray | None] = [None] * len(images)
    for shape in {im.shape for im in images}:  # a DALI batch of arrays needs one shape
        group = [i for i, im in enumerate(images) if im.shape == shape]
        n = len(group)
        out = run_degradation([images[i] for i in group], [r] * n, [0.0] * n)["degraded"]
        for i, o in zip(group, out, strict=True):
            result[i] = np.rint(o.transpose(1, 2, 0).astype(np.float64) * 255.0)
    return result


def kernel_differences() -> dict[str, float]:
    """Largest weight differences of the effective kernels at r = 0.1 ... 4."""
    worst = {"float32_vs_authors_single": 0.0, "float64_vs_authors_single": 0.0}
    for k in range(1, 41):
        r = k / 10
        authors = gaussian_kernel2d(r, KERNEL).numpy().astype(np.float32).astype(np.float64)
        k1_64 = gaussian_kernel1d(r, KERNEL).numpy()
        k1_32 = k1_64.astype(np.float32)
        ours32 = np.outer(k1_32, k1_32).astype(np.float32).astype(np.float64)
        worst["float32_vs_authors_single"] = max(
            worst["float32_vs_authors_single"], float(np.abs(ours32 - authors).max())
        )
        worst["float64_vs_authors_single"] = max(
            worst["float64_vs_authors_single"],
            float(np.abs(np.outer(k1_64, k1_64) - authors).max()),
        )
    return worst


def measure(images: list[np.ndarray], settings: list[tuple[float, float]], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = {}
    for r, sigma in settings:
        stats = {name: [0.0, 0, 0] for name in ("float32", "float64", "dali_float32")}
        dali = dali_blur_only(images, r) if sigma == 0 else None
        for i, image in enumerate(images):
            img64 = image.astype(np.float64) / 255.0
            normals = rng.standard_normal(image.shape)
            authors = authors_degrade(img64, r, sigma, normals)
            t = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]
            candidates = {
                "float32": ours_degrade(t.float() / 255.0, r, sigma, normals),
                "float64": ours_degrade(t.double() / 255.0, r, sigma, normals),
            }
            if dali is not None:
                candidates["dali_float32"] = dali[i]
            for name, ours in candidates.items():
                diff = np.abs(ours - authors)
                s = stats[name]
                s[0] = max(s[0], float(diff.max()))
                s[1] += int((diff > 0).sum())
                s[2] += diff.size
        rows[f"blur{r:g}_noise{sigma:g}"] = {
            name: {"max_abs_levels": s[0], "share_differing": s[1] / s[2]}
            for name, s in stats.items()
            if s[2]
        }
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True, help="folder of PNG images (CBSD68)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    files = sorted(args.images.glob("*.png"))[: args.max_images]
    if not files:
        raise SystemExit(f"{args.images}: no PNG images")
    images = [read_rgb8(f).array for f in files]
    settings = [(float(r), float(s)) for r, s in EvalSetParams().settings]
    report = {
        "images": len(images),
        "source": str(args.images),
        "kernel_max_weight_difference": kernel_differences(),
        "settings": measure(images, settings, args.seed),
    }
    print(f"{len(images)} images from {args.images}; |ours - authors' emulation| in 8-bit levels")
    print(
        f"{'setting':<16} {'float32 max':>11} {'share':>9} {'float64 max':>11} {'share':>9}"
        f" {'DALI max':>9} {'share':>9}"
    )
    for key, row in report["settings"].items():
        cells = []
        for name in ("float32", "float64", "dali_float32"):
            if name in row:
                cells += [
                    f"{row[name]['max_abs_levels']:.0f}",
                    f"{row[name]['share_differing']:.2e}",
                ]
            else:
                cells += ["-", "-"]
        print(
            f"{key:<16} {cells[0]:>11} {cells[1]:>9} {cells[2]:>11} {cells[3]:>9}"
            f" {cells[4]:>9} {cells[5]:>9}"
        )
    for name, value in report["kernel_max_weight_difference"].items():
        print(f"kernel weights, {name}: max |difference| {value:.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
