//! Relays without a descriptor each (`turn.relay_mode = "shared"`): an `sk_lookup` program
//! steers the relay ports to one socket per worker and relayed packets leave through a raw
//! socket. Against the real `portico`:
//!
//! * hundreds of allocations relay ChannelData and Send indications both ways, the peer
//!   seeing each come from the relayed address the client was told, while the dataplane's
//!   descriptor count does not grow with them;
//! * a deleted allocation's port stops relaying at once (the peer's datagram meets no socket);
//! * steered ports and bound ones (EVEN-PORT reservations hold a socket) never coincide, in a
//!   port range so small that they must meet;
//! * coturn's `turnutils_uclient` relays through steered relays without loss;
//! * `"shared"` on the epoll driver refuses to start naming the key; `"auto"` falls back with
//!   one log line;
//! * over veth in network namespaces, the recorded stream arrives byte for byte as through
//!   bound sockets, with checksums that verify on the wire, also with the kernel fast path on.
//!
//! Loading the program needs CAP_BPF (or CAP_SYS_ADMIN), CAP_NET_ADMIN and CAP_NET_RAW; where
//! this process has none of them the tests say so loudly and stop.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use portico_testkit::stun::XOR_RELAYED_ADDRESS;
use portico_testkit::turn::{udp_transport, EchoPeer, Relayed, TurnClient, PASSWORD, USER};
use portico_testkit::{Portico, Spec, LOCAL4};

use crate::fast_path::{
    checksums_ok, counter, fast_portico_with, lab_or_skip, recorded_stream, relay_stream, session,
    Capture, NsPortico,
};
use crate::{totals, turn_spec};

const EVEN_PORT: u16 = 0x0018;
const RESERVATION_TOKEN: u16 = 0x0022;

/// Whether this process may load BPF and open raw sockets (the capabilities the mode needs).
fn privileged() -> bool {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    true
}

/// Portico with steered relays, or `None` (said loudly) where the process lacks the rights.
fn start(name: &str, spec: Spec) -> Option<Portico> {
    if !privileged() {
        eprintln!(
            "SKIPPED {name}: no CAP_NET_RAW/CAP_BPF here, turn.relay_mode = \"shared\" cannot load"
        );
        return None;
    }
    let p = Portico::start(name, spec.turn("relay_mode = \"shared\""));
    p.wait_log("relay ports steered by sk_lookup");
    Some(p)
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// 400 allocations, each with a permission and a channel to an echo peer: ChannelData and a
/// Send indication go out from the relayed address and the echoes come back; the dataplane
/// holds no more descriptors than before the first one.
#[test]
fn steered_relays_carry_both_ways_from_the_relayed_address_without_a_descriptor_each() {
    let Some(p) = start(
        "turn-steered",
        turn_spec("io_uring", true)
            .turn("relay_ip = [\"127.0.0.1\", \"127.0.0.2\"]\nmax_allocations_per_user = 1000"),
    ) else {
        return;
    };
    let peer = EchoPeer::start(LOCAL4);
    let pid = p.dataplane_pid();
    let before = descriptors(pid);
    let mut clients = Vec::new();
    let mut relays = BTreeSet::new();
    for i in 0..400u32 {
        let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
        let relayed = c.allocate();
        assert!(relays.insert(relayed), "relay {relayed} handed out twice");
        assert!(c.permit(&[peer.addr]).is_success());
        assert!(c.bind(0x4000, peer.addr).is_success());
        let payload = format!("steered {i}");
        c.channel_data(0x4000, payload.as_bytes(), i % 2 == 0);
        match c.recv_relayed(Duration::from_secs(2)) {
            Some(Relayed::Channel { number, data }) => {
                assert_eq!(number, 0x4000);
                assert_eq!(data, payload.as_bytes(), "client {i}");
            }
            other => panic!("client {i}: no echo through {relayed}: {other:?}"),
        }
        let from = *peer.sources.lock().unwrap().last().unwrap();
        assert_eq!(from, relayed, "client {i}: the peer saw another source");
        clients.push((c, relayed));
    }
    let after = descriptors(pid);
    assert!(
        after <= before + 8,
        "400 steered allocations grew the dataplane from {before} to {after} descriptors"
    );
    // Send indications (Data indications back) on a sample, large and odd-sized payloads.
    for (i, (c, relayed)) in clients.iter().enumerate().step_by(40) {
        let payload: Vec<u8> = (0..1201 + i).map(|b| (b * 7 + i) as u8).collect();
        c.send_indication(peer.addr, &payload);
        match c.recv_relayed(Duration::from_secs(2)) {
            // The peer has a channel: the echo comes back as ChannelData.
            Some(Relayed::Channel { data, .. }) | Some(Relayed::Indication { data, .. }) => {
                assert_eq!(data, payload, "client {i} through {relayed}")
            }
            other => panic!("client {i}: no echo of a Send indication: {other:?}"),
        }
    }
    let seen: BTreeSet<_> = relays.iter().map(|r| r.ip()).collect();
    assert_eq!(seen.len(), 2, "both relay addresses steered: {seen:?}");

    // A deleted allocation stops relaying: a datagram to its port reaches nobody (no socket:
    // the kernel answers port unreachable) and nothing comes out at the client.
    let (mut c, relayed) = clients.pop().unwrap();
    assert!(c.refresh(0).is_success());
    let s = UdpSocket::bind((LOCAL4, 0)).unwrap();
    s.connect(relayed).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = s.send(b"after delete");
    let mut buf = [0u8; 64];
    let second = s.send(b"after delete").and_then(|_| s.recv(&mut buf));
    assert!(
        second.is_err(),
        "a datagram to the deleted relay {relayed} was answered"
    );
    assert!(
        c.recv_relayed(Duration::from_millis(300)).is_none(),
        "the deleted relay still forwards"
    );
}

/// Ports 61200-61215 of 127.0.0.77 (above the ephemeral range, so no other test's socket
/// sits there): four EVEN-PORT allocations reserve their odd neighbours with bound sockets,
/// plain steered allocations fill the rest, the four tokens are redeemed, and every relayed
/// address is different; the seventeenth Allocate finds the range full.
#[test]
fn steered_and_bound_relays_never_share_a_port() {
    let Some(p) = start(
        "turn-steered-ports",
        turn_spec("io_uring", true)
            .turn("relay_ports = \"61200-61215\"\nrelay_ip = \"127.0.0.77\""),
    ) else {
        return;
    };
    let mut held = Vec::new();
    let mut ports = BTreeSet::new();
    let mut tokens = Vec::new();
    let mut take = |c: TurnClient, relayed: SocketAddr| {
        assert!(
            ports.insert(relayed.port()),
            "port {} handed out twice",
            relayed.port()
        );
        held.push(c);
    };
    for _ in 0..4 {
        let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
        let r = c.allocate_with(&|b| udp_transport(b).attr(EVEN_PORT, &[0x80]));
        assert!(r.is_success(), "EVEN-PORT Allocate: {:?}", r.code());
        let relayed = r.xor(XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(relayed.port() % 2, 0);
        tokens.push(r.get(RESERVATION_TOKEN).expect("RESERVATION-TOKEN"));
        take(c, relayed);
    }
    for _ in 0..8 {
        let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
        let relayed = c.allocate();
        take(c, relayed);
    }
    for t in &tokens {
        let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
        let r = c.allocate_with(&|b| udp_transport(b).attr(RESERVATION_TOKEN, t));
        assert!(r.is_success(), "redeeming a reservation: {:?}", r.code());
        let relayed = r.xor(XOR_RELAYED_ADDRESS).unwrap();
        take(c, relayed);
    }
    assert_eq!(ports.len(), 16, "{ports:?}");
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    let r = c.allocate_with(&udp_transport);
    assert_eq!(r.code(), Some(508), "a full range must answer 508");
    // The redeemed (bound) relays relay too, beside steered ones.
    let peer = EchoPeer::start(LOCAL4);
    for (i, c) in held.iter_mut().enumerate() {
        assert!(c.permit(&[peer.addr]).is_success());
        c.send_indication(peer.addr, format!("p{i}").as_bytes());
        match c.recv_relayed(Duration::from_secs(2)) {
            Some(Relayed::Indication { data, .. }) => assert_eq!(data, format!("p{i}").as_bytes()),
            other => panic!("relay {i}: {other:?}"),
        }
    }
}

/// coturn's client relays through steered relays to `turnutils_peer` without loss.
#[test]
fn uclient_relays_through_steered_relays_without_loss() {
    let Some(p) = start("turn-steered-uclient", turn_spec("io_uring", true)) else {
        return;
    };
    let r = crate::tcp::uclient_run(&p, p.port, &["-c"]);
    assert!(!r.timed_out, "uclient did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "uclient failed:\n{}", r.text);
    let (sent, received) = totals(&r.text).expect("uclient totals");
    assert!(sent > 0, "uclient sent nothing:\n{}", r.text);
    assert_eq!(sent, received, "uclient lost packets:\n{}", r.text);
}

/// `"shared"` needs io_uring: on epoll the start is refused naming the key; `"auto"` starts
/// with a socket per relay and says why.
#[test]
fn shared_on_epoll_is_refused_and_auto_falls_back() {
    let p = Portico::new(
        "turn-steered-epoll",
        turn_spec("epoll", false).turn("relay_mode = \"shared\""),
    );
    let text = crate::refused_start(&p, "shared relays on epoll");
    assert!(
        text.contains("turn.relay_mode = \"shared\": it needs the io_uring driver"),
        "refusal lacks the key:\n{text}"
    );
    let p = Portico::start(
        "turn-steered-auto",
        turn_spec("epoll", true).turn("relay_mode = \"auto\""),
    );
    p.wait_log("steered relays unavailable (it needs the io_uring driver)");
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    c.allocate();
}

/// Over a real interface (the fast path's lab: client, Portico and peer in namespaces of
/// their own, joined by veth pairs), steered relays deliver the recorded stream (every length
/// from 0 to 1400, padded and unpadded ChannelData) byte for byte as the socket relay does,
/// from the relayed address, with IPv4 and UDP checksums that verify as captured on the
/// peer's side (the raw socket's headers are Portico's own); and with the kernel fast path on
/// as well, the kernel relays the same stream.
#[test]
fn steered_relays_over_veth_match_the_socket_relay_with_valid_checksums() {
    const T: &str = "steered_relays_over_veth_match_the_socket_relay_with_valid_checksums";
    let Some(lab) = lab_or_skip(T) else { return };
    let stream = recorded_stream();
    let mut bound = NsPortico::start_with(&lab, "off", "io_uring", "", &[]);
    bound.wait_ready();
    let s = session(&lab);
    let by_socket = relay_stream(&s, &stream);
    drop(s);
    drop(bound);

    let shared = "relay_mode = \"shared\"\n";
    let mut steered = NsPortico::start_with(&lab, "off", "io_uring", shared, &[]);
    steered.wait_ready();
    assert!(
        steered.log().contains("relay ports steered by sk_lookup"),
        "{}",
        steered.log()
    );
    let capture = Capture::start(&lab.peer_ns);
    let s = session(&lab);
    let by_steered = relay_stream(&s, &stream);
    assert_eq!(by_steered.at_client, by_socket.at_client);
    assert_eq!(by_steered.at_peer.len(), stream.len());
    for (i, ((from, got), (_, want))) in by_steered
        .at_peer
        .iter()
        .zip(by_socket.at_peer.iter())
        .enumerate()
    {
        assert_eq!(got, want, "packet {i} at the peer");
        assert_eq!(*from, s.relayed, "packet {i} came from the relayed address");
    }
    let wire = capture.udp(s.relayed, lab.peer);
    assert_eq!(wire.len(), stream.len(), "datagrams captured at the peer");
    for (i, ip) in wire.iter().enumerate() {
        assert!(
            checksums_ok(ip),
            "packet {i}: bad checksum on the wire {ip:02x?}"
        );
    }
    drop(s);
    drop(steered);

    // Steered relays under the kernel fast path: the program relays established channels
    // whatever holds the port.
    let Some(fast) = fast_portico_with(&lab, "io_uring", shared, T) else {
        return;
    };
    assert!(fast.log().contains("relay ports steered by sk_lookup"));
    let s = session(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let before = counter(&fast.metrics(), "portico_fastpath_packets", &[]);
    let by_kernel = relay_stream(&s, &stream);
    assert_eq!(by_kernel.at_client, by_socket.at_client);
    for (i, (from, got)) in by_kernel.at_peer.iter().enumerate() {
        assert_eq!(got, &stream[i], "packet {i} at the peer (fast path)");
        assert_eq!(*from, s.relayed);
    }
    let n = stream.len() as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let got = counter(&fast.metrics(), "portico_fastpath_packets", &[]) - before;
        if got == 2 * n {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel relayed {got} of {} packets",
            2 * n
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Media relay sessions and a static NAT map on a steered Portico: a leg's ports are steered
/// like relays (no descriptor each); a NAT binding's socket is a wildcard with a port of the
/// kernel's choosing, which cannot be steered and is bound. Both relay both ways, a binding
/// per external source.
#[test]
fn media_legs_and_nat_map_bindings_relay_with_steered_relays() {
    const T: &str = "media_legs_and_nat_map_bindings_relay_with_steered_relays";
    let internal = UdpSocket::bind("127.0.0.1:0").unwrap();
    internal
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let internal_addr = internal.local_addr().unwrap();
    let public_port = portico_testkit::free_port();
    let spec = turn_spec("io_uring", true)
        .turn("relay_ip = \"127.0.0.1\"")
        .tables(&format!(
            "[media]\nports = \"41000-41099\"\n\n[[nat.maps]]\n\
             public_ports = \"{public_port}-{public_port}\"\ninternal = \"{internal_addr}\"\n"
        ));
    let Some(p) = start(T, spec) else { return };
    let public = SocketAddr::from(([127, 0, 0, 1], public_port));
    let mut buf = [0u8; 2048];
    let mut bindings = BTreeSet::new();
    for src in ["127.0.0.1", "127.0.0.2"] {
        let x = UdpSocket::bind((src, 0)).unwrap();
        x.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        x.send_to(b"to the inside", public).unwrap();
        let (n, binding) = internal
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{src} -> the internal host: {e}\n{}", p.log()));
        assert_eq!(&buf[..n], b"to the inside");
        assert!(
            binding.port() != 0 && !binding.ip().is_unspecified(),
            "{binding}"
        );
        bindings.insert(binding);
        internal.send_to(b"back", binding).unwrap();
        let (n, from) = x
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("the reply to {src}: {e}"));
        assert_eq!((&buf[..n], from), (&b"back"[..], public));
    }
    assert_eq!(bindings.len(), 2, "a binding per source: {bindings:?}");

    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let body = format!(
        "{{\"legs\":[{{\"address\":\"{}\"}},{{\"address\":\"{}\"}}]}}",
        a.local_addr().unwrap(),
        b.local_addr().unwrap()
    );
    let (code, v) = p.call("POST", "/api/v1/media/sessions", &body);
    assert_eq!(code, 201, "{v}");
    let local =
        |i: usize| -> SocketAddr { v["legs"][i]["local"].as_str().unwrap().parse().unwrap() };
    let (l0, l1) = (local(0), local(1));
    for (tx, to, rx, from) in [(&a, l0, &b, l1), (&b, l1, &a, l0)] {
        tx.send_to(b"rtp", to).unwrap();
        let (n, src) = rx
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("media {to} -> {from}: {e}\n{}", p.log()));
        assert_eq!((&buf[..n], src), (&b"rtp"[..], from));
    }
}
