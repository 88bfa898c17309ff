# Sourced by the contract scripts: start real agentgate binaries on
# 127.0.0.1 with an ephemeral port and always stop them.
#
#   source scripts/contract/gateway.sh
#   gateway_start NAME [agentgate flags…]   # sets GW_URL; logs in $CONTRACT_OUT/NAME.log
#   gateway_stop_all                        # SIGTERM each, wait (also run on EXIT)
#
# The binary is $AGENTGATE_BIN, or target/debug/agentgate (built by
# `cargo test`; run.sh builds it when it is missing). The claude profile is
# kept out (AGENTGATE_CLAUDE_BIN points nowhere): these checks drive the
# built-in demo agent and the profiles they pass.

CONTRACT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONTRACT_OUT="${CONTRACT_OUT:-$CONTRACT_ROOT/target/contract}"
AGENTGATE_BIN="${AGENTGATE_BIN:-$CONTRACT_ROOT/target/debug/agentgate}"
GATEWAY_PIDS=()
mkdir -p "$CONTRACT_OUT"

gateway_start() {
    local name="$1"
    shift
    local out="$CONTRACT_OUT/$name.stdout" log="$CONTRACT_OUT/$name.log"
    [[ -x "$AGENTGATE_BIN" ]] || { echo "gateway: no binary at $AGENTGATE_BIN" >&2; return 1; }
    # Emptied here, not by the child's redirection: the poll below must not
    # read a previous run's address.
    : >"$out"
    : >"$log"
    # Sealed: no real agent, and no store in the runner's HOME.
    AGENTGATE_CLAUDE_BIN=/nonexistent/claude \
    AGENTGATE_GEMINI_BIN=/nonexistent/gemini \
    AGENTGATE_CODEX_ACP_BIN=/nonexistent/codex-acp \
    AGENTGATE_STORE=memory \
        "$AGENTGATE_BIN" --listen 127.0.0.1:0 "$@" >"$out" 2>"$log" </dev/null &
    local pid=$!
    GATEWAY_PIDS+=("$pid")
    # The first stdout line says where it listens: poll for it (≤ 10 s).
    local i
    for ((i = 0; i < 200; i++)); do
        if GW_URL="$(sed -n 's|^agentgate listening on \(http://[^ ]*\).*|\1|p' "$out")" && [[ -n "$GW_URL" ]]; then
            echo "gateway $name: $GW_URL (pid $pid, log $log)"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "gateway $name exited before listening:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "gateway $name did not report its address within 10 s" >&2
    cat "$log" >&2
    return 1
}

gateway_stop_all() {
    local pid i
    for pid in "${GATEWAY_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # SIGTERM ends every child's process group; give it 10 s, then SIGKILL.
    for pid in "${GATEWAY_PIDS[@]}"; do
        for ((i = 0; i < 200; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    GATEWAY_PIDS=()
}
