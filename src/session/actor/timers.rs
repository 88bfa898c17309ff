//! Deadlines: message timeouts, kills after a grace, a child that never
//! became ready, the stall watchdog.

use super::*;

impl Actor {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(cur) = &self.current {
            if cur.stop.is_none() {
                consider(Some(cur.deadline));
                if let Some(q) = self.lifecycle.child().and_then(|c| c.adapter.quiet_after()) {
                    consider(Some(cur.last_output + q));
                }
                consider(self.stall_after().map(|d| cur.last_output + d));
            }
            consider(cur.kill_at);
        }
        consider(self.lifecycle.child().and_then(|c| c.deadline()));
        consider(self.permissions.values().map(|p| p.deadline).min());
        consider(self.next_update_deadline());
        next
    }

    pub(super) async fn timers(&mut self) {
        let now = Instant::now();
        let mut signals = Vec::new();
        self.expire_updates(now);
        let stall = self.stall_after();
        let grace = self.shared.profile.interrupt_grace;
        if let Some(cur) = self.current.as_mut() {
            if stall.is_some_and(|d| now >= cur.last_output + d) {
                tracing::warn!(session_id = %self.shared.id, message_id = %cur.id, "no output from the child for stall_timeout; ending it");
                cur.stop = Some(StopReason::Stalled);
                cur.kill_at = Some(now + grace);
                self.retire_child(Sig::SIGTERM);
                return;
            }
            if cur.stop.is_none() && now >= cur.deadline {
                tracing::info!(session_id = %self.shared.id, message_id = %cur.id, "message timed out");
                self.request_stop(StopReason::Timeout).await;
                return;
            } else if cur.kill_at.is_some_and(|t| now >= t) {
                cur.kill_at = None;
                tracing::info!(session_id = %self.shared.id, "reply did not end after the interrupt; killing the child");
                self.retire_child(Sig::SIGKILL);
            } else if cur.stop.is_none() {
                if let Some(c) = self.lifecycle.child_mut() {
                    if let Some(q) = c.adapter.quiet_after() {
                        if now >= cur.last_output + q {
                            c.adapter.quiet(&mut signals);
                        }
                    }
                }
            }
        }
        let grace = self.shared.profile.stop_grace;
        if let Some(c) = self.lifecycle.child_mut() {
            if c.deadline().is_some_and(|d| now >= d) {
                // Killed again after another grace if even that does not
                // end it. A child that never got ready stays `Starting`: its
                // exit is a crash that spends the restart budget.
                let deadline = now + grace;
                c.phase = match c.phase {
                    Phase::Retiring { .. } => {
                        tracing::warn!(session_id = %self.shared.id, "the retired child is still there after stop_grace; killing it");
                        Phase::Retiring { deadline }
                    }
                    _ => {
                        tracing::warn!(session_id = %self.shared.id, "child never reported ready; killing it");
                        Phase::Starting { deadline }
                    }
                };
                c.proc.signal(Sig::SIGKILL);
            }
        }
        let expired: Vec<String> = self
            .permissions
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let secs = self.shared.profile.permission_timeout.as_secs();
            let decision = PermissionDecision {
                behavior: Some(PermissionBehavior::Deny),
                option_id: None,
                message: Some(format!("no answer from the user within {secs} s")),
            };
            tracing::info!(session_id = %self.shared.id, request_id = %id, "permission request timed out; denied");
            let _ = self.answer_permission(&id, &decision);
        }
        self.apply(signals).await;
    }
}
