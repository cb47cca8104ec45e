//! HTTP(S): every request on a keep-alive connection is routed by its `Host`, checked against
//! the service's `allow_from` and `urls`, given `X-Forwarded-For`/`-Proto`, and forwarded.
//!
//! A client connection is tied to one target connection: a later request for another service
//! gets 421 (clients open one connection per host anyway). Responses flow back through a pump
//! task that follows their framing, so the proxy knows where each ends (to see every status,
//! for the fraud engine) and can put its own refusal after the last forwarded response: to
//! refuse mid-connection, the request side half-closes the target, lets the pump drain the
//! remaining responses, then writes the refusal and closes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portico_shared::proxy_config::ServiceType;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::access::{canonical_ip, normalize_target, url_allowed};
use super::events::{Events, Reason};
use super::forward::{self, Activity, BoxStream, BUF};
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

impl Conn {
    fn report(&self, reason: Reason) {
        self.events.report(self.source(), self.stype, reason);
    }

    fn source(&self) -> std::net::IpAddr {
        canonical_ip(self.peer.ip())
    }

    /// Whether the source has been blacklisted since the connection was accepted; counted.
    fn now_blocked(&self) -> bool {
        let b = (self.blocked)(self.source());
        if b {
            self.events.metrics().refused_blocked.inc();
        }
        b
    }
}

/// What the response pump needs to know about each forwarded request.
struct ReqInfo {
    head: bool,
    upgrade: Option<oneshot::Sender<bool>>,
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
    Refuse(u16, Option<Reason>),
    Redirect(u16, String),
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
    let idle = Duration::from_secs(limits.idle_timeout);
    let activity = Activity::new();
    activity.touch();
    let mut buf: Vec<u8> = Vec::with_capacity(BUF);
    let mut tmp = vec![0u8; BUF];
    let mut up: Option<Upstream> = None;
    let mut first = true;
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
                conn.report(Reason::FirstMessageTimeout);
                return finish(up, cw, response(408, None), idle).await;
            }
            HeadRead::Timeout => break,
            HeadRead::Bad(HttpError::TooLarge) => {
                conn.report(Reason::TooLarge);
                return finish(up, cw, response(431, None), idle).await;
            }
            HeadRead::Bad(HttpError::Syntax(m)) => {
                conn.report(Reason::Malformed(m));
                return finish(up, cw, response(400, None), idle).await;
            }
        };
        first = false;
        if conn.now_blocked() {
            // Blacklisted meanwhile (maybe by this very connection's failed logins): the
            // responses still owed go out, then the refusal, then the connection closes.
            return finish(up, cw, response(403, None), idle).await;
        }
        let (route, target, out) = match decide(&conn, &head) {
            Decision::Refuse(code, reason) => {
                if let Some(r) = reason {
                    conn.report(r);
                }
                return finish(up, cw, response(code, None), idle).await;
            }
            Decision::Redirect(code, location) => {
                return finish(up, cw, response(code, Some(&location)), idle).await;
            }
            Decision::Forward {
                route,
                target,
                head,
            } => (route, target, head),
        };
        if up.as_ref().is_some_and(|u| u.route != route) {
            return finish(up, cw, response(421, None), idle).await;
        }
        if up.is_none() {
            let Some(writer) = cw.take() else { return };
            let r = &conn.snap.routes_by_index(route);
            match forward::connect(&conn.snap, r, target, conn.peer, conn.local).await {
                Ok(stream) => up = Some(start_pump(stream, writer, route, &conn, &activity)),
                Err(e) => {
                    tracing::debug!(peer = %conn.peer, "target unreachable: {e}");
                    conn.report(Reason::TargetUnreachable(e));
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
                        () = until_blocked(&conn.blocked, conn.source()) => true,
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
                () = until_blocked(&conn.blocked, conn.source()) => {
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
    let head_time = Duration::from_secs(conn.snap.limits.first_message_timeout);
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

fn decide(conn: &Conn, head: &RequestHead) -> Decision {
    let snap = &conn.snap;
    let absolute = split_absolute(&head.target);
    let (authority, origin) = match (&absolute, &head.host) {
        (Some((auth, path)), _) => (auth.to_string(), path.clone()),
        (None, Some(h)) => (h.clone(), head.target.clone()),
        (None, None) => {
            return Decision::Refuse(400, Some(Reason::Malformed("no Host header")));
        }
    };
    let name = host_name(&authority);
    let (route, target) = match snap.routes.lookup(name, conn.stype) {
        Lookup::Found(r, t) => (r, t),
        Lookup::Unknown => {
            return Decision::Refuse(421, Some(Reason::UnknownName(name.to_string())));
        }
        Lookup::NotOffered(r) => {
            return Decision::Refuse(421, Some(Reason::TypeNotOffered(r.name.clone())));
        }
    };
    if !route.allows(conn.stype, conn.peer.ip()) {
        return Decision::Refuse(403, Some(Reason::NotAllowedFrom));
    }
    let normal = match normalize_target(&origin) {
        Ok(n) => n,
        Err(e) => return Decision::Refuse(400, Some(Reason::Malformed(e.as_str()))),
    };
    if !url_allowed(&route.service.urls, &normal.path) {
        return Decision::Refuse(404, Some(Reason::UrlNotAllowed(normal.path)));
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
        );
    }
    let out = rewrite_head(conn, head, &normal.to_target(), absolute.map(|a| a.0));
    Decision::Forward {
        route: route.index,
        target,
        head: out,
    }
}

/// The head sent to the target: normalised target, and forwarding headers that come from
/// the proxy unless the client is a trusted proxy itself.
fn rewrite_head(conn: &Conn, head: &RequestHead, target: &str, authority: Option<&str>) -> Vec<u8> {
    let client = canonical_ip(conn.peer.ip());
    let trusted = conn.snap.trusted.contains(client);
    let mut out = Vec::with_capacity(head.len + 96);
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
    for (n, v) in &head.headers {
        if !trusted && client_claim(n) {
            continue;
        }
        if !head.upgrade
            && (n.eq_ignore_ascii_case("upgrade") || n.eq_ignore_ascii_case("http2-settings"))
        {
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            if trusted {
                prior.push(v);
            }
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-proto") {
            if trusted {
                proto = Some(v);
            }
            continue;
        }
        if authority.is_some() && n.eq_ignore_ascii_case("host") {
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(a) = authority {
        out.extend_from_slice(format!("Host: {a}\r\n").as_bytes());
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    for p in prior {
        out.extend_from_slice(p);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.to_string().as_bytes());
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

/// Headers in which a client could claim another address, scheme or host than the proxy
/// saw; from an untrusted client they are dropped. Names are compared the way CGI-style
/// targets read them (`_` as `-`, any case), so `X_Forwarded_For` is caught too.
fn client_claim(name: &str) -> bool {
    let norm: String = name
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    matches!(
        norm.as_str(),
        "forwarded" | "x-real-ip" | "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
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
        max: conn.snap.limits.max_header_bytes.max(64 * 1024),
        idle: Duration::from_secs(conn.snap.limits.idle_timeout),
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
        if matches!(head.status, 401 | 403) {
            ctx.events.report(
                ctx.peer,
                ctx.stype,
                Reason::TargetRejected(format!("HTTP {}", head.status)),
            );
        }
        if (100..200).contains(&head.status) {
            cw.write_all(&buf[..head.len]).await?;
            buf.drain(..head.len);
            ctx.activity.touch();
        }
        if head.status == 101 {
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
        let info = reqs.recv().await;
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
