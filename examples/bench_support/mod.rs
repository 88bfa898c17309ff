//! What the real-agent benchmarks share (`claude_bench`, `acp_bench`): the
//! two runtimes, percentiles, CPU accounting from `/proc`, and the HTTP
//! client that times replies through the gateway. A directory without a
//! `main.rs`, so Cargo does not build it as an example of its own.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A 2-worker runtime whose threads are named `name…`: `lg` for the client
/// and the mocks, `gw` for the gateway (its CPU is read by that name).
pub fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A gateway serving `config` on `127.0.0.1:0` on `rt`.
pub struct Served {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Served {
    pub fn start(rt: &tokio::runtime::Runtime, config: agentgate::Config) -> Served {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(agentgate::serve(config, listener, async move {
            let _ = stopped.await;
        }));
        Served { base, stop, server }
    }

    /// Shuts the gateway down (its children included), waiting up to a minute.
    pub fn stop(self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.send(());
        let _ =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), self.server).await });
    }
}

/// A config with these profiles (by their names) and defaults otherwise.
pub fn config_with(profiles: Vec<agentgate::config::AgentProfile>) -> agentgate::Config {
    let exe = std::env::current_exe().expect("current exe");
    let mut config = agentgate::Config::defaults(&exe);
    for p in profiles {
        config.profiles.insert(p.name.clone(), Arc::new(p));
    }
    config
}

/// Samples of one kind of reply.
#[derive(Default)]
pub struct Kind {
    pub latency: Vec<Duration>,
    /// CPU seconds per reply: the agent's, and the gateway's.
    pub child_cpu: Vec<f64>,
    pub gw_cpu: Vec<f64>,
    /// For first messages of new children: the agent's CPU from its start
    /// to the end of the first reply (start-up included).
    pub child_cpu_since_start: Vec<f64>,
    pub first_delta: Vec<Duration>,
}

/// The `p`th percentile (nearest rank) in ms; NaN when empty.
pub fn pct(v: &[Duration], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1].as_secs_f64() * 1e3
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl Kind {
    pub fn json(&self) -> Value {
        json!({
            "n": self.latency.len(),
            "p50_ms": pct(&self.latency, 50.0), "p90_ms": pct(&self.latency, 90.0),
            "min_ms": pct(&self.latency, 0.0), "max_ms": pct(&self.latency, 100.0),
            "first_delta_p50_ms": pct(&self.first_delta, 50.0),
            "child_cpu_s": mean(&self.child_cpu), "gw_cpu_s": mean(&self.gw_cpu),
            "cpu_s": mean(&self.child_cpu) + if self.gw_cpu.is_empty() { 0.0 } else { mean(&self.gw_cpu) },
            "child_cpu_since_start_s": mean(&self.child_cpu_since_start),
        })
    }
}

/// Prints `rows` as a table: p50, p90, and latency and CPU as a share of `base`.
pub fn print_table(base: &Kind, rows: &[(&str, &Kind)]) {
    let one = base.json();
    println!(
        "{:<38} {:>9} {:>9} {:>11} {:>10} {:>13}",
        "reply", "p50 ms", "p90 ms", "% one-shot", "CPU s/msg", "CPU vs 1-shot"
    );
    for (name, k) in rows {
        let v = k.json();
        println!(
            "{:<38} {:>9.1} {:>9.1} {:>10.1}% {:>10.3} {:>12.1}%",
            name,
            v["p50_ms"].as_f64().unwrap(),
            v["p90_ms"].as_f64().unwrap(),
            100.0 * v["p50_ms"].as_f64().unwrap() / one["p50_ms"].as_f64().unwrap(),
            v["cpu_s"].as_f64().unwrap(),
            100.0 * v["cpu_s"].as_f64().unwrap() / one["cpu_s"].as_f64().unwrap(),
        );
    }
}

/// Linux reports `/proc` CPU times in USER_HZ, 100 on every mainstream build.
const USER_HZ: f64 = 100.0;

/// utime + stime (+ cutime + cstime with `children`) of one `/proc/<pid>/stat`, in s.
fn stat_cpu(pid: &str, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    // After the comm: state(0) … utime(11) stime(12) cutime(13) cstime(14).
    let n = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut ticks = n(11) + n(12);
    if children {
        ticks += n(13) + n(14);
    }
    Some(ticks / USER_HZ)
}

/// CPU of every live process in process group `pgid` (with what they reaped).
pub fn group_cpu(pgid: u32) -> f64 {
    let mut total = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if fields.get(2) == Some(&pgid.to_string().as_str()) {
            total += stat_cpu(&name, true).unwrap_or(0.0);
        }
    }
    total
}

/// CPU of process `pid` and what it reaped (a direct child is in our group).
pub fn group_cpu_of(pid: u32) -> f64 {
    stat_cpu(&pid.to_string(), true).unwrap_or(0.0)
}

/// This process's reaped children (`cutime + cstime`), in s.
pub fn reaped_children_cpu() -> f64 {
    let own = stat_cpu("self", false).unwrap_or(0.0);
    stat_cpu("self", true).unwrap_or(0.0) - own
}

/// CPU seconds of this process's threads named `gw…` (the gateway's runtime).
pub fn gateway_cpu() -> f64 {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.starts_with("gw") {
                let s = std::fs::read_to_string(entry.path().join("schedstat")).unwrap_or_default();
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 / 1e9
}

/// Times replies through the gateway's HTTP API.
pub struct Bench {
    pub client: reqwest::Client,
    pub base: String,
}

impl Bench {
    pub fn new(base: &str) -> Bench {
        Bench {
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: base.to_string(),
        }
    }

    /// Creates a session of `agent`: its id and its child's pid.
    pub async fn create(&self, agent: &str) -> (String, u32) {
        let res = self
            .client
            .post(format!("{}/sessions", self.base))
            .json(&json!({ "agent": agent }))
            .send()
            .await
            .expect("create");
        assert_eq!(res.status(), 201, "create {agent}");
        let v: Value = res.json().await.unwrap();
        let pid = v["pid"].as_u64().expect("the session has a child") as u32;
        (v["id"].as_str().unwrap().to_string(), pid)
    }

    pub async fn delete(&self, id: &str) {
        let res = self
            .client
            .delete(format!("{}/sessions/{id}", self.base))
            .send()
            .await
            .expect("delete");
        assert_eq!(res.status(), 204);
    }

    /// One message over SSE: (first delta, completion).
    pub async fn message(&self, id: &str, content: &str) -> (Duration, Duration) {
        let t0 = Instant::now();
        let mut res = self
            .client
            .post(format!("{}/sessions/{id}/messages", self.base))
            .header("accept", "text/event-stream")
            .json(&json!({ "content": content }))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 200);
        let mut buf = String::new();
        let mut first = None;
        while let Some(chunk) = res.chunk().await.expect("SSE") {
            buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
            if first.is_none() && buf.contains("event:message.delta") {
                first = Some(t0.elapsed());
            }
            if buf.contains("event:message.failed") {
                panic!("message failed: {buf}");
            }
            if buf.contains("event:message.completed") {
                let done = t0.elapsed();
                while res.chunk().await.ok().flatten().is_some() {}
                return (first.unwrap_or(done), done);
            }
        }
        panic!("SSE ended without message.completed: {buf}");
    }

    /// `POST /oneshot` to `agent`, until its JSON answer.
    pub async fn oneshot(&self, agent: &str, content: &str) -> Duration {
        let t0 = Instant::now();
        let res = self
            .client
            .post(format!("{}/oneshot", self.base))
            .json(&json!({ "content": content, "agent": agent }))
            .send()
            .await
            .expect("oneshot");
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        let d = t0.elapsed();
        assert_eq!(v["status"], "completed", "{v}");
        d
    }

    /// One `POST /oneshot` to `agent`, sampled into `kind` (latency, the
    /// reaped children's CPU, the gateway's).
    pub async fn sample_oneshot(&self, agent: &str, content: &str, kind: &mut Kind) {
        let (c0, g0) = (reaped_children_cpu(), gateway_cpu());
        kind.latency.push(self.oneshot(agent, content).await);
        kind.child_cpu.push(reaped_children_cpu() - c0);
        kind.gw_cpu.push(gateway_cpu() - g0);
    }

    /// A new session of `agent` and its first message, sampled into `kind`
    /// (the child's CPU for the message and since its start); the session
    /// is deleted after.
    pub async fn sample_first_message(&self, agent: &str, content: &str, kind: &mut Kind) {
        let g0 = gateway_cpu();
        let (id, pid) = self.create(agent).await;
        let c0 = group_cpu(pid);
        let (first, done) = self.message(&id, content).await;
        kind.latency.push(done);
        kind.first_delta.push(first);
        let c1 = group_cpu(pid);
        kind.child_cpu.push(c1 - c0);
        kind.child_cpu_since_start.push(c1);
        kind.gw_cpu.push(gateway_cpu() - g0);
        self.delete(&id).await;
    }

    /// The next message of live session `id` (child `pid`), sampled into
    /// `kind`.
    pub async fn sample_next_message(&self, id: &str, pid: u32, content: &str, kind: &mut Kind) {
        let (c0, g0) = (group_cpu(pid), gateway_cpu());
        let (first, done) = self.message(id, content).await;
        kind.latency.push(done);
        kind.first_delta.push(first);
        kind.child_cpu.push(group_cpu(pid) - c0);
        kind.gw_cpu.push(gateway_cpu() - g0);
    }

    /// Waits until `agent`'s prewarm pool holds a child, then `settle` more.
    pub async fn warm_pool_ready(&self, agent: &str, settle: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v: Value = self
                .client
                .get(format!("{}/agents", self.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let ready = v["agents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == agent && a["warm"].as_u64() >= Some(1));
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "no warm child within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not a synchronisation: the child is ready; this lets its start-up work settle.
        tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    }
}
