//! The task that owns one session's child.
//!
//! It waits on three things at once — commands from handles, what the child
//! prints (or its exit), and the next deadline (message timeout, kill after
//! an interrupt, `quiet_ms` silence, start-up readiness, unanswered
//! permission prompts) — and every state change of the session happens here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal as Sig;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::prewarm::spawn_spec;
use super::{CloseReason, Command, Registry, SessionShared};
use crate::content::Content;
use crate::error::ApiError;
use crate::model::{
    FailureCode, Message, MessageError, MessageStatus, PermissionBehavior, PermissionDecision,
    SessionState,
};
use crate::oneshot::RunResult;
use crate::process::{describe_exit, ChildEvent, ChildProcess};
use crate::protocol::{self, Adapter, Outcome, Signal};

mod claude_features;
use claude_features::PendingUpdate;

/// How much of stderr is kept for error details.
const STDERR_TAIL: usize = 4096;
/// Longest wait for a child's start-up prompt.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

struct Child {
    proc: ChildProcess,
    adapter: Box<dyn Adapter>,
    ready: bool,
    /// Being ended on purpose: takes no messages, its exit is no crash.
    retiring: bool,
    /// The gateway sent it SIGINT (an interrupt): an exit by that signal is
    /// the gateway's doing, not a crash.
    sigint_sent: bool,
    /// Whether it printed anything yet (the stall watchdog starts then).
    spoke: bool,
    ready_deadline: Instant,
}

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
    rx: mpsc::Receiver<Command>,
    queue: VecDeque<Queued>,
    child: Option<Child>,
    current: Option<Current>,
    stderr_tail: Vec<u8>,
    exits: VecDeque<Instant>,
    permissions: HashMap<String, Pending>,
    fallback: Option<FallbackRun>,
    /// A child being stopped beside this task: no new child starts before
    /// it is gone (claude flushes the transcript that `--resume` reads).
    stopping: Option<tokio::sync::oneshot::Receiver<()>>,
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
        rx: mpsc::Receiver<Command>,
    ) -> Actor {
        Actor {
            shared,
            registry,
            rx,
            queue: VecDeque::new(),
            child: None,
            current: None,
            stderr_tail: Vec::new(),
            exits: VecDeque::new(),
            permissions: HashMap::new(),
            fallback: None,
            stopping: None,
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
                let child = self.child.as_mut().map(|c| &mut c.proc);
                let fallback = self.fallback.as_mut().map(|f| &mut f.rx);
                let stopping = self.stopping.as_mut();
                tokio::select! {
                    _ = async move {
                        match stopping {
                            Some(rx) => { let _ = rx.await; }
                            None => std::future::pending().await,
                        }
                    } => Wake::Stopped,
                    ev = async move {
                        match fallback {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Fallback(ev),
                    cmd = self.rx.recv() => Wake::Command(cmd),
                    ev = async move {
                        match child {
                            Some(p) => p.next_event().await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Child(ev),
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
            async {
                match wake {
                    Wake::Command(Some(cmd)) => self.command(cmd).await,
                    // Every handle is gone: nobody can reach this session any more.
                    Wake::Command(None) => self.close(CloseReason::Shutdown).await,
                    Wake::Child(ev) => self.child_event(ev).await,
                    Wake::Fallback(ev) => self.fallback_event(ev).await,
                    Wake::Stopped => {
                        self.stopping = None;
                        self.try_start_next().await;
                    }
                    Wake::Timer => self.timers().await,
                }
            }
            .instrument(span)
            .await;
        }
        self.registry.closed(&self.shared);
    }

    fn touch(&self) {
        let mut s = self.shared.status();
        s.last_activity = Instant::now();
        s.last_activity_at = OffsetDateTime::now_utc();
    }

    fn publish(&self, name: &'static str, message_id: Option<Uuid>, data: Value) {
        self.shared.log.publish(name, message_id, &data);
    }

    fn set_state(&self, state: SessionState, reason: Option<&str>) {
        let pid = self.child.as_ref().map(|c| c.proc.pid());
        {
            let mut s = self.shared.status();
            if s.state == state && s.pid == pid && reason.is_none() {
                return;
            }
            s.state = state;
            s.pid = pid;
        }
        let mut data = json!({ "state": state });
        if let Some(pid) = pid {
            data["pid"] = json!(pid);
        }
        if let Some(reason) = reason {
            data["reason"] = json!(reason);
        }
        tracing::debug!(session_id = %self.shared.id, ?state, ?reason, "state");
        self.publish("session.state", None, data);
        if state == SessionState::Idle && pid.is_some() {
            self.registry.child_idle();
        }
    }

    fn update_message(&self, id: Uuid, f: impl FnOnce(&mut Message)) {
        let mut s = self.shared.status();
        if let Some(i) = s.index.get(&id).copied() {
            f(&mut s.messages[i]);
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
                    self.set_state(SessionState::Idle, Some("fallback"));
                } else if !self.registry.reserve_child(self.shared.id, false) {
                    // At `max_children`: no child now (a warm one goes back
                    // to nothing); the first message waits for a slot.
                    drop(warm);
                    self.set_state(SessionState::Suspended, Some("max_children"));
                } else if let Some(proc) = warm {
                    tracing::info!(session_id = %self.shared.id, pid = proc.pid(), "took a prewarmed child");
                    self.adopt(proc);
                } else if let Err(e) = self.spawn_child() {
                    tracing::warn!(session_id = %self.shared.id, error = %e, "spawn failed");
                    self.set_state(SessionState::Suspended, Some("spawn_failed"));
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
                    if let Err(e) = self.persist_message(m.id).await {
                        tracing::error!(session_id = %self.shared.id, error = %e, "cannot store a message");
                        self.queue.pop_back();
                        self.sync_queued();
                        self.shared.unpush_message(m.id);
                        result = Err(ApiError::Unavailable(e.to_string()));
                    } else {
                        let position = self.queue.len() - 1 + usize::from(self.current.is_some());
                        self.publish(
                            "message.queued",
                            Some(m.id),
                            json!({"message_id": m.id, "position": position}),
                        );
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
                while let Some(ev) = self.child.as_mut().and_then(|c| c.proc.try_next_output()) {
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
                let idle = self.current.is_none() && self.queue.is_empty() && self.child.is_some();
                let long_enough = idle_for.is_none_or(|d| self.shared.idle_info().1 >= d);
                if idle && long_enough {
                    self.stop_child_beside();
                    self.registry.metrics.reaped(reason);
                    self.set_state(SessionState::Suspended, Some(reason));
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

    fn enqueue(
        &mut self,
        content: Content,
        timeout: Option<Duration>,
        adopted: Option<Message>,
    ) -> Result<Message, ApiError> {
        let max_queue = self.registry.config.max_queue;
        let busy = self.current.is_some() || !self.queue.is_empty();
        if adopted.is_none() && busy && self.queue.len() >= max_queue {
            return Err(ApiError::TooManyRequests {
                detail: format!(
                    "{} messages are already waiting in this session (max_queue = {max_queue})",
                    self.queue.len()
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let (id, created_at) = adopted
            .map(|m| (m.id, m.created_at))
            .unwrap_or_else(|| (Uuid::new_v4(), OffsetDateTime::now_utc()));
        let message = Message {
            id,
            session_id: self.shared.id,
            input: content.clone(),
            output: String::new(),
            status: MessageStatus::Queued,
            error: None,
            created_at,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            usage: None,
            fallback: false,
        };
        {
            let mut s = self.shared.status();
            let at = s.messages.len();
            s.index.insert(id, at);
            s.messages.push(message.clone());
            s.queued = self.queue.len() + 1;
        }
        self.queue.push_back(Queued {
            id,
            content,
            timeout: timeout.unwrap_or(self.shared.profile.timeout),
        });
        Ok(message)
    }

    fn sync_queued(&self) {
        self.shared.status().queued = self.queue.len();
    }

    /// Starts the next queued message if the child is free (starting one if needed).
    async fn try_start_next(&mut self) {
        loop {
            if self.closed || self.current.is_some() {
                return;
            }
            if self.queue.is_empty() {
                if self.child.as_ref().is_some_and(|c| c.ready) {
                    self.set_state(SessionState::Idle, None);
                }
                return;
            }
            let mut fallback = !self.shared.profile.persistent;
            if !fallback && self.child.is_none() {
                if self.stopping.is_some() {
                    // The previous child is still being stopped; `Wake::Stopped` retries.
                    return;
                }
                if !self.registry.reserve_child(self.shared.id, true) {
                    // Every child slot is busy: the message waits its turn
                    // (`Command::Wake` when a slot frees).
                    self.set_state(SessionState::Suspended, Some("max_children"));
                    return;
                }
                if let Err(e) = self.spawn_child() {
                    if self.shared.profile.oneshot_command.is_some() {
                        tracing::warn!(session_id = %self.shared.id, error = %e, "cannot start the persistent child; running the message through the one-shot command");
                        fallback = true;
                    }
                }
            }
            if fallback {
                let q = self.queue.pop_front().expect("non-empty");
                self.sync_queued();
                self.start_fallback(q);
                return;
            }
            if self.child.is_none() {
                if !self.registry.reserve_child(self.shared.id, true) {
                    self.set_state(SessionState::Suspended, Some("max_children"));
                    return;
                }
                if let Err(e) = self.spawn_child() {
                    let q = self.queue.pop_front().expect("non-empty");
                    self.sync_queued();
                    let detail = format!("cannot start {:?}: {e}", self.shared.profile.command[0]);
                    self.fail_unstarted(q.id, FailureCode::SpawnFailed, &detail)
                        .await;
                    self.set_state(SessionState::Suspended, Some("spawn_failed"));
                    if self.record_exit() {
                        self.close(CloseReason::Failed).await;
                        return;
                    }
                    continue;
                }
            }
            if !self.child.as_ref().is_some_and(|c| c.ready) {
                return;
            }
            let q = self.queue.pop_front().expect("non-empty");
            self.sync_queued();
            if self.registry.cluster.is_some() {
                // Several nodes: `running` is stored before the child sees
                // the message, so a node taking the session over after a
                // crash fails it (`gateway_lost`) instead of running it twice.
                self.update_message(q.id, |m| m.status = MessageStatus::Running);
                if let Err(e) = self.persist_message(q.id).await {
                    tracing::error!(session_id = %self.shared.id, error = %e, "cannot store a message as running; it waits");
                    self.update_message(q.id, |m| m.status = MessageStatus::Queued);
                    self.queue.push_front(q);
                    self.sync_queued();
                    return;
                }
            }
            let child = self.child.as_mut().expect("checked above");
            let input = child.adapter.frame_content(&q.content);
            child.proc.write(input);
            let now = Instant::now();
            self.current = Some(Current {
                id: q.id,
                fallback: false,
                started: now,
                deadline: now + q.timeout,
                output: String::new(),
                last_output: now,
                stop: None,
                kill_at: None,
                first_delta: false,
                span: tracing::info_span!(parent: &self.span, "message", session_id = %self.shared.id, message_id = %q.id),
            });
            self.stderr_tail.clear();
            self.update_message(q.id, |m| {
                m.status = MessageStatus::Running;
                m.started_at = Some(OffsetDateTime::now_utc());
            });
            tracing::debug!(session_id = %self.shared.id, message_id = %q.id, "message started");
            self.publish("message.started", Some(q.id), json!({"message_id": q.id}));
            self.set_state(SessionState::Busy, None);
            return;
        }
    }

    /// Starts this session's child in a slot the caller reserved
    /// ([`Registry::reserve_child`]); a failed spawn gives the slot back.
    fn spawn_child(&mut self) -> std::io::Result<()> {
        let profile = &self.shared.profile;
        let resume = self.shared.status().agent_session_id.clone();
        let mut spec = spawn_spec(profile, self.shared.cwd.clone(), resume.as_deref());
        spec.argv.extend(self.launch_args());
        // Under the session's span only: the child outlives the message that started it.
        let spawned = self.span.in_scope(|| ChildProcess::spawn(&spec));
        self.registry
            .metrics
            .spawned(crate::metrics::SpawnKind::Session, spawned.is_ok());
        let proc = spawned.inspect_err(|_| self.registry.child_stopped())?;
        tracing::info!(session_id = %self.shared.id, pid = proc.pid(), resume = ?resume, "child started");
        self.adopt(proc);
        Ok(())
    }

    /// Makes `proc` this session's child (its slot is already reserved).
    fn adopt(&mut self, proc: ChildProcess) {
        let profile = &self.shared.profile;
        if self.had_child {
            self.registry.metrics.restarted();
        }
        self.had_child = true;
        let mut adapter = protocol::persistent(profile);
        // Protocols where the client speaks first (ACP) start their handshake now.
        let cwd = self.shared.cwd.clone().or_else(|| profile.cwd.clone());
        let cwd = cwd
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_default();
        let resume = self.shared.status().agent_session_id.clone();
        if let Some(hello) = adapter.start(&cwd, resume.as_deref()) {
            proc.write(hello);
        }
        let ready = !adapter.needs_ready();
        self.registry.child_adopted(self.shared.id, proc.pid());
        self.child = Some(Child {
            proc,
            adapter,
            ready,
            retiring: false,
            sigint_sent: false,
            spoke: false,
            ready_deadline: Instant::now() + READY_TIMEOUT.min(profile.timeout),
        });
        self.set_state(SessionState::Starting, None);
        if ready {
            self.set_state(SessionState::Idle, None);
        }
    }

    /// Runs `q` through the one-shot command (claude: resuming the conversation).
    fn start_fallback(&mut self, q: Queued) {
        let profile = self.shared.profile.clone();
        let resume = self.shared.status().agent_session_id.clone();
        let mut argv = profile.oneshot_argv(resume.as_deref());
        argv.extend(self.launch_args());
        let cwd = self.shared.cwd.clone();
        let max_output = self.registry.config.max_output;
        let (tx, rx) = mpsc::unbounded_channel();
        let timeout = q.timeout;
        let content = q.content.text();
        let task = tokio::spawn(async move {
            let result =
                crate::oneshot::run(&profile, argv, cwd, &content, timeout, max_output, |s| {
                    let _ = tx.send(FallbackEvent::Signal(s.clone()));
                })
                .await;
            let _ = tx.send(FallbackEvent::Done(result));
        });
        self.fallback = Some(FallbackRun { rx, task });
        let now = Instant::now();
        self.current = Some(Current {
            id: q.id,
            fallback: true,
            started: now,
            // The run enforces the timeout itself; this deadline is a backstop.
            deadline: now + timeout + Duration::from_secs(5),
            output: String::new(),
            last_output: now,
            stop: None,
            kill_at: None,
            first_delta: false,
            span: tracing::info_span!(parent: &self.span, "message", session_id = %self.shared.id, message_id = %q.id),
        });
        self.update_message(q.id, |m| {
            m.status = MessageStatus::Running;
            m.started_at = Some(OffsetDateTime::now_utc());
            m.fallback = true;
        });
        self.publish(
            "message.started",
            Some(q.id),
            json!({"message_id": q.id, "fallback": true}),
        );
        self.set_state(SessionState::Busy, None);
    }

    async fn fallback_event(&mut self, ev: Option<FallbackEvent>) {
        self.touch();
        match ev {
            // A one-shot's own end is reported by its RunResult.
            Some(FallbackEvent::Signal(Signal::Done(_))) => {}
            Some(FallbackEvent::Signal(signal)) => self.apply(vec![signal]).await,
            Some(FallbackEvent::Done(result)) => {
                self.fallback = None;
                let spawn_failed = result
                    .error
                    .as_ref()
                    .is_some_and(|e| e.code == FailureCode::SpawnFailed);
                self.registry
                    .metrics
                    .spawned(crate::metrics::SpawnKind::Fallback, !spawn_failed);
                if let Some(id) = result.agent_session_id.clone() {
                    self.set_agent_session_id(id);
                }
                let outcome = match result.error {
                    None => Ok(Some(result.output)),
                    Some(e) => Err((e.code, e.detail)),
                };
                self.finish(outcome, result.usage).await;
                self.try_start_next().await;
            }
            None => {
                self.fallback = None;
                self.finish(
                    Err((
                        FailureCode::ProcessExited,
                        "the one-shot run ended without a result".into(),
                    )),
                    None,
                )
                .await;
                self.try_start_next().await;
            }
        }
    }

    /// Ends the child on purpose with `signal`: it takes no more messages
    /// (the next one starts a new child) and its exit is not a crash.
    fn retire_child(&mut self, signal: Sig) {
        if let Some(c) = self.child.as_mut() {
            c.ready = false;
            c.retiring = true;
            c.proc.signal(signal);
        }
    }

    /// Records an unexpected exit; true when the restart budget is spent.
    fn record_exit(&mut self) -> bool {
        let profile = &self.shared.profile;
        let now = Instant::now();
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > profile.restart_window)
        {
            self.exits.pop_front();
        }
        self.exits.len() > profile.restart_budget
    }

    async fn request_stop(&mut self, reason: StopReason) {
        let grace = self.shared.profile.interrupt_grace;
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        if cur.stop.is_some() {
            return;
        }
        cur.stop = Some(reason);
        if let Some(run) = self.fallback.take() {
            // Aborting the run drops its child, which kills the child's group.
            run.task.abort();
            self.finish(Err((FailureCode::Interrupted, String::new())), None)
                .await;
            self.try_start_next().await;
            return;
        }
        cur.kill_at = Some(Instant::now() + grace);
        if let Some(child) = self.child.as_mut() {
            match child.adapter.interrupt() {
                Some(bytes) => {
                    child.proc.write(bytes);
                }
                None => {
                    child.sigint_sent = true;
                    child.proc.signal(Sig::SIGINT);
                }
            }
        }
    }

    fn answer_permission(
        &mut self,
        request_id: &str,
        decision: &PermissionDecision,
    ) -> Result<(), ApiError> {
        // Silence while the agent waited for this answer is no stall.
        if let Some(cur) = self.current.as_mut() {
            cur.last_output = Instant::now();
        }
        let pending = self.permissions.remove(request_id).ok_or_else(|| {
            ApiError::NotFound(format!("no open permission request {request_id:?}"))
        })?;
        let child = self.child.as_mut().ok_or_else(|| {
            ApiError::NotFound(format!(
                "permission request {request_id:?} expired with its child"
            ))
        })?;
        if let Some(bytes) = child
            .adapter
            .permission_answer(request_id, &pending.input, decision)
        {
            child.proc.write(bytes);
        }
        Ok(())
    }

    /// The child printed something (that `quiet_ms` counts) and the adapter made `signals` of it.
    async fn output(&mut self, signals: Vec<Signal>) {
        if let Some(cur) = self.current.as_mut() {
            cur.last_output = Instant::now();
        }
        if let Some(c) = self.child.as_mut() {
            c.spoke = true;
        }
        self.apply(signals).await;
    }

    async fn child_event(&mut self, ev: ChildEvent) {
        self.touch();
        let mut signals = Vec::new();
        match ev {
            ChildEvent::Stdout(bytes) => {
                if let Some(c) = self.child.as_mut() {
                    c.adapter.stdout(&bytes, &mut signals);
                }
                self.output(signals).await;
            }
            ChildEvent::Stderr(bytes) => {
                self.stderr_tail.extend_from_slice(&bytes);
                let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL);
                self.stderr_tail.drain(..excess);
                if let Some(c) = self.child.as_mut() {
                    c.adapter.stderr(&bytes, &mut signals);
                }
                self.output(signals).await;
            }
            ChildEvent::Exited(status) => {
                if let Some(c) = self.child.as_mut() {
                    c.adapter.eof(&mut signals);
                }
                self.apply(signals).await;
                let child = self.child.take();
                let retiring = child.as_ref().is_some_and(|c| c.retiring);
                let our_sigint =
                    child.as_ref().is_some_and(|c| c.sigint_sent) && ended_by_sigint(&status);
                self.child_gone_updates();
                self.registry.child_stopped();
                if let Some(c) = &child {
                    self.registry.child_gone(self.shared.id, c.proc.pid());
                }
                self.permissions.clear();
                let exit = describe_exit(&status);
                tracing::info!(session_id = %self.shared.id, %exit, "child exited");
                // An exit the gateway caused (its own signal, a stop, a kill)
                // is never a crash, whether or not a message still runs.
                let intentional = retiring
                    || our_sigint
                    || self.current.as_ref().is_some_and(|c| c.stop.is_some());
                if !intentional {
                    self.registry.metrics.crashed();
                }
                let unanswered = self.current.as_ref().is_some_and(|c| {
                    c.stop.is_none() && !c.fallback && c.output.is_empty() && !c.first_delta
                });
                if our_sigint && unanswered {
                    // The next message was written to a child that the
                    // gateway's own interrupt signal was ending; it never
                    // answered, so it runs again on a new child.
                    self.requeue_current();
                } else if self.current.is_some() {
                    let tail = String::from_utf8_lossy(&self.stderr_tail)
                        .trim_end()
                        .to_string();
                    let detail = if tail.is_empty() {
                        format!("the agent exited ({exit})")
                    } else {
                        format!("the agent exited ({exit}); stderr: {tail}")
                    };
                    self.finish(Err((FailureCode::ProcessExited, detail)), None)
                        .await;
                }
                self.set_state(SessionState::Suspended, Some("exited"));
                if !intentional && self.record_exit() {
                    self.close(CloseReason::Failed).await;
                    return;
                }
                self.try_start_next().await;
            }
        }
    }

    async fn apply(&mut self, signals: Vec<Signal>) {
        for signal in signals {
            match signal {
                Signal::Ready => {
                    if let Some(c) = self.child.as_mut() {
                        c.ready = true;
                    }
                    self.try_start_next().await;
                }
                Signal::Unattributed(bytes) => self.unattributed(bytes),
                Signal::Delta(text) => {
                    let max = self.registry.config.max_output;
                    let Some(cur) = self.current.as_mut() else {
                        self.unattributed(text.len());
                        continue;
                    };
                    if cur.stop == Some(StopReason::OutputLimit) {
                        continue;
                    }
                    if cur.output.len() + text.len() > max {
                        self.request_stop(StopReason::OutputLimit).await;
                        // Past the cap the child is out of step: end it now.
                        self.retire_child(Sig::SIGKILL);
                        continue;
                    }
                    if !cur.first_delta {
                        cur.first_delta = true;
                        self.registry.metrics.first_delta(cur.started.elapsed());
                    }
                    cur.output.push_str(&text);
                    let id = cur.id;
                    // `GET …/messages/{mid}` shows the reply so far.
                    self.update_message(id, |m| m.output.push_str(&text));
                    self.publish(
                        "message.delta",
                        Some(id),
                        json!({"message_id": id, "text": text}),
                    );
                }
                Signal::AgentEvent(event) => {
                    let id = self.current.as_ref().map(|c| c.id);
                    self.publish(
                        "message.agent_event",
                        id,
                        json!({"message_id": id, "event": event}),
                    );
                }
                Signal::AgentSessionId(id) => self.set_agent_session_id(id),
                Signal::ControlResponse { request_id, error } => {
                    self.control_answered(&request_id, error)
                }
                Signal::PermissionRequest {
                    request_id,
                    tool_name,
                    input,
                    options,
                } => {
                    let id = self.current.as_ref().map(|c| c.id);
                    let deadline = Instant::now() + self.shared.profile.permission_timeout;
                    self.permissions.insert(
                        request_id.clone(),
                        Pending {
                            input: input.clone(),
                            deadline,
                        },
                    );
                    let mut data = json!({"message_id": id, "request_id": request_id, "tool_name": tool_name, "input": input});
                    if let Some(options) = options {
                        data["options"] = options;
                    }
                    self.publish("message.permission_request", id, data);
                }
                Signal::PermissionCancelled(request_id) => {
                    self.permissions.remove(&request_id);
                }
                Signal::Write(bytes) => {
                    if let Some(c) = self.child.as_mut() {
                        c.proc.write(bytes);
                    }
                }
                Signal::ConversationReset(detail) => {
                    let lost = self.shared.status().agent_session_id.take();
                    tracing::warn!(session_id = %self.shared.id, agent_session_id = ?lost, %detail, "the agent's conversation is not continued");
                    self.set_state(SessionState::Starting, Some("new_conversation"));
                }
                Signal::ConversationLost => {
                    let lost = {
                        let mut s = self.shared.status();
                        s.fork_from = None;
                        s.agent_session_id.take()
                    };
                    tracing::warn!(session_id = %self.shared.id, agent_session_id = ?lost, "the agent's conversation cannot be resumed; the next child starts a new one");
                    // This child exits by itself; give it no more messages.
                    self.retire_child(Sig::SIGTERM);
                }
                Signal::Done(outcome) => {
                    // A retired child's reply may still end (its last bytes
                    // were on their way); no next message goes to it, since
                    // it is not ready.
                    if self.current.is_some() {
                        let Outcome { result, usage } = outcome;
                        self.finish(result, usage).await;
                        self.try_start_next().await;
                    }
                }
            }
        }
    }

    /// Ends the current message with `result`, unless it was being stopped
    /// (then the stop's reason wins: an interrupted reply looks like an error
    /// to the agent but is an interruption to the client).
    async fn finish(
        &mut self,
        result: Result<Option<String>, (FailureCode, String)>,
        usage: Option<Value>,
    ) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let duration_ms = cur.started.elapsed().as_millis() as u64;
        let (status, output, error) = match (cur.stop, result) {
            (Some(StopReason::Interrupted), _) => (
                MessageStatus::Interrupted,
                cur.output,
                Some(MessageError {
                    code: FailureCode::Interrupted,
                    detail: "interrupted by a client".into(),
                }),
            ),
            (Some(StopReason::Timeout), _) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError {
                    code: FailureCode::Timeout,
                    detail: format!(
                        "no reply within {} ms",
                        cur.deadline.duration_since(cur.started).as_millis()
                    ),
                }),
            ),
            (Some(StopReason::Stalled), _) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError {
                    code: FailureCode::Stalled,
                    detail: format!(
                        "no output from the agent for {} (stall_timeout); the child was ended, the next message resumes the conversation",
                        humantime::format_duration(self.shared.profile.stall_timeout.unwrap_or_default())
                    ),
                }),
            ),
            (Some(StopReason::OutputLimit), _) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError {
                    code: FailureCode::OutputLimit,
                    detail: format!(
                        "the reply exceeded {} bytes",
                        self.registry.config.max_output
                    ),
                }),
            ),
            (None, Ok(text)) => (MessageStatus::Completed, text.unwrap_or(cur.output), None),
            (None, Err((code, detail))) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError { code, detail }),
            ),
        };
        let usage = usage.map(|u| self.with_cost(u));
        self.update_message(cur.id, |m| {
            m.status = status;
            m.output = output.clone();
            m.error = error.clone();
            m.finished_at = Some(OffsetDateTime::now_utc());
            m.duration_ms = Some(duration_ms);
            m.usage = usage.clone();
        });
        tracing::info!(session_id = %self.shared.id, message_id = %cur.id, ?status, duration_ms, "message finished");
        let metrics = &self.registry.metrics;
        metrics.message_finished(error.as_ref().map(|e| e.code));
        if error.is_none() {
            metrics.reply_completed(cur.started.elapsed());
        }
        // A final state is stored before it is published.
        if let Err(e) = self.persist_message(cur.id).await {
            tracing::error!(session_id = %self.shared.id, message_id = %cur.id, error = %e, "cannot store a finished message");
        }
        match error {
            None => {
                let mut data = json!({"message_id": cur.id, "output": output, "duration_ms": duration_ms, "fallback": cur.fallback});
                if let Some(usage) = usage {
                    data["usage"] = usage;
                }
                self.publish("message.completed", Some(cur.id), data);
            }
            Some(error) => {
                self.publish(
                    "message.failed",
                    Some(cur.id),
                    json!({"message_id": cur.id, "error": error}),
                );
            }
        }
        self.permissions.clear();
        self.shared.finished.send_modify(|n| *n += 1);
        let free = self.child.as_ref().is_some_and(|c| c.ready) || !self.shared.profile.persistent;
        if free && self.queue.is_empty() {
            self.set_state(SessionState::Idle, None);
        }
    }

    /// Fails a message that never reached the agent.
    async fn fail_unstarted(&mut self, id: Uuid, code: FailureCode, detail: &str) {
        let error = MessageError {
            code,
            detail: detail.to_string(),
        };
        self.update_message(id, |m| {
            m.status = MessageStatus::Failed;
            m.error = Some(error.clone());
            m.finished_at = Some(OffsetDateTime::now_utc());
        });
        self.registry.metrics.message_finished(Some(code));
        if let Err(e) = self.persist_message(id).await {
            tracing::error!(session_id = %self.shared.id, message_id = %id, error = %e, "cannot store a failed message");
        }
        self.publish(
            "message.failed",
            Some(id),
            json!({"message_id": id, "error": error}),
        );
        self.shared.finished.send_modify(|n| *n += 1);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(cur) = &self.current {
            if cur.stop.is_none() {
                consider(Some(cur.deadline));
                if let Some(q) = self.child.as_ref().and_then(|c| c.adapter.quiet_after()) {
                    consider(Some(cur.last_output + q));
                }
                consider(self.stall_after().map(|d| cur.last_output + d));
            }
            consider(cur.kill_at);
        }
        if let Some(c) = &self.child {
            if !c.ready {
                consider(Some(c.ready_deadline));
            }
        }
        consider(self.permissions.values().map(|p| p.deadline).min());
        consider(self.next_update_deadline());
        next
    }

    async fn timers(&mut self) {
        let now = Instant::now();
        let mut signals = Vec::new();
        self.expire_updates(now);
        let stall = self.stall_after();
        let grace = self.shared.profile.interrupt_grace;
        if let Some(cur) = self.current.as_mut() {
            if stall.is_some_and(|d| now >= cur.last_output + d) {
                tracing::warn!(session_id = %self.shared.id, message_id = %cur.id, "no output from the child for stall_timeout; ending it");
                cur.stop = Some(StopReason::Stalled);
                cur.kill_at = Some(now + grace);
                self.retire_child(Sig::SIGTERM);
                return;
            }
            if cur.stop.is_none() && now >= cur.deadline {
                tracing::info!(session_id = %self.shared.id, message_id = %cur.id, "message timed out");
                self.request_stop(StopReason::Timeout).await;
                return;
            } else if cur.kill_at.is_some_and(|t| now >= t) {
                cur.kill_at = None;
                tracing::info!(session_id = %self.shared.id, "reply did not end after the interrupt; killing the child");
                self.retire_child(Sig::SIGKILL);
            } else if cur.stop.is_none() {
                if let Some(c) = self.child.as_mut() {
                    if let Some(q) = c.adapter.quiet_after() {
                        if now >= cur.last_output + q {
                            c.adapter.quiet(&mut signals);
                        }
                    }
                }
            }
        }
        if let Some(c) = self.child.as_ref() {
            if !c.ready && now >= c.ready_deadline {
                tracing::warn!(session_id = %self.shared.id, "child never reported ready; killing it");
                c.proc.signal(Sig::SIGKILL);
            }
        }
        let expired: Vec<String> = self
            .permissions
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let secs = self.shared.profile.permission_timeout.as_secs();
            let decision = PermissionDecision {
                behavior: Some(PermissionBehavior::Deny),
                option_id: None,
                message: Some(format!("no answer from the user within {secs} s")),
            };
            tracing::info!(session_id = %self.shared.id, request_id = %id, "permission request timed out; denied");
            let _ = self.answer_permission(&id, &decision);
        }
        self.apply(signals).await;
    }

    /// Stops the child in a task of its own, so the session answers at once
    /// while the child gets its grace period; the slot is given back when it
    /// is gone, and no new child starts before then.
    fn stop_child_beside(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        self.permissions.clear();
        let (done, rx) = tokio::sync::oneshot::channel();
        self.stopping = Some(rx);
        let registry = self.registry.clone();
        let grace = self.shared.profile.stop_grace;
        let id = self.shared.id;
        tokio::spawn(
            async move {
                let pid = child.proc.pid();
                let status = child.proc.stop(grace).await;
                registry.child_stopped();
                registry.child_gone(id, pid);
                tracing::info!(session_id = %id, pid, exit = %describe_exit(&status), "child stopped");
                let _ = done.send(());
            }
            .instrument(self.span.clone()),
        );
    }

    /// Puts the running message back at the head of the queue.
    fn requeue_current(&mut self) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let timeout = cur.deadline.duration_since(cur.started);
        let content = self
            .shared
            .message(cur.id)
            .map(|m| m.input)
            .unwrap_or_else(|| Content::Text(String::new()));
        self.update_message(cur.id, |m| {
            m.status = MessageStatus::Queued;
            m.started_at = None;
            m.output.clear();
        });
        tracing::info!(session_id = %self.shared.id, message_id = %cur.id, "the child ended by the gateway's interrupt never answered this message: queued again");
        self.queue.push_front(Queued {
            id: cur.id,
            content,
            timeout,
        });
        self.sync_queued();
    }

    /// Writes message `id` as it stands to the store (nothing for `memory`).
    fn persist_message(
        &self,
        id: Uuid,
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send + 'static
    {
        // Owned pieces only: the future must not borrow the (non-Sync) actor.
        let store = self.registry.store.clone();
        let found = store
            .is_durable()
            .then(|| self.shared.message_at(id))
            .flatten();
        async move {
            match found {
                Some((ord, m)) => store.save_message(ord, &m).await,
                None => Ok(()),
            }
        }
    }

    /// Writes the session's record to the store in the background (a new
    /// `agent_session_id`).
    fn persist_session(&self, closed: Option<&str>) {
        let store = self.registry.store.clone();
        if !store.is_durable() {
            return;
        }
        let record = self.shared.record(closed);
        tokio::spawn(async move {
            if let Err(e) = store.save_session(&record).await {
                tracing::error!(session_id = %record.id, error = %e, "cannot store the session");
            }
        });
    }

    /// Output that belongs to no message: logged and counted, never attributed.
    fn unattributed(&self, bytes: usize) {
        self.registry.metrics.unattributed(bytes);
        tracing::warn!(session_id = %self.shared.id, bytes, "the child printed output while no message was running; it belongs to no message");
    }

    async fn stop_child(&mut self) {
        self.child_gone_updates();
        if let Some(child) = self.child.take() {
            let pid = child.proc.pid();
            let status = child.proc.stop(self.shared.profile.stop_grace).await;
            self.registry.child_stopped();
            self.registry.child_gone(self.shared.id, pid);
            self.permissions.clear();
            tracing::info!(session_id = %self.shared.id, pid, exit = %describe_exit(&status), "child stopped");
        }
    }

    async fn close(&mut self, reason: CloseReason) {
        if self.closed {
            return;
        }
        self.closed = true;
        if reason == CloseReason::Detached {
            // The session goes on elsewhere: end the child at once and leave
            // every record as it is (the next holder reads the store).
            if let Some(run) = self.fallback.take() {
                run.task.abort();
            }
            self.child_gone_updates();
            if let Some(child) = self.child.take() {
                let pid = child.proc.pid();
                let _ = child.proc.stop(Duration::ZERO).await;
                self.registry.child_stopped();
                self.registry.child_gone(self.shared.id, pid);
            }
            if let Some(rx) = self.stopping.take() {
                let _ = rx.await;
            }
            self.shared.log.close();
            self.shared.finished.send_modify(|n| *n += 1);
            tracing::info!(session_id = %self.shared.id, "session left this node");
            return;
        }
        let detail = match reason {
            CloseReason::Deleted => "the session was deleted",
            CloseReason::Expired => "the session expired",
            CloseReason::Shutdown => "the gateway is shutting down",
            CloseReason::Failed => {
                "the session was closed: the agent kept exiting (restart budget spent)"
            }
            CloseReason::Detached => unreachable!("handled above"),
        };
        if let Some(run) = self.fallback.take() {
            run.task.abort();
        }
        if self.current.is_some() {
            self.finish(Err((FailureCode::Shutdown, detail.to_string())), None)
                .await;
            // `finish` keeps a stop reason if one was pending; a close overrides nothing else.
        }
        while let Some(q) = self.queue.pop_front() {
            self.fail_unstarted(q.id, FailureCode::Shutdown, detail)
                .await;
        }
        self.sync_queued();
        self.stop_child().await;
        if let Some(rx) = self.stopping.take() {
            let _ = rx.await;
        }
        let label = match reason {
            CloseReason::Deleted => "deleted",
            CloseReason::Expired => "expired",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Failed => "failed",
            CloseReason::Detached => unreachable!("handled above"),
        };
        if reason == CloseReason::Shutdown && self.registry.store.is_durable() {
            // The session outlives this gateway: open streams end with it
            // suspended, and an EventSource reconnects to the next gateway.
            self.set_state(SessionState::Suspended, Some("shutdown"));
            self.shared.log.close();
            self.shared.finished.send_modify(|n| *n += 1);
            tracing::info!(session_id = %self.shared.id, "session suspended for shutdown; kept in the store");
            return;
        }
        if matches!(reason, CloseReason::Expired | CloseReason::Failed)
            && self.registry.store.is_durable()
        {
            // A final state is stored before it is published.
            if let Err(e) = self
                .registry
                .store
                .save_session(&self.shared.record(Some(label)))
                .await
            {
                tracing::error!(session_id = %self.shared.id, error = %e, "cannot store the closed session");
            }
        }
        self.set_state(SessionState::Closed, Some(label));
        self.registry.metrics.session_closed(label);
        self.publish("session.closed", None, json!({"reason": reason}));
        self.shared.log.close();
        self.shared.finished.send_modify(|n| *n += 1);
        tracing::info!(session_id = %self.shared.id, ?reason, "session closed");
    }
}

/// Whether the child ended by SIGINT (by the signal, or by the shell
/// convention of exiting with 128 + 2).
fn ended_by_sigint(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(Sig::SIGINT as i32) || status.code() == Some(130)
}
