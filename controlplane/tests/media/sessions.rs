//! Media relay sessions: relaying both ways on both drivers, latching, the hijack attempt,
//! idle expiry, delete, limits and refused configuration.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use portico_testkit::metrics::metric;
use portico_testkit::net::{expect_silence, port_becomes_free, udp_on};
use portico_testkit::portico::run_portico;
use portico_testkit::{Portico, Spec};

use crate::*;

fn relays_rtp_and_rtcp_both_ways(io: &'static str) {
    let p = Portico::start(&format!("media-relay-{io}"), media_spec(io, ""));
    let (a, a_rtcp) = endpoint();
    let (b, b_rtcp) = endpoint();
    for s in [&a, &a_rtcp, &b, &b_rtcp] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let (id, local, rtcp) = create(
        &p,
        [Some(a.local_addr().unwrap()), Some(b.local_addr().unwrap())],
    );
    // A → leg 0 → out of leg 1 → B's signalled address; and back.
    stream(&a, local[0], &b, local[1], 50, 0xA);
    stream(&b, local[1], &a, local[0], 50, 0xB);
    // RTCP on the +1 ports, to the endpoints' RTP port + 1.
    a_rtcp.send_to(&rtcp_rr(0xA), rtcp[0]).unwrap();
    let (got, from) = recv(&b_rtcp, Duration::from_secs(2)).expect("RTCP A→B relayed");
    assert_eq!((got, from), (rtcp_rr(0xA), rtcp[1]));
    b_rtcp.send_to(&rtcp_rr(0xB), rtcp[1]).unwrap();
    let (got, from) = recv(&a_rtcp, Duration::from_secs(2)).expect("RTCP B→A relayed");
    assert_eq!((got, from), (rtcp_rr(0xB), rtcp[0]));

    let v = wait_session(&p, &id, "counters published", |v| {
        v["legs"][0]["packets_in"] == 51 && v["legs"][1]["packets_in"] == 51
    });
    let leg0 = &v["legs"][0];
    assert_eq!(leg0["packets_out"], 51, "{v}");
    assert_eq!(leg0["bytes_in"], 50 * 172 + 8, "{v}");
    assert_eq!(leg0["latched"], a.local_addr().unwrap().to_string(), "{v}");
    assert_eq!(leg0["foreign_dropped"], 0, "{v}");
    assert_eq!(v["label"], "test-call");
    let (code, list) = p.call("GET", "/api/v1/media/sessions", "");
    assert_eq!(code, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let m = p.metrics();
    assert_eq!(metric(&m, "portico_media_relay_packets_total", &[]), 102.0);
    assert_eq!(metric(&m, "portico_media_sessions_active", &[]), 1.0);
}

#[test]
fn rtp_and_rtcp_are_relayed_both_ways_on_io_uring() {
    relays_rtp_and_rtcp_both_ways("io_uring");
}

#[test]
fn rtp_and_rtcp_are_relayed_both_ways_on_epoll() {
    relays_rtp_and_rtcp_both_ways("epoll");
}

/// NAT detection: the endpoint's packets come from another port than signalling said; the
/// leg latches to the real source and the other side's media follows it.
#[test]
fn a_leg_latches_to_its_real_source_port() {
    let p = Portico::start("media-latch", media_spec("epoll", "learn_window = \"2s\""));
    let a = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let b = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let signalled: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (id, local, _) = create(&p, [Some(signalled), Some(b.local_addr().unwrap())]);
    // Before A sent anything, B's media goes to the signalled address: A hears nothing.
    b.send_to(&rtp(0, 0xB), local[1]).unwrap();
    expect_silence(&a, Duration::from_millis(300), "before latching");
    // A's first packet latches leg 0 to A's real port; B's media then reaches A.
    stream(&a, local[0], &b, local[1], 5, 0xA);
    stream(&b, local[1], &a, local[0], 5, 0xB);
    let v = wait_session(&p, &id, "latched", |v| {
        v["legs"][0]["latched"] == a.local_addr().unwrap().to_string()
    });
    assert_eq!(v["legs"][0]["address"], "127.0.0.1:9");
    // Within the learn window a new source (the NAT re-mapped the phone) is followed.
    let a2 = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    stream(&a2, local[0], &b, local[1], 3, 0xA);
    stream(&b, local[1], &a2, local[0], 3, 0xB);
}

/// The done-when hijack: after the learn window a third host sends RTP to a latched leg from
/// another address. Nothing of it is forwarded; it is counted on the session and in the
/// metrics, and reported to the fraud engine; the real stream goes on.
#[test]
fn a_hijack_after_the_learn_window_is_dropped_counted_and_reported() {
    let p = Portico::start(
        "media-hijack",
        media_spec("io_uring", "learn_window = \"1s\""),
    );
    let a = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let b = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (id, local, _) = create(
        &p,
        [Some(a.local_addr().unwrap()), Some(b.local_addr().unwrap())],
    );
    stream(&a, local[0], &b, local[1], 10, 0xA);
    stream(&b, local[1], &a, local[0], 10, 0xB);
    std::thread::sleep(Duration::from_millis(1300));
    let attacker = udp_on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 66)));
    for seq in 0..20 {
        attacker.send_to(&rtp(1000 + seq, 0xBAD), local[0]).unwrap();
    }
    expect_silence(
        &b,
        Duration::from_millis(500),
        "hijacked RTP must not reach B",
    );
    // A from its latched source still gets through, and B's media still goes to A only.
    stream(&a, local[0], &b, local[1], 5, 0xA);
    b.send_to(&rtp(99, 0xB), local[1]).unwrap();
    assert!(
        recv(&a, Duration::from_secs(2)).is_some(),
        "B→A still relayed"
    );
    expect_silence(
        &attacker,
        Duration::from_millis(300),
        "the attacker gets nothing",
    );
    let v = wait_session(&p, &id, "foreign drops published", |v| {
        v["legs"][0]["foreign_dropped"] == 20
    });
    assert_eq!(v["legs"][0]["latched"], a.local_addr().unwrap().to_string());
    assert_eq!(v["legs"][0]["packets_in"], 15, "{v}");
    assert_eq!(v["legs"][1]["packets_out"], 15, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = p.metrics();
        let drops = metric(
            &m,
            "portico_dataplane_drops_total",
            &[("reason", "media_foreign_source")],
        );
        let events = metric(
            &m,
            "portico_fraud_suspicious_events_total",
            &[("origin", "media"), ("reason", "media_foreign_source")],
        );
        if drops == 20.0 && events >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drops {drops}, suspicious events {events}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_idle_session_expires_and_a_deleted_one_stops_relaying() {
    let p = Portico::start("media-idle", media_spec("epoll", "idle_timeout = \"2s\""));
    let a = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let b = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let legs = [Some(a.local_addr().unwrap()), Some(b.local_addr().unwrap())];
    let (idle, idle_local, _) = create(&p, legs);
    let (del, local, _) = create(&p, legs);
    stream(&a, idle_local[0], &b, idle_local[1], 3, 1);
    // Delete: 204, then 404, the ports are closed and nothing is relayed.
    let (code, _) = p.call("DELETE", &format!("/api/v1/media/sessions/{del}"), "");
    assert_eq!(code, 204);
    assert_eq!(session(&p, &del).0, 404);
    let (code, v) = p.call("DELETE", &format!("/api/v1/media/sessions/{del}"), "");
    assert_eq!(code, 404, "{v}");
    for l in local {
        assert!(
            port_becomes_free(l.ip(), l.port(), Duration::from_secs(2)),
            "{l} closed"
        );
    }
    // Idle: gone within idle_timeout and a scan.
    let deadline = Instant::now() + Duration::from_secs(6);
    while session(&p, &idle).0 == 200 {
        assert!(Instant::now() < deadline, "idle session never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "portico_media_sessions_ended_total",
            &[("reason", "idle")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "portico_media_sessions_ended_total",
            &[("reason", "deleted")]
        ),
        1.0
    );
    assert_eq!(metric(&m, "portico_media_sessions_active", &[]), 0.0);
}

#[test]
fn limits_and_refusals_answer_json_errors() {
    let p = Portico::start("media-limits", media_spec("epoll", "max_sessions = 2"));
    let none = [None, None];
    create(&p, none);
    create(&p, none);
    let (code, v) = p.call("POST", "/api/v1/media/sessions", r#"{"legs":[{},{}]}"#);
    assert_eq!(code, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("media.max_sessions"),
        "{v}"
    );
    for (body, code, needle) in [
        (r#"{"legs":[{}]}"#, 400, "exactly 2 legs"),
        (
            r#"{"legs":[{"address":"nonsense"},{}]}"#,
            400,
            "legs[0].address",
        ),
        (r#"{"legs":[{},{}],"colour":1}"#, 400, "colour"),
        ("not json", 400, "the body must be"),
    ] {
        let (c, v) = p.call("POST", "/api/v1/media/sessions", body);
        assert_eq!(c, code, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    // The peer policy applies to signalled addresses (only 127.0.0.0/8 is allowed here).
    for s in p
        .call("GET", "/api/v1/media/sessions", "")
        .1
        .as_array()
        .unwrap()
    {
        let id = s["id"].as_str().unwrap();
        assert_eq!(
            p.call("DELETE", &format!("/api/v1/media/sessions/{id}"), "")
                .0,
            204
        );
    }
    let (c, v) = p.call(
        "POST",
        "/api/v1/media/sessions",
        r#"{"legs":[{},{"address":"10.1.2.3:4000"}]}"#,
    );
    assert_eq!(c, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().starts_with("legs[1].address"),
        "{v}"
    );

    // Without [media] the relay is off.
    let off = Portico::start("media-off", Spec::new().io("epoll"));
    let (c, v) = off.call("POST", "/api/v1/media/sessions", r#"{"legs":[{},{}]}"#);
    assert_eq!(
        (c, v),
        (503, serde_json::json!({"error": "media relay is off"}))
    );
}

#[test]
fn bad_media_and_nat_values_are_refused_naming_the_key() {
    let site = Portico::new("media-config", Spec::new());
    let base = site.config_text("");
    for (extra, key) in [
        ("[media]\nports = \"21001-21001\"\n", "media.ports: "),
        ("[media]\nports = \"16000-17000\"\n", "media.ports: "),
        (
            "[media]\nports = \"40000-40999\"\nlearn_window = \"2h\"\n",
            "media.learn_window: ",
        ),
        ("[media]\nidle_timeout = \"soon\"\n", "media.idle_timeout"),
        ("[media]\nmax_sessions = 100000\n", "media.max_sessions: "),
        (
            "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.2.10\"\n",
            "nat.maps[0].internal",
        ),
        (
            "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.2.10:0\"\n",
            "nat.maps[0].internal: ",
        ),
        (
            "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.2.10:5004\"\n\
             [[nat.maps]]\npublic_ports = \"5000-5004\"\ninternal = \"10.0.2.11:5000\"\n",
            "nat.maps[1].public_ports: ",
        ),
    ] {
        let file = site.dir.join("bad.toml");
        std::fs::write(&file, format!("{base}\n{extra}")).unwrap();
        let out = run_portico(
            &[OsStr::new("check"), file.as_os_str()],
            site.dir.path(),
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra} accepted");
        assert!(err.contains(key), "{extra}: {err}");
    }
}

/// A leg created with an SRTP key learns only a source whose packets carry a valid
/// authentication tag: an attacker racing the phone with forged tags is never learned nor
/// forwarded, and is counted; the phone's authenticated stream latches. The key never comes
/// back from the API. A leg without a key still learns as before.
#[test]
fn a_leg_with_an_srtp_key_learns_only_an_authenticated_source() {
    use base64::Engine as _;
    let p = Portico::start("media-srtp", media_spec("epoll", "learn_window = \"5s\""));
    let a = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let b = udp_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let mut master = [0u8; 30];
    for (i, x) in master.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let key = base64::engine::general_purpose::STANDARD.encode(master);
    let body = serde_json::json!({"legs": [
        {"address": a.local_addr().unwrap().to_string(),
         "srtp": {"suite": "AES_CM_128_HMAC_SHA1_80", "key": key}},
        {"address": b.local_addr().unwrap().to_string()},
    ]});
    let (code, v) = p.call("POST", "/api/v1/media/sessions", &body.to_string());
    assert_eq!(code, 201, "{v}");
    assert!(!v.to_string().contains(&key), "key echoed: {v}");
    assert_eq!(
        v["legs"][0]["srtp"]["suite"], "AES_CM_128_HMAC_SHA1_80",
        "{v}"
    );
    assert_eq!(v["legs"][1]["srtp"], serde_json::Value::Null, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let local = [
        v["legs"][0]["local"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap(),
        v["legs"][1]["local"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap(),
    ];
    // The attacker sends first: plain RTP, a forged tag, a tag under another key.
    let attacker = udp_on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 66)));
    let mut other = master;
    other[0] ^= 1;
    let mut forged = rtp(1, 0xBAD);
    forged.extend([0u8; 10]);
    for pkt in [rtp(0, 0xBAD), forged, srtp(&other, 2, 0xBAD)] {
        attacker.send_to(&pkt, local[0]).unwrap();
    }
    expect_silence(
        &b,
        Duration::from_millis(400),
        "unauthenticated RTP must not reach B",
    );
    // Media from B goes to leg 0's signalled address (A), never to the attacker.
    b.send_to(&rtp(0, 0xB), local[1]).unwrap();
    assert!(
        recv(&a, Duration::from_secs(2)).is_some(),
        "B→A before latching"
    );
    expect_silence(
        &attacker,
        Duration::from_millis(300),
        "the attacker was not learned",
    );
    // A's authenticated packets latch leg 0 and are relayed unchanged.
    for seq in 0..3 {
        let pkt = srtp(&master, seq, 0xA);
        a.send_to(&pkt, local[0]).unwrap();
        let (got, from) = recv(&b, Duration::from_secs(2)).expect("SRTP A→B relayed");
        assert_eq!((got, from), (pkt, local[1]));
    }
    let v = wait_session(&p, &id, "leg 0 latched to A, 3 packets in", |v| {
        v["legs"][0]["latched"] == a.local_addr().unwrap().to_string()
            && v["legs"][0]["packets_in"] == 3
    });
    assert!(!v.to_string().contains(&key), "key echoed: {v}");
    let (_, list) = p.call("GET", "/api/v1/media/sessions", "");
    assert!(!list.to_string().contains(&key), "key echoed: {list}");
    // Within the learn window the attacker still cannot take the leg over.
    attacker.send_to(&srtp(&other, 3, 0xBAD), local[0]).unwrap();
    b.send_to(&rtp(1, 0xB), local[1]).unwrap();
    assert!(recv(&a, Duration::from_secs(2)).is_some(), "B→A still to A");
    expect_silence(
        &attacker,
        Duration::from_millis(300),
        "not learned in the window",
    );
    // Leg 1 has no key: it learns B's plain RTP as before.
    let v = wait_session(&p, &id, "leg 1 latched to B", |v| {
        v["legs"][1]["latched"] == b.local_addr().unwrap().to_string()
    });
    assert_eq!(v["legs"][0]["latched"], a.local_addr().unwrap().to_string());
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "portico_dataplane_drops_total",
            &[("reason", "media_srtp_auth")]
        ),
        4.0
    );
    // Bad keys are refused naming the field.
    for (leg, needle) in [
        (
            serde_json::json!({"srtp": {"suite": "AES_CM_128_HMAC_SHA1_32", "key": key}}),
            "legs[0].srtp.suite",
        ),
        (
            serde_json::json!({"srtp": {"suite": "AES_CM_128_HMAC_SHA1_80", "key": "AAAA"}}),
            "legs[0].srtp.key",
        ),
        (
            serde_json::json!({"srtp": {"suite": "AES_CM_128_HMAC_SHA1_80", "key": "not base64!"}}),
            "legs[0].srtp.key",
        ),
    ] {
        let body = serde_json::json!({"legs": [leg, {}]});
        let (c, v) = p.call("POST", "/api/v1/media/sessions", &body.to_string());
        assert_eq!(c, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
}
