//! The session's agent process as one value: no process, a child (starting,
//! ready or retiring), a child being stopped beside the task, or a one-shot
//! run. Being one enum, the states cannot contradict each other (a one-shot
//! run beside a live child, a ready child that is also retiring), and the
//! session's public state is derived from it in one place
//! ([`Actor::derived_state`]).

use super::*;

/// What runs for the session now.
pub(super) enum Lifecycle {
    /// Nothing: the next message starts a child (or a one-shot run).
    Idle,
    /// A live child (boxed: it is most of the enum's size).
    Child(Box<Child>),
    /// A child stopped beside the task is still exiting: no new child starts
    /// before it is gone (claude flushes the transcript that `--resume`
    /// reads).
    Stopping(tokio::sync::oneshot::Receiver<()>),
    /// A message runs through the profile's one-shot command.
    OneShot(FallbackRun),
}

/// Where a live child is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Phase {
    /// Started; the adapter waits for the agent to say it is ready, and the
    /// child is killed if it has not by `deadline`.
    Starting { deadline: Instant },
    /// Takes messages.
    Ready,
    /// Ended on purpose: takes no message, its exit is not a crash; killed
    /// at `deadline` if it is still there.
    Retiring { deadline: Instant },
}

/// A live child and its protocol adapter.
pub(super) struct Child {
    pub(super) proc: ChildProcess,
    pub(super) adapter: Box<dyn Adapter>,
    pub(super) phase: Phase,
    /// The gateway sent it SIGINT (an interrupt): an exit by that signal is
    /// the gateway's doing, not a crash.
    pub(super) sigint_sent: bool,
    /// Whether it printed anything yet (the stall watchdog starts then).
    pub(super) spoke: bool,
}

impl Child {
    pub(super) fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub(super) fn is_retiring(&self) -> bool {
        matches!(self.phase, Phase::Retiring { .. })
    }

    /// When the child is killed unless it moves on (ready, or gone).
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Starting { deadline } | Phase::Retiring { deadline } => Some(deadline),
            Phase::Ready => None,
        }
    }
}

impl Lifecycle {
    pub(super) fn child(&self) -> Option<&Child> {
        match self {
            Lifecycle::Child(c) => Some(&**c),
            _ => None,
        }
    }

    pub(super) fn child_mut(&mut self) -> Option<&mut Child> {
        match self {
            Lifecycle::Child(c) => Some(&mut **c),
            _ => None,
        }
    }

    /// The live child, which leaves the lifecycle at [`Lifecycle::Idle`].
    pub(super) fn take_child(&mut self) -> Option<Child> {
        self.take(|l| match l {
            Lifecycle::Child(c) => Ok(*c),
            other => Err(other),
        })
    }

    /// The one-shot run, which leaves the lifecycle at [`Lifecycle::Idle`].
    pub(super) fn take_one_shot(&mut self) -> Option<FallbackRun> {
        self.take(|l| match l {
            Lifecycle::OneShot(run) => Ok(run),
            other => Err(other),
        })
    }

    /// The stop beside the task, which leaves the lifecycle at
    /// [`Lifecycle::Idle`].
    pub(super) fn take_stopping(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.take(|l| match l {
            Lifecycle::Stopping(rx) => Ok(rx),
            other => Err(other),
        })
    }

    /// What `pick` takes out of the lifecycle (which is then `Idle`); a
    /// lifecycle it gives back stays as it was.
    fn take<T>(&mut self, pick: impl FnOnce(Lifecycle) -> Result<T, Lifecycle>) -> Option<T> {
        match pick(std::mem::replace(self, Lifecycle::Idle)) {
            Ok(taken) => Some(taken),
            Err(other) => {
                *self = other;
                None
            }
        }
    }

    /// The next thing the process does: output or exit of a child, a
    /// one-shot run's signal or end, the end of a stop beside the task.
    /// Pending forever when nothing runs.
    pub(super) async fn next(&mut self) -> Wake {
        match self {
            Lifecycle::Idle => std::future::pending().await,
            Lifecycle::Child(c) => Wake::Child(c.proc.next_event().await),
            Lifecycle::Stopping(rx) => {
                let _ = rx.await;
                Wake::Stopped
            }
            Lifecycle::OneShot(run) => Wake::Fallback(run.rx.recv().await),
        }
    }
}

impl Actor {
    /// The session's state as the lifecycle and the running message make
    /// it. `Closed` once closed; a child starting is `Starting`; a ready
    /// child or a profile without persistent children is `Busy` while a
    /// message runs and `Idle` otherwise; anything else (no child, one being
    /// stopped or retiring) is `Suspended`.
    pub(super) fn derived_state(&self) -> SessionState {
        if self.closed {
            return SessionState::Closed;
        }
        let by_run = if self.current.is_some() {
            SessionState::Busy
        } else {
            SessionState::Idle
        };
        // Without a ready child a persistent profile is suspended; one that
        // runs every message one-shot is idle or busy all the same.
        let no_child = if self.shared.profile.persistent {
            SessionState::Suspended
        } else {
            by_run
        };
        match &self.lifecycle {
            Lifecycle::Child(c) => match c.phase {
                Phase::Starting { .. } => SessionState::Starting,
                Phase::Ready => by_run,
                Phase::Retiring { .. } => no_child,
            },
            Lifecycle::OneShot(_) => by_run,
            Lifecycle::Idle | Lifecycle::Stopping(_) => no_child,
        }
    }
}
