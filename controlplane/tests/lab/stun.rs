//! STUN behind each NAT type (reference: "STUN", "STUN in innovaphone devices"): the
//! server-reflexive address a phone learns is its router's public address, and RFC 5780
//! behaviour discovery against Portico (alternate address 198.18.0.11, port 3479) tells the
//! four NAT types apart, by the test's own classifier (RFC 5780 §4.3, §4.4) and by coturn's
//! `turnutils_natdiscovery`. Then why STUN alone "may or may not work, depending on the
//! router": two phones that send RTP to each other's STUN address get through between two
//! port-restricted NATs, one way only with a symmetric NAT on one side, not at all between
//! symmetric NATs. TURN (turn.rs) and the media relay (media.rs) fix what fails here.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use portico_testkit::net::recv_answer;
use portico_testkit::process::{require, run};
use portico_testkit::stun::{Builder, Class, Msg, CHANGE_IP, CHANGE_PORT, OTHER_ADDRESS};

use crate::{join, rtp_packet, rtp_seq, sa, Boxed, Lab, Nat, ALL_NATS, BOX, BOX_ALT, NET, RTP};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

use Behaviour::*;

fn expected(nat: Nat) -> (Behaviour, Behaviour) {
    match nat {
        Nat::FullCone => (EndpointIndependent, EndpointIndependent),
        Nat::Restricted => (EndpointIndependent, AddressDependent),
        Nat::PortRestricted => (EndpointIndependent, AddressAndPortDependent),
        Nat::Symmetric => (AddressAndPortDependent, AddressAndPortDependent),
    }
}

/// A Binding request (with CHANGE-REQUEST `flags` when not 0) to `to`, whose answer must
/// come from `from`: the success answer, or None after three tries of 700 ms (so a datagram
/// lost on a busy machine is not taken for filtering).
fn ask(s: &UdpSocket, to: SocketAddr, flags: u32, from: SocketAddr) -> Option<Msg> {
    for _ in 0..3 {
        let mut req = Builder::binding();
        if flags != 0 {
            req = req.change_request(flags);
        }
        let tid = req.tid();
        s.send_to(&req.build(), to).ok()?;
        if let Some(bytes) = recv_answer(s, from, &tid, Duration::from_millis(700)) {
            let m = Msg::parse(&bytes).unwrap_or_else(|e| panic!("answer from {from}: {e}"));
            assert_eq!(m.class(), Class::Success, "answer from {from}");
            return Some(m);
        }
    }
    None
}

/// What the classifier found from one phone.
#[derive(Debug)]
struct Found {
    mapped: SocketAddr,
    mapping: Behaviour,
    filtering: Behaviour,
}

/// RFC 5780 §4.3 (mapping) and §4.4 (filtering), run inside the phone's namespace from
/// `local` (mapping) and `local` + 2 (filtering, a fresh binding).
fn classify(local: SocketAddr) -> Found {
    let primary = sa(BOX, 3478);
    let s = UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind {local}: {e}"));
    // Test I: the mapped address, and where the other address is.
    let m1 =
        ask(&s, primary, 0, primary).unwrap_or_else(|| panic!("{local}: no answer from {primary}"));
    let x1 = m1
        .xor_mapped()
        .unwrap_or_else(|| panic!("no XOR-MAPPED-ADDRESS"));
    let other = m1
        .address(OTHER_ADDRESS)
        .unwrap_or_else(|| panic!("no OTHER-ADDRESS: RFC 5780 is off"));
    assert_eq!(other, sa(BOX_ALT, 3479), "OTHER-ADDRESS");
    assert_ne!(
        x1, local,
        "{local} is behind a NAT, yet the server saw its own address"
    );
    // Test II: the alternate IP, primary port.
    let alt_ip = SocketAddr::new(other.ip(), primary.port());
    let x2 = ask(&s, alt_ip, 0, alt_ip)
        .and_then(|m| m.xor_mapped())
        .unwrap_or_else(|| panic!("{local}: no answer from {alt_ip}"));
    let mapping = if x2 == x1 {
        EndpointIndependent
    } else {
        // Test III: the alternate IP and port.
        let x3 = ask(&s, other, 0, other)
            .and_then(|m| m.xor_mapped())
            .unwrap_or_else(|| panic!("{local}: no answer from {other}"));
        if x3 == x2 {
            AddressDependent
        } else {
            AddressAndPortDependent
        }
    };
    // Filtering, on a fresh binding: test I, then change IP and port, then port only.
    let local2 = SocketAddr::new(local.ip(), local.port() + 2);
    let f = UdpSocket::bind(local2).unwrap_or_else(|e| panic!("bind {local2}: {e}"));
    ask(&f, primary, 0, primary).unwrap_or_else(|| panic!("{local2}: no answer"));
    let filtering = if ask(&f, primary, CHANGE_IP | CHANGE_PORT, other).is_some() {
        EndpointIndependent
    } else if ask(&f, primary, CHANGE_PORT, sa(BOX, 3479)).is_some() {
        AddressDependent
    } else {
        AddressAndPortDependent
    };
    Found {
        mapped: x1,
        mapping,
        filtering,
    }
}

/// A lab with Portico (RFC 5780 on) on the internet and one phone behind a router of each
/// type: router n (public 198.18.0.10n) for ALL_NATS[n-1].
fn nat_zoo(test: &str) -> Option<(Lab, Boxed)> {
    let lab = Lab::new(test)?;
    lab.public("box", &[BOX, BOX_ALT]);
    for (i, nat) in ALL_NATS.iter().enumerate() {
        lab.nat_phone(i as u8 + 1, *nat);
    }
    let b = Boxed::start(&lab, "box", BOX, Some(BOX_ALT), &[NET], "");
    Some((lab, b))
}

/// Behind every NAT type the reflexive address is the router's public address (with the
/// phone's own port where the mapping is endpoint independent), never the private one; and
/// the RFC 5780 tests classify each type as built.
#[test]
fn stun_reflexive_address_and_rfc5780_behaviour_per_nat_type() {
    let Some((lab, _box)) = nat_zoo("stun-reflexive") else {
        return;
    };
    let runs: Vec<_> = ALL_NATS
        .iter()
        .enumerate()
        .map(|(i, nat)| {
            let n = i as u8 + 1;
            let local = sa(std::net::Ipv4Addr::new(10, 0, n, 2), RTP);
            (
                *nat,
                n,
                lab.spawn_within(&format!("phone{n}"), move || classify(local)),
            )
        })
        .collect();
    for (nat, n, h) in runs {
        let found = join(h);
        let wan = std::net::Ipv4Addr::new(198, 18, 0, 100 + n);
        assert_eq!(
            found.mapped.ip(),
            wan,
            "{nat:?}: reflexive address {found:?}"
        );
        if nat.endpoint_independent_mapping() {
            assert_eq!(
                found.mapped,
                sa(wan, RTP),
                "{nat:?}: the port is kept: {found:?}"
            );
        }
        assert_eq!(
            (found.mapping, found.filtering),
            expected(nat),
            "{nat:?}: RFC 5780 mapping and filtering: {found:?}"
        );
    }
}

/// coturn's `turnutils_natdiscovery`, an independent RFC 5780 client, run behind each
/// router against Portico, names each NAT type's mapping and filtering.
#[test]
fn turnutils_natdiscovery_classifies_each_nat_type() {
    let tool = require("turnutils_natdiscovery", "coturn");
    let Some((lab, b)) = nat_zoo("stun-natdiscovery") else {
        return;
    };
    let runs: Vec<_> = ALL_NATS
        .iter()
        .enumerate()
        .map(|(i, nat)| {
            let n = i as u8 + 1;
            let ns = lab.ns(&format!("phone{n}"));
            let tool = tool.clone();
            let h = std::thread::spawn(move || {
                let args = ["netns", "exec", &ns]
                    .map(String::from)
                    .into_iter()
                    .chain([tool.display().to_string()])
                    .chain(["-m", "-f", &BOX.to_string()].map(String::from))
                    .collect::<Vec<_>>();
                run(
                    std::path::Path::new("ip"),
                    &args,
                    &[],
                    Duration::from_secs(40),
                )
            });
            (*nat, n, h)
        })
        .collect();
    for (nat, n, h) in runs {
        let r = join(h);
        assert!(
            !r.timed_out,
            "natdiscovery behind {nat:?} did not finish:\n{}",
            r.text
        );
        let text: String = r
            .text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        let (mapping, filtering) = match nat {
            Nat::FullCone => ("Endpoint Independent", "Endpoint Independent"),
            Nat::Restricted => ("Endpoint Independent", "Address Dependent"),
            Nat::PortRestricted => ("Endpoint Independent", "Address and Port Dependent"),
            Nat::Symmetric => ("Address and Port Dependent", "Address and Port Dependent"),
        };
        for want in [
            format!("NAT with {mapping} Mapping!"),
            format!("NAT with {filtering} Filtering!"),
            format!("UDP reflexive addr: 198.18.0.{}:", 100 + n),
        ] {
            assert!(
                text.contains(&want),
                "behind {nat:?}: missing {want:?} in:\n{}",
                r.text
            );
        }
        assert!(!text.contains("rror"), "behind {nat:?}:\n{}", r.text);
    }
    // The answers were Portico's: 4 tools, each at least 5 Binding requests answered (test I,
    // II and III of the mapping, the filtering tests that get through, and the readiness
    // probe besides).
    let answered = portico_testkit::metrics::metric(
        &b.metrics(),
        "portico_stun_requests_total",
        &[("result", "success")],
    );
    assert!(
        answered >= 4.0 * 5.0,
        "Binding requests answered by Portico: {answered}"
    );
}

/// Two phones behind NATs learn their reflexive addresses from Portico, signal them, and
/// send 10 RTP packets to each other at the same time (simultaneous "hole punching"): how
/// many arrive each way, by pair.
fn punch(lab: &Lab, a: u8, c: u8) -> (usize, usize) {
    let learn = |n: u8| {
        lab.spawn_within(&format!("phone{n}"), move || {
            let s = UdpSocket::bind(sa(std::net::Ipv4Addr::new(10, 0, n, 2), RTP))
                .unwrap_or_else(|e| panic!("{e}"));
            let box_addr = sa(BOX, 3478);
            let m = ask(&s, box_addr, 0, box_addr).unwrap_or_else(|| panic!("no STUN answer"));
            let mapped = m
                .xor_mapped()
                .unwrap_or_else(|| panic!("no mapped address"));
            (s, mapped)
        })
    };
    let (sa_, ma) = join(learn(a));
    let (sc, mc) = join(learn(c));
    let talk = |s: UdpSocket, to: SocketAddr, ssrc: u32| {
        std::thread::spawn(move || {
            for seq in 0..10u16 {
                let _ = s.send_to(&rtp_packet(seq, ssrc), to);
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut got = std::collections::BTreeSet::new();
            let mut buf = [0u8; 2048];
            s.set_read_timeout(Some(Duration::from_millis(800))).ok();
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                // STUN answers are not RTP (version bits 0); RTP from the other phone is.
                if let Some(seq) = rtp_seq(&buf[..n]) {
                    got.insert(seq);
                }
            }
            got.len()
        })
    };
    let ha = talk(sa_, mc, 0xa);
    let hc = talk(sc, ma, 0xc);
    (join(ha), join(hc))
}

/// STUN addresses work between some NATs and not others: both ways between two
/// port-restricted NATs, only towards the full cone with a symmetric NAT on the other
/// side, not at all between a port-restricted and a symmetric NAT or two symmetric ones.
#[test]
fn stun_addresses_work_only_between_some_nat_types() {
    let Some(lab) = Lab::new("stun-punch") else {
        return;
    };
    lab.public("box", &[BOX, BOX_ALT]);
    let pairs = [
        (Nat::PortRestricted, Nat::PortRestricted, true, true),
        (Nat::FullCone, Nat::Symmetric, true, false),
        (Nat::PortRestricted, Nat::Symmetric, false, false),
        (Nat::Symmetric, Nat::Symmetric, false, false),
    ];
    for (i, (a, c, _, _)) in pairs.iter().enumerate() {
        lab.nat_phone(2 * i as u8 + 1, *a);
        lab.nat_phone(2 * i as u8 + 2, *c);
    }
    let _box = Boxed::start(&lab, "box", BOX, Some(BOX_ALT), &[NET], "");
    for (i, (a, c, a_gets, c_gets)) in pairs.into_iter().enumerate() {
        let (got_a, got_c) = punch(&lab, 2 * i as u8 + 1, 2 * i as u8 + 2);
        assert_eq!(
            (got_a > 0, got_c > 0),
            (a_gets, c_gets),
            "{a:?} <-> {c:?}: phone A got {got_a} of 10, phone C got {got_c} of 10"
        );
    }
}
