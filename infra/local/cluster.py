"""A local stand-in for the production stack: two Ray nodes, PostgreSQL, MLflow, Prefect.

``up`` starts, on this machine, as separate process groups:

* a Ray **head** node and a Ray **worker** node: two ``ray start --block`` invocations with
  their own ``--temp-dir`` and ports, each advertising a label resource (``node_head`` /
  ``node_worker``) so a test can tell them apart and prove where work ran. Token
  authentication is ON, deliberately: ``up`` generates a fresh token for this stack
  (``<dir>/ray-auth-token``, mode 0600) and hands it to every process of the cluster with
  ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (both nodes; drivers get the same two
  exports from ``env.sh``). A driver without the token is refused;
* **PostgreSQL** (the system's ``postgres``, in a fresh data directory on a free port, run as
  an unprivileged user when we are root: PostgreSQL refuses to run as root), with one database
  for MLflow and one for Prefect. It is not optional: there is no SQLite fallback. If it, or a
  driver, is missing, ``up`` fails with one line saying what (``infra/local/system-deps.sh``
  installs the packages);
* an **MLflow** tracking server (``mlflow server --serve-artifacts``) whose backend store is
  ``postgresql+psycopg2://`` (the driver named explicitly: SQLAlchemy 2.1 maps a bare
  ``postgresql://`` to psycopg 3, which MLflow 3.17's store does not fully support:
  docs/runbook.md), artifacts in a local directory proxied over HTTP;
* a **Prefect** server with its own ``PREFECT_HOME`` on ``postgresql+asyncpg://`` (the only
  PostgreSQL driver Prefect's server accepts), and the ``cugan-local`` process work pool of
  prefect.yaml.

``down`` stops everything ``up`` started, by process group, and removes the directory. The
state lives in ``<dir>/stack.json`` (pids, ports, URLs) and ``<dir>/env.sh`` (the exports a
shell needs: ``RAY_ADDRESS``, ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``,
``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``).

MLflow, Prefect and PostgreSQL listen on 127.0.0.1 only. Ray does not: ``ray start`` turns a
loopback ``--node-ip-address`` into the machine's routable address and binds its ports on all
interfaces (ray._private.services.resolve_ip_for_localhost), so the Ray address printed is
that address -- one more reason for the token. Never stop a local cluster with ``ray stop``:
it kills every Ray process of the machine, including other people's; ``down`` kills only its
own process groups.

Why not a network namespace per node: ``unshare -n`` gives a node an empty network with only
its own loopback; joining the nodes needs a veth pair or a bridge with addresses and routes
(CAP_NET_ADMIN, iproute2), which CI runners and unprivileged users do not have, and the MLflow
and Prefect servers on 127.0.0.1 would be unreachable from inside. Distinct temp dirs, ports,
node ids and per-node resources give Ray two real nodes without it.

    python infra/local/cluster.py up [--dir DIR]      # prints the env exports
    python infra/local/cluster.py down [--dir DIR]
    python infra/local/cluster.py status [--dir DIR]
    python infra/local/cluster.py psql mlflow|prefect "SQL" [--dir DIR]
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
import secrets
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

__all__ = [
    "DEFAULT_DIR",
    "MLFLOW_DB_SCHEME",
    "PREFECT_DB_SCHEME",
    "Stack",
    "StackError",
    "free_port",
    "load",
    "psql",
    "start",
    "stop",
]

log = logging.getLogger("infra.local")

#: Default state directory of ``up``/``down`` (short: Ray's unix sockets live below it).
DEFAULT_DIR = Path("/tmp/cugan-local")
STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "ray-auth-token"
WORK_POOL = "cugan-local"  # prefect.yaml's work pool
PG_USER = "cugan"  # the database superuser initdb creates (trust auth on 127.0.0.1)
DATABASES = ("mlflow", "prefect")
#: SQLAlchemy URI schemes, driver named: MLflow's synchronous store on psycopg2 (pinned in
#: requirements.lock), Prefect's async server on asyncpg (its only PostgreSQL driver).
MLFLOW_DB_SCHEME = "postgresql+psycopg2"
PREFECT_DB_SCHEME = "postgresql+asyncpg"
#: Environment variables of the caller that must not leak into the stack's processes: another
#: cluster's address or token would point them elsewhere (RAY_AUTH_TOKEN outranks the path).
_FOREIGN_ENV = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "PREFECT_PROFILE",
)


_NO_POSTGRES = (
    "PostgreSQL: no postgres binary in /usr/lib/postgresql/*/bin or on PATH "
    "(infra/local/system-deps.sh installs it; CUGAN_PG_BIN points elsewhere)"
)


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
    ray_auth_token_path: str | None = None  # the cluster's token (RAY_AUTH_MODE=token)
    # "head" / "worker" -> {"temp_dir", "num_cpus", "resources", "ports"}
    ray_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    postgres: dict[str, Any] | None = None
    mlflow_uri: str | None = None
    mlflow_backend_store: str | None = None  # postgresql+psycopg2://...
    prefect_api_url: str | None = None
    prefect_home: str | None = None
    prefect_database: str | None = None  # postgresql+asyncpg://...
    work_pool: str | None = None

    def ray_env(self) -> dict[str, str]:
        """What every process of the Ray cluster -- nodes and drivers -- needs: token auth on,
        with this stack's token."""
        if not self.ray_auth_token_path:
            return {}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.ray_auth_token_path}

    def env(self) -> dict[str, str]:
        """The environment a client of this stack needs."""
        out = {}
        if self.ray_address:
            out["RAY_ADDRESS"] = self.ray_address
            out.update(self.ray_env())
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
    for key in _FOREIGN_ENV:
        env.pop(key, None)
    return env


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bin() -> Path | None:
    """The newest system PostgreSQL's bin directory ($CUGAN_PG_BIN overrides)."""
    if os.environ.get("CUGAN_PG_BIN"):
        given = Path(os.environ["CUGAN_PG_BIN"])
        return given if (given / "postgres").is_file() else None
    for candidate in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    ):
        if (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    found = shutil.which("postgres")
    # resolved: a /usr/local/bin/postgres symlink's directory has no createdb/psql
    return Path(found).resolve().parent if found else None


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
        raise StackError(_NO_POSTGRES)
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
    for db in DATABASES:
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
        "databases": list(DATABASES),
    }
    stack.save()


def _require_driver(module: str, package: str, who: str) -> None:
    """Fail with one line when the server's Python lacks its PostgreSQL driver (no fallback)."""
    if importlib.util.find_spec(module) is None:
        raise StackError(
            f"{who} needs the PostgreSQL driver {module} ({package}, pinned in requirements.lock), "
            f"which {sys.executable} does not have: make venv, or pip install -r requirements.lock"
        )


def _database_uri(stack: Stack, scheme: str, database: str) -> str:
    if stack.postgres is None:
        raise StackError("PostgreSQL is not running")
    return f"{scheme}://{PG_USER}@127.0.0.1:{stack.postgres['port']}/{database}"


def psql(stack: Stack, database: str, sql: str, *, timeout: float = 30.0) -> list[list[str]]:
    """Rows of ``sql`` run by ``psql`` in one of the stack's databases (fields split on ``|``).

    The proof that a server really keeps its state in PostgreSQL: read its tables directly.
    """
    if stack.postgres is None:
        raise StackError("PostgreSQL is not running in this stack")
    done = subprocess.run(
        [
            str(Path(stack.postgres["bin"]) / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(stack.postgres["port"]),
            "-U",
            stack.postgres["user"],
            "-d",
            database,
            "-X",  # no ~/.psqlrc
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(f"psql {database}: {done.stderr.strip() or done.returncode}")
    return [line.split("|") for line in done.stdout.splitlines() if line]


# ---------------------------------------------------------------------------------------------
# Ray


def _write_token(stack: Stack) -> None:
    """A fresh token for this cluster only, readable by its owner only.

    Not Ray's default ``~/.ray/auth_token``: that file is shared by every cluster of the user,
    and its mere presence switches a later ``ray start --head`` to token mode. Same format as
    ``ray get-auth-token --generate`` (256 random bits, hex).
    """
    path = Path(stack.root) / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    stack.ray_auth_token_path = str(path)
    stack.save()


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
    env.update(stack.ray_env())
    # no drain on SIGTERM: a throwaway node stops at once instead of waiting up to 30 s
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # Ray's own processes that look for "the" cluster (e.g. Train's PlacementGroupCleaner) read
    # RAY_ADDRESS first; without it they grep ps and fail when another cluster runs here.
    env["RAY_ADDRESS"] = f"127.0.0.1:{ports['port']}" if role == "head" else str(stack.ray_address)
    return _spawn(stack, f"ray-{role}", argv, env=env)


def _start_ray(
    stack: Stack, taken: set[int], num_cpus: int, timeout: float
) -> tuple[subprocess.Popen, Any]:
    """Start the head; return it and a function that starts the worker once the head is up."""
    _write_token(stack)
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
    backend = _database_uri(stack, MLFLOW_DB_SCHEME, "mlflow")
    stack.mlflow_backend_store = backend
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
    stack.prefect_database = _database_uri(stack, PREFECT_DB_SCHEME, "prefect")
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = stack.prefect_database
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


def _preflight(mlflow: bool, prefect: bool) -> None:
    """Everything the stack needs that can be checked in a second, before anything starts."""
    if mlflow:
        _require_driver("psycopg2", "psycopg2-binary", "MLflow's backend store")
    if prefect:
        _require_driver("asyncpg", "asyncpg", "Prefect's server")
    if (mlflow or prefect) and _pg_bin() is None:
        raise StackError(_NO_POSTGRES)


def start(
    root: str | os.PathLike[str] | None = None,
    *,
    num_cpus: int = 1,
    mlflow: bool = True,
    prefect: bool = True,
    work_pool: str | None = WORK_POOL,
    timeout: float = 120.0,
) -> Stack:
    """Start the stack in ``root`` (a new directory under /tmp when None); returns its state.

    ``num_cpus`` per Ray node: with 1, a 2-worker job with 1 CPU each must put one worker on
    each node. PostgreSQL starts whenever MLflow or Prefect does: they have no other store.
    Any component that does not come up raises StackError (one line: which, and why); everything
    started so far is stopped before it propagates, and the logs stay in ``root``.
    """
    _preflight(mlflow, prefect)
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
        if mlflow or prefect:
            _start_postgres(stack, taken, timeout)
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
            _wait(name, proc, ready, stack.procs[name]["log"], timeout)
        if prefect and work_pool:
            try:
                _create_work_pool(stack, client_env or {}, work_pool, timeout)
            except subprocess.TimeoutExpired as err:
                raise StackError(f"prefect work-pool create {work_pool}: {err}") from None
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
    lines.append(
        f"  ray address: {stack.ray_address} (token auth, token {stack.ray_auth_token_path})"
    )
    if stack.postgres:
        lines.append(
            f"  postgresql: 127.0.0.1:{stack.postgres['port']} (run as {stack.postgres['run_as']})"
        )
    if stack.mlflow_uri:
        lines.append(f"  mlflow: {stack.mlflow_uri} (backend store {stack.mlflow_backend_store})")
    if stack.prefect_api_url:
        lines.append(
            f"  prefect: {stack.prefect_api_url} (database {stack.prefect_database}, "
            f"work pool {stack.work_pool})"
        )
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
    up.add_argument("--no-mlflow", action="store_true")
    up.add_argument("--no-prefect", action="store_true")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds each component may take")
    for name in ("down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=str(DEFAULT_DIR))
    q = sub.add_parser("psql", help="run one SQL statement in the stack's mlflow/prefect database")
    q.add_argument("database", choices=DATABASES)
    q.add_argument("sql")
    q.add_argument("--dir", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        if args.command == "up":
            stack = start(
                args.dir,
                num_cpus=args.num_cpus,
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
        elif args.command == "psql":
            for row in psql(load(args.dir), args.database, args.sql):
                print("|".join(row))
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
