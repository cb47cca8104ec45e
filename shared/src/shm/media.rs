//! Media relay sessions between the control plane and the dataplane: one [`MediaRecord`] per
//! session, which is at once the control plane's request and the dataplane's published
//! session with its counters.
//!
//! A record moves through states, each change made by one side only:
//!
//! * `FREE` → `CLAIMED` (control plane, compare-and-swap, so concurrent API calls never
//!   share a record) → `REQUESTED` once the id, the target worker, the label and the legs'
//!   signalled addresses are written; the control plane then bumps [`Segment::media_pending`].
//! * `REQUESTED` → `TAKEN` (the target worker, compare-and-swap, when it takes the request up;
//!   until then the control plane may withdraw it, `REQUESTED` → `FREE`) → `ACTIVE` (after
//!   binding the leg sockets; it writes their ports first) or → `FAILED` with an error code (no
//!   free port pair, a leg address the peer policy refuses); the control plane reads the code
//!   and frees the record.
//! * `ACTIVE` → `DELETING` (control plane) → `FREE` (the owning worker, after closing the
//!   sockets); an idle session goes `ACTIVE` → `FREE` by the worker alone.
//!
//! Latched addresses and counters are written by the owning worker under the record's
//! sequence lock, like an allocation record.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::records::{decode_addr, encode_addr};
use super::{Segment, MEDIA_RECORDS};

pub const FREE: u64 = 0;
pub const CLAIMED: u64 = 1;
pub const REQUESTED: u64 = 2;
pub const ACTIVE: u64 = 3;
pub const DELETING: u64 = 4;
pub const FAILED: u64 = 5;
pub const TAKEN: u64 = 6;

/// Why the dataplane could not create a session (the code of a `FAILED` record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaFailure {
    /// No free RTP/RTCP port pair in `media.ports`.
    NoPorts = 1,
    /// Leg 0's signalled address is refused by the peer policy.
    Leg0Denied = 2,
    /// Leg 1's signalled address is refused by the peer policy.
    Leg1Denied = 3,
    /// No relay address of the family a leg needs.
    NoRelayAddress = 4,
    /// The worker already holds `media.max_sessions` sessions.
    Full = 5,
}

impl MediaFailure {
    pub fn from_u64(v: u64) -> Option<MediaFailure> {
        Some(match v {
            1 => MediaFailure::NoPorts,
            2 => MediaFailure::Leg0Denied,
            3 => MediaFailure::Leg1Denied,
            4 => MediaFailure::NoRelayAddress,
            5 => MediaFailure::Full,
            _ => return None,
        })
    }
}

/// One leg of a record.
#[repr(C)]
pub struct MediaLegRecord {
    /// Signalled address (family 0: none).
    address: [AtomicU64; 3],
    /// The RTP socket's local address (RTCP is the next port).
    local: [AtomicU64; 3],
    latched: [AtomicU64; 3],
    counters: [AtomicU64; 5],
    /// SRTP: byte 0 the suite (0 none, 1 AES_CM_128_HMAC_SHA1_80), bytes 1..31 master key and
    /// salt. The worker zeroes the key when it takes the request up; the suite stays.
    srtp: [AtomicU64; 4],
}

/// The SRTP suite code of AES_CM_128_HMAC_SHA1_80 in a record.
pub const SRTP_AES_CM_128_HMAC_SHA1_80: u8 = 1;
/// Master key (16 bytes) and master salt (14 bytes) of a leg.
pub type SrtpMaster = [u8; 30];

fn store_srtp(slots: &[AtomicU64; 4], m: Option<&SrtpMaster>) {
    let mut b = [0u8; 32];
    if let Some(m) = m {
        b[0] = SRTP_AES_CM_128_HMAC_SHA1_80;
        b[1..31].copy_from_slice(m);
    }
    for (i, s) in slots.iter().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        s.store(u64::from_le_bytes(w), Ordering::Relaxed);
    }
}

fn load_srtp(slots: &[AtomicU64; 4]) -> Option<SrtpMaster> {
    let mut b = [0u8; 32];
    for (i, s) in slots.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&s.load(Ordering::Relaxed).to_le_bytes());
    }
    (b[0] == SRTP_AES_CM_128_HMAC_SHA1_80).then(|| {
        let mut m = [0u8; 30];
        m.copy_from_slice(&b[1..31]);
        m
    })
}

/// Keeps the suite byte, zeroes the key.
fn forget_srtp_key(slots: &[AtomicU64; 4]) {
    let suite = slots[0].load(Ordering::Relaxed) & 0xff;
    slots[0].store(suite, Ordering::Relaxed);
    for s in &slots[1..] {
        s.store(0, Ordering::Relaxed);
    }
}

#[repr(C, align(64))]
pub struct MediaRecord {
    state: AtomicU64,
    seq: AtomicU64,
    id: AtomicU64,
    worker: AtomicU64,
    error: AtomicU64,
    created_unix: AtomicU64,
    label: [AtomicU64; 4],
    legs: [MediaLegRecord; 2],
}

/// Per-leg counters as the dataplane publishes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LegCounters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets from a source other than the latched one, after the learn window.
    pub foreign_dropped: u64,
}

/// A copy of one leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegInfo {
    pub local: Option<SocketAddr>,
    pub address: Option<SocketAddr>,
    pub latched: Option<SocketAddr>,
    pub counters: LegCounters,
    /// The leg checks SRTP authentication before learning (the key itself is never copied).
    pub srtp: bool,
}

/// A copy of a session record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaInfo {
    pub index: usize,
    pub state: u64,
    pub id: u64,
    pub worker: u64,
    pub error: u64,
    pub created_unix: u64,
    pub label: String,
    pub legs: [LegInfo; 2],
}

/// What a worker needs to create the session of a `REQUESTED` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaRequest {
    pub index: usize,
    pub id: u64,
    pub addresses: [Option<SocketAddr>; 2],
    /// Per leg: SRTP master key and salt to authenticate a new source with.
    pub srtp: [Option<SrtpMaster>; 2],
}

fn store_addr(slots: &[AtomicU64; 3], a: Option<SocketAddr>) {
    let w = a.map(encode_addr).unwrap_or([0; 3]);
    for (s, v) in slots.iter().zip(w) {
        s.store(v, Ordering::Relaxed);
    }
}

fn load_addr(slots: &[AtomicU64; 3]) -> Option<SocketAddr> {
    let w = [
        slots[0].load(Ordering::Relaxed),
        slots[1].load(Ordering::Relaxed),
        slots[2].load(Ordering::Relaxed),
    ];
    (w[2] & 0xff != 0).then(|| decode_addr(w))
}

impl MediaRecord {
    pub fn state(&self) -> u64 {
        self.state.load(Ordering::Acquire)
    }

    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    pub fn worker(&self) -> u64 {
        self.worker.load(Ordering::Relaxed)
    }

    fn write_begin(&self) -> u64 {
        let seq = self.seq.load(Ordering::Relaxed) & !1;
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        seq
    }

    fn write_end(&self, seq: u64) {
        self.seq.store(seq + 2, Ordering::Release);
    }

    /// Takes up the request of a `REQUESTED` record (its target worker): `None` when it is
    /// not (or no longer) requested, for instance withdrawn by a control plane that gave up.
    pub fn take(&self, index: usize) -> Option<MediaRequest> {
        self.state
            .compare_exchange(REQUESTED, TAKEN, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        let srtp = [load_srtp(&self.legs[0].srtp), load_srtp(&self.legs[1].srtp)];
        let seq = self.write_begin();
        for leg in &self.legs {
            forget_srtp_key(&leg.srtp);
        }
        self.write_end(seq);
        Some(MediaRequest {
            index,
            id: self.id(),
            addresses: [
                load_addr(&self.legs[0].address),
                load_addr(&self.legs[1].address),
            ],
            srtp,
        })
    }

    /// Publishes a created session's local addresses and makes it `ACTIVE` (owning worker).
    pub fn activate(&self, locals: [SocketAddr; 2]) {
        let seq = self.write_begin();
        for (leg, local) in self.legs.iter().zip(locals) {
            store_addr(&leg.local, Some(local));
            store_addr(&leg.latched, None);
            for c in &leg.counters {
                c.store(0, Ordering::Relaxed);
            }
        }
        self.write_end(seq);
        self.state.store(ACTIVE, Ordering::Release);
    }

    /// Refuses a request (owning worker); the control plane frees the record.
    pub fn fail(&self, why: MediaFailure) {
        self.error.store(why as u64, Ordering::Relaxed);
        self.state.store(FAILED, Ordering::Release);
    }

    /// Publishes latched sources and counters (owning worker).
    pub fn publish(&self, legs: [(Option<SocketAddr>, LegCounters); 2]) {
        let seq = self.write_begin();
        for (leg, (latched, c)) in self.legs.iter().zip(legs) {
            store_addr(&leg.latched, latched);
            for (slot, v) in leg.counters.iter().zip([
                c.packets_in,
                c.bytes_in,
                c.packets_out,
                c.bytes_out,
                c.foreign_dropped,
            ]) {
                slot.store(v, Ordering::Relaxed);
            }
        }
        self.write_end(seq);
    }

    /// Frees the record (owning worker after a delete or an idle expiry; control plane after
    /// reading a failure or giving up on a request).
    pub fn free(&self) {
        for leg in &self.legs {
            store_srtp(&leg.srtp, None);
        }
        self.state.store(FREE, Ordering::Release);
    }

    /// Whether a delete was asked (owning worker).
    pub fn deleting(&self) -> bool {
        self.state() == DELETING
    }

    /// A consistent copy, or `None` for a free or claimed record.
    pub fn read(&self, index: usize) -> Option<MediaInfo> {
        for _ in 0..1000 {
            let state = self.state();
            if state == FREE || state == CLAIMED {
                return None;
            }
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let mut label = Vec::with_capacity(32);
            for w in &self.label {
                label.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            while label.last() == Some(&0) {
                label.pop();
            }
            let leg = |l: &MediaLegRecord| {
                let c: Vec<u64> = l
                    .counters
                    .iter()
                    .map(|x| x.load(Ordering::Relaxed))
                    .collect();
                LegInfo {
                    local: load_addr(&l.local),
                    address: load_addr(&l.address),
                    latched: load_addr(&l.latched),
                    srtp: l.srtp[0].load(Ordering::Relaxed) & 0xff != 0,
                    counters: LegCounters {
                        packets_in: c[0],
                        bytes_in: c[1],
                        packets_out: c[2],
                        bytes_out: c[3],
                        foreign_dropped: c[4],
                    },
                }
            };
            let info = MediaInfo {
                index,
                state,
                id: self.id(),
                worker: self.worker(),
                error: self.error.load(Ordering::Relaxed),
                created_unix: self.created_unix.load(Ordering::Relaxed),
                label: String::from_utf8_lossy(&label).into_owned(),
                legs: [leg(&self.legs[0]), leg(&self.legs[1])],
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != s1 || self.state() != state {
                continue;
            }
            return Some(info);
        }
        None
    }
}

impl Segment {
    pub fn media_record(&self, i: usize) -> Option<&MediaRecord> {
        self.media.get(i)
    }

    /// Bumped by the control plane after every request or delete it writes; a worker scans
    /// the records only when it moved.
    pub fn media_pending(&self) -> u64 {
        self.media_pending.load(Ordering::Acquire)
    }

    /// Claims a free record for a new session and queues it for `worker`; returns the
    /// record's index, or `None` when every record is taken. `id` must not be 0.
    pub fn media_request(
        &self,
        id: u64,
        worker: u64,
        created_unix: u64,
        label: &str,
        addresses: [Option<SocketAddr>; 2],
        srtp: [Option<SrtpMaster>; 2],
    ) -> Option<usize> {
        let index = self.media.iter().position(|r| {
            r.state
                .compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let r = &self.media[index];
        let seq = r.write_begin();
        r.id.store(id, Ordering::Relaxed);
        r.worker.store(worker, Ordering::Relaxed);
        r.error.store(0, Ordering::Relaxed);
        r.created_unix.store(created_unix, Ordering::Relaxed);
        let bytes = label.as_bytes();
        for (i, slot) in r.label.iter().enumerate() {
            let mut w = [0u8; 8];
            if let Some(chunk) = bytes.get(i * 8..) {
                let n = chunk.len().min(8);
                w[..n].copy_from_slice(&chunk[..n]);
            }
            slot.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        for ((leg, a), k) in r.legs.iter().zip(addresses).zip(&srtp) {
            store_addr(&leg.address, a);
            store_srtp(&leg.srtp, k.as_ref());
            store_addr(&leg.local, None);
            store_addr(&leg.latched, None);
            for c in &leg.counters {
                c.store(0, Ordering::Relaxed);
            }
        }
        r.write_end(seq);
        r.state.store(REQUESTED, Ordering::Release);
        self.media_pending.fetch_add(1, Ordering::AcqRel);
        Some(index)
    }

    /// Asks the owning worker to delete session `id` at record `index`; false when the record
    /// no longer holds that active session.
    pub fn media_delete(&self, index: usize, id: u64) -> bool {
        let Some(r) = self.media.get(index) else {
            return false;
        };
        if r.id() != id {
            return false;
        }
        let ok = r
            .state
            .compare_exchange(ACTIVE, DELETING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if ok {
            self.media_pending.fetch_add(1, Ordering::AcqRel);
        }
        ok
    }

    /// Withdraws a request no worker took up (the dataplane is down): true when it was
    /// still only requested, and the record is free again.
    pub fn media_withdraw(&self, index: usize) -> bool {
        self.media.get(index).is_some_and(|r| {
            let ok = r
                .state
                .compare_exchange(REQUESTED, FREE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
            if ok {
                for leg in &r.legs {
                    store_srtp(&leg.srtp, None);
                }
            }
            ok
        })
    }

    /// Every record in use, with its state.
    pub fn media_sessions(&self) -> Vec<MediaInfo> {
        self.media
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.read(i))
            .collect()
    }

    /// Records not free (sessions active, requested or being deleted).
    pub fn media_in_use(&self) -> usize {
        self.media.iter().filter(|r| r.state() != FREE).count()
    }

    /// The records a worker owns: (index, record), for its scans.
    pub fn media_records(&self) -> impl Iterator<Item = (usize, &MediaRecord)> {
        self.media.iter().enumerate()
    }
}

const _: () = assert!(MEDIA_RECORDS <= 1 << 16);

#[cfg(test)]
mod tests {
    use super::super::{test_name, SharedMemory};
    use super::*;

    #[test]
    fn a_media_session_request_is_taken_up_published_and_deleted() {
        let name = test_name("media");
        let cp = SharedMemory::create(&name).unwrap();
        let dp = SharedMemory::attach(&name).unwrap();
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let p0 = cp.segment().media_pending();
        let i = cp
            .segment()
            .media_request(77, 1, 5, "call-1", [Some(a), None], [None, Some([7; 30])])
            .unwrap();
        assert!(dp.segment().media_pending() > p0);
        let req = dp.segment().media_record(i).unwrap().take(i).unwrap();
        assert!(
            !cp.segment().media_withdraw(i),
            "taken up: no longer withdrawn"
        );
        assert!(dp.segment().media_record(i).unwrap().take(i).is_none());
        assert_eq!(req.addresses, [Some(a), None]);
        assert_eq!(req.id, 77);
        assert_eq!(req.srtp, [None, Some([7; 30])]);
        let l0: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let l1: SocketAddr = "[::1]:40002".parse().unwrap();
        let r = dp.segment().media_record(i).unwrap();
        r.activate([l0, l1]);
        let c = LegCounters {
            packets_in: 3,
            bytes_in: 516,
            packets_out: 2,
            bytes_out: 344,
            foreign_dropped: 1,
        };
        r.publish([(Some(a), c), (None, LegCounters::default())]);
        let got = cp.segment().media_sessions();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].label, "call-1");
        assert_eq!(got[0].legs[0].local, Some(l0));
        assert_eq!(got[0].legs[1].local, Some(l1));
        assert_eq!(got[0].legs[0].latched, Some(a));
        assert_eq!(got[0].legs[0].counters, c);
        assert_eq!(got[0].legs[1].address, None);
        assert_eq!((got[0].legs[0].srtp, got[0].legs[1].srtp), (false, true));
        assert_eq!(
            load_srtp(&r.legs[1].srtp),
            Some([0; 30]),
            "the key is gone from the record once taken up"
        );
        assert!(!cp.segment().media_delete(i, 78));
        assert!(cp.segment().media_delete(i, 77));
        assert!(r.deleting());
        r.free();
        assert!(cp.segment().media_sessions().is_empty());
        assert_eq!(cp.segment().media_in_use(), 0);
        // A request nobody took up can be withdrawn.
        let j = cp
            .segment()
            .media_request(78, 0, 5, "", [None, None], [None, None])
            .unwrap();
        assert!(cp.segment().media_withdraw(j));
        assert_eq!(cp.segment().media_in_use(), 0);
        SharedMemory::unlink(&name);
    }
}
