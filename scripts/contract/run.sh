#!/usr/bin/env bash
# The API as a contract, checked against the real binary: one step of
# scripts/test.sh, and runnable on its own:
#
#   bash scripts/contract/run.sh
#
#  1. installs the pinned tools (install.sh: PyPI, npm, Debian's chromium);
#  2. validates openapi.yaml (openapi-spec-validator);
#  3. fuzzes a live gateway with schemathesis (fixed seed, bounded examples
#     and time; any failure fails the step);
#  4. runs examples/curl.sh and examples/httpie.sh against a live gateway
#     with a token, then parses its /metrics as strict OpenMetrics;
#  5. generates the Python SDK (openapi-python-client) and runs its tests
#     and examples/sdk/python/chat.py;
#  6. generates the TypeScript SDK (@hey-api/openapi-ts), type-checks, runs
#     its tests (reply streamed over SSE) and examples/sdk/typescript/chat.ts;
#  7. drives the web console at / and examples/stream.html in headless
#     Chromium (playwright-core); screenshots go to target/contract/; then
#     the console with --token and with a JWT (it asks for the token; a
#     reply carrying <script> renders as text and runs nothing). The
#     console's permission buttons and image attachments go to the real Claude Code CLI
#     ($AGENTGATE_TEST_CLAUDE_BIN, exported by scripts/test.sh; required) talking
#     to the test suite's mock of the Anthropic API (examples/mock_anthropic.rs).
#
# Every gateway (and the mock API) listens on 127.0.0.1 with an ephemeral
# port and is stopped on exit, whatever happens. Logs and reports:
# target/contract/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"
here="$root/scripts/contract"
out="$root/target/contract"
mkdir -p "$out"

# shellcheck source=gateway.sh
source "$here/gateway.sh"
static_pid=""
mock_pid=""
claude_dir=""
cleanup() {
    gateway_stop_all
    local pid
    for pid in "$static_pid" "$mock_pid"; do
        if [[ -n "$pid" ]]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ -n "$claude_dir" ]]; then
        rm -rf "$claude_dir"
    fi
}
trap cleanup EXIT
trap 'echo "contract: failed; gateway logs are in $out/*.log" >&2' ERR

started=$SECONDS
step_started=$SECONDS
step() {
    printf '\n--> contract: %s\n' "$*"
    step_started=$SECONDS
}
done_step() { printf '    (%d s)\n' "$((SECONDS - step_started))"; }

# The console's permission test runs the real Claude Code CLI: no stand-in.
if [[ -z "${AGENTGATE_TEST_CLAUDE_BIN:-}" ]]; then
    echo "contract: AGENTGATE_TEST_CLAUDE_BIN is not set; run scripts/test.sh, or set it to the pinned" \
        "CLI: export AGENTGATE_TEST_CLAUDE_BIN=\"\$(bash scripts/install-claude.sh | tail -n 1)\"" >&2
    exit 1
fi
[[ -x "$AGENTGATE_TEST_CLAUDE_BIN" && ! -d "$AGENTGATE_TEST_CLAUDE_BIN" ]] \
    || { echo "contract: AGENTGATE_TEST_CLAUDE_BIN=$AGENTGATE_TEST_CLAUDE_BIN is not an executable file" >&2; exit 1; }

venv="$out/venv"
bin_dir="$here/node_modules/.bin"

step "installing tools"
bash "$here/install.sh"
export PATH="$venv/bin:$PATH"
# The binary the live checks run: up to date with the tree (a no-op after `cargo test`).
cargo build --locked --quiet --bin agentgate --example mock_anthropic
done_step

step "openapi.yaml is valid OpenAPI 3.1"
openapi-spec-validator openapi.yaml
done_step

step "schemathesis against a live gateway"
gateway_start schemathesis
# streamEvents is left out: its stream stays open until the session closes.
# positive_data_acceptance is off: valid-looking bodies name agents and
# directories that do not exist here, which is a documented 400.
# One worker and no example database keep the run reproducible from the seed.
set +e
(cd "$out" && timeout 300 st run "$root/openapi.yaml" --url "$GW_URL" \
    --seed 20261124 --max-examples 50 --workers 1 --no-shrink \
    --generation-database none --no-color \
    --checks all --exclude-checks positive_data_acceptance \
    --exclude-operation-id streamEvents \
    --request-timeout 20 \
    --report junit --report-junit-path "$out/schemathesis-junit.xml" \
    >"$out/schemathesis.txt" 2>&1)
st_status=$?
set -e
sed -n '/=* SUMMARY =*/,$p' "$out/schemathesis.txt"
if [[ $st_status -ne 0 ]]; then
    echo "schemathesis failed (exit $st_status); full output: $out/schemathesis.txt" >&2
    grep -B2 -A30 -m 5 -E '_{5,}|FAILURES|Error' "$out/schemathesis.txt" >&2 || true
    exit 1
fi
grep -q 'generated, [0-9]* passed' "$out/schemathesis.txt" \
    || { echo "schemathesis ran no test case" >&2; exit 1; }
gateway_stop_all
done_step

token="contract-$RANDOM$RANDOM"

step "examples/curl.sh and examples/httpie.sh against a live gateway (with a token)"
gateway_start examples --token "$token"
AGENTGATE_URL="$GW_URL" AGENTGATE_TOKEN="$token" timeout 120 bash examples/curl.sh >"$out/curl.txt" 2>&1 \
    || { cat "$out/curl.txt"; echo "examples/curl.sh failed" >&2; exit 1; }
AGENTGATE_URL="$GW_URL" AGENTGATE_TOKEN="$token" timeout 120 bash examples/httpie.sh >"$out/httpie.txt" 2>&1 </dev/null \
    || { cat "$out/httpie.txt"; echo "examples/httpie.sh failed" >&2; exit 1; }
expect() { # file, fixed string: the example printed what it promises
    grep -qF -- "$2" "$1" || { cat "$1"; echo "$1 lacks: $2" >&2; exit 1; }
}
expect "$out/curl.txt" 'event:message.delta'
expect "$out/curl.txt" 'event:message.completed'
expect "$out/curl.txt" '"output":"First you said: \"hello, my name is Ada\"\n"'
expect "$out/curl.txt" 'Location: /sessions/'
expect "$out/curl.txt" 'You have sent 2 messages before this one.'
expect "$out/curl.txt" '"status":409'
expect "$out/curl.txt" '"output":"Hello! You said \"hello from oneshot\".'
expect "$out/curl.txt" 'session.closed'
expect "$out/httpie.txt" 'event:message.delta'
expect "$out/httpie.txt" 'First you said: \"hello, my name is Ada\"'
expect "$out/httpie.txt" 'HTTP/1.1 204 No Content'
echo "curl.sh: $(grep -c '^event:' "$out/curl.txt") SSE events; httpie.sh: $(grep -c '^event:' "$out/httpie.txt") SSE events"
python "$here/check_metrics.py" "$GW_URL" "$token"
gateway_stop_all
done_step

step "Python SDK (openapi-python-client): generate, test, run the example"
rm -rf examples/sdk/python/agentgate_client
openapi-python-client generate --path openapi.yaml --meta none \
    --output-path examples/sdk/python/agentgate_client \
    --config "$here/openapi-python-client.yaml" >"$out/python-sdk-generate.txt" 2>&1 \
    || { cat "$out/python-sdk-generate.txt"; exit 1; }
gateway_start sdk --token "$token"
AGENTGATE_URL="$GW_URL" AGENTGATE_TOKEN="$token" \
    python -m pytest -q -p no:cacheprovider "$here/test_sdk_python.py" --junitxml "$out/python-sdk-junit.xml"
AGENTGATE_URL="$GW_URL" AGENTGATE_TOKEN="$token" timeout 60 python examples/sdk/python/chat.py
done_step

step "TypeScript SDK (@hey-api/openapi-ts): generate, type-check, test (SSE), run the example"
rm -rf examples/sdk/typescript/client
"$bin_dir/openapi-ts" -i openapi.yaml -o examples/sdk/typescript/client -c @hey-api/client-fetch \
    --no-log-file --silent
"$bin_dir/tsc" -p "$here/tsconfig.json"
AGENTGATE_URL="$GW_URL" AGENTGATE_TOKEN="$token" timeout 120 "$bin_dir/tsx" --test "$here/sdk.test.ts"
AGENTGATE_URL="$GW_URL" AGENTGATE_TOKEN="$token" timeout 60 "$bin_dir/tsx" examples/sdk/typescript/chat.ts
gateway_stop_all
done_step

step "web console and examples/stream.html in headless Chromium"
# A static server for examples/ on another origin, which the gateway allows by CORS.
: >"$out/static.txt"
python -u -m http.server --bind 127.0.0.1 0 --directory examples >"$out/static.txt" 2>&1 </dev/null &
static_pid=$!
static_port=""
for ((i = 0; i < 200; i++)); do
    static_port="$(sed -n 's/^Serving HTTP on .* port \([0-9]*\) .*/\1/p' "$out/static.txt")"
    [[ -n "$static_port" ]] && break
    kill -0 "$static_pid" 2>/dev/null || { cat "$out/static.txt"; exit 1; }
    sleep 0.05
done
[[ -n "$static_port" ]] || { echo "the static server did not start" >&2; cat "$out/static.txt"; exit 1; }
# The mock Anthropic API: a message starting with `touch ` makes the model
# ask for that Bash command, so the real CLI asks the console for permission.
: >"$out/mock_anthropic.stdout"
"$root/target/debug/examples/mock_anthropic" --bash-on-touch \
    >"$out/mock_anthropic.stdout" 2>"$out/mock_anthropic.log" </dev/null &
mock_pid=$!
mock_url=""
for ((i = 0; i < 200; i++)); do
    mock_url="$(sed -n 's|^mock listening on \(http://[^ ]*\)$|\1|p' "$out/mock_anthropic.stdout")"
    [[ -n "$mock_url" ]] && break
    kill -0 "$mock_pid" 2>/dev/null || { cat "$out/mock_anthropic.log" >&2; exit 1; }
    sleep 0.05
done
[[ -n "$mock_url" ]] || { echo "the mock Anthropic API did not start" >&2; cat "$out/mock_anthropic.log" >&2; exit 1; }
echo "mock Anthropic API: $mock_url (pid $mock_pid, log $out/mock_anthropic.log)"
# The CLI's HOME, TMPDIR and working directory: the files it writes and the
# ones the test's Bash commands touch.
claude_dir="$(mktemp -d "${TMPDIR:-/tmp}/agentgate-contract-claude.XXXXXX")"
mkdir -p "$claude_dir/tmp"
# The console's profiles plus `asker`, the real CLI against the mock.
python3 - "$here/console-profiles.toml" "$out/console-profiles.toml" "$AGENTGATE_TEST_CLAUDE_BIN" \
    "$mock_url" "$claude_dir" <<'PY'
import json, sys
src, dst, claude, mock_url, home = sys.argv[1:]
q = json.dumps  # a JSON string is a TOML basic string
env = {
    "ANTHROPIC_BASE_URL": mock_url,
    "ANTHROPIC_API_KEY": "test-key",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
    "HOME": home,
    "TMPDIR": home + "/tmp",
}
argv = [claude, "-p", "--input-format", "stream-json", "--output-format", "stream-json",
        "--verbose", "--include-partial-messages"]
with open(src) as f:
    text = f.read()
text += "\n# Written by run.sh: the real Claude Code CLI against the mock Anthropic API.\n"
text += "[agents.asker]\n"
text += "command = [" + ", ".join(q(a) for a in argv) + "]\n"
text += 'protocol = "claude-stream-json"\n'
text += "env = { " + ", ".join(f"{k} = {q(v)}" for k, v in env.items()) + " }\n"
text += f"cwd = {q(home)}\n"
text += 'stop_grace = "5s"\n'
with open(dst, "w") as f:
    f.write(text)
PY
gateway_start browser --config "$out/console-profiles.toml" --allow-origin "http://127.0.0.1:$static_port"
rm -f "$out"/console*.png "$out/stream-example.png"
GATEWAY_URL="$GW_URL" EXAMPLES_URL="http://127.0.0.1:$static_port" SCREENSHOTS="$out" CLAUDE_WORKDIR="$claude_dir" \
    timeout 180 node --test "$here/browser.test.mjs"
for shot in console.png console-permissions.png stream-example.png; do
    [[ -s "$out/$shot" ]] || { echo "screenshot $out/$shot is missing" >&2; exit 1; }
done
echo "screenshots: $out/console.png $out/console-permissions.png $out/stream-example.png"
gateway_stop_all
# The console behind credentials: the operator token, and HS256 JWTs.
console_token="console-$RANDOM$RANDOM$RANDOM$RANDOM"
jwt_secret="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
gateway_start console-token --token "$console_token"
token_url="$GW_URL"
gateway_start console-jwt --token "$console_token" --jwt-secret "$jwt_secret"
TOKEN_GATEWAY_URL="$token_url" JWT_GATEWAY_URL="$GW_URL" OPERATOR_TOKEN="$console_token" JWT_SECRET="$jwt_secret" \
    timeout 120 node --test "$here/console-auth.test.mjs"
done_step

printf '\ncontract: all checks passed in %d s\n' "$((SECONDS - started))"
