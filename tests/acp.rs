//! Real ACP agents behind the gateway, offline: the pinned gemini-cli in
//! `--acp` mode, Codex through codex-acp and Claude Code through
//! claude-code-acp (`scripts/install-acp-agents.sh`) against the suite's
//! mocks of the Gemini API, the OpenAI Responses API and the Messages API. Context across messages, streamed deltas, interrupt then
//! a next message, permission requests allowed and denied, a restart that
//! loads the conversation, an agent killed mid-reply, and an image that
//! reaches the model byte for byte.

mod common;
#[path = "support/mock_anthropic.rs"]
mod mock_anthropic;
#[path = "support/mock_gemini.rs"]
mod mock_gemini;
#[path = "support/mock_openai.rs"]
mod mock_openai;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentgate::config::{codex_profile, gemini_profile};
use common::*;
use mock_gemini::{gemini_bin, MockGemini};
use mock_openai::{codex_acp_bin, MockOpenAi};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A gateway whose `gemini` profile talks to the mock, in a fresh HOME.
struct Rig {
    gw: Gateway,
    mock: MockGemini,
    home: tempfile::TempDir,
}

impl Rig {
    async fn start() -> Rig {
        let mock = MockGemini::start().await;
        let home = tempfile::Builder::new()
            .prefix("agentgate-gemini-home-")
            .tempdir()
            .unwrap();
        let work = home.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let mut p = gemini_profile(&gemini_bin());
        // Only what the mock needs: nothing of the runner's GEMINI_*/GOOGLE_* leaks in.
        p.pass_env.clear();
        p.env = mock.child_env(home.path()).into_iter().collect();
        p.cwd = Some(work);
        let gw = Gateway::start(|c| {
            c.profiles.insert("gemini".into(), Arc::new(p));
        })
        .await;
        Rig { gw, mock, home }
    }

    fn work(&self) -> PathBuf {
        self.home.path().join("work")
    }

    async fn session(&self) -> String {
        self.gw.create("gemini").await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The `contents` length of the last conversation turn the model saw.
    fn last_turn_len(&self) -> usize {
        let turns = self.mock.turns();
        turns.last().unwrap()["contents"].as_array().unwrap().len()
    }

    async fn permission_request(&self, id: &str) -> SseItem {
        let res = self.gw.events(id, "").await;
        let items = read_sse(res, T, |i| {
            i.event.as_deref() == Some("message.permission_request")
        })
        .await;
        items.last().unwrap().clone()
    }
}

fn output(m: &Value) -> &str {
    m["output"].as_str().unwrap_or("")
}

/// A real 1x1 PNG (agents may decode what they are given).
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// Text and an image, as a client posts them.
fn text_and_image(text: &str) -> Value {
    json!({"content": [
        {"type": "text", "text": text},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1X1}},
    ]})
}

/// Posts `body` with `?wait=true`; the finished message.
async fn ask_with(gw: &Gateway, id: &str, body: Value) -> Value {
    let res = gw
        .post(&format!("/sessions/{id}/messages?wait=true"), body)
        .await;
    let status = res.status();
    let res_body = res.text().await.unwrap();
    assert_eq!(status, 200, "accepted and finished: {res_body}");
    serde_json::from_str(&res_body).unwrap()
}

#[tokio::test]
async fn gemini_keeps_context_and_streams_deltas() {
    let rig = Rig::start().await;
    let id = rig.session().await;
    let res = rig.gw.stream(&id, json!({"content": "first"})).await;
    let items = read_sse(res, T, |i| {
        matches!(
            i.event.as_deref(),
            Some("message.completed" | "message.failed")
        )
    })
    .await;
    let names: Vec<&str> = items.iter().filter_map(|i| i.event.as_deref()).collect();
    let deltas = names.iter().filter(|n| **n == "message.delta").count();
    assert!(deltas >= 3, "the reply streamed word by word: {items:?}");
    assert!(names.contains(&"message.agent_event"), "{names:?}");
    let done = items.last().unwrap();
    assert_eq!(
        done.event.as_deref(),
        Some("message.completed"),
        "{:?}",
        done.data
    );
    let text = done.data["output"].as_str().unwrap();
    assert!(
        text.starts_with("gemini mock #1: contents=1; last=first"),
        "{text}"
    );
    assert_eq!(done.data["usage"]["stop_reason"], "end_turn");
    let streamed: String = items
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.delta"))
        .map(|i| i.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text, "the deltas are the output");

    let m = rig.gw.ask(&id, "second").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).contains("contents=3; last=second"), "{m}");
    let m = rig.gw.ask(&id, "third").await;
    assert!(output(&m).contains("contents=5; last=third"), "{m}");
    let s = rig.gw.session(&id).await;
    assert!(s["agent_session_id"].is_string(), "{s}");
    rig.gw.stop().await;
}

#[tokio::test]
async fn gemini_interrupt_then_a_working_next_message() {
    let rig = Rig::start().await;
    let id = rig.session().await;
    rig.mock.set_delta_delay(Duration::from_millis(300));
    rig.mock.set_padding(200);
    let m = rig.gw.send(&id, "slow please").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = rig.gw.events(&id, "").await;
    read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    let res = rig
        .gw
        .post(&format!("/sessions/{id}/interrupt"), json!({}))
        .await;
    assert_eq!(res.status(), 202);
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "interrupted", "{done}");
    let pid = rig.gw.session(&id).await["pid"].as_u64();

    rig.mock.set_delta_delay(Duration::ZERO);
    rig.mock.set_padding(0);
    let m = rig.gw.ask(&id, "after").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).contains("last=after"), "{m}");
    assert_eq!(
        rig.gw.session(&id).await["pid"].as_u64(),
        pid,
        "cancelled in band: the same child answered"
    );
    rig.gw.stop().await;
}

#[tokio::test]
async fn gemini_permission_allowed_runs_the_tool_and_denied_does_not() {
    let rig = Rig::start().await;
    let id = rig.session().await;

    rig.mock.push_function_call(
        "run_shell_command",
        json!({"command": "touch allowed.txt", "description": "make a file"}),
    );
    let m = rig.gw.send(&id, "make a file").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let req = rig.permission_request(&id).await;
    let options = req.data["options"].as_array().expect("options relayed");
    assert!(
        options.iter().any(|o| o["kind"] == "allow_once"),
        "{options:?}"
    );
    let rid = req.data["request_id"].as_str().unwrap();
    // Neither behavior nor option_id: refused, and the request stays open.
    let res = rig
        .gw
        .post(&format!("/sessions/{id}/permissions/{rid}"), json!({}))
        .await;
    assert_problem(res, 400).await;
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/permissions/{rid}"),
            json!({"behavior": "allow"}),
        )
        .await;
    assert_eq!(res.status(), 204);
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(rig.work().join("allowed.txt").exists(), "the tool ran");
    assert!(
        output(&done).contains("tool_result:run_shell_command"),
        "{done}"
    );

    rig.mock.push_function_call(
        "run_shell_command",
        json!({"command": "touch denied.txt", "description": "make another file"}),
    );
    let m = rig.gw.send(&id, "make another").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = rig.gw.events(&id, "").await;
    let items = read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.permission_request") && i.data["message_id"] == mid
    })
    .await;
    let rid = items.last().unwrap().data["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/permissions/{rid}"),
            json!({"behavior": "deny"}),
        )
        .await;
    assert_eq!(res.status(), 204);
    let done = rig.gw.finished(&id, &mid).await;
    assert!(
        !rig.work().join("denied.txt").exists(),
        "the tool did not run: {done}"
    );
    // The session goes on.
    let m = rig.gw.ask(&id, "still there?").await;
    assert_eq!(m["status"], "completed", "{m}");
    rig.gw.stop().await;
}

/// After a restart the gateway asks the agent to load the conversation
/// (gemini offers `loadSession`). Either it is loaded — the model sees the
/// earlier turn — or the session says `new_conversation` and the agent
/// session id changes: never a silent loss. gemini-cli 0.61 refuses a
/// `session/load` that follows `initialize` within a few seconds ("No
/// previous sessions found", see docs/acp-notes.md), so today the second
/// branch is the one taken; the test holds for both.
#[tokio::test]
async fn gemini_restart_loads_or_says_new_conversation() {
    let rig = Rig::start().await;
    let id = rig.session().await;
    let m = rig.gw.ask(&id, "remember me").await;
    assert_eq!(m["status"], "completed", "{m}");
    let before = rig.gw.session(&id).await["agent_session_id"].clone();
    assert!(before.is_string());

    rig.gw.kill_child(&id).await;
    let m = rig.gw.ask(&id, "after the restart").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).contains("last=after the restart"), "{m}");
    let after = rig.gw.session(&id).await["agent_session_id"].clone();
    let res = rig.gw.events(&id, "").await;
    let items = read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.completed") && i.data["message_id"] == m["id"]
    })
    .await;
    let said_new = items.iter().any(|i| {
        i.event.as_deref() == Some("session.state") && i.data["reason"] == "new_conversation"
    });
    if rig.last_turn_len() == 3 {
        assert_eq!(after, before, "loaded: the same conversation");
        assert!(!said_new);
    } else {
        assert_eq!(rig.last_turn_len(), 1, "a new conversation starts empty");
        assert!(said_new, "a conversation not continued is said: {items:?}");
        assert_ne!(after, before, "the new conversation's id replaces the old");
    }
    rig.gw.stop().await;
}

#[tokio::test]
async fn gemini_killed_mid_reply_fails_then_recovers() {
    let rig = Rig::start().await;
    let id = rig.session().await;
    rig.mock.set_delta_delay(Duration::from_millis(300));
    rig.mock.set_padding(200);
    let m = rig.gw.send(&id, "slow").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = rig.gw.events(&id, "").await;
    read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    rig.gw.kill_child(&id).await;
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "process_exited", "{done}");

    rig.mock.set_delta_delay(Duration::ZERO);
    rig.mock.set_padding(0);
    let m = rig.gw.ask(&id, "again").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).contains("last=again"), "{m}");
    rig.gw.stop().await;
}

/// gemini-cli advertises `promptCapabilities.image`: the posted image goes
/// out as an ACP image block and reaches the model as `inlineData`, intact.
#[tokio::test]
async fn gemini_image_reaches_the_model() {
    let rig = Rig::start().await;
    let id = rig.session().await;
    let m = ask_with(&rig.gw, &id, text_and_image("what is this?")).await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).contains("last=what is this?"), "{m}");
    assert_eq!(
        rig.mock.last_turn_images(),
        vec![json!({"mimeType": "image/png", "data": PNG_1X1})],
        "the model got the image: {:?}",
        rig.mock.turns().last()
    );
    rig.gw.stop().await;
}

// ---------------------------------------------------------------- codex

/// A gateway whose `codex` profile (codex-acp) talks to the mock Responses
/// API, in a fresh HOME with its own CODEX_HOME.
struct CodexRig {
    gw: Gateway,
    mock: MockOpenAi,
    home: tempfile::TempDir,
}

impl CodexRig {
    async fn start(approval_policy: &str) -> CodexRig {
        let mock = MockOpenAi::start().await;
        let home = tempfile::Builder::new()
            .prefix("agentgate-codex-home-")
            .tempdir()
            .unwrap();
        let work = home.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let mut p = codex_profile(&codex_acp_bin());
        p.pass_env.clear();
        p.env = mock
            .child_env(home.path(), approval_policy)
            .into_iter()
            .collect();
        p.cwd = Some(work);
        let gw = Gateway::start(|c| {
            c.profiles.insert("codex".into(), Arc::new(p));
        })
        .await;
        CodexRig { gw, mock, home }
    }

    async fn session(&self) -> String {
        self.gw.create("codex").await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn last_input_len(&self) -> usize {
        let turns = self.mock.turns();
        turns.last().unwrap()["input"].as_array().unwrap().len()
    }
}

#[tokio::test]
async fn codex_keeps_context_and_streams_deltas() {
    let rig = CodexRig::start("never").await;
    let id = rig.session().await;
    let res = rig.gw.stream(&id, json!({"content": "first"})).await;
    let items = read_sse(res, T, |i| {
        matches!(
            i.event.as_deref(),
            Some("message.completed" | "message.failed")
        )
    })
    .await;
    let done = items.last().unwrap();
    assert_eq!(
        done.event.as_deref(),
        Some("message.completed"),
        "{:?}",
        done.data
    );
    let text = done.data["output"].as_str().unwrap();
    assert!(text.starts_with("codex mock #1: input="), "{text}");
    assert!(text.ends_with("last=first"), "{text}");
    let deltas = items
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.delta"))
        .count();
    assert!(deltas >= 3, "the reply streamed word by word: {items:?}");
    let first = rig.last_input_len();

    let m = rig.gw.ask(&id, "second").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).ends_with("last=second"), "{m}");
    assert_eq!(
        rig.last_input_len(),
        first + 2,
        "the earlier turn was sent again"
    );
    rig.gw.stop().await;
}

#[tokio::test]
async fn codex_interrupt_then_a_working_next_message() {
    let rig = CodexRig::start("never").await;
    let id = rig.session().await;
    rig.mock.set_delta_delay(Duration::from_millis(300));
    rig.mock.set_padding(200);
    let m = rig.gw.send(&id, "slow please").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = rig.gw.events(&id, "").await;
    read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    let res = rig
        .gw
        .post(&format!("/sessions/{id}/interrupt"), json!({}))
        .await;
    assert_eq!(res.status(), 202);
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "interrupted", "{done}");
    let pid = rig.gw.session(&id).await["pid"].as_u64();

    rig.mock.set_delta_delay(Duration::ZERO);
    rig.mock.set_padding(0);
    let m = rig.gw.ask(&id, "after").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).ends_with("last=after"), "{m}");
    assert_eq!(rig.gw.session(&id).await["pid"].as_u64(), pid, "same child");
    rig.gw.stop().await;
}

#[tokio::test]
async fn codex_permission_allowed_runs_the_command_and_denied_does_not() {
    let rig = CodexRig::start("untrusted").await;
    let id = rig.session().await;
    let work = rig.home.path().join("work");
    for (file, behavior) in [("allowed.txt", "allow"), ("denied.txt", "deny")] {
        rig.mock
            .push_function_call("exec_command", json!({"cmd": format!("touch {file}")}));
        let m = rig.gw.send(&id, &format!("make {file}")).await;
        let mid = m["id"].as_str().unwrap().to_string();
        let res = rig.gw.events(&id, "").await;
        let items = read_sse(res, T, |i| {
            i.event.as_deref() == Some("message.permission_request") && i.data["message_id"] == mid
        })
        .await;
        let req = &items.last().unwrap().data;
        assert!(
            req["options"].as_array().is_some_and(|o| !o.is_empty()),
            "{req}"
        );
        let rid = req["request_id"].as_str().unwrap();
        let res = rig
            .gw
            .post(
                &format!("/sessions/{id}/permissions/{rid}"),
                json!({"behavior": behavior}),
            )
            .await;
        assert_eq!(res.status(), 204);
        let done = rig.gw.finished(&id, &mid).await;
        if behavior == "allow" {
            assert_eq!(done["status"], "completed", "{done}");
            assert!(output(&done).contains("tool_result:"), "{done}");
        } else {
            // codex-acp 0.16 ends the turn on a rejection: stopReason `cancelled`.
            assert_eq!(done["usage"]["stop_reason"], "cancelled", "{done}");
        }
        assert_eq!(
            work.join(file).exists(),
            behavior == "allow",
            "{file}: {done}"
        );
    }
    let m = rig.gw.ask(&id, "still there?").await;
    assert_eq!(m["status"], "completed", "{m}");
    rig.gw.stop().await;
}

#[tokio::test]
async fn codex_restart_loads_the_conversation() {
    let rig = CodexRig::start("never").await;
    let id = rig.session().await;
    let m = rig.gw.ask(&id, "remember me").await;
    assert_eq!(m["status"], "completed", "{m}");
    let first = rig.last_input_len();
    let before = rig.gw.session(&id).await["agent_session_id"].clone();
    assert!(before.is_string());

    rig.gw.kill_child(&id).await;
    let m = rig.gw.ask(&id, "after the restart").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(
        output(&m).ends_with("last=after the restart"),
        "only this reply: {m}"
    );
    assert_eq!(
        rig.last_input_len(),
        first + 2,
        "the loaded conversation was sent"
    );
    assert_eq!(rig.gw.session(&id).await["agent_session_id"], before);
    rig.gw.stop().await;
}

#[tokio::test]
async fn codex_killed_mid_reply_fails_then_recovers() {
    let rig = CodexRig::start("never").await;
    let id = rig.session().await;
    rig.mock.set_delta_delay(Duration::from_millis(300));
    rig.mock.set_padding(200);
    let m = rig.gw.send(&id, "slow").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = rig.gw.events(&id, "").await;
    read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    rig.gw.kill_child(&id).await;
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["error"]["code"], "process_exited", "{done}");

    rig.mock.set_delta_delay(Duration::ZERO);
    rig.mock.set_padding(0);
    let m = rig.gw.ask(&id, "again").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).ends_with("last=again"), "{m}");
    rig.gw.stop().await;
}

/// codex-acp advertises `promptCapabilities.image`: the image reaches the
/// Responses API as an `input_image` whose `data:` URL holds the same bytes.
#[tokio::test]
async fn codex_image_reaches_the_model() {
    let rig = CodexRig::start("never").await;
    let id = rig.session().await;
    let m = ask_with(&rig.gw, &id, text_and_image("what is this?")).await;
    assert_eq!(m["status"], "completed", "{m}");
    assert!(output(&m).ends_with("last=what is this?"), "{m}");
    let images = rig.mock.last_turn_images();
    assert_eq!(images.len(), 1, "{:?}", rig.mock.turns().last());
    assert_eq!(
        images[0]["image_url"],
        format!("data:image/png;base64,{PNG_1X1}"),
        "{images:?}"
    );
    rig.gw.stop().await;
}

/// A scripted ACP agent whose `initialize` answer advertises no images; it
/// answers each prompt with `prompt #N: K blocks`.
const NO_IMAGE_AGENT: &str = r#"
import json, sys
prompts = 0
def send(v):
    sys.stdout.write(json.dumps(v) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    m = json.loads(line)
    method, i = m.get("method"), m.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": i, "result": {"protocolVersion": 1,
              "agentCapabilities": {"loadSession": False, "promptCapabilities": {"image": False}}}})
    elif method == "session/new":
        send({"jsonrpc": "2.0", "id": i, "result": {"sessionId": "py-1"}})
    elif method == "session/prompt":
        prompts += 1
        text = "prompt #%d: %d blocks" % (prompts, len(m["params"]["prompt"]))
        send({"jsonrpc": "2.0", "method": "session/update", "params": {"sessionId": "py-1",
              "update": {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}}}})
        send({"jsonrpc": "2.0", "id": i, "result": {"stopReason": "end_turn"}})
"#;

/// An agent that did not advertise images: the message with an image is
/// accepted, then fails `unsupported_content` without reaching the agent;
/// the same child takes the next message.
#[tokio::test]
async fn an_agent_without_image_support_fails_the_message_not_the_session() {
    let mut p = codex_profile(std::path::Path::new("python3"));
    p.name = "noimage".into();
    p.command = vec![
        "python3".into(),
        "-u".into(),
        "-c".into(),
        NO_IMAGE_AGENT.into(),
    ];
    p.pass_env.clear();
    let gw = Gateway::start(|c| {
        c.profiles.insert("noimage".into(), Arc::new(p));
    })
    .await;
    let id = gw.create("noimage").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m = ask_with(&gw, &id, text_and_image("what is this?")).await;
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(m["error"]["code"], "unsupported_content", "{m}");
    assert!(
        m["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("promptCapabilities.image"),
        "{m}"
    );
    let pid = gw.session(&id).await["pid"].as_u64();
    let m = gw.ask(&id, "text only").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(
        output(&m),
        "prompt #1: 1 blocks",
        "the image never reached it"
    );
    assert_eq!(gw.session(&id).await["pid"].as_u64(), pid, "same child");
    gw.stop().await;
}

/// One process per request: the handshake, one prompt, then the child ends.
#[tokio::test]
async fn oneshot_with_codex_and_gemini() {
    let rig = CodexRig::start("never").await;
    let res = rig
        .gw
        .post(
            "/oneshot",
            json!({"agent": "codex", "content": "just once"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "completed", "{body}");
    assert!(output(&body).starts_with("codex mock #1:"), "{body}");
    assert!(output(&body).ends_with("last=just once"), "{body}");
    assert!(body["agent_session_id"].is_string(), "{body}");
    rig.gw.stop().await;

    let rig = Rig::start().await;
    let res = rig
        .gw
        .post(
            "/oneshot",
            json!({"agent": "gemini", "content": "just once"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "completed", "{body}");
    assert!(
        output(&body).starts_with("gemini mock #1: contents=1; last=just once"),
        "{body}"
    );
    rig.gw.stop().await;
}

// ------------------------------------------------------ claude-code-acp

/// `AGENTGATE_TEST_CLAUDE_CODE_ACP_BIN`, else
/// `tests/acp/node_modules/.bin/claude-code-acp`. Panics (failing the test,
/// never skipping it) when neither exists.
fn claude_code_acp_bin() -> PathBuf {
    let p = match std::env::var_os("AGENTGATE_TEST_CLAUDE_CODE_ACP_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/acp/node_modules/.bin/claude-code-acp"),
    };
    assert!(
        p.exists(),
        "claude-code-acp is not installed at {}: run scripts/install-acp-agents.sh",
        p.display()
    );
    p
}

/// `M` of the Messages mock's `mock reply #N: messages=M; last=TEXT`.
fn messages_seen(m: &Value) -> usize {
    let text = output(m);
    let at = text.find("messages=").expect("a mock reply") + "messages=".len();
    text[at..]
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{text}"))
}

/// claude-code-acp 0.16.2 (Zed's adapter, with the Claude Agent SDK's own
/// CLI) against the Messages mock, offline: a conversation through the
/// gateway keeps its context, and an image reaches the model intact.
#[tokio::test]
async fn claude_code_acp_keeps_context_and_takes_images() {
    let mock = mock_anthropic::MockAnthropic::start().await;
    let home = mock_anthropic::temp_home();
    let work = home.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut p = codex_profile(&claude_code_acp_bin());
    p.name = "claude-acp".into();
    p.pass_env.clear();
    p.env = mock.child_env(home.path()).into_iter().collect();
    p.cwd = Some(work);
    let gw = Gateway::start(|c| {
        c.profiles.insert("claude-acp".into(), Arc::new(p));
    })
    .await;
    let id = gw.create("claude-acp").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let first = gw.ask(&id, "first").await;
    assert_eq!(first["status"], "completed", "{first}");
    assert!(output(&first).ends_with("last=first"), "{first}");
    let second = gw.ask(&id, "second").await;
    assert!(output(&second).ends_with("last=second"), "{second}");
    assert_eq!(
        messages_seen(&second),
        messages_seen(&first) + 2,
        "the first turn was sent again: {second}"
    );
    assert!(gw.session(&id).await["agent_session_id"].is_string());

    let m = ask_with(&gw, &id, text_and_image("and this?")).await;
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(messages_seen(&m), messages_seen(&second) + 2, "{m}");
    let turn = mock.conversation_requests().pop().unwrap();
    let last = turn["messages"].as_array().unwrap().last().unwrap().clone();
    let images: Vec<&Value> = last["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "image")
        .collect();
    assert_eq!(images.len(), 1, "{last}");
    assert_eq!(images[0]["source"]["data"], PNG_1X1, "{last}");
    assert_eq!(images[0]["source"]["media_type"], "image/png", "{last}");
    gw.stop().await;
}
