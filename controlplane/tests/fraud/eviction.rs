//! The counting table's eviction policy under churn: `controlplane/src/fraud/counter.rs`
//! promises that "a flood from millions of spoofed addresses replaces quiet entries among
//! themselves ... while a source that keeps offending stays counted". Here a persistent
//! offender sends wrong TURN passwords at a steady pace (one per batch of new flood sources)
//! while a flood of new sources, each staying below the threshold, churns the full table.
//! The offender's events within the minute exceed the threshold, so it must be blacklisted;
//! the flood sources must not be.

use std::time::{Duration, Instant};

use crate::prelude::*;

const CAPACITY: usize = 1000;
const THRESHOLD: usize = 20;
const PER_SOURCE: usize = 5;
const BATCH: usize = 100;
/// The first flood source index (`flood_source`): above the flood test's, so no source of
/// this test is one of that test's.
const FIRST: usize = 50_000;

#[test]
fn a_persistent_offender_stays_counted_while_new_sources_churn_the_full_table() {
    // A flood of thousands of sources: no other test of this binary runs meanwhile.
    let _alone = alone();
    let site = Portico::start(
        "evict",
        spec()
            .fraud(&format!("max_tracked_sources = {CAPACITY}"))
            .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
            .fraud("blacklist_minutes = \"10m\""),
    );
    let server = site.udp4();
    // Fill the table first.
    let mut total = flood(
        server,
        FIRST..FIRST + 2 * CAPACITY,
        BATCH,
        PER_SOURCE,
        || std::thread::sleep(Duration::from_millis(50)),
    );
    assert!(wait_until(Duration::from_secs(5), || site
        .metric("portico_fraud_tracked_sources", &[])
        == CAPACITY as f64));

    let offender = v4(127, 0, 7, 3);
    let mut c = TurnClient::attacker(offender, server);
    c.challenge();
    let t0 = Instant::now();
    // The offender's attempts each wait for their 401, so every one counted is known to have
    // reached the engine: it sends until more than the threshold were answered (or until it
    // is no longer answered: blacklisted).
    let mut sent = 0;
    let mut answered = 0;
    let mut silenced = false;
    let batches = 2 * THRESHOLD;
    let flooded = flood(
        server,
        FIRST + 2 * CAPACITY..FIRST + 2 * CAPACITY + batches * BATCH,
        BATCH,
        PER_SOURCE,
        || {
            if answered <= THRESHOLD && !silenced && sent < 3 * THRESHOLD {
                sent += 1;
                match c.allocate_once(Duration::from_millis(300)) {
                    Some(r) if r.code() == Some(401) => answered += 1,
                    Some(r) => panic!("the offender's wrong password got {:?}", r.code()),
                    // Lost, or dropped because the source is blacklisted already (the table
                    // errs upwards: an evicted entry's count is inherited).
                    None => silenced = site.entry("127.0.7.3").is_some(),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        },
    );
    total += flooded;
    let took = t0.elapsed();
    assert!(
        answered > THRESHOLD || silenced,
        "the offender got only {answered} answered attempts of {sent} and was not blocked"
    );
    // Every answered flood event certainly reached the engine (an unanswered one may have
    // been lost on a loaded machine; that only makes the table churn less, it cannot make
    // the offender's count restart). The engine never blocks on fewer than half the
    // threshold of a source's own events.
    let counted = |site: &Portico| {
        site.metric(
            "portico_fraud_suspicious_events_total",
            &[("origin", "turn"), ("reason", "turn_auth_failure")],
        )
    };
    let floor = (total.answered + answered.min(THRESHOLD / 2)) as f64;
    assert!(
        wait_until(Duration::from_secs(5), || counted(&site) >= floor),
        "answered events missing in the engine: counted {}, at least {floor} expected",
        counted(&site)
    );
    assert!(
        total.answered * 2 >= total.sent,
        "most of the flood was lost ({} of {} answered): the table was not churned",
        total.answered,
        total.sent
    );
    eprintln!(
        "offender: {sent} wrong passwords in {took:?} amid {} new sources ({} events each)",
        batches * BATCH,
        PER_SOURCE
    );
    assert!(
        took < Duration::from_secs(50),
        "the minute window would not hold"
    );
    let caught = wait_until(Duration::from_secs(2), || site.entry("127.0.7.3").is_some());
    assert!(
        caught,
        "a source with {sent} wrong passwords within {took:?} (threshold {THRESHOLD} per \
         minute) was never blacklisted: while the table was full, each new flood source \
         evicted the quietest sampled entry, which was the offender whose count had only \
         begun; its count restarted every time. Entries: {:?}",
        site.entries()
    );
    assert!(!answered_from(offender, server, Duration::from_millis(300)));
    assert_eq!(site.entries().len(), 1, "{:?}", site.entries());
}
