//! Suspicious events per source over a sliding minute, in a table of fixed capacity.
//!
//! Each source keeps sixty one-second buckets, so "within the last minute" is exact to the
//! second whatever the threshold. When the table is full, a new source evicts the quietest
//! of eight sampled sources (fewest events in the window, then the longest idle) and inherits
//! its count, as in the Space-Saving algorithm, but kept apart from the events counted while
//! the source was tracked. Memory stays fixed under a flood of new sources; an offender
//! cannot shed its attempts by churning the table (its inherited count carries them), and the
//! engine blocks a source only when its own events make at least half the threshold, so the
//! inherited estimates alone never get a flood source blocked.

use std::collections::HashMap;

use super::Source;

const WINDOW: usize = 60;
const SAMPLES: usize = 8;

#[derive(Clone)]
struct Window {
    /// Events in each of the last 60 seconds; `buckets[sec % 60]`.
    buckets: [u16; WINDOW],
    /// The second of the newest bucket written.
    newest: u64,
    /// Position in `Counter::keys`.
    pos: usize,
    /// Count taken over from the evicted entry, and when: it stands for events this source
    /// may have had while it was not tracked, and leaves the window like a real event.
    inherited: u16,
    inherited_at: u64,
}

/// Events of a source in the last minute: its own, counted while tracked, and at most
/// `inherited` more it may have had before (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count {
    pub own: u32,
    pub inherited: u32,
}

impl Window {
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let gap = (now - self.newest).min(WINDOW as u64);
        for i in 1..=gap {
            self.buckets[((self.newest + i) % WINDOW as u64) as usize] = 0;
        }
        self.newest = now;
    }

    fn own(&self) -> u32 {
        self.buckets.iter().map(|b| u32::from(*b)).sum()
    }

    fn inherited(&self, now: u64) -> u32 {
        if now.saturating_sub(self.inherited_at) < WINDOW as u64 {
            u32::from(self.inherited)
        } else {
            0
        }
    }

    fn total(&self, now: u64) -> u32 {
        self.own() + self.inherited(now)
    }
}

pub struct Counter {
    capacity: usize,
    map: HashMap<Source, Window>,
    keys: Vec<Source>,
    rng: u64,
}

impl Counter {
    pub fn new(capacity: usize, seed: u64) -> Counter {
        Counter {
            capacity: capacity.max(1),
            map: HashMap::new(),
            keys: Vec::new(),
            rng: seed | 1,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn next(&mut self) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng as usize
    }

    /// Evicts a quiet source; returns its count in the window.
    fn evict_one(&mut self, now: u64) -> u32 {
        let mut victim: Option<(u32, u64, usize)> = None;
        for _ in 0..SAMPLES.min(self.keys.len()) {
            let pos = self.next() % self.keys.len();
            if let Some(w) = self.map.get_mut(&self.keys[pos]) {
                w.advance(now);
                let cand = (w.total(now), w.newest, pos);
                if victim.is_none_or(|v| (cand.0, cand.1) < (v.0, v.1)) {
                    victim = Some(cand);
                }
            }
        }
        match victim {
            Some((count, _, pos)) => {
                self.remove_at(pos);
                count
            }
            None => 0,
        }
    }

    fn remove_at(&mut self, pos: usize) {
        let key = self.keys.swap_remove(pos);
        self.map.remove(&key);
        if let Some(moved) = self.keys.get(pos) {
            if let Some(w) = self.map.get_mut(moved) {
                w.pos = pos;
            }
        }
    }

    pub fn forget(&mut self, source: &Source) {
        if let Some(pos) = self.map.get(source).map(|w| w.pos) {
            self.remove_at(pos);
        }
    }

    /// Counts one event at `now` (Unix seconds); returns the events in the last minute.
    pub fn hit(&mut self, source: Source, now: u64) -> Count {
        if !self.map.contains_key(&source) {
            let inherited = if self.map.len() >= self.capacity {
                self.evict_one(now)
            } else {
                0
            };
            let pos = self.keys.len();
            self.keys.push(source);
            self.map.insert(
                source,
                Window {
                    buckets: [0; WINDOW],
                    newest: now,
                    pos,
                    inherited: inherited.min(u32::from(u16::MAX)) as u16,
                    inherited_at: now,
                },
            );
        }
        match self.map.get_mut(&source) {
            Some(w) => {
                w.advance(now);
                let b = &mut w.buckets[(now % WINDOW as u64) as usize];
                *b = b.saturating_add(1);
                Count {
                    own: w.own(),
                    inherited: w.inherited(now),
                }
            }
            None => Count {
                own: 0,
                inherited: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn src(i: u32) -> Source {
        Source::of(IpAddr::V4(Ipv4Addr::from(i)), 64)
    }

    #[test]
    fn counts_within_a_sliding_minute() {
        let mut c = Counter::new(100, 1);
        assert_eq!(c.hit(src(1), 1000).own, 1);
        assert_eq!(c.hit(src(1), 1030).own, 2);
        assert_eq!(c.hit(src(1), 1059).own, 3);
        // The event at 1000 leaves the window at 1060.
        assert_eq!(c.hit(src(1), 1060).own, 3);
        assert_eq!(c.hit(src(1), 1200).own, 1);
        assert_eq!(c.hit(src(2), 1200).own, 1);
    }

    #[test]
    fn capacity_holds_under_a_flood_and_keeps_busy_sources() {
        let mut c = Counter::new(1000, 7);
        for _ in 0..50 {
            c.hit(src(1), 5000);
        }
        for i in 0..200_000u32 {
            c.hit(src(10 + i), 5000 + u64::from(i / 25_000));
            assert!(c.len() <= 1000);
        }
        assert_eq!(c.len(), 1000);
        let n = c.hit(src(1), 5009);
        // Evicted or not, its count errs only upwards.
        assert!(n.own + n.inherited > 50, "the busy source lost its count");
    }
}
