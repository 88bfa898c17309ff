//! Cluster mode (SPEC §8, issue 10): what the hop between nodes costs, what
//! three nodes behind nginx carry next to one, and how long a session takes
//! to answer again after its node is killed.
//!
//! ```sh
//! cargo build --release && cargo build --release --example cluster_bench
//! target/release/examples/cluster_bench                       # defaults below
//! target/release/examples/cluster_bench --messages 200 --duration 5 --rounds 3 --json target/cluster.json
//! target/release/examples/cluster_bench --store postgres://agentgate@127.0.0.1:5432/agentgate
//! ```
//!
//! Everything runs on loopback and is started here: a throwaway PostgreSQL
//! (`scripts/pg-throwaway.sh`, unless `--store` names one), the nodes (the
//! binary `--bin` names, each with its own `HOME` temp dir, `--node-id`,
//! `--lease-ttl`), nginx (`scripts/nginx-throwaway.sh`), and a profile whose
//! agent is `sed -u 'a __END__'` (an answer costs the child nothing, so what
//! is measured is the gateway and its store). All of it is stopped at the
//! end, on a panic and on Ctrl-C.
//!
//! 1. **Extra hop**: one session, created on node A, which then holds it; `--messages`
//!    sequential `POST /sessions/{id}/messages?wait=true` to A (the holder),
//!    then to B (not the holder: B stores the message in the inbox, A is
//!    woken by `NOTIFY`, B follows the message's end through the store).
//!    Baseline: the same on one node with a SQLite store. Targets: through
//!    the holder ≤ 1 ms p50 over SQLite; the extra hop ≤ 5 ms p50.
//! 2. **Throughput**: closed loop, `--sessions` sessions each sending its
//!    next message (`wait=true`) when the last one answered, for
//!    `--duration` seconds, through nginx in `hash` mode: one node behind it,
//!    then three.
//! 3. **Failover**: three nodes; a session created on the victim answers
//!    one message there; the victim is killed (`SIGKILL`); another node is
//!    sent `POST …/messages?wait=true` (a 503 retried after 50 ms) until one
//!    answers 200: the time from the kill to that answer. `--rounds` times,
//!    a new victim started each round. Target ≤ lease TTL + 2 s.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

const SED_PROFILE: &str = r#"
[agents.sed]
command = ["sed", "-u", "a __END__"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"
"#;

#[derive(Parser, Debug, Clone)]
#[command(about = "agentgate cluster benchmark (see the file's doc comment)")]
struct Args {
    /// The gateway binary the nodes run.
    #[arg(long, default_value = "target/release/agentgate")]
    bin: PathBuf,
    /// A PostgreSQL store to use (default: a throwaway one, removed at the end).
    #[arg(long)]
    store: Option<String>,
    /// Sequential messages per case in the extra-hop measurement.
    #[arg(long, default_value_t = 500)]
    messages: usize,
    /// Messages sent first in each extra-hop case and not counted.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Sessions of the closed-loop throughput measurement.
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// Seconds each throughput case runs.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Failover rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Every node's `--lease-ttl`.
    #[arg(long, default_value = "2s")]
    lease_ttl: String,
    /// Only these parts (comma-separated: hop, throughput, failover).
    #[arg(long, default_value = "hop,throughput,failover")]
    only: String,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// What must be stopped at the end (also on a panic and on Ctrl-C).

#[derive(Default)]
struct Undo {
    nodes: Vec<Child>,
    nginx: Vec<String>,
    pg: Option<String>,
    dirs: Vec<PathBuf>,
}

static UNDO: Mutex<Undo> = Mutex::new(Undo {
    nodes: Vec::new(),
    nginx: Vec::new(),
    pg: None,
    dirs: Vec::new(),
});

fn undo() -> std::sync::MutexGuard<'static, Undo> {
    UNDO.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops everything started so far: nginx, the nodes (SIGTERM, then
/// SIGKILL after 5 s), PostgreSQL, the temp dirs. Safe to call twice.
fn cleanup() {
    let (nodes, nginx, pg, dirs) = {
        let mut u = undo();
        (
            std::mem::take(&mut u.nodes),
            std::mem::take(&mut u.nginx),
            u.pg.take(),
            std::mem::take(&mut u.dirs),
        )
    };
    for dir in nginx {
        let _ = script("nginx-throwaway.sh", &["stop", &dir]);
    }
    for mut child in nodes {
        terminate(&mut child);
    }
    if let Some(dir) = pg {
        let _ = script("pg-throwaway.sh", &["stop", &dir]);
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `scripts/NAME ARGS…`: its stdout lines.
fn script(name: &str, args: &[&str]) -> Result<Vec<String>, String> {
    let out = Command::new("bash")
        .arg(Path::new("scripts").join(name))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{name} {args:?}: {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
        .keep();
    undo().dirs.push(dir.clone());
    dir
}

fn start_pg() -> String {
    let lines = script("pg-throwaway.sh", &["start"]).expect("start PostgreSQL");
    let [dir, url] = &lines[..] else {
        panic!("pg-throwaway.sh printed {lines:?}");
    };
    undo().pg = Some(dir.clone());
    url.clone()
}

/// nginx in `mode` in front of `nodes`: its base URL and its directory.
fn start_nginx(mode: &str, nodes: &[&Node]) -> (String, String) {
    let mut args = vec!["start".to_string(), mode.to_string()];
    args.extend(nodes.iter().map(|n| n.addr()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines = script("nginx-throwaway.sh", &args).expect("start nginx");
    let [dir, url] = &lines[..] else {
        panic!("nginx-throwaway.sh printed {lines:?}");
    };
    undo().nginx.push(dir.clone());
    (url.trim_end_matches('/').to_string(), dir.clone())
}

fn stop_nginx(dir: &str) {
    undo().nginx.retain(|d| d != dir);
    let _ = script("nginx-throwaway.sh", &["stop", dir]);
}

// ---------------------------------------------------------------------------
// Nodes.

/// A running gateway: its pid (the child is in [`UNDO`]), address, name.
struct Node {
    pid: u32,
    base: String,
    name: String,
}

impl Node {
    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// `kill -9`, and reaps it.
    fn kill9(&self) {
        let child = {
            let mut u = undo();
            let i = u.nodes.iter().position(|c| c.id() == self.pid);
            i.map(|i| u.nodes.remove(i))
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a clean shutdown), and reaps it.
    fn stop(&self) {
        let child = {
            let mut u = undo();
            let i = u.nodes.iter().position(|c| c.id() == self.pid);
            i.map(|i| u.nodes.remove(i))
        };
        if let Some(mut child) = child {
            terminate(&mut child);
        }
    }
}

/// Starts `bin` on `store` (a cluster node named `name` when `cluster`),
/// with its own HOME; waits for the line naming its address.
fn start_node(args: &Args, config: &Path, store: &str, name: &str, cluster: bool) -> Node {
    let home = temp_dir(&format!("cluster-bench-{name}."));
    let mut cmd = Command::new(&args.bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("HOME", &home)
        .env_remove("XDG_STATE_HOME")
        .env_remove("RUST_LOG")
        .current_dir(&home)
        .args(["--listen", "127.0.0.1:0", "--store", store, "--config"])
        .arg(config);
    if cluster {
        cmd.args(["--node-id", name, "--lease-ttl", &args.lease_ttl]);
    }
    let log = std::fs::File::create(home.join("agentgate.log")).expect("node log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): run `cargo build --release` first or give --bin",
                args.bin.display()
            )
        });
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    undo().nodes.push(child);
    // The first line names the address; the rest is drained so the node
    // never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "node {name} printed no address; see {}",
                home.join("agentgate.log").display()
            )
        });
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Node {
        pid,
        base: format!("http://{addr}"),
        name: name.to_string(),
    }
}

// ---------------------------------------------------------------------------
// HTTP.

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

async fn create_session(http: &reqwest::Client, base: &str) -> String {
    let res = http
        .post(format!("{base}/sessions"))
        .header("content-type", "application/json")
        .body(r#"{"agent":"sed"}"#)
        .send()
        .await
        .expect("POST /sessions");
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    assert!(status.is_success(), "POST /sessions: {status}: {body}");
    body["id"].as_str().expect("session id").to_string()
}

/// `POST …/messages?wait=true`: the status and the time it took.
async fn post_wait(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    content: &str,
) -> (u16, Duration, Value) {
    let t = Instant::now();
    let res = http
        .post(format!("{base}/sessions/{id}/messages?wait=true"))
        .json(&json!({ "content": content }))
        .send()
        .await;
    match res {
        Ok(res) => {
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or_default();
            (status, t.elapsed(), body)
        }
        Err(e) => (0, t.elapsed(), json!({ "error": e.to_string() })),
    }
}

/// One message that must answer 200 and completed.
async fn ask(http: &reqwest::Client, base: &str, id: &str, content: &str) -> Duration {
    let (status, took, body) = post_wait(http, base, id, content).await;
    assert_eq!(status, 200, "{base} session {id}: {body}");
    assert_eq!(body["status"], "completed", "{base} session {id}: {body}");
    took
}

async fn holder(http: &reqwest::Client, base: &str, id: &str) -> Value {
    let res = http
        .get(format!("{base}/sessions/{id}"))
        .send()
        .await
        .expect("GET session");
    let body: Value = res.json().await.unwrap_or_default();
    body["node"].clone()
}

// ---------------------------------------------------------------------------
// Figures.

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Pcts {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn pcts(samples: &[Duration]) -> Pcts {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
        ms[rank - 1]
    };
    Pcts {
        n: ms.len(),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn row(name: &str, p: &Pcts) -> String {
    format!(
        "| {name:<44} | {:>5} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} |",
        p.n, p.p50, p.p90, p.p99, p.max
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// 1. Extra hop.

/// `n` sequential messages after `warmup` uncounted ones: the whole run's
/// percentiles, and the p50 of its first and last tenth (a trend shows a
/// cost that grows with the session's history).
async fn sequential(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    warmup: usize,
    n: usize,
) -> (Pcts, f64, f64) {
    for i in 0..warmup {
        ask(http, base, id, &format!("warm {i}")).await;
    }
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        took.push(ask(http, base, id, &format!("message {i}")).await);
    }
    let tenth = (n / 10).max(1).min(took.len());
    let first = pcts(&took[..tenth]).p50;
    let last = pcts(&took[took.len() - tenth..]).p50;
    (pcts(&took), first, last)
}

async fn hop(args: &Args, config: &Path, pg: &str) -> Value {
    let http = client();
    println!(
        "\n## 1. Extra hop ({} sequential messages per case, {} warm-up)",
        args.messages, args.warmup
    );

    // Baseline: one node, SQLite.
    let dir = temp_dir("cluster-bench-sqlite.");
    let sqlite = format!("sqlite:{}", dir.join("agentgate.db").display());
    let single = start_node(args, config, &sqlite, "single", false);
    let id = create_session(&http, &single.base).await;
    let base_p = sequential(&http, &single.base, &id, args.warmup, args.messages).await;
    single.stop();

    // Two cluster nodes; one session created on A, which takes its lease
    // with the first message.
    let a = start_node(args, config, pg, "hop-a", true);
    let b = start_node(args, config, pg, "hop-b", true);
    let id = create_session(&http, &a.base).await;
    ask(&http, &a.base, &id, "take the lease").await;
    let held = holder(&http, &b.base, &id).await;
    assert_eq!(held, json!(a.name), "the session is held by A");
    let holder_p = sequential(&http, &a.base, &id, args.warmup, args.messages).await;
    let hop_p = sequential(&http, &b.base, &id, args.warmup, args.messages).await;
    let held_after = holder(&http, &a.base, &id).await;
    // The same through B on a second session of A's with no history yet: B
    // follows the message's end by reading the session's log from its
    // start, so the first session's long log weighs on the case above.
    let id2 = create_session(&http, &a.base).await;
    ask(&http, &a.base, &id2, "take the lease").await;
    let fresh_p = sequential(&http, &b.base, &id2, args.warmup, args.messages).await;
    a.stop();
    b.stop();

    println!("\n| case                                         |     n |  p50 ms  |  p90 ms  |  p99 ms  |  max ms  | p50 first/last tenth |");
    println!("|----------------------------------------------|------:|---------:|---------:|---------:|---------:|----------------------|");
    let cases = [
        ("one node, SQLite store", &base_p),
        ("cluster, to the holder (A)", &holder_p),
        ("cluster, to another node (B)", &hop_p),
        ("cluster, to B, 2nd session (short log)", &fresh_p),
    ];
    for (name, (p, first, last)) in cases {
        println!("{} {first:>8.2} / {last:<8.2}   |", row(name, p));
    }
    let over_sqlite = holder_p.0.p50 - base_p.0.p50;
    let extra = hop_p.0.p50 - holder_p.0.p50;
    let extra_fresh = fresh_p.0.p50 - holder_p.0.p50;
    println!(
        "\nholder over SQLite: {over_sqlite:+.2} ms p50 (target <= 1 ms: {}); extra hop: {extra:+.2} ms p50 (target <= 5 ms: {}), p90 {:+.2} ms, p99 {:+.2} ms; extra hop on the 2nd session: {extra_fresh:+.2} ms p50; holder after B's messages: {held_after}",
        verdict(over_sqlite <= 1.0),
        verdict(extra <= 5.0),
        hop_p.0.p90 - holder_p.0.p90,
        hop_p.0.p99 - holder_p.0.p99,
    );
    let case = |(p, first, last): &(Pcts, f64, f64)| json!({"ms": p, "p50_first_tenth": first, "p50_last_tenth": last});
    json!({
        "sqlite": case(&base_p), "holder": case(&holder_p), "non_holder": case(&hop_p),
        "non_holder_second_session": case(&fresh_p),
        "holder_over_sqlite_p50_ms": over_sqlite, "extra_hop_p50_ms": extra,
        "extra_hop_second_session_p50_ms": extra_fresh, "holder_after": held_after,
    })
}

// ---------------------------------------------------------------------------
// 2. Throughput.

async fn closed_loop(base: &str, sessions: usize, secs: u64) -> Value {
    let http = client();
    let mut ids = Vec::new();
    for _ in 0..sessions {
        ids.push(create_session(&http, base).await);
    }
    // One message each first: every session has its child and its lease.
    let warm = futures::future::join_all(ids.iter().map(|id| ask(&http, base, id, "warm"))).await;
    drop(warm);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks = ids.into_iter().map(|id| {
        let http = http.clone();
        let base = base.to_string();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0u64, Vec::new(), Vec::new());
            let mut i = 0u64;
            while Instant::now() < end {
                i += 1;
                let (status, took, body) = post_wait(&http, &base, &id, &format!("m{i}")).await;
                if status == 200 && body["status"] == "completed" {
                    ok += 1;
                    lat.push(took);
                } else {
                    failed.push(format!(
                        "{status} {} {}",
                        body["status"]
                            .as_str()
                            .or(body["code"].as_str())
                            .unwrap_or(""),
                        body["detail"]
                            .as_str()
                            .or(body["error"].as_str())
                            .unwrap_or("")
                    ));
                }
            }
            (ok, failed, lat)
        })
    });
    let results = futures::future::join_all(tasks).await;
    let elapsed = start.elapsed().as_secs_f64();
    let (mut ok, mut failed, mut lat) = (0u64, Vec::new(), Vec::new());
    for r in results {
        let (o, f, l) = r.expect("loop task");
        ok += o;
        failed.extend(f);
        lat.extend(l);
    }
    let p = pcts(&lat);
    // Each distinct failure once, with how often it came.
    let mut distinct: Vec<(String, usize)> = Vec::new();
    for f in &failed {
        match distinct.iter_mut().find(|(d, _)| d == f) {
            Some((_, n)) => *n += 1,
            None => distinct.push((f.clone(), 1)),
        }
    }
    let distinct: Vec<String> = distinct.iter().map(|(f, n)| format!("{n} × {f}")).collect();
    json!({
        "completed": ok, "failed": failed.len(), "failures": distinct,
        "secs": elapsed, "per_sec": ok as f64 / elapsed, "latency_ms": p,
    })
}

async fn throughput(args: &Args, config: &Path, pg: &str) -> Value {
    println!(
        "\n## 2. Throughput (closed loop, {} sessions, {} s, nginx hash)",
        args.sessions, args.duration
    );
    let mut cases = Vec::new();
    for count in [1usize, 3] {
        let nodes: Vec<Node> = (0..count)
            .map(|i| start_node(args, config, pg, &format!("tp{count}-{i}"), true))
            .collect();
        let refs: Vec<&Node> = nodes.iter().collect();
        let (url, dir) = start_nginx("hash", &refs);
        let load_before = load();
        let r = closed_loop(&url, args.sessions, args.duration).await;
        stop_nginx(&dir);
        for n in &nodes {
            n.stop();
        }
        cases.push((count, r, load_before));
    }
    println!(
        "\n| nodes behind nginx | messages/s | p50 ms | p90 ms | p99 ms | failed | load before |"
    );
    println!(
        "|-------------------:|-----------:|-------:|-------:|-------:|-------:|-------------|"
    );
    for (count, r, l) in &cases {
        let p = &r["latency_ms"];
        println!(
            "| {count:>18} | {:>10.0} | {:>6.1} | {:>6.1} | {:>6.1} | {:>6} | {l} |",
            r["per_sec"].as_f64().unwrap_or(f64::NAN),
            p["p50"].as_f64().unwrap_or(f64::NAN),
            p["p90"].as_f64().unwrap_or(f64::NAN),
            p["p99"].as_f64().unwrap_or(f64::NAN),
            r["failed"].as_u64().unwrap_or(0),
        );
        if r["failed"].as_u64().unwrap_or(0) > 0 {
            println!("  failures: {}", r["failures"]);
        }
    }
    json!(cases
        .iter()
        .map(|(c, r, l)| json!({"nodes": c, "result": r, "load_before": l}))
        .collect::<Vec<_>>())
}

// ---------------------------------------------------------------------------
// 3. Failover.

async fn failover(args: &Args, config: &Path, pg: &str) -> Value {
    let ttl = humantime::parse_duration(&args.lease_ttl).expect("--lease-ttl");
    println!(
        "\n## 3. Failover (3 nodes, --lease-ttl {}, {} rounds)",
        args.lease_ttl, args.rounds
    );
    let http = client();
    let survivors = [
        start_node(args, config, pg, "fo-1", true),
        start_node(args, config, pg, "fo-2", true),
    ];
    let mut rounds = Vec::new();
    println!("\n| round | victim   | asked  | kill → 200 (s) | attempts | statuses seen |");
    println!("|------:|----------|--------|---------------:|---------:|---------------|");
    for round in 1..=args.rounds {
        let victim = start_node(args, config, pg, &format!("fo-victim-{round}"), true);
        let id = create_session(&http, &victim.base).await;
        ask(&http, &victim.base, &id, "before").await;
        let held = holder(&http, &victim.base, &id).await;
        assert_eq!(held, json!(victim.name), "the victim holds the session");
        let asked = &survivors[round % survivors.len()];
        let t0 = Instant::now();
        victim.kill9();
        let deadline = t0 + Duration::from_secs(120);
        let mut attempts = 0u32;
        let mut seen: Vec<String> = Vec::new();
        let took = loop {
            attempts += 1;
            let (status, _, body) = post_wait(&http, &asked.base, &id, "after").await;
            if status == 200 {
                if body["status"] != "completed" {
                    seen.push(format!("200 {}", body["status"]));
                }
                break Some(t0.elapsed());
            }
            let tag = format!("{status} {}", body["code"].as_str().unwrap_or(""));
            if !seen.contains(&tag) {
                seen.push(tag);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let new_holder = holder(&http, &asked.base, &id).await;
        let secs = took.map_or(f64::NAN, |d| d.as_secs_f64());
        println!(
            "| {round:>5} | {:<8} | {:<6} | {secs:>14.2} | {attempts:>8} | {} (then held by {new_holder}) |",
            victim.name.trim_start_matches("fo-"),
            asked.name,
            if seen.is_empty() { "200 only".to_string() } else { seen.join(", ") },
        );
        rounds.push(json!({
            "round": round, "victim": victim.name, "asked": asked.name, "secs": secs,
            "attempts": attempts, "statuses": seen, "new_holder": new_holder,
        }));
    }
    for n in &survivors {
        n.stop();
    }
    let max = rounds
        .iter()
        .filter_map(|r| r["secs"].as_f64())
        .fold(0.0, f64::max);
    let target = ttl.as_secs_f64() + 2.0;
    println!(
        "\nfailover: max {max:.2} s (target <= TTL + 2 s = {target:.1} s: {})",
        verdict(
            max <= target
                && rounds
                    .iter()
                    .all(|r| r["secs"].as_f64().is_some_and(f64::is_finite))
        )
    );
    json!({"rounds": rounds, "max_secs": max, "target_secs": target})
}

// ---------------------------------------------------------------------------

fn machine_json() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "mem_mib": mem_kib / 1024,
        "kernel": kernel.trim(),
    })
}

fn main() {
    let mut args = Args::parse();
    // Nodes run in their own directory: a relative --bin is made absolute.
    if let Ok(bin) = std::fs::canonicalize(&args.bin) {
        args.bin = bin;
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        cleanup();
    }));
    let m = machine_json();
    println!(
        "machine: {} × {}, {} MiB RAM, kernel {}; load {}",
        m["nproc"],
        m["cpu"],
        m["mem_mib"],
        m["kernel"],
        load()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(async {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping everything");
                cleanup();
                std::process::exit(130);
            }
        });
        let conf_dir = temp_dir("cluster-bench-conf.");
        let config = conf_dir.join("agents.toml");
        std::fs::write(&config, SED_PROFILE).expect("profile");
        let pg = match &args.store {
            Some(url) => url.clone(),
            None => start_pg(),
        };
        let load_start = load();
        let mut report = json!({"machine": m, "args": {
            "messages": args.messages, "warmup": args.warmup, "sessions": args.sessions,
            "duration": args.duration, "rounds": args.rounds, "lease_ttl": args.lease_ttl,
        }, "load_start": load_start});
        let only: Vec<&str> = args.only.split(',').map(str::trim).collect();
        if only.contains(&"hop") {
            report["hop"] = hop(&args, &config, &pg).await;
        }
        if only.contains(&"throughput") {
            report["throughput"] = throughput(&args, &config, &pg).await;
        }
        if only.contains(&"failover") {
            report["failover"] = failover(&args, &config, &pg).await;
        }
        report["load_end"] = json!(load());
        println!("\nload: {load_start} at the start, {} at the end", load());
        report
    });
    drop(rt);
    cleanup();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write --json");
        println!("figures written to {}", path.display());
    }
}
