//! Closing a session (deleted, expired, failed, shutdown, or leaving this
//! node) and writing its messages and record to the store.

use super::*;

impl Actor {
    pub(super) async fn close(&mut self, reason: CloseReason) {
        if self.closed {
            return;
        }
        self.closed = true;
        if reason == CloseReason::Detached {
            // The session goes on elsewhere: end the child at once and leave
            // every record as it is (the next holder reads the store).
            if let Some(run) = self.lifecycle.take_one_shot() {
                run.task.abort();
            }
            self.child_gone_updates();
            if let Some(child) = self.lifecycle.take_child() {
                let pid = child.proc.pid();
                let _ = child.proc.stop(Duration::ZERO).await;
                self.registry.child_stopped();
                self.registry.child_gone(self.shared.id, pid);
            }
            if let Some(rx) = self.lifecycle.take_stopping() {
                let _ = rx.await;
            }
            self.shared.log.close();
            self.shared.finished.send_modify(|n| *n += 1);
            tracing::info!(session_id = %self.shared.id, "session left this node");
            return;
        }
        let detail = match reason {
            CloseReason::Deleted => "the session was deleted",
            CloseReason::Expired => "the session expired",
            CloseReason::Shutdown => "the gateway is shutting down",
            CloseReason::Failed => {
                "the session was closed: the agent kept exiting (restart budget spent)"
            }
            CloseReason::Detached => unreachable!("handled above"),
        };
        if let Some(run) = self.lifecycle.take_one_shot() {
            run.task.abort();
        }
        if self.current.is_some() {
            self.finish(Err((FailureCode::Shutdown, detail.to_string())), None)
                .await;
            // `finish` keeps a stop reason if one was pending; a close overrides nothing else.
        }
        while let Some(q) = self.queue.pop_front() {
            self.fail_unstarted(q.id, FailureCode::Shutdown, detail)
                .await;
        }
        self.sync_queued();
        self.stop_child().await;
        if let Some(rx) = self.lifecycle.take_stopping() {
            let _ = rx.await;
        }
        let label = match reason {
            CloseReason::Deleted => "deleted",
            CloseReason::Expired => "expired",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Failed => "failed",
            CloseReason::Detached => unreachable!("handled above"),
        };
        if reason == CloseReason::Shutdown && self.registry.store.is_durable() {
            // The session outlives this gateway: open streams end with it
            // suspended, and an EventSource reconnects to the next gateway.
            // Closed here, suspended in the store: announced as such.
            self.publish_state(SessionState::Suspended, Some("shutdown"));
            self.shared.log.close();
            self.shared.finished.send_modify(|n| *n += 1);
            tracing::info!(session_id = %self.shared.id, "session suspended for shutdown; kept in the store");
            return;
        }
        if matches!(reason, CloseReason::Expired | CloseReason::Failed)
            && self.registry.store.is_durable()
        {
            // A final state is stored before it is published.
            if let Err(e) = self
                .registry
                .store
                .save_session(&self.shared.record(Some(label)))
                .await
            {
                tracing::error!(session_id = %self.shared.id, error = %e, "cannot store the closed session");
            }
        }
        self.set_state(Some(label));
        self.registry.metrics.session_closed(label);
        self.publish(Event::SessionClosed { reason });
        self.shared.log.close();
        self.shared.finished.send_modify(|n| *n += 1);
        tracing::info!(session_id = %self.shared.id, ?reason, "session closed");
    }

    /// Writes message `id` as it stands to the store (nothing for `memory`).
    pub(super) fn persist_message(
        &self,
        id: Uuid,
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send + 'static
    {
        // Owned pieces only: the future must not borrow the (non-Sync) actor.
        let store = self.registry.store.clone();
        let found = store
            .is_durable()
            .then(|| self.shared.message_at(id))
            .flatten();
        async move {
            match found {
                Some((ord, m, usage)) => {
                    // The session's count changes when a message is added,
                    // its usage sum when one ends with usage: other writes
                    // leave the stored sum as it is.
                    let changed =
                        m.status == crate::model::MessageStatus::Queued || m.usage.is_some();
                    store.save_message(ord, &m, changed.then_some(&usage)).await
                }
                None => Ok(()),
            }
        }
    }

    /// [`Actor::persist_message`], noting in the session whether the store
    /// now has the message as it stands (a message it may hold an older
    /// state of stays in memory).
    pub(super) fn store_message(
        &self,
        id: Uuid,
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send + 'static
    {
        let write = self.persist_message(id);
        let shared = self.shared.clone();
        async move {
            let result = write.await;
            shared.mark_stored(id, result.is_ok());
            result
        }
    }

    /// With a durable store, lets memory drop the oldest finished messages
    /// beyond `--history-in-memory` (the store serves them).
    pub(super) fn trim_history(&self) {
        if self.registry.store.is_durable() {
            self.shared
                .trim_history(self.registry.config.history_in_memory);
        }
    }

    /// Writes the session's record to the store in the background (a new
    /// `agent_session_id`).
    pub(super) fn persist_session(&self, closed: Option<&str>) {
        let store = self.registry.store.clone();
        if !store.is_durable() {
            return;
        }
        let record = self.shared.record(closed);
        tokio::spawn(async move {
            if let Err(e) = store.save_session(&record).await {
                tracing::error!(session_id = %record.id, error = %e, "cannot store the session");
            }
        });
    }
}
