//! The proxy's Prometheus metrics. They live here, next to the code that counts them, and join
//! the control plane's registry through [`ProxyMetrics::register`]; the handles are shared
//! atomics, so counting never takes a lock a scrape could hold.

use portico_shared::proxy_config::ServiceType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type TypeLabel = [(&'static str, &'static str); 1];
type TypeReasonLabels = [(&'static str, &'static str); 3];
/// `service` (a configured service name, or [`UNKNOWN_SERVICE`]), `type`, `status` (a class).
type RequestLabels = [(&'static str, String); 3];

/// The `service` label of a request that named no configured service, or was answered
/// before it was routed (malformed, too large, timed out, from a blacklisted source).
pub const UNKNOWN_SERVICE: &str = "unknown";

/// The `status` label: the class of an HTTP status, so the label has at most six values.
pub fn status_class(code: u16) -> &'static str {
    match code / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

#[derive(Default)]
pub struct ProxyMetrics {
    /// Client connections accepted, by service type.
    pub connections: Family<TypeLabel, Counter>,
    /// Client connections open now, by service type.
    pub active: Family<TypeLabel, Gauge>,
    /// Requests (HTTP requests, first SIP/LDAP messages) forwarded to a target.
    pub forwarded: Family<TypeLabel, Counter>,
    /// HTTP(S) requests answered, by service, type and status class: the target's final
    /// responses and the proxy's own answers (refusals, redirects, 502).
    pub requests: Family<RequestLabels, Counter>,
    /// Suspicious events by service type, reason, and whether they counted toward
    /// blacklisting (`counted="false"`: normal behaviour such as idle browser connections, or
    /// a request through a trusted proxy that named no client).
    pub suspicious_events: Family<TypeReasonLabels, Counter>,
    /// Events the fraud engine's channel had no room for.
    pub events_dropped: Counter,
    /// Connections refused because `max_connections` was reached.
    pub refused_full: Counter,
    /// Connections closed because the source is blacklisted: at accept, or later (before its
    /// next HTTP request, or while relayed).
    pub refused_blocked: Counter,
    /// Certificate reloads by result.
    pub cert_reloads: Family<[(&'static str, &'static str); 1], Counter>,
    /// Connections on the HTTPS port handed to the dataplane's TURN engine
    /// (`proxy.turn_on_https`), by how: `alpn` (the socket itself, TLS still to do),
    /// `plaintext` (decrypted here, relayed over a unix socket), `failed` (closed: no
    /// dataplane to take it).
    pub turn_handoffs: Family<[(&'static str, &'static str); 1], Counter>,
}

fn ty(t: ServiceType) -> TypeLabel {
    [("type", t.key())]
}

impl ProxyMetrics {
    // Called by the control plane's `Metrics` once it takes the proxy's handles.
    #[allow(dead_code)]
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "proxy_connections",
            "Client connections the reverse proxy accepted, by service type",
            self.connections.clone(),
        );
        registry.register(
            "proxy_active_connections",
            "Client connections the reverse proxy holds open, by service type",
            self.active.clone(),
        );
        registry.register(
            "proxy_forwarded_requests",
            "Requests the reverse proxy forwarded to a target, by service type",
            self.forwarded.clone(),
        );
        registry.register(
            "proxy_requests",
            "HTTP(S) requests the reverse proxy answered (the target's final response or its own), by configured service (\"unknown\" for none), service type and status class",
            self.requests.clone(),
        );
        registry.register(
            "proxy_suspicious_events",
            "Suspicious requests seen by the reverse proxy, by service type, reason, and whether they counted toward blacklisting",
            self.suspicious_events.clone(),
        );
        registry.register(
            "proxy_events_dropped",
            "Suspicious events dropped because the fraud engine's queue was full",
            self.events_dropped.clone(),
        );
        registry.register(
            "proxy_refused_connections",
            "Client connections refused because proxy.limits.max_connections was reached",
            self.refused_full.clone(),
        );
        registry.register(
            "proxy_blocked_connections",
            "Client connections closed because the source is blacklisted (at accept or later)",
            self.refused_blocked.clone(),
        );
        registry.register(
            "proxy_certificate_reloads",
            "Loads of the proxy's TLS certificate and key, by result",
            self.cert_reloads.clone(),
        );
        registry.register(
            "proxy_turn_handoffs",
            "Connections on the HTTPS port handed to the dataplane's TURN engine (proxy.turn_on_https), by how (alpn, plaintext) or failed",
            self.turn_handoffs.clone(),
        );
    }

    pub fn turn_handoff(&self, how: &'static str) {
        self.turn_handoffs.get_or_create(&[("result", how)]).inc();
    }

    pub fn accepted(&self, t: ServiceType) {
        self.connections.get_or_create(&ty(t)).inc();
        self.active.get_or_create(&ty(t)).inc();
    }

    pub fn closed(&self, t: ServiceType) {
        self.active.get_or_create(&ty(t)).dec();
    }

    pub fn forwarded(&self, t: ServiceType) {
        self.forwarded.get_or_create(&ty(t)).inc();
    }

    /// One HTTP(S) request answered with `code` for `service` (a configured name; anything
    /// else must be [`UNKNOWN_SERVICE`], which keeps the label set bounded by the configuration).
    pub fn request(&self, service: &str, t: ServiceType, code: u16) {
        self.requests
            .get_or_create(&[
                ("service", service.to_string()),
                ("type", t.key().to_string()),
                ("status", status_class(code).to_string()),
            ])
            .inc();
    }

    pub fn suspicious(&self, t: ServiceType, reason: &'static str, counted: bool) {
        let counted = if counted { "true" } else { "false" };
        self.suspicious_events
            .get_or_create(&[("type", t.key()), ("reason", reason), ("counted", counted)])
            .inc();
    }

    pub fn cert_reload(&self, ok: bool) {
        let r = if ok { "loaded" } else { "failed" };
        self.cert_reloads.get_or_create(&[("result", r)]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_names_carry_the_prefix() {
        let m = ProxyMetrics::default();
        let mut reg = Registry::with_prefix("portico");
        m.register(&mut reg);
        m.accepted(ServiceType::Https);
        m.suspicious(ServiceType::Ldap, "unknown_name", true);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("portico_proxy_connections_total{type=\"https\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "portico_proxy_suspicious_events_total{type=\"ldap\",reason=\"unknown_name\",counted=\"true\"} 1"
            ),
            "{out}"
        );
        assert!(out.contains("portico_proxy_active_connections{type=\"https\"} 1"));
    }

    #[test]
    fn requests_are_counted_by_service_type_and_status_class() {
        let m = ProxyMetrics::default();
        let mut reg = Registry::with_prefix("portico");
        m.register(&mut reg);
        m.request("app.test", ServiceType::Https, 200);
        m.request("app.test", ServiceType::Https, 204);
        m.request("app.test", ServiceType::Http, 503);
        m.request(UNKNOWN_SERVICE, ServiceType::Https, 421);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for line in [
            "portico_proxy_requests_total{service=\"app.test\",type=\"https\",status=\"2xx\"} 2",
            "portico_proxy_requests_total{service=\"app.test\",type=\"http\",status=\"5xx\"} 1",
            "portico_proxy_requests_total{service=\"unknown\",type=\"https\",status=\"4xx\"} 1",
        ] {
            assert!(out.contains(line), "{line} in:\n{out}");
        }
        assert_eq!(
            [101, 302, 404, 599, 600, 99].map(status_class),
            ["1xx", "3xx", "4xx", "5xx", "other", "other"]
        );
    }
}
