#!/usr/bin/env bash
# Several agentgate nodes on one machine behind nginx, sharing one
# PostgreSQL store: the one-machine recipe of deploy/README.md.
#
#   bash deploy/cluster.sh [N] [-- EXTRA NODE FLAGS...]
#   bash deploy/cluster.sh 3 -- --config agents.toml
#
# - the store: $AGENTGATE_STORE (a postgres:// URL) when set, else a
#   throwaway PostgreSQL (scripts/pg-throwaway.sh, removed on exit);
# - N nodes (default 3): $AGENTGATE_BIN, else target/release/agentgate
#   (built with `cargo build --release` when missing), each with
#   `--store URL --node-id nodeK --listen 127.0.0.1:PORT`, logs in the run
#   directory printed at start;
# - nginx in front (scripts/nginx-throwaway.sh hash: consistent hash on the
#   session id in the path); its URL is the last line printed.
#
# Ctrl-C or SIGTERM stops everything: nginx, the nodes (SIGTERM: each
# suspends its sessions and exits), the throwaway PostgreSQL.
# Every node runs as you with your HOME, so claude transcripts (~/.claude)
# are shared by all of them, as a cluster needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

n=3
if [[ $# -gt 0 && "$1" != "--" ]]; then n="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
extra=("$@")
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N] [-- NODE FLAGS...]" >&2; exit 2; }

log() { printf 'cluster: %s\n' "$*" >&2; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

run="$(mktemp -d /tmp/agentgate-cluster.XXXXXX)"
pg_dir="" nginx_dir=""
pids=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    # A second Ctrl-C or TERM must not cut the clean-up short (it would
    # leave nodes and PostgreSQL running).
    trap - EXIT
    trap '' INT TERM
    log "stopping"
    [[ -n "$nginx_dir" ]] && bash scripts/nginx-throwaway.sh stop "$nginx_dir"
    if (( ${#pids[@]} )); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        # The nodes end their children and exit; give them the systemd
        # unit's 30 s, then kill what is left.
        for _ in $(seq 1 300); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    [[ -n "$pg_dir" ]] && bash scripts/pg-throwaway.sh stop "$pg_dir"
    log "node logs kept in $run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bin="${AGENTGATE_BIN:-target/release/agentgate}"
if [[ ! -x "$bin" ]]; then
    log "building $bin"
    cargo build --release >&2
fi

store="${AGENTGATE_STORE:-}"
if [[ -z "$store" ]]; then
    pg_out="$(bash scripts/pg-throwaway.sh start)"
    pg_dir="$(head -n 1 <<<"$pg_out")"
    store="$(tail -n 1 <<<"$pg_out")"
fi
[[ "$store" == postgres://* || "$store" == postgresql://* ]] \
    || log "warning: AGENTGATE_STORE is not a postgres:// URL; nodes do not share a sqlite: or memory store"

upstreams=()
for k in $(seq 1 "$n"); do
    port="$(free_port)"
    "$bin" --store "$store" --node-id "node$k" --listen "127.0.0.1:$port" "${extra[@]}" \
        >"$run/node$k.log" 2>&1 &
    pids+=("$!")
    upstreams+=("127.0.0.1:$port")
done
# Ready: /healthz answers (it reports the store). Bounded: a node that
# cannot start shows its log.
for k in $(seq 1 "$n"); do
    addr="${upstreams[$((k - 1))]}"
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null "http://$addr/healthz" 2>/dev/null && break
        kill -0 "${pids[$((k - 1))]}" 2>/dev/null || break
        sleep 0.1
    done
    curl -fsS -o /dev/null "http://$addr/healthz" 2>/dev/null \
        || { log "node$k did not come up:"; tail -n 20 "$run/node$k.log" >&2; exit 1; }
    log "node$k on http://$addr (log: $run/node$k.log)"
done

nginx_out="$(bash scripts/nginx-throwaway.sh start hash "${upstreams[@]}")"
nginx_dir="$(head -n 1 <<<"$nginx_out")"
url="$(tail -n 1 <<<"$nginx_out")"
log "$n nodes on $store behind nginx ($nginx_dir); Ctrl-C stops everything"
echo "$url"

# Until a signal. A node that dies (kill -9 one to watch a failover) is
# reported and the others go on; the recipe ends when none is left.
while true; do
    live=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && live+=("$p"); done
    (( ${#live[@]} )) || break
    wait -n "${live[@]}" || true
    still=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && still=$((still + 1)); done
    log "a node exited; $still still run (logs in $run)"
done
log "no node left"
exit 1
