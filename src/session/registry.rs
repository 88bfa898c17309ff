//! The registry: every live session by id, the limits that span sessions
//! (`max_sessions`, `max_sessions_per_owner`, `max_children`), and shutdown.
//!
//! It is also the one place that checks ownership: every lookup a request
//! makes names its [`Caller`], and a session the caller may not reach is
//! answered exactly like one that does not exist (404), so its id tells
//! another owner nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

mod cluster;
pub use cluster::{Located, Remote};

use super::actor::Actor;
use super::{CloseReason, Command, EventLog, SessionHandle, SessionShared, Status};
use crate::auth::Caller;
use crate::config::{AgentProfile, Config};
use crate::error::ApiError;
use crate::model::{CreateSession, ForkSession, Message, SessionState};
use crate::options::SessionOptions;

/// What a new session starts with besides its profile and cwd.
#[derive(Default)]
struct Seed {
    title: Option<String>,
    metadata: Option<serde_json::Value>,
    options: SessionOptions,
    /// A fork's copy of its parent's history.
    messages: Vec<Message>,
    agent_session_id: Option<String>,
    fork_from: Option<String>,
    last_total_cost: Option<f64>,
    forked_from: Option<Uuid>,
    owner: Option<String>,
    /// Whether `max_sessions_per_owner` applies (owners yes, operators no).
    limited: bool,
}

/// All live sessions.
#[derive(Debug)]
pub struct Registry {
    /// The gateway's configuration.
    pub config: Arc<Config>,
    sessions: DashMap<Uuid, SessionHandle>,
    reserved: AtomicUsize,
    /// Session children alive or reserved (see [`Registry::reserve_child`]).
    live_children: AtomicUsize,
    /// Sessions whose next message waits for a child slot.
    waiters: Mutex<Vec<Uuid>>,
    /// Open sessions per owner (`max_sessions_per_owner`).
    owners: Mutex<HashMap<String, usize>>,
    shutting_down: AtomicBool,
    pool: super::prewarm::Pool,
    /// Where sessions are kept.
    pub store: Arc<crate::store::Store>,
    /// The gateway's metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// Cluster mode (a `postgres://` store): this node's part.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Taking a session onto this node, and its inbox, one at a time.
    attaching: tokio::sync::Mutex<()>,
}

impl Registry {
    /// An empty registry.
    pub fn new(config: Arc<Config>) -> Arc<Registry> {
        Registry::with_store(config, Arc::new(crate::store::Store::memory()))
    }

    /// An empty registry whose sessions are kept in `store`.
    pub fn with_store(config: Arc<Config>, store: Arc<crate::store::Store>) -> Arc<Registry> {
        Arc::new(Registry {
            sessions: DashMap::new(),
            reserved: AtomicUsize::new(0),
            live_children: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
            owners: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            pool: Default::default(),
            metrics: crate::metrics::Metrics::new(),
            cluster: store
                .node_id()
                .map(|node| Arc::new(crate::cluster::Cluster::new(node, config.lease_ttl))),
            attaching: tokio::sync::Mutex::new(()),
            store,
            config,
        })
    }

    /// Records session `id`'s new child `pid` in the store, so that a
    /// gateway started after a `kill -9` of this one can end its group
    /// ([`crate::process::leftovers`]). In the background: a lost record
    /// costs only that clean-up, never the session.
    pub fn child_adopted(&self, id: Uuid, pid: u32) {
        if !self.store.is_durable() {
            return;
        }
        let Some(stat) = crate::process::leftovers::stat(pid) else {
            return;
        };
        let store = self.store.clone();
        let me = crate::process::leftovers::Gateway::me();
        let record = crate::store::ChildRecord {
            session_id: id,
            pid,
            start_time: stat.start_time,
            host: me.host.clone(),
            gateway_pid: me.pid,
            gateway_start: me.start_time,
        };
        tokio::spawn(async move {
            if let Err(e) = store.save_child(&record).await {
                tracing::warn!(session_id = %id, pid, error = %e, "cannot record a child");
            }
        });
    }

    /// Session `id`'s child `pid` is gone: its record goes too.
    pub fn child_gone(&self, id: Uuid, pid: u32) {
        if !self.store.is_durable() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.forget_child(id, pid).await {
                tracing::warn!(session_id = %id, pid, error = %e, "cannot forget a child");
            }
        });
    }

    /// The profile named `name`, or the default one.
    pub fn profile(&self, name: Option<&str>) -> Result<Arc<AgentProfile>, ApiError> {
        let name = name.unwrap_or(&self.config.default_agent);
        self.config.profiles.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.config.profiles.keys().map(String::as_str).collect();
            ApiError::BadRequest(format!(
                "unknown agent {name:?} (known: {})",
                known.join(", ")
            ))
        })
    }

    /// Creates a session for the operator and starts its child.
    pub async fn create(self: &Arc<Self>, req: CreateSession) -> Result<SessionHandle, ApiError> {
        self.create_as(req, &Caller::OPERATOR).await
    }

    /// Creates a session owned by `caller` (its `sub`) and starts its child:
    /// 403 for a profile its `agents` claim leaves out, 429 past
    /// `max_sessions_per_owner`.
    pub async fn create_as(
        self: &Arc<Self>,
        req: CreateSession,
        caller: &Caller,
    ) -> Result<SessionHandle, ApiError> {
        let profile = self.profile(req.agent.as_deref())?;
        caller.check_agent(&profile.name)?;
        req.options.check(&profile)?;
        let owner = caller.sub().map(str::to_string);
        let cwd = match (&owner, &profile.cwd_template) {
            (Some(owner), Some(_)) => owner_cwd(&profile, owner, req.cwd.as_deref())?,
            _ => resolve_cwd(&profile, req.cwd.as_deref())?,
        };
        let seed = Seed {
            title: req.title,
            metadata: req.metadata,
            options: req.options,
            owner,
            limited: !caller.is_operator(),
            ..Seed::default()
        };
        self.insert(profile, cwd, seed).await
    }

    /// Forks session `parent`: same profile, options and cwd, a copy of its
    /// history, and a child that starts with `--resume <its conversation>
    /// --fork-session`, so it knows the conversation so far and diverges.
    pub async fn fork(
        self: &Arc<Self>,
        parent: &str,
        req: ForkSession,
        caller: &Caller,
    ) -> Result<SessionHandle, ApiError> {
        let parent = self.get(parent, caller)?;
        let profile = parent.shared.profile.clone();
        if profile.protocol != crate::config::ProtocolKind::ClaudeStreamJson {
            return Err(ApiError::BadRequest(format!(
                "sessions of profile {:?} cannot be forked (protocol {}; claude-stream-json only)",
                profile.name,
                profile.protocol.as_str()
            )));
        }
        let view = parent.shared.view();
        let (held, dropped, options, agent_session_id, last_total_cost) = parent.shared.fork_seed();
        // Finished messages memory no longer holds come from the store.
        let mut messages = Vec::new();
        if dropped > 0 {
            let older = self
                .store
                .load_message_page(parent.id(), None, dropped)
                .await?
                .unwrap_or_default();
            messages.extend(older.into_iter().map(|(_, m)| m));
        }
        messages.extend(held);
        let Some(conversation) = agent_session_id else {
            return Err(ApiError::Conflict(
                "the session has no agent conversation to fork yet: send it a message first".into(),
            ));
        };
        let seed = Seed {
            title: req.title.or(view.title),
            metadata: req.metadata.or(view.metadata),
            options,
            messages,
            agent_session_id: Some(conversation.clone()),
            fork_from: Some(conversation),
            last_total_cost,
            forked_from: Some(parent.id()),
            owner: parent.shared.owner.clone(),
            limited: !caller.is_operator(),
        };
        self.insert(profile, parent.shared.cwd.clone(), seed).await
    }

    /// A page of a session's history that starts among the messages memory
    /// no longer holds ([`SessionShared::messages`] said `None`): read from
    /// the store, with memory's copy of each message it still holds (newer
    /// than the store's while a message runs).
    pub async fn stored_messages(
        &self,
        shared: &SessionShared,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Message>, ApiError> {
        let page = self
            .store
            .load_message_page(shared.id, after, limit)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no message {} in this session",
                    after.unwrap_or_default()
                ))
            })?;
        Ok(page
            .into_iter()
            .map(|(ord, m)| shared.message_by_ord(ord as usize).unwrap_or(m))
            .collect())
    }

    /// Message `mid` of a session: from memory, else (when memory no longer
    /// holds its oldest messages) from the store.
    pub async fn session_message(
        &self,
        shared: &SessionShared,
        mid: Uuid,
    ) -> Result<Option<Message>, ApiError> {
        if let Some(m) = shared.message(mid) {
            return Ok(Some(m));
        }
        if shared.dropped() == 0 {
            return Ok(None);
        }
        Ok(self.store.load_message(shared.id, mid).await?)
    }

    async fn insert(
        self: &Arc<Self>,
        profile: Arc<AgentProfile>,
        cwd: Option<PathBuf>,
        seed: Seed,
    ) -> Result<SessionHandle, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable("the gateway is shutting down".into()));
        }
        let max = self.config.max_sessions;
        if self.reserved.fetch_add(1, Ordering::SeqCst) >= max {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Unavailable(format!(
                "the gateway holds its maximum of {max} sessions"
            )));
        }
        if let Some(owner) = &seed.owner {
            let limit = seed
                .limited
                .then_some(self.config.max_sessions_per_owner)
                .flatten();
            if let Err(e) = self.take_owner_place(owner, limit) {
                self.reserved.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        }
        let id = Uuid::new_v4();
        let now = OffsetDateTime::now_utc();
        // A warm child knows nothing of options, forks or a session's own cwd.
        let plain = seed.options.is_empty() && seed.fork_from.is_none() && cwd.is_none();
        let mut messages = seed.messages;
        for m in &mut messages {
            // A copy is a message of its own: a message id names one message
            // (the store keeps them unique), so a fork's copies get new ones.
            m.session_id = id;
            m.id = Uuid::new_v4();
        }
        let index = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, i))
            .collect();
        let shared = Arc::new(SessionShared {
            id,
            profile: profile.clone(),
            created_at: now,
            forked_from: seed.forked_from,
            owner: seed.owner,
            node: self.store.node_id().map(str::to_string),
            cwd,
            log: EventLog::new(self.config.replay_events, self.config.replay_bytes),
            idle_timeout: self.config.idle_timeout,
            status: Mutex::new(Status {
                state: SessionState::Suspended,
                pid: None,
                last_activity: Instant::now(),
                last_activity_at: now,
                messages,
                base: 0,
                dropped_usage: Default::default(),
                usage_version: 0,
                unstored: Default::default(),
                index,
                queued: 0,
                agent_session_id: seed.agent_session_id,
                title: seed.title,
                metadata: seed.metadata,
                options: seed.options,
                fork_from: seed.fork_from,
                last_total_cost: seed.last_total_cost,
            }),
            finished: watch::channel(0).0,
            released: AtomicBool::new(false),
        });
        if self.store.is_durable() {
            // Acknowledged means stored: a session the store refused is not created.
            let stored = async {
                if let Some(cluster) = &self.cluster {
                    // Its child starts here: this node holds it from the first write.
                    self.store.acquire(id, cluster.ttl).await?;
                }
                self.store.save_session(&shared.record(None)).await?;
                self.store
                    .reserve_events(id, super::persist::RESERVE)
                    .await?;
                let usage = shared.usage_mark();
                for (ord, m) in shared
                    .messages(None, usize::MAX)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                {
                    self.store.save_message(ord as u64, m, Some(&usage)).await?;
                }
                shared.trim_history(self.config.history_in_memory);
                Ok::<(), crate::store::StoreError>(())
            };
            if let Err(e) = stored.await {
                self.release(&shared);
                tracing::error!(error = %e, "cannot store a new session");
                return Err(ApiError::Unavailable(e.to_string()));
            }
            super::persist::spawn_writer(
                self.store.clone(),
                id,
                &shared.log,
                super::persist::RESERVE,
            );
        }
        let handle = self.launch(shared);
        tracing::info!(session_id = %id, agent = %profile.name, "session created");
        self.metrics.session_created();
        if self.cluster.is_some() {
            // Cluster mode: the session's child starts with its first
            // message, on the node that message reaches (the proxy hashes
            // on the session id, which `POST /sessions` cannot carry):
            // stored, it leaves this node and gives its lease back.
            self.detach(id, false).await;
            return Ok(handle);
        }
        // A warm child was started with the profile's cwd: only for sessions without their own.
        let warm = (profile.prewarm > 0 && plain)
            .then(|| self.pool.take(&profile.name))
            .flatten();
        let (reply, started) = tokio::sync::oneshot::channel();
        let _ = handle
            .tx
            .send(Box::new(Command::Start { warm, reply }))
            .await;
        let _ = started.await;
        Ok(handle)
    }

    /// Registers `shared` and starts the task that owns its child.
    fn launch(self: &Arc<Self>, shared: Arc<SessionShared>) -> SessionHandle {
        let (tx, rx) = mpsc::channel(64);
        let handle = SessionHandle {
            shared: shared.clone(),
            tx,
        };
        self.sessions.insert(shared.id, handle.clone());
        let span =
            tracing::info_span!("session", session_id = %shared.id, agent = %shared.profile.name);
        tokio::spawn(Actor::new(shared, self.clone(), rx).run().instrument(span));
        handle
    }

    /// The prewarm pool.
    pub fn pool(&self) -> &super::prewarm::Pool {
        &self.pool
    }

    /// The session `id`, if `caller` may reach it: another owner's session
    /// is answered as one that does not exist.
    pub fn get(&self, id: &str, caller: &Caller) -> Result<SessionHandle, ApiError> {
        self.find(id)
            .filter(|h| caller.may_see(h.shared.owner.as_deref()))
            .ok_or_else(|| ApiError::NotFound(format!("no session {id}")))
    }

    fn find(&self, id: &str) -> Option<SessionHandle> {
        Uuid::parse_str(id)
            .ok()
            .and_then(|id| self.sessions.get(&id).map(|h| h.clone()))
    }

    /// The sessions `caller` may reach, oldest first; with `owner`, only
    /// that owner's.
    pub fn list_for(&self, caller: &Caller, owner: Option<&str>) -> Vec<SessionHandle> {
        let mut all = self.list();
        all.retain(|h| {
            let theirs = h.shared.owner.as_deref();
            caller.may_see(theirs) && owner.is_none_or(|o| theirs == Some(o))
        });
        all
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionHandle> {
        // Clone the handles out: no DashMap guard outlives this function.
        let mut all: Vec<SessionHandle> = self.sessions.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|h| h.shared.created_at);
        all
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Live session children.
    pub fn live_children(&self) -> usize {
        self.live_children.load(Ordering::SeqCst)
    }

    /// Deletes session `id`: it leaves the registry at once (so of several
    /// concurrent DELETEs exactly one finds it: 204, the others 404), then
    /// closes (one `session.closed`); returns once its child is gone.
    pub async fn delete(&self, id: &str, caller: &Caller) -> Result<(), ApiError> {
        let handle = Uuid::parse_str(id)
            .ok()
            .and_then(|id| {
                self.sessions
                    .remove_if(&id, |_, h| caller.may_see(h.shared.owner.as_deref()))
            })
            .map(|(_, h)| h)
            .ok_or_else(|| ApiError::NotFound(format!("no session {id}")))?;
        handle.close(CloseReason::Deleted).await;
        self.release(&handle.shared);
        if let Err(e) = self.store.delete_session(handle.id()).await {
            tracing::error!(session_id = %handle.id(), error = %e, "cannot delete the session from the store");
        }
        Ok(())
    }

    /// Brings back every open session of the store, each `suspended`; a
    /// message that was queued or running when the previous gateway
    /// stopped fails with `gateway_lost`, and event ids continue after the
    /// highest one the previous gateway could have used. Returns how many
    /// sessions came back.
    ///
    /// Start-up does not load the world: it reads each session's record,
    /// message count and usage sum ([`Store::load_summaries`]), and the
    /// messages left queued or running; a session's history and events stay
    /// in the store until a request reads them (memory starts with none of
    /// its messages, its event log with none of its events). Its writes are
    /// one transaction. Only a session stored before the usage sums (store
    /// version 5), or one with a lost message, has its messages read.
    ///
    /// [`Store::load_summaries`]: crate::store::Store::load_summaries
    pub async fn restore(self: &Arc<Self>) -> Result<usize, crate::store::StoreError> {
        use crate::model::{FailureCode, MessageError};
        if self.cluster.is_some() {
            return self.restore_node().await;
        }
        let summaries = self.store.load_summaries().await?;
        let unfinished = self.store.sessions_with_unfinished().await?;
        // Every ceiling is raised by the same step, in one statement: ids
        // continue after the highest one the previous gateway could use.
        let raise = super::persist::RESERVE + 1;
        let mut writes = Vec::new();
        let mut restored = 0;
        for summary in summaries {
            let crate::store::SessionSummary {
                record,
                ceiling,
                last_seq,
                message_count,
                usage,
            } = summary;
            let Some(profile) = self.config.profiles.get(&record.agent).cloned() else {
                tracing::warn!(session_id = %record.id, agent = %record.agent, "a stored session's profile no longer exists; not restored");
                continue;
            };
            let id = record.id;
            let next_seq = ceiling.max(last_seq) + 1;
            let new_ceiling = next_seq + super::persist::RESERVE;
            if new_ceiling > ceiling + raise {
                // Only if a stored id passed the ceiling (never by this gateway's writes).
                self.store.reserve_events(id, new_ceiling).await?;
            }
            let log = EventLog::restore_lazy(
                self.config.replay_events,
                self.config.replay_bytes,
                last_seq,
                next_seq,
            );
            // Sums written from now on must pass the stored one's version.
            let usage_version = usage.as_ref().map_or(0, |u| u.version);
            let history = match (usage, unfinished.contains(&id)) {
                (Some(mark), false) => History::InStore {
                    count: message_count as usize,
                    usage: mark,
                },
                (None, false) if message_count == 0 => History::Loaded(vec![], 0),
                _ => {
                    // Read once: its usage sum is not stored, or a message was lost.
                    let mut messages = self.store.load_messages(id).await?;
                    for (ord, m) in messages.iter_mut().enumerate() {
                        if m.status.is_terminal() {
                            continue;
                        }
                        m.status = crate::model::MessageStatus::Failed;
                        m.error = Some(MessageError {
                            code: FailureCode::GatewayLost,
                            detail: "the gateway stopped while this message was queued or running"
                                .into(),
                        });
                        m.finished_at = Some(OffsetDateTime::now_utc());
                        self.store.save_message(ord as u64, m, None).await?;
                        if let Some(error) = &m.error {
                            log.publish(&crate::session::Event::MessageFailed {
                                error,
                                message_id: m.id,
                            });
                        }
                    }
                    History::Loaded(messages, usage_version)
                }
            };
            if record.closed.is_some() {
                self.restore_closed(record, profile, history, log).await?;
                continue;
            }
            log.publish(&crate::session::Event::SessionState {
                pid: None,
                reason: Some("restarted"),
                state: SessionState::Suspended,
            });
            // Published before the writer starts: written below, with the rest.
            writes.extend(log.held_events().into_iter().map(|e| (id, e)));
            super::persist::spawn_writer(self.store.clone(), id, &log, new_ceiling);
            let shared = self.restored_shared(
                &record,
                profile.clone(),
                history,
                log,
                SessionState::Suspended,
                Duration::ZERO,
            );
            self.reserved.fetch_add(1, Ordering::SeqCst);
            if let Some(owner) = &record.owner {
                // Restored sessions count, even past a limit lowered since.
                let _ = self.take_owner_place(owner, None);
            }
            self.launch(shared);
            restored += 1;
        }
        self.store.restart_writes(raise, &writes).await?;
        Ok(restored)
    }

    /// Session `id`'s event log read back from the store for a session a
    /// cluster node takes over (a single gateway's restart reads no events:
    /// [`EventLog::restore_lazy`]): ids
    /// continue after `ceiling` (never reused), its writer runs, and the log
    /// says what happened — `message.failed` for each message in `lost`,
    /// then `session.state` `suspended` with reason `restarted`.
    async fn reopen_log(
        &self,
        id: Uuid,
        ceiling: u64,
        lost: &[Message],
    ) -> Result<Arc<EventLog>, crate::store::StoreError> {
        let events: Vec<_> = self
            .store
            .load_events(id)
            .await?
            .into_iter()
            .map(|e| (e.seq, e.name, e.message_id, e.data))
            .collect();
        let next_seq = ceiling.max(events.last().map_or(0, |e| e.0)) + 1;
        let new_ceiling = next_seq + super::persist::RESERVE;
        self.store.reserve_events(id, new_ceiling).await?;
        let log = EventLog::restore(
            self.config.replay_events,
            self.config.replay_bytes,
            events,
            next_seq,
        );
        super::persist::spawn_writer(self.store.clone(), id, &log, new_ceiling);
        for m in lost {
            if let Some(error) = &m.error {
                log.publish(&crate::session::Event::MessageFailed {
                    error,
                    message_id: m.id,
                });
            }
        }
        log.publish(&crate::session::Event::SessionState {
            pid: None,
            reason: Some("restarted"),
            state: SessionState::Suspended,
        });
        Ok(log)
    }

    /// Brings back a session the gateway had closed (`failed`, `expired`):
    /// readable as `closed` for what is left of its `session_ttl`, with no
    /// task and no child; one whose time is up is deleted from the store.
    async fn restore_closed(
        self: &Arc<Self>,
        record: crate::store::SessionRecord,
        profile: Arc<AgentProfile>,
        history: History,
        log: Arc<EventLog>,
    ) -> Result<(), crate::store::StoreError> {
        let id = record.id;
        let closed_for: Duration = (OffsetDateTime::now_utc() - record.last_activity_at)
            .try_into()
            .unwrap_or_default();
        if closed_for >= self.config.session_ttl {
            return self.store.delete_session(id).await;
        }
        log.close();
        let shared = self.restored_shared(
            &record,
            profile,
            history,
            log,
            SessionState::Closed,
            closed_for,
        );
        // No task: a closed session takes no commands (the handlers answer 410).
        let (tx, _) = mpsc::channel(1);
        self.sessions.insert(id, SessionHandle { shared, tx });
        Ok(())
    }

    /// Makes sure `shared`'s event log holds the stored events a reader
    /// that has seen up to `after` needs (after a restart they stay in the
    /// store until asked for).
    pub async fn load_events(
        &self,
        shared: &SessionShared,
        after: u64,
    ) -> Result<(), crate::store::StoreError> {
        if !shared.log.needs_stored(after) {
            return Ok(());
        }
        let events = self.store.load_events(shared.id).await?;
        shared.log.load_stored(
            events
                .into_iter()
                .map(|e| (e.seq, e.name, e.message_id, e.data))
                .collect(),
        );
        Ok(())
    }

    /// The shared part of a session read back from the store, in `state`,
    /// last active `idle_for` ago. A closed one holds no place under
    /// `max_sessions` (it is born released).
    fn restored_shared(
        &self,
        record: &crate::store::SessionRecord,
        profile: Arc<AgentProfile>,
        history: History,
        log: Arc<EventLog>,
        state: SessionState,
        idle_for: Duration,
    ) -> Arc<SessionShared> {
        let (messages, base, dropped_usage, usage_version) = match history {
            History::Loaded(messages, version) => (messages, 0, Default::default(), version),
            History::InStore { count, usage } => (vec![], count, usage.usage, usage.version),
        };
        let index = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, base + i))
            .collect();
        let shared = Arc::new(SessionShared {
            id: record.id,
            profile,
            created_at: record.created_at,
            forked_from: record.forked_from,
            owner: record.owner.clone(),
            node: self.store.node_id().map(str::to_string),
            cwd: record.cwd.as_ref().map(PathBuf::from),
            log,
            idle_timeout: self.config.idle_timeout,
            status: Mutex::new(Status {
                state,
                pid: None,
                // The reaper counts idle time (for a closed session, the
                // rest of its session_ttl) from here.
                last_activity: Instant::now()
                    .checked_sub(idle_for)
                    .unwrap_or_else(Instant::now),
                last_activity_at: record.last_activity_at,
                messages,
                base,
                dropped_usage,
                usage_version,
                unstored: Default::default(),
                index,
                queued: 0,
                agent_session_id: record.agent_session_id.clone(),
                title: record.title.clone(),
                metadata: record.metadata.clone(),
                options: serde_json::from_value(record.options.clone()).unwrap_or_default(),
                fork_from: None,
                last_total_cost: None,
            }),
            finished: watch::channel(0).0,
            released: AtomicBool::new(state == SessionState::Closed),
        });
        // Memory holds the newest of the history; the store has it all.
        shared.trim_history(self.config.history_in_memory);
        shared
    }

    /// Closes session `id` for `reason` (expiry): it stays readable as a
    /// `closed` session until the reaper forgets it.
    pub async fn close(&self, id: &str, reason: CloseReason) -> Result<(), ApiError> {
        let handle = self.get(id, &Caller::OPERATOR)?;
        tracing::info!(target: "audit", action = "session.close", caller = "gateway", owner = handle.shared.owner.as_deref().unwrap_or(""), session_id = id, detail = ?reason, "audit");
        handle.close(reason).await;
        Ok(())
    }

    /// The session task of `shared` ended. A session the gateway closed
    /// (`failed`, `expired`) keeps its history readable as `closed` for
    /// `session_ttl`; it no longer counts towards `max_sessions`.
    pub(super) fn closed(&self, shared: &SessionShared) {
        self.release(shared);
    }

    /// Gives back a closed session's place under `max_sessions` (once).
    fn release(&self, shared: &SessionShared) {
        if !shared.released.swap(true, Ordering::SeqCst) {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
            if let Some(owner) = &shared.owner {
                let mut owners = self.owners.lock().expect("owners poisoned");
                if let Some(n) = owners.get_mut(owner) {
                    *n -= 1;
                    if *n == 0 {
                        owners.remove(owner);
                    }
                }
            }
        }
    }

    /// Counts one more open session of `owner`, unless it holds `limit` already (429).
    fn take_owner_place(&self, owner: &str, limit: Option<usize>) -> Result<(), ApiError> {
        let mut owners = self.owners.lock().expect("owners poisoned");
        let n = owners.entry(owner.to_string()).or_insert(0);
        if let Some(max) = limit.filter(|max| *n >= *max) {
            return Err(ApiError::TooManySessions(format!(
                "this owner holds its maximum of {max} sessions (--max-sessions-per-owner); close one first"
            )));
        }
        *n += 1;
        Ok(())
    }

    /// The working directory `caller`'s one-shot runs of `profile` get:
    /// the owner's directory of a `cwd_template`, else the profile's own.
    pub fn oneshot_cwd(
        &self,
        profile: &AgentProfile,
        caller: &Caller,
    ) -> Result<Option<PathBuf>, ApiError> {
        match caller.sub() {
            Some(owner) if profile.cwd_template.is_some() => owner_cwd(profile, owner, None),
            _ => Ok(None),
        }
    }

    /// Open sessions of `owner`.
    pub fn owner_sessions(&self, owner: &str) -> usize {
        self.owners
            .lock()
            .expect("owners poisoned")
            .get(owner)
            .copied()
            .unwrap_or(0)
    }

    /// Drops a session from the registry.
    pub(super) fn forget(&self, id: Uuid) {
        if let Some((_, h)) = self.sessions.remove(&id) {
            self.release(&h.shared);
        }
    }

    /// Drops a closed session whose `session_ttl` is up, from the registry
    /// and from the store.
    pub(super) fn forget_closed(&self, id: Uuid) {
        self.forget(id);
        if self.store.is_durable() {
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.delete_session(id).await {
                    tracing::warn!(session_id = %id, error = %e, "cannot delete a closed session from the store");
                }
            });
        }
    }

    /// Takes a child slot for session `id` if fewer than `max_children` are
    /// alive or reserved: the limit is hard. When none is free, asks the
    /// least recently used idle session to stop its child and, with `wait`,
    /// puts `id` on the list of sessions woken ([`Command::Wake`]) when a
    /// slot frees.
    pub(super) fn reserve_child(&self, id: Uuid, wait: bool) -> bool {
        let max = self.config.max_children;
        let take = || {
            self.live_children
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
        };
        if take() {
            return true;
        }
        if wait {
            let mut waiters = self.waiters.lock().expect("waiters poisoned");
            if !waiters.contains(&id) {
                waiters.push(id);
            }
        }
        // A slot freed between the first try and joining the list woke
        // nobody: try once more now that this session is on it.
        if take() {
            self.waiters
                .lock()
                .expect("waiters poisoned")
                .retain(|w| *w != id);
            return true;
        }
        self.make_room(id);
        false
    }

    /// A session child is gone: its slot is free; every waiting session tries again.
    pub(super) fn child_stopped(&self) {
        self.live_children.fetch_sub(1, Ordering::SeqCst);
        let waiters = std::mem::take(&mut *self.waiters.lock().expect("waiters poisoned"));
        for id in waiters {
            if let Some(h) = self.sessions.get(&id).map(|h| h.clone()) {
                h.wake();
            }
        }
    }

    /// A session's child became idle: if other sessions wait for a slot,
    /// the least recently used idle child makes room.
    pub(super) fn child_idle(&self) {
        if !self.waiters.lock().expect("waiters poisoned").is_empty() {
            self.make_room(Uuid::nil());
        }
    }

    /// If `max_children` are live, asks the least recently used idle session
    /// (other than `starting`) to stop its child.
    pub(super) fn make_room(&self, starting: Uuid) {
        if self.live_children() < self.config.max_children {
            return;
        }
        let victim = self
            .list()
            .into_iter()
            .filter(|h| h.id() != starting)
            .filter_map(|h| {
                let (state, idle_for, has_child) = h.shared.idle_info();
                (state == SessionState::Idle && has_child).then_some((idle_for, h))
            })
            .max_by_key(|(idle_for, _)| *idle_for);
        if let Some((_, h)) = victim {
            tracing::info!(session_id = %h.id(), "max_children reached: suspending the least recently used idle child");
            h.suspend("max_children", None);
        }
    }

    /// Refuses new sessions and closes every session (children included).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let all = self.list();
        futures::future::join_all(all.iter().map(|h| h.close(CloseReason::Shutdown))).await;
        // Keep the list: SSE streams below still drain; forget afterwards.
        for h in &all {
            self.forget(h.id());
        }
        // Let open SSE streams deliver the last events (`session.closed`)
        // before the server stops: each ends by itself once its log is drained.
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        while all.iter().any(|h| h.shared.log.subscribers() > 0) && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Cluster mode: the sessions are free for the other nodes at once,
        // not after the TTL.
        for id in self.store.held() {
            if let Err(e) = self.store.release(id).await {
                tracing::warn!(session_id = %id, error = %e, "cannot give a lease back; it expires by itself");
            }
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// The working directory a session asked for, if it lies under one of the profile's roots.
fn resolve_cwd(profile: &AgentProfile, cwd: Option<&str>) -> Result<Option<PathBuf>, ApiError> {
    let Some(cwd) = cwd else { return Ok(None) };
    let outside = || {
        ApiError::BadRequest(format!(
            "cwd {cwd:?} is not an existing directory under an allowed root of profile {:?} (cwd_roots)",
            profile.name
        ))
    };
    let roots: Vec<PathBuf> = profile
        .cwd_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    // The root check comes first, on the path as written (`..` folded), so
    // the answer for a path outside every root says nothing about whether it exists.
    let written = crate::process::lexical_absolute(std::path::Path::new(cwd));
    let under_written = |root: &PathBuf| {
        written.starts_with(root) || written.starts_with(crate::process::lexical_absolute(root))
    };
    if !roots.iter().chain(&profile.cwd_roots).any(under_written) {
        return Err(outside());
    }
    // Then symlinks: the directory itself must lie under a root too. The
    // spawn checks again, by handle, every time a child starts.
    let path = std::fs::canonicalize(cwd).map_err(|_| outside())?;
    if !path.is_dir() || !roots.iter().any(|root| path.starts_with(root)) {
        return Err(outside());
    }
    Ok(Some(path))
}

/// The working directory of `owner`'s session of a profile with a
/// `cwd_template`: the template with `{owner}` replaced by a safe name
/// ([`crate::auth::owner_dir_name`]), created (0700) on first use. It must
/// come out under the template's base (and under a `cwd_roots` entry when
/// the profile has any). A `cwd` the client asked for must lie inside it.
fn owner_cwd(
    profile: &AgentProfile,
    owner: &str,
    asked: Option<&str>,
) -> Result<Option<PathBuf>, ApiError> {
    use std::os::unix::fs::DirBuilderExt;
    let (Some(template), Some(base)) = (&profile.cwd_template, profile.cwd_template_base()) else {
        return Ok(None);
    };
    let name = crate::auth::owner_dir_name(owner);
    let dir = PathBuf::from(template.replacen("{owner}", &name, 1));
    let broken = |what: String| {
        ApiError::Internal(format!(
            "profile {:?}: cwd_template {template:?}: {what}",
            profile.name
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| broken(format!("cannot create {}: {e}", dir.display())))?;
    let real = std::fs::canonicalize(&dir).map_err(|e| broken(e.to_string()))?;
    let base = std::fs::canonicalize(&base).map_err(|e| broken(e.to_string()))?;
    if !real.starts_with(base.join(&name)) {
        return Err(broken(format!(
            "{} leads outside {} (a symlink?)",
            dir.display(),
            base.display()
        )));
    }
    let roots: Vec<PathBuf> = profile
        .cwd_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    if !profile.cwd_roots.is_empty() && !roots.iter().any(|r| real.starts_with(r)) {
        return Err(broken(format!(
            "{} is not under the profile's cwd_roots",
            real.display()
        )));
    }
    let Some(asked) = asked else {
        return Ok(Some(real));
    };
    let path = std::fs::canonicalize(asked)
        .ok()
        .filter(|p| p.is_dir() && p.starts_with(&real))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "cwd {asked:?} is not an existing directory inside this owner's working directory"
            ))
        })?;
    Ok(Some(path))
}

/// A restored session's history as memory starts with it.
pub(super) enum History {
    /// Every message, read from the store, and the version of the stored
    /// usage sum (0 for none).
    Loaded(Vec<Message>, u64),
    /// None: all `count` messages stay in the store, whose usage sum is `usage`.
    InStore {
        /// How many messages it has.
        count: usize,
        /// Their usage sum.
        usage: crate::store::UsageMark,
    },
}
