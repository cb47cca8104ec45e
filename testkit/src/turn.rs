//! TURN over UDP: a client with long-term credentials (right or wrong) on a socket bound to a
//! source address of the test's choosing, built on the tests' own codec ([`crate::stun`]);
//! echo peers (the kit's own and coturn's `turnutils_peer`); and a bounded generator of
//! wrong-password requests from many sources.
//!
//! The credentials are those every [`Spec::turn_users`](crate::Spec::turn_users) site knows.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::net::{recv_answer, recv_within, udp_client, udp_on};
use crate::process::Proc;
use crate::stun::{
    self, new_tid, Builder, Class, Msg, ALLOCATE, CHANNEL_BIND, CHANNEL_NUMBER, CREATE_PERMISSION,
    DATA, DATA_METHOD, LIFETIME, NONCE, REALM, REFRESH, REQUESTED_TRANSPORT, SEND, USERNAME,
    XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS,
};
use crate::ANSWER_WAIT;

pub const REALM_NAME: &str = "portico-test";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
/// A second static user.
pub const USER2: &str = "bob";
pub const PASSWORD2: &str = "builder";
/// The TURN REST API secret; "previous-secret" is the one before it (rollover).
pub const SHARED_SECRET: &str = "rest-secret";
pub const PREVIOUS_SECRET: &str = "previous-secret";
/// How long a request waits for its answer, retransmitting every RTO.
pub const REQUEST_WAIT: Duration = Duration::from_secs(5);
const RTO: Duration = Duration::from_millis(500);

/// A STUN answer as received.
#[derive(Clone, Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn msg(&self) -> Msg {
        Msg::parse(&self.bytes)
            .unwrap_or_else(|e| panic!("answer is not STUN ({e}): {:02x?}", self.bytes))
    }

    pub fn class(&self) -> Class {
        self.msg().class()
    }

    pub fn is_success(&self) -> bool {
        self.class() == Class::Success
    }

    pub fn code(&self) -> Option<u16> {
        self.msg().error_code().map(|(c, _)| c)
    }

    pub fn get(&self, typ: u16) -> Option<Vec<u8>> {
        self.msg().get(typ).map(<[u8]>::to_vec)
    }

    /// An XOR-*-ADDRESS attribute, decoded.
    pub fn xor(&self, typ: u16) -> Option<SocketAddr> {
        self.msg().xor_address(typ)
    }

    pub fn lifetime(&self) -> Option<u32> {
        self.msg().u32(LIFETIME)
    }

    #[track_caller]
    pub fn expect_error(&self, code: u16) {
        assert_eq!(
            self.class(),
            Class::Error,
            "expected error {code}, got {:?}",
            self.class()
        );
        assert_eq!(self.code(), Some(code));
    }
}

/// Data that reached the client from its relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relayed {
    Channel { number: u16, data: Vec<u8> },
    Indication { peer: SocketAddr, data: Vec<u8> },
}

/// REQUESTED-TRANSPORT: UDP.
pub fn udp_transport(b: Builder) -> Builder {
    b.attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0])
}

/// A TURN client on its own UDP socket, with long-term credentials.
pub struct TurnClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub user: String,
    pub password: String,
    pub realm: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

impl TurnClient {
    /// A client on the loopback address of `server`'s family.
    pub fn new(server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient::with_socket(udp_client(server), server, user, password)
    }

    /// A client whose socket is bound to the source address `src`.
    pub fn from(src: IpAddr, server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient::with_socket(udp_on(src), server, user, password)
    }

    /// A client of `src` that knows the user but not the password.
    pub fn attacker(src: IpAddr, server: SocketAddr) -> TurnClient {
        TurnClient::from(src, server, USER, "not-the-password")
    }

    fn with_socket(sock: UdpSocket, server: SocketAddr, user: &str, password: &str) -> Self {
        TurnClient {
            sock,
            server,
            user: user.into(),
            password: password.into(),
            realm: None,
            nonce: None,
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.sock
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"))
    }

    pub fn key(&self) -> [u8; 16] {
        let realm = self.realm.as_deref().unwrap_or(REALM_NAME.as_bytes());
        stun::long_term_key(self.user.as_bytes(), realm, self.password.as_bytes())
    }

    /// A request with `attrs`, signed (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY) once a
    /// nonce is known, with FINGERPRINT.
    pub fn build(
        &self,
        method: u16,
        tid: &[u8; 12],
        attrs: &dyn Fn(Builder) -> Builder,
    ) -> Vec<u8> {
        let mut b = attrs(Builder::request(method, *tid));
        if let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
            b = b
                .attr(USERNAME, self.user.as_bytes())
                .attr(REALM, realm)
                .attr(NONCE, nonce)
                .message_integrity(&self.key());
        }
        b.fingerprint().build()
    }

    /// An Allocate (UDP transport) request, signed once a nonce is known.
    pub fn allocate_request(&self, tid: &[u8; 12]) -> Vec<u8> {
        self.build(ALLOCATE, tid, &udp_transport)
    }

    /// Sends `req` and waits for the answer with its transaction id, retransmitting the same
    /// bytes every RTO as RFC 8489 §6.2.1 has clients do, for at most `wait`. Other datagrams
    /// (relayed data, late answers) arriving meanwhile are skipped.
    pub fn transact_within(&self, req: &[u8], wait: Duration) -> Option<Reply> {
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&req[8..20]);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            self.sock
                .send_to(req, self.server)
                .unwrap_or_else(|e| panic!("send_to {}: {e}", self.server));
            let slice = deadline.saturating_duration_since(Instant::now()).min(RTO);
            if let Some(bytes) = recv_answer(&self.sock, self.server, &tid, slice) {
                return Some(Reply { bytes });
            }
        }
        None
    }

    /// [`TurnClient::transact_within`] [`REQUEST_WAIT`]; no answer fails the test.
    pub fn transact(&self, req: &[u8]) -> Reply {
        self.transact_within(req, REQUEST_WAIT)
            .unwrap_or_else(|| panic!("no answer from {} within {REQUEST_WAIT:?}", self.server))
    }

    /// A request with credentials, doing the 401 round trip first when no nonce is known
    /// and again after 438 Stale Nonce. Answers to signed requests must carry a valid
    /// MESSAGE-INTEGRITY computed with the user's key.
    pub fn request(&mut self, method: u16, attrs: &dyn Fn(Builder) -> Builder) -> Reply {
        for _ in 0..3 {
            let signed = self.nonce.is_some();
            let r = self.transact(&self.build(method, &new_tid(), attrs));
            let code = r.code();
            if (code == Some(401) && !signed) || code == Some(438) {
                self.take_challenge(&r);
                assert!(self.nonce.is_some(), "a {code:?} without NONCE");
                continue;
            }
            if signed && code != Some(401) {
                r.msg()
                    .check_message_integrity(&self.key())
                    .unwrap_or_else(|e| panic!("response MESSAGE-INTEGRITY: {e}"));
            }
            return r;
        }
        panic!("no final answer to method {method:#x} after three tries");
    }

    /// Takes REALM and NONCE from a 401 (or 438) answer.
    pub fn take_challenge(&mut self, r: &Reply) {
        self.realm = r.get(REALM);
        self.nonce = r.get(NONCE);
    }

    /// The unsigned Allocate whose 401 brings REALM and NONCE (not a suspicious event).
    #[track_caller]
    pub fn challenge(&mut self) {
        self.realm = None;
        self.nonce = None;
        let r = self
            .transact_within(&self.allocate_request(&new_tid()), ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to an unsigned Allocate from {}", self.local()));
        assert_eq!(r.code(), Some(401), "an unsigned Allocate is challenged");
        self.take_challenge(&r);
        assert!(self.nonce.is_some(), "a 401 without NONCE");
    }

    pub fn allocate_with(&mut self, attrs: &dyn Fn(Builder) -> Builder) -> Reply {
        self.request(ALLOCATE, attrs)
    }

    /// Allocates a UDP relay and returns the relayed address.
    #[track_caller]
    pub fn allocate(&mut self) -> SocketAddr {
        let r = self.allocate_with(&udp_transport);
        assert!(
            r.is_success(),
            "Allocate from {} failed: {:?}",
            self.local(),
            r.code()
        );
        r.xor(XOR_RELAYED_ADDRESS)
            .unwrap_or_else(|| panic!("no XOR-RELAYED-ADDRESS"))
    }

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

    pub fn refresh(&mut self, lifetime: u32) -> Reply {
        self.request(REFRESH, &|b| b.u32(LIFETIME, lifetime))
    }

    /// A Refresh (600 s) of this client's allocation, signed with the nonce it has; `None`
    /// when nothing answers within `wait` (the source is blocked).
    pub fn refresh_within(&self, wait: Duration) -> Option<Reply> {
        let req = self.build(REFRESH, &new_tid(), &|b| b.u32(LIFETIME, 600));
        self.transact_within(&req, wait)
    }

    pub fn permit(&mut self, peers: &[SocketAddr]) -> Reply {
        self.request(CREATE_PERMISSION, &|b| {
            peers
                .iter()
                .fold(b, |b, p| b.xor_address(XOR_PEER_ADDRESS, *p))
        })
    }

    pub fn bind(&mut self, number: u16, peer: SocketAddr) -> Reply {
        self.request(CHANNEL_BIND, &|b| {
            let [x, y] = number.to_be_bytes();
            b.attr(CHANNEL_NUMBER, &[x, y, 0, 0])
                .xor_address(XOR_PEER_ADDRESS, peer)
        })
    }

    pub fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let m = Builder::new(stun::msg_type(SEND, Class::Indication), new_tid())
            .xor_address(XOR_PEER_ADDRESS, peer)
            .attr(DATA, data)
            .build();
        self.sock
            .send_to(&m, self.server)
            .unwrap_or_else(|e| panic!("send_to: {e}"));
    }

    /// ChannelData, padded to a multiple of 4 when `pad` (optional over UDP).
    pub fn channel_data(&self, number: u16, data: &[u8], pad: bool) {
        let mut m = number.to_be_bytes().to_vec();
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
        if pad {
            m.resize(m.len().div_ceil(4) * 4, 0);
        }
        self.sock
            .send_to(&m, self.server)
            .unwrap_or_else(|e| panic!("send_to: {e}"));
    }

    /// The next relayed datagram within `wait`, decoded and checked: ChannelData with a
    /// length that fits, or a Data indication with XOR-PEER-ADDRESS and DATA.
    pub fn recv_relayed(&self, wait: Duration) -> Option<Relayed> {
        let (bytes, from) = recv_within(&self.sock, wait)?;
        assert_eq!(
            from, self.server,
            "relayed data comes from the server address"
        );
        Some(decode_relayed(&bytes))
    }
}

/// Decodes what the server sends a client from a peer.
pub fn decode_relayed(bytes: &[u8]) -> Relayed {
    assert!(bytes.len() >= 4, "runt datagram {bytes:02x?}");
    if bytes[0] & 0xC0 == 0x40 {
        let number = u16::from_be_bytes([bytes[0], bytes[1]]);
        let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        assert!(
            bytes.len() >= 4 + len && bytes.len() <= 4 + len.div_ceil(4) * 4,
            "ChannelData length {len} in a {}-byte datagram",
            bytes.len()
        );
        return Relayed::Channel {
            number,
            data: bytes[4..4 + len].to_vec(),
        };
    }
    let m = Msg::parse(bytes)
        .unwrap_or_else(|e| panic!("relayed datagram is neither ChannelData nor STUN: {e}"));
    assert_eq!(
        (m.class(), m.method()),
        (Class::Indication, DATA_METHOD),
        "a Data indication"
    );
    let peer = m
        .xor_address(XOR_PEER_ADDRESS)
        .unwrap_or_else(|| panic!("Data indication without XOR-PEER-ADDRESS"));
    let data = m
        .get(DATA)
        .unwrap_or_else(|| panic!("Data indication without DATA"))
        .to_vec();
    Relayed::Indication { peer, data }
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

// ---------------------------------------------------------------------------------------------
// Peers

/// A UDP peer that sends every datagram back to where it came from, for at most a minute.
pub struct EchoPeer {
    pub addr: SocketAddr,
    pub echoed: Arc<AtomicUsize>,
    /// Sources the peer saw, in order.
    pub sources: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoPeer {
    pub fn start(ip: IpAddr) -> EchoPeer {
        let sock = udp_on(ip);
        let addr = sock
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let echoed = Arc::new(AtomicUsize::new(0));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, st) = (echoed.clone(), sources.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Some((bytes, from)) = recv_within(&sock, Duration::from_millis(50)) {
                    // Counted and recorded before the echo leaves: a test that has received
                    // the echo must find it counted (counting after the send raced with it).
                    if let Ok(mut v) = s.lock() {
                        v.push(from);
                    }
                    e.fetch_add(1, Ordering::SeqCst);
                    if sock.send_to(&bytes, from).is_err() {
                        e.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
        });
        EchoPeer {
            addr,
            echoed,
            sources,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> usize {
        self.echoed.load(Ordering::SeqCst)
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP peer for RFC 6062 relays: accepts connections on `ip` and sends every byte back on
/// the connection it came on, a thread per connection, for at most a minute and at most
/// [`TcpEchoPeer::MAX_CONNECTIONS`] connections.
pub struct TcpEchoPeer {
    pub addr: SocketAddr,
    /// Bytes echoed, over all connections.
    pub echoed: Arc<AtomicUsize>,
    /// Where each connection came from, in order.
    pub sources: Arc<Mutex<Vec<SocketAddr>>>,
    /// Connections that ended (EOF or error from the other side).
    pub closed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoPeer {
    pub const MAX_CONNECTIONS: usize = 64;

    pub fn start(ip: IpAddr) -> TcpEchoPeer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("TCP echo peer bind on {ip}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let echoed = Arc::new(AtomicUsize::new(0));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, c, st) = (
            echoed.clone(),
            sources.clone(),
            closed.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut accepted = 0;
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                let (mut conn, from) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if accepted == Self::MAX_CONNECTIONS {
                    continue;
                }
                accepted += 1;
                if let Ok(mut v) = s.lock() {
                    v.push(from);
                }
                let (e, c, st) = (e.clone(), c.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut buf = [0u8; 16384];
                    while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                e.fetch_add(n, Ordering::SeqCst);
                                if conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(err)
                                if matches!(
                                    err.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        TcpEchoPeer {
            addr,
            echoed,
            sources,
            closed,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections the other side ended.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for TcpEchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// coturn's `turnutils_peer` (a UDP echo peer) on `addr`, stopped on drop.
pub struct CoturnPeer {
    _proc: Proc,
    pub addr: SocketAddr,
}

impl CoturnPeer {
    /// Starts it, logging to `log`, and waits until it echoes.
    pub fn start(tool: &Path, addr: SocketAddr, log: &Path) -> CoturnPeer {
        let proc = Proc::spawn(
            "turnutils_peer",
            Command::new(tool)
                .arg("-p")
                .arg(addr.port().to_string())
                .arg("-L")
                .arg(addr.ip().to_string()),
            log,
        );
        let probe = udp_on(addr.ip());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = probe.send_to(b"ping", addr);
            if recv_within(&probe, Duration::from_millis(100)).is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "turnutils_peer on {addr} does not echo"
            );
        }
        CoturnPeer { _proc: proc, addr }
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
                c.take_challenge(&Reply { bytes });
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
