//! One client connection: reading, framing, answering, writing; and the table of them.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use mio::{Interest, Token};
use portico_shared::counters::Counter;
use portico_shared::shm::Blacklist;
use rustls::{ServerConfig, ServerConnection};

use super::listen::Listener;
use super::pipe;
use super::sends::{Sends, TcpSend};
use super::Cx;
use crate::io::handoff::{Handoff, Stream};
use crate::io::uring::PAYLOAD_CAPACITY;
use crate::io::BUF_SIZE;
use crate::server::{Action, Received, Transport, HEADROOM};
use crate::stun;
use crate::turn::TcpEvent;

pub(super) struct Conn {
    pub(super) stream: Stream,
    pub(super) peer: SocketAddr,
    /// The endpoint Binding answers as from; a TLS connection answers as itself.
    pub(super) endpoint: Option<usize>,
    pub(super) tls: Option<Box<ServerConnection>>,
    /// Bytes read and not yet consumed (a partial frame, or a data connection's bytes its
    /// peer cannot take yet). Empty (no allocation) while nothing is pending: a connection
    /// borrows one of the thread's spare buffers for the length of a read ([`lend_input`]).
    pub(super) input: Box<[u8]>,
    pub(super) in_len: usize,
    pub(super) output: Vec<u8>,
    /// TLS records taken out of rustls for a batched write ([`super::sends`]) that the
    /// socket did not take all of: written before anything rustls still holds.
    pub(super) tls_pending: Vec<u8>,
    /// Its output is staged in the submission being prepared: not staged twice.
    pub(super) staged: bool,
    pub(super) opened: Instant,
    pub(super) last_message: Option<Instant>,
    pub(super) writable_interest: bool,
    /// RFC 6062: a data connection, piped to this peer socket.
    pub(super) pipe: Option<usize>,
    /// A data connection whose input is full while its peer's buffer is: not read until
    /// the peer's buffer drains.
    pub(super) paused: bool,
    /// A data connection whose peer is gone: closes once its output is written.
    pub(super) drain_close: bool,
}

/// Output queues a thread keeps for reuse: a connection holds one only while it has
/// something unwritten ([`flush`] takes it back), so a few cover the connections being
/// written at the same time.
const SPARE_OUTPUTS: usize = 16;
/// A queue grown larger than this (a burst) is freed when it empties, not kept.
const SPARE_OUTPUT_CAPACITY: usize = 4096;

/// Appends a message to a connection's output, ChannelData padded to 4 bytes (RFC 8656
/// §12.5), in a spare queue if the connection holds none. False when it does not fit
/// under the cap.
pub(super) fn queue(c: &mut Conn, msg: &[u8], cap: usize, spare: &mut Vec<Vec<u8>>) -> bool {
    if c.output.capacity() == 0 {
        if let Some(v) = spare.pop() {
            c.output = v;
        }
    }
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
pub(super) struct Conns {
    pub(super) base: usize,
    pub(super) slots: Vec<Option<Conn>>,
    pub(super) free: Vec<usize>,
    pub(super) per_source: HashMap<IpAddr, usize>,
    pub(super) live: usize,
}

impl Conns {
    /// Accepts until the listener has nothing more, refusing blacklisted sources and those
    /// over a limit right away. `tls`: `Err` for a TLS listener without a certificate.
    pub(super) fn accept_all(
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

    /// Takes every connection the proxy handed over ([`crate::io::handoff`]).
    pub(super) fn take_handoffs(
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
            input: Box::default(),
            in_len: 0,
            output: Vec::new(),
            tls_pending: Vec::new(),
            staged: false,
            opened: now.mono,
            last_message: None,
            writable_interest: false,
            pipe: None,
            paused: false,
            drain_close: false,
        });
    }

    /// Closes a connection; the allocation made over it ends with it.
    pub(super) fn close(&mut self, idx: usize, cx: &mut Cx<'_, '_>) {
        if let Some(mut c) = self.slots.get_mut(idx).and_then(|c| c.take()) {
            let _ = cx.poll.registry().deregister(&mut c.stream);
            pipe::client_closed(&mut c, cx);
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

/// Spare input buffers a thread keeps beyond the one in use: a connection holds one only
/// while it has a partial frame, so a few cover the connections that do at the same time.
const SPARE_INPUTS: usize = 16;

/// Gives the connection an input buffer for a read: one of the thread's spares.
fn lend_input(c: &mut Conn, spare: &mut Vec<Box<[u8]>>) {
    if c.input.is_empty() {
        c.input = spare
            .pop()
            .unwrap_or_else(|| vec![0u8; PAYLOAD_CAPACITY].into_boxed_slice());
    }
}

/// Takes the input buffer back when nothing in it is pending (at most [`SPARE_INPUTS`]
/// are kept; more are freed).
fn return_input(c: &mut Conn, spare: &mut Vec<Box<[u8]>>) {
    if c.in_len == 0 && !c.input.is_empty() {
        let buf = std::mem::take(&mut c.input);
        if spare.len() < SPARE_INPUTS {
            spare.push(buf);
        }
    }
}

/// Reads what is there, answers every complete message, flushes. Returns true to close.
///
/// `edge`: called for a readiness event that did not report the peer's end (FIN, error).
/// Polling is edge-triggered and the kernel reports every arrival, so a read that returns
/// less than it asked for has emptied the socket: the read after it, which would only hear
/// `EAGAIN`, is skipped. Without that guarantee (a connection served again after a pause,
/// an event that also reported the end, a data connection) the socket is read until
/// `EAGAIN` or end of stream.
pub(super) fn serve(
    c: &mut Conn,
    cx: &mut Cx<'_, '_>,
    token: usize,
    idx: usize,
    edge: bool,
) -> bool {
    lend_input(c, cx.spare);
    let stop_short = edge && c.pipe.is_none();
    let close = if c.tls.is_some() {
        read_tls_and_answer(c, cx, idx, stop_short)
    } else {
        read_and_answer(c, cx, idx, stop_short)
    };
    cx.fold();
    // Answers to the messages before a framing error still leave, best effort.
    let failed = flush(c, cx, token);
    return_input(c, cx.spare);
    close || failed
}

/// Reads and answers into the output queue. Returns true to close.
fn read_and_answer(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize, stop_short: bool) -> bool {
    loop {
        if c.in_len == c.input.len() {
            match full(c, cx, idx) {
                Full::Close => return true,
                Full::Paused => return false,
                Full::Room => {}
            }
        }
        let room = c.input.len() - c.in_len;
        let short = match c.stream.read(&mut c.input[c.in_len..]) {
            Ok(0) => return true,
            Ok(n) => {
                c.in_len += n;
                cx.stats().add(Counter::RxBytes, n as u64);
                n < room
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        };
        // Frame as we go so a client that pipelines many requests is served without the
        // buffer filling up.
        if consume(c, cx, idx) {
            return true;
        }
        if short && stop_short {
            return false;
        }
    }
    consume(c, cx, idx)
}

enum Full {
    Close,
    Paused,
    Room,
}

/// The input buffer is full: a frame too large on a TURN connection; on a data connection
/// whose peer cannot take more, a pause.
fn full(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize) -> Full {
    if c.pipe.is_none() {
        // A full buffer without a complete message: the frame is too large.
        cx.stats().incr(Counter::DropTcpFraming);
        return Full::Close;
    }
    if consume(c, cx, idx) {
        return Full::Close;
    }
    if c.in_len < c.input.len() {
        return Full::Room;
    }
    if !c.paused {
        c.paused = true;
        cx.stats().incr(Counter::TcpRelayPaused);
    }
    Full::Paused
}

/// What was read: framed and answered, or on a data connection piped to the peer. Returns
/// true to close.
fn consume(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize) -> bool {
    if c.drain_close {
        // The peer is gone; what the client still sends has nowhere to go.
        c.in_len = 0;
        return false;
    }
    if c.pipe.is_none() && frame_all(c, cx, idx) {
        return true;
    }
    c.pipe.is_some() && pipe::pipe_in(c, cx)
}

/// The same over TLS: records in, plaintext framed. A TLS error (a bad record, an alert
/// from the client) closes the connection, after our alert if rustls has one to send.
fn read_tls_and_answer(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize, stop_short: bool) -> bool {
    let mut eof = false;
    let mut drained = false;
    loop {
        // Plaintext rustls holds first (records read before a pause are there).
        loop {
            if c.in_len == c.input.len() {
                match full(c, cx, idx) {
                    Full::Close => return true,
                    Full::Paused => return false,
                    Full::Room => {}
                }
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
            if consume(c, cx, idx) {
                return true;
            }
        }
        if eof || consume(c, cx, idx) {
            return true;
        }
        if drained && stop_short {
            return false;
        }
        let Some(tls) = c.tls.as_mut() else {
            return true;
        };
        let mut rd = ShortRead {
            inner: &mut c.stream,
            short: false,
        };
        match tls.read_tls(&mut rd) {
            Ok(0) => eof = true,
            Ok(n) => {
                drained = rd.short;
                cx.stats().add(Counter::RxBytes, n as u64);
            }
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
    }
}

/// What the bytes at the start of a TURN stream's input are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFrame {
    /// Not yet a complete message: read more.
    NeedMore,
    /// A complete STUN message or ChannelData (with its padding) of this many bytes.
    Frame(usize),
    /// Neither STUN nor ChannelData, or larger than a frame can be: the connection closes.
    Bad,
}

/// Frames the start of a TURN stream (RFC 8656 §12.5, RFC 6062): what
/// [`frame_all`] cuts off, and `fuzz/fuzz_targets/tcp_framing.rs` checks read by read.
pub(crate) fn stream_frame(pending: &[u8]) -> StreamFrame {
    if pending.len() < 4 {
        return StreamFrame::NeedMore;
    }
    let total = if pending[0] & 0xC0 == 0x40 {
        // ChannelData, padded to 4 bytes over a stream (RFC 8656 §12.5).
        let len = usize::from(u16::from_be_bytes([pending[2], pending[3]]));
        4 + len.div_ceil(4) * 4
    } else {
        // Refuse what is not STUN as early as its first bytes say so (a TLS ClientHello
        // on the plain port, an HTTP request): only RFC 5389+ clients exist over TCP, so
        // the magic cookie must follow.
        if pending.len() >= 8 && pending[4..8] != stun::MAGIC_COOKIE.to_be_bytes() {
            return StreamFrame::Bad;
        }
        match stun::message_len_from_header(pending) {
            Some(t) => t,
            None => return StreamFrame::Bad,
        }
    };
    if total > PAYLOAD_CAPACITY {
        StreamFrame::Bad
    } else if pending.len() < total {
        StreamFrame::NeedMore
    } else {
        StreamFrame::Frame(total)
    }
}

/// The socket under rustls's `read_tls`, telling whether its last read came back short
/// (the socket emptied).
struct ShortRead<'a> {
    inner: &'a mut Stream,
    short: bool,
}

impl Read for ShortRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

/// Cuts the complete messages off the input and answers them. Returns true to close.
fn frame_all(c: &mut Conn, cx: &mut Cx<'_, '_>, idx: usize) -> bool {
    let mut start = 0;
    loop {
        let pending = &c.input[start..c.in_len];
        let total = match stream_frame(pending) {
            StreamFrame::NeedMore => break,
            StreamFrame::Bad => {
                cx.stats().incr(Counter::DropTcpFraming);
                return true;
            }
            StreamFrame::Frame(total) => total,
        };
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
            let mut fits = cx.queue_work(c, offset, len);
            if !fits {
                // A client that pipelines requests may have more answers waiting than fit:
                // they are written out first (a failed write closes the connection).
                if flush(c, cx, cx.token_base + idx) {
                    return true;
                }
                fits = cx.queue_work(c, offset, len);
            }
            if !fits {
                // The client sends requests faster than it reads their answers.
                cx.stats().incr(Counter::TcpClosedBacklog);
                return true;
            }
            cx.stats().incr(Counter::TxPackets);
        }
        // A ConnectionBind made this a data connection: what follows it is the peer's.
        cx.server.take_tcp_events(cx.events);
        let bound = cx
            .events
            .iter()
            .position(|e| matches!(e, TcpEvent::Pipe { conn: k, .. } if *k == conn));
        if let Some(i) = bound {
            if let TcpEvent::Pipe { peer, .. } = cx.events.remove(i) {
                pipe::bind(c, idx, peer, cx);
            }
            break;
        }
    }
    c.input.copy_within(start..c.in_len, 0);
    c.in_len -= start;
    false
}

/// Writes what is queued (through TLS when the connection has it). Returns true to close.
pub(super) fn flush(c: &mut Conn, cx: &mut Cx<'_, '_>, token: usize) -> bool {
    write_out(c, cx) || settle(c, cx, token)
}

/// The writing part of [`flush`]. Returns true to close.
fn write_out(c: &mut Conn, cx: &mut Cx<'_, '_>) -> bool {
    while !c.tls_pending.is_empty() {
        match c.stream.write(&c.tls_pending) {
            Ok(0) => return true,
            Ok(n) => {
                c.tls_pending.drain(..n);
                cx.stats().add(Counter::TxBytes, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
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
    false
}

/// After a write: queues back to the spare lists, a drained data connection closed, a paused
/// peer resumed, write interest as the output needs. Returns true to close.
fn settle(c: &mut Conn, cx: &mut Cx<'_, '_>, token: usize) -> bool {
    if c.output.is_empty() && c.output.capacity() > 0 {
        let v = std::mem::take(&mut c.output);
        if v.capacity() <= SPARE_OUTPUT_CAPACITY && cx.out_spare.len() < SPARE_OUTPUTS {
            cx.out_spare.push(v);
        }
    }
    if c.tls_pending.is_empty() && c.tls_pending.capacity() > 0 {
        c.tls_pending = Vec::new();
    }
    let want_write = !c.output.is_empty()
        || !c.tls_pending.is_empty()
        || c.tls.as_ref().is_some_and(|t| t.wants_write());
    if c.drain_close && !want_write {
        return true;
    }
    // A data connection's peer paused on this full output reads again from half.
    if let Some(d) = c.pipe.and_then(|p| cx.relays.data_mut(p)) {
        if d.paused && c.output.len() <= cx.limits.max_output / 2 {
            d.paused = false;
            if let Some(p) = c.pipe {
                cx.relays.pending.push(p);
            }
        }
    }
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

/// Whether a connection has anything to write.
pub(super) fn has_output(c: &Conn) -> bool {
    !c.output.is_empty()
        || !c.tls_pending.is_empty()
        || c.tls.as_ref().is_some_and(|t| t.wants_write())
}

/// Stages what a client connection has to write for the turn's batched submission
/// ([`Sends`]): its output, or over TLS the records rustls makes of it (after any left from
/// the last batched write). False when nothing was staged: the caller writes directly.
pub(super) fn stage(c: &mut Conn, sends: &mut Sends, idx: usize) -> bool {
    if c.staged {
        // Given more data after a direct write this turn: already in this submission.
        return true;
    }
    let room = sends.arena_room();
    let fd = match &c.stream {
        Stream::Tcp(s) => s.as_raw_fd(),
        Stream::Unix(s) => s.as_raw_fd(),
    };
    match c.tls.as_mut() {
        None => {
            if c.output.len() > room {
                return false;
            }
            c.staged = sends.queue_tcp(idx, fd, |arena| arena.extend_from_slice(&c.output));
            c.staged
        }
        Some(tls) => {
            if c.tls_pending.len() >= room {
                return false;
            }
            if !tls.wants_write() && !c.output.is_empty() {
                match tls.writer().write(&c.output) {
                    Ok(n) => {
                        c.output.drain(..n);
                    }
                    // rustls refuses plaintext only once closed: the direct path closes.
                    Err(_) => return false,
                }
            }
            let pending = &mut c.tls_pending;
            let staged = sends.queue_tcp(idx, fd, |arena| {
                arena.extend_from_slice(pending);
                let mut w = Bounded {
                    out: arena,
                    limit: arena_limit(room, pending.len()),
                };
                while tls.wants_write() && w.limit > 0 {
                    match tls.write_tls(&mut w) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            });
            if staged {
                c.tls_pending.clear();
            }
            c.staged = staged;
            staged
        }
    }
}

fn arena_limit(room: usize, pending: usize) -> usize {
    room.saturating_sub(pending)
}

/// A writer into the arena that takes at most `limit` more bytes (rustls keeps the rest).
struct Bounded<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.limit);
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        self.out.extend_from_slice(&buf[..n]);
        self.limit -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Finishes a batched write to a client connection: what the socket took leaves the queue,
/// the rest stays ahead of anything later (over TLS, the records go to `tls_pending`), and
/// what the connection still holds is written directly. Returns true to close.
pub(super) fn finish_batched(
    c: &mut Conn,
    cx: &mut Cx<'_, '_>,
    token: usize,
    send: &TcpSend,
) -> bool {
    c.staged = false;
    let Some(written) = send.written() else {
        return true;
    };
    cx.stats().add(Counter::TxBytes, written as u64);
    if c.tls.is_some() {
        if let Some(s) = cx.sends.as_ref() {
            c.tls_pending.extend_from_slice(s.rest(send, written));
        }
    } else {
        c.output.drain(..written.min(c.output.len()));
    }
    if written < send.len {
        // The socket is full: write interest, and the rest when it drains.
        settle(c, cx, token)
    } else {
        flush(c, cx, token)
    }
}
