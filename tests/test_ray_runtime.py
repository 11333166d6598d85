"""pipeline.ray_runtime.ensure_ray never attaches to a cluster nobody configured.

``ray.init()`` without an address reads the ``ray_current_cluster`` file in Ray's temp
directory. Each test gives a subprocess its own temp directory (``RAY_TMPDIR``, so the file a
test plants is seen by nobody else on the machine) holding either a stale file (a killed
``ray start``) or the file of a stranger's cluster that really runs there. In both, first the
trap is shown to be armed -- plain ``ray.init(num_cpus=1)`` fails with "When connecting to an
existing cluster ..." -- then ``ensure_ray(None, num_cpus=1)`` starts a private instance of
its own: one node, one CPU, none of the stranger's resources, and its workers' State API
look-ups pointed at it (``RAY_ADDRESS``), with Ray's repeating cleaner warning filtered.

Subprocesses, because a process holds at most one Ray connection and the first pytest session
shares none (tests/conftest.py's ``ray_session`` belongs to the Ray session of the Makefile).
The stranger cluster is stopped by process group, never with ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: Ports a `ray start --head` binds (each given a free one, as infra/local/cluster.py does).
PORT_FLAGS = (
    "port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "dashboard-port",
)

#: Plain ray.init with num_cpus, as trainer/sweep/conftest did before ensure_ray.
ATTACHING = (
    "import ray\nray.init(num_cpus=1)\nprint('ATTACHED', ray.get_runtime_context().gcs_address)\n"
)

#: ensure_ray, then what the instance is and what its workers see, as JSON on the last line.
PRIVATE = """
import json, logging, os
import ray
from pipeline.ray_runtime import ensure_ray, _REPEATING

assert ensure_ray(None, num_cpus=1) is True

@ray.remote(num_cpus=1)
def worker_view():
    name, prefix = _REPEATING[0]
    record = logging.LogRecord(name, logging.WARNING, "cleaner.py", 0, prefix + ". more", None, None)
    return {
        "ray_address": os.environ.get("RAY_ADDRESS"),
        "drops_repeating_warning": not logging.getLogger(name).filter(record),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }

nodes = [n for n in ray.nodes() if n["Alive"]]
out = {
    "gcs_address": ray.get_runtime_context().gcs_address,
    "nodes": len(nodes),
    "resources": sorted(nodes[0]["Resources"]),
    "cpus": ray.cluster_resources().get("CPU"),
    "worker": ray.get(worker_view.remote()),
}
ray.shutdown()
print(json.dumps(out))
"""


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        {
            "RAY_TMPDIR": str(tmp),  # Ray's temp dir (and its ray_current_cluster) is tmp/ray
            "HOME": str(tmp / "home"),  # no ~/.ray/auth_token of the user's
            "PYTHONPATH": str(REPO),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def _python(code: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def ray_tmp():
    """A short private Ray temp root (unix socket paths must stay under ~107 characters)."""
    tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (tmp / "ray").mkdir()
    (tmp / "home").mkdir()
    try:
        yield tmp
    finally:
        _kill_processes_naming(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_processes_naming(tmp: Path) -> None:
    """SIGKILL any process left whose command line names ``tmp`` (ours only: a fresh dir)."""
    needle = str(tmp)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _assert_private_instance(done: subprocess.CompletedProcess, stranger: str) -> dict:
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["gcs_address"] != stranger
    assert out["nodes"] == 1 and out["cpus"] == 1.0, out
    assert "stranger" not in out["resources"], out
    worker = out["worker"]
    assert worker["ray_address"] == out["gcs_address"], worker  # State API finds this instance
    assert worker["drops_repeating_warning"] is True, worker
    assert worker["auth_mode"] == "disabled", worker  # private loopback instance: no token
    return out


def test_stale_cluster_file_is_ignored(ray_tmp):
    stale = "127.0.0.1:1"  # a killed `ray start` left its address behind
    (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
    env = _env(ray_tmp)

    trap = _python(ATTACHING, env, timeout=120)
    assert trap.returncode != 0 and "ATTACHED" not in trap.stdout
    assert "When connecting to an existing cluster" in trap.stderr, trap.stderr[-2000:]

    out = _assert_private_instance(_python(PRIVATE, env), stale)
    print("private instance despite a stale cluster file:", out["gcs_address"])


def test_running_stranger_cluster_is_not_joined(ray_tmp):
    from infra.local.cluster import free_port

    env = _env(ray_tmp)
    temp_dir = ray_tmp / "ray"
    taken: set[int] = set()
    log = (ray_tmp / "stranger.log").open("wb")
    stranger = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(temp_dir),
            "--num-cpus",
            "1",
            "--num-gpus",
            "0",
            "--resources",
            '{"stranger": 1}',
            "--include-dashboard",
            "false",
            "--object-store-memory",
            str(100 * 1024 * 1024),
            # free ports, not Ray's defaults (6379, 52365, ...): other clusters may run here
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            *(f"--{flag}={free_port(taken)}" for flag in PORT_FLAGS),
        ],
        env={**env, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    address_file = temp_dir / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 180
        while not (address_file.is_file() and address_file.read_text().strip()):
            assert stranger.poll() is None, (ray_tmp / "stranger.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the stranger's `ray start` did not come up"
            time.sleep(0.5)
        address = address_file.read_text().strip()

        trap = _python(ATTACHING, env, timeout=120)
        assert trap.returncode != 0 and "ATTACHED" not in trap.stdout
        assert "When connecting to an existing cluster" in trap.stderr, trap.stderr[-2000:]

        out = _assert_private_instance(_python(PRIVATE, env), address)
        assert stranger.poll() is None  # the stranger's cluster was left alone
        print(f"private instance {out['gcs_address']} next to the stranger's {address}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stranger.pid, signal.SIGTERM)
        try:
            stranger.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stranger.pid, signal.SIGKILL)
            stranger.wait(timeout=30)
        log.close()
