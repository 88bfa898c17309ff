//! Child processes: spawn, read, signal, stop.
//!
//! Every child — persistent or one-shot — is spawned the same way: from argv
//! (never a shell), in its own process group, with a clean environment, its
//! stdin piped through a writer task and its stdout/stderr read by one reader
//! task. Stopping it is always: close stdin, grace, SIGTERM to the group,
//! grace, SIGKILL to the group, reap. A dropped [`ChildProcess`] SIGKILLs its
//! whole group, because `kill_on_drop` would only reach the leader and a
//! grandchild would keep the pipes open.

pub mod leftovers;
mod reader;
mod spawn;

use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use spawn::{child_env, SpawnSpec};

/// One piece of what a child printed, or its end.
#[derive(Debug)]
pub enum ChildEvent {
    /// Bytes read from stdout (or the merged stdout+stderr pipe).
    Stdout(Bytes),
    /// Bytes read from stderr.
    Stderr(Bytes),
    /// The leader exited; everything it printed before has been delivered.
    Exited(ExitStatus),
}

/// How long after the leader exits the reader may still deliver buffered output.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// A running child in its own process group.
#[derive(Debug)]
pub struct ChildProcess {
    child: tokio::process::Child,
    pid: u32,
    stdin: Option<mpsc::UnboundedSender<Bytes>>,
    output: mpsc::Receiver<ChildEvent>,
    output_open: bool,
    status: Option<ExitStatus>,
    exit_reported: bool,
    drain_until: Option<Instant>,
    group_gone: bool,
    /// The value of [`MARKER_VAR`] in this child's environment.
    marker: String,
}

/// The environment variable that marks every process a child starts.
pub const MARKER_VAR: &str = "CHILD_OF_AGENTGATE";

/// SIGKILLs every process of this user whose environment carries child
/// `marker`: the descendants that left the child's process group (`setsid`,
/// a daemonising tool) and so escaped the group kill. Read from
/// `/proc/PID/environ` (readable for this user's own processes only). A
/// descendant that also cleared its environment is not found: no cgroup
/// here (see SECURITY.md). Returns how many were killed.
pub fn kill_marked(marker: &str) -> usize {
    let needle = format!("{MARKER_VAR}={marker}");
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            killed += 1;
        }
    }
    if killed > 0 {
        tracing::info!(
            killed,
            "ended processes that had left a child's process group"
        );
    }
    killed
}

/// [`kill_marked`] off the async threads (it reads `/proc`).
fn kill_marked_beside(marker: String) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || kill_marked(&marker));
        }
        Err(_) => {
            kill_marked(&marker);
        }
    }
}

impl ChildProcess {
    /// Starts `spec` in a new process group.
    pub fn spawn(spec: &SpawnSpec) -> io::Result<ChildProcess> {
        spawn::spawn(spec)
    }

    /// The leader's pid, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Queues bytes for the child's stdin. False when stdin is closed.
    pub fn write(&self, bytes: Bytes) -> bool {
        self.stdin.as_ref().is_some_and(|tx| tx.send(bytes).is_ok())
    }

    /// Closes stdin once every queued write has been written.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends `signal` to the whole process group. Sending to a group that is
    /// already gone counts as success.
    pub fn signal(&self, signal: Signal) {
        if self.group_gone {
            return;
        }
        if let Err(e) = killpg(Pid::from_raw(self.pid as i32), signal) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pid = self.pid, ?signal, error = %e, "killpg failed");
            }
        }
    }

    /// The next output or the exit. Output the child wrote before it exited
    /// comes before [`ChildEvent::Exited`]; after the exit the rest of the
    /// group is killed, so a grandchild holding the pipe cannot delay the
    /// end. Cancel-safe; pends forever once the exit was reported.
    pub async fn next_event(&mut self) -> ChildEvent {
        loop {
            if let Some(status) = self.status {
                if self.output_open {
                    let until = self.drain_until.unwrap_or_else(Instant::now);
                    match tokio::time::timeout_at(until, self.output.recv()).await {
                        Ok(Some(event)) => return event,
                        _ => self.output_open = false,
                    }
                }
                if !self.exit_reported {
                    self.exit_reported = true;
                    return ChildEvent::Exited(status);
                }
                return std::future::pending().await;
            }
            tokio::select! {
                biased;
                event = self.output.recv(), if self.output_open => match event {
                    Some(event) => return event,
                    None => self.output_open = false,
                },
                status = self.child.wait() => {
                    let status = status.unwrap_or_else(|e| {
                        tracing::warn!(pid = self.pid, error = %e, "wait failed");
                        std::os::unix::process::ExitStatusExt::from_raw(-1)
                    });
                    self.reaped(status);
                }
            }
        }
    }

    /// Output the reader has already delivered, without waiting; `None` when
    /// there is none right now (or the child has exited: then
    /// [`ChildProcess::next_event`] drains the rest in order).
    pub fn try_next_output(&mut self) -> Option<ChildEvent> {
        if self.status.is_some() || !self.output_open {
            return None;
        }
        self.output.try_recv().ok()
    }

    /// Whether the leader has exited (reaps it if so, without waiting).
    pub fn try_exited(&mut self) -> bool {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped(status);
            }
        }
        self.status.is_some()
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        self.drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
        // Whatever the leader left behind in its group goes with it, and
        // so does what left the group.
        self.signal(Signal::SIGKILL);
        self.group_gone = true;
        self.stdin = None;
        kill_marked_beside(self.marker.clone());
    }

    /// Stops the child: close stdin, wait `grace`, SIGTERM the group, wait
    /// `grace`, SIGKILL the group, reap. Output printed meanwhile is
    /// discarded (read, so a child blocked on a full pipe can still exit).
    pub async fn stop(mut self, grace: Duration) -> ExitStatus {
        self.close_stdin();
        let steps = [None, Some(Signal::SIGTERM), Some(Signal::SIGKILL)];
        for signal in steps {
            if let Some(signal) = signal {
                self.signal(signal);
            }
            let until = Instant::now()
                + if signal == Some(Signal::SIGKILL) {
                    Duration::from_secs(10)
                } else {
                    grace
                };
            loop {
                if self.exit_reported {
                    return self.status.expect("reported exit has a status");
                }
                match tokio::time::timeout_at(until, self.next_event()).await {
                    Ok(ChildEvent::Exited(status)) => return status,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        // SIGKILL cannot be ignored; reaching this means the kernel is stuck.
        tracing::error!(pid = self.pid, "child did not die after SIGKILL");
        std::os::unix::process::ExitStatusExt::from_raw(-1)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.group_gone {
            // tokio reaps the dropped leader in the background.
            self.signal(Signal::SIGKILL);
            kill_marked_beside(std::mem::take(&mut self.marker));
        }
    }
}

/// Describes an exit status for people: `exit code 1`, `signal 9 (SIGKILL)`.
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        }
    } else {
        "unknown exit".to_string()
    }
}

/// `path` made absolute against the current directory with `.` and `..`
/// folded, without touching the filesystem (symlinks are not resolved).
pub fn lexical_absolute(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let base = if path.is_absolute() {
        std::path::PathBuf::new()
    } else {
        std::env::current_dir().unwrap_or_else(|_| "/".into())
    };
    let mut out = base;
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
