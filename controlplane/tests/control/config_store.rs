//! The configuration file survives `kill -9` at any moment of a stream of API changes: after
//! every kill it parses as a complete, valid configuration that is the last acknowledged
//! change or the one in flight, and a restarted control plane applies exactly that file to the
//! dataplane, which kept running through all of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use portico_testkit::http::http;
use portico_testkit::process::alive;
use portico_testkit::{wait_until, Portico};

use crate::site;

const ROUNDS: u64 = 25;

/// A tiny xorshift generator: the kill moments differ run to run, and the seed is printed so a
/// failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Change number `n`: realm `r-n` and `n % 7` users, so the file's size moves up and down.
fn change(site: &Portico, n: u64) -> String {
    let users: Vec<String> = (0..n % 7)
        .map(|i| format!("{{ name = \"user{i}-{n}\", password = \"pw-{n}-{i}\" }}"))
        .collect();
    site.config_text(&format!(
        "realm = \"r-{n}\"\nusers = [{}]\n",
        users.join(", ")
    ))
}

fn realm_number(realm: &str) -> u64 {
    realm
        .strip_prefix("r-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn config_file_is_complete_and_valid_after_every_kill() {
    let site = site("store", "");
    let seed = std::env::var("PORTICO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("PORTICO_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut acked_total = 0u64;
    let mut last_acked = 0u64;
    let mut next = 1u64;
    let mut dataplane = 0u32;

    for round in 0..ROUNDS {
        let mut cp = site.launch();
        // The restarted control plane serves exactly what the file says, and the dataplane
        // (the same one all along) has applied it.
        let file = site.file_config();
        let served = site.json("GET", "/api/v1/config", "", 200);
        assert_eq!(served["turn"]["realm"], file.turn.realm.as_str());
        let st = site.status();
        let pid = st["dataplane"]["pid"].as_u64().unwrap() as u32;
        if round == 0 {
            dataplane = pid;
        }
        assert_eq!(pid, dataplane, "round {round}: the dataplane was replaced");
        assert_eq!(site.dataplane_pids(), vec![dataplane]);
        assert!(wait_until(Duration::from_secs(3), || {
            let c = site.status()["config"].clone();
            c["applied_generation"] == c["generation"]
        }));

        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(last_acked));
        let writer = {
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            let token = site.token();
            let api = site.api;
            let bodies: Vec<(u64, String)> =
                (next..next + 400).map(|n| (n, change(&site, n))).collect();
            thread::spawn(move || {
                let mut sent = 0;
                for (n, body) in bodies {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    sent = n;
                    let headers = [
                        ("Authorization".to_string(), format!("Bearer {token}")),
                        ("Content-Type".to_string(), "application/toml".to_string()),
                    ];
                    match http(api, "PUT", "/api/v1/config", &headers, body.as_bytes()) {
                        Ok(r) if r.status == 200 => acked.store(n, Ordering::Relaxed),
                        Ok(r) => panic!("PUT {n} refused: {} {}", r.status, r.text()),
                        Err(_) => break, // killed mid-request
                    }
                }
                sent
            })
        };
        thread::sleep(Duration::from_millis(20 + rng.next() % 600));
        cp.kill9();
        stop.store(true, Ordering::Relaxed);
        let sent = writer.join().unwrap();
        let round_acked = acked.load(Ordering::Relaxed);
        acked_total += round_acked.saturating_sub(last_acked);

        let text = std::fs::read_to_string(&site.config_path).unwrap();
        let config = portico_shared::config::Config::from_toml(&text).unwrap_or_else(|e| {
            panic!("round {round}: the file is not a valid configuration: {e}\n{text}")
        });
        let n = realm_number(&config.turn.realm);
        assert!(
            n >= round_acked && n <= sent.max(round_acked),
            "round {round}: file holds change {n}, acknowledged {round_acked}, last sent {sent}"
        );
        if n > 0 {
            assert_eq!(
                config,
                portico_shared::config::Config::from_toml(&change(&site, n)).unwrap(),
                "round {round}: the file is not exactly change {n}"
            );
        }
        assert!(
            alive(dataplane),
            "round {round}: the dataplane died with the control plane"
        );
        last_acked = n.max(round_acked);
        next = sent.max(next) + 1;
    }

    // A last start: the file's change is served and applied, no temp files are left behind.
    let mut cp = site.launch();
    let served = site.json("GET", "/api/v1/config", "", 200);
    assert_eq!(
        served["turn"]["realm"],
        site.file_config().turn.realm.as_str()
    );
    let leftovers: Vec<String> = std::fs::read_dir(&site.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "stale temp files: {leftovers:?}");
    assert_eq!(site.dataplane_pids(), vec![dataplane]);
    assert!(
        acked_total >= ROUNDS,
        "too few changes acknowledged: {acked_total}"
    );
    eprintln!(
        "{ROUNDS} kills during {acked_total} acknowledged changes in {:?}; the file was valid every time",
        started.elapsed()
    );
    assert!(cp
        .terminate(Duration::from_secs(15))
        .is_some_and(|s| s.success()));
}

/// `SIGHUP` re-reads the file; a broken file is refused and the running configuration kept.
#[test]
fn sighup_rereads_the_file_and_refuses_a_broken_one() {
    let site = site("sighup", "");
    let cp = site.launch();
    let g0 = site.config_generation();

    std::fs::write(
        &site.config_path,
        site.config_text("realm = \"from-hup\"\n"),
    )
    .unwrap();
    cp.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || site.json(
        "GET",
        "/api/v1/config",
        "",
        200
    )["turn"]["realm"]
        == "from-hup"));
    assert_eq!(site.config_generation(), g0 + 1);

    let broken = site.config_text("").replace("40000-40999", "9-8");
    std::fs::write(&site.config_path, broken).unwrap();
    cp.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || site
        .log()
        .contains("configuration not reloaded")));
    assert!(site.log().contains("turn.relay_ports"));
    assert_eq!(site.config_generation(), g0 + 1);
    assert_eq!(
        site.json("GET", "/api/v1/config", "", 200)["turn"]["realm"],
        "from-hup"
    );
    let m = site.metrics();
    assert!(
        m.contains("portico_config_reloads_total{source=\"sighup\",result=\"applied\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("portico_config_reloads_total{source=\"sighup\",result=\"rejected\"} 1"),
        "{m}"
    );
}
