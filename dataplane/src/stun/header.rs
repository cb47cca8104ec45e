//! The fixed 20-byte STUN header: message type (class + method), length, cookie, transaction id.

/// RFC 5389 §6: fixed value that tells RFC 5389/8489 agents apart from RFC 3489 ones and
/// lets STUN be demultiplexed from other protocols on the same port.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Every STUN message starts with exactly this many header bytes.
pub const HEADER_LEN: usize = 20;

/// Largest method number: the message type has 14 bits, two of which carry the class.
pub const MAX_METHOD: u16 = 0x0FFF;

/// Method numbers (IANA "STUN Methods" registry).
///
/// Plain `u16` constants rather than an enum because a server must still be able to name,
/// and answer with 400, a method it does not implement.
pub mod method {
    /// RFC 8489.
    pub const BINDING: u16 = 0x001;
    /// RFC 8656 (TURN).
    pub const ALLOCATE: u16 = 0x003;
    /// RFC 8656.
    pub const REFRESH: u16 = 0x004;
    /// RFC 8656.
    pub const SEND: u16 = 0x006;
    /// RFC 8656.
    pub const DATA: u16 = 0x007;
    /// RFC 8656.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// RFC 8656.
    pub const CHANNEL_BIND: u16 = 0x009;
    /// RFC 6062 (TURN over TCP).
    pub const CONNECT: u16 = 0x00A;
    /// RFC 6062.
    pub const CONNECTION_BIND: u16 = 0x00B;
    /// RFC 6062.
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// The two class bits of the message type (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    SuccessResponse,
    ErrorResponse,
}

impl Class {
    /// The class as the two-bit number C1C0.
    pub const fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::SuccessResponse => 0b10,
            Class::ErrorResponse => 0b11,
        }
    }

    /// Inverse of [`Class::bits`]; only the low two bits are looked at.
    pub const fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::SuccessResponse,
            _ => Class::ErrorResponse,
        }
    }
}

/// Builds the 14-bit message type. The class bits sit at positions 4 and 8, between method
/// bits, because RFC 3489 had already assigned 0x0001/0x0101/0x0111 to Binding's classes
/// and RFC 5389 kept those values. Method bits above [`MAX_METHOD`] are dropped.
pub const fn message_type(class: Class, method: u16) -> u16 {
    let m = method & MAX_METHOD;
    let c = class.bits();
    ((m & 0x0F80) << 2) | ((m & 0x0070) << 1) | (m & 0x000F) | ((c & 0b10) << 7) | ((c & 0b01) << 4)
}

/// Splits a message type into class and method; the two top (non-type) bits are ignored.
pub const fn split_message_type(typ: u16) -> (Class, u16) {
    let method = ((typ & 0x3E00) >> 2) | ((typ & 0x00E0) >> 1) | (typ & 0x000F);
    let class = ((typ >> 7) & 0b10) | ((typ >> 4) & 0b01);
    (Class::from_bits(class), method)
}

/// Total size of the STUN message whose header starts `buf`, for framing STUN over a byte
/// stream (RFC 8489 §6.2.2, RFC 6062). Only the first four bytes are needed, so a reader can
/// decide how much more to wait for as early as possible. `None` when the bytes cannot start
/// a STUN message (top bits set, or a length that is not a multiple of 4); the cookie is not
/// checked, since RFC 3489 clients omit it and the full parse decides what to do about that.
pub fn message_len_from_header(buf: &[u8]) -> Option<usize> {
    let (first, len) = match buf {
        [b0, _, l0, l1, ..] => (*b0, u16::from_be_bytes([*l0, *l1])),
        _ => return None,
    };
    if first & 0xC0 != 0 || len % 4 != 0 {
        return None;
    }
    Some(HEADER_LEN + usize::from(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_message_types() {
        assert_eq!(message_type(Class::Request, method::BINDING), 0x0001);
        assert_eq!(message_type(Class::Indication, method::BINDING), 0x0011);
        assert_eq!(
            message_type(Class::SuccessResponse, method::BINDING),
            0x0101
        );
        assert_eq!(message_type(Class::ErrorResponse, method::BINDING), 0x0111);
        assert_eq!(message_type(Class::Request, method::ALLOCATE), 0x0003);
        assert_eq!(message_type(Class::ErrorResponse, method::ALLOCATE), 0x0113);
        assert_eq!(message_type(Class::Indication, method::SEND), 0x0016);
        assert_eq!(message_type(Class::Indication, method::DATA), 0x0017);
        assert_eq!(
            message_type(Class::Request, method::CONNECTION_ATTEMPT),
            0x000C
        );
        assert_eq!(
            message_type(Class::SuccessResponse, method::CHANNEL_BIND),
            0x0109
        );
    }

    #[test]
    fn every_type_round_trips() {
        for class in [
            Class::Request,
            Class::Indication,
            Class::SuccessResponse,
            Class::ErrorResponse,
        ] {
            for m in 0..=MAX_METHOD {
                let t = message_type(class, m);
                assert_eq!(t & 0xC000, 0);
                assert_eq!(split_message_type(t), (class, m));
            }
        }
        for t in 0..=0x3FFFu16 {
            let (c, m) = split_message_type(t);
            assert_eq!(message_type(c, m), t);
        }
    }

    #[test]
    fn framing_length() {
        assert_eq!(message_len_from_header(&[0, 1, 0, 8]), Some(28));
        assert_eq!(message_len_from_header(&[0, 1, 0]), None);
        assert_eq!(message_len_from_header(&[0x40, 1, 0, 8]), None);
        assert_eq!(message_len_from_header(&[0, 1, 0, 6]), None);
        assert_eq!(
            message_len_from_header(&[0, 1, 0xFF, 0xFC, 9]),
            Some(20 + 0xFFFC)
        );
    }
}
