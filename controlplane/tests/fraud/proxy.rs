//! Fraud detection on the reverse proxy: a client whose logins the target (nginx) rejects
//! with 401 is refused at accept after exactly the threshold, stays refused, and is let in
//! again after the expiry; a client from another address is served throughout.

use std::time::{Duration, Instant};

use crate::prelude::*;

const THRESHOLD: usize = 5;

fn rejected_by_target(site: &Portico) -> f64 {
    site.metric(
        "portico_fraud_suspicious_events_total",
        &[("origin", "proxy"), ("reason", "target_rejected")],
    )
}

#[test]
fn a_brute_force_client_is_refused_at_accept_after_exactly_the_threshold_until_expiry() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start(
        "proxy-brute",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
            .fraud("blacklist_minutes = \"3s\""),
    );
    let proxy = site.proxy();
    let attacker = v4(127, 0, 2, 3);
    let bystander = Bystander::http(v4(127, 0, 2, 4), proxy);

    for i in 1..=THRESHOLD {
        assert_eq!(
            get_with(attacker, proxy, "/private", &[WRONG_LOGIN]),
            Answer::Status(401)
        );
        let counted = site.wait_metric(
            "portico_fraud_suspicious_events_total",
            &[("origin", "proxy"), ("reason", "target_rejected")],
            i as f64,
            Duration::from_secs(5),
        );
        assert_eq!(counted, i as f64, "401s from the target counted");
    }
    // Exactly the threshold: still served (a request the target accepts is no event).
    assert_eq!(
        get_from(attacker, proxy, "/"),
        Answer::Status(200),
        "refused after {THRESHOLD} events; the threshold is {THRESHOLD}"
    );
    assert!(site.entry("127.0.2.3").is_none());
    assert_eq!(
        site.metric("portico_fraud_blocked_connections_total", &[]),
        0.0
    );

    // One more: that request is answered (its connection was accepted before the
    // decision); the next connection is closed at accept, without a byte of answer.
    assert_eq!(
        get_with(attacker, proxy, "/private", &[WRONG_LOGIN]),
        Answer::Status(401)
    );
    let decided = Instant::now();
    let mut took = None;
    while decided.elapsed() < Duration::from_secs(2) {
        if get_from(attacker, proxy, "/") == Answer::Refused {
            took = Some(decided.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = took.unwrap_or_else(|| panic!("not refused 2 s after {} events", THRESHOLD + 1));
    eprintln!("proxy brute force: refused {took:?} after the event over the threshold");
    assert!(
        took <= Duration::from_millis(100),
        "refusing took {took:?}, more than 100 ms"
    );
    assert_eq!(rejected_by_target(&site), (THRESHOLD + 1) as f64);
    let e = site
        .entry("127.0.2.3")
        .unwrap_or_else(|| panic!("no entry for the attacker: {:?}", site.entries()));
    assert_eq!(
        (e["kind"].as_str(), e["origin"].as_str()),
        (Some("black"), Some("auto"))
    );

    // Over TLS too, and before any TLS work: no ServerHello, while another source gets one.
    assert!(
        !tls_hello_answered(attacker, site.proxy_tls()),
        "the proxy answered a blacklisted source's ClientHello"
    );
    assert!(
        tls_hello_answered(v4(127, 0, 2, 4), site.proxy_tls()),
        "the proxy did not answer another source's ClientHello"
    );

    // Stays refused (whatever it asks for) ...
    let mut refusals = 0;
    while decided.elapsed() < Duration::from_millis(1800) {
        for path in ["/", "/private"] {
            assert_eq!(
                get_from(attacker, proxy, path),
                Answer::Refused,
                "served again {:?} into a 3 s block",
                decided.elapsed()
            );
            refusals += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        site.metric("portico_fraud_blocked_connections_total", &[]) >= f64::from(refusals),
        "refused connections not counted"
    );
    // ... and refused connections are no new events.
    assert_eq!(rejected_by_target(&site), (THRESHOLD + 1) as f64);

    // Let in again after the expiry.
    let back = wait_until(Duration::from_secs(5), || {
        get_from(attacker, proxy, "/") == Answer::Status(200)
    });
    let blocked_for = decided.elapsed();
    assert!(
        back,
        "still refused {blocked_for:?} after a 3 s block began"
    );
    eprintln!("proxy brute force: refused for {blocked_for:?} (blacklist_minutes = \"3s\")");
    assert!(
        blocked_for >= Duration::from_secs(2) && blocked_for <= Duration::from_millis(4500),
        "a 3 s block lasted {blocked_for:?}"
    );
    // Counting starts from zero again: one more 401 does not block.
    assert_eq!(
        get_with(attacker, proxy, "/private", &[WRONG_LOGIN]),
        Answer::Status(401)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(get_from(attacker, proxy, "/"), Answer::Status(200));
    bystander.finish(20);
}

#[test]
fn requests_the_proxy_itself_rejects_count_too() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start(
        "proxy-unknown",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud("suspicious_per_minute = 2")
            .fraud("blacklist_minutes = \"1m\""),
    );
    let proxy = site.proxy();
    let scanner = v4(127, 0, 2, 9);
    // A Host no service has: rejected by the proxy, no target involved.
    let unknown = |src| {
        let mut s = tcp_from(src, proxy).unwrap_or_else(|e| panic!("connect: {e}"));
        use std::io::{Read, Write};
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: nobody.test\r\nConnection: close\r\n\r\n");
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    for _ in 0..3 {
        unknown(scanner);
    }
    assert!(
        wait_until(Duration::from_secs(2), || get_from(scanner, proxy, "/")
            == Answer::Refused),
        "three requests for unknown services did not blacklist the source (threshold 2); \
         entries {:?}",
        site.entries()
    );
    assert!(
        site.metric(
            "portico_fraud_suspicious_events_total",
            &[("origin", "proxy"), ("reason", "unknown_name")]
        ) >= 3.0
    );
    assert_eq!(get_from(v4(127, 0, 2, 10), proxy, "/"), Answer::Status(200));
}

/// A brute-force client that keeps one connection open must lose it too: a blacklist that
/// only acts at accept would let it go on over the connection it holds.
#[test]
fn a_kept_alive_connection_of_a_blacklisted_source_is_not_served_on() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start(
        "proxy-keepalive",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
            .fraud("blacklist_minutes = \"1m\""),
    );
    let attacker = v4(127, 0, 2, 11);
    let mut conn = KeepAlive::open(attacker, site.proxy());
    let mut other = KeepAlive::open(v4(127, 0, 2, 12), site.proxy());
    assert_eq!(other.get("/"), Answer::Status(200));
    for _ in 0..=THRESHOLD {
        assert_eq!(
            conn.get_with("/private", &[WRONG_LOGIN]),
            Answer::Status(401)
        );
    }
    assert!(wait_until(Duration::from_secs(1), || site
        .entry("127.0.2.11")
        .is_some()));
    let t0 = Instant::now();
    let next = conn.get("/");
    assert!(
        matches!(next, Answer::Refused | Answer::Status(403)),
        "a blacklisted source's next request on its open connection was served: {next:?}"
    );
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_eq!(
        other.get("/"),
        Answer::Status(200),
        "another source's open connection"
    );
}
