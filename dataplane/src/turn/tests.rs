//! Sans-IO tests of TURN (RFC 8656) through [`Server::handle`], the entry point every driver
//! calls: each request, error response and timer, with a fake clock that the tests move
//! forward and a fake driver that records which relay sockets the core opens and closes.
//!
//! Nothing here sleeps, opens a socket or maps shared memory: relay sockets are fake handles,
//! counters are the core's own [`crate::server::Stats`], and relayed datagrams are checked
//! where the core says they lie in the buffer (`Action::Send`), exactly as a driver would
//! send them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_shared::addr::CidrList;
use portico_shared::config::{self, Config, PortRange};
use portico_shared::counters::Counter;
use portico_shared::shm::EventKind;

use super::policy::ipv6_encodings;
use super::{
    AllocationTable, Blacklist, ControlPlane, DefaultRoutes, Events, RelayIo, Reserved, TurnShared,
};
use crate::server::{Action, Now, Received, Server, Settings, Stats, Transport, HEADROOM};
use crate::stun::{self, attr, method, Class, Message, MessageWriter};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// Every worker buffer is this big (the drivers' `BUF_SIZE`); datagrams start at HEADROOM.
const BUF: usize = 2048;
/// A CIDR list for `turn.allow_peers` / `turn.deny_peers`.
fn cidrs(list: &[&str]) -> CidrList {
    CidrList::new(list.iter().map(|s| s.parse().unwrap()).collect())
}

/// Listen socket indices, in `turn.listen` order.
const LISTEN4: usize = 0;
const LISTEN6: usize = 1;
/// The first relay socket index: after the two listen sockets.
const FIRST_RELAY: usize = 2;
const REALM: &str = "example.org";

/// The base configuration of every test; tests change fields of the parsed `Config`.
/// The listen port is never bound (nothing here opens a listen socket).
const BASE: &str = r#"
[turn]
listen = ["127.0.0.1:40001", "[::1]:40001"]
relay_ip = ["127.0.0.1", "::1"]
realm = "example.org"
users = [
  { name = "alice", password = "secret" },
  { name = "bob", password = "hunter2" },
  { name = "carol", key = "CAROL_KEY" },
]
shared_secret = ["new", "old"]
error_rate = 1000
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A relay driver that binds nothing (the core only needs handles back) and remembers
/// everything: which addresses are "bound", which reservations are held.
#[derive(Default)]
struct FakeIo {
    next: usize,
    /// Open relay sockets: index -> bound address.
    live: HashMap<usize, SocketAddr>,
    opened: Vec<(usize, SocketAddr, bool)>,
    closed: Vec<usize>,
    reserved: Vec<SocketAddr>,
    /// Reservations not yet adopted or released: handle -> address.
    holding: HashMap<Reserved, SocketAddr>,
    released: Vec<SocketAddr>,
    adopted: Vec<(usize, SocketAddr)>,
    fail_ports: HashSet<u16>,
    fail_all: bool,
    /// Every IPv6 bind fails (a dual allocation's second relay cannot be had).
    fail_v6: bool,
    /// RFC 6062: listeners opened, and outgoing connections started (socket, peer).
    tcp_listeners: Vec<(usize, SocketAddr)>,
    connects: Vec<(usize, SocketAddr)>,
}

impl FakeIo {
    fn new() -> FakeIo {
        FakeIo {
            next: FIRST_RELAY,
            ..FakeIo::default()
        }
    }

    /// A port in use (open or reserved) cannot be bound again, as with real sockets.
    fn refuse(&self, addr: SocketAddr) -> bool {
        self.fail_all
            || (self.fail_v6 && addr.is_ipv6())
            || self.fail_ports.contains(&addr.port())
            || self.live.values().any(|a| *a == addr)
            || self.holding.values().any(|a| *a == addr)
    }
}

impl RelayIo for FakeIo {
    fn open(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<usize> {
        if self.refuse(addr) {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        let i = self.next;
        self.next += 1;
        self.live.insert(i, addr);
        self.opened.push((i, addr, dont_fragment));
        Ok(i)
    }

    fn reserve(&mut self, addr: SocketAddr) -> io::Result<Reserved> {
        if self.refuse(addr) {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        self.reserved.push(addr);
        let r = Reserved(1000 + self.reserved.len() as u64);
        self.holding.insert(r, addr);
        Ok(r)
    }

    fn adopt(&mut self, reserved: Reserved, _dont_fragment: bool) -> io::Result<usize> {
        let addr = self
            .holding
            .remove(&reserved)
            .unwrap_or_else(|| panic!("the core adopted {reserved:?}, which is not held"));
        let i = self.next;
        self.next += 1;
        self.live.insert(i, addr);
        self.adopted.push((i, addr));
        Ok(i)
    }

    fn release(&mut self, reserved: Reserved) {
        let addr = self
            .holding
            .remove(&reserved)
            .unwrap_or_else(|| panic!("the core released {reserved:?}, which is not held"));
        self.released.push(addr);
    }

    fn listen_tcp(&mut self, addr: SocketAddr) -> io::Result<usize> {
        let i = self.open(addr, false)?;
        self.tcp_listeners.push((i, addr));
        Ok(i)
    }

    fn connect_tcp(&mut self, relay: usize, peer: SocketAddr) -> io::Result<usize> {
        assert!(
            self.tcp_listeners.iter().any(|(i, _)| *i == relay),
            "a connection from {relay}, which is not a TCP relay"
        );
        let i = self.next;
        self.next += 1;
        self.live.insert(i, peer);
        self.connects.push((i, peer));
        Ok(i)
    }

    fn close(&mut self, socket: usize) {
        assert!(
            self.live.remove(&socket).is_some(),
            "the core closed relay socket {socket}, which is not open"
        );
        self.closed.push(socket);
    }
}

/// What the core told the control plane, recorded by fake roles the tests keep a handle on.
#[derive(Default)]
struct Heard {
    events: Vec<(EventKind, IpAddr)>,
    published: Vec<u64>,
    removed: Vec<u64>,
    /// Delete requests the control plane has pending, and those the core acknowledged.
    deletes: Vec<u64>,
    deleted: Vec<u64>,
    blocked: HashSet<IpAddr>,
    blacklist_generation: u64,
}

#[derive(Clone, Default)]
struct FakeControl(Rc<RefCell<Heard>>);

impl AllocationTable for FakeControl {
    fn publish(&mut self, a: &super::allocation::Allocation, _: Now) {
        self.0.borrow_mut().published.push(a.id);
    }
    fn remove(&mut self, id: u64) {
        self.0.borrow_mut().removed.push(id);
    }
    fn deletes(&mut self, out: &mut Vec<u64>) {
        out.extend(self.0.borrow().deletes.iter().copied());
    }
    fn deleted(&mut self, id: u64) {
        let mut h = self.0.borrow_mut();
        h.deletes.retain(|d| *d != id);
        h.deleted.push(id);
    }
}

impl Blacklist for FakeControl {
    fn blocked(&self, ip: IpAddr, _: u64) -> bool {
        self.0.borrow().blocked.contains(&ip)
    }
    fn generation(&self) -> u64 {
        self.0.borrow().blacklist_generation
    }
}

impl Events for FakeControl {
    fn report(&mut self, kind: EventKind, ip: IpAddr, _: u64) {
        self.0.borrow_mut().events.push((kind, ip));
    }
}

/// What the server asked the driver to send.
#[derive(Clone, Debug)]
struct Out {
    bytes: Vec<u8>,
    offset: usize,
    socket: usize,
    to: SocketAddr,
}

impl Out {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).unwrap_or_else(|e| panic!("not a STUN message: {e:?}"))
    }

    fn class(&self) -> Class {
        self.msg().class()
    }

    fn code(&self) -> Option<u16> {
        self.msg()
            .get(attr::ERROR_CODE)
            .map(|v| attr::decode_error_code(v).unwrap().0)
    }

    fn get(&self, typ: u16) -> Option<Vec<u8>> {
        self.msg().get(typ).map(<[u8]>::to_vec)
    }

    fn xor(&self, typ: u16) -> Option<SocketAddr> {
        let m = self.msg();
        m.get(typ)
            .map(|v| attr::decode_xor_address(v, &m.transaction_id()).unwrap())
    }

    /// Every XOR-RELAYED-ADDRESS, in order (a dual allocation has two).
    fn relayed(&self) -> Vec<SocketAddr> {
        let m = self.msg();
        let tid = m.transaction_id();
        m.attributes()
            .filter(|a| a.typ == attr::XOR_RELAYED_ADDRESS)
            .map(|a| attr::decode_xor_address(a.value, &tid).unwrap())
            .collect()
    }

    /// ADDRESS-ERROR-CODE as (family, code).
    fn address_error(&self) -> Option<(u8, u16)> {
        self.get(attr::ADDRESS_ERROR_CODE)
            .map(|e| (e[0], u16::from(e[2] & 7) * 100 + u16::from(e[3])))
    }

    fn lifetime(&self) -> Option<u32> {
        self.get(attr::LIFETIME)
            .map(|v| attr::decode_u32(&v).unwrap())
    }

    fn is_success(&self) -> bool {
        self.class() == Class::SuccessResponse
    }

    #[track_caller]
    fn expect_error(&self, code: u16) {
        assert_eq!(self.class(), Class::ErrorResponse, "expected error {code}");
        assert_eq!(self.code(), Some(code));
    }
}

struct H {
    server: Server,
    io: FakeIo,
    control: FakeControl,
    base: Now,
    elapsed: Duration,
    shared: Arc<TurnShared>,
}

impl H {
    fn new() -> H {
        H::with(|_| {})
    }

    /// A server on the base configuration as changed by `f`.
    fn with(f: impl FnOnce(&mut Config)) -> H {
        let carol_key = hex(&stun::long_term_key_md5(
            b"carol",
            REALM.as_bytes(),
            b"c4r0l",
        ));
        let mut config = Config::from_toml(&BASE.replace("CAROL_KEY", &carol_key)).unwrap();
        f(&mut config);
        config.validate().unwrap();
        let settings = Arc::new(Settings::from_config(
            &config,
            &[7u8; 32],
            &DefaultRoutes::default(),
        ));
        assert_eq!(settings.endpoints.len(), FIRST_RELAY);
        let shared = Arc::new(TurnShared::new(0x5eed));
        let control = FakeControl::default();
        let links = ControlPlane {
            allocations: Box::new(control.clone()),
            blacklist: Box::new(control.clone()),
            events: Box::new(control.clone()),
        };
        H {
            server: Server::new(settings, Arc::clone(&shared), &[0x5e; 32], links),
            io: FakeIo::new(),
            control,
            base: Now {
                mono: Instant::now(),
                unix: 1_800_000_000,
            },
            elapsed: Duration::ZERO,
            shared,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.base.mono + self.elapsed,
            unix: self.base.unix + self.elapsed.as_secs(),
        }
    }

    fn advance(&mut self, secs: u64) {
        self.elapsed += Duration::from_secs(secs);
    }

    fn advance_ms(&mut self, ms: u64) {
        self.elapsed += Duration::from_millis(ms);
    }

    fn stats(&self) -> &Stats {
        self.server.stats()
    }

    fn heard(&self) -> std::cell::Ref<'_, Heard> {
        self.control.0.borrow()
    }

    fn stat(&self, c: Counter) -> u64 {
        self.stats().get(c)
    }

    fn tick(&mut self) {
        let now = self.now();
        self.server.tick(now, &mut self.io);
    }

    /// Advances the clock and runs the timers, as a driver's loop would.
    fn advance_and_tick(&mut self, secs: u64) {
        self.advance(secs);
        self.tick();
    }

    /// Hands `datagram`, received on `socket` from `from`, to the server the way the drivers
    /// do: in a buffer of the drivers' size, after HEADROOM free bytes.
    fn recv(&mut self, socket: usize, from: SocketAddr, datagram: &[u8]) -> Option<Out> {
        let mut buf = vec![0xEEu8; BUF];
        buf[HEADROOM..HEADROOM + datagram.len()].copy_from_slice(datagram);
        let now = self.now();
        let rx = Received {
            transport: Transport::Udp,
            socket,
            from,
            buf: &mut buf,
            start: HEADROOM,
            len: datagram.len(),
        };
        let action = self.server.handle(now, &mut self.io, rx);
        match action {
            Action::Drop => None,
            Action::Send {
                offset,
                len,
                socket,
                to,
            } => Some(Out {
                bytes: buf[offset..offset + len].to_vec(),
                offset,
                socket,
                to,
            }),
        }
    }

    /// A message framed from stream connection `conn` (TCP), as the stream driver hands it.
    fn recv_stream(&mut self, conn: usize, from: SocketAddr, msg: &[u8]) -> Option<Out> {
        let mut buf = vec![0xEEu8; BUF];
        buf[HEADROOM..HEADROOM + msg.len()].copy_from_slice(msg);
        let now = self.now();
        let rx = Received {
            transport: Transport::Tcp,
            socket: LISTEN4,
            from,
            buf: &mut buf,
            start: HEADROOM,
            len: msg.len(),
        };
        match self.server.handle_stream(now, &mut self.io, rx, conn) {
            Action::Drop => None,
            Action::Send {
                offset,
                len,
                socket,
                to,
            } => Some(Out {
                bytes: buf[offset..offset + len].to_vec(),
                offset,
                socket,
                to,
            }),
        }
    }

    fn tcp_events(&mut self) -> Vec<crate::turn::TcpEvent> {
        let mut v = Vec::new();
        self.server.take_tcp_events(&mut v);
        v
    }

    /// A datagram from `peer` arriving on relay socket `relay`.
    fn peer_sends(&mut self, relay: usize, peer: SocketAddr, data: &[u8]) -> Option<Out> {
        self.recv(relay, peer, data)
    }

    fn client(&self, addr: &str, user: &str, password: &str) -> Client {
        Client::new(sa(addr), user, password)
    }

    /// The relay socket index bound (or adopted) for a relayed port.
    fn relay_socket(&self, port: u16) -> usize {
        let mut found = self.io.live.iter().filter(|(_, a)| a.port() == port);
        let (i, _) = found
            .next()
            .unwrap_or_else(|| panic!("no relay socket on port {port}"));
        *i
    }

    fn allocations(&self) -> usize {
        self.server.turn().table().len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    /// RFC 5389 style: USERNAME, MD5 key, MESSAGE-INTEGRITY.
    Md5,
    /// RFC 8489: PASSWORD-ALGORITHMS echoed, PASSWORD-ALGORITHM SHA-256,
    /// MESSAGE-INTEGRITY-SHA256.
    Sha256,
    /// As `Sha256`, with USERHASH instead of USERNAME.
    UserHash,
}

type Attrs<'a> = &'a dyn Fn(&mut MessageWriter<'_>);

fn no_attrs(_: &mut MessageWriter<'_>) {}

/// A TURN client on one 5-tuple (source address, listen socket).
struct Client {
    addr: SocketAddr,
    socket: usize,
    user: String,
    password: String,
    auth: Auth,
    realm: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    algorithms: Option<Vec<u8>>,
    /// Over a stream connection of this index (else UDP on `socket`).
    conn: Option<usize>,
}

fn new_tid() -> [u8; 12] {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut t = [0x5au8; 12];
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

impl Client {
    fn new(addr: SocketAddr, user: &str, password: &str) -> Client {
        Client {
            addr,
            socket: if addr.is_ipv4() { LISTEN4 } else { LISTEN6 },
            user: user.into(),
            password: password.into(),
            auth: Auth::Md5,
            realm: None,
            nonce: None,
            algorithms: None,
            conn: None,
        }
    }

    /// The same client over stream connection `conn` (the stream driver's index for it).
    fn over_stream(mut self, conn: usize) -> Client {
        self.conn = Some(conn);
        self
    }

    fn auth(mut self, auth: Auth) -> Client {
        self.auth = auth;
        self
    }

    fn key(&self) -> Vec<u8> {
        let realm = self.realm.as_deref().unwrap_or(REALM.as_bytes());
        match self.auth {
            Auth::Md5 => {
                stun::long_term_key_md5(self.user.as_bytes(), realm, self.password.as_bytes())
                    .to_vec()
            }
            Auth::Sha256 | Auth::UserHash => {
                stun::long_term_key_sha256(self.user.as_bytes(), realm, self.password.as_bytes())
                    .to_vec()
            }
        }
    }

    /// The request bytes, signed when a nonce is known.
    fn build(&self, method: u16, tid: &[u8; 12], attrs: Attrs<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, Class::Request, method, tid).unwrap();
        attrs(&mut w);
        if let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
            if self.auth == Auth::UserHash {
                let h = stun::userhash(self.user.as_bytes(), realm);
                w.add_attribute(attr::USERHASH, &h).unwrap();
            } else {
                w.add_attribute(attr::USERNAME, self.user.as_bytes())
                    .unwrap();
            }
            w.add_attribute(attr::REALM, realm).unwrap();
            w.add_attribute(attr::NONCE, nonce).unwrap();
            if self.auth != Auth::Md5 {
                let offered = self.algorithms.as_deref().expect("PASSWORD-ALGORITHMS");
                w.add_attribute(attr::PASSWORD_ALGORITHMS, offered).unwrap();
                w.add_password_algorithm(stun::integrity::ALGORITHM_SHA256)
                    .unwrap();
                w.add_message_integrity_sha256(&self.key()).unwrap();
            } else {
                w.add_message_integrity(&self.key()).unwrap();
            }
        }
        w.add_fingerprint().unwrap();
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    /// Takes REALM, NONCE and PASSWORD-ALGORITHMS from a 401 or 438.
    fn learn(&mut self, r: &Out) {
        self.realm = r.get(attr::REALM);
        self.nonce = r.get(attr::NONCE);
        self.algorithms = r.get(attr::PASSWORD_ALGORITHMS);
    }

    /// Sends one request as is; the raw answer.
    fn send_raw(&self, h: &mut H, bytes: &[u8]) -> Option<Out> {
        match self.conn {
            Some(conn) => h.recv_stream(conn, self.addr, bytes),
            None => h.recv(self.socket, self.addr, bytes),
        }
    }

    /// A request with credentials: the 401 round trip first if no nonce is known yet, and
    /// again on 438 Stale Nonce, as a client does. Checks that the answer goes back to the
    /// client from the socket the request came in on, with the same transaction id.
    fn request(&mut self, h: &mut H, method: u16, attrs: Attrs<'_>) -> Out {
        for _ in 0..3 {
            let tid = new_tid();
            let req = self.build(method, &tid, attrs);
            let r = self
                .send_raw(h, &req)
                .unwrap_or_else(|| panic!("no answer to method {method:#x}"));
            assert_eq!(r.to, self.addr);
            assert_eq!(r.socket, self.conn.unwrap_or(self.socket));
            assert_eq!(
                r.offset, 0,
                "responses are written at the start of the buffer"
            );
            assert_eq!(r.msg().transaction_id(), tid);
            assert_eq!(r.msg().method(), method);
            let again =
                matches!(r.code(), Some(401) if self.nonce.is_none()) || r.code() == Some(438);
            if again {
                self.learn(&r);
                continue;
            }
            if r.class() == Class::SuccessResponse || r.code().is_some_and(|c| c != 401) {
                self.check_integrity(&r);
            }
            return r;
        }
        panic!("no final answer after three tries");
    }

    /// Responses to authenticated requests carry the integrity attribute the request used,
    /// computed with the user's key, and a valid FINGERPRINT last.
    #[track_caller]
    fn check_integrity(&self, r: &Out) {
        let m = r.msg();
        match self.auth {
            Auth::Md5 => {
                stun::verify_message_integrity(&m, &self.key()).expect("MESSAGE-INTEGRITY");
                assert!(m.message_integrity_sha256_offset().is_none());
            }
            Auth::Sha256 | Auth::UserHash => {
                stun::verify_message_integrity_sha256(&m, &self.key())
                    .expect("MESSAGE-INTEGRITY-SHA256");
                assert!(m.message_integrity_offset().is_none());
            }
        }
        check_fingerprint(&r.bytes);
    }

    fn allocate_with(&mut self, h: &mut H, attrs: Attrs<'_>) -> Out {
        self.request(h, method::ALLOCATE, attrs)
    }

    /// Allocates a UDP relay; returns the relayed address and its relay socket index.
    #[track_caller]
    fn allocate(&mut self, h: &mut H) -> (SocketAddr, usize) {
        let r = self.allocate_with(h, &udp);
        assert!(r.is_success(), "Allocate failed: {:?}", r.code());
        let relayed = r
            .xor(attr::XOR_RELAYED_ADDRESS)
            .expect("XOR-RELAYED-ADDRESS");
        (relayed, h.relay_socket(relayed.port()))
    }

    fn refresh(&mut self, h: &mut H, lifetime: Option<u32>) -> Out {
        self.request(h, method::REFRESH, &move |w| {
            if let Some(l) = lifetime {
                w.add_u32(attr::LIFETIME, l).unwrap();
            }
        })
    }

    fn permit(&mut self, h: &mut H, peers: &[SocketAddr]) -> Out {
        let peers = peers.to_vec();
        self.request(h, method::CREATE_PERMISSION, &move |w| {
            for p in &peers {
                w.add_xor_address(attr::XOR_PEER_ADDRESS, *p).unwrap();
            }
        })
    }

    fn bind(&mut self, h: &mut H, number: u16, peer: SocketAddr) -> Out {
        self.request(h, method::CHANNEL_BIND, &move |w| {
            w.add_attribute(
                attr::CHANNEL_NUMBER,
                &[(number >> 8) as u8, number as u8, 0, 0],
            )
            .unwrap();
            w.add_xor_address(attr::XOR_PEER_ADDRESS, peer).unwrap();
        })
    }

    /// A Send indication (never authenticated).
    fn send_indication(&self, h: &mut H, peer: SocketAddr, data: &[u8]) -> Option<Out> {
        let mut buf = vec![0u8; 1500];
        let mut w =
            MessageWriter::new(&mut buf, Class::Indication, method::SEND, &new_tid()).unwrap();
        w.add_xor_address(attr::XOR_PEER_ADDRESS, peer).unwrap();
        w.add_attribute(attr::DATA, data).unwrap();
        let n = w.finish();
        h.recv(self.socket, self.addr, &buf[..n])
    }

    /// A ChannelData message with `pad` bytes after the data.
    fn channel_data(&self, h: &mut H, number: u16, data: &[u8], pad: usize) -> Option<Out> {
        let mut m = number.to_be_bytes().to_vec();
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
        m.extend(std::iter::repeat_n(0u8, pad));
        h.recv(self.socket, self.addr, &m)
    }
}

fn udp(w: &mut MessageWriter<'_>) {
    w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .unwrap();
}

#[track_caller]
fn check_fingerprint(bytes: &[u8]) {
    let m = Message::parse(bytes).unwrap();
    let at = m.fingerprint_offset().expect("FINGERPRINT");
    assert_eq!(at + 8, bytes.len(), "FINGERPRINT is the last attribute");
    let want = stun::crc32(&bytes[..at]) ^ stun::FINGERPRINT_XOR;
    assert_eq!(bytes[at + 4..at + 8], want.to_be_bytes());
}

/// base64(HMAC-SHA1(secret, username)), computed here independently of the server's
/// [`super::auth::rest_password`].
fn rest_password(secret: &str, username: &str) -> String {
    use aws_lc_rs::hmac;
    use base64::Engine as _;
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes()),
        username.as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

const PEER1: &str = "8.8.8.8:5000";
const PEER2: &str = "1.1.1.1:6000";
const PEER3: &str = "9.9.9.9:7000";
const PEER6: &str = "[2a00:1450::1]:5000";

// ---------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------

#[test]
fn unauthenticated_allocate_gets_a_401_challenge_with_realm_nonce_and_algorithms() {
    let mut h = H::new();
    let c = h.client("198.51.100.7:5000", "alice", "secret");
    let tid = new_tid();
    let req = c.build(method::ALLOCATE, &tid, &udp);
    let r = c.send_raw(&mut h, &req).expect("a challenge");
    r.expect_error(401);
    assert_eq!(r.msg().method(), method::ALLOCATE);
    assert_eq!(r.msg().transaction_id(), tid);
    assert_eq!(r.get(attr::REALM).as_deref(), Some(REALM.as_bytes()));
    let nonce = r.get(attr::NONCE).expect("NONCE");
    // RFC 8489 §9.2: the nonce cookie announcing password algorithms and username anonymity.
    assert!(nonce.starts_with(b"obMatJos2"), "{nonce:?}");
    assert_eq!(
        r.get(attr::PASSWORD_ALGORITHMS).as_deref(),
        Some(&[0, 2, 0, 0, 0, 1, 0, 0][..]),
        "SHA-256 then MD5"
    );
    // Nothing to sign with yet: no integrity on a challenge.
    assert!(r.msg().message_integrity_offset().is_none());
    assert!(r.msg().message_integrity_sha256_offset().is_none());
    assert!(r.get(attr::SOFTWARE).is_some());
    check_fingerprint(&r.bytes);
    assert_eq!(h.stat(Counter::TurnChallenges), 1);
    assert!(h.io.opened.is_empty());
    assert_eq!(h.allocations(), 0);

    // Nonces are unpredictable enough to differ between clients and are bound to the IP.
    let c2 = h.client("198.51.100.8:5000", "alice", "secret");
    let r2 = c2.send_raw(&mut h, &c2.build(method::ALLOCATE, &new_tid(), &udp));
    assert_ne!(r2.unwrap().get(attr::NONCE).unwrap(), nonce);
}

#[test]
fn allocate_success_carries_relayed_lifetime_mapped_integrity_and_fingerprint() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &udp);
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.xor(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!((16384..=32767).contains(&relayed.port()), "{relayed}");
    assert_eq!(r.lifetime(), Some(600));
    assert_eq!(r.xor(attr::XOR_MAPPED_ADDRESS), Some(c.addr));
    // Integrity with alice's key (checked in `request`), and not with another key.
    let wrong = stun::long_term_key_md5(b"alice", REALM.as_bytes(), b"nope");
    assert!(stun::verify_message_integrity(&r.msg(), &wrong).is_err());
    check_fingerprint(&r.bytes);
    assert!(r.get(attr::RESERVATION_TOKEN).is_none());

    assert_eq!(h.io.opened.len(), 1);
    assert_eq!(h.io.opened[0].1, relayed);
    assert!(!h.io.opened[0].2, "no DONT-FRAGMENT asked");
    assert_eq!(h.allocations(), 1);
    assert_eq!(h.stat(Counter::TurnAllocationsCreated), 1);
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 1);
    assert_eq!(h.stat(Counter::TurnRequestsOk), 1);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 1);
}

#[test]
fn allocate_with_sha256_and_with_userhash() {
    for auth in [Auth::Sha256, Auth::UserHash] {
        let mut h = H::new();
        let mut c = h.client("198.51.100.7:5000", "alice", "secret").auth(auth);
        // `request` checks MESSAGE-INTEGRITY-SHA256 with the SHA-256 key and no SHA-1 MI.
        let r = c.allocate_with(&mut h, &udp);
        assert!(r.is_success(), "{auth:?}: {:?}", r.code());
        assert!(r.msg().message_integrity_sha256_offset().is_some());
        // USERHASH is resolved to the user: the per-user quota counts "alice".
        let per_user = h.shared.per_user.lock().unwrap();
        assert_eq!(per_user.get("alice"), Some(&1), "{auth:?}");
    }
}

#[test]
fn sha256_without_the_echoed_algorithm_list_is_a_bid_down_400() {
    let mut h = H::new();
    let mut c = h
        .client("198.51.100.7:5000", "alice", "secret")
        .auth(Auth::Sha256);
    let r = c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &udp));
    c.learn(&r.unwrap());
    // An attacker stripped SHA-256 from the list: the echoed list no longer matches.
    c.algorithms = Some(vec![0, 1, 0, 0]);
    let r = c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &udp));
    r.unwrap().expect_error(400);
    assert_eq!(h.allocations(), 0);
}

#[test]
fn stale_nonce_438_after_the_nonce_lifetime_then_a_fresh_nonce_works() {
    let mut h = H::with(|c| {
        c.turn.nonce_lifetime = config::Duration::from_secs(60);
        c.turn.default_lifetime = config::Duration::from_secs(3600);
    });
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    let old = c.nonce.clone().unwrap();
    h.advance(61);
    // Sign a Refresh with the old nonce by hand to see the 438 itself.
    let r = c
        .send_raw(&mut h, &c.build(method::REFRESH, &new_tid(), &no_attrs))
        .unwrap();
    r.expect_error(438);
    let fresh = r.get(attr::NONCE).expect("a fresh NONCE with the 438");
    assert_ne!(fresh, old);
    assert_eq!(r.get(attr::REALM).as_deref(), Some(REALM.as_bytes()));
    assert_eq!(h.stat(Counter::TurnAuthStaleNonce), 1);
    // The allocation is untouched, and the new nonce works.
    assert_eq!(h.allocations(), 1);
    let r = c.refresh(&mut h, None);
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(r.lifetime(), Some(3600));
}

#[test]
fn a_nonce_is_bound_to_the_client_ip() {
    let mut h = H::new();
    let mut a = h.client("198.51.100.7:5000", "alice", "secret");
    a.allocate(&mut h);
    let mut b = h.client("198.51.100.99:5000", "alice", "secret");
    b.realm = a.realm.clone();
    b.nonce = a.nonce.clone();
    let r = b.send_raw(&mut h, &b.build(method::ALLOCATE, &new_tid(), &udp));
    r.unwrap().expect_error(438);
}

#[test]
fn wrong_password_is_401_with_no_allocation() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "wrong");
    let r = c.allocate_with(&mut h, &udp);
    r.expect_error(401);
    // A fresh challenge, and no integrity (the server cannot know the client's key).
    assert!(r.get(attr::NONCE).is_some());
    assert!(r.msg().message_integrity_offset().is_none());
    assert_eq!(h.stat(Counter::TurnAuthBadIntegrity), 1);
    assert_eq!(h.allocations(), 0);
    assert!(h.io.opened.is_empty());
}

#[test]
fn unknown_user_is_401() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "mallory", "secret");
    c.allocate_with(&mut h, &udp).expect_error(401);
    assert_eq!(h.stat(Counter::TurnAuthUnknownUser), 1);
    assert_eq!(h.allocations(), 0);
    // A user name that looks like a REST credential but is signed with no known secret.
    let mut c = h.client("198.51.100.8:5000", "9999999999:mallory", "secret");
    c.allocate_with(&mut h, &udp).expect_error(401);
    assert_eq!(h.allocations(), 0);
}

#[test]
fn user_configured_by_ha1_key_allocates() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "carol", "c4r0l");
    c.allocate(&mut h);
    // An HA1 key cannot give the SHA-256 key: such a user must stay on MD5.
    let mut c = h
        .client("198.51.100.8:5000", "carol", "c4r0l")
        .auth(Auth::Sha256);
    c.allocate_with(&mut h, &udp).expect_error(401);
}

#[test]
fn rest_api_credentials_valid_rolled_over_wrong_secret_and_expired() {
    let mut h = H::new();
    let unix = h.now().unix;
    let user = format!("{}:dave", unix + 3600);
    // Signed with the current secret, then with the previous one (rollover).
    for (i, secret) in ["new", "old"].into_iter().enumerate() {
        let mut c = h.client(&format!("198.51.100.{}:5000", 10 + i), &user, "");
        c.password = rest_password(secret, &user);
        c.allocate(&mut h);
    }
    // With a secret the server does not have.
    let mut c = h.client("198.51.100.20:5000", &user, "");
    c.password = rest_password("other", &user);
    c.allocate_with(&mut h, &udp).expect_error(401);
    // Already expired.
    let old = format!("{}:dave", unix - 1);
    let mut c = h.client("198.51.100.21:5000", &old, "");
    c.password = rest_password("new", &old);
    c.allocate_with(&mut h, &udp).expect_error(401);
    assert_eq!(h.stat(Counter::TurnAuthExpired), 1);
    assert_eq!(h.allocations(), 2);
}

#[test]
fn rest_credential_that_expires_during_the_allocation_cannot_refresh_it() {
    let mut h = H::new();
    let user = format!("{}:erin", h.now().unix + 100);
    let mut c = h.client("198.51.100.7:5000", &user, "");
    c.password = rest_password("new", &user);
    c.allocate(&mut h);
    h.advance(101);
    c.refresh(&mut h, None).expect_error(401);
    assert_eq!(h.stat(Counter::TurnAuthExpired), 1);
}

// ---------------------------------------------------------------------------------------
// Allocate errors and quotas
// ---------------------------------------------------------------------------------------

#[test]
fn allocate_without_requested_transport_is_400() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate_with(&mut h, &no_attrs).expect_error(400);
    assert!(h.io.opened.is_empty());
    assert_eq!(h.stat(Counter::TurnRequestsError), 1);
}

#[test]
fn allocate_for_tcp_over_udp_is_400_and_other_transports_442() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    // RFC 6062 §5.1: a TCP relay is only for a client over TCP or TLS.
    let r = c.allocate_with(&mut h, &|w| {
        w.add_attribute(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])
            .unwrap();
    });
    r.expect_error(400);
    let r = c.allocate_with(&mut h, &|w| {
        w.add_attribute(attr::REQUESTED_TRANSPORT, &[132, 0, 0, 0])
            .unwrap();
    });
    r.expect_error(442);
    assert!(h.io.opened.is_empty());
}

#[test]
fn ipv6_relay_when_the_server_has_none_is_440() {
    let mut h = H::with(|c| {
        c.turn.listen = vec![sa("127.0.0.1:40001"), sa("127.0.0.1:40002")];
        c.turn.relay_ip = vec!["127.0.0.1".parse().unwrap()];
    });
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            .unwrap();
    });
    r.expect_error(440);
    assert!(h.io.opened.is_empty());
    assert_eq!(
        h.shared.allocations.load(Ordering::Relaxed),
        0,
        "quota given back"
    );
}

/// RFC 8656 §7.2: a family the server does not support is 440; the core's own `allocate`
/// means to answer 440 for any family other than 0x01/0x02.
#[test]
fn unknown_requested_address_family_is_440() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0])
            .unwrap();
    });
    r.expect_error(440);
}

#[test]
fn ipv6_allocation_relays_on_the_ipv6_address() {
    let mut h = H::new();
    let mut c = h.client("[2001:db8::7]:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            .unwrap();
    });
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.xor(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(relayed.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(r.xor(attr::XOR_MAPPED_ADDRESS), Some(c.addr));
    // An IPv4 peer on an IPv6 relay: 443.
    c.permit(&mut h, &[sa(PEER1)]).expect_error(443);
    assert!(c.permit(&mut h, &[sa(PEER6)]).is_success());
}

fn dual(w: &mut MessageWriter<'_>) {
    udp(w);
    w.add_attribute(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0])
        .unwrap();
}

fn family(w: &mut MessageWriter<'_>, f: u8) {
    w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[f, 0, 0, 0])
        .unwrap();
}

/// RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY IPv6 without REQUESTED-ADDRESS-FAMILY gets an
/// IPv4 and an IPv6 relayed address, two XOR-RELAYED-ADDRESS attributes; each peer is
/// reached from the relay of its family, and its data comes back to the one client.
#[test]
fn dual_allocation_gives_an_ipv4_and_an_ipv6_relayed_address() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &dual);
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    assert_eq!(relayed[0].ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(relayed[1].ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(r.address_error(), None);
    assert_eq!(h.io.opened.len(), 2);
    assert_eq!(h.allocations(), 1, "one allocation, two relays");
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 1);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 1);
    let (relay4, relay6) = (
        h.relay_socket(relayed[0].port()),
        h.relay_socket(relayed[1].port()),
    );
    // Permissions of both families in one request; channels of both families.
    assert!(c.permit(&mut h, &[sa(PEER1), sa(PEER6)]).is_success());
    assert!(c.bind(&mut h, 0x4000, sa(PEER2)).is_success());
    let peer6b = sa("[2a00:1450::2]:6000");
    assert!(c.bind(&mut h, 0x4001, peer6b).is_success());
    // Out: each from the relay of the peer's family.
    let out = c.send_indication(&mut h, sa(PEER1), b"to v4").unwrap();
    assert_eq!((out.socket, out.to), (relay4, sa(PEER1)));
    let out = c.send_indication(&mut h, sa(PEER6), b"to v6").unwrap();
    assert_eq!((out.socket, out.to), (relay6, sa(PEER6)));
    assert_eq!(out.bytes, b"to v6");
    let out = c.channel_data(&mut h, 0x4000, b"ch4", 1).unwrap();
    assert_eq!((out.socket, out.to), (relay4, sa(PEER2)));
    let out = c.channel_data(&mut h, 0x4001, b"ch6", 1).unwrap();
    assert_eq!((out.socket, out.to), (relay6, peer6b));
    // Back: both relays lead to the client on its IPv4 listen socket.
    let out = h.peer_sends(relay6, sa(PEER6), b"from v6").unwrap();
    assert_eq!((out.socket, out.to), (LISTEN4, c.addr));
    assert_eq!(
        parse_data_indication(&out),
        (sa(PEER6), b"from v6".to_vec())
    );
    let out = h.peer_sends(relay4, sa(PEER1), b"from v4").unwrap();
    assert_eq!(
        parse_data_indication(&out),
        (sa(PEER1), b"from v4".to_vec())
    );
    let out = h.peer_sends(relay6, peer6b, b"chan").unwrap();
    assert_eq!(&out.bytes[..2], &0x4001u16.to_be_bytes());
    // Deleting the allocation closes both relay sockets.
    assert!(c.refresh(&mut h, Some(0)).is_success());
    let mut closed = h.io.closed.clone();
    closed.sort();
    assert_eq!(closed, vec![relay4, relay6]);
    assert!(h.peer_sends(relay6, sa(PEER6), b"late").is_none());
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
}

/// RFC 8656 §7.2: a server without an IPv6 relay address allocates the IPv4 relay and says
/// 440 for IPv6 in ADDRESS-ERROR-CODE; IPv6 peers are then a family mismatch.
#[test]
fn dual_allocation_without_an_ipv6_relay_address_keeps_ipv4_and_says_440() {
    let mut h = H::with(|c| {
        c.turn.listen = vec![sa("127.0.0.1:40001"), sa("127.0.0.1:40002")];
        c.turn.relay_ip = vec!["127.0.0.1".parse().unwrap()];
    });
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &dual);
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    assert_eq!(relayed.len(), 1);
    assert!(relayed[0].is_ipv4());
    assert_eq!(r.address_error(), Some((2, 440)));
    assert_eq!(h.io.opened.len(), 1);
    c.permit(&mut h, &[sa(PEER6)]).expect_error(443);
    assert!(c.permit(&mut h, &[sa(PEER1)]).is_success());
}

/// No IPv6 port can be bound: the IPv4 allocation stands, ADDRESS-ERROR-CODE says 508.
#[test]
fn dual_allocation_without_a_free_ipv6_port_keeps_ipv4_and_says_508() {
    let mut h = H::new();
    h.io.fail_v6 = true;
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &dual);
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(r.relayed().len(), 1);
    assert_eq!(r.address_error(), Some((2, 508)));
    assert_eq!(h.io.live.len(), 1);
    assert_eq!(h.allocations(), 1);
}

/// RFC 8656 §7.2: with no REQUESTED-ADDRESS-FAMILY the relay is IPv4, so a server with
/// IPv6 relays only answers 440, as it does to REQUESTED-ADDRESS-FAMILY IPv4; nothing is
/// opened and no quota kept.
#[test]
fn ipv4_relay_when_the_server_has_only_ipv6_is_440() {
    let mut h = H::with(|c| {
        c.turn.listen = vec![sa("[::1]:40001"), sa("[::1]:40002")];
        c.turn.relay_ip = vec!["::1".parse().unwrap()];
    });
    let mut c = Client::new(sa("[2001:db8::7]:5000"), "alice", "secret");
    c.socket = LISTEN4;
    c.allocate_with(&mut h, &udp).expect_error(440);
    c.allocate_with(&mut h, &|w| {
        udp(w);
        family(w, 1);
    })
    .expect_error(440);
    c.allocate_with(&mut h, &dual).expect_error(440);
    assert!(h.io.opened.is_empty());
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
    // IPv6 itself is served.
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        family(w, 2);
    });
    assert!(r.is_success(), "{:?}", r.code());
    assert!(r.relayed()[0].is_ipv6());
}

/// RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY only names IPv6 and never comes with
/// REQUESTED-ADDRESS-FAMILY (nor with RESERVATION-TOKEN, a one-socket reservation): 400,
/// with nothing opened.
#[test]
fn additional_family_rules_are_400() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    for f in [1u8, 2] {
        c.allocate_with(&mut h, &|w| {
            dual(w);
            family(w, f);
        })
        .expect_error(400);
    }
    for f in [1u8, 3] {
        c.allocate_with(&mut h, &|w| {
            udp(w);
            w.add_attribute(attr::ADDITIONAL_ADDRESS_FAMILY, &[f, 0, 0, 0])
                .unwrap();
        })
        .expect_error(400);
    }
    c.allocate_with(&mut h, &|w| {
        dual(w);
        w.add_attribute(attr::RESERVATION_TOKEN, &[1; 8]).unwrap();
    })
    .expect_error(400);
    assert!(h.io.opened.is_empty());
    assert_eq!(h.allocations(), 0);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
}

#[test]
fn retransmitted_dual_allocate_repeats_both_addresses_and_the_address_error() {
    for v6 in [true, false] {
        let mut h = H::with(|c| {
            if !v6 {
                c.turn.listen = vec![sa("127.0.0.1:40001"), sa("127.0.0.1:40002")];
                c.turn.relay_ip = vec!["127.0.0.1".parse().unwrap()];
            }
        });
        let mut c = h.client("198.51.100.7:5000", "alice", "secret");
        let r = c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &dual));
        c.learn(&r.unwrap());
        let req = c.build(method::ALLOCATE, &new_tid(), &dual);
        let first = c.send_raw(&mut h, &req).unwrap();
        let second = c.send_raw(&mut h, &req).unwrap();
        assert!(second.is_success(), "{:?}", second.code());
        assert_eq!(first.relayed(), second.relayed());
        assert_eq!(first.relayed().len(), if v6 { 2 } else { 1 });
        assert_eq!(first.address_error(), second.address_error());
        assert_eq!(second.address_error().is_some(), !v6);
        assert_eq!(h.io.opened.len(), first.relayed().len());
    }
}

/// RFC 8656 §7.3: a Refresh naming one family of a dual allocation applies to that family:
/// with LIFETIME 0 it deletes that relay, its permissions and channels, and the other
/// family's relay carries on.
#[test]
fn refresh_of_one_family_of_a_dual_allocation_deletes_only_that_relay() {
    for gone_v4 in [false, true] {
        let mut h = H::new();
        let mut c = h.client("198.51.100.7:5000", "alice", "secret");
        let relayed = c.allocate_with(&mut h, &dual).relayed();
        let (relay4, relay6) = (
            h.relay_socket(relayed[0].port()),
            h.relay_socket(relayed[1].port()),
        );
        c.permit(&mut h, &[sa(PEER1), sa(PEER6)]);
        c.bind(&mut h, 0x4000, sa(PEER2));
        c.bind(&mut h, 0x4001, sa("[2a00:1450::2]:6000"));
        assert_eq!(h.stat(Counter::TurnPermissionsActive), 4);
        let f = if gone_v4 { 1 } else { 2 };
        let r = c.request(&mut h, method::REFRESH, &|w| {
            family(w, f);
            w.add_u32(attr::LIFETIME, 0).unwrap();
        });
        assert!(r.is_success(), "{:?}", r.code());
        assert_eq!(r.lifetime(), Some(0));
        let (gone, kept, gone_peer, kept_peer) = if gone_v4 {
            (relay4, relay6, sa(PEER1), sa(PEER6))
        } else {
            (relay6, relay4, sa(PEER6), sa(PEER1))
        };
        assert_eq!(h.io.closed, vec![gone]);
        assert_eq!(h.allocations(), 1);
        assert_eq!(h.stat(Counter::TurnPermissionsActive), 2);
        assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
        assert!(h.peer_sends(gone, gone_peer, b"x").is_none());
        assert!(c.send_indication(&mut h, gone_peer, b"x").is_none());
        let out = c.send_indication(&mut h, kept_peer, b"kept").unwrap();
        assert_eq!(out.socket, kept);
        // That family is gone: naming it is now a mismatch, and new peers of it too.
        c.request(&mut h, method::REFRESH, &|w| family(w, f))
            .expect_error(443);
        c.permit(&mut h, &[gone_peer]).expect_error(443);
        // A Refresh 0 naming the remaining family deletes the allocation.
        let r = c.request(&mut h, method::REFRESH, &|w| {
            family(w, 3 - f);
            w.add_u32(attr::LIFETIME, 0).unwrap();
        });
        assert!(r.is_success());
        assert_eq!(h.allocations(), 0);
        assert!(h.io.live.is_empty());
        assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
        assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    }
}

#[test]
fn second_allocate_from_the_same_5tuple_with_another_transaction_is_437() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (relayed, _) = c.allocate(&mut h);
    c.allocate_with(&mut h, &udp).expect_error(437);
    assert_eq!(h.io.opened.len(), 1);
    assert_eq!(h.allocations(), 1);
    // The same client IP from another port is another 5-tuple: a second allocation.
    let mut c2 = h.client("198.51.100.7:5001", "alice", "secret");
    let (relayed2, _) = c2.allocate(&mut h);
    assert_ne!(relayed, relayed2);
    // And the same source on the IPv6 listen socket would be another 5-tuple too; the
    // allocation is keyed by (client, listen socket).
    assert_eq!(h.allocations(), 2);
}

#[test]
fn retransmitted_allocate_gets_the_same_relayed_address_and_no_second_socket() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    // Get the nonce, then send one signed Allocate twice (a retransmission is byte-equal).
    let r = c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &udp));
    c.learn(&r.unwrap());
    let req = c.build(method::ALLOCATE, &new_tid(), &udp);
    let first = c.send_raw(&mut h, &req).unwrap();
    assert!(first.is_success());
    h.advance(2);
    let second = c.send_raw(&mut h, &req).unwrap();
    assert!(second.is_success(), "{:?}", second.code());
    c.check_integrity(&second);
    assert_eq!(
        first.xor(attr::XOR_RELAYED_ADDRESS),
        second.xor(attr::XOR_RELAYED_ADDRESS)
    );
    assert_eq!(second.xor(attr::XOR_MAPPED_ADDRESS), Some(c.addr));
    let lifetime = second.lifetime().unwrap();
    assert!((597..=600).contains(&lifetime), "{lifetime}");
    assert_eq!(h.io.opened.len(), 1, "no second relay socket");
    assert_eq!(h.allocations(), 1);
    assert_eq!(h.stat(Counter::TurnAllocationsCreated), 1);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 1);
}

/// A client that lost the response to an EVEN-PORT R=1 Allocate retransmits it; it must
/// learn the RESERVATION-TOKEN from the answer to the retransmission, or the odd port it
/// reserved is lost to it.
#[test]
fn retransmitted_even_port_allocate_repeats_the_reservation_token() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &udp));
    c.learn(&r.unwrap());
    let req = c.build(method::ALLOCATE, &new_tid(), &|w| {
        udp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
    });
    let first = c.send_raw(&mut h, &req).unwrap();
    let token = first
        .get(attr::RESERVATION_TOKEN)
        .expect("RESERVATION-TOKEN");
    let second = c.send_raw(&mut h, &req).unwrap();
    assert!(second.is_success());
    assert_eq!(second.get(attr::RESERVATION_TOKEN), Some(token));
}

#[test]
fn per_user_quota_is_486_and_is_given_back() {
    let mut h = H::with(|c| c.turn.max_allocations_per_user = 2);
    let mut a1 = h.client("198.51.100.7:5000", "alice", "secret");
    let mut a2 = h.client("198.51.100.7:5001", "alice", "secret");
    let mut a3 = h.client("198.51.100.7:5002", "alice", "secret");
    a1.allocate(&mut h);
    a2.allocate(&mut h);
    a3.allocate_with(&mut h, &udp).expect_error(486);
    assert_eq!(h.stat(Counter::TurnQuotaRejected), 1);
    // Another user is not affected.
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    b.allocate(&mut h);
    // Deleting one gives alice her slot back.
    assert_eq!(a1.refresh(&mut h, Some(0)).lifetime(), Some(0));
    a3.allocate(&mut h);
    assert_eq!(h.allocations(), 3);
}

#[test]
fn total_quota_is_508_and_is_given_back() {
    let mut h = H::with(|c| c.turn.max_allocations = 2);
    let mut a = h.client("198.51.100.7:5000", "alice", "secret");
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    let mut c = h.client("198.51.100.9:5000", "carol", "c4r0l");
    a.allocate(&mut h);
    b.allocate(&mut h);
    c.allocate_with(&mut h, &udp).expect_error(508);
    assert_eq!(h.stat(Counter::TurnQuotaRejected), 1);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 2);
    b.refresh(&mut h, Some(0));
    c.allocate(&mut h);
}

/// A 1024-port range with one free port: random probes alone would miss it almost always
/// (40 probes: 96%); the walk after them finds it, every time.
#[test]
fn the_last_free_relay_port_is_found() {
    for free in [50000u16, 50511, 51023] {
        let mut h = H::with(|c| c.turn.relay_ports = PortRange::new(50000, 51023).unwrap());
        h.io.fail_ports = (50000..=51023).filter(|p| *p != free).collect();
        let mut c = h.client("198.51.100.7:5000", "alice", "secret");
        let (relayed, _) = c.allocate(&mut h);
        assert_eq!(relayed.port(), free);
    }
}

#[test]
fn allocate_is_508_when_every_relay_port_bind_fails() {
    let mut h = H::with(|c| {
        c.turn.relay_ports = PortRange::new(50000, 50003).unwrap();
        c.turn.max_allocations = 1;
        c.turn.max_allocations_per_user = 1;
    });
    h.io.fail_ports = (50000..=50003).collect();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate_with(&mut h, &udp).expect_error(508);
    assert!(h.io.opened.is_empty());
    assert_eq!(h.allocations(), 0);
    // Quotas were given back: with max_allocations = 1 a later Allocate still succeeds.
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
    h.io.fail_ports.remove(&50002);
    let (relayed, _) = c.allocate(&mut h);
    assert_eq!(relayed.port(), 50002);
}

impl Out {
    /// Every ALTERNATE-SERVER of the message, in order.
    fn alternates(&self) -> Vec<SocketAddr> {
        self.msg()
            .attributes()
            .filter(|a| a.typ == attr::ALTERNATE_SERVER)
            .map(|a| attr::decode_address(a.value).unwrap())
            .collect()
    }
}

const ALT4: &str = "203.0.113.8:3478";
const ALT6: &str = "[2001:db8::8]:3478";

/// A full box with `turn.alternate_servers` answers 300 Try Alternate (RFC 8656 §7.2) with
/// ALTERNATE-SERVER of the client's family first and one of the other family after it,
/// signed like any error to an authenticated request (checked by `Client::request`).
#[test]
fn a_full_box_with_alternates_answers_300_with_alternate_server() {
    let mut h = H::with(|c| {
        c.turn.max_allocations = 1;
        c.turn.alternate_servers = vec![sa(ALT4), sa(ALT6)];
    });
    let mut a = h.client("198.51.100.7:5000", "alice", "secret");
    let mut b = h
        .client("198.51.100.8:5000", "bob", "hunter2")
        .auth(Auth::Sha256);
    let mut c = h.client("[2001:db8:1::7]:5000", "carol", "c4r0l");
    a.allocate(&mut h);
    let r = b.allocate_with(&mut h, &udp);
    r.expect_error(300);
    assert_eq!(r.alternates(), vec![sa(ALT4), sa(ALT6)]);
    let names: Vec<u16> = r.msg().attributes().map(|a| a.typ).collect();
    let at = |t: u16| names.iter().position(|n| *n == t).unwrap();
    assert!(at(attr::ALTERNATE_SERVER) < at(attr::MESSAGE_INTEGRITY_SHA256));
    assert!(r.get(attr::XOR_RELAYED_ADDRESS).is_none());
    let r = c.allocate_with(&mut h, &udp);
    r.expect_error(300);
    assert_eq!(r.alternates(), vec![sa(ALT6), sa(ALT4)]);
    assert_eq!(h.stat(Counter::TurnQuotaRejected), 2);
    assert_eq!(h.allocations(), 1);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 1);
    // Room again: the box allocates itself.
    a.refresh(&mut h, Some(0));
    b.allocate(&mut h);
}

/// RFC 8489 §10: the ALTERNATE-SERVER must be of the request's family; with none of it the
/// box answers as without alternates. A user over the per-user quota is not redirected.
#[test]
fn no_redirect_without_an_alternate_of_the_family_nor_for_the_per_user_quota() {
    let mut h = H::with(|c| {
        c.turn.max_allocations = 2;
        c.turn.max_allocations_per_user = 1;
        c.turn.alternate_servers = vec![sa(ALT6)];
    });
    let mut a1 = h.client("198.51.100.7:5000", "alice", "secret");
    let mut a2 = h.client("198.51.100.7:5001", "alice", "secret");
    a1.allocate(&mut h);
    let r = a2.allocate_with(&mut h, &udp);
    r.expect_error(486);
    assert!(r.alternates().is_empty());
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    b.allocate(&mut h);
    let mut c4 = h.client("198.51.100.9:5000", "carol", "c4r0l");
    let r = c4.allocate_with(&mut h, &udp);
    r.expect_error(508);
    assert!(r.alternates().is_empty());
    let mut c6 = h.client("[2001:db8:1::9]:5000", "carol", "c4r0l");
    let r = c6.allocate_with(&mut h, &udp);
    r.expect_error(300);
    assert_eq!(r.alternates(), vec![sa(ALT6)]);
}

/// No free relay port is the box being full as well; a reservation token that cannot be
/// redeemed is not (it names a port of this box).
#[test]
fn no_free_relay_port_redirects_a_stale_reservation_token_does_not() {
    let mut h = H::with(|c| {
        c.turn.relay_ports = PortRange::new(50000, 50003).unwrap();
        c.turn.alternate_servers = vec![sa(ALT4)];
    });
    h.io.fail_ports = (50000..=50003).collect();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &udp);
    r.expect_error(300);
    assert_eq!(r.alternates(), vec![sa(ALT4)]);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::RESERVATION_TOKEN, &[7; 8]).unwrap();
    });
    r.expect_error(508);
    assert!(r.alternates().is_empty());
}

/// Several alternates of one family: clients are spread over them by transaction id, and a
/// retransmitted request is sent to the same one.
#[test]
fn clients_spread_over_several_alternates_and_a_retransmission_gets_the_same() {
    let alts = [
        sa("203.0.113.8:3478"),
        sa("203.0.113.9:3478"),
        sa("203.0.113.10:3479"),
    ];
    let mut h = H::with(|c| {
        c.turn.max_allocations = 1;
        c.turn.alternate_servers = alts.to_vec();
    });
    h.client("198.51.100.7:5000", "alice", "secret")
        .allocate(&mut h);
    let mut seen = HashSet::new();
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    for _ in 0..30 {
        let r = b.allocate_with(&mut h, &udp);
        r.expect_error(300);
        let got = r.alternates();
        assert_eq!(got.len(), 1, "one per configured family");
        assert!(alts.contains(&got[0]), "{got:?}");
        seen.insert(got[0]);
    }
    assert_eq!(seen.len(), alts.len(), "every alternate is used: {seen:?}");
    let req = b.build(method::ALLOCATE, &new_tid(), &udp);
    let first = b.send_raw(&mut h, &req).unwrap();
    let again = b.send_raw(&mut h, &req).unwrap();
    first.expect_error(300);
    assert_eq!(first.alternates(), again.alternates());
}

#[test]
fn relay_ports_stay_in_the_configured_range() {
    let mut h = H::with(|c| c.turn.relay_ports = PortRange::new(50000, 50015).unwrap());
    let mut ports = HashSet::new();
    for i in 0..8 {
        let mut c = h.client(&format!("198.51.100.7:{}", 5000 + i), "alice", "secret");
        let (relayed, _) = c.allocate(&mut h);
        assert!((50000..=50015).contains(&relayed.port()), "{relayed}");
        ports.insert(relayed.port());
    }
    // Each allocation found a free port (the fake refuses a port already in use).
    assert_eq!(ports.len(), 8);
}

#[test]
fn even_port_with_reservation_gives_an_even_port_and_a_token_for_the_odd_one() {
    let mut h = H::new();
    let mut rtp = h.client("198.51.100.7:5000", "alice", "secret");
    let r = rtp.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
    });
    assert!(r.is_success(), "{:?}", r.code());
    let even = r.xor(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(even.port() % 2, 0, "{even}");
    let token = r.get(attr::RESERVATION_TOKEN).expect("RESERVATION-TOKEN");
    assert_eq!(token.len(), 8);
    assert_eq!(
        h.io.reserved,
        vec![SocketAddr::new(even.ip(), even.port() + 1)]
    );

    // The token redeems the odd port (for RTCP), on another 5-tuple.
    let mut rtcp = h.client("198.51.100.7:5001", "alice", "secret");
    let t = token.clone();
    let r = rtcp.allocate_with(&mut h, &move |w| {
        udp(w);
        w.add_attribute(attr::RESERVATION_TOKEN, &t).unwrap();
    });
    assert!(r.is_success(), "{:?}", r.code());
    let odd = r.xor(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(odd, SocketAddr::new(even.ip(), even.port() + 1));
    assert_eq!(h.io.adopted.len(), 1);
    assert_eq!(h.io.adopted[0].1, odd);

    // A token is good once.
    let mut again = h.client("198.51.100.7:5002", "alice", "secret");
    let r = again.allocate_with(&mut h, &move |w| {
        udp(w);
        w.add_attribute(attr::RESERVATION_TOKEN, &token).unwrap();
    });
    r.expect_error(508);
}

#[test]
fn even_port_without_reservation_and_bad_combinations() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x00]).unwrap();
    });
    assert!(r.is_success());
    assert_eq!(r.xor(attr::XOR_RELAYED_ADDRESS).unwrap().port() % 2, 0);
    assert!(r.get(attr::RESERVATION_TOKEN).is_none());
    assert!(h.io.reserved.is_empty());
    // EVEN-PORT together with RESERVATION-TOKEN is a 400 (RFC 8656 §7.2).
    let mut c = h.client("198.51.100.7:5001", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
        w.add_attribute(attr::RESERVATION_TOKEN, &[1; 8]).unwrap();
    });
    r.expect_error(400);
}

#[test]
fn an_unredeemed_reservation_expires() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
    });
    let token = r.get(attr::RESERVATION_TOKEN).unwrap();
    assert_eq!(h.shared.reservations.lock().unwrap().len(), 1);
    h.advance_and_tick(31);
    assert_eq!(h.shared.reservations.lock().unwrap().len(), 0);
    // The driver was told to close the reserved socket.
    assert_eq!(h.io.released, h.io.reserved);
    assert!(h.io.holding.is_empty());
    let mut late = h.client("198.51.100.7:5001", "alice", "secret");
    let r = late.allocate_with(&mut h, &move |w| {
        udp(w);
        w.add_attribute(attr::RESERVATION_TOKEN, &token).unwrap();
    });
    r.expect_error(508);
}

#[test]
fn dont_fragment_is_passed_to_the_driver() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::DONT_FRAGMENT, &[]).unwrap();
    });
    assert!(r.is_success());
    assert!(h.io.opened[0].2);
}

#[test]
fn external_ip_is_advertised_while_the_relay_binds_relay_ip() {
    let mut h = H::with(|c| c.turn.external_ip = Some("203.0.113.50".parse().unwrap()));
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &udp);
    let relayed = r.xor(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(relayed.ip(), "203.0.113.50".parse::<IpAddr>().unwrap());
    assert_eq!(
        h.io.opened[0].1,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), relayed.port())
    );
    // The advertised address is one of the server's own: another client may use it as a
    // peer although 203.0.113.0/24 is on the deny list.
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    b.allocate(&mut h);
    assert!(b.permit(&mut h, &[relayed]).is_success());
}

#[test]
fn unknown_comprehension_required_attribute_is_420() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(0x0031, &[0; 4]).unwrap();
    });
    r.expect_error(420);
    let list = r.get(attr::UNKNOWN_ATTRIBUTES).unwrap();
    assert_eq!(list, vec![0x00, 0x31]);
    assert!(h.io.opened.is_empty());
}

#[test]
fn software_can_be_hidden() {
    let mut h = H::with(|c| c.stun.software = String::new());
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &udp);
    assert!(r.is_success());
    assert!(r.get(attr::SOFTWARE).is_none());
    let c2 = h.client("198.51.100.8:5000", "alice", "secret");
    let r = c2
        .send_raw(&mut h, &c2.build(method::ALLOCATE, &new_tid(), &udp))
        .unwrap();
    r.expect_error(401);
    assert!(r.get(attr::SOFTWARE).is_none());
}

// ---------------------------------------------------------------------------------------
// Refresh
// ---------------------------------------------------------------------------------------

#[test]
fn refresh_sets_a_new_lifetime_within_bounds() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    assert_eq!(c.refresh(&mut h, Some(1200)).lifetime(), Some(1200));
    // Above max_lifetime (3600): capped; below the default (600): the default.
    assert_eq!(c.refresh(&mut h, Some(100_000)).lifetime(), Some(3600));
    assert_eq!(c.refresh(&mut h, Some(30)).lifetime(), Some(600));
    assert_eq!(c.refresh(&mut h, None).lifetime(), Some(600));
    // The new lifetime is what counts: 1200 s keeps it past the default 600 s.
    c.refresh(&mut h, Some(1200));
    h.advance_and_tick(1000);
    assert_eq!(h.allocations(), 1);
    h.advance_and_tick(201);
    assert_eq!(h.allocations(), 0);
}

#[test]
fn refresh_with_lifetime_zero_deletes_and_closes_the_relay_socket() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1)]);
    c.bind(&mut h, 0x4000, sa(PEER2));
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 2);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
    let r = c.refresh(&mut h, Some(0));
    assert!(r.is_success());
    assert_eq!(r.lifetime(), Some(0));
    assert_eq!(h.io.closed, vec![relay]);
    assert!(h.io.live.is_empty());
    assert_eq!(h.allocations(), 0);
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 0);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    assert_eq!(h.stat(Counter::TurnAllocationsDeleted), 1);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
    assert!(h.shared.per_user.lock().unwrap().is_empty());
    // Data for the old relay socket goes nowhere.
    assert!(h.peer_sends(relay, sa(PEER1), b"late").is_none());
    // A retransmitted delete finds no allocation: 437, which RFC 8656 §7.3 tells clients
    // to treat as success.
    c.refresh(&mut h, Some(0)).expect_error(437);
}

#[test]
fn refresh_without_an_allocation_is_437() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.refresh(&mut h, None).expect_error(437);
    c.permit(&mut h, &[sa(PEER1)]).expect_error(437);
    c.bind(&mut h, 0x4000, sa(PEER1)).expect_error(437);
}

#[test]
fn refresh_of_another_users_allocation_is_441() {
    let mut h = H::new();
    let mut a = h.client("198.51.100.7:5000", "alice", "secret");
    a.allocate(&mut h);
    // Bob, from alice's 5-tuple.
    let mut b = h.client("198.51.100.7:5000", "bob", "hunter2");
    b.refresh(&mut h, Some(0)).expect_error(441);
    b.permit(&mut h, &[sa(PEER1)]).expect_error(441);
    b.bind(&mut h, 0x4000, sa(PEER1)).expect_error(441);
    assert_eq!(h.allocations(), 1);
    assert!(h.io.closed.is_empty());
    // Counted as `turn_auth_failures{reason="wrong_credentials"}`.
    assert_eq!(h.stat(Counter::TurnAuthWrongUser), 3);
}

#[test]
fn refresh_with_the_other_address_family_is_443() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    let r = c.request(&mut h, method::REFRESH, &|w| {
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            .unwrap();
    });
    r.expect_error(443);
    let r = c.request(&mut h, method::REFRESH, &|w| {
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0])
            .unwrap();
    });
    assert!(r.is_success());
}

// ---------------------------------------------------------------------------------------
// CreatePermission and ChannelBind
// ---------------------------------------------------------------------------------------

#[test]
fn create_permission_with_several_peers_installs_them_all() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    let r = c.permit(&mut h, &[sa(PEER1), sa(PEER2), sa(PEER3)]);
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 3);
    assert_eq!(h.stat(Counter::TurnPermissionsCreated), 3);
    for p in [PEER1, PEER2, PEER3] {
        // Permissions are by IP: any port of a permitted peer may send.
        let other_port = SocketAddr::new(sa(p).ip(), 1234);
        assert!(h.peer_sends(relay, other_port, b"hello").is_some(), "{p}");
    }
    // Renewing an installed permission adds none.
    c.permit(&mut h, &[sa(PEER1)]);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 3);
}

#[test]
fn create_permission_is_all_or_nothing_when_one_peer_is_denied() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    let r = c.permit(&mut h, &[sa(PEER1), sa("10.0.0.1:5000"), sa(PEER2)]);
    r.expect_error(403);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert_eq!(h.stat(Counter::TurnPeerDeniedSpecial), 1);
    assert!(h.peer_sends(relay, sa(PEER1), b"x").is_none());
    assert!(c.send_indication(&mut h, sa(PEER1), b"x").is_none());
}

#[test]
fn create_permission_family_mismatch_is_443_and_no_peer_is_400() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1), sa(PEER6)]).expect_error(443);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    c.permit(&mut h, &[]).expect_error(400);
}

#[test]
fn permission_quota_is_enforced() {
    let mut h = H::with(|c| c.turn.max_permissions = 2);
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    assert!(c.permit(&mut h, &[sa(PEER1), sa(PEER2)]).is_success());
    let r = c.permit(&mut h, &[sa(PEER3)]);
    assert!(!r.is_success());
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 2);
}

#[test]
fn channel_numbers_0x4000_to_0x7fff_accepted_0x3fff_and_0x8000_rejected() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    c.bind(&mut h, 0x3FFF, sa(PEER1)).expect_error(400);
    c.bind(&mut h, 0x8000, sa(PEER1)).expect_error(400);
    c.bind(&mut h, 0xFFFF, sa(PEER1)).expect_error(400);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    let r = c.bind(&mut h, 0x4000, sa(PEER1));
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
    // The top of RFC 8656's range, and of RFC 5766's (accepted for older clients).
    assert!(c.bind(&mut h, 0x4FFF, sa(PEER2)).is_success());
    assert!(c.bind(&mut h, 0x7FFF, sa(PEER3)).is_success());
    // A ChannelBind installs (or refreshes) the permission for the peer's IP.
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 3);
}

#[test]
fn channel_bind_needs_exactly_one_peer_and_a_number() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    let r = c.request(&mut h, method::CHANNEL_BIND, &|w| {
        w.add_xor_address(attr::XOR_PEER_ADDRESS, sa(PEER1))
            .unwrap();
    });
    r.expect_error(400);
    let r = c.request(&mut h, method::CHANNEL_BIND, &|w| {
        w.add_attribute(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])
            .unwrap();
    });
    r.expect_error(400);
    let r = c.request(&mut h, method::CHANNEL_BIND, &|w| {
        w.add_attribute(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])
            .unwrap();
        w.add_xor_address(attr::XOR_PEER_ADDRESS, sa(PEER1))
            .unwrap();
        w.add_xor_address(attr::XOR_PEER_ADDRESS, sa(PEER2))
            .unwrap();
    });
    r.expect_error(400);
}

#[test]
fn channel_rebinding_rules() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    assert!(c.bind(&mut h, 0x4001, sa(PEER1)).is_success());
    // The number is taken by another peer; the peer already has another number.
    c.bind(&mut h, 0x4001, sa(PEER2)).expect_error(400);
    c.bind(&mut h, 0x4002, sa(PEER1)).expect_error(400);
    // Same IP, other port: another peer transport address, so also refused on 0x4001.
    c.bind(&mut h, 0x4001, SocketAddr::new(sa(PEER1).ip(), 5001))
        .expect_error(400);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
    assert_eq!(h.stat(Counter::TurnChannelsCreated), 1);

    // Rebinding the same pair refreshes the channel (and its permission): 500 s + 250 s
    // is past the first 600 s, and the channel is still there.
    h.advance(500);
    assert!(c.bind(&mut h, 0x4001, sa(PEER1)).is_success());
    assert_eq!(
        h.stat(Counter::TurnChannelsCreated),
        1,
        "refreshed, not added"
    );
    c.refresh(&mut h, Some(3600));
    h.advance_and_tick(250);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
    let out = c
        .channel_data(&mut h, 0x4001, b"still", 3)
        .expect("relayed");
    assert_eq!(out.to, sa(PEER1));
    assert_eq!(out.socket, relay);
}

#[test]
fn channel_quota_is_enforced() {
    let mut h = H::with(|c| c.turn.max_channels = 1);
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    assert!(c.bind(&mut h, 0x4000, sa(PEER1)).is_success());
    assert!(!c.bind(&mut h, 0x4001, sa(PEER2)).is_success());
    assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
}

// ---------------------------------------------------------------------------------------
// Data: Send indications, ChannelData, data from peers
// ---------------------------------------------------------------------------------------

#[test]
fn send_indication_is_relayed_only_with_a_permission() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    assert!(c
        .send_indication(&mut h, sa(PEER1), b"no permission")
        .is_none());
    assert_eq!(h.stat(Counter::DropNoPermission), 1);
    c.permit(&mut h, &[sa(PEER1)]);
    let data = b"hello peer, 23 bytes..";
    let out = c.send_indication(&mut h, sa(PEER1), data).expect("relayed");
    assert_eq!(out.to, sa(PEER1));
    assert_eq!(out.socket, relay);
    assert_eq!(out.bytes, data, "the DATA value, sent from where it lies");
    // DATA sits after the 20-byte header and XOR-PEER-ADDRESS (12) and its own TLV header.
    assert_eq!(out.offset, HEADROOM + 20 + 12 + 4);
    assert_eq!(h.stat(Counter::RelayClientToPeerPackets), 1);
    assert_eq!(h.stat(Counter::RelayClientToPeerBytes), data.len() as u64);
    // Another IP without permission is still refused; a Send from a 5-tuple without an
    // allocation is dropped.
    assert!(c.send_indication(&mut h, sa(PEER2), b"x").is_none());
    let stranger = h.client("198.51.100.99:5000", "alice", "secret");
    assert!(stranger.send_indication(&mut h, sa(PEER1), b"x").is_none());
    assert_eq!(h.stat(Counter::DropNoAllocation), 1);
    // A Send indication without DATA, or without XOR-PEER-ADDRESS, is dropped.
    for with_peer in [true, false] {
        let mut buf = [0u8; 128];
        let mut w =
            MessageWriter::new(&mut buf, Class::Indication, method::SEND, &new_tid()).unwrap();
        if with_peer {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, sa(PEER1))
                .unwrap();
        } else {
            w.add_attribute(attr::DATA, b"data").unwrap();
        }
        let n = w.finish();
        assert!(h.recv(LISTEN4, c.addr, &buf[..n]).is_none());
    }
    assert_eq!(h.stat(Counter::DropBadAttribute), 2);
}

#[test]
fn channel_data_is_relayed_to_the_bound_peer_from_where_it_lies() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER1));
    for (len, pad) in [
        (4usize, 0usize),
        (5, 3),
        (5, 0),
        (6, 2),
        (1, 3),
        (0, 0),
        (1200, 0),
    ] {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let out = c
            .channel_data(&mut h, 0x4000, &data, pad)
            .unwrap_or_else(|| panic!("len {len} pad {pad} dropped"));
        assert_eq!(
            out.offset,
            HEADROOM + 4,
            "payload right after the 4-byte header"
        );
        assert_eq!(out.bytes, data);
        assert_eq!(out.to, sa(PEER1));
        assert_eq!(out.socket, relay);
    }
    // More than 3 bytes of padding, a length beyond the datagram, an unbound number.
    let before = h.stat(Counter::DropBadChannelData);
    assert!(c.channel_data(&mut h, 0x4000, b"abcd", 4).is_none());
    let mut short = vec![0x40, 0x00, 0x00, 0x10];
    short.extend_from_slice(b"only8byt");
    assert!(h.recv(LISTEN4, c.addr, &short).is_none());
    assert_eq!(h.stat(Counter::DropBadChannelData), before + 2);
    assert!(c.channel_data(&mut h, 0x4001, b"abcd", 0).is_none());
    assert_eq!(h.stat(Counter::DropNoChannel), 1);
    // From a 5-tuple without an allocation.
    let stranger = h.client("198.51.100.99:5000", "alice", "secret");
    assert!(stranger.channel_data(&mut h, 0x4000, b"abcd", 0).is_none());
}

#[test]
fn peer_data_becomes_channel_data_when_a_channel_is_bound() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.bind(&mut h, 0x4ABC, sa(PEER1));
    for len in [0usize, 1, 5, 160, 1200] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let out = h.peer_sends(relay, sa(PEER1), &data).expect("relayed");
        assert_eq!(out.to, c.addr);
        assert_eq!(
            out.socket, LISTEN4,
            "to the client from the listen socket it uses"
        );
        assert_eq!(out.offset, HEADROOM - 4, "header written into the headroom");
        assert_eq!(out.bytes.len(), len + 4);
        assert_eq!(out.bytes[..2], [0x4A, 0xBC]);
        assert_eq!(
            usize::from(u16::from_be_bytes([out.bytes[2], out.bytes[3]])),
            len
        );
        assert_eq!(out.bytes[4..], data[..]);
    }
    assert_eq!(h.stat(Counter::RelayPeerToClientPackets), 5);
    // The same IP from another port has no channel: a Data indication.
    let other = SocketAddr::new(sa(PEER1).ip(), 5999);
    let out = h.peer_sends(relay, other, b"x").unwrap();
    assert_eq!(Message::parse(&out.bytes).unwrap().method(), method::DATA);
}

/// Parses a Data indication and checks its framing; returns (peer, data).
#[track_caller]
fn parse_data_indication(out: &Out) -> (SocketAddr, Vec<u8>) {
    let m = Message::parse(&out.bytes).expect("a well-formed STUN message");
    assert_eq!(m.class(), Class::Indication);
    assert_eq!(m.method(), method::DATA);
    assert!(m.has_magic_cookie());
    assert_eq!(out.bytes.len() % 4, 0, "4-byte aligned");
    let body = usize::from(u16::from_be_bytes([out.bytes[2], out.bytes[3]]));
    assert_eq!(body + 20, out.bytes.len());
    let tid = m.transaction_id();
    let peer = attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), &tid).unwrap();
    let data = m.get(attr::DATA).expect("DATA").to_vec();
    assert!(out.offset < HEADROOM, "header written into the headroom");
    (peer, data)
}

#[test]
fn peer_data_becomes_a_data_indication_without_a_channel() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1)]);
    let mut tids = HashSet::new();
    for len in [0usize, 1, 2, 3, 4, 5, 171, 1200] {
        let data: Vec<u8> = (0..len).map(|i| (i * 3 + 1) as u8).collect();
        let out = h.peer_sends(relay, sa(PEER1), &data).expect("relayed");
        assert_eq!(out.to, c.addr);
        assert_eq!(out.socket, LISTEN4);
        let (peer, got) = parse_data_indication(&out);
        assert_eq!(peer, sa(PEER1));
        assert_eq!(got, data, "len {len}");
        // The data did not move: the header sits right in front of it.
        assert_eq!(out.offset, HEADROOM - (20 + 12 + 4));
        // Padding is zeros, not what was in the buffer before.
        assert!(out.bytes[out.bytes.len() - (4 - len % 4) % 4..]
            .iter()
            .all(|b| *b == 0));
        tids.insert(Message::parse(&out.bytes).unwrap().transaction_id());
    }
    assert_eq!(tids.len(), 8, "every indication has its own transaction id");
}

#[test]
fn ipv6_peer_data_becomes_a_data_indication() {
    let mut h = H::new();
    let mut c = h.client("[2001:db8::7]:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            .unwrap();
    });
    let relay = h.relay_socket(r.xor(attr::XOR_RELAYED_ADDRESS).unwrap().port());
    c.permit(&mut h, &[sa(PEER6)]);
    let out = h.peer_sends(relay, sa(PEER6), b"seven b").unwrap();
    assert_eq!(out.socket, LISTEN6);
    let (peer, data) = parse_data_indication(&out);
    assert_eq!(peer, sa(PEER6));
    assert_eq!(data, b"seven b");
    assert_eq!(out.offset, HEADROOM - (20 + 24 + 4));
    // And the other way, by Send indication and by channel.
    let out = c.send_indication(&mut h, sa(PEER6), b"v6").unwrap();
    assert_eq!((out.to, out.bytes.as_slice()), (sa(PEER6), &b"v6"[..]));
    c.bind(&mut h, 0x4000, sa(PEER6));
    let out = c.channel_data(&mut h, 0x4000, b"v6c", 1).unwrap();
    assert_eq!((out.to, out.bytes.as_slice()), (sa(PEER6), &b"v6c"[..]));
}

#[test]
fn peer_data_without_permission_is_dropped_and_counted() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1)]);
    assert!(h.peer_sends(relay, sa(PEER2), b"unsolicited").is_none());
    assert_eq!(h.stat(Counter::DropNoPermission), 1);
    assert_eq!(h.stat(Counter::RelayPeerToClientPackets), 0);
    // A datagram on a relay socket that belongs to no allocation.
    assert!(h.peer_sends(relay + 100, sa(PEER1), b"x").is_none());
    assert_eq!(h.stat(Counter::DropNoAllocation), 1);
}

#[test]
fn peer_data_that_looks_like_stun_or_channel_data_is_still_just_data() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1)]);
    // A peer sending an Allocate or ChannelData must not reach the TURN request handler.
    let req = c.build(method::ALLOCATE, &new_tid(), &udp);
    let out = h.peer_sends(relay, sa(PEER1), &req).unwrap();
    assert_eq!(out.to, c.addr);
    assert_eq!(parse_data_indication(&out).1, req);
    let out = h.peer_sends(relay, sa(PEER1), &[0x40, 0, 0, 1, 9]).unwrap();
    assert_eq!(parse_data_indication(&out).1, [0x40, 0, 0, 1, 9]);
    assert_eq!(h.allocations(), 1);
    assert_eq!(h.io.opened.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Timers
// ---------------------------------------------------------------------------------------

#[test]
fn permission_expires_after_300_seconds() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1)]);
    h.advance_and_tick(299);
    assert!(h.peer_sends(relay, sa(PEER1), b"a").is_some());
    assert!(c.send_indication(&mut h, sa(PEER1), b"a").is_some());
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 1);
    h.advance_and_tick(2);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert!(h.peer_sends(relay, sa(PEER1), b"a").is_none());
    assert!(c.send_indication(&mut h, sa(PEER1), b"a").is_none());
    assert_eq!(h.stat(Counter::DropNoPermission), 2);
    // The allocation itself lives on.
    assert_eq!(h.allocations(), 1);
}

#[test]
fn refreshing_a_permission_restarts_its_300_seconds() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.permit(&mut h, &[sa(PEER1)]);
    h.advance_and_tick(200);
    c.permit(&mut h, &[sa(PEER1)]);
    h.advance_and_tick(200);
    assert!(h.peer_sends(relay, sa(PEER1), b"a").is_some());
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 1);
}

#[test]
fn channel_expires_after_600_seconds() {
    let mut h = H::with(|c| c.turn.default_lifetime = config::Duration::from_secs(3600));
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER1));
    // Keep the permission alive separately, so only the channel ages out.
    for _ in 0..2 {
        h.advance_and_tick(250);
        c.permit(&mut h, &[sa(PEER1)]);
    }
    h.advance_and_tick(99); // 599 s
    assert!(c.channel_data(&mut h, 0x4000, b"a", 0).is_some());
    assert_eq!(h.stat(Counter::TurnChannelsActive), 1);
    h.advance_and_tick(2); // 601 s
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    assert!(c.channel_data(&mut h, 0x4000, b"a", 0).is_none());
    // The peer's data now comes as a Data indication (the permission is still there).
    let out = h.peer_sends(relay, sa(PEER1), b"b").unwrap();
    assert_eq!(parse_data_indication(&out).1, b"b");
}

#[test]
fn allocation_expires_after_its_lifetime_and_gives_everything_back() {
    let mut h = H::with(|c| c.turn.max_allocations_per_user = 1);
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER1));
    c.permit(&mut h, &[sa(PEER2)]);
    h.advance_and_tick(599);
    assert_eq!(h.allocations(), 1);
    assert!(h.io.closed.is_empty());
    h.advance_and_tick(2);
    assert_eq!(h.allocations(), 0);
    assert_eq!(h.io.closed, vec![relay]);
    assert_eq!(h.stat(Counter::TurnAllocationsExpired), 1);
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 0);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
    // Data after expiry goes nowhere; the per-user quota of 1 is free again.
    assert!(c.channel_data(&mut h, 0x4000, b"a", 0).is_none());
    assert!(h.peer_sends(relay, sa(PEER1), b"a").is_none());
    c.allocate(&mut h);
    // Sweeping again does not close anything twice (the fake panics on a double close).
    h.advance_and_tick(1);
    h.advance_and_tick(1);
}

#[test]
fn many_allocations_expire_in_one_sweep() {
    let mut h = H::new();
    let mut relays = Vec::new();
    for i in 0..20 {
        let mut c = h.client(&format!("198.51.100.{}:5000", i + 1), "alice", "secret");
        relays.push(c.allocate(&mut h).1);
        c.permit(&mut h, &[sa(PEER1)]);
    }
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 20);
    h.advance_and_tick(601);
    assert_eq!(h.allocations(), 0);
    let mut closed = h.io.closed.clone();
    closed.sort_unstable();
    relays.sort_unstable();
    assert_eq!(closed, relays);
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 0);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
}

#[test]
fn shutdown_deletes_every_allocation() {
    let mut h = H::new();
    for i in 0..3 {
        let mut c = h.client(&format!("198.51.100.{}:5000", i + 1), "alice", "secret");
        c.allocate(&mut h);
        c.bind(&mut h, 0x4000, sa(PEER1));
    }
    let now = h.now();
    h.server.shutdown(now, &mut h.io);
    assert_eq!(h.allocations(), 0);
    assert!(h.io.live.is_empty());
    assert_eq!(h.io.closed.len(), 3);
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 0);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert_eq!(h.shared.allocations.load(Ordering::Relaxed), 0);
}

// ---------------------------------------------------------------------------------------
// Abuse: error-response rate limit, bandwidth cap
// ---------------------------------------------------------------------------------------

#[test]
fn error_responses_to_one_source_are_rate_limited() {
    let mut h = H::with(|c| c.turn.error_rate = 10);
    let spoofed = |port: u16| h.client(&format!("198.51.100.66:{port}"), "alice", "secret");
    let clients: Vec<Client> = (0..100).map(|i| spoofed(10_000 + i)).collect();
    let mut answered = 0;
    for c in &clients {
        if let Some(r) = c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &udp)) {
            r.expect_error(401);
            answered += 1;
        }
    }
    // A burst of twice the per-second rate, then nothing.
    assert_eq!(answered, 20);
    assert_eq!(h.stat(Counter::DropRateLimited), 80);
    // Another source has its own budget.
    let other = h.client("198.51.100.67:5000", "alice", "secret");
    assert!(other
        .send_raw(&mut h, &other.build(method::ALLOCATE, &new_tid(), &udp))
        .is_some());
    // The budget refills at the configured rate: 10 per second.
    h.advance_ms(1000);
    let answered = clients
        .iter()
        .filter(|c| {
            c.send_raw(&mut h, &c.build(method::ALLOCATE, &new_tid(), &udp))
                .is_some()
        })
        .count();
    assert_eq!(answered, 10);
    // Bad-credential 401s come out of the same budget.
    let mut wrong = h.client("198.51.100.66:9999", "alice", "wrong");
    wrong.realm = Some(REALM.as_bytes().to_vec());
    let mut n = [0u8; super::auth::NONCE_BYTES];
    h.server
        .settings()
        .turn
        .credentials
        .nonce(wrong.addr, h.now().unix, &mut n);
    wrong.nonce = Some(n.to_vec());
    assert!(wrong
        .send_raw(&mut h, &wrong.build(method::ALLOCATE, &new_tid(), &udp))
        .is_none());
}

#[test]
fn bandwidth_cap_per_allocation_and_direction() {
    let mut h = H::with(|c| c.turn.max_bandwidth = 1000);
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER1));
    let data = [0u8; 200];
    let up = (0..10)
        .filter(|_| c.channel_data(&mut h, 0x4000, &data, 0).is_some())
        .count();
    assert_eq!(up, 5, "1000 bytes/s: five 200-byte packets at once");
    assert_eq!(h.stat(Counter::DropBandwidth), 5);
    // The other direction has its own budget.
    let down = (0..10)
        .filter(|_| h.peer_sends(relay, sa(PEER1), &data).is_some())
        .count();
    assert_eq!(down, 5);
    // Half a second refills 500 bytes.
    h.advance_ms(500);
    let up = (0..10)
        .filter(|_| c.channel_data(&mut h, 0x4000, &data, 0).is_some())
        .count();
    assert_eq!(up, 2);
    // Send indications count against the same budget as ChannelData.
    h.advance_ms(1000);
    let up = (0..10)
        .filter(|_| c.send_indication(&mut h, sa(PEER1), &data).is_some())
        .count();
    assert_eq!(up, 5);
    // Another allocation is not affected by this one's budget.
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    b.allocate(&mut h);
    b.bind(&mut h, 0x4000, sa(PEER1));
    assert!(b.channel_data(&mut h, 0x4000, &data, 0).is_some());
}

// ---------------------------------------------------------------------------------------
// Peer policy
// ---------------------------------------------------------------------------------------

/// Private, loopback, link-local and CGNAT samples, written as IPv4 and in every IPv6 form.
fn denied_v4_samples() -> Vec<Ipv4Addr> {
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.169.254",
        "100.64.0.1",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

#[test]
fn loopback_and_private_peers_are_403_in_every_encoding() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    let mut refused = 0;
    for v4 in denied_v4_samples() {
        let mut forms = vec![IpAddr::V4(v4)];
        forms.extend(ipv6_encodings(v4).into_iter().map(IpAddr::V6));
        for ip in forms {
            let peer = SocketAddr::new(ip, 5000);
            c.permit(&mut h, &[peer]).expect_error(403);
            c.bind(&mut h, 0x4000, peer).expect_error(403);
            assert!(c.send_indication(&mut h, peer, b"x").is_none(), "{peer}");
            refused += 2;
        }
    }
    assert_eq!(h.stat(Counter::TurnPeerDeniedSpecial), refused);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
    assert!(h.peer_sends(relay, sa("127.0.0.1:5000"), b"x").is_none());
}

#[test]
fn ipv6_special_purpose_peers_are_403_on_an_ipv6_relay() {
    let mut h = H::new();
    let mut c = h.client("[2001:db8::7]:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            .unwrap();
    });
    assert!(r.is_success());
    for s in [
        "::1",
        "fe80::1",
        "fd00::1",
        "ff02::1",
        "2001:db8::1",
        "::",
        "100::1",
    ] {
        let peer = SocketAddr::new(s.parse().unwrap(), 5000);
        c.permit(&mut h, &[peer]).expect_error(403);
    }
    // IPv6 forms of denied IPv4 addresses are never accepted on an IPv6 relay either.
    for v4 in denied_v4_samples() {
        for v6 in ipv6_encodings(v4) {
            let r = c.permit(&mut h, &[SocketAddr::new(IpAddr::V6(v6), 5000)]);
            assert!(matches!(r.code(), Some(403 | 443)), "{v6}: {:?}", r.code());
        }
    }
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
}

#[test]
fn allow_peers_permits_loopback_in_every_encoding() {
    let mut h = H::with(|c| c.turn.allow_peers = cidrs(&["127.0.0.0/8", "::1/128"]));
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    let v4: Ipv4Addr = "127.0.0.1".parse().unwrap();
    let mut forms = vec![IpAddr::V4(v4)];
    forms.extend(ipv6_encodings(v4).into_iter().map(IpAddr::V6));
    for ip in forms {
        let peer = SocketAddr::new(ip, 5000);
        let r = c.permit(&mut h, &[peer]);
        assert!(r.is_success(), "{peer}: {:?}", r.code());
    }
    // Every form is the same permission: the canonical IPv4 address.
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 1);
    // Data is sent to the IPv4 address the encoding carried.
    let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), 5000);
    let out = c.send_indication(&mut h, mapped, b"x").unwrap();
    assert_eq!(out.to, sa("127.0.0.1:5000"));
    assert!(h.peer_sends(relay, sa("127.0.0.1:5000"), b"x").is_some());
    // Not beyond what was allowed.
    c.permit(&mut h, &[sa("10.0.0.1:5000")]).expect_error(403);
}

#[test]
fn deny_peers_adds_blocks_and_wins_over_allow_peers() {
    let mut h = H::with(|c| {
        c.turn.allow_peers = cidrs(&["10.1.0.0/16"]);
        c.turn.deny_peers = cidrs(&["8.8.4.0/24", "10.1.2.0/24"]);
    });
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    c.permit(&mut h, &[sa("8.8.4.4:53")]).expect_error(403);
    c.permit(&mut h, &[sa("10.1.2.3:53")]).expect_error(403);
    assert_eq!(h.stat(Counter::TurnPeerDeniedConfigured), 2);
    assert!(c.permit(&mut h, &[sa("10.1.9.9:53")]).is_success());
    assert!(c.permit(&mut h, &[sa("8.8.8.8:53")]).is_success());
}

#[test]
fn own_relay_addresses_are_allowed_peers_so_two_clients_can_talk() {
    let mut h = H::new();
    let mut a = h.client("198.51.100.7:5000", "alice", "secret");
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    let (ra, sock_a) = a.allocate(&mut h);
    let (rb, sock_b) = b.allocate(&mut h);
    // 127.0.0.1 is loopback, denied by default, but these are the server's own relays.
    assert!(a.bind(&mut h, 0x4000, rb).is_success());
    assert!(b.permit(&mut h, &[ra]).is_success());
    let out = a.channel_data(&mut h, 0x4000, b"a to b", 2).unwrap();
    assert_eq!((out.socket, out.to), (sock_a, rb));
    // What the kernel would then deliver on bob's relay socket, from alice's relay.
    let out = h.peer_sends(sock_b, ra, b"a to b").unwrap();
    assert_eq!(out.to, b.addr);
    assert_eq!(parse_data_indication(&out), (ra, b"a to b".to_vec()));
    // Other ports of the server's own address are not allowed.
    a.permit(&mut h, &[sa("127.0.0.1:22")]).expect_error(403);
    a.bind(&mut h, 0x4001, sa("127.0.0.1:53")).expect_error(403);
}

/// A permission is for an IP; when that IP is the server's own, the policy only allowed it
/// for the relay port range. A Send indication to another port of the server's own address
/// (its DNS resolver, its own STUN port, ...) must not be relayed.
#[test]
fn send_indication_to_a_non_relay_port_of_the_servers_own_address_is_refused() {
    let mut h = H::new();
    let mut a = h.client("198.51.100.7:5000", "alice", "secret");
    let mut b = h.client("198.51.100.8:5000", "bob", "hunter2");
    a.allocate(&mut h);
    let (rb, _) = b.allocate(&mut h);
    assert!(a.permit(&mut h, &[rb]).is_success());
    assert!(a.send_indication(&mut h, rb, b"to bob").is_some());
    for port in [22u16, 53, 40001] {
        let target = SocketAddr::new(rb.ip(), port);
        assert!(
            a.send_indication(&mut h, target, b"probe").is_none(),
            "relayed to {target}, a port outside the relay range"
        );
    }
}

/// Canonicalisation works both ways: a public IPv4 peer written in an IPv6 form is that
/// public peer, and allowed on an IPv4 relay (it is what the policy module's own unit test
/// `public_peers_pass_in_every_encoding` expects too).
#[test]
fn public_ipv4_peer_in_ipv6_encodings_is_allowed_as_its_ipv4_address() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    let v4: Ipv4Addr = "8.8.8.8".parse().unwrap();
    let mut refused = Vec::new();
    for v6 in ipv6_encodings(v4) {
        let r = c.permit(&mut h, &[SocketAddr::new(IpAddr::V6(v6), 53)]);
        if !r.is_success() {
            refused.push((v6, r.code()));
        }
    }
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 1);
}

// ---------------------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------------------

#[test]
fn malformed_attributes_in_a_request_are_400() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    // LIFETIME of the wrong size.
    let r = c.request(&mut h, method::REFRESH, &|w| {
        w.add_attribute(attr::LIFETIME, &[0, 0, 1]).unwrap();
    });
    r.expect_error(400);
    // More XOR-PEER-ADDRESS attributes than the server takes in one request.
    let r = c.request(&mut h, method::CREATE_PERMISSION, &|w| {
        for i in 0..9u8 {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, SocketAddr::from(([8, 8, 8, i], 1)))
                .unwrap();
        }
    });
    r.expect_error(400);
    assert_eq!(h.stat(Counter::TurnPermissionsActive), 0);
}

#[test]
fn turn_requests_with_a_broken_fingerprint_or_integrity_are_not_honoured() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    c.allocate(&mut h);
    let mut req = c.build(method::REFRESH, &new_tid(), &|w| {
        w.add_u32(attr::LIFETIME, 0).unwrap();
    });
    // Flip a bit of the LIFETIME value (the first attribute): MI and FINGERPRINT break.
    req[20 + 4 + 3] ^= 1;
    assert!(
        c.send_raw(&mut h, &req).is_none(),
        "bad FINGERPRINT: silently dropped"
    );
    assert_eq!(h.allocations(), 1);
    // Same change without FINGERPRINT: the integrity check catches it.
    let mut buf = [0u8; 512];
    let tid = new_tid();
    let n = {
        let mut w = MessageWriter::new(&mut buf, Class::Request, method::REFRESH, &tid).unwrap();
        w.add_u32(attr::LIFETIME, 0).unwrap();
        w.add_attribute(attr::USERNAME, b"alice").unwrap();
        w.add_attribute(attr::REALM, REALM.as_bytes()).unwrap();
        w.add_attribute(attr::NONCE, c.nonce.as_deref().unwrap())
            .unwrap();
        w.add_message_integrity(&c.key()).unwrap();
        w.finish()
    };
    buf[20 + 4 + 3] ^= 1;
    c.send_raw(&mut h, &buf[..n]).unwrap().expect_error(401);
    assert_eq!(h.allocations(), 1);
}

// ---------------------------------------------------------------------------------------
// The core's links to its driver and the control plane: events, blacklist, deletes,
// reservation handles, seeded randomness
// ---------------------------------------------------------------------------------------

#[test]
fn auth_failures_and_refused_peers_are_reported_as_events_challenges_are_not() {
    let mut h = H::new();
    let src: IpAddr = "198.51.100.7".parse().unwrap();
    let mut c = h.client("198.51.100.7:5000", "alice", "wrong");
    // The first round trip (no credentials) is a challenge, not a failure; neither is a
    // successful Allocate.
    let unsigned = c.build(method::ALLOCATE, &new_tid(), &udp);
    c.send_raw(&mut h, &unsigned).unwrap().expect_error(401);
    let mut ok = h.client("198.51.100.8:5000", "alice", "secret");
    ok.allocate(&mut h);
    assert!(h.heard().events.is_empty(), "{:?}", h.heard().events);
    // Signed with the wrong password (after learning the nonce from a challenge).
    c.allocate_with(&mut h, &udp).expect_error(401);
    assert_eq!(h.heard().events, vec![(EventKind::AuthFailure, src)]);
    // A peer the policy refuses.
    ok.permit(&mut h, &[sa("127.0.0.1:5000")]).expect_error(403);
    assert_eq!(
        h.heard().events[1..],
        [(EventKind::PeerDenied, "198.51.100.8".parse().unwrap())]
    );
}

#[test]
fn a_blacklisted_source_is_dropped_and_loses_its_allocations() {
    let mut h = H::new();
    let mut bad = h.client("198.51.100.7:5000", "alice", "secret");
    let mut good = h.client("198.51.100.8:5000", "alice", "secret");
    let (_, bad_relay) = bad.allocate(&mut h);
    good.allocate(&mut h);
    bad.bind(&mut h, 0x4000, sa(PEER1));
    let bad_id = h
        .server
        .turn()
        .table()
        .slots()
        .find(|(_, a)| a.client == bad.addr)
        .map(|(_, a)| a.id)
        .unwrap();
    {
        let mut heard = h.control.0.borrow_mut();
        heard.blocked.insert(bad.addr.ip());
        heard.blacklist_generation += 1;
    }
    // At once: its packets are dropped and counted.
    assert!(bad.channel_data(&mut h, 0x4000, b"x", 0).is_none());
    assert_eq!(h.stat(Counter::DropBlacklisted), 1);
    // At the next tick: its allocation ends, the other stays.
    h.advance_ms(100);
    h.tick();
    assert_eq!(h.allocations(), 1);
    assert_eq!(h.io.closed, vec![bad_relay]);
    assert_eq!(h.heard().removed, vec![bad_id]);
    assert_eq!(h.stat(Counter::TurnAllocationsDeleted), 1);
    assert_eq!(h.stat(Counter::TurnAllocationsActive), 1);
    assert_eq!(h.stat(Counter::TurnChannelsActive), 0);
}

#[test]
fn delete_requests_from_the_control_plane_end_allocations_and_are_acknowledged() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    let id = h.server.turn().table().slots().next().unwrap().1.id;
    assert!(h.heard().published.contains(&id), "listed when created");
    h.control.0.borrow_mut().deletes = vec![id, 999_999];
    h.advance_ms(100);
    h.tick();
    assert_eq!(h.allocations(), 0);
    assert_eq!(h.io.closed, vec![relay]);
    assert_eq!(h.heard().deleted, vec![id]);
    // Another worker's id is left for that worker.
    assert_eq!(h.heard().deletes, vec![999_999]);
    assert_eq!(h.stat(Counter::TurnAllocationsDeleted), 1);
}

#[test]
fn a_reservation_is_released_when_its_even_port_cannot_be_opened() {
    let mut h = H::with(|c| c.turn.relay_ports = PortRange::new(50000, 50009).unwrap());
    // Odd ports can be reserved, no even port can be opened.
    h.io.fail_ports = (50000..=50009).filter(|p| p % 2 == 0).collect();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
    });
    r.expect_error(508);
    assert!(!h.io.reserved.is_empty(), "odd ports were reserved");
    assert_eq!(h.io.released, h.io.reserved, "and every one was released");
    assert!(h.io.holding.is_empty());
    assert!(h.shared.reservations.lock().unwrap().is_empty());
}

#[test]
fn relay_ports_and_tokens_come_from_the_drivers_seed() {
    let run = |seed: u8| {
        let mut h = H::new();
        let settings = Arc::clone(h.server.settings());
        h.server = Server::new(
            settings,
            Arc::clone(&h.shared),
            &[seed; 32],
            ControlPlane::detached(),
        );
        let mut c = h.client("198.51.100.7:5000", "alice", "secret");
        let r = c.allocate_with(&mut h, &|w| {
            udp(w);
            w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
        });
        assert!(r.is_success(), "{:?}", r.code());
        (
            r.xor(attr::XOR_RELAYED_ADDRESS).unwrap().port(),
            r.get(attr::RESERVATION_TOKEN).unwrap(),
        )
    };
    assert_eq!(run(1), run(1));
    let (a, b) = (run(1), run(2));
    assert_ne!(a.1, b.1, "another seed, another token");
}

// ---------------------------------------------------------------------------------------
// RFC 6062 TCP relays (the core's part; the sockets are the stream driver's)
// ---------------------------------------------------------------------------------------

fn tcp(w: &mut MessageWriter<'_>) {
    w.add_attribute(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])
        .unwrap();
}

fn peer_attr(peer: SocketAddr) -> impl Fn(&mut MessageWriter<'_>) {
    move |w| w.add_xor_address(attr::XOR_PEER_ADDRESS, peer).unwrap()
}

/// The Connect answer the core queued for the control connection `conn`.
fn connect_answer(h: &mut H, conn: usize) -> Vec<u8> {
    let events = h.tcp_events();
    events
        .into_iter()
        .find_map(|e| match e {
            crate::turn::TcpEvent::Message { conn: c, bytes, .. } if c == conn => Some(bytes),
            _ => None,
        })
        .expect("a queued Connect answer")
}

#[test]
fn tcp_relay_connect_waits_for_the_handshake_and_unbound_connections_time_out() {
    let mut h = H::new();
    let mut c = h
        .client("198.51.100.7:5000", "alice", "secret")
        .over_stream(10_000);
    let r = c.allocate_with(&mut h, &tcp);
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(h.io.tcp_listeners.len(), 1, "the relay is a TCP listener");
    // Permission first (403 without), then the TCP connection starts; no answer yet.
    c.request(&mut h, method::CONNECT, &peer_attr(sa(PEER1)))
        .expect_error(403);
    c.permit(&mut h, &[sa(PEER1)]);
    let req = c.build(method::CONNECT, &new_tid(), &peer_attr(sa(PEER1)));
    assert!(
        c.send_raw(&mut h, &req).is_none(),
        "answered after the handshake"
    );
    let (sock, peer) = h.io.connects[0];
    assert_eq!(peer, sa(PEER1));
    // The handshake ends: success with CONNECTION-ID, signed with the allocation's key.
    let now = h.now();
    h.server.tcp_connected(now, &mut h.io, sock, true);
    let bytes = connect_answer(&mut h, 10_000);
    let m = stun::Message::parse(&bytes).expect("a STUN message");
    assert_eq!(m.class(), Class::SuccessResponse);
    stun::verify_message_integrity(&m, &c.key()).expect("MESSAGE-INTEGRITY");
    assert!(m.attributes().any(|a| a.typ == attr::CONNECTION_ID));
    // Nobody binds it: closed after 30 s, counted.
    h.advance_and_tick(29);
    assert!(h.io.live.contains_key(&sock));
    h.advance_and_tick(2);
    assert!(h.io.closed.contains(&sock));
    assert_eq!(h.stat(Counter::TcpRelayClosedUnbound), 1);

    // A handshake that never ends: 447 after 30 s, and the socket closed.
    let req = c.build(method::CONNECT, &new_tid(), &peer_attr(sa(PEER1)));
    assert!(c.send_raw(&mut h, &req).is_none());
    let (sock2, _) = h.io.connects[1];
    h.advance_and_tick(31);
    assert!(h.io.closed.contains(&sock2));
    let bytes = connect_answer(&mut h, 10_000);
    let m = stun::Message::parse(&bytes).expect("a STUN message");
    assert_eq!(m.class(), Class::ErrorResponse);
    let code = m
        .get(attr::ERROR_CODE)
        .map(|v| attr::decode_error_code(v).unwrap().0);
    assert_eq!(code, Some(447));
    assert_eq!(h.stat(Counter::TcpRelayConnectFailed), 1);
}

#[test]
fn tcp_relay_refusals_and_data_connections_end_with_the_allocation() {
    let mut h = H::new();
    let mut c = h
        .client("198.51.100.7:5000", "alice", "secret")
        .over_stream(10_000);
    // Attributes only UDP relays know: 400.
    c.allocate_with(&mut h, &|w| {
        tcp(w);
        w.add_attribute(attr::EVEN_PORT, &[0x80]).unwrap();
    })
    .expect_error(400);
    let r = c.allocate_with(&mut h, &tcp);
    assert!(r.is_success());
    let (listener, _) = h.io.tcp_listeners[0];
    // Connect on a UDP allocation: 400.
    let mut u = h.client("198.51.100.8:5000", "alice", "secret");
    u.allocate(&mut h);
    u.permit(&mut h, &[sa(PEER1)]);
    u.request(&mut h, method::CONNECT, &peer_attr(sa(PEER1)))
        .expect_error(400);
    // A peer without a permission is refused; with one, the client is told.
    let now = h.now();
    assert!(!h
        .server
        .tcp_accepted(now, &mut h.io, listener, sa(PEER1), 7777));
    assert_eq!(h.stat(Counter::TcpRelayRefused), 1);
    c.permit(&mut h, &[sa(PEER1)]);
    assert!(h
        .server
        .tcp_accepted(now, &mut h.io, listener, sa(PEER1), 7777));
    let events = h.tcp_events();
    let Some(crate::turn::TcpEvent::Message { bytes, conn, .. }) = events.first() else {
        panic!("no ConnectionAttempt: {events:?}");
    };
    assert_eq!(*conn, 10_000);
    let m = stun::Message::parse(bytes).unwrap();
    assert_eq!(m.class(), Class::Indication);
    assert_eq!(m.method(), method::CONNECTION_ATTEMPT);
    let id = m
        .attributes()
        .find(|a| a.typ == attr::CONNECTION_ID)
        .map(|a| u32::from_be_bytes(a.value.try_into().unwrap()))
        .unwrap();
    // ConnectionBind: by another user 441, over UDP 400, then on a new connection.
    let bind = move |w: &mut MessageWriter<'_>| w.add_u32(attr::CONNECTION_ID, id).unwrap();
    let mut bob = h
        .client("198.51.100.7:5002", "bob", "hunter2")
        .over_stream(10_002);
    bob.request(&mut h, method::CONNECTION_BIND, &bind)
        .expect_error(441);
    let mut over_udp = h.client("198.51.100.7:5003", "alice", "secret");
    over_udp
        .request(&mut h, method::CONNECTION_BIND, &bind)
        .expect_error(400);
    let mut d = h
        .client("198.51.100.7:5001", "alice", "secret")
        .over_stream(10_001);
    let r = d.request(&mut h, method::CONNECTION_BIND, &bind);
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(
        h.tcp_events(),
        vec![crate::turn::TcpEvent::Pipe {
            conn: 10_001,
            peer: 7777
        }]
    );
    // Bound: no timeout any more.
    h.advance_and_tick(40);
    assert_eq!(h.stat(Counter::TcpRelayClosedUnbound), 0);
    // The control connection closes: the allocation, its listener and the data connection
    // end.
    h.io.live.insert(7777, sa(PEER1));
    let now = h.now();
    h.server
        .stream_closed(now, &mut h.io, 10_000, sa("198.51.100.7:5000"));
    assert!(h.io.closed.contains(&7777));
    assert!(h.io.closed.contains(&listener));
    assert_eq!(h.stat(Counter::TcpRelayClosedAllocation), 1);
    assert!(h.server.turn().tcp_relays().is_empty());
}

// ---------------------------------------------------------------------------------------
// Scale: several relay addresses, timers
// ---------------------------------------------------------------------------------------

/// Several `turn.relay_ip` addresses of a family share out the relays (each has the whole
/// port range, so the box holds more than one address's 64k ports); the address a relay is
/// bound to is the one advertised.
#[test]
fn relays_spread_over_every_relay_ip_of_the_family() {
    let mut h = H::with(|c| {
        c.turn.relay_ip = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
    });
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..60 {
        let mut c = h.client(&format!("198.51.100.{}:5000", i + 1), "alice", "secret");
        let r = c.allocate_with(&mut h, &udp);
        assert!(r.is_success(), "{:?}", r.code());
        let relayed = r.xor(attr::XOR_RELAYED_ADDRESS).unwrap();
        let bound = h.io.opened.last().unwrap().1;
        assert_eq!(bound, relayed);
        *seen.entry(relayed.ip()).or_insert(0) += 1;
    }
    let v4: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), v4, "{seen:?}");
    // Roughly even: 60 over 3 addresses, none starved.
    assert!(seen.values().all(|n| *n >= 8), "{seen:?}");
}

/// A Refresh to a shorter lifetime than the allocation had must bring its expiry timer
/// forward: the allocation ends at the new time, not at the old one.
#[test]
fn a_refresh_to_a_shorter_lifetime_expires_at_the_new_time() {
    let mut h = H::new();
    let mut c = h.client("198.51.100.7:5000", "alice", "secret");
    let r = c.allocate_with(&mut h, &|w| {
        udp(w);
        w.add_u32(attr::LIFETIME, 3600).unwrap();
    });
    assert!(r.is_success());
    h.advance_and_tick(10);
    let r = c.refresh(&mut h, Some(600));
    assert!(r.is_success());
    h.advance_and_tick(599);
    assert_eq!(h.allocations(), 1);
    h.advance_and_tick(2);
    assert_eq!(h.allocations(), 0);
    assert_eq!(h.stat(Counter::TurnAllocationsExpired), 1);
}

/// The control plane's delete of one allocation among many finds it by id.
#[test]
fn a_control_plane_delete_ends_the_allocation_with_that_id() {
    let mut h = H::new();
    let mut relays = Vec::new();
    for i in 0..50 {
        let mut c = h.client(&format!("198.51.100.{}:5000", i + 1), "alice", "secret");
        relays.push(c.allocate(&mut h).1);
    }
    let (id, relay) = {
        let t = h.server.turn().table();
        let (_, a) = t.slots().nth(17).unwrap();
        (a.id, a.relay.socket)
    };
    h.control.0.borrow_mut().deletes.push(id);
    h.advance_and_tick(1);
    assert_eq!(h.allocations(), 49);
    assert_eq!(h.io.closed, vec![relay]);
    assert!(h.server.turn().table().by_id(id).is_none());
}

#[path = "../fastpath/tests.rs"]
mod fastpath;
