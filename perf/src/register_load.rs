//! `portico-perf register`: H.323 and SIP registrations through Portico's reverse proxy.
//!
//! What a registration costs the proxy: a new TCP connection (and a TLS handshake or not),
//! the first message read and decoded to find the service, a connection to the target, the
//! message forwarded and the answer relayed back. Each of `connections` threads does
//! registrations one after another:
//! - `--mode new` (what a phone does when it starts): connect, (TLS,) send the registration,
//!   wait for the answer, close;
//! - `--mode kept`: registrations repeated over a connection that stays open (re-registration),
//!   so only the per-message work remains.
//!
//! H.323: the RegistrationRequest is given as TPKT bytes (`--request-hex`; scripts/bench.sh
//! takes pycrate's from controlplane/tests/proxy/seeds.txt), RAS tunnelled per H.460.17 in a
//! Q.931 FACILITY; the answer is a whole TPKT packet and must be exactly the target's
//! (`--answer-hex`, an RCF likewise tunnelled). SIP: a REGISTER (RFC 3261) with a fresh
//! Call-ID, branch and tag each time; the answer must be `200` with the same Call-ID.
//!
//! `--target-listen` runs the fake PBX in this process for the run: a pool of threads that
//! accept connections and answer every RRQ with the RCF (checking the request arrived
//! unchanged) and every REGISTER with `200 OK` built from its headers, as a registrar does.
//! Its CPU is the generator's, not the proxy's.
//!
//! Offered load: `--rate` registrations/s in total, each thread on its own fixed schedule
//! (open loop: a slow proxy shows as latency and `late` starts, not as a lower offered
//! rate), or flat out. The proxy's CPU is utime+stime of `--server-pid` processes from
//! `/proc/PID/stat` before and after. Bounded: sending stops after `duration`, and every
//! connect, read and write has `timeout_ms`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use serde::Serialize;

use crate::histogram::Histogram;
use crate::proc_stats;
use crate::report::{self, LatencyUs, ProcessUsage, ProgressLine, UsageProbe};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    H323,
    Sip,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnMode {
    /// A new connection per registration, closed after the answer.
    New,
    /// Registrations repeated over connections kept open.
    Kept,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RegisterArgs {
    #[arg(long, value_enum)]
    pub proto: Proto,
    /// Where registrations are sent: the proxy's listener (or the target itself, to
    /// measure the generator's own ceiling).
    #[arg(long)]
    pub proxy: SocketAddr,
    /// Speak TLS to --proxy (its certificate is not verified; no session resumption, so
    /// every new connection is a full handshake as at a phone's start).
    #[arg(long)]
    pub tls: bool,
    /// Run the fake PBX (H.323 gatekeeper or SIP registrar) on this address for the run.
    #[arg(long)]
    pub target_listen: Option<SocketAddr>,
    /// H.323: the RegistrationRequest as TPKT bytes in hex.
    #[arg(long)]
    pub request_hex: Option<String>,
    /// H.323: what the fake PBX answers (TPKT bytes in hex, an RCF); the generator checks
    /// that exactly this comes back.
    #[arg(long)]
    pub answer_hex: Option<String>,
    /// SIP: the domain of the REGISTER's From and To (the service it is routed to).
    #[arg(long, default_value = "example.com")]
    pub sip_domain: String,
    #[arg(long, value_enum, default_value = "new")]
    pub mode: ConnMode,
    /// Connections at once (one thread each).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Registrations per second in total; flat out without.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Bound on each connect, read and write.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Process to charge CPU time to (repeatable): the proxy.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Largest message either side accepts (a TPKT packet is at most 65535 octets).
const MAX_MESSAGE: usize = 65_535;

fn hex(s: &str, what: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return Err(format!("{what}: not an even number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("{what}: not hex at offset {i}"))
        })
        .collect()
}

/// The length of the first whole message in `buf`, if there is one: a TPKT packet (H.323)
/// or a SIP message (head, blank line, `Content-Length` octets of body).
pub fn message_len(proto: Proto, buf: &[u8]) -> Result<Option<usize>, &'static str> {
    match proto {
        Proto::H323 => {
            if buf.is_empty() {
                return Ok(None);
            }
            if buf[0] != 3 {
                return Err("not TPKT");
            }
            if buf.len() < 4 {
                return Ok(None);
            }
            let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            if total < 4 {
                return Err("TPKT length below its header");
            }
            Ok((buf.len() >= total).then_some(total))
        }
        Proto::Sip => {
            let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return if buf.len() > MAX_MESSAGE {
                    Err("SIP head too long")
                } else {
                    Ok(None)
                };
            };
            let text = std::str::from_utf8(&buf[..head]).map_err(|_| "SIP head not UTF-8")?;
            let mut body = 0usize;
            for line in text.split("\r\n").skip(1) {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let name = name.trim();
                if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
                    body = value.trim().parse().map_err(|_| "bad Content-Length")?;
                }
            }
            let total = head + 4 + body;
            if total > MAX_MESSAGE {
                return Err("SIP message too long");
            }
            Ok((buf.len() >= total).then_some(total))
        }
    }
}

/// Reads from `s` until `buf` holds a whole message; returns it (and keeps what follows).
fn read_message(s: &mut impl Read, buf: &mut Vec<u8>, proto: Proto) -> io::Result<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        match message_len(proto, buf) {
            Ok(Some(n)) => return Ok(buf.drain(..n).collect()),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A REGISTER as a phone sends it, `id` making its Call-ID, branch and tag unique.
pub fn sip_register(domain: &str, tls: bool, id: &str, cseq: u64) -> Vec<u8> {
    let (via, transport) = if tls { ("TLS", "tls") } else { ("TCP", "tcp") };
    format!(
        "REGISTER sip:{domain} SIP/2.0\r\n\
         Via: SIP/2.0/{via} 127.0.0.1:5060;branch=z9hG4bK{id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{domain}>;tag={id}\r\n\
         To: <sip:alice@{domain}>\r\n\
         Call-ID: {id}@127.0.0.1\r\n\
         CSeq: {cseq} REGISTER\r\n\
         Contact: <sip:alice@127.0.0.1:5060;transport={transport}>\r\n\
         Expires: 3600\r\n\
         User-Agent: portico-perf\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// A registrar's `200 OK` to `req`: Via, From, Call-ID and CSeq copied, To tagged, the
/// Contact granted for an hour. None if `req` is not a REGISTER.
pub fn sip_ok(req: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(req).ok()?;
    let mut lines = text.split("\r\n");
    if !lines.next()?.starts_with("REGISTER ") {
        return None;
    }
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for line in lines.take_while(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match name.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" => out += line,
            "to" | "t" => out += &format!("{line};tag=registrar"),
            "contact" | "m" => out += &format!("{line};expires=3600"),
            _ => continue,
        }
        out += "\r\n";
    }
    out += "Server: portico-perf\r\nContent-Length: 0\r\n\r\n";
    Some(out.into_bytes())
}

/// What registrations send and expect.
struct Wire {
    proto: Proto,
    tls: bool,
    /// H.323: the RRQ and the RCF.
    request: Vec<u8>,
    answer: Vec<u8>,
    domain: String,
    /// Makes SIP identifiers unique across runs.
    nonce: u64,
}

impl Wire {
    fn new(a: &RegisterArgs) -> Result<Wire, String> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut w = Wire {
            proto: a.proto,
            tls: a.tls,
            request: Vec::new(),
            answer: Vec::new(),
            domain: a.sip_domain.clone(),
            nonce,
        };
        if a.proto == Proto::H323 {
            let req = a
                .request_hex
                .as_deref()
                .ok_or("--proto h323 needs --request-hex")?;
            w.request = hex(req, "--request-hex")?;
            let ans = a
                .answer_hex
                .as_deref()
                .ok_or("--proto h323 needs --answer-hex")?;
            w.answer = hex(ans, "--answer-hex")?;
            for (what, m) in [("--request-hex", &w.request), ("--answer-hex", &w.answer)] {
                if message_len(Proto::H323, m) != Ok(Some(m.len())) {
                    return Err(format!("{what}: not one whole TPKT packet"));
                }
            }
        }
        Ok(w)
    }

    fn sip_id(&self, thread: usize, k: u64) -> String {
        format!("{:x}t{thread}n{k}", self.nonce)
    }

    fn request(&self, thread: usize, k: u64) -> Vec<u8> {
        match self.proto {
            Proto::H323 => self.request.clone(),
            Proto::Sip => sip_register(&self.domain, self.tls, &self.sip_id(thread, k), k + 1),
        }
    }

    /// Whether `answer` is the right one for registration `k` of `thread`.
    fn check(&self, answer: &[u8], thread: usize, k: u64) -> Result<(), &'static str> {
        match self.proto {
            Proto::H323 if answer == self.answer.as_slice() => Ok(()),
            Proto::H323 => Err("answer is not the target's RCF"),
            Proto::Sip => {
                if !answer.starts_with(b"SIP/2.0 200 ") {
                    return Err("answer is not 200");
                }
                let call_id = format!("\r\nCall-ID: {}@127.0.0.1\r\n", self.sip_id(thread, k));
                if !answer
                    .windows(call_id.len())
                    .any(|w| w == call_id.as_bytes())
                {
                    return Err("200 for another Call-ID");
                }
                Ok(())
            }
        }
    }
}

/// Counters of the fake PBX.
#[derive(Debug, Default, Serialize)]
pub struct TargetCounts {
    pub connections: u64,
    pub answered: u64,
    /// Requests that did not arrive as sent (H.323: not the RRQ's bytes; SIP: no REGISTER).
    pub mismatched: u64,
}

#[derive(Default)]
struct TargetStats {
    connections: AtomicU64,
    answered: AtomicU64,
    mismatched: AtomicU64,
}

/// Starts the fake PBX: `threads` threads accepting on one listener, each serving one
/// connection at a time until the peer closes it or it is idle for `idle`.
fn start_target(
    addr: SocketAddr,
    wire: &Arc<Wire>,
    threads: usize,
    idle: Duration,
) -> Result<Arc<TargetStats>, String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("--target-listen {addr}: {e}"))?;
    let stats = Arc::new(TargetStats::default());
    for _ in 0..threads {
        let l = l.try_clone().map_err(|e| e.to_string())?;
        let (wire, stats) = (Arc::clone(wire), Arc::clone(&stats));
        // Detached: the threads end with the process.
        std::thread::spawn(move || {
            while let Ok((s, _)) = l.accept() {
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let _ = serve(s, &wire, &stats, idle);
            }
        });
    }
    Ok(stats)
}

fn serve(mut s: TcpStream, wire: &Wire, stats: &TargetStats, idle: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(idle))?;
    let mut buf = Vec::new();
    loop {
        let m = read_message(&mut s, &mut buf, wire.proto)?;
        let answer = match wire.proto {
            Proto::H323 => {
                if m != wire.request {
                    stats.mismatched.fetch_add(1, Ordering::Relaxed);
                }
                wire.answer.clone()
            }
            Proto::Sip => match sip_ok(&m) {
                Some(a) => a,
                None => {
                    stats.mismatched.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        s.write_all(&answer)?;
        stats.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Accepts whatever certificate the proxy shows (its generated self-signed one), still
/// checking that its key signed the handshake.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn open(
        to: SocketAddr,
        tls: Option<&Arc<ClientConfig>>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(match tls {
            None => Conn::Plain(s),
            Some(cfg) => {
                let name = ServerName::try_from("example.com").map_err(io::Error::other)?;
                let c = ClientConnection::new(Arc::clone(cfg), name).map_err(io::Error::other)?;
                Conn::Tls(Box::new(StreamOwned::new(c, s)))
            }
        })
    }

    /// Ends the connection as a client does: TLS close_notify, then FIN.
    fn close(self) {
        if let Conn::Tls(mut t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Counts of one thread (and, merged, of the run).
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    bad: u64,
    late: u64,
    connects: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.bad += o.bad;
        self.late += o.late;
        self.connects += o.connects;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

#[derive(Default)]
struct Live {
    ok: AtomicU64,
    failed: AtomicU64,
    finished: AtomicUsize,
}

struct Plan<'a> {
    args: &'a RegisterArgs,
    wire: &'a Wire,
    tls: Option<&'a Arc<ClientConfig>>,
    start: Instant,
    end: Instant,
}

enum Failure {
    Io(io::Error),
    Bad(&'static str),
}

/// Registration `k` of `thread`, on `conn` (opened first if there is none).
fn register_once(
    plan: &Plan<'_>,
    conn: &mut Option<Conn>,
    buf: &mut Vec<u8>,
    tally: &mut Tally,
    thread: usize,
    k: u64,
) -> Result<(), Failure> {
    let timeout = Duration::from_millis(plan.args.timeout_ms);
    let c = match conn {
        Some(c) => c,
        None => {
            buf.clear();
            tally.connects += 1;
            conn.insert(Conn::open(plan.args.proxy, plan.tls, timeout).map_err(Failure::Io)?)
        }
    };
    c.write_all(&plan.wire.request(thread, k))
        .and_then(|()| c.flush())
        .map_err(Failure::Io)?;
    let answer = read_message(c, buf, plan.wire.proto).map_err(Failure::Io)?;
    plan.wire.check(&answer, thread, k).map_err(Failure::Bad)
}

fn drive(plan: &Plan<'_>, thread: usize, live: &Live) -> (Tally, Histogram) {
    let n = plan.args.connections;
    let interval = plan
        .args
        .rate
        .map(|r| Duration::from_secs_f64(n as f64 / r));
    let mut tally = Tally::default();
    let mut hist = Histogram::new();
    let mut conn: Option<Conn> = None;
    let mut buf = Vec::new();
    let mut k = 0u64;
    loop {
        let now = Instant::now();
        if let Some(iv) = interval {
            let due = plan.start + iv.mul_f64(k as f64 + thread as f64 / n as f64);
            if due >= plan.end {
                break;
            }
            if due > now {
                std::thread::sleep(due - now);
            } else if now - due > iv {
                tally.late += 1;
            }
        } else if now >= plan.end {
            break;
        }
        let t0 = Instant::now();
        let r = register_once(plan, &mut conn, &mut buf, &mut tally, thread, k);
        k += 1;
        let failure = match r {
            Ok(()) => {
                tally.ok += 1;
                live.ok.fetch_add(1, Ordering::Relaxed);
                hist.record(t0.elapsed().as_nanos() as u64);
                None
            }
            Err(Failure::Bad(why)) => {
                tally.bad += 1;
                Some(why.to_string())
            }
            Err(Failure::Io(e)) => {
                tally.failed += 1;
                live.failed.fetch_add(1, Ordering::Relaxed);
                Some(e.kind().to_string())
            }
        };
        if let Some(why) = failure {
            *tally.errors.entry(why).or_default() += 1;
            conn = None;
            // Do not spin on a proxy that refuses connections.
            std::thread::sleep(Duration::from_millis(5));
        } else if plan.args.mode == ConnMode::New {
            if let Some(c) = conn.take() {
                c.close();
            }
        }
    }
    if let Some(c) = conn.take() {
        c.close();
    }
    (tally, hist)
}

/// CPU of the charged processes over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    pub processes: Vec<ProcessUsage>,
    pub cpu_s: f64,
    pub cpu_us_per_reg: f64,
    pub peak_rss_kib: u64,
}

/// The result of one `register` run.
#[derive(Debug, Serialize)]
pub struct RegisterReport {
    pub scenario: &'static str,
    pub proto: Proto,
    pub transport: &'static str,
    pub mode: ConnMode,
    pub target: SocketAddr,
    pub connections: usize,
    pub offered_rate: Option<f64>,
    pub duration_s: f64,
    pub timeout_ms: u64,
    pub request_bytes: usize,
    pub elapsed_s: f64,
    /// Registrations answered as expected.
    pub completed: u64,
    /// Registrations that failed on the way (connect, TLS, timeout, closed).
    pub failed: u64,
    /// Registrations answered wrongly.
    pub bad: u64,
    pub errors: BTreeMap<String, u64>,
    /// Fixed rate: registrations started more than one interval behind their schedule.
    pub late: u64,
    /// TCP connections opened by the generator.
    pub connects: u64,
    pub reg_per_s: f64,
    pub latency_us: LatencyUs,
    pub server: Option<ServerUsage>,
    pub generator_cpu_s: f64,
    /// The generator's CPU per registration, the in-process fake PBX included.
    pub generator_cpu_us_per_reg: f64,
    pub machine_busy_cpu_s: f64,
    pub others_cpu_s: f64,
    pub fake_pbx: Option<TargetCounts>,
}

impl RegisterReport {
    pub fn text(&self) -> String {
        let mut t = format!(
            "{} registrations ({}, {} connection{}{}) to {}: {} in {:.2} s ({:.0} reg/s){}\n",
            match self.proto {
                Proto::H323 => "H.323 RRQ",
                Proto::Sip => "SIP REGISTER",
            },
            self.transport,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            match self.mode {
                ConnMode::New => ", a new connection each",
                ConnMode::Kept => ", kept",
            },
            self.target,
            report::thousands(self.completed),
            self.elapsed_s,
            self.reg_per_s,
            self.offered_rate
                .map_or(String::from(", flat out"), |r| format!(
                    ", offered {r:.0}/s"
                )),
        );
        t += &format!(
            "failed {}  bad {}  late {}  connects {}{}\n",
            self.failed,
            self.bad,
            self.late,
            self.connects,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!("  errors {:?}", self.errors)
            }
        );
        t += &format!("latency µs: {}\n", self.latency_us.line());
        if let Some(s) = &self.server {
            t += &format!(
                "server CPU {:.3} s ({:.1} µs/reg), peak RSS {} KiB\n",
                s.cpu_s, s.cpu_us_per_reg, s.peak_rss_kib
            );
        }
        t += &format!(
            "generator CPU {:.3} s ({:.1} µs/reg); machine busy {:.2} CPU s, others {:.2}\n",
            self.generator_cpu_s,
            self.generator_cpu_us_per_reg,
            self.machine_busy_cpu_s,
            self.others_cpu_s
        );
        if let Some(p) = &self.fake_pbx {
            t += &format!(
                "fake PBX: {} connections, {} answered, {} mismatched\n",
                p.connections, p.answered, p.mismatched
            );
        }
        t
    }
}

impl RegisterArgs {
    fn validate(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.connections) {
            return Err("--connections must be 1..=256".into());
        }
        if !(self.duration > 0.0 && self.duration <= 600.0) {
            return Err("--duration must be in (0, 600] seconds".into());
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r <= 1e6) {
                return Err("--rate must be in (0, 1e6]".into());
            }
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err("--timeout-ms must be 1..=60000".into());
        }
        for a in [Some(self.proxy), self.target_listen].into_iter().flatten() {
            if !a.ip().is_loopback() {
                return Err(format!("{a}: loopback addresses only"));
            }
        }
        Ok(())
    }
}

pub fn run(args: &RegisterArgs) -> Result<RegisterReport, String> {
    args.validate()?;
    let wire = Arc::new(Wire::new(args)?);
    let timeout = Duration::from_millis(args.timeout_ms);
    let target = args
        .target_listen
        .map(|a| {
            start_target(
                a,
                &wire,
                args.connections + 4,
                timeout.max(Duration::from_secs(5)),
            )
        })
        .transpose()?;
    let tls = args.tls.then(tls_config).transpose()?;

    let probe = UsageProbe::start(&args.server_pids)?;
    let cpu_before = proc_stats::self_cpu_seconds();
    let (idle_before, cores) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let plan = Plan {
        args,
        wire: &wire,
        tls: tls.as_ref(),
        start,
        end: start + Duration::from_secs_f64(args.duration),
    };
    let live = Live::default();
    let mut progress = ProgressLine::new(!args.quiet);
    let results: Vec<(Tally, Histogram)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.connections)
            .map(|i| {
                let (plan, live) = (&plan, &live);
                scope.spawn(move || {
                    let r = drive(plan, i, live);
                    live.finished.fetch_add(1, Ordering::Release);
                    r
                })
            })
            .collect();
        while live.finished.load(Ordering::Acquire) < handles.len() {
            std::thread::sleep(Duration::from_millis(200));
            progress.update(&format!(
                "[{:5.1}s] registered {}  failed {}",
                start.elapsed().as_secs_f64(),
                report::thousands(live.ok.load(Ordering::Relaxed)),
                report::thousands(live.failed.load(Ordering::Relaxed)),
            ));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    progress.finish();
    let elapsed_s = start.elapsed().as_secs_f64();
    let generator_cpu_s = proc_stats::self_cpu_seconds() - cpu_before;
    let processes = probe.finish()?;
    let (idle_after, _) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let machine_busy_cpu_s = (cores as f64 * elapsed_s - (idle_after - idle_before)).max(0.0);

    let mut tally = Tally::default();
    let mut hist = Histogram::new();
    for (t, h) in &results {
        tally.merge(t);
        hist.merge(h);
    }
    let per_reg = |cpu: f64| {
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
            cpu_us_per_reg: per_reg(cpu_s),
            peak_rss_kib: processes.iter().map(|p| p.peak_rss_kib).sum(),
            processes,
        }
    });
    let report = RegisterReport {
        scenario: "register",
        proto: args.proto,
        transport: if args.tls { "tls" } else { "tcp" },
        mode: args.mode,
        target: args.proxy,
        connections: args.connections,
        offered_rate: args.rate,
        duration_s: args.duration,
        timeout_ms: args.timeout_ms,
        request_bytes: wire.request(0, 0).len(),
        elapsed_s,
        completed: tally.ok,
        failed: tally.failed,
        bad: tally.bad,
        errors: tally.errors.clone(),
        late: tally.late,
        connects: tally.connects,
        reg_per_s: tally.ok as f64 / elapsed_s.max(1e-9),
        latency_us: LatencyUs::from_ns(&hist),
        others_cpu_s: (machine_busy_cpu_s
            - generator_cpu_s
            - server.as_ref().map_or(0.0, |s| s.cpu_s))
        .max(0.0),
        server,
        generator_cpu_s,
        generator_cpu_us_per_reg: per_reg(generator_cpu_s),
        machine_busy_cpu_s,
        fake_pbx: target.map(|s| TargetCounts {
            connections: s.connections.load(Ordering::Relaxed),
            answered: s.answered.load(Ordering::Relaxed),
            mismatched: s.mismatched.load(Ordering::Relaxed),
        }),
    };
    if let Some(p) = &args.json {
        report::write_json(p, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pycrate's RRQ and RCF (controlplane/tests/proxy/seeds.txt).
    fn seed(label: &str) -> String {
        include_str!("../../controlplane/tests/proxy/seeds.txt")
            .lines()
            .find_map(|l| l.strip_prefix(label)?.strip_prefix('|'))
            .unwrap_or_else(|| panic!("no seed {label}"))
            .to_string()
    }

    #[test]
    fn frames_tpkt_and_sip_messages() {
        let rrq = hex(&seed("rrq - alice"), "rrq").unwrap();
        assert_eq!(message_len(Proto::H323, &rrq), Ok(Some(rrq.len())));
        assert_eq!(message_len(Proto::H323, &rrq[..10]), Ok(None));
        assert_eq!(message_len(Proto::H323, &[3, 0]), Ok(None));
        assert!(message_len(Proto::H323, &[3, 0, 0, 2]).is_err());
        assert!(message_len(Proto::H323, b"GET /").is_err());
        let reg = sip_register("example.com", false, "x1", 1);
        let mut two = reg.clone();
        two.extend_from_slice(b"SIP/2.0 200 OK\r\nl: 3\r\n\r\nabc");
        assert_eq!(message_len(Proto::Sip, &two), Ok(Some(reg.len())));
        assert_eq!(
            message_len(Proto::Sip, &two[reg.len()..]),
            Ok(Some(two.len() - reg.len()))
        );
        assert_eq!(
            message_len(Proto::Sip, &two[reg.len()..two.len() - 1]),
            Ok(None)
        );
        assert!(message_len(Proto::Sip, b"X\r\nContent-Length: z\r\n\r\n").is_err());
    }

    #[test]
    fn the_registrar_answers_a_register_with_its_identifiers() {
        let reg = sip_register("example.com", true, "abc", 7);
        let ok = String::from_utf8(sip_ok(&reg).unwrap()).unwrap();
        assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nCall-ID: abc@127.0.0.1\r\n"), "{ok}");
        assert!(ok.contains("\r\nCSeq: 7 REGISTER\r\n"), "{ok}");
        assert!(
            ok.contains("Via: SIP/2.0/TLS 127.0.0.1:5060;branch=z9hG4bKabc"),
            "{ok}"
        );
        assert!(
            ok.contains("To: <sip:alice@example.com>;tag=registrar\r\n"),
            "{ok}"
        );
        assert!(ok.ends_with("Content-Length: 0\r\n\r\n"), "{ok}");
        assert_eq!(sip_ok(b"INVITE sip:x SIP/2.0\r\n\r\n"), None);
    }

    /// Against the fake PBX directly: every registration answered and checked, new and kept
    /// connections, H.323 and SIP; a wrong RCF counts as bad.
    #[test]
    fn registers_against_the_fake_pbx() {
        for (proto, mode) in [
            (Proto::H323, ConnMode::New),
            (Proto::H323, ConnMode::Kept),
            (Proto::Sip, ConnMode::New),
            (Proto::Sip, ConnMode::Kept),
        ] {
            let port = crate::udp::free_port("127.0.0.1".parse().unwrap()).unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let args = RegisterArgs {
                proto,
                proxy: addr,
                tls: false,
                target_listen: Some(addr),
                request_hex: Some(seed(
                    "rrq hq@example.com/branch alice email:alice@example.com url:h323:alice@example.com 12345",
                )),
                answer_hex: Some(seed("rcf")),
                sip_domain: "example.com".into(),
                mode,
                connections: 2,
                rate: Some(200.0),
                duration: 0.3,
                timeout_ms: 2000,
                server_pids: vec![],
                json: None,
                quiet: true,
            };
            let r = run(&args).unwrap();
            assert!(r.completed >= 50, "{proto:?} {mode:?}: {}", r.text());
            assert_eq!((r.failed, r.bad), (0, 0), "{}", r.text());
            let pbx = r.fake_pbx.as_ref().unwrap();
            assert_eq!(pbx.answered, r.completed);
            assert_eq!(pbx.mismatched, 0);
            match mode {
                ConnMode::New => assert_eq!(r.connects, r.completed),
                ConnMode::Kept => assert_eq!(r.connects, 2),
            }
        }
        // The fake PBX answers with an RRJ where the generator expects the RCF.
        let port = crate::udp::free_port("127.0.0.1".parse().unwrap()).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let wire = Arc::new(Wire {
            proto: Proto::H323,
            tls: false,
            request: hex(&seed("rrq - alice"), "").unwrap(),
            answer: hex(&seed("rrj"), "").unwrap(),
            domain: String::new(),
            nonce: 0,
        });
        start_target(addr, &wire, 1, Duration::from_secs(2)).unwrap();
        let mut args = RegisterArgs {
            proto: Proto::H323,
            proxy: addr,
            tls: false,
            target_listen: None,
            request_hex: Some(seed("rrq - alice")),
            answer_hex: Some(seed("rcf")),
            sip_domain: String::new(),
            mode: ConnMode::New,
            connections: 1,
            rate: None,
            duration: 0.1,
            timeout_ms: 2000,
            server_pids: vec![],
            json: None,
            quiet: true,
        };
        let r = run(&args).unwrap();
        assert!(r.bad > 0 && r.completed == 0, "{}", r.text());
        assert_eq!(
            r.errors.keys().collect::<Vec<_>>(),
            ["answer is not the target's RCF"]
        );
        args.proxy = "192.0.2.1:1720".parse().unwrap();
        assert!(run(&args).unwrap_err().contains("loopback"));
    }
}
