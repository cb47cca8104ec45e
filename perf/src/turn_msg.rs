//! The TURN client's messages (RFC 8656), built and read with the dataplane's own STUN codec:
//! requests with long-term credentials, Send indications, ChannelData framing, and the
//! reading of responses and Data indications.

use std::net::SocketAddr;

use portico_dataplane::stun::{
    attr, long_term_key_md5, method, verify_message_integrity, Class, Message, MessageWriter,
};
use portico_dataplane::turn::auth::rest_password;

/// REQUESTED-TRANSPORT value for UDP (protocol 17 in the first byte).
const UDP_TRANSPORT: u32 = 17 << 24;

/// User name and password, from static credentials or the TURN REST API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn long_term(user: &str, password: &str) -> Credentials {
        Credentials {
            username: user.to_string(),
            password: password.to_string(),
        }
    }

    /// TURN REST API ephemeral credentials: user name `expiry:name`, password
    /// base64(HMAC-SHA1(secret, user name)); valid for `ttl_s` from `now_unix`.
    pub fn rest(secret: &str, name: &str, now_unix: u64, ttl_s: u64) -> Credentials {
        let username = format!("{}:{name}", now_unix + ttl_s);
        Credentials {
            password: rest_password(secret.as_bytes(), username.as_bytes()),
            username,
        }
    }

    /// The MD5 long-term key for `realm`.
    pub fn key(&self, realm: &[u8]) -> [u8; 16] {
        long_term_key_md5(self.username.as_bytes(), realm, self.password.as_bytes())
    }
}

/// What goes into a request's authentication attributes.
pub struct Auth<'a> {
    pub username: &'a str,
    pub realm: &'a [u8],
    pub nonce: &'a [u8],
    pub key: &'a [u8; 16],
}

/// The requests the generator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// LIFETIME is left out when `None` (the server's default applies).
    Allocate {
        lifetime: Option<u32>,
    },
    /// Lifetime 0 deletes the allocation.
    Refresh {
        lifetime: u32,
    },
    CreatePermission {
        peer: SocketAddr,
    },
    ChannelBind {
        number: u16,
        peer: SocketAddr,
    },
}

impl Request {
    pub fn method(&self) -> u16 {
        match self {
            Request::Allocate { .. } => method::ALLOCATE,
            Request::Refresh { .. } => method::REFRESH,
            Request::CreatePermission { .. } => method::CREATE_PERMISSION,
            Request::ChannelBind { .. } => method::CHANNEL_BIND,
        }
    }
}

fn werr(e: impl std::fmt::Display) -> String {
    format!("building a TURN message: {e}")
}

/// Writes `req` (with MESSAGE-INTEGRITY when `auth` is given, then FINGERPRINT) into `buf`;
/// returns its length.
pub fn write_request(
    buf: &mut [u8],
    tid: &[u8; 12],
    req: Request,
    auth: Option<&Auth<'_>>,
) -> Result<usize, String> {
    let mut w = MessageWriter::new(buf, Class::Request, req.method(), tid).map_err(werr)?;
    match req {
        Request::Allocate { lifetime } => {
            w.add_u32(attr::REQUESTED_TRANSPORT, UDP_TRANSPORT)
                .map_err(werr)?;
            if let Some(l) = lifetime {
                w.add_u32(attr::LIFETIME, l).map_err(werr)?;
            }
        }
        Request::Refresh { lifetime } => w.add_u32(attr::LIFETIME, lifetime).map_err(werr)?,
        Request::CreatePermission { peer } => w
            .add_xor_address(attr::XOR_PEER_ADDRESS, peer)
            .map_err(werr)?,
        Request::ChannelBind { number, peer } => {
            w.add_u32(attr::CHANNEL_NUMBER, u32::from(number) << 16)
                .map_err(werr)?;
            w.add_xor_address(attr::XOR_PEER_ADDRESS, peer)
                .map_err(werr)?;
        }
    }
    if let Some(a) = auth {
        w.add_attribute(attr::USERNAME, a.username.as_bytes())
            .map_err(werr)?;
        w.add_attribute(attr::REALM, a.realm).map_err(werr)?;
        w.add_attribute(attr::NONCE, a.nonce).map_err(werr)?;
        w.add_message_integrity(a.key).map_err(werr)?;
    }
    w.add_fingerprint().map_err(werr)?;
    Ok(w.finish())
}

/// Writes a Send indication carrying `data` to `peer`; returns its length.
pub fn write_send(
    buf: &mut [u8],
    tid: &[u8; 12],
    peer: SocketAddr,
    data: &[u8],
) -> Result<usize, String> {
    let mut w = MessageWriter::new(buf, Class::Indication, method::SEND, tid).map_err(werr)?;
    w.add_xor_address(attr::XOR_PEER_ADDRESS, peer)
        .map_err(werr)?;
    w.add_attribute(attr::DATA, data).map_err(werr)?;
    Ok(w.finish())
}

/// Writes the 4-byte ChannelData header for `len` bytes of data that follow it. No padding:
/// RFC 8656 §12.5 makes it optional over UDP, and 4-byte multiples (RTP sizes) need none.
pub fn write_channel_header(buf: &mut [u8], number: u16, len: usize) -> bool {
    let (Some(h), Ok(len)) = (buf.get_mut(..4), u16::try_from(len)) else {
        return false;
    };
    h[..2].copy_from_slice(&number.to_be_bytes());
    h[2..].copy_from_slice(&len.to_be_bytes());
    true
}

/// The data of a ChannelData message on `number`, if `datagram` is one.
pub fn channel_data(datagram: &[u8], number: u16) -> Option<&[u8]> {
    let h = datagram.get(..4)?;
    if u16::from_be_bytes([h[0], h[1]]) != number {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    datagram.get(4..4 + len)
}

/// Whether a datagram is ChannelData (first two bits 01) rather than STUN (00).
pub fn is_channel_data(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0xC0 == 0x40)
}

/// The peer and data of a Data indication.
pub fn data_indication<'a>(m: &Message<'a>) -> Option<(SocketAddr, &'a [u8])> {
    if m.class() != Class::Indication || m.method() != method::DATA {
        return None;
    }
    let peer =
        attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS)?, &m.transaction_id()).ok()?;
    Some((peer, m.get(attr::DATA)?))
}

/// What a response to one of our requests says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Success {
        relayed: Option<SocketAddr>,
        lifetime: Option<u32>,
    },
    /// 401 or 438 with the REALM and NONCE to retry with.
    Challenge {
        code: u16,
        realm: Vec<u8>,
        nonce: Vec<u8>,
    },
    Error {
        code: u16,
    },
    /// A success response whose MESSAGE-INTEGRITY did not verify with our key, or an error
    /// response without a readable ERROR-CODE.
    Invalid,
}

/// Reads a response to a request of method `expect_method`; `key` checks MESSAGE-INTEGRITY
/// of success responses when we sent credentials (a real client must not trust an
/// unauthenticated success).
pub fn read_reply(m: &Message<'_>, expect_method: u16, key: Option<&[u8; 16]>) -> Reply {
    if m.method() != expect_method {
        return Reply::Invalid;
    }
    match m.class() {
        Class::SuccessResponse => {
            if let Some(k) = key {
                if verify_message_integrity(m, k).is_err() {
                    return Reply::Invalid;
                }
            }
            let tid = m.transaction_id();
            Reply::Success {
                relayed: m
                    .get(attr::XOR_RELAYED_ADDRESS)
                    .and_then(|v| attr::decode_xor_address(v, &tid).ok()),
                lifetime: m.get(attr::LIFETIME).and_then(|v| attr::decode_u32(v).ok()),
            }
        }
        Class::ErrorResponse => {
            let Some(code) = m
                .get(attr::ERROR_CODE)
                .and_then(|v| attr::decode_error_code(v).ok())
                .map(|(c, _)| c)
            else {
                return Reply::Invalid;
            };
            match (code, m.get(attr::REALM), m.get(attr::NONCE)) {
                (401 | 438, Some(realm), Some(nonce)) => Reply::Challenge {
                    code,
                    realm: realm.to_vec(),
                    nonce: nonce.to_vec(),
                },
                _ => Reply::Error { code },
            }
        }
        _ => Reply::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: [u8; 12] = [3; 12];

    #[test]
    fn authenticated_requests_verify_with_the_long_term_key() {
        let creds = Credentials::long_term("bench", "secret");
        let key = creds.key(b"realm");
        let auth = Auth {
            username: &creds.username,
            realm: b"realm",
            nonce: b"n0nce",
            key: &key,
        };
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for req in [
            Request::Allocate {
                lifetime: Some(600),
            },
            Request::Refresh { lifetime: 0 },
            Request::CreatePermission { peer },
            Request::ChannelBind {
                number: 0x4001,
                peer,
            },
        ] {
            let mut buf = [0u8; 512];
            let n = write_request(&mut buf, &TID, req, Some(&auth)).unwrap();
            let m = Message::parse(&buf[..n]).unwrap();
            assert_eq!(m.method(), req.method());
            assert_eq!(m.class(), Class::Request);
            assert!(m.fingerprint_offset().is_some());
            verify_message_integrity(&m, &key).unwrap();
            assert_eq!(m.get(attr::USERNAME), Some(&b"bench"[..]));
            assert_eq!(m.get(attr::NONCE), Some(&b"n0nce"[..]));
            match req {
                Request::Allocate { .. } => {
                    assert_eq!(m.get(attr::REQUESTED_TRANSPORT), Some(&[17, 0, 0, 0][..]));
                    assert_eq!(m.get(attr::LIFETIME), Some(&600u32.to_be_bytes()[..]));
                }
                Request::Refresh { .. } => {
                    assert_eq!(m.get(attr::LIFETIME), Some(&[0u8; 4][..]))
                }
                Request::CreatePermission { .. } | Request::ChannelBind { .. } => {
                    let p = attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), &TID);
                    assert_eq!(p, Ok(peer));
                }
            }
            if let Request::ChannelBind { .. } = req {
                assert_eq!(m.get(attr::CHANNEL_NUMBER), Some(&[0x40, 0x01, 0, 0][..]));
            }
        }
        let mut buf = [0u8; 512];
        let n = write_request(&mut buf, &TID, Request::Allocate { lifetime: None }, None).unwrap();
        let m = Message::parse(&buf[..n]).unwrap();
        assert!(m.get(attr::LIFETIME).is_none());
        assert!(m.get(attr::MESSAGE_INTEGRITY).is_none());
    }

    #[test]
    fn rest_credentials_match_the_dataplane() {
        let c = Credentials::rest("north", "alice", 1_699_913_600, 86_400);
        assert_eq!(c.username, "1700000000:alice");
        assert_eq!(c.password, rest_password(b"north", b"1700000000:alice"));
        assert!(c.password.ends_with('='), "base64 of 20 bytes is padded");
    }

    #[test]
    fn replies() {
        let key = Credentials::long_term("u", "p").key(b"r");
        let relayed: SocketAddr = "127.0.0.1:20000".parse().unwrap();
        let mut buf = [0u8; 256];
        let mut w =
            MessageWriter::new(&mut buf, Class::SuccessResponse, method::ALLOCATE, &TID).unwrap();
        w.add_xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
            .unwrap();
        w.add_u32(attr::LIFETIME, 600).unwrap();
        w.add_message_integrity(&key).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        let ok = Reply::Success {
            relayed: Some(relayed),
            lifetime: Some(600),
        };
        assert_eq!(read_reply(&m, method::ALLOCATE, Some(&key)), ok);
        assert_eq!(read_reply(&m, method::ALLOCATE, None), ok);
        let other = Credentials::long_term("u", "q").key(b"r");
        assert_eq!(
            read_reply(&m, method::ALLOCATE, Some(&other)),
            Reply::Invalid
        );
        assert_eq!(read_reply(&m, method::REFRESH, Some(&key)), Reply::Invalid);

        let mut w =
            MessageWriter::new(&mut buf, Class::ErrorResponse, method::ALLOCATE, &TID).unwrap();
        w.add_error_code(438, "Stale Nonce").unwrap();
        w.add_attribute(attr::REALM, b"r").unwrap();
        w.add_attribute(attr::NONCE, b"fresh").unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            read_reply(&m, method::ALLOCATE, None),
            Reply::Challenge {
                code: 438,
                realm: b"r".to_vec(),
                nonce: b"fresh".to_vec()
            }
        );
        let mut w =
            MessageWriter::new(&mut buf, Class::ErrorResponse, method::ALLOCATE, &TID).unwrap();
        w.add_error_code(486, "Allocation Quota Reached").unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            read_reply(&m, method::ALLOCATE, None),
            Reply::Error { code: 486 }
        );
    }

    #[test]
    fn data_framing() {
        let mut buf = [0u8; 200];
        assert!(write_channel_header(&mut buf, 0x4005, 172));
        assert!(is_channel_data(&buf));
        assert_eq!(
            channel_data(&buf[..176], 0x4005).map(<[u8]>::len),
            Some(172)
        );
        assert_eq!(channel_data(&buf[..176], 0x4006), None, "other channel");
        assert_eq!(channel_data(&buf[..100], 0x4005), None, "truncated");

        let peer: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let n = write_send(&mut buf, &TID, peer, &[7u8; 100]).unwrap();
        assert!(!is_channel_data(&buf[..n]));
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.method(), method::SEND);
        assert_eq!(m.get(attr::DATA).map(<[u8]>::len), Some(100));
        // A Data indication is the same shape with method DATA.
        let mut w = MessageWriter::new(&mut buf, Class::Indication, method::DATA, &TID).unwrap();
        w.add_xor_address(attr::XOR_PEER_ADDRESS, peer).unwrap();
        w.add_attribute(attr::DATA, &[9u8; 10]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(data_indication(&m), Some((peer, &[9u8; 10][..])));
    }
}
