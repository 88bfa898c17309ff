//! The Agent Client Protocol (ACP): JSON-RPC 2.0, one message per line, over
//! the child's stdio. The gateway is the ACP *client*; the child is the agent
//! (gemini-cli `--acp`, `codex-acp`, `claude-code-acp`, any other).
//!
//! Unlike the other protocols the gateway speaks first: [`Adapter::start`]
//! writes `initialize`; its answer is followed by `session/load` (when the
//! agent offers `loadSession` and a conversation id is known) or
//! `session/new`; the child is ready when that answers. A message is one
//! `session/prompt` (its text and image blocks as ACP content blocks; images
//! only to an agent that advertised `promptCapabilities.image`); its result
//! ends the reply. Requests from the agent are
//! answered: `session/request_permission` is relayed to the client, every
//! other request gets a JSON-RPC error at once (a refused agent carries on, a
//! silent one hangs).
//!
//! The messages are hand-written `serde_json` values rather than the
//! `agent-client-protocol` crate's types: the crate's connection machinery
//! owns the child's pipes and runs its own tasks, which our process layer
//! already does, and this adapter reads only a handful of fields while
//! forwarding every notification verbatim — strict typed parsing would only
//! add ways for a newer agent's message to be dropped. The facts relied on
//! are checked against the pinned agents in `docs/acp-notes.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::{json, Value};

use super::{Adapter, Outcome, Signal};
use crate::content::Content;
use crate::model::{FailureCode, PermissionBehavior, PermissionDecision};

/// The ACP protocol version this client speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// JSON-RPC "method not found".
const METHOD_NOT_FOUND: i64 = -32601;

/// What one of our requests was for, so its response can be acted on.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Initialize,
    NewSession,
    /// Loading this conversation.
    LoadSession(String),
    Prompt,
}

/// A permission request from the agent that awaits the user's answer.
#[derive(Debug, Clone)]
struct Asked {
    /// The JSON-RPC id exactly as the agent sent it (number or string).
    rpc_id: Value,
    options: Vec<Value>,
}

/// Adapter for an ACP agent.
#[derive(Debug, Default)]
pub struct Acp {
    lines: super::jsonl::LineSplitter,
    next_id: u64,
    calls: HashMap<u64, Call>,
    cwd: PathBuf,
    /// The conversation to load once the agent is initialised.
    resume: Option<String>,
    session_id: Option<String>,
    /// The agent's `initialize` answer advertised
    /// `promptCapabilities.image`: prompts may carry image blocks.
    takes_images: bool,
    /// Permission requests by the id the client answers with.
    asked: HashMap<String, Asked>,
}

impl Acp {
    /// Adapter for a persistent child.
    pub fn new() -> Acp {
        Acp::default()
    }

    /// A request line for `method`, remembering what it was for.
    fn request(&mut self, call: Call, method: &str, params: Value) -> Bytes {
        self.next_id += 1;
        self.calls.insert(self.next_id, call);
        line(&json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}))
    }

    /// A `session/prompt` request with these content blocks.
    fn prompt(&mut self, blocks: Vec<Value>) -> Bytes {
        let params = json!({"sessionId": self.session_id, "prompt": blocks});
        self.request(Call::Prompt, "session/prompt", params)
    }

    fn new_session(&mut self) -> Bytes {
        let params = json!({"cwd": self.cwd, "mcpServers": []});
        self.request(Call::NewSession, "session/new", params)
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Signal>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let msg: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                let shown = String::from_utf8_lossy(&line[..line.len().min(200)]);
                tracing::warn!(error = %e, line = %shown, "protocol error: stdout line is not JSON-RPC");
                return;
            }
        };
        let method = msg.get("method").and_then(Value::as_str);
        let id = msg.get("id").filter(|id| !id.is_null());
        match (method, id) {
            (Some(method), Some(id)) => self.agent_request(method, id.clone(), &msg, out),
            (Some(method), None) => self.notification(method, msg.clone(), out),
            (None, Some(id)) => self.response(id, &msg, out),
            (None, None) => {
                tracing::warn!(message = %msg, "protocol error: JSON-RPC message without method or id")
            }
        }
    }

    /// A request from the agent: relay permission requests, refuse the rest.
    fn agent_request(&mut self, method: &str, rpc_id: Value, msg: &Value, out: &mut Vec<Signal>) {
        if method == "session/request_permission" {
            let params = &msg["params"];
            let request_id = match &rpc_id {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let tool_call = params.get("toolCall").cloned().unwrap_or(Value::Null);
            let tool_name = tool_call["title"]
                .as_str()
                .or_else(|| tool_call["kind"].as_str())
                .unwrap_or("")
                .to_string();
            let options = params["options"].as_array().cloned().unwrap_or_default();
            self.asked.insert(
                request_id.clone(),
                Asked {
                    rpc_id,
                    options: options.clone(),
                },
            );
            out.push(Signal::AgentEvent(msg.clone()));
            out.push(Signal::PermissionRequest {
                request_id,
                tool_name,
                input: tool_call,
                options: Some(Value::Array(options)),
            });
            return;
        }
        // We offer no client capabilities (fs, terminal), so anything else is
        // a method we do not serve; say so instead of leaving the agent waiting.
        tracing::info!(method, "refused a request from the agent");
        out.push(Signal::Write(line(&json!({
            "jsonrpc": "2.0",
            "id": rpc_id,
            "error": {"code": METHOD_NOT_FOUND, "message": format!("agentgate does not serve {method}")},
        }))));
    }

    fn notification(&mut self, method: &str, msg: Value, out: &mut Vec<Signal>) {
        if method == "session/update" {
            let update = &msg["params"]["update"];
            if update["sessionUpdate"] == "agent_message_chunk"
                && update["content"]["type"] == "text"
            {
                if let Some(text) = update["content"]["text"].as_str() {
                    out.push(Signal::Delta(text.to_string()));
                }
            }
        }
        out.push(Signal::AgentEvent(msg));
    }

    fn response(&mut self, id: &Value, msg: &Value, out: &mut Vec<Signal>) {
        let Some(call) = id.as_u64().and_then(|id| self.calls.remove(&id)) else {
            tracing::warn!(%id, "protocol error: a response to no request of ours");
            return;
        };
        let error = msg.get("error").filter(|e| !e.is_null());
        let result = msg.get("result").cloned().unwrap_or(Value::Null);
        match (call, error) {
            (Call::Initialize, None) => {
                let capabilities = &result["agentCapabilities"];
                let offers_load = capabilities["loadSession"].as_bool().unwrap_or(false);
                // ACP: an absent capability is not offered.
                self.takes_images = capabilities["promptCapabilities"]["image"]
                    .as_bool()
                    .unwrap_or(false);
                let bytes = match self.resume.take() {
                    Some(id) if offers_load => {
                        let params = json!({"sessionId": id, "cwd": self.cwd, "mcpServers": []});
                        self.request(Call::LoadSession(id), "session/load", params)
                    }
                    Some(id) => {
                        out.push(Signal::ConversationReset(format!(
                            "the agent does not offer loadSession; conversation {id} is not continued"
                        )));
                        self.new_session()
                    }
                    None => self.new_session(),
                };
                out.push(Signal::AgentEvent(msg.clone()));
                out.push(Signal::Write(bytes));
            }
            (Call::LoadSession(id), None) => {
                self.session_id = Some(id.clone());
                out.push(Signal::AgentSessionId(id));
                out.push(Signal::Ready);
            }
            (Call::LoadSession(id), Some(e)) => {
                out.push(Signal::ConversationReset(format!(
                    "session/load of {id} failed ({}); a new conversation starts",
                    error_text(e)
                )));
                let bytes = self.new_session();
                out.push(Signal::Write(bytes));
            }
            (Call::NewSession, None) => match result["sessionId"].as_str() {
                Some(id) => {
                    self.session_id = Some(id.to_string());
                    out.push(Signal::AgentSessionId(id.to_string()));
                    out.push(Signal::AgentEvent(msg.clone()));
                    out.push(Signal::Ready);
                }
                None => {
                    tracing::warn!(%result, "protocol error: session/new answered without a sessionId")
                }
            },
            (Call::Initialize | Call::NewSession, Some(e)) => {
                // The child cannot take messages; it is never ready and the
                // session's start-up deadline ends it. Say why in the log.
                tracing::warn!(error = %error_text(e), "the ACP agent refused to start a session");
                out.push(Signal::AgentEvent(msg.clone()));
            }
            (Call::Prompt, e) => {
                out.push(Signal::AgentEvent(msg.clone()));
                // Requests still open belong to the turn that just ended.
                self.asked.clear();
                out.push(Signal::Done(match e {
                    Some(e) => Outcome {
                        result: Err((FailureCode::AgentError, error_text(e))),
                        usage: None,
                    },
                    None => prompt_outcome(&result),
                }));
            }
        }
    }
}

/// A message's content as ACP content blocks: text as `{type: "text"}`,
/// each image (checked base64 when posted) as `{type: "image", mimeType,
/// data}` with its bytes untouched, in the order posted.
fn prompt_blocks(content: &Content) -> Vec<Value> {
    match content {
        Content::Text(text) => vec![json!({"type": "text", "text": text})],
        Content::Blocks(blocks) => blocks
            .iter()
            .map(|b| match b["type"].as_str() {
                Some("image") => json!({
                    "type": "image",
                    "mimeType": b["source"]["media_type"],
                    "data": b["source"]["data"],
                }),
                _ => json!({"type": "text", "text": b["text"]}),
            })
            .collect(),
    }
}

/// How a `session/prompt` result ends the message.
fn prompt_outcome(result: &Value) -> Outcome {
    let stop = result["stopReason"].as_str().unwrap_or("end_turn");
    let mut usage = serde_json::Map::new();
    usage.insert("stop_reason".into(), json!(stop));
    if let Some(u) = result.get("usage").filter(|u| !u.is_null()) {
        usage.insert("usage".into(), u.clone());
    }
    let result = match stop {
        "cancelled" => Err((
            FailureCode::Interrupted,
            "the agent cancelled the turn".to_string(),
        )),
        // end_turn, max_tokens, max_turn_requests, refusal: the turn ended and
        // its text stands; the reason is kept in `usage.stop_reason`.
        _ => Ok(None),
    };
    Outcome {
        result,
        usage: Some(Value::Object(usage)),
    }
}

fn error_text(e: &Value) -> String {
    let message = e["message"].as_str().unwrap_or("error");
    match e.get("code") {
        Some(code) => format!("{message} (code {code})"),
        None => message.to_string(),
    }
}

fn line(v: &Value) -> Bytes {
    let mut line = serde_json::to_vec(v).expect("a JSON value serialises");
    line.push(b'\n');
    Bytes::from(line)
}

/// The option a decision picks: the one named, else the first of the kind
/// its behaviour asks for (`*_once` before `*_always`: never grant more than asked).
fn chosen_option(options: &[Value], decision: &PermissionDecision) -> Option<String> {
    if let Some(id) = &decision.option_id {
        return Some(id.clone());
    }
    let kinds: &[&str] = match decision.behavior? {
        PermissionBehavior::Allow => &["allow_once", "allow_always"],
        PermissionBehavior::Deny => &["reject_once", "reject_always"],
    };
    kinds.iter().find_map(|kind| {
        options
            .iter()
            .find(|o| o["kind"] == *kind)
            .and_then(|o| o["optionId"].as_str())
            .map(str::to_string)
    })
}

impl Adapter for Acp {
    fn start(&mut self, cwd: &Path, resume: Option<&str>) -> Option<Bytes> {
        self.cwd = cwd.to_path_buf();
        self.resume = resume.map(str::to_string);
        let params = json!({
            "protocolVersion": PROTOCOL_VERSION,
            // Nothing offered: the agent uses its own file system and terminal.
            "clientCapabilities": {"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false},
            "clientInfo": {"name": "agentgate", "version": env!("CARGO_PKG_VERSION")},
        });
        Some(self.request(Call::Initialize, "initialize", params))
    }

    fn needs_ready(&self) -> bool {
        true
    }

    fn frame(&mut self, content: &str) -> Bytes {
        self.prompt(vec![json!({"type": "text", "text": content})])
    }

    /// Images go only to an agent that advertised them: ACP forbids a
    /// client to send content types the agent did not advertise, and an
    /// agent that gets one anyway may drop it silently, so the reply would
    /// be about a picture the model never saw. Such a message fails
    /// (`unsupported_content`) before anything is written.
    fn frame_content(&mut self, content: &Content) -> Result<Bytes, String> {
        if content.has_images() && !self.takes_images {
            return Err(
                "the agent cannot take images: its initialize answer did not \
                 advertise agentCapabilities.promptCapabilities.image"
                    .into(),
            );
        }
        Ok(self.prompt(prompt_blocks(content)))
    }

    fn stdout(&mut self, chunk: &[u8], out: &mut Vec<Signal>) {
        for line in self.lines.push(chunk) {
            self.line(&line, out);
        }
    }

    fn stderr(&mut self, _chunk: &[u8], _out: &mut Vec<Signal>) {}

    fn eof(&mut self, out: &mut Vec<Signal>) {
        if let Some(line) = self.lines.finish() {
            self.line(&line, out);
        }
    }

    fn interrupt(&mut self) -> Option<Bytes> {
        // The protocol: after session/cancel the client answers its open
        // permission requests with `cancelled`; the prompt then ends with
        // stopReason `cancelled`.
        let mut bytes = line(&json!({
            "jsonrpc": "2.0",
            "method": "session/cancel",
            "params": {"sessionId": self.session_id},
        }))
        .to_vec();
        for (_, asked) in self.asked.drain() {
            bytes.extend_from_slice(&line(&json!({
                "jsonrpc": "2.0",
                "id": asked.rpc_id,
                "result": {"outcome": {"outcome": "cancelled"}},
            })));
        }
        Some(Bytes::from(bytes))
    }

    fn permission_answer(
        &mut self,
        request_id: &str,
        _input: &Value,
        decision: &PermissionDecision,
    ) -> Option<Bytes> {
        let asked = self.asked.remove(request_id)?;
        // No option fits (e.g. a deny where the agent offers no reject
        // option): `cancelled` is the protocol's way to not approve.
        let outcome = match chosen_option(&asked.options, decision) {
            Some(id) => json!({"outcome": "selected", "optionId": id}),
            None => json!({"outcome": "cancelled"}),
        };
        Some(line(&json!({
            "jsonrpc": "2.0",
            "id": asked.rpc_id,
            "result": {"outcome": outcome},
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(a: &mut Acp, v: Value) -> Vec<Signal> {
        let mut out = vec![];
        a.stdout(&line(&v), &mut out);
        out
    }

    fn parse(b: &Bytes) -> Value {
        assert!(b.ends_with(b"\n"), "one line");
        serde_json::from_slice(b).unwrap()
    }

    fn writes(out: &[Signal]) -> Vec<Value> {
        out.iter()
            .filter_map(|s| match s {
                Signal::Write(b) => Some(parse(b)),
                _ => None,
            })
            .collect()
    }

    /// Runs initialize and session/new; returns the adapter, ready.
    fn ready(load_offered: bool, resume: Option<&str>) -> (Acp, Vec<Signal>) {
        let mut a = Acp::new();
        let init = parse(&a.start(Path::new("/work"), resume).unwrap());
        assert_eq!(init["method"], "initialize");
        assert_eq!(init["params"]["protocolVersion"], 1);
        assert_eq!(init["params"]["clientCapabilities"]["terminal"], false);
        let out = feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":init["id"],"result":{"protocolVersion":1,"agentCapabilities":{"loadSession":load_offered}}}),
        );
        (a, out)
    }

    #[test]
    fn handshake_new_session_then_ready() {
        let (mut a, out) = ready(true, None);
        let w = writes(&out);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0]["method"], "session/new");
        assert_eq!(w[0]["params"]["cwd"], "/work");
        assert_eq!(w[0]["params"]["mcpServers"], json!([]));
        assert!(
            !out.contains(&Signal::Ready),
            "not ready before session/new answers"
        );
        let out = feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":w[0]["id"],"result":{"sessionId":"s-1"}}),
        );
        assert!(out.contains(&Signal::AgentSessionId("s-1".into())));
        assert_eq!(out.last(), Some(&Signal::Ready));
        let prompt = parse(&a.frame("hello"));
        assert_eq!(prompt["method"], "session/prompt");
        assert_eq!(prompt["params"]["sessionId"], "s-1");
        assert_eq!(
            prompt["params"]["prompt"],
            json!([{"type":"text","text":"hello"}])
        );
    }

    #[test]
    fn resume_loads_when_offered() {
        let (mut a, out) = ready(true, Some("s-old"));
        let w = writes(&out);
        assert_eq!(w[0]["method"], "session/load");
        assert_eq!(w[0]["params"]["sessionId"], "s-old");
        // History replay arrives before the load answers: events, no reply text owner.
        let replay = feed(
            &mut a,
            json!({"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s-old","update":{"sessionUpdate":"user_message_chunk","content":{"type":"text","text":"earlier"}}}}),
        );
        assert!(matches!(&replay[..], [Signal::AgentEvent(_)]));
        let out = feed(&mut a, json!({"jsonrpc":"2.0","id":w[0]["id"],"result":{}}));
        assert_eq!(
            out,
            vec![Signal::AgentSessionId("s-old".into()), Signal::Ready]
        );
        assert_eq!(parse(&a.frame("x"))["params"]["sessionId"], "s-old");
    }

    #[test]
    fn resume_without_load_or_failed_load_starts_new() {
        let (_, out) = ready(false, Some("s-old"));
        assert!(matches!(&out[0], Signal::ConversationReset(_)));
        assert_eq!(writes(&out)[0]["method"], "session/new");

        let (mut a, out) = ready(true, Some("s-gone"));
        let load = &writes(&out)[0];
        let out = feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":load["id"],"error":{"code":-32603,"message":"no such session"}}),
        );
        assert!(matches!(&out[0], Signal::ConversationReset(d) if d.contains("no such session")));
        assert_eq!(writes(&out)[0]["method"], "session/new");
        assert!(!out.contains(&Signal::Ready));
    }

    #[test]
    fn refused_session_is_never_ready() {
        let (mut a, out) = ready(false, None);
        let new = &writes(&out)[0];
        let out = feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":new["id"],"error":{"code":-32000,"message":"Authentication required"}}),
        );
        assert!(!out.contains(&Signal::Ready));
        assert!(writes(&out).is_empty());
    }

    fn started() -> Acp {
        let (mut a, out) = ready(false, None);
        let new = &writes(&out)[0];
        feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":new["id"],"result":{"sessionId":"s-1"}}),
        );
        a
    }

    #[test]
    fn chunks_stream_and_the_result_ends_the_reply() {
        let mut a = started();
        let prompt = parse(&a.frame("hi"));
        let chunk = |t: &str| {
            format!(
                "{}\n",
                json!({"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s-1","update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":t}}}})
            )
        };
        let thought = json!({"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s-1","update":{"sessionUpdate":"agent_thought_chunk","content":{"type":"text","text":"hmm"}}}});
        let end = json!({"jsonrpc":"2.0","id":prompt["id"],"result":{"stopReason":"end_turn"}});
        let all = format!("{}{}{thought}\r\n{end}\n", chunk("Hel"), chunk("lo"));
        // Byte by byte: lines split anywhere parse the same.
        let mut out = vec![];
        for b in all.as_bytes() {
            a.stdout(&[*b], &mut out);
        }
        let deltas: Vec<_> = out
            .iter()
            .filter_map(|s| match s {
                Signal::Delta(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deltas, ["Hel", "lo"], "thoughts are events, not reply text");
        let events = out
            .iter()
            .filter(|s| matches!(s, Signal::AgentEvent(_)))
            .count();
        assert_eq!(events, 4, "every notification and the result are events");
        match out.last().unwrap() {
            Signal::Done(o) => {
                assert_eq!(o.result, Ok(None));
                assert_eq!(o.usage.as_ref().unwrap()["stop_reason"], "end_turn");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stop_reasons() {
        for (reason, ok) in [
            ("cancelled", false),
            ("max_tokens", true),
            ("refusal", true),
            ("max_turn_requests", true),
        ] {
            let mut a = started();
            let p = parse(&a.frame("x"));
            let out = feed(
                &mut a,
                json!({"jsonrpc":"2.0","id":p["id"],"result":{"stopReason":reason}}),
            );
            let Some(Signal::Done(o)) = out.last() else {
                panic!("{out:?}")
            };
            assert_eq!(o.result.is_ok(), ok, "{reason}");
            assert_eq!(o.usage.as_ref().unwrap()["stop_reason"], reason);
            if !ok {
                assert_eq!(o.result.as_ref().unwrap_err().0, FailureCode::Interrupted);
            }
        }
        let mut a = started();
        let p = parse(&a.frame("x"));
        let out = feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":p["id"],"error":{"code":-32603,"message":"quota"}}),
        );
        let Some(Signal::Done(o)) = out.last() else {
            panic!("{out:?}")
        };
        let (code, detail) = o.result.clone().unwrap_err();
        assert_eq!(code, FailureCode::AgentError);
        assert!(detail.contains("quota"), "{detail}");
    }

    #[test]
    fn unserved_requests_get_an_error_never_silence() {
        let mut a = started();
        for (id, method) in [
            (json!(7), "fs/read_text_file"),
            (json!("t-1"), "terminal/create"),
            (json!(8), "x/unknown"),
        ] {
            let out = feed(
                &mut a,
                json!({"jsonrpc":"2.0","id":id,"method":method,"params":{}}),
            );
            let w = writes(&out);
            assert_eq!(w.len(), 1, "{method}");
            assert_eq!(w[0]["id"], id);
            assert_eq!(w[0]["error"]["code"], METHOD_NOT_FOUND);
            assert!(w[0].get("result").is_none());
        }
    }

    fn ask(a: &mut Acp, id: Value) -> Vec<Signal> {
        feed(
            a,
            json!({"jsonrpc":"2.0","id":id,"method":"session/request_permission","params":{
            "sessionId":"s-1",
            "toolCall":{"toolCallId":"c1","title":"Shell: touch x","kind":"execute","rawInput":{"command":"touch x"}},
            "options":[
                {"optionId":"always","name":"Always","kind":"allow_always"},
                {"optionId":"once","name":"Once","kind":"allow_once"},
                {"optionId":"no","name":"No","kind":"reject_once"}
            ]}}),
        )
    }

    fn decision(
        behavior: Option<PermissionBehavior>,
        option_id: Option<&str>,
    ) -> PermissionDecision {
        PermissionDecision {
            behavior,
            option_id: option_id.map(str::to_string),
            message: None,
        }
    }

    #[test]
    fn permission_requests_are_relayed_and_answered() {
        let mut a = started();
        let out = ask(&mut a, json!(41));
        let Some(Signal::PermissionRequest {
            request_id,
            tool_name,
            input,
            options,
        }) = out.last()
        else {
            panic!("{out:?}")
        };
        assert_eq!(request_id, "41");
        assert_eq!(tool_name, "Shell: touch x");
        assert_eq!(input["rawInput"]["command"], "touch x");
        assert_eq!(options.as_ref().unwrap().as_array().unwrap().len(), 3);
        assert!(writes(&out).is_empty(), "answered by the user, not at once");

        let allow = parse(
            &a.permission_answer(
                "41",
                &Value::Null,
                &decision(Some(PermissionBehavior::Allow), None),
            )
            .unwrap(),
        );
        assert_eq!(allow["id"], 41, "the agent's id type is kept");
        assert_eq!(
            allow["result"]["outcome"],
            json!({"outcome":"selected","optionId":"once"}),
            "allow picks the once option, not always"
        );
        assert!(
            a.permission_answer(
                "41",
                &Value::Null,
                &decision(Some(PermissionBehavior::Allow), None)
            )
            .is_none(),
            "answered once"
        );

        ask(&mut a, json!("r2"));
        let deny = parse(
            &a.permission_answer(
                "r2",
                &Value::Null,
                &decision(Some(PermissionBehavior::Deny), None),
            )
            .unwrap(),
        );
        assert_eq!(deny["id"], "r2");
        assert_eq!(deny["result"]["outcome"]["optionId"], "no");

        ask(&mut a, json!(43));
        let named = parse(
            &a.permission_answer("43", &Value::Null, &decision(None, Some("always")))
                .unwrap(),
        );
        assert_eq!(named["result"]["outcome"]["optionId"], "always");
    }

    #[test]
    fn a_deny_without_a_reject_option_is_cancelled() {
        let mut a = started();
        feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":5,"method":"session/request_permission","params":{"sessionId":"s-1","toolCall":{"toolCallId":"c"},"options":[{"optionId":"ok","name":"OK","kind":"allow_once"}]}}),
        );
        let v = parse(
            &a.permission_answer(
                "5",
                &Value::Null,
                &decision(Some(PermissionBehavior::Deny), None),
            )
            .unwrap(),
        );
        assert_eq!(v["result"]["outcome"], json!({"outcome":"cancelled"}));
    }

    #[test]
    fn interrupt_cancels_the_turn_and_open_permission_requests() {
        let mut a = started();
        a.frame("x");
        ask(&mut a, json!(9));
        let bytes = a.interrupt().unwrap();
        let lines: Vec<Value> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines[0]["method"], "session/cancel");
        assert_eq!(lines[0]["params"]["sessionId"], "s-1");
        assert!(lines[0].get("id").is_none(), "a notification");
        assert_eq!(lines[1]["id"], 9);
        assert_eq!(lines[1]["result"]["outcome"]["outcome"], "cancelled");
        assert!(a
            .permission_answer(
                "9",
                &Value::Null,
                &decision(Some(PermissionBehavior::Allow), None)
            )
            .is_none());
    }

    /// Ready with these `initialize` capabilities.
    fn started_with(capabilities: Value) -> Acp {
        let mut a = Acp::new();
        let init = parse(&a.start(Path::new("/work"), None).unwrap());
        let out = feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":init["id"],"result":{"protocolVersion":1,"agentCapabilities":capabilities}}),
        );
        let new = &writes(&out)[0];
        feed(
            &mut a,
            json!({"jsonrpc":"2.0","id":new["id"],"result":{"sessionId":"s-1"}}),
        );
        a
    }

    fn text_and_image() -> Content {
        Content::Blocks(vec![
            json!({"type": "text", "text": "look"}),
            json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}),
            json!({"type": "text", "text": "and say"}),
        ])
    }

    #[test]
    fn images_go_as_acp_blocks_to_an_agent_that_advertised_them() {
        let mut a = started_with(json!({"promptCapabilities": {"image": true}}));
        let prompt = parse(&a.frame_content(&text_and_image()).unwrap());
        assert_eq!(prompt["method"], "session/prompt");
        assert_eq!(
            prompt["params"]["prompt"],
            json!([
                {"type": "text", "text": "look"},
                {"type": "image", "mimeType": "image/png", "data": "iVBORw0KGgo="},
                {"type": "text", "text": "and say"},
            ])
        );
        let text = parse(&a.frame_content(&Content::Text("plain".into())).unwrap());
        assert_eq!(
            text["params"]["prompt"],
            json!([{"type": "text", "text": "plain"}])
        );
    }

    #[test]
    fn images_to_an_agent_that_did_not_advertise_them_are_refused() {
        for capabilities in [
            json!({}),
            json!({"promptCapabilities": {}}),
            json!({"promptCapabilities": {"image": false, "audio": true}}),
        ] {
            let mut a = started_with(capabilities.clone());
            let why = a.frame_content(&text_and_image()).unwrap_err();
            assert!(why.contains("promptCapabilities.image"), "{why}");
            assert!(a.calls.is_empty(), "no prompt is pending: {capabilities}");
            // Text still goes.
            let blocks = Content::Blocks(vec![json!({"type": "text", "text": "only text"})]);
            let p = parse(&a.frame_content(&blocks).unwrap());
            assert_eq!(p["params"]["prompt"][0]["text"], "only text");
        }
    }

    #[test]
    fn garbage_and_stray_responses_are_skipped() {
        let mut a = started();
        let mut out = vec![];
        a.stdout(
            b"not json\n{\"jsonrpc\":\"2.0\",\"id\":999,\"result\":{}}\n",
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
    }
}
