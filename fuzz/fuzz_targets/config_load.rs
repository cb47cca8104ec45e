//! The configuration loader and its round trip.
//! The entry point is `portico_dataplane::fuzzing::config_load`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh config_load`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::config_load(data));
