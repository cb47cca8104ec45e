//! Harness of the fraud-detection tests: one Portico installation per test (its own state
//! dir, so its own shared-memory segment, on free loopback ports), an nginx target for the
//! reverse proxy, and clients that send from a loopback address of the test's choosing
//! (all of 127.0.0.0/8 is local on Linux), so one test can be attacker and bystander at once.
//!
//! The fraud engine counts per source address, so every client here binds its socket to a
//! given address before it talks: a TURN client with right or wrong passwords, STUN Binding
//! requests, and HTTP requests through the proxy. Readiness probes come from [`PROBE`], which
//! every configuration whitelists, so they never feed the engine.
#![allow(dead_code)]

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portico_dataplane::stun::{self, attr, method, Class, Message, MessageWriter};
use portico_shared::shm::SharedMemory;

pub const PORTICO: &str = env!("CARGO_BIN_EXE_portico");
pub const REALM: &str = "portico-fraud";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
/// The source of readiness probes; whitelisted in every configuration the harness writes.
pub const PROBE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 254));
pub const LOCAL6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// How long a test waits for an answer that should come.
pub const ANSWER_WAIT: Duration = Duration::from_secs(3);

pub fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// Polls `f` every 10 ms until it holds or `limit` passes.
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

// ---------------------------------------------------------------------------------------------
// Ports, directories, processes

/// A port free for UDP and TCP on 127.0.0.1 and ::1, never handed out twice by this process.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..200 {
        let Ok(u) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = u.local_addr().map(|a| a.port()) else {
            continue;
        };
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("::1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok();
        let mut g = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if free && !g.contains(&port) {
            g.push(port);
            return port;
        }
    }
    panic!("no free loopback port after 200 tries");
}

fn temp_dir(tag: &str) -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "portico-fraud-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    d
}

/// Alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    pid != 0
        && match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !matches!(
                s.rfind(')')
                    .and_then(|i| s[i + 1..].trim_start().chars().next()),
                Some('Z') | Some('X') | None
            ),
            Err(_) => false,
        }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (portico or its dataplane); no memory involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
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

/// Finds a program or fails with the Debian package that has it: a missing tool is a test
/// failure, never a skip.
pub fn program(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package {package}");
}

// ---------------------------------------------------------------------------------------------
// nginx: the proxy's target

/// `Authorization` with a wrong password for [`Nginx`]'s `/private` (`alice:wrong`).
pub const WRONG_LOGIN: &str = "Authorization: Basic YWxpY2U6d3Jvbmc=";
/// `Authorization` with the right password for [`Nginx`]'s `/private` (`alice:secret`).
pub const RIGHT_LOGIN: &str = "Authorization: Basic YWxpY2U6c2VjcmV0";

/// nginx on a free port of 127.0.0.1: `/` answers 200, `/deny` 401 whatever the request
/// carries, `/private` is HTTP Basic (`alice`/`secret`): 401 without or with wrong
/// credentials, 200 with the right ones. The proxy reports a 401 as suspicious only when the
/// request carried `Authorization` (a failed login, not the first challenge).
pub struct Nginx {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    pub fn start() -> Nginx {
        let nginx = program("nginx", "nginx");
        let dir = temp_dir("nginx");
        let port = free_port();
        let d = dir.display();
        fs::write(dir.join("htpasswd"), "alice:{PLAIN}secret\n")
            .unwrap_or_else(|e| panic!("htpasswd: {e}"));
        // A file, not `return`: nginx answers `return` before access checks run.
        fs::write(dir.join("private.txt"), "private\n")
            .unwrap_or_else(|e| panic!("private.txt: {e}"));
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             default_type text/plain;\n\
             server {{ listen 127.0.0.1:{port};\n\
               location / {{ return 200 \"welcome\\n\"; }}\n\
               location /deny {{ return 401 \"denied\\n\"; }}\n\
               location = /private {{ auth_basic \"portico-test\"; auth_basic_user_file {d}/htpasswd; alias {d}/private.txt; }}\n }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap_or_else(|e| panic!("{}: {e}", conf_path.display()));
        let log =
            fs::File::create(dir.join("nginx.out")).unwrap_or_else(|e| panic!("nginx log: {e}"));
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting nginx: {e}"));
        let n = Nginx { port, child, dir };
        let up = wait_until(Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up,
            "nginx does not accept on 127.0.0.1:{port}: {}",
            fs::read_to_string(n.dir.join("error.log")).unwrap_or_default()
        );
        n
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        if wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Portico

/// What a test wants from its installation.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// Lines of the `[fraud]` table (besides `whitelist`).
    pub fraud: Vec<String>,
    /// `fraud.whitelist` entries; [`PROBE`] is always added.
    pub whitelist: Vec<String>,
    /// Also listen for STUN/TURN on [::1].
    pub ipv6: bool,
    /// Put the reverse proxy (HTTP on a free port of 127.0.0.1) in front of this nginx port.
    pub proxy_target: Option<u16>,
    /// `[proxy...]` tables written as they are (SIP, LDAP listeners and services), when there
    /// is no `proxy_target`; the test waits for its own listeners.
    pub proxy_toml: Option<String>,
    /// `turn.workers`; 0 means 1.
    pub workers: usize,
    /// `proxy.trusted_proxies` entries.
    pub trusted_proxies: Vec<String>,
}

impl Setup {
    pub fn fraud(mut self, line: &str) -> Setup {
        self.fraud.push(line.to_string());
        self
    }

    pub fn whitelist(mut self, entry: &str) -> Setup {
        self.whitelist.push(entry.to_string());
        self
    }

    pub fn ipv6(mut self) -> Setup {
        self.ipv6 = true;
        self
    }

    pub fn trusted_proxy(mut self, entry: &str) -> Setup {
        self.trusted_proxies.push(entry.to_string());
        self
    }

    pub fn proxy(mut self, nginx: &Nginx) -> Setup {
        self.proxy_target = Some(nginx.port);
        self
    }

    pub fn proxy_toml(mut self, toml: &str) -> Setup {
        self.proxy_toml = Some(toml.to_string());
        self
    }
}

/// One Portico installation: a config file, a state dir and the running `portico` (which
/// starts its dataplane). Dropping it stops both by pid and removes the directory (kept, with
/// the log printed, when the test failed).
pub struct Site {
    pub setup: Setup,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub shm_name: String,
    /// STUN/TURN port on 127.0.0.1 (and [::1] with `ipv6`).
    pub port: u16,
    pub api: SocketAddr,
    /// The proxy's HTTP port on 127.0.0.1.
    pub proxy_port: Option<u16>,
    /// The proxy's HTTPS port on 127.0.0.1 (the state dir's generated certificate).
    pub proxy_tls_port: Option<u16>,
    child: Option<Child>,
    dataplane: u32,
}

impl Site {
    /// Writes the configuration and starts `portico`; returns once it answers.
    pub fn start(tag: &str, setup: Setup) -> Site {
        let dir = temp_dir(tag);
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).unwrap_or_else(|e| panic!("{e}"));
        let mut site = Site {
            shm_name: SharedMemory::name_for_state_dir(&state_dir),
            config_path: dir.join("portico.toml"),
            log_path: dir.join("portico.log"),
            port: free_port(),
            api: SocketAddr::new(v4(127, 0, 0, 1), free_port()),
            proxy_port: setup.proxy_target.map(|_| free_port()),
            proxy_tls_port: setup.proxy_target.map(|_| free_port()),
            state_dir,
            dir,
            setup,
            child: None,
            dataplane: 0,
        };
        fs::write(&site.config_path, site.render())
            .unwrap_or_else(|e| panic!("{}: {e}", site.config_path.display()));
        site.run();
        site
    }

    /// The configuration file for this site's setup and ports.
    pub fn render(&self) -> String {
        let s = &self.setup;
        let mut listen = vec![format!("\"127.0.0.1:{}\"", self.port)];
        if s.ipv6 {
            listen.push(format!("\"[::1]:{}\"", self.port));
        }
        let mut white = vec![format!("\"{PROBE}\"")];
        white.extend(s.whitelist.iter().map(|w| format!("\"{w}\"")));
        let mut t = format!(
            "state_dir = \"{}\"\nlog_level = \"info\"\n\n\
             [turn]\nlisten = [{}]\nworkers = {}\nrealm = \"{REALM}\"\n\
             users = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\
             allow_peers = [\"127.0.0.0/8\"]\n\n\
             [fraud]\nwhitelist = [{}]\n{}\n\n\
             [api]\nlisten = \"{}\"\n",
            self.state_dir.display(),
            listen.join(", "),
            s.workers.max(1),
            white.join(", "),
            s.fraud.join("\n"),
            self.api,
        );
        if let (Some(target), Some(port), Some(tls)) =
            (s.proxy_target, self.proxy_port, self.proxy_tls_port)
        {
            let trusted: Vec<String> = s
                .trusted_proxies
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect();
            t.push_str(&format!(
                "\n[proxy]\ntrusted_proxies = [{}]\n",
                trusted.join(", ")
            ));
            t.push_str(&format!(
                "\n[proxy.listen]\nhttp = \"127.0.0.1:{port}\"\nhttps = \"127.0.0.1:{tls}\"\n\n\
                 [proxy.limits]\nfirst_message_timeout = 2\n\n\
                 [[proxy.services]]\nname = \"app.test\"\nhost = \"127.0.0.1\"\nhttp = {target}\n"
            ));
        } else if let Some(raw) = &s.proxy_toml {
            t.push('\n');
            t.push_str(raw);
        }
        t
    }

    /// Starts `portico run --config FILE` on this site and waits until the API, STUN (from
    /// [`PROBE`]) and the proxy answer.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "portico already runs");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log_path.display()));
        let child = Command::new(PORTICO)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .current_dir(&self.dir)
            .env("PORTICO_DATAPLANE", PORTICO)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting portico: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                panic!(
                    "portico exited during start ({status}); log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "portico did not come up within 30 s; log:\n{}",
                self.log()
            );
            if self.ready() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.dataplane = SharedMemory::attach(&self.shm_name)
            .map(|s| s.segment().header.dataplane_pid.load(Ordering::Relaxed))
            .unwrap_or(0);
    }

    fn ready(&self) -> bool {
        let healthy = http(self.api, "GET", "/healthz", &[], b"")
            .map(|r| r.status == 200)
            .unwrap_or(false);
        let stun = |ip: IpAddr| {
            let server = SocketAddr::new(ip, self.port);
            let src = if ip.is_ipv4() { PROBE } else { LOCAL6 };
            UdpSocket::bind(SocketAddr::new(src, 0))
                .map(|s| binding(&s, server, Duration::from_millis(200)))
                .unwrap_or(false)
        };
        let proxy = self
            .proxy_port
            .is_none_or(|p| tcp_from(PROBE, SocketAddr::new(v4(127, 0, 0, 1), p)).is_ok());
        healthy && stun(v4(127, 0, 0, 1)) && (!self.setup.ipv6 || stun(LOCAL6)) && proxy
    }

    /// SIGTERM, and waits for `portico` and its dataplane to exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().unwrap_or_else(|| panic!("not running"));
        signal(child.id(), libc::SIGTERM);
        let status = wait_exit(&mut child, Duration::from_secs(15));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "portico did not stop within 15 s of SIGTERM; log:\n{}",
                self.log()
            );
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "portico exited with {status:?} on SIGTERM; log:\n{}",
            self.log()
        );
        let dp = self.dataplane;
        assert!(
            wait_until(Duration::from_secs(10), || !alive(dp)),
            "the dataplane ({dp}) outlived portico's SIGTERM"
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn dataplane_pid(&self) -> u32 {
        self.dataplane
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn udp4(&self) -> SocketAddr {
        SocketAddr::new(v4(127, 0, 0, 1), self.port)
    }

    pub fn udp6(&self) -> SocketAddr {
        assert!(self.setup.ipv6, "this site does not listen on ::1");
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

    pub fn proxy_tls(&self) -> SocketAddr {
        SocketAddr::new(
            v4(127, 0, 0, 1),
            self.proxy_tls_port
                .unwrap_or_else(|| panic!("this site has no proxy")),
        )
    }

    pub fn proxy(&self) -> SocketAddr {
        SocketAddr::new(
            v4(127, 0, 0, 1),
            self.proxy_port
                .unwrap_or_else(|| panic!("this site has no proxy")),
        )
    }

    // --- API ---------------------------------------------------------------------------------

    pub fn token(&self) -> String {
        fs::read_to_string(self.state_dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("admin.token: {e}"))
            .trim()
            .to_string()
    }

    /// An authenticated API call: (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let headers = [
            (
                "Authorization".to_string(),
                format!("Bearer {}", self.token()),
            ),
            ("Content-Type".to_string(), "application/json".to_string()),
        ];
        let r = http(self.api, method, path, &headers, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; log:\n{}", self.log()));
        let json = if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&r.body)
                )
            })
        };
        (r.status, json)
    }

    /// `GET /api/v1/fraud/entries`.
    pub fn entries(&self) -> Vec<serde_json::Value> {
        let (status, v) = self.call("GET", "/api/v1/fraud/entries", "");
        assert_eq!(status, 200, "GET /api/v1/fraud/entries: {v}");
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
        let (status, v) = self.call("GET", "/api/v1/turn/allocations", "");
        assert_eq!(status, 200, "GET /api/v1/turn/allocations: {v}");
        v["allocations"]
            .as_array()
            .unwrap_or_else(|| panic!("no \"allocations\" array: {v}"))
            .iter()
            .filter_map(|a| a["client"].as_str().map(str::to_string))
            .collect()
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let r = http(self.api, "GET", "/metrics", &[], b"")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(r.status, 200, "GET /metrics");
        String::from_utf8_lossy(&r.body).into_owned()
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

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_exit(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let dp = self.dataplane;
        if !wait_until(Duration::from_secs(5), || !alive(dp)) {
            signal(dp, libc::SIGKILL);
        }
        SharedMemory::unlink(&self.shm_name);
        if std::thread::panicking() {
            eprintln!(
                "---- portico log ({}), directory kept ----\n{}",
                self.log_path.display(),
                self.log()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The sum of the series of `name` in a Prometheus text exposition whose labels include all
/// of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(&str, &str)> = l
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| have.contains(want)) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, for the API and for requests through the proxy

pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request on a new connection with `Connection: close`; the whole answer.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "bad HTTP response"))
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..nl]).ok()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(HttpResponse { status, body })
}

/// A TCP connection to `to` from the local address `src` (port chosen by the kernel).
pub fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// What became of a request through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP answer with this status.
    Status(u16),
    /// The connection was closed (or reset) without a byte of answer: refused at accept.
    Refused,
}

/// `GET path` with `Host: app.test` through the proxy at `proxy`, from source address `src`.
pub fn get_from(src: IpAddr, proxy: SocketAddr, path: &str) -> Answer {
    get_with(src, proxy, path, &[])
}

/// [`get_from`] with extra header lines (`"Name: value"`).
pub fn get_with(src: IpAddr, proxy: SocketAddr, path: &str, headers: &[&str]) -> Answer {
    let mut s = tcp_from(src, proxy).unwrap_or_else(|e| panic!("connect {proxy} from {src}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    // A refused connection may already be closed when the request goes out.
    let _ = s.write_all(req.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                break
            }
            Err(e) => panic!(
                "GET {path} via {proxy} from {src}: {e} after {} bytes",
                raw.len()
            ),
        }
    }
    if raw.is_empty() {
        return Answer::Refused;
    }
    match parse_response(&raw) {
        Some(r) => Answer::Status(r.status),
        None => panic!(
            "GET {path} via {proxy} from {src}: not HTTP: {:?}",
            String::from_utf8_lossy(&raw)
        ),
    }
}

/// One HTTP/1.1 keep-alive connection through the proxy, from a chosen source address.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn open(src: IpAddr, proxy: SocketAddr) -> KeepAlive {
        let stream =
            tcp_from(src, proxy).unwrap_or_else(|e| panic!("connect {proxy} from {src}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
        KeepAlive {
            stream,
            buf: Vec::new(),
        }
    }

    /// `GET path` on this connection: the answer, or [`Answer::Refused`] when the
    /// connection is closed instead.
    pub fn get(&mut self, path: &str) -> Answer {
        self.get_with(path, &[])
    }

    /// [`KeepAlive::get`] with extra header lines (`"Name: value"`).
    pub fn get_with(&mut self, path: &str, headers: &[&str]) -> Answer {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        if self.stream.write_all(req.as_bytes()).is_err() {
            return Answer::Refused;
        }
        let mut tmp = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    self.buf.drain(..end + 4 + len);
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or_else(|| panic!("not HTTP: {head:?}"));
                    return Answer::Status(status);
                }
            }
            match self.stream.read(&mut tmp) {
                Ok(0) => return Answer::Refused,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    return Answer::Refused
                }
                Err(e) => panic!("GET {path} on a kept-alive connection: {e}"),
            }
        }
    }
}

/// Sends a TLS ClientHello to `to` from `src`: true when the server answers with TLS bytes
/// (its ServerHello), false when it closes the connection without a byte, i.e. before any
/// TLS work.
pub fn tls_hello_answered(src: IpAddr, to: SocketAddr) -> bool {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("rustls: {e}"))
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("app.test").unwrap_or_else(|e| panic!("{e}"));
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .unwrap_or_else(|e| panic!("rustls: {e}"));
    let mut s = tcp_from(src, to).unwrap_or_else(|e| panic!("connect {to} from {src}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    while conn.wants_write() {
        if conn.write_tls(&mut s).is_err() {
            return false;
        }
    }
    let mut buf = [0u8; 5];
    match s.read(&mut buf) {
        // A TLS record: handshake (22) or alert (21).
        Ok(n) if n > 0 => matches!(buf[0], 21 | 22),
        Ok(_) => false,
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => false,
        Err(e) => panic!("TLS from {src} to {to}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// STUN and TURN clients

/// A transaction id no other request of this process uses.
pub fn new_tid() -> [u8; 12] {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&std::process::id().to_be_bytes());
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

/// A UDP socket bound to `ip` (any port).
pub fn udp_from(ip: IpAddr) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"))
}

/// Receives the datagram from `from` whose transaction id is `tid` within `wait`, skipping
/// others (late answers to earlier requests).
pub fn recv_answer(
    s: &UdpSocket,
    from: SocketAddr,
    tid: &[u8; 12],
    wait: Duration,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
        match s.recv_from(&mut buf) {
            Ok((n, src)) => {
                if src == from && n >= 20 && &buf[8..20] == tid {
                    return Some(buf[..n].to_vec());
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("recv_from: {e}"),
        }
    }
}

/// One STUN Binding request: true when its success answer arrives within `wait`.
pub fn binding(s: &UdpSocket, server: SocketAddr, wait: Duration) -> bool {
    let tid = new_tid();
    let mut req = [0u8; 20];
    req[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    req[8..20].copy_from_slice(&tid);
    if s.send_to(&req, server).is_err() {
        return false;
    }
    recv_answer(s, server, &tid, wait).is_some_and(|a| a[0..2] == [0x01, 0x01])
}

/// Whether a Binding request from `src` is answered: up to three tries of `wait` each, so a
/// datagram lost under load does not pass for a block.
pub fn answered_from(src: IpAddr, server: SocketAddr, wait: Duration) -> bool {
    let s = udp_from(src);
    (0..3).any(|_| binding(&s, server, wait))
}

/// STUN Binding requests over one TCP connection from a chosen source address.
pub struct TcpStun {
    stream: TcpStream,
}

impl TcpStun {
    pub fn connect(src: IpAddr, server: SocketAddr) -> std::io::Result<TcpStun> {
        let stream = tcp_from(src, server)?;
        stream.set_nodelay(true)?;
        Ok(TcpStun { stream })
    }

    /// One Binding request: true when its success answer arrives within `wait`, false when
    /// nothing does or the connection is closed.
    pub fn binding(&mut self, wait: Duration) -> bool {
        let tid = new_tid();
        let mut req = [0u8; 20];
        req[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
        req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        req[8..20].copy_from_slice(&tid);
        if self.stream.write_all(&req).is_err() || self.stream.set_read_timeout(Some(wait)).is_err()
        {
            return false;
        }
        let mut head = [0u8; 20];
        if self.stream.read_exact(&mut head).is_err() {
            return false;
        }
        let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
        self.stream.read_exact(&mut body).is_ok()
            && head[0..2] == [0x01, 0x01]
            && head[8..20] == tid
    }
}

/// A STUN answer: its class and error code.
#[derive(Clone, Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
}

impl Reply {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes)
            .unwrap_or_else(|e| panic!("answer is not STUN ({e:?}): {:02x?}", self.bytes))
    }

    pub fn class(&self) -> Class {
        self.msg().class()
    }

    pub fn code(&self) -> Option<u16> {
        self.msg()
            .get(attr::ERROR_CODE)
            .and_then(|v| attr::decode_error_code(v).ok())
            .map(|(c, _)| c)
    }

    pub fn get(&self, typ: u16) -> Option<Vec<u8>> {
        self.msg().get(typ).map(<[u8]>::to_vec)
    }
}

/// A TURN client on a socket bound to a chosen source address, with long-term credentials
/// (right or wrong).
pub struct TurnClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub user: String,
    pub password: String,
    realm: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
}

impl TurnClient {
    pub fn new(src: IpAddr, server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient {
            sock: udp_from(src),
            server,
            user: user.into(),
            password: password.into(),
            realm: None,
            nonce: None,
        }
    }

    /// A client of `src` that knows the user but not the password.
    pub fn attacker(src: IpAddr, server: SocketAddr) -> TurnClient {
        TurnClient::new(src, server, USER, "not-the-password")
    }

    pub fn local(&self) -> SocketAddr {
        self.sock
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"))
    }

    /// An Allocate (UDP transport) request, signed once a nonce is known.
    pub fn allocate_request(&self, tid: &[u8; 12]) -> Vec<u8> {
        self.build(method::ALLOCATE, tid, &|w| {
            w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .unwrap_or_else(|e| panic!("{e}"))
        })
    }

    pub fn build(
        &self,
        method: u16,
        tid: &[u8; 12],
        attrs: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, tid)
            .unwrap_or_else(|e| panic!("header: {e}"));
        attrs(&mut w);
        if let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
            for (t, v) in [
                (attr::USERNAME, self.user.as_bytes()),
                (attr::REALM, realm.as_slice()),
                (attr::NONCE, nonce.as_slice()),
            ] {
                w.add_attribute(t, v)
                    .unwrap_or_else(|e| panic!("attribute {t:#x}: {e}"));
            }
            let key =
                stun::long_term_key_md5(self.user.as_bytes(), realm, self.password.as_bytes());
            w.add_message_integrity(&key)
                .unwrap_or_else(|e| panic!("MESSAGE-INTEGRITY: {e}"));
        }
        w.add_fingerprint()
            .unwrap_or_else(|e| panic!("FINGERPRINT: {e}"));
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    /// Sends `req` and waits for its answer, retransmitting every 500 ms, for at most `wait`.
    pub fn transact(&self, req: &[u8], wait: Duration) -> Option<Reply> {
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&req[8..20]);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            self.sock
                .send_to(req, self.server)
                .unwrap_or_else(|e| panic!("send_to {}: {e}", self.server));
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            if let Some(bytes) = recv_answer(&self.sock, self.server, &tid, slice) {
                return Some(Reply { bytes });
            }
        }
        None
    }

    /// The unsigned Allocate whose 401 brings REALM and NONCE (not a suspicious event).
    #[track_caller]
    pub fn challenge(&mut self) {
        self.realm = None;
        self.nonce = None;
        let r = self
            .transact(&self.allocate_request(&new_tid()), ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to an unsigned Allocate from {}", self.local()));
        assert_eq!(r.code(), Some(401), "an unsigned Allocate is challenged");
        self.realm = r.get(attr::REALM);
        self.nonce = r.get(attr::NONCE);
        assert!(self.nonce.is_some(), "a 401 without NONCE");
    }

    /// Takes REALM and NONCE from a 401 answer received elsewhere (the flood generator
    /// sends many challenges before it reads the answers).
    pub fn set_challenge(&mut self, answer: &[u8]) {
        let r = Reply {
            bytes: answer.to_vec(),
        };
        self.realm = r.get(attr::REALM);
        self.nonce = r.get(attr::NONCE);
    }

    /// Sends one signed Allocate without waiting for the answer.
    pub fn send_allocate(&self) {
        let _ = self
            .sock
            .send_to(&self.allocate_request(&new_tid()), self.server);
    }

    /// A Refresh of this client's allocation; `None` when nothing answers within `wait`.
    pub fn refresh(&self, wait: Duration) -> Option<Reply> {
        let req = self.build(method::REFRESH, &new_tid(), &|w| {
            w.add_u32(attr::LIFETIME, 600)
                .unwrap_or_else(|e| panic!("{e}"))
        });
        self.transact(&req, wait)
    }
}

impl TurnClient {
    /// One signed Allocate, sent once (a retransmission would be one more suspicious event
    /// when the password is wrong): its answer, or `None` after `wait`.
    pub fn allocate_once(&self, wait: Duration) -> Option<Reply> {
        let tid = new_tid();
        self.sock
            .send_to(&self.allocate_request(&tid), self.server)
            .unwrap_or_else(|e| panic!("send_to {}: {e}", self.server));
        recv_answer(&self.sock, self.server, &tid, wait).map(|bytes| Reply { bytes })
    }

    /// One Allocate with this client's (wrong) password, which must be refused with 401.
    #[track_caller]
    pub fn wrong_password(&self) {
        let r = self
            .allocate_once(ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to a wrong password from {}", self.local()));
        assert_eq!(
            r.code(),
            Some(401),
            "a wrong password from {}",
            self.local()
        );
    }

    /// CreatePermission for `peer` on this client's allocation.
    pub fn permit(&self, peer: SocketAddr) -> Reply {
        let req = self.build(method::CREATE_PERMISSION, &new_tid(), &|w| {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, peer)
                .unwrap_or_else(|e| panic!("{e}"))
        });
        self.transact(&req, ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to CreatePermission from {}", self.local()))
    }

    /// The XOR-RELAYED-ADDRESS of a successful Allocate answer.
    pub fn relayed(r: &Reply, tid: &[u8; 12]) -> Option<SocketAddr> {
        r.get(attr::XOR_RELAYED_ADDRESS)
            .and_then(|v| attr::decode_xor_address(&v, tid).ok())
    }

    /// Allocates with this client's (right) password; the relayed address.
    #[track_caller]
    pub fn allocate_relay(&mut self) -> SocketAddr {
        if self.nonce.is_none() {
            self.challenge();
        }
        let tid = new_tid();
        let r = self
            .transact(&self.allocate_request(&tid), ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to Allocate from {}", self.local()));
        assert_eq!(
            r.class(),
            Class::SuccessResponse,
            "Allocate: {:?}",
            r.code()
        );
        TurnClient::relayed(&r, &tid).unwrap_or_else(|| panic!("no XOR-RELAYED-ADDRESS"))
    }
}

/// Makes `n` signed Allocate requests with a wrong password from `src` (after the unsigned
/// one that fetches the nonce), each answered with 401: `n` suspicious events.
#[track_caller]
pub fn wrong_passwords(src: IpAddr, server: SocketAddr, n: usize) {
    let mut c = TurnClient::attacker(src, server);
    c.challenge();
    for _ in 0..n {
        c.wrong_password();
    }
}

/// A well-behaved client that keeps asking while the test runs and counts what goes
/// unanswered: STUN Binding requests, or HTTP requests through the proxy.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, Vec<String>)>>,
}

impl Bystander {
    /// Binding requests from `src` every 20 ms (three tries of 300 ms each before one counts
    /// as unanswered).
    pub fn stun(src: IpAddr, server: SocketAddr) -> Bystander {
        Bystander::spawn(move || {
            if answered_from(src, server, Duration::from_millis(300)) {
                Ok(())
            } else {
                Err(format!("Binding from {src} unanswered"))
            }
        })
    }

    /// `GET /` through the proxy from `src` every 20 ms; each must be answered 200.
    pub fn http(src: IpAddr, proxy: SocketAddr) -> Bystander {
        Bystander::spawn(move || match get_from(src, proxy, "/") {
            Answer::Status(200) => Ok(()),
            other => Err(format!("GET / from {src}: {other:?}")),
        })
    }

    fn spawn(f: impl Fn() -> Result<(), String> + Send + 'static) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut ok = 0;
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match f() {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failures)
        });
        Bystander {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it and asserts that it was answered every time (and at least `min_ok` times).
    #[track_caller]
    pub fn finish(mut self, min_ok: u64) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failures) = self
            .thread
            .take()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| panic!("bystander thread panicked"))
            })
            .unwrap_or_default();
        assert!(
            failures.is_empty(),
            "a legitimate client from another source was refused {} times (answered {ok}): {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(ok >= min_ok, "the bystander got only {ok} answers");
        ok
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A bounded generator of suspicious events from many sources

/// The `i`-th flood source: 127.1.0.1, 127.1.0.2, ... (skipping .0 and .255 of every /24),
/// for `i` below about four million.
pub fn flood_source(i: usize) -> IpAddr {
    let n = 0x7f01_0000 + (i / 254) * 256 + i % 254 + 1;
    IpAddr::V4(Ipv4Addr::from(n as u32))
}

/// What a flood did: wrong-password requests sent, and those of them whose 401 came back
/// (each of those certainly reached the dataplane and was counted there; an unanswered one
/// may have been lost on the way, e.g. in a full socket buffer of a loaded machine).
#[derive(Clone, Copy, Debug, Default)]
pub struct Flooded {
    pub sent: usize,
    pub answered: usize,
}

impl std::ops::AddAssign for Flooded {
    fn add_assign(&mut self, o: Flooded) {
        self.sent += o.sent;
        self.answered += o.answered;
    }
}

/// Flood sources `from..to`, `batch` at a time, each with its own socket: fetch each one's
/// nonce (a nonce is bound to the address), then send `per_source` signed Allocates with a
/// wrong password, all of the batch before reading any answer. Calls `between` after every
/// batch.
pub fn flood(
    server: SocketAddr,
    sources: std::ops::Range<usize>,
    batch: usize,
    per_source: usize,
    mut between: impl FnMut(),
) -> Flooded {
    let mut done = Flooded::default();
    let mut i = sources.start;
    while i < sources.end {
        let end = (i + batch).min(sources.end);
        let mut clients: Vec<TurnClient> = (i..end)
            .map(|k| TurnClient::attacker(flood_source(k), server))
            .collect();
        let tids: Vec<[u8; 12]> = clients
            .iter()
            .map(|c| {
                let tid = new_tid();
                let _ = c.sock.send_to(&c.allocate_request(&tid), server);
                tid
            })
            .collect();
        let mut pending: Vec<(usize, [u8; 12])> = Vec::new();
        for (k, (c, tid)) in clients.iter_mut().zip(&tids).enumerate() {
            if let Some(bytes) = recv_answer(&c.sock, server, tid, Duration::from_millis(500)) {
                c.set_challenge(&bytes);
                for _ in 0..per_source {
                    let tid = new_tid();
                    let _ = c.sock.send_to(&c.allocate_request(&tid), server);
                    pending.push((k, tid));
                    done.sent += 1;
                }
            }
        }
        // One socket's answers come back in order (one 5-tuple, one worker).
        for (k, tid) in &pending {
            let c = &clients[*k];
            if recv_answer(&c.sock, server, tid, Duration::from_millis(200)).is_some() {
                done.answered += 1;
            }
        }
        between();
        i = end;
    }
    done
}
