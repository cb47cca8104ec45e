//! One [`WorkerCounters`] block per dataplane thread: each block has exactly one writer (its
//! worker), so increments are a plain load and store without a locked instruction, and the
//! control plane reads them without ever stopping the dataplane. The counter names are in
//! [`crate::counters`].

#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Segment, COUNTER_BLOCKS};
use crate::counters::{Counter, COUNTER_SLOTS};

#[repr(C, align(64))]
pub struct WorkerCounters {
    slots: [AtomicU64; COUNTER_SLOTS],
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
}

#[cfg(test)]
mod tests {
    use super::super::{test_name, SharedMemory};
    use super::*;

    #[test]
    fn counters_are_visible_across_mappings() {
        let name = test_name("ctr");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        a.segment().counters(3).add(Counter::RxPackets, 5);
        a.segment().counters(0).incr(Counter::RxPackets);
        assert_eq!(b.segment().counters(3).get(Counter::RxPackets), 5);
        assert_eq!(b.segment().total(Counter::RxPackets), 6);
        SharedMemory::unlink(&name);
    }
}
