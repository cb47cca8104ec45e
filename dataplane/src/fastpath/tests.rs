//! Sans-IO tests of the fast path's hook in the core: which allocations the core reports as
//! changed ([`crate::turn::Changes`]) and which channels [`crate::fastpath::flows`] lets the
//! kernel relay, through the same harness (fake clock, fake driver) as the TURN tests.
//! Included from `turn/tests.rs` for its harness.

use std::net::SocketAddrV4;

use super::*;
use crate::fastpath::{flows, Flow};

const CLIENT: &str = "198.51.100.7:5000";

fn flows_of(h: &H, client: &str) -> Vec<Flow> {
    let mut out = Vec::new();
    let settings = Arc::clone(h.server.settings());
    flows(
        h.server.turn(),
        &settings,
        sa(client),
        LISTEN4,
        h.now(),
        &mut out,
    );
    out
}

/// The changed allocations since the last call (`None`: all).
fn changed(h: &mut H) -> Option<Vec<(SocketAddr, usize)>> {
    let mut out = Vec::new();
    let all = h.server.turn_mut().changes.drain(&mut out);
    (!all).then_some(out)
}

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

#[test]
fn a_bound_channel_with_its_permission_is_offered_to_the_kernel() {
    let mut h = H::new();
    h.server.turn_mut().changes.enable();
    assert_eq!(changed(&mut h), None, "enabling asks for a full look");
    assert_eq!(changed(&mut h), Some(vec![]));
    let mut c = h.client(CLIENT, "alice", "secret");
    let (_, relay) = c.allocate(&mut h);
    let relay_local = h.server.turn().table().get(0).map(|a| a.relay.local);
    // A permission alone relays nothing in the kernel (Send/Data stay in user space).
    c.permit(&mut h, &[sa(PEER1)]);
    assert_eq!(changed(&mut h), Some(vec![(sa(CLIENT), LISTEN4)]));
    assert!(flows_of(&h, CLIENT).is_empty());
    assert!(c.bind(&mut h, 0x4000, sa(PEER2)).is_success());
    assert_eq!(changed(&mut h), Some(vec![(sa(CLIENT), LISTEN4)]));
    let f = flows_of(&h, CLIENT);
    assert_eq!(
        f,
        vec![Flow {
            client: v4(CLIENT),
            listen: v4("127.0.0.1:40001"),
            channel: 0x4000,
            peer: v4(PEER2),
            relay: match relay_local {
                Some(SocketAddr::V4(a)) => a,
                other => panic!("relay {other:?}"),
            },
        }]
    );
    assert_eq!(h.relay_socket(f[0].relay.port()), relay);
    // An IPv6 peer stays in user space.
    let mut c6 = h.client("198.51.100.8:5000", "alice", "secret");
    c6.allocate_with(&mut h, &|w| {
        w.add_u32(attr::REQUESTED_TRANSPORT, 17 << 24).unwrap();
        w.add_u32(attr::ADDITIONAL_ADDRESS_FAMILY, 0x02 << 24)
            .unwrap();
    });
    c6.bind(&mut h, 0x4001, sa("[2a00:1450::2]:6000"));
    assert!(flows_of(&h, "198.51.100.8:5000").is_empty());
}

#[test]
fn expiry_of_the_permission_or_channel_and_deletion_take_it_back() {
    let mut h = H::new();
    h.server.turn_mut().changes.enable();
    let mut c = h.client(CLIENT, "alice", "secret");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER2));
    let _ = changed(&mut h);
    assert_eq!(flows_of(&h, CLIENT).len(), 1);
    // Keep the allocation alive; the permission (300 s) lapses before the channel (600 s).
    h.advance_and_tick(250);
    c.refresh(&mut h, Some(3600));
    h.advance_and_tick(51);
    assert!(flows_of(&h, CLIENT).is_empty(), "permission expired");
    assert_eq!(changed(&mut h), Some(vec![(sa(CLIENT), LISTEN4)]));
    // A new permission brings it back while the channel lives.
    c.permit(&mut h, &[sa(PEER2)]);
    assert_eq!(changed(&mut h), Some(vec![(sa(CLIENT), LISTEN4)]));
    assert_eq!(flows_of(&h, CLIENT).len(), 1);
    // The channel lapses at 600 s.
    h.advance_and_tick(300);
    assert!(flows_of(&h, CLIENT).is_empty(), "channel expired");
    assert_eq!(changed(&mut h), Some(vec![(sa(CLIENT), LISTEN4)]));
    // Deleted: reported, nothing offered.
    c.bind(&mut h, 0x4000, sa(PEER2));
    assert_eq!(flows_of(&h, CLIENT).len(), 1);
    let _ = changed(&mut h);
    assert!(c.refresh(&mut h, Some(0)).is_success());
    assert_eq!(changed(&mut h), Some(vec![(sa(CLIENT), LISTEN4)]));
    assert!(flows_of(&h, CLIENT).is_empty());
}

#[test]
fn a_blacklisted_end_or_a_bandwidth_cap_keeps_it_in_user_space() {
    let mut h = H::new();
    h.server.turn_mut().changes.enable();
    let mut c = h.client(CLIENT, "alice", "secret");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER2));
    let _ = changed(&mut h);
    {
        let mut heard = h.control.0.borrow_mut();
        heard.blocked.insert(sa(PEER2).ip());
        heard.blacklist_generation += 1;
    }
    h.tick();
    assert_eq!(
        changed(&mut h),
        None,
        "a blacklist change asks for a full look"
    );
    assert!(flows_of(&h, CLIENT).is_empty(), "blacklisted peer");

    let mut h = H::with(|c| c.turn.max_bandwidth = 1_000_000);
    let mut c = h.client(CLIENT, "alice", "secret");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER2));
    assert!(
        flows_of(&h, CLIENT).is_empty(),
        "the cap is metered in user space"
    );
}

#[test]
fn changes_are_not_recorded_until_enabled_and_stay_bounded() {
    let mut h = H::new();
    let mut c = h.client(CLIENT, "alice", "secret");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER2));
    assert_eq!(changed(&mut h), Some(vec![]), "off: nothing recorded");
    h.server.turn_mut().changes.enable();
    let _ = changed(&mut h);
    for _ in 0..5000 {
        h.server.turn_mut().changes.mark((sa(CLIENT), LISTEN4));
    }
    assert_eq!(
        changed(&mut h),
        None,
        "past the bound: one full look instead"
    );
}

#[test]
fn a_new_configuration_is_looked_at_whole_and_a_cap_takes_it_back() {
    let mut h = H::new();
    h.server.turn_mut().changes.enable();
    let mut c = h.client(CLIENT, "alice", "secret");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, sa(PEER2));
    let _ = changed(&mut h);
    assert_eq!(flows_of(&h, CLIENT).len(), 1);
    // The same configuration with a bandwidth cap, applied as the driver does.
    let mut config = Config::from_toml(&BASE.replace("CAROL_KEY", &"0".repeat(32))).unwrap();
    config.turn.max_bandwidth = 64_000;
    let settings = Settings::from_config(&config, &[7u8; 32], &DefaultRoutes::default());
    h.server.set_settings(Arc::new(settings));
    h.tick();
    assert_eq!(
        changed(&mut h),
        None,
        "a new configuration asks for a full look"
    );
    assert!(
        flows_of(&h, CLIENT).is_empty(),
        "capped: every packet metered in user space"
    );
}
