"""A local stand-in for the production stack: two Ray nodes, PostgreSQL, MLflow, Prefect.

``up`` starts, on this machine, as separate process groups:

* a Ray **head** node and a Ray **worker** node: two ``ray start --block`` invocations with
  their own ``--temp-dir`` and ports, each advertising a label resource (``node_head`` /
  ``node_worker``) so a test can tell them apart and prove where work ran;
* **PostgreSQL** (the system's ``postgres``, in a fresh data directory on a free port, run as
  an unprivileged user when we are root: PostgreSQL refuses to run as root);
* an **MLflow** tracking server (``mlflow server --serve-artifacts``) with PostgreSQL as its
  backend store when a PostgreSQL driver for SQLAlchemy (psycopg2 / psycopg / pg8000) is
  importable, else SQLite, saying so; artifacts in a local directory proxied over HTTP;
* a **Prefect** server with its own ``PREFECT_HOME``, PostgreSQL (asyncpg) as its database
  when PostgreSQL is up, else SQLite, and the ``cugan-local`` process work pool of prefect.yaml.

``down`` stops everything ``up`` started, by process group, and removes the directory. The
state lives in ``<dir>/stack.json`` (pids, ports, URLs) and ``<dir>/env.sh`` (the exports a
shell needs: ``RAY_ADDRESS``, ``RAY_AUTH_MODE``, ``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``).

MLflow, Prefect and PostgreSQL listen on 127.0.0.1 only. Ray does not: ``ray start`` turns a
loopback ``--node-ip-address`` into the machine's routable address and binds its ports on all
interfaces (ray._private.services.resolve_ip_for_localhost), so the Ray address printed is
that address. Never stop a local cluster with ``ray stop``: it kills every Ray process of the
machine, including other people's; ``down`` kills only its own process groups.

Why not a network namespace per node: ``unshare -n`` gives a node an empty network with only
its own loopback; joining the nodes needs a veth pair or a bridge with addresses and routes
(CAP_NET_ADMIN, iproute2), which CI runners and unprivileged users do not have, and the MLflow
and Prefect servers on 127.0.0.1 would be unreachable from inside. Distinct temp dirs, ports,
node ids and per-node resources give Ray two real nodes without it.

    python infra/local/cluster.py up [--dir DIR]      # prints the env exports
    python infra/local/cluster.py down [--dir DIR]
    python infra/local/cluster.py status [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

__all__ = ["DEFAULT_DIR", "Stack", "StackError", "free_port", "load", "start", "stop"]

log = logging.getLogger("infra.local")

#: Default state directory of ``up``/``down`` (short: Ray's unix sockets live below it).
DEFAULT_DIR = Path("/tmp/cugan-local")
STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
WORK_POOL = "cugan-local"  # prefect.yaml's work pool
PG_USER = "cugan"  # the database superuser initdb creates (trust auth on 127.0.0.1)
#: Environment of both Ray nodes (and exported to clients by env.sh). Token authentication
#: off, explicitly: left unset, a head started where ~/.ray/auth_token exists turns it on and a
#: worker node (or a driver whose Ray config was read before) without the token is refused; a
#: driver in token mode still connects to a cluster without it. This throwaway stack serves
#: this machine only; a real cluster turns token auth on (docs/runbook.md). No drain on
#: SIGTERM: a throwaway node stops at once instead of waiting up to 30 s.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


class StackError(RuntimeError):
    """A component did not start (one line: which, and the last line of its log)."""


# ---------------------------------------------------------------------------------------------
# state


@dataclass
class Stack:
    """Everything ``up`` started and how to reach it; saved as ``<root>/stack.json``."""

    root: str
    # name -> {"pid", "log"}; each pid leads its own process group (start_new_session)
    procs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ray_address: str | None = None
    # "head" / "worker" -> {"temp_dir", "num_cpus", "resources", "ports"}
    ray_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    postgres: dict[str, Any] | None = None
    mlflow_uri: str | None = None
    mlflow_backend: str | None = None  # "postgresql" | "sqlite"
    prefect_api_url: str | None = None
    prefect_home: str | None = None
    prefect_database: str | None = None  # "postgresql" | "sqlite"
    work_pool: str | None = None
    # component -> why it is not there (only with strict=False); notes: fallbacks taken
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment a client of this stack needs."""
        out = {}
        if self.ray_address:
            out["RAY_ADDRESS"] = self.ray_address
            out["RAY_AUTH_MODE"] = RAY_ENV["RAY_AUTH_MODE"]
        if self.mlflow_uri:
            out["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if self.prefect_api_url:
            out["PREFECT_API_URL"] = self.prefect_api_url
        return out

    def save(self) -> None:
        root = Path(self.root)
        tmp = root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, root / STATE_FILE)
        lines = [f"export {k}={v}" for k, v in self.env().items()]
        tmp = root / f".{ENV_FILE}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, root / ENV_FILE)


def load(root: str | os.PathLike[str]) -> Stack:
    path = Path(root) / STATE_FILE
    try:
        return Stack(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise StackError(f"no local stack in {root} ({STATE_FILE} not found)") from None


# ---------------------------------------------------------------------------------------------
# helpers


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port free on every interface now (Ray binds its ports on all of them)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name}: not found next to {sys.executable} nor on PATH")
    return found


def _tail(path: str | os.PathLike[str]) -> str:
    """The reason in a log: its last exception line (``SomeError: ...``), else its last line."""
    try:
        text = [
            line.strip()
            for line in Path(path).read_text(errors="replace").splitlines()
            if line.strip()
        ]
    except FileNotFoundError:
        return "(no log)"
    for line in reversed(text[-200:]):
        if re.match(r"^[\w.]*(Error|Exception)\b.*:", line):
            return f"{line} (log: {path})"
    return f"{text[-1]} (log: {path})" if text else f"(empty log: {path})"


def _spawn(
    stack: Stack,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new process group, output to ``<root>/logs/<name>.log``."""
    logs = Path(stack.root) / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    stack.procs[name] = {"pid": proc.pid, "log": str(log_path)}
    stack.save()
    log.info("started %s (pid %d): %s", name, proc.pid, log_path)
    return proc


def _wait(name: str, proc: subprocess.Popen, ready: Any, log_path: str, timeout: float) -> None:
    """Poll ``ready()`` until true; StackError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            log.info("%s is ready", name)
            return
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode}: {_tail(log_path)}")
        time.sleep(0.25)
    raise StackError(f"{name} not ready after {timeout:.0f} s: {_tail(log_path)}")


def _http_ok(url: str) -> bool:
    try:
        with urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (URLError, OSError):
        return False


def _log_has(path: str, text: str) -> bool:
    try:
        return text in Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return False


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE"):
        env.pop(key, None)
    return env


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bin() -> Path | None:
    """The newest system PostgreSQL's bin directory ($CUGAN_PG_BIN overrides)."""
    if os.environ.get("CUGAN_PG_BIN"):
        return Path(os.environ["CUGAN_PG_BIN"])
    for candidate in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    ):
        if (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def _pg_run_as() -> tuple[list[str], str, int | None, int | None]:
    """(command prefix, user name, uid, gid) to run PostgreSQL unprivileged.

    As root: ``setpriv`` (util-linux, execs directly: no PAM session, no extra process) to the
    user $CUGAN_PG_RUN_AS, else ``postgres`` (created by the Debian package), else ``nobody``.
    Not root: ourselves.
    """
    if os.geteuid() != 0:
        import getpass

        return [], getpass.getuser(), None, None
    import pwd

    names = (
        [os.environ["CUGAN_PG_RUN_AS"]]
        if os.environ.get("CUGAN_PG_RUN_AS")
        else ["postgres", "nobody"]
    )
    for name in names:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        setpriv = shutil.which("setpriv")
        if setpriv:
            prefix = [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        elif shutil.which("runuser"):
            prefix = [shutil.which("runuser") or "runuser", "-u", name, "--"]
        else:
            raise StackError(
                "PostgreSQL refuses to run as root and neither setpriv nor runuser exists"
            )
        return prefix, name, pw.pw_uid, pw.pw_gid
    raise StackError(
        f"PostgreSQL refuses to run as root and no user of {names} exists "
        "(create one: useradd --system postgres, or set CUGAN_PG_RUN_AS)"
    )


def _start_postgres(stack: Stack, taken: set[int], timeout: float) -> None:
    bin_dir = _pg_bin()
    if bin_dir is None:
        raise StackError("PostgreSQL: no postgres binary (/usr/lib/postgresql/*/bin or PATH)")
    prefix, user, uid, gid = _pg_run_as()
    base = Path(stack.root) / "postgres"
    base.mkdir()
    (base / "sock").mkdir()
    if uid is not None:
        for p in (base, base / "sock"):
            os.chown(p, uid, gid)
    data = base / "data"
    init_log = Path(stack.root) / "logs" / "initdb.log"
    init_log.parent.mkdir(exist_ok=True)
    with init_log.open("wb") as out:
        done = subprocess.run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                PG_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    if done.returncode != 0:
        raise StackError(f"PostgreSQL initdb failed: {_tail(init_log)}")
    port = free_port(taken)
    proc = _spawn(
        stack,
        "postgres",
        [
            *prefix,
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(base / "sock"),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
    )
    log_path = stack.procs["postgres"]["log"]
    _wait(
        "PostgreSQL",
        proc,
        lambda: _log_has(log_path, "ready to accept connections"),
        log_path,
        timeout,
    )
    for db in ("mlflow", "prefect"):
        done = subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, db],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"PostgreSQL createdb {db} failed: {done.stderr.strip()}")
    stack.postgres = {
        "port": port,
        "user": PG_USER,
        "bin": str(bin_dir),
        "data": str(data),
        "run_as": user,
        "databases": ["mlflow", "prefect"],
    }
    stack.save()


def _sqlalchemy_pg_driver() -> str | None:
    """The URI scheme MLflow's (synchronous) SQLAlchemy store can use, if a driver is installed."""
    for module, scheme in (
        ("psycopg2", "postgresql"),
        ("psycopg", "postgresql+psycopg"),
        ("pg8000", "postgresql+pg8000"),
    ):
        if importlib.util.find_spec(module) is not None:
            return scheme
    return None


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_node(stack: Stack, role: str, taken: set[int], num_cpus: int) -> subprocess.Popen:
    temp_dir = Path(stack.root) / f"ray-{role}"
    ports = {
        "node-manager-port": free_port(taken),
        "object-manager-port": free_port(taken),
        "dashboard-agent-listen-port": free_port(taken),
        "dashboard-agent-grpc-port": free_port(taken),
        "metrics-export-port": free_port(taken),
        "runtime-env-agent-port": free_port(taken),
    }
    resources = {f"node_{role}": 1}
    argv = [
        _tool("ray"),
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--resources",
        json.dumps(resources),
        "--object-store-memory",
        str(100 * 1024 * 1024),
        # workers bind OS-chosen ports: no fixed range to collide with another cluster's
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
    ]
    if role == "head":
        ports["port"] = free_port(taken)
        ports["dashboard-port"] = free_port(taken)
        if importlib.util.find_spec("grpc") is not None:  # ray[client] installed: it binds 10001
            ports["ray-client-server-port"] = free_port(taken)
        argv += ["--head", "--include-dashboard", "false"]
    else:
        argv += ["--address", str(stack.ray_address)]
    for flag, port in ports.items():
        argv += [f"--{flag}", str(port)]
    stack.ray_nodes[role] = {
        "temp_dir": str(temp_dir),
        "num_cpus": num_cpus,
        "resources": resources,
        "ports": ports,
    }
    env = _base_env()
    env.update(RAY_ENV)
    # Ray's own processes that look for "the" cluster (e.g. Train's PlacementGroupCleaner) read
    # RAY_ADDRESS first; without it they grep ps and fail when another cluster runs here.
    env["RAY_ADDRESS"] = f"127.0.0.1:{ports['port']}" if role == "head" else str(stack.ray_address)
    return _spawn(stack, f"ray-{role}", argv, env=env)


def _start_ray(
    stack: Stack, taken: set[int], num_cpus: int, timeout: float
) -> tuple[subprocess.Popen, Any]:
    """Start the head; return it and a function that starts the worker once the head is up."""
    head = _ray_node(stack, "head", taken, num_cpus)
    head_log = stack.procs["ray-head"]["log"]
    address_file = Path(stack.ray_nodes["head"]["temp_dir"]) / "ray_current_cluster"

    def then_worker() -> subprocess.Popen:
        _wait(
            "Ray head",
            head,
            lambda: _log_has(head_log, "Ray runtime started") and address_file.is_file(),
            head_log,
            timeout,
        )
        stack.ray_address = address_file.read_text().strip()
        stack.save()
        return _ray_node(stack, "worker", taken, num_cpus)

    return head, then_worker


# ---------------------------------------------------------------------------------------------
# MLflow and Prefect


def _start_mlflow(stack: Stack, taken: set[int]) -> subprocess.Popen:
    base = Path(stack.root) / "mlflow"
    (base / "artifacts").mkdir(parents=True)
    scheme = _sqlalchemy_pg_driver()
    if stack.postgres and scheme:
        backend = f"{scheme}://{PG_USER}@127.0.0.1:{stack.postgres['port']}/mlflow"
        stack.mlflow_backend = "postgresql"
    else:
        backend = f"sqlite:///{base / 'mlflow.db'}"
        stack.mlflow_backend = "sqlite"
        why = (
            "PostgreSQL is not running"
            if not stack.postgres
            else "no PostgreSQL driver for SQLAlchemy in this Python (psycopg2, psycopg or pg8000)"
        )
        note = f"MLflow backend store: SQLite, NOT PostgreSQL ({why})"
        stack.notes.append(note)
        log.warning("%s", note)
    port = free_port(taken)
    stack.mlflow_uri = f"http://127.0.0.1:{port}"
    env = _base_env()
    # MLflow 3's server also starts a job runner with ~7 huey consumer processes (GenAI scorers,
    # periodic tasks); this project uses none of it, and on a small machine it doubles start-up.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return _spawn(
        stack,
        "mlflow",
        [
            _tool("mlflow"),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(base / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
    )


def _start_prefect(stack: Stack, taken: set[int]) -> tuple[subprocess.Popen, dict[str, str]]:
    home = Path(stack.root) / "prefect-home"
    home.mkdir()
    port = free_port(taken)
    env = _base_env()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
        }
    )
    if stack.postgres:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = (
            f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{stack.postgres['port']}/prefect"
        )
        stack.prefect_database = "postgresql"
    else:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        stack.prefect_database = "sqlite"
        stack.notes.append("Prefect database: SQLite, NOT PostgreSQL (PostgreSQL is not running)")
    stack.prefect_home = str(home)
    stack.prefect_api_url = f"http://127.0.0.1:{port}/api"
    proc = _spawn(
        stack,
        "prefect",
        [
            _tool("prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
            "--analytics-off",
        ],
        env=env,
    )
    client_env = _base_env()
    client_env.update({"PREFECT_HOME": str(home), "PREFECT_API_URL": stack.prefect_api_url})
    return proc, client_env


def _create_work_pool(stack: Stack, client_env: dict[str, str], name: str, timeout: float) -> None:
    """``prefect work-pool create <name> --type process`` (the pool prefect.yaml deploys to)."""
    done = subprocess.run(
        [
            _tool("prefect"),
            "--no-prompt",
            "work-pool",
            "create",
            name,
            "--type",
            "process",
            "--overwrite",
        ],
        env=client_env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise StackError(
            f"prefect work-pool create {name} failed: {lines[-1] if lines else done.returncode}"
        )
    stack.work_pool = name
    stack.save()
    log.info("Prefect work pool %s (process) created", name)


# ---------------------------------------------------------------------------------------------
# start / stop


def start(
    root: str | os.PathLike[str] | None = None,
    *,
    num_cpus: int = 1,
    postgres: bool = True,
    mlflow: bool = True,
    prefect: bool = True,
    work_pool: str | None = WORK_POOL,
    strict: bool = True,
    timeout: float = 120.0,
) -> Stack:
    """Start the stack in ``root`` (a new directory under /tmp when None); returns its state.

    ``num_cpus`` per Ray node: with 1, a 2-worker job with 1 CPU each must put one worker on
    each node. With ``strict=False`` a failing PostgreSQL, MLflow or Prefect is recorded in
    ``Stack.errors`` and the rest goes on (Ray failing always raises). On any exception
    everything started so far is stopped before it propagates.
    """
    if root is None:
        root = tempfile.mkdtemp(prefix="cugan-stack-", dir="/tmp")
    else:
        root = Path(root).resolve()
        if (root / STATE_FILE).exists():
            raise StackError(
                f"a stack already runs in {root} (stop it: cluster.py down --dir {root})"
            )
        root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the PostgreSQL user must traverse it
    stack = Stack(root=str(root))
    stack.save()
    taken: set[int] = set()
    try:
        _head, then_worker = _start_ray(stack, taken, num_cpus, timeout)
        if postgres:
            try:
                _start_postgres(stack, taken, timeout)
            except StackError as err:
                if strict:
                    raise
                stack.errors["postgres"] = str(err)
                stack.notes.append(
                    f"PostgreSQL did not start ({err}); MLflow and Prefect use SQLite"
                )
        waits = []
        if mlflow:
            waits.append(
                (
                    "mlflow",
                    _start_mlflow(stack, taken),
                    lambda: _http_ok(f"{stack.mlflow_uri}/health"),
                )
            )
        client_env = None
        if prefect:
            proc, client_env = _start_prefect(stack, taken)
            waits.append(("prefect", proc, lambda: _http_ok(f"{stack.prefect_api_url}/health")))
        worker = then_worker()
        worker_log = stack.procs["ray-worker"]["log"]
        _wait(
            "Ray worker node",
            worker,
            lambda: _log_has(worker_log, "Ray runtime started"),
            worker_log,
            timeout,
        )
        for name, proc, ready in waits:
            try:
                _wait(name, proc, ready, stack.procs[name]["log"], timeout)
            except StackError as err:
                if strict:
                    raise
                stack.errors[name] = str(err)
                _stop_proc(name, stack.procs[name])
                if name == "mlflow":
                    stack.mlflow_uri = None
                else:
                    stack.prefect_api_url = None
        if prefect and work_pool and stack.prefect_api_url:
            try:
                _create_work_pool(stack, client_env or {}, work_pool, timeout)
            except (StackError, subprocess.TimeoutExpired) as err:
                if strict:
                    raise StackError(str(err)) from None
                stack.errors["work_pool"] = str(err)
        stack.save()
    except BaseException:
        stop(stack.root, keep=True)  # logs kept in root for a post-mortem
        raise
    return stack


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect our own exited child (a zombie keeps its process group alive to killpg)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _first_signal(name: str) -> signal.Signals:
    # PostgreSQL: SIGINT is its "fast" shutdown; others: SIGTERM (Ray's --block stops its node)
    return signal.SIGINT if name == "postgres" else signal.SIGTERM


def _signal_group(name: str, info: dict[str, Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(info["pid"]), _first_signal(name))


def _stop_proc(name: str, info: dict[str, Any], grace: float = 15.0) -> None:
    """Signal the group (again: harmless), wait ``grace`` s for it to go, then SIGKILL it."""
    pgid = int(info["pid"])
    if not _group_alive(pgid):
        return
    first = _first_signal(name)
    _signal_group(name, info)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    log.warning(
        "%s (process group %d) ignored %s for %.0f s: killing it", name, pgid, first.name, grace
    )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for _ in range(50):
        _reap(pgid)
        if not _group_alive(pgid):
            return
        time.sleep(0.1)


def _strays(root: str) -> list[int]:
    """Pids of Ray processes of this stack that left its process groups, if any: their command
    line names one of the stack's Ray temp dirs (``<root>/ray-head/``, ``<root>/ray-worker/``).
    Nothing else is matched (not, say, a ``tail -f`` of the stack's logs)."""
    needles = [f"{root}/ray-{role}/" for role in ("head", "worker")] + [
        f"{root}/ray-{role} " for role in ("head", "worker")
    ]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmdline + " " for n in needles):
            found.append(int(entry.name))
    return found


def stop(root: str | os.PathLike[str], *, keep: bool = False) -> None:
    """Stop every process group of the stack in ``root`` (reverse start order); remove ``root``
    unless ``keep``. Safe to call twice, and on a half-started stack."""
    root = str(Path(root).resolve())
    try:
        stack = load(root)
    except StackError:
        return
    # servers and Ray nodes together, then the database they use
    clients = [n for n in stack.procs if n != "postgres"]
    for name in clients:
        _signal_group(name, stack.procs[name])
    for name in clients:
        _stop_proc(name, stack.procs[name])
    if "postgres" in stack.procs:
        _stop_proc("postgres", stack.procs["postgres"])
    for pid in _strays(root):  # e.g. a Ray worker that started its own session
        log.warning("stopping stray process %d that names %s", pid, root)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if keep:  # the logs stay for a post-mortem; the state goes (nothing runs any more)
        for name in (STATE_FILE, ENV_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(Path(root) / name)
    else:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# CLI


def _summary(stack: Stack) -> str:
    lines = [f"local stack in {stack.root}"]
    for role, node in stack.ray_nodes.items():
        lines.append(
            f"  ray {role}: {node['num_cpus']} CPU, resources {node['resources']}, "
            f"temp dir {node['temp_dir']}"
        )
    lines.append(f"  ray address: {stack.ray_address}")
    if stack.postgres:
        lines.append(
            f"  postgresql: 127.0.0.1:{stack.postgres['port']} (run as {stack.postgres['run_as']})"
        )
    if stack.mlflow_uri:
        lines.append(f"  mlflow: {stack.mlflow_uri} (backend store: {stack.mlflow_backend})")
    if stack.prefect_api_url:
        lines.append(
            f"  prefect: {stack.prefect_api_url} (database: {stack.prefect_database}, "
            f"work pool: {stack.work_pool})"
        )
    lines += [f"  NOTE: {n}" for n in stack.notes]
    lines += [f"  ERROR {k}: {v}" for k, v in stack.errors.items()]
    lines.append(f"  logs: {stack.root}/logs/;  env: source {stack.root}/{ENV_FILE}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Local two-node Ray + PostgreSQL + MLflow + Prefect stack."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack; print how to reach it")
    up.add_argument("--dir", default=str(DEFAULT_DIR))
    up.add_argument("--num-cpus", type=int, default=1, help="CPUs advertised by each Ray node")
    up.add_argument("--no-postgres", action="store_true", help="MLflow and Prefect on SQLite")
    up.add_argument("--no-mlflow", action="store_true")
    up.add_argument("--no-prefect", action="store_true")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds each component may take")
    for name in ("down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        if args.command == "up":
            stack = start(
                args.dir,
                num_cpus=args.num_cpus,
                postgres=not args.no_postgres,
                mlflow=not args.no_mlflow,
                prefect=not args.no_prefect,
                timeout=args.timeout,
            )
            print(_summary(stack))
            for key, value in stack.env().items():
                print(f"export {key}={value}")
        elif args.command == "down":
            stop(args.dir)
            print(f"stopped the local stack in {args.dir}")
        else:
            stack = load(args.dir)
            print(_summary(stack))
            for name, info in stack.procs.items():
                state = "running" if _group_alive(int(info["pid"])) else "gone"
                print(f"  {name}: pid {info['pid']} {state}")
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
