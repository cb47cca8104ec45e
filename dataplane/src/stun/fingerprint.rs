//! FINGERPRINT (RFC 8489 §14.7): CRC-32 of the message, XORed with a STUN-specific constant.

/// XORed into the CRC so that a STUN message carried inside another CRC-32-protected
/// protocol does not produce a FINGERPRINT that looks valid to that protocol too.
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Value length of the FINGERPRINT attribute.
pub const FINGERPRINT_LEN: usize = 4;

/// ISO-HDLC CRC-32 (the one Ethernet and zlib use, reflected polynomial 0xEDB88320), built
/// at compile time so that the hot path is a table lookup with nothing to initialise.
const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Continues a CRC-32 over more bytes; start from `0` and chain calls to hash a message that
/// is not contiguous (e.g. a header copy with an adjusted length, then the body).
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8);
    }
    !c
}

/// Plain CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// The FINGERPRINT value for a message whose bytes, up to (not including) the FINGERPRINT
/// attribute, are `data`. The header length field in `data` must already count the
/// FINGERPRINT attribute, as RFC 8489 §14.7 requires.
pub fn fingerprint(data: &[u8]) -> u32 {
    crc32(data) ^ FINGERPRINT_XOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The standard CRC-32 check value for "123456789".
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn chained_equals_whole() {
        let data = b"The quick brown fox jumps over the lazy dog";
        assert_eq!(crc32(data), 0x414F_A339);
        let (a, b) = data.split_at(17);
        assert_eq!(crc32_update(crc32(a), b), crc32(data));
    }
}
