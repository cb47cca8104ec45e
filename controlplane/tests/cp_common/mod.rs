//! Harness of the control-plane tests (API, supervision, configuration store, Prometheus):
//! a [`Site`] is one Portico installation (temp state dir, config file, free ports) whose
//! `portico` processes the test starts, kills and restarts; it talks to them over loopback
//! with a small HTTP/1.1 client and STUN Binding requests of its own.
//!
//! Dropping a `Site` kills, by pid, every process still serving it (found by the config path
//! or the shared-memory name in `/proc/*/cmdline`), so a failed test leaves nothing running.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portico_shared::shm::SharedMemory;

pub const PORTICO: &str = env!("CARGO_BIN_EXE_portico");

// ---------------------------------------------------------------------------------------------
// Ports and directories

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port free for both UDP and TCP, never handed out twice by this process.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let Ok(u) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = u.local_addr().map(|a| a.port()) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut g = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if g.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free loopback port after 200 tries");
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "portico-cp-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rfind(')')
                .and_then(|i| s[i + 1..].trim_start().chars().next()),
            Some('Z') | Some('X') | None
        ),
        Err(_) => false,
    }
}

pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this test started (or its dataplane); no memory involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Pids whose command line has an argument equal to `needle`.
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

/// One `portico` process. Dropping it kills it if it still runs.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        kill(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit, at most `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        kill(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A Portico installation

pub struct Site {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub api: SocketAddr,
    pub stun: SocketAddr,
    pub shm_name: String,
    pub log_path: PathBuf,
    /// Program given to portico as `PORTICO_DATAPLANE`.
    pub dataplane_program: PathBuf,
}

impl Site {
    /// A site whose configuration is the base (loopback ports, one worker) plus `extra`,
    /// TOML appended inside the `[turn]` table.
    pub fn new(tag: &str, extra_turn: &str) -> Site {
        let dir = temp_dir(tag);
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).unwrap();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stun: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config_path = dir.join("portico.toml");
        let site = Site {
            shm_name: SharedMemory::name_for_state_dir(&state_dir),
            config_path,
            state_dir,
            api,
            stun,
            log_path: dir.join("portico.log"),
            dataplane_program: PathBuf::from(PORTICO),
            dir,
        };
        fs::write(&site.config_path, site.config_text(extra_turn)).unwrap();
        site
    }

    pub fn config_text(&self, extra_turn: &str) -> String {
        format!(
            "state_dir = \"{}\"\n\n[turn]\nlisten = [\"{}\"]\nworkers = 1\nrelay_ports = \"40000-40999\"\n{extra_turn}\n\n[api]\nlisten = \"{}\"\n",
            self.state_dir.display(),
            self.stun,
            self.api
        )
    }

    /// Starts `portico run --config FILE`, its output appended to the site's log.
    pub fn spawn(&self) -> Proc {
        self.spawn_with(&self.config_path)
    }

    /// Starts portico on another configuration file, output to the site's log.
    pub fn spawn_with(&self, config: &Path) -> Proc {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(PORTICO)
            .args(["run", "--config"])
            .arg(config)
            .env("PORTICO_DATAPLANE", &self.dataplane_program)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc { child }
    }

    /// Starts portico and waits until its API answers and the dataplane is up.
    pub fn start(&self) -> Proc {
        let mut p = self.spawn();
        let ok = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(s)) = p.child.try_wait() {
                panic!("portico exited during start ({s}); log:\n{}", self.log());
            }
            self.get("/healthz", false).map(|r| r.status) == Some(200)
        });
        assert!(
            ok,
            "portico did not come up within 30 s; log:\n{}",
            self.log()
        );
        p
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        fs::read_to_string(self.state_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        auth: bool,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<HttpResponse> {
        let token = auth.then(|| self.token());
        let mut h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(t) = token {
            h.push(("Authorization".into(), format!("Bearer {t}")));
        }
        http(self.api, method, path, &h, body).ok()
    }

    pub fn get(&self, path: &str, auth: bool) -> Option<HttpResponse> {
        self.request("GET", path, auth, &[], b"")
    }

    /// An authenticated JSON call that must succeed with `expect`.
    pub fn json(&self, method: &str, path: &str, body: &str, expect: u16) -> serde_json::Value {
        let r = self
            .request(
                method,
                path,
                true,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .unwrap_or_else(|| panic!("{method} {path}: no answer; log:\n{}", self.log()));
        assert_eq!(r.status, expect, "{method} {path}: {}", r.text());
        if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            r.json()
        }
    }

    pub fn status(&self) -> serde_json::Value {
        self.json("GET", "/api/v1/status", "", 200)
    }

    pub fn metrics(&self) -> String {
        let r = self.get("/metrics", false).expect("GET /metrics answered");
        assert_eq!(r.status, 200);
        r.text()
    }

    /// Dataplane processes serving this site's segment.
    pub fn dataplane_pids(&self) -> Vec<u32> {
        pids_with_arg(&self.shm_name)
    }

    pub fn file_config(&self) -> portico_shared::config::Config {
        let text = fs::read_to_string(&self.config_path).unwrap();
        portico_shared::config::Config::from_toml(&text)
            .unwrap_or_else(|e| panic!("config file invalid: {e}\n{text}"))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let config = self.config_path.to_string_lossy().to_string();
        for pid in pids_with_arg(&config)
            .into_iter()
            .chain(pids_with_arg(&self.shm_name))
        {
            kill(pid, libc::SIGKILL);
        }
        wait_until(Duration::from_secs(5), || {
            pids_with_arg(&self.shm_name).is_empty() && pids_with_arg(&config).is_empty()
        });
        SharedMemory::unlink(&self.shm_name);
        if std::thread::panicking() {
            eprintln!(
                "--- portico log of {} ---\n{}",
                self.dir.display(),
                self.log()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, just enough for the API, /metrics and Prometheus's query API

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    http_on(s, addr, method, path, headers, body)
}

/// A TCP connection to `addr` from the loopback address `src` (127.0.0.2, ...), so a test
/// can be several sources.
pub fn connect_from(src: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = addr else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

/// [`http`] from the loopback address `src`.
pub fn http_from(
    src: std::net::Ipv4Addr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    http_on(connect_from(src, addr)?, addr, method, path, headers, body)
}

fn http_on(
    mut s: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
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
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP response"))
}

pub fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&rest[..nl]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// STUN Binding

pub fn binding_request(txid: &[u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    m[8..20].copy_from_slice(txid);
    m
}

pub fn txid(n: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&0x5054_4321u32.to_be_bytes());
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

/// Whether `resp` is a Binding success response to `txid`.
pub fn is_binding_success(resp: &[u8], txid: &[u8; 12]) -> bool {
    resp.len() >= 20 && resp[0..2] == [0x01, 0x01] && &resp[8..20] == txid
}

/// The SOFTWARE attribute of a STUN message, if any.
pub fn software(resp: &[u8]) -> Option<String> {
    let mut i = 20;
    while i + 4 <= resp.len() {
        let t = u16::from_be_bytes([resp[i], resp[i + 1]]);
        let len = usize::from(u16::from_be_bytes([resp[i + 2], resp[i + 3]]));
        let v = resp.get(i + 4..i + 4 + len)?;
        if t == 0x8022 {
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        i += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// One Binding request over UDP; the response, or `None` after `timeout`.
pub fn binding(sock: &UdpSocket, server: SocketAddr, n: u64, timeout: Duration) -> Option<Vec<u8>> {
    let id = txid(n);
    sock.send_to(&binding_request(&id), server).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .ok()?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        if let Ok((len, from)) = sock.recv_from(&mut buf) {
            if from == server && is_binding_success(&buf[..len], &id) {
                return Some(buf[..len].to_vec());
            }
        }
    }
    None
}

/// `count` Binding requests in lockstep; returns how many were answered.
pub fn bindings(server: SocketAddr, count: u64) -> u64 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    (0..count)
        .filter(|n| binding(&sock, server, *n, Duration::from_secs(1)).is_some())
        .count() as u64
}

pub fn read_to_string(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}
