"""benchmarks/gpu_check.py's dry run on the CPU: the script that checks the GPU path is not
rotten where there is no GPU.

The dry run runs every part's code at tiny sizes in its own process (DALI's CPU pipeline,
gloo, small networks). These tests assert the report's structure, that every part passed
what the CPU can decide, and that each CUDA-only check is reported as *skipped*, with a
reason, never as passed. The parts that start Ray or train (``train_loop``, ``ray_resume``)
and the 2-process ``sync_bn`` take minutes on a busy 2-core CPU: they are one ``slow`` test.
Both run the script as a subprocess (its parts start their own processes, a private Ray
instance among them, so nothing is shared with this pytest process or an in-process Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

PART_KEYS = {"status", "reason", "seconds", "limit_s", "timed_out", "environment", "figures"}
CHECK_KEYS = {"name", "status", "value", "limit", "reason"}
#: The checks only a CUDA run decides, per part (the dry run must skip each, saying why).
CUDA_ONLY = {
    "loader_parity": {"device_id"},
    "loader_speed": {"loaders.dali/raw.runs_on", "loaders.dali/png.runs_on"},
    "inference": {"paths.compile.ran", "paths.fp16.ran"},
    "train_loop": {"device"},
    "ray_resume": {"backend", "loader.pipeline"},
    "sync_bn": {"nccl_sync_batch_norm"},
}


def _dry_run(tmp_path: Path, parts: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--parts", parts, "--json", str(out), "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def _assert_report(proc: subprocess.CompletedProcess, report: dict, parts: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["schema"] == "cugan-gpu-check/2"
    assert report["complete"] is True and report["ok"] is True and report["dry_run"] is True
    assert report["environment"]["cuda_available"] is False
    assert [row["part"] for row in report["plan"]] == parts
    assert list(report["parts"]) == parts
    assert report["data"]["status"] == "pass" and set(report["data"]["shards"]) == {"raw", "png"}
    total = {"pass": 0, "fail": 0, "skip": 0}
    for name in parts:
        record = report["parts"][name]
        assert set(record) >= PART_KEYS, name
        assert record["status"] == "pass", (name, record["reason"])
        assert record["timed_out"] is False and record["figures"], name
        assert record["environment"]["cuda_available"] is False, name  # CUDA hidden in parts
        by_name = {c["name"]: c for c in record["checks"]}
        for check in record["checks"]:
            assert set(check) >= CHECK_KEYS, (name, check)
            assert check["status"] in ("pass", "skip"), (name, check)
            assert check["reason"], (name, check)
            total[check["status"]] += 1
        for cuda_only in CUDA_ONLY[name]:
            check = by_name[cuda_only]
            assert check["status"] == "skip", (name, check)
            assert "CUDA" in check["reason"], (name, check)
        assert any(c["status"] == "pass" for c in record["checks"]), name
    assert report["counts"] == total
    # the readable summary names every skipped check with its reason
    assert "0 failed" in proc.stdout and "skipped checks:" in proc.stdout
    for name in parts:
        for cuda_only in CUDA_ONLY[name]:
            assert f"{name}.{cuda_only}: CUDA only" in proc.stdout


def test_dry_run_loader_and_inference_parts(tmp_path):
    parts = ["loader_parity", "loader_speed", "inference"]
    proc, report = _dry_run(tmp_path, ",".join(parts))
    _assert_report(proc, report, parts)
    parity = report["parts"]["loader_parity"]["figures"]
    assert parity["device_id"] is None  # the CPU pipeline stood in
    # the training graph on both encodings, under both level mixtures
    assert {"raw/uniform", "raw/authors"} <= set(parity["pipelines"]) and len(
        parity["pipelines"]
    ) == 3
    inference = report["parts"]["inference"]["figures"]
    assert inference["paths"]["eager"]["max_abs_diff"] == 0
    assert "compile" not in inference["paths"] and "fp16" not in inference["paths"]


@pytest.mark.slow
def test_dry_run_training_ray_and_sync_bn_parts(tmp_path):
    parts = ["train_loop", "ray_resume", "sync_bn"]
    proc, report = _dry_run(tmp_path, ",".join(parts))
    _assert_report(proc, report, parts)
    ray = report["parts"]["ray_resume"]["figures"]
    assert ray["backend"] == "gloo" and ray["first_resumed_iteration"] == 4
    sync = report["parts"]["sync_bn"]["figures"]
    assert sync["backend"] == "gloo" and sync["layers"] == ["CrossRankBatchNorm2d"]


def test_without_cuda_and_without_dry_run_it_stops_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "r.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert "no CUDA device here" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_bad_timeout_option_is_one_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--timeout", "nosuch=5"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown part 'nosuch'" in proc.stderr
