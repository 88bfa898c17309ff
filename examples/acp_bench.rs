//! The pinned ACP agents behind the gateway, offline against the test
//! suite's model mocks: what a persistent ACP session saves, and what the
//! gateway adds over driving the same agent over its pipes.
//!
//! ```sh
//! bash scripts/install-acp-agents.sh     # once: the pinned ACP agents in tests/acp
//! cargo run --release --example acp_bench                    # 20 of each, both agents
//! cargo run --release --example acp_bench -- --agent codex --runs 30 --json target/acp_bench.json
//! ```
//!
//! For each agent (`gemini`: gemini-cli `--acp` against
//! `tests/support/mock_gemini.rs`; `codex`: codex-acp's native binary
//! against `tests/support/mock_openai.rs`), `--runs` rounds, each:
//! - **one-shot**: `POST /oneshot` (a fresh process: `initialize`,
//!   `session/new`, one `session/prompt`, then SIGTERM and reap);
//! - **cold**: `POST /sessions` then its first message (the child starts now);
//! - **warm**: the next message of a session whose child already answered;
//! - **direct one-shot** and **direct warm**: the same agent with no gateway,
//!   raw JSON-RPC written to its stdin and read from its stdout — a fresh
//!   process per message (the same handshake, prompt, SIGTERM, reap), and
//!   one persistent child. That is the floor; the gateway's added latency is
//!   the difference.
//!
//! Latency is from the request to the end of the reply (`message.completed`
//! on the SSE stream; the JSON answer for one-shot; the `session/prompt`
//! result, or the reaped child, directly), median and p90. CPU per message
//! is counted as in `claude_bench` (the agent's process group from `/proc`,
//! plus the gateway's `gw…` threads; the mocks run on other threads and are
//! not counted). Prewarmed sessions are left out: they are the same for
//! every protocol and `claude_bench` measures them.

mod bench_support;
#[path = "../tests/support/mock_gemini.rs"]
mod mock_gemini;
#[path = "../tests/support/mock_openai.rs"]
mod mock_openai;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentgate::config::{codex_profile, gemini_profile, AgentProfile};
use bench_support::*;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "one-shot vs session messages with the real ACP agents (see the doc comment)")]
struct Args {
    /// Replies of each kind per agent.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Which agents (repeatable); both when absent.
    #[arg(long, value_enum)]
    agent: Vec<Agent>,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Agent {
    Gemini,
    Codex,
}

/// One agent set up against its mock, in a fresh HOME.
struct Setup {
    profile: AgentProfile,
    version: &'static str,
    mock_url: String,
    /// The running mock; dropping it stops it.
    _mock: Box<dyn std::any::Any>,
    _home: tempfile::TempDir,
}

fn setup(agent: Agent, rt: &tokio::runtime::Runtime) -> Setup {
    let home = tempfile::Builder::new()
        .prefix("agentgate-acp-bench-")
        .tempdir()
        .expect("temp HOME");
    let work = home.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let (mut profile, env, version, mock_url, mock): (_, _, _, _, Box<dyn std::any::Any>) =
        match agent {
            Agent::Gemini => {
                let mock = rt.block_on(mock_gemini::MockGemini::start());
                (
                    gemini_profile(&mock_gemini::gemini_bin()),
                    mock.child_env(home.path()),
                    mock_gemini::GEMINI_VERSION,
                    mock.base_url(),
                    Box::new(mock),
                )
            }
            Agent::Codex => {
                let mock = rt.block_on(mock_openai::MockOpenAi::start());
                (
                    codex_profile(&codex_native_bin()),
                    mock.child_env(home.path(), "never"),
                    mock_openai::CODEX_ACP_VERSION,
                    mock.base_url(),
                    Box::new(mock),
                )
            }
        };
    // Only what the mock needs: nothing of this machine's keys leaks in.
    profile.pass_env.clear();
    profile.env = env.into_iter().collect();
    profile.cwd = Some(work);
    Setup {
        profile,
        version,
        mock_url,
        _mock: mock,
        _home: home,
    }
}

/// codex-acp's native binary. `node_modules/.bin/codex-acp` is a node
/// script that runs it with `spawnSync`: node's start-up would be counted
/// as codex's, and a SIGTERM to the group ends node before it reaps the
/// native process, whose CPU then goes to init instead of this process's
/// `cutime`. `AGENTGATE_TEST_CODEX_ACP_BIN` wins when set.
fn codex_native_bin() -> PathBuf {
    let wrapper = mock_openai::codex_acp_bin();
    let native = wrapper.with_file_name("codex-acp-linux-x64");
    if std::env::var_os("AGENTGATE_TEST_CODEX_ACP_BIN").is_none() && native.exists() {
        native
    } else {
        wrapper
    }
}

fn main() {
    let args = Args::parse();
    let agents = if args.agent.is_empty() {
        vec![Agent::Gemini, Agent::Codex]
    } else {
        args.agent.clone()
    };
    let client_rt = runtime("lg");
    let gw_rt = runtime("gw");
    let mut report = serde_json::Map::new();
    for agent in agents {
        let s = setup(agent, &client_rt);
        let name = s.profile.name.clone();
        let direct = Direct {
            argv: s.profile.persistent_argv(None),
            env: agentgate::process::child_env(&s.profile),
            cwd: s.profile.cwd.clone().expect("set above"),
        };
        let served = Served::start(&gw_rt, config_with(vec![s.profile.clone()]));
        println!(
            "\n{name} {} ({}), mock API {}, gateway {}; {} runs of each kind\n",
            s.version, s.profile.command[0], s.mock_url, served.base, args.runs
        );
        let mut figures = client_rt.block_on(bench(&served.base, &name, args.runs, &direct));
        served.stop(&gw_rt);
        figures["version"] = json!(s.version);
        report.insert(name, figures);
    }
    if let Some(path) = &args.json {
        let report = json!({"runs": args.runs, "agents": report});
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write --json");
        println!("figures written to {}", path.display());
    }
}

/// How to run the agent without the gateway.
struct Direct {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

impl Direct {
    /// A child that answered `initialize` and `session/new`.
    async fn start(&self) -> AcpChild {
        let mut child = tokio::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the agent");
        let mut c = AcpChild {
            pid: child.id().expect("pid"),
            stdin: child.stdin.take().unwrap(),
            stdout: tokio::io::BufReader::new(child.stdout.take().unwrap()),
            child,
            next_id: 0,
            session_id: Value::Null,
        };
        c.call(
            "initialize",
            json!({
                "protocolVersion": 1,
                "clientCapabilities": {"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false},
            }),
        )
        .await;
        let new = c
            .call("session/new", json!({"cwd": self.cwd, "mcpServers": []}))
            .await;
        c.session_id = new["sessionId"].clone();
        c
    }

    /// A fresh process for one message, reaped: what `POST /oneshot` does.
    async fn oneshot(&self, content: &str) -> Duration {
        let t0 = Instant::now();
        let mut c = self.start().await;
        c.prompt(content).await;
        c.end().await;
        t0.elapsed()
    }
}

/// An ACP agent driven by raw JSON-RPC lines over its pipes.
struct AcpChild {
    pid: u32,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    session_id: Value,
}

impl AcpChild {
    /// Sends a request and reads lines until its response: its `result`.
    /// Requests from the agent are refused at once, as the gateway does.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = self.stdout.read_line(&mut buf).await.expect("read agent");
            assert!(n > 0, "the agent exited during {method}");
            let Ok(v) = serde_json::from_str::<Value>(&buf) else {
                continue;
            };
            match (v.get("method"), v.get("id")) {
                (None, Some(got)) if *got == json!(id) => {
                    assert!(v.get("error").is_none(), "{method}: {buf}");
                    return v["result"].clone();
                }
                (Some(m), Some(req)) => {
                    let refusal = json!({"jsonrpc": "2.0", "id": req, "error": {"code": -32601, "message": format!("not served: {m}")}});
                    self.stdin
                        .write_all(format!("{refusal}\n").as_bytes())
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    }

    /// One `session/prompt`, until its result.
    async fn prompt(&mut self, content: &str) -> Duration {
        let t0 = Instant::now();
        let params =
            json!({"sessionId": self.session_id, "prompt": [{"type": "text", "text": content}]});
        let result = self.call("session/prompt", params).await;
        assert_eq!(result["stopReason"], "end_turn", "{result}");
        t0.elapsed()
    }

    /// Stdin's end and SIGTERM (codex-acp does not exit at stdin's end), then reap.
    async fn end(mut self) {
        drop(self.stdin);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the agent ends within 10 s of SIGTERM")
            .expect("wait");
    }
}

async fn bench(base: &str, agent: &str, runs: usize, direct: &Direct) -> Value {
    let b = Bench::new(base);
    let (mut oneshot, mut cold, mut warm) = (Kind::default(), Kind::default(), Kind::default());
    let (mut d_oneshot, mut d_warm) = (Kind::default(), Kind::default());
    // Warm-ups, not counted: page cache, the first model request.
    let mut d_child = direct.start().await;
    d_child.prompt("warm-up").await;
    direct.oneshot("warm-up").await;
    let (warm_id, warm_pid) = b.create(agent).await;
    b.message(&warm_id, "warm-up").await;
    b.oneshot(agent, "warm-up").await;
    for round in 0..runs {
        // One-shot through the gateway.
        b.sample_oneshot(agent, &format!("one-shot {round}"), &mut oneshot)
            .await;

        // Cold: the child starts with the session.
        b.sample_first_message(agent, &format!("cold {round}"), &mut cold)
            .await;

        // The floor: the same agent without the gateway.
        let c0 = reaped_children_cpu();
        d_oneshot
            .latency
            .push(direct.oneshot(&format!("direct one-shot {round}")).await);
        d_oneshot.child_cpu.push(reaped_children_cpu() - c0);
        let c0 = group_cpu_of(d_child.pid);
        d_warm
            .latency
            .push(d_child.prompt(&format!("direct warm {round}")).await);
        d_warm.child_cpu.push(group_cpu_of(d_child.pid) - c0);

        // Warm: the next message of a live session.
        b.sample_next_message(&warm_id, warm_pid, &format!("warm {round}"), &mut warm)
            .await;
        eprint!(".");
    }
    eprintln!();
    b.delete(&warm_id).await;
    d_child.end().await;
    print_table(
        &oneshot,
        &[
            ("one-shot (POST /oneshot)", &oneshot),
            ("cold session, first message", &cold),
            ("warm session, next message", &warm),
            ("direct: fresh process, raw JSON-RPC", &d_oneshot),
            ("direct: persistent child, raw JSON-RPC", &d_warm),
        ],
    );
    let added = |p: f64| pct(&warm.latency, p) - pct(&d_warm.latency, p);
    let added_oneshot = |p: f64| pct(&oneshot.latency, p) - pct(&d_oneshot.latency, p);
    println!(
        "\ngateway added (p50 / p90): warm {:+.1} / {:+.1} ms; one-shot {:+.1} / {:+.1} ms",
        added(50.0),
        added(90.0),
        added_oneshot(50.0),
        added_oneshot(90.0),
    );
    println!(
        "CPU split (s/msg, agent + gateway): one-shot {:.3} + {:.4}; cold {:.3} + {:.4} (agent since its start: {:.3}); warm {:.3} + {:.4}",
        mean(&oneshot.child_cpu),
        mean(&oneshot.gw_cpu),
        mean(&cold.child_cpu),
        mean(&cold.gw_cpu),
        mean(&cold.child_cpu_since_start),
        mean(&warm.child_cpu),
        mean(&warm.gw_cpu),
    );
    println!(
        "first delta p50: cold {:.1} ms, warm {:.1} ms",
        pct(&cold.first_delta, 50.0),
        pct(&warm.first_delta, 50.0)
    );
    json!({
        "oneshot": oneshot.json(), "cold": cold.json(), "warm": warm.json(),
        "direct_oneshot": d_oneshot.json(), "direct_warm": d_warm.json(),
        "added_warm_p50_ms": added(50.0), "added_warm_p90_ms": added(90.0),
        "added_oneshot_p50_ms": added_oneshot(50.0), "added_oneshot_p90_ms": added_oneshot(90.0),
    })
}
