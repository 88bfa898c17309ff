//! The `claude-stream-json` protocol of the Claude Code CLI.
//!
//! Input is one JSON line per message. Every stdout line is a JSON event and
//! is forwarded verbatim; `stream_event` text deltas become reply text; the
//! `result` line ends the reply. A line may be many MiB long, so lines are
//! collected without a cap (the session's output limit bounds a reply). A
//! stdout line that is not JSON is logged as a protocol error and skipped.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{Adapter, Outcome, Signal};
use crate::model::{FailureCode, PermissionBehavior, PermissionDecision};

/// The request id of the warm-up control request ([`Adapter::warm_up`]).
const WARM_UP_ID: &str = "agentgate-warm-up";

/// Adapter for the Claude Code CLI in stream-json mode.
#[derive(Debug, Default)]
pub struct StreamJson {
    lines: super::jsonl::LineSplitter,
    /// Whether this reply has streamed text deltas (`--include-partial-messages`).
    saw_partial: bool,
    next_request: u64,
    /// One-shot mode: the content is written as plain text (the prompt), not as a JSON line.
    plain_input: bool,
}

impl StreamJson {
    /// Adapter for a persistent child.
    pub fn new() -> StreamJson {
        StreamJson::default()
    }

    /// Adapter for a one-shot run: same events. With `json_input` (the
    /// command has `--input-format stream-json`) the content is one user line,
    /// blocks and all; without it the content's text is the prompt itself.
    pub fn oneshot(json_input: bool) -> StreamJson {
        StreamJson {
            plain_input: !json_input,
            ..StreamJson::default()
        }
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Signal>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let event: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                let shown = String::from_utf8_lossy(&line[..line.len().min(200)]);
                tracing::warn!(error = %e, line = %shown, "protocol error: stdout line is not JSON");
                return;
            }
        };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "system" => {
                if let Some(id) = event.get("session_id").and_then(Value::as_str) {
                    out.push(Signal::AgentSessionId(id.to_string()));
                }
            }
            "stream_event" => {
                let e = &event["event"];
                if e["type"] == "content_block_delta" && e["delta"]["type"] == "text_delta" {
                    if let Some(text) = e["delta"]["text"].as_str() {
                        self.saw_partial = true;
                        out.push(Signal::Delta(text.to_string()));
                    }
                }
            }
            "assistant" if !self.saw_partial => {
                // Without --include-partial-messages, whole messages carry the text.
                if let Some(blocks) = event["message"]["content"].as_array() {
                    for b in blocks {
                        if b["type"] == "text" {
                            if let Some(text) = b["text"].as_str() {
                                out.push(Signal::Delta(text.to_string()));
                            }
                        }
                    }
                }
            }
            "control_request" => {
                let req = &event["request"];
                if req["subtype"] == "can_use_tool" {
                    if let Some(id) = event["request_id"].as_str() {
                        out.push(Signal::PermissionRequest {
                            request_id: id.to_string(),
                            tool_name: req["tool_name"].as_str().unwrap_or("").to_string(),
                            input: req.get("input").cloned().unwrap_or(Value::Null),
                            options: None,
                        });
                    }
                }
            }
            "control_response" => {
                let r = &event["response"];
                // The warm-up's answer (a context breakdown) belongs to no
                // session: whichever adapter reads it drops it.
                if r["request_id"] == WARM_UP_ID {
                    if r["subtype"] != "success" {
                        tracing::debug!(response = %r, "the warm-up request failed");
                    }
                    return;
                }
                if let Some(id) = r["request_id"].as_str() {
                    let error = (r["subtype"] != "success").then(|| {
                        r["error"]
                            .as_str()
                            .map_or_else(|| r.to_string(), str::to_string)
                    });
                    out.push(Signal::ControlResponse {
                        request_id: id.to_string(),
                        error,
                    });
                }
            }
            "control_cancel_request" => {
                if let Some(id) = event["request_id"].as_str() {
                    out.push(Signal::PermissionCancelled(id.to_string()));
                }
            }
            _ => {}
        }
        let result = (kind == "result").then(|| outcome_of(&event));
        // `--resume` of a conversation that no longer exists fails at once, naming the id.
        let lost = kind == "result"
            && event["errors"]
                .to_string()
                .contains("No conversation found");
        if lost {
            out.push(Signal::ConversationLost);
        } else if let Some(id) = (kind == "result")
            .then(|| event.get("session_id").and_then(Value::as_str))
            .flatten()
        {
            out.push(Signal::AgentSessionId(id.to_string()));
        }
        out.push(Signal::AgentEvent(event));
        if let Some(outcome) = result {
            self.saw_partial = false;
            out.push(Signal::Done(outcome));
        }
    }
}

/// The outcome a `result` line reports.
fn outcome_of(event: &Value) -> Outcome {
    let mut usage = serde_json::Map::new();
    for key in [
        "usage",
        "total_cost_usd",
        "duration_ms",
        "duration_api_ms",
        "num_turns",
        "modelUsage",
    ] {
        if let Some(v) = event.get(key) {
            usage.insert(key.to_string(), v.clone());
        }
    }
    let usage = (!usage.is_empty()).then_some(Value::Object(usage));
    let text = event
        .get("result")
        .and_then(Value::as_str)
        .map(str::to_string);
    let result = if event["is_error"].as_bool().unwrap_or(false) {
        // The CLI reports some failures (an API error) with `subtype:
        // "success"` and `is_error: true`: the subtype then says nothing.
        let subtype = event["subtype"]
            .as_str()
            .filter(|st| *st != "success")
            .unwrap_or("error");
        let detail = match (&text, event.get("errors")) {
            (Some(t), _) if !t.is_empty() && subtype == "error" => t.clone(),
            (Some(t), _) if !t.is_empty() => format!("{subtype}: {t}"),
            (_, Some(errors)) => format!("{subtype}: {errors}"),
            _ => subtype.to_string(),
        };
        Err((FailureCode::AgentError, detail))
    } else {
        Ok(text)
    };
    Outcome { result, usage }
}

impl StreamJson {
    fn user_line(&mut self, content: Value) -> Bytes {
        self.saw_partial = false;
        let mut line = serde_json::to_vec(&json!({
            "type": "user",
            "message": {"role": "user", "content": content},
        }))
        .expect("a JSON value serialises");
        line.push(b'\n');
        Bytes::from(line)
    }
}

impl Adapter for StreamJson {
    fn frame(&mut self, content: &str) -> Bytes {
        if self.plain_input {
            self.saw_partial = false;
            return Bytes::copy_from_slice(content.as_bytes());
        }
        self.user_line(json!(content))
    }

    fn frame_content(&mut self, content: &crate::content::Content) -> Result<Bytes, String> {
        if self.plain_input {
            return Ok(self.frame(&content.text()));
        }
        // The CLI passes a list of blocks on to the model as they are.
        Ok(self.user_line(content.to_json()))
    }

    fn control(&mut self, request: Value) -> Option<(String, Bytes)> {
        self.next_request += 1;
        let id = format!("agentgate-control-{}", self.next_request);
        let mut line = serde_json::to_vec(&json!({
            "type": "control_request",
            "request_id": id,
            "request": request,
        }))
        .expect("a JSON value serialises");
        line.push(b'\n');
        Some((id, Bytes::from(line)))
    }

    /// `get_context_usage` with `detail: "summary"`: the CLI builds what a
    /// model request needs (system prompt, tool schemas, memory files) and
    /// estimates its size locally — no token-count or model call — which
    /// takes most of the first turn's own work off the first message (see
    /// docs/claude-cli-notes.md, "A faster first reply").
    fn warm_up(&mut self) -> Option<Bytes> {
        let mut line = serde_json::to_vec(&json!({
            "type": "control_request",
            "request_id": WARM_UP_ID,
            "request": {"subtype": "get_context_usage", "detail": "summary"},
        }))
        .expect("a JSON value serialises");
        line.push(b'\n');
        Some(Bytes::from(line))
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
        self.next_request += 1;
        let mut line = serde_json::to_vec(&json!({
            "type": "control_request",
            "request_id": format!("agentgate-interrupt-{}", self.next_request),
            "request": {"subtype": "interrupt"},
        }))
        .expect("a JSON value serialises");
        line.push(b'\n');
        Some(Bytes::from(line))
    }

    fn permission_answer(
        &mut self,
        request_id: &str,
        input: &Value,
        decision: &PermissionDecision,
    ) -> Option<Bytes> {
        // The CLI rejects an allow without updatedInput and a deny without message.
        // It offers no options, so an answer naming one only is a deny.
        let response = match decision.behavior.unwrap_or(PermissionBehavior::Deny) {
            PermissionBehavior::Allow => json!({"behavior": "allow", "updatedInput": input}),
            PermissionBehavior::Deny => json!({
                "behavior": "deny",
                "message": decision.message.clone().unwrap_or_else(|| "denied by the user".into()),
            }),
        };
        let mut line = serde_json::to_vec(&json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id, "response": response},
        }))
        .expect("a JSON value serialises");
        line.push(b'\n');
        Some(Bytes::from(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(a: &mut StreamJson, text: &str) -> Vec<Signal> {
        let mut out = vec![];
        a.stdout(text.as_bytes(), &mut out);
        out
    }

    #[test]
    fn deltas_agent_events_and_result() {
        let mut a = StreamJson::new();
        a.frame("hi");
        let init = r#"{"type":"system","subtype":"init","session_id":"s-1"}"#;
        let delta = r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}}"#;
        let assistant =
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Hello"}]}}"#;
        let result = r#"{"type":"result","subtype":"success","is_error":false,"result":"Hello","session_id":"s-1","usage":{"input_tokens":3},"total_cost_usd":0.1}"#;
        let all = format!("{init}\n{delta}\n{assistant}\n{result}\n");
        // Byte by byte: lines split anywhere must parse the same.
        let mut out = vec![];
        for b in all.as_bytes() {
            a.stdout(&[*b], &mut out);
        }
        assert_eq!(out[0], Signal::AgentSessionId("s-1".into()));
        assert!(out.contains(&Signal::Delta("Hel".into())));
        assert!(
            !out.contains(&Signal::Delta("Hello".into())),
            "no double text with partials"
        );
        let agent_events = out
            .iter()
            .filter(|s| matches!(s, Signal::AgentEvent(_)))
            .count();
        assert_eq!(agent_events, 4);
        match out.last().unwrap() {
            Signal::Done(o) => {
                assert_eq!(o.result, Ok(Some("Hello".into())));
                assert_eq!(o.usage.as_ref().unwrap()["usage"]["input_tokens"], 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_api_error_reported_as_success_reads_as_the_error_alone() {
        let mut a = StreamJson::new();
        let out = feed(
            &mut a,
            "{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":true,\"result\":\"API Error: 400 bad request\"}\n",
        );
        match out.last().unwrap() {
            Signal::Done(o) => assert_eq!(
                o.result.as_ref().unwrap_err(),
                &(
                    FailureCode::AgentError,
                    "API Error: 400 bad request".to_string()
                )
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_result_fails_and_garbage_is_skipped() {
        let mut a = StreamJson::new();
        let out = feed(
            &mut a,
            "not json\n{\"type\":\"result\",\"subtype\":\"error_during_execution\",\"is_error\":true}\n",
        );
        match out.last().unwrap() {
            Signal::Done(o) => {
                assert_eq!(o.result.as_ref().unwrap_err().0, FailureCode::AgentError)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_conversation_is_reported() {
        let mut a = StreamJson::new();
        let out = feed(
            &mut a,
            "{\"type\":\"result\",\"subtype\":\"error_during_execution\",\"is_error\":true,\"errors\":[\"No conversation found with session ID: x\"]}\n",
        );
        assert!(out.contains(&Signal::ConversationLost));
    }

    #[test]
    fn permission_request_and_answers() {
        let mut a = StreamJson::new();
        let out = feed(
            &mut a,
            r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"touch x"}}}
"#,
        );
        assert!(
            matches!(&out[0], Signal::PermissionRequest { request_id, tool_name, .. } if request_id == "r1" && tool_name == "Bash")
        );
        let input = json!({"command": "touch x"});
        let allow = a
            .permission_answer(
                "r1",
                &input,
                &PermissionDecision {
                    behavior: Some(PermissionBehavior::Allow),
                    option_id: None,
                    message: None,
                },
            )
            .unwrap();
        let v: Value = serde_json::from_slice(&allow).unwrap();
        assert_eq!(v["response"]["response"]["updatedInput"], input);
        assert_eq!(v["response"]["request_id"], "r1");
        let deny = a
            .permission_answer(
                "r1",
                &input,
                &PermissionDecision {
                    behavior: Some(PermissionBehavior::Deny),
                    option_id: None,
                    message: None,
                },
            )
            .unwrap();
        let v: Value = serde_json::from_slice(&deny).unwrap();
        assert_eq!(v["response"]["response"]["behavior"], "deny");
        assert!(v["response"]["response"]["message"].is_string());
    }

    #[test]
    fn blocks_and_control_requests() {
        let mut a = StreamJson::new();
        let blocks = crate::content::Content::Blocks(vec![json!({"type": "text", "text": "hi"})]);
        let v: Value = serde_json::from_slice(&a.frame_content(&blocks).unwrap()).unwrap();
        assert_eq!(v["message"]["content"][0]["text"], "hi");
        let (id, bytes) = a
            .control(json!({"subtype": "set_model", "model": "haiku"}))
            .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["request_id"], id.as_str());
        assert_eq!(v["request"]["model"], "haiku");
        let ok = format!("{{\"type\":\"control_response\",\"response\":{{\"subtype\":\"success\",\"request_id\":\"{id}\"}}}}\n");
        let bad = "{\"type\":\"control_response\",\"response\":{\"subtype\":\"error\",\"request_id\":\"x\",\"error\":\"invalid_mode\"}}\n";
        let out = feed(&mut a, &format!("{ok}{bad}"));
        assert!(out.contains(&Signal::ControlResponse {
            request_id: id,
            error: None
        }));
        assert!(out.contains(&Signal::ControlResponse {
            request_id: "x".into(),
            error: Some("invalid_mode".into())
        }));
    }

    #[test]
    fn one_shot_framing_follows_the_input_format() {
        let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}});
        let content = crate::content::Content::Blocks(vec![
            json!({"type": "text", "text": "look"}),
            image.clone(),
        ]);
        let line = StreamJson::oneshot(true).frame_content(&content).unwrap();
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "user");
        assert_eq!(v["message"]["content"][1], image);
        assert!(line.ends_with(b"\n"));
        let plain = StreamJson::oneshot(false).frame_content(&content).unwrap();
        assert_eq!(&plain[..], b"look");
    }

    #[test]
    fn the_warm_up_answer_is_dropped() {
        let mut a = StreamJson::new();
        let v: Value = serde_json::from_slice(&a.warm_up().unwrap()).unwrap();
        assert_eq!(v["request"]["subtype"], "get_context_usage");
        assert_eq!(v["request"]["detail"], "summary", "no token-count calls");
        let answer = format!("{{\"type\":\"control_response\",\"response\":{{\"subtype\":\"success\",\"request_id\":\"{}\",\"response\":{{\"categories\":[]}}}}}}\n", v["request_id"].as_str().unwrap());
        assert_eq!(feed(&mut a, &answer), vec![], "no signal, no agent event");
    }

    #[test]
    fn a_huge_line_is_one_event() {
        let mut a = StreamJson::new();
        let big = "x".repeat(3 << 20);
        let line = format!("{{\"type\":\"assistant\",\"message\":{{\"content\":[{{\"type\":\"text\",\"text\":\"{big}\"}}]}}}}\n");
        let mut out = vec![];
        for chunk in line.as_bytes().chunks(65536) {
            a.stdout(chunk, &mut out);
        }
        assert!(matches!(&out[0], Signal::Delta(t) if t.len() == big.len()));
    }
}
