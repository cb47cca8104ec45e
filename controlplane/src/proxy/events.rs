//! Suspicious events: what the fraud engine counts per source address (reference: "Fraud
//! Detection"): requests the proxy rejected, connections to a target that failed, and requests
//! the target rejected.
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
    /// The target refused the request: HTTP 401/403, SIP 401/403/407, LDAP invalidCredentials.
    TargetRejected(String),
}

impl Reason {
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

    pub fn report(&self, source: IpAddr, service_type: ServiceType, reason: Reason) {
        self.metrics.suspicious(service_type, reason.label());
        tracing::debug!(%source, %service_type, "suspicious: {reason}");
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
