#!/usr/bin/env bash
# Installs the ACP agents that agentgate's tests (tests/acp.rs) run offline
# against mocks of their model APIs (tests/support/mock_gemini.rs):
#   - gemini-cli (@google/gemini-cli), which speaks ACP itself (`gemini --acp`);
#   - codex-acp (@zed-industries/codex-acp), Zed's ACP adapter for Codex;
#   - claude-code-acp (@zed-industries/claude-code-acp), Zed's ACP adapter
#     for Claude Code (it bundles the Claude Agent SDK and its CLI), run
#     against tests/support/mock_anthropic.rs.
#
# Versions are pinned by tests/acp/package.json + package-lock.json and
# installed into tests/acp/node_modules (git-ignored). Idempotent: when the
# installed versions match the pins nothing is fetched; else `npm ci`.
# Prints three lines at the end, for scripts/test.sh:
#   AGENTGATE_TEST_GEMINI_BIN=<path>
#   AGENTGATE_TEST_CODEX_ACP_BIN=<path>
#   AGENTGATE_TEST_CLAUDE_CODE_ACP_BIN=<path>
# Non-interactive; needs node + npm, and the npm registry in the `npm ci` case.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg_dir="$repo_root/tests/acp"
gemini="$pkg_dir/node_modules/.bin/gemini"
codex_acp="$pkg_dir/node_modules/.bin/codex-acp"
claude_code_acp="$pkg_dir/node_modules/.bin/claude-code-acp"

log() { printf 'install-acp-agents: %s\n' "$*" >&2; }

pinned() { sed -n "s/.*\"$1\": *\"\\([^\"]*\\)\".*/\\1/p" "$pkg_dir/package.json" | head -n 1; }
installed() {
    local pj="$pkg_dir/node_modules/$1/package.json"
    [[ -f "$pj" ]] && sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' "$pj" | head -n 1
}

want_gemini="$(pinned '@google\/gemini-cli')"
want_codex="$(pinned '@zed-industries\/codex-acp')"
want_claude_acp="$(pinned '@zed-industries\/claude-code-acp')"
if [[ -z "$want_gemini" || -z "$want_codex" || -z "$want_claude_acp" ]]; then
    log "cannot read the pinned versions from $pkg_dir/package.json"
    exit 1
fi

if [[ -x "$gemini" && -x "$codex_acp" && -x "$claude_code_acp" ]] \
    && [[ "$(installed @google/gemini-cli || true)" == "$want_gemini" ]] \
    && [[ "$(installed @zed-industries/codex-acp || true)" == "$want_codex" ]] \
    && [[ "$(installed @zed-industries/claude-code-acp || true)" == "$want_claude_acp" ]]; then
    log "gemini-cli $want_gemini, codex-acp $want_codex and claude-code-acp $want_claude_acp already installed"
else
    command -v npm >/dev/null 2>&1 || { log "npm is required"; exit 1; }
    log "installing @google/gemini-cli@$want_gemini, @zed-industries/codex-acp@$want_codex and @zed-industries/claude-code-acp@$want_claude_acp into $pkg_dir/node_modules"
    (cd "$pkg_dir" && CI=true npm ci --no-audit --no-fund --loglevel=error </dev/null >&2)
fi

got="$(installed @google/gemini-cli || true)"
[[ "$got" == "$want_gemini" ]] || { log "gemini-cli is $got, expected $want_gemini"; exit 1; }
# `gemini --version` starts the CLI; keep it offline and out of the user's HOME.
version="$(HOME="$(mktemp -d)" GEMINI_CLI_NO_RELAUNCH=true "$gemini" --version </dev/null 2>/dev/null | tail -n 1 || true)"
[[ "$version" == "$want_gemini" ]] || { log "gemini --version says '${version:-nothing}', expected $want_gemini"; exit 1; }
[[ -x "$codex_acp" ]] || { log "codex-acp is missing (its platform package did not install?)"; exit 1; }
got="$(installed @zed-industries/claude-code-acp || true)"
[[ "$got" == "$want_claude_acp" && -x "$claude_code_acp" ]] || { log "claude-code-acp is ${got:-missing}, expected $want_claude_acp"; exit 1; }
log "installed gemini-cli $version, codex-acp $(installed @zed-industries/codex-acp) and claude-code-acp $got"
printf 'AGENTGATE_TEST_GEMINI_BIN=%s\n' "$gemini"
printf 'AGENTGATE_TEST_CODEX_ACP_BIN=%s\n' "$codex_acp"
printf 'AGENTGATE_TEST_CLAUDE_CODE_ACP_BIN=%s\n' "$claude_code_acp"
