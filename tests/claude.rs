//! The real Claude Code CLI behind the gateway, offline against the suite's
//! mock of the Anthropic Messages API: context, deltas, agent events, resume
//! after reaping and after kill -9, interrupt, permission relay, one-shot,
//! fallback and prewarm (with the warm-up request, also against a stand-in
//! CLI that logs its stdin).

mod common;
#[path = "support/mock_anthropic.rs"]
mod mock_anthropic;

use std::sync::Arc;
use std::time::Duration;

use agentgate::config::{claude_profile, AgentProfile, Config};
use common::*;
use mock_anthropic::{claude_bin, temp_home, MockAnthropic};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A gateway whose `claude` profile talks to `mock` with a fresh HOME.
struct Rig {
    gw: Gateway,
    mock: MockAnthropic,
    home: tempfile::TempDir,
}

fn claude_for(
    mock: &MockAnthropic,
    home: &std::path::Path,
    tweak: impl FnOnce(&mut AgentProfile),
) -> AgentProfile {
    let mut p = claude_profile(&claude_bin());
    // Only what the mock needs: nothing of the runner's own ANTHROPIC_*/CLAUDE_* leaks in.
    p.pass_env.clear();
    p.env = mock.child_env(home).into_iter().collect();
    p.cwd = Some(home.to_path_buf());
    p.stop_grace = Duration::from_secs(5);
    tweak(&mut p);
    p
}

impl Rig {
    async fn start(
        tweak_profile: impl FnOnce(&mut AgentProfile),
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        let mock = MockAnthropic::start().await;
        let home = temp_home();
        let profile = claude_for(&mock, home.path(), tweak_profile);
        let gw = Gateway::start(|c| {
            c.profiles.insert("claude".into(), Arc::new(profile));
            tweak(c);
        })
        .await;
        Rig { gw, mock, home }
    }

    async fn session(&self) -> String {
        self.gw.create("claude").await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn last_request_len(&self) -> usize {
        let reqs = self.mock.conversation_requests();
        reqs.last().unwrap()["messages"].as_array().unwrap().len()
    }
}

#[tokio::test]
async fn context_deltas_and_agent_events_across_three_messages() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let id = rig.session().await;
    let res = rig.gw.stream(&id, json!({"content": "first"})).await;
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
    let names: Vec<&str> = items.iter().filter_map(|i| i.event.as_deref()).collect();
    let first_delta = names
        .iter()
        .position(|n| *n == "message.delta")
        .expect("deltas");
    assert!(first_delta < names.len() - 1);
    let kinds: Vec<&str> = items
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.agent_event"))
        .map(|i| i.data["event"]["type"].as_str().unwrap())
        .collect();
    for k in ["system", "stream_event", "assistant", "result"] {
        assert!(kinds.contains(&k), "{k} forwarded: {kinds:?}");
    }
    let done = items.last().unwrap();
    assert_eq!(done.data["output"], "mock reply #1: messages=2; last=first");
    assert!(
        done.data["usage"]["usage"].is_object(),
        "usage kept: {}",
        done.data
    );
    let streamed: String = items
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.delta"))
        .map(|i| i.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, "mock reply #1: messages=2; last=first");

    assert_eq!(
        rig.gw.ask(&id, "second").await["output"],
        "mock reply #2: messages=4; last=second"
    );
    assert_eq!(
        rig.gw.ask(&id, "third").await["output"],
        "mock reply #3: messages=6; last=third"
    );
    let s = rig.gw.session(&id).await;
    assert!(s["agent_session_id"].is_string());
    rig.gw.stop().await;
}

#[tokio::test]
async fn resume_after_the_reaper_and_after_kill_9() {
    let rig = Rig::start(
        |_| {},
        |c| {
            c.idle_timeout = Duration::from_millis(500);
            c.reap_interval = Duration::from_millis(100);
        },
    )
    .await;
    let id = rig.session().await;
    rig.gw.ask(&id, "remember me").await;
    let pid = rig.gw.session(&id).await["pid"].as_u64().unwrap() as u32;
    eventually(T, || async {
        rig.gw.session(&id).await["state"] == "suspended"
    })
    .await;
    eventually(T, || async { !alive(pid) }).await;
    let m = rig.gw.ask(&id, "after the reaper").await;
    assert_eq!(m["status"], "completed");
    assert_eq!(
        rig.last_request_len(),
        4,
        "the resumed child sent the earlier turn"
    );

    // kill -9 while idle: the next message resumes too.
    rig.gw.kill_child(&id).await;
    let m = rig.gw.ask(&id, "after kill").await;
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(rig.last_request_len(), 6);
    rig.gw.stop().await;
}

#[tokio::test]
async fn interrupt_a_slow_reply_then_go_on() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let id = rig.session().await;
    rig.mock.set_delta_delay(Duration::from_millis(500));
    let m = rig.gw.send(&id, "slow please").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let queued = rig.gw.send(&id, "queued behind").await;
    // Wait for the first delta: the model is streaming.
    let res = rig.gw.events(&id, "").await;
    read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    let res = rig
        .gw
        .post(&format!("/sessions/{id}/interrupt"), json!({}))
        .await;
    assert_eq!(res.status(), 202);
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "interrupted", "{done}");
    rig.mock.set_delta_delay(Duration::ZERO);
    let behind = rig.gw.finished(&id, queued["id"].as_str().unwrap()).await;
    assert_eq!(
        behind["status"], "completed",
        "a queued message still runs: {behind}"
    );
    let next = rig.gw.ask(&id, "and now").await;
    assert_eq!(next["status"], "completed");
    assert!(
        next["output"].as_str().unwrap().ends_with("last=and now"),
        "{next}"
    );
    rig.gw.stop().await;
}

/// Sends a message that makes the model ask for Bash `touch FILE`; returns
/// the message id, the permission request event and the file path.
async fn ask_for_touch(rig: &Rig, id: &str, name: &str) -> (String, Value, std::path::PathBuf) {
    let file = rig.home.path().join(name);
    rig.mock.push_bash(&format!("touch {}", file.display()));
    let m = rig.gw.send(id, "please touch the file").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = rig.gw.events(id, "").await;
    let items = read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.permission_request")
            && i.data["message_id"] == mid.as_str()
    })
    .await;
    let req = items.last().unwrap().data.clone();
    assert_eq!(req["tool_name"], "Bash");
    assert!(req["input"]["command"].as_str().unwrap().contains("touch"));
    (mid, req, file)
}

/// Allow and deny, answered by a client. The profile's timeout is the
/// default (minutes), so the answers never race it on a loaded machine.
#[tokio::test]
async fn permission_allow_and_deny() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let id = rig.session().await;

    let (mid, req, file) = ask_for_touch(&rig, &id, "allowed").await;
    let rid = req["request_id"].as_str().unwrap();
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/permissions/{rid}"),
            json!({"behavior": "allow"}),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(rig.gw.finished(&id, &mid).await["status"], "completed");
    assert!(file.exists(), "allow ran the tool");
    // Answered ids are gone.
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/permissions/{rid}"),
            json!({"behavior": "allow"}),
        )
        .await;
    assert_problem(res, 404).await;

    let (mid, req, file) = ask_for_touch(&rig, &id, "denied").await;
    let rid = req["request_id"].as_str().unwrap();
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/permissions/{rid}"),
            json!({"behavior": "deny", "message": "not today"}),
        )
        .await;
    assert_eq!(res.status(), 204);
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "completed");
    assert!(!file.exists(), "deny did not run the tool");
    let tool_result = rig.mock.conversation_requests().last().unwrap().to_string();
    assert!(
        tool_result.contains("not today"),
        "the model saw the reason"
    );

    rig.gw.stop().await;
}

/// Nobody answers: denied after the profile's permission_timeout (1 s here;
/// no answer is sent, so nothing races it).
#[tokio::test]
async fn permission_timeout_denies() {
    let rig = Rig::start(|p| p.permission_timeout = Duration::from_secs(1), |_| {}).await;
    let id = rig.session().await;
    let (mid, _req, file) = ask_for_touch(&rig, &id, "timed-out").await;
    let done = rig.gw.finished(&id, &mid).await;
    assert_eq!(done["status"], "completed");
    assert!(!file.exists());
    assert!(rig
        .mock
        .conversation_requests()
        .last()
        .unwrap()
        .to_string()
        .contains("no answer"));
    rig.gw.stop().await;
}

#[tokio::test]
async fn oneshot_with_claude() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let res = rig
        .gw
        .post(
            "/oneshot",
            json!({"agent": "claude", "content": "just once"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["output"], "mock reply #1: messages=2; last=just once");
    assert_eq!(body["status"], "completed");
    assert!(body["agent_session_id"].is_string());
    rig.gw.stop().await;
}

#[tokio::test]
async fn fallback_mode_keeps_context_with_resume() {
    let rig = Rig::start(|p| p.persistent = false, |_| {}).await;
    let id = rig.session().await;
    let one = rig.gw.ask(&id, "one").await;
    assert_eq!(one["fallback"], true);
    assert_eq!(one["output"], "mock reply #1: messages=2; last=one");
    let two = rig.gw.ask(&id, "two").await;
    assert_eq!(two["output"], "mock reply #2: messages=4; last=two");
    rig.gw.stop().await;
}

#[tokio::test]
async fn a_prewarmed_claude_child_answers_the_first_message() {
    let rig = Rig::start(|p| p.prewarm = 1, |_| {}).await;
    let warm = || async {
        let agents = rig.gw.get_json("/agents").await;
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "claude")
            .unwrap()["warm"]
            .as_u64()
            .unwrap()
    };
    eventually(T, || async { warm().await == 1 }).await;
    let before = children_of_this_process();
    let s = rig.gw.create("claude").await;
    let pid = s["pid"].as_u64().unwrap() as u32;
    assert!(before.contains(&pid), "the session got the warm child");
    let m = rig.gw.ask(s["id"].as_str().unwrap(), "warm hello").await;
    assert_eq!(m["output"], "mock reply #1: messages=2; last=warm hello");
    // The warm-up (a local context breakdown) called no API: one model call, no count_tokens.
    let kinds: Vec<_> = rig.mock.recorded().iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [mock_anthropic::RequestKind::Conversation],
        "{kinds:?}"
    );
    eventually(T, || async { warm().await == 1 }).await;
    rig.gw.stop().await;
}

#[tokio::test]
async fn a_conversation_that_cannot_be_resumed_fails_once_then_starts_anew() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let id = rig.session().await;
    rig.gw.ask(&id, "before").await;
    // The transcript disappears (a wiped HOME, say) and the child dies.
    std::fs::remove_dir_all(rig.home.path().join(".claude/projects")).unwrap();
    rig.gw.kill_child(&id).await;
    let failed = rig.gw.ask(&id, "after").await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("No conversation found"),
        "{failed}"
    );
    let fresh = rig.gw.ask(&id, "again").await;
    assert_eq!(fresh["status"], "completed", "{fresh}");
    assert_eq!(rig.last_request_len(), 2, "a new conversation");
    rig.gw.stop().await;
}

/// A model API error reaches the client through the gateway as a failed
/// message with `agent_error` (the CLI reports it as `subtype: "success"`
/// with `is_error: true`), and the session answers the next message.
#[tokio::test]
async fn a_model_api_error_fails_the_message_with_agent_error() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let id = rig.session().await;
    rig.mock.fail_next(1, 500);
    let failed = rig.gw.ask(&id, "this one fails").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "agent_error", "{failed}");
    let ok = rig.gw.ask(&id, "this one works").await;
    assert_eq!(ok["status"], "completed", "{ok}");
    rig.gw.stop().await;
}

/// A stand-in for the claude CLI speaking stream-json: logs every stdin line
/// to `argv[1]`, answers control requests with success and user lines with
/// `system/init`, `assistant`, `result`.
const FAKE_CLAUDE: &str = r#"
import json, sys
log = open(sys.argv[1], "a", buffering=1)
for line in sys.stdin:
    log.write(line)
    m = json.loads(line)
    if m.get("type") == "control_request":
        print(json.dumps({"type": "control_response", "response": {"subtype": "success", "request_id": m["request_id"], "response": {"categories": []}}}), flush=True)
    elif m.get("type") == "user":
        text = "echo: " + m["message"]["content"]
        print(json.dumps({"type": "system", "subtype": "init", "session_id": "fake-1"}), flush=True)
        print(json.dumps({"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}), flush=True)
        print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": text, "session_id": "fake-1"}), flush=True)
"#;

/// The stdin lines a fake child logged, parsed.
fn logged(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_warm_claude_child_gets_the_warm_up_and_its_answer_stays_out_of_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake_claude.py");
    std::fs::write(&script, FAKE_CLAUDE).unwrap();
    let (with, without) = (
        dir.path().join("with.jsonl"),
        dir.path().join("without.jsonl"),
    );
    let profile = |name: &str, log: &std::path::Path, warm_up: bool| {
        format!(
            "[agents.{name}]\ncommand = [\"python3\", \"-u\", {:?}, {:?}]\nprotocol = \"claude-stream-json\"\nprewarm = 1\nwarm_up = {warm_up}\nstop_grace = \"1s\"\n",
            script.display().to_string(),
            log.display().to_string()
        )
    };
    let toml = profile("with", &with, true) + &profile("without", &without, false);
    let gw = Gateway::start(|c| c.add_profiles_toml("fake", &toml).unwrap()).await;
    // The warm-up is written as the child starts, before any session exists.
    eventually(T, || async { !logged(&with).is_empty() }).await;
    let first = &logged(&with)[0];
    assert_eq!(first["type"], "control_request");
    assert_eq!(first["request"]["subtype"], "get_context_usage");
    assert_eq!(
        first["request"]["detail"], "summary",
        "no token-count calls"
    );

    for (agent, log, lines) in [("with", &with, 2), ("without", &without, 1)] {
        let warm = || async {
            gw.get_json("/agents").await["agents"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["name"] == agent)
                .unwrap()["warm"]
                .as_u64()
                .unwrap()
        };
        eventually(T, || async { warm().await == 1 }).await;
        let before = children_of_this_process();
        let s = gw.create(agent).await;
        let pid = s["pid"].as_u64().unwrap() as u32;
        assert!(
            before.contains(&pid),
            "{agent}: the session got the warm child"
        );
        let id = s["id"].as_str().unwrap();
        let res = gw.stream(id, json!({"content": "hi"})).await;
        let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
        assert_eq!(items.last().unwrap().data["output"], "echo: hi", "{agent}");
        let kinds: Vec<&str> = items
            .iter()
            .filter(|i| i.event.as_deref() == Some("message.agent_event"))
            .map(|i| i.data["event"]["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["system", "assistant", "result"],
            "{agent}: no warm-up answer"
        );
        let lines_seen = logged(log);
        assert_eq!(lines_seen.len(), lines, "{agent}: {lines_seen:?}");
        assert_eq!(lines_seen.last().unwrap()["type"], "user", "{agent}");
    }
    gw.stop().await;
}
