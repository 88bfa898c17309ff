//! The child's life: spawning or adopting a warm one, its output and exit,
//! stopping it (beside the task, or in it), and what a crash costs.

use super::*;

impl Actor {
    /// Starts this session's child in a slot the caller reserved
    /// ([`Registry::reserve_child`]); a failed spawn gives the slot back.
    pub(super) fn spawn_child(&mut self) -> std::io::Result<()> {
        let profile = &self.shared.profile;
        let resume = self.shared.status().agent_session_id.clone();
        let mut spec = spawn_spec(profile, self.shared.cwd.clone(), resume.as_deref());
        spec.argv.extend(self.launch_args());
        // Under the session's span only: the child outlives the message that started it.
        let spawned = self.span.in_scope(|| ChildProcess::spawn(&spec));
        self.registry
            .metrics
            .spawned(crate::metrics::SpawnKind::Session, spawned.is_ok());
        let proc = spawned.inspect_err(|_| self.registry.child_stopped())?;
        tracing::info!(session_id = %self.shared.id, pid = proc.pid(), resume = ?resume, "child started");
        self.adopt(proc);
        Ok(())
    }

    /// Makes `proc` this session's child (its slot is already reserved).
    pub(super) fn adopt(&mut self, proc: ChildProcess) {
        let profile = &self.shared.profile;
        if self.had_child {
            self.registry.metrics.restarted();
        }
        self.had_child = true;
        let mut adapter = protocol::persistent(profile);
        // Protocols where the client speaks first (ACP) start their handshake now.
        let cwd = self.shared.cwd.clone().or_else(|| profile.cwd.clone());
        let cwd = cwd
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_default();
        let resume = self.shared.status().agent_session_id.clone();
        if let Some(hello) = adapter.start(&cwd, resume.as_deref()) {
            proc.write(hello);
        }
        let ready = !adapter.needs_ready();
        self.registry.child_adopted(self.shared.id, proc.pid());
        self.lifecycle = Lifecycle::Child(Box::new(Child {
            proc,
            adapter,
            phase: Phase::Starting {
                deadline: Instant::now() + READY_TIMEOUT.min(profile.timeout),
            },
            sigint_sent: false,
            spoke: false,
        }));
        self.set_state(None);
        if ready {
            self.child_ready();
            self.set_state(None);
        }
    }

    /// The child is ready for messages (a child that is retiring stays so).
    pub(super) fn child_ready(&mut self) {
        if let Some(c) = self.lifecycle.child_mut() {
            if matches!(c.phase, Phase::Starting { .. }) {
                c.phase = Phase::Ready;
            }
        }
    }

    /// Ends the child on purpose with `signal`: it takes no more messages
    /// (the next one starts a new child), its exit is not a crash, and it is
    /// killed if still there after the profile's `stop_grace`.
    pub(super) fn retire_child(&mut self, signal: Sig) {
        let grace = self.shared.profile.stop_grace;
        if let Some(c) = self.lifecycle.child_mut() {
            c.phase = Phase::Retiring {
                deadline: Instant::now() + grace,
            };
            c.proc.signal(signal);
        }
    }

    /// Records an unexpected exit; true when the restart budget is spent.
    pub(super) fn record_exit(&mut self) -> bool {
        let profile = &self.shared.profile;
        let now = Instant::now();
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > profile.restart_window)
        {
            self.exits.pop_front();
        }
        self.exits.len() > profile.restart_budget
    }

    /// The child printed something (that `quiet_ms` counts) and the adapter made `signals` of it.
    pub(super) async fn output(&mut self, signals: Vec<Signal>) {
        if let Some(cur) = self.current.as_mut() {
            cur.last_output = Instant::now();
        }
        if let Some(c) = self.lifecycle.child_mut() {
            c.spoke = true;
        }
        self.apply(signals).await;
    }

    pub(super) async fn child_event(&mut self, ev: ChildEvent) {
        self.touch();
        let mut signals = Vec::new();
        match ev {
            ChildEvent::Stdout(bytes) => {
                if let Some(c) = self.lifecycle.child_mut() {
                    c.adapter.stdout(&bytes, &mut signals);
                }
                self.output(signals).await;
            }
            ChildEvent::Stderr(bytes) => {
                self.stderr_tail.extend_from_slice(&bytes);
                let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL);
                self.stderr_tail.drain(..excess);
                if let Some(c) = self.lifecycle.child_mut() {
                    c.adapter.stderr(&bytes, &mut signals);
                }
                self.output(signals).await;
            }
            ChildEvent::Exited(status) => {
                if let Some(c) = self.lifecycle.child_mut() {
                    c.adapter.eof(&mut signals);
                }
                self.apply(signals).await;
                let child = self.lifecycle.take_child();
                let retiring = child.as_ref().is_some_and(|c| c.is_retiring());
                let our_sigint =
                    child.as_ref().is_some_and(|c| c.sigint_sent) && ended_by_sigint(&status);
                self.child_gone_updates();
                self.registry.child_stopped();
                if let Some(c) = &child {
                    self.registry.child_gone(self.shared.id, c.proc.pid());
                }
                self.permissions.clear();
                let exit = describe_exit(&status);
                tracing::info!(session_id = %self.shared.id, %exit, "child exited");
                // An exit the gateway caused (its own signal, a stop, a kill)
                // is never a crash, whether or not a message still runs.
                let intentional = retiring
                    || our_sigint
                    || self.current.as_ref().is_some_and(|c| c.stop.is_some());
                if !intentional {
                    self.registry.metrics.crashed();
                }
                let unanswered = self.current.as_ref().is_some_and(|c| {
                    c.stop.is_none() && !c.fallback && c.output.is_empty() && !c.first_delta
                });
                if our_sigint && unanswered {
                    // The next message was written to a child that the
                    // gateway's own interrupt signal was ending; it never
                    // answered, so it runs again on a new child.
                    self.requeue_current();
                } else if self.current.is_some() {
                    let tail = String::from_utf8_lossy(&self.stderr_tail)
                        .trim_end()
                        .to_string();
                    let detail = if tail.is_empty() {
                        format!("the agent exited ({exit})")
                    } else {
                        format!("the agent exited ({exit}); stderr: {tail}")
                    };
                    self.finish(Err((FailureCode::ProcessExited, detail)), None)
                        .await;
                }
                self.set_state(Some("exited"));
                if !intentional && self.record_exit() {
                    self.close(CloseReason::Failed).await;
                    return;
                }
                self.try_start_next().await;
            }
        }
    }

    /// Stops the child in a task of its own, so the session answers at once
    /// while the child gets its grace period; the slot is given back when it
    /// is gone, and no new child starts before then.
    pub(super) fn stop_child_beside(&mut self) {
        let Some(child) = self.lifecycle.take_child() else {
            return;
        };
        self.permissions.clear();
        let (done, rx) = tokio::sync::oneshot::channel();
        self.lifecycle = Lifecycle::Stopping(rx);
        let registry = self.registry.clone();
        let grace = self.shared.profile.stop_grace;
        let id = self.shared.id;
        tokio::spawn(
            async move {
                let pid = child.proc.pid();
                let status = child.proc.stop(grace).await;
                registry.child_stopped();
                registry.child_gone(id, pid);
                tracing::info!(session_id = %id, pid, exit = %describe_exit(&status), "child stopped");
                let _ = done.send(());
            }
            .instrument(self.span.clone()),
        );
    }

    /// Puts the running message back at the head of the queue.
    pub(super) fn requeue_current(&mut self) {
        let Some(cur) = self.current.take() else {
            return;
        };
        let timeout = cur.deadline.duration_since(cur.started);
        let content = self
            .shared
            .message(cur.id)
            .map(|m| m.input)
            .unwrap_or_else(|| Content::Text(String::new()));
        self.update_message(cur.id, |m| {
            m.status = MessageStatus::Queued;
            m.started_at = None;
            m.output.clear();
        });
        tracing::info!(session_id = %self.shared.id, message_id = %cur.id, "the child ended by the gateway's interrupt never answered this message: queued again");
        self.queue.push_front(Queued {
            id: cur.id,
            content,
            timeout,
        });
        self.sync_queued();
    }

    pub(super) async fn stop_child(&mut self) {
        self.child_gone_updates();
        if let Some(child) = self.lifecycle.take_child() {
            let pid = child.proc.pid();
            let status = child.proc.stop(self.shared.profile.stop_grace).await;
            self.registry.child_stopped();
            self.registry.child_gone(self.shared.id, pid);
            self.permissions.clear();
            tracing::info!(session_id = %self.shared.id, pid, exit = %describe_exit(&status), "child stopped");
        }
    }

    /// Output that belongs to no message: logged and counted, never attributed.
    pub(super) fn unattributed(&self, bytes: usize) {
        self.registry.metrics.unattributed(bytes);
        tracing::warn!(session_id = %self.shared.id, bytes, "the child printed output while no message was running; it belongs to no message");
    }
}
