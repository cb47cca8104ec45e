//! Fraud detection: one blacklist for the reverse proxy and the TURN server.
//!
//! Suspicious events (rejections by the proxy or its targets, failed TURN authentication,
//! refused peers, request floods) are counted per source over a sliding minute; past
//! `fraud.suspicious_per_minute` the source is blacklisted for `fraud.blacklist_minutes`
//! and drops off by itself. Whitelisted sources are never blocked. Operators add, remove and
//! convert entries through the API; every entry is persisted in the state dir, so manual
//! entries and running automatic ones survive a restart.
//!
//! The engine itself is plain data with time passed in ([`Engine`]); [`task`] drives it:
//! it drains the dataplane's event rings and the proxy's channel, expires entries, mirrors
//! blocking entries into the shared-memory blacklist the dataplane checks on every packet,
//! and writes the state file.

pub mod counter;
pub mod store;
pub mod task;

#[cfg(test)]
mod engine_tests;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use portico_shared::addr::CidrList;
use portico_shared::config::FraudConfig;
use portico_shared::shm::BLACKLIST_V6_PREFIXES;
use serde::{Deserialize, Serialize};

/// A counted and blockable source: an IPv4 address, or an IPv6 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Source {
    /// IPv4 (also IPv4-mapped) per address, IPv6 per `v6_prefix`.
    pub fn of(ip: IpAddr, v6_prefix: u8) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source {
                ip: IpAddr::V4(v4),
                prefix: 32,
            },
            IpAddr::V6(v6) => {
                let p = v6_prefix.min(128);
                let mask = if p == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(p))
                };
                Source {
                    ip: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    prefix: p,
                }
            }
        }
    }

    /// Any block: an IPv4 address with a prefix of up to 32 bits, an IPv6 one of up to 128
    /// (whitelist entries may be ranges, e.g. an office's public /28).
    pub fn cidr(ip: IpAddr, prefix: u8) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let p = prefix.min(32);
                let mask = if p == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(p))
                };
                Source {
                    ip: IpAddr::V4((u32::from(v4) & mask).into()),
                    prefix: p,
                }
            }
            IpAddr::V6(_) => Source::of(ip, prefix),
        }
    }

    /// Whether this is one address or a prefix the dataplane's table probes, i.e. found by
    /// [`Engine::covering`]; other blocks are ranges, searched in a list.
    fn is_probed(&self) -> bool {
        match self.ip {
            IpAddr::V4(_) => self.prefix == 32,
            IpAddr::V6(_) => BLACKLIST_V6_PREFIXES.contains(&self.prefix),
        }
    }

    fn as_cidr(&self) -> Option<portico_shared::addr::Cidr> {
        portico_shared::addr::Cidr::new(self.ip, self.prefix).ok()
    }

    /// The prefix length in the dataplane's table (IPv4 as IPv4-mapped /128).
    pub fn shm_prefix(&self) -> u8 {
        if self.ip.is_ipv4() {
            128
        } else {
            self.prefix
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if (self.ip.is_ipv4() && self.prefix == 32) || self.prefix == 128 {
            write!(f, "{}", self.ip)
        } else {
            write!(f, "{}/{}", self.ip, self.prefix)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Black,
    White,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Put there by the engine after too many suspicious events.
    Auto,
    /// Put there by an operator.
    Manual,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub source: Source,
    pub kind: Kind,
    pub origin: Origin,
    pub created_unix: u64,
    /// None: until removed.
    pub expires_unix: Option<u64>,
    #[serde(default)]
    pub note: String,
}

/// Most entries the lists hold: what fits the dataplane's blacklist table at its
/// maximum load.
pub const MAX_ENTRIES: usize = portico_shared::shm::BLACKLIST_SLOTS / 2 - 64;

/// Most whitelist entries that are ranges (an IPv4 block shorter than /32, an IPv6 prefix
/// the dataplane does not probe): they are searched linearly on every check.
pub const MAX_WHITE_RANGES: usize = 1024;

/// A change the driver must mirror into the dataplane and the state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Block(Source, u64),
    Unblock(Source),
}

pub struct Engine {
    threshold: u32,
    duration_secs: u64,
    whitelist_cfg: CidrList,
    v6_prefix: u8,
    counts: counter::Counter,
    entries: HashMap<Source, Entry>,
    /// The whitelist entries that are ranges (see [`Source::is_probed`]), rebuilt whenever
    /// one of them changes.
    white_ranges: CidrList,
    /// Set whenever `entries` changes; the driver persists and clears it.
    pub dirty: bool,
}

impl Engine {
    pub fn new(cfg: &FraudConfig, seed: u64) -> Engine {
        Engine {
            threshold: cfg.suspicious_per_minute,
            duration_secs: cfg.blacklist_minutes.as_secs(),
            whitelist_cfg: cfg.whitelist.clone(),
            v6_prefix: cfg.ipv6_prefix,
            counts: counter::Counter::new(cfg.max_tracked_sources, seed),
            entries: HashMap::new(),
            white_ranges: CidrList::default(),
            dirty: false,
        }
    }

    /// New settings; entries and counts are kept.
    pub fn reconfigure(&mut self, cfg: &FraudConfig) {
        self.threshold = cfg.suspicious_per_minute;
        self.duration_secs = cfg.blacklist_minutes.as_secs();
        self.whitelist_cfg = cfg.whitelist.clone();
        self.v6_prefix = cfg.ipv6_prefix;
    }

    pub fn source(&self, ip: IpAddr) -> Source {
        Source::of(ip, self.v6_prefix)
    }

    pub fn tracked(&self) -> usize {
        self.counts.len()
    }

    /// The entries that cover `ip`: its own, and those of the IPv6 prefixes containing it
    /// (the same prefix lengths the dataplane probes).
    fn covering(&self, ip: IpAddr) -> impl Iterator<Item = &Entry> {
        let v6 = !ip.to_canonical().is_ipv4();
        let lens: &[u8] = if v6 { &BLACKLIST_V6_PREFIXES } else { &[128] };
        lens.iter()
            .filter_map(move |p| self.entries.get(&Source::of(ip, *p)))
    }

    /// Whether `ip` is on the whitelist (configured or an entry).
    pub fn whitelists(&self, ip: IpAddr) -> bool {
        self.whitelisted(ip)
    }

    fn whitelisted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.whitelist_cfg.contains(ip)
            || self.white_ranges.contains(ip)
            || self.covering(ip).any(|e| e.kind == Kind::White)
    }

    /// Whitelist range entries in use.
    pub fn white_ranges(&self) -> usize {
        self.white_ranges.blocks().len()
    }

    fn rebuild_white_ranges(&mut self) {
        let blocks = self
            .entries
            .values()
            .filter(|e| e.kind == Kind::White && !e.source.is_probed())
            .filter_map(|e| e.source.as_cidr())
            .collect();
        self.white_ranges = CidrList::new(blocks);
    }

    /// Whether `ip` is blocked now (the proxy asks this at accept time).
    pub fn is_blocked(&self, ip: IpAddr, now: u64) -> bool {
        !self.whitelisted(ip)
            && self
                .covering(ip)
                .any(|e| e.kind == Kind::Black && e.expires_unix.is_none_or(|x| x > now))
    }

    /// Counts a suspicious event; returns the change when it blacklists the source.
    pub fn suspicious(&mut self, ip: IpAddr, now: u64) -> Option<Change> {
        let s = self.source(ip);
        if self.whitelisted(ip) || self.threshold == 0 {
            return None;
        }
        if self.entries.get(&s).is_some_and(|e| e.kind == Kind::Black) {
            return None;
        }
        let c = self.counts.hit(s, now);
        let n = c.own + c.inherited;
        // Past the threshold, with at least half of it seen from this source while tracked:
        // inherited estimates (see `counter`) may only complete a decision, never make one.
        if n <= self.threshold || c.own * 2 < self.threshold {
            return None;
        }
        if self.entries.len() >= MAX_ENTRIES {
            // A flood from ever new sources must not grow the lists (and the dataplane's
            // table) without bound; the counting table stays bounded by itself.
            tracing::warn!(source = %s, "fraud lists full ({MAX_ENTRIES}); not blacklisted");
            return None;
        }
        self.counts.forget(&s);
        // `now` is rounded down to the second: one more second makes the block last at
        // least the configured time.
        let expires = now + self.duration_secs + 1;
        self.entries.insert(
            s,
            Entry {
                source: s,
                kind: Kind::Black,
                origin: Origin::Auto,
                created_unix: now,
                expires_unix: Some(expires),
                note: format!("{n} suspicious events within a minute"),
            },
        );
        self.dirty = true;
        Some(Change::Block(s, expires))
    }

    /// Adds or replaces a manual entry.
    pub fn add(
        &mut self,
        ip: IpAddr,
        prefix: Option<u8>,
        kind: Kind,
        expires_unix: Option<u64>,
        note: String,
        now: u64,
    ) -> (Entry, Vec<Change>) {
        let source = match prefix {
            Some(p) => Source::cidr(ip, p),
            None => self.source(ip),
        };
        let e = Entry {
            source,
            kind,
            origin: Origin::Manual,
            created_unix: now,
            expires_unix,
            note,
        };
        let mut changes = Vec::new();
        if self
            .entries
            .get(&source)
            .is_some_and(|old| old.kind == Kind::Black)
        {
            changes.push(Change::Unblock(source));
        }
        if kind == Kind::Black {
            changes.push(Change::Block(source, expires_unix.unwrap_or(u64::MAX >> 8)));
        } else {
            self.counts.forget(&source);
        }
        let range_changed = !source.is_probed()
            || self
                .entries
                .get(&source)
                .is_some_and(|old| old.kind == Kind::White);
        self.entries.insert(source, e.clone());
        if range_changed || kind == Kind::White {
            self.rebuild_white_ranges();
        }
        self.dirty = true;
        (e, changes)
    }

    /// Finds the entry for an address given as the API names it (an address inside an IPv6
    /// prefix finds the prefix entry, the most specific first).
    pub fn lookup(&self, ip: IpAddr) -> Option<&Entry> {
        if let Some(e) = self.covering(ip).next() {
            return Some(e);
        }
        // A whitelist range containing it, the longest prefix first.
        let canon = ip.to_canonical();
        self.white_ranges
            .blocks()
            .iter()
            .filter(|b| b.contains(canon))
            .max_by_key(|b| b.prefix())
            .and_then(|b| {
                self.entries.get(&Source {
                    ip: b.addr(),
                    prefix: b.prefix(),
                })
            })
    }

    /// The entry of exactly this block, if any.
    pub fn exact(&self, ip: IpAddr, prefix: u8) -> Option<&Entry> {
        self.entries.get(&Source::cidr(ip, prefix))
    }

    pub fn remove(&mut self, ip: IpAddr) -> Option<(Entry, Vec<Change>)> {
        let key = self.lookup(ip)?.source;
        self.remove_source(key)
    }

    /// Puts an entry made elsewhere (another box of the fleet) as it is; `None` when the
    /// same entry is already there or it has expired.
    pub fn put(&mut self, e: Entry, now: u64) -> Option<Vec<Change>> {
        if e.expires_unix.is_some_and(|x| x <= now) || self.entries.get(&e.source) == Some(&e) {
            return None;
        }
        if !self.entries.contains_key(&e.source) && self.entries.len() >= MAX_ENTRIES {
            return None;
        }
        let mut changes = Vec::new();
        let was_white = self.entries.get(&e.source).map(|o| o.kind == Kind::White);
        match e.kind {
            Kind::Black => changes.push(Change::Block(
                e.source,
                e.expires_unix.unwrap_or(u64::MAX >> 8),
            )),
            Kind::White => {
                if was_white == Some(false) {
                    changes.push(Change::Unblock(e.source));
                }
            }
        }
        let white = e.kind == Kind::White || was_white == Some(true);
        self.entries.insert(e.source, e);
        if white {
            self.rebuild_white_ranges();
        }
        self.dirty = true;
        Some(changes)
    }

    /// Removes the entry of exactly this block.
    pub fn remove_source(&mut self, key: Source) -> Option<(Entry, Vec<Change>)> {
        let e = self.entries.remove(&key)?;
        self.dirty = true;
        if e.kind == Kind::White {
            self.rebuild_white_ranges();
        }
        let changes = if e.kind == Kind::Black {
            vec![Change::Unblock(key)]
        } else {
            Vec::new()
        };
        Some((e, changes))
    }

    /// Turns a blacklist entry into a permanent whitelist entry (reference: "the RP
    /// administrator can change the blacklist entry into a whitelist entry").
    pub fn make_white(&mut self, ip: IpAddr, now: u64) -> Option<(Entry, Vec<Change>)> {
        let key = self.lookup(ip)?.source;
        let e = self.entries.get_mut(&key)?;
        let was_black = e.kind == Kind::Black;
        e.kind = Kind::White;
        e.origin = Origin::Manual;
        e.expires_unix = None;
        e.created_unix = now;
        let e = e.clone();
        self.counts.forget(&key);
        self.rebuild_white_ranges();
        self.dirty = true;
        let changes = if was_black {
            vec![Change::Unblock(key)]
        } else {
            Vec::new()
        };
        Some((e, changes))
    }

    /// Drops expired entries.
    pub fn expire(&mut self, now: u64) -> Vec<Change> {
        let gone: Vec<Source> = self
            .entries
            .values()
            .filter(|e| e.expires_unix.is_some_and(|x| x <= now))
            .map(|e| e.source)
            .collect();
        let mut changes = Vec::new();
        let mut white_gone = false;
        for s in gone {
            if let Some(e) = self.entries.remove(&s) {
                tracing::info!(source = %s, kind = ?e.kind, "fraud list entry expired");
                if e.kind == Kind::Black {
                    changes.push(Change::Unblock(s));
                } else {
                    white_gone = true;
                }
                self.dirty = true;
            }
        }
        if white_gone {
            self.rebuild_white_ranges();
        }
        changes
    }

    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.entries.values().cloned().collect();
        v.sort_by_key(|e| (e.created_unix, e.source.to_string()));
        v
    }

    /// Restores persisted entries (already-expired ones are skipped).
    pub fn restore(&mut self, entries: Vec<Entry>, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for e in entries {
            if e.expires_unix.is_some_and(|x| x <= now) {
                continue;
            }
            if e.kind == Kind::Black {
                changes.push(Change::Block(
                    e.source,
                    e.expires_unix.unwrap_or(u64::MAX >> 8),
                ));
            }
            self.entries.insert(e.source, e);
        }
        self.rebuild_white_ranges();
        changes
    }

    pub fn count_by_kind(&self) -> (usize, usize) {
        let black = self
            .entries
            .values()
            .filter(|e| e.kind == Kind::Black)
            .count();
        (black, self.entries.len() - black)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(threshold: u32) -> Engine {
        let mut c = FraudConfig {
            suspicious_per_minute: threshold,
            ..FraudConfig::default()
        };
        c.whitelist = CidrList::new(vec!["192.0.2.0/24".parse().unwrap()]);
        Engine::new(&c, 9)
    }

    #[test]
    fn blacklists_past_the_threshold_and_expires() {
        let mut e = engine(3);
        let ip: IpAddr = "198.51.100.4".parse().unwrap();
        for t in 0..3 {
            assert_eq!(e.suspicious(ip, 1000 + t), None);
            assert!(!e.is_blocked(ip, 1000 + t));
        }
        let change = e.suspicious(ip, 1003).unwrap();
        assert_eq!(change, Change::Block(e.source(ip), 1003 + 600 + 1));
        assert!(e.is_blocked(ip, 1004));
        assert!(!e.is_blocked("198.51.100.5".parse().unwrap(), 1004));
        assert_eq!(e.expire(1603), vec![]);
        assert_eq!(e.expire(1604), vec![Change::Unblock(e.source(ip))]);
        assert!(!e.is_blocked(ip, 1604));
        // Counting starts again from zero.
        assert_eq!(e.suspicious(ip, 1604), None);
    }

    #[test]
    fn events_spread_over_more_than_a_minute_do_not_add_up() {
        let mut e = engine(3);
        let ip: IpAddr = "198.51.100.4".parse().unwrap();
        for t in 0..10 {
            assert_eq!(e.suspicious(ip, 1000 + t * 30), None);
        }
    }

    #[test]
    fn whitelisted_sources_are_never_blocked() {
        let mut e = engine(1);
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        for t in 0..100 {
            assert_eq!(e.suspicious(ip, 1000 + t), None);
        }
        let other: IpAddr = "203.0.113.9".parse().unwrap();
        e.add(other, None, Kind::White, None, "office".into(), 1000);
        for t in 0..100 {
            assert_eq!(e.suspicious(other, 1000 + t), None);
        }
        assert!(!e.is_blocked(other, 2000));
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let mut e = engine(2);
        for (i, t) in (0..3).zip(1000..) {
            let ip: IpAddr = format!("2001:db8:5:6::{}", i + 1).parse().unwrap();
            let r = e.suspicious(ip, t);
            assert_eq!(r.is_some(), i == 2);
        }
        assert!(e.is_blocked("2001:db8:5:6:ffff::9".parse().unwrap(), 1005));
        assert!(!e.is_blocked("2001:db8:5:7::1".parse().unwrap(), 1005));
    }

    #[test]
    fn entries_of_any_supported_prefix_block_and_whitelist_what_they_cover() {
        let mut e = engine(1);
        // An operator's /48 blocks an address inside it although counting is per /64.
        let net: IpAddr = "2001:db8:bad::".parse().unwrap();
        e.add(net, Some(48), Kind::Black, None, String::new(), 10);
        assert!(e.is_blocked("2001:db8:bad:7::1".parse().unwrap(), 20));
        // A /128 whitelist entry protects that address from automatic blacklisting of its /64.
        let good: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        e.add(good, Some(128), Kind::White, None, String::new(), 10);
        for t in 0..10 {
            assert_eq!(e.suspicious(good, 100 + t), None);
        }
        assert!(!e.is_blocked(good, 200));
    }

    #[test]
    fn whitelist_entries_may_be_ranges() {
        let mut e = engine(1);
        let office: IpAddr = "203.0.113.16".parse().unwrap();
        let (w, _) = e.add(office, Some(28), Kind::White, None, "office".into(), 10);
        assert_eq!(w.source.to_string(), "203.0.113.16/28");
        assert_eq!(e.white_ranges(), 1);
        for last in 16..32u8 {
            let ip = IpAddr::from([203, 0, 113, last]);
            for t in 0..5 {
                assert_eq!(e.suspicious(ip, 100 + t), None, "{ip}");
            }
            assert!(!e.is_blocked(ip, 200));
            assert_eq!(e.lookup(ip).map(|x| x.source), Some(w.source));
        }
        let outside: IpAddr = "203.0.113.32".parse().unwrap();
        e.suspicious(outside, 100);
        assert!(e.suspicious(outside, 101).is_some());
        // IPv6 ranges other than the probed prefixes, and IPv4-mapped sources.
        let v6: IpAddr = "2001:db8:7700::".parse().unwrap();
        e.add(v6, Some(40), Kind::White, None, String::new(), 10);
        let inside: IpAddr = "2001:db8:77ff:1::9".parse().unwrap();
        for t in 0..5 {
            assert_eq!(e.suspicious(inside, 100 + t), None);
        }
        let mapped: IpAddr = "::ffff:203.0.113.20".parse().unwrap();
        assert!(e.whitelists(mapped));
        // Removal of exactly the block; restore keeps ranges.
        let restored = {
            let mut b = engine(1);
            b.restore(e.entries(), 20);
            b
        };
        assert!(restored.whitelists("203.0.113.17".parse().unwrap()));
        assert!(e.remove_source(Source::cidr(office, 28)).is_some());
        assert_eq!(e.white_ranges(), 1);
        assert!(!e.whitelists("203.0.113.17".parse().unwrap()));
    }

    #[test]
    fn manual_entries_and_conversion_to_whitelist() {
        let mut e = engine(1);
        let ip: IpAddr = "198.51.100.20".parse().unwrap();
        let (entry, changes) = e.add(ip, None, Kind::Black, None, "abuse".into(), 10);
        assert_eq!(entry.origin, Origin::Manual);
        assert_eq!(changes.len(), 1);
        assert!(e.is_blocked(ip, 1_000_000));
        let (w, changes) = e.make_white(ip, 20).unwrap();
        assert_eq!(w.kind, Kind::White);
        assert_eq!(changes, vec![Change::Unblock(e.source(ip))]);
        assert!(!e.is_blocked(ip, 30));
        assert!(e.remove(ip).is_some());
        assert!(e.remove(ip).is_none());
    }

    #[test]
    fn restore_skips_expired_entries() {
        let mut a = engine(1);
        let ip: IpAddr = "198.51.100.30".parse().unwrap();
        a.suspicious(ip, 100);
        a.suspicious(ip, 101);
        a.add(
            "198.51.100.31".parse().unwrap(),
            None,
            Kind::Black,
            Some(150),
            String::new(),
            100,
        );
        let mut b = engine(1);
        let changes = b.restore(a.entries(), 200);
        assert_eq!(changes.len(), 1);
        assert!(b.is_blocked(ip, 300));
        assert!(!b.is_blocked("198.51.100.31".parse().unwrap(), 200));
    }
}
