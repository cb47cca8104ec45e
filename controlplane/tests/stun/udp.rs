//! STUN Binding over UDP against the real server, on both packet drivers.
//!
//! Every behaviour here runs once with `turn.io = "io_uring"` and once with `turn.io =
//! "epoll"` (two workers each), because the drivers are separate code paths around the same
//! protocol core: a reply sent from the wrong buffer or socket shows up only in one of them.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::net::{expect_silence, recv_within, transact, udp_client};
use portico_testkit::stun::{
    crc32, new_tid, Builder, Msg, BINDING_ERROR, BINDING_INDICATION, BINDING_REQUEST,
    BINDING_SUCCESS, FINGERPRINT, MAPPED_ADDRESS, SOFTWARE, XOR_MAPPED_ADDRESS,
};
use portico_testkit::{Portico, Spec, ANSWER_WAIT};

/// A successful RFC 8489 Binding answer for `client`: the right type and id, the client's
/// own address in XOR-MAPPED-ADDRESS, a valid FINGERPRINT as the last attribute.
fn assert_binding_success(m: &Msg, tid: [u8; 12], client: SocketAddr) {
    assert_eq!(m.typ, BINDING_SUCCESS, "type; attributes {:x?}", m.types());
    assert!(m.has_cookie(), "magic cookie missing");
    assert_eq!(m.tid(), tid, "transaction id not echoed");
    assert_eq!(m.xor_mapped(), Some(client), "XOR-MAPPED-ADDRESS");
    assert_eq!(m.count(XOR_MAPPED_ADDRESS), 1);
    m.check_fingerprint()
        .unwrap_or_else(|e| panic!("FINGERPRINT: {e}"));
}

fn binding_over(server: SocketAddr) {
    let s = udp_client(server);
    let me = s.local_addr().unwrap();
    // Without FINGERPRINT in the request ...
    let req = Builder::binding();
    let tid = req.tid();
    let (m, from) = transact(&s, server, &req.build());
    assert_eq!(from, server, "answer must come from the address asked");
    assert_binding_success(&m, tid, me);
    let software = m.software().expect("SOFTWARE present by default");
    assert!(
        software.starts_with("Portico "),
        "default SOFTWARE is \"Portico <version>\", got {software:?}"
    );
    // ... and with one.
    let req = Builder::binding().fingerprint();
    let tid = req.tid();
    let (m, _) = transact(&s, server, &req.build());
    assert_binding_success(&m, tid, me);
    // A second socket gets its own address back, not the first one's.
    let s2 = udp_client(server);
    let req = Builder::binding();
    let tid = req.tid();
    let (m, _) = transact(&s2, server, &req.build());
    assert_binding_success(&m, tid, s2.local_addr().unwrap());
    assert_ne!(s2.local_addr().unwrap(), me);
}

fn binding_ipv4(io: &'static str) {
    let p = Portico::start("stun-udp", Spec::new().ipv6().io(io).workers(2));
    let before = p.counter(Counter::StunBindingSuccess);
    binding_over(p.udp4());
    assert!(p.wait_counter(Counter::StunBindingSuccess, before + 3) >= before + 3);
}

fn binding_ipv6(io: &'static str) {
    let p = Portico::start("stun-udp", Spec::new().ipv6().io(io).workers(2));
    binding_over(p.udp6());
}

/// RFC 3489 clients send no magic cookie and a 128-bit id; they get MAPPED-ADDRESS (they
/// cannot undo the XOR) and their whole id back.
fn legacy_rfc3489(io: &'static str) {
    let p = Portico::start("stun-udp", Spec::new().ipv6().io(io).workers(2));
    let s = udp_client(p.udp4());
    let mut tid16 = [0u8; 16];
    tid16[..12].copy_from_slice(&new_tid());
    tid16[12..].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    tid16[0] = 0x5a; // surely not the cookie's first byte (0x21)
    let req = Builder::legacy(BINDING_REQUEST, tid16).build();
    let (m, _) = transact(&s, p.udp4(), &req);
    assert_eq!(m.typ, BINDING_SUCCESS);
    assert_eq!(m.tid16(), tid16, "128-bit transaction id echoed");
    assert_eq!(
        m.address(MAPPED_ADDRESS),
        Some(s.local_addr().unwrap()),
        "MAPPED-ADDRESS"
    );
    assert_eq!(
        m.get(XOR_MAPPED_ADDRESS),
        None,
        "no XOR-MAPPED-ADDRESS for RFC 3489"
    );
    for (typ, v, _) in &m.attrs {
        // RFC 3489 §11.2: every attribute length is a multiple of four.
        assert_eq!(v.len() % 4, 0, "attribute {typ:#06x} of length {}", v.len());
    }
}

/// Unknown attributes below 0x8000 must be understood, so the request fails with 420 and
/// UNKNOWN-ATTRIBUTES naming them; those above 0x8000 may be ignored, and are.
fn unknown_attributes(io: &'static str) {
    let p = Portico::start("stun-udp", Spec::new().ipv6().io(io).workers(2));
    let s = udp_client(p.udp4());
    let req = Builder::binding()
        .attr(0x0077, b"x")
        .attr(0xC0DE, b"optional")
        .attr(0x7E57, &[1, 2, 3, 4])
        .fingerprint();
    let tid = req.tid();
    let (m, _) = transact(&s, p.udp4(), &req.build());
    assert_eq!(m.typ, BINDING_ERROR, "attributes {:x?}", m.types());
    assert_eq!(m.tid(), tid);
    let (code, reason) = m.error_code().expect("ERROR-CODE");
    assert_eq!(code, 420, "reason {reason:?}");
    let mut unknown = m.unknown_attributes();
    unknown.sort_unstable();
    unknown.dedup();
    assert_eq!(unknown, vec![0x0077, 0x7E57], "UNKNOWN-ATTRIBUTES");
    assert_eq!(
        m.get(XOR_MAPPED_ADDRESS),
        None,
        "an error carries no mapped address"
    );
    m.check_fingerprint()
        .unwrap_or_else(|e| panic!("FINGERPRINT: {e}"));

    let req = Builder::binding()
        .attr(0xC0DE, b"optional")
        .attr(0x8FFF, &[0; 8])
        .attr(0x8029, &[9; 8]) // ICE-CONTROLLED, which a Binding server need not know
        .fingerprint();
    let tid = req.tid();
    let (m, _) = transact(&s, p.udp4(), &req.build());
    assert_binding_success(&m, tid, s.local_addr().unwrap());
    assert!(p.counter(Counter::StunBindingUnknownAttribute) >= 1);
}

/// Datagrams the server must not answer, each with the drop counter it must raise.
fn bad_datagrams() -> Vec<(&'static str, Vec<u8>, Counter)> {
    let valid = Builder::binding().attr(0x8022, b"client").build();
    let mut v = Vec::new();

    v.push((
        "truncated header",
        valid[..10].to_vec(),
        Counter::DropTooShort,
    ));

    let mut wrong_len = valid.clone();
    wrong_len[3] = wrong_len[3].wrapping_add(4); // claims 4 more bytes than sent
    v.push(("length field too large", wrong_len, Counter::DropBadLength));

    let mut odd_len = valid.clone();
    odd_len.truncate(odd_len.len() - 2);
    let l = (odd_len.len() - 20) as u16;
    odd_len[2..4].copy_from_slice(&l.to_be_bytes());
    v.push((
        "length not a multiple of 4",
        odd_len,
        Counter::DropBadLength,
    ));

    let mut bad_fp = Builder::binding().fingerprint().build();
    let n = bad_fp.len();
    bad_fp[n - 1] ^= 0x01;
    v.push(("bad FINGERPRINT", bad_fp, Counter::DropBadFingerprint));

    // Bytes that are plainly not STUN: the top two bits of the first byte are set.
    let mut x: u32 = 0x1234_5678;
    let mut noise: Vec<u8> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    noise[0] |= 0xC0;
    v.push(("random bytes", noise, Counter::DropNotStun));
    let mut rtp = vec![0x80, 0x00, 0x12, 0x34];
    rtp.extend_from_slice(&[0x55; 40]);
    v.push(("an RTP packet", rtp, Counter::DropNotStun));

    let mut attr_overrun = Builder::binding().attr(0x8022, b"abcd").build();
    attr_overrun[22..24].copy_from_slice(&200u16.to_be_bytes()); // SOFTWARE claims 200 bytes
    v.push((
        "attribute longer than the message",
        attr_overrun,
        Counter::DropBadAttribute,
    ));

    let mut response = Builder::new(BINDING_SUCCESS, new_tid())
        .attr(
            XOR_MAPPED_ADDRESS,
            &[0, 1, 0x21, 0x13, 0x5e, 0x12, 0xa4, 0x43],
        )
        .fingerprint()
        .build();
    v.push((
        "a success response",
        response.clone(),
        Counter::DropUnexpectedClass,
    ));
    response[0..2].copy_from_slice(&BINDING_ERROR.to_be_bytes());
    let n = response.len();
    let fp = crc32(&response[..n - 8]) ^ 0x5354_554E;
    response[n - 4..].copy_from_slice(&fp.to_be_bytes());
    v.push(("an error response", response, Counter::DropUnexpectedClass));

    // Larger than any receive buffer: a well-formed message of 3000 bytes.
    let big = Builder::binding().attr(0xC0DE, &[0x41; 2976]).build();
    v.push(("an oversized datagram", big, Counter::DropTruncated));

    v.push((
        "a Binding indication",
        Builder::new(BINDING_INDICATION, new_tid())
            .fingerprint()
            .build(),
        Counter::StunBindingIndication,
    ));
    v
}

/// Bad input gets no answer at all, raises the matching drop counter, and the server keeps
/// answering afterwards.
fn bad_input_is_dropped(io: &'static str) {
    let p = Portico::start("stun-udp", Spec::new().ipv6().io(io).workers(2));
    let s = udp_client(p.udp4());
    let me = s.local_addr().unwrap();
    for (what, bytes, counter) in bad_datagrams() {
        let before = p.counter(counter);
        s.send_to(&bytes, p.udp4()).unwrap();
        // The same socket reaches the same worker, which handles datagrams in order: if
        // the bad one were answered, that answer would arrive before this one.
        let req = Builder::binding();
        let tid = req.tid();
        s.send_to(&req.build(), p.udp4()).unwrap();
        let (bytes, _) = recv_within(&s, ANSWER_WAIT)
            .unwrap_or_else(|| panic!("{what}: no answer to the valid request that followed"));
        let m = Msg::parse(&bytes).unwrap_or_else(|e| panic!("{what}: answered with {e}"));
        assert_eq!(m.tid(), tid, "{what} was answered: {:x?}", m.types());
        assert_binding_success(&m, tid, me);
        let after = p.wait_counter(counter, before + 1);
        assert!(
            after > before,
            "{what}: counter {counter:?} stayed at {before}"
        );
    }
    expect_silence(&s, Duration::from_millis(300), "after the bad datagrams");
    // A fresh client is served normally.
    let s2 = udp_client(p.udp4());
    let req = Builder::binding();
    let tid = req.tid();
    let (m, _) = transact(&s2, p.udp4(), &req.build());
    assert_binding_success(&m, tid, s2.local_addr().unwrap());
}

on_both_drivers!(
    binding_ipv4,
    binding_ipv6,
    legacy_rfc3489,
    unknown_attributes,
    bad_input_is_dropped,
);

#[test]
fn software_is_configurable_and_can_be_hidden() {
    let named = "Portico-IT \u{e9}t\u{e9} \"quoted\"";
    let p = Portico::start("stun-software", Spec::new().ipv6().software(named));
    let s: UdpSocket = udp_client(p.udp4());
    let (m, _) = transact(&s, p.udp4(), &Builder::binding().build());
    assert_eq!(m.software().as_deref(), Some(named));
    // SOFTWARE comes before FINGERPRINT (RFC 8489 §14.7: FINGERPRINT is last).
    let types = m.types();
    let sw = types.iter().position(|t| *t == SOFTWARE).unwrap();
    let fp = types.iter().position(|t| *t == FINGERPRINT).unwrap();
    assert!(sw < fp, "{types:x?}");
    drop(p);

    let p = Portico::start("stun-software", Spec::new().ipv6().software(""));
    let s = udp_client(p.udp4());
    let req = Builder::binding();
    let tid = req.tid();
    let (m, _) = transact(&s, p.udp4(), &req.build());
    assert_binding_success(&m, tid, s.local_addr().unwrap());
    assert_eq!(m.get(SOFTWARE), None, "software = \"\" hides SOFTWARE");
    let s6 = udp_client(p.udp6());
    let (m, _) = transact(&s6, p.udp6(), &Builder::binding().build());
    assert_eq!(
        m.get(SOFTWARE),
        None,
        "software = \"\" hides SOFTWARE over IPv6 too"
    );
}

/// The harness's own codec against RFC 5769 §2.2's sample response (192.0.2.1:32853), so a
/// bug in the test codec cannot hide a server bug.
#[test]
fn test_codec_reads_the_rfc_5769_sample_response() {
    let hex = "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae \
               8022000b 74657374 20766563 746f7220 \
               00200008 0001a147 e112a643 \
               00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7 \
               80280004 c07d4c96";
    let hex: String = hex.split_whitespace().collect();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let m = Msg::parse(&bytes).unwrap();
    assert_eq!(m.typ, BINDING_SUCCESS);
    assert_eq!(m.xor_mapped(), Some("192.0.2.1:32853".parse().unwrap()));
    assert_eq!(m.software().as_deref(), Some("test vector"));
    m.check_fingerprint().unwrap();
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    let mut broken = bytes.clone();
    broken[30] ^= 1;
    assert!(Msg::parse(&broken).unwrap().check_fingerprint().is_err());
}
