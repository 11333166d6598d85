"""Latency of the studio, through the studio's own code path (the page's handlers).

    .venv/bin/python benchmarks/studio_latency.py --configs demo,authors --threads 2 \
        --json bench-results/studio_latency.json

For each generator config (random seeded weights saved as a real checkpoint, or
``--mse-model``/``--gan-model`` for trained ones), an MSE + GAN pair is loaded into a
:class:`pipeline.studio.session.ModelSession` and driven through
:class:`pipeline.studio.ui.Studio`, exactly as the page does:

* ``preview_ms``: a ``--preview`` (256) box released on a slider: crop with the context margin,
  restore, cut (``Studio.preview``, alpha already cached);
* ``full_ms``: the whole ``--full`` (512) image with the default tiling, the PNG written for
  download (``Studio.full``);
* ``alpha_blend_ms``: an alpha the cache has not seen: the DNI blend of the two models in
  memory (``ModelSession.generator``); ``alpha_cached_ms``: the same alpha again (a cache hit);
* ``preview_new_alpha_ms``: a preview right after a new alpha (blend + preview), what a user
  waits for after releasing the alpha slider.

The input is scikit-image's astronaut (512x512, bundled), degraded with blur 2 and noise 25, and
cropped or tiled to ``--full``. The inference path is whatever :func:`pipeline.inference.restore`
runs (eager fp32 until the inference-path chooser of the performance issue lands; the studio
then follows it without change). Timing: ``--warmup`` untimed runs, ``--repeats`` timed runs,
the median reported. Numbers are only comparable within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.registry import GENERATOR_CONFIGS, build_generator
from pipeline.checkpoint import save_generator
from pipeline.degradation import degrade, to_tensor, to_uint8
from pipeline.imageio import read_rgb8, write_png
from pipeline.studio.regions import sample_photos
from pipeline.studio.session import ModelSession, ModelSpec
from pipeline.studio.ui import Studio

log = logging.getLogger("benchmarks.studio_latency")


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(runs)


def _photo(size: int, folder: Path) -> Path:
    """The degraded astronaut, tiled (mirrored) or cropped to ``size x size``."""
    clean = read_rgb8(sample_photos()["astronaut.png"]).array
    reps = -(-size // clean.shape[0])
    clean = np.pad(clean, ((0, (reps - 1) * clean.shape[0]),) * 2 + ((0, 0),), mode="symmetric")
    clean = np.ascontiguousarray(clean[:size, :size])
    noisy = degrade(to_tensor(clean), 2.0, 25.0, generator=torch.Generator().manual_seed(0))
    return write_png(folder / f"astronaut_{size}.png", to_uint8(noisy))


def _pair(config: str, folder: Path, mse: str | None, gan: str | None) -> ModelSpec:
    if mse and gan:
        return ModelSpec(mse_model=mse, gan_model=gan)
    paths = []
    for role, seed in (("mse", 0), ("gan", 1)):
        model = build_generator(config, generator=torch.Generator().manual_seed(seed))
        paths.append(save_generator(folder / f"{config}-{role}", model, metadata={"bench": role}))
    return ModelSpec(mse_model=str(paths[0]), gan_model=str(paths[1]))


def measure(
    config: str, args: argparse.Namespace, folder: Path, photo: Path
) -> dict[str, float | str]:
    spec = _pair(config, folder, args.mse_model, args.gan_model)
    studio = Studio(ModelSession(spec, device=args.device, cache_size=4))
    try:
        loaded = studio.load(str(photo))
        image = loaded[0]
        if image is None or not loaded[1]:
            raise SystemExit(f"could not load {photo}: {loaded[-2]}")
        c = image.width // 2
        blur, noise = 2.0, 25.0

        def preview(alpha: float = 0.5):
            out = studio.preview(image, blur, noise, alpha, c, c, args.preview, False, None, 0, 0)
            if not isinstance(out[0], tuple):
                raise SystemExit(f"preview failed: {out[-1]}")
            return out

        def full():
            out = studio.full(
                image,
                blur,
                noise,
                0.5,
                c,
                c,
                args.preview,
                False,
                None,
                0,
                0,
                progress=lambda *a, **k: None,
            )
            if not isinstance(out[1], str):
                raise SystemExit(f"full image failed: {out[-1]}")
            return out

        session = studio.session
        result: dict[str, float | str] = {
            "preview_ms": _median_ms(preview, args.repeats, args.warmup),
            "full_ms": _median_ms(full, args.repeats, args.warmup),
        }
        # Fresh alphas each run (never in the cache), then the same alpha again (a hit).
        fresh = iter(np.linspace(0.01, 0.49, (args.repeats + args.warmup) * 2 + 2).tolist())
        result["alpha_blend_ms"] = _median_ms(
            lambda: session.generator(next(fresh)), args.repeats, args.warmup
        )
        session.generator(0.77)
        result["alpha_cached_ms"] = _median_ms(
            lambda: session.generator(0.77), args.repeats, args.warmup
        )
        result["preview_new_alpha_ms"] = _median_ms(
            lambda: preview(next(fresh)), args.repeats, args.warmup
        )
        result["path"] = "pipeline.inference.restore"
        return result
    finally:
        studio.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default="demo,authors", help="generator configs, comma-separated"
    )
    parser.add_argument("--preview", type=int, default=256, help="preview box side (256)")
    parser.add_argument("--full", type=int, default=512, help="full image side (512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--mse-model", help="trained MSE checkpoint (else random weights)")
    parser.add_argument("--gan-model", help="trained GAN checkpoint (with --mse-model)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in GENERATOR_CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown} (known: {sorted(GENERATOR_CONFIGS)})")
    if bool(args.mse_model) != bool(args.gan_model):
        parser.error("give both --mse-model and --gan-model, or neither")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    report: dict[str, object] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
        },
        "preview": args.preview,
        "full": args.full,
        "repeats": args.repeats,
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="studio-latency-") as tmp:
        folder = Path(tmp)
        photo = _photo(args.full, folder)
        for config in configs:
            report["configs"][config] = measure(config, args, folder, photo)

    keys = ("preview_ms", "full_ms", "alpha_blend_ms", "alpha_cached_ms", "preview_new_alpha_ms")
    sys.stdout.write(f"{'config':<10}" + "".join(f"{k:>22}" for k in keys) + "\n")
    for config, row in report["configs"].items():
        sys.stdout.write(f"{config:<10}" + "".join(f"{row[k]:>22.1f}" for k in keys) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
