//! A local mock of the Anthropic Messages API, so integration tests can run
//! the real Claude Code CLI (`claude`) offline.
//!
//! Why: agentgate's main protocol is whatever the real CLI prints on stdout.
//! Hand-written fake CLIs drift from the real thing; running the pinned CLI
//! (`tests/claude`, installed by `scripts/install-claude.sh`) against this mock
//! checks the gateway against the real line types, control messages, tool
//! permission prompts and session files, with no network and no API key.
//!
//! Include it from an integration test (each test file is its own crate) with
//!
//! ```ignore
//! #[path = "support/mock_anthropic.rs"]
//! mod mock_anthropic;
//! use mock_anthropic::{claude_bin, MockAnthropic, MockReply};
//! ```
//!
//! and give the `claude` child [`MockAnthropic::child_env`] for a fresh `HOME`
//! ([`temp_home`]); remove the variables in [`ENV_REMOVE`].
//!
//! Behaviour (see `docs/claude-cli-notes.md` for what the CLI really sends):
//! - `POST /v1/messages` (the CLI adds `?beta=true`): with `"stream": true` an
//!   SSE stream `message_start`, `content_block_start`, `ping`,
//!   `content_block_delta` × n, `content_block_stop`, `message_delta`,
//!   `message_stop`; otherwise one JSON message. The default text is
//!   `mock reply #N: messages=M; last=TEXT` where `N` counts conversation
//!   answered requests (1, 2, …; failed ones do not count), `M` is the length
//!   of the request's `messages` array (the CLI 2.1.330 sends 2 on the first
//!   turn — the user message and a `role: "system"` environment entry — then
//!   4, 6, … while context is kept) and `TEXT` is the last user text
//!   (trailing whitespace trimmed; `<system-reminder>` blocks skipped;
//!   `tool_result:<content>` when the last user message is a tool result).
//! - A request is a *conversation* request when its body has a `tools` key
//!   (the CLI's main loop always sends one, `[]` with `--tools ""`). Other
//!   `/v1/messages` calls (title generation, quota probes — none seen from
//!   2.1.330 in `-p` mode) get `mock side reply: …`, do not advance `N` and
//!   do not consume scripted replies.
//! - `POST /v1/messages/count_tokens` answers `{"input_tokens": …}`.
//! - Anything else is logged to stderr, recorded and answered `200 {}`.
//!
//! Knobs, all settable while the CLI runs (shared state behind a mutex):
//! - [`MockAnthropic::set_delta_delay`], [`MockAnthropic::set_initial_delay`]:
//!   slow replies, for interrupt and timeout tests;
//! - [`MockAnthropic::fail_next`]: HTTP errors for the next N requests;
//! - [`MockAnthropic::push_reply`] / [`MockAnthropic::push_bash`]: scripted
//!   replies, e.g. a `tool_use` block, then the default text for the request
//!   that carries the `tool_result`;
//! - [`MockAnthropic::set_bash_on_touch`]: a conversation request whose last
//!   user text starts with `touch ` (and that finds no scripted reply) is
//!   answered with a `Bash` `tool_use` running that text, so a client with
//!   no control channel (the browser test, via `examples/mock_anthropic.rs
//!   --bash-on-touch`) can trigger a permission prompt by what it types.
//!
//! - [`MockAnthropic::hold_next`]: the next conversation requests get their
//!   response headers and then nothing, until [`MockAnthropic::release_held`]
//!   or the client goes away — a model stream that went silent (for the
//!   gateway's stall watchdog).
//!
//! Inspection: [`MockAnthropic::requests`] (every body),
//! [`MockAnthropic::recorded`], [`MockAnthropic::aborted_streams`], and
//! [`MockAnthropic::wait_until`] / [`MockAnthropic::wait_for_requests`] to
//! wait on them without sleeping. What the CLI sent, per request body:
//! [`model_of`], [`system_text`], [`image_blocks`] and the `messages` array
//! itself; [`MockAnthropic::held_streams`] counts responses held open.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Reply;
use warp::Filter;

/// Environment variables a `claude` child must not inherit from the test
/// runner: they would send it to another backend, account or config dir.
pub const ENV_REMOVE: &[&str] = &[
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_MODEL",
    "ANTHROPIC_SMALL_FAST_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL",
    "ANTHROPIC_DEFAULT_SONNET_MODEL",
    "ANTHROPIC_DEFAULT_OPUS_MODEL",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CONFIG_DIR",
    "CLAUDECODE",
    "CLAUDE_CODE_ENTRYPOINT",
];

/// The CLI version the tests are pinned to (`tests/claude/package.json`).
pub const CLAUDE_VERSION: &str = "2.1.330";

/// Path of the `claude` binary the tests run: `$AGENTGATE_TEST_CLAUDE_BIN` if
/// set, else `tests/claude/node_modules/.bin/claude`. The variable is read by
/// this harness only: the gateway's own `AGENTGATE_CLAUDE_BIN` would make
/// `claude` the default agent of every gateway a test starts, with no mock.
///
/// Panics (failing the test, never skipping it) when neither exists.
pub fn claude_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTGATE_TEST_CLAUDE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "AGENTGATE_TEST_CLAUDE_BIN={} does not exist; unset it or run scripts/install-claude.sh",
            p.display()
        );
        return p;
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/claude/node_modules/.bin/claude");
    assert!(
        p.exists(),
        "the Claude Code CLI is not installed at {}: run scripts/install-claude.sh \
         (or set AGENTGATE_TEST_CLAUDE_BIN to a claude {CLAUDE_VERSION} binary)",
        p.display()
    );
    p
}

/// A fresh temporary directory to use as the child's `HOME` (the CLI writes
/// `~/.claude.json` and `~/.claude/projects/<cwd>/<session>.jsonl` there);
/// pass it to [`MockAnthropic::child_env`]. Deleted when dropped.
pub fn temp_home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("agentgate-claude-home-")
        .tempdir()
        .expect("create temporary HOME")
}

/// A scripted reply for the next conversation request (see
/// [`MockAnthropic::push_reply`]).
#[derive(Clone, Debug)]
pub enum MockReply {
    /// A text reply, streamed as several `text_delta`s; `stop_reason` `end_turn`.
    Text(String),
    /// One `tool_use` block, its input streamed as `input_json_delta`s;
    /// `stop_reason` `tool_use`. The CLI runs the tool (asking for permission
    /// if needed) and sends the result in its next request.
    ToolUse {
        /// Tool name, e.g. `Bash`.
        name: String,
        /// Tool input, e.g. `{"command": "touch /x", "description": "…"}`.
        input: Value,
    },
}

/// What a recorded request was taken to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `POST /v1/messages` from the CLI's main loop (body has `tools`).
    Conversation,
    /// Any other `POST /v1/messages`.
    Side,
    /// `POST /v1/messages/count_tokens`.
    CountTokens,
    /// Any other method or path.
    Unknown,
}

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (`beta=true` from the CLI), empty if none.
    pub query: String,
    /// Request headers (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Body parsed as JSON (`Null` if empty or not JSON).
    pub body: Value,
    /// Classification.
    pub kind: RequestKind,
    /// HTTP status the mock answered with.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    delta_delay: Duration,
    initial_delay: Duration,
    fail_status: u16,
    fail_remaining: usize,
    scripted: VecDeque<MockReply>,
    bash_on_touch: bool,
    conversation_count: usize,
    log: Vec<RecordedRequest>,
    aborted_streams: usize,
    hold_remaining: usize,
    held_streams: usize,
}

struct State {
    inner: Mutex<Inner>,
    /// Bumped after every change to `inner.log`, `inner.aborted_streams` or `inner.held_streams`.
    changes: tokio::sync::watch::Sender<u64>,
    /// Wakes held responses ([`MockAnthropic::release_held`]).
    release: tokio::sync::Notify,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes [`MockAnthropic::wait_until`] callers.
    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

/// A running mock Messages API on `127.0.0.1:<random port>`. Stops accepting
/// connections when dropped.
pub struct MockAnthropic {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockAnthropic {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl MockAnthropic {
    /// Binds `127.0.0.1:0` and serves in the background on the current
    /// tokio runtime.
    pub async fn start() -> MockAnthropic {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind mock Anthropic API");
        let addr = listener.local_addr().expect("mock local_addr");
        let (changes, _) = tokio::sync::watch::channel(0u64);
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            changes,
            release: tokio::sync::Notify::new(),
        });
        let st = state.clone();
        let routes = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .and_then(
                move |method, path: warp::path::FullPath, query, headers, body| {
                    let st = st.clone();
                    async move {
                        Ok::<_, Infallible>(handle(st, method, path.as_str(), query, headers, body))
                    }
                },
            );
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        MockAnthropic {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, the value for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment a `claude` child needs to talk to this mock:
    /// `ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY=test-key`,
    /// `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`, `DISABLE_AUTOUPDATER=1`,
    /// and `CLAUDE_CODE_MAX_RETRIES=0` (a failing request fails the reply at
    /// once instead of after ~2.5 min of back-off). `HOME` is the caller's
    /// business (see [`temp_home`]).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("ANTHROPIC_BASE_URL", self.base_url()),
            ("ANTHROPIC_API_KEY", "test-key".to_string()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
            ("DISABLE_AUTOUPDATER", "1".to_string()),
            ("CLAUDE_CODE_MAX_RETRIES", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// [`MockAnthropic::env`] plus `HOME=home` and `TMPDIR=home/tmp`
    /// (created here): the CLI also writes outside `HOME`, under `$TMPDIR`
    /// (`cc-socks/<pid>.sock`, `claude-<uid>/…`), which would otherwise pile
    /// up in `/tmp`.
    pub fn child_env(&self, home: &Path) -> Vec<(String, String)> {
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).expect("create TMPDIR under the temporary HOME");
        let mut env = self.env();
        env.push(("HOME".to_string(), home.display().to_string()));
        env.push(("TMPDIR".to_string(), tmp.display().to_string()));
        env
    }

    /// Waits `delay` between consecutive content deltas of every later
    /// streamed reply (`Duration::ZERO`, the default, for none). The first
    /// delta is sent at once, so a reply of `k` deltas shows its first token
    /// and then takes about `(k - 1) × delay`: interrupt it mid-stream.
    pub fn set_delta_delay(&self, delay: Duration) {
        self.state.lock().delta_delay = delay;
    }

    /// Waits `delay` after the response headers and before `message_start`
    /// of every later streamed reply (default none): a model that is slow to
    /// produce its first token.
    pub fn set_initial_delay(&self, delay: Duration) {
        self.state.lock().initial_delay = delay;
    }

    /// Answers the next `count` `/v1/messages` requests (of any kind) with
    /// HTTP `status` and an Anthropic error body. The response carries
    /// `x-should-retry: false`, so the CLI does not retry a 5xx/429 and the
    /// reply ends with a `result` whose `is_error` is true. Note: the CLI
    /// retries a 400 itself with fewer beta features (6 requests in all).
    pub fn fail_next(&self, count: usize, status: u16) {
        let mut g = self.state.lock();
        g.fail_status = status;
        g.fail_remaining = count;
    }

    /// Queues a scripted reply: each conversation request takes the oldest
    /// queued reply, or gets the default text when the queue is empty.
    pub fn push_reply(&self, reply: MockReply) {
        self.state.lock().scripted.push_back(reply);
    }

    /// Queues a `Bash` `tool_use` reply running `command`. The request after
    /// it (the one carrying the `tool_result`) gets the default text unless
    /// more replies are queued.
    pub fn push_bash(&self, command: &str) {
        self.push_reply(bash_reply(command));
    }

    /// When `on` (default off), a conversation request with no scripted reply
    /// queued whose last user text (as in the default reply's `last=`) starts
    /// with `touch ` is answered with a `Bash` `tool_use` whose `command` is
    /// that whole text. The request that carries the `tool_result` (its last
    /// user text is `tool_result:…`) gets the default text, so the reply ends.
    pub fn set_bash_on_touch(&self, on: bool) {
        self.state.lock().bash_on_touch = on;
    }

    /// Holds the next `count` streamed conversation replies open: headers,
    /// then silence (no `message_start`, no ping) until [`Self::release_held`]
    /// or until the client closes the connection (then it counts as aborted).
    pub fn hold_next(&self, count: usize) {
        self.state.lock().hold_remaining = count;
    }

    /// Lets every held reply go on as normal.
    pub fn release_held(&self) {
        self.state.release.notify_waiters();
    }

    /// How many replies have been held open so far (counted when the hold begins).
    pub fn held_streams(&self) -> usize {
        self.state.lock().held_streams
    }

    /// Bodies of every `POST /v1/messages` request (conversation and side
    /// calls, not `count_tokens`), oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.state
            .lock()
            .log
            .iter()
            .filter(|r| matches!(r.kind, RequestKind::Conversation | RequestKind::Side))
            .map(|r| r.body.clone())
            .collect()
    }

    /// Bodies of the conversation requests only, oldest first.
    pub fn conversation_requests(&self) -> Vec<Value> {
        self.state
            .lock()
            .log
            .iter()
            .filter(|r| r.kind == RequestKind::Conversation)
            .map(|r| r.body.clone())
            .collect()
    }

    /// Every request received, with method, path, headers and status.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state.lock().log.clone()
    }

    /// `METHOD /path` of every request the mock does not implement.
    pub fn unknown_requests(&self) -> Vec<String> {
        self.state
            .lock()
            .log
            .iter()
            .filter(|r| r.kind == RequestKind::Unknown)
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    /// How many streamed replies were cut short because the client went away
    /// (e.g. the CLI aborted the request after an interrupt). Counted as soon
    /// as the server drops the response body, even in the middle of a delay.
    pub fn aborted_streams(&self) -> usize {
        self.state.lock().aborted_streams
    }

    /// Waits until at least `n` `POST /v1/messages` requests have arrived
    /// (counted when received, before the reply) and returns all their
    /// bodies. Panics after `within`.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_until(&format!("{n} /v1/messages requests"), within, |m| {
            m.requests().len() >= n
        })
        .await;
        self.requests()
    }

    /// Waits until `cond` holds, re-checking it whenever the mock records a
    /// request or an aborted stream (no polling). Panics after `within`,
    /// naming `what`.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        cond: impl Fn(&MockAnthropic) -> bool,
    ) {
        let mut changes = self.state.changes.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        while !cond(self) {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                panic!(
                    "mock Anthropic API: waited {within:?} for {what}; requests so far: {:?}",
                    self.recorded()
                        .iter()
                        .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
}

/// A `Bash` `tool_use` reply running `command`.
fn bash_reply(command: &str) -> MockReply {
    MockReply::ToolUse {
        name: "Bash".to_string(),
        input: json!({ "command": command, "description": "Run a command for the test" }),
    }
}

fn handle(
    state: Arc<State>,
    method: Method,
    path: &str,
    query: String,
    headers: HeaderMap,
    body: Bytes,
) -> warp::reply::Response {
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let path = path.trim_end_matches('/');
    let kind = match (&method, path) {
        (&Method::POST, "/v1/messages") if json_body.get("tools").is_some() => {
            RequestKind::Conversation
        }
        (&Method::POST, "/v1/messages") => RequestKind::Side,
        (&Method::POST, "/v1/messages/count_tokens") => RequestKind::CountTokens,
        _ => RequestKind::Unknown,
    };
    let mut record = RecordedRequest {
        method: method.to_string(),
        path: path.to_string(),
        query,
        headers,
        body: json_body.clone(),
        kind,
        status: 200,
    };

    match kind {
        RequestKind::Unknown => {
            eprintln!("mock_anthropic: unhandled request {method} {path}; answering 200 {{}}");
            state.lock().log.push(record);
            state.changed();
            warp::reply::json(&json!({})).into_response()
        }
        RequestKind::CountTokens => {
            state.lock().log.push(record);
            state.changed();
            let tokens = (body.len() / 4).max(1);
            warp::reply::json(&json!({ "input_tokens": tokens })).into_response()
        }
        RequestKind::Conversation | RequestKind::Side => {
            let mut g = state.lock();
            if g.fail_remaining > 0 {
                g.fail_remaining -= 1;
                let status = g.fail_status;
                record.status = status;
                g.log.push(record);
                drop(g);
                state.changed();
                return error_response(status);
            }
            let messages = json_body["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let last = last_user_text(&messages);
            let reply = if kind == RequestKind::Conversation {
                g.conversation_count += 1;
                let n = g.conversation_count;
                match g.scripted.pop_front() {
                    Some(reply) => reply,
                    None if g.bash_on_touch && last.starts_with("touch ") => bash_reply(&last),
                    None => MockReply::Text(format!(
                        "mock reply #{n}: messages={}; last={last}",
                        messages.len()
                    )),
                }
            } else {
                MockReply::Text(format!(
                    "mock side reply: messages={}; last={last}",
                    messages.len()
                ))
            };
            let seq = g.log.len() + 1;
            let delays = (g.initial_delay, g.delta_delay);
            let hold = kind == RequestKind::Conversation && g.hold_remaining > 0;
            if hold {
                g.hold_remaining -= 1;
            }
            g.log.push(record);
            drop(g);
            state.changed();
            let model = json_body["model"]
                .as_str()
                .unwrap_or("claude-mock")
                .to_string();
            let input_tokens = (body.len() / 4).max(1);
            let msg = MessageParts {
                id: format!("msg_mock_{seq:04}"),
                tool_id: format!("toolu_mock_{seq:04}"),
                model,
                input_tokens,
                reply,
            };
            if json_body["stream"].as_bool() == Some(true) {
                stream_response(state.clone(), msg, delays, hold)
            } else {
                warp::reply::json(&msg.whole_message()).into_response()
            }
        }
    }
}

/// The text of the last user turn in a Messages `messages` array, as shown
/// after `last=` in the default reply: the last `text` block of the last user
/// message that is not a `<system-reminder>`, trailing whitespace trimmed; or
/// `tool_result:<first 60 chars>` if that message ends with a tool result.
pub fn last_user_text(messages: &[Value]) -> String {
    for m in messages.iter().rev() {
        if m["role"] != "user" {
            continue;
        }
        match &m["content"] {
            Value::String(s) => return s.trim_end().to_string(),
            Value::Array(blocks) => {
                for b in blocks.iter().rev() {
                    match b["type"].as_str() {
                        Some("text") => {
                            let t = b["text"].as_str().unwrap_or_default();
                            if !t.trim_start().starts_with("<system-reminder>") {
                                return t.trim_end().to_string();
                            }
                        }
                        Some("tool_result") => {
                            let content = match &b["content"] {
                                Value::String(s) => s.clone(),
                                Value::Array(parts) => parts
                                    .iter()
                                    .filter_map(|p| p["text"].as_str())
                                    .collect::<Vec<_>>()
                                    .join(" "),
                                other => other.to_string(),
                            };
                            let short: String = content.chars().take(60).collect();
                            return format!("tool_result:{short}");
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    String::new()
}

/// The `model` of a Messages request body.
pub fn model_of(body: &Value) -> String {
    body["model"].as_str().unwrap_or_default().to_string()
}

/// The system prompt of a Messages request body: its text blocks (or the
/// string) joined with newlines.
pub fn system_text(body: &Value) -> String {
    match &body["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Every `image` block in the `messages` of a Messages request body, in order.
pub fn image_blocks(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "image")
        .cloned()
        .collect()
}

/// Names of the tools offered in a Messages request body.
pub fn tool_names(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect()
}

fn error_response(status: u16) -> warp::reply::Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let error_type = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({
        "type": "error",
        "error": { "type": error_type, "message": format!("mock error {}", status.as_u16()) }
    });
    let reply = warp::reply::with_status(warp::reply::json(&body), status);
    let reply = warp::reply::with_header(reply, "x-should-retry", "false");
    warp::reply::with_header(reply, "request-id", "req_mock").into_response()
}

struct MessageParts {
    id: String,
    tool_id: String,
    model: String,
    input_tokens: usize,
    reply: MockReply,
}

impl MessageParts {
    fn stop_reason(&self) -> &'static str {
        match self.reply {
            MockReply::Text(_) => "end_turn",
            MockReply::ToolUse { .. } => "tool_use",
        }
    }

    fn usage(&self, output_tokens: usize) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        })
    }

    /// The non-streaming form.
    fn whole_message(&self) -> Value {
        let content = match &self.reply {
            MockReply::Text(t) => json!([{ "type": "text", "text": t }]),
            MockReply::ToolUse { name, input } => {
                json!([{ "type": "tool_use", "id": self.tool_id, "name": name, "input": input }])
            }
        };
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": self.stop_reason(), "stop_sequence": null,
            "usage": self.usage(10),
        })
    }

    /// The SSE form: `(is_delta, event name, data)` in order.
    fn events(&self) -> Vec<(bool, &'static str, Value)> {
        let (block, deltas): (Value, Vec<Value>) = match &self.reply {
            MockReply::Text(t) => (
                json!({ "type": "text", "text": "" }),
                split_text(t)
                    .into_iter()
                    .map(|piece| json!({ "type": "text_delta", "text": piece }))
                    .collect(),
            ),
            MockReply::ToolUse { name, input } => {
                let s = input.to_string();
                let chars: Vec<char> = s.chars().collect();
                (
                    json!({ "type": "tool_use", "id": self.tool_id, "name": name, "input": {} }),
                    chars
                        .chunks(16)
                        .map(|c| {
                            let partial: String = c.iter().collect();
                            json!({ "type": "input_json_delta", "partial_json": partial })
                        })
                        .collect(),
                )
            }
        };
        let n = deltas.len();
        let mut events = vec![
            (
                false,
                "message_start",
                json!({ "type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": self.usage(1),
                }}),
            ),
            (
                false,
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0, "content_block": block }),
            ),
            (false, "ping", json!({ "type": "ping" })),
        ];
        for delta in deltas {
            events.push((
                true,
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": 0, "delta": delta }),
            ));
        }
        events.push((
            false,
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": 0 }),
        ));
        events.push((
            false,
            "message_delta",
            json!({ "type": "message_delta",
                "delta": { "stop_reason": self.stop_reason(), "stop_sequence": null },
                "usage": { "output_tokens": n } }),
        ));
        events.push((false, "message_stop", json!({ "type": "message_stop" })));
        events
    }
}

/// Splits a reply into several deltas: one per word (with its trailing
/// space), or two halves for a single word, so clients see real streaming.
fn split_text(text: &str) -> Vec<String> {
    let pieces: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
    if pieces.len() > 1 {
        return pieces;
    }
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 2 {
        return vec![text.to_string()];
    }
    let (a, b) = chars.split_at(chars.len() / 2);
    vec![a.iter().collect(), b.iter().collect()]
}

/// Streams `msg` as SSE; `delays` is (before `message_start`, between deltas).
/// A producer task feeds the response body through a channel, so it notices
/// at once (even mid-delay) when the client drops the connection.
fn stream_response(
    state: Arc<State>,
    msg: MessageParts,
    (initial, between): (Duration, Duration),
    hold: bool,
) -> warp::reply::Response {
    let events = msg.events();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(1);
    tokio::spawn(async move {
        if hold {
            let released = state.release.notified();
            state.lock().held_streams += 1;
            state.changed();
            let go_on = tokio::select! {
                _ = tx.closed() => false,
                _ = released => true,
            };
            if !go_on {
                state.lock().aborted_streams += 1;
                state.changed();
                return;
            }
        }
        let mut deltas_sent = 0;
        for (is_delta, name, data) in events {
            let mut wait = Duration::ZERO;
            if name == "message_start" {
                wait = initial;
            }
            if is_delta {
                if deltas_sent > 0 {
                    wait = between;
                }
                deltas_sent += 1;
            }
            let event = warp::sse::Event::default()
                .event(name)
                .data(data.to_string());
            let sent = tokio::select! {
                _ = tx.closed() => false,
                sent = async {
                    tokio::time::sleep(wait).await;
                    tx.send(event).await.is_ok()
                } => sent,
            };
            if !sent {
                state.lock().aborted_streams += 1;
                state.changed();
                return;
            }
        }
    });
    let body =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    let reply = warp::sse::reply(body);
    warp::reply::with_header(reply, "request-id", "req_mock").into_response()
}
