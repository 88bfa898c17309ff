//! What products build on Claude Code, through the gateway, with the real
//! CLI offline against the suite's mock of the Messages API: session options
//! (and that restarts keep them), `PATCH` of a live child's model, image
//! blocks, usage and cost, fork, and the stall watchdog.
//!
//! Each test reads what the CLI really sent to the model API (the mock
//! records every request body), never what the gateway says it sent.

mod common;
#[path = "support/mock_anthropic.rs"]
mod mock_anthropic;

use std::sync::Arc;
use std::time::Duration;

use agentgate::config::{claude_profile, AgentProfile, Config};
use agentgate::options::ClientOptions;
use base64::Engine;
use common::*;
use mock_anthropic::{
    claude_bin, image_blocks, model_of, system_text, temp_home, tool_names, MockAnthropic,
};
use serde_json::{json, Value};

/// A gateway whose `claude` profile talks to `mock` with a fresh HOME and
/// lets clients choose every option.
struct Rig {
    gw: Gateway,
    mock: MockAnthropic,
    _home: tempfile::TempDir,
}

fn all_options() -> ClientOptions {
    ClientOptions {
        model: vec!["haiku".into(), "sonnet".into()],
        // "nonsense" is allowed here so the CLI's own refusal can be seen.
        permission_mode: vec!["default".into(), "acceptEdits".into(), "nonsense".into()],
        system_prompt: true,
        allowed_tools: true,
        disallowed_tools: true,
        max_turns: Some(5),
    }
}

impl Rig {
    async fn start(
        tweak_profile: impl FnOnce(&mut AgentProfile),
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        let mock = MockAnthropic::start().await;
        let home = temp_home();
        let mut p = claude_profile(&claude_bin());
        p.pass_env.clear();
        p.env = mock.child_env(home.path()).into_iter().collect();
        p.cwd = Some(home.path().to_path_buf());
        p.stop_grace = Duration::from_secs(5);
        p.client_options = all_options();
        tweak_profile(&mut p);
        let gw = Gateway::start(|c| {
            c.profiles.insert("claude".into(), Arc::new(p));
            tweak(c);
        })
        .await;
        Rig {
            gw,
            mock,
            _home: home,
        }
    }

    /// Creates a claude session with `options`; returns its JSON.
    async fn session_with(&self, options: Value) -> Value {
        let res = self
            .gw
            .post("/sessions", json!({"agent": "claude", "options": options}))
            .await;
        assert_eq!(res.status(), 201);
        res.json().await.unwrap()
    }

    /// The last conversation request the model API received.
    fn last_request(&self) -> Value {
        self.mock.conversation_requests().pop().expect("a request")
    }

    async fn patch(&self, id: &str, body: Value) -> reqwest::Response {
        self.gw
            .http
            .patch(self.gw.url(&format!("/sessions/{id}")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

/// The argv of process `pid`, one element per entry.
fn cmdline(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn pid_of(session: &Value) -> u64 {
    session["pid"].as_u64().expect("a live child")
}

/// Every user text the model saw in a request, in order (system reminders skipped).
fn user_texts(body: &Value) -> Vec<String> {
    let mut out = vec![];
    for m in body["messages"].as_array().unwrap() {
        if m["role"] != "user" {
            continue;
        }
        match &m["content"] {
            Value::String(s) => out.push(s.trim_end().to_string()),
            Value::Array(blocks) => {
                for b in blocks {
                    if let Some(t) = b["text"].as_str() {
                        if !t.starts_with("<system-reminder>") {
                            out.push(t.trim_end().to_string());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn each_option_reaches_the_model_request_and_restarts_keep_them() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let prompt = "-- always answer in the voice of a lighthouse keeper --";
    let s = rig
        .session_with(json!({
            "model": "haiku",
            "system_prompt": prompt,
            "permission_mode": "acceptEdits",
            "allowed_tools": ["Bash(echo *)"],
            "disallowed_tools": ["Write", "WebFetch"],
            "max_turns": 1,
        }))
        .await;
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(s["options"]["model"], "haiku", "options shown: {s}");
    assert_eq!(s["options"]["max_turns"], 1);
    // One argv element per option, in the `--flag=value` form.
    let argv = cmdline(pid_of(&s));
    for want in [
        "--model=haiku".to_string(),
        format!("--append-system-prompt={prompt}"),
        "--permission-mode=acceptEdits".to_string(),
        "--allowed-tools=Bash(echo *)".to_string(),
        "--disallowed-tools=Write,WebFetch".to_string(),
        "--max-turns=1".to_string(),
    ] {
        assert!(argv.contains(&want), "{want} in {argv:?}");
    }

    let check_request = |body: &Value| {
        assert!(
            model_of(body).contains("haiku"),
            "model: {}",
            model_of(body)
        );
        assert!(system_text(body).contains(prompt), "system prompt appended");
        let tools = tool_names(body);
        assert!(tools.contains(&"Bash".to_string()), "{tools:?}");
        assert!(
            !tools.contains(&"Write".to_string()) && !tools.contains(&"WebFetch".to_string()),
            "disallowed tools removed: {tools:?}"
        );
    };
    let res = rig.gw.stream(&id, json!({"content": "first"})).await;
    let items = read_sse(res, Duration::from_secs(60), |i| {
        i.event.as_deref() == Some("message.completed")
    })
    .await;
    let init = items
        .iter()
        .find(|i| i.data["event"]["subtype"] == "init")
        .expect("system/init forwarded");
    assert_eq!(init.data["event"]["permissionMode"], "acceptEdits");
    check_request(&rig.last_request());

    // max_turns = 1: a reply that needs a second model call (after a tool) stops.
    rig.mock.push_bash("echo hi");
    let m = rig.gw.ask(&id, "run echo").await;
    assert_eq!(m["status"], "failed", "{m}");
    assert!(
        m["error"]["detail"].as_str().unwrap().contains("max_turns"),
        "{m}"
    );

    // A restart (the child killed) starts the next child with the same options.
    let old = pid_of(&rig.gw.session(&id).await);
    rig.gw.kill_child(&id).await;
    let m = rig.gw.ask(&id, "after the restart").await;
    assert_eq!(m["status"], "completed", "{m}");
    let s = rig.gw.session(&id).await;
    assert_ne!(pid_of(&s), old);
    assert!(cmdline(pid_of(&s)).contains(&"--model=haiku".to_string()));
    let body = rig.last_request();
    check_request(&body);
    assert!(
        user_texts(&body).contains(&"first".to_string()),
        "resumed: {:?}",
        user_texts(&body)
    );
    rig.gw.stop().await;
}

#[tokio::test]
async fn an_option_the_profile_does_not_allow_is_400_naming_it() {
    let rig = Rig::start(
        |p| {
            p.client_options = ClientOptions {
                model: vec!["haiku".into()],
                max_turns: Some(3),
                ..Default::default()
            };
        },
        |_| {},
    )
    .await;
    for (options, name) in [
        (json!({"model": "opus"}), "model"),
        (json!({"system_prompt": "be evil"}), "system_prompt"),
        (
            json!({"permission_mode": "bypassPermissions"}),
            "permission_mode",
        ),
        (json!({"allowed_tools": ["Bash"]}), "allowed_tools"),
        (json!({"disallowed_tools": ["Bash"]}), "disallowed_tools"),
        (json!({"max_turns": 4}), "max_turns"),
        (json!({"max_turns": 0}), "max_turns"),
        (json!({"argv": ["--dangerously-skip-permissions"]}), "argv"),
    ] {
        let res = rig
            .gw
            .post("/sessions", json!({"agent": "claude", "options": options}))
            .await;
        let p = assert_problem(res, 400).await;
        assert!(
            p["detail"].as_str().unwrap().contains(name),
            "{options}: {p}"
        );
    }
    // Options on a profile that is not claude are refused too.
    let res = rig
        .gw
        .post(
            "/sessions",
            json!({"agent": "sed", "options": {"model": "haiku"}}),
        )
        .await;
    assert_problem(res, 400).await;
    assert!(rig.gw.get_json("/sessions").await["sessions"]
        .as_array()
        .unwrap()
        .is_empty());
    // PATCH of a `lines` session: title and metadata change, options are refused.
    let sed = rig.gw.create("sed").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_problem(rig.patch(&sed, json!({"model": "haiku"})).await, 400).await;
    let res = rig
        .patch(&sed, json!({"title": "plain", "metadata": [1]}))
        .await;
    assert_eq!(res.status(), 200);
    let s: Value = res.json().await.unwrap();
    assert_eq!(
        (s["title"].clone(), s["metadata"].clone()),
        (json!("plain"), json!([1]))
    );
    // What is allowed is taken.
    let s = rig
        .session_with(json!({"model": "haiku", "max_turns": 3}))
        .await;
    assert_eq!(s["options"], json!({"model": "haiku", "max_turns": 3}));
    rig.gw.stop().await;
}

#[tokio::test]
async fn patch_changes_the_model_of_the_live_child() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let s = rig.session_with(json!({"model": "haiku"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    rig.gw.ask(&id, "one").await;
    assert!(model_of(&rig.last_request()).contains("haiku"));
    let pid = pid_of(&rig.gw.session(&id).await);

    let res = rig
        .patch(
            &id,
            json!({"model": "sonnet", "title": "renamed", "metadata": {"k": 1}}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let s: Value = res.json().await.unwrap();
    assert_eq!(s["options"]["model"], "sonnet");
    assert_eq!(s["title"], "renamed");
    assert_eq!(s["metadata"], json!({"k": 1}));
    assert_eq!(pid_of(&s), pid, "the same child, told by a control request");
    let m = rig.gw.ask(&id, "two").await;
    assert_eq!(m["status"], "completed");
    let body = rig.last_request();
    assert!(model_of(&body).contains("sonnet"), "{}", model_of(&body));
    // Same conversation; the CLI records the switch in it as a local `/model` command.
    let texts = user_texts(&body);
    assert_eq!(texts.first().map(String::as_str), Some("one"), "{texts:?}");
    assert_eq!(texts.last().map(String::as_str), Some("two"), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t.contains("<command-name>/model</command-name>")),
        "{texts:?}"
    );

    // Not in the allowlist: 400, nothing changes.
    assert_problem(rig.patch(&id, json!({"model": "opus"})).await, 400).await;
    // Allowed by the profile but refused by the CLI: its answer is checked.
    let p = assert_problem(
        rig.patch(&id, json!({"permission_mode": "nonsense"})).await,
        502,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("permission_mode"),
        "{p}"
    );
    assert!(rig.gw.session(&id).await["options"]["permission_mode"].is_null());
    // Unknown fields are refused.
    assert_problem(rig.patch(&id, json!({"argv": ["-x"]})).await, 400).await;

    // A restart keeps the new model.
    rig.gw.kill_child(&id).await;
    rig.gw.ask(&id, "three").await;
    let s = rig.gw.session(&id).await;
    assert!(cmdline(pid_of(&s)).contains(&"--model=sonnet".to_string()));
    assert!(model_of(&rig.last_request()).contains("sonnet"));
    rig.gw.stop().await;
}

fn png_bytes() -> Vec<u8> {
    // A 1×1 PNG.
    let hex = "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082";
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn an_image_block_arrives_intact_and_bad_ones_are_refused() {
    let rig = Rig::start(|_| {}, |c| c.max_image_bytes = 1024).await;
    let id = rig.session_with(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let data = base64::engine::general_purpose::STANDARD.encode(png_bytes());
    let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}});
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/messages?wait=true"),
            json!({"content": [{"type": "text", "text": "what is this"}, image]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(m["input"][1], image, "input shows the blocks");
    let body = rig.last_request();
    assert_eq!(
        image_blocks(&body),
        std::slice::from_ref(&image),
        "the model got the image"
    );
    assert!(user_texts(&body).contains(&"what is this".to_string()));

    let post = |content: Value| {
        let gw = &rig.gw;
        let path = format!("/sessions/{id}/messages");
        async move { gw.post(&path, json!({"content": content})).await }
    };
    let with = |media_type: &str, data: &str| json!([{"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}]);
    assert_problem(post(with("image/bmp", &data)).await, 400).await;
    assert_problem(post(with("image/jpeg", &data)).await, 400).await;
    assert_problem(post(with("image/png", "not base64!")).await, 400).await;
    assert_problem(post(json!([{"type": "audio"}])).await, 400).await;
    let mut big = png_bytes();
    big.resize(2048, 0);
    let big = base64::engine::general_purpose::STANDARD.encode(big);
    assert_problem(post(with("image/png", &big)).await, 413).await;
    // A `lines` profile cannot carry images; its text blocks are fine.
    let sed = rig.gw.create("sed").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = rig
        .gw
        .post(
            &format!("/sessions/{sed}/messages"),
            json!({"content": [{"type": "text", "text": "x"}, image]}),
        )
        .await;
    assert_problem(res, 400).await;
    let res = rig
        .gw
        .post(
            &format!("/sessions/{sed}/messages?wait=true"),
            json!({"content": [{"type": "text", "text": "only text"}]}),
        )
        .await;
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["output"], "only text\n");
    rig.gw.stop().await;
}

/// One-shot runs (a session in fallback mode, `POST /oneshot`) write the
/// content as a stream-json user line, so images reach the model there too.
#[tokio::test]
async fn an_image_block_reaches_the_model_through_one_shot_runs() {
    let rig = Rig::start(|p| p.persistent = false, |_| {}).await;
    let data = base64::engine::general_purpose::STANDARD.encode(png_bytes());
    let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}});
    let content = json!([{"type": "text", "text": "what is this"}, image]);

    let id = rig.session_with(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = rig
        .gw
        .post(
            &format!("/sessions/{id}/messages?wait=true"),
            json!({"content": content}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(m["fallback"], true, "{m}");
    let body = rig.last_request();
    assert_eq!(
        image_blocks(&body),
        std::slice::from_ref(&image),
        "the fallback run's model request carries the image"
    );
    assert!(user_texts(&body).contains(&"what is this".to_string()));
    // The next fallback run resumes the conversation: the image is still in it.
    let m = rig.gw.ask(&id, "and now?").await;
    assert_eq!(m["status"], "completed", "{m}");
    let body = rig.last_request();
    assert_eq!(body["messages"].as_array().unwrap().len(), 4, "{body}");
    assert_eq!(image_blocks(&body), std::slice::from_ref(&image));

    let res = rig
        .gw
        .post("/oneshot", json!({"agent": "claude", "content": content}))
        .await;
    assert_eq!(res.status(), 200);
    let out: Value = res.json().await.unwrap();
    assert_eq!(out["status"], "completed", "{out}");
    let body = rig.last_request();
    assert_eq!(body["messages"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(
        image_blocks(&body),
        std::slice::from_ref(&image),
        "the /oneshot run's model request carries the image"
    );
    // A text-only program still cannot take one.
    let res = rig
        .gw
        .post("/oneshot", json!({"agent": "sed", "content": content}))
        .await;
    assert_problem(res, 400).await;
    rig.gw.stop().await;
}

/// The console served at `/` has an image upload control, sends attached
/// images as image blocks and draws image blocks of user messages. (Its
/// behaviour in a browser, with the real CLI, is checked by
/// `scripts/contract/browser.test.mjs`; this is what `cargo test` can see.)
#[tokio::test]
async fn the_console_attaches_images_and_shows_image_blocks() {
    let gw = Gateway::start(|_| {}).await;
    let res = gw.get("/").await;
    assert_eq!(res.status(), 200);
    let page = res.text().await.unwrap();
    assert!(
        page.contains(r#"<input id="attach" type="file" accept="image/png,image/jpeg,image/gif,image/webp" multiple"#),
        "an upload control for the image types the API takes"
    );
    assert!(
        page.contains(
            r#"{type: "image", source: {type: "base64", media_type: a.media_type, data: a.data}}"#
        ),
        "attachments are sent as image blocks"
    );
    assert!(
        page.contains("el(\"img\", {src: `data:${b.source.media_type};base64,${b.source.data}`"),
        "image blocks of a message are drawn"
    );
    gw.stop().await;
}

#[tokio::test]
async fn session_usage_is_the_sum_of_its_messages() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let id = rig.session_with(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut messages = vec![];
    for text in ["one", "two", "three"] {
        messages.push(rig.gw.ask(&id, text).await);
    }
    let s = rig.gw.session(&id).await;
    let sum = |key: &str| -> u64 {
        messages
            .iter()
            .map(|m| m["usage"]["usage"][key].as_u64().unwrap())
            .sum()
    };
    for key in [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ] {
        assert_eq!(s["usage"][key].as_u64().unwrap(), sum(key), "{key}: {s}");
    }
    assert!(sum("input_tokens") > 0);
    // claude's total_cost_usd is a running total; each message has its own share.
    let costs: Vec<f64> = messages
        .iter()
        .map(|m| m["usage"]["cost_usd"].as_f64().unwrap())
        .collect();
    let totals: Vec<f64> = messages
        .iter()
        .map(|m| m["usage"]["total_cost_usd"].as_f64().unwrap())
        .collect();
    assert!(costs.iter().all(|c| *c > 0.0), "{costs:?}");
    assert!((costs[1] - (totals[1] - totals[0])).abs() < 1e-12);
    let cost = s["usage"]["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - costs.iter().sum::<f64>()).abs() < 1e-12,
        "{cost} {costs:?}"
    );
    assert!((cost - totals[2]).abs() < 1e-12);

    let metrics = rig.gw.get("/metrics").await.text().await.unwrap();
    let input_line = format!(
        "agentgate_tokens_total{{agent=\"claude\",kind=\"input\"}} {}\n",
        sum("input_tokens")
    );
    assert!(metrics.contains(&input_line), "{input_line} in\n{metrics}");
    assert!(
        metrics.contains("agentgate_cost_usd_total{agent=\"claude\"} "),
        "{metrics}"
    );
    rig.gw.stop().await;
}

#[tokio::test]
async fn a_fork_remembers_the_parent_and_the_two_diverge() {
    let rig = Rig::start(|_| {}, |_| {}).await;
    let parent = rig.session_with(json!({"model": "haiku"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    rig.gw.ask(&parent, "alpha").await;
    rig.gw.ask(&parent, "beta").await;
    let parent_conv = rig.gw.session(&parent).await["agent_session_id"].clone();

    let res = rig
        .gw
        .post(
            &format!("/sessions/{parent}/fork"),
            json!({"title": "branch"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let fork: Value = res.json().await.unwrap();
    let fid = fork["id"].as_str().unwrap().to_string();
    assert_eq!(fork["forked_from"], parent.as_str());
    assert_eq!(fork["options"]["model"], "haiku", "same options");
    assert_eq!(fork["message_count"], 2, "history starts with the parent's");
    let argv = cmdline(pid_of(&fork));
    assert!(argv.contains(&"--fork-session".to_string()), "{argv:?}");
    assert!(
        argv.contains(&parent_conv.as_str().unwrap().to_string()),
        "{argv:?}"
    );

    rig.gw.ask(&fid, "gamma in the fork").await;
    let body = rig.last_request();
    assert_eq!(user_texts(&body), ["alpha", "beta", "gamma in the fork"]);
    assert!(model_of(&body).contains("haiku"));
    let fork_conv = rig.gw.session(&fid).await["agent_session_id"].clone();
    assert_ne!(fork_conv, parent_conv, "the fork has its own conversation");

    rig.gw.ask(&parent, "delta in the parent").await;
    assert_eq!(
        user_texts(&rig.last_request()),
        ["alpha", "beta", "delta in the parent"]
    );
    rig.gw.ask(&fid, "epsilon in the fork").await;
    assert_eq!(
        user_texts(&rig.last_request()),
        ["alpha", "beta", "gamma in the fork", "epsilon in the fork"]
    );
    // After a restart the fork resumes its own conversation, not the parent's.
    rig.gw.kill_child(&fid).await;
    rig.gw.ask(&fid, "zeta in the fork").await;
    assert_eq!(
        user_texts(&rig.last_request()),
        [
            "alpha",
            "beta",
            "gamma in the fork",
            "epsilon in the fork",
            "zeta in the fork"
        ]
    );
    let history = rig.gw.get_json(&format!("/sessions/{fid}/messages")).await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 5);
    assert_eq!(history["messages"][0]["input"], "alpha");

    // A session with no conversation yet cannot be forked.
    let fresh = rig.session_with(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = rig
        .gw
        .post(&format!("/sessions/{fresh}/fork"), json!({}))
        .await;
    assert_problem(res, 409).await;
    rig.gw.stop().await;
}

#[tokio::test]
async fn a_silent_child_ends_stalled_and_the_next_message_resumes() {
    let stall = Duration::from_secs(2);
    let rig = Rig::start(|p| p.stall_timeout = Some(stall), |_| {}).await;
    let id = rig.session_with(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    rig.gw.ask(&id, "before the stall").await;
    let pid = pid_of(&rig.gw.session(&id).await);

    rig.mock.hold_next(1);
    let started = std::time::Instant::now();
    let sent = rig
        .gw
        .post(
            &format!("/sessions/{id}/messages"),
            json!({"content": "this one hangs", "timeout_ms": 600_000}),
        )
        .await;
    assert_eq!(sent.status(), 202);
    let mid = sent.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m = rig.gw.finished(&id, &mid).await;
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(m["error"]["code"], "stalled", "{m}");
    assert!(
        started.elapsed() >= stall,
        "the watchdog waited for the silence"
    );
    assert_eq!(
        rig.mock.held_streams(),
        1,
        "the model stream was the silent part"
    );
    eventually(Duration::from_secs(30), || async { !alive(pid as u32) }).await;
    assert_eq!(rig.gw.session(&id).await["state"], "suspended");

    let m = rig.gw.ask(&id, "after the stall").await;
    assert_eq!(m["status"], "completed", "{m}");
    let texts = user_texts(&rig.last_request());
    assert_eq!(texts.first().map(String::as_str), Some("before the stall"));
    assert_eq!(texts.last().map(String::as_str), Some("after the stall"));
    let metrics = rig.gw.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("agentgate_messages_total{outcome=\"stalled\"} 1\n"));
    rig.gw.stop().await;
}
