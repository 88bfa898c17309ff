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
