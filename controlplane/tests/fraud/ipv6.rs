//! IPv6 sources: counted and blocked per prefix (`fraud.ipv6_prefix`, /64 by default), and
//! manual entries for IPv6 networks. Loopback offers one IPv6 address, ::1, which lies in
//! every prefix `::/n`, so it stands for a subscriber of any network size.

use std::time::Duration;

use crate::prelude::*;

fn site(tag: &str, prefix: Option<u8>) -> Portico {
    let mut setup = spec()
        .ipv6()
        .fraud("suspicious_per_minute = 3")
        .fraud("blacklist_minutes = \"10m\"");
    if let Some(p) = prefix {
        setup = setup.fraud(&format!("ipv6_prefix = {p}"));
    }
    Portico::start(tag, setup)
}

#[test]
fn an_ipv6_source_is_blacklisted_per_64() {
    let site = site("v6-64", None);
    wrong_passwords(LOCAL6, site.udp6(), 4);
    assert!(
        wait_until(Duration::from_secs(1), || site.entry("::/64").is_some()),
        "no ::/64 entry: {:?}",
        site.entries()
    );
    assert!(
        !answered_from(LOCAL6, site.udp6(), Duration::from_millis(300)),
        "::1 still answered with ::/64 blacklisted"
    );
    assert!(answered_from(
        v4(127, 0, 8, 40),
        site.udp4(),
        Duration::from_millis(300)
    ));
}

#[test]
fn an_ipv6_source_is_blacklisted_per_the_configured_prefix() {
    let site = site("v6-56", Some(56));
    wrong_passwords(LOCAL6, site.udp6(), 4);
    assert!(
        wait_until(Duration::from_secs(1), || site.entry("::/56").is_some()),
        "no ::/56 entry: {:?}",
        site.entries()
    );
    assert!(
        !answered_from(LOCAL6, site.udp6(), Duration::from_millis(300)),
        "::/56 is blacklisted (ipv6_prefix = 56) but the dataplane still answers ::1"
    );
}

#[test]
fn a_manual_entry_for_an_ipv6_network_is_enforced() {
    let site = site("v6-48", None);
    let (status, v) = site.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "::/48", "kind": "black", "note": "scanner"}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["source"], "::/48");
    assert!(
        !answered_from(LOCAL6, site.udp6(), Duration::from_millis(300)),
        "::/48 is blacklisted but the dataplane still answers ::1"
    );
}

/// The README's own example: block `2001:db8:bad::/48`, then remove it or whitelist it by
/// the address the list shows.
#[test]
fn a_manual_ipv6_network_entry_can_be_removed_and_converted() {
    let site = site("v6-del", None);
    for net in ["2001:db8:bad::/48", "2001:db8:bee::/48"] {
        let body = format!(r#"{{"ip": "{net}", "kind": "black", "ttl_seconds": 86400}}"#);
        let (status, v) = site.call("POST", "/api/v1/fraud/entries", &body);
        assert_eq!(status, 201, "{v}");
        assert!(site.entry(net).is_some(), "{:?}", site.entries());
    }
    let (status, v) = site.call(
        "POST",
        "/api/v1/fraud/entries/2001:db8:bee::%2F48/whitelist",
        "",
    );
    assert_eq!(status, 200, "whitelisting 2001:db8:bee::/48: {v}");
    let (status, v) = site.call("DELETE", "/api/v1/fraud/entries/2001:db8:bad::%2F48", "");
    assert_eq!(status, 204, "removing 2001:db8:bad::/48: {v}");
    assert!(site.entry("2001:db8:bad::/48").is_none());
}
