"""A stand-in for `claude -p --input-format stream-json --output-format
stream-json`, for the console test: it asks for a tool permission on every
message (a `can_use_tool` control_request, as the real CLI does with
`--permission-prompt-tool stdio`), waits for the gateway's
control_response, and streams a reply that says what the user decided.

Only the lines agentgate reads are produced: `system`/`init`,
`control_request`, `stream_event` text deltas and `result`.
"""

import json
import sys


def out(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main():
    session = "fake-claude-session"
    n = 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("type") != "user":
            continue
        n += 1
        text = msg["message"]["content"]
        out({"type": "system", "subtype": "init", "session_id": session})
        request_id = f"perm-{n}"
        out({
            "type": "control_request",
            "request_id": request_id,
            "request": {"subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": f"echo {text}"}},
        })
        while True:
            answer = json.loads(sys.stdin.readline())
            if answer.get("type") == "control_response" and answer["response"]["request_id"] == request_id:
                decision = answer["response"]["response"]
                break
        if decision["behavior"] == "allow":
            words = ["permission", " allowed:", " ran", f" {decision['updatedInput']['command']}"]
        else:
            words = ["permission", " denied:", f" {decision['message']}"]
        for w in words:
            out({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": w}}})
        out({"type": "result", "subtype": "success", "is_error": False, "result": "".join(words),
             "session_id": session, "usage": {"input_tokens": 1, "output_tokens": len(words)}})


if __name__ == "__main__":
    main()
