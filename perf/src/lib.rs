//! `portico-perf`: load generators and benchmark helpers for Portico and the servers it is
//! compared with.
//!
//! One module per scenario ([`stun_load`]; TURN comes next), sharing the pieces every
//! scenario needs: batched UDP I/O ([`udp`]), a per-socket transaction ring ([`txtable`]),
//! a fixed-bucket latency histogram ([`histogram`]), `/proc` accounting ([`proc_stats`]) and
//! report formatting ([`report`]). [`echo_server`] is the trivial responder that measures
//! the generator's own ceiling; [`bench_report`] turns a benchmark's JSON reports into
//! `perf/RESULTS.md`.

pub mod bench_report;
pub mod echo_server;
pub mod histogram;
pub mod proc_stats;
pub mod report;
pub mod stun_load;
pub mod txtable;
pub mod udp;
