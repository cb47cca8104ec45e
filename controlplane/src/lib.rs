//! `portico`'s control plane as a library: the modules the `portico` binary (`src/main.rs`)
//! runs. The library exists so that code outside the binary can reach them: the fuzz targets
//! in `fuzz/` and the replay of their inputs in `tests/proxy/fuzz_regressions.rs`.

// Lints about the API a library offers to other crates; this one has no users but its own
// binary, fuzz targets and tests, and its types were written for the binary.
#![forbid(unsafe_code)]
#![allow(clippy::len_without_is_empty, clippy::new_without_default)]

pub mod api;
pub mod config;
pub mod control;
pub mod fleet;
pub mod fraud;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod state;
pub mod supervisor;
