"""Context-margin patches: a patch's degradation is the whole sub-image's, cropped.

Both loaders read a window ``r = kernel_size // 2`` pixels larger than the patch per side
(clamped into the sub-image, replicated where it ends), blur it, and keep the centre. So:

- torch: the blur of the window the loader reads equals ``blur(whole sub-image)`` cropped,
  bit for bit, everywhere (the same float ops on the same padded values);
- DALI: the window path equals DALI's own whole-image blur cropped, bit for bit away from the
  sub-image's border (within 2 float32 ulps next to it, where DALI's border code runs), and the
  training pipeline's patches are those of the whole degraded sub-image;
- DALI's window path matches the torch reference as tightly as the whole-image parity
  (tests/test_loader_parity.py);
- raw and PNG shards give the same patches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ShardParams, parse_params
from pipeline.data.batch import LoaderError, read_shard_set
from pipeline.data.extract import encode_png
from pipeline.data.loader import build_train_loader
from pipeline.data.shards import write_shards
from pipeline.data.torch_loader import _EpochBatches, context_window, read_sample_table
from pipeline.degradation import blur, degrade, quantize

CBSD68 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "CBSD68"
R = 10  # kernel_size 21
SUB = 48  # sub-image side: a 16 px crop's 36 px window fits inside, or touches the borders
CROP = 16
SIGMAS = [0.0, 0.5, 1.3, 2.0, 4.0]


def photo_like(count: int, h: int, w: int) -> list[np.ndarray]:
    """CBSD68 crops when the shared set is present, else smooth textured images."""
    if CBSD68.is_dir():
        from PIL import Image

        files = sorted(CBSD68.glob("*.png"))[:count]
        return [
            np.ascontiguousarray(np.asarray(Image.open(f).convert("RGB"))[:h, :w]) for f in files
        ]
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(count):
        base = 127 + 90 * np.sin(xx / rng.uniform(2, 9))[..., None] * np.cos(yy / 4)[..., None]
        out.append(np.clip(base + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def chw(image: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].to(dtype) / 255.0


def make_shards(directory: Path, images: list[np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    by_key = {f"img{i:02d}-y0-x0": im for i, im in enumerate(images)}
    if encoding == "raw":
        samples = [{"key": k, "data": v.tobytes()} for k, v in by_key.items()]
    else:
        samples = [{"key": k, "data": encode_png(v, 1)} for k, v in by_key.items()]
    write_shards(
        samples,
        lambda s: s["data"],
        directory,
        ShardParams(max_count=4),
        crop_size=images[0].shape[0],
        encoding=encoding,
    )
    return by_key


def positions(h: int, w: int, crop: int) -> list[tuple[int, int]]:
    """Corners, edges, one kernel radius in, and the interior."""
    ys = sorted({0, 1, R - 1, R, (h - crop) // 2, h - crop - R, h - crop})
    xs = sorted({0, 3, R, (w - crop) // 2, w - crop - R - 1, w - crop})
    return [(y, x) for y in ys for x in xs if 0 <= y <= h - crop and 0 <= x <= w - crop]


# ---------------------------------------------------------------------------------------------
# torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_window_blur_is_the_whole_image_blur_cropped_exactly(dtype):
    image = photo_like(1, 48, 57)[0]  # non-square, so H/W mix-ups show
    whole = chw(image, dtype)
    h, w = image.shape[:2]
    for sigma in SIGMAS[1:4]:
        reference = blur(whole, sigma)
        for top, left in positions(h, w, CROP):
            win = context_window(h, w, top, left, CROP, R)
            part = whole[..., win.y0 : win.y1, win.x0 : win.x1]
            window = F.pad(part, win.pad, mode="replicate")
            assert window.shape[-2:] == (CROP + 2 * R, CROP + 2 * R)
            got = blur(window, sigma, border="valid")
            want = reference[..., top : top + CROP, left : left + CROP]
            assert torch.equal(got, want), (sigma, top, left)


def test_context_window_clamps_into_small_sub_images():
    """A sub-image smaller than crop + 2r: the window is the whole sub-image, padded by
    replicating its own edges -- the authors' whole-image degradation."""
    win = context_window(24, 24, 4, 8, 16, R)
    assert (win.y0, win.y1, win.x0, win.x1) == (0, 24, 0, 24)
    assert win.pad == (2, 10, 6, 6)  # left, right, top, bottom: 36 = 24 + 12 each way
    interior = context_window(100, 100, 40, 30, 16, R)
    assert (interior.y0, interior.y1, interior.x0, interior.x1) == (30, 66, 20, 56)
    assert interior.pad == (0, 0, 0, 0)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_torch_loader_windows_blur_like_the_whole_sub_image(tmp_path, encoding):
    """The windows the loader itself reads (raw: one pread of the rows; png: decode + slice)."""
    images = photo_like(6, SUB, SUB)
    by_key = make_shards(tmp_path, images, encoding)
    params = parse_params({"loader": {"crop": CROP, "batch_size": 2, "backend": "torch"}})
    table = read_sample_table(read_shard_set(tmp_path))
    dataset = _EpochBatches(
        table,
        rank=0,
        world_size=1,
        seed=0,
        batch_size=2,
        crop=CROP,
        degradation=params.degradation,
    )
    gen = torch.Generator().manual_seed(3)
    seen_clamped = seen_interior = False
    blurred: dict[tuple[str, float], torch.Tensor] = {}
    for _ in range(8):
        for i, key in enumerate(table.keys):
            window, draw = dataset.window(i, gen)
            sigma = float(SIGMAS[(i + draw.top) % len(SIGMAS)])
            if (key, sigma) not in blurred:
                blurred[key, sigma] = blur(chw(by_key[key]), sigma)
            sl = (..., slice(draw.top, draw.top + CROP), slice(draw.left, draw.left + CROP))
            assert torch.equal(window[None, :, R:-R, R:-R], chw(by_key[key])[sl])  # clean patch
            assert torch.equal(blur(window[None], sigma, border="valid"), blurred[key, sigma][sl])
            clamped = not (R <= draw.top <= SUB - CROP - R and R <= draw.left <= SUB - CROP - R)
            seen_clamped |= clamped
            seen_interior |= not clamped
    assert seen_clamped and seen_interior


def test_raw_and_png_shards_give_identical_torch_batches(tmp_path):
    images = photo_like(6, SUB, SUB)
    for encoding in ("raw", "png"):
        make_shards(tmp_path / encoding, images, encoding)
    params = parse_params(
        {"loader": {"crop": CROP, "batch_size": 2, "num_threads": 1, "backend": "torch"}}
    )
    batches = {}
    for encoding in ("raw", "png"):
        loader = build_train_loader(tmp_path / encoding, params, seed=5)
        loader.num_workers = 0
        batches[encoding] = list(loader)
    assert len(batches["raw"]) == 3
    for a, b in zip(batches["raw"], batches["png"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_raw_sample_of_the_wrong_size_is_refused(tmp_path):
    make_shards(tmp_path, photo_like(4, SUB, SUB), "raw")
    manifest = json.loads((tmp_path / "shards.json").read_text())
    (tmp_path / "shards.json").write_text(json.dumps(manifest | {"crop_size": SUB - 1}))
    with pytest.raises(LoaderError, match="expected 47x47x3") as err:
        read_sample_table(read_shard_set(tmp_path))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# DALI


def _border_distance(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))


def test_dali_window_path_is_its_whole_image_blur_cropped():
    dali_pipeline = pytest.importorskip("pipeline.data.dali_pipeline")
    images = photo_like(6, 48, 57)
    h, w = images[0].shape[:2]
    far = _border_distance(h, w) >= R
    places = positions(h, w, CROP)
    which = [k % len(images) for k in range(len(places))]  # one batch: every place, some image
    n = len(places)
    for sigma in SIGMAS:
        whole = dali_pipeline.run_degradation(images, [sigma] * 6, [0.0] * 6)
        out = dali_pipeline.run_patch_degradation(
            [images[k] for k in which],
            [p[0] for p in places],
            [p[1] for p in places],
            [sigma] * n,
            [0.0] * n,
            crop=CROP,
        )
        for i, (top, left) in enumerate(places):
            ref = {name: whole[name][which[i]] for name in ("blurred", "degraded", "clean")}
            sl = (slice(None), slice(top, top + CROP), slice(left, left + CROP))
            mask = far[sl[1:]]
            got, want = out["blurred"][i], ref["blurred"][sl]
            assert np.array_equal(got[:, mask], want[:, mask]), (sigma, top, left)
            assert np.abs(got - want).max() <= 2.5e-7  # 2 float32 ulps at 1.0
            assert np.array_equal(out["degraded"][i][:, mask], ref["degraded"][sl][:, mask])
            assert np.abs(out["degraded"][i] - ref["degraded"][sl]).max() <= 1 / 255 + 1e-6
            assert np.array_equal(out["clean"][i], ref["clean"][sl])


def test_dali_window_path_matches_the_torch_reference():
    """The same tolerances as the whole-image parity of tests/test_loader_parity.py."""
    dali_pipeline = pytest.importorskip("pipeline.data.dali_pipeline")
    images = photo_like(6, 64, 71)
    h, w = images[0].shape[:2]
    places = positions(h, w, 32)[:6]
    for sigma in [0.0, 0.7, 2.0, 4.0]:
        out = dali_pipeline.run_patch_degradation(
            images, [p[0] for p in places], [p[1] for p in places], [sigma] * 6, [0.0] * 6, crop=32
        )
        for i, (top, left) in enumerate(places):
            whole = chw(images[i], torch.float64)
            sl = (..., slice(top, top + 32), slice(left, left + 32))
            ref_blur = blur(whole, sigma)[sl][0].numpy()
            assert np.abs(out["blurred"][i] - ref_blur).max() < 1e-5
            expected = degrade(whole, sigma, 0.0)[sl][0].numpy()
            diff = np.abs(out["degraded"][i] - expected)
            assert diff.max() <= 1 / 255 + 1e-6
            assert (diff > 1e-6).mean() < 1e-3


def _unflip(patch: np.ndarray, hflip, vflip, transpose) -> np.ndarray:
    """Undo the pipeline's hflip -> vflip -> transpose on a CHW patch."""
    if transpose:
        patch = patch.transpose(0, 2, 1)
    if vflip:
        patch = patch[:, ::-1]
    if hflip:
        patch = patch[:, :, ::-1]
    return patch


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_dali_training_patches_are_the_degraded_sub_image_cropped(tmp_path, encoding):
    dali_pipeline = pytest.importorskip("pipeline.data.dali_pipeline")
    images = photo_like(8, SUB, SUB)
    by_key = make_shards(tmp_path, images, encoding)
    s = read_shard_set(tmp_path)
    pipe = dali_pipeline.build_train_pipeline(
        tars=s.tars,
        indices=s.indices,
        encoding=s.encoding,
        sub_size=s.crop_size,
        batch_size=4,
        crop=CROP,
        blur_values=[0.0, 1.0, 2.5, 4.0],
        noise_values=[0.0],
        blur_max=4.0,
        noise_max=50.0,
        seed=2,
        num_threads=1,
        shuffle_buffer=16,
        debug=True,
    )
    pipe.build()
    names = list(dali_pipeline.OUTPUTS) + list(dali_pipeline.DEBUG_OUTPUTS)
    far = _border_distance(SUB, SUB) >= R
    checked = 0
    for _ in range(4):
        b = {n: np.array(o.as_tensor()) for n, o in zip(names, pipe.run(), strict=True)}
        keys = [bytes(i.astype(np.uint8).tolist()).rstrip(b"\0").decode() for i in b["source_info"]]
        keys = [k.rsplit(":", 1)[-1].split(".", 1)[0] for k in keys]
        whole = dali_pipeline.run_degradation([by_key[k] for k in keys], b["blur"], [0.0] * 4)
        for i in range(4):
            top, left = (int(v) for v in b["top_left"][i])
            flips = (b["hflip"][i], b["vflip"][i], b["transpose"][i])
            sl = (slice(None), slice(top, top + CROP), slice(left, left + CROP))
            mask = far[sl[1:]]
            got = _unflip(b["degraded"][i], *flips)
            assert np.array_equal(got[:, mask], whole["degraded"][i][sl][:, mask])
            assert np.abs(got - whole["degraded"][i][sl]).max() <= 1 / 255 + 1e-6
            assert np.array_equal(_unflip(b["clean"][i], *flips), whole["clean"][i][sl])
            checked += 1
    assert checked == 16


def test_raw_and_png_shards_give_identical_dali_batches(tmp_path):
    pytest.importorskip("nvidia.dali")
    images = photo_like(8, SUB, SUB)
    for encoding in ("raw", "png"):
        make_shards(tmp_path / encoding, images, encoding)
    params = parse_params(
        {"loader": {"crop": CROP, "batch_size": 4, "num_threads": 1, "backend": "dali"}}
    )
    raw = list(build_train_loader(tmp_path / "raw", params, seed=1))
    png = list(build_train_loader(tmp_path / "png", params, seed=1))
    assert len(raw) == len(png) == 2
    for a, b in zip(raw, png, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_quantised_window_blur_equals_reference_within_one_level_on_real_images():
    """A blur-only torch loader patch, quantised, against the float64 whole-image reference."""
    image = photo_like(1, 64, 64)[0]
    whole32, whole64 = chw(image), chw(image, torch.float64)
    for sigma in SIGMAS:
        win = context_window(64, 64, 20, 7, 32, R)
        window = F.pad(whole32[..., win.y0 : win.y1, win.x0 : win.x1], win.pad, mode="replicate")
        got = quantize(blur(window, sigma, border="valid"))
        want = quantize(blur(whole64, sigma))[..., 20:52, 7:39].float()
        assert (got - want).abs().max() <= 1 / 255 + 1e-6
