//! LDAP (RFC 4511): the first message must be a BindRequest; it is routed by the domain in its
//! name, either `domain\user` or the `DC=` parts of `CN=user,DC=example,DC=com` joined with
//! dots (reference: "BIND requests are routed based on the domain part of the user"). BER is
//! decoded by `ldap3_proto`, never by offsets.

use bytes::BytesMut;
use ldap3_proto::proto::{LdapBindResponse, LdapMsg, LdapOp, LdapResult, LdapResultCode};
use ldap3_proto::LdapCodec;
use tokio_util::codec::{Decoder, Encoder};

use super::{Monitor, Refusal, Sniffed, Sniffer};

pub struct Ldap;

enum Decoded {
    More,
    Msg(Box<LdapMsg>),
    Bad,
}

/// Constructed BER elements allowed inside one another. A BindRequest nests four deep (five
/// with SASL credentials), controls about as much; the BER decoder recurses once per level,
/// so a message nested tens of thousands deep would overflow the stack of the control
/// plane's only thread.
const MAX_DEPTH: usize = 32;

#[derive(Debug, PartialEq, Eq)]
enum Shape {
    /// The first element is complete and nests no deeper than [`MAX_DEPTH`].
    Fine,
    /// Fine so far; more bytes are needed.
    Partial,
    TooDeep,
    /// Not definite-length BER (which LDAP requires, RFC 4511 5.1).
    Broken,
}

/// Walks the first BER element of `buf` without recursion and reports its nesting depth
/// against [`MAX_DEPTH`], before the (recursive) decoder is allowed near it.
fn shape(buf: &[u8]) -> Shape {
    // End offsets of the constructed elements we are inside, innermost last.
    let mut open: Vec<usize> = Vec::new();
    let mut i = 0;
    loop {
        while open.last() == Some(&i) {
            open.pop();
        }
        if i > 0 && open.is_empty() {
            return Shape::Fine;
        }
        if i >= buf.len() {
            return Shape::Partial;
        }
        // One identifier byte, as the decoder (lber) reads it: it has no high-tag-number
        // form, and reading one here would walk other elements than the decoder does (a
        // shallow walk here, a deep recursion there).
        let tag = buf[i];
        i += 1;
        let Some(&first) = buf.get(i) else {
            return Shape::Partial;
        };
        i += 1;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return Shape::Broken;
            }
            let Some(bytes) = buf.get(i..i + n) else {
                return Shape::Partial;
            };
            i += n;
            bytes.iter().fold(0usize, |a, &b| a << 8 | usize::from(b))
        };
        let end = i + len;
        if open.last().is_some_and(|&outer| end > outer) {
            return Shape::Broken;
        }
        if tag & 0x20 != 0 {
            if open.len() >= MAX_DEPTH {
                return Shape::TooDeep;
            }
            open.push(end);
        } else {
            i = end;
            if i > buf.len() {
                return Shape::Partial;
            }
        }
    }
}

fn decode_first(buf: &[u8], max: usize) -> Decoded {
    match shape(buf) {
        Shape::Fine => {}
        Shape::Partial => return Decoded::More,
        Shape::TooDeep | Shape::Broken => return Decoded::Bad,
    }
    let mut b = BytesMut::from(buf);
    match LdapCodec::new(Some(max)).decode(&mut b) {
        Ok(Some(m)) => Decoded::Msg(Box::new(m)),
        Ok(None) => Decoded::More,
        Err(_) => Decoded::Bad,
    }
}

/// The routing domain of a bind name, lower-cased; `None` if it has neither form.
pub fn bind_domain(dn: &str) -> Option<String> {
    if let Some((domain, _user)) = dn.split_once('\\') {
        let d = domain.trim();
        return (!d.is_empty()).then(|| d.to_ascii_lowercase());
    }
    let mut parts = Vec::new();
    for rdn in dn.split(',') {
        if let Some((k, v)) = rdn.split_once('=') {
            if k.trim().eq_ignore_ascii_case("dc") && !v.trim().is_empty() {
                parts.push(v.trim().to_ascii_lowercase());
            }
        }
    }
    (!parts.is_empty()).then(|| parts.join("."))
}

impl Sniffer for Ldap {
    fn sniff(&self, buf: &[u8], max: usize) -> Sniffed {
        // An LDAPMessage is a SEQUENCE: anything else is not LDAP, and need not wait.
        if buf.first().is_some_and(|&b| b != 0x30) {
            return Sniffed::Invalid("not an LDAP message");
        }
        match decode_first(buf, max) {
            Decoded::More if buf.len() >= max => Sniffed::TooLarge,
            Decoded::More => Sniffed::NeedMore,
            Decoded::Bad if buf.len() > max => Sniffed::TooLarge,
            Decoded::Bad => Sniffed::Invalid("undecodable LDAP message"),
            Decoded::Msg(m) => match m.op {
                LdapOp::BindRequest(b) => match bind_domain(&b.dn) {
                    Some(d) => Sniffed::Name(d),
                    None => Sniffed::NoName("bind name has no domain"),
                },
                _ => Sniffed::Invalid("first LDAP message is not a BindRequest"),
            },
        }
    }

    fn refuse(&self, buf: &[u8], why: Refusal) -> Option<Vec<u8>> {
        let Decoded::Msg(m) = decode_first(buf, usize::MAX) else {
            return None;
        };
        if !matches!(m.op, LdapOp::BindRequest(_)) {
            return None;
        }
        let (code, message) = match why {
            Refusal::UnknownName => (LdapResultCode::NoSuchObject, "no such service"),
            Refusal::Forbidden => (LdapResultCode::InsufficentAccessRights, "not allowed"),
            Refusal::Unavailable => (LdapResultCode::Unavailable, "service unavailable"),
            Refusal::BadRequest => (LdapResultCode::ProtocolError, "bad request"),
            Refusal::TooLarge => (LdapResultCode::AdminLimitExceeded, "request too large"),
        };
        let resp = LdapMsg::new(
            m.msgid,
            LdapOp::BindResponse(LdapBindResponse {
                res: LdapResult {
                    code,
                    matcheddn: String::new(),
                    message: message.to_string(),
                    referral: Vec::new(),
                },
                saslcreds: None,
            }),
        );
        let mut out = BytesMut::new();
        LdapCodec::default().encode(resp, &mut out).ok()?;
        Some(out.to_vec())
    }

    fn monitor(&self) -> Box<dyn Monitor> {
        Box::new(LdapMonitor::default())
    }
}

/// Decodes the target's messages and reports BindResponses with invalidCredentials.
#[derive(Default)]
pub struct LdapMonitor {
    buf: BytesMut,
    lost: bool,
}

/// Search results can be large; beyond this the monitor stops following the stream.
const MONITOR_MAX_MESSAGE: usize = 4 * 1024 * 1024;

impl Monitor for LdapMonitor {
    fn feed(&mut self, data: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        if self.lost {
            return found;
        }
        self.buf.extend_from_slice(data);
        let mut codec = LdapCodec::new(Some(MONITOR_MAX_MESSAGE));
        loop {
            // As for the first message: the decoder recurses once per nesting level, and an
            // answer nested deep enough would overflow the stack (and end the process).
            if matches!(shape(&self.buf), Shape::TooDeep | Shape::Broken) {
                self.lost = true;
                self.buf = BytesMut::new();
                break;
            }
            match codec.decode(&mut self.buf) {
                Ok(Some(m)) => {
                    if let LdapOp::BindResponse(r) = m.op {
                        if r.res.code == LdapResultCode::InvalidCredentials {
                            found.push("LDAP invalidCredentials".to_string());
                        }
                    }
                }
                Ok(None) if self.buf.len() <= MONITOR_MAX_MESSAGE => break,
                Ok(None) | Err(_) => {
                    self.lost = true;
                    self.buf = BytesMut::new();
                    break;
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use ldap3_proto::proto::{LdapBindCred, LdapBindRequest};

    use super::*;

    fn encode(m: LdapMsg) -> Vec<u8> {
        let mut b = BytesMut::new();
        LdapCodec::default().encode(m, &mut b).unwrap();
        b.to_vec()
    }

    fn bind(dn: &str) -> Vec<u8> {
        encode(LdapMsg::new(
            7,
            LdapOp::BindRequest(LdapBindRequest {
                dn: dn.into(),
                cred: LdapBindCred::Simple("pw".into()),
            }),
        ))
    }

    #[test]
    fn both_name_forms() {
        assert_eq!(
            Ldap.sniff(&bind("PBX.example.com\\ldap-guest"), 4096),
            Sniffed::Name("pbx.example.com".into())
        );
        assert_eq!(
            Ldap.sniff(&bind("CN=ckl, DC=innovaphone, DC=com"), 4096),
            Sniffed::Name("innovaphone.com".into())
        );
        assert_eq!(
            Ldap.sniff(&bind("cn=admin,ou=x,dc=a,dc=example,dc=org"), 4096),
            Sniffed::Name("a.example.org".into())
        );
        assert!(matches!(
            Ldap.sniff(&bind("cn=admin"), 4096),
            Sniffed::NoName(_)
        ));
        assert!(matches!(Ldap.sniff(&bind(""), 4096), Sniffed::NoName(_)));
    }

    #[test]
    fn partial_wrong_and_large() {
        let b = bind("a\\b");
        for n in 1..b.len() {
            assert_eq!(Ldap.sniff(&b[..n], 4096), Sniffed::NeedMore, "{n} bytes");
        }
        assert_eq!(Ldap.sniff(&b[..5], 5), Sniffed::TooLarge);
        assert!(matches!(
            Ldap.sniff(b"GET / HTTP/1.1", 4096),
            Sniffed::Invalid(_)
        ));
        let unbind = encode(LdapMsg::new(1, LdapOp::UnbindRequest));
        assert!(matches!(Ldap.sniff(&unbind, 4096), Sniffed::Invalid(_)));
    }

    #[test]
    fn refusal_is_a_bind_response_with_the_same_id() {
        let r = Ldap.refuse(&bind("x\\y"), Refusal::UnknownName).unwrap();
        let mut b = BytesMut::from(&r[..]);
        let m = LdapCodec::default().decode(&mut b).unwrap().unwrap();
        assert_eq!(m.msgid, 7);
        match m.op {
            LdapOp::BindResponse(r) => assert_eq!(r.res.code, LdapResultCode::NoSuchObject),
            o => panic!("{o:?}"),
        }
    }

    /// `depth` SEQUENCEs inside one another, definite lengths.
    fn nested(depth: usize) -> Vec<u8> {
        let mut inner: Vec<u8> = vec![0x30, 0x00];
        for _ in 0..depth {
            let len = inner.len();
            let mut v = vec![0x30];
            if len < 128 {
                v.push(len as u8);
            } else if len < 256 {
                v.extend_from_slice(&[0x81, len as u8]);
            } else if len < 65536 {
                v.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
            } else {
                v.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
            }
            v.extend_from_slice(&inner);
            inner = v;
        }
        inner
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        // Runs on a test thread's 2 MiB stack: the decoder would overflow it many times over.
        let msg = nested(40_000);
        assert!(msg.len() > 180_000, "{}", msg.len());
        assert!(matches!(Ldap.sniff(&msg, 1 << 20), Sniffed::Invalid(_)));
        assert!(Ldap.refuse(&msg, Refusal::BadRequest).is_none());
        // Partial deep prefixes are refused as soon as the depth shows.
        assert!(matches!(
            Ldap.sniff(&msg[..200], 1 << 20),
            Sniffed::Invalid(_)
        ));
        assert_eq!(shape(&nested(MAX_DEPTH - 1)), Shape::Fine);
        assert_eq!(shape(&nested(MAX_DEPTH)), Shape::TooDeep);
    }

    #[test]
    fn shape_of_real_messages() {
        let b = bind("cn=admin,dc=a,dc=example");
        assert_eq!(shape(&b), Shape::Fine);
        for n in 0..b.len() {
            assert_eq!(shape(&b[..n]), Shape::Partial, "{n} bytes");
        }
        let mut two = b.clone();
        two.extend_from_slice(&b);
        assert_eq!(shape(&two), Shape::Fine, "only the first message counts");
        // Indefinite length, an inner element longer than its outer one.
        assert_eq!(shape(&[0x30, 0x80, 0, 0]), Shape::Broken);
        assert_eq!(shape(&[0x30, 0x03, 0x04, 0x05, 1, 2, 3]), Shape::Broken);
    }

    #[test]
    fn monitor_sees_invalid_credentials() {
        let mut m = LdapMonitor::default();
        let bad = encode(LdapMsg::new(
            1,
            LdapOp::BindResponse(LdapBindResponse {
                res: LdapResult {
                    code: LdapResultCode::InvalidCredentials,
                    matcheddn: String::new(),
                    message: String::new(),
                    referral: Vec::new(),
                },
                saslcreds: None,
            }),
        ));
        let (a, b) = bad.split_at(3);
        assert!(m.feed(a).is_empty());
        assert_eq!(m.feed(b), vec!["LDAP invalidCredentials".to_string()]);
    }
}
