//! Parsing: a validated, borrowed view of one STUN message.

use core::fmt;

use super::attr;
use super::fingerprint::{fingerprint, FINGERPRINT_LEN};
use super::header::{split_message_type, Class, HEADER_LEN, MAGIC_COOKIE};

/// Why a datagram is not a STUN message we can look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer than 20 bytes.
    TooShort,
    /// One of the two top bits is set: RFC 7983 demultiplexing puts RTP/DTLS/ChannelData
    /// there, so this is most likely some other protocol.
    NotStun,
    /// The header length is not a multiple of 4 or does not match the bytes received.
    BadLength,
    /// An attribute runs past the end of the message.
    BadAttributeLength,
    /// FINGERPRINT has the wrong size or value.
    BadFingerprint,
    /// FINGERPRINT is followed by more attributes.
    FingerprintNotLast,
}

impl ParseError {
    /// Short label for metrics and logs.
    pub const fn reason(&self) -> &'static str {
        match self {
            ParseError::TooShort => "too_short",
            ParseError::NotStun => "not_stun",
            ParseError::BadLength => "bad_length",
            ParseError::BadAttributeLength => "bad_attribute",
            ParseError::BadFingerprint => "bad_fingerprint",
            ParseError::FingerprintNotLast => "fingerprint_not_last",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ParseError {}

/// One attribute TLV as it appears on the wire (value without padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    /// Offset of the attribute's type field from the start of the message; integrity
    /// checks and error reporting need to know where an attribute sits.
    pub offset: usize,
}

/// A parsed STUN message borrowing the datagram it came from.
///
/// Construction validates the framing completely, so every accessor is infallible and
/// attribute iteration cannot run off the end.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    /// End of the attributes that count: anything after MESSAGE-INTEGRITY(-SHA256) other
    /// than what RFC 8489 §14.5/§14.6 allows there is ignored.
    visible_end: usize,
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
    fingerprint: Option<usize>,
}

fn be16(buf: &[u8], at: usize) -> u16 {
    match buf.get(at..at + 2) {
        Some(&[a, b]) => u16::from_be_bytes([a, b]),
        _ => 0,
    }
}

/// Padded size of a value of `len` bytes.
const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

impl<'a> Message<'a> {
    /// Parses exactly one STUN message: `buf` must be the whole datagram (or, on a stream,
    /// exactly the bytes [`super::message_len_from_header`] announced).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if buf.first().is_some_and(|b| b & 0xC0 != 0) {
            return Err(ParseError::NotStun);
        }
        let len = usize::from(be16(buf, 2));
        if len % 4 != 0 || len != buf.len() - HEADER_LEN {
            return Err(ParseError::BadLength);
        }

        let mut msg = Message {
            buf,
            visible_end: HEADER_LEN,
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
        };
        // Once one attribute is ignored, all later ones are too (except FINGERPRINT): the
        // integrity attribute that caused it does not cover them.
        let mut ignoring = false;
        let mut off = HEADER_LEN;
        while off < buf.len() {
            // `off` and `buf.len()` are both 4-aligned, so the TLV header is always present.
            let typ = be16(buf, off);
            let vlen = usize::from(be16(buf, off + 2));
            let end = off + 4 + padded(vlen);
            if end > buf.len() {
                return Err(ParseError::BadAttributeLength);
            }
            if typ == attr::FINGERPRINT {
                if end != buf.len() {
                    return Err(ParseError::FingerprintNotLast);
                }
                msg.check_fingerprint(off, vlen)?;
                msg.fingerprint = Some(off);
                break;
            }
            let honoured = match typ {
                _ if ignoring || msg.integrity_sha256.is_some() => false,
                attr::MESSAGE_INTEGRITY_SHA256 => true,
                _ => msg.integrity.is_none(),
            };
            if honoured {
                match typ {
                    attr::MESSAGE_INTEGRITY => msg.integrity = Some(off),
                    attr::MESSAGE_INTEGRITY_SHA256 => msg.integrity_sha256 = Some(off),
                    _ => {}
                }
                msg.visible_end = end;
            } else {
                ignoring = true;
            }
            off = end;
        }
        Ok(msg)
    }

    fn check_fingerprint(&self, off: usize, vlen: usize) -> Result<(), ParseError> {
        let value = self.buf.get(off + 4..off + 4 + vlen);
        let got = match value {
            Some(&[a, b, c, d]) if vlen == FINGERPRINT_LEN => u32::from_be_bytes([a, b, c, d]),
            _ => return Err(ParseError::BadFingerprint),
        };
        let covered = self.buf.get(..off).ok_or(ParseError::BadFingerprint)?;
        if fingerprint(covered) != got {
            return Err(ParseError::BadFingerprint);
        }
        Ok(())
    }

    /// The whole message as received.
    pub fn raw(&self) -> &'a [u8] {
        self.buf
    }

    /// The 14-bit message type (class and method interleaved).
    pub fn message_type(&self) -> u16 {
        be16(self.buf, 0)
    }

    pub fn class(&self) -> Class {
        split_message_type(self.message_type()).0
    }

    pub fn method(&self) -> u16 {
        split_message_type(self.message_type()).1
    }

    /// RFC 5389+ agents send the cookie; RFC 3489 clients do not, and need RFC 3489
    /// behaviour in return (MAPPED-ADDRESS, the 16-byte transaction id).
    pub fn has_magic_cookie(&self) -> bool {
        self.buf.get(4..8) == Some(&MAGIC_COOKIE.to_be_bytes()[..])
    }

    /// The 96-bit transaction id (bytes 8..20).
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut tid = [0u8; 12];
        if let Some(src) = self.buf.get(8..HEADER_LEN) {
            tid.copy_from_slice(src);
        }
        tid
    }

    /// The RFC 3489 128-bit transaction id (bytes 4..20): what a cookie-less client will
    /// match its response against.
    pub fn legacy_transaction_id(&self) -> [u8; 16] {
        let mut tid = [0u8; 16];
        if let Some(src) = self.buf.get(4..HEADER_LEN) {
            tid.copy_from_slice(src);
        }
        tid
    }

    /// Attributes in wire order, stopping where RFC 8489 says to stop reading (after the
    /// integrity attributes), followed by FINGERPRINT if present.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            buf: self.buf,
            off: HEADER_LEN,
            visible_end: self.visible_end,
            fingerprint: self.fingerprint,
        }
    }

    /// Value of the first attribute of type `typ`.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// Offset of the honoured MESSAGE-INTEGRITY attribute.
    pub fn message_integrity_offset(&self) -> Option<usize> {
        self.integrity
    }

    /// Offset of the honoured MESSAGE-INTEGRITY-SHA256 attribute.
    pub fn message_integrity_sha256_offset(&self) -> Option<usize> {
        self.integrity_sha256
    }

    /// Offset of the (already verified) FINGERPRINT attribute.
    pub fn fingerprint_offset(&self) -> Option<usize> {
        self.fingerprint
    }
}

/// Iterator over a message's attributes; see [`Message::attributes`].
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    off: usize,
    visible_end: usize,
    fingerprint: Option<usize>,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Attribute<'a>;

    fn next(&mut self) -> Option<Attribute<'a>> {
        if self.off >= self.visible_end {
            // Jump to FINGERPRINT once, then stop.
            let fp = self.fingerprint.take().filter(|&fp| fp >= self.off)?;
            self.off = fp;
            self.visible_end = fp + 4 + FINGERPRINT_LEN;
        }
        let off = self.off;
        let typ = be16(self.buf, off);
        let vlen = usize::from(be16(self.buf, off + 2));
        let value = self.buf.get(off + 4..off + 4 + vlen)?;
        self.off = off + 4 + padded(vlen);
        Some(Attribute {
            typ,
            value,
            offset: off,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::fingerprint::fingerprint;

    fn msg(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut v = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        v.extend_from_slice(&[7; 12]);
        for (t, val) in attrs {
            v.extend_from_slice(&t.to_be_bytes());
            v.extend_from_slice(&(val.len() as u16).to_be_bytes());
            v.extend_from_slice(val);
            while v.len() % 4 != 0 {
                v.push(0);
            }
        }
        let l = (v.len() - 20) as u16;
        v[2..4].copy_from_slice(&l.to_be_bytes());
        v
    }

    fn with_fingerprint(mut v: Vec<u8>) -> Vec<u8> {
        let l = (v.len() - 20 + 8) as u16;
        v[2..4].copy_from_slice(&l.to_be_bytes());
        let fp = fingerprint(&v);
        v.extend_from_slice(&[0x80, 0x28, 0, 4]);
        v.extend_from_slice(&fp.to_be_bytes());
        v
    }

    #[test]
    fn header_errors() {
        assert_eq!(Message::parse(&[0; 19]).unwrap_err(), ParseError::TooShort);
        let mut v = msg(&[]);
        v[0] = 0x80;
        assert_eq!(Message::parse(&v).unwrap_err(), ParseError::NotStun);
        let mut v = msg(&[]);
        v[3] = 4;
        assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadLength);
        let mut v = msg(&[(1, b"abcd")]);
        v[3] = 6;
        assert_eq!(Message::parse(&v).unwrap_err(), ParseError::BadLength);
        let mut v = msg(&[(1, b"abcd")]);
        v[23] = 5; // value length 5 -> padded 8, overruns
        assert_eq!(
            Message::parse(&v).unwrap_err(),
            ParseError::BadAttributeLength
        );
        assert_eq!(ParseError::BadAttributeLength.reason(), "bad_attribute");
        assert_eq!(ParseError::NotStun.to_string(), "not_stun");
    }

    #[test]
    fn attributes_and_padding() {
        let v = msg(&[
            (attr::USERNAME, b"abc"),
            (attr::SOFTWARE, b""),
            (0x7777, b"12345"),
        ]);
        let m = Message::parse(&v).unwrap();
        let a: Vec<_> = m.attributes().collect();
        assert_eq!(a.len(), 3);
        assert_eq!(
            a[0],
            Attribute {
                typ: attr::USERNAME,
                value: b"abc",
                offset: 20
            }
        );
        assert_eq!(
            a[1],
            Attribute {
                typ: attr::SOFTWARE,
                value: b"",
                offset: 28
            }
        );
        assert_eq!(
            a[2],
            Attribute {
                typ: 0x7777,
                value: b"12345",
                offset: 32
            }
        );
        assert_eq!(m.get(0x7777), Some(&b"12345"[..]));
        assert_eq!(m.get(attr::REALM), None);
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.method(), 1);
        assert!(m.has_magic_cookie());
        assert_eq!(m.transaction_id(), [7; 12]);
        assert_eq!(&m.legacy_transaction_id()[..4], &[0x21, 0x12, 0xa4, 0x42]);
    }

    #[test]
    fn fingerprint_rules() {
        let v = with_fingerprint(msg(&[(attr::USERNAME, b"abc")]));
        let m = Message::parse(&v).unwrap();
        assert_eq!(m.fingerprint_offset(), Some(28));
        assert_eq!(m.attributes().count(), 2);
        let mut bad = v.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            Message::parse(&bad).unwrap_err(),
            ParseError::BadFingerprint
        );
        // FINGERPRINT followed by another attribute.
        let mut v2 = msg(&[(attr::FINGERPRINT, &[0, 0, 0, 0]), (attr::USERNAME, b"a")]);
        assert_eq!(
            Message::parse(&v2).unwrap_err(),
            ParseError::FingerprintNotLast
        );
        // Wrong size.
        v2 = msg(&[(attr::FINGERPRINT, &[0, 0])]);
        assert_eq!(Message::parse(&v2).unwrap_err(), ParseError::BadFingerprint);
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let v = with_fingerprint(msg(&[
            (attr::USERNAME, b"u"),
            (attr::MESSAGE_INTEGRITY, &[0; 20]),
            (attr::MESSAGE_INTEGRITY_SHA256, &[0; 32]),
            (attr::REALM, b"late"),
            (attr::MESSAGE_INTEGRITY_SHA256, &[1; 32]),
        ]));
        let m = Message::parse(&v).unwrap();
        assert_eq!(m.message_integrity_offset(), Some(28));
        assert_eq!(m.message_integrity_sha256_offset(), Some(52));
        let types: Vec<u16> = m.attributes().map(|a| a.typ).collect();
        assert_eq!(
            types,
            [
                attr::USERNAME,
                attr::MESSAGE_INTEGRITY,
                attr::MESSAGE_INTEGRITY_SHA256,
                attr::FINGERPRINT
            ]
        );
        assert_eq!(m.get(attr::REALM), None);

        // SHA256 first: a later MESSAGE-INTEGRITY is ignored.
        let v = msg(&[
            (attr::MESSAGE_INTEGRITY_SHA256, &[0; 32]),
            (attr::MESSAGE_INTEGRITY, &[0; 20]),
        ]);
        let m = Message::parse(&v).unwrap();
        assert_eq!(m.message_integrity_offset(), None);
        assert_eq!(m.attributes().count(), 1);

        // Something between MI and MI-SHA256: MI-SHA256 is ignored too.
        let v = msg(&[
            (attr::MESSAGE_INTEGRITY, &[0; 20]),
            (attr::REALM, b"x"),
            (attr::MESSAGE_INTEGRITY_SHA256, &[0; 32]),
        ]);
        let m = Message::parse(&v).unwrap();
        assert_eq!(m.message_integrity_sha256_offset(), None);
        assert_eq!(m.attributes().count(), 1);
    }

    #[test]
    fn legacy_message_without_cookie() {
        let mut v = msg(&[(attr::MAPPED_ADDRESS, &[0, 1, 0, 80, 1, 2, 3, 4])]);
        v[4..8].copy_from_slice(&[1, 2, 3, 4]);
        let m = Message::parse(&v).unwrap();
        assert!(!m.has_magic_cookie());
        assert_eq!(&m.legacy_transaction_id()[..4], &[1, 2, 3, 4]);
        assert_eq!(m.raw(), &v[..]);
    }
}
