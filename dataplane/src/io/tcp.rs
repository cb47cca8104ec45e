//! STUN over TCP (RFC 8489 §6.2.2): the same server behind a stream framing.
//!
//! One thread with mio serves every TCP listener: STUN over TCP is a small share of the
//! traffic (clients behind UDP-hostile firewalls), so it does not need a thread per core.
//! Each connection is bounded: a fixed input buffer (a message larger than a UDP one is a
//! framing error), a capped output queue, a deadline for the first message and an idle
//! timeout, a cap on connections in total and per source address. The listeners are bound
//! without `SO_REUSEPORT`, so a second dataplane on the same addresses fails at start instead
//! of silently sharing the UDP ports.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use portico_shared::counters::Counter;
use portico_shared::shm::{Blacklist, WorkerCounters};
use socket2::{Domain, Protocol, Socket, Type};

use super::uring::PAYLOAD_CAPACITY;
use super::{fold, SettingsWatch, Shared, BUF_SIZE, TICK};
use crate::server::{Action, Now, Received, Server, Stats, Transport, HEADROOM};
use crate::stun;
use crate::turn::NoRelay;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub per_source: usize,
    pub first_message: Duration,
    pub idle: Duration,
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

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    input: Box<[u8]>,
    in_len: usize,
    output: Vec<u8>,
    opened: Instant,
    last_message: Option<Instant>,
    writable_interest: bool,
}

pub fn bind_listeners(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, String> {
    addrs
        .iter()
        .map(|a| {
            tcp_listener(*a)
                .map(TcpListener::from_std)
                .map_err(|e| format!("turn.listen {a}: tcp bind: {e}"))
        })
        .collect()
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

/// What serving the connections works with during one loop turn.
struct Cx<'a> {
    server: &'a mut Server,
    /// This thread's counters in shared memory.
    block: &'a WorkerCounters,
    /// Where a framed message is copied for the core to answer in place.
    work: &'a mut [u8],
    limits: &'a Limits,
    poll: &'a Poll,
    now: Now,
}

impl Cx<'_> {
    fn stats(&mut self) -> &mut Stats {
        self.server.stats_mut()
    }

    /// Hands the counts over before anything leaves: whoever sees an answer or a refusal
    /// sees it counted.
    fn fold(&mut self) {
        fold(self.server.stats_mut(), self.block);
    }
}

pub fn run(
    counter_block: usize,
    shared: Arc<Shared>,
    mut listeners: Vec<TcpListener>,
    limits: Limits,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    for (i, l) in listeners.iter_mut().enumerate() {
        poll.registry().register(l, Token(i), Interest::READABLE)?;
    }
    let base = listeners.len();
    let block = shared.shm.segment().counters(counter_block);
    let mut server = shared.new_server(counter_block)?;
    let mut watch = SettingsWatch::new(&shared);
    let mut conns = Conns {
        base,
        slots: Vec::new(),
        free: Vec::new(),
        per_source: HashMap::new(),
        live: 0,
    };
    let mut work = vec![0u8; BUF_SIZE];
    let mut last_sweep = Instant::now();
    while !shared.stopping() {
        if let Err(e) = poll.poll(&mut events, Some(TICK)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        watch.refresh(&shared, &mut server);
        let mut cx = Cx {
            server: &mut server,
            block,
            work: &mut work,
            limits: &limits,
            poll: &poll,
            now: super::now(),
        };
        for ev in events.iter() {
            let t = ev.token().0;
            if t < base {
                let blacklist = &shared.shm.segment().blacklist;
                conns.accept_all(&mut cx, &mut listeners[t], t, blacklist);
                continue;
            }
            let idx = t - base;
            let close = match conns.slots.get_mut(idx).and_then(|c| c.as_mut()) {
                Some(c) => serve(c, &mut cx, t),
                None => false,
            };
            if close {
                conns.close(idx, &poll);
            }
        }
        let now = cx.now.mono;
        if now.duration_since(last_sweep) >= TICK {
            last_sweep = now;
            for idx in 0..conns.slots.len() {
                let expired = conns.slots[idx]
                    .as_ref()
                    .is_some_and(|c| match c.last_message {
                        None => now.duration_since(c.opened) > limits.first_message,
                        Some(t) => now.duration_since(t) > limits.idle,
                    });
                if expired {
                    conns.close(idx, &poll);
                }
            }
        }
        fold(server.stats_mut(), block);
    }
    Ok(())
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
    /// over a limit right away.
    fn accept_all(
        &mut self,
        cx: &mut Cx<'_>,
        listener: &mut TcpListener,
        listener_index: usize,
        blacklist: &Blacklist,
    ) {
        let (limits, poll, now) = (cx.limits, cx.poll, cx.now);
        loop {
            let (mut stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of descriptors or a connection reset before accept: next turn.
                Err(_) => return,
            };
            let src = peer.ip().to_canonical();
            if blacklist.is_blocked(src, now.unix) {
                cx.stats().incr(Counter::DropBlacklisted);
                cx.fold();
                continue;
            }
            let n = self.per_source.get(&src).copied().unwrap_or(0);
            if self.live >= limits.max_connections || n >= limits.per_source {
                cx.stats().incr(Counter::TcpRejected);
                cx.fold();
                continue;
            }
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
                continue;
            }
            let _ = stream.set_nodelay(true);
            cx.stats().incr(Counter::TcpAccepted);
            *self.per_source.entry(src).or_insert(0) += 1;
            self.live += 1;
            self.slots[idx] = Some(Conn {
                stream,
                peer,
                listener: listener_index,
                input: vec![0u8; PAYLOAD_CAPACITY].into_boxed_slice(),
                in_len: 0,
                output: Vec::new(),
                opened: now.mono,
                last_message: None,
                writable_interest: false,
            });
        }
    }

    fn close(&mut self, idx: usize, poll: &Poll) {
        if let Some(mut c) = self.slots.get_mut(idx).and_then(|c| c.take()) {
            let _ = poll.registry().deregister(&mut c.stream);
            let src = c.peer.ip().to_canonical();
            if let Some(n) = self.per_source.get_mut(&src) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&src);
                }
            }
            self.live = self.live.saturating_sub(1);
            self.free.push(idx);
        }
    }
}

/// Reads what is there, answers every complete message, flushes. Returns true to close.
fn serve(c: &mut Conn, cx: &mut Cx<'_>, token: usize) -> bool {
    let close = read_and_answer(c, cx);
    cx.fold();
    close || flush(c, cx, token)
}

/// Reads and answers into the output queue. Returns true to close.
fn read_and_answer(c: &mut Conn, cx: &mut Cx<'_>) -> bool {
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
        if frame_all(c, cx) {
            return true;
        }
    }
    frame_all(c, cx)
}

fn frame_all(c: &mut Conn, cx: &mut Cx<'_>) -> bool {
    let mut start = 0;
    // Refuse what is not STUN as early as its first bytes say so (a TLS ClientHello, an HTTP
    // request): the first byte of a STUN message has its top two bits clear, and over TCP
    // only RFC 5389+ clients exist, so the magic cookie must follow.
    let head = &c.input[..c.in_len];
    if head.first().is_some_and(|b| b & 0xC0 != 0)
        || (head.len() >= 8 && head[4..8] != stun::MAGIC_COOKIE.to_be_bytes())
    {
        cx.stats().incr(Counter::DropTcpFraming);
        return true;
    }
    while c.in_len - start >= stun::HEADER_LEN {
        let pending = &c.input[start..c.in_len];
        let Some(total) = stun::message_len_from_header(pending) else {
            cx.stats().incr(Counter::DropTcpFraming);
            return true;
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
        let rx = Received {
            transport: Transport::Tcp,
            socket: c.listener,
            from: c.peer,
            buf: cx.work,
            start: HEADROOM,
            len: total,
        };
        let action = cx.server.handle(cx.now, &mut NoRelay, rx);
        if let Action::Send { offset, len, .. } = action {
            if c.output.len() + len > cx.limits.max_output {
                return true;
            }
            c.output.extend_from_slice(&cx.work[offset..offset + len]);
            cx.stats().incr(Counter::TxPackets);
        }
    }
    c.input.copy_within(start..c.in_len, 0);
    c.in_len -= start;
    false
}

fn flush(c: &mut Conn, cx: &mut Cx<'_>, token: usize) -> bool {
    while !c.output.is_empty() {
        match c.stream.write(&c.output) {
            Ok(0) => return true,
            Ok(n) => {
                cx.stats().add(Counter::TxBytes, n as u64);
                c.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    let want_write = !c.output.is_empty();
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
