//! The epoll driver (mio): the fallback where io_uring is not allowed, for instance under a
//! container's seccomp profile. Same sans-IO server, same buffer discipline: one buffer per
//! worker, the reply written over the request and sent before the next receive.

use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use portico_shared::counters::Counter;

use super::uring::PAYLOAD_CAPACITY;
use super::{SettingsWatch, Shared, TICK};
use crate::server::{Action, Server, Transport};

/// Datagrams read from one socket before the others get a turn. mio is edge-triggered, so a
/// socket cut off by this budget is revisited on the next turn without waiting.
const BUDGET: usize = 64;

pub fn run(index: usize, shared: Arc<Shared>, sockets: Vec<UdpSocket>) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(64);
    let mut socks: Vec<mio::net::UdpSocket> = sockets
        .into_iter()
        .map(mio::net::UdpSocket::from_std)
        .collect();
    for (i, s) in socks.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE)?;
    }
    let mut server = Server::new(shared.current_settings());
    let mut watch = SettingsWatch::new(&shared);
    let stats = shared.shm.segment().counters(index);
    // Same capacity as an io_uring buffer's payload area, plus one byte to detect truncation.
    let mut buf = vec![0u8; PAYLOAD_CAPACITY + 1];
    let mut pending = vec![false; socks.len()];
    while !shared.stopping() {
        let timeout = if pending.iter().any(|p| *p) {
            Duration::ZERO
        } else {
            TICK
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        stats.incr(Counter::LoopTurns);
        watch.refresh(&shared, &mut server);
        for ev in events.iter() {
            if let Some(p) = pending.get_mut(ev.token().0) {
                *p = true;
            }
        }
        let now = Instant::now();
        for i in 0..socks.len() {
            if !pending[i] {
                continue;
            }
            pending[i] = false;
            for n in 0..=BUDGET {
                if n == BUDGET {
                    pending[i] = true;
                    break;
                }
                let (len, from) = match socks[i].recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                stats.incr(Counter::RxPackets);
                stats.add(Counter::RxBytes, len as u64);
                if len > PAYLOAD_CAPACITY {
                    stats.incr(Counter::DropTruncated);
                    continue;
                }
                let action = server.handle(
                    now,
                    Transport::Udp,
                    i,
                    from,
                    &mut buf[..PAYLOAD_CAPACITY],
                    len,
                    stats,
                );
                if let Action::Reply { len, socket, to } = action {
                    match socks.get(socket).map(|s| s.send_to(&buf[..len], to)) {
                        Some(Ok(n)) => {
                            stats.incr(Counter::TxPackets);
                            stats.add(Counter::TxBytes, n as u64);
                        }
                        _ => stats.incr(Counter::SendErrors),
                    }
                }
            }
        }
    }
    Ok(())
}
