//! The real binary with the real Claude Code CLI (offline, against the
//! suite's mock of the Anthropic API), killed with `kill -9` while claude
//! streams a reply, then started again on the same store: the session is
//! back with its history, the reply that was cut is `gateway_lost`, a reader
//! resuming with `Last-Event-ID` gets every later event exactly once, and
//! the next message remembers the conversation (`--resume` from the stored
//! conversation id: the mock sees the earlier turns). On SQLite and on the
//! throwaway PostgreSQL that the test command starts.

mod common;
#[path = "support/mock_anthropic.rs"]
mod mock_anthropic;

use std::time::Duration;

use common::*;
use mock_anthropic::{claude_bin, last_user_text, temp_home, MockAnthropic};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// The binary with its built-in `claude` profile pointed at the pinned CLI
/// and `mock`; `home` is the gateway's and the CLI's `HOME` and working
/// directory (the transcripts `--resume` reads live there).
fn start(home: &std::path::Path, mock: &MockAnthropic, store: &str) -> Node {
    start_with(home, mock, store, &[])
}

/// [`start`] with more flags.
fn start_with(home: &std::path::Path, mock: &MockAnthropic, store: &str, flags: &[&str]) -> Node {
    let mut cmd = sealed_command(home);
    cmd.env("AGENTGATE_CLAUDE_BIN", claude_bin())
        .envs(mock.child_env(home))
        .current_dir(home)
        .args(["--listen", "127.0.0.1:0", "--store", store]);
    // On PostgreSQL: one node name across restarts (see tests/durable.rs).
    let node = home.file_name().unwrap().to_string_lossy().into_owned();
    cmd.args(["--node-id", &node]).args(flags);
    Node::spawn(cmd)
}

/// [`ask_at`], and the reply completed.
async fn ask(http: &reqwest::Client, base: &str, id: &str, content: &str) -> Value {
    let m = ask_at(http, base, id, content).await;
    assert_eq!(m["status"], "completed", "{m}");
    m
}

async fn killed_mid_reply_then_restarted(store: &str) {
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let mut node = start(home.path(), &mock, store);
    let base = node.base.clone();
    let s = post_json(
        &http,
        format!("{base}/sessions"),
        json!({"agent": "claude"}),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_string();
    let first = ask(&http, &base, &id, "my name is Ada").await;
    let pid = get_ok(&http, format!("{base}/sessions/{id}")).await["pid"]
        .as_u64()
        .expect("a live claude child") as u32;

    // A slow reply: the first delta at once, the rest 2 s apart.
    mock.set_delta_delay(Duration::from_secs(2));
    let res = http
        .post(format!("{base}/sessions/{id}/messages"))
        .header("accept", "text/event-stream")
        .json(&json!({"content": "tell me a long story"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    let cut = seen
        .iter()
        .find_map(|i| i.data["message_id"].as_str())
        .unwrap()
        .to_string();
    // Every event of the session so far, as a reader holds them.
    let all = read_sse(
        http.get(format!("{base}/sessions/{id}/events"))
            .send()
            .await
            .unwrap(),
        T,
        |i| i.event.as_deref() == Some("message.delta"),
    )
    .await;
    let last_seen = all.iter().filter_map(|i| i.id).max().unwrap();

    node.child.kill().unwrap();
    node.child.wait().unwrap();
    eventually(T, || async { group_members(pid).is_empty() }).await;
    mock.set_delta_delay(Duration::ZERO);

    let node = start(home.path(), &mock, store);
    let base = node.base.clone();
    let list = get_ok(&http, format!("{base}/sessions")).await;
    assert!(
        list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id.as_str()),
        "{list}"
    );
    let view = get_ok(&http, format!("{base}/sessions/{id}")).await;
    assert_eq!(view["state"], "suspended");
    let history = get_ok(&http, format!("{base}/sessions/{id}/messages")).await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    assert_eq!(messages[0]["status"], "completed");
    assert_eq!(messages[0]["output"], first["output"]);
    assert_eq!(messages[1]["id"], cut.as_str());
    assert_eq!(messages[1]["status"], "failed");
    assert_eq!(messages[1]["error"]["code"], "gateway_lost");

    // Resuming after the last id seen: every later event once, in order.
    let res = http
        .get(format!("{base}/sessions/{id}/events"))
        .header("last-event-id", last_seen.to_string())
        .send()
        .await
        .unwrap();
    let resumed = read_sse(res, T, |i| i.data["reason"] == "restarted").await;
    let ids: Vec<u64> = resumed.iter().filter_map(|i| i.id).collect();
    assert!(!ids.is_empty());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(ids.iter().all(|n| *n > last_seen), "{ids:?}");
    assert!(
        resumed
            .iter()
            .any(|i| i.event.as_deref() == Some("message.failed")
                && i.data["message_id"] == cut.as_str()),
        "the cut reply's end is in the log"
    );

    // The conversation goes on where it was: claude resumed its transcript.
    let before = mock.conversation_requests().len();
    ask(&http, &base, &id, "what is my name?").await;
    let requests = mock.conversation_requests();
    assert!(requests.len() > before);
    let sent = requests.last().unwrap()["messages"].as_array().unwrap();
    assert_eq!(last_user_text(sent), "what is my name?");
    let earlier: Vec<String> = sent
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| last_user_text(std::slice::from_ref(m)))
        .collect();
    assert!(
        earlier.iter().any(|t| t == "my name is Ada"),
        "the resumed CLI sent the earlier turn: {earlier:?}"
    );

    // A clean restart: the session comes back with its count and usage sum
    // as stored beside it (its messages stay in the store until read).
    let before = get_ok(&http, format!("{base}/sessions/{id}")).await;
    assert!(
        before["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0,
        "claude reported usage: {before}"
    );
    node.terminate();
    let node = start(home.path(), &mock, store);
    let after = get_ok(&http, format!("{}/sessions/{id}", node.base)).await;
    assert_eq!(after["message_count"], 3, "{after}");
    assert_eq!(after["usage"], before["usage"], "{after}");
    // And the sum goes on from there.
    ask(&http, &node.base, &id, "and now?").await;
    let later = get_ok(&http, format!("{}/sessions/{id}", node.base)).await;
    assert!(
        later["usage"]["output_tokens"].as_u64() > before["usage"]["output_tokens"].as_u64(),
        "{later}"
    );
}

#[tokio::test]
async fn claude_killed_mid_reply_comes_back_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("agentgate.db").display());
    killed_mid_reply_then_restarted(&store).await;
}

#[tokio::test]
async fn claude_killed_mid_reply_comes_back_on_postgres() {
    killed_mid_reply_then_restarted(&fresh_postgres_db().await).await;
}

#[tokio::test]
async fn a_fork_copies_history_memory_no_longer_holds() {
    // Memory keeps 1 finished message (2 at most); the fork's copy of the
    // older ones comes from the store.
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let store = format!("sqlite:{}", home.path().join("agentgate.db").display());
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let node = start_with(home.path(), &mock, &store, &["--history-in-memory", "1"]);
    let base = node.base.clone();
    let s = post_json(
        &http,
        format!("{base}/sessions"),
        json!({"agent": "claude"}),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_string();
    for n in 0..5 {
        ask(&http, &base, &id, &format!("turn {n}")).await;
    }
    let res = http
        .post(format!("{base}/sessions/{id}/fork"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let fork: Value = res.json().await.unwrap();
    assert_eq!(status, 201, "{fork}");
    let fork_id = fork["id"].as_str().unwrap();
    assert_eq!(fork["message_count"], 5, "{fork}");
    let history = get_ok(&http, format!("{base}/sessions/{fork_id}/messages")).await;
    let inputs: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["input"].as_str().unwrap())
        .collect();
    assert_eq!(
        inputs,
        ["turn 0", "turn 1", "turn 2", "turn 3", "turn 4"],
        "the fork has the whole history, in order"
    );
}
