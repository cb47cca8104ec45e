//! Shared harness of the integration tests: every test file runs the real `portico` binary
//! (which starts the real dataplane) and talks to it over loopback sockets.
//!
//! * [`server`]: start `portico run --config FILE` on free ports with its own state dir, wait
//!   until it answers, read its counters from shared memory, stop it on drop.
//! * [`stun`]: a small STUN codec of the tests' own, independent of the server's.
//! * [`net`]: request/answer over UDP and TCP, and "no answer" checks.
//! * [`ports`]: free ports picked at run time.
//! * [`tools`]: running third-party clients with a time limit.
//!
//! Each test binary uses only part of the harness.
#![allow(dead_code)]

pub mod net;
pub mod ports;
pub mod server;
pub mod stun;
pub mod tools;
