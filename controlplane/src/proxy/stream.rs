//! Protocols routed on their first message (SIP, LDAP; H.323 later): read until the sniffer
//! has a verdict, check access, connect, forward what was read, then relay bytes both ways
//! while a monitor watches the target's answers for rejections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portico_shared::proxy_config::ServiceType;
use tokio::io::{AsyncWriteExt, ReadHalf};

use super::access::canonical_ip;
use super::events::{Events, Reason};
use super::forward::{self, BoxStream, BUF};
use super::route::Lookup;
use super::sniff::{Refusal, Sniffed, Sniffer};
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
                        Ok(mut up) => {
                            if up.write_all(&buf).await.is_err() {
                                report(Reason::TargetUnreachable("write failed".into()));
                                return;
                            }
                            conn.events.metrics().forwarded(conn.stype);
                            let idle = Duration::from_secs(conn.snap.limits.idle_timeout);
                            let on_reject = |what: String| report(Reason::TargetRejected(what));
                            let monitor = Some(conn.sniffer.monitor());
                            let r = forward::relay(
                                (cr, cw),
                                tokio::io::split(up),
                                idle,
                                monitor,
                                &on_reject,
                                until_blocked(&conn.blocked, source),
                            )
                            .await;
                            if r.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied) {
                                conn.events.metrics().refused_blocked.inc();
                            }
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
