/**
 * agentgate from TypeScript, through the SDK generated from openapi.yaml
 * with @hey-api/openapi-ts (fetch client, SSE-aware).
 *
 * Generate the client next to this file, then run it against a gateway
 * (`cargo run --release` serves one on :8700):
 *
 *   npx @hey-api/openapi-ts@0.95.0 -i openapi.yaml \
 *       -o examples/sdk/typescript/client -c @hey-api/client-fetch
 *   npx tsx examples/sdk/typescript/chat.ts     # AGENTGATE_URL, AGENTGATE_TOKEN
 *
 * It creates a session, follows the session's event stream
 * (`GET /sessions/{id}/events`, Server-Sent Events) while it sends a
 * message, prints the reply as it streams in, then reads the history and
 * closes the session.
 */
import { client } from "./client/client.gen";
import {
  createSession,
  deleteSession,
  listMessages,
  sendMessage,
  streamEvents,
  type MessageCompletedData,
  type MessageDeltaData,
  type MessageFailedData,
} from "./client";

const url = process.env.AGENTGATE_URL ?? "http://127.0.0.1:8700";
const token = process.env.AGENTGATE_TOKEN ?? "";
const agent = process.env.AGENTGATE_AGENT ?? "demo";

// The token goes in the Authorization header only (the SSE route would
// also take it as ?access_token=, which ends up in URLs and logs).
client.setConfig({ baseUrl: url, auth: (a) => (a.scheme === "bearer" && token ? token : undefined) });

/** One SSE event as the generated client reports it (data is parsed JSON). */
type Event = { event?: string; id?: string; data: unknown };

async function main(): Promise<void> {
  const created = await createSession({ body: { agent, title: "typescript sdk example" } });
  if (created.error) throw new Error(`cannot create a session: ${JSON.stringify(created.error)}`);
  const session = created.data;
  console.log(`session ${session.id} (${session.agent}, ${session.state})`);

  // The event stream replays the session's log from the start, so nothing
  // is missed whether it connects before or after the message is sent.
  const abort = new AbortController();
  const events: Event[] = [];
  const { stream } = await streamEvents({
    path: { id: session.id },
    signal: abort.signal,
    sseMaxRetryAttempts: 1,
    onSseEvent: (e) => events.push(e as Event),
  });

  const sent = await sendMessage({ path: { id: session.id }, body: { content: "hello, my name is Ada" } });
  if (sent.error) throw new Error(`cannot send: ${JSON.stringify(sent.error)}`);
  const messageId = sent.data.id;
  console.log(`message ${messageId} accepted (${sent.response.status}, ${sent.data.status})`);

  process.stdout.write("< ");
  for await (const _ of stream) {
    const e = events[events.length - 1];
    if (e.event === "message.delta" && (e.data as MessageDeltaData).message_id === messageId) {
      process.stdout.write((e.data as MessageDeltaData).text);
    } else if (e.event === "message.completed" && (e.data as MessageCompletedData).message_id === messageId) {
      console.log(`[completed in ${(e.data as MessageCompletedData).duration_ms} ms, event id ${e.id}]`);
      break;
    } else if (e.event === "message.failed" && (e.data as MessageFailedData).message_id === messageId) {
      throw new Error(`the message failed: ${JSON.stringify((e.data as MessageFailedData).error)}`);
    }
  }
  abort.abort();

  const history = await listMessages({ path: { id: session.id } });
  if (history.error) throw new Error(JSON.stringify(history.error));
  console.log(`history: ${history.data.messages.length} message(s)`);
  for (const m of history.data.messages) console.log(`  ${m.status} ${JSON.stringify(m.input)} -> ${JSON.stringify(m.output)}`);

  const closed = await deleteSession({ path: { id: session.id } });
  console.log(`closed (${closed.response.status})`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
