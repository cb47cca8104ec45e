//! coturn's TURN test client `turnutils_uclient` relays through Portico to coturn's echo peer
//! `turnutils_peer` (Debian package `coturn`), in the client's four modes: ChannelData (the
//! default), Send/Data indications (`-s`), each with and without the RTCP allocation that
//! uses EVEN-PORT and RESERVATION-TOKEN (`-c` turns it off); with long-term credentials and
//! with TURN REST API credentials (`-W`). Every packet must come back: the client prints
//! `Total lost packets 0 (0.000000%)` and as many received messages as it sent.
//!
//! These clients are known to work against Portico with no loss, so a failure here is a
//! regression. A missing tool fails the test.

use std::net::SocketAddr;
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::process::{run, Run};
use portico_testkit::turn::{PASSWORD, SHARED_SECRET, USER};
use portico_testkit::{free_port, Portico, LOCAL4};

use crate::{coturn_peer, totals, turn_spec, uclient, CLIENTS, LIMIT, MESSAGES};

enum Creds {
    LongTerm,
    Rest,
    WrongPassword,
}

/// Relay ports of the allocations Portico logged ("allocation created ... relay=IP:PORT").
fn relay_ports(log: &str) -> Vec<u16> {
    log.lines()
        .filter(|l| l.contains("allocation created"))
        .filter_map(|l| l.split_once("relay=").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|a| a.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .collect()
}

/// Runs the client against `p` with `flags`, relaying to `peer`.
fn run_uclient(p: &Portico, peer: SocketAddr, flags: &[&str], creds: &Creds) -> Run {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    match creds {
        Creds::LongTerm => args.extend(["-u".into(), USER.into(), "-w".into(), PASSWORD.into()]),
        Creds::WrongPassword => {
            args.extend(["-u".into(), USER.into(), "-w".into(), "wrong".into()])
        }
        Creds::Rest => args.extend([
            "-u".into(),
            "dave".into(),
            "-W".into(),
            SHARED_SECRET.into(),
        ]),
    }
    args.extend([
        "-p".into(),
        p.port.to_string(),
        "-e".into(),
        peer.ip().to_string(),
        "-r".into(),
        peer.port().to_string(),
        "-n".into(),
        MESSAGES.to_string(),
        "-m".into(),
        CLIENTS.to_string(),
        "-l".into(),
        "172".into(),
        "127.0.0.1".into(),
    ]);
    run(&uclient(), &args, &[], LIMIT)
}

/// One uclient run in `flags` mode with `creds`; asserts no loss, and that the traffic
/// really went through this Portico.
fn relays_without_loss(io: &'static str, flags: &[&str], creds: Creds) {
    let tool = uclient();
    let p = Portico::start("turn-interop", turn_spec(io, true));
    let peer = coturn_peer(&p);
    let r = run_uclient(&p, peer.addr, flags, &creds);
    let what = format!("{} {flags:?}", tool.display());
    assert!(
        !r.timed_out,
        "{what} did not finish within {LIMIT:?}:\n{}",
        r.text
    );
    assert_eq!(r.code, Some(0), "{what} failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "{what} lost packets:\n{}",
        r.text
    );
    let (sent, received) =
        totals(&r.text).unwrap_or_else(|| panic!("{what}: no totals line:\n{}", r.text));
    assert_eq!(sent, MESSAGES * CLIENTS, "{what} sent:\n{}", r.text);
    assert_eq!(received, sent, "{what} received:\n{}", r.text);

    // Through Portico: every message out to the peer and back. With RTCP (no -c) there
    // are allocations beyond one per client: the odd ports of EVEN-PORT reservations.
    assert!(p.counter(Counter::RelayClientToPeerPackets) >= sent);
    assert!(p.counter(Counter::RelayPeerToClientPackets) >= sent);
    let allocations = p.counter(Counter::TurnAllocationsCreated);
    if flags.contains(&"-c") {
        // Each uclient client is a pair of sessions relaying to each other's peer.
        assert_eq!(allocations, 2 * CLIENTS, "{what}");
    } else {
        assert!(
            allocations >= CLIENTS,
            "{allocations} allocations for {what}"
        );
        let ports = relay_ports(&p.log());
        assert!(
            ports.iter().any(|q| q % 2 == 0 && ports.contains(&(q + 1))),
            "{what}: no even/odd relay port pair (EVEN-PORT + RESERVATION-TOKEN) among {ports:?}"
        );
    }
    if flags.contains(&"-s") {
        assert_eq!(
            p.counter(Counter::TurnChannelsCreated),
            0,
            "-s uses no channels"
        );
    } else {
        assert!(p.counter(Counter::TurnChannelsCreated) >= CLIENTS);
    }
    assert_eq!(p.counter(Counter::DropNoPermission), 0);
}

#[test]
fn uclient_channel_data_long_term() {
    relays_without_loss("auto", &[], Creds::LongTerm);
}

#[test]
fn uclient_send_indications_long_term() {
    relays_without_loss("auto", &["-s"], Creds::LongTerm);
}

#[test]
fn uclient_channel_data_without_rtcp_long_term() {
    relays_without_loss("auto", &["-c"], Creds::LongTerm);
}

#[test]
fn uclient_send_indications_without_rtcp_long_term() {
    relays_without_loss("auto", &["-s", "-c"], Creds::LongTerm);
}

#[test]
fn uclient_channel_data_rest_api() {
    relays_without_loss("auto", &[], Creds::Rest);
}

#[test]
fn uclient_send_indications_rest_api() {
    relays_without_loss("auto", &["-s"], Creds::Rest);
}

#[test]
fn uclient_channel_data_without_rtcp_rest_api() {
    relays_without_loss("auto", &["-c"], Creds::Rest);
}

#[test]
fn uclient_send_indications_without_rtcp_rest_api() {
    relays_without_loss("auto", &["-s", "-c"], Creds::Rest);
}

#[test]
fn uclient_channel_data_over_epoll() {
    relays_without_loss("epoll", &[], Creds::LongTerm);
}

#[test]
fn uclient_send_indications_over_epoll() {
    relays_without_loss("epoll", &["-s"], Creds::LongTerm);
}

/// `-y`: the clients are each other's peers, through their relayed addresses, which are on
/// loopback: allowed without `allow_peers` because they are the server's own relays.
#[test]
fn uclient_client_to_client_through_own_relays() {
    let p = Portico::start("turn-interop-y", turn_spec("auto", false));
    let peer = SocketAddr::new(LOCAL4, free_port());
    let r = run_uclient(&p, peer, &["-y", "-c"], &Creds::LongTerm);
    assert!(!r.timed_out, "uclient -y did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "uclient -y failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "uclient -y lost packets:\n{}",
        r.text
    );
    let (sent, received) = totals(&r.text).unwrap_or_else(|| panic!("no totals:\n{}", r.text));
    assert!(sent >= MESSAGES * CLIENTS, "sent {sent}:\n{}", r.text);
    assert_eq!(received, sent);
    assert_eq!(p.counter(Counter::TurnPeerDeniedSpecial), 0);
}

/// With automatic blacklisting off, the client gives up with its own error message.
#[test]
fn uclient_with_a_wrong_password_cannot_allocate() {
    // Every client sends from 127.0.0.1: automatic blacklisting off.
    let spec = turn_spec("auto", true).fraud("suspicious_per_minute = 0");
    let p = Portico::start("turn-interop-bad", spec);
    let peer = coturn_peer(&p);
    let r = run_uclient(&p, peer.addr, &["-c"], &Creds::WrongPassword);
    assert!(!r.timed_out, "uclient did not give up:\n{}", r.text);
    assert_ne!(
        r.code,
        Some(0),
        "uclient succeeded with a wrong password:\n{}",
        r.text
    );
    assert!(
        r.text.contains("Cannot complete Allocation"),
        "unexpected failure:\n{}",
        r.text
    );
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 0);
    assert!(p.counter(Counter::TurnAuthBadIntegrity) >= 1);
}

/// With the default fraud settings the client's endless retries get 127.0.0.1 blacklisted;
/// it then hears nothing more. Either way it never relays anything.
#[test]
fn uclient_with_a_wrong_password_relays_nothing_under_default_settings() {
    let p = Portico::start("turn-interop-bad2", turn_spec("auto", true));
    let peer = coturn_peer(&p);
    let port = p.port.to_string();
    let peer_port = peer.addr.port().to_string();
    let args: Vec<String> = [
        "-c",
        "-u",
        USER,
        "-w",
        "wrong",
        "-p",
        &port,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
        "-n",
        "10",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    let r = run(&uclient(), &args, &[], Duration::from_secs(15));
    assert_ne!(
        r.code,
        Some(0),
        "uclient succeeded with a wrong password:\n{}",
        r.text
    );
    assert!(!r.text.contains("Total lost packets"), "{}", r.text);
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 0);
    assert_eq!(p.counter(Counter::RelayClientToPeerPackets), 0);
    assert!(p.counter(Counter::TurnAuthBadIntegrity) >= 1);
}
