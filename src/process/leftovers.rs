//! Ending what a killed gateway left running.
//!
//! A gateway that dies by `kill -9` cannot stop its children. Each leader
//! dies with it (`PR_SET_PDEATHSIG`), but whatever the leader started —
//! `sh -c 'sleep 1000 & exec cat'`, a tool command of claude — lives on in
//! the leader's process group. The session task records every child it
//! adopts (pid and start time, in the store); the next gateway on that
//! store ends those groups before it serves anything.
//!
//! A pid alone is not an identity: it is reused. A recorded group is ended
//! only when its leader still runs with the recorded start time, or when the
//! leader is gone and the group's members all started after it (a process
//! group id cannot be handed out again while members of the old group
//! remain). Processes that left the group (`setsid`) are not reached: a
//! service manager's cgroup (`deploy/agentgate.service`,
//! `KillMode=control-group`) is the complete answer.

use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its process group.
    pub pgrp: u32,
    /// Clock ticks after boot when it started (field 22).
    pub start_time: u64,
    /// A zombie: dead, waiting to be reaped by its parent.
    pub zombie: bool,
}

/// Reads `/proc/PID/stat`; `None` when no such process exists.
pub fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses one `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces or parentheses itself: fields are counted
/// from the last `)`.
fn parse_stat(line: &str) -> Option<ProcStat> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field N is fields[N - 3].
    Some(ProcStat {
        zombie: *fields.first()? == "Z",
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// A gateway process: where it runs and which process it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// Hostname and boot id: pids and start times mean something only on
    /// the machine, and the boot, that handed them out.
    pub host: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot.
    pub start_time: u64,
}

impl Gateway {
    /// This process.
    pub fn me() -> &'static Gateway {
        static ME: std::sync::OnceLock<Gateway> = std::sync::OnceLock::new();
        ME.get_or_init(|| {
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            let pid = std::process::id();
            Gateway {
                host: format!(
                    "{}/{}",
                    read("/proc/sys/kernel/hostname").trim(),
                    read("/proc/sys/kernel/random/boot_id").trim()
                ),
                pid,
                start_time: stat(pid).map_or(0, |s| s.start_time),
            }
        })
    }

    /// True when this gateway is gone: it ran on this machine in this boot,
    /// and no live process has its pid and start time. A gateway of another
    /// machine is never taken for gone.
    pub fn is_gone(&self) -> bool {
        let here = Gateway::me();
        self.host == here.host
            && *self != *here
            && !stat(self.pid).is_some_and(|s| !s.zombie && s.start_time == self.start_time)
    }
}

/// A child a previous gateway recorded: its pid (= process group id) and
/// start time.
#[derive(Debug, Clone, Copy)]
pub struct Leftover {
    /// The leader's pid, which is its process group id.
    pub pid: u32,
    /// The leader's start time in clock ticks after boot.
    pub start_time: u64,
}

/// Live processes of `group`'s recorded process group, or empty when the
/// group is not the recorded one any more.
fn members(group: &Leftover) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    if let Some(leader) = stat(group.pid) {
        if !leader.zombie && leader.start_time != group.start_time {
            // The pid is someone else's now, and so is any group it leads.
            return vec![];
        }
    }
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat(pid).is_some_and(|s| {
                s.pgrp == group.pid && !s.zombie && s.start_time >= group.start_time
            })
        })
        .collect()
}

/// Ends every recorded group that is still there: SIGTERM, up to `grace`
/// for it to go, then SIGKILL. Returns how many processes were found.
pub async fn end(groups: &[Leftover], grace: Duration) -> usize {
    let found: Vec<(Leftover, Vec<u32>)> = groups
        .iter()
        .map(|g| (*g, members(g)))
        .filter(|(_, m)| !m.is_empty())
        .collect();
    let count = found.iter().map(|(_, m)| m.len()).sum();
    for (group, pids) in &found {
        tracing::warn!(
            pgid = group.pid,
            processes = pids.len(),
            "ending children a previous gateway left running"
        );
        signal_group(group, pids, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while found.iter().any(|(g, _)| !members(g).is_empty()) {
        if tokio::time::Instant::now() >= deadline {
            for (group, _) in &found {
                let pids = members(group);
                signal_group(group, &pids, Signal::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    count
}

/// Signals the group, and each member by pid as well (a group whose leader
/// is gone is still signalled whole by `killpg`; the per-pid signal covers
/// a member that raced into it).
fn signal_group(group: &Leftover, pids: &[u32], signal: Signal) {
    if pids.is_empty() {
        return;
    }
    let _ = killpg(Pid::from_raw(group.pid as i32), signal);
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line =
            "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                pgrp: 4240,
                start_time: 987654,
                zombie: false
            })
        );
        assert!(
            parse_stat("7 (z) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0")
                .unwrap()
                .zombie
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_reads_as_itself() {
        let me = stat(std::process::id()).unwrap();
        assert!(!me.zombie);
        assert!(me.start_time > 0);
    }

    #[tokio::test]
    async fn a_recorded_group_and_its_grandchild_are_ended() {
        use std::os::unix::process::CommandExt;
        // A leader that starts a grandchild in its group, like `sh -c 'sleep & cat'`.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & echo $!; exec sleep 1000"])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        let pid = leader.id();
        let start_time = stat(pid).unwrap().start_time;

        // A record whose start time is not the leader's is someone else's group.
        let stale = Leftover {
            pid,
            start_time: start_time + 1,
        };
        assert_eq!(end(&[stale], Duration::from_secs(1)).await, 0);
        assert!(stat(grandchild).is_some_and(|s| !s.zombie));

        let found = end(&[Leftover { pid, start_time }], Duration::from_secs(5)).await;
        assert_eq!(found, 2);
        leader.wait().unwrap();
        // The grandchild is not ours to reap; it is gone or a zombie of init.
        let gone = |p| stat(p).is_none_or(|s| s.zombie);
        for _ in 0..250 {
            if gone(grandchild) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(grandchild), "the grandchild survived");
    }
}
