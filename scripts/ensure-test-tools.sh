#!/usr/bin/env bash
# Make sure the programs the tests use besides Python packages are on this machine:
#   - the PostgreSQL server binaries (initdb, pg_ctl), for the tests and benchmarks that
#     start a throwaway server, and the unprivileged `postgres` user to run it as when
#     the tests run as root (initdb refuses root);
#   - tmux, for the tests that drive the REPL and `ablauf run` in a real terminal;
#   - Chromium and its driver (Debian's chromium, chromium-driver), for the dashboard's
#     end-to-end tests in a real headless browser.
# Idempotent and quiet when everything is there; installs what is missing with apt-get
# (CI runs as root on a fresh Debian/Ubuntu machine). `pygmentize` comes with the
# `pygments` Python package that `pip install -e '.[test]'` installs.
set -euo pipefail

have_initdb() {
    local bin
    for bin in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$bin" ] && return 0
    done
    command -v initdb >/dev/null 2>&1
}

missing=()
have_initdb || missing+=(postgresql)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
have_chromium() { [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; }
have_chromium || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-test-tools: missing ${missing[*]} and apt-get is not available; install them" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    echo "ensure-test-tools: installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    # 'postgresql' pulls the distribution's current server version and creates the
    # unprivileged 'postgres' user that the tests run the server as.
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ! have_initdb; then
        echo "ensure-test-tools: PostgreSQL was installed but initdb is still missing" >&2
        exit 1
    fi
    if ! command -v tmux >/dev/null 2>&1; then
        echo "ensure-test-tools: tmux was installed but is still missing" >&2
        exit 1
    fi
    if ! have_chromium || ! command -v chromedriver >/dev/null 2>&1; then
        echo "ensure-test-tools: chromium was installed but chromium or chromedriver is still missing" >&2
        exit 1
    fi
    # The package starts a cluster of its own on port 5432; the tests do not need it.
    if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters -h 2>/dev/null | while read -r version name _; do
            $SUDO pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true
        done
    fi
fi

# As root the tests run the server as `postgres`: make sure that user exists (a machine
# image with the binaries but without the package's user).
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "ensure-test-tools: creating the system user 'postgres' to run the test server as" >&2
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
exit 0
