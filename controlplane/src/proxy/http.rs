//! HTTP(S): every request on a keep-alive connection is routed by its `Host`, checked against
//! the service's `allow_from` and `urls`, given `X-Forwarded-For`/`-Proto`, and forwarded.
//!
//! A client connection is tied to one target connection: a later request for another service
//! gets 421 (clients open one connection per host anyway). Responses flow back through a pump
//! task that follows their framing, so the proxy knows where each ends (to see every status,
//! for the fraud engine) and can put its own refusal after the last forwarded response: to
//! refuse mid-connection, the request side half-closes the target, lets the pump drain the
//! remaining responses, then writes the refusal and closes.
//!
//! Behind a trusted proxy (`proxy.trusted_proxies`), each request's client is the rightmost
//! address in its `X-Forwarded-For` (or else `Forwarded: for=`) that is not itself a trusted
//! proxy. That client, not the trusted proxy, is charged with the request's suspicious
//! events, checked against the blacklist and against `allow_from`. A request from a trusted
//! proxy that names no usable client address is charged to no one (the trusted proxy's own
//! address never is) and checked as coming from the trusted proxy.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use portico_shared::proxy_config::ServiceType;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::access::{canonical_ip, normalize_target, url_allowed};
use super::events::{Events, Reason};
use super::forward::{self, Activity, BoxStream, BUF};
use super::metrics::UNKNOWN_SERVICE;
use super::route::{Lookup, Target};
use super::sniff::http::{host_name, parse_request, parse_response, split_absolute};
use super::sniff::http::{BodyFramer, HttpError, RequestHead};
use super::{until_blocked, Blocked, Snapshot};

/// One client connection's context.
pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub stype: ServiceType,
    pub snap: Arc<Snapshot>,
    pub events: Events,
    /// End of the time allowed for the TLS handshake plus the first request head.
    pub first_deadline: tokio::time::Instant,
    /// Asked before every request and while an upgraded connection is relayed.
    pub blocked: Blocked,
}

/// Who a request comes from, as far as events, the blacklist and `allow_from` go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Client {
    /// Charged with the request's suspicious events: the peer, or the client a trusted
    /// proxy forwarded; `None` for a trusted proxy that named none.
    charged: Option<IpAddr>,
    /// Checked against the blacklist and `allow_from`: `charged`, else the peer.
    addr: IpAddr,
}

impl Conn {
    fn source(&self) -> IpAddr {
        canonical_ip(self.peer.ip())
    }

    fn trusted(&self) -> bool {
        self.snap.trusted.contains(self.source())
    }

    /// The client of a request with head `head`; `None` before a head is known (then a
    /// trusted proxy is the client, charged with nothing).
    fn client(&self, head: Option<&RequestHead>) -> Client {
        let peer = self.source();
        if !self.trusted() {
            return Client {
                charged: Some(peer),
                addr: peer,
            };
        }
        let charged = head.and_then(|h| forwarded_client(h, &self.snap.trusted));
        Client {
            charged,
            addr: charged.unwrap_or(peer),
        }
    }

    fn report(&self, client: &Client, reason: Reason) {
        self.events.report_for(client.charged, self.stype, reason);
    }

    /// Whether `addr` has been blacklisted since the connection was accepted; counted.
    /// Counts one of the proxy's own answers, for the service of `route` if the request was
    /// routed (`portico_proxy_requests_total`).
    fn answered(&self, route: Option<usize>, code: u16) {
        let service = match route {
            Some(i) => self.snap.routes_by_index(i).name.as_str(),
            None => UNKNOWN_SERVICE,
        };
        self.events.metrics().request(service, self.stype, code);
    }

    fn now_blocked(&self, addr: IpAddr) -> bool {
        let b = (self.blocked)(addr);
        if b {
            self.events.metrics().refused_blocked.inc();
        }
        b
    }
}

/// The client a trusted proxy forwarded: the rightmost `X-Forwarded-For` hop (or, without
/// that header, `Forwarded: for=`) that is not itself a trusted proxy. `None` when there is
/// no such hop, or when it is not an IP address (`unknown`, an obfuscated name): a client
/// that cannot be named cannot be charged.
fn forwarded_client(
    head: &RequestHead,
    trusted: &portico_shared::addr::CidrList,
) -> Option<IpAddr> {
    let values = |name: &'static str| {
        head.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
    };
    let mut hops: Vec<&str> = values("x-forwarded-for")
        .flat_map(|v| v.split(','))
        .collect();
    if hops.is_empty() {
        hops = values("forwarded")
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v)
                })
            })
            .collect();
    }
    for hop in hops.iter().rev() {
        let ip = hop_ip(hop)?;
        if !trusted.contains(ip) {
            return Some(ip);
        }
    }
    None
}

/// One forwarded hop as an address: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally in double quotes (`Forwarded`).
fn hop_ip(hop: &str) -> Option<IpAddr> {
    let h = hop.trim().trim_matches('"').trim();
    let ip = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next()?.parse().ok()?
    } else if let Ok(ip) = h.parse::<IpAddr>() {
        ip
    } else {
        let (a, port) = h.rsplit_once(':')?;
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        a.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)?
    };
    Some(canonical_ip(ip))
}

/// What the response pump needs to know about each forwarded request.
struct ReqInfo {
    head: bool,
    upgrade: Option<oneshot::Sender<bool>>,
    /// Charged when the target rejects the request.
    client: Option<IpAddr>,
    /// The request carried `Authorization`: only then is a 401 a failed login.
    credentials: bool,
}

struct Upstream {
    route: usize,
    w: WriteHalf<BoxStream>,
    reqs: mpsc::UnboundedSender<ReqInfo>,
    pump: JoinHandle<WriteHalf<BoxStream>>,
    done: watch::Receiver<bool>,
}

enum Decision {
    Forward {
        route: usize,
        target: Target,
        head: Vec<u8>,
    },
    /// Code, the suspicious event to report, the route when the request named one.
    Refuse(u16, Option<Reason>, Option<usize>),
    Redirect(u16, String, usize),
}

enum HeadRead {
    Head(RequestHead),
    /// Client closed, broke, or the target went away: end quietly.
    End,
    Timeout,
    Bad(HttpError),
}

fn status_text(code: u16) -> &'static str {
    match code {
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Error",
    }
}

fn response(code: u16, location: Option<&str>) -> Vec<u8> {
    let text = status_text(code);
    let body = format!("{code} {text}\n");
    let mut r =
        format!("HTTP/1.1 {code} {text}\r\nServer: Portico\r\nContent-Type: text/plain\r\n");
    if let Some(l) = location {
        r.push_str(&format!("Location: {l}\r\n"));
    }
    r.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    r.into_bytes()
}

/// Serves one client connection until it ends.
pub async fn serve(client: BoxStream, conn: Conn) {
    let (mut cr, cw) = tokio::io::split(client);
    let mut cw = Some(cw);
    let limits = conn.snap.limits.clone();
    let idle = limits.idle_timeout.get();
    let activity = Activity::new();
    activity.touch();
    let mut buf: Vec<u8> = Vec::with_capacity(BUF);
    let mut tmp = vec![0u8; BUF];
    let mut up: Option<Upstream> = None;
    let mut first = true;
    // The address the last request came from: what the relay watches for a blacklisting.
    let mut last = conn.client(None).addr;
    loop {
        let read = read_head(
            &mut cr,
            &mut buf,
            &mut tmp,
            &conn,
            first,
            &activity,
            idle,
            up.as_mut().map(|u| &mut u.done),
        )
        .await;
        let head = match read {
            HeadRead::Head(h) => h,
            HeadRead::End => break,
            // A started head that does not complete in time (the first one, or any later
            // one): slowloris on a keep-alive connection is the same attack.
            HeadRead::Timeout if first || !buf.is_empty() => {
                conn.report(&conn.client(None), Reason::FirstMessageTimeout);
                conn.answered(None, 408);
                return finish(up, cw, response(408, None), idle).await;
            }
            HeadRead::Timeout => break,
            HeadRead::Bad(HttpError::TooLarge) => {
                conn.report(&conn.client(None), Reason::TooLarge);
                conn.answered(None, 431);
                return finish(up, cw, response(431, None), idle).await;
            }
            HeadRead::Bad(HttpError::Syntax(m)) => {
                conn.report(&conn.client(None), Reason::Malformed(m));
                conn.answered(None, 400);
                return finish(up, cw, response(400, None), idle).await;
            }
        };
        first = false;
        let client = conn.client(Some(&head));
        last = client.addr;
        if conn.now_blocked(client.addr) {
            // Blacklisted meanwhile (maybe by this very connection's failed logins): the
            // responses still owed go out, then the refusal, then the connection closes.
            conn.answered(None, 403);
            return finish(up, cw, response(403, None), idle).await;
        }
        let (route, target, out) = match decide(&conn, &head, &client) {
            Decision::Refuse(code, reason, route) => {
                if let Some(r) = reason {
                    conn.report(&client, r);
                }
                conn.answered(route, code);
                return finish(up, cw, response(code, None), idle).await;
            }
            Decision::Redirect(code, location, route) => {
                conn.answered(Some(route), code);
                return finish(up, cw, response(code, Some(&location)), idle).await;
            }
            Decision::Forward {
                route,
                target,
                head,
            } => (route, target, head),
        };
        if up.as_ref().is_some_and(|u| u.route != route) {
            conn.answered(Some(route), 421);
            return finish(up, cw, response(421, None), idle).await;
        }
        if up.is_none() {
            let Some(writer) = cw.take() else { return };
            let r = &conn.snap.routes_by_index(route);
            match forward::connect(&conn.snap, r, target, conn.peer, conn.local).await {
                Ok(stream) => up = Some(start_pump(stream, writer, route, &conn, &activity)),
                Err(e) => {
                    tracing::debug!(peer = %conn.peer, "target unreachable: {e}");
                    conn.report(&client, Reason::TargetUnreachable(e));
                    conn.answered(Some(route), 502);
                    return finish(None, Some(writer), response(502, None), idle).await;
                }
            }
        }
        let Some(u) = up.as_mut() else { return };
        let (upgrade_tx, upgrade_rx) = if head.upgrade {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let _ = u.reqs.send(ReqInfo {
            head: head.method == "HEAD",
            upgrade: upgrade_tx,
            client: client.charged,
            credentials: head.credentials,
        });
        if u.w.write_all(&out).await.is_err() {
            break;
        }
        conn.events.metrics().forwarded(conn.stype);
        buf.drain(..head.len);
        if forward_body(
            &mut cr, &mut u.w, &mut buf, &mut tmp, &head, &activity, idle,
        )
        .await
        .is_err()
        {
            break;
        }
        if let Some(rx) = upgrade_rx {
            let upgraded = matches!(tokio::time::timeout(idle, rx).await, Ok(Ok(true)));
            if upgraded {
                // From here on both sides speak another protocol: relay bytes as they come,
                // until the source is blacklisted.
                if u.w.write_all(&buf).await.is_ok() {
                    let none = |_: String| {};
                    let w = &mut u.w;
                    let cut = tokio::select! {
                        _ = forward::pump(&mut cr, w, &activity, idle, None, &none) => false,
                        () = until_blocked(&conn.blocked, client.addr) => true,
                    };
                    if cut {
                        conn.events.metrics().refused_blocked.inc();
                        // Dropping both halves of both connections closes them.
                        u.pump.abort();
                        return;
                    }
                }
                break;
            }
        }
    }
    // The client is done (or broke): close the target's side, let the last responses through.
    match up {
        Some(mut u) => {
            let _ = u.w.shutdown().await;
            tokio::select! {
                r = tokio::time::timeout(idle, &mut u.pump) => {
                    if let Ok(Ok(mut w)) = r {
                        let _ = w.shutdown().await;
                    }
                }
                () = until_blocked(&conn.blocked, last) => {
                    conn.events.metrics().refused_blocked.inc();
                    u.pump.abort();
                }
            }
        }
        None => {
            if let Some(mut w) = cw {
                let _ = w.shutdown().await;
            }
        }
    }
}

/// Reads until a complete request head is buffered.
#[allow(clippy::too_many_arguments)]
async fn read_head(
    cr: &mut ReadHalf<BoxStream>,
    buf: &mut Vec<u8>,
    tmp: &mut [u8],
    conn: &Conn,
    first: bool,
    activity: &Activity,
    idle: Duration,
    mut done: Option<&mut watch::Receiver<bool>>,
) -> HeadRead {
    let max = conn.snap.limits.max_header_bytes;
    let head_time = conn.snap.limits.first_message_timeout.get();
    // The first head is due by the connection's deadline; a later one within the same time
    // from its first byte (before that, the connection is merely idle).
    let mut deadline = first.then_some(conn.first_deadline);
    loop {
        if !buf.is_empty() {
            match parse_request(buf, max) {
                Ok(Some(h)) => return HeadRead::Head(h),
                Ok(None) => {}
                Err(e) => return HeadRead::Bad(e),
            }
            if deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + head_time);
            }
        }
        let read = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, activity.read(cr, tmp, idle))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
                None => activity.read(cr, tmp, idle).await,
            }
        };
        let gone = async {
            match done.as_mut() {
                Some(d) => {
                    let _ = d.wait_for(|v| *v).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let n = tokio::select! {
            r = read => r,
            () = gone => return HeadRead::End,
        };
        match n {
            Ok(0) => return HeadRead::End,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return HeadRead::Timeout,
            Err(_) => return HeadRead::End,
        }
    }
}

fn decide(conn: &Conn, head: &RequestHead, client: &Client) -> Decision {
    let snap = &conn.snap;
    let absolute = split_absolute(&head.target);
    let (authority, origin) = match (&absolute, &head.host) {
        (Some((auth, path)), _) => (auth.to_string(), path.clone()),
        (None, Some(h)) => (h.clone(), head.target.clone()),
        (None, None) => {
            return Decision::Refuse(400, Some(Reason::Malformed("no Host header")), None);
        }
    };
    let name = host_name(&authority);
    let (route, target) = match snap.routes.lookup(name, conn.stype) {
        Lookup::Found(r, t) => (r, t),
        Lookup::Unknown => {
            return Decision::Refuse(421, Some(Reason::UnknownName(name.to_string())), None);
        }
        Lookup::NotOffered(r) => {
            return Decision::Refuse(
                421,
                Some(Reason::TypeNotOffered(r.name.clone())),
                Some(r.index),
            );
        }
    };
    if !route.allows(conn.stype, client.addr) {
        return Decision::Refuse(403, Some(Reason::NotAllowedFrom), Some(route.index));
    }
    let normal = match normalize_target(&origin) {
        Ok(n) => n,
        Err(e) => {
            return Decision::Refuse(400, Some(Reason::Malformed(e.as_str())), Some(route.index))
        }
    };
    if !url_allowed(&route.service.urls, &normal.path) {
        return Decision::Refuse(
            404,
            Some(Reason::UrlNotAllowed(normal.path)),
            Some(route.index),
        );
    }
    if let Some(r) = snap.redirect.get(conn.stype) {
        let scheme =
            r.scheme
                .as_deref()
                .unwrap_or(if conn.stype.is_tls() { "https" } else { "http" });
        let host = if name.contains(':') {
            format!("[{name}]")
        } else {
            name.to_string()
        };
        let port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
        return Decision::Redirect(
            r.status,
            format!("{scheme}://{host}{port}{}", normal.to_target()),
            route.index,
        );
    }
    let out = rewrite_head(
        conn,
        head,
        &normal.to_target(),
        absolute.map(|a| a.0),
        client,
    );
    Decision::Forward {
        route: route.index,
        target,
        head: out,
    }
}

/// The head sent to the target: normalised target, hop-by-hop headers rebuilt, headers that
/// would let a client override what the proxy checked or claim another address removed, and
/// forwarding headers that come from the proxy (appended to when the peer is a trusted
/// proxy).
fn rewrite_head(
    conn: &Conn,
    head: &RequestHead,
    target: &str,
    authority: Option<&str>,
    client: &Client,
) -> Vec<u8> {
    let peer = conn.source();
    let trusted = conn.trusted();
    let mut out = Vec::with_capacity(head.len + 128);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut prior: Vec<&[u8]> = Vec::new();
    let mut proto: Option<&[u8]> = None;
    let mut connection: Vec<&str> = Vec::new();
    for (n, v) in &head.headers {
        let norm = header_key(n);
        if always_stripped(&norm) {
            continue;
        }
        if client_claim(&norm) && (!trusted || n.contains('_')) {
            // From a trusted proxy only the canonical spelling counts: a second, underscored
            // copy could be read by a CGI-style target instead of the one the proxy checked.
            continue;
        }
        match norm.as_str() {
            "connection" => {
                // Only the tokens the proxy understands go on: a client naming a header
                // here could have a proxying target drop it (X-Forwarded-For, X-Real-IP).
                let text = std::str::from_utf8(v).unwrap_or("");
                for t in text.split(',').map(str::trim) {
                    let keep = t.eq_ignore_ascii_case("close")
                        || t.eq_ignore_ascii_case("keep-alive")
                        || (head.upgrade && t.eq_ignore_ascii_case("upgrade"));
                    if keep && !connection.iter().any(|c| c.eq_ignore_ascii_case(t)) {
                        connection.push(t);
                    }
                }
                continue;
            }
            "x-forwarded-for" => {
                prior.push(v);
                continue;
            }
            "x-forwarded-proto" => {
                proto = Some(v);
                continue;
            }
            "host" if authority.is_some() => continue,
            _ => {}
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(a) = authority {
        out.extend_from_slice(format!("Host: {a}\r\n").as_bytes());
    }
    if !connection.is_empty() {
        out.extend_from_slice(b"Connection: ");
        out.extend_from_slice(connection.join(", ").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if head.upgrade {
        out.extend_from_slice(b"Upgrade: websocket\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    for p in prior {
        out.extend_from_slice(p);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.to_string().as_bytes());
    out.extend_from_slice(b"\r\nX-Real-IP: ");
    out.extend_from_slice(client.addr.to_string().as_bytes());
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    let own: &[u8] = if conn.stype.is_tls() {
        b"https"
    } else {
        b"http"
    };
    out.extend_from_slice(proto.unwrap_or(own));
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// A header name the way CGI-style targets read it (`_` as `-`, any case), so that
/// `X_Forwarded_For` is caught as well as `X-Forwarded-For`.
fn header_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Headers in which a client could claim another address, scheme or host than the proxy
/// saw; kept (and appended to) from a trusted proxy only.
fn client_claim(key: &str) -> bool {
    matches!(
        key,
        "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-forwarded-port"
            | "x-forwarded-scheme"
            | "x-forwarded-ssl"
            | "front-end-https"
    )
}

/// Headers no one may send on, trusted proxies included:
/// - the hop-by-hop headers the proxy rebuilds itself (`Connection`, `Upgrade`) or never
///   offers (`HTTP2-Settings`: h2c is not proxied);
/// - path overrides that IIS, Symfony, Laminas and others honour instead of the request
///   line (`X-Original-URL`, `X-Rewrite-URL` and kin): the target would serve a path the
///   URL allow-list never saw;
/// - other client-address headers (`X-Real-IP`, which the proxy sets itself, and the CDN
///   spellings): a target reading one of them would trust what a client typed.
///
/// Method overrides (`X-HTTP-Method-Override`) are left alone: no rule of the proxy
/// depends on the method.
fn always_stripped(key: &str) -> bool {
    matches!(
        key,
        "upgrade"
            | "http2-settings"
            | "proxy-connection"
            | "x-original-url"
            | "x-original-uri"
            | "x-rewrite-url"
            | "x-override-url"
            | "x-real-ip"
            | "true-client-ip"
            | "x-client-ip"
            | "client-ip"
            | "cf-connecting-ip"
            | "x-cluster-client-ip"
            | "fastly-client-ip"
            | "x-originating-ip"
    )
}

async fn forward_body(
    cr: &mut ReadHalf<BoxStream>,
    w: &mut WriteHalf<BoxStream>,
    buf: &mut Vec<u8>,
    tmp: &mut [u8],
    head: &RequestHead,
    activity: &Activity,
    idle: Duration,
) -> io::Result<()> {
    let mut framer = BodyFramer::new(head.body);
    loop {
        let n = framer
            .feed(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if n > 0 {
            w.write_all(&buf[..n]).await?;
            buf.drain(..n);
            activity.touch();
        }
        if framer.is_done() {
            return Ok(());
        }
        let n = activity.read(cr, tmp, idle).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn start_pump(
    stream: BoxStream,
    writer: WriteHalf<BoxStream>,
    route: usize,
    conn: &Conn,
    activity: &Activity,
) -> Upstream {
    let (ur, uw) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = watch::channel(false);
    let ctx = PumpCtx {
        events: conn.events.clone(),
        peer: canonical_ip(conn.peer.ip()),
        stype: conn.stype,
        service: conn.snap.routes_by_index(route).name.clone(),
        max: conn.snap.limits.max_header_bytes.max(64 * 1024),
        idle: conn.snap.limits.idle_timeout.get(),
        activity: activity.clone(),
    };
    let pump = tokio::spawn(async move {
        let mut writer = writer;
        let mut ur = ur;
        let mut rx = rx;
        if let Err(e) = pump_responses(&mut ur, &mut writer, &mut rx, &ctx).await {
            tracing::debug!(peer = %ctx.peer, "response relay ended: {e}");
        }
        let _ = done_tx.send(true);
        writer
    });
    Upstream {
        route,
        w: uw,
        reqs: tx,
        pump,
        done: done_rx,
    }
}

struct PumpCtx {
    events: Events,
    peer: std::net::IpAddr,
    stype: ServiceType,
    /// The configured name of the connection's one service (the `service` label).
    service: String,
    max: usize,
    idle: Duration,
    activity: Activity,
}

async fn pump_responses(
    ur: &mut ReadHalf<BoxStream>,
    cw: &mut WriteHalf<BoxStream>,
    reqs: &mut mpsc::UnboundedReceiver<ReqInfo>,
    ctx: &PumpCtx,
) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf: Vec<u8> = Vec::with_capacity(BUF);
    let mut tmp = vec![0u8; BUF];
    loop {
        let head = loop {
            if !buf.is_empty() {
                if let Some(h) = parse_response(&buf, ctx.max).map_err(|e| bad(e.to_string()))? {
                    break h;
                }
            }
            let n = ctx.activity.read(ur, &mut tmp, ctx.idle).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        if (100..200).contains(&head.status) {
            cw.write_all(&buf[..head.len]).await?;
            buf.drain(..head.len);
            ctx.activity.touch();
        }
        if head.status == 101 {
            ctx.events.metrics().request(&ctx.service, ctx.stype, 101);
            if let Some(tx) = reqs.recv().await.and_then(|i| i.upgrade) {
                let _ = tx.send(true);
            }
            cw.write_all(&buf).await?;
            let none = |_: String| {};
            forward::pump(ur, cw, &ctx.activity, ctx.idle, None, &none).await?;
            return Ok(());
        }
        if (100..200).contains(&head.status) {
            continue;
        }
        // A final response: the request it answers is counted (interim 1xx are not).
        ctx.events
            .metrics()
            .request(&ctx.service, ctx.stype, head.status);
        let info = reqs.recv().await;
        if let Some(i) = &info {
            // A 401 to a request without credentials is the challenge every browser gets
            // first; with credentials it is a failed login. A 403 is a refusal either way.
            if head.status == 403 || (head.status == 401 && i.credentials) {
                ctx.events.report_for(
                    i.client,
                    ctx.stype,
                    Reason::TargetRejected(format!("HTTP {}", head.status)),
                );
            }
        }
        let head_request = info.as_ref().is_some_and(|i| i.head);
        if let Some(tx) = info.and_then(|i| i.upgrade) {
            let _ = tx.send(false);
        }
        let mut framer = BodyFramer::new(head.body(head_request));
        // Head and the body bytes already here leave in one write: one segment, one record.
        let n = framer
            .feed(&buf[head.len..])
            .map_err(|e| bad(e.to_string()))?;
        cw.write_all(&buf[..head.len + n]).await?;
        buf.drain(..head.len + n);
        ctx.activity.touch();
        while !framer.is_done() {
            let n = ctx.activity.read(ur, &mut tmp, ctx.idle).await?;
            if n == 0 {
                if framer.until_close() {
                    return Ok(());
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
            let n = framer.feed(&buf).map_err(|e| bad(e.to_string()))?;
            if n > 0 {
                cw.write_all(&buf[..n]).await?;
                buf.drain(..n);
                ctx.activity.touch();
            }
        }
    }
}

/// Ends a connection with the proxy's own response, after any responses still owed.
async fn finish(
    up: Option<Upstream>,
    cw: Option<WriteHalf<BoxStream>>,
    resp: Vec<u8>,
    idle: Duration,
) {
    let w = match up {
        Some(mut u) => {
            let _ = u.w.shutdown().await;
            drop(u.reqs);
            match tokio::time::timeout(idle, u.pump).await {
                Ok(Ok(w)) => Some(w),
                _ => None,
            }
        }
        None => cw,
    };
    if let Some(mut w) = w {
        let _ = w.write_all(&resp).await;
        let _ = w.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::sniff::http::parse_request;
    use portico_shared::addr::CidrList;

    fn trusted(list: &[&str]) -> CidrList {
        CidrList::new(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn client_of(headers: &str, list: &[&str]) -> Option<IpAddr> {
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let head = parse_request(raw.as_bytes(), 8192).unwrap().unwrap();
        forwarded_client(&head, &trusted(list))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_forwarded_client_is_the_rightmost_untrusted_hop() {
        let lb = ["127.0.0.1/32", "10.0.0.0/8"];
        assert_eq!(
            client_of("X-Forwarded-For: 198.51.100.7\r\n", &lb),
            ip("198.51.100.7")
        );
        // What the client typed itself stands left of what the trusted proxies added.
        assert_eq!(
            client_of("X-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.1.2.3\r\n", &lb),
            ip("198.51.100.7")
        );
        // Several lines are one list, in order.
        assert_eq!(
            client_of(
                "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 198.51.100.8\r\n",
                &lb
            ),
            ip("198.51.100.8")
        );
        // Ports, brackets, mapped IPv4.
        assert_eq!(
            client_of("X-Forwarded-For: 198.51.100.9:4711\r\n", &lb),
            ip("198.51.100.9")
        );
        assert_eq!(
            client_of("X-Forwarded-For: [2001:db8::5]:80\r\n", &lb),
            ip("2001:db8::5")
        );
        assert_eq!(
            client_of("X-Forwarded-For: ::ffff:198.51.100.10\r\n", &lb),
            ip("198.51.100.10")
        );
        // Forwarded, used only without X-Forwarded-For.
        assert_eq!(
            client_of(
                "Forwarded: for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https\r\n",
                &lb
            ),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(
            client_of(
                "Forwarded: for=6.6.6.6\r\nX-Forwarded-For: 198.51.100.11\r\n",
                &lb
            ),
            ip("198.51.100.11")
        );
        // Nobody to charge: no header, only trusted hops, or a hop that is no address.
        assert_eq!(client_of("", &lb), None);
        assert_eq!(
            client_of("X-Forwarded-For: 10.0.0.9, 127.0.0.1\r\n", &lb),
            None
        );
        assert_eq!(
            client_of("X-Forwarded-For: 198.51.100.7, unknown\r\n", &lb),
            None
        );
        assert_eq!(client_of("Forwarded: for=_hidden\r\n", &lb), None);
    }
}
