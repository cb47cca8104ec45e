//! Starts, watches, restarts and stops the dataplane process.
//!
//! The dataplane runs in its own process group so that a Ctrl-C in the terminal reaches only
//! `portico`, which then stops the dataplane in order. It is not killed when `portico` dies:
//! a restarted `portico` finds it through the shared-memory header (pid and a fresh
//! heartbeat) and adopts it instead of starting a second one, so relaying goes on untouched
//! while the control plane is away.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portico_shared::shm::SharedMemory;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::control::Control;

/// A dataplane whose heartbeat is older than this is not adopted as it is.
const HEARTBEAT_STALE_MS: u64 = 2_000;
/// How long a restarted `portico` waits for a stale heartbeat to move before it declares the
/// dataplane hung: a loaded machine can delay the dataplane's main loop for a moment.
const ADOPT_GRACE: Duration = Duration::from_secs(3);
/// A running dataplane whose heartbeat stops for this long is hung: killed and restarted.
/// Generous, because a false alarm would interrupt relayed media.
const WATCHDOG_MS: u64 = 5_000;
/// How long the dataplane gets to come up (publish its pid) on start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an adopted dataplane (not our child, so no SIGCHLD) and the heartbeat are polled.
const POLL: Duration = Duration::from_millis(50);

/// Overrides the dataplane program; used by tests so a stale `portico-dataplane` left in the
/// target directory is never picked up.
pub const DATAPLANE_ENV: &str = "PORTICO_DATAPLANE";

fn unix_ms() -> u64 {
    portico_dataplane::runtime::unix_ms()
}

/// How to start the dataplane: `$PORTICO_DATAPLANE`, else the `portico-dataplane` binary
/// beside this executable, or, where only `portico` was built (`cargo run` builds one
/// binary), this executable's own `dataplane` subcommand. Either way it is a separate process.
pub fn dataplane_command(shm_name: &str, log_level: &str) -> (PathBuf, Vec<String>) {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("portico"));
    let chosen = match std::env::var_os(DATAPLANE_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => me.with_file_name("portico-dataplane"),
    };
    let mut args = Vec::new();
    let is_me = std::fs::canonicalize(&chosen).ok() == std::fs::canonicalize(&me).ok();
    let program = if chosen.is_file() && !is_me {
        chosen
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

/// Alive and not a zombie: an orphaned dataplane that died is a zombie until its new parent
/// reaps it, and `kill(pid, 0)` alone would call it alive.
pub fn alive(pid: u32) -> bool {
    if pid == 0 || kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name, which may hold spaces.
        Ok(stat) => !matches!(
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].trim_start().chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => false,
    }
}

/// Whether `pid` is a live `portico` control plane (not a `portico dataplane`), so a second
/// one on the same state dir can refuse to start instead of fighting over the dataplane.
pub fn is_control_plane(pid: u32) -> bool {
    if !alive(pid) {
        return false;
    }
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    let is_portico = args
        .first()
        .is_some_and(|a| a.rsplit(|b| *b == b'/').next() == Some(b"portico".as_slice()));
    is_portico && args.get(1).copied() != Some(b"dataplane".as_slice())
}

/// Whether `pid` is a dataplane serving this segment, not some process that reused the pid.
fn serves_segment(pid: u32, shm_name: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => cmd.split(|b| *b == 0).any(|arg| arg == shm_name.as_bytes()),
        Err(_) => false,
    }
}

fn heartbeat_age_ms(shm: &SharedMemory) -> u64 {
    let beat = shm
        .segment()
        .header
        .dataplane_heartbeat_ms
        .load(Ordering::Relaxed);
    unix_ms().saturating_sub(beat)
}

/// The pid of a dataplane running on this segment with a fresh heartbeat, if there is one.
pub fn live_dataplane(shm: &SharedMemory) -> Option<u32> {
    let pid = shm.segment().header.dataplane_pid.load(Ordering::Relaxed);
    (alive(pid) && heartbeat_age_ms(shm) < HEARTBEAT_STALE_MS).then_some(pid)
}

/// Finds a dataplane a previous `portico` left running on this segment. One whose heartbeat
/// stays stale is hung: it is killed, so that the caller starts a fresh one instead of
/// leaving it holding the listen ports.
pub async fn find_running(shm: &SharedMemory) -> Option<u32> {
    let pid = shm.segment().header.dataplane_pid.load(Ordering::Relaxed);
    if !alive(pid) || !serves_segment(pid, shm.name()) {
        return None;
    }
    let deadline = Instant::now() + ADOPT_GRACE;
    loop {
        if heartbeat_age_ms(shm) < HEARTBEAT_STALE_MS {
            return Some(pid);
        }
        if !alive(pid) {
            return None;
        }
        if Instant::now() > deadline {
            tracing::warn!(
                pid,
                "the running dataplane's heartbeat is stale; killing it"
            );
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            while alive(pid) {
                tokio::time::sleep(POLL).await;
            }
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
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
                let _ = child.wait().await;
                return Err("the dataplane did not come up within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
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

    /// Resolves when the dataplane process has ended, with a description of how. A dataplane
    /// whose heartbeat stops while its process lives is hung and gets killed here.
    pub async fn exited(&mut self, shm: &SharedMemory) -> String {
        let pid = self.pid();
        let mut watchdog_fired = false;
        loop {
            match &mut self.process {
                Process::Child(c) => {
                    if let Ok(Some(status)) = c.try_wait() {
                        return if watchdog_fired {
                            format!("killed by the watchdog: {status}")
                        } else {
                            status.to_string()
                        };
                    }
                }
                Process::Adopted(p) => {
                    if !alive(*p) {
                        return if watchdog_fired {
                            "killed by the watchdog".into()
                        } else {
                            "the adopted dataplane is gone".into()
                        };
                    }
                }
            }
            if !watchdog_fired && heartbeat_age_ms(shm) > WATCHDOG_MS {
                tracing::error!(pid, "dataplane heartbeat stopped for 5 s; killing it");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                watchdog_fired = true;
            }
            match &mut self.process {
                // SIGCHLD wakes this at once; the timeout keeps the heartbeat watched.
                Process::Child(c) => {
                    let _ = tokio::time::timeout(POLL, c.wait()).await;
                }
                Process::Adopted(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// SIGTERM, then SIGKILL if it does not stop in time.
    pub async fn stop(mut self, shm: &SharedMemory) {
        let pid = self.pid();
        if pid == 0 {
            return;
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(STOP_TIMEOUT, self.exited(shm))
            .await
            .is_err()
        {
            tracing::warn!(pid, "dataplane did not stop in time; killing it");
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = tokio::time::timeout(STOP_TIMEOUT, self.exited(shm)).await;
        }
    }
}

/// Keeps a dataplane running until `stop` fires, then stops it. Every restart is counted in
/// the control plane's metrics and logged.
pub async fn supervise(
    control: Arc<Control>,
    mut dataplane: Dataplane,
    stop: oneshot::Receiver<()>,
) {
    let shm = &control.shm;
    let mut stop = stop;
    let mut backoff = Backoff::new();
    loop {
        let how = tokio::select! {
            _ = &mut stop => {
                dataplane.stop(shm).await;
                return;
            }
            how = dataplane.exited(shm) => how,
        };
        let delay = backoff.delay(dataplane.started.elapsed());
        control
            .shm
            .segment()
            .header
            .dataplane_restarts
            .fetch_add(1, Ordering::Relaxed);
        let restarts = control.metrics.dataplane_restarts.inc() + 1;
        tracing::error!(
            pid = dataplane.pid(),
            restarts,
            "dataplane exited ({how}); restarting in {delay:?}"
        );
        let mut delay = delay;
        dataplane = loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(delay) => {}
            }
            // Not raced against `stop`: a start abandoned half way would leave an orphan.
            match Dataplane::start(shm, &control.log_level()).await {
                Ok(d) => {
                    tracing::info!(pid = d.pid(), restarts, "dataplane restarted");
                    break d;
                }
                Err(e) => {
                    delay = backoff.delay(Duration::ZERO);
                    tracing::error!("dataplane restart failed: {e}; retrying in {delay:?}");
                }
            }
        };
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

    #[test]
    fn this_process_is_alive_and_pid_zero_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(0));
    }

    #[test]
    fn a_reaped_child_is_not_alive_and_a_zombie_is_not_either() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped yet: a zombie.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(pid), "a zombie counts as dead");
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
