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

fn decode_first(buf: &[u8], max: usize) -> Decoded {
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
