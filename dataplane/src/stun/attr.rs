//! Attribute type numbers and decoders for the attribute values this server reads.
//!
//! Decoders take the attribute *value* (as yielded by [`super::Message::attributes`] or
//! [`super::Message::get`]) and borrow from it; none allocates and none panics.

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::header::MAGIC_COOKIE;

// RFC 8489 / RFC 5389 / RFC 3489.
pub const MAPPED_ADDRESS: u16 = 0x0001;
/// RFC 3489 only; RFC 5780 replaced it with RESPONSE-PORT.
pub const RESPONSE_ADDRESS: u16 = 0x0002;
/// RFC 5780 (and RFC 3489).
pub const CHANGE_REQUEST: u16 = 0x0003;
/// RFC 3489 only; RFC 5780 uses RESPONSE-ORIGIN.
pub const SOURCE_ADDRESS: u16 = 0x0004;
/// RFC 3489 only; RFC 5780 uses OTHER-ADDRESS.
pub const CHANGED_ADDRESS: u16 = 0x0005;
pub const USERNAME: u16 = 0x0006;
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
// RFC 8656 (TURN).
pub const CHANNEL_NUMBER: u16 = 0x000C;
pub const LIFETIME: u16 = 0x000D;
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
pub const DATA: u16 = 0x0013;
pub const REALM: u16 = 0x0014;
pub const NONCE: u16 = 0x0015;
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
pub const EVEN_PORT: u16 = 0x0018;
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
pub const DONT_FRAGMENT: u16 = 0x001A;
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
pub const USERHASH: u16 = 0x001E;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const RESERVATION_TOKEN: u16 = 0x0022;
/// RFC 5780.
pub const PADDING: u16 = 0x0026;
/// RFC 5780.
pub const RESPONSE_PORT: u16 = 0x0027;
/// RFC 6062.
pub const CONNECTION_ID: u16 = 0x002A;
// Comprehension-optional range.
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
pub const ICMP: u16 = 0x8004;
pub const SOFTWARE: u16 = 0x8022;
pub const ALTERNATE_SERVER: u16 = 0x8023;
pub const FINGERPRINT: u16 = 0x8028;
/// RFC 5780.
pub const RESPONSE_ORIGIN: u16 = 0x802B;
/// RFC 5780.
pub const OTHER_ADDRESS: u16 = 0x802C;

/// Address family numbers used inside address attributes and REQUESTED-ADDRESS-FAMILY.
pub const FAMILY_IPV4: u8 = 0x01;
pub const FAMILY_IPV6: u8 = 0x02;

/// RFC 8489 §14: an agent that does not understand an attribute below 0x8000 must reject
/// the request (420 with UNKNOWN-ATTRIBUTES); above it, it may silently ignore it.
pub const fn is_comprehension_required(typ: u16) -> bool {
    typ < 0x8000
}

/// Why an attribute value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrError {
    /// The value has the wrong length for its type.
    BadLength,
    /// An address attribute names a family other than IPv4/IPv6.
    BadFamily,
    /// The value has the right shape but a field is out of range or not UTF-8.
    BadValue,
}

impl AttrError {
    /// Short label for metrics and logs.
    pub const fn reason(&self) -> &'static str {
        match self {
            AttrError::BadLength => "bad_attribute_length",
            AttrError::BadFamily => "bad_address_family",
            AttrError::BadValue => "bad_attribute_value",
        }
    }
}

impl fmt::Display for AttrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for AttrError {}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    match b.get(at..at + 2) {
        Some(&[x, y]) => Some(u16::from_be_bytes([x, y])),
        _ => None,
    }
}

/// Splits an address attribute into (family, port, address bytes) after checking that the
/// length matches the family exactly: a trailing or missing byte means the sender and we
/// disagree about the format, so nothing in it can be trusted.
fn address_parts(value: &[u8]) -> Result<(u8, u16, &[u8]), AttrError> {
    let (family, port, rest) = match value {
        [_reserved, family, p0, p1, rest @ ..] => (*family, u16::from_be_bytes([*p0, *p1]), rest),
        _ => return Err(AttrError::BadLength),
    };
    let want = match family {
        FAMILY_IPV4 => 4,
        FAMILY_IPV6 => 16,
        _ => return Err(AttrError::BadFamily),
    };
    if rest.len() != want {
        return Err(AttrError::BadLength);
    }
    Ok((family, port, rest))
}

fn to_socket_addr(family: u8, port: u16, bytes: &[u8]) -> Result<SocketAddr, AttrError> {
    let ip = if family == FAMILY_IPV4 {
        let a: [u8; 4] = bytes.try_into().map_err(|_| AttrError::BadLength)?;
        IpAddr::V4(Ipv4Addr::from(a))
    } else {
        let a: [u8; 16] = bytes.try_into().map_err(|_| AttrError::BadLength)?;
        IpAddr::V6(Ipv6Addr::from(a))
    };
    Ok(SocketAddr::new(ip, port))
}

/// MAPPED-ADDRESS style (un-obfuscated) address: MAPPED-ADDRESS, ALTERNATE-SERVER,
/// RESPONSE-ORIGIN, OTHER-ADDRESS and the RFC 3489 address attributes.
pub fn decode_address(value: &[u8]) -> Result<SocketAddr, AttrError> {
    let (family, port, bytes) = address_parts(value)?;
    to_socket_addr(family, port, bytes)
}

/// The 16-byte XOR mask for IPv6 addresses: the cookie followed by the transaction id.
/// IPv4 only uses the first four bytes (the cookie) and the port the first two.
pub fn xor_mask(tid: &[u8; 12]) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let (cookie, rest) = mask.split_at_mut(4);
    cookie.copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    rest.copy_from_slice(tid);
    mask
}

/// XOR-MAPPED-ADDRESS style address (also XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS). The
/// obfuscation exists because some NATs rewrite anything in a payload that looks like
/// their public address (RFC 8489 §14.2).
pub fn decode_xor_address(value: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, AttrError> {
    let (family, port, bytes) = address_parts(value)?;
    let mask = xor_mask(tid);
    let port = port ^ (MAGIC_COOKIE >> 16) as u16;
    let mut plain = [0u8; 16];
    for ((p, b), m) in plain.iter_mut().zip(bytes).zip(mask) {
        *p = b ^ m;
    }
    to_socket_addr(family, port, plain.get(..bytes.len()).unwrap_or(&[]))
}

/// ERROR-CODE: `(code, reason phrase)`. Codes outside 300..=699 are rejected because RFC
/// 8489 §14.8 only defines classes 3..=6 and a number below 100.
pub fn decode_error_code(value: &[u8]) -> Result<(u16, &str), AttrError> {
    let (class, number, reason) = match value {
        [_, _, class, number, reason @ ..] => {
            (u16::from(*class & 0x07), u16::from(*number), reason)
        }
        _ => return Err(AttrError::BadLength),
    };
    if !(3..=6).contains(&class) || number > 99 {
        return Err(AttrError::BadValue);
    }
    let reason = core::str::from_utf8(reason).map_err(|_| AttrError::BadValue)?;
    Ok((class * 100 + number, reason))
}

/// UNKNOWN-ATTRIBUTES: the attribute types listed. An odd byte count cannot be a list of
/// 16-bit values. (RFC 3489 senders repeat one entry to reach a multiple of 4; the duplicate
/// is harmless to a reader.)
pub fn decode_unknown_attributes(
    value: &[u8],
) -> Result<impl Iterator<Item = u16> + '_, AttrError> {
    if value.len() & 1 != 0 {
        return Err(AttrError::BadLength);
    }
    Ok(value
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]])))
}

/// CHANGE-REQUEST (RFC 5780 §7.2): `(change_ip, change_port)`.
pub fn decode_change_request(value: &[u8]) -> Result<(bool, bool), AttrError> {
    let flags = decode_u32(value)?;
    Ok((flags & 0x4 != 0, flags & 0x2 != 0))
}

/// Any 32-bit attribute: LIFETIME, PRIORITY, ...
pub fn decode_u32(value: &[u8]) -> Result<u32, AttrError> {
    let a: [u8; 4] = value.try_into().map_err(|_| AttrError::BadLength)?;
    Ok(u32::from_be_bytes(a))
}

/// RESPONSE-PORT (RFC 5780 §7.5): a port followed by two bytes of padding. Senders disagree
/// on whether the attribute length counts those two bytes, so both 2 and 4 are accepted.
pub fn decode_response_port(value: &[u8]) -> Result<u16, AttrError> {
    match value.len() {
        2 | 4 => be16(value, 0).ok_or(AttrError::BadLength),
        _ => Err(AttrError::BadLength),
    }
}

/// REQUESTED-TRANSPORT (RFC 8656 §18.7): the IP protocol number (17 = UDP, 6 = TCP).
pub fn decode_requested_transport(value: &[u8]) -> Result<u8, AttrError> {
    match value {
        [proto, _, _, _] => Ok(*proto),
        _ => Err(AttrError::BadLength),
    }
}

/// CHANNEL-NUMBER (RFC 8656 §18.1). The range check (0x4000..=0x7FFF, RFC 5766) is left to
/// the caller because an out-of-range number is a 400 for the request, not a malformed
/// attribute.
pub fn decode_channel_number(value: &[u8]) -> Result<u16, AttrError> {
    match value.len() {
        4 => be16(value, 0).ok_or(AttrError::BadLength),
        _ => Err(AttrError::BadLength),
    }
}

/// EVEN-PORT (RFC 8656 §18.6): whether the R bit (reserve the next port too) is set.
pub fn decode_even_port(value: &[u8]) -> Result<bool, AttrError> {
    match value {
        [flags] => Ok(flags & 0x80 != 0),
        _ => Err(AttrError::BadLength),
    }
}

/// REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.8, §18.11).
pub fn decode_address_family(value: &[u8]) -> Result<u8, AttrError> {
    match value {
        [family @ (FAMILY_IPV4 | FAMILY_IPV6), _, _, _] => Ok(*family),
        [_, _, _, _] => Err(AttrError::BadFamily),
        _ => Err(AttrError::BadLength),
    }
}

/// USERNAME, REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN: UTF-8 text.
pub fn decode_text(value: &[u8]) -> Result<&str, AttrError> {
    core::str::from_utf8(value).map_err(|_| AttrError::BadValue)
}

/// Entries of PASSWORD-ALGORITHMS (RFC 8489 §14.11), validated as a whole up front so that
/// iterating cannot fail half-way.
#[derive(Debug, Clone)]
pub struct PasswordAlgorithms<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PasswordAlgorithms<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (entry, rest) = split_algorithm(self.rest).ok()??;
        self.rest = rest;
        Some(entry)
    }
}

/// One `algorithm | params length | params (padded)` entry, or `None` at the end.
#[allow(clippy::type_complexity)]
fn split_algorithm(b: &[u8]) -> Result<Option<((u16, &[u8]), &[u8])>, AttrError> {
    if b.is_empty() {
        return Ok(None);
    }
    let alg = be16(b, 0).ok_or(AttrError::BadLength)?;
    let len = usize::from(be16(b, 2).ok_or(AttrError::BadLength)?);
    let params = b.get(4..4 + len).ok_or(AttrError::BadLength)?;
    // The last entry's padding is the attribute padding, already stripped by the parser.
    let next = (4 + len + 3) & !3;
    let rest = b.get(next..).unwrap_or(&[]);
    Ok(Some(((alg, params), rest)))
}

/// PASSWORD-ALGORITHMS: `(algorithm, parameters)` pairs in the server's order of preference.
pub fn decode_password_algorithms(value: &[u8]) -> Result<PasswordAlgorithms<'_>, AttrError> {
    let mut rest = value;
    while let Some((_, r)) = split_algorithm(rest)? {
        rest = r;
    }
    Ok(PasswordAlgorithms { rest: value })
}

/// PASSWORD-ALGORITHM (RFC 8489 §14.12): exactly one `(algorithm, parameters)` entry.
pub fn decode_password_algorithm(value: &[u8]) -> Result<(u16, &[u8]), AttrError> {
    match split_algorithm(value)? {
        Some((entry, [])) => Ok(entry),
        _ => Err(AttrError::BadLength),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    #[test]
    fn xor_ipv4_from_rfc5769() {
        let v = [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43];
        assert_eq!(
            decode_xor_address(&v, &TID),
            Ok("192.0.2.1:32853".parse().unwrap())
        );
    }

    #[test]
    fn plain_address() {
        let v = [0, 1, 0x12, 0x34, 10, 0, 0, 1];
        assert_eq!(decode_address(&v), Ok("10.0.0.1:4660".parse().unwrap()));
        let mut v6 = [0u8; 20];
        v6[1] = 2;
        v6[3] = 80;
        v6[19] = 1;
        assert_eq!(decode_address(&v6), Ok("[::1]:80".parse().unwrap()));
        assert_eq!(decode_address(&v[..7]), Err(AttrError::BadLength));
        assert_eq!(decode_address(&v6[..8]), Err(AttrError::BadLength));
        assert_eq!(
            decode_address(&[0, 3, 0, 0, 1, 2, 3, 4]),
            Err(AttrError::BadFamily)
        );
        assert_eq!(decode_address(&[]), Err(AttrError::BadLength));
    }

    #[test]
    fn error_code() {
        assert_eq!(
            decode_error_code(&[0, 0, 4, 1, b'U', b'n']),
            Ok((401, "Un"))
        );
        assert_eq!(decode_error_code(&[0, 0, 3, 0]), Ok((300, "")));
        assert_eq!(decode_error_code(&[0, 0, 7, 0]), Err(AttrError::BadValue));
        assert_eq!(decode_error_code(&[0, 0, 4, 100]), Err(AttrError::BadValue));
        assert_eq!(
            decode_error_code(&[0, 0, 4, 0, 0xff]),
            Err(AttrError::BadValue)
        );
        assert_eq!(decode_error_code(&[0, 0, 4]), Err(AttrError::BadLength));
    }

    #[test]
    fn small_attributes() {
        let u: Vec<u16> = decode_unknown_attributes(&[0, 0x22, 0x80, 0x01])
            .unwrap()
            .collect();
        assert_eq!(u, [0x22, 0x8001]);
        assert!(decode_unknown_attributes(&[0, 1, 2]).is_err());
        assert_eq!(decode_change_request(&[0, 0, 0, 6]), Ok((true, true)));
        assert_eq!(decode_change_request(&[0, 0, 0, 2]), Ok((false, true)));
        assert_eq!(decode_change_request(&[0, 0, 6]), Err(AttrError::BadLength));
        assert_eq!(decode_u32(&[0, 0, 0x02, 0x58]), Ok(600));
        assert_eq!(decode_response_port(&[0x12, 0x34, 0, 0]), Ok(0x1234));
        assert_eq!(decode_response_port(&[0x12, 0x34]), Ok(0x1234));
        assert_eq!(decode_response_port(&[0x12]), Err(AttrError::BadLength));
        assert_eq!(decode_requested_transport(&[17, 0, 0, 0]), Ok(17));
        assert_eq!(decode_requested_transport(&[17]), Err(AttrError::BadLength));
        assert_eq!(decode_channel_number(&[0x40, 0x01, 0, 0]), Ok(0x4001));
        assert_eq!(decode_even_port(&[0x80]), Ok(true));
        assert_eq!(decode_even_port(&[0x00]), Ok(false));
        assert_eq!(
            decode_even_port(&[0x80, 0, 0, 0]),
            Err(AttrError::BadLength)
        );
        assert_eq!(decode_address_family(&[2, 0, 0, 0]), Ok(2));
        assert_eq!(
            decode_address_family(&[3, 0, 0, 0]),
            Err(AttrError::BadFamily)
        );
        assert_eq!(decode_text(b"abc"), Ok("abc"));
        assert!(is_comprehension_required(USERNAME));
        assert!(!is_comprehension_required(SOFTWARE));
    }

    #[test]
    fn password_algorithms() {
        let v = [0, 2, 0, 0, 0, 1, 0, 0];
        let algs: Vec<_> = decode_password_algorithms(&v).unwrap().collect();
        assert_eq!(algs, [(2, &[][..]), (1, &[][..])]);
        let with_params = [0, 9, 0, 3, 1, 2, 3, 0, 0, 1, 0, 1, 7];
        let algs: Vec<_> = decode_password_algorithms(&with_params).unwrap().collect();
        assert_eq!(algs, [(9, &[1, 2, 3][..]), (1, &[7][..])]);
        assert!(decode_password_algorithms(&[0, 1, 0, 4, 0]).is_err());
        assert!(decode_password_algorithms(&[0, 1, 0]).is_err());
        assert_eq!(decode_password_algorithms(&[]).unwrap().count(), 0);
        assert_eq!(decode_password_algorithm(&[0, 2, 0, 0]), Ok((2, &[][..])));
        assert!(decode_password_algorithm(&v).is_err());
        assert!(decode_password_algorithm(&[]).is_err());
    }
}

/// Comprehension-required attributes a request carried that its handler does not know,
/// collected for the UNKNOWN-ATTRIBUTES of a 420 response. At most eight are kept: enough
/// to tell the client what is wrong, and the error response stays small whatever the
/// request holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnknownList {
    list: [u16; 8],
    len: usize,
}

impl UnknownList {
    pub fn note(&mut self, typ: u16) {
        if self.len < self.list.len() && !self.list[..self.len].contains(&typ) {
            self.list[self.len] = typ;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.list[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
