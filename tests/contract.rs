//! The API as a contract: the router serves exactly the paths and methods
//! `openapi.yaml` lists, `/metrics` moves with traffic, and log lines carry
//! the session and message ids in both log formats.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use agentgate::http::{routes, AppState, ROUTES};
use agentgate::session::Registry;
use agentgate::Config;
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// `(path, methods)` of every operation in `openapi.yaml`, read with a YAML parser.
fn spec_paths() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml is readable");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("openapi.yaml is YAML");
    let paths = docs[0]["paths"].as_hash().expect("openapi.yaml has paths");
    paths
        .iter()
        .map(|(path, item)| {
            let path = path.as_str().expect("a path is a string").to_string();
            let methods = item
                .as_hash()
                .expect("a path item is a map")
                .keys()
                .filter_map(|k| k.as_str())
                .map(str::to_ascii_uppercase)
                .filter(|m| METHODS.contains(&m.as_str()) || m == "TRACE")
                .collect();
            (path, methods)
        })
        .collect()
}

fn router_table() -> BTreeMap<String, BTreeSet<String>> {
    ROUTES
        .iter()
        .map(|(path, methods)| {
            (
                path.to_string(),
                methods.iter().map(|m| m.to_string()).collect(),
            )
        })
        .collect()
}

/// `path` with every `{param}` replaced by a fresh UUID (a well-formed id nobody has).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                uuid::Uuid::new_v4().to_string()
            } else {
                seg.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn state() -> AppState {
    let config = Config::defaults(agentgate_bin());
    AppState::new(
        Registry::new(Arc::new(config)),
        tokio_util::sync::CancellationToken::new(),
    )
}

/// Whether a response is the router's own "no route" answer (404 or 405).
fn route_miss(status: u16, body: &[u8]) -> bool {
    let problem: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let detail = problem["detail"].as_str().unwrap_or("");
    status == 405 || (status == 404 && detail.starts_with("no route for"))
}

#[test]
fn the_route_table_lists_exactly_the_spec_paths_and_methods() {
    let spec = spec_paths();
    let table = router_table();
    assert!(spec.len() >= 13, "spec paths: {spec:?}");
    let only_spec: Vec<_> = spec
        .iter()
        .filter(|(p, m)| table.get(*p) != Some(m))
        .collect();
    let only_router: Vec<_> = table
        .iter()
        .filter(|(p, m)| spec.get(*p) != Some(m))
        .collect();
    assert!(
        only_spec.is_empty() && only_router.is_empty(),
        "openapi.yaml and http::ROUTES differ.\nspec only: {only_spec:?}\nrouter only: {only_router:?}"
    );
}

/// The table could be right while the filters are not: every spec operation
/// must reach a handler, every other method on a spec path must be 405 with
/// the spec's methods in `Allow`, and a path outside the spec must be 404.
#[tokio::test]
async fn the_router_serves_every_spec_operation_and_nothing_else() {
    let filter = routes(state());
    for (path, methods) in spec_paths() {
        for method in METHODS {
            let url = concrete(&path);
            let mut req = warp::test::request().method(method).path(&url);
            if method == "POST" {
                // Valid JSON that no body schema accepts (unknown field): a
                // handler answers 400, 404 (no such session) or 2xx without
                // starting anything; the router alone would answer 404/405.
                req = req
                    .header("content-type", "application/json")
                    .body(r#"{"__not_a_field__": 1}"#);
            }
            let res = req.reply(&filter).await;
            let status = res.status().as_u16();
            let served = !route_miss(status, res.body());
            if methods.contains(method) {
                assert!(
                    served,
                    "{method} {path} is in openapi.yaml but the router answered {status}: {:?}",
                    String::from_utf8_lossy(res.body())
                );
            } else if method != "HEAD" && method != "OPTIONS" {
                // HEAD and OPTIONS without CORS headers are answered by the
                // guard or the router in their own ways; every other verb
                // must be refused with the spec's methods.
                assert_eq!(status, 405, "{method} {path}");
                let allow: BTreeSet<String> = res.headers()["allow"]
                    .to_str()
                    .unwrap()
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .collect();
                // HEAD is served wherever GET is (RFC 9110), spec or not.
                let mut expected = methods.clone();
                if expected.contains("GET") {
                    expected.insert("HEAD".to_string());
                }
                assert_eq!(allow, expected, "Allow of {path}");
            }
        }
    }
    for path in ["/nope", "/sessions/x/y/z/w", "/metrics/extra", "/agents/x"] {
        let res = warp::test::request().path(path).reply(&filter).await;
        assert!(
            route_miss(res.status().as_u16(), res.body()) && res.status() == 404,
            "{path}: {}",
            res.status()
        );
    }
}

/// Samples of an OpenMetrics text exposition, by `name{labels}` as printed.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line.rsplit_once(' ').expect("a sample is `name value`");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(
            out.insert(key.to_string(), value).is_none(),
            "duplicate {key}"
        );
    }
    out
}

async fn scrape(gw: &Gateway) -> BTreeMap<String, f64> {
    let res = gw.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = res.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    samples(&text)
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no series {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

/// Polls `/metrics` until `key` equals `want`.
async fn metric_reaches(gw: &Gateway, key: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let m = scrape(gw).await;
        let got = get(&m, key);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} stayed {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SPAWN_PROFILE: &str = r#"
[agents.nope]
command = ["/nonexistent/agentgate-test-agent"]
protocol = "lines"
quiet_ms = 200
"#;

#[tokio::test]
async fn metrics_move_with_traffic() {
    let gw = Gateway::start(|c| {
        c.add_profiles_toml("metrics test", SPAWN_PROFILE).unwrap();
    })
    .await;
    let m = scrape(&gw).await;
    for key in [
        "agentgate_sessions_created_total",
        "agentgate_live_children",
        "agentgate_sse_subscribers",
        "agentgate_queued_messages",
        "agentgate_messages_total{outcome=\"completed\"}",
        "agentgate_spawns_total{kind=\"session\",result=\"ok\"}",
        "agentgate_reaps_total{reason=\"idle\"}",
        "agentgate_restarts_total",
        "agentgate_child_crashes_total",
        "agentgate_first_delta_latency_seconds_count",
        "agentgate_reply_latency_seconds_count",
        "agentgate_sessions{state=\"idle\"}",
    ] {
        assert_eq!(get(&m, key), 0.0, "{key} before any traffic");
    }

    // Two completed demo messages.
    let demo = gw.create("demo").await;
    let demo_id = demo["id"].as_str().unwrap();
    assert_eq!(gw.ask(demo_id, "hello").await["status"], "completed");
    assert_eq!(
        gw.ask(demo_id, "what did I say first?").await["status"],
        "completed"
    );
    // A session's state changes just after the message it waited for
    // finished: state gauges are polled, counters are read once.
    metric_reaches(&gw, "agentgate_sessions{state=\"idle\"}", 1.0).await;
    let m = scrape(&gw).await;
    assert_eq!(get(&m, "agentgate_sessions_created_total"), 1.0);
    assert_eq!(get(&m, "agentgate_live_children"), 1.0);
    assert_eq!(
        get(&m, "agentgate_spawns_total{kind=\"session\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        get(&m, "agentgate_messages_total{outcome=\"completed\"}"),
        2.0
    );
    assert_eq!(get(&m, "agentgate_first_delta_latency_seconds_count"), 2.0);
    assert_eq!(get(&m, "agentgate_reply_latency_seconds_count"), 2.0);
    assert!(get(&m, "agentgate_reply_latency_seconds_sum") > 0.0);
    assert_eq!(
        get(&m, "agentgate_reply_latency_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );

    // An open SSE stream counts while it is open.
    let stream = gw.events(demo_id, "").await;
    assert_eq!(stream.status(), 200);
    metric_reaches(&gw, "agentgate_sse_subscribers", 1.0).await;
    drop(stream);
    metric_reaches(&gw, "agentgate_sse_subscribers", 0.0).await;

    // A busy python session with two messages queued behind one that waits
    // on stdin (it cannot end by itself), then an interrupt.
    let py = gw.create("python").await;
    let py_id = py["id"].as_str().unwrap();
    let blocked = gw.send(py_id, "import sys; sys.stdin.readline()").await;
    gw.running(py_id, blocked["id"].as_str().unwrap()).await;
    let q1 = gw.send(py_id, "1 + 1").await;
    let q2 = gw.send(py_id, "2 + 2").await;
    metric_reaches(&gw, "agentgate_sessions{state=\"busy\"}", 1.0).await;
    let m = scrape(&gw).await;
    assert_eq!(get(&m, "agentgate_queued_messages"), 2.0);
    assert_eq!(get(&m, "agentgate_live_children"), 2.0);
    let res = gw
        .http
        .post(gw.url(&format!("/sessions/{py_id}/interrupt")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let b = gw.finished(py_id, blocked["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "interrupted", "{b}");
    for q in [&q1, &q2] {
        let done = gw.finished(py_id, q["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    // A crash: the child exits by itself in the middle of a reply.
    let crash = gw.ask(py_id, "import os; os._exit(3)").await;
    assert_eq!(crash["error"]["code"], "process_exited", "{crash}");
    let m = scrape(&gw).await;
    assert_eq!(get(&m, "agentgate_queued_messages"), 0.0);
    assert_eq!(
        get(&m, "agentgate_messages_total{outcome=\"interrupted\"}"),
        1.0
    );
    assert_eq!(
        get(&m, "agentgate_messages_total{outcome=\"completed\"}"),
        4.0
    );
    assert_eq!(
        get(&m, "agentgate_messages_total{outcome=\"process_exited\"}"),
        1.0
    );
    assert_eq!(get(&m, "agentgate_child_crashes_total"), 1.0);
    assert_eq!(get(&m, "agentgate_live_children"), 1.0);
    metric_reaches(&gw, "agentgate_sessions{state=\"suspended\"}", 1.0).await;

    // The next message starts the python child again: a restart.
    assert_eq!(gw.ask(py_id, "3 + 3").await["output"], "6\n");
    let m = scrape(&gw).await;
    assert_eq!(get(&m, "agentgate_restarts_total"), 1.0);
    assert_eq!(
        get(&m, "agentgate_spawns_total{kind=\"session\",result=\"ok\"}"),
        3.0
    );

    // A child that cannot start; a one-shot run; a deleted session.
    let nope = gw.create("nope").await;
    assert_eq!(nope["state"], "suspended");
    let res = gw
        .post("/oneshot", json!({"content": "hi", "agent": "demo"}))
        .await;
    assert_eq!(res.status(), 200);
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{demo_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let m = scrape(&gw).await;
    assert_eq!(
        get(
            &m,
            "agentgate_spawns_total{kind=\"session\",result=\"error\"}"
        ),
        1.0
    );
    assert_eq!(
        get(&m, "agentgate_spawns_total{kind=\"oneshot\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        get(&m, "agentgate_oneshot_runs_total{outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(
        get(&m, "agentgate_sessions_closed_total{reason=\"deleted\"}"),
        1.0
    );
    assert_eq!(get(&m, "agentgate_sessions_created_total"), 3.0);
    let live: f64 = ["starting", "idle", "busy", "suspended"]
        .iter()
        .map(|s| get(&m, &format!("agentgate_sessions{{state=\"{s}\"}}")))
        .sum();
    assert_eq!(live, 2.0, "python and nope are left");
    gw.stop().await;
}

#[tokio::test]
async fn metrics_count_idle_reaps_and_the_restart_after_them() {
    let gw = Gateway::start(|c| {
        c.idle_timeout = Duration::from_millis(200);
        c.reap_interval = Duration::from_millis(50);
    })
    .await;
    let s = gw.create("demo").await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(gw.ask(id, "hello").await["status"], "completed");
    metric_reaches(&gw, "agentgate_reaps_total{reason=\"idle\"}", 1.0).await;
    metric_reaches(&gw, "agentgate_sessions{state=\"suspended\"}", 1.0).await;
    let m = scrape(&gw).await;
    assert_eq!(get(&m, "agentgate_live_children"), 0.0);
    assert_eq!(get(&m, "agentgate_restarts_total"), 0.0);
    // The reaped session remembers nothing (demo keeps no transcript) but runs again.
    assert_eq!(gw.ask(id, "hello again").await["status"], "completed");
    let m = scrape(&gw).await;
    assert_eq!(get(&m, "agentgate_restarts_total"), 1.0);
    assert_eq!(
        get(&m, "agentgate_spawns_total{kind=\"session\",result=\"ok\"}"),
        2.0
    );
    assert_eq!(get(&m, "agentgate_child_crashes_total"), 0.0);
    gw.stop().await;
}

/// The real binary, its stderr collected by a thread.
struct Binary {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`, as the first stdout line says.
    base: String,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Its `HOME`, which holds its store: kept until it is stopped.
    _home: tempfile::TempDir,
}

/// A test that fails half-way must not leave the gateway running.
impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    fn start(args: &[&str]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agents.toml");
        std::fs::write(&config, PROFILES).unwrap();
        let mut child = sealed_command(dir.path())
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .args(args)
            .env("AGENTGATE_LOG", "info,agentgate=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            err.read_to_string(&mut text).unwrap();
            text
        });
        let line = first_line(child.stdout.take().unwrap(), Duration::from_secs(30));
        let addr = line
            .strip_prefix("agentgate listening on ")
            .unwrap_or_else(|| panic!("first stdout line: {line:?}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        Binary {
            child,
            base: addr,
            stderr: Some(stderr),
            _home: dir,
        }
    }

    /// SIGTERM, wait for the exit, return everything written to stderr.
    fn stop(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = std::time::Instant::now() + T;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stderr.take().unwrap().join().unwrap()
    }
}

/// A session with a completed message, a failed one (python raises, then
/// exits), a one-shot run and a delete: ids of the session and its messages.
async fn traffic(base: &str) -> (String, Vec<String>) {
    let http = reqwest::Client::new();
    let s: Value = post_json(
        &http,
        format!("{base}/sessions"),
        json!({"agent": "python"}),
    )
    .await;
    let sid = s["id"].as_str().unwrap().to_string();
    let mut mids = Vec::new();
    for (content, want) in [
        ("print('hi')", "completed"),
        ("import os; os._exit(3)", "failed"),
    ] {
        let m: Value = post_json(
            &http,
            format!("{base}/sessions/{sid}/messages?wait=true"),
            json!({"content": content}),
        )
        .await;
        assert_eq!(m["status"], want, "{m}");
        mids.push(m["id"].as_str().unwrap().to_string());
    }
    let res = http
        .post(format!("{base}/oneshot"))
        .json(&json!({"content": "hello", "agent": "demo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .delete(format!("{base}/sessions/{sid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    (sid, mids)
}

/// The session and message ids a JSON log line carries, in its fields or its span.
fn ids(line: &Value) -> (Option<&str>, Option<&str>) {
    let find = |key: &str| {
        line["fields"][key]
            .as_str()
            .or_else(|| line["span"][key].as_str())
    };
    (find("session_id"), find("message_id"))
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_session_and_message_ids() {
    let bin = Binary::start(&["--log-format", "json"]);
    let base = bin.base.clone();
    let (sid, mids) = traffic(&base).await;
    let log = bin.stop();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(lines.len() >= 10, "{log}");
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line[key].is_string(), "{key} in {line}");
        }
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    // Every line written by session code carries the session id; every line
    // written while one of its messages ran carries that message's id too.
    let session_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("agentgate::session::actor"))
        })
        .collect();
    assert!(session_lines.len() >= 5, "{log}");
    for line in &session_lines {
        assert_eq!(ids(line).0, Some(sid.as_str()), "no session id: {line}");
    }
    for mid in &mids {
        let about: Vec<&&Value> = session_lines
            .iter()
            .filter(|l| ids(l).1 == Some(mid.as_str()))
            .collect();
        // started, finished; the crash adds "child exited" inside the message's span.
        assert!(about.len() >= 2, "message {mid}: {about:?}");
        assert!(
            about
                .iter()
                .any(|l| l["fields"]["message"] == "message finished"),
            "{about:?}"
        );
    }
    let crash = session_lines
        .iter()
        .find(|l| l["fields"]["message"] == "child exited")
        .expect("a child exited line");
    assert_eq!(crash["span"]["name"], "message", "{crash}");
    assert_eq!(ids(crash), (Some(sid.as_str()), Some(mids[1].as_str())));
    // The one-shot run's lines are in its own span with its id.
    let oneshot: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "oneshot")
        .collect();
    assert!(!oneshot.is_empty(), "{log}");
    assert!(oneshot.iter().all(|l| ids(l).1.is_some()), "{oneshot:?}");
}

#[tokio::test]
async fn human_logs_name_the_session_and_message_on_their_lines() {
    let bin = Binary::start(&[]);
    let base = bin.base.clone();
    let (sid, mids) = traffic(&base).await;
    let log = bin.stop();
    assert!(
        log.lines().all(|l| !l.trim_start().starts_with('{')),
        "{log}"
    );
    let session_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("agentgate::session::actor"))
        .collect();
    assert!(session_lines.len() >= 5, "{log}");
    for line in &session_lines {
        assert!(line.contains(&format!("session_id={sid}")), "{line}");
    }
    for mid in &mids {
        assert!(
            session_lines
                .iter()
                .any(|l| l.contains(&format!("message_id={mid}")) && l.contains("message finished")),
            "{mid}: {log}"
        );
    }
}
