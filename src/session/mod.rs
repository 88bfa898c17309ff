//! Sessions: the registry of cheap handles, the task that owns each child,
//! the event log and the reaper.
//!
//! Everything a request needs to *read* (state, history) sits in
//! [`SessionShared`] behind a std `Mutex` that is never held across an
//! `.await`. Everything that *changes* a session goes through its task as a
//! [`Command`], so state changes happen in one place, in order.

mod actor;
pub mod events;
mod persist;
pub mod prewarm;
pub mod reaper;
mod registry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

pub use events::{Event, EventLog, Item, StoredEvent, Subscription};
pub use registry::{Located, Registry, Remote};

use crate::config::AgentProfile;
use crate::content::Content;
use crate::error::ApiError;
use crate::model::{
    Message, PermissionDecision, Session, SessionState, SessionUsage, UpdateSession,
};
use crate::options::SessionOptions;

/// Why a session was closed (`session.closed` `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseReason {
    /// `DELETE /sessions/{id}`.
    Deleted,
    /// No activity for `session_ttl`.
    Expired,
    /// The gateway is shutting down.
    Shutdown,
    /// The restart budget ran out.
    Failed,
    /// Cluster mode: the session leaves this node (its idle child was
    /// reaped, or another node took its lease). Nothing is published or
    /// failed: the session lives on in the store for the next holder.
    #[serde(skip)]
    Detached,
}

/// A request to a session's task.
///
/// Commands travel boxed ([`SessionHandle`]): a session's channel allocates
/// room for 32 of them when it is created, so every idle session would pay
/// 32 times the largest variant.
pub(crate) enum Command {
    Start {
        warm: Option<crate::process::ChildProcess>,
        reply: oneshot::Sender<()>,
    },
    Send {
        content: Content,
        timeout: Option<Duration>,
        /// A message already acknowledged elsewhere (stored queued, or in the
        /// cluster inbox): it keeps its id and time and is never refused for
        /// a full queue.
        adopted: Option<Message>,
        reply: oneshot::Sender<Result<Message, ApiError>>,
    },
    Interrupt {
        reply: oneshot::Sender<Result<Uuid, ApiError>>,
    },
    Permission {
        request_id: String,
        decision: PermissionDecision,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Stop the child if the session is idle (and, with `idle_for`, has been for that long).
    Suspend {
        reason: &'static str,
        idle_for: Option<Duration>,
    },
    Close {
        reason: CloseReason,
        reply: oneshot::Sender<()>,
    },
    /// A child slot may have come free (`max_children`): try the queue again.
    Wake,
    /// `PATCH`: a live child hears of model and permission-mode changes first.
    Update {
        update: UpdateSession,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// The readable part of a session.
#[derive(Debug)]
pub struct SessionShared {
    /// Session id.
    pub id: Uuid,
    /// Its profile.
    pub profile: Arc<AgentProfile>,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// The session it was forked from.
    pub forked_from: Option<Uuid>,
    /// The JWT `sub` that created it; `None`: the operator's.
    pub owner: Option<String>,
    /// Cluster mode: this node, which holds its lease while it is here.
    pub node: Option<String>,
    /// Working directory of its children.
    pub cwd: Option<PathBuf>,
    /// Its events.
    pub log: Arc<EventLog>,
    idle_timeout: Duration,
    status: Mutex<Status>,
    /// Bumped whenever a message finishes, for `?wait=true`.
    finished: watch::Sender<u64>,
    /// Its place under `max_sessions` was given back (it closed).
    released: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Status {
    state: SessionState,
    pid: Option<u32>,
    last_activity: Instant,
    last_activity_at: OffsetDateTime,
    /// The history held in memory: messages `base..`. With a durable store,
    /// finished messages older than the last `--history-in-memory` are
    /// dropped from the front ([`SessionShared::trim_history`]) and read
    /// from the store; queued and running ones always stay.
    messages: Vec<Message>,
    /// How many messages were dropped from the front (the first one held
    /// is message `base`).
    base: usize,
    /// Usage of the dropped messages, so the session's sum stays whole.
    dropped_usage: SessionUsage,
    /// The version of the last usage sum handed to the store (see
    /// [`crate::store::UsageMark`]).
    usage_version: u64,
    /// Messages whose last write to the store failed: never dropped (the
    /// store may hold an older state of them).
    unstored: std::collections::HashSet<Uuid>,
    /// Message id → its place in the whole history.
    index: HashMap<Uuid, usize>,
    queued: usize,
    agent_session_id: Option<String>,
    title: Option<String>,
    metadata: Option<serde_json::Value>,
    /// Options its children start with (`PATCH` changes them).
    options: SessionOptions,
    /// A fork's child starts with `--resume <this> --fork-session` until the
    /// agent reports the fork's own conversation id.
    fork_from: Option<String>,
    /// claude's `total_cost_usd` is cumulative (per process, and carried
    /// over by `--resume`): the last one seen, so each message gets its own share.
    last_total_cost: Option<f64>,
}

impl Status {
    /// The usage sum of the whole history, with a version above every one
    /// handed out before: taken under the status lock, so a later sum here
    /// always has the higher version, and never below the wall clock in
    /// microseconds, so a sum written by the next gateway (a restart, a
    /// cluster node taking the session over) passes this one's.
    fn usage_mark(&mut self) -> crate::store::UsageMark {
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
        self.usage_version = (self.usage_version + 1).max(u64::try_from(now).unwrap_or(0));
        crate::store::UsageMark {
            version: self.usage_version,
            usage: add_usage(self.dropped_usage.clone(), &self.messages),
            messages: (self.base + self.messages.len()) as u64,
        }
    }
}

/// Sums the usage of `messages`: claude's per-reply `usage` tokens and the
/// gateway's per-message `cost_usd`.
pub(crate) fn sum_usage(messages: &[Message]) -> SessionUsage {
    add_usage(SessionUsage::default(), messages)
}

/// `sum` plus the usage of `messages`.
fn add_usage(mut sum: SessionUsage, messages: &[Message]) -> SessionUsage {
    for u in messages.iter().filter_map(|m| m.usage.as_ref()) {
        let tokens = |k: &str| u["usage"][k].as_u64().unwrap_or(0);
        sum.input_tokens += tokens("input_tokens");
        sum.output_tokens += tokens("output_tokens");
        sum.cache_creation_input_tokens += tokens("cache_creation_input_tokens");
        sum.cache_read_input_tokens += tokens("cache_read_input_tokens");
        sum.cost_usd += u["cost_usd"].as_f64().unwrap_or(0.0);
    }
    sum
}

impl SessionShared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().expect("session status poisoned")
    }

    /// The session as the API shows it.
    pub fn view(&self) -> Session {
        let s = self.status();
        let idle_deadline = (s.state == SessionState::Idle && s.pid.is_some())
            .then(|| s.last_activity_at + self.idle_timeout);
        Session {
            id: self.id,
            agent: self.profile.name.clone(),
            state: s.state,
            created_at: self.created_at,
            last_activity_at: s.last_activity_at,
            idle_deadline,
            pid: s.pid,
            message_count: s.base + s.messages.len(),
            queued: s.queued,
            title: s.title.clone(),
            metadata: s.metadata.clone(),
            agent_session_id: s.agent_session_id.clone(),
            cwd: self.cwd.as_ref().map(|p| p.display().to_string()),
            options: s.options.clone(),
            usage: add_usage(s.dropped_usage.clone(), &s.messages),
            forked_from: self.forked_from,
            owner: self.owner.clone(),
            node: self.node.clone(),
        }
    }

    /// What the store keeps of it (`closed`: why it was closed, if it was).
    pub fn record(&self, closed: Option<&str>) -> crate::store::SessionRecord {
        let s = self.status();
        crate::store::SessionRecord {
            id: self.id,
            agent: self.profile.name.clone(),
            created_at: self.created_at,
            last_activity_at: s.last_activity_at,
            title: s.title.clone(),
            metadata: s.metadata.clone(),
            cwd: self.cwd.as_ref().map(|p| p.display().to_string()),
            agent_session_id: s.agent_session_id.clone(),
            closed: closed.map(str::to_string),
            options: serde_json::to_value(&s.options).unwrap_or_default(),
            forked_from: self.forked_from,
            owner: self.owner.clone(),
        }
    }

    /// Message `id`, its place in the history, and the session's usage sum
    /// as of now (for the store).
    pub(crate) fn message_at(&self, id: Uuid) -> Option<(u64, Message, crate::store::UsageMark)> {
        let mut s = self.status();
        let i = *s.index.get(&id)?;
        let m = s.messages[i - s.base].clone();
        Some((i as u64, m, Status::usage_mark(&mut s)))
    }

    /// The session's usage sum as of now, for the store.
    pub(crate) fn usage_mark(&self) -> crate::store::UsageMark {
        Status::usage_mark(&mut self.status())
    }

    /// Drops message `id` (the last one) again: the store refused it.
    pub(crate) fn unpush_message(&self, id: Uuid) {
        let mut s = self.status();
        if s.messages.last().is_some_and(|m| m.id == id) {
            s.messages.pop();
            s.index.remove(&id);
        }
    }

    /// The options its next child starts with.
    pub fn options(&self) -> SessionOptions {
        self.status().options.clone()
    }

    /// What a fork of it starts from: its finished messages held in memory
    /// (one still running or queued belongs to the parent alone) and how
    /// many older ones are in the store only, options, conversation id,
    /// last total cost.
    pub(crate) fn fork_seed(
        &self,
    ) -> (
        Vec<Message>,
        usize,
        SessionOptions,
        Option<String>,
        Option<f64>,
    ) {
        let s = self.status();
        (
            s.messages
                .iter()
                .filter(|m| m.status.is_terminal())
                .cloned()
                .collect(),
            s.base,
            s.options.clone(),
            s.agent_session_id.clone(),
            s.last_total_cost,
        )
    }

    /// State, and how long since the last activity.
    pub fn idle_info(&self) -> (SessionState, Duration, bool) {
        let s = self.status();
        (s.state, s.last_activity.elapsed(), s.pid.is_some())
    }

    /// Messages waiting behind the running one.
    pub fn queued(&self) -> usize {
        self.status().queued
    }

    /// One message, if memory holds it (see [`SessionShared::dropped`]).
    pub fn message(&self, id: Uuid) -> Option<Message> {
        let s = self.status();
        s.index.get(&id).map(|i| s.messages[*i - s.base].clone())
    }

    /// Message number `ord` of the history, if memory holds it.
    pub(crate) fn message_by_ord(&self, ord: usize) -> Option<Message> {
        let s = self.status();
        ord.checked_sub(s.base)
            .and_then(|i| s.messages.get(i))
            .cloned()
    }

    /// How many of the oldest messages memory no longer holds (the store
    /// does).
    pub fn dropped(&self) -> usize {
        self.status().base
    }

    /// History, oldest first: at most `limit` messages after message
    /// `after`. `Ok(None)` when the page starts among the messages memory
    /// no longer holds: read it from the store.
    pub fn messages(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, ApiError> {
        let s = self.status();
        let start = match after {
            Some(id) => match s.index.get(&id) {
                Some(i) => i + 1,
                None if s.base > 0 => return Ok(None),
                None => {
                    return Err(ApiError::NotFound(format!(
                        "no message {id} in this session"
                    )))
                }
            },
            None => 0,
        };
        if start < s.base {
            return Ok(None);
        }
        Ok(Some(
            s.messages
                .iter()
                .skip(start - s.base)
                .take(limit)
                .cloned()
                .collect(),
        ))
    }

    /// Notes whether message `id`'s last write to the store succeeded.
    pub(crate) fn mark_stored(&self, id: Uuid, stored: bool) {
        let mut s = self.status();
        if stored {
            s.unstored.remove(&id);
        } else {
            s.unstored.insert(id);
        }
    }

    /// Drops finished messages from the front of the history held in
    /// memory until at most `keep` are held (a durable store has them). A
    /// queued or running message, or one the store may hold an older state
    /// of, stops the trim: everything from it on stays.
    pub(crate) fn trim_history(&self, keep: usize) {
        let mut s = self.status();
        // Trimmed in steps of `keep`, so the front is not shifted at every message.
        if s.messages.len() < keep.saturating_mul(2) {
            return;
        }
        let excess = s.messages.len() - keep;
        let n = s.messages[..excess]
            .iter()
            .position(|m| !m.status.is_terminal() || s.unstored.contains(&m.id))
            .unwrap_or(excess);
        if n == 0 {
            return;
        }
        let dropped: Vec<Message> = s.messages.drain(..n).collect();
        s.dropped_usage = add_usage(s.dropped_usage.clone(), &dropped);
        for m in &dropped {
            s.index.remove(&m.id);
        }
        s.base += n;
    }
}

/// A cheap, cloneable handle to a session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The readable part.
    pub shared: Arc<SessionShared>,
    tx: mpsc::Sender<Box<Command>>,
}

impl SessionHandle {
    /// Session id.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let gone = || ApiError::Gone(format!("session {} is closed", self.shared.id));
        self.tx.send(Box::new(make(tx))).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Queues a message; returns it as accepted (`queued` or `running`).
    pub async fn send(
        &self,
        content: Content,
        timeout: Option<Duration>,
    ) -> Result<Message, ApiError> {
        self.call(|reply| Command::Send {
            content,
            timeout,
            adopted: None,
            reply,
        })
        .await?
    }

    /// Queues a message acknowledged elsewhere (see `Command::Send`).
    pub(crate) async fn adopt(&self, message: Message) -> Result<Message, ApiError> {
        self.call(|reply| Command::Send {
            content: message.input.clone(),
            timeout: None,
            adopted: Some(message),
            reply,
        })
        .await?
    }

    /// Applies a `PATCH` (a live child is told first; its refusal changes nothing).
    pub async fn update(&self, update: UpdateSession) -> Result<(), ApiError> {
        self.call(|reply| Command::Update { update, reply }).await?
    }

    /// Interrupts the running message; returns its id.
    pub async fn interrupt(&self) -> Result<Uuid, ApiError> {
        self.call(|reply| Command::Interrupt { reply }).await?
    }

    /// Answers a permission request.
    pub async fn permission(
        &self,
        request_id: String,
        decision: PermissionDecision,
    ) -> Result<(), ApiError> {
        self.call(|reply| Command::Permission {
            request_id,
            decision,
            reply,
        })
        .await?
    }

    /// Closes the session; returns once its child is gone.
    pub async fn close(&self, reason: CloseReason) {
        let _ = self.call(|reply| Command::Close { reason, reply }).await;
    }

    /// Asks the session to stop its child if it is idle.
    pub(crate) fn suspend(&self, reason: &'static str, idle_for: Option<Duration>) {
        let _ = self
            .tx
            .try_send(Box::new(Command::Suspend { reason, idle_for }));
    }

    /// Tells the session that a child slot may be free.
    pub(crate) fn wake(&self) {
        let _ = self.tx.try_send(Box::new(Command::Wake));
    }

    /// Waits until message `id` has finished and returns it.
    pub async fn wait_finished(&self, id: Uuid) -> Option<Message> {
        let mut rx = self.shared.finished.subscribe();
        loop {
            let m = self.shared.message(id)?;
            if m.status.is_terminal() {
                return Some(m);
            }
            if rx.changed().await.is_err() {
                return self.shared.message(id);
            }
        }
    }
}
