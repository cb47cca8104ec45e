//! Protocols routed on their first message (SIP, LDAP; H.323 later): read until the sniffer
//! has a verdict, check access, connect, then relay both ways: the client's messages through
//! the sniffer's guard, which names every later message that routes (SIP REGISTER/INVITE,
//! LDAP binds) so it is checked against the connection's service, and the target's answers
//! through its monitor, which reports rejections.
//!
//! A later message naming another service, an unknown one or none is not forwarded: the
//! proxy answers it (SIP 403, an LDAP BindResponse insufficientAccessRights) and reports it.
//! Before forwarding any message the proxy asks whether the source has been blacklisted
//! meanwhile, so a brute force over one connection ends at the first attempt after the
//! decision.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portico_shared::proxy_config::ServiceType;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use super::access::canonical_ip;
use super::events::{Events, Reason};
use super::forward::{self, BoxStream, Hooks, Verdict, BUF};
use super::route::Lookup;
use super::sniff::{Check, Refusal, Sniffed, Sniffer};
use super::{until_blocked, Blocked, Snapshot};

pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub stype: ServiceType,
    pub snap: Arc<Snapshot>,
    pub events: Events,
    pub first_deadline: tokio::time::Instant,
    pub sniffer: &'static dyn Sniffer,
    pub blocked: Blocked,
}

enum First {
    Done(Sniffed),
    Timeout,
    Closed,
}

async fn read_first(r: &mut ReadHalf<BoxStream>, buf: &mut Vec<u8>, conn: &Conn) -> First {
    use tokio::io::AsyncReadExt;
    let max = conn.snap.limits.max_header_bytes;
    let mut tmp = vec![0u8; BUF];
    loop {
        if !buf.is_empty() {
            match conn.sniffer.sniff(buf, max) {
                // Whatever a sniffer skips or waits for, the buffer itself is bounded: a
                // stream of SIP keep-alive CRLFs must not grow it until the timeout.
                Sniffed::NeedMore if buf.len() > max => return First::Done(Sniffed::TooLarge),
                Sniffed::NeedMore => {}
                v => return First::Done(v),
            }
        }
        match tokio::time::timeout_at(conn.first_deadline, r.read(&mut tmp)).await {
            Err(_) => return First::Timeout,
            Ok(Ok(0)) | Ok(Err(_)) => return First::Closed,
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

pub async fn serve(client: BoxStream, conn: Conn) {
    let source = canonical_ip(conn.peer.ip());
    let report = |r: Reason| conn.events.report(source, conn.stype, r);
    let (mut cr, mut cw) = tokio::io::split(client);
    let mut buf = Vec::with_capacity(BUF);
    let refuse = |why: Refusal, buf: &[u8]| conn.sniffer.refuse(buf, why);
    let verdict = match read_first(&mut cr, &mut buf, &conn).await {
        First::Done(v) => v,
        First::Timeout => {
            report(Reason::FirstMessageTimeout);
            let _ = cw.shutdown().await;
            return;
        }
        First::Closed => return,
    };
    let refusal = match verdict {
        Sniffed::Name(name) => match conn.snap.routes.lookup(&name, conn.stype) {
            Lookup::Found(route, target) => {
                if !route.allows(conn.stype, conn.peer.ip()) {
                    report(Reason::NotAllowedFrom);
                    Refusal::Forbidden
                } else if (conn.blocked)(source) {
                    // Blacklisted while its first message was on the way.
                    conn.events.metrics().refused_blocked.inc();
                    let _ = cw.shutdown().await;
                    return;
                } else {
                    match forward::connect(&conn.snap, route, target, conn.peer, conn.local).await {
                        Ok(up) => {
                            conn.events.metrics().forwarded(conn.stype);
                            relay(cr, cw, up, route.index, &buf, &conn).await;
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %conn.peer, "target unreachable: {e}");
                            report(Reason::TargetUnreachable(e));
                            Refusal::Unavailable
                        }
                    }
                }
            }
            Lookup::Unknown => {
                report(Reason::UnknownName(name));
                Refusal::UnknownName
            }
            Lookup::NotOffered(r) => {
                report(Reason::TypeNotOffered(r.name.clone()));
                Refusal::UnknownName
            }
        },
        Sniffed::NoName(m) => {
            report(Reason::UnknownName(m.to_string()));
            Refusal::UnknownName
        }
        Sniffed::TooLarge => {
            report(Reason::TooLarge);
            Refusal::TooLarge
        }
        Sniffed::Invalid(m) => {
            report(Reason::Malformed(m));
            Refusal::BadRequest
        }
        Sniffed::NeedMore => Refusal::BadRequest,
    };
    if let Some(answer) = refuse(refusal, &buf) {
        let _ = cw.write_all(&answer).await;
    }
    let _ = cw.shutdown().await;
}

/// Relays a connection routed to the route at `route`, `first` being what was read to route it.
async fn relay(
    cr: ReadHalf<BoxStream>,
    cw: WriteHalf<BoxStream>,
    up: BoxStream,
    route: usize,
    first: &[u8],
    conn: &Conn,
) {
    let source = canonical_ip(conn.peer.ip());
    let report = |r: Reason| conn.events.report(source, conn.stype, r);
    let judge = |check: Check, msg: &[u8]| {
        if (conn.blocked)(source) {
            return Verdict::Cut;
        }
        match check_route(conn, route, check) {
            Ok(()) => Verdict::Forward,
            Err(reason) => {
                tracing::debug!(peer = %conn.peer, "not forwarded: {reason}");
                report(reason);
                Verdict::Refuse(conn.sniffer.refuse(msg, Refusal::Forbidden))
            }
        }
    };
    let hooks = Hooks {
        judge: &judge,
        report: &report,
    };
    let (guard, monitor) = conn.sniffer.session(conn.snap.limits.max_header_bytes);
    let idle = Duration::from_secs(conn.snap.limits.idle_timeout);
    let r = forward::relay(
        (cr, cw),
        tokio::io::split(up),
        first,
        idle,
        guard,
        monitor,
        &hooks,
        until_blocked(&conn.blocked, source),
    )
    .await;
    if r.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied) {
        conn.events.metrics().refused_blocked.inc();
    }
}

/// Whether a later message of a connection routed to `route` may go there: only if it
/// names nothing to check, or names that same service.
fn check_route(conn: &Conn, route: usize, check: Check) -> Result<(), Reason> {
    let name = match check {
        Check::Pass => return Ok(()),
        Check::NoName(why) => return Err(Reason::UnknownName(why.to_string())),
        Check::Name(n) => n,
    };
    match conn.snap.routes.lookup(&name, conn.stype) {
        Lookup::Found(r, _) if r.index == route => Ok(()),
        Lookup::Found(..) => Err(Reason::Malformed(
            "a later request names another service than the connection's",
        )),
        Lookup::NotOffered(r) => Err(Reason::TypeNotOffered(r.name.clone())),
        Lookup::Unknown => Err(Reason::UnknownName(name)),
    }
}
