//! Regression tests for the session core's correctness defects found by an
//! adversarial run (issue 14): interrupts racing a finished reply, framing of
//! multi-line `lines` input, `?wait=true` on a deleted session, a hard
//! `max_children`, a `Last-Event-ID` ahead of the log, a reaper that must not
//! block its session, HEAD and `Accept`, and concurrent DELETEs.
//!
//! Real children (python3, sed, sh) through the real HTTP stack; every wait
//! is bounded (`eventually`, `read_sse` with a limit).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

const PROFILES: &str = r#"
[agents.sigint_ender]
description = "starts a reply to each line; SIGINT ends it, then the child dies by that signal"
command = ["python3", "-u", "-c", '''
import os, signal, sys
import time
def ended(*_):
    os.write(1, b"partial\n__END__\n")
    # Dies only after the gateway has read the end of its reply.
    time.sleep(0.5)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
signal.signal(signal.SIGINT, ended)
for line in sys.stdin:
    os.write(1, b"working\n")
''']
protocol = "lines"
end_marker = "^__END__$"
restart_budget = 2
stop_grace = "1s"

[agents.late]
description = "answers, then prints a stray line after its reply ended"
command = ["python3", "-u", "-c", '''
import sys, time
for line in sys.stdin:
    print("ok")
    print("__END__", flush=True)
    if line.strip() == "stray":
        time.sleep(0.2)
        print("stray", flush=True)
''']
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"

[agents.halfway]
description = "prints half a reply to each line, then nothing"
command = ["python3", "-u", "-c", "import sys\nfor line in sys.stdin:\n    print('first half', flush=True)"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"

[agents.silent]
description = "reads lines and never answers"
command = ["python3", "-u", "-c", "import sys\nfor line in sys.stdin:\n    pass"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"

[agents.escaper]
description = "starts a grandchild in a session of its own (out of its process group)"
command = ["sh", "-c", "setsid sleep 43210 & exec cat"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"

[agents.slow_stop]
description = "echoes lines; after its stdin closes it takes 6 s to exit"
command = ["sh", "-c", "cat; sleep 6"]
protocol = "lines"
quiet_ms = 100
stop_grace = "30s"
"#;

async fn gateway(tweak: impl FnOnce(&mut agentgate::Config)) -> Gateway {
    Gateway::start(|c| {
        c.add_profiles_toml("core test profiles", PROFILES).unwrap();
        c.add_profiles_toml(
            "examples/profiles/python.toml",
            &std::fs::read_to_string("examples/profiles/python.toml").unwrap(),
        )
        .unwrap();
        tweak(c);
    })
    .await
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// One sample of `/metrics`, by its exact name and labels.
async fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = gw.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

// 1. An exit the gateway caused with its own SIGINT is no crash, even when
//    the reply ended before the child died; the session is never closed.
#[tokio::test]
async fn a_child_ended_by_the_gateways_interrupt_is_not_a_crash() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sigint_ender").await);
    // restart_budget = 2: three crashes would close the session.
    for round in 0..4 {
        // Once the child has started its reply (its SIGINT handler is set).
        let stream = gw.stream(&id, json!({"content": "work"})).await;
        let items = read_sse(stream, T, |i| i.event.as_deref() == Some("message.delta")).await;
        let mid = items.last().unwrap().data["message_id"]
            .as_str()
            .unwrap()
            .to_string();
        let res = gw
            .post(&format!("/sessions/{id}/interrupt"), json!({}))
            .await;
        assert_eq!(res.status(), 202, "round {round}");
        let done = gw.finished(&id, &mid).await;
        assert_eq!(done["status"], "interrupted", "round {round}: {done}");
        assert_eq!(
            done["output"], "working\npartial\n",
            "the reply ended before the child died"
        );
        eventually(T, || async {
            gw.session(&id).await["state"] == "suspended"
        })
        .await;
    }
    assert_eq!(metric(&gw, "agentgate_child_crashes_total").await, 0.0);
    assert_eq!(
        metric(&gw, "agentgate_sessions_closed_total{reason=\"failed\"}").await,
        0.0
    );
    assert_ne!(gw.session(&id).await["state"], "closed");
    gw.stop().await;
}

// 1. The race itself: interrupts sent right after each message. Whatever the
//    timing, a 409 means the reply had completed, a 202 that it was
//    interrupted, no exit is a crash, and the session stays open.
#[tokio::test]
async fn interrupts_racing_replies_never_close_the_session() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sed").await);
    let other = reqwest::Client::new();
    for round in 0..40u64 {
        let content = format!("r{round}");
        let m = gw.send(&id, &content).await;
        let mid = m["id"].as_str().unwrap().to_string();
        let res = other
            .post(gw.url(&format!("/sessions/{id}/interrupt")))
            .send()
            .await
            .unwrap();
        let interrupt = res.status().as_u16();
        let done = gw.finished(&id, &mid).await;
        match interrupt {
            409 => {
                assert_eq!(done["status"], "completed", "round {round}: {done}");
                assert_eq!(done["output"], format!("{content}\n"));
            }
            202 => assert!(
                done["status"] == "interrupted" || done["id"] != json!(mid),
                "round {round}: {done}"
            ),
            other => panic!("round {round}: interrupt answered {other}"),
        }
    }
    assert_eq!(metric(&gw, "agentgate_child_crashes_total").await, 0.0);
    assert_ne!(gw.session(&id).await["state"], "closed");
    // The session still answers.
    assert_eq!(gw.ask(&id, "after").await["output"], "after\n");
    gw.stop().await;
}

// 2. The shipped python profile: each input line ends with a prompt, so a
//    multi-line message gets its own output and the next message its own.
#[tokio::test]
async fn multi_line_python_input_keeps_its_output() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("python").await);
    let a = gw
        .ask(&id, "import time\ntime.sleep(0.3)\nprint('A-result')")
        .await;
    let b = gw.ask(&id, "print('B-result')").await;
    assert_eq!(a["status"], "completed");
    assert_eq!(a["output"], "A-result\n");
    assert_eq!(b["output"], "B-result\n");
    // A block: continuation prompts end its lines, an empty line closes it.
    let c = gw.ask(&id, "for i in range(3):\n    print(i)\n\n").await;
    assert_eq!(c["output"], "0\n1\n2\n");
    assert_eq!(gw.ask(&id, "print(i * 10)").await["output"], "20\n");
    gw.stop().await;
}

// 2. sed answers each line with a marker: every line's answer is output.
#[tokio::test]
async fn multi_line_input_to_a_marker_profile_keeps_every_line() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sed").await);
    assert_eq!(gw.ask(&id, "a\nb\nc").await["output"], "a\nb\nc\n");
    assert_eq!(gw.ask(&id, "d").await["output"], "d\n");
    gw.stop().await;
}

// 2. Output printed after a reply ended and before the next message was
//    written is never given to the next message; it is logged and counted.
#[tokio::test]
async fn output_between_messages_is_counted_not_attributed() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("late").await);
    assert_eq!(gw.ask(&id, "stray").await["output"], "ok\n");
    eventually(T, || async {
        metric(&gw, "agentgate_unattributed_output_bytes_total").await >= 6.0
    })
    .await;
    assert_eq!(gw.ask(&id, "next").await["output"], "ok\n");
    gw.stop().await;
}

// 3. `?wait=true` waiters of a session deleted meanwhile get 410.
#[tokio::test]
async fn waiters_of_a_deleted_session_get_410() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("silent").await);
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let http = gw.http.clone();
            let url = gw.url(&format!("/sessions/{id}/messages?wait=true"));
            tokio::spawn(async move {
                http.post(url)
                    .json(&json!({"content": format!("m{i}")}))
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    eventually(T, || async {
        gw.get_json(&format!("/sessions/{id}/messages")).await["messages"]
            .as_array()
            .unwrap()
            .len()
            == 4
    })
    .await;
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    for w in waiters {
        assert_problem(w.await.unwrap(), 410).await;
    }
    gw.stop().await;
}

// 4. `--max-children` is hard: a message that needs a child when every slot
//    is busy waits (queued, no child) until one frees.
#[tokio::test]
async fn max_children_is_a_hard_limit() {
    let gw = gateway(|c| c.max_children = 2).await;
    let s1 = id_of(&gw.create("silent").await);
    let s2 = id_of(&gw.create("silent").await);
    gw.send(&s1, "busy").await;
    gw.send(&s2, "busy").await;
    let s3 = id_of(&gw.create("sed").await);
    let m = gw.send(&s3, "third").await;
    let mid = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["status"], "queued");
    let view = gw.session(&s3).await;
    assert!(view["pid"].is_null(), "{view}");
    assert_eq!(metric(&gw, "agentgate_live_children").await, 2.0);
    // A slot frees: the waiting message runs.
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{s1}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    eventually(T, || async {
        gw.get_json(&format!("/sessions/{s3}/messages/{mid}")).await["status"] == "completed"
    })
    .await;
    assert!(metric(&gw, "agentgate_live_children").await <= 2.0);
    gw.stop().await;
}

// 5. A `Last-Event-ID` ahead of the log: ids at or below it are never sent.
#[tokio::test]
async fn a_cursor_ahead_of_the_log_skips_up_to_it() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sed").await);
    gw.ask(&id, "one").await;
    let replay = read_sse(gw.events(&id, "").await, T, |i| {
        i.event.as_deref() == Some("message.completed")
    })
    .await;
    let last = replay.last().and_then(|i| i.id).unwrap();
    let ahead = last + 3;
    let res = gw
        .http
        .get(gw.url(&format!("/sessions/{id}/events")))
        .header("last-event-id", ahead.to_string())
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(read_sse(res, T, move |i| i.id.is_some_and(|n| n > ahead)));
    gw.ask(&id, "two").await;
    gw.ask(&id, "three").await;
    let items = reader.await.unwrap();
    for item in items.iter().filter(|i| i.id.is_some()) {
        assert!(
            item.id.unwrap() > ahead,
            "id {:?} sent after {ahead}",
            item.id
        );
    }
    gw.stop().await;
}

// 6. The reaper stops a child beside the session task: the session answers
//    at once and shows that it has no child while the old one still exits.
#[tokio::test]
async fn the_reaper_does_not_block_its_session() {
    let gw = gateway(|c| {
        c.idle_timeout = Duration::from_millis(300);
        c.reap_interval = Duration::from_millis(100);
    })
    .await;
    let id = id_of(&gw.create("slow_stop").await);
    assert_eq!(gw.ask(&id, "hi").await["output"], "hi\n");
    let pid = gw.session(&id).await["pid"].as_u64().unwrap() as u32;
    eventually(T, || async {
        gw.session(&id).await["state"] == "suspended"
    })
    .await;
    let res = gw
        .post(&format!("/sessions/{id}/interrupt"), json!({}))
        .await;
    assert_problem(res, 409).await;
    assert!(gw.session(&id).await["pid"].is_null());
    assert!(
        alive(pid),
        "the old child is still in its 6 s exit: the answers above did not wait for it"
    );
    gw.stop().await;
}

// 7. HEAD wherever GET works; `Accept` parsed with q-values, case-insensitive.
#[tokio::test]
async fn head_and_accept_follow_rfc_9110() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sed").await);
    for path in [
        "/".to_string(),
        "/healthz".to_string(),
        "/sessions".to_string(),
        format!("/sessions/{id}"),
        format!("/sessions/{id}/messages"),
        "/openapi.yaml".to_string(),
    ] {
        let res = gw.http.head(gw.url(&path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "HEAD {path}");
        assert!(
            res.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }
    let post = |accept: &'static str| {
        gw.http
            .post(gw.url(&format!("/sessions/{id}/messages")))
            .header("accept", accept)
            .json(&json!({"content": "x"}))
            .send()
    };
    let res = post("text/event-stream;q=0").await.unwrap();
    assert_eq!(res.status(), 202, "q=0 means not SSE");
    let res = post("TEXT/EVENT-STREAM").await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(res);
    gw.stop().await;
}

// 8. Concurrent DELETEs: exactly one closes the session (204) and publishes
//    `session.closed`; the others find no session (404).
#[tokio::test]
async fn concurrent_deletes_close_once() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sed").await);
    let events = gw.events(&id, "").await;
    let log = tokio::spawn(read_sse(events, T, |i| {
        i.event.as_deref() == Some("session.closed")
    }));
    let deletes: Vec<_> = (0..5)
        .map(|_| {
            let http = gw.http.clone();
            let url = gw.url(&format!("/sessions/{id}"));
            tokio::spawn(async move { http.delete(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for d in deletes {
        statuses.push(d.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, vec![204, 404, 404, 404, 404]);
    let items = log.await.unwrap();
    let closed = items
        .iter()
        .filter(|i| i.event.as_deref() == Some("session.closed"))
        .count();
    assert_eq!(closed, 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_running_message_shows_its_reply_so_far() {
    let gw = gateway(|_| {}).await;
    let id = gw.create("halfway").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m = gw.send(&id, "go").await;
    let mid = m["id"].as_str().unwrap().to_string();
    let res = gw.events(&id, "").await;
    // The child may write the line and its newline apart (python's print
    // writes `end` on its own), so wait for the delta that ends the line.
    let mut so_far = String::new();
    read_sse(res, T, |i| {
        if i.event.as_deref() == Some("message.delta") {
            so_far.push_str(i.data["text"].as_str().unwrap_or_default());
        }
        so_far.ends_with('\n')
    })
    .await;
    let running = gw.message(&id, &mid).await;
    assert_eq!(running["status"], "running");
    assert_eq!(running["output"], "first half\n", "{running}");
    let res = gw
        .post(&format!("/sessions/{id}/interrupt"), json!({}))
        .await;
    assert_eq!(res.status(), 202);
    let done = gw.finished(&id, &mid).await;
    assert_eq!(done["output"], "first half\n", "{done}");
}

/// The `sleep 43210` processes that left their process group (`setsid`):
/// their pid and process group.
fn escaped_sleeps() -> Vec<(u32, u32)> {
    processes()
        .into_iter()
        .filter(|p| p.state != 'Z')
        .filter(|p| {
            std::fs::read(format!("/proc/{}/cmdline", p.pid))
                .is_ok_and(|c| c == b"sleep\x0043210\x00")
        })
        .map(|p| (p.pid, p.pgrp))
        .collect()
}

/// A process the child starts that leaves the child's process group
/// (`setsid`) escapes the group kill; it still carries the child's
/// environment marker, and goes when the child does.
#[tokio::test]
async fn a_grandchild_that_left_the_group_ends_with_its_session() {
    let gw = gateway(|_| {}).await;
    let s = gw.create("escaper").await;
    let id = id_of(&s);
    let pgid = s["pid"].as_u64().expect("a child") as u32;
    eventually(T, || async { !escaped_sleeps().is_empty() }).await;
    let (pid, group) = escaped_sleeps()[0];
    assert_ne!(group, pgid, "the grandchild left the child's process group");
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    eventually(T, || async { !alive(pid) }).await;
    gw.stop().await;
}
