"""A real ``mlflow server`` for tests, and a tiny HTTP proxy in front of it that can answer
chosen requests with an error (imported as a plain module, like evalkit; not a conftest).

:class:`MlflowServer` starts ``mlflow server`` on a free port with a sqlite store and proxied
artifacts in a directory of the test's, waits until it answers, and kills it at the end (also
between a ``stop()`` and a ``start()`` on the same port and store: a server that goes away and
comes back). :class:`FaultProxy` forwards every request to the server, except those whose path
a test marks as failing, which get ``503 TEMPORARILY_UNAVAILABLE`` (MLflow's JSON error body).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

__all__ = ["FaultProxy", "MlflowServer", "free_port", "mlflow_server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mlflow_bin() -> str:
    here = Path(sys.executable).with_name("mlflow")
    return str(here) if here.exists() else (shutil.which("mlflow") or "mlflow")


class MlflowServer:
    """``mlflow server`` with a sqlite store under ``root``; ``uri`` is fixed at creation, so a
    stopped server comes back at the same address with the same data."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 180.0) -> MlflowServer:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        # The server's job runner (GenAI scorers) is of no use here and doubles its start-up.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = (self.root / "server.log").open("ab")
        self._proc = subprocess.Popen(
            [
                _mlflow_bin(),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the workers too
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{tail}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout:g} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(root).start()
    try:
        yield server
    finally:
        server.stop()


UNAVAILABLE = (
    503,
    json.dumps(
        {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "temporarily unavailable"}
    ).encode(),
)


class FaultProxy:
    """Forwards HTTP to ``upstream``; a request whose path makes ``fails(path)`` true gets
    ``reply`` instead (default: ``503`` with MLflow's ``TEMPORARILY_UNAVAILABLE`` JSON body).
    ``failed`` counts them."""

    def __init__(
        self,
        upstream: str,
        fails: Callable[[str], bool],
        reply: tuple[int, bytes] = UNAVAILABLE,
    ) -> None:
        self.upstream, self.fails, self.failed = upstream.rstrip("/"), fails, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fails(self.path):
                    proxy.failed += 1
                    self._answer(*reply, {"Content-Type": "application/json"})
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                got = requests.request(
                    self.command,
                    proxy.upstream + self.path,
                    data=body,
                    headers=headers,
                    timeout=60,
                    allow_redirects=False,
                )
                skip = ("content-length", "transfer-encoding", "connection", "content-encoding")
                self._answer(
                    got.status_code,
                    got.content,
                    {k: v for k, v in got.headers.items() if k.lower() not in skip},
                )

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
