//! Portico's side of two independent ICE stacks (aioice.rs, webrtc.rs) connecting
//! relay-to-relay through it: the server they use, and the proof from its API and counters
//! that the traffic went through its allocations over the expected client transport.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::{free_port_on, Portico, LOCAL4, LOCAL6};
use serde_json::Value;

use crate::turn_spec;

/// How the ICE agents reach Portico.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Udp,
    Tcp,
    Tls,
}

/// The TURN credentials the agents use.
pub struct Creds {
    pub user: String,
    pub password: String,
}

impl Creds {
    /// The kit's long-term user.
    pub fn kit() -> Creds {
        Creds {
            user: portico_testkit::turn::USER.to_string(),
            password: portico_testkit::turn::PASSWORD.to_string(),
        }
    }

    /// TURN REST API credentials (what WebRTC applications hand to browsers): user
    /// `expiry:name`, password base64(HMAC-SHA1(secret, user)), with the kit's secret.
    pub fn rest(name: &str) -> Creds {
        use base64::Engine;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + 3600;
        let user = format!("{expiry}:{name}");
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            portico_testkit::turn::SHARED_SECRET.as_bytes(),
        );
        let tag = aws_lc_rs::hmac::sign(&key, user.as_bytes());
        Creds {
            password: base64::engine::general_purpose::STANDARD.encode(tag.as_ref()),
            user,
        }
    }
}

/// Portico with the kit's TURN users; with `loopback_peers` loopback peers are allowed (the
/// relayed addresses are on 127.0.0.1, so each relay's peer is the other relay; without it
/// they reach each other only as Portico's own relays); listeners on 127.0.0.1 and [::1],
/// TLS ones on a free port of both with the generated certificate (which names
/// `localhost`); `extra` lines for `[turn]`. Returns it and the TLS port.
pub fn ice_portico(tag: &str, extra: &str, loopback_peers: bool) -> (Portico, u16) {
    let port = free_port_on(&[LOCAL4, LOCAL6]);
    let spec = turn_spec("auto", loopback_peers)
        .turn(&format!(
            "listen_tls = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]"
        ))
        .turn(extra);
    (Portico::start(tag, spec), port)
}

/// The allocations `GET /api/v1/turn/allocations` lists.
pub fn allocations(p: &Portico) -> Vec<Value> {
    let (code, v) = p.call("GET", "/api/v1/turn/allocations", "");
    assert_eq!(code, 200, "{v}");
    v["allocations"].as_array().cloned().unwrap_or_default()
}

/// What the agents report: their relayed candidates (`sides[0]` agent a's, `sides[1]`
/// agent b's) and how many bytes each agent sent at least.
#[derive(Clone, Copy)]
pub struct Traffic<'a> {
    pub sides: [&'a [SocketAddr]; 2],
    pub bytes: u64,
}

/// Checks, from Portico's side, that the agents' relayed candidates are exactly the
/// allocations it serves (all of `user`), that each agent's allocations together sent at
/// least `bytes` to their peers and passed as many to their client (the dataplane
/// republishes traffic each second, so this polls a few seconds; which of an agent's relays
/// carries its data is the agent's choice), and that the clients of agent i came over
/// `vias[i]` (to Portico's address `server` over TCP, to `localhost` over TLS): for TCP and
/// TLS each client address is one end of an established connection to that listener and
/// TLS handshakes were completed, for UDP it is no TCP connection (and none was accepted
/// when all are UDP); and that Portico dropped nothing for framing, size or a full output
/// queue. Returns the allocations.
pub fn expect_relayed_through(
    p: &Portico,
    vias: [Via; 2],
    server: IpAddr,
    tls_port: u16,
    user: &str,
    traffic: Traffic<'_>,
) -> Vec<Value> {
    let sides = traffic.sides;
    let list = carried(|| allocations(p), user, &traffic);
    let via_of = |relayed: &Value| -> Via {
        if sides[1].iter().any(|r| *relayed == r.to_string()) {
            vias[1]
        } else {
            vias[0]
        }
    };
    let tcp = established_tcp();
    for a in &list {
        let via = via_of(&a["relayed"]);
        // Over TLS the agents name the server `localhost` (the certificate's name), which
        // resolves to both loopback addresses.
        let listeners = match via {
            Via::Udp => vec![],
            Via::Tcp => vec![SocketAddr::new(server, p.port)],
            Via::Tls => vec![
                SocketAddr::new(LOCAL4, tls_port),
                SocketAddr::new(LOCAL6, tls_port),
            ],
        };
        let client: SocketAddr = a["client"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no client address: {a}"));
        if listeners.is_empty() {
            assert!(
                !tcp.iter().any(|(local, _)| *local == client),
                "UDP: the client {client} is a TCP connection"
            );
        } else {
            assert!(
                listeners.iter().any(|l| tcp.contains(&(client, *l))),
                "{via:?}: the client {client} of {a} is no connection to {listeners:?}; \
                 established: {tcp:?}"
            );
        }
    }
    // Nothing the stacks sent was malformed for Portico or dropped by it on the way.
    for c in [
        Counter::DropTcpFraming,
        Counter::DropStreamBacklog,
        Counter::DropBadChannelData,
        Counter::DropTruncated,
        Counter::DropBadLength,
        Counter::DropNotStun,
        Counter::DropNoChannel,
        Counter::TcpClosedBacklog,
    ] {
        assert_eq!(p.counter(c), 0, "{vias:?}: {c:?} counted");
    }
    let count = |v: Via| list.iter().filter(|a| via_of(&a["relayed"]) == v).count() as u64;
    let accepted = p.counter(Counter::TcpAccepted);
    let handshakes = p.counter(Counter::TlsHandshakes);
    if count(Via::Udp) == list.len() as u64 {
        assert_eq!(accepted, 0, "no TCP connection over UDP");
    }
    assert!(
        accepted >= count(Via::Tcp) + count(Via::Tls),
        "accepted {accepted}"
    );
    if count(Via::Tls) == 0 {
        assert_eq!(handshakes, 0, "no TLS over plain TCP and UDP");
    }
    assert!(handshakes >= count(Via::Tls), "handshakes {handshakes}");
    list
}

/// Polls `list` (the allocations the API lists; the dataplane republishes traffic each
/// second) for a few seconds until each side's allocations together sent at least
/// `traffic.bytes` to their peers and passed as many to their client; then checks that each
/// relayed candidate is an allocation served, that any other allocation (a port the browser
/// pruned) carried nothing, that all are `user`'s, and that a relay of each side has a
/// permission for the other side's. Returns the list.
pub fn carried(list: impl Fn() -> Vec<Value>, user: &str, traffic: &Traffic<'_>) -> Vec<Value> {
    let Traffic { sides, bytes } = *traffic;
    let deadline = Instant::now() + Duration::from_secs(6);
    let total = |list: &[Value], side: &[SocketAddr], way: &str| -> u64 {
        list.iter()
            .filter(|a| side.iter().any(|r| a["relayed"] == r.to_string()))
            .map(|a| a[way]["bytes"].as_u64().unwrap_or(0))
            .sum()
    };
    let list = loop {
        let list = list();
        let all = sides.iter().all(|side| {
            total(&list, side, "to_peer") >= bytes && total(&list, side, "to_client") >= bytes
        });
        if all {
            break list;
        }
        assert!(
            Instant::now() < deadline,
            "Portico does not show {bytes} bytes each way through each of {sides:?}: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let gathered: Vec<SocketAddr> = sides.iter().flat_map(|s| s.iter().copied()).collect();
    let expected: Vec<String> = gathered.iter().map(|r| format!("\"{r}\"")).collect();
    // Chromium may open a second TURN port to the same server and prune it once the first
    // is ready (seen once over `turns:`: two TLS connections 7 ms apart); the pruned
    // port's allocation then lives on without a candidate, a permission or a byte.
    let (served, unused): (Vec<&Value>, Vec<&Value>) = list
        .iter()
        .partition(|a| expected.contains(&a["relayed"].to_string()));
    assert_eq!(
        served.len(),
        expected.len(),
        "an allocation for each relayed candidate: {list:#?}"
    );
    for a in unused {
        assert!(
            a["permissions"] == 0
                && a["channels"] == 0
                && a["to_peer"]["bytes"] == 0
                && a["to_client"]["bytes"] == 0,
            "an allocation that is no relayed candidate carried something: {a:#}"
        );
    }
    for a in &list {
        assert_eq!(a["user"], user, "{a}");
    }
    for side in sides {
        assert!(
            list.iter()
                .any(|a| side.iter().any(|r| a["relayed"] == r.to_string())
                    && a["permissions"].as_u64() == Some(1)),
            "a relay of {side:?} has a permission for the other side's: {list:#?}"
        );
    }
    list
}

/// Waits (bounded) until Portico serves no allocation: a stream client's allocations end
/// with its connection, and a UDP client deletes its own when it closes.
pub fn expect_no_allocations(p: &Portico, what: &str) {
    expect_emptied(what, || allocations(p));
}

/// Waits (bounded, 5 s) until `list` returns no allocation.
pub fn expect_emptied(what: &str, list: impl Fn() -> Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = list();
        if list.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: allocations remain: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The established TCP connections of this host as (local, remote), from /proc/net/tcp and
/// tcp6 (a loopback connection is listed once from each end).
pub fn established_tcp() -> Vec<(SocketAddr, SocketAddr)> {
    // An address is network-order 32-bit words, each printed as a host-order number.
    let addr = |s: &str| -> Option<SocketAddr> {
        let (ip, port) = s.split_once(':')?;
        let mut bytes = Vec::new();
        for i in (0..ip.len()).step_by(8) {
            let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        let ip = match bytes.len() {
            4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
            16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, u16::from_str_radix(port, 16).ok()?))
    };
    let mut all = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // State 01 is ESTABLISHED.
            if f.len() < 4 || f[3] != "01" {
                continue;
            }
            if let (Some(local), Some(remote)) = (addr(f[1]), addr(f[2])) {
                all.push((local, remote));
            }
        }
    }
    all
}
