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

use crate::server::{Action, Now, Received, Server, Settings, Transport, HEADROOM};
use crate::stun::integrity::{ALGORITHM_SHA256, DEFAULT_PASSWORD_ALGORITHMS};
use crate::stun::MessageWriter;
use crate::stun::{attr, integrity, message_len_from_header, method, Class, Message};
use crate::turn::auth::{rest_key, NONCE_BYTES};
use crate::turn::{ControlPlane, DefaultRoutes, RelayIo, Reserved, TurnShared};

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

fn new_shared() -> Shared {
    let config = Config::from_toml(CONFIG).unwrap_or_else(|e| panic!("fuzz config: {e}"));
    let routes = DefaultRoutes::default();
    let settings = Arc::new(Settings::from_config(&config, &[5u8; 32], &routes));
    let turn = Arc::new(TurnShared::new(1));
    let server = Server::new(
        settings,
        Arc::clone(&turn),
        &[1; 32],
        ControlPlane::detached(),
    );
    Shared { server, turn }
}

thread_local! {
    static SHARED: RefCell<Option<Shared>> = const { RefCell::new(None) };
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

    fn relay_socket(&self, b: u8) -> usize {
        self.first_relay + usize::from(b % 4)
    }
}

fn with_core(f: impl FnOnce(&mut Core<'_>)) {
    SHARED.with_borrow_mut(|s| {
        let Shared { server, turn } = s.get_or_insert_with(new_shared);
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
