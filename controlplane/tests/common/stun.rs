//! A deliberately separate, minimal STUN codec for the tests.
//!
//! It shares no code with `portico_dataplane::stun`: a test that built its requests and
//! checked its answers with the server's own codec would pass whenever encoder and decoder
//! agree with each other, even if both were wrong. This one is written from RFC 8489 / RFC
//! 3489 / RFC 5780 directly and is strict about what it accepts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;

pub const BINDING_REQUEST: u16 = 0x0001;
pub const BINDING_INDICATION: u16 = 0x0011;
pub const BINDING_SUCCESS: u16 = 0x0101;
pub const BINDING_ERROR: u16 = 0x0111;

pub const MAPPED_ADDRESS: u16 = 0x0001;
pub const CHANGE_REQUEST: u16 = 0x0003;
pub const SOURCE_ADDRESS: u16 = 0x0004;
pub const CHANGED_ADDRESS: u16 = 0x0005;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const RESPONSE_PORT: u16 = 0x0027;
pub const SOFTWARE: u16 = 0x8022;
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

    pub fn xor_mapped(&self) -> Option<SocketAddr> {
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(&self.tid());
        self.get(XOR_MAPPED_ADDRESS)
            .map(|v| decode_address(v, Some(&mask)))
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
