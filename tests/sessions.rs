//! Sessions over HTTP with real children (python3, sed, sh, the demo agent).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn python_repl_keeps_state_between_messages() {
    let gw = Gateway::start(|_| {}).await;
    let s = gw.create("python").await;
    let id = s["id"].as_str().unwrap();
    let first = gw.ask(id, "x = 41").await;
    assert_eq!(first["status"], "completed");
    assert_eq!(first["output"], "");
    let second = gw.ask(id, "print(x + 1)").await;
    assert_eq!(second["output"], "42\n");
    let history = gw.get_json(&format!("/sessions/{id}/messages")).await;
    let inputs: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["input"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["x = 41", "print(x + 1)"]);
    gw.stop().await;
}

#[tokio::test]
async fn sed_echoes_korean_and_emoji_unchanged() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("sed").await["id"].as_str().unwrap().to_string();
    let text = "안녕하세요 세계 🎉👩‍💻 ünïcödé";
    let m = gw.ask(&id, text).await;
    assert_eq!(m["output"], format!("{text}\n"));
    gw.stop().await;
}

#[tokio::test]
async fn a_character_written_in_two_pieces_is_not_mangled() {
    // The child writes its reply in three pieces that split 😀 and 한 between
    // them, and writes each piece only once the test has seen the previous
    // one arrive (a file it waits for): every piece is a read of its own.
    let dir = tempfile::tempdir().unwrap();
    let go = |n: u32| dir.path().join(format!("go{n}"));
    let script = format!(
        "import os,sys,time\n\
         def wait(p):\n    while not os.path.exists(p): time.sleep(0.005)\n\
         for line in sys.stdin:\n    \
         b = '😀한'.encode()\n    \
         sys.stdout.buffer.write(b'a' + b[:2]); sys.stdout.buffer.flush(); wait({go1:?})\n    \
         sys.stdout.buffer.write(b[2:5]); sys.stdout.buffer.flush(); wait({go2:?})\n    \
         sys.stdout.buffer.write(b[5:] + b'\\n__END__\\n'); sys.stdout.buffer.flush()\n",
        go1 = go(1).display().to_string(),
        go2 = go(2).display().to_string(),
    );
    let toml = format!(
        "[agents.split]\ncommand = [\"python3\", \"-u\", \"-c\", {}]\nprotocol = \"lines\"\nend_marker = \"^__END__$\"\nstop_grace = \"300ms\"\n",
        toml_string(&script)
    );
    let gw = Gateway::start(|c| c.add_profiles_toml("split", &toml).unwrap()).await;
    let id = gw.create("split").await["id"].as_str().unwrap().to_string();
    gw.send(&id, "go").await;
    let is_delta = |i: &SseItem| i.event.as_deref() == Some("message.delta");
    let mut deltas = Vec::new();
    let mut after = String::new();
    for n in 1..=3 {
        let items = read_sse(gw.events(&id, &after).await, T, |i| is_delta(i)).await;
        let delta = items.iter().rev().find(|i| is_delta(i)).unwrap();
        deltas.push(delta.data["text"].as_str().unwrap().to_string());
        after = format!("?after={}", delta.id.unwrap());
        if n < 3 {
            std::fs::write(go(n), "").unwrap();
        }
    }
    assert_eq!(
        deltas,
        ["a", "😀", "한\n"],
        "one delta per piece, no U+FFFD"
    );
    let done = read_sse(gw.events(&id, &after).await, T, |i| {
        i.event.as_deref() == Some("message.completed")
    })
    .await;
    assert_eq!(done.last().unwrap().data["output"], "a😀한\n");
    gw.stop().await;
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[tokio::test]
async fn demo_agent_streams_in_order_with_growing_ids_and_remembers() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("demo").await["id"].as_str().unwrap().to_string();
    let res = gw.stream(&id, json!({"content": "my name is Ada"})).await;
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
    assert!(items[0].retry.is_some(), "a retry hint comes first");
    let names: Vec<&str> = items.iter().filter_map(|i| i.event.as_deref()).collect();
    assert_eq!(names.first(), Some(&"message.queued"));
    assert_eq!(names[1], "message.started");
    assert!(
        names.iter().filter(|n| **n == "message.delta").count() >= 3,
        "word by word: {names:?}"
    );
    assert_eq!(names.last(), Some(&"message.completed"));
    let ids: Vec<u64> = items.iter().filter_map(|i| i.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let second = gw.ask(&id, "what did I say first?").await;
    assert_eq!(second["output"], "First you said: \"my name is Ada\"\n");

    // The session log: every id from 1, no holes, in order.
    let res = gw.events(&id, "").await;
    let all = read_sse(res, T, |i| {
        i.data["message_id"] == second["id"] && i.event.as_deref() == Some("message.completed")
    })
    .await;
    let ids: Vec<u64> = all.iter().filter_map(|i| i.id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    gw.stop().await;
}

#[tokio::test]
async fn last_event_id_replays_and_overflow_gives_a_gap() {
    let gw = Gateway::start(|c| c.replay_events = 8).await;
    let id = gw.create("demo").await["id"].as_str().unwrap().to_string();
    gw.ask(&id, "one two three four five six seven eight nine ten")
        .await;
    let events = format!("/sessions/{id}/events");
    // Resume from an id still in the ring: the next event is exactly id+1.
    let res = gw.http.get(gw.url(&events)).send().await.unwrap();
    let all = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
    let gap = all
        .iter()
        .find(|i| i.event.as_deref() == Some("stream.gap"))
        .expect("a gap: the ring holds 8");
    assert_eq!(gap.data["from"], 1);
    let last = all.last().unwrap().id.unwrap();
    let resume_from = last - 3;
    let res = gw
        .http
        .get(gw.url(&events))
        .header("last-event-id", resume_from.to_string())
        .send()
        .await
        .unwrap();
    let replay = read_sse(res, T, |i| i.id == Some(last)).await;
    let ids: Vec<u64> = replay.iter().filter_map(|i| i.id).collect();
    assert_eq!(ids, vec![resume_from + 1, resume_from + 2, last]);
    // ?after= works the same.
    let res = gw
        .http
        .get(gw.url(&format!("{events}?after={}", last - 1)))
        .send()
        .await
        .unwrap();
    let replay = read_sse(res, T, |i| i.id == Some(last)).await;
    assert_eq!(
        replay.iter().filter_map(|i| i.id).collect::<Vec<_>>(),
        vec![last]
    );
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_messages_run_one_at_a_time_in_order() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("python").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sends = (0..3).map(|i| {
        let gw = &gw;
        let id = id.clone();
        async move {
            gw.send(&id, &format!("import time; time.sleep(0.2); print({i})"))
                .await
        }
    });
    let accepted = futures::future::join_all(sends).await;
    let mut done = Vec::new();
    for m in &accepted {
        done.push(gw.finished(&id, m["id"].as_str().unwrap()).await);
    }
    // Instants, not strings: RFC 3339 text does not sort (fraction lengths differ).
    let at = |m: &serde_json::Value, key: &str| {
        time::OffsetDateTime::parse(
            m[key].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    done.sort_by_key(|m| at(m, "started_at"));
    for pair in done.windows(2) {
        assert!(
            at(&pair[0], "finished_at") <= at(&pair[1], "started_at"),
            "one at a time"
        );
        assert!(
            at(&pair[0], "created_at") <= at(&pair[1], "created_at"),
            "in arrival order"
        );
    }
    for m in &done {
        assert_eq!(m["status"], "completed");
        let n = m["input"].as_str().unwrap().chars().rev().nth(1).unwrap();
        assert_eq!(m["output"], format!("{n}\n"));
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let gw = Gateway::start(|c| c.max_queue = 1).await;
    let id = gw.create("python").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let running = gw.send(&id, "import time; time.sleep(30)").await;
    gw.running(&id, running["id"].as_str().unwrap()).await;
    let queued = gw.send(&id, "print(1)").await;
    assert_eq!(queued["status"], "queued");
    assert_eq!(gw.session(&id).await["queued"], 1);
    let res = gw
        .post(
            &format!("/sessions/{id}/messages"),
            json!({"content": "print(2)"}),
        )
        .await;
    assert!(res.headers().get("retry-after").is_some());
    assert_problem(res, 429).await;
    gw.stop().await;
}

#[tokio::test]
async fn the_reaper_ends_idle_children_and_the_next_message_starts_one() {
    let gw = Gateway::start(|c| {
        c.idle_timeout = Duration::from_millis(500);
        c.reap_interval = Duration::from_millis(100);
    })
    .await;
    let s = gw.create("python").await;
    let id = s["id"].as_str().unwrap().to_string();
    gw.ask(&id, "x = 5").await;
    let pid = gw.session(&id).await["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));
    eventually(T, || async {
        gw.session(&id).await["state"] == "suspended"
    })
    .await;
    eventually(T, || async { !alive(pid) }).await;
    assert!(gw.session(&id).await["pid"].is_null());
    let m = gw.ask(&id, "print('back')").await;
    assert_eq!(m["output"], "back\n");
    let new_pid = gw.session(&id).await["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, pid);
    let res = gw.events(&id, "").await;
    let items = read_sse(res, T, |i| i.data["reason"] == "idle").await;
    assert_eq!(items.last().unwrap().data["state"], "suspended");
    gw.stop().await;
}

#[tokio::test]
async fn delete_ends_the_whole_process_group() {
    let gw = Gateway::start(|_| {}).await;
    let s = gw.create("shell").await;
    let id = s["id"].as_str().unwrap();
    let pid = s["pid"].as_u64().unwrap() as u32;
    eventually(T, || async { group_members(pid).len() >= 2 }).await;
    let members = group_members(pid);
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    eventually(T, || async { members.iter().all(|p| !alive(*p)) }).await;
    assert_problem(gw.get(&format!("/sessions/{id}")).await, 404).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_child_killed_mid_message_fails_it_and_the_session_recovers() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("python").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m = gw
        .send(
            &id,
            "import sys; sys.stderr.write('about to nap\\n'); print('napping', flush=True); import time; time.sleep(30)",
        )
        .await;
    // Once its stdout line arrived, the child has written its stderr line too.
    let res = gw.events(&id, "").await;
    read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.delta") && i.data["message_id"] == m["id"]
    })
    .await;
    gw.kill_child(&id).await;
    let failed = gw.finished(&id, m["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "process_exited");
    let detail = failed["error"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("signal 9") && detail.contains("about to nap"),
        "{detail}"
    );
    assert_eq!(gw.session(&id).await["state"], "suspended");
    assert_eq!(gw.ask(&id, "print(2 + 2)").await["output"], "4\n");
    gw.stop().await;
}

#[tokio::test]
async fn a_timeout_fails_the_message_and_the_child_survives() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("python").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    gw.ask(&id, "y = 7").await;
    let res = gw
        .post(
            &format!("/sessions/{id}/messages?wait=true"),
            json!({"content": "import time; time.sleep(30)", "timeout_ms": 300}),
        )
        .await;
    let m: serde_json::Value = res.json().await.unwrap();
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error"]["code"], "timeout");
    // SIGINT stopped the sleep, not the REPL: its state is intact.
    assert_eq!(gw.ask(&id, "print(y)").await["output"], "7\n");
    gw.stop().await;
}

#[tokio::test]
async fn interrupt_stops_the_running_message_and_409_when_idle() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("python").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_problem(
        gw.post(&format!("/sessions/{id}/interrupt"), json!({}))
            .await,
        409,
    )
    .await;
    let m = gw.send(&id, "import time; time.sleep(30)").await;
    gw.running(&id, m["id"].as_str().unwrap()).await;
    let res = gw
        .post(&format!("/sessions/{id}/interrupt"), json!({}))
        .await;
    assert_eq!(res.status(), 202);
    let done = gw.finished(&id, m["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "interrupted");
    assert_eq!(done["error"]["code"], "interrupted");
    assert_eq!(
        gw.ask(&id, "print('still here')").await["output"],
        "still here\n"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_client_leaving_an_sse_stream_does_not_stop_the_message() {
    let gw = Gateway::start(|_| {}).await;
    let id = gw.create("python").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The message runs until the test says so (a flag file): the client
    // leaves while it runs, whatever the machine's speed.
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("go");
    let content = format!(
        "import os, time; _w = [time.sleep(0.02) for _ in iter(lambda: os.path.exists({:?}), True)]; print('done')",
        flag.display().to_string()
    );
    let res = gw.stream(&id, json!({ "content": content })).await;
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.started")).await;
    let mid = items.last().unwrap().data["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(location.ends_with(&mid));
    // The response was dropped above, while the message runs …
    assert_eq!(gw.message(&id, &mid).await["status"], "running");
    std::fs::write(&flag, b"").unwrap();
    // … and the message still completes.
    let done = gw.finished(&id, &mid).await;
    assert_eq!(done["output"], "done\n");
    let res = gw.events(&id, "").await;
    let replay = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
    assert_eq!(replay.last().unwrap().data["output"], "done\n");
    gw.stop().await;
}

#[tokio::test]
async fn oneshot_json_and_sse() {
    let gw = Gateway::start(|_| {}).await;
    let res = gw
        .post(
            "/oneshot",
            json!({"agent": "python", "content": "print(6 * 7)"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["output"], "42\n");
    assert_eq!(body["exit_code"], 0);
    assert_eq!(body["status"], "completed");
    let res = gw
        .post_sse(
            "/oneshot",
            json!({"agent": "demo", "content": "hello oneshot"}),
        )
        .await;
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
    let text: String = items
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.delta"))
        .map(|i| i.data["text"].as_str().unwrap())
        .collect();
    assert!(text.contains("hello oneshot"), "{text}");
    assert_eq!(items.last().unwrap().data["output"].as_str().unwrap(), text);
    let res = gw
        .post(
            "/oneshot",
            json!({"agent": "python", "content": "import time; time.sleep(30)", "timeout_ms": 200}),
        )
        .await;
    assert_problem(res, 504).await;
    gw.stop().await;
}

#[tokio::test]
async fn errors_are_problem_json() {
    let gw = Gateway::start(|c| c.max_body = 4096).await;
    let id = gw.create("demo").await["id"].as_str().unwrap().to_string();
    let msgs = format!("/sessions/{id}/messages");
    // 400: bad JSON, unknown field, missing body, unknown agent
    let res = gw
        .http
        .post(gw.url(&msgs))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;
    let p = assert_problem(
        gw.post(&msgs, json!({"content": "x", "contnet": 1})).await,
        400,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("unknown field"),
        "{p}"
    );
    let empty = gw
        .http
        .post(gw.url(&msgs))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_problem(empty, 400).await;
    // Without Content-Type even an empty body is 415 (the CSRF defence).
    assert_problem(gw.http.post(gw.url(&msgs)).send().await.unwrap(), 415).await;
    assert_problem(gw.post("/sessions", json!({"agent": "nope"})).await, 400).await;
    // 404: unknown session, message, route
    assert_problem(
        gw.get("/sessions/00000000-0000-4000-8000-000000000000")
            .await,
        404,
    )
    .await;
    assert_problem(gw.get("/sessions/not-a-uuid/messages").await, 404).await;
    assert_problem(
        gw.get(&format!("{msgs}/00000000-0000-4000-8000-000000000000"))
            .await,
        404,
    )
    .await;
    assert_problem(gw.get("/nowhere").await, 404).await;
    // 405 with Allow
    let res = gw.http.put(gw.url("/sessions")).send().await.unwrap();
    assert_eq!(res.headers()["allow"], "GET, POST, HEAD");
    assert_problem(res, 405).await;
    let res = gw.http.delete(gw.url(&msgs)).send().await.unwrap();
    assert_problem(res, 405).await;
    // 413
    let big = "x".repeat(8192);
    assert_problem(gw.post(&msgs, json!({"content": big})).await, 413).await;
    // Bad Last-Event-ID (even non-UTF-8 bytes) → 400, not a route miss.
    let events = format!("/sessions/{id}/events");
    let res = gw
        .http
        .get(gw.url(&events))
        .header("last-event-id", "seven")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;
    let bad = reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap();
    let res = gw
        .http
        .get(gw.url(&events))
        .header("last-event-id", bad)
        .send()
        .await
        .unwrap();
    assert_problem(res, 400).await;
    // A whole float is a fine number of milliseconds; a fraction is not.
    let res = gw
        .post(
            &format!("{msgs}?wait=true"),
            json!({"content": "x", "timeout_ms": 5000.0}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_problem(
        gw.post(&msgs, json!({"content": "x", "timeout_ms": 1.5}))
            .await,
        400,
    )
    .await;
    // 415
    let res = gw
        .http
        .post(gw.url(&msgs))
        .header("content-type", "text/plain")
        .body("{\"content\":\"x\"}")
        .send()
        .await
        .unwrap();
    assert_problem(res, 415).await;
    gw.stop().await;
}

#[tokio::test]
async fn agents_list_and_health() {
    let gw = Gateway::start(|_| {}).await;
    let agents = gw.get_json("/agents").await;
    let names: Vec<&str> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for n in ["demo", "python", "sed", "shell"] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert_eq!(gw.get_json("/healthz").await["status"], "ok");
    let spec = gw.get("/openapi.yaml").await.text().await.unwrap();
    assert!(spec.starts_with("openapi: 3.1"));
    gw.stop().await;
}

#[tokio::test]
async fn fallback_runs_each_message_through_the_oneshot_command() {
    let gw = Gateway::start(|c| {
        c.add_profiles_toml(
            "fallback",
            r#"
            [agents.nopersist]
            command = ["python3", "-i", "-q", "-u"]
            protocol = "lines"
            prompt = ">>> "
            oneshot_command = ["python3", "-q", "-u", "-"]
            persistent = false

            [agents.broken]
            command = ["/nonexistent/agent"]
            protocol = "lines"
            quiet_ms = 100
            oneshot_command = ["sed", "-u", "s/^/echo: /"]

            [agents.missing]
            command = ["/nonexistent/agent"]
            protocol = "lines"
            quiet_ms = 100
            restart_budget = 1
            "#,
        )
        .unwrap();
    })
    .await;
    let s = gw.create("nopersist").await;
    assert!(s["pid"].is_null());
    let id = s["id"].as_str().unwrap();
    let m = gw.ask(id, "print(6 * 7)").await;
    assert_eq!(
        (m["output"].as_str(), m["fallback"].as_bool()),
        (Some("42\n"), Some(true))
    );

    let id = gw.create("broken").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m = gw.ask(&id, "hi").await;
    assert_eq!(
        (m["output"].as_str(), m["fallback"].as_bool()),
        (Some("echo: hi\n"), Some(true))
    );

    let id = gw.create("missing").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(gw.session(&id).await["state"], "suspended");
    let m = gw.ask(&id, "hi").await;
    assert_eq!(m["error"]["code"], "spawn_failed");
    assert!(m["error"]["detail"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/agent"));
    // Past the restart budget the session is closed for good, its history
    // still readable.
    let m = gw.ask(&id, "again").await;
    assert_eq!(m["error"]["code"], "spawn_failed");
    eventually(T, || async { gw.session(&id).await["state"] == "closed" }).await;
    assert_eq!(gw.session(&id).await["message_count"], 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_session_without_activity_for_its_ttl_is_removed() {
    let gw = Gateway::start(|c| {
        c.session_ttl = Duration::from_millis(400);
        c.reap_interval = Duration::from_millis(100);
    })
    .await;
    let s = gw.create("sed").await;
    let id = s["id"].as_str().unwrap().to_string();
    let pid = s["pid"].as_u64().unwrap() as u32;
    let res = gw.events(&id, "").await;
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("session.closed")).await;
    assert_eq!(items.last().unwrap().data["reason"], "expired");
    eventually(T, || async { !alive(pid) }).await;
    // Readable as `closed` for another session_ttl, then forgotten.
    let res = gw.get(&format!("/sessions/{id}")).await;
    if res.status() == 200 {
        assert_eq!(res.json::<Value>().await.unwrap()["state"], "closed");
    }
    eventually(T, || async {
        gw.get(&format!("/sessions/{id}")).await.status() == 404
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn oneshot_runs_are_capped_and_a_leaving_client_frees_its_place() {
    use futures::StreamExt;
    let gw = Gateway::start(|c| c.max_oneshot = 1).await;
    let slow = gw
        .post_sse(
            "/oneshot",
            json!({"agent": "python", "content": "import time; time.sleep(600)"}),
        )
        .await;
    // Read until the run has started, keeping the stream (and so the run) alive.
    let mut stream = slow.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("message.started") {
        let chunk = tokio::time::timeout(T, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // The cap holds while the slow run lives (it sleeps 600 s: no race) …
    let quick = json!({"agent": "python", "content": "print(1)"});
    let refused = gw.post("/oneshot", quick.clone()).await;
    let p = assert_problem(refused, 503).await;
    assert!(
        p["detail"].as_str().unwrap().contains("--max-oneshot"),
        "{p}"
    );
    // … and the client leaving ends the run and frees its place.
    drop(stream);
    eventually(T, || async {
        gw.post("/oneshot", quick.clone()).await.status() == 200
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_second_oneshot_beyond_the_cap_gets_503() {
    use futures::StreamExt;
    let gw = Gateway::start(|c| c.max_oneshot = 1).await;
    let res = gw
        .post_sse(
            "/oneshot",
            json!({"agent": "python", "content": "print('started', flush=True); import time; time.sleep(600)"}),
        )
        .await;
    // Read until the run has started, keeping the stream (and so the run) alive.
    let mut stream = res.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("message.started") {
        let chunk = tokio::time::timeout(T, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let refused = gw
        .post(
            "/oneshot",
            json!({"agent": "python", "content": "print(2)"}),
        )
        .await;
    // The first run sleeps 600 s, so the refusal cannot race its end.
    assert_problem(refused, 503).await;
    drop(stream);
    // The place is free again once the run has ended (its client left).
    eventually(T, || async {
        gw.post(
            "/oneshot",
            json!({"agent": "python", "content": "print(3)"}),
        )
        .await
        .status()
            == 200
    })
    .await;
    gw.stop().await;
}
