//! Prometheus metrics: the dataplane's shared-memory counters, read at scrape time, and the
//! control plane's own counters (restarts, configuration changes, API auth failures).
//!
//! The dataplane side is exported generically from [`portico_shared::counters::Counter`], so a
//! counter added there appears here without a change: each family is `portico_<metric>_total`
//! with one series per worker (`worker="0"`, ..., and `worker="tcp"` for the TCP thread), and
//! families that are gauges (`Counter::is_gauge`) are `portico_<metric>` summed over all blocks,
//! because one block alone may hold a "negative" share of a gauge. Reading is a relaxed load
//! per slot: a scrape never takes a lock the dataplane could wait on.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use portico_shared::counters::Counter as DpCounter;
use portico_shared::shm::{SharedMemory, MAX_WORKERS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::fraud::task::Fraud;
use crate::supervisor;

/// Content type of the Prometheus text format 0.0.4, what `promtool` and older scrapers read.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Content type of OpenMetrics text, served when the scraper asks for it (Prometheus does).
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of `portico_config_reloads_total`: where the change came from and whether it took.
pub type ReloadLabels = [(&'static str, &'static str); 2];

pub struct Metrics {
    registry: Registry,
    pub dataplane_restarts: Counter,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub api_auth_failures: Counter,
}

impl Metrics {
    pub fn new(shm: Arc<SharedMemory>) -> Metrics {
        // `register` ends help texts with a period itself.
        let mut registry = Registry::with_prefix("portico");
        let dataplane_restarts = Counter::default();
        registry.register(
            "dataplane_restarts",
            "Dataplane restarts after the dataplane died (kept in shared memory across control-plane restarts)",
            dataplane_restarts.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration changes by source (api, sighup) and result (applied, rejected)",
            config_reloads.clone(),
        );
        let api_auth_failures = Counter::default();
        registry.register(
            "api_auth_failures",
            "REST API requests refused for a missing or wrong admin token",
            api_auth_failures.clone(),
        );
        registry.register(
            "build",
            "Build information; the value is always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(SharedCounters { shm }));
        Metrics {
            registry,
            dataplane_restarts,
            config_reloads,
            api_auth_failures,
        }
    }

    /// Adds the reverse proxy's counters to the exposition.
    pub fn register_proxy(&mut self, proxy: &crate::proxy::metrics::ProxyMetrics) {
        proxy.register(&mut self.registry);
    }

    /// Adds the fraud engine's figures to the exposition.
    pub fn register_fraud(&mut self, fraud: Arc<Fraud>) {
        self.registry
            .register_collector(Box::new(FraudMetrics { fraud }));
    }

    pub fn reload(&self, source: &'static str, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.config_reloads
            .get_or_create(&[("source", source), ("result", result)])
            .inc();
    }

    /// The exposition text and its content type: OpenMetrics when `accept` asks for it, the
    /// Prometheus text format otherwise.
    pub fn render(&self, accept: &str) -> Result<(String, &'static str), fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        if accept.contains("application/openmetrics-text") {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
            Ok((out, OPENMETRICS_TEXT))
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
            Ok((out, PROMETHEUS_TEXT))
        }
    }
}

/// Reads the shared-memory segment at scrape time.
struct SharedCounters {
    shm: Arc<SharedMemory>,
}

impl fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCounters")
            .field("shm", &self.shm.name())
            .finish()
    }
}

/// Counter variants grouped by family name, in the order families first appear.
fn families() -> Vec<Vec<DpCounter>> {
    let mut out: Vec<Vec<DpCounter>> = Vec::new();
    for c in DpCounter::ALL {
        match out.iter_mut().find(|f| f[0].metric() == c.metric()) {
            Some(f) => f.push(*c),
            None => out.push(vec![*c]),
        }
    }
    out
}

impl Collector for SharedCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let seg = self.shm.segment();
        let h = &seg.header;
        let workers = (h.workers.load(Ordering::Relaxed) as usize).min(MAX_WORKERS);
        let mut blocks: Vec<(usize, String)> = (0..workers).map(|w| (w, w.to_string())).collect();
        blocks.push((MAX_WORKERS, "tcp".to_string()));

        for family in families() {
            let first = family[0];
            if first.is_gauge() {
                let mut fam = encoder.encode_descriptor(
                    first.metric(),
                    first.help(),
                    None,
                    MetricType::Gauge,
                )?;
                for c in &family {
                    let labels: Vec<(&str, &str)> = c.labels().to_vec();
                    // Wrapping sum reinterpreted as signed: a transient negative shows as such.
                    let v = seg.total(*c) as i64;
                    ConstGauge::new(v).encode(fam.encode_family(&labels)?)?;
                }
            } else {
                let mut fam = encoder.encode_descriptor(
                    first.metric(),
                    first.help(),
                    None,
                    MetricType::Counter,
                )?;
                for c in &family {
                    for (block, worker) in &blocks {
                        let mut labels: Vec<(&str, &str)> = c.labels().to_vec();
                        labels.push(("worker", worker));
                        let v = seg.counters(*block).get(*c);
                        ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
                    }
                }
            }
        }

        let up = supervisor::live_dataplane(&self.shm).is_some();
        let g = ConstGauge::new(i64::from(up));
        g.encode(encoder.encode_descriptor(
            "dataplane_up",
            "1 while the dataplane runs with a fresh heartbeat.",
            None,
            MetricType::Gauge,
        )?)?;
        let g = ConstGauge::new(workers as i64);
        g.encode(encoder.encode_descriptor(
            "dataplane_workers",
            "Worker threads the running dataplane started.",
            None,
            MetricType::Gauge,
        )?)?;
        let mut fam = encoder.encode_descriptor(
            "config_generation",
            "Configuration generation published by the control plane and applied by the dataplane.",
            None,
            MetricType::Gauge,
        )?;
        let published = seg.config_generation() as i64;
        let applied = h.config_applied.load(Ordering::Acquire) as i64;
        ConstGauge::new(published).encode(fam.encode_family(&[("stage", "published")])?)?;
        ConstGauge::new(applied).encode(fam.encode_family(&[("stage", "applied")])?)?;
        Ok(())
    }
}

/// The fraud engine's lists and counts, read at scrape time.
struct FraudMetrics {
    fraud: Arc<Fraud>,
}

impl fmt::Debug for FraudMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FraudMetrics")
    }
}

impl Collector for FraudMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (black, white, tracked) = self.fraud.sizes();
        let stats = self.fraud.stats();
        let mut fam = encoder.encode_descriptor(
            "fraud_entries",
            "Blacklist and whitelist entries now in force.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(black as i64).encode(fam.encode_family(&[("kind", "black")])?)?;
        ConstGauge::new(white as i64).encode(fam.encode_family(&[("kind", "white")])?)?;
        ConstGauge::new(tracked as i64).encode(encoder.encode_descriptor(
            "fraud_tracked_sources",
            "Sources whose suspicious events are being counted.",
            None,
            MetricType::Gauge,
        )?)?;
        let mut fam = encoder.encode_descriptor(
            "fraud_suspicious_events",
            "Suspicious events by where they were seen (proxy, turn, stun) and why.",
            None,
            MetricType::Counter,
        )?;
        for ((origin, reason), n) in &stats.suspicious {
            let labels = [("origin", origin.as_str()), ("reason", reason.as_str())];
            ConstCounter::new(*n).encode(fam.encode_family(&labels)?)?;
        }
        ConstCounter::new(self.fraud.events_dropped()).encode(encoder.encode_descriptor(
            "fraud_events_dropped",
            "Suspicious events from the dataplane lost because its event ring was full.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(stats.auto_blacklisted).encode(encoder.encode_descriptor(
            "fraud_auto_blacklisted",
            "Sources put on the blacklist automatically.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(stats.blocked_connections).encode(encoder.encode_descriptor(
            "fraud_blocked_connections",
            "Connections the reverse proxy refused because the source is blacklisted.",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shm(tag: &str) -> (String, Arc<SharedMemory>) {
        let name = format!("/portico-test-metrics-{tag}-{}", std::process::id());
        let shm = Arc::new(SharedMemory::create(&name).unwrap());
        (name, shm)
    }

    #[test]
    fn counters_per_worker_and_gauges_summed() {
        let (name, shm) = shm("a");
        let seg = shm.segment();
        seg.header.workers.store(2, Ordering::Relaxed);
        seg.counters(0).add(DpCounter::RxPackets, 7);
        seg.counters(1).add(DpCounter::RxPackets, 3);
        seg.counters(MAX_WORKERS).add(DpCounter::RxPackets, 2);
        seg.counters(0).add(DpCounter::StunBindingSuccess, 4);
        // A block beyond the running workers is not exported.
        seg.counters(5).add(DpCounter::RxPackets, 100);
        let m = Metrics::new(Arc::clone(&shm));
        m.dataplane_restarts.inc();
        m.reload("api", true);
        let (text, ctype) = m.render("*/*").unwrap();
        assert_eq!(ctype, PROMETHEUS_TEXT);
        for line in [
            "# TYPE portico_dataplane_rx_packets_total counter",
            "portico_dataplane_rx_packets_total{worker=\"0\"} 7",
            "portico_dataplane_rx_packets_total{worker=\"1\"} 3",
            "portico_dataplane_rx_packets_total{worker=\"tcp\"} 2",
            "portico_stun_requests_total{result=\"success\",worker=\"0\"} 4",
            "portico_stun_requests_total{result=\"bad_request\",worker=\"tcp\"} 0",
            "portico_dataplane_restarts_total 1",
            "portico_config_reloads_total{source=\"api\",result=\"applied\"} 1",
            "portico_build_info{version=\"",
            "portico_dataplane_workers 2",
            "portico_config_generation{stage=\"published\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("worker=\"5\""), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("portico_"), "{line}");
        }
        SharedMemory::unlink(&name);
    }

    #[test]
    fn every_counter_family_is_exported_once() {
        let (name, shm) = shm("b");
        let m = Metrics::new(Arc::clone(&shm));
        let (text, _) = m.render("").unwrap();
        for f in families() {
            let full = if f[0].is_gauge() {
                format!("portico_{}", f[0].metric())
            } else {
                format!("portico_{}_total", f[0].metric())
            };
            let kind = if f[0].is_gauge() { "gauge" } else { "counter" };
            let decl = format!("# TYPE {full} {kind}\n");
            assert_eq!(text.matches(&decl).count(), 1, "{decl} in\n{text}");
        }
        SharedMemory::unlink(&name);
    }

    #[test]
    fn openmetrics_on_request() {
        let (name, shm) = shm("c");
        let m = Metrics::new(Arc::clone(&shm));
        let (text, ctype) = m
            .render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
            .unwrap();
        assert_eq!(ctype, OPENMETRICS_TEXT);
        assert!(text.ends_with("# EOF\n"), "{text}");
        SharedMemory::unlink(&name);
    }
}
