//! One TURN allocation and the per-worker table of them.
//!
//! Allocations are owned by the worker whose listen socket received the Allocate: the kernel
//! spreads `SO_REUSEPORT` traffic by the 4-tuple, so every later packet of that client 5-tuple
//! reaches the same worker, and the relay socket is that worker's too. The table is therefore
//! private to its worker: lookups on the packet path take no lock and share no cache line.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::auth::{Integrity, Key};

pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug)]
pub struct Permission {
    pub ip: IpAddr,
    pub expires: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct Channel {
    pub number: u16,
    pub peer: SocketAddr,
    pub expires: Instant,
}

/// A byte budget refilled continuously: the optional per-allocation bandwidth cap.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(now: Instant, rate: u64) -> Bucket {
        Bucket {
            tokens: rate as f64,
            last: now,
        }
    }

    /// Takes `n` bytes if the budget allows; `rate` 0 means unlimited.
    pub fn take(&mut self, now: Instant, rate: u64, n: usize) -> bool {
        if rate == 0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate as f64).min(rate as f64);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    pub packets_to_peer: u64,
    pub bytes_to_peer: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
}

/// One relayed transport address of an allocation and the relay socket behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relay {
    /// The driver's socket index.
    pub socket: usize,
    /// Address the relay socket is bound to.
    pub local: SocketAddr,
    /// Address told to the client (external_ip when behind a static NAT map).
    pub public: SocketAddr,
}

#[derive(Debug)]
pub struct Allocation {
    pub id: u64,
    pub client: SocketAddr,
    /// Listen socket the client talks to; replies and relayed data leave from it.
    pub listen_socket: usize,
    /// The relayed address of the family the Allocate asked for (IPv4 unless
    /// REQUESTED-ADDRESS-FAMILY said IPv6).
    pub relay: Relay,
    /// The other family's relayed address of a dual allocation (ADDITIONAL-ADDRESS-FAMILY,
    /// RFC 8656 §7.2). Permissions and channels are per IP address, so per family: each
    /// peer is reached from the relay of its own family.
    pub second: Option<Relay>,
    /// An RFC 6062 TCP allocation: `relay` is a listening TCP socket.
    pub tcp: bool,
    /// The ADDRESS-ERROR-CODE of the Allocate's answer (the additional family could not be
    /// served: 440 or 508), repeated to a retransmission.
    pub family_error: Option<u16>,
    pub created: Instant,
    pub expires: Instant,
    /// Transaction of the Allocate that made it: a retransmission gets the same answer.
    pub tid: [u8; 12],
    pub username: Box<str>,
    pub key: Key,
    pub integrity: Integrity,
    pub reservation_token: Option<[u8; 8]>,
    pub permissions: Vec<Permission>,
    pub channels: Vec<Channel>,
    pub traffic: Traffic,
    pub up: Bucket,
    pub down: Bucket,
}

impl Allocation {
    /// The relayed addresses, the requested family's first.
    pub fn relays(&self) -> impl Iterator<Item = &Relay> {
        std::iter::once(&self.relay).chain(self.second.as_ref())
    }

    /// The relay of a family, if the allocation has one.
    pub fn relay_for(&self, v4: bool) -> Option<&Relay> {
        self.relays().find(|r| r.local.is_ipv4() == v4)
    }

    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    pub fn channel_by_number(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }

    pub fn channel_by_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }
}

/// A keyed multiply-xorshift hash for the client lookup on the packet path: several times
/// cheaper than SipHash, and the random key (drawn by the core from its driver's seed) keeps
/// collisions unpredictable (the table only ever holds authenticated allocations, bounded by
/// quota).
#[derive(Clone)]
pub struct FastState(u64);

impl FastState {
    pub fn new(key: u64) -> FastState {
        FastState(key | 1)
    }
}

pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        let h = self.0;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

impl std::hash::BuildHasher for FastState {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

/// The allocations of one worker, found by client 5-tuple or by relay socket.
pub struct Table {
    slots: Vec<Option<Allocation>>,
    free: Vec<usize>,
    by_client: HashMap<(SocketAddr, usize), usize, FastState>,
    /// Relay socket index -> slot + 1 (0: none); socket indices are small and dense.
    by_relay: Vec<u32>,
}

impl Table {
    /// `key` keys the client-lookup hash.
    pub fn new(key: u64) -> Table {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::with_hasher(FastState::new(key)),
            by_relay: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    pub fn by_client(&self, client: SocketAddr, listen_socket: usize) -> Option<usize> {
        self.by_client.get(&(client, listen_socket)).copied()
    }

    pub fn by_relay(&self, socket: usize) -> Option<usize> {
        match self.by_relay.get(socket) {
            Some(&v) if v > 0 => Some(v as usize - 1),
            _ => None,
        }
    }

    pub fn get(&self, slot: usize) -> Option<&Allocation> {
        self.slots.get(slot).and_then(|s| s.as_ref())
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Allocation> {
        self.slots.get_mut(slot).and_then(|s| s.as_mut())
    }

    pub fn insert(&mut self, a: Allocation) -> usize {
        let key = (a.client, a.listen_socket);
        let sockets: Vec<usize> = a.relays().map(|r| r.socket).collect();
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(a);
                s
            }
            None => {
                self.slots.push(Some(a));
                self.slots.len() - 1
            }
        };
        self.by_client.insert(key, slot);
        for relay in sockets {
            if relay >= self.by_relay.len() {
                self.by_relay.resize(relay + 1, 0);
            }
            self.by_relay[relay] = slot as u32 + 1;
        }
        slot
    }

    pub fn remove(&mut self, slot: usize) -> Option<Allocation> {
        let a = self.slots.get_mut(slot)?.take()?;
        self.by_client.remove(&(a.client, a.listen_socket));
        for r in a.relays() {
            if let Some(v) = self.by_relay.get_mut(r.socket) {
                *v = 0;
            }
        }
        self.free.push(slot);
        Some(a)
    }

    /// Takes one family's relay out of a dual allocation (the other stays, and becomes
    /// [`Allocation::relay`] if it was the second), with the permissions and channels of
    /// that family. Returns the relay and how many permissions and channels went; `None`
    /// when the allocation has no second relay or none of that family.
    pub fn remove_relay(&mut self, slot: usize, v4: bool) -> Option<(Relay, usize, usize)> {
        let a = self.slots.get_mut(slot)?.as_mut()?;
        let second = a.second?;
        let gone = if a.relay.local.is_ipv4() == v4 {
            std::mem::replace(&mut a.relay, second)
        } else if second.local.is_ipv4() == v4 {
            second
        } else {
            return None;
        };
        a.second = None;
        let (p, c) = (a.permissions.len(), a.channels.len());
        a.permissions.retain(|p| p.ip.is_ipv4() != v4);
        a.channels.retain(|c| c.peer.is_ipv4() != v4);
        let (p, c) = (p - a.permissions.len(), c - a.channels.len());
        if let Some(v) = self.by_relay.get_mut(gone.socket) {
            *v = 0;
        }
        Some((gone, p, c))
    }

    pub fn slots(&self) -> impl Iterator<Item = (usize, &Allocation)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|a| (i, a)))
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }
}
