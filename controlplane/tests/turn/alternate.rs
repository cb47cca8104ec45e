//! ALTERNATE-SERVER (RFC 8489 §10, RFC 8656 §7.2): a full box answers an Allocate with
//! 300 Try Alternate naming another box of the fleet, and the client allocates there. Two
//! real boxes on loopback, each with room for one allocation: box A lists box B in
//! `turn.alternate_servers`, box B lists nobody and answers 508 when full.

use std::net::SocketAddr;

use portico_shared::counters::Counter;
use portico_testkit::stun::{ALTERNATE_SERVER, XOR_RELAYED_ADDRESS};
use portico_testkit::turn::{udp_transport, TurnClient, PASSWORD, PASSWORD2, USER, USER2};
use portico_testkit::{Portico, LOCAL4, LOCAL6};

use crate::turn_spec;

fn alternates(r: &portico_testkit::turn::Reply) -> Vec<SocketAddr> {
    r.msg().addresses(ALTERNATE_SERVER)
}

#[test]
fn a_full_box_sends_the_client_to_its_alternate_and_one_without_alternates_answers_508() {
    let b = Portico::start(
        "turn-alt-b",
        turn_spec("auto", false).turn("max_allocations = 1"),
    );
    let a = Portico::start(
        "turn-alt-a",
        turn_spec("auto", false).turn(&format!(
            "max_allocations = 1\nalternate_servers = [\"{}\", \"{}\"]",
            b.udp4(),
            b.udp6()
        )),
    );

    // Box A has room for one.
    let mut first = TurnClient::new(a.udp4(), USER, PASSWORD);
    first.allocate();

    // The second client is sent to B: its own family first, the other family after it.
    // `request` checks the 300's MESSAGE-INTEGRITY with the user's key (it was signed).
    let mut second = TurnClient::new(a.udp4(), USER2, PASSWORD2);
    let r = second.allocate_with(&udp_transport);
    r.expect_error(300);
    assert_eq!(alternates(&r), vec![b.udp4(), b.udp6()]);
    assert!(r.xor(XOR_RELAYED_ADDRESS).is_none());

    // It follows the redirect (a new server: a new nonce) and gets its relay on B.
    let mut redirected = TurnClient::new(alternates(&r)[0], USER2, PASSWORD2);
    let relayed = redirected.allocate();
    assert_eq!(relayed.ip(), LOCAL4);
    assert_eq!(b.wait_counter(Counter::TurnAllocationsActive, 1), 1);

    // An IPv6 client of A is sent to B's IPv6 address first.
    let mut v6 = TurnClient::new(a.udp6(), USER, PASSWORD);
    let r = v6.allocate_with(&udp_transport);
    r.expect_error(300);
    assert_eq!(alternates(&r), vec![b.udp6(), b.udp4()]);
    assert_eq!(a.wait_counter(Counter::TurnQuotaRejected, 2), 2);
    assert_eq!(a.counter(Counter::TurnAllocationsActive), 1);

    // B is full now and has no alternates: 508 Insufficient Capacity, as before.
    let mut late = TurnClient::new(b.udp6(), USER, PASSWORD);
    let r = late.allocate_with(&udp_transport);
    r.expect_error(508);
    assert!(alternates(&r).is_empty());
    assert_eq!(late.local().ip(), LOCAL6);

    // Room on A again: A allocates itself instead of redirecting.
    assert_eq!(first.refresh(0).lifetime(), Some(0));
    let r = second.allocate_with(&udp_transport);
    assert!(r.is_success(), "{:?}", r.code());
}
