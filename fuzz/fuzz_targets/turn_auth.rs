//! The TURN core past authentication: requests built from the input and signed with valid credentials.
//! The entry point is `portico_dataplane::fuzzing::turn_auth`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh turn_auth`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::turn_auth(data));
