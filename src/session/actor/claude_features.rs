//! The session task's part in the Claude features: `PATCH` through control
//! requests, the argv of options and forks, per-message cost, and the stall
//! watchdog's limit. Kept apart from the task's loop so the two change
//! independently.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::Actor;
use crate::error::ApiError;
use crate::model::UpdateSession;

/// Longest wait for the answer to a control request (`PATCH`).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What of a `PATCH` to keep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Everything it changes.
    All,
    /// Only this option (the agent accepted it; another part may still be pending).
    Option(&'static str),
}

/// A `PATCH` waiting for the live child to answer its control requests.
pub(super) struct PendingUpdate {
    /// Our control request ids, with the option each one changes.
    waiting: Vec<(String, &'static str)>,
    refused: Option<String>,
    update: UpdateSession,
    reply: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
    deadline: Instant,
}

impl Actor {
    /// `PATCH`: a live child gets `set_model` / `set_permission_mode` and the
    /// change is kept once it says yes; without a child it is kept at once
    /// (the next child starts with it).
    pub(super) fn update(
        &mut self,
        update: UpdateSession,
        reply: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
    ) {
        let mut waiting = Vec::new();
        if let Some(c) = self.lifecycle.child_mut().filter(|c| !c.is_retiring()) {
            let requests = [
                (
                    "model",
                    update
                        .model
                        .as_ref()
                        .map(|m| json!({"subtype": "set_model", "model": m})),
                ),
                (
                    "permission_mode",
                    update
                        .permission_mode
                        .as_ref()
                        .map(|m| json!({"subtype": "set_permission_mode", "mode": m})),
                ),
            ];
            for (field, request) in requests {
                if let Some((id, bytes)) = request.and_then(|r| c.adapter.control(r)) {
                    c.proc.write(bytes);
                    waiting.push((id, field));
                }
            }
        }
        if waiting.is_empty() {
            self.keep_update(&update, Keep::All);
            let _ = reply.send(Ok(()));
            return;
        }
        self.updates.push(PendingUpdate {
            waiting,
            refused: None,
            update,
            reply,
            deadline: Instant::now() + CONTROL_TIMEOUT,
        });
    }

    /// Keeps `update` in the session, all of it or the one option the agent accepted.
    fn keep_update(&self, update: &UpdateSession, keep: Keep) {
        let mut s = self.shared.status();
        let all = keep == Keep::All;
        if (all || keep == Keep::Option("model")) && update.model.is_some() {
            s.options.model = update.model.clone();
        }
        if (all || keep == Keep::Option("permission_mode")) && update.permission_mode.is_some() {
            s.options.permission_mode = update.permission_mode.clone();
        }
        if all {
            if let Some(t) = &update.title {
                s.title = Some(t.clone());
            }
            if let Some(m) = &update.metadata {
                s.metadata = Some(m.clone());
            }
        }
    }

    /// The child answered control request `id`.
    pub(super) fn control_answered(&mut self, id: &str, error: Option<String>) {
        let Some(i) = self
            .updates
            .iter()
            .position(|u| u.waiting.iter().any(|(w, _)| w == id))
        else {
            return;
        };
        let u = &mut self.updates[i];
        let at = u
            .waiting
            .iter()
            .position(|(w, _)| w == id)
            .expect("found above");
        let (_, field) = u.waiting.remove(at);
        match error {
            Some(e) => u.refused = Some(format!("the agent refused the {field} change: {e}")),
            None => {
                let update = u.update.clone();
                self.keep_update(&update, Keep::Option(field));
            }
        }
        if self.updates[i].waiting.is_empty() {
            self.end_update(i);
        }
    }

    /// Answers pending update `i`: refused, or kept whole.
    fn end_update(&mut self, i: usize) {
        let u = self.updates.remove(i);
        let result = match u.refused {
            Some(why) => Err(ApiError::AgentRefused(why)),
            None => {
                self.keep_update(&u.update, Keep::All);
                Ok(())
            }
        };
        let _ = u.reply.send(result);
    }

    /// When the oldest unanswered `PATCH` gives up.
    pub(super) fn next_update_deadline(&self) -> Option<Instant> {
        self.updates.iter().map(|u| u.deadline).min()
    }

    /// Fails the `PATCH`es the child did not answer in time.
    pub(super) fn expire_updates(&mut self, now: Instant) {
        while let Some(i) = self.updates.iter().position(|u| now >= u.deadline) {
            self.updates[i].refused = Some("the agent did not answer the change in time".into());
            self.end_update(i);
        }
    }

    /// The child is gone: pending changes are kept for the next one.
    pub(super) fn child_gone_updates(&mut self) {
        for u in std::mem::take(&mut self.updates) {
            self.keep_update(&u.update, Keep::All);
            let _ = u.reply.send(Ok(()));
        }
    }

    /// Argv added to the profile's: the session's options, and
    /// `--fork-session` while a fork has no conversation of its own yet.
    pub(super) fn launch_args(&self) -> Vec<String> {
        let s = self.shared.status();
        let mut argv = s.options.argv();
        if s.fork_from.is_some() && s.agent_session_id.is_some() {
            argv.push("--fork-session".into());
        }
        argv
    }

    /// Records the agent's conversation id; a fork has its own once it differs from its parent's.
    pub(super) fn set_agent_session_id(&self, id: String) {
        let mut s = self.shared.status();
        if s.fork_from.as_ref().is_some_and(|f| *f != id) {
            s.fork_from = None;
        }
        let changed = s.agent_session_id.as_deref() != Some(id.as_str());
        s.agent_session_id = Some(id);
        drop(s);
        if changed {
            // The next gateway resumes this conversation.
            self.persist_session(None);
        }
    }

    /// Adds this message's `cost_usd` to `usage`: claude reports a running
    /// total, so a message's cost is the growth since the last one (or the
    /// whole total when it shrank: a new conversation). Counts it in metrics.
    pub(super) fn with_cost(&self, mut usage: Value) -> Value {
        let Some(total) = usage["total_cost_usd"].as_f64() else {
            return usage;
        };
        let cost = {
            let mut s = self.shared.status();
            let cost = match s.last_total_cost {
                Some(last) if total >= last => total - last,
                _ => total,
            };
            s.last_total_cost = Some(total);
            cost
        };
        usage["cost_usd"] = json!(cost);
        self.registry
            .metrics
            .usage(&self.shared.profile.name, &usage["usage"], cost);
        usage
    }

    /// The stall watchdog's limit for the running message, if it applies
    /// now: not in fallback runs, not while the agent waits for a permission
    /// answer (silence is expected then), and not before a new child printed
    /// anything (start-up can take seconds on a loaded machine; the message
    /// timeout covers a child that never starts).
    pub(super) fn stall_after(&self) -> Option<Duration> {
        let cur = self.current.as_ref()?;
        let spoke = self.lifecycle.child().is_some_and(|c| c.spoke);
        if cur.fallback || cur.stop.is_some() || !self.permissions.is_empty() || !spoke {
            return None;
        }
        self.shared.profile.stall_timeout
    }
}
