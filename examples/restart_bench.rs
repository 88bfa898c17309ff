//! Restart on a large store: how long a gateway takes to answer, and how
//! much memory it holds once it does (issue 9: with 10,000 stored sessions
//! of 100 messages each, answer within 2 s with RSS under 100 MB).
//!
//! ```sh
//! cargo run --release --example restart_bench                        # 10,000 × 100
//! cargo run --release --example restart_bench -- --sessions 1000 --json target/restart.json
//! ```
//!
//! 1. **Seed**: a SQLite store in a temporary directory (or `--db PATH`,
//!    reused when it already holds the sessions asked for) is filled through
//!    the `agentgate::store::Store` API, as a gateway would have left it:
//!    `save_session` per session, its messages (completed, `--input-bytes`
//!    in, `--output-bytes` out) as `save_message` writes them but in one
//!    transaction per session (see `insert_messages`), and `--events-per-message`
//!    events per message through `append_events` (0 by default: a real
//!    gateway also keeps up to `--replay-events` events per session, which
//!    restore reads too, so the default is the lighter case).
//! 2. **Start**: this program runs itself again (`--phase start`, a fresh
//!    process, so the seeding's memory is not counted), opens the store,
//!    calls `agentgate::serve_with_store` on `127.0.0.1:0`, and sends
//!    `GET /healthz` until it answers 200. Reported: time from before
//!    `Store::open` to that answer, the process's RSS then and 2 s later
//!    (children: none, every restored session is `suspended`), its peak
//!    (`VmHWM`), and the time a clean shutdown takes.
//!
//! The profile of the stored sessions is a trivial `sed` agent (no child is
//! started: restored sessions wait for their next message).

// The gateway's future (warp's filter types) is spawned here, so its `Send`
// bound is proven in this crate: deeper than the default limit.
#![recursion_limit = "256"]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentgate::model::Message;
use agentgate::store::{EventRecord, SessionRecord, Store, StoreSpec};
use clap::Parser;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const SED_PROFILE: &str = r#"
[agents.sed]
command = ["sed", "-u", "a __END__"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"
"#;

#[derive(Parser, Debug, Clone)]
#[command(about = "agentgate restart benchmark (see the file's doc comment)")]
struct Args {
    /// Stored sessions.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Messages per stored session.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Bytes of each stored message's input.
    #[arg(long, default_value_t = 100)]
    input_bytes: usize,
    /// Bytes of each stored message's output.
    #[arg(long, default_value_t = 200)]
    output_bytes: usize,
    /// Stored events per message (`message.delta`-sized like the output).
    #[arg(long, default_value_t = 0)]
    events_per_message: usize,
    /// The SQLite file (default: one in a temporary directory, removed at
    /// the end). An existing file that already holds `--sessions` sessions
    /// is used as it is.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Restarts measured on the seeded store.
    #[arg(long, default_value_t = 2)]
    starts: usize,
    /// Internal: `start` measures one start-up of the store at `--db`.
    #[arg(long, hide = true, default_value = "all")]
    phase: String,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if args.phase == "start" {
        let figures = start_once(args.db.as_ref().expect("--db"));
        // The parent reads the last line.
        println!("{figures}");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("restart-bench.")
        .tempdir()
        .expect("temp dir");
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| tmp.path().join("agentgate.db"));
    println!("{}", machine_line());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seed = rt.block_on(seed(&args, &db));
    drop(rt);
    let db_bytes = file_bytes(&db);
    println!(
        "store: {} ({:.0} MB with its WAL)\n",
        db.display(),
        db_bytes as f64 / 1e6
    );
    let exe = std::env::current_exe().expect("current exe");
    let mut starts = Vec::new();
    for i in 1..=args.starts.max(1) {
        let out = std::process::Command::new(&exe)
            .args(["--phase", "start", "--db"])
            .arg(&db)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run the start phase");
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        let v: Value = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("start {i}: {e}: {}", text.trim()));
        println!(
            "start {i}: /healthz answered after {:.3} s ({} sessions); RSS {:.1} MB then, {:.1} MB 2 s later, peak {:.1} MB (bare process {:.1} MB); store opened in {:.3} s; shutdown took {:.2} s",
            v["ready_secs"].as_f64().unwrap_or(f64::NAN),
            v["sessions"],
            kib_mb(&v["rss_ready_kib"]),
            kib_mb(&v["rss_settled_kib"]),
            kib_mb(&v["hwm_kib"]),
            kib_mb(&v["rss_bare_kib"]),
            v["open_secs"].as_f64().unwrap_or(f64::NAN),
            v["shutdown_secs"].as_f64().unwrap_or(f64::NAN),
        );
        starts.push(v);
    }
    let best = starts
        .iter()
        .filter_map(|v| v["ready_secs"].as_f64())
        .fold(f64::INFINITY, f64::min);
    let worst_rss = starts
        .iter()
        .filter_map(|v| v["rss_settled_kib"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "\n{} sessions × {} messages: fastest answer {:.3} s (target <= 2 s), RSS up to {:.1} MB (target < 100 MB)",
        args.sessions,
        args.messages,
        best,
        worst_rss / 1024.0
    );
    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine_json(),
            "args": {"sessions": args.sessions, "messages": args.messages, "input_bytes": args.input_bytes,
                     "output_bytes": args.output_bytes, "events_per_message": args.events_per_message},
            "seed": seed, "db_bytes": db_bytes, "starts": starts,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write --json");
        println!("figures written to {}", path.display());
    }
}

fn kib_mb(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN) / 1024.0
}

fn file_bytes(db: &std::path::Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    [db.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Fills the store through its API (unless it already holds the sessions).
async fn seed(args: &Args, db: &std::path::Path) -> Value {
    let store = Store::open(&StoreSpec::Sqlite(db.to_path_buf()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let have = store.load_sessions().await.expect("load sessions").len();
    if have == args.sessions {
        println!(
            "seed: {} already holds {have} sessions; used as it is",
            db.display()
        );
        return json!({"reused": true, "sessions": have});
    }
    assert_eq!(
        have,
        0,
        "{} holds {have} sessions, not {}: give an empty or matching --db",
        db.display(),
        args.sessions
    );
    println!(
        "seed: {} sessions × {} messages ({} B in, {} B out), {} events per message, through Store::save_session/append_events and save_message's rows",
        args.sessions, args.messages, args.input_bytes, args.output_bytes, args.events_per_message
    );
    let pad = |prefix: String, n: usize| {
        let mut s = prefix;
        while s.len() < n {
            s.push('x');
        }
        s.truncate(n.max(1));
        s
    };
    // Messages go in through SQL of their own, a session per transaction
    // (Store::save_message writes one per transaction: 1,000,000 of them took
    // 481 s), as Store::save_message would have left them: the same body,
    // status and usage sum.
    sqlx::any::install_default_drivers();
    let raw = sqlx::AnyPool::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("a second connection to the store");
    let t = Instant::now();
    let start = OffsetDateTime::now_utc() - time::Duration::days(1);
    let mut rows = 0u64;
    for k in 0..args.sessions {
        let id = Uuid::new_v4();
        let created = start + time::Duration::milliseconds(k as i64);
        store
            .save_session(&SessionRecord {
                id,
                agent: "sed".into(),
                created_at: created,
                last_activity_at: created,
                title: Some(format!("session {k}")),
                metadata: None,
                cwd: None,
                agent_session_id: None,
                closed: None,
                options: json!({}),
                forked_from: None,
                owner: None,
            })
            .await
            .expect("save_session");
        let mut seq = 0u64;
        let mut messages = Vec::with_capacity(args.messages);
        for ord in 0..args.messages {
            let m: Message = serde_json::from_value(json!({
                "id": Uuid::new_v4(), "session_id": id,
                "input": pad(format!("message {ord} of session {k} "), args.input_bytes),
                "output": pad(format!("reply {ord} "), args.output_bytes),
                "status": "completed", "error": null,
                "created_at": "2026-12-01T00:00:00Z", "started_at": "2026-12-01T00:00:00Z",
                "finished_at": "2026-12-01T00:00:01Z", "duration_ms": 1000, "usage": null,
                "fallback": false
            }))
            .expect("a message");
            rows += 1;
            if args.events_per_message > 0 {
                let events: Vec<EventRecord> = (0..args.events_per_message)
                    .map(|_| {
                        seq += 1;
                        EventRecord {
                            seq,
                            name: "message.delta".into(),
                            message_id: Some(m.id),
                            data: serde_json::to_string(
                                &json!({"message_id": m.id, "text": m.output}),
                            )
                            .unwrap(),
                        }
                    })
                    .collect();
                store
                    .append_events(id, &events)
                    .await
                    .expect("append_events");
            }
            messages.push(m);
        }
        insert_messages(&raw, &messages).await;
        if seq > 0 {
            store.reserve_events(id, seq + 1).await.expect("reserve");
        }
        if (k + 1) % (args.sessions / 10).max(1) == 0 {
            println!(
                "  {} sessions, {rows} messages, {:.0} s, {:.0} messages/s",
                k + 1,
                t.elapsed().as_secs_f64(),
                rows as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    raw.close().await;
    drop(store);
    json!({"reused": false, "sessions": args.sessions, "messages": rows, "secs": secs})
}

/// Writes `messages` (one session's, in order) in one transaction as
/// `Store::save_message` with a usage sum would: body, status, and the
/// session's sum (nothing: these messages carry no usage) and count.
async fn insert_messages(pool: &sqlx::AnyPool, messages: &[Message]) {
    let Some(first) = messages.first() else {
        return;
    };
    let mut tx = pool.begin().await.expect("begin");
    for (n, chunk) in messages.chunks(100).enumerate() {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p = i * 5;
                format!(
                    "(${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO messages (session_id, ord, id, body, status) VALUES {}",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (i, m) in chunk.iter().enumerate() {
            q = q
                .bind(m.session_id.to_string())
                .bind((n * 100 + i) as i64)
                .bind(m.id.to_string())
                .bind(serde_json::to_string(m).expect("a message serialises"))
                .bind("completed");
        }
        q.execute(&mut *tx).await.expect("insert messages");
    }
    sqlx::query(
        "UPDATE sessions SET usage = $1, usage_version = $2, message_count = $3 WHERE id = $4",
    )
    .bind(serde_json::to_string(&agentgate::model::SessionUsage::default()).unwrap())
    .bind(messages.len() as i64)
    .bind(messages.len() as i64)
    .bind(first.session_id.to_string())
    .execute(&mut *tx)
    .await
    .expect("usage sum");
    tx.commit().await.expect("commit");
}

/// One start-up of a gateway on `db`, in this (fresh) process.
fn start_once(db: &std::path::Path) -> Value {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gw")
        .enable_all()
        .build()
        .expect("runtime");
    let rss_bare = rss_kib("VmRSS:");
    let exe = std::env::current_exe().expect("current exe");
    let mut config = agentgate::Config::defaults(&exe);
    config
        .add_profiles_toml("restart", SED_PROFILE)
        .expect("sed profile");
    config.default_agent = "sed".into();
    config.max_sessions = 1_000_000;
    config.store = StoreSpec::Sqlite(db.to_path_buf());
    rt.block_on(async move {
        let t0 = Instant::now();
        let store = Store::open(&config.store)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let open_secs = t0.elapsed().as_secs_f64();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agentgate::serve_with_store(config, store, listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        });
        let body = loop {
            if let Some(body) = healthz(addr).await {
                break body;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(900),
                "no answer in 15 min"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let ready_secs = t0.elapsed().as_secs_f64();
        let rss_ready = rss_kib("VmRSS:");
        let health: Value = serde_json::from_str(&body).unwrap_or_default();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_settled = rss_kib("VmRSS:");
        let hwm = rss_kib("VmHWM:");
        let t1 = Instant::now();
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(120), task).await;
        json!({
            "ready_secs": ready_secs, "open_secs": open_secs, "sessions": health["sessions"],
            "rss_bare_kib": rss_bare, "rss_ready_kib": rss_ready, "rss_settled_kib": rss_settled,
            "hwm_kib": hwm, "shutdown_secs": t1.elapsed().as_secs_f64(),
        })
    })
}

/// `GET /healthz`: the body once it answers 200.
async fn healthz(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// A line of `/proc/self/status` (`VmRSS:`, `VmHWM:`) in KiB.
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
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
