//! The real binary: start-up errors, SIGTERM with live sessions.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("agents.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_config_stops_startup_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[agents.py]\ncommand = [\"python3\"]\nprotocol = \"lines\"\nend_marker = \"([\"\n",
    );
    let out = sealed_command(dir.path())
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("configuration error"))
        .expect(&err);
    assert!(
        line.contains(&path.display().to_string()) && line.contains("agents.py.end_marker"),
        "{line}"
    );
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let out = sealed_command(home.path())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
}

#[tokio::test]
async fn sigterm_fails_running_messages_ends_streams_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), PROFILES);
    let mut child = KillOnDrop(
        sealed_command(dir.path())
            // Memory: the shutdown closes sessions (a durable store keeps them; tests/durable.rs).
            .args(["--listen", "127.0.0.1:0", "--store", "memory", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let line = first_line(child.stdout.take().unwrap(), T);
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    let mut groups = Vec::new();
    for agent in ["shell", "python", "demo"] {
        let s: serde_json::Value =
            post_json(&http, format!("{base}/sessions"), json!({"agent": agent})).await;
        groups.push((
            s["id"].as_str().unwrap().to_string(),
            s["pid"].as_u64().unwrap() as u32,
        ));
    }
    let python = groups[1].0.clone();
    let stream = http
        .post(format!("{base}/sessions/{python}/messages"))
        .header("accept", "text/event-stream")
        .json(&json!({"content": "import time; time.sleep(60)"}))
        .send()
        .await
        .unwrap();
    let events = http
        .get(format!("{base}/sessions/{python}/events"))
        .send()
        .await
        .unwrap();
    let shell_pid = groups[0].1;
    eventually(T, || async { group_members(shell_pid).len() >= 2 }).await;
    let mut pids: Vec<u32> = groups
        .iter()
        .flat_map(|(_, pgid)| group_members(*pgid))
        .collect();
    pids.sort();
    assert!(
        pids.len() >= 4,
        "leaders and the shell's grandchild: {pids:?}"
    );

    // The message stream sees the message start, then SIGTERM.
    let reader = tokio::spawn(read_sse(stream, T, |i| {
        i.event.as_deref() == Some("message.failed")
    }));
    let log_reader = tokio::spawn(read_sse(events, T, |i| {
        i.event.as_deref() == Some("session.closed")
    }));
    eventually(T, || async {
        let m: serde_json::Value = http
            .get(format!("{base}/sessions/{python}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        m["state"] == "busy"
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();

    let items = reader.await.unwrap();
    let failed = items.last().unwrap();
    assert_eq!(failed.event.as_deref(), Some("message.failed"));
    assert_eq!(failed.data["error"]["code"], "shutdown");
    let log = log_reader.await.unwrap();
    assert_eq!(log.last().unwrap().data["reason"], "shutdown", "{log:#?}");

    let mut status = None;
    eventually(T, || {
        status = status.or_else(|| child.try_wait().unwrap());
        let done = status.is_some();
        async move { done }
    })
    .await;
    assert_eq!(status.unwrap().code(), Some(0));
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the gateway");
    }
}
