//! Fraud detection against the real `portico`: suspicious events from TURN (wrong passwords,
//! refused peers, request floods) and from the reverse proxy (HTTP, SIP, LDAP logins its
//! targets refuse, requests it refuses itself) are counted per source; past the threshold the
//! source is blacklisted, and the dataplane and the proxy drop it while everyone else is
//! served. Manual entries and whitelists through the API and the configuration; IPv6 per
//! prefix; bounded memory and a fair counting table under floods of many sources; a fleet of
//! two boxes sharing lists and users through Redis.
//!
//! # Source addresses
//!
//! The engine counts per source address, so every client here binds its socket to an address
//! of its test's choosing (all of 127.0.0.0/8 is local on Linux). Tests of this binary run in
//! parallel, each with a Portico (so a fraud engine) of its own; still, no two tests share a
//! source address, so nothing one test does can ever be counted against another's sources,
//! and a log line names one test. Each module has a /24 of its own, and each test its own
//! addresses in it:
//!
//! | module | sources |
//! | --- | --- |
//! | `turn` | 127.0.1.0/24 (the whitelist-range test: the block 127.0.1.16/28 and 127.0.1.32) |
//! | `proxy` | 127.0.2.0/24 |
//! | `entries` | 127.0.3.0/24 (the network-entry test: 127.0.3.7, inside its 127.0.3.0/24 entry) |
//! | `whitelist` | 127.0.4.0/24 |
//! | `flood` | 127.0.5.0/24, and flood sources 127.1.0.1 up (`flood_source` 0 to 43,000) |
//! | `rate` | 127.0.6.0/24 |
//! | `eviction` | 127.0.7.0/24, and flood sources from `flood_source(50_000)` (127.1.197.x) up |
//! | `ipv6` | 127.0.8.0/24; ::1 |
//! | `proxy_failures` | 127.0.9.0/24 |
//! | `proxy_sip_ldap` | 127.0.10.0/24; 127.0.0.1 (ldapsearch cannot choose its source) |
//! | `fleet` | 127.0.11.0/24 (two Porticos sharing their lists through a `redis-server` of its own) |
//!
//! Shared by design: `PROBE` (127.0.0.254, the kit's readiness probes, whitelisted in every
//! configuration) and ::1, the only IPv6 loopback address (the `ipv6` tests, one each).
//! The two flood tests and the brute-force reaction tests run `alone`.

mod entries;
mod eviction;
mod fleet;
mod flood;
mod ipv6;
mod proxy;
mod proxy_failures;
mod proxy_sip_ldap;
mod rate;
mod turn;
mod whitelist;

/// What the fraud tests use: the kit's clients, fixtures and the `spec` of their sites.
mod prelude {
    pub use portico_testkit::bystander::Bystander;
    pub use portico_testkit::fixtures::{Nginx, RIGHT_LOGIN, WRONG_LOGIN};
    pub use portico_testkit::http::{
        get_from, get_with, http, tls_hello_answered, Answer, KeepAlive,
    };
    pub use portico_testkit::metrics::metric;
    pub use portico_testkit::net::{answered_from, binding, tcp_from, udp_on, TcpStun};
    pub use portico_testkit::process::rss_kib;
    pub use portico_testkit::stun::{Class, Msg, DATA};
    pub use portico_testkit::turn::{
        flood, flood_source, wrong_passwords, TurnClient, PASSWORD, USER,
    };
    pub use portico_testkit::{
        alone, free_port, v4, wait_until, Portico, Spec, ANSWER_WAIT, LOCAL4, LOCAL6, PROBE,
    };

    /// The fraud tests' installations: the kit's TURN users, loopback peers allowed (the
    /// tests' own peers are on loopback).
    pub fn spec() -> Spec {
        Spec::new().turn_users().loopback_peers()
    }

    /// Suspicious events from the proxy that the engine counted.
    pub fn proxy_events_counted(site: &Portico) -> f64 {
        site.metric(
            "portico_fraud_suspicious_events_total",
            &[("origin", "proxy")],
        )
    }

    /// `source` ("127.0.2.3", "198.51.100.7") is on the blacklist (within 2 s), put there
    /// automatically.
    #[track_caller]
    pub fn assert_blacklisted(site: &Portico, source: &str) {
        let found = wait_until(std::time::Duration::from_secs(2), || {
            site.entry(source).is_some()
        });
        assert!(
            found,
            "{source} not on the fraud list: {:?}",
            site.entries()
        );
        let e = site.entry(source).unwrap_or_default();
        assert_eq!(
            (e["kind"].as_str(), e["origin"].as_str()),
            (Some("black"), Some("auto")),
            "{e}"
        );
    }

    /// `src` is served by the dataplane (a STUN Binding) and by the proxy (`GET /`).
    #[track_caller]
    pub fn assert_served(site: &Portico, src: std::net::IpAddr) {
        assert!(
            answered_from(src, site.udp4(), std::time::Duration::from_millis(300)),
            "STUN Binding from {src} unanswered; entries {:?}",
            site.entries()
        );
        assert_eq!(
            get_from(src, site.proxy(), "/"),
            Answer::Status(200),
            "proxy from {src}"
        );
    }

    /// `src` is dropped by the dataplane and refused at accept by the proxy.
    #[track_caller]
    pub fn assert_blocked(site: &Portico, src: std::net::IpAddr) {
        assert!(
            !answered_from(src, site.udp4(), std::time::Duration::from_millis(300)),
            "STUN Binding from {src} answered; entries {:?}",
            site.entries()
        );
        assert_eq!(
            get_from(src, site.proxy(), "/"),
            Answer::Refused,
            "proxy from {src}"
        );
    }
}
