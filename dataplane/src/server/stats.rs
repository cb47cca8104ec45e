//! A worker's counters as plain integers.
//!
//! The protocol core counts here with ordinary additions: nothing on the packet path touches
//! memory shared with another process, and a core runs without a shared-memory segment at all
//! (the tests and the fuzz targets have none). The driver hands the counts over to the
//! worker's block in shared memory with [`Stats::drain`], at the latest once per loop turn;
//! a drain costs in proportion to the counters that changed, not to all of them.

use portico_shared::counters::Counter;

const SLOTS: usize = Counter::ALL.len();
const _: () = assert!(SLOTS <= 128, "one dirty bit per counter");

/// One `u64` per [`Counter`], in the same order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    slots: [u64; SLOTS],
    /// Bit `c` set: slot `c` changed since the last drain.
    dirty: u128,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            slots: [0; SLOTS],
            dirty: 0,
        }
    }
}

impl Stats {
    #[inline]
    pub fn incr(&mut self, c: Counter) {
        self.add(c, 1);
    }

    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        let s = &mut self.slots[c as usize];
        *s = s.wrapping_add(n);
        self.dirty |= 1 << c as usize;
    }

    /// For gauges. A worker may remove what it added before its last drain, so a count may
    /// wrap below zero; the wrapping sum over all workers is what is meaningful.
    #[inline]
    pub fn sub(&mut self, c: Counter, n: u64) {
        let s = &mut self.slots[c as usize];
        *s = s.wrapping_sub(n);
        self.dirty |= 1 << c as usize;
    }

    /// What was counted since the last [`Stats::drain`] (since creation, if never drained).
    pub fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize]
    }

    /// Hands every count that changed since the last drain to `f`, as a wrapping delta, and
    /// starts again from zero.
    pub fn drain(&mut self, mut f: impl FnMut(Counter, u64)) {
        let mut dirty = std::mem::take(&mut self.dirty);
        while dirty != 0 {
            let i = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            if let (Some(c), Some(s)) = (Counter::ALL.get(i), self.slots.get_mut(i)) {
                // A gauge raised and lowered by as much is unchanged: nothing to hand over.
                if *s != 0 {
                    f(*c, *s);
                    *s = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_hands_over_each_change_once_and_gauges_wrap_back() {
        let mut s = Stats::default();
        s.incr(Counter::RxPackets);
        s.add(Counter::RxBytes, 100);
        s.add(Counter::TurnAllocationsActive, 1);
        let mut total = [0u64; SLOTS];
        let mut seen = Vec::new();
        s.drain(|c, n| {
            seen.push((c, n));
            total[c as usize] = total[c as usize].wrapping_add(n);
        });
        assert_eq!(
            seen,
            [
                (Counter::RxPackets, 1),
                (Counter::RxBytes, 100),
                (Counter::TurnAllocationsActive, 1)
            ]
        );
        // Nothing new: nothing handed over; nor for a gauge that went up and down again.
        s.drain(|c, _| panic!("{c:?} drained twice"));
        s.add(Counter::TurnChannelsActive, 2);
        s.sub(Counter::TurnChannelsActive, 2);
        s.drain(|c, _| panic!("{c:?} did not change"));
        // The allocation ends after the drain: the gauge delta is -1, and the sum is back at 0.
        s.sub(Counter::TurnAllocationsActive, 1);
        s.drain(|c, n| total[c as usize] = total[c as usize].wrapping_add(n));
        assert_eq!(total[Counter::TurnAllocationsActive as usize], 0);
        assert_eq!(total[Counter::RxBytes as usize], 100);
        assert_eq!(s, Stats::default());
    }
}
