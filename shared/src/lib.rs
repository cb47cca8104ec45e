//! `portico-shared` holds only what both Portico processes must agree on:
//!
//! * [`config`]: the typed configuration model, its TOML form and its validation. The
//!   control plane loads and validates it; the dataplane receives the same text through shared
//!   memory and parses it with the same code, so the two can never disagree about a key.
//! * [`shm`]: the shared-memory segment between `portico` and `portico-dataplane`: a versioned
//!   header, the configuration block, the per-worker counters, the allocation records, the
//!   blacklist and the event rings. The crate's only `unsafe` is in two of its modules (the
//!   mapping and the futex calls); everything else denies it.
//! * [`counters`]: the names of the per-worker counters, shared so the control plane can turn
//!   them into Prometheus metrics without knowing dataplane internals.
//! * [`addr`]: CIDR lists used by peer policy and access limitation.
//! * [`values`]: the other typed configuration values, durations and port ranges.

#![deny(unsafe_code)]

pub mod addr;
pub mod config;
pub mod counters;
pub mod handoff;
pub mod media_config;
pub mod proxy_config;
pub mod shm;
pub mod values;
