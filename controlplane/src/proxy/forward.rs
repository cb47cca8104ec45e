//! Connections to targets and byte relaying.
//!
//! The proxy terminates the client's connection and opens its own to the target (reference:
//! "Asymmetrical Connections"), so either side may be plain or TLS. Relaying keeps half-closes
//! (a client that shuts down its sending side still gets the whole answer) and enforces one
//! idle timeout for the pair: a connection is idle only when neither direction moved.
//! Stream-routed protocols (SIP, LDAP) are relayed message by message on the client's side,
//! so that every message that names a service is checked, not only the first.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use tokio::sync::mpsc;

use super::events::Reason;
use super::route::{Route, Target};
use super::sniff::{Check, Guard, Monitor, Step};
use super::Snapshot;

/// Any byte stream the proxy relays: TCP or TLS over TCP, either side.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

pub const BUF: usize = 16 * 1024;

/// When either direction of a connection pair last moved bytes.
#[derive(Clone)]
pub struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Reads with the pair's idle timeout: waits on while the other direction is busy.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        &self,
        r: &mut R,
        buf: &mut [u8],
        idle: Duration,
    ) -> io::Result<usize> {
        loop {
            let wait = idle.saturating_sub(self.idle_for());
            if wait.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
            }
            if let Ok(r) = tokio::time::timeout(wait, r.read(buf)).await {
                let n = r?;
                self.touch();
                return Ok(n);
            }
        }
    }
}

/// The PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2) for a TCP
/// connection from `src` to `dst`. Mixed families are sent as IPv6 with the IPv4 one mapped.
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut h = SIG.to_vec();
    h.push(0x21); // version 2, PROXY command
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                SocketAddr::V6(a) => *a.ip(),
            };
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(src).octets());
            h.extend_from_slice(&v6(dst).octets());
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    h
}

/// Opens the connection to a target: TCP, the PROXY header if the service wants one, then TLS
/// if the target port is a TLS one. The whole setup is bounded by `connect_timeout`.
pub async fn connect(
    snap: &Snapshot,
    route: &Route,
    target: Target,
    client: SocketAddr,
    local: SocketAddr,
) -> Result<BoxStream, String> {
    let limit = snap.limits.connect_timeout.get();
    tokio::time::timeout(limit, connect_inner(snap, route, target, client, local))
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {}s", limit.as_secs())))
}

async fn connect_inner(
    snap: &Snapshot,
    route: &Route,
    target: Target,
    client: SocketAddr,
    local: SocketAddr,
) -> Result<BoxStream, String> {
    let addr = format!("{}:{}", bracket(&route.host), target.port);
    let mut tcp = TcpStream::connect((route.host.as_str(), target.port))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if route.service.proxy_protocol {
        tcp.write_all(&proxy_v2_header(client, local))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
    }
    if !target.tls {
        return Ok(Box::new(tcp));
    }
    let name = route
        .server_name
        .clone()
        .ok_or_else(|| format!("{addr}: no valid TLS name for the target"))?;
    let config = if route.service.verifies_target() {
        Arc::clone(&snap.client_tls)
    } else {
        Arc::clone(&snap.client_tls_unverified)
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{addr}: TLS: {e}"))?;
    Ok(Box::new(tls))
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Copies one direction until EOF, then half-closes the writer. Target-to-client traffic
/// passes through `monitor`, whose findings go to `on_reject`.
pub async fn pump<R, W>(
    mut r: R,
    mut w: W,
    activity: &Activity,
    idle: Duration,
    mut monitor: Option<Box<dyn Monitor>>,
    on_reject: &(dyn Fn(String) + Sync),
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = activity.read(&mut r, &mut buf, idle).await?;
        if n == 0 {
            break;
        }
        if let Some(m) = monitor.as_mut() {
            for what in m.feed(&buf[..n]) {
                on_reject(what);
            }
        }
        w.write_all(&buf[..n]).await?;
        activity.touch();
        total += n as u64;
    }
    w.shutdown().await?;
    Ok(total)
}

/// What the relay does with a client's message (a [`Step::Message`]).
pub enum Verdict {
    Forward,
    /// Not forwarded; the answer, if any, goes to the client in the target's place.
    Refuse(Option<Vec<u8>>),
    /// The connection ends here (its source is blacklisted).
    Cut,
}

/// How a relay asks and tells about what it sees.
pub struct Hooks<'a> {
    /// Decides on each client message.
    pub judge: &'a (dyn Fn(Check, &[u8]) -> Verdict + Sync),
    /// Suspicious things: target rejections, a client stream that cannot be followed, a
    /// target that failed the first write.
    pub report: &'a (dyn Fn(Reason) + Sync),
}

/// Answers of the proxy's own waiting to go into the client's stream. Few: the client side
/// waits (and stops reading its client) while they are full.
const ANSWERS_QUEUED: usize = 8;

/// Relays a routed connection both ways until both are done. The client's bytes, starting
/// with `first` (what was read to route it), go through `guard` message by message and
/// reach the target only as `hooks.judge` allows; the target's go through `monitor`, and
/// the proxy's own answers to refused messages join them between two of the target's
/// messages. An error or idle timeout on either side ends both, and so does `stop`
/// resolving (the source was blacklisted): both connections are dropped.
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    client: (ReadHalf<BoxStream>, WriteHalf<BoxStream>),
    target: (ReadHalf<BoxStream>, WriteHalf<BoxStream>),
    first: &[u8],
    idle: Duration,
    guard: Box<dyn Guard>,
    monitor: Box<dyn Monitor>,
    hooks: &Hooks<'_>,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let activity = Activity::new();
    activity.touch();
    let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
    let on_reject = |what: String| (hooks.report)(Reason::TargetRejected(what));
    let up = client_side(client.0, target.1, first, &activity, idle, guard, hooks, tx);
    let down = target_side(target.0, client.1, &activity, idle, monitor, &on_reject, rx);
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        () = stop => Err(io::Error::new(io::ErrorKind::PermissionDenied, "source blacklisted")),
    }
}

fn cut() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "source blacklisted")
}

/// Client to target, message by message through the guard; half-closes the target at EOF.
#[allow(clippy::too_many_arguments)]
async fn client_side(
    mut r: ReadHalf<BoxStream>,
    mut w: WriteHalf<BoxStream>,
    first: &[u8],
    activity: &Activity,
    idle: Duration,
    mut guard: Box<dyn Guard>,
    hooks: &Hooks<'_>,
    answers: mpsc::Sender<Vec<u8>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut wrote = false;
    guard.push(first);
    loop {
        loop {
            let bytes = match guard.next() {
                Step::Idle => break,
                Step::Forward(b) => b,
                Step::Message { check, bytes } => match (hooks.judge)(check, &bytes) {
                    Verdict::Forward => {
                        guard.decide(true);
                        bytes
                    }
                    Verdict::Refuse(answer) => {
                        guard.decide(false);
                        if let Some(a) = answer {
                            // The target side may be gone already; the answer with it.
                            let _ = answers.send(a).await;
                        }
                        continue;
                    }
                    Verdict::Cut => return Err(cut()),
                },
                Step::Broken(why) => {
                    (hooks.report)(Reason::Malformed(why));
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                }
                Step::TooLarge => {
                    (hooks.report)(Reason::TooLarge);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "too large"));
                }
                Step::End => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "message refused",
                    ));
                }
            };
            if let Err(e) = w.write_all(&bytes).await {
                if !wrote {
                    (hooks.report)(Reason::TargetUnreachable("write failed".into()));
                }
                return Err(e);
            }
            wrote = true;
            activity.touch();
        }
        let n = activity.read(&mut r, &mut buf, idle).await?;
        if n == 0 {
            break;
        }
        guard.push(&buf[..n]);
    }
    w.shutdown().await
}

/// Target to client through the monitor, with the proxy's own answers put in at message
/// boundaries; half-closes the client at EOF, after the answers still waiting.
async fn target_side(
    mut r: ReadHalf<BoxStream>,
    mut w: WriteHalf<BoxStream>,
    activity: &Activity,
    idle: Duration,
    mut monitor: Box<dyn Monitor>,
    on_reject: &(dyn Fn(String) + Sync),
    mut answers: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    // An answer that arrived in the middle of one of the target's messages.
    let mut held: Option<Vec<u8>> = None;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            a = answers.recv(), if open && held.is_none() => match a {
                Some(a) if monitor.at_boundary() => {
                    w.write_all(&a).await?;
                    activity.touch();
                }
                Some(a) => held = Some(a),
                None => open = false,
            },
            n = activity.read(&mut r, &mut buf, idle) => {
                let n = n?;
                if n == 0 {
                    break;
                }
                for what in monitor.feed(&buf[..n]) {
                    on_reject(what);
                }
                w.write_all(&buf[..n]).await?;
                if monitor.at_boundary() {
                    if let Some(a) = held.take() {
                        w.write_all(&a).await?;
                    }
                }
                activity.touch();
            }
        }
    }
    if let Some(a) = held.take() {
        w.write_all(&a).await?;
    }
    while let Ok(a) = answers.try_recv() {
        w.write_all(&a).await?;
    }
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_layout() {
        let h = proxy_v2_header(
            "192.0.2.1:1234".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 1234);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 443);
        assert_eq!(h.len(), 28);
        let h6 = proxy_v2_header(
            "[2001:db8::1]:5".parse().unwrap(),
            "10.0.0.1:6".parse().unwrap(),
        );
        assert_eq!(h6[13], 0x21);
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(&h6[32 + 10..32 + 16], &[0xff, 0xff, 10, 0, 0, 1]);
    }

    /// A guard that forwards whatever comes, as it comes.
    struct Raw(Vec<u8>);

    impl Guard for Raw {
        fn push(&mut self, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
        fn next(&mut self) -> Step {
            if self.0.is_empty() {
                Step::Idle
            } else {
                Step::Forward(std::mem::take(&mut self.0))
            }
        }
        fn decide(&mut self, _: bool) {}
    }

    struct Quiet;

    impl Monitor for Quiet {
        fn feed(&mut self, _: &[u8]) -> Vec<String> {
            Vec::new()
        }
        fn at_boundary(&self) -> bool {
            true
        }
    }

    fn raw() -> (Box<dyn Guard>, Box<dyn Monitor>) {
        (Box::new(Raw(Vec::new())), Box::new(Quiet))
    }

    fn forward_all(_: Check, _: &[u8]) -> Verdict {
        Verdict::Forward
    }

    fn ignore(_: Reason) {}

    const PASS: Hooks<'static> = Hooks {
        judge: &forward_all,
        report: &ignore,
    };

    #[tokio::test]
    async fn relay_keeps_half_close_and_times_out() {
        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let (g, m) = raw();
        let relay = relay(
            tokio::io::split(Box::new(a) as BoxStream),
            tokio::io::split(Box::new(b) as BoxStream),
            b"first ",
            Duration::from_millis(300),
            g,
            m,
            &PASS,
            std::future::pending(),
        );
        let peers = async {
            a_peer.write_all(b"ping").await.unwrap();
            a_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            b_peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"first ping");
            // The client half-closed; the answer still reaches it.
            b_peer.write_all(b"pong").await.unwrap();
            b_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            a_peer.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"pong");
        };
        let (r, ()) = tokio::join!(relay, peers);
        r.unwrap();

        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let (g, m) = raw();
        let t0 = Instant::now();
        let r = super::relay(
            tokio::io::split(Box::new(a) as BoxStream),
            tokio::io::split(Box::new(b) as BoxStream),
            b"",
            Duration::from_millis(200),
            g,
            m,
            &PASS,
            std::future::pending(),
        )
        .await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    /// A relayed pair is cut soon after its source is blacklisted, though bytes keep flowing.
    #[tokio::test]
    async fn relay_ends_when_the_source_is_blocked() {
        use std::sync::atomic::AtomicBool;
        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let flag = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&flag);
        let blocked: crate::proxy::Blocked = Arc::new(move |_| f.load(Ordering::Relaxed));
        let source: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let (g, m) = raw();
        let relay = relay(
            tokio::io::split(Box::new(a) as BoxStream),
            tokio::io::split(Box::new(b) as BoxStream),
            b"",
            Duration::from_secs(30),
            g,
            m,
            &PASS,
            crate::proxy::until_blocked(&blocked, source),
        );
        let chatter = async {
            let mut buf = [0u8; 4];
            for i in 0..40 {
                if i == 5 {
                    flag.store(true, Ordering::Relaxed);
                }
                if a_peer.write_all(b"ping").await.is_err() {
                    return i;
                }
                if b_peer.read_exact(&mut buf).await.is_err() {
                    return i;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            40
        };
        let t0 = Instant::now();
        let (r, sent) = tokio::join!(relay, chatter);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert!(sent < 15, "relay went on for {sent} round trips");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // Both sides see the end.
        let mut rest = Vec::new();
        assert_eq!(a_peer.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(b_peer.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// A refused SIP request is answered by the proxy between two of the target's messages,
    /// never inside one, and what the target gets is the rest of the stream.
    #[tokio::test]
    async fn refusals_are_answered_between_the_targets_messages() {
        use crate::proxy::sniff::{sip::Sip, Sniffer};
        let (a, mut client) = tokio::io::duplex(64 * 1024);
        let (b, mut target) = tokio::io::duplex(64 * 1024);
        let (g, m) = Sip.session(4096);
        let judge = |check: Check, _: &[u8]| match check {
            Check::Name(n) if n != "alpha.test" => Verdict::Refuse(Some(b"REFUSED\r\n".to_vec())),
            _ => Verdict::Forward,
        };
        let reports = std::sync::Mutex::new(Vec::new());
        let report = |r: Reason| reports.lock().unwrap().push(r.to_string());
        let hooks = Hooks {
            judge: &judge,
            report: &report,
        };
        let req = |from: &str, cseq: u32| {
            format!("REGISTER sip:x SIP/2.0\r\nFrom: <sip:a@{from}>\r\nCall-ID: c\r\nCSeq: {cseq} REGISTER\r\nContent-Length: 0\r\n\r\n")
        };
        let first = req("alpha.test", 1);
        let relay = relay(
            tokio::io::split(Box::new(a) as BoxStream),
            tokio::io::split(Box::new(b) as BoxStream),
            first.as_bytes(),
            Duration::from_secs(5),
            g,
            m,
            &hooks,
            std::future::pending(),
        );
        let peers = async {
            let mut got = vec![0u8; first.len()];
            target.read_exact(&mut got).await.unwrap();
            assert_eq!(got, first.as_bytes());
            // The target starts an answer; meanwhile the client asks for another domain.
            let answer = "SIP/2.0 403 Forbidden\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n";
            let (head, tail) = answer.split_at(20);
            target.write_all(head.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            client
                .write_all(req("beta.test", 2).as_bytes())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            target.write_all(tail.as_bytes()).await.unwrap();
            client
                .write_all(req("alpha.test", 3).as_bytes())
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            let mut forwarded = Vec::new();
            target.read_to_end(&mut forwarded).await.unwrap();
            assert_eq!(String::from_utf8(forwarded).unwrap(), req("alpha.test", 3));
            target.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(
                String::from_utf8(back).unwrap(),
                format!("{answer}REFUSED\r\n")
            );
        };
        let (r, ()) = tokio::join!(relay, peers);
        r.unwrap();
        assert_eq!(
            *reports.lock().unwrap(),
            ["target rejected the request: SIP 403 Forbidden"]
        );
    }
}
