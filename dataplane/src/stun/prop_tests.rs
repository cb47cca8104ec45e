//! Randomised round-trip and robustness tests, driven by a fixed-seed xorshift generator so
//! that every run checks the same cases and a failure reproduces.

use super::attr::{self, *};
use super::integrity::{
    negotiated_algorithm, verify_message_integrity, verify_message_integrity_sha256,
    DEFAULT_PASSWORD_ALGORITHMS,
};
use super::{message_len_from_header, Class, Message, MessageWriter, HEADER_LEN};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform-ish in `0..n`; 0 when `n` is 0 so callers need not special-case empty input.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.byte();
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const CLASSES: [Class; 4] = [
    Class::Request,
    Class::Indication,
    Class::SuccessResponse,
    Class::ErrorResponse,
];

/// What a random message was built from, to compare the parse against.
struct Built {
    bytes: Vec<u8>,
    class: Class,
    method: u16,
    header_id: [u8; 16],
    attrs: Vec<(u16, Vec<u8>)>,
    key: Vec<u8>,
    mi: bool,
    mi256: bool,
    fp: bool,
}

fn random_message(rng: &mut XorShift) -> Built {
    let class = CLASSES[rng.below(4)];
    let method = rng.below(0x1000) as u16;
    let mut header_id = [0u8; 16];
    rng.fill(&mut header_id);
    let legacy = rng.chance(8);
    if !legacy {
        header_id[..4].copy_from_slice(&super::MAGIC_COOKIE.to_be_bytes());
    }
    let mut buf = vec![0u8; 2048];
    let mut w = if legacy {
        MessageWriter::new_legacy(&mut buf, class, method, &header_id).unwrap()
    } else {
        let tid: [u8; 12] = header_id[4..].try_into().unwrap();
        MessageWriter::new(&mut buf, class, method, &tid).unwrap()
    };
    let mut attrs = Vec::new();
    for _ in 0..rng.below(10) {
        let typ = loop {
            let t = rng.next() as u16;
            if !matches!(
                t,
                attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT
            ) {
                break t;
            }
        };
        let mut value = vec![0u8; rng.below(49)];
        rng.fill(&mut value);
        w.add_attribute_padded(typ, &value, rng.byte()).unwrap();
        attrs.push((typ, value));
    }
    let mut key = vec![0u8; rng.below(40)];
    rng.fill(&mut key);
    let (mi, mi256, fp) = (rng.chance(2), rng.chance(2), rng.chance(2));
    if mi {
        w.add_message_integrity(&key).unwrap();
    }
    if mi256 {
        w.add_message_integrity_sha256(&key).unwrap();
    }
    if fp {
        w.add_fingerprint().unwrap();
    }
    let n = w.finish();
    buf.truncate(n);
    Built {
        bytes: buf,
        class,
        method,
        header_id,
        attrs,
        key,
        mi,
        mi256,
        fp,
    }
}

#[test]
fn written_messages_parse_back_identically() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for case in 0..5_000 {
        let b = random_message(&mut rng);
        let m = Message::parse(&b.bytes).unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(message_len_from_header(&b.bytes), Some(b.bytes.len()));
        assert_eq!(m.class(), b.class, "case {case}");
        assert_eq!(m.method(), b.method, "case {case}");
        assert_eq!(m.legacy_transaction_id(), b.header_id);
        assert_eq!(m.transaction_id()[..], b.header_id[4..]);
        let got: Vec<(u16, Vec<u8>)> = m
            .attributes()
            .filter(|a| {
                !matches!(
                    a.typ,
                    attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT
                )
            })
            .map(|a| (a.typ, a.value.to_vec()))
            .collect();
        assert_eq!(got, b.attrs, "case {case}");
        for a in m.attributes() {
            assert_eq!(m.raw()[a.offset..a.offset + 2], a.typ.to_be_bytes());
        }
        assert_eq!(m.message_integrity_offset().is_some(), b.mi);
        assert_eq!(m.message_integrity_sha256_offset().is_some(), b.mi256);
        assert_eq!(m.fingerprint_offset().is_some(), b.fp);
        if b.mi {
            assert_eq!(verify_message_integrity(&m, &b.key), Ok(()), "case {case}");
        }
        if b.mi256 {
            assert_eq!(
                verify_message_integrity_sha256(&m, &b.key),
                Ok(()),
                "case {case}"
            );
        }
    }
}

/// Runs every accessor and decoder over a parsed message; the only assertion is that
/// nothing panics and offsets stay in bounds.
fn exercise(m: &Message<'_>) {
    let tid = m.transaction_id();
    let _ = (
        m.class(),
        m.method(),
        m.has_magic_cookie(),
        m.legacy_transaction_id(),
    );
    for a in m.attributes() {
        assert!(a.offset >= HEADER_LEN && a.offset + 4 + a.value.len() <= m.raw().len());
        let v = a.value;
        let _ = decode_address(v);
        let _ = decode_xor_address(v, &tid);
        let _ = decode_error_code(v);
        let _ = decode_unknown_attributes(v).map(|it| it.count());
        let _ = decode_change_request(v);
        let _ = decode_u32(v);
        let _ = decode_response_port(v);
        let _ = decode_requested_transport(v);
        let _ = decode_channel_number(v);
        let _ = decode_even_port(v);
        let _ = decode_address_family(v);
        let _ = decode_text(v);
        let _ = decode_password_algorithms(v).map(|it| it.count());
        let _ = decode_password_algorithm(v);
    }
    let _ = m.get(attr::USERNAME);
    let _ = verify_message_integrity(m, b"key");
    let _ = verify_message_integrity_sha256(m, b"key");
    let _ = negotiated_algorithm(m, &DEFAULT_PASSWORD_ALGORITHMS);
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
    let mut accepted = 0;
    for _ in 0..30_000 {
        let mut buf = vec![0u8; rng.below(160)];
        rng.fill(&mut buf);
        // Most random buffers die at the first check; make half of them look like STUN
        // framing so the attribute walk is exercised too.
        if rng.chance(2) && buf.len() >= HEADER_LEN {
            buf[0] &= 0x3F;
            let body = (buf.len() - HEADER_LEN) & !3;
            buf.truncate(HEADER_LEN + body);
            buf[2..4].copy_from_slice(&(body as u16).to_be_bytes());
        }
        let _ = message_len_from_header(&buf);
        if let Ok(m) = Message::parse(&buf) {
            accepted += 1;
            exercise(&m);
        }
    }
    assert!(
        accepted > 100,
        "the framing half should often parse ({accepted})"
    );
}

#[test]
fn mutated_messages_never_panic() {
    let mut rng = XorShift(0x0123_4567_89AB_CDEF);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut buf = random_message(&mut rng).bytes;
        for _ in 0..1 + rng.below(4) {
            match rng.below(6) {
                0 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] ^= 1 << rng.below(8);
                }
                1 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] = rng.byte();
                }
                2 => {
                    let len = rng.below(buf.len() + 1);
                    buf.truncate(len);
                }
                3 => {
                    for _ in 0..rng.below(9) {
                        buf.push(rng.byte());
                    }
                }
                4 if buf.len() > 23 => {
                    // Attribute length fields are where overruns come from.
                    let i = HEADER_LEN + 2 + 4 * rng.below((buf.len() - 22) / 4);
                    if i + 1 < buf.len() {
                        buf[i + 1] = rng.byte();
                    }
                }
                _ => {}
            }
            // Keep the header length consistent half the time so the walk goes deep.
            if rng.chance(2) && buf.len() >= HEADER_LEN {
                let body = ((buf.len() - HEADER_LEN) as u16).to_be_bytes();
                buf[2..4].copy_from_slice(&body);
            }
        }
        let _ = message_len_from_header(&buf);
        if let Ok(m) = Message::parse(&buf) {
            accepted += 1;
            exercise(&m);
        }
    }
    assert!(
        accepted > 1_000,
        "mutations should often stay parseable ({accepted})"
    );
}

#[test]
fn decoders_on_random_values_never_panic() {
    let mut rng = XorShift(42);
    for _ in 0..20_000 {
        let mut v = vec![0u8; rng.below(40)];
        rng.fill(&mut v);
        let mut tid = [0u8; 12];
        rng.fill(&mut tid);
        let _ = decode_address(&v);
        let _ = decode_xor_address(&v, &tid);
        let _ = decode_error_code(&v);
        let _ = decode_unknown_attributes(&v).map(|it| it.count());
        let _ = decode_password_algorithms(&v).map(|it| it.count());
        let _ = decode_password_algorithm(&v);
        let _ = decode_address_family(&v);
    }
}
