//! Property tests (proptest) for everything that parses untrusted input:
//! output framing (`lines`, UTF-8 chunking), claude stream-json, the
//! `Last-Event-ID` header through the real route, and profile files.
//!
//! The framing properties say that *where a pipe read happens to cut the
//! stream changes nothing*: any split of a byte stream yields the same text
//! and the same reply ends as the unsplit stream. Each property runs a bounded
//! number of cases, so the whole file takes seconds; a failure prints the
//! minimal input proptest shrank it to.

use std::sync::Arc;

use agentgate::config::LineEnding;
use agentgate::protocol::claude::StreamJson;
use agentgate::protocol::lines::{Lines, Passthrough};
use agentgate::protocol::utf8::Utf8Decoder;
use agentgate::protocol::{Adapter, Signal};
use agentgate::Config;
use proptest::prelude::*;
use regex::Regex;
use serde_json::{json, Value};
use warp::Reply;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `data` cut at `cuts` (positions taken modulo the length, in order).
fn split(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return vec![];
    }
    let mut at: Vec<usize> = cuts.iter().map(|c| c % data.len()).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in at.into_iter().chain([data.len()]) {
        if c > prev {
            out.push(data[prev..c].to_vec());
            prev = c;
        }
    }
    out
}

/// Signals with adjacent text merged: how text is cut into deltas is free,
/// what it says and where replies end is not.
fn normalise(signals: Vec<Signal>) -> Vec<Signal> {
    let mut out: Vec<Signal> = Vec::new();
    for s in signals {
        match (out.last_mut(), s) {
            (Some(Signal::Delta(prev)), Signal::Delta(t)) => prev.push_str(&t),
            (_, Signal::Delta(t)) if t.is_empty() => {}
            // Output after the reply ended is counted, in whatever pieces.
            (Some(Signal::Unattributed(prev)), Signal::Unattributed(n)) => *prev += n,
            (_, s) => out.push(s),
        }
    }
    out
}

fn feed(adapter: &mut dyn Adapter, chunks: &[Vec<u8>], eof: bool) -> Vec<Signal> {
    let mut out = Vec::new();
    for c in chunks {
        adapter.stdout(c, &mut out);
    }
    if eof {
        adapter.eof(&mut out);
    }
    out
}

/// Pieces that exercise the framing: markers, near-markers, CR/LF, prompt
/// fragments, multi-byte characters and bytes that are never valid UTF-8.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"__END__\n".to_vec()),
        Just(b"__END__\r\n".to_vec()),
        Just(b"__END".to_vec()),
        Just(b"_".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b">".to_vec()),
        Just(b">> ".to_vec()),
        Just(b" ".to_vec()),
        Just("é".as_bytes().to_vec()),
        Just("😀".as_bytes().to_vec()),
        Just("한".as_bytes().to_vec()),
        Just(b"\xff".to_vec()),
        Just(b"\xe2\x82".to_vec()),
        "[a-z]{1,6}".prop_map(|s| s.into_bytes()),
    ]
}

fn stream(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(piece(), 0..max).prop_map(|p| p.concat())
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..12)
}

#[test]
fn utf8_decoding_ignores_where_reads_cut_the_bytes() {
    proptest!(cases(512), |(data in prop::collection::vec(any::<u8>(), 0..64), cuts in cuts())| {
        let mut d = Utf8Decoder::default();
        let mut text: String = split(&data, &cuts).iter().map(|c| d.decode(c)).collect();
        text.push_str(&d.finish());
        prop_assert_eq!(text, String::from_utf8_lossy(&data).into_owned());
    });
    proptest!(cases(256), |(data in stream(24), cuts in cuts())| {
        let mut d = Utf8Decoder::default();
        let mut text: String = split(&data, &cuts).iter().map(|c| d.decode(c)).collect();
        text.push_str(&d.finish());
        prop_assert_eq!(text, String::from_utf8_lossy(&data).into_owned());
    });
}

#[test]
fn end_marker_framing_ignores_where_reads_cut_the_output() {
    let ending = || LineEnding::EndMarker(Regex::new("^__END__$").unwrap());
    proptest!(cases(512), |(body in stream(24), cuts in cuts())| {
        let mut data = body.clone();
        data.extend_from_slice(b"\n__END__\n");
        let mut whole = Lines::new(ending());
        whole.frame("x");
        let expected = normalise(feed(&mut whole, &[data.clone()], false));
        let mut parts = Lines::new(ending());
        parts.frame("x");
        let got = normalise(feed(&mut parts, &split(&data, &cuts), false));
        prop_assert_eq!(&got, &expected);
        // The stream ends with a marker line, so the reply has ended.
        let ends = expected.iter().filter(|s| matches!(s, Signal::Done(_))).count();
        prop_assert!(ends >= 1);
    });
}

#[test]
fn prompt_framing_ignores_where_reads_cut_the_output() {
    // A prompt is recognised at the end of what the child printed before it
    // waits for input, so the body holds no complete prompt.
    let body = stream(24).prop_filter("no prompt inside the reply", |b| {
        !b.windows(4).any(|w| w == b">>> ")
    });
    proptest!(cases(512), |(body in body, cuts in cuts())| {
        let mut data = body.clone();
        data.extend_from_slice(b">>> ");
        let mut whole = Lines::new(LineEnding::Prompt(">>> ".into()));
        whole.frame("x");
        let expected = normalise(feed(&mut whole, &[data.clone()], false));
        let mut parts = Lines::new(LineEnding::Prompt(">>> ".into()));
        parts.frame("x");
        let got = normalise(feed(&mut parts, &split(&data, &cuts), false));
        prop_assert_eq!(&got, &expected);
        // All of the body is the reply, then the reply ends.
        let text = String::from_utf8_lossy(&body).into_owned();
        let mut want = vec![Signal::Delta(text), Signal::Done(agentgate::protocol::Outcome::streamed())];
        want.retain(|s| !matches!(s, Signal::Delta(t) if t.is_empty()));
        prop_assert_eq!(&got, &want);
    });
}

#[test]
fn oneshot_output_is_the_bytes_whatever_the_reads() {
    proptest!(cases(256), |(data in stream(24), cuts in cuts())| {
        let got = normalise(feed(&mut Passthrough::default(), &split(&data, &cuts), true));
        let text = String::from_utf8_lossy(&data).into_owned();
        let mut expected = vec![];
        if !text.is_empty() {
            expected.push(Signal::Delta(text));
        }
        expected.push(Signal::Done(agentgate::protocol::Outcome::streamed()));
        prop_assert_eq!(got, expected);
    });
}

/// One stdout line of the Claude CLI, and the text it streams (if any).
fn claude_event() -> impl Strategy<Value = (Value, Option<String>)> {
    let text = any::<String>().prop_map(|s| s.chars().take(40).collect::<String>());
    prop_oneof![
        "[a-f0-9-]{1,36}".prop_map(|id| (
            json!({"type": "system", "subtype": "init", "session_id": id}),
            None
        )),
        text.clone().prop_map(|t| (
            json!({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}}),
            Some(t)
        )),
        text.clone().prop_map(|t| (
            json!({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": t}}}),
            None
        )),
        ("[a-z0-9]{1,8}", text.clone()).prop_map(|(id, cmd)| (
            json!({"type": "control_request", "request_id": id, "request": {"subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": cmd}}}),
            None
        )),
        text.clone().prop_map(|t| (json!({"type": "user", "message": {"content": t}}), None)),
    ]
}

#[test]
fn claude_stream_json_ignores_where_reads_cut_the_lines() {
    let events = prop::collection::vec(claude_event(), 0..12);
    proptest!(cases(256), |(events in events, result in any::<String>(), crlf in any::<bool>(), cuts in cuts())| {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut data = String::new();
        let mut streamed = String::new();
        for (event, text) in &events {
            data.push_str(&event.to_string());
            data.push_str(nl);
            streamed.push_str(text.as_deref().unwrap_or(""));
        }
        let result_line = json!({"type": "result", "subtype": "success", "is_error": false, "result": result, "session_id": "s"});
        data.push_str(&result_line.to_string());
        data.push_str(nl);
        let data = data.into_bytes();

        let mut whole = StreamJson::new();
        whole.frame("hi");
        let expected = feed(&mut whole, std::slice::from_ref(&data), false);
        let mut parts = StreamJson::new();
        parts.frame("hi");
        let got = feed(&mut parts, &split(&data, &cuts), false);
        prop_assert_eq!(&got, &expected);
        // Every line is forwarded once, the deltas are the streamed text,
        // and the result line ends the reply with its text.
        let agent_events = got.iter().filter(|s| matches!(s, Signal::AgentEvent(_))).count();
        prop_assert_eq!(agent_events, events.len() + 1);
        let deltas: String = got.iter().filter_map(|s| match s { Signal::Delta(t) => Some(t.as_str()), _ => None }).collect();
        prop_assert_eq!(deltas, streamed);
        match got.last() {
            Some(Signal::Done(o)) => prop_assert_eq!(&o.result, &Ok(Some(result.clone()))),
            other => prop_assert!(false, "no end: {:?}", other),
        }
    });
}

#[test]
fn claude_stream_json_survives_any_bytes() {
    let junk = prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..32),
            Just(b"\n".to_vec()),
            Just(br#"{"type":"result","is_error":true}"#.to_vec()),
            Just(br#"{"type":"stream_event","event":{"type":"content_block_delta","delta":{"type":"text_delta","text":"#.to_vec()),
            Just(br#"{"type":"control_request","request":{"subtype":"can_use_tool"}}"#.to_vec()),
            Just(br#"{"type":"assistant","message":{"content":[{"type":"text"},7,null]}}"#.to_vec()),
        ],
        0..16,
    )
    .prop_map(|p| p.concat());
    proptest!(cases(512), |(data in junk, cuts in cuts())| {
        let mut a = StreamJson::new();
        a.frame("x");
        let mut out = Vec::new();
        for c in split(&data, &cuts) {
            a.stdout(&c, &mut out);
            a.stderr(&c, &mut out);
        }
        a.eof(&mut out);
        let _ = a.interrupt();
        // Nothing panicked, and every Done came from a `result` line.
        let results = data.windows(16).filter(|w| w == br#"{"type":"result""#).count();
        let done = out.iter().filter(|s| matches!(s, Signal::Done(_))).count();
        prop_assert!(done <= results);
    });
}

/// Bytes a header value may hold (visible ASCII, space, tab, obs-text).
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..24),
        "[0-9]{1,25}".prop_map(String::into_bytes),
        " *-?[0-9]{1,3} *".prop_map(String::into_bytes),
    ]
}

#[test]
fn last_event_id_and_after_give_200_or_400_never_500() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = Config::defaults(std::path::Path::new(env!("CARGO_BIN_EXE_agentgate")));
    // No child needed: a session whose messages would run one-shot.
    let mut demo = (*config.profiles["demo"]).clone();
    demo.persistent = false;
    config.profiles.insert("demo".into(), Arc::new(demo));
    let registry = agentgate::session::Registry::new(Arc::new(config));
    let id = rt
        .block_on(registry.create(Default::default()))
        .unwrap()
        .id();
    let routes = agentgate::http::routes(agentgate::http::AppState::new(
        registry,
        tokio_util::sync::CancellationToken::new(),
    ));
    let path = format!("/sessions/{id}/events");
    let check = |res: warp::reply::Response| -> Result<(), TestCaseError> {
        let status = res.status().as_u16();
        prop_assert!(status == 200 || status == 400, "status {}", status);
        let ct = res.headers()["content-type"].to_str().unwrap().to_string();
        if status == 400 {
            prop_assert_eq!(ct, "application/problem+json");
        } else {
            prop_assert_eq!(ct, "text/event-stream");
        }
        Ok(())
    };
    proptest!(cases(256), |(value in header_value())| {
        let value = warp::http::HeaderValue::from_bytes(&value).unwrap();
        let res = rt.block_on(
            warp::test::request()
                .path(&path)
                .header("last-event-id", value)
                .filter(&routes),
        );
        check(res.unwrap().into_response())?;
    });
    proptest!(cases(256), |(value in header_value())| {
        let after: String = value.iter().map(|b| format!("%{b:02X}")).collect();
        let res = rt.block_on(
            warp::test::request()
                .path(&format!("{path}?after={after}"))
                .filter(&routes),
        );
        check(res.unwrap().into_response())?;
    });
}

/// Lines a profile file may hold, valid or not.
fn toml_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("command"),
        Just("protocol"),
        Just("prompt"),
        Just("end_marker"),
        Just("quiet_ms"),
        Just("timeout"),
        Just("stop_grace"),
        Just("env"),
        Just("pass_env"),
        Just("cwd"),
        Just("prewarm"),
        Just("persistent"),
        Just("restart_budget"),
        Just("oneshot_command"),
        Just("default"),
        Just("comand"),
    ];
    let value = prop_oneof![
        Just(r#"["python3", "-i"]"#.to_string()),
        Just("[]".to_string()),
        Just(r#"[""]"#.to_string()),
        Just(r#""lines""#.to_string()),
        Just(r#""claude-stream-json""#.to_string()),
        Just(r#""^__END__$""#.to_string()),
        Just(r#""([""#.to_string()),
        Just(r#"">>> ""#.to_string()),
        Just(r#""10m""#.to_string()),
        Just(r#""soon""#.to_string()),
        Just(r#""/tmp""#.to_string()),
        Just(r#"{ A = "1", "B=C" = "2" }"#.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("true".to_string()),
        "\"[^\"\\\\]{0,12}\"".prop_map(|s| s),
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "\\[agents\\.[a-z한]{1,5}\\]".prop_map(|s| s),
        1 => ".{0,30}".prop_map(|s| s),
    ]
}

#[test]
fn profile_files_never_panic_and_errors_name_the_file() {
    let base = Config::defaults(std::path::Path::new("/bin/true"));
    let check = |text: &str| -> Result<(), TestCaseError> {
        let mut config = base.clone();
        match config.add_profiles_toml("fuzz.toml", text) {
            Ok(()) => {
                for p in config.profiles.values() {
                    prop_assert!(!p.command.is_empty() && !p.command[0].is_empty());
                    if p.protocol == agentgate::config::ProtocolKind::Lines {
                        prop_assert!(p.ending.is_some());
                    }
                }
            }
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.starts_with("fuzz.toml: "), "{}", e);
                prop_assert!(!e.contains('\n'), "one line: {}", e);
            }
        }
        Ok(())
    };
    proptest!(cases(256), |(text in ".{0,200}")| {
        check(&text)?;
    });
    let file = prop::collection::vec(toml_line(), 0..14)
        .prop_map(|lines| format!("[agents.a]\n{}\n", lines.join("\n")));
    proptest!(cases(512), |(text in file)| {
        check(&text)?;
    });
}

#[test]
fn profile_errors_point_at_the_right_line() {
    let base = Config::defaults(std::path::Path::new("/bin/true"));
    let keys = prop::sample::subsequence(
        vec![
            r#"command = ["sed"]"#,
            r#"protocol = "lines""#,
            r#"description = "x""#,
        ],
        0..=3,
    );
    let fillers =
        prop::collection::vec(prop_oneof![Just(""), Just("# a comment"), Just("  ")], 0..5);
    let lines = (keys, fillers)
        .prop_map(|(mut k, f)| {
            k.extend(f);
            k
        })
        .prop_shuffle();
    proptest!(cases(128), |(before in lines, indent in "[ \t]{0,3}")| {
        let mut text = String::from("[agents.a]\n");
        for l in &before {
            text.push_str(l);
            text.push('\n');
        }
        // A key no profile has, on line `line`.
        let line = before.len() + 2;
        text.push_str(&format!("{indent}comand = 1\n"));
        let e = base.clone().add_profiles_toml("fuzz.toml", &text).unwrap_err().to_string();
        prop_assert!(e.contains(&format!(": line {line}: ")), "{} in\n{}", e, text);
    });
}
