//! The TURN allocation records the dataplane publishes for the control plane (API listing),
//! and the kill slots through which the control plane asks the dataplane to delete one.

#![deny(unsafe_code)]

use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::Segment;

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

pub(super) fn encode_addr(a: std::net::SocketAddr) -> [u64; 3] {
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

pub(super) fn decode_addr(w: [u64; 3]) -> std::net::SocketAddr {
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

impl Segment {
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
}

#[cfg(test)]
mod tests {
    use super::super::{test_name, SharedMemory};
    use super::*;

    #[test]
    fn allocation_records_round_trip_and_deletes_queue() {
        let name = test_name("alloc");
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
}
