//! Real third-party STUN clients against Portico: coturn's `turnutils_stunclient` and
//! `turnutils_natdiscovery` (RFC 5389/5780) and Vovida's `stun` from Debian's stun-client
//! (RFC 3489). Their output is what a person would read; the tests assert on those lines.
//! A missing tool fails the test with the package to install.
//!
//! Each test also checks the server's success counter, so a test cannot pass because the
//! tool talked to some other server.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::ports::free_udp_pair;
use portico_testkit::process::{require, run, Run};
use portico_testkit::{Portico, Spec};

const LIMIT: Duration = Duration::from_secs(20);

fn stunclient() -> std::path::PathBuf {
    require("turnutils_stunclient", "coturn")
}

fn natdiscovery() -> std::path::PathBuf {
    require("turnutils_natdiscovery", "coturn")
}

fn vovida_stun() -> std::path::PathBuf {
    require("stun", "stun-client")
}

/// The output with runs of blanks collapsed, so assertions do not depend on alignment.
fn squeezed(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_ran(r: &Run, what: &str) {
    assert!(
        !r.timed_out,
        "{what} did not finish within {LIMIT:?}:\n{}",
        r.text
    );
}

/// `ip:port` as printed by coturn: IPv6 addresses come without brackets ("::1:49895").
fn parse_coturn_addr(s: &str) -> SocketAddr {
    let (ip, port) = s
        .trim()
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("not ip:port: {s:?}"));
    let ip: IpAddr = ip
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .unwrap_or_else(|e| panic!("{ip:?}: {e}"));
    SocketAddr::new(ip, port.parse().unwrap_or_else(|e| panic!("{port:?}: {e}")))
}

/// Every "UDP reflexive addr: X" that turnutils printed.
fn reflexive_addrs(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.split_once("UDP reflexive addr:").map(|(_, a)| a))
        .map(parse_coturn_addr)
        .collect()
}

fn stunclient_reports(ip: &str, want: IpAddr) {
    let tool = stunclient();
    let p = Portico::start("stun-interop", Spec::new().ipv6());
    let before = p.counter(Counter::StunBindingSuccess);
    let r = run(
        &tool,
        &["-p".into(), p.port.to_string(), ip.into()],
        &[],
        LIMIT,
    );
    assert_ran(&r, "turnutils_stunclient");
    assert_eq!(r.code, Some(0), "turnutils_stunclient failed:\n{}", r.text);
    let addrs = reflexive_addrs(&r.text);
    assert!(
        !addrs.is_empty(),
        "no reflexive address printed:\n{}",
        r.text
    );
    for a in &addrs {
        assert_eq!(a.ip(), want, "reflexive address {a}:\n{}", r.text);
        assert_ne!(a.port(), 0);
    }
    assert!(
        p.wait_counter(Counter::StunBindingSuccess, before + 1) > before,
        "Portico answered no Binding request from turnutils_stunclient"
    );
}

#[test]
fn turnutils_stunclient_ipv4() {
    stunclient_reports("127.0.0.1", "127.0.0.1".parse().unwrap());
}

#[test]
fn turnutils_stunclient_ipv6() {
    stunclient_reports("::1", "::1".parse().unwrap());
}

/// Against an RFC 5780 server, turnutils_stunclient follows OTHER-ADDRESS and its change
/// request is answered from the alternate address.
#[test]
fn turnutils_stunclient_sees_rfc5780() {
    let tool = stunclient();
    let p = Portico::start("stun-interop", Spec::new().rfc5780());
    let (port, alt) = (p.port, p.alt_port());
    let r = run(
        &tool,
        &["-p".into(), port.to_string(), "127.0.0.1".into()],
        &[],
        LIMIT,
    );
    assert_ran(&r, "turnutils_stunclient");
    let text = squeezed(&r.text);
    for want in [
        format!("Response origin: : 127.0.0.1:{port}"),
        format!("Other addr: : 127.0.0.2:{alt}"),
        format!("Response origin: : 127.0.0.2:{alt}"),
        "RFC 5780 response 3".to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{}", r.text);
    }
    for a in reflexive_addrs(&r.text) {
        assert_eq!(a.ip(), IpAddr::from([127, 0, 0, 1]));
    }
}

/// Vovida's RFC 3489 client gets its mapped address (its own source port, which we chose).
#[test]
fn vovida_stun_gets_a_mapped_address() {
    let tool = vovida_stun();
    let p = Portico::start("stun-interop", Spec::new().ipv6());
    let before = p.counter(Counter::StunBindingSuccess);
    let src = free_udp_pair();
    let r = run(
        &tool,
        &[
            format!("127.0.0.1:{}", p.port),
            "-v".into(),
            "-p".into(),
            src.to_string(),
        ],
        &[],
        LIMIT,
    );
    assert_ran(&r, "stun");
    let text = squeezed(&r.text);
    assert!(
        text.contains(&format!("MappedAddress = 127.0.0.1:{src}")),
        "no MappedAddress = 127.0.0.1:{src} in:\n{}",
        r.text
    );
    assert!(text.contains("test I = 1"), "{}", r.text);
    assert!(!text.contains("Blocked"), "{}", r.text);
    assert!(p.wait_counter(Counter::StunBindingSuccess, before + 1) > before);
}

/// With the alternate address, the RFC 3489 client completes all its tests, including
/// the change-IP / change-port ones and the repeat against CHANGED-ADDRESS, and classifies
/// loopback as what it is: open Internet, no NAT.
#[test]
fn vovida_stun_classifies_loopback_as_open_with_rfc5780() {
    let tool = vovida_stun();
    let p = Portico::start("stun-interop", Spec::new().rfc5780());
    let (port, alt) = (p.port, p.alt_port());
    let src = free_udp_pair();
    let r = run(
        &tool,
        &[
            format!("127.0.0.1:{port}"),
            "-v".into(),
            "-p".into(),
            src.to_string(),
        ],
        &[],
        LIMIT,
    );
    assert_ran(&r, "stun");
    let text = squeezed(&r.text);
    for want in [
        format!("MappedAddress = 127.0.0.1:{src}"),
        format!("ChangedAddress = 127.0.0.2:{alt}"),
        "test I = 1".into(),
        "test II = 1".into(),
        "test III = 1".into(),
        "test I(2) = 1".into(),
        "is nat = 0".into(),
        "Primary: Open".into(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{}", r.text);
    }
    assert!(!text.contains("Blocked"), "{}", r.text);
    // Where each answer came from, by the client's own transaction numbers: 1 is test I (no
    // change), 2 test II (change IP), 3 test III (change port), 10 test I against
    // CHANGED-ADDRESS's IP.
    let sources = vovida_sources(&text);
    for (id, want) in [
        (1, format!("127.0.0.1:{port}")),
        (2, format!("127.0.0.2:{port}")),
        (3, format!("127.0.0.1:{alt}")),
        (10, format!("127.0.0.2:{port}")),
    ] {
        assert_eq!(
            sources
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, a)| a.as_str()),
            Some(want.as_str()),
            "SourceAddress of the answer to request id={id}:\n{}",
            r.text
        );
    }
}

/// `(request id, SourceAddress)` for each answer the Vovida client printed in -v mode:
/// attribute lines come first, then "Received message of type 257 id=N".
fn vovida_sources(text: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut source = None;
    for line in text.lines() {
        if let Some(a) = line.strip_prefix("SourceAddress = ") {
            source = Some(a.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("Received message of type 257 id=") {
            if let (Ok(id), Some(a)) = (rest.trim().parse::<u32>(), source.take()) {
                out.push((id, a));
            }
        }
    }
    out
}

/// coturn's RFC 5780 discovery tool finds endpoint-independent mapping and filtering on
/// loopback, which needs OTHER-ADDRESS, CHANGE-REQUEST and answers from the alternate
/// address all to work.
#[test]
fn turnutils_natdiscovery_finds_endpoint_independent_behaviour() {
    let tool = natdiscovery();
    let p = Portico::start("stun-interop", Spec::new().rfc5780());
    let (port, alt) = (p.port, p.alt_port());
    let r = run(
        &tool,
        &[
            "-m".into(),
            "-f".into(),
            "-p".into(),
            port.to_string(),
            "127.0.0.1".into(),
        ],
        &[],
        LIMIT,
    );
    assert_ran(&r, "turnutils_natdiscovery");
    let text = squeezed(&r.text);
    for want in [
        format!("Other addr: : 127.0.0.2:{alt}"),
        "NAT with Endpoint Independent Mapping!".to_string(),
        "NAT with Endpoint Independent Filtering!".to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{}", r.text);
    }
    for bad in ["Dependent Mapping", "Dependent Filtering", "rror"] {
        assert!(!text.contains(bad), "unexpected {bad:?} in:\n{}", r.text);
    }
    // natdiscovery prints its local port ("Local addr: : 0.0.0.0:P"); on loopback the
    // reflexive port of every answer must be one of those, exactly.
    let mut local: Vec<u16> = text
        .lines()
        .filter_map(|l| {
            l.split_once("Local addr: :")
                .map(|(_, a)| parse_coturn_addr(a).port())
        })
        .collect();
    let mut reflexive: Vec<u16> = reflexive_addrs(&r.text).iter().map(|a| a.port()).collect();
    local.sort_unstable();
    local.dedup();
    reflexive.sort_unstable();
    reflexive.dedup();
    assert!(!local.is_empty(), "no local address printed:\n{}", r.text);
    assert_eq!(
        reflexive, local,
        "reflexive ports vs local ports:\n{}",
        r.text
    );
}
