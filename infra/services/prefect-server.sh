#!/usr/bin/env bash
# The compose `prefect` + `prefect-init` services without Docker: a Prefect 3 server on an
# existing PostgreSQL database, and the `cugan-local` process work pool of prefect.yaml.
#
#   export PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://cugan:<password>@db.internal:5432/prefect
#   (the driver named: asyncpg is the only PostgreSQL driver Prefect's server accepts)
#   infra/services/prefect-server.sh            # API + UI on 0.0.0.0:4200, runs in the foreground
#
# Then, where the flows run (the repository checkout, its .venv active):
#   export PREFECT_API_URL=http://<this host>:4200/api
#   prefect deploy --all && prefect worker start --pool cugan-local
set -euo pipefail

: "${PREFECT_SERVER_DATABASE_CONNECTION_URL:?set PREFECT_SERVER_DATABASE_CONNECTION_URL (postgresql+asyncpg://...)}"
prefect_bin="${PREFECT_BIN:-prefect}"
host="${PREFECT_HOST:-0.0.0.0}"
port="${PREFECT_PORT:-4200}"
pool="${PREFECT_WORK_POOL:-cugan-local}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"

"${prefect_bin}" server start --host "${host}" --port "${port}" &
server=$!
trap 'kill "${server}" 2>/dev/null || true' EXIT INT TERM

api="http://127.0.0.1:${port}/api"
for _ in $(seq 1 120); do
    if python3 -c "import urllib.request as u; u.urlopen('${api}/health', timeout=2)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "${server}" 2>/dev/null; then
        echo "error: prefect server exited" >&2
        exit 1
    fi
    sleep 1
done
PREFECT_API_URL="${api}" "${prefect_bin}" --no-prompt work-pool create "${pool}" --type process --overwrite
echo "prefect server on ${host}:${port}, work pool ${pool} ready"
wait "${server}"
