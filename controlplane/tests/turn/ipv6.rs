//! IPv6 relays (RFC 8656 §7.2, RFC 6156) against the real `portico`: coturn's
//! `turnutils_uclient -x` (REQUESTED-ADDRESS-FAMILY IPv6) relays through IPv6 relays to
//! `turnutils_peer` on ::1 with no loss, the client talking to Portico over IPv4 and over
//! IPv6; the kit's TURN client makes a dual allocation (ADDITIONAL-ADDRESS-FAMILY) and
//! relays to an IPv4 and an IPv6 peer on the same allocation, on both packet drivers; a
//! server without an IPv6 relay address answers 440.
//!
//! coturn 4.6's own dual allocation (`-Z`) is not used: it sends the code points of the
//! draft before RFC 8656 (0x8032 and 0x8033, registered to other attributes since), which
//! Portico ignores like any unknown comprehension-optional attribute.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::net::port_becomes_free;
use portico_testkit::process::run;
use portico_testkit::stun::{
    ADDITIONAL_ADDRESS_FAMILY, ADDRESS_ERROR_CODE, REQUESTED_ADDRESS_FAMILY, XOR_RELAYED_ADDRESS,
};
use portico_testkit::turn::{udp_transport, EchoPeer, Relayed, TurnClient, PASSWORD, USER};
use portico_testkit::{Portico, Spec, LOCAL4, LOCAL6};

use crate::{coturn_peer_on, totals, turn_spec, uclient, CLIENTS, LIMIT, MESSAGES};

/// Relayed addresses of the allocations Portico logged ("allocation created ... relay=A").
fn logged_relays(log: &str) -> Vec<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("allocation created"))
        .filter_map(|l| l.split_once(" relay=").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// `turnutils_uclient -x` with `flags`, talking to Portico at `server`, relaying to a
/// `turnutils_peer` on ::1: every message comes back, and every allocation was an IPv6
/// relay of this Portico.
fn uclient_to_an_ipv6_peer(server: IpAddr, flags: &[&str]) {
    let p = Portico::start("turn-v6-uclient", turn_spec("auto", true));
    let peer = coturn_peer_on(&p, LOCAL6);
    let mut args: Vec<String> = ["-x"].iter().chain(flags).map(|s| s.to_string()).collect();
    let (port, peer_port) = (p.port.to_string(), peer.addr.port().to_string());
    let (n, m, server) = (
        MESSAGES.to_string(),
        CLIENTS.to_string(),
        server.to_string(),
    );
    args.extend(
        [
            "-u", USER, "-w", PASSWORD, "-p", &port, "-e", "::1", "-r", &peer_port, "-n", &n, "-m",
            &m, "-l", "172", &server,
        ]
        .map(String::from),
    );
    let r = run(&uclient(), &args, &[], LIMIT);
    let what = format!("turnutils_uclient {args:?}");
    assert!(!r.timed_out, "{what} did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "{what} failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "{what} lost packets:\n{}",
        r.text
    );
    let (sent, received) = totals(&r.text).unwrap_or_else(|| panic!("no totals:\n{}", r.text));
    assert_eq!(sent, MESSAGES * CLIENTS, "{what}:\n{}", r.text);
    assert_eq!(received, sent, "{what}:\n{}", r.text);

    // Through this Portico's IPv6 relays, both ways.
    assert!(p.counter(Counter::RelayClientToPeerPackets) >= sent);
    assert!(p.counter(Counter::RelayPeerToClientPackets) >= sent);
    assert_eq!(p.counter(Counter::DropNoPermission), 0);
    assert_eq!(p.counter(Counter::TurnPeerDeniedSpecial), 0);
    let relays = logged_relays(&p.log());
    assert!(
        relays.len() as u64 >= CLIENTS
            && relays.len() as u64 == p.counter(Counter::TurnAllocationsCreated),
        "{what}: allocations logged: {relays:?}"
    );
    assert!(
        relays.iter().all(|a| a.ip() == LOCAL6),
        "{what}: not all relays on ::1: {relays:?}"
    );
    if !flags.contains(&"-c") {
        // RTCP: EVEN-PORT with a reservation, redeemed by RESERVATION-TOKEN, on IPv6.
        let ports: Vec<u16> = relays.iter().map(|a| a.port()).collect();
        assert!(
            ports.iter().any(|q| q % 2 == 0 && ports.contains(&(q + 1))),
            "{what}: no even/odd IPv6 relay port pair among {ports:?}"
        );
    }
}

#[test]
fn uclient_ipv6_relay_channel_data_to_a_peer_on_ipv6_loopback() {
    uclient_to_an_ipv6_peer(LOCAL4, &[]);
}

#[test]
fn uclient_ipv6_relay_send_indications_to_a_peer_on_ipv6_loopback() {
    uclient_to_an_ipv6_peer(LOCAL4, &["-s", "-c"]);
}

#[test]
fn uclient_over_ipv6_to_an_ipv6_peer() {
    uclient_to_an_ipv6_peer(LOCAL6, &["-c"]);
}

/// The relayed data of the next `n` datagrams, by peer (Data indications) or channel
/// number (ChannelData, keyed as peer `None`).
fn collect(c: &TurnClient, n: usize) -> Vec<(Option<SocketAddr>, u16, Vec<u8>)> {
    (0..n)
        .map(|i| {
            match c
                .recv_relayed(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("relayed datagram {i} of {n} did not arrive"))
            {
                Relayed::Indication { peer, data } => (Some(peer), 0, data),
                Relayed::Channel { number, data } => (None, number, data),
            }
        })
        .collect()
}

/// One allocation, two relays: an IPv4 peer is reached from the IPv4 relayed address and
/// an IPv6 peer from the IPv6 one, by Send indications and by channels, and both answer
/// back to the one client; deleting the allocation frees both relay ports.
fn dual_allocation_relays_to_both_families(io: &'static str) {
    let p = Portico::start("turn-dual", turn_spec(io, true));
    let echo4 = EchoPeer::start(LOCAL4);
    let echo6 = EchoPeer::start(LOCAL6);
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    let r = c.allocate_with(&|b| udp_transport(b).attr(ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]));
    assert!(r.is_success(), "dual Allocate: {:?}", r.code());
    let relayed = r.msg().xor_addresses(XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 2, "two XOR-RELAYED-ADDRESS: {relayed:?}");
    let (relay4, relay6) = (relayed[0], relayed[1]);
    assert_eq!((relay4.ip(), relay6.ip()), (LOCAL4, LOCAL6));
    assert_eq!(r.get(ADDRESS_ERROR_CODE), None);
    for a in [relay4, relay6] {
        assert!(UdpSocket::bind(a).is_err(), "relay {a} is not bound");
    }
    assert_eq!(p.wait_counter(Counter::TurnAllocationsActive, 1), 1);

    // Permissions of both families in one CreatePermission; Send indications out to both.
    let r = c.permit(&[echo4.addr, echo6.addr]);
    assert!(r.is_success(), "CreatePermission: {:?}", r.code());
    let n = 10;
    let mut want = BTreeSet::new();
    for i in 0..n {
        for peer in [echo4.addr, echo6.addr] {
            let data = format!("#{i} to {peer}").into_bytes();
            c.send_indication(peer, &data);
            want.insert((Some(peer), 0, data));
        }
    }
    let got: BTreeSet<_> = collect(&c, 2 * n).into_iter().collect();
    assert_eq!(got, want, "Data indications back from both peers");
    // Each peer saw the relayed address of its own family.
    let seen = |e: &EchoPeer| {
        e.sources
            .lock()
            .unwrap()
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(seen(&echo4), BTreeSet::from([relay4]));
    assert_eq!(seen(&echo6), BTreeSet::from([relay6]));

    // A channel to each.
    assert!(c.bind(0x4000, echo4.addr).is_success());
    assert!(c.bind(0x4001, echo6.addr).is_success());
    let mut want = BTreeSet::new();
    for i in 0..n {
        for number in [0x4000u16, 0x4001] {
            let data = format!("#{i} on {number:#x}").into_bytes();
            c.channel_data(number, &data, i % 2 == 0);
            want.insert((None, number, data));
        }
    }
    let got: BTreeSet<_> = collect(&c, 2 * n).into_iter().collect();
    assert_eq!(got, want, "ChannelData back on both channels");
    assert_eq!(echo4.count(), 2 * n);
    assert_eq!(echo6.count(), 2 * n);
    assert_eq!(seen(&echo6), BTreeSet::from([relay6]));
    assert_eq!(p.counter(Counter::TurnChannelsActive), 2);
    assert_eq!(p.counter(Counter::TurnPermissionsActive), 2);
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 1);

    // Deleting the allocation closes both relay sockets.
    assert!(c.refresh(0).is_success());
    for a in [relay4, relay6] {
        assert!(
            port_becomes_free(a.ip(), a.port(), Duration::from_secs(3)),
            "relay {a} still bound after the allocation was deleted"
        );
    }
    assert_eq!(p.wait_counter(Counter::TurnAllocationsDeleted, 1), 1);
    assert_eq!(p.counter(Counter::TurnPermissionsActive), 0);
}

#[test]
fn dual_allocation_relays_to_an_ipv4_and_an_ipv6_peer_over_io_uring() {
    dual_allocation_relays_to_both_families("io_uring");
}

#[test]
fn dual_allocation_relays_to_an_ipv4_and_an_ipv6_peer_over_epoll() {
    dual_allocation_relays_to_both_families("epoll");
}

/// Listening on 127.0.0.1 only, Portico has no IPv6 relay address: REQUESTED-ADDRESS-FAMILY
/// IPv6 is 440, a dual allocation gets its IPv4 relay and ADDRESS-ERROR-CODE 440 for IPv6,
/// and both family attributes at once are 400.
#[test]
fn without_an_ipv6_relay_address_ipv6_is_440() {
    let spec = Spec::new().io("auto").turn_users().loopback_peers();
    let p = Portico::start("turn-v6-440", spec);
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    c.allocate_with(&|b| udp_transport(b).attr(REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]))
        .expect_error(440);
    c.allocate_with(&|b| {
        udp_transport(b)
            .attr(REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0])
            .attr(ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0])
    })
    .expect_error(400);
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 0);

    let r = c.allocate_with(&|b| udp_transport(b).attr(ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]));
    assert!(r.is_success(), "dual Allocate: {:?}", r.code());
    let relayed = r.msg().xor_addresses(XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    assert_eq!(relayed[0].ip(), LOCAL4);
    let e = r.get(ADDRESS_ERROR_CODE).expect("ADDRESS-ERROR-CODE");
    assert_eq!(e[0], 2, "about IPv6");
    assert_eq!(u16::from(e[2] & 7) * 100 + u16::from(e[3]), 440);
    // The allocation works for IPv4 and refuses IPv6 peers as a family mismatch.
    let echo = EchoPeer::start(LOCAL4);
    assert!(c.permit(&[echo.addr]).is_success());
    c.permit(&[SocketAddr::new(LOCAL6, 9)]).expect_error(443);
    c.send_indication(echo.addr, b"v4 only");
    assert_eq!(
        c.recv_relayed(Duration::from_secs(5)),
        Some(Relayed::Indication {
            peer: echo.addr,
            data: b"v4 only".to_vec()
        })
    );
}
