//! TURN on the HTTPS port (`proxy.turn_on_https`): whether a connection is a TURN client,
//! from its ClientHello (ALPN `stun.turn`, RFC 7443) before any TLS byte is consumed, or
//! from its first decrypted bytes (a STUN header with the magic cookie, or a ChannelData
//! header). Sans-IO: bytes in, verdicts out.

/// The ALPN protocol of TURN over TLS.
pub const ALPN_TURN: &[u8] = b"stun.turn";
/// STUN's magic cookie (RFC 8489 §5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Largest ChannelData payload taken for TURN: what the dataplane frames on a stream (its
/// 2048-byte buffers less 80 bytes of headroom hold a 4-byte header and 1964 bytes). An HTTP
/// request never looks like a smaller one: its bytes 3 and 4 are printable, a length of at
/// least 0x2020.
const MAX_CHANNEL_DATA: usize = 1964;
/// How much of a ClientHello is looked at (one TLS record at most).
pub const HELLO_PEEK: usize = 5 + 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    NeedMore,
    Turn,
    NotTurn,
}

/// Whether the first decrypted bytes of a connection are TURN.
pub fn first_bytes(b: &[u8]) -> Verdict {
    let Some(&first) = b.first() else {
        return Verdict::NeedMore;
    };
    match first & 0xC0 {
        // STUN: the top two bits zero, the magic cookie at 4..8.
        0x00 => match b.get(4..8) {
            None => Verdict::NeedMore,
            Some(c) if c == MAGIC_COOKIE => Verdict::Turn,
            Some(_) => Verdict::NotTurn,
        },
        // ChannelData: channel 0x4000-0x7FFF, then a length a TURN frame can have.
        0x40 => match b.get(2..4) {
            None => Verdict::NeedMore,
            Some(l) if usize::from(u16::from_be_bytes([l[0], l[1]])) <= MAX_CHANNEL_DATA => {
                Verdict::Turn
            }
            Some(_) => Verdict::NotTurn,
        },
        _ => Verdict::NotTurn,
    }
}

/// Whether the ClientHello at the start of `b` (the bytes peeked so far) offers ALPN
/// `stun.turn`. Only a ClientHello within its first record is read (every client we know
/// sends it so); anything else is `NotTurn`, and goes on to the HTTPS handshake as before.
pub fn client_hello(b: &[u8]) -> Verdict {
    if b.len() < 5 {
        // A TLS record starts with 0x16 (handshake); anything else is not a ClientHello.
        return match b.first() {
            Some(0x16) | None => Verdict::NeedMore,
            Some(_) => Verdict::NotTurn,
        };
    }
    if b[0] != 0x16 || b[1] != 0x03 {
        return Verdict::NotTurn;
    }
    let record_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if record_len + 5 > HELLO_PEEK {
        return Verdict::NotTurn;
    }
    let Some(record) = b.get(5..5 + record_len) else {
        return Verdict::NeedMore;
    };
    match alpn_offers(record, ALPN_TURN) {
        Some(true) => Verdict::Turn,
        _ => Verdict::NotTurn,
    }
}

/// Reads the handshake message in `record`; `None` when it is not a complete ClientHello.
fn alpn_offers(record: &[u8], wanted: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let mut body = Reader(r.take(len)?);
    body.take(2 + 32)?; // legacy_version, random
    let n = usize::from(body.u8()?);
    body.take(n)?; // session id
    let n = body.u16()?;
    body.take(n)?; // cipher suites
    let n = usize::from(body.u8()?);
    body.take(n)?; // compression methods
    if body.0.is_empty() {
        return Some(false); // no extensions
    }
    let n = body.u16()?;
    let mut exts = Reader(body.take(n)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let n = exts.u16()?;
        let data = exts.take(n)?;
        if kind != 16 {
            continue;
        }
        // application_layer_protocol_negotiation: a list of 8-bit-length names.
        let mut d = Reader(data);
        let n = d.u16()?;
        let mut list = Reader(d.take(n)?);
        while !list.0.is_empty() {
            let n = usize::from(list.u8()?);
            if list.take(n)? == wanted {
                return Some(true);
            }
        }
        return Some(false);
    }
    Some(false)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello from rustls offering `alpn`.
    fn hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("turn.example").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(c), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn alpn_in_the_client_hello() {
        let turn = hello(&[b"h2", ALPN_TURN]);
        assert_eq!(client_hello(&turn), Verdict::Turn);
        for n in 0..turn.len() {
            assert_eq!(client_hello(&turn[..n]), Verdict::NeedMore, "{n} bytes");
        }
        assert_eq!(client_hello(&hello(&[b"http/1.1"])), Verdict::NotTurn);
        assert_eq!(client_hello(&hello(&[])), Verdict::NotTurn);
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Verdict::NotTurn);
        // Broken lengths inside a complete record: not TURN, no panic.
        let mut broken = turn.clone();
        for i in 5..broken.len() {
            broken[i] ^= 0xFF;
            let _ = client_hello(&broken);
            broken[i] ^= 0xFF;
        }
    }

    #[test]
    fn first_bytes_of_stun_channel_data_and_http() {
        let binding = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3];
        assert_eq!(first_bytes(&binding), Verdict::Turn);
        assert_eq!(first_bytes(&binding[..7]), Verdict::NeedMore);
        assert_eq!(first_bytes(&[0x40, 0x01, 0x00, 0x64]), Verdict::Turn);
        assert_eq!(first_bytes(&[0x40, 0x01]), Verdict::NeedMore);
        // The largest frame the dataplane takes, and one byte more.
        assert_eq!(first_bytes(&[0x40, 0x01, 0x07, 0xAC]), Verdict::Turn);
        assert_eq!(first_bytes(&[0x40, 0x01, 0x07, 0xAD]), Verdict::NotTurn);
        for m in [
            "GET / HTTP/1.1",
            "HEAD /",
            "POST /x",
            "PUT /",
            "DELETE /",
            "OPTIONS *",
        ] {
            assert_eq!(first_bytes(m.as_bytes()), Verdict::NotTurn, "{m}");
        }
        // RFC 3489 STUN (no cookie) is not taken.
        assert_eq!(first_bytes(&[0, 1, 0, 0, 9, 9, 9, 9]), Verdict::NotTurn);
        assert_eq!(first_bytes(&[]), Verdict::NeedMore);
    }
}
