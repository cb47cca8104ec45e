//! STUN parsing, every attribute decoder and the integrity checks.
//! The entry point is `portico_dataplane::fuzzing::stun_parse`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh stun_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::stun_parse(data));
