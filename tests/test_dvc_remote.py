"""The data stages' outputs travel between "nodes" through a DVC remote, as docs/runbook.md says.

Node A, a git checkout of the project (copies of dvc.yaml, pipeline/, stages/, models/, and
tests/profiles/tiny.yaml as params.yaml), runs ``dvc repro shards evalsets``, names a
local-directory remote as its default (``dvc remote add -d``, committed: the S3 remote of
infra/dvc works the same way), commits and pushes. Then, in fresh clones with empty caches:

* node B (a machine that prepares or checks data) pulls the stages with their upstream
  outputs and finds ``dvc status`` clean there: nothing to reproduce, cache and remote in sync;
* node C (a training worker) pulls only ``data/shards`` and ``data/evalsets``, the runbook's
  worker command, and gets them byte for byte.

Only the data stages are targeted, so the training and evaluation stages of dvc.yaml (never run
here) do not count as "changed".
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
TARGETS = ["shards", "evalsets"]
WORKER_PATHS = ["data/shards", "data/evalsets"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed"),
]


def _env(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(root),  # the stages run this checkout's copy of the code
        "GIT_AUTHOR_NAME": "cugan-test",
        "GIT_AUTHOR_EMAIL": "cugan-test@example.invalid",
        "GIT_COMMITTER_NAME": "cugan-test",
        "GIT_COMMITTER_EMAIL": "cugan-test@example.invalid",
    }
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    return env


def _run(root: Path, *argv: str) -> str:
    done = subprocess.run(
        list(argv),
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(argv)} in {root} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(root: Path, *args: str) -> str:
    return _run(root, str(DVC), *args)


def git(root: Path, *args: str) -> str:
    return _run(root, "git", *args)


def _digests(root: Path, rel: str) -> dict[str, str]:
    base = root / rel
    assert base.is_dir(), base
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


def _node_a(root: Path, remote: Path) -> Path:
    """The checkout that produced the data and pushed it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("pipeline", "stages", "models"):
        shutil.copytree(REPO / sub, root / sub, ignore=ignore)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copy(REPO / "tests" / "profiles" / "tiny.yaml", root / "params.yaml")
    git(root, "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    out = dvc(root, "repro", *TARGETS)
    assert "Running stage 'shards'" in out and "Running stage 'evalsets'" in out
    dvc(root, "remote", "add", "-d", "store", str(remote))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny data, default remote")
    out = dvc(root, "push")
    assert "pushed" in out, out
    return root


def test_outputs_round_trip_through_a_dvc_remote(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    node_a = _node_a(tmp_path / "node-a", remote)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"
    produced = {rel: _digests(node_a, rel) for rel in WORKER_PATHS}
    assert produced["data/shards"] and produced["data/evalsets"]

    # node B: a fresh clone pulls the data stages with their inputs; nothing left to do there
    node_b = tmp_path / "node-b"
    git(tmp_path, "clone", "-q", str(node_a), str(node_b))
    # git carries no data, only dvc.lock's hashes and the stages' reports (cache: false metrics)
    assert sorted(p.name for p in (node_b / "data").iterdir()) == ["reports"]
    assert not (node_b / ".dvc" / "cache").exists()  # and no cache: everything comes remote
    dvc(node_b, "pull", "--with-deps", *TARGETS)
    status = dvc(node_b, "status", "--with-deps", *TARGETS)
    assert "Data and pipelines are up to date." in status, status
    in_sync = dvc(node_b, "status", "--cloud", "--with-deps", *TARGETS)
    assert "Cache and remote 'store' are in sync." in in_sync, in_sync
    again = dvc(node_b, "repro", *TARGETS)
    assert "Running stage" not in again and "Data and pipelines are up to date." in again, again
    for rel in WORKER_PATHS:
        assert _digests(node_b, rel) == produced[rel], rel

    # node C: a training worker pulls only the shards and evaluation sets, as the runbook does
    node_c = tmp_path / "node-c"
    git(tmp_path, "clone", "-q", str(node_a), str(node_c))
    dvc(node_c, "pull", *WORKER_PATHS)
    for rel in WORKER_PATHS:
        assert _digests(node_c, rel) == produced[rel], rel
    assert not (node_c / "data" / "subimages").exists()  # nothing it does not need
    print(
        f"round trip: {sum(len(v) for v in produced.values())} files in {WORKER_PATHS} "
        f"identical on two fresh clones; node B: {status.strip()!r}"
    )
