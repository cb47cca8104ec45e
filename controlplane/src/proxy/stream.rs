//! Protocols routed on their first message (SIP, LDAP, H.323): read until the sniffer
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

use portico_shared::proxy_config::ServiceType;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use super::access::canonical_ip;
use super::events::{Events, Reason};
use super::forward::{self, BoxStream, Hooks, Verdict, BUF};
use super::route::{Lookup, Route, Target};
use super::sniff::{Check, Refusal, Sniffed, Sniffer};
use super::tls::ClientCert;
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
    /// The client's certificate (SIPS and H.323/TLS when `proxy.tls.client_ca_file` is set).
    pub client_cert: Option<ClientCert>,
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
        Sniffed::Name(name) => {
            // The first candidate that exists, admits the source and answers gets the
            // connection; of the failures, the one nearest to success is reported.
            let mut failure: Option<(u8, Reason, Refusal)> = None;
            let mut fail = |rank: u8, reason: Reason, refusal: Refusal| {
                if failure.as_ref().is_none_or(|(r, ..)| rank > *r) {
                    failure = Some((rank, reason, refusal));
                }
            };
            for candidate in conn.sniffer.candidates(&name) {
                match conn.snap.routes.lookup(&candidate, conn.stype) {
                    Lookup::Found(route, target) => {
                        if !route.allows(conn.stype, conn.peer.ip()) {
                            fail(3, Reason::NotAllowedFrom, Refusal::Forbidden);
                            break;
                        }
                        let (target, vouched) = match checked_target(&conn, route, target, &buf) {
                            Ok(t) => t,
                            Err(reason) => {
                                fail(1, reason, Refusal::UnknownName);
                                continue;
                            }
                        };
                        if (conn.blocked)(source) {
                            // Blacklisted while its first message was on the way.
                            conn.events.metrics().refused_blocked.inc();
                            let _ = cw.shutdown().await;
                            return;
                        }
                        match forward::connect(&conn.snap, route, target, conn.peer, conn.local)
                            .await
                        {
                            Ok(up) => {
                                conn.events.metrics().forwarded(conn.stype);
                                relay(cr, cw, up, route.index, vouched, &buf, &conn).await;
                                return;
                            }
                            Err(e) => {
                                tracing::debug!(peer = %conn.peer, "target unreachable: {e}");
                                fail(2, Reason::TargetUnreachable(e), Refusal::Unavailable);
                            }
                        }
                    }
                    Lookup::Unknown => {
                        fail(0, Reason::UnknownName(name.clone()), Refusal::UnknownName)
                    }
                    Lookup::NotOffered(r) => fail(
                        1,
                        Reason::TypeNotOffered(r.name.clone()),
                        Refusal::UnknownName,
                    ),
                }
            }
            match failure {
                Some((_, reason, refusal)) => {
                    report(reason);
                    refusal
                }
                None => {
                    report(Reason::UnknownName(name));
                    Refusal::UnknownName
                }
            }
        }
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
    vouched: bool,
    first: &[u8],
    conn: &Conn,
) {
    let source = canonical_ip(conn.peer.ip());
    let report = |r: Reason| conn.events.report(source, conn.stype, r);
    let judge = |check: Check, msg: &[u8]| {
        if (conn.blocked)(source) {
            return Verdict::Cut;
        }
        let checked = check_route(conn, route, check).and_then(|()| {
            // Over TLS on the strength of its certificate: every later registration must
            // be one the certificate names, or it would reach the PBX as verified.
            match (vouched, &conn.client_cert, conn.sniffer.registration(msg)) {
                (true, Some(cert), Some(names)) if !cert.vouches_for(&names) => Err(
                    Reason::Malformed("a later registration is not the client certificate's"),
                ),
                _ => Ok(()),
            }
        });
        match checked {
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
    let idle = conn.snap.limits.idle_timeout.get();
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

/// Check Certificate (reference: "Reverse Proxy and PBX Interaction") for a service that sets
/// it: the registration goes to the service's TLS port only when the client came over TLS
/// with a certificate that chains to the trust list and names what it registers; anything
/// else (another name, an untrusted or no certificate, plain TCP, a first message that is
/// no registration) goes to its plain port, where the PBX checks the password. Returns the
/// target and whether the certificate vouches for the connection. A service without the
/// switch keeps the client's encryption (or the only port it has) as for other protocols.
fn checked_target(
    conn: &Conn,
    route: &Route,
    target: Target,
    first: &[u8],
) -> Result<(Target, bool), Reason> {
    let (plain, tls) = match conn.stype {
        ServiceType::Sip | ServiceType::Sips => (ServiceType::Sip, ServiceType::Sips),
        ServiceType::H323 | ServiceType::H323Tls => (ServiceType::H323, ServiceType::H323Tls),
        _ => return Ok((target, false)),
    };
    if !route.service.checks_client_certificate() {
        return Ok((target, false));
    }
    let ports = route.service.ports();
    let vouched = conn.client_cert.as_ref().is_some_and(|c| {
        conn.sniffer
            .registration(first)
            .is_some_and(|names| c.vouches_for(&names))
    });
    if vouched {
        if let Some(&port) = ports.get(tls) {
            return Ok((Target { port, tls: true }, true));
        }
    }
    match ports.get(plain) {
        Some(&port) => Ok((Target { port, tls: false }, false)),
        None => Err(Reason::TypeNotOffered(route.name.clone())),
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
    let mut verdict = Err(Reason::UnknownName(name.clone()));
    for candidate in conn.sniffer.candidates(&name) {
        match conn.snap.routes.lookup(&candidate, conn.stype) {
            Lookup::Found(r, _) if r.index == route => return Ok(()),
            Lookup::Found(..) => {
                verdict = Err(Reason::Malformed(
                    "a later request names another service than the connection's",
                ))
            }
            Lookup::NotOffered(r) => verdict = Err(Reason::TypeNotOffered(r.name.clone())),
            Lookup::Unknown => {}
        }
    }
    verdict
}
