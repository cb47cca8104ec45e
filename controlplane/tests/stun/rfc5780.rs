//! RFC 5780 NAT behaviour discovery: with `[stun] alternate_ip = "127.0.0.2"` and an
//! alternate port, the server listens on all four address/port combinations, tells clients
//! about the other one (OTHER-ADDRESS), says where each answer leaves from
//! (RESPONSE-ORIGIN), and honours CHANGE-REQUEST and RESPONSE-PORT.
//!
//! The source of each answer is checked with `recv_from`, which is what a NAT would see: an
//! answer claiming "changed IP" but sent from the primary address would make every client
//! misclassify its NAT. Both drivers are run, since a changed answer leaves through another
//! socket than the one the request came in on.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portico_testkit::net::{
    expect_silence, recv_within, tcp_connect, tcp_read_msg, tcp_write, transact, udp_client, udp_on,
};
use portico_testkit::stun::{
    new_tid, Builder, Msg, BINDING_ERROR, BINDING_REQUEST, BINDING_SUCCESS, CHANGED_ADDRESS,
    CHANGE_IP, CHANGE_PORT, CHANGE_REQUEST, MAPPED_ADDRESS, OTHER_ADDRESS, RESPONSE_ORIGIN,
    SOURCE_ADDRESS,
};
use portico_testkit::{Portico, Spec, ALT4, LOCAL4};

struct Quad {
    pp: SocketAddr,
    pa: SocketAddr,
    ap: SocketAddr,
    aa: SocketAddr,
}

fn quad(p: &Portico) -> Quad {
    let (pport, aport) = (p.port, p.alt_port());
    let at = |ip: IpAddr, port| SocketAddr::new(ip, port);
    Quad {
        pp: at(LOCAL4, pport),
        pa: at(LOCAL4, aport),
        ap: at(ALT4, pport),
        aa: at(ALT4, aport),
    }
}

fn start(io: &'static str) -> Portico {
    Portico::start("rfc5780", Spec::new().io(io).workers(2).rfc5780())
}

fn assert_success_for(m: &Msg, tid: [u8; 12], client: SocketAddr) {
    assert_eq!(m.typ, BINDING_SUCCESS, "attributes {:x?}", m.types());
    assert_eq!(m.tid(), tid);
    assert_eq!(m.xor_mapped(), Some(client), "XOR-MAPPED-ADDRESS");
    m.check_fingerprint()
        .unwrap_or_else(|e| panic!("FINGERPRINT: {e}"));
}

/// Every one of the four addresses answers from itself and names its diagonal opposite
/// as OTHER-ADDRESS.
fn other_address_and_response_origin(io: &'static str) {
    let p = start(io);
    let q = quad(&p);
    let s = udp_on(LOCAL4);
    let me = s.local_addr().unwrap();
    for (to, other) in [(q.pp, q.aa), (q.pa, q.ap), (q.ap, q.pa), (q.aa, q.pp)] {
        let req = Builder::binding().fingerprint();
        let tid = req.tid();
        let (m, from) = transact(&s, to, &req.build());
        assert_eq!(from, to, "answer to {to} must come from {to}");
        assert_success_for(&m, tid, me);
        assert_eq!(
            m.address(RESPONSE_ORIGIN),
            Some(to),
            "RESPONSE-ORIGIN of {to}"
        );
        assert_eq!(
            m.address(OTHER_ADDRESS),
            Some(other),
            "OTHER-ADDRESS of {to}"
        );
    }
}

/// CHANGE-REQUEST moves the answer's source to the sibling asked for; RESPONSE-ORIGIN says
/// so and OTHER-ADDRESS keeps naming the primary's opposite.
fn change_request_changes_the_source(io: &'static str) {
    let p = start(io);
    let q = quad(&p);
    let s = udp_on(LOCAL4);
    let me = s.local_addr().unwrap();
    for (flags, want_from) in [
        (0, q.pp),
        (CHANGE_PORT, q.pa),
        (CHANGE_IP, q.ap),
        (CHANGE_IP | CHANGE_PORT, q.aa),
    ] {
        let req = Builder::binding().change_request(flags).fingerprint();
        let tid = req.tid();
        let (m, from) = transact(&s, q.pp, &req.build());
        assert_eq!(from, want_from, "CHANGE-REQUEST {flags:#x}: answer source");
        assert_success_for(&m, tid, me);
        assert_eq!(
            m.address(RESPONSE_ORIGIN),
            Some(want_from),
            "CHANGE-REQUEST {flags:#x}: RESPONSE-ORIGIN"
        );
        assert_eq!(m.address(OTHER_ADDRESS), Some(q.aa));
    }
    // From the alternate address, "change IP" leads back to the primary IP.
    let req = Builder::binding().change_request(CHANGE_IP);
    let (_, from) = transact(&s, q.aa, &req.build());
    assert_eq!(from, q.pa);
}

/// RESPONSE-PORT sends the answer to another port of the same client IP; the asking socket
/// hears nothing, and the mapped address is still the asking socket's.
fn response_port_redirects_the_answer(io: &'static str) {
    let p = start(io);
    let q = quad(&p);
    let asker = udp_on(LOCAL4);
    let listener = udp_on(LOCAL4);
    let target = listener.local_addr().unwrap().port();
    for (flags, want_from) in [(0, q.pp), (CHANGE_IP | CHANGE_PORT, q.aa)] {
        let req = Builder::binding()
            .response_port(target)
            .change_request(flags)
            .fingerprint();
        let tid = req.tid();
        let bytes = req.build();
        asker.send_to(&bytes, q.pp).unwrap();
        let (raw, from) = recv_within(&listener, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("nothing arrived on RESPONSE-PORT {target}"));
        let m = Msg::parse(&raw).unwrap();
        assert_eq!(from, want_from, "source of the redirected answer");
        assert_success_for(&m, tid, asker.local_addr().unwrap());
        expect_silence(&asker, Duration::from_millis(200), "the asking socket");
    }
}

/// RFC 3489 clients learn the same through SOURCE-ADDRESS and CHANGED-ADDRESS.
fn legacy_client_gets_source_and_changed_address(io: &'static str) {
    let p = start(io);
    let q = quad(&p);
    let s = udp_on(LOCAL4);
    let mut tid16 = [7u8; 16];
    tid16[4..16].copy_from_slice(&new_tid());
    for (flags, want_from) in [
        (0, q.pp),
        (CHANGE_IP | CHANGE_PORT, q.aa),
        (CHANGE_PORT, q.pa),
    ] {
        tid16[0] = tid16[0].wrapping_add(1);
        let req = Builder::legacy(BINDING_REQUEST, tid16)
            .change_request(flags)
            .build();
        let (m, from) = transact(&s, q.pp, &req);
        assert_eq!(from, want_from);
        assert_eq!(m.typ, BINDING_SUCCESS);
        assert_eq!(m.address(MAPPED_ADDRESS), Some(s.local_addr().unwrap()));
        assert_eq!(m.address(SOURCE_ADDRESS), Some(want_from), "SOURCE-ADDRESS");
        assert_eq!(m.address(CHANGED_ADDRESS), Some(q.aa), "CHANGED-ADDRESS");
    }
}

/// Without an alternate address, CHANGE-REQUEST asking for a change is an unknown attribute
/// (RFC 5780 §6.1); asking for no change is answered; no RFC 5780 attributes appear.
fn change_request_without_alternate_is_420(io: &'static str) {
    let p = Portico::start("rfc5780-none", Spec::new().ipv6().io(io).workers(2));
    let s = udp_client(p.udp4());
    for flags in [CHANGE_IP, CHANGE_PORT, CHANGE_IP | CHANGE_PORT] {
        let req = Builder::binding().change_request(flags).fingerprint();
        let tid = req.tid();
        let (m, from) = transact(&s, p.udp4(), &req.build());
        assert_eq!(from, p.udp4());
        assert_eq!(m.typ, BINDING_ERROR, "CHANGE-REQUEST {flags:#x}");
        assert_eq!(m.tid(), tid);
        assert_eq!(m.error_code().map(|e| e.0), Some(420));
        assert_eq!(m.unknown_attributes(), vec![CHANGE_REQUEST]);
    }
    let req = Builder::binding().change_request(0);
    let tid = req.tid();
    let (m, _) = transact(&s, p.udp4(), &req.build());
    assert_success_for(&m, tid, s.local_addr().unwrap());
    assert_eq!(
        m.get(OTHER_ADDRESS),
        None,
        "no OTHER-ADDRESS without an alternate"
    );
    assert_eq!(m.get(RESPONSE_ORIGIN), None);
}

on_both_drivers!(
    other_address_and_response_origin,
    change_request_changes_the_source,
    response_port_redirects_the_answer,
    legacy_client_gets_source_and_changed_address,
    change_request_without_alternate_is_420,
);

/// The IPv6 listener has no alternate address: plain answers there, and CHANGE-REQUEST is
/// unknown on it even though the IPv4 side does RFC 5780.
#[test]
fn the_other_family_is_unaffected() {
    let p = Portico::start("rfc5780-v6", Spec::new().rfc5780().ipv6());
    let s = udp_client(p.udp6());
    let req = Builder::binding();
    let tid = req.tid();
    let (m, from) = transact(&s, p.udp6(), &req.build());
    assert_eq!(from, p.udp6());
    assert_success_for(&m, tid, s.local_addr().unwrap());
    assert_eq!(m.get(OTHER_ADDRESS), None);
    let (m, _) = transact(
        &s,
        p.udp6(),
        &Builder::binding().change_request(CHANGE_IP).build(),
    );
    assert_eq!(m.error_code().map(|e| e.0), Some(420));
}

/// CHANGE-REQUEST cannot be honoured over TCP (an answer from another address is not on the
/// connection): an error, never a success that pretends it was.
#[test]
fn change_request_over_tcp_is_an_error() {
    let p = start("auto");
    let q = quad(&p);
    let mut c = tcp_connect(q.pp);
    let req = Builder::binding()
        .change_request(CHANGE_IP | CHANGE_PORT)
        .fingerprint();
    let tid = req.tid();
    tcp_write(&mut c, &req.build());
    let m = tcp_read_msg(&mut c);
    assert_eq!(m.typ, BINDING_ERROR, "attributes {:x?}", m.types());
    assert_eq!(m.tid(), tid);
    let (code, _) = m.error_code().expect("ERROR-CODE");
    assert!((400..500).contains(&code), "code {code}");
    // A plain request on the same connection is still answered.
    let req = Builder::binding();
    let tid = req.tid();
    tcp_write(&mut c, &req.build());
    let m = tcp_read_msg(&mut c);
    assert_success_for(&m, tid, c.local_addr().unwrap());
}
