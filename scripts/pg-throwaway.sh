#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: Debian's `postgresql`
# (installed when missing), a new cluster in a temp dir, a free loopback
# port, run as the `postgres` user when we are root (the server refuses root).
#
#   bash scripts/pg-throwaway.sh start   # prints DIR, then the URL, one per line
#   bash scripts/pg-throwaway.sh stop DIR
set -euo pipefail

log() { printf 'pg-throwaway: %s\n' "$*" >&2; }
bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
as_server_user() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
    bin="$(bin_dir)"
    if [[ -z "$bin" ]]; then
        log "installing postgresql from Debian"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        bin="$(bin_dir)"
    fi
    [[ -n "$bin" ]] || { log "no PostgreSQL server binaries after install"; exit 1; }
    dir="$(mktemp -d /tmp/agentgate-pg.XXXXXX)"
    chmod 755 "$dir"
    [[ "$(id -u)" == 0 ]] && chown postgres: "$dir"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    as_server_user "$bin/initdb" -D "$dir/data" -A trust -U agentgate --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_server_user "$bin/createdb" -h 127.0.0.1 -p "$port" -U agentgate agentgate >&2
    log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($dir)"
    printf '%s\npostgres://agentgate@127.0.0.1:%s/agentgate\n' "$dir" "$port"
    ;;
stop)
    dir="${2:?stop needs the directory start printed}"
    bin="$(bin_dir)"
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
