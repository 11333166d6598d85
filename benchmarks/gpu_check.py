"""The GPU check: the project's CUDA paths, exercised once on one GPU in under 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py --json bench-results/gpu-check.json
    .venv/bin/python benchmarks/gpu_check.py --dry-run --json /tmp/gpu-check.json   # CPU

Six parts (benchmarks/gpu_check_parts/, one module each), each in its own process under a
time limit (printed in the plan at the start; ``--timeout PART=SECONDS`` changes one; a part
that overruns is stopped and recorded as failed with what it measured so far, so the whole
check stays inside ``--budget``), all on the SAME shards, built first from ``--images``
(default: CBSD68 in ../shared when present, else deterministic photo-like images) in both
encodings (raw pixels and PNG):

``loader_parity``  DALI on the GPU (``device_id=0``: mixed decoder, GPU blur, noise,
                   quantisation) against the CPU loaders' torch reference, exactly, and the
                   noise statistics of both;
``loader_speed``   DALI GPU patches/s against the CPU loaders (benchmarks/loader.py);
``train_loop``     the training loop against its compute-only ceiling for the authors'
                   generator at batch 16, crop 64 on CUDA (benchmarks/train.py);
``ray_resume``     one Ray Train worker with NCCL, a checkpoint, an injected failure, the resume;
``sync_bn``        D's SyncBatchNorm under 2-process DDP (NCCL): only with 2 or more GPUs,
                   otherwise skipped with that reason;
``inference``      the inference paths on CUDA (eager, channels_last, bf16, bf16_channels_last,
                   onnx, compile, and fp16 autocast) with max |diff| against eager fp32 and the
                   chooser's pick (benchmarks/inference.py).

Every check is ``pass``, ``fail`` or ``skip``, with a reason; a part fails if one of its checks
fails, it raises or it overruns. The exit code is 1 if anything failed, else 0 (skips are not
failures, and not passes either). ``--dry-run`` runs the same code at tiny sizes on the CPU
(``CUDA_VISIBLE_DEVICES`` emptied: DALI's CPU pipeline, gloo instead of NCCL, small networks);
the CUDA-only checks are then skipped, saying what the CPU stood in with.
tests/test_gpu_check.py runs it. Without CUDA and without ``--dry-run`` the script stops with
one line. ``--parts a,b`` runs a subset. docs/runbook.md ("GPU check") says what to do with a
failure.

The report (``--json FILE``, rewritten atomically after every part; ``complete`` turns true
at the end) and a readable summary on stdout::

    {
      "schema": "cugan-gpu-check/2", "complete": bool, "ok": bool (no part failed),
      "dry_run": bool, "command": str, "started": ISO time, "wall_s": float, "budget_s": float,
      "environment": ENV, "plan": [{"part", "limit_s", "what"}],
      "counts": {"pass": n, "fail": n, "skip": n},     # over every check of every part
      "data": {"status", "reason", "seconds", "images", "subimage_size", "samples", "shards"},
      "parts": {NAME: {
          "status": "pass" | "fail" | "skip", "reason": one line,
          "seconds", "limit_s", "timed_out": bool, "environment": ENV (the part's process),
          "figures": {...},                            # the part's numbers (its module's doc)
          "checks": [{"name", "status", "value", "limit", "reason"}]
      }}
    }
    ENV = {"device", "cuda_available", "gpus", "cuda_runtime", "cudnn", "driver", "torch",
           "dali", "ray", "onnxruntime", "python", "cpus"}

How long: the plan's limits add up to about 7 minutes on one GPU (``--budget`` 470 s by
default, start-up and shard building included); the dry run takes 3-4 minutes on a busy 2-core
CPU (Ray's start and restart are most of it). Numbers from a dry run mean nothing; compare GPU
figures only within one report.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_check_parts.common import (
    DRY_SIZES,
    FAIL,
    GPU_SIZES,
    PASS,
    SKIP,
    CheckConfig,
    PartRun,
    argv,
    build_data,
    driver_version,
    environment,
)
from pipeline.atomic import atomic_write_json
from pipeline.errors import one_line

log = logging.getLogger("benchmarks.gpu_check")

SCHEMA = "cugan-gpu-check/2"
CBSD68 = REPO.parent / "shared" / "datasets" / "CBSD68"


@dataclass(frozen=True)
class Part:
    name: str
    entry: str  # "module:function" under benchmarks.gpu_check_parts
    what: str
    limit_s: float  # on a GPU
    dry_limit_s: float  # in a dry run (a shared 2-core CPU: generous; the budget is the GPU's)
    needs_shards: bool = True
    min_gpus: int = 1  # fewer CUDA devices (not in a dry run): the part is skipped


PARTS = (
    Part("loader_parity", "parity:run", "DALI GPU pipeline vs the torch reference", 50, 120),
    Part("loader_speed", "throughput:loader_speed", "DALI GPU patches/s vs CPU loaders", 60, 120),
    Part("train_loop", "throughput:train_loop", "loop vs compute ceiling (authors G)", 75, 150),
    Part(
        "ray_resume", "ray_resume:run", "1 Ray worker, NCCL, checkpoint, failure, resume", 120, 240
    ),
    Part("sync_bn", "sync_bn:run", "D's SyncBatchNorm, 2-process DDP", 45, 120, False, 2),
    Part(
        "inference", "inference:run", "inference paths on CUDA, the chooser's pick", 120, 150, False
    ),
)
PART_NAMES = tuple(p.name for p in PARTS)
#: Seconds kept back from the budget for the start-up, the data and stopping a part.
RESERVE_S = 15.0
MIN_PART_S = 10.0
DEFAULT_BUDGET_S = {False: 470.0, True: 900.0}  # GPU run, dry run


def run_part_process(name: str, config_file: Path, result_file: Path) -> int:
    """Entry of a part's own process (``--run-part``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    part = next(p for p in PARTS if p.name == name)
    module, function = part.entry.split(":")
    entry = getattr(importlib.import_module(f"benchmarks.gpu_check_parts.{module}"), function)
    config = CheckConfig.from_json(json.loads(config_file.read_text()))
    run = PartRun(name, config, result_file)
    run.save()
    error: BaseException | None = None
    try:
        entry(run)
    except Exception as err:  # recorded as the part's one-line reason; the traceback is logged
        log.exception("part %s failed", name)
        error = err
    run.finish(error)
    return 0


def _child_env(dry_run: bool, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # this checkout's code in the parts and in the Ray workers they start
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["CUGAN_CACHE_DIR"] = str(work / "cache")  # fresh probes: measured now, on this machine
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # scratch stores, a private Ray
        env.pop(key, None)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, even on a machine with a GPU
    return env


def _stream(pipe: Any, tail: collections.deque, prefix: str, echo: bool) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        tail.append(line)
        if echo:
            sys.stderr.write(f"{prefix}{line}\n")
            sys.stderr.flush()


def _stop(proc: subprocess.Popen) -> None:
    """Stop a part's process group (it runs in its own session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(
    part: Part, limit: float, config_file: Path, work: Path, env: dict, echo: bool
) -> dict[str, Any]:
    """Run one part in its own process under ``limit`` seconds; its result record."""
    result_file = work / f"{part.name}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", part.name]
    cmd += argv(config=config_file, result=result_file)
    tail: collections.deque = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    reader = threading.Thread(
        target=_stream, args=(proc.stdout, tail, f"  [{part.name}] ", echo), daemon=True
    )
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    record: dict[str, Any] = {"status": FAIL, "reason": "", "figures": {}, "checks": []}
    with contextlib.suppress(OSError, ValueError):
        record.update(json.loads(result_file.read_text()))
    finished = record.get("status") in (PASS, FAIL, SKIP)
    if timed_out and not finished:
        record["status"] = FAIL
        record["reason"] = (
            f"stopped at its time limit of {limit:.0f} s (figures so far kept); last output: "
            f"{_last_line(tail)}"
        )
    elif not finished:
        record["status"] = FAIL
        record["reason"] = (
            f"its process exited with code {proc.returncode} without a result; last output: "
            f"{_last_line(tail)}"
        )
    record.update(seconds=round(seconds, 2), limit_s=limit, timed_out=timed_out)
    return record


def _last_line(tail: collections.deque) -> str:
    lines = [line for line in tail if line.strip()]
    return one_line(lines[-1]) if lines else "(none)"


def _skipped(reason: str, limit: float | None = None) -> dict[str, Any]:
    return {
        "status": SKIP,
        "reason": reason,
        "seconds": 0.0,
        "limit_s": limit,
        "timed_out": False,
        "figures": {},
        "checks": [],
    }


def _timeouts(values: list[str]) -> dict[str, float]:
    """``--timeout PART=SECONDS`` options as a dict (one line on a malformed one)."""
    out: dict[str, float] = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in PART_NAMES:
            raise ValueError(f"--timeout {value}: unknown part {name!r} ({', '.join(PART_NAMES)})")
        try:
            out[name] = float(seconds)
        except ValueError:
            raise ValueError(f"--timeout {value}: SECONDS must be a number") from None
        if out[name] <= 0:
            raise ValueError(f"--timeout {value}: SECONDS must be positive")
    return out


def parse_args(args_in: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="also write the JSON report here (atomically)")
    parser.add_argument(
        "--dry-run", action="store_true", help="the same code on the CPU at tiny sizes"
    )
    parser.add_argument(
        "--parts", default=",".join(PART_NAMES), help=f"comma-separated subset of {PART_NAMES}"
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="source images (default: CBSD68, else synthetic)"
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--budget", type=float, default=None, help="total seconds (default 470; dry run 900)"
    )
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="one part's time limit (repeatable; default: the plan's)",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the work files here")
    parser.add_argument("--quiet", action="store_true", help="do not echo the parts' output")
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(args_in)
    if args.run_part:
        if args.run_part not in PART_NAMES or not args.config or not args.result:
            parser.error("--run-part NAME needs --config and --result")
        return args
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PART_NAMES))
    if unknown or not wanted:
        parser.error(f"--parts: unknown {unknown} (choose from {', '.join(PART_NAMES)})")
    args.parts = [p for p in PART_NAMES if p in wanted]
    try:
        args.timeout = _timeouts(args.timeout)
    except ValueError as err:
        parser.error(str(err))
    return args


def counts(report: dict[str, Any]) -> dict[str, int]:
    """Checks by status over every part (a part skipped as a whole counts as one skip)."""
    out = {PASS: 0, FAIL: 0, SKIP: 0}
    for record in report["parts"].values():
        checks = record.get("checks") or [{"status": record["status"]}]
        for c in checks:
            out[c["status"]] += 1
        if record["status"] == FAIL and not any(c["status"] == FAIL for c in checks):
            out[FAIL] += 1  # raised or overran: the failure is the part's, not a check's
    return out


def summary(report: dict[str, Any]) -> str:
    """The readable summary: one line per part, then every failed and skipped check."""
    c = report["counts"]
    lines = [
        f"GPU check{' (dry run: CPU, tiny sizes)' if report['dry_run'] else ''} on "
        f"{report['environment']['device']}: {c[PASS]} passed, {c[FAIL]} failed, "
        f"{c[SKIP]} skipped; {report['wall_s']:.0f} s of {report['budget_s']:.0f} s",
        f"{'part':<14} {'status':<6} {'seconds':>8}  reason",
    ]
    for name, r in report["parts"].items():
        lines.append(f"{name:<14} {r['status']:<6} {r['seconds']:>8.1f}  {r['reason']}")
    for status in (FAIL, SKIP):
        rows = [
            f"  {name}.{ch['name']}: {ch['reason']}"
            for name, r in report["parts"].items()
            for ch in r.get("checks", [])
            if ch["status"] == status
        ]
        if rows:
            lines += [f"{'failed' if status == FAIL else 'skipped'} checks:", *rows]
    lines.append("all ok" if report["ok"] else "FAILED (docs/runbook.md, GPU check)")
    return "\n".join(lines)


def main(args_in: list[str] | None = None) -> int:
    args = parse_args(args_in)
    if args.run_part:
        return run_part_process(args.run_part, args.config, args.result)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}): run it on a GPU machine, or pass --dry-run "
            "for the CPU rehearsal"
        )
    cuda = not args.dry_run
    gpus = torch.cuda.device_count() if cuda else 0
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    budget = args.budget or DEFAULT_BUDGET_S[args.dry_run]
    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    work = (args.work or Path(tempfile.mkdtemp(prefix="cugan-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    selected = [p for p in PARTS if p.name in args.parts]
    plan = [
        {
            "part": p.name,
            "limit_s": args.timeout.get(p.name, p.dry_limit_s if args.dry_run else p.limit_s),
            "what": p.what,
        }
        for p in selected
    ]
    driver = driver_version() if cuda else None
    env_info = environment(driver)
    if args.dry_run:  # what the parts see: no CUDA device (CUDA_VISIBLE_DEVICES emptied)
        from pipeline.inference import cpu_features

        env_info.update(cuda_available=False, gpus=0, device=f"cpu: {cpu_features()['model']}")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "ok": False,
        "dry_run": args.dry_run,
        "command": " ".join(
            shlex.quote(a) for a in ["benchmarks/gpu_check.py", *(args_in or sys.argv[1:])]
        ),
        "started": started,
        "wall_s": None,
        "budget_s": budget,
        "environment": env_info,
        "plan": plan,
        "counts": {PASS: 0, FAIL: 0, SKIP: 0},
        "data": {},
        "parts": {},
    }

    def write() -> None:
        report["wall_s"] = round(time.perf_counter() - t_start, 2)
        report["counts"] = counts(report)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.json, report)

    print(
        f"gpu_check{' --dry-run (CPU, tiny sizes)' if args.dry_run else ''}: "
        f"{env_info['device']}; CUDA {env_info['cuda_runtime']}, driver {env_info['driver']}, "
        f"torch {env_info['torch']}, DALI {env_info['dali']}; budget {budget:.0f} s"
    )
    print("plan:")
    for row in plan:
        print(f"  {row['part']:<14} limit {row['limit_s']:>4.0f} s  {row['what']}")
    sys.stdout.flush()
    write()

    try:
        images = args.images
        if images is None and not args.dry_run and CBSD68.is_dir():
            images = CBSD68
        if any(p.needs_shards for p in selected):
            t0 = time.perf_counter()
            try:
                report["data"] = {"status": PASS, "reason": ""} | build_data(images, work, sizes)
            except (OSError, ValueError) as err:
                report["data"] = {"status": FAIL, "reason": one_line(err), "shards": {}}
            report["data"]["seconds"] = round(time.perf_counter() - t0, 2)
            print(
                f"data: {report['data'].get('images')} -> {report['data'].get('samples')} "
                f"sub-images, raw and PNG shards ({report['data']['seconds']:.1f} s)"
            )
            write()
        config = CheckConfig(
            dry_run=args.dry_run,
            cuda=cuda,
            gpus=gpus,
            work=str(work),
            params=str(args.params.resolve()),
            shards=report["data"].get("shards", {}),
            sizes=sizes,
            driver=driver,
        )
        config_file = work / "config.json"
        atomic_write_json(config_file, config.to_json())
        env = _child_env(args.dry_run, work)
        for part, row in zip(selected, plan, strict=True):
            left = budget - (time.perf_counter() - t_start) - RESERVE_S
            limit = min(row["limit_s"], left)
            if cuda and gpus < part.min_gpus:
                record = _skipped(
                    f"needs {part.min_gpus} CUDA devices; this machine has {gpus}", row["limit_s"]
                )
            elif part.needs_shards and report["data"].get("status") != PASS:
                record = _skipped(f"no shards: {report['data'].get('reason')}", row["limit_s"])
                record["status"] = FAIL  # the data failed: nothing here was checked
            elif limit < MIN_PART_S:
                record = _skipped(f"budget exhausted ({max(left, 0):.0f} s left)", row["limit_s"])
                record["status"] = FAIL  # a check that did not run is not a pass
            else:
                print(f"{part.name}: running (limit {limit:.0f} s)")
                sys.stdout.flush()
                record = run_part(part, limit, config_file, work, env, echo=not args.quiet)
            report["parts"][part.name] = record
            print(
                f"{part.name}: {record['status']} in {record['seconds']:.1f} s -- {record['reason']}"
            )
            sys.stdout.flush()
            write()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["ok"] = all(r["status"] != FAIL for r in report["parts"].values())
    report["complete"] = True
    write()
    print("\n" + summary(report))
    if args.json:
        print(f"report: {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
