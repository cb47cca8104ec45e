//! Building a STUN message in place in a caller-provided buffer.

use core::fmt;
use std::net::{IpAddr, SocketAddr};

use aws_lc_rs::hmac;

use super::attr::{self, xor_mask, FAMILY_IPV4, FAMILY_IPV6};
use super::fingerprint::{fingerprint, FINGERPRINT_LEN};
use super::header::{message_type, Class, HEADER_LEN, MAGIC_COOKIE, MAX_METHOD};
use super::integrity::{compute_hmac, MESSAGE_INTEGRITY_LEN, MESSAGE_INTEGRITY_SHA256_LEN};

/// Why an attribute (or the header) could not be written. The message written so far is
/// left intact and consistent, so a caller may still finish or drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError {
    /// The output buffer cannot hold the attribute.
    BufferTooSmall,
    /// The attribute value exceeds 65535 bytes, or the message would exceed the 16-bit
    /// length field.
    TooLong,
    /// Method number above 0xFFF.
    InvalidMethod,
    /// ERROR-CODE outside 300..=699.
    InvalidErrorCode,
    /// The attribute is not allowed after MESSAGE-INTEGRITY(-SHA256) or FINGERPRINT: a
    /// receiver would ignore it or reject the message.
    OutOfOrder,
}

impl WriteError {
    /// Short label for metrics and logs.
    pub const fn reason(&self) -> &'static str {
        match self {
            WriteError::BufferTooSmall => "buffer_too_small",
            WriteError::TooLong => "too_long",
            WriteError::InvalidMethod => "invalid_method",
            WriteError::InvalidErrorCode => "invalid_error_code",
            WriteError::OutOfOrder => "out_of_order",
        }
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for WriteError {}

/// Writes a STUN message into a borrowed buffer. The header length field is updated after
/// every attribute, so integrity and fingerprint can be computed directly over the buffer.
#[derive(Debug)]
pub struct MessageWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    legacy: bool,
    integrity: bool,
    integrity_sha256: bool,
    fingerprint: bool,
}

impl<'a> MessageWriter<'a> {
    /// Starts an RFC 5389/8489 message (with the magic cookie).
    pub fn new(
        buf: &'a mut [u8],
        class: Class,
        method: u16,
        tid: &[u8; 12],
    ) -> Result<Self, WriteError> {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        id[4..].copy_from_slice(tid);
        Self::start(buf, class, method, &id, false)
    }

    /// Starts an RFC 3489 message: `tid16` (the client's 128-bit transaction id, see
    /// [`super::Message::legacy_transaction_id`]) takes the place of cookie + id.
    pub fn new_legacy(
        buf: &'a mut [u8],
        class: Class,
        method: u16,
        tid16: &[u8; 16],
    ) -> Result<Self, WriteError> {
        Self::start(buf, class, method, tid16, true)
    }

    fn start(
        buf: &'a mut [u8],
        class: Class,
        method: u16,
        id: &[u8; 16],
        legacy: bool,
    ) -> Result<Self, WriteError> {
        if method > MAX_METHOD {
            return Err(WriteError::InvalidMethod);
        }
        let header = buf
            .get_mut(..HEADER_LEN)
            .ok_or(WriteError::BufferTooSmall)?;
        header[..2].copy_from_slice(&message_type(class, method).to_be_bytes());
        header[2..4].copy_from_slice(&[0, 0]);
        header[4..].copy_from_slice(id);
        Ok(MessageWriter {
            buf,
            len: HEADER_LEN,
            legacy,
            integrity: false,
            integrity_sha256: false,
            fingerprint: false,
        })
    }

    /// Bytes written so far (a complete message at every point).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: even an attribute-less message has its 20-byte header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The message written so far.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Transaction id as written into the header (bytes 8..20).
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut tid = [0u8; 12];
        if let Some(src) = self.buf.get(8..HEADER_LEN) {
            tid.copy_from_slice(src);
        }
        tid
    }

    /// Ends the message; returns its total length (header included).
    pub fn finish(self) -> usize {
        self.len
    }

    fn check_order(&self, typ: u16) -> Result<(), WriteError> {
        let ok = match typ {
            _ if self.fingerprint => false,
            attr::FINGERPRINT => true,
            attr::MESSAGE_INTEGRITY_SHA256 => !self.integrity_sha256,
            _ => !self.integrity && !self.integrity_sha256,
        };
        if ok {
            Ok(())
        } else {
            Err(WriteError::OutOfOrder)
        }
    }

    /// Appends a TLV header for a `vlen`-byte value, pads with `pad`, updates the header
    /// length and returns the offset of the value. Nothing is changed on error.
    fn reserve(&mut self, typ: u16, vlen: usize, pad: u8) -> Result<usize, WriteError> {
        self.check_order(typ)?;
        let wire_len = u16::try_from(vlen).map_err(|_| WriteError::TooLong)?;
        let end = self.len + 4 + ((vlen + 3) & !3);
        let body_len = u16::try_from(end - HEADER_LEN).map_err(|_| WriteError::TooLong)?;
        let tlv = self
            .buf
            .get_mut(self.len..end)
            .ok_or(WriteError::BufferTooSmall)?;
        tlv[..2].copy_from_slice(&typ.to_be_bytes());
        tlv[2..4].copy_from_slice(&wire_len.to_be_bytes());
        tlv[4 + vlen..].fill(pad);
        self.buf[2..4].copy_from_slice(&body_len.to_be_bytes());
        let value_at = self.len + 4;
        self.len = end;
        match typ {
            attr::MESSAGE_INTEGRITY => self.integrity = true,
            attr::MESSAGE_INTEGRITY_SHA256 => self.integrity_sha256 = true,
            attr::FINGERPRINT => self.fingerprint = true,
            _ => {}
        }
        Ok(value_at)
    }

    /// Mutable view of the `vlen` value bytes at `at` (just reserved, so always in range).
    fn value_mut(&mut self, at: usize, vlen: usize) -> &mut [u8] {
        self.buf.get_mut(at..at + vlen).unwrap_or(&mut [])
    }

    /// Appends an attribute, zero-padded to a multiple of 4.
    pub fn add_attribute(&mut self, typ: u16, value: &[u8]) -> Result<(), WriteError> {
        self.add_attribute_padded(typ, value, 0)
    }

    /// Appends an attribute padded with `pad` bytes. Receivers ignore padding, but the
    /// integrity HMAC covers it; RFC 5769's vectors pad with spaces, and reproducing them
    /// needs this.
    pub fn add_attribute_padded(
        &mut self,
        typ: u16,
        value: &[u8],
        pad: u8,
    ) -> Result<(), WriteError> {
        let at = self.reserve(typ, value.len(), pad)?;
        self.value_mut(at, value.len()).copy_from_slice(value);
        Ok(())
    }

    /// Appends a 32-bit attribute (LIFETIME, PRIORITY, ...).
    pub fn add_u32(&mut self, typ: u16, v: u32) -> Result<(), WriteError> {
        self.add_attribute(typ, &v.to_be_bytes())
    }

    fn add_address_inner(
        &mut self,
        typ: u16,
        addr: SocketAddr,
        xor: bool,
    ) -> Result<(), WriteError> {
        let mask = if xor {
            xor_mask(&self.transaction_id())
        } else {
            [0u8; 16]
        };
        let port = addr.port() ^ u16::from_be_bytes([mask[0], mask[1]]);
        let (family, ip): (u8, [u8; 16]) = match addr.ip() {
            IpAddr::V4(v4) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                (FAMILY_IPV4, b)
            }
            IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
        };
        let ip_len = if family == FAMILY_IPV4 { 4 } else { 16 };
        let at = self.reserve(typ, 4 + ip_len, 0)?;
        let v = self.value_mut(at, 4 + ip_len);
        v[0] = 0;
        v[1] = family;
        v[2..4].copy_from_slice(&port.to_be_bytes());
        for ((out, b), m) in v[4..].iter_mut().zip(ip).zip(mask) {
            *out = b ^ m;
        }
        Ok(())
    }

    /// Appends an XOR-obfuscated address (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS,
    /// XOR-RELAYED-ADDRESS), using this message's transaction id.
    pub fn add_xor_address(&mut self, typ: u16, addr: SocketAddr) -> Result<(), WriteError> {
        self.add_address_inner(typ, addr, true)
    }

    /// Appends a plain address (MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS,
    /// OTHER-ADDRESS, RESPONSE-ORIGIN, ALTERNATE-SERVER).
    pub fn add_address(&mut self, typ: u16, addr: SocketAddr) -> Result<(), WriteError> {
        self.add_address_inner(typ, addr, false)
    }

    /// Appends ERROR-CODE. `reason` should stay under 128 characters (RFC 8489 §14.8).
    pub fn add_error_code(&mut self, code: u16, reason: &str) -> Result<(), WriteError> {
        if !(300..=699).contains(&code) {
            return Err(WriteError::InvalidErrorCode);
        }
        let r = reason.as_bytes();
        let at = self.reserve(attr::ERROR_CODE, 4 + r.len(), 0)?;
        let v = self.value_mut(at, 4 + r.len());
        v[..4].copy_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v[4..].copy_from_slice(r);
        Ok(())
    }

    /// Appends UNKNOWN-ATTRIBUTES. For RFC 3489 messages an odd-length list repeats its last
    /// entry, since RFC 3489 §11.2.9 required the list itself to fill a multiple of 4 bytes.
    pub fn add_unknown_attributes(&mut self, types: &[u16]) -> Result<(), WriteError> {
        let repeat = self.legacy && types.len() % 2 == 1;
        let count = types.len() + usize::from(repeat);
        let at = self.reserve(attr::UNKNOWN_ATTRIBUTES, count * 2, 0)?;
        let v = self.value_mut(at, count * 2);
        let last = types.last().copied();
        let all = types.iter().copied().chain(last.filter(|_| repeat));
        for (slot, t) in v.chunks_exact_mut(2).zip(all) {
            slot.copy_from_slice(&t.to_be_bytes());
        }
        Ok(())
    }

    /// Appends PASSWORD-ALGORITHMS listing `algorithms` (none of which take parameters).
    pub fn add_password_algorithms(&mut self, algorithms: &[u16]) -> Result<(), WriteError> {
        let at = self.reserve(attr::PASSWORD_ALGORITHMS, algorithms.len() * 4, 0)?;
        let v = self.value_mut(at, algorithms.len() * 4);
        for (slot, a) in v.chunks_exact_mut(4).zip(algorithms) {
            slot[..2].copy_from_slice(&a.to_be_bytes());
            slot[2..].copy_from_slice(&[0, 0]);
        }
        Ok(())
    }

    /// Appends PASSWORD-ALGORITHM (an algorithm without parameters).
    pub fn add_password_algorithm(&mut self, algorithm: u16) -> Result<(), WriteError> {
        let [a, b] = algorithm.to_be_bytes();
        self.add_attribute(attr::PASSWORD_ALGORITHM, &[a, b, 0, 0])
    }

    fn add_hmac(
        &mut self,
        typ: u16,
        algorithm: hmac::Algorithm,
        mac_len: usize,
        key: &[u8],
    ) -> Result<(), WriteError> {
        let at = self.reserve(typ, mac_len, 0)?;
        // The header length already counts this attribute, as RFC 8489 §14.5 requires.
        let covered = self.buf.get(..at - 4).unwrap_or(&[]);
        let (header, body) = covered.split_at(HEADER_LEN.min(covered.len()));
        let tag = compute_hmac(algorithm, key, header, body);
        let mac = tag.as_ref().get(..mac_len).unwrap_or(&[]);
        let out = self.value_mut(at, mac_len);
        if out.len() == mac.len() {
            out.copy_from_slice(mac);
        }
        Ok(())
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1). `key` is the short-term password or the
    /// long-term key.
    pub fn add_message_integrity(&mut self, key: &[u8]) -> Result<(), WriteError> {
        self.add_hmac(
            attr::MESSAGE_INTEGRITY,
            hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            MESSAGE_INTEGRITY_LEN,
            key,
        )
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 with the full 32-byte HMAC.
    pub fn add_message_integrity_sha256(&mut self, key: &[u8]) -> Result<(), WriteError> {
        self.add_hmac(
            attr::MESSAGE_INTEGRITY_SHA256,
            hmac::HMAC_SHA256,
            MESSAGE_INTEGRITY_SHA256_LEN,
            key,
        )
    }

    /// Appends FINGERPRINT; nothing can be added after it.
    pub fn add_fingerprint(&mut self) -> Result<(), WriteError> {
        let at = self.reserve(attr::FINGERPRINT, FINGERPRINT_LEN, 0)?;
        let fp = fingerprint(self.buf.get(..at - 4).unwrap_or(&[]));
        self.value_mut(at, FINGERPRINT_LEN)
            .copy_from_slice(&fp.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::attr::{decode_error_code, decode_unknown_attributes, decode_xor_address};
    use crate::stun::header::method;
    use crate::stun::integrity::{verify_message_integrity, verify_message_integrity_sha256};
    use crate::stun::Message;

    const TID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn header_only() {
        let mut buf = [0xAAu8; 64];
        let w = MessageWriter::new(&mut buf, Class::Request, method::BINDING, &TID).unwrap();
        assert_eq!(w.len(), 20);
        assert_eq!(w.finish(), 20);
        assert_eq!(&buf[..8], &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(&buf[8..20], &TID);
    }

    #[test]
    fn errors_instead_of_panics() {
        let mut small = [0u8; 19];
        assert_eq!(
            MessageWriter::new(&mut small, Class::Request, 1, &TID).unwrap_err(),
            WriteError::BufferTooSmall
        );
        let mut buf = [0u8; 32];
        assert_eq!(
            MessageWriter::new(&mut buf, Class::Request, 0x1000, &TID).unwrap_err(),
            WriteError::InvalidMethod
        );
        let mut w = MessageWriter::new(&mut buf, Class::Request, 1, &TID).unwrap();
        assert_eq!(
            w.add_attribute(attr::DATA, &[0; 9]),
            Err(WriteError::BufferTooSmall)
        );
        assert_eq!(w.len(), 20, "failed add leaves the message unchanged");
        w.add_attribute(attr::DATA, &[0; 8]).unwrap();
        assert_eq!(w.add_fingerprint(), Err(WriteError::BufferTooSmall));
        assert_eq!(
            w.add_error_code(200, "x"),
            Err(WriteError::InvalidErrorCode)
        );
        assert_eq!(w.finish(), 32);

        let mut big = vec![0u8; 70_000];
        let mut w = MessageWriter::new(&mut big, Class::Indication, 7, &TID).unwrap();
        assert_eq!(
            w.add_attribute(attr::DATA, &[0; 65_536]),
            Err(WriteError::TooLong)
        );
        w.add_attribute(attr::DATA, &[0; 65_500]).unwrap();
        assert_eq!(
            w.add_attribute(attr::DATA, &[0; 40]),
            Err(WriteError::TooLong)
        );
    }

    #[test]
    fn ordering_rules() {
        let mut buf = [0u8; 256];
        let mut w = MessageWriter::new(&mut buf, Class::Request, 1, &TID).unwrap();
        w.add_message_integrity(b"k").unwrap();
        assert_eq!(
            w.add_attribute(attr::REALM, b"r"),
            Err(WriteError::OutOfOrder)
        );
        assert_eq!(w.add_message_integrity(b"k"), Err(WriteError::OutOfOrder));
        w.add_message_integrity_sha256(b"k").unwrap();
        assert_eq!(
            w.add_message_integrity_sha256(b"k"),
            Err(WriteError::OutOfOrder)
        );
        w.add_fingerprint().unwrap();
        assert_eq!(w.add_fingerprint(), Err(WriteError::OutOfOrder));
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        verify_message_integrity(&m, b"k").unwrap();
        verify_message_integrity_sha256(&m, b"k").unwrap();
    }

    #[test]
    fn typed_attributes_round_trip() {
        let mut buf = [0u8; 512];
        let mut w =
            MessageWriter::new(&mut buf, Class::ErrorResponse, method::ALLOCATE, &TID).unwrap();
        let v6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let v4: SocketAddr = "198.51.100.7:49152".parse().unwrap();
        w.add_xor_address(attr::XOR_RELAYED_ADDRESS, v6).unwrap();
        w.add_xor_address(attr::XOR_MAPPED_ADDRESS, v4).unwrap();
        w.add_address(attr::MAPPED_ADDRESS, v4).unwrap();
        w.add_error_code(438, "Stale Nonce").unwrap();
        w.add_unknown_attributes(&[0x0031, 0x0032, 0x0033]).unwrap();
        w.add_u32(attr::LIFETIME, 600).unwrap();
        w.add_password_algorithms(&[2, 1]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.class(), Class::ErrorResponse);
        assert_eq!(m.method(), method::ALLOCATE);
        let tid = m.transaction_id();
        let get = |t| m.get(t).unwrap();
        assert_eq!(
            decode_xor_address(get(attr::XOR_RELAYED_ADDRESS), &tid),
            Ok(v6)
        );
        assert_eq!(
            decode_xor_address(get(attr::XOR_MAPPED_ADDRESS), &tid),
            Ok(v4)
        );
        assert_eq!(attr::decode_address(get(attr::MAPPED_ADDRESS)), Ok(v4));
        assert_eq!(
            decode_error_code(get(attr::ERROR_CODE)),
            Ok((438, "Stale Nonce"))
        );
        let u: Vec<u16> = decode_unknown_attributes(get(attr::UNKNOWN_ATTRIBUTES))
            .unwrap()
            .collect();
        assert_eq!(u, [0x31, 0x32, 0x33]);
        assert_eq!(attr::decode_u32(get(attr::LIFETIME)), Ok(600));
        assert_eq!(get(attr::PASSWORD_ALGORITHMS), &[0, 2, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn legacy_header_and_unknown_attributes() {
        let tid16 = [9u8; 16];
        let mut buf = [0u8; 64];
        let mut w =
            MessageWriter::new_legacy(&mut buf, Class::ErrorResponse, method::BINDING, &tid16)
                .unwrap();
        w.add_unknown_attributes(&[0x0031]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert!(!m.has_magic_cookie());
        assert_eq!(m.legacy_transaction_id(), tid16);
        assert_eq!(
            m.get(attr::UNKNOWN_ATTRIBUTES),
            Some(&[0, 0x31, 0, 0x31][..])
        );
    }
}
