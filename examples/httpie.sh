#!/usr/bin/env bash
# agentgate from HTTPie (https://httpie.io, `pip install httpie`): a session,
# a streamed reply, a reply waited for, history, a one-shot run, closing.
#
#   cargo run --release            # in another terminal: the gateway on :8700
#   bash examples/httpie.sh        # or: bash examples/httpie.sh python
#
# AGENTGATE_URL (default http://127.0.0.1:8700) and AGENTGATE_TOKEN (when
# the gateway runs with --token) are read from the environment; the first
# argument picks the agent profile (default: demo).
set -euo pipefail

url="${AGENTGATE_URL:-http://127.0.0.1:8700}"
agent="${1:-demo}"
# --ignore-stdin: never wait for a body on stdin (scripts, CI);
# --check-status: a 4xx/5xx fails the script (after printing the problem+json).
opts=(--ignore-stdin --check-status --print=b)
if [[ -n "${AGENTGATE_TOKEN:-}" ]]; then
    opts+=(--auth-type=bearer --auth="$AGENTGATE_TOKEN")
fi
say() { printf '\n### %s\n' "$*"; }

say "profiles"
http "${opts[@]}" GET "$url/agents"

say "create a $agent session"
session="$(http "${opts[@]}" POST "$url/sessions" agent="$agent" title="httpie example")"
echo "$session"
id="$(grep -o '"id": *"[^"]*"' <<<"$session" | head -n 1 | cut -d'"' -f4)"

say "stream a reply (SSE; --stream prints each event as it arrives)"
http "${opts[@]}" --stream POST "$url/sessions/$id/messages" \
    Accept:text/event-stream content='hello, my name is Ada'

say "wait for the reply as JSON (?wait=true)"
http "${opts[@]}" POST "$url/sessions/$id/messages" wait==true content='what did I say first?'

say "history, oldest first"
http "${opts[@]}" GET "$url/sessions/$id/messages" limit==10

say "one process for one request"
http "${opts[@]}" POST "$url/oneshot" content='hello from oneshot' agent="$agent"

say "close the session"
http "${opts[@]}" --print=h DELETE "$url/sessions/$id"
