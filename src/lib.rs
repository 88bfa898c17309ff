//! agentgate puts conversational command-line programs — first of all the
//! Claude Code CLI — behind an HTTP REST + Server-Sent-Events API. Each
//! session owns one long-lived child process, so a conversation's next
//! message costs a pipe write instead of a process start.
//!
//! # Layout
//! - [`cluster`] — several gateways on one PostgreSQL: leases with fencing, the inbox and commands for a session's holder, events read from the store, failover.
//! - [`auth`] — who is asking: the operator or an owner (a JWT's `sub`); JWT verification with keys bound to one algorithm each.
//! - [`config`] — flags (clap, `AGENTGATE_*` env), TOML agent profiles, the built-in `demo` and `claude` profiles.
//! - [`content`] — message content: a string or text and image blocks, checked once when posted.
//! - [`error`] — the one API error type; every variant names its HTTP status.
//! - [`model`] — the JSON types of the API (what `openapi.yaml` describes).
//! - [`process`] — spawning children in their own process group, reading their pipes, stopping them.
//! - [`protocol`] — pure adapters: how input is framed and how output becomes text, events and the end of a reply (`lines`, `claude-stream-json`).
//! - [`session`] — the registry of handles, the task that owns each child, the event log with replay, the reaper.
//! - [`store`] — where sessions, messages and event logs outlive the process (SQLite, PostgreSQL, or memory).
//! - [`oneshot`] — one process per request.
//! - [`options`] — per-session agent options within the profile's `client_options`, each one `--flag=value` argv element.
//! - [`http`] — warp routes, handlers, SSE, problem+json, and the guard in front of them (token, Host and Origin allowlists, CORS).
//! - [`server`] — the connection loop: HTTP/1.1 on hyper, the connection cap, the header-read timeout, one authority per request.
//! - [`demo`] — the built-in demo agent (`agentgate demo-agent`).
//! - [`metrics`] — Prometheus series for `GET /metrics`: counted where things happen, levels read at scrape time.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod content;
pub mod demo;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
pub mod oneshot;
pub mod options;
pub mod process;
pub mod protocol;
pub mod server;
pub mod session;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::Config;
use http::AppState;
use session::Registry;

/// Serves the API on `listener` until `shutdown` completes; then fails
/// running messages with `shutdown`, ends every child's process group, ends
/// open SSE streams, and returns.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let store = store::Store::open(&config.store)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    serve_with_store(config, store, listener, shutdown)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// [`serve`] with a store the caller opened (the binary opens it first, so
/// a bad store stops start-up with one line and exit code 2). Sessions kept
/// in the store come back `suspended` before the first request is served.
pub async fn serve_with_store(
    config: Config,
    store: store::Store,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), store::StoreError> {
    let described = store.describe();
    if store.postgres_url().is_some() {
        // A PostgreSQL store may be shared: this gateway is a node of a cluster.
        let node = config.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            format!("{host}:{port}")
        });
        tracing::info!(node = %node, lease_ttl = ?config.lease_ttl, "cluster mode");
        store.enable_fence(&node);
    }
    end_leftover_children(&store).await?;
    let registry = Registry::with_store(Arc::new(config), Arc::new(store));
    let restored = registry
        .restore()
        .await
        .map_err(|e| store::StoreError::Open {
            store: described.clone(),
            detail: format!("cannot read its sessions: {e}"),
        })?;
    tracing::info!(store = %described, restored, "store open");
    let token = CancellationToken::new();
    let reaper = tokio::spawn(session::reaper::run(registry.clone(), token.clone()));
    let prewarm = tokio::spawn(session::prewarm::run(registry.clone(), token.clone()));
    let cluster = tokio::spawn(cluster::run(registry.clone(), token.clone()));
    let state = AppState::new(registry.clone(), token.clone());
    let routes = http::routes(state);
    let stop_registry = registry.clone();
    let stop_token = token.clone();
    let limits = server::Limits {
        max_connections: registry.config.max_connections,
        header_timeout: registry.config.header_timeout,
    };
    server::run(warp::service(routes), listener, limits, async move {
        shutdown.await;
        tracing::info!("shutting down: closing sessions and their children");
        stop_registry.shutdown().await;
        // After the sessions: their last events reach SSE clients before the streams end.
        stop_token.cancel();
    })
    .await;
    token.cancel();
    let _ = reaper.await;
    let _ = prewarm.await;
    let _ = cluster.await;
    // A request that raced the shutdown may have created a session; close it too.
    registry.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Ends the process groups a killed gateway left running on this store
/// (see [`process::leftovers`]), before anything is served.
pub(crate) async fn end_leftover_children(store: &store::Store) -> Result<(), store::StoreError> {
    use process::leftovers::{Gateway, Leftover};
    let orphaned: Vec<store::ChildRecord> = store
        .load_children()
        .await?
        .into_iter()
        .filter(|c| {
            Gateway {
                host: c.host.clone(),
                pid: c.gateway_pid,
                start_time: c.gateway_start,
            }
            .is_gone()
        })
        .collect();
    if orphaned.is_empty() {
        return Ok(());
    }
    let groups: Vec<Leftover> = orphaned
        .iter()
        .map(|c| Leftover {
            pid: c.pid,
            start_time: c.start_time,
        })
        .collect();
    let ended = process::leftovers::end(&groups, LEFTOVER_GRACE).await;
    tracing::info!(
        recorded = groups.len(),
        ended,
        "children of a killed gateway checked"
    );
    for c in &orphaned {
        store.forget_child(c.session_id, c.pid).await?;
    }
    Ok(())
}

/// How long a leftover child gets between SIGTERM and SIGKILL at start-up.
const LEFTOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Binds `config.listen`.
pub async fn bind(config: &Config) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}
