//! SIP over TCP/TLS (RFC 3261): requests are routed by the domain of the `From` URI
//! (reference: "REGISTER and INVITE messages are routed based on the domain part of the URI in
//! the From: header"); other request methods are routed the same way.
//!
//! Only the head is needed: the request line, the headers (with line folding and compact
//! names) and nothing of the body.

use super::{Monitor, Refusal, Sniffed, Sniffer};

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

    fn monitor(&self) -> Box<dyn Monitor> {
        Box::new(SipMonitor::default())
    }
}

/// Follows the target's SIP messages and reports 401/403/407 responses.
#[derive(Default)]
pub struct SipMonitor {
    buf: Vec<u8>,
    /// Body bytes still to skip.
    skip: usize,
    /// Gave up after something unparseable: the stream is just relayed.
    lost: bool,
}

const MONITOR_MAX_HEAD: usize = 64 * 1024;

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
            let head = match parse_head(&self.buf) {
                Ok(Some(h)) => h,
                Ok(None) if self.buf.len() > MONITOR_MAX_HEAD => {
                    self.lost = true;
                    self.buf = Vec::new();
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    self.lost = true;
                    self.buf = Vec::new();
                    break;
                }
            };
            if let Some(status) = head.start.strip_prefix("SIP/2.0 ") {
                let code = status.split(' ').next().unwrap_or("");
                if matches!(code, "401" | "403" | "407") {
                    found.push(format!("SIP {}", status.trim()));
                }
            }
            let body = head.content_length().unwrap_or(0);
            // A Content-Length near usize::MAX must not wrap around (it would mark the
            // body as already here): saturate, and the rest of the stream is skipped.
            let total = head.len.saturating_add(body);
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

    #[test]
    fn monitor_counts_rejections_across_splits() {
        let stream = b"SIP/2.0 100 Trying\r\nContent-Length: 0\r\n\r\nSIP/2.0 401 Unauthorized\r\nl: 4\r\n\r\nSIP/SIP/2.0 200 OK\r\n\r\n\r\nSIP/2.0 407 Proxy Authentication Required\r\n\r\n";
        let mut m = SipMonitor::default();
        let mut all = Vec::new();
        for chunk in stream.chunks(7) {
            all.extend(m.feed(chunk));
        }
        assert_eq!(
            all,
            vec![
                "SIP 401 Unauthorized".to_string(),
                "SIP 407 Proxy Authentication Required".to_string()
            ]
        );
    }
}
