//! `portico-perf`: load generators and benchmark helpers for Portico and the servers it is
//! compared with.
//!
//! One module per scenario: [`stun_load`] (STUN Binding) and [`turn_load`] (TURN relay,
//! driving [`turn_client`] threads and a [`turn_peer`], with [`turn_msg`] for the protocol and
//! [`stamp`] for the test packets' header), plus [`uclient_run`] for coturn's own client. They
//! share batched UDP I/O ([`udp`]), a per-socket transaction ring ([`txtable`]), a
//! fixed-bucket latency histogram ([`histogram`]), `/proc` accounting ([`proc_stats`]) and
//! report formatting ([`report`]). [`echo_server`] (and [`turn_stub`] behind its `--turn`)
//! is the trivial responder that measures a generator's own ceiling; [`bench_report`] and
//! [`turn_report`] turn a benchmark's JSON reports into sections of `perf/RESULTS.md`
//! ([`results_doc`]), with [`svg`] charts. [`register_load`] measures H.323 and SIP
//! registrations through Portico's reverse proxy ([`register_report`] writes its section).

pub mod bench_report;
pub mod echo_server;
pub mod histogram;
pub mod media_load;
pub mod proc_stats;
pub mod register_load;
pub mod register_report;
pub mod report;
pub mod results_doc;
pub mod sk_lookup_probe;
pub mod stamp;
pub mod stun_load;
pub mod svg;
pub mod turn_client;
pub mod turn_load;
pub mod turn_msg;
pub mod turn_peer;
pub mod turn_plan;
pub mod turn_report;
pub mod turn_scale;
pub mod turn_stream;
pub mod turn_stub;
pub mod turn_tcp_report;
pub mod txtable;
pub mod uclient_run;
pub mod udp;
