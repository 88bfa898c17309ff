//! SQLite's group commit, and the statements a write is made of.
//!
//! A write is a list of [`Stmt`]s that commit together. On SQLite every
//! write goes through the [`Batcher`]: writes gathered from all sessions run
//! as one script in one transaction on a [`Writer`]; on PostgreSQL the store
//! runs a write's statements one by one (see `Store::write`).

use sqlx::{Any, AnyConnection, AnyPool};

use super::writer::Writer;
use super::StoreError;

/// A value bound to a statement's parameter.
#[derive(Clone)]
pub(super) enum Arg {
    Text(String),
    MaybeText(Option<String>),
    Int(i64),
}

/// One statement of a write, its parameters numbered `$1…` in its own text.
#[derive(Clone)]
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
async fn run_script(w: &mut Writer, stmts: Vec<Stmt>) -> Result<(), StoreError> {
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
                let (writes, replies): (Vec<Vec<Stmt>>, Vec<_>) = batch.drain(..).unzip();
                // Kept for the retry one by one (a batch of one has none).
                let parts = (writes.len() > 1).then(|| writes.clone());
                let result =
                    script_once(&pool, &turn, writes.into_iter().flatten().collect()).await;
                match (result, parts) {
                    (Err(e), None) => {
                        if let Some(reply) = replies.into_iter().next() {
                            let _ = reply.send(Err(e));
                        }
                    }
                    (Err(_), Some(parts)) => {
                        for (part, reply) in parts.into_iter().zip(replies) {
                            let _ = reply.send(script_once(&pool, &turn, part).await);
                        }
                    }
                    (Ok(()), _) => {
                        for reply in replies {
                            let _ = reply.send(Ok(()));
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
