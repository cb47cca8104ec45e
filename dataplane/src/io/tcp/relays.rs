//! The relay sockets of the TCP thread, as the core's [`RelayIo`]: UDP relays, and for RFC
//! 6062 TCP allocations a listening socket per allocation and the data connections to peers.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

use super::RELAY_TOKEN;
use crate::io::relay::{self, Reservations, Slots};
use crate::turn::{RelayIo, Reserved};

/// Connections waiting in a TCP relay's accept queue.
const RELAY_BACKLOG: i32 = 64;

/// A socket of the relay index space.
pub(super) enum RelaySock {
    Udp(mio::net::UdpSocket),
    /// The relayed address of a TCP allocation.
    Listen(TcpListener),
    /// A TCP connection to a peer (RFC 6062 data connection).
    Data(Box<DataSock>),
}

pub(super) struct DataSock {
    pub(super) stream: TcpStream,
    /// An outgoing connection (Connect) whose handshake has not ended yet.
    pub(super) connecting: bool,
    /// The client connection (slot) it is piped to, once bound.
    pub(super) client: Option<usize>,
    /// Bytes from the client for the peer, at most `turn.tcp_output_buffer`.
    pub(super) out: Vec<u8>,
    /// Not read because the client's output was full; read again when it drains.
    pub(super) paused: bool,
    pub(super) interest: Interest,
}

/// The relay sockets of the TCP thread, registered in its poll.
pub(super) struct StreamRelays<'r> {
    pub(super) slots: Slots<RelaySock>,
    pub(super) reservations: &'r Reservations,
    pub(super) registry: &'r Registry,
    /// Relay sockets cut off by the read budget, to read again without waiting.
    pub(super) pending: Vec<usize>,
    /// Client connections whose piped data connection the core closed (`(slot, peer
    /// socket)`): the driver closes them after the call.
    pub(super) orphans: Vec<(usize, usize)>,
    /// UDP relay sockets closed this turn, kept open until the turn's queued sends (which
    /// name their descriptors) are submitted ([`super::sends`]).
    pub(super) closing: Vec<mio::net::UdpSocket>,
}

impl StreamRelays<'_> {
    fn start(&mut self, socket: UdpSocket, dont_fragment: bool) -> io::Result<usize> {
        relay::prepare(&socket, dont_fragment)?;
        let mut s = mio::net::UdpSocket::from_std(socket);
        let index = self.slots.next_index();
        self.registry
            .register(&mut s, Token(RELAY_TOKEN | index), Interest::READABLE)?;
        self.slots.insert(RelaySock::Udp(s));
        // Data may already be queued (a reservation redeemed late): look once.
        self.pending.push(index);
        Ok(index)
    }

    /// Stores a data connection (accepted from a peer, or connecting to one).
    pub(super) fn insert_data(
        &mut self,
        mut stream: TcpStream,
        connecting: bool,
    ) -> io::Result<usize> {
        let index = self.slots.next_index();
        // Writable tells an outgoing connection's handshake ended; an accepted one is not
        // read before it is bound (edge-triggered: the driver reads it once then).
        let interest = if connecting {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        self.registry
            .register(&mut stream, Token(RELAY_TOKEN | index), interest)?;
        let _ = stream.set_nodelay(true);
        self.slots.insert(RelaySock::Data(Box::new(DataSock {
            stream,
            connecting,
            client: None,
            out: Vec::new(),
            paused: false,
            interest,
        })));
        Ok(index)
    }

    pub(super) fn data_mut(&mut self, index: usize) -> Option<&mut DataSock> {
        match self.slots.get_mut(index) {
            Some(RelaySock::Data(d)) => Some(d),
            _ => None,
        }
    }
}

impl RelayIo for StreamRelays<'_> {
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
        if let Some((s, _)) = self.slots.remove(index) {
            match s {
                RelaySock::Udp(mut s) => {
                    let _ = self.registry.deregister(&mut s);
                    self.closing.push(s);
                }
                RelaySock::Listen(mut l) => {
                    let _ = self.registry.deregister(&mut l);
                }
                RelaySock::Data(mut d) => {
                    let _ = self.registry.deregister(&mut d.stream);
                    if let Some(c) = d.client {
                        self.orphans.push((c, index));
                    }
                }
            }
        }
        self.pending.retain(|p| *p != index);
    }

    fn listen_tcp(&mut self, addr: SocketAddr) -> io::Result<usize> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        // Not SO_REUSEPORT: a port another listener holds fails, and the core tries another.
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(RELAY_BACKLOG)?;
        let mut l = TcpListener::from_std(s.into());
        let index = self.slots.next_index();
        self.registry
            .register(&mut l, Token(RELAY_TOKEN | index), Interest::READABLE)?;
        self.slots.insert(RelaySock::Listen(l));
        Ok(index)
    }

    fn connect_tcp(&mut self, relay: usize, peer: SocketAddr) -> io::Result<usize> {
        let local = match self.slots.get(relay) {
            Some(RelaySock::Listen(l)) => l.local_addr()?,
            _ => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        // From the relayed IP address. Its port is held by the listener, which a second
        // socket can share only with SO_REUSEPORT, and that would let another allocation's
        // listener take the same port: the connection leaves from a port of the kernel's
        // choice (permissions are per IP address, so peers do not tell the difference).
        let s = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))?;
        if peer.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(local.ip(), 0).into())?;
        match s.connect(&peer.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let stream = TcpStream::from_std(s.into());
        self.insert_data(stream, true)
    }
}
