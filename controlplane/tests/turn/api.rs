//! The TURN allocation endpoints with real allocations: `GET /api/v1/turn/allocations` shows
//! what the dataplane serves (5-tuple, relayed address, user, permissions, channels, traffic
//! each way), and `DELETE /api/v1/turn/allocations/{id}` tears one down in the dataplane.

use std::time::{Duration, Instant};

use portico_testkit::net::port_becomes_free;
use portico_testkit::turn::{EchoPeer, TurnClient, PASSWORD, USER};
use portico_testkit::{Portico, LOCAL4};
use serde_json::Value;

use crate::turn_spec;

fn allocations(p: &Portico) -> Vec<Value> {
    let (code, v) = p.call("GET", "/api/v1/turn/allocations", "");
    assert_eq!(code, 200, "{v}");
    v["allocations"].as_array().cloned().unwrap_or_default()
}

/// Polls until `check` holds on the listing (the dataplane republishes traffic each second).
fn wait_for(p: &Portico, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = allocations(p);
        if check(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "{what}: {list:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn allocations_are_listed_with_traffic_and_can_be_deleted() {
    let p = Portico::start("turn-api", turn_spec("io_uring", true));
    let echo = EchoPeer::start(LOCAL4);
    let mut a = TurnClient::new(p.udp4(), USER, PASSWORD);
    let relayed_a = a.allocate();
    let mut b = TurnClient::new(p.udp4(), "bob", "builder");
    let relayed_b = b.allocate();
    assert!(a.bind(0x4001, echo.addr).is_success());
    for i in 0..20u8 {
        a.channel_data(0x4001, &[i; 100], false);
    }
    let mut back = 0;
    while back < 20 && a.recv_relayed(Duration::from_secs(2)).is_some() {
        back += 1;
    }
    assert_eq!(back, 20, "echoes relayed back");

    let list = wait_for(&p, "a's traffic published", |l| {
        l.iter()
            .any(|x| x["to_client"]["packets"].as_u64() == Some(20))
    });
    assert_eq!(list.len(), 2, "{list:?}");
    let ea = list
        .iter()
        .find(|x| x["client"] == a.local().to_string())
        .expect("a is listed");
    assert_eq!(ea["relayed"], relayed_a.to_string());
    assert_eq!(ea["user"], USER);
    assert_eq!(ea["transport"], "udp");
    assert_eq!(ea["channels"], 1);
    assert_eq!(ea["permissions"], 1);
    assert_eq!(ea["to_peer"]["packets"], 20);
    assert_eq!(ea["to_peer"]["bytes"], 2000);
    assert_eq!(ea["to_client"]["bytes"], 2000);
    assert!(ea["lifetime_remaining"].as_u64().unwrap() > 500);
    let eb = list
        .iter()
        .find(|x| x["client"] == b.local().to_string())
        .expect("b is listed");
    assert_eq!(eb["relayed"], relayed_b.to_string());
    assert_eq!(eb["user"], "bob");

    // Delete a's allocation: gone from the listing, its relay port closed, its next
    // Refresh is a mismatch; b is untouched.
    let id = ea["id"].as_u64().unwrap();
    let (code, body) = p.call("DELETE", &format!("/api/v1/turn/allocations/{id}"), "");
    assert_eq!(code, 204, "{body}");
    let list = allocations(&p);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["client"], b.local().to_string());
    assert!(port_becomes_free(
        LOCAL4,
        relayed_a.port(),
        Duration::from_secs(2)
    ));
    a.refresh(600).expect_error(437);
    assert!(b.refresh(600).is_success());

    let (code, body) = p.call("DELETE", &format!("/api/v1/turn/allocations/{id}"), "");
    assert_eq!(code, 404, "{body}");
    let (code, _) = p.call("DELETE", "/api/v1/turn/allocations/not-a-number", "");
    assert_eq!(code, 400);
}
