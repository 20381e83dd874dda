#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl) are installed, for the tests and
# benchmarks that start a throwaway server. Idempotent and quiet when already installed;
# installs with apt-get otherwise (CI runs as root on a fresh Debian/Ubuntu machine).
set -euo pipefail

have_initdb() {
    local bin
    for bin in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$bin" ] && return 0
    done
    command -v initdb >/dev/null 2>&1
}

if have_initdb; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: initdb not found and apt-get is missing; install the PostgreSQL server" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "ensure-postgres: installing the PostgreSQL server with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# 'postgresql' pulls the distribution's current server version and creates the
# unprivileged 'postgres' user that the tests run the server as.
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null

if ! have_initdb; then
    echo "ensure-postgres: PostgreSQL was installed but initdb is still missing" >&2
    exit 1
fi
# The package starts a cluster of its own on port 5432; the tests do not need it.
if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r version name _; do
        $SUDO pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true
    done
fi
exit 0
