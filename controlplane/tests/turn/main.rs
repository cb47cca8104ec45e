//! TURN over UDP against the real `portico`: the kit's TURN client relaying to echo peers on
//! both packet drivers, coturn's `turnutils_uclient` relaying through Portico, the API's
//! view of allocations, and the RFC 5766 channel number range.
//! IPv6 relays (RFC 8656 §7.2, RFC 6156): `turnutils_uclient -x` to a peer on ::1, dual
//! allocations with the kit's client, 440 where a family cannot be served.
//! TURN over TCP and TLS (RFC 8656 §3.1): `turnutils_uclient -t` and `-t -S`, the framing
//! with an own stream client, bad input on a stream, a TLS alert mid-stream, a stalled TLS
//! handshake.
//! `portico probe` (probe.rs): SUCCESS against Portico and coturn; the failing step and
//! transport named for a wrong password, a refused peer, and UDP blocked in a namespace; the
//! NAT type behind a masquerading router in namespaces.
//! Two independent ICE stacks relay-to-relay through Portico over UDP, TCP and TLS: aioice
//! agents and headless Chromium's RTCPeerConnections with a data channel.
//! Scale: the descriptor limit raised for `turn.max_allocations` (or the start refused), relays
//! spread over several `turn.relay_ip` addresses.
//! One port for HTTPS and TURN over TLS (`proxy.turn_on_https`): curl routed by Host and
//! TURN clients (uclient without ALPN, a client with ALPN `stun.turn`) on the same port.
//! The kernel fast path (fast_path.rs) with client, Portico and peer in namespaces of their
//! own: a recorded stream identical to the user-space relay's, two allocations relaying to
//! each other joined in the kernel, counters, removal within a second, no permission no
//! forwarding, fallback, uclient; aioice's agents and headless
//! Chromium relay-to-relay through it (fast_path_ice.rs).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use portico_testkit::process::require;
use portico_testkit::turn::CoturnPeer;
use portico_testkit::{free_port_on, Portico, Spec, LOCAL4};

mod aioice;
mod alternate;
mod api;
mod channel_range;
mod fast_path;
mod fast_path_ice;
mod fast_path_media;
mod ice;
mod interop;
mod ipv6;
mod port443;
mod probe;
mod relay;
mod scale;
mod steered;
mod stream_burst;
mod tcp;
mod tcp_coalesce;
mod tcp_idle;
mod tcp_relay;
mod webrtc;

/// A server on driver `io` (listening on 127.0.0.1 and [::1]) with the kit's TURN users and
/// REST API secrets; with `loopback_peers` the test's own loopback peers are allowed (they
/// are denied by default).
/// Runs `portico run` on `p`'s configuration, which must refuse to start (`what` says what
/// it was started with); returns its output.
pub fn refused_start(p: &Portico, what: &str) -> String {
    let out = portico_testkit::portico::run_portico(
        &[
            std::ffi::OsStr::new("run"),
            std::ffi::OsStr::new("--config"),
            p.config_path.as_os_str(),
        ],
        &p.dir,
        Duration::from_secs(20),
    );
    assert!(!out.status.success(), "started with {what}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn turn_spec(io: &'static str, loopback_peers: bool) -> Spec {
    let spec = Spec::new().ipv6().io(io).turn_users();
    if loopback_peers {
        spec.loopback_peers()
    } else {
        spec
    }
}

// coturn's `turnutils_uclient` (Debian package `coturn`), shared by interop.rs and tcp.rs.

/// Messages per client and clients per run: bounded load, a few seconds at 20 ms spacing.
pub const MESSAGES: u64 = 100;
pub const CLIENTS: u64 = 4;
pub const LIMIT: Duration = Duration::from_secs(60);

pub fn uclient() -> PathBuf {
    require("turnutils_uclient", "coturn")
}

/// coturn's echo peer on a free port of 127.0.0.1, logging into `p`'s directory.
pub fn coturn_peer(p: &Portico) -> CoturnPeer {
    coturn_peer_on(p, LOCAL4)
}

/// coturn's echo peer on a free port of `ip` (127.0.0.1 or ::1).
pub fn coturn_peer_on(p: &Portico, ip: IpAddr) -> CoturnPeer {
    CoturnPeer::start(
        &require("turnutils_peer", "coturn"),
        SocketAddr::new(ip, free_port_on(&[ip])),
        &p.dir.join(format!(
            "turnutils_peer-{}.log",
            if ip.is_ipv4() { 4 } else { 6 }
        )),
    )
}

/// The client's own totals: (sent, received) from its last `start_mclient: tot_send_msgs=`
/// line.
pub fn totals(text: &str) -> Option<(u64, u64)> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("start_mclient: tot_send_msgs="))?;
    let num = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((num("tot_send_msgs=")?, num("tot_recv_msgs=")?))
}
