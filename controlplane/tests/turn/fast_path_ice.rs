//! The ICE stacks of aioice.rs and webrtc.rs through Portico with the kernel fast path on,
//! in the namespaces of fast_path.rs: the agents (aioice's pair, or headless Chromium's two
//! RTCPeerConnections) in the client namespace reach Portico in its own over UDP, relay
//! candidates only. Relay-only ICE through one server makes each allocation's peer the other
//! allocation's relayed address, an address of Portico's own host: the kernel must hand such
//! a packet to the other allocation's client (or at least to loopback), never send it out of
//! the relay's interface. Each test checks that the exchange succeeds exactly as it does in
//! user space (every datagram or message intact, the allocations carrying it) and that the
//! kernel relayed most of it (`portico_fastpath_packets` against `portico_relay_packets`).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::aioice::{self, Agents};
use crate::fast_path::{counter, fast_portico, lab_or_skip, Lab, NsPortico};
use crate::ice::{carried, Creds, Traffic, Via};
use crate::webrtc;

/// Of the packets Portico relayed during the exchange, the share the kernel must have
/// relayed: the ICE checks before both channels are bound, and packets that arrive in the
/// moment between a ChannelBind and the worker installing it, go through user space.
const KERNEL_SHARE: f64 = 0.75;

/// The allocations Portico's API lists.
fn allocations(p: &NsPortico) -> Vec<Value> {
    let (code, body) = p
        .api("GET", "/api/v1/turn/allocations", "")
        .unwrap_or_else(|| panic!("allocations: no answer"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["allocations"].as_array().cloned().unwrap_or_default()
}

fn expect_no_allocations(p: &NsPortico, what: &str) {
    crate::ice::expect_emptied(what, || allocations(p));
}

/// Relayed candidates on Portico's relay address; the allocations carried the traffic; the
/// kernel relayed at least `KERNEL_SHARE` of what Portico relayed since `before`, and user
/// space dropped nothing as malformed. Returns the kernel's share.
fn expect_kernel_relayed(
    lab: &Lab,
    p: &NsPortico,
    before: &str,
    traffic: Traffic<'_>,
    what: &str,
) -> f64 {
    for r in traffic.sides.iter().flat_map(|s| s.iter()) {
        assert_eq!(r.ip(), lab.relay, "{what}: relayed candidate {r}");
    }
    carried(|| allocations(p), portico_testkit::turn::USER, &traffic);
    // The fast path's counters are folded into the metrics about once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let after = p.metrics();
    let d = |name: &str| counter(&after, name, &[]) - counter(before, name, &[]);
    let (relayed, kernel) = (d("portico_relay_packets"), d("portico_fastpath_packets"));
    let share = kernel as f64 / relayed.max(1) as f64;
    eprintln!("{what}: the kernel relayed {kernel} of {relayed} packets ({share:.3})");
    assert!(
        kernel > 0 && share >= KERNEL_SHARE,
        "{what}: the kernel relayed {kernel} of {relayed} packets; metrics:\n{after}"
    );
    for reason in ["bad_channel_data", "truncated", "bad_length", "no_channel"] {
        let drops = |m: &str| counter(m, "portico_dataplane_drops", &[("reason", reason)]);
        assert_eq!(
            drops(&after) - drops(before),
            0,
            "{what}: dropped for {reason}"
        );
    }
    share
}

/// aioice's two agents in the client namespace, relay-to-relay over UDP through Portico
/// with the fast path on.
#[test]
fn aioice_relay_to_relay_through_the_fast_path() {
    const T: &str = "aioice_relay_to_relay_through_the_fast_path";
    let Some(lab) = lab_or_skip(T) else { return };
    let Some(fast) = fast_portico(&lab, T) else {
        return;
    };
    let before = fast.metrics();
    let listen = lab.listen.to_string();
    let mut agents = Agents::spawn(
        Some(&lab.client_ns),
        (&listen, 3478),
        "udp",
        &fast.dir.join("no-tls"),
        3478,
    );
    let report = agents.report();
    let relayed = aioice::check_report(&report, [Via::Udp; 2]);
    let traffic = Traffic {
        sides: [&relayed[..1], &relayed[1..]],
        bytes: aioice::COUNT * aioice::A_TO_B.min(aioice::B_TO_A),
    };
    expect_kernel_relayed(&lab, &fast, &before, traffic, "aioice");
    agents.close();
    expect_no_allocations(&fast, "after the agents closed");
}

/// Headless Chromium in the client namespace (run as webrtc.rs runs it), its two
/// RTCPeerConnections relay-to-relay over UDP through Portico with the fast path on.
#[test]
fn chromium_data_channel_relay_to_relay_through_the_fast_path() {
    const T: &str = "chromium_data_channel_relay_to_relay_through_the_fast_path";
    let _one = webrtc::one_browser();
    let Some(lab) = lab_or_skip(T) else { return };
    let Some(fast) = fast_portico(&lab, T) else {
        return;
    };
    let before = fast.metrics();
    let url = format!("turn:{}:3478?transport=udp", lab.listen);
    let (report, browser, server) =
        webrtc::run_page([&url, &url], &Creds::kit(), &[], Some(&lab.client_ns));
    let (a, b): (Vec<SocketAddr>, Vec<SocketAddr>) =
        webrtc::check_report(&report, [Via::Udp; 2], &browser);
    let traffic = Traffic {
        sides: [&a, &b],
        bytes: webrtc::COUNT * webrtc::SIZE,
    };
    expect_kernel_relayed(&lab, &fast, &before, traffic, "chromium");
    server.close(&browser);
    expect_no_allocations(&fast, "after the page closed its connections");
    drop(browser);
}
