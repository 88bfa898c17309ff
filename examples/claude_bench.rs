//! The real Claude Code CLI behind the gateway, offline against the test
//! suite's mock Anthropic API: what a persistent session saves.
//!
//! ```sh
//! bash scripts/install-claude.sh        # once: the pinned CLI in tests/claude
//! cargo run --release --example claude_bench                 # 20 of each, ~3 min
//! cargo run --release --example claude_bench -- --runs 30 --json target/claude_bench.json
//! ```
//!
//! Four ways to get one reply, each `--runs` times, interleaved in rounds so
//! that machine noise hits all four alike:
//! - **one-shot**: `POST /oneshot` (`claude -p`, one process per message);
//! - **cold**: `POST /sessions` then its first message (the child starts now);
//! - **prewarmed**: `POST /sessions` on a profile with `prewarm = 1` (the
//!   child was started `--settle` seconds ahead and got the warm-up request,
//!   `warm_up = true`), then its first message; and the same with
//!   `warm_up = false` (**prewarmed, no warm-up**: the child only waited);
//! - **warm**: the next message of a session whose child already answered.
//!
//! Every request the mock API received is counted at the end: the warm-up
//! must add none (the run fails if any request other than one model call per
//! reply arrived, `count_tokens` included).
//!
//! The same CLI is also driven directly, with no gateway: `claude -p` spawned
//! per message, and a persistent stream-json child written to and read over
//! pipes. That is the floor: what the gateway adds is the difference.
//!
//! Latency is from the request to the end of the reply (`message.completed`
//! on the SSE stream; the JSON answer for one-shot), median and p90. CPU per
//! message counts the children — `utime + stime` of the CLI's process group
//! from `/proc/<pid>/stat` (with `cutime`/`cstime` of what they reaped), or
//! this process's `cutime + cstime` for reaped one-shot children — plus the
//! gateway's own threads (`/proc/self/task/*/schedstat` of threads named
//! `gw…`). The mock API runs on other threads and is not counted: a real API
//! is not on this machine. The CLI path: `$AGENTGATE_CLAUDE_BIN`, else
//! `tests/claude/node_modules/.bin/claude`. At most two CLI children live at
//! a time (~200 MB RSS each).

mod bench_support;
#[path = "../tests/support/mock_anthropic.rs"]
mod mock_anthropic;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentgate::config::claude_profile;
use bench_support::*;
use clap::Parser;
use mock_anthropic::{claude_bin, temp_home, MockAnthropic};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "one-shot vs session messages with the real claude CLI (see the doc comment)")]
struct Args {
    /// Replies of each kind (≥ 20 for the figures in docs/BENCHMARKS.md).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Seconds a prewarmed child is left to start before its session is created.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let client_rt = runtime("lg");
    let gw_rt = runtime("gw");
    let bin = claude_bin();
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mock = client_rt.block_on(MockAnthropic::start());
    let home = temp_home();
    let mut profile = claude_profile(&bin);
    profile.pass_env.clear();
    profile.env = mock.child_env(home.path()).into_iter().collect();
    profile.cwd = Some(home.path().to_path_buf());
    profile.stop_grace = Duration::from_secs(5);
    let direct = Direct {
        oneshot_argv: profile.oneshot_argv(None),
        persistent_argv: profile.persistent_argv(None),
        env: agentgate::process::child_env(&profile),
        cwd: home.path().to_path_buf(),
    };
    let mut prewarmed = profile.clone();
    prewarmed.name = "claude-prewarmed".into();
    prewarmed.prewarm = 1;
    let mut plain = prewarmed.clone();
    plain.name = "claude-prewarmed-plain".into();
    plain.warm_up = false;
    let served = Served::start(&gw_rt, config_with(vec![profile, prewarmed, plain]));
    let base = served.base.clone();
    println!(
        "claude {version} ({}), mock API {}, gateway {base}; {} runs of each kind\n",
        bin.display(),
        mock.base_url(),
        args.runs
    );
    let mut report = client_rt.block_on(bench(&base, &args, &direct));
    served.stop(&gw_rt);
    // One model call per reply and nothing else: the warm-up calls no API.
    let recorded = mock.recorded();
    let model_calls = recorded
        .iter()
        .filter(|r| r.kind == mock_anthropic::RequestKind::Conversation)
        .count();
    let other: Vec<String> = recorded
        .iter()
        .filter(|r| r.kind != mock_anthropic::RequestKind::Conversation)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let replies = report["replies"].as_u64().unwrap_or(0) as usize;
    println!(
        "mock API: {model_calls} model calls for {replies} replies, {} other requests {other:?}",
        other.len()
    );
    assert_eq!(model_calls, replies, "one model call per reply");
    assert!(
        other.is_empty(),
        "no other API request (count_tokens included)"
    );
    report["model_calls"] = json!(model_calls);
    report["other_api_requests"] = json!(other.len());
    drop(mock);
    if let Some(path) = &args.json {
        let mut report = report;
        report["claude_version"] = json!(version);
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write --json");
        println!("figures written to {}", path.display());
    }
}

/// How to run the CLI without the gateway.
struct Direct {
    oneshot_argv: Vec<String>,
    persistent_argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

impl Direct {
    fn command(&self, argv: &[String]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// `claude -p` with `content` on stdin (one stream-json user line, as
    /// the profile's one-shot command reads it), until it exits.
    async fn oneshot(&self, content: &str) -> Duration {
        use tokio::io::AsyncWriteExt;
        let line = json!({"type": "user", "message": {"role": "user", "content": content}});
        let t0 = Instant::now();
        let mut child = self
            .command(&self.oneshot_argv)
            .spawn()
            .expect("spawn claude -p");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.expect("claude -p");
        let d = t0.elapsed();
        assert!(out.status.success(), "claude -p failed");
        d
    }

    fn persistent(&self) -> DirectChild {
        let mut child = self
            .command(&self.persistent_argv)
            .spawn()
            .expect("spawn claude");
        let stdin = child.stdin.take().unwrap();
        let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        DirectChild {
            pid: child.id().expect("pid"),
            child,
            stdin,
            stdout,
        }
    }
}

/// A persistent stream-json child driven over pipes.
struct DirectChild {
    pid: u32,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl DirectChild {
    /// One user line; returns when the `result` line is read.
    async fn message(&mut self, content: &str) -> Duration {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let line = json!({"type": "user", "message": {"role": "user", "content": content}});
        let t0 = Instant::now();
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = self.stdout.read_line(&mut buf).await.expect("read claude");
            assert!(n > 0, "claude exited");
            if let Ok(v) = serde_json::from_str::<Value>(&buf) {
                if v["type"] == "result" {
                    assert_eq!(v["is_error"], false, "{buf}");
                    return t0.elapsed();
                }
            }
        }
    }

    async fn close(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn bench(base: &str, a: &Args, direct: &Direct) -> Value {
    let b = Bench::new(base);
    let (mut oneshot, mut cold, mut pre, mut warm) = (
        Kind::default(),
        Kind::default(),
        Kind::default(),
        Kind::default(),
    );
    let (mut d_oneshot, mut d_warm) = (Kind::default(), Kind::default());
    let mut pre_plain = Kind::default();
    let mut d_child = direct.persistent();
    d_child.message("warm-up").await;
    direct.oneshot("warm-up").await;
    // One long-lived session for warm messages; its first reply is not counted.
    let (warm_id, warm_pid) = b.create("claude").await;
    b.message(&warm_id, "warm-up").await;
    // Warm-up of the one-shot path (page cache).
    b.oneshot("claude", "warm-up").await;
    for round in 0..a.runs {
        // One-shot.
        b.sample_oneshot("claude", &format!("one-shot {round}"), &mut oneshot)
            .await;

        // Cold: the child starts with the session.
        b.sample_first_message("claude", &format!("cold {round}"), &mut cold)
            .await;

        // Prewarmed: the session takes a child started `settle` s ago, with
        // the warm-up and (the other one first in odd rounds) without.
        let mut order = [
            ("claude-prewarmed", &mut pre),
            ("claude-prewarmed-plain", &mut pre_plain),
        ];
        if round % 2 == 1 {
            order.reverse();
        }
        for (agent, kind) in order {
            b.warm_pool_ready(agent, a.settle).await;
            b.sample_first_message(agent, &format!("{agent} {round}"), kind)
                .await;
        }

        // The floor: the same CLI without the gateway.
        let c0 = reaped_children_cpu();
        d_oneshot
            .latency
            .push(direct.oneshot(&format!("direct one-shot {round}")).await);
        d_oneshot.child_cpu.push(reaped_children_cpu() - c0);
        let c0 = group_cpu_of(d_child.pid);
        d_warm
            .latency
            .push(d_child.message(&format!("direct warm {round}")).await);
        d_warm.child_cpu.push(group_cpu_of(d_child.pid) - c0);

        // Warm: the next message of a live session.
        b.sample_next_message(&warm_id, warm_pid, &format!("warm {round}"), &mut warm)
            .await;
        eprint!(".");
    }
    eprintln!();
    b.delete(&warm_id).await;
    d_child.close().await;
    let one = oneshot.json();
    let rows = [
        ("one-shot (POST /oneshot)", &oneshot),
        ("cold session, first message", &cold),
        ("prewarmed session, first message", &pre),
        ("prewarmed, no warm-up, first msg", &pre_plain),
        ("warm session, next message", &warm),
        ("direct: claude -p, no gateway", &d_oneshot),
        ("direct: persistent child, pipes", &d_warm),
    ];
    print_table(&oneshot, &rows);
    println!(
        "\nCPU split (s/msg, CLI + gateway): one-shot {:.3} + {:.4}; cold {:.3} + {:.4} (CLI since its start: {:.3}); prewarmed {:.3} + {:.4} (since start: {:.3}); warm {:.3} + {:.4}",
        mean(&oneshot.child_cpu),
        mean(&oneshot.gw_cpu),
        mean(&cold.child_cpu),
        mean(&cold.gw_cpu),
        mean(&cold.child_cpu_since_start),
        mean(&pre.child_cpu),
        mean(&pre.gw_cpu),
        mean(&pre.child_cpu_since_start),
        mean(&warm.child_cpu),
        mean(&warm.gw_cpu),
    );
    println!(
        "first delta p50: cold {:.1} ms, prewarmed {:.1} ms (no warm-up {:.1} ms), warm {:.1} ms",
        pct(&cold.first_delta, 50.0),
        pct(&pre.first_delta, 50.0),
        pct(&pre_plain.first_delta, 50.0),
        pct(&warm.first_delta, 50.0)
    );
    let w = warm.json();
    let p = pre.json();
    let pp = pre_plain.json();
    println!(
        "prewarmed first message / warm message (p50): {:.2}x with the warm-up, {:.2}x without (target <= 2x)",
        p["p50_ms"].as_f64().unwrap() / w["p50_ms"].as_f64().unwrap(),
        pp["p50_ms"].as_f64().unwrap() / w["p50_ms"].as_f64().unwrap(),
    );
    println!(
        "targets: warm {:.1} % of one-shot (<= 5 %), prewarmed first {:.1} % (<= 15 %), CPU per warm message {:.1} % below one-shot (>= 90 %)",
        100.0 * w["p50_ms"].as_f64().unwrap() / one["p50_ms"].as_f64().unwrap(),
        100.0 * p["p50_ms"].as_f64().unwrap() / one["p50_ms"].as_f64().unwrap(),
        100.0 * (1.0 - w["cpu_s"].as_f64().unwrap() / one["cpu_s"].as_f64().unwrap()),
    );
    json!({
        "runs": a.runs, "settle_s": a.settle,
        "oneshot": one, "cold": cold.json(), "prewarmed": p, "prewarmed_no_warm_up": pp, "warm": w,
        // The gateway's and the direct replies, each one model call (warm-ups included).
        "replies": 4 + 7 * a.runs,
        "direct_oneshot": d_oneshot.json(), "direct_warm": d_warm.json(),
    })
}
