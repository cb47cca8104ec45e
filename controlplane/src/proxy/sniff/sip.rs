//! SIP over TCP/TLS (RFC 3261): requests are routed by the domain of the `From` URI
//! (reference: "REGISTER and INVITE messages are routed based on the domain part of the URI in
//! the From: header"); other request methods are routed the same way.
//!
//! Only the head is needed: the request line, the headers (with line folding and compact
//! names) and nothing of the body.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use super::{Backlog, Check, Guard, Monitor, Refusal, Sniffed, Sniffer, Step};

pub struct Sip;

/// A parsed SIP head: start line and unfolded headers.
struct Head<'a> {
    start: &'a str,
    headers: Vec<(&'a str, String)>,
    /// Bytes of the head, blank line included.
    len: usize,
}

/// Leading CRLFs are keep-alives (RFC 5626) and not part of a message.
fn skip_keepalive(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<Head<'_>>, &'static str> {
    let Some(len) = head_end(buf) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| "SIP head is not UTF-8")?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let start = lines.next().ok_or("empty SIP message")?;
    let mut headers: Vec<(&str, String)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            // Folded continuation of the previous header.
            let last = headers
                .last_mut()
                .ok_or("SIP head starts with a folded line")?;
            last.1.push(' ');
            last.1.push_str(line.trim());
            continue;
        }
        let (name, value) = line.split_once(':').ok_or("SIP header without a colon")?;
        headers.push((name.trim(), value.trim().to_string()));
    }
    Ok(Some(Head {
        start,
        headers,
        len,
    }))
}

/// Long and compact (RFC 3261 7.3.3) forms of a header name.
fn is_header(name: &str, long: &str, compact: Option<&str>) -> bool {
    name.eq_ignore_ascii_case(long) || compact.is_some_and(|c| name.eq_ignore_ascii_case(c))
}

impl Head<'_> {
    fn get(&self, long: &'static str, compact: Option<&'static str>) -> impl Iterator<Item = &str> {
        self.headers
            .iter()
            .filter(move |(n, _)| is_header(n, long, compact))
            .map(|(_, v)| v.as_str())
    }

    fn first(&self, long: &'static str, compact: Option<&'static str>) -> Option<&str> {
        self.get(long, compact).next()
    }

    fn content_length(&self) -> Option<usize> {
        self.first("Content-Length", Some("l"))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// `"Name" <sip:user@Domain:5060;transport=tls>;tag=1` or `sip:user@domain;tag=1` -> the URI.
fn uri_of_name_addr(v: &str) -> Option<&str> {
    // A quoted display name may itself contain `<`: skip it first.
    let mut rest = v.trim_start();
    if let Some(q) = rest.strip_prefix('"') {
        let mut escaped = false;
        let mut end = None;
        for (i, c) in q.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &q[end? + 1..];
    }
    if let Some(open) = rest.find('<') {
        let inner = &rest[open + 1..];
        return inner.find('>').map(|close| inner[..close].trim());
    }
    // addr-spec: parameters after `;` belong to the header, not the URI.
    Some(rest.split(';').next().unwrap_or(rest).trim())
}

/// The domain (host part) of a `sip:`/`sips:` URI, lower-cased.
pub fn uri_domain(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once(':')?;
    if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
        return None;
    }
    let hostpart = rest.split([';', '?']).next().unwrap_or(rest);
    let hostport = hostpart.rsplit('@').next().unwrap_or(hostpart);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        hostport.split(':').next().unwrap_or(hostport)
    };
    let host = host.trim().trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// What a REGISTER registers, for Check Certificate: its From `user@host`, lower case (the
/// host as [`uri_domain`] reads it; a password in the user part is dropped).
fn register_name(head: &Head<'_>) -> Option<String> {
    let uri = uri_of_name_addr(head.first("From", Some("f"))?)?;
    let host = uri_domain(uri)?;
    let (_, rest) = uri.split_once(':')?;
    let (user, _) = rest.split([';', '?']).next()?.rsplit_once('@')?;
    let user = user.split(':').next()?.trim();
    (!user.is_empty()).then(|| format!("{}@{host}", user.to_ascii_lowercase()))
}

/// The routing name of a complete SIP request head.
fn from_domain(head: &Head<'_>) -> Result<String, &'static str> {
    let from = head.first("From", Some("f")).ok_or("no From header")?;
    let uri = uri_of_name_addr(from).ok_or("From is not a name-addr or addr-spec")?;
    uri_domain(uri).ok_or("From URI is not sip: or sips: with a host")
}

fn is_request_line(start: &str) -> bool {
    let mut parts = start.split(' ');
    let method = parts.next().unwrap_or("");
    let uri = parts.next().unwrap_or("");
    let version = parts.next().unwrap_or("");
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_alphabetic())
        && !uri.is_empty()
        && version.eq_ignore_ascii_case("SIP/2.0")
        && parts.next().is_none()
}

impl Sniffer for Sip {
    fn sniff(&self, whole: &[u8], max: usize) -> Sniffed {
        // Keep-alive CRLFs are skipped but count towards `max`: otherwise a stream of them
        // would be waited on (and rescanned) without end.
        let skip = skip_keepalive(whole);
        let buf = &whole[skip..];
        match parse_head(buf) {
            Ok(None) if whole.len() >= max => Sniffed::TooLarge,
            Ok(None) => {
                // Refuse early what can never become SIP.
                let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
                if !line.is_empty() && !line[0].is_ascii_alphabetic() {
                    Sniffed::Invalid("not a SIP request")
                } else {
                    Sniffed::NeedMore
                }
            }
            Err(e) => Sniffed::Invalid(e),
            Ok(Some(h)) if skip + h.len > max => Sniffed::TooLarge,
            Ok(Some(h)) => {
                if !is_request_line(h.start) {
                    return Sniffed::Invalid("not a SIP request line");
                }
                match from_domain(&h) {
                    Ok(d) => Sniffed::Name(d),
                    Err(e) => Sniffed::NoName(e),
                }
            }
        }
    }

    fn refuse(&self, buf: &[u8], why: Refusal) -> Option<Vec<u8>> {
        let buf = &buf[skip_keepalive(buf)..];
        let head = parse_head(buf).ok()??;
        if !is_request_line(head.start) || head.start.starts_with("ACK ") {
            // ACK is never answered (RFC 3261 17.2.3).
            return None;
        }
        let (code, reason) = match why {
            Refusal::UnknownName => (404, "Not Found"),
            Refusal::Forbidden => (403, "Forbidden"),
            Refusal::Unavailable => (503, "Service Unavailable"),
            Refusal::BadRequest => (400, "Bad Request"),
            Refusal::TooLarge => (513, "Message Too Large"),
        };
        let mut out = format!("SIP/2.0 {code} {reason}\r\n");
        for (long, compact) in [
            ("Via", Some("v")),
            ("From", Some("f")),
            ("To", Some("t")),
            ("Call-ID", Some("i")),
            ("CSeq", None),
        ] {
            for v in head.get(long, compact) {
                out.push_str(&format!("{long}: {v}\r\n"));
            }
        }
        out.push_str("Server: Portico\r\nContent-Length: 0\r\n\r\n");
        Some(out.into_bytes())
    }

    fn registration(&self, msg: &[u8]) -> Option<Vec<String>> {
        let buf = &msg[skip_keepalive(msg)..];
        let head = parse_head(buf).ok()??;
        if !head.start.starts_with("REGISTER ") {
            return None;
        }
        register_name(&head).map(|n| vec![n])
    }

    fn session(&self, max: usize) -> (Box<dyn Guard>, Box<dyn Monitor>) {
        let table = Arc::new(Mutex::new(Credentialed::default()));
        let guard = SipGuard {
            q: Backlog::default(),
            max,
            pending: None,
            table: Arc::clone(&table),
        };
        let monitor = SipMonitor {
            table: Some(table),
            ..SipMonitor::default()
        };
        (Box::new(guard), Box::new(monitor))
    }
}

/// Which forwarded requests of one connection carried credentials (`Authorization` or
/// `Proxy-Authorization`), by their transaction (Call-ID, CSeq): a 401/407 answering one of
/// them is a wrong password, while a 401/407 answering a request without credentials is the
/// ordinary challenge every phone gets on its first REGISTER and INVITE.
///
/// Bounded: at most [`CREDENTIALED_MAX`] transactions waiting for their final answer; when a
/// client pushes more, the oldest are dropped and counted, and as many unmatched 401/407 as
/// were dropped are then charged anyway, so pipelining guesses gains an attacker nothing.
pub struct Credentialed {
    keys: VecDeque<u64>,
    /// Credentialed transactions pushed out unanswered.
    evicted: usize,
    /// Keyed per connection, so a client cannot aim at collisions.
    hasher: RandomState,
}

pub const CREDENTIALED_MAX: usize = 256;

impl Default for Credentialed {
    fn default() -> Self {
        Credentialed {
            keys: VecDeque::new(),
            evicted: 0,
            hasher: RandomState::new(),
        }
    }
}

impl Credentialed {
    /// The transaction key of a head: its Call-ID and CSeq (number and method, the method
    /// upper-cased, whitespace normalised), as a request and its responses both carry them.
    fn key(&self, head: &Head<'_>) -> u64 {
        let call_id = head.first("Call-ID", Some("i")).unwrap_or("").trim();
        let cseq = head.first("CSeq", None).unwrap_or("");
        let mut h = self.hasher.build_hasher();
        call_id.hash(&mut h);
        for part in cseq.split_whitespace() {
            part.to_ascii_uppercase().hash(&mut h);
        }
        h.finish()
    }

    fn insert(&mut self, key: u64) {
        if self.keys.len() >= CREDENTIALED_MAX {
            self.keys.pop_front();
            self.evicted += 1;
        }
        self.keys.push_back(key);
    }

    /// Whether a final response to transaction `key` answers a credentialed request (the
    /// transaction is forgotten either way).
    fn answered(&mut self, key: u64) -> bool {
        match self.keys.iter().position(|&k| k == key) {
            Some(i) => {
                self.keys.remove(i);
                true
            }
            None => false,
        }
    }
}

fn lock(t: &Mutex<Credentialed>) -> std::sync::MutexGuard<'_, Credentialed> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn has_credentials(head: &Head<'_>) -> bool {
    head.first("Authorization", None).is_some() || head.first("Proxy-Authorization", None).is_some()
}

/// `Content-Length` of a message on a stream: absent means 0 (RFC 3261 18.3 requires it on
/// TCP; a missing one is read as an empty body, as the target would). Unreadable or given
/// twice is an error: where the guard and the target disagree on where a body ends, a
/// request could hide in what the guard takes for a body.
fn body_length(head: &Head<'_>) -> Result<usize, &'static str> {
    let mut values = head.get("Content-Length", Some("l"));
    let Some(v) = values.next() else {
        return Ok(0);
    };
    if values.next().is_some() {
        return Err("more than one SIP Content-Length");
    }
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad SIP Content-Length");
    }
    v.parse().map_err(|_| "bad SIP Content-Length")
}

fn is_status_line(start: &str) -> bool {
    start.strip_prefix("SIP/2.0 ").is_some_and(|rest| {
        let code = rest.as_bytes().get(..3);
        code.is_some_and(|c| c.iter().all(u8::is_ascii_digit))
            && rest.as_bytes().get(3).is_none_or(|&b| b == b' ')
    })
}

/// Follows the client's SIP messages after the first: REGISTER and INVITE (whatever the
/// case of the method) are named by their From domain for the proxy to check; other
/// requests and the client's responses to the target's requests pass. Requests let through
/// with credentials are noted in the shared [`Credentialed`] table.
pub struct SipGuard {
    q: Backlog,
    max: usize,
    /// Body bytes of the current message still to hand out (`forward`) or drop.
    /// The message waiting for [`Guard::decide`]: its body length and, when it carried
    /// credentials, its transaction key.
    pending: Option<(usize, Option<u64>)>,
    table: Arc<Mutex<Credentialed>>,
}

impl Guard for SipGuard {
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
            let k = skip_keepalive(&self.q.buf);
            if k > 0 {
                return Step::Forward(self.q.buf.drain(..k).collect());
            }
            let head = match parse_head(&self.q.buf) {
                Ok(Some(h)) => h,
                Ok(None) if self.q.buf.len() > self.max => return self.q.fail(Step::TooLarge),
                Ok(None) if !self.q.buf[0].is_ascii_alphabetic() => {
                    return self.q.fail(Step::Broken("not a SIP message"))
                }
                Ok(None) => return Step::Idle,
                Err(e) => return self.q.fail(Step::Broken(e)),
            };
            if head.len > self.max {
                return self.q.fail(Step::TooLarge);
            }
            let body = match body_length(&head) {
                Ok(b) => b,
                Err(e) => return self.q.fail(Step::Broken(e)),
            };
            let (check, key) = if is_request_line(head.start) {
                let method = head.start.split(' ').next().unwrap_or("");
                let check = if method.eq_ignore_ascii_case("REGISTER")
                    || method.eq_ignore_ascii_case("INVITE")
                {
                    match from_domain(&head) {
                        Ok(d) => Check::Name(d),
                        Err(e) => Check::NoName(e),
                    }
                } else {
                    Check::Pass
                };
                let key = has_credentials(&head).then(|| lock(&self.table).key(&head));
                (check, key)
            } else if is_status_line(head.start) {
                (Check::Pass, None)
            } else {
                return self
                    .q
                    .fail(Step::Broken("not a SIP request or response line"));
            };
            let len = head.len;
            self.pending = Some((body, key));
            return Step::Message {
                check,
                bytes: self.q.buf.drain(..len).collect(),
            };
        }
    }

    fn decide(&mut self, forward: bool) {
        if let Some((body, key)) = self.pending.take() {
            self.q.rest = body;
            self.q.forward = forward;
            if let (true, Some(key)) = (forward, key) {
                lock(&self.table).insert(key);
            }
        }
    }
}

/// Follows the target's SIP messages and reports rejections: 403 always; 401 and 407 only
/// when they answer a request that carried credentials (a wrong password, not the challenge
/// that starts every authentication), and not when the challenge says `stale=true` (RFC 7616
/// 3.3: the nonce was old, the credentials were not refused; a server says so only for a
/// correct digest or without checking the password at all).
#[derive(Default)]
pub struct SipMonitor {
    buf: Vec<u8>,
    /// Body bytes still to skip.
    skip: usize,
    /// Gave up after something unparseable: the stream is just relayed.
    lost: bool,
    /// Shared with the connection's [`SipGuard`]; without one, 401/407 never count.
    table: Option<Arc<Mutex<Credentialed>>>,
}

const MONITOR_MAX_HEAD: usize = 64 * 1024;

/// Whether a challenge (`Digest realm="x", nonce="y", stale=TRUE`) says `stale=true`.
fn says_stale(challenge: &str) -> bool {
    let params = challenge
        .trim_start()
        .split_once(char::is_whitespace)
        .map_or("", |(_, p)| p);
    params.split(',').any(|p| {
        p.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("stale")
                && v.trim().trim_matches('"').eq_ignore_ascii_case("true")
        })
    })
}

/// What a response head means for fraud detection: a description when it counts.
fn judge(table: Option<&Arc<Mutex<Credentialed>>>, head: &Head<'_>) -> Option<String> {
    let status = head.start.strip_prefix("SIP/2.0 ")?;
    let code = status.split(' ').next().unwrap_or("");
    let counts = match (code, table) {
        ("403", _) => true,
        ("401" | "407", Some(t)) => {
            let mut t = lock(t);
            let key = t.key(head);
            if t.answered(key) {
                let challenge = if code == "407" {
                    "Proxy-Authenticate"
                } else {
                    "WWW-Authenticate"
                };
                !head.get(challenge, None).any(says_stale)
            } else if t.evicted > 0 {
                // Unmatched, but credentialed requests were pushed out of the table
                // unanswered: this may answer one of them, so it is charged.
                t.evicted -= 1;
                true
            } else {
                false
            }
        }
        _ => false,
    };
    if let Some(t) = table {
        if !code.starts_with('1') && !matches!(code, "401" | "407") {
            // Any other final answer ends its transaction.
            let mut t = lock(t);
            let key = t.key(head);
            t.answered(key);
        }
    }
    counts.then(|| format!("SIP {}", status.trim()))
}

impl Monitor for SipMonitor {
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
        loop {
            let k = skip_keepalive(&self.buf);
            self.buf.drain(..k);
            let parsed = match parse_head(&self.buf) {
                Ok(Some(h)) => Some(h),
                Ok(None) if self.buf.len() > MONITOR_MAX_HEAD => None,
                Ok(None) => break,
                Err(_) => None,
            };
            let Some(head) = parsed else {
                self.lost = true;
                self.buf = Vec::new();
                break;
            };
            let (len, body) = (head.len, head.content_length().unwrap_or(0));
            if let Some(v) = judge(self.table.as_ref(), &head) {
                found.push(v);
            }
            // The target's Content-Length may be anything up to usize::MAX.
            let total = len.saturating_add(body);
            if total <= self.buf.len() {
                self.buf.drain(..total);
            } else {
                self.skip = total - self.buf.len();
                self.buf.clear();
                break;
            }
        }
        found
    }

    fn at_boundary(&self) -> bool {
        self.lost || (self.skip == 0 && self.buf.iter().all(|&b| b == b'\r' || b == b'\n'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(from: &str) -> Vec<u8> {
        format!(
            "REGISTER sip:reg.example SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK1\r\n{from}\r\nTo: <sip:a@x>\r\nCall-ID: 1@h\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn from_domain_in_every_form() {
        for (from, want) in [
            (
                "From: \"Alice <boss>\" <sip:alice@PBX.Example.com>;tag=1",
                "pbx.example.com",
            ),
            (
                "From: <sips:alice@pbx.example.com:5061;transport=tls>;tag=1",
                "pbx.example.com",
            ),
            ("From: sip:alice@pbx.example.com;tag=1", "pbx.example.com"),
            (
                "f: Alice <sip:alice:secret@pbx.example.com>",
                "pbx.example.com",
            ),
            ("from  :   <sip:pbx.example.com>", "pbx.example.com"),
            ("From: <sip:alice@[2001:db8::1]:5060>", "2001:db8::1"),
        ] {
            assert_eq!(
                Sip.sniff(&req(from), 4096),
                Sniffed::Name(want.into()),
                "{from}"
            );
        }
        let folded = b"INVITE sip:b@x SIP/2.0\r\nFrom:\r\n  <sip:a@folded.example>\r\n\r\n";
        assert_eq!(
            Sip.sniff(folded, 4096),
            Sniffed::Name("folded.example".into())
        );
    }

    #[test]
    fn registration_names_the_from_user_at_host() {
        let reg = "REGISTER sip:a.test SIP/2.0\r\nFrom: \"A\" <sip:Alice:pw@A.Test:5060;transport=tcp>;tag=1\r\n\r\n";
        assert_eq!(
            Sip.registration(reg.as_bytes()),
            Some(vec!["alice@a.test".to_string()])
        );
        let invite = "INVITE sip:a.test SIP/2.0\r\nFrom: <sip:alice@a.test>\r\n\r\n";
        assert_eq!(Sip.registration(invite.as_bytes()), None, "not a REGISTER");
        let anon = "REGISTER sip:a.test SIP/2.0\r\nFrom: <sip:a.test>\r\n\r\n";
        assert_eq!(Sip.registration(anon.as_bytes()), None);
    }

    #[test]
    fn incomplete_invalid_and_nameless() {
        let r = req("From: <sip:a@b.example>");
        assert_eq!(Sip.sniff(&r[..20], 4096), Sniffed::NeedMore);
        assert_eq!(Sip.sniff(&r, 30), Sniffed::TooLarge);
        let mut ka = b"\r\n\r\n".to_vec();
        ka.extend_from_slice(&r);
        assert_eq!(Sip.sniff(&ka, 4096), Sniffed::Name("b.example".into()));
        assert!(matches!(
            Sip.sniff(b"\x16\x03\x01", 4096),
            Sniffed::Invalid(_)
        ));
        assert!(matches!(
            Sip.sniff(b"SIP/2.0 200 OK\r\n\r\n", 4096),
            Sniffed::Invalid(_)
        ));
        assert!(matches!(
            Sip.sniff(&req("From: <tel:+123>"), 4096),
            Sniffed::NoName(_)
        ));
        assert!(matches!(
            Sip.sniff(&req("X-Nothing: 1"), 4096),
            Sniffed::NoName(_)
        ));
    }

    #[test]
    fn keepalive_flood_is_too_large() {
        let max = 16 * 1024;
        for unit in [&b"\r\n"[..], b"\r", b"\n"] {
            let flood = unit.repeat(4 * 1024 * 1024 / unit.len());
            assert_eq!(Sip.sniff(&flood, max), Sniffed::TooLarge);
            assert_eq!(Sip.sniff(&flood[..max + 1], max), Sniffed::TooLarge);
            assert_eq!(Sip.sniff(&flood[..max - 2], max), Sniffed::NeedMore);
        }
        // Keep-alives before a request count towards the limit.
        let r = req("From: <sip:a@b.example>");
        let mut padded = b"\r\n".repeat(max / 2);
        padded.extend_from_slice(&r);
        assert_eq!(Sip.sniff(&padded, max), Sniffed::TooLarge);
        assert_eq!(
            Sip.sniff(&padded, max + r.len()),
            Sniffed::Name("b.example".into())
        );
    }

    #[test]
    fn refusal_mirrors_the_transaction() {
        let r = Sip
            .refuse(&req("From: <sip:a@b.example>;tag=9"), Refusal::UnknownName)
            .unwrap();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("SIP/2.0 404 Not Found\r\n"), "{text}");
        for h in [
            "Via: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK1\r\n",
            "From: <sip:a@b.example>;tag=9\r\n",
            "Call-ID: 1@h\r\n",
            "CSeq: 1 REGISTER\r\n",
        ] {
            assert!(text.contains(h), "{h} in {text}");
        }
        let ack = b"ACK sip:b@x SIP/2.0\r\nFrom: <sip:a@b>\r\n\r\n";
        assert!(Sip.refuse(ack, Refusal::UnknownName).is_none());
    }

    /// Every step of a guard fed `stream` in chunks of `chunk` bytes, deciding `forward` on
    /// each message; consecutive `Forward`s are merged.
    fn steps(g: &mut dyn Guard, stream: &[u8], chunk: usize, forward: bool) -> Vec<Step> {
        let mut out: Vec<Step> = Vec::new();
        for c in stream.chunks(chunk) {
            g.push(c);
            loop {
                let s = g.next();
                match s {
                    Step::Idle => break,
                    Step::Message { .. } => g.decide(forward),
                    Step::Forward(ref b) => {
                        if let Some(Step::Forward(prev)) = out.last_mut() {
                            prev.extend_from_slice(b);
                            continue;
                        }
                    }
                    _ => {}
                }
                out.push(s);
            }
        }
        out
    }

    fn msg(method: &str, from: &str, cseq: u32, extra: &str, body: &str) -> String {
        format!(
            "{method} sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK{cseq}\r\nFrom: <sip:a@{from}>;tag=1\r\nTo: <sip:a@{from}>\r\nCall-ID: c1@h\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn guard_names_every_register_and_invite_and_passes_the_rest() {
        let register = msg("REGISTER", "alpha.test", 1, "", "");
        let invite = msg("INVITE", "Beta.Test", 2, "", "v=0\r\n");
        let ack = msg("ACK", "beta.test", 2, "", "");
        let options = msg("OPTIONS", "gamma.test", 3, "", "");
        let lower = msg("register", "gamma.test", 4, "", "");
        let nameless = msg("INVITE", "x", 5, "", "").replace("sip:a@x", "tel:+1");
        let answer = "SIP/2.0 200 OK\r\nCall-ID: srv@h\r\nCSeq: 9 OPTIONS\r\nl: 2\r\n\r\nok";
        let stream =
            format!("\r\n\r\n{register}{invite}\r\n{ack}{options}{lower}{nameless}{answer}");
        for chunk in [1, 7, 4096] {
            let (mut g, _) = Sip.session(4096);
            let got = steps(g.as_mut(), stream.as_bytes(), chunk, true);
            let head = |m: &str| m.as_bytes()[..m.find("\r\n\r\n").unwrap() + 4].to_vec();
            let message = |check, m: &str| Step::Message {
                check,
                bytes: head(m),
            };
            let want = vec![
                Step::Forward(b"\r\n\r\n".to_vec()),
                message(Check::Name("alpha.test".into()), &register),
                message(Check::Name("beta.test".into()), &invite),
                Step::Forward(b"v=0\r\n\r\n".to_vec()),
                message(Check::Pass, &ack),
                message(Check::Pass, &options),
                message(Check::Name("gamma.test".into()), &lower),
                message(
                    Check::NoName("From URI is not sip: or sips: with a host"),
                    &nameless,
                ),
                message(Check::Pass, answer),
                Step::Forward(b"ok".to_vec()),
            ];
            assert_eq!(got, want, "chunks of {chunk}");
        }
    }

    #[test]
    fn guard_drops_a_refused_message_with_its_body() {
        let invite = msg("INVITE", "beta.test", 1, "", "v=0\r\no=- 1 1 IN IP4 h\r\n");
        let bye = msg("BYE", "alpha.test", 2, "", "");
        let stream = format!("{invite}{bye}");
        for chunk in [3, 4096] {
            let (mut g, _) = Sip.session(4096);
            let mut forwarded = Vec::new();
            for c in stream.as_bytes().chunks(chunk) {
                g.push(c);
                loop {
                    match g.next() {
                        Step::Idle => break,
                        Step::Message { check, bytes } => {
                            let ok = check == Check::Pass;
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
                String::from_utf8(forwarded).unwrap(),
                bye,
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn guard_refuses_what_it_cannot_follow() {
        let (mut g, _) = Sip.session(256);
        g.push(&[b'A'; 300]);
        assert_eq!(g.next(), Step::TooLarge);
        g.push(b"more");
        assert_eq!(g.next(), Step::Idle, "stays ended");
        for bad in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"hello world\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\nContent-Length: lots\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\nContent-Length: +5\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\nl: 40\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\n\xff\xfe\r\n\r\n",
        ] {
            let (mut g, _) = Sip.session(4096);
            g.push(bad);
            assert!(matches!(g.next(), Step::Broken(_)), "{bad:?}");
        }
    }

    fn response(code: &str, cseq: u32, method: &str, extra: &str) -> String {
        format!(
            "SIP/2.0 {code}\r\nVia: SIP/2.0/TCP h\r\nCall-ID: c1@h\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n"
        )
    }

    /// Feeds requests through a session's guard (all forwarded) and responses through its
    /// monitor; returns what the monitor reported.
    fn conversation(requests: &[String], responses: &[String]) -> Vec<String> {
        let (mut g, mut m) = Sip.session(64 * 1024);
        steps(g.as_mut(), requests.concat().as_bytes(), 4096, true);
        let mut found = Vec::new();
        for chunk in responses.concat().as_bytes().chunks(5) {
            found.extend(m.feed(chunk));
        }
        found
    }

    #[test]
    fn only_challenges_to_credentialed_requests_count() {
        let auth = "Authorization: Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"sip:x\", response=\"0\"\r\n";
        let pauth = auth.replace("Authorization", "Proxy-Authorization");
        let challenge = "WWW-Authenticate: Digest realm=\"r\", nonce=\"n2\"\r\n";
        // The ordinary logins: challenge, then success.
        let found = conversation(
            &[
                msg("REGISTER", "a.test", 1, "", ""),
                msg("REGISTER", "a.test", 2, auth, ""),
                msg("INVITE", "a.test", 3, "", ""),
                msg("INVITE", "a.test", 4, &pauth, ""),
            ],
            &[
                response("401 Unauthorized", 1, "REGISTER", challenge),
                response("200 OK", 2, "REGISTER", ""),
                response("100 Trying", 3, "INVITE", ""),
                response("407 Proxy Authentication Required", 3, "INVITE", ""),
                response("180 Ringing", 4, "INVITE", ""),
            ],
        );
        assert!(found.is_empty(), "{found:?}");
        // Wrong passwords: the challenge answers credentials.
        let found = conversation(
            &[
                msg("REGISTER", "a.test", 1, auth, ""),
                msg("INVITE", "a.test", 2, &pauth, ""),
                msg("REGISTER", "a.test", 3, "", ""),
                msg("REGISTER", "a.test", 4, auth, ""),
            ],
            &[
                response("100 Trying", 1, "REGISTER", ""),
                response("401 Unauthorized", 1, "REGISTER", challenge),
                response("407 Proxy Authentication Required", 2, "INVITE", ""),
                // 403 counts whatever the request carried.
                response("403 Forbidden", 3, "REGISTER", ""),
                // An old nonce with right credentials is no failure (RFC 7616 3.3).
                response(
                    "401 Unauthorized",
                    4,
                    "register",
                    "WWW-Authenticate: Digest realm=\"r\", nonce=\"n3\", stale=TRUE\r\n",
                ),
                // Not a request of this connection: no transaction to match.
                response("401 Unauthorized", 77, "REGISTER", challenge),
            ],
        );
        assert_eq!(
            found,
            [
                "SIP 401 Unauthorized",
                "SIP 407 Proxy Authentication Required",
                "SIP 403 Forbidden"
            ]
        );
    }

    #[test]
    fn credentialed_requests_pushed_out_of_the_table_still_count() {
        let auth = "Authorization: Digest username=\"a\", response=\"0\"\r\n";
        let n = CREDENTIALED_MAX as u32 + 44;
        let requests: Vec<String> = (1..=n)
            .map(|i| msg("REGISTER", "a.test", i, auth, ""))
            .collect();
        let responses: Vec<String> = (1..=n)
            .map(|i| response("401 Unauthorized", i, "REGISTER", ""))
            .collect();
        assert_eq!(conversation(&requests, &responses).len(), n as usize);
    }

    #[test]
    fn monitor_follows_messages_across_splits() {
        let stream = b"SIP/2.0 100 Trying\r\nContent-Length: 0\r\n\r\nSIP/2.0 403 Forbidden\r\nl: 4\r\n\r\nSIP/SIP/2.0 200 OK\r\n\r\n\r\nSIP/2.0 403 Nope\r\n\r\n";
        let (_, mut m) = Sip.session(4096);
        let mut all = Vec::new();
        let mut boundaries = 0;
        for chunk in stream.chunks(7) {
            all.extend(m.feed(chunk));
            boundaries += usize::from(m.at_boundary());
        }
        assert_eq!(all, ["SIP 403 Forbidden", "SIP 403 Nope"]);
        assert!(m.at_boundary());
        assert!(boundaries >= 1);
        m.feed(b"SIP/2.0 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        assert!(!m.at_boundary(), "inside a body");
        m.feed(b"defghij");
        assert!(m.at_boundary());
        m.feed(b"SIP/2.0 2");
        assert!(!m.at_boundary(), "inside a head");
        // A target's absurd Content-Length is skipped over, not added up into a panic.
        let mut huge = SipMonitor::default();
        huge.feed(b"SIP/2.0 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nxyz");
        assert!(!huge.at_boundary());
        // Without a guard (no table) challenges never count.
        let mut alone = SipMonitor::default();
        assert!(alone
            .feed(b"SIP/2.0 401 Unauthorized\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\r\n")
            .is_empty());
    }
}
