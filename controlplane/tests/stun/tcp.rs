//! STUN over TCP (RFC 8489 §6.2.2): messages framed by their own length field, any number
//! per write, any split across writes.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::net::{expect_closed, tcp_connect, tcp_read_msg, tcp_write};
use portico_testkit::stun::{Builder, Msg, BINDING_ERROR, BINDING_SUCCESS};
use portico_testkit::{Portico, Spec};

fn assert_tcp_success(m: &Msg, tid: [u8; 12], conn: &TcpStream) {
    assert_eq!(m.typ, BINDING_SUCCESS, "attributes {:x?}", m.types());
    assert_eq!(m.tid(), tid, "transaction id");
    assert_eq!(
        m.xor_mapped(),
        Some(conn.local_addr().unwrap()),
        "XOR-MAPPED-ADDRESS is the client's end of the connection"
    );
    m.check_fingerprint()
        .unwrap_or_else(|e| panic!("FINGERPRINT: {e}"));
}

fn one_request(server: SocketAddr) {
    let mut c = tcp_connect(server);
    let req = Builder::binding().fingerprint();
    let tid = req.tid();
    tcp_write(&mut c, &req.build());
    let m = tcp_read_msg(&mut c);
    assert_tcp_success(&m, tid, &c);
    // The connection stays usable for another request.
    let req = Builder::binding();
    let tid = req.tid();
    tcp_write(&mut c, &req.build());
    assert_tcp_success(&tcp_read_msg(&mut c), tid, &c);
}

#[test]
fn one_request_ipv4_and_ipv6() {
    let p = Portico::start("stun-tcp", Spec::new().ipv6());
    let before = p.counter(Counter::TcpAccepted);
    one_request(p.udp4());
    one_request(p.udp6());
    assert!(p.wait_counter(Counter::TcpAccepted, before + 2) >= before + 2);
}

#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let p = Portico::start("stun-tcp", Spec::new().ipv6());
    let mut c = tcp_connect(p.udp4());
    let mut bytes = Vec::new();
    let mut tids = Vec::new();
    for i in 0..10 {
        // Mix sizes so frame boundaries fall at different offsets.
        let mut b = Builder::binding();
        if i & 1 == 1 {
            b = b.attr(0xC0DE, &vec![i as u8; i * 3]);
        }
        if i % 3 == 0 {
            b = b.fingerprint();
        }
        tids.push(b.tid());
        bytes.extend_from_slice(&b.build());
    }
    tcp_write(&mut c, &bytes);
    for tid in tids {
        let m = tcp_read_msg(&mut c);
        assert_tcp_success(&m, tid, &c);
    }
}

#[test]
fn a_request_split_across_writes_is_reassembled() {
    let p = Portico::start("stun-tcp", Spec::new().ipv6());
    let mut c = tcp_connect(p.udp4());
    let req = Builder::binding().attr(0xC0DE, b"split me").fingerprint();
    let tid = req.tid();
    let bytes = req.build();
    // One byte, then the rest of the header, then the body in two pieces.
    for piece in [&bytes[..1], &bytes[1..20], &bytes[20..27], &bytes[27..]] {
        tcp_write(&mut c, piece);
        std::thread::sleep(Duration::from_millis(60));
    }
    assert_tcp_success(&tcp_read_msg(&mut c), tid, &c);

    // A message whose tail arrives together with the next whole message.
    let a = Builder::binding();
    let b = Builder::binding();
    let (ta, tb) = (a.tid(), b.tid());
    let (a, b) = (a.build(), b.build());
    tcp_write(&mut c, &a[..13]);
    std::thread::sleep(Duration::from_millis(60));
    let mut rest = a[13..].to_vec();
    rest.extend_from_slice(&b);
    tcp_write(&mut c, &rest);
    assert_tcp_success(&tcp_read_msg(&mut c), ta, &c);
    assert_tcp_success(&tcp_read_msg(&mut c), tb, &c);
}

#[test]
fn a_non_stun_first_byte_closes_the_connection() {
    let p = Portico::start("stun-tcp", Spec::new().ipv6());
    let before = p.counter(Counter::DropTcpFraming);
    let mut c = tcp_connect(p.udp4());
    // An HTTP request: 'G' is 0x47, whose top two bits (01) no STUN message has.
    tcp_write(&mut c, b"GET / HTTP/1.1\r\nHost: portico\r\n\r\n");
    expect_closed(&mut c, Duration::from_secs(3), "HTTP on the STUN port");
    assert!(p.wait_counter(Counter::DropTcpFraming, before + 1) > before);

    // A SIP request sent to the wrong port ('O' is 0x4F: top bits 01).
    let mut c = tcp_connect(p.udp6());
    tcp_write(
        &mut c,
        b"OPTIONS sip:portico SIP/2.0\r\nVia: SIP/2.0/TCP [::1]\r\nContent-Length: 0\r\n\r\n",
    );
    expect_closed(&mut c, Duration::from_secs(3), "SIP on the STUN port");

    // A byte with both top bits set, then the rest of a header's worth.
    let mut c = tcp_connect(p.udp4());
    tcp_write(&mut c, &[0xFF; 20]);
    expect_closed(
        &mut c,
        Duration::from_secs(3),
        "0xFF bytes on the STUN port",
    );
    assert!(p.wait_counter(Counter::DropTcpFraming, before + 3) >= before + 3);

    // The listener still serves others.
    one_request(p.udp4());
}

#[test]
fn errors_come_back_on_the_connection_too() {
    let p = Portico::start("stun-tcp", Spec::new().ipv6());
    let mut c = tcp_connect(p.udp6());
    let req = Builder::binding().attr(0x0077, b"?").fingerprint();
    let tid = req.tid();
    tcp_write(&mut c, &req.build());
    let m = tcp_read_msg(&mut c);
    assert_eq!(m.typ, BINDING_ERROR);
    assert_eq!(m.tid(), tid);
    assert_eq!(m.error_code().map(|e| e.0), Some(420));
    assert_eq!(m.unknown_attributes(), vec![0x0077]);
    // After an error the connection carries on.
    let req = Builder::binding();
    let tid = req.tid();
    tcp_write(&mut c, &req.build());
    assert_tcp_success(&tcp_read_msg(&mut c), tid, &c);
}
