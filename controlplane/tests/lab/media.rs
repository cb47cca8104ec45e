//! RTP across NAT (reference: "Media and NAT", "NAT Detection", "Private to Private
//! Communication", "Media Relay"), phones behind routers of every NAT type:
//!
//! * without help, a phone calling the provider's media gateway has one-way audio: its RTP
//!   reaches the gateway, the gateway's RTP to the private address it was told never
//!   arrives;
//! * a media relay session on Portico with NAT detection (latching onto the source of the
//!   phone's first packet) gives audio both ways;
//! * two phones in two private networks (two branches) hear nothing of each other;
//! * through a media relay session they hear each other, whatever their NATs;
//! * once a leg is latched and the learning window is over, a third host sending to it is
//!   neither forwarded nor able to take the stream over; it is counted and reported.
//!
//! The sessions are made through the REST API as an SBC or PBX would (contract in
//! MEDIA_CONTRACT.md: POST /api/v1/media/sessions).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::{sa, Boxed, Go, Lab, Rtp, RtpReport, To, ALL_NATS, BOX, NET, PROVIDER, RTP};

const COUNT: u32 = 100;

const MEDIA: &str = "[media]\nports = \"40000-40199\"\nlearn_window = \"2s\"\nidle_timeout = \"60s\"\nmax_sessions = 100\n";

fn phone(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, n, 2)
}

fn wan(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 100 + n)
}

/// The provider's media gateway port for phone n's call.
fn gw_port(n: u8) -> u16 {
    6000 + u16::from(n) * 2
}

/// A lab with the provider's media gateway on the internet and phone n behind router n of
/// type ALL_NATS[n-1].
fn provider_lab(test: &str) -> Option<Lab> {
    let lab = Lab::new(test)?;
    lab.public("provider", &[PROVIDER]);
    for (i, nat) in ALL_NATS.iter().enumerate() {
        lab.nat_phone(i as u8 + 1, *nat);
    }
    Some(lab)
}

/// The source a report's packets came from: exactly one, whose address is `ip` (and port
/// `port` where given).
#[track_caller]
fn single_source(r: &RtpReport, ip: Ipv4Addr, port: Option<u16>, what: &str) -> SocketAddr {
    let sources = r.sources();
    assert_eq!(sources.len(), 1, "{what}: sources {:?}", r.0);
    let src: SocketAddr = sources[0]
        .0
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(src.ip(), std::net::IpAddr::V4(ip), "{what}: {:?}", r.0);
    if let Some(p) = port {
        assert_eq!(src.port(), p, "{what}: {:?}", r.0);
    }
    src
}

/// A phone behind each NAT type calls the provider: each signals its private address; its
/// RTP reaches the gateway (from the router's public address), the gateway's never reaches
/// the phone.
#[test]
fn one_way_audio_without_help() {
    let Some(lab) = provider_lab("media-one-way") else {
        return;
    };
    let go = Go::new(&lab);
    let mut runs = Vec::new();
    for (i, nat) in ALL_NATS.iter().enumerate() {
        let n = i as u8 + 1;
        let signalled = sa(phone(n), RTP);
        let gw = sa(PROVIDER, gw_port(n));
        let p = Rtp::start(
            &lab,
            &format!("phone{n}"),
            signalled,
            To::Addr(gw),
            COUNT,
            &go,
        );
        let g = Rtp::start(&lab, "provider", gw, To::Addr(signalled), COUNT, &go);
        runs.push((*nat, n, p, g));
    }
    go.fire();
    for (nat, n, p, g) in runs {
        let (p, g) = (p.report(), g.report());
        // The gateway sent to the private address and got "Network unreachable" for each.
        assert_eq!(
            g.0["send_errors"].as_u64(),
            Some(u64::from(COUNT)),
            "{nat:?}: {:?}",
            g.0
        );
        assert_eq!(
            g.unique(),
            u64::from(COUNT),
            "{nat:?}: phone -> gateway: {:?}",
            g.0
        );
        let port = nat.endpoint_independent_mapping().then_some(RTP);
        single_source(
            &g,
            wan(n),
            port,
            &format!("{nat:?}: the gateway hears the router"),
        );
        p.expect_nothing(&format!("{nat:?}: gateway -> phone's private address"));
    }
}

/// Creates a media session with the two signalled addresses; returns (id, leg 0's local
/// address, leg 1's local address).
fn session(
    b: &Boxed,
    a: Option<SocketAddr>,
    c: Option<SocketAddr>,
    label: &str,
) -> (String, SocketAddr, SocketAddr) {
    let leg = |x: Option<SocketAddr>| match x {
        Some(a) => format!("{{\"address\":\"{a}\"}}"),
        None => "{}".to_string(),
    };
    let body = format!("{{\"legs\":[{},{}],\"label\":\"{label}\"}}", leg(a), leg(c));
    let s = b.json("POST", "/api/v1/media/sessions", &body, 201);
    let id = s["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {s}"))
        .to_string();
    let local = |i: usize| -> SocketAddr {
        let l: SocketAddr = s["legs"][i]["local"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no legs[{i}].local in {s}"));
        assert_eq!(
            l.ip(),
            std::net::IpAddr::V4(BOX),
            "legs[{i}].local on relay_ip: {s}"
        );
        assert_eq!(l.port() % 2, 0, "RTP on an even port: {s}");
        let rtcp = s["legs"][i]["rtcp_local"].as_str().unwrap_or("");
        assert_eq!(
            rtcp,
            format!("{}:{}", l.ip(), l.port() + 1),
            "legs[{i}].rtcp_local: {s}"
        );
        l
    };
    (id.clone(), local(0), local(1))
}

/// The provider case with Portico's media relay in front of the phones (as an SBC puts it):
/// the session's leg 1 gets the gateway's address from signalling; leg 0 none, since the
/// phone's SDP carries only its private address (which the peer policy refuses and which is
/// of no use on the internet anyway): NAT detection finds the phone. The phone starts
/// sending first (when it answers); the relay latches onto the router's public address;
/// both directions arrive complete, behind every NAT type.
#[test]
fn nat_detection_fixes_the_provider_case() {
    let Some(lab) = provider_lab("media-nat-detection") else {
        return;
    };
    lab.public("box", &[BOX]);
    let b = Boxed::start(&lab, "box", BOX, None, &[NET], MEDIA);
    let go = Go::new(&lab);
    let mut runs = Vec::new();
    for (i, nat) in ALL_NATS.iter().enumerate() {
        let n = i as u8 + 1;
        let signalled = sa(phone(n), RTP);
        let gw = sa(PROVIDER, gw_port(n));
        let (id, leg0, leg1) = session(&b, None, Some(gw), &format!("phone{n}"));
        let p = Rtp::start(
            &lab,
            &format!("phone{n}"),
            signalled,
            To::Addr(leg0),
            COUNT,
            &go,
        );
        // The gateway 300 ms after the phone: the phone's first packet latches its leg.
        let g = Rtp::start_delayed(&lab, "provider", gw, To::Addr(leg1), COUNT, &go, 0.3);
        runs.push((*nat, n, id, gw, leg0, leg1, p, g));
    }
    go.fire();
    for (nat, n, id, gw, leg0, leg1, p, g) in runs {
        let (p, g) = (p.report(), g.report());
        g.expect_all(
            u64::from(COUNT),
            leg1,
            &format!("{nat:?}: phone -> gateway via the relay"),
        );
        p.expect_all(
            u64::from(COUNT),
            leg0,
            &format!("{nat:?}: gateway -> phone via the relay"),
        );
        let s = session_when(&b, &id, &format!("{nat:?}: counters"), |s| {
            s["legs"][0]["packets_in"].as_u64() >= Some(u64::from(COUNT))
                && s["legs"][1]["packets_in"].as_u64() >= Some(u64::from(COUNT))
        });
        let latched: SocketAddr = s["legs"][0]["latched"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{nat:?}: leg 0 not latched: {s}"));
        assert_eq!(
            latched.ip(),
            std::net::IpAddr::V4(wan(n)),
            "{nat:?}: latched onto the router: {s}"
        );
        if nat.endpoint_independent_mapping() {
            assert_eq!(latched.port(), RTP, "{nat:?}: {s}");
        }
        assert_eq!(s["legs"][1]["latched"], gw.to_string(), "{nat:?}: {s}");
        assert!(
            s["legs"][0]["packets_in"].as_u64() >= Some(u64::from(COUNT)),
            "{s}"
        );
        assert_eq!(s["legs"][0]["foreign_dropped"].as_u64(), Some(0), "{s}");
        b.json("DELETE", &format!("/api/v1/media/sessions/{id}"), "", 204);
        b.json("GET", &format!("/api/v1/media/sessions/{id}"), "", 404);
    }
}

/// GET of session `id` until `ok` holds (3 s at most: the dataplane publishes a session's
/// counters every 250 ms); the last answer.
fn session_when(
    b: &Boxed,
    id: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let good = portico_testkit::process::wait_until(Duration::from_secs(3), || {
        last = b.json("GET", &format!("/api/v1/media/sessions/{id}"), "", 200);
        ok(&last)
    });
    assert!(good, "{what}: GET /api/v1/media/sessions/{id}: {last}");
    last
}

/// Two branches: phones 1-4 behind one router of each NAT type; calls between phone 1
/// (full cone) and 4 (symmetric), and 2 (restricted) and 3 (port-restricted).
const CALLS: [(u8, u8); 2] = [(1, 4), (2, 3)];

fn branch_lab(test: &str) -> Option<Lab> {
    let lab = Lab::new(test)?;
    for (i, nat) in ALL_NATS.iter().enumerate() {
        lab.nat_phone(i as u8 + 1, *nat);
    }
    Some(lab)
}

/// Phones in two private networks signal their private addresses and hear nothing of each
/// other, whatever their NATs (even a full cone).
#[test]
fn private_to_private_fails_without_a_relay() {
    let Some(lab) = branch_lab("media-private") else {
        return;
    };
    let go = Go::new(&lab);
    let mut runs = Vec::new();
    for (a, c) in CALLS {
        let (pa, pc) = (sa(phone(a), RTP), sa(phone(c), RTP));
        let ra = Rtp::start(&lab, &format!("phone{a}"), pa, To::Addr(pc), COUNT, &go);
        let rc = Rtp::start(&lab, &format!("phone{c}"), pc, To::Addr(pa), COUNT, &go);
        runs.push((a, c, ra, rc));
    }
    go.fire();
    for (a, c, ra, rc) in runs {
        let what = format!(
            "{:?} <-> {:?}",
            ALL_NATS[a as usize - 1],
            ALL_NATS[c as usize - 1]
        );
        let (ra, rc) = (ra.report(), rc.report());
        // Both phones did send (their routers forwarded it; the internet had no route).
        assert_eq!(
            (ra.sent(), rc.sent()),
            (u64::from(COUNT), u64::from(COUNT)),
            "{what}"
        );
        ra.expect_nothing(&format!("{what}: phone {a}"));
        rc.expect_nothing(&format!("{what}: phone {c}"));
    }
}

fn plus1(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip(), a.port() + 1)
}

/// Sets up the two branch calls through media sessions: each phone has sent its first
/// packet to its leg. Returns (a, c, id, leg a, leg c) per call.
fn branch_sessions(lab: &Lab, b: &Boxed) -> Vec<(u8, u8, String, SocketAddr, SocketAddr)> {
    CALLS
        .iter()
        .map(|&(a, c)| {
            let (pa, pc) = (sa(phone(a), RTP), sa(phone(c), RTP));
            // Both phones signal private addresses: no leg has a usable one.
            let (id, la, lc) = session(b, None, None, &format!("branch {a}-{c}"));
            // RTP and RTCP (port + 1 on both sides), each latched on its own.
            for (n, p, l) in [(a, pa, la), (c, pc, lc)] {
                Rtp::prime(lab, &format!("phone{n}"), p, l);
                Rtp::prime(lab, &format!("phone{n}"), plus1(p), plus1(l));
            }
            (a, c, id, la, lc)
        })
        .collect()
}

/// The branch case through a media relay session on Portico's public box: each phone sends
/// to its leg (the address the PBX put into the SDP), RTP and RTCP; after each phone's first
/// packets have latched its leg, a call of 2 s arrives complete both ways, RTP and RTCP, for
/// every NAT type.
#[test]
fn media_relay_fixes_the_branch_case() {
    let Some(lab) = branch_lab("media-branch") else {
        return;
    };
    lab.public("box", &[BOX]);
    let b = Boxed::start(&lab, "box", BOX, None, &[NET], MEDIA);
    let sessions = branch_sessions(&lab, &b);
    let go = Go::new(&lab);
    let mut runs = Vec::new();
    for (a, c, id, la, lc) in sessions {
        for rtcp in [false, true] {
            let (pa, pc) = (sa(phone(a), RTP), sa(phone(c), RTP));
            let (pa, pc, la, lc) = if rtcp {
                (plus1(pa), plus1(pc), plus1(la), plus1(lc))
            } else {
                (pa, pc, la, lc)
            };
            let ra = Rtp::start(&lab, &format!("phone{a}"), pa, To::Addr(la), COUNT, &go);
            let rc = Rtp::start(&lab, &format!("phone{c}"), pc, To::Addr(lc), COUNT, &go);
            runs.push((a, c, id.clone(), rtcp, la, lc, ra, rc));
        }
    }
    go.fire();
    for (a, c, id, rtcp, la, lc, ra, rc) in runs {
        let what = format!(
            "{:?} <-> {:?} ({})",
            ALL_NATS[a as usize - 1],
            ALL_NATS[c as usize - 1],
            if rtcp { "RTCP" } else { "RTP" }
        );
        ra.report().expect_all(
            u64::from(COUNT),
            la,
            &format!("{what}: phone {a} hears {c}"),
        );
        rc.report().expect_all(
            u64::from(COUNT),
            lc,
            &format!("{what}: phone {c} hears {a}"),
        );
        if rtcp {
            continue;
        }
        let s = session_when(&b, &id, &format!("{what}: counters"), |s| {
            s["legs"][0]["packets_in"].as_u64() >= Some(u64::from(COUNT))
                && s["legs"][1]["packets_in"].as_u64() >= Some(u64::from(COUNT))
        });
        for (leg, n) in [(0, a), (1, c)] {
            let latched = s["legs"][leg]["latched"].as_str().unwrap_or("");
            assert!(
                latched.starts_with(&format!("{}:", wan(n))),
                "{what}: leg {leg} latched onto router {n}: {s}"
            );
            assert_eq!(s["legs"][leg]["foreign_dropped"].as_u64(), Some(0), "{s}");
        }
    }
}

/// After the learning window, a third host on the internet sends RTP to a latched leg while
/// the call goes on: none of it reaches the other phone, the leg stays latched on the
/// phone, the call loses nothing, and the packets are counted and reported as suspicious.
#[test]
fn a_third_host_cannot_hijack_a_latched_leg() {
    let Some(lab) = branch_lab("media-hijack") else {
        return;
    };
    lab.public("box", &[BOX]);
    let attacker = Ipv4Addr::new(198, 18, 0, 66);
    lab.public("attacker", &[attacker]);
    let b = Boxed::start(&lab, "box", BOX, None, &[NET], MEDIA);
    let sessions = branch_sessions(&lab, &b);
    let (a, c, id, la, lc) = sessions[0].clone();
    // Past the 2 s learning window of both legs.
    std::thread::sleep(Duration::from_millis(2500));
    let before = b.json("GET", &format!("/api/v1/media/sessions/{id}"), "", 200);
    let go = Go::new(&lab);
    let ra = Rtp::start(
        &lab,
        &format!("phone{a}"),
        sa(phone(a), RTP),
        To::Addr(la),
        COUNT,
        &go,
    );
    let rc = Rtp::start(
        &lab,
        &format!("phone{c}"),
        sa(phone(c), RTP),
        To::Addr(lc),
        COUNT,
        &go,
    );
    let evil = Rtp::start(
        &lab,
        "attacker",
        sa(attacker, 9000),
        To::Addr(la),
        COUNT,
        &go,
    );
    go.fire();
    let (ra, rc, evil) = (ra.report(), rc.report(), evil.report());
    // Phone c hears phone a only (one SSRC, from its leg), phone a hears c: nothing lost.
    rc.expect_all(u64::from(COUNT), lc, "phone c during the attack");
    assert_eq!(
        rc.0["ssrcs"]
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>()),
        Some(vec![ra.0["ssrc"].as_str().unwrap_or("").to_string()]),
        "only phone a's stream reaches phone c: {:?}",
        rc.0
    );
    ra.expect_all(u64::from(COUNT), la, "phone a during the attack");
    evil.expect_nothing("the attacker");
    let after = session_when(&b, &id, "foreign packets counted on leg 0", |s| {
        s["legs"][0]["foreign_dropped"].as_u64() >= Some(u64::from(COUNT))
    });
    assert_eq!(
        after["legs"][0]["latched"], before["legs"][0]["latched"],
        "leg 0 was taken over: {after}"
    );
    assert!(
        after["legs"][0]["foreign_dropped"].as_u64() >= Some(u64::from(COUNT)),
        "foreign packets counted on the leg: {after}"
    );
    // The drops and the suspicious events (through the fraud engine, at most one per leg
    // per second) in /metrics.
    let mut metrics = String::new();
    let counted = |m: &str| {
        let metric = portico_testkit::metrics::metric;
        (
            metric(
                m,
                "portico_dataplane_drops_total",
                &[("reason", "media_foreign_source")],
            ),
            metric(
                m,
                "portico_fraud_suspicious_events_total",
                &[("origin", "media"), ("reason", "media_foreign_source")],
            ),
        )
    };
    let ok = portico_testkit::process::wait_until(Duration::from_secs(5), || {
        metrics = b.metrics();
        let (foreign, suspicious) = counted(&metrics);
        foreign >= f64::from(COUNT) && suspicious >= 1.0
    });
    assert!(
        ok,
        "(drops, suspicious events) = {:?}:\n{}",
        counted(&metrics),
        metrics
            .lines()
            .filter(|l| l.contains("media"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
