//! The session store: where sessions, messages and event logs outlive the
//! process.
//!
//! One module owns every query; the session task asks it for what it needs
//! and never builds SQL itself. SQLite (the default, a file under
//! `--data-dir`) and PostgreSQL go through one code path: sqlx's `Any`
//! driver with portable SQL (TEXT and BIGINT columns, JSON kept as TEXT) and
//! the migrations in `migrations/`, embedded in the binary and run at
//! start-up. `memory` keeps nothing (throwaway use, tests).
//!
//! What differs between the two engines lives here and says why: SQLite
//! gets WAL and a busy timeout per connection, its file is created 0600 in a
//! 0700 directory, and a lock file keeps a second gateway off the same file
//! (two writers would interleave event ids).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::Message;

mod batch;
mod cluster;
mod writer;
use batch::{Arg, Stmt};
pub use cluster::{Fence, Lease, CHANNELS};

/// Where sessions are kept (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Nothing survives a restart.
    Memory,
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://…`), shared by several gateways.
    Postgres(String),
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<StoreSpec, String> {
        if s == "memory" {
            Ok(StoreSpec::Memory)
        } else if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(
                    "sqlite: needs a file path (sqlite:/var/lib/agentgate/agentgate.db)".into(),
                );
            }
            Ok(StoreSpec::Sqlite(PathBuf::from(path)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(s.to_string()))
        } else {
            Err(format!(
                "unknown store {s:?}: use sqlite:PATH, postgres://… or memory"
            ))
        }
    }
}

impl std::fmt::Display for StoreSpec {
    /// For logs: a PostgreSQL URL is shown without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreSpec::Postgres(url) => {
                let shown = match (url.find("://"), url.rfind('@')) {
                    (Some(scheme), Some(at)) if at > scheme => {
                        let creds = &url[scheme + 3..at];
                        let user = creds.split(':').next().unwrap_or("");
                        format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
                    }
                    _ => url.clone(),
                };
                f.write_str(&shown)
            }
        }
    }
}

/// A store that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// It cannot be opened at start-up (unreadable, newer schema, locked):
    /// the gateway stops with this one line.
    #[error("store {store}: {detail}")]
    Open {
        /// The store, as shown in logs.
        store: String,
        /// What is wrong.
        detail: String,
    },
    /// A query failed (disk full, file removed, database down).
    #[error("the session store failed: {0}")]
    Query(String),
    /// This node no longer holds the session's lease (another node took
    /// it): the write was refused and nothing was written.
    #[error("session {0}: this node no longer holds its lease")]
    Fenced(Uuid),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError::Query(e.to_string())
    }
}

/// What the store keeps of a session besides its messages and events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    /// Session id.
    pub id: Uuid,
    /// Profile name.
    pub agent: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last activity.
    #[serde(with = "time::serde::rfc3339")]
    pub last_activity_at: OffsetDateTime,
    /// Title given at creation.
    pub title: Option<String>,
    /// Metadata given at creation.
    pub metadata: Option<serde_json::Value>,
    /// Working directory of its children.
    pub cwd: Option<String>,
    /// The agent's own conversation id (claude: `--resume`).
    pub agent_session_id: Option<String>,
    /// Why it was closed, once it is.
    pub closed: Option<String>,
    /// The options its children start with.
    #[serde(default)]
    pub options: serde_json::Value,
    /// The session it was forked from.
    #[serde(default)]
    pub forked_from: Option<Uuid>,
    /// Its owner (JWT `sub`). Kept in its own column, not in `body`, so the
    /// store can be asked about an owner's sessions.
    #[serde(skip)]
    pub owner: Option<String>,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Its id in the session's log.
    pub seq: u64,
    /// Event name (`message.delta`, …).
    pub name: String,
    /// The message it belongs to.
    pub message_id: Option<Uuid>,
    /// Its `data:` JSON, as sent.
    pub data: String,
}

/// A session's usage summed over all its messages, as of one moment:
/// written with each message so a restart need not read them
/// (`version` only grows; see migration 5).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageMark {
    /// Larger for a later sum.
    pub version: u64,
    /// The sum.
    pub usage: crate::model::SessionUsage,
    /// How many messages the session had then.
    pub messages: u64,
}

/// What a restart needs of a stored session without reading its messages
/// or events ([`Store::load_summaries`]).
#[derive(Debug, Clone)]
pub struct SessionSummary {
    /// Its record.
    pub record: SessionRecord,
    /// The highest event id it may have handed out.
    pub ceiling: u64,
    /// The highest event id stored (0 for none).
    pub last_seq: u64,
    /// How many messages it has.
    pub message_count: u64,
    /// Its usage sum (`None`: stored before migration 5, or never written).
    pub usage: Option<UsageMark>,
}

/// A child recorded as live, for the clean-up after a killed gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRecord {
    /// Its session.
    pub session_id: Uuid,
    /// Its pid (also its process group id).
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22),
    /// so a reused pid is never taken for it.
    pub start_time: u64,
    /// The machine it runs on (hostname and boot id).
    pub host: String,
    /// The gateway that started it: pid and start time.
    pub gateway_pid: u32,
    /// See `gateway_pid`.
    pub gateway_start: u64,
}

/// A request that needed the store gets 503 when it fails.
impl From<StoreError> for crate::error::ApiError {
    fn from(e: StoreError) -> crate::error::ApiError {
        crate::error::ApiError::Unavailable(e.to_string())
    }
}

/// Longest a store operation may take. A database that stops answering
/// (a stopped server, a partition that leaves the TCP connection open)
/// must not hang a request: past this the operation fails like any other
/// store error (503 for the request that needed it).
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs one store operation within [`OPERATION_TIMEOUT`].
async fn bounded<T>(
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(OPERATION_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Query(format!(
                "no answer within {}s",
                OPERATION_TIMEOUT.as_secs()
            )))
        })
}

/// The migrations in `migrations/`, embedded in the binary.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// An open store.
#[derive(Debug)]
pub struct Store {
    pool: Option<AnyPool>,
    spec: StoreSpec,
    /// Cluster mode: the leases this node holds; every write for a session
    /// checks its lease in the same transaction (see [`Fence`]).
    fence: std::sync::OnceLock<Fence>,
    /// Held while the gateway runs: a second gateway on the same SQLite file
    /// fails to take it.
    _lock: Option<nix::fcntl::Flock<File>>,
    /// SQLite: writes take turns in the process (see `writer::Writer::open`).
    sqlite_turn: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// SQLite: the group commit most writes go through (`batch::Batcher`).
    batcher: Option<batch::Batcher>,
}

impl Store {
    /// A store that keeps nothing.
    pub fn memory() -> Store {
        Store {
            pool: None,
            spec: StoreSpec::Memory,
            fence: Default::default(),
            _lock: None,
            sqlite_turn: None,
            batcher: None,
        }
    }

    /// Opens `spec`, creating a SQLite file (0600, in a 0700 directory) on
    /// first use, and runs the migrations.
    pub async fn open(spec: &StoreSpec) -> Result<Store, StoreError> {
        let fail = |detail: String| StoreError::Open {
            store: spec.to_string(),
            detail,
        };
        sqlx::any::install_default_drivers();
        let (url, lock, sqlite) = match spec {
            StoreSpec::Memory => return Ok(Store::memory()),
            StoreSpec::Sqlite(path) => {
                let lock = prepare_sqlite(path).map_err(fail)?;
                (format!("sqlite://{}", path.display()), Some(lock), true)
            }
            StoreSpec::Postgres(url) => (url.clone(), None, false),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL: readers never block the writer; a crash of the
                        // process loses nothing that was committed.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| fail(format!("cannot open: {e}")))?;
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(v) => fail(format!(
                "its schema (migration {v}) is newer than this agentgate knows; run a newer agentgate or another store"
            )),
            other => fail(format!("cannot migrate: {other}")),
        })?;
        let sqlite_turn: Option<std::sync::Arc<tokio::sync::Mutex<()>>> =
            sqlite.then(Default::default);
        let batcher = sqlite_turn
            .clone()
            .map(|turn| batch::Batcher::start(pool.clone(), turn));
        Ok(Store {
            pool: Some(pool),
            spec: spec.clone(),
            fence: Default::default(),
            _lock: lock,
            sqlite_turn,
            batcher,
        })
    }

    /// Which store this is, for logs (no password).
    pub fn describe(&self) -> String {
        self.spec.to_string()
    }

    /// `sqlite`, `postgres` or `memory`.
    pub fn kind(&self) -> &'static str {
        match self.spec {
            StoreSpec::Memory => "memory",
            StoreSpec::Sqlite(_) => "sqlite",
            StoreSpec::Postgres(_) => "postgres",
        }
    }

    /// Whether anything survives a restart.
    pub fn is_durable(&self) -> bool {
        self.pool.is_some()
    }

    /// Checks that the store answers (for `/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        bounded(async move {
            if let Some(pool) = &self.pool {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Ok(())
        })
        .await
    }

    /// Creates or updates a session's record.
    pub async fn save_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            let body = serde_json::to_string(s).map_err(|e| StoreError::Query(e.to_string()))?;
            self.write(
                pool,
                s.id,
                vec![Stmt::new(
                    "INSERT INTO sessions (id, body, owner) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET body = excluded.body, owner = excluded.owner",
                    vec![
                        Arg::Text(s.id.to_string()),
                        Arg::Text(body),
                        Arg::MaybeText(s.owner.clone()),
                    ],
                )],
            )
            .await
        })
        .await
    }

    /// Raises the highest event id session `id` may hand out to `ceiling`
    /// (never lowers it).
    pub async fn reserve_events(&self, id: Uuid, ceiling: u64) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            self.write(
                pool,
                id,
                vec![Stmt::new(
                    "UPDATE sessions SET seq_ceiling = $1 WHERE id = $2 AND seq_ceiling < $1",
                    vec![Arg::Int(ceiling as i64), Arg::Text(id.to_string())],
                )],
            )
            .await
        })
        .await
    }

    /// Creates or updates message `m`, the `ord`-th of its session, and
    /// with `usage` the session's usage sum, in one transaction.
    pub async fn save_message(
        &self,
        ord: u64,
        m: &Message,
        usage: Option<&UsageMark>,
    ) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            let body = serde_json::to_string(m).map_err(|e| StoreError::Query(e.to_string()))?;
            let status = serde_json::to_value(m.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            const UPSERT: &str = "INSERT INTO messages (session_id, ord, id, body, status) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (session_id, ord) DO UPDATE SET body = excluded.body, status = excluded.status";
            const SUM: &str = "UPDATE sessions SET usage = $6, usage_version = $7, message_count = $8 \
                 WHERE id = $1 AND usage_version < $7";
            let mut args = vec![
                Arg::Text(m.session_id.to_string()),
                Arg::Int(ord as i64),
                Arg::Text(m.id.to_string()),
                Arg::Text(body),
                Arg::Text(status),
            ];
            let Some(mark) = usage else {
                return self.write(pool, m.session_id, vec![Stmt::new(UPSERT, args)]).await;
            };
            args.extend([
                Arg::Text(
                    serde_json::to_string(&mark.usage)
                        .map_err(|e| StoreError::Query(e.to_string()))?,
                ),
                Arg::Int(mark.version as i64),
                Arg::Int(mark.messages as i64),
            ]);
            let sql = if matches!(self.spec, StoreSpec::Postgres(_)) {
                // One statement (a data-modifying WITH runs whether or not
                // it is read): one round trip where a transaction of two
                // statements takes four.
                format!("WITH m AS ({UPSERT}) {SUM}")
            } else {
                // SQLite runs it as part of one script (the group commit),
                // its parameters numbered across both statements.
                format!("{UPSERT}; {SUM}")
            };
            self.write(pool, m.session_id, vec![Stmt::new(sql, args)])
                .await
        })
        .await
    }

    /// Appends events to session `id`'s log, in one transaction.
    pub async fn append_events(&self, id: Uuid, events: &[EventRecord]) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            if events.is_empty() {
                return Ok(());
            }
            let rows: Vec<_> = events.iter().map(|e| (id, e)).collect();
            let stmts = insert_events(&rows);
            self.write(pool, id, stmts).await?;
            self.notify_events(id).await;
            Ok(())
        })
        .await
    }

    /// Drops session `id`'s events with ids below `first_kept` (the replay limits).
    pub async fn prune_events(&self, id: Uuid, first_kept: u64) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            self.write(
                pool,
                id,
                vec![Stmt::new(
                    "DELETE FROM events WHERE session_id = $1 AND seq < $2",
                    vec![Arg::Text(id.to_string()), Arg::Int(first_kept as i64)],
                )],
            )
            .await
        })
        .await
    }

    /// Forgets session `id`: its record, messages, events and child.
    pub async fn delete_session(&self, id: Uuid) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            let mut tx = self.begin_for(pool, id, true).await?;
            // Not `commands`: the delete itself may be one, whose answer
            // the asking node still has to read.
            for table in ["events", "messages", "children", "inbox"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE session_id = $1"))
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM sessions WHERE id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM leases WHERE session_id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            if let Some(f) = self.fence.get() {
                f.held.remove(&id);
            }
            self.notify_events(id).await;
            Ok(())
        })
        .await
    }

    /// Every stored session with its event-id ceiling, oldest first.
    pub async fn load_sessions(&self) -> Result<Vec<(SessionRecord, u64)>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(vec![]);
            };
            let rows = sqlx::query("SELECT body, seq_ceiling, owner FROM sessions")
                .fetch_all(pool)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let body: String = row.try_get(0)?;
                let ceiling: i64 = row.try_get(1)?;
                let owner: Option<String> = row.try_get(2)?;
                match serde_json::from_str::<SessionRecord>(&body) {
                    Ok(s) => out.push((SessionRecord { owner, ..s }, ceiling.max(0) as u64)),
                    Err(e) => {
                        tracing::error!(error = %e, "a stored session cannot be read; skipped")
                    }
                }
            }
            out.sort_by_key(|(s, _)| s.created_at);
            Ok(out)
        })
        .await
    }

    /// Every stored session with what a restart needs to bring it back
    /// without reading its messages or events: one query, with an index
    /// lookup per session for its newest event id (and, for a session
    /// without a usage sum, for its message count). Oldest first.
    pub async fn load_summaries(&self) -> Result<Vec<SessionSummary>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(vec![]);
            };
            let rows = sqlx::query(
                "SELECT s.body, s.seq_ceiling, s.owner, s.usage, s.usage_version, \
                 CASE WHEN s.usage IS NULL \
                 THEN (SELECT MAX(ord) + 1 FROM messages m WHERE m.session_id = s.id) \
                 ELSE s.message_count END, \
                 (SELECT MAX(seq) FROM events e WHERE e.session_id = s.id) \
                 FROM sessions s",
            )
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let body: String = row.try_get(0)?;
                let ceiling: i64 = row.try_get(1)?;
                let owner: Option<String> = row.try_get(2)?;
                let usage: Option<String> = row.try_get(3)?;
                let usage_version: i64 = row.try_get(4)?;
                let count: Option<i64> = row.try_get(5)?;
                let last_seq: Option<i64> = row.try_get(6)?;
                let record = match serde_json::from_str::<SessionRecord>(&body) {
                    Ok(s) => SessionRecord { owner, ..s },
                    Err(e) => {
                        tracing::error!(error = %e, "a stored session cannot be read; skipped");
                        continue;
                    }
                };
                let usage = usage
                    .and_then(|u| serde_json::from_str(&u).ok())
                    .map(|usage| UsageMark {
                        version: usage_version.max(0) as u64,
                        usage,
                        messages: count.unwrap_or(0).max(0) as u64,
                    });
                out.push(SessionSummary {
                    record,
                    ceiling: ceiling.max(0) as u64,
                    last_seq: last_seq.unwrap_or(0).max(0) as u64,
                    message_count: count.unwrap_or(0).max(0) as u64,
                    usage,
                });
            }
            out.sort_by_key(|s| s.record.created_at);
            Ok(out)
        })
        .await
    }

    /// The sessions with a message stored as queued or running (after a
    /// restart those messages fail with `gateway_lost`).
    pub async fn sessions_with_unfinished(
        &self,
    ) -> Result<std::collections::HashSet<Uuid>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(Default::default());
            };
            let rows = sqlx::query(
                "SELECT DISTINCT session_id FROM messages WHERE status IN ('queued', 'running')",
            )
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|row| {
                    let id: String = row.try_get(0)?;
                    Uuid::parse_str(&id).map_err(|e| StoreError::Query(e.to_string()))
                })
                .collect()
        })
        .await
    }

    /// A restart's writes in one transaction: every session's event-id
    /// ceiling raised by `raise`, and `events` (session, event) appended.
    pub async fn restart_writes(
        &self,
        raise: u64,
        events: &[(Uuid, EventRecord)],
    ) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            let mut w = writer::Writer::open(pool, true, self.sqlite_turn.as_ref()).await?;
            let raise = Stmt::new(
                "UPDATE sessions SET seq_ceiling = seq_ceiling + $1",
                vec![Arg::Int(raise as i64)],
            );
            let rows: Vec<_> = events.iter().map(|(id, e)| (*id, e)).collect();
            for stmt in std::iter::once(raise).chain(insert_events(&rows)) {
                stmt.execute(&mut w).await?;
            }
            w.commit().await
        })
        .await
    }

    /// Session `id`'s messages, oldest first.
    pub async fn load_messages(&self, id: Uuid) -> Result<Vec<Message>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(vec![]);
            };
            let rows = sqlx::query("SELECT body FROM messages WHERE session_id = $1 ORDER BY ord")
                .bind(id.to_string())
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    let body: String = row.try_get(0)?;
                    serde_json::from_str(&body).map_err(|e| StoreError::Query(e.to_string()))
                })
                .collect()
        })
        .await
    }

    /// At most `limit` of session `id`'s messages after message `after`
    /// (from the first without it), with their places in the history;
    /// `None` when `after` is not one of its messages.
    pub async fn load_message_page(
        &self,
        id: Uuid,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Option<Vec<(u64, Message)>>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(Some(vec![]));
            };
            let from = match after {
                None => 0,
                Some(after) => {
                    let row = sqlx::query("SELECT ord FROM messages WHERE session_id = $1 AND id = $2")
                        .bind(id.to_string())
                        .bind(after.to_string())
                        .fetch_optional(pool)
                        .await?;
                    match row {
                        Some(row) => row.try_get::<i64, _>(0)? + 1,
                        None => return Ok(None),
                    }
                }
            };
            let rows = sqlx::query(
                "SELECT ord, body FROM messages WHERE session_id = $1 AND ord >= $2 ORDER BY ord LIMIT $3",
            )
            .bind(id.to_string())
            .bind(from)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|row| {
                    let ord: i64 = row.try_get(0)?;
                    let body: String = row.try_get(1)?;
                    let m = serde_json::from_str(&body).map_err(|e| StoreError::Query(e.to_string()))?;
                    Ok((ord as u64, m))
                })
                .collect::<Result<Vec<_>, StoreError>>()
                .map(Some)
        })
        .await
    }

    /// Message `mid` of session `id`.
    pub async fn load_message(&self, id: Uuid, mid: Uuid) -> Result<Option<Message>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(None);
            };
            let row = sqlx::query("SELECT body FROM messages WHERE session_id = $1 AND id = $2")
                .bind(id.to_string())
                .bind(mid.to_string())
                .fetch_optional(pool)
                .await?;
            row.map(|row| {
                let body: String = row.try_get(0)?;
                serde_json::from_str(&body).map_err(|e| StoreError::Query(e.to_string()))
            })
            .transpose()
        })
        .await
    }

    /// Session `id`'s stored events, oldest first.
    pub async fn load_events(&self, id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(vec![]);
            };
            let rows = sqlx::query(
                "SELECT seq, name, message_id, data FROM events WHERE session_id = $1 ORDER BY seq",
            )
            .bind(id.to_string())
            .fetch_all(pool)
            .await?;
            rows.iter().map(event_of).collect()
        })
        .await
    }

    /// Records session `id`'s live child.
    pub async fn save_child(&self, c: &ChildRecord) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            sqlx::query(
                "INSERT INTO children (session_id, pid, start_time, host, gateway_pid, gateway_start) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (session_id) DO UPDATE SET pid = excluded.pid, start_time = excluded.start_time, \
                 host = excluded.host, gateway_pid = excluded.gateway_pid, gateway_start = excluded.gateway_start",
            )
            .bind(c.session_id.to_string())
            .bind(c.pid as i64)
            .bind(c.start_time as i64)
            .bind(&c.host)
            .bind(c.gateway_pid as i64)
            .bind(c.gateway_start as i64)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Session `id`'s child `pid` is gone (a record of a later child stays).
    pub async fn forget_child(&self, id: Uuid, pid: u32) -> Result<(), StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(());
            };
            sqlx::query("DELETE FROM children WHERE session_id = $1 AND pid = $2")
                .bind(id.to_string())
                .bind(pid as i64)
                .execute(pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Every child recorded as live.
    pub async fn load_children(&self) -> Result<Vec<ChildRecord>, StoreError> {
        bounded(async move {
            let Some(pool) = &self.pool else {
                return Ok(vec![]);
            };
            let rows = sqlx::query(
                "SELECT session_id, pid, start_time, host, gateway_pid, gateway_start FROM children",
            )
            .fetch_all(pool)
            .await?;
            let mut out = Vec::new();
            for row in rows {
                let id: String = row.try_get(0)?;
                let pid: i64 = row.try_get(1)?;
                let start: i64 = row.try_get(2)?;
                let host: String = row.try_get(3)?;
                let gateway_pid: i64 = row.try_get(4)?;
                let gateway_start: i64 = row.try_get(5)?;
                if let Ok(session_id) = Uuid::parse_str(&id) {
                    out.push(ChildRecord {
                        session_id,
                        pid: pid as u32,
                        start_time: start as u64,
                        host,
                        gateway_pid: gateway_pid as u32,
                        gateway_start: gateway_start as u64,
                    });
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Events per `INSERT`: 5 parameters each, well within SQLite's and
/// PostgreSQL's limits on parameters per statement.
const EVENT_ROWS: usize = 200;

/// The `INSERT`s that append `rows` (session, event): many rows per
/// statement, so a burst of deltas is one statement, not one per event.
fn insert_events(rows: &[(Uuid, &EventRecord)]) -> Vec<Stmt> {
    rows.chunks(EVENT_ROWS)
        .map(|chunk| {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p = i * 5;
                    format!(
                        "(${}, ${}, ${}, ${}, ${})",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO events (session_id, seq, name, message_id, data) VALUES {} \
                 ON CONFLICT (session_id, seq) DO NOTHING",
                values.join(", ")
            );
            let args = chunk
                .iter()
                .flat_map(|(id, e)| {
                    [
                        Arg::Text(id.to_string()),
                        Arg::Int(e.seq as i64),
                        Arg::Text(e.name.clone()),
                        Arg::MaybeText(e.message_id.map(|m| m.to_string())),
                        Arg::Text(e.data.clone()),
                    ]
                })
                .collect();
            Stmt::new(sql, args)
        })
        .collect()
}

fn event_of(row: &AnyRow) -> Result<EventRecord, StoreError> {
    let seq: i64 = row.try_get(0)?;
    let message_id: Option<String> = row.try_get(2)?;
    Ok(EventRecord {
        seq: seq as u64,
        name: row.try_get(1)?,
        message_id: message_id.and_then(|m| Uuid::parse_str(&m).ok()),
        data: row.try_get(3)?,
    })
}

/// Creates the SQLite file's directory (0700) and the file (0600) if
/// missing, and takes the lock file beside it. sqlx would create the file
/// with the process umask; conversation text must not be world-readable.
fn prepare_sqlite(path: &Path) -> Result<nix::fcntl::Flock<File>, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    // flock: released by the kernel when the process dies, even by SIGKILL.
    let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(format!(
                "another agentgate is using it (lock {} held); give each gateway its own --data-dir or use postgres://",
                lock_path.display()
            ))
        }
        Err((_, e)) => return Err(format!("cannot lock {}: {e}", lock_path.display())),
    };
    if !path.exists() {
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse_and_hide_passwords() {
        assert_eq!("memory".parse::<StoreSpec>().unwrap(), StoreSpec::Memory);
        assert_eq!(
            "sqlite:/tmp/a.db".parse::<StoreSpec>().unwrap(),
            StoreSpec::Sqlite("/tmp/a.db".into())
        );
        let pg: StoreSpec = "postgres://ag:s3cret@127.0.0.1:5432/ag".parse().unwrap();
        assert_eq!(pg.to_string(), "postgres://ag:***@127.0.0.1:5432/ag");
        assert!("mysql://x".parse::<StoreSpec>().is_err());
        assert!("sqlite:".parse::<StoreSpec>().is_err());
    }
}
