//! The relay and the dispatch consumer as child processes, built next to
//! this binary: a child has its own resident memory to read, and runs
//! exactly what a user deploys.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Both children log warnings only; their info lines would bury the bench's.
const CHILD_LOG_FILTER: &str = "warn,lapin=off";
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux the bench targets.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// A child process that is killed if the bench stops without [`Process::stop`].
pub struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    /// Starts binary `name` (found next to this one) with `env` on top of ours.
    pub fn spawn(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let path = sibling_binary(name)?;
        let child = Command::new(&path)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", CHILD_LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        Ok(Process { name, child })
    }

    /// Resident memory in bytes (Linux: `VmRSS` of `/proc/PID/status`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU time used so far, user plus system, in seconds (Linux:
    /// `/proc/PID/stat`, in clock ticks of 1/100 s).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of_pid(self.child.id()?)
    }

    /// Fails when the child has exited on its own.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited on its own ({status})", self.name),
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let Some(pid) = self.child.id() else {
            bail!("{} had already exited", self.name);
        };
        // No signal crate needed for one signal: kill(1) is everywhere.
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !sent.success() {
            bail!("cannot signal {} (pid {pid})", self.name);
        }
        let status = tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .with_context(|| format!("{} did not stop within 30 s", self.name))??;
        if !status.success() {
            bail!("{} stopped with {status}", self.name);
        }
        Ok(())
    }
}

/// `name` in the directory of this executable: `cargo build --release`
/// puts every binary of the workspace there.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build every binary first (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// CPU time of process `pid` so far, user plus system, in seconds.
pub fn cpu_seconds_of_pid(pid: u32) -> Option<f64> {
    cpu_seconds_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of a `/proc/…/stat` line (clock ticks of 1/100 s).
pub fn cpu_seconds_of_stat(stat: &str) -> Option<f64> {
    // The command name may hold spaces: fields count from its `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after `)`.
    Some((ticks(11)? + ticks(12)?) as f64 / CLOCK_TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime …
        let stat = "4242 (outbox relay) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 70 0 0 20 0";
        assert_eq!(cpu_seconds_of_stat(stat), Some(3.2));
        assert_eq!(cpu_seconds_of_stat("4242 (x) S 1"), None);
    }
}
