//! Entry points of the reverse proxy's fuzz targets (`fuzz/fuzz_targets/{http,sip,ldap,h323}_sniff.rs`
//! and `tls_hello.rs`, run by `scripts/fuzz.sh`). They live in the library so that `tests/proxy/fuzz_regressions.rs`
//! replays the committed seed corpus and every input a fuzzer crashed on with a plain
//! `cargo test`.
//!
//! Each takes arbitrary bytes: the first picks the size limit and how the rest is cut into
//! reads, the rest is what a client (or a target) sends. Nothing may panic, and the checks
//! below hold for every input; the main one is that a stream cut into reads gives the same
//! answers as the stream read at once, as the proxy reads whatever TCP hands it.

use crate::proxy::sniff::h323::H323;
use crate::proxy::sniff::http::{
    host_name, parse_request, parse_response, split_absolute, BodyFramer, BodyKind, HttpError,
};
use crate::proxy::sniff::ldap::Ldap;
use crate::proxy::sniff::sip::Sip;
use crate::proxy::sniff::turn::{client_hello, first_bytes, Verdict, ALPN_TURN, HELLO_PEEK};
use crate::proxy::sniff::{Check, Guard, Monitor, Refusal, Sniffed, Sniffer, Step};

const REFUSALS: [Refusal; 5] = [
    Refusal::UnknownName,
    Refusal::Forbidden,
    Refusal::Unavailable,
    Refusal::BadRequest,
    Refusal::TooLarge,
];

/// The selector byte and the stream behind it.
fn split(data: &[u8]) -> Option<(u8, &[u8])> {
    let (&sel, rest) = data.split_first()?;
    Some((sel, rest))
}

/// A first-message limit: small ones (to reach "too large" with short inputs) and the default
/// `proxy.limits.max_header_bytes`.
fn limit(sel: u8) -> usize {
    if sel & 0x80 != 0 {
        16 * 1024
    } else {
        16 + usize::from(sel & 0x7f) * 8
    }
}

/// Read sizes: 1 to 16 bytes, but at most 64 reads per input: the sniffers and monitors look
/// at everything buffered on each read, so tiny reads of a long input cost its length squared
/// (bounded in the proxy by the head limits) and would only slow the fuzzer down.
fn read_size(sel: u8, len: usize) -> usize {
    (usize::from(sel & 0x0f) + 1).max(len / 64)
}

/// Feeds `data` to a framer at once and in reads of `step` bytes; both must agree on where
/// the body ends or that it is broken. Returns the bytes of the body found at once.
fn frame(kind: BodyKind, data: &[u8], step: usize) -> Result<usize, HttpError> {
    let mut whole = BodyFramer::new(kind);
    let at_once = whole.feed(data);
    let mut f = BodyFramer::new(kind);
    let mut used = 0;
    let mut in_reads = Ok(0);
    for chunk in data.chunks(step) {
        match f.feed(chunk) {
            Ok(n) => {
                assert!(n <= chunk.len(), "framer took {n} of {} bytes", chunk.len());
                used += n;
                in_reads = Ok(used);
                if f.is_done() {
                    break;
                }
            }
            Err(e) => {
                in_reads = Err(e);
                break;
            }
        }
    }
    match (&at_once, &in_reads) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "body length at once and in reads of {step}");
            assert_eq!(whole.is_done(), f.is_done(), "end of body");
            assert!(*a <= data.len());
            if !whole.is_done() && !whole.until_close() {
                assert_eq!(*a, data.len(), "an unfinished body takes every byte");
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!("framing at once {at_once:?}, in reads of {step}: {in_reads:?}"),
    }
    at_once
}

/// HTTP/1 request and response heads, host and target helpers, and body framing.
pub fn http_sniff(data: &[u8]) {
    let Some((sel, buf)) = split(data) else {
        return;
    };
    let max = limit(sel);
    let step = read_size(sel, buf.len());
    if let Ok(Some(h)) = parse_request(buf, max) {
        assert!(
            h.len <= buf.len() && h.len <= max,
            "head of {} bytes",
            h.len
        );
        // The head alone is a complete head of the same length.
        let again = parse_request(&buf[..h.len], max);
        assert!(
            matches!(&again, Ok(Some(g)) if g.len == h.len),
            "the head alone: {again:?}"
        );
        if let Some(host) = &h.host {
            let _ = host_name(host);
        }
        if let Some((authority, path)) = split_absolute(&h.target) {
            let _ = host_name(authority);
            assert!(path.starts_with('/'), "{path}");
        }
        let _ = frame(h.body, &buf[h.len..], step);
    }
    if let Ok(Some(r)) = parse_response(buf, max) {
        assert!(r.len <= buf.len(), "head of {} bytes", r.len);
        for head_request in [false, true] {
            let _ = frame(r.body(head_request), &buf[r.len..], step);
        }
    }
    // The body framer on its own, from the first byte.
    let _ = frame(BodyKind::Chunked, buf, step);
}

/// Feeds a monitor the stream at once and in reads; both must report the same rejections
/// and agree on whether the stream ends on a message boundary.
fn monitor_agrees(new: impl Fn() -> Box<dyn Monitor>, stream: &[u8], step: usize) {
    let mut whole = new();
    let at_once = whole.feed(stream);
    let mut m = new();
    let mut in_reads = Vec::new();
    for chunk in stream.chunks(step) {
        in_reads.extend(m.feed(chunk));
    }
    assert_eq!(
        at_once, in_reads,
        "rejections at once and in reads of {step}"
    );
    assert_eq!(
        whole.at_boundary(),
        m.at_boundary(),
        "boundary at once and in reads of {step}"
    );
}

/// What a guard made of a client's stream: the messages it handed out (check and bytes),
/// every byte it let through, in order, and how it ended (`None`: waiting for more).
#[derive(Debug, Default, PartialEq)]
struct Guarded {
    messages: Vec<(Check, Vec<u8>)>,
    forwarded: Vec<u8>,
    end: Option<Step>,
}

/// Takes the guard's steps until it waits for more or ends; message `i` is forwarded unless
/// `drop_odd` and `i` is odd. Bounded: every step but the last consumes pushed bytes.
fn drain(guard: &mut dyn Guard, g: &mut Guarded, drop_odd: bool, pushed: usize) {
    for _ in 0..=pushed + 2 {
        if g.end.is_some() {
            return;
        }
        match guard.next() {
            Step::Idle => return,
            Step::Forward(b) => {
                assert!(!b.is_empty(), "forwarding nothing");
                g.forwarded.extend_from_slice(&b);
            }
            Step::Message { check, bytes } => {
                let forward = !(drop_odd && g.messages.len() % 2 == 1);
                if forward {
                    g.forwarded.extend_from_slice(&bytes);
                }
                g.messages.push((check, bytes));
                guard.decide(forward);
            }
            // Why a stream broke may show at different bytes when it comes in reads (a
            // prefix is already no SIP message, the whole head is no UTF-8), and a broken
            // head beyond the limit is "broken" when it arrives whole but "too large" when a
            // read leaves it incomplete past the limit: only that the connection ends in an
            // error must agree.
            Step::Broken(_) | Step::TooLarge => g.end = Some(Step::Broken("")),
            end => g.end = Some(end),
        }
    }
    panic!("guard took more steps than bytes pushed ({pushed})");
}

/// Feeds a guard the client's stream at once and in reads; both must hand out the same
/// messages, forward the same bytes and end the same way.
fn guard_agrees(sniffer: &dyn Sniffer, max: usize, stream: &[u8], step: usize, drop_odd: bool) {
    let (mut whole, _) = sniffer.session(max);
    whole.push(stream);
    let mut at_once = Guarded::default();
    drain(whole.as_mut(), &mut at_once, drop_odd, stream.len());
    let (mut g, _) = sniffer.session(max);
    let mut in_reads = Guarded::default();
    for chunk in stream.chunks(step) {
        g.push(chunk);
        drain(g.as_mut(), &mut in_reads, drop_odd, chunk.len());
    }
    assert!(
        at_once.forwarded.len() <= stream.len(),
        "forwarded more than it got"
    );
    for (check, bytes) in &at_once.messages {
        if let Check::Name(name) = check {
            assert!(!name.is_empty());
        }
        let _ = sniffer.registration(bytes);
        for why in REFUSALS {
            let _ = sniffer.refuse(bytes, why);
        }
    }
    assert_eq!(at_once, in_reads, "guard at once and in reads of {step}");
}

/// What every stream sniffer target does: first-message sniffing, the refusals (each checked
/// by `refusal`), the session's guard on the stream as a client's and its monitor on the
/// stream as a target's answers.
fn stream_sniff(sniffer: &dyn Sniffer, data: &[u8], refusal: impl Fn(&[u8])) {
    let Some((sel, buf)) = split(data) else {
        return;
    };
    let max = limit(sel);
    let step = read_size(sel, buf.len());
    if let Sniffed::Name(name) = sniffer.sniff(buf, max) {
        assert!(!name.is_empty());
        assert!(
            !sniffer.candidates(&name).is_empty(),
            "no candidates for {name}"
        );
    }
    let _ = sniffer.registration(buf);
    for why in REFUSALS {
        if let Some(r) = sniffer.refuse(buf, why) {
            refusal(&r);
        }
    }
    guard_agrees(sniffer, max, buf, step, sel & 0x40 != 0);
    monitor_agrees(|| sniffer.session(max).1, buf, step);
}

/// SIP first-message sniffing, refusals, the per-message guard and the response monitor.
pub fn sip_sniff(data: &[u8]) {
    if let Some((sel, buf)) = split(data) {
        if let Sniffed::Name(name) = Sip.sniff(buf, limit(sel)) {
            assert_eq!(name, name.to_ascii_lowercase(), "names are lower-cased");
        }
    }
    stream_sniff(&Sip, data, |r| {
        assert!(
            r.starts_with(b"SIP/2.0 "),
            "{:?}",
            String::from_utf8_lossy(r)
        );
        assert!(r.ends_with(b"\r\n\r\n"));
    });
}

/// LDAP first-message sniffing, refusals, the per-message guard and the response monitor.
pub fn ldap_sniff(data: &[u8]) {
    use bytes::BytesMut;
    use ldap3_proto::proto::LdapOp;
    use ldap3_proto::LdapCodec;
    use tokio_util::codec::Decoder;

    stream_sniff(&Ldap, data, |r| {
        // A BindResponse our own decoder reads back.
        let mut b = BytesMut::from(r);
        let m = LdapCodec::default().decode(&mut b);
        assert!(
            matches!(&m, Ok(Some(m)) if matches!(m.op, LdapOp::BindResponse(_))),
            "refusal {r:02x?} decodes to {m:?}"
        );
    });
}

/// H.323 (H.225.0 over TPKT) first-message sniffing, the per-message guard and the monitor.
pub fn h323_sniff(data: &[u8]) {
    stream_sniff(&H323, data, |r| {
        panic!("H.323 has no refusal in the stream, got {r:02x?}")
    });
}

/// What rustls makes of a TLS record holding a ClientHello: `Some(offers stun.turn)` when it
/// accepts the hello, `None` when it refuses it or wants more.
fn rustls_offers_turn(record: &[u8]) -> Option<bool> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = record;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    let accepted = acceptor.accept().ok()??;
    let hello = accepted.client_hello();
    let offers = hello
        .alpn()
        .is_some_and(|mut names| names.any(|n| n == ALPN_TURN));
    Some(offers)
}

/// A ClientHello record built from `spec`, so that the fuzzer reaches the extensions
/// without having to keep four nested lengths right. `spec` is items of a type byte, a
/// length byte and that many bytes: type bit 7 clear, an ALPN extension whose protocol
/// names are the bytes split at `,`; set, an extension of type `type & 0x7f` with the bytes
/// as its data. The lengths around them are written right.
fn build_hello(spec: &[u8]) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut input = spec;
    while let [t, n, rest @ ..] = input {
        let (body, more) = rest.split_at(usize::from(*n).min(rest.len()));
        input = more;
        if t & 0x80 == 0 {
            let mut list = Vec::new();
            for name in body.split(|&b| b == b',') {
                list.push(name.len() as u8); // at most 255 bytes
                list.extend_from_slice(name);
            }
            exts.extend_from_slice(&16u16.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16 + 2).to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        } else {
            exts.extend_from_slice(&u16::from(t & 0x7f).to_be_bytes());
            exts.extend_from_slice(&(body.len() as u16).to_be_bytes());
            exts.extend_from_slice(body);
        }
    }
    // TLS 1.2 legacy version, random, no session id, TLS_AES_128_GCM_SHA256, null compression.
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[0x5a; 32]);
    hello.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut record = vec![0x16, 3, 1, 0, 0, 1];
    record.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&hello);
    let len = (record.len() - 5) as u16;
    record[3..5].copy_from_slice(&len.to_be_bytes());
    record
}

/// TURN on the HTTPS port: the ClientHello peek (ALPN `stun.turn`) and the first decrypted
/// bytes check (`proxy/sniff/turn.rs`). The first byte picks the peek sizes (bits 0-3) and,
/// with bit 6, that the rest is a [`build_hello`] spec rather than what the client sends.
/// Checks: a peek of any length answers "need more" or the verdict
/// of the whole input, never another; "need more" only while the first record is
/// incomplete and fits `HELLO_PEEK`; a hello taken for TURN names `stun.turn`; and whenever
/// rustls accepts the first record as a ClientHello, the verdict is TURN exactly when
/// rustls sees `stun.turn` among the offered protocols.
pub fn tls_hello(data: &[u8]) {
    tls_hello_verdicts(data);
}

/// [`tls_hello`], returning the ClientHello verdict and what rustls made of the first
/// record (`None`: refused, incomplete or no record).
pub fn tls_hello_verdicts(data: &[u8]) -> (Verdict, Option<bool>) {
    let Some((sel, rest)) = split(data) else {
        return (Verdict::NeedMore, None);
    };
    let built;
    let stream = if sel & 0x40 != 0 {
        built = build_hello(rest);
        &built[..]
    } else {
        rest
    };
    let step = read_size(sel, stream.len());
    for (check, name) in [
        (client_hello as fn(&[u8]) -> Verdict, "client_hello"),
        (first_bytes, "first_bytes"),
    ] {
        let whole = check(stream);
        let mut n = 0;
        while n < stream.len() {
            n = (n + step).min(stream.len());
            let v = check(&stream[..n]);
            assert!(
                v == Verdict::NeedMore || v == whole,
                "{name}: {v:?} after {n} bytes, {whole:?} for all"
            );
        }
        if name == "first_bytes" {
            // The proxy decides on 8 bytes at most.
            assert!(
                stream.len() < 8 || whole != Verdict::NeedMore,
                "first_bytes"
            );
        }
    }
    let verdict = client_hello(stream);
    if stream.len() < 5 {
        return (verdict, None);
    }
    let record_end = 5 + usize::from(u16::from_be_bytes([stream[3], stream[4]]));
    if verdict == Verdict::NeedMore {
        assert!(
            stream.len() < record_end && record_end <= HELLO_PEEK,
            "need more with {} bytes of a {record_end}-byte record",
            stream.len()
        );
    }
    if verdict == Verdict::Turn {
        let record = &stream[5..record_end];
        assert!(
            record.windows(ALPN_TURN.len()).any(|w| w == ALPN_TURN),
            "TURN without stun.turn"
        );
    }
    let rustls = stream.get(..record_end).and_then(rustls_offers_turn);
    if let Some(offers) = rustls {
        assert_eq!(
            verdict == Verdict::Turn,
            offers,
            "rustls accepts the hello and says stun.turn offered: {offers}, we say {verdict:?}"
        );
    }
    (verdict, rustls)
}
