//! A local mock of the Gemini API (`generativelanguage.googleapis.com`), so
//! integration tests run the real gemini-cli in ACP mode offline.
//!
//! gemini-cli 0.61 with `GOOGLE_GEMINI_BASE_URL` set uses the "gateway" auth
//! type and sends (see `docs/acp-notes.md`):
//! - `POST /v1beta/models/MODEL:streamGenerateContent?alt=sse` for every
//!   conversation turn: answered as SSE, one `data:` JSON chunk per word of
//!   the reply (`candidates[0].content.parts[0].text`), the last with
//!   `finishReason: STOP` and `usageMetadata`. The default text is
//!   `gemini mock #N: contents=M; last=TEXT` — `N` counts turns (1, 2, …),
//!   `M` the length of the request's `contents` (1, 3, 5, … while context is
//!   kept) and `TEXT` the last user text, or `tool_result:NAME:RESPONSE` when
//!   the last user part is a `functionResponse`;
//! - `POST /v1beta/models/MODEL:generateContent` for side calls (the model
//!   router's complexity classifier): answered with one JSON text that has
//!   the keys those calls read;
//! - anything else: recorded and answered `{}`.
//!
//! Knobs: [`MockGemini::set_delta_delay`] and [`MockGemini::set_padding`]
//! (slow, long replies to interrupt), [`MockGemini::push_function_call`] (the
//! next turn asks to run a tool). Waits: [`MockGemini::wait_until`], woken by
//! every request (no polling).
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

/// The pinned gemini-cli (`tests/acp/package.json`).
pub const GEMINI_VERSION: &str = "0.61.0";

/// `AGENTGATE_TEST_GEMINI_BIN`, else `tests/acp/node_modules/.bin/gemini`.
/// Panics (failing the test, never skipping it) when neither exists.
pub fn gemini_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTGATE_TEST_GEMINI_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "AGENTGATE_TEST_GEMINI_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/acp/node_modules/.bin/gemini");
    assert!(
        p.exists(),
        "gemini-cli is not installed at {}: run scripts/install-acp-agents.sh \
         (or set AGENTGATE_TEST_GEMINI_BIN to a gemini {GEMINI_VERSION} binary)",
        p.display()
    );
    p
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Path with the query, e.g. `/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse`.
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
    calls: VecDeque<(String, Value)>,
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

/// A running mock Gemini API on `127.0.0.1:<random port>`; stops when dropped.
pub struct MockGemini {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockGemini {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl MockGemini {
    /// Binds `127.0.0.1:0` and serves on the current runtime.
    pub async fn start() -> MockGemini {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind mock Gemini API");
        let addr = listener.local_addr().expect("mock local_addr");
        let (changes, _) = tokio::sync::watch::channel(0u64);
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            changes,
        });
        let st = state.clone();
        let routes = warp::path::full()
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::body::bytes())
            .and_then(
                move |path: warp::path::FullPath, query: String, body: Bytes| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(handle(st, path.as_str(), &query, &body)) }
                },
            );
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        MockGemini {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, the value for `GOOGLE_GEMINI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment of a gemini child talking to this mock with `home` as
    /// `HOME` (settings written there: no telemetry, no update checks).
    pub fn child_env(&self, home: &Path) -> Vec<(String, String)> {
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).expect("create TMPDIR");
        std::fs::create_dir_all(home.join(".gemini")).expect("create ~/.gemini");
        let settings = json!({
            "privacy": {"usageStatisticsEnabled": false},
            "telemetry": {"enabled": false},
            "general": {"disableAutoUpdate": true, "disableUpdateNag": true},
        });
        std::fs::write(home.join(".gemini/settings.json"), settings.to_string())
            .expect("write settings.json");
        [
            ("HOME", home.display().to_string()),
            ("TMPDIR", tmp.display().to_string()),
            ("GEMINI_API_KEY", "test-key".to_string()),
            ("GOOGLE_GEMINI_BASE_URL", self.base_url()),
            // One process instead of a launcher and a relaunched child.
            ("GEMINI_CLI_NO_RELAUNCH", "true".to_string()),
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

    /// The next turn answers with a `functionCall` of `name` with `args`.
    pub fn push_function_call(&self, name: &str, args: Value) {
        self.state.lock().calls.push_back((name.to_string(), args));
    }

    /// Every request so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.lock().recorded.clone()
    }

    /// The bodies of the conversation turns (`streamGenerateContent`) so far.
    pub fn turns(&self) -> Vec<Value> {
        self.recorded()
            .into_iter()
            .filter(|r| r.path.contains(":streamGenerateContent"))
            .map(|r| r.body)
            .collect()
    }

    /// The `inlineData` parts (`{mimeType, data}`) of the last user entry
    /// of the last conversation turn: the images the model was sent.
    pub fn last_turn_images(&self) -> Vec<Value> {
        let Some(turn) = self.turns().pop() else {
            return vec![];
        };
        let contents = turn["contents"].as_array().cloned().unwrap_or_default();
        let Some(last) = contents.iter().rev().find(|c| c["role"] == "user") else {
            return vec![];
        };
        last["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("inlineData").cloned())
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
        cond: impl Fn(&MockGemini) -> bool,
    ) {
        let mut changes = self.state.changes.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        while !cond(self) {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let paths: Vec<String> = self.recorded().into_iter().map(|r| r.path).collect();
                panic!("mock Gemini API: waited {within:?} for {what}; requests: {paths:?}");
            }
        }
    }
}

/// The last user text of a `contents` array, or `tool_result:NAME:RESPONSE`.
fn last_user(contents: &[Value]) -> String {
    let Some(last) = contents.iter().rev().find(|c| c["role"] == "user") else {
        return String::new();
    };
    let parts = last["parts"].as_array().cloned().unwrap_or_default();
    for part in parts.iter().rev() {
        if let Some(r) = part.get("functionResponse") {
            return format!(
                "tool_result:{}:{}",
                r["name"].as_str().unwrap_or(""),
                r["response"]
            );
        }
        if let Some(t) = part["text"].as_str() {
            return t.trim_end().to_string();
        }
    }
    String::new()
}

fn handle(state: Arc<State>, path: &str, query: &str, body: &[u8]) -> warp::reply::Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let full = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let mut inner = state.lock();
    inner.recorded.push(Recorded {
        path: full,
        body: body.clone(),
    });
    let reply = if path.ends_with(":streamGenerateContent") {
        inner.turns += 1;
        let contents = body["contents"].as_array().cloned().unwrap_or_default();
        let chunks: Vec<Value> = match inner.calls.pop_front() {
            Some((name, args)) => vec![json!({"functionCall": {"name": name, "args": args}})],
            None => {
                let mut text = format!(
                    "gemini mock #{}: contents={}; last={}",
                    inner.turns,
                    contents.len(),
                    last_user(&contents)
                );
                for i in 0..inner.padding {
                    text.push_str(&format!(" w{i}"));
                }
                split_words(&text)
                    .into_iter()
                    .map(|w| json!({"text": w}))
                    .collect()
            }
        };
        let delay = inner.delta_delay;
        drop(inner);
        stream(state.clone(), chunks, delay)
    } else if path.ends_with(":generateContent") {
        drop(inner);
        // Side calls read these keys (the router's classifier, the next-speaker check).
        let text = json!({
            "complexity_reasoning": "mock", "complexity_score": 10,
            "reasoning": "mock", "next_speaker": "user",
        })
        .to_string();
        warp::reply::json(&json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
        }))
        .into_response()
    } else {
        drop(inner);
        eprintln!("mock Gemini API: unexpected request {path}");
        warp::reply::json(&json!({})).into_response()
    };
    state.changed();
    reply
}

/// Words with their trailing space, so the chunks join back to the text.
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

/// Streams one SSE chunk per part; a producer task notices at once (even
/// mid-delay) when the client drops the connection.
fn stream(state: Arc<State>, parts: Vec<Value>, delay: Duration) -> warp::reply::Response {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(1);
    tokio::spawn(async move {
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let mut candidate = json!({"content": {"role": "model", "parts": [part]}, "index": 0});
            let mut chunk = json!({"modelVersion": "mock"});
            if i + 1 == n {
                candidate["finishReason"] = json!("STOP");
                chunk["usageMetadata"] = json!({"promptTokenCount": 3, "candidatesTokenCount": n, "totalTokenCount": 3 + n});
            }
            chunk["candidates"] = json!([candidate]);
            let wait = if i == 0 { Duration::ZERO } else { delay };
            // The SDK's parser wants `data: ` with the space, which warp does
            // not write; a leading space in the data puts it there.
            let event = warp::sse::Event::default().data(format!(" {chunk}"));
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
