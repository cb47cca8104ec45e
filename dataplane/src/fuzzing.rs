//! Entry points of the dataplane's fuzz targets (`fuzz/fuzz_targets/*.rs`, run by
//! `scripts/fuzz.sh`). They live in the library so that `tests/fuzz_regressions.rs` replays
//! the committed seed corpus and every input a fuzzer crashed on with a plain `cargo test`.
//!
//! Each takes arbitrary bytes and must not panic; the checks below hold for every input.
//! The protocol-core targets build a fresh [`Server`] per input, so an input replays alone.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_shared::config::Config;

use portico_shared::counters::Counter;
use portico_shared::shm::{EventKind, MediaFailure, MediaRequest};

use crate::io::tcp::{stream_frame, StreamFrame};
use crate::io::uring::PAYLOAD_CAPACITY;
use crate::media::srtp::{self, LegKey, MASTER_LEN};
use crate::media::{Command, Media, MediaControl, MediaCtx, PublishedLegs};
use crate::server::{Action, Now, Received, Server, Settings, Stats, Transport, HEADROOM};
use crate::stun::integrity::{ALGORITHM_SHA256, DEFAULT_PASSWORD_ALGORITHMS};
use crate::stun::MessageWriter;
use crate::stun::{attr, integrity, message_len_from_header, method, Class, Message};
use crate::turn::auth::{rest_key, NONCE_BYTES};
use crate::turn::{ControlPlane, DefaultRoutes, Events, RelayIo, Reserved, TcpEvent, TurnShared};

/// STUN parsing, every attribute decoder and the integrity checks.
pub fn stun_parse(data: &[u8]) {
    let announced = message_len_from_header(data);
    let Ok(m) = Message::parse(data) else {
        return;
    };
    assert_eq!(
        announced,
        Some(data.len()),
        "a parsed message fills its length"
    );
    let tid = m.transaction_id();
    for a in m.attributes() {
        let v = a.value;
        let _ = attr::decode_address(v);
        let _ = attr::decode_xor_address(v, &tid);
        let _ = attr::decode_error_code(v);
        let _ = attr::decode_unknown_attributes(v).map(|it| it.count());
        let _ = attr::decode_change_request(v);
        let _ = attr::decode_u32(v);
        let _ = attr::decode_response_port(v);
        let _ = attr::decode_requested_transport(v);
        let _ = attr::decode_channel_number(v);
        let _ = attr::decode_even_port(v);
        let _ = attr::decode_address_family(v);
        let _ = attr::decode_password_algorithms(v).map(|it| it.count());
        let _ = attr::decode_password_algorithm(v);
    }
    let _ = integrity::verify_message_integrity(&m, b"key");
    let _ = integrity::verify_message_integrity_sha256(&m, b"key");
    let _ = integrity::negotiated_algorithm(&m, &DEFAULT_PASSWORD_ALGORITHMS);
}

/// The configuration loader: any text gives a configuration or an error naming the problem,
/// and a loaded configuration survives its own round trip.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::from_toml(text) {
        let again = Config::from_toml(&c.to_toml());
        assert_eq!(again.as_ref().ok(), Some(&c), "round trip: {again:?}");
    }
}

const REALM: &str = "example.org";
const REST_SECRET: &str = "rest-secret";
/// alice has a password (MD5 and SHA-256 keys), bob only an MD5 key (MD5("bob:example.org:pw")),
/// REST API users sign with `REST_SECRET`.
const CONFIG: &str = r#"
[turn]
listen = ["127.0.0.1:40001", "[::1]:40001"]
realm = "example.org"
users = [
    { name = "alice", password = "secret" },
    { name = "bob", key = "ab2c0f6cfd5c3af30450d4729d97bf17" },
]
shared_secret = ["rest-secret"]
allow_peers = ["0.0.0.0/0", "::/0"]
deny_peers = ["203.0.113.0/24"]
max_allocations_per_user = 3
max_permissions = 4
max_channels = 4
error_rate = 1000000
"#;

/// Relay sockets: counted, never bound.
struct Io {
    next: usize,
}

impl RelayIo for Io {
    fn open(&mut self, _: SocketAddr, _: bool) -> io::Result<usize> {
        let i = self.next;
        self.next += 1;
        Ok(i)
    }
    fn reserve(&mut self, _: SocketAddr) -> io::Result<Reserved> {
        Err(io::Error::from(io::ErrorKind::AddrInUse))
    }
    fn adopt(&mut self, _: Reserved, _: bool) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn release(&mut self, _: Reserved) {}
    fn close(&mut self, _: usize) {}
}

/// What inputs share: the server (emptied after each input) and the state its workers share.
struct Shared {
    server: Server,
    turn: Arc<TurnShared>,
}

/// `conns`: stream connection indices between the listen sockets and the relay sockets.
fn new_shared(conns: usize) -> Shared {
    let config = Config::from_toml(CONFIG).unwrap_or_else(|e| panic!("fuzz config: {e}"));
    let routes = DefaultRoutes::default();
    let settings = Arc::new(Settings::from_config(&config, &[5u8; 32], &routes));
    let turn = Arc::new(TurnShared::new(1));
    let first_relay = settings.endpoints.len() + conns;
    let server = Server::with_first_relay(
        settings,
        Arc::clone(&turn),
        &[1; 32],
        ControlPlane::detached(),
        first_relay,
    );
    Shared { server, turn }
}

thread_local! {
    static SHARED: RefCell<Option<Shared>> = const { RefCell::new(None) };
    /// The same with room for stream connections (the TCP driver's indices).
    static STREAM_SHARED: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// The protocol core for one input: the server, its clock and its relay sockets. Building a
/// server per input would cost more than most inputs (its rate tables are large), so one
/// server serves all inputs of a thread and ends every allocation after each: no allocation
/// outlives its input, and what an input leaves behind (rate counters) changes no answer.
struct Core<'a> {
    server: &'a mut Server,
    io: Io,
    base: Instant,
    elapsed: Duration,
    first_relay: usize,
}

impl Core<'_> {
    fn now(&self) -> Now {
        Now {
            mono: self.base + self.elapsed,
            unix: 1_700_000_000 + self.elapsed.as_secs(),
        }
    }

    fn advance(&mut self, by: Duration) {
        self.elapsed += by;
        let now = self.now();
        self.server.tick(now, &mut self.io);
    }

    /// Hands `data` to the server; returns what it sends (checked to lie inside the buffer)
    /// and from which socket.
    fn handle(
        &mut self,
        transport: Transport,
        socket: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> Option<(Vec<u8>, usize)> {
        let mut buf = vec![0u8; 2048];
        let n = data.len().min(buf.len() - HEADROOM);
        buf[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
        let now = self.now();
        let rx = Received {
            transport,
            socket,
            from,
            buf: &mut buf,
            start: HEADROOM,
            len: n,
        };
        let action = self.server.handle(now, &mut self.io, rx);
        match action {
            Action::Drop => None,
            Action::Send {
                offset,
                len,
                socket,
                ..
            } => {
                assert!(
                    offset.checked_add(len).is_some_and(|end| end <= buf.len()),
                    "reply at {offset}+{len} outside the buffer"
                );
                Some((buf[offset..offset + len].to_vec(), socket))
            }
        }
    }

    /// Hands a message framed from stream connection `conn` to the server, as the TCP
    /// driver does; returns the Pipe event when a ConnectionBind made it a data connection.
    fn handle_stream(&mut self, conn: usize, from: SocketAddr, frame: &[u8]) -> bool {
        let mut buf = vec![0u8; 2048];
        let n = frame.len().min(buf.len() - HEADROOM);
        buf[HEADROOM..HEADROOM + n].copy_from_slice(&frame[..n]);
        let now = self.now();
        let rx = Received {
            transport: Transport::Tcp,
            socket: 0,
            from,
            buf: &mut buf,
            start: HEADROOM,
            len: n,
        };
        if let Action::Send { offset, len, .. } =
            self.server.handle_stream(now, &mut self.io, rx, conn)
        {
            assert!(
                offset.checked_add(len).is_some_and(|end| end <= buf.len()),
                "reply at {offset}+{len} outside the buffer"
            );
        }
        let mut events = Vec::new();
        self.server.take_tcp_events(&mut events);
        events
            .iter()
            .any(|e| matches!(e, TcpEvent::Pipe { conn: k, .. } if *k == conn))
    }

    fn relay_socket(&self, b: u8) -> usize {
        self.first_relay + usize::from(b % 4)
    }
}

fn with_core(f: impl FnOnce(&mut Core<'_>)) {
    with_core_in(&SHARED, 0, f)
}

fn with_core_in(
    slot: &'static std::thread::LocalKey<RefCell<Option<Shared>>>,
    conns: usize,
    f: impl FnOnce(&mut Core<'_>),
) {
    slot.with_borrow_mut(|s| {
        let Shared { server, turn } = s.get_or_insert_with(|| new_shared(conns));
        let first_relay = server.turn().first_relay_socket;
        let mut core = Core {
            server,
            io: Io { next: first_relay },
            base: Instant::now(),
            elapsed: Duration::ZERO,
            first_relay,
        };
        f(&mut core);
        let now = core.now();
        core.server.shutdown(now, &mut core.io);
        // Every allocation gave back what it held: quotas, per-user counts, holders.
        assert_eq!(
            turn.allocations.load(Ordering::Relaxed),
            0,
            "allocations left"
        );
        let users = turn.per_user.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert_eq!(users, 0, "per-user counts left");
        let holders = turn.holders.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert_eq!(holders, 0, "allocation holders left");
    });
}

/// Clients, peers (one denied, one a client, one on the server itself) by index.
fn client(b: u8) -> SocketAddr {
    match b % 8 {
        0..=3 => SocketAddr::from(([198, 51, 100, b % 8 + 1], 5000)),
        4 => SocketAddr::from(([198, 51, 100, 1], 5001)),
        5 => SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 5000)),
        6 => SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2), 5000)),
        _ => SocketAddr::from((Ipv4Addr::new(198, 51, 100, 9).to_ipv6_mapped(), 5000)),
    }
}

fn peer(b: u8) -> SocketAddr {
    match b % 8 {
        0 => SocketAddr::from(([8, 8, 8, 8], 9)),
        1 => SocketAddr::from(([8, 8, 4, 4], 5000)),
        2 => SocketAddr::from(([203, 0, 113, 5], 5000)),
        3 => SocketAddr::from(([198, 51, 100, 2], 5000)),
        4 => SocketAddr::from(([127, 0, 0, 1], 40001)),
        5 => SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9), 7)),
        6 => SocketAddr::from(([0, 0, 0, 0], 0)),
        _ => SocketAddr::from((IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 65535)),
    }
}

/// Reads the input front to back; past the end every read gives zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// Whole datagrams into the protocol core (STUN, TURN requests, Send indications,
/// ChannelData, peer data on relay sockets), several per input: per datagram a control
/// byte (socket, transport, source), a 16-bit length and the bytes.
pub fn server_handle(data: &[u8]) {
    with_core(|core| {
        let mut input = Input(data);
        let mut count = 0u32;
        while !input.is_empty() {
            let ctl = input.byte();
            let len = usize::from(input.u16());
            let payload = input.bytes(len);
            let socket = if ctl & 0x04 != 0 {
                core.relay_socket(ctl)
            } else {
                usize::from(ctl & 1)
            };
            let transport = if ctl & 0x08 != 0 {
                Transport::Tcp
            } else {
                Transport::Udp
            };
            let from = if socket >= core.first_relay {
                peer(ctl >> 5)
            } else {
                client(ctl >> 5)
            };
            let reply = core.handle(transport, socket, from, payload);
            if reply.is_some() && socket < core.first_relay {
                // Garbage is never answered (no reflection).
                let is_stun = Message::parse(payload).is_ok();
                let is_channel = payload.first().is_some_and(|b| b & 0xC0 == 0x40);
                assert!(is_stun || is_channel, "answered {payload:02x?}");
            }
            count += 1;
            if ctl & 0x10 != 0 || count & 7 == 0 {
                core.advance(Duration::from_millis(u64::from(ctl) * 40));
            }
        }
    });
}

/// The credential a signed request uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum User {
    /// alice: configured password, MD5 or SHA-256.
    Alice,
    /// bob: configured MD5 key only.
    Bob,
    /// A TURN REST API name, valid for another hour.
    Rest,
    /// A TURN REST API name that expired a minute ago.
    RestExpired,
}

/// Attributes a signed request can carry, by index; larger indices give a raw type.
const ATTRS: [u16; 12] = [
    attr::REQUESTED_TRANSPORT,
    attr::XOR_PEER_ADDRESS,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::DATA,
    attr::EVEN_PORT,
    attr::RESERVATION_TOKEN,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::ADDITIONAL_ADDRESS_FAMILY,
    attr::DONT_FRAGMENT,
    attr::SOFTWARE,
    attr::CONNECTION_ID,
];

const METHODS: [u16; 8] = [
    method::BINDING,
    method::ALLOCATE,
    method::REFRESH,
    method::CREATE_PERMISSION,
    method::CHANNEL_BIND,
    method::SEND,
    method::CONNECT,
    method::DATA,
];

/// Builds and signs one request from the input. Layout: method, flags, source/transaction
/// byte, attribute count (0-7), then per attribute a selector and its value: an index into
/// [`ATTRS`] (XOR-PEER-ADDRESS: a peer index; REQUESTED-TRANSPORT: the protocol byte;
/// CHANNEL-NUMBER: the low byte; LIFETIME: 4 bytes; others: a length byte and the bytes) or,
/// past its end, a 16-bit type, a length byte and the bytes. Flags: bit 0
/// MESSAGE-INTEGRITY-SHA256, bit 1 the SHA-256 password algorithm, bit 2 USERHASH, bits 3-4
/// the user, bit 5 no FINGERPRINT, bit 6 over TCP, bit 7 an indication. USERNAME (or
/// USERHASH), REALM, a valid NONCE for the source, the integrity attribute and FINGERPRINT
/// are added after the input's attributes.
fn signed(core: &mut Core<'_>, input: &mut Input<'_>) -> Option<Vec<u8>> {
    let m = input.byte();
    let flags = input.byte();
    let s = input.byte();
    let count = input.byte() % 8;
    let method = METHODS[usize::from(m % 8)];
    let class = if flags & 0x80 != 0 || method == method::SEND {
        Class::Indication
    } else {
        Class::Request
    };
    let from = client(s);
    let now = core.now();
    let user = match flags >> 3 & 3 {
        0 => User::Alice,
        1 => User::Bob,
        2 => User::Rest,
        _ => User::RestExpired,
    };
    let name = match user {
        User::Alice => "alice".to_string(),
        User::Bob => "bob".to_string(),
        User::Rest => format!("{}:carol", now.unix + 3600),
        User::RestExpired => format!("{}:carol", now.unix - 60),
    };
    let sha256_alg = flags & 0x02 != 0;
    let realm = REALM.as_bytes();
    let key: Vec<u8> = match user {
        User::Alice if sha256_alg => {
            integrity::long_term_key_sha256(b"alice", realm, b"secret").to_vec()
        }
        User::Alice => integrity::long_term_key_md5(b"alice", realm, b"secret").to_vec(),
        User::Bob => integrity::long_term_key_md5(b"bob", realm, b"pw").to_vec(),
        User::Rest | User::RestExpired => {
            let alg = if sha256_alg {
                ALGORITHM_SHA256
            } else {
                integrity::ALGORITHM_MD5
            };
            rest_key(REST_SECRET.as_bytes(), name.as_bytes(), realm, alg)
                .bytes()
                .to_vec()
        }
    };
    let mut nonce = [0u8; NONCE_BYTES];
    core.server
        .settings()
        .turn
        .credentials
        .nonce(from, now.unix, &mut nonce);

    let mut buf = [0u8; 1500];
    let tid = [s; 12];
    let mut w = MessageWriter::new(&mut buf, class, method, &tid).ok()?;
    for _ in 0..count {
        let sel = input.byte();
        let ok = match ATTRS.get(usize::from(sel)) {
            Some(&attr::XOR_PEER_ADDRESS) => {
                w.add_xor_address(attr::XOR_PEER_ADDRESS, peer(input.byte()))
            }
            Some(&attr::REQUESTED_TRANSPORT) => {
                w.add_attribute(attr::REQUESTED_TRANSPORT, &[input.byte(), 0, 0, 0])
            }
            Some(&attr::CHANNEL_NUMBER) => {
                let lo = input.byte();
                w.add_attribute(attr::CHANNEL_NUMBER, &[0x40, lo, 0, 0])
            }
            Some(&attr::LIFETIME) => {
                let l = u32::from(input.u16()) << 16 | u32::from(input.u16());
                w.add_u32(attr::LIFETIME, l)
            }
            Some(&typ) => {
                let len = usize::from(input.byte());
                w.add_attribute(typ, input.bytes(len))
            }
            None => {
                let typ = input.u16();
                let len = usize::from(input.byte());
                w.add_attribute(typ, input.bytes(len))
            }
        };
        ok.ok()?;
    }
    let id = match user {
        _ if flags & 0x04 != 0 => {
            w.add_attribute(attr::USERHASH, &integrity::userhash(name.as_bytes(), realm))
        }
        _ => w.add_attribute(attr::USERNAME, name.as_bytes()),
    };
    let mut ok = id.is_ok()
        && w.add_attribute(attr::REALM, realm).is_ok()
        && w.add_attribute(attr::NONCE, &nonce).is_ok();
    if sha256_alg {
        ok &= w
            .add_attribute(attr::PASSWORD_ALGORITHMS, &DEFAULT_PASSWORD_ALGORITHMS)
            .is_ok()
            && w.add_password_algorithm(ALGORITHM_SHA256).is_ok();
    }
    let sha256_mi = flags & 0x01 != 0;
    ok &= if sha256_mi {
        w.add_message_integrity_sha256(&key).is_ok()
    } else {
        w.add_message_integrity(&key).is_ok()
    };
    if flags & 0x20 == 0 {
        ok &= w.add_fingerprint().is_ok();
    }
    if !ok {
        return None;
    }
    let n = w.finish();
    let transport = if flags & 0x40 != 0 {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let (reply, out) = core.handle(transport, usize::from(s >> 3 & 1), from, &buf[..n])?;
    if out >= core.first_relay {
        // Relayed to a peer (a Send indication), not an answer.
        return None;
    }
    let r =
        Message::parse(&reply).unwrap_or_else(|e| panic!("unparsable reply {reply:02x?}: {e:?}"));
    assert_eq!(r.transaction_id(), tid, "reply to another transaction");
    // A TURN success answers an authenticated request: it is signed with the same key and
    // the same integrity attribute.
    let valid = match user {
        User::Alice => true,
        User::Bob => !sha256_alg,
        User::Rest => true,
        User::RestExpired => false,
    };
    if r.class() == Class::SuccessResponse && method != method::BINDING {
        assert!(valid, "success for a request that does not authenticate");
        let verified = if sha256_mi {
            integrity::verify_message_integrity_sha256(&r, &key)
        } else {
            integrity::verify_message_integrity(&r, &key)
        };
        assert!(
            verified.is_ok(),
            "success not signed with the request's key: {verified:?}"
        );
    }
    Some(reply)
}

/// The TURN core past authentication: a sequence of operations, each chosen by its first
/// byte. 0-3: a request or indication built from the input and signed with valid
/// credentials for the source it comes from (see [`signed`]); 4: raw bytes to a listen
/// socket; 5: raw bytes from a peer to a relay socket; 6: a ChannelData message; 7: time
/// passes (0 to 2040 s) and the timers run.
pub fn turn_auth(data: &[u8]) {
    turn_auth_replies(data);
}

/// [`turn_auth`], returning the server's replies to the signed requests.
pub fn turn_auth_replies(data: &[u8]) -> Vec<Vec<u8>> {
    let mut replies = Vec::new();
    with_core(|core| {
        let mut input = Input(data);
        while !input.is_empty() {
            match input.byte() % 8 {
                0..=3 => replies.extend(signed(core, &mut input)),
                4 => {
                    let s = input.byte();
                    let len = usize::from(input.byte());
                    let payload = input.bytes(len);
                    let _ = core.handle(Transport::Udp, 0, client(s), payload);
                }
                5 => {
                    let s = input.byte();
                    let len = usize::from(input.byte());
                    let payload = input.bytes(len);
                    let socket = core.relay_socket(s);
                    let _ = core.handle(Transport::Udp, socket, peer(s >> 2), payload);
                }
                6 => {
                    let s = input.byte();
                    let channel = input.byte();
                    let len = input.byte();
                    let payload = input.bytes(usize::from(len));
                    let mut msg = vec![0x40, channel, 0, len];
                    msg.extend_from_slice(payload);
                    let _ = core.handle(Transport::Udp, 0, client(s), &msg);
                }
                _ => {
                    let t = input.byte();
                    core.advance(Duration::from_secs(u64::from(t) * 8));
                }
            }
        }
    });
    replies
}

// ---- The hand-off header -------------------------------------------------------------------

/// The fd hand-off header (`portico_shared::handoff::parse_header`), as the dataplane's
/// hand-off reader (`io/handoff.rs`) reads each datagram. Any bytes give a header or
/// nothing; a header read is the one the control plane writes for its kind and client
/// (but for the unused bytes behind an IPv4 address); and a header written from the input's
/// bytes (any kind, family, port, address) reads back as written, or is refused only for
/// port 0 or an unspecified address.
pub fn handoff_header(data: &[u8]) {
    use portico_shared::handoff::{header, parse_header, HEADER_LEN, MAGIC};
    if let Some((kind, client)) = parse_header(data) {
        assert_eq!(data.len(), HEADER_LEN);
        assert_eq!(&data[..4], MAGIC);
        assert!(
            client.port() != 0 && !client.ip().is_unspecified(),
            "{client}"
        );
        let again = header(kind, client);
        let used = if client.is_ipv4() { 12 } else { HEADER_LEN };
        assert_eq!(
            again[..used],
            data[..used],
            "header rewritten for {kind} {client}"
        );
        assert_eq!(parse_header(&again), Some((kind, client)));
    }
    let mut b = [0u8; 20];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    let port = u16::from_be_bytes([b[1], b[2]]);
    let ip = if b[3] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[4..20]);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let client = SocketAddr::new(ip, port);
    let want = (port != 0 && !ip.is_unspecified()).then_some((b[0], client));
    assert_eq!(parse_header(&header(b[0], client)), want, "{client}");
}

// ---- TURN over a stream ----------------------------------------------------------------------

/// Read sizes from a selector byte: up to 1, 2, ... 4096 bytes (the low nibble), varied by
/// a generator the byte seeds, but at most 256 reads per stream.
struct ReadSizes {
    max: usize,
    min: usize,
    rng: u32,
}

impl ReadSizes {
    fn new(sel: u8, len: usize) -> ReadSizes {
        const MAX: [usize; 16] = [
            1, 2, 3, 4, 5, 7, 8, 13, 20, 64, 100, 512, 1000, 1500, 2048, 4096,
        ];
        ReadSizes {
            max: MAX[usize::from(sel & 0x0f)],
            min: len / 256,
            rng: u32::from(sel) | 0x100,
        }
    }

    fn next(&mut self) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        (1 + self.rng as usize % self.max).max(self.min)
    }
}

/// `stream` framed at once: its frames, where the framing stopped, and whether it stopped
/// at bytes that are no frame (the connection closes there).
fn frames_at_once(stream: &[u8]) -> (Vec<&[u8]>, usize, bool) {
    let mut frames = Vec::new();
    let mut start = 0;
    loop {
        match stream_frame(&stream[start..]) {
            StreamFrame::NeedMore => return (frames, start, false),
            StreamFrame::Bad => return (frames, start, true),
            StreamFrame::Frame(t) => {
                assert!(
                    t >= 4 && t <= stream.len() - start && t <= PAYLOAD_CAPACITY,
                    "frame of {t} bytes at {start}"
                );
                frames.push(&stream[start..start + t]);
                start += t;
            }
        }
    }
}

/// TURN over TCP and TLS (RFC 8656 §12.5, RFC 6062): a client's byte stream read in chunks
/// of any size into a connection's input buffer (the TCP driver's size) and cut into STUN
/// messages and padded ChannelData by the driver's framer (`io/tcp/conn.rs`,
/// `stream_frame`); the frames then go to the protocol core as the messages of one stream
/// connection (Allocate, Connect, ConnectionBind, ChannelData over TCP). The first byte picks
/// the read sizes and the client, the rest is the stream. Reads of any size must give the
/// same frames as the stream at once, stop at the same framing error, and leave the same
/// bytes unframed; the buffer never fills up without a frame in it (a frame always fits).
pub fn tcp_framing(data: &[u8]) {
    tcp_framing_frames(data);
}

/// [`tcp_framing`], returning the lengths of the frames and whether the stream was refused.
pub fn tcp_framing_frames(data: &[u8]) -> (Vec<usize>, bool) {
    let Some((&sel, stream)) = data.split_first() else {
        return (Vec::new(), false);
    };
    let (whole, end, bad) = frames_at_once(stream);
    let mut reads = ReadSizes::new(sel, stream.len());
    let mut buf = vec![0u8; PAYLOAD_CAPACITY];
    let (mut in_len, mut pos) = (0, 0);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut closed = false;
    while pos < stream.len() && !closed {
        assert!(
            in_len < buf.len(),
            "the input buffer filled up without a frame in it"
        );
        let n = reads.next().min(buf.len() - in_len).min(stream.len() - pos);
        buf[in_len..in_len + n].copy_from_slice(&stream[pos..pos + n]);
        in_len += n;
        pos += n;
        let mut start = 0;
        loop {
            match stream_frame(&buf[start..in_len]) {
                StreamFrame::NeedMore => break,
                StreamFrame::Bad => {
                    closed = true;
                    break;
                }
                StreamFrame::Frame(t) => {
                    frames.push(buf[start..start + t].to_vec());
                    start += t;
                }
            }
        }
        buf.copy_within(start..in_len, 0);
        in_len -= start;
    }
    assert_eq!(frames.len(), whole.len(), "frames in reads and at once");
    for (i, (a, b)) in frames.iter().zip(&whole).enumerate() {
        assert_eq!(a.as_slice(), *b, "frame {i}");
    }
    assert_eq!(closed, bad, "a framing error in reads and at once");
    if !closed {
        assert_eq!(in_len, stream.len() - end, "bytes left unframed");
    }
    with_core_in(&STREAM_SHARED, 4, |core| {
        let conn = core.first_relay - 1;
        let from = client(sel >> 4);
        for f in &whole {
            if core.handle_stream(conn, from, f) {
                // A data connection now: what follows is the peer's.
                break;
            }
        }
        let now = core.now();
        core.server.stream_closed(now, &mut core.io, conn, from);
    });
    (whole.iter().map(|f| f.len()).collect(), bad)
}

// ---- Media: the SRTP check and the relay's legs ---------------------------------------------

/// Media relay sockets: indices from 100, by local address (also the media core's unit
/// tests' driver). Binding a taken address fails, as bind(2) would; port 0 is never taken.
#[derive(Default)]
pub(crate) struct MediaIo {
    pub(crate) open: Vec<(usize, SocketAddr)>,
    next: usize,
}

impl RelayIo for MediaIo {
    fn open(&mut self, addr: SocketAddr, _: bool) -> io::Result<usize> {
        if addr.port() != 0 && self.open.iter().any(|(_, a)| *a == addr) {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        self.next += 1;
        let i = 100 + self.next;
        self.open.push((i, addr));
        Ok(i)
    }
    fn reserve(&mut self, _: SocketAddr) -> io::Result<Reserved> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn adopt(&mut self, _: Reserved, _: bool) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn release(&mut self, _: Reserved) {}
    fn close(&mut self, socket: usize) {
        self.open.retain(|(i, _)| *i != socket);
    }
    fn local_addr(&self, socket: usize) -> Option<SocketAddr> {
        let (_, a) = self.open.iter().find(|(i, _)| *i == socket)?;
        // A wildcard socket gets a port of its own, as bind(2) would give it.
        Some(if a.port() == 0 {
            SocketAddr::new(a.ip(), 50_000 + socket as u16)
        } else {
            *a
        })
    }
}

/// One session request, and what became of it.
#[derive(Default)]
struct MediaCtl {
    queue: Vec<Command>,
    created: Option<[SocketAddr; 2]>,
}

impl MediaControl for MediaCtl {
    fn worker(&self) -> (usize, usize) {
        (0, 1)
    }
    fn commands(&mut self, out: &mut Vec<Command>) {
        out.append(&mut self.queue);
    }
    fn created(&mut self, _: usize, locals: [SocketAddr; 2]) {
        self.created = Some(locals);
    }
    fn failed(&mut self, _: usize, why: MediaFailure) {
        panic!("the fuzz session was refused: {why:?}");
    }
    fn publish(&mut self, _: usize, _: PublishedLegs) {}
    fn ended(&mut self, _: usize) {}
}

struct NoEvents;

impl Events for NoEvents {
    fn report(&mut self, _: EventKind, _: IpAddr, _: u64) {}
}

const MEDIA_CONFIG: &str = r#"
[turn]
relay_ip = "127.0.0.1"
allow_peers = ["127.0.0.0/8"]
[media]
ports = "40000-40009"
learn_window = "2s"
idle_timeout = "10s"
"#;

/// RFC 3711 Appendix B.3's master key and salt: leg 0's SRTP key.
const MASTER: [u8; MASTER_LEN] = [
    0xE1, 0xF9, 0x7A, 0x0D, 0x3E, 0x01, 0x8B, 0xE0, 0xD6, 0x4F, 0xA3, 0x2C, 0x06, 0xDE, 0x41, 0x39,
    0x0E, 0xC6, 0x75, 0xAD, 0x49, 0x8A, 0xFE, 0xEB, 0xB6, 0x96, 0x0B, 0x3A, 0xAB, 0xE6,
];
/// Its SRTP authentication key (RFC 3711 B.3, label 0x01, the first 20 bytes).
const RTP_AUTH: [u8; 20] = [
    0xCE, 0xBE, 0x32, 0x1F, 0x6F, 0xF7, 0x71, 0x6B, 0x6F, 0xD4, 0xAB, 0x49, 0xAF, 0x25, 0x6A, 0x15,
    0x6D, 0x38, 0xBA, 0xA4,
];

/// What the media harness keeps between inputs: settings and the leg keys.
struct MediaShared {
    settings: Settings,
    key: LegKey,
    rtp: aws_lc_rs::hmac::Key,
    rtcp: aws_lc_rs::hmac::Key,
}

fn new_media_shared() -> MediaShared {
    use aws_lc_rs::hmac;
    let config = Config::from_toml(MEDIA_CONFIG).unwrap_or_else(|e| panic!("media config: {e}"));
    let routes = DefaultRoutes::default();
    let settings = Settings::from_config(&config, &[6u8; 32], &routes);
    let key = LegKey::new(&MASTER).unwrap_or_else(|| panic!("SRTP key"));
    let mut rtcp = [0u8; 20];
    srtp::derive(&MASTER, srtp::LABEL_RTCP_AUTH, &mut rtcp).unwrap_or_else(|_| panic!("SRTCP key"));
    let alg = hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY;
    MediaShared {
        settings,
        key,
        rtp: hmac::Key::new(alg, &RTP_AUTH),
        rtcp: hmac::Key::new(alg, &rtcp),
    }
}

thread_local! {
    static MEDIA: RefCell<Option<MediaShared>> = const { RefCell::new(None) };
}

/// The tag an SRTP (rollover counter 0) or SRTCP packet without its tag should carry.
fn srtp_tag(m: &MediaShared, body: &[u8], rtcp: bool) -> [u8; 10] {
    use aws_lc_rs::hmac;
    let full = if rtcp {
        hmac::sign(&m.rtcp, body)
    } else {
        let mut c = hmac::Context::with_key(&m.rtp);
        c.update(body);
        c.update(&[0; 4]);
        c.sign()
    };
    let mut tag = [0u8; 10];
    tag.copy_from_slice(&full.as_ref()[..10]);
    tag
}

/// Whether `packet` is SRTP (SRTCP) that leg 0's key authenticates, computed here from the
/// RFC 3711 test vector's key rather than by the code under test.
fn srtp_valid(m: &MediaShared, packet: &[u8], rtcp: bool) -> bool {
    if packet.len() < 22 || packet[0] >> 6 != 2 {
        return false;
    }
    let (body, tag) = packet.split_at(packet.len() - 10);
    srtp_tag(m, body, rtcp) == tag
}

/// The SRTP/SRTCP authentication check (`media/srtp.rs`) and the media relay's learning
/// path, which runs it on every packet from a new source of a leg with a key. One session:
/// leg 0 with the RFC 3711 B.3 SRTP key, leg 1 without. Per datagram: a control byte (bits
/// 0-1: leg 0 RTP, leg 0 RTCP, leg 1 RTP, leg 1 RTCP; bits 2-4: the source, one outside
/// `allow_peers`; bit 5: the harness appends the right tag; bit 6: one bit of the packet is
/// flipped after signing; bit 7: time passes and the timers run), a length byte and the
/// bytes. Checks: a packet verifies exactly when its tag is right (computed independently),
/// a flipped bit never verifies, leg 0 learns a source only from a packet that verifies,
/// and what is forwarded leaves from the other leg's socket of the same kind, unchanged.
pub fn media_srtp(data: &[u8]) {
    media_srtp_forwarded(data);
}

/// [`media_srtp`], returning per datagram whether it was forwarded.
pub fn media_srtp_forwarded(data: &[u8]) -> Vec<bool> {
    let mut forwarded = Vec::new();
    MEDIA.with_borrow_mut(|slot| {
        let m = slot.get_or_insert_with(new_media_shared);
        let mut media = Media::new(0);
        let mut io = MediaIo::default();
        let mut stats = Stats::default();
        let mut control = MediaCtl::default();
        let t0 = Instant::now();
        let mut elapsed = Duration::ZERO;
        let loopback = |last: u8, port: u16| SocketAddr::from(([127, 0, 0, last], port));
        control.queue.push(Command::Create(MediaRequest {
            index: 0,
            id: 1,
            addresses: [Some(loopback(1, 5000)), Some(loopback(2, 6000))],
            srtp: [Some(MASTER), None],
        }));
        let now = |elapsed: Duration| Now {
            mono: t0 + elapsed,
            unix: 1_700_000_000 + elapsed.as_secs(),
        };
        media.tick(
            &mut MediaCtx {
                settings: &m.settings.media,
                turn: &m.settings.turn,
                now: now(elapsed),
                stats: &mut stats,
                io: &mut io,
            },
            &mut control,
        );
        let Some(locals) = control.created else {
            panic!("no session");
        };
        let socket_of = |io: &MediaIo, a: SocketAddr| {
            io.open
                .iter()
                .find(|(_, x)| *x == a)
                .map(|(i, _)| *i)
                .unwrap_or_else(|| panic!("no socket for {a}"))
        };
        // Leg 0 RTP, leg 0 RTCP, leg 1 RTP, leg 1 RTCP.
        let sockets: Vec<usize> = locals
            .iter()
            .flat_map(|l| [*l, SocketAddr::new(l.ip(), l.port() + 1)])
            .map(|a| socket_of(&io, a))
            .collect();
        let mut input = Input(data);
        while !input.is_empty() {
            let ctl = input.byte();
            let len = usize::from(input.byte());
            let mut packet = input.bytes(len).to_vec();
            let which = usize::from(ctl & 3);
            let rtcp = which & 1 == 1;
            if ctl & 0x20 != 0 {
                let tag = srtp_tag(m, &packet, rtcp);
                packet.extend_from_slice(&tag);
            }
            let valid = srtp_valid(m, &packet, rtcp);
            assert_eq!(m.key.verify(&packet, rtcp), valid, "verify {packet:02x?}");
            if ctl & 0x40 != 0 && !packet.is_empty() {
                let bit = usize::from(input.byte()) % (packet.len() * 8).min(256);
                packet[bit / 8] ^= 1 << (bit % 8);
                if valid {
                    assert!(
                        !m.key.verify(&packet, rtcp),
                        "bit {bit} flipped still verifies"
                    );
                }
            }
            let valid = srtp_valid(m, &packet, rtcp);
            let from = match (ctl >> 2) & 7 {
                7 => SocketAddr::from(([192, 0, 2, 1], 5000)),
                k => loopback(1 + k % 3, 5000 + u16::from(k)),
            };
            if ctl & 0x80 != 0 {
                elapsed += Duration::from_millis(u64::from(ctl & 0x3f) * 100);
                media.tick(
                    &mut MediaCtx {
                        settings: &m.settings.media,
                        turn: &m.settings.turn,
                        now: now(elapsed),
                        stats: &mut stats,
                        io: &mut io,
                    },
                    &mut control,
                );
            }
            let mut buf = vec![0u8; HEADROOM + packet.len()];
            buf[HEADROOM..].copy_from_slice(&packet);
            let latched = stats.get(Counter::MediaLatched);
            let socket = sockets[which];
            let action = media.handle(
                &mut MediaCtx {
                    settings: &m.settings.media,
                    turn: &m.settings.turn,
                    now: now(elapsed),
                    stats: &mut stats,
                    io: &mut io,
                },
                &mut NoEvents,
                socket,
                from,
                &buf,
                HEADROOM,
                packet.len(),
            );
            if which < 2 && stats.get(Counter::MediaLatched) > latched {
                assert!(
                    valid,
                    "leg 0 learned {from} from a packet without a valid tag"
                );
            }
            forwarded.push(action != Action::Drop);
            if let Action::Send {
                offset,
                len,
                socket: out,
                ..
            } = action
            {
                assert_eq!(
                    (offset, len),
                    (HEADROOM, packet.len()),
                    "forwarded in place"
                );
                assert_eq!(out, sockets[which ^ 2], "leaves from the other leg");
            }
        }
    });
    forwarded
}
