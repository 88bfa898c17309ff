//! What several gateways on one PostgreSQL share besides sessions (SPEC §8):
//! leases with fencing, the inbox of messages posted on a node that does
//! not hold the session, commands for the holder and their answers, and
//! the notifications that wake the nodes.
//!
//! Times are the database's clock (milliseconds since the epoch), never a
//! node's: two nodes whose clocks disagree still agree on who holds a lease.
//! These queries are PostgreSQL's (`FOR SHARE`, `RETURNING`, `pg_notify`):
//! only a `postgres://` store runs as a cluster.

use std::collections::HashMap;

use dashmap::DashMap;
use sqlx::{AnyPool, Row};
use uuid::Uuid;

use super::writer::Writer;
use super::{bounded, event_of, EventRecord, SessionRecord, Store, StoreError};
use crate::model::Message;

/// The database's clock in milliseconds. A lease is live while
/// `expires_at > now` and expired from `expires_at <= now` on (a renewal of
/// zero ends it at once, within the same millisecond too).
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// Channels the nodes listen on. The payload is a session id, except on
/// `commands` (the node that must run one) and `replies` (a command id).
pub const CHANNELS: [&str; 4] = [
    "agentgate_events",
    "agentgate_inbox",
    "agentgate_commands",
    "agentgate_replies",
];

/// The leases this node holds, with their generations. A session missing
/// here gets no write from this node: every write first checks, in its own
/// transaction, that the lease row still names this node and generation
/// (`FOR SHARE`, so a node taking the lease waits for that write to end and
/// every later write of the old holder fails).
#[derive(Debug)]
pub struct Fence {
    /// This node's id.
    pub node: String,
    pub(super) held: DashMap<Uuid, i64>,
}

/// Who holds a session's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's node id.
    pub node: String,
    /// Its generation.
    pub generation: i64,
    /// Whether it has not expired.
    pub live: bool,
}

impl Store {
    /// Turns on cluster mode for node `node`: writes are fenced by leases.
    pub fn enable_fence(&self, node: &str) {
        let _ = self.fence.set(Fence {
            node: node.to_string(),
            held: DashMap::new(),
        });
    }

    /// This node's id in cluster mode.
    pub fn node_id(&self) -> Option<&str> {
        self.fence.get().map(|f| f.node.as_str())
    }

    /// The sessions whose leases this node holds.
    pub fn held(&self) -> Vec<Uuid> {
        self.fence
            .get()
            .map(|f| f.held.iter().map(|e| *e.key()).collect())
            .unwrap_or_default()
    }

    /// Whether this node holds session `id`'s lease.
    pub fn holds(&self, id: Uuid) -> bool {
        self.fence.get().is_some_and(|f| f.held.contains_key(&id))
    }

    /// Forgets session `id`'s lease at once (it was lost): no write for it
    /// leaves this node from now on.
    pub fn drop_lease(&self, id: Uuid) {
        if let Some(f) = self.fence.get() {
            f.held.remove(&id);
        }
    }

    /// Runs `stmts` as one write for session `id`: all or nothing. On
    /// SQLite (one gateway, no leases) through the group commit, one call
    /// to the database per transaction (see `batch::Batcher`); otherwise statement by statement in what
    /// [`Store::begin_for`] opens (with the lease check in cluster mode).
    pub(super) async fn write(
        &self,
        pool: &AnyPool,
        id: Uuid,
        stmts: Vec<super::batch::Stmt>,
    ) -> Result<(), StoreError> {
        if let (Some(batcher), None) = (&self.batcher, self.fence.get()) {
            return batcher.write(stmts).await;
        }
        let mut tx = self.begin_for(pool, id, stmts.len() > 1).await?;
        for s in stmts {
            s.execute(&mut tx).await?;
        }
        tx.commit().await
    }

    /// Where a write to session `id` goes: in cluster mode a transaction
    /// that first checks this node's lease (and fails
    /// [`StoreError::Fenced`] without it); otherwise one transaction when
    /// `batch` (several statements) or on SQLite, else (a single statement
    /// on PostgreSQL) a plain connection.
    pub(super) async fn begin_for(
        &self,
        pool: &AnyPool,
        id: Uuid,
        batch: bool,
    ) -> Result<Writer, StoreError> {
        let Some(f) = self.fence.get() else {
            // On SQLite every write is a transaction of its own, even a
            // single statement: see [`Writer`] for why.
            let sqlite = matches!(self.spec, super::StoreSpec::Sqlite(_));
            return Writer::open(pool, batch || sqlite, self.sqlite_turn.as_ref()).await;
        };
        let Some(generation) = f.held.get(&id).map(|g| *g) else {
            return Err(StoreError::Fenced(id));
        };
        let mut tx = Writer::open(pool, true, None).await?;
        let row = sqlx::query(
            "SELECT node_id FROM leases WHERE session_id = $1 AND node_id = $2 AND generation = $3 FOR SHARE",
        )
        .bind(id.to_string())
        .bind(&f.node)
        .bind(generation)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_none() {
            f.held.remove_if(&id, |_, g| *g == generation);
            tx.rollback().await?;
            return Err(StoreError::Fenced(id));
        }
        Ok(tx)
    }

    /// Takes session `id`'s lease for `ttl` if nobody holds it, it expired,
    /// or this node holds it already; a new generation each time. `None`:
    /// another node holds it.
    pub async fn acquire(
        &self,
        id: Uuid,
        ttl: std::time::Duration,
    ) -> Result<Option<i64>, StoreError> {
        let (Some(pool), Some(f)) = (&self.pool, self.fence.get()) else {
            return Ok(None);
        };
        bounded(async move {
            let row = sqlx::query(&format!(
                "INSERT INTO leases (session_id, node_id, generation, expires_at) \
                 VALUES ($1, $2, 1, {NOW_MS} + $3) \
                 ON CONFLICT (session_id) DO UPDATE SET node_id = excluded.node_id, \
                 generation = leases.generation + 1, expires_at = excluded.expires_at \
                 WHERE leases.expires_at <= {NOW_MS} OR leases.node_id = excluded.node_id \
                 RETURNING generation"
            ))
            .bind(id.to_string())
            .bind(&f.node)
            .bind(ttl.as_millis() as i64)
            .fetch_optional(pool)
            .await?;
            let generation = match row {
                Some(row) => row.try_get::<i64, _>(0)?,
                None => return Ok(None),
            };
            f.held.insert(id, generation);
            Ok(Some(generation))
        })
        .await
    }

    /// Pushes every lease this node holds `ttl` further; returns the ones
    /// it still holds (a lease missing from the answer was taken).
    pub async fn renew(&self, ttl: std::time::Duration) -> Result<Vec<Uuid>, StoreError> {
        let (Some(pool), Some(f)) = (&self.pool, self.fence.get()) else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows = sqlx::query(&format!(
                "UPDATE leases SET expires_at = {NOW_MS} + $2 WHERE node_id = $1 \
                 RETURNING session_id, generation"
            ))
            .bind(&f.node)
            .bind(ttl.as_millis() as i64)
            .fetch_all(pool)
            .await?;
            let mut mine = HashMap::new();
            for row in rows {
                let id: String = row.try_get(0)?;
                let generation: i64 = row.try_get(1)?;
                if let Ok(id) = Uuid::parse_str(&id) {
                    mine.insert(id, generation);
                }
            }
            Ok(f.held
                .iter()
                .filter(|e| mine.get(e.key()) == Some(e.value()))
                .map(|e| *e.key())
                .collect())
        })
        .await
    }

    /// Gives session `id`'s lease back (its child was reaped or the node
    /// stops): the next node that needs it takes it at once.
    pub async fn release(&self, id: Uuid) -> Result<(), StoreError> {
        let (Some(pool), Some(f)) = (&self.pool, self.fence.get()) else {
            return Ok(());
        };
        let Some((_, generation)) = f.held.remove(&id) else {
            return Ok(());
        };
        bounded(async move {
            sqlx::query(
                "DELETE FROM leases WHERE session_id = $1 AND node_id = $2 AND generation = $3",
            )
            .bind(id.to_string())
            .bind(&f.node)
            .bind(generation)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Drops every lease recorded for this node id: at start-up they are a
    /// previous process's, whose children are gone. Returns their sessions.
    pub async fn drop_node_leases(&self) -> Result<Vec<Uuid>, StoreError> {
        let (Some(pool), Some(f)) = (&self.pool, self.fence.get()) else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows = sqlx::query("DELETE FROM leases WHERE node_id = $1 RETURNING session_id")
                .bind(&f.node)
                .fetch_all(pool)
                .await?;
            Ok(uuids(&rows))
        })
        .await
    }

    /// Every lease, by session.
    pub async fn leases(&self) -> Result<HashMap<Uuid, Lease>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(HashMap::new());
        };
        bounded(async move {
            let rows = sqlx::query(&format!(
                "SELECT session_id, node_id, generation, expires_at > {NOW_MS} FROM leases"
            ))
            .fetch_all(pool)
            .await?;
            let mut out = HashMap::new();
            for row in rows {
                let id: String = row.try_get(0)?;
                if let Ok(id) = Uuid::parse_str(&id) {
                    out.insert(id, lease_of(&row, 1)?);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Session `id` with its event-id ceiling and its lease.
    pub async fn load_session(
        &self,
        id: Uuid,
    ) -> Result<Option<(SessionRecord, u64, Option<Lease>)>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        bounded(async move {
            let row = sqlx::query(&format!(
                "SELECT s.body, s.seq_ceiling, s.owner, l.node_id, l.generation, \
                 l.expires_at > {NOW_MS} FROM sessions s \
                 LEFT JOIN leases l ON l.session_id = s.id WHERE s.id = $1"
            ))
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let body: String = row.try_get(0)?;
            let ceiling: i64 = row.try_get(1)?;
            let owner: Option<String> = row.try_get(2)?;
            let record: SessionRecord =
                serde_json::from_str(&body).map_err(|e| StoreError::Query(e.to_string()))?;
            let node: Option<String> = row.try_get(3)?;
            let lease = match node {
                Some(_) => Some(lease_of(&row, 3)?),
                None => None,
            };
            Ok(Some((
                SessionRecord { owner, ..record },
                ceiling.max(0) as u64,
                lease,
            )))
        })
        .await
    }

    /// Session `id`'s stored events after `after`, oldest first, at most `limit`.
    pub async fn load_events_after(
        &self,
        id: Uuid,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows = sqlx::query(
                "SELECT seq, name, message_id, data FROM events \
                 WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(id.to_string())
            .bind(after as i64)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?;
            rows.iter().map(event_of).collect()
        })
        .await
    }

    /// The highest stored event id of session `id` (0 with none).
    pub async fn last_event_seq(&self, id: Uuid) -> Result<u64, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(0);
        };
        bounded(async move {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = $1")
                .bind(id.to_string())
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
        })
        .await
    }

    /// Stores message `m` in session `m.session_id`'s inbox (a node that
    /// does not hold the session acknowledges it so) and wakes the holder.
    pub async fn push_inbox(&self, m: &Message) -> Result<(), StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        bounded(async move {
            let body = serde_json::to_string(m).map_err(|e| StoreError::Query(e.to_string()))?;
            sqlx::query(&format!(
                "INSERT INTO inbox (id, session_id, body, created) VALUES ($1, $2, $3, {NOW_MS})"
            ))
            .bind(m.id.to_string())
            .bind(m.session_id.to_string())
            .bind(body)
            .execute(pool)
            .await?;
            self.notify("agentgate_inbox", &m.session_id.to_string())
                .await;
            Ok(())
        })
        .await
    }

    /// Session `id`'s inbox, oldest first, left in place: the holder deletes
    /// each message once its queue holds it ([`Store::forget_inbox`]), so a
    /// holder that dies in between loses none.
    pub async fn inbox(&self, id: Uuid) -> Result<Vec<Message>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows =
                sqlx::query("SELECT body FROM inbox WHERE session_id = $1 ORDER BY created, id")
                    .bind(id.to_string())
                    .fetch_all(pool)
                    .await?;
            Ok(rows
                .iter()
                .filter_map(|r| r.try_get::<String, _>(0).ok())
                .filter_map(|b| serde_json::from_str(&b).ok())
                .collect())
        })
        .await
    }

    /// The sessions that have messages in the inbox.
    pub async fn inbox_sessions(&self) -> Result<Vec<Uuid>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows = sqlx::query("SELECT DISTINCT session_id FROM inbox")
                .fetch_all(pool)
                .await?;
            Ok(uuids(&rows))
        })
        .await
    }

    /// Message `message` left the inbox (it is in its session's messages).
    pub async fn forget_inbox(&self, message: Uuid) -> Result<(), StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        bounded(async move {
            sqlx::query("DELETE FROM inbox WHERE id = $1")
                .bind(message.to_string())
                .execute(pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Sessions with work and no live lease: queued or running messages, or
    /// an inbox, left by a node that died (or never taken).
    pub async fn orphans(&self) -> Result<Vec<Uuid>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows = sqlx::query(&format!(
                "SELECT w.session_id FROM ( \
                   SELECT session_id FROM messages WHERE status IN ('queued', 'running') \
                   UNION SELECT session_id FROM inbox) w \
                 LEFT JOIN leases l ON l.session_id = w.session_id \
                 WHERE l.session_id IS NULL OR l.expires_at <= {NOW_MS}"
            ))
            .fetch_all(pool)
            .await?;
            Ok(uuids(&rows))
        })
        .await
    }

    /// Stores command `id` (JSON `body`) for session `session`'s holder
    /// `node`, and wakes it.
    pub async fn push_command(
        &self,
        id: Uuid,
        session: Uuid,
        node: &str,
        body: &str,
    ) -> Result<(), StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        bounded(async move {
            sqlx::query(
                "INSERT INTO commands (id, session_id, node_id, body) VALUES ($1, $2, $3, $4)",
            )
            .bind(id.to_string())
            .bind(session.to_string())
            .bind(node)
            .bind(body)
            .execute(pool)
            .await?;
            self.notify("agentgate_commands", node).await;
            Ok(())
        })
        .await
    }

    /// Claims the commands waiting for this node: `(command, session, body)`.
    pub async fn claim_commands(&self) -> Result<Vec<(Uuid, Uuid, String)>, StoreError> {
        let (Some(pool), Some(f)) = (&self.pool, self.fence.get()) else {
            return Ok(vec![]);
        };
        bounded(async move {
            let rows = sqlx::query(
                "UPDATE commands SET claimed = 1 WHERE node_id = $1 AND claimed = 0 \
                 RETURNING id, session_id, body",
            )
            .bind(&f.node)
            .fetch_all(pool)
            .await?;
            let mut out = Vec::new();
            for row in rows {
                let id: String = row.try_get(0)?;
                let session: String = row.try_get(1)?;
                let body: String = row.try_get(2)?;
                if let (Ok(id), Ok(session)) = (Uuid::parse_str(&id), Uuid::parse_str(&session)) {
                    out.push((id, session, body));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Answers command `id` and wakes whoever waits for it.
    pub async fn answer_command(&self, id: Uuid, reply: &str) -> Result<(), StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        bounded(async move {
            sqlx::query("UPDATE commands SET reply = $2 WHERE id = $1")
                .bind(id.to_string())
                .bind(reply)
                .execute(pool)
                .await?;
            self.notify("agentgate_replies", &id.to_string()).await;
            Ok(())
        })
        .await
    }

    /// Command `id`'s answer, once there is one (the row goes with it);
    /// `take` with no answer yet withdraws an unclaimed command and reports
    /// whether it was withdrawn.
    pub async fn command_reply(&self, id: Uuid) -> Result<Option<String>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        bounded(async move {
            let row = sqlx::query(
                "DELETE FROM commands WHERE id = $1 AND reply IS NOT NULL RETURNING reply",
            )
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?;
            Ok(row.and_then(|r| r.try_get::<String, _>(0).ok()))
        })
        .await
    }

    /// Withdraws command `id` if no node claimed it yet; whether it was.
    pub async fn withdraw_command(&self, id: Uuid) -> Result<bool, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(true);
        };
        bounded(async move {
            let done = sqlx::query("DELETE FROM commands WHERE id = $1 AND claimed = 0")
                .bind(id.to_string())
                .execute(pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// New events of session `id` are stored: nodes serving its streams read them.
    pub(super) async fn notify_events(&self, id: Uuid) {
        if self.fence.get().is_some() {
            self.notify("agentgate_events", &id.to_string()).await;
        }
    }

    /// `NOTIFY channel, payload`. A lost notification costs only latency:
    /// every listener also polls.
    async fn notify(&self, channel: &str, payload: &str) {
        let Some(pool) = &self.pool else { return };
        if self.fence.get().is_none() {
            return;
        }
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(pool)
            .await
        {
            tracing::warn!(channel, error = %e, "cannot notify the other nodes");
        }
    }

    /// The URL of a PostgreSQL store (for its listener connection).
    pub fn postgres_url(&self) -> Option<&str> {
        match &self.spec {
            super::StoreSpec::Postgres(url) => Some(url),
            _ => None,
        }
    }
}

/// The session ids in the first column of `rows`.
fn uuids(rows: &[sqlx::any::AnyRow]) -> Vec<Uuid> {
    rows.iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .filter_map(|id| Uuid::parse_str(&id).ok())
        .collect()
}

/// A lease from columns `at..at+3` (node, generation, live) of `row`.
fn lease_of(row: &sqlx::any::AnyRow, at: usize) -> Result<Lease, StoreError> {
    Ok(Lease {
        node: row.try_get(at)?,
        generation: row.try_get(at + 1)?,
        live: row.try_get(at + 2)?,
    })
}
