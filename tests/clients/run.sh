#!/usr/bin/env bash
# Client test suite for `diffctl serve`: real Python clients (webuiapi, the openai SDK, requests,
# Playwright driving Debian's Chromium) against a server started on a free loopback port.
#
#   bash tests/clients/run.sh [pytest args...]
#
# DIFFCTL_BIN picks the binary; without it target/debug/diffctl is used (built when missing).
# Installs what is missing: redis-server, chromium and python3-venv with apt-get, the Python
# packages of requirements.txt into target/clients-venv (reused across runs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

# --- system packages -------------------------------------------------------------------------
sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 && ! dpkg -s python3-venv >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "run.sh: installing ${missing[*]} with apt-get" >&2
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python environment ----------------------------------------------------------------------
venv="$root/target/clients-venv"
req="$here/requirements.txt"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Reinstall only when requirements.txt changed since the last successful install.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
fi
# No `playwright install`: browsers cannot be downloaded here; the tests launch Debian's chromium.

# --- the server binary -----------------------------------------------------------------------
if [ -z "${DIFFCTL_BIN:-}" ]; then
    DIFFCTL_BIN="$root/target/debug/diffctl"
    if [ ! -x "$DIFFCTL_BIN" ]; then
        cargo build --bin diffctl
    fi
fi
if [ ! -x "$DIFFCTL_BIN" ]; then
    echo "run.sh: DIFFCTL_BIN=$DIFFCTL_BIN is not an executable file" >&2
    exit 1
fi
DIFFCTL_BIN="$(cd "$(dirname "$DIFFCTL_BIN")" && pwd)/$(basename "$DIFFCTL_BIN")"
export DIFFCTL_BIN

exec "$venv/bin/python" -m pytest -q tests/clients "$@"
