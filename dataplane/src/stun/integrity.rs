//! MESSAGE-INTEGRITY (HMAC-SHA1), MESSAGE-INTEGRITY-SHA256, key derivation and
//! PASSWORD-ALGORITHM(S) negotiation (RFC 8489 §9, §14.5, §14.6, §14.11, §14.12).
//!
//! Key derivation does not apply SASLprep / OpaqueString (RFC 8265): credentials are
//! provisioned by us, and the control plane is expected to store them already in the form
//! clients send (ASCII in practice). Applying a Unicode profile here would need tables and
//! allocation on the packet path for no practical gain.

use core::fmt;

use aws_lc_rs::{constant_time, digest, hmac};
use md5::{Digest as _, Md5};

use super::attr;
use super::attr::decode_password_algorithm;
use super::header::HEADER_LEN;
use super::message::Message;

/// Value length of MESSAGE-INTEGRITY.
pub const MESSAGE_INTEGRITY_LEN: usize = 20;
/// Full value length of MESSAGE-INTEGRITY-SHA256.
pub const MESSAGE_INTEGRITY_SHA256_LEN: usize = 32;
/// Shortest MESSAGE-INTEGRITY-SHA256 RFC 8489 §14.6 lets a sender truncate to.
pub const MESSAGE_INTEGRITY_SHA256_MIN_LEN: usize = 16;

/// PASSWORD-ALGORITHM numbers (RFC 8489 §18.5).
pub const ALGORITHM_MD5: u16 = 0x0001;
pub const ALGORITHM_SHA256: u16 = 0x0002;

/// The PASSWORD-ALGORITHMS value a server offers by default: SHA-256 preferred, MD5 for
/// clients that only know that. Neither algorithm takes parameters.
pub const DEFAULT_PASSWORD_ALGORITHMS: [u8; 8] = [0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00];

/// Why an integrity check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityError {
    /// The message has no (honoured) integrity attribute of the kind asked for.
    Missing,
    /// The integrity attribute has a length the RFC does not allow.
    BadLength,
    /// The HMAC does not match: wrong key, or the message was altered.
    Mismatch,
    /// PASSWORD-ALGORITHM(S) absent, inconsistent or not what was offered (§9.2.4); the
    /// server answers 400.
    BadAlgorithm,
}

impl IntegrityError {
    /// Short label for metrics and logs.
    pub const fn reason(&self) -> &'static str {
        match self {
            IntegrityError::Missing => "integrity_missing",
            IntegrityError::BadLength => "integrity_bad_length",
            IntegrityError::Mismatch => "integrity_mismatch",
            IntegrityError::BadAlgorithm => "bad_password_algorithm",
        }
    }
}

impl fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for IntegrityError {}

/// RFC 8489 §9.2.2: MD5("username:realm:password"), the key RFC 5389 clients use.
pub fn long_term_key_md5(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    for part in [username, b":", realm, b":", password] {
        h.update(part);
    }
    h.finalize().into()
}

fn sha256_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// RFC 8489 §9.2.2: SHA-256("username:realm:password"), used when PASSWORD-ALGORITHM is
/// SHA-256.
pub fn long_term_key_sha256(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 32] {
    sha256_parts(&[username, b":", realm, b":", password])
}

/// RFC 8489 §9.2.4 / §14.4 USERHASH: SHA-256("username:realm"), which lets a client hide its
/// username from on-path observers.
pub fn userhash(username: &[u8], realm: &[u8]) -> [u8; 32] {
    sha256_parts(&[username, b":", realm])
}

/// A long-term key of either algorithm, so callers can hold one without matching on it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LongTermKey {
    Md5([u8; 16]),
    Sha256([u8; 32]),
}

impl AsRef<[u8]> for LongTermKey {
    fn as_ref(&self) -> &[u8] {
        match self {
            LongTermKey::Md5(k) => k,
            LongTermKey::Sha256(k) => k,
        }
    }
}

impl fmt::Debug for LongTermKey {
    /// Keys never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LongTermKey::Md5(_) => f.write_str("LongTermKey::Md5(..)"),
            LongTermKey::Sha256(_) => f.write_str("LongTermKey::Sha256(..)"),
        }
    }
}

/// The long-term key for a PASSWORD-ALGORITHM number; `None` for algorithms we do not know.
pub fn long_term_key(
    algorithm: u16,
    username: &[u8],
    realm: &[u8],
    password: &[u8],
) -> Option<LongTermKey> {
    match algorithm {
        ALGORITHM_MD5 => Some(LongTermKey::Md5(long_term_key_md5(
            username, realm, password,
        ))),
        ALGORITHM_SHA256 => Some(LongTermKey::Sha256(long_term_key_sha256(
            username, realm, password,
        ))),
        _ => None,
    }
}

/// Which password algorithm an authenticated request uses, checking RFC 8489 §9.2.4's
/// bid-down protection: a request carrying PASSWORD-ALGORITHMS must echo exactly the list
/// the server offered (`offered`) and pick one of them with PASSWORD-ALGORITHM. A request
/// with neither attribute is from an RFC 5389 client and uses MD5.
pub fn negotiated_algorithm(msg: &Message<'_>, offered: &[u8]) -> Result<u16, IntegrityError> {
    let list = msg.get(attr::PASSWORD_ALGORITHMS);
    let chosen = msg.get(attr::PASSWORD_ALGORITHM);
    match (list, chosen) {
        (None, None) => Ok(ALGORITHM_MD5),
        (Some(list), Some(chosen)) => {
            let (alg, params) =
                decode_password_algorithm(chosen).map_err(|_| IntegrityError::BadAlgorithm)?;
            let offered_entries = attr::decode_password_algorithms(offered)
                .map_err(|_| IntegrityError::BadAlgorithm)?;
            let mut known = offered_entries.clone();
            if list != offered || !known.any(|(a, p)| a == alg && p == params) {
                return Err(IntegrityError::BadAlgorithm);
            }
            Ok(alg)
        }
        _ => Err(IntegrityError::BadAlgorithm),
    }
}

/// HMAC over `header` (with its length field already set as the integrity attribute needs)
/// followed by `body`; the two are passed separately so the verifier can patch the length
/// on a stack copy instead of the received buffer.
pub(crate) fn compute_hmac(
    algorithm: hmac::Algorithm,
    key: &[u8],
    header: &[u8],
    body: &[u8],
) -> hmac::Tag {
    let key = hmac::Key::new(algorithm, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(header);
    ctx.update(body);
    ctx.sign()
}

/// Verifies the integrity attribute at `off`. RFC 8489 §14.5: the HMAC covers everything
/// before the attribute, with the header length set as if the attribute were the last one.
fn verify_at(
    msg: &Message<'_>,
    off: usize,
    algorithm: hmac::Algorithm,
    key: &[u8],
    allowed_len: impl Fn(usize) -> bool,
) -> Result<(), IntegrityError> {
    let raw = msg.raw();
    let vlen = match raw.get(off + 2..off + 4) {
        Some(&[a, b]) => usize::from(u16::from_be_bytes([a, b])),
        _ => return Err(IntegrityError::BadLength),
    };
    if !allowed_len(vlen) {
        return Err(IntegrityError::BadLength);
    }
    let received = raw
        .get(off + 4..off + 4 + vlen)
        .ok_or(IntegrityError::BadLength)?;
    let body = raw.get(HEADER_LEN..off).ok_or(IntegrityError::BadLength)?;
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(raw.get(..HEADER_LEN).ok_or(IntegrityError::BadLength)?);
    let covered =
        u16::try_from(off + 4 + vlen - HEADER_LEN).map_err(|_| IntegrityError::BadLength)?;
    header[2..4].copy_from_slice(&covered.to_be_bytes());

    let tag = compute_hmac(algorithm, key, &header, body);
    let expected = tag.as_ref().get(..vlen).ok_or(IntegrityError::BadLength)?;
    constant_time::verify_slices_are_equal(expected, received).map_err(|_| IntegrityError::Mismatch)
}

/// Checks MESSAGE-INTEGRITY (HMAC-SHA1). `key` is the short-term password as-is or a
/// long-term key from [`long_term_key_md5`] / [`long_term_key_sha256`].
pub fn verify_message_integrity(msg: &Message<'_>, key: &[u8]) -> Result<(), IntegrityError> {
    let off = msg
        .message_integrity_offset()
        .ok_or(IntegrityError::Missing)?;
    verify_at(msg, off, hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key, |l| {
        l == MESSAGE_INTEGRITY_LEN
    })
}

/// Checks MESSAGE-INTEGRITY-SHA256, accepting the truncations RFC 8489 §14.6 allows (16 to
/// 32 bytes in steps of 4) since the sender chooses the length.
pub fn verify_message_integrity_sha256(
    msg: &Message<'_>,
    key: &[u8],
) -> Result<(), IntegrityError> {
    let off = msg
        .message_integrity_sha256_offset()
        .ok_or(IntegrityError::Missing)?;
    verify_at(msg, off, hmac::HMAC_SHA256, key, |l| {
        (MESSAGE_INTEGRITY_SHA256_MIN_LEN..=MESSAGE_INTEGRITY_SHA256_LEN).contains(&l) && l % 4 == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Class, MessageWriter};

    #[test]
    fn md5_key_known_value() {
        // RFC 5769 §2.4 credentials (after SASLprep).
        let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
        let k = long_term_key_md5(user.as_bytes(), b"example.org", b"TheMatrIX");
        let mut plain = Vec::new();
        plain.extend_from_slice(user.as_bytes());
        plain.extend_from_slice(b":example.org:TheMatrIX");
        let k2: [u8; 16] = Md5::digest(&plain).into();
        assert_eq!(k, k2);
        // MD5("user:realm:pass"), computed independently.
        assert_eq!(
            long_term_key_md5(b"user", b"realm", b"pass"),
            [
                0x84, 0x93, 0xfb, 0xc5, 0x3b, 0xa5, 0x82, 0xfb, 0x4c, 0x04, 0x4c, 0x45, 0x6b, 0xdc,
                0x40, 0xeb
            ]
        );
    }

    #[test]
    fn long_term_key_dispatch() {
        assert_eq!(
            long_term_key(ALGORITHM_MD5, b"u", b"r", b"p").map(|k| k.as_ref().len()),
            Some(16)
        );
        assert_eq!(
            long_term_key(ALGORITHM_SHA256, b"u", b"r", b"p").map(|k| k.as_ref().len()),
            Some(32)
        );
        assert!(long_term_key(7, b"u", b"r", b"p").is_none());
        assert_eq!(
            format!(
                "{:?}",
                long_term_key(ALGORITHM_MD5, b"u", b"r", b"p").unwrap()
            ),
            "LongTermKey::Md5(..)"
        );
    }

    fn build(f: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let mut w = MessageWriter::new(&mut buf, Class::Request, 3, &[5; 12]).unwrap();
        f(&mut w);
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    /// A message ending in a MESSAGE-INTEGRITY-SHA256 truncated to `len` bytes, computed the
    /// way a sender that truncates would (the header length counts the truncated value).
    fn truncated_sha256(key: &[u8], len: usize) -> Vec<u8> {
        let mut msg = build(|w| {
            w.add_attribute(attr::REALM, b"example.org").unwrap();
            w.add_attribute(attr::MESSAGE_INTEGRITY_SHA256, &vec![0; len])
                .unwrap();
        });
        let off = msg.len() - 4 - ((len + 3) & !3);
        let tag = compute_hmac(
            hmac::HMAC_SHA256,
            key,
            &msg[..HEADER_LEN],
            &msg[HEADER_LEN..off],
        );
        let n = len.min(32);
        msg[off + 4..off + 4 + n].copy_from_slice(&tag.as_ref()[..n]);
        msg
    }

    #[test]
    fn sha256_truncation() {
        for len in [16, 20, 24, 28, 32] {
            let msg = truncated_sha256(b"k", len);
            let m = Message::parse(&msg).unwrap();
            assert_eq!(
                verify_message_integrity_sha256(&m, b"k"),
                Ok(()),
                "len {len}"
            );
            assert_eq!(
                verify_message_integrity_sha256(&m, b"j"),
                Err(IntegrityError::Mismatch)
            );
        }
        for len in [0, 12, 18, 36] {
            let msg = truncated_sha256(b"k", len);
            let m = Message::parse(&msg).unwrap();
            assert_eq!(
                verify_message_integrity_sha256(&m, b"k"),
                Err(IntegrityError::BadLength),
                "len {len}"
            );
        }
        let msg = build(|w| w.add_attribute(attr::MESSAGE_INTEGRITY, &[0; 16]).unwrap());
        let m = Message::parse(&msg).unwrap();
        assert_eq!(
            verify_message_integrity(&m, b"k"),
            Err(IntegrityError::BadLength)
        );
    }

    #[test]
    fn integrity_ignores_trailing_attributes_but_not_earlier_ones() {
        let mut msg = build(|w| {
            w.add_attribute(attr::USERNAME, b"alice").unwrap();
            w.add_message_integrity(b"pw").unwrap();
            w.add_fingerprint().unwrap();
        });
        let m = Message::parse(&msg).unwrap();
        assert_eq!(verify_message_integrity(&m, b"pw"), Ok(()));
        // Tampering with a covered byte (and fixing FINGERPRINT up) is caught.
        msg[24] ^= 0x20;
        let fp_off = msg.len() - 8;
        let fp = crate::stun::fingerprint::fingerprint(&msg[..fp_off]);
        msg[fp_off + 4..].copy_from_slice(&fp.to_be_bytes());
        let m = Message::parse(&msg).unwrap();
        assert_eq!(
            verify_message_integrity(&m, b"pw"),
            Err(IntegrityError::Mismatch)
        );
    }

    #[test]
    fn password_algorithm_negotiation() {
        let offered = &DEFAULT_PASSWORD_ALGORITHMS;
        let plain = build(|_| {});
        let m = Message::parse(&plain).unwrap();
        assert_eq!(negotiated_algorithm(&m, offered), Ok(ALGORITHM_MD5));

        let good = build(|w| {
            w.add_password_algorithms(&[ALGORITHM_SHA256, ALGORITHM_MD5])
                .unwrap();
            w.add_password_algorithm(ALGORITHM_SHA256).unwrap();
        });
        let m = Message::parse(&good).unwrap();
        assert_eq!(negotiated_algorithm(&m, offered), Ok(ALGORITHM_SHA256));

        // Bid-down: the list was altered in transit.
        let altered = build(|w| {
            w.add_password_algorithms(&[ALGORITHM_MD5]).unwrap();
            w.add_password_algorithm(ALGORITHM_MD5).unwrap();
        });
        let m = Message::parse(&altered).unwrap();
        assert_eq!(
            negotiated_algorithm(&m, offered),
            Err(IntegrityError::BadAlgorithm)
        );

        let unlisted = build(|w| {
            w.add_password_algorithms(&[ALGORITHM_SHA256, ALGORITHM_MD5])
                .unwrap();
            w.add_password_algorithm(9).unwrap();
        });
        let m = Message::parse(&unlisted).unwrap();
        assert_eq!(
            negotiated_algorithm(&m, offered),
            Err(IntegrityError::BadAlgorithm)
        );

        let half = build(|w| w.add_password_algorithm(ALGORITHM_SHA256).unwrap());
        let m = Message::parse(&half).unwrap();
        assert_eq!(
            negotiated_algorithm(&m, offered),
            Err(IntegrityError::BadAlgorithm)
        );
    }
}
