//! The blacklist the control plane decides and the dataplane enforces on every packet: two
//! open-addressing hash tables ([`BlacklistTable`]), one active, so a rebuild fills the other
//! aside and switches ([`Blacklist::replace`]).

#![deny(unsafe_code)]

use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::BLACKLIST_SLOTS;

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

/// The low 56 bits of a `meta` word (an expiry here, a timestamp in an event entry); the
/// top 8 bits hold a prefix length or an event kind.
pub(super) const META_EXPIRY: u64 = (1 << 56) - 1;

/// An address as two words of its IPv6 form (IPv4 as IPv4-mapped), masked to `prefix`
/// bits. Also the address encoding of the event rings.
pub(super) fn ip_key(ip: std::net::IpAddr, prefix: u8) -> (u64, u64) {
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

#[cfg(test)]
mod tests {
    use super::super::{test_name, SharedMemory};
    use super::*;

    #[test]
    fn blacklist_blocks_addresses_and_ipv6_prefixes_until_expiry() {
        let name = test_name("bl");
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
        let name = test_name("stuck");
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
        let name = test_name("swap");
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
}
