//! What every thread of a TURN run is told, and how the orchestrator ([`crate::turn_load`])
//! steps the client threads ([`crate::turn_client`]) and peer threads
//! ([`crate::turn_peer`]) through the phases of a run: setup, data (or churn), teardown.
//! Also the loopback source address each client gets.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

use crate::turn_msg::Credentials;

/// How the clients relay their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// ChannelBind, then ChannelData both ways.
    Channel,
    /// Send indications out, Data indications back (no channel).
    Send,
    /// No data: allocate, refresh and delete in a loop (allocation churn).
    Churn,
}

/// Orchestrator phases, in order.
pub const PHASE_SETUP: u8 = 0;
pub const PHASE_DATA: u8 = 1;
pub const PHASE_TEARDOWN: u8 = 2;

/// How far a thread got (reported back to the orchestrator).
pub const REACHED_SETUP: u8 = 1;
pub const REACHED_DATA: u8 = 2;
pub const REACHED_EXIT: u8 = 3;

/// Shared between the orchestrator, the client threads and the peer threads.
pub struct Control {
    pub phase: AtomicU8,
    /// Nanoseconds after `start` at which the data (or churn) phase began.
    pub data_start_ns: AtomicU64,
    pub peer_stop: AtomicBool,
    /// Per client thread: the last `REACHED_*` it got to.
    pub reached: Vec<AtomicU8>,
    // Live figures for the progress line.
    pub allocated: AtomicU64,
    pub failed: AtomicU64,
    pub up_sent: AtomicU64,
    pub down_received: AtomicU64,
    pub up_received: AtomicU64,
    pub cycles: AtomicU64,
}

impl Control {
    pub fn new(threads: usize) -> Control {
        Control {
            phase: AtomicU8::new(PHASE_SETUP),
            data_start_ns: AtomicU64::new(0),
            peer_stop: AtomicBool::new(false),
            reached: (0..threads).map(|_| AtomicU8::new(0)).collect(),
            allocated: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            up_sent: AtomicU64::new(0),
            down_received: AtomicU64::new(0),
            up_received: AtomicU64::new(0),
            cycles: AtomicU64::new(0),
        }
    }

    /// Whether every client thread got at least to `stage`.
    pub fn all_reached(&self, stage: u8) -> bool {
        self.reached
            .iter()
            .all(|r| r.load(Ordering::Acquire) >= stage)
    }
}

/// What every client thread is asked to do.
pub struct Plan {
    pub start: Instant,
    pub nonce: u32,
    pub server: SocketAddr,
    pub peer: SocketAddr,
    pub mode: Mode,
    pub credentials: Credentials,
    /// Packets per second per stream; `None` is flat out.
    pub rate: Option<f64>,
    /// Flat out: packets in flight per stream.
    pub window: usize,
    /// Payload bytes per packet.
    pub size: usize,
    /// LIFETIME asked for in Allocate and refreshes (`None`: the server's default).
    pub lifetime: Option<u32>,
    /// Clients in setup (or teardown) at once.
    pub setup_window: usize,
    pub setup_timeout_ns: u64,
    pub duration_ns: u64,
    /// How long after the last send packets are still awaited.
    pub drain_ns: u64,
    pub rto_ns: u64,
    pub max_tries: u32,
    /// Client threads, and the total client count (ids are spread over the threads).
    pub threads: usize,
    pub clients: usize,
    /// UDP, or a connection per client (TCP, TLS; see [`crate::turn_stream`]).
    pub transport: crate::turn_stream::Transport,
    /// TLS: offer ALPN `stun.turn`.
    pub alpn: bool,
}

impl Plan {
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// Source addresses start here: far from 127.0.0.1, where other loopback services live.
const ADDR_BASE: u32 = u32::from_be_bytes([127, 128, 0, 0]);
/// Addresses available below 127.255.0.0 with the last octet in 1..=254.
const ADDR_SPACE: u32 = 254 * 256 * 127;

/// Loopback source address number `n` (skips .0 and .255 last octets).
pub fn client_addr(n: u32) -> Ipv4Addr {
    let n = n % ADDR_SPACE;
    let host = n / 254;
    Ipv4Addr::from(ADDR_BASE + (host << 8) + n % 254 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_distinct_loopback_unicast() {
        let mut seen = std::collections::HashSet::new();
        for n in (0..100_000u32).chain(ADDR_SPACE - 10..ADDR_SPACE + 10) {
            let a = client_addr(n);
            let o = a.octets();
            assert_eq!(o[0], 127);
            assert!(o[1] >= 128 && o[1] < 255, "{a}");
            assert!(o[3] != 0 && o[3] != 255, "{a}");
            if n < 100_000 {
                assert!(seen.insert(a), "{a} twice");
            }
        }
        assert_eq!(client_addr(ADDR_SPACE), client_addr(0), "wraps");
    }
}
