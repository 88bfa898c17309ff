//! Prewarm: children started ahead for profiles with `prewarm = N`, so a new
//! session's first message skips the agent's start-up cost (claude: ~1 s of
//! start-up work happens before it reads any input). A protocol's warm-up
//! request ([`crate::protocol::Adapter::warm_up`]) is written at once, so
//! that the first-turn work the agent does lazily is done ahead too.
//!
//! `POST /sessions` takes a warm child (its pid becomes the session's); the
//! pool task refills in the background and replaces warm children that died.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Registry;
use crate::config::AgentProfile;
use crate::process::{child_env, ChildProcess, SpawnSpec};

/// Warm children by profile name.
#[derive(Debug, Default)]
pub struct Pool {
    warm: Mutex<HashMap<String, VecDeque<ChildProcess>>>,
    refill: Notify,
}

/// How a persistent child of `profile` is started (without a session's cwd or resume id).
pub fn spawn_spec(
    profile: &AgentProfile,
    cwd: Option<std::path::PathBuf>,
    resume: Option<&str>,
) -> SpawnSpec {
    SpawnSpec {
        argv: profile.persistent_argv(resume),
        env: child_env(profile),
        cwd_roots: cwd.is_some().then(|| profile.session_cwd_roots()),
        cwd: cwd.or_else(|| profile.cwd.clone()),
        merge_stderr: profile.merge_stderr,
    }
}

impl Pool {
    /// A live warm child of `profile`, if one is ready.
    pub fn take(&self, profile: &str) -> Option<ChildProcess> {
        let mut warm = self.warm.lock().expect("pool poisoned");
        let queue = warm.get_mut(profile)?;
        let child = loop {
            let mut child = queue.pop_front()?;
            if !child.try_exited() {
                break child;
            }
            tracing::info!(
                agent = profile,
                pid = child.pid(),
                "a warm child had exited; discarded"
            );
        };
        drop(warm);
        self.refill.notify_one();
        Some(child)
    }

    /// Warm children ready for `profile`.
    pub fn ready(&self, profile: &str) -> usize {
        self.warm
            .lock()
            .expect("pool poisoned")
            .get(profile)
            .map_or(0, VecDeque::len)
    }

    fn fill(&self, profile: &AgentProfile, metrics: &crate::metrics::Metrics) {
        let mut warm = self.warm.lock().expect("pool poisoned");
        let queue = warm.entry(profile.name.clone()).or_default();
        queue.retain_mut(|c| !c.try_exited());
        while queue.len() < profile.prewarm {
            match ChildProcess::spawn(&spawn_spec(profile, None, None)) {
                Ok(child) => {
                    // Its answer comes while the child waits (or after a
                    // session took it); the session's adapter drops it.
                    let warm_up = profile
                        .warm_up
                        .then(|| crate::protocol::persistent(profile).warm_up())
                        .flatten();
                    if let Some(bytes) = warm_up {
                        child.write(bytes);
                    }
                    metrics.spawned(crate::metrics::SpawnKind::Prewarm, true);
                    tracing::info!(agent = %profile.name, pid = child.pid(), "warm child started");
                    queue.push_back(child);
                }
                Err(e) => {
                    metrics.spawned(crate::metrics::SpawnKind::Prewarm, false);
                    tracing::warn!(agent = %profile.name, error = %e, "cannot start a warm child");
                    break;
                }
            }
        }
    }
}

/// Keeps every pool full until `shutdown`, then stops the warm children.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let profiles: Vec<Arc<AgentProfile>> = registry
        .config
        .profiles
        .values()
        .filter(|p| p.prewarm > 0 && p.persistent)
        .cloned()
        .collect();
    if profiles.is_empty() {
        return;
    }
    let pool = registry.pool();
    loop {
        for profile in &profiles {
            pool.fill(profile, &registry.metrics);
        }
        tokio::select! {
            _ = pool.refill.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    let all: Vec<(ChildProcess, Duration)> = {
        let mut warm = pool.warm.lock().expect("pool poisoned");
        warm.iter_mut()
            .flat_map(|(name, q)| {
                let grace = registry
                    .config
                    .profiles
                    .get(name)
                    .map_or(Duration::from_secs(1), |p| p.stop_grace);
                q.drain(..).map(move |c| (c, grace)).collect::<Vec<_>>()
            })
            .collect()
    };
    futures::future::join_all(all.into_iter().map(|(c, grace)| c.stop(grace))).await;
}
