//! `portico-perf stun`: STUN Binding load.
//!
//! Each socket is connected to the target and numbers its requests; the transaction id
//! carries (run nonce, socket index, sequence number), so a response is matched to its send
//! time in a [`TxTable`] without any allocation or hashing. Every response is checked the
//! way a client would: it must parse (FINGERPRINT verified when present), be a Binding
//! success response to one of our transactions, and carry an XOR-MAPPED-ADDRESS equal to the
//! socket's own address.
//!
//! Two ways to offer load:
//! - rate mode paces sends to a fixed total rate (open loop: a slow server does not slow the
//!   sender, it shows up as latency and loss), so CPU per request can be compared;
//! - flat-out mode keeps up to `window` requests outstanding per socket (closed loop), which
//!   finds the throughput ceiling without overrunning socket buffers.
//!
//! Runs are bounded: sending stops after `duration` or `requests`, then responses are
//! awaited for at most `timeout`, after which anything unanswered counts as lost.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portico_dataplane::stun::{attr, method, Class, Message, MessageWriter, MAGIC_COOKIE};
use serde::Serialize;
use socket2::Socket;

use crate::histogram::Histogram;
use crate::proc_stats;
use crate::report::{self, LatencyUs, ProcessUsage, ProgressLine, UsageProbe};
use crate::txtable::TxTable;
use crate::udp::{self, MsgBatch, BATCH};

#[derive(clap::Args, Debug, Clone)]
pub struct StunArgs {
    /// STUN server to load, e.g. 127.0.0.1:3478.
    #[arg(long)]
    pub target: SocketAddr,
    /// UDP sockets (client flows) to spread the load over; a server with SO_REUSEPORT
    /// workers hashes flows to workers, so use several.
    #[arg(long, default_value_t = 16)]
    pub sockets: usize,
    /// Offered load in requests/s over all sockets; omit to run flat out.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Flat out: requests outstanding per socket.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop sending after this many requests (if that comes before `duration`).
    #[arg(long)]
    pub requests: Option<u64>,
    /// A request unanswered after this long counts as lost.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Generator threads; sockets are shared out among them.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Server process to charge CPU time and report peak RSS for (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl StunArgs {
    /// Defaults for the given target, as the command line would give them.
    pub fn new(target: SocketAddr) -> Self {
        StunArgs {
            target,
            sockets: 16,
            rate: None,
            window: 64,
            duration: 10.0,
            requests: None,
            timeout_ms: 1000,
            threads: 1,
            server_pids: Vec::new(),
            json: None,
            quiet: true,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=4096).contains(&self.sockets) {
            return Err("--sockets must be 1..=4096".into());
        }
        if self.threads == 0 || self.threads > self.sockets.min(64) {
            return Err("--threads must be 1..=min(64, --sockets)".into());
        }
        if !(1..=4096).contains(&self.window) {
            return Err("--window must be 1..=4096".into());
        }
        if !(self.duration > 0.0 && self.duration <= 3600.0) {
            return Err("--duration must be in (0, 3600] seconds".into());
        }
        if self.rate == Some(0) || self.requests == Some(0) {
            return Err("--rate and --requests must be positive".into());
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err("--timeout-ms must be 1..=60000".into());
        }
        Ok(())
    }
}

/// Why a response was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not a well-formed STUN message (framing, attribute lengths, FINGERPRINT).
    Unparseable,
    /// Not for one of our transactions (no cookie, other run, other socket).
    ForeignTransaction,
    /// Method other than Binding.
    WrongMethod,
    /// An error response, or a request/indication.
    NotSuccess,
    NoXorMappedAddress,
    /// XOR-MAPPED-ADDRESS present but undecodable.
    BadXorMappedAddress,
    /// XOR-MAPPED-ADDRESS differs from the socket's address.
    WrongMappedAddress,
}

impl Bad {
    const ALL: [Bad; 7] = [
        Bad::Unparseable,
        Bad::ForeignTransaction,
        Bad::WrongMethod,
        Bad::NotSuccess,
        Bad::NoXorMappedAddress,
        Bad::BadXorMappedAddress,
        Bad::WrongMappedAddress,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Bad::Unparseable => "unparseable",
            Bad::ForeignTransaction => "foreign_transaction",
            Bad::WrongMethod => "wrong_method",
            Bad::NotSuccess => "not_success",
            Bad::NoXorMappedAddress => "no_xor_mapped_address",
            Bad::BadXorMappedAddress => "bad_xor_mapped_address",
            Bad::WrongMappedAddress => "wrong_mapped_address",
        }
    }
}

/// Transaction id layout: nonce (4 bytes) | socket index (4) | sequence number (4).
fn transaction_id(nonce: [u8; 4], socket: u32, seq: u32) -> [u8; 12] {
    let mut tid = [0u8; 12];
    tid[..4].copy_from_slice(&nonce);
    tid[4..8].copy_from_slice(&socket.to_be_bytes());
    tid[8..].copy_from_slice(&seq.to_be_bytes());
    tid
}

/// The sequence number, if the raw header names a transaction of this run and socket.
/// Read from the raw bytes so that even an unparseable response can end its transaction.
fn our_seq(datagram: &[u8], nonce: [u8; 4], socket: u32) -> Option<u32> {
    let h = datagram.get(4..20)?;
    if h[..4] != MAGIC_COOKIE.to_be_bytes() || h[4..8] != nonce || h[8..12] != socket.to_be_bytes()
    {
        return None;
    }
    Some(u32::from_be_bytes([h[12], h[13], h[14], h[15]]))
}

/// Checks one response as a client would; `Ok` means a valid Binding success response.
pub fn check_response(datagram: &[u8], expect_mapped: SocketAddr) -> Result<(), Bad> {
    let m = Message::parse(datagram).map_err(|_| Bad::Unparseable)?;
    if m.method() != method::BINDING {
        return Err(Bad::WrongMethod);
    }
    if m.class() != Class::SuccessResponse {
        return Err(Bad::NotSuccess);
    }
    let xma = m
        .get(attr::XOR_MAPPED_ADDRESS)
        .ok_or(Bad::NoXorMappedAddress)?;
    let mapped =
        attr::decode_xor_address(xma, &m.transaction_id()).map_err(|_| Bad::BadXorMappedAddress)?;
    if mapped != expect_mapped {
        return Err(Bad::WrongMappedAddress);
    }
    Ok(())
}

/// Writes a Binding request with FINGERPRINT into `buf`; returns its length.
pub fn write_request(buf: &mut [u8], tid: &[u8; 12]) -> Result<usize, String> {
    let mut w = MessageWriter::new(buf, Class::Request, method::BINDING, tid)
        .map_err(|e| format!("building a request: {e}"))?;
    w.add_fingerprint()
        .map_err(|e| format!("building a request: {e}"))?;
    Ok(w.finish())
}

/// One client flow.
struct Flow {
    /// Owns the socket `fd` refers to.
    _sock: Socket,
    fd: RawFd,
    local: SocketAddr,
    index: u32,
    table: TxTable,
    /// Rate mode: sends scheduled for this flow and not yet made.
    due: u64,
}

/// What one thread counted.
#[derive(Default, Clone)]
struct Tally {
    sent: u64,
    ok: u64,
    lost: u64,
    unmatched: u64,
    send_errors: u64,
    recv_errors: u64,
    /// Rate mode: sends dropped from the schedule because the generator fell behind.
    behind: u64,
    bad: [u64; Bad::ALL.len()],
    /// Nanoseconds from start at which sending stopped / the last good response came.
    send_end_ns: u64,
    last_ok_ns: u64,
}

impl Tally {
    fn bad_total(&self) -> u64 {
        self.bad.iter().sum()
    }

    fn merge(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.lost += o.lost;
        self.unmatched += o.unmatched;
        self.send_errors += o.send_errors;
        self.recv_errors += o.recv_errors;
        self.behind += o.behind;
        for (a, b) in self.bad.iter_mut().zip(o.bad) {
            *a += b;
        }
        self.send_end_ns = self.send_end_ns.max(o.send_end_ns);
        self.last_ok_ns = self.last_ok_ns.max(o.last_ok_ns);
    }
}

/// Counters the progress line reads while threads run.
#[derive(Default)]
struct Live {
    sent: AtomicU64,
    ok: AtomicU64,
    lost: AtomicU64,
    bad: AtomicU64,
    finished: AtomicUsize,
}

/// What one generator thread is asked to do.
struct Plan {
    start: Instant,
    nonce: [u8; 4],
    /// Requests/s for this thread (rate mode).
    rate: Option<f64>,
    window: usize,
    quota: u64,
    send_for_ns: u64,
    timeout_ns: u64,
}

impl Plan {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// How often timeouts are looked for and the progress counters published.
const HOUSEKEEPING_NS: u64 = 5_000_000;
/// Longest a thread sleeps in ppoll; bounds how late it notices the end of the run.
const MAX_WAIT_NS: u64 = 1_000_000;
/// Shortest sleep between paced sends (rate mode).
const PACE_NS: u64 = 100_000;
/// Response buffer size: Binding responses are ~60–100 bytes; larger ones are not ours.
const RX_SLOT: usize = 512;

fn drive(flows: &mut [Flow], plan: &Plan, live: &Live) -> Result<(Tally, Histogram), String> {
    let mut t = Tally::default();
    let mut hist = Histogram::new();
    let mut tx = MsgBatch::new(BATCH, 64, false);
    let mut rx = MsgBatch::new(BATCH, RX_SLOT, false);
    let mut pfds: Vec<libc::pollfd> = flows
        .iter()
        .map(|f| libc::pollfd {
            fd: f.fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut sending = true;
    let mut scheduled = 0u64;
    let mut rr = 0usize;
    let mut next_housekeeping = 0u64;
    let mut published = Tally::default();
    let mut received = false;

    loop {
        let now = plan.now_ns();
        if sending && (now >= plan.send_for_ns || t.sent >= plan.quota) {
            sending = false;
            t.send_end_ns = now;
        }
        let outstanding: usize = flows.iter().map(|f| f.table.outstanding()).sum();
        if !sending && (outstanding == 0 || now >= t.send_end_ns + plan.timeout_ns) {
            break;
        }
        let mut busy = false;

        if sending {
            if let Some(rate) = plan.rate {
                // Open loop: schedule what the clock says is due, round-robin over flows.
                let target = ((now as f64 * rate / 1e9) as u64).min(plan.quota);
                let mut newly = target.saturating_sub(scheduled);
                scheduled += newly;
                // Never let a backlog build: a generator that fell behind drops the excess
                // (reported) instead of bursting it out later.
                let backlog: u64 = flows.iter().map(|f| f.due).sum();
                let cap = (flows.len() * BATCH) as u64;
                if backlog + newly > cap {
                    let excess = backlog + newly - cap;
                    t.behind += excess;
                    newly -= excess.min(newly);
                }
                while newly > 0 {
                    flows[rr].due += 1;
                    rr = (rr + 1) % flows.len();
                    newly -= 1;
                }
            }
            for f in flows.iter_mut() {
                let want = match plan.rate {
                    Some(_) => f.due,
                    None => plan.window.saturating_sub(f.table.outstanding()) as u64,
                };
                let n = want
                    .min(BATCH as u64)
                    .min(plan.quota.saturating_sub(t.sent)) as usize;
                if n == 0 {
                    continue;
                }
                let seq0 = f.table.next_seq();
                for i in 0..n {
                    let tid = transaction_id(plan.nonce, f.index, seq0.wrapping_add(i as u32));
                    let len = write_request(tx.slot_mut(i), &tid)?;
                    tx.set_len(i, len);
                }
                let sent_at = plan.now_ns();
                let k = match tx.send(f.fd, 0, n) {
                    Ok(k) => k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(_) => {
                        // e.g. ECONNREFUSED reported from an earlier ICMP error.
                        t.send_errors += 1;
                        0
                    }
                };
                for _ in 0..k {
                    if f.table.push(sent_at) {
                        t.lost += 1;
                    }
                }
                t.sent += k as u64;
                if plan.rate.is_some() {
                    f.due -= k as u64;
                }
                busy |= k > 0;
            }
        }

        // Readiness first, so only sockets with something waiting cost a receive call.
        // Without anything to do, sleep until a response, the next due send or the next
        // housekeeping; after a busy pass, just look (timeout 0).
        let now = plan.now_ns();
        let mut wait = 0;
        if !busy && !received {
            wait = MAX_WAIT_NS.min(next_housekeeping.saturating_sub(now));
            if sending {
                wait = wait.min(plan.send_for_ns.saturating_sub(now));
                if let Some(rate) = plan.rate {
                    let next_due = ((scheduled + 1) as f64 * 1e9 / rate) as u64;
                    // Sending in ticks of at least PACE_NS keeps the wakeups (and the
                    // generator's CPU) down at low rates; the schedule itself stays exact.
                    wait = wait.min(next_due.saturating_sub(now).max(PACE_NS));
                }
            }
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: wait as libc::c_long,
        };
        // SAFETY: pfds is a live array of pollfd of the length given.
        let ready = unsafe {
            libc::ppoll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        received = false;
        for (f, pfd) in flows.iter_mut().zip(pfds.iter()) {
            if ready <= 0 || pfd.revents == 0 {
                continue;
            }
            // A few batches per flow per pass, so one busy flow cannot starve the others.
            for _ in 0..4 {
                let n = match rx.recv(f.fd, libc::MSG_DONTWAIT) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // An ICMP error (e.g. port unreachable) reported on the socket.
                        t.recv_errors += 1;
                        break;
                    }
                };
                let at = plan.now_ns();
                for i in 0..n {
                    let d = rx.datagram(i);
                    let seq = our_seq(d, plan.nonce, f.index);
                    let verdict = match seq {
                        Some(_) => check_response(d, f.local),
                        None => Err(Message::parse(d)
                            .map(|_| Bad::ForeignTransaction)
                            .unwrap_or(Bad::Unparseable)),
                    };
                    let sent = seq.and_then(|s| f.table.complete(s));
                    match (verdict, sent) {
                        (Ok(()), Some(sent_ns)) => {
                            hist.record(at.saturating_sub(sent_ns));
                            t.ok += 1;
                            t.last_ok_ns = at;
                        }
                        // Valid, but late (already given up) or a duplicate.
                        (Ok(()), None) => t.unmatched += 1,
                        (Err(b), _) => t.bad[b as usize] += 1,
                    }
                }
                received |= n > 0;
                if n < rx.capacity() {
                    break;
                }
            }
        }

        let now = plan.now_ns();
        if now >= next_housekeeping {
            next_housekeeping = now + HOUSEKEEPING_NS;
            let cutoff = now.saturating_sub(plan.timeout_ns);
            for f in flows.iter_mut() {
                t.lost += f.table.expire(cutoff);
            }
            publish(live, &mut published, &t);
        }
    }
    for f in flows.iter_mut() {
        t.lost += f.table.abandon();
    }
    publish(live, &mut published, &t);
    Ok((t, hist))
}

fn publish(live: &Live, published: &mut Tally, t: &Tally) {
    live.sent
        .fetch_add(t.sent - published.sent, Ordering::Relaxed);
    live.ok.fetch_add(t.ok - published.ok, Ordering::Relaxed);
    live.lost
        .fetch_add(t.lost - published.lost, Ordering::Relaxed);
    live.bad
        .fetch_add(t.bad_total() - published.bad_total(), Ordering::Relaxed);
    *published = t.clone();
}

/// Server resource use over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    pub processes: Vec<ProcessUsage>,
    pub cpu_s: f64,
    pub cpu_us_per_tx: f64,
    /// Sum over the processes.
    pub peak_rss_kib: u64,
}

/// The result of one `stun` run.
#[derive(Debug, Clone, Serialize)]
pub struct StunReport {
    pub scenario: &'static str,
    pub target: SocketAddr,
    pub mode: &'static str,
    pub sockets: usize,
    pub threads: usize,
    pub window: Option<usize>,
    pub offered_rate: Option<u64>,
    pub timeout_ms: u64,
    /// Seconds from the first send until the later of the last send and the last answer.
    pub elapsed_s: f64,
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub bad: u64,
    pub bad_reasons: std::collections::BTreeMap<&'static str, u64>,
    /// Valid responses that matched no outstanding request (late after timeout, duplicate).
    pub unmatched: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    /// Rate mode: scheduled sends skipped because the generator could not keep up.
    pub generator_behind: u64,
    pub send_rate: f64,
    pub tx_per_s: f64,
    pub loss_ratio: f64,
    pub rtt_us: LatencyUs,
    pub generator_cpu_s: f64,
    pub generator_cpu_us_per_tx: f64,
    pub server: Option<ServerUsage>,
    /// CPU seconds the whole machine was busy during the run, and the part of it neither
    /// the generator nor the named servers account for: other people's work on a shared box.
    pub machine_busy_cpu_s: f64,
    pub others_cpu_s: f64,
}

impl StunReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let load = match self.offered_rate {
            Some(r) => format!("rate {} req/s", report::thousands(r)),
            None => format!("flat out, window {}/socket", self.window.unwrap_or(0)),
        };
        let pct = |n: u64| {
            if self.sent == 0 {
                0.0
            } else {
                100.0 * n as f64 / self.sent as f64
            }
        };
        s += &format!(
            "stun load on {}: {} sockets, {} thread(s), {load}, {:.2} s\n",
            self.target, self.sockets, self.threads, self.elapsed_s
        );
        s += &format!(
            "  sent            {:>12}  ({:.0}/s)\n",
            report::thousands(self.sent),
            self.send_rate
        );
        s += &format!(
            "  completed       {:>12}  ({:.0} tx/s)\n",
            report::thousands(self.completed),
            self.tx_per_s
        );
        s += &format!(
            "  lost (timeout)  {:>12}  ({:.3}%)\n",
            report::thousands(self.lost),
            pct(self.lost)
        );
        s += &format!("  bad responses   {:>12}", report::thousands(self.bad));
        if self.bad > 0 {
            let reasons: Vec<String> = self
                .bad_reasons
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            s += &format!("  ({})", reasons.join(", "));
        }
        s += "\n";
        s += &format!(
            "  late/duplicate  {:>12}\n",
            report::thousands(self.unmatched)
        );
        if self.send_errors + self.recv_errors > 0 {
            s += &format!(
                "  socket errors   {:>12}  (send {}, receive {}: ICMP unreachable?)\n",
                report::thousands(self.send_errors + self.recv_errors),
                self.send_errors,
                self.recv_errors
            );
        }
        if self.generator_behind > 0 {
            s += &format!(
                "  NOT OFFERED     {:>12}  (generator fell behind the rate)\n",
                report::thousands(self.generator_behind)
            );
        }
        s += &format!("  rtt µs          {}\n", self.rtt_us.line());
        s += &format!(
            "  generator CPU   {:.2} s ({:.2} µs/tx)\n",
            self.generator_cpu_s, self.generator_cpu_us_per_tx
        );
        s += &format!(
            "  machine busy    {:.2} CPU-s, of which {:.2} by other processes\n",
            self.machine_busy_cpu_s, self.others_cpu_s
        );
        if let Some(u) = &self.server {
            let pids: Vec<String> = u.processes.iter().map(|p| p.pid.to_string()).collect();
            s += &format!(
                "  server CPU      {:.2} s ({:.2} µs/tx), peak RSS {:.1} MiB  [pid {}]\n",
                u.cpu_s,
                u.cpu_us_per_tx,
                u.peak_rss_kib as f64 / 1024.0,
                pids.join("+")
            );
        }
        s
    }
}

fn run_nonce() -> [u8; 4] {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    (t ^ std::process::id().rotate_left(16)).to_be_bytes()
}

/// Runs the load described by `args` and returns the report (also written as JSON when
/// asked). Errors are setup failures; a server that answers nothing is a report with zero
/// completions, not an error.
pub fn run(args: &StunArgs) -> Result<StunReport, String> {
    args.validate()?;
    let timeout_ns = args.timeout_ms * 1_000_000;
    let per_socket_rate = args.rate.map(|r| r as f64 / args.sockets as f64);
    // Room for every request that can be outstanding within one timeout, twice over.
    let capacity = match per_socket_rate {
        Some(r) => ((r * args.timeout_ms as f64 / 1000.0) as usize * 2).clamp(1024, 1 << 20),
        None => args.window * 4,
    };
    let mut flows = Vec::with_capacity(args.sockets);
    for i in 0..args.sockets {
        let (sock, local) = udp::connected_socket(args.target)
            .map_err(|e| format!("socket to {}: {e}", args.target))?;
        flows.push(Flow {
            fd: sock.as_raw_fd(),
            _sock: sock,
            local,
            index: i as u32,
            table: TxTable::new(capacity),
            due: 0,
        });
    }
    // Share sockets out: thread k gets sockets k, k+threads, ...
    let mut groups: Vec<Vec<Flow>> = (0..args.threads).map(|_| Vec::new()).collect();
    for (i, f) in flows.into_iter().enumerate() {
        groups[i % args.threads].push(f);
    }

    let quota_total = args.requests.unwrap_or(u64::MAX);
    let threads = args.threads as u64;
    let start = Instant::now();
    let nonce = run_nonce();
    let plans: Vec<Plan> = (0..threads)
        .map(|k| Plan {
            start,
            nonce,
            rate: args.rate.map(|r| r as f64 / threads as f64),
            window: args.window,
            quota: if quota_total == u64::MAX {
                u64::MAX
            } else {
                quota_total / threads + u64::from(k < quota_total % threads)
            },
            send_for_ns: (args.duration * 1e9) as u64,
            timeout_ns,
        })
        .collect();

    let probe = UsageProbe::start(&args.server_pids)?;
    let cpu_before = proc_stats::self_cpu_seconds();
    let (idle_before, cores) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let window = Instant::now();
    let live = Live::default();
    let mut progress = ProgressLine::new(!args.quiet);

    let results: Vec<Result<(Tally, Histogram), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter_mut()
            .zip(plans.iter())
            .map(|(g, plan)| {
                let live = &live;
                scope.spawn(move || {
                    let r = drive(g, plan, live);
                    live.finished.fetch_add(1, Ordering::Release);
                    r
                })
            })
            .collect();
        let mut last = (0u64, start);
        while live.finished.load(Ordering::Acquire) < handles.len() {
            std::thread::sleep(Duration::from_millis(100));
            let now = Instant::now();
            if now.duration_since(last.1) < Duration::from_millis(500) {
                continue;
            }
            let ok = live.ok.load(Ordering::Relaxed);
            let rate = (ok - last.0) as f64 / now.duration_since(last.1).as_secs_f64();
            last = (ok, now);
            progress.update(&format!(
                "[{:5.1}s] sent {}  ok {}  {:.0} tx/s  lost {}  bad {}",
                start.elapsed().as_secs_f64(),
                report::thousands(live.sent.load(Ordering::Relaxed)),
                report::thousands(ok),
                rate,
                report::thousands(live.lost.load(Ordering::Relaxed)),
                report::thousands(live.bad.load(Ordering::Relaxed)),
            ));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("generator thread panicked".into()))
            })
            .collect()
    });
    progress.finish();
    let generator_cpu_s = proc_stats::self_cpu_seconds() - cpu_before;
    let processes = probe.finish()?;
    let wall_s = window.elapsed().as_secs_f64();
    let (idle_after, _) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let machine_busy_cpu_s = (cores as f64 * wall_s - (idle_after - idle_before)).max(0.0);

    let mut tally = Tally::default();
    let mut hist = Histogram::new();
    for r in results {
        let (t, h) = r?;
        tally.merge(&t);
        hist.merge(&h);
    }
    let elapsed_s = (tally.send_end_ns.max(tally.last_ok_ns) as f64 / 1e9).max(1e-9);
    let send_s = (tally.send_end_ns as f64 / 1e9).max(1e-9);
    let per_tx = |cpu: f64| {
        if tally.ok == 0 {
            0.0
        } else {
            cpu * 1e6 / tally.ok as f64
        }
    };
    let server = (!processes.is_empty()).then(|| {
        let cpu_s: f64 = processes.iter().map(|p| p.cpu_s).sum();
        ServerUsage {
            cpu_s,
            cpu_us_per_tx: per_tx(cpu_s),
            peak_rss_kib: processes.iter().map(|p| p.peak_rss_kib).sum(),
            processes,
        }
    });
    let report = StunReport {
        scenario: "stun",
        target: args.target,
        mode: if args.rate.is_some() {
            "rate"
        } else {
            "flat-out"
        },
        sockets: args.sockets,
        threads: args.threads,
        window: args.rate.is_none().then_some(args.window),
        offered_rate: args.rate,
        timeout_ms: args.timeout_ms,
        elapsed_s,
        sent: tally.sent,
        completed: tally.ok,
        lost: tally.lost,
        bad: tally.bad_total(),
        bad_reasons: Bad::ALL
            .iter()
            .map(|&b| (b.label(), tally.bad[b as usize]))
            .collect(),
        unmatched: tally.unmatched,
        send_errors: tally.send_errors,
        recv_errors: tally.recv_errors,
        generator_behind: tally.behind,
        send_rate: tally.sent as f64 / send_s,
        tx_per_s: tally.ok as f64 / elapsed_s,
        loss_ratio: if tally.sent == 0 {
            0.0
        } else {
            tally.lost as f64 / tally.sent as f64
        },
        rtt_us: LatencyUs::from_ns(&hist),
        generator_cpu_s,
        generator_cpu_us_per_tx: per_tx(generator_cpu_s),
        others_cpu_s: (machine_busy_cpu_s
            - generator_cpu_s
            - server.as_ref().map_or(0.0, |s| s.cpu_s))
        .max(0.0),
        machine_busy_cpu_s,
        server,
    };
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_a_fingerprinted_binding_request() {
        let tid = transaction_id([1, 2, 3, 4], 7, 0xDEAD_BEEF);
        let mut buf = [0u8; 64];
        let n = write_request(&mut buf, &tid).unwrap();
        assert_eq!(n, 28);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.method(), method::BINDING);
        assert!(m.fingerprint_offset().is_some());
        assert_eq!(m.transaction_id(), tid);
        assert_eq!(our_seq(&buf[..n], [1, 2, 3, 4], 7), Some(0xDEAD_BEEF));
        assert_eq!(our_seq(&buf[..n], [1, 2, 3, 5], 7), None, "other run");
        assert_eq!(our_seq(&buf[..n], [1, 2, 3, 4], 8), None, "other socket");
        assert_eq!(our_seq(&buf[..10], [1, 2, 3, 4], 7), None, "truncated");
    }

    fn response(class: Class, meth: u16, tid: &[u8; 12], xma: Option<SocketAddr>) -> Vec<u8> {
        let mut buf = [0u8; 128];
        let mut w = MessageWriter::new(&mut buf, class, meth, tid).unwrap();
        if let Some(a) = xma {
            w.add_xor_address(attr::XOR_MAPPED_ADDRESS, a).unwrap();
        }
        w.add_fingerprint().unwrap();
        let n = w.finish();
        buf[..n].to_vec()
    }

    #[test]
    fn response_checks() {
        let me: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let tid = transaction_id([9; 4], 0, 1);
        let ok = response(Class::SuccessResponse, method::BINDING, &tid, Some(me));
        assert_eq!(check_response(&ok, me), Ok(()));
        assert_eq!(check_response(&ok, other), Err(Bad::WrongMappedAddress));
        let mut corrupt = ok.clone();
        corrupt[25] ^= 1;
        assert_eq!(check_response(&corrupt, me), Err(Bad::Unparseable));
        assert_eq!(
            check_response(
                &response(Class::ErrorResponse, method::BINDING, &tid, Some(me)),
                me
            ),
            Err(Bad::NotSuccess)
        );
        assert_eq!(
            check_response(
                &response(Class::SuccessResponse, method::ALLOCATE, &tid, Some(me)),
                me
            ),
            Err(Bad::WrongMethod)
        );
        assert_eq!(
            check_response(
                &response(Class::SuccessResponse, method::BINDING, &tid, None),
                me
            ),
            Err(Bad::NoXorMappedAddress)
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let t: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut a = StunArgs::new(t);
        assert!(a.validate().is_ok());
        a.threads = 17;
        assert!(a.validate().is_err(), "more threads than sockets");
        a = StunArgs::new(t);
        a.duration = 0.0;
        assert!(a.validate().is_err());
        a = StunArgs::new(t);
        a.rate = Some(0);
        assert!(a.validate().is_err());
    }
}
