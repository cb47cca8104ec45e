//! `portico-perf turn-scale`: how many allocations a TURN server holds, and what holding them
//! costs.
//!
//! The generator grows the number of allocations held through the levels asked for (10k,
//! 50k, 100k by default). Every allocation is a client of its own: its own loopback source
//! address (see [`crate::turn_plan::client_addr`]), all sent from one `IP_PKTINFO` socket, so
//! 100,000 clients cost the generator one descriptor, not 100,000. Each allocation gets the
//! real setup (Allocate without credentials for the 401 challenge, Allocate with them,
//! CreatePermission and ChannelBind towards a peer socket of this process), then a light
//! keep-alive for as long as it is held: a ChannelData packet every `--data-secs`, a Refresh
//! every `--refresh-secs` and a new ChannelBind every 240 s (which refreshes the channel and
//! its permission). At each level, after the growth, the server is measured over
//! `--hold-secs` of keep-alive: its CPU, RSS, the kernel's slab and UDP socket memory,
//! refreshes that failed (the goal is 0), and the latency of a fresh Allocate made while the
//! level is held (probes, each deleted at once). At `--churn-level` allocations are also
//! created and deleted as fast as a window of `--churn-window` clients can for
//! `--churn-secs`. After the last level the keep-alive stops and the server's CPU is
//! measured while it expires everything; a sample of clients then checks (Refresh → 437)
//! that the allocations are gone.
//!
//! Every phase is bounded in time (`--time-limit` overall); requests are retransmitted on a
//! doubling timer, five tries.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use portico_dataplane::stun::{Class, Message};
use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;
use crate::proc_stats;
use crate::turn_msg::{self, Auth, Credentials, Reply, Request};
use crate::turn_plan::client_addr;
use crate::udp::{self, MsgBatch, BATCH};

const CHANNEL: u16 = 0x4000;
const RTO_NS: u64 = 500_000_000;
const MAX_TRIES: u8 = 5;
const MAX_STALE: u8 = 3;
const REBIND_NS: u64 = 240_000_000_000;
/// Address numbers of the probe and churn clients (held clients start at 0).
const PROBE_BASE: u32 = 3_000_000;
const CHURN_BASE: u32 = 4_000_000;
const CHURN_MAX: u32 = 4_000_000;
const PAYLOAD: usize = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct ScaleArgs {
    /// TURN server (UDP).
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value = "bench")]
    pub user: String,
    #[arg(long, default_value = "secret")]
    pub password: String,
    /// Allocation counts to hold, in increasing order.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    pub levels: Vec<u32>,
    /// Measurement window at each level.
    #[arg(long, default_value_t = 30)]
    pub hold_secs: u64,
    /// LIFETIME asked for in Allocate and Refresh.
    #[arg(long, default_value_t = 120)]
    pub lifetime: u32,
    #[arg(long, default_value_t = 60)]
    pub refresh_secs: u64,
    #[arg(long, default_value_t = 5)]
    pub data_secs: u64,
    /// Setups in flight at once during growth.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Level at which churn runs (0: none).
    #[arg(long, default_value_t = 50_000)]
    pub churn_level: u32,
    #[arg(long, default_value_t = 20)]
    pub churn_secs: u64,
    #[arg(long, default_value_t = 16)]
    pub churn_window: usize,
    /// One Allocate latency probe this often while holding.
    #[arg(long, default_value_t = 100)]
    pub probe_ms: u64,
    /// Server processes whose CPU and RSS are measured.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Label of the server in the report.
    #[arg(long, default_value = "server")]
    pub server: String,
    /// Whole run bound, seconds.
    #[arg(long, default_value_t = 1800)]
    pub time_limit: u64,
    /// Longest wait for the allocations to expire after the keep-alive stops (the wait is
    /// the longest lifetime the server granted + 15 s, at most this).
    #[arg(long, default_value_t = 700)]
    pub expiry_max_secs: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Kernel memory figures, machine-wide.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default)]
pub struct KernelMem {
    pub slab_kib: u64,
    pub sunreclaim_kib: u64,
    pub udp_inuse: u64,
    /// `/proc/net/sockstat` UDP mem, in pages.
    pub udp_mem_pages: u64,
}

impl KernelMem {
    pub fn read() -> KernelMem {
        let mut k = KernelMem::default();
        if let Ok(m) = std::fs::read_to_string("/proc/meminfo") {
            for line in m.lines() {
                let mut it = line.split_whitespace();
                let (Some(key), Some(v)) = (it.next(), it.next()) else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match key {
                    "Slab:" => k.slab_kib = v,
                    "SUnreclaim:" => k.sunreclaim_kib = v,
                    _ => {}
                }
            }
        }
        if let Ok(s) = std::fs::read_to_string("/proc/net/sockstat") {
            for line in s.lines().filter(|l| l.starts_with("UDP:")) {
                let f: Vec<&str> = line.split_whitespace().collect();
                for w in f.windows(2) {
                    match w[0] {
                        "inuse" => k.udp_inuse = w[1].parse().unwrap_or(0),
                        "mem" => k.udp_mem_pages = w[1].parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
        k
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct LevelReport {
    pub level: u32,
    /// Allocations ready (allocated, permitted, bound) when the hold started.
    pub held: u64,
    pub setup_failed: u64,
    pub setup_secs: f64,
    pub rss_kib: u64,
    /// Descriptors the server processes hold (`/proc/<pid>/fd`).
    pub fds: u64,
    pub kernel: KernelMem,
    pub hold_secs: f64,
    pub server_cpu_secs: f64,
    pub generator_cpu_secs: f64,
    pub refreshes: u64,
    pub refresh_failed: u64,
    pub rebinds: u64,
    pub data_sent: u64,
    pub data_received: u64,
    pub probes: u64,
    pub probe_failed: u64,
    pub allocate_p50_us: f64,
    pub allocate_p99_us: f64,
    pub allocate_max_us: f64,
    /// Churn (only at the churn level).
    pub churn_cycles: u64,
    pub churn_failed: u64,
    pub churn_secs: f64,
    pub churn_server_cpu_secs: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ScaleReport {
    pub server: String,
    pub baseline_rss_kib: u64,
    pub baseline_kernel: KernelMem,
    pub levels: Vec<LevelReport>,
    /// Allocations held when the keep-alive stopped, the wait, the server's CPU meanwhile.
    pub expiry_allocations: u64,
    pub expiry_secs: f64,
    pub expiry_server_cpu_secs: f64,
    pub expiry_checked: u64,
    /// Of the checked clients, how many got 437 (allocation gone) to a Refresh.
    pub expiry_gone: u64,
    pub expiry_kernel: KernelMem,
    pub expiry_rss_kib: u64,
    /// The longest lifetime the server granted (what the expiry wait is based on), and the
    /// LIFETIME asked for.
    pub expiry_granted_secs: u32,
    pub lifetime_asked: u32,
    /// Keep-alive requests (Refresh and ChannelBind) over the whole run, and failures.
    pub keepalive_requests: u64,
    pub keepalive_failed: u64,
    /// The server's CPU while idle before the first allocation (percent of one core).
    pub idle_cpu_pct: f64,
    /// Error responses and timeouts by client kind, request and code.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    Challenge,
    Allocating,
    Permitting,
    Binding,
    Ready,
    Deleting,
    Done,
    Failed,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Held = 0,
    Probe = 1,
    Churn = 2,
}

struct Client {
    addr: Ipv4Addr,
    step: Step,
    nonce: Vec<u8>,
    stale: u8,
    /// The request in flight, if any.
    pending: Option<(Request, [u8; 12], bool)>,
    seq: u32,
    tries: u8,
    sent_ns: u64,
    /// Allocate with credentials sent at (for the probe latency).
    alloc_ns: u64,
}

impl Client {
    fn new(addr: Ipv4Addr) -> Client {
        Client {
            addr,
            step: Step::Challenge,
            nonce: Vec::new(),
            stale: 0,
            pending: None,
            seq: 0,
            tries: 0,
            sent_ns: 0,
            alloc_ns: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Retransmit = 0,
    Data = 1,
    Refresh = 2,
    Rebind = 3,
}

/// Due time (ns), what, client kind, client index, request sequence (retransmits).
type TimerEntry = (u64, Timer, u8, u32, u32);

#[derive(Default)]
struct Counts {
    refreshes: u64,
    refresh_failed: u64,
    rebinds: u64,
    data_sent: u64,
    data_received: u64,
    setup_failed: u64,
    probe_failed: u64,
    churn_cycles: u64,
    churn_failed: u64,
    gone: u64,
}

struct Gen {
    args: ScaleArgs,
    start: Instant,
    deadline: Instant,
    sock: socket2::Socket,
    peer_sock: UdpSocket,
    peer: SocketAddr,
    tx: MsgBatch,
    tx_n: usize,
    rx: MsgBatch,
    peer_rx: MsgBatch,
    creds: Credentials,
    realm: Vec<u8>,
    key: Option<[u8; 16]>,
    held: Vec<Client>,
    probes: Vec<Client>,
    churn: Vec<Client>,
    timers: BinaryHeap<Reverse<TimerEntry>>,
    keepalive: bool,
    setups_in_flight: usize,
    ready: u64,
    counts: Counts,
    probe_hist: Histogram,
    tid_salt: u32,
    next_probe: u32,
    next_churn: u32,
    churn_on: bool,
    /// Keep-alive requests (Refresh, ChannelBind) over the whole run, and those that failed.
    all_refreshes: u64,
    all_refresh_failed: u64,
    next_seq: u32,
    /// Longest LIFETIME the server granted an Allocate (servers may grant more than asked:
    /// RFC 8656 §7.2 raises a shorter request to the server's default).
    granted: u32,
    /// Error responses and timeouts by request and cause, over the run.
    errors: std::collections::BTreeMap<String, u64>,
}

fn kind_name(r: Request) -> &'static str {
    match r {
        Request::Allocate { .. } => "Allocate",
        Request::Refresh { lifetime: 0 } => "delete",
        Request::Refresh { .. } => "Refresh",
        Request::CreatePermission { .. } => "CreatePermission",
        Request::ChannelBind { .. } => "ChannelBind",
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Gen {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn client(&mut self, kind: Kind, i: usize) -> Option<&mut Client> {
        match kind {
            Kind::Held => self.held.get_mut(i),
            Kind::Probe => self.probes.get_mut(i),
            Kind::Churn => self.churn.get_mut(i),
        }
    }

    fn tid(&mut self, kind: Kind, i: usize, seq: u32) -> [u8; 12] {
        let mut t = [0u8; 12];
        t[0] = kind as u8;
        t[1..5].copy_from_slice(&(i as u32).to_be_bytes());
        t[5..9].copy_from_slice(&seq.to_be_bytes());
        self.tid_salt = self
            .tid_salt
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        t[9..12].copy_from_slice(&self.tid_salt.to_be_bytes()[..3]);
        t
    }

    fn flush(&mut self) -> Result<(), String> {
        let mut from = 0;
        let mut spins = 0;
        while from < self.tx_n {
            match self.tx.send(self.sock.as_raw_fd(), from, self.tx_n) {
                Ok(n) if n > 0 => from += n,
                Ok(_) => {
                    spins += 1;
                    if spins > 1000 {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    spins += 1;
                    if spins > 1000 {
                        // Drop the rest: counted as lost by the retransmit timers.
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(format!("sendmmsg: {e}")),
            }
        }
        self.tx_n = 0;
        Ok(())
    }

    fn slot(&mut self) -> Result<usize, String> {
        if self.tx_n == self.tx.capacity() {
            self.flush()?;
        }
        self.tx_n += 1;
        Ok(self.tx_n - 1)
    }

    fn transmit(&mut self, kind: Kind, i: usize) -> Result<(), String> {
        let now = self.now();
        let target = self.args.target;
        let Some(c) = self.client(kind, i) else {
            return Ok(());
        };
        let Some((req, tid, authed)) = c.pending else {
            return Ok(());
        };
        c.sent_ns = now;
        let (addr, nonce) = (c.addr, c.nonce.clone());
        let seq = c.seq;
        let s = self.slot()?;
        let key = self.key;
        let auth = match (authed, key) {
            (true, Some(k)) => Some((k, nonce)),
            _ => None,
        };
        let user = self.creds.username.clone();
        let realm = self.realm.clone();
        let a = auth.as_ref().map(|(k, n)| Auth {
            username: &user,
            realm: &realm,
            nonce: n,
            key: k,
        });
        let len = turn_msg::write_request(self.tx.slot_mut(s), &tid, req, a.as_ref())?;
        self.tx.set_len(s, len);
        self.tx.set_peer(s, target);
        self.tx.set_source(s, Some(addr));
        let rto = RTO_NS << self.client(kind, i).map(|c| c.tries).unwrap_or(0).min(4);
        self.timers.push(Reverse((
            now + rto,
            Timer::Retransmit,
            kind as u8,
            i as u32,
            seq,
        )));
        Ok(())
    }

    fn request(&mut self, kind: Kind, i: usize, req: Request) -> Result<(), String> {
        // One sequence for every request of the run: a slot reused by a new churn client
        // must not match the retransmit timers of its predecessor.
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        match self.client(kind, i) {
            Some(c) => c.seq = seq,
            None => return Ok(()),
        }
        let tid = self.tid(kind, i, seq);
        let Some(c) = self.client(kind, i) else {
            return Ok(());
        };
        let authed = !c.nonce.is_empty();
        c.pending = Some((req, tid, authed));
        c.tries = 0;
        if matches!(req, Request::Allocate { .. }) && authed {
            c.alloc_ns = 0;
        }
        self.transmit(kind, i)
    }

    fn alloc_req(&self) -> Request {
        Request::Allocate {
            lifetime: Some(self.args.lifetime),
        }
    }

    fn start_client(&mut self, kind: Kind, i: usize) -> Result<(), String> {
        let req = self.alloc_req();
        self.request(kind, i, req)
    }

    fn fail(&mut self, kind: Kind, i: usize) {
        let step = match self.client(kind, i) {
            Some(c) => {
                let s = c.step;
                c.step = Step::Failed;
                c.pending = None;
                s
            }
            None => return,
        };
        match (kind, step) {
            (Kind::Held, Step::Ready) => {
                self.counts.refresh_failed += 1;
                self.all_refresh_failed += 1;
                self.ready -= 1;
            }
            (Kind::Held, Step::Challenge | Step::Allocating | Step::Permitting | Step::Binding) => {
                self.counts.setup_failed += 1;
                self.setups_in_flight -= 1;
            }
            (Kind::Held, _) => {}
            (Kind::Probe, _) => self.counts.probe_failed += 1,
            (Kind::Churn, _) => {
                self.counts.churn_failed += 1;
            }
        }
    }

    fn send_data(&mut self, i: usize) -> Result<(), String> {
        let target = self.args.target;
        let Some(addr) = self.held.get(i).map(|c| c.addr) else {
            return Ok(());
        };
        let s = self.slot()?;
        let buf = self.tx.slot_mut(s);
        if !turn_msg::write_channel_header(buf, CHANNEL, PAYLOAD) {
            return Err("channel header".into());
        }
        buf[4..4 + PAYLOAD].fill(0x5a);
        self.tx.set_len(s, 4 + PAYLOAD);
        self.tx.set_peer(s, target);
        self.tx.set_source(s, Some(addr));
        self.counts.data_sent += 1;
        Ok(())
    }

    fn on_timer(&mut self, t: Timer, kind: Kind, i: usize, seq: u32) -> Result<(), String> {
        let now = self.now();
        match t {
            Timer::Retransmit => {
                let Some(c) = self.client(kind, i) else {
                    return Ok(());
                };
                if c.seq != seq || c.pending.is_none() {
                    return Ok(());
                }
                c.tries += 1;
                if c.tries >= MAX_TRIES {
                    let what = c.pending.map(|p| kind_name(p.0)).unwrap_or("?");
                    *self
                        .errors
                        .entry(format!("{kind:?} {what}: timeout"))
                        .or_insert(0) += 1;
                    self.fail(kind, i);
                    return Ok(());
                }
                self.transmit(kind, i)
            }
            Timer::Data | Timer::Refresh | Timer::Rebind => {
                if !self.keepalive {
                    return Ok(());
                }
                let Some(c) = self.held.get(i) else {
                    return Ok(());
                };
                if c.step != Step::Ready {
                    return Ok(());
                }
                let busy = c.pending.is_some();
                match t {
                    Timer::Data => {
                        self.send_data(i)?;
                        self.timers.push(Reverse((
                            now + self.args.data_secs * 1_000_000_000,
                            Timer::Data,
                            0,
                            i as u32,
                            0,
                        )));
                    }
                    _ if busy => {
                        self.timers
                            .push(Reverse((now + 1_000_000_000, t, 0, i as u32, 0)));
                    }
                    Timer::Refresh => {
                        self.counts.refreshes += 1;
                        self.all_refreshes += 1;
                        let lifetime = self.args.lifetime;
                        self.request(Kind::Held, i, Request::Refresh { lifetime })?;
                        self.timers.push(Reverse((
                            now + self.args.refresh_secs * 1_000_000_000,
                            Timer::Refresh,
                            0,
                            i as u32,
                            0,
                        )));
                    }
                    _ => {
                        self.counts.rebinds += 1;
                        self.all_refreshes += 1;
                        let peer = self.peer;
                        self.request(
                            Kind::Held,
                            i,
                            Request::ChannelBind {
                                number: CHANNEL,
                                peer,
                            },
                        )?;
                        self.timers
                            .push(Reverse((now + REBIND_NS, Timer::Rebind, 0, i as u32, 0)));
                    }
                }
                Ok(())
            }
        }
    }

    /// A client became ready: its keep-alive timers start at random phases.
    fn ready(&mut self, i: usize) {
        let now = self.now();
        self.ready += 1;
        self.setups_in_flight -= 1;
        let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
        let data = self.args.data_secs * 1_000_000_000;
        let refresh = self.args.refresh_secs * 1_000_000_000;
        self.timers.push(Reverse((
            now + h % data.max(1),
            Timer::Data,
            0,
            i as u32,
            0,
        )));
        self.timers.push(Reverse((
            now + h % refresh.max(1),
            Timer::Refresh,
            0,
            i as u32,
            0,
        )));
        self.timers.push(Reverse((
            now + REBIND_NS - h % 30_000_000_000,
            Timer::Rebind,
            0,
            i as u32,
            0,
        )));
    }

    fn on_reply(&mut self, kind: Kind, i: usize, reply: Reply) -> Result<(), String> {
        let now = self.now();
        let peer = self.peer;
        let Some(c) = self.client(kind, i) else {
            return Ok(());
        };
        let Some((req, _, _)) = c.pending else {
            return Ok(());
        };
        c.pending = None;
        match reply {
            Reply::Challenge { code, realm, nonce } => {
                c.stale = if code == 438 { c.stale + 1 } else { 0 };
                if c.stale > MAX_STALE || (code == 401 && !c.nonce.is_empty()) {
                    self.fail(kind, i);
                    return Ok(());
                }
                c.nonce = nonce;
                if self.key.is_none() {
                    self.key = Some(self.creds.key(&realm));
                    self.realm = realm;
                }
                if matches!(req, Request::Allocate { .. }) {
                    if let Some(c) = self.client(kind, i) {
                        c.step = Step::Allocating;
                    }
                }
                self.request(kind, i, req)?;
                if let (Request::Allocate { .. }, Some(c)) = (req, self.client(kind, i)) {
                    c.alloc_ns = now;
                }
            }
            Reply::Error { code } => {
                if !(code == 437 && matches!(c.step, Step::Done | Step::Deleting)) {
                    *self
                        .errors
                        .entry(format!("{kind:?} {}: {code}", kind_name(req)))
                        .or_insert(0) += 1;
                }
                let Some(c) = self.client(kind, i) else {
                    return Ok(());
                };
                if kind == Kind::Held && c.step == Step::Ready {
                    self.fail(kind, i);
                    return Ok(());
                }
                if kind != Kind::Held && c.step == Step::Deleting && code == 437 {
                    // Already gone: fine for a delete.
                    c.step = Step::Done;
                    return self.after_done(kind, i);
                }
                if c.step == Step::Done && code == 437 {
                    self.counts.gone += 1;
                    return Ok(());
                }
                self.fail(kind, i);
            }
            Reply::Invalid => {
                *self
                    .errors
                    .entry(format!("{kind:?} {}: invalid reply", kind_name(req)))
                    .or_insert(0) += 1;
                self.fail(kind, i)
            }
            Reply::Success { lifetime, .. } => match (kind, {
                c.stale = 0;
                c.step
            }) {
                (Kind::Held, Step::Allocating) => {
                    c.step = Step::Permitting;
                    self.granted = self.granted.max(lifetime.unwrap_or(0));
                    self.request(kind, i, Request::CreatePermission { peer })?;
                }
                (Kind::Held, Step::Permitting) => {
                    c.step = Step::Binding;
                    self.request(
                        kind,
                        i,
                        Request::ChannelBind {
                            number: CHANNEL,
                            peer,
                        },
                    )?;
                }
                (Kind::Held, Step::Binding) => {
                    c.step = Step::Ready;
                    self.ready(i);
                }
                (Kind::Held, _) => {}
                (_, Step::Allocating) => {
                    if kind == Kind::Probe {
                        let t = now.saturating_sub(c.alloc_ns);
                        self.probe_hist.record(t);
                    }
                    if let Some(c) = self.client(kind, i) {
                        c.step = Step::Deleting;
                    }
                    self.request(kind, i, Request::Refresh { lifetime: 0 })?;
                }
                (_, Step::Deleting) => {
                    c.step = Step::Done;
                    return self.after_done(kind, i);
                }
                _ => {}
            },
        }
        Ok(())
    }

    fn after_done(&mut self, kind: Kind, _i: usize) -> Result<(), String> {
        if kind == Kind::Churn {
            self.counts.churn_cycles += 1;
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<usize, String> {
        let mut total = 0;
        for _ in 0..16 {
            let n = match self.rx.recv(self.sock.as_raw_fd(), libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("recvmmsg: {e}")),
            };
            total += n;
            let mut local = [0u8; 2048];
            for k in 0..n {
                let d = self.rx.datagram(k);
                let len = d.len().min(local.len());
                local[..len].copy_from_slice(&d[..len]);
                let Ok(m) = Message::parse(&local[..len]) else {
                    continue;
                };
                if !matches!(m.class(), Class::SuccessResponse | Class::ErrorResponse) {
                    continue;
                }
                let tid = m.transaction_id();
                let kind = match tid[0] {
                    0 => Kind::Held,
                    1 => Kind::Probe,
                    2 => Kind::Churn,
                    _ => continue,
                };
                let i = u32::from_be_bytes([tid[1], tid[2], tid[3], tid[4]]) as usize;
                let Some(c) = self.client(kind, i) else {
                    continue;
                };
                let Some((req, want, authed)) = c.pending else {
                    continue;
                };
                if want != tid {
                    continue;
                }
                let key = if authed { self.key } else { None };
                let reply = turn_msg::read_reply(&m, req.method(), key.as_ref());
                self.on_reply(kind, i, reply)?;
            }
            if n < self.rx.capacity() {
                break;
            }
        }
        for _ in 0..16 {
            match self
                .peer_rx
                .recv(self.peer_sock.as_raw_fd(), libc::MSG_DONTWAIT)
            {
                Ok(n) => {
                    self.counts.data_received += n as u64;
                    total += n;
                    if n < self.peer_rx.capacity() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("peer recvmmsg: {e}")),
            }
        }
        Ok(total)
    }

    /// One turn of the loop: receive, run due timers, flush. Returns whether anything moved.
    fn turn(&mut self) -> Result<bool, String> {
        let got = self.receive()?;
        let now = self.now();
        let mut fired = 0;
        while fired < 4096 {
            match self.timers.peek() {
                Some(Reverse((at, ..))) if *at <= now => {}
                _ => break,
            }
            let Some(Reverse((_, t, k, i, seq))) = self.timers.pop() else {
                break;
            };
            let kind = match k {
                0 => Kind::Held,
                1 => Kind::Probe,
                _ => Kind::Churn,
            };
            self.on_timer(t, kind, i as usize, seq)?;
            fired += 1;
        }
        self.flush()?;
        Ok(got > 0 || fired > 0)
    }

    fn idle_wait(&self) {
        let mut fds = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.peer_sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 1) };
    }

    fn out_of_time(&self) -> Result<(), String> {
        if Instant::now() > self.deadline {
            return Err(format!("--time-limit {} s reached", self.args.time_limit));
        }
        Ok(())
    }

    /// Runs the loop for `secs`, with probes and churn as switched on.
    fn run_for(&mut self, secs: f64, probes: bool) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut next_probe = Instant::now();
        while Instant::now() < end {
            self.out_of_time()?;
            if probes && Instant::now() >= next_probe {
                next_probe += Duration::from_millis(self.args.probe_ms.max(1));
                let i = self.probes.len();
                self.probes
                    .push(Client::new(client_addr(PROBE_BASE + self.next_probe)));
                self.next_probe += 1;
                self.start_client(Kind::Probe, i)?;
            }
            if self.churn_on {
                self.churn_step()?;
            }
            if !self.turn()? {
                self.idle_wait();
            }
        }
        Ok(())
    }

    /// Keeps `--churn-window` churn clients cycling: each slot that finished starts anew from
    /// a fresh address.
    fn churn_step(&mut self) -> Result<(), String> {
        for slot in 0..self.churn.len() {
            if matches!(self.churn[slot].step, Step::Done | Step::Failed)
                && self.next_churn < CHURN_MAX
            {
                self.churn[slot] = Client::new(client_addr(CHURN_BASE + self.next_churn));
                self.next_churn += 1;
                self.start_client(Kind::Churn, slot)?;
            }
        }
        Ok(())
    }

    /// Grows the held allocations to `level`.
    fn grow(&mut self, level: u32) -> Result<(), String> {
        while (self.held.len() as u32) < level || self.setups_in_flight > 0 {
            self.out_of_time()?;
            while self.setups_in_flight < self.args.window && (self.held.len() as u32) < level {
                let i = self.held.len();
                self.held.push(Client::new(client_addr(i as u32)));
                self.setups_in_flight += 1;
                self.start_client(Kind::Held, i)?;
            }
            if !self.turn()? {
                self.idle_wait();
            }
        }
        Ok(())
    }

    fn server_cpu(&self) -> f64 {
        self.args
            .pids
            .iter()
            .filter_map(|p| proc_stats::cpu_seconds(*p).ok())
            .sum()
    }

    fn server_fds(&self) -> u64 {
        self.args
            .pids
            .iter()
            .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
            .map(|d| d.count() as u64)
            .sum()
    }

    fn server_rss(&self) -> u64 {
        self.args
            .pids
            .iter()
            .filter_map(|p| proc_stats::rss_kib(*p).ok())
            .sum()
    }
}

pub fn run(args: &ScaleArgs) -> Result<ScaleReport, String> {
    if args.levels.is_empty() || args.levels.windows(2).any(|w| w[0] >= w[1]) {
        return Err("--levels must be increasing".into());
    }
    if args.levels.last().copied().unwrap_or(0) >= PROBE_BASE {
        return Err(format!("--levels above {PROBE_BASE} are not supported"));
    }
    if args.data_secs == 0 || args.refresh_secs == 0 || args.lifetime == 0 {
        return Err("--data-secs, --refresh-secs and --lifetime must be positive".into());
    }
    if args.refresh_secs * 2 > u64::from(args.lifetime) {
        return Err("--refresh-secs must be at most half of --lifetime".into());
    }
    let (sock, _) = udp::pktinfo_socket().map_err(err)?;
    let peer_sock = UdpSocket::bind("127.0.0.1:0").map_err(err)?;
    peer_sock.set_nonblocking(true).map_err(err)?;
    let _ = socket2::SockRef::from(&peer_sock).set_recv_buffer_size(udp::SOCKET_BUFFER);
    let peer = peer_sock.local_addr().map_err(err)?;
    let start = Instant::now();
    let mut g = Gen {
        args: args.clone(),
        start,
        deadline: start + Duration::from_secs(args.time_limit),
        sock,
        peer_sock,
        peer,
        tx: MsgBatch::new_pktinfo(BATCH, 1536),
        tx_n: 0,
        rx: MsgBatch::new_pktinfo(BATCH, 2048),
        peer_rx: MsgBatch::new(BATCH, 2048, false),
        creds: Credentials::long_term(&args.user, &args.password),
        realm: Vec::new(),
        key: None,
        held: Vec::with_capacity(args.levels.last().copied().unwrap_or(0) as usize),
        probes: Vec::new(),
        churn: Vec::new(),
        timers: BinaryHeap::new(),
        keepalive: true,
        setups_in_flight: 0,
        ready: 0,
        counts: Counts::default(),
        probe_hist: Histogram::new(),
        tid_salt: std::process::id(),
        next_probe: 0,
        next_churn: 0,
        churn_on: false,
        all_refreshes: 0,
        all_refresh_failed: 0,
        next_seq: 0,
        granted: 0,
        errors: Default::default(),
    };
    let mut report = ScaleReport {
        server: args.server.clone(),
        baseline_rss_kib: g.server_rss(),
        baseline_kernel: KernelMem::read(),
        lifetime_asked: args.lifetime,
        ..Default::default()
    };
    let cpu0 = g.server_cpu();
    std::thread::sleep(Duration::from_secs(3));
    report.idle_cpu_pct = 100.0 * (g.server_cpu() - cpu0) / 3.0;
    let outcome = run_levels(&mut g, &mut report);
    report.errors = std::mem::take(&mut g.errors);
    if let Err(e) = outcome {
        eprintln!("turn-scale: stopped: {e}");
        report.stopped = Some(e);
    }
    Ok(report)
}

fn run_levels(g: &mut Gen, report: &mut ScaleReport) -> Result<(), String> {
    for &level in &g.args.levels.clone() {
        let t0 = Instant::now();
        eprintln!("turn-scale: {}: growing to {level}", g.args.server);
        g.grow(level)?;
        let setup_secs = t0.elapsed().as_secs_f64();
        let held = g.ready;
        eprintln!(
            "turn-scale: {}: {held} held after {setup_secs:.1} s; holding {} s",
            g.args.server, g.args.hold_secs
        );
        // Settle, then measure the hold.
        g.run_for(2.0, false)?;
        let c0 = std::mem::take(&mut g.counts);
        g.probe_hist = Histogram::new();
        let (cpu0, gen0, h0) = (
            g.server_cpu(),
            proc_stats::self_cpu_seconds(),
            Instant::now(),
        );
        g.run_for(g.args.hold_secs as f64, true)?;
        let hold = h0.elapsed().as_secs_f64();
        let (cpu1, gen1) = (g.server_cpu(), proc_stats::self_cpu_seconds());
        // Let the last probes finish.
        g.run_for(1.0, false)?;
        let c = std::mem::take(&mut g.counts);
        let mut r = LevelReport {
            level,
            held,
            setup_failed: c0.setup_failed + c.setup_failed,
            setup_secs,
            rss_kib: g.server_rss(),
            fds: g.server_fds(),
            kernel: KernelMem::read(),
            hold_secs: hold,
            server_cpu_secs: cpu1 - cpu0,
            generator_cpu_secs: gen1 - gen0,
            refreshes: c.refreshes,
            refresh_failed: c.refresh_failed + c0.refresh_failed,
            rebinds: c.rebinds,
            data_sent: c.data_sent,
            data_received: c.data_received,
            probes: g.probe_hist.count() + c.probe_failed,
            probe_failed: c.probe_failed,
            allocate_p50_us: g.probe_hist.quantile(0.5) as f64 / 1000.0,
            allocate_p99_us: g.probe_hist.quantile(0.99) as f64 / 1000.0,
            allocate_max_us: g.probe_hist.max() as f64 / 1000.0,
            ..Default::default()
        };
        g.probes.clear();
        if level == g.args.churn_level && g.args.churn_secs > 0 {
            eprintln!("turn-scale: {}: churn at {level}", g.args.server);
            g.churn = (0..g.args.churn_window.max(1))
                .map(|_| {
                    let mut c = Client::new(Ipv4Addr::UNSPECIFIED);
                    c.step = Step::Done;
                    c
                })
                .collect();
            g.churn_on = true;
            let cpu0 = g.server_cpu();
            let t = Instant::now();
            g.run_for(g.args.churn_secs as f64, false)?;
            r.churn_secs = t.elapsed().as_secs_f64();
            r.churn_server_cpu_secs = g.server_cpu() - cpu0;
            g.churn_on = false;
            // Let the cycles in flight finish (they are not counted).
            g.run_for(2.0, false)?;
            let c = std::mem::take(&mut g.counts);
            r.churn_cycles = c.churn_cycles;
            r.churn_failed = c.churn_failed;
            r.refresh_failed += c.refresh_failed;
            g.churn.clear();
        }
        eprintln!(
            "turn-scale: {}: level {level}: rss {} KiB, server cpu {:.2} s over {:.0} s, refreshes {} (failed {}), allocate p99 {:.0} µs",
            g.args.server, r.rss_kib, r.server_cpu_secs, r.hold_secs, r.refreshes, r.refresh_failed, r.allocate_p99_us
        );
        let lost = r.refresh_failed;
        report.levels.push(r);
        if lost > 0 && held == 0 {
            return Err("every allocation was lost".into());
        }
    }
    // Expiry: silence, then the server expires everything.
    g.keepalive = false;
    report.expiry_allocations = g.ready;
    report.keepalive_requests = g.all_refreshes;
    report.keepalive_failed = g.all_refresh_failed;
    let granted = if g.granted > 0 {
        g.granted
    } else {
        g.args.lifetime
    };
    report.expiry_granted_secs = granted;
    let wait = (f64::from(granted) + 15.0).min(g.args.expiry_max_secs as f64);
    eprintln!(
        "turn-scale: {}: keep-alive stopped; {wait:.0} s for {} allocations to expire",
        g.args.server, g.ready
    );
    let cpu0 = g.server_cpu();
    let t = Instant::now();
    g.run_for(wait, false)?;
    report.expiry_secs = t.elapsed().as_secs_f64();
    report.expiry_server_cpu_secs = g.server_cpu() - cpu0;
    report.expiry_kernel = KernelMem::read();
    report.expiry_rss_kib = g.server_rss();
    // A sample of held clients: a Refresh must now get 437.
    let n = g.held.len();
    let sample: Vec<usize> = (0..200.min(n)).map(|k| k * n / 200.min(n).max(1)).collect();
    g.counts = Counts::default();
    for &i in &sample {
        if let Some(c) = g.held.get_mut(i) {
            c.step = Step::Done;
        }
        let lifetime = g.args.lifetime;
        g.request(Kind::Held, i, Request::Refresh { lifetime })?;
    }
    g.run_for(3.0, false)?;
    report.expiry_checked = sample.len() as u64;
    report.expiry_gone = g.counts.gone;
    Ok(())
}

fn kib(v: u64) -> String {
    if v >= 10 * 1024 {
        format!("{:.0} MiB", v as f64 / 1024.0)
    } else {
        format!("{v} KiB")
    }
}

/// The Markdown table rows of one report (server, level, ...), for the results section.
pub fn markdown_rows(r: &ScaleReport) -> Vec<String> {
    let mut rows = Vec::new();
    let b = r.baseline_kernel;
    for l in &r.levels {
        let per_alloc = |d: i64| {
            if l.held == 0 {
                "–".to_string()
            } else {
                format!("{:.2}", d as f64 / l.held as f64)
            }
        };
        let rss_d = l.rss_kib as i64 - r.baseline_rss_kib as i64;
        let slab_d = l.kernel.slab_kib as i64 - b.slab_kib as i64;
        let sunr_d = l.kernel.sunreclaim_kib as i64 - b.sunreclaim_kib as i64;
        let keepalive = l.refreshes + l.rebinds + l.data_sent;
        let cpu_pct = 100.0 * l.server_cpu_secs / l.hold_secs.max(0.001);
        let us_per = if keepalive > 0 {
            format!("{:.1}", l.server_cpu_secs * 1e6 / keepalive as f64)
        } else {
            "–".into()
        };
        let churn = if l.churn_secs > 0.0 {
            format!(
                "{:.0}/s ({} failed; server CPU {:.0}%)",
                l.churn_cycles as f64 / l.churn_secs,
                l.churn_failed,
                100.0 * l.churn_server_cpu_secs / l.churn_secs
            )
        } else {
            String::new()
        };
        rows.push(format!(
            "| {} | {} | {} ({} failed, {:.0} s) | {} (+{} KiB/alloc) | {} | +{} / +{} ({} / {} KiB/alloc) | {} sockets, {} | {:.1}% ({} µs per message) | {} / {} / {} / {} | {:.2} / {:.2} ms ({} probes, {} failed) | {} |",
            r.server,
            l.level,
            l.held,
            l.setup_failed,
            l.setup_secs,
            kib(l.rss_kib),
            per_alloc(rss_d),
            l.fds,
            kib(slab_d.max(0) as u64),
            kib(sunr_d.max(0) as u64),
            per_alloc(slab_d),
            per_alloc(sunr_d),
            l.kernel.udp_inuse,
            kib(l.kernel.udp_mem_pages * 4),
            cpu_pct,
            us_per,
            l.refreshes,
            l.refresh_failed,
            l.data_sent,
            l.data_received,
            l.allocate_p50_us / 1000.0,
            l.allocate_p99_us / 1000.0,
            l.probes,
            l.probe_failed,
            churn,
        ));
    }
    rows
}

/// One line on expiry.
pub fn expiry_line(r: &ScaleReport) -> String {
    format!(
        "{}: idle CPU before the run {:.1}%; keep-alive requests over the run {} ({} failed); {} allocations left to expire (lifetime granted {} s for {} asked): server CPU {:.2} s over the {:.0} s wait; afterwards {}/{} sampled clients got 437 (gone); RSS then {}, UDP sockets in use {}; errors {:?}{}",
        r.server,
        r.idle_cpu_pct,
        r.keepalive_requests,
        r.keepalive_failed,
        r.expiry_allocations,
        r.expiry_granted_secs,
        r.lifetime_asked,
        r.expiry_server_cpu_secs,
        r.expiry_secs,
        r.expiry_gone,
        r.expiry_checked,
        kib(r.expiry_rss_kib),
        r.expiry_kernel.udp_inuse,
        r.errors,
        r.stopped
            .as_ref()
            .map(|s| format!("; stopped early: {s}"))
            .unwrap_or_default(),
    )
}

/// The results section: setup facts, one table row per server and level, the expiry lines,
/// then `notes` (what the box allowed, written by bench.sh).
pub fn section(
    args: &crate::bench_report::BenchReportArgs,
    dir: &std::path::Path,
    notes: &str,
) -> Result<String, String> {
    use std::fmt::Write as _;
    let mut reports = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("json"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let r: ScaleReport =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        reports.push(r);
    }
    let order = |s: &str| {
        args.servers
            .iter()
            .position(|x| x == s)
            .unwrap_or(usize::MAX)
    };
    reports.sort_by_key(|r| (order(&r.server), r.server.clone()));
    let mut md = String::from("## TURN at scale: allocations held, Portico vs coturn\n\n");
    let _ = writeln!(md, "| | |\n|---|---|\n| command | `{}` |", args.command);
    for f in &args.facts {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push_str(
        "\n| server | level | held (setup failed, growth time) | RSS (per allocation over idle) \
         | server descriptors | kernel Slab / SUnreclaim over idle (per allocation) | UDP sockets, UDP buffer memory \
         | server CPU while holding (per keep-alive message) | refreshes / failed / data sent / relayed back \
         | Allocate p50 / p99 while holding | churn at this level |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &reports {
        for row in markdown_rows(r) {
            let _ = writeln!(md, "{row}");
        }
    }
    md.push('\n');
    for r in &reports {
        let _ = writeln!(md, "- {}", expiry_line(r));
    }
    if !notes.trim().is_empty() {
        md.push('\n');
        md.push_str(notes.trim_end());
        md.push('\n');
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_memory_is_read_from_proc() {
        let k = KernelMem::read();
        assert!(k.slab_kib > 0 && k.sunreclaim_kib > 0, "{k:?}");
        assert!(k.slab_kib >= k.sunreclaim_kib);
    }

    #[test]
    fn rejects_bad_arguments() {
        let mut a = ScaleArgs {
            target: "127.0.0.1:9".parse().unwrap(),
            user: "u".into(),
            password: "p".into(),
            levels: vec![10, 5],
            hold_secs: 1,
            lifetime: 120,
            refresh_secs: 60,
            data_secs: 5,
            window: 1,
            churn_level: 0,
            churn_secs: 0,
            churn_window: 1,
            probe_ms: 100,
            pids: vec![],
            server: "x".into(),
            time_limit: 5,
            expiry_max_secs: 700,
            json: None,
        };
        assert!(run(&a).unwrap_err().contains("increasing"));
        a.levels = vec![10];
        a.refresh_secs = 100;
        assert!(run(&a).unwrap_err().contains("half"));
    }

    /// Against a port where nobody answers, the run gives up within its time limit with
    /// the setups failed, not hanging.
    #[test]
    fn a_silent_server_fails_the_setups_within_the_time_limit() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = ScaleArgs {
            target: silent.local_addr().unwrap(),
            user: "u".into(),
            password: "p".into(),
            levels: vec![3],
            hold_secs: 1,
            lifetime: 120,
            refresh_secs: 60,
            data_secs: 5,
            window: 8,
            churn_level: 0,
            churn_secs: 0,
            churn_window: 1,
            probe_ms: 100,
            pids: vec![],
            server: "silent".into(),
            time_limit: 20,
            expiry_max_secs: 700,
            json: None,
        };
        let t = Instant::now();
        let r = run(&a).unwrap();
        assert!(t.elapsed() < Duration::from_secs(21));
        // Either the setups all failed (five tries) or the limit stopped the run.
        let failed = r.levels.first().map(|l| l.setup_failed).unwrap_or(0);
        assert!(failed == 3 || r.stopped.is_some(), "{r:?}");
    }
}
