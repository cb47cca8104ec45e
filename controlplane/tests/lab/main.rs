//! The NAT lab: the scenarios of the field manual Portico is built from ("Media and NAT" to
//! "Internal TURN Server") built from network namespaces, veth pairs and nftables NAT by
//! `scripts/lab/lab.sh`, with Portico running inside the box's namespace and real RTP from
//! `scripts/lab/rtp.py`. Each scenario shows the failure without Portico's help and the fix
//! with it:
//!
//! * media.rs: one-way audio (a phone behind NAT signals its private address); NAT
//!   detection (a media relay session with latching) fixes the provider case; private to
//!   private fails without a relay; the media relay fixes the branch case; a third host
//!   cannot hijack a latched leg.
//! * stun.rs: STUN returns the right server-reflexive address behind each NAT type; RFC 5780
//!   behaviour discovery (the test's own classifier and coturn's `turnutils_natdiscovery`)
//!   classifies each type; hole punching with STUN addresses works only for some pairs.
//! * turn.rs: TURN fixes every NAT type; TURN over TCP gets media out of a network that
//!   blocks UDP; the reference's internal TURN server in the LAN, reached over TCP through
//!   one DNAT rule on the router.
//! * natmap.rs: a static NAT map reaches an internal endpoint.
//! * ice.rs: ICE agents (aioice) connect directly where STUN suffices, fail behind two
//!   symmetric NATs with STUN alone, and connect through Portico's TURN relay.
//! * probe.rs (ignored until fixed): `portico probe` behind each NAT type; it concludes
//!   FAILURE behind a symmetric NAT and misreads a restricted cone's filtering.
//!
//! Network namespaces need root. Where they cannot be created (not root, no `ip netns`),
//! every test says so loudly on stderr and passes without running; anything else missing
//! (nft, python3, coturn's tools) fails the test with the package to install.
//!
//! The tests of this binary run one at a time (they measure loss; two labs competing for the
//! two cores would blur that), each lab with its own namespace prefix (pid and a sequence
//! number), removed by [`Lab`]'s drop even when the test fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use portico_testkit::http::http;
use portico_testkit::net::binding;
use portico_testkit::process::{require, wait_until, Proc};
use portico_testkit::turn::{PASSWORD, REALM_NAME, USER};
use portico_testkit::TempDir;

mod ice;
mod media;
mod natmap;
mod probe;
mod stun;
mod turn;

/// The simulated internet (RFC 2544 benchmarking range; see scripts/lab/lab.sh).
pub const NET: &str = "198.18.0.0/24";
/// Portico's box on the internet, and its RFC 5780 alternate address.
pub const BOX: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const BOX_ALT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// The SIP provider's media gateway.
pub const PROVIDER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
/// The phones' RTP port.
pub const RTP: u16 = 5004;
/// The API inside the box's namespace.
pub const API: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8088);

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The NAT behaviours lab.sh builds (RFC 4787 names in lab.sh's header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    FullCone,
    Restricted,
    PortRestricted,
    Symmetric,
}

pub const ALL_NATS: [Nat; 4] = [
    Nat::FullCone,
    Nat::Restricted,
    Nat::PortRestricted,
    Nat::Symmetric,
];

impl Nat {
    pub fn name(self) -> &'static str {
        match self {
            Nat::FullCone => "full-cone",
            Nat::Restricted => "restricted",
            Nat::PortRestricted => "port-restricted",
            Nat::Symmetric => "symmetric",
        }
    }

    /// Whether one inside ip:port keeps its public port towards every destination.
    pub fn endpoint_independent_mapping(self) -> bool {
        self != Nat::Symmetric
    }
}

fn lab_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab/lab.sh")
}

pub fn rtp_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab/rtp.py")
}

/// Why network namespaces cannot be made here, if they cannot.
fn no_netns(probe: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    let ip = match which("ip") {
        Some(ip) => ip,
        None => return Some("`ip` (iproute2) is not installed".into()),
    };
    let out = Command::new(&ip).args(["netns", "add", probe]).output();
    match out {
        Ok(o) if o.status.success() => {
            let _ = Command::new(&ip).args(["netns", "del", probe]).status();
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip: {e}")),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// One lab: namespaces PREFIX-NAME, removed (with whatever runs inside) on drop.
pub struct Lab {
    pub prefix: String,
    pub dir: TempDir,
    _turn: MutexGuard<'static, ()>,
}

impl Lab {
    /// A new, empty internet; `None` (after a loud message) where namespaces cannot be made.
    pub fn new(test: &str) -> Option<Lab> {
        static N: AtomicU32 = AtomicU32::new(0);
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let prefix = format!(
            "plab{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        if let Some(why) = no_netns(&format!("{prefix}-probe")) {
            // Straight to the stderr descriptor: libtest captures eprintln! of a passing
            // test, and this must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! NAT LAB SKIPPED: {test}\n\
                 !!! network namespaces cannot be created here: {why}.\n\
                 !!! Run as root with iproute2 (scripts/test.sh does) to run this scenario.\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            return None;
        }
        require("nft", "nftables");
        require("python3", "python3");
        let lab = Lab {
            dir: TempDir::new(&format!("lab-{test}")),
            prefix,
            _turn: turn,
        };
        lab.sh(&["net"]);
        Some(lab)
    }

    /// `lab.sh CMD PREFIX ARGS...`; fails the test with its output when it fails.
    pub fn sh(&self, args: &[&str]) {
        let (cmd, rest) = args.split_first().unwrap_or_else(|| panic!("no command"));
        let out = Command::new("bash")
            .arg(lab_sh())
            .arg(cmd)
            .arg(&self.prefix)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running lab.sh: {e}"));
        assert!(
            out.status.success(),
            "lab.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// A host on the internet with these addresses.
    pub fn public(&self, node: &str, ips: &[Ipv4Addr]) {
        let ips: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
        self.sh(&["public", node, &ips.join(",")]);
    }

    /// Router `node` with public address 198.18.0.(100+n), LAN 10.0.n.0/24, of type `nat`
    /// (None: no forwarding at all).
    pub fn router(&self, node: &str, n: u8, nat: Option<Nat>) -> Ipv4Addr {
        let wan = Ipv4Addr::new(198, 18, 0, 100 + n);
        self.sh(&[
            "router",
            node,
            &wan.to_string(),
            &format!("10.0.{n}"),
            nat.map(Nat::name).unwrap_or("none"),
        ]);
        wan
    }

    /// Host `node` in `router`'s LAN.
    pub fn host(&self, node: &str, router: &str, ip: Ipv4Addr) {
        self.sh(&["host", node, router, &ip.to_string()]);
    }

    /// A router and one phone behind it, 10.0.n.2: (router's public address, phone's address).
    pub fn nat_phone(&self, n: u8, nat: Nat) -> (Ipv4Addr, Ipv4Addr) {
        let wan = self.router(&format!("r{n}"), n, Some(nat));
        let phone = Ipv4Addr::new(10, 0, n, 2);
        self.host(&format!("phone{n}"), &format!("r{n}"), phone);
        (wan, phone)
    }

    /// `ip netns exec PREFIX-NODE PROGRAM ARGS` as a command to finish configuring.
    pub fn command(&self, node: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(node)]).arg(program);
        c
    }

    /// Runs `f` on a thread inside the namespace of `node`: sockets it creates stay there.
    pub fn within<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        join(self.spawn_within(node, f))
    }

    /// Starts `f` on a thread inside the namespace of `node`.
    pub fn spawn_within<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in(&self.ns(node), f)
    }

    /// A UDP socket on `addr` inside `node`'s namespace.
    pub fn udp(&self, node: &str, addr: SocketAddr) -> UdpSocket {
        self.within(node, move || {
            let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("{e}"));
            s
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(lab_sh())
            .args(["down", &self.prefix])
            .stdin(Stdio::null())
            .output();
        let left = Command::new("ip").args(["netns", "list"]).output();
        let left: Vec<String> = left
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect();
        if !left.is_empty() && !std::thread::panicking() {
            panic!("lab.sh down left namespaces behind: {left:?} ({out:?})");
        }
    }
}

/// Portico inside the box's namespace: `ip netns exec BOX portico run --config FILE`.
pub struct Boxed {
    pub node: String,
    ns: String,
    pub dir: TempDir,
    pub listen: Ipv4Addr,
    proc: Option<Proc>,
}

impl Boxed {
    /// Starts Portico in `node` on `listen:3478` with relays on `listen`, the lab's TURN user,
    /// `allow_peers`, and `extra` TOML (whole tables, e.g. `[media]`) appended; with `alt`,
    /// RFC 5780 on `alt` and port 3479. Returns once the API and STUN answer.
    pub fn start(
        lab: &Lab,
        node: &str,
        listen: Ipv4Addr,
        alt: Option<Ipv4Addr>,
        allow_peers: &[&str],
        extra: &str,
    ) -> Boxed {
        let dir = TempDir::new(&format!("labbox-{node}"));
        let state = dir.join("state");
        fs::create_dir_all(&state).unwrap_or_else(|e| panic!("{e}"));
        let peers: Vec<String> = allow_peers.iter().map(|p| format!("\"{p}\"")).collect();
        let mut toml = format!(
            "# Written by the NAT lab (controlplane/tests/lab).\n\
             state_dir = \"{}\"\n\n\
             [turn]\nlisten = [\"{listen}:3478\"]\nrelay_ip = \"{listen}\"\nworkers = 1\n\
             realm = \"{REALM_NAME}\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\
             allow_peers = [{}]\n\n[stun]\n",
            state.display(),
            peers.join(", ")
        );
        if let Some(alt) = alt {
            toml.push_str(&format!(
                "alternate_ip = \"{alt}\"\nalternate_port = 3479\n"
            ));
        }
        toml.push_str(&format!("\n[api]\nlisten = \"{API}\"\n\n{extra}\n"));
        let config = dir.join("portico.toml");
        fs::write(&config, &toml).unwrap_or_else(|e| panic!("{e}"));
        let bin = portico_testkit::portico::portico_bin();
        let mut cmd = lab.command(node, bin);
        cmd.args(["run", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .env("PORTICO_DATAPLANE", bin)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        let mut b = Boxed {
            node: node.to_string(),
            ns: lab.ns(node),
            proc: Some(Proc::spawn("portico", &mut cmd, &dir.join("portico.log"))),
            dir,
            listen,
        };
        let stun = sa(listen, 3478);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = b.within(move || {
                let healthy = http(API, "GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200);
                healthy
                    && UdpSocket::bind("0.0.0.0:0")
                        .is_ok_and(|s| binding(&s, stun, Duration::from_millis(300)).is_some())
            });
            if up {
                return b;
            }
            let exited = b.proc.as_mut().is_some_and(|p| !p.alive());
            assert!(
                !exited && Instant::now() < deadline,
                "portico in {} did not come up; config:\n{toml}\nlog:\n{}",
                b.ns,
                b.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("portico.log")).unwrap_or_default()
    }

    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        join(spawn_in(&self.ns, f))
    }

    /// An authenticated API call from inside the box: (status, JSON or Null).
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let token = fs::read_to_string(self.dir.join("state/admin.token"))
            .unwrap_or_else(|e| panic!("admin.token: {e}"))
            .trim()
            .to_string();
        let (method, path, body) = (method.to_string(), path.to_string(), body.to_string());
        let r = self.within(move || {
            http(
                API,
                &method,
                &path,
                &[
                    ("Authorization".into(), format!("Bearer {token}")),
                    ("Content-Type".into(), "application/json".into()),
                ],
                body.as_bytes(),
            )
        });
        let r = r.unwrap_or_else(|e| panic!("API: {e}; log:\n{}", self.log()));
        let json = if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
        };
        (r.status, json)
    }

    /// An API call that must be answered `expect`.
    #[track_caller]
    pub fn json(&self, method: &str, path: &str, body: &str, expect: u16) -> serde_json::Value {
        let (status, json) = self.call(method, path, body);
        assert_eq!(
            status,
            expect,
            "{method} {path} {body}: {json}; log:\n{}",
            self.log()
        );
        json
    }

    /// The `/metrics` text, from inside the box.
    pub fn metrics(&self) -> String {
        self.within(|| http(API, "GET", "/metrics", &[], b"").map(|r| r.text()))
            .unwrap_or_else(|e| panic!("/metrics: {e}"))
    }
}

impl Drop for Boxed {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if p.terminate(Duration::from_secs(10)).is_none() {
                p.kill9();
            }
        }
        if std::thread::panicking() {
            eprintln!("---- portico in {} ----\n{}", self.ns, self.log());
        }
    }
}

/// Starts `f` on a thread that has entered network namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
}

/// The thread's result; its panic goes on in the caller.
pub fn join<T>(h: JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Starts several rtp.py ends together, however long each takes to come up on a busy
/// machine: each creates a file once its socket is bound (--ready), all wait for one file
/// (--go), which [`Go::fire`] creates once every end is ready.
pub struct Go {
    dir: PathBuf,
    ends: std::cell::Cell<u32>,
}

impl Go {
    pub fn new(lab: &Lab) -> Go {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = lab
            .dir
            .join(format!("go{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Go {
            dir,
            ends: std::cell::Cell::new(0),
        }
    }

    fn ready_file(&self) -> PathBuf {
        let n = self.ends.get();
        self.ends.set(n + 1);
        self.dir.join(format!("{n}.ready"))
    }

    fn go_file(&self) -> PathBuf {
        self.dir.join("go")
    }

    /// Waits (30 s at most) until every end started with this `Go` has bound its socket,
    /// then lets them all start.
    pub fn fire(&self) {
        let want = self.ends.get() as usize;
        let count = || {
            fs::read_dir(&self.dir)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
                        .count()
                })
                .unwrap_or(0)
        };
        assert!(
            wait_until(Duration::from_secs(30), || count() >= want),
            "only {} of {want} rtp.py ends came up within 30 s",
            count()
        );
        fs::write(self.go_file(), b"go\n").unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One rtp.py run in a namespace (see scripts/lab/rtp.py).
pub struct Rtp {
    child: Child,
    what: String,
}

/// What an `Rtp` end reported.
#[derive(Debug)]
pub struct RtpReport(pub serde_json::Value);

impl RtpReport {
    pub fn sent(&self) -> u64 {
        self.0["sent"].as_u64().unwrap_or(0)
    }
    /// Distinct RTP packets (SSRC, sequence) that arrived.
    pub fn unique(&self) -> u64 {
        self.0["unique"].as_u64().unwrap_or(0)
    }
    /// Packets from each source address.
    pub fn sources(&self) -> Vec<(String, u64)> {
        self.0["sources"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Asserts that exactly `n` packets arrived, all valid, none lost, duplicated or
    /// reordered, all from `from`.
    #[track_caller]
    pub fn expect_all(&self, n: u64, from: SocketAddr, what: &str) {
        let r = &self.0;
        assert_eq!(self.unique(), n, "{what}: packets that arrived: {r}");
        assert_eq!(r["received"].as_u64(), Some(n), "{what}: {r}");
        assert_eq!(r["invalid"].as_u64(), Some(0), "{what}: {r}");
        assert_eq!(r["duplicates"].as_u64(), Some(0), "{what}: {r}");
        assert_eq!(r["reordered"].as_u64(), Some(0), "{what}: {r}");
        assert_eq!(
            self.sources(),
            vec![(from.to_string(), n)],
            "{what}: sources: {r}"
        );
        assert_eq!(
            r["ssrcs"].as_object().map(|m| m.len()),
            Some(1),
            "{what}: {r}"
        );
    }
    /// Asserts that nothing arrived.
    #[track_caller]
    pub fn expect_nothing(&self, what: &str) {
        assert_eq!(self.0["received"].as_u64(), Some(0), "{what}: {}", self.0);
        assert_eq!(self.0["invalid"].as_u64(), Some(0), "{what}: {}", self.0);
    }
}

/// How an rtp.py end sends.
pub enum To {
    Addr(SocketAddr),
    /// --reply: to whoever sent first.
    Reply,
}

impl Rtp {
    /// Starts rtp.py in `node`: binds `bind`, sends `count` packets (50/s) to `to` once `go`
    /// fires, expects `count` back.
    pub fn start(lab: &Lab, node: &str, bind: SocketAddr, to: To, count: u32, go: &Go) -> Rtp {
        Rtp::start_delayed(lab, node, bind, to, count, go, 0.0)
    }

    /// [`Rtp::start`], sending `delay` seconds after `go` fires.
    pub fn start_delayed(
        lab: &Lab,
        node: &str,
        bind: SocketAddr,
        to: To,
        count: u32,
        go: &Go,
        delay: f64,
    ) -> Rtp {
        let python = require("python3", "python3");
        let mut c = Command::new("timeout");
        c.args(["-k", "2", "90", "ip", "netns", "exec", &lab.ns(node)])
            .arg(python)
            .arg(rtp_py())
            .args(["--bind", &bind.to_string()])
            .arg("--ready")
            .arg(go.ready_file())
            .arg("--go")
            .arg(go.go_file());
        match to {
            To::Addr(a) => c.args(["--to", &a.to_string()]),
            To::Reply => c.args(["--reply", "--wait", "4"]),
        };
        c.args([
            "--count",
            &count.to_string(),
            "--expect",
            &count.to_string(),
            "--delay",
            &format!("{delay:.3}"),
            "--linger",
            "1",
            "--label",
            node,
        ]);
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting rtp.py in {node}: {e}"));
        Rtp {
            child,
            what: format!("rtp.py in {node} on {bind}"),
        }
    }

    /// One packet from `bind` to `to`, as a phone's first RTP packet when the call is
    /// answered: it opens the phone's NAT binding and lets a media relay latch onto it.
    pub fn prime(lab: &Lab, node: &str, bind: SocketAddr, to: SocketAddr) {
        let python = require("python3", "python3");
        let out = Command::new("timeout")
            .args(["-k", "2", "20", "ip", "netns", "exec", &lab.ns(node)])
            .arg(python)
            .arg(rtp_py())
            .args(["--bind", &bind.to_string(), "--to", &to.to_string()])
            .args(["--count", "1", "--linger", "0", "--label", "prime"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("rtp.py in {node}: {e}"));
        assert!(
            out.status.success(),
            "rtp.py --count 1 in {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn report(mut self) -> RtpReport {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = self.child.wait().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.success(),
            "{} failed ({status}):\n{out}{err}",
            self.what
        );
        RtpReport(
            serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}):\n{out}{err}", self.what)),
        )
    }
}

impl Drop for Rtp {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One RTP packet as rtp.py sends it (version 2, PCMU), for the tests' own sockets.
pub fn rtp_packet(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend(std::iter::repeat_n(0xd5u8, 160));
    p
}

/// The sequence number of an RTP packet (None for anything else).
pub fn rtp_seq(p: &[u8]) -> Option<u16> {
    (p.len() >= 12 && p[0] >> 6 == 2).then(|| u16::from_be_bytes([p[2], p[3]]))
}
