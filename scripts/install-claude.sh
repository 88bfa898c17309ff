#!/usr/bin/env bash
# Installs the Claude Code CLI that agentgate's integration tests run offline
# against a mock Anthropic API (tests/support/mock_anthropic.rs).
#
# The version is pinned by tests/claude/package.json + package-lock.json and
# installed into tests/claude/node_modules (git-ignored). Idempotent:
#   1. if AGENTGATE_TEST_CLAUDE_BIN is set and executable, use it as is;
#   2. else if tests/claude/node_modules/.bin/claude reports the pinned
#      version, do nothing;
#   3. else run `npm ci` in tests/claude.
# Prints the path of the binary on the last line of stdout. Non-interactive
# (works with CI=true and no stdin). Needs node + npm and access to the npm
# registry (only in case 3).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg_dir="$repo_root/tests/claude"
bin="$pkg_dir/node_modules/.bin/claude"

log() { printf 'install-claude: %s\n' "$*" >&2; }

# `claude --version` prints e.g. "2.1.330 (Claude Code)"; keep it offline.
version_of() {
    DISABLE_AUTOUPDATER=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
        "$1" --version </dev/null 2>/dev/null | awk 'NR == 1 { print $1 }'
}

if [[ -n "${AGENTGATE_TEST_CLAUDE_BIN:-}" ]]; then
    if [[ -x "$AGENTGATE_TEST_CLAUDE_BIN" && ! -d "$AGENTGATE_TEST_CLAUDE_BIN" ]]; then
        log "using AGENTGATE_TEST_CLAUDE_BIN ($(version_of "$AGENTGATE_TEST_CLAUDE_BIN" || true))"
        printf '%s\n' "$AGENTGATE_TEST_CLAUDE_BIN"
        exit 0
    fi
    log "AGENTGATE_TEST_CLAUDE_BIN=$AGENTGATE_TEST_CLAUDE_BIN is not an executable file; installing the pinned CLI instead"
fi

# The pinned version, read from package.json (exact version, no range).
want="$(sed -n 's/.*"@anthropic-ai\/claude-code": *"\([^"]*\)".*/\1/p' "$pkg_dir/package.json" | head -n 1)"
if [[ -z "$want" ]]; then
    log "cannot read the @anthropic-ai/claude-code version from $pkg_dir/package.json"
    exit 1
fi

if [[ -x "$bin" ]] && [[ "$(version_of "$bin" || true)" == "$want" ]]; then
    log "claude $want already installed"
    printf '%s\n' "$bin"
    exit 0
fi

command -v npm >/dev/null 2>&1 || {
    log "npm is not installed; install Node.js + npm, or set AGENTGATE_TEST_CLAUDE_BIN"
    exit 1
}

log "installing @anthropic-ai/claude-code@$want into $pkg_dir/node_modules"
(cd "$pkg_dir" && CI=true npm ci --no-audit --no-fund --loglevel=error </dev/null >&2)

got="$(version_of "$bin" || true)"
if [[ "$got" != "$want" ]]; then
    # npm versions that skip install scripts may leave the wrapper's stub in
    # place of the native binary; run the package's own postinstall step.
    log "claude --version says '${got:-nothing}', running the package's install.cjs"
    (cd "$pkg_dir/node_modules/@anthropic-ai/claude-code" && node install.cjs </dev/null >&2)
    got="$(version_of "$bin" || true)"
fi
if [[ "$got" != "$want" ]]; then
    log "installed CLI reports '${got:-nothing}', expected $want"
    exit 1
fi
log "installed claude $got"
printf '%s\n' "$bin"
