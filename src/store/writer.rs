//! A write's connection, and what becomes of it when the write fails.
//!
//! sqlx's `Transaction` counts its nesting depth itself and never asks the
//! database. On SQLite that count can go wrong: a statement that fails with
//! `SQLITE_FULL` or `SQLITE_IOERR` may roll back the whole transaction
//! (SQLite's documented choice, depending on where the error struck), the
//! `ROLLBACK` that follows fails, and sqlx still counts one open
//! transaction. Its next `begin` is then a `SAVEPOINT` that opens a real
//! transaction, and a `ROLLBACK TO` after the next failure leaves that
//! transaction open on a pooled connection. Every later write on it
//! "succeeded" into a transaction that nobody ever committed: acknowledged
//! messages, gone at the next restart (seen under a full disk, 1 run in 20
//! of `durable::a_full_disk_answers_503_and_loses_nothing_acknowledged`).
//!
//! So a [`Writer`] sends `BEGIN` and `COMMIT` itself, and a connection whose
//! write did not end in a commit (an error, a timeout that dropped it half
//! way) is closed instead of going back to the pool. Closing it rolls back
//! whatever it had open; the pool opens a fresh one when it needs it. On
//! SQLite even a single statement runs between `BEGIN` and `COMMIT`: a
//! connection that is somehow still inside a transaction fails that
//! `BEGIN` and is closed, so no write is acknowledged unless its own
//! `COMMIT` succeeded. That costs two statements per write and a reconnect
//! after a failure.

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};

use super::StoreError;

/// A connection a write runs on: one transaction, or statements that each
/// commit by themselves. See the module's documentation for its drop.
pub(super) struct Writer {
    conn: Option<PoolConnection<Any>>,
    /// SQLite: this process's turn to write (see [`Writer::open`]).
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// `BEGIN` was sent: [`Writer::commit`] sends `COMMIT`.
    transaction: bool,
    /// The write ended cleanly: the connection may serve another.
    clean: bool,
}

impl Writer {
    /// A connection from `pool`, in a transaction of its own if
    /// `transaction`, once `turn` (if any) is free.
    ///
    /// SQLite has one writer at a time per file. Left to the database,
    /// concurrent writes on the pool's connections get `SQLITE_BUSY` and
    /// sleep in its busy handler (1, 2, 5, 10… ms): under load most of a
    /// write's time. Taking turns here instead, writes queue in this
    /// process and each starts as soon as the previous one committed (one
    /// gateway per file: the lock file sees to that).
    pub(super) async fn open(
        pool: &AnyPool,
        transaction: bool,
        turn: Option<&std::sync::Arc<tokio::sync::Mutex<()>>>,
    ) -> Result<Writer, StoreError> {
        let turn = match turn {
            Some(t) => Some(t.clone().lock_owned().await),
            None => None,
        };
        let mut writer = Writer {
            _turn: turn,
            conn: Some(pool.acquire().await?),
            transaction,
            clean: false,
        };
        if transaction {
            sqlx::query("BEGIN").execute(&mut *writer).await?;
        }
        Ok(writer)
    }

    /// Commits the transaction, if there is one, and gives the connection
    /// back to the pool.
    pub(super) async fn commit(mut self) -> Result<(), StoreError> {
        if self.transaction {
            sqlx::query("COMMIT").execute(&mut *self).await?;
        }
        self.clean = true;
        Ok(())
    }

    /// Rolls the transaction back, if there is one, and gives the connection
    /// back to the pool.
    pub(super) async fn rollback(mut self) -> Result<(), StoreError> {
        if self.transaction {
            sqlx::query("ROLLBACK").execute(&mut *self).await?;
        }
        self.clean = true;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.clean {
            if let Some(conn) = self.conn.take() {
                // Detached, it is closed when dropped here, not pooled.
                drop(conn.detach());
            }
        }
    }
}

impl std::ops::Deref for Writer {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        self.conn
            .as_ref()
            .expect("a writer has its connection until dropped")
    }
}

impl std::ops::DerefMut for Writer {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn
            .as_mut()
            .expect("a writer has its connection until dropped")
    }
}

/// A value bound to a statement's parameter.
pub(super) enum Arg {
    Text(String),
    MaybeText(Option<String>),
    Int(i64),
}

/// One statement of a write, its parameters numbered `$1…` in its own text.
pub(super) struct Stmt {
    pub(super) sql: String,
    pub(super) args: Vec<Arg>,
}

impl Stmt {
    pub(super) fn new(sql: impl Into<String>, args: Vec<Arg>) -> Stmt {
        Stmt {
            sql: sql.into(),
            args,
        }
    }

    /// Runs it on `conn`.
    pub(super) async fn execute(self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        bind(sqlx::query(&self.sql), self.args)
            .execute(conn)
            .await?;
        Ok(())
    }
}

fn bind<'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::MaybeText(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

/// Runs `stmts` on SQLite as one script, `BEGIN; …; COMMIT`, in a single
/// call: sqlx runs each call on the connection's worker thread, and the
/// hop there and back costs more than the statements themselves (measured
/// here: a transaction of two small writes took 0.77 ms as four calls and
/// 0.25 ms as one). Parameters are renumbered so each statement keeps its
/// own; the data never enters the text. A script that fails part way leaves
/// its transaction open on the connection, and the [`Writer`] it ran on is
/// then closed, which rolls it back.
pub(super) async fn run_script(w: &mut Writer, stmts: Vec<Stmt>) -> Result<(), StoreError> {
    let mut sql = String::from("BEGIN;");
    let mut args = Vec::new();
    for s in stmts {
        let offset = args.len();
        sql.push(' ');
        sql.push_str(&renumber(&s.sql, offset));
        sql.push(';');
        args.extend(s.args);
    }
    sql.push_str(" COMMIT");
    bind(sqlx::query(&sql), args).execute(&mut **w).await?;
    Ok(())
}

/// `sql` with every `$N` parameter shifted by `offset`.
fn renumber(sql: &str, offset: usize) -> String {
    if offset == 0 {
        return sql.to_string();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut n = 0usize;
        let mut digits = false;
        while let Some(&(_, d)) = chars.peek() {
            let Some(v) = d.to_digit(10) else { break };
            n = n * 10 + v as usize;
            digits = true;
            chars.next();
        }
        if digits {
            out.push_str(&(n + offset).to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameters_are_renumbered_past_the_earlier_statements() {
        assert_eq!(
            super::renumber("UPDATE t SET a = $1, b = $12 WHERE c = $2", 3),
            "UPDATE t SET a = $4, b = $15 WHERE c = $5"
        );
        assert_eq!(super::renumber("SELECT $1", 0), "SELECT $1");
    }
}

/// A write waiting for [`Batcher`]'s next transaction.
type Pending = (
    Vec<Stmt>,
    tokio::sync::oneshot::Sender<Result<(), StoreError>>,
);

/// SQLite's group commit: writes from every session queue here, and one
/// task runs whatever has gathered as one script (one transaction, one call
/// to the database), then answers each. Under load many writes share a
/// commit; alone a write waits for nobody. A batch that fails is run again
/// write by write, so one bad write fails only itself (a full disk fails
/// them all, each with its error).
#[derive(Debug, Clone)]
pub(super) struct Batcher {
    tx: tokio::sync::mpsc::UnboundedSender<Pending>,
}

/// Most writes in one transaction.
const GROUP: usize = 64;

impl Batcher {
    /// Starts the task writing to `pool`, taking `turn` for each transaction.
    pub(super) fn start(pool: AnyPool, turn: std::sync::Arc<tokio::sync::Mutex<()>>) -> Batcher {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Pending>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(GROUP);
            while rx.recv_many(&mut batch, GROUP).await > 0 {
                let (stmts, replies): (Vec<Vec<Stmt>>, Vec<_>) = batch.drain(..).unzip();
                if let ([_], [_]) = (&stmts[..], &replies[..]) {
                    let result =
                        script_once(&pool, &turn, stmts.into_iter().flatten().collect()).await;
                    if let Some(reply) = replies.into_iter().next() {
                        let _ = reply.send(result);
                    }
                    continue;
                }
                // Copies kept only for the retry one by one: cheap next to the write.
                let parts: Vec<Vec<Stmt>> = stmts
                    .iter()
                    .map(|s| s.iter().map(Stmt::copy).collect())
                    .collect();
                match script_once(&pool, &turn, stmts.into_iter().flatten().collect()).await {
                    Ok(()) => {
                        for reply in replies {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Err(_) => {
                        for (part, reply) in parts.into_iter().zip(replies) {
                            let _ = reply.send(script_once(&pool, &turn, part).await);
                        }
                    }
                }
            }
        });
        Batcher { tx }
    }

    /// Runs `stmts` in the next transaction; returns once it committed (or failed).
    pub(super) async fn write(&self, stmts: Vec<Stmt>) -> Result<(), StoreError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx
            .send((stmts, reply))
            .map_err(|_| StoreError::Query("the store is closed".into()))?;
        done.await
            .map_err(|_| StoreError::Query("the store's writer stopped".into()))?
    }
}

/// One transaction of `stmts` on its own connection, within
/// [`super::OPERATION_TIMEOUT`] (a write that hangs is dropped with its
/// connection, which rolls it back, and the next batch goes on).
async fn script_once(
    pool: &AnyPool,
    turn: &std::sync::Arc<tokio::sync::Mutex<()>>,
    stmts: Vec<Stmt>,
) -> Result<(), StoreError> {
    super::bounded(async {
        let mut w = Writer::open(pool, false, Some(turn)).await?;
        run_script(&mut w, stmts).await?;
        w.commit().await
    })
    .await
}

impl Stmt {
    fn copy(&self) -> Stmt {
        Stmt {
            sql: self.sql.clone(),
            args: self
                .args
                .iter()
                .map(|a| match a {
                    Arg::Text(s) => Arg::Text(s.clone()),
                    Arg::MaybeText(s) => Arg::MaybeText(s.clone()),
                    Arg::Int(i) => Arg::Int(*i),
                })
                .collect(),
        }
    }
}
