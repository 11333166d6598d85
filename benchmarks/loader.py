"""Training-loader throughput: degraded crop x crop patches per second, several loaders, one run.

Loaders, over the same sub-images, batch size, crop and number of workers (``--threads``),
each on the shard encodings of ``--encodings`` (``raw``: the shards stage's uint8 pixels, read
by the crop window's rows; ``png``: decoded per sample):

* ``dali/<enc>``  our DALI pipeline (pipeline/data/dali_pipeline.py): CPU operators with
                  ``--threads`` DALI threads, or with ``--device gpu`` GPU operators (run that
                  on a machine with CUDA). PNG: ROI decode of the context window.
* ``torch/<enc>`` our pure-PyTorch loader (pipeline/data/torch_loader.py): raw rows or PIL
                  decode, the reference ``pipeline.degradation.degrade`` in ``--threads``
                  DataLoader workers.
* ``basicsr/png`` the field's usual recipe, as BasicSR/KAIR-style datasets do it: OpenCV
                  decode, numpy crop/flip/rotate, ``cv2.filter2D(..., BORDER_REPLICATE)`` with
                  the 21x21 kernel on the cropped patch (no context margin), numpy Gaussian
                  noise, 8-bit rounding, per-sample items collated by a DataLoader with
                  ``--threads`` workers (one OpenCV thread each).

All produce the same kind of batch (blur r on the 0.1 grid in [0, 4], noise sigma on the 1 grid
in [0, 50], 8-bit degraded + clean patch + z), so samples/s compare like for like; ours also
degrade a context window ``kernel_size // 2`` pixels wider per side than the patch. Each loader
is warmed up, then timed for ``--seconds`` in ``--rounds`` interleaved rounds (every loader
samples every period of the machine's drifting load); the table gives the median rate per
loader and its ratio to ``basicsr/png`` from the same run -- compare ratios, not figures from
different runs or machines. The last line says which backend ``loader.backend: auto`` would
pick from these figures (the decision code of pipeline/data/backend_choice.py). Timings mean
something only on a quiet machine.

Examples::

    .venv/bin/python benchmarks/loader.py --images ../shared/datasets/CBSD68 --threads 2
    .venv/bin/python benchmarks/loader.py --shards data/shards --threads 8 --device gpu

``--images`` builds temporary shards in every encoding of ``--encodings`` (sub-images of
``--subimage-size``, like the extract and shards stages) from a folder of images; ``--shards``
uses an existing shards directory (its own encoding only).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from pipeline.condition import ConditionScale
from pipeline.config import ExtractParams, Params, ShardParams, parse_params
from pipeline.data.backend_choice import choose_backend
from pipeline.data.batch import read_shard_set
from pipeline.data.loader import build_train_loader
from pipeline.data.torch_loader import SampleTable, read_sample_table
from pipeline.degradation import level_grid

log = logging.getLogger("benchmarks.loader")


# ---------------------------------------------------------------------------------------------
# temporary shards from a folder of images


def build_shards(images_dir: Path, out_dir: Path, subimage_size: int, encoding: str) -> int:
    """Sub-images of every image in ``images_dir`` written as shards; returns the count."""
    from pipeline.data.extract import encode_png, subimage_grid, subimage_key
    from pipeline.data.shards import write_shards
    from pipeline.imageio import ImageError, read_rgb8

    extract = ExtractParams(
        crop_size=subimage_size, step=subimage_size // 2, thresh_size=subimage_size // 4
    )
    samples = []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}:
            continue
        try:
            array = read_rgb8(path).array
        except ImageError as err:
            log.warning("skipped %s", err)
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
        for y, x in subimage_grid(array.shape[0], array.shape[1], extract):
            sub = np.ascontiguousarray(array[y : y + subimage_size, x : x + subimage_size])
            data = sub.tobytes() if encoding == "raw" else encode_png(sub, 1)
            samples.append({"key": subimage_key(stem, y, x), "data": data})
    if not samples:
        raise SystemExit(f"{images_dir}: no images of at least {subimage_size} pixels a side")
    write_shards(
        samples,
        lambda s: s["data"],
        out_dir,
        ShardParams(max_count=256),
        crop_size=subimage_size,
        encoding=encoding,
    )
    return len(samples)


# ---------------------------------------------------------------------------------------------
# the BasicSR-style baseline


class BasicSRStyleDataset(torch.utils.data.Dataset):
    """One degraded patch per item, the way BasicSR-style datasets make them (see module doc)."""

    def __init__(self, table: SampleTable, params: Params, seed: int) -> None:
        if table.encoding != "png":
            raise SystemExit("the basicsr-style loader decodes PNG shards")
        self.table = table
        self.crop = params.loader.crop
        deg = params.degradation
        self.blur_grid = level_grid(deg.blur_max, deg.blur_step)
        self.noise_grid = level_grid(deg.noise_max, deg.noise_step)
        self.scale = ConditionScale.from_params(deg)
        self.kernel_size = deg.kernel_size
        self.seed = seed
        self._files: dict[int, int] = {}
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self):
        return self.__dict__ | {"_files": {}, "_rng": None}

    def __getitem__(self, index: int):
        import cv2

        if self._rng is None:
            cv2.setNumThreads(1)
            self._rng = np.random.default_rng([self.seed, torch.initial_seed() % 2**32])
        rng = self._rng
        data = np.frombuffer(self.table.read(index, self._files), np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) / 255.0
        h, w = img.shape[:2]
        top, left = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        img = img[top : top + self.crop, left : left + self.crop]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.5:
            img = img[::-1]
        if rng.random() < 0.5:
            img = img.transpose(1, 0, 2)
        clean = np.ascontiguousarray(img)
        r = float(rng.choice(self.blur_grid))
        sigma = float(rng.choice(self.noise_grid))
        if r > 0:
            k1 = cv2.getGaussianKernel(self.kernel_size, r)
            blurred = cv2.filter2D(clean, -1, k1 @ k1.T, borderType=cv2.BORDER_REPLICATE)
        else:
            blurred = clean
        noisy = blurred + rng.standard_normal(clean.shape, dtype=np.float32) * (sigma / 255.0)
        degraded = np.floor(np.clip(noisy, 0.0, 1.0) * 255.0 + 0.5) / 255.0
        z = self.scale.to_z(r, sigma)[0]
        return (
            torch.from_numpy(degraded.transpose(2, 0, 1).copy()),
            torch.from_numpy(clean.transpose(2, 0, 1).copy()),
            z,
        )


# ---------------------------------------------------------------------------------------------
# measuring


def endless(make_epoch: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make_epoch()


def measure(batches: Iterator, batch_size: int, device: torch.device, seconds: float) -> float:
    """Samples per second drawn from ``batches`` during ``seconds``."""
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        count += 1
    if device.type == "cuda":
        _ = batch[0].sum().item()  # the last copy has landed
        torch.cuda.synchronize(device)
    return count * batch_size / (time.perf_counter() - start)


def open_loader(
    name: str, shards: Path, params: Params, device: torch.device, args: argparse.Namespace
) -> tuple[Iterator, str]:
    """An endless batch iterator for one loader (``dali``, ``torch``, ``basicsr``), and where
    its work runs."""
    if name in ("dali", "torch"):
        p = params.model_copy(update={"loader": params.loader.model_copy(update={"backend": name})})
        loader = build_train_loader(shards, p, seed=args.seed, device=device)
        where = "GPU" if getattr(loader, "on_gpu", False) else "CPU"
        return endless(lambda: iter(loader)), where
    dataset = BasicSRStyleDataset(read_sample_table(read_shard_set(shards)), params, args.seed)
    dl = torch.utils.data.DataLoader(
        dataset,
        batch_size=params.loader.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.threads,
        persistent_workers=True,
        prefetch_factor=2,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
    )

    def epoch():
        for batch in dl:
            yield [t.to(device, non_blocking=True) for t in batch]

    return endless(epoch), "CPU"


def build_parser() -> argparse.ArgumentParser:
    """The command line (also what benchmarks/gpu_check.py builds its arguments with)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", type=Path, help="existing shards directory")
    source.add_argument("--images", type=Path, help="folder of images -> temporary shards")
    parser.add_argument(
        "--subimage-size",
        type=int,
        default=192,
        help="sub-image size for --images (the extract stage uses 192)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="DALI threads = torch/basicsr DataLoader workers"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per loader")
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved timing rounds (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per loader")
    parser.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="gpu: DALI GPU pipeline, all batches delivered to cuda:0",
    )
    parser.add_argument("--loaders", default="dali,torch,basicsr")
    parser.add_argument(
        "--encodings", default="raw,png", help="shard encodings for --images (raw, png)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def loader_params(args: argparse.Namespace) -> Params:
    """The params every loader of a run shares (crop, batch, threads, DALI device)."""
    return parse_params(
        {
            "loader": {
                "crop": args.crop,
                "batch_size": args.batch_size,
                "num_threads": args.threads,
                "device": args.device,
                "shuffle_buffer": 1024,
            }
        }
    )


def time_loaders(
    opened: dict[str, tuple[Iterator, str]], args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm every opened loader up (checking its batches), then time them in interleaved
    rounds; returns each loader's per-round samples/s and their median."""
    for label, (batches, _) in opened.items():  # start-up, first fills; a smoke test too
        for _ in range(args.warmup):
            check_batch(label, next(batches), args)
    # Interleaved rounds: the machine's load drifts, so every loader samples every period.
    rates: dict[str, list[float]] = {label: [] for label in opened}
    for _ in range(args.rounds):
        for label, (batches, _) in opened.items():
            rates[label].append(
                measure(batches, args.batch_size, device, args.seconds / args.rounds)
            )
    return rates, {label: float(np.median(r)) for label, r in rates.items()}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--device gpu needs CUDA; run this on a GPU machine")
    device = torch.device("cuda:0" if args.device == "gpu" else "cpu")
    torch.set_num_threads(1)  # the main process only collects batches; workers do the work
    params = loader_params(args)
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = set(loaders) - {"dali", "torch", "basicsr"}
    if unknown:
        raise SystemExit(f"unknown loaders: {', '.join(sorted(unknown))}")
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    if set(encodings) - {"raw", "png"} or not encodings:
        raise SystemExit(f"--encodings must list raw and/or png (got {args.encodings!r})")

    with tempfile.TemporaryDirectory(prefix="cugan-bench-") as tmp:
        shard_dirs: dict[str, Path] = {}
        if args.images is not None:
            for encoding in sorted(set(encodings) | ({"png"} if "basicsr" in loaders else set())):
                shard_dirs[encoding] = Path(tmp) / f"shards-{encoding}"
                count = build_shards(
                    args.images, shard_dirs[encoding], args.subimage_size, encoding
                )
            print(f"built {count} sub-images of {args.subimage_size}px from {args.images}")
        else:
            shard_dirs[read_shard_set(args.shards).encoding] = args.shards
        runs = [
            (f"{name}/{enc}", name, enc)
            for name in loaders
            for enc in (["png"] if name == "basicsr" else encodings)
            if enc in shard_dirs
        ]
        num = read_shard_set(next(iter(shard_dirs.values()))).num_samples
        print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
        print(
            f"{num} samples, batch {args.batch_size}, crop {args.crop}, {args.threads} "
            f"threads/workers, {os.cpu_count()} CPUs visible, {args.seconds:g} s per loader "
            f"in {args.rounds} interleaved rounds, batches delivered to {device}"
        )
        opened = {
            label: open_loader(name, shard_dirs[enc], params, device, args)
            for label, name, enc in runs
        }
        rates, median = time_loaders(opened, args, device)
        auto = auto_choice(median, params, shard_dirs, device, Path(tmp))

    base = median.get("basicsr/png")
    print(f"\n{'loader':<12} {'runs on':<8} {'samples/s':>10} {'min..max':>15} {'vs basicsr':>11}")
    for label, rate in median.items():
        ratio = f"{rate / base:.2f}x" if base else "-"
        spread = f"{min(rates[label]):.0f}..{max(rates[label]):.0f}"
        print(f"{label:<12} {opened[label][1]:<8} {rate:>10.1f} {spread:>15} {ratio:>11}")
    if auto is not None:
        print(f"\nloader.backend auto here: {auto}")


def check_batch(label: str, batch, args: argparse.Namespace) -> None:
    """The smoke test of each loader: shapes, the 8-bit grid, z in [0, 1]."""
    degraded, clean, z = batch
    shape = (args.batch_size, 3, args.crop, args.crop)
    ok = tuple(degraded.shape) == tuple(clean.shape) == shape and tuple(z.shape) == (
        args.batch_size,
        2,
    )
    ok = ok and bool(torch.allclose(degraded * 255, torch.round(degraded * 255), atol=1e-4))
    ok = ok and bool((z >= 0).all() and (z <= 1).all())
    if not ok:
        raise SystemExit(f"{label}: malformed batch {tuple(degraded.shape)}, {tuple(z.shape)}")


def auto_choice(
    median: dict[str, float],
    params: Params,
    shard_dirs: dict[str, Path],
    device: torch.device,
    cache_dir: Path,
) -> str | None:
    """What ``loader.backend: auto`` picks with these figures as its probe (raw shards first)."""
    for enc in ("raw", "png"):
        if f"dali/{enc}" in median and f"torch/{enc}" in median:
            rates = {"dali": median[f"dali/{enc}"], "torch": median[f"torch/{enc}"]}
            choice = choose_backend(
                params,
                read_shard_set(shard_dirs[enc]),
                device,
                build=lambda name: None,  # never called: the probe below is the measurement
                cache=cache_dir / "loader-backend.json",
                probe=lambda _build, rates=rates: rates,
            )
            return f"{choice.name} ({enc} shards; {choice.reason})"
    return None


if __name__ == "__main__":
    main()
