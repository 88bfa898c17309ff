//! The task that owns one session's child.
//!
//! It waits on three things at once — commands from handles, what the child
//! prints (or its exit), and the next deadline (message timeout, kill after
//! an interrupt, `quiet_ms` silence, start-up readiness, unanswered
//! permission prompts) — and every state change of the session happens here.
//!
//! This file holds the task's state and its loop, and dispatches each
//! command. What runs for the session (no process, a starting, ready or
//! retiring child, a child being stopped, a one-shot run) is one value, a
//! [`Lifecycle`], and the session's state is derived from it in one place
//! ([`lifecycle`]). The verbs live one per file beside it: [`queue`] (accepting and
//! starting messages), [`child`] (spawning, output, exit, stopping),
//! [`reply`] (a running reply's signals, permissions, interrupts, its end),
//! [`fallback`] (one-shot runs for a session), [`timers`] (deadlines),
//! [`close`] (closing, and writing to the store), [`claude_features`]
//! (`PATCH`: model and permission-mode changes).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal as Sig;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::prewarm::spawn_spec;
use super::{CloseReason, Command, Event, Registry, SessionShared};
use crate::content::Content;
use crate::error::ApiError;
use crate::model::{
    FailureCode, Message, MessageError, MessageStatus, PermissionBehavior, PermissionDecision,
    SessionState,
};
use crate::oneshot::RunResult;
use crate::process::{describe_exit, ChildEvent, ChildProcess};
use crate::protocol::{self, Adapter, Outcome, Signal};

mod child;
mod claude_features;
mod close;
mod fallback;
mod lifecycle;
mod queue;
mod reply;
mod timers;
use claude_features::PendingUpdate;
use lifecycle::{Child, Lifecycle, Phase};

/// How much of stderr is kept for error details.
const STDERR_TAIL: usize = 4096;
/// Longest wait for a child's start-up prompt.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

struct Queued {
    id: Uuid,
    content: Content,
    timeout: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Interrupted,
    Timeout,
    OutputLimit,
    /// No output for the profile's `stall_timeout`: the child is ended.
    Stalled,
}

struct Current {
    id: Uuid,
    /// Runs through the one-shot command instead of a persistent child.
    fallback: bool,
    started: Instant,
    deadline: Instant,
    output: String,
    last_output: Instant,
    stop: Option<StopReason>,
    kill_at: Option<Instant>,
    /// Whether a reply text arrived yet (for the first-delta latency).
    first_delta: bool,
    /// `message{session_id, message_id}` under the session's span: log lines
    /// written while this message runs carry both ids (the JSON format shows
    /// the innermost span only, so the session id is repeated here).
    span: tracing::Span,
}

struct Pending {
    input: Value,
    deadline: Instant,
}

/// A message running through the one-shot command (fallback mode).
struct FallbackRun {
    rx: mpsc::UnboundedReceiver<FallbackEvent>,
    task: tokio::task::JoinHandle<()>,
}

enum FallbackEvent {
    Signal(Signal),
    Done(RunResult),
}

enum Wake {
    Command(Option<Command>),
    Child(ChildEvent),
    Fallback(Option<FallbackEvent>),
    /// A child stopped beside the task (reaper, `max_children`) is gone.
    Stopped,
    Timer,
}

pub(super) struct Actor {
    shared: Arc<SessionShared>,
    registry: Arc<Registry>,
    rx: mpsc::Receiver<Box<Command>>,
    queue: VecDeque<Queued>,
    /// What runs for the session: no process, a child, a child being
    /// stopped, or a one-shot run.
    lifecycle: Lifecycle,
    current: Option<Current>,
    stderr_tail: Vec<u8>,
    exits: VecDeque<Instant>,
    permissions: HashMap<String, Pending>,
    updates: Vec<PendingUpdate>,
    closed: bool,
    /// Whether this session ever had a child (a later one is a restart).
    had_child: bool,
    /// The session's own span (`session{session_id, agent}`).
    span: tracing::Span,
}

impl Actor {
    pub(super) fn new(
        shared: Arc<SessionShared>,
        registry: Arc<Registry>,
        rx: mpsc::Receiver<Box<Command>>,
    ) -> Actor {
        Actor {
            shared,
            registry,
            rx,
            queue: VecDeque::new(),
            lifecycle: Lifecycle::Idle,
            current: None,
            stderr_tail: Vec::new(),
            exits: VecDeque::new(),
            permissions: HashMap::new(),
            updates: Vec::new(),
            closed: false,
            had_child: false,
            span: tracing::Span::none(),
        }
    }

    pub(super) async fn run(mut self) {
        // The registry runs this future inside the session's span.
        self.span = tracing::Span::current();
        while !self.closed {
            let deadline = self.next_deadline();
            let wake = {
                let lifecycle = &mut self.lifecycle;
                tokio::select! {
                    wake = lifecycle.next() => wake,
                    cmd = self.rx.recv() => Wake::Command(cmd.map(|c| *c)),
                    _ = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Timer,
                }
            };
            // What happens while a message runs is logged with its id.
            let span = self
                .current
                .as_ref()
                .map_or_else(tracing::Span::none, |c| c.span.clone());
            // Boxed: the handlers' futures are large, and held inline they
            // would size every session's task (an idle one too) for the
            // largest of them.
            Box::pin(
                async {
                    match wake {
                        Wake::Command(Some(cmd)) => self.command(cmd).await,
                        // Every handle is gone: nobody can reach this session any more.
                        Wake::Command(None) => self.close(CloseReason::Shutdown).await,
                        Wake::Child(ev) => self.child_event(ev).await,
                        Wake::Fallback(ev) => self.fallback_event(ev).await,
                        Wake::Stopped => {
                            self.lifecycle = Lifecycle::Idle;
                            self.try_start_next().await;
                        }
                        Wake::Timer => self.timers().await,
                    }
                }
                .instrument(span),
            )
            .await;
        }
        self.registry.closed(&self.shared);
    }

    fn touch(&self) {
        let mut s = self.shared.status();
        s.last_activity = Instant::now();
        s.last_activity_at = OffsetDateTime::now_utc();
    }

    fn publish(&self, event: Event) {
        self.shared.log.publish(&event);
    }

    /// Publishes the session's state as the lifecycle makes it
    /// ([`Actor::derived_state`]), with `reason`; nothing when it is
    /// unchanged and there is no reason.
    fn set_state(&self, reason: Option<&str>) {
        self.publish_state(self.derived_state(), reason);
    }

    /// Publishes `state` as the session's (see [`Actor::set_state`]).
    fn publish_state(&self, state: SessionState, reason: Option<&str>) {
        let pid = self.lifecycle.child().map(|c| c.proc.pid());
        {
            let mut s = self.shared.status();
            if s.state == state && s.pid == pid && reason.is_none() {
                return;
            }
            s.state = state;
            s.pid = pid;
        }
        tracing::debug!(session_id = %self.shared.id, ?state, ?reason, "state");
        self.publish(Event::SessionState { pid, reason, state });
        if state == SessionState::Idle && pid.is_some() {
            self.registry.child_idle();
        }
    }

    fn update_message(&self, id: Uuid, f: impl FnOnce(&mut Message)) {
        let mut s = self.shared.status();
        if let Some(i) = s.index.get(&id).copied() {
            let base = s.base;
            f(&mut s.messages[i - base]);
        }
    }

    async fn command(&mut self, cmd: Command) {
        // The reaper's own request must not count as activity.
        if !matches!(cmd, Command::Suspend { .. } | Command::Wake) {
            self.touch();
        }
        match cmd {
            Command::Start { warm, reply } => {
                if !self.shared.profile.persistent {
                    self.set_state(Some("fallback"));
                } else if !self.registry.reserve_child(self.shared.id, false) {
                    // At `max_children`: no child now (a warm one goes back
                    // to nothing); the first message waits for a slot.
                    drop(warm);
                    self.set_state(Some("max_children"));
                } else if let Some(proc) = warm {
                    tracing::info!(session_id = %self.shared.id, pid = proc.pid(), "took a prewarmed child");
                    self.adopt(proc);
                } else if let Err(e) = self.spawn_child() {
                    tracing::warn!(session_id = %self.shared.id, error = %e, "spawn failed");
                    self.set_state(Some("spawn_failed"));
                }
                let _ = reply.send(());
            }
            Command::Wake => self.try_start_next().await,
            Command::Send {
                content,
                timeout,
                adopted,
                reply,
            } => {
                let mut result = self.enqueue(content, timeout, adopted);
                if let Ok(m) = &result {
                    // Acknowledged means stored: a message the store refused
                    // is taken back and the client gets 503.
                    if let Err(e) = self.store_message(m.id).await {
                        tracing::error!(session_id = %self.shared.id, error = %e, "cannot store a message");
                        self.queue.pop_back();
                        self.sync_queued();
                        self.shared.unpush_message(m.id);
                        result = Err(ApiError::Unavailable(e.to_string()));
                    } else {
                        let position = self.queue.len() - 1 + usize::from(self.current.is_some());
                        self.publish(Event::MessageQueued {
                            message_id: m.id,
                            position,
                        });
                    }
                }
                let id = result.as_ref().ok().map(|m| m.id);
                if id.is_some() {
                    self.try_start_next().await;
                }
                // Answer with the message as it stands now (queued or running).
                let result = result.map(|m| self.shared.message(m.id).unwrap_or(m));
                let _ = reply.send(result);
            }
            Command::Interrupt { reply } => {
                // Output the reader already holds comes first: a reply whose
                // end arrived before the interrupt is completed, and the
                // interrupt then finds nothing running (409).
                while let Some(ev) = self
                    .lifecycle
                    .child_mut()
                    .and_then(|c| c.proc.try_next_output())
                {
                    self.child_event(ev).await;
                }
                let result = if let Some(id) = self.current.as_ref().map(|c| c.id) {
                    self.request_stop(StopReason::Interrupted).await;
                    Ok(id)
                } else {
                    Err(ApiError::Conflict("no message is running".into()))
                };
                let _ = reply.send(result);
            }
            Command::Permission {
                request_id,
                decision,
                reply,
            } => {
                let _ = reply.send(self.answer_permission(&request_id, &decision));
            }
            Command::Suspend { reason, idle_for } => {
                let idle = self.current.is_none()
                    && self.queue.is_empty()
                    && self.lifecycle.child().is_some();
                let long_enough = idle_for.is_none_or(|d| self.shared.idle_info().1 >= d);
                if idle && long_enough {
                    self.stop_child_beside();
                    self.registry.metrics.reaped(reason);
                    self.set_state(Some(reason));
                    if reason == "idle" {
                        tracing::info!(session_id = %self.shared.id, "idle child reaped");
                    }
                }
            }
            Command::Close { reason, reply } => {
                self.close(reason).await;
                let _ = reply.send(());
            }
            Command::Update { update, reply } => self.update(update, reply),
        }
    }

    fn sync_queued(&self) {
        self.shared.status().queued = self.queue.len();
    }
}

/// Whether the child ended by SIGINT (by the signal, or by the shell
/// convention of exiting with 128 + 2).
fn ended_by_sigint(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(Sig::SIGINT as i32) || status.code() == Some(130)
}
