/**
 * The TypeScript SDK generated from openapi.yaml (@hey-api/openapi-ts, fetch
 * client) drives a real gateway, reply streamed over SSE.
 *
 * run.sh generates the client into examples/sdk/typescript/client and starts
 * a gateway with a token (AGENTGATE_URL, AGENTGATE_TOKEN). Run with
 * `tsx --test`; a missing client or gateway fails, never skips.
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { client } from "../../examples/sdk/typescript/client/client.gen";
import {
  createSession,
  deleteSession,
  getSession,
  listAgents,
  listMessages,
  sendMessage,
  streamEvents,
  type Message,
  type MessageCompletedData,
  type MessageDeltaData,
  type Problem,
} from "../../examples/sdk/typescript/client";

const url = process.env.AGENTGATE_URL;
const token = process.env.AGENTGATE_TOKEN;
assert.ok(url && token, "AGENTGATE_URL and AGENTGATE_TOKEN must be set (run.sh sets them)");
client.setConfig({ baseUrl: url, auth: (a) => (a.scheme === "bearer" ? token : undefined) });

type Event = { event?: string; id?: string; data: any };

/** Collects SSE events from `start` until `done` says stop, or 30 s pass. */
async function collect(
  start: (onSseEvent: (e: unknown) => void, signal: AbortSignal) => Promise<{ stream: AsyncGenerator<unknown> }>,
  done: (e: Event) => boolean,
): Promise<Event[]> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 30_000);
  const events: Event[] = [];
  try {
    const { stream } = await start((e) => events.push(e as Event), abort.signal);
    for await (const _ of stream) {
      if (done(events[events.length - 1])) break;
    }
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
  return events;
}

async function newSession(): Promise<string> {
  const { data, error, response } = await createSession({ body: { agent: "demo" } });
  assert.equal(response.status, 201, JSON.stringify(error));
  assert.equal(response.headers.get("location"), `/sessions/${data!.id}`);
  return data!.id;
}

test("a message's reply streams over the session's event stream, then shows in the history", async () => {
  const agents = await listAgents();
  assert.ok(agents.data!.agents.some((a) => a.name === "demo"));
  const id = await newSession();
  let messageId = "";
  const events = await collect(
    async (onSseEvent, signal) => {
      const opened = await streamEvents({ path: { id }, signal, sseMaxRetryAttempts: 1, onSseEvent });
      const sent = await sendMessage({ path: { id }, body: { content: "hello, my name is Ada" } });
      assert.equal(sent.response.status, 202);
      messageId = (sent.data as Message).id;
      return opened;
    },
    (e) => e.event === "message.completed" && e.data.message_id === messageId,
  );
  // Ids only grow; the message went queued → started → deltas → completed.
  const ids = events.filter((e) => e.id !== undefined).map((e) => Number(e.id));
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
  assert.equal(new Set(ids).size, ids.length);
  const mine = events.filter((e) => e.data && e.data.message_id === messageId).map((e) => e.event);
  assert.equal(mine[0], "message.queued");
  assert.equal(mine[1], "message.started");
  assert.equal(mine[mine.length - 1], "message.completed");
  const deltas = events.filter((e) => e.event === "message.delta" && e.data.message_id === messageId);
  assert.ok(deltas.length >= 3, `the reply came in pieces: ${deltas.length}`);
  const completed = events[events.length - 1].data as MessageCompletedData;
  assert.equal(deltas.map((e) => (e.data as MessageDeltaData).text).join(""), completed.output);
  assert.match(completed.output, /my name is Ada/);

  const history = await listMessages({ path: { id } });
  assert.deepEqual(
    history.data!.messages.map((m) => [m.id, m.input, m.status, m.output]),
    [[messageId, "hello, my name is Ada", "completed", completed.output]],
  );
  const closed = await deleteSession({ path: { id } });
  assert.equal(closed.response.status, 204);
});

test("POST …/messages with Accept: text/event-stream is a stream that ends with its message", async () => {
  const id = await newSession();
  const events = await collect(
    (onSseEvent, signal) =>
      client.sse.post({
        url: "/sessions/{id}/messages",
        path: { id },
        body: { content: "what did I say first?" },
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        security: [{ scheme: "bearer", type: "http" }],
        signal,
        sseMaxRetryAttempts: 1,
        onSseEvent,
      }),
    () => false, // the server ends the stream by itself
  );
  const names = events.filter((e) => e.event).map((e) => e.event);
  assert.equal(names[names.length - 1], "message.completed");
  assert.equal(events[events.length - 1].data.output, "You have not said anything before this.\n");
  assert.equal(new Set(events.filter((e) => e.event).map((e) => e.data.message_id)).size, 1);
  await deleteSession({ path: { id } });
});

test("the event stream resumes after Last-Event-ID", async () => {
  const id = await newSession();
  const sent = await sendMessage({ path: { id }, body: { content: "count" }, query: { wait: true } });
  assert.equal((sent.data as Message).status, "completed");
  const all = await collect(
    (onSseEvent, signal) => streamEvents({ path: { id }, signal, sseMaxRetryAttempts: 1, onSseEvent }),
    (e) => e.event === "message.completed",
  );
  const last = Number(all[all.length - 1].id);
  const tail = await collect(
    (onSseEvent, signal) =>
      streamEvents({ path: { id }, headers: { "Last-Event-ID": last - 2 }, signal, sseMaxRetryAttempts: 1, onSseEvent }),
    (e) => Number(e.id) === last,
  );
  assert.deepEqual(
    tail.filter((e) => e.id !== undefined).map((e) => Number(e.id)),
    [last - 1, last],
  );
  await deleteSession({ path: { id } });
});

test("errors come back as problems", async () => {
  const missing = await getSession({ path: { id: "00000000-0000-4000-8000-000000000000" } });
  assert.equal(missing.response.status, 404);
  assert.equal((missing.error as Problem).status, 404);
  const bad = await createSession({ body: { agent: "no-such-agent" } });
  assert.equal(bad.response.status, 400);
  assert.match((bad.error as Problem).detail, /no-such-agent/);
  const denied = await listAgents({ auth: () => "wrong" });
  assert.equal(denied.response.status, 401);
});
