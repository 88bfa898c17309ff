//! Shared test harness: a real gateway on 127.0.0.1:0 (in process, or the
//! real binary), an HTTP client, an SSE reader, bounded polling and process
//! inspection. No test here sleeps to synchronise: every wait polls a
//! condition with a bound.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use agentgate::Config;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub mod nginx;

/// Path of the agentgate binary built for these tests.
pub fn agentgate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_agentgate"))
}

/// A command for the real binary, sealed from the machine that runs the
/// tests: no `AGENTGATE_*` variable of the runner reaches it (a token, a
/// default agent, a claude binary), no `claude` on `PATH` becomes an agent,
/// and `HOME` is `home`. Settings a test adds afterwards apply.
pub fn sealed_command(home: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(agentgate_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env(
        "AGENTGATE_CLAUDE_BIN",
        "/nonexistent/agentgate-tests/claude",
    )
    .env(
        "AGENTGATE_GEMINI_BIN",
        "/nonexistent/agentgate-tests/gemini",
    )
    .env(
        "AGENTGATE_CODEX_ACP_BIN",
        "/nonexistent/agentgate-tests/codex-acp",
    )
    .env("HOME", home)
    // The default store lives under the state directory: keep it in `home`.
    .env_remove("XDG_STATE_HOME");
    cmd
}

/// The real binary, started from a command that names its flags; killed
/// and reaped when dropped.
pub struct Node {
    pub child: KillOnDrop,
    /// `http://ADDR`, from the first line the binary prints.
    pub base: String,
}

impl Node {
    /// Spawns `cmd` (stdout piped, stderr dropped) and waits for the line
    /// that names its address.
    pub fn spawn(mut cmd: std::process::Command) -> Node {
        let mut child = KillOnDrop(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let line = first_line(child.stdout.take().unwrap(), Duration::from_secs(60));
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Node {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// Stops it as a service manager would (SIGTERM) and waits for it.
    pub fn terminate(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap();
    }
}

/// `GET url`, which must succeed, as JSON.
pub async fn get_ok(http: &reqwest::Client, url: String) -> Value {
    let res = http.get(&url).send().await.unwrap();
    assert!(res.status().is_success(), "GET {url}: {}", res.status());
    res.json().await.unwrap()
}

/// Sends `content` to session `id` at `base` with `?wait=true`: the
/// finished message (200 required).
pub async fn ask_at(http: &reqwest::Client, base: &str, id: &str, content: &str) -> Value {
    let res = http
        .post(format!("{base}/sessions/{id}/messages?wait=true"))
        .json(&json!({ "content": content }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// A database of its own in the throwaway PostgreSQL server the test
/// command starts (`AGENTGATE_TEST_POSTGRES`): tests running at once never
/// restore each other's sessions. Its URL.
pub async fn fresh_postgres_db() -> String {
    use sqlx::Connection;
    let url = std::env::var("AGENTGATE_TEST_POSTGRES")
        .expect("AGENTGATE_TEST_POSTGRES: run through scripts/test.sh, which starts PostgreSQL");
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (server, _) = url.rsplit_once('/').unwrap();
    format!("{server}/{name}")
}

/// A child process that is killed and reaped when dropped, so a test that
/// panics leaves no gateway behind.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The first line the binary writes to `stdout` (its address), read on a
/// thread: a binary that never prints fails the test after `limit` instead of
/// hanging it. The rest of stdout is drained so the binary never blocks.
pub fn first_line(stdout: std::process::ChildStdout, limit: Duration) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the binary printed no line within {limit:?}"))
}

/// Profiles used across tests: python3 REPL, sed, a shell with a grandchild.
pub const PROFILES: &str = r#"
[agents.python]
command = ["python3", "-i", "-q", "-u"]
protocol = "lines"
prompt = ">>> "
oneshot_command = ["python3", "-q", "-u", "-"]
env = { PYTHONIOENCODING = "utf-8" }
interrupt_grace = "3s"
stop_grace = "1s"

[agents.sed]
command = ["sed", "-u", "a __END__"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"

[agents.shell]
command = ["sh", "-c", "sleep 1000 & cat"]
protocol = "lines"
quiet_ms = 200
stop_grace = "1s"
"#;

/// A gateway served in this process.
pub struct Gateway {
    pub base: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway with [`PROFILES`] and the built-ins, after `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Gateway {
        // AGENTGATE_TEST_LOG=debug shows the gateway's logs with the test output.
        if let Ok(filter) = std::env::var("AGENTGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let mut config = Config::defaults(agentgate_bin());
        config
            .add_profiles_toml("test profiles", PROFILES)
            .expect("test profiles parse");
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(agentgate::serve(config, listener, async move {
            let _ = rx.await;
        }));
        Gateway {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder().build().unwrap(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Creates a session of `agent`; returns its JSON.
    pub async fn create(&self, agent: &str) -> Value {
        let res = self.post("/sessions", json!({"agent": agent})).await;
        assert_eq!(res.status(), 201, "create {agent}");
        res.json().await.unwrap()
    }

    /// Posts `content` to `/sessions/{session}/messages{query}`, expects `status`.
    async fn post_message(&self, session: &str, query: &str, content: &str, status: u16) -> Value {
        let path = format!("/sessions/{session}/messages{query}");
        let res = self.post(&path, json!({"content": content})).await;
        assert_eq!(res.status(), status, "POST {path} {content:?}");
        res.json().await.unwrap()
    }

    /// Sends `content` with `?wait=true`; returns the finished message.
    pub async fn ask(&self, session: &str, content: &str) -> Value {
        self.post_message(session, "?wait=true", content, 200).await
    }

    /// Sends `content` without waiting (202); returns the accepted message.
    pub async fn send(&self, session: &str, content: &str) -> Value {
        self.post_message(session, "", content, 202).await
    }

    /// POSTs `body` to `path` with `Accept: text/event-stream`.
    pub async fn post_sse(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Sends `body` with `Accept: text/event-stream`: the message's own SSE stream.
    pub async fn stream(&self, session: &str, body: Value) -> reqwest::Response {
        self.post_sse(&format!("/sessions/{session}/messages"), body)
            .await
    }

    /// SIGKILLs the session's child and waits until the session is `suspended`.
    pub async fn kill_child(&self, session: &str) {
        let pid = self.session(session).await["pid"].as_u64().unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        eventually(Duration::from_secs(30), || async {
            self.session(session).await["state"] == "suspended"
        })
        .await;
    }

    /// `GET /sessions/{session}/events{query}`: the session's SSE log.
    pub async fn events(&self, session: &str, query: &str) -> reqwest::Response {
        self.get(&format!("/sessions/{session}/events{query}"))
            .await
    }

    pub async fn session(&self, id: &str) -> Value {
        self.get_json(&format!("/sessions/{id}")).await
    }

    pub async fn message(&self, session: &str, id: &str) -> Value {
        self.get_json(&format!("/sessions/{session}/messages/{id}"))
            .await
    }

    /// Polls until message `id` is running.
    pub async fn running(&self, session: &str, id: &str) {
        eventually(Duration::from_secs(30), || async {
            self.message(session, id).await["status"] == "running"
        })
        .await;
    }

    /// Polls message `id` until it has finished.
    pub async fn finished(&self, session: &str, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.message(session, id).await;
            let s = m["status"].as_str().unwrap_or("");
            if !(s == "queued" || s == "running") {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "message {id} did not finish: {m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the gateway and waits for it (children included).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the gateway stops within 30 s")
                .unwrap();
        }
    }
}

/// POSTs `body` as JSON to `url` and reads the answer as JSON, whatever its status.
pub async fn post_json(http: &reqwest::Client, url: String, body: Value) -> Value {
    http.post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// One SSE item as received.
#[derive(Debug, Clone)]
pub struct SseItem {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: Value,
    pub retry: Option<u64>,
}

/// Reads SSE items from `res` until `done` returns true for one. A stream
/// that ends first, or `limit` passing, fails the test: a caller never
/// mistakes a cut-off stream for the events it waited for.
pub async fn read_sse(
    res: reqwest::Response,
    limit: Duration,
    mut done: impl FnMut(&SseItem) -> bool,
) -> Vec<SseItem> {
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut items = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        while let Some(pos) = buf.find("\n\n") {
            let frame: String = buf.drain(..pos + 2).collect();
            if let Some(item) = parse_frame(&frame) {
                let stop = done(&item);
                items.push(item);
                if stop {
                    return items;
                }
            }
        }
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(chunk)) => {
                let chunk =
                    chunk.unwrap_or_else(|e| panic!("SSE: the body failed ({e}); got {items:#?}"));
                buf.push_str(std::str::from_utf8(&chunk).expect("SSE is UTF-8"))
            }
            Ok(None) => panic!("SSE: the stream ended before a match; got {items:#?}"),
            Err(_) => panic!("SSE: nothing matched within {limit:?}; got {items:#?}"),
        }
    }
}

fn parse_frame(frame: &str) -> Option<SseItem> {
    let mut item = SseItem {
        id: None,
        event: None,
        data: Value::Null,
        retry: None,
    };
    let mut data = String::new();
    let mut any = false;
    for line in frame.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.strip_prefix(' ').unwrap_or(v);
        any = true;
        match k {
            "id" => item.id = v.parse().ok(),
            "event" => item.event = Some(v.to_string()),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v)
            }
            "retry" => item.retry = v.parse().ok(),
            _ => {}
        }
    }
    if !data.is_empty() {
        item.data = serde_json::from_str(&data).expect("SSE data is JSON");
    }
    any.then_some(item)
}

/// Polls `cond` every 20 ms until it holds; fails the test after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` is alive (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_state(&stat) != Some('Z'),
        Err(_) => false,
    }
}

fn stat_state(stat: &str) -> Option<char> {
    let after = &stat[stat.rfind(')')? + 2..];
    after.chars().next()
}

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub pid: u32,
    /// State letter: `R`, `S`, `Z` (zombie) …
    pub state: char,
    pub ppid: u32,
    /// Process group id.
    pub pgrp: u32,
}

/// Every process on the machine, read from `/proc`.
pub fn processes() -> Vec<ProcStat> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if fields.len() < 3 {
            continue;
        }
        out.push(ProcStat {
            pid,
            state: fields[0].chars().next().unwrap_or('?'),
            ppid: fields[1].parse().unwrap_or(0),
            pgrp: fields[2].parse().unwrap_or(0),
        });
    }
    out
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Asserts that `res` is problem+json with `status`; returns the problem.
pub async fn assert_problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(ct, "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], status);
    for key in ["type", "title", "detail"] {
        assert!(body[key].is_string(), "{key} in {body}");
    }
    body
}

/// Live children of this test process.
pub fn children_of_this_process() -> Vec<u32> {
    children_of(std::process::id())
        .into_iter()
        .filter(|(_, state)| *state != 'Z')
        .map(|(pid, _)| pid)
        .collect()
}

/// Children of this process that exited and were never reaped.
pub fn zombies_of_this_process() -> Vec<u32> {
    children_of(std::process::id())
        .into_iter()
        .filter(|(_, state)| *state == 'Z')
        .map(|(pid, _)| pid)
        .collect()
}

/// Processes whose parent is `ppid`: (pid, state letter).
pub fn children_of(ppid: u32) -> Vec<(u32, char)> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == ppid)
        .map(|p| (p.pid, p.state))
        .collect()
}
