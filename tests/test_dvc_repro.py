"""`dvc repro` of the data stages in a scratch project with the tiny profile, twice.

The scratch project holds copies of dvc.yaml, pipeline/ and stages/, and
tests/profiles/tiny.yaml as its params.yaml. Only the data stages are targeted, so stages that
later issues append to dvc.yaml do not run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
TARGETS = ["prepare", "extract", "shards", "evalsets"]

pytestmark = pytest.mark.slow


def make_project(root: Path, profile: Path = REPO / "tests" / "profiles" / "tiny.yaml") -> Path:
    """A scratch DVC project (no git) running this checkout's stages with ``profile``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("pipeline", "stages", "models"):
        if (REPO / sub).is_dir():
            shutil.copytree(REPO / sub, root / sub, ignore=ignore)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(profile, root / "params.yaml")
    run(root, "init", "--no-scm")
    run(root, "config", "core.analytics", "false")
    return root


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(root),
    }
    proc = subprocess.run(
        [str(DVC), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")
def test_dvc_repro_tiny_profile_then_nothing_to_do(tmp_path):
    proj = make_project(tmp_path / "proj")
    first = run(proj, "repro", *TARGETS)
    for stage in TARGETS:
        assert f"Running stage '{stage}'" in first.stdout

    shards = json.loads((proj / "data/shards/shards.json").read_text())
    assert shards["num_samples"] > 0 and len(shards["shards"]) >= 2  # max_count 8 in tiny
    for entry in shards["shards"]:
        assert (proj / "data/shards" / entry["tar"]).stat().st_size > 0
        idx = (proj / "data/shards" / entry["index"]).read_text()
        assert idx.startswith(f"v1.2 {entry['count']}\n")
    manifest = json.loads((proj / "data/evalsets/holdout/manifest.json").read_text())
    assert len(manifest["images"]) == 2 and len(manifest["files"]) == 4
    for f in manifest["files"]:
        assert (proj / "data/evalsets/holdout" / f["path"]).is_file()
    report = json.loads((proj / "data/reports/prepare.json").read_text())
    assert report["summary"] == "prepare: 4 ok, 1 converted, 0 skipped"
    assert (proj / "dvc.lock").is_file()

    second = run(proj, "repro", *TARGETS)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout
