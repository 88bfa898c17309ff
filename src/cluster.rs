//! Several gateways on one PostgreSQL store (SPEC §8): this node's side.
//!
//! The store is the source of truth and the queue; PostgreSQL's
//! `LISTEN/NOTIFY` only wakes nodes early, and every wait also polls, so a
//! lost notification costs latency, never correctness.
//!
//! - **Leases** ([`run`]'s renewal loop): every lease this node holds is
//!   pushed forward every third of `--lease-ttl`. One missing from the
//!   answer was taken by another node (this one was stopped or cut off past
//!   the TTL): its session leaves at once, child ended, and the store
//!   refuses its writes (fencing by generation, [`crate::store::Fence`]).
//!   A node that cannot reach the store for a whole TTL gives up all of
//!   them the same way.
//! - **Messages** posted on a node that does not hold the session are
//!   stored in its inbox (acknowledged = stored) and the holder is woken;
//!   the holder queues them ([`crate::session::Registry::take_inbox`]).
//! - **Commands** (interrupt, permission answer, `PATCH`, delete) for a
//!   session held elsewhere are stored for the holder, which runs them and
//!   stores the answer ([`Cluster::call`]).
//! - **Events**: in cluster mode every session event stream reads the store
//!   ([`StoreFeed`]), so ids and `Last-Event-ID` are the same on every node.
//! - **Failover** (the sweeper): sessions with work (queued or running
//!   messages, an inbox) and no live lease are taken by the first node that
//!   finds them, within a second of the lease's expiry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::{PermissionDecision, UpdateSession};
use crate::session::{Item, Registry, StoredEvent};
use crate::store::Store;

/// How often a node looks at the store without being woken.
const POLL: Duration = Duration::from_secs(1);
/// How often an idle event stream reads the store without being woken
/// (a notification is lost only while the listener reconnects).
const FEED_POLL: Duration = Duration::from_secs(3);
/// How long a command waits for its holder's answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// This node's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id.
    pub node: String,
    /// `--lease-ttl`.
    pub ttl: Duration,
    /// Sessions with new events in the store (from `agentgate_events`).
    events: broadcast::Sender<Uuid>,
    /// Commands this node waits an answer for.
    replies: DashMap<Uuid, Arc<Notify>>,
}

/// What a node asks a session's holder to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// `POST …/interrupt`.
    Interrupt,
    /// `POST …/permissions/{request_id}`.
    Permission {
        /// The request answered.
        request_id: String,
        /// The answer.
        decision: PermissionDecision,
    },
    /// `PATCH /sessions/{id}`.
    Update {
        /// The change.
        update: UpdateSession,
    },
    /// `DELETE /sessions/{id}`.
    Delete,
}

/// The holder's answer: an HTTP status and a body (the success value, or
/// `{"detail": …}` for an error).
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn of(result: Result<Value, ApiError>) -> Answer {
        match result {
            Ok(body) => Answer { status: 200, body },
            Err(e) => Answer {
                status: e.status().as_u16(),
                body: serde_json::json!({"detail": e.to_string()}),
            },
        }
    }

    /// The answer as the requesting node's result.
    fn into_result(self) -> Result<Value, ApiError> {
        if self.status == 200 {
            return Ok(self.body);
        }
        let detail = self.body["detail"].as_str().unwrap_or_default().to_string();
        Err(match self.status {
            400 => ApiError::BadRequest(detail),
            404 => ApiError::NotFound(detail),
            409 => ApiError::Conflict(detail),
            410 => ApiError::Gone(detail),
            502 => ApiError::AgentRefused(detail),
            503 => ApiError::Unavailable(detail),
            _ => ApiError::Internal(detail),
        })
    }
}

impl Cluster {
    /// This node's part, before anything runs.
    pub fn new(node: &str, ttl: Duration) -> Cluster {
        Cluster {
            node: node.to_string(),
            ttl,
            events: broadcast::channel(1024).0,
            replies: DashMap::new(),
        }
    }

    /// Runs `command` on session `session`'s holder `node` and returns its
    /// answer. A holder that does not claim it within the timeout (dead,
    /// its lease about to expire) gets it withdrawn: 503, and the client
    /// retries once the session has moved.
    pub async fn call(
        &self,
        store: &Store,
        node: &str,
        session: Uuid,
        command: &Command,
    ) -> Result<Value, ApiError> {
        let id = Uuid::new_v4();
        let woken = Arc::new(Notify::new());
        self.replies.insert(id, woken.clone());
        let result = async {
            let body = serde_json::to_string(command).expect("commands serialise");
            store.push_command(id, session, node, &body).await?;
            let mut deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
            let mut extended = false;
            loop {
                let notified = woken.notified();
                if let Some(reply) = store.command_reply(id).await? {
                    let answer: Answer = serde_json::from_str(&reply)
                        .map_err(|e| ApiError::Internal(format!("a node's answer: {e}")))?;
                    return answer.into_result();
                }
                if tokio::time::Instant::now() >= deadline {
                    let withdrawn = store.withdraw_command(id).await.unwrap_or(false);
                    if withdrawn || extended {
                        return Err(ApiError::Unavailable(format!(
                            "node {node} holds session {session} but did not answer; retry shortly"
                        )));
                    }
                    // Claimed: it runs; give it one more while.
                    extended = true;
                    deadline += COMMAND_TIMEOUT;
                }
                let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
            }
        }
        .await;
        self.replies.remove(&id);
        result
    }
}

/// Runs this node's background work until `shutdown`: the listener, lease
/// renewal, commands, inboxes and the sweeper.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let Some(cluster) = registry.cluster.clone() else {
        return;
    };
    let listener = tokio::spawn(listen(registry.clone(), shutdown.clone()));
    // Renewal has a task of its own: no other work (a takeover, a slow
    // inbox) may delay it past the TTL and lose leases for nothing.
    let renewer = {
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut renew = tokio::time::interval(cluster.ttl / 3);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_renewed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = renew.tick() => renew_leases(&registry, &cluster, &mut last_renewed).await,
                }
            }
        })
    };
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls = 0u64;
    let cleaning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = poll.tick() => {
                tokio::spawn(run_commands(registry.clone()));
                // Inboxes whose notification was missed.
                if let Ok(waiting) = registry.store.inbox_sessions().await {
                    for id in waiting.into_iter().filter(|id| registry.store.holds(*id)) {
                        registry.take_inbox(id).await;
                    }
                }
                sweep(&registry).await;
                polls += 1;
                if polls.is_multiple_of(5) {
                    clean_up_dead_nodes(&registry, &cleaning);
                }
            }
        }
    }
    listener.abort();
    let _ = renewer.await;
}

/// Pushes this node's leases forward; a session whose lease was taken
/// leaves at once.
async fn renew_leases(
    registry: &Arc<Registry>,
    cluster: &Cluster,
    last_renewed: &mut tokio::time::Instant,
) {
    let held = registry.store.held();
    match registry.store.renew(cluster.ttl).await {
        Ok(kept) => {
            *last_renewed = tokio::time::Instant::now();
            // Not renewed: taken by another node (a lease released meanwhile
            // is no longer held and was not taken).
            let mut lost: Vec<Uuid> = held
                .into_iter()
                .filter(|id| !kept.contains(id) && registry.store.holds(*id))
                .collect();
            // A session still here whose lease a refused (fenced) write
            // already dropped.
            for h in registry.list() {
                if !registry.store.holds(h.id()) && !lost.contains(&h.id()) {
                    lost.push(h.id());
                }
            }
            for id in lost {
                tracing::warn!(session_id = %id, node = %cluster.node, "lease lost to another node: ending the child here");
                registry.metrics.lease_lost();
                // The store already refuses its writes; the child ends beside.
                registry.store.drop_lease(id);
                let registry = registry.clone();
                tokio::spawn(async move { registry.detach(id, true).await });
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot renew leases");
            if last_renewed.elapsed() >= cluster.ttl {
                tracing::error!("no lease renewed for a whole TTL: every session leaves this node");
                for id in held {
                    registry.metrics.lease_lost();
                    registry.detach(id, true).await;
                }
            }
        }
    }
}

/// Ends the process groups of nodes on this machine that died (`kill -9`)
/// while their children lived: the same clean-up a gateway does at start-up
/// ([`crate::process::leftovers`]), so a failover leaves nothing of the
/// dead node running even when no gateway is restarted. In the background,
/// one at a time (a group gets a grace period).
fn clean_up_dead_nodes(registry: &Arc<Registry>, cleaning: &Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    if cleaning.swap(true, Ordering::SeqCst) {
        return;
    }
    let store = registry.store.clone();
    let cleaning = cleaning.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::end_leftover_children(&store).await {
            tracing::warn!(error = %e, "cannot look for children of dead nodes");
        }
        cleaning.store(false, Ordering::SeqCst);
    });
}

/// Takes sessions with work that no live node holds.
async fn sweep(registry: &Arc<Registry>) {
    if registry.is_shutting_down() {
        return;
    }
    let orphans = match registry.store.orphans().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for orphaned sessions");
            return;
        }
    };
    for id in orphans {
        match registry.attach(id).await {
            Ok(Some(_)) => {
                tracing::info!(session_id = %id, "took over a session with work left by another node")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(session_id = %id, error = %e, "cannot take over a session"),
        }
    }
}

/// Runs the commands other nodes stored for this one.
async fn run_commands(registry: Arc<Registry>) {
    let commands = match registry.store.claim_commands().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read commands");
            return;
        }
    };
    for (id, session, body) in commands {
        let registry = registry.clone();
        tokio::spawn(async move {
            let result = match serde_json::from_str::<Command>(&body) {
                Ok(command) => execute(&registry, session, command).await,
                Err(e) => Err(ApiError::BadRequest(format!("an unknown command: {e}"))),
            };
            let answer = serde_json::to_string(&Answer::of(result)).expect("answers serialise");
            if let Err(e) = registry.store.answer_command(id, &answer).await {
                tracing::warn!(error = %e, "cannot answer a command");
            }
        });
    }
}

/// Runs one command for session `session`, held here.
async fn execute(
    registry: &Arc<Registry>,
    session: Uuid,
    command: Command,
) -> Result<Value, ApiError> {
    let operator = crate::auth::Caller::OPERATOR;
    let id = session.to_string();
    let handle = registry.get(&id, &operator).map_err(|_| {
        ApiError::Unavailable(format!(
            "session {id} moved while the command was sent; retry"
        ))
    })?;
    match command {
        Command::Interrupt => {
            let mid = handle.interrupt().await?;
            let message = registry.session_message(&handle.shared, mid).await?;
            Ok(serde_json::to_value(message).unwrap_or_default())
        }
        Command::Permission {
            request_id,
            decision,
        } => {
            handle.permission(request_id, decision).await?;
            Ok(Value::Null)
        }
        Command::Update { update } => {
            handle.update(update).await?;
            Ok(serde_json::to_value(handle.shared.view()).unwrap_or_default())
        }
        Command::Delete => {
            registry.delete(&id, &operator).await?;
            Ok(Value::Null)
        }
    }
}

/// Listens for the nodes' notifications (its own connection, reconnected
/// by sqlx after a failure; the polls cover what is missed meanwhile).
async fn listen(registry: Arc<Registry>, shutdown: CancellationToken) {
    let Some(cluster) = registry.cluster.clone() else {
        return;
    };
    let Some(url) = registry.store.postgres_url().map(str::to_string) else {
        return;
    };
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other nodes; polling meanwhile");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(POLL) => continue,
                }
            }
        };
        if let Err(e) = listener
            .listen_all(crate::store::CHANNELS.iter().copied())
            .await
        {
            tracing::warn!(error = %e, "cannot listen for other nodes; polling meanwhile");
            continue;
        }
        loop {
            let note = tokio::select! {
                _ = shutdown.cancelled() => return,
                note = listener.recv() => note,
            };
            let note = match note {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the notification connection");
                    break;
                }
            };
            let payload = note.payload();
            match note.channel() {
                "agentgate_events" => {
                    if let Ok(id) = Uuid::parse_str(payload) {
                        let _ = cluster.events.send(id);
                    }
                }
                "agentgate_inbox" => {
                    if let Ok(id) = Uuid::parse_str(payload) {
                        if registry.store.holds(id) {
                            let registry = registry.clone();
                            tokio::spawn(async move { registry.take_inbox(id).await });
                        }
                    }
                }
                "agentgate_commands" if payload == cluster.node => {
                    tokio::spawn(run_commands(registry.clone()));
                }
                "agentgate_replies" => {
                    if let Some(woken) = Uuid::parse_str(payload)
                        .ok()
                        .and_then(|id| cluster.replies.get(&id).map(|w| w.clone()))
                    {
                        woken.notify_one();
                    }
                }
                _ => {}
            }
        }
    }
}

/// A session's events read from the store, for an SSE stream in cluster
/// mode: what follows the cursor, then each new batch as its holder writes
/// it (woken by `agentgate_events`, polling besides). It ends after
/// `session.closed`, or once the session is gone from the store.
pub struct StoreFeed {
    store: Arc<Store>,
    id: Uuid,
    cursor: u64,
    first: bool,
    done: bool,
    pending: VecDeque<Item>,
    wake: broadcast::Receiver<Uuid>,
}

impl StoreFeed {
    /// Session `id`'s events after `after`.
    pub fn new(registry: &Registry, id: Uuid, after: u64) -> Option<StoreFeed> {
        let cluster = registry.cluster.as_ref()?;
        Some(StoreFeed {
            store: registry.store.clone(),
            id,
            cursor: after,
            first: true,
            done: false,
            pending: VecDeque::new(),
            wake: cluster.events.subscribe(),
        })
    }

    /// The next item; `None` at the end.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            match self
                .store
                .load_events_after(self.id, self.cursor, 256)
                .await
            {
                Ok(events) if !events.is_empty() => {
                    if std::mem::take(&mut self.first) && self.cursor + 1 < events[0].seq {
                        // Older events were pruned by the replay limits, or
                        // lost with a node that died before writing them.
                        self.pending.push_back(Item::Gap {
                            from: self.cursor + 1,
                            to: events[0].seq - 1,
                        });
                    }
                    for e in events {
                        self.cursor = e.seq;
                        if e.name == "session.closed" {
                            self.done = true;
                        }
                        self.pending
                            .push_back(Item::Event(Arc::new(StoredEvent::read_back(
                                e.seq,
                                &e.name,
                                e.message_id,
                                &e.data,
                            ))));
                    }
                    continue;
                }
                Ok(_) => self.first = false,
                Err(e) => tracing::warn!(session_id = %self.id, error = %e, "cannot read events"),
            }
            // Nothing new: wait for the holder's next batch.
            let deadline = tokio::time::Instant::now() + FEED_POLL;
            loop {
                match tokio::time::timeout_at(deadline, self.wake.recv()).await {
                    Ok(Ok(id)) if id != self.id => continue,
                    Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                    Err(_) => {
                        // A quiet while: is the session still there? One
                        // deleted on its holder took its log along before
                        // its `session.closed` was written: say it here.
                        if let Ok(None) = self.store.load_session(self.id).await {
                            self.done = true;
                            self.pending
                                .push_back(Item::Event(Arc::new(StoredEvent::read_back(
                                    self.cursor + 1,
                                    "session.closed",
                                    None,
                                    r#"{"reason":"deleted"}"#,
                                ))));
                        }
                        break;
                    }
                }
            }
        }
    }
}
