//! The epoll driver (mio): the fallback where io_uring is not allowed, for instance under a
//! container's seccomp profile. Same sans-IO server, same buffer discipline: one buffer per
//! worker, the datagram received after [`HEADROOM`] bytes, the reply written in place and
//! sent before the next receive.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use mio::{Events, Interest, Poll, Registry, Token};
use portico_shared::counters::Counter;

use super::relay::{self, Reservations, Slots};
use super::uring::PAYLOAD_CAPACITY;
use super::{fold, tick_for, SettingsWatch, Shared, BUF_SIZE};
use crate::server::{Action, Received, Transport, HEADROOM};
use crate::turn::{RelayIo, Reserved};

/// Datagrams read from one socket before the others get a turn. mio is edge-triggered, so a
/// socket cut off by this budget is revisited on the next turn without waiting.
const BUDGET: usize = 64;

struct Relays<'r> {
    slots: Slots<mio::net::UdpSocket>,
    reservations: &'r Reservations,
    registry: &'r Registry,
    /// Sockets with data to read, by socket index.
    pending: Vec<bool>,
}

impl Relays<'_> {
    fn mark(&mut self, index: usize) {
        if index >= self.pending.len() {
            self.pending.resize(index + 1, false);
        }
        self.pending[index] = true;
    }
}

impl RelayIo for Relays<'_> {
    fn open(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<usize> {
        let s = self.reservations.bind(addr)?;
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
        if let Some(p) = self.pending.get_mut(index) {
            *p = false;
        }
    }

    fn local_addr(&self, index: usize) -> Option<SocketAddr> {
        self.slots.get(index)?.local_addr().ok()
    }
}

impl Relays<'_> {
    /// Registers a bound relay socket and gives it its index.
    fn start(&mut self, socket: UdpSocket, dont_fragment: bool) -> io::Result<usize> {
        relay::prepare(&socket, dont_fragment)?;
        let mut s = mio::net::UdpSocket::from_std(socket);
        let index = self.slots.next_index();
        self.registry
            .register(&mut s, Token(index), Interest::READABLE)?;
        self.slots.insert(s);
        // Data may already be queued (a reservation redeemed late): look once.
        self.mark(index);
        Ok(index)
    }
}

pub fn run(index: usize, shared: Arc<Shared>, sockets: Vec<UdpSocket>) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let mut events = Events::with_capacity(256);
    let mut listen: Vec<mio::net::UdpSocket> = sockets
        .into_iter()
        .map(mio::net::UdpSocket::from_std)
        .collect();
    for (i, s) in listen.iter_mut().enumerate() {
        registry.register(s, Token(i), Interest::READABLE)?;
    }
    let mut relays = Relays {
        slots: Slots::new(listen.len()),
        reservations: &shared.reservations,
        registry: &registry,
        pending: vec![false; listen.len()],
    };
    let mut server = shared.new_server(index)?;
    let mut fast = (shared.fast_path.clone()).map(|f| crate::fastpath::Worker::new(f, &mut server));
    let mut watch = SettingsWatch::new(&shared);
    let block = shared.shm.segment().counters(index);
    // Same layout as an io_uring buffer: headroom, then the datagram (one byte more than
    // fits, to detect truncation).
    let mut buf = vec![0u8; BUF_SIZE + 1];
    while !shared.stopping() {
        let timeout = if relays.pending.iter().any(|p| *p) {
            Duration::ZERO
        } else {
            tick_for(&server)
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        server.stats_mut().incr(Counter::LoopTurns);
        watch.refresh(&shared, &mut server);
        for ev in events.iter() {
            relays.mark(ev.token().0);
        }
        let now = super::now();
        for i in 0..relays.pending.len() {
            if !relays.pending[i] {
                continue;
            }
            relays.pending[i] = false;
            for n in 0..=BUDGET {
                if n == BUDGET {
                    relays.mark(i);
                    break;
                }
                let received = match listen.get(i) {
                    Some(s) => s.recv_from(&mut buf[HEADROOM..]),
                    None => match relays.slots.get(i) {
                        Some(s) => s.recv_from(&mut buf[HEADROOM..]),
                        None => break,
                    },
                };
                let (len, from) = match received {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let stats = server.stats_mut();
                stats.incr(Counter::RxPackets);
                stats.add(Counter::RxBytes, len as u64);
                if len > PAYLOAD_CAPACITY {
                    stats.incr(Counter::DropTruncated);
                    continue;
                }
                let rx = Received {
                    transport: Transport::Udp,
                    socket: i,
                    from,
                    buf: &mut buf[..BUF_SIZE],
                    start: HEADROOM,
                    len,
                };
                let action = server.handle(now, &mut relays, rx);
                if let Action::Send {
                    offset,
                    len,
                    socket,
                    to,
                } = action
                {
                    // Unlike io_uring's, this send leaves within the loop turn: hand the
                    // counts over first, so whoever sees the reply sees them too.
                    fold(server.stats_mut(), block);
                    let data = &buf[offset..offset + len];
                    let sent = match listen.get(socket) {
                        Some(s) => s.send_to(data, to),
                        None => match relays.slots.get(socket) {
                            Some(s) => s.send_to(data, to),
                            None => Err(io::Error::from(io::ErrorKind::NotFound)),
                        },
                    };
                    let stats = server.stats_mut();
                    match sent {
                        Ok(n) => {
                            stats.incr(Counter::TxPackets);
                            stats.add(Counter::TxBytes, n as u64);
                        }
                        Err(_) => stats.incr(Counter::SendErrors),
                    }
                }
            }
        }
        server.tick(now, &mut relays);
        if let Some(f) = fast.as_mut() {
            f.sync(&mut server, now);
        }
        fold(server.stats_mut(), block);
    }
    if let Some(f) = fast.as_mut() {
        f.shutdown(&mut server);
    }
    server.shutdown(super::now(), &mut relays);
    fold(server.stats_mut(), block);
    Ok(())
}
