//! Several gateways on one PostgreSQL store (SPEC §8), as deployed: the
//! real binary as nodes, a real nginx in front (scripts/nginx-throwaway.sh),
//! the throwaway PostgreSQL the test command starts, the real Claude Code
//! CLI against the suite's mock of the Anthropic API. Loopback only; every
//! wait is a bounded poll.
//!
//! - `kill -9` of a node under traffic: every session answers its next
//!   message, claude sessions remember their conversation, every message
//!   ends `completed` or with a code, every stored message has its end in
//!   the event log, and nothing of the killed node keeps running.
//! - No affinity (round robin): the same answers, and every node streams a
//!   session's events with the same ids.
//! - Split brain: a node stopped past its lease (SIGSTOP) and continued
//!   writes nothing more for the session it lost and ends its child.

mod common;
#[path = "support/mock_anthropic.rs"]
mod mock_anthropic;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::nginx::Nginx;
use common::*;
use mock_anthropic::{claude_bin, last_user_text, temp_home, MockAnthropic};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
/// Short leases: a dead node's sessions move within seconds.
const LEASE_TTL: &str = "2s";

/// A child whose reply waits for a file: it prints `first half`, then,
/// once `GO` exists, the line and the end marker. It leaves a `sleep`
/// grandchild in its process group (what a killed node must not leave
/// behind).
const GATED: &str = r#"
import os, sys, time
go = sys.argv[1]
for line in sys.stdin:
    print("first half", flush=True)
    while not os.path.exists(go):
        time.sleep(0.02)
    print(line.strip(), flush=True)
    print("__END__", flush=True)
"#;

fn profiles(dir: &Path) -> String {
    let script = dir.join("gated.py");
    std::fs::write(&script, GATED).unwrap();
    let go = dir.join("go");
    format!(
        r#"
[agents.gated]
command = ["sh", "-c", "sleep 1000 & exec python3 -u {script} {go}"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"

[agents.sed]
command = ["sed", "-u", "a __END__"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"
"#,
        script = script.display(),
        go = go.display()
    )
}

/// One node: the binary on `store` as `name`, with the suite's profiles
/// (in `dir`) and the built-in claude profile pointed at `mock`. Every node
/// shares `home`: claude's transcripts must be readable by all of them.
fn node(home: &Path, dir: &Path, store: &str, name: &str, mock: &MockAnthropic) -> Node {
    let config = dir.join("agents.toml");
    if !config.exists() {
        std::fs::write(&config, profiles(dir)).unwrap();
    }
    let mut cmd = sealed_command(home);
    cmd.env("AGENTGATE_CLAUDE_BIN", claude_bin())
        .envs(mock.child_env(home))
        .current_dir(home)
        .args(["--listen", "127.0.0.1:0", "--store", store, "--config"])
        .arg(&config)
        .args(["--node-id", name, "--lease-ttl", LEASE_TTL]);
    Node::spawn(cmd)
}

fn addr(node: &Node) -> String {
    node.base.trim_start_matches("http://").to_string()
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// Posts `content` to session `id` through `base` with `?wait=true`; a
/// 503 (the session is between nodes) is retried within the bound.
async fn ask(http: &reqwest::Client, base: &str, id: &str, content: &str) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let res = http
            .post(format!("{base}/sessions/{id}/messages?wait=true"))
            .json(&json!({ "content": content }))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        if status == 503 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        return body;
    }
}

/// Every event of session `id` read from `base`, up to the end of message
/// `last` (its `message.completed` or `message.failed`).
async fn events_until(http: &reqwest::Client, base: &str, id: &str, last: &str) -> Vec<SseItem> {
    let res = http
        .get(format!("{base}/sessions/{id}/events"))
        .send()
        .await
        .unwrap();
    read_sse(res, T, |i| {
        i.data["message_id"] == last
            && matches!(
                i.event.as_deref(),
                Some("message.completed") | Some("message.failed")
            )
    })
    .await
}

/// The pids of the processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == pid && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_behind_nginx_lose_no_conversation_when_one_is_killed() {
    let url = fresh_postgres_db().await;
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let mut nodes: HashMap<String, Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| (n.to_string(), node(home.path(), dir.path(), &url, n, &mock)))
        .collect();
    let upstreams: Vec<String> = nodes.values().map(addr).collect();
    let proxy = Nginx::start("hash", &upstreams);
    let base = proxy.url.clone();

    // 3 claude sessions and 27 gated ones, created through the proxy.
    let mut claude = Vec::new();
    for _ in 0..3 {
        let s = post_json(
            &http,
            format!("{base}/sessions"),
            json!({"agent": "claude"}),
        )
        .await;
        claude.push(id_of(&s));
    }
    let mut gated = Vec::new();
    for _ in 0..27 {
        let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "gated"})).await;
        gated.push(id_of(&s));
    }
    for (i, id) in claude.iter().enumerate() {
        let m = ask(&http, &base, id, &format!("my name is Ada{i}")).await;
        assert_eq!(m["status"], "completed", "{m}");
    }
    // A message in flight in every gated session: each child holds its
    // reply at "first half" until the go file exists.
    let mut in_flight = HashMap::new();
    for id in &gated {
        let res = http
            .post(format!("{base}/sessions/{id}/messages"))
            .json(&json!({"content": "before"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        let m: Value = res.json().await.unwrap();
        in_flight.insert(id.clone(), id_of(&m));
    }
    for id in &gated {
        let mid = in_flight[id].clone();
        eventually(T, || {
            let http = http.clone();
            let url = format!("{base}/sessions/{id}/messages/{mid}");
            async move { get_ok(&http, url).await["output"] == "first half\n" }
        })
        .await;
    }

    // The node holding the first claude session dies with everything it runs.
    let victim = get_ok(&http, format!("{base}/sessions/{}", claude[0])).await["node"]
        .as_str()
        .expect("a claude session with a child has a holder")
        .to_string();
    let mut dead = nodes.remove(&victim).unwrap();
    let dead_pid = dead.child.id();
    let groups = children_of(dead_pid);
    assert!(!groups.is_empty(), "the victim runs children");
    let held_by_victim: Vec<String> = {
        let mut v = Vec::new();
        for id in gated.iter().chain(&claude) {
            let s = get_ok(&http, format!("{base}/sessions/{id}")).await;
            if s["node"] == victim.as_str() {
                v.push(id.clone());
            }
        }
        v
    };
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    std::fs::write(dir.path().join("go"), "").unwrap();

    // Every session answers its next message through the proxy.
    for id in &gated {
        let m = ask(&http, &base, id, "after").await;
        assert_eq!(m["output"], "first half\nafter\n", "{m}");
    }
    for (i, id) in claude.iter().enumerate() {
        let before = mock.conversation_requests().len();
        let m = ask(&http, &base, id, "what is my name?").await;
        assert_eq!(m["status"], "completed", "{m}");
        let requests = mock.conversation_requests();
        let sent = requests[before..]
            .iter()
            .rev()
            .find(|r| last_user_text(r["messages"].as_array().unwrap()) == "what is my name?")
            .expect("the question reached the model")["messages"]
            .as_array()
            .unwrap()
            .clone();
        let earlier: Vec<String> = sent
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| last_user_text(std::slice::from_ref(m)))
            .collect();
        assert!(
            earlier.contains(&format!("my name is Ada{i}")),
            "session {id} forgot its conversation: {earlier:?}"
        );
    }

    // Every message ended completed or with a code; the in-flight ones of
    // the killed node with `gateway_lost`; each one's end is in the log.
    for id in gated.iter().chain(&claude) {
        let history = get_ok(&http, format!("{base}/sessions/{id}/messages")).await;
        let messages = history["messages"].as_array().unwrap().clone();
        for m in &messages {
            match m["status"].as_str().unwrap() {
                "completed" => {}
                "failed" => assert_eq!(m["error"]["code"], "gateway_lost", "{m}"),
                other => panic!("message {m} ended {other}"),
            }
        }
        if let Some(mid) = in_flight.get(id) {
            let m = messages.iter().find(|m| m["id"] == mid.as_str()).unwrap();
            if held_by_victim.contains(id) {
                assert_eq!(m["error"]["code"], "gateway_lost", "{m}");
            } else {
                assert_eq!(m["output"], "first half\nbefore\n", "{m}");
            }
        }
        let last = id_of(messages.last().unwrap());
        let events = events_until(&http, &base, id, &last).await;
        let ids: Vec<u64> = events.iter().filter_map(|e| e.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        for m in &messages {
            let end = if m["status"] == "completed" {
                "message.completed"
            } else {
                "message.failed"
            };
            assert!(
                events
                    .iter()
                    .any(|e| e.event.as_deref() == Some(end) && e.data["message_id"] == m["id"]),
                "session {id}: no {end} for {m}"
            );
        }
    }

    // Nothing of the killed node runs any more (its children's groups,
    // grandchildren included, were ended by the surviving nodes).
    eventually(T, || async {
        groups.iter().all(|g| group_members(*g).is_empty())
    })
    .await;
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_affinity_every_node_gives_the_same_answers_and_ids() {
    let url = fresh_postgres_db().await;
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| node(home.path(), dir.path(), &url, n, &mock))
        .collect();
    let upstreams: Vec<String> = nodes.iter().map(addr).collect();
    let proxy = Nginx::start("rr", &upstreams);
    let base = proxy.url.clone();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "sed"})).await;
        sessions.push(id_of(&s));
    }
    let mut last = HashMap::new();
    for round in 0..5 {
        for id in &sessions {
            let text = format!("{id} round {round}");
            let m = ask(&http, &base, id, &text).await;
            assert_eq!(m["output"], format!("{text}\n"), "{m}");
            last.insert(id.clone(), id_of(&m));
        }
    }
    for id in &sessions {
        let mut seen: Vec<Vec<(u64, String)>> = Vec::new();
        for n in &nodes {
            let events = events_until(&http, &n.base, id, &last[id]).await;
            seen.push(
                events
                    .iter()
                    .filter_map(|e| Some((e.id?, e.event.clone()?)))
                    .collect(),
            );
        }
        assert!(seen[0].len() >= 5 * 4, "{:?}", seen[0]);
        assert_eq!(seen[0], seen[1], "nodes disagree on session {id}");
        assert_eq!(seen[0], seen[2], "nodes disagree on session {id}");
    }
    // A session deleted through one node ends the streams of every node.
    let id = &sessions[0];
    let mut streams = Vec::new();
    for n in &nodes {
        // Open (headers received) before the DELETE below.
        let res = http
            .get(format!(
                "{}/sessions/{id}/events?after={}",
                n.base,
                u64::MAX / 2
            ))
            .send()
            .await
            .unwrap();
        streams.push(tokio::spawn(read_sse(res, T, |i| {
            i.event.as_deref() == Some("session.closed")
        })));
    }
    let res = http
        .delete(format!("{base}/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    for s in streams {
        s.await.unwrap();
    }
    for n in &nodes {
        let res = http
            .get(format!("{}/sessions/{id}", n.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_stopped_past_its_lease_writes_nothing_more_and_ends_its_child() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let url = fresh_postgres_db().await;
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let a = node(home.path(), dir.path(), &url, "a", &mock);
    let b = node(home.path(), dir.path(), &url, "b", &mock);
    let s = post_json(
        &http,
        format!("{}/sessions", a.base),
        json!({"agent": "gated"}),
    )
    .await;
    let id = id_of(&s);
    // No node holds a new session: its child starts with its first message,
    // on the node that message reaches.
    assert_eq!(s["node"], Value::Null, "{s}");
    assert_eq!(s["pid"], Value::Null, "{s}");
    let res = http
        .post(format!("{}/sessions/{id}/messages", a.base))
        .json(&json!({"content": "cut"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let cut = id_of(&res.json::<Value>().await.unwrap());
    let view = get_ok(&http, format!("{}/sessions/{id}", a.base)).await;
    assert_eq!(view["node"], "a", "{view}");
    let pgid = view["pid"].as_u64().expect("a child on a") as u32;
    eventually(T, || {
        let http = http.clone();
        let url = format!("{}/sessions/{id}/messages/{cut}", b.base);
        async move { get_ok(&http, url).await["output"] == "first half\n" }
    })
    .await;

    // a stops answering; past its lease, b takes the session (the sweeper:
    // a running message and no live holder) and fails the cut message.
    let a_pid = Pid::from_raw(a.child.id() as i32);
    kill(a_pid, Signal::SIGSTOP).unwrap();
    eventually(T, || {
        let http = http.clone();
        let url = format!("{}/sessions/{id}/messages/{cut}", b.base);
        async move { get_ok(&http, url).await["error"]["code"] == "gateway_lost" }
    })
    .await;
    let view = get_ok(&http, format!("{}/sessions/{id}", b.base)).await;
    assert_eq!(view["node"], "b", "{view}");
    // a's child may now finish the reply it holds: a must not store it.
    std::fs::write(dir.path().join("go"), "").unwrap();
    kill(a_pid, Signal::SIGCONT).unwrap();
    eventually(T, || async { group_members(pgid).is_empty() }).await;
    eventually(T, || {
        let http = http.clone();
        let url = format!("{}/metrics", a.base);
        async move {
            let text = http.get(url).send().await.unwrap().text().await.unwrap();
            text.contains("agentgate_leases_lost_total 1\n")
        }
    })
    .await;
    // The session goes on on b; what a held back never reached the store.
    let m = ask(&http, &b.base, &id, "next").await;
    assert_eq!(m["output"], "first half\nnext\n");
    let cut_now = get_ok(&http, format!("{}/sessions/{id}/messages/{cut}", a.base)).await;
    assert_eq!(cut_now["status"], "failed", "{cut_now}");
    assert_eq!(cut_now["error"]["code"], "gateway_lost");
    let events = events_until(&http, &a.base, &id, &id_of(&m)).await;
    assert!(
        !events
            .iter()
            .any(|e| e.event.as_deref() == Some("message.completed")
                && e.data["message_id"] == cut.as_str()),
        "the stopped node's late completion reached the log"
    );
    assert_eq!(
        get_ok(&http, format!("{}/sessions/{id}", a.base)).await["node"],
        "b"
    );
}
