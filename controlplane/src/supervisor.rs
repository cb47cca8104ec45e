//! Starts, watches and stops the dataplane process.
//!
//! The dataplane runs in its own process group so that a Ctrl-C in the terminal reaches only
//! `portico`, which then stops the dataplane in order. It is not killed when `portico` dies:
//! a restarted `portico` finds it through the shared-memory header (pid and a fresh
//! heartbeat) and adopts it instead of starting a second one.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portico_shared::shm::SharedMemory;
use tokio::process::{Child, Command};

/// A dataplane whose heartbeat is older than this is considered gone.
const HEARTBEAT_STALE_MS: u64 = 2_000;
/// How long the dataplane gets to come up (publish its pid) on start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

fn unix_ms() -> u64 {
    portico_dataplane::runtime::unix_ms()
}

/// How to start the dataplane: the `portico-dataplane` binary beside this executable, or,
/// where only `portico` was built (`cargo run` builds one binary), this executable's own
/// `dataplane` subcommand. Either way it is a separate process.
pub fn dataplane_command(shm_name: &str, log_level: &str) -> (PathBuf, Vec<String>) {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("portico"));
    let beside = me.with_file_name("portico-dataplane");
    let mut args = Vec::new();
    let program = if beside.is_file() {
        beside
    } else {
        args.push("dataplane".to_string());
        me
    };
    args.extend([
        "--shm".to_string(),
        shm_name.to_string(),
        "--log-level".to_string(),
        log_level.to_string(),
    ]);
    (program, args)
}

fn alive(pid: u32) -> bool {
    pid != 0 && kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// The pid of a dataplane already running on this segment, if there is one.
pub fn live_dataplane(shm: &SharedMemory) -> Option<u32> {
    let h = &shm.segment().header;
    let pid = h.dataplane_pid.load(Ordering::Relaxed);
    let beat = h.dataplane_heartbeat_ms.load(Ordering::Relaxed);
    (alive(pid) && unix_ms().saturating_sub(beat) < HEARTBEAT_STALE_MS).then_some(pid)
}

pub enum Process {
    Child(Child),
    /// A dataplane that outlived an earlier `portico`; not our child, so watched by pid.
    Adopted(u32),
}

pub struct Dataplane {
    pub process: Process,
    pub started: Instant,
}

impl Dataplane {
    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Child(c) => c.id().unwrap_or(0),
            Process::Adopted(p) => *p,
        }
    }

    /// Starts a dataplane and waits until it reports itself up in shared memory.
    pub async fn start(shm: &SharedMemory, log_level: &str) -> Result<Dataplane, String> {
        let (program, args) = dataplane_command(shm.name(), log_level);
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the dataplane exited during start ({status})"));
            }
            if shm.segment().header.dataplane_pid.load(Ordering::Relaxed) == pid {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err("the dataplane did not come up within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Dataplane {
            process: Process::Child(child),
            started: Instant::now(),
        })
    }

    pub fn adopt(pid: u32) -> Dataplane {
        Dataplane {
            process: Process::Adopted(pid),
            started: Instant::now(),
        }
    }

    /// Resolves when the dataplane process has ended, with a description of how.
    pub async fn exited(&mut self) -> String {
        match &mut self.process {
            Process::Child(c) => match c.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            },
            Process::Adopted(pid) => {
                while alive(*pid) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                "adopted dataplane is gone".into()
            }
        }
    }

    /// SIGTERM, then SIGKILL if it does not stop in time.
    pub async fn stop(mut self) {
        let pid = self.pid();
        if pid == 0 {
            return;
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(STOP_TIMEOUT, self.exited())
            .await
            .is_err()
        {
            tracing::warn!(pid, "dataplane did not stop in time; killing it");
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = tokio::time::timeout(STOP_TIMEOUT, self.exited()).await;
        }
    }
}

/// Delay before the next restart: quick after a dataplane that ran a while, doubling (up to
/// 8 s) while it keeps dying right after start.
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(8);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub fn delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for > Duration::from_secs(30) {
            self.next = Self::FIRST;
        }
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::new();
        assert_eq!(b.delay(Duration::ZERO), Duration::from_millis(200));
        assert_eq!(b.delay(Duration::ZERO), Duration::from_millis(400));
        for _ in 0..10 {
            b.delay(Duration::ZERO);
        }
        assert_eq!(b.delay(Duration::ZERO), Duration::from_secs(8));
        assert_eq!(b.delay(Duration::from_secs(60)), Duration::from_millis(200));
    }
}
