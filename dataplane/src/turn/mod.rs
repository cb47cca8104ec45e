//! TURN over UDP (RFC 8656): allocations, permissions, channels, Send/Data indications and
//! ChannelData, as a sans-IO core.
//!
//! The core decides; the driver does the I/O. Relay sockets are opened and closed through
//! [`RelayIo`], implemented by each driver (and by a fake in the tests), and named by handles:
//! the core never holds a socket. The control plane is reached through three roles,
//! [`AllocationTable`], [`Blacklist`] and [`Events`]. Time, randomness (a seed) and counters
//! ([`Stats`]) come from the driver too, so the core runs anywhere, tests and fuzzers
//! included, without sockets or shared memory. Relayed data never moves: a ChannelData or
//! Send payload is sent from where it lies in the receive buffer, and data from a peer gets
//! its ChannelData or Data-indication header written into the headroom in front of it.

pub mod allocation;
pub mod auth;
pub mod policy;
pub mod random;
pub mod ratelimit;
mod requests;
pub mod settings;
pub mod tcp_relay;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use portico_shared::counters::Counter;
use portico_shared::shm::EventKind;

use crate::server::{Action, Now, Stats};
use crate::stun::{self, attr};
use allocation::{Allocation, Table};
use random::Random;
pub use settings::{DefaultRoutes, StreamLimits, TurnSettings};
pub use tcp_relay::{TcpEvent, TcpRelays};

/// Channel numbers accepted in ChannelBind and in ChannelData. RFC 8656 allows
/// 0x4000-0x4FFF; RFC 5766 (§11) allowed the whole 0x4000-0x7FFF, and clients of that era
/// (coturn's `turnutils_uclient` among them, which picks numbers at random) still use numbers
/// above 0x4FFF. Both ranges demultiplex the same way (first two bits 01), so the wider one
/// costs nothing and keeps those clients working.
pub const CHANNEL_NUMBERS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

/// A relay port held for a later Allocate (EVEN-PORT with the R bit), possibly redeemed on
/// another worker. The driver keeps the bound socket; the core only ever sees this name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reserved(pub u64);

/// Socket operations the core asks of its driver. Relay sockets are named by socket index,
/// reservations by [`Reserved`]; the driver keeps the sockets behind both.
pub trait RelayIo {
    /// Binds a relay socket to `addr` and starts receiving on it; returns its socket index.
    fn open(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<usize>;
    /// Binds a socket without receiving on it: an EVEN-PORT reservation held for a later
    /// Allocate, possibly on another worker.
    fn reserve(&mut self, addr: SocketAddr) -> io::Result<Reserved>;
    /// Starts receiving on a reserved socket; returns its socket index.
    fn adopt(&mut self, reserved: Reserved, dont_fragment: bool) -> io::Result<usize>;
    /// Closes a reserved socket nobody redeemed.
    fn release(&mut self, reserved: Reserved);
    /// Stops receiving on a relay socket and closes it (also a TCP relay's listener or
    /// data connection; closing a bound data connection closes its client side too).
    fn close(&mut self, socket: usize);
    /// The local address a relay socket is bound to (a wildcard socket's port), where the
    /// driver can say.
    fn local_addr(&self, socket: usize) -> Option<SocketAddr> {
        let _ = socket;
        None
    }
    /// RFC 6062: binds a listening TCP socket to `addr` for a TCP allocation; returns its
    /// socket index. Drivers without TCP relays refuse.
    fn listen_tcp(&mut self, addr: SocketAddr) -> io::Result<usize> {
        let _ = addr;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// RFC 6062: starts a TCP connection to `peer` from the address of TCP relay `relay`;
    /// returns the data connection's socket index. The driver reports the outcome with
    /// [`Turn::tcp_connected`].
    fn connect_tcp(&mut self, relay: usize, peer: SocketAddr) -> io::Result<usize> {
        let _ = (relay, peer);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Where the core lists its allocations so the control plane can show them, and where it
/// learns which ones the control plane wants deleted.
pub trait AllocationTable {
    fn publish(&mut self, a: &Allocation, now: Now);
    fn remove(&mut self, id: u64);
    /// Appends the ids the control plane asked to delete (they may belong to other workers).
    fn deletes(&mut self, out: &mut Vec<u64>);
    /// Acknowledges a delete request this worker carried out.
    fn deleted(&mut self, id: u64);
}

/// The control plane's list of blocked sources.
pub trait Blacklist {
    fn blocked(&self, ip: IpAddr, unix: u64) -> bool;
    /// Changes whenever the list changes.
    fn generation(&self) -> u64;
}

/// Where the core reports suspicious events, for the control plane's fraud engine.
pub trait Events {
    fn report(&mut self, kind: EventKind, ip: IpAddr, unix: u64);
}

/// The core's links to the control plane, one per role.
pub struct ControlPlane {
    pub allocations: Box<dyn AllocationTable>,
    pub blacklist: Box<dyn Blacklist>,
    pub events: Box<dyn Events>,
}

impl ControlPlane {
    /// No control plane (tests, tools): allocations are not listed, nobody is blocked,
    /// events go nowhere.
    pub fn detached() -> ControlPlane {
        ControlPlane {
            allocations: Box::new(Detached),
            blacklist: Box::new(Detached),
            events: Box::new(Detached),
        }
    }
}

/// Each role, doing nothing.
pub struct Detached;

impl AllocationTable for Detached {
    fn publish(&mut self, _: &Allocation, _: Now) {}
    fn remove(&mut self, _: u64) {}
    fn deletes(&mut self, _: &mut Vec<u64>) {}
    fn deleted(&mut self, _: u64) {}
}

impl Blacklist for Detached {
    fn blocked(&self, _: IpAddr, _: u64) -> bool {
        false
    }
    fn generation(&self) -> u64 {
        0
    }
}

impl Events for Detached {
    fn report(&mut self, _: EventKind, _: IpAddr, _: u64) {}
}

/// A driver without relay sockets (tests, tools): every open fails, so Allocate answers
/// 508.
pub struct NoRelay;

impl RelayIo for NoRelay {
    fn open(&mut self, _: SocketAddr, _: bool) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn reserve(&mut self, _: SocketAddr) -> io::Result<Reserved> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn adopt(&mut self, _: Reserved, _: bool) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn release(&mut self, _: Reserved) {}
    fn close(&mut self, _: usize) {}
}

/// A reserved relay port (EVEN-PORT with R bit), redeemable once by RESERVATION-TOKEN.
pub struct Reservation {
    pub reserved: Reserved,
    pub addr: SocketAddr,
    pub expires: Instant,
}

/// State shared by all workers of the process (not by configuration generations): quotas,
/// reservations, the request-rate meter and which addresses hold allocations. Touched by
/// requests, Allocate and expiry, never per relayed packet. Ordered maps: no hash key to
/// draw, and their sizes are bounded by the allocation quota.
pub struct TurnShared {
    pub allocations: AtomicUsize,
    pub per_user: Mutex<BTreeMap<Box<str>, usize>>,
    pub reservations: Mutex<BTreeMap<[u8; 8], Reservation>>,
    pub next_id: AtomicU64,
    /// Requests per source per second, over all workers: one source's ports are spread
    /// over the workers by `SO_REUSEPORT`, so a per-worker count would divide its rate.
    pub rates: ratelimit::SharedMeter,
    /// Allocations per client address: a source holding one has proved it receives our
    /// answers. Consulted only when a source goes over the rate, so a lock is fine.
    pub holders: Mutex<BTreeMap<IpAddr, u32>>,
}

impl TurnShared {
    /// `seed` keys the rate meter's hash; the driver draws it.
    pub fn new(seed: u64) -> TurnShared {
        TurnShared {
            allocations: AtomicUsize::new(0),
            per_user: Mutex::default(),
            reservations: Mutex::default(),
            next_id: AtomicU64::new(0),
            rates: ratelimit::SharedMeter::new(seed),
            holders: Mutex::default(),
        }
    }

    /// Whether some worker holds an allocation for a client at `ip`.
    pub fn serves(&self, ip: IpAddr) -> bool {
        self.holders
            .lock()
            .map(|m| m.contains_key(&ip))
            .unwrap_or(false)
    }

    fn hold(&self, ip: IpAddr, delta: i32) {
        if let Ok(mut m) = self.holders.lock() {
            let n = m.entry(ip).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    fn release_user(&self, user: &str) {
        if let Ok(mut m) = self.per_user.lock() {
            if let Some(n) = m.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(user);
                }
            }
        }
    }
}

/// What one call into the core works with besides the core's own state: the configuration
/// in force, the time, the driver's relay sockets and the worker's counters. Built by
/// [`crate::server::Server`] per call (a few pointers, no allocation).
pub struct Ctx<'a> {
    pub settings: &'a TurnSettings,
    /// SOFTWARE attribute value; empty hides it.
    pub software: &'a str,
    pub now: Now,
    pub io: &'a mut dyn RelayIo,
    pub stats: &'a mut Stats,
}

/// Where the payload of an incoming datagram sits in its buffer; the bytes before `start`
/// are free headroom for headers.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    pub socket: usize,
    /// Came over a stream connection (TCP or TLS), where `socket` names the connection.
    pub stream: bool,
    pub from: SocketAddr,
    pub start: usize,
    pub len: usize,
}

/// Most keys remembered as changed between two drains; past it the driver is told to look
/// at all of them.
const CHANGES_MAX: usize = 4096;

/// What may have changed for a kernel fast path ([`crate::fastpath`]), which the driver
/// drains to keep the kernel's entries to what the core allows. Recorded only once a driver
/// enabled it. Here the keys are allocations' client 5-tuples (client address, listen
/// socket) whose relayed channels may have changed (channel bound, permission created,
/// either expired or removed, allocation ended, blacklist or settings changed); the media
/// core keeps one of sessions and NAT bindings ([`crate::media::offload::Offload`]).
pub struct Changes<K = (SocketAddr, usize)> {
    enabled: bool,
    all: bool,
    list: Vec<K>,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Changes {
            enabled: false,
            all: false,
            list: Vec::new(),
        }
    }
}

impl<K> Changes<K> {
    pub(crate) fn mark(&mut self, key: K) {
        if !self.enabled || self.all {
            return;
        }
        if self.list.len() >= CHANGES_MAX {
            self.all = true;
            self.list.clear();
        } else {
            self.list.push(key);
        }
    }

    pub(crate) fn mark_all(&mut self) {
        if self.enabled {
            self.all = true;
            self.list.clear();
        }
    }

    /// Starts recording.
    pub fn enable(&mut self) {
        self.enabled = true;
        self.all = true;
    }

    /// Moves the changed keys to `out`; true when all of them must be looked at.
    pub fn drain(&mut self, out: &mut Vec<K>) -> bool {
        out.append(&mut self.list);
        std::mem::take(&mut self.all)
    }
}

/// Per-worker TURN state.
pub struct Turn {
    shared: Arc<TurnShared>,
    table: Table,
    limiter: ratelimit::ErrorLimiter,
    /// Relay ports and reservation tokens.
    random: Random,
    /// Cheap generator for Data-indication transaction ids, which need not be secret.
    tid_state: u64,
    last_sweep: Option<Instant>,
    /// Relay socket indices start here; lower indices are listen sockets.
    pub first_relay_socket: usize,
    pub(crate) control: ControlPlane,
    kills: Vec<u64>,
    /// Scratch list of slots (timers due, traffic touched), kept to reuse its memory.
    due: Vec<usize>,
    last_control: Option<Instant>,
    blacklist_seen: u64,
    /// Set when the configuration changed: permissions and channels are checked against the
    /// (possibly narrower) peer policy at the next sweep.
    pub recheck_peers: bool,
    /// RFC 6062 data connections.
    tcp: TcpRelays,
    /// Changes a kernel fast path must follow.
    pub changes: Changes,
}

impl Turn {
    /// `seed` is drawn by the driver, per worker: every random choice of the core comes
    /// from it.
    pub fn new(
        shared: Arc<TurnShared>,
        first_relay_socket: usize,
        seed: &[u8; 32],
        control: ControlPlane,
    ) -> Turn {
        let mut random = Random::new(seed);
        Turn {
            shared,
            table: Table::new(random.next_u64()),
            limiter: ratelimit::ErrorLimiter::new(random.next_u64()),
            tid_state: random.next_u64() | 1,
            random,
            last_sweep: None,
            first_relay_socket,
            control,
            kills: Vec::new(),
            due: Vec::new(),
            last_control: None,
            blacklist_seen: 0,
            recheck_peers: false,
            tcp: TcpRelays::default(),
            changes: Changes::default(),
        }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    /// For the driver: traffic a kernel fast path relayed is credited to its allocation.
    pub fn table_mut(&mut self) -> &mut Table {
        &mut self.table
    }

    /// Whether `ip` is on the control plane's blacklist.
    pub fn blocked(&self, ip: IpAddr, unix: u64) -> bool {
        self.control.blacklist.blocked(ip, unix)
    }

    /// Whether any worker holds an allocation for a client at `ip`.
    pub fn serves(&self, ip: IpAddr) -> bool {
        self.shared.serves(ip)
    }

    /// Counts a request from `ip`; true once per second in which the source, over all
    /// workers, goes above `rate`.
    pub fn rate_over(&self, ip: IpAddr, unix: u64, rate: u32) -> bool {
        self.shared.rates.over(ip, unix, rate)
    }

    pub fn is_relay_socket(&self, socket: usize) -> bool {
        socket >= self.first_relay_socket
    }

    /// ChannelData from a client (RFC 8656 §12.4): forward the payload from where it lies.
    pub fn on_channel_data(&mut self, cx: &mut Ctx<'_>, d: Datagram, buf: &[u8]) -> Action {
        let Some(h) = buf.get(d.start..d.start + 4) else {
            cx.stats.incr(Counter::DropBadChannelData);
            return Action::Drop;
        };
        let number = u16::from_be_bytes([h[0], h[1]]);
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        // Over UDP the datagram may carry up to 3 bytes of padding after the data.
        if !CHANNEL_NUMBERS.contains(&number) || len + 4 > d.len || d.len > len + 4 + 3 {
            cx.stats.incr(Counter::DropBadChannelData);
            return Action::Drop;
        }
        let Some(slot) = self.table.by_client(d.from, d.socket) else {
            cx.stats.incr(Counter::DropNoAllocation);
            return Action::Drop;
        };
        let Some(a) = self.table.get_mut(slot) else {
            return Action::Drop;
        };
        let Some(peer) = a.channel_by_number(number, cx.now.mono).map(|c| c.peer) else {
            cx.stats.incr(Counter::DropNoChannel);
            return Action::Drop;
        };
        // A channel is only bound to a peer of a family the allocation relays.
        let Some(socket) = a.relay_for(peer.is_ipv4()).map(|r| r.socket) else {
            cx.stats.incr(Counter::DropNoChannel);
            return Action::Drop;
        };
        let action = to_peer(a, cx, d.start + 4, len, peer, socket);
        self.table.touch(slot);
        action
    }

    /// A Send indication (RFC 8656 §11.2): DATA goes to XOR-PEER-ADDRESS if permitted.
    pub fn on_send_indication(
        &mut self,
        cx: &mut Ctx<'_>,
        d: Datagram,
        msg: &stun::Message<'_>,
    ) -> Action {
        let Some(slot) = self.table.by_client(d.from, d.socket) else {
            cx.stats.incr(Counter::DropNoAllocation);
            return Action::Drop;
        };
        let tid = msg.transaction_id();
        let mut peer = None;
        let mut data = None;
        for a in msg.attributes() {
            match a.typ {
                attr::XOR_PEER_ADDRESS if peer.is_none() => {
                    peer = attr::decode_xor_address(a.value, &tid).ok();
                }
                attr::DATA if data.is_none() => {
                    // Offset of the value inside the datagram.
                    data = Some((a.offset + 4, a.value.len()));
                }
                _ => {}
            }
        }
        let (Some(peer), Some((off, len))) = (peer, data) else {
            cx.stats.incr(Counter::DropBadAttribute);
            return Action::Drop;
        };
        let Some(a) = self.table.get_mut(slot) else {
            return Action::Drop;
        };
        let peer = SocketAddr::new(policy::canonical(peer.ip()), peer.port());
        // Permissions are per IP address, but the exception for the server's own relays is
        // per port range: check the policy again so a permission for this box's address
        // cannot reach its other services.
        let socket = a.relay_for(peer.is_ipv4()).map(|r| r.socket);
        let Some(socket) = socket.filter(|_| {
            a.has_permission(peer.ip(), cx.now.mono)
                && cx.settings.policy.check(peer.ip(), peer.port()).is_ok()
        }) else {
            cx.stats.incr(Counter::DropNoPermission);
            return Action::Drop;
        };
        let action = to_peer(a, cx, d.start + off, len, peer, socket);
        self.table.touch(slot);
        action
    }

    /// A datagram from a peer on a relay socket: to the client as ChannelData when a
    /// channel is bound, else as a Data indication, the header written in front of the data.
    pub fn on_peer_data(&mut self, cx: &mut Ctx<'_>, d: Datagram, buf: &mut [u8]) -> Action {
        let (now, stats) = (cx.now, &mut *cx.stats);
        let Some(slot) = self.table.by_relay(d.socket) else {
            stats.incr(Counter::DropNoAllocation);
            return Action::Drop;
        };
        let Some(a) = self.table.get_mut(slot) else {
            return Action::Drop;
        };
        let from = SocketAddr::new(policy::canonical(d.from.ip()), d.from.port());
        if !a.has_permission(from.ip(), now.mono) {
            stats.incr(Counter::DropNoPermission);
            return Action::Drop;
        }
        if d.len > usize::from(u16::MAX) || !a.down.take(now.mono, cx.settings.max_bandwidth, d.len)
        {
            stats.incr(Counter::DropBandwidth);
            return Action::Drop;
        }
        let (offset, total) = match a.channel_by_peer(from, now.mono) {
            Some(ch) if d.start >= 4 => {
                let o = d.start - 4;
                buf[o..o + 2].copy_from_slice(&ch.number.to_be_bytes());
                buf[o + 2..o + 4].copy_from_slice(&(d.len as u16).to_be_bytes());
                (o, d.len + 4)
            }
            _ => match data_indication(buf, d, from, &next_tid(&mut self.tid_state)) {
                Some(x) => x,
                None => {
                    stats.incr(Counter::DropTruncated);
                    return Action::Drop;
                }
            },
        };
        a.traffic.packets_to_client += 1;
        a.traffic.bytes_to_client += d.len as u64;
        let (socket, to) = (a.listen_socket, a.client);
        self.table.touch(slot);
        stats.incr(Counter::RelayPeerToClientPackets);
        stats.add(Counter::RelayPeerToClientBytes, d.len as u64);
        Action::Send {
            offset,
            len: total,
            socket,
            to,
        }
    }

    /// Ends the allocation of a client 5-tuple, if there is one: a stream connection closed.
    pub fn end_client(&mut self, cx: &mut Ctx<'_>, client: SocketAddr, socket: usize) {
        if let Some(slot) = self.table.by_client(client, socket) {
            self.end(cx, slot, Counter::TurnAllocationsDeleted);
        }
    }

    /// Ends an allocation: closes its relay socket and gives back its quota.
    fn end(&mut self, cx: &mut Ctx<'_>, slot: usize, reason: Counter) -> Option<Allocation> {
        let a = self.table.get(slot).map(|a| a.id)?;
        self.tcp_end(cx, slot, a);
        let a = self.table.remove(slot)?;
        self.changes.mark((a.client, a.listen_socket));
        for r in a.relays() {
            cx.io.close(r.socket);
        }
        self.control.allocations.remove(a.id);
        self.shared.allocations.fetch_sub(1, Ordering::Relaxed);
        self.shared.release_user(&a.username);
        self.shared.hold(a.client.ip(), -1);
        let stats = &mut *cx.stats;
        stats.sub(Counter::TurnAllocationsActive, 1);
        stats.sub(Counter::TurnPermissionsActive, a.permissions.len() as u64);
        stats.sub(Counter::TurnChannelsActive, a.channels.len() as u64);
        stats.incr(reason);
        tracing::info!(
            id = a.id,
            client = %a.client,
            relay = %a.relay.public,
            user = %a.username,
            reason = if reason == Counter::TurnAllocationsExpired { "expired" } else { "deleted" },
            "allocation ended"
        );
        Some(a)
    }

    /// Carries out the control plane's delete requests (every call), then expires
    /// allocations, permissions, channels and reservations and republishes traffic figures
    /// (at most once per second of `now`).
    pub fn sweep(&mut self, cx: &mut Ctx<'_>) {
        let now = cx.now;
        if self.recheck_peers {
            self.recheck_peers = false;
            self.changes.mark_all();
            self.drop_refused_peers(cx);
        }
        self.tcp_sweep(cx);
        // Control-plane requests are looked at every 50 ms, not every loop turn: under load a
        // turn is one datagram, and scanning the request slots each time cost more than the
        // packet itself.
        if self
            .last_control
            .is_some_and(|t| now.mono.saturating_duration_since(t).as_millis() < 50)
        {
            return;
        }
        self.last_control = Some(now.mono);
        self.kills.clear();
        self.control.allocations.deletes(&mut self.kills);
        for i in 0..self.kills.len() {
            let id = self.kills[i];
            if let Some(slot) = self.table.by_id(id) {
                self.end(cx, slot, Counter::TurnAllocationsDeleted);
                self.control.allocations.deleted(id);
            }
        }
        // A source just blacklisted loses its allocations (RFC-wise a server may end an
        // allocation at any time; the client sees its refreshes fail).
        let g = self.control.blacklist.generation();
        if g != self.blacklist_seen {
            self.blacklist_seen = g;
            // A blocked peer must leave the kernel's entries too.
            self.changes.mark_all();
            let blacklist = &self.control.blacklist;
            let blocked: Vec<usize> = self
                .table
                .slots()
                .filter(|(_, a)| blacklist.blocked(a.client.ip(), now.unix))
                .map(|(i, _)| i)
                .collect();
            for slot in blocked {
                self.end(cx, slot, Counter::TurnAllocationsDeleted);
            }
        }
        if self
            .last_sweep
            .is_some_and(|t| now.mono.saturating_duration_since(t).as_millis() < 1000)
        {
            return;
        }
        self.last_sweep = Some(now.mono);
        // Only the allocations whose next deadline passed (the timer wheel): expiry costs
        // per expiring allocation, permission or channel, never a walk of the table.
        self.due.clear();
        self.table.due(now.mono, &mut self.due);
        for i in 0..self.due.len() {
            let slot = self.due[i];
            let Some(a) = self.table.get_mut(slot) else {
                continue;
            };
            if a.expires <= now.mono {
                self.end(cx, slot, Counter::TurnAllocationsExpired);
                continue;
            }
            let (p, c) = (a.permissions.len(), a.channels.len());
            a.permissions.retain(|p| p.expires > now.mono);
            a.channels.retain(|c| c.expires > now.mono);
            let (gone_p, gone_c) = (p - a.permissions.len(), c - a.channels.len());
            cx.stats.sub(Counter::TurnPermissionsActive, gone_p as u64);
            cx.stats.sub(Counter::TurnChannelsActive, gone_c as u64);
            if gone_p + gone_c > 0 {
                // A kernel fast path entry may rest on what expired.
                self.changes.mark((a.client, a.listen_socket));
                self.table.touch(slot);
            }
            self.table.reschedule(slot);
        }
        // Traffic figures and counts for the API, once a second, of the allocations whose
        // figures moved.
        self.due.clear();
        self.table.take_touched(&mut self.due);
        for &slot in &self.due {
            if let Some(a) = self.table.get(slot) {
                self.control.allocations.publish(a, now);
            }
        }
        if let Ok(mut r) = self.shared.reservations.try_lock() {
            let io = &mut *cx.io;
            r.retain(|_, v| {
                let keep = v.expires > now.mono;
                if !keep {
                    io.release(v.reserved);
                }
                keep
            });
        }
    }

    /// Removes permissions and channels the peer policy no longer allows, so a `deny_peers`
    /// added at run time takes effect on existing allocations too.
    fn drop_refused_peers(&mut self, cx: &mut Ctx<'_>) {
        let policy = &cx.settings.policy;
        // A permission is per IP; the server's own addresses pass only for relay ports.
        let relay_port = cx.settings.ports.low();
        for slot in 0..self.table.slot_count() {
            let Some(a) = self.table.get_mut(slot) else {
                continue;
            };
            let (p, c) = (a.permissions.len(), a.channels.len());
            a.permissions
                .retain(|p| policy.check(p.ip, relay_port).is_ok());
            a.channels
                .retain(|c| policy.check(c.peer.ip(), c.peer.port()).is_ok());
            let (gone_p, gone_c) = (p - a.permissions.len(), c - a.channels.len());
            if gone_p + gone_c > 0 {
                self.changes.mark((a.client, a.listen_socket));
                cx.stats.sub(Counter::TurnPermissionsActive, gone_p as u64);
                cx.stats.sub(Counter::TurnChannelsActive, gone_c as u64);
                tracing::info!(
                    id = a.id,
                    permissions = gone_p,
                    channels = gone_c,
                    "peers refused by the new policy removed"
                );
                if let Some(a) = self.table.get(slot) {
                    self.control.allocations.publish(a, cx.now);
                }
            }
        }
    }

    /// Deletes every allocation (dataplane shutdown), so quotas and gauges stay right.
    pub fn clear(&mut self, cx: &mut Ctx<'_>) {
        let all: Vec<usize> = self.table.slots().map(|(i, _)| i).collect();
        for slot in all {
            self.end(cx, slot, Counter::TurnAllocationsDeleted);
        }
    }
}

/// A Data-indication transaction id: unpredictability is not needed, only variety.
fn next_tid(state: &mut u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    for chunk in t.chunks_mut(4) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&(*state as u32).to_ne_bytes());
    }
    t
}

/// Client-to-peer data at `buf[offset..offset + len]`: bandwidth cap, accounting, send from
/// the relay socket of the peer's family.
fn to_peer(
    a: &mut Allocation,
    cx: &mut Ctx<'_>,
    offset: usize,
    len: usize,
    peer: SocketAddr,
    socket: usize,
) -> Action {
    if !a.up.take(cx.now.mono, cx.settings.max_bandwidth, len) {
        cx.stats.incr(Counter::DropBandwidth);
        return Action::Drop;
    }
    a.traffic.packets_to_peer += 1;
    a.traffic.bytes_to_peer += len as u64;
    cx.stats.incr(Counter::RelayClientToPeerPackets);
    cx.stats.add(Counter::RelayClientToPeerBytes, len as u64);
    Action::Send {
        offset,
        len,
        socket,
        to: peer,
    }
}

/// Writes a Data indication header (and padding) around the peer data at `d.start`.
/// Returns the offset and length of the whole message.
fn data_indication(
    buf: &mut [u8],
    d: Datagram,
    peer: SocketAddr,
    tid: &[u8; 12],
) -> Option<(usize, usize)> {
    let peer_attr = if peer.is_ipv4() { 12 } else { 24 };
    let head = stun::HEADER_LEN + peer_attr + 4;
    let offset = d.start.checked_sub(head)?;
    let padded = d.len.div_ceil(4) * 4;
    if d.start + padded > buf.len() {
        return None;
    }
    let written = {
        let mut w = stun::MessageWriter::new(
            &mut buf[offset..d.start - 4],
            stun::Class::Indication,
            stun::method::DATA,
            tid,
        )
        .ok()?;
        w.add_xor_address(attr::XOR_PEER_ADDRESS, peer).ok()?;
        w.finish()
    };
    if written != head - 4 {
        return None;
    }
    let a = d.start - 4;
    buf[a..a + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    buf[a + 2..a + 4].copy_from_slice(&(d.len as u16).to_be_bytes());
    buf[d.start + d.len..d.start + padded].fill(0);
    let total = head + padded;
    let body = (total - stun::HEADER_LEN) as u16;
    buf[offset + 2..offset + 4].copy_from_slice(&body.to_be_bytes());
    Some((offset, total))
}

#[cfg(test)]
mod tests;
