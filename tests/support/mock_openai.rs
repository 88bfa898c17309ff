//! A local mock of the OpenAI Responses API, so integration tests run the
//! real Codex (through Zed's `codex-acp` adapter) offline.
//!
//! codex-acp 0.16 with a custom provider (`wire_api = "responses"`,
//! `base_url = http://127.0.0.1:PORT/v1`, written to a temporary
//! `CODEX_HOME/config.toml` by [`MockOpenAi::codex_home`]) sends
//! `POST /v1/responses` with `"stream": true` for every model turn. It is
//! answered as SSE: `response.created`, `response.output_item.added`,
//! `response.output_text.delta` × words, `response.output_item.done`,
//! `response.completed` (with `usage`). The default text is
//! `codex mock #N: input=M; last=TEXT` — `N` counts turns, `M` is the length
//! of the request's `input` (3 on the first turn, +2 per turn while context is
//! kept) and `TEXT` the last user text, or `tool_result:OUTPUT` when the last
//! input item is a `function_call_output`. Anything else is recorded and
//! answered `{}`.
//!
//! Knobs: [`MockOpenAi::set_delta_delay`], [`MockOpenAi::set_padding`],
//! [`MockOpenAi::push_function_call`]; waits: [`MockOpenAi::wait_until`].
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use warp::reply::Reply;
use warp::Filter;

/// The pinned codex-acp (`tests/acp/package.json`).
pub const CODEX_ACP_VERSION: &str = "0.16.0";

/// `AGENTGATE_TEST_CODEX_ACP_BIN`, else `tests/acp/node_modules/.bin/codex-acp`.
/// Panics (failing the test, never skipping it) when neither exists.
pub fn codex_acp_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTGATE_TEST_CODEX_ACP_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "AGENTGATE_TEST_CODEX_ACP_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/acp/node_modules/.bin/codex-acp");
    assert!(
        p.exists(),
        "codex-acp is not installed at {}: run scripts/install-acp-agents.sh \
         (or set AGENTGATE_TEST_CODEX_ACP_BIN to a codex-acp {CODEX_ACP_VERSION} binary)",
        p.display()
    );
    p
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The path, e.g. `/v1/responses`.
    pub path: String,
    /// The JSON body (`null` if none).
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    recorded: Vec<Recorded>,
    turns: usize,
    delta_delay: Duration,
    padding: usize,
    calls: VecDeque<(String, String)>,
    aborted_streams: usize,
}

struct State {
    inner: Mutex<Inner>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("mock state poisoned")
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

/// A running mock OpenAI API on `127.0.0.1:<random port>`; stops when dropped.
pub struct MockOpenAi {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl MockOpenAi {
    /// Binds `127.0.0.1:0` and serves on the current runtime.
    pub async fn start() -> MockOpenAi {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind mock OpenAI API");
        let addr = listener.local_addr().expect("mock local_addr");
        let (changes, _) = tokio::sync::watch::channel(0u64);
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            changes,
        });
        let st = state.clone();
        let routes = warp::path::full().and(warp::body::bytes()).and_then(
            move |path: warp::path::FullPath, body: Bytes| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, path.as_str(), &body)) }
            },
        );
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        MockOpenAi {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, the provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Writes `home/codex/config.toml`: a `mock` provider at this server, a
    /// model codex knows (so it prints no "unknown model" warning), and
    /// `approval_policy` (e.g. `untrusted`: every command but a few read-only
    /// ones asks first). Returns the directory, for `CODEX_HOME`.
    pub fn codex_home(&self, home: &Path, approval_policy: &str) -> PathBuf {
        let dir = home.join("codex");
        std::fs::create_dir_all(&dir).expect("create CODEX_HOME");
        let config = format!(
            r#"model = "gpt-5.4-mini"
model_provider = "mock"
approval_policy = "{approval_policy}"
sandbox_mode = "danger-full-access"

[model_providers.mock]
name = "mock"
base_url = "{}"
wire_api = "responses"
env_key = "OPENAI_API_KEY"
request_max_retries = 0
stream_max_retries = 0
"#,
            self.base_url()
        );
        std::fs::write(dir.join("config.toml"), config).expect("write config.toml");
        dir
    }

    /// The environment of a codex-acp child talking to this mock, `home` as `HOME`.
    pub fn child_env(&self, home: &Path, approval_policy: &str) -> Vec<(String, String)> {
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).expect("create TMPDIR");
        let codex_home = self.codex_home(home, approval_policy);
        [
            ("HOME", home.display().to_string()),
            ("TMPDIR", tmp.display().to_string()),
            ("CODEX_HOME", codex_home.display().to_string()),
            ("OPENAI_API_KEY", "test-key".to_string()),
            ("RUST_LOG", "warn".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Waits `delay` between the chunks of every later reply (the first is sent at once).
    pub fn set_delta_delay(&self, delay: Duration) {
        self.state.lock().delta_delay = delay;
    }

    /// Appends `words` filler words to every later reply (long replies to interrupt).
    pub fn set_padding(&self, words: usize) {
        self.state.lock().padding = words;
    }

    /// The next turn answers with a `function_call` of `name` with `arguments` (JSON).
    pub fn push_function_call(&self, name: &str, arguments: Value) {
        self.state
            .lock()
            .calls
            .push_back((name.to_string(), arguments.to_string()));
    }

    /// Every request so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.lock().recorded.clone()
    }

    /// The bodies of the model turns (`/v1/responses`) so far.
    pub fn turns(&self) -> Vec<Value> {
        self.recorded()
            .into_iter()
            .filter(|r| r.path.ends_with("/responses"))
            .map(|r| r.body)
            .collect()
    }

    /// The `input_image` parts of the last user item of the last model
    /// turn: the images the model was sent (`image_url` a `data:` URL).
    pub fn last_turn_images(&self) -> Vec<Value> {
        let Some(turn) = self.turns().pop() else {
            return vec![];
        };
        let input = turn["input"].as_array().cloned().unwrap_or_default();
        let Some(user) = input.iter().rev().find(|i| i["role"] == "user") else {
            return vec![];
        };
        user["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["type"] == "input_image")
            .cloned()
            .collect()
    }

    /// Streams the client dropped before their end.
    pub fn aborted_streams(&self) -> usize {
        self.state.lock().aborted_streams
    }

    /// Waits until `cond` holds, re-checked on every request; panics after `within`.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        cond: impl Fn(&MockOpenAi) -> bool,
    ) {
        let mut changes = self.state.changes.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        while !cond(self) {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let paths: Vec<String> = self.recorded().into_iter().map(|r| r.path).collect();
                panic!("mock OpenAI API: waited {within:?} for {what}; requests: {paths:?}");
            }
        }
    }
}

/// The last user text of an `input` array, or `tool_result:OUTPUT`.
fn last_user(input: &[Value]) -> String {
    let Some(last) = input.last() else {
        return String::new();
    };
    if last["type"] == "function_call_output" {
        return format!("tool_result:{}", last["output"].as_str().unwrap_or(""));
    }
    let Some(user) = input.iter().rev().find(|i| i["role"] == "user") else {
        return String::new();
    };
    let parts = user["content"].as_array().cloned().unwrap_or_default();
    parts
        .iter()
        .rev()
        .find_map(|p| p["text"].as_str())
        .unwrap_or("")
        .trim_end()
        .to_string()
}

fn handle(state: Arc<State>, path: &str, body: &[u8]) -> warp::reply::Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut inner = state.lock();
    inner.recorded.push(Recorded {
        path: path.to_string(),
        body: body.clone(),
    });
    let reply = if path.ends_with("/responses") {
        inner.turns += 1;
        let n = inner.turns;
        let input = body["input"].as_array().cloned().unwrap_or_default();
        let items = match inner.calls.pop_front() {
            Some((name, arguments)) => Turn::Call { name, arguments },
            None => {
                let mut text = format!(
                    "codex mock #{n}: input={}; last={}",
                    input.len(),
                    last_user(&input)
                );
                for i in 0..inner.padding {
                    text.push_str(&format!(" w{i}"));
                }
                Turn::Text(text)
            }
        };
        let delay = inner.delta_delay;
        drop(inner);
        stream(state.clone(), n, items, delay)
    } else {
        drop(inner);
        eprintln!("mock OpenAI API: unexpected request {path}");
        warp::reply::json(&json!({})).into_response()
    };
    state.changed();
    reply
}

enum Turn {
    Text(String),
    Call { name: String, arguments: String },
}

/// Words with their trailing space, so the deltas join back to the text.
fn split_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        cur.push(ch);
        if ch == ' ' {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The SSE events of one turn: (is a delta, name, data).
fn events(n: usize, turn: Turn) -> Vec<(bool, &'static str, Value)> {
    let rid = format!("resp_{n}");
    let mut ev = vec![(
        false,
        "response.created",
        json!({"type": "response.created", "response": {"id": rid}}),
    )];
    let item = match turn {
        Turn::Text(text) => {
            let id = format!("msg_{n}");
            ev.push((
                false,
                "response.output_item.added",
                json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "role": "assistant", "id": id, "content": []}}),
            ));
            for w in split_words(&text) {
                ev.push((
                    true,
                    "response.output_text.delta",
                    json!({"type": "response.output_text.delta",
                    "item_id": id, "output_index": 0, "content_index": 0, "delta": w}),
                ));
            }
            json!({"type": "message", "role": "assistant", "id": id, "content": [{"type": "output_text", "text": text}]})
        }
        Turn::Call { name, arguments } => {
            let item = json!({"type": "function_call", "id": format!("fc_{n}"), "call_id": format!("call_{n}"), "name": name, "arguments": arguments});
            ev.push((
                false,
                "response.output_item.added",
                json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
            ));
            item
        }
    };
    ev.push((
        false,
        "response.output_item.done",
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    ));
    ev.push((false, "response.completed", json!({"type": "response.completed", "response": {"id": rid,
        "usage": {"input_tokens": 3, "input_tokens_details": null, "output_tokens": 2, "output_tokens_details": null, "total_tokens": 5}}})));
    ev
}

/// Streams one turn; a producer task notices at once (even mid-delay) when
/// the client drops the connection.
fn stream(state: Arc<State>, n: usize, turn: Turn, delay: Duration) -> warp::reply::Response {
    let events = events(n, turn);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(1);
    tokio::spawn(async move {
        let mut deltas = 0;
        for (is_delta, name, data) in events {
            let mut wait = Duration::ZERO;
            if is_delta {
                if deltas > 0 {
                    wait = delay;
                }
                deltas += 1;
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
    warp::sse::reply(body).into_response()
}
