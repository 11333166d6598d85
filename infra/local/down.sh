#!/usr/bin/env bash
# Stop everything infra/local/up.sh started (its process groups only: never `ray stop`, which
# kills every Ray process of the machine) and remove its directory.
#
#   infra/local/down.sh [--dir DIR]        # default /tmp/cugan-local
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
exec "${python}" infra/local/cluster.py down "$@"
