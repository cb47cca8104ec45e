//! A Portico installation for one test: a temporary directory with its config file, state dir
//! (so its own shared-memory segment) and log, on free loopback ports; the `portico`
//! processes serving it; its API, counters and metrics.
//!
//! The configuration is built from a [`Spec`] of pieces. [`Portico::start`] writes it and
//! starts `portico run --config FILE`, returning once the installation answers: the API's
//! `/healthz`, STUN from [`PROBE`] on every listen address (unless [`Spec::quiet`]), the
//! dataplane's pid in shared memory, portico's signal handlers, and every proxy port the spec
//! names. Supervision tests start, kill and restart processes themselves: [`Portico::new`]
//! prepares the installation, [`Portico::launch`] starts one `portico` and returns it as a
//! [`Proc`], [`Portico::spawn_with`] starts one on another file without waiting.
//!
//! The dataplane always runs as `portico dataplane` from the same binary (`PORTICO_DATAPLANE`
//! names it), so a stale `portico-dataplane` in the target directory is never picked up.
//!
//! Dropping a `Portico` stops its processes: portico by SIGTERM, then by pid every process
//! still serving it (found by the config path or the shared-memory name in
//! `/proc/*/cmdline`: adopted dataplanes, second control planes), so a failed test leaves
//! nothing running. Its directory is removed, or kept with the log printed when the test
//! failed.

use std::ffi::OsStr;
use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use portico_shared::counters::Counter;
use portico_shared::shm::{Driver, SharedMemory};

use crate::dirs::TempDir;
use crate::http::{http, HttpResponse};
use crate::metrics::metric;
use crate::net::{binding, tcp_from};
use crate::ports::{free_port, free_port_on};
use crate::process::{
    alive, handles_signals, pids_with_arg, rss_kib, signal, wait_exit, wait_until, Proc, Shared,
};
use crate::turn::{PASSWORD, PASSWORD2, PREVIOUS_SECRET, REALM_NAME, SHARED_SECRET, USER, USER2};
use crate::{ALT4, LOCAL4, LOCAL6, PROBE};

/// How long `portico` gets to be ready.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long `portico` gets to stop after a signal before the kit kills it.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// The `portico` binary of this build: beside the test binary's `deps` directory
/// (`target/<profile>/portico`, which cargo builds for the integration tests of its package).
pub fn portico_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("portico"))
            .unwrap_or_else(|| panic!("{} has no target directory", exe.display()));
        assert!(
            bin.is_file(),
            "{} is missing: build it (`cargo build -p portico`)",
            bin.display()
        );
        bin
    })
}

/// Runs `portico ARGS` that is expected to exit by itself (a bad config, `check`), killing it
/// if it is still running after `limit` so a wrongly started server cannot linger.
pub fn run_portico(args: &[&OsStr], cwd: &Path, limit: Duration) -> Output {
    let mut child = Command::new(portico_bin())
        .args(args)
        .current_dir(cwd)
        .env("PORTICO_DATAPLANE", portico_bin())
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting portico: {e}"));
    if wait_exit(&mut child, limit).is_none() {
        signal(child.id(), Signal::SIGTERM);
        if wait_exit(&mut child, STOP_DEADLINE).is_none() {
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

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| toml_string(i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a test wants from its installation: pieces of the configuration file.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// `turn.io`: "auto", "io_uring" or "epoll"; unset leaves the default.
    pub io: Option<&'static str>,
    /// `turn.workers`; 0 means 1.
    pub workers: usize,
    /// Also listen for STUN/TURN on [::1].
    pub ipv6: bool,
    /// `turn.listen = []`: STUN/TURN off (a proxy-only box).
    pub no_stun: bool,
    /// RFC 5780: `alternate_ip = "127.0.0.2"` with an alternate port.
    pub rfc5780: bool,
    /// `stun.software`; unset leaves the default.
    pub software: Option<String>,
    /// `turn.relay_ports`.
    pub relay_ports: Option<String>,
    /// The realm, users and REST API secrets of [`crate::turn`].
    pub turn_users: bool,
    /// `turn.allow_peers` for loopback (denied by default), so the test's own peers work.
    pub loopback_peers: bool,
    /// Lines appended to the `[turn]` table.
    pub turn: String,
    /// Lines of the `[fraud]` table (besides `whitelist`).
    pub fraud: Vec<String>,
    /// `fraud.whitelist` entries; [`PROBE`] is always there.
    pub whitelist: Vec<String>,
    /// `log_level`; unset leaves the default.
    pub log_level: Option<String>,
    /// Put the reverse proxy (HTTP and HTTPS on free ports of 127.0.0.1, service `app.test`)
    /// in front of this port.
    pub http_proxy_to: Option<u16>,
    /// `proxy.trusted_proxies` entries (with `http_proxy_to`).
    pub trusted_proxies: Vec<String>,
    /// `[proxy...]` tables (and any other, see [`Spec::tables`]) written as they are, at the
    /// end.
    pub proxy: String,
    /// TCP ports on 127.0.0.1 that must accept before the start counts.
    pub ready_ports: Vec<u16>,
    /// Readiness without STUN traffic (for tests that count every request).
    pub quiet: bool,
}

impl Spec {
    pub fn new() -> Spec {
        Spec::default()
    }

    pub fn io(mut self, io: &'static str) -> Spec {
        self.io = Some(io);
        self
    }

    pub fn workers(mut self, n: usize) -> Spec {
        self.workers = n;
        self
    }

    pub fn ipv6(mut self) -> Spec {
        self.ipv6 = true;
        self
    }

    pub fn no_stun(mut self) -> Spec {
        self.no_stun = true;
        self
    }

    /// RFC 5780 on 127.0.0.1 (primary) and 127.0.0.2 (alternate).
    pub fn rfc5780(mut self) -> Spec {
        self.rfc5780 = true;
        self
    }

    pub fn software(mut self, s: &str) -> Spec {
        self.software = Some(s.to_string());
        self
    }

    pub fn relay_ports(mut self, range: &str) -> Spec {
        self.relay_ports = Some(range.to_string());
        self
    }

    pub fn turn_users(mut self) -> Spec {
        self.turn_users = true;
        self
    }

    pub fn loopback_peers(mut self) -> Spec {
        self.loopback_peers = true;
        self
    }

    /// A line (or lines) for the `[turn]` table.
    pub fn turn(mut self, lines: &str) -> Spec {
        self.turn.push_str(lines);
        if !self.turn.is_empty() && !self.turn.ends_with('\n') {
            self.turn.push('\n');
        }
        self
    }

    pub fn fraud(mut self, line: &str) -> Spec {
        self.fraud.push(line.to_string());
        self
    }

    pub fn whitelist(mut self, entry: &str) -> Spec {
        self.whitelist.push(entry.to_string());
        self
    }

    pub fn log_level(mut self, level: &str) -> Spec {
        self.log_level = Some(level.to_string());
        self
    }

    pub fn http_proxy_to(mut self, port: u16) -> Spec {
        self.http_proxy_to = Some(port);
        self
    }

    pub fn trusted_proxy(mut self, entry: &str) -> Spec {
        self.trusted_proxies.push(entry.to_string());
        self
    }

    /// `[proxy...]` tables, appended to the file as they are.
    pub fn proxy(mut self, toml: &str) -> Spec {
        self.proxy.push_str(toml);
        self
    }

    /// Other tables (`[media]`, `[[nat.maps]]`, ...), appended to the file as they are.
    pub fn tables(mut self, toml: &str) -> Spec {
        self.proxy.push_str(toml);
        if !self.proxy.ends_with('\n') {
            self.proxy.push('\n');
        }
        self
    }

    /// A TCP port on 127.0.0.1 the start waits for (the test's own proxy listeners).
    pub fn ready_port(mut self, port: u16) -> Spec {
        self.ready_ports.push(port);
        self
    }

    pub fn quiet(mut self) -> Spec {
        self.quiet = true;
        self
    }
}

enum StartError {
    /// Someone else took a port between our probe and the server's bind: try other ports.
    PortTaken(String),
    Failed(String),
}

/// One Portico installation and, once started, its `portico` process.
pub struct Portico {
    pub spec: Spec,
    pub dir: TempDir,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub shm_name: String,
    /// STUN/TURN port on 127.0.0.1 (and [::1] with `ipv6`).
    pub port: u16,
    /// The RFC 5780 alternate port.
    pub alt: Option<u16>,
    pub api: SocketAddr,
    /// The proxy's HTTP and HTTPS ports (with `http_proxy_to`).
    pub proxy_ports: Option<(u16, u16)>,
    /// The program portico runs as its dataplane (`PORTICO_DATAPLANE`).
    pub dataplane_program: PathBuf,
    main: Option<Proc>,
    _gate: Shared,
}

impl Portico {
    /// Prepares an installation for `spec` (directory, ports, config file); starts nothing.
    pub fn new(tag: &str, spec: Spec) -> Portico {
        let gate = crate::process::shared();
        let dir = TempDir::new(tag);
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).unwrap_or_else(|e| panic!("{}: {e}", state_dir.display()));
        let mut ips = vec![LOCAL4];
        if spec.ipv6 {
            ips.push(LOCAL6);
        }
        if spec.rfc5780 {
            ips.push(ALT4);
        }
        let p = Portico {
            shm_name: SharedMemory::name_for_state_dir(&state_dir),
            config_path: dir.join("portico.toml"),
            log_path: dir.join("portico.log"),
            port: free_port_on(&ips),
            alt: spec.rfc5780.then(|| free_port_on(&[LOCAL4, ALT4])),
            api: SocketAddr::new(LOCAL4, free_port()),
            proxy_ports: spec.http_proxy_to.map(|_| (free_port(), free_port())),
            dataplane_program: portico_bin().to_path_buf(),
            state_dir,
            dir,
            spec,
            main: None,
            _gate: gate,
        };
        p.write_config(&p.render());
        p
    }

    /// Prepares an installation and starts `portico` on it; returns once it answers. Tries
    /// other ports when one was taken by someone else meanwhile.
    pub fn start(tag: &str, spec: Spec) -> Portico {
        let mut last = String::new();
        for _ in 0..3 {
            let mut p = Portico::new(tag, spec.clone());
            match p.try_launch() {
                Ok(proc) => {
                    p.main = Some(proc);
                    return p;
                }
                Err(StartError::PortTaken(log)) => last = log,
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("portico could not bind free ports three times; last log:\n{last}");
    }

    // --- configuration ---------------------------------------------------------------------

    /// The configuration file for the spec on these ports.
    pub fn render(&self) -> String {
        self.render_spec(&self.spec)
    }

    /// The configuration with `extra_turn` as the extra `[turn]` lines instead of the spec's.
    pub fn config_text(&self, extra_turn: &str) -> String {
        let mut s = self.spec.clone();
        s.turn = extra_turn.to_string();
        self.render_spec(&s)
    }

    fn render_spec(&self, s: &Spec) -> String {
        let mut t = format!(
            "# Written by the Portico test kit.\nstate_dir = {}\n",
            toml_string(&self.state_dir.to_string_lossy())
        );
        if let Some(l) = &s.log_level {
            t.push_str(&format!("log_level = {}\n", toml_string(l)));
        }
        let mut listen = Vec::new();
        if !s.no_stun {
            listen.push(format!("127.0.0.1:{}", self.port));
            if s.ipv6 {
                listen.push(format!("[::1]:{}", self.port));
            }
        }
        t.push_str(&format!("\n[turn]\nlisten = [{}]\n", quoted(&listen)));
        if !s.no_stun {
            t.push_str(&format!("workers = {}\n", s.workers.max(1)));
        }
        if let Some(io) = s.io {
            t.push_str(&format!("io = \"{io}\"\n"));
        }
        if let Some(r) = &s.relay_ports {
            t.push_str(&format!("relay_ports = {}\n", toml_string(r)));
        }
        if s.turn_users {
            t.push_str(&format!(
                "realm = \"{REALM_NAME}\"\n\
                 users = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}, {{ name = \"{USER2}\", password = \"{PASSWORD2}\" }}]\n\
                 shared_secret = [\"{SHARED_SECRET}\", \"{PREVIOUS_SECRET}\"]\n"
            ));
        }
        if s.loopback_peers {
            t.push_str("allow_peers = [\"127.0.0.0/8\", \"::1/128\"]\n");
        }
        t.push_str(&s.turn);
        t.push_str("\n[stun]\n");
        if let Some(sw) = &s.software {
            t.push_str(&format!("software = {}\n", toml_string(sw)));
        }
        if let Some(q) = self.alt {
            t.push_str(&format!(
                "alternate_ip = \"127.0.0.2\"\nalternate_port = {q}\n"
            ));
        }
        let mut white = vec![PROBE.to_string()];
        white.extend(s.whitelist.iter().cloned());
        t.push_str(&format!("\n[fraud]\nwhitelist = [{}]\n", quoted(&white)));
        for f in &s.fraud {
            t.push_str(f);
            t.push('\n');
        }
        t.push_str(&format!("\n[api]\nlisten = \"{}\"\n", self.api));
        if let (Some(target), Some((http, https))) = (s.http_proxy_to, self.proxy_ports) {
            t.push_str(&format!(
                "\n[proxy]\ntrusted_proxies = [{}]\n\n\
                 [proxy.listen]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"127.0.0.1:{https}\"\n\n\
                 [proxy.limits]\nfirst_message_timeout = 2\n\n\
                 [[proxy.services]]\nname = \"app.test\"\nhost = \"127.0.0.1\"\nhttp = {target}\n",
                quoted(&s.trusted_proxies)
            ));
        }
        if !s.proxy.is_empty() {
            t.push('\n');
            t.push_str(&s.proxy);
        }
        t
    }

    /// Writes `text` as the configuration file.
    pub fn write_config(&self, text: &str) {
        fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("{}: {e}", self.config_path.display()));
    }

    /// Rewrites the configuration file for `spec` (for SIGHUP tests).
    pub fn rewrite_config(&mut self, spec: Spec) {
        self.spec = spec;
        self.write_config(&self.render());
    }

    /// The configuration file as `portico` reads it.
    pub fn file_config(&self) -> portico_shared::config::Config {
        let text = fs::read_to_string(&self.config_path).unwrap_or_default();
        portico_shared::config::Config::from_toml(&text)
            .unwrap_or_else(|e| panic!("config file invalid: {e}\n{text}"))
    }

    // --- processes -------------------------------------------------------------------------

    /// Starts `portico run --config FILE`, its output appended to the log; does not wait.
    pub fn spawn(&self) -> Proc {
        self.spawn_with(&self.config_path)
    }

    /// Starts portico on another configuration file, output to this installation's log.
    pub fn spawn_with(&self, config: &Path) -> Proc {
        Proc::spawn(
            "portico",
            Command::new(portico_bin())
                .args(["run", "--config"])
                .arg(config)
                .current_dir(&self.dir)
                .env("PORTICO_DATAPLANE", &self.dataplane_program)
                .env("NO_COLOR", "1")
                .env_remove("RUST_LOG"),
            &self.log_path,
        )
    }

    /// Starts a `portico` and waits until the installation answers (see the module docs);
    /// the process is the caller's.
    pub fn launch(&self) -> Proc {
        self.try_launch().unwrap_or_else(|e| match e {
            StartError::PortTaken(log) | StartError::Failed(log) => panic!("{log}"),
        })
    }

    /// Starts `portico` as this installation's own process (after [`Portico::new`] or
    /// [`Portico::stop`]) and waits until it answers.
    pub fn run(&mut self) {
        assert!(self.main.is_none(), "portico already runs");
        self.main = Some(self.launch());
    }

    fn try_launch(&self) -> Result<Proc, StartError> {
        let log_start = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0) as usize;
        let new_log = || {
            let all = fs::read(&self.log_path).unwrap_or_default();
            String::from_utf8_lossy(all.get(log_start..).unwrap_or_default()).into_owned()
        };
        let mut p = self.spawn();
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                let text = new_log();
                if text.contains("Address already in use") || text.contains("address in use") {
                    return Err(StartError::PortTaken(text));
                }
                return Err(StartError::Failed(format!(
                    "portico exited during start ({status}); config:\n{}\nlog:\n{text}",
                    fs::read_to_string(&self.config_path).unwrap_or_default()
                )));
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "portico did not answer within {START_DEADLINE:?}; log:\n{}",
                    new_log()
                )));
            }
            if self.ready(p.pid()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let want = match self.spec.io {
            Some("io_uring") => Some(Driver::IoUring),
            Some("epoll") => Some(Driver::Epoll),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(
                self.driver(),
                want,
                "turn.io = {:?} but the dataplane runs another driver",
                self.spec.io
            );
        }
        Ok(p)
    }

    /// Ready means: the dataplane has published its pid; portico has installed its handlers
    /// for SIGTERM, SIGINT and SIGHUP (before that, those signals kill it outright and the
    /// tests that send them would test the kernel's default action); the API answers
    /// `/healthz`; STUN answers from [`PROBE`] (and from ::1); every proxy port accepts.
    fn ready(&self, pid: u32) -> bool {
        let stun = |ip: IpAddr| {
            let src = if ip.is_ipv4() { PROBE } else { LOCAL6 };
            UdpSocket::bind(SocketAddr::new(src, 0)).is_ok_and(|s| {
                binding(
                    &s,
                    SocketAddr::new(ip, self.port),
                    Duration::from_millis(200),
                )
                .is_some()
            })
        };
        let accepts = |port: u16| tcp_from(PROBE, SocketAddr::new(LOCAL4, port)).is_ok();
        let proxy: Vec<u16> = self
            .proxy_ports
            .map(|(a, b)| vec![a, b])
            .unwrap_or_default();
        self.dataplane_pid() != 0
            && handles_signals(pid)
            && self.get("/healthz", false).map(|r| r.status) == Some(200)
            && (self.spec.no_stun
                || self.spec.quiet
                || (stun(LOCAL4) && (!self.spec.ipv6 || stun(LOCAL6))))
            && self
                .spec
                .ready_ports
                .iter()
                .chain(proxy.iter())
                .all(|p| accepts(*p))
    }

    /// The pid of the `portico` this installation runs (0 when it does not).
    pub fn pid(&self) -> u32 {
        self.main.as_ref().map(Proc::pid).unwrap_or(0)
    }

    /// Whether the `portico` this installation runs is still running.
    pub fn alive(&mut self) -> bool {
        self.main.as_mut().is_some_and(Proc::alive)
    }

    /// Resident memory of the `portico` process (control plane), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub fn signal(&self, sig: Signal) {
        assert_ne!(self.pid(), 0, "portico does not run");
        signal(self.pid(), sig);
    }

    /// Sends `sig` and waits (bounded) for `portico` to exit; returns its status.
    pub fn stop_with(&mut self, sig: Signal) -> ExitStatus {
        let mut p = self.main.take().unwrap_or_else(|| panic!("not running"));
        match p.stop(sig, STOP_DEADLINE) {
            Some(s) => s,
            None => {
                p.kill9();
                panic!(
                    "portico did not exit within {STOP_DEADLINE:?} of {sig}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGTERM; asserts a clean exit and that the dataplane went with it.
    pub fn stop(&mut self) {
        let dp = self.dataplane_pid();
        let status = self.stop_with(Signal::SIGTERM);
        assert!(
            status.success(),
            "portico exited with {status} on SIGTERM; log:\n{}",
            self.log()
        );
        assert!(
            wait_until(Duration::from_secs(10), || !alive(dp)),
            "the dataplane ({dp}) outlived portico's SIGTERM"
        );
    }

    /// Dataplane processes serving this installation's segment.
    pub fn dataplane_pids(&self) -> Vec<u32> {
        pids_with_arg(&self.shm_name)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (5 s at most) until the log contains `needle` (events are logged
    /// asynchronously).
    #[track_caller]
    pub fn wait_log(&self, needle: &str) {
        let found = wait_until(Duration::from_secs(5), || self.log().contains(needle));
        assert!(found, "log lacks {needle:?}:\n{}", self.log());
    }

    // --- addresses -------------------------------------------------------------------------

    /// 127.0.0.1:port
    pub fn udp4(&self) -> SocketAddr {
        SocketAddr::new(LOCAL4, self.port)
    }

    /// [::1]:port
    pub fn udp6(&self) -> SocketAddr {
        assert!(self.spec.ipv6, "this installation does not listen on ::1");
        SocketAddr::new(LOCAL6, self.port)
    }

    /// The STUN/TURN address of the family of `src`.
    pub fn stun_for(&self, src: IpAddr) -> SocketAddr {
        if src.is_ipv4() {
            self.udp4()
        } else {
            self.udp6()
        }
    }

    /// The RFC 5780 alternate port.
    pub fn alt_port(&self) -> u16 {
        self.alt
            .unwrap_or_else(|| panic!("this installation has no alternate port"))
    }

    /// The proxy's HTTP address (with `http_proxy_to`).
    pub fn proxy(&self) -> SocketAddr {
        let (http, _) = self
            .proxy_ports
            .unwrap_or_else(|| panic!("this installation has no proxy"));
        SocketAddr::new(LOCAL4, http)
    }

    /// The proxy's HTTPS address (the state dir's generated certificate).
    pub fn proxy_tls(&self) -> SocketAddr {
        let (_, https) = self
            .proxy_ports
            .unwrap_or_else(|| panic!("this installation has no proxy"));
        SocketAddr::new(LOCAL4, https)
    }

    // --- shared memory ---------------------------------------------------------------------

    fn shm(&self) -> Option<SharedMemory> {
        SharedMemory::attach(&self.shm_name).ok()
    }

    /// The dataplane's pid as published in shared memory (0 when there is none).
    pub fn dataplane_pid(&self) -> u32 {
        self.shm()
            .map(|s| s.segment().header.dataplane_pid.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn driver(&self) -> Driver {
        let d = self
            .shm()
            .map(|s| s.segment().header.driver.load(Ordering::Relaxed))
            .unwrap_or(0);
        Driver::from_u32(d)
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.shm().map(|s| s.segment().total(c)).unwrap_or(0)
    }

    /// Waits (bounded) until counter `c` reaches `at_least`; returns its value then.
    #[must_use = "wait_counter does not fail by itself: assert on the value it returns"]
    pub fn wait_counter(&self, c: Counter, at_least: u64) -> u64 {
        let mut v = 0;
        wait_until(Duration::from_secs(5), || {
            v = self.counter(c);
            v >= at_least
        });
        v
    }

    // --- API -------------------------------------------------------------------------------

    pub fn token(&self) -> String {
        fs::read_to_string(self.state_dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("admin.token: {e}"))
            .trim()
            .to_string()
    }

    /// One API request, with the admin token when `auth`; `None` when nothing answers.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        auth: bool,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<HttpResponse> {
        let mut h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if auth {
            h.push(("Authorization".into(), format!("Bearer {}", self.token())));
        }
        http(self.api, method, path, &h, body).ok()
    }

    pub fn get(&self, path: &str, auth: bool) -> Option<HttpResponse> {
        self.request("GET", path, auth, &[], b"")
    }

    /// An authenticated JSON call: (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = self
            .request(
                method,
                path,
                true,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .unwrap_or_else(|| panic!("{method} {path}: no answer; log:\n{}", self.log()));
        let json = if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            r.json()
        };
        (r.status, json)
    }

    /// An authenticated JSON call that must be answered with `expect`.
    #[track_caller]
    pub fn json(&self, method: &str, path: &str, body: &str, expect: u16) -> serde_json::Value {
        let (status, json) = self.call(method, path, body);
        assert_eq!(status, expect, "{method} {path}: {json}");
        json
    }

    /// `PUT /api/v1/config` with a TOML document (authenticated); the answer.
    pub fn put_config_toml(&self, toml: &str) -> HttpResponse {
        self.request(
            "PUT",
            "/api/v1/config",
            true,
            &[("Content-Type", "application/toml")],
            toml.as_bytes(),
        )
        .unwrap_or_else(|| panic!("PUT /api/v1/config: no answer; log:\n{}", self.log()))
    }

    pub fn status(&self) -> serde_json::Value {
        self.json("GET", "/api/v1/status", "", 200)
    }

    /// The configuration generation the API reports as published.
    pub fn config_generation(&self) -> u64 {
        let st = self.status();
        st["config"]["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("no config.generation in {st}"))
    }

    /// The SOFTWARE attribute of a Binding answer now (an unanswered request fails the test).
    pub fn software_now(&self) -> Option<String> {
        let s = crate::net::udp_client(self.udp4());
        crate::net::transact(&s, self.udp4(), &crate::stun::Builder::binding().build())
            .0
            .software()
    }

    /// `GET /api/v1/fraud/entries`.
    pub fn entries(&self) -> Vec<serde_json::Value> {
        let v = self.json("GET", "/api/v1/fraud/entries", "", 200);
        v["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("no \"entries\" array: {v}"))
            .clone()
    }

    /// The entry whose source is `source` ("127.0.0.3", "::/64"), if listed.
    pub fn entry(&self, source: &str) -> Option<serde_json::Value> {
        self.entries()
            .into_iter()
            .find(|e| e["source"].as_str() == Some(source))
    }

    /// Client addresses of the TURN allocations the API lists.
    pub fn allocation_clients(&self) -> Vec<String> {
        let v = self.json("GET", "/api/v1/turn/allocations", "", 200);
        v["allocations"]
            .as_array()
            .unwrap_or_else(|| panic!("no \"allocations\" array: {v}"))
            .iter()
            .filter_map(|a| a["client"].as_str().map(str::to_string))
            .collect()
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let r = self
            .get("/metrics", false)
            .unwrap_or_else(|| panic!("GET /metrics: no answer"));
        assert_eq!(r.status, 200, "GET /metrics");
        r.text()
    }

    /// The sum of the series of `name` whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics(), name, labels)
    }

    /// Waits (bounded) until the metric reaches `at_least`; returns its last value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
        limit: Duration,
    ) -> f64 {
        let mut v = 0.0;
        wait_until(limit, || {
            v = self.metric(name, labels);
            v >= at_least
        });
        v
    }

    /// Asserts that the log has a line saying `src` was blacklisted and why.
    #[track_caller]
    pub fn expect_blacklisted_in_log(&self, src: IpAddr, reason: &str) {
        let found = wait_until(Duration::from_secs(2), || {
            self.log().lines().any(|l| {
                l.contains("blacklisted")
                    && l.contains(&format!("source={src}"))
                    && l.contains(reason)
            })
        });
        assert!(
            found,
            "no log line names {src} as blacklisted for {reason}:\n{}",
            self.log()
        );
    }

    /// Suspicious events counted from TURN authentication failures.
    pub fn auth_failures(&self) -> f64 {
        self.metric(
            "portico_fraud_suspicious_events_total",
            &[("origin", "turn"), ("reason", "turn_auth_failure")],
        )
    }

    /// Waits until the engine has counted `n` TURN authentication failures.
    #[track_caller]
    pub fn expect_auth_failures(&self, n: f64) {
        let got = self.wait_metric(
            "portico_fraud_suspicious_events_total",
            &[("origin", "turn"), ("reason", "turn_auth_failure")],
            n,
            Duration::from_secs(5),
        );
        assert_eq!(got, n, "TURN authentication failures counted by the engine");
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        let dataplane = self.dataplane_pid();
        if let Some(mut p) = self.main.take() {
            if p.terminate(STOP_DEADLINE).is_none() {
                p.kill9();
            }
        }
        // The dataplane is not killed with its parent by design; never leave one behind.
        let config = self.config_path.to_string_lossy().into_owned();
        let serving = || {
            let mut v = pids_with_arg(&config);
            v.extend(pids_with_arg(&self.shm_name));
            v
        };
        for pid in serving()
            .into_iter()
            .chain([dataplane, self.dataplane_pid()])
        {
            if alive(pid) {
                signal(pid, Signal::SIGKILL);
            }
        }
        wait_until(Duration::from_secs(5), || serving().is_empty());
        SharedMemory::unlink(&self.shm_name);
        if std::thread::panicking() {
            eprintln!(
                "---- portico log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}
