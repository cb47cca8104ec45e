//! The shared-memory segment between `portico` (control plane) and `portico-dataplane`.
//!
//! One POSIX shared-memory object (`/dev/shm/portico-<hash of the state dir>`) holds:
//!
//! * a [`Header`] with a magic number and a layout version, so a process built from another
//!   layout refuses to attach with a clear error instead of misreading memory;
//! * a [`ConfigBlock`]: the canonical TOML of the running configuration under a sequence lock.
//!   The control plane is the only writer; the dataplane polls the generation (one atomic
//!   load) and re-reads the text when it changes, so a new configuration needs no restart;
//! * one [`WorkerCounters`] block per dataplane thread: each block has exactly one writer (its
//!   worker), so increments are a plain load and store without a locked instruction, and the
//!   control plane reads them without ever stopping the dataplane.
//!
//! The object is named after the state dir so a restarted control plane finds the segment of
//! a dataplane that outlived it.
//!
//! # Safety
//!
//! All `unsafe` code of the segment is in this module. The invariants that make it sound:
//!
//! 1. The mapping is `MAP_SHARED`, page aligned, and at least `size_of::<Segment>()` bytes
//!    long (checked with `fstat` before a reference is made), so `&Segment` points at valid,
//!    suitably aligned memory for as long as the [`SharedMemory`] value lives; the reference
//!    handed out borrows from it and `Drop` unmaps.
//! 2. Every field of [`Segment`] is an atomic integer or an array of them. Any bit pattern,
//!    including the zeroes of a fresh object, is a valid value, and concurrent access from
//!    other processes is only ever through atomic operations, so there is no data race in the
//!    Rust sense even though another process writes the same memory.
//! 3. A creator fills the header and only then publishes `magic` and `layout_version` with
//!    `Release`; an attacher reads them with `Acquire` before it trusts anything else.

use std::ffi::CString;
use std::fmt;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, Mode};

use crate::counters::{Counter, COUNTER_SLOTS};

/// "PORTICO" and a format byte, as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PORTICO\x01");
/// Bump on every change to the layout of [`Segment`].
pub const LAYOUT_VERSION: u32 = 6;
pub const MAX_WORKERS: usize = 64;
/// Counter blocks: one per worker plus one for the TCP thread, which also writes counters.
pub const COUNTER_BLOCKS: usize = MAX_WORKERS + 1;
pub const CONFIG_CAPACITY: usize = 256 * 1024;
/// TURN allocations visible to the control plane (API listing); the dataplane splits them
/// evenly between its workers. Untouched records cost no memory (tmpfs pages on demand).
pub const ALLOC_RECORDS: usize = 16 * 1024;
/// Pending "delete allocation" requests from the control plane.
pub const KILL_SLOTS: usize = 64;
/// Blacklist hash table size (a power of two); the control plane keeps it at most half full.
pub const BLACKLIST_SLOTS: usize = 1 << 16;
/// Suspicious-event ring per counter block (worker or TCP thread).
pub const EVENT_SLOTS: usize = 4096;

/// Which packet driver the dataplane runs, as published in [`Header::driver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Unknown = 0,
    IoUring = 1,
    Epoll = 2,
}

impl Driver {
    pub fn from_u32(v: u32) -> Driver {
        match v {
            1 => Driver::IoUring,
            2 => Driver::Epoll,
            _ => Driver::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::Unknown => "unknown",
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

#[repr(C, align(64))]
pub struct Header {
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    /// Workers the running dataplane started (its counter blocks `0..workers` are live).
    pub workers: AtomicU32,
    pub controlplane_pid: AtomicU32,
    pub dataplane_pid: AtomicU32,
    /// A [`Driver`] value.
    pub driver: AtomicU32,
    /// A futex word: the control plane's event reader sets it to 0 and sleeps on it; a worker
    /// that pushes an event sets it to 1 and, when it was 0, wakes the reader (one system
    /// call per wake-up, not per event). See [`Segment::ring_events_doorbell`].
    pub events_doorbell: AtomicU32,
    /// Unix time in milliseconds, refreshed by the dataplane every 100 ms while it runs.
    pub dataplane_heartbeat_ms: AtomicU64,
    pub dataplane_started_ms: AtomicU64,
    /// The configuration generation every worker has applied.
    pub config_applied: AtomicU64,
    /// Dataplane restarts by supervisors of this segment: kept here so the count survives a
    /// control-plane restart.
    pub dataplane_restarts: AtomicU64,
}

#[repr(C, align(64))]
pub struct ConfigBlock {
    /// Sequence lock: odd while the writer is inside; the generation is `seq / 2`.
    seq: AtomicU64,
    len: AtomicU64,
    words: [AtomicU64; CONFIG_CAPACITY / 8],
}

#[repr(C, align(64))]
pub struct WorkerCounters {
    slots: [AtomicU64; COUNTER_SLOTS],
}

/// One TURN allocation as the control plane sees it. Single writer (the owning worker),
/// under a sequence lock like the configuration block.
#[repr(C, align(64))]
pub struct AllocRecord {
    seq: AtomicU64,
    /// 0: the record is free.
    id: AtomicU64,
    client: [AtomicU64; 3],
    relay: [AtomicU64; 3],
    created_unix: AtomicU64,
    expires_unix: AtomicU64,
    /// permissions << 32 | channels
    counts: AtomicU64,
    traffic: [AtomicU64; 4],
    username: [AtomicU64; 8],
}

/// A copy of an [`AllocRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocInfo {
    pub id: u64,
    pub client: std::net::SocketAddr,
    pub relay: std::net::SocketAddr,
    pub created_unix: u64,
    pub expires_unix: u64,
    pub permissions: u32,
    pub channels: u32,
    pub packets_to_peer: u64,
    pub bytes_to_peer: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
    /// At most 64 bytes of the user name.
    pub username: String,
}

fn encode_addr(a: std::net::SocketAddr) -> [u64; 3] {
    let (ip, family) = match a.ip() {
        std::net::IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 4u64),
        std::net::IpAddr::V6(v6) => (v6.octets(), 6u64),
    };
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&ip[..8]);
    lo.copy_from_slice(&ip[8..]);
    [
        u64::from_be_bytes(hi),
        u64::from_be_bytes(lo),
        u64::from(a.port()) << 8 | family,
    ]
}

fn decode_addr(w: [u64; 3]) -> std::net::SocketAddr {
    let mut ip = [0u8; 16];
    ip[..8].copy_from_slice(&w[0].to_be_bytes());
    ip[8..].copy_from_slice(&w[1].to_be_bytes());
    let v6 = std::net::Ipv6Addr::from(ip);
    let port = (w[2] >> 8) as u16;
    let ip = match (w[2] & 0xff, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => std::net::IpAddr::V4(v4),
        _ => std::net::IpAddr::V6(v6),
    };
    std::net::SocketAddr::new(ip, port)
}

impl AllocRecord {
    /// Writes a record (owning worker only).
    pub fn publish(&self, a: &AllocInfo) {
        let seq = self.seq.load(Ordering::Relaxed) & !1;
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.id.store(a.id, Ordering::Relaxed);
        for (slot, v) in self.client.iter().zip(encode_addr(a.client)) {
            slot.store(v, Ordering::Relaxed);
        }
        for (slot, v) in self.relay.iter().zip(encode_addr(a.relay)) {
            slot.store(v, Ordering::Relaxed);
        }
        self.created_unix.store(a.created_unix, Ordering::Relaxed);
        self.expires_unix.store(a.expires_unix, Ordering::Relaxed);
        self.counts.store(
            u64::from(a.permissions) << 32 | u64::from(a.channels),
            Ordering::Relaxed,
        );
        for (slot, v) in self.traffic.iter().zip([
            a.packets_to_peer,
            a.bytes_to_peer,
            a.packets_to_client,
            a.bytes_to_client,
        ]) {
            slot.store(v, Ordering::Relaxed);
        }
        let name = a.username.as_bytes();
        for (i, slot) in self.username.iter().enumerate() {
            let mut w = [0u8; 8];
            if let Some(chunk) = name.get(i * 8..) {
                let n = chunk.len().min(8);
                w[..n].copy_from_slice(&chunk[..n]);
            }
            slot.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.seq.store(seq + 2, Ordering::Release);
    }

    /// Marks the record free (owning worker only).
    pub fn clear(&self) {
        let seq = self.seq.load(Ordering::Relaxed) & !1;
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.id.store(0, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }

    /// A consistent copy, or `None` for a free record.
    pub fn read(&self) -> Option<AllocInfo> {
        for _ in 0..1000 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let id = self.id.load(Ordering::Relaxed);
            let load3 = |a: &[AtomicU64; 3]| {
                [
                    a[0].load(Ordering::Relaxed),
                    a[1].load(Ordering::Relaxed),
                    a[2].load(Ordering::Relaxed),
                ]
            };
            let client = load3(&self.client);
            let relay = load3(&self.relay);
            let created_unix = self.created_unix.load(Ordering::Relaxed);
            let expires_unix = self.expires_unix.load(Ordering::Relaxed);
            let counts = self.counts.load(Ordering::Relaxed);
            let t: Vec<u64> = self
                .traffic
                .iter()
                .map(|x| x.load(Ordering::Relaxed))
                .collect();
            let mut name = Vec::with_capacity(64);
            for w in &self.username {
                name.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            if id == 0 {
                return None;
            }
            while name.last() == Some(&0) {
                name.pop();
            }
            return Some(AllocInfo {
                id,
                client: decode_addr(client),
                relay: decode_addr(relay),
                created_unix,
                expires_unix,
                permissions: (counts >> 32) as u32,
                channels: counts as u32,
                packets_to_peer: t[0],
                bytes_to_peer: t[1],
                packets_to_client: t[2],
                bytes_to_client: t[3],
                username: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        None
    }
}

/// One blacklisted address or IPv6 prefix, under its own sequence lock: the control plane
/// writes, every worker reads on every packet without locking.
#[repr(C)]
struct BlacklistEntry {
    seq: AtomicU64,
    hi: AtomicU64,
    lo: AtomicU64,
    /// prefix length << 56 | expiry (Unix seconds); 0 with a key set: a tombstone that keeps
    /// probe chains intact; all zero: never used.
    meta: AtomicU64,
}

/// One blacklist table: open addressing with linear probing, keys are IPv6 addresses (IPv4
/// as IPv4-mapped) with a prefix length (128 for one address, 64 for an IPv6 /64).
#[repr(C, align(64))]
pub struct BlacklistTable {
    /// Live entries; zero lets the packet path skip the lookup entirely.
    live: AtomicU64,
    used: AtomicU64,
    entries: [BlacklistEntry; BLACKLIST_SLOTS],
}

/// The blacklist the control plane decides and the dataplane enforces. Two tables: the
/// dataplane probes the active one; single changes go to the active one in place, and a
/// rebuild (to reclaim tombstones, or after the whitelist changed) fills the other one aside
/// and then switches, so the dataplane never sees a half-built or empty list.
#[repr(C, align(64))]
pub struct Blacklist {
    /// Bumped on every change, so workers know when to re-check existing allocations.
    generation: AtomicU64,
    /// Rebuilds so far; the table the packet path probes is `active & 1`. A reader that
    /// sees it move during a probe probes again (the table it read may have been cleared for
    /// the next rebuild meanwhile).
    active: AtomicU64,
    tables: [BlacklistTable; 2],
}

const META_EXPIRY: u64 = (1 << 56) - 1;

fn ip_key(ip: std::net::IpAddr, prefix: u8) -> (u64, u64) {
    let bits = match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        std::net::IpAddr::V6(v6) => u128::from(v6),
    };
    let masked = if prefix >= 128 {
        bits
    } else {
        bits & !(u128::MAX >> prefix)
    };
    ((masked >> 64) as u64, masked as u64)
}

fn slot_of(hi: u64, lo: u64, prefix: u8) -> usize {
    let mut h = hi ^ lo.rotate_left(29) ^ u64::from(prefix);
    h = (h ^ (h >> 31)).wrapping_mul(0x7fb5_d329_728e_a185);
    h = (h ^ (h >> 27)).wrapping_mul(0x81da_def4_bc2d_d44d);
    (h as usize) & (BLACKLIST_SLOTS - 1)
}

/// Prefix lengths an IPv6 blacklist entry may have: the packet path probes each, so the set
/// is small and fixed. IPv4 entries are single addresses.
pub const BLACKLIST_V6_PREFIXES: [u8; 4] = [128, 64, 56, 48];

impl BlacklistEntry {
    /// (hi, lo, meta) read consistently. A writer that died inside its critical section
    /// leaves the sequence odd forever; after a bounded wait such a slot reads as a
    /// tombstone (not blocking, the probe goes on) instead of hanging the reader.
    fn read(&self) -> (u64, u64, u64) {
        for _ in 0..10_000 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let v = (
                self.hi.load(Ordering::Relaxed),
                self.lo.load(Ordering::Relaxed),
                self.meta.load(Ordering::Relaxed),
            );
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return v;
            }
        }
        (u64::MAX, u64::MAX, 0)
    }

    fn write(&self, hi: u64, lo: u64, meta: u64) {
        let seq = self.seq.load(Ordering::Relaxed) & !1;
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.hi.store(hi, Ordering::Relaxed);
        self.lo.store(lo, Ordering::Relaxed);
        self.meta.store(meta, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }
}

impl Blacklist {
    fn table(&self) -> &BlacklistTable {
        &self.tables[(self.active.load(Ordering::Acquire) & 1) as usize]
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Live entries of the active table.
    pub fn live(&self) -> u64 {
        self.table().live()
    }

    /// Whether `ip` (or, for IPv6, a prefix of it in [`BLACKLIST_V6_PREFIXES`]) is blocked at
    /// `now_unix`. Lock-free and allocation-free: this runs for every packet while the list is
    /// non-empty.
    pub fn is_blocked(&self, ip: std::net::IpAddr, now_unix: u64) -> bool {
        let mut seen = self.active.load(Ordering::Acquire);
        let mut blocked = false;
        // Rebuilds are rare (a whitelist change, or tombstones to reclaim); two during one
        // probe rarer still. A bounded number of retries keeps the packet path bounded.
        for _ in 0..4 {
            blocked = self.tables[(seen & 1) as usize].is_blocked(ip, now_unix);
            let now = self.active.load(Ordering::Acquire);
            if now == seen {
                break;
            }
            seen = now;
        }
        blocked
    }

    /// Adds or updates an entry of the active table (control plane only: one writer at a
    /// time). `prefix` is 128 for one address (IPv4 always) or one of
    /// [`BLACKLIST_V6_PREFIXES`] for IPv6. False when the table is full or the prefix is not
    /// one the packet path probes.
    pub fn insert(&self, ip: std::net::IpAddr, prefix: u8, expires_unix: u64) -> bool {
        let ok = self.table().insert(ip, prefix, expires_unix);
        if ok {
            self.generation.fetch_add(1, Ordering::Release);
        }
        ok
    }

    /// Removes an entry of the active table (control plane only).
    pub fn remove(&self, ip: std::net::IpAddr, prefix: u8) -> bool {
        let ok = self.table().remove(ip, prefix);
        if ok {
            self.generation.fetch_add(1, Ordering::Release);
        }
        ok
    }

    /// Replaces the whole list (control plane only): fills the inactive table with `entries`
    /// (address, prefix, expiry), then makes it the active one. Readers see the old list or the
    /// new one, never an empty or partial one. Returns the entries that did not fit.
    pub fn replace(
        &self,
        entries: impl IntoIterator<Item = (std::net::IpAddr, u8, u64)>,
    ) -> Vec<(std::net::IpAddr, u8)> {
        let next = self.active.load(Ordering::Relaxed).wrapping_add(1);
        let t = &self.tables[(next & 1) as usize];
        t.clear();
        let mut refused = Vec::new();
        for (ip, prefix, exp) in entries {
            if !t.insert(ip, prefix, exp) {
                refused.push((ip, prefix));
            }
        }
        self.active.store(next, Ordering::Release);
        self.generation.fetch_add(1, Ordering::Release);
        refused
    }

    /// Empties the list (control plane only).
    pub fn clear(&self) {
        self.replace(std::iter::empty());
    }
}

impl BlacklistTable {
    fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    fn find(&self, hi: u64, lo: u64, prefix: u8) -> Option<(usize, u64)> {
        let start = slot_of(hi, lo, prefix);
        for i in 0..BLACKLIST_SLOTS {
            let idx = (start + i) & (BLACKLIST_SLOTS - 1);
            let (h, l, meta) = self.entries[idx].read();
            if h == 0 && l == 0 && meta == 0 {
                return None;
            }
            if h == hi && l == lo && (meta >> 56) as u8 == prefix && meta != 0 {
                return Some((idx, meta & META_EXPIRY));
            }
        }
        None
    }

    /// Whether `ip` (or, for IPv6, its /64) is blocked at `now_unix`. Lock-free and
    /// allocation-free: this runs for every packet while the list is non-empty.
    fn is_blocked(&self, ip: std::net::IpAddr, now_unix: u64) -> bool {
        if self.live.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let ip = ip.to_canonical();
        let (hi, lo) = ip_key(ip, 128);
        if matches!(self.find(hi, lo, 128), Some((_, exp)) if exp > now_unix) {
            return true;
        }
        if ip.is_ipv6() {
            for prefix in &BLACKLIST_V6_PREFIXES[1..] {
                let (hi, lo) = ip_key(ip, *prefix);
                if matches!(self.find(hi, lo, *prefix), Some((_, exp)) if exp > now_unix) {
                    return true;
                }
            }
        }
        false
    }

    /// Adds or updates an entry (control plane only: single writer). `prefix` is 128 for one
    /// address (IPv4 always) or one of [`BLACKLIST_V6_PREFIXES`] for IPv6. False when the
    /// table is full or the prefix is not one the packet path probes.
    fn insert(&self, ip: std::net::IpAddr, prefix: u8, expires_unix: u64) -> bool {
        let prefix = if ip.to_canonical().is_ipv4() {
            128
        } else {
            prefix.min(128)
        };
        if !BLACKLIST_V6_PREFIXES.contains(&prefix) {
            // The packet path would never probe it: refuse rather than pretend.
            return false;
        }
        let (hi, lo) = ip_key(ip, prefix);
        let meta = u64::from(prefix) << 56 | expires_unix.clamp(1, META_EXPIRY);
        if let Some((idx, _)) = self.find(hi, lo, prefix) {
            self.entries[idx].write(hi, lo, meta);
            return true;
        }
        if self.used.load(Ordering::Relaxed) as usize >= BLACKLIST_SLOTS / 2 {
            return false;
        }
        let start = slot_of(hi, lo, prefix);
        for i in 0..BLACKLIST_SLOTS {
            let idx = (start + i) & (BLACKLIST_SLOTS - 1);
            let (h, l, m) = self.entries[idx].read();
            let never_used = h == 0 && l == 0 && m == 0;
            let tombstone = m == 0 && !never_used;
            if never_used || tombstone {
                self.entries[idx].write(hi, lo, meta);
                if never_used {
                    self.used.fetch_add(1, Ordering::Relaxed);
                }
                self.live.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Removes an entry (control plane only).
    fn remove(&self, ip: std::net::IpAddr, prefix: u8) -> bool {
        let prefix = if ip.to_canonical().is_ipv4() {
            128
        } else {
            prefix.min(128)
        };
        let (hi, lo) = ip_key(ip, prefix);
        match self.find(hi, lo, prefix) {
            Some((idx, _)) => {
                // Keep the key as a tombstone so later entries of the chain stay reachable.
                self.entries[idx].write(hi, lo, 0);
                self.live.fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Empties the table (control plane only), e.g. before writing its whole list again.
    fn clear(&self) {
        for e in &self.entries {
            // Written without reading first: a slot left odd by a dead writer is repaired.
            if e.seq.load(Ordering::Relaxed) != 0 {
                e.write(0, 0, 0);
            }
        }
        self.used.store(0, Ordering::Relaxed);
        self.live.store(0, Ordering::Relaxed);
    }
}

/// What a suspicious event from the dataplane is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TURN request with credentials that did not verify (wrong password, unknown user,
    /// expired REST credential).
    AuthFailure = 1,
    /// A CreatePermission/ChannelBind to a peer the policy refuses.
    PeerDenied = 2,
    /// STUN/TURN requests from one source above the configured rate.
    RateExceeded = 3,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::AuthFailure),
            2 => Some(EventKind::PeerDenied),
            3 => Some(EventKind::RateExceeded),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::AuthFailure => "turn_auth_failure",
            EventKind::PeerDenied => "turn_peer_denied",
            EventKind::RateExceeded => "stun_rate_exceeded",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub ip: std::net::IpAddr,
    pub unix: u64,
}

#[repr(C)]
struct EventEntry {
    hi: AtomicU64,
    lo: AtomicU64,
    meta: AtomicU64,
}

/// Single-producer (one worker), single-consumer (the control plane) ring of events. When it
/// is full, new events are dropped and counted: the dataplane never waits for the control
/// plane.
#[repr(C, align(64))]
pub struct EventRing {
    head: AtomicU64,
    _pad1: [u64; 7],
    tail: AtomicU64,
    _pad2: [u64; 7],
    dropped: AtomicU64,
    entries: [EventEntry; EVENT_SLOTS],
}

impl EventRing {
    /// Producer side (the owning worker only).
    pub fn push(&self, e: Event) -> bool {
        let h = self.head.load(Ordering::Relaxed);
        let t = self.tail.load(Ordering::Acquire);
        if h.wrapping_sub(t) >= EVENT_SLOTS as u64 {
            self.dropped
                .store(self.dropped.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return false;
        }
        let slot = &self.entries[(h as usize) % EVENT_SLOTS];
        let (hi, lo) = ip_key(e.ip, 128);
        slot.hi.store(hi, Ordering::Relaxed);
        slot.lo.store(lo, Ordering::Relaxed);
        slot.meta.store(
            (e.kind as u64) << 56 | (e.unix & META_EXPIRY),
            Ordering::Relaxed,
        );
        self.head.store(h.wrapping_add(1), Ordering::Release);
        true
    }

    /// Consumer side (the control plane only): hands every pending event to `f`.
    pub fn drain(&self, mut f: impl FnMut(Event)) {
        let t = self.tail.load(Ordering::Relaxed);
        let h = self.head.load(Ordering::Acquire);
        let mut i = t;
        while i != h {
            let slot = &self.entries[(i as usize) % EVENT_SLOTS];
            let hi = slot.hi.load(Ordering::Relaxed);
            let lo = slot.lo.load(Ordering::Relaxed);
            let meta = slot.meta.load(Ordering::Relaxed);
            let v6 = std::net::Ipv6Addr::from(u128::from(hi) << 64 | u128::from(lo));
            if let Some(kind) = EventKind::from_u8((meta >> 56) as u8) {
                f(Event {
                    kind,
                    ip: std::net::IpAddr::V6(v6).to_canonical(),
                    unix: meta & META_EXPIRY,
                });
            }
            i = i.wrapping_add(1);
        }
        self.tail.store(h, Ordering::Release);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[repr(C)]
pub struct Segment {
    pub header: Header,
    pub config: ConfigBlock,
    counters: [WorkerCounters; COUNTER_BLOCKS],
    kill: [AtomicU64; KILL_SLOTS],
    records: [AllocRecord; ALLOC_RECORDS],
    pub blacklist: Blacklist,
    events: [EventRing; COUNTER_BLOCKS],
}

impl WorkerCounters {
    /// Adds to a slot. Only the one thread that owns this block may call it: the load and
    /// store are not one atomic step, which is what keeps the packet path free of locked
    /// instructions.
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        let slot = &self.slots[c as usize];
        slot.store(
            slot.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// For gauges: one block's value may go below zero when another worker added what this
    /// one removes; the sum over all blocks is what is meaningful.
    #[inline]
    pub fn sub(&self, c: Counter, n: u64) {
        let slot = &self.slots[c as usize];
        slot.store(
            slot.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn incr(&self, c: Counter) {
        self.add(c, 1);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize].load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub enum ConfigWriteError {
    TooLarge(usize),
}

impl fmt::Display for ConfigWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWriteError::TooLarge(n) => write!(
                f,
                "configuration is {n} bytes, shared memory holds at most {CONFIG_CAPACITY}"
            ),
        }
    }
}

impl Segment {
    pub fn counters(&self, block: usize) -> &WorkerCounters {
        &self.counters[block.min(COUNTER_BLOCKS - 1)]
    }

    /// Sum of one counter over every block (wrapping, so gauges whose per-block values went
    /// "negative" still sum right).
    pub fn total(&self, c: Counter) -> u64 {
        self.counters
            .iter()
            .fold(0u64, |acc, b| acc.wrapping_add(b.get(c)))
    }

    /// The event ring of a counter block (worker index, or `MAX_WORKERS` for the TCP thread).
    pub fn events(&self, block: usize) -> &EventRing {
        &self.events[block.min(COUNTER_BLOCKS - 1)]
    }

    /// Events the dataplane dropped because a ring was full.
    pub fn events_dropped(&self) -> u64 {
        self.events.iter().map(|r| r.dropped()).sum()
    }

    /// Drains every ring.
    /// Producer side, after pushing events: wakes the control plane's event reader when it
    /// sleeps (or is about to). Costs a system call only for the first event after the reader
    /// armed the doorbell; further events before it reads find the bell rung already.
    pub fn ring_events_doorbell(&self) {
        let word = &self.header.events_doorbell;
        if word.swap(1, Ordering::SeqCst) == 0 {
            futex_wake(word);
        }
    }

    /// Consumer side: arm the doorbell *before* draining, so an event pushed after the drain
    /// rings it and [`Segment::wait_events_doorbell`] returns at once.
    pub fn arm_events_doorbell(&self) {
        self.header.events_doorbell.store(0, Ordering::SeqCst);
    }

    /// Consumer side: sleeps until a worker rings the doorbell or `timeout` passes (returns
    /// at once when it was rung since [`Segment::arm_events_doorbell`]).
    pub fn wait_events_doorbell(&self, timeout: std::time::Duration) {
        futex_wait(&self.header.events_doorbell, 0, timeout);
    }

    pub fn drain_events(&self, mut f: impl FnMut(Event)) {
        for r in &self.events {
            r.drain(&mut f);
        }
    }

    pub fn record(&self, i: usize) -> Option<&AllocRecord> {
        self.records.get(i)
    }

    /// Every allocation the dataplane published.
    pub fn allocations(&self) -> Vec<AllocInfo> {
        self.records.iter().filter_map(|r| r.read()).collect()
    }

    /// Asks the dataplane to delete allocation `id`; false when the request queue is full.
    pub fn request_delete(&self, id: u64) -> bool {
        if id == 0 {
            return false;
        }
        self.kill.iter().any(|k| {
            k.load(Ordering::Relaxed) == id
                || k.compare_exchange(0, id, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Pending delete requests (dataplane side); [`Segment::done_delete`] acknowledges one.
    pub fn pending_deletes(&self) -> impl Iterator<Item = u64> + '_ {
        self.kill
            .iter()
            .map(|k| k.load(Ordering::Acquire))
            .filter(|id| *id != 0)
    }

    pub fn done_delete(&self, id: u64) {
        for k in &self.kill {
            let _ = k.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// The generation of the configuration now in the block (0: none written yet).
    pub fn config_generation(&self) -> u64 {
        self.config.seq.load(Ordering::Acquire) / 2
    }

    /// Publishes new configuration text; returns its generation. Single writer: the control
    /// plane.
    pub fn write_config(&self, text: &[u8]) -> Result<u64, ConfigWriteError> {
        if text.len() > CONFIG_CAPACITY {
            return Err(ConfigWriteError::TooLarge(text.len()));
        }
        let c = &self.config;
        let seq = c.seq.load(Ordering::Relaxed) & !1;
        c.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, chunk) in text.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            c.words[i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        c.len.store(text.len() as u64, Ordering::Relaxed);
        c.seq.store(seq + 2, Ordering::Release);
        Ok((seq + 2) / 2)
    }

    /// Copies out a consistent configuration text and its generation, or `None` when none
    /// was written yet. Retries while the writer is inside (it never stays long).
    pub fn read_config(&self) -> Option<(u64, Vec<u8>)> {
        let c = &self.config;
        for _ in 0..10_000 {
            let s1 = c.seq.load(Ordering::Acquire);
            if s1 == 0 {
                return None;
            }
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let len = (c.len.load(Ordering::Relaxed) as usize).min(CONFIG_CAPACITY);
            let mut out = Vec::with_capacity(len + 8);
            for w in &c.words[..len.div_ceil(8)] {
                out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            out.truncate(len);
            fence(Ordering::Acquire);
            if c.seq.load(Ordering::Relaxed) == s1 {
                return Some((s1 / 2, out));
            }
        }
        None
    }
}

#[derive(Debug)]
pub enum ShmError {
    Os {
        what: &'static str,
        name: String,
        errno: Errno,
    },
    NotPortico {
        name: String,
    },
    Version {
        name: String,
        found: u32,
    },
    TooSmall {
        name: String,
        size: usize,
    },
}

impl fmt::Display for ShmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShmError::Os { what, name, errno } => {
                write!(f, "shared memory {name}: {what} failed: {}", errno.desc())
            }
            ShmError::NotPortico { name } => {
                write!(f, "shared memory {name} is not a Portico segment")
            }
            ShmError::Version { name, found } => write!(
                f,
                "shared memory {name} has layout version {found}, this build speaks version \
                 {LAYOUT_VERSION}: stop the other Portico processes (or remove /dev/shm{name}) \
                 and start both from the same build"
            ),
            ShmError::TooSmall { name, size } => write!(
                f,
                "shared memory {name} is {size} bytes, smaller than the {} this layout needs",
                size_of::<Segment>()
            ),
        }
    }
}

impl std::error::Error for ShmError {}

/// A mapping of the segment; unmapped on drop (the object itself stays until unlinked).
pub struct SharedMemory {
    ptr: NonNull<Segment>,
    len: usize,
    name: String,
}

// SAFETY: the mapping is only accessed through `&Segment`, whose fields are all atomics
// (invariant 2), so sharing and sending it between threads is sound.
unsafe impl Send for SharedMemory {}
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// The object name for a state dir: stable across restarts, distinct per installation.
    pub fn name_for_state_dir(state_dir: &Path) -> String {
        let canon = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        // FNV-1a: a stable hash (std's is randomly seeded per process).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canon.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("/portico-{h:016x}")
    }

    /// Creates a fresh segment, replacing any object of that name.
    pub fn create(name: &str) -> Result<SharedMemory, ShmError> {
        let cname = c_name(name)?;
        let _ = shm_unlink(cname.as_c_str());
        let fd = shm_open(
            cname.as_c_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|errno| os("shm_open", name, errno))?;
        let len = size_of::<Segment>();
        nix::unistd::ftruncate(&fd, len as i64).map_err(|errno| os("ftruncate", name, errno))?;
        let shm = map(fd, len, name)?;
        let h = &shm.segment().header;
        h.controlplane_pid
            .store(std::process::id(), Ordering::Relaxed);
        h.layout_version.store(LAYOUT_VERSION, Ordering::Release);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(shm)
    }

    /// Attaches to an existing segment, refusing one of another layout.
    pub fn attach(name: &str) -> Result<SharedMemory, ShmError> {
        let cname = c_name(name)?;
        let fd = shm_open(cname.as_c_str(), OFlag::O_RDWR, Mode::empty())
            .map_err(|errno| os("shm_open", name, errno))?;
        let size = fstat(fd.as_raw_fd())
            .map_err(|errno| os("fstat", name, errno))?
            .st_size as usize;
        if size < size_of::<Header>() {
            return Err(ShmError::NotPortico { name: name.into() });
        }
        // Read the header through a mapping of its own size before trusting the rest.
        let header_map = map_raw(&fd, size_of::<Header>(), name)?;
        // SAFETY: the mapping is at least size_of::<Header>() bytes, page aligned, and Header
        // is all atomics (invariants 1 and 2).
        let header = unsafe { header_map.cast::<Header>().as_ref() };
        let magic = header.magic.load(Ordering::Acquire);
        let version = header.layout_version.load(Ordering::Acquire);
        // SAFETY: unmapping the mapping made just above; `header` is not used after this.
        let _ = unsafe { munmap(header_map, size_of::<Header>()) };
        if magic != MAGIC {
            return Err(ShmError::NotPortico { name: name.into() });
        }
        if version != LAYOUT_VERSION {
            return Err(ShmError::Version {
                name: name.into(),
                found: version,
            });
        }
        if size < size_of::<Segment>() {
            return Err(ShmError::TooSmall {
                name: name.into(),
                size,
            });
        }
        map(fd, size_of::<Segment>(), name)
    }

    /// Removes the object's name; mappings stay valid until dropped.
    pub fn unlink(name: &str) {
        if let Ok(c) = CString::new(name) {
            let _ = shm_unlink(c.as_c_str());
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn segment(&self) -> &Segment {
        // SAFETY: invariants 1 and 2: the mapping is live while `self` is, is large enough and
        // aligned, and every field is an atomic.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in `map`; no reference derived from it
        // outlives `self` because `segment()` borrows `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// `FUTEX_WAIT` on a word of the shared segment (not `FUTEX_PRIVATE`: the waker is another
/// process). Spurious and early returns are fine for the caller, which re-checks its rings.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a live, aligned 32-bit atomic inside the mapping (invariants 1 and 2)
    // and `ts` outlives the call; FUTEX_WAIT only reads both. The kernel compares the word
    // with `expected` atomically, so a wake between our store and this call is not lost.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// `FUTEX_WAKE` for every waiter on a word of the shared segment.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE does not access memory through the pointer, it
    // only uses its address as the key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn c_name(name: &str) -> Result<CString, ShmError> {
    if !name.starts_with('/') || name[1..].contains('/') || name.len() > 250 {
        return Err(os("shm_open", name, Errno::EINVAL));
    }
    CString::new(name).map_err(|_| os("shm_open", name, Errno::EINVAL))
}

fn os(what: &'static str, name: &str, errno: Errno) -> ShmError {
    ShmError::Os {
        what,
        name: name.into(),
        errno,
    }
}

fn map_raw(fd: &OwnedFd, len: usize, name: &str) -> Result<NonNull<libc::c_void>, ShmError> {
    let nz = NonZeroUsize::new(len).ok_or_else(|| os("mmap", name, Errno::EINVAL))?;
    // SAFETY: a fresh shared mapping of a file descriptor we own; no existing memory is
    // affected. The result is page aligned.
    unsafe {
        mmap(
            None,
            nz,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }
    .map_err(|errno| os("mmap", name, errno))
}

fn map(fd: OwnedFd, len: usize, name: &str) -> Result<SharedMemory, ShmError> {
    let ptr = map_raw(&fd, len, name)?;
    // The descriptor can close: the mapping keeps the object alive.
    drop(fd);
    Ok(SharedMemory {
        ptr: ptr.cast(),
        len,
        name: name.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(tag: &str) -> String {
        format!("/portico-test-{tag}-{}", std::process::id())
    }

    #[test]
    fn config_round_trips_and_generation_advances() {
        let name = unique("cfg");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        assert_eq!(b.segment().read_config(), None);
        let g1 = a.segment().write_config(b"state_dir = \"x\"\n").unwrap();
        assert_eq!(g1, 1);
        assert_eq!(
            b.segment().read_config(),
            Some((1, b"state_dir = \"x\"\n".to_vec()))
        );
        let long = vec![b'#'; 1001];
        let g2 = a.segment().write_config(&long).unwrap();
        assert_eq!(g2, 2);
        assert_eq!(b.segment().config_generation(), 2);
        assert_eq!(b.segment().read_config().unwrap().1, long);
        assert!(a
            .segment()
            .write_config(&vec![0; CONFIG_CAPACITY + 1])
            .is_err());
        SharedMemory::unlink(&name);
    }

    #[test]
    fn counters_are_visible_across_mappings() {
        let name = unique("ctr");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        a.segment().counters(3).add(Counter::RxPackets, 5);
        a.segment().counters(0).incr(Counter::RxPackets);
        assert_eq!(b.segment().counters(3).get(Counter::RxPackets), 5);
        assert_eq!(b.segment().total(Counter::RxPackets), 6);
        SharedMemory::unlink(&name);
    }

    #[test]
    fn another_layout_version_is_refused_with_a_clear_error() {
        let name = unique("ver");
        let a = SharedMemory::create(&name).unwrap();
        a.segment()
            .header
            .layout_version
            .store(LAYOUT_VERSION + 1, Ordering::Release);
        let e = SharedMemory::attach(&name).err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("layout version {}", LAYOUT_VERSION + 1)),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("this build speaks version {LAYOUT_VERSION}")),
            "{msg}"
        );
        SharedMemory::unlink(&name);
        assert!(SharedMemory::attach(&name).is_err());
    }

    #[test]
    fn a_foreign_object_is_not_attached() {
        let name = unique("foreign");
        let c = CString::new(name.clone()).unwrap();
        let fd = shm_open(
            c.as_c_str(),
            OFlag::O_CREAT | OFlag::O_RDWR,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, 4096).unwrap();
        let e = SharedMemory::attach(&name).err().unwrap();
        assert!(matches!(e, ShmError::NotPortico { .. }), "{e}");
        SharedMemory::unlink(&name);
    }

    #[test]
    fn allocation_records_round_trip_and_deletes_queue() {
        let name = unique("alloc");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        let info = AllocInfo {
            id: 42,
            client: "198.51.100.7:5000".parse().unwrap(),
            relay: "[2001:db8::5]:40000".parse().unwrap(),
            created_unix: 1,
            expires_unix: 601,
            permissions: 2,
            channels: 1,
            packets_to_peer: 10,
            bytes_to_peer: 1720,
            packets_to_client: 9,
            bytes_to_client: 1548,
            username: "1700000000:a-rather-long-user-name-that-is-cut-at-sixty-four-bytes!!!"
                .into(),
        };
        a.segment().record(7).unwrap().publish(&info);
        let got = b.segment().allocations();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].username.len(), 64);
        assert_eq!(got[0].client, info.client);
        assert_eq!(got[0].relay, info.relay);
        assert_eq!(got[0].bytes_to_client, 1548);
        a.segment().record(7).unwrap().clear();
        assert!(b.segment().allocations().is_empty());
        assert!(b.segment().request_delete(42));
        assert!(b.segment().request_delete(42));
        assert_eq!(a.segment().pending_deletes().collect::<Vec<_>>(), vec![42]);
        a.segment().done_delete(42);
        assert_eq!(a.segment().pending_deletes().count(), 0);
        SharedMemory::unlink(&name);
    }

    #[test]
    fn blacklist_blocks_addresses_and_ipv6_prefixes_until_expiry() {
        let name = unique("bl");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        let bl = &a.segment().blacklist;
        let seen = &b.segment().blacklist;
        let v4: std::net::IpAddr = "198.51.100.9".parse().unwrap();
        assert!(!seen.is_blocked(v4, 100));
        let g0 = seen.generation();
        assert!(bl.insert(v4, 32, 200));
        assert!(seen.generation() > g0);
        assert!(seen.is_blocked(v4, 100));
        assert!(seen.is_blocked("::ffff:198.51.100.9".parse().unwrap(), 100));
        assert!(!seen.is_blocked(v4, 200), "expired at 200");
        assert!(!seen.is_blocked("198.51.100.10".parse().unwrap(), 100));
        let v6: std::net::IpAddr = "2001:db8:1:2::5".parse().unwrap();
        assert!(bl.insert(v6, 64, 500));
        assert!(seen.is_blocked("2001:db8:1:2:ffff::1".parse().unwrap(), 100));
        assert!(!seen.is_blocked("2001:db8:1:3::1".parse().unwrap(), 100));
        assert!(bl.remove(v4, 128));
        assert!(!seen.is_blocked(v4, 100));
        assert!(seen.is_blocked("2001:db8:1:2::7".parse().unwrap(), 100));
        // Many entries, then removal of some: the rest stay reachable through tombstones.
        for i in 0..5000u32 {
            assert!(bl.insert(
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                128,
                900
            ));
        }
        for i in (0..5000u32).step_by(2) {
            assert!(bl.remove(
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                128
            ));
        }
        for i in 0..5000u32 {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(seen.is_blocked(ip, 100), i % 2 == 1, "{ip}");
        }
        assert_eq!(seen.live(), 2501);
        let v6b: std::net::IpAddr = "2001:db8:aa::1".parse().unwrap();
        assert!(bl.insert(v6b, 48, 500));
        assert!(seen.is_blocked("2001:db8:aa:ffff::9".parse().unwrap(), 100));
        assert!(
            !bl.insert(v6b, 40, 500),
            "a prefix the packet path does not probe"
        );
        bl.clear();
        assert_eq!(seen.live(), 0);
        assert!(!seen.is_blocked("2001:db8:1:2::7".parse().unwrap(), 100));
        SharedMemory::unlink(&name);
    }

    #[test]
    fn a_slot_left_mid_write_does_not_hang_readers_and_clear_repairs_it() {
        let name = unique("stuck");
        let a = SharedMemory::create(&name).unwrap();
        let bl = &a.segment().blacklist;
        let ip: std::net::IpAddr = "198.51.100.77".parse().unwrap();
        assert!(bl.insert(ip, 128, 900));
        // A writer killed between its two sequence stores leaves the seq odd.
        let (hi, lo) = ip_key(ip, 128);
        bl.table().entries[slot_of(hi, lo, 128)]
            .seq
            .fetch_or(1, Ordering::Relaxed);
        assert!(!bl.is_blocked(ip, 100), "a torn slot reads as not blocking");
        // Each clear fills the other table and switches: after two, the torn table is the
        // active one again, repaired.
        for _ in 0..2 {
            bl.clear();
            assert!(!bl.is_blocked(ip, 100));
            assert!(bl.insert(ip, 128, 900));
            assert!(bl.is_blocked(ip, 100));
            assert_eq!(bl.live(), 1);
        }
        SharedMemory::unlink(&name);
    }

    #[test]
    fn a_rebuild_never_shows_readers_an_empty_list() {
        let name = unique("swap");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        let keep: std::net::IpAddr = "198.51.100.1".parse().unwrap();
        let bl = &a.segment().blacklist;
        assert!(bl.insert(keep, 128, 900));
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let seen = &b.segment().blacklist;
                let mut checks = 0u64;
                let mut misses = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    checks += 1;
                    if !seen.is_blocked(keep, 100) {
                        misses += 1;
                    }
                }
                (checks, misses)
            });
            for round in 0..200u32 {
                // Every list contains `keep`, plus some others that change per round.
                let others = (0..50u32).map(|i| {
                    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + round * 100 + i);
                    (std::net::IpAddr::V4(ip), 128, 900)
                });
                let refused = bl.replace(std::iter::once((keep, 128, 900)).chain(others));
                assert!(refused.is_empty());
            }
            stop.store(true, Ordering::Relaxed);
            let (checks, misses) = reader.join().unwrap();
            assert!(checks > 0);
            assert_eq!(
                misses, 0,
                "readers saw the list without its entry during a rebuild"
            );
        });
        assert_eq!(bl.live(), 51);
        SharedMemory::unlink(&name);
    }

    #[test]
    fn the_events_doorbell_wakes_a_sleeping_reader() {
        let name = unique("bell");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        // Rung before the wait: the wait returns at once.
        a.segment().arm_events_doorbell();
        b.segment().ring_events_doorbell();
        let t = std::time::Instant::now();
        a.segment()
            .wait_events_doorbell(std::time::Duration::from_secs(20));
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        // Rung while the reader sleeps: it wakes long before its timeout.
        a.segment().arm_events_doorbell();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let t = std::time::Instant::now();
                a.segment()
                    .wait_events_doorbell(std::time::Duration::from_secs(20));
                t.elapsed()
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            b.segment().ring_events_doorbell();
            assert!(waiter.join().unwrap() < std::time::Duration::from_secs(10));
        });
        // Not armed: nothing is rung twice (the word stays 1 until the reader re-arms).
        assert_eq!(a.segment().header.events_doorbell.load(Ordering::SeqCst), 1);
        SharedMemory::unlink(&name);
    }

    #[test]
    fn event_rings_carry_events_and_drop_when_full() {
        let name = unique("ev");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        let ring = a.segment().events(1);
        let ip: std::net::IpAddr = "2001:db8::7".parse().unwrap();
        assert!(ring.push(Event {
            kind: EventKind::AuthFailure,
            ip,
            unix: 77
        }));
        assert!(ring.push(Event {
            kind: EventKind::PeerDenied,
            ip: "192.0.2.1".parse().unwrap(),
            unix: 78
        }));
        let mut got = Vec::new();
        b.segment().drain_events(|e| got.push(e));
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Event {
                kind: EventKind::AuthFailure,
                ip,
                unix: 77
            }
        );
        assert_eq!(got[1].ip, "192.0.2.1".parse::<std::net::IpAddr>().unwrap());
        for i in 0..EVENT_SLOTS + 10 {
            ring.push(Event {
                kind: EventKind::RateExceeded,
                ip,
                unix: i as u64,
            });
        }
        assert_eq!(ring.dropped(), 10);
        let mut n = 0;
        b.segment().drain_events(|_| n += 1);
        assert_eq!(n, EVENT_SLOTS);
        SharedMemory::unlink(&name);
    }

    #[test]
    fn readers_never_see_a_torn_config() {
        let name = unique("torn");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..2000u32 {
                    let byte = b'a' + (i % 26) as u8;
                    let text = vec![byte; 100 + (i as usize % 3000)];
                    a.segment().write_config(&text).unwrap();
                }
            });
            s.spawn(|| {
                for _ in 0..2000 {
                    if let Some((_, text)) = b.segment().read_config() {
                        assert!(text.iter().all(|c| *c == text[0]));
                    }
                }
            });
        });
        SharedMemory::unlink(&name);
    }
}
