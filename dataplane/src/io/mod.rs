//! Drivers: the thin shells that move datagrams between sockets and the sans-IO [`Server`].
//!
//! * [`uring`]: one io_uring per worker, multishot `recvmsg` into a provided-buffer ring, the
//!   reply sent from the buffer it arrived in, all submissions of a loop turn in one syscall.
//! * [`epoll`]: the same loop on mio (epoll), for kernels or sandboxes that forbid io_uring.
//! * [`tcp`]: STUN over TCP (RFC 8489 framing) on the same addresses, for both drivers.
//!
//! Both packet drivers call [`Server::handle`] the same way, so every protocol test covers
//! both. The drivers own what the core must not touch: sockets (relay sockets by index,
//! reserved ones by [`crate::turn::Reserved`] handle), the clocks ([`now`]), the system's
//! random generator ([`random_bytes`], the core's seed) and shared memory (the core's
//! [`Stats`] are folded into it once per loop turn with [`fold`]; its control-plane roles are
//! implemented here on the segment).

pub mod bufring;
pub mod epoll;
pub mod handoff;
pub mod media;
pub mod relay;
pub mod sockaddr;
pub mod sockopt;
pub mod steer;
pub mod tcp;
pub mod uring;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portico_shared::shm::{
    AllocInfo, Event, EventKind, SharedMemory, WorkerCounters, ALLOC_RECORDS,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::server::{Now, Server, Settings, Stats};
use crate::turn::allocation::Allocation;
use crate::turn::{self, AllocationTable, ControlPlane, Events, TurnShared};
use std::collections::HashMap;

/// How long a driver may sleep before it looks at the stop flag and the configuration.
pub const TICK: Duration = Duration::from_millis(100);

/// [`TICK`] while the media relay is on: a worker then takes up a session request (the API
/// waits for it) within this long even when no packet wakes it.
pub const MEDIA_TICK: Duration = Duration::from_millis(5);

/// The longest sleep for a worker running `server`'s settings.
pub fn tick_for(server: &Server) -> Duration {
    if server.settings().media.ports.is_some() {
        MEDIA_TICK
    } else {
        TICK
    }
}

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
    /// The sockets behind the core's reservation handles.
    pub reservations: Arc<relay::Reservations>,
    /// Keys the stateless TURN nonces; drawn once per process so nonces survive reloads.
    pub secret: [u8; 32],
    /// Worker threads started (they split the allocation records).
    pub workers: usize,
    /// The kernel fast path, when `turn.fast_path` loaded it ([`crate::fastpath`]).
    pub fast_path: Option<Arc<crate::fastpath::FastPath>>,
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
    /// workers'), seeded from the system's random generator, linked to the control plane
    /// through this segment.
    pub fn new_server(self: &Arc<Self>, index: usize) -> io::Result<Server> {
        let first_relay = self.current_settings().endpoints.len();
        self.new_server_at(index, first_relay)
    }

    /// [`Shared::new_server`] with relay socket indices starting at `first_relay` (the TCP
    /// thread names its connections by the indices below).
    pub fn new_server_at(self: &Arc<Self>, index: usize, first_relay: usize) -> io::Result<Server> {
        let seed = random_bytes()?;
        // The workers and the TCP thread (index MAX_WORKERS, after the workers) split the
        // allocation records.
        let records = if self.workers > 0 {
            let per = ALLOC_RECORDS / (self.workers + 1);
            let share = index.min(self.workers);
            (share * per..(share + 1) * per).rev().collect()
        } else {
            Vec::new()
        };
        let control = ControlPlane {
            allocations: Box::new(ShmAllocations {
                shared: Arc::clone(self),
                records,
                by_id: HashMap::new(),
            }),
            blacklist: Box::new(ShmBlacklist {
                shared: Arc::clone(self),
            }),
            events: Box::new(ShmEvents {
                ring: index,
                shared: Arc::clone(self),
            }),
        };
        let mut server = Server::with_first_relay(
            self.current_settings(),
            Arc::clone(&self.turn),
            &seed,
            control,
            first_relay,
        );
        server.set_media_control(Box::new(media::ShmMedia::new(Arc::clone(self), index)));
        Ok(server)
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

/// Bytes from the system's random generator (the core takes its randomness from these).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .map_err(|_| io::Error::other("the system random generator failed"))?;
    Ok(b)
}

/// Reads the clocks, once per loop turn: the core is told the time, it never reads it.
pub fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// Adds what a thread counted since the last fold to its block in shared memory, so the
/// packet path counts in plain memory. Called at the end of every loop turn, and by the
/// drivers whose sends leave within the turn (epoll, TCP) also just before sending, so a
/// counter is visible by the time its reply is. Only counts that changed are written, so a
/// slot another thread writes (`ConfigApplied`, counted by the runtime in the TCP thread's
/// block) is never touched here.
pub fn fold(stats: &mut Stats, block: &WorkerCounters) {
    stats.drain(|c, n| block.add(c, n));
}

/// Publishes a worker's allocations into its share of the shared-memory records, and
/// carries the control plane's delete requests to it.
struct ShmAllocations {
    shared: Arc<Shared>,
    /// Free record indices of this worker.
    records: Vec<usize>,
    by_id: HashMap<u64, usize>,
}

impl AllocationTable for ShmAllocations {
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
                relay: a.relay.public,
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
}

/// The blacklist the control plane keeps in the segment.
struct ShmBlacklist {
    shared: Arc<Shared>,
}

impl turn::Blacklist for ShmBlacklist {
    fn blocked(&self, ip: IpAddr, unix: u64) -> bool {
        self.shared.shm.segment().blacklist.is_blocked(ip, unix)
    }

    fn generation(&self) -> u64 {
        self.shared.shm.segment().blacklist.generation()
    }
}

/// This thread's event ring in the segment.
struct ShmEvents {
    /// Index of this thread's event ring.
    ring: usize,
    shared: Arc<Shared>,
}

impl Events for ShmEvents {
    fn report(&mut self, kind: EventKind, ip: IpAddr, unix: u64) {
        let seg = self.shared.shm.segment();
        if seg.events(self.ring).push(Event { kind, ip, unix }) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use portico_shared::counters::Counter;
    use portico_shared::shm::MAX_WORKERS;

    #[test]
    fn fold_adds_each_count_once_and_leaves_untouched_slots_alone() {
        let name = format!("/portico-test-fold-{}", std::process::id());
        let shm = SharedMemory::create(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        SharedMemory::unlink(&name);
        let seg = shm.segment();
        // The runtime counts ConfigApplied in the TCP thread's block; the fold must not write
        // over it.
        seg.counters(MAX_WORKERS).incr(Counter::ConfigApplied);
        let (mut w0, mut tcp) = (Stats::default(), Stats::default());
        w0.add(Counter::RxPackets, 3);
        w0.add(Counter::TurnAllocationsActive, 1);
        tcp.incr(Counter::RxPackets);
        fold(&mut w0, seg.counters(0));
        fold(&mut tcp, seg.counters(MAX_WORKERS));
        fold(&mut w0, seg.counters(0));
        assert_eq!(seg.total(Counter::RxPackets), 4);
        assert_eq!(seg.total(Counter::TurnAllocationsActive), 1);
        // An allocation made by one worker and ended after a fold: the gauge's sum is 0.
        w0.sub(Counter::TurnAllocationsActive, 1);
        fold(&mut w0, seg.counters(0));
        assert_eq!(seg.total(Counter::TurnAllocationsActive), 0);
        assert_eq!(seg.counters(MAX_WORKERS).get(Counter::ConfigApplied), 1);
    }
}
