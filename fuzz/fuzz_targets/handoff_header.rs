//! The fd hand-off header the proxy sends the dataplane (`portico_shared::handoff`): parse
//! and round trip.
//! The entry point is `portico_dataplane::fuzzing::handoff_header`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh handoff_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::handoff_header(data));
