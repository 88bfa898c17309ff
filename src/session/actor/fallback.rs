//! One-shot fallback runs: a message the persistent child cannot take runs
//! through the profile's one-shot command, driven like a child's reply.

use super::*;

impl Actor {
    /// Runs `q` through the one-shot command (claude: resuming the conversation).
    pub(super) fn start_fallback(&mut self, q: Queued) {
        let profile = self.shared.profile.clone();
        let resume = self.shared.status().agent_session_id.clone();
        let mut argv = profile.oneshot_argv(resume.as_deref());
        argv.extend(self.launch_args());
        let cwd = self.shared.cwd.clone();
        let max_output = self.registry.config.max_output;
        let (tx, rx) = mpsc::unbounded_channel();
        let timeout = q.timeout;
        let content = q.content.clone();
        let task = tokio::spawn(async move {
            let result =
                crate::oneshot::run(&profile, argv, cwd, &content, timeout, max_output, |s| {
                    let _ = tx.send(FallbackEvent::Signal(s.clone()));
                })
                .await;
            let _ = tx.send(FallbackEvent::Done(result));
        });
        self.lifecycle = Lifecycle::OneShot(FallbackRun { rx, task });
        let now = Instant::now();
        self.current = Some(Current {
            id: q.id,
            fallback: true,
            started: now,
            // The run enforces the timeout itself; this deadline is a backstop.
            deadline: now + timeout + Duration::from_secs(5),
            output: String::new(),
            last_output: now,
            stop: None,
            kill_at: None,
            first_delta: false,
            span: tracing::info_span!(parent: &self.span, "message", session_id = %self.shared.id, message_id = %q.id),
        });
        self.update_message(q.id, |m| {
            m.status = MessageStatus::Running;
            m.started_at = Some(OffsetDateTime::now_utc());
            m.fallback = true;
        });
        self.publish(Event::MessageStarted {
            fallback: true,
            message_id: q.id,
        });
        self.set_state(None);
    }

    pub(super) async fn fallback_event(&mut self, ev: Option<FallbackEvent>) {
        self.touch();
        match ev {
            // A one-shot's own end is reported by its RunResult.
            Some(FallbackEvent::Signal(Signal::Done(_))) => {}
            Some(FallbackEvent::Signal(signal)) => self.apply(vec![signal]).await,
            Some(FallbackEvent::Done(result)) => {
                self.lifecycle = Lifecycle::Idle;
                let spawn_failed = result
                    .error
                    .as_ref()
                    .is_some_and(|e| e.code == FailureCode::SpawnFailed);
                self.registry
                    .metrics
                    .spawned(crate::metrics::SpawnKind::Fallback, !spawn_failed);
                if let Some(id) = result.agent_session_id.clone() {
                    self.set_agent_session_id(id);
                }
                let outcome = match result.error {
                    None => Ok(Some(result.output)),
                    Some(e) => Err((e.code, e.detail)),
                };
                self.finish(outcome, result.usage).await;
                self.try_start_next().await;
            }
            None => {
                self.lifecycle = Lifecycle::Idle;
                self.finish(
                    Err((
                        FailureCode::ProcessExited,
                        "the one-shot run ended without a result".into(),
                    )),
                    None,
                )
                .await;
                self.try_start_next().await;
            }
        }
    }
}
