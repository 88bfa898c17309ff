//! The queue: a message is accepted (or refused for a full queue), then
//! started as soon as the child is free, a child slot is had, or the
//! one-shot fallback takes it.

use super::*;

impl Actor {
    pub(super) fn enqueue(
        &mut self,
        content: Content,
        timeout: Option<Duration>,
        adopted: Option<Message>,
    ) -> Result<Message, ApiError> {
        let max_queue = self.registry.config.max_queue;
        let busy = self.current.is_some() || !self.queue.is_empty();
        if adopted.is_none() && busy && self.queue.len() >= max_queue {
            return Err(ApiError::TooManyRequests {
                detail: format!(
                    "{} messages are already waiting in this session (max_queue = {max_queue})",
                    self.queue.len()
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let (id, created_at) = adopted
            .map(|m| (m.id, m.created_at))
            .unwrap_or_else(|| (Uuid::new_v4(), OffsetDateTime::now_utc()));
        let message = Message {
            id,
            session_id: self.shared.id,
            input: content.clone(),
            output: String::new(),
            status: MessageStatus::Queued,
            error: None,
            created_at,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            usage: None,
            fallback: false,
        };
        {
            let mut s = self.shared.status();
            let at = s.base + s.messages.len();
            s.index.insert(id, at);
            s.messages.push(message.clone());
            s.queued = self.queue.len() + 1;
        }
        self.queue.push_back(Queued {
            id,
            content,
            timeout: timeout.unwrap_or(self.shared.profile.timeout),
        });
        Ok(message)
    }

    /// Starts the next queued message if the child is free (starting one if needed).
    pub(super) async fn try_start_next(&mut self) {
        loop {
            if self.closed || self.current.is_some() {
                return;
            }
            if self.queue.is_empty() {
                if self.lifecycle.child().is_some_and(|c| c.is_ready()) {
                    self.set_state(None);
                }
                return;
            }
            let mut fallback = !self.shared.profile.persistent;
            if !fallback && self.lifecycle.child().is_none() {
                if matches!(self.lifecycle, Lifecycle::Stopping(_)) {
                    // The previous child is still being stopped; `Wake::Stopped` retries.
                    return;
                }
                if !self.registry.reserve_child(self.shared.id, true) {
                    // Every child slot is busy: the message waits its turn
                    // (`Command::Wake` when a slot frees).
                    self.set_state(Some("max_children"));
                    return;
                }
                if let Err(e) = self.spawn_child() {
                    if self.shared.profile.oneshot_command.is_some() {
                        tracing::warn!(session_id = %self.shared.id, error = %e, "cannot start the persistent child; running the message through the one-shot command");
                        fallback = true;
                    }
                }
            }
            if fallback {
                let q = self.queue.pop_front().expect("non-empty");
                self.sync_queued();
                self.start_fallback(q);
                return;
            }
            if self.lifecycle.child().is_none() {
                if !self.registry.reserve_child(self.shared.id, true) {
                    self.set_state(Some("max_children"));
                    return;
                }
                if let Err(e) = self.spawn_child() {
                    let q = self.queue.pop_front().expect("non-empty");
                    self.sync_queued();
                    let detail = format!("cannot start {:?}: {e}", self.shared.profile.command[0]);
                    self.fail_unstarted(q.id, FailureCode::SpawnFailed, &detail)
                        .await;
                    self.set_state(Some("spawn_failed"));
                    if self.record_exit() {
                        self.close(CloseReason::Failed).await;
                        return;
                    }
                    continue;
                }
            }
            if !self.lifecycle.child().is_some_and(|c| c.is_ready()) {
                return;
            }
            let q = self.queue.pop_front().expect("non-empty");
            self.sync_queued();
            if self.registry.cluster.is_some() {
                // Several nodes: `running` is stored before the child sees
                // the message, so a node taking the session over after a
                // crash fails it (`gateway_lost`) instead of running it twice.
                self.update_message(q.id, |m| m.status = MessageStatus::Running);
                if let Err(e) = self.store_message(q.id).await {
                    tracing::error!(session_id = %self.shared.id, error = %e, "cannot store a message as running; it waits");
                    self.update_message(q.id, |m| m.status = MessageStatus::Queued);
                    self.queue.push_front(q);
                    self.sync_queued();
                    return;
                }
            }
            let child = self.lifecycle.child_mut().expect("checked above");
            let input = match child.adapter.frame_content(&q.content) {
                Ok(input) => input,
                Err(why) => {
                    // Nothing reached the child: it stays ready for the next message.
                    self.fail_unstarted(q.id, FailureCode::UnsupportedContent, &why)
                        .await;
                    continue;
                }
            };
            child.proc.write(input);
            let now = Instant::now();
            self.current = Some(Current {
                id: q.id,
                fallback: false,
                started: now,
                deadline: now + q.timeout,
                output: String::new(),
                last_output: now,
                stop: None,
                kill_at: None,
                first_delta: false,
                span: tracing::info_span!(parent: &self.span, "message", session_id = %self.shared.id, message_id = %q.id),
            });
            self.stderr_tail.clear();
            self.update_message(q.id, |m| {
                m.status = MessageStatus::Running;
                m.started_at = Some(OffsetDateTime::now_utc());
            });
            tracing::debug!(session_id = %self.shared.id, message_id = %q.id, "message started");
            self.publish(Event::MessageStarted {
                fallback: false,
                message_id: q.id,
            });
            self.set_state(None);
            return;
        }
    }
}
