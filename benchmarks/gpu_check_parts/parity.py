"""Part ``loader_parity``: the DALI pipeline on the GPU (``device_id=0``: ``mixed`` PNG decoder,
GPU blur, noise, quantisation) against the CPU loaders' reference, the torch degradation
(:func:`pipeline.degradation.degrade`, what pipeline/data/torch_loader.py runs), through the
entry points and with the tolerances of the CPU tests (tests/test_loader_parity.py,
tests/test_loader_context.py):

* whole images (``run_degradation``) and context-margin windows (``run_patch_degradation``)
  at fixed blur levels: blurred floats, 8-bit output, share of differing values;
* the training graph's patches on the raw and PNG shards with the levels, crops and flips it
  drew (its debug outputs), for the configured ``degradation.sampling`` and the other one;
* the noise statistics on flat grey images (std per sigma, mean, independence between
  channels and neighbours, quantisation), DALI's next to the torch reference's.

In the dry run the same code runs DALI's CPU pipeline (``device_id=None``); the check that
the GPU pipeline was the one measured is then skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.gpu_check_parts.common import PartRun

# Tolerances of the CPU tests (tests/test_loader_parity.py, tests/test_loader_context.py).
BLUR_FLOAT_TOL = 1e-5  # |DALI blurred - float64 reference| before quantisation ([0, 1] units)
LEVEL_TOL = 1 / 255 + 1e-6  # after 8 bits: within one grey level
DIFFERING_TOL = 1e-3  # share of 8-bit values that differ at all (whole images, windows)
NOISE_STD_REL = 0.04  # measured std within 4 % of sigma / 255 (12288 values per sigma)
NOISE_MEAN_SE = 4.0  # |mean| within 4 standard errors
NOISE_CORR = 0.05  # |correlation| between channels and between neighbours
NOISE_SIGMAS = (1.0, 5.0, 15.0, 30.0, 50.0)


def _shard_images(shards_dir: str) -> dict[str, np.ndarray]:
    """Every sub-image of a raw shard set by key (HWC uint8)."""
    from pipeline.data.batch import read_shard_set
    from pipeline.data.torch_loader import read_sample_table

    shards = read_shard_set(shards_dir)
    table = read_sample_table(shards)
    files: dict[int, int] = {}
    try:
        return {
            key: np.frombuffer(table.read(i, files), np.uint8).reshape(shards.raw_shape)
            for i, key in enumerate(table.keys)
        }
    finally:
        for fd in files.values():
            os.close(fd)


def _nchw(images: list[np.ndarray], dtype: Any = None) -> Any:
    import torch

    stacked = torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images])
    return stacked.to(dtype or torch.float32) / 255.0


def _diff_figures(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |diff| in grey levels, share of values differing by more than 1e-6)."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(diff.max()) * 255, float((diff > 1e-6).mean())


def _patch_positions(h: int, w: int, crop: int, radius: int) -> list[tuple[int, int]]:
    """Corners, edges, one kernel radius in, and the interior."""
    ys = {0, 1, radius - 1, radius, (h - crop) // 2, h - crop - radius, h - crop}
    xs = {0, 3, radius, (w - crop) // 2, w - crop - radius - 1, w - crop}
    return [
        (y, x) for y in sorted(ys) for x in sorted(xs) if 0 <= y <= h - crop and 0 <= x <= w - crop
    ]


def _key_of(source_info: np.ndarray) -> str:
    """DALI's ``<tar>:<offset>:<member>`` (zero-padded bytes) -> the sample key."""
    text = bytes(source_info.astype(np.uint8).tolist()).rstrip(b"\0").decode()
    return text.rsplit(":", 1)[-1].split(".", 1)[0]


def _as_numpy(out: Any) -> np.ndarray:
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    return np.array(out.as_tensor())


def run(run: PartRun) -> None:
    import torch

    from pipeline.config import load_params
    from pipeline.data import dali_pipeline as dp
    from pipeline.data.batch import read_shard_set
    from pipeline.degradation import blur, degrade, level_grid, quantize

    deg = load_params(run.config.params).degradation
    k, radius, crop = deg.kernel_size, deg.kernel_size // 2, run.sizes.crop
    device_id = 0 if run.cuda else None
    run.figures["device_id"] = device_id
    run.cuda_check(
        "device_id", device_id, device_id == 0, "0 (the GPU pipeline)", "the CPU pipeline (None)"
    )
    by_key = _shard_images(run.config.shards["raw"])
    # non-square (H/W mix-ups show): the first six sub-images less 7 columns
    picked = [np.ascontiguousarray(im[:, 7:]) for im in list(by_key.values())[:6]]
    n = len(picked)
    clean = _nchw(picked)

    whole: dict[str, Any] = {}
    for level in run.sizes.parity_levels:
        out = dp.run_degradation(picked, [level] * n, [0.0] * n, kernel_size=k, device_id=device_id)
        reference = blur(clean.double(), level, k).numpy()
        expected = degrade(clean.double(), level, 0.0, kernel_size=k).numpy()
        blurred, _ = _diff_figures(out["blurred"], reference)
        worst, share = _diff_figures(out["degraded"], expected)
        whole[f"{level:g}"] = {
            "blurred_max_levels": blurred,
            "degraded_max_levels": worst,
            "differing_share": share,
            "clean_exact": bool(np.array_equal(out["clean"], clean.numpy())),
        }
    run.figures["whole"] = whole
    _level_checks(run, "whole", whole)
    run.save()

    h, w = picked[0].shape[:2]
    places = _patch_positions(h, w, crop, radius)
    which = [i % n for i in range(len(places))]
    windows: dict[str, Any] = {}
    for level in (0.0, 0.7, 2.0, 4.0):
        m = len(places)
        out = dp.run_patch_degradation(
            [picked[i] for i in which],
            [p[0] for p in places],
            [p[1] for p in places],
            [level] * m,
            [0.0] * m,
            crop=crop,
            kernel_size=k,
            device_id=device_id,
        )
        whole_blur = blur(clean.double(), level, k)
        whole_deg = degrade(clean.double(), level, 0.0, kernel_size=k)
        sl = [(..., slice(t, t + crop), slice(x, x + crop)) for t, x in places]
        ref_b = np.stack([whole_blur[which[i]][sl[i]].numpy() for i in range(m)])
        ref_d = np.stack([whole_deg[which[i]][sl[i]].numpy() for i in range(m)])
        clean_ref = np.stack([clean[which[i]][sl[i]].numpy() for i in range(m)])
        blurred, _ = _diff_figures(out["blurred"], ref_b)
        worst, share = _diff_figures(out["degraded"], ref_d)
        windows[f"{level:g}"] = {
            "blurred_max_levels": blurred,
            "degraded_max_levels": worst,
            "differing_share": share,
            "clean_exact": bool(np.array_equal(out["clean"], clean_ref)),
            "positions": m,
        }
    run.figures["windows"] = windows
    _level_checks(run, "windows", windows)
    run.save()

    pipelines: dict[str, Any] = {}
    blur_values = level_grid(deg.blur_max, deg.blur_step)
    for encoding, sampling in [
        ("raw", deg.sampling),
        ("png", deg.sampling),
        *([("raw", "authors")] if deg.sampling != "authors" else [("raw", "uniform")]),
    ]:
        shards = read_shard_set(run.config.shards[encoding])
        pipe = dp.build_train_pipeline(
            tars=shards.tars,
            indices=shards.indices,
            encoding=shards.encoding,
            sub_size=shards.crop_size,
            batch_size=run.sizes.batch,
            crop=crop,
            sampling=sampling,
            blur_values=blur_values,
            noise_values=[0.0],
            blur_max=deg.blur_max,
            noise_max=deg.noise_max,
            kernel_size=k,
            seed=11,
            num_threads=run.sizes.threads,
            shuffle_buffer=64,
            device_id=device_id,
            debug=True,
        )
        pipe.build()
        names = list(dp.OUTPUTS) + list(dp.DEBUG_OUTPUTS)
        worst = share_sum = z_err = 0.0
        samples = zero_blur = 0
        clean_exact = True
        for _ in range(run.sizes.parity_batches):
            b = {name: _as_numpy(o) for name, o in zip(names, pipe.run(), strict=True)}
            for i in range(len(b["blur"])):
                level = float(b["blur"][i])
                z_err = max(z_err, abs(float(b["z"][i][0]) * deg.blur_max - level))
                z_err = max(z_err, abs(float(b["z"][i][1]) * deg.noise_max - float(b["noise"][i])))
                image = _nchw([by_key[_key_of(b["source_info"][i])]], torch.float64)
                top, left = (int(v) for v in b["top_left"][i])
                sl = (..., slice(top, top + crop), slice(left, left + crop))
                ref = _flipped(degrade(image, level, 0.0, kernel_size=k)[sl][0], b, i)
                ref_clean = _flipped(image[sl][0], b, i)
                d_max, d_share = _diff_figures(b["degraded"][i], ref.numpy())
                worst, share_sum = max(worst, d_max), share_sum + d_share
                clean_exact &= bool(
                    np.array_equal(np.round(b["clean"][i] * 255), np.round(ref_clean.numpy() * 255))
                )
                samples += 1
                zero_blur += level == 0.0
        del pipe
        pipelines[f"{encoding}/{sampling}"] = {
            "samples": samples,
            "degraded_max_levels": worst,
            "differing_share": share_sum / max(samples, 1),
            "z_max_error": z_err,
            "clean_exact": clean_exact,
            "blur_zero_share": zero_blur / max(samples, 1),
        }
    run.figures["pipelines"] = pipelines
    for key, f in pipelines.items():
        run.check(
            f"pipelines.{key}.degraded_max_levels",
            f["degraded_max_levels"],
            f["degraded_max_levels"] <= LEVEL_TOL * 255,
            "<= 1 level",
        )
        run.check(
            f"pipelines.{key}.z_max_error", f["z_max_error"], f["z_max_error"] <= 1e-5, "<= 1e-5"
        )
        run.check(f"pipelines.{key}.clean_exact", f["clean_exact"], f["clean_exact"], "exact")
    run.save()

    run.figures["noise"] = _noise_statistics(run, dp, quantize, device_id)


def _flipped(patch: Any, b: dict[str, np.ndarray], i: int) -> Any:
    """A CHW patch flipped as the pipeline drew it: the torch loader's own ``flip_patch``
    with the DALI graph's drawn flips (the two loaders share the flip order)."""
    from pipeline.data.torch_loader import PatchDraw, flip_patch

    top, left = (int(v) for v in b["top_left"][i])
    flips = (bool(b[k][i]) for k in ("hflip", "vflip", "transpose"))
    return flip_patch(patch, PatchDraw(top, left, *flips))


def _level_checks(run: PartRun, section: str, figures: dict[str, Any]) -> None:
    for level, f in figures.items():
        where = f"{section}.blur{level}"
        run.check(
            f"{where}.blurred_max_levels",
            f["blurred_max_levels"],
            f["blurred_max_levels"] < BLUR_FLOAT_TOL * 255,
            f"< {BLUR_FLOAT_TOL * 255:.3g} levels",
        )
        run.check(
            f"{where}.degraded_max_levels",
            f["degraded_max_levels"],
            f["degraded_max_levels"] <= LEVEL_TOL * 255,
            "<= 1 level",
        )
        run.check(
            f"{where}.differing_share",
            f["differing_share"],
            f["differing_share"] < DIFFERING_TOL,
            f"< {DIFFERING_TOL:g}",
        )
        run.check(f"{where}.clean_exact", f["clean_exact"], f["clean_exact"], "exact")


def _noise_statistics(run: PartRun, dp: Any, quantize: Callable, device_id: int | None) -> dict:
    """The noise DALI adds (before clamping) on flat grey images, at blur 0 and 2, next to
    the torch reference's on the same images."""
    import torch

    from pipeline.degradation import blur, degrade

    grey = [np.full((64, 64, 3), 128, np.uint8)] * len(NOISE_SIGMAS)
    figures: dict[str, Any] = {}
    for blur_level in (0.0, 2.0):
        out = dp.run_degradation(
            grey, [blur_level] * len(grey), list(NOISE_SIGMAS), seed=3, device_id=device_id
        )
        noise = (out["noisy"] - out["blurred"]).astype(np.float64)
        # the CPU loaders' noise: the torch reference on the same images, before quantising
        clean = torch.full((len(grey), 3, 64, 64), 128 / 255, dtype=torch.float64)
        gen = torch.Generator().manual_seed(3)
        ref_noisy = degrade(
            clean, blur_level, list(NOISE_SIGMAS), generator=gen, quantize=False
        ).numpy()
        ref_noise = ref_noisy - blur(clean, blur_level).numpy()
        per_sigma = {}
        for i, sigma in enumerate(NOISE_SIGMAS):
            values = noise[i].ravel()
            std, mean = float(values.std()), float(values.mean())
            rel = abs(std - sigma / 255) / (sigma / 255)
            ref_std = float(ref_noise[i].std())
            ref_rel = abs(ref_std - sigma / 255) / (sigma / 255)
            channel = float(np.corrcoef(noise[i, 0].ravel(), noise[i, 1].ravel())[0, 1])
            neighbour = float(
                np.corrcoef(noise[i, 0, :, :-1].ravel(), noise[i, 0, :, 1:].ravel())[0, 1]
            )
            per_sigma[f"{sigma:g}"] = {
                "std_levels": std * 255,
                "rel_error": rel,
                "torch_reference_std_levels": ref_std * 255,
                "torch_reference_rel_error": ref_rel,
                "mean_levels": mean * 255,
                "channel_corr": channel,
                "neighbour_corr": neighbour,
            }
            where = f"noise.blur{blur_level:g}.sigma{sigma:g}"
            run.check(f"{where}.rel_error", rel, rel < NOISE_STD_REL, f"< {NOISE_STD_REL:g}")
            run.check(
                f"{where}.torch_reference_rel_error",
                ref_rel,
                ref_rel < NOISE_STD_REL,
                f"< {NOISE_STD_REL:g} (the same statistic on the CPU loaders' reference)",
            )
            se = sigma / 255 / math.sqrt(values.size)
            run.check(
                f"{where}.mean_levels",
                mean * 255,
                abs(mean) < NOISE_MEAN_SE * se,
                f"|mean| < {NOISE_MEAN_SE * se * 255:.3g} levels",
            )
            run.check(
                f"{where}.channel_corr", channel, abs(channel) < NOISE_CORR, f"< {NOISE_CORR}"
            )
            run.check(
                f"{where}.neighbour_corr", neighbour, abs(neighbour) < NOISE_CORR, f"< {NOISE_CORR}"
            )
        ref_q = quantize(torch.from_numpy(out["noisy"]).double()).numpy()
        worst, share = _diff_figures(out["degraded"], ref_q)
        figures[f"blur{blur_level:g}"] = per_sigma
        figures[f"blur{blur_level:g}_quantise"] = {"max_levels": worst, "differing_share": share}
        run.check(
            f"noise.blur{blur_level:g}.quantise_max_levels",
            worst,
            worst <= LEVEL_TOL * 255,
            "<= 1 level",
        )
        run.check(
            f"noise.blur{blur_level:g}.quantise_differing_share",
            share,
            share < DIFFERING_TOL,
            f"< {DIFFERING_TOL:g}",
        )
    return figures
