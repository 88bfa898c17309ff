//! One process per request: `POST /oneshot` (and, later, sessions in fallback mode).
//!
//! The content goes to the program's stdin, stdin is closed, and the reply is
//! what the program prints until it exits (claude: until its `result` line).
//! The child is spawned like every other child, so a timeout or a dropped
//! request kills its whole process group.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal as Sig;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::{AgentProfile, ProtocolKind};
use crate::content::Content;
use crate::model::{FailureCode, MessageError, MessageStatus};
use crate::process::{child_env, describe_exit, ChildEvent, ChildProcess, SpawnSpec};
use crate::protocol::{self, Signal};

/// What a one-shot run produced.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Completed or failed.
    pub status: MessageStatus,
    /// The reply.
    pub output: String,
    /// Why it failed.
    pub error: Option<MessageError>,
    /// Exit code (None when killed by a signal or never started).
    pub exit_code: Option<i32>,
    /// The last bytes of stderr.
    pub stderr: String,
    /// Usage the agent reported.
    pub usage: Option<Value>,
    /// The agent's conversation id.
    pub agent_session_id: Option<String>,
    /// Wall time.
    pub duration: Duration,
}

/// Runs `argv` once with `content` on stdin, framed by the profile's one-shot
/// adapter (text, or a claude user line that keeps image blocks). Every
/// [`Signal`] is passed to `on_signal` as it arrives (deltas, agent events).
pub async fn run(
    profile: &AgentProfile,
    argv: Vec<String>,
    cwd: Option<PathBuf>,
    content: &Content,
    timeout: Duration,
    max_output: usize,
    mut on_signal: impl FnMut(&Signal),
) -> RunResult {
    let started = Instant::now();
    let mut result = RunResult {
        status: MessageStatus::Failed,
        output: String::new(),
        error: None,
        exit_code: None,
        stderr: String::new(),
        usage: None,
        agent_session_id: None,
        duration: Duration::ZERO,
    };
    let spec = SpawnSpec {
        argv,
        env: child_env(profile),
        cwd_roots: cwd.is_some().then(|| profile.session_cwd_roots()),
        cwd: cwd.or_else(|| profile.cwd.clone()),
        merge_stderr: profile.merge_stderr,
    };
    let mut child = match ChildProcess::spawn(&spec) {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(MessageError {
                code: FailureCode::SpawnFailed,
                detail: format!("cannot start {:?}: {e}", spec.argv[0]),
            });
            return result;
        }
    };
    let mut adapter = protocol::oneshot(profile);
    // A protocol where the client speaks first (ACP) gets its handshake now
    // and the content once the agent is ready; the others get the content
    // and the end of stdin at once.
    let dir = spec.cwd.clone().or_else(|| std::env::current_dir().ok());
    // Content the agent cannot take (an image to an ACP agent that does not
    // advertise images) fails the run before it reaches the agent.
    let mut failure: Option<(FailureCode, String)> = None;
    let unsupported = |why: String, child: &ChildProcess| {
        child.signal(Sig::SIGKILL);
        Some((FailureCode::UnsupportedContent, why))
    };
    let mut held = match adapter.start(&dir.unwrap_or_default(), None) {
        Some(hello) => {
            child.write(hello);
            Some(content.clone())
        }
        None => {
            match adapter.frame_content(content) {
                Ok(input) => {
                    child.write(input);
                }
                Err(why) => failure = unsupported(why, &child),
            }
            child.close_stdin();
            None
        }
    };
    let spoke_first = held.is_some();
    let deadline = started + timeout;
    let mut done: Option<Result<Option<String>, (FailureCode, String)>> = None;
    let mut stderr = Vec::new();
    let status = loop {
        let event = tokio::select! {
            ev = child.next_event() => ev,
            _ = tokio::time::sleep_until(deadline), if failure.is_none() => {
                failure = Some((FailureCode::Timeout, format!("no reply within {} ms", timeout.as_millis())));
                child.signal(Sig::SIGKILL);
                continue;
            }
        };
        let mut signals = Vec::new();
        let exited = match event {
            ChildEvent::Stdout(b) => {
                adapter.stdout(&b, &mut signals);
                None
            }
            ChildEvent::Stderr(b) => {
                stderr.extend_from_slice(&b);
                let excess = stderr.len().saturating_sub(4096);
                stderr.drain(..excess);
                adapter.stderr(&b, &mut signals);
                None
            }
            ChildEvent::Exited(status) => {
                adapter.eof(&mut signals);
                Some(status)
            }
        };
        for s in &signals {
            match s {
                Signal::Write(bytes) => {
                    child.write(bytes.clone());
                }
                Signal::Ready => {
                    if let Some(content) = held.take() {
                        match adapter.frame_content(&content) {
                            Ok(input) => {
                                child.write(input);
                            }
                            Err(why) => failure = unsupported(why, &child),
                        }
                    }
                }
                // The reply is complete; such agents need not exit at stdin's end.
                Signal::Done(_) if spoke_first => {
                    child.close_stdin();
                    child.signal(Sig::SIGTERM);
                }
                _ => {}
            }
            if absorb(s, &mut result, &mut done, &mut failure, max_output, &child) {
                on_signal(s);
            }
        }
        if let Some(status) = exited {
            break status;
        }
    };
    result.exit_code = status.code();
    result.stderr = String::from_utf8_lossy(&stderr).into_owned();
    result.duration = started.elapsed();
    match (failure, done) {
        (Some((code, detail)), _) => result.error = Some(MessageError { code, detail }),
        (None, Some(Ok(text))) => {
            result.status = MessageStatus::Completed;
            if let Some(text) = text {
                result.output = text;
            }
        }
        (None, Some(Err((code, detail)))) => result.error = Some(MessageError { code, detail }),
        (None, None) => {
            let tail = result.stderr.trim_end();
            result.error = Some(MessageError {
                code: FailureCode::ProcessExited,
                detail: format!(
                    "the agent exited ({}) without a result; stderr: {tail}",
                    describe_exit(&status)
                ),
            });
        }
    }
    if profile.protocol == ProtocolKind::Lines && result.error.is_none() {
        result.status = MessageStatus::Completed;
    }
    result
}

/// Folds one signal into the result; false when it should not be passed on.
fn absorb(
    signal: &Signal,
    result: &mut RunResult,
    done: &mut Option<Result<Option<String>, (FailureCode, String)>>,
    failure: &mut Option<(FailureCode, String)>,
    max_output: usize,
    child: &ChildProcess,
) -> bool {
    match signal {
        Signal::Delta(text) => {
            if failure.is_some() {
                return false;
            }
            if result.output.len() + text.len() > max_output {
                *failure = Some((
                    FailureCode::OutputLimit,
                    format!("the reply exceeded {max_output} bytes"),
                ));
                child.signal(Sig::SIGKILL);
                return false;
            }
            result.output.push_str(text);
        }
        Signal::AgentSessionId(id) => result.agent_session_id = Some(id.clone()),
        Signal::Done(outcome) => {
            result.usage = outcome.usage.clone();
            if done.is_none() {
                *done = Some(outcome.result.clone());
            }
        }
        _ => {}
    }
    true
}
