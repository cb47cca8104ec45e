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
    /// Where the clients' source addresses come from.
    pub client_net: ClientNet,
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
    ClientNet::LOOPBACK.addr(n)
}

/// The network the clients' source addresses are drawn from: 127.128.0.0/9 on loopback by
/// default, or (`--client-net`) an IPv4 network the generator's namespace treats as local
/// (e.g. `ip route add local 10.78.0.0/16 dev lo`), so that clients and server can sit in
/// different namespaces joined by a veth pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientNet {
    base: u32,
    /// Usable addresses: 254 per /24 (last octet 1..=254).
    space: u32,
}

impl ClientNet {
    pub const LOOPBACK: ClientNet = ClientNet {
        base: ADDR_BASE,
        space: ADDR_SPACE,
    };

    /// `a.b.c.d/len` with `len` 8..=24 (host bits are ignored).
    pub fn parse(s: &str) -> Result<ClientNet, String> {
        let bad = || format!("{s:?}: expected an IPv4 network a.b.c.d/len, len 8..=24");
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().map_err(|_| bad())?;
        if !(8..=24).contains(&len) || ip.is_unspecified() || ip.is_multicast() {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - len);
        Ok(ClientNet {
            base: u32::from(ip) & mask,
            space: (1u32 << (24 - len)) * 254,
        })
    }

    /// Source address number `n` (wraps; skips .0 and .255 last octets).
    pub fn addr(&self, n: u32) -> Ipv4Addr {
        let n = n % self.space;
        let host = n / 254;
        Ipv4Addr::from(self.base + (host << 8) + n % 254 + 1)
    }

    /// Whether the addresses are on loopback (127.0.0.0/8).
    pub fn is_loopback(&self) -> bool {
        Ipv4Addr::from(self.base).is_loopback()
    }

    /// How many distinct addresses it has.
    pub fn addresses(&self) -> u32 {
        self.space
    }
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

    #[test]
    fn client_networks_parse_and_stay_inside() {
        let n = ClientNet::parse("10.78.3.9/16").unwrap();
        assert!(!n.is_loopback());
        assert_eq!(n.addresses(), 256 * 254);
        assert_eq!(n.addr(0), Ipv4Addr::new(10, 78, 0, 1));
        assert_eq!(n.addr(254), Ipv4Addr::new(10, 78, 1, 1));
        let last = n.addr(n.addresses() - 1);
        assert_eq!(last, Ipv4Addr::new(10, 78, 255, 254));
        assert_eq!(n.addr(n.addresses()), n.addr(0), "wraps");
        let small = ClientNet::parse("10.79.5.0/24").unwrap();
        assert_eq!(small.addresses(), 254);
        assert_eq!(small.addr(253), Ipv4Addr::new(10, 79, 5, 254));
        for bad in [
            "10.78.0.0",
            "10.78.0.0/25",
            "10.78.0.0/7",
            "x/16",
            "0.0.0.0/16",
            "::1/64",
        ] {
            assert!(ClientNet::parse(bad).is_err(), "{bad}");
        }
        assert!(ClientNet::LOOPBACK.is_loopback());
        assert_eq!(ClientNet::LOOPBACK.addr(7), client_addr(7));
    }
}
