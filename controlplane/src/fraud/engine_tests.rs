//! Engine and counting-table cases the inline tests do not cover: IPv4-mapped sources,
//! events from a source already blocked, manual IPv6 network entries (found by their address, enforced inside only),
//! and the counting table's promise to keep a persistent offender under churn.
//!
//! Paths are spelled from the crate root so the file does not depend on where it is mounted.

use std::net::IpAddr;

use portico_shared::config::FraudConfig;

use crate::fraud::counter::Counter;
use crate::fraud::{Change, Engine, Kind, Origin, Source};

fn engine(threshold: u32) -> Engine {
    Engine::new(
        &FraudConfig {
            suspicious_per_minute: threshold,
            ..FraudConfig::default()
        },
        3,
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A manual entry without expiry or note, added at time 10.
fn add(e: &mut Engine, addr: &str, prefix: Option<u8>, kind: Kind) -> Vec<Change> {
    e.add(ip(addr), prefix, kind, None, String::new(), 10).1
}

#[test]
fn an_ipv4_mapped_source_is_the_ipv4_source() {
    let mut e = engine(2);
    assert_eq!(e.suspicious(ip("::ffff:198.51.100.9"), 100), None);
    assert_eq!(e.suspicious(ip("198.51.100.9"), 100), None);
    let change = e.suspicious(ip("::ffff:198.51.100.9"), 101);
    let source = Source::of(ip("198.51.100.9"), 64);
    assert_eq!(change, Some(Change::Block(source, 101 + 600 + 1)));
    assert_eq!(source.to_string(), "198.51.100.9");
    assert_eq!(source.shm_prefix(), 128);
    assert!(e.is_blocked(ip("198.51.100.9"), 102));
    assert!(e.is_blocked(ip("::ffff:198.51.100.9"), 102));
}

#[test]
fn events_from_a_blocked_source_neither_count_nor_extend_the_block() {
    let mut e = engine(1);
    let a = ip("198.51.100.1");
    e.suspicious(a, 100);
    assert!(e.suspicious(a, 100).is_some());
    let until = e.entries()[0].expires_unix;
    for t in 101..200 {
        assert_eq!(e.suspicious(a, t), None);
    }
    assert_eq!(e.entries()[0].expires_unix, until);
    assert_eq!(e.tracked(), 0, "a blocked source is not counted");
}

#[test]
fn the_threshold_is_exceeded_on_event_threshold_plus_one_within_a_sliding_minute() {
    let mut e = engine(3);
    let a = ip("198.51.100.2");
    // Three events at 0 s, 20 s, 40 s; at 60 s the first has left the window.
    for t in [1000, 1020, 1040, 1060] {
        assert_eq!(e.suspicious(a, t), None, "at {t}");
    }
    assert!(e.suspicious(a, 1061).is_some(), "four within 1002..=1061");
}

#[test]
fn a_manual_entry_with_a_prefix_of_its_own_is_enforced_inside_only() {
    let mut e = engine(20);
    let changes = add(&mut e, "2001:db8:bad:100::", Some(56), Kind::Black);
    let net = Source::of(ip("2001:db8:bad:100::"), 56);
    assert_eq!(net.to_string(), "2001:db8:bad:100::/56");
    assert_eq!(
        net.shm_prefix(),
        56,
        "the dataplane's table gets the /56 itself"
    );
    assert_eq!(changes, vec![Change::Block(net, u64::MAX >> 8)]);
    assert!(
        e.is_blocked(ip("2001:db8:bad:1ff::7"), 20),
        "inside the /56"
    );
    assert!(
        !e.is_blocked(ip("2001:db8:bad:200::7"), 20),
        "outside the /56"
    );
}

#[test]
fn a_manual_network_entry_is_found_by_its_address_for_removal_and_conversion() {
    let mut e = engine(20);
    add(&mut e, "2001:db8:bad::", Some(48), Kind::Black);
    add(&mut e, "2001:db8:bee::", Some(48), Kind::Black);
    assert!(
        e.lookup(ip("2001:db8:bad::")).is_some(),
        "the API's DELETE /api/v1/fraud/entries/2001:db8:bad::%2F48 finds nothing"
    );
    assert!(e.remove(ip("2001:db8:bad::")).is_some());
    let (w, changes) = e
        .make_white(ip("2001:db8:bee::"), 20)
        .unwrap_or_else(|| panic!("the /48 entry is not found for conversion"));
    assert_eq!((w.kind, w.origin), (Kind::White, Origin::Manual));
    assert_eq!(changes.len(), 1);
}

#[test]
fn restore_keeps_whitelist_entries_and_blocks_only_black_ones() {
    let mut a = engine(1);
    add(&mut a, "198.51.100.40", None, Kind::White);
    add(&mut a, "198.51.100.41", None, Kind::Black);
    let mut b = engine(1);
    let changes = b.restore(a.entries(), 50);
    assert_eq!(
        changes,
        vec![Change::Block(
            Source::of(ip("198.51.100.41"), 64),
            u64::MAX >> 8
        )]
    );
    assert!(!b.dirty, "restoring is no change to write back");
    for t in 50..60 {
        assert_eq!(b.suspicious(ip("198.51.100.40"), t), None);
    }
    assert!(b.is_blocked(ip("198.51.100.41"), 1_000_000));
}

/// counter.rs promises "a source that keeps offending stays counted" while a flood of new
/// sources churns the full table. Here the offender has one event per hundred new flood
/// sources (five events each) once the table is full: 30 events within half a minute.
#[test]
fn a_persistent_offender_stays_counted_while_new_sources_churn_the_table() {
    let src = |i: u32| Source::of(IpAddr::from(i.to_be_bytes()), 64);
    let offender = src(0xC633_6401);
    let mut c = Counter::new(1000, 11);
    let mut next = 0x0A00_0000u32;
    // The table is full before the offender starts.
    for _ in 0..1000 {
        for _ in 0..5 {
            c.hit(src(next), 5000);
        }
        next += 1;
    }
    let mut best = 0;
    for second in 0..30u64 {
        for _ in 0..100 {
            for _ in 0..5 {
                c.hit(src(next), 5000 + second);
            }
            next += 1;
        }
        let n = c.hit(offender, 5000 + second);
        best = best.max(n.own + n.inherited);
        assert!(c.len() <= 1000);
    }
    assert!(
        best >= 30,
        "the offender's 30 events within 30 s were counted as at most {best}: each new source \
         evicts the quietest of eight sampled entries, and an offender whose count has just \
         begun is the quietest"
    );
}
