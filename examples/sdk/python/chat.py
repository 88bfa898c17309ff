"""agentgate from Python, through the SDK generated from openapi.yaml.

Generate the client (openapi-python-client, from PyPI) next to this file,
then run it against a gateway (`cargo run --release` serves one on :8700):

    pip install openapi-python-client==0.29.1
    openapi-python-client generate --path openapi.yaml --meta none \
        --output-path examples/sdk/python/agentgate_client \
        --config scripts/contract/openapi-python-client.yaml
    python3 examples/sdk/python/chat.py            # AGENTGATE_URL, AGENTGATE_TOKEN

It creates a session of the `demo` agent (or the one named by
AGENTGATE_AGENT), sends two messages and waits for each reply
(`?wait=true`), prints the history and closes the session.
"""

import os
import sys

from agentgate_client import AuthenticatedClient
from agentgate_client.api.messages import list_messages, send_message
from agentgate_client.api.sessions import create_session, delete_session
from agentgate_client.models import CreateSession, Message, Problem, SendMessage, Session


def main() -> int:
    url = os.environ.get("AGENTGATE_URL", "http://127.0.0.1:8700")
    # Without --token on the gateway any token (even empty) is accepted.
    client = AuthenticatedClient(base_url=url, token=os.environ.get("AGENTGATE_TOKEN", ""))
    agent = os.environ.get("AGENTGATE_AGENT", "demo")

    with client as c:
        session = create_session.sync(client=c, body=CreateSession(agent=agent, title="python sdk example"))
        if not isinstance(session, Session):
            print(f"cannot create a session: {session}", file=sys.stderr)
            return 1
        print(f"session {session.id} ({session.agent}, {session.state.value})")

        for text in ["hello, my name is Ada", "what did I say first?"]:
            reply = send_message.sync(session.id, client=c, body=SendMessage(content=text), wait=True)
            if isinstance(reply, Problem):
                print(f"{reply.status} {reply.title}: {reply.detail}", file=sys.stderr)
                return 1
            assert isinstance(reply, Message)
            print(f"> {text}\n< {reply.output.strip()}  [{reply.status.value}, {reply.duration_ms} ms]")

        history = list_messages.sync(session.id, client=c)
        print(f"history: {len(history.messages)} messages")
        for m in history.messages:
            print(f"  {m.created_at:%H:%M:%S} {m.status.value:<9} {m.input_!r}")

        delete_session.sync_detailed(session.id, client=c)
        print("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
