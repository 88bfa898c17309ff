//! The registry in cluster mode (SPEC §8): several gateways on one
//! PostgreSQL store. A node keeps in memory only the sessions whose lease
//! it holds (their children run here); every other session is read from
//! the store, and what changes it goes to its holder through the store
//! ([`crate::cluster`]).
//!
//! - A node takes a session ([`Registry::attach`]) when it must run
//!   something for it and nobody else holds it: a message posted here, an
//!   interrupt, a `PATCH`, a delete, or work a dead node left (the
//!   [`crate::cluster`] sweeper). Taking it reads it back from the store as
//!   a restart does, except that queued messages run here.
//! - It lets it go ([`Registry::detach`]) when its idle child is reaped (the
//!   lease is given back) or when another node took it (the child ends at
//!   once; the store already refuses this node's writes).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use super::Registry;
use crate::auth::Caller;
use crate::config::AgentProfile;
use crate::error::ApiError;
use crate::model::{FailureCode, Message, MessageError, MessageStatus, Session, SessionState};
use crate::session::{CloseReason, SessionHandle};
use crate::store::{Lease, SessionRecord, StoreError};

/// Where a request for a session goes.
pub enum Located {
    /// Its child runs here (or it was taken here for this request).
    Here(SessionHandle),
    /// Another node holds it, or nobody does and the request only reads.
    Elsewhere(Box<Remote>),
}

impl Located {
    /// The session's id.
    pub fn id(&self) -> Uuid {
        match self {
            Located::Here(h) => h.id(),
            Located::Elsewhere(r) => r.record.id,
        }
    }

    /// The session's profile.
    pub fn profile(&self) -> Arc<AgentProfile> {
        match self {
            Located::Here(h) => h.shared.profile.clone(),
            Located::Elsewhere(r) => r.profile.clone(),
        }
    }
}

/// A session as the store has it, on a node that does not hold it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Its record.
    pub record: SessionRecord,
    /// Who holds it.
    pub lease: Option<Lease>,
    /// Its profile.
    pub profile: Arc<AgentProfile>,
}

impl Remote {
    /// The live holder, if there is one.
    pub fn holder(&self) -> Option<&str> {
        self.lease
            .as_ref()
            .filter(|l| l.live)
            .map(|l| l.node.as_str())
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.record.closed.is_some()
    }
}

impl Registry {
    /// Finds session `id` for `caller`. Without a cluster, the local one.
    /// In cluster mode, with `take`, a session nobody holds is taken here
    /// (a request that must run something for it); without, it is read from
    /// the store. Another owner's session is 404, like a missing one.
    pub async fn locate(
        self: &Arc<Self>,
        id: &str,
        caller: &Caller,
        take: bool,
    ) -> Result<Located, ApiError> {
        if self.cluster.is_none() {
            return self.get(id, caller).map(Located::Here);
        }
        if let Ok(h) = self.get(id, caller) {
            return Ok(Located::Here(h));
        }
        let missing = || ApiError::NotFound(format!("no session {id}"));
        let uuid = Uuid::parse_str(id).map_err(|_| missing())?;
        for _ in 0..3 {
            let (record, _, lease) = self.store.load_session(uuid).await?.ok_or_else(missing)?;
            if !caller.may_see(record.owner.as_deref()) {
                return Err(missing());
            }
            let profile = self
                .config
                .profiles
                .get(&record.agent)
                .cloned()
                .ok_or_else(|| {
                    ApiError::Internal(format!("profile {:?} no longer exists", record.agent))
                })?;
            let remote = Remote {
                record,
                lease,
                profile,
            };
            if !take || remote.is_closed() || remote.holder().is_some() {
                return Ok(Located::Elsewhere(Box::new(remote)));
            }
            if let Some(h) = self.attach(uuid).await? {
                return Ok(Located::Here(h));
            }
            // Another node took it in the meantime: look again.
        }
        Err(ApiError::Unavailable(format!(
            "session {id} is moving between nodes; retry"
        )))
    }

    /// Takes session `id` onto this node if nobody holds it: its lease, then
    /// its record, history and event log as a restart reads them. A message
    /// that was running on the previous holder fails `gateway_lost`; queued
    /// ones, and its inbox, run here. `None`: another node holds it.
    pub async fn attach(self: &Arc<Self>, id: Uuid) -> Result<Option<SessionHandle>, ApiError> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(self.sessions.get(&id).map(|h| h.clone()));
        };
        let guard = self.attaching.lock().await;
        if let Some(h) = self.sessions.get(&id).map(|h| h.clone()) {
            return Ok(Some(h));
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable("the gateway is shutting down".into()));
        }
        if self.store.acquire(id, cluster.ttl).await?.is_none() {
            return Ok(None);
        }
        let loaded = self.load_attached(id).await;
        let (handle, queued) = match loaded {
            Ok(Some(found)) => found,
            Ok(None) => {
                let _ = self.store.release(id).await;
                return Err(ApiError::NotFound(format!("no session {id}")));
            }
            Err(e) => {
                let _ = self.store.release(id).await;
                return Err(e.into());
            }
        };
        tracing::info!(session_id = %id, node = %cluster.node, queued = queued.len(), "session taken onto this node");
        for m in queued {
            if let Err(e) = handle.adopt(m).await {
                tracing::warn!(session_id = %id, error = %e, "a queued message could not be taken");
            }
        }
        self.take_inbox_locked(&handle).await;
        drop(guard);
        Ok(Some(handle))
    }

    /// Reads session `id` back for [`Registry::attach`]: the handle, and
    /// its queued messages (to be queued again, in order).
    async fn load_attached(
        self: &Arc<Self>,
        id: Uuid,
    ) -> Result<Option<(SessionHandle, Vec<Message>)>, StoreError> {
        let Some((record, ceiling, _)) = self.store.load_session(id).await? else {
            return Ok(None);
        };
        let Some(profile) = self.config.profiles.get(&record.agent).cloned() else {
            return Ok(None);
        };
        self.end_previous_child(id).await?;
        let mut messages = self.store.load_messages(id).await?;
        let mut lost = Vec::new();
        for (ord, m) in messages.iter_mut().enumerate() {
            if m.status == MessageStatus::Running {
                m.status = MessageStatus::Failed;
                m.error = Some(MessageError {
                    code: FailureCode::GatewayLost,
                    detail: "the node running this message stopped".into(),
                });
                m.finished_at = Some(OffsetDateTime::now_utc());
                self.store.save_message(ord as u64, m, None).await?;
                lost.push(m.clone());
            }
        }
        // Queued messages are the last ones: they are queued again below
        // and get their places back.
        let queued: Vec<Message> = messages
            .iter()
            .filter(|m| m.status == MessageStatus::Queued)
            .cloned()
            .collect();
        messages.retain(|m| m.status != MessageStatus::Queued);
        let log = self.reopen_log(id, ceiling, &lost).await?;
        let shared = self.restored_shared(
            &record,
            profile,
            super::History::Loaded(messages, 0),
            log,
            SessionState::Suspended,
            Duration::ZERO,
        );
        self.reserved.fetch_add(1, Ordering::SeqCst);
        if let Some(owner) = &record.owner {
            let _ = self.take_owner_place(owner, None);
        }
        Ok(Some((self.launch(shared), queued)))
    }

    /// The child a dead node on this machine left for session `id` (a
    /// `kill -9`: its group, grandchildren included, may still run) is ended
    /// before this node starts its own; the record would be overwritten by
    /// the new child's otherwise. A live node's child (one stopped past its
    /// lease) is that node's to end; another machine's is out of reach
    /// (there the node's container or unit takes its processes with it).
    async fn end_previous_child(&self, id: Uuid) -> Result<(), StoreError> {
        use crate::process::leftovers::{Gateway, Leftover};
        let Some(child) = self
            .store
            .load_children()
            .await?
            .into_iter()
            .find(|c| c.session_id == id)
        else {
            return Ok(());
        };
        let gateway = Gateway {
            host: child.host.clone(),
            pid: child.gateway_pid,
            start_time: child.gateway_start,
        };
        if !gateway.is_gone() {
            return Ok(());
        }
        let group = [Leftover {
            pid: child.pid,
            start_time: child.start_time,
        }];
        tokio::spawn(async move {
            let ended = crate::process::leftovers::end(&group, Duration::from_secs(3)).await;
            if ended > 0 {
                tracing::info!(session_id = %id, pgid = group[0].pid, ended, "ended the child a dead node left");
            }
        });
        self.store.forget_child(id, child.pid).await
    }

    /// Queues session `id`'s inbox (messages posted on other nodes) if it
    /// is held here.
    pub async fn take_inbox(self: &Arc<Self>, id: Uuid) {
        let Some(h) = self.sessions.get(&id).map(|h| h.clone()) else {
            return;
        };
        let _guard = self.attaching.lock().await;
        self.take_inbox_locked(&h).await;
    }

    async fn take_inbox_locked(&self, h: &SessionHandle) {
        let inbox = match self.store.inbox(h.id()).await {
            Ok(inbox) => inbox,
            Err(e) => {
                tracing::warn!(session_id = %h.id(), error = %e, "cannot read the inbox");
                return;
            }
        };
        for m in inbox {
            let id = m.id;
            // Queued already (a holder that died before clearing its inbox),
            // perhaps finished and left memory for the store since.
            let known = match self.session_message(&h.shared, id).await {
                Ok(known) => known.is_some(),
                Err(e) => {
                    tracing::warn!(session_id = %h.id(), error = %e, "cannot read the history");
                    return;
                }
            };
            if !known {
                if let Err(e) = h.adopt(m).await {
                    tracing::warn!(session_id = %h.id(), message_id = %id, error = %e, "cannot queue a message from the inbox");
                    continue;
                }
            }
            if let Err(e) = self.store.forget_inbox(id).await {
                tracing::warn!(session_id = %h.id(), error = %e, "cannot clear the inbox");
            }
        }
    }

    /// Session `id` leaves this node. `lost`: another node took its lease
    /// (nothing more is written for it, its child ends at once); otherwise
    /// the lease is given back after the session task has ended.
    pub async fn detach(&self, id: Uuid, lost: bool) {
        if lost {
            self.store.drop_lease(id);
        }
        if let Some((_, h)) = self.sessions.remove(&id) {
            h.close(CloseReason::Detached).await;
            self.release(&h.shared);
        }
        if !lost {
            if let Err(e) = self.store.release(id).await {
                tracing::warn!(session_id = %id, error = %e, "cannot give a lease back; it expires by itself");
            }
        }
    }

    /// Deletes session `r`, which no node holds: this node takes its lease
    /// for the delete (every write is fenced).
    pub async fn delete_unheld(&self, r: &Remote) -> Result<(), ApiError> {
        let id = r.record.id;
        let ttl = self
            .cluster
            .as_ref()
            .map_or(Duration::from_secs(15), |c| c.ttl);
        if self.store.acquire(id, ttl).await?.is_none() {
            return Err(ApiError::Unavailable(format!(
                "session {id} is moving between nodes; retry"
            )));
        }
        self.store.delete_session(id).await?;
        self.store.drop_lease(id);
        Ok(())
    }

    /// Session `r` as the API shows it, from the store.
    pub async fn remote_view(&self, r: &Remote) -> Result<Session, ApiError> {
        let messages = self.store.load_messages(r.record.id).await?;
        Ok(view_of(r, &messages))
    }

    /// Every session `caller` may see (`owner`: only that owner's), this
    /// node's as it has them and the others' from the store.
    pub async fn list_cluster(
        &self,
        caller: &Caller,
        owner: Option<&str>,
    ) -> Result<Vec<Session>, ApiError> {
        let records = self.store.load_sessions().await?;
        let leases = self.store.leases().await?;
        let mut out = Vec::new();
        for (record, _) in records {
            let theirs = record.owner.as_deref();
            if !caller.may_see(theirs) || owner.is_some_and(|o| theirs != Some(o)) {
                continue;
            }
            if let Some(h) = self.sessions.get(&record.id).map(|h| h.clone()) {
                out.push(h.shared.view());
                continue;
            }
            let Some(profile) = self.config.profiles.get(&record.agent).cloned() else {
                continue;
            };
            let lease = leases.get(&record.id).cloned();
            let remote = Remote {
                record,
                lease,
                profile,
            };
            out.push(self.remote_view(&remote).await?);
        }
        Ok(out)
    }

    /// Session `r`'s messages from the store (a running one with its reply
    /// so far, from its stored deltas; then its inbox, queued).
    pub async fn remote_messages(&self, r: &Remote) -> Result<Vec<Message>, ApiError> {
        let id = r.record.id;
        let mut messages = self.store.load_messages(id).await?;
        if messages.iter().any(|m| m.status == MessageStatus::Running) {
            let events = self.store.load_events(id).await?;
            for m in messages
                .iter_mut()
                .filter(|m| m.status == MessageStatus::Running)
            {
                m.output = events
                    .iter()
                    .filter(|e| e.name == "message.delta" && e.message_id == Some(m.id))
                    .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.data).ok())
                    .filter_map(|d| d["text"].as_str().map(str::to_string))
                    .collect();
            }
        }
        let inbox = self.store.inbox(id).await?;
        let known: std::collections::HashSet<Uuid> = messages.iter().map(|m| m.id).collect();
        messages.extend(inbox.into_iter().filter(|m| !known.contains(&m.id)));
        Ok(messages)
    }

    /// Session `r`'s message `mid` from the store.
    pub async fn remote_message(&self, r: &Remote, mid: Uuid) -> Result<Option<Message>, ApiError> {
        Ok(self
            .remote_messages(r)
            .await?
            .into_iter()
            .find(|m| m.id == mid))
    }

    /// At start-up in cluster mode: leases recorded for this node id are a
    /// previous process's (its children are gone): they are dropped, and
    /// the sessions that had work are taken back at once, as a restart of a
    /// single gateway would (the sweeper takes the rest when they need it).
    pub(super) async fn restore_node(self: &Arc<Self>) -> Result<usize, StoreError> {
        let previous = self.store.drop_node_leases().await?;
        let mut taken = 0;
        for id in previous {
            match self.attach(id).await {
                Ok(Some(_)) => taken += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "cannot take back a session")
                }
            }
        }
        Ok(taken)
    }

    /// A fork of session `parent` held by another node (or none): the same
    /// as [`Registry::fork`], from what the store has of it.
    pub async fn fork_remote(
        self: &Arc<Self>,
        parent: &Remote,
        req: crate::model::ForkSession,
        caller: &Caller,
    ) -> Result<SessionHandle, ApiError> {
        let profile = parent.profile.clone();
        if profile.protocol != crate::config::ProtocolKind::ClaudeStreamJson {
            return Err(ApiError::BadRequest(format!(
                "sessions of profile {:?} cannot be forked (protocol {}; claude-stream-json only)",
                profile.name,
                profile.protocol.as_str()
            )));
        }
        let record = &parent.record;
        let Some(conversation) = record.agent_session_id.clone() else {
            return Err(ApiError::Conflict(
                "the session has no agent conversation to fork yet: send it a message first".into(),
            ));
        };
        let messages: Vec<Message> = self
            .store
            .load_messages(record.id)
            .await?
            .into_iter()
            .filter(|m| m.status.is_terminal())
            .collect();
        let seed = super::Seed {
            title: req.title.or(record.title.clone()),
            metadata: req.metadata.or(record.metadata.clone()),
            options: serde_json::from_value(record.options.clone()).unwrap_or_default(),
            messages,
            agent_session_id: Some(conversation.clone()),
            fork_from: Some(conversation),
            last_total_cost: None,
            forked_from: Some(record.id),
            owner: record.owner.clone(),
            limited: !caller.is_operator(),
        };
        let cwd = record.cwd.as_ref().map(std::path::PathBuf::from);
        self.insert(profile, cwd, seed).await
    }
}

/// The API's view of a session held elsewhere: its state is what the store
/// can tell (closed; busy or idle while a node holds it; else suspended).
fn view_of(r: &Remote, messages: &[Message]) -> Session {
    let record = &r.record;
    let running = messages.iter().any(|m| m.status == MessageStatus::Running);
    let state = if r.is_closed() {
        SessionState::Closed
    } else if r.holder().is_some() {
        if running {
            SessionState::Busy
        } else {
            SessionState::Idle
        }
    } else {
        SessionState::Suspended
    };
    Session {
        id: record.id,
        agent: record.agent.clone(),
        state,
        created_at: record.created_at,
        last_activity_at: record.last_activity_at,
        idle_deadline: None,
        pid: None,
        message_count: messages.len(),
        queued: messages
            .iter()
            .filter(|m| m.status == MessageStatus::Queued)
            .count(),
        title: record.title.clone(),
        metadata: record.metadata.clone(),
        agent_session_id: record.agent_session_id.clone(),
        cwd: record.cwd.clone(),
        options: serde_json::from_value(record.options.clone()).unwrap_or_default(),
        usage: crate::session::sum_usage(messages),
        forked_from: record.forked_from,
        owner: record.owner.clone(),
        node: r.holder().map(str::to_string),
    }
}
