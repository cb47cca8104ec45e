//! Scale on one box: the dataplane raises its descriptor limit to what `turn.max_allocations`
//! needs (or refuses to start, naming the key), and relays are spread over several
//! `turn.relay_ip` addresses of a family, each relaying real packets from its own address.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use portico_testkit::turn::{EchoPeer, Relayed, TurnClient, PASSWORD, USER};
use portico_testkit::{Portico, LOCAL4};

use crate::turn_spec;

/// "Max open files" soft and hard limits of a process.
fn nofile(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/limits: {e}"));
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no Max open files in {text}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let n = |s: &str| {
        if s == "unlimited" {
            u64::MAX
        } else {
            s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
        }
    };
    (n(f[3]), n(f[4]))
}

fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// A quota the limit can hold: the dataplane's soft limit ends at or above one descriptor per
/// allocation plus the TCP connections, and the start log says what was set. A quota no
/// limit can hold (past `fs.nr_open`) is refused at start with the key and the numbers.
#[test]
fn the_descriptor_limit_follows_max_allocations_or_the_start_is_refused() {
    let (_, hard) = nofile(std::process::id());
    // Room under this process's hard limit (a non-root test run cannot raise it).
    let allocations = hard.saturating_sub(1024 + 600).min(5000);
    if allocations < 100 {
        eprintln!(
            "SKIPPED the_descriptor_limit_follows_max_allocations: hard limit {hard} leaves no room"
        );
    } else {
        let p = Portico::start(
            "turn-fdlimit",
            turn_spec("auto", false).turn(&format!(
                "max_allocations = {allocations}\ntcp_max_connections = 1024"
            )),
        );
        let (soft, _) = nofile(p.dataplane_pid());
        assert!(
            soft >= allocations + 1024,
            "soft limit {soft} < {allocations} allocations + 1024 TCP connections"
        );
        p.wait_log("file descriptor limit (RLIMIT_NOFILE)");
        drop(p);
    }

    // Two million descriptors: past the default fs.nr_open (1,048,576) whoever runs this.
    if nr_open() >= 2_100_000 {
        eprintln!(
            "SKIPPED the refusal half: fs.nr_open {} allows it",
            nr_open()
        );
        return;
    }
    let p = Portico::new(
        "turn-fdlimit-refused",
        turn_spec("auto", false).turn("max_allocations = 1000000\ntcp_max_connections = 1000000"),
    );
    let text = crate::refused_start(&p, "2M descriptors needed");
    assert!(
        text.contains("turn.max_allocations = 1000000 needs 2000"),
        "refusal lacks the key and the numbers:\n{text}"
    );
}

/// Three relay addresses of IPv4: allocations get relays on each, and a peer sees the
/// relayed packets come from the address (and port) the client was told.
#[test]
fn relays_are_spread_over_every_relay_ip_and_send_from_their_own_address() {
    let p = Portico::start(
        "turn-relay-ips",
        turn_spec("auto", true).turn("relay_ip = [\"127.0.0.1\", \"127.0.0.2\", \"127.0.0.3\"]"),
    );
    let peer = EchoPeer::start(LOCAL4);
    let mut seen = BTreeSet::new();
    let mut clients = Vec::new();
    for i in 0..24u16 {
        let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
        let relayed = c.allocate();
        seen.insert(relayed.ip());
        assert!(c.permit(&[peer.addr]).is_success());
        assert!(c.bind(0x4000, peer.addr).is_success());
        let payload = format!("hello {i}");
        c.channel_data(0x4000, payload.as_bytes(), false);
        match c.recv_relayed(Duration::from_secs(2)) {
            Some(Relayed::Channel { number, data }) => {
                assert_eq!(number, 0x4000);
                assert_eq!(data, payload.as_bytes());
            }
            other => panic!("client {i}: no echo through {relayed}: {other:?}"),
        }
        // The peer saw the packet come from the relayed address itself.
        let from = *peer.sources.lock().unwrap().last().unwrap();
        assert_eq!(from, relayed, "client {i}");
        clients.push(c);
    }
    let want: BTreeSet<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(seen, want, "24 allocations did not use every relay address");
}
