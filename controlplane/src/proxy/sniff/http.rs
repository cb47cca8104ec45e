//! HTTP/1 message heads and body framing, sans-IO.
//!
//! The proxy routes and checks every request on a keep-alive connection, so it must know
//! where each request (and each response) ends: [`BodyFramer`] follows `Content-Length` and
//! chunked framing byte by byte. Requests with ambiguous framing (both `Content-Length` and
//! `Transfer-Encoding`, differing lengths, a coding other than `chunked`) are refused, which
//! closes the door on request smuggling between the proxy and the target.

use std::fmt;

/// Headers parsed per message at most; more is refused.
const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Not HTTP/1.x, or broken syntax.
    Syntax(&'static str),
    /// The head is longer than allowed.
    TooLarge,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Syntax(m) => f.write_str(m),
            HttpError::TooLarge => f.write_str("head too large"),
        }
    }
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Bytes of the head, final empty line included.
    pub len: usize,
    pub method: String,
    pub target: String,
    /// Minor version: `HTTP/1.0` or `HTTP/1.1`.
    pub minor: u8,
    /// The single `Host` header, if any.
    pub host: Option<String>,
    /// All headers in order, raw.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: BodyKind,
    /// A WebSocket `Upgrade` asked for: after a 101 both sides stop speaking HTTP.
    ///
    /// All `Upgrade` lines are read as one comma list (a target may read any of them).
    /// WebSocket alone is the only upgrade offered to the target; a request offering only
    /// other protocols (h2c, TLS/1.0, ...) goes on as plain HTTP/1.1 with the offer removed
    /// (RFC 9110 7.8 lets a server ignore it), since the proxy could follow neither their
    /// framing nor their requests, which would then bypass its checks. WebSocket offered
    /// together with anything else is refused as malformed: which one the target picks
    /// cannot be known.
    pub upgrade: bool,
    /// The request carries an `Authorization` header: a 401 to it is a failed login, not
    /// the challenge every client without credentials gets first.
    pub credentials: bool,
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub chunked: bool,
    /// Any `Transfer-Encoding`: without `chunked` last, the body runs until close.
    pub te: bool,
    pub length: Option<u64>,
}

fn syntax(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::TooManyHeaders => HttpError::Syntax("too many headers"),
        httparse::Error::Version => HttpError::Syntax("not HTTP/1.x"),
        _ => HttpError::Syntax("malformed head"),
    }
}

/// `Ok(None)` while the head is incomplete and within `max` bytes.
pub fn parse_request(buf: &[u8], max: usize) -> Result<Option<RequestHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(syntax)? {
        httparse::Status::Partial => {
            return if buf.len() >= max {
                Err(HttpError::TooLarge)
            } else {
                Ok(None)
            };
        }
        httparse::Status::Complete(n) => n,
    };
    if len > max {
        return Err(HttpError::TooLarge);
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default().to_string();
    let minor = req.version.unwrap_or(1);
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut offers: Vec<String> = Vec::new();
    let mut credentials = false;
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HttpError::Syntax("more than one Host header"));
            }
            let v =
                std::str::from_utf8(h.value).map_err(|_| HttpError::Syntax("Host is not text"))?;
            host = Some(v.trim().to_string());
        } else if n.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(HttpError::Syntax("bad Content-Length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(HttpError::Syntax("conflicting Content-Length"));
            }
            length = Some(v);
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err(HttpError::Syntax("more than one Transfer-Encoding"));
            }
            te = Some(h.value);
        } else if n.eq_ignore_ascii_case("upgrade") {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| HttpError::Syntax("Upgrade is not text"))?;
            offers.extend(
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        } else if n.eq_ignore_ascii_case("authorization") {
            credentials |= !h.value.trim_ascii().is_empty();
        }
    }
    let upgrade = offers.iter().any(|t| t == "websocket");
    if upgrade && offers.iter().any(|t| t != "websocket") {
        return Err(HttpError::Syntax(
            "WebSocket upgrade offered together with another protocol",
        ));
    }
    let body = match (te, length) {
        (Some(_), Some(_)) => {
            return Err(HttpError::Syntax(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (Some(v), None) => {
            if minor == 0 || !v.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(HttpError::Syntax("unsupported Transfer-Encoding"));
            }
            BodyKind::Chunked
        }
        (None, Some(0)) | (None, None) => BodyKind::None,
        (None, Some(n)) => BodyKind::Length(n),
    };
    if method == "CONNECT" {
        return Err(HttpError::Syntax("CONNECT is not proxied"));
    }
    let headers = req
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    Ok(Some(RequestHead {
        len,
        method,
        target,
        minor,
        host,
        headers,
        body,
        upgrade,
        credentials,
    }))
}

pub fn parse_response(buf: &[u8], max: usize) -> Result<Option<ResponseHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf).map_err(syntax)? {
        httparse::Status::Partial => {
            return if buf.len() >= max {
                Err(HttpError::TooLarge)
            } else {
                Ok(None)
            };
        }
        httparse::Status::Complete(n) => n,
    };
    let mut chunked = false;
    let mut te = false;
    let mut length = None;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // RFC 9112 6.3: chunked only counts as the final coding.
            te = true;
            chunked = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        }
    }
    Ok(Some(ResponseHead {
        len,
        status: res.code.unwrap_or(0),
        chunked,
        te,
        length,
    }))
}

impl ResponseHead {
    /// RFC 9112 6.3, for the response to a request whose method was HEAD or not.
    pub fn body(&self, head_request: bool) -> BodyKind {
        if head_request || (100..200).contains(&self.status) || matches!(self.status, 204 | 304) {
            BodyKind::None
        } else if self.chunked {
            BodyKind::Chunked
        } else if self.te {
            BodyKind::UntilClose
        } else {
            match self.length {
                Some(0) => BodyKind::None,
                Some(n) => BodyKind::Length(n),
                None => BodyKind::UntilClose,
            }
        }
    }
}

/// The host name of a `Host` value or an authority: port removed, IPv6 brackets kept off.
pub fn host_name(authority: &str) -> &str {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => a,
    }
}

/// Splits an absolute-form target (`http://host:port/path?q`) into authority and
/// origin-form; `None` for anything else.
pub fn split_absolute(target: &str) -> Option<(&str, String)> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(end);
    let auth = auth.rsplit('@').next().unwrap_or(auth);
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Some((auth, path))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size {
        digits: u32,
        ext: bool,
        line: usize,
        cr: bool,
    },
    Data(u64),
    DataEnd {
        cr: bool,
    },
    Trailer {
        line: usize,
        total: usize,
        cr: bool,
    },
}

/// Where a body ends, fed the bytes that follow a head.
#[derive(Debug, Clone)]
pub struct BodyFramer {
    state: Framing,
}

#[derive(Debug, Clone)]
enum Framing {
    Length(u64),
    Chunked { size: u64, at: Chunk },
    UntilClose,
    Done,
}

/// Chunk-size lines and trailers are small; anything longer is an attack or a broken peer.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

impl BodyFramer {
    pub fn new(kind: BodyKind) -> BodyFramer {
        let state = match kind {
            BodyKind::None | BodyKind::Length(0) => Framing::Done,
            BodyKind::Length(n) => Framing::Length(n),
            BodyKind::Chunked => Framing::Chunked {
                size: 0,
                at: Chunk::Size {
                    digits: 0,
                    ext: false,
                    line: 0,
                    cr: false,
                },
            },
            BodyKind::UntilClose => Framing::UntilClose,
        };
        BodyFramer { state }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, Framing::Done)
    }

    pub fn until_close(&self) -> bool {
        matches!(self.state, Framing::UntilClose)
    }

    /// Consumes body bytes from the front of `data`; returns how many belong to this body.
    /// Stops at the body's end (the rest of `data` is the next message).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        match &mut self.state {
            Framing::Done => Ok(0),
            Framing::UntilClose => Ok(data.len()),
            Framing::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.state = Framing::Done;
                }
                Ok(n as usize)
            }
            Framing::Chunked { .. } => self.feed_chunked(data),
        }
    }

    fn feed_chunked(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        let bad = |m| Err(HttpError::Syntax(m));
        let mut i = 0;
        while i < data.len() {
            let Framing::Chunked { size, at } = &mut self.state else {
                break;
            };
            match at {
                Chunk::Size {
                    digits,
                    ext,
                    line,
                    cr,
                } => {
                    let b = data[i];
                    i += 1;
                    *line += 1;
                    if *line > MAX_CHUNK_LINE {
                        return bad("chunk size line too long");
                    }
                    // Lines end in CRLF and nothing else: a peer that also takes a bare LF
                    // (or CR) as a line end would see other chunks than the proxy did.
                    if *cr && b != b'\n' {
                        return bad("CR without LF in a chunk size line");
                    }
                    match b {
                        b'\n' if !*cr => return bad("bare LF in a chunk size line"),
                        b'\n' => {
                            if *digits == 0 {
                                return bad("chunk without a size");
                            }
                            *at = if *size == 0 {
                                Chunk::Trailer {
                                    line: 0,
                                    total: 0,
                                    cr: false,
                                }
                            } else {
                                Chunk::Data(*size)
                            };
                        }
                        b'\r' => *cr = true,
                        _ if *ext => {}
                        b';' | b' ' | b'\t' => *ext = true,
                        _ => {
                            let Some(d) = (b as char).to_digit(16) else {
                                return bad("bad chunk size");
                            };
                            *digits += 1;
                            if *digits > 15 {
                                return bad("chunk size too large");
                            }
                            *size = *size << 4 | u64::from(d);
                        }
                    }
                }
                Chunk::Data(left) => {
                    let n = (*left).min((data.len() - i) as u64);
                    *left -= n;
                    i += n as usize;
                    if *left == 0 {
                        *at = Chunk::DataEnd { cr: false };
                    }
                }
                Chunk::DataEnd { cr } => {
                    let b = data[i];
                    i += 1;
                    match (b, *cr) {
                        (b'\r', false) => *cr = true,
                        (b'\n', true) => {
                            *size = 0;
                            *at = Chunk::Size {
                                digits: 0,
                                ext: false,
                                line: 0,
                                cr: false,
                            };
                        }
                        _ => return bad("chunk not followed by CRLF"),
                    }
                }
                Chunk::Trailer { line, total, cr } => {
                    let b = data[i];
                    i += 1;
                    *total += 1;
                    if *total > MAX_TRAILERS {
                        return bad("trailers too long");
                    }
                    if *cr && b != b'\n' {
                        return bad("CR without LF in the trailers");
                    }
                    match b {
                        b'\n' if !*cr => return bad("bare LF in the trailers"),
                        b'\n' if *line == 0 => {
                            self.state = Framing::Done;
                            return Ok(i);
                        }
                        b'\n' => {
                            *line = 0;
                            *cr = false;
                        }
                        b'\r' => *cr = true,
                        _ => *line += 1,
                    }
                }
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_fields() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: Example.COM:8080\r\nContent-Length: 5\r\n\r\nhello";
        let h = parse_request(raw, 1024).unwrap().unwrap();
        assert_eq!(h.len, raw.len() - 5);
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/a?b");
        assert_eq!(h.host.as_deref(), Some("Example.COM:8080"));
        assert_eq!(host_name(h.host.as_deref().unwrap()), "Example.COM");
        assert_eq!(h.body, BodyKind::Length(5));
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", 1024)
            .unwrap()
            .is_none());
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: aaaaaaaaaaaa", 20).unwrap_err(),
            HttpError::TooLarge
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / FTP/1.0\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(raw, 4096), Err(HttpError::Syntax(_))),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn hosts_and_absolute_targets() {
        assert_eq!(host_name("[::1]:443"), "::1");
        assert_eq!(host_name("a.example"), "a.example");
        assert_eq!(
            split_absolute("http://u@a.example:81/x?y"),
            Some(("a.example:81", "/x?y".to_string()))
        );
        assert_eq!(
            split_absolute("HTTPS://a.example"),
            Some(("a.example", "/".to_string()))
        );
        assert_eq!(split_absolute("/x"), None);
    }

    #[test]
    fn chunked_framing_stops_at_the_end() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let mut f = BodyFramer::new(BodyKind::Chunked);
        // Byte by byte must give the same answer as all at once.
        let mut used = 0;
        for b in body.iter() {
            used += f.feed(std::slice::from_ref(b)).unwrap();
            if f.is_done() {
                break;
            }
        }
        assert!(f.is_done());
        assert_eq!(&body[used..], b"GET /next");
        let mut g = BodyFramer::new(BodyKind::Chunked);
        assert_eq!(g.feed(body).unwrap(), used);
        assert!(BodyFramer::new(BodyKind::Chunked).feed(b"zz\r\n").is_err());
        let mut h = BodyFramer::new(BodyKind::Chunked);
        assert_eq!(h.feed(b"0\r\n\r\nX").unwrap(), 5);
        assert!(h.is_done());
        assert!(BodyFramer::new(BodyKind::Chunked)
            .feed(b"1\r\nab\r\n")
            .is_err());
    }

    #[test]
    fn chunked_lines_end_in_crlf_only() {
        for body in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5\r\nhello\r\n0\r\nTrailer: x\n\r\n",
            b"5;a=b\n\rhello\r\n0\r\n\r\n",
            b"5\rX\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nT: x\rX\r\n\r\n",
        ] {
            // All at once and byte by byte.
            let whole = BodyFramer::new(BodyKind::Chunked).feed(body);
            assert!(whole.is_err(), "{:?}", String::from_utf8_lossy(body));
            let mut f = BodyFramer::new(BodyKind::Chunked);
            let bytewise = body
                .iter()
                .try_for_each(|b| f.feed(std::slice::from_ref(b)).map(|_| ()));
            assert!(bytewise.is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn only_websocket_upgrades() {
        let h = |up: &str| {
            let raw = format!(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {up}\r\n\r\n"
            );
            parse_request(raw.as_bytes(), 4096)
                .unwrap()
                .unwrap()
                .upgrade
        };
        assert!(h("websocket"));
        assert!(h("WebSocket "));
        assert!(!h("h2c"));
        assert!(!h("TLS/1.0"));
    }

    #[test]
    fn repeated_upgrade_lines_are_one_list() {
        let parse = |lines: &str| {
            let raw = format!(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n{lines}\r\n"
            );
            parse_request(raw.as_bytes(), 4096).map(|h| h.map(|h| h.upgrade))
        };
        // WebSocket and anything else, on one line or on several, in any order: refused.
        for lines in [
            "Upgrade: h2c\r\nUpgrade: websocket\r\n",
            "Upgrade: websocket\r\nUpgrade: h2c\r\n",
            "Upgrade: websocket, h2c\r\n",
            "Upgrade: h2c, WebSocket\r\n",
            "upgrade: websocket\r\nUPGRADE: TLS/1.0\r\n",
        ] {
            assert!(
                matches!(parse(lines), Err(HttpError::Syntax(_))),
                "{lines:?} accepted"
            );
        }
        // Only foreign protocols: no upgrade (the offer is stripped on the way).
        assert_eq!(
            parse("Upgrade: h2c\r\nUpgrade: TLS/1.0\r\n"),
            Ok(Some(false))
        );
        // WebSocket named twice is still WebSocket alone; empty elements are ignored.
        assert_eq!(
            parse("Upgrade: websocket\r\nUpgrade: , WebSocket\r\n"),
            Ok(Some(true))
        );
    }

    #[test]
    fn credentials_are_noticed() {
        let creds = |extra: &str| {
            let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
            parse_request(raw.as_bytes(), 4096)
                .unwrap()
                .unwrap()
                .credentials
        };
        assert!(creds("Authorization: Basic YWxpY2U6d3Jvbmc=\r\n"));
        assert!(creds("authorization: Bearer x\r\n"));
        assert!(!creds(""));
        assert!(!creds("Authorization: \r\n"));
        assert!(!creds("Proxy-Authorization: Basic eA==\r\n"));
    }

    #[test]
    fn length_framing() {
        let mut f = BodyFramer::new(BodyKind::Length(3));
        assert_eq!(f.feed(b"ab").unwrap(), 2);
        assert_eq!(f.feed(b"cdef").unwrap(), 1);
        assert!(f.is_done());
    }

    #[test]
    fn response_bodies() {
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.body(false), BodyKind::None);
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.body(false), BodyKind::Length(7));
        assert_eq!(r.body(true), BodyKind::None);
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.body(false), BodyKind::UntilClose);
        let r = parse_response(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n",
            1024,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.body(false), BodyKind::Chunked);
    }
}
