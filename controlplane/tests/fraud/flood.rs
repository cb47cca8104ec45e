//! Bounded memory under attack: a bounded generator sends wrong TURN passwords from tens of
//! thousands of distinct loopback sources (127.1.0.1 upwards), far more than
//! `fraud.max_tracked_sources`. The counting table never holds more than its capacity, the
//! control plane's and the dataplane's memory stay flat once the table is full, and
//! legitimate clients are answered throughout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::prelude::*;

const CAPACITY: usize = 1000;
/// Wrong passwords per flood source: below the threshold, so the flood itself blocks nobody
/// and only exercises the counting table.
const PER_SOURCE: usize = 5;
const THRESHOLD: usize = 50;
/// Sources sending at once (each with its own socket).
const BATCH: usize = 100;
const WARM_UP: usize = 3 * CAPACITY;
const FLOOD: usize = 40_000;

#[test]
fn a_flood_from_many_sources_keeps_memory_bounded_and_service_up() {
    // No other test of this binary runs meanwhile: the flood would slow theirs down, and
    // they the flood's 60 s.
    let _alone = alone();
    let t_start = Instant::now();
    let site = Portico::start(
        "flood",
        spec()
            .fraud(&format!("max_tracked_sources = {CAPACITY}"))
            .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
            .fraud("blacklist_minutes = \"10m\""),
    );
    let server = site.udp4();
    let cp = site.pid();
    let dp = site.dataplane_pid();
    let bystander = Bystander::stun(v4(127, 0, 5, 2), server);

    // Watch the table size and the control plane's memory while the flood runs.
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
        let api = site.api;
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(r) = http(api, "GET", "/metrics", &[], b"") {
                    let text = String::from_utf8_lossy(&r.body).into_owned();
                    let tracked = metric(&text, "portico_fraud_tracked_sources", &[]);
                    if let Ok(mut s) = samples.lock() {
                        s.push((tracked, rss_kib(cp)));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Warm-up: fill the table to its capacity, so what follows measures growth past it.
    let rss_start = rss_kib(cp);
    let mut sent = flood(server, 0..WARM_UP, BATCH, PER_SOURCE, || {}).sent;
    assert!(
        wait_until(Duration::from_secs(5), || site
            .metric("portico_fraud_tracked_sources", &[])
            == CAPACITY as f64),
        "the table did not fill up to {CAPACITY}: {}",
        site.metric("portico_fraud_tracked_sources", &[])
    );
    let (rss_full, dp_full) = (rss_kib(cp), rss_kib(dp));

    // The flood proper.
    let t_flood = Instant::now();
    sent += flood(server, WARM_UP..WARM_UP + FLOOD, BATCH, PER_SOURCE, || {}).sent;
    let flood_time = t_flood.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let (rss_end, dp_end) = (rss_kib(cp), rss_kib(dp));

    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let max_tracked = samples.iter().map(|s| s.0).fold(0.0, f64::max);
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let counted = site.auth_failures();
    let seen = site.metric(
        "portico_turn_auth_failures_total",
        &[("reason", "bad_integrity")],
    );
    eprintln!(
        "flood: {} sources, {sent} wrong passwords in {:?} ({:.0}/s); dataplane saw {seen}, \
         engine counted {counted}; \
         tracked max {max_tracked} of {CAPACITY} over {} samples; control plane RSS {rss_start} \
         -> {rss_full} (table full) -> {rss_end} KiB (max {max_rss}); dataplane RSS {dp_full} \
         -> {dp_end} KiB; whole test so far {:?}",
        WARM_UP + FLOOD,
        flood_time,
        (FLOOD * PER_SOURCE) as f64 / flood_time.as_secs_f64(),
        samples.len(),
        t_start.elapsed()
    );
    assert!(
        sent >= (WARM_UP + FLOOD) * PER_SOURCE * 95 / 100,
        "the generator could not reach most sources ({sent} requests)"
    );
    assert!(
        counted >= (sent / 2) as f64,
        "the engine counted only {counted} of {sent} events"
    );
    assert!(samples.len() >= 10, "too few samples of the table size");
    assert!(
        max_tracked <= CAPACITY as f64,
        "portico_fraud_tracked_sources reached {max_tracked} > max_tracked_sources = {CAPACITY}"
    );
    assert!(
        site.metric("portico_fraud_tracked_sources", &[]) <= CAPACITY as f64,
        "tracked sources after the flood"
    );
    // Once the table is full, 40 000 more sources must not grow the control plane: an
    // unbounded table would add several MiB (a window of sixty counters per source).
    let growth = max_rss.max(rss_end).saturating_sub(rss_full);
    assert!(
        growth <= 3 * 1024,
        "the control plane grew by {growth} KiB after the table was full"
    );
    assert!(rss_end <= 128 * 1024, "control plane RSS {rss_end} KiB");
    assert!(
        dp_end.saturating_sub(dp_full) <= 4 * 1024,
        "the dataplane grew from {dp_full} to {dp_end} KiB"
    );

    // The flood blocked nobody (every source stayed below the threshold).
    assert!(site.entries().is_empty(), "{:?}", site.entries());
    assert!(answered_from(
        flood_source(5),
        server,
        Duration::from_millis(300)
    ));

    // Legitimate clients were answered throughout, and TURN still works.
    bystander.finish(20);
    let mut good = TurnClient::from(v4(127, 0, 5, 3), server, USER, PASSWORD);
    good.allocate();
    eprintln!("flood test took {:?}", t_start.elapsed());
    assert!(
        t_start.elapsed() < Duration::from_secs(60),
        "the flood test took {:?}",
        t_start.elapsed()
    );
}
