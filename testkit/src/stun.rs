//! A deliberately separate, minimal STUN and TURN codec for the tests.
//!
//! It shares no code with `portico_dataplane::stun`: a test that built its requests and
//! checked its answers with the server's own codec would pass whenever encoder and decoder
//! agree with each other, even if both were wrong. This one is written from RFC 8489 / RFC
//! 3489 / RFC 5780 / RFC 8656 directly and is strict about what it accepts. The TURN client
//! ([`crate::turn`]) builds and checks its messages with it too (MESSAGE-INTEGRITY with the
//! long-term key, XOR addresses).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Methods (RFC 8489, RFC 8656).
pub const BINDING: u16 = 0x001;
pub const ALLOCATE: u16 = 0x003;
pub const REFRESH: u16 = 0x004;
pub const SEND: u16 = 0x006;
pub const DATA_METHOD: u16 = 0x007;
pub const CREATE_PERMISSION: u16 = 0x008;
pub const CHANNEL_BIND: u16 = 0x009;
/// RFC 6062 TCP relays.
pub const CONNECT: u16 = 0x00A;
pub const CONNECTION_BIND: u16 = 0x00B;
pub const CONNECTION_ATTEMPT: u16 = 0x00C;

/// The message class, encoded in two bits spread over the type (RFC 8489 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// The message type of `method` in `class`.
pub const fn msg_type(method: u16, class: Class) -> u16 {
    let c = match class {
        Class::Request => 0,
        Class::Indication => 1,
        Class::Success => 2,
        Class::Error => 3,
    };
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 1) << 4)
        | ((c & 2) << 7)
}

pub const BINDING_REQUEST: u16 = msg_type(BINDING, Class::Request);
pub const BINDING_INDICATION: u16 = msg_type(BINDING, Class::Indication);
pub const BINDING_SUCCESS: u16 = msg_type(BINDING, Class::Success);
pub const BINDING_ERROR: u16 = msg_type(BINDING, Class::Error);

pub const MAPPED_ADDRESS: u16 = 0x0001;
pub const CHANGE_REQUEST: u16 = 0x0003;
pub const SOURCE_ADDRESS: u16 = 0x0004;
pub const CHANGED_ADDRESS: u16 = 0x0005;
pub const USERNAME: u16 = 0x0006;
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const CHANNEL_NUMBER: u16 = 0x000C;
pub const LIFETIME: u16 = 0x000D;
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
pub const DATA: u16 = 0x0013;
pub const REALM: u16 = 0x0014;
pub const NONCE: u16 = 0x0015;
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const RESPONSE_PORT: u16 = 0x0027;
/// RFC 6062 §6.2.1.
pub const CONNECTION_ID: u16 = 0x002A;
/// RFC 8656 §18.11, §18.12: a dual allocation's request, and why one family was not given.
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
pub const SOFTWARE: u16 = 0x8022;
pub const ALTERNATE_SERVER: u16 = 0x8023;
pub const FINGERPRINT: u16 = 0x8028;
pub const RESPONSE_ORIGIN: u16 = 0x802B;
pub const OTHER_ADDRESS: u16 = 0x802C;

/// CHANGE-REQUEST flag bits (RFC 5780 §7.2).
pub const CHANGE_IP: u32 = 0x4;
pub const CHANGE_PORT: u32 = 0x2;

/// A transaction id that differs between calls, tests and runs: a counter for uniqueness
/// within the process, mixed with the pid and the clock so two test binaries differ too.
pub fn new_tid() -> [u8; 12] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9);
    // xorshift scrambles the bits so ids do not share long prefixes.
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&x.to_be_bytes());
    t[8..].copy_from_slice(&(n as u32).to_be_bytes());
    t
}

/// Builds one STUN message attribute by attribute.
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    /// An RFC 8489 message: type, magic cookie, 96-bit transaction id.
    pub fn new(typ: u16, tid: [u8; 12]) -> Builder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&typ.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        Builder { buf }
    }

    /// An RFC 3489 message: a 128-bit transaction id and no magic cookie.
    pub fn legacy(typ: u16, tid16: [u8; 16]) -> Builder {
        assert_ne!(tid16[..4], MAGIC_COOKIE.to_be_bytes(), "not a legacy id");
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&typ.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&tid16);
        Builder { buf }
    }

    pub fn binding() -> Builder {
        Builder::new(BINDING_REQUEST, new_tid())
    }

    /// A request of `method` with transaction id `tid`.
    pub fn request(method: u16, tid: [u8; 12]) -> Builder {
        Builder::new(msg_type(method, Class::Request), tid)
    }

    pub fn attr(mut self, typ: u16, value: &[u8]) -> Builder {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
        self.set_len();
        self
    }

    pub fn change_request(self, flags: u32) -> Builder {
        self.attr(CHANGE_REQUEST, &flags.to_be_bytes())
    }

    /// RESPONSE-PORT: the port and two bytes of padding (RFC 5780 §7.5).
    pub fn response_port(self, port: u16) -> Builder {
        self.attr(RESPONSE_PORT, &port.to_be_bytes())
    }

    pub fn u32(self, typ: u16, value: u32) -> Builder {
        self.attr(typ, &value.to_be_bytes())
    }

    /// An XOR-*-ADDRESS attribute (RFC 8489 §14.2): port XOR the cookie's top half, address
    /// XOR the cookie (IPv4) or the cookie and the transaction id (IPv6).
    pub fn xor_address(self, typ: u16, addr: SocketAddr) -> Builder {
        let mask = self.xor_mask();
        let mut v = vec![0u8, if addr.is_ipv4() { 1 } else { 2 }];
        let port = addr.port().to_be_bytes();
        v.extend_from_slice(&[port[0] ^ mask[0], port[1] ^ mask[1]]);
        let ip: Vec<u8> = match addr.ip() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        v.extend(ip.iter().zip(mask.iter()).map(|(b, m)| b ^ m));
        self.attr(typ, &v)
    }

    /// MESSAGE-INTEGRITY (RFC 8489 §14.5): HMAC-SHA1 with `key` over the message so far, with
    /// the length field already counting the attribute itself.
    pub fn message_integrity(mut self, key: &[u8]) -> Builder {
        let covered = self.buf.len();
        self.buf.extend_from_slice(&MESSAGE_INTEGRITY.to_be_bytes());
        self.buf.extend_from_slice(&20u16.to_be_bytes());
        self.buf.extend_from_slice(&[0; 20]);
        self.set_len();
        let mac = hmac_sha1(key, &self.buf[..covered]);
        self.buf[covered + 4..].copy_from_slice(&mac);
        self
    }

    fn xor_mask(&self) -> [u8; 16] {
        let mut mask = [0u8; 16];
        mask.copy_from_slice(&self.buf[4..20]);
        mask
    }

    /// FINGERPRINT over everything so far, with the length field already counting it.
    pub fn fingerprint(mut self) -> Builder {
        let covered = self.buf.len();
        self.buf.extend_from_slice(&FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.set_len();
        let fp = crc32(&self.buf[..covered]) ^ 0x5354_554E;
        self.buf[covered + 4..].copy_from_slice(&fp.to_be_bytes());
        self
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - 20) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn tid(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    pub fn tid16(&self) -> [u8; 16] {
        let mut t = [0u8; 16];
        t.copy_from_slice(&self.buf[4..20]);
        t
    }

    pub fn build(self) -> Vec<u8> {
        self.buf
    }
}

/// A parsed message. Parsing checks the framing strictly; it does not interpret attributes.
#[derive(Debug, Clone)]
pub struct Msg {
    pub raw: Vec<u8>,
    pub typ: u16,
    pub attrs: Vec<(u16, Vec<u8>, usize)>,
}

impl Msg {
    pub fn parse(raw: &[u8]) -> Result<Msg, String> {
        if raw.len() < 20 {
            return Err(format!("{} bytes: shorter than a STUN header", raw.len()));
        }
        if raw[0] & 0xC0 != 0 {
            return Err(format!("first byte {:#04x}: not STUN", raw[0]));
        }
        let len = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
        if len & 3 != 0 || len + 20 != raw.len() {
            return Err(format!(
                "length field {len} does not match {} bytes of body",
                raw.len() - 20
            ));
        }
        let mut attrs = Vec::new();
        let mut off = 20;
        while off < raw.len() {
            if off + 4 > raw.len() {
                return Err(format!("attribute header cut at offset {off}"));
            }
            let typ = u16::from_be_bytes([raw[off], raw[off + 1]]);
            let vlen = usize::from(u16::from_be_bytes([raw[off + 2], raw[off + 3]]));
            let end = off + 4 + vlen.div_ceil(4) * 4;
            if end > raw.len() {
                return Err(format!("attribute {typ:#06x} runs past the message end"));
            }
            attrs.push((typ, raw[off + 4..off + 4 + vlen].to_vec(), off));
            off = end;
        }
        Ok(Msg {
            raw: raw.to_vec(),
            typ: u16::from_be_bytes([raw[0], raw[1]]),
            attrs,
        })
    }

    pub fn class(&self) -> Class {
        match ((self.typ >> 7) & 2) | ((self.typ >> 4) & 1) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        }
    }

    pub fn method(&self) -> u16 {
        (self.typ & 0x000F) | ((self.typ >> 1) & 0x0070) | ((self.typ >> 2) & 0x0F80)
    }

    pub fn has_cookie(&self) -> bool {
        self.raw[4..8] == MAGIC_COOKIE.to_be_bytes()
    }

    pub fn tid(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.raw[8..20]);
        t
    }

    pub fn tid16(&self) -> [u8; 16] {
        let mut t = [0u8; 16];
        t.copy_from_slice(&self.raw[4..20]);
        t
    }

    pub fn get(&self, typ: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(t, _, _)| *t == typ)
            .map(|(_, v, _)| v.as_slice())
    }

    pub fn count(&self, typ: u16) -> usize {
        self.attrs.iter().filter(|(t, _, _)| *t == typ).count()
    }

    pub fn types(&self) -> Vec<u16> {
        self.attrs.iter().map(|(t, _, _)| *t).collect()
    }

    pub fn address(&self, typ: u16) -> Option<SocketAddr> {
        self.get(typ).map(|v| decode_address(v, None))
    }

    /// Every address attribute of type `typ` (MAPPED-ADDRESS style), in order.
    pub fn addresses(&self, typ: u16) -> Vec<SocketAddr> {
        self.attrs
            .iter()
            .filter(|(t, _, _)| *t == typ)
            .map(|(_, v, _)| decode_address(v, None))
            .collect()
    }

    /// An XOR-*-ADDRESS attribute of type `typ`, decoded.
    pub fn xor_address(&self, typ: u16) -> Option<SocketAddr> {
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(&self.tid());
        self.get(typ).map(|v| decode_address(v, Some(&mask)))
    }

    /// Every XOR-*-ADDRESS attribute of type `typ`, decoded, in order (a dual allocation's
    /// answer has two XOR-RELAYED-ADDRESS).
    pub fn xor_addresses(&self, typ: u16) -> Vec<SocketAddr> {
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(&self.tid());
        self.attrs
            .iter()
            .filter(|(t, _, _)| *t == typ)
            .map(|(_, v, _)| decode_address(v, Some(&mask)))
            .collect()
    }

    pub fn xor_mapped(&self) -> Option<SocketAddr> {
        self.xor_address(XOR_MAPPED_ADDRESS)
    }

    /// A four-byte attribute (LIFETIME) as a number.
    pub fn u32(&self, typ: u16) -> Option<u32> {
        self.get(typ).map(|v| {
            assert_eq!(v.len(), 4, "attribute {typ:#06x} of {} bytes", v.len());
            u32::from_be_bytes([v[0], v[1], v[2], v[3]])
        })
    }

    pub fn software(&self) -> Option<String> {
        self.get(SOFTWARE)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// `(code, reason)` of ERROR-CODE.
    pub fn error_code(&self) -> Option<(u16, String)> {
        self.get(ERROR_CODE).map(|v| {
            assert!(v.len() >= 4, "ERROR-CODE of {} bytes", v.len());
            let code = u16::from(v[2] & 0x07) * 100 + u16::from(v[3]);
            (code, String::from_utf8_lossy(&v[4..]).into_owned())
        })
    }

    pub fn unknown_attributes(&self) -> Vec<u16> {
        self.get(UNKNOWN_ATTRIBUTES)
            .map(|v| {
                assert_eq!(v.len() % 2, 0, "UNKNOWN-ATTRIBUTES of odd length");
                v.chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks FINGERPRINT: present, last, four bytes, and equal to CRC-32 of everything
    /// before it XOR 0x5354554E. Returns why not, if not.
    pub fn check_fingerprint(&self) -> Result<(), String> {
        let Some((typ, value, off)) = self.attrs.last() else {
            return Err("no attributes, so no FINGERPRINT".into());
        };
        if *typ != FINGERPRINT {
            return Err(format!(
                "last attribute is {typ:#06x}, not FINGERPRINT ({:?})",
                self.types()
            ));
        }
        if self.count(FINGERPRINT) != 1 {
            return Err("more than one FINGERPRINT".into());
        }
        if value.len() != 4 {
            return Err(format!("FINGERPRINT of {} bytes", value.len()));
        }
        let want = crc32(&self.raw[..*off]) ^ 0x5354_554E;
        let got = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
        if want != got {
            return Err(format!("FINGERPRINT {got:#010x}, expected {want:#010x}"));
        }
        Ok(())
    }
}

impl Msg {
    /// Checks MESSAGE-INTEGRITY with `key`: present, twenty bytes, followed by nothing but
    /// FINGERPRINT, and equal to HMAC-SHA1 over the message before it with the length field
    /// counting up to its end. Returns why not, if not.
    pub fn check_message_integrity(&self, key: &[u8]) -> Result<(), String> {
        let Some(i) = self
            .attrs
            .iter()
            .position(|(t, _, _)| *t == MESSAGE_INTEGRITY)
        else {
            return Err(format!("no MESSAGE-INTEGRITY ({:x?})", self.types()));
        };
        let (_, value, off) = &self.attrs[i];
        if value.len() != 20 {
            return Err(format!("MESSAGE-INTEGRITY of {} bytes", value.len()));
        }
        if !self.attrs[i + 1..]
            .iter()
            .all(|(t, _, _)| *t == FINGERPRINT)
        {
            return Err(format!(
                "attributes after MESSAGE-INTEGRITY: {:x?}",
                self.types()
            ));
        }
        let mut covered = self.raw[..*off].to_vec();
        let len = (*off + 24 - 20) as u16;
        covered[2..4].copy_from_slice(&len.to_be_bytes());
        if hmac_sha1(key, &covered)[..] != value[..] {
            return Err("MESSAGE-INTEGRITY does not match the key".into());
        }
        Ok(())
    }
}

/// HMAC-SHA1, as MESSAGE-INTEGRITY and TURN REST API passwords use it.
pub fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut out = [0u8; 20];
    out.copy_from_slice(aws_lc_rs::hmac::sign(&k, data).as_ref());
    out
}

/// The long-term credential key (RFC 8489 §9.2.2): MD5(username ":" realm ":" password).
pub fn long_term_key(user: &[u8], realm: &[u8], password: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(user);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

/// The password of TURN REST API credentials: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &[u8]) -> String {
    b64(&hmac_sha1(secret, username))
}

/// Standard base64 with padding, written here so the tests share no encoder with the server.
pub fn b64(data: &[u8]) -> String {
    let t = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let v = c
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, b)| a | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= c.len() {
                t[((v >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// MAPPED-ADDRESS style value, XORed with `mask` for the XOR-* attributes.
fn decode_address(v: &[u8], mask: Option<&[u8; 16]>) -> SocketAddr {
    assert!(v.len() >= 4, "address attribute of {} bytes", v.len());
    let family = v[1];
    let want = match family {
        1 => 8,
        2 => 20,
        f => panic!("address family {f}"),
    };
    assert_eq!(
        v.len(),
        want,
        "address attribute length for family {family}"
    );
    let zero = [0u8; 16];
    let m = mask.unwrap_or(&zero);
    let port = u16::from_be_bytes([v[2] ^ m[0], v[3] ^ m[1]]);
    let ip = if family == 1 {
        let mut a = [0u8; 4];
        for i in 0..4 {
            a[i] = v[4 + i] ^ m[i];
        }
        IpAddr::V4(Ipv4Addr::from(a))
    } else {
        let mut a = [0u8; 16];
        for i in 0..16 {
            a[i] = v[4 + i] ^ m[i];
        }
        IpAddr::V6(Ipv6Addr::from(a))
    };
    SocketAddr::new(ip, port)
}

/// CRC-32 (ISO-HDLC, the one FINGERPRINT uses), bit by bit: slow and obviously right.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The codec against the test vectors of RFC 5769, so a bug in it cannot hide a server bug.
#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const TID: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// §2.1: a request with short-term credentials (password "VOkJxbRl1RmTxUk/WvJxBt").
    #[test]
    fn message_integrity_of_the_sample_request() {
        let raw = hex("00010058 2112a442 b7e7a701 bc34d686 fa87dfae \
             80220010 5354554e 20746573 7420636c 69656e74 \
             00240004 6e0001ff \
             80290008 932ff9b1 51263b36 \
             00060009 6576746a 3a683676 59202020 \
             00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2 \
             80280004 e57a3bcf");
        let m = Msg::parse(&raw).unwrap();
        assert_eq!((m.class(), m.method()), (Class::Request, BINDING));
        m.check_fingerprint().unwrap();
        m.check_message_integrity(b"VOkJxbRl1RmTxUk/WvJxBt")
            .unwrap();
        assert!(m
            .check_message_integrity(b"VOkJxbRl1RmTxUk/WvJxBT")
            .is_err());

        // Built again attribute by attribute: the same bytes, bar the padding (spaces there).
        let built = Builder::new(BINDING_REQUEST, TID)
            .attr(SOFTWARE, b"STUN test client")
            .attr(0x0024, &[0x6e, 0x00, 0x01, 0xff])
            .attr(0x8029, &[0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36])
            .attr(USERNAME, b"evtj:h6vY")
            .message_integrity(b"VOkJxbRl1RmTxUk/WvJxBt")
            .fingerprint()
            .build();
        let mut want = raw.clone();
        want[73..76].copy_from_slice(&[0, 0, 0]);
        let mac = hmac_sha1(b"VOkJxbRl1RmTxUk/WvJxBt", &{
            let mut c = want[..76].to_vec();
            c[2..4].copy_from_slice(&(76 + 24 - 20u16).to_be_bytes());
            c
        });
        want[80..100].copy_from_slice(&mac);
        let fp = crc32(&want[..100]) ^ 0x5354_554E;
        want[104..].copy_from_slice(&fp.to_be_bytes());
        assert_eq!(built, want);
    }

    /// §2.2 and §2.3: XOR-MAPPED-ADDRESS for IPv4 and IPv6, both ways.
    #[test]
    fn xor_addresses_of_the_sample_responses() {
        for (addr, value) in [
            ("192.0.2.1:32853", "0001a147 e112a643"),
            (
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
                "0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9",
            ),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let m = Builder::new(BINDING_SUCCESS, TID)
                .xor_address(XOR_MAPPED_ADDRESS, addr)
                .build();
            let m = Msg::parse(&m).unwrap();
            assert_eq!(m.get(XOR_MAPPED_ADDRESS), Some(&hex(value)[..]));
            assert_eq!(m.xor_mapped(), Some(addr));
            assert_eq!(m.class(), Class::Success);
        }
    }

    #[test]
    fn message_types_spread_class_bits() {
        assert_eq!(msg_type(ALLOCATE, Class::Request), 0x0003);
        assert_eq!(msg_type(ALLOCATE, Class::Error), 0x0113);
        assert_eq!(msg_type(SEND, Class::Indication), 0x0016);
        assert_eq!(msg_type(DATA_METHOD, Class::Indication), 0x0017);
        assert_eq!(msg_type(CHANNEL_BIND, Class::Success), 0x0109);
        assert_eq!(msg_type(0xFFF, Class::Error), 0x3FFF);
    }

    #[test]
    fn base64_and_the_long_term_key() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        // RFC 8489 §9.2.2: MD5("user:realm:pass").
        assert_eq!(
            long_term_key(b"user", b"realm", b"pass"),
            <[u8; 16]>::try_from(&hex("8493fbc53ba582fb4c044c456bdc40eb")[..]).unwrap()
        );
    }
}
