//! RFC 6062 TCP relays, the core's part: which data connections exist, to which peer, in
//! which state, and what the driver must do about them.
//!
//! A TCP allocation's relay is a listening TCP socket (opened through
//! [`RelayIo::listen_tcp`]). A data connection is a TCP connection between the relayed
//! address and a peer, named by the driver's socket index and to the client by a random
//! CONNECTION-ID. It is made by a Connect request ([`RelayIo::connect_tcp`], then the
//! driver's [`Turn::tcp_connected`]) or by a permitted peer connecting to the relayed
//! address ([`Turn::tcp_accepted`], answered with a ConnectionAttempt indication), and is
//! bound to a new client connection by ConnectionBind; from then on the driver pipes bytes
//! between the two and the core only remembers the pair so it ends with the allocation.
//! Whatever the core wants sent outside the reply to the current message (a Connect answer
//! that waited for the TCP handshake, a ConnectionAttempt indication) or wants the driver to
//! do (pipe a connection) is queued as a [`TcpEvent`] the driver drains after each call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;

use super::allocation::Allocation;
use super::auth::Integrity;
use super::{policy, Ctx, Turn};
use crate::stun::{attr, method, Class, MessageWriter};

/// How long a data connection may wait for its ConnectionBind, and a Connect for the peer's
/// TCP handshake (RFC 6062 §5.2, §5.3: 30 seconds).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the driver does besides sending the reply of the current call.
#[derive(Debug, PartialEq, Eq)]
pub enum TcpEvent {
    /// A STUN message for the client on connection `conn` (the control connection of an
    /// allocation): a deferred Connect answer or a ConnectionAttempt indication.
    Message {
        conn: usize,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Client connection `conn` (which just got its ConnectionBind answer) now carries the
    /// bytes of the peer connection `peer`, both ways, and nothing else.
    Pipe { conn: usize, peer: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Connect sent the TCP SYN; the answer waits for the handshake.
    Connecting { tid: [u8; 12] },
    /// Established, waiting for ConnectionBind.
    Waiting,
    /// Piped to a client data connection.
    Bound,
}

#[derive(Clone, Copy, Debug)]
struct DataConn {
    /// The allocation's table slot and id (the id tells a reused slot apart).
    slot: usize,
    alloc: u64,
    peer: SocketAddr,
    socket: usize,
    state: State,
    deadline: Instant,
}

/// The data connections of one worker, by CONNECTION-ID and by the driver's socket index.
#[derive(Default)]
pub struct TcpRelays {
    by_id: HashMap<u32, DataConn>,
    by_socket: HashMap<usize, u32>,
    pub(crate) events: Vec<TcpEvent>,
}

impl TcpRelays {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn remove(&mut self, id: u32) -> Option<DataConn> {
        let c = self.by_id.remove(&id)?;
        self.by_socket.remove(&c.socket);
        Some(c)
    }

    fn count_for(&self, slot: usize, alloc: u64) -> usize {
        self.by_id
            .values()
            .filter(|c| c.slot == slot && c.alloc == alloc)
            .count()
    }
}

/// Why a Connect or ConnectionBind was refused, for the request handler's error answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    BadRequest,
    Forbidden,
    Exists,
    Failure,
    Capacity,
    WrongCredentials,
}

impl Turn {
    fn new_connection_id(&mut self) -> u32 {
        loop {
            let id = self.random.next_u32();
            if id != 0 && !self.tcp.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2) on the control connection of allocation `slot`, to `peer`
    /// (already checked against family and policy). Starts the TCP connection; the answer
    /// follows as a [`TcpEvent::Message`] once the handshake ends or fails.
    pub(crate) fn tcp_connect(
        &mut self,
        cx: &mut Ctx<'_>,
        slot: usize,
        peer: SocketAddr,
        tid: [u8; 12],
    ) -> Result<(), Refusal> {
        let now = cx.now.mono;
        let a = self.table.get(slot).ok_or(Refusal::BadRequest)?;
        if !a.tcp {
            return Err(Refusal::BadRequest);
        }
        if !a.has_permission(peer.ip(), now) {
            cx.stats.incr(Counter::DropNoPermission);
            return Err(Refusal::Forbidden);
        }
        let alloc = a.id;
        if self
            .tcp
            .by_id
            .values()
            .any(|c| c.slot == slot && c.alloc == alloc && c.peer == peer)
        {
            return Err(Refusal::Exists);
        }
        if self.tcp.count_for(slot, alloc) >= cx.settings.stream.relay_connections {
            cx.stats.incr(Counter::TurnQuotaRejected);
            return Err(Refusal::Capacity);
        }
        let relay = a.relay.socket;
        let socket = match cx.io.connect_tcp(relay, peer) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "TCP relay connect failed at once: {e}");
                cx.stats.incr(Counter::TcpRelayConnectFailed);
                return Err(Refusal::Failure);
            }
        };
        let id = self.new_connection_id();
        self.tcp.by_socket.insert(socket, id);
        self.tcp.by_id.insert(
            id,
            DataConn {
                slot,
                alloc,
                peer,
                socket,
                state: State::Connecting { tid },
                deadline: now + CONNECTION_TIMEOUT,
            },
        );
        Ok(())
    }

    /// The driver's outgoing connection `socket` finished its handshake (`ok`) or failed:
    /// the Connect is answered (success with CONNECTION-ID, or 447).
    pub fn tcp_connected(&mut self, cx: &mut Ctx<'_>, socket: usize, ok: bool) {
        let Some(&id) = self.tcp.by_socket.get(&socket) else {
            return;
        };
        let Some(c) = self.tcp.by_id.get_mut(&id) else {
            return;
        };
        let State::Connecting { tid } = c.state else {
            return;
        };
        let (slot, alloc) = (c.slot, c.alloc);
        if ok {
            c.state = State::Waiting;
            c.deadline = cx.now.mono + CONNECTION_TIMEOUT;
            cx.stats.incr(Counter::TcpRelayConnected);
            cx.stats.incr(Counter::TurnRequestsOk);
        } else {
            self.tcp.remove(id);
            cx.io.close(socket);
            cx.stats.incr(Counter::TcpRelayConnectFailed);
            cx.stats.incr(Counter::TurnRequestsError);
        }
        self.answer_connect(cx, slot, alloc, tid, ok.then_some(id));
    }

    fn answer_connect(
        &mut self,
        cx: &mut Ctx<'_>,
        slot: usize,
        alloc: u64,
        tid: [u8; 12],
        id: Option<u32>,
    ) {
        let Some(a) = self.table.get(slot).filter(|a| a.id == alloc) else {
            return;
        };
        let class = if id.is_some() {
            Class::SuccessResponse
        } else {
            Class::ErrorResponse
        };
        let bytes = message(
            a,
            cx.software,
            class,
            method::CONNECT,
            &tid,
            true,
            |w| match id {
                Some(id) => w.add_u32(attr::CONNECTION_ID, id).ok(),
                None => w.add_error_code(447, "Connection Timeout or Failure").ok(),
            },
        );
        if let Some(bytes) = bytes {
            self.tcp.events.push(TcpEvent::Message {
                conn: a.listen_socket,
                to: a.client,
                bytes,
            });
        }
    }

    /// A peer connected to the relayed address on listener `listener`; the driver accepted
    /// it as `socket`. True: the client is told (ConnectionAttempt) and the connection waits
    /// for ConnectionBind; false: the driver closes it (no permission for the peer, or the
    /// allocation has its fill of data connections).
    pub fn tcp_accepted(
        &mut self,
        cx: &mut Ctx<'_>,
        listener: usize,
        peer: SocketAddr,
        socket: usize,
    ) -> bool {
        let now = cx.now.mono;
        let peer = SocketAddr::new(policy::canonical(peer.ip()), peer.port());
        let Some(slot) = self.table.by_relay(listener) else {
            cx.stats.incr(Counter::TcpRelayRefused);
            return false;
        };
        let Some(a) = self.table.get(slot).filter(|a| a.tcp) else {
            cx.stats.incr(Counter::TcpRelayRefused);
            return false;
        };
        let alloc = a.id;
        if !a.has_permission(peer.ip(), now)
            || self.tcp.count_for(slot, alloc) >= cx.settings.stream.relay_connections
        {
            tracing::debug!(%peer, relay = %a.relay.public, "TCP peer refused");
            cx.stats.incr(Counter::TcpRelayRefused);
            return false;
        }
        let id = self.new_connection_id();
        let mut tid = [0u8; 12];
        self.random.fill(&mut tid);
        let Some(a) = self.table.get(slot) else {
            return false;
        };
        let bytes = message(
            a,
            cx.software,
            Class::Indication,
            method::CONNECTION_ATTEMPT,
            &tid,
            false,
            |w| {
                w.add_xor_address(attr::XOR_PEER_ADDRESS, peer).ok()?;
                w.add_u32(attr::CONNECTION_ID, id).ok()
            },
        );
        let Some(bytes) = bytes else {
            cx.stats.incr(Counter::TcpRelayRefused);
            return false;
        };
        self.tcp.events.push(TcpEvent::Message {
            conn: a.listen_socket,
            to: a.client,
            bytes,
        });
        self.tcp.by_socket.insert(socket, id);
        self.tcp.by_id.insert(
            id,
            DataConn {
                slot,
                alloc,
                peer,
                socket,
                state: State::Waiting,
                deadline: now + CONNECTION_TIMEOUT,
            },
        );
        cx.stats.incr(Counter::TcpRelayAttempt);
        true
    }

    /// ConnectionBind (RFC 6062 §5.4) of `id` on client connection `conn` by `username`.
    /// On success the driver is told to pipe the two.
    pub(crate) fn tcp_bind(
        &mut self,
        cx: &mut Ctx<'_>,
        id: u32,
        conn: usize,
        username: &str,
    ) -> Result<(), Refusal> {
        let c = self.tcp.by_id.get(&id).ok_or(Refusal::BadRequest)?;
        if c.state != State::Waiting {
            return Err(Refusal::BadRequest);
        }
        let a = self
            .table
            .get(c.slot)
            .filter(|a| a.id == c.alloc)
            .ok_or(Refusal::BadRequest)?;
        if *a.username != *username {
            return Err(Refusal::WrongCredentials);
        }
        let peer = c.socket;
        if let Some(c) = self.tcp.by_id.get_mut(&id) {
            c.state = State::Bound;
        }
        self.tcp.events.push(TcpEvent::Pipe { conn, peer });
        cx.stats.incr(Counter::TcpRelayBound);
        Ok(())
    }

    /// The driver's data connection `socket` closed (either side ended it, or the driver
    /// closed it for idleness or an error): the core forgets it.
    pub fn tcp_closed(&mut self, cx: &mut Ctx<'_>, socket: usize) {
        if let Some(&id) = self.tcp.by_socket.get(&socket) {
            if let Some(c) = self.tcp.remove(id) {
                if let State::Connecting { tid } = c.state {
                    cx.stats.incr(Counter::TcpRelayConnectFailed);
                    cx.stats.incr(Counter::TurnRequestsError);
                    self.answer_connect(cx, c.slot, c.alloc, tid, None);
                }
            }
        }
    }

    /// Connections that waited too long for their handshake (447) or their ConnectionBind.
    pub(crate) fn tcp_sweep(&mut self, cx: &mut Ctx<'_>) {
        if self.tcp.by_id.is_empty() {
            return;
        }
        let now = cx.now.mono;
        let late: Vec<u32> = self
            .tcp
            .by_id
            .iter()
            .filter(|(_, c)| c.state != State::Bound && c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let Some(c) = self.tcp.remove(id) else {
                continue;
            };
            cx.io.close(c.socket);
            match c.state {
                State::Connecting { tid } => {
                    cx.stats.incr(Counter::TcpRelayConnectFailed);
                    cx.stats.incr(Counter::TurnRequestsError);
                    self.answer_connect(cx, c.slot, c.alloc, tid, None);
                }
                _ => cx.stats.incr(Counter::TcpRelayClosedUnbound),
            }
        }
    }

    /// The allocation in `slot` ends: so do its data connections.
    pub(crate) fn tcp_end(&mut self, cx: &mut Ctx<'_>, slot: usize, alloc: u64) {
        if self.tcp.by_id.is_empty() {
            return;
        }
        let gone: Vec<u32> = self
            .tcp
            .by_id
            .iter()
            .filter(|(_, c)| c.slot == slot && c.alloc == alloc)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(c) = self.tcp.remove(id) {
                cx.io.close(c.socket);
                cx.stats.incr(Counter::TcpRelayClosedAllocation);
            }
        }
    }

    /// Events for the driver since it last looked.
    pub fn take_tcp_events(&mut self, out: &mut Vec<TcpEvent>) {
        out.append(&mut self.tcp.events);
    }

    pub fn tcp_relays(&self) -> &TcpRelays {
        &self.tcp
    }
}

/// A message about allocation `a` for its client: `add` writes the attributes; responses
/// are signed with the allocation's key.
fn message(
    a: &Allocation,
    software: &str,
    class: Class,
    method: u16,
    tid: &[u8; 12],
    sign: bool,
    add: impl FnOnce(&mut MessageWriter<'_>) -> Option<()>,
) -> Option<Vec<u8>> {
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, class, method, tid).ok()?;
    add(&mut w)?;
    if !software.is_empty() && sign {
        w.add_attribute(attr::SOFTWARE, software.as_bytes()).ok()?;
    }
    if sign {
        match a.integrity {
            Integrity::Sha1 => w.add_message_integrity(a.key.bytes()).ok()?,
            Integrity::Sha256 => w.add_message_integrity_sha256(a.key.bytes()).ok()?,
        }
        w.add_fingerprint().ok()?;
    }
    let n = w.finish();
    Some(buf[..n].to_vec())
}
