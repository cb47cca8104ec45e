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
//! Each connection is bounded: an input buffer of one frame (a message larger than a UDP one is a
//! framing error), a capped output queue (relayed data for a client that does not read is
//! dropped and counted, not queued), a deadline for the TLS handshake and first message, an
//! idle timeout, a cap on connections in total and per source address. The listeners are
//! bound without `SO_REUSEPORT`, so a second dataplane on the same addresses fails at start
//! instead of silently sharing the UDP ports. TLS is rustls (aws-lc-rs) with the proxy's
//! certificate, loaded again whenever the configuration changes.
//!
//! System calls per packet are few: a connection read that comes back short ends the read
//! (edge-triggered polling reports every later arrival), relay sockets are read several
//! datagrams per `recvmmsg` ([`batch`]), and what peers sent to a client in one loop turn
//! leaves in one write. Where the dataplane runs on io_uring (`turn.io`), a turn's writes —
//! datagrams to peers and the end-of-turn writes to clients — go to the kernel together in
//! one `io_uring_enter` ([`sends`]); on epoll, each is a system call. An idle connection holds
//! no buffers: input and output buffers are lent from per-thread spare lists and kept only
//! while bytes are pending.

mod batch;
mod conn;
mod listen;
mod pipe;
mod relays;
mod sends;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use portico_shared::counters::Counter;
use portico_shared::shm::WorkerCounters;

use super::handoff::Handoff;
use super::relay::Slots;
use super::{fold, SettingsWatch, Shared, BUF_SIZE, TICK};
use crate::server::{Action, Now, Received, Server, Stats, Transport, HEADROOM};
use crate::turn::{StreamLimits, TcpEvent};
use batch::{RecvBatch, BATCH};
use conn::{finish_batched, flush, has_output, queue, serve, stage, Conns};
pub(crate) use conn::{stream_frame, StreamFrame};
pub use listen::{bind_listeners, load_tls, Listener};
use relays::{RelaySock, StreamRelays};
use sends::Sends;

/// Tokens of relay sockets carry this bit; below it are listeners, then connections.
const RELAY_TOKEN: usize = 1 << (usize::BITS - 2);
/// The token of the hand-off socket ([`super::handoff`]), clear of the relay bit and far above
/// any connection's.
const HANDOFF_TOKEN: usize = RELAY_TOKEN - 1;
/// Datagrams read from one relay socket before the others get a turn.
const BUDGET: usize = 64;

/// The limits come from `turn.tcp_*` ([`StreamLimits`]).
pub type Limits = StreamLimits;

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
    /// Poll token of connection slot 0.
    token_base: usize,
    /// The core's RFC 6062 events, drained after each call that may make them.
    events: &'a mut Vec<TcpEvent>,
    /// Data connections whose paused input may go on (connection slots).
    resume: &'a mut Vec<usize>,
    /// Input buffers no connection holds (see `conn::serve`).
    spare: &'a mut Vec<Box<[u8]>>,
    /// Connections (slots) given relayed data this turn, to be flushed at its end.
    dirty: &'a mut Vec<usize>,
    /// Where relay sockets are read into.
    batch: &'a mut RecvBatch,
    /// Output queues no connection holds (see `conn::flush`).
    out_spare: &'a mut Vec<Vec<u8>>,
    /// The io_uring the turn's writes go through, where the kernel allows it ([`sends`]).
    sends: &'a mut Option<Sends>,
}

impl Cx<'_, '_> {
    fn stats(&mut self) -> &mut Stats {
        self.server.stats_mut()
    }

    /// Queues the message at `work[offset..offset + len]` on `c` ([`conn::queue`]); false
    /// when it does not fit.
    fn queue_work(&mut self, c: &mut conn::Conn, offset: usize, len: usize) -> bool {
        queue(
            c,
            &self.work[offset..offset + len],
            self.limits.max_output,
            self.out_spare,
        )
    }

    /// Hands the counts over before anything leaves: whoever sees an answer or a refusal
    /// sees it counted.
    fn fold(&mut self) {
        fold(self.server.stats_mut(), self.block);
    }

    /// Sends client data from a relay socket to a peer.
    fn send_to_peer(&mut self, socket: usize, offset: usize, len: usize, to: SocketAddr) {
        let fd = match self.relays.slots.get(socket) {
            Some(RelaySock::Udp(s)) => s.as_raw_fd(),
            _ => {
                self.stats().incr(Counter::SendErrors);
                return;
            }
        };
        let payload = &self.work[offset..offset + len];
        if let Some(s) = self.sends.as_mut().filter(|s| s.usable()) {
            if s.udp_full() {
                // Counted now; no client write is staged outside `flush_turn`.
                let none = s.submit(self.server.stats_mut());
                s.done(none);
            }
            if s.queue_udp(fd, payload, to) {
                return;
            }
        }
        let sent = match self.relays.slots.get(socket) {
            Some(RelaySock::Udp(s)) => s.send_to(payload, to),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
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
    uring: bool,
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
    let mut limits = shared.current_settings().turn.stream;
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
        orphans: Vec::new(),
        closing: Vec::new(),
    };
    let mut tcp_events = Vec::new();
    let mut resume = Vec::new();
    let mut spare = Vec::new();
    let mut dirty = Vec::new();
    let mut batch = RecvBatch::new();
    let mut out_spare = Vec::new();
    let mut sends = if uring {
        match Sends::new() {
            Ok(s) => {
                tracing::info!("TCP thread: writes through io_uring");
                Some(s)
            }
            Err(e) => {
                tracing::warn!(
                    "TCP thread: io_uring unavailable for writes ({e}); one system call per write"
                );
                None
            }
        }
    } else {
        None
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
    let mut pace = Pace::default();
    while !shared.stopping() {
        let timeout = if relays.pending.is_empty() {
            TICK
        } else {
            Duration::ZERO
        };
        let coalesced = pace.wait(limits.coalesce);
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        pace.polled(!events.is_empty(), limits.coalesce);
        server.stats_mut().incr(if coalesced {
            Counter::TcpTurnsCoalesced
        } else {
            Counter::TcpTurnsWoken
        });
        let before = Arc::as_ptr(server.settings());
        watch.refresh(&shared, &mut server);
        let changed = !std::ptr::eq(before, Arc::as_ptr(server.settings()));
        if changed {
            // The index space of connections was sized at start: that limit stays.
            limits = Limits {
                max_connections: limits.max_connections,
                ..server.settings().turn.stream
            };
        }
        if changed && wants_tls {
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
            token_base: base,
            events: &mut tcp_events,
            resume: &mut resume,
            spare: &mut spare,
            dirty: &mut dirty,
            batch: &mut batch,
            out_spare: &mut out_spare,
            sends: &mut sends,
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
                let edge = !ev.is_read_closed() && !ev.is_error();
                let close = match conns.slots.get_mut(idx).and_then(|c| c.as_mut()) {
                    Some(c) => serve(c, &mut cx, t, idx, edge),
                    None => false,
                };
                if close {
                    conns.close(idx, &mut cx);
                }
            }
        }
        for &r in &relay_ready {
            match cx.relays.slots.get(r) {
                Some(RelaySock::Udp(_)) => from_peers(r, &mut conns, &mut cx),
                Some(RelaySock::Listen(_)) => pipe::accept_peers(r, &mut cx),
                Some(RelaySock::Data(_)) => pipe::data_event(r, &mut conns, &mut cx),
                None => {}
            }
        }
        pipe::deliver(&mut conns, &mut cx);
        // Flush what peers sent to clients this turn: one write per connection, however
        // many datagrams it was given.
        flush_turn(&mut conns, &mut cx);
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
                            Some(if c.pipe.is_some() {
                                Counter::TcpRelayClosedIdle
                            } else {
                                Counter::TcpClosedIdle
                            })
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
        pipe::deliver(&mut conns, &mut cx);
        flush_turn(&mut conns, &mut cx);
        // Every send that named them has been submitted.
        cx.relays.closing.clear();
        fold(server.stats_mut(), block);
    }
    server.shutdown(super::now(), &mut relays);
    fold(server.stats_mut(), block);
    Ok(())
}

/// Interrupt coalescing for the loop (`turn.tcp_coalesce_us`). A turn whose wait found
/// events already waiting means the thread is busy: then the next poll comes no sooner than
/// `coalesce` after this turn began, and whatever arrived meanwhile is served in one turn.
/// Each wake-up costs the thread a context switch and its senders an inter-processor
/// wake-up (on loopback the sender pays for the receiver's wake-up), and each turn a poll
/// and a submission; at 50,000 packet pairs a second the loop otherwise turned ~39,000
/// times a second for 1.3 pairs each. Idle, the thread blocks in its poll and wakes for the
/// first packet at once: no latency is added until packets come faster than `coalesce`.
struct Pace {
    /// The previous wait found events ready within half the interval.
    busy: bool,
    /// When the current poll began (set by `wait`), and when the last turn began.
    poll_start: Instant,
    turn_start: Instant,
}

impl Default for Pace {
    fn default() -> Pace {
        let now = Instant::now();
        Pace {
            busy: false,
            poll_start: now,
            turn_start: now,
        }
    }
}

impl Pace {
    /// Sleeps out the rest of the interval when busy; true if it did. Then the poll begins.
    fn wait(&mut self, coalesce: Duration) -> bool {
        let waited = self.busy && !coalesce.is_zero();
        if waited {
            let rest = coalesce.saturating_sub(self.turn_start.elapsed());
            if !rest.is_zero() {
                std::thread::sleep(rest);
            }
        }
        self.poll_start = Instant::now();
        waited
    }

    /// Records that the poll returned now, with or without `events`: a turn begins.
    fn polled(&mut self, events: bool, coalesce: Duration) {
        let now = Instant::now();
        self.busy =
            events && !coalesce.is_zero() && now.duration_since(self.poll_start) < coalesce / 2;
        self.turn_start = now;
    }
}

/// Writes what the turn left for clients (the connections in `dirty`) and sends the queued
/// datagrams: with io_uring, all in one submission (per [`sends::TCP_BATCH`] connections);
/// without, a write per connection.
fn flush_turn(conns: &mut Conns, cx: &mut Cx<'_, '_>) {
    let base = cx.token_base;
    loop {
        while let Some(idx) = cx.dirty.pop() {
            let Some(c) = conns.slots.get_mut(idx).and_then(|c| c.as_mut()) else {
                continue;
            };
            if !has_output(c) {
                continue;
            }
            // RFC 6062 data connections and the batch-less path write directly.
            let batchable = c.pipe.is_none() && !c.drain_close;
            let staged = match cx.sends.as_mut().filter(|s| s.usable() && batchable) {
                Some(s) if !s.tcp_room() => {
                    // This submission is full: the rest go in the next one.
                    cx.dirty.push(idx);
                    break;
                }
                Some(s) => stage(c, s, idx),
                None => false,
            };
            if !staged && flush(c, cx, base + idx) {
                conns.close(idx, cx);
            }
        }
        let Some(s) = cx.sends.as_mut().filter(|s| s.queued()) else {
            return;
        };
        let done = s.submit(cx.server.stats_mut());
        for t in &done {
            let close = match conns.slots.get_mut(t.idx).and_then(|c| c.as_mut()) {
                Some(c) => finish_batched(c, cx, base + t.idx, t),
                None => false,
            };
            if close {
                conns.close(t.idx, cx);
            }
        }
        if let Some(s) = cx.sends.as_mut() {
            s.done(done);
        }
        if cx.dirty.is_empty() {
            return;
        }
    }
}

/// Reads what peers sent to relay socket `r` and queues it for the clients.
fn from_peers(r: usize, conns: &mut Conns, cx: &mut Cx<'_, '_>) {
    let mut read = 0;
    loop {
        if read >= BUDGET {
            cx.relays.pending.push(r);
            return;
        }
        let fd = match cx.relays.slots.get(r) {
            Some(RelaySock::Udp(s)) => s.as_raw_fd(),
            _ => return,
        };
        let n = match cx.batch.recv(fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        read += n;
        for i in 0..n {
            let Some(d) = cx.batch.get(i) else { break };
            if d.truncated {
                cx.stats().incr(Counter::DropTruncated);
                continue;
            }
            let Some(from) = d.from else {
                continue;
            };
            let len = d.payload.len();
            cx.work[HEADROOM..HEADROOM + len].copy_from_slice(d.payload);
            from_peer(r, from, len, conns, cx);
        }
        if n < BATCH {
            // The socket is empty (see `batch`).
            return;
        }
    }
}

/// Relays one datagram a peer sent to relay socket `r` (in `work` at `HEADROOM`).
fn from_peer(r: usize, from: SocketAddr, len: usize, conns: &mut Conns, cx: &mut Cx<'_, '_>) {
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
        return;
    };
    let Some(idx) = socket.checked_sub(cx.conn_base) else {
        cx.stats().incr(Counter::SendErrors);
        return;
    };
    let conn = conns
        .slots
        .get_mut(idx)
        .and_then(|c| c.as_mut())
        .filter(|c| c.peer.ip().to_canonical() == to.ip() && c.peer.port() == to.port());
    let Some(c) = conn else {
        cx.stats().incr(Counter::SendErrors);
        return;
    };
    if c.output.is_empty() {
        cx.dirty.push(idx);
    }
    let mut fits = cx.queue_work(c, offset, len);
    if !fits {
        // The queue may hold only this turn's batch from the relay sockets: write it
        // out before dropping anything, so a client that reads loses nothing.
        if flush(c, cx, cx.token_base + idx) {
            cx.stats().incr(Counter::DropStreamBacklog);
            conns.close(idx, cx);
            return;
        }
        // A queue that waited for the socket to drain may have been written out whole:
        // without write interest now, what goes in next leaves with this turn's flush.
        // (Listed twice at most; the flush skips a connection with nothing to write.)
        cx.dirty.push(idx);
        fits = cx.queue_work(c, offset, len);
    }
    if fits {
        cx.stats().incr(Counter::TxPackets);
    } else {
        // A client that does not read loses data, as it would over UDP; its queue
        // does not grow.
        cx.stats().incr(Counter::DropStreamBacklog);
    }
}
