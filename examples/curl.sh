#!/usr/bin/env bash
# agentgate from curl: profiles, a session, a streamed reply (SSE), a reply
# waited for, fire-and-forget + polling, history, the session's event log
# replayed, a problem+json error, a one-shot run, metrics, and closing.
#
#   cargo run --release            # in another terminal: the gateway on :8700
#   bash examples/curl.sh          # or: bash examples/curl.sh python
#
# AGENTGATE_URL (default http://127.0.0.1:8700) and AGENTGATE_TOKEN (when
# the gateway runs with --token) are read from the environment; the first
# argument picks the agent profile (default: demo). Needs curl only.
set -euo pipefail

url="${AGENTGATE_URL:-http://127.0.0.1:8700}"
agent="${1:-demo}"
auth=()
if [[ -n "${AGENTGATE_TOKEN:-}" ]]; then
    auth=(-H "Authorization: Bearer $AGENTGATE_TOKEN")
fi
json=(-H 'Content-Type: application/json')
# -sS: quiet but show errors; --fail-with-body: a 4xx/5xx fails the script
# and still prints the problem+json that says why.
c() { curl -sS --fail-with-body "${auth[@]}" "$@"; }
say() { printf '\n### %s\n' "$*"; }
# The first "id" of a JSON object (the Session and Message put theirs first).
first_id() { grep -o '"id":"[^"]*"' | head -n 1 | cut -d'"' -f4; }

say "profiles (GET /agents)"
c "$url/agents"
echo

say "create a $agent session (POST /sessions)"
session="$(c "${json[@]}" -d "{\"agent\":\"$agent\",\"title\":\"curl example\"}" "$url/sessions")"
echo "$session"
id="$(first_id <<<"$session")"

say "stream a reply: Accept: text/event-stream (ends after message.completed)"
c -N -H 'Accept: text/event-stream' "${json[@]}" \
    -d '{"content":"hello, my name is Ada"}' "$url/sessions/$id/messages"

say "wait for a reply as JSON (?wait=true)"
c "${json[@]}" -d '{"content":"what did I say first?"}' "$url/sessions/$id/messages?wait=true"
echo

say "fire and forget: 202 + Location, then poll the message"
headers="$(mktemp)"
trap 'rm -f "$headers" "${events:-}"' EXIT
c -D "$headers" "${json[@]}" -d '{"content":"how many messages did I send?"}' "$url/sessions/$id/messages"
echo
location="$(tr -d '\r' <"$headers" | sed -n 's/^[Ll]ocation: //p')"
echo "Location: $location"
for _ in $(seq 100); do
    message="$(c "$url$location")"
    grep -q '"status":"\(queued\|running\)"' <<<"$message" || break
    sleep 0.1
done
echo "$message"

say "history, oldest first (GET /sessions/{id}/messages)"
c "$url/sessions/$id/messages?limit=10"
echo

say "errors are problem+json: interrupt with nothing running is 409"
curl -sS "${auth[@]}" -X POST "$url/sessions/$id/interrupt"
echo

say "one process for one request (POST /oneshot)"
c "${json[@]}" -d "{\"content\":\"hello from oneshot\",\"agent\":\"$agent\"}" "$url/oneshot"
echo

say "metrics (GET /metrics, OpenMetrics text)"
c "$url/metrics" | grep -E '^agentgate_(messages_total|sessions)\{' | grep -v ' 0$' || true

say "the session's event log, replayed from the start, then live; closing the session ends it"
events="$(mktemp)"
curl -sS -N "${auth[@]}" "$url/sessions/$id/events" >"$events" &
reader=$!
# The stream's first item is a retry: hint; once it is there the stream is open.
for _ in $(seq 100); do
    grep -q '^retry:' "$events" && break
    sleep 0.05
done
c -X DELETE "$url/sessions/$id"
wait "$reader"
# One line per event: its id and name (the data lines are left out here).
awk -F: '/^event:/ { name = $2 } /^id:/ { print "  " $2 " " name }' "$events"
echo "(session $id closed)"
