//! The control plane against the real `portico`: the admin page (in headless Chromium), the
//! REST API (authentication, status, configuration, TURN users and credentials, hardening
//! against nonsense), the configuration store under `kill -9`, validation at every door,
//! redacted secrets, the example configuration, comments in the operator's file kept across
//! API changes, process life (signals, `check`, SIGHUP), supervision of the dataplane with
//! traffic flowing, Prometheus and the Grafana dashboard, and the Debian package (installed,
//! upgraded, purged; as root).

use portico_testkit::{Portico, Spec};

mod admin_page;
mod api;
mod api_hardening;
mod config_comments;
mod config_secrets;
mod config_store;
mod config_validation;
mod debian_package;
mod example_config;
mod grafana_dashboard;
mod lifecycle;
mod prometheus;
mod supervision;
mod supervision_relay;

/// The control-plane tests' configuration: STUN/TURN on a free port of 127.0.0.1, one
/// worker, relay ports 40000-40999.
pub fn spec() -> Spec {
    Spec::new().relay_ports("40000-40999")
}

/// An installation of [`spec`] with `extra_turn` in `[turn]`; nothing started yet (the tests
/// start, kill and restart `portico` themselves).
pub fn site(tag: &str, extra_turn: &str) -> Portico {
    Portico::new(tag, spec().turn(extra_turn))
}
