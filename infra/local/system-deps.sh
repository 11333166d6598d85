#!/usr/bin/env bash
# System packages the local stack (infra/local/cluster.py, tests/test_infra_local.py) needs
# besides the Python lock: PostgreSQL's server and client programs (postgres, initdb,
# createdb, psql) and util-linux's setpriv (PostgreSQL refuses to run as root; as root the
# stack runs it as the `postgres` user the Debian package creates). `make test` calls this.
#
#   infra/local/system-deps.sh            # install what is missing (root + apt-get), else say what
#   infra/local/system-deps.sh --check    # only check; exit 1 if something is missing
#
# As root on a Debian/Ubuntu machine (CI) it installs the distribution's `postgresql` and
# `postgresql-client` packages with apt-get. Anywhere else it prints the one command to run and
# exits 0, so that `make test` still runs everything else; the local-stack test then
# fails with the same message. Already installed elsewhere: CUGAN_PG_BIN=<its bin directory>.
set -euo pipefail

check_only=0
if [[ "${1:-}" == "--check" ]]; then
    check_only=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--check]" >&2
    exit 2
fi

pg_bin() {
    if [[ -n "${CUGAN_PG_BIN:-}" ]]; then
        echo "${CUGAN_PG_BIN}"
        return
    fi
    # the newest /usr/lib/postgresql/<major>/bin, as infra/local/cluster.py picks it
    find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null \
        | sort -t/ -k5,5nr | head -n 1
}

missing() {
    local bin
    bin="$(pg_bin)"
    local tool
    for tool in postgres initdb createdb psql; do
        if [[ -z "${bin}" || ! -x "${bin}/${tool}" ]]; then
            echo "postgresql"
            break
        fi
    done
    if ! command -v setpriv >/dev/null 2>&1 && ! command -v runuser >/dev/null 2>&1; then
        echo "util-linux"
    fi
}

needed="$(missing | tr '\n' ' ')"
if [[ -z "${needed// /}" ]]; then
    echo "system-deps: PostgreSQL in $(pg_bin), setpriv/runuser present"
    exit 0
fi
if [[ ${check_only} -eq 1 ]]; then
    echo "system-deps: missing ${needed}(infra/local/system-deps.sh installs them)" >&2
    exit 1
fi

packages=()
for item in ${needed}; do
    case "${item}" in
        postgresql) packages+=(postgresql postgresql-client) ;;
        util-linux) packages+=(util-linux) ;;
    esac
done

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: apt-get install ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}"
    still="$(missing | tr '\n' ' ')"
    if [[ -n "${still// /}" ]]; then
        echo "system-deps: still missing after apt-get: ${still}" >&2
        exit 1
    fi
    echo "system-deps: PostgreSQL in $(pg_bin)"
else
    echo "system-deps: NOTE the local-stack test (tests/test_infra_local.py) needs ${needed}-" \
        "install them: sudo apt-get install ${packages[*]} (or your system's equivalent)" >&2
fi
