//! Hardening: the token, the Host and Origin allowlists, every limit, and
//! children that misbehave (ignore SIGTERM, close stdout, flood stderr, do not
//! exist, crash in a loop), clients that vanish, and zombies.
//!
//! Every wait is bounded: HTTP clients here have timeouts, polling goes
//! through `eventually`, and SSE reads through `read_sse` with a limit.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// Profiles that misbehave on purpose.
const FAULTY: &str = r#"
[agents.stubborn]
description = "ignores SIGTERM and the end of its stdin"
command = ["python3", "-u", "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for line in sys.stdin:
    print(line.strip())
    print("__END__")
while True:
    time.sleep(1)
''']
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"

[agents.mute]
description = "closes its stdout at the first message, keeps running, ignores SIGINT"
command = ["python3", "-u", "-c", '''
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.readline()
os.close(1)
time.sleep(1000)
''']
protocol = "lines"
end_marker = "^__END__$"
interrupt_grace = "300ms"
stop_grace = "300ms"

[agents.noisy]
description = "writes 8 MiB to stderr before each answer"
command = ["python3", "-u", "-c", '''
import sys
for line in sys.stdin:
    sys.stderr.write("e" * (8 << 20))
    sys.stderr.flush()
    print("ok")
    print("__END__")
''']
protocol = "lines"
end_marker = "^__END__$"

[agents.crashy]
description = "exits at every message"
command = ["python3", "-c", "import sys; sys.stdin.readline(); sys.exit(3)"]
protocol = "lines"
end_marker = "^__END__$"
restart_budget = 2
restart_window = "1m"

[agents.missing]
command = ["/nonexistent/agentgate-test-agent"]
protocol = "lines"
quiet_ms = 100
restart_budget = 1000

[agents.bigout]
description = "answers N with N bytes"
command = ["python3", "-u", "-c", '''
import sys
for line in sys.stdin:
    sys.stdout.write("y" * int(line) + "\n__END__\n")
    sys.stdout.flush()
''']
protocol = "lines"
end_marker = "^__END__$"
"#;

async fn gateway(tweak: impl FnOnce(&mut agentgate::Config)) -> Gateway {
    let mut gw = Gateway::start(|c| {
        c.add_profiles_toml("faulty profiles", FAULTY).unwrap();
        tweak(c);
    })
    .await;
    gw.http = client(None);
    gw
}

/// A client whose every request ends within 30 s, with a bearer token if given.
fn client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// The process's open descriptors, but for those on files under `except`:
/// the store's pool opens SQLite connections (database, WAL, shared memory)
/// as load asks for them, which is growth but not a leak.
fn open_fds(pid: u32, except: &Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).map_or(true, |target| !target.starts_with(except))
        })
        .count()
}

/// The real binary on 127.0.0.1:0 with [`PROFILES`] and [`FAULTY`]; its
/// stderr goes to a file.
struct Binary {
    child: std::process::Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Drop for Binary {
    fn drop(&mut self) {
        // A test that panicked leaves no gateway behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Binary {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agents.toml");
        std::fs::write(&config, format!("{PROFILES}\n{FAULTY}")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = sealed_command(dir.path())
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        // The first line names the address; read on a thread so a binary
        // that never prints fails the test instead of hanging it.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the binary never blocks on a full pipe.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let line = rx.recv_timeout(T).unwrap_or_default();
        let addr = line
            .split("http://")
            .nth(1)
            .expect("the binary prints its address")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        Binary {
            child,
            base: format!("http://{addr}"),
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// SIGTERM, then waits (bounded) for exit 0; returns what it logged.
    async fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut status = None;
        eventually(T, || {
            status = status.or_else(|| self.child.try_wait().unwrap());
            let done = status.is_some();
            async move { done }
        })
        .await;
        assert_eq!(status.unwrap().code(), Some(0));
        std::fs::read_to_string(self.stderr_path()).unwrap()
    }
}

// ---------------------------------------------------------------- auth

#[tokio::test]
async fn the_token_guards_every_route_but_healthz_and_the_console() {
    let gw = gateway(|c| c.token = Some("s3cret-token".into())).await;
    let anon = client(None);
    // The console holds no data: it loads, then asks for a token on a 401.
    let res = anon.get(gw.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    for path in ["/agents", "/sessions", "/openapi.yaml", "/nowhere"] {
        let res = anon.get(gw.url(path)).send().await.unwrap();
        assert_eq!(res.headers()["www-authenticate"], "Bearer", "{path}");
        assert_problem(res, 401).await;
    }
    let res = anon
        .post(gw.url("/sessions"))
        .json(&json!({"agent": "sed"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;
    let wrong = client(Some("s3cret-tokem"));
    assert_problem(wrong.get(gw.url("/agents")).send().await.unwrap(), 401).await;
    let res = anon.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    let authed = client(Some("s3cret-token"));
    assert_eq!(
        authed.get(gw.url("/agents")).send().await.unwrap().status(),
        200
    );
    let res = authed
        .post(gw.url("/sessions"))
        .json(&json!({"agent": "sed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = id_of(&res.json().await.unwrap());

    // The event stream takes ?access_token= (EventSource cannot set headers) …
    let events = format!("/sessions/{id}/events");
    let res = anon
        .get(gw.url(&format!("{events}?access_token=s3cret-token")))
        .send()
        .await
        .unwrap();
    let stream = tokio::spawn(read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.completed")
    }));
    // (Only the event stream takes it: the message goes with the header.)
    let res = authed
        .post(gw.url(&format!("/sessions/{id}/messages")))
        .header("accept", "text/event-stream")
        .json(&json!({"content": "via query"}))
        .send()
        .await
        .unwrap();
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.completed")).await;
    assert_eq!(items.last().unwrap().data["output"], "via query\n");
    let items = stream.await.unwrap();
    assert_eq!(items.last().unwrap().data["output"], "via query\n");
    // … a wrong one is refused, and other routes do not take it at all.
    let res = anon
        .get(gw.url(&format!("{events}?access_token=nope")))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;
    let res = anon
        .get(gw.url(&format!("/sessions/{id}?access_token=s3cret-token")))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401).await;
    gw.stop().await;
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let token = "tok-7f3a9c1e55d04b2b";
    let wrong = "wrong-0c6b2e9d41aa";
    let bin = Binary::start(
        &[],
        &[("AGENTGATE_TOKEN", token), ("AGENTGATE_LOG", "debug")],
    );
    let authed = client(Some(token));
    let anon = client(None);
    let s: Value = post_json(&authed, bin.url("/sessions"), json!({"agent": "sed"})).await;
    let id = id_of(&s);
    let res = anon
        .get(bin.url(&format!("/sessions/{id}/events?access_token={token}")))
        .send()
        .await
        .unwrap();
    let stream = tokio::spawn(read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.completed")
    }));
    let res = authed
        .post(bin.url(&format!("/sessions/{id}/messages?wait=true")))
        .json(&json!({"content": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    stream.await.unwrap();
    for res in [
        client(Some(wrong))
            .get(bin.url("/agents"))
            .send()
            .await
            .unwrap(),
        anon.get(bin.url(&format!("/sessions/{id}/events?access_token={wrong}")))
            .send()
            .await
            .unwrap(),
        anon.get(bin.url(&format!("/agents?access_token={token}")))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(res.status(), 401);
    }
    let log = bin.stop().await;
    // The debug log is really on and records these requests …
    assert!(
        log.contains("request") && log.contains(&format!("/sessions/{id}/events")),
        "{log}"
    );
    // … by path only.
    assert!(!log.contains(token), "the token is in the log:\n{log}");
    assert!(!log.contains(wrong), "a wrong token is in the log:\n{log}");
    assert!(!log.contains("access_token"), "{log}");
}

// ---------------------------------------------------------------- Host and CORS

#[tokio::test]
async fn hosts_outside_the_allowlist_are_refused() {
    let gw = gateway(|c| c.allowed_host = vec!["agents.internal".into()]).await;
    for host in [
        "localhost:8700",
        "127.0.0.1",
        "[::1]:1",
        "agents.internal:443",
    ] {
        let res = gw
            .http
            .get(gw.url("/agents"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{host}");
    }
    // A DNS-rebinding page sends its own name.
    for host in ["attacker.example", "attacker.example:8700", "192.168.1.10"] {
        let res = gw
            .http
            .get(gw.url("/agents"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        let p = assert_problem(res, 403).await;
        assert!(
            p["detail"].as_str().unwrap().contains("--allowed-host"),
            "{p}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn cors_answers_allowed_origins_only() {
    let gw = gateway(|c| {
        c.allow_origin = vec!["https://app.example".into()];
        c.token = Some("t0k".into());
    })
    .await;
    let authed = client(Some("t0k"));
    // Preflight: no token needed, the right Access-Control-* headers.
    let res = gw
        .http
        .request(reqwest::Method::OPTIONS, gw.url("/sessions/x/events"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization, last-event-id",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-methods"], "GET");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["authorization", "last-event-id", "content-type"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert!(h.contains_key("access-control-max-age"));
    // A preflight from elsewhere: 403, no CORS headers.
    let res = gw
        .http
        .request(reqwest::Method::OPTIONS, gw.url("/sessions"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert_problem(res, 403).await;
    // Actual requests: an allowed origin can read the answer (and a 401) …
    let res = authed
        .get(gw.url("/agents"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("Location"));
    let res = gw
        .http
        .get(gw.url("/agents"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_problem(res, 401).await;
    // … another origin gets no CORS headers and nothing runs (a no-cors
    // POST without Content-Type would otherwise start an agent).
    let res = authed
        .post(gw.url("/oneshot"))
        .header("origin", "https://evil.example")
        .body(r#"{"agent":"sed","content":"x"}"#)
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert_problem(res, 403).await;
    // The gateway's own pages (same origin) need no allowlist entry.
    let own = gw.base.clone();
    let res = authed
        .post(gw.url("/sessions"))
        .header("origin", own)
        .json(&json!({"agent": "sed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    gw.stop().await;
}

// ---------------------------------------------------------------- limits

#[tokio::test]
async fn max_sessions_answers_503_until_one_is_closed() {
    let gw = gateway(|c| c.max_sessions = 2).await;
    let a = id_of(&gw.create("sed").await);
    gw.create("sed").await;
    let p = assert_problem(gw.post("/sessions", json!({"agent": "sed"})).await, 503).await;
    assert!(p["detail"].as_str().unwrap().contains("2 sessions"), "{p}");
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{a}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    gw.create("sed").await;
    gw.stop().await;
}

#[tokio::test]
async fn max_children_suspends_the_least_recently_used_idle_child() {
    let gw = gateway(|c| c.max_children = 2).await;
    let s1 = id_of(&gw.create("sed").await);
    gw.ask(&s1, "one").await;
    let s2 = id_of(&gw.create("sed").await);
    gw.ask(&s2, "two").await;
    let pid1 = gw.session(&s1).await["pid"].as_u64().unwrap() as u32;
    let pid2 = gw.session(&s2).await["pid"].as_u64().unwrap() as u32;
    let events1 = gw
        .http
        .get(gw.url(&format!("/sessions/{s1}/events")))
        .send()
        .await
        .unwrap();
    // A third session: no slot for its child now (the limit is hard); s1's
    // is the least recently used idle child and makes room.
    let s3 = id_of(&gw.create("sed").await);
    let items = read_sse(events1, T, |i| i.data["reason"] == "max_children").await;
    assert_eq!(items.last().unwrap().data["state"], "suspended");
    eventually(T, || async { !alive(pid1) }).await;
    assert!(gw.session(&s1).await["pid"].is_null());
    assert!(alive(pid2));
    assert_eq!(gw.ask(&s3, "three").await["output"], "three\n");
    assert!(gw.session(&s3).await["pid"].is_u64());
    // Its next message starts a child again, and then s2 is the one to go.
    assert_eq!(gw.ask(&s1, "back").await["output"], "back\n");
    eventually(T, || async {
        gw.session(&s2).await["state"] == "suspended"
    })
    .await;
    eventually(T, || async { !alive(pid2) }).await;
    assert_eq!(gw.ask(&s2, "and again").await["output"], "and again\n");
    gw.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_content_length() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("sed").await);
    let url = gw.url(&format!("/sessions/{id}/messages"));
    let big = json!({"content": "x".repeat(1 << 20)});
    let res = gw.http.post(&url).json(&big).send().await.unwrap();
    assert_problem(res, 413).await;
    // Chunked: no Content-Length, the limit holds while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..20)
        .map(|i| {
            Ok(if i == 0 {
                b"{\"content\":\"".to_vec()
            } else {
                vec![b'x'; 64 * 1024]
            })
        })
        .collect();
    let res = gw
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(res, 413).await;
    // Just under the limit is fine.
    let m = gw.ask(&id, &"y".repeat(1000)).await;
    assert_eq!(m["status"], "completed");
    gw.stop().await;
}

#[tokio::test]
async fn a_reply_over_max_output_fails_with_output_limit() {
    let gw = gateway(|c| c.max_output = 10_000).await;
    let id = id_of(&gw.create("bigout").await);
    assert_eq!(gw.ask(&id, "5000").await["status"], "completed");
    let m = gw.ask(&id, "100000").await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error"]["code"], "output_limit");
    assert!(m["output"].as_str().unwrap().len() <= 10_000);
    // The child was out of step and was replaced; the session goes on.
    let m = gw.ask(&id, "3").await;
    assert_eq!(m["output"], "yyy\n");
    gw.stop().await;
}

#[tokio::test]
async fn the_replay_buffer_is_bounded_in_bytes() {
    let gw = gateway(|c| c.replay_bytes = 4096).await;
    let id = id_of(&gw.create("bigout").await);
    for _ in 0..4 {
        gw.ask(&id, "3000").await;
    }
    let last = gw.ask(&id, "10").await;
    let res = gw
        .http
        .get(gw.url(&format!("/sessions/{id}/events")))
        .send()
        .await
        .unwrap();
    let items = read_sse(res, T, |i| {
        i.event.as_deref() == Some("message.completed") && i.data["message_id"] == last["id"]
    })
    .await;
    let gap = &items[1];
    assert_eq!(gap.event.as_deref(), Some("stream.gap"), "{items:#?}");
    assert_eq!(gap.data["from"], 1);
    let kept: usize = items[2..].iter().map(|i| i.data.to_string().len()).sum();
    assert!(kept <= 4096 + 3100, "{kept} bytes replayed");
    let ids: Vec<u64> = items[1..].iter().filter_map(|i| i.id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    gw.stop().await;
}

/// Reads an HTTP/1.0 SSE response (no chunked encoding) until `done` holds
/// for a frame; returns the frames' (id, event, data) triples.
async fn read_raw_sse(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
    mut done: impl FnMut(&SseItemRaw) -> bool,
) -> Vec<SseItemRaw> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut items = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..pos + 2).collect();
            let frame = String::from_utf8(frame).unwrap();
            let mut item = SseItemRaw::default();
            for line in frame.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    match k {
                        "id" => item.id = v.trim().parse().ok(),
                        "event" => item.event = v.trim().to_string(),
                        "data" => item.data = v.trim_start().to_string(),
                        _ => {}
                    }
                }
            }
            let stop = done(&item);
            items.push(item);
            if stop {
                return items;
            }
        }
        let n = tokio::time::timeout_at(deadline, sock.read(&mut chunk))
            .await
            .expect("the stream delivers within its limit")
            .unwrap();
        assert!(n > 0, "the stream ended early");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[derive(Debug, Default)]
struct SseItemRaw {
    id: Option<u64>,
    event: String,
    data: String,
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_stalls_nobody_and_resumes_with_a_gap() {
    let gw = gateway(|c| c.replay_bytes = 1 << 20).await;
    let id = id_of(&gw.create("bigout").await);
    let addr = gw.base.trim_start_matches("http://").parse().unwrap();
    // A tiny receive window: what the gateway cannot send stays on its side.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(
            format!("GET /sessions/{id}/events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(T, stalled.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // From here on the stalled client reads nothing.

    let res = gw
        .http
        .get(gw.url(&format!("/sessions/{id}/events")))
        .send()
        .await
        .unwrap();
    let follower = tokio::spawn(read_sse(res, Duration::from_secs(60), |i| {
        i.event.as_deref() == Some("message.completed") && i.data["output"] == "y\n"
    }));
    // 12 MiB of replies, well past the stalled socket's buffers and the ring.
    let started = Instant::now();
    for _ in 0..48 {
        let m = gw.ask(&id, "262144").await;
        assert_eq!(m["status"], "completed");
    }
    gw.ask(&id, "1").await;
    let elapsed = started.elapsed();
    let seen = follower.await.unwrap();
    let completed = seen
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.completed"))
        .count();
    eprintln!("49 messages in {elapsed:?} with a stalled subscriber; the follower saw {completed} completions");
    // A follower that keeps reading sees every completion, unless it fell
    // behind the ring on a loaded machine: then it was told with a gap.
    let gaps = seen
        .iter()
        .any(|i| i.event.as_deref() == Some("stream.gap"));
    assert!(
        completed == 49 || (gaps && completed >= 1),
        "the follower saw {completed} of 49 completions and no gap"
    );
    assert!(elapsed < Duration::from_secs(45), "{elapsed:?}");

    // The stalled subscriber fell behind the ring: when it reads again it is
    // told so with stream.gap, then goes on to the end.
    let mut buf = Vec::new();
    let items = read_raw_sse(&mut stalled, &mut buf, T, |i| {
        i.event == "message.completed" && i.data.contains(r#""output":"y\n""#)
    })
    .await;
    let gap = items
        .iter()
        .position(|i| i.event == "stream.gap")
        .expect("a stream.gap: the stalled subscriber fell out of the ring");
    let before_gap = items[..gap].iter().filter_map(|i| i.id).max().unwrap_or(0);
    // Resuming with Last-Event-ID from before the gap: told about the gap again.
    drop(stalled);
    let res = gw
        .http
        .get(gw.url(&format!("/sessions/{id}/events")))
        .header("last-event-id", before_gap.to_string())
        .send()
        .await
        .unwrap();
    let resumed = read_sse(res, T, |i| i.id.is_some()).await;
    let first = resumed.last().unwrap();
    assert_eq!(first.event.as_deref(), Some("stream.gap"));
    assert_eq!(first.data["from"], before_gap + 1);
    gw.stop().await;
}

// ---------------------------------------------------------------- faults

#[tokio::test]
async fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("stubborn").await);
    assert_eq!(gw.ask(&id, "hi").await["output"], "hi\n");
    let pid = gw.session(&id).await["pid"].as_u64().unwrap() as u32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(
        ignored & (1 << (15 - 1)),
        0,
        "the child really ignores SIGTERM"
    );
    let started = Instant::now();
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let took = started.elapsed();
    // stdin closed, 300 ms, SIGTERM (ignored), 300 ms, SIGKILL.
    assert!(took >= Duration::from_millis(600), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    eventually(T, || async { !alive(pid) }).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_child_that_closes_stdout_ends_the_message_by_its_timeout() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("mute").await);
    let pid = gw.session(&id).await["pid"].as_u64().unwrap() as u32;
    let started = Instant::now();
    let res = gw
        .post(
            &format!("/sessions/{id}/messages?wait=true"),
            json!({"content": "anyone?", "timeout_ms": 500}),
        )
        .await;
    let m: Value = res.json().await.unwrap();
    let took = started.elapsed();
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error"]["code"], "timeout");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // It ignored the interrupt too, so it was killed.
    eventually(T, || async { !alive(pid) }).await;
    assert_eq!(gw.session(&id).await["state"], "suspended");
    gw.stop().await;
}

#[tokio::test]
async fn a_child_that_floods_stderr_does_not_block() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("noisy").await);
    for _ in 0..2 {
        let m = gw.ask(&id, "go").await;
        assert_eq!(
            (m["status"].as_str(), m["output"].as_str()),
            (Some("completed"), Some("ok\n"))
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_missing_binary_is_spawn_failed_and_leaks_nothing() {
    let bin = Binary::start(&[], &[]);
    let http = client(None);
    let res = http
        .post(bin.url("/oneshot"))
        .json(&json!({"agent": "missing", "content": "x"}))
        .send()
        .await
        .unwrap();
    let p = assert_problem(res, 502).await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("agentgate-test-agent"),
        "{p}"
    );
    let s: Value = post_json(&http, bin.url("/sessions"), json!({"agent": "missing"})).await;
    assert_eq!(s["state"], "suspended");
    let id = id_of(&s);
    let ask = |content: &'static str| {
        let http = http.clone();
        let url = bin.url(&format!("/sessions/{id}/messages?wait=true"));
        async move {
            let m: Value = post_json(&http, url, json!({"content": content})).await;
            m
        }
    };
    let m = ask("warm-up").await;
    assert_eq!(m["error"]["code"], "spawn_failed");
    let fds = open_fds(bin.pid(), bin.dir.path());
    for _ in 0..20 {
        let m = ask("again").await;
        assert_eq!(m["error"]["code"], "spawn_failed");
        let res = http
            .post(bin.url("/oneshot"))
            .json(&json!({"agent": "missing", "content": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502);
    }
    assert!(
        open_fds(bin.pid(), bin.dir.path()) <= fds + 2,
        "file descriptors leaked: {fds} before, {} after",
        open_fds(bin.pid(), bin.dir.path())
    );
    assert!(
        children_of(bin.pid()).is_empty(),
        "{:?}",
        children_of(bin.pid())
    );
    let health: Value = http
        .get(bin.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["sessions"], 1);
    bin.stop().await;
}

#[tokio::test]
async fn a_crash_loop_spends_the_restart_budget_and_closes_the_session() {
    let gw = gateway(|_| {}).await;
    let id = id_of(&gw.create("crashy").await);
    let res = gw
        .http
        .get(gw.url(&format!("/sessions/{id}/events")))
        .send()
        .await
        .unwrap();
    let log = tokio::spawn(read_sse(res, T, |i| {
        i.event.as_deref() == Some("session.closed")
    }));
    // restart_budget = 2: the third unexpected exit closes the session.
    for _ in 0..3 {
        let m = gw.ask(&id, "boom").await;
        assert_eq!(m["status"], "failed");
        assert_eq!(m["error"]["code"], "process_exited");
        assert!(m["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("exit code 3"));
    }
    let items = log.await.unwrap();
    assert_eq!(items.last().unwrap().data["reason"], "failed");
    // The closed session keeps its history readable; a new message is 410.
    let view = gw.session(&id).await;
    assert_eq!(view["state"], "closed");
    assert_eq!(view["message_count"], 3);
    let res = gw.get(&format!("/sessions/{id}/messages")).await;
    let history: serde_json::Value = res.json().await.unwrap();
    assert_eq!(history["messages"].as_array().unwrap().len(), 3);
    let res = gw
        .post(
            &format!("/sessions/{id}/messages"),
            json!({"content": "more"}),
        )
        .await;
    assert_problem(res, 410).await;
    // DELETE removes it for good.
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(gw.get(&format!("/sessions/{id}")).await.status(), 404);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_leaving_a_oneshot_stream_ends_its_process() {
    let gw = gateway(|_| {}).await;
    let res = gw.post_sse("/oneshot", json!({"agent": "python", "content": "import os, time\nprint(os.getpid())\ntime.sleep(60)\n"})).await;
    let items = read_sse(res, T, |i| i.event.as_deref() == Some("message.delta")).await;
    let pid: u32 = items.last().unwrap().data["text"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    // `items` consumed and dropped the response: the connection is gone.
    eventually(T, || async { !alive(pid) }).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_leaving_mid_body_leaves_the_gateway_serving() {
    let gw = gateway(|_| {}).await;
    let addr: std::net::SocketAddr = gw.base.trim_start_matches("http://").parse().unwrap();
    for _ in 0..5 {
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(
            b"POST /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"agent\":",
        )
        .await
        .unwrap();
        drop(sock);
    }
    let health = gw.get_json("/healthz").await;
    assert_eq!(health["sessions"], 0);
    let id = id_of(&gw.create("sed").await);
    assert_eq!(gw.ask(&id, "still here").await["output"], "still here\n");
    gw.stop().await;
}

#[tokio::test]
async fn zombies_are_always_reaped() {
    let bin = Binary::start(&[], &[]);
    let gateway_pid = bin.pid();
    let http = client(None);
    let create = |agent: &'static str| {
        let http = http.clone();
        let url = bin.url("/sessions");
        async move {
            let s: Value = post_json(&http, url, json!({"agent": agent})).await;
            s
        }
    };
    let ask = |id: String, content: &'static str, timeout_ms: u64| {
        let http = http.clone();
        let url = bin.url(&format!("/sessions/{id}/messages?wait=true"));
        async move {
            let m: Value = post_json(
                &http,
                url,
                json!({"content": content, "timeout_ms": timeout_ms}),
            )
            .await;
            m
        }
    };
    let shell = create("shell").await;
    let python = create("python").await;
    let sed = create("sed").await;
    let mute = create("mute").await;
    let crashy = create("crashy").await;
    let mut pids: Vec<u32> = [&shell, &python, &sed, &mute, &crashy]
        .iter()
        .map(|s| s["pid"].as_u64().unwrap() as u32)
        .collect();
    eventually(T, || async { group_members(pids[0]).len() >= 2 }).await;
    pids.extend(group_members(pids[0]));
    // Every way a child ends: killed from outside, killed after a timeout,
    // exits by itself, deleted with a grandchild, a one-shot run, a spawn failure.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[2] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        ask(id_of(&mute), "x", 300).await["error"]["code"],
        "timeout"
    );
    assert_eq!(
        ask(id_of(&crashy), "x", 5000).await["error"]["code"],
        "process_exited"
    );
    let res = http
        .delete(bin.url(&format!("/sessions/{}", id_of(&shell))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = http
        .post(bin.url("/oneshot"))
        .json(&json!({"agent": "python", "content": "print(1)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let missing = create("missing").await;
    assert_eq!(
        ask(id_of(&missing), "x", 5000).await["error"]["code"],
        "spawn_failed"
    );
    assert_eq!(ask(id_of(&python), "print(2)", 5000).await["output"], "2\n");

    // Only the python child is left, and nothing is a zombie.
    let python_pid = pids[1];
    eventually(T, || async {
        let kids = children_of(gateway_pid);
        kids == vec![(python_pid, 'S')] || kids == vec![(python_pid, 'R')]
    })
    .await;
    bin.stop().await;
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the gateway");
    }
}
