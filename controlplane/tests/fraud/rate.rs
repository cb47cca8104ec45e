//! Request-rate events: a source sending STUN/TURN requests above `fraud.request_rate` is
//! reported (`portico_fraud_suspicious_events_total{origin="stun"}`) and, past the
//! threshold, blacklisted. Only a source that has shown it receives our answers counts: one
//! on TCP, or one holding an authenticated allocation. A UDP source address can be forged, so
//! a flood from an unproven one is not held against that address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::prelude::*;

const RATE: usize = 20;

fn rate_events(site: &Portico) -> f64 {
    site.metric(
        "portico_fraud_suspicious_events_total",
        &[("origin", "stun"), ("reason", "stun_rate_exceeded")],
    )
}

fn site(tag: &str, workers: usize, rate: usize) -> Portico {
    site_blocking_after(tag, workers, rate, 2)
}

fn site_blocking_after(tag: &str, workers: usize, rate: usize, threshold: usize) -> Portico {
    let spec = spec()
        .workers(workers)
        .fraud(&format!("request_rate = {rate}"))
        .fraud(&format!("suspicious_per_minute = {threshold}"))
        .fraud("blacklist_minutes = \"10m\"");
    Portico::start(tag, spec)
}

/// `bursts` bursts of `2 * RATE + 2` requests, each started just after a second of the
/// wall clock begins (the server counts requests per calendar second): each puts at least
/// `RATE + 1` requests into one second of its own, and, answered within a second, into only
/// one, so each is exactly one second above the rate. (A burst started at a random moment
/// could straddle two seconds with more than `RATE` in each, as a busy CI machine once made
/// it.) `ask` sends one request and says whether it was answered; returns how many were.
fn bursts(bursts: u32, mut ask: impl FnMut() -> bool) -> usize {
    let mut answered = 0;
    for _ in 0..bursts {
        let into_second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        std::thread::sleep(Duration::from_nanos(
            1_000_000_000 - u64::from(into_second) + 20_000_000,
        ));
        for _ in 0..2 * RATE + 2 {
            if ask() {
                answered += 1;
            }
        }
    }
    answered
}

#[track_caller]
fn expect_rate_events(site: &Portico, n: f64) {
    let got = site.wait_metric(
        "portico_fraud_suspicious_events_total",
        &[("origin", "stun"), ("reason", "stun_rate_exceeded")],
        n,
        Duration::from_secs(2),
    );
    assert_eq!(got, n, "seconds above request_rate reported");
}

#[test]
fn a_flood_over_tcp_is_reported_once_a_second_and_blacklisted() {
    let site = site("rate-tcp", 1, RATE);
    let server = site.udp4();
    let calm = v4(127, 0, 6, 8);
    let flooder = v4(127, 0, 6, 7);
    // At half the rate nothing is reported.
    let mut c = TcpStun::connect(calm, server).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let t = Instant::now();
        for _ in 0..RATE / 2 {
            assert!(c.binding(ANSWER_WAIT));
        }
        std::thread::sleep(Duration::from_millis(1100).saturating_sub(t.elapsed()));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        rate_events(&site),
        0.0,
        "requests at half the rate reported"
    );

    let mut f = TcpStun::connect(flooder, server).unwrap_or_else(|e| panic!("{e}"));
    let answered = bursts(2, || f.binding(ANSWER_WAIT));
    assert_eq!(
        answered,
        2 * (2 * RATE + 2),
        "requests above the rate are still answered"
    );
    expect_rate_events(&site, 2.0);
    assert!(
        site.entry("127.0.6.7").is_none(),
        "blacklisted at the threshold"
    );
    // The third second above the rate goes past the threshold of 2.
    bursts(1, || f.binding(Duration::from_millis(300)));
    assert!(
        wait_until(Duration::from_secs(1), || site.entry("127.0.6.7").is_some()),
        "not blacklisted after three seconds above request_rate: {:?}",
        site.entries()
    );
    site.expect_blacklisted_in_log(flooder, "stun_rate_exceeded");
    assert!(
        !f.binding(Duration::from_millis(300)),
        "the open connection still answered"
    );
    assert!(
        TcpStun::connect(flooder, server).is_ok_and(|mut c| !c.binding(Duration::from_millis(300))),
        "a new TCP connection from the blacklisted source was answered"
    );
    assert!(!answered_from(flooder, server, Duration::from_millis(300)));
    assert!(answered_from(calm, server, Duration::from_millis(300)));
}

#[test]
fn a_flood_over_udp_from_a_source_with_an_allocation_is_reported_and_blacklisted() {
    let site = site("rate-alloc", 1, RATE);
    let server = site.udp4();
    let src = v4(127, 0, 6, 9);
    let mut client = TurnClient::from(src, server, USER, PASSWORD);
    client.allocate();
    let sock = &client.sock;
    bursts(3, || {
        binding(sock, server, Duration::from_millis(300)).is_some()
    });
    assert!(
        wait_until(Duration::from_secs(1), || site.entry("127.0.6.9").is_some()),
        "an allocation holder three seconds above request_rate was not blacklisted: {} \
         events, entries {:?}",
        rate_events(&site),
        site.entries()
    );
    assert_eq!(rate_events(&site), 3.0);
    assert!(
        wait_until(Duration::from_secs(1), || site
            .allocation_clients()
            .is_empty()),
        "its allocation outlived the blacklisting"
    );
}

#[test]
fn a_flood_over_udp_from_an_unproven_source_is_not_held_against_it() {
    let site = site("rate-udp", 1, RATE);
    let server = site.udp4();
    let src = v4(127, 0, 6, 10);
    let s = udp_on(src);
    let answered = bursts(3, || binding(&s, server, ANSWER_WAIT).is_some());
    assert_eq!(answered, 3 * (2 * RATE + 2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rate_events(&site),
        0.0,
        "a flood from a UDP source that never proved it receives answers was reported"
    );
    assert!(site.entries().is_empty());
    assert!(answered_from(src, server, Duration::from_millis(300)));
}

/// `fraud.request_rate` is per source. With two workers the kernel spreads a source's
/// sockets over both (SO_REUSEPORT hashes the 4-tuple); a source holding an allocation that
/// sends one and a half times the rate from many ports is still above the rate. (At this
/// rate and 64 ports, neither worker's share comes near the rate by chance.)
#[test]
fn the_request_rate_is_per_source_whichever_worker_serves_it() {
    const HIGH: usize = 100;
    // About what is reported, not what follows: a threshold the three seconds cannot reach
    // (the engine reacts at once, so with a low one the source would be cut mid-burst).
    let site = site_blocking_after("rate-workers", 2, HIGH, 10);
    let server = site.udp4();
    let src: IpAddr = v4(127, 0, 6, 11);
    let mut client = TurnClient::from(src, server, USER, PASSWORD);
    client.allocate();
    let socks: Vec<std::net::UdpSocket> = (0..64).map(|_| udp_on(src)).collect();
    // Three seconds of 1.5 x HIGH requests each, round-robin over the 64 ports.
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..HIGH * 3 / 2 {
            assert!(binding(&socks[i % socks.len()], server, ANSWER_WAIT).is_some());
        }
        std::thread::sleep(Duration::from_millis(1100).saturating_sub(t.elapsed()));
    }
    let events = site.wait_metric(
        "portico_fraud_suspicious_events_total",
        &[("origin", "stun"), ("reason", "stun_rate_exceeded")],
        1.0,
        Duration::from_secs(1),
    );
    assert!(
        events >= 1.0,
        "a source holding an allocation sent {} requests a second (request_rate = {HIGH}) \
         from 64 ports and was never reported: each worker meters only the share of the \
         source's ports the kernel hands it, and only the worker that holds the allocation \
         counts the source as proven",
        HIGH * 3 / 2
    );
}
