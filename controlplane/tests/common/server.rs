//! Runs the real `portico` binary for a test: its own temporary state dir (so its own
//! shared-memory object), free ports, a log file, and a clean stop when the test ends.

use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portico_shared::counters::Counter;
use portico_shared::shm::{Driver, SharedMemory};

use super::ports::free_port;
use super::stun::{Builder, Msg, BINDING_SUCCESS};

/// How long `portico` gets to answer its first Binding request.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long `portico` gets to stop after SIGTERM before the harness kills it.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

pub const LOCAL4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
pub const ALT4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
pub const LOCAL6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

/// What a test wants from its server; rendered into a TOML file.
#[derive(Clone, Debug)]
pub struct Setup {
    /// `turn.io`: "auto", "io_uring" or "epoll".
    pub io: &'static str,
    pub workers: usize,
    /// Also listen on [::1].
    pub ipv6: bool,
    /// `[stun] software`; `None` leaves the default.
    pub software: Option<String>,
    /// RFC 5780: listen on 127.0.0.1 only and set `alternate_ip = "127.0.0.2"` with an
    /// alternate port.
    pub rfc5780: bool,
    /// Lines appended to the `[turn]` table.
    pub turn_extra: String,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            io: "auto",
            workers: 1,
            ipv6: true,
            software: None,
            rfc5780: false,
            turn_extra: String::new(),
        }
    }
}

impl Setup {
    pub fn io(mut self, io: &'static str) -> Setup {
        self.io = io;
        self
    }

    pub fn workers(mut self, n: usize) -> Setup {
        self.workers = n;
        self
    }

    pub fn software(mut self, s: &str) -> Setup {
        self.software = Some(s.to_string());
        self
    }

    /// RFC 5780 on 127.0.0.1 (primary) and 127.0.0.2 (alternate), listening on IPv4 only
    /// unless [`Setup::ipv6`] turns it back on.
    pub fn rfc5780(mut self) -> Setup {
        self.rfc5780 = true;
        self.ipv6 = false;
        self
    }

    pub fn ipv6(mut self, on: bool) -> Setup {
        self.ipv6 = on;
        self
    }
}

/// Ports and paths of one server instance.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub port: u16,
    pub alt_port: Option<u16>,
    pub api_port: u16,
}

impl Layout {
    /// A fresh temporary directory with free ports for `setup`.
    pub fn new(tag: &str, setup: &Setup) -> Layout {
        let root = temp_dir(tag);
        let state_dir = root.join("state");
        fs::create_dir_all(&state_dir).unwrap_or_else(|e| panic!("{}: {e}", state_dir.display()));
        let mut ips = vec![LOCAL4];
        if setup.ipv6 {
            ips.push(LOCAL6);
        }
        if setup.rfc5780 {
            ips.push(ALT4);
        }
        let port = free_port(&ips);
        let alt_port = setup.rfc5780.then(|| free_port(&[LOCAL4, ALT4]));
        let api_port = free_port(&[LOCAL4]);
        Layout {
            config_path: root.join("portico.toml"),
            log_path: root.join("portico.log"),
            root,
            state_dir,
            port,
            alt_port,
            api_port,
        }
    }

    /// The configuration file for `setup` on these ports.
    pub fn render(&self, setup: &Setup) -> String {
        let mut listen = vec![format!("\"127.0.0.1:{}\"", self.port)];
        if setup.ipv6 {
            listen.push(format!("\"[::1]:{}\"", self.port));
        }
        let mut t = format!(
            "# Written by the Portico integration test harness.\n\
             state_dir = {}\n\
             log_level = \"info\"\n\n\
             [turn]\n\
             listen = [{}]\n\
             workers = {}\n\
             io = \"{}\"\n{}\n\
             [stun]\n",
            toml_string(&self.state_dir.to_string_lossy()),
            listen.join(", "),
            setup.workers,
            setup.io,
            setup.turn_extra,
        );
        if let Some(s) = &setup.software {
            t.push_str(&format!("software = {}\n", toml_string(s)));
        }
        if let Some(q) = self.alt_port {
            t.push_str(&format!(
                "alternate_ip = \"127.0.0.2\"\nalternate_port = {q}\n"
            ));
        }
        t.push_str(&format!(
            "\n[api]\nlisten = \"127.0.0.1:{}\"\n",
            self.api_port
        ));
        t
    }

    pub fn shm_name(&self) -> String {
        SharedMemory::name_for_state_dir(&self.state_dir)
    }
}

/// A TOML basic string with the characters TOML requires escaped.
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A directory of its own under the system temp dir; removed by [`Portico`]'s drop unless
/// the test failed (then it is kept for the post-mortem and its path printed).
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("portico-it-{}-{n}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    d
}

/// The `portico` binary to start.
///
/// `portico` runs the `portico-dataplane` binary beside it when there is one, else its own
/// `dataplane` subcommand. `cargo test -p portico` rebuilds `portico` but not
/// `portico-dataplane`, so after a dataplane change the binary beside it can be stale (and
/// refuse a newer shared-memory layout). Then the tests run a hard link of `portico` in a
/// directory of its own, which has nothing beside it, so the dataplane comes from the same
/// build. `cargo build --workspace` (as scripts/test.sh does) keeps the real binary in use.
pub fn portico_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_portico"));
        let beside = bin.with_file_name("portico-dataplane");
        if !beside.is_file() || !is_stale(&beside) {
            return bin;
        }
        remove_dead_bin_dirs();
        let dir = std::env::temp_dir().join(format!("portico-it-bin-{}", std::process::id()));
        let alone = dir.join("portico");
        let _ = fs::remove_dir_all(&dir);
        let linked = fs::create_dir_all(&dir).and_then(|_| {
            fs::hard_link(&bin, &alone).or_else(|_| fs::copy(&bin, &alone).map(drop))
        });
        match linked {
            Ok(()) => {
                eprintln!(
                    "note: {} is older than its sources; running {} (dataplane as its subcommand). \
                     `cargo build --workspace` refreshes it.",
                    beside.display(),
                    alone.display()
                );
                alone
            }
            Err(e) => panic!(
                "{} is stale and {} could not be made ({e}); run `cargo build --workspace`",
                beside.display(),
                alone.display()
            ),
        }
    })
}

/// True when a source file listed in `bin`'s cargo dep-info (`bin.d`) is newer than `bin`.
fn is_stale(bin: &Path) -> bool {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = mtime(bin) else {
        return true;
    };
    let Ok(depinfo) = fs::read_to_string(bin.with_extension("d")) else {
        return false;
    };
    let first = depinfo.lines().next().unwrap_or_default();
    let Some((_, deps)) = first.split_once(": ") else {
        return false;
    };
    deps.split_whitespace()
        .filter(|p| !p.ends_with('\\'))
        .any(|p| match mtime(Path::new(p)) {
            Some(t) => t > built,
            // A source that is gone was removed after the build.
            None => true,
        })
}

/// Hard links left by test processes that have ended keep old binaries' disk space alive.
fn remove_dead_bin_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("portico-it-bin-") {
            if pid.parse::<u32>().map(|p| !pid_alive(p)).unwrap_or(false) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// True while `pid` is a live process (a zombie counts as gone: it runs no code and holds
/// no socket).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => state != "Z" && state != "X",
            None => true,
        },
        Err(_) => false,
    }
}

/// A running `portico run --config FILE`.
pub struct Portico {
    pub setup: Setup,
    pub layout: Layout,
    pub shm_name: String,
    child: Option<Child>,
    shm: SharedMemory,
}

enum StartError {
    /// Someone else took a port between our probe and the server's bind: try other ports.
    PortTaken(String),
    Failed(String),
}

impl Portico {
    pub fn start(setup: Setup) -> Portico {
        Portico::start_tagged("srv", setup)
    }

    pub fn start_tagged(tag: &str, setup: Setup) -> Portico {
        let mut last = String::new();
        for _ in 0..3 {
            let layout = Layout::new(tag, &setup);
            match Portico::try_start(setup.clone(), layout.clone()) {
                Ok(p) => return p,
                Err(StartError::PortTaken(log)) => {
                    last = log;
                    let _ = fs::remove_dir_all(&layout.root);
                }
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("portico could not bind free ports three times; last log:\n{last}");
    }

    fn try_start(setup: Setup, layout: Layout) -> Result<Portico, StartError> {
        fs::write(&layout.config_path, layout.render(&setup))
            .map_err(|e| StartError::Failed(format!("{}: {e}", layout.config_path.display())))?;
        let log = File::create(&layout.log_path)
            .map_err(|e| StartError::Failed(format!("{}: {e}", layout.log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let mut child = Command::new(portico_bin())
            .arg("run")
            .arg("--config")
            .arg(&layout.config_path)
            .current_dir(&layout.root)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| StartError::Failed(format!("starting portico: {e}")))?;
        let shm_name = layout.shm_name();
        let deadline = Instant::now() + START_DEADLINE;
        let probe = SocketAddr::new(LOCAL4, layout.port);
        let shm = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = fs::read_to_string(&layout.log_path).unwrap_or_default();
                if text.contains("Address already in use") || text.contains("address in use") {
                    return Err(StartError::PortTaken(text));
                }
                return Err(StartError::Failed(format!(
                    "portico exited during start ({status}); config:\n{}\nlog:\n{text}",
                    layout.render(&setup)
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = fs::read_to_string(&layout.log_path).unwrap_or_default();
                return Err(StartError::Failed(format!(
                    "portico did not answer a Binding request on {probe} within {START_DEADLINE:?}; log:\n{text}"
                )));
            }
            // Ready means: the dataplane answers, and portico has installed its handlers
            // for SIGTERM, SIGINT and SIGHUP (before that, those signals kill it outright
            // and the tests that send them would test the kernel's default action).
            if let Ok(shm) = SharedMemory::attach(&shm_name) {
                let h = &shm.segment().header;
                if h.dataplane_pid.load(Ordering::Relaxed) != 0
                    && handles_signals(child.id())
                    && answers(probe)
                {
                    break shm;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let p = Portico {
            setup,
            layout,
            shm_name,
            child: Some(child),
            shm,
        };
        let want = match p.setup.io {
            "io_uring" => Some(Driver::IoUring),
            "epoll" => Some(Driver::Epoll),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(
                p.driver(),
                want,
                "turn.io = {:?} but the dataplane runs another driver",
                p.setup.io
            );
        }
        Ok(p)
    }

    /// 127.0.0.1:port
    pub fn udp4(&self) -> SocketAddr {
        SocketAddr::new(LOCAL4, self.layout.port)
    }

    /// [::1]:port
    pub fn udp6(&self) -> SocketAddr {
        assert!(self.setup.ipv6, "this server does not listen on ::1");
        SocketAddr::new(LOCAL6, self.layout.port)
    }

    /// The RFC 5780 alternate port.
    pub fn alt_port(&self) -> u16 {
        self.layout
            .alt_port
            .unwrap_or_else(|| panic!("this server has no alternate port"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn dataplane_pid(&self) -> u32 {
        self.shm
            .segment()
            .header
            .dataplane_pid
            .load(Ordering::Relaxed)
    }

    pub fn driver(&self) -> Driver {
        Driver::from_u32(self.shm.segment().header.driver.load(Ordering::Relaxed))
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.shm.segment().total(c)
    }

    /// Waits (bounded) until counter `c` reaches `at_least`; returns its value then.
    pub fn wait_counter(&self, c: Counter, at_least: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.counter(c);
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.layout.log_path).unwrap_or_default()
    }

    /// Rewrites the configuration file (for SIGHUP tests).
    pub fn rewrite_config(&mut self, setup: Setup) {
        fs::write(&self.layout.config_path, self.layout.render(&setup))
            .unwrap_or_else(|e| panic!("{}: {e}", self.layout.config_path.display()));
        self.setup = setup;
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid()));
    }

    /// Sends `sig` and waits (bounded) for `portico` to exit; returns its status.
    pub fn stop_with(&mut self, sig: Signal) -> ExitStatus {
        self.signal(sig);
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("already stopped"));
        match wait_deadline(&mut child, STOP_DEADLINE) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "portico did not exit within {STOP_DEADLINE:?} of {sig}; log:\n{}",
                    self.log()
                );
            }
        }
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        let dataplane = self.dataplane_pid();
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            if wait_deadline(&mut child, STOP_DEADLINE).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The dataplane is not killed with its parent by design; never leave one behind.
        for pid in [dataplane, self.dataplane_pid()] {
            if pid_alive(pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        SharedMemory::unlink(&self.shm_name);
        if std::thread::panicking() {
            eprintln!(
                "---- portico log ({}), test dir kept ----\n{}",
                self.layout.log_path.display(),
                self.log()
            );
        } else {
            let _ = fs::remove_dir_all(&self.layout.root);
        }
    }
}

fn wait_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
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

/// One Binding request to `server` from a fresh socket: true on a success response.
fn answers(server: SocketAddr) -> bool {
    let local = SocketAddr::new(if server.is_ipv4() { LOCAL4 } else { LOCAL6 }, 0);
    let Ok(s) = UdpSocket::bind(local) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let req = Builder::binding();
    let tid = req.tid();
    if s.send_to(&req.build(), server).is_err() {
        return false;
    }
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Msg::parse(&buf[..n])
            .map(|m| m.typ == BINDING_SUCCESS && m.tid() == tid)
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Runs `portico ARGS` that is expected to exit by itself (a bad config, `check`), killing
/// it if it is still running after `limit` so a wrongly started server cannot linger.
pub fn run_to_exit(args: &[&std::ffi::OsStr], cwd: &Path, limit: Duration) -> Output {
    let mut child = Command::new(portico_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting portico: {e}"));
    if wait_deadline(&mut child, limit).is_none() {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        if wait_deadline(&mut child, STOP_DEADLINE).is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().ok();
        panic!(
            "portico {args:?} was still running after {limit:?}; it should have exited. stderr:\n{}",
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default()
        );
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("collecting portico output: {e}"))
}
