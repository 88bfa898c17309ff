//! A running reply: the adapter's signals become events, permission
//! requests and answers, interrupts and stops, and the message's end.

use super::*;

impl Actor {
    pub(super) async fn request_stop(&mut self, reason: StopReason) {
        let grace = self.shared.profile.interrupt_grace;
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        if cur.stop.is_some() {
            return;
        }
        cur.stop = Some(reason);
        if let Some(run) = self.lifecycle.take_one_shot() {
            // Aborting the run drops its child, which kills the child's group.
            run.task.abort();
            self.finish(Err((FailureCode::Interrupted, String::new())), None)
                .await;
            self.try_start_next().await;
            return;
        }
        cur.kill_at = Some(Instant::now() + grace);
        if let Some(child) = self.lifecycle.child_mut() {
            match child.adapter.interrupt() {
                Some(bytes) => {
                    child.proc.write(bytes);
                }
                None => {
                    child.sigint_sent = true;
                    child.proc.signal(Sig::SIGINT);
                }
            }
        }
    }

    pub(super) fn answer_permission(
        &mut self,
        request_id: &str,
        decision: &PermissionDecision,
    ) -> Result<(), ApiError> {
        // Silence while the agent waited for this answer is no stall.
        if let Some(cur) = self.current.as_mut() {
            cur.last_output = Instant::now();
        }
        let pending = self.permissions.remove(request_id).ok_or_else(|| {
            ApiError::NotFound(format!("no open permission request {request_id:?}"))
        })?;
        let child = self.lifecycle.child_mut().ok_or_else(|| {
            ApiError::NotFound(format!(
                "permission request {request_id:?} expired with its child"
            ))
        })?;
        if let Some(bytes) = child
            .adapter
            .permission_answer(request_id, &pending.input, decision)
        {
            child.proc.write(bytes);
        }
        Ok(())
    }

    pub(super) async fn apply(&mut self, signals: Vec<Signal>) {
        for signal in signals {
            match signal {
                Signal::Ready => {
                    self.child_ready();
                    self.try_start_next().await;
                }
                Signal::Unattributed(bytes) => self.unattributed(bytes),
                Signal::Delta(text) => {
                    let max = self.registry.config.max_output;
                    let Some(cur) = self.current.as_mut() else {
                        self.unattributed(text.len());
                        continue;
                    };
                    if cur.stop == Some(StopReason::OutputLimit) {
                        continue;
                    }
                    if cur.output.len() + text.len() > max {
                        self.request_stop(StopReason::OutputLimit).await;
                        // Past the cap the child is out of step: end it now.
                        self.retire_child(Sig::SIGKILL);
                        continue;
                    }
                    if !cur.first_delta {
                        cur.first_delta = true;
                        self.registry.metrics.first_delta(cur.started.elapsed());
                    }
                    cur.output.push_str(&text);
                    let id = cur.id;
                    // `GET …/messages/{mid}` shows the reply so far.
                    self.update_message(id, |m| m.output.push_str(&text));
                    self.publish(Event::MessageDelta {
                        message_id: id,
                        text: &text,
                    });
                }
                Signal::AgentEvent(event) => {
                    let id = self.current.as_ref().map(|c| c.id);
                    self.publish(Event::MessageAgentEvent {
                        event: &event,
                        message_id: id,
                    });
                }
                Signal::AgentSessionId(id) => self.set_agent_session_id(id),
                Signal::ControlResponse { request_id, error } => {
                    self.control_answered(&request_id, error)
                }
                Signal::PermissionRequest {
                    request_id,
                    tool_name,
                    input,
                    options,
                } => {
                    let id = self.current.as_ref().map(|c| c.id);
                    let deadline = Instant::now() + self.shared.profile.permission_timeout;
                    self.permissions.insert(
                        request_id.clone(),
                        Pending {
                            input: input.clone(),
                            deadline,
                        },
                    );
                    self.publish(Event::MessagePermissionRequest {
                        input: &input,
                        message_id: id,
                        options: options.as_ref(),
                        request_id: &request_id,
                        tool_name: &tool_name,
                    });
                }
                Signal::PermissionCancelled(request_id) => {
                    self.permissions.remove(&request_id);
                }
                Signal::Write(bytes) => {
                    if let Some(c) = self.lifecycle.child_mut() {
                        c.proc.write(bytes);
                    }
                }
                Signal::ConversationReset(detail) => {
                    let lost = self.shared.status().agent_session_id.take();
                    tracing::warn!(session_id = %self.shared.id, agent_session_id = ?lost, %detail, "the agent's conversation is not continued");
                    // Announced, not a change of the lifecycle: the session shows
                    // `starting` until the running reply moves it on.
                    self.publish_state(SessionState::Starting, Some("new_conversation"));
                }
                Signal::ConversationLost => {
                    let lost = {
                        let mut s = self.shared.status();
                        s.fork_from = None;
                        s.agent_session_id.take()
                    };
                    tracing::warn!(session_id = %self.shared.id, agent_session_id = ?lost, "the agent's conversation cannot be resumed; the next child starts a new one");
                    // This child exits by itself; give it no more messages.
                    self.retire_child(Sig::SIGTERM);
                }
                Signal::Done(outcome) => {
                    // A retired child's reply may still end (its last bytes
                    // were on their way); no next message goes to it, since
                    // it is not ready.
                    if self.current.is_some() {
                        let Outcome { result, usage } = outcome;
                        self.finish(result, usage).await;
                        self.try_start_next().await;
                    }
                }
            }
        }
    }

    /// Ends the current message with `result`, unless it was being stopped
    /// (then the stop's reason wins: an interrupted reply looks like an error
    /// to the agent but is an interruption to the client).
    pub(super) async fn finish(
        &mut self,
        result: Result<Option<String>, (FailureCode, String)>,
        usage: Option<Value>,
    ) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let duration_ms = cur.started.elapsed().as_millis() as u64;
        let (status, output, error) = match (cur.stop, result) {
            (Some(StopReason::Interrupted), _) => (
                MessageStatus::Interrupted,
                cur.output,
                Some(MessageError {
                    code: FailureCode::Interrupted,
                    detail: "interrupted by a client".into(),
                }),
            ),
            (Some(StopReason::Timeout), _) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError {
                    code: FailureCode::Timeout,
                    detail: format!(
                        "no reply within {} ms",
                        cur.deadline.duration_since(cur.started).as_millis()
                    ),
                }),
            ),
            (Some(StopReason::Stalled), _) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError {
                    code: FailureCode::Stalled,
                    detail: format!(
                        "no output from the agent for {} (stall_timeout); the child was ended, the next message resumes the conversation",
                        humantime::format_duration(self.shared.profile.stall_timeout.unwrap_or_default())
                    ),
                }),
            ),
            (Some(StopReason::OutputLimit), _) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError {
                    code: FailureCode::OutputLimit,
                    detail: format!(
                        "the reply exceeded {} bytes",
                        self.registry.config.max_output
                    ),
                }),
            ),
            (None, Ok(text)) => (MessageStatus::Completed, text.unwrap_or(cur.output), None),
            (None, Err((code, detail))) => (
                MessageStatus::Failed,
                cur.output,
                Some(MessageError { code, detail }),
            ),
        };
        let usage = usage.map(|u| self.with_cost(u));
        self.update_message(cur.id, |m| {
            m.status = status;
            m.output = output.clone();
            m.error = error.clone();
            m.finished_at = Some(OffsetDateTime::now_utc());
            m.duration_ms = Some(duration_ms);
            m.usage = usage.clone();
        });
        tracing::info!(session_id = %self.shared.id, message_id = %cur.id, ?status, duration_ms, "message finished");
        let metrics = &self.registry.metrics;
        metrics.message_finished(error.as_ref().map(|e| e.code));
        if error.is_none() {
            metrics.reply_completed(cur.started.elapsed());
        }
        // A final state is stored before it is published.
        if let Err(e) = self.store_message(cur.id).await {
            tracing::error!(session_id = %self.shared.id, message_id = %cur.id, error = %e, "cannot store a finished message");
        }
        match error {
            None => {
                self.publish(Event::MessageCompleted {
                    duration_ms,
                    exit_code: None,
                    fallback: cur.fallback,
                    message_id: cur.id,
                    output: &output,
                    usage: usage.as_ref().map(Some),
                });
            }
            Some(error) => {
                self.publish(Event::MessageFailed {
                    error: &error,
                    message_id: cur.id,
                });
            }
        }
        self.permissions.clear();
        self.shared.finished.send_modify(|n| *n += 1);
        let free =
            self.lifecycle.child().is_some_and(|c| c.is_ready()) || !self.shared.profile.persistent;
        // A session being closed takes the close's state, not `idle`.
        if free && self.queue.is_empty() && !self.closed {
            self.set_state(None);
        }
        self.trim_history();
    }

    /// Fails a message that never reached the agent.
    pub(super) async fn fail_unstarted(&mut self, id: Uuid, code: FailureCode, detail: &str) {
        let error = MessageError {
            code,
            detail: detail.to_string(),
        };
        self.update_message(id, |m| {
            m.status = MessageStatus::Failed;
            m.error = Some(error.clone());
            m.finished_at = Some(OffsetDateTime::now_utc());
        });
        self.registry.metrics.message_finished(Some(code));
        if let Err(e) = self.store_message(id).await {
            tracing::error!(session_id = %self.shared.id, message_id = %id, error = %e, "cannot store a failed message");
        }
        self.publish(Event::MessageFailed {
            error: &error,
            message_id: id,
        });
        self.shared.finished.send_modify(|n| *n += 1);
        self.trim_history();
    }
}
