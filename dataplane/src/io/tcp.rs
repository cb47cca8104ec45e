//! STUN and TURN over TCP and TLS (RFC 8489 §6.2, RFC 8656 §3.1): the same server behind a
//! stream framing.
//!
//! One thread with mio serves every stream listener: clients behind UDP-hostile firewalls
//! are a small share of the traffic, so they do not need a thread per core. The thread has
//! a protocol core of its own, with its own allocation table and its own relay sockets (UDP,
//! registered in the same poll): an allocation made over a connection is keyed by that
//! connection, data from its peers goes back over the connection framed as ChannelData
//! (padded to 4 bytes) or Data indications, and the allocation ends when the connection
//! closes. Connections are named to the core by socket indices between the listen sockets
//! and the first relay socket, so the core's tables need no notion of a connection.
//!
//! Each connection is bounded: a fixed input buffer (a message larger than a UDP one is a
//! framing error), a capped output queue (relayed data for a client that does not read is
//! dropped and counted, not queued), a deadline for the TLS handshake and first message, an
//! idle timeout, a cap on connections in total and per source address. The listeners are
//! bound without `SO_REUSEPORT`, so a second dataplane on the same addresses fails at start
//! instead of silently sharing the UDP ports. TLS is rustls (aws-lc-rs) with the proxy's
//! certificate, loaded again whenever the configuration changes.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Registry, Token};
use portico_shared::counters::Counter;
use portico_shared::shm::{Blacklist, WorkerCounters};
use rustls::{ServerConfig, ServerConnection};
use socket2::{Domain, Protocol, Socket, Type};

use super::handoff::{Handoff, Stream};
use super::relay::{self, Reservations, Slots};
use super::uring::PAYLOAD_CAPACITY;
use super::{fold, SettingsWatch, Shared, BUF_SIZE, TICK};
use crate::server::{Action, Now, Received, Server, Stats, Transport, HEADROOM};
use crate::stun;
use crate::turn::{RelayIo, Reserved};

/// Tokens of relay sockets carry this bit; below it are listeners, then connections.
const RELAY_TOKEN: usize = 1 << (usize::BITS - 2);
/// The token of the hand-off socket ([`super::handoff`]), clear of the relay bit and far above
/// any connection's.
const HANDOFF_TOKEN: usize = RELAY_TOKEN - 1;
/// Datagrams read from one relay socket before the others get a turn.
const BUDGET: usize = 64;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub per_source: usize,
    /// Time for the TLS handshake and the first complete message.
    pub first_message: Duration,
    pub idle: Duration,
    /// Bytes queued for a connection that does not read fast enough.
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            per_source: 64,
            first_message: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_output: 64 * 1024,
        }
    }
}

/// A stream listener: plain (`turn.listen`, the socket index of its endpoint, so Binding
/// answers as from it) or TLS (`turn.listen_tls`).
pub struct Listener {
    listener: TcpListener,
    endpoint: Option<usize>,
    tls: bool,
}

struct Conn {
    stream: Stream,
    peer: SocketAddr,
    /// The endpoint Binding answers as from; a TLS connection answers as itself.
    endpoint: Option<usize>,
    tls: Option<Box<ServerConnection>>,
    input: Box<[u8]>,
    in_len: usize,
    output: Vec<u8>,
    opened: Instant,
    last_message: Option<Instant>,
    writable_interest: bool,
}

/// Binds a TCP listener per `turn.listen` address (their indices are the endpoints') and
/// per `turn.listen_tls` address.
pub fn bind_listeners(plain: &[SocketAddr], tls: &[SocketAddr]) -> Result<Vec<Listener>, String> {
    let mut out = Vec::new();
    for (i, a) in plain.iter().enumerate() {
        let l = tcp_listener(*a).map_err(|e| format!("turn.listen {a}: tcp bind: {e}"))?;
        out.push(Listener {
            listener: TcpListener::from_std(l),
            endpoint: Some(i),
            tls: false,
        });
    }
    for a in tls {
        let l = tcp_listener(*a).map_err(|e| format!("turn.listen_tls {a}: tcp bind: {e}"))?;
        out.push(Listener {
            listener: TcpListener::from_std(l),
            endpoint: None,
            tls: true,
        });
    }
    Ok(out)
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Builds the TLS server configuration from a PEM chain and key (the proxy's pair).
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(config))
}

/// The relay sockets of the TCP thread, registered in its poll.
struct StreamRelays<'r> {
    slots: Slots<mio::net::UdpSocket>,
    reservations: &'r Reservations,
    registry: &'r Registry,
    /// Relay sockets cut off by the read budget, to read again without waiting.
    pending: Vec<usize>,
}

impl StreamRelays<'_> {
    fn start(&mut self, socket: UdpSocket, dont_fragment: bool) -> io::Result<usize> {
        relay::prepare(&socket, dont_fragment)?;
        let mut s = mio::net::UdpSocket::from_std(socket);
        let index = self.slots.next_index();
        self.registry
            .register(&mut s, Token(RELAY_TOKEN | index), Interest::READABLE)?;
        self.slots.insert(s);
        // Data may already be queued (a reservation redeemed late): look once.
        self.pending.push(index);
        Ok(index)
    }
}

impl RelayIo for StreamRelays<'_> {
    fn open(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<usize> {
        let s = relay::bind(addr)?;
        self.start(s, dont_fragment)
    }

    fn reserve(&mut self, addr: SocketAddr) -> io::Result<Reserved> {
        self.reservations.reserve(addr)
    }

    fn adopt(&mut self, reserved: Reserved, dont_fragment: bool) -> io::Result<usize> {
        let s = self
            .reservations
            .take(reserved)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        self.start(s, dont_fragment)
    }

    fn release(&mut self, reserved: Reserved) {
        self.reservations.release(reserved);
    }

    fn close(&mut self, index: usize) {
        if let Some((mut s, _)) = self.slots.remove(index) {
            let _ = self.registry.deregister(&mut s);
        }
        self.pending.retain(|p| *p != index);
    }
}

/// What serving the connections works with during one loop turn.
struct Cx<'a, 'r> {
    server: &'a mut Server,
    relays: &'a mut StreamRelays<'r>,
    /// This thread's counters in shared memory.
    block: &'a WorkerCounters,
    /// Where a framed message is copied for the core to answer in place.
    work: &'a mut [u8],
    limits: &'a Limits,
    poll: &'a Poll,
    now: Now,
    /// Socket index of connection slot 0.
    conn_base: usize,
}

impl Cx<'_, '_> {
    fn stats(&mut self) -> &mut Stats {
        self.server.stats_mut()
    }

    /// Hands the counts over before anything leaves: whoever sees an answer or a refusal
    /// sees it counted.
    fn fold(&mut self) {
        fold(self.server.stats_mut(), self.block);
    }

    /// Sends client data from a relay socket to a peer.
    fn send_to_peer(&mut self, socket: usize, offset: usize, len: usize, to: SocketAddr) {
        let sent = match self.relays.slots.get(socket) {
            Some(s) => s.send_to(&self.work[offset..offset + len], to),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        let stats = self.server.stats_mut();
        match sent {
            Ok(n) => {
                stats.incr(Counter::TxPackets);
                stats.add(Counter::TxBytes, n as u64);
            }
            Err(_) => stats.incr(Counter::SendErrors),
        }
    }
}

pub fn run(
    counter_block: usize,
    shared: Arc<Shared>,
    mut listeners: Vec<Listener>,
    mut handoff: Option<Handoff>,
    limits: Limits,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let mut events = Events::with_capacity(256);
    for (i, l) in listeners.iter_mut().enumerate() {
        registry.register(&mut l.listener, Token(i), Interest::READABLE)?;
    }
    if let Some(h) = handoff.as_mut() {
        h.register(&registry, Token(HANDOFF_TOKEN))?;
    }
    let wants_tls = listeners.iter().any(|l| l.tls) || handoff.is_some();
    let base = listeners.len();
    let block = shared.shm.segment().counters(counter_block);
    let conn_base = shared.current_settings().endpoints.len();
    let first_relay = conn_base + limits.max_connections;
    let mut server = shared.new_server_at(counter_block, first_relay)?;
    let mut watch = SettingsWatch::new(&shared);
    let mut tls_config = if wants_tls {
        let (cert, key) = &server.settings().tls_files;
        match load_tls(cert, key) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!("turn.listen_tls: {e}; TLS connections are refused");
                None
            }
        }
    } else {
        None
    };
    let mut relays = StreamRelays {
        slots: Slots::new(first_relay),
        reservations: &shared.reservations,
        registry: &registry,
        pending: Vec::new(),
    };
    let mut conns = Conns {
        base,
        slots: Vec::new(),
        free: Vec::new(),
        per_source: HashMap::new(),
        live: 0,
    };
    let mut work = vec![0u8; BUF_SIZE + 1];
    let mut last_sweep = Instant::now();
    let mut relay_ready: Vec<usize> = Vec::new();
    while !shared.stopping() {
        let timeout = if relays.pending.is_empty() {
            TICK
        } else {
            Duration::ZERO
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let before = Arc::as_ptr(server.settings());
        watch.refresh(&shared, &mut server);
        if !std::ptr::eq(before, Arc::as_ptr(server.settings())) && wants_tls {
            // The certificate may have been replaced or moved: load it again.
            let (cert, key) = &server.settings().tls_files;
            match load_tls(cert, key) {
                Ok(c) => tls_config = Some(c),
                Err(e) => tracing::error!("turn.listen_tls: {e}; keeping the loaded certificate"),
            }
        }
        let mut cx = Cx {
            server: &mut server,
            relays: &mut relays,
            block,
            work: &mut work,
            limits: &limits,
            poll: &poll,
            now: super::now(),
            conn_base,
        };
        relay_ready.clear();
        relay_ready.append(&mut cx.relays.pending);
        for ev in events.iter() {
            let t = ev.token().0;
            if t & RELAY_TOKEN != 0 {
                relay_ready.push(t & !RELAY_TOKEN);
            } else if t == HANDOFF_TOKEN {
                if let Some(h) = handoff.as_mut() {
                    let blacklist = &shared.shm.segment().blacklist;
                    conns.take_handoffs(&mut cx, h, tls_config.as_ref(), blacklist);
                }
            } else if t < base {
                let blacklist = &shared.shm.segment().blacklist;
                let l = &mut listeners[t];
                let tls = match (l.tls, &tls_config) {
                    (false, _) => Ok(None),
                    (true, Some(c)) => Ok(Some(c)),
                    (true, None) => Err(()),
                };
                conns.accept_all(&mut cx, l, tls, blacklist);
            } else {
                let idx = t - base;
                let close = match conns.slots.get_mut(idx).and_then(|c| c.as_mut()) {
                    Some(c) => serve(c, &mut cx, t, idx),
                    None => false,
                };
                if close {
                    conns.close(idx, &mut cx);
                }
            }
        }
        for &r in &relay_ready {
            from_peers(r, &mut conns, &mut cx);
        }
        // Flush what peers sent to clients this turn.
        for idx in 0..conns.slots.len() {
            let close = match conns.slots[idx].as_mut() {
                Some(c) if !c.output.is_empty() => flush(c, &mut cx, base + idx),
                _ => false,
            };
            if close {
                conns.close(idx, &mut cx);
            }
        }
        let now = cx.now.mono;
        if now.duration_since(last_sweep) >= TICK {
            last_sweep = now;
            for idx in 0..conns.slots.len() {
                let expired = conns.slots[idx]
                    .as_ref()
                    .and_then(|c| match c.last_message {
                        None if now.duration_since(c.opened) > limits.first_message => {
                            Some(Counter::TcpClosedHandshakeTimeout)
                        }
                        Some(t) if now.duration_since(t) > limits.idle => {
                            Some(Counter::TcpClosedIdle)
                        }
                        _ => None,
                    });
                if let Some(reason) = expired {
                    cx.stats().incr(reason);
                    conns.close(idx, &mut cx);
                }
            }
        }
        let now = cx.now;
        cx.server.tick(now, &mut *cx.relays);
        fold(server.stats_mut(), block);
    }
    server.shutdown(super::now(), &mut relays);
    fold(server.stats_mut(), block);
    Ok(())
}

/// Reads what peers sent to relay socket `r` and queues it for the clients.
fn from_peers(r: usize, conns: &mut Conns, cx: &mut Cx<'_, '_>) {
    for n in 0..=BUDGET {
        if n == BUDGET {
            cx.relays.pending.push(r);
            return;
        }
        let received = match cx.relays.slots.get(r) {
            Some(s) => s.recv_from(&mut cx.work[HEADROOM..]),
            None => return,
        };
        let (len, from) = match received {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if len > PAYLOAD_CAPACITY {
            cx.stats().incr(Counter::DropTruncated);
            continue;
        }
        let rx = Received {
            transport: Transport::Udp,
            socket: r,
            from,
            buf: &mut cx.work[..BUF_SIZE],
            start: HEADROOM,
            len,
        };
        let action = cx.server.handle(cx.now, &mut *cx.relays, rx);
        let Action::Send {
            offset,
            len,
            socket,
            to,
        } = action
        else {
            continue;
        };
        let conn = socket
            .checked_sub(cx.conn_base)
            .and_then(|i| conns.slots.get_mut(i))
            .and_then(|c| c.as_mut())
            .filter(|c| c.peer.ip().to_canonical() == to.ip() && c.peer.port() == to.port());
        match conn {
            Some(c) => {
                if !queue(c, &cx.work[offset..offset + len], cx.limits.max_output) {
                    // A client that does not read loses data, as it would over UDP; its
                    // queue does not grow.
                    cx.stats().incr(Counter::DropStreamBacklog);
                } else {
                    cx.stats().incr(Counter::TxPackets);
                }
            }
            None => cx.stats().incr(Counter::SendErrors),
        }
    }
}

/// Appends a message to a connection's output, ChannelData padded to 4 bytes (RFC 8656
/// §12.5). False when it does not fit under the cap.
fn queue(c: &mut Conn, msg: &[u8], cap: usize) -> bool {
    let pad = if msg.first().is_some_and(|b| b & 0xC0 == 0x40) {
        (4 - msg.len() % 4) % 4
    } else {
        0
    };
    if c.output.len() + msg.len() + pad > cap {
        return false;
    }
    c.output.extend_from_slice(msg);
    c.output.extend_from_slice(&[0u8; 3][..pad]);
    true
}

/// The open connections, by slot (`Token(base + slot)`), with the counts the limits need.
struct Conns {
    base: usize,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    per_source: HashMap<IpAddr, usize>,
    live: usize,
}

impl Conns {
    /// Accepts until the listener has nothing more, refusing blacklisted sources and those
    /// over a limit right away. `tls`: `Err` for a TLS listener without a certificate.
    fn accept_all(
        &mut self,
        cx: &mut Cx<'_, '_>,
        listener: &mut Listener,
        tls: Result<Option<&Arc<ServerConfig>>, ()>,
        blacklist: &Blacklist,
    ) {
        loop {
            let (stream, peer) = match listener.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of descriptors or a connection reset before accept: next turn.
                Err(_) => return,
            };
            let tls = match tls {
                Ok(config) => config.map(Arc::clone),
                Err(()) => {
                    cx.stats().incr(Counter::TcpClosedTlsError);
                    cx.fold();
                    continue;
                }
            };
            self.admit(
                cx,
                Stream::Tcp(stream),
                peer,
                listener.endpoint,
                tls,
                blacklist,
            );
        }
    }

    /// Takes every connection the proxy handed over ([`super::handoff`]).
    fn take_handoffs(
        &mut self,
        cx: &mut Cx<'_, '_>,
        handoff: &mut Handoff,
        tls: Option<&Arc<ServerConfig>>,
        blacklist: &Blacklist,
    ) {
        loop {
            let incoming = match handoff.receive() {
                Ok(Some(i)) => i,
                Ok(None) => return,
                Err(_refused) => {
                    cx.stats().incr(Counter::TcpRejected);
                    cx.fold();
                    continue;
                }
            };
            let config = match (incoming.tls, tls) {
                (false, _) => None,
                (true, Some(base)) => Some(handoff.tls_config(base)),
                (true, None) => {
                    cx.stats().incr(Counter::TcpClosedTlsError);
                    cx.fold();
                    continue;
                }
            };
            self.admit(cx, incoming.stream, incoming.peer, None, config, blacklist);
        }
    }

    /// Serves a new connection unless its source is blacklisted or over a limit.
    fn admit(
        &mut self,
        cx: &mut Cx<'_, '_>,
        mut stream: Stream,
        peer: SocketAddr,
        endpoint: Option<usize>,
        tls: Option<Arc<ServerConfig>>,
        blacklist: &Blacklist,
    ) {
        let (limits, poll, now) = (cx.limits, cx.poll, cx.now);
        {
            let src = peer.ip().to_canonical();
            if blacklist.is_blocked(src, now.unix) {
                cx.stats().incr(Counter::DropBlacklisted);
                cx.fold();
                return;
            }
            let n = self.per_source.get(&src).copied().unwrap_or(0);
            if self.live >= limits.max_connections || n >= limits.per_source {
                cx.stats().incr(Counter::TcpRejected);
                cx.fold();
                return;
            }
            let session = match tls.map(ServerConnection::new) {
                None => None,
                Some(Ok(s)) => Some(Box::new(s)),
                Some(Err(_)) => {
                    cx.stats().incr(Counter::TcpClosedTlsError);
                    cx.fold();
                    return;
                }
            };
            let idx = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            if poll
                .registry()
                .register(&mut stream, Token(self.base + idx), Interest::READABLE)
                .is_err()
            {
                self.free.push(idx);
                cx.stats().incr(Counter::TcpRejected);
                cx.fold();
                return;
            }
            stream.set_nodelay();
            cx.stats().incr(Counter::TcpAccepted);
            *self.per_source.entry(src).or_insert(0) += 1;
            self.live += 1;
            self.slots[idx] = Some(Conn {
                stream,
                peer,
                endpoint,
                tls: session,
                input: vec![0u8; PAYLOAD_CAPACITY].into_boxed_slice(),
                in_len: 0,
                output: Vec::new(),
                opened: now.mono,
                last_message: None,
                writable_interest: false,
            });
        }
    }

    /// Closes a connection; the allocation made over it ends with it.
    fn close(&mut self, idx: usize, cx: &mut Cx<'_, '_>) {
        if let Some(mut c) = self.slots.get_mut(idx).and_then(|c| c.take()) {
            let _ = cx.poll.registry().deregister(&mut c.stream);
            cx.server
                .stream_closed(cx.now, &mut *cx.relays, cx.conn_base + idx, c.peer);
            let src = c.peer.ip().to_canonical();
            if let Some(n) = self.per_source.get_mut(&src) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&src);
                }
            }
            self.live = self.live.saturating_sub(1);
            self.free.push(idx);
            cx.fold();
        }
    }
}

/// Reads what is there, answers every complete message, flushes. Returns true to close.
fn serve(c: &mut Conn, cx: &mut Cx<'_, '_>, token: usize, idx: usize) -> bool {
    let close = if c.tls.is_some() {
        read_tls_and_answer(c, cx, idx)
    } else {
        read_and_answer(c, cx, idx)
    };
    cx.fold();
    // Answers to the messages before a framing error still leave, best effort.
    let failed = flush(c, cx, token);
    close || failed
}

/// Reads and answers into the output queue. Returns true to close.
fn read_and_answer(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize) -> bool {
    loop {
        if c.in_len == c.input.len() {
            // A full buffer without a complete message: the frame is too large.
            cx.stats().incr(Counter::DropTcpFraming);
            return true;
        }
        match c.stream.read(&mut c.input[c.in_len..]) {
            Ok(0) => return true,
            Ok(n) => {
                c.in_len += n;
                cx.stats().add(Counter::RxBytes, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
        // Frame as we go so a client that pipelines many requests is served without the
        // buffer filling up.
        if frame_all(c, cx, idx) {
            return true;
        }
    }
    frame_all(c, cx, idx)
}

/// The same over TLS: records in, plaintext framed. A TLS error (a bad record, an alert
/// from the client) closes the connection, after our alert if rustls has one to send.
fn read_tls_and_answer(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize) -> bool {
    loop {
        let Some(tls) = c.tls.as_mut() else {
            return true;
        };
        let mut eof = false;
        match tls.read_tls(&mut c.stream) {
            Ok(0) => eof = true,
            Ok(n) => cx.stats().add(Counter::RxBytes, n as u64),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
        let was_handshaking = tls.is_handshaking();
        if let Err(e) = tls.process_new_packets() {
            tracing::debug!(client = %c.peer, "TURN over TLS: {e}");
            cx.stats().incr(Counter::TcpClosedTlsError);
            let _ = tls.write_tls(&mut c.stream);
            return true;
        }
        if was_handshaking && !tls.is_handshaking() {
            cx.stats().incr(Counter::TlsHandshakes);
        }
        loop {
            if c.in_len == c.input.len() {
                cx.stats().incr(Counter::DropTcpFraming);
                return true;
            }
            let Some(tls) = c.tls.as_mut() else {
                return true;
            };
            match tls.reader().read(&mut c.input[c.in_len..]) {
                // close_notify: a clean end.
                Ok(0) => return true,
                Ok(n) => c.in_len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
            if frame_all(c, cx, idx) {
                return true;
            }
        }
        if eof || frame_all(c, cx, idx) {
            return true;
        }
    }
}

/// Cuts the complete messages off the input and answers them. Returns true to close.
fn frame_all(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize) -> bool {
    let mut start = 0;
    while c.in_len - start >= 4 {
        let pending = &c.input[start..c.in_len];
        let total = if pending[0] & 0xC0 == 0x40 {
            // ChannelData, padded to 4 bytes over a stream (RFC 8656 §12.5).
            let len = usize::from(u16::from_be_bytes([pending[2], pending[3]]));
            4 + len.div_ceil(4) * 4
        } else {
            // Refuse what is not STUN as early as its first bytes say so (a TLS ClientHello
            // on the plain port, an HTTP request): only RFC 5389+ clients exist over TCP, so
            // the magic cookie must follow.
            if pending.len() >= 8 && pending[4..8] != stun::MAGIC_COOKIE.to_be_bytes() {
                cx.stats().incr(Counter::DropTcpFraming);
                return true;
            }
            match stun::message_len_from_header(pending) {
                Some(t) => t,
                None => {
                    cx.stats().incr(Counter::DropTcpFraming);
                    return true;
                }
            }
        };
        if total > PAYLOAD_CAPACITY {
            cx.stats().incr(Counter::DropTcpFraming);
            return true;
        }
        if pending.len() < total {
            break;
        }
        cx.work[HEADROOM..HEADROOM + total].copy_from_slice(&pending[..total]);
        start += total;
        c.last_message = Some(cx.now.mono);
        cx.stats().incr(Counter::RxPackets);
        let conn = cx.conn_base + idx;
        let rx = Received {
            transport: Transport::Tcp,
            socket: c.endpoint.unwrap_or(conn),
            from: c.peer,
            buf: &mut cx.work[..BUF_SIZE],
            start: HEADROOM,
            len: total,
        };
        let action = cx.server.handle_stream(cx.now, &mut *cx.relays, rx, conn);
        if let Action::Send {
            offset,
            len,
            socket,
            to,
        } = action
        {
            if cx.server.turn().is_relay_socket(socket) {
                // ChannelData or a Send indication from the client, for its peer.
                cx.send_to_peer(socket, offset, len, to);
                continue;
            }
            if !queue(c, &cx.work[offset..offset + len], cx.limits.max_output) {
                // The client sends requests faster than it reads their answers.
                cx.stats().incr(Counter::TcpClosedBacklog);
                return true;
            }
            cx.stats().incr(Counter::TxPackets);
        }
    }
    c.input.copy_within(start..c.in_len, 0);
    c.in_len -= start;
    false
}

/// Writes what is queued (through TLS when the connection has it). Returns true to close.
fn flush(c: &mut Conn, cx: &mut Cx<'_, '_>, token: usize) -> bool {
    loop {
        let wrote = match c.tls.as_mut() {
            Some(tls) => {
                if !tls.wants_write() && !c.output.is_empty() {
                    match tls.writer().write(&c.output) {
                        Ok(n) => {
                            c.output.drain(..n);
                        }
                        Err(_) => return true,
                    }
                }
                if !tls.wants_write() {
                    break;
                }
                tls.write_tls(&mut c.stream)
            }
            None => {
                if c.output.is_empty() {
                    break;
                }
                c.stream.write(&c.output).inspect(|n| {
                    c.output.drain(..*n);
                })
            }
        };
        match wrote {
            Ok(0) => return true,
            Ok(n) => cx.stats().add(Counter::TxBytes, n as u64),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    let want_write = !c.output.is_empty() || c.tls.as_ref().is_some_and(|t| t.wants_write());
    if want_write != c.writable_interest {
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if cx
            .poll
            .registry()
            .reregister(&mut c.stream, Token(token), interest)
            .is_err()
        {
            return true;
        }
        c.writable_interest = want_write;
    }
    false
}
