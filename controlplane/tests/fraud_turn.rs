//! Fraud detection on the TURN/STUN side: wrong passwords from one source put it on the
//! blacklist after exactly the threshold; the dataplane then drops everything from it (UDP
//! and TCP, STUN Binding included) and ends its allocations, while other sources are served
//! throughout; it is let in again when the entry expires. (Request floods: fraud_rate.rs.)

mod fraud_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fraud_common::*;

const THRESHOLD: usize = 5;

fn blacklisted_drops(site: &Site) -> f64 {
    site.metric(
        "portico_dataplane_drops_total",
        &[("reason", "blacklisted")],
    )
}

/// Polls Binding requests from `src` (20 ms each) until one goes unanswered and the source
/// then stays silent for three more tries of 300 ms (an answer that was merely slow is no
/// block); the time until that first unanswered request.
fn time_until_dropped(src: std::net::IpAddr, server: SocketAddr, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let s = udp_from(src);
    while t0.elapsed() < limit {
        if !binding(&s, server, Duration::from_millis(20)) {
            let took = t0.elapsed();
            if !answered_from(src, server, Duration::from_millis(300)) {
                return took;
            }
        }
    }
    panic!("{src} is still answered {limit:?} after it should have been blacklisted");
}

/// A STUN Binding over a new TCP connection from `src`: true when answered, false when the
/// connection is refused or closed instead.
fn tcp_binding_answered(src: std::net::IpAddr, server: SocketAddr) -> bool {
    TcpStun::connect(src, server).is_ok_and(|mut c| c.binding(Duration::from_millis(500)))
}

#[test]
fn wrong_passwords_blacklist_the_source_after_exactly_the_threshold_until_expiry() {
    let site = Site::start(
        "turn-brute",
        Setup::default()
            .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
            .fraud("blacklist_minutes = \"3s\""),
    );
    let server = site.udp4();
    let attacker = v4(127, 0, 0, 3);
    let bystander = Bystander::stun(v4(127, 0, 0, 4), server);

    let mut c = TurnClient::attacker(attacker, server);
    c.challenge();
    for i in 1..=THRESHOLD {
        c.wrong_password();
        site.expect_auth_failures(i as f64);
    }
    // Exactly the threshold: counted, not blocked.
    assert!(
        answered_from(attacker, server, Duration::from_millis(500)),
        "blocked after {THRESHOLD} events; the threshold is {THRESHOLD}"
    );
    assert!(site.entry("127.0.0.3").is_none(), "{:?}", site.entries());
    let drops_before = blacklisted_drops(&site);

    // One more: the request that crosses the threshold is still answered, then the source
    // is dropped within 100 ms.
    c.wrong_password();
    let decided = Instant::now();
    let took = time_until_dropped(attacker, server, Duration::from_secs(2));
    eprintln!("TURN brute force: dropped {took:?} after the event over the threshold");
    assert!(
        took <= Duration::from_millis(100),
        "blocking took {took:?}, more than 100 ms"
    );
    let e = site
        .entry("127.0.0.3")
        .unwrap_or_else(|| panic!("no entry for the attacker: {:?}", site.entries()));
    assert_eq!(e["kind"], "black");
    assert_eq!(e["origin"], "auto");
    let (created, expires) = (
        e["created_at"].as_u64().unwrap_or(0),
        e["expires_at"].as_u64().unwrap_or(0),
    );
    // Whole seconds, rounded up so the block lasts at least the configured time.
    assert_eq!(expires - created, 4, "blacklist_minutes = \"3s\": {e}");
    assert_eq!(
        site.metric("portico_fraud_entries", &[("kind", "black")]),
        1.0
    );
    assert_eq!(
        site.metric("portico_fraud_auto_blacklisted_total", &[]),
        1.0
    );

    // Dropped everywhere: TURN requests and TCP too, and the drops are counted.
    assert!(
        c.allocate_once(Duration::from_millis(300)).is_none(),
        "a TURN request from the blacklisted source was answered"
    );
    assert!(
        !tcp_binding_answered(attacker, server),
        "a Binding over TCP from the blacklisted source was answered"
    );
    assert!(
        tcp_binding_answered(v4(127, 0, 0, 4), server),
        "a Binding over TCP from another source was not answered"
    );
    assert!(
        blacklisted_drops(&site) > drops_before,
        "portico_dataplane_drops_total{{reason=\"blacklisted\"}} did not rise"
    );

    // Stays blocked (checked until 1.8 s: whole-second expiry makes a 3 s block end 2 to 3 s
    // after the decision; the lower bound has a test of its own) ...
    let s = udp_from(attacker);
    while decided.elapsed() < Duration::from_millis(1500) {
        assert!(
            !binding(&s, server, Duration::from_millis(300)),
            "let in again after {:?} of a 3 s block",
            decided.elapsed()
        );
    }
    // ... and is let in again by itself.
    assert!(
        wait_until(Duration::from_secs(6), || binding(
            &udp_from(attacker),
            server,
            Duration::from_millis(100)
        )),
        "still blocked {:?} after a 3 s block began",
        decided.elapsed()
    );
    let blocked_for = decided.elapsed();
    eprintln!("TURN brute force: blocked for {blocked_for:?} (blacklist_minutes = \"3s\")");
    assert!(
        blocked_for >= Duration::from_secs(2) && blocked_for <= Duration::from_millis(4500),
        "a 3 s block lasted {blocked_for:?}"
    );
    // The entry is gone from the list and TURN answers again (a fresh count: one more wrong
    // password does not block).
    assert!(
        wait_until(Duration::from_secs(3), || site.entry("127.0.0.3").is_none()),
        "the expired entry is still listed: {:?}",
        site.entries()
    );
    let mut again = TurnClient::attacker(attacker, server);
    again.challenge();
    again.wrong_password();
    assert!(answered_from(attacker, server, Duration::from_millis(500)));
    bystander.finish(20);
}

#[test]
fn a_source_that_gets_blacklisted_loses_its_allocation() {
    let site = Site::start(
        "turn-teardown",
        Setup::default()
            .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
            .fraud("blacklist_minutes = \"1m\""),
    );
    let server = site.udp4();
    let a = v4(127, 0, 0, 5);
    let other = v4(127, 0, 0, 6);
    let mut good = TurnClient::new(a, server, USER, PASSWORD);
    good.allocate_relay();
    let mut bystander = TurnClient::new(other, server, USER, PASSWORD);
    bystander.allocate_relay();
    let client = good.local().to_string();
    let clients = site.allocation_clients();
    assert!(clients.contains(&client), "{client} not in {clients:?}");

    // The same address misbehaves from another port.
    wrong_passwords(a, server, THRESHOLD + 1);
    let t0 = Instant::now();
    let gone = wait_until(Duration::from_secs(3), || {
        !site.allocation_clients().contains(&client)
    });
    assert!(
        gone,
        "the allocation of {client} outlived the blacklisting of its address: {:?}",
        site.allocation_clients()
    );
    eprintln!(
        "allocation of a blacklisted source ended {:?} after the decision",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() <= Duration::from_secs(1),
        "took {:?} to end the allocation",
        t0.elapsed()
    );
    // Its refreshes go unanswered; the other source keeps its allocation and is answered.
    assert!(good.refresh(Duration::from_millis(600)).is_none());
    let r = bystander
        .refresh(ANSWER_WAIT)
        .unwrap_or_else(|| panic!("the other source's Refresh went unanswered"));
    assert_eq!(r.class(), portico_dataplane::stun::Class::SuccessResponse);
    assert!(site
        .allocation_clients()
        .contains(&bystander.local().to_string()));
    assert_eq!(
        site.metric(
            "portico_turn_allocations_ended_total",
            &[("reason", "deleted")]
        ),
        1.0,
        "one allocation ended by the blacklisting"
    );
    assert_eq!(site.metric("portico_turn_allocations_active", &[]), 1.0);
}

/// `blacklist_minutes = "2s"` blocks for at least two seconds. Expiry is kept in whole Unix
/// seconds, so it must be rounded up from the moment of the decision, not down.
#[test]
fn a_block_lasts_at_least_the_configured_duration() {
    let site = Site::start(
        "turn-duration",
        Setup::default()
            .fraud("suspicious_per_minute = 1")
            .fraud("blacklist_minutes = \"2s\""),
    );
    let server = site.udp4();
    let src = v4(127, 0, 0, 12);
    let c = {
        let mut c = TurnClient::attacker(src, server);
        c.challenge();
        c
    };
    c.wrong_password();
    c.wrong_password();
    let decided = Instant::now();
    let s = udp_from(src);
    let mut blocked = false;
    let ended = loop {
        let answered = binding(&s, server, Duration::from_millis(50));
        blocked |= !answered;
        if blocked && answered {
            break decided.elapsed();
        }
        assert!(
            decided.elapsed() < Duration::from_secs(5),
            "blocked for good"
        );
    };
    eprintln!("a 2 s block ended {ended:?} after the decision");
    assert!(blocked, "never blocked");
    assert!(
        ended >= Duration::from_secs(2),
        "blacklist_minutes = \"2s\" blocked for only {ended:?}: the expiry is the decision's \
         Unix second (rounded down) plus 2"
    );
}
