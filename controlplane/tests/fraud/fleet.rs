//! A fleet of two Portico boxes on loopback sharing their lists through one real
//! `redis-server` (Debian package redis-server) started by the test on its own port and dir:
//! a brute force against box A is refused by box B within 100 ms; Redis killed for 10 s loses
//! no entry (what A decides meanwhile reaches B once Redis is back, although the restarted
//! Redis has lost its data); a manual whitelist entry made on B is honoured by A; a TURN user
//! added through B's API can allocate on A.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use portico_testkit::dirs::TempDir;
use portico_testkit::process::{require, wait_port};
use portico_testkit::Proc;

use crate::prelude::*;

const THRESHOLD: usize = 3;

/// A `redis-server` without persistence on `port` of 127.0.0.1, run in its own directory.
struct Redis {
    port: u16,
    /// Declared before `dir`, so it is stopped before its directory goes.
    proc: Option<Proc>,
    dir: TempDir,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let mut r = Redis {
            port,
            dir: TempDir::new("redis"),
            proc: None,
        };
        r.run();
        r
    }

    fn run(&mut self) {
        let proc = Proc::spawn(
            "redis-server",
            Command::new(require("redis-server", "redis-server"))
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(self.dir.path()),
            &self.dir.join("redis.log"),
        );
        wait_port(SocketAddr::new(LOCAL4, self.port), &proc);
        self.proc = Some(proc);
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }
}

fn fleet_spec(redis: u16, name: &str) -> Spec {
    spec()
        .fraud(&format!("suspicious_per_minute = {THRESHOLD}"))
        .proxy(&format!(
            "[fleet]\nredis = \"redis://127.0.0.1:{redis}\"\nname = \"{name}\"\n"
        ))
}

/// Waits until `site` lists an entry for `source`; how long it took.
fn wait_entry(site: &Portico, source: &str, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_until(limit, || site.entry(source).is_some()).then(|| t.elapsed())
}

fn brute_force(src: IpAddr, site: &Portico) {
    wrong_passwords(src, site.udp4(), THRESHOLD + 1);
    assert!(
        wait_entry(site, &src.to_string(), Duration::from_secs(2)).is_some(),
        "{src} not blacklisted on the box it attacked; log:\n{}",
        site.log()
    );
}

#[test]
fn two_boxes_share_blacklist_whitelist_and_users_through_redis() {
    let redis_port = free_port();
    let mut redis = Redis::start(redis_port);
    let a = Portico::start("fleet-a", fleet_spec(redis_port, "box-a"));
    let b = Portico::start("fleet-b", fleet_spec(redis_port, "box-b"));
    // Both subscribed (their start-up resync has run) before the attack.
    assert!(wait_until(Duration::from_secs(5), || {
        a.log().contains("fleet sharing through Redis") && b.log().contains("fleet sharing")
    }));
    std::thread::sleep(Duration::from_millis(500));

    // 1. A brute force against A: B refuses the attacker within 100 ms.
    let attacker = v4(127, 0, 11, 41);
    let mut c = TurnClient::attacker(attacker, a.udp4());
    c.challenge();
    for _ in 0..THRESHOLD {
        c.wrong_password();
    }
    // The event that crosses the threshold; from then on A blocks, and B must within 100 ms.
    c.wrong_password();
    let t = Instant::now();
    let on_b = wait_until(Duration::from_secs(2), || b.entry("127.0.11.41").is_some());
    let took = t.elapsed();
    assert!(on_b, "B never learned of the attacker; B log:\n{}", b.log());
    assert!(
        took <= Duration::from_millis(100),
        "B took {took:?} to refuse the attacker"
    );
    let e = b.entry("127.0.11.41").unwrap_or_default();
    assert_eq!(e["kind"], "black", "{e}");
    // And B's dataplane drops it: no answer to a STUN request from the attacker.
    assert!(!answered_from(
        attacker,
        b.udp4(),
        Duration::from_millis(300)
    ));
    assert!(answered_from(v4(127, 0, 11, 42), b.udp4(), ANSWER_WAIT));

    // 2. Redis dies for 10 s; A goes on deciding; nothing is lost.
    redis.kill();
    let during = v4(127, 0, 11, 43);
    brute_force(during, &a);
    let (status, v) = a.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "198.51.100.7", "kind": "black", "note": "by hand during the outage"}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert!(b.entry("127.0.11.43").is_none(), "B learned without Redis?");
    std::thread::sleep(Duration::from_secs(10));
    // The restarted Redis is empty (no persistence): the boxes fill it again.
    redis.run();
    for source in ["127.0.11.43", "198.51.100.7", "127.0.11.41"] {
        assert!(
            wait_entry(&b, source, Duration::from_secs(10)).is_some(),
            "{source} did not reach B after Redis came back; B log:\n{}\nA log:\n{}",
            b.log(),
            a.log()
        );
    }
    assert!(a.entry("127.0.11.41").is_some(), "A lost its entry");
    assert!(!answered_from(during, b.udp4(), Duration::from_millis(300)));

    // 3. A manual whitelist entry made on B is honoured by A.
    let partner = v4(127, 0, 11, 44);
    let (status, v) = b.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.11.44", "kind": "white", "note": "partner"}"#,
    );
    assert_eq!(status, 201, "{v}");
    let on_a = wait_entry(&a, "127.0.11.44", Duration::from_secs(2));
    assert!(on_a.is_some(), "A never got B's whitelist entry");
    assert_eq!(a.entry("127.0.11.44").unwrap_or_default()["kind"], "white");
    // Many wrong passwords from the partner on A: never blocked there.
    wrong_passwords(partner, a.udp4(), THRESHOLD * 3);
    assert!(answered_from(partner, a.udp4(), ANSWER_WAIT));
    let e = a.entry("127.0.11.44").unwrap_or_default();
    assert_eq!(e["kind"], "white", "{e}");

    // 4. A removal on A reaches B.
    let (status, v) = a.call("DELETE", "/api/v1/fraud/entries/198.51.100.7", "");
    assert!(status == 204 || status == 200, "{status} {v}");
    assert!(
        wait_until(Duration::from_secs(2), || b.entry("198.51.100.7").is_none()),
        "B kept an entry A removed"
    );

    // 5. A TURN user added through B's API works on A.
    let (status, v) = b.call(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "carol", "password": "fleet-secret"}"#,
    );
    assert_eq!(status, 201, "{v}");
    let mut carol = TurnClient::from(v4(127, 0, 11, 45), a.udp4(), "carol", "fleet-secret");
    let ok = wait_until(Duration::from_secs(3), || {
        let (_, cfg) = a.call("GET", "/api/v1/turn/users", "");
        cfg["users"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["name"] == "carol"))
    });
    assert!(ok, "A never got carol; A log:\n{}", a.log());
    std::thread::sleep(Duration::from_millis(200));
    carol.allocate();
}
