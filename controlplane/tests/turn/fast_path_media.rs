//! The kernel fast path for the media relay's latched legs and the static NAT maps, in the
//! fast path's veth lab (client, Portico and peer namespaces; the NAT map's internal host in
//! a fourth namespace behind an interface that holds no TURN address, so the program must be
//! attached there when the first binding needs it):
//!
//! * once both legs of a media session are latched, a recorded stream (every length 0 to
//!   1400) crosses it both ways byte for byte, from the right ports, with checksums the
//!   receiving stacks verify, without a single datagram reaching the worker; the session's
//!   API record, `media_relay_packets` and `fastpath_packets{direction="media"}` count it;
//! * after the learn window a third host sending to a latched leg is still dropped and
//!   counted by user space, never forwarded; deleting the session or blacklisting the
//!   latched source stops forwarding within a second;
//! * a NAT map binding relays both ways in the kernel, counted in `nat_packets`; packets
//!   only the kernel sees keep the binding alive past its idle timeout, and it expires once
//!   they stop.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::fast_path::{counter, fast_portico_full, in_ns, ip, lab_or_skip, recorded_stream, Lab};

fn metrics_until(
    fast: &super::fast_path::NsPortico,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = fast.metrics();
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: metrics\n{m}\nlog:\n{}",
            fast.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sock(ns: &str, addr: SocketAddr) -> UdpSocket {
    let s = in_ns(ns, move || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Sends each datagram of `stream` from `tx` to `to` and checks `rx` gets it byte for byte
/// from `from`.
fn cross(tx: &UdpSocket, to: SocketAddr, rx: &UdpSocket, from: SocketAddr, stream: &[Vec<u8>]) {
    let mut buf = vec![0u8; 2048];
    for (i, p) in stream.iter().enumerate() {
        tx.send_to(p, to).unwrap();
        match rx.recv_from(&mut buf) {
            Ok((n, src)) => {
                assert_eq!(
                    &buf[..n],
                    &p[..],
                    "datagram {i} ({} bytes) changed",
                    p.len()
                );
                assert_eq!(src, from, "source of datagram {i}");
            }
            Err(e) => panic!("datagram {i} ({} bytes) to {to} lost: {e}", p.len()),
        }
    }
}

/// How many of 20 datagrams sent from `tx` to `to` reach `rx` within half a second.
fn reaches(tx: &UdpSocket, to: SocketAddr, rx: &UdpSocket) -> usize {
    rx.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 2048];
    while rx.recv_from(&mut buf).is_ok() {}
    for _ in 0..20 {
        tx.send_to(b"probe", to).unwrap();
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if rx.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    got
}

fn json(
    fast: &super::fast_path::NsPortico,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (code, text) = fast
        .api(method, path, body)
        .unwrap_or_else(|| panic!("{method} {path}: no answer"));
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn fast_path_relays_latched_media_legs_byte_for_byte_and_stops_on_delete_and_blacklist() {
    const T: &str =
        "fast_path_relays_latched_media_legs_byte_for_byte_and_stops_on_delete_and_blacklist";
    let Some(lab) = lab_or_skip(T) else { return };
    // The client namespace reaches the relay address through Portico.
    ip(&[
        "-n",
        &lab.client_ns,
        "route",
        "add",
        "default",
        "via",
        &lab.listen.to_string(),
    ])
    .unwrap();
    let allow = format!("\"{}/24\", \"{}/24\"", lab.relay, lab.client);
    let media = "[media]\nports = \"40000-40099\"\nlearn_window = \"1s\"\nidle_timeout = \"30s\"\n";
    let Some(fast) = fast_portico_full(&lab, "io_uring", "", &allow, media, T) else {
        return;
    };
    let a = sock(&lab.client_ns, SocketAddr::from((lab.client, 0)));
    let b = sock(&lab.peer_ns, SocketAddr::from((lab.peer, 0)));
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let body = format!("{{\"legs\":[{{\"address\":\"{a_addr}\"}},{{\"address\":\"{b_addr}\"}}]}}");
    let (code, v) = json(&fast, "POST", "/api/v1/media/sessions", &body);
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let local =
        |i: usize| -> SocketAddr { v["legs"][i]["local"].as_str().unwrap().parse().unwrap() };
    let (l0, l1) = (local(0), local(1));
    assert_eq!(l0.ip(), lab.relay, "{v}");

    // Both legs latch in user space; then the kernel takes both directions over.
    cross(&a, l0, &b, l1, &[b"latch a".to_vec()]);
    cross(&b, l1, &a, l0, &[b"latch b".to_vec()]);
    let latched = Instant::now();
    // (and the user-space counts of those two published, so the deltas below are the kernel's)
    metrics_until(&fast, "two media paths installed", |m| {
        counter(m, "portico_fastpath_media_entries_active", &[]) == 2
            && counter(m, "portico_media_relay_packets", &[]) == 2
    });

    let stream = recorded_stream();
    let n = stream.len() as u64;
    let bytes: u64 = stream.iter().map(|p| p.len() as u64).sum();
    let csum = lab.checksum_errors();
    let before = fast.metrics();
    cross(&a, l0, &b, l1, &stream);
    cross(&b, l1, &a, l0, &stream);
    assert_eq!(
        lab.checksum_errors(),
        csum,
        "UDP checksum errors at the endpoints"
    );
    let media = [("direction", "media")];
    let after = metrics_until(&fast, "the kernel's counts folded", |m| {
        counter(m, "portico_fastpath_packets", &media)
            - counter(&before, "portico_fastpath_packets", &media)
            >= 2 * n
    });
    let d = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    assert_eq!(d("portico_dataplane_rx_packets", &[]), 0, "worker receives");
    assert_eq!(d("portico_fastpath_packets", &media), 2 * n, "{after}");
    assert_eq!(d("portico_media_relay_packets", &[]), 2 * n);
    assert_eq!(d("portico_media_relay_bytes", &[]), 2 * bytes);
    // The session's record (published every 250 ms) has them too.
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let (code, s) = json(&fast, "GET", &format!("/api/v1/media/sessions/{id}"), "");
        assert_eq!(code, 200, "{s}");
        if s["legs"][0]["packets_in"] == n + 1
            && s["legs"][1]["packets_in"] == n + 1
            && s["legs"][0]["bytes_out"] == bytes + 7
        {
            break;
        }
        assert!(Instant::now() < deadline, "session record: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // After the learn window a third host is dropped by user space, never forwarded.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(latched.elapsed()));
    let stranger = sock(&lab.peer_ns, SocketAddr::from((lab.stranger, 0)));
    let foreign = [("reason", "media_foreign_source")];
    let before = fast.metrics();
    assert_eq!(reaches(&stranger, l1, &a), 0, "a third host was forwarded");
    let after = metrics_until(&fast, "foreign drops counted", |m| {
        counter(m, "portico_dataplane_drops", &foreign)
            - counter(&before, "portico_dataplane_drops", &foreign)
            == 20
    });
    assert_eq!(
        counter(&after, "portico_fastpath_media_entries_active", &[]),
        2
    );

    // Blacklisting the latched source A stops A -> B within a second; B -> A goes on
    // (user space checks the source only).
    assert_eq!(reaches(&a, l0, &b), 20, "before the blacklist");
    let entry = format!("{{\"ip\": \"{}\", \"kind\": \"black\"}}", lab.client);
    let (code, answer) = fast.api("POST", "/api/v1/fraud/entries", &entry).unwrap();
    assert!(code == 200 || code == 201, "{code} {answer}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        reaches(&a, l0, &b),
        0,
        "A blacklisted 1 s ago still forwarded"
    );
    assert_eq!(reaches(&b, l1, &a), 20, "B -> A");
    let (code, _) = fast
        .api(
            "DELETE",
            &format!("/api/v1/fraud/entries/{}", lab.client),
            "",
        )
        .unwrap();
    assert!(code == 200 || code == 204, "{code}");
    let deadline = Instant::now() + Duration::from_secs(12);
    while reaches(&a, l0, &b) != 20 {
        assert!(
            Instant::now() < deadline,
            "A never forwarded again after the blacklist entry went"
        );
    }

    // Deleting the session stops both directions within a second.
    let (code, _) = fast
        .api("DELETE", &format!("/api/v1/media/sessions/{id}"), "")
        .unwrap();
    assert_eq!(code, 204);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(reaches(&a, l0, &b), 0, "deleted 1 s ago: A -> B");
    assert_eq!(reaches(&b, l1, &a), 0, "deleted 1 s ago: B -> A");
    let m = fast.metrics();
    assert_eq!(
        counter(&m, "portico_fastpath_media_entries_active", &[]),
        0,
        "{m}"
    );
}

/// A fourth namespace for the NAT map's internal host, on its own veth to Portico's
/// namespace; removed on drop.
struct Inside {
    ns: String,
    host: Ipv4Addr,
    gateway: Ipv4Addr,
    portico_dev: String,
}

impl Inside {
    fn create(lab: &Lab) -> Inside {
        let n = lab.listen.octets()[2];
        let tag = lab.portico_ns.trim_start_matches("fpp-").to_string();
        let inside = Inside {
            ns: format!("fpi-{tag}"),
            host: Ipv4Addr::new(10, 233, n, 2),
            gateway: Ipv4Addr::new(10, 233, n, 1),
            portico_dev: format!("fpi{tag}p"),
        };
        ip(&["netns", "add", &inside.ns]).unwrap();
        let dev = format!("fpi{tag}");
        for args in [
            vec![
                "link",
                "add",
                &dev,
                "netns",
                &inside.ns,
                "type",
                "veth",
                "peer",
                "name",
                &inside.portico_dev,
                "netns",
                &lab.portico_ns,
            ],
            vec![
                "-n",
                &inside.ns,
                "addr",
                "add",
                &format!("{}/24", inside.host),
                "dev",
                &dev,
            ],
            vec![
                "-n",
                &lab.portico_ns,
                "addr",
                "add",
                &format!("{}/24", inside.gateway),
                "dev",
                &inside.portico_dev,
            ],
            vec!["-n", &inside.ns, "link", "set", &dev, "up"],
            vec!["-n", &inside.ns, "link", "set", "lo", "up"],
            vec![
                "-n",
                &lab.portico_ns,
                "link",
                "set",
                &inside.portico_dev,
                "up",
            ],
        ] {
            ip(&args).unwrap();
        }
        inside
    }

    fn checksum_errors(&self) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat", "/proc/net/snmp"])
            .output()
            .unwrap();
        let snmp = String::from_utf8_lossy(&out.stdout).into_owned();
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        let i = udp[0]
            .split_whitespace()
            .position(|x| x == "InCsumErrors")
            .unwrap();
        udp[1].split_whitespace().nth(i).unwrap().parse().unwrap()
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

#[test]
fn fast_path_relays_nat_map_bindings_and_keeps_them_alive() {
    const T: &str = "fast_path_relays_nat_map_bindings_and_keeps_them_alive";
    let Some(lab) = lab_or_skip(T) else { return };
    let inside = Inside::create(&lab);
    let tables = format!(
        "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"{}:6004\"\nidle_timeout = \"2s\"\n",
        inside.host
    );
    let allow = format!("\"{}/24\"", lab.relay);
    // On the epoll driver (the media test runs on io_uring): both fill in the binding's port.
    let Some(fast) = fast_portico_full(&lab, "epoll", "", &allow, &tables, T) else {
        return;
    };
    let public = SocketAddr::from((lab.relay, 5005));
    let gw = sock(&inside.ns, SocketAddr::from((inside.host, 6005)));
    let caller = sock(&lab.peer_ns, SocketAddr::from((lab.peer, 0)));

    // The first datagram makes the binding in user space; the reply learns its address.
    caller.send_to(b"first", public).unwrap();
    let mut buf = [0u8; 2048];
    let (k, binding) = gw.recv_from(&mut buf).expect("caller -> internal host");
    assert_eq!(&buf[..k], b"first");
    assert_eq!(
        binding.ip(),
        inside.gateway,
        "the binding's address on the inside"
    );
    cross(&gw, binding, &caller, public, &[b"reply".to_vec()]);
    // (and the user-space counts of those two published, so the deltas below are the kernel's)
    metrics_until(&fast, "both directions of the binding installed", |m| {
        counter(m, "portico_fastpath_media_entries_active", &[]) == 2
            && counter(m, "portico_nat_packets", &[("direction", "inbound")]) == 1
            && counter(m, "portico_nat_packets", &[("direction", "outbound")]) == 1
    });
    assert!(
        fast.log()
            .contains(&format!("interface=\"{}\"", inside.portico_dev))
            || fast
                .log()
                .contains(&format!("interface={}", inside.portico_dev)),
        "the program was not attached to the inside interface:\n{}",
        fast.log()
    );

    let stream = recorded_stream();
    let n = stream.len() as u64;
    let csum = lab.checksum_errors() + inside.checksum_errors();
    let before = fast.metrics();
    cross(&caller, public, &gw, binding, &stream);
    cross(&gw, binding, &caller, public, &stream);
    assert_eq!(
        lab.checksum_errors() + inside.checksum_errors(),
        csum,
        "UDP checksum errors"
    );
    let (fin, fout) = (
        [("direction", "nat_inbound")],
        [("direction", "nat_outbound")],
    );
    let after = metrics_until(&fast, "the kernel's counts folded", |m| {
        counter(m, "portico_fastpath_packets", &fin)
            - counter(&before, "portico_fastpath_packets", &fin)
            >= n
            && counter(m, "portico_fastpath_packets", &fout)
                - counter(&before, "portico_fastpath_packets", &fout)
                >= n
    });
    let d = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    assert_eq!(d("portico_dataplane_rx_packets", &[]), 0, "worker receives");
    assert_eq!(d("portico_nat_packets", &[("direction", "inbound")]), n);
    assert_eq!(d("portico_nat_packets", &[("direction", "outbound")]), n);

    // Past the 2 s idle timeout on kernel-relayed packets alone: the same binding.
    let until = Instant::now() + Duration::from_secs(3);
    let mut i = 0u32;
    while Instant::now() < until {
        let p = format!("keepalive {i}").into_bytes();
        cross(&caller, public, &gw, binding, &[p]);
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = fast.metrics();
    assert_eq!(counter(&m, "portico_nat_bindings_active", &[]), 1, "{m}");
    assert_eq!(
        counter(&m, "portico_dataplane_rx_packets", &[]),
        counter(&after, "portico_dataplane_rx_packets", &[]),
        "the keepalives went through the kernel"
    );
    // Quiet: the binding expires, its paths leave the kernel.
    metrics_until(&fast, "the idle binding expires", |m| {
        counter(m, "portico_nat_bindings_active", &[]) == 0
            && counter(m, "portico_fastpath_media_entries_active", &[]) == 0
    });
}
