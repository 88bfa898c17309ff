"""The Python SDK generated from openapi.yaml drives a real gateway.

run.sh generates the client into examples/sdk/python/agentgate_client and
starts a gateway with a token; AGENTGATE_URL and AGENTGATE_TOKEN say where.
A missing client or gateway is an error here, never a skip.
"""

import os
import sys
import time
from pathlib import Path
from uuid import UUID, uuid4

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "sdk" / "python"))

from agentgate_client import AuthenticatedClient  # noqa: E402
from agentgate_client.api.agents import list_agents  # noqa: E402
from agentgate_client.api.messages import get_message, list_messages, send_message  # noqa: E402
from agentgate_client.api.sessions import create_session, delete_session, get_session  # noqa: E402
from agentgate_client.models import (  # noqa: E402
    CreateSession,
    Message,
    MessageStatus,
    Problem,
    SendMessage,
    Session,
    SessionState,
)

URL = os.environ["AGENTGATE_URL"]
TOKEN = os.environ["AGENTGATE_TOKEN"]


def client(token: str = TOKEN) -> AuthenticatedClient:
    return AuthenticatedClient(base_url=URL, token=token, raise_on_unexpected_status=True)


def test_a_session_answers_waited_messages_and_keeps_their_history():
    with client() as c:
        agents = list_agents.sync(client=c)
        assert "demo" in [a.name for a in agents.agents]

        created = create_session.sync_detailed(client=c, body=CreateSession(agent="demo", title="sdk"))
        assert created.status_code == 201
        session = created.parsed
        assert isinstance(session, Session)
        assert created.headers["location"] == f"/sessions/{session.id}"
        assert session.state in (SessionState.IDLE, SessionState.STARTING)
        assert session.title == "sdk"

        first = send_message.sync(session.id, client=c, body=SendMessage(content="hello, my name is Ada"), wait=True)
        assert isinstance(first, Message), first
        assert first.status == MessageStatus.COMPLETED
        assert "my name is Ada" in first.output
        second = send_message.sync(session.id, client=c, body=SendMessage(content="what did I say first?"), wait=True)
        assert isinstance(second, Message), second
        # The same child answered: it remembers the first message.
        assert second.output == 'First you said: "hello, my name is Ada"\n'

        history = list_messages.sync(session.id, client=c)
        assert [m.input_ for m in history.messages] == ["hello, my name is Ada", "what did I say first?"]
        assert [m.id for m in history.messages] == [first.id, second.id]
        assert all(m.status == MessageStatus.COMPLETED for m in history.messages)
        after_first = list_messages.sync(session.id, client=c, after=first.id)
        assert [m.id for m in after_first.messages] == [second.id]

        assert delete_session.sync_detailed(session.id, client=c).status_code == 204
        gone = get_session.sync(session.id, client=c)
        assert isinstance(gone, Problem) and gone.status == 404


def test_a_message_sent_without_waiting_is_accepted_then_polled_to_its_end():
    with client() as c:
        session = create_session.sync(client=c, body=CreateSession(agent="demo"))
        accepted = send_message.sync_detailed(session.id, client=c, body=SendMessage(content="count"))
        assert accepted.status_code == 202
        message = accepted.parsed
        assert message.status in (MessageStatus.QUEUED, MessageStatus.RUNNING)
        assert accepted.headers["location"] == f"/sessions/{session.id}/messages/{message.id}"
        deadline = time.monotonic() + 30
        while True:
            m = get_message.sync(session.id, message.id, client=c)
            if m.status not in (MessageStatus.QUEUED, MessageStatus.RUNNING):
                break
            assert time.monotonic() < deadline, f"still {m.status} after 30 s"
            time.sleep(0.05)
        assert m.status == MessageStatus.COMPLETED
        assert m.output == "You have sent 0 messages before this one.\n"
        assert delete_session.sync_detailed(session.id, client=c).status_code == 204


def test_errors_come_back_as_problems():
    with client() as c:
        bad = create_session.sync_detailed(client=c, body=CreateSession(agent="no-such-agent"))
        assert bad.status_code == 400
        assert isinstance(bad.parsed, Problem)
        assert "no-such-agent" in bad.parsed.detail
        missing = get_session.sync(UUID(str(uuid4())), client=c)
        assert isinstance(missing, Problem) and missing.status == 404
    with client(token="wrong") as c:
        denied = list_agents.sync_detailed(client=c)
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"].startswith("Bearer")
