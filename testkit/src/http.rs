//! HTTP/1.1, just enough for the API, `/metrics`, Prometheus's query API and requests
//! through the reverse proxy (from a source address of the test's choosing); curl through the
//! proxy; a TLS ClientHello probe.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::net::tcp_from;
use crate::process::{require, run};

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One request on a new connection with `Connection: close`; the whole answer.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    http_on(s, addr, method, path, headers, body)
}

/// [`http`] from the loopback address `src`.
pub fn http_from(
    src: IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    http_on(tcp_from(src, addr)?, addr, method, path, headers, body)
}

fn http_on(
    mut s: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "bad HTTP response"))
}

/// The status and the Content-Length (0 when absent) of a response head.
fn status_and_length(head: &str) -> Option<(u16, usize)> {
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    Some((status, len))
}

/// A whole response as read until the connection closed; chunked bodies are decoded.
pub fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&rest[..nl]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Reads one response with a Content-Length body from a kept-alive stream: `(status, body)`;
/// `None` at EOF or on an error.
pub fn read_response(s: &mut impl Read) -> Option<(u16, String)> {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => return None,
        }
    }
    let (status, len) = status_and_length(&String::from_utf8_lossy(&got))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).to_string()))
}

/// Reads until `needle` arrived or the stream stops giving data.
pub fn read_until(r: &mut impl Read, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).to_string()
}

/// Sends raw bytes to 127.0.0.1:`port` and reads until EOF or `limit`.
pub fn raw_exchange(port: u16, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(limit))
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(request)
        .unwrap_or_else(|e| panic!("write to 127.0.0.1:{port}: {e}"));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Through the reverse proxy

/// What became of a request through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP answer with this status.
    Status(u16),
    /// The connection was closed (or reset) without a byte of answer: refused at accept.
    Refused,
}

/// `GET path` with `Host: app.test` through the proxy at `proxy`, from source address `src`.
pub fn get_from(src: IpAddr, proxy: SocketAddr, path: &str) -> Answer {
    get_with(src, proxy, path, &[])
}

/// [`get_from`] with extra header lines (`"Name: value"`).
pub fn get_with(src: IpAddr, proxy: SocketAddr, path: &str, headers: &[&str]) -> Answer {
    let mut s = tcp_from(src, proxy).unwrap_or_else(|e| panic!("connect {proxy} from {src}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    // A refused connection may already be closed when the request goes out.
    let _ = s.write_all(req.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                break
            }
            Err(e) => panic!(
                "GET {path} via {proxy} from {src}: {e} after {} bytes",
                raw.len()
            ),
        }
    }
    if raw.is_empty() {
        return Answer::Refused;
    }
    match parse_response(&raw) {
        Some(r) => Answer::Status(r.status),
        None => panic!(
            "GET {path} via {proxy} from {src}: not HTTP: {:?}",
            String::from_utf8_lossy(&raw)
        ),
    }
}

/// One HTTP/1.1 keep-alive connection through the proxy, from a chosen source address.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn open(src: IpAddr, proxy: SocketAddr) -> KeepAlive {
        let stream =
            tcp_from(src, proxy).unwrap_or_else(|e| panic!("connect {proxy} from {src}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
        KeepAlive {
            stream,
            buf: Vec::new(),
        }
    }

    /// `GET path` on this connection: the answer, or [`Answer::Refused`] when the
    /// connection is closed instead.
    pub fn get(&mut self, path: &str) -> Answer {
        self.get_with(path, &[])
    }

    /// [`KeepAlive::get`] with extra header lines (`"Name: value"`).
    pub fn get_with(&mut self, path: &str, headers: &[&str]) -> Answer {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        if self.stream.write_all(req.as_bytes()).is_err() {
            return Answer::Refused;
        }
        let mut tmp = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let (status, len) =
                    status_and_length(&head).unwrap_or_else(|| panic!("not HTTP: {head:?}"));
                if self.buf.len() >= end + 4 + len {
                    self.buf.drain(..end + 4 + len);
                    return Answer::Status(status);
                }
            }
            match self.stream.read(&mut tmp) {
                Ok(0) => return Answer::Refused,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    return Answer::Refused
                }
                Err(e) => panic!("GET {path} on a kept-alive connection: {e}"),
            }
        }
    }
}

/// Sends a TLS ClientHello to `to` from `src`: true when the server answers with TLS bytes
/// (its ServerHello), false when it closes the connection without a byte, i.e. before any
/// TLS work.
pub fn tls_hello_answered(src: IpAddr, to: SocketAddr) -> bool {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("rustls: {e}"))
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("app.test").unwrap_or_else(|e| panic!("{e}"));
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .unwrap_or_else(|e| panic!("rustls: {e}"));
    let mut s = tcp_from(src, to).unwrap_or_else(|e| panic!("connect {to} from {src}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    while conn.wants_write() {
        if conn.write_tls(&mut s).is_err() {
            return false;
        }
    }
    let mut buf = [0u8; 5];
    match s.read(&mut buf) {
        // A TLS record: handshake (22) or alert (21).
        Ok(n) if n > 0 => matches!(buf[0], 21 | 22),
        Ok(_) => false,
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => false,
        Err(e) => panic!("TLS from {src} to {to}: {e}"),
    }
}

/// curl through the proxy: `name` resolves to 127.0.0.1. Returns (status, body).
pub fn curl(scheme: &str, name: &str, port: u16, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("{scheme}://{name}:{port}{path}");
    let resolve = format!("{name}:{port}:127.0.0.1");
    let mut args = vec![
        "-sS",
        "--max-time",
        "15",
        "--resolve",
        &resolve,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let o = run(
        &require("curl", "curl"),
        &args,
        &[],
        Duration::from_secs(30),
    );
    let (body, code) = o.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
