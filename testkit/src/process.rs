//! Processes: the tests' own children (killed when dropped), other processes by pid, polling
//! with a bound, third-party tools run with a time limit, and the gate that lets a heavy test
//! run without the other tests of its binary.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Polls `f` every 10 ms until it holds (true) or `limit` passes (false).
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True while `pid` is a live process. A zombie counts as gone: it runs no code and holds no
/// socket (an orphaned dataplane that died is a zombie until its new parent reaps it).
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next()),
            Some("Z") | Some("X") | None
        ),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` (a process this test started, or its dataplane); errors are ignored:
/// the process may be gone already.
pub fn signal(pid: u32, sig: Signal) {
    if pid != 0 {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Pids of live processes (not this one) whose command line has an argument equal to `needle`.
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) {
            if cmd.split(|b| *b == 0).any(|a| a == needle.as_bytes()) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out.sort();
    out
}

/// Resident memory of `pid` in KiB (VmRSS), 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// True once `pid` catches SIGHUP, SIGINT and SIGTERM (its `SigCgt` mask in /proc).
pub fn handles_signals(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let Some(mask) = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
    else {
        return false;
    };
    [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM]
        .iter()
        .all(|s| mask & (1u64 << (*s as i32 - 1)) != 0)
}

/// Waits (bounded) for `child` to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// A child process of the test, stopped when dropped: SIGTERM (so `portico` stops its
/// dataplane, which by design outlives a SIGKILLed control plane), SIGKILL after 10 s.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let f2 = f.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: Signal) {
        signal(self.pid(), sig);
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Sends `sig` and waits for the exit, at most `limit`.
    pub fn stop(&mut self, sig: Signal, limit: Duration) -> Option<ExitStatus> {
        self.signal(sig);
        wait_exit(&mut self.child, limit)
    }

    /// SIGTERM and waits for the exit, at most `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.stop(Signal::SIGTERM, limit)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.terminate(Duration::from_secs(10)).is_none() {
                self.kill9();
            }
        }
    }
}

/// Waits until something accepts TCP connections on `addr`; fails with `proc`'s log.
pub fn wait_port(addr: std::net::SocketAddr, proc: &Proc) {
    let up = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    assert!(
        up,
        "{} does not accept on {addr}; its log:\n{}",
        proc.name,
        proc.log_text()
    );
}

// ---------------------------------------------------------------------------------------------
// Third-party tools

/// The full path of the program `name`, found on PATH or in the sbin directories a non-login
/// shell may lack; a missing tool fails the test with the package to install (interop is only
/// proven by running it: nothing is skipped).
pub fn require(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    for dir in std::env::split_paths(&path).chain(sbin) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed (Debian package `{package}`); scripts/test.sh installs it, \
         or run: apt-get install {package}"
    );
}

/// What a tool printed and how it ended.
pub struct Run {
    pub stdout: String,
    pub stderr: String,
    /// stdout, then stderr.
    pub text: String,
    pub code: Option<i32>,
    pub timed_out: bool,
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `program args` with `env` under coreutils `timeout`, which kills it after `limit`
/// (none of the tools has a time limit of its own).
pub fn run<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    env: &[(&str, &str)],
    limit: Duration,
) -> Run {
    let mut c = Command::new("timeout");
    c.arg("-k")
        .arg("2")
        .arg(format!("{}", limit.as_secs().max(1)))
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("running {} under timeout: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code();
    Run {
        text: format!("{stdout}{stderr}"),
        stdout,
        stderr,
        code,
        // timeout(1) exits 124 when it had to stop the command.
        timed_out: code == Some(124),
    }
}

// ---------------------------------------------------------------------------------------------
// Running alone

/// Not `Send` (a hold belongs to the thread that took it), but `Sync`.
type NotSend = PhantomData<std::sync::MutexGuard<'static, ()>>;

/// Tests of one binary run in parallel. A heavy test (a flood of tens of thousands of
/// sources) would slow the others' timing assertions down, and they its own; it takes the
/// gate exclusively with [`alone`], every [`Portico`](crate::Portico) holds it shared.
static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// This thread's shared hold: how many of its Porticos are alive, and the guard.
    static SHARED: RefCell<(usize, Option<RwLockReadGuard<'static, ()>>)> =
        const { RefCell::new((0, None)) };
    static ALONE: RefCell<bool> = const { RefCell::new(false) };
}

/// Held by a test that runs alone: no [`Portico`](crate::Portico) of another test exists
/// while it lives (it waits for those to end, and theirs for it).
pub struct Alone {
    _guard: RwLockWriteGuard<'static, ()>,
    _not_send: NotSend,
}

/// Waits until no other test of this binary has a Portico running, and keeps them from
/// starting one until the returned guard is dropped. Take it before starting anything.
pub fn alone() -> Alone {
    let guard = GATE.write().unwrap_or_else(|p| p.into_inner());
    ALONE.with(|a| *a.borrow_mut() = true);
    Alone {
        _guard: guard,
        _not_send: PhantomData,
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.with(|a| *a.borrow_mut() = false);
    }
}

/// A shared hold on the gate, one per [`Portico`](crate::Portico); not `Send`, since the hold
/// belongs to the thread (the test) that took it.
pub(crate) struct Shared {
    counted: bool,
    _not_send: NotSend,
}

pub(crate) fn shared() -> Shared {
    if ALONE.with(|a| *a.borrow()) {
        return Shared {
            counted: false,
            _not_send: PhantomData,
        };
    }
    SHARED.with(|s| {
        let mut s = s.borrow_mut();
        if s.0 == 0 {
            s.1 = Some(GATE.read().unwrap_or_else(|p| p.into_inner()));
        }
        s.0 += 1;
    });
    Shared {
        counted: true,
        _not_send: PhantomData,
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.counted {
            SHARED.with(|s| {
                let mut s = s.borrow_mut();
                s.0 -= 1;
                if s.0 == 0 {
                    s.1 = None;
                }
            });
        }
    }
}
