//! Media relay load: creates `--sessions` sessions through Portico's REST API, then for each
//! two UDP endpoints on 127.0.0.1 exchange RTP (12-byte header, 160-byte payload) at `--rate`
//! packets per second each way for `--duration` seconds. Reports relayed packets, loss, out of
//! order arrivals, the dataplane's CPU per million relayed packets and its RSS per 1000
//! sessions. Bounded in count (sessions ≤ 4000) and time (duration ≤ 120 s).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::proc_stats;

#[derive(clap::Args, Debug)]
pub struct MediaArgs {
    /// Portico's REST API address (or --rtpengine).
    #[arg(long, required_unless_present = "rtpengine")]
    pub api: Option<SocketAddr>,
    /// File holding Portico's admin token.
    #[arg(long, required_unless_present = "rtpengine")]
    pub token_file: Option<PathBuf>,
    /// Drive rtpengine instead: its ng control address (bencode over UDP); sessions are
    /// created with offer/answer and deleted with delete.
    #[arg(long, conflicts_with_all = ["api", "token_file"])]
    pub rtpengine: Option<SocketAddr>,
    /// The dataplane's pid (CPU and RSS are read from /proc).
    #[arg(long)]
    pub server_pid: u32,
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Packets per second per session and direction.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Address the endpoints' sockets are bound to (each on its own port).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// CPUs whose busy time (their /proc/stat lines, softirq included) is reported as the
    /// server's side, e.g. `--server-cpus 1` with the server and its interface's receive
    /// work pinned there and this generator elsewhere.
    #[arg(long = "server-cpus", value_delimiter = ',')]
    pub server_cpus: Vec<usize>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug)]
pub struct MediaReport {
    pub sessions: usize,
    pub sent: u64,
    pub received: u64,
    pub out_of_order: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Seconds to create all sessions through the API.
    pub create_seconds: f64,
    /// Over the data phase: the whole machine's busy CPU time (from /proc/stat idle time,
    /// so softirq work no process is charged for counts), this generator's own, and that of
    /// `--server-cpus`.
    pub machine_busy_cpu_s: f64,
    pub generator_cpu_s: f64,
    pub server_cpus_busy_s: Option<f64>,
}

impl MediaReport {
    pub fn json(&self) -> serde_json::Value {
        let per_m = |cpu: f64| cpu / (self.received.max(1) as f64 / 1e6);
        serde_json::json!({
            "sessions": self.sessions,
            "sent": self.sent,
            "received": self.received,
            "lost": self.sent.saturating_sub(self.received),
            "out_of_order": self.out_of_order,
            "seconds": self.seconds,
            "relayed_pps": self.received as f64 / self.seconds.max(1e-3),
            "server_cpu_s": self.cpu_seconds,
            "machine_busy_cpu_s": self.machine_busy_cpu_s,
            "generator_cpu_s": self.generator_cpu_s,
            "server_cpus_busy_s": self.server_cpus_busy_s,
            "cpu_s_per_million": {
                "server_process": per_m(self.cpu_seconds),
                "machine": per_m(self.machine_busy_cpu_s),
                "machine_minus_generator": per_m(self.machine_busy_cpu_s - self.generator_cpu_s),
                "server_cpus": self.server_cpus_busy_s.map(per_m),
            },
            "rss_kib": [self.rss_before_kib, self.rss_after_kib],
            "create_seconds": self.create_seconds,
        })
    }

    pub fn text(&self) -> String {
        let lost = self.sent.saturating_sub(self.received);
        format!(
            "media: {} sessions (created in {:.2} s), {:.1} s, sent {}, relayed {}, lost {} ({:.3}%), out of order {}, \
             {:.0} relayed pkt/s, dataplane CPU {:.2} s = {:.2} CPU-s per million packets, \
             RSS {} -> {} KiB = {:.2} MiB per 1000 sessions",
            self.sessions,
            self.create_seconds,
            self.seconds,
            self.sent,
            self.received,
            lost,
            100.0 * lost as f64 / self.sent.max(1) as f64,
            self.out_of_order,
            self.received as f64 / self.seconds,
            self.cpu_seconds,
            self.cpu_seconds / (self.received.max(1) as f64 / 1e6),
            self.rss_before_kib,
            self.rss_after_kib,
            (self.rss_after_kib.saturating_sub(self.rss_before_kib)) as f64 / 1024.0 * 1000.0
                / self.sessions.max(1) as f64,
        )
    }
}

fn http(api: SocketAddr, token: &str, method: &str, path: &str, body: &str) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Threads creating sessions at once.
const CREATORS: usize = 8;

/// Who relays: Portico (REST API) or rtpengine (ng protocol).
#[derive(Clone, Copy, Debug)]
enum Target {
    Portico(SocketAddr),
    Rtpengine(SocketAddr),
}

/// One ng request (bencode dictionary text) and its answer, with a cookie in front.
fn ng_call(ng: SocketAddr, dict: &str) -> Result<String, String> {
    let s = UdpSocket::bind((ng.ip(), 0))
        .or_else(|_| UdpSocket::bind("0.0.0.0:0"))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    // rtpengine answers a repeated cookie from its cache: one per request of this process.
    static COOKIE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let cookie = format!(
        "{:x}-{:x}",
        std::process::id(),
        COOKIE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    for _ in 0..3 {
        s.send_to(format!("{cookie} {dict}").as_bytes(), ng)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65536];
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.contains("6:result2:ok") {
                return Err(format!("rtpengine: {text}"));
            }
            return Ok(text);
        }
    }
    Err("rtpengine: no answer".into())
}

/// The audio port of the SDP in an ng answer.
fn ng_port(answer: &str) -> Result<u16, String> {
    answer
        .split("m=audio ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("rtpengine: no m=audio in {answer}"))
}

fn sdp(a: SocketAddr) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
        ip = a.ip(),
        port = a.port()
    )
}

fn bstr(s: &str) -> String {
    format!("{}:{s}", s.len())
}

fn create(
    target: Target,
    token: &str,
    a: SocketAddr,
    b: SocketAddr,
) -> Result<(String, SocketAddr, SocketAddr), String> {
    let api = match target {
        Target::Portico(api) => api,
        Target::Rtpengine(ng) => {
            // Offer from A: the answer's port is where B sends (towards A); the answer from
            // B: its port is where A sends (towards B).
            let call = format!("bench-{}-{}", a.port(), b.port());
            let offer = ng_call(
                ng,
                &format!(
                    "d7:command5:offer7:call-id{}8:from-tag{}3:sdp{}e",
                    bstr(&call),
                    bstr("a"),
                    bstr(&sdp(a))
                ),
            )?;
            let answer = ng_call(
                ng,
                &format!(
                    "d7:command6:answer7:call-id{}8:from-tag{}6:to-tag{}3:sdp{}e",
                    bstr(&call),
                    bstr("a"),
                    bstr("b"),
                    bstr(&sdp(b))
                ),
            )?;
            // rtpengine's ports are on its own interface address (where ng listens).
            let ip = ng.ip();
            return Ok((
                call,
                SocketAddr::new(ip, ng_port(&answer)?),
                SocketAddr::new(ip, ng_port(&offer)?),
            ));
        }
    };
    let body = format!(r#"{{"legs":[{{"address":"{a}"}},{{"address":"{b}"}}],"label":"bench"}}"#);
    let answer = http(api, token, "POST", "/api/v1/media/sessions", &body)
        .map_err(|e| format!("create: {e}"))?;
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("create: {e}: {answer}"))?;
    let local = |i: usize| -> Result<SocketAddr, String> {
        v["legs"][i]["local"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("create: no leg {i} in {answer}"))
    };
    Ok((
        v["id"].as_str().unwrap_or("").to_string(),
        local(0)?,
        local(1)?,
    ))
}

fn rtp(seq: u16, ssrc: u32) -> [u8; 172] {
    let mut p = [0u8; 172];
    p[0] = 0x80;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

struct End {
    sock: UdpSocket,
    to: SocketAddr,
    next_seq: u16,
    last_rx: Option<u16>,
}

pub fn run(args: &MediaArgs) -> Result<MediaReport, String> {
    let sessions = args.sessions.clamp(1, 4000);
    let duration = Duration::from_secs(args.duration.clamp(1, 120));
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("{}: {e}", f.display()))?
            .trim()
            .to_string(),
        None => String::new(),
    };
    let token = token.as_str();
    let target = match (args.rtpengine, args.api) {
        (Some(ng), _) => Target::Rtpengine(ng),
        (None, Some(api)) => Target::Portico(api),
        (None, None) => return Err("--api or --rtpengine".into()),
    };
    let rss_before = proc_stats::rss_kib(args.server_pid).map_err(|e| e.to_string())?;
    // Endpoint sockets first, then the sessions, created by a few threads in parallel (each
    // create waits for a worker to bind the legs).
    let mut socks = Vec::with_capacity(2 * sessions);
    for _ in 0..2 * sessions {
        socks.push(UdpSocket::bind((args.bind, 0)).map_err(|e| e.to_string())?);
    }
    let addrs: Vec<SocketAddr> = socks
        .iter()
        .map(|s| s.local_addr().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let created_at = Instant::now();
    let results: Vec<Result<(String, SocketAddr, SocketAddr), String>> = std::thread::scope(|sc| {
        let chunks: Vec<_> = addrs
            .chunks(2 * sessions.div_ceil(CREATORS))
            .map(|chunk| {
                sc.spawn(move || {
                    chunk
                        .chunks(2)
                        .map(|pair| create(target, token, pair[0], pair[1]))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let create_seconds = created_at.elapsed().as_secs_f64();
    let mut ends: Vec<End> = Vec::with_capacity(2 * sessions);
    let mut ids = Vec::with_capacity(sessions);
    let mut socks = socks.into_iter();
    for r in results {
        let (id, l0, l1) = r?;
        ids.push(id);
        for to in [l0, l1] {
            let sock = socks.next().ok_or("socket count")?;
            sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            ends.push(End {
                sock,
                to,
                next_seq: 0,
                last_rx: None,
            });
        }
    }
    let rss_after = proc_stats::rss_kib(args.server_pid).map_err(|e| e.to_string())?;
    let interval = Duration::from_secs(1) / args.rate.clamp(1, 1000);
    let (mut sent, mut received, mut out_of_order) = (0u64, 0u64, 0u64);
    let cpu0 = proc_stats::cpu_seconds(args.server_pid).map_err(|e| e.to_string())?;
    let cpus = &args.server_cpus;
    let cpus_idle = || -> Result<Option<f64>, String> {
        if cpus.is_empty() {
            return Ok(None);
        }
        proc_stats::cpus_idle_seconds(cpus)
            .map(Some)
            .map_err(|e| format!("--server-cpus: {e}"))
    };
    let gen0 = proc_stats::self_cpu_seconds();
    let (idle0, cores) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let cpus_idle0 = cpus_idle()?;
    let start = Instant::now();
    let mut next = start;
    let mut buf = [0u8; 2048];
    let drain = |ends: &mut Vec<End>, received: &mut u64, ooo: &mut u64, buf: &mut [u8]| {
        for e in ends.iter_mut() {
            while let Ok((n, _)) = e.sock.recv_from(buf) {
                if n >= 12 {
                    let seq = u16::from_be_bytes([buf[2], buf[3]]);
                    if e.last_rx.is_some_and(|l| seq != l.wrapping_add(1)) {
                        *ooo += 1;
                    }
                    e.last_rx = Some(seq);
                    *received += 1;
                }
            }
        }
    };
    while start.elapsed() < duration {
        for (i, e) in ends.iter_mut().enumerate() {
            let p = rtp(e.next_seq, i as u32);
            if e.sock.send_to(&p, e.to).is_ok() {
                sent += 1;
                e.next_seq = e.next_seq.wrapping_add(1);
            }
        }
        next += interval;
        loop {
            drain(&mut ends, &mut received, &mut out_of_order, &mut buf);
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(2)));
        }
    }
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        drain(&mut ends, &mut received, &mut out_of_order, &mut buf);
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = proc_stats::cpu_seconds(args.server_pid).map_err(|e| e.to_string())? - cpu0;
    let generator_cpu_s = proc_stats::self_cpu_seconds() - gen0;
    let (idle1, _) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let server_cpus_busy_s = match (cpus_idle0, cpus_idle()?) {
        (Some(b), Some(a)) => Some((cpus.len() as f64 * seconds - (a - b)).max(0.0)),
        _ => None,
    };
    let machine_busy_cpu_s = (cores as f64 * seconds - (idle1 - idle0)).max(0.0);
    for id in ids {
        match target {
            Target::Portico(api) => {
                let _ = http(
                    api,
                    token,
                    "DELETE",
                    &format!("/api/v1/media/sessions/{id}"),
                    "",
                );
            }
            Target::Rtpengine(ng) => {
                let _ = ng_call(
                    ng,
                    &format!("d7:command6:delete7:call-id{}:{id}e", id.len()),
                );
            }
        }
    }
    Ok(MediaReport {
        sessions,
        sent,
        received,
        out_of_order,
        seconds,
        cpu_seconds: cpu,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        create_seconds,
        machine_busy_cpu_s,
        generator_cpu_s,
        server_cpus_busy_s,
    })
}
