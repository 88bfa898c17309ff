//! Starting a child: argv, clean environment, own process group, pipes.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{reader, ChildProcess};
use crate::config::AgentProfile;

/// Variables every child gets from the gateway's environment.
const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR", "USER"];

/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The complete environment of the child.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Set when a client chose `cwd`: it must still lie under one of these
    /// roots when the child starts, whatever happened to the path since.
    pub cwd_roots: Option<Vec<PathBuf>>,
    /// One pipe for stdout and stderr.
    pub merge_stderr: bool,
}

/// The clean environment for a child of `profile`: the base allowlist, then
/// `pass_env` names or `NAME_*` patterns from the gateway's environment, then
/// the profile's `env`.
pub fn child_env(profile: &AgentProfile) -> Vec<(String, String)> {
    let mut env = BTreeMap::new();
    for (key, value) in std::env::vars() {
        let passed = BASE_ENV.contains(&key.as_str())
            || profile.pass_env.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => *p == key,
            });
        if passed {
            env.insert(key, value);
        }
    }
    for (key, value) in &profile.env {
        env.insert(key.clone(), value.clone());
    }
    env.into_iter().collect()
}

/// Opens `cwd` and checks that the directory it names now (symlinks
/// resolved, as the kernel sees the open handle) lies under one of `roots`.
fn open_under(cwd: &Path, roots: &[PathBuf]) -> io::Result<std::fs::File> {
    let refused = || {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("cwd {} is not under the profile's cwd_roots", cwd.display()),
        )
    };
    let dir = std::fs::File::open(cwd).map_err(|_| refused())?;
    if !dir.metadata()?.is_dir() {
        return Err(refused());
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    let inside = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|root| real.starts_with(root));
    if inside {
        Ok(dir)
    } else {
        Err(refused())
    }
}

pub(super) fn spawn(spec: &SpawnSpec) -> io::Result<ChildProcess> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let (out_read, out_write) = io::pipe()?;
    let mut cmd = tokio::process::Command::new(program);
    // Every process this child starts inherits the marker, also one that
    // leaves the process group: see `super::kill_marked`.
    let marker = uuid::Uuid::new_v4().simple().to_string();
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(super::MARKER_VAR, &marker)
        .stdin(Stdio::piped())
        .process_group(0);
    let err_read = if spec.merge_stderr {
        cmd.stderr(Stdio::from(out_write.try_clone()?));
        None
    } else {
        let (err_read, err_write) = io::pipe()?;
        cmd.stderr(Stdio::from(err_write));
        Some(err_read)
    };
    cmd.stdout(Stdio::from(out_write));
    let dir = match (&spec.cwd, &spec.cwd_roots) {
        (Some(cwd), Some(roots)) => Some(open_under(cwd, roots)?),
        (Some(cwd), None) => {
            cmd.current_dir(cwd);
            None
        }
        (None, _) => None,
    };
    let dir_fd = dir.as_ref().map(|d| d.as_raw_fd());
    // SAFETY: prctl, fchdir and signal are async-signal-safe; nothing else
    // runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The gateway ignores SIGXFSZ (see main); an ignored signal
            // survives exec, so the child gets the default back.
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGXFSZ,
                nix::sys::signal::SigHandler::SigDfl,
            )
            .map_err(io::Error::from)?;
            // The directory checked above, by handle: a path swapped for a
            // symlink since cannot move the child elsewhere.
            if let Some(fd) = dir_fd {
                nix::unistd::fchdir(fd).map_err(io::Error::from)?;
            }
            // If the gateway dies without cleaning up, the leader dies with it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)
        });
    }
    let mut child = cmd.spawn()?;
    drop(dir);
    // The write ends live in `cmd`; drop them so EOF arrives when the child's copies close.
    drop(cmd);
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
    let stdout = pipe::Receiver::from_owned_fd(OwnedFd::from(out_read))?;
    let stderr = err_read
        .map(|r| pipe::Receiver::from_owned_fd(OwnedFd::from(r)))
        .transpose()?;
    let (out_tx, out_rx) = mpsc::channel(64);
    // In the caller's span (a session's), so their log lines say whose pipes they are.
    tokio::spawn(reader::read(stdout, stderr, out_tx).in_current_span());
    let stdin = child.stdin.take().expect("stdin was piped");
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(
        async move {
            let mut stdin = stdin;
            while let Some(bytes) = in_rx.recv().await {
                if let Err(e) = stdin.write_all(&bytes).await {
                    tracing::debug!(pid, error = %e, "stdin write failed");
                    break;
                }
                let _ = stdin.flush().await;
            }
        }
        .in_current_span(),
    );
    tracing::debug!(pid, argv = ?spec.argv, "spawned");
    Ok(ChildProcess {
        child,
        pid,
        stdin: Some(in_tx),
        output: out_rx,
        output_open: true,
        status: None,
        exit_reported: false,
        drain_until: None,
        group_gone: false,
        marker,
    })
}
