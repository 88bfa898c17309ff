//! Smoke test of the test infrastructure itself: the real Claude Code CLI
//! (pinned in `tests/claude`, installed by `scripts/install-claude.sh`) run
//! offline against `tests/support/mock_anthropic.rs`.
//!
//! Why: agentgate's Claude protocol handling is only as good as what it was
//! tested against. These tests pin down, with the real binary, the facts the
//! gateway relies on (see `docs/claude-cli-notes.md`): the stream-json line
//! types, that a persistent child keeps context, the `can_use_tool` permission
//! round trip, interrupts and `--resume`. If the CLI is missing the tests fail
//! (they never skip): run `scripts/install-claude.sh`.
//!
//! They drive `claude` with `tokio::process` directly, not through the
//! gateway, and bound every wait with a timeout.

#[path = "support/mock_anthropic.rs"]
mod mock_anthropic;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mock_anthropic::{claude_bin, temp_home, MockAnthropic, ENV_REMOVE};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Upper bound for any single wait on the CLI (cold start is ~0.3 s here;
/// generous for loaded CI machines).
const WAIT: Duration = Duration::from_secs(60);

const PERSISTENT: &[&str] = &[
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
];

/// One `claude` child with piped stdio; stdout read as JSON lines.
struct Claude {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    /// Every stdout line read so far.
    seen: Vec<Value>,
}

impl Claude {
    fn spawn(mock: &MockAnthropic, home: &Path, cwd: &Path, args: &[&str]) -> Claude {
        let mut cmd = tokio::process::Command::new(claude_bin());
        cmd.args(args)
            .current_dir(cwd)
            .envs(mock.child_env(home))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in ENV_REMOVE {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn claude");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = String::new();
            let _ = err_pipe.read_to_string(&mut buf).await;
            sink.lock().unwrap().push_str(&buf);
        });
        Claude {
            child,
            stdin,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    async fn write_line(&mut self, value: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        let mut line = serde_json::to_vec(value).unwrap();
        line.push(b'\n');
        stdin.write_all(&line).await.expect("write to claude stdin");
        stdin.flush().await.expect("flush claude stdin");
    }

    async fn send_user(&mut self, text: &str) {
        self.write_line(&json!({"type": "user", "message": {"role": "user", "content": text}}))
            .await;
    }

    fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Next stdout line as JSON; `None` at EOF. Panics on timeout.
    async fn next(&mut self) -> Option<Value> {
        let line = match tokio::time::timeout(WAIT, self.stdout.next_line()).await {
            Ok(line) => line.expect("read claude stdout"),
            Err(_) => panic!(
                "no stdout line from claude within {WAIT:?}; {}",
                self.context()
            ),
        }?;
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("claude printed a non-JSON line ({e}): {line}"));
        self.seen.push(value.clone());
        Some(value)
    }

    /// Reads lines until one matches `pred` and returns it. Panics on EOF or timeout.
    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next().await {
                Some(v) if pred(&v) => return v,
                Some(_) => {}
                None => panic!("claude stdout ended before {what}; {}", self.context()),
            }
        }
    }

    async fn until_result(&mut self) -> Value {
        self.until("a result line", |v| v["type"] == "result").await
    }

    /// Reads the rest of stdout (until EOF) and waits for the exit status.
    async fn finish(&mut self) -> ExitStatus {
        while self.next().await.is_some() {}
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.expect("wait for claude"),
            Err(_) => panic!("claude did not exit within {WAIT:?}; {}", self.context()),
        }
    }

    fn context(&self) -> String {
        let types: Vec<String> = self.seen.iter().map(line_kind).collect();
        format!(
            "lines so far: {types:?}; stderr: {:?}",
            self.stderr.lock().unwrap()
        )
    }
}

/// `type`, `type/subtype` or `stream_event/<event type>` of one stdout line.
fn line_kind(v: &Value) -> String {
    let t = v["type"].as_str().unwrap_or("?");
    if t == "stream_event" {
        return format!(
            "stream_event/{}",
            v["event"]["type"].as_str().unwrap_or("?")
        );
    }
    match v["subtype"].as_str() {
        Some(s) => format!("{t}/{s}"),
        None => t.to_string(),
    }
}

/// Concatenated `text_delta`s of the `stream_event` lines in `lines`.
fn streamed_text(lines: &[Value]) -> String {
    lines
        .iter()
        .filter(|v| v["type"] == "stream_event" && v["event"]["type"] == "content_block_delta")
        .filter_map(|v| v["event"]["delta"]["text"].as_str())
        .collect()
}

fn transcript(home: &Path, session_id: &str) -> Option<PathBuf> {
    let projects = home.join(".claude/projects");
    std::fs::read_dir(projects)
        .ok()?
        .filter_map(|d| d.ok())
        .map(|d| d.path().join(format!("{session_id}.jsonl")))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_prints_result_with_mock_text() {
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let cwd = tempfile::tempdir().unwrap();
    let mut claude = Claude::spawn(
        &mock,
        home.path(),
        cwd.path(),
        &["-p", "--output-format", "stream-json", "--verbose"],
    );
    let stdin = claude.stdin.as_mut().unwrap();
    stdin
        .write_all(b"hello from the smoke test\n")
        .await
        .unwrap();
    claude.close_stdin();

    let status = claude.finish().await;
    assert!(
        status.success(),
        "claude exited {status}; {}",
        claude.context()
    );
    let kinds: Vec<String> = claude.seen.iter().map(line_kind).collect();
    assert_eq!(
        kinds,
        ["system/init", "assistant", "result/success"],
        "one-shot line types"
    );
    let result = claude.seen.last().unwrap();
    assert_eq!(result["is_error"], false);
    assert_eq!(
        result["result"],
        "mock reply #1: messages=2; last=hello from the smoke test"
    );
    assert_eq!(result["session_id"], claude.seen[0]["session_id"]);
    assert_eq!(mock.conversation_requests().len(), 1);
    assert_eq!(mock.unknown_requests(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_child_keeps_context_and_resume_restores_it() {
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let cwd = tempfile::tempdir().unwrap();
    let mut claude = Claude::spawn(&mock, home.path(), cwd.path(), PERSISTENT);

    claude.send_user("first").await;
    let first = claude.until_result().await;
    assert_eq!(first["subtype"], "success");
    assert_eq!(first["is_error"], false);
    assert_eq!(first["result"], "mock reply #1: messages=2; last=first");
    assert_eq!(
        streamed_text(&claude.seen),
        "mock reply #1: messages=2; last=first"
    );
    let kinds: Vec<String> = claude.seen.iter().map(line_kind).collect();
    assert_eq!(
        kinds,
        [
            "system/init",
            "system/status",
            "stream_event/message_start",
            "stream_event/content_block_start",
            "stream_event/content_block_delta",
            "stream_event/content_block_delta",
            "stream_event/content_block_delta",
            "stream_event/content_block_delta",
            "stream_event/content_block_delta",
            "assistant",
            "stream_event/content_block_stop",
            "stream_event/message_delta",
            "stream_event/message_stop",
            "result/success",
        ],
        "persistent-mode line types for one text reply"
    );
    let session_id = first["session_id"].as_str().unwrap().to_string();

    let seen_before = claude.seen.len();
    let started = Instant::now();
    claude.send_user("second").await;
    let second = claude.until_result().await;
    let warm = started.elapsed();
    assert_eq!(second["result"], "mock reply #2: messages=4; last=second");
    assert_eq!(
        streamed_text(&claude.seen[seen_before..]),
        "mock reply #2: messages=4; last=second"
    );
    assert_eq!(second["session_id"], session_id.as_str());
    eprintln!("warm reply took {warm:?}");

    // Closing stdin ends the child cleanly once it is idle.
    claude.close_stdin();
    let status = claude.finish().await;
    assert!(
        status.success(),
        "claude exited {status}; {}",
        claude.context()
    );
    assert!(
        transcript(home.path(), &session_id).is_some(),
        "no transcript for {session_id} under {}/.claude/projects",
        home.path().display()
    );

    // A new child with --resume (same HOME) sees the earlier turns.
    let mut resumed = Claude::spawn(
        &mock,
        home.path(),
        cwd.path(),
        &[PERSISTENT, &["--resume", &session_id]].concat(),
    );
    resumed.send_user("third").await;
    let third = resumed.until_result().await;
    assert_eq!(third["is_error"], false);
    assert_eq!(
        third["session_id"],
        session_id.as_str(),
        "resume keeps the id"
    );
    let text = third["result"].as_str().unwrap();
    let len: usize = text
        .strip_prefix("mock reply #3: messages=")
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reply after resume: {text}"));
    assert!(len > 4, "resumed conversation lost context: {text}");
    assert!(text.ends_with("last=third"), "{text}");
    resumed.close_stdin();
    assert!(resumed.finish().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_permission_round_trip_over_stdio() {
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let cwd = tempfile::tempdir().unwrap();
    let target = cwd.path().join("touched-by-claude");
    let command = format!("touch {}", target.display());
    mock.push_bash(&command);

    let mut claude = Claude::spawn(
        &mock,
        home.path(),
        cwd.path(),
        &[PERSISTENT, &["--permission-prompt-tool", "stdio"]].concat(),
    );
    // No `initialize` control request and no --permission-mode are needed.
    claude.send_user("please touch the file").await;
    let request = claude
        .until("a can_use_tool control_request", |v| {
            v["type"] == "control_request" && v["request"]["subtype"] == "can_use_tool"
        })
        .await;
    assert_eq!(request["request"]["tool_name"], "Bash");
    assert_eq!(request["request"]["input"]["command"], command.as_str());
    assert!(!target.exists(), "the tool ran before it was allowed");

    let request_id = request["request_id"].as_str().unwrap();
    claude
        .write_line(&json!({
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": request_id,
                "response": {"behavior": "allow", "updatedInput": request["request"]["input"]},
            }
        }))
        .await;
    let result = claude.until_result().await;
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["num_turns"], 2);
    assert!(target.exists(), "allowed Bash command did not run");
    assert_eq!(
        result["result"],
        "mock reply #2: messages=4; last=tool_result:(Bash completed with no output)"
    );
    let kinds: Vec<String> = claude.seen.iter().map(line_kind).collect();
    assert!(
        kinds.contains(&"user".to_string()),
        "no user (tool_result) line: {kinds:?}"
    );
    let requests = mock.conversation_requests();
    assert_eq!(requests.len(), 2);
    let last_message = requests[1]["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(last_message["content"][0]["type"], "tool_result");

    claude.close_stdin();
    assert!(claude.finish().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_mid_reply_ends_it_with_an_error_result() {
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let cwd = tempfile::tempdir().unwrap();
    // First delta at once, then 30 s before each of the next ones: only an
    // interrupt ends this reply within WAIT.
    mock.set_delta_delay(Duration::from_secs(30));
    let mut claude = Claude::spawn(&mock, home.path(), cwd.path(), PERSISTENT);

    claude.send_user("slow please").await;
    claude
        .until("the first text delta", |v| {
            v["type"] == "stream_event" && v["event"]["type"] == "content_block_delta"
        })
        .await;
    let started = Instant::now();
    claude
        .write_line(&json!({
            "type": "control_request",
            "request_id": "int-1",
            "request": {"subtype": "interrupt"}
        }))
        .await;
    let ack = claude
        .until("the interrupt's control_response", |v| {
            v["type"] == "control_response"
        })
        .await;
    assert_eq!(ack["response"]["subtype"], "success");
    assert_eq!(ack["response"]["request_id"], "int-1");
    let result = claude.until_result().await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "interrupt took {:?}",
        started.elapsed()
    );
    assert_eq!(result["subtype"], "error_during_execution");
    assert_eq!(result["is_error"], true);
    // The CLI dropped the slow HTTP response.
    mock.wait_until("the aborted stream", WAIT, |m| m.aborted_streams() == 1)
        .await;
    assert!(
        claude.seen.iter().any(|v| v["type"] == "user"
            && v["message"]["content"][0]["text"] == "[Request interrupted by user]"),
        "no interrupt marker line; {}",
        claude.context()
    );

    // The next message works and the context (with the partial reply) is kept.
    mock.set_delta_delay(Duration::ZERO);
    claude.send_user("after the interrupt").await;
    let next = claude.until_result().await;
    assert_eq!(next["is_error"], false);
    assert_eq!(
        next["result"],
        "mock reply #2: messages=4; last=after the interrupt"
    );
    claude.close_stdin();
    assert!(claude.finish().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_error_ends_the_reply_with_is_error() {
    let mock = MockAnthropic::start().await;
    let home = temp_home();
    let cwd = tempfile::tempdir().unwrap();
    mock.fail_next(1, 500);
    let mut claude = Claude::spawn(&mock, home.path(), cwd.path(), PERSISTENT);

    claude.send_user("this one fails").await;
    let failed = claude.until_result().await;
    assert_eq!(failed["is_error"], true, "{failed}");
    // Surprising but true: an API error is subtype "success" with is_error.
    assert_eq!(failed["subtype"], "success");
    assert_eq!(failed["api_error_status"], 500);
    assert_eq!(mock.requests().len(), 1, "the CLI retried");

    claude.send_user("this one works").await;
    let ok = claude.until_result().await;
    assert_eq!(ok["is_error"], false);
    assert!(
        ok["result"]
            .as_str()
            .unwrap()
            .ends_with("last=this one works"),
        "{ok}"
    );
    claude.close_stdin();
    assert!(claude.finish().await.success());
}
