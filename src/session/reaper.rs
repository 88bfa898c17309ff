//! The reaper: stops children idle longer than `idle_timeout` (the session
//! stays, `suspended`; its next message starts a child again) and removes
//! sessions with no activity for `session_ttl` (they stay readable as
//! `closed` for another `session_ttl`, then are forgotten).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{CloseReason, Registry};
use crate::model::SessionState;

/// Runs until `shutdown` is cancelled.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let config = registry.config.clone();
    let mut tick = tokio::time::interval(config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for handle in registry.list() {
            let (state, idle_for, has_child) = handle.shared.idle_info();
            let quiet = matches!(state, SessionState::Idle | SessionState::Suspended);
            if state == SessionState::Closed && idle_for >= config.session_ttl {
                // A session the gateway closed stayed readable for a while.
                registry.forget_closed(handle.id());
            } else if quiet && idle_for >= config.session_ttl {
                tracing::info!(session_id = %handle.id(), "session expired");
                let registry = registry.clone();
                let id = handle.id().to_string();
                tokio::spawn(async move {
                    let _ = registry.close(&id, CloseReason::Expired).await;
                });
            } else if state == SessionState::Idle && has_child && idle_for >= config.idle_timeout {
                handle.suspend("idle", Some(config.idle_timeout));
            } else if registry.cluster.is_some()
                && state == SessionState::Suspended
                && !has_child
                && handle.shared.queued() == 0
                && idle_for >= config.idle_timeout
            {
                // Cluster mode: a session without a child holds no lease; the
                // next node that needs it takes it.
                let registry = registry.clone();
                let id = handle.id();
                tokio::spawn(async move { registry.detach(id, false).await });
            }
        }
    }
}
