#!/usr/bin/env bash
# Installs what the contract checks need, idempotently and quietly:
#   - Python tools (requirements.txt) into target/contract/venv;
#   - Node tools (package.json + package-lock.json) into
#     scripts/contract/node_modules with `npm ci`;
#   - Debian's chromium (/usr/bin/chromium) with apt-get, for Playwright.
# Each is skipped only when it is already there in the pinned version; any
# install that fails stops the script with a message (nothing is skipped
# silently). Needs python3 + pip, node + npm, and root (or a chromium
# already installed). Works with CI=true and no stdin.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/contract/venv"

log() { printf 'contract/install: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- Python ------------------------------------------------------------
# The venv is reused while requirements.txt is unchanged (its hash is kept).
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && "$(cat "$venv/.requirements.sha256" 2>/dev/null)" == "$want" ]]; then
    log "python tools up to date ($venv)"
else
    command -v python3 >/dev/null || die "python3 is required"
    log "installing python tools into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "cannot create a venv (python3 -m venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        -r "$here/requirements.txt" </dev/null \
        || die "pip install -r scripts/contract/requirements.txt failed"
    echo "$want" >"$venv/.requirements.sha256"
fi

# --- Node --------------------------------------------------------------
# `npm ci` again only when the lock file changed since the last install.
lock="$here/package-lock.json"
stamp="$here/node_modules/.package-lock.sha256"
want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [[ -d "$here/node_modules" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
    log "node tools up to date (scripts/contract/node_modules)"
else
    command -v npm >/dev/null || die "npm is required"
    log "installing node tools (npm ci in scripts/contract)"
    (cd "$here" && CI=true npm ci --no-audit --no-fund --loglevel=error </dev/null >/dev/null) \
        || die "npm ci in scripts/contract failed"
    echo "$want" >"$stamp"
fi

# --- Chromium ----------------------------------------------------------
if [[ -x /usr/bin/chromium ]]; then
    log "chromium present ($(/usr/bin/chromium --version 2>/dev/null | head -n 1))"
else
    [[ "$(id -u)" == 0 ]] || die "/usr/bin/chromium is missing and only root can apt-get install it"
    command -v apt-get >/dev/null || die "/usr/bin/chromium is missing and there is no apt-get"
    log "installing chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends chromium </dev/null >/dev/null \
        || die "apt-get install chromium failed"
    [[ -x /usr/bin/chromium ]] || die "chromium installed but /usr/bin/chromium is missing"
fi
