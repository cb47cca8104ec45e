//! Manual blacklist and whitelist entries through the API: enforced at once by the proxy and
//! by the dataplane (on its listen and relay ports), listed, turned into whitelist entries,
//! removed; manual and automatic entries survive a restart of `portico`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::prelude::*;

/// Waits for a datagram from the TURN server carrying `payload` (a Data indication).
fn relayed(client: &TurnClient, payload: &[u8], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = client
            .sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match client.sock.recv_from(&mut buf) {
            Ok((n, from)) if from == client.server => {
                if buf[..n].windows(payload.len()).any(|w| w == payload) {
                    return true;
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Time from now until a proxy connection from `src` is refused (polled every 5 ms) and a
/// Binding from it goes unanswered (polled every 20 ms; a slow answer is no block, so the
/// silence must then hold for three tries of 300 ms).
fn time_until_blocked(site: &Portico, src: IpAddr) -> Duration {
    let t0 = Instant::now();
    while get_from(src, site.proxy(), "/") != Answer::Refused {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{src} still served by the proxy"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = udp_on(src);
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{src} still answered"
        );
        if binding(&s, site.udp4(), Duration::from_millis(20)).is_none() {
            let took = t0.elapsed();
            if !answered_from(src, site.udp4(), Duration::from_millis(300)) {
                return took;
            }
        }
    }
}

#[test]
fn manual_entries_are_enforced_at_once_listed_converted_removed_and_survive_a_restart() {
    let nginx = Nginx::start("fraud");
    let mut site = Portico::start(
        "entries",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud("suspicious_per_minute = 3")
            .fraud("blacklist_minutes = \"10m\""),
    );
    let manual = v4(127, 0, 3, 10);
    let peer_ip = v4(127, 0, 3, 15);
    let auto = v4(127, 0, 3, 12);
    let bystander = v4(127, 0, 3, 13);
    let stun_bystander = Bystander::stun(bystander, site.udp4());
    assert_served(&site, manual);

    // A relay with a permission for the peer: the peer's data reaches the client.
    let mut client = TurnClient::from(v4(127, 0, 3, 16), site.udp4(), USER, PASSWORD);
    let relay = client.allocate();
    let peer = UdpSocket::bind(SocketAddr::new(peer_ip, 0)).unwrap_or_else(|e| panic!("{e}"));
    let permit = client.permit(&[peer.local_addr().unwrap_or_else(|e| panic!("{e}"))]);
    assert_eq!(permit.class(), Class::Success);
    let _ = peer.send_to(b"peer-before", relay);
    assert!(
        relayed(&client, b"peer-before", ANSWER_WAIT),
        "relay does not work"
    );

    // Black by hand: in force when the POST returns.
    let (status, e) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.3.10", "kind": "black", "note": "abuse desk ticket 7"}"#,
    );
    assert_eq!(status, 201, "{e}");
    let took = time_until_blocked(&site, manual);
    eprintln!("manual black entry: blocked {took:?} after the POST returned");
    assert!(took <= Duration::from_millis(100), "took {took:?}");
    assert_eq!(
        (
            e["source"].as_str(),
            e["kind"].as_str(),
            e["origin"].as_str()
        ),
        (Some("127.0.3.10"), Some("black"), Some("manual"))
    );
    assert_eq!(e["note"], "abuse desk ticket 7");
    assert!(e["expires_at"].is_null(), "no ttl: until removed: {e}");

    // On the relay port too: the peer's datagrams are dropped, with a ttl entry.
    let drops = site.metric(
        "portico_dataplane_drops_total",
        &[("reason", "blacklisted")],
    );
    let (status, e) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.3.15", "kind": "black", "ttl_seconds": 600}"#,
    );
    assert_eq!(status, 201, "{e}");
    let expires = e["expires_at"].as_u64().unwrap_or(0);
    let created = e["created_at"].as_u64().unwrap_or(0);
    // At least the ttl; rounded up to whole seconds, and the two clock readings may straddle one.
    assert!((600..=602).contains(&(expires - created)), "{e}");
    let _ = peer.send_to(b"peer-blocked", relay);
    assert!(
        !relayed(&client, b"peer-blocked", Duration::from_millis(500)),
        "data from a blacklisted peer was relayed"
    );
    assert!(
        site.metric(
            "portico_dataplane_drops_total",
            &[("reason", "blacklisted")]
        ) > drops,
        "the dropped relay datagram is not counted"
    );

    // Listed, with the counts in the metrics.
    let entries = site.entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(
        site.metric("portico_fraud_entries", &[("kind", "black")]),
        2.0
    );

    // Turned into a whitelist entry: let in at once, for good, and no longer counted.
    let (status, w) = site.call("POST", "/api/v1/fraud/entries/127.0.3.10/whitelist", "");
    assert_eq!(status, 200, "{w}");
    assert_eq!(
        (w["kind"].as_str(), w["origin"].as_str()),
        (Some("white"), Some("manual"))
    );
    assert!(w["expires_at"].is_null(), "{w}");
    assert_served(&site, manual);
    wrong_passwords(manual, site.udp4(), 5);
    std::thread::sleep(Duration::from_millis(100));
    assert_served(&site, manual);

    // Removed: the peer's data flows again; removing twice, or an unknown address, is 404;
    // a bad address is 400.
    let (status, v) = site.call("DELETE", "/api/v1/fraud/entries/127.0.3.15", "");
    assert_eq!(status, 204, "{v}");
    let _ = peer.send_to(b"peer-after", relay);
    assert!(
        relayed(&client, b"peer-after", ANSWER_WAIT),
        "data from a peer no longer blacklisted is not relayed"
    );
    assert_eq!(
        site.call("DELETE", "/api/v1/fraud/entries/127.0.3.15", "")
            .0,
        404
    );
    assert_eq!(
        site.call("DELETE", "/api/v1/fraud/entries/127.0.3.99", "")
            .0,
        404
    );
    assert_eq!(
        site.call("DELETE", "/api/v1/fraud/entries/not-an-ip", "").0,
        400
    );
    assert_eq!(
        site.call(
            "POST",
            "/api/v1/fraud/entries",
            r#"{"ip": "127.0.3.11", "kind": "grey"}"#
        )
        .0,
        400
    );

    // More to survive the restart: an IPv6 network by hand and an automatic entry, left
    // long enough to be written out.
    let (status, v) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "2001:db8:1::/64", "kind": "black", "note": "v6 net"}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["source"], "2001:db8:1::/64");
    wrong_passwords(auto, site.udp4(), 4);
    assert!(wait_until(Duration::from_secs(1), || site
        .entry("127.0.3.12")
        .is_some()));
    std::thread::sleep(Duration::from_millis(1500));
    let before = site.entries();
    assert_eq!(before.len(), 3, "{before:?}");
    stun_bystander.finish(10);

    site.stop();
    let file = site.state_dir.join("fraud.json");
    let meta = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    site.run();

    let after = site.entries();
    assert_eq!(after, before, "the lists changed across a restart");
    let a = site
        .entry("127.0.3.12")
        .unwrap_or_else(|| panic!("{after:?}"));
    assert_eq!(
        (a["kind"].as_str(), a["origin"].as_str()),
        (Some("black"), Some("auto"))
    );
    assert_blocked(&site, auto);
    assert_served(&site, manual);
    assert_served(&site, bystander);
    wrong_passwords(manual, site.udp4(), 5);
    std::thread::sleep(Duration::from_millis(100));
    assert_served(&site, manual);
}

/// The engine decides on an event; the decision must not be lost when `portico` stops right
/// after it (an operator restart, a deploy).
#[test]
fn an_automatic_entry_survives_a_restart_right_after_the_decision() {
    let nginx = Nginx::start("fraud");
    let mut site = Portico::start(
        "entries-auto",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud("suspicious_per_minute = 2")
            .fraud("blacklist_minutes = \"10m\""),
    );
    let src = v4(127, 0, 3, 20);
    for _ in 0..3 {
        assert_eq!(
            get_with(src, site.proxy(), "/private", &[WRONG_LOGIN]),
            Answer::Status(401)
        );
    }
    assert!(wait_until(Duration::from_secs(1), || {
        get_from(src, site.proxy(), "/") == Answer::Refused
    }));
    let listed = site.entry("127.0.3.20");
    assert!(listed.is_some());
    site.stop();
    site.run();
    assert_eq!(
        site.entry("127.0.3.20"),
        listed,
        "an automatic entry made just before a SIGTERM did not survive the restart; \
         entries {:?}",
        site.entries()
    );
    assert_blocked(&site, src);
}

/// `{"ip": "127.0.3.0/24"}` must either block the /24 or be refused; taking it as the single
/// address 127.0.3.0 leaves the operator believing a network is blocked when it is not.
#[test]
fn an_ipv4_network_entry_is_not_silently_narrowed_to_one_address() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start("entries-v4net", spec().http_proxy_to(nginx.alpha));
    let (status, v) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.3.0/24", "kind": "black"}"#,
    );
    if (400..500).contains(&status) {
        return;
    }
    assert_eq!(status, 201, "{v}");
    let inside = v4(127, 0, 3, 7);
    let stun = answered_from(inside, site.udp4(), Duration::from_millis(300));
    let proxy = get_from(inside, site.proxy(), "/");
    assert!(
        !stun && proxy == Answer::Refused,
        "POST {{\"ip\": \"127.0.3.0/24\"}} was accepted as {v}, yet 127.0.3.7 is served \
         (STUN answered {stun}, proxy {proxy:?})"
    );
}
