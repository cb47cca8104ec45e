//! TURN (reference: "TURN", "Internal TURN Server"): a phone behind each NAT type and a
//! phone behind a symmetric NAT cannot reach each other with STUN addresses; with a relay
//! each on Portico they exchange RTP without loss. A phone behind a firewall that lets no
//! UDP out gets its media out over TURN over TCP. And the reference's internal TURN server:
//! Portico in the LAN with relay_ip on its internal address, reached by a client on the
//! internet through one DNAT rule for 3478/tcp on the router, relaying to a LAN peer.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use portico_testkit::process::{require, run, Proc, Run};
use portico_testkit::turn::{Relayed, TurnClient, PASSWORD, USER};

use crate::{rtp_packet, rtp_seq, sa, Boxed, Lab, Nat, ALL_NATS, BOX, NET, PROVIDER};

const PACKETS: u16 = 50;
const CHANNEL: u16 = 0x4000;

/// The far phone: behind a symmetric NAT, the worst case, router 9.
const FAR: u8 = 9;

fn phone(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, n, 2)
}

/// Sends PACKETS RTP packets over the channel and returns the sequence numbers `other`
/// received over its own channel.
fn relay_stream(from: &TurnClient, to: &TurnClient, ssrc: u32) -> BTreeSet<u16> {
    for seq in 0..PACKETS {
        from.channel_data(CHANNEL, &rtp_packet(seq, ssrc), false);
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got = BTreeSet::new();
    while let Some(r) = to.recv_relayed(Duration::from_millis(800)) {
        match r {
            Relayed::Channel { number, data } => {
                assert_eq!(number, CHANNEL, "relayed on another channel");
                if let Some(seq) = rtp_seq(&data) {
                    got.insert(seq);
                }
            }
            Relayed::Indication { peer, .. } => {
                panic!("a Data indication from {peer} on a bound channel")
            }
        }
        if got.len() == usize::from(PACKETS) {
            break;
        }
    }
    got
}

/// Without TURN, the far phone never hears a phone behind any NAT type at its STUN address;
/// with a TURN relay each (relay to relay through Portico), all RTP arrives both ways.
#[test]
fn turn_relays_media_between_every_nat_type_and_a_symmetric_nat() {
    let Some(lab) = Lab::new("turn-every-nat") else {
        return;
    };
    lab.public("box", &[BOX]);
    for (i, nat) in ALL_NATS.iter().enumerate() {
        lab.nat_phone(i as u8 + 1, *nat);
    }
    lab.nat_phone(FAR, Nat::Symmetric);
    let _box = Boxed::start(&lab, "box", BOX, None, &[NET], "");
    let server = sa(BOX, 3478);
    for (i, nat) in ALL_NATS.iter().enumerate() {
        let n = i as u8 + 1;
        let near_port = 5100 + u16::from(n) * 2;
        let far_port = 6100 + u16::from(n) * 2;

        // Without help: STUN addresses, RTP straight to them, the far phone hears nothing.
        let stun_near = lab.udp(&format!("phone{n}"), sa(phone(n), near_port));
        let stun_far = lab.udp(&format!("phone{FAR}"), sa(phone(FAR), far_port));
        let srflx = |s: &UdpSocket| {
            portico_testkit::net::binding(s, server, Duration::from_secs(2))
                .and_then(|m| m.xor_mapped())
                .unwrap_or_else(|| panic!("no STUN answer"))
        };
        let (near_srflx, far_srflx) = (srflx(&stun_near), srflx(&stun_far));
        for seq in 0..10 {
            let _ = stun_near.send_to(&rtp_packet(seq, 1), far_srflx);
            let _ = stun_far.send_to(&rtp_packet(seq, 2), near_srflx);
            std::thread::sleep(Duration::from_millis(20));
        }
        let heard = portico_testkit::net::recv_within(&stun_far, Duration::from_millis(800));
        assert!(
            heard.is_none(),
            "{nat:?} -> symmetric without TURN: the far phone heard {heard:?}"
        );

        // With TURN: each allocates a relay on Portico and binds a channel to the other's.
        let mut near = lab.within(&format!("phone{n}"), move || {
            TurnClient::from(phone(n).into(), server, USER, PASSWORD)
        });
        let mut far = lab.within(&format!("phone{FAR}"), move || {
            TurnClient::from(phone(FAR).into(), server, USER, PASSWORD)
        });
        let near_relay = near.allocate();
        let far_relay = far.allocate();
        assert_eq!(
            near_relay.ip(),
            std::net::IpAddr::V4(BOX),
            "relayed address"
        );
        for (c, peer) in [(&mut near, far_relay), (&mut far, near_relay)] {
            let r = c.bind(CHANNEL, peer);
            assert!(r.is_success(), "ChannelBind to {peer}: {:?}", r.code());
        }
        let all: BTreeSet<u16> = (0..PACKETS).collect();
        assert_eq!(
            relay_stream(&near, &far, 0x11),
            all,
            "{nat:?} -> symmetric over TURN"
        );
        assert_eq!(
            relay_stream(&far, &near, 0x22),
            all,
            "symmetric -> {nat:?} over TURN"
        );
    }
}

/// coturn's `turnutils_peer` (a UDP echo) on `addr` inside `node`, once it echoes.
fn coturn_peer(lab: &Lab, node: &str, addr: SocketAddr) -> Proc {
    let mut cmd = lab.command(node, &require("turnutils_peer", "coturn"));
    cmd.args(["-L", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
    let p = Proc::spawn(
        "turnutils_peer",
        &mut cmd,
        &lab.dir.join(format!("peer-{node}.log")),
    );
    let echoes = lab.within(node, move || {
        let s = UdpSocket::bind((addr.ip(), 0)).unwrap_or_else(|e| panic!("{e}"));
        (0..50).any(|_| {
            let _ = s.send_to(b"ping", addr);
            portico_testkit::net::recv_within(&s, Duration::from_millis(100)).is_some()
        })
    });
    assert!(echoes, "turnutils_peer on {addr} in {node} does not echo");
    p
}

/// coturn's `turnutils_uclient` inside `node` with `flags`: 2 clients of `count` messages
/// each through `server:3478` to `peer` (a turnutils_peer), within `limit`.
fn uclient(
    lab: &Lab,
    node: &str,
    flags: &[&str],
    server: Ipv4Addr,
    peer: SocketAddr,
    count: u32,
    limit: Duration,
) -> Run {
    let tool = require("turnutils_uclient", "coturn");
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        lab.ns(node),
        tool.display().to_string(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend(
        [
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-p",
            "3478",
            "-e",
            &peer.ip().to_string(),
            "-r",
            &peer.port().to_string(),
            "-n",
            &count.to_string(),
            "-m",
            "2",
            "-l",
            "172",
            &server.to_string(),
        ]
        .map(String::from),
    );
    run(std::path::Path::new("ip"), &args, &[], limit)
}

/// Every one of the 2 × `count` messages went out and came back.
#[track_caller]
fn expect_no_loss(r: &Run, count: u32, what: &str) {
    assert!(!r.timed_out, "{what}: uclient did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "{what}: uclient failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "{what}: uclient lost packets:\n{}",
        r.text
    );
    let totals = r
        .text
        .lines()
        .rev()
        .find(|l| l.contains("tot_send_msgs="))
        .unwrap_or_else(|| panic!("{what}: no totals:\n{}", r.text));
    let n = 2 * count;
    assert!(
        totals.contains(&format!("tot_send_msgs={n},"))
            && totals.contains(&format!("tot_recv_msgs={n}")),
        "{what}: uclient totals: {totals}"
    );
}

/// A phone behind a corporate firewall that lets no UDP out calls the provider: STUN and
/// TURN over UDP get no answer, TURN over TCP relays its media to the provider's media
/// gateway (an echo, coturn's turnutils_peer) and back without loss (reference: "TURN works
/// with UDP and TCP by design - You should always support both").
#[test]
fn turn_over_tcp_gets_media_out_of_a_network_that_blocks_udp() {
    let Some(lab) = Lab::new("turn-udp-blocked") else {
        return;
    };
    lab.public("box", &[BOX]);
    lab.public("provider", &[PROVIDER]);
    lab.nat_phone(6, Nat::PortRestricted);
    lab.sh(&["block-udp", "r6"]);
    let b = Boxed::start(&lab, "box", BOX, None, &[NET], "");
    let gateway = sa(PROVIDER, 3480);
    let _peer = coturn_peer(&lab, "provider", gateway);

    let stun = lab.within("phone6", || {
        let s = UdpSocket::bind("10.0.6.2:0").unwrap_or_else(|e| panic!("{e}"));
        (0..3).any(|_| {
            portico_testkit::net::binding(&s, sa(BOX, 3478), Duration::from_millis(700)).is_some()
        })
    });
    assert!(!stun, "a STUN Binding over UDP got out of the firewall");
    let r = uclient(
        &lab,
        "phone6",
        &[],
        BOX,
        gateway,
        10,
        Duration::from_secs(8),
    );
    assert!(
        !r.text.contains("Total lost packets 0 (0.000000%)"),
        "TURN over UDP got out of the firewall:\n{}",
        r.text
    );

    let r = uclient(
        &lab,
        "phone6",
        &["-t"],
        BOX,
        gateway,
        100,
        Duration::from_secs(40),
    );
    expect_no_loss(&r, 100, "TURN over TCP from behind the firewall");
    let m = b.metrics();
    let created =
        portico_testkit::metrics::metric(&m, "portico_turn_allocations_created_total", &[]);
    assert!(created >= 2.0, "allocations created: {created}");
}

/// The reference's "Internal TURN Server": Portico sits in the LAN (10.0.5.10, relays on
/// that internal address) behind an ordinary NAT router; a client on the internet reaches it
/// only through one static NAT map, 3478/tcp on the router's public address, and relays
/// over TURN-over-TCP to a peer in the LAN. Without the map the client gets nowhere.
#[test]
fn internal_turn_server_behind_one_tcp_map() {
    let Some(lab) = Lab::new("turn-internal") else {
        return;
    };
    let wan = lab.router("r5", 5, Some(Nat::PortRestricted));
    let turn_box = Ipv4Addr::new(10, 0, 5, 10);
    let peer = Ipv4Addr::new(10, 0, 5, 20);
    lab.host("box", "r5", turn_box);
    lab.host("peer", "r5", peer);
    let client = Ipv4Addr::new(198, 18, 0, 30);
    lab.public("client", &[client]);
    let b = Boxed::start(&lab, "box", turn_box, None, &["10.0.5.0/24"], "");
    let lan_peer = sa(peer, 3480);
    let _peer = coturn_peer(&lab, "peer", lan_peer);

    // Without the map: the router has nothing on 3478/tcp for the client, and the box's
    // own address is not reachable from the internet.
    let r = uclient(
        &lab,
        "client",
        &["-t"],
        wan,
        lan_peer,
        10,
        Duration::from_secs(20),
    );
    assert!(
        !r.text.contains("Total lost packets 0 (0.000000%)"),
        "uclient relayed without a NAT map on the router:\n{}",
        r.text
    );
    let direct = lab.within("client", move || {
        std::net::TcpStream::connect_timeout(&sa(turn_box, 3478), Duration::from_secs(1)).is_ok()
    });
    assert!(
        !direct,
        "the internal address is reachable from the internet"
    );

    // One DNAT rule: 3478/tcp on the router's public address to the box.
    lab.sh(&["forward", "r5", "tcp", "3478", &format!("{turn_box}:3478")]);
    let r = uclient(
        &lab,
        "client",
        &["-t"],
        wan,
        lan_peer,
        100,
        Duration::from_secs(40),
    );
    expect_no_loss(&r, 100, "internal TURN over TCP through the map");
    // The relaying was Portico's: the allocations came and went with the client's
    // connections.
    let m = b.metrics();
    let created =
        portico_testkit::metrics::metric(&m, "portico_turn_allocations_created_total", &[]);
    assert!(created >= 2.0, "allocations created: {created}");
}
