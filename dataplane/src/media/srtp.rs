//! The SRTP check a media leg with a key makes before it learns a new source (RFC 3711).
//!
//! Only authentication is checked, never decryption: the relay forwards SRTP as it is. The
//! session authentication keys are derived once, when the session is created, from the
//! master key and salt signalling gave (`a=crypto ... inline:`), with the AES-CM PRF of
//! §4.3.3 at key derivation rate 0 and index 0 (§4.3.1): label 0x01 for SRTP, 0x04 for
//! SRTCP. An SRTP packet's tag (AES_CM_128_HMAC_SHA1_80: 80 bits) is HMAC-SHA1 over the packet
//! without its tag followed by the rollover counter, 0 for a stream's first packets (§4.2);
//! an SRTCP packet's covers the packet up to and including its E flag and index (§3.4).

use aws_lc_rs::cipher::{EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128};
use aws_lc_rs::error::Unspecified;
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;

/// Master key (16 bytes) and master salt (14 bytes), as in SDP's `inline:`.
pub const MASTER_LEN: usize = 30;
/// AES_CM_128_HMAC_SHA1_80's tag length.
const TAG_LEN: usize = 10;
/// The key derivation labels (§4.3.1, §4.3.2).
pub const LABEL_RTP_AUTH: u8 = 0x01;
pub const LABEL_RTCP_AUTH: u8 = 0x04;

/// `len` bytes of the key derived for `label` from `master` (key ‖ salt), kdr 0, index 0:
/// AES-CM keystream under the master key, IV = (salt XOR label·2^48)·2^16.
pub fn derive(master: &[u8; MASTER_LEN], label: u8, out: &mut [u8]) -> Result<(), Unspecified> {
    let (key, salt) = master.split_at(16);
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(salt);
    iv[7] ^= label;
    let key = EncryptingKey::ctr(UnboundCipherKey::new(&AES_128, key)?)?;
    out.fill(0);
    key.less_safe_encrypt(out, EncryptionContext::Iv128(FixedLength::from(iv)))?;
    Ok(())
}

/// A leg's SRTP and SRTCP authentication keys.
pub struct LegKey {
    rtp: hmac::Key,
    rtcp: hmac::Key,
}

impl std::fmt::Debug for LegKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LegKey(..)")
    }
}

impl LegKey {
    pub fn new(master: &[u8; MASTER_LEN]) -> Option<LegKey> {
        let mut a = [0u8; 20];
        let mut b = [0u8; 20];
        derive(master, LABEL_RTP_AUTH, &mut a).ok()?;
        derive(master, LABEL_RTCP_AUTH, &mut b).ok()?;
        let alg = hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY;
        Some(LegKey {
            rtp: hmac::Key::new(alg, &a),
            rtcp: hmac::Key::new(alg, &b),
        })
    }

    /// Whether `packet`'s tag verifies: SRTP with rollover counter 0 (`rtcp` false), or
    /// SRTCP. Too short a packet does not.
    pub fn verify(&self, packet: &[u8], rtcp: bool) -> bool {
        // RTP: 12-byte header and the tag; RTCP: 8-byte header, E‖index (4) and the tag.
        const MIN: usize = 12 + TAG_LEN;
        if packet.len() < MIN || packet[0] >> 6 != 2 {
            return false;
        }
        let (body, tag) = packet.split_at(packet.len() - TAG_LEN);
        let full = if rtcp {
            hmac::sign(&self.rtcp, body)
        } else {
            let mut c = hmac::Context::with_key(&self.rtp);
            c.update(body);
            c.update(&0u32.to_be_bytes());
            c.sign()
        };
        // Constant time: the tag is a secret until it is right.
        let got = &full.as_ref()[..TAG_LEN];
        got.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

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

    fn master() -> [u8; MASTER_LEN] {
        let mut m = [0u8; MASTER_LEN];
        m[..16].copy_from_slice(&hex("E1F97A0D3E018BE0D64FA32C06DE4139"));
        m[16..].copy_from_slice(&hex("0EC675AD498AFEEBB6960B3AABE6"));
        m
    }

    /// RFC 3711 Appendix B.3, key derivation test vectors.
    #[test]
    fn srtp_key_derivation_matches_rfc3711_b3() {
        let m = master();
        let mut k = [0u8; 16];
        derive(&m, 0x00, &mut k).unwrap();
        assert_eq!(k.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut s = [0u8; 14];
        derive(&m, 0x02, &mut s).unwrap();
        assert_eq!(s.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        let mut a = [0u8; 94];
        derive(&m, 0x01, &mut a).unwrap();
        assert_eq!(
            a.to_vec(),
            hex(
                "CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4 8F0A0ACF3C34E2359E6CDBCE
                 E049646C43D9327AD175578EF7227098 6371C10C9A369AC2F94A8C5F
                 BCDDDC256D6E919A48B610EF17C2041E 474035766B68642C59BBFC2F
                 34DB60DBDFB2"
            )
        );
    }

    #[test]
    fn an_srtp_tag_verifies_only_when_right() {
        let m = master();
        let key = LegKey::new(&m).unwrap();
        let mut auth = [0u8; 20];
        derive(&m, LABEL_RTP_AUTH, &mut auth).unwrap();
        let mut p = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 0xA];
        p.extend([7u8; 160]);
        let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &auth);
        let mut signed = p.clone();
        signed.extend([0, 0, 0, 0]);
        let tag = hmac::sign(&k, &signed);
        p.extend(&tag.as_ref()[..10]);
        assert!(key.verify(&p, false));
        assert!(!key.verify(&p, true), "the SRTCP key is another");
        let mut bad = p.clone();
        bad[20] ^= 1;
        assert!(!key.verify(&bad, false), "payload changed");
        let n = bad.len();
        assert!(!key.verify(&p[..n - 1], false), "tag cut");
        assert!(!key.verify(&p[..12], false), "too short");
        assert!(!key.verify(&[], false));
    }
}
