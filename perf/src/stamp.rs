//! The header every relayed test packet carries in its payload, and the per-stream record of
//! which sequence numbers arrived.
//!
//! The TURN generator and its peer run in one process and read one monotonic clock, so a
//! timestamp written by the sender is directly comparable with the receiver's clock: the
//! difference is the one-way latency through the relay (both kernels' loopback paths, the
//! server, and queueing in socket buffers). The client stamps the time it sends; the peer,
//! which echoes, stamps the time it echoes, so each direction is measured on its own.
//!
//! Layout (big endian): run nonce (4) | stream (4) | sequence (4) | reserved (4) |
//! client send time ns (8) | peer echo time ns (8); the rest of the payload is filler.

/// Bytes of the header; payloads are at least this long.
pub const STAMP_LEN: usize = 32;

/// The fields of a test packet's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub stream: u32,
    pub seq: u32,
    pub client_ns: u64,
    pub peer_ns: u64,
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Writes a fresh header (peer time zero) at the start of `buf`; false if it is too short.
pub fn write(buf: &mut [u8], nonce: u32, stream: u32, seq: u32, client_ns: u64) -> bool {
    let Some(h) = buf.get_mut(..STAMP_LEN) else {
        return false;
    };
    h[0..4].copy_from_slice(&nonce.to_be_bytes());
    h[4..8].copy_from_slice(&stream.to_be_bytes());
    h[8..12].copy_from_slice(&seq.to_be_bytes());
    h[12..16].fill(0);
    h[16..24].copy_from_slice(&client_ns.to_be_bytes());
    h[24..32].fill(0);
    true
}

/// Sets the peer's echo time in a header already in `buf`.
pub fn set_peer_time(buf: &mut [u8], peer_ns: u64) {
    if let Some(t) = buf.get_mut(24..32) {
        t.copy_from_slice(&peer_ns.to_be_bytes());
    }
}

/// The header at the start of `buf`, if it belongs to this run.
pub fn read(buf: &[u8], nonce: u32) -> Option<Stamp> {
    let h = buf.get(..STAMP_LEN)?;
    if be_u32(h, 0) != nonce {
        return None;
    }
    Some(Stamp {
        stream: be_u32(h, 4),
        seq: be_u32(h, 8),
        client_ns: be_u64(h, 16),
        peer_ns: be_u64(h, 24),
    })
}

/// Which sequence numbers of one stream arrived: counts, reordering and duplicates, in
/// constant space.
///
/// A packet older than the highest seen so far is reordered; a bitmap of the 64 numbers below
/// the highest tells a late first arrival from a duplicate (older than that, a packet is
/// counted as reordered without the duplicate check: at 50 packets/s that is over a second
/// late).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTrack {
    /// Highest sequence number seen plus one; 0 before the first packet.
    next: u32,
    /// Bit i: sequence number `next - 1 - i` has arrived.
    seen: u64,
    pub received: u64,
    pub reordered: u64,
    pub duplicates: u64,
}

impl SeqTrack {
    /// Records an arrival; returns false for a duplicate (not counted as received).
    pub fn record(&mut self, seq: u32) -> bool {
        if self.received == 0 && self.next == 0 || seq >= self.next {
            let shift = seq.wrapping_sub(self.next).wrapping_add(1);
            self.seen = if self.next == 0 && self.received == 0 || shift >= 64 {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.next = seq.wrapping_add(1);
            self.received += 1;
            return true;
        }
        let age = self.next - 1 - seq;
        if age < 64 {
            let bit = 1u64 << age;
            if self.seen & bit != 0 {
                self.duplicates += 1;
                return false;
            }
            self.seen |= bit;
        }
        self.received += 1;
        self.reordered += 1;
        true
    }

    /// Highest sequence number seen plus one (0 before the first packet).
    pub fn next_expected(&self) -> u32 {
        self.next
    }

    pub fn merge_counts(&mut self, o: &SeqTrack) {
        self.received += o.received;
        self.reordered += o.reordered;
        self.duplicates += o.duplicates;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip_and_foreign_runs() {
        let mut b = [0xAAu8; 172];
        assert!(write(&mut b, 0xDEAD_BEEF, 7, 42, 123_456_789));
        assert_eq!(
            read(&b, 0xDEAD_BEEF),
            Some(Stamp {
                stream: 7,
                seq: 42,
                client_ns: 123_456_789,
                peer_ns: 0
            })
        );
        set_peer_time(&mut b, 999);
        assert_eq!(read(&b, 0xDEAD_BEEF).unwrap().peer_ns, 999);
        assert_eq!(read(&b, 0xDEAD_BEEE), None, "other run");
        assert_eq!(read(&b[..31], 0xDEAD_BEEF), None, "too short");
        assert!(!write(&mut [0u8; 31], 1, 1, 1, 1));
    }

    #[test]
    fn in_order_stream() {
        let mut t = SeqTrack::default();
        for s in 0..1000 {
            assert!(t.record(s));
        }
        assert_eq!((t.received, t.reordered, t.duplicates), (1000, 0, 0));
        assert_eq!(t.next_expected(), 1000);
    }

    #[test]
    fn gaps_reordering_and_duplicates() {
        let mut t = SeqTrack::default();
        for s in [0, 1, 3, 4, 2, 2, 4, 10, 5, 200, 6] {
            t.record(s);
        }
        // 0 1 3 4 2(late) 2(dup) 4(dup) 10 5(late) 200 6(late, beyond the bitmap)
        assert_eq!(t.received, 9);
        assert_eq!(t.reordered, 3);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.next_expected(), 201);
    }

    #[test]
    fn first_packet_need_not_be_zero() {
        let mut t = SeqTrack::default();
        assert!(t.record(5));
        assert!(t.record(3), "late, not a duplicate");
        assert!(!t.record(5));
        assert_eq!((t.received, t.reordered, t.duplicates), (2, 1, 1));
    }
}
