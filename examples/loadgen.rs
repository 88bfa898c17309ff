//! Load generator: how much agentgate adds on top of the child it drives.
//!
//! ```sh
//! cargo run --release --example loadgen                      # every scenario, ~2 min
//! cargo run --release --example loadgen -- --scenarios single,sweep --json target/loadgen.json
//! # the store comparison (issue 9): one gateway per store, in one run
//! cargo run --release --example loadgen -- --scenarios single,sweep,history \
//!     --concurrency 16 --stores memory,sqlite,postgres --postgres-url postgres://…/db
//! ```
//!
//! The gateway is served in this process on `127.0.0.1:0`, on its own tokio
//! runtime (threads named `gw…`), with a trivial real child: `sed -u 'a
//! __END__'` behind the `lines` protocol (`end_marker = "^__END__$"`), so the
//! gateway's own cost dominates. The client (reqwest, threads named `lg…`)
//! drives the HTTP API; in the same run the same program is driven directly
//! over pipes with no HTTP and no gateway, as the physical floor. Driver and
//! gateway alternate in rounds, so a noisy neighbour hurts both alike; the
//! report is ratios and differences within one run.
//!
//! Scenarios (`--scenarios`, comma-separated, default all):
//! - `idle`: N live idle sessions (each answered one message); gateway RSS
//!   growth per session (children excluded; their RSS is reported apart).
//!   Runs first, so memory freed by other scenarios does not hide growth.
//! - `create`: session create and delete latency and rate (child spawn
//!   included) against spawning the child directly.
//! - `single`: one session, sequential messages: latency to the first delta
//!   and to completion (SSE `POST …/messages`, and `?wait=true`) against the
//!   direct pipe.
//! - `floor`: `GET /healthz` in a closed loop at each concurrency: the cost
//!   of one HTTP exchange with no session behind it.
//! - `sweep`: closed loop at each concurrency (`--concurrency`, default
//!   1,4,16,64,256): throughput and latency against the direct pipe.
//! - `paced`: `--paced-sessions` sessions (256) each sending a message after
//!   a random think time, at `--paced-rate` messages/s in total: latency
//!   when many sessions are live but the machine is not saturated.
//! - `fanout`: `--subscribers` (1,000) `GET /sessions/{id}/events` streams on
//!   one session; every subscriber must receive every event; delivery latency.
//! - `history`: one session, `--history-messages` (20,000) sequential
//!   messages of `--history-bytes` (1 KB) each; gateway RSS growth per
//!   message (over the whole run, and over its second half, once the
//!   bounded event log is full). Not part of `all` (it is about memory, not
//!   speed, and takes ~30–90 s per store here).
//!
//! Stores (`--stores`, comma-separated: `memory`, `sqlite`, `postgres`;
//! default `memory,sqlite`, plus `postgres` when `--postgres-url` is given):
//! with one store the gateway keeps its sessions there (SQLite: a file in a
//! temporary directory; PostgreSQL: a fresh database with a random name
//! created on the `--postgres-url` server and dropped at the end). With
//! several, this program runs itself once per store (a fresh process each,
//! so RSS figures do not inherit memory freed by the previous store) with
//! the same arguments, then prints per store the latency added over the
//! direct pipe and throughput as a percentage of `memory`.
//!
//! CPU is read per thread from `/proc/self/task/*/schedstat`, so the
//! gateway's CPU is told apart from the load generator's in this process.
//! Everything is bounded in count and time and talks to loopback only.

// The gateway's future (warp's filter types) is spawned here, so its `Send`
// bound is proven in this crate: deeper than the default limit.
#![recursion_limit = "256"]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::store::{Store, StoreSpec};
use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SED_PROFILE: &str = r#"
[agents.sed]
command = ["sed", "-u", "a __END__"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"
"#;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "agentgate load generator (see the file's doc comment)",
    args_override_self = true
)]
struct Args {
    /// Scenarios to run, comma-separated: idle,create,single,floor,sweep,paced,fanout,history (all: every one but history).
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// Messages per mode in `single` (split into rounds).
    #[arg(long, default_value_t = 3000)]
    single_messages: usize,
    /// Concurrency levels of `sweep`.
    #[arg(long, default_value = "1,4,16,64,256", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Seconds per sweep point and driver.
    #[arg(long, default_value_t = 4.0)]
    sweep_secs: f64,
    /// Sessions in `paced`.
    #[arg(long, default_value_t = 256)]
    paced_sessions: usize,
    /// Total offered messages per second in `paced`.
    #[arg(long, default_value_t = 1000.0)]
    paced_rate: f64,
    /// Seconds of `paced` per driver.
    #[arg(long, default_value_t = 8.0)]
    paced_secs: f64,
    /// Idle sessions in `idle`.
    #[arg(long, default_value_t = 1000)]
    idle_sessions: usize,
    /// Sessions created and deleted in `create`.
    #[arg(long, default_value_t = 300)]
    creates: usize,
    /// SSE subscribers in `fanout`.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages sent while the `fanout` subscribers listen.
    #[arg(long, default_value_t = 50)]
    fanout_messages: usize,
    /// HTTP client of the timed requests: `raw` (a minimal keep-alive
    /// HTTP/1.1 client, as lean as the direct driver) or `reqwest`.
    #[arg(long, default_value = "raw")]
    client: ClientKind,
    /// Worker threads of the gateway's runtime.
    #[arg(long, default_value_t = 2)]
    gateway_threads: usize,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Gateway log filter (`off` for none). Logs are formatted, then discarded.
    #[arg(long, default_value = "info,warp=warn,hyper=warn")]
    log: String,
    /// Write every figure as JSON here (input of `examples/bench_plot.rs`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Stores to run the scenarios against, comma-separated: memory,sqlite,postgres
    /// [default: memory,sqlite, plus postgres with --postgres-url].
    #[arg(long, value_delimiter = ',')]
    stores: Option<Vec<String>>,
    /// A PostgreSQL server for the `postgres` store: a database with a random
    /// name is created in it for the run and dropped at the end.
    #[arg(long)]
    postgres_url: Option<String>,
    /// Internal: run one store in this process (set by the --stores run for each store).
    #[arg(long, hide = true)]
    run_store: Option<String>,
    /// Messages of `history`.
    #[arg(long, default_value_t = 20_000)]
    history_messages: usize,
    /// Bytes per message of `history`.
    #[arg(long, default_value_t = 1024)]
    history_bytes: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ClientKind {
    Raw,
    Reqwest,
}

fn main() {
    let args = Args::parse();
    let stores = args.run_store.clone().map(|s| vec![s]);
    let stores = stores.or(args.stores.clone()).unwrap_or_else(|| {
        let mut s = vec!["memory".to_string(), "sqlite".to_string()];
        if args.postgres_url.is_some() {
            s.push("postgres".into());
        }
        s
    });
    for s in &stores {
        match s.as_str() {
            "memory" | "sqlite" => {}
            "postgres" if args.postgres_url.is_some() => {}
            "postgres" => {
                eprintln!("--stores postgres needs --postgres-url URL (a server where a database may be created)");
                std::process::exit(2);
            }
            other => {
                eprintln!("unknown store {other:?}: use memory, sqlite or postgres");
                std::process::exit(2);
            }
        }
    }
    if stores.len() > 1 {
        compare_stores(&args, &stores);
        return;
    }
    let store = stores[0].clone();
    if args.log != "off" {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
            .with_writer(std::io::sink)
            .init();
    }
    let wanted: Vec<String> = if args.scenarios == "all" {
        [
            "idle", "create", "single", "floor", "sweep", "paced", "fanout",
        ]
        .map(String::from)
        .to_vec()
    } else {
        args.scenarios
            .split(',')
            .map(|s| s.trim().to_string())
            .collect()
    };
    let gw = Gateway::start(args.gateway_threads, &store, args.postgres_url.as_deref());
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name("lg")
        .enable_all()
        .build()
        .expect("client runtime");
    println!("{}", machine_line());
    println!(
        "gateway {} ({} threads, store {}), load generator {} threads, child: sed -u 'a __END__'\n",
        gw.base, args.gateway_threads, gw.store, args.client_threads
    );
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine_json());
    report.insert("store".into(), json!(store));
    report.insert(
        "args".into(),
        json!({"gateway_threads": args.gateway_threads, "client_threads": args.client_threads, "log": args.log, "client": format!("{:?}", args.client).to_lowercase()}),
    );
    let client = http_client();
    for name in &wanted {
        let base = gw.base.clone();
        let a = args.clone();
        let c = client.clone();
        let result = client_rt.block_on(async move {
            match name.as_str() {
                "idle" => idle(&c, &base, &a).await,
                "create" => create(&c, &base, &a).await,
                "single" => single(&c, &base, &a).await,
                "sweep" => sweep(&c, &base, &a).await,
                "paced" => paced(&c, &base, &a).await,
                "fanout" => fanout(&c, &base, &a).await,
                "floor" => http_floor(&base, &a).await,
                "history" => history(&base, &a).await,
                other => panic!("unknown scenario {other:?}"),
            }
        });
        report.insert(name.clone(), result);
    }
    drop(client);
    gw.stop();
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Value::Object(report)).unwrap(),
        )
        .expect("write --json");
        println!("figures written to {}", path.display());
    }
}

/// Runs this program once per store (same arguments, `--stores` narrowed to
/// one), each in a fresh process, then compares their figures.
fn compare_stores(args: &Args, stores: &[String]) {
    let exe = std::env::current_exe().expect("current exe");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut runs = serde_json::Map::new();
    for store in stores {
        println!("################ store: {store}\n");
        let out = dir.path().join(format!("{store}.json"));
        let status = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .arg("--run-store")
            .arg(store)
            .arg("--json")
            .arg(&out)
            .status()
            .expect("run the load generator");
        if !status.success() {
            eprintln!("the {store} run failed: {status}");
            std::process::exit(1);
        }
        let text = std::fs::read_to_string(&out).expect("read a run's figures");
        runs.insert(store.clone(), serde_json::from_str(&text).expect("figures"));
    }
    let summary = store_summary(&runs);
    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine_json(),
            "stores": runs,
            "summary": summary,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write --json");
        println!("figures written to {}", path.display());
    }
}

/// Per store: added latency over the direct pipe (`single`), throughput as a
/// percentage of `memory` (`sweep`), RSS per message (`history`).
fn store_summary(runs: &serde_json::Map<String, Value>) -> Value {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("################ stores compared (each store ran in its own process, one after the other)\n");
    let mut out = serde_json::Map::new();
    if runs.values().any(|r| r.get("single").is_some()) {
        println!("single: latency added over the direct pipe (ms; target with sqlite: first delta p50 <= 0.3)");
        println!(
            "  {:<9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "store", "first p50", "first p99", "done p50", "done p99", "wait p50", "wait p99"
        );
        for (name, r) in runs {
            let s = &r["single"];
            if s.is_null() {
                continue;
            }
            println!(
                "  {:<9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
                name,
                ms(f(&s["added_first_p50_ms"])),
                ms(f(&s["added_first_p99_ms"])),
                ms(f(&s["added_done_p50_ms"])),
                ms(f(&s["added_done_p99_ms"])),
                ms(f(&s["added_wait_p50_ms"])),
                ms(f(&s["added_wait_p99_ms"])),
            );
            out.insert(
                format!("{name}_single"),
                json!({
                    "added_first_p50_ms": s["added_first_p50_ms"], "added_first_p99_ms": s["added_first_p99_ms"],
                    "added_done_p50_ms": s["added_done_p50_ms"], "added_done_p99_ms": s["added_done_p99_ms"],
                    "added_wait_p50_ms": s["added_wait_p50_ms"], "added_wait_p99_ms": s["added_wait_p99_ms"],
                }),
            );
        }
        println!();
    }
    let memory_sweep = runs.get("memory").map(|r| r["sweep"].clone());
    if runs.values().any(|r| r.get("sweep").is_some()) {
        println!("sweep: throughput (target with sqlite at 16 sessions: >= 70 % of memory). \"normalised\" divides each run's");
        println!("gateway rate by its own direct-pipe rate first, so machine noise between the runs cancels out.");
        println!(
            "  {:<9} {:>5} {:>10} {:>10} {:>9} {:>11} {:>11} {:>10}",
            "store", "c", "gw msg/s", "direct", "gw/direct", "% memory", "normalised", "done p99"
        );
        for (name, r) in runs {
            let Some(points) = r["sweep"].as_array() else {
                continue;
            };
            for p in points {
                let c = p["concurrency"].clone();
                let mem = memory_sweep
                    .as_ref()
                    .and_then(|m| m.as_array())
                    .and_then(|m| m.iter().find(|q| q["concurrency"] == c));
                let rate = f(&p["gateway"]["per_s"]);
                let ratio = f(&p["throughput_ratio"]);
                let (pct, norm) = mem.map_or((f64::NAN, f64::NAN), |m| {
                    (
                        100.0 * rate / f(&m["gateway"]["per_s"]),
                        100.0 * ratio / f(&m["throughput_ratio"]),
                    )
                });
                println!(
                    "  {:<9} {:>5} {:>10.0} {:>10.0} {:>8.0}% {:>10.0}% {:>10.0}% {:>10}",
                    name,
                    c,
                    rate,
                    f(&p["direct"]["per_s"]),
                    100.0 * ratio,
                    pct,
                    norm,
                    ms(f(&p["gateway"]["done"]["p99_ms"])),
                );
                out.insert(
                    format!("{name}_sweep_c{c}"),
                    json!({"gateway_per_s": rate, "direct_per_s": p["direct"]["per_s"], "throughput_ratio": ratio, "pct_of_memory": pct, "pct_of_memory_normalised": norm}),
                );
            }
        }
        println!();
    }
    if runs.values().any(|r| r.get("history").is_some()) {
        println!("history: gateway RSS growth per message (target <= 200 bytes)");
        for (name, r) in runs {
            let h = &r["history"];
            if h.is_null() {
                continue;
            }
            println!(
                "  {:<9} {:>7.0} bytes per message over {} messages; {:>7.0} over the second half; {:.0} msg/s",
                name,
                f(&h["bytes_per_message"]),
                h["messages"],
                f(&h["bytes_per_message_second_half"]),
                f(&h["per_s"]),
            );
            out.insert(format!("{name}_history"), h.clone());
        }
        println!();
    }
    Value::Object(out)
}

// ---------------------------------------------------------------- gateway

/// The gateway on its own runtime in this process.
struct Gateway {
    base: String,
    /// The store, as shown in logs.
    store: String,
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    /// The SQLite store's directory, removed when dropped.
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database made for this run: (server URL, name).
    pg_db: Option<(String, String)>,
}

impl Gateway {
    fn start(threads: usize, store: &str, postgres_url: Option<&str>) -> Gateway {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("gw")
            .enable_all()
            .build()
            .expect("gateway runtime");
        let exe = std::env::current_exe().expect("current exe");
        let mut config = agentgate::Config::defaults(&exe);
        config
            .add_profiles_toml("loadgen", SED_PROFILE)
            .expect("sed profile");
        config.default_agent = "sed".into();
        config.max_sessions = 5000;
        config.max_children = 5000;
        let (mut dir, mut pg_db) = (None, None);
        config.store = match store {
            "memory" => StoreSpec::Memory,
            "sqlite" => {
                let d = tempfile::Builder::new()
                    .prefix("loadgen-store.")
                    .tempdir()
                    .expect("temp dir");
                let path = d.path().join("agentgate.db");
                dir = Some(d);
                StoreSpec::Sqlite(path)
            }
            "postgres" => {
                let server = postgres_url.expect("--postgres-url");
                let name = format!("loadgen_{}", uuid::Uuid::new_v4().simple());
                rt.block_on(pg_admin(server, &format!("CREATE DATABASE {name}")));
                pg_db = Some((server.to_string(), name.clone()));
                StoreSpec::Postgres(database_url(server, &name))
            }
            other => panic!("unknown store {other:?}"),
        };
        let shown = config.store.to_string();
        let opened = rt
            .block_on(Store::open(&config.store))
            .unwrap_or_else(|e| panic!("{e}"));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(async move {
            agentgate::serve_with_store(config, opened, listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        });
        Gateway {
            base: format!("http://{addr}"),
            store: shown,
            rt,
            stop,
            task,
            _dir: dir,
            pg_db,
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), self.task).await });
        // Session tasks still holding the store's pool end with the runtime.
        self.rt.shutdown_timeout(Duration::from_secs(5));
        if let Some((server, name)) = self.pg_db {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(pg_admin(
                    &server,
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ));
        }
    }
}

/// Runs one statement (CREATE/DROP DATABASE) on the PostgreSQL server `url`.
async fn pg_admin(url: &str, statement: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("--postgres-url: {e}"));
    sqlx::query(statement)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    let _ = conn.close().await;
}

/// `url` with its database name replaced by `name`.
fn database_url(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &base[..host_end])
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .expect("reqwest client")
}

// ---------------------------------------------------------------- measurement helpers

/// CPU time (ns) of this process's threads whose name starts with `prefix`.
fn thread_cpu_ns(prefix: &str) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(path.join("schedstat")) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// CPU of the gateway's and of the load generator's threads, since `start`.
#[derive(Clone, Copy)]
struct Cpu {
    gw: u64,
    lg: u64,
}

impl Cpu {
    fn now() -> Cpu {
        Cpu {
            gw: thread_cpu_ns("gw"),
            lg: thread_cpu_ns("lg"),
        }
    }
    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            gw: self.gw.saturating_sub(start.gw),
            lg: self.lg.saturating_sub(start.lg),
        }
    }
}

/// `VmRSS` of process `pid` (or `self`) in KiB.
fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Latency samples (sorted once, when first read).
#[derive(Default, Clone)]
struct Samples(Vec<Duration>, std::cell::OnceCell<Vec<Duration>>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d);
        self.1.take();
    }
    fn extend(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
        self.1.take();
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    /// Nearest-rank percentile in ms.
    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let v = self.1.get_or_init(|| {
            let mut v = self.0.clone();
            v.sort_unstable();
            v
        });
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1].as_secs_f64() * 1e3
    }
    fn mean(&self) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / self.0.len() as f64
    }
    fn json(&self) -> Value {
        json!({"n": self.len(), "mean_ms": self.mean(), "p50_ms": self.pct(50.0), "p90_ms": self.pct(90.0), "p99_ms": self.pct(99.0), "max_ms": self.pct(100.0)})
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

/// Small deterministic PRNG (xorshift64*) for think times.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn machine_line() -> String {
    let m = machine_json();
    format!(
        "machine: {} × {}, {} MiB RAM, kernel {}",
        m["nproc"], m["cpu"], m["mem_mib"], m["kernel"]
    )
}

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

// ---------------------------------------------------------------- the direct driver

/// The same child program driven directly over pipes: the physical floor.
struct Direct {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    buf: Vec<u8>,
    acc: Vec<u8>,
}

impl Direct {
    fn spawn() -> Direct {
        let mut child = tokio::process::Command::new("sed")
            .args(["-u", "a __END__"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sed");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        Direct {
            child,
            stdin,
            stdout,
            buf: vec![0; 4096],
            acc: Vec::new(),
        }
    }

    /// Writes one line; returns the latency to the first byte and to `__END__`.
    async fn ask(&mut self, content: &str) -> (Duration, Duration) {
        let mut line = Vec::with_capacity(content.len() + 1);
        line.extend_from_slice(content.as_bytes());
        line.push(b'\n');
        let t0 = Instant::now();
        self.stdin.write_all(&line).await.expect("write to sed");
        self.acc.clear();
        let mut first = None;
        loop {
            let n = self.stdout.read(&mut self.buf).await.expect("read sed");
            assert!(n > 0, "sed exited");
            let now = t0.elapsed();
            first.get_or_insert(now);
            self.acc.extend_from_slice(&self.buf[..n]);
            if self.acc.ends_with(b"__END__\n") {
                return (first.unwrap(), now);
            }
        }
    }

    async fn close(mut self) {
        drop(self.stdin);
        let _ = self.child.wait().await;
    }
}

// ---------------------------------------------------------------- the HTTP driver

async fn create_session(client: &reqwest::Client, base: &str) -> Result<String, String> {
    let res = client
        .post(format!("{base}/sessions"))
        .header("content-type", "application/json")
        .body(r#"{"agent":"sed"}"#)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if res.status() != 201 {
        return Err(format!("create: {}", res.status()));
    }
    let v: Value = res.json().await.map_err(|e| e.to_string())?;
    Ok(v["id"].as_str().unwrap().to_string())
}

async fn delete_session(client: &reqwest::Client, base: &str, id: &str) -> Result<(), String> {
    let res = client
        .delete(format!("{base}/sessions/{id}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if res.status() != 204 {
        return Err(format!("delete: {}", res.status()));
    }
    Ok(())
}

fn message_body(content: &str) -> String {
    serde_json::to_string(&json!({ "content": content })).unwrap()
}

/// One message through `POST …/messages` with `Accept: text/event-stream`:
/// latency to the first `message.delta` and to `message.completed`.
async fn ask_sse(
    client: &reqwest::Client,
    url: &str,
    content: &str,
) -> Result<(Duration, Duration), String> {
    let body = message_body(content);
    let t0 = Instant::now();
    let mut res = client
        .post(url)
        .header("accept", "text/event-stream")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("send: {}", res.status()));
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut first = None;
    let mut done = None;
    while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
        let now = t0.elapsed();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = find(&buf, b"\n\n") {
            let frame = &buf[..pos];
            match event_name(frame) {
                Some(b"message.delta") => {
                    first.get_or_insert(now);
                }
                Some(b"message.completed") => done = Some(now),
                Some(b"message.failed") => {
                    return Err(String::from_utf8_lossy(frame).into_owned());
                }
                _ => {}
            }
            buf.drain(..pos + 2);
        }
    }
    match (first, done) {
        (Some(f), Some(d)) => Ok((f, d)),
        _ => Err("stream ended without delta and completion".into()),
    }
}

/// One message with `?wait=true`: latency to the finished message.
async fn ask_wait(client: &reqwest::Client, url: &str, content: &str) -> Result<Duration, String> {
    let body = message_body(content);
    let t0 = Instant::now();
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("wait: {}", res.status()));
    }
    let bytes = res.bytes().await.map_err(|e| e.to_string())?;
    let d = t0.elapsed();
    if find(&bytes, br#""status":"completed""#).is_none() {
        return Err(String::from_utf8_lossy(&bytes).into_owned());
    }
    Ok(d)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn event_name(frame: &[u8]) -> Option<&[u8]> {
    frame
        .split(|b| *b == b'\n')
        .find_map(|l| l.strip_prefix(b"event:"))
        .map(|v| v.strip_prefix(b" ").unwrap_or(v))
}

fn frame_id(frame: &[u8]) -> Option<u64> {
    let v = frame
        .split(|b| *b == b'\n')
        .find_map(|l| l.strip_prefix(b"id:"))?;
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// A minimal HTTP/1.1 client on one keep-alive connection: a request is one
/// write, the answer is scanned in place. reqwest costs the load generator
/// ~30–60 µs of CPU per request on this machine, which on 2 shared cores
/// would be charged to the gateway's throughput.
struct Raw {
    stream: tokio::net::TcpStream,
    host: String,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(base: &str) -> Raw {
        let host = base.trim_start_matches("http://").to_string();
        let stream = tokio::net::TcpStream::connect(&host)
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            host,
            buf: Vec::with_capacity(8192),
        }
    }

    /// POSTs `content` to `path`. With `sse`: latency to the first
    /// `message.delta` and to `message.completed`; else to the whole answer.
    async fn post(
        &mut self,
        path: &str,
        content: &str,
        sse: bool,
    ) -> Result<(Duration, Duration), String> {
        let body = message_body(content);
        let accept = if sse {
            "accept: text/event-stream\r\n"
        } else {
            ""
        };
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n{accept}content-length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.exchange(req.as_bytes(), sse, br#""status":"completed""#)
            .await
    }

    /// GETs `path` (a JSON answer containing `expect`): latency to the whole answer.
    async fn get(&mut self, path: &str, expect: &[u8]) -> Result<Duration, String> {
        let req = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n", self.host);
        self.exchange(req.as_bytes(), false, expect)
            .await
            .map(|(_, d)| d)
    }

    async fn exchange(
        &mut self,
        req: &[u8],
        sse: bool,
        expect: &[u8],
    ) -> Result<(Duration, Duration), String> {
        let t0 = Instant::now();
        self.stream
            .write_all(req)
            .await
            .map_err(|e| e.to_string())?;
        self.buf.clear();
        let (mut first, mut done) = (None, None);
        let mut body_at = None;
        let mut length = None;
        let mut scanned = 0;
        loop {
            self.buf.reserve(4096);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            let now = t0.elapsed();
            if body_at.is_none() {
                let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                    continue;
                };
                if !self.buf.starts_with(b"HTTP/1.1 200") {
                    return Err(String::from_utf8_lossy(&self.buf[..end]).into_owned());
                }
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                body_at = Some(end + 4);
                scanned = end + 4;
            }
            let at = body_at.expect("set above");
            if !sse {
                if let Some(len) = length {
                    if self.buf.len() >= at + len {
                        if find(&self.buf[at..], expect).is_none() {
                            return Err(String::from_utf8_lossy(&self.buf[at..]).into_owned());
                        }
                        return Ok((now, now));
                    }
                }
                continue;
            }
            // Frames are whole chunks; only a read may split one, so rescan a margin.
            let from = scanned.saturating_sub(32).max(at);
            let window = &self.buf[from..];
            if first.is_none() && find(window, b"event:message.delta").is_some() {
                first = Some(now);
            }
            if done.is_none() && find(window, b"event:message.completed").is_some() {
                done = Some(now);
            }
            if find(window, b"event:message.failed").is_some() {
                return Err(String::from_utf8_lossy(window).into_owned());
            }
            scanned = self.buf.len();
            if self.buf.ends_with(b"\r\n0\r\n\r\n") {
                return match (first, done) {
                    (Some(f), Some(d)) => Ok((f, d)),
                    _ => Err("stream ended without delta and completion".into()),
                };
            }
        }
    }
}

/// The client a worker sends its messages with.
enum Http {
    Raw(Raw),
    Reqwest(reqwest::Client, String),
}

impl Http {
    async fn new(kind: ClientKind, client: &reqwest::Client, base: &str) -> Http {
        match kind {
            ClientKind::Raw => Http::Raw(Raw::connect(base).await),
            ClientKind::Reqwest => Http::Reqwest(client.clone(), base.to_string()),
        }
    }

    /// One message as an SSE stream: (first delta, completion).
    async fn sse(&mut self, id: &str, content: &str) -> Result<(Duration, Duration), String> {
        let path = format!("/sessions/{id}/messages");
        match self {
            Http::Raw(raw) => raw.post(&path, content, true).await,
            Http::Reqwest(client, base) => ask_sse(client, &format!("{base}{path}"), content).await,
        }
    }

    /// One message with `?wait=true`: the whole answer.
    async fn wait(&mut self, id: &str, content: &str) -> Result<Duration, String> {
        let path = format!("/sessions/{id}/messages?wait=true");
        match self {
            Http::Raw(raw) => raw.post(&path, content, false).await.map(|(_, d)| d),
            Http::Reqwest(client, base) => {
                ask_wait(client, &format!("{base}{path}"), content).await
            }
        }
    }
}

/// Creates `n` sessions, `par` at a time.
async fn create_many(
    client: &reqwest::Client,
    base: &str,
    n: usize,
    par: usize,
) -> (Vec<String>, Samples) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..par.min(n).max(1) {
        let (client, base, next) = (client.clone(), base.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut lat = Samples::default();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let t = Instant::now();
                ids.push(create_session(&client, &base).await.expect("create"));
                lat.push(t.elapsed());
            }
            (ids, lat)
        }));
    }
    let mut ids = Vec::new();
    let mut lat = Samples::default();
    for t in tasks {
        let (i, l) = t.await.unwrap();
        ids.extend(i);
        lat.extend(&l);
    }
    (ids, lat)
}

async fn delete_many(client: &reqwest::Client, base: &str, ids: &[String], par: usize) -> Samples {
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..par.max(1) {
        let (client, base, next, ids) =
            (client.clone(), base.to_string(), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Samples::default();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ids.len() {
                    break;
                }
                let t = Instant::now();
                delete_session(&client, &base, &ids[i])
                    .await
                    .expect("delete");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Samples::default();
    for t in tasks {
        lat.extend(&t.await.unwrap());
    }
    lat
}

// ---------------------------------------------------------------- scenarios

/// Live idle sessions: gateway RSS growth per session.
async fn idle(client: &reqwest::Client, base: &str, a: &Args) -> Value {
    let n = a.idle_sessions;
    println!("== idle: {n} live idle sessions (each answered one message)");
    // Warm up: connections, runtime threads, allocator arenas.
    let (ids, _) = create_many(client, base, 16, 8).await;
    for id in &ids {
        ask_wait(
            client,
            &format!("{base}/sessions/{id}/messages?wait=true"),
            "warm",
        )
        .await
        .expect("warm-up");
    }
    delete_many(client, base, &ids, 8).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_kib("self");
    let fds0 = open_fds();
    let t = Instant::now();
    let (ids, create_lat) = create_many(client, base, n, 8).await;
    let create_secs = t.elapsed().as_secs_f64();
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, base, next, ids) =
            (client.clone(), base.to_string(), next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ids.len() {
                    break;
                }
                let url = format!("{base}/sessions/{}/messages?wait=true", ids[i]);
                ask_wait(&client, &url, &format!("hello from session {i}"))
                    .await
                    .expect("message");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = rss_kib("self");
    let fds1 = open_fds();
    // The children, for the whole picture (not part of the per-session figure).
    let mut child_rss = 0u64;
    let mut live = 0;
    for id in ids.iter() {
        let res = client
            .get(format!("{base}/sessions/{id}"))
            .send()
            .await
            .unwrap();
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["state"], "idle", "session {id} is idle");
        if let Some(pid) = v["pid"].as_u64() {
            live += 1;
            child_rss += rss_kib(&pid.to_string());
        }
    }
    let per_session = (rss1 as f64 - rss0 as f64) / n as f64;
    let t = Instant::now();
    let delete_lat = delete_many(client, base, &ids, 8).await;
    let delete_secs = t.elapsed().as_secs_f64();
    println!(
        "  gateway RSS {rss0} KiB -> {rss1} KiB: {:.1} KiB per idle session (target <= 64); {live} live children, {:.0} KiB RSS each",
        per_session,
        child_rss as f64 / live.max(1) as f64
    );
    println!(
        "  open fds {fds0} -> {fds1} ({:.1} per session); created {n} in {create_secs:.2} s ({:.0}/s, 8 at a time), deleted in {delete_secs:.2} s\n",
        (fds1 as f64 - fds0 as f64) / n as f64,
        n as f64 / create_secs
    );
    json!({
        "sessions": n, "rss_before_kib": rss0, "rss_after_kib": rss1,
        "kib_per_session": per_session, "live_children": live,
        "child_rss_kib_each": child_rss as f64 / live.max(1) as f64,
        "fds_per_session": (fds1 as f64 - fds0 as f64) / n as f64,
        "create_per_s": n as f64 / create_secs, "create": create_lat.json(),
        "delete_per_s": n as f64 / delete_secs, "delete": delete_lat.json(),
    })
}

/// Session create (spawn included) and delete, against spawning directly.
async fn create(client: &reqwest::Client, base: &str, a: &Args) -> Value {
    let n = a.creates;
    println!("== create: {n} sessions created then deleted, one at a time and 8 at a time");
    let mut out = serde_json::Map::new();
    for par in [1usize, 8] {
        let cpu0 = Cpu::now();
        let t = Instant::now();
        let (ids, lat) = create_many(client, base, n, par).await;
        let secs = t.elapsed().as_secs_f64();
        let cpu = Cpu::now().since(cpu0);
        let del = delete_many(client, base, &ids, par).await;
        println!(
            "  {par} at a time: {:.0} creates/s, latency p50 {} p99 {} ms, gateway CPU {:.0} µs per create; delete p50 {} ms",
            n as f64 / secs,
            ms(lat.pct(50.0)),
            ms(lat.pct(99.0)),
            cpu.gw as f64 / 1e3 / n as f64,
            ms(del.pct(50.0)),
        );
        out.insert(
            format!("par{par}"),
            json!({"per_s": n as f64 / secs, "latency": lat.json(), "gw_cpu_us_per_create": cpu.gw as f64 / 1e3 / n as f64, "delete": del.json()}),
        );
    }
    // Floor: spawn the child directly and wait until it answers a line.
    let mut lat = Samples::default();
    let t = Instant::now();
    for _ in 0..n {
        let t1 = Instant::now();
        let mut d = Direct::spawn();
        d.ask("x").await;
        lat.push(t1.elapsed());
        d.close().await;
    }
    println!(
        "  direct spawn + first answer + exit: {:.0}/s, p50 {} ms (spawn alone is the floor of a create)\n",
        n as f64 / t.elapsed().as_secs_f64(),
        ms(lat.pct(50.0))
    );
    out.insert(
        "direct_spawn".into(),
        json!({"per_s": n as f64 / t.elapsed().as_secs_f64(), "latency": lat.json()}),
    );
    Value::Object(out)
}

/// One session, sequential messages, rounds alternating the three drivers.
async fn single(client: &reqwest::Client, base: &str, a: &Args) -> Value {
    let rounds = 10;
    let per = (a.single_messages / rounds).max(1);
    println!(
        "== single: 1 session, {} sequential messages per driver in {rounds} alternating rounds",
        per * rounds
    );
    let id = create_session(client, base).await.expect("create");
    let mut http = Http::new(a.client, client, base).await;
    let mut direct = Direct::spawn();
    // Warm-up.
    for i in 0..200 {
        direct.ask(&format!("warm {i}")).await;
        http.sse(&id, &format!("warm {i}")).await.unwrap();
        http.wait(&id, &format!("warm {i}")).await.unwrap();
    }
    let (mut d_first, mut d_done) = (Samples::default(), Samples::default());
    let (mut s_first, mut s_done, mut w_done) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut errors = 0;
    let mut cpu_sse = Cpu { gw: 0, lg: 0 };
    let mut cpu_wait = Cpu { gw: 0, lg: 0 };
    let mut i = 0;
    for _ in 0..rounds {
        for _ in 0..per {
            i += 1;
            let (f, d) = direct.ask(&format!("message {i}")).await;
            d_first.push(f);
            d_done.push(d);
        }
        let c0 = Cpu::now();
        for _ in 0..per {
            i += 1;
            match http.sse(&id, &format!("message {i}")).await {
                Ok((f, d)) => {
                    s_first.push(f);
                    s_done.push(d);
                }
                Err(_) => errors += 1,
            }
        }
        let c1 = Cpu::now();
        for _ in 0..per {
            i += 1;
            match http.wait(&id, &format!("message {i}")).await {
                Ok(d) => w_done.push(d),
                Err(_) => errors += 1,
            }
        }
        let c2 = Cpu::now();
        cpu_sse.gw += c1.since(c0).gw;
        cpu_sse.lg += c1.since(c0).lg;
        cpu_wait.gw += c2.since(c1).gw;
        cpu_wait.lg += c2.since(c1).lg;
    }
    direct.close().await;
    drop(http);
    delete_session(client, base, &id).await.unwrap();
    println!(
        "  {:<34} {:>8} {:>8} {:>8} {:>8}",
        "latency (ms)", "p50", "p90", "p99", "mean"
    );
    let row = |name: &str, s: &Samples| {
        println!(
            "  {:<34} {:>8} {:>8} {:>8} {:>8}",
            name,
            ms(s.pct(50.0)),
            ms(s.pct(90.0)),
            ms(s.pct(99.0)),
            ms(s.mean())
        )
    };
    row("direct pipe: first byte", &d_first);
    row("direct pipe: __END__", &d_done);
    row("gateway SSE: first delta", &s_first);
    row("gateway SSE: message.completed", &s_done);
    row("gateway ?wait=true: response", &w_done);
    let added = |g: &Samples, d: &Samples, p: f64| g.pct(p) - d.pct(p);
    println!(
        "  added over the pipe, first delta:  p50 {} ms (target <= 0.3), p99 {} ms (target <= 2)",
        ms(added(&s_first, &d_first, 50.0)),
        ms(added(&s_first, &d_first, 99.0))
    );
    println!(
        "  added over the pipe, completion:   p50 {} ms, p99 {} ms (SSE); p50 {} ms, p99 {} ms (?wait=true)",
        ms(added(&s_done, &d_done, 50.0)),
        ms(added(&s_done, &d_done, 99.0)),
        ms(added(&w_done, &d_done, 50.0)),
        ms(added(&w_done, &d_done, 99.0))
    );
    let n_sse = s_done.len().max(1) as f64;
    let n_wait = w_done.len().max(1) as f64;
    println!(
        "  CPU per message: gateway {:.0} µs (SSE) / {:.0} µs (wait); load generator {:.0} µs / {:.0} µs; errors {errors}\n",
        cpu_sse.gw as f64 / 1e3 / n_sse,
        cpu_wait.gw as f64 / 1e3 / n_wait,
        cpu_sse.lg as f64 / 1e3 / n_sse,
        cpu_wait.lg as f64 / 1e3 / n_wait,
    );
    json!({
        "messages_per_driver": per * rounds,
        "direct_first": d_first.json(), "direct_done": d_done.json(),
        "sse_first": s_first.json(), "sse_done": s_done.json(), "wait_done": w_done.json(),
        "added_first_p50_ms": added(&s_first, &d_first, 50.0),
        "added_first_p99_ms": added(&s_first, &d_first, 99.0),
        "added_done_p50_ms": added(&s_done, &d_done, 50.0),
        "added_done_p99_ms": added(&s_done, &d_done, 99.0),
        "added_wait_p50_ms": added(&w_done, &d_done, 50.0),
        "added_wait_p99_ms": added(&w_done, &d_done, 99.0),
        "gw_cpu_us_per_msg_sse": cpu_sse.gw as f64 / 1e3 / n_sse,
        "gw_cpu_us_per_msg_wait": cpu_wait.gw as f64 / 1e3 / n_wait,
        "lg_cpu_us_per_msg_sse": cpu_sse.lg as f64 / 1e3 / n_sse,
        "errors": errors,
    })
}

/// What one closed-loop or paced run measured.
#[derive(Default)]
struct Run {
    first: Samples,
    done: Samples,
    messages: usize,
    errors: usize,
    secs: f64,
    cpu: Option<Cpu>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
    fn json(&self) -> Value {
        let mut v = json!({
            "messages": self.messages, "errors": self.errors, "secs": self.secs,
            "per_s": self.rate(), "first": self.first.json(), "done": self.done.json(),
        });
        if let Some(cpu) = self.cpu {
            let n = self.messages.max(1) as f64;
            v["gw_cpu_us_per_msg"] = json!(cpu.gw as f64 / 1e3 / n);
            v["lg_cpu_us_per_msg"] = json!(cpu.lg as f64 / 1e3 / n);
        }
        v
    }
}

/// How a worker paces itself: closed loop, or a random think time of mean `think`.
#[derive(Clone, Copy)]
enum Pace {
    Closed,
    Think(Duration),
}

async fn think(pace: Pace, rng: &mut Rng) {
    if let Pace::Think(mean) = pace {
        // Uniform on [0, 2·mean]: bounded, mean `mean`.
        tokio::time::sleep(mean.mul_f64(2.0 * rng.next_f64())).await;
    }
}

/// `c` sed children driven directly, until `secs` pass.
async fn run_direct(c: usize, secs: f64, pace: Pace) -> Run {
    let mut children: Vec<Direct> = (0..c).map(|_| Direct::spawn()).collect();
    for d in children.iter_mut() {
        d.ask("warm").await;
    }
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (w, mut d) in children.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
            let mut r = Run::default();
            tokio::time::sleep_until(start.into()).await;
            think(pace, &mut rng).await;
            let mut i = 0;
            while Instant::now() < end {
                i += 1;
                let (f, dn) = d.ask(&format!("worker {w} message {i}")).await;
                r.first.push(f);
                r.done.push(dn);
                r.messages += 1;
                think(pace, &mut rng).await;
            }
            d.close().await;
            r
        }));
    }
    let mut total = Run::default();
    for t in tasks {
        let r = t.await.unwrap();
        total.first.extend(&r.first);
        total.done.extend(&r.done);
        total.messages += r.messages;
    }
    total.secs = start.elapsed().as_secs_f64();
    total
}

/// `c` gateway sessions driven through SSE `POST …/messages`, until `secs` pass.
async fn run_gateway(
    client: &reqwest::Client,
    base: &str,
    kind: ClientKind,
    c: usize,
    secs: f64,
    pace: Pace,
) -> Run {
    let (ids, _) = create_many(client, base, c, 8).await;
    let mut https = Vec::new();
    for id in &ids {
        let mut http = Http::new(kind, client, base).await;
        http.sse(id, "warm").await.expect("warm-up");
        https.push(http);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (w, (id, mut http)) in ids.iter().cloned().zip(https).enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
            let mut r = Run::default();
            tokio::time::sleep_until(start.into()).await;
            think(pace, &mut rng).await;
            let mut i = 0;
            while Instant::now() < end {
                i += 1;
                match http.sse(&id, &format!("worker {w} message {i}")).await {
                    Ok((f, d)) => {
                        r.first.push(f);
                        r.done.push(d);
                        r.messages += 1;
                    }
                    Err(e) => {
                        if r.errors == 0 {
                            eprintln!("  error: {e}");
                        }
                        r.errors += 1;
                    }
                }
                think(pace, &mut rng).await;
            }
            r
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let cpu0 = Cpu::now();
    let mut total = Run::default();
    for t in tasks {
        let r = t.await.unwrap();
        total.first.extend(&r.first);
        total.done.extend(&r.done);
        total.messages += r.messages;
        total.errors += r.errors;
    }
    total.secs = start.elapsed().as_secs_f64();
    total.cpu = Some(Cpu::now().since(cpu0));
    delete_many(client, base, &ids, 8).await;
    total
}

fn print_pair(label: &str, g: &Run, d: &Run) {
    println!(
        "  {label:<6} direct {:>7.0} msg/s  p50 {:>6} p99 {:>6} ms | gateway {:>7.0} msg/s ({:>3.0} %)  first delta p50 {:>6} p99 {:>6}  done p50 {:>6} p99 {:>6} ms | added p50 {:>6} p99 {:>6} ms | err {}",
        d.rate(),
        ms(d.done.pct(50.0)),
        ms(d.done.pct(99.0)),
        g.rate(),
        100.0 * g.rate() / d.rate(),
        ms(g.first.pct(50.0)),
        ms(g.first.pct(99.0)),
        ms(g.done.pct(50.0)),
        ms(g.done.pct(99.0)),
        ms(g.done.pct(50.0) - d.done.pct(50.0)),
        ms(g.done.pct(99.0) - d.done.pct(99.0)),
        g.errors,
    );
    if let Some(cpu) = g.cpu {
        let n = g.messages.max(1) as f64;
        println!(
            "         CPU per gateway message: gateway threads {:.0} µs, load generator threads {:.0} µs",
            cpu.gw as f64 / 1e3 / n,
            cpu.lg as f64 / 1e3 / n
        );
    }
}

/// The HTTP floor: `GET /healthz` in a closed loop, no session, no child.
async fn http_floor(base: &str, a: &Args) -> Value {
    println!(
        "== floor: GET /healthz, closed loop, {} s per point (what one HTTP exchange costs here)",
        a.sweep_secs
    );
    let mut points = Vec::new();
    for &c in &a.concurrency {
        let mut raws = Vec::new();
        for _ in 0..c {
            raws.push(Raw::connect(base).await);
        }
        let start = Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs_f64(a.sweep_secs);
        let mut tasks = Vec::new();
        for mut raw in raws {
            tasks.push(tokio::spawn(async move {
                let mut lat = Samples::default();
                tokio::time::sleep_until(start.into()).await;
                while Instant::now() < end {
                    lat.push(
                        raw.get("/healthz", br#""status":"ok""#)
                            .await
                            .expect("healthz"),
                    );
                }
                lat
            }));
        }
        tokio::time::sleep_until(start.into()).await;
        let cpu0 = Cpu::now();
        let mut lat = Samples::default();
        for t in tasks {
            lat.extend(&t.await.unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = Cpu::now().since(cpu0);
        let n = lat.len().max(1) as f64;
        println!(
            "  c={c:<4} {:>7.0} req/s  p50 {} p99 {} ms  CPU per request: gateway {:.0} µs, load generator {:.0} µs",
            n / secs,
            ms(lat.pct(50.0)),
            ms(lat.pct(99.0)),
            cpu.gw as f64 / 1e3 / n,
            cpu.lg as f64 / 1e3 / n
        );
        points.push(json!({
            "concurrency": c, "per_s": n / secs, "latency": lat.json(),
            "gw_cpu_us_per_req": cpu.gw as f64 / 1e3 / n, "lg_cpu_us_per_req": cpu.lg as f64 / 1e3 / n,
        }));
    }
    println!();
    Value::Array(points)
}

/// Closed loop at each concurrency.
async fn sweep(client: &reqwest::Client, base: &str, a: &Args) -> Value {
    println!(
        "== sweep: closed loop, {} s per point and driver (each worker sends its next message when the last completed)",
        a.sweep_secs
    );
    let mut points = Vec::new();
    for &c in &a.concurrency {
        let d = run_direct(c, a.sweep_secs, Pace::Closed).await;
        let g = run_gateway(client, base, a.client, c, a.sweep_secs, Pace::Closed).await;
        print_pair(&format!("c={c}"), &g, &d);
        let cpu = g.cpu.unwrap();
        points.push(json!({
            "concurrency": c, "direct": d.json(), "gateway": g.json(),
            "throughput_ratio": g.rate() / d.rate(),
            "gw_cpu_us_per_msg": cpu.gw as f64 / 1e3 / g.messages.max(1) as f64,
        }));
    }
    println!();
    Value::Array(points)
}

/// Many live sessions at a rate the machine can carry.
async fn paced(client: &reqwest::Client, base: &str, a: &Args) -> Value {
    let c = a.paced_sessions;
    // Each worker's cycle is one reply plus the think time; aim the sum at the rate.
    let mean_think = Duration::from_secs_f64(c as f64 / a.paced_rate);
    println!(
        "== paced: {c} sessions, each thinks {:.0} ms on average between messages (~{:.0} msg/s offered), {} s per driver",
        mean_think.as_secs_f64() * 1e3,
        a.paced_rate,
        a.paced_secs
    );
    let d = run_direct(c, a.paced_secs, Pace::Think(mean_think)).await;
    let g = run_gateway(
        client,
        base,
        a.client,
        c,
        a.paced_secs,
        Pace::Think(mean_think),
    )
    .await;
    print_pair(&format!("c={c}"), &g, &d);
    println!(
        "  added p99 first delta {} ms, completion {} ms (target <= 10 ms with 256 sessions)\n",
        ms(g.first.pct(99.0) - d.first.pct(99.0)),
        ms(g.done.pct(99.0) - d.done.pct(99.0))
    );
    json!({
        "sessions": c, "offered_per_s": a.paced_rate, "direct": d.json(), "gateway": g.json(),
        "added_first_p99_ms": g.first.pct(99.0) - d.first.pct(99.0),
        "added_done_p50_ms": g.done.pct(50.0) - d.done.pct(50.0),
        "added_done_p99_ms": g.done.pct(99.0) - d.done.pct(99.0),
    })
}

/// What one fan-out subscriber saw: (sequence id, arrival) per event.
struct Seen {
    events: Vec<(u64, Instant, bool)>,
    gaps: usize,
}

/// Many SSE subscribers on one session.
async fn fanout(client: &reqwest::Client, base: &str, a: &Args) -> Value {
    let n = a.subscribers;
    let m = a.fanout_messages;
    println!("== fanout: {n} SSE subscribers on one session, {m} messages");
    let id = create_session(client, base).await.expect("create");
    let wait_url = format!("{base}/sessions/{id}/messages?wait=true");
    // Subscribers replay from the first event, then follow live.
    let last = 0u64;
    let connected = Arc::new(AtomicUsize::new(0));
    let all_connected = Arc::new(tokio::sync::Notify::new());
    // `message.completed` arrivals, so each message goes out only once every
    // subscriber has the previous one: the latency is the fan-out's own,
    // without a backlog of earlier messages.
    let completions = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    // Each stream holds its own connection (HTTP/1.1).
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        let url = format!("{base}/sessions/{id}/events?after={last}");
        let (connected, all_connected) = (connected.clone(), all_connected.clone());
        let (completions, progress) = (completions.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut res = client.get(url).send().await.expect("subscribe");
            assert_eq!(res.status(), 200);
            if connected.fetch_add(1, Ordering::SeqCst) + 1 == n {
                all_connected.notify_one();
            }
            let mut seen = Seen {
                events: Vec::new(),
                gaps: 0,
            };
            let mut buf = Vec::new();
            while let Ok(Some(chunk)) = res.chunk().await {
                let now = Instant::now();
                buf.extend_from_slice(&chunk);
                while let Some(pos) = find(&buf, b"\n\n") {
                    let frame = &buf[..pos];
                    match (frame_id(frame), event_name(frame)) {
                        (Some(_), Some(b"stream.gap")) => seen.gaps += 1,
                        (Some(i), name) => {
                            let done = name == Some(b"message.completed");
                            seen.events.push((i, now, done));
                            if done && (completions.fetch_add(1, Ordering::SeqCst) + 1) % n == 0 {
                                progress.notify_one();
                            }
                        }
                        _ => {}
                    }
                    buf.drain(..pos + 2);
                }
            }
            seen
        }));
    }
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), async {
        while connected.load(Ordering::SeqCst) < n {
            tokio::time::timeout(Duration::from_millis(100), all_connected.notified())
                .await
                .ok();
        }
    })
    .await
    .expect("all subscribers connect");
    let connect_secs = t.elapsed().as_secs_f64();
    let rss_subscribed = rss_kib("self");
    let cpu0 = Cpu::now();
    let mut sent = Vec::new();
    for i in 0..m {
        let t = Instant::now();
        ask_wait(client, &wait_url, &format!("fan-out message {i}"))
            .await
            .unwrap();
        sent.push(t);
        tokio::time::timeout(Duration::from_secs(60), async {
            while completions.load(Ordering::SeqCst) < n * (i + 1) {
                tokio::time::timeout(Duration::from_millis(20), progress.notified())
                    .await
                    .ok();
            }
        })
        .await
        .expect("every subscriber receives the message within 60 s");
    }
    delete_session(client, base, &id).await.unwrap();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    let cpu = Cpu::now().since(cpu0);
    // Every subscriber must hold the same, complete run of sequence ids.
    let reference: Vec<u64> = seen[0].events.iter().map(|e| e.0).collect();
    let contiguous =
        reference.windows(2).all(|w| w[1] == w[0] + 1) && reference.first() == Some(&(last + 1));
    let complete = seen
        .iter()
        .filter(|s| s.gaps == 0 && s.events.iter().map(|e| e.0).eq(reference.iter().copied()))
        .count();
    // Spread: arrival at each subscriber minus the first arrival of that event.
    let mut first_arrival: HashMap<u64, Instant> = HashMap::new();
    for s in &seen {
        for &(i, at, _) in &s.events {
            first_arrival
                .entry(i)
                .and_modify(|f| *f = (*f).min(at))
                .or_insert(at);
        }
    }
    // Live events only: the replay at connect time is not fan-out.
    let mut spread = Samples::default();
    for s in &seen {
        for &(i, at, _) in &s.events {
            if first_arrival[&i] >= sent[0] {
                spread.push(at - first_arrival[&i]);
            }
        }
    }
    // Send → `message.completed` at each subscriber, per message.
    let mut completed = Samples::default();
    let mut all_have = Samples::default();
    let mut per_msg_last: Vec<Option<Instant>> = vec![None; m];
    for s in &seen {
        let mut k = 0;
        for &(_, at, done) in &s.events {
            if done && k < m {
                completed.push(at - sent[k]);
                per_msg_last[k] = Some(per_msg_last[k].map_or(at, |l| l.max(at)));
                k += 1;
            }
        }
    }
    for (k, l) in per_msg_last.iter().enumerate() {
        if let Some(l) = l {
            all_have.push(*l - sent[k]);
        }
    }
    let delivered: usize = seen.iter().map(|s| s.events.len()).sum();
    println!(
        "  {n} subscribers connected in {connect_secs:.2} s; {} events each (contiguous: {contiguous}); {complete}/{n} received every event, no gaps",
        reference.len()
    );
    println!(
        "  send -> message.completed at a subscriber: p50 {} p99 {} max {} ms; at the last of {n}: p50 {} max {} ms",
        ms(completed.pct(50.0)),
        ms(completed.pct(99.0)),
        ms(completed.pct(100.0)),
        ms(all_have.pct(50.0)),
        ms(all_have.pct(100.0)),
    );
    println!(
        "  spread of a live event, after its first subscriber got it: p50 {} p99 {} max {} ms",
        ms(spread.pct(50.0)),
        ms(spread.pct(99.0)),
        ms(spread.pct(100.0)),
    );
    println!(
        "  gateway CPU {:.2} µs per delivered event ({delivered} delivered), load generator {:.2} µs; RSS with {n} subscribers {} KiB\n",
        cpu.gw as f64 / 1e3 / delivered.max(1) as f64,
        cpu.lg as f64 / 1e3 / delivered.max(1) as f64,
        rss_subscribed
    );
    json!({
        "subscribers": n, "messages": m, "events_each": reference.len(),
        "contiguous": contiguous, "complete_subscribers": complete,
        "connect_secs": connect_secs,
        "send_to_completed": completed.json(), "send_to_all_completed": all_have.json(),
        "spread": spread.json(), "delivered": delivered,
        "gw_cpu_us_per_event": cpu.gw as f64 / 1e3 / delivered.max(1) as f64,
        "lg_cpu_us_per_event": cpu.lg as f64 / 1e3 / delivered.max(1) as f64,
    })
}

/// One long conversation: gateway RSS growth per message.
async fn history(base: &str, a: &Args) -> Value {
    let n = a.history_messages.max(2);
    let bytes = a.history_bytes.max(16);
    println!("== history: 1 session, {n} sequential messages of {bytes} bytes (?wait=true); gateway RSS per message");
    let client = http_client();
    let id = create_session(&client, base).await.expect("create");
    let mut raw = Raw::connect(base).await;
    let path = format!("/sessions/{id}/messages?wait=true");
    let content = |i: usize| {
        let mut c = format!("history message {i} ");
        while c.len() < bytes {
            c.push('x');
        }
        c.truncate(bytes);
        c
    };
    // Warm-up: the connection, buffers, the session's first allocations.
    for i in 0..100 {
        raw.post(&path, &content(i), false).await.expect("warm-up");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_kib("self");
    let mut marks = vec![(0usize, rss0)];
    let mut errors = 0;
    let t = Instant::now();
    for i in 1..=n {
        if raw.post(&path, &content(i), false).await.is_err() {
            errors += 1;
        }
        if i % (n / 10).max(1) == 0 {
            marks.push((i, rss_kib("self")));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = rss_kib("self");
    let half = marks
        .iter()
        .min_by_key(|(i, _)| i.abs_diff(n / 2))
        .copied()
        .unwrap_or((0, rss0));
    let per_msg = (rss1 as f64 - rss0 as f64) * 1024.0 / n as f64;
    let per_msg_half = (rss1 as f64 - half.1 as f64) * 1024.0 / (n - half.0).max(1) as f64;
    println!(
        "  gateway RSS {rss0} KiB -> {rss1} KiB: {per_msg:.0} bytes per message (target <= 200); {per_msg_half:.0} bytes per message from message {} on",
        half.0
    );
    println!(
        "  RSS (KiB) after messages: {}",
        marks
            .iter()
            .map(|(i, r)| format!("{i}: {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  {:.0} msg/s, errors {errors}\n", n as f64 / secs);
    drop(raw);
    delete_session(&client, base, &id).await.expect("delete");
    json!({
        "messages": n, "bytes_each": bytes, "rss_before_kib": rss0, "rss_after_kib": rss1,
        "bytes_per_message": per_msg, "bytes_per_message_second_half": per_msg_half,
        "rss_marks_kib": marks, "per_s": n as f64 / secs, "errors": errors,
    })
}
