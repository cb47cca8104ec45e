//! Whitelisted sources (by `fraud.whitelist` or by an API entry) doing what gets others
//! blacklisted are never blocked, neither by the proxy nor by the dataplane.

use std::net::IpAddr;
use std::time::Duration;

use crate::prelude::*;

/// `n` wrong TURN passwords and `n` logins the target rejects, from `src`.
fn misbehave(site: &Portico, src: IpAddr, n: usize) {
    wrong_passwords(src, site.udp4(), n);
    for _ in 0..n {
        assert_eq!(
            get_with(src, site.proxy(), "/private", &[WRONG_LOGIN]),
            Answer::Status(401)
        );
    }
}

#[test]
fn whitelisted_sources_are_never_blocked() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start(
        "white",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud("suspicious_per_minute = 2")
            .fraud("blacklist_minutes = \"1m\"")
            .whitelist("127.0.4.20"),
    );
    let stun_bystander = Bystander::stun(v4(127, 0, 4, 30), site.udp4());
    let http_bystander = Bystander::http(v4(127, 0, 4, 31), site.proxy());
    let by_config = v4(127, 0, 4, 20);
    let by_api = v4(127, 0, 4, 21);
    let control = v4(127, 0, 4, 22);

    let (status, e) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.4.21", "kind": "white", "note": "partner"}"#,
    );
    assert_eq!(status, 201, "{e}");
    assert_eq!(
        (
            e["source"].as_str(),
            e["kind"].as_str(),
            e["origin"].as_str()
        ),
        (Some("127.0.4.21"), Some("white"), Some("manual"))
    );

    // Ten times the threshold, over TURN and through the proxy.
    misbehave(&site, by_config, 10);
    misbehave(&site, by_api, 10);
    site.expect_auth_failures(20.0);
    std::thread::sleep(Duration::from_millis(200));
    assert_served(&site, by_config);
    assert_served(&site, by_api);
    let entries = site.entries();
    assert_eq!(
        entries.len(),
        1,
        "only the API's whitelist entry: {entries:?}"
    );
    assert_eq!(
        site.metric("portico_fraud_entries", &[("kind", "black")]),
        0.0
    );

    // The same from a source that is not whitelisted blocks it (the setup does block).
    wrong_passwords(control, site.udp4(), 3);
    assert!(wait_until(Duration::from_secs(1), || site
        .entry("127.0.4.22")
        .is_some()));
    assert_blocked(&site, control);

    stun_bystander.finish(10);
    http_bystander.finish(10);
}

/// A source the operator whitelists while it is blacklisted must be let in everywhere, not
/// only by the proxy (which asks the engine) but by the dataplane (which reads the
/// shared-memory table the engine fills).
#[test]
fn whitelisting_a_blacklisted_source_by_configuration_lets_it_in_everywhere() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start(
        "white-reload",
        spec()
            .http_proxy_to(nginx.alpha)
            .fraud("suspicious_per_minute = 2")
            .fraud("blacklist_minutes = \"10m\""),
    );
    let src = v4(127, 0, 4, 23);
    wrong_passwords(src, site.udp4(), 3);
    assert!(wait_until(Duration::from_secs(1), || site
        .entry("127.0.4.23")
        .is_some()));
    assert_blocked(&site, src);

    let (status, v) = site.call(
        "PATCH",
        "/api/v1/config",
        &format!(r#"{{"fraud": {{"whitelist": ["{PROBE}", "127.0.4.23"]}}}}"#),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["dataplane_applied"], true, "{v}");
    assert_eq!(
        get_from(src, site.proxy(), "/"),
        Answer::Status(200),
        "the proxy still refuses a whitelisted source"
    );
    assert!(
        answered_from(src, site.udp4(), Duration::from_millis(300)),
        "the dataplane still drops a source that fraud.whitelist now holds (its blacklist \
         entry stays in shared memory until it expires); the proxy lets it in"
    );
}

/// A manual blacklist entry for an address in `fraud.whitelist`: the proxy lets it in (the
/// whitelist wins in the engine), so the dataplane must too.
#[test]
fn a_blacklist_entry_for_a_whitelisted_address_is_not_enforced_by_half() {
    let nginx = Nginx::start("fraud");
    let site = Portico::start(
        "white-black",
        spec().http_proxy_to(nginx.alpha).whitelist("127.0.4.24"),
    );
    let src = v4(127, 0, 4, 24);
    let (status, v) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.4.24", "kind": "black"}"#,
    );
    // Refusing the entry is as good as not enforcing it; enforcing it on one side is not.
    if status == 201 {
        let proxy = get_from(src, site.proxy(), "/");
        let stun = answered_from(src, site.udp4(), Duration::from_millis(300));
        assert_eq!(
            (proxy == Answer::Status(200), stun),
            (true, true),
            "a whitelisted address with a blacklist entry: proxy {proxy:?}, STUN answered \
             {stun}; fraud.whitelist says never blocked"
        );
    } else {
        assert!((400..500).contains(&status), "{status} {v}");
    }
}
