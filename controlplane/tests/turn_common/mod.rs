//! Harness of the TURN integration tests: a TURN client over a real UDP socket, a UDP echo
//! peer, server setups with TURN users, and coturn's `turnutils_peer` as a child process.
//!
//! The client builds and parses messages with Portico's own STUN codec (its RFC test vectors
//! are checked in the dataplane crate); the independent check of the wire format is the
//! coturn interop test, which runs a client Portico's code has never seen.
//!
//! The server itself is started by the shared harness in `tests/common` (each test binary
//! declares `mod common;` next to `mod turn_common;`).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portico_dataplane::stun::{self, attr, method, Class, Message, MessageWriter};

use crate::common::net::{recv_within, udp_client, udp_on};
use crate::common::server::Setup;

pub const REALM: &str = "portico-test";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
pub const SHARED_SECRET: &str = "rest-secret";
/// How long a request waits for its answer, retransmitting every RTO.
pub const REQUEST_WAIT: Duration = Duration::from_secs(5);
const RTO: Duration = Duration::from_millis(500);

/// `[turn]` lines for a server with one static user and a REST API secret; with
/// `loopback_peers` the test's own loopback peers are allowed (they are denied by default).
pub fn turn_lines(loopback_peers: bool) -> String {
    let mut t = format!(
        "realm = \"{REALM}\"\n\
         users = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}, {{ name = \"bob\", password = \"builder\" }}]\n\
         shared_secret = [\"{SHARED_SECRET}\", \"previous-secret\"]\n"
    );
    if loopback_peers {
        t.push_str("allow_peers = [\"127.0.0.0/8\", \"::1/128\"]\n");
    }
    t
}

/// A server setup on driver `io` with TURN users.
pub fn turn_setup(io: &'static str, loopback_peers: bool) -> Setup {
    let mut s = Setup::default().io(io);
    s.turn_extra = turn_lines(loopback_peers);
    s
}

/// `setup` with the fraud engine's automatic blacklisting off: every test client sends from
/// 127.0.0.1, and a test that fails authentication on purpose must not get the address
/// blocked. `turn_extra` ends the `[turn]` table, so a table may follow it.
pub fn without_auto_blacklist(mut setup: Setup) -> Setup {
    setup
        .turn_extra
        .push_str("\n[fraud]\nsuspicious_per_minute = 0\n");
    setup
}

/// A transaction id no other request of this process uses.
pub fn new_tid() -> [u8; 12] {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&std::process::id().to_be_bytes());
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

/// A STUN response as received.
#[derive(Clone, Debug)]
pub struct Resp {
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes)
            .unwrap_or_else(|e| panic!("answer is not STUN ({e:?}): {:02x?}", self.bytes))
    }

    pub fn class(&self) -> Class {
        self.msg().class()
    }

    pub fn is_success(&self) -> bool {
        self.class() == Class::SuccessResponse
    }

    pub fn code(&self) -> Option<u16> {
        let m = self.msg();
        m.get(attr::ERROR_CODE)
            .and_then(|v| attr::decode_error_code(v).ok())
            .map(|(c, _)| c)
    }

    pub fn get(&self, typ: u16) -> Option<Vec<u8>> {
        self.msg().get(typ).map(<[u8]>::to_vec)
    }

    pub fn xor(&self, typ: u16) -> Option<SocketAddr> {
        let m = self.msg();
        let tid = m.transaction_id();
        m.get(typ)
            .and_then(|v| attr::decode_xor_address(v, &tid).ok())
    }

    pub fn lifetime(&self) -> Option<u32> {
        self.msg()
            .get(attr::LIFETIME)
            .and_then(|v| attr::decode_u32(v).ok())
    }

    #[track_caller]
    pub fn expect_error(&self, code: u16) {
        assert_eq!(
            self.class(),
            Class::ErrorResponse,
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
    pub fn new(server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient {
            sock: udp_client(server),
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
        let realm = self.realm.as_deref().unwrap_or(REALM.as_bytes());
        stun::long_term_key_md5(self.user.as_bytes(), realm, self.password.as_bytes())
    }

    /// A request with `attrs`, signed (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY) once a
    /// nonce is known, with FINGERPRINT.
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
            let add = |w: &mut MessageWriter<'_>, t: u16, v: &[u8]| {
                w.add_attribute(t, v)
                    .unwrap_or_else(|e| panic!("attribute {t:#x}: {e}"))
            };
            add(&mut w, attr::USERNAME, self.user.as_bytes());
            add(&mut w, attr::REALM, realm);
            add(&mut w, attr::NONCE, nonce);
            w.add_message_integrity(&self.key())
                .unwrap_or_else(|e| panic!("MESSAGE-INTEGRITY: {e}"));
        }
        w.add_fingerprint()
            .unwrap_or_else(|e| panic!("FINGERPRINT: {e}"));
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    /// Sends `req` and waits for the response with its transaction id, retransmitting the
    /// same bytes every RTO as RFC 8489 §6.2.1 has clients do. Other datagrams (relayed
    /// data) arriving meanwhile are skipped.
    pub fn transact(&self, req: &[u8]) -> Resp {
        let deadline = Instant::now() + REQUEST_WAIT;
        loop {
            self.sock
                .send_to(req, self.server)
                .unwrap_or_else(|e| panic!("send_to {}: {e}", self.server));
            let resend = Instant::now() + RTO;
            while Instant::now() < resend {
                let Some((bytes, from)) = recv_within(&self.sock, resend - Instant::now()) else {
                    break;
                };
                if from == self.server
                    && bytes.len() >= 20
                    && bytes[0] & 0xC0 == 0
                    && bytes[4..20] == req[4..20]
                {
                    return Resp { bytes };
                }
            }
            if Instant::now() > deadline {
                panic!("no answer from {} within {REQUEST_WAIT:?}", self.server);
            }
        }
    }

    /// A request with credentials, doing the 401 round trip first when no nonce is known
    /// and again after 438 Stale Nonce. Answers to signed requests must carry a valid
    /// MESSAGE-INTEGRITY computed with the user's key.
    pub fn request(&mut self, method: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Resp {
        for _ in 0..3 {
            let signed = self.nonce.is_some();
            let r = self.transact(&self.build(method, &new_tid(), attrs));
            let code = r.code();
            if (code == Some(401) && !signed) || code == Some(438) {
                self.realm = r.get(attr::REALM);
                self.nonce = r.get(attr::NONCE);
                assert!(self.nonce.is_some(), "a {code:?} without NONCE");
                continue;
            }
            if signed && code != Some(401) {
                stun::verify_message_integrity(&r.msg(), &self.key())
                    .unwrap_or_else(|e| panic!("response MESSAGE-INTEGRITY: {e:?}"));
            }
            return r;
        }
        panic!("no final answer to method {method:#x} after three tries");
    }

    pub fn allocate_with(&mut self, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Resp {
        self.request(method::ALLOCATE, attrs)
    }

    /// Allocates a UDP relay and returns the relayed address.
    #[track_caller]
    pub fn allocate(&mut self) -> SocketAddr {
        let r = self.allocate_with(&udp_transport);
        assert!(r.is_success(), "Allocate failed: {:?}", r.code());
        r.xor(attr::XOR_RELAYED_ADDRESS)
            .unwrap_or_else(|| panic!("no XOR-RELAYED-ADDRESS"))
    }

    pub fn refresh(&mut self, lifetime: u32) -> Resp {
        self.request(method::REFRESH, &|w| {
            w.add_u32(attr::LIFETIME, lifetime)
                .unwrap_or_else(|e| panic!("{e}"))
        })
    }

    pub fn permit(&mut self, peers: &[SocketAddr]) -> Resp {
        self.request(method::CREATE_PERMISSION, &|w| {
            for p in peers {
                w.add_xor_address(attr::XOR_PEER_ADDRESS, *p)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        })
    }

    pub fn bind(&mut self, number: u16, peer: SocketAddr) -> Resp {
        self.request(method::CHANNEL_BIND, &|w| {
            let [a, b] = number.to_be_bytes();
            w.add_attribute(attr::CHANNEL_NUMBER, &[a, b, 0, 0])
                .unwrap_or_else(|e| panic!("{e}"));
            w.add_xor_address(attr::XOR_PEER_ADDRESS, peer)
                .unwrap_or_else(|e| panic!("{e}"));
        })
    }

    pub fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let mut buf = vec![0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Indication, method::SEND, &new_tid())
            .unwrap_or_else(|e| panic!("{e}"));
        w.add_xor_address(attr::XOR_PEER_ADDRESS, peer)
            .unwrap_or_else(|e| panic!("{e}"));
        w.add_attribute(attr::DATA, data)
            .unwrap_or_else(|e| panic!("{e}"));
        let n = w.finish();
        self.sock
            .send_to(&buf[..n], self.server)
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
    let m = Message::parse(bytes)
        .unwrap_or_else(|e| panic!("relayed datagram is neither ChannelData nor STUN: {e:?}"));
    assert_eq!(
        (m.class(), m.method()),
        (Class::Indication, method::DATA),
        "a Data indication"
    );
    let tid = m.transaction_id();
    let peer = m
        .get(attr::XOR_PEER_ADDRESS)
        .and_then(|v| attr::decode_xor_address(v, &tid).ok())
        .unwrap_or_else(|| panic!("Data indication without XOR-PEER-ADDRESS"));
    let data = m
        .get(attr::DATA)
        .unwrap_or_else(|| panic!("Data indication without DATA"))
        .to_vec();
    Relayed::Indication { peer, data }
}

pub fn udp_transport(w: &mut MessageWriter<'_>) {
    w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A UDP peer that sends every datagram back to where it came from, for at most a minute.
pub struct EchoPeer {
    pub addr: SocketAddr,
    pub echoed: Arc<AtomicUsize>,
    /// Sources the peer saw, in order.
    pub sources: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
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
        let sources = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, st) = (echoed.clone(), sources.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Some((bytes, from)) = recv_within(&sock, Duration::from_millis(50)) {
                    if sock.send_to(&bytes, from).is_ok() {
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut v) = s.lock() {
                        v.push(from);
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
        self.echoed.load(Ordering::Relaxed)
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

/// coturn's `turnutils_peer` (a UDP echo peer) on `addr`, killed on drop.
pub struct CoturnPeer {
    child: Child,
    pub addr: SocketAddr,
}

impl CoturnPeer {
    pub fn start(tool: &std::path::Path, addr: SocketAddr) -> CoturnPeer {
        let child = Command::new(tool)
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-L")
            .arg(addr.ip().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tool.display()));
        // Ready when it echoes.
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
        CoturnPeer { child, addr }
    }
}

impl Drop for CoturnPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `port` on `ip` can be bound again: the relay socket is closed.
pub fn port_becomes_free(ip: IpAddr, port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if UdpSocket::bind(SocketAddr::new(ip, port)).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
