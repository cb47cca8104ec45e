//! The suspicious-event rings (one per counter block: a worker or the TCP thread) through
//! which the dataplane reports events to the control plane's fraud engine, and the futex
//! doorbell that wakes the engine when one arrives.

#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use super::blacklist::{ip_key, META_EXPIRY};
use super::{futex, Segment, COUNTER_BLOCKS, EVENT_SLOTS};

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
    /// RTP/RTCP to a latched media leg from another source after the learn window (a
    /// hijack or injection attempt, RTP bleed).
    MediaForeignSource = 4,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::AuthFailure),
            2 => Some(EventKind::PeerDenied),
            3 => Some(EventKind::RateExceeded),
            4 => Some(EventKind::MediaForeignSource),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::AuthFailure => "turn_auth_failure",
            EventKind::PeerDenied => "turn_peer_denied",
            EventKind::RateExceeded => "stun_rate_exceeded",
            EventKind::MediaForeignSource => "media_foreign_source",
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

impl Segment {
    /// The event ring of a counter block (worker index, or `MAX_WORKERS` for the TCP thread).
    pub fn events(&self, block: usize) -> &EventRing {
        &self.events[block.min(COUNTER_BLOCKS - 1)]
    }

    /// Events the dataplane dropped because a ring was full.
    pub fn events_dropped(&self) -> u64 {
        self.events.iter().map(|r| r.dropped()).sum()
    }

    /// Producer side, after pushing events: wakes the control plane's event reader when it
    /// sleeps (or is about to). Costs a system call only for the first event after the reader
    /// armed the doorbell; further events before it reads find the bell rung already.
    pub fn ring_events_doorbell(&self) {
        let word = &self.header.events_doorbell;
        if word.swap(1, Ordering::SeqCst) == 0 {
            futex::wake(word);
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
        futex::wait(&self.header.events_doorbell, 0, timeout);
    }

    /// Drains every ring.
    pub fn drain_events(&self, mut f: impl FnMut(Event)) {
        for r in &self.events {
            r.drain(&mut f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{test_name, SharedMemory};
    use super::*;

    #[test]
    fn the_events_doorbell_wakes_a_sleeping_reader() {
        let name = test_name("bell");
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
        let name = test_name("ev");
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
}
