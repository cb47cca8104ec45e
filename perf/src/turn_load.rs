//! `portico-perf turn`: TURN relay load (RFC 8656) against any TURN server.
//!
//! N clients allocate with long-term (or TURN REST API) credentials, install a permission and
//! (channel mode) a channel towards a UDP peer this tool runs itself, then send RTP-sized
//! packets through the relay; the peer echoes them back through the relay, so both
//! directions are loaded and measured (see [`crate::turn_client`], [`crate::turn_peer`]).
//!
//! A run has phases, and the server's CPU is sampled exactly around the data phase, so
//! "CPU seconds per million relayed packets" excludes setup and teardown:
//! 1. setup: every client allocates (401 round trip, 438 handled), with at most
//!    `--setup-window` clients in setup at once; allocations/s measures it;
//! 2. data: `--duration` seconds at `--rate` packets/s per stream (open loop: a slow server
//!    shows up as loss and latency, not as a slower sender), or flat out with `--window`
//!    packets in flight per stream; then `--timeout-ms` for stragglers;
//! 3. teardown: every allocation is deleted (Refresh with lifetime 0).
//!
//! In `--mode churn` the data phase is replaced by allocation churn: each client allocates,
//! refreshes and deletes in a loop, each time from a fresh source address.
//!
//! Server RSS is read when idle (before setup), after setup and after the data phase, which
//! gives the memory each allocation costs.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::histogram::Histogram;
use crate::proc_stats;
use crate::report::{self, LatencyUs, ProcessUsage, ProgressLine, UsageProbe};
use crate::stamp::{SeqTrack, STAMP_LEN};
use crate::turn_client::{
    self, ClientTally, Control, Mode, Plan, PHASE_DATA, PHASE_TEARDOWN, REACHED_DATA, REACHED_SETUP,
};
use crate::turn_msg::Credentials;
use crate::turn_peer::{self, PeerTally};
use crate::turn_plan::ClientNet;
pub use crate::turn_stream::Transport;
use crate::udp;

#[derive(clap::Args, Debug, Clone)]
pub struct TurnArgs {
    /// TURN server (IPv4 loopback, or any IPv4 address with --client-net), e.g.
    /// 127.0.0.1:3478.
    #[arg(long)]
    pub server: SocketAddr,
    /// Clients' source addresses from this IPv4 network (len 8..=24) instead of
    /// 127.128.0.0/9; the generator's namespace must hold it as local, e.g. `ip route add
    /// local 10.78.0.0/16 dev lo` (the servers then need a route back to it).
    #[arg(long, value_parser = ClientNet::parse)]
    pub client_net: Option<ClientNet>,
    /// The peers' address (every relayed stream's far end); with --client-net usually the
    /// generator namespace's own address on the link to the servers.
    #[arg(long, default_value = "127.0.0.1")]
    pub peer_ip: Ipv4Addr,
    /// Client transport: UDP, or a TCP or TLS connection per client (RFC 8656 §3.1).
    #[arg(long, value_enum, default_value = "udp")]
    pub transport: Transport,
    /// TLS: offer ALPN `stun.turn` (RFC 7443).
    #[arg(long)]
    pub alpn: bool,
    /// Long-term credentials: user name (with --password).
    #[arg(long, requires = "password", conflicts_with = "secret")]
    pub user: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    /// TURN REST API shared secret: credentials `expiry:NAME` / base64(HMAC-SHA1).
    #[arg(long)]
    pub secret: Option<String>,
    /// Name part of REST API user names.
    #[arg(long, default_value = "portico-perf")]
    pub rest_name: String,
    /// Clients, each with one allocation and one stream.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Packets per second per stream, each way (50 = RTP at 20 ms).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Ignore --rate: keep --window packets in flight per stream.
    #[arg(long)]
    pub flat_out: bool,
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Payload bytes per packet (172 = G.711 20 ms RTP).
    #[arg(long, default_value_t = 172)]
    pub size: usize,
    /// Seconds of data (or churn).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, value_enum, default_value = "channel")]
    pub mode: Mode,
    /// LIFETIME to ask for, seconds (default: the server's). Allocations are refreshed at
    /// half of what is granted, permissions every 240 s, channels every 480 s.
    #[arg(long)]
    pub lifetime: Option<u32>,
    /// Clients in setup (and in teardown) at once.
    #[arg(long, default_value_t = 64)]
    pub setup_window: usize,
    /// Clients not set up after this many seconds fail.
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,
    /// After the last send, packets are awaited this long; later ones count as lost.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// First retransmission timeout of requests (doubles each time).
    #[arg(long, default_value_t = 250)]
    pub rto_ms: u64,
    /// Transmissions of a request before the client gives up.
    #[arg(long, default_value_t = 5)]
    pub max_tries: u32,
    /// Client threads (clients are shared out).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Peer threads (SO_REUSEPORT sockets on one address).
    #[arg(long, default_value_t = 1)]
    pub peer_threads: usize,
    /// CPUs whose busy time (from their /proc/stat lines, softirq included) is reported
    /// as the servers' side, e.g. `--server-cpus 1` with the servers and their interface's
    /// receive work (RPS) pinned there and this generator elsewhere (repeatable).
    #[arg(long = "server-cpus", value_delimiter = ',')]
    pub server_cpus: Vec<usize>,
    /// Server process to charge CPU time and read RSS of (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl TurnArgs {
    /// Defaults for `server` with long-term credentials, as the command line gives them.
    pub fn new(server: SocketAddr, user: &str, password: &str) -> TurnArgs {
        TurnArgs {
            server,
            client_net: None,
            peer_ip: Ipv4Addr::LOCALHOST,
            transport: Transport::Udp,
            alpn: false,
            user: Some(user.into()),
            password: Some(password.into()),
            secret: None,
            rest_name: "portico-perf".into(),
            clients: 100,
            rate: 50.0,
            flat_out: false,
            window: 8,
            size: 172,
            duration: 10.0,
            mode: Mode::Channel,
            lifetime: None,
            setup_window: 64,
            setup_timeout: 60.0,
            timeout_ms: 1000,
            rto_ms: 250,
            max_tries: 5,
            threads: 1,
            peer_threads: 1,
            server_cpus: Vec::new(),
            server_pids: Vec::new(),
            json: None,
            quiet: true,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let net = self.client_net.unwrap_or(ClientNet::LOOPBACK);
        if !self.server.is_ipv4() || (net.is_loopback() && !self.server.ip().is_loopback()) {
            return Err(
                "--server must be an IPv4 loopback address (clients use 127.128.0.0/9 \
                        source addresses), or any IPv4 address with --client-net"
                    .into(),
            );
        }
        if (self.clients as u64) > u64::from(net.addresses()) {
            return Err("--client-net has fewer addresses than --clients".into());
        }
        if self.client_net.is_some() && self.transport != Transport::Udp {
            return Err("--client-net works over UDP only".into());
        }
        if self.server_cpus.len() > 64 {
            return Err("--server-cpus: at most 64 CPUs".into());
        }
        if self.peer_ip.is_unspecified() || self.peer_ip.is_multicast() {
            return Err("--peer-ip must be a unicast IPv4 address".into());
        }
        if !(1..=100_000).contains(&self.clients) {
            return Err("--clients must be 1..=100000".into());
        }
        if self.threads == 0 || self.threads > self.clients.min(16) {
            return Err("--threads must be 1..=min(16, --clients)".into());
        }
        if !(1..=16).contains(&self.peer_threads) {
            return Err("--peer-threads must be 1..=16".into());
        }
        if !(self.rate > 0.0 && self.rate <= 100_000.0) {
            return Err("--rate must be in (0, 100000] packets/s per stream".into());
        }
        if !(1..=1024).contains(&self.window) {
            return Err("--window must be 1..=1024".into());
        }
        if !(STAMP_LEN..=1400).contains(&self.size) {
            return Err(format!("--size must be {STAMP_LEN}..=1400 bytes"));
        }
        if !(self.duration > 0.0 && self.duration <= 3600.0) {
            return Err("--duration must be in (0, 3600] seconds".into());
        }
        if !(self.setup_timeout > 0.0 && self.setup_timeout <= 3600.0) {
            return Err("--setup-timeout must be in (0, 3600] seconds".into());
        }
        if self.lifetime == Some(0) {
            return Err("--lifetime must be positive".into());
        }
        if !(1..=4096).contains(&self.setup_window) {
            return Err("--setup-window must be 1..=4096".into());
        }
        if !(1..=60_000).contains(&self.timeout_ms) || !(1..=10_000).contains(&self.rto_ms) {
            return Err("--timeout-ms must be 1..=60000 and --rto-ms 1..=10000".into());
        }
        if !(1..=10).contains(&self.max_tries) {
            return Err("--max-tries must be 1..=10".into());
        }
        if self.transport != Transport::Udp && self.mode == Mode::Churn {
            return Err("--mode churn is UDP only".into());
        }
        if self.alpn && self.transport != Transport::Tls {
            return Err("--alpn needs --transport tls".into());
        }
        if self.user.is_none() && self.secret.is_none() {
            return Err("give --user and --password, or --secret".into());
        }
        Ok(())
    }

    fn credentials(&self) -> Credentials {
        match (&self.user, &self.password, &self.secret) {
            (Some(u), Some(p), _) => Credentials::long_term(u, p),
            (_, _, Some(s)) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Credentials::rest(s, &self.rest_name, now, 86_400)
            }
            _ => Credentials::long_term("", ""),
        }
    }
}

/// One direction of the relayed traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Direction {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub reordered: u64,
    pub duplicates: u64,
    /// Received per second of the data phase.
    pub pps: f64,
    /// One-way latency, sender's stamp to receiver's clock.
    pub latency_us: LatencyUs,
}

impl Direction {
    fn new(sent: u64, track: &SeqTrack, hist: &Histogram, secs: f64) -> Direction {
        let lost = sent.saturating_sub(track.received);
        Direction {
            sent,
            received: track.received,
            lost,
            loss_ratio: ratio(lost, sent),
            reordered: track.reordered,
            duplicates: track.duplicates,
            pps: track.received as f64 / secs.max(1e-9),
            latency_us: LatencyUs::from_ns(hist),
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    pub clients: u64,
    pub allocated: u64,
    /// Allocated, permitted and (channel mode) bound.
    pub ready: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub challenges_401: u64,
    pub stale_nonces_438: u64,
    pub retransmits: u64,
    /// First Allocate sent to last client ready.
    pub elapsed_s: f64,
    /// Clients made ready per second (each: 2 Allocates, CreatePermission, ChannelBind).
    pub allocations_per_s: f64,
    /// Per client, first Allocate to ready.
    pub setup_us: LatencyUs,
    /// Requests answered at their first transmission, send to answer.
    pub request_rtt_us: LatencyUs,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    pub elapsed_s: f64,
    /// Client to peer (measured at the peer).
    pub up: Direction,
    /// Peer to client (measured at the clients).
    pub down: Direction,
    /// Packets the relay delivered, both directions, per second.
    pub relayed_pps: f64,
    /// 1 − (echoes back at the clients ÷ packets the clients sent).
    pub round_trip_loss_ratio: f64,
    /// Rate mode: scheduled packets not sent because the generator fell behind.
    pub generator_behind: u64,
    pub send_errors: u64,
    pub peer_send_errors: u64,
    /// Datagrams that failed the client's checks (unparseable, wrong channel, ...).
    pub bad: u64,
    /// Test packets delivered to the wrong client (address, channel or stream).
    pub misrouted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub elapsed_s: f64,
    /// Completed allocate + refresh + delete cycles.
    pub cycles: u64,
    pub allocations: u64,
    pub allocations_per_s: f64,
    pub failed: u64,
    /// One cycle: first Allocate (and its 401) to the delete's answer.
    pub cycle_us: LatencyUs,
}

#[derive(Debug, Clone, Serialize)]
pub struct TurnServerUsage {
    pub processes: Vec<ProcessUsage>,
    /// Over the data (or churn) phase.
    pub cpu_s: f64,
    /// Data: CPU seconds per million packets delivered (both directions summed).
    pub cpu_s_per_million_relayed: Option<f64>,
    /// Churn: CPU microseconds per completed cycle.
    pub cpu_us_per_cycle: Option<f64>,
    pub peak_rss_kib: u64,
    pub rss_idle_kib: u64,
    pub rss_after_setup_kib: u64,
    pub rss_after_data_kib: u64,
    /// (RSS after setup − idle) per 1000 ready allocations: what allocation state costs.
    pub rss_per_1000_allocations_kib: Option<f64>,
    /// Same after the data phase: includes buffers that traffic touched.
    pub rss_per_1000_allocations_loaded_kib: Option<f64>,
}

/// The result of one `turn` run.
#[derive(Debug, Clone, Serialize)]
pub struct TurnReport {
    pub scenario: &'static str,
    pub server: SocketAddr,
    pub transport: Transport,
    pub mode: Mode,
    pub clients: usize,
    pub threads: usize,
    pub peer_threads: usize,
    /// Packets/s per stream, each way; `None` flat out.
    pub rate_per_stream: Option<f64>,
    pub window: Option<usize>,
    /// Packets/s offered each way by the streams that got ready (rate mode).
    pub offered_pps: Option<f64>,
    pub size: usize,
    pub duration_s: f64,
    pub setup: SetupReport,
    pub data: Option<DataReport>,
    pub churn: Option<ChurnReport>,
    pub refreshes: u64,
    pub deleted: u64,
    pub delete_failed: u64,
    pub unmatched_responses: u64,
    /// Seconds over which CPU was measured (data or churn phase, with the drain).
    pub window_s: f64,
    pub generator_cpu_s: f64,
    /// Generator (clients + peer) CPU per relayed packet.
    pub generator_cpu_us_per_packet: Option<f64>,
    pub server_usage: Option<TurnServerUsage>,
    pub machine_busy_cpu_s: f64,
    /// CPU neither the generator nor the named servers used: other people's work.
    pub others_cpu_s: f64,
    /// `--server-cpus` and their busy CPU-seconds over the window.
    pub server_cpus: Vec<usize>,
    pub server_cpus_busy_s: Option<f64>,
}

fn run_nonce() -> u32 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16) ^ 0x5455_524E
}

fn rss_sum(pids: &[u32]) -> Result<u64, String> {
    pids.iter()
        .map(|&p| proc_stats::rss_kib(p).map_err(|e| format!("server pid {p}: {e}")))
        .sum()
}

/// What the orchestrator measured around the data phase.
struct Window {
    processes: Vec<ProcessUsage>,
    wall_s: f64,
    generator_cpu_s: f64,
    machine_busy_cpu_s: f64,
    server_cpus_busy_s: Option<f64>,
    rss_after_setup: u64,
    rss_after_data: u64,
}

fn wait_for(
    control: &Control,
    stage: u8,
    progress: &mut ProgressLine,
    line: impl Fn(&Control) -> String,
) {
    let mut last = Instant::now();
    while !control.all_reached(stage) {
        std::thread::sleep(Duration::from_millis(20));
        if last.elapsed() >= Duration::from_millis(500) {
            last = Instant::now();
            progress.update(&line(control));
        }
    }
}

/// Steps the threads through the phases and samples the server around the data phase.
fn orchestrate(
    args: &TurnArgs,
    plan: &Plan,
    control: &Control,
    progress: &mut ProgressLine,
) -> Result<Window, String> {
    let n = args.clients;
    wait_for(control, REACHED_SETUP, progress, |c| {
        format!(
            "[setup] allocated {}/{n}  failed {}",
            c.allocated.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed)
        )
    });
    let rss_after_setup = rss_sum(&args.server_pids)?;
    let probe = UsageProbe::start(&args.server_pids)?;
    let cpu_before = proc_stats::self_cpu_seconds();
    let (idle_before, cores) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let cpus = &args.server_cpus;
    let cpus_idle = |cpus: &[usize]| -> Result<Option<f64>, String> {
        if cpus.is_empty() {
            return Ok(None);
        }
        proc_stats::cpus_idle_seconds(cpus)
            .map(Some)
            .map_err(|e| format!("--server-cpus: {e}"))
    };
    let cpus_idle_before = cpus_idle(cpus)?;
    let t0 = Instant::now();
    control
        .data_start_ns
        .store(plan.now_ns(), Ordering::Release);
    control.phase.store(PHASE_DATA, Ordering::Release);
    let churn = args.mode == Mode::Churn;
    wait_for(control, REACHED_DATA, progress, |c| {
        let secs = t0.elapsed().as_secs_f64().max(1e-3);
        if churn {
            format!(
                "[churn {secs:5.1}s] cycles {}  ({:.0}/s)  failed {}",
                report::thousands(c.cycles.load(Ordering::Relaxed)),
                c.cycles.load(Ordering::Relaxed) as f64 / secs,
                c.failed.load(Ordering::Relaxed)
            )
        } else {
            format!(
                "[data {secs:5.1}s] sent {}  at peer {}  back {}",
                report::thousands(c.up_sent.load(Ordering::Relaxed)),
                report::thousands(c.up_received.load(Ordering::Relaxed)),
                report::thousands(c.down_received.load(Ordering::Relaxed)),
            )
        }
    });
    let processes = probe.finish()?;
    let generator_cpu_s = proc_stats::self_cpu_seconds() - cpu_before;
    let wall_s = t0.elapsed().as_secs_f64();
    let (idle_after, _) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let server_cpus_busy_s = match (cpus_idle_before, cpus_idle(cpus)?) {
        (Some(b), Some(a)) => Some((cpus.len() as f64 * wall_s - (a - b)).max(0.0)),
        _ => None,
    };
    let rss_after_data = rss_sum(&args.server_pids)?;
    Ok(Window {
        processes,
        wall_s,
        generator_cpu_s,
        machine_busy_cpu_s: (cores as f64 * wall_s - (idle_after - idle_before)).max(0.0),
        server_cpus_busy_s,
        rss_after_setup,
        rss_after_data,
    })
}

/// Runs the load described by `args`; the report is also written as JSON when asked.
/// Errors are setup failures (sockets, /proc); a server that allocates nothing is a report
/// with zero allocations.
pub fn run(args: &TurnArgs) -> Result<TurnReport, String> {
    args.validate()?;
    let start = Instant::now();
    let nonce = run_nonce();
    let client_net = args.client_net.unwrap_or(ClientNet::LOOPBACK);
    let (peer_socks, peer) = udp::reuseport_sockets(
        SocketAddr::from((args.peer_ip, 0)),
        args.peer_threads,
        Duration::from_millis(50),
    )
    .map_err(|e| format!("peer sockets: {e}"))?;
    let client_socks = (0..args.threads)
        .map(|_| udp::pktinfo_socket_on(client_net.is_loopback()).map(|(s, _)| s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client socket: {e}"))?;
    let plan = Plan {
        start,
        nonce,
        server: args.server,
        peer,
        mode: args.mode,
        credentials: args.credentials(),
        rate: (!args.flat_out).then_some(args.rate),
        window: args.window,
        size: args.size,
        lifetime: args.lifetime,
        setup_window: args.setup_window,
        setup_timeout_ns: (args.setup_timeout * 1e9) as u64,
        duration_ns: (args.duration * 1e9) as u64,
        drain_ns: args.timeout_ms * 1_000_000,
        rto_ns: args.rto_ms * 1_000_000,
        max_tries: args.max_tries,
        threads: args.threads,
        clients: args.clients,
        transport: args.transport,
        alpn: args.alpn,
        client_net,
    };
    let control = Control::new(args.threads);
    let rss_idle = rss_sum(&args.server_pids)?;
    let mut progress = ProgressLine::new(!args.quiet);

    let (window, clients, peers) = std::thread::scope(|s| {
        let peers: Vec<_> = peer_socks
            .into_iter()
            .map(|sock| {
                let control = &control;
                let n = args.clients;
                s.spawn(move || turn_peer::run(sock, start, nonce, n, control))
            })
            .collect();
        let gens: Vec<_> = client_socks
            .into_iter()
            .enumerate()
            .map(|(t, sock)| {
                let (plan, control) = (&plan, &control);
                s.spawn(move || turn_client::run(sock, t, plan, control))
            })
            .collect();
        let window = orchestrate(args, &plan, &control, &mut progress);
        control.peer_stop.store(true, Ordering::Release);
        control.phase.store(PHASE_TEARDOWN, Ordering::Release);
        progress.update("[teardown] deleting allocations");
        let clients: Vec<Result<ClientTally, String>> = gens
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect();
        let peers: Vec<Option<PeerTally>> = peers.into_iter().map(|h| h.join().ok()).collect();
        (window, clients, peers)
    });
    progress.finish();
    let window = window?;
    let mut t = ClientTally::default();
    for c in clients {
        t.merge(c?);
    }
    let mut p = PeerTally::default();
    for x in peers {
        p.merge(x.ok_or("peer thread panicked")?);
    }
    let report = build_report(args, &t, &p, &window, rss_idle);
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    Ok(report)
}

fn build_report(
    args: &TurnArgs,
    t: &ClientTally,
    p: &PeerTally,
    w: &Window,
    rss_idle: u64,
) -> TurnReport {
    let churn = args.mode == Mode::Churn;
    let send_s = args.duration;
    let setup_s = t.setup_last_ns.saturating_sub(t.setup_first_ns) as f64 / 1e9;
    let setup = SetupReport {
        clients: t.clients,
        allocated: if churn { 0 } else { t.allocated },
        ready: t.ready,
        failed: if churn { 0 } else { t.failed },
        failures: t.failures.clone(),
        challenges_401: t.challenges,
        stale_nonces_438: t.stale_nonces,
        retransmits: t.retransmits,
        elapsed_s: setup_s,
        allocations_per_s: if setup_s > 0.0 {
            t.ready as f64 / setup_s
        } else {
            0.0
        },
        setup_us: LatencyUs::from_ns(&t.setup_time),
        request_rtt_us: LatencyUs::from_ns(&t.request_rtt),
    };
    let up_track = p.totals();
    let relayed = up_track.received + t.down.received;
    let data = (!churn).then(|| {
        let up = Direction::new(t.up_sent, &up_track, &p.latency, send_s);
        let down = Direction::new(p.echoed, &t.down, &t.down_latency, send_s);
        DataReport {
            elapsed_s: send_s,
            relayed_pps: relayed as f64 / send_s.max(1e-9),
            round_trip_loss_ratio: ratio(t.up_sent.saturating_sub(t.down.received), t.up_sent),
            up,
            down,
            generator_behind: t.behind,
            send_errors: t.send_errors,
            peer_send_errors: p.send_errors,
            bad: t.bad + p.foreign,
            misrouted: t.misrouted,
        }
    });
    let churn_report = churn.then(|| ChurnReport {
        elapsed_s: send_s,
        cycles: t.cycles,
        allocations: t.allocated,
        allocations_per_s: t.allocated as f64 / send_s.max(1e-9),
        failed: t.failed,
        cycle_us: LatencyUs::from_ns(&t.cycle_time),
    });
    let per_1000 = |rss: u64| {
        (t.ready > 0 && !churn)
            .then(|| rss.saturating_sub(rss_idle) as f64 * 1000.0 / t.ready as f64)
    };
    let server_usage = (!w.processes.is_empty()).then(|| {
        let cpu_s: f64 = w.processes.iter().map(|x| x.cpu_s).sum();
        TurnServerUsage {
            cpu_s,
            cpu_s_per_million_relayed: (!churn && relayed > 0)
                .then(|| cpu_s * 1e6 / relayed as f64),
            cpu_us_per_cycle: (churn && t.cycles > 0).then(|| cpu_s * 1e6 / t.cycles as f64),
            peak_rss_kib: w.processes.iter().map(|x| x.peak_rss_kib).sum(),
            processes: w.processes.clone(),
            rss_idle_kib: rss_idle,
            rss_after_setup_kib: w.rss_after_setup,
            rss_after_data_kib: w.rss_after_data,
            rss_per_1000_allocations_kib: per_1000(w.rss_after_setup),
            rss_per_1000_allocations_loaded_kib: per_1000(w.rss_after_data),
        }
    });
    let server_cpu = server_usage.as_ref().map_or(0.0, |s| s.cpu_s);
    TurnReport {
        scenario: "turn",
        transport: args.transport,
        server: args.server,
        mode: args.mode,
        clients: args.clients,
        threads: args.threads,
        peer_threads: args.peer_threads,
        rate_per_stream: (!args.flat_out).then_some(args.rate),
        window: args.flat_out.then_some(args.window),
        offered_pps: (!args.flat_out && !churn).then_some(args.rate * t.ready as f64),
        size: args.size,
        duration_s: args.duration,
        setup,
        data,
        churn: churn_report,
        refreshes: t.refreshes,
        deleted: t.deleted,
        delete_failed: t.delete_failed,
        unmatched_responses: t.unmatched,
        window_s: w.wall_s,
        generator_cpu_s: w.generator_cpu_s,
        generator_cpu_us_per_packet: (relayed > 0 && !churn)
            .then(|| w.generator_cpu_s * 1e6 / relayed as f64),
        server_usage,
        machine_busy_cpu_s: w.machine_busy_cpu_s,
        others_cpu_s: (w.machine_busy_cpu_s - w.generator_cpu_s - server_cpu).max(0.0),
        server_cpus: args.server_cpus.clone(),
        server_cpus_busy_s: w.server_cpus_busy_s,
    }
}

impl TurnReport {
    /// Whether anything was allocated at all (scripts use this as a readiness probe).
    pub fn allocated_any(&self) -> bool {
        self.setup.allocated > 0 || self.churn.as_ref().is_some_and(|c| c.allocations > 0)
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let load = match (self.rate_per_stream, self.window) {
            _ if self.mode == Mode::Churn => "allocation churn".to_string(),
            (Some(r), _) => format!("{r} pkt/s per stream"),
            (None, w) => format!("flat out, window {}", w.unwrap_or(0)),
        };
        s += &format!(
            "turn load on {}: {} clients, {:?} mode, {load}, {} B payload, {:.1} s\n",
            self.server, self.clients, self.mode, self.size, self.duration_s
        );
        let su = &self.setup;
        if self.mode != Mode::Churn {
            s += &format!(
                "  setup           {} ready, {} failed in {:.2} s ({:.0} allocations/s); 401 {}, 438 {}, retransmits {}\n",
                su.ready, su.failed, su.elapsed_s, su.allocations_per_s, su.challenges_401,
                su.stale_nonces_438, su.retransmits
            );
            s += &format!("  setup µs        {}\n", su.setup_us.line());
        }
        for (why, n) in &su.failures {
            s += &format!("  failure         {n} × {why}\n");
        }
        if let Some(d) = &self.data {
            for (name, x) in [("client→peer", &d.up), ("peer→client", &d.down)] {
                s += &format!(
                    "  {name}     sent {}  received {}  lost {} ({:.3}%)  reordered {}  dup {}  {:.0} pkt/s\n",
                    report::thousands(x.sent),
                    report::thousands(x.received),
                    report::thousands(x.lost),
                    x.loss_ratio * 100.0,
                    x.reordered,
                    x.duplicates,
                    x.pps
                );
                s += &format!("  {name} µs  {}\n", x.latency_us.line());
            }
            s += &format!(
                "  relayed         {:.0} pkt/s both ways; round-trip loss {:.3}%\n",
                d.relayed_pps,
                d.round_trip_loss_ratio * 100.0
            );
            if d.generator_behind + d.send_errors + d.bad + d.misrouted > 0 {
                s += &format!(
                    "  NOTE            generator behind {}, send errors {}, bad {}, misrouted {}\n",
                    d.generator_behind, d.send_errors, d.bad, d.misrouted
                );
            }
        }
        if let Some(c) = &self.churn {
            s += &format!(
                "  churn           {} cycles (allocate+refresh+delete), {:.0} allocations/s, {} failed\n",
                report::thousands(c.cycles),
                c.allocations_per_s,
                c.failed
            );
            s += &format!("  cycle µs        {}\n", c.cycle_us.line());
        }
        s += &format!(
            "  teardown        {} deleted, {} not; {} refreshes during the run\n",
            self.deleted, self.delete_failed, self.refreshes
        );
        s += &format!(
            "  generator CPU   {:.2} s{}\n",
            self.generator_cpu_s,
            self.generator_cpu_us_per_packet
                .map_or(String::new(), |u| format!(
                    " ({u:.2} µs per relayed packet)"
                ))
        );
        s += &format!(
            "  machine busy    {:.2} CPU-s over {:.1} s, of which {:.2} by other processes\n",
            self.machine_busy_cpu_s, self.window_s, self.others_cpu_s
        );
        if let Some(b) = self.server_cpus_busy_s {
            s += &format!(
                "  server CPUs {:?} busy {b:.2} CPU-s (softirq included)\n",
                self.server_cpus
            );
        }
        if let Some(u) = &self.server_usage {
            let pids: Vec<String> = u.processes.iter().map(|p| p.pid.to_string()).collect();
            s += &format!("  server CPU      {:.2} s", u.cpu_s);
            if let Some(x) = u.cpu_s_per_million_relayed {
                s += &format!(" ({x:.2} CPU-s per million relayed packets)");
            }
            if let Some(x) = u.cpu_us_per_cycle {
                s += &format!(" ({x:.1} µs per churn cycle)");
            }
            s += &format!("  [pid {}]\n", pids.join("+"));
            s += &format!(
                "  server RSS      idle {:.1} MiB, after setup {:.1}, after data {:.1}, peak {:.1}",
                u.rss_idle_kib as f64 / 1024.0,
                u.rss_after_setup_kib as f64 / 1024.0,
                u.rss_after_data_kib as f64 / 1024.0,
                u.peak_rss_kib as f64 / 1024.0
            );
            if let (Some(a), Some(b)) = (
                u.rss_per_1000_allocations_kib,
                u.rss_per_1000_allocations_loaded_kib,
            ) {
                s += &format!(
                    "; per 1000 allocations {:.2} MiB ({:.2} after traffic)",
                    a / 1024.0,
                    b / 1024.0
                );
            }
            s += "\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_arguments() {
        let t: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let ok = TurnArgs::new(t, "u", "p");
        assert!(ok.validate().is_ok());
        let mut a = ok.clone();
        a.server = "[::1]:3478".parse().unwrap();
        assert!(a.validate().is_err(), "IPv4 only");
        a = ok.clone();
        a.server = "192.0.2.1:3478".parse().unwrap();
        assert!(a.validate().is_err(), "loopback only");
        a.client_net = Some(ClientNet::parse("10.78.0.0/16").unwrap());
        a.peer_ip = "10.77.0.2".parse().unwrap();
        assert!(a.validate().is_ok(), "any IPv4 server with --client-net");
        a.client_net = Some(ClientNet::parse("10.78.0.0/24").unwrap());
        a.clients = 300;
        assert!(a.validate().is_err(), "more clients than addresses");
        a = ok.clone();
        a.peer_ip = Ipv4Addr::UNSPECIFIED;
        assert!(a.validate().is_err(), "a peer address to send to");
        a = ok.clone();
        a.size = 16;
        assert!(a.validate().is_err(), "room for the stamp");
        a = ok.clone();
        a.threads = 17;
        assert!(a.validate().is_err());
        a = ok.clone();
        a.user = None;
        assert!(a.validate().is_err(), "credentials needed");
        a.secret = Some("s".into());
        assert!(a.validate().is_ok());
        assert!(a.credentials().username.ends_with(":portico-perf"));
    }
}
