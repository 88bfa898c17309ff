#!/usr/bin/env bash
# The whole test suite, installing what it needs. This is the README's test
# command and what CI runs (.ci/run).
#
#   bash scripts/test.sh
#
# 1. installs the pinned Claude Code CLI from the npm registry into
#    tests/claude/node_modules (skipped when AGENTGATE_TEST_CLAUDE_BIN points to one),
#    and the pinned ACP agents (gemini-cli, codex-acp) into tests/acp/node_modules;
# 2. checks formatting and lints;
# 3. starts a throwaway PostgreSQL (Debian's, installed when missing) and
#    runs every test: unit, HTTP, real processes (python3, sed, sh), the
#    store on SQLite and PostgreSQL, the real claude CLI against the
#    suite's own mock of the Anthropic API, and the proxy recipe behind a
#    real nginx (Debian's, installed when missing, never started as a
#    system service: scripts/nginx-throwaway.sh);
# 4. checks the API as a contract against the real binary
#    (scripts/contract/run.sh: installs its pinned tools from PyPI, npm and
#    Debian first): openapi.yaml validated, schemathesis, the generated
#    Python and TypeScript SDKs, the shell examples, the web console and
#    examples/stream.html in headless Chromium.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# One build per run: incremental caches only cost disk here.
export CARGO_INCREMENTAL=0

# Every tool, checked up front, one clear line each.
missing=0
need() { # need NAME WHY
    command -v "$1" >/dev/null || { echo "test.sh: missing $1 ($2)" >&2; missing=1; }
}
need cargo "the Rust toolchain: https://rustup.rs"
need rustfmt "rustup component add rustfmt"
need cargo-clippy "rustup component add clippy"
need python3 "test agents and scripts/contract; apt-get install python3"
need sed "a test agent"
need curl "the shell examples in scripts/contract; apt-get install curl"
need setpriv "runs the gateway unprivileged in tests/hardening2.rs; apt-get install util-linux"
need node "the pinned claude CLI; Node 18 or newer"
need npm "installs the pinned claude CLI"
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "test.sh: missing python3-venv (scripts/contract makes a venv); apt-get install python3-venv" >&2
    missing=1
fi
if command -v node >/dev/null; then
    node_major="$(node -p 'process.versions.node.split(".")[0]')"
    if (( node_major < 18 )); then
        echo "test.sh: node $(node --version) is too old for the pinned claude CLI (needs 18 or newer)" >&2
        missing=1
    fi
fi
(( missing == 0 )) || exit 1

# Sealed from the machine: no AGENTGATE_* setting of the runner reaches a
# test (a token, a claude binary, a default agent), and no test runs a
# claude that is not the pinned one pointed at the suite's mock.
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^AGENTGATE_' | grep -v '^AGENTGATE_TEST_' || true)

step "installing the pinned claude CLI (tests/claude)"
AGENTGATE_TEST_CLAUDE_BIN="$(bash scripts/install-claude.sh | tail -n 1)"
export AGENTGATE_TEST_CLAUDE_BIN
echo "claude: $AGENTGATE_TEST_CLAUDE_BIN"

step "installing the pinned ACP agents: gemini-cli, codex-acp, claude-code-acp (tests/acp)"
acp_env="$(bash scripts/install-acp-agents.sh | tail -n 3)"
while IFS='=' read -r name value; do export "$name=$value"; done <<<"$acp_env"
echo "gemini: $AGENTGATE_TEST_GEMINI_BIN; codex-acp: $AGENTGATE_TEST_CODEX_ACP_BIN; claude-code-acp: $AGENTGATE_TEST_CLAUDE_CODE_ACP_BIN"

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "a throwaway PostgreSQL for the store tests (scripts/pg-throwaway.sh)"
pg_out="$(bash scripts/pg-throwaway.sh start)"
pg_dir="$(head -n 1 <<<"$pg_out")"
trap 'bash scripts/pg-throwaway.sh stop "$pg_dir"' EXIT
AGENTGATE_TEST_POSTGRES="$(tail -n 1 <<<"$pg_out")"
export AGENTGATE_TEST_POSTGRES

step "nginx for tests/nginx.rs (scripts/nginx-throwaway.sh install)"
bash scripts/nginx-throwaway.sh install
echo "nginx: $(command -v nginx || echo /usr/sbin/nginx)"

step "cargo test"
cargo test --locked --all-targets --no-fail-fast

step "the API as a contract: schemathesis, SDKs, examples, console in Chromium (scripts/contract/run.sh)"
bash scripts/contract/run.sh
