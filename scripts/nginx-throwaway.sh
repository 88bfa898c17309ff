#!/usr/bin/env bash
# A throwaway nginx in front of agentgate nodes, for the tests and the
# one-machine cluster recipe (deploy/cluster.sh): Debian's `nginx`
# (installed when missing, never started as a system service), a config in
# a new temp dir (pid file, logs and every *_temp_path in it), a free
# loopback port. The settings are those of deploy/nginx.conf, which says why
# each is there.
#
#   bash scripts/nginx-throwaway.sh install               # only install nginx
#   bash scripts/nginx-throwaway.sh start MODE HOST:PORT...  # prints DIR, then the URL
#   bash scripts/nginx-throwaway.sh stop DIR
#
# MODE `hash`: consistent hash on the session id in the path (the node that
# has a session's child gets its requests); `rr`: round robin, no affinity.
#
# Host: nginx passes the client's Host on (`$http_host`). Here that is
# 127.0.0.1:PORT, a loopback address every node allows; in production give
# the nodes `--allowed-host` with the public name (deploy/nginx.conf).
set -euo pipefail

log() { printf 'nginx-throwaway: %s\n' "$*" >&2; }
nginx_bin() { command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true; }

# Installs Debian's nginx without starting the system service: apt's
# maintainer scripts ask invoke-rc.d / deb-systemd-invoke, which ask
# /usr/sbin/policy-rc.d; exit 101 there means "do not start". Ours is put in
# place only for the install and only when the machine has none (Docker
# images ship one that already says 101). On a machine that boots with
# systemd, the package still enables nginx.service for the next boot
# (`systemctl disable nginx` if that is not wanted); CI containers never boot.
install_nginx() {
    [[ -n "$(nginx_bin)" ]] && return 0
    [[ "$(id -u)" == 0 ]] || { log "nginx is missing and installing it needs root: apt-get install nginx"; exit 1; }
    log "installing nginx from Debian (the system service is not started)"
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# agentgate scripts/nginx-throwaway.sh: no service starts during this install\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        ours=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq >&2
    # nginx-light would do too; `nginx` is the package every Debian has.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends nginx >&2
    if (( ours )); then rm -f "$policy"; trap - EXIT; fi
    [[ -n "$(nginx_bin)" ]] || { log "no nginx binary after install"; exit 1; }
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() { # write_config DIR PORT MODE UPSTREAM...
    local dir="$1" port="$2" mode="$3"
    shift 3
    local balance servers="" u
    # shellcheck disable=SC2016  # an nginx variable, written as it is
    case "$mode" in
    hash) balance='hash $agentgate_session consistent;' ;;
    rr) balance='# round robin: no affinity' ;;
    *) log "MODE is hash or rr, not $mode"; exit 2 ;;
    esac
    for u in "$@"; do servers+="        server $u max_fails=1 fail_timeout=10s;"$'\n'; done
    local user_line="# not root: workers run as the caller"
    [[ "$(id -u)" == 0 ]] && user_line="user nobody nogroup;"
    cat >"$dir/nginx.conf" <<EOF
# scripts/nginx-throwaway.sh $mode: see deploy/nginx.conf for why each setting is there.
$user_line
daemon on;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log info;

events { worker_connections 1024; }

http {
    access_log $dir/access.log combined;
    client_body_temp_path $dir/client_body_temp;
    proxy_temp_path $dir/proxy_temp;
    fastcgi_temp_path $dir/fastcgi_temp;
    uwsgi_temp_path $dir/uwsgi_temp;
    scgi_temp_path $dir/scgi_temp;

    map \$uri \$agentgate_session {
        "~^/sessions/(?<sid>[0-9a-fA-F-]{36})(/|\$)" \$sid;
        default \$request_id;
    }

    upstream agentgate {
        $balance
${servers}        keepalive 16;
        keepalive_timeout 5s;
    }

    server {
        listen 127.0.0.1:$port;
        client_max_body_size 16m;
        gzip off;

        location / {
            proxy_pass http://agentgate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_buffering off;
            proxy_cache off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
        }
    }
}
EOF
}

case "${1:-}" in
install)
    install_nginx
    ;;
start)
    mode="${2:?start needs MODE (hash or rr)}"
    shift 2
    (( $# > 0 )) || { log "start needs at least one upstream HOST:PORT"; exit 2; }
    install_nginx
    bin="$(nginx_bin)"
    dir="$(mktemp -d /tmp/agentgate-nginx.XXXXXX)"
    # Workers (nobody when we are root) must reach the temp dirs in it.
    chmod 755 "$dir"
    port="$(free_port)"
    write_config "$dir" "$port" "$mode" "$@"
    # -e: the error log before the config is read (else /var/log/nginx,
    # which a non-root caller cannot open); -p: relative paths live in DIR.
    "$bin" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" -t -q 2>"$dir/check.log" \
        || { cat "$dir/check.log" >&2; exit 1; }
    "$bin" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" >&2 \
        || { cat "$dir/error.log" >&2; exit 1; }
    # `daemon on`: nginx returns once its master has bound the port and
    # written its pid; check it anyway, with a bound.
    for _ in $(seq 1 100); do
        [[ -s "$dir/nginx.pid" ]] && break
        sleep 0.05
    done
    [[ -s "$dir/nginx.pid" ]] || { log "nginx wrote no pid file"; cat "$dir/error.log" >&2; exit 1; }
    log "nginx $("$bin" -v 2>&1 | sed 's|.*/||') ($mode) on 127.0.0.1:$port -> $* ($dir)"
    printf '%s\nhttp://127.0.0.1:%s\n' "$dir" "$port"
    ;;
stop)
    dir="${2:?stop needs the directory start printed}"
    if [[ -s "$dir/nginx.pid" ]]; then
        pid="$(cat "$dir/nginx.pid")"
        # TERM: fast shutdown (open event streams are cut; clients reconnect).
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    case "$dir" in /tmp/agentgate-nginx.*) rm -rf "$dir" ;; esac
    ;;
*)
    echo "usage: $0 install | start hash|rr HOST:PORT... | stop DIR" >&2
    exit 2
    ;;
esac
