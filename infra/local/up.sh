#!/usr/bin/env bash
# Start the local stand-in for the production stack on this machine (infra/local/cluster.py):
# a Ray head + a Ray worker node (separate `ray start` processes, own temp dirs and ports,
# resources {"node_head": 1} / {"node_worker": 1}, token authentication with a token made for
# this stack), PostgreSQL (system package, run as an unprivileged user when root; no SQLite
# fallback), an MLflow server (--serve-artifacts, backend store postgresql+psycopg2://) and a
# Prefect server (postgresql+asyncpg://) with the cugan-local work pool. Everything it starts,
# infra/local/down.sh stops. Needs PostgreSQL's packages: infra/local/system-deps.sh.
#
#   infra/local/up.sh [--dir DIR] [--num-cpus N] [--no-mlflow] [--no-prefect]
#   source "${DIR:-/tmp/cugan-local}/env.sh"   # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH,
#                                              # MLFLOW_TRACKING_URI, PREFECT_API_URL
#   infra/local/down.sh [--dir DIR]
#
# Python: $PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-}"
if [[ -z "${python}" ]]; then
    if [[ -x "${repo}/.venv/bin/python" ]]; then
        python="${repo}/.venv/bin/python"
    else
        python="$(command -v python3)"
    fi
fi
cd "${repo}"
exec "${python}" infra/local/cluster.py up "$@"
