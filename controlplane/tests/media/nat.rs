//! Static UDP NAT maps: external sources reach an internal UDP echo through a public port
//! and get the replies from that public port (full cone: any source, each with its own
//! binding); the blacklist drops a source; maps added and removed through the API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use portico_testkit::metrics::metric;
use portico_testkit::net::{expect_silence, udp_on};
use portico_testkit::{free_port, Portico};

use crate::*;

/// An internal host: echoes every datagram to its source until `count` were echoed or
/// 30 s passed; returns the sources it saw.
fn echo(sock: UdpSocket, count: usize) -> thread::JoinHandle<Vec<SocketAddr>> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    thread::spawn(move || {
        let mut seen = Vec::new();
        let end = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 2048];
        while seen.len() < count && Instant::now() < end {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
                seen.push(from);
            }
        }
        seen
    })
}

fn exchange(ext: &UdpSocket, public: SocketAddr, seq: u16) {
    ext.send_to(&rtp(seq, 7), public).unwrap();
    let (p, from) = recv(ext, Duration::from_secs(2))
        .unwrap_or_else(|| panic!("no echo through {public} for {:?}", ext.local_addr()));
    assert_eq!(from, public, "the reply leaves from the public port");
    assert_eq!(parse_rtp(&p), (seq, 7));
}

#[test]
fn a_nat_map_is_full_cone_and_honours_the_blacklist() {
    let internal = UdpSocket::bind("127.0.0.1:0").unwrap();
    let internal_addr = internal.local_addr().unwrap();
    let public_port = free_port();
    let p = Portico::start(
        "media-nat",
        media_spec("io_uring", "").tables(&format!(
            "[[nat.maps]]\npublic_ports = \"{public_port}-{public_port}\"\ninternal = \"{internal_addr}\"\n"
        )),
    );
    let echo = echo(internal, 6);
    let public: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), public_port);
    // Two different external sources (two addresses, each its own binding) both get through.
    let x = udp_on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
    let y = udp_on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    for seq in 0..3 {
        exchange(&x, public, seq);
        exchange(&y, public, 100 + seq);
    }
    let seen = echo.join().unwrap();
    assert_eq!(seen.len(), 6);
    let mut bindings: Vec<SocketAddr> = seen.clone();
    bindings.sort();
    bindings.dedup();
    assert_eq!(
        bindings.len(),
        2,
        "one binding per external source: {seen:?}"
    );
    assert!(
        !seen.contains(&x.local_addr().unwrap()),
        "the internal host sees the binding, not the external source"
    );
    // A blacklisted source is dropped.
    let (code, v) = p.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip":"127.0.0.3","kind":"black"}"#,
    );
    assert!(code == 201 || code == 200, "{code} {v}");
    let z = udp_on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    z.send_to(&rtp(1, 7), public).unwrap();
    expect_silence(&z, Duration::from_millis(500), "blacklisted source");
    let m = p.metrics();
    assert_eq!(metric(&m, "portico_nat_bindings_active", &[]), 2.0);
    assert_eq!(
        metric(&m, "portico_nat_packets_total", &[("direction", "inbound")]),
        6.0
    );
    assert_eq!(
        metric(
            &m,
            "portico_nat_packets_total",
            &[("direction", "outbound")]
        ),
        6.0
    );
    assert!(
        metric(
            &m,
            "portico_dataplane_drops_total",
            &[("reason", "blacklisted")]
        ) >= 1.0
    );
}

#[test]
fn nat_maps_are_added_listed_and_removed_through_the_api() {
    let p = Portico::start("media-nat-api", media_spec("epoll", ""));
    let internal = UdpSocket::bind("127.0.0.1:0").unwrap();
    let internal_addr = internal.local_addr().unwrap();
    let echo = echo(internal, 1);
    let port = free_port();
    let body = format!(r#"{{"public_ports":"{port}-{port}","internal":"{internal_addr}"}}"#);
    let (code, v) = p.call("POST", "/api/v1/nat/maps", &body);
    assert_eq!(code, 201, "{v}");
    let (code, v) = p.call("POST", "/api/v1/nat/maps", &body);
    assert_eq!(code, 409, "{v}");
    let (code, list) = p.call("GET", "/api/v1/nat/maps", "");
    assert_eq!(code, 200);
    assert_eq!(list[0]["public_ports"], format!("{port}-{port}"));
    assert_eq!(list[0]["internal"], internal_addr.to_string());
    assert_eq!(p.file_config().nat.maps.len(), 1, "written to the file");
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let x = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    // The dataplane applies the new configuration within a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        x.send_to(&rtp(1, 7), public).unwrap();
        if let Some((_, from)) = recv(&x, Duration::from_millis(300)) {
            assert_eq!(from, public);
            break;
        }
        assert!(Instant::now() < deadline, "the map never answered");
    }
    echo.join().unwrap();
    let (code, _) = p.call("DELETE", &format!("/api/v1/nat/maps/{port}"), "");
    assert_eq!(code, 204);
    assert_eq!(
        p.call("GET", "/api/v1/nat/maps", "").1,
        serde_json::json!([])
    );
    let (code, _) = p.call("DELETE", &format!("/api/v1/nat/maps/{port}"), "");
    assert_eq!(code, 404);
    assert!(
        portico_testkit::net::port_becomes_free(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            Duration::from_secs(3)
        ),
        "public port closed"
    );
}
