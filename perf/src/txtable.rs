//! Outstanding transactions of one socket, in a fixed ring indexed by sequence number.
//!
//! A generator numbers the requests of each socket 0, 1, 2, ... and puts that number in the
//! transaction id, so a response finds its send time with one masked index and a compare,
//! and nothing is allocated per request. Requests are sent in sequence order, so the oldest
//! one that may still be outstanding is always at the tail: timeouts are found by walking
//! the tail forward, not by scanning the table.
//!
//! The ring has a fixed capacity. A request still unanswered when its slot comes round
//! again (`capacity` sends later) is given up as lost at that moment; generators size the
//! ring so that this happens only to requests that are long overdue anyway.

#[derive(Clone, Copy, Default)]
struct Slot {
    seq: u32,
    live: bool,
    sent_ns: u64,
}

pub struct TxTable {
    slots: Box<[Slot]>,
    mask: u32,
    /// Next sequence number to send.
    head: u32,
    /// Oldest sequence number that may still be live.
    tail: u32,
    outstanding: usize,
}

impl TxTable {
    /// A ring of at least `capacity` slots (rounded up to a power of two, at most 2^24).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.clamp(1, 1 << 24).next_power_of_two();
        TxTable {
            slots: vec![Slot::default(); cap].into_boxed_slice(),
            mask: (cap - 1) as u32,
            head: 0,
            tail: 0,
            outstanding: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Requests sent and neither answered nor given up.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The sequence number the next [`TxTable::push`] will use.
    pub fn next_seq(&self) -> u32 {
        self.head
    }

    /// Records that request `next_seq()` left at `now_ns`. Returns true if a transaction
    /// still outstanding in the reused slot was given up (count it as lost).
    pub fn push(&mut self, now_ns: u64) -> bool {
        let seq = self.head;
        let slot = &mut self.slots[(seq & self.mask) as usize];
        let evicted = slot.live;
        if evicted {
            self.outstanding -= 1;
        }
        *slot = Slot {
            seq,
            live: true,
            sent_ns: now_ns,
        };
        self.outstanding += 1;
        self.head = seq.wrapping_add(1);
        // Keep the tail within one ring of the head, so it never points at a slot that
        // has been reused for a newer sequence number.
        let lag = self.head.wrapping_sub(self.tail);
        if lag > self.mask + 1 {
            self.tail = self.head.wrapping_sub(self.mask + 1);
        }
        evicted
    }

    /// Ends transaction `seq`: its send time, or `None` if it is not outstanding (answered
    /// already, given up, never sent, or evicted).
    pub fn complete(&mut self, seq: u32) -> Option<u64> {
        let slot = &mut self.slots[(seq & self.mask) as usize];
        if !slot.live || slot.seq != seq {
            return None;
        }
        slot.live = false;
        self.outstanding -= 1;
        Some(slot.sent_ns)
    }

    /// Gives up every transaction sent before `cutoff_ns`; returns how many.
    pub fn expire(&mut self, cutoff_ns: u64) -> u64 {
        let mut expired = 0;
        while self.tail != self.head {
            let slot = &mut self.slots[(self.tail & self.mask) as usize];
            if slot.live && slot.seq == self.tail {
                if slot.sent_ns >= cutoff_ns {
                    break;
                }
                slot.live = false;
                self.outstanding -= 1;
                expired += 1;
            }
            self.tail = self.tail.wrapping_add(1);
        }
        expired
    }

    /// Gives up everything still outstanding (the end of a run); returns how many.
    pub fn abandon(&mut self) -> u64 {
        self.expire(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_responses_once() {
        let mut t = TxTable::new(8);
        assert_eq!(t.next_seq(), 0);
        assert!(!t.push(100));
        assert!(!t.push(200));
        assert_eq!(t.outstanding(), 2);
        assert_eq!(t.complete(1), Some(200));
        assert_eq!(t.complete(1), None, "a duplicate response does not match");
        assert_eq!(t.complete(5), None, "never sent");
        assert_eq!(t.complete(0), Some(100));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn expires_oldest_first_and_stops_at_the_first_young_one() {
        let mut t = TxTable::new(16);
        for ns in [10, 20, 30, 40] {
            t.push(ns);
        }
        assert_eq!(t.complete(1), Some(20));
        assert_eq!(t.expire(35), 2, "seq 0 and 2; seq 1 was answered");
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.complete(0), None, "expired transactions no longer match");
        assert_eq!(t.complete(3), Some(40));
        assert_eq!(t.abandon(), 0);
    }

    #[test]
    fn a_reused_slot_gives_up_the_old_transaction() {
        let mut t = TxTable::new(4);
        assert_eq!(t.capacity(), 4);
        for ns in 0..4 {
            assert!(!t.push(ns));
        }
        assert!(t.push(4), "slot of seq 0 reused while it was outstanding");
        assert_eq!(t.outstanding(), 4);
        assert_eq!(t.complete(0), None);
        assert_eq!(t.complete(4), Some(4));
        assert_eq!(t.abandon(), 3);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut t = TxTable::new(4);
        t.head = u32::MAX - 1;
        t.tail = t.head;
        t.push(1);
        t.push(2);
        t.push(3);
        assert_eq!(t.next_seq(), 1);
        assert_eq!(t.complete(u32::MAX), Some(2));
        assert_eq!(t.complete(0), Some(3));
        assert_eq!(t.expire(10), 1);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn capacity_is_a_power_of_two() {
        assert_eq!(TxTable::new(0).capacity(), 1);
        assert_eq!(TxTable::new(100).capacity(), 128);
    }
}
