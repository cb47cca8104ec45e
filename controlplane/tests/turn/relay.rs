//! TURN over UDP against the real `portico` binary: a TURN client on a real socket relays to
//! a UDP echo peer through Portico, with Send/Data indications and with ChannelData, on
//! both packet drivers (they are separate code paths around the same sans-IO core: a header
//! written into the wrong buffer, a reply sent from the wrong socket, a relay socket not
//! closed show up in one of them only).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::net::{expect_silence, port_becomes_free, recv_within, udp_on};
use portico_testkit::stun::{
    new_tid, rest_password, ALLOCATE, NONCE, REALM, REQUESTED_ADDRESS_FAMILY, XOR_MAPPED_ADDRESS,
    XOR_RELAYED_ADDRESS,
};
use portico_testkit::turn::{
    udp_transport, EchoPeer, Relayed, TurnClient, PASSWORD, PREVIOUS_SECRET, SHARED_SECRET, USER,
};
use portico_testkit::{Portico, LOCAL4, LOCAL6};

use crate::turn_spec;

const QUIET: Duration = Duration::from_millis(300);

/// Payloads of varied lengths (odd ones need padding in a Data indication).
fn payload(i: usize) -> Vec<u8> {
    let len = [1usize, 2, 3, 4, 5, 17, 160, 172, 1000][i % 9];
    let mut v = format!("#{i}:").into_bytes();
    v.resize(len.max(v.len()), b'a' + (i % 26) as u8);
    v
}

/// The relayed data of the next `n` datagrams, each checked with `check`.
fn collect(c: &TurnClient, n: usize, check: impl Fn(&Relayed) -> Vec<u8>) -> BTreeSet<Vec<u8>> {
    (0..n)
        .map(|i| {
            let r = c
                .recv_relayed(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("relayed datagram {i} of {n} did not arrive"));
            check(&r)
        })
        .collect()
}

/// Allocate, permission, Send indications both ways, ChannelBind, ChannelData both ways,
/// Refresh, delete; with counters and the relay socket checked at each step.
fn full_flow(io: &'static str) {
    let p = Portico::start("turn-flow", turn_spec(io, true));
    let echo = EchoPeer::start(LOCAL4);
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);

    let r = c.allocate_with(&udp_transport);
    assert!(r.is_success(), "Allocate: {:?}", r.code());
    let relayed = r.xor(XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS");
    assert_eq!(
        relayed.ip(),
        LOCAL4,
        "relay_ip defaults to the listen address"
    );
    assert!((16384..=32767).contains(&relayed.port()), "{relayed}");
    assert_eq!(r.xor(XOR_MAPPED_ADDRESS), Some(c.local()));
    assert_eq!(r.lifetime(), Some(600));
    assert_eq!(p.wait_counter(Counter::TurnAllocationsActive, 1), 1);
    // The relay socket is really bound.
    assert!(
        std::net::UdpSocket::bind(relayed).is_err(),
        "{relayed} is not bound"
    );

    // Without a permission, nothing a peer sends reaches the client.
    let stranger = udp_on(LOCAL4);
    stranger.send_to(b"unsolicited", relayed).unwrap();
    assert!(p.wait_counter(Counter::DropNoPermission, 1) >= 1);
    expect_silence(&c.sock, QUIET, "data from a peer without permission");

    // Send indications out, Data indications back.
    let r = c.permit(&[echo.addr]);
    assert!(r.is_success(), "CreatePermission: {:?}", r.code());
    let n = 30;
    let sent: BTreeSet<Vec<u8>> = (0..n).map(payload).collect();
    for d in &sent {
        c.send_indication(echo.addr, d);
    }
    let got = collect(&c, n, |r| match r {
        Relayed::Indication { peer, data } => {
            assert_eq!(*peer, echo.addr);
            data.clone()
        }
        other => panic!("expected a Data indication, got {other:?}"),
    });
    assert_eq!(got, sent);
    // The peer saw the relayed address as the source.
    assert!(echo.sources.lock().unwrap().iter().all(|s| *s == relayed));

    // A channel: ChannelData out (padded and unpadded), ChannelData back.
    let r = c.bind(0x4000, echo.addr);
    assert!(r.is_success(), "ChannelBind: {:?}", r.code());
    let sent: BTreeSet<Vec<u8>> = (100..100 + n).map(payload).collect();
    for (i, d) in sent.iter().enumerate() {
        c.channel_data(0x4000, d, i % 2 == 0);
    }
    let got = collect(&c, n, |r| match r {
        Relayed::Channel { number, data } => {
            assert_eq!(*number, 0x4000);
            data.clone()
        }
        other => panic!("expected ChannelData, got {other:?}"),
    });
    assert_eq!(got, sent);
    assert_eq!(echo.count(), 2 * n);
    assert!(p.counter(Counter::RelayClientToPeerPackets) >= 2 * n as u64);
    assert!(p.counter(Counter::RelayPeerToClientPackets) >= 2 * n as u64);
    assert_eq!(p.counter(Counter::TurnChannelsActive), 1);
    assert_eq!(p.counter(Counter::TurnPermissionsActive), 1);

    // Refresh, then delete: the relay socket is closed and the port free again.
    let r = c.refresh(1200);
    assert!(r.is_success());
    assert_eq!(r.lifetime(), Some(1200));
    let r = c.refresh(0);
    assert!(r.is_success(), "Refresh 0: {:?}", r.code());
    assert_eq!(r.lifetime(), Some(0));
    assert_eq!(p.wait_counter(Counter::TurnAllocationsDeleted, 1), 1);
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 0);
    assert_eq!(p.counter(Counter::TurnChannelsActive), 0);
    assert_eq!(p.counter(Counter::TurnPermissionsActive), 0);
    assert!(
        port_becomes_free(relayed.ip(), relayed.port(), Duration::from_secs(3)),
        "relay port {relayed} still bound after the allocation was deleted"
    );
    let before = echo.count();
    c.channel_data(0x4000, b"after delete", true);
    std::thread::sleep(QUIET);
    assert_eq!(
        echo.count(),
        before,
        "relayed after the allocation was deleted"
    );
}

#[test]
fn full_flow_over_io_uring() {
    full_flow("io_uring");
}

#[test]
fn full_flow_over_epoll() {
    full_flow("epoll");
}

#[test]
fn ipv6_allocation_relays_to_an_ipv6_peer() {
    let p = Portico::start("turn-v6", turn_spec("auto", true));
    let echo = EchoPeer::start(LOCAL6);
    let mut c = TurnClient::new(p.udp6(), USER, PASSWORD);
    let r = c.allocate_with(&|b| udp_transport(b).attr(REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]));
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.xor(XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(relayed.ip(), LOCAL6);
    assert!(c.permit(&[echo.addr]).is_success());
    c.send_indication(echo.addr, b"over ipv6");
    assert_eq!(
        c.recv_relayed(Duration::from_secs(5)),
        Some(Relayed::Indication {
            peer: echo.addr,
            data: b"over ipv6".to_vec()
        })
    );
    assert!(c.bind(0x4001, echo.addr).is_success());
    c.channel_data(0x4001, b"chan6", false);
    assert_eq!(
        c.recv_relayed(Duration::from_secs(5)),
        Some(Relayed::Channel {
            number: 0x4001,
            data: b"chan6".to_vec()
        })
    );
    // An IPv4 peer on an IPv6 relay.
    c.permit(&["127.0.0.1:9".parse().unwrap()])
        .expect_error(443);
}

#[test]
fn retransmitted_allocate_gets_the_same_relayed_address() {
    let p = Portico::start("turn-retx", turn_spec("auto", true));
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    // Learn the nonce, then send one signed Allocate three times, as a client whose answers
    // got lost would.
    let challenge = c.transact(&c.build(ALLOCATE, &new_tid(), &udp_transport));
    challenge.expect_error(401);
    c.realm = challenge.get(REALM);
    c.nonce = challenge.get(NONCE);
    let req = c.build(ALLOCATE, &new_tid(), &udp_transport);
    let first = c.transact(&req);
    assert!(first.is_success(), "{:?}", first.code());
    let relayed = first.xor(XOR_RELAYED_ADDRESS).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..2 {
        let again = c.transact(&req);
        assert!(again.is_success(), "retransmission: {:?}", again.code());
        assert_eq!(again.xor(XOR_RELAYED_ADDRESS), Some(relayed));
        assert_eq!(again.xor(XOR_MAPPED_ADDRESS), Some(c.local()));
    }
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 1);
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 1);
    // A new transaction from the same 5-tuple is a mismatch.
    c.allocate_with(&udp_transport).expect_error(437);
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 1);
}

#[test]
fn loopback_peer_is_refused_without_allow_peers() {
    let p = Portico::start("turn-deny", turn_spec("auto", false));
    let echo = EchoPeer::start(LOCAL4);
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    c.allocate();
    c.permit(&[echo.addr]).expect_error(403);
    c.bind(0x4000, echo.addr).expect_error(403);
    // The same peer written as an IPv4-mapped IPv6 address.
    let mapped = SocketAddr::new(
        IpAddr::V6(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        echo.addr.port(),
    );
    c.permit(&[mapped]).expect_error(403);
    assert!(p.wait_counter(Counter::TurnPeerDeniedSpecial, 3) >= 3);
    c.send_indication(echo.addr, b"must not arrive");
    std::thread::sleep(QUIET);
    assert_eq!(echo.count(), 0, "a denied peer received data");
    expect_silence(&c.sock, QUIET, "denied peer");
}

#[test]
fn two_clients_reach_each_other_through_their_relays_without_allow_peers() {
    let p = Portico::start("turn-c2c", turn_spec("auto", false));
    let mut a = TurnClient::new(p.udp4(), USER, PASSWORD);
    let mut b = TurnClient::new(p.udp4(), "bob", "builder");
    let ra = a.allocate();
    let rb = b.allocate();
    // Loopback is denied, but these are the server's own relayed addresses.
    assert!(a.permit(&[rb]).is_success());
    assert!(b.bind(0x4100, ra).is_success());
    a.send_indication(rb, b"a->b");
    assert_eq!(
        b.recv_relayed(Duration::from_secs(5)),
        Some(Relayed::Channel {
            number: 0x4100,
            data: b"a->b".to_vec()
        })
    );
    b.channel_data(0x4100, b"b->a", true);
    assert_eq!(
        a.recv_relayed(Duration::from_secs(5)),
        Some(Relayed::Indication {
            peer: rb,
            data: b"b->a".to_vec()
        })
    );
}

#[test]
fn wrong_password_and_unknown_user_get_401_and_no_allocation() {
    let p = Portico::start("turn-auth", turn_spec("auto", true));
    let mut c = TurnClient::new(p.udp4(), USER, "wrong");
    c.allocate_with(&udp_transport).expect_error(401);
    let mut c = TurnClient::new(p.udp4(), "mallory", PASSWORD);
    c.allocate_with(&udp_transport).expect_error(401);
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 0);
    assert!(p.counter(Counter::TurnAuthBadIntegrity) >= 1);
    assert!(p.counter(Counter::TurnAuthUnknownUser) >= 1);
}

#[test]
fn rest_api_credentials_allocate() {
    let p = Portico::start("turn-rest", turn_spec("auto", true));
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let user = format!("{expiry}:carol");
    let pw = rest_password(SHARED_SECRET.as_bytes(), user.as_bytes());
    let mut c = TurnClient::new(p.udp4(), &user, &pw);
    c.allocate();
    // Signed with the previous secret (rollover) on another 5-tuple.
    let pw = rest_password(PREVIOUS_SECRET.as_bytes(), user.as_bytes());
    let mut c = TurnClient::new(p.udp4(), &user, &pw);
    c.allocate();
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 2);
}

/// Unauthenticated requests from one source get at most a burst of twice `error_rate`
/// error responses plus the refill; the rest are dropped, so Portico reflects little.
#[test]
fn error_responses_to_one_source_are_rate_limited() {
    let p = Portico::start(
        "turn-ratelimit",
        turn_spec("auto", true).turn("error_rate = 10"),
    );
    let s = udp_on(LOCAL4);
    let c = TurnClient::new(p.udp4(), USER, PASSWORD);
    let start = Instant::now();
    let total: u64 = 100;
    for _ in 0..total {
        let req = c.build(ALLOCATE, &new_tid(), &udp_transport);
        s.send_to(&req, p.udp4()).unwrap();
    }
    let mut answered = 0u64;
    while recv_within(&s, Duration::from_millis(500)).is_some() {
        answered += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bound = 20 + (10.0 * elapsed).ceil() as u64;
    assert!(answered >= 20, "only {answered} of the burst answered");
    assert!(
        answered <= bound,
        "{answered} error responses in {elapsed:.2}s (at most {bound})"
    );
    assert!(p.wait_counter(Counter::DropRateLimited, total - bound) >= total - bound);
}
