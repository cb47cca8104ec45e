//! Suspicious events: what the fraud engine counts per source address (reference: "Fraud
//! Detection"): requests the proxy rejected, connections to a target that failed, and requests
//! the target rejected.
//!
//! Fraud detection counts failures, not what ordinary clients do: a browser opens idle
//! connections it may never use (they time out without a request) and an office behind one
//! NAT address can reach the per-source connection limit. Those reasons are still reported
//! and shown in the metrics, but [`Reason::counts`] keeps them away from the fraud engine.
//!
//! Events go over a bounded channel with `try_send`: a slow or absent consumer must never slow
//! the proxy down, so when the channel is full the event is dropped and counted instead.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use portico_shared::proxy_config::ServiceType;
use tokio::sync::mpsc;

use super::metrics::ProxyMetrics;

/// Why a request counts as suspicious.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The source is outside the service's `allow_from` list for this type.
    NotAllowedFrom,
    /// The request names no configured service.
    UnknownName(String),
    /// The service has no target port for this type.
    TypeNotOffered(String),
    /// The HTTP path is outside the service's `urls`.
    UrlNotAllowed(String),
    /// The request could not be parsed, or tried to escape path rules.
    Malformed(&'static str),
    /// The request head exceeded `proxy.limits.max_header_bytes`.
    TooLarge,
    /// No complete first message (or TLS handshake) within the first-message timeout.
    FirstMessageTimeout,
    TlsHandshake(String),
    /// `max_connections_per_ip` reached for this source.
    TooManyConnections,
    /// Connecting (TCP or TLS) to the target failed.
    TargetUnreachable(String),
    /// The target refused the request: HTTP 401 to a request with credentials, HTTP 403, SIP
    /// 401/403/407, LDAP invalidCredentials.
    TargetRejected(String),
}

impl Reason {
    /// Whether the event counts toward blacklisting its source. Idle connections that never
    /// send a request (browsers open spare ones, and a TLS client that gives up in the
    /// handshake looks the same) and connections over the per-source limit (many browsers
    /// behind one NAT address) are normal behaviour, not failures: they are shown in the
    /// metrics only. Everything else counts, as the reference says: rejections by the proxy,
    /// bad TLS, unreachable targets and rejections by the target.
    pub fn counts(&self) -> bool {
        !matches!(
            self,
            Reason::TooManyConnections | Reason::FirstMessageTimeout
        )
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::NotAllowedFrom => "not_allowed_from",
            Reason::UnknownName(_) => "unknown_name",
            Reason::TypeNotOffered(_) => "type_not_offered",
            Reason::UrlNotAllowed(_) => "url_not_allowed",
            Reason::Malformed(_) => "malformed",
            Reason::TooLarge => "too_large",
            Reason::FirstMessageTimeout => "first_message_timeout",
            Reason::TlsHandshake(_) => "tls_handshake",
            Reason::TooManyConnections => "too_many_connections",
            Reason::TargetUnreachable(_) => "target_unreachable",
            Reason::TargetRejected(_) => "target_rejected",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotAllowedFrom => f.write_str("source not in allow_from"),
            Reason::UnknownName(n) => write!(f, "unknown service name {n:?}"),
            Reason::TypeNotOffered(n) => write!(f, "service {n:?} has no target for this type"),
            Reason::UrlNotAllowed(p) => write!(f, "URL {p:?} not allowed"),
            Reason::Malformed(m) => write!(f, "malformed request: {m}"),
            Reason::TooLarge => f.write_str("request head too large"),
            Reason::FirstMessageTimeout => f.write_str("no complete request in time"),
            Reason::TlsHandshake(e) => write!(f, "TLS handshake failed: {e}"),
            Reason::TooManyConnections => f.write_str("too many connections from this address"),
            Reason::TargetUnreachable(e) => write!(f, "target unreachable: {e}"),
            Reason::TargetRejected(e) => write!(f, "target rejected the request: {e}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspiciousEvent {
    pub source: IpAddr,
    pub service_type: ServiceType,
    pub reason: Reason,
}

/// Where the proxy reports events: the channel to the fraud engine plus the metrics.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<SuspiciousEvent>,
    metrics: Arc<ProxyMetrics>,
}

impl Events {
    pub fn new(tx: mpsc::Sender<SuspiciousEvent>, metrics: Arc<ProxyMetrics>) -> Events {
        Events { tx, metrics }
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Reports an event from `source`: always to the metrics (and the debug log), to the
    /// fraud engine only when [`Reason::counts`].
    pub fn report(&self, source: IpAddr, service_type: ServiceType, reason: Reason) {
        self.report_for(Some(source), service_type, reason);
    }

    /// Like [`Events::report`], for an event that may have no address to charge: a request
    /// that came through a trusted proxy without naming the client behind it. Such events
    /// are shown in the metrics as not counted; the trusted proxy itself is never charged.
    pub fn report_for(&self, source: Option<IpAddr>, service_type: ServiceType, reason: Reason) {
        let counted = reason.counts() && source.is_some();
        self.metrics
            .suspicious(service_type, reason.label(), counted);
        match source {
            Some(s) => tracing::debug!(source = %s, %service_type, counted, "suspicious: {reason}"),
            None => tracing::debug!(
                %service_type,
                counted,
                "suspicious: {reason} (through a trusted proxy that named no client)"
            ),
        }
        let Some(source) = source.filter(|_| counted) else {
            return;
        };
        let event = SuspiciousEvent {
            source,
            service_type,
            reason,
        };
        if self.tx.try_send(event).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> (Events, mpsc::Receiver<SuspiciousEvent>, Arc<ProxyMetrics>) {
        let (tx, rx) = mpsc::channel(16);
        let m = Arc::new(ProxyMetrics::default());
        (Events::new(tx, Arc::clone(&m)), rx, m)
    }

    fn count(m: &ProxyMetrics, reason: &'static str, counted: bool) -> u64 {
        m.suspicious_events
            .get_or_create(&[
                ("type", "https"),
                ("reason", reason),
                ("counted", if counted { "true" } else { "false" }),
            ])
            .get()
    }

    #[test]
    fn only_failures_reach_the_fraud_engine() {
        let (ev, mut rx, m) = events();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let t = ServiceType::Https;
        ev.report(ip, t, Reason::TooManyConnections);
        ev.report(ip, t, Reason::FirstMessageTimeout);
        assert!(
            rx.try_recv().is_err(),
            "normal behaviour reached the engine"
        );
        ev.report(ip, t, Reason::TargetRejected("HTTP 403".into()));
        ev.report(ip, t, Reason::TlsHandshake("bad".into()));
        ev.report(ip, t, Reason::TargetUnreachable("refused".into()));
        ev.report(ip, t, Reason::UnknownName("x".into()));
        for label in [
            "target_rejected",
            "tls_handshake",
            "target_unreachable",
            "unknown_name",
        ] {
            let e = rx.try_recv().expect("a counted event");
            assert_eq!((e.source, e.reason.label()), (ip, label));
        }
        // Both kinds in the metrics, told apart by `counted`.
        assert_eq!(count(&m, "too_many_connections", false), 1);
        assert_eq!(count(&m, "first_message_timeout", false), 1);
        assert_eq!(count(&m, "target_rejected", true), 1);
        assert_eq!(count(&m, "too_many_connections", true), 0);
    }

    #[test]
    fn an_event_without_a_client_is_shown_but_charged_to_no_one() {
        let (ev, mut rx, m) = events();
        ev.report_for(None, ServiceType::Https, Reason::Malformed("x"));
        assert!(rx.try_recv().is_err());
        assert_eq!(count(&m, "malformed", false), 1);
    }
}
