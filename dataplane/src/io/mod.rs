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

use crate::server::{Server, Settings};
use crate::turn::TurnShared;

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

    /// A protocol core for worker `index`.
    pub fn new_server(&self, index: usize) -> Server {
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
        Server::new(self.current_settings(), Arc::clone(&self.turn), seed)
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
