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

#[derive(Default)]
pub struct ProxyMetrics {
    /// Client connections accepted, by service type.
    pub connections: Family<TypeLabel, Counter>,
    /// Client connections open now, by service type.
    pub active: Family<TypeLabel, Gauge>,
    /// Requests (HTTP requests, first SIP/LDAP messages) forwarded to a target.
    pub forwarded: Family<TypeLabel, Counter>,
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
}
