//! The one harness of Portico's integration tests (`controlplane/tests/*/main.rs`): every test
//! runs the real `portico` binary (which starts its dataplane as `portico dataplane`) and talks
//! to it over real sockets on loopback.
//!
//! * [`ports`]: free ports from one allocator per process; [`dirs`]: temporary directories.
//! * [`portico`]: a Portico installation ([`Portico`]) built from a [`Spec`] of config pieces,
//!   with its processes (start, kill, restart, adopt), its API, counters and metrics.
//! * [`stun`]: a STUN/TURN codec of the tests' own, independent of the server's; [`net`]:
//!   sockets, STUN transactions over UDP and TCP; [`turn`]: the TURN client, echo peers and
//!   a flood generator; [`bystander`]: a client that keeps asking while a test attacks.
//! * [`http`]: an HTTP/1.1 client for the API and the reverse proxy, curl, TLS probes.
//! * [`fixtures`]: a private CA, nginx, slapd and Kamailio as the tests' own processes;
//!   [`sip`] and [`ldap`]: clients for the proxy's SIP and LDAP sides.
//! * [`process`]: child processes, pids, RSS, polling, third-party tools, and [`alone`] for a
//!   test that must not share the machine with the other tests of its binary.
//! * [`metrics`]: reading a Prometheus text exposition.
//!
//! Source addresses: all of 127.0.0.0/8 is local on Linux, so a test can be several clients.
//! Readiness probes come from [`PROBE`], which every configuration the kit writes whitelists.

pub mod bystander;
pub mod dirs;
pub mod fixtures;
pub mod fuzz;
pub mod http;
pub mod ldap;
pub mod metrics;
pub mod net;
pub mod portico;
pub mod ports;
pub mod process;
pub mod sip;
pub mod stun;
pub mod turn;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

pub use dirs::TempDir;
pub use portico::{Portico, Spec};
pub use ports::{free_port, free_port_on};
pub use process::{alone, wait_until, Proc};

pub const LOCAL4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// The RFC 5780 alternate address.
pub const ALT4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
pub const LOCAL6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// The source of readiness probes; whitelisted in every configuration the kit writes.
pub const PROBE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 254));
/// How long a test waits for an answer on loopback that should come.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// An IPv4 address (a loopback source, mostly).
pub const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}
