//! Hardening, round two: connection limits and timeouts, the security
//! review's findings, and claims the audit found untested.
//!
//! Every test runs the real binary through [`Binary`], whose environment
//! holds no `AGENTGATE_*` variable the test did not set, and which is killed
//! when the test ends, passed or not. Every wait is bounded.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{agentgate_bin, assert_problem, eventually, sealed_command, PROFILES};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// The real binary on 127.0.0.1:0 with [`PROFILES`]; stderr goes to a file.
struct Binary {
    child: std::process::Child,
    addr: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// How [`Binary::start`] runs the binary.
#[derive(Default)]
struct Opts<'a> {
    args: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
    /// Extra profile TOML after [`PROFILES`].
    profiles: &'a str,
    /// Run it through this wrapper argv (e.g. `setpriv …`).
    wrapper: &'a [&'a str],
}

impl Binary {
    fn start(opts: Opts) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        // Readable by an unprivileged gateway (see `Opts::wrapper`).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let config = dir.path().join("agents.toml");
        std::fs::write(&config, format!("{PROFILES}\n{}", opts.profiles)).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        // The wrapper's argv goes in front of the sealed command's.
        let sealed = sealed_command(dir.path());
        let mut cmd = match opts.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(sealed.get_program());
                for (key, value) in sealed.get_envs() {
                    match value {
                        Some(v) => c.env(key, v),
                        None => c.env_remove(key),
                    };
                }
                c
            }
            None => sealed,
        };
        if !opts.args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !opts.wrapper.is_empty() {
            // An unprivileged gateway cannot make its default store in this
            // root-owned HOME; these tests are not about the store.
            cmd.args(["--store", "memory"]);
        }
        cmd.arg("--config")
            .arg(&config)
            .args(opts.args)
            .envs(opts.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        // The first line names the address; read it on a thread so a binary
        // that never prints fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            let _ = lines.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so the binary never blocks on a full pipe.
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some((_, token)) = opts.env.iter().find(|(k, _)| *k == "AGENTGATE_TOKEN") {
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut bin = Binary {
            child,
            addr: String::new(),
            dir,
            http: reqwest::Client::builder()
                .default_headers(headers)
                .timeout(T)
                .build()
                .unwrap(),
        };
        let line = rx.recv_timeout(T).unwrap_or_default();
        bin.addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address printed; stderr: {}", bin.log()))
            .to_string();
        bin
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn create(&self, agent: &str) -> String {
        let res = self.post("/sessions", json!({"agent": agent})).await;
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Sends `content` to session `id` and waits for the finished message.
    async fn ask(&self, id: &str, content: &str) -> Value {
        let res = self
            .post(
                &format!("/sessions/{id}/messages?wait=true"),
                json!({"content": content}),
            )
            .await;
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// SIGTERM, then waits (bounded) for the exit; returns what it logged.
    async fn stop(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let mut done = false;
        eventually(T, || {
            done = done || self.child.try_wait().unwrap().is_some();
            let d = done;
            async move { d }
        })
        .await;
        self.log()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        // A test that panicked leaves no gateway behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends raw bytes on a fresh connection and reads the answer until the
/// gateway closes the connection (bounded).
async fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the gateway answers and closes within 20 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of a raw HTTP answer.
fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// Reads from `s` until the peer closes it (EOF or reset); false if it is
/// still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.is_ok()
}

// ------------------------------------------------------ connections

/// With `--max-connections 4` and four idle connections open, a fifth gets
/// 503 problem+json, a health check still gets 200, and once the idle
/// connections go, requests are served again.
#[tokio::test]
async fn connections_past_the_limit_get_503_but_health_checks_pass() {
    let gw = Binary::start(Opts {
        args: &["--max-connections", "4", "--header-timeout", "60s"],
        ..Opts::default()
    });
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(&gw.addr).await.unwrap());
    }
    // The backlog is accepted in order: the four idle ones hold every place.
    let answer = raw(
        &gw.addr,
        b"GET /agents HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let health = raw(
        &gw.addr,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&health), 200, "{health}");
    drop(idle);
    eventually(T, || async { gw.get("/agents").await.status() == 200 }).await;
    gw.stop().await;
}

/// A client that sends its headers a line every 200 ms, one that sends
/// nothing, and an idle keep-alive connection are all closed once
/// `--header-timeout` (1 s) passes; a real request is still served.
#[tokio::test]
async fn slow_silent_and_idle_clients_are_cut_off_by_the_header_timeout() {
    let gw = Binary::start(Opts {
        args: &["--header-timeout", "1s"],
        ..Opts::default()
    });
    let slow = TcpStream::connect(&gw.addr).await.unwrap();
    let (mut rd, mut wr) = slow.into_split();
    let trickle = tokio::spawn(async move {
        if wr.write_all(b"GET /agents HTTP/1.1\r\n").await.is_err() {
            return;
        }
        for i in 0..200 {
            let line = format!("X-Slow-{i}: x\r\n");
            if wr.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut silent = TcpStream::connect(&gw.addr).await.unwrap();
    let mut keepalive = TcpStream::connect(&gw.addr).await.unwrap();
    keepalive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    keepalive.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    let mut buf = [0u8; 4096];
    let slow_closed = tokio::time::timeout(T, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok();
    assert!(slow_closed, "a client trickling headers stayed connected");
    assert!(
        closed_within(&mut silent, T).await,
        "a silent client stayed connected"
    );
    assert!(
        closed_within(&mut keepalive, T).await,
        "an idle keep-alive connection stayed open"
    );
    trickle.abort();
    assert_eq!(gw.get("/agents").await.status(), 200);
    gw.stop().await;
}

/// An open event stream is not cut by the header timeout: it has sent its
/// headers, and the timeout only runs while a request is awaited.
#[tokio::test]
async fn an_event_stream_outlives_the_header_timeout() {
    let gw = Binary::start(Opts {
        args: &["--header-timeout", "1s"],
        ..Opts::default()
    });
    let id = gw.create("sed").await;
    let res = gw.get(&format!("/sessions/{id}/events")).await;
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    // Well past the header timeout, a message's events still arrive on it.
    let stamp = std::time::Instant::now();
    eventually(T, || async { stamp.elapsed() > Duration::from_secs(3) }).await;
    let sent = gw
        .http
        .post(gw.url(&format!("/sessions/{id}/messages?wait=true")))
        .json(&json!({"content": "still-there"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let mut seen = String::new();
    let found = tokio::time::timeout(T, async {
        use futures::StreamExt;
        while let Some(Ok(chunk)) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("still-there") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(found, "the event stream ended early: {seen}");
    gw.stop().await;
}

/// `--max-event-streams 2`: a third open stream is 429 problem+json, and a
/// place frees when a client leaves.
#[tokio::test]
async fn event_streams_past_the_cap_are_429() {
    let gw = Binary::start(Opts {
        args: &["--max-event-streams", "2"],
        ..Opts::default()
    });
    let id = gw.create("sed").await;
    let path = format!("/sessions/{id}/events");
    let a = gw.get(&path).await;
    let b = gw.get(&path).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let third = gw.get(&path).await;
    let problem = assert_problem(third, 429).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("--max-event-streams"),
        "{problem}"
    );
    drop(a);
    eventually(T, || async { gw.get(&path).await.status() == 200 }).await;
    drop(b);
    gw.stop().await;
}

/// Clients that leave mid-request or mid-stream are logged at debug, never
/// at ERROR.
#[tokio::test]
async fn clients_that_leave_are_not_errors() {
    let gw = Binary::start(Opts {
        env: &[("AGENTGATE_LOG", "info,agentgate=debug,hyper=warn")],
        ..Opts::default()
    });
    for _ in 0..3 {
        // Half a request, then gone.
        let mut s = TcpStream::connect(&gw.addr).await.unwrap();
        s.write_all(b"GET /agents HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        drop(s);
    }
    // A body promised and never sent: 400, and the connection closes.
    let mut s = TcpStream::connect(&gw.addr).await.unwrap();
    s.write_all(
        b"POST /sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    drop(s);
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = gw.log();
        let ended = log.matches("connection ended").count()
            + log.matches("server connection error").count();
        if ended >= 3 && log.contains("status=400") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = gw.stop().await;
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

// ------------------------------------------------------ one authority

/// The Host allowlist also covers the request target: an absolute-form
/// target naming another host, duplicate Host headers, and HTTP/1.1 without
/// Host are 400; HTTP/2 without upgrade (h2c) is not spoken.
#[tokio::test]
async fn the_authority_comes_from_host_and_the_target_and_they_agree() {
    let gw = Binary::start(Opts::default());
    let cases: &[(&[u8], u16)] = &[
        (
            b"GET http://evil.example/agents HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            b"GET /agents HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            400,
        ),
        (b"GET /agents HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
        // HTTP/1.0 may omit Host, but an absolute target is then the authority the allowlist checks.
        (b"GET http://evil.example/agents HTTP/1.0\r\n\r\n", 403),
        (
            b"GET http://localhost/agents HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            200,
        ),
    ];
    for (request, want) in cases {
        let answer = raw(&gw.addr, request).await;
        assert_eq!(
            status_of(&answer),
            *want,
            "{}\n{answer}",
            String::from_utf8_lossy(request)
        );
        if *want >= 400 {
            assert!(answer.contains("application/problem+json"), "{answer}");
        }
    }
    // h2c with prior knowledge: the HTTP/2 preface is not a request this gateway serves.
    let answer = raw(
        &gw.addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .await;
    assert!(
        !answer.starts_with("HTTP/2") && !answer.contains("\x00\x00"),
        "{answer:?}"
    );
    assert!(answer.is_empty() || status_of(&answer) >= 400, "{answer:?}");
    gw.stop().await;
}

// ------------------------------------------------------ start-up refusals

/// The exit code of the binary run with `args`, or `None` if it is still
/// running after 20 s (then it is killed).
fn exit_code(args: &[&str]) -> (Option<i32>, String) {
    let home = tempfile::tempdir().unwrap();
    let mut child = sealed_command(home.path())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, String::new());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--allow-origin '*'` without a token, and a short token on a public
/// address, stop start-up with exit 2 unless `--insecure`.
#[test]
fn unsafe_configurations_are_refused_at_start() {
    let (code, err) = exit_code(&["--listen", "127.0.0.1:0", "--allow-origin", "*"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--allow-origin"), "{err}");
    let (code, err) = exit_code(&["--listen", "0.0.0.0:0", "--token", "short-tok"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("16 bytes"), "{err}");
}

#[tokio::test]
async fn insecure_overrides_the_refusals() {
    let gw = Binary::start(Opts {
        args: &["--allow-origin", "*", "--insecure"],
        ..Opts::default()
    });
    assert_eq!(gw.get("/healthz").await.status(), 200);
    gw.stop().await;
    let gw = Binary::start(Opts {
        args: &["--allow-origin", "*"],
        env: &[("AGENTGATE_TOKEN", "a-long-enough-token-1234")],
        ..Opts::default()
    });
    assert_eq!(gw.get("/agents").await.status(), 200);
    gw.stop().await;
}

// ------------------------------------------------------ the gateway's secrets

/// A child of a session runs as the gateway's user, yet cannot read the
/// gateway's environment (its token, a cloud key): the gateway is not
/// dumpable. As root, the gateway runs as `nobody` (setpriv) so that the
/// check is the one an unprivileged deployment gets: root reads any
/// process's environment whatever the flag.
#[tokio::test]
async fn a_child_cannot_read_the_gateway_environment() {
    const PEEK: &str = r##"
[agents.peek]
command = ["python3", "-u", "-c", '''
import os, sys
for line in sys.stdin:
    try:
        with open("/proc/%d/environ" % os.getppid(), "rb") as f:
            data = f.read()
        print("read", len(data), "bytes; secret seen:", b"MARK-7f3a" in data)
    except OSError as e:
        print("denied", e.errno)
    print("__END__")
''']
protocol = "lines"
end_marker = "^__END__$"
"##;
    // /proc/self belongs to this process's effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let wrapper: &[&str] = if root {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]
    } else {
        &[]
    };
    let gw = Binary::start(Opts {
        env: &[
            ("AGENTGATE_TOKEN", "token-MARK-7f3a-0123456789"),
            ("AWS_SECRET_ACCESS_KEY", "MARK-7f3a"),
        ],
        profiles: PEEK,
        wrapper,
        ..Opts::default()
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|f| f == "0"),
        "the gateway runs as root: {uid_line}"
    );
    let id = gw.create("peek").await;
    let answer = gw.ask(&id, "peek").await;
    let output = answer["output"].as_str().unwrap();
    assert!(output.starts_with("denied"), "{answer}");
    gw.stop().await;
}

// ------------------------------------------------------ browsers

/// The console cannot be framed, and its type cannot be sniffed.
#[tokio::test]
async fn the_console_refuses_to_be_framed() {
    let gw = Binary::start(Opts::default());
    let res = gw.get("/").await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    gw.stop().await;
}

/// CSRF: what a page on another site can send without a preflight starts
/// nothing — a POST without JSON content type (even with an empty body), a
/// POST that a browser marks cross-site but sends without Origin, and an
/// origin that differs from the gateway's only in scheme or port.
#[tokio::test]
async fn cross_site_posts_start_nothing() {
    let gw = Binary::start(Opts::default());
    let url = gw.url("/sessions");
    let plain = gw
        .http
        .post(&url)
        .header("content-type", "text/plain")
        .body(r#"{"agent":"sed"}"#)
        .send()
        .await
        .unwrap();
    assert_problem(plain, 415).await;
    let empty = gw.http.post(&url).send().await.unwrap();
    assert_problem(empty, 415).await;
    let no_origin = gw
        .http
        .post(&url)
        .header("sec-fetch-site", "cross-site")
        .json(&json!({"agent": "sed"}))
        .send()
        .await
        .unwrap();
    assert_problem(no_origin, 403).await;
    let port: u16 = gw.addr.rsplit(':').next().unwrap().parse().unwrap();
    for origin in [
        format!("https://{}", gw.addr),
        format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        "null".to_string(),
    ] {
        let res = gw
            .http
            .post(&url)
            .header("origin", &origin)
            .json(&json!({"agent": "sed"}))
            .send()
            .await
            .unwrap();
        assert_problem(res, 403).await;
    }
    let list: Value = gw.get("/sessions").await.json().await.unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 0, "{list}");
    // The gateway's own page, same scheme, host and port, still works.
    let own = gw
        .http
        .post(&url)
        .header("origin", format!("http://{}", gw.addr))
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"agent": "sed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 201);
    gw.stop().await;
}

/// `?access_token=` opens the event stream and nothing else.
#[tokio::test]
async fn the_query_token_opens_only_the_event_stream() {
    let token = "query-token-0123456789";
    let gw = Binary::start(Opts {
        env: &[("AGENTGATE_TOKEN", token)],
        ..Opts::default()
    });
    let id = gw.create("sed").await;
    let anon = reqwest::Client::builder().timeout(T).build().unwrap();
    let events = anon
        .get(gw.url(&format!("/sessions/{id}/events?access_token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    drop(events);
    let post = anon
        .post(gw.url(&format!("/sessions/{id}/messages?access_token={token}")))
        .json(&json!({"content": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(post, 401).await;
    gw.stop().await;
}

// ------------------------------------------------------ cwd_roots

const WHERE: &str = r#"
[agents.where]
command = ["sh", "-c", "while read l; do pwd; echo __END__; done"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"
"#;

/// A session's `cwd` must lie under `cwd_roots`: `..`, a symlink out and an
/// absolute path outside are refused, with the same answer whether the
/// outside path exists or not; and a directory swapped for a symlink after
/// the session was created does not move the next child outside.
#[tokio::test]
async fn cwd_roots_hold_at_every_spawn() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("work")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("out-link")).unwrap();
    let profiles = format!("{WHERE}cwd_roots = [{:?}]\n", root.display().to_string());
    let gw = Binary::start(Opts {
        profiles: &profiles,
        ..Opts::default()
    });
    let refused = |cwd: String| {
        let gw = &gw;
        async move {
            let res = gw
                .post("/sessions", json!({"agent": "where", "cwd": cwd}))
                .await;
            let problem = assert_problem(res, 400).await;
            let detail = problem["detail"].as_str().unwrap().to_string();
            detail.replace(&cwd, "<cwd>")
        }
    };
    let root_s = root.display().to_string();
    let dotdot = refused(format!("{root_s}/work/../../outside")).await;
    let link = refused(format!("{root_s}/out-link")).await;
    let abs = refused(outside.display().to_string()).await;
    let etc = refused("/etc".into()).await;
    let missing = refused("/nonexistent-agentgate-dir".into()).await;
    // No existence oracle: outside the roots, every answer reads the same.
    for d in [&link, &abs, &etc, &missing] {
        assert_eq!(d, &dotdot);
    }
    assert!(!dotdot.contains("No such file"), "{dotdot}");

    let work = root.join("work");
    let res = gw
        .post(
            "/sessions",
            json!({"agent": "where", "cwd": work.display().to_string()}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let session: Value = res.json().await.unwrap();
    let id = session["id"].as_str().unwrap().to_string();
    let first = gw.ask(&id, "1").await;
    assert_eq!(
        first["output"].as_str().unwrap().trim(),
        work.canonicalize().unwrap().display().to_string()
    );
    // Swap the directory for a symlink out, then make the child restart.
    std::fs::rename(&work, root.join("work.old")).unwrap();
    std::os::unix::fs::symlink(&outside, &work).unwrap();
    let pid = {
        let v: Value = gw
            .get(&format!("/sessions/{id}"))
            .await
            .json()
            .await
            .unwrap();
        v["pid"].as_u64().unwrap() as i32
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(T, || async {
        let v: Value = gw
            .get(&format!("/sessions/{id}"))
            .await
            .json()
            .await
            .unwrap();
        v["state"] == "suspended"
    })
    .await;
    let res = gw
        .post(
            &format!("/sessions/{id}/messages?wait=true"),
            json!({"content": "2"}),
        )
        .await;
    let body: Value = res.json().await.unwrap();
    let outside_s = outside.canonicalize().unwrap().display().to_string();
    assert!(
        !body.to_string().contains(&outside_s),
        "a child ran outside the root: {body}"
    );
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["error"]["code"], "spawn_failed", "{body}");
    gw.stop().await;
}

// ------------------------------------------------------ a sealed suite

/// `Config::defaults`, what every in-process gateway of the suite starts
/// from, reads nothing from the runner's environment: not a token, not a
/// limit, and not a claude binary (which would make `claude` the default
/// agent, run with the runner's HOME and no mock). Checked in a child run
/// of this test binary with such an environment.
#[test]
fn config_defaults_ignore_the_runners_environment() {
    if std::env::var_os("AGENTGATE_TEST_DEFAULTS_PROBE").is_some() {
        let c = agentgate::Config::defaults(agentgate_bin());
        assert!(c.token.is_none(), "the token came from the environment");
        assert!(!c.profiles.contains_key("claude"), "a claude was picked up");
        assert_eq!(c.default_agent, "demo");
        assert_eq!(c.max_sessions, 256);
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "config_defaults_ignore_the_runners_environment",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("AGENTGATE_TEST_DEFAULTS_PROBE", "1")
        .env("AGENTGATE_TOKEN", "from-the-runner-0123456789")
        // An existing file: until sealed, it became the `claude` profile and the default agent.
        .env("AGENTGATE_CLAUDE_BIN", agentgate_bin())
        .env("AGENTGATE_MAX_SESSIONS", "3")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

// ------------------------------------------------------ claims the audit found untested

const PROBES: &str = r#"
[agents.envdump]
command = ["sh", "-c", "while read l; do env; echo __END__; done"]
protocol = "lines"
end_marker = "^__END__$"
pass_env = ["PASSED_ONE", "PASSED_GROUP_*"]
stop_grace = "1s"

[agents.both]
command = ["sh", "-c", "while read l; do echo to-out; echo to-err >&2; echo __END__; done"]
protocol = "lines"
end_marker = "^__END__$"
merge_stderr = true
stop_grace = "1s"

[agents.split]
command = ["sh", "-c", "while read l; do echo to-out; echo to-err >&2; echo __END__; done"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"
"#;

/// A child's environment is the base allowlist plus what `pass_env` names:
/// a secret in the gateway's environment does not reach it.
#[tokio::test]
async fn a_secret_in_the_gateway_env_reaches_a_child_only_through_pass_env() {
    let gw = Binary::start(Opts {
        env: &[
            ("AWS_SECRET_ACCESS_KEY", "secret-9d1e"),
            ("PASSED_ONE", "one-5b7c"),
            ("PASSED_GROUP_A", "group-a-77e1"),
            ("PASSED_ONE_NOT", "prefix-only-1c2d"),
        ],
        profiles: PROBES,
        ..Opts::default()
    });
    let id = gw.create("envdump").await;
    let output = gw.ask(&id, "env").await["output"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(output.contains("PASSED_ONE=one-5b7c"), "{output}");
    assert!(output.contains("PASSED_GROUP_A=group-a-77e1"), "{output}");
    assert!(output.contains("PATH="), "{output}");
    // The one variable the gateway adds: the marker that finds the
    // child's descendants that left its process group.
    assert!(output.contains("CHILD_OF_AGENTGATE="), "{output}");
    for absent in ["secret-9d1e", "prefix-only-1c2d", "AGENTGATE_"] {
        assert!(
            !output.contains(absent),
            "{absent} reached the child: {output}"
        );
    }
    gw.stop().await;
}

/// `merge_stderr = true` puts stderr lines in the reply; without it they are not.
#[tokio::test]
async fn merge_stderr_puts_stderr_in_the_reply() {
    let gw = Binary::start(Opts {
        profiles: PROBES,
        ..Opts::default()
    });
    let merged = gw.create("both").await;
    let out = gw.ask(&merged, "x").await["output"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.contains("to-out") && out.contains("to-err"), "{out}");
    let split = gw.create("split").await;
    let out = gw.ask(&split, "x").await["output"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.contains("to-out") && !out.contains("to-err"), "{out}");
    gw.stop().await;
}

/// `AGENTGATE_PERSISTENT=false`: every message runs the one-shot command, so
/// nothing lives between messages and no child is kept.
#[tokio::test]
async fn persistent_false_runs_every_message_once() {
    let gw = Binary::start(Opts {
        env: &[("AGENTGATE_PERSISTENT", "false")],
        ..Opts::default()
    });
    let id = gw.create("python").await;
    let first = gw.ask(&id, "x = 41\nprint('set')").await;
    assert_eq!(first["status"], "completed", "{first}");
    let second = gw.ask(&id, "print(x + 1)").await;
    assert!(
        !second["output"].as_str().unwrap_or("").contains("42"),
        "state survived between messages: {second}"
    );
    let session: Value = gw
        .get(&format!("/sessions/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(session["pid"].is_null(), "{session}");
    gw.stop().await;
}

/// SIGINT shuts down like SIGTERM: exit 0 and no child left.
#[tokio::test]
async fn sigint_shuts_down_cleanly() {
    let mut gw = Binary::start(Opts::default());
    let id = gw.create("sed").await;
    let session: Value = gw
        .get(&format!("/sessions/{id}"))
        .await
        .json()
        .await
        .unwrap();
    let child = session["pid"].as_u64().unwrap() as u32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut status = None;
    eventually(T, || {
        status = status.or_else(|| gw.child.try_wait().unwrap());
        let done = status.is_some();
        async move { done }
    })
    .await;
    assert_eq!(status.unwrap().code(), Some(0), "{}", gw.log());
    eventually(T, || async { !common::alive(child) }).await;
}

/// DELETE while a message runs: 204, the message ends (not `running`), and
/// the child's process group is gone.
#[tokio::test]
async fn delete_during_a_running_message_ends_it_and_its_child() {
    let gw = Binary::start(Opts::default());
    let id = gw.create("python").await;
    let res = gw
        .post(
            &format!("/sessions/{id}/messages"),
            json!({"content": "import time; time.sleep(600)"}),
        )
        .await;
    assert_eq!(res.status(), 202);
    let mid = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + T;
    let pid = loop {
        let m: Value = gw
            .get(&format!("/sessions/{id}/messages/{mid}"))
            .await
            .json()
            .await
            .unwrap();
        if m["status"] == "running" {
            let s: Value = gw
                .get(&format!("/sessions/{id}"))
                .await
                .json()
                .await
                .unwrap();
            break s["pid"].as_u64().unwrap() as u32;
        }
        assert!(std::time::Instant::now() < deadline, "never running: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(pid > 0);
    let res = gw
        .http
        .delete(gw.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(gw.get(&format!("/sessions/{id}")).await.status(), 404);
    eventually(T, || async { common::group_members(pid).is_empty() }).await;
    gw.stop().await;
}

/// `GET /sessions/{id}/messages?limit=N` returns the first N, `after` pages on.
#[tokio::test]
async fn the_message_list_takes_limit_and_after() {
    let gw = Binary::start(Opts::default());
    let id = gw.create("sed").await;
    for i in 0..3 {
        gw.ask(&id, &format!("m{i}")).await;
    }
    let page: Value = gw
        .get(&format!("/sessions/{id}/messages?limit=2"))
        .await
        .json()
        .await
        .unwrap();
    let inputs: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["input"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["m0", "m1"]);
    let last = page["messages"][1]["id"].as_str().unwrap();
    let rest: Value = gw
        .get(&format!("/sessions/{id}/messages?limit=2&after={last}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1, "{rest}");
    assert_eq!(rest["messages"][0]["input"], "m2");
    let bad = gw.get(&format!("/sessions/{id}/messages?limit=x")).await;
    assert_problem(bad, 400).await;
    gw.stop().await;
}

/// `--insecure` lets the gateway listen on a public address without a token.
#[tokio::test]
async fn insecure_allows_a_public_address_without_a_token() {
    let gw = Binary::start(Opts {
        args: &["--listen", "0.0.0.0:0", "--insecure"],
        ..Opts::default()
    });
    let port = gw.addr.rsplit(':').next().unwrap();
    let res = gw
        .http
        .get(format!("http://127.0.0.1:{port}/agents"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    gw.stop().await;
}

/// `permission_relay = false` starts claude without the stdio permission tool.
#[test]
fn permission_relay_false_leaves_the_permission_flag_out() {
    let mut config = agentgate::Config::defaults(agentgate_bin());
    config
        .add_profiles_toml(
            "test",
            r#"
[agents.relay]
command = ["claude", "-p"]
protocol = "claude-stream-json"
[agents.norelay]
command = ["claude", "-p"]
protocol = "claude-stream-json"
permission_relay = false
"#,
        )
        .unwrap();
    let argv = |name: &str| config.profiles[name].persistent_argv(None).join(" ");
    assert!(argv("relay").contains("--permission-prompt-tool stdio"));
    assert!(
        !argv("norelay").contains("--permission-prompt-tool"),
        "{}",
        argv("norelay")
    );
}

/// Every example in `examples/profiles/` parses, and the python one runs.
#[tokio::test]
async fn the_example_profiles_parse_and_python_runs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/profiles");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut config = agentgate::Config::defaults(agentgate_bin());
            config
                .add_profiles_toml(&path.display().to_string(), &text)
                .unwrap_or_else(|e| panic!("{e}"));
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "bc.toml",
            "codex.toml",
            "gemini.toml",
            "python.toml",
            "sqlite3.toml"
        ]
    );
    let home = tempfile::tempdir().unwrap();
    let mut child = sealed_command(home.path())
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("python.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(T).unwrap_or_default();
    let addr = line
        .split("http://")
        .nth(1)
        .map(|r| r.split_whitespace().next().unwrap().to_string());
    let result = async {
        let base = format!("http://{}", addr.expect("the address"));
        let http = reqwest::Client::builder().timeout(T).build().unwrap();
        let s: Value = http
            .post(format!("{base}/sessions"))
            .json(&json!({"agent": "python"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = s["id"].as_str().unwrap();
        let m: Value = http
            .post(format!("{base}/sessions/{id}/messages?wait=true"))
            .json(&json!({"content": "print(6 * 7)"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        m
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["output"].as_str().unwrap().trim(), "42", "{result}");
}
