//! The relay sockets of the TCP thread, as the core's [`RelayIo`].

use std::io;
use std::net::{SocketAddr, UdpSocket};

use mio::{Interest, Registry, Token};

use super::RELAY_TOKEN;
use crate::io::relay::{self, Reservations, Slots};
use crate::turn::{RelayIo, Reserved};

/// The relay sockets of the TCP thread, registered in its poll.
pub(super) struct StreamRelays<'r> {
    pub(super) slots: Slots<mio::net::UdpSocket>,
    pub(super) reservations: &'r Reservations,
    pub(super) registry: &'r Registry,
    /// Relay sockets cut off by the read budget, to read again without waiting.
    pub(super) pending: Vec<usize>,
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
