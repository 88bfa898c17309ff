//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text
//! format (what Prometheus asks for first when it scrapes).
//!
//! Two kinds of series:
//! - **events** — counters and histograms bumped where the thing happens
//!   (the session task, the prewarm loop, the one-shot route): spawns,
//!   reaps, restarts, crashes, messages by outcome, latencies;
//! - **levels** — gauges read off the registry at scrape time (sessions by
//!   state, live children, queued messages), so they can never drift from
//!   what the registry holds. Only open SSE streams are counted as they open
//!   and close ([`StreamGuard`]): nothing else knows them all.
//!
//! Every gateway has its own [`Metrics`] (the registry owns it), so
//! gateways served side by side in one process — the tests do that — do not
//! mix their numbers.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;

use crate::model::{FailureCode, SessionState};
use crate::session::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets in seconds: 5 ms to ~80 s, doubling. A warm child
/// answers in tens of milliseconds, a cold `claude` start takes about a
/// second, and a long agent turn takes minutes (those land in `+Inf`).
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    agent: String,
    kind: &'static str,
}

/// Token kinds of claude's `usage`, and their `kind` label.
const TOKEN_KINDS: [(&str, &str); 4] = [
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_creation_input_tokens", "cache_creation"),
    ("cache_read_input_tokens", "cache_read"),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpawnLabels {
    kind: &'static str,
    result: &'static str,
}

/// What a process was started for (`kind` label of `agentgate_spawns_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnKind {
    /// A session's persistent child.
    Session,
    /// A child started ahead for the prewarm pool.
    Prewarm,
    /// One process for `POST /oneshot`.
    Oneshot,
    /// One process for one message of a session in fallback mode.
    Fallback,
}

impl SpawnKind {
    fn label(self) -> &'static str {
        match self {
            SpawnKind::Session => "session",
            SpawnKind::Prewarm => "prewarm",
            SpawnKind::Oneshot => "oneshot",
            SpawnKind::Fallback => "fallback",
        }
    }
}

/// How a message ended, as the `outcome` label: `completed`, or the failure code.
pub fn outcome(error: Option<FailureCode>) -> &'static str {
    match error {
        None => "completed",
        Some(FailureCode::Timeout) => "timeout",
        Some(FailureCode::ProcessExited) => "process_exited",
        Some(FailureCode::Interrupted) => "interrupted",
        Some(FailureCode::SpawnFailed) => "spawn_failed",
        Some(FailureCode::AgentError) => "agent_error",
        Some(FailureCode::OutputLimit) => "output_limit",
        Some(FailureCode::Shutdown) => "shutdown",
        Some(FailureCode::Stalled) => "stalled",
        Some(FailureCode::GatewayLost) => "gateway_lost",
        Some(FailureCode::UnsupportedContent) => "unsupported_content",
    }
}

/// Every `outcome` label value.
const OUTCOMES: [&str; 11] = [
    "completed",
    "timeout",
    "process_exited",
    "interrupted",
    "spawn_failed",
    "agent_error",
    "output_limit",
    "shutdown",
    "stalled",
    "gateway_lost",
    "unsupported_content",
];

const STATES: [(SessionState, &str); 5] = [
    (SessionState::Starting, "starting"),
    (SessionState::Idle, "idle"),
    (SessionState::Busy, "busy"),
    (SessionState::Suspended, "suspended"),
    (SessionState::Closed, "closed"),
];

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: PromRegistry,
    sessions: Family<StateLabel, Gauge>,
    live_children: Gauge,
    warm_children: Family<AgentLabel, Gauge>,
    queued: Gauge,
    sse_subscribers: Gauge,
    sessions_created: Counter,
    sessions_closed: Family<ReasonLabel, Counter>,
    messages: Family<OutcomeLabel, Counter>,
    oneshots: Family<OutcomeLabel, Counter>,
    first_delta: Histogram,
    reply: Histogram,
    spawns: Family<SpawnLabels, Counter>,
    reaps: Family<ReasonLabel, Counter>,
    restarts: Counter,
    leases_lost: Counter,
    crashes: Counter,
    unattributed: Counter,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<AgentLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every series, registered and at zero.
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: PromRegistry::with_prefix("agentgate"),
            sessions: Family::default(),
            live_children: Gauge::default(),
            warm_children: Family::default(),
            queued: Gauge::default(),
            sse_subscribers: Gauge::default(),
            sessions_created: Counter::default(),
            sessions_closed: Family::default(),
            messages: Family::default(),
            oneshots: Family::default(),
            first_delta: latency_histogram(),
            reply: latency_histogram(),
            spawns: Family::default(),
            reaps: Family::default(),
            restarts: Counter::default(),
            leases_lost: Counter::default(),
            crashes: Counter::default(),
            unattributed: Counter::default(),
            tokens: Family::default(),
            cost: Family::default(),
        };
        let registry = &mut m.registry;
        registry.register("sessions", "Live sessions by state", m.sessions.clone());
        registry.register(
            "live_children",
            "Running persistent session children (warm children not included)",
            m.live_children.clone(),
        );
        registry.register(
            "warm_children",
            "Prewarmed children ready to be handed to a new session, by agent",
            m.warm_children.clone(),
        );
        registry.register(
            "queued_messages",
            "Messages waiting behind a running one, over all sessions",
            m.queued.clone(),
        );
        registry.register(
            "sse_subscribers",
            "Open SSE streams (session events, message streams, one-shot streams)",
            m.sse_subscribers.clone(),
        );
        registry.register(
            "sessions_created",
            "Sessions created",
            m.sessions_created.clone(),
        );
        registry.register(
            "sessions_closed",
            "Sessions closed, by reason (deleted, expired, shutdown, failed)",
            m.sessions_closed.clone(),
        );
        registry.register(
            "messages",
            "Session messages finished, by outcome (completed or the failure code)",
            m.messages.clone(),
        );
        registry.register(
            "oneshot_runs",
            "POST /oneshot runs finished, by outcome (completed or the failure code)",
            m.oneshots.clone(),
        );
        registry.register_with_unit(
            "first_delta_latency",
            "From a message reaching its agent to the first reply text",
            prometheus_client::registry::Unit::Seconds,
            m.first_delta.clone(),
        );
        registry.register_with_unit(
            "reply_latency",
            "From a message reaching its agent to its completed reply",
            prometheus_client::registry::Unit::Seconds,
            m.reply.clone(),
        );
        registry.register(
            "spawns",
            "Processes started, by kind (session, prewarm, oneshot, fallback) and result (ok, error)",
            m.spawns.clone(),
        );
        registry.register(
            "reaps",
            "Idle session children stopped, by reason (idle: idle_timeout; max_children: room for another)",
            m.reaps.clone(),
        );
        registry.register(
            "restarts",
            "Session children started for a session that had one before (after a reap, a crash or a kill)",
            m.restarts.clone(),
        );
        registry.register(
            "leases_lost",
            "Cluster mode: sessions another node took from this one (their children ended here)",
            m.leases_lost.clone(),
        );
        registry.register(
            "child_crashes",
            "Session children that exited when nobody asked them to",
            m.crashes.clone(),
        );
        registry.register(
            "unattributed_output_bytes",
            "Bytes a session child printed while no message of its session was running (after a reply ended, before the next was written): logged, never attributed to a message",
            m.unattributed.clone(),
        );
        registry.register(
            "tokens",
            "Model tokens the agents reported, by agent and kind (input, output, cache_creation, cache_read)",
            m.tokens.clone(),
        );
        registry.register(
            "cost_usd",
            "Cost in US dollars the agents reported, by agent",
            m.cost.clone(),
        );
        // Every known label value starts at zero, so a series exists before
        // its first event (a rate over a missing series is no rate at all).
        for code in OUTCOMES {
            let _ = m.messages.get_or_create(&OutcomeLabel { outcome: code });
            let _ = m.oneshots.get_or_create(&OutcomeLabel { outcome: code });
        }
        for (_, state) in STATES {
            let _ = m.sessions.get_or_create(&StateLabel { state });
        }
        for reason in ["deleted", "expired", "shutdown", "failed"] {
            let _ = m.sessions_closed.get_or_create(&ReasonLabel { reason });
        }
        for reason in ["idle", "max_children"] {
            let _ = m.reaps.get_or_create(&ReasonLabel { reason });
        }
        for kind in [
            SpawnKind::Session,
            SpawnKind::Prewarm,
            SpawnKind::Oneshot,
            SpawnKind::Fallback,
        ] {
            for result in ["ok", "error"] {
                let _ = m.spawns.get_or_create(&SpawnLabels {
                    kind: kind.label(),
                    result,
                });
            }
        }
        m
    }

    /// A message of `agent` reported `usage` (claude's token counts) and cost.
    pub fn usage(&self, agent: &str, usage: &serde_json::Value, cost_usd: f64) {
        for (key, kind) in TOKEN_KINDS {
            if let Some(n) = usage[key].as_u64() {
                self.tokens
                    .get_or_create(&TokenLabels {
                        agent: agent.to_string(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
        if cost_usd > 0.0 {
            self.cost
                .get_or_create(&AgentLabel {
                    agent: agent.to_string(),
                })
                .inc_by(cost_usd);
        }
    }

    /// A session was created.
    pub fn session_created(&self) {
        self.sessions_created.inc();
    }

    /// A session was closed for `reason` (`deleted`, `expired`, …).
    pub fn session_closed(&self, reason: &'static str) {
        self.sessions_closed
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A session message finished (`error`: its failure code, if it failed).
    pub fn message_finished(&self, error: Option<FailureCode>) {
        self.messages
            .get_or_create(&OutcomeLabel {
                outcome: outcome(error),
            })
            .inc();
    }

    /// A `POST /oneshot` run finished.
    pub fn oneshot_finished(&self, error: Option<FailureCode>) {
        self.oneshots
            .get_or_create(&OutcomeLabel {
                outcome: outcome(error),
            })
            .inc();
    }

    /// The first reply text of a message arrived `after` it reached the agent.
    pub fn first_delta(&self, after: Duration) {
        self.first_delta.observe(after.as_secs_f64());
    }

    /// A reply completed `after` the message reached the agent.
    pub fn reply_completed(&self, after: Duration) {
        self.reply.observe(after.as_secs_f64());
    }

    /// A process was started (`ok`) or could not be (`!ok`).
    pub fn spawned(&self, kind: SpawnKind, ok: bool) {
        self.spawns
            .get_or_create(&SpawnLabels {
                kind: kind.label(),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// An idle session child was stopped (`idle`, `max_children`).
    pub fn reaped(&self, reason: &'static str) {
        self.reaps.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Another node took a session's lease from this one.
    pub fn lease_lost(&self) {
        self.leases_lost.inc();
    }

    /// A session started a child again.
    pub fn restarted(&self) {
        self.restarts.inc();
    }

    /// A session child exited on its own.
    pub fn crashed(&self) {
        self.crashes.inc();
    }

    /// A session child printed `bytes` that belong to no message.
    pub fn unattributed(&self, bytes: usize) {
        self.unattributed.inc_by(bytes as u64);
    }

    /// Counts an SSE stream as open until the returned guard is dropped.
    pub fn stream_opened(&self) -> StreamGuard {
        self.sse_subscribers.inc();
        StreamGuard(self.sse_subscribers.clone())
    }

    /// The exposition: levels read off `sessions` now, then every series.
    pub fn render(&self, sessions: &Registry) -> String {
        let mut by_state = [0i64; STATES.len()];
        let mut queued = 0i64;
        for handle in sessions.list() {
            let view = handle.shared.view();
            if let Some(i) = STATES.iter().position(|(s, _)| *s == view.state) {
                by_state[i] += 1;
            }
            queued += view.queued as i64;
        }
        for ((_, state), n) in STATES.iter().zip(by_state) {
            self.sessions.get_or_create(&StateLabel { state }).set(n);
        }
        self.queued.set(queued);
        self.live_children.set(sessions.live_children() as i64);
        for profile in sessions.config.profiles.values() {
            if profile.prewarm > 0 {
                let ready = sessions.pool().ready(&profile.name);
                self.warm_children
                    .get_or_create(&AgentLabel {
                        agent: profile.name.clone(),
                    })
                    .set(ready as i64);
            }
        }
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An open SSE stream; dropping it (the stream ended or its client left)
/// takes it off `agentgate_sse_subscribers`.
#[derive(Debug)]
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_with_help_and_type() {
        let m = Metrics::new();
        m.message_finished(None);
        m.message_finished(Some(FailureCode::Timeout));
        m.spawned(SpawnKind::Session, true);
        m.first_delta(Duration::from_millis(12));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        for (name, kind) in [
            ("agentgate_sessions", "gauge"),
            ("agentgate_live_children", "gauge"),
            ("agentgate_queued_messages", "gauge"),
            ("agentgate_sse_subscribers", "gauge"),
            ("agentgate_messages", "counter"),
            ("agentgate_first_delta_latency_seconds", "histogram"),
            ("agentgate_reply_latency_seconds", "histogram"),
            ("agentgate_spawns", "counter"),
            ("agentgate_reaps", "counter"),
            ("agentgate_restarts", "counter"),
        ] {
            assert!(
                out.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} in\n{out}"
            );
        }
        assert!(out.contains("agentgate_messages_total{outcome=\"completed\"} 1\n"));
        assert!(out.contains("agentgate_messages_total{outcome=\"timeout\"} 1\n"));
        assert!(out.contains("agentgate_spawns_total{kind=\"session\",result=\"ok\"} 1\n"));
        // 12 ms lands in the 0.02 s bucket and every one above it.
        assert!(out.contains("agentgate_first_delta_latency_seconds_bucket{le=\"0.01\"} 0\n"));
        assert!(out.contains("agentgate_first_delta_latency_seconds_bucket{le=\"0.02\"} 1\n"));
        assert!(out.contains("agentgate_first_delta_latency_seconds_count 1\n"));
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn every_failure_code_has_a_preset_outcome_series() {
        use FailureCode::*;
        for code in [
            Timeout,
            ProcessExited,
            Interrupted,
            SpawnFailed,
            AgentError,
            OutputLimit,
            Shutdown,
            Stalled,
            GatewayLost,
        ] {
            let label = outcome(Some(code));
            assert!(OUTCOMES.contains(&label), "{label}");
            // The label is the code's own JSON name.
            assert_eq!(serde_json::to_value(code).unwrap(), label);
        }
    }

    #[test]
    fn a_stream_guard_counts_while_it_lives() {
        let m = Metrics::new();
        let a = m.stream_opened();
        let b = m.stream_opened();
        assert_eq!(m.sse_subscribers.get(), 2);
        drop(a);
        assert_eq!(m.sse_subscribers.get(), 1);
        drop(b);
        assert_eq!(m.sse_subscribers.get(), 0);
    }
}
