//! RFC 6062 data connections, the driver's part: accepting peers on a TCP relay, finishing
//! outgoing connections, carrying out the core's [`TcpEvent`]s, and the byte pipe between a
//! bound client connection and its peer.
//!
//! The pipe never grows memory: each direction has one buffer of at most
//! `turn.tcp_output_buffer` bytes (the client connection's output queue one way, the peer
//! socket's `out` the other). When a buffer is full the side that fills it is no longer
//! read (counted in `portico_turn_tcp_relay_backpressure_total`) until the buffer has
//! drained to half; TCP flow control then slows the sender down. Polling is edge-triggered,
//! so a paused side is put back on a list to be read again rather than waiting for an event.

use std::io::{self, Read, Write};

use mio::{Interest, Token};
use portico_shared::counters::Counter;

use super::conn::{flush, Conn, Conns};
use super::relays::{DataSock, RelaySock};
use super::{Cx, BUDGET, RELAY_TOKEN};
use crate::turn::{RelayIo, TcpEvent};

/// Accepts the peers waiting on TCP relay `r`; the core keeps those with a permission.
pub(super) fn accept_peers(r: usize, cx: &mut Cx<'_, '_>) {
    for _ in 0..BUDGET {
        let accepted = match cx.relays.slots.get(r) {
            Some(RelaySock::Listen(l)) => l.accept(),
            _ => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(socket) = cx.relays.insert_data(stream, false) else {
                    cx.stats().incr(Counter::TcpRelayRefused);
                    continue;
                };
                if !cx
                    .server
                    .tcp_accepted(cx.now, &mut *cx.relays, r, peer, socket)
                {
                    cx.relays.close(socket);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    cx.relays.pending.push(r);
}

/// Readiness on data connection `r` (or a read owed to it): the end of an outgoing
/// handshake, bytes from the peer, room to write to it.
pub(super) fn data_event(r: usize, conns: &mut Conns, cx: &mut Cx<'_, '_>) {
    let Some(d) = cx.relays.data_mut(r) else {
        return;
    };
    if d.connecting {
        let failed = matches!(d.stream.take_error(), Ok(Some(_)) | Err(_));
        let ok = !failed && d.stream.peer_addr().is_ok();
        if !failed && !ok {
            // Still in progress: a spurious wake-up.
            return;
        }
        if ok {
            d.connecting = false;
            let _ = set_interest(d, r, cx.poll, false);
        }
        // On failure the core closes the socket (and answers 447).
        cx.server.tcp_connected(cx.now, &mut *cx.relays, r, ok);
        return;
    }
    let Some(client) = d.client else {
        // Not bound yet: its bytes wait in the kernel until ConnectionBind.
        return;
    };
    // Towards the peer first: room there may let a paused client go on.
    let mut gone = flush_peer(r, cx, conns);
    if !gone {
        gone = match conns.slots.get_mut(client).and_then(|c| c.as_mut()) {
            Some(c) => peer_to_client(r, c, cx),
            None => true,
        };
    }
    if gone {
        close_peer(r, conns, cx);
        return;
    }
    if let Some(c) = conns.slots.get_mut(client).and_then(|c| c.as_mut()) {
        if flush(c, cx, conns.base + client) {
            conns.close(client, cx);
        }
    }
}

/// Reads from the peer into the client's output while it has room. True: the peer is gone.
fn peer_to_client(r: usize, c: &mut Conn, cx: &mut Cx<'_, '_>) -> bool {
    let cap = cx.limits.max_output;
    let Some(RelaySock::Data(d)) = cx.relays.slots.get_mut(r) else {
        return true;
    };
    let stats = cx.server.stats_mut();
    loop {
        let room = cap.saturating_sub(c.output.len()).min(cx.work.len());
        if room == 0 {
            if !d.paused {
                d.paused = true;
                stats.incr(Counter::TcpRelayPaused);
            }
            return false;
        }
        match d.stream.read(&mut cx.work[..room]) {
            Ok(0) => return true,
            Ok(n) => {
                c.output.extend_from_slice(&cx.work[..n]);
                c.last_message = Some(cx.now.mono);
                stats.incr(Counter::RelayPeerToClientPackets);
                stats.add(Counter::RelayPeerToClientBytes, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Moves what the client sent on its data connection into the peer's buffer and writes it.
/// Returns true to close the client connection.
pub(super) fn pipe_in(c: &mut Conn, cx: &mut Cx<'_, '_>) -> bool {
    let Some(peer) = c.pipe else {
        return false;
    };
    let cap = cx.limits.max_output;
    let Some(d) = cx.relays.data_mut(peer) else {
        return true;
    };
    let n = cap.saturating_sub(d.out.len()).min(c.in_len);
    if n > 0 {
        d.out.extend_from_slice(&c.input[..n]);
        c.input.copy_within(n..c.in_len, 0);
        c.in_len -= n;
        c.last_message = Some(cx.now.mono);
        let stats = cx.server.stats_mut();
        stats.incr(Counter::RelayClientToPeerPackets);
        stats.add(Counter::RelayClientToPeerBytes, n as u64);
    }
    match write_peer(peer, cx) {
        Some(_) => false,
        None => {
            // The peer is gone: so is the client's data connection.
            if let Some(d) = cx.relays.data_mut(peer) {
                d.client = None;
            }
            cx.relays.close(peer);
            cx.server.tcp_closed(cx.now, &mut *cx.relays, peer);
            cx.stats().incr(Counter::TcpRelayClosedEnd);
            c.pipe = None;
            true
        }
    }
}

/// Writes the peer's buffer. `None`: the peer is gone; else whether it drained below half.
fn write_peer(r: usize, cx: &mut Cx<'_, '_>) -> Option<bool> {
    let cap = cx.limits.max_output;
    let d = cx.relays.data_mut(r)?;
    while !d.out.is_empty() {
        match d.stream.write(&d.out) {
            Ok(0) => return None,
            Ok(n) => {
                d.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    let want_write = !d.out.is_empty();
    set_interest(d, r, cx.poll, want_write).ok()?;
    Some(d.out.len() <= cap / 2)
}

/// Writes towards the peer and wakes a client paused on the full buffer. True: peer gone.
fn flush_peer(r: usize, cx: &mut Cx<'_, '_>, conns: &mut Conns) -> bool {
    let Some(room) = write_peer(r, cx) else {
        return true;
    };
    let client = cx.relays.data_mut(r).and_then(|d| d.client);
    if let (true, Some(ci)) = (room, client) {
        if let Some(c) = conns.slots.get_mut(ci).and_then(|c| c.as_mut()) {
            if c.paused {
                c.paused = false;
                cx.resume.push(ci);
            }
        }
    }
    false
}

fn set_interest(d: &mut DataSock, r: usize, poll: &mio::Poll, write: bool) -> io::Result<()> {
    let want = if write {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    if want != d.interest {
        poll.registry()
            .reregister(&mut d.stream, Token(RELAY_TOKEN | r), want)?;
        d.interest = want;
    }
    Ok(())
}

/// The peer of a data connection is gone (or failed): the client side closes once what it
/// has queued is written.
pub(super) fn close_peer(r: usize, conns: &mut Conns, cx: &mut Cx<'_, '_>) {
    let client = cx.relays.data_mut(r).and_then(|d| d.client.take());
    cx.relays.close(r);
    cx.server.tcp_closed(cx.now, &mut *cx.relays, r);
    cx.stats().incr(Counter::TcpRelayClosedEnd);
    if let Some(ci) = client {
        let close_now = match conns.slots.get_mut(ci).and_then(|c| c.as_mut()) {
            Some(c) if c.pipe == Some(r) => {
                c.pipe = None;
                c.drain_close = true;
                c.output.is_empty()
            }
            _ => false,
        };
        if close_now {
            conns.close(ci, cx);
        }
    }
}

/// The client side of a data connection closes: so does its peer (called by
/// [`Conns::close`]).
pub(super) fn client_closed(c: &mut Conn, cx: &mut Cx<'_, '_>) {
    let Some(peer) = c.pipe.take() else {
        return;
    };
    if let Some(d) = cx.relays.data_mut(peer) {
        d.client = None;
        // What the client sent last, best effort.
        let _ = d.stream.write(&d.out);
    }
    cx.relays.close(peer);
    cx.server.tcp_closed(cx.now, &mut *cx.relays, peer);
    cx.stats().incr(Counter::TcpRelayClosedEnd);
}

/// Carries out what the core asked besides its replies (Connect answers, ConnectionAttempt
/// indications, pipes), closes the client sides of data connections the core closed, and
/// serves clients whose paused input may go on.
pub(super) fn deliver(conns: &mut Conns, cx: &mut Cx<'_, '_>) {
    cx.server.take_tcp_events(cx.events);
    let events = std::mem::take(cx.events);
    for e in &events {
        match *e {
            TcpEvent::Message {
                conn,
                to: _,
                ref bytes,
            } => {
                let Some(idx) = conn.checked_sub(cx.conn_base) else {
                    continue;
                };
                let Some(c) = conns.slots.get_mut(idx).and_then(|c| c.as_mut()) else {
                    continue;
                };
                if c.output.len() + bytes.len() > cx.limits.max_output {
                    cx.stats().incr(Counter::DropStreamBacklog);
                    continue;
                }
                c.output.extend_from_slice(bytes);
                cx.stats().incr(Counter::TxPackets);
                if flush(c, cx, conns.base + idx) {
                    conns.close(idx, cx);
                }
            }
            TcpEvent::Pipe { conn, peer } => {
                // A bind whose client connection was not being served (normally applied
                // while framing): the same here.
                if let Some(idx) = conn.checked_sub(cx.conn_base) {
                    if let Some(c) = conns.slots.get_mut(idx).and_then(|c| c.as_mut()) {
                        bind(c, idx, peer, cx);
                    }
                }
            }
        }
    }
    let mut reuse = events;
    reuse.clear();
    *cx.events = reuse;
    while let Some((idx, peer)) = cx.relays.orphans.pop() {
        let close = match conns.slots.get_mut(idx).and_then(|c| c.as_mut()) {
            Some(c) if c.pipe == Some(peer) => {
                c.pipe = None;
                true
            }
            _ => false,
        };
        if close {
            conns.close(idx, cx);
        }
    }
    while let Some(idx) = cx.resume.pop() {
        let close = match conns.slots.get_mut(idx).and_then(|c| c.as_mut()) {
            Some(c) => super::conn::serve(c, cx, conns.base + idx, idx, false),
            None => false,
        };
        if close {
            conns.close(idx, cx);
        }
    }
}

/// Client connection `idx` becomes the data connection of peer socket `peer`.
pub(super) fn bind(c: &mut Conn, idx: usize, peer: usize, cx: &mut Cx<'_, '_>) {
    if let Some(d) = cx.relays.data_mut(peer) {
        d.client = Some(idx);
        c.pipe = Some(peer);
        // The peer may have sent already, before the edge we ignored: read it once.
        cx.relays.pending.push(peer);
    }
}
