//! Drivers: the thin shells that move datagrams between sockets and the sans-IO [`Server`].
//!
//! * [`uring`]: one io_uring per worker, multishot `recvmsg` into a provided-buffer ring, the
//!   reply sent from the buffer it arrived in, all submissions of a loop turn in one syscall.
//! * [`epoll`]: the same loop on mio (epoll), for kernels or sandboxes that forbid io_uring.
//! * [`tcp`]: STUN over TCP (RFC 8489 framing) on the same addresses, for both drivers.
//!
//! Both packet drivers call [`Server::handle`] the same way, so every protocol test covers
//! both.

pub mod bufring;
pub mod epoll;
pub mod relay;
pub mod sockaddr;
pub mod sockopt;
pub mod tcp;
pub mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portico_shared::shm::SharedMemory;
use socket2::{Domain, Protocol, Socket, Type};

use crate::server::Now;
use crate::server::{Server, Settings};
use crate::turn::allocation::Allocation;
use crate::turn::{AllocationSink, TurnShared};
use portico_shared::shm::{AllocInfo, Event, EventKind, ALLOC_RECORDS, MAX_WORKERS};
use std::collections::HashMap;

/// How long a driver may sleep before it looks at the stop flag and the configuration.
pub const TICK: Duration = Duration::from_millis(100);

/// Largest datagram a worker accepts; larger ones are dropped as truncated. RTP and TURN
/// traffic stays under the path MTU, so 2 KiB per buffer keeps the pool small.
pub const BUF_SIZE: usize = 2048;

/// State every thread of the dataplane shares.
pub struct Shared {
    pub shm: SharedMemory,
    pub stop: AtomicBool,
    /// Bumped when `settings` changes; a worker compares it once per loop turn.
    pub settings_generation: AtomicU64,
    pub settings: Mutex<Arc<Settings>>,
    /// Quotas and reservations common to all workers.
    pub turn: Arc<TurnShared>,
    /// Keys the stateless TURN nonces; drawn once per process so nonces survive reloads.
    pub secret: [u8; 32],
    /// Worker threads started (they split the allocation records).
    pub workers: usize,
}

impl Shared {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn current_settings(&self) -> Arc<Settings> {
        match self.settings.lock() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// A protocol core for worker `index` (or the TCP thread, whose index is past the
    /// workers').
    pub fn new_server(self: &Arc<Self>, index: usize) -> Server {
        let seed = u64::from_le_bytes([
            self.secret[0],
            self.secret[1],
            self.secret[2],
            self.secret[3],
            self.secret[4],
            self.secret[5],
            self.secret[6],
            self.secret[7],
        ]) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // Workers split the allocation records; the TCP thread (index MAX_WORKERS) has no
        // allocations but reports events and honours the blacklist like the workers.
        let records = if index < MAX_WORKERS && self.workers > 0 {
            let per = ALLOC_RECORDS / self.workers;
            (index * per..(index + 1) * per).rev().collect()
        } else {
            Vec::new()
        };
        let sink: Box<dyn AllocationSink> = Box::new(ShmSink {
            events: index,
            shared: Arc::clone(self),
            records,
            by_id: HashMap::new(),
        });
        Server::new(self.current_settings(), Arc::clone(&self.turn), seed, sink)
    }

    pub fn publish_settings(&self, s: Settings) {
        let s = Arc::new(s);
        match self.settings.lock() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
        self.settings_generation.fetch_add(1, Ordering::Release);
    }
}

/// Publishes a worker's allocations into its share of the shared-memory records.
struct ShmSink {
    /// Index of this worker's event ring.
    events: usize,
    shared: Arc<Shared>,
    /// Free record indices of this worker.
    records: Vec<usize>,
    by_id: HashMap<u64, usize>,
}

impl AllocationSink for ShmSink {
    fn publish(&mut self, a: &Allocation, now: Now) {
        let idx = match self.by_id.get(&a.id) {
            Some(i) => *i,
            None => match self.records.pop() {
                Some(i) => {
                    self.by_id.insert(a.id, i);
                    i
                }
                // More allocations than records: the rest are served but not listed.
                None => return,
            },
        };
        let age = now.mono.saturating_duration_since(a.created).as_secs();
        let left = a.expires.saturating_duration_since(now.mono).as_secs();
        if let Some(r) = self.shared.shm.segment().record(idx) {
            r.publish(&AllocInfo {
                id: a.id,
                client: a.client,
                relay: a.relay_public,
                created_unix: now.unix.saturating_sub(age),
                expires_unix: now.unix + left,
                permissions: a.permissions.len() as u32,
                channels: a.channels.len() as u32,
                packets_to_peer: a.traffic.packets_to_peer,
                bytes_to_peer: a.traffic.bytes_to_peer,
                packets_to_client: a.traffic.packets_to_client,
                bytes_to_client: a.traffic.bytes_to_client,
                username: a.username.chars().take(64).collect(),
            });
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(idx) = self.by_id.remove(&id) {
            if let Some(r) = self.shared.shm.segment().record(idx) {
                r.clear();
            }
            self.records.push(idx);
        }
    }

    fn deletes(&mut self, out: &mut Vec<u64>) {
        out.extend(self.shared.shm.segment().pending_deletes());
    }

    fn deleted(&mut self, id: u64) {
        self.shared.shm.segment().done_delete(id);
    }

    fn blocked(&self, ip: std::net::IpAddr, unix: u64) -> bool {
        self.shared.shm.segment().blacklist.is_blocked(ip, unix)
    }

    fn blacklist_generation(&self) -> u64 {
        self.shared.shm.segment().blacklist.generation()
    }

    fn report(&mut self, kind: EventKind, ip: std::net::IpAddr, unix: u64) {
        let seg = self.shared.shm.segment();
        if seg.events(self.events).push(Event { kind, ip, unix }) {
            // The fraud engine decides on the next event at once instead of at its next poll:
            // a brute force is cut within a handful of attempts.
            seg.ring_events_doorbell();
        }
    }
}

/// A worker's view of configuration changes: one relaxed load per loop turn, and a lock only
/// when the generation moved.
pub struct SettingsWatch {
    seen: u64,
}

impl SettingsWatch {
    pub fn new(shared: &Shared) -> SettingsWatch {
        SettingsWatch {
            seen: shared.settings_generation.load(Ordering::Acquire),
        }
    }

    pub fn refresh(&mut self, shared: &Shared, server: &mut Server) {
        let g = shared.settings_generation.load(Ordering::Acquire);
        if g != self.seen {
            self.seen = g;
            server.set_settings(shared.current_settings());
        }
    }
}

/// A UDP socket of one worker: `SO_REUSEPORT` so every worker binds the same address and the
/// kernel spreads flows over them; IPv6 sockets are v6-only so `0.0.0.0` and `[::]` coexist.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // Best effort: a larger receive queue absorbs bursts while a worker is busy.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Binds one UDP socket per endpoint for a worker, with the address named in any error.
pub fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<UdpSocket>, String> {
    addrs
        .iter()
        .map(|a| udp_socket(*a).map_err(|e| format!("turn.listen {a}: udp bind: {e}")))
        .collect()
}

/// Whether this process may use io_uring with the features the driver needs.
pub fn io_uring_available() -> Result<(), String> {
    uring::probe().map_err(|e| format!("io_uring unavailable: {e}"))
}
