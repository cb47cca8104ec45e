//! LDAP (RFC 4511): the first message must be a BindRequest; it is routed by the domain in its
//! name, either `domain\user` or the `DC=` parts of `CN=user,DC=example,DC=com` joined with
//! dots (reference: "BIND requests are routed based on the domain part of the user"). Every
//! later bind on the connection must name the same service. Messages are framed by their
//! outer BER header; binds and bind responses are decoded by `ldap3_proto` (after a
//! non-recursive depth check), never by offsets.

use bytes::BytesMut;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindRequest, LdapBindResponse, LdapMsg, LdapOp, LdapResult, LdapResultCode,
};
use ldap3_proto::LdapCodec;
use tokio_util::codec::{Decoder, Encoder};

use super::{Backlog, Check, Guard, Monitor, Refusal, Sniffed, Sniffer, Step};

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

/// One attribute type and value of a DN, the value unescaped.
#[derive(Debug, PartialEq, Eq)]
struct Ava {
    attr: String,
    value: Option<String>,
}

/// Parses a DN per RFC 4514 into its RDNs (first RDN first), each a list of AVAs. Accepted
/// beyond RFC 4514, as RFC 2253/1779 parsers (OpenLDAP's among them) accept: spaces around
/// separators and `=`, `;` between RDNs, and `"quoted"` values. A value given as `#hex`
/// (BER) is not decoded: its `value` is `None`. `Err` when `dn` is not a DN.
fn parse_dn(dn: &str) -> Result<Vec<Vec<Ava>>, &'static str> {
    let b = dn.as_bytes();
    let mut i = 0;
    let skip_spaces = |i: &mut usize| {
        while b.get(*i) == Some(&b' ') {
            *i += 1;
        }
    };
    let mut rdns = Vec::new();
    let mut rdn = Vec::new();
    skip_spaces(&mut i);
    if i == b.len() {
        return Ok(rdns);
    }
    loop {
        // attributeType: a descriptor or a numeric OID (legacy "OID." prefix allowed).
        skip_spaces(&mut i);
        let start = i;
        while b
            .get(i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.')
        {
            i += 1;
        }
        let attr = &dn[start..i];
        if attr.is_empty() || !b[start].is_ascii_alphanumeric() {
            return Err("no attribute type");
        }
        skip_spaces(&mut i);
        if b.get(i) != Some(&b'=') {
            return Err("no '=' after the attribute type");
        }
        i += 1;
        skip_spaces(&mut i);
        let value = match b.get(i) {
            Some(b'#') => {
                i += 1;
                let start = i;
                while b.get(i).is_some_and(u8::is_ascii_hexdigit) {
                    i += 1;
                }
                if i == start || (i - start) % 2 != 0 {
                    return Err("bad #hex value");
                }
                None
            }
            Some(b'"') => {
                i += 1;
                let mut v = Vec::new();
                loop {
                    match b.get(i) {
                        None => return Err("unterminated quoted value"),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => i = unescape(b, i, &mut v)?,
                        Some(&c) => {
                            v.push(c);
                            i += 1;
                        }
                    }
                }
                Some(String::from_utf8(v).map_err(|_| "value is not UTF-8")?)
            }
            _ => {
                let mut v = Vec::new();
                // Unescaped trailing spaces are not part of the value.
                let mut kept = 0;
                loop {
                    match b.get(i) {
                        None | Some(b',' | b'+' | b';') => break,
                        Some(b'"' | b'<' | b'>' | b'\0') => {
                            return Err("unescaped special character")
                        }
                        Some(b'\\') => {
                            i = unescape(b, i, &mut v)?;
                            kept = v.len();
                        }
                        Some(&c) => {
                            v.push(c);
                            if c != b' ' {
                                kept = v.len();
                            }
                            i += 1;
                        }
                    }
                }
                v.truncate(kept);
                Some(String::from_utf8(v).map_err(|_| "value is not UTF-8")?)
            }
        };
        rdn.push(Ava {
            attr: attr.to_string(),
            value,
        });
        skip_spaces(&mut i);
        match b.get(i) {
            None => {
                rdns.push(rdn);
                return Ok(rdns);
            }
            Some(b'+') => {}
            Some(b',' | b';') => rdns.push(std::mem::take(&mut rdn)),
            Some(_) => return Err("garbage after a value"),
        }
        i += 1;
    }
}

/// Unescapes the pair at `b[i]` (a backslash) into `v`: `\` followed by a special character
/// or by two hex digits (one byte of UTF-8). Returns the index after it.
fn unescape(b: &[u8], i: usize, v: &mut Vec<u8>) -> Result<usize, &'static str> {
    match b.get(i + 1) {
        Some(c) if b" \"#+,;<=>\\".contains(c) => {
            v.push(*c);
            Ok(i + 2)
        }
        Some(h) if h.is_ascii_hexdigit() => {
            let l = b
                .get(i + 2)
                .filter(|l| l.is_ascii_hexdigit())
                .ok_or("bad escape")?;
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            v.push(hex(*h) << 4 | hex(*l));
            Ok(i + 3)
        }
        _ => Err("bad escape"),
    }
}

/// Whether an attribute type is domainComponent (RFC 4519 2.4), by any of its names: a DN
/// spelled `domainComponent=closed` or with the OID is the same DN to the target.
fn is_dc(attr: &str) -> bool {
    let attr = attr
        .strip_prefix("OID.")
        .or_else(|| attr.strip_prefix("oid."))
        .unwrap_or(attr);
    attr.eq_ignore_ascii_case("dc")
        || attr.eq_ignore_ascii_case("domainComponent")
        || attr == "0.9.2342.19200300.100.1.25"
}

/// The routing domain of a bind name, lower-cased; `None` if it has neither form.
///
/// A name with an `=` before any backslash is a DN (RFC 4514): its domain is the values of
/// its single-valued `DC=` RDNs joined with dots (`cn=a\,b,dc=example,dc=com` is
/// `example.com`); a DN that does not parse, or whose `DC=` value is given in `#hex`, has
/// none. Any other name with a backslash is `domain\user`.
pub fn bind_domain(name: &str) -> Option<String> {
    if let Some(bs) = name.find('\\').filter(|&bs| !name[..bs].contains('=')) {
        let d = name[..bs].trim();
        return (!d.is_empty()).then(|| d.to_ascii_lowercase());
    }
    let rdns = parse_dn(name).ok()?;
    let mut parts = Vec::new();
    for rdn in &rdns {
        let [ava] = rdn.as_slice() else {
            // A multi-valued RDN is no domain component (as before: it is not `dc=x`).
            continue;
        };
        if is_dc(&ava.attr) {
            let v = ava.value.as_deref()?.trim();
            if v.is_empty() {
                return None;
            }
            parts.push(v.to_ascii_lowercase());
        }
    }
    (!parts.is_empty()).then(|| parts.join("."))
}

/// The DN a SASL bind names in its credentials: the authorization identity `dn:...` of
/// PLAIN (RFC 4616: authzid NUL authcid NUL password; the authcid too if it is a `dn:`) or
/// EXTERNAL (RFC 4422 appendix A: the authzid alone).
fn sasl_dn(mechanism: &str, credentials: &[u8]) -> Option<String> {
    let dn = |id: &[u8]| {
        std::str::from_utf8(id)
            .ok()
            .and_then(|s| s.strip_prefix("dn:"))
            .map(str::to_string)
    };
    if mechanism.eq_ignore_ascii_case("PLAIN") {
        let mut parts = credentials.split(|&b| b == 0);
        let authzid = parts.next()?;
        let authcid = parts.next()?;
        dn(authzid).or_else(|| dn(authcid))
    } else if mechanism.eq_ignore_ascii_case("EXTERNAL") {
        dn(credentials)
    } else {
        None
    }
}

/// The routing domain of a bind: its name, or for a SASL bind with an empty name the DN in
/// its credentials.
pub fn bind_request_domain(b: &LdapBindRequest) -> Option<String> {
    if !b.dn.trim().is_empty() {
        return bind_domain(&b.dn);
    }
    match &b.cred {
        LdapBindCred::SASL(s) => bind_domain(&sasl_dn(&s.mechanism, &s.credentials)?),
        LdapBindCred::Simple(_) => None,
    }
}

/// The outer BER header of an LDAPMessage and where its protocolOp starts.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// Not enough bytes for the header, message ID and operation tag yet.
    Partial,
    Broken(&'static str),
    Whole {
        /// Bytes of the whole message.
        total: usize,
        /// Offset of the protocolOp's tag.
        op_at: usize,
        op: u8,
    },
}

/// A definite BER length at `b[i..]`: (length, bytes it took); `None` if more are needed.
fn ber_length(b: &[u8], i: usize) -> Result<Option<(usize, usize)>, &'static str> {
    let Some(&first) = b.get(i) else {
        return Ok(None);
    };
    if first < 0x80 {
        return Ok(Some((usize::from(first), 1)));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return Err("not a definite BER length");
    }
    let Some(bytes) = b.get(i + 1..i + 1 + n) else {
        return Ok(None);
    };
    Ok(Some((
        bytes.iter().fold(0usize, |a, &x| a << 8 | usize::from(x)),
        1 + n,
    )))
}

/// Frames the LDAPMessage at the start of `b` (RFC 4511 4.1.1: SEQUENCE { messageID
/// INTEGER, protocolOp, ... }) without decoding it.
fn frame(b: &[u8]) -> Frame {
    match frame_inner(b) {
        Ok(Some(f)) => f,
        Ok(None) => Frame::Partial,
        Err(e) => Frame::Broken(e),
    }
}

fn frame_inner(b: &[u8]) -> Result<Option<Frame>, &'static str> {
    match b.first() {
        None => return Ok(None),
        Some(0x30) => {}
        Some(_) => return Err("not an LDAP message"),
    }
    let Some((len, n)) = ber_length(b, 1)? else {
        return Ok(None);
    };
    let total = 1 + n + len;
    let id_at = 1 + n;
    match b.get(id_at) {
        None => return Ok(None),
        Some(0x02) => {}
        Some(_) => return Err("LDAP message without a message ID"),
    }
    let Some((id_len, m)) = ber_length(b, id_at + 1)? else {
        return Ok(None);
    };
    if id_len == 0 || id_len > 5 {
        return Err("bad LDAP message ID");
    }
    let op_at = id_at + 1 + m + id_len;
    if op_at >= total {
        return Err("LDAP message without an operation");
    }
    let Some(&op) = b.get(op_at) else {
        return Ok(None);
    };
    Ok(Some(Frame::Whole { total, op_at, op }))
}

/// BindRequest: [APPLICATION 0] constructed.
const BIND_REQUEST: u8 = 0x60;
/// BindResponse: [APPLICATION 1] constructed.
const BIND_RESPONSE: u8 = 0x61;

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
                LdapOp::BindRequest(b) => match bind_request_domain(&b) {
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

    fn session(&self, max: usize) -> (Box<dyn Guard>, Box<dyn Monitor>) {
        let guard = LdapGuard {
            max,
            ..LdapGuard::default()
        };
        (Box::new(guard), Box::new(LdapMonitor::default()))
    }
}

/// Follows the client's LDAP messages after the first: each BindRequest is decoded whole
/// (bounded by `max`) and named by its domain for the proxy to check; other messages pass
/// as they come, framed by their BER header only.
#[derive(Default)]
pub struct LdapGuard {
    q: Backlog,
    max: usize,
    /// The rest of the message waiting for [`Guard::decide`].
    pending: Option<usize>,
}

impl Guard for LdapGuard {
    fn push(&mut self, data: &[u8]) {
        self.q.push(data);
    }

    fn next(&mut self) -> Step {
        loop {
            if self.q.broken || self.pending.is_some() || self.q.buf.is_empty() {
                return Step::Idle;
            }
            if self.q.rest > 0 {
                match self.q.take_rest() {
                    Some(step) => return step,
                    None => continue,
                }
            }
            let (total, op_at, op) = match frame(&self.q.buf) {
                Frame::Partial => return Step::Idle,
                Frame::Broken(e) => return self.q.fail(Step::Broken(e)),
                Frame::Whole { total, op_at, op } => (total, op_at, op),
            };
            if op != BIND_REQUEST {
                self.pending = Some(total - (op_at + 1));
                return Step::Message {
                    check: Check::Pass,
                    bytes: self.q.buf.drain(..=op_at).collect(),
                };
            }
            if total > self.max {
                return self.q.fail(Step::TooLarge);
            }
            if self.q.buf.len() < total {
                return Step::Idle;
            }
            let check = match decode_first(&self.q.buf[..total], self.max) {
                Decoded::Msg(m) => match m.op {
                    LdapOp::BindRequest(b) => match bind_request_domain(&b) {
                        Some(d) => Check::Name(d),
                        None => Check::NoName("bind name has no domain"),
                    },
                    _ => return self.q.fail(Step::Broken("undecodable LDAP bind")),
                },
                Decoded::More | Decoded::Bad => {
                    return self.q.fail(Step::Broken("undecodable LDAP bind"))
                }
            };
            self.pending = Some(0);
            return Step::Message {
                check,
                bytes: self.q.buf.drain(..total).collect(),
            };
        }
    }

    fn decide(&mut self, forward: bool) {
        if let Some(rest) = self.pending.take() {
            self.q.rest = rest;
            self.q.forward = forward;
        }
    }
}

/// Follows the target's messages by their BER headers and reports BindResponses with
/// invalidCredentials (a bind always carries credentials: each one is a password tried).
/// Only bind responses are decoded, each after the same non-recursive depth check as
/// requests, and only up to [`MONITOR_MAX_BIND`]; everything else is skipped unread, so the
/// monitor's buffer never holds more than one bind response.
#[derive(Default)]
pub struct LdapMonitor {
    buf: Vec<u8>,
    /// Bytes of a message not looked at still to pass.
    skip: usize,
    lost: bool,
}

/// A bind response is a result code, a DN, a message and perhaps SASL data: small.
pub const MONITOR_MAX_BIND: usize = 64 * 1024;

impl Monitor for LdapMonitor {
    fn feed(&mut self, mut data: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        if self.lost {
            return found;
        }
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
        while !self.buf.is_empty() {
            let (total, op) = match frame(&self.buf) {
                Frame::Partial => break,
                Frame::Broken(_) => {
                    self.lost = true;
                    self.buf = Vec::new();
                    break;
                }
                Frame::Whole { total, op, .. } => (total, op),
            };
            let look = op == BIND_RESPONSE && total <= MONITOR_MAX_BIND;
            if look && self.buf.len() < total {
                break;
            }
            if total > self.buf.len() {
                self.skip = total - self.buf.len();
                self.buf.clear();
                break;
            }
            let msg: Vec<u8> = self.buf.drain(..total).collect();
            if look && shape(&msg) == Shape::Fine {
                let mut b = BytesMut::from(&msg[..]);
                if let Ok(Some(m)) = LdapCodec::new(Some(MONITOR_MAX_BIND)).decode(&mut b) {
                    if let LdapOp::BindResponse(r) = m.op {
                        if r.res.code == LdapResultCode::InvalidCredentials {
                            found.push("LDAP invalidCredentials".to_string());
                        }
                    }
                }
            }
        }
        found
    }

    fn at_boundary(&self) -> bool {
        self.lost || (self.skip == 0 && self.buf.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use ldap3_proto::proto::{LdapFilter, LdapSearchRequest, LdapSearchScope, SaslCredentials};

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

    #[test]
    fn dns_are_parsed_per_rfc_4514() {
        for (name, want) in [
            // Escaped separators are part of a value, not separators.
            (r"cn=a\,b,dc=example,dc=com", Some("example.com")),
            (r"cn=x\,dc=alpha,dc=test", Some("test")),
            (r"cn=x\+dc=alpha,dc=test", Some("test")),
            (r"cn=x\;dc=alpha,dc=test", Some("test")),
            (r"cn=a\\,dc=b", Some("b")),
            (r"cn=\<a\>\=\#\ \22,dc=b", Some("b")),
            // Hex pairs, also forming UTF-8.
            (r"cn=x,dc=ex\61mple,DC=C\4fM", Some("example.com")),
            (r"cn=x\2cdc=alpha,dc=test", Some("test")),
            ("cn=M\\c3\\bcller,dc=b\\c3\\a4r,dc=test", Some("bär.test")),
            // A backslash after an '=': a DN, not domain\\user.
            (r"cn=a\5cb,dc=x,dc=y", Some("x.y")),
            // Lenient forms (RFC 2253/1779): spaces, semicolons, quoted values.
            (
                "CN=ckl , DC = innovaphone ,  DC=com ",
                Some("innovaphone.com"),
            ),
            ("cn=a;dc=b;dc=c", Some("b.c")),
            ("cn=\"x,dc=evil\",dc=good", Some("good")),
            ("dc=\"quoted\",dc=test", Some("quoted.test")),
            // Multi-valued RDNs are no domain components.
            ("cn=x+dc=foo,dc=bar", Some("bar")),
            // Every name of domainComponent.
            (
                "2.5.4.3=x,0.9.2342.19200300.100.1.25=a,domainComponent=b,OID.0.9.2342.19200300.100.1.25=c,dc=z",
                Some("a.b.c.z"),
            ),
            // Not DNs, or not routable ones.
            (r"cn=a\q,dc=x", None),
            (r"cn=a,dc=x\", None),
            (r"cn=a\4,dc=x", None),
            ("cn=\"open,dc=x", None),
            ("cn=a<b,dc=x", None),
            ("cn=a,=x,dc=y", None),
            ("cn=a,dc=x,", None),
            ("dc=#1603666f6f,dc=bar", None),
            ("dc=,dc=bar", None),
            ("cn=admin", None),
            ("", None),
            ("just a name", None),
            (r"cn=x\ff,dc=y", None),
            // domain\\user: a backslash with no '=' before it.
            (r"PBX.example.com\ldap-guest", Some("pbx.example.com")),
            (r"corp\cn=x,dc=other", Some("corp")),
            (r"\user", None),
        ] {
            assert_eq!(bind_domain(name).as_deref(), want, "{name}");
        }
    }

    fn sasl(dn: &str, mechanism: &str, credentials: &[u8]) -> LdapBindRequest {
        LdapBindRequest {
            dn: dn.into(),
            cred: LdapBindCred::SASL(SaslCredentials {
                mechanism: mechanism.into(),
                credentials: credentials.to_vec(),
            }),
        }
    }

    #[test]
    fn sasl_binds_name_their_dn() {
        let d = |b: LdapBindRequest| bind_request_domain(&b);
        assert_eq!(
            d(sasl("", "PLAIN", b"dn:cn=a,dc=x,dc=test\0alice\0pw")).as_deref(),
            Some("x.test")
        );
        assert_eq!(
            d(sasl("", "PLAIN", b"\0dn:uid=a,dc=y,dc=test\0pw")).as_deref(),
            Some("y.test")
        );
        assert_eq!(
            d(sasl("", "EXTERNAL", b"dn:cn=a,dc=z,dc=test")).as_deref(),
            Some("z.test")
        );
        // The name field wins when there is one.
        assert_eq!(
            d(sasl("cn=a,dc=n,dc=test", "PLAIN", b"dn:cn=a,dc=x\0a\0pw")).as_deref(),
            Some("n.test")
        );
        assert_eq!(d(sasl("", "PLAIN", b"\0alice\0pw")), None);
        assert_eq!(d(sasl("", "DIGEST-MD5", b"")), None);
        assert_eq!(d(sasl("", "PLAIN", b"dn:cn=a,dc=x")), None, "no authcid");
    }

    fn search(id: i32) -> Vec<u8> {
        encode(LdapMsg::new(
            id,
            LdapOp::SearchRequest(LdapSearchRequest {
                base: "dc=a,dc=test".into(),
                scope: LdapSearchScope::Subtree,
                aliases: ldap3_proto::proto::LdapDerefAliases::Never,
                sizelimit: 0,
                timelimit: 0,
                typesonly: false,
                filter: LdapFilter::Present("objectClass".into()),
                attrs: vec!["x".repeat(300)],
            }),
        ))
    }

    #[test]
    fn guard_names_every_bind_and_passes_the_rest() {
        let bind_a = bind("cn=admin,dc=a,dc=test");
        let bind_b = bind(r"cn=x\,dc=a,dc=b,dc=test");
        let anon = bind("");
        let find = search(8);
        let unbind = encode(LdapMsg::new(9, LdapOp::UnbindRequest));
        let stream = [&bind_a[..], &find, &bind_b, &anon, &unbind].concat();
        for chunk in [1, 5, 4096] {
            let (mut g, _) = Ldap.session(4096);
            let mut got = Vec::new();
            let mut forwarded = Vec::new();
            for c in stream.chunks(chunk) {
                g.push(c);
                loop {
                    match g.next() {
                        Step::Idle => break,
                        Step::Message { check, bytes } => {
                            // Forward all but the binds for other domains.
                            let ok = matches!(&check, Check::Pass)
                                || check == Check::Name("a.test".into());
                            got.push(check);
                            g.decide(ok);
                            if ok {
                                forwarded.extend(bytes);
                            }
                        }
                        Step::Forward(b) => forwarded.extend(b),
                        other => panic!("{other:?}"),
                    }
                }
            }
            assert_eq!(
                got,
                [
                    Check::Name("a.test".into()),
                    Check::Pass,
                    Check::Name("b.test".into()),
                    Check::NoName("bind name has no domain"),
                    Check::Pass,
                ],
                "chunks of {chunk}"
            );
            assert_eq!(forwarded, [&bind_a[..], &find, &unbind].concat());
        }
    }

    #[test]
    fn guard_refuses_what_it_cannot_follow() {
        let big = bind(&format!("cn={},dc=a,dc=test", "x".repeat(5000)));
        let (mut g, _) = Ldap.session(4096);
        g.push(&big[..100]);
        assert_eq!(g.next(), Step::TooLarge, "known from the header");
        // Searches are not held whole, whatever their size.
        let (mut g, _) = Ldap.session(64);
        g.push(&search(1));
        assert!(matches!(
            g.next(),
            Step::Message {
                check: Check::Pass,
                ..
            }
        ));
        for bad in [
            &b"\x16\x03\x01\x02\x00"[..],
            &[0x30, 0x80, 0x02, 0x01, 0x01, 0x60],
            &[0x30, 0x03, 0x04, 0x01, 0x01],
            &[0x30, 0x03, 0x02, 0x01, 0x01],
            &[0x30, 0x05, 0x02, 0x01, 0x01, 0x60, 0x00],
        ] {
            let (mut g, _) = Ldap.session(4096);
            g.push(bad);
            assert!(matches!(g.next(), Step::Broken(_)), "{bad:?}");
        }
        // A bind nested too deep for the decoder is broken, not decoded.
        let mut deep = vec![0x30, 0x84, 0, 0, 0, 0, 0x02, 0x01, 0x01];
        let inner = nested(100);
        deep.push(0x60);
        deep.extend_from_slice(&[
            0x83,
            (inner.len() >> 16) as u8,
            (inner.len() >> 8) as u8,
            inner.len() as u8,
        ]);
        deep.extend_from_slice(&inner);
        let n = deep.len() - 6;
        deep[2..6].copy_from_slice(&(n as u32).to_be_bytes());
        let (mut g, _) = Ldap.session(1 << 20);
        g.push(&deep);
        assert_eq!(g.next(), Step::Broken("undecodable LDAP bind"));
    }

    fn bind_response(id: i32, code: LdapResultCode) -> Vec<u8> {
        encode(LdapMsg::new(
            id,
            LdapOp::BindResponse(LdapBindResponse {
                res: LdapResult {
                    code,
                    matcheddn: String::new(),
                    message: String::new(),
                    referral: Vec::new(),
                },
                saslcreds: None,
            }),
        ))
    }

    /// A BindResponse whose result nests `depth` SEQUENCEs: outer header, message ID, then
    /// [APPLICATION 1] around the nesting.
    fn deep_bind_response(depth: usize) -> Vec<u8> {
        let inner = nested(depth);
        let len = |n: usize| {
            let mut v = vec![0x83];
            v.extend_from_slice(&(n as u32).to_be_bytes()[1..]);
            v
        };
        let mut op = vec![0x61];
        op.extend(len(inner.len()));
        op.extend_from_slice(&inner);
        let mut body = vec![0x02, 0x01, 0x05];
        body.extend_from_slice(&op);
        let mut msg = vec![0x30];
        msg.extend(len(body.len()));
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn monitor_does_not_recurse_into_a_deeply_nested_response() {
        // Runs on a test thread's 2 MiB stack; fits in the monitor's bind size, so only the
        // depth check stands between it and the recursive decoder.
        let deep = deep_bind_response(15_000);
        assert!(deep.len() < MONITOR_MAX_BIND, "{}", deep.len());
        let mut m = LdapMonitor::default();
        let bad = bind_response(6, LdapResultCode::InvalidCredentials);
        let stream = [&deep[..], &bad].concat();
        let mut found = Vec::new();
        for c in stream.chunks(1000) {
            found.extend(m.feed(c));
        }
        // Skipped, and the stream is still followed.
        assert_eq!(found, ["LDAP invalidCredentials"]);
        assert!(m.at_boundary());
    }

    #[test]
    fn monitor_holds_no_more_than_one_bind_response() {
        let mut m = LdapMonitor::default();
        let mut big = vec![0x30, 0x84];
        let entry_len = 8 << 20;
        big.extend_from_slice(&(entry_len as u32 + 4).to_be_bytes());
        big.extend_from_slice(&[0x02, 0x01, 0x07, 0x64, 0x84]);
        big.extend_from_slice(&(entry_len as u32 - 5).to_be_bytes());
        // A search result entry of 8 MiB, fed in 16 KiB pieces: not buffered.
        assert!(m.feed(&big).is_empty());
        let mut left = entry_len - 5;
        let piece = vec![0u8; 16 * 1024];
        while left > 0 {
            let n = left.min(piece.len());
            assert!(m.feed(&piece[..n]).is_empty());
            assert!(m.buf.len() < 64, "{}", m.buf.len());
            assert_eq!(m.at_boundary(), left == n);
            left -= n;
        }
        assert_eq!(
            m.feed(&bind_response(2, LdapResultCode::InvalidCredentials)),
            ["LDAP invalidCredentials"]
        );
        let ok = bind_response(3, LdapResultCode::Success);
        assert!(m.feed(&ok[..4]).is_empty());
        assert!(!m.at_boundary());
        assert!(m.feed(&ok[4..]).is_empty());
        assert!(m.at_boundary());
    }
}
