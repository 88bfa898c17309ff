#!/usr/bin/env bash
# The whole test suite, installing what it needs. This is the README's test
# command and what CI runs (.ci/run).
#
#   bash scripts/test.sh
#
# 1. installs the pinned Claude Code CLI from the npm registry into
#    tests/claude/node_modules (skipped when AGENTGATE_CLAUDE_BIN points to one),
#    and the pinned ACP agents (gemini-cli, codex-acp) into tests/acp/node_modules;
# 2. checks formatting and lints;
# 3. runs every test: unit, HTTP, real processes (python3, sed, sh), and the
#    real claude CLI against the suite's own mock of the Anthropic API;
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

for tool in cargo python3 sed node npm; do
    command -v "$tool" >/dev/null || { echo "test.sh: $tool is required" >&2; exit 1; }
done

step "installing the pinned claude CLI (tests/claude)"
AGENTGATE_CLAUDE_BIN="$(bash scripts/install-claude.sh | tail -n 1)"
export AGENTGATE_CLAUDE_BIN
echo "claude: $AGENTGATE_CLAUDE_BIN"

step "installing the pinned ACP agents: gemini-cli, codex-acp (tests/acp)"
acp_env="$(bash scripts/install-acp-agents.sh | tail -n 2)"
while IFS='=' read -r name value; do export "$name=$value"; done <<<"$acp_env"
echo "gemini: $AGENTGATE_GEMINI_BIN; codex-acp: $AGENTGATE_CODEX_ACP_BIN"

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "cargo test"
cargo test --locked --all-targets

step "the API as a contract: schemathesis, SDKs, examples, console in Chromium (scripts/contract/run.sh)"
bash scripts/contract/run.sh
