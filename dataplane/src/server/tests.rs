//! Sans-IO tests of how [`Server::handle`] routes datagrams to TURN: by transport, by socket
//! (listen or relay), by first byte (ChannelData or STUN), by source address; and of
//! configuration reloads and shutdown with allocations in place. The TURN methods themselves
//! are covered in `turn/tests.rs`.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use portico_shared::config::Config;
use portico_shared::counters::Counter;

use super::{Action, Now, Received, Server, Settings, Stats, Transport, HEADROOM};
use crate::stun::{self, attr, method, Class, Message, MessageWriter};
use crate::turn::{ControlPlane, DefaultRoutes, RelayIo, Reserved, TurnShared};

const REALM: &str = "example.org";
const CONFIG: &str = r#"
[turn]
listen = ["127.0.0.1:40001"]
realm = "example.org"
users = [{ name = "alice", password = "secret" }]
"#;
/// One listen socket, so relay sockets start at 1.
const LISTEN: usize = 0;
const FIRST_RELAY: usize = 1;
const PEER: &str = "8.8.8.8:5000";
/// Where relays start in a stream driver's core ([`H::stream`]).
const STREAM_FIRST_RELAY: usize = 8;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Hands out socket indices and remembers which are open; binds nothing.
#[derive(Default)]
struct FakeIo {
    /// Added to every index handed out (a core whose relays start further up).
    first: usize,
    next: usize,
    live: HashSet<usize>,
    closed: Vec<usize>,
}

impl RelayIo for FakeIo {
    fn open(&mut self, _: SocketAddr, _: bool) -> io::Result<usize> {
        let i = FIRST_RELAY + self.first + self.next;
        self.next += 1;
        self.live.insert(i);
        Ok(i)
    }
    fn reserve(&mut self, _: SocketAddr) -> io::Result<Reserved> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn adopt(&mut self, _: Reserved, _: bool) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn release(&mut self, r: Reserved) {
        panic!("released {r:?}, which was never reserved");
    }
    fn close(&mut self, socket: usize) {
        assert!(self.live.remove(&socket), "closed {socket} twice");
        self.closed.push(socket);
    }
}

struct H {
    server: Server,
    io: FakeIo,
    now: Now,
    /// The connection [`H::tcp`] hands messages in on.
    conn: usize,
}

fn settings(toml: &str) -> Arc<Settings> {
    Arc::new(Settings::from_config(
        &Config::from_toml(toml).unwrap(),
        &[9u8; 32],
        &DefaultRoutes::default(),
    ))
}

impl H {
    fn new() -> H {
        H {
            server: Server::new(
                settings(CONFIG),
                Arc::new(TurnShared::new(7)),
                &[7; 32],
                ControlPlane::detached(),
            ),
            io: FakeIo::default(),
            now: Now {
                mono: Instant::now(),
                unix: 1_800_000_000,
            },
            conn: LISTEN,
        }
    }

    /// A core as the stream driver builds it: connections are named by the indices between
    /// the listen socket and the relays, which start at `STREAM_FIRST_RELAY`.
    fn stream() -> H {
        let mut h = H::new();
        h.server = Server::with_first_relay(
            settings(CONFIG),
            Arc::new(TurnShared::new(7)),
            &[7; 32],
            ControlPlane::detached(),
            STREAM_FIRST_RELAY,
        );
        h.io.first = STREAM_FIRST_RELAY - FIRST_RELAY;
        h.conn = 3;
        h
    }

    fn stats(&self) -> &Stats {
        self.server.stats()
    }

    fn handle(
        &mut self,
        transport: Transport,
        socket: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> Option<(Vec<u8>, usize, SocketAddr)> {
        let mut buf = vec![0u8; 2048];
        buf[HEADROOM..HEADROOM + data.len()].copy_from_slice(data);
        let rx = Received {
            transport,
            socket,
            from,
            buf: &mut buf,
            start: HEADROOM,
            len: data.len(),
        };
        let action = if transport == Transport::Tcp {
            self.server
                .handle_stream(self.now, &mut self.io, rx, self.conn)
        } else {
            self.server.handle(self.now, &mut self.io, rx)
        };
        match action {
            Action::Drop => None,
            Action::Send {
                offset,
                len,
                socket,
                to,
            } => Some((buf[offset..offset + len].to_vec(), socket, to)),
        }
    }

    fn udp(&mut self, from: SocketAddr, data: &[u8]) -> Option<(Vec<u8>, usize, SocketAddr)> {
        self.handle(Transport::Udp, LISTEN, from, data)
    }

    /// A message framed from connection `self.conn`, accepted on the listen socket.
    fn tcp(&mut self, from: SocketAddr, data: &[u8]) -> Option<(Vec<u8>, usize, SocketAddr)> {
        self.handle(Transport::Tcp, LISTEN, from, data)
    }
}

fn key() -> [u8; 16] {
    stun::long_term_key_md5(b"alice", REALM.as_bytes(), b"secret")
}

/// A request from alice; signed when `nonce` is given.
fn request(method: u16, nonce: Option<&[u8]>, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let tid: [u8; 12] = std::array::from_fn(|i| i as u8 ^ method as u8 ^ 0xA5);
    let mut w = MessageWriter::new(&mut buf, Class::Request, method, &tid).unwrap();
    attrs(&mut w);
    if let Some(n) = nonce {
        w.add_attribute(attr::USERNAME, b"alice").unwrap();
        w.add_attribute(attr::REALM, REALM.as_bytes()).unwrap();
        w.add_attribute(attr::NONCE, n).unwrap();
        w.add_message_integrity(&key()).unwrap();
    }
    w.add_fingerprint().unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn udp_transport(w: &mut MessageWriter<'_>) {
    w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .unwrap();
}

/// Allocates for `client` and binds channel 0x4000 to PEER; returns the relay socket.
fn allocate_with_channel(h: &mut H, client: SocketAddr) -> usize {
    allocate_with_channel_via(h, client, H::udp)
}

type Via = fn(&mut H, SocketAddr, &[u8]) -> Option<(Vec<u8>, usize, SocketAddr)>;

fn allocate_with_channel_via(h: &mut H, client: SocketAddr, via: Via) -> usize {
    let (r, _, _) = via(h, client, &request(method::ALLOCATE, None, &udp_transport)).expect("401");
    let nonce = Message::parse(&r)
        .unwrap()
        .get(attr::NONCE)
        .unwrap()
        .to_vec();
    let (r, _, _) = via(
        h,
        client,
        &request(method::ALLOCATE, Some(&nonce), &udp_transport),
    )
    .unwrap();
    assert_eq!(Message::parse(&r).unwrap().class(), Class::SuccessResponse);
    let relay = FIRST_RELAY + h.io.first + h.io.next - 1;
    let bind = request(method::CHANNEL_BIND, Some(&nonce), &|w| {
        w.add_attribute(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])
            .unwrap();
        w.add_xor_address(attr::XOR_PEER_ADDRESS, sa(PEER)).unwrap();
    });
    let (r, _, _) = via(h, client, &bind).unwrap();
    assert_eq!(Message::parse(&r).unwrap().class(), Class::SuccessResponse);
    relay
}

fn channel_data(data: &[u8]) -> Vec<u8> {
    let mut m = vec![0x40, 0x00];
    m.extend_from_slice(&(data.len() as u16).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// TURN over a stream (RFC 8656 §3.1): the allocation is keyed by the connection, relayed
/// data for the client comes back addressed to that connection, ChannelData arrives with
/// its stream padding, and closing the connection ends the allocation.
#[test]
fn turn_over_a_stream_is_keyed_by_the_connection_and_ends_with_it() {
    let mut h = H::stream();
    let client = sa("198.51.100.7:5000");
    let relay = allocate_with_channel_via(&mut h, client, H::tcp);
    assert_eq!(
        relay, STREAM_FIRST_RELAY,
        "relays start above the connections"
    );
    assert_eq!(h.server.turn().table().len(), 1);
    // ChannelData of 5 bytes, padded to 8 as over a stream: 5 bytes reach the peer.
    let mut cd = channel_data(b"hello");
    cd.extend_from_slice(&[0, 0, 0]);
    let (sent, socket, to) = h.tcp(client, &cd).expect("relayed");
    assert_eq!(
        (sent.as_slice(), socket, to),
        (&b"hello"[..], relay, sa(PEER))
    );
    // A Send indication over the stream is relayed too.
    let mut buf = [0u8; 128];
    let mut w = MessageWriter::new(&mut buf, Class::Indication, method::SEND, &[3; 12]).unwrap();
    w.add_xor_address(attr::XOR_PEER_ADDRESS, sa(PEER)).unwrap();
    w.add_attribute(attr::DATA, b"data").unwrap();
    let n = w.finish();
    let (sent, socket, _) = h.tcp(client, &buf[..n]).expect("relayed");
    assert_eq!((sent.as_slice(), socket), (&b"data"[..], relay));
    // The same address on another connection has no allocation.
    h.conn = 4;
    assert!(h.tcp(client, &cd).is_none());
    assert_eq!(h.stats().get(Counter::DropNoAllocation), 1);
    // Data from the peer goes to the connection that made the allocation.
    let (m, socket, to) = h
        .handle(Transport::Udp, relay, sa(PEER), b"back")
        .expect("to the client");
    assert_eq!((socket, to), (3, client));
    assert_eq!(&m[..4], &[0x40, 0x00, 0x00, 0x04]);
    // Closing another connection of the same address changes nothing; closing its own
    // ends the allocation and closes the relay.
    h.server.stream_closed(h.now, &mut h.io, 4, client);
    assert_eq!(h.server.turn().table().len(), 1);
    h.server.stream_closed(h.now, &mut h.io, 3, client);
    assert_eq!(h.server.turn().table().len(), 0);
    assert_eq!(h.io.closed, vec![relay]);
    assert_eq!(h.stats().get(Counter::TurnAllocationsDeleted), 1);
}

#[test]
fn sources_that_cannot_be_answered_are_dropped() {
    let mut h = H::new();
    let req = request(method::ALLOCATE, None, &udp_transport);
    for bad in [
        "198.51.100.7:0",
        "0.0.0.0:5000",
        "[::]:5000",
        "224.0.0.1:5000",
    ] {
        assert!(h.udp(sa(bad), &req).is_none(), "{bad}");
    }
    assert_eq!(h.stats().get(Counter::DropBadSource), 4);
    assert!(h.udp(sa("198.51.100.7:5000"), &req).is_some());
}

#[test]
fn an_ipv4_mapped_source_is_the_same_client_as_its_ipv4_address() {
    let mut h = H::new();
    let relay = allocate_with_channel(&mut h, sa("198.51.100.7:5000"));
    // A dual-stack listen socket reports IPv4 clients as ::ffff:a.b.c.d.
    let (bytes, socket, to) = h
        .udp(sa("[::ffff:198.51.100.7]:5000"), &channel_data(b"mapped"))
        .expect("relayed");
    assert_eq!(
        (bytes.as_slice(), socket, to),
        (&b"mapped"[..], relay, sa(PEER))
    );
    // And the way back is addressed to the plain IPv4 form.
    let (_, socket, to) = h
        .handle(Transport::Udp, relay, sa("[::ffff:8.8.8.8]:5000"), b"back")
        .expect("relayed back");
    assert_eq!((socket, to), (LISTEN, sa("198.51.100.7:5000")));
}

#[test]
fn binding_requests_are_still_answered_next_to_allocations() {
    let mut h = H::new();
    let client = sa("198.51.100.7:5000");
    allocate_with_channel(&mut h, client);
    let (bytes, socket, to) = h
        .udp(client, &request(method::BINDING, None, &|_| {}))
        .expect("Binding answered");
    assert_eq!((socket, to), (LISTEN, client));
    let m = Message::parse(&bytes).unwrap();
    assert_eq!(m.class(), Class::SuccessResponse);
    let mapped = attr::decode_xor_address(
        m.get(attr::XOR_MAPPED_ADDRESS).unwrap(),
        &m.transaction_id(),
    );
    assert_eq!(mapped, Ok(client));
}

#[test]
fn a_datagram_without_headroom_is_dropped_not_misframed() {
    let mut h = H::new();
    let client = sa("198.51.100.7:5000");
    let relay = allocate_with_channel(&mut h, client);
    // A driver that left no headroom: no room for a header, so no send (and no panic).
    let mut buf = vec![0u8; 64];
    buf[..4].copy_from_slice(b"data");
    let rx = Received {
        transport: Transport::Udp,
        socket: relay,
        from: sa("8.8.8.8:5999"),
        buf: &mut buf,
        start: 0,
        len: 4,
    };
    let a = h.server.handle(h.now, &mut h.io, rx);
    assert_eq!(a, Action::Drop);
    // A length beyond the buffer.
    let rx = Received {
        transport: Transport::Udp,
        socket: LISTEN,
        from: client,
        buf: &mut buf,
        start: 60,
        len: 8,
    };
    let a = h.server.handle(h.now, &mut h.io, rx);
    assert_eq!(a, Action::Drop);
    assert_eq!(h.stats().get(Counter::DropBadLength), 1);
}

#[test]
fn new_settings_apply_to_new_requests_and_keep_allocations() {
    let mut h = H::new();
    let client = sa("198.51.100.7:5000");
    let relay = allocate_with_channel(&mut h, client);
    // Reload with alice's password changed.
    let reloaded = CONFIG.replace("\"secret\"", "\"changed\"");
    h.server.set_settings(settings(&reloaded));
    // The allocation and its channel carry on.
    assert!(h.udp(client, &channel_data(b"still")).is_some());
    assert!(h.handle(Transport::Udp, relay, sa(PEER), b"back").is_some());
    // New requests see the new settings: the old password no longer signs.
    let (r, _, _) = h
        .udp(
            sa("198.51.100.8:5000"),
            &request(method::ALLOCATE, None, &udp_transport),
        )
        .unwrap();
    let nonce = Message::parse(&r)
        .unwrap()
        .get(attr::NONCE)
        .unwrap()
        .to_vec();
    let (r, _, _) = h
        .udp(
            sa("198.51.100.8:5000"),
            &request(method::ALLOCATE, Some(&nonce), &udp_transport),
        )
        .unwrap();
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class(), Class::ErrorResponse);
    assert_eq!(
        attr::decode_error_code(m.get(attr::ERROR_CODE).unwrap())
            .unwrap()
            .0,
        401
    );
}

#[test]
fn shutdown_closes_every_relay_socket() {
    let mut h = H::new();
    let mut relays = vec![
        allocate_with_channel(&mut h, sa("198.51.100.7:5000")),
        allocate_with_channel(&mut h, sa("198.51.100.8:5000")),
    ];
    h.server.shutdown(h.now, &mut h.io);
    relays.sort_unstable();
    h.io.closed.sort_unstable();
    assert_eq!(h.io.closed, relays);
    assert_eq!(h.stats().get(Counter::TurnAllocationsActive), 0);
    assert_eq!(h.stats().get(Counter::TurnChannelsActive), 0);
}

#[test]
fn a_deny_added_by_reload_removes_existing_permissions_and_channels() {
    let mut h = H::new();
    let client = sa("198.51.100.7:5000");
    let relay = allocate_with_channel(&mut h, client);
    assert!(h.udp(client, &channel_data(b"before")).is_some());
    assert_eq!(h.stats().get(Counter::TurnChannelsActive), 1);
    // The operator denies the peer's network at run time.
    let reloaded = format!("{CONFIG}deny_peers = [\"8.8.8.0/24\"]\n");
    h.server.set_settings(settings(&reloaded));
    h.server.tick(h.now, &mut h.io);
    assert!(
        h.udp(client, &channel_data(b"after")).is_none(),
        "the channel to a denied peer still relays"
    );
    assert!(
        h.handle(Transport::Udp, relay, sa(PEER), b"back").is_none(),
        "the permission for a denied peer still admits its data"
    );
    assert_eq!(h.stats().get(Counter::TurnChannelsActive), 0);
    assert_eq!(h.stats().get(Counter::TurnPermissionsActive), 0);
}
